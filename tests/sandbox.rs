//! The sandbox (src/sandbox): with the test-only feature `sandbox-probe`
//! the daemon tries, on request, what its sandbox must forbid (open or
//! create a file outside the source, make a device node, run a program,
//! connect a TCP socket, set up a new io_uring) and reports the errno.
//! Each probe succeeds with `--sandbox=none`, so these tests would see an
//! escape, and fails with the sandbox on, leaving nothing behind.
//!
//! Built only with the feature (`required-features` in Cargo.toml);
//! `.ci/run` runs it with `cargo nextest run --features sandbox-probe`.

mod common;

use std::ffi::CString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use common::Mount;

/// The errno the daemon's probe `request` (`ACTION[:ARG]`, see
/// src/sandbox/probe.rs) ended with, 0 for success.
fn probe(m: &Mount, request: &str) -> i32 {
    let path = CString::new(m.mnt().as_os_str().as_bytes()).unwrap();
    let name = CString::new(format!("user.probe.sandbox.{request}")).unwrap();
    let mut buf = [0u8; 32];
    // SAFETY: getxattr into a local buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        n > 0,
        "probe {request}: getxattr failed: {}\n{}",
        std::io::Error::last_os_error(),
        m.daemon_output()
    );
    std::str::from_utf8(&buf[..n as usize])
        .unwrap()
        .parse()
        .unwrap()
}

/// The errno name of `e`, for messages.
fn errno_name(e: i32) -> String {
    format!("{e} ({})", std::io::Error::from_raw_os_error(e))
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Whether this kernel lets anyone set up an io_uring
/// (`kernel.io_uring_disabled` 0).
fn uring_allowed() -> bool {
    fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map_or(true, |s| s.trim() == "0")
}

/// A directory beside the source (in the test's temporary directory), with
/// a file in it, for the probes that reach outside.
fn outside(m: &Mount) -> std::path::PathBuf {
    let dir = m.root().join("outside");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("secret"), "not yours").unwrap();
    dir
}

#[test]
fn without_the_sandbox_every_probe_escapes() {
    let mut m = Mount::new();
    let out = outside(&m);
    m.start(&["--sandbox=none", "--seccomp=none"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let secret = out.join("secret");
    assert_eq!(probe(&m, &format!("open:{}", path_arg(&secret))), 0);
    let created = out.join("created");
    assert_eq!(probe(&m, &format!("create:{}", path_arg(&created))), 0);
    assert!(created.exists());
    let node = out.join("null");
    assert_eq!(probe(&m, &format!("mknod:{}", path_arg(&node))), 0);
    assert!(
        fs::symlink_metadata(&node)
            .unwrap()
            .file_type()
            .is_char_device()
    );
    let inside = m.src_path("null");
    assert_eq!(probe(&m, &format!("mknod:{}", path_arg(&inside))), 0);
    assert_eq!(probe(&m, "exec:/bin/true"), 0);
    assert_eq!(probe(&m, &format!("tcp:{port}")), 0);
    if uring_allowed() {
        assert_eq!(probe(&m, "uring"), 0);
    }
    // An unknown action is refused, not run.
    assert_eq!(
        probe(&m, "fly"),
        libc::EINVAL,
        "{}",
        errno_name(libc::EINVAL)
    );
}
