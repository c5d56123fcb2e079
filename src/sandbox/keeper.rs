//! Unmounting from the sandbox. A sandboxed daemon cannot unmount: Landlock
//! denies every unmount, and the capability for it is gone. So the daemon
//! first forks a small helper, the keeper, that keeps the old privileges
//! and does one thing: unmount the mount point it was given, when the
//! daemon asks over a socket. It is forked before the daemon opens
//! anything of the mount and closes every descriptor but its socket, so it
//! holds nothing else (not the FUSE device, nor a mapping of a ring: the
//! connection still ends with the daemon). It ignores the termination
//! signals (they are the daemon's to handle) and exits when the daemon's
//! end of the socket closes, whether the daemon exited or was killed. A
//! killed daemon therefore leaves its mount as it did before the sandbox,
//! and a restart detaches it.
//!
//! The daemon stays the main process (systemd's main pid, the pid the
//! caller started); the keeper is its child.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

/// Requests on the socket, one byte each; the answer is the errno as four
/// bytes, 0 for success.
const UNMOUNT_REQUEST: u8 = b'u';
const LAZY_UNMOUNT_REQUEST: u8 = b'l';

/// The keeper's name in `ps` and /proc (at most 15 bytes).
const KEEPER_NAME: &std::ffi::CStr = c"throttlefs-umnt";

/// Unmounts the daemon's mount: itself (no sandbox) or through the keeper.
pub struct Unmounter {
    how: How,
}

enum How {
    Direct(CString),
    /// The daemon's end of the socket to the keeper; one request at a time.
    Keeper(Mutex<OwnedFd>),
}

impl Unmounter {
    /// Unmounts `mountpoint` from this process (no sandbox).
    pub fn direct(mountpoint: &Path) -> io::Result<Unmounter> {
        Ok(Unmounter {
            how: How::Direct(path_cstring(mountpoint)?),
        })
    }

    /// Forks the keeper for `mountpoint`. With `quiet`, the keeper's
    /// standard descriptors go to /dev/null (a detached daemon's caller
    /// may wait for the end of its output). Must be called while the
    /// process has a single thread.
    pub fn keeper(mountpoint: &Path, quiet: bool) -> io::Result<Unmounter> {
        let path = path_cstring(mountpoint)?;
        let mut fds = [0; 2];
        // SAFETY: socketpair fills a two-element array.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the caller guarantees a single thread, so the child may
        // run anything; it never returns (see `keep`).
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => keep(theirs.as_raw_fd(), &path, quiet),
            _ => Ok(Unmounter {
                how: How::Keeper(Mutex::new(ours)),
            }),
        }
    }

    /// Unmounts; `lazy` detaches a busy mount (MNT_DETACH). Errors are
    /// umount2's (EINVAL: not mounted any more, EBUSY: busy).
    pub fn unmount(&self, lazy: bool) -> io::Result<()> {
        match &self.how {
            How::Direct(path) => unmount(path, lazy),
            How::Keeper(sock) => {
                let sock = sock.lock().unwrap_or_else(|e| e.into_inner());
                let request = if lazy {
                    LAZY_UNMOUNT_REQUEST
                } else {
                    UNMOUNT_REQUEST
                };
                // SAFETY: send/recv on our socket with local buffers.
                if unsafe {
                    libc::send(
                        sock.as_raw_fd(),
                        (&request as *const u8).cast(),
                        1,
                        libc::MSG_NOSIGNAL,
                    )
                } != 1
                {
                    return Err(helper_gone());
                }
                let mut answer = [0u8; 4];
                // SAFETY: as above.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        answer.as_mut_ptr().cast(),
                        answer.len(),
                        0,
                    )
                };
                if n != answer.len() as isize {
                    return Err(helper_gone());
                }
                match i32::from_ne_bytes(answer) {
                    0 => Ok(()),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                }
            }
        }
    }
}

/// The error when the keeper is not there to answer (it was killed).
fn helper_gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the unmount helper has gone")
}

/// Whether `err` says that the keeper has gone.
pub fn is_helper_gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotConnected && err.raw_os_error().is_none()
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// umount2, or for a user who may not (EPERM) `fusermount3 -u`, as fuser
/// itself unmounts a user's mount.
fn unmount(path: &CString, lazy: bool) -> io::Result<()> {
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 of a NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u").arg("-q");
    if lazy {
        cmd.arg("-z");
    }
    let path = std::ffi::OsStr::from_bytes(path.as_bytes());
    match cmd.arg("--").arg(path).status() {
        Ok(s) if s.success() => Ok(()),
        // fusermount3 says why only on its stderr; busy is what a
        // mounted FUSE filesystem fails with.
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EBUSY)),
        Err(_) => Err(err),
    }
}

/// The keeper: serves unmount requests on `sock` until the daemon's end
/// closes, then exits. Never returns (the forked copies of the daemon's
/// objects are never dropped, so nothing of the daemon's is unmounted or
/// flushed twice).
fn keep(sock: libc::c_int, mountpoint: &CString, quiet: bool) -> ! {
    // SAFETY: plain syscalls in the single-threaded child: close every
    // descriptor but the socket (stdio stays), rename the process, and
    // block the termination signals (the mask is inherited; this makes
    // sure of it).
    unsafe {
        libc::syscall(libc::SYS_close_range, 3, sock - 1, 0);
        libc::syscall(libc::SYS_close_range, sock + 1, libc::c_uint::MAX, 0);
        libc::prctl(libc::PR_SET_NAME, KEEPER_NAME.as_ptr());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if quiet {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null >= 0 {
                for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
                    libc::dup2(null, fd);
                }
                libc::close(null);
            }
        }
    }
    loop {
        let mut request = 0u8;
        // SAFETY: recv into a local byte.
        let n = unsafe { libc::recv(sock, (&mut request as *mut u8).cast(), 1, 0) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n != 1 {
            // The daemon has gone: its mount stays as it left it.
            // SAFETY: _exit skips the daemon's exit handlers, which are
            // not ours to run.
            unsafe { libc::_exit(0) };
        }
        let result = match request {
            UNMOUNT_REQUEST => unmount(mountpoint, false),
            LAZY_UNMOUNT_REQUEST => unmount(mountpoint, true),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let errno = match result {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
        };
        let answer = errno.to_ne_bytes();
        // SAFETY: send from a local buffer.
        unsafe {
            libc::send(
                sock,
                answer.as_ptr().cast(),
                answer.len(),
                libc::MSG_NOSIGNAL,
            )
        };
    }
}
