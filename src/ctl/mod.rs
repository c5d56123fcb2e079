//! The commands that watch and tune a running mount: `throttlefs stat`,
//! `top`, `set`, `get` and `unset`, a second program in the same binary.
//!
//! Everything they read or change goes through the mount's `user.throttle.*`
//! extended attributes (see README, "Per-file limits"), so the kernel's
//! permission checks on those apply to them as to `getfattr`/`setfattr`:
//! there is no second control channel.

pub mod completions;
pub mod prometheus;
pub mod set;
pub mod snapshot;
pub mod stat;
pub mod top;

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::options::clap_error;

/// The first arguments that select a command instead of a mount. A source
/// directory literally named like one is reached as `./stat`.
pub const COMMANDS: [&str; 6] = ["stat", "top", "set", "get", "unset", "completions"];

/// Exit status for bad usage or a refused value, as for the mount.
pub const USAGE_EXIT_CODE: u8 = 2;
/// Exit status when the command could not do its work.
pub const FAILURE_EXIT_CODE: u8 = 1;

/// Whether `arg` (argv[1]) names one of the commands.
pub fn is_command(arg: &OsStr) -> bool {
    COMMANDS.iter().any(|c| c.as_bytes() == arg.as_bytes())
}

/// Why a command stopped: a one-line message and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub msg: String,
    pub code: u8,
}

impl Failure {
    pub fn usage(msg: impl Into<String>) -> Failure {
        Failure {
            msg: crate::options::one_line(&msg.into()),
            code: USAGE_EXIT_CODE,
        }
    }

    pub fn failed(msg: impl Into<String>) -> Failure {
        Failure {
            msg: crate::options::one_line(&msg.into()),
            code: FAILURE_EXIT_CODE,
        }
    }
}

/// Runs the command named by `args[1]`; `args[0]` is the program.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let command = args[1].to_string_lossy().into_owned();
    // clap sees "throttlefs stat ...", so usage lines name the command.
    let mut argv = args;
    let program = argv.remove(0);
    argv[0] = format!("{} {command}", program.to_string_lossy()).into();
    let result = match command.as_str() {
        "stat" => stat::main(argv),
        "top" => top::main(argv),
        "set" => set::set_main(argv),
        "get" => set::get_main(argv),
        "completions" => completions::main(argv),
        _ => set::unset_main(argv),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.code == 0 => {
            println!("{}", f.msg);
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("throttlefs: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}

/// Parses a command's arguments with clap; errors are one line (exit 2),
/// `--help` comes back as a `Failure` with code 0 and the full text.
pub(crate) fn parse<P: CommandFactory + FromArgMatches>(args: Vec<OsString>) -> Result<P, Failure> {
    let bin_name = args[0].to_string_lossy().into_owned();
    let to_failure = |e: clap::Error| {
        let (msg, code) = clap_error(e);
        Failure {
            msg,
            code: u8::try_from(code).unwrap_or(USAGE_EXIT_CODE),
        }
    };
    let matches = P::command()
        .bin_name(bin_name)
        .try_get_matches_from(args)
        .map_err(to_failure)?;
    P::from_arg_matches(&matches).map_err(to_failure)
}

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
