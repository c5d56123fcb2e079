//! A fault-injecting filesystem for the tests: a small passthrough FUSE
//! filesystem, served by threads of the test process with `fuser`, that
//! forwards to a real backing directory and fails chosen requests on
//! command. Used as the SOURCE directory of a throttlefs mount, it plays the
//! disk under the source going bad, so a test can compare what a caller
//! gets through throttlefs with what it gets from the faulty filesystem
//! itself.
//!
//! Every open is answered with FOPEN_DIRECT_IO, so each read, write and
//! fsync throttlefs makes reaches this filesystem as one request at the
//! caller's offset (no page cache, no readahead in between), and the rules
//! of the `Plan` can name requests by file, offset range and count. The
//! kernel offers no direct-I/O alignment for a FUSE file (statx
//! STATX_DIOALIGN), so throttlefs serves an O_DIRECT caller through its
//! buffered descriptor here, as on any source without O_DIRECT. It asks
//! for FUSE_ASYNC_DIO, as libfuse does, unless made with
//! `FaultMount::with_async_dio(.., false)` (see docs/reliability.md, A
//! source on FUSE).

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, SessionACL, TimeOrNow, WriteFlags,
};
use tempfile::TempDir;

/// Attributes are not cached: the backing files change behind the
/// kernel's back (the tests write them directly).
const TTL: Duration = Duration::ZERO;

/// The largest request the kernel may send (as throttlefs asks for).
const MAX_REQUEST_BYTES: u32 = 1024 * 1024;

/// Threads serving the mount: throttlefs's I/O workers put many requests
/// in flight at once.
const SERVER_THREADS: usize = 4;

/// Which requests a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultOp {
    Read,
    Write,
    Fsync,
}

/// What a matching request gets instead of being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fails with this errno, nothing moved.
    Errno(i32),
    /// A bad region at the rule's range: a read or write that starts before
    /// it moves the bytes up to its start and reports that short count, as
    /// read(2) and write(2) do after partial progress; one that starts
    /// inside it fails with this errno. A local filesystem on a disk with
    /// a bad sector behaves so.
    Partial(i32),
    /// A read served short, with only its first this many bytes (the rest
    /// of the file is fine): a transient short read.
    Short(u32),
}

/// One injection rule: requests of `op` on `file` (its name under the
/// backing directory) that overlap `range` (any request for fsync) are
/// counted; after the first `skip` of them, the next `times` get `fault`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub op: FaultOp,
    pub file: String,
    pub range: Range<u64>,
    pub skip: u64,
    pub times: u64,
    pub fault: Fault,
    /// Requests this rule matched so far.
    pub matched: u64,
    /// Requests it faulted so far.
    pub injected: u64,
}

impl Rule {
    /// Every request of `op` on `file` overlapping `range` gets `fault`.
    pub fn new(op: FaultOp, file: &str, range: Range<u64>, fault: Fault) -> Rule {
        Rule {
            op,
            file: file.to_string(),
            range,
            skip: 0,
            times: u64::MAX,
            fault,
            matched: 0,
            injected: 0,
        }
    }

    /// Only `times` matching requests, after `skip` of them, get the fault.
    pub fn nth(mut self, skip: u64, times: u64) -> Rule {
        self.skip = skip;
        self.times = times;
        self
    }
}

/// What the test asks for, and what the filesystem saw.
#[derive(Default, Debug)]
pub struct Plan {
    pub rules: Vec<Rule>,
    /// Requests served or faulted, by (file, op).
    pub requests: HashMap<(String, FaultOp), u64>,
}

impl Plan {
    /// The fault for a request, if a rule takes it (the first that does).
    fn check(&mut self, op: FaultOp, file: &str, at: Range<u64>) -> Option<(Fault, Range<u64>)> {
        *self.requests.entry((file.to_string(), op)).or_default() += 1;
        for r in &mut self.rules {
            let overlaps =
                op == FaultOp::Fsync || (at.start < r.range.end && r.range.start < at.end);
            if r.op != op || r.file != file || !overlaps {
                continue;
            }
            r.matched += 1;
            if r.matched > r.skip && r.injected < r.times {
                r.injected += 1;
                return Some((r.fault, r.range.clone()));
            }
        }
        None
    }
}

struct Open {
    file: File,
    name: String,
}

struct FaultFs {
    root: PathBuf,
    /// Ask for FUSE_ASYNC_DIO, as libfuse does by default.
    async_dio: bool,
    plan: Arc<Mutex<Plan>>,
    /// Path under `root` ("" for the root) of every inode looked up.
    paths: Mutex<HashMap<u64, PathBuf>>,
    files: Mutex<HashMap<u64, Arc<Open>>>,
    next_fh: AtomicU64,
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path")
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn attr_of(ino: u64, md: &fs::Metadata) -> FileAttr {
    let kind = match md.mode() & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::RegularFile,
    };
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.ctime(), md.ctime_nsec()),
        kind,
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

/// A size-probing xattr call until the buffer is large enough.
fn xattr_fetch(mut call: impl FnMut(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let need = call(std::ptr::null_mut(), 0);
        if need < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; need as usize];
        let got = call(buf.as_mut_ptr().cast(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: io::Result<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl FaultFs {
    /// The relative path of `ino`.
    fn rel(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(PathBuf::new());
        }
        self.paths
            .lock()
            .unwrap()
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn full(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        Ok(self.root.join(self.rel(ino)?))
    }

    /// Look `rel` up: its attributes under its backing inode number.
    fn entry_of(&self, rel: PathBuf) -> Result<FileAttr, Errno> {
        let md = fs::symlink_metadata(self.root.join(&rel)).map_err(errno)?;
        let ino = md.ino();
        self.paths.lock().unwrap().insert(ino, rel);
        Ok(attr_of(ino, &md))
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.rel(parent)?.join(name))
    }

    fn open_file(&self, fh: FileHandle) -> Result<Arc<Open>, Errno> {
        self.files
            .lock()
            .unwrap()
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_open(&self, file: File, rel: &Path) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let name = rel.to_string_lossy().into_owned();
        self.files
            .lock()
            .unwrap()
            .insert(fh, Arc::new(Open { file, name }));
        fh
    }

    fn fault(&self, op: FaultOp, name: &str, at: Range<u64>) -> Option<(Fault, Range<u64>)> {
        self.plan.lock().unwrap().check(op, name, at)
    }
}

/// The backing file opened as the caller asked, without O_DIRECT (the
/// backing filesystem may lack it) or O_APPEND (the kernel gives offsets).
fn open_backing(path: &Path, flags: i32, create: Option<u32>) -> io::Result<File> {
    let acc = flags & libc::O_ACCMODE;
    let mut o = OpenOptions::new();
    o.read(acc != libc::O_WRONLY).write(acc != libc::O_RDONLY);
    o.custom_flags(flags & !(libc::O_ACCMODE | libc::O_DIRECT | libc::O_APPEND | libc::O_CREAT));
    if let Some(mode) = create {
        o.create(true).mode(mode);
    }
    o.open(path)
}

impl Filesystem for FaultFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_REQUEST_BYTES) {
            let _ = config.set_max_write(nearest);
        }
        if self.async_dio {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|rel| self.entry_of(rel)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self
            .full(ino)
            .and_then(|p| fs::symlink_metadata(p).map_err(errno));
        match r {
            Ok(md) => reply.attr(&TTL, &attr_of(ino.0, &md)),
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
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let path = self.full(ino)?;
            if let Some(mode) = mode {
                fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&path, uid, gid).map_err(errno)?;
            }
            if let Some(size) = size {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(size))
                    .map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                let ts = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec {
                            tv_sec: d.as_secs() as libc::time_t,
                            tv_nsec: d.subsec_nanos() as libc::c_long,
                        }
                    }
                };
                let times = [ts(atime), ts(mtime)];
                let p = cpath(&path);
                // SAFETY: valid path and two timespecs.
                let r = unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        p.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if r < 0 {
                    return Err(errno(io::Error::last_os_error()));
                }
            }
            fs::symlink_metadata(&path).map_err(errno)
        })();
        match r {
            Ok(md) => reply.attr(&TTL, &attr_of(ino.0, &md)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .child(parent, name)
            .and_then(|rel| fs::remove_file(self.root.join(rel)).map_err(errno));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let rel = self.rel(ino)?;
            let file = open_backing(&self.root.join(&rel), flags.0, None).map_err(errno)?;
            Ok(self.add_open(file, &rel))
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            let rel = self.child(parent, name)?;
            let file = open_backing(&self.root.join(&rel), flags, Some(mode)).map_err(errno)?;
            let attr = self.entry_of(rel.clone())?;
            Ok((attr, self.add_open(file, &rel)))
        })();
        match r {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let open = match self.open_file(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        let mut len = size as usize;
        match self.fault(FaultOp::Read, &open.name, offset..offset + u64::from(size)) {
            Some((Fault::Errno(e), _)) => return reply.error(Errno::from_i32(e)),
            Some((Fault::Partial(e), bad)) => {
                if offset >= bad.start {
                    return reply.error(Errno::from_i32(e));
                }
                len = len.min((bad.start - offset) as usize);
            }
            Some((Fault::Short(n), _)) => len = len.min(n as usize),
            None => {}
        }
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match open.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..done]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let open = match self.open_file(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        let mut data = data;
        match self.fault(
            FaultOp::Write,
            &open.name,
            offset..offset + data.len() as u64,
        ) {
            Some((Fault::Errno(e), _)) => return reply.error(Errno::from_i32(e)),
            Some((Fault::Partial(e), bad)) => {
                if offset >= bad.start {
                    return reply.error(Errno::from_i32(e));
                }
                data = &data[..data.len().min((bad.start - offset) as usize)];
            }
            Some((Fault::Short(n), _)) => data = &data[..data.len().min(n as usize)],
            None => {}
        }
        match open.file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
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
        self.files.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let open = match self.open_file(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        if let Some((Fault::Errno(e) | Fault::Partial(e), _)) =
            self.fault(FaultOp::Fsync, &open.name, 0..u64::MAX)
        {
            return reply.error(Errno::from_i32(e));
        }
        let r = if datasync {
            open.file.sync_data()
        } else {
            open.file.sync_all()
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let rel = match self.rel(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let entries = match fs::read_dir(self.root.join(&rel)) {
            Ok(d) => d,
            Err(e) => return reply.error(errno(e)),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsStr::new(".").to_os_string()),
            (ino.0, FileType::Directory, OsStr::new("..").to_os_string()),
        ];
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            let kind = if md.is_dir() {
                FileType::Directory
            } else if md.file_type().is_symlink() {
                FileType::Symlink
            } else {
                FileType::RegularFile
            };
            all.push((md.ino(), kind, e.file_name()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let p = cpath(&self.root);
        // SAFETY: valid path and out-structure.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(p.as_ptr(), &mut st) } < 0 {
            return reply.error(errno(io::Error::last_os_error()));
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
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
        let r = self.full(ino).and_then(|p| {
            let (p, n) = (cpath(&p), cpath(Path::new(name)));
            // SAFETY: valid path, name and value.
            let r = unsafe {
                libc::lsetxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            };
            if r < 0 {
                Err(errno(io::Error::last_os_error()))
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let p = match self.full(ino) {
            Ok(p) => cpath(&p),
            Err(e) => return reply.error(e),
        };
        let n = cpath(Path::new(name));
        let r = xattr_fetch(|buf, len| {
            // SAFETY: buf is null with len 0, or valid for len bytes.
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf, len) }
        });
        xattr_reply(reply, size, r);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let p = match self.full(ino) {
            Ok(p) => cpath(&p),
            Err(e) => return reply.error(e),
        };
        let r = xattr_fetch(|buf, len| {
            // SAFETY: as above.
            unsafe { libc::llistxattr(p.as_ptr(), buf.cast(), len) }
        });
        xattr_reply(reply, size, r);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.full(ino).and_then(|p| {
            let (p, n) = (cpath(&p), cpath(Path::new(name)));
            // SAFETY: valid path and name.
            if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } < 0 {
                Err(errno(io::Error::last_os_error()))
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted fault filesystem: `mnt()` shows `backing()` and fails what
/// `plan` says. Dropping it unmounts.
pub struct FaultMount {
    session: Option<fuser::BackgroundSession>,
    plan: Arc<Mutex<Plan>>,
    backing: PathBuf,
    mnt: PathBuf,
    dir: Option<TempDir>,
}

impl FaultMount {
    /// Mounts an empty backing directory; `setup(backing)` fills it first.
    pub fn new(setup: impl FnOnce(&Path)) -> FaultMount {
        FaultMount::with_async_dio(setup, true)
    }

    /// `new`, asking the kernel for FUSE_ASYNC_DIO only if `async_dio`
    /// (fuser does not by default; libfuse does).
    pub fn with_async_dio(setup: impl FnOnce(&Path), async_dio: bool) -> FaultMount {
        let dir = tempfile::Builder::new()
            .prefix("throttlefs-faultfs-")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path().canonicalize().expect("canonicalize temp dir");
        let backing = root.join("backing");
        let mnt = root.join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        setup(&backing);
        let plan = Arc::new(Mutex::new(Plan::default()));
        let fs = FaultFs {
            root: backing.clone(),
            async_dio,
            plan: plan.clone(),
            paths: Mutex::default(),
            files: Mutex::default(),
            next_fh: AtomicU64::new(1),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![MountOption::FSName("faultfs".into())];
        // allow_other: the throttlefs daemon is another process.
        config.acl = SessionACL::All;
        config.n_threads = Some(SERVER_THREADS);
        config.clone_fd = true;
        let session = fuser::Session::new(fs, &mnt, &config)
            .and_then(|s| s.spawn())
            .unwrap_or_else(|e| panic!("mounting the fault filesystem on {}: {e}", mnt.display()));
        FaultMount {
            session: Some(session),
            plan,
            backing,
            mnt,
            dir: Some(dir),
        }
    }

    /// The mount point: the faulty filesystem, to use as a source.
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// `name` on the faulty filesystem.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// `name` in the backing directory (no faults).
    pub fn backing_path(&self, name: &str) -> PathBuf {
        self.backing.join(name)
    }

    /// Adds a rule; returns its index for `rule`.
    pub fn inject(&self, rule: Rule) -> usize {
        let mut p = self.plan.lock().unwrap();
        p.rules.push(rule);
        p.rules.len() - 1
    }

    /// Removes every rule and forgets what was seen.
    pub fn clear(&self) {
        *self.plan.lock().unwrap() = Plan::default();
    }

    /// Rule `i` as it stands (its counts).
    pub fn rule(&self, i: usize) -> Rule {
        self.plan.lock().unwrap().rules[i].clone()
    }

    /// Requests of `op` on `file` that reached the filesystem.
    pub fn requests(&self, file: &str, op: FaultOp) -> u64 {
        let p = self.plan.lock().unwrap();
        p.requests
            .get(&(file.to_string(), op))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FaultMount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            // Lazily, should a test have left something open on it.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
            drop(s);
        }
        if super::is_mounted(&self.mnt) {
            eprintln!("warning: could not unmount {}", self.mnt.display());
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}
