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
