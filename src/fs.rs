//! The passthrough filesystem. Every object of the source tree is reached
//! through an `O_PATH` descriptor keyed by its (dev, ino), and every
//! operation is done with `*at` calls on descriptors (or their
//! `/proc/self/fd` links), never by re-joining path strings, so a rename
//! or a swapped-in symlink cannot redirect the daemon outside the source.
//!
//! Reads and writes of files with limits go to the scheduler with their
//! reply; files without limits are served inline on the FUSE thread, or,
//! with `--passthrough`, not seen at all: the kernel reads and writes them
//! straight from the underlying file (FUSE passthrough).
//!
//! The inode store is in `inode.rs`; where a file's limits come from, and
//! the attributes that set them, in `limits.rs`.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::io::{self as fio, Completion, DirectFd, DirectSender, Flight, Handle, Job};
use crate::scheduler::{Msg, SchedulerTx};
use crate::sizing::{self, ImageFormat};
use crate::stats::FileShared;
use crate::throttle::{Direction, Limits};
use crate::xattr::{self, Attr};

mod inode;
mod limits;

use inode::{InodeRef, InodeTable, LINGERING_PRUNE_MIN, SYNTHETIC_INO_BIT};

/// The largest value the kernel passes for an xattr (XATTR_SIZE_MAX).
const XATTR_VALUE_MAX_BYTES: usize = 64 * 1024;

/// Attributes and entries may be cached by the kernel this long: the source
/// is ours while mounted, so only changes made behind the mount's back are
/// seen late, by at most this much.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// The largest request we let the kernel send (it caps this at its own
/// max_pages limit, 1 MiB by default): a guest's 1 MiB request must reach
/// us whole, to count as one operation.
const MAX_REQUEST_BYTES: u32 = 1024 * 1024;

/// Asynchronous requests (a caller's aio/io_uring direct I/O) the kernel
/// keeps in flight towards us before it queues the rest on its side. A VM
/// keeps 32-128 requests in flight per disk; the kernel's default is 12.
const MAX_BACKGROUND_REQUESTS: u16 = 512;

/// The alignment of a FUSE ring entry's payload buffer (a page at least):
/// an `O_DIRECT` descriptor that demands no more can read into it and
/// write from it in place.
const RING_BUFFER_ALIGN_BYTES: usize = 4096;

/// Open flags that give an O_DIRECT descriptor its meaning beyond the
/// alignment: handles of one inode share one only when these agree.
/// Not O_APPEND, which no underlying descriptor carries.
const DIRECT_SHARE_FLAGS: i32 = libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME;

/// Caller's open flags our underlying descriptors must not carry. O_APPEND:
/// the kernel already sends an appending write at the end of file, and
/// sends writes that must not append (page writeback of a shared mapping,
/// pwritev2 RWF_NOAPPEND) at their own offset; an O_APPEND descriptor would
/// move them all to the end.
const UNDERLYING_DROP_FLAGS: i32 = libc::O_APPEND;

/// The stacking depth announced with FUSE_PASSTHROUGH: the kernel refuses
/// a backing file on a filesystem stacked this deep or deeper, so 2 lets
/// the source be on overlayfs (a container's root), at the price of the
/// mount itself not being a layer of another overlayfs.
const PASSTHROUGH_STACK_DEPTH: u32 = 2;

/// Running out of descriptors is logged at most this often, with a count of
/// the failures since: one line, not one per failed lookup.
const FD_WARNING_INTERVAL: Duration = Duration::from_secs(60);

type Result<T> = std::result::Result<T, Errno>;

fn last_errno() -> Errno {
    Errno::from(io::Error::last_os_error())
}

fn check(r: libc::c_int) -> Result<libc::c_int> {
    if r < 0 { Err(last_errno()) } else { Ok(r) }
}

fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// A name the kernel gives us must be one path component; "." and ".."
/// would let a lookup climb out of the source.
fn component(name: &OsStr) -> Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    cstr(name)
}

/// `/proc/self/fd/N`: reaches the object an `O_PATH` descriptor holds,
/// for calls that have no descriptor form.
fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL")
}

struct DirStream {
    dir: *mut libc::DIR,
    /// Where the next readdir continues (a telldir value), to notice seeks.
    position: u64,
    /// The directory's device: its entries' (dev, ino), but for mount
    /// points.
    dev: u64,
}

// SAFETY: a DIR stream may be used from any thread as long as only one uses
// it at a time, which the Mutex around it ensures.
unsafe impl Send for DirStream {}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: `dir` came from fdopendir and is closed exactly once.
        unsafe { libc::closedir(self.dir) };
    }
}

/// An open file: its handle, and its inode, whose limits are brought up to
/// date before each request.
struct OpenFile {
    handle: Arc<Handle>,
    node: Arc<InodeRef>,
    /// How the kernel was told to open it.
    mode: OpenMode,
}

/// How the kernel was told to open a file (see `ThrottleFs::open_mode`).
#[derive(Clone)]
enum OpenMode {
    /// FOPEN_DIRECT_IO: reads and writes come to the daemon. Counted in
    /// the inode's `OpenModes::plain`.
    Plain,
    /// FOPEN_PASSTHROUGH with the inode's backing id, held while open.
    /// `throttled`: with FOPEN_DIRECT_IO too, which overrides it for reads
    /// and writes (they come to the daemon, throttled); else the handle is
    /// in passthrough and counted in `passthrough_handles`.
    Backed {
        backing: Arc<BackingId>,
        throttled: bool,
    },
}

impl OpenMode {
    /// The backing id to answer the open with, if any.
    fn backing(&self) -> Option<&BackingId> {
        match self {
            OpenMode::Plain => None,
            OpenMode::Backed { backing, .. } => Some(backing),
        }
    }

    /// The FOPEN flags to answer the open with: direct I/O (no page cache
    /// in front of the throttle) unless in passthrough, and parallel
    /// direct writes (concurrent writes to one file reach us, and the
    /// queue, together instead of one at a time).
    fn fopen_flags(&self) -> FopenFlags {
        match self {
            OpenMode::Backed {
                throttled: false, ..
            } => FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            _ => FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        }
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        match &self.mode {
            OpenMode::Plain => {
                self.node.open_modes.lock().expect("open modes").plain -= 1;
            }
            OpenMode::Backed {
                throttled: false, ..
            } => {
                self.node
                    .shared
                    .passthrough_handles
                    .fetch_sub(1, Ordering::Relaxed);
            }
            OpenMode::Backed { .. } => {}
        }
    }
}

/// When descriptors last ran out, and failures since the last warning.
#[derive(Default)]
struct FdShortage {
    warned: Option<Instant>,
    unreported: u64,
}

pub struct ThrottleFs {
    /// The source directory's path, only to show directory origins.
    source: std::path::PathBuf,
    /// (dev, ino) of the source directory: where inheritance stops.
    root_key: (u64, u64),
    inodes: RwLock<InodeTable>,
    files: RwLock<HashMap<u64, OpenFile>>,
    /// Bumped whenever a directory's limits, group or place change: every
    /// file resolved at an older value is re-resolved before it is next
    /// used (open, request, `user.throttle.effective`), open files at once.
    /// A rename costs O(open files), not O(files seen since mount).
    tree_gen: AtomicU64,
    fd_shortage: Mutex<FdShortage>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_fh: AtomicU64,
    /// Shared, not cloned, by what outlives a call (a ring I/O's
    /// completion): dropping a `SchedulerTx` wakes the scheduler.
    scheduler: Arc<SchedulerTx>,
    /// Where requests of files without limits may go at queue depth.
    unthrottled: DirectSender,
    /// Limits in force for every file (mount options).
    limits: Limits,
    /// Throttle groups' limits from the mount options.
    group_defaults: HashMap<String, Limits>,
    /// How per-GiB limits size disks where no attribute says
    /// (`--image-format`, `-o image_format=`).
    image_format: ImageFormat,
    our_uid: u32,
    /// The kernel checks POSIX ACLs (FUSE_POSIX_ACL granted at INIT);
    /// without it, `system.posix_acl_*` cannot be set.
    acls_enforced: bool,
    /// `--passthrough`, and still possible: the kernel offered
    /// FUSE_PASSTHROUGH at INIT, and registering a backing file was not
    /// refused for want of privilege.
    passthrough: AtomicBool,
    /// A refused passthrough was logged (once per mount).
    passthrough_warned: AtomicBool,
    /// FUSE_HANDLE_KILLPRIV_V2 granted at INIT (asked for with
    /// passthrough): the kernel leaves clearing setuid/setgid on a write
    /// to us, and asks for it before a passthrough write with a SETATTR
    /// that changes nothing (see `do_setattr`).
    killpriv_v2: bool,
    /// Sends invalidations to the kernel (`mode_changed`); set by
    /// `mount.rs` once the session exists.
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

/// The /proc status of the process that sent `req`, if it is still there
/// and in sight (another pid namespace reports pid 0).
fn caller_status(req: &Request) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{}/status", req.pid())).ok()
}

/// The value of a `Name:` line of a /proc status.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
}

/// Whether the process that sent `req` is in group `gid`: its primary
/// group, or a supplementary one (from /proc; without it, only the
/// primary group counts).
fn caller_in_group(req: &Request, gid: u32) -> bool {
    req.gid() == gid
        || caller_status(req).is_some_and(|s| {
            status_field(&s, "Groups")
                .is_some_and(|g| g.split_whitespace().any(|g| g.parse() == Ok(gid)))
        })
}

/// Whether the process that sent `req` may keep setuid/setgid bits on a
/// file it modifies (CAP_FSETID; without /proc, whether it is root).
fn caller_has_fsetid(req: &Request) -> bool {
    const CAP_FSETID_BIT: u32 = 4;
    caller_status(req)
        .and_then(|s| u64::from_str_radix(status_field(&s, "CapEff")?.trim(), 16).ok())
        .map_or(req.uid() == 0, |caps| caps & (1 << CAP_FSETID_BIT) != 0)
}

fn stat_fd(fd: RawFd) -> Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; "" with AT_EMPTY_PATH names fd.
    check(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `name` in directory `dir`, not following a symlink; `None` if gone.
fn stat_at(dir: RawFd, name: &OsStr) -> Option<libc::stat> {
    let name = cstr(name).ok()?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer, *at call on a descriptor we hold.
    let r = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    (r == 0).then_some(st)
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn file_type(mode: libc::mode_t) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn to_attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: system_time(st.st_ctime, st.st_ctime_nsec),
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                // Before 1970: whole seconds down, nanoseconds up.
                let d = e.duration();
                let mut secs = -(d.as_secs() as libc::time_t);
                let mut nsec = d.subsec_nanos() as libc::c_long;
                if nsec > 0 {
                    secs -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                libc::timespec {
                    tv_sec: secs,
                    tv_nsec: nsec,
                }
            }
        },
    }
}

impl ThrottleFs {
    /// How per-GiB limits size disks where no `user.throttle.image_format`
    /// says (the mount option; `Auto` unless given).
    pub fn with_image_format(mut self, format: ImageFormat) -> ThrottleFs {
        self.image_format = format;
        self
    }

    /// Open the source directory as the root inode.
    pub fn new(
        source: &Path,
        limits: Limits,
        groups: &[(String, Limits)],
        scheduler: SchedulerTx,
        unthrottled: DirectSender,
        passthrough: bool,
    ) -> io::Result<ThrottleFs> {
        let path = CString::new(source.as_os_str().as_bytes())?;
        // SAFETY: plain open of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = stat_fd(fd.as_raw_fd()).map_err(|e| io::Error::from_raw_os_error(e.code()))?;
        let key = (st.st_dev, st.st_ino);
        let root = InodeRef::new(
            INodeNo::ROOT.0,
            fd,
            key,
            libc::S_IFDIR,
            INodeNo::ROOT.0,
            Arc::default(),
        );
        // The root is never forgotten.
        root.lookups.store(u64::MAX / 2, Ordering::Relaxed);
        let root = Arc::new(root);
        let mut table = InodeTable {
            by_ino: HashMap::new(),
            by_key: HashMap::new(),
            synthetic: HashMap::new(),
            next_synthetic: SYNTHETIC_INO_BIT | 1,
            lingering: HashMap::new(),
            lingering_mark: LINGERING_PRUNE_MIN,
        };
        table.by_ino.insert(INodeNo::ROOT.0, root);
        table.by_key.insert(key, INodeNo::ROOT.0);
        let fs = ThrottleFs {
            group_defaults: groups.iter().cloned().collect(),
            image_format: ImageFormat::Auto,
            source: source.to_path_buf(),
            root_key: key,
            inodes: RwLock::new(table),
            files: RwLock::new(HashMap::new()),
            tree_gen: AtomicU64::new(1),
            fd_shortage: Mutex::default(),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            scheduler: Arc::new(scheduler),
            unthrottled,
            limits,
            // SAFETY: geteuid cannot fail.
            our_uid: unsafe { libc::geteuid() },
            acls_enforced: false,
            passthrough: AtomicBool::new(passthrough),
            passthrough_warned: AtomicBool::new(false),
            killpriv_v2: false,
            notifier: Arc::default(),
        };
        for group in fs.known_groups() {
            fs.push_group_limits(&group);
        }
        Ok(fs)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>> {
        self.files
            .read()
            .expect("file lock")
            .get(&fh.0)
            .map(|f| f.handle.clone())
            .ok_or(Errno::EBADF)
    }

    /// An open file's handle for a request, its limits first brought up to
    /// date if a directory changed since they were resolved.
    fn current_handle(&self, fh: FileHandle) -> Result<Arc<Handle>> {
        let (handle, node) = {
            let files = self.files.read().expect("file lock");
            let f = files.get(&fh.0).ok_or(Errno::EBADF)?;
            (f.handle.clone(), f.node.clone())
        };
        if node.is_file() {
            self.ensure_limits(&node);
        }
        Ok(handle)
    }

    /// Count a failure to get a descriptor; EMFILE/ENFILE are logged once
    /// per FD_WARNING_INTERVAL, saying what holds descriptors.
    fn note_fd_error(&self, e: Errno, what: &str) -> Errno {
        if e.code() != libc::EMFILE && e.code() != libc::ENFILE {
            return e;
        }
        let mut s = self.fd_shortage.lock().expect("fd shortage");
        s.unreported += 1;
        let now = Instant::now();
        if s.warned
            .is_some_and(|t| now.duration_since(t) < FD_WARNING_INTERVAL)
        {
            return e;
        }
        let held = self.inodes.read().expect("inode lock").by_ino.len();
        let open = self.files.read().expect("file lock").len();
        // SAFETY: getrlimit fills a valid out-structure.
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        let since = match s.warned {
            Some(_) => format!("; {} failures since the last warning", s.unreported),
            None => String::new(),
        };
        log::warn!(
            "out of file descriptors ({what}: {}{since}): {held} inodes held, {open} open \
             files, limit {}; raise the hard RLIMIT_NOFILE (docs/operations.md, Descriptors)",
            io::Error::from_raw_os_error(e.code()),
            lim.rlim_cur
        );
        s.warned = Some(now);
        s.unreported = 0;
        e
    }

    /// New objects made by another user (with allow_other) belong to them,
    /// as on a plain filesystem; the daemon itself runs as root.
    fn chown_new(&self, req: &Request, parent_fd: RawFd, name: &CString) -> Result<()> {
        if req.uid() == self.our_uid {
            return Ok(());
        }
        // In a setgid directory the object already has the directory's
        // group (and a directory the setgid bit), as for any creator.
        let gid = if stat_fd(parent_fd)?.st_mode & libc::S_ISGID != 0 {
            u32::MAX
        } else {
            req.gid()
        };
        // SAFETY: *at call on a directory descriptor we hold; -1 leaves
        // the group unchanged.
        check(unsafe {
            libc::fchownat(
                parent_fd,
                name.as_ptr(),
                req.uid(),
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    /// A write, truncate or fallocate by a caller without CAP_FSETID
    /// clears setuid, and setgid when group-executable or when the caller
    /// is not in the file's group, as a local filesystem does. The daemon
    /// does them as root, which keeps the bits, so it clears them here,
    /// before the operation runs or is queued. `fd` is a descriptor of the
    /// file (an `O_PATH` one will do); `flagged`: the kernel said the
    /// caller lacks CAP_FSETID (else it is looked up, only if there is a
    /// bit to clear). Whether it changed the mode: the kernel's cached
    /// attributes are then stale, and a caller that answers with no
    /// attributes must say so (`mode_changed`).
    /// chown(-1, -1) of the object `fd` holds, for a caller with
    /// CAP_FSETID, as we have it: the source clears setuid, and setgid when
    /// group-executable, and sets its change time.
    fn chown_no_change(fd: RawFd) -> Result<()> {
        // SAFETY: fchownat on a descriptor we hold; -1 changes no id.
        check(unsafe {
            libc::fchownat(
                fd,
                c"".as_ptr(),
                u32::MAX,
                u32::MAX,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    fn kill_suidgid(req: &Request, fd: RawFd, flagged: bool) -> Result<bool> {
        let st = stat_fd(fd)?;
        let old = st.st_mode & 0o7777;
        if old & (libc::S_ISUID | libc::S_ISGID) == 0 || !flagged && caller_has_fsetid(req) {
            return Ok(false);
        }
        let mut mode = old & !libc::S_ISUID;
        if mode & libc::S_ISGID != 0
            && (mode & libc::S_IXGRP != 0 || !caller_in_group(req, st.st_gid))
        {
            mode &= !libc::S_ISGID;
        }
        if mode == old {
            return Ok(false);
        }
        let path = proc_path(fd);
        // SAFETY: chmod of the object the descriptor holds.
        check(unsafe { libc::chmod(path.as_ptr(), mode) })?;
        Ok(true)
    }

    /// The daemon changed the mode of `ino` behind a request that answers
    /// with no attributes (a write, fallocate, copy): the kernel's copy,
    /// cached for ATTR_TTL, is invalidated, so a `stat` right after shows
    /// the mode the source has, as on a local filesystem. Only the
    /// attributes (offset -1): no page cache is dropped, and no lock the
    /// kernel holds for the request is needed.
    fn mode_changed(&self, ino: u64) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        if let Err(e) = notifier.inval_inode(INodeNo(ino), -1, 0) {
            log::debug!("inode {ino}: invalidating its attributes: {e}");
        }
    }

    /// Where `mount.rs` puts the session's notifier once the session
    /// exists (after this filesystem was handed to it).
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    fn entry(&self, reply: ReplyEntry, r: Result<FileAttr>) {
        match r {
            Ok(attr) => reply.entry(&ATTR_TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr_of(&self, ino: INodeNo) -> Result<FileAttr> {
        let node = self.inode(ino)?;
        Ok(to_attr(ino.0, &stat_fd(node.fd)?))
    }

    /// Reopen an inode's `O_PATH` descriptor as a real open file.
    fn reopen(&self, node: &InodeRef, flags: i32) -> Result<OwnedFd> {
        let path = proc_path(node.fd);
        // O_DIRECT goes to a second descriptor (see add_file): this one
        // serves unaligned requests. O_CREAT/O_EXCL/O_NOCTTY make no sense
        // on reopen. The kernel resolved the path already, so the caller's
        // O_NOFOLLOW would only refuse our `/proc/self/fd` link (ELOOP).
        // O_APPEND: see UNDERLYING_DROP_FLAGS.
        let flags = flags
            & !(libc::O_CREAT
                | libc::O_EXCL
                | libc::O_NOCTTY
                | libc::O_DIRECT
                | libc::O_NOFOLLOW
                | UNDERLYING_DROP_FLAGS)
            | libc::O_CLOEXEC;
        // SAFETY: open of a NUL-terminated path.
        let fd = check(unsafe { libc::open(path.as_ptr(), flags) })
            .map_err(|e| self.note_fd_error(e, "open"))?;
        // SAFETY: fd is fresh and ours.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Register an open file. When the caller asked for O_DIRECT, a second
    /// descriptor opened O_DIRECT serves its aligned requests, so they stay
    /// out of the host's page cache as the caller meant. `register` makes
    /// a backing id of a descriptor (the reply's `open_backing`), for
    /// `open_mode`. The handle number, and how to answer the open.
    fn add_file(
        &self,
        node: &Arc<InodeRef>,
        fd: OwnedFd,
        flags: i32,
        register: impl FnOnce(BorrowedFd<'_>) -> io::Result<BackingId>,
    ) -> (u64, OpenMode) {
        if node.is_file() {
            self.ensure_limits(node);
        }
        let direct = if flags & libc::O_DIRECT != 0 {
            self.direct_fd(node, &fd, flags)
        } else {
            None
        };
        // An O_DIRECT open in passthrough opens the underlying file
        // O_DIRECT, which must not fail where ours would not.
        let mode = self.open_mode(
            node,
            flags,
            flags & libc::O_DIRECT == 0 || direct.is_some(),
            register,
        );
        let answer = mode.clone();
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            sync_reads: fio::on_fuse(fd.as_raw_fd()),
            fd,
            direct,
            file: node.ino,
            shared: node.shared.clone(),
            unthrottled: Arc::default(),
        });
        self.files.write().expect("file lock").insert(
            fh,
            OpenFile {
                handle,
                node: node.clone(),
                mode,
            },
        );
        (fh, answer)
    }

    /// How to open a file of `node` towards the kernel, and count it.
    ///
    /// In passthrough (FOPEN_PASSTHROUGH alone) when `--passthrough` is on
    /// and usable, the file is a regular file with no limit in force and
    /// no throttle group (its limits were just resolved), it is not opened
    /// O_APPEND (the kernel would open the underlying file O_APPEND, which
    /// moves a `pwritev2(RWF_NOAPPEND)` to the end of the file; our
    /// descriptors never carry it, see UNDERLYING_DROP_FLAGS), and
    /// `direct_ok`. All handles of an inode opened with FOPEN_PASSTHROUGH
    /// share one backing id, as the kernel requires; it is registered from
    /// the inode's `O_PATH` descriptor (the kernel opens the underlying
    /// file anew for each handle, with the caller's flags) and closed with
    /// the last of them.
    ///
    /// The kernel also fails (EIO) an open without FOPEN_PASSTHROUGH of an
    /// inode that has handles open with it, and one with it (ETXTBSY) of
    /// an inode that a direct-I/O handle maps shared. So while the inode
    /// has handles with the backing id, every other open gets it too, with
    /// FOPEN_DIRECT_IO, which overrides it for reads and writes: they come
    /// to the daemon and are throttled (a mapping goes to the underlying
    /// file). And while it has handles without it, none is registered.
    fn open_mode(
        &self,
        node: &InodeRef,
        flags: i32,
        direct_ok: bool,
        register: impl FnOnce(BorrowedFd<'_>) -> io::Result<BackingId>,
    ) -> OpenMode {
        let eligible = self.passthrough.load(Ordering::Relaxed)
            && node.is_file()
            && flags & libc::O_APPEND == 0
            && direct_ok
            && node
                .shared
                .effective
                .lock()
                .expect("effective")
                .as_ref()
                .is_some_and(|e| e.limits.is_unlimited() && e.group.is_none());
        let mut modes = node.open_modes.lock().expect("open modes");
        let backing = match modes.backing.upgrade() {
            Some(backing) => Some(backing),
            None if eligible && modes.plain == 0 => {
                // SAFETY: the inode's descriptor stays open while `node` lives.
                let fd = unsafe { BorrowedFd::borrow_raw(node.fd) };
                match register(fd) {
                    Ok(backing) => {
                        let backing = Arc::new(backing);
                        modes.backing = Arc::downgrade(&backing);
                        Some(backing)
                    }
                    Err(e) => {
                        self.passthrough_refused(&e);
                        None
                    }
                }
            }
            None => None,
        };
        match backing {
            Some(backing) => {
                if eligible {
                    node.shared
                        .passthrough_handles
                        .fetch_add(1, Ordering::Relaxed);
                }
                OpenMode::Backed {
                    backing,
                    throttled: !eligible,
                }
            }
            None => {
                modes.plain += 1;
                OpenMode::Plain
            }
        }
    }

    /// The kernel refused a backing file: log it once; without the
    /// privilege (EPERM: no CAP_SYS_ADMIN) no later open will do better,
    /// so passthrough is off for the rest of the mount.
    fn passthrough_refused(&self, e: &io::Error) {
        let privilege = e.raw_os_error() == Some(libc::EPERM);
        if privilege {
            self.passthrough.store(false, Ordering::Relaxed);
        }
        if self.passthrough_warned.swap(true, Ordering::Relaxed) {
            log::debug!("passthrough refused by the kernel: {e}");
            return;
        }
        if privilege {
            log::warn!(
                "passthrough refused by the kernel ({e}): registering a backing file needs \
                 CAP_SYS_ADMIN; every file takes the normal path"
            );
        } else {
            log::warn!(
                "passthrough refused by the kernel for a file ({e}); such files take the \
                 normal path (logged once)"
            );
        }
    }

    /// The inode's O_DIRECT descriptor for these access flags, opened
    /// (from the open file `fd`) if no handle holds one. Handles hold it by
    /// `Arc`, as queued requests hold their handle, so it closes only after
    /// the last request that may use it.
    fn direct_fd(&self, node: &InodeRef, fd: &OwnedFd, flags: i32) -> Option<Arc<DirectFd>> {
        let key = flags & DIRECT_SHARE_FLAGS;
        let mut shared = node.direct_fds.lock().expect("direct fds");
        if let Some(d) = shared.get(&key).and_then(Weak::upgrade) {
            return Some(d);
        }
        shared.retain(|_, d| d.strong_count() > 0);
        let path = proc_path(fd.as_raw_fd());
        // SAFETY: open of a NUL-terminated path.
        let dfd = unsafe { libc::open(path.as_ptr(), key | libc::O_DIRECT | libc::O_CLOEXEC) };
        if dfd < 0 {
            let e = self.note_fd_error(last_errno(), "O_DIRECT open");
            log::debug!(
                "inode {}: no O_DIRECT on the underlying file ({}); using its page cache",
                node.ino,
                io::Error::from_raw_os_error(e.code())
            );
            return None;
        }
        // SAFETY: fresh descriptor.
        let d = Arc::new(DirectFd::new(unsafe { OwnedFd::from_raw_fd(dfd) })?);
        shared.insert(key, Arc::downgrade(&d));
        Some(d)
    }

    /// Files without any limit are served inline: they pay nothing for the
    /// scheduler. The scheduler decides when a file may bypass it.
    fn is_throttled(shared: &FileShared) -> bool {
        !shared.bypass.load(Ordering::SeqCst)
    }

    /// Hand a throttled file's request to the scheduler. The file's credit
    /// is taken back first and goes with it: nothing spends credit while
    /// a request of the file waits, and a barrier finds every write done
    /// on credit before it in flight.
    fn submit(&self, req: &Request, file: u64, job: Job, shared: &FileShared) {
        let leftover = shared.credit.revoke();
        let unique = req.unique().0;
        // Fails only after the scheduler stopped; the job was dropped,
        // which answers EIO.
        let _ = self.scheduler.send(Msg::Submit {
            file,
            unique,
            pid: req.pid(),
            job,
            leftover,
        });
    }

    /// The file's in-flight counts with a request of `bytes` going `dir`
    /// counted in, if it fits in the file's credit.
    fn spend_credit(shared: &FileShared, dir: Direction, bytes: u64) -> Option<Arc<Flight>> {
        let flight = shared.credit.take(dir, bytes, Instant::now())?;
        shared.record_credit();
        Some(flight)
    }

    /// Run a request that spent credit (counted in `flight`), reporting
    /// it as an I/O worker would: the scheduler hears of it only when it
    /// watches the file or bytes charged were not moved.
    fn run_credited(&self, file: u64, flight: Arc<Flight>, job: Job) {
        self.unthrottled
            .run_counted(file, flight, job, &|c| self.credited_done(c));
    }

    /// Write `data` at `offset` on this thread, from the kernel's buffer,
    /// and answer; the bytes written.
    fn write_here(handle: &Handle, offset: u64, data: &[u8], reply: ReplyWrite) -> usize {
        let r = handle.write_at(offset, data);
        let moved = fio::record_write(handle, offset, r.as_ref().copied());
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(Errno::from(e)),
        }
        moved
    }

    /// The descriptor for a read or write on a FUSE ring, into or from the
    /// ring entry's page-aligned buffer: the `O_DIRECT` one when the
    /// request meets its alignment, as `Handle::read_with` chooses.
    fn ring_fd(handle: &Handle, offset: u64, len: usize) -> RawFd {
        match handle.direct_for(offset, len) {
            Some(d) if d.mem_align_bytes <= RING_BUFFER_ALIGN_BYTES => d.fd.as_raw_fd(),
            _ => handle.raw(),
        }
    }

    /// What a read or write performed on a FUSE ring does when it
    /// completes, as `Job::run` and the I/O workers do: record the bytes,
    /// and count the request out of its handle's unthrottled flight or,
    /// when it spent credit (`credit`, the file's flight it is counted in),
    /// report it as a credited request. Owns `handle`, which keeps the
    /// descriptors open until then.
    #[allow(clippy::too_many_arguments)] // the request, its handle and its credit
    fn ring_io_done(
        &self,
        file: u64,
        dir: Direction,
        offset: u64,
        requested: u64,
        handle: Arc<Handle>,
        credit: Option<Arc<Flight>>,
    ) -> fuser::RingIoDone {
        let write = dir == Direction::Write;
        let credited = credit.map(|file_flight| (file_flight, self.scheduler.clone()));
        if credited.is_none() {
            handle.unthrottled.start(write);
        }
        Box::new(move |result: &io::Result<usize>| {
            let moved = if write {
                fio::record_write(&handle, offset, result.as_ref().copied())
            } else {
                fio::record_outcome(&handle, dir, result.as_ref().copied())
            };
            match credited {
                Some((file_flight, scheduler)) => {
                    let unmoved = fio::unmoved(dir, requested, moved);
                    file_flight.report(file, write, unmoved, &|c| {
                        let _ = scheduler.send(Msg::Done(c));
                    });
                }
                None => {
                    handle.unthrottled.finish(write);
                }
            }
        })
    }

    fn credited_done(&self, c: Completion) {
        let _ = self.scheduler.send(Msg::Done(c));
    }

    #[allow(clippy::too_many_arguments)] // mirrors the FUSE setattr fields
    fn do_setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr> {
        let node = self.inode(ino)?;
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves the clearing of
        // setuid and setgid to us, and asks for it with a SETATTR that sets
        // nothing, with the caller's credentials, in two cases: before a
        // write that does not reach us (a passthrough write) by a caller
        // without CAP_FSETID, done as for a write we see; and for a
        // chown(-1, -1), by anyone, which clears setuid even for root. So
        // from a caller with CAP_FSETID it can only be the chown.
        let nothing = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        if self.killpriv_v2 && nothing && node.is_file() {
            if caller_has_fsetid(req) {
                Self::chown_no_change(node.fd)?;
            } else {
                // For a caller without CAP_FSETID, a chown(-1, -1) clears
                // what such a write clears.
                Self::kill_suidgid(req, node.fd, false)?;
            }
        }
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        let path = proc_path(node.fd);
        if let Some(mode) = mode {
            // SAFETY: syscalls on descriptors / NUL-terminated paths.
            check(unsafe {
                match &handle {
                    Some(h) => libc::fchmod(h.raw(), mode),
                    None => libc::chmod(path.as_ptr(), mode),
                }
            })?;
        }
        if uid.is_some() || gid.is_some() {
            // SAFETY: as above; -1 leaves an id unchanged.
            check(unsafe {
                libc::fchownat(
                    node.fd,
                    c"".as_ptr(),
                    uid.unwrap_or(u32::MAX),
                    gid.unwrap_or(u32::MAX),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = size {
            let size = libc::off_t::try_from(size).map_err(|_| Errno::EFBIG)?;
            // The kernel already sent the mode a truncate leaves (with
            // FUSE_HANDLE_KILLPRIV_V2, none: it is left to us), except for
            // setgid without group-execute, which a local filesystem also
            // clears when the caller is not in the file's group.
            match &handle {
                Some(h) => {
                    Self::kill_suidgid(req, h.raw(), false)?;
                    // SAFETY: ftruncate on an open descriptor.
                    check(unsafe { libc::ftruncate(h.raw(), size) })?
                }
                None => {
                    let fd = self.reopen(&node, libc::O_WRONLY)?;
                    Self::kill_suidgid(req, fd.as_raw_fd(), false)?;
                    // SAFETY: as above.
                    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?
                }
            };
            // A resized raw disk may have a new per-GiB limit.
            if node.shared.size_watch.is_active() {
                sizing::reevaluate(node.ino, &node.shared, node.fd);
            }
        }
        if atime.is_some() || mtime.is_some() {
            let times = [timespec(atime), timespec(mtime)];
            // SAFETY: `times` holds two valid timespecs.
            check(unsafe {
                match &handle {
                    Some(h) => libc::futimens(h.raw(), times.as_ptr()),
                    None => libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0),
                }
            })?;
        }
        Ok(to_attr(ino.0, &stat_fd(node.fd)?))
    }

    fn make_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        umask: u32,
        make: impl FnOnce(RawFd, &CString) -> libc::c_int,
    ) -> Result<FileAttr> {
        let p = self.inode(parent)?;
        let cname = component(name)?;
        with_umask(umask, || make(p.fd, &cname))?;
        self.chown_new(req, p.fd, &cname)?;
        self.do_lookup(parent, name)
    }

    /// `name` in `dir` was just renamed there: it now inherits from `dir`.
    fn moved(&self, dir: &InodeRef, name: &CString) {
        // SAFETY: zeroed plain-data out-structure.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointer, *at call on a descriptor we hold.
        let r = unsafe { libc::fstatat(dir.fd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if r != 0 {
            return;
        }
        let node = {
            let table = self.inodes.read().expect("inode lock");
            table
                .by_key
                .get(&(st.st_dev, st.st_ino))
                .and_then(|ino| table.by_ino.get(ino))
                .cloned()
        };
        let Some(node) = node else {
            return;
        };
        node.parent.store(dir.ino, Ordering::Relaxed);
        if node.is_dir() {
            self.directory_changed();
        } else if node.is_file() && node.resolved_gen.load(Ordering::SeqCst) != 0 {
            self.refresh(&node);
        }
    }

    /// Where a directory is, relative to the mount root ("/" for the root).
    fn display_path(&self, fd: RawFd) -> String {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
        match link.strip_prefix(&self.source) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => link.display().to_string(),
        }
    }

    /// `user.throttle.active` on the root: every file with an open handle,
    /// a request waiting or I/O in the last second, from what the daemon
    /// holds (no walk of the source, no syscall per file but the path of
    /// those listed).
    fn active_files(&self, node: &InodeRef) -> Option<Vec<u8>> {
        if node.ino != INodeNo::ROOT.0 {
            return None;
        }
        self.resolve_stale();
        let mut open: HashMap<u64, u64> = HashMap::new();
        for f in self.files.read().expect("file lock").values() {
            *open.entry(f.node.ino).or_default() += 1;
        }
        // Held until the text is made, so each descriptor stays open.
        let mut held = HashMap::new();
        let mut files = Vec::new();
        for n in self.file_inodes() {
            let handles = open.get(&n.ino).copied().unwrap_or(0);
            let activity = n.shared.activity();
            if handles == 0 && !activity.is_busy() {
                continue;
            }
            files.push(xattr::ActiveFile {
                ino: n.ino,
                open: handles,
                passthrough: n.shared.passthrough_handles(),
                activity,
                effective: n.shared.effective.lock().expect("effective").clone(),
            });
            held.insert(n.ino, n);
        }
        let path_of = |ino: u64| self.display_path(held[&ino].fd);
        let groups = self.known_groups();
        Some(xattr::render_active(files, path_of, &groups, XATTR_VALUE_MAX_BYTES).into_bytes())
    }

    fn xattr_reply(reply: ReplyXattr, size: u32, r: io::Result<Vec<u8>>) {
        match r {
            Ok(data) if size == 0 => reply.size(data.len() as u32),
            Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(Errno::from(e)),
        }
    }
}

/// `system.posix_acl_access` and `system.posix_acl_default`.
const POSIX_ACL_PREFIX: &[u8] = b"system.posix_acl_";

thread_local! {
    /// This thread has its own umask (unshare(CLONE_FS) done).
    static OWN_UMASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `make` (a creating syscall) under the caller's umask, on this
/// thread only, so the source filesystem applies it exactly as for a
/// local creator: ignored when the parent has a default ACL.
fn with_umask(umask: u32, make: impl FnOnce() -> libc::c_int) -> Result<libc::c_int> {
    if !OWN_UMASK.get() {
        // SAFETY: gives this thread a private copy of cwd, root and umask.
        check(unsafe { libc::unshare(libc::CLONE_FS) })?;
        OWN_UMASK.set(true);
    }
    // SAFETY: umask cannot fail; it is this thread's own.
    let old = unsafe { libc::umask(umask & 0o777) };
    let r = make();
    // Keep errno of `make` across the restore.
    let e = io::Error::last_os_error();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    if r < 0 { Err(Errno::from(e)) } else { Ok(r) }
}

/// setxattr on the object a descriptor holds.
fn set_raw(fd: RawFd, name: &CString, value: &[u8], flags: i32) -> Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid path, name and value buffer.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(|_| ())
}

/// removexattr on the object a descriptor holds.
fn remove_raw(fd: RawFd, name: &CString) -> Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid path and name.
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(|_| ())
}

/// The value of attribute `name` of the object at `path`.
fn get_raw(path: &CString, name: &CString) -> io::Result<Vec<u8>> {
    xattr_fetch(|buf, len| {
        // SAFETY: buf is null with len 0, or valid for len bytes.
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf, len) }
    })
}

/// The attribute names of an object, NUL-separated.
fn list_names(path: &CString) -> io::Result<Vec<u8>> {
    xattr_fetch(|buf, len| {
        // SAFETY: buf is null with len 0, or valid for len bytes.
        unsafe { libc::listxattr(path.as_ptr(), buf.cast(), len) }
    })
}

/// Call a size-probing xattr syscall until the buffer is large enough.
fn xattr_fetch(
    mut call: impl FnMut(*mut libc::c_void, usize) -> libc::ssize_t,
) -> io::Result<Vec<u8>> {
    loop {
        let need = call(std::ptr::null_mut(), 0);
        if need < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; need as usize];
        let got = call(buf.as_mut_ptr().cast(), buf.len());
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

impl ThrottleFs {
    /// `--passthrough` at INIT: ask for FUSE_PASSTHROUGH, and for
    /// FUSE_HANDLE_KILLPRIV_V2. Without the latter the kernel asks the
    /// daemon for `security.capability` (getxattr) before every passthrough
    /// write, to know whether the write must drop privileges, and waits
    /// for the answer with the inode locked: random writes at depth went
    /// at a fifth of the plain file's speed. With it, the kernel marks an
    /// inode that has nothing to drop (S_NOSEC) and asks nothing until its
    /// attributes next change; the daemon clears setuid/setgid itself, on
    /// the WRITE, SETATTR and FALLOCATE it sees, and on the empty SETATTR
    /// the kernel sends before a passthrough write to a setuid/setgid file
    /// (`do_setattr`). Whether passthrough is possible.
    fn negotiate_passthrough(&mut self, config: &mut KernelConfig) -> bool {
        if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
        {
            log::warn!(
                "passthrough: the kernel does not offer FUSE passthrough (Linux 6.9 or later \
                 with CONFIG_FUSE_PASSTHROUGH); every file takes the normal path"
            );
            return false;
        }
        let _ = config.set_max_stack_depth(PASSTHROUGH_STACK_DEPTH);
        self.killpriv_v2 = config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_ok();
        if !self.killpriv_v2 {
            log::info!(
                "passthrough: the kernel has no FUSE_HANDLE_KILLPRIV_V2; it asks the daemon for \
                 security.capability before each passthrough write"
            );
        }
        log::info!("passthrough: files without limits are opened in passthrough");
        true
    }
}

impl Filesystem for ThrottleFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Ask for requests up to 1 MiB (the kernel caps it at max_pages).
        if let Err(nearest) = config.set_max_write(MAX_REQUEST_BYTES) {
            let _ = config.set_max_write(nearest);
        }
        // mmap of a direct-I/O file goes through our read/write too.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // The kernel checks POSIX ACLs (from system.posix_acl_access) as
        // the source would. It then leaves the umask to us (DONT_MASK):
        // the source applies it only when the parent has no default ACL.
        self.acls_enforced = config
            .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
            .is_ok();
        if !self.acls_enforced {
            log::warn!("the kernel has no FUSE_POSIX_ACL: setting POSIX ACLs is refused");
        }
        // A caller's asynchronous direct I/O reaches us as concurrent
        // requests instead of one at a time (libfuse asks for this too).
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            log::warn!(
                "the kernel has no FUSE_ASYNC_DIO: asynchronous I/O is served one request at a time"
            );
        }
        let _ = config.set_max_background(MAX_BACKGROUND_REQUESTS);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND_REQUESTS / 4 * 3);
        if self.passthrough.load(Ordering::Relaxed) {
            let on = self.negotiate_passthrough(config);
            self.passthrough.store(on, Ordering::Relaxed);
        }
        Ok(())
    }

    fn interrupt(&self, _req: &Request, unique: fuser::RequestId) {
        let _ = self.scheduler.send(Msg::Interrupt(unique.0));
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, self.do_lookup(parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_one(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino) {
            Ok(attr) => reply.attr(&ATTR_TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(req, ino, mode, uid, gid, size, atime, mtime, fh) {
            Ok(attr) => reply.attr(&ATTR_TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = (|| {
            let node = self.inode(ino)?;
            let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
            // SAFETY: buffer valid for its length; "" names the fd itself.
            let n = unsafe {
                libc::readlinkat(node.fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if n < 0 {
                return Err(last_errno());
            }
            buf.truncate(n as usize);
            Ok(buf)
        })();
        match r {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_entry(req, parent, name, umask, |dir, n| {
            // SAFETY: *at call on a directory descriptor we hold.
            unsafe { libc::mknodat(dir, n.as_ptr(), mode, libc::dev_t::from(rdev)) }
        });
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_entry(req, parent, name, umask, |dir, n| {
            // SAFETY: as above.
            unsafe { libc::mkdirat(dir, n.as_ptr(), mode) }
        });
        self.entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let p = self.inode(parent)?;
            let n = component(name)?;
            // SAFETY: as above.
            check(unsafe { libc::unlinkat(p.fd, n.as_ptr(), 0) })
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let p = self.inode(parent)?;
            let n = component(name)?;
            // SAFETY: as above.
            check(unsafe { libc::unlinkat(p.fd, n.as_ptr(), libc::AT_REMOVEDIR) })
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let target = cstr(target.as_os_str())?;
            self.make_entry(req, parent, link_name, 0, |dir, n| {
                // SAFETY: as above. The target is stored, never followed by us.
                unsafe { libc::symlinkat(target.as_ptr(), dir, n.as_ptr()) }
            })
        })();
        self.entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let p = self.inode(parent)?;
            let np = self.inode(newparent)?;
            let n = component(name)?;
            let nn = component(newname)?;
            // SAFETY: *at call on directory descriptors we hold.
            check(unsafe { libc::renameat2(p.fd, n.as_ptr(), np.fd, nn.as_ptr(), flags.bits()) })?;
            // Inherited limits follow the new place; own limits and the
            // bucket state stay with the inode.
            self.moved(&np, &nn);
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                self.moved(&p, &n);
            }
            Ok(0)
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let node = self.inode(ino)?;
            let np = self.inode(newparent)?;
            let nn = component(newname)?;
            let path = proc_path(node.fd);
            // SAFETY: links the object the descriptor holds (the proc link
            // is followed to it), never a path string of the source.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    np.fd,
                    nn.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })?;
            self.do_lookup(newparent, newname)
        })();
        self.entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let node = self.inode(ino)?;
            let fd = self.reopen(&node, flags.0)?;
            Ok(self.add_file(&node, fd, flags.0, |fd| reply.open_backing(fd)))
        })();
        match r {
            Ok((fh, mode)) => match mode.backing() {
                Some(backing) => {
                    reply.opened_passthrough(FileHandle(fh), mode.fopen_flags(), backing)
                }
                None => reply.opened(FileHandle(fh), mode.fopen_flags()),
            },
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let handle = match self.current_handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let throttled = Self::is_throttled(&handle.shared);
        let credit = throttled
            .then(|| Self::spend_credit(&handle.shared, Direction::Read, u64::from(size)))
            .flatten();
        if (!throttled || credit.is_some())
            && !handle.sync_reads
            && reply.can_read_on_ring(size as usize)
        {
            let fd = Self::ring_fd(&handle, offset, size as usize);
            let done = self.ring_io_done(
                ino.0,
                Direction::Read,
                offset,
                u64::from(size),
                handle,
                credit,
            );
            reply.read_on_ring(fd, offset, size as usize, done);
            return;
        }
        // For the scheduler, which needs the file's credit back.
        let to_queue = (throttled && credit.is_none()).then(|| handle.shared.clone());
        let flight = handle.unthrottled.clone();
        let job = Job::Read {
            handle,
            offset,
            size,
            reply,
        };
        if let Some(file_flight) = credit {
            // Charged ahead by the scheduler: performed at once, here or,
            // at queue depth, on a ring worker.
            self.run_credited(ino.0, file_flight, job);
        } else if let Some(shared) = to_queue {
            self.submit(req, ino.0, job, &shared);
        } else {
            // Here, or at queue depth on a ring worker.
            self.unthrottled.run(ino.0, &flight, job);
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let handle = match self.current_handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            match Self::kill_suidgid(req, handle.raw(), true) {
                Ok(true) => self.mode_changed(ino.0),
                Ok(false) => {}
                Err(e) => return reply.error(e),
            }
        }
        let throttled = Self::is_throttled(&handle.shared);
        let credit = throttled
            .then(|| Self::spend_credit(&handle.shared, Direction::Write, data.len() as u64))
            .flatten();
        if (!throttled || credit.is_some()) && reply.can_write_on_ring(data) {
            let fd = Self::ring_fd(&handle, offset, data.len());
            let len = data.len();
            let done =
                self.ring_io_done(ino.0, Direction::Write, offset, len as u64, handle, credit);
            reply.write_on_ring(fd, offset, len, done);
            return;
        }
        if let Some(file_flight) = credit {
            // Charged ahead by the scheduler: performed at once. At queue
            // depth on a ring worker, which needs its own copy of the data.
            if self.unthrottled.to_ring_counted(&file_flight) {
                let job = Job::Write {
                    data: handle.write_data(offset, data),
                    handle,
                    offset,
                    reply,
                };
                self.run_credited(ino.0, file_flight, job);
                return;
            }
            // Here, without copying the data.
            let moved = Self::write_here(&handle, offset, data, reply);
            let unmoved = fio::unmoved(Direction::Write, data.len() as u64, moved);
            file_flight.report(ino.0, true, unmoved, &|c| self.credited_done(c));
            return;
        }
        if throttled || self.unthrottled.to_ring(&handle.unthrottled) {
            // The data must outlive this call, to wait in the queue or to
            // go to a ring worker at queue depth.
            let flight = handle.unthrottled.clone();
            let shared = handle.shared.clone();
            let job = Job::Write {
                data: handle.write_data(offset, data),
                handle,
                offset,
                reply,
            };
            if throttled {
                self.submit(req, ino.0, job, &shared);
            } else {
                self.unthrottled.run(ino.0, &flight, job);
            }
        } else {
            let flight = handle.unthrottled.clone();
            flight.start(true);
            Self::write_here(&handle, offset, data, reply);
            flight.finish(true);
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.current_handle(fh) {
            Ok(h) if Self::is_throttled(&h.shared) => {
                // A barrier: answered after every write queued before it.
                self.submit(req, ino.0, Job::Flush { reply }, &h.shared);
            }
            _ => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The descriptors close when the last queued request holding the
        // handle is done (the O_DIRECT one when the inode's last handle
        // that shares it is), outside the lock.
        let gone = self.files.write().expect("file lock").remove(&fh.0);
        drop(gone);
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let handle = match self.current_handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let shared = handle.shared.clone();
        let job = Job::Fsync {
            handle,
            datasync,
            reply,
        };
        if Self::is_throttled(&shared) {
            self.submit(req, ino.0, job, &shared);
        } else {
            let _ = job.run();
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let node = self.inode(ino)?;
            let fd = self.reopen(&node, libc::O_RDONLY | libc::O_DIRECTORY)?;
            let raw = {
                use std::os::fd::IntoRawFd;
                fd.into_raw_fd()
            };
            // SAFETY: fdopendir takes ownership of `raw` on success.
            let dir = unsafe { libc::fdopendir(raw) };
            if dir.is_null() {
                let e = last_errno();
                // SAFETY: on failure the descriptor is still ours to close.
                unsafe { libc::close(raw) };
                return Err(e);
            }
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            self.dirs.write().expect("dir lock").insert(
                fh,
                Arc::new(Mutex::new(DirStream {
                    dir,
                    position: 0,
                    dev: node.key.0,
                })),
            );
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(stream) = self.dirs.read().expect("dir lock").get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut s = stream.lock().expect("dir stream");
        // SAFETY: `dir` is a live stream.
        let dir_fd = unsafe { libc::dirfd(s.dir) };
        if offset != s.position {
            // SAFETY: `dir` is a live stream; offsets are telldir values.
            unsafe {
                if offset == 0 {
                    libc::rewinddir(s.dir);
                } else {
                    libc::seekdir(s.dir, offset as libc::c_long);
                }
            }
            s.position = offset;
        }
        loop {
            // SAFETY: errno reset to tell end of stream from an error.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `dir` is a live stream used by this thread only.
            let ent = unsafe { libc::readdir64(s.dir) };
            if ent.is_null() {
                let err = io::Error::last_os_error();
                if err.raw_os_error().unwrap_or(0) != 0 {
                    return reply.error(Errno::from(err));
                }
                break;
            }
            // SAFETY: a non-null entry is valid until the next readdir.
            let (ino, d_type, kind, name, next) = unsafe {
                let e = &*ent;
                let name = std::ffi::CStr::from_ptr(e.d_name.as_ptr());
                let kind = match e.d_type {
                    libc::DT_DIR => FileType::Directory,
                    libc::DT_LNK => FileType::Symlink,
                    libc::DT_CHR => FileType::CharDevice,
                    libc::DT_BLK => FileType::BlockDevice,
                    libc::DT_FIFO => FileType::NamedPipe,
                    libc::DT_SOCK => FileType::Socket,
                    _ => FileType::RegularFile,
                };
                (
                    e.d_ino,
                    e.d_type,
                    kind,
                    OsStr::from_bytes(name.to_bytes()).to_owned(),
                    libc::telldir(s.dir) as u64,
                )
            };
            // The number lookup gives: from the entry's (dev, ino), which
            // for a directory (maybe a mount point, whose d_ino is that of
            // the directory under it) is asked of the object itself.
            let key = match d_type {
                libc::DT_DIR | libc::DT_UNKNOWN => {
                    stat_at(dir_fd, &name).map(|st| (st.st_dev, st.st_ino))
                }
                _ => None,
            }
            .unwrap_or((s.dev, ino));
            let ino = match self.number_of(key) {
                Ok(n) => n,
                Err(e) => return reply.error(e),
            };
            if reply.add(INodeNo(ino), next, kind, &name) {
                // Full: the next call resumes at this entry.
                // SAFETY: seek back to before the entry that did not fit.
                unsafe { libc::seekdir(s.dir, s.position as libc::c_long) };
                break;
            }
            s.position = next;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.write().expect("dir lock").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let node = self.inode(ino)?;
            let fd = self.reopen(&node, libc::O_RDONLY | libc::O_DIRECTORY)?;
            fio::fsync(fd.as_raw_fd(), datasync).map_err(Errno::from)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let r = (|| {
            let node = self.inode(ino)?;
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: valid out-pointer; fstatvfs works on O_PATH descriptors.
            check(unsafe { libc::fstatvfs(node.fd, &mut st) })?;
            Ok(st)
        })();
        match r {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = &*xattr::canonical_name(name); // libvirt/QEMU limit names
        let r = (|| {
            let node = self.inode(ino)?;
            let cname = cstr(name)?;
            match xattr::classify(name.as_bytes()) {
                Some(Attr::Limit(limit)) => {
                    return self.set_limit(&node, &cname, &limit, value, flags);
                }
                Some(Attr::Group) => return self.set_group(&node, &cname, value, flags),
                Some(Attr::ImageFormat) => {
                    return self.set_image_format(&node, &cname, value, flags);
                }
                Some(Attr::Qos(setting)) => {
                    return self.set_qos(&node, &cname, &setting, value, flags);
                }
                Some(Attr::GroupLimit { group, limit }) => {
                    return self.set_group_limit(&node, &cname, &group, &limit, value, flags);
                }
                // Read-only, documented.
                Some(Attr::Effective | Attr::Stats | Attr::Active | Attr::GroupStats(_)) => {
                    return Err(Errno::EPERM);
                }
                Some(Attr::Unknown) => {
                    log::warn!("setxattr {name:?}: not a throttle limit");
                    return Err(Errno::EINVAL);
                }
                None => {}
            }
            // Stored but not enforced would be a silent hole.
            if !self.acls_enforced && name.as_bytes().starts_with(POSIX_ACL_PREFIX) {
                return Err(Errno::EOPNOTSUPP);
            }
            set_raw(node.fd, &cname, value, flags)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        #[cfg(feature = "sandbox-probe")]
        if let Some(errno) = crate::sandbox::probe::run(name.as_bytes()) {
            return Self::xattr_reply(reply, size, Ok(errno.to_string().into_bytes()));
        }
        let name = &*xattr::canonical_name(name); // libvirt/QEMU limit names
        let node = match self.inode(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let Ok(cname) = cstr(name) else {
            return reply.error(Errno::EINVAL);
        };
        let attr = xattr::classify(name.as_bytes());
        if let Some(Attr::GroupStats(group)) = &attr {
            return match self.group_stats(&node, group) {
                Some(data) => Self::xattr_reply(reply, size, Ok(data)),
                None => reply.error(Errno::NO_XATTR),
            };
        }
        if let Some(Attr::Active) = &attr {
            return match self.active_files(&node) {
                Some(data) => Self::xattr_reply(reply, size, Ok(data)),
                None => reply.error(Errno::NO_XATTR),
            };
        }
        if let Some(attr @ (Attr::Effective | Attr::Stats)) = &attr {
            return match self.generated_attr(&node, attr) {
                Some(data) => Self::xattr_reply(reply, size, Ok(data)),
                None => reply.error(Errno::NO_XATTR),
            };
        }
        let path = proc_path(node.fd);
        let mut r = get_raw(&path, &cname);
        // Limits read back in canonical form (plain integers, seconds),
        // whatever was written on the source.
        let limit = match &attr {
            Some(Attr::Limit(limit) | Attr::GroupLimit { limit, .. }) => Some(limit),
            _ => None,
        };
        if let (Some(limit), Ok(raw)) = (limit, &r)
            && let Ok(canon) = xattr::canonical(limit, raw)
        {
            r = Ok(canon.into_bytes());
        }
        Self::xattr_reply(reply, size, r);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.inode(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        // The generated attributes are readable by name but not listed,
        // like other filesystems' virtual attributes: copy tools (cp -a,
        // rsync -X) write back whatever is listed, and these are read-only.
        let r = list_names(&proc_path(node.fd)).map(|names| {
            let mut listed = Vec::with_capacity(names.len());
            for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
                if xattr::is_listed(name) {
                    listed.extend_from_slice(name);
                    listed.push(0);
                }
            }
            listed
        });
        Self::xattr_reply(reply, size, r);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = &*xattr::canonical_name(name); // libvirt/QEMU limit names
        let r = (|| {
            let node = self.inode(ino)?;
            let cname = cstr(name)?;
            match xattr::classify(name.as_bytes()) {
                Some(Attr::Limit(limit)) => return self.remove_limit(&node, &cname, &limit),
                Some(Attr::GroupLimit { group, limit }) => {
                    return self.remove_group_limit(&node, &cname, &group, &limit);
                }
                Some(Attr::Effective | Attr::Stats | Attr::Active | Attr::GroupStats(_)) => {
                    return Err(Errno::EPERM);
                }
                Some(Attr::Group | Attr::Qos(_) | Attr::ImageFormat) => {
                    remove_raw(node.fd, &cname)?;
                    self.after_change(&node);
                    return Ok(());
                }
                // Unknown names under our prefix may be removed (cleaning up
                // what was written on the source directly).
                Some(Attr::Unknown) | None => {}
            }
            remove_raw(node.fd, &cname)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = (|| {
            let node = self.inode(ino)?;
            let path = proc_path(node.fd);
            // SAFETY: valid path.
            check(unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mask.bits(), 0) })
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            let p = self.inode(parent)?;
            let cname = component(name)?;
            let oflags = (flags & !(libc::O_NOCTTY | libc::O_DIRECT | UNDERLYING_DROP_FLAGS))
                | libc::O_CREAT
                | libc::O_NOFOLLOW
                | libc::O_CLOEXEC;
            // SAFETY: *at call on a directory descriptor we hold.
            let fd = with_umask(umask, || unsafe {
                libc::openat(p.fd, cname.as_ptr(), oflags, mode)
            })
            .map_err(|e| self.note_fd_error(e, "create"))?;
            // SAFETY: fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            self.chown_new(req, p.fd, &cname)?;
            let attr = self.do_lookup(parent, name)?;
            let node = self.inode(attr.ino)?;
            let (fh, mode) = self.add_file(&node, fd, flags, |fd| reply.open_backing(fd));
            Ok((attr, fh, mode))
        })();
        match r {
            Ok((attr, fh, mode)) => match mode.backing() {
                Some(backing) => reply.created_passthrough(
                    &ATTR_TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    mode.fopen_flags(),
                    backing,
                ),
                None => reply.created(
                    &ATTR_TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    mode.fopen_flags(),
                ),
            },
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Moves no data, so it is not charged; see docs/limits.md.
        let r = (|| {
            let h = self.handle(fh)?;
            let off = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let len = libc::off_t::try_from(length).map_err(|_| Errno::EINVAL)?;
            // As for a truncate (see do_setattr).
            if Self::kill_suidgid(req, h.raw(), false)? {
                self.mode_changed(h.file);
            }
            // SAFETY: fallocate on an open descriptor.
            check(unsafe { libc::fallocate(h.raw(), mode, off, len) })?;
            // One that grows a raw disk may give it a new per-GiB limit.
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                sizing::after_write(h.file, &h.shared, h.raw(), offset, length);
            }
            Ok(0)
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = (|| {
            let h = self.handle(fh)?;
            // SAFETY: lseek on an open descriptor (SEEK_DATA/SEEK_HOLE too).
            let pos = unsafe { libc::lseek(h.raw(), offset, whence) };
            if pos < 0 { Err(last_errno()) } else { Ok(pos) }
        })();
        match r {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(e),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctl is passed down (FICLONE would copy around the throttle);
        // ENOTTY is what callers expect for "not supported here".
        reply.error(Errno::ENOTTY);
    }

    fn poll(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // A regular file is always ready, as on the source. ENOSYS tells
        // the kernel so for good: it stops asking and answers "ready"
        // itself. Answered quietly (fuser's default logs a warning, which
        // a user reading syslog takes for an error).
        log::debug!("poll of inode {}: not offered (ENOSYS)", ino.0);
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = (|| Ok((self.current_handle(fh_in)?, self.current_handle(fh_out)?)))();
        let (src, dst) = match r {
            Ok(pair) => pair,
            Err(e) => return reply.error(e),
        };
        // As for a truncate (see do_setattr).
        match Self::kill_suidgid(req, dst.raw(), false) {
            Ok(true) => self.mode_changed(dst.file),
            Ok(false) => {}
            Err(e) => return reply.error(e),
        }
        // At most one request's worth per call (callers loop on short
        // copies), so a copy is metered like a read and a write of that size.
        let len = len.min(u64::from(MAX_REQUEST_BYTES)) as u32;
        if Self::is_throttled(&src.shared) || Self::is_throttled(&dst.shared) {
            let shared = src.shared.clone();
            let job = Job::Copy {
                src,
                offset_in,
                dst,
                offset_out,
                len,
                at_source: true,
                reply,
            };
            self.submit(req, ino_in.0, job, &shared);
        } else {
            match fio::copy_range(src.raw(), offset_in, dst.raw(), offset_out, len as usize) {
                Ok(n) => {
                    src.shared.record_io(Direction::Read, n as u64);
                    dst.shared.record_io(Direction::Write, n as u64);
                    reply.written(n as u32)
                }
                Err(e) => {
                    fio::record_error(&dst, fio::IoOp::Copy, &e);
                    reply.error(Errno::from(e));
                }
            }
        }
    }
}
