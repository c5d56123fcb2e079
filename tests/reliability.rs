//! Reliability under stress and failure: shutdown by signal or unmount with
//! many requests queued, a busy `fusermount3 -u`, `kill -9` during a write
//! load (acknowledged writes are in the source, a fresh mount replaces the
//! dead one), fsync ordering behind queued writes from several threads, and
//! errors of the underlying filesystem (ENOSPC, unlinked and truncated
//! files) reaching the caller as they would on a plain filesystem.
//!
//! Requests use O_DIRECT and at most 256 KiB, so each read or write reaches
//! throttlefs as one FUSE request (or two for 256 KiB writes) and waits in
//! its file's queue; `user.throttle.stats` (`waiting=`) tells how many wait.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::attrs::{cpath, getxattr};
use common::{
    EXIT_TIMEOUT, KIB, MIB, MOUNT_TIMEOUT, Mount, binary, describe, is_mounted, open_direct,
    pattern, run_unchecked,
};

const STATS: &str = "user.throttle.stats";

/// Size of every request in the shutdown tests.
const REQ: usize = 64 * KIB as usize;

/// How long every queued request and the daemon get after a signal or an
/// unmount.
const ANSWER_BOUND: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers

/// `waiting=` of `user.throttle.stats` of `path`: requests queued in the
/// throttle right now. Read in-process with getxattr(2) (no external tool:
/// keeps the counts exact).
fn waiting(path: &Path) -> u64 {
    let raw = getxattr(path, STATS)
        .unwrap_or_else(|e| panic!("cannot read {STATS} of {}: {e}", path.display()));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let stats: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    stats
        .get("waiting")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no waiting= in {STATS} of {}: {text:?}", path.display()))
}

/// The errno of `res`, or a panic naming `what` if it succeeded.
fn errno_of<T>(res: io::Result<T>, what: &str) -> i32 {
    match res {
        Ok(_) => panic!("{what}: succeeded, an error was expected"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn assert_no_panic(m: &Mount) {
    assert!(
        !m.stderr().contains("panicked"),
        "the daemon panicked\n{}",
        m.daemon_output()
    );
}

/// Waits up to `bound` for the daemon to exit and asserts status 0 and no
/// mount left.
fn assert_exits_zero(m: &mut Mount, bound: Duration, after: &str) {
    let status = m.wait_exit(bound).unwrap_or_else(|| {
        panic!(
            "throttlefs still running {bound:?} after {after}\n{}",
            m.daemon_output()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "throttlefs exited with {status} after {after}\n{}",
        m.daemon_output()
    );
    assert!(
        !is_mounted(m.mnt()),
        "mount left behind after {after}\n{}",
        m.daemon_output()
    );
    assert_no_panic(m);
}

// ---------------------------------------------------------------------------
// A crowd of queued requests

/// One request of the crowd: which file, which chunk, read or write.
#[derive(Clone, Copy, Debug)]
struct Req {
    file: usize,
    chunk: usize,
    write: bool,
}

/// `files` files of `per_file` chunks of `REQ` bytes each, one thread per
/// chunk doing one O_DIRECT request on it (a read, or a write where
/// `writes(chunk)`), all on the same descriptor per file.
struct Crowd {
    reqs: Vec<Req>,
    files: Vec<Arc<File>>,
    rx: Receiver<(usize, Instant, io::Result<Vec<u8>>)>,
    /// (id, succeeded) of the answers received so far.
    answers: BTreeMap<usize, bool>,
    /// When the last answer came back to its thread.
    last_answer: Option<Instant>,
    /// The original content of each file.
    originals: Vec<Vec<u8>>,
}

fn file_name(f: usize) -> String {
    format!("disk{f:02}.img")
}

fn original(f: usize, per_file: usize) -> Vec<u8> {
    pattern(REQ * per_file, 1 + f as u64)
}

fn written(id: usize) -> Vec<u8> {
    pattern(REQ, 10_000 + id as u64)
}

impl Crowd {
    fn prepare(m: &Mount, files: usize, per_file: usize) {
        for f in 0..files {
            fs::write(m.src_path(&file_name(f)), original(f, per_file)).unwrap();
        }
    }

    fn start(m: &Mount, files: usize, per_file: usize, writes: impl Fn(usize) -> bool) -> Crowd {
        let handles: Vec<Arc<File>> = (0..files)
            .map(|f| Arc::new(open_direct(&m.path(&file_name(f)), true)))
            .collect();
        let (tx, rx) = mpsc::channel();
        let mut reqs = Vec::new();
        for (f, handle) in handles.iter().enumerate() {
            for chunk in 0..per_file {
                let req = Req {
                    file: f,
                    chunk,
                    write: writes(chunk),
                };
                let id = reqs.len();
                reqs.push(req);
                let file = Arc::clone(handle);
                let tx = tx.clone();
                thread::Builder::new()
                    .stack_size(256 * KIB as usize)
                    .spawn(move || {
                        let off = (chunk * REQ) as u64;
                        let res = if req.write {
                            file.write_all_at(&written(id), off).map(|_| Vec::new())
                        } else {
                            let mut buf = vec![0u8; REQ];
                            file.read_exact_at(&mut buf, off).map(|_| buf)
                        };
                        let at = Instant::now();
                        drop(file);
                        let _ = tx.send((id, at, res));
                    })
                    .expect("spawn a request thread");
            }
        }
        Crowd {
            reqs,
            files: handles,
            rx,
            answers: BTreeMap::new(),
            last_answer: None,
            originals: (0..files).map(|f| original(f, per_file)).collect(),
        }
    }

    /// Records one answer: checks it is the first for its request and, for
    /// a successful read, its data.
    fn record(&mut self, id: usize, at: Instant, res: io::Result<Vec<u8>>, errors: &[i32]) {
        let req = self.reqs[id];
        self.last_answer = self.last_answer.max(Some(at));
        match &res {
            Ok(buf) if !req.write => {
                let orig = &self.originals[req.file];
                assert!(
                    buf[..] == orig[req.chunk * REQ..(req.chunk + 1) * REQ],
                    "request {id} ({req:?}) read wrong data"
                );
            }
            Ok(_) => {}
            Err(e) => assert!(
                e.raw_os_error().is_some_and(|n| errors.contains(&n)),
                "request {id} ({req:?}) failed with {e}, expected one of errnos {errors:?}"
            ),
        }
        let previous = self.answers.insert(id, res.is_ok());
        assert!(previous.is_none(), "request {id} answered twice");
    }

    /// Takes the answers that have arrived, without waiting.
    fn drain_ready(&mut self) {
        while let Ok((id, at, res)) = self.rx.try_recv() {
            self.record(id, at, res, &[]);
        }
    }

    /// Waits until every request is either answered or counted as waiting
    /// in its file's queue, with at least `min_waiting` waiting. Returns how
    /// many wait.
    fn wait_queued(&mut self, m: &Mount, min_waiting: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let names: Vec<PathBuf> = (0..self.files.len())
            .map(|f| m.path(&file_name(f)))
            .collect();
        loop {
            self.drain_ready();
            let queued: u64 = names.iter().map(|p| waiting(p)).sum();
            let queued = queued as usize;
            if queued + self.answers.len() == self.reqs.len() && queued >= min_waiting {
                return queued;
            }
            assert!(
                Instant::now() < deadline,
                "requests did not queue within {timeout:?}: {queued} waiting, {} answered, {} \
                 issued, want at least {min_waiting} waiting\n{}",
                self.answers.len(),
                self.reqs.len(),
                m.daemon_output()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Collects every remaining answer within `bound` of `since`; each
    /// error must be one of `errors`. Then checks that no thread is left.
    fn collect_all(&mut self, since: Instant, bound: Duration, errors: &[i32]) {
        while self.answers.len() < self.reqs.len() {
            let left = bound.saturating_sub(since.elapsed());
            match self.rx.recv_timeout(left) {
                Ok((id, at, res)) => self.record(id, at, res, errors),
                Err(RecvTimeoutError::Timeout) => {
                    let missing: Vec<usize> = (0..self.reqs.len())
                        .filter(|i| !self.answers.contains_key(i))
                        .collect();
                    panic!(
                        "{} of {} requests not answered within {bound:?}: {:?}",
                        missing.len(),
                        self.reqs.len(),
                        &missing[..missing.len().min(20)]
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!("a request thread died"),
            }
        }
        // Every thread sent exactly one answer: nothing more may come.
        match self.rx.recv_timeout(Duration::from_secs(5)) {
            Err(RecvTimeoutError::Disconnected) => {}
            Ok((id, ..)) => panic!("request {id} answered twice"),
            Err(RecvTimeoutError::Timeout) => panic!("a request thread did not end"),
        }
    }

    /// Every acknowledged write is in the source, every other chunk is
    /// either the original or the write.
    fn check_source(&self, m: &Mount) {
        for f in 0..self.files.len() {
            let src = fs::read(m.src_path(&file_name(f))).unwrap();
            let orig = &self.originals[f];
            assert_eq!(src.len(), orig.len(), "{} changed size", file_name(f));
            for (id, req) in self.reqs.iter().enumerate().filter(|(_, r)| r.file == f) {
                let got = &src[req.chunk * REQ..(req.chunk + 1) * REQ];
                let acked = self.answers[&id];
                if req.write && acked {
                    assert!(
                        got == &written(id)[..],
                        "write {id} ({req:?}) was acknowledged but is not in the source"
                    );
                } else if !req.write {
                    assert!(
                        got == &orig[req.chunk * REQ..(req.chunk + 1) * REQ],
                        "chunk read by {id} ({req:?}) changed in the source"
                    );
                } else {
                    assert!(
                        got == &orig[req.chunk * REQ..(req.chunk + 1) * REQ]
                            || got == &written(id)[..],
                        "chunk of unacknowledged write {id} ({req:?}) holds neither the old \
                         nor the new data"
                    );
                }
            }
        }
    }

    fn succeeded(&self) -> usize {
        self.answers.values().filter(|ok| **ok).count()
    }
}

/// Queues `files * per_file` requests (reads, and writes where
/// `writes(chunk)`) under `limits`, sends `signal`, and checks that every
/// request is answered once, reads with the right data, acknowledged writes
/// in the source, and that the daemon exits 0 without a mount left; then a
/// request on a descriptor still open gets ENOTCONN.
fn signal_with_crowd(
    signal: libc::c_int,
    limits: &[&str],
    files: usize,
    per_file: usize,
    writes: impl Fn(usize) -> bool,
) {
    let mut m = Mount::new();
    Crowd::prepare(&m, files, per_file);
    m.start(limits);
    let mut crowd = Crowd::start(&m, files, per_file, writes);
    // Per file and direction one request goes at once; the next is only
    // released after (64 KiB - 0.1 s of the limit) / limit, seconds away.
    let total = files * per_file;
    let queued = crowd.wait_queued(&m, total * 8 / 10, Duration::from_secs(30));
    let early = crowd.answers.len();
    m.signal(signal);
    let sent = Instant::now();
    // Released requests are performed and answered: no error is allowed for
    // a request that was queued when the signal came.
    crowd.collect_all(sent, ANSWER_BOUND, &[]);
    let answered_in = crowd.last_answer.unwrap().saturating_duration_since(sent);
    eprintln!(
        "signal {signal}: {queued} queued, {early} answered before; all {total} answered {:?} \
         after it, {} succeeded",
        answered_in,
        crowd.succeeded()
    );
    assert_eq!(crowd.succeeded(), total, "every released request succeeds");
    let left = ANSWER_BOUND.saturating_sub(sent.elapsed());
    assert_exits_zero(&mut m, left, &format!("signal {signal}"));
    crowd.check_source(&m);
    // The mount was detached while the files were open: later requests on
    // them are refused by the kernel.
    let mut buf = vec![0u8; REQ];
    let e = errno_of(crowd.files[0].read_at(&mut buf, 0), "read after shutdown");
    assert!(
        common::is_gone_errno(e),
        "read on a still-open file after shutdown: errno {e}, expected ENOTCONN"
    );
}

#[test]
fn sigterm_answers_a_thousand_queued_reads_on_fifty_files() {
    // 50 files x 20 reads of 64 KiB at 16 KiB/s: one read per file goes at
    // once, the next after 3.9 s, a full queue would take 80 s per file.
    // With io_uring the daemon holds at most RING_ENTRIES_PER_CPU requests
    // of one CPU's callers, so as many files as surely fit (all on one CPU).
    let files = if common::ring_mode() {
        common::RING_ENTRIES_PER_CPU / 20
    } else {
        50
    };
    signal_with_crowd(libc::SIGTERM, &["--bps-rd", "16K"], files, 20, |_| false);
}

#[test]
fn sigint_answers_queued_reads_and_writes() {
    signal_with_crowd(
        libc::SIGINT,
        &["--bps-rd", "8K", "--bps-wr", "8K"],
        10,
        12,
        |chunk| chunk % 2 == 1,
    );
}

#[test]
fn sighup_answers_queued_writes() {
    signal_with_crowd(libc::SIGHUP, &["--bps-wr", "8K"], 4, 8, |_| true);
}

#[test]
fn lazy_umount_keeps_serving_queued_requests_until_files_close() {
    // 64 KiB requests at 64 KiB/s: after the first, one a second per file
    // and direction; 4 files x (4 reads + 4 writes) drain in about 3 s.
    let mut m = Mount::new();
    let (files, per_file) = (4, 8);
    Crowd::prepare(&m, files, per_file);
    m.start(&["--bps-rd", "64K", "--bps-wr", "64K"]);
    let mut crowd = Crowd::start(&m, files, per_file, |chunk| chunk % 2 == 1);
    let queued = crowd.wait_queued(&m, files * (per_file - 2) / 2, Duration::from_secs(20));
    // umount2(MNT_DETACH), what `umount -l` does, made in-process: running
    // umount(8) from here would stall, because exec closes the child's
    // inherited copies of the open descriptors, and each close sends a
    // FUSE_FLUSH that waits behind the queued writes.
    let mnt = cpath(m.mnt());
    // SAFETY: unmount of a NUL-terminated path.
    let r = unsafe { libc::umount2(mnt.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(r, 0, "umount -l: {}", io::Error::last_os_error());
    let detached = Instant::now();
    assert!(!is_mounted(m.mnt()), "still listed after umount -l");
    // The connection lives on while files are open: every request is
    // answered, successfully (the throttle still paces them).
    crowd.collect_all(detached, ANSWER_BOUND, &[]);
    assert_eq!(
        crowd.succeeded(),
        crowd.reqs.len(),
        "a request failed after umount -l ({queued} were queued)\n{}",
        m.daemon_output()
    );
    // The queued ones were served after the detach, not before it.
    let served_for = crowd
        .last_answer
        .unwrap()
        .saturating_duration_since(detached);
    assert!(
        served_for >= Duration::from_millis(500),
        "the last queued request was answered {served_for:?} after the detach: it was not \
         queued at detach time"
    );
    crowd.check_source(&m);
    assert!(
        m.try_wait().is_none(),
        "throttlefs exited while files were still open\n{}",
        m.daemon_output()
    );
    // Still open: new requests on the descriptors are served too.
    let mut buf = vec![0u8; REQ];
    crowd.files[0]
        .read_exact_at(&mut buf, 0)
        .expect("read on an open file after umount -l");
    assert!(buf[..] == crowd.originals[0][..REQ]);
    let fresh = pattern(REQ, 77);
    crowd.files[1]
        .write_all_at(&fresh, 0)
        .expect("write on an open file after umount -l");
    assert!(fs::read(m.src_path(&file_name(1))).unwrap()[..REQ] == fresh[..]);
    // The last close ends the connection and the daemon.
    crowd.files.clear();
    let closed = Instant::now();
    let status = m.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "throttlefs still running {EXIT_TIMEOUT:?} after the files of a lazily unmounted \
             mount were closed\n{}",
            m.daemon_output()
        )
    });
    assert_eq!(status.code(), Some(0), "{}", m.daemon_output());
    assert_no_panic(&m);
    eprintln!(
        "umount -l: {queued} queued, the last answered {served_for:?} after the detach; \
         daemon exited {:?} after the files closed",
        closed.elapsed()
    );
}

#[test]
fn busy_fusermount_unmount_is_refused_and_the_mount_keeps_working() {
    let mut m = Mount::new();
    let orig = pattern(MIB as usize, 5);
    fs::write(m.src_path("disk.img"), &orig).unwrap();
    m.start(&["--bps", "4M", "--iops", "1000"]);
    let held = open_direct(&m.path("disk.img"), true);

    let out = run_unchecked("fusermount3", &[OsStr::new("-u"), m.mnt().as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && stderr.contains("busy"),
        "fusermount3 -u of a busy mount should fail with 'busy': {}",
        describe("fusermount3", &["-u"], &out)
    );
    assert!(is_mounted(m.mnt()), "mount gone after a refused unmount");
    assert!(
        m.try_wait().is_none(),
        "throttlefs exited after a refused unmount\n{}",
        m.daemon_output()
    );

    // Reads and writes on the held file, on a new open, and a new file.
    let mut buf = vec![0u8; 256 * KIB as usize];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == orig[..buf.len()], "read after refused unmount");
    let new = pattern(128 * KIB as usize, 6);
    held.write_all_at(&new, 512 * KIB).unwrap();
    let again = open_direct(&m.path("disk.img"), false);
    let mut back = vec![0u8; new.len()];
    again.read_exact_at(&mut back, 512 * KIB).unwrap();
    assert!(back == new, "write then read after refused unmount");
    drop(again);
    fs::write(m.path("new.txt"), b"still here").unwrap();
    assert_eq!(fs::read(m.path("new.txt")).unwrap(), b"still here");
    let src = fs::read(m.src_path("disk.img")).unwrap();
    assert!(src[512 * KIB as usize..][..new.len()] == new[..]);
    assert!(src[..512 * KIB as usize] == orig[..512 * KIB as usize]);
    assert_eq!(fs::read(m.src_path("new.txt")).unwrap(), b"still here");

    // A normal SIGTERM, with the file still open, ends it.
    m.signal(libc::SIGTERM);
    assert_exits_zero(&mut m, EXIT_TIMEOUT, "SIGTERM");
    let e = errno_of(held.read_at(&mut buf, 0), "read after shutdown");
    assert!(
        common::is_gone_errno(e),
        "read on a held file after shutdown: errno {e}, expected ENOTCONN"
    );
}

// ---------------------------------------------------------------------------
// kill -9

/// A daemon started by hand on a given source and mountpoint (the harness
/// owns one daemon per mount); stopped on drop.
struct Daemon {
    child: Child,
    mnt: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn start(src: &Path, mnt: &Path, stderr: PathBuf, args: &[&str]) -> Daemon {
        let child = Command::new(binary())
            .arg("-f")
            .args(common::transport_args(args))
            .args(args)
            .arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn throttlefs");
        Daemon {
            child,
            mnt: mnt.to_path_buf(),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if self.wait_exit(EXIT_TIMEOUT).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for _ in 0..3 {
            if !is_mounted(&self.mnt) {
                break;
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One acknowledged write: where, and the seed of its pattern.
#[derive(Clone, Copy, Debug)]
struct Acked {
    file: &'static str,
    offset: u64,
    len: usize,
    seed: u64,
}

/// The error a client sees when its daemon dies.
fn is_dead_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

#[test]
fn kill_9_keeps_acknowledged_writes_and_a_new_mount_replaces_the_dead_one() {
    const WRITERS: usize = 4;
    const REGION: u64 = 4 * MIB;
    let mut m = Mount::new();
    fs::write(
        m.src_path("disk.img"),
        vec![0u8; (REGION * WRITERS as u64) as usize],
    )
    .unwrap();
    fs::write(m.src_path("sync.img"), b"").unwrap();
    let ro = pattern(4 * MIB as usize, 3);
    fs::write(m.src_path("ro.img"), &ro).unwrap();
    m.start(&["--bps-wr", "2M", "--bps-rd", "2M"]);

    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let fsynced: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let (tx, rx) = mpsc::channel::<(String, io::Error)>();
    let mut threads = Vec::new();
    // Writers: O_DIRECT writes of 64-256 KiB, each at its own offset with
    // its own pattern, until the daemon dies.
    for t in 0..WRITERS {
        let file = open_direct(&m.path("disk.img"), true);
        let (acked, tx) = (Arc::clone(&acked), tx.clone());
        threads.push(thread::spawn(move || {
            let mut off = t as u64 * REGION;
            for k in 0.. {
                let len = (64 + 64 * (k % 4)) as usize * KIB as usize;
                let seed = 1000 * t as u64 + k as u64;
                if off + len as u64 > (t as u64 + 1) * REGION {
                    let _ = tx.send((format!("writer {t}"), io::Error::other("region full")));
                    return;
                }
                match file.write_all_at(&pattern(len, seed), off) {
                    Ok(()) => acked.lock().unwrap().push(Acked {
                        file: "disk.img",
                        offset: off,
                        len,
                        seed,
                    }),
                    Err(e) => {
                        let _ = tx.send((format!("writer {t} write {k}"), e));
                        return;
                    }
                }
                off += len as u64;
            }
        }));
    }
    // A syncer: buffered writes, each followed by fsync.
    {
        let file = OpenOptions::new()
            .write(true)
            .open(m.path("sync.img"))
            .unwrap();
        let (fsynced, tx) = (Arc::clone(&fsynced), tx.clone());
        threads.push(thread::spawn(move || {
            for k in 0u64.. {
                let len = 96 * KIB as usize;
                let seed = 50_000 + k;
                let offset = k * len as u64;
                let res = file
                    .write_all_at(&pattern(len, seed), offset)
                    .and_then(|_| file.sync_all());
                match res {
                    Ok(()) => fsynced.lock().unwrap().push(Acked {
                        file: "sync.img",
                        offset,
                        len,
                        seed,
                    }),
                    Err(e) => {
                        let _ = tx.send((format!("syncer {k}"), e));
                        return;
                    }
                }
            }
        }));
    }
    // A reader: every successful read returns the right data.
    {
        let file = open_direct(&m.path("ro.img"), false);
        let tx = tx.clone();
        threads.push(thread::spawn(move || {
            let len = 128 * KIB as usize;
            for k in 0usize.. {
                let off = (k * len) % ro.len();
                let mut buf = vec![0u8; len];
                match file.read_exact_at(&mut buf, off as u64) {
                    Ok(()) => assert!(
                        buf[..] == ro[off..off + len],
                        "read {k} at {off} returned wrong data"
                    ),
                    Err(e) => {
                        let _ = tx.send((format!("reader {k}"), e));
                        return;
                    }
                }
            }
        }));
    }
    drop(tx);

    // Kill once writes are queued and some have been acknowledged.
    let ok = wait_until(Duration::from_secs(20), || {
        acked.lock().unwrap().len() >= WRITERS && waiting(&m.path("disk.img")) >= 2
    });
    assert!(ok, "writes did not queue\n{}", m.daemon_output());
    thread::sleep(Duration::from_millis(300));
    let queued_at_kill = waiting(&m.path("disk.img"));
    m.signal(libc::SIGKILL);
    let killed = Instant::now();
    let status = m.wait_exit(EXIT_TIMEOUT).expect("SIGKILL ends the daemon");
    assert_eq!(status.signal(), Some(libc::SIGKILL));

    // Every client gets an error from the dead connection, promptly.
    let mut errors = Vec::new();
    while errors.len() < threads.len() {
        let left = Duration::from_secs(15).saturating_sub(killed.elapsed());
        match rx.recv_timeout(left) {
            Ok(e) => errors.push(e),
            Err(e) => panic!(
                "only {} of {} clients returned after kill -9 ({e:?}): {errors:?}",
                errors.len(),
                threads.len()
            ),
        }
    }
    for t in threads {
        t.join().expect("a client thread panicked (wrong data?)");
    }
    for (who, e) in &errors {
        assert!(
            is_dead_connection(e),
            "{who}: got {e} after kill -9, expected ENOTCONN or ECONNABORTED"
        );
    }

    // Every acknowledged write is in the source.
    let acked = acked.lock().unwrap().clone();
    let fsynced = fsynced.lock().unwrap().clone();
    eprintln!(
        "kill -9 with {queued_at_kill} writes queued: {} writes and {} fsyncs acknowledged",
        acked.len(),
        fsynced.len()
    );
    assert!(
        !fsynced.is_empty(),
        "no fsync was acknowledged before the kill"
    );
    let sources: BTreeMap<&str, Vec<u8>> = ["disk.img", "sync.img"]
        .into_iter()
        .map(|n| (n, fs::read(m.src_path(n)).unwrap()))
        .collect();
    for w in acked.iter().chain(&fsynced) {
        let src = &sources[w.file];
        let range = w.offset as usize..w.offset as usize + w.len;
        assert!(
            src.len() >= range.end && src[range] == pattern(w.len, w.seed)[..],
            "acknowledged write {w:?} is not in the source"
        );
    }

    // The dead mount is still there; a new daemon detaches it by itself.
    let stat = fs::metadata(m.mnt());
    assert!(
        stat.as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)),
        "mountpoint after kill -9: {stat:?}"
    );
    let mut again = Daemon::start(
        m.src(),
        m.mnt(),
        m.root().join("second.stderr"),
        &["--bps-wr", "2M"],
    );
    let up = wait_until(MOUNT_TIMEOUT, || {
        fs::metadata(m.path("disk.img")).is_ok() || again.child.try_wait().unwrap().is_some()
    });
    assert!(
        up && again.child.try_wait().unwrap().is_none(),
        "the new daemon did not mount on the stale mountpoint: {}",
        again.stderr()
    );
    assert!(
        again.stderr().contains("detached a stale FUSE mount"),
        "no 'detached a stale FUSE mount' message: {}",
        again.stderr()
    );
    let through = fs::read(m.path("disk.img")).unwrap();
    assert!(
        through == sources["disk.img"],
        "the new mount shows other data than the source"
    );
    let new = pattern(64 * KIB as usize, 99);
    let file = open_direct(&m.path("disk.img"), true);
    file.write_all_at(&new, 0).unwrap();
    let mut back = vec![0u8; new.len()];
    file.read_exact_at(&mut back, 0).unwrap();
    assert!(back == new);
    drop(file);
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(again.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = again
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("new daemon did not exit: {}", again.stderr()));
    assert_eq!(status.code(), Some(0), "{}", again.stderr());
    assert!(
        !is_mounted(m.mnt()),
        "a mount (the new one or the stale one) is left: {}",
        again.stderr()
    );
    assert!(!again.stderr().contains("panicked"), "{}", again.stderr());
}

// ---------------------------------------------------------------------------
// fsync and flush ordering

// ---------------------------------------------------------------------------
// Unmount right after a client with thousands of open files exits

/// Files the client holds open when it exits.
const MANY_FILES: usize = 3000;
/// Descriptors the daemon (one for each open file and one for each inode)
/// and the client need, with room to spare.
const MANY_FILES_NOFILE: usize = 4 * MANY_FILES;

/// Such an exit leaves thousands of RELEASEs in the kernel's background
/// queue; an unmount at once aborts the connection under them, and the
/// daemon's late replies fail with ENODEV or ENOENT. That is a normal
/// unmount: the daemon exits 0 and logs no ERROR.
#[test]
fn unmount_right_after_a_client_with_thousands_of_open_files_logs_no_error() {
    let mut m = Mount::with_setup(
        |src| {
            for i in 0..MANY_FILES {
                File::create(src.join(format!("f{i}"))).unwrap();
            }
        },
        &[],
    );
    // The daemon inherits our descriptor limit, which may be 1024.
    let nofile = format!("--nofile={MANY_FILES_NOFILE}:{MANY_FILES_NOFILE}");
    let pid = m.pid().to_string();
    let out = run_unchecked("prlimit", &["--pid", &pid, &nofile]);
    assert!(
        out.status.success(),
        "{}",
        describe("prlimit", &["--pid", &pid, &nofile], &out)
    );

    // The client opens them all, says so, and waits to be killed.
    let script = format!(
        "ulimit -n {MANY_FILES_NOFILE} && for i in $(seq 0 {}); do exec {{fd}}<\"$1/f$i\" || exit 1; done && echo ready && exec sleep 600",
        MANY_FILES - 1
    );
    let mut client = Command::new("bash")
        .args(["-c", &script, "client"])
        .arg(m.mnt())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let mut ready = String::new();
    io::BufRead::read_line(
        &mut io::BufReader::new(client.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    if ready.trim() != "ready" {
        let _ = client.kill();
        let _ = client.wait();
        panic!(
            "the client could not open {MANY_FILES} files\n{}",
            m.daemon_output()
        );
    }
    client.kill().unwrap();
    client.wait().unwrap();
    // Unmount at once, in-process, while its RELEASEs are being answered.
    let mnt = cpath(m.mnt());
    // SAFETY: umount(2) on a NUL-terminated path we own.
    let rc = unsafe { libc::umount(mnt.as_ptr()) };
    assert_eq!(rc, 0, "umount: {}", io::Error::last_os_error());
    assert_exits_zero(&mut m, ANSWER_BOUND, "umount");
    let stderr = m.stderr();
    assert!(
        !stderr.contains("ERROR"),
        "an unmount logged errors\n{}",
        m.daemon_output()
    );
}

/// Queues writes from four threads, then runs `barrier` (fsync, or the
/// close of another descriptor, which sends FUSE_FLUSH) on a descriptor of
/// the same file from a fifth thread, and checks that it returns only once
/// all four writes are in the source.
///
/// bps_wr=256K: a 256 KiB write fills the bucket; then four 128 KiB writes
/// queue, released about 0.5 s apart, the last no earlier than 2.3 s after
/// the first write.
///
/// For fsync the kernel already waits for direct writes in flight on the
/// inode before sending FUSE_FSYNC (it takes the inode lock that they hold
/// shared), so this checks the whole path; FUSE_FLUSH reaches throttlefs at
/// once, so the close variant checks throttlefs's own barrier.
fn barrier_waits_for_writes_queued_by_other_threads(what: &str, barrier: fn(File)) {
    const WRITERS: usize = 4;
    let chunk = 128 * KIB as usize;
    let mut m = Mount::new();
    fs::write(m.src_path("disk.img"), vec![0u8; 2 * MIB as usize]).unwrap();
    m.start(&["--bps-wr", "256K"]);
    let path = m.path("disk.img");
    let first = open_direct(&path, true);
    first
        .write_all_at(&pattern(256 * KIB as usize, 1), 0)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    for i in 0..WRITERS {
        let file = open_direct(&path, true);
        let tx = tx.clone();
        thread::spawn(move || {
            let off = MIB + (i * chunk) as u64;
            let res = file.write_all_at(&pattern(chunk, 20 + i as u64), off);
            let _ = tx.send((i, res));
        });
    }
    drop(tx);
    let ok = wait_until(Duration::from_secs(10), || waiting(&path) == WRITERS as u64);
    assert!(ok, "the writes did not queue: waiting={}", waiting(&path));

    let syncer = OpenOptions::new().write(true).open(&path).unwrap();
    let src_path = m.src_path("disk.img");
    let issued = Instant::now();
    let (synced, src) = thread::spawn(move || {
        barrier(syncer);
        let synced = Instant::now();
        (synced, fs::read(src_path).unwrap())
    })
    .join()
    .unwrap_or_else(|_| panic!("{what} failed"));
    let took = synced.duration_since(issued);
    for i in 0..WRITERS {
        let off = MIB as usize + i * chunk;
        assert!(
            src[off..off + chunk] == pattern(chunk, 20 + i as u64)[..],
            "{what} returned after {took:?} but queued write {i} was not in the source yet"
        );
    }
    // (When each writer thread sees its answer is not compared with when
    // the barrier returned: the daemon answers the write first, but the
    // kernel may wake the barrier's thread first.)
    for _ in 0..WRITERS {
        let (i, res) = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("a queued write never completed");
        res.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    // The last queued write is released 2.3 s or more after the first one;
    // the barrier was issued less than 0.9 s after it (all four waited).
    assert!(
        took >= Duration::from_secs(1),
        "{what} returned after {took:?}, before the queued writes could be released"
    );
    eprintln!("{what} returned {took:?} after it was issued");
    m.terminate();
}

#[test]
fn fsync_waits_for_writes_queued_by_other_threads() {
    barrier_waits_for_writes_queued_by_other_threads("fsync", |f| f.sync_all().expect("fsync"));
}

#[test]
fn close_waits_for_writes_queued_by_other_threads() {
    barrier_waits_for_writes_queued_by_other_threads("close", drop);
}

// ---------------------------------------------------------------------------
// Errors of the underlying filesystem

/// A size-limited tmpfs mounted on a directory; unmounted (lazily, since
/// the daemon may still hold files) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = run_unchecked(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("tmpfs"),
                OsStr::new("-o"),
                OsStr::new(&format!("size={size}")),
                OsStr::new("tmpfs"),
                dir.as_os_str(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            describe("mount", &["-t", "tmpfs"], &out)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// How long the space of a removed file may take to come back: the daemon
/// answers the kernel's FORGET within milliseconds even on a loaded machine.
const SPACE_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes free for unprivileged use on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let path = cpath(dir);
    // SAFETY: statvfs(3) on a NUL-terminated path into a zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    assert_eq!(
        rc,
        0,
        "statvfs {}: {}",
        dir.display(),
        io::Error::last_os_error()
    );
    st.f_bavail * st.f_frsize
}

fn underlying_errors_reach_the_caller(limits: &[&str]) {
    let mut m = Mount::new();
    let _tmpfs = Tmpfs::mount(m.src(), "4m");
    let gone = pattern(256 * KIB as usize, 1);
    let cut = pattern(256 * KIB as usize, 2);
    fs::write(m.src_path("gone.img"), &gone).unwrap();
    fs::write(m.src_path("cut.img"), &cut).unwrap();
    m.start(limits);

    // ENOSPC, buffered and O_DIRECT, not EIO.
    let mut fill = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(m.path("fill.img"))
        .unwrap();
    let block = pattern(256 * KIB as usize, 3);
    let mut total = 0;
    let err = loop {
        match fill.write(&block) {
            Ok(0) => panic!("write returned 0"),
            Ok(n) => total += n,
            Err(e) => break e,
        }
        assert!(
            total < 16 * MIB as usize,
            "wrote {total} bytes to a 4 MiB tmpfs"
        );
    };
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "filling the source through the mount: got {err} after {total} bytes"
    );
    drop(fill);
    let direct = open_direct(&m.path("fill.img"), true);
    let e = errno_of(
        direct.write_all_at(&block, 8 * MIB),
        "O_DIRECT write to a full source",
    );
    assert_eq!(e, libc::ENOSPC, "O_DIRECT write to a full source");
    drop(direct);
    assert!(
        m.try_wait().is_none(),
        "daemon died on ENOSPC\n{}",
        m.daemon_output()
    );
    // Space freed: writes work again. Not at once: the daemon holds each
    // inode it was told about until the kernel's FORGET, which the kernel
    // queues as unlink() returns and the daemon serves on another thread
    // (a RELEASE, sent after close() returns, may also still be on its way).
    // No later syscall waits for either, so wait, bounded, for the space.
    fs::remove_file(m.path("fill.img")).unwrap();
    let freed = wait_until(SPACE_BACK_TIMEOUT, || {
        free_bytes(m.src()) >= 2 * block.len() as u64
    });
    assert!(
        freed,
        "{} bytes free in the source {SPACE_BACK_TIMEOUT:?} after the full file was removed",
        free_bytes(m.src())
    );
    fs::write(m.path("after.img"), &block).unwrap();
    assert!(fs::read(m.src_path("after.img")).unwrap() == block);

    // Deleted underneath while open: the open file keeps working.
    let file = open_direct(&m.path("gone.img"), true);
    fs::remove_file(m.src_path("gone.img")).unwrap();
    let mut buf = vec![0u8; gone.len()];
    file.read_exact_at(&mut buf, 0)
        .expect("read of a file deleted underneath");
    assert!(buf == gone, "file deleted underneath: wrong data");
    let patch = pattern(64 * KIB as usize, 4);
    file.write_all_at(&patch, 64 * KIB)
        .expect("write to a file deleted underneath");
    file.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[64 * KIB as usize..][..patch.len()] == patch[..]);
    assert!(buf[..64 * KIB as usize] == gone[..64 * KIB as usize]);
    // Its name is gone once the kernel's 1 s entry cache expires.
    let mut last = None;
    let vanished = wait_until(Duration::from_secs(5), || {
        let r = fs::metadata(m.path("gone.img"));
        let enoent = r
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT));
        last = Some(r);
        enoent
    });
    assert!(
        vanished,
        "lookup of a name deleted underneath: {last:?}, expected ENOENT"
    );
    let e = errno_of(File::open(m.path("gone.img")), "open of a deleted name");
    assert_eq!(e, libc::ENOENT);
    drop(file);

    // Truncated underneath: reads come back short, then empty.
    let file = open_direct(&m.path("cut.img"), false);
    OpenOptions::new()
        .write(true)
        .open(m.src_path("cut.img"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let mut buf = vec![0u8; 64 * KIB as usize];
    let n = file.read_at(&mut buf, 0).expect("read after truncation");
    assert_eq!(n, 1000, "read of a file truncated underneath to 1000 bytes");
    assert!(buf[..n] == cut[..n]);
    let n = file
        .read_at(&mut buf, 128 * KIB)
        .expect("read past the new end");
    assert_eq!(n, 0, "read past the end of a file truncated underneath");
    let sized = wait_until(Duration::from_secs(5), || {
        fs::metadata(m.path("cut.img")).is_ok_and(|md| md.len() == 1000)
    });
    assert!(sized, "size through the mount never became 1000");
    File::create(m.src_path("cut.img")).unwrap();
    let n = file
        .read_at(&mut buf, 0)
        .expect("read after truncation to 0");
    assert_eq!(n, 0, "read of a file truncated underneath to 0");
    drop(file);

    assert!(m.try_wait().is_none(), "daemon died\n{}", m.daemon_output());
    assert_no_panic(&m);
    let status = m.terminate();
    assert_eq!(status.code(), Some(0), "{}", m.daemon_output());
    assert_no_panic(&m);
}

#[test]
fn underlying_errors_reach_the_caller_unthrottled() {
    underlying_errors_reach_the_caller(&[]);
}

#[test]
fn underlying_errors_reach_the_caller_throttled() {
    underlying_errors_reach_the_caller(&["--bps-wr", "100M", "--bps-rd", "100M"]);
}
