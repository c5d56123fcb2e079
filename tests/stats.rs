//! `user.throttle.stats` on a real mount: the per-second rates of a steady
//! throttled flow read as that flow.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::attrs::stats;
use common::{KIB, MIB, Mount, make_file};

const FILE_BYTES: u64 = 8 * MIB;
/// Small requests, so one request more or less in the window is 1.6%.
const REQUEST_BYTES: u64 = 16 * KIB;
/// Enough readers that one is always queued: the throttle, not a reader's
/// round trip, sets the pace even on a loaded machine.
const READERS: u64 = 4;
/// Long enough for the first burst (the bucket's 0.1 s) to leave the window.
const WARM_UP: Duration = Duration::from_millis(1500);
/// Not a divisor of the 100 ms slot, so samples fall at every phase of it.
const SAMPLE_EVERY: Duration = Duration::from_millis(97);
const SAMPLES: usize = 26;

#[test]
fn steady_throttled_read_rate_reads_as_the_limit() {
    let m = Mount::with_setup(
        |src| {
            make_file(src, "disk.img", FILE_BYTES, 1);
        },
        &["--bps-rd", "1M"],
    );
    let path = m.path("disk.img");
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let file = File::open(&path).unwrap();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; REQUEST_BYTES as usize];
                let mut offset = r * REQUEST_BYTES;
                while !stop.load(Ordering::Relaxed) {
                    file.read_exact_at(&mut buf, offset).expect("read");
                    offset = (offset + READERS * REQUEST_BYTES) % FILE_BYTES;
                }
            })
        })
        .collect();

    thread::sleep(WARM_UP);
    // (when, read_bytes, read_bytes_per_sec)
    let mut samples: Vec<(Instant, u64, u64)> = Vec::new();
    for _ in 0..SAMPLES {
        let before = Instant::now();
        let st = stats(&path);
        let when = before + before.elapsed() / 2;
        samples.push((when, st["read_bytes"], st["read_bytes_per_sec"]));
        thread::sleep(SAMPLE_EVERY);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }

    // Each rate against what the counter says moved since the sample about
    // a second earlier (the flow as it really was), and against the limit.
    let limit = MIB as f64;
    let mut compared = 0;
    for (k, &(when, bytes, rate)) in samples.iter().enumerate() {
        let Some(&(then, bytes_then, _)) = samples[..k]
            .iter()
            .rev()
            .find(|(t, _, _)| when.duration_since(*t) >= Duration::from_millis(950))
        else {
            continue;
        };
        let moved = (bytes - bytes_then) as f64 / when.duration_since(then).as_secs_f64();
        let rate = rate as f64;
        assert!(
            (rate / moved - 1.0).abs() <= 0.03,
            "sample {k}: read_bytes_per_sec={rate}, but {moved:.0} B/s moved over the last second"
        );
        assert!(
            (rate / limit - 1.0).abs() <= 0.05,
            "sample {k}: read_bytes_per_sec={rate} for a steady reader at bps_rd=1M"
        );
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} samples a second apart");
}

/// Larger than the burst bucket's 1 MiB a tenth of a second, smaller than
/// its 40 MiB: a burst that spends part of the balance in about 1.5 s.
const BURST_READ_BYTES: u64 = 16 * MIB;

#[test]
fn burst_balance_is_spent_by_a_burst_and_refilled_while_idle() {
    let m = Mount::with_setup(
        |src| {
            make_file(src, "disk.img", BURST_READ_BYTES, 2);
        },
        &[
            "-o",
            "bps_rd=1M,bps_rd_max=10M,bps_rd_max_length=4",
            "--group",
            "g:iops_wr=50",
        ],
    );
    let path = m.path("disk.img");
    common::setfattr(&path, "user.throttle.group", "g");
    // Full: 40 MiB of room, which at 10 MiB/s in and 1 MiB/s out lasts
    // 40/9 s; the group's bucket and the iops one have no burst.
    let before = stats(&path);
    assert_eq!(before["bps_rd_capacity"], 40 * MIB, "{before:?}");
    assert_eq!(before["bps_rd_level"], 0);
    assert_eq!(before["bps_rd_burst_left_ms"], 4444);
    assert_eq!(before["bps_rd_burst_balance_pct"], 100);
    assert_eq!(before["group_iops_wr_capacity"], 5);
    assert!(!before.contains_key("group_iops_wr_burst_left_ms"));

    let started = Instant::now();
    let file = File::open(&path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..BURST_READ_BYTES / MIB {
        file.read_exact_at(&mut buf, i * MIB).expect("read");
    }
    let elapsed = started.elapsed();
    // 15 MiB past the burst-rate bucket's first 1 MiB, at 10 MiB/s; the
    // last 1 MiB request may go when 1 MiB is left to leak.
    common::assert_elapsed_between(
        "16 MiB at bps_rd_max=10M",
        elapsed,
        1.4,
        common::loose_upper(1.6),
    );
    let spent = stats(&path);
    // The bucket holds what was read less what leaked at 1 MiB/s.
    let level = spent["bps_rd_level"];
    assert!(level <= BURST_READ_BYTES, "{spent:?}");
    assert!(
        level >= BURST_READ_BYTES - MIB * (elapsed.as_millis() as u64 + 1000) / 1000,
        "{spent:?} after {elapsed:?}"
    );
    let left = spent["bps_rd_burst_left_ms"];
    assert!((2600..3900).contains(&left), "{spent:?}");
    assert_eq!(
        spent["bps_rd_burst_balance_pct"],
        (40 * MIB - level) * 100 / (40 * MIB)
    );
    // Idle, it refills at 1 MiB/s: a second gives back 1/9 s of burst.
    thread::sleep(Duration::from_millis(1200));
    let refilled = stats(&path);
    assert!(
        refilled["bps_rd_level"] + MIB <= level,
        "{refilled:?} after {spent:?}"
    );
    assert!(
        refilled["bps_rd_burst_left_ms"] >= left + 100,
        "{refilled:?}"
    );

    // The group's own stats show its bucket.
    let group = common::getfattr(m.mnt(), "user.throttle.group.g.stats").unwrap();
    assert!(
        group.contains("iops_wr_level=0\niops_wr_capacity=5\n"),
        "{group}"
    );
}
