//! The guarantees at queue depth: asynchronous direct I/O (Linux AIO, as
//! QEMU's `aio=native` and fio's libaio engine issue it) reaches throttlefs
//! as many concurrent requests (FUSE_ASYNC_DIO), and every rule must still
//! hold with dozens of them queued at once.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;
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
