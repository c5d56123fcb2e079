//! Cancellation: a queued request whose caller is killed is removed from
//! the queue, answered EINTR (the kernel sends FUSE_INTERRUPT), and charges
//! nothing to the file's buckets. A caller that only catches a signal keeps
//! its place and gets its data.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::attrs::stats;
use common::{KIB, MIB, Mount, assert_elapsed_between, loose_upper, open_direct, pattern};

const LIMIT_BYTES_PER_SEC: u64 = 256 * KIB;

/// A mount over one `disk.img` of `len_bytes` pattern bytes (`seed`),
/// read-limited to `bps_rd`; returns the data too, to check reads against.
fn disk_mount(len_bytes: u64, seed: u64, bps_rd: &str) -> (Vec<u8>, Mount) {
    let data = pattern(len_bytes as usize, seed);
    let m = Mount::with_setup(
        |src| std::fs::write(src.join("disk.img"), &data).unwrap(),
        &["--bps-rd", bps_rd],
    );
    (data, m)
}

#[test]
fn killed_reader_leaves_the_queue_and_charges_nothing() {
    let (_, m) = disk_mount(4 * MIB, 7, "256K");
    let file = open_direct(&m.path("disk.img"), false);
    let start = Instant::now();
    // 512 KiB at t=0 leaves the bucket 486.4 KiB over its 25.6 KiB
    // capacity: the file's next release is at exactly 1.9 s.
    let mut buf = vec![0u8; 512 * KIB as usize];
    file.read_exact_at(&mut buf, 0).unwrap();

    // A 1 MiB read queues behind that deadline; its caller is killed.
    let mut dd = Command::new("dd")
        .arg(format!("if={}", m.path("disk.img").display()))
        .args(["of=/dev/null", "bs=1M", "count=1", "skip=1", "iflag=direct"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dd.id() as libc::pid_t, libc::SIGKILL) };
    dd.wait().unwrap();
    let killed_after = start.elapsed();
    // Without cancellation the killed caller sits in the kernel until the
    // throttle releases its read, at 1.9 s.
    assert!(
        killed_after < Duration::from_millis(1500),
        "the killed reader was only reaped after {killed_after:?}"
    );

    // Had the killed 1 MiB been charged, this read would wait until
    // 1.9 s + 1 MiB / 256 KiB/s = 5.9 s. Uncharged, it goes at 1.9 s.
    let mut small = vec![0u8; 4 * KIB as usize];
    file.read_exact_at(&mut small, 3 * MIB).unwrap();
    let elapsed = start.elapsed();
    let earliest = Duration::from_millis(1900) - Duration::from_millis(1);
    assert!(
        elapsed >= earliest,
        "the read after the cancelled one came too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "the cancelled request was charged: the next read took {elapsed:?} \
         (limit {LIMIT_BYTES_PER_SEC} B/s)"
    );
    assert_eq!(
        small,
        pattern(4 * MIB as usize, 7)[3 * MIB as usize..][..4096]
    );
}

/// Exit codes of a `Reader` child, for the assertion messages.
const CHILD_OK: i32 = 0;
const CHILD_EINTR: i32 = 3;
const CHILD_OTHER_ERROR: i32 = 4;
const CHILD_SHORT_READ: i32 = 5;
const CHILD_WRONG_DATA: i32 = 6;
const CHILD_SETUP_FAILED: i32 = 7;

/// What a child's exit code means.
fn child_outcome(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(CHILD_OK), _) => "read everything".into(),
        (Some(CHILD_EINTR), _) => "a read failed with EINTR".into(),
        (Some(CHILD_OTHER_ERROR), _) => "a read failed (not EINTR)".into(),
        (Some(CHILD_SHORT_READ), _) => "a read came back short".into(),
        (Some(CHILD_WRONG_DATA), _) => "a read returned wrong data".into(),
        (Some(CHILD_SETUP_FAILED), _) => "open, sigaction or setitimer failed".into(),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status:?}"),
    }
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// A forked child that catches SIGALRM and SIGUSR1 with a no-op SA_RESTART
/// handler (so neither is fatal, and a read it interrupts would be
/// restarted were it restartable) and reads `chunks` chunks of `chunk`
/// bytes with O_DIRECT from `offset` on, comparing each with `expect`.
/// It gives up at the first EINTR (see the exit codes above).
struct Reader {
    pid: libc::pid_t,
}

impl Reader {
    /// `alarm_every`: a SIGALRM interval timer in the child.
    fn spawn(
        path: &Path,
        offset: u64,
        chunk: usize,
        expect: &[u8],
        alarm_every: Option<Duration>,
    ) -> Reader {
        assert_eq!(expect.len() % chunk, 0);
        // Everything the child touches is made before fork: after it, the
        // child of this multithreaded process does only async-signal-safe
        // calls, no allocation.
        let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut buf = vec![0u8; chunk + 4096];
        let align = buf.as_ptr().align_offset(4096);
        // SAFETY: fork; the child below only makes raw system calls on
        // memory prepared above and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid > 0 {
            return Reader { pid };
        }
        // SAFETY: the child; see above.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGALRM, &act, std::ptr::null_mut()) != 0
                || libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut()) != 0
            {
                libc::_exit(CHILD_SETUP_FAILED);
            }
            let fd = libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_DIRECT);
            if fd < 0 {
                libc::_exit(CHILD_SETUP_FAILED);
            }
            if let Some(every) = alarm_every {
                let tv = libc::timeval {
                    tv_sec: every.as_secs() as libc::time_t,
                    tv_usec: every.subsec_micros() as libc::suseconds_t,
                };
                let timer = libc::itimerval {
                    it_interval: tv,
                    it_value: tv,
                };
                if libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) != 0 {
                    libc::_exit(CHILD_SETUP_FAILED);
                }
            }
            let data = buf.as_mut_ptr().add(align);
            for (i, want) in expect.chunks(chunk).enumerate() {
                let at = offset + (i * chunk) as u64;
                let n = libc::pread(fd, data.cast(), chunk, at as libc::off_t);
                if n < 0 {
                    let code = if *libc::__errno_location() == libc::EINTR {
                        CHILD_EINTR
                    } else {
                        CHILD_OTHER_ERROR
                    };
                    libc::_exit(code);
                }
                if n as usize != chunk {
                    libc::_exit(CHILD_SHORT_READ);
                }
                if std::slice::from_raw_parts(data, chunk) != want {
                    libc::_exit(CHILD_WRONG_DATA);
                }
            }
            libc::_exit(CHILD_OK);
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid, sig) };
    }

    fn wait(self) -> ExitStatus {
        let mut status = 0;
        // SAFETY: reaping our own child.
        let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(r, self.pid, "waitpid: {}", std::io::Error::last_os_error());
        ExitStatus::from_raw(status)
    }
}

/// Whether `pid` is in system call `nr` (the first field of
/// /proc/PID/syscall; "running" when it is not in one).
fn in_syscall(pid: libc::pid_t, nr: libc::c_long) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .is_ok_and(|s| s.split(' ').next() == Some(nr.to_string().as_str()))
}

/// Waits until `pid` is in system call `nr`, at most `timeout`.
fn wait_until_in(pid: libc::pid_t, nr: libc::c_long, timeout: Duration) {
    let start = Instant::now();
    while !in_syscall(pid, nr) {
        assert!(
            start.elapsed() < timeout,
            "child {pid} never made system call {nr}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Whether process `pid` has `path` open.
fn has_open(pid: libc::pid_t, path: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == path))
    })
}

const READ_LIMIT: &str = "1M";
const READ_LIMIT_BYTES_PER_SEC: u64 = MIB;
const CHUNK_BYTES: u64 = MIB;
const CHUNKS: u64 = 4;
/// SIGALRM period of the reader, as in the report.
const ALARM_EVERY_MS: u64 = 100;

#[test]
fn reads_interrupted_by_a_caught_signal_complete() {
    let (data, m) = disk_mount(CHUNKS * CHUNK_BYTES, 11, READ_LIMIT);
    let start = Instant::now();
    let reader = Reader::spawn(
        &m.path("disk.img"),
        0,
        CHUNK_BYTES as usize,
        &data,
        Some(Duration::from_millis(ALARM_EVERY_MS)),
    );
    let status = reader.wait();
    let elapsed = start.elapsed();
    assert_eq!(
        status.code(),
        Some(CHILD_OK),
        "reader with a SIGALRM every {ALARM_EVERY_MS} ms: {}",
        child_outcome(status)
    );
    // The first chunk goes at once and leaves the bucket a chunk less its
    // 10% burst over; each next one waits for that to leak.
    let expected = ((CHUNKS * CHUNK_BYTES) as f64 - CHUNK_BYTES as f64 - 0.1 * MIB as f64)
        / READ_LIMIT_BYTES_PER_SEC as f64;
    assert_elapsed_between(
        "4 MiB read with SIGALRMs",
        elapsed,
        expected - 0.001,
        loose_upper(expected + 1.0),
    );
}

/// The child process of `parent` running `name`, once there is one
/// (strace forks short-lived probes of its own first).
fn child_of(parent: libc::pid_t, name: &str, timeout: Duration) -> libc::pid_t {
    let start = Instant::now();
    let ppid_line = format!("PPid:\t{parent}");
    let name_line = format!("Name:\t{name}");
    loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: libc::pid_t = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let ours = status.lines().any(|l| l == ppid_line);
            (ours && status.lines().any(|l| l == name_line)).then_some(pid)
        });
        if let Some(pid) = found {
            return pid;
        }
        assert!(start.elapsed() < timeout, "{parent} started no {name}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn dd_progress_signals_do_not_fail_its_reads() {
    let (_, m) = disk_mount(CHUNKS * CHUNK_BYTES, 12, READ_LIMIT);
    // GNU dd reads again after EINTR, so it would succeed anyway: strace
    // shows whether a read of it failed.
    let trace = tempfile::NamedTempFile::new().unwrap();
    let mut strace = Command::new("strace")
        .arg("-o")
        .arg(trace.path())
        .args(["-e", "trace=read", "-e", "signal=none", "dd"])
        .arg(format!("if={}", m.path("disk.img").display()))
        .args(["of=/dev/null", "bs=1M", "iflag=direct"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace (needed by this test) runs");
    let pid = child_of(strace.id() as libc::pid_t, "dd", Duration::from_secs(20));
    // Once dd has opened its input it has its SIGUSR1 handler (SIGUSR1
    // kills it before); and then it reads.
    let start = Instant::now();
    while !has_open(pid, &m.path("disk.img")) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "dd never opened its input"
        );
        thread::sleep(Duration::from_millis(5));
    }
    wait_until_in(pid, libc::SYS_read, Duration::from_secs(20));
    let mut sent = 0;
    while strace.try_wait().unwrap().is_none() {
        // SAFETY: signalling our own grandchild, still there (strace
        // reaps it before it exits itself).
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        sent += 1;
        thread::sleep(Duration::from_millis(150));
    }
    let out = strace.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let trace = std::fs::read_to_string(trace.path()).unwrap();
    assert!(sent >= 3, "only {sent} SIGUSR1 sent to dd");
    assert!(out.status.success(), "dd failed: {stderr}");
    let failed: Vec<&str> = trace.lines().filter(|l| l.contains("EINTR")).collect();
    assert!(failed.is_empty(), "reads of dd failed: {failed:#?}");
    let total = (CHUNKS * CHUNK_BYTES).to_string();
    assert!(
        stderr.lines().last().is_some_and(|l| l.starts_with(&total)),
        "dd did not copy {total} bytes: {stderr}"
    );
}

#[test]
fn reader_killed_after_a_caught_signal_is_reaped_and_charges_nothing() {
    let (data, m) = disk_mount(4 * MIB, 13, "256K");
    let path = m.path("disk.img");
    let file = open_direct(&path, false);
    let start = Instant::now();
    // 1152 KiB at t=0 leaves the bucket 1126.4 KiB over its 25.6 KiB
    // capacity: the file's next release is at 4.4 s.
    let first = 1152 * KIB;
    let mut buf = vec![0u8; first as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    let next_release = Duration::from_millis(4400);

    let reader = Reader::spawn(
        &path,
        2 * MIB,
        MIB as usize,
        &data[2 * MIB as usize..3 * MIB as usize],
        None,
    );
    wait_until_in(reader.pid, libc::SYS_pread64, Duration::from_secs(3));
    thread::sleep(Duration::from_millis(100));
    // A caught signal first: the kernel sends its one interrupt now.
    reader.signal(libc::SIGUSR1);
    thread::sleep(Duration::from_millis(200));
    reader.signal(libc::SIGKILL);
    let killed = Instant::now();
    let status = reader.wait();
    let reaped_after = killed.elapsed();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the reader was to be killed while queued, but: {}",
        child_outcome(status)
    );
    assert!(
        start.elapsed() < next_release,
        "the test was too slow to kill the reader while queued"
    );
    assert!(
        reaped_after < Duration::from_millis(1500),
        "the killed reader was only reaped {reaped_after:?} after SIGKILL"
    );
    assert_eq!(
        stats(&path)["read_bytes"],
        first,
        "the killed read was counted"
    );

    // Charged, the killed 1 MiB would hold this read until 8.4 s.
    let mut small = vec![0u8; 4 * KIB as usize];
    file.read_exact_at(&mut small, 3 * MIB).unwrap();
    let elapsed = start.elapsed();
    assert!(
        elapsed >= next_release - Duration::from_millis(1),
        "the read after the cancelled one came too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(7500),
        "the cancelled request was charged: the next read took {elapsed:?}"
    );
    assert_eq!(small, data[3 * MIB as usize..][..4096]);
}
