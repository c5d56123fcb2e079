//! The passthrough filesystem. Every object of the source tree is reached
//! through an `O_PATH` descriptor keyed by its (dev, ino), and every
//! operation is done with `*at` calls on descriptors (or their
//! `/proc/self/fd` links), never by re-joining path strings, so a rename
//! or a swapped-in symlink cannot redirect the daemon outside the source.
//!
//! Reads and writes of files with limits go to the scheduler with their
//! reply; files without limits are served inline on the FUSE thread.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::io::{self as fio, Handle, Job};
use crate::scheduler::Msg;
use crate::throttle::Limits;

/// Attributes and entries may be cached by the kernel this long: the source
/// is ours while mounted, so only changes made behind the mount's back are
/// seen late, by at most this much.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// The largest request we let the kernel send (it caps this at its own
/// max_pages limit, 1 MiB by default): a guest's 1 MiB request must reach
/// us whole, to count as one operation.
const MAX_REQUEST_BYTES: u32 = 1024 * 1024;

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

struct InodeTable {
    by_ino: HashMap<u64, Arc<InodeRef>>,
    by_key: HashMap<(u64, u64), u64>,
    next_ino: u64,
}

/// One object of the source tree, held by an `O_PATH` descriptor.
struct InodeRef {
    /// Keeps `fd` open for as long as the inode lives.
    _owned: OwnedFd,
    fd: RawFd,
    /// Underlying (dev, ino): the identity of the object.
    key: (u64, u64),
    /// Kernel lookups not yet forgotten; changed under the table's lock.
    lookups: AtomicU64,
}

struct DirStream {
    dir: *mut libc::DIR,
    /// Where the next readdir continues (a telldir value), to notice seeks.
    position: u64,
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

pub struct ThrottleFs {
    inodes: RwLock<InodeTable>,
    files: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_fh: AtomicU64,
    scheduler: Sender<Msg>,
    /// Limits in force for every file (mount options).
    limits: Limits,
    our_uid: u32,
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
    /// Open the source directory as the root inode.
    pub fn new(source: &Path, limits: Limits, scheduler: Sender<Msg>) -> io::Result<ThrottleFs> {
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
        let root = Arc::new(InodeRef {
            fd: fd.as_raw_fd(),
            _owned: fd,
            key,
            // The root is never forgotten.
            lookups: AtomicU64::new(u64::MAX / 2),
        });
        let mut table = InodeTable {
            by_ino: HashMap::new(),
            by_key: HashMap::new(),
            next_ino: INodeNo::ROOT.0 + 1,
        };
        table.by_ino.insert(INodeNo::ROOT.0, root);
        table.by_key.insert(key, INodeNo::ROOT.0);
        Ok(ThrottleFs {
            inodes: RwLock::new(table),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            scheduler,
            limits,
            // SAFETY: geteuid cannot fail.
            our_uid: unsafe { libc::geteuid() },
        })
    }

    fn inode(&self, ino: INodeNo) -> Result<Arc<InodeRef>> {
        self.inodes
            .read()
            .expect("inode lock")
            .by_ino
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ESTALE)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>> {
        self.files
            .read()
            .expect("file lock")
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    /// Find `name` in `parent` and count a kernel lookup of it.
    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr> {
        let parent = self.inode(parent)?;
        let name = component(name)?;
        // SAFETY: open relative to a directory descriptor we hold.
        let fd = check(unsafe {
            libc::openat(
                parent.fd,
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = stat_fd(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut table = self.inodes.write().expect("inode lock");
        if let Some(&ino) = table.by_key.get(&key) {
            let existing = table.by_ino.get(&ino).expect("tables agree");
            existing.lookups.fetch_add(1, Ordering::Relaxed);
            return Ok(to_attr(ino, &st));
        }
        let ino = table.next_ino;
        table.next_ino += 1;
        let node = Arc::new(InodeRef {
            fd: fd.as_raw_fd(),
            _owned: fd,
            key,
            lookups: AtomicU64::new(1),
        });
        table.by_ino.insert(ino, node);
        table.by_key.insert(key, ino);
        Ok(to_attr(ino, &st))
    }

    fn forget_one(&self, ino: u64, nlookup: u64) {
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
            drop(table);
            let _ = self.scheduler.send(Msg::Forget(ino));
        }
    }

    /// New objects made by another user (with allow_other) belong to them,
    /// as on a plain filesystem; the daemon itself runs as root.
    fn chown_new(&self, req: &Request, parent_fd: RawFd, name: &CString) -> Result<()> {
        if req.uid() == self.our_uid {
            return Ok(());
        }
        // SAFETY: *at call on a directory descriptor we hold.
        check(unsafe {
            libc::fchownat(
                parent_fd,
                name.as_ptr(),
                req.uid(),
                req.gid(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
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
        // on reopen.
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_DIRECT)
            | libc::O_CLOEXEC;
        // SAFETY: open of a NUL-terminated path.
        let fd = check(unsafe { libc::open(path.as_ptr(), flags) })?;
        // SAFETY: fd is fresh and ours.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Register an open file. When the caller asked for O_DIRECT, a second
    /// descriptor opened O_DIRECT serves its aligned requests, so they stay
    /// out of the host's page cache as the caller meant.
    fn add_file(&self, ino: u64, fd: OwnedFd, flags: i32) -> u64 {
        let direct = if flags & libc::O_DIRECT != 0 {
            let path = proc_path(fd.as_raw_fd());
            let dflags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY))
                | libc::O_DIRECT
                | libc::O_CLOEXEC;
            // SAFETY: open of a NUL-terminated path.
            let dfd = unsafe { libc::open(path.as_ptr(), dflags) };
            if dfd < 0 {
                log::debug!(
                    "inode {ino}: no O_DIRECT on the underlying file ({}); using its page cache",
                    io::Error::last_os_error()
                );
                None
            } else {
                // SAFETY: fresh descriptor.
                fio::DirectFd::new(unsafe { OwnedFd::from_raw_fd(dfd) })
            }
        } else {
            None
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.write().expect("file lock").insert(
            fh,
            Arc::new(Handle {
                fd,
                direct,
                file: ino,
            }),
        );
        fh
    }

    /// Files without any limit are served inline: they pay nothing for the
    /// scheduler.
    fn is_throttled(&self, _ino: u64) -> bool {
        !self.limits.is_unlimited()
    }

    fn submit(&self, req: &Request, file: u64, job: Job) {
        let unique = req.unique().0;
        if let Err(e) = self.scheduler.send(Msg::Submit { file, unique, job }) {
            // Only after the scheduler stopped: dropping answers EIO.
            drop(e);
        }
    }

    #[allow(clippy::too_many_arguments)] // mirrors the FUSE setattr fields
    fn do_setattr(
        &self,
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
            match &handle {
                // SAFETY: ftruncate on an open descriptor.
                Some(h) => check(unsafe { libc::ftruncate(h.raw(), size) })?,
                None => {
                    let fd = self.reopen(&node, libc::O_WRONLY)?;
                    // SAFETY: as above.
                    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?
                }
            };
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
        make: impl FnOnce(RawFd, &CString) -> libc::c_int,
    ) -> Result<FileAttr> {
        let p = self.inode(parent)?;
        let cname = component(name)?;
        check(make(p.fd, &cname))?;
        self.chown_new(req, p.fd, &cname)?;
        self.do_lookup(parent, name)
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

impl Filesystem for ThrottleFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Ask for requests up to 1 MiB (the kernel caps it at max_pages).
        if let Err(nearest) = config.set_max_write(MAX_REQUEST_BYTES) {
            let _ = config.set_max_write(nearest);
        }
        // mmap of a direct-I/O file goes through our read/write too.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
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
        _req: &Request,
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
        match self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh) {
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
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_entry(req, parent, name, |dir, n| {
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
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_entry(req, parent, name, |dir, n| {
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
            self.make_entry(req, parent, link_name, |dir, n| {
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
            check(unsafe { libc::renameat2(p.fd, n.as_ptr(), np.fd, nn.as_ptr(), flags.bits()) })
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
            Ok(self.add_file(ino.0, fd, flags.0))
        })();
        match r {
            // Direct I/O: no page cache in front of the throttle. Parallel
            // direct writes: concurrent writes to one file reach us (and the
            // queue) together instead of one at a time.
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
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
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let job = Job::Read {
            handle,
            offset,
            size,
            reply,
        };
        if self.is_throttled(ino.0) {
            self.submit(req, ino.0, job);
        } else {
            job.run();
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        if self.is_throttled(ino.0) {
            // The data must outlive this call to wait in the queue.
            let job = Job::Write {
                handle,
                offset,
                data: data.to_vec(),
                reply,
            };
            self.submit(req, ino.0, job);
        } else {
            match handle.write_at(offset, data) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(Errno::from(e)),
            }
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.is_throttled(ino.0) {
            // A barrier: answered after every write queued before it.
            self.submit(req, ino.0, Job::Flush { reply });
        } else {
            reply.ok();
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
        // The descriptor closes when the last queued request holding it is
        // done.
        self.files.write().expect("file lock").remove(&fh.0);
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
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let job = Job::Fsync {
            handle,
            datasync,
            reply,
        };
        if self.is_throttled(ino.0) {
            self.submit(req, ino.0, job);
        } else {
            job.run();
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
            self.dirs
                .write()
                .expect("dir lock")
                .insert(fh, Arc::new(Mutex::new(DirStream { dir, position: 0 })));
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
            let (ino, kind, name, next) = unsafe {
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
                    kind,
                    OsStr::from_bytes(name.to_bytes()).to_owned(),
                    libc::telldir(s.dir) as u64,
                )
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
        let r = (|| {
            let node = self.inode(ino)?;
            let name = cstr(name)?;
            let path = proc_path(node.fd);
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
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.inode(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let Ok(name) = cstr(name) else {
            return reply.error(Errno::EINVAL);
        };
        let path = proc_path(node.fd);
        let r = xattr_fetch(|buf, len| {
            // SAFETY: buf is null with len 0, or valid for len bytes.
            unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf, len) }
        });
        Self::xattr_reply(reply, size, r);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.inode(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let path = proc_path(node.fd);
        let r = xattr_fetch(|buf, len| {
            // SAFETY: as above.
            unsafe { libc::listxattr(path.as_ptr(), buf.cast(), len) }
        });
        Self::xattr_reply(reply, size, r);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let node = self.inode(ino)?;
            let name = cstr(name)?;
            let path = proc_path(node.fd);
            // SAFETY: valid path and name.
            check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })
        })();
        match r {
            Ok(_) => reply.ok(),
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
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            let p = self.inode(parent)?;
            let cname = component(name)?;
            let oflags = (flags & !(libc::O_NOCTTY | libc::O_DIRECT))
                | libc::O_CREAT
                | libc::O_NOFOLLOW
                | libc::O_CLOEXEC;
            // SAFETY: *at call on a directory descriptor we hold.
            let fd = check(unsafe { libc::openat(p.fd, cname.as_ptr(), oflags, mode) })?;
            // SAFETY: fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            self.chown_new(req, p.fd, &cname)?;
            let attr = self.do_lookup(parent, name)?;
            let fh = self.add_file(attr.ino.0, fd, flags);
            Ok((attr, fh))
        })();
        match r {
            Ok((attr, fh)) => reply.created(
                &ATTR_TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Moves no data, so it is not charged; see the README.
        let r = (|| {
            let h = self.handle(fh)?;
            let off = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let len = libc::off_t::try_from(length).map_err(|_| Errno::EINVAL)?;
            // SAFETY: fallocate on an open descriptor.
            check(unsafe { libc::fallocate(h.raw(), mode, off, len) })
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

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = (|| Ok((self.handle(fh_in)?, self.handle(fh_out)?)))();
        let (src, dst) = match r {
            Ok(pair) => pair,
            Err(e) => return reply.error(e),
        };
        // At most one request's worth per call (callers loop on short
        // copies), so a copy is metered like a read and a write of that size.
        let len = len.min(u64::from(MAX_REQUEST_BYTES)) as u32;
        if self.is_throttled(ino_in.0) || self.is_throttled(ino_out.0) {
            let job = Job::Copy {
                src,
                offset_in,
                dst,
                offset_out,
                len,
                at_source: true,
                reply,
            };
            self.submit(req, ino_in.0, job);
        } else {
            match fio::copy_range(src.raw(), offset_in, dst.raw(), offset_out, len as usize) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(Errno::from(e)),
            }
        }
    }
}
