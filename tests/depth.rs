//! The guarantees at queue depth: asynchronous direct I/O (Linux AIO, as
//! QEMU's `aio=native` and fio's libaio engine issue it) reaches throttlefs
//! as many concurrent requests (FUSE_ASYNC_DIO), and every rule must still
//! hold with dozens of them queued at once.

mod common;

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::aio::{Aio, Completion, Request};
use common::attrs::stats;
use common::{KIB, MIB, Mount, loose_upper, open_direct, pattern};

/// Size of the small reads: one page, one operation.
const PAGE_BYTES: usize = 4096;

/// The earliest time, after the first request was submitted to an idle file,
/// at which the k-th release (in time order) can happen, for requests that
/// each charge `charge` units to one bucket leaking at `avg` units/s that
/// holds avg/10 (no burst): k·charge units were added before it, and it can
/// go only once the level is back down to avg/10. Seconds, exact.
fn earliest_releases(n: usize, charge: u64, avg: u64) -> Vec<f64> {
    let capacity = avg as f64 / 10.0;
    (0..n)
        .map(|k| ((k as u64 * charge) as f64 - capacity).max(0.0) / avg as f64)
        .collect()
}

/// Strict lower bound: the k-th completion (in time order) came no earlier
/// than the k-th release the model allows, measured from `start` (taken
/// before the submission; a request completes after its release).
fn assert_not_early(what: &str, start: Instant, done: &[Completion], model: &[f64]) {
    let mut at: Vec<f64> = done
        .iter()
        .map(|c| c.at.duration_since(start).as_secs_f64())
        .collect();
    at.sort_by(f64::total_cmp);
    for (k, (got, earliest)) in at.iter().zip(model).enumerate() {
        // One nanosecond for the f64 rounding of the model.
        assert!(
            *got >= earliest - 1e-9,
            "{what}: completion #{k} at {got:.4} s, before the earliest release the limit \
             allows ({earliest:.4} s): the throttle let I/O go early"
        );
    }
}

/// `waiting=` of the file's `user.throttle.stats`.
fn waiting(path: &Path) -> u64 {
    stats(path)["waiting"]
}

/// Creates `name` in the source with `len` pattern bytes (seed) and returns
/// them.
fn source_file(m: &Mount, name: &str, len: usize, seed: u64) -> Vec<u8> {
    let data = pattern(len, seed);
    fs::write(m.src_path(name), &data).unwrap();
    data
}

/// `n` page reads at pages 0, 1, 2, ... of `file`.
fn page_reads(file: &File, n: usize) -> Vec<Request> {
    (0..n)
        .map(|i| Request::read(file.as_raw_fd(), (i * PAGE_BYTES) as u64, PAGE_BYTES))
        .collect()
}

/// Asserts every completion is a full read of the right bytes of `data`.
fn assert_reads_correct(what: &str, done: &[Completion], data: &[u8]) {
    for c in done {
        assert_eq!(
            c.res,
            c.buf.len() as i64,
            "{what}: read {} at {} returned {}",
            c.id,
            c.offset,
            c.res
        );
        let off = c.offset as usize;
        assert!(
            c.buf[..] == data[off..off + c.buf.len()],
            "{what}: read {} at {} returned wrong data",
            c.id,
            c.offset
        );
    }
}

/// Strict FIFO bound at depth. The kernel queues the requests of one
/// io_submit on /dev/fuse in submission order, but throttlefs reads them
/// with `session_threads` threads, each holding one request between its
/// read(2) and the hand-over to the scheduler; so when request k reaches
/// the scheduler at most `session_threads - 1` earlier ones can still be
/// missing there. Request k is therefore released no earlier than release
/// number k - (session_threads - 1) of the model; a scheduler that let it
/// overtake more would release it earlier. (An earlier request whose
/// thread stalls may be released late; only overtaking is bounded.)
fn assert_fifo(
    what: &str,
    start: Instant,
    done: &[Completion],
    first_id: u64,
    model: &[f64],
    session_threads: usize,
) {
    for c in done {
        let k = (c.id - first_id) as usize;
        let earliest = model[k.saturating_sub(session_threads - 1)];
        let got = c.at.duration_since(start).as_secs_f64();
        assert!(
            got >= earliest - 1e-9,
            "{what}: request #{k} completed at {got:.4} s, before {earliest:.4} s: it \
             overtook more than {} requests submitted before it",
            session_threads - 1
        );
    }
}

/// Polls the file's `waiting=` until every one of `n` requests submitted at
/// `start` has reached the throttle: waiting + the releases the model allows
/// by then >= n. False if that is not seen before `until` (since `start`).
fn all_queued(path: &Path, n: usize, start: Instant, model: &[f64], until: Duration) -> bool {
    loop {
        let w = waiting(path) as usize;
        let t = start.elapsed();
        let released_at_most = model.iter().filter(|r| **r <= t.as_secs_f64()).count();
        if w + released_at_most >= n {
            return true;
        }
        if t >= until {
            eprintln!("{w} waiting at {t:?}, at most {released_at_most} released");
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// FUSE session threads throttlefs runs with `--io-threads 2` (it runs
/// io_threads of them, at least 2).
const TWO_SESSION_THREADS: usize = 2;
/// The same with the default `--io-threads` (8).
const DEFAULT_SESSION_THREADS: usize = 8;

#[test]
fn async_reads_reach_the_daemon_together() {
    // iops_rd=20: the bucket holds 2 ops, so 3 reads go at once and the
    // other 29 are released 50 ms apart, the last at 1.45 s. Served one at a
    // time (no FUSE_ASYNC_DIO), io_submit itself would block until then and
    // the queue would never hold more than one.
    const N: usize = 32;
    const IOPS: u64 = 20;
    let mut m = Mount::new();
    let data = source_file(&m, "disk.img", N * PAGE_BYTES, 1);
    m.start(&["--iops-rd", &IOPS.to_string()]);
    let path = m.path("disk.img");
    let file = open_direct(&path, false);
    let mut aio = Aio::new(N);
    let model = earliest_releases(N, 1, IOPS);
    let last = model[N - 1];
    let start = Instant::now();
    let first = aio.submit(page_reads(&file, N))[0];
    let submit_took = start.elapsed();
    assert!(
        submit_took.as_secs_f64() < last / 2.0,
        "io_submit of {N} reads blocked for {submit_took:?}: they were served one at a time"
    );
    assert!(
        all_queued(&path, N, start, &model, Duration::from_secs_f64(last / 2.0)),
        "the {N} reads were never all queued in the throttle together"
    );
    let done = aio.reap_all(Duration::from_secs_f64(loose_upper(last)));
    let took = done.iter().map(|c| c.at - start).max().unwrap();
    eprintln!("io_submit {submit_took:?}, last completion {took:?} (model {last:.3} s)");
    assert_reads_correct("32 async reads", &done, &data);
    assert_not_early("32 async reads", start, &done, &model);
    assert_fifo(
        "32 async reads",
        start,
        &done,
        first,
        &model,
        DEFAULT_SESSION_THREADS,
    );
    common::assert_elapsed_between("32 async reads", took, last, loose_upper(last));
}

#[test]
fn fifo_at_depth_64() {
    // iops_rd=100: 11 reads go at once (the bucket holds 10 ops), then one
    // every 10 ms: the 64th at 0.53 s.
    const N: usize = 64;
    const IOPS: u64 = 100;
    let mut m = Mount::new();
    let data = source_file(&m, "disk.img", N * PAGE_BYTES, 2);
    m.start(&["--iops-rd", &IOPS.to_string(), "--io-threads", "2"]);
    let file = open_direct(&m.path("disk.img"), false);
    let mut aio = Aio::new(N);
    let model = earliest_releases(N, 1, IOPS);
    let last = model[N - 1];
    let start = Instant::now();
    let first = aio.submit(page_reads(&file, N))[0];
    let done = aio.reap_all(Duration::from_secs_f64(loose_upper(last) + 5.0));
    let order: Vec<u64> = done.iter().map(|c| c.id - first).collect();
    eprintln!("completion order {order:?}");
    assert_reads_correct("64 async reads", &done, &data);
    assert_not_early("64 async reads", start, &done, &model);
    assert_fifo(
        "64 async reads",
        start,
        &done,
        first,
        &model,
        TWO_SESSION_THREADS,
    );
    let took = done.iter().map(|c| c.at - start).max().unwrap();
    common::assert_elapsed_between("64 async reads", took, last, loose_upper(last));
}

/// 32 async 64 KiB O_DIRECT writes queue behind `--bps-wr 2M` (the last
/// released at 0.87 s); once all have reached the throttle, a barrier
/// (fsync(2), or an AIO fdatasync when `aio_barrier`) must return only with
/// every one of them in the source file.
fn barrier_at_depth(aio_barrier: bool) {
    const N: usize = 32;
    const WRITE_BYTES: usize = 64 * KIB as usize;
    const BPS: u64 = 2 * MIB;
    let mut m = Mount::new();
    let mut expected = source_file(&m, "disk.img", N * WRITE_BYTES, 3);
    m.start(&["--bps-wr", "2M"]);
    let path = m.path("disk.img");
    let file = open_direct(&path, true);
    let mut aio = Aio::new(N + 1);
    let model = earliest_releases(N, WRITE_BYTES as u64, BPS);
    let last = model[N - 1];
    let writes: Vec<Request> = (0..N)
        .map(|i| {
            let data = pattern(WRITE_BYTES, 100 + i as u64);
            expected[i * WRITE_BYTES..(i + 1) * WRITE_BYTES].copy_from_slice(&data);
            Request::write(file.as_raw_fd(), (i * WRITE_BYTES) as u64, &data)
        })
        .collect();
    let start = Instant::now();
    let ids = aio.submit(writes);
    // The barrier covers the writes that reached throttlefs before it.
    assert!(
        all_queued(&path, N, start, &model, Duration::from_secs(5)),
        "the {N} writes did not all reach the throttle"
    );
    let mut done = Vec::new();
    if aio_barrier {
        let sync_id = aio.submit(vec![Request::fsync(
            file.as_raw_fd(),
            common::aio::Op::Fdsync,
        )])[0];
        let deadline = Instant::now() + Duration::from_secs_f64(loose_upper(last));
        loop {
            let batch = aio.reap(1, deadline.saturating_duration_since(Instant::now()));
            assert!(!batch.is_empty(), "the AIO fdatasync did not complete");
            let mut synced = false;
            for c in batch {
                if c.id == sync_id {
                    assert_eq!(c.res, 0, "AIO fdatasync failed");
                    assert_eq!(
                        done.len(),
                        N,
                        "fdatasync completed before all {N} earlier writes"
                    );
                    synced = true;
                } else {
                    done.push(c);
                }
            }
            if synced {
                break;
            }
        }
    } else {
        file.sync_all().expect("fsync");
    }
    let synced_at = start.elapsed();
    // Checked at once: the barrier promised the writes are in the source.
    let src = fs::read(m.src_path("disk.img")).unwrap();
    if let Some(i) = (0..N).find(|i| {
        src[i * WRITE_BYTES..(i + 1) * WRITE_BYTES]
            != expected[i * WRITE_BYTES..(i + 1) * WRITE_BYTES]
    }) {
        panic!("the barrier returned at {synced_at:?} but write #{i} is not in the source");
    }
    eprintln!(
        "barrier returned at {synced_at:?} (last write released at {last:.3} s at the earliest)"
    );
    assert!(
        synced_at.as_secs_f64() >= last,
        "the barrier returned at {synced_at:?}, before the last write could be released"
    );
    done.extend(aio.reap_all(Duration::from_secs(5)));
    assert_eq!(done.len(), N);
    for c in &done {
        assert!(ids.contains(&c.id));
        assert_eq!(
            c.res, WRITE_BYTES as i64,
            "write {} returned {}",
            c.id, c.res
        );
    }
    assert_not_early("32 async writes", start, &done, &model);
}

#[test]
fn fsync_waits_for_async_writes_queued_at_depth() {
    barrier_at_depth(false);
}

#[test]
fn aio_fdatasync_waits_for_async_writes_queued_at_depth() {
    barrier_at_depth(true);
}

/// A child `fio` reading `path` with `args` (on top of direct I/O, 4 KiB
/// blocks and threads, so that a signal to the process reaches every job),
/// its output discarded.
fn spawn_fio(path: &Path, args: &[&str]) -> Child {
    Command::new("fio")
        .arg("--name=depth")
        .arg(format!("--filename={}", path.display()))
        .args(["--direct=1", "--bs=4k", "--thread", "--group_reporting"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}

/// Waits up to `timeout` for `child` to be reaped; when.
fn reap_within(child: &mut Child, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls until the file's `waiting=` is at least `n`; false after `timeout`.
fn waiting_reaches(path: &Path, n: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while waiting(path) < n {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// One O_DIRECT page read at `offset` through a new descriptor; when it
/// completed.
fn read_page_at(path: &Path, offset: u64, data: &[u8]) -> Instant {
    let file = open_direct(path, false);
    let mut aio = Aio::new(1);
    aio.submit(vec![Request::read(file.as_raw_fd(), offset, PAGE_BYTES)]);
    let done = aio.reap_all(Duration::from_secs(30));
    assert_reads_correct("the next read", &done, data);
    done[0].at
}

/// A fio run killed while its reads wait behind `--iops-rd iops`, as
/// `kill_fio_with_queued_reads` leaves it.
struct KilledRun {
    /// Kept mounted until the run is dropped.
    _mount: Mount,
    path: std::path::PathBuf,
    data: Vec<u8>,
    start: Instant,
    /// Requests still queued right after the kill.
    in_queue: u64,
    /// How long after SIGKILL the process was reaped, and when.
    reap_took: Duration,
    reaped: Instant,
    /// The file's stats after the reap.
    after: std::collections::BTreeMap<String, u64>,
}

/// Starts fio with `fio_args` on a file of 64 pages under `--iops-rd
/// iops`, waits until `queued_at_least` reads wait in the throttle, kills
/// it with SIGKILL, and reaps it within `reap_limit(in_queue)`.
fn kill_fio_with_queued_reads(
    iops: u64,
    seed: u64,
    fio_args: &[&str],
    queued_at_least: u64,
    reap_limit: impl Fn(u64) -> Duration,
) -> KilledRun {
    const N: usize = 64;
    let mut m = Mount::new();
    let data = source_file(&m, "disk.img", N * PAGE_BYTES, seed);
    m.start(&["--iops-rd", &iops.to_string()]);
    let path = m.path("disk.img");
    let start = Instant::now();
    let mut fio = spawn_fio(&path, fio_args);
    let queued = waiting_reaches(&path, queued_at_least, Duration::from_secs(10));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(fio.id() as libc::pid_t, libc::SIGKILL) };
    let killed = Instant::now();
    assert!(
        queued,
        "fio's {N} reads never queued (waiting={})",
        waiting(&path)
    );
    let in_queue = waiting(&path);
    let reaped = reap_within(&mut fio, reap_limit(in_queue)).expect("the killed fio never exited");
    let after = stats(&path);
    eprintln!(
        "{in_queue} queued at the kill; reaped {:?} after; {} performed",
        reaped - killed,
        after["read_ops"]
    );
    KilledRun {
        _mount: m,
        path,
        data,
        start,
        in_queue,
        reap_took: reaped - killed,
        reaped,
        after,
    }
}

impl KilledRun {
    /// The queue is empty, and the next read goes no earlier than the
    /// reads really performed allow (strict); returns when it completed,
    /// after the reap.
    fn next_read_after_reap(&self, iops: u64) -> Duration {
        assert_eq!(
            self.after["waiting"], 0,
            "requests left in the queue: {:?}",
            self.after
        );
        let performed = self.after["read_ops"] as usize;
        let model = earliest_releases(performed + 1, 1, iops);
        let next = read_page_at(&self.path, 0, &self.data) - self.start;
        eprintln!("next read at {next:?}, earliest {:.3} s", model[performed]);
        assert!(
            next.as_secs_f64() >= model[performed],
            "the next read went at {next:?}, before the {performed} performed reads allow"
        );
        Instant::now() - self.reaped
    }
}

#[test]
fn killed_process_with_64_queued_reads_is_cancelled_and_charges_nothing() {
    // 64 fio threads each block in one O_DIRECT read behind iops_rd=10
    // (2 go at once, then one every 100 ms: the 64th at 6.2 s). SIGKILL
    // interrupts every queued one (FUSE_INTERRUPT): the process is reaped at
    // once, the queue empties, and the next read goes when the reads that
    // really happened allow, not 6 s later.
    const IOPS: u64 = 10;
    let run = kill_fio_with_queued_reads(
        IOPS,
        4,
        &[
            "--ioengine=psync",
            "--rw=read",
            "--numjobs=64",
            "--time_based",
            "--runtime=60",
        ],
        48,
        |_| Duration::from_secs(30),
    );
    // Without cancellation the 48+ queued reads keep it for 4.8 s or more.
    assert!(
        run.reap_took < Duration::from_millis(2500),
        "the killed process was reaped only {:?} after SIGKILL",
        run.reap_took
    );
    // Had the cancelled reads been charged, the next read would wait for
    // all of them (several seconds).
    let next_after_reap = run.next_read_after_reap(IOPS);
    assert!(
        next_after_reap < Duration::from_millis(1500),
        "the next read waited {next_after_reap:?} after the cancellation: the cancelled \
         reads were charged"
    );
}

#[test]
fn killed_process_with_64_queued_async_reads_is_answered() {
    // The kernel sends no FUSE_INTERRUPT for asynchronous requests and makes
    // the exiting process wait for its AIO, so a killed fio's 64 async reads
    // are not cancelled: throttlefs must answer each at its release time
    // (iops_rd=100: the 64th at 0.53 s), after which the process is reaped,
    // the queue is empty, and the next read goes as those charges allow.
    const IOPS: u64 = 100;
    // Each queued read is released 10 ms after the previous one.
    let bound = |in_queue: u64| loose_upper(in_queue as f64 / IOPS as f64);
    let run = kill_fio_with_queued_reads(
        IOPS,
        5,
        &[
            "--ioengine=libaio",
            "--rw=randread",
            "--iodepth=64",
            "--iodepth_batch_submit=64",
            "--time_based",
            "--runtime=60",
        ],
        40,
        |in_queue| Duration::from_secs_f64(bound(in_queue) + 30.0),
    );
    let limit = bound(run.in_queue);
    assert!(
        run.reap_took.as_secs_f64() <= limit,
        "the killed process was reaped {:?} after SIGKILL, more than {limit:.3} s",
        run.reap_took
    );
    let next_after_reap = run.next_read_after_reap(IOPS);
    common::assert_elapsed_between("the next read", next_after_reap, 0.0, loose_upper(0.01));
}

#[test]
fn sigterm_answers_128_queued_async_requests_exactly_once() {
    // Four files, 32 async 64 KiB requests each, behind 64 KiB/s per
    // direction: one per file and direction goes at once, the rest would
    // take half a minute. Files 0 and 1 are read, file 2 written, file 3
    // both. SIGTERM releases them all: each is answered once, reads with the
    // right data, writes into the source, and the daemon exits 0.
    const FILES: usize = 4;
    const PER_FILE: usize = 32;
    const REQ_BYTES: usize = 64 * KIB as usize;
    let mut m = Mount::new();
    let names: Vec<String> = (0..FILES).map(|f| format!("disk{f}.img")).collect();
    let mut expected: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(f, name)| source_file(&m, name, PER_FILE * REQ_BYTES, 10 + f as u64))
        .collect();
    let originals = expected.clone();
    m.start(&["--bps-rd", "64K", "--bps-wr", "64K"]);
    let files: Vec<File> = names
        .iter()
        .map(|n| open_direct(&m.path(n), true))
        .collect();
    let is_write = |f: usize, i: usize| f == 2 || (f == 3 && i % 2 == 1);
    let mut reqs = Vec::new();
    for i in 0..PER_FILE {
        for (f, file) in files.iter().enumerate() {
            let off = i * REQ_BYTES;
            if is_write(f, i) {
                let data = pattern(REQ_BYTES, 1000 + (f * PER_FILE + i) as u64);
                expected[f][off..off + REQ_BYTES].copy_from_slice(&data);
                reqs.push(Request::write(file.as_raw_fd(), off as u64, &data));
            } else {
                reqs.push(Request::read(file.as_raw_fd(), off as u64, REQ_BYTES));
            }
        }
    }
    let mut aio = Aio::new(FILES * PER_FILE);
    aio.submit(reqs);
    // At most one read and one write per file can have gone.
    let min_queued = FILES * PER_FILE - 5;
    let all_in = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        names.iter().map(|n| waiting(&m.path(n))).sum::<u64>() as usize >= min_queued
    });
    assert!(all_in, "the 128 requests did not all queue");
    m.signal(libc::SIGTERM);
    let done = aio.reap_all(Duration::from_secs(20));
    assert_eq!(aio.stray_events(), 0, "a request was answered twice");
    let fd_file: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    for c in &done {
        let f = fd_file.iter().position(|fd| *fd == c.fd).unwrap();
        let off = c.offset as usize;
        assert_eq!(
            c.res, REQ_BYTES as i64,
            "{:?} of file {f} at {off} returned {} after SIGTERM",
            c.op, c.res
        );
        if c.op == common::aio::Op::Read {
            assert!(
                c.buf[..] == originals[f][off..off + REQ_BYTES],
                "read of file {f} at {off} returned wrong data"
            );
        }
    }
    drop(aio);
    drop(files);
    let status = m
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", m.daemon_output()));
    assert_eq!(status.code(), Some(0), "{}", m.daemon_output());
    for (f, name) in names.iter().enumerate() {
        assert!(
            fs::read(m.src_path(name)).unwrap() == expected[f],
            "{name}: an acknowledged write is missing from the source"
        );
    }
}

/// xorshift64: the test's own reproducible randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A request of the fsx run, while in flight.
struct FsxOp {
    offset: usize,
    len: usize,
    write: bool,
    /// For a read: the model's bytes when it was submitted.
    expected: Vec<u8>,
}

impl FsxOp {
    /// Whether running both at once would make the result depend on their
    /// order: they overlap and one of them writes.
    fn conflicts(&self, other: &FsxOp) -> bool {
        (self.write || other.write)
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }
}

/// fsx at depth: `ops` random reads and writes of 4 KiB - 1 MiB, up to 32
/// in flight, on `path` (as long as `initial`, its current content),
/// checked against an in-memory model. Requests in flight never conflict,
/// so each read has exactly one right answer, the model when it was
/// submitted. Returns the final model.
fn fsx_at_depth(path: &Path, initial: Vec<u8>, ops: usize, seed: u64) -> Vec<u8> {
    const DEPTH: usize = 32;
    const MAX_REQ_BYTES: usize = MIB as usize;
    let len = initial.len();
    let mut model = initial;
    let mut rng = Rng(seed);
    let file = open_direct(path, true);
    let mut aio = Aio::new(DEPTH);
    let mut in_flight: HashMap<u64, FsxOp> = HashMap::new();
    let mut submitted = 0;
    let mut depth_reached = 0;
    while submitted < ops || !in_flight.is_empty() {
        let mut batch: Vec<FsxOp> = Vec::new();
        let mut tries = 0;
        while submitted + batch.len() < ops && in_flight.len() + batch.len() < DEPTH && tries < 16 {
            tries += 1;
            // 4 KiB x 2^0..8; one time in four a 512 B-granular size and
            // offset, which takes the daemon's unaligned (buffered) path.
            let (mut size, mut granule) = ((4 * KIB as usize) << rng.below(9), 4 * KIB as usize);
            if rng.below(4) == 0 {
                granule = 512;
                size -= 512 * rng.below(8) as usize;
            }
            debug_assert!(size <= MAX_REQ_BYTES);
            let offset = rng.below(((len - size) / granule + 1) as u64) as usize * granule;
            let op = FsxOp {
                offset,
                len: size,
                write: rng.below(2) == 0,
                expected: Vec::new(),
            };
            if in_flight.values().chain(&batch).any(|o| o.conflicts(&op)) {
                continue;
            }
            batch.push(op);
        }
        if !batch.is_empty() {
            let mut reqs = Vec::with_capacity(batch.len());
            for op in &mut batch {
                let range = op.offset..op.offset + op.len;
                if op.write {
                    let data = pattern(op.len, seed ^ (submitted as u64 + reqs.len() as u64 + 1));
                    model[range].copy_from_slice(&data);
                    reqs.push(Request::write(file.as_raw_fd(), op.offset as u64, &data));
                } else {
                    op.expected = model[range].to_vec();
                    reqs.push(Request::read(file.as_raw_fd(), op.offset as u64, op.len));
                }
            }
            submitted += batch.len();
            let ids = aio.submit(reqs);
            in_flight.extend(ids.into_iter().zip(batch));
            depth_reached = depth_reached.max(in_flight.len());
        }
        for c in aio.reap(1, Duration::from_secs(60)) {
            let op = in_flight.remove(&c.id).expect("a request in flight");
            let what = if op.write { "write" } else { "read" };
            assert_eq!(
                c.res, op.len as i64,
                "{what} of {} at {} returned {} (seed {seed})",
                op.len, op.offset, c.res
            );
            if !op.write && c.buf[..] != op.expected[..] {
                let i = c
                    .buf
                    .iter()
                    .zip(&op.expected)
                    .position(|(a, b)| a != b)
                    .unwrap();
                panic!(
                    "read of {} at {} differs from the model at byte {} (seed {seed})",
                    op.len,
                    op.offset,
                    op.offset + i
                );
            }
        }
    }
    assert!(
        depth_reached >= DEPTH / 2,
        "only {depth_reached} requests were ever in flight"
    );
    model
}

/// Runs two fsx streams at depth 32 at once, one file under bps=16M (the
/// run moves about 35 MiB, 7 MiB of it in flight at a time, so requests
/// queue), one without limits (served inline); both are checked against a
/// model, then byte for byte against the source. `env` goes to the daemon;
/// returns its stderr (it runs with -v).
fn fsx_pair(env: &[(&str, &str)]) -> String {
    const FILE_BYTES: usize = 8 * MIB as usize;
    const OPS: usize = 150;
    let mut m = Mount::new();
    m.daemon_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut handles = Vec::new();
    let mut files = Vec::new();
    for (name, seed) in [("limited.img", 0x5eed_0001u64), ("free.img", 0x5eed_0002)] {
        files.push((name, seed, source_file(&m, name, FILE_BYTES, seed)));
    }
    m.start(&["-v"]);
    for (name, seed, initial) in files {
        let path = m.path(name);
        if name == "limited.img" {
            common::attrs::sys_set_attr(&path, "user.throttle.bps", "16M");
        }
        let src = m.src_path(name);
        handles.push(std::thread::spawn(move || {
            let model = fsx_at_depth(&path, initial, OPS, seed);
            let through = fs::read(&path).unwrap();
            assert!(
                through == model,
                "{}: the mount's content differs from the model",
                path.display()
            );
            assert!(
                fs::read(&src).unwrap() == model,
                "{}: the source differs from the model",
                src.display()
            );
        }));
    }
    for h in handles {
        h.join().expect("fsx thread");
    }
    let limited = stats(&m.path("limited.img"));
    assert!(
        limited["wait_ns"] > 0,
        "the limited file never queued: {limited:?}"
    );
    m.stderr()
}

#[test]
fn fsx_at_depth_32_throttled_and_unthrottled() {
    let log = fsx_pair(&[]);
    // Where the kernel has io_uring (it does where this suite is run), the
    // released requests went through the ring workers.
    if !log.contains("no io_uring") {
        assert!(log.contains("I/O on io_uring"), "daemon log:\n{log}");
    }
}

#[test]
fn fsx_at_depth_32_on_blocking_workers() {
    // The fallback where io_uring is missing or refused.
    let log = fsx_pair(&[("THROTTLEFS_NO_IO_URING", "1")]);
    assert!(
        log.contains("blocking workers"),
        "the daemon did not fall back to blocking workers:\n{log}"
    );
}

/// How long each fio run issues I/O.
const FIO_RUNTIME_SECS: u64 = 3;

/// The loose lower band of the fio tests: the rate fio gets, over its own
/// runtime, against the limit. Loose because the machine running the tests
/// may be starved of CPU; a throttle that waited twice too long fails it.
const FIO_RATE_MIN_FRACTION: f64 = 0.5;

/// Runs fio's libaio engine (random reads) on a file mounted with `limit`
/// for FIO_RUNTIME_SECS with `args`, and checks what was released against
/// the limit's rate `avg` (ops/s when each request charges `charge` = 1,
/// else bytes/s and `charge` = the request size): strictly no more than the
/// bucket (avg/10) plus one request plus avg x the wall time fio ran, both
/// as fio counts and as the daemon's stats count, and at least
/// FIO_RATE_MIN_FRACTION of avg over fio's runtime.
fn fio_at_depth(limit: &[&str], args: &[&str], avg: u64, charge: u64) {
    const FILE_BYTES: usize = 64 * MIB as usize;
    let mut m = Mount::new();
    source_file(&m, "disk.img", FILE_BYTES, 6);
    m.start(limit);
    let path = m.path("disk.img");
    let out = m.src().parent().unwrap().join("fio.json");
    let start = Instant::now();
    let status = Command::new("timeout")
        .args(["-k", "5", "60", "fio", "--name=depth"])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--output={}", out.display()))
        .args(["--output-format=json", "--direct=1", "--ioengine=libaio"])
        .args(["--rw=randread", "--time_based", "--norandommap"])
        .arg(format!("--runtime={FIO_RUNTIME_SECS}"))
        .args(args)
        .stdin(Stdio::null())
        .status()
        .expect("run fio");
    let wall = start.elapsed().as_secs_f64();
    assert!(status.success(), "fio failed: {status}");
    let jq = common::run(
        "jq",
        &[
            std::ffi::OsStr::new("-r"),
            std::ffi::OsStr::new(".jobs[0].read | \"\\(.total_ios) \\(.io_bytes) \\(.runtime)\""),
            out.as_os_str(),
        ],
    );
    let fields: Vec<u64> = String::from_utf8_lossy(&jq.stdout)
        .split_whitespace()
        .map(|f| f.parse().expect("fio number"))
        .collect();
    let (ios, bytes, runtime_ms) = (fields[0], fields[1], fields[2]);
    let daemon = stats(&path);
    let released = if charge == 1 {
        daemon["read_ops"]
    } else {
        daemon["read_bytes"]
    };
    let moved = if charge == 1 { ios } else { bytes };
    // Releases by time t after the first: level = k x charge - avg x t must
    // have been <= avg/10 before each.
    let ceiling = avg as f64 / 10.0 + charge as f64 + avg as f64 * wall;
    let rate = moved as f64 / (runtime_ms as f64 / 1000.0);
    eprintln!(
        "fio {args:?} {limit:?}: {ios} I/Os, {bytes} B in {runtime_ms} ms ({rate:.0}/s); \
         daemon released {released}; ceiling over {wall:.3} s wall: {ceiling:.0}"
    );
    assert!(
        (released as f64) <= ceiling && (moved as f64) <= ceiling,
        "more than the limit allows in {wall:.3} s: fio {moved}, daemon {released}, ceiling {ceiling:.0}"
    );
    assert!(
        rate >= FIO_RATE_MIN_FRACTION * avg as f64,
        "fio got {rate:.0}/s, far below the limit {avg}/s"
    );
}

#[test]
fn fio_randread_4k_depth_32_iops_limit() {
    fio_at_depth(
        &["--iops-rd", "1000"],
        &["--bs=4k", "--iodepth=32"],
        1000,
        1,
    );
}

#[test]
fn fio_randread_4k_depth_128_iops_limit() {
    fio_at_depth(
        &["--iops-rd", "1000"],
        &["--bs=4k", "--iodepth=128"],
        1000,
        1,
    );
}

#[test]
fn fio_randread_1m_depth_16_bps_limit() {
    fio_at_depth(
        &["--bps-rd", "10M"],
        &["--bs=1M", "--iodepth=16"],
        10 * MIB,
        MIB,
    );
}
