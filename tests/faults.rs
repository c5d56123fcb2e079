//! Faults from the disk under the source. The source of each mount here is
//! a fault-injecting filesystem (`common::faultfs`) over a real directory,
//! which fails chosen reads, writes and fsyncs. Each test does the same
//! requests on the faulty filesystem itself and through throttlefs over it,
//! and compares:
//!
//! - every request gets the same result: the same errno (EIO on a read, a
//!   write or an fsync, ENOSPC on a write) or the same byte count (a short
//!   read or write at a bad region), at queue depth 1 and 32, throttled and
//!   not, on ring and blocking workers;
//! - `qemu-io` reports the errors as it does on the faulty filesystem;
//! - nothing hangs: every request is waited for with a timeout;
//! - `user.throttle.stats` counts what moved, and a failed request's bytes
//!   go back to its buckets (a read after failed ones goes at once), so the
//!   file and its group keep their rates; another file of the mount keeps
//!   reading at its limit while one fails;
//! - the daemon logs one line per distinct (file, operation, errno), not
//!   one per request, and counts every error in `io_errors`.

mod common;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::aio::{self, Aio};
use common::attrs::stats;
use common::faultfs::{Fault, FaultMount, FaultOp, Rule};
use common::{KIB, MIB, Mount, assert_elapsed_between, loose_upper, pattern};

/// Longer than any request here may take: a request not answered by then
/// has hung.
const HANG_TIMEOUT: Duration = Duration::from_secs(30);

/// Size of the files `a` and `b` of every rig.
const FILE_BYTES: u64 = 4 * MIB;

/// Requests of the batches, and where their faults begin.
const REQ_BYTES: usize = 64 * 1024;
const BATCH_BASE: u64 = 768 * KIB;
const BAD_START: u64 = MIB;
const BAD_END: u64 = MIB + 256 * KIB;

/// A throttlefs mount over a fault filesystem holding `a` and `b`. The
/// mount is declared first, so it is dropped (and its daemon stopped)
/// before its source goes away.
struct Rig {
    m: Mount,
    f: FaultMount,
}

fn rig(args: &[&str], env: &[(&str, &str)]) -> Rig {
    rig_with(true, args, env)
}

/// `rig`, the fault filesystem asking for FUSE_ASYNC_DIO only if
/// `async_dio`.
fn rig_with(async_dio: bool, args: &[&str], env: &[(&str, &str)]) -> Rig {
    let f = FaultMount::with_async_dio(
        |dir| {
            common::make_file(dir, "a", FILE_BYTES, 1);
            common::make_file(dir, "b", FILE_BYTES, 2);
        },
        async_dio,
    );
    let mut m = Mount::new();
    m.daemon_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.start_from(f.mnt(), args);
    Rig { m, f }
}

/// One request of a batch.
#[derive(Clone, Copy, Debug)]
enum Io {
    Read(u64, usize),
    Write(u64, usize),
    Fsync,
}

/// What a request got: bytes moved, or the errno.
type Outcome = Result<usize, i32>;

/// What a write at `offset` writes.
fn write_data(offset: u64, len: usize) -> Vec<u8> {
    pattern(len, offset + 7)
}

fn errno_of(r: isize) -> Outcome {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as usize)
    }
}

/// Runs `f` on its own thread; panics if it takes longer than
/// `HANG_TIMEOUT` (the thread is then left behind, stuck).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_TIMEOUT)
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG_TIMEOUT:?}: it hangs"))
}

/// Does `reqs` on `path` opened O_DIRECT: one after the other at depth 1,
/// else all at once with Linux AIO. The bytes each read returned and each
/// write wrote are checked against the backing file `backing`. The
/// outcomes, in the order of `reqs`.
fn run_batch(path: &Path, backing: &Path, depth: usize, reqs: &[Io]) -> Vec<Outcome> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let checked = reqs.to_vec();
    let reqs = reqs.to_vec();
    let what = format!(
        "{} requests at depth {depth} on {}",
        reqs.len(),
        path.display()
    );
    let results: Vec<(Outcome, Vec<u8>)> = within(&what, move || {
        if depth == 1 {
            reqs.iter()
                .map(|r| {
                    let fd = file.as_raw_fd();
                    match *r {
                        Io::Read(off, len) => {
                            let mut buf = aio::AlignedBuf::zeroed(len);
                            // SAFETY: buf is valid for len bytes.
                            let n = unsafe {
                                libc::pread(fd, buf.as_mut_ptr().cast(), len, off as libc::off_t)
                            };
                            let out = errno_of(n);
                            let data = buf[..out.unwrap_or(0)].to_vec();
                            (out, data)
                        }
                        Io::Write(off, len) => {
                            let buf = aio::AlignedBuf::from_slice(&write_data(off, len));
                            // SAFETY: buf is valid for len bytes.
                            let n = unsafe {
                                libc::pwrite(fd, buf.as_ptr().cast(), len, off as libc::off_t)
                            };
                            (errno_of(n), Vec::new())
                        }
                        Io::Fsync => {
                            // SAFETY: fsync of an open descriptor.
                            let r = unsafe { libc::fsync(fd) };
                            (errno_of(r as isize), Vec::new())
                        }
                    }
                })
                .collect()
        } else {
            let fd = file.as_raw_fd();
            let mut ctx = Aio::new(reqs.len());
            let ids = ctx.submit(
                reqs.iter()
                    .map(|r| match *r {
                        Io::Read(off, len) => aio::Request::read(fd, off, len),
                        Io::Write(off, len) => aio::Request::write(fd, off, &write_data(off, len)),
                        Io::Fsync => aio::Request::fsync(fd, aio::Op::Fsync),
                    })
                    .collect(),
            );
            let mut done = ctx.reap_all(HANG_TIMEOUT);
            done.sort_by_key(|c| c.id);
            assert_eq!(done.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
            drop(file);
            done.into_iter()
                .map(|c| {
                    let out = if c.res < 0 {
                        Err(-c.res as i32)
                    } else {
                        Ok(c.res as usize)
                    };
                    let data = match c.op {
                        aio::Op::Read => c.buf[..out.unwrap_or(0)].to_vec(),
                        _ => Vec::new(),
                    };
                    (out, data)
                })
                .collect()
        }
    });
    let backing = std::fs::File::open(backing).unwrap();
    results
        .into_iter()
        .zip(checked)
        .map(|((out, data), r)| {
            // What a read returned, and what a write wrote, is the backing
            // file's.
            let (off, n, got) = match (r, out) {
                (Io::Read(off, _), Ok(n)) => (off, n, data),
                (Io::Write(off, len), Ok(n)) => (off, n, write_data(off, len)[..n].to_vec()),
                _ => return out,
            };
            let mut want = vec![0u8; n];
            backing.read_exact_at(&mut want, off).unwrap();
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(
                got == want,
                "{r:?} on {}: wrong data at byte {first:?} of {n}",
                path.display()
            );
            out
        })
        .collect()
}

/// `n` reads of `REQ_BYTES` from `BATCH_BASE` on.
fn reads(n: usize) -> Vec<Io> {
    (0..n)
        .map(|i| Io::Read(BATCH_BASE + (i * REQ_BYTES) as u64, REQ_BYTES))
        .collect()
}

/// `n` writes of `REQ_BYTES` from `BATCH_BASE` on.
fn writes(n: usize) -> Vec<Io> {
    (0..n)
        .map(|i| Io::Write(BATCH_BASE + (i * REQ_BYTES) as u64, REQ_BYTES))
        .collect()
}

/// Writes as `writes`, every fourth request an fsync instead.
fn writes_and_fsyncs(n: usize) -> Vec<Io> {
    (0..n)
        .map(|i| match i % 4 {
            3 => Io::Fsync,
            _ => Io::Write(BATCH_BASE + (i * REQ_BYTES) as u64, REQ_BYTES),
        })
        .collect()
}

/// One kind of fault: the rules that make it on file `a`, the requests
/// that meet it, and an outcome the faulty filesystem itself must give to
/// one of them (the control that the fault happened).
struct Scenario {
    name: &'static str,
    rules: Vec<Rule>,
    reqs: fn(usize) -> Vec<Io>,
    control: Outcome,
    /// A read or write the faulty filesystem serves short, with this count,
    /// because of this errno on the rest: throttlefs answers that errno
    /// instead (docs/reliability.md).
    partial: Option<(usize, i32)>,
}

fn scenarios() -> Vec<Scenario> {
    let bad = BAD_START..BAD_END;
    vec![
        Scenario {
            name: "EIO on read",
            rules: vec![Rule::new(
                FaultOp::Read,
                "a",
                bad.clone(),
                Fault::Errno(libc::EIO),
            )],
            reqs: reads,
            control: Err(libc::EIO),
            partial: None,
        },
        Scenario {
            name: "EIO on write",
            rules: vec![Rule::new(
                FaultOp::Write,
                "a",
                bad.clone(),
                Fault::Errno(libc::EIO),
            )],
            reqs: writes,
            control: Err(libc::EIO),
            partial: None,
        },
        Scenario {
            name: "ENOSPC on write",
            rules: vec![Rule::new(
                FaultOp::Write,
                "a",
                bad.clone(),
                Fault::Errno(libc::ENOSPC),
            )],
            reqs: writes,
            control: Err(libc::ENOSPC),
            partial: None,
        },
        Scenario {
            name: "a short read before a bad sector",
            rules: vec![Rule::new(
                FaultOp::Read,
                "a",
                BAD_START + 1000..BAD_END,
                Fault::Partial(libc::EIO),
            )],
            reqs: reads,
            control: Ok(1000),
            partial: Some((1000, libc::EIO)),
        },
        Scenario {
            name: "EIO on fsync",
            rules: vec![Rule::new(
                FaultOp::Fsync,
                "a",
                0..1,
                Fault::Errno(libc::EIO),
            )],
            reqs: writes_and_fsyncs,
            control: Err(libc::EIO),
            partial: None,
        },
    ]
}

/// Every scenario at depth 1 and 32: each request through throttlefs (with
/// `args`, and `env` for the daemon) gets what it gets from the faulty
/// filesystem itself.
fn errors_reach_the_caller_as_from_the_faulty_filesystem(args: &[&str], env: &[(&str, &str)]) {
    let r = rig(args, env);
    let backing = r.f.backing_path("a");
    for depth in [1, 32] {
        for s in scenarios() {
            r.f.clear();
            for rule in s.rules {
                r.f.inject(rule);
            }
            let reqs = (s.reqs)(depth.max(8));
            let direct = run_batch(&r.f.path("a"), &backing, depth, &reqs);
            assert!(
                direct.contains(&s.control) && direct.contains(&Ok(REQ_BYTES)),
                "{} at depth {depth}: the faulty filesystem itself gave {direct:?}",
                s.name
            );
            let want: Vec<Outcome> = direct
                .iter()
                .map(|o| match s.partial {
                    Some((n, e)) if *o == Ok(n) => Err(e),
                    _ => *o,
                })
                .collect();
            let through = run_batch(&r.m.path("a"), &backing, depth, &reqs);
            assert_eq!(
                through, want,
                "{} at depth {depth}: through throttlefs (left), expected from the faulty filesystem's {direct:?} (right)",
                s.name
            );
        }
    }
}

#[test]
fn errors_reach_the_caller_unthrottled() {
    errors_reach_the_caller_as_from_the_faulty_filesystem(&[], &[]);
}

#[test]
fn errors_reach_the_caller_throttled() {
    errors_reach_the_caller_as_from_the_faulty_filesystem(&["--bps", "32M", "--iops", "400"], &[]);
}

#[test]
fn errors_reach_the_caller_on_blocking_workers() {
    let env = [("THROTTLEFS_NO_IO_URING", "1")];
    errors_reach_the_caller_as_from_the_faulty_filesystem(&[], &env);
    errors_reach_the_caller_as_from_the_faulty_filesystem(&["--bps", "32M", "--iops", "400"], &env);
}

/// A read served short once, the rest of the file fine: the faulty
/// filesystem's own caller gets the short count, throttlefs reads the rest
/// and returns all of it (as QEMU does with io_uring, and as a program
/// reading in a loop would), so the caller of the mount never takes a short
/// read for the end of the file (docs/reliability.md).
#[test]
fn a_transient_short_read_is_completed() {
    let r = rig(&["--bps-rd", "32M"], &[]);
    let backing = r.f.backing_path("a");
    for depth in [1, 32] {
        let reqs = reads(depth.max(8));
        for (path, want_short) in [(r.f.path("a"), true), (r.m.path("a"), false)] {
            r.f.clear();
            let rule = r.f.inject(
                Rule::new(FaultOp::Read, "a", BAD_START..BAD_END, Fault::Short(1000)).nth(0, 1),
            );
            let got = run_batch(&path, &backing, depth, &reqs);
            assert_eq!(r.f.rule(rule).injected, 1, "the short read was served");
            let shorts = got.iter().filter(|o| **o == Ok(1000)).count();
            let full = got.iter().filter(|o| **o == Ok(REQ_BYTES)).count();
            if want_short {
                assert_eq!(
                    (shorts, full),
                    (1, reqs.len() - 1),
                    "{}: {got:?}",
                    path.display()
                );
            } else {
                assert_eq!(
                    full,
                    reqs.len(),
                    "{} at depth {depth}: {got:?}",
                    path.display()
                );
            }
        }
    }
}

/// qemu-io, as QEMU would use the files (cache=none with aio=native or
/// io_uring, and its default writethrough mode), prints the same failures
/// through throttlefs as on the faulty filesystem.
#[test]
fn qemu_io_reports_the_errors() {
    let r = rig(&["--bps", "32M", "--iops", "400"], &[]);
    r.f.inject(Rule::new(
        FaultOp::Read,
        "a",
        MIB..MIB + 4096,
        Fault::Errno(libc::EIO),
    ));
    r.f.inject(Rule::new(
        FaultOp::Write,
        "a",
        2 * MIB..2 * MIB + 4096,
        Fault::Errno(libc::ENOSPC),
    ));
    r.f.inject(Rule::new(
        FaultOp::Fsync,
        "a",
        0..1,
        Fault::Errno(libc::EIO),
    ));
    let modes: [(&[&str], &[&str]); 3] = [
        (
            &["-n", "-i", "native"],
            &[
                "read failed: Input/output error",
                "write failed: No space left on device",
            ],
        ),
        (
            &["-n", "-i", "io_uring"],
            &[
                "read failed: Input/output error",
                "write failed: No space left on device",
            ],
        ),
        // Writethrough: each write is flushed, and the flush fails.
        (
            &[],
            &[
                "read failed: Input/output error",
                "write failed: No space left on device",
                "write failed: Input/output error",
            ],
        ),
    ];
    for (opts, failures) in modes {
        let mut outputs = Vec::new();
        for path in [r.f.path("a"), r.m.path("a")] {
            let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
            args.extend(opts.iter().map(|s| s.to_string()));
            for c in ["read 1M 4k", "write 2M 4k", "read 0 4k", "write 0 4k"] {
                args.push("-c".into());
                args.push(c.into());
            }
            args.push(path.display().to_string());
            let out = common::run_unchecked("qemu-io", &args);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let failed: Vec<String> = text
                .lines()
                .filter(|l| l.contains("failed"))
                .map(String::from)
                .collect();
            assert_eq!(
                failed,
                failures,
                "qemu-io {opts:?} on {}: {}",
                path.display(),
                common::describe("qemu-io", &args, &out)
            );
            assert!(
                text.contains("read 4096/4096 bytes at offset 0"),
                "qemu-io {opts:?} on {}: the good read failed: {text}",
                path.display()
            );
            outputs.push(failed);
        }
        assert_eq!(outputs[0], outputs[1]);
    }
}

/// `count` reads (or writes) of `len` bytes at the offsets `offset(i)`,
/// at `depth`, all of which must fail with `errno`; the time they took.
fn failing(
    path: &Path,
    depth: usize,
    write: bool,
    len: usize,
    count: usize,
    errno: i32,
) -> Duration {
    let offset = |i: usize| (i * len) as u64 % (2 * MIB);
    let reqs: Vec<Io> = (0..count)
        .map(|i| match write {
            true => Io::Write(offset(i), len),
            false => Io::Read(offset(i), len),
        })
        .collect();
    let start = Instant::now();
    let got = run_batch(path, Path::new("/dev/null"), depth, &reqs);
    let took = start.elapsed();
    assert!(
        got.iter().all(|o| *o == Err(errno)),
        "{} at depth {depth}: {got:?}",
        path.display()
    );
    took
}

/// A failed request moves nothing: it is not in the byte and operation
/// counts, its bytes go back to the buckets of its file and group (so the
/// next request goes at once, however many failed before it), and it is
/// counted in `io_errors`. At 1 MiB/s, the failed reads and writes here
/// would take about 8 s each way were they charged.
#[test]
fn failed_requests_move_nothing_and_give_their_bytes_back() {
    for (args, group) in [
        (&["--bps-rd", "1M", "--bps-wr", "1M"][..], false),
        (&["--group", "g:bps_rd=1M,bps_wr=1M"][..], true),
    ] {
        let r = rig(args, &[]);
        let a = r.m.path("a");
        if group {
            common::setfattr(&a, "user.throttle.group", "g");
        }
        r.f.inject(Rule::new(
            FaultOp::Read,
            "a",
            0..2 * MIB,
            Fault::Errno(libc::EIO),
        ));
        r.f.inject(Rule::new(
            FaultOp::Write,
            "a",
            0..2 * MIB,
            Fault::Errno(libc::ENOSPC),
        ));
        let bound = Duration::from_secs(2);
        for (write, errno) in [(false, libc::EIO), (true, libc::ENOSPC)] {
            let t1 = failing(&a, 1, write, MIB as usize, 4, errno);
            let t32 = failing(&a, 32, write, 128 * 1024, 32, errno);
            assert!(
                t1 < bound && t32 < bound,
                "{args:?}: 4 MiB of failed {} took {t1:?} at depth 1 and {t32:?} at depth 32",
                if write { "writes" } else { "reads" }
            );
            // A good request of 1 MiB right after them goes at once: what
            // failed left the buckets empty.
            let good = if write {
                vec![Io::Write(2 * MIB, MIB as usize)]
            } else {
                vec![Io::Read(2 * MIB, MIB as usize)]
            };
            let start = Instant::now();
            let got = run_batch(&a, &r.f.backing_path("a"), 1, &good);
            assert_eq!(got, vec![Ok(MIB as usize)]);
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{args:?}: a good request after failed ones waited {:?}",
                start.elapsed()
            );
        }
        let s = stats(&a);
        let moved = (
            s["read_bytes"],
            s["read_ops"],
            s["write_bytes"],
            s["write_ops"],
        );
        assert_eq!(moved, (MIB, 1, MIB, 1), "{args:?}: {s:?}");
        assert_eq!(s["io_errors"], 2 * (4 + 32), "{args:?}: {s:?}");
        assert_eq!(s["waiting"], 0);
        if group {
            let g = common::getfattr(r.m.mnt(), "user.throttle.group.g.stats").unwrap_or_default();
            for (name, value) in [("read_bytes", MIB), ("write_bytes", MIB)] {
                assert!(g.contains(&format!("{name}={value}\n")), "group stats: {g}");
            }
        }
    }
}

/// While one file's reads fail at depth 32 without a pause, another file
/// of the mount reads at its limit, and every failed request is answered.
#[test]
fn another_file_keeps_its_rate_while_one_fails() {
    let r = rig(&["--bps-rd", "2M"], &[]);
    r.f.inject(Rule::new(
        FaultOp::Read,
        "a",
        0..FILE_BYTES,
        Fault::Errno(libc::EIO),
    ));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let failed = std::sync::Arc::new(AtomicU64::new(0));
    let hammer = {
        let (stop, failed, a) = (stop.clone(), failed.clone(), r.m.path("a"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                failing(&a, 32, false, REQ_BYTES, 32, libc::EIO);
                failed.fetch_add(32, Ordering::Relaxed);
            }
        })
    };
    let req = 256 * 1024;
    let reqs: Vec<Io> = (0..FILE_BYTES / req)
        .map(|i| Io::Read(i * req, req as usize))
        .collect();
    let start = Instant::now();
    let got = run_batch(&r.m.path("b"), &r.f.backing_path("b"), 1, &reqs);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    hammer.join().expect("the failing reader");
    assert!(got.iter().all(|o| *o == Ok(req as usize)), "{got:?}");
    let avg = 2.0 * MIB as f64;
    let lower = (FILE_BYTES as f64 - req as f64 - avg * 0.1) / avg;
    assert_elapsed_between("4 MiB of b at bps_rd=2M", elapsed, lower, loose_upper(2.0));
    let failed = failed.load(Ordering::Relaxed);
    assert!(
        failed >= 64,
        "only {failed} failed reads of a were answered meanwhile"
    );
    assert_eq!(stats(&r.m.path("a"))["io_errors"], failed);
    assert_eq!(stats(&r.m.path("b"))["read_bytes"], FILE_BYTES);
}

/// The daemon logs each distinct (file, operation, errno) once, however
/// often it recurs, at depth 1 and 32, throttled and not; nothing else
/// at its default level.
#[test]
fn each_distinct_error_is_logged_once() {
    for args in [&[][..], &["--bps", "64M"]] {
        let mut r = rig(args, &[]);
        let bad = BAD_START..BAD_END;
        r.f.inject(Rule::new(
            FaultOp::Read,
            "a",
            bad.clone(),
            Fault::Errno(libc::EIO),
        ));
        r.f.inject(Rule::new(
            FaultOp::Write,
            "a",
            bad.clone(),
            Fault::Errno(libc::ENOSPC),
        ));
        r.f.inject(Rule::new(
            FaultOp::Fsync,
            "a",
            0..1,
            Fault::Errno(libc::EIO),
        ));
        r.f.inject(Rule::new(
            FaultOp::Read,
            "b",
            bad.clone(),
            Fault::Errno(libc::EIO),
        ));
        let (a, b) = (r.m.path("a"), r.m.path("b"));
        let len = 4096;
        let in_bad = |i: usize| BAD_START + (i * len) as u64;
        let batch = |write: bool, n: usize| -> Vec<Io> {
            (0..n)
                .map(|i| match write {
                    true => Io::Write(in_bad(i), len),
                    false => Io::Read(in_bad(i), len),
                })
                .collect()
        };
        let null = Path::new("/dev/null");
        let mut expected = [0u64; 2];
        for depth in [1, 32] {
            for (path, file, write) in [(&a, 0, false), (&a, 0, true), (&b, 1, false)] {
                let got = run_batch(path, null, depth, &batch(write, 32));
                assert!(got.iter().all(Result::is_err), "{got:?}");
                expected[file] += 32;
            }
            let got = run_batch(&a, null, depth, &[Io::Fsync, Io::Fsync, Io::Fsync]);
            assert_eq!(got, vec![Err(libc::EIO); 3]);
            expected[0] += 3;
        }
        assert_eq!(stats(&a)["io_errors"], expected[0], "{args:?}");
        assert_eq!(stats(&b)["io_errors"], expected[1], "{args:?}");
        r.m.terminate();
        let log = r.m.stderr();
        let loud: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        let (fa, fb) = (r.f.path("a"), r.f.path("b"));
        let want = [
            format!("read of {} failed: Input/output error", fa.display()),
            format!("write of {} failed: No space left on device", fa.display()),
            format!("fsync of {} failed: Input/output error", fa.display()),
            format!("read of {} failed: Input/output error", fb.display()),
        ];
        for w in &want {
            let n = loud.iter().filter(|l| l.contains(w.as_str())).count();
            assert_eq!(n, 1, "{args:?}: {n} lines with {w:?} in the log:\n{log}");
        }
        assert_eq!(
            loud.len(),
            want.len(),
            "{args:?}: other lines in the log:\n{log}"
        );
    }
}

/// On a FUSE source that does not ask for FUSE_ASYNC_DIO (fuser's
/// default), Linux's io_uring reads the rest of a short read at the old
/// offset, so a read at the end of a file there comes back full of
/// repeated data. The daemon reads every FUSE source with pread, so
/// through the mount, also on ring workers (throttled, and at depth), a
/// read at the end returns what is there and a transient short read is
/// completed with the right bytes (`run_batch` checks them).
#[test]
fn reads_of_a_fuse_source_without_async_dio_are_right() {
    for args in [&[][..], &["--bps-rd", "64M"]] {
        let r = rig_with(false, args, &[]);
        let backing = r.f.backing_path("a");
        for depth in [1, 32] {
            let mut reqs = reads(depth.max(8) - 1);
            reqs.push(Io::Read(FILE_BYTES - 1000, REQ_BYTES));
            r.f.clear();
            r.f.inject(
                Rule::new(FaultOp::Read, "a", BAD_START..BAD_END, Fault::Short(1000)).nth(0, 1),
            );
            let got = run_batch(&r.m.path("a"), &backing, depth, &reqs);
            let mut want = vec![Ok(REQ_BYTES); reqs.len()];
            *want.last_mut().unwrap() = Ok(1000);
            assert_eq!(got, want, "{args:?} at depth {depth}");
            assert_eq!(r.f.requests("a", FaultOp::Read) as usize, reqs.len() + 2);
        }
    }
}
