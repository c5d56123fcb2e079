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

/// The errno the daemon's probe `request` ended with, 0 for success.
fn probe(m: &Mount, request: &str) -> i32 {
    common::probe(m, request).unwrap_or_else(|e| {
        panic!(
            "probe {request}: getxattr failed: {}\n{}",
            std::io::Error::from_raw_os_error(e),
            m.daemon_output()
        )
    })
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

#[test]
fn the_sandbox_blocks_every_probe() {
    let mut m = Mount::new();
    let out = outside(&m);
    fs::write(m.src_path("inside"), "yours").unwrap();
    m.start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    // Control: the same probes inside the source work, so a refusal below
    // is the sandbox's, not the probe's.
    let inside = m.src_path("inside");
    assert_eq!(probe(&m, &format!("open:{}", path_arg(&inside))), 0);
    let new_inside = m.src_path("new");
    assert_eq!(probe(&m, &format!("create:{}", path_arg(&new_inside))), 0);
    assert!(new_inside.exists());

    let blocked = |request: String| {
        let e = probe(&m, &request);
        assert!(
            e == libc::EACCES || e == libc::EPERM,
            "probe {request}: {} instead of EACCES or EPERM",
            errno_name(e)
        );
    };
    blocked(format!("open:{}", path_arg(&out.join("secret"))));
    blocked("open:/etc/passwd".to_string());
    let created = out.join("created");
    blocked(format!("create:{}", path_arg(&created)));
    let node = out.join("null");
    blocked(format!("mknod:{}", path_arg(&node)));
    let node_inside = m.src_path("null");
    blocked(format!("mknod:{}", path_arg(&node_inside)));
    blocked("exec:/bin/true".to_string());
    blocked(format!("tcp:{port}"));
    // Nothing was made outside the source, nor a device node inside.
    let mut names: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["secret"]);
    assert!(
        !node_inside.exists(),
        "a device node was made in the source"
    );
}

/// The capabilities every thread of a sandboxed daemon keeps: CHOWN,
/// DAC_OVERRIDE, FOWNER, FSETID (bits 0, 1, 3, 4), and SYS_ADMIN (21)
/// with --passthrough.
const KEPT_CAPS_MASK: u64 = 0x1b;
const CAP_SYS_ADMIN_MASK: u64 = 1 << 21;

fn status_hex(status: &str, field: &str) -> u64 {
    u64::from_str_radix(status_field(status, field), 16).unwrap()
}

fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    common::status_field(status, field).unwrap_or_else(|| panic!("no {field} in\n{status}"))
}

/// Checks every thread of the daemon of `m` against the capability mask
/// `caps` and no new privileges.
fn check_threads(m: &Mount, caps: u64) {
    // Some I/O first, so that the workers and the session threads have
    // all started and served.
    fs::write(m.path("touch"), "x").unwrap();
    assert_eq!(fs::read(m.path("touch")).unwrap(), b"x");
    let all = common::threads(m.pid());
    assert!(all.len() > 4, "only {} threads: {all:?}", all.len());
    for (name, status) in &all {
        assert_eq!(status_field(status, "NoNewPrivs"), "1", "thread {name}");
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                status_hex(status, field),
                caps,
                "thread {name}: {field} is {:#x}, not {caps:#x}",
                status_hex(status, field)
            );
        }
        for field in ["CapInh", "CapAmb"] {
            assert_eq!(status_hex(status, field), 0, "thread {name}: {field}");
        }
    }
}

#[test]
fn every_thread_is_sandboxed() {
    let m = Mount::start_with(&[]);
    check_threads(&m, KEPT_CAPS_MASK);
    // The same daemon without its sandbox holds every capability, so the
    // check above would see a thread that escaped it (the seccomp filter
    // sets no_new_privs too: off here).
    let none = Mount::start_with(&["--sandbox=none", "--seccomp=none"]);
    let all = common::threads(none.pid());
    assert!(
        all.iter().all(|(_, s)| status_field(s, "NoNewPrivs") == "0"
            && status_hex(s, "CapEff") & (1 << 21) != 0),
        "{all:?}"
    );
}

#[test]
fn passthrough_keeps_cap_sys_admin_only() {
    // Also with the sandbox asked for explicitly, which this kernel has.
    let m = Mount::start_with(&["--passthrough", "-o", "sandbox=landlock", "-v"]);
    check_threads(&m, KEPT_CAPS_MASK | CAP_SYS_ADMIN_MASK);
    assert!(
        m.stderr().contains("CAP_SYS_ADMIN for --passthrough"),
        "-v does not say why CAP_SYS_ADMIN is kept:\n{}",
        m.stderr()
    );
}

/// mknod(2) of `path`, the errno on failure.
fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> Result<(), i32> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mknod of a NUL-terminated path.
    match unsafe { libc::mknod(p.as_ptr(), mode, dev) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
    }
}

#[test]
fn device_nodes_are_refused_through_the_mount_fifos_are_not() {
    // A directory of disk images has no use for device nodes, and one made
    // there would open a device to whoever may open it through another
    // mount of the source: the sandbox refuses them (EACCES), as it keeps
    // no CAP_MKNOD. FIFOs and sockets need no privilege and still work.
    let m = Mount::start_with(&[]);
    let null = libc::S_IFCHR | 0o600;
    assert_eq!(
        mknod(&m.path("null"), null, libc::makedev(1, 3)),
        Err(libc::EACCES)
    );
    assert!(!m.src_path("null").exists());
    mknod(&m.path("fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    assert!(
        fs::symlink_metadata(m.src_path("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // Without the sandbox, the same call makes the node.
    let none = Mount::start_with(&["--sandbox=none"]);
    mknod(&none.path("null"), null, libc::makedev(1, 3)).unwrap();
    assert!(
        fs::symlink_metadata(none.src_path("null"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
}

/// setxattr(2) of `name` on `path`, the errno on failure.
fn setxattr(path: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    common::attrs::setxattr(path, name, value).map_err(|e| e.raw_os_error().unwrap())
}

#[test]
fn trusted_attributes_need_the_capability_the_sandbox_drops() {
    // trusted.* attributes need CAP_SYS_ADMIN in the daemon: without it
    // the source refuses them (EPERM), user.* attributes work as before.
    // One set on the source directly is not seen (ENODATA).
    let setup = |src: &Path| {
        fs::write(src.join("f"), "x").unwrap();
        setxattr(&src.join("f"), "trusted.b", b"2").unwrap();
    };
    let m = Mount::with_setup(setup, &[]);
    assert_eq!(setxattr(&m.path("f"), "trusted.a", b"1"), Err(libc::EPERM));
    assert_eq!(getxattr(&m.path("f"), "trusted.b"), Err(libc::ENODATA));
    setxattr(&m.path("f"), "user.a", b"1").unwrap();
    assert_eq!(getxattr(&m.path("f"), "user.a"), Ok(b"1".to_vec()));
    let none = Mount::with_setup(setup, &["--sandbox=none"]);
    setxattr(&none.path("f"), "trusted.a", b"1").unwrap();
    assert_eq!(getxattr(&none.path("f"), "trusted.b"), Ok(b"2".to_vec()));
}

/// getxattr(2) of `name` on `path`: the value, or the errno.
fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    common::attrs::getxattr(path, name).map_err(|e| e.raw_os_error().unwrap())
}

/// landlock_create_ruleset, the same number on every architecture.
const SYS_LANDLOCK_CREATE_RULESET: u32 = 444;

/// In the daemon's process before exec: a seccomp filter that fails
/// landlock_create_ruleset with ENOSYS, as a kernel without Landlock does.
/// Root may install it without no_new_privs (CAP_SYS_ADMIN).
fn hide_landlock() -> std::io::Result<()> {
    common::fail_with_enosys(SYS_LANDLOCK_CREATE_RULESET)
}

#[test]
fn without_landlock_the_default_warns_once_and_an_explicit_request_fails() {
    // Asked for explicitly, the mount fails with one line and leaves no
    // mount behind.
    let mut m = Mount::new();
    m.daemon_pre_exec = Some(hide_landlock);
    let src = m.src().to_path_buf();
    let mnt = m.mnt().to_path_buf();
    let status = m
        .run_to_exit(
            &[
                "--sandbox=landlock",
                src.to_str().unwrap(),
                mnt.to_str().unwrap(),
            ],
            common::EXIT_TIMEOUT,
        )
        .expect("the daemon did not exit");
    assert_eq!(status.code(), Some(1), "{}", m.daemon_output());
    let stderr = m.stderr();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("throttlefs: sandbox=landlock: the kernel has no Landlock"),
        "{stderr}"
    );
    assert!(!m.is_mounted());

    // Not given: one warning, and a daemon without Landlock but with the
    // rest of its sandbox (no CAP_MKNOD).
    let mut m = Mount::new();
    m.daemon_pre_exec = Some(hide_landlock);
    let out = outside(&m);
    m.start(&[]);
    let secret = out.join("secret");
    assert_eq!(probe(&m, &format!("open:{}", path_arg(&secret))), 0);
    assert_eq!(
        probe(&m, &format!("mknod:{}", path_arg(&m.src_path("null")))),
        libc::EPERM
    );
    check_threads(&m, KEPT_CAPS_MASK);
    let warnings = m.stderr().matches("sandbox: no Landlock").count();
    assert_eq!(warnings, 1, "{}", m.stderr());
}
