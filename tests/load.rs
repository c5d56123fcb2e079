//! Load (issue item 8): 64 throttled files, 16 client threads each (1024
//! in all), doing O_DIRECT reads and writes of 4-64 KiB at random aligned
//! offsets for a while. Afterwards every request issued has been answered
//! exactly once, none failed, and each file's `user.throttle.stats` counts
//! exactly the operations its clients made. The daemon's memory (VmRSS,
//! sampled every second) must stay flat after warm-up; its RSS samples and
//! CPU time per operation are printed.
//!
//! `load_5s` runs in CI; `soak_60s` is the same for 60 s (or
//! THROTTLEFS_SOAK_SECS seconds), run by name:
//! `cargo nextest run --test load --run-ignored only`.
//!
//! Each client thread counts a request when it issues the syscall and an
//! answer when the syscall returns, in shared counters, so a client stuck
//! on a lost answer shows as issued > answered when the join times out.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::attrs::{lgetxattr, lsetxattr, stats};
use common::{KIB, MIB, Mount};

const FILES: usize = 64;
const CLIENTS_PER_FILE: usize = 16;
const FILE_SIZE: u64 = MIB;
const BLOCK: u64 = 4 * KIB;
/// Requests are 1..=MAX_BLOCKS blocks (4-64 KiB).
const MAX_BLOCKS: u64 = 16;
/// Bound on how long the clients may take to finish their last request
/// after the deadline.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The RSS sample taken this long after the start is the post-warm-up
/// reference.
const WARM_UP_SECS: u64 = 2;

/// Mount-wide limits (files 0, 4, 8, ...); the others get their own limits
/// stored on the source (see `own_limits`).
const MOUNT_ARGS: &[&str] = &["--bps", "1M", "--iops", "200"];

/// Own limits of file `i`, stored as `user.throttle.*` on the source.
fn own_limits(i: usize) -> &'static [(&'static str, &'static str)] {
    match i % 4 {
        0 => &[],
        1 => &[("iops_rd", "100"), ("iops_wr", "100")],
        2 => &[("bps_rd", "524288"), ("bps_wr", "524288")],
        _ => &[("bps", "2097152"), ("iops", "300"), ("iops_size", "16384")],
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// The daemon's resident set size in KiB.
fn vm_rss_kib(pid: libc::pid_t) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn threads_of(pid: libc::pid_t) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The daemon's CPU time so far (user + system), in seconds.
fn cpu_secs(pid: libc::pid_t) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Shared counters of one client thread.
#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    answered: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
    short: AtomicU64,
}

/// What a client reports when it stops: its first error, if any.
type ClientResult = Option<String>;

fn client(
    file: Arc<File>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> ClientResult {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // An aligned buffer of the largest request.
    let max = (MAX_BLOCKS * BLOCK) as usize;
    let mut raw = vec![0u8; max + BLOCK as usize];
    let skip = raw.as_ptr().align_offset(BLOCK as usize);
    let buf = &mut raw[skip..skip + max];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u64 ^ seed) as u8;
    }
    let mut first_error = None;
    while !stop.load(Ordering::Relaxed) {
        let blocks = 1 + rng.below(MAX_BLOCKS);
        let len = (blocks * BLOCK) as usize;
        let offset = rng.below(FILE_SIZE / BLOCK - blocks + 1) * BLOCK;
        let write = rng.below(2) == 0;
        counters.issued.fetch_add(1, Ordering::SeqCst);
        let r = if write {
            file.write_at(&buf[..len], offset)
        } else {
            file.read_at(&mut buf[..len], offset)
        };
        counters.answered.fetch_add(1, Ordering::SeqCst);
        match r {
            Ok(n) => {
                let c = if write {
                    &counters.writes
                } else {
                    &counters.reads
                };
                c.fetch_add(1, Ordering::SeqCst);
                if n != len {
                    counters.short.fetch_add(1, Ordering::SeqCst);
                    first_error.get_or_insert_with(|| {
                        format!(
                            "short {}: {n} of {len} bytes at {offset}",
                            if write { "write" } else { "read" }
                        )
                    });
                }
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::SeqCst);
                first_error.get_or_insert_with(|| {
                    format!(
                        "{} of {len} bytes at {offset}: {e}",
                        if write { "write" } else { "read" }
                    )
                });
            }
        }
    }
    first_error
}

// ---------------------------------------------------------------------------
// The load run

fn run_load(duration: Duration) {
    let mut m = Mount::new();
    let data = common::pattern(FILE_SIZE as usize, 8);
    for i in 0..FILES {
        let p = m.src_path(&format!("f{i:02}"));
        fs::write(&p, &data).unwrap();
        for (limit, value) in own_limits(i) {
            let name = format!("user.throttle.{limit}");
            lsetxattr(&p, &name, value.as_bytes())
                .unwrap_or_else(|e| panic!("setxattr {name}={value} on {}: {e}", p.display()));
        }
    }
    m.start(MOUNT_ARGS);
    let pid = m.pid();

    // Every file is throttled, by the mount options or its own limits.
    for i in 0..FILES {
        let p = m.path(&format!("f{i:02}"));
        let eff = String::from_utf8_lossy(&lgetxattr(&p, "user.throttle.effective").unwrap())
            .into_owned();
        let want = if own_limits(i).is_empty() {
            "source=mount\n"
        } else {
            "source=file\n"
        };
        assert!(
            eff.starts_with(want),
            "effective limits of f{i:02}: {eff:?}"
        );
    }

    let files: Vec<Arc<File>> = (0..FILES)
        .map(|i| {
            Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(m.path(&format!("f{i:02}")))
                    .unwrap_or_else(|e| panic!("open f{i:02} O_DIRECT: {e}")),
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Vec<Arc<Counters>>> = (0..FILES)
        .map(|_| {
            (0..CLIENTS_PER_FILE)
                .map(|_| Arc::new(Counters::default()))
                .collect()
        })
        .collect();

    let cpu_start = cpu_secs(pid);
    let rss_start = vm_rss_kib(pid);
    let start = Instant::now();
    let mut handles: Vec<(usize, usize, JoinHandle<ClientResult>)> = Vec::new();
    for (i, file) in files.iter().enumerate() {
        for (c, counter) in counters[i].iter().enumerate() {
            let (file, counter, stop) = (file.clone(), counter.clone(), stop.clone());
            let seed = (i * CLIENTS_PER_FILE + c) as u64 + 1;
            let h = thread::Builder::new()
                .name(format!("f{i:02}c{c:02}"))
                .stack_size(256 * KIB as usize)
                .spawn(move || client(file, counter, stop, seed))
                .expect("spawn client");
            handles.push((i, c, h));
        }
    }
    eprintln!(
        "started {} clients in {:?}; daemon RSS before: {} KiB",
        handles.len(),
        start.elapsed(),
        rss_start
    );

    // One RSS sample a second until the deadline.
    let mut samples: Vec<(u64, u64)> = Vec::new();
    for s in 1..=duration.as_secs() {
        let at = start + Duration::from_secs(s);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let rss = vm_rss_kib(pid);
        samples.push((s, rss));
        let ops: u64 = counters
            .iter()
            .flatten()
            .map(|c| c.answered.load(Ordering::Relaxed))
            .sum();
        eprintln!(
            "t={s:>3}s daemon VmRSS {rss} KiB, threads {}, answers so far {ops}",
            threads_of(pid)
        );
    }
    stop.store(true, Ordering::SeqCst);
    let stopped = Instant::now();

    // Let in-flight requests finish, within a bound.
    let join_deadline = stopped + JOIN_TIMEOUT;
    while handles.iter().any(|(_, _, h)| !h.is_finished()) && Instant::now() < join_deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let stuck: Vec<String> = handles
        .iter()
        .filter(|(_, _, h)| !h.is_finished())
        .map(|(i, c, _)| {
            let k = &counters[*i][*c];
            format!(
                "f{i:02} client {c}: issued {} answered {}",
                k.issued.load(Ordering::SeqCst),
                k.answered.load(Ordering::SeqCst)
            )
        })
        .collect();
    assert!(
        stuck.is_empty(),
        "{} clients still waiting for an answer {JOIN_TIMEOUT:?} after the deadline (lost \
         answers?):\n{}",
        stuck.len(),
        stuck.join("\n")
    );
    let drain = stopped.elapsed();
    let mut errors = Vec::new();
    for (i, c, h) in handles {
        match h.join() {
            Ok(None) => {}
            Ok(Some(e)) => errors.push(format!("f{i:02} client {c}: {e}")),
            Err(_) => errors.push(format!("f{i:02} client {c} panicked")),
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu_secs(pid) - cpu_start;
    let rss_end = vm_rss_kib(pid);

    // Per client: every request answered exactly once, none failed.
    let mut total_ops = 0;
    let mut per_file: Vec<(u64, u64)> = Vec::new();
    for (i, clients) in counters.iter().enumerate() {
        let (mut reads, mut writes) = (0, 0);
        for (c, k) in clients.iter().enumerate() {
            let issued = k.issued.load(Ordering::SeqCst);
            let answered = k.answered.load(Ordering::SeqCst);
            assert_eq!(
                answered, issued,
                "f{i:02} client {c}: {issued} requests issued, {answered} answered"
            );
            let r = k.reads.load(Ordering::SeqCst);
            let w = k.writes.load(Ordering::SeqCst);
            let e = k.errors.load(Ordering::SeqCst);
            assert_eq!(
                r + w + e,
                answered,
                "f{i:02} client {c}: answers miscounted"
            );
            reads += r;
            writes += w;
        }
        total_ops += reads + writes;
        per_file.push((reads, writes));
    }
    assert!(
        errors.is_empty(),
        "{} clients saw errors or short transfers:\n{}",
        errors.len(),
        errors.join("\n")
    );

    // The daemon's own counts match, exactly.
    let mut mismatches = Vec::new();
    for (i, (reads, writes)) in per_file.iter().enumerate() {
        let st = stats(&m.path(&format!("f{i:02}")));
        let (sr, sw) = (st["read_ops"], st["write_ops"]);
        if (sr, sw) != (*reads, *writes) || st["waiting"] != 0 {
            mismatches.push(format!(
                "f{i:02}: clients read {reads} write {writes}; stats read_ops {sr} write_ops {sw} \
                 waiting {}",
                st["waiting"]
            ));
        }
        assert!(reads + writes > 0, "f{i:02}: no request completed at all");
    }
    assert!(
        mismatches.is_empty(),
        "user.throttle.stats disagree with the clients:\n{}",
        mismatches.join("\n")
    );
    drop(files);

    let secs = elapsed.as_secs_f64();
    eprintln!(
        "load {duration:?}: {} files x {CLIENTS_PER_FILE} clients, {total_ops} ops in {secs:.1} s \
         ({:.0} ops/s), drained in {drain:?}",
        FILES,
        total_ops as f64 / secs
    );
    eprintln!(
        "daemon CPU {cpu:.2} s = {:.1} us/op; VmRSS before {rss_start} KiB, samples {:?} KiB, \
         after drain {rss_end} KiB",
        cpu * 1e6 / total_ops as f64,
        samples.iter().map(|(_, r)| *r).collect::<Vec<_>>()
    );

    // Memory stays flat after warm-up.
    if let Some(&(_, reference)) = samples.iter().find(|(s, _)| *s == WARM_UP_SECS) {
        let &(last_s, last) = samples.last().unwrap();
        let bound = reference * 3 / 2 + 16 * 1024;
        assert!(
            last <= bound,
            "daemon VmRSS grew after warm-up: {reference} KiB at {WARM_UP_SECS} s, {last} KiB at \
             {last_s} s (bound {bound} KiB); samples {samples:?}"
        );
    }
    m.terminate();
}

#[test]
fn load_5s() {
    run_load(Duration::from_secs(5));
}

#[test]
#[ignore = "soak: 60 s; run by name or with --run-ignored only"]
fn soak_60s() {
    let secs = std::env::var("THROTTLEFS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    run_load(Duration::from_secs(secs));
}
