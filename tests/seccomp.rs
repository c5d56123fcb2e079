//! The seccomp filter (src/sandbox/seccomp.rs) on a running daemon: every
//! thread has it; what the daemon deliberately never does (a TCP socket, a
//! new io_uring, a program) fails with EPERM and the daemon serves on; a
//! system call outside the allowlist kills it with SIGSYS (`kill`, the
//! default) or is only logged (`log`). With `--seccomp=none` the same
//! probes succeed (tests/sandbox.rs), so these tests would see an escape.
//!
//! The probes are the test-only feature `sandbox-probe` (src/sandbox/probe.rs);
//! `.ci/run` runs this file with it. `--sandbox=none` leaves Landlock out,
//! so that the errno seen is the filter's.

mod common;

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;

use common::{EXIT_TIMEOUT, Mount, probe};

/// The `seccomp` system call's number on x86_64, where the tests run.
const SYS_SECCOMP: u32 = 317;

/// In the daemon's process before exec: a filter (installed with prctl,
/// which it leaves alone) that fails the `seccomp` system call with
/// ENOSYS, as a kernel without seccomp filters does. Root may install it
/// without no_new_privs.
fn hide_seccomp() -> std::io::Result<()> {
    common::fail_with_enosys(SYS_SECCOMP)
}

/// The seccomp fields of every thread of `pid`: (thread name, Seccomp,
/// Seccomp_filters).
fn thread_seccomp(pid: libc::pid_t) -> Vec<(String, String, String)> {
    common::threads(pid)
        .into_iter()
        .map(|(name, status)| {
            let field = |f| {
                common::status_field(&status, f)
                    .unwrap_or_default()
                    .to_string()
            };
            (name, field("Seccomp"), field("Seccomp_filters"))
        })
        .collect()
}

#[test]
fn every_thread_of_the_daemon_has_the_filter() {
    let m = Mount::with_setup(
        |src| fs::write(src.join("f"), vec![7u8; 65536]).unwrap(),
        &[],
    );
    // Through the mount, so that the threads that serve it have run.
    assert_eq!(fs::read(m.path("f")).unwrap().len(), 65536);
    let threads = thread_seccomp(m.pid());
    assert!(threads.len() > 3, "{threads:?}");
    for (name, mode, filters) in &threads {
        assert_eq!(mode, "2", "thread {name}: Seccomp (2 = filter)");
        assert_eq!(filters, "1", "thread {name}: Seccomp_filters");
    }
    // The harness's own process has none: the fields can be told apart.
    let ours = thread_seccomp(std::process::id() as libc::pid_t);
    assert!(ours.iter().all(|(_, mode, _)| mode == "0"), "{ours:?}");
}

#[test]
fn without_the_filter_nothing_is_filtered() {
    let m = Mount::start_with(&["--seccomp=none", "--sandbox=none"]);
    for (name, mode, _) in thread_seccomp(m.pid()) {
        assert_eq!(mode, "0", "thread {name}");
    }
}

/// Under `mode` (kill or log): the refusals fail with EPERM, the daemon
/// lives on and serves.
fn refused_with_eperm(mode: &str) {
    let mut m = Mount::new();
    fs::write(m.src_path("f"), b"still served").unwrap();
    m.start(&[&format!("--seccomp={mode}"), "--sandbox=none"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();

    assert_eq!(probe(&m, &format!("tcp:{port}")), Ok(libc::EPERM));
    assert!(listener.accept().is_err(), "the daemon connected");
    assert_eq!(probe(&m, "uring"), Ok(libc::EPERM));
    assert_eq!(probe(&m, "exec:/bin/true"), Ok(libc::EPERM));
    assert_eq!(fs::read(m.path("f")).unwrap(), b"still served");
    assert!(m.is_mounted());
}

#[test]
fn kill_mode_refuses_network_rings_and_programs_with_eperm() {
    refused_with_eperm("kill");
}

#[test]
fn log_mode_refuses_them_too() {
    refused_with_eperm("log");
}

#[test]
fn an_unlisted_system_call_kills_the_daemon_by_default() {
    let mut m = Mount::with_setup(|src| fs::write(src.join("f"), b"x").unwrap(), &[]);
    let answer = probe(&m, "unlisted");
    assert!(
        answer.is_err(),
        "the daemon answered {answer:?} instead of dying\n{}",
        m.daemon_output()
    );
    let status = m
        .wait_exit(EXIT_TIMEOUT)
        .expect("the daemon did not exit after the unlisted system call");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}");
    // The dead daemon's mount answers, with an error, instead of hanging.
    let err = fs::read(m.path("f")).unwrap_err();
    assert!(
        err.raw_os_error()
            .is_some_and(|e| common::is_gone_errno(e) || e == libc::ENOENT),
        "{err}"
    );
}

#[test]
fn log_mode_only_logs_an_unlisted_system_call() {
    let mut m = Mount::new();
    fs::write(m.src_path("f"), b"still served").unwrap();
    m.start(&["--seccomp=log", "--sandbox=none"]);
    assert_eq!(probe(&m, "unlisted"), Ok(0));
    assert_eq!(fs::read(m.path("f")).unwrap(), b"still served");
    assert!(m.try_wait().is_none(), "{}", m.daemon_output());
}

#[test]
#[cfg(target_arch = "x86_64")]
fn without_seccomp_the_default_warns_once_and_an_explicit_request_fails() {
    // Asked for explicitly, the mount fails with one line and leaves no
    // mount behind.
    for mode in ["kill", "log"] {
        let mut m = Mount::new();
        m.daemon_pre_exec = Some(hide_seccomp);
        let src = m.src().to_path_buf();
        let mnt = m.mnt().to_path_buf();
        let status = m
            .run_to_exit(
                &[
                    &format!("--seccomp={mode}"),
                    src.to_str().unwrap(),
                    mnt.to_str().unwrap(),
                ],
                EXIT_TIMEOUT,
            )
            .expect("the daemon did not exit");
        assert_eq!(status.code(), Some(1), "{}", m.daemon_output());
        let stderr = m.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with(&format!(
                "throttlefs: seccomp={mode}: this kernel cannot filter system calls"
            )),
            "{stderr}"
        );
        assert!(!m.is_mounted());
    }

    // Not given: one warning, and a daemon that serves without the filter
    // (its threads have only the test's).
    let mut m = Mount::new();
    m.daemon_pre_exec = Some(hide_seccomp);
    fs::write(m.src_path("f"), b"served").unwrap();
    m.start(&[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"served");
    for (name, _, filters) in thread_seccomp(m.pid()) {
        assert_eq!(filters, "1", "thread {name}: only the test's filter");
    }
    let warnings = m
        .stderr()
        .matches("seccomp: this kernel cannot filter system calls")
        .count();
    assert_eq!(warnings, 1, "{}", m.stderr());
}
