//! Test-only (feature `sandbox-probe`, never in a release build): on
//! request the daemon tries, on the FUSE thread serving the request, one
//! thing its sandbox should forbid, and reports the errno it got. The
//! tests in tests/sandbox.rs see with it that each layer blocks what it
//! should, and that they would see an escape (with `--sandbox=none` every
//! probe succeeds).
//!
//! A request is a `getxattr` of `user.probe.sandbox.ACTION[:ARG]` on any
//! inode of the mount; the value is the errno as decimal text, `0` when
//! the action succeeded. Each call runs the action once, so ask with a
//! buffer large enough (a size query runs it too). Actions:
//!
//! - `open:PATH`: open PATH read-only;
//! - `create:PATH`: create PATH (or open it for writing);
//! - `mknod:PATH`: make PATH a character device 1:3 (`/dev/null`'s);
//! - `exec:PATH`: run the program PATH (0 once it started, whatever its
//!   exit status);
//! - `tcp:PORT`: open a TCP socket and connect it to 127.0.0.1:PORT;
//! - `uring`: set up a new io_uring instance (`io_uring_setup`);
//! - `unlisted`: make a system call the daemon never makes and that
//!   changes nothing (`personality(0xffffffff)` reads the persona), which
//!   the seccomp filter answers by killing the daemon.

use std::ffi::CString;
use std::io;

/// Names of probe requests start with this.
pub const PROBE_PREFIX: &str = "user.probe.sandbox.";

/// The errno the action named by the xattr `name` ended with (0 for
/// success), or None when `name` is not a probe request.
pub fn run(name: &[u8]) -> Option<i32> {
    let request = std::str::from_utf8(name.strip_prefix(PROBE_PREFIX.as_bytes())?).ok()?;
    let (action, arg) = request.split_once(':').unwrap_or((request, ""));
    let result = match action {
        "open" => open(arg, libc::O_RDONLY),
        "create" => open(arg, libc::O_WRONLY | libc::O_CREAT),
        "mknod" => mknod(arg),
        "exec" => exec(arg),
        "tcp" => tcp(arg),
        "uring" => uring(),
        "unlisted" => unlisted(),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    let errno = match result {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    };
    log::warn!("sandbox probe {request}: errno {errno}");
    Some(errno)
}

fn path(arg: &str) -> io::Result<CString> {
    CString::new(arg).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// 0 or -1 with errno, as most syscalls return.
fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open(arg: &str, flags: libc::c_int) -> io::Result<()> {
    let p = path(arg)?;
    // SAFETY: open of a NUL-terminated path; the descriptor is closed here.
    let fd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o600) })?;
    // SAFETY: fd was just opened here.
    unsafe { libc::close(fd) };
    Ok(())
}

fn mknod(arg: &str) -> io::Result<()> {
    let p = path(arg)?;
    // SAFETY: mknod of a NUL-terminated path.
    check(unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) })?;
    Ok(())
}

fn exec(arg: &str) -> io::Result<()> {
    // std reports an exec that failed in the child as the spawn's error.
    std::process::Command::new(arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(drop)
}

fn tcp(arg: &str) -> io::Result<()> {
    let port: u16 = arg
        .parse()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).map(drop)
}

fn uring() -> io::Result<()> {
    // io_uring_setup, then close.
    io_uring::IoUring::new(1).map(drop)
}

fn unlisted() -> io::Result<()> {
    // SAFETY: personality with 0xffffffff only queries.
    let r = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
