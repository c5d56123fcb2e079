//! Extended-attribute helpers done in-process with the xattr syscalls (no
//! external program), shared by the tests that set, read or list
//! `user.throttle.*` attributes.
//!
//! The `l*` variants act on a symlink itself; the others follow it.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libc::{c_char, c_int, c_void, size_t, ssize_t};

use super::KIB;

/// Size of the buffer values and name lists are read into.
const BUF_LEN: usize = 64 * KIB as usize;

/// `path` as a C string for the syscalls.
pub fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn cname(name: &str) -> CString {
    CString::new(name).expect("attribute name without NUL")
}

/// getxattr(2) or lgetxattr(2).
type GetFn = unsafe extern "C" fn(*const c_char, *const c_char, *mut c_void, size_t) -> ssize_t;
/// setxattr(2) or lsetxattr(2).
type SetFn =
    unsafe extern "C" fn(*const c_char, *const c_char, *const c_void, size_t, c_int) -> c_int;
/// listxattr(2) or llistxattr(2).
type ListFn = unsafe extern "C" fn(*const c_char, *mut c_char, size_t) -> ssize_t;

/// Calls `read` with a buffer of BUF_LEN bytes; the bytes it reports it
/// filled, or the errno when it returns a negative value.
fn read_buf(read: impl FnOnce(&mut [u8]) -> ssize_t) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; BUF_LEN];
    let r = read(&mut buf);
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn get_with(get: GetFn, path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(path), cname(name));
    // SAFETY: valid NUL-terminated strings and a buffer of buf.len() bytes.
    read_buf(|buf| unsafe { get(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

fn set_with(set: SetFn, path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(path), cname(name));
    // SAFETY: valid NUL-terminated strings and a value buffer of its length.
    let r = unsafe {
        set(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The attribute names of `path`, read with `list` (named `what` in the
/// panic message if it fails).
fn list_with(list: ListFn, what: &str, path: &Path) -> Vec<String> {
    let p = cpath(path);
    // SAFETY: valid NUL-terminated string and a buffer of buf.len() bytes.
    let buf = read_buf(|buf| unsafe { list(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
        .unwrap_or_else(|e| panic!("{what} {}: {e}", path.display()));
    buf.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// getxattr(2) (following symlinks).
pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    get_with(libc::getxattr, path, name)
}

/// lgetxattr(2): the attribute of `path` itself, even if it is a symlink.
pub fn lgetxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    get_with(libc::lgetxattr, path, name)
}

/// fgetxattr(2) on an open file.
pub fn fgetxattr(file: &File, name: &str) -> io::Result<Vec<u8>> {
    let n = cname(name);
    // SAFETY: open descriptor, valid name and a buffer of buf.len() bytes.
    read_buf(|buf| unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

/// setxattr(2) (following symlinks).
pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    set_with(libc::setxattr, path, name, value)
}

/// lsetxattr(2): sets the attribute of `path` itself, even if it is a
/// symlink.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    set_with(libc::lsetxattr, path, name, value)
}

/// setxattr(2) in-process, asserting success.
///
/// Used instead of setfattr while a request of this process is queued in
/// the throttle: spawning a program makes the child close its inherited
/// (close-on-exec) descriptors of the mounted file, each close sends a
/// FUSE FLUSH, and a flush is a barrier that waits for the queued request.
/// The spawn would then block until the request is released anyway.
pub fn sys_set_attr(path: &Path, name: &str, value: &str) {
    if let Err(e) = setxattr(path, name, value.as_bytes()) {
        panic!("setxattr {name}={value} on {}: {e}", path.display());
    }
}

/// removexattr(2) in-process, asserting success; see `sys_set_attr`.
pub fn sys_remove_attr(path: &Path, name: &str) {
    let (p, n) = (cpath(path), cname(name));
    // SAFETY: valid NUL-terminated strings.
    let r = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    assert_eq!(
        r,
        0,
        "removexattr {name} on {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// getxattr(2) in-process, as text; `None` for ENODATA (no such
/// attribute), a panic for any other error; see `sys_set_attr`.
pub fn sys_get_attr(path: &Path, name: &str) -> Option<String> {
    match getxattr(path, name) {
        Ok(v) => Some(String::from_utf8_lossy(&v).into_owned()),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => None,
        Err(e) => panic!("getxattr {name} on {}: {e}", path.display()),
    }
}

/// listxattr(2) (following symlinks): the attribute names of `path`.
pub fn list_attrs(path: &Path) -> Vec<String> {
    list_with(libc::listxattr, "listxattr", path)
}

/// llistxattr(2): the attribute names of `path` itself, even if it is a
/// symlink.
pub fn llist_attrs(path: &Path) -> Vec<String> {
    list_with(libc::llistxattr, "llistxattr", path)
}

/// `user.throttle.stats` of `path` (lgetxattr(2), in-process: see
/// `sys_set_attr`), parsed into its `key=value` numbers. Panics if it cannot
/// be read or a line is not `key=number`; does not check which keys are
/// there.
pub fn stats(path: &Path) -> BTreeMap<String, u64> {
    const STATS: &str = "user.throttle.stats";
    let raw = lgetxattr(path, STATS)
        .unwrap_or_else(|e| panic!("cannot read {STATS} of {}: {e}", path.display()));
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("bad stats line {l:?} in {text:?}"));
            let v = v
                .parse()
                .unwrap_or_else(|_| panic!("bad stats value {l:?} in {text:?}"));
            (k.to_string(), v)
        })
        .collect()
}
