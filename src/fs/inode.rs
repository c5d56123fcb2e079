//! The inode store: every object of the source the kernel knows, held by
//! an `O_PATH` descriptor and keyed by its underlying (dev, ino); the
//! numbers the kernel sees (see SYNTHETIC_INO_BIT); lookups counted and
//! forgotten, and the throttle state of forgotten files kept while the
//! scheduler still holds it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use fuser::{BackingId, Errno, FileAttr, INodeNo};

use super::{Result, ThrottleFs, check, component, last_errno, stat_fd, to_attr};
use crate::io::DirectFd;
use crate::scheduler::Msg;
use crate::stats::FileShared;

/// Inode numbers (the FUSE node id, which is also `st_ino`) with this bit
/// set are made up: for objects on another device than the source root
/// (mounts inside the source), and for the few on its device whose own
/// number cannot be used (1, the FUSE root's id; 0; or this bit set).
pub(super) const SYNTHETIC_INO_BIT: u64 = 1 << 63;

/// `InodeTable::lingering` is pruned of dead entries when it grows to this.
pub(super) const LINGERING_PRUNE_MIN: usize = 64;

pub(super) struct InodeTable {
    pub(super) by_ino: HashMap<u64, Arc<InodeRef>>,
    pub(super) by_key: HashMap<(u64, u64), u64>,
    /// Made-up numbers, kept for the life of the mount so an object keeps
    /// its number whatever the kernel forgets.
    pub(super) synthetic: HashMap<(u64, u64), u64>,
    pub(super) next_synthetic: u64,
    /// Counters of forgotten files whose throttle state the scheduler still
    /// holds (until their buckets are empty): a new lookup of the same file
    /// takes them up again.
    pub(super) lingering: HashMap<u64, Weak<FileShared>>,
    /// `lingering` is pruned when it grows to this size.
    pub(super) lingering_mark: usize,
}

/// One object of the source tree, held by an `O_PATH` descriptor.
pub(super) struct InodeRef {
    pub(super) ino: u64,
    /// Keeps `fd` open for as long as the inode lives.
    _owned: OwnedFd,
    pub(super) fd: RawFd,
    /// Underlying (dev, ino): the identity of the object.
    pub(super) key: (u64, u64),
    /// Kernel lookups not yet forgotten; changed under the table's lock.
    pub(super) lookups: AtomicU64,
    /// File type bits of the mode (S_IFREG, S_IFDIR, ...).
    pub(super) kind: libc::mode_t,
    /// The directory this inode was last looked up in: where a file's
    /// inherited limits come from (a directory's own ancestors are found
    /// through "..").
    pub(super) parent: AtomicU64,
    /// Throttle state shared with the scheduler and the open handles.
    pub(super) shared: Arc<FileShared>,
    /// The `tree_gen` a file's limits were last resolved at; 0: never.
    pub(super) resolved_gen: AtomicU64,
    /// Held while resolving, so the last limits sent are the newest.
    pub(super) resolving: Mutex<()>,
    /// O_DIRECT descriptors of this file, by DIRECT_SHARE_FLAGS: one per
    /// access mode, alive while a handle holds it.
    pub(super) direct_fds: Mutex<HashMap<i32, Weak<DirectFd>>>,
    /// How the kernel was told to open this file's handles, for the next
    /// open to agree (see `ThrottleFs::open_mode`).
    pub(super) open_modes: Mutex<OpenModes>,
}

/// The open handles of one file, by how the kernel was told to open them.
#[derive(Default)]
pub(super) struct OpenModes {
    /// The backing id registered with the kernel for the handles opened
    /// with FOPEN_PASSTHROUGH, alive while one of them is open.
    pub(super) backing: Weak<BackingId>,
    /// Handles opened without FOPEN_PASSTHROUGH, not yet released.
    pub(super) plain: u64,
}

impl InodeRef {
    pub(super) fn new(
        ino: u64,
        fd: OwnedFd,
        key: (u64, u64),
        kind: libc::mode_t,
        parent: u64,
        shared: Arc<FileShared>,
    ) -> Self {
        InodeRef {
            ino,
            fd: fd.as_raw_fd(),
            _owned: fd,
            key,
            lookups: AtomicU64::new(1),
            kind,
            parent: AtomicU64::new(parent),
            shared,
            resolved_gen: AtomicU64::new(0),
            resolving: Mutex::new(()),
            direct_fds: Mutex::new(HashMap::new()),
            open_modes: Mutex::default(),
        }
    }

    pub(super) fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    pub(super) fn is_file(&self) -> bool {
        self.kind == libc::S_IFREG
    }
}

impl ThrottleFs {
    pub(super) fn inode(&self, ino: INodeNo) -> Result<Arc<InodeRef>> {
        self.inodes
            .read()
            .expect("inode lock")
            .by_ino
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ESTALE)
    }

    /// Every regular file the kernel knows now; the inode lock is released
    /// before the caller looks at them.
    pub(super) fn file_inodes(&self) -> Vec<Arc<InodeRef>> {
        self.inodes
            .read()
            .expect("inode lock")
            .by_ino
            .values()
            .filter(|n| n.is_file())
            .cloned()
            .collect()
    }

    /// Find `name` in `parent` and count a kernel lookup of it.
    pub(super) fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr> {
        let parent = self.inode(parent)?;
        let name = component(name)?;
        // SAFETY: open relative to a directory descriptor we hold.
        let fd = check(unsafe {
            libc::openat(
                parent.fd,
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })
        .map_err(|e| self.note_fd_error(e, "lookup"))?;
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = stat_fd(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut table = self.inodes.write().expect("inode lock");
        if let Some(&ino) = table.by_key.get(&key) {
            let existing = table.by_ino.get(&ino).expect("tables agree");
            existing.lookups.fetch_add(1, Ordering::Relaxed);
            existing.parent.store(parent.ino, Ordering::Relaxed);
            return Ok(to_attr(ino, &st));
        }
        let ino = self.number(&mut table, key)?;
        let shared = table
            .lingering
            .remove(&ino)
            .and_then(|w| w.upgrade())
            .unwrap_or_default();
        let node = Arc::new(InodeRef::new(
            ino,
            fd,
            key,
            st.st_mode & libc::S_IFMT,
            parent.ino,
            shared,
        ));
        table.by_ino.insert(ino, node);
        table.by_key.insert(key, ino);
        Ok(to_attr(ino, &st))
    }

    /// The inode number of the object `key`, the same for the life of the
    /// mount: the source's own number on the source root's device where it
    /// is usable (see SYNTHETIC_INO_BIT), else a made-up one.
    fn number(&self, table: &mut InodeTable, key: (u64, u64)) -> Result<u64> {
        if let Some(n) = self.own_number(key) {
            return Ok(n);
        }
        if let Some(&n) = table.synthetic.get(&key) {
            return Ok(n);
        }
        let n = table.next_synthetic;
        // 2^63 made-up numbers: running out is not a practical concern,
        // but a wrap would hand out a number twice.
        table.next_synthetic = n.checked_add(1).ok_or(Errno::EOVERFLOW)?;
        table.synthetic.insert(key, n);
        Ok(n)
    }

    /// The number of `key` if it needs no made-up one.
    fn own_number(&self, key: (u64, u64)) -> Option<u64> {
        let (dev, ino) = key;
        if key == self.root_key {
            Some(INodeNo::ROOT.0)
        } else if dev == self.root_key.0 && ino > INodeNo::ROOT.0 && ino & SYNTHETIC_INO_BIT == 0 {
            Some(ino)
        } else {
            None
        }
    }

    /// `number`, for readdir, without the write lock when it is not needed.
    pub(super) fn number_of(&self, key: (u64, u64)) -> Result<u64> {
        if let Some(n) = self.own_number(key) {
            return Ok(n);
        }
        if let Some(&n) = self.inodes.read().expect("inode lock").synthetic.get(&key) {
            return Ok(n);
        }
        self.number(&mut self.inodes.write().expect("inode lock"), key)
    }

    /// The kernel dropped `nlookup` of its lookups of `ino`. Counted per
    /// number: a FORGET that the kernel sent before a new lookup of the
    /// same object (same number) but that reaches us after it leaves that
    /// lookup counted.
    pub(super) fn forget_one(&self, ino: u64, nlookup: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let mut table = self.inodes.write().expect("inode lock");
        let Some(node) = table.by_ino.get(&ino).cloned() else {
            return;
        };
        let left = node.lookups.load(Ordering::Relaxed).saturating_sub(nlookup);
        node.lookups.store(left, Ordering::Relaxed);
        if left == 0 {
            table.by_ino.remove(&ino);
            table.by_key.remove(&node.key);
            // A file still linked keeps its throttle state and counters
            // until its buckets are empty, holding the file so its number
            // is not reused meanwhile; an unlinked one's go when idle.
            // (Only a file that was opened has any.)
            let has_state = node.is_file() && node.resolved_gen.load(Ordering::SeqCst) != 0;
            let mut dup_error = None;
            let keep = if has_state && stat_fd(node.fd).is_ok_and(|st| st.st_nlink > 0) {
                // SAFETY: dup of a descriptor we hold.
                let fd = unsafe { libc::fcntl(node.fd, libc::F_DUPFD_CLOEXEC, 0) };
                if fd < 0 {
                    // Reported after the lock is released: the report
                    // takes it.
                    dup_error = Some(last_errno());
                    None
                } else {
                    // SAFETY: fresh descriptor.
                    Some(unsafe { OwnedFd::from_raw_fd(fd) })
                }
            } else {
                None
            };
            if keep.is_some() {
                table.lingering.insert(ino, Arc::downgrade(&node.shared));
                if table.lingering.len() >= table.lingering_mark {
                    table.lingering.retain(|_, w| w.strong_count() > 0);
                    table.lingering_mark = LINGERING_PRUNE_MIN.max(2 * table.lingering.len());
                }
            }
            log::debug!("inode {ino} forgotten (state kept: {})", keep.is_some());
            // Sent under the lock: a new lookup of the same number, and
            // the limits it sends, come after it.
            let _ = self.scheduler.send(Msg::Forget { file: ino, keep });
            drop(table);
            if let Some(e) = dup_error {
                self.note_fd_error(e, "forget");
            }
        }
    }
}
