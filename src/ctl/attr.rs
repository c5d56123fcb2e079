//! The system calls on a mount's `user.throttle.*` attributes (get, set,
//! remove, list), and the one-line message for their errors.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::failure::Failure;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The largest value an xattr may have (Linux XATTR_SIZE_MAX).
const XATTR_VALUE_MAX_BYTES: usize = 64 * 1024;

/// Calls an xattr function with a buffer of the largest size a value may
/// have: one call, where asking the size first would make the mount build
/// a generated value twice. Falls back to asking the size on ERANGE (a
/// value that grew past the first buffer), as often as it keeps growing.
fn fetch(mut call: impl FnMut(*mut libc::c_void, usize) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    let mut len = XATTR_VALUE_MAX_BYTES;
    loop {
        let mut buf = vec![0u8; len];
        let got = call(buf.as_mut_ptr().cast(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        len = size as usize + 1;
    }
}

/// The value of attribute `name` of `path`.
pub fn get_attr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (c_path(path)?, c_name(name)?);
    // SAFETY: NUL-terminated strings; buf is null with len 0 or valid.
    fetch(|buf, len| unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf, len) })
}

/// The value as text (the mount writes only UTF-8 into our attributes).
pub fn get_text(path: &Path, name: &str) -> io::Result<String> {
    Ok(String::from_utf8_lossy(&get_attr(path, name)?).into_owned())
}

pub fn set_attr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (c_path(path)?, c_name(name)?);
    // SAFETY: NUL-terminated strings and a valid value buffer.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn remove_attr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (c_path(path)?, c_name(name)?);
    // SAFETY: NUL-terminated strings.
    let r = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The names of `path`'s listed attributes.
pub fn list_attrs(path: &Path) -> io::Result<Vec<String>> {
    let p = c_path(path)?;
    // SAFETY: NUL-terminated path; buf is null with len 0 or valid.
    let raw = fetch(|buf, len| unsafe { libc::listxattr(p.as_ptr(), buf.cast(), len) })?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect())
}

/// A one-line description of an I/O error on `path`, without Rust's
/// " (os error N)" tail; ENODATA/ENOTSUP on our generated attributes mean
/// the path is not where the command expects it.
pub fn io_failure(path: &Path, what: &str, err: &io::Error) -> Failure {
    let text = err.to_string();
    let text = text
        .split(" (os error ")
        .next()
        .unwrap_or(&text)
        .to_string();
    let hint = match err.raw_os_error() {
        Some(libc::ENODATA | libc::ENOTSUP) => " (not on a throttlefs mount?)",
        _ => "",
    };
    Failure::failed(format!("{}: {what}: {text}{hint}", path.display()))
}
