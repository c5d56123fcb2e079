//! What the FUSE threads, the scheduler and the I/O workers share about one
//! file: whether it may skip the scheduler, the limits in force and where
//! they came from, and its counters for `user.throttle.stats`.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::io::ErrorLog;
use crate::scheduler::Credit;
use crate::sizing::{SizeWatch, Sizing};
use crate::throttle::{BucketReading, Direction, Limits, ThrottleState};

/// Where a file's limits come from (whole sets: the first that has any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The file's own `user.throttle.*` attributes.
    File,
    /// The nearest ancestor directory with any; its path from the mount root.
    Directory(String),
    /// The mount options.
    Mount,
}

impl Origin {
    pub fn describe(&self) -> String {
        match self {
            Origin::File => "file".into(),
            Origin::Directory(path) => format!("directory:{path}"),
            Origin::Mount => "mount".into(),
        }
    }
}

/// The limits in force for a file and where they came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub limits: Limits,
    pub origin: Origin,
    /// The throttle group, and where membership came from.
    pub group: Option<(String, Origin)>,
    /// Weight and reservations within the group, each where it came from.
    pub qos: crate::qos::QosSettings,
    /// With per-GiB limits: the set as written and the disk size that
    /// `limits` were computed for (see `crate::sizing`).
    pub sizing: Option<Sizing>,
    /// How per-GiB limits size the disk (`user.throttle.image_format`),
    /// and where that came from (`Mount`: the mount option or its default).
    pub image_format: (crate::sizing::ImageFormat, Origin),
}

/// Width of one slot of the rate window.
const RATE_SLOT: Duration = Duration::from_millis(100);
/// Slots in one second of rate window.
const RATE_SLOTS: usize = 10;
/// Slots kept: the current (partial) slot, the nine full ones before it,
/// and one more, of which only the part inside the last second counts.
const RING_SLOTS: usize = RATE_SLOTS + 1;

/// Bytes and operations per 100 ms slot, enough to sum exactly one second.
#[derive(Default)]
struct RateWindow {
    /// Index (in slots since `FileShared::epoch`) of the newest slot.
    newest: u64,
    bytes: [[u64; RING_SLOTS]; 2],
    ops: [[u64; RING_SLOTS]; 2],
}

impl RateWindow {
    /// Move the window forward to slot `now`, zeroing slots that passed.
    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        let passed = (now - self.newest).min(RING_SLOTS as u64);
        for i in 1..=passed {
            let slot = ((self.newest + i) % RING_SLOTS as u64) as usize;
            for lane in 0..2 {
                self.bytes[lane][slot] = 0;
                self.ops[lane][slot] = 0;
            }
        }
        self.newest = now;
    }

    /// What `counts` holds for the second that ends `into_newest` after the
    /// start of the newest slot. The newest slot covers only `into_newest`,
    /// so the one-second window also takes the rest of a slot from the
    /// oldest one: that slot counts with weight 1 - into_newest / slot
    /// (rounded to nearest), which makes a steady flow read as its rate
    /// whatever the phase. Summing only ten slots would cover 0.9 s plus a
    /// partial slot and under-read by up to 10%.
    fn last_second(&self, counts: &[u64; RING_SLOTS], into_newest: Duration) -> u64 {
        let slot_ns = RATE_SLOT.as_nanos();
        let into_ns = into_newest.as_nanos().min(slot_ns);
        let oldest = ((self.newest + 1) % RING_SLOTS as u64) as usize;
        let whole: u64 = (0..RING_SLOTS)
            .filter(|&i| i != oldest)
            .map(|i| counts[i])
            .sum();
        let part = (u128::from(counts[oldest]) * (slot_ns - into_ns) + slot_ns / 2) / slot_ns;
        whole + part as u64
    }
}

fn lane(dir: Direction) -> usize {
    match dir {
        Direction::Read => 0,
        Direction::Write => 1,
    }
}

/// One file's counters (index 0 reads, 1 writes) and what moved in the
/// last second: the numbers behind `user.throttle.stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    pub bytes: [u64; 2],
    pub ops: [u64; 2],
    pub wait_ns: u64,
    pub waiting: u64,
    pub bytes_per_sec: [u64; 2],
    pub ops_per_sec: [u64; 2],
}

impl Activity {
    /// The fields by their stable `user.throttle.stats` names, in that
    /// attribute's order.
    pub fn fields(&self) -> [(&'static str, u64); 10] {
        [
            ("read_bytes", self.bytes[0]),
            ("read_ops", self.ops[0]),
            ("write_bytes", self.bytes[1]),
            ("write_ops", self.ops[1]),
            ("wait_ns", self.wait_ns),
            ("waiting", self.waiting),
            ("read_bytes_per_sec", self.bytes_per_sec[0]),
            ("read_ops_per_sec", self.ops_per_sec[0]),
            ("write_bytes_per_sec", self.bytes_per_sec[1]),
            ("write_ops_per_sec", self.ops_per_sec[1]),
        ]
    }

    /// Sets the field called `name` (a `fields` name); false for another.
    pub fn set(&mut self, name: &str, value: u64) -> bool {
        let field = match name {
            "read_bytes" => &mut self.bytes[0],
            "read_ops" => &mut self.ops[0],
            "write_bytes" => &mut self.bytes[1],
            "write_ops" => &mut self.ops[1],
            "wait_ns" => &mut self.wait_ns,
            "waiting" => &mut self.waiting,
            "read_bytes_per_sec" => &mut self.bytes_per_sec[0],
            "read_ops_per_sec" => &mut self.ops_per_sec[0],
            "write_bytes_per_sec" => &mut self.bytes_per_sec[1],
            "write_ops_per_sec" => &mut self.ops_per_sec[1],
            _ => return false,
        };
        *field = value;
        true
    }

    /// Whether anything moved in the last second or waits now.
    pub fn is_busy(&self) -> bool {
        self.waiting > 0
            || self
                .bytes_per_sec
                .iter()
                .chain(&self.ops_per_sec)
                .any(|&n| n > 0)
    }
}

/// Shared state of one file, behind an `Arc` held by its inode, its open
/// handles and the scheduler.
pub struct FileShared {
    /// Served inline, without the scheduler: true only while the file has
    /// no limits and nothing of it is queued or in flight (the scheduler
    /// sets it once that holds; a new limit clears it first).
    pub bypass: AtomicBool,
    pub effective: Mutex<Option<Effective>>,
    /// What the scheduler has charged ahead for requests to spend without
    /// asking it (see `scheduler/credit.rs`).
    pub credit: Credit,
    /// Open handles in FUSE passthrough: the kernel reads and writes them
    /// straight from the underlying file, so they are neither throttled
    /// nor counted here (see docs/limits.md, Passthrough).
    pub passthrough_handles: AtomicU64,
    /// Requests that failed on the underlying file, and what of them was
    /// logged (`crate::io::record_error`).
    pub errors: ErrorLog,
    /// Which writes may change the disk's size that per-GiB limits count.
    pub size_watch: SizeWatch,
    epoch: Instant,
    bytes: [AtomicU64; 2],
    ops: [AtomicU64; 2],
    wait_ns_total: AtomicU64,
    waiting: AtomicU64,
    /// Requests performed on credit, without a round trip to the
    /// scheduler.
    credit_ops: AtomicU64,
    window: Mutex<RateWindow>,
    /// How late the scheduler woke for this file's deadlines; made at the
    /// first deadline, so files that never wait pay nothing for it.
    lateness: Mutex<Option<Box<Lateness>>>,
}

impl std::fmt::Debug for FileShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileShared")
            .field("bypass", &self.bypass.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for FileShared {
    fn default() -> Self {
        FileShared {
            bypass: AtomicBool::new(false),
            effective: Mutex::new(None),
            credit: Credit::default(),
            passthrough_handles: AtomicU64::new(0),
            errors: ErrorLog::default(),
            size_watch: SizeWatch::default(),
            epoch: Instant::now(),
            bytes: Default::default(),
            ops: Default::default(),
            wait_ns_total: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            credit_ops: AtomicU64::new(0),
            window: Mutex::new(RateWindow::default()),
            lateness: Mutex::new(None),
        }
    }
}

impl FileShared {
    /// The rate-window slot `at` falls in, and how far into it.
    fn slot(&self, at: Instant) -> (u64, Duration) {
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        let slot_ns = RATE_SLOT.as_nanos();
        let into = Duration::from_nanos((since % slot_ns) as u64);
        ((since / slot_ns) as u64, into)
    }

    /// One request done: `bytes` moved (its actual result).
    pub fn record_io(&self, dir: Direction, bytes: u64) {
        self.record_io_at(dir, bytes, Instant::now());
    }

    fn record_io_at(&self, dir: Direction, bytes: u64, now: Instant) {
        let l = lane(dir);
        self.bytes[l].fetch_add(bytes, Ordering::Relaxed);
        self.ops[l].fetch_add(1, Ordering::Relaxed);
        let (now, _) = self.slot(now);
        let mut w = self.window.lock().expect("rate window");
        w.advance(now);
        let slot = (now % RING_SLOTS as u64) as usize;
        w.bytes[l][slot] += bytes;
        w.ops[l][slot] += 1;
    }

    /// A request spent credit instead of going to the scheduler.
    pub fn record_credit(&self) {
        self.credit_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_queued(&self) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// A queued request left the queue (released or cancelled) after
    /// waiting `waited`.
    pub fn record_dequeued(&self, waited: Duration) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.wait_ns_total.fetch_add(ns, Ordering::Relaxed);
    }

    /// The scheduler woke `late` after a deadline of this file.
    pub fn record_release_lateness(&self, late: Duration) {
        self.lateness
            .lock()
            .expect("lateness")
            .get_or_insert_with(Box::default)
            .record(late);
    }

    /// `user.throttle.stats`: one `name=value` a line; the names are stable.
    pub fn render_stats(&self) -> String {
        self.render_stats_at(Instant::now())
    }

    /// The counters and last-second rates, as numbers.
    pub fn activity(&self) -> Activity {
        self.activity_at(Instant::now())
    }

    fn activity_at(&self, now: Instant) -> Activity {
        let (slot, into) = self.slot(now);
        let mut w = self.window.lock().expect("rate window");
        w.advance(slot);
        let sum = |a: &[u64; RING_SLOTS]| w.last_second(a, into);
        Activity {
            bytes: [
                self.bytes[0].load(Ordering::Relaxed),
                self.bytes[1].load(Ordering::Relaxed),
            ],
            ops: [
                self.ops[0].load(Ordering::Relaxed),
                self.ops[1].load(Ordering::Relaxed),
            ],
            wait_ns: self.wait_ns_total.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            bytes_per_sec: [sum(&w.bytes[0]), sum(&w.bytes[1])],
            ops_per_sec: [sum(&w.ops[0]), sum(&w.ops[1])],
        }
    }

    fn render_stats_at(&self, now: Instant) -> String {
        let a = self.activity_at(now);
        let mut out = String::new();
        let mut line = |name: &str, value: u64| {
            let _ = writeln!(out, "{name}={value}");
        };
        for (name, value) in a.fields() {
            line(name, value);
        }
        let late = self.lateness.lock().expect("lateness");
        let late = late.as_deref();
        line("deadline_releases", late.map_or(0, |l| l.count));
        line("release_late_p50_ns", late.map_or(0, |l| l.quantile_ns(50)));
        line("release_late_p99_ns", late.map_or(0, |l| l.quantile_ns(99)));
        line("release_late_max_ns", late.map_or(0, |l| l.max_ns));
        line("credit_ops", self.credit_ops.load(Ordering::Relaxed));
        line("io_errors", self.errors.count());
        line("passthrough_handles", self.passthrough_handles());
        out
    }

    /// Open handles in passthrough now.
    pub fn passthrough_handles(&self) -> u64 {
        self.passthrough_handles.load(Ordering::Relaxed)
    }
}

/// Appends a line per field of each bucket, named after its limit and
/// prefixed with `prefix` (`group_` for the file's group):
/// `NAME_level` and `NAME_capacity` in units (bytes or operations), and
/// with a `NAME_max` burst `NAME_burst_balance_pct` and, when the burst
/// rate is above the average, `NAME_burst_left_ms` (see
/// `ThrottleState::readings` for the formula).
pub fn render_buckets(out: &mut String, prefix: &str, readings: &[BucketReading]) {
    for r in readings {
        let name = r.kind.name();
        let _ = writeln!(out, "{prefix}{name}_level={}", r.level);
        let _ = writeln!(out, "{prefix}{name}_capacity={}", r.capacity);
        if let Some(left) = r.burst_left {
            let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            let _ = writeln!(out, "{prefix}{name}_burst_left_ms={ms}");
        }
        if let Some(pct) = r.burst_balance_pct {
            let _ = writeln!(out, "{prefix}{name}_burst_balance_pct={pct}");
        }
    }
}

/// The readings of buckets that hold nothing yet (the scheduler has no
/// state for them): every bucket in force, empty.
pub fn empty_readings(limits: Limits) -> Vec<BucketReading> {
    ThrottleState::new(limits, Duration::ZERO).readings(Duration::ZERO)
}

/// Sub-buckets per power of two in the lateness histogram: each bucket is
/// at most 1/16 (6.25 %) wide relative to its values.
const LATENESS_SUB_BUCKETS: usize = 16;
/// Powers of two covered: 2^40 ns is about 18 minutes.
const LATENESS_OCTAVES: usize = 40;

/// A log-linear histogram of lateness in nanoseconds.
struct Lateness {
    buckets: [u64; LATENESS_OCTAVES * LATENESS_SUB_BUCKETS],
    count: u64,
    max_ns: u64,
}

impl Default for Lateness {
    fn default() -> Self {
        Lateness {
            buckets: [0; LATENESS_OCTAVES * LATENESS_SUB_BUCKETS],
            count: 0,
            max_ns: 0,
        }
    }
}

impl Lateness {
    fn bucket(ns: u64) -> usize {
        let sub = LATENESS_SUB_BUCKETS as u64;
        if ns < sub {
            return ns as usize;
        }
        // Octave k holds [sub * 2^(k-1), sub * 2^k): 16 buckets each.
        let octave = (63 - ns.leading_zeros() as usize) + 1 - sub.trailing_zeros() as usize;
        let shift = octave - 1;
        let idx = octave * LATENESS_SUB_BUCKETS + ((ns >> shift) - sub) as usize;
        idx.min(LATENESS_OCTAVES * LATENESS_SUB_BUCKETS - 1)
    }

    /// The largest value bucket `idx` holds.
    fn bucket_top_ns(idx: usize) -> u64 {
        let sub = LATENESS_SUB_BUCKETS as u64;
        if idx < LATENESS_SUB_BUCKETS {
            return idx as u64;
        }
        let octave = idx / LATENESS_SUB_BUCKETS;
        let shift = octave - 1;
        ((sub + (idx % LATENESS_SUB_BUCKETS) as u64 + 1) << shift) - 1
    }

    fn record(&mut self, late: Duration) {
        let ns = u64::try_from(late.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket(ns)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// The `pct` percentile, rounded up to its bucket's top (never
    /// reported lower than it was), and never above the maximum seen.
    fn quantile_ns(&self, pct: u64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = (self.count * pct).div_ceil(100).max(1);
        let mut seen = 0;
        for (idx, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::bucket_top_ns(idx).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_fields_are_set_by_their_names() {
        let mut a = Activity::default();
        for (i, (name, _)) in Activity::default().fields().iter().enumerate() {
            assert!(a.set(name, i as u64 + 1), "{name}");
        }
        let values: Vec<u64> = a.fields().iter().map(|(_, v)| *v).collect();
        assert_eq!(values, (1..=10).collect::<Vec<u64>>());
        assert!(!a.set("members", 1));
    }

    const MS: Duration = Duration::from_millis(1);

    fn stat(text: &str, name: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn window_forgets_slots_older_than_a_second() {
        let s = FileShared::default();
        let t0 = s.epoch;
        s.record_io_at(Direction::Read, 100, t0 + MS * 350);
        let rate = |ms: u32| stat(&s.render_stats_at(t0 + MS * ms), "read_bytes_per_sec");
        assert_eq!(rate(1299), 100); // its slot is wholly in the last second
        assert_eq!(rate(1300), 100);
        assert_eq!(rate(1350), 50); // half of its slot is
        assert_eq!(rate(1400), 0); // none of it is
        s.record_io_at(Direction::Write, 7, t0 + MS * 1450);
        let text = s.render_stats_at(t0 + MS * 100_000);
        assert_eq!(
            stat(&text, "write_bytes_per_sec"),
            0,
            "a long idle gap clears all"
        );
        assert_eq!(stat(&text, "write_bytes"), 7);
    }

    /// Feeds `bytes` every `every`, the first at `first`, for 5 s and
    /// samples the read rate at 997 instants (every 3.01 ms from 1.5 s on,
    /// so at every phase of a slot); returns the samples.
    fn steady_flow_rates(bytes: u64, every: Duration, first: Duration) -> Vec<u64> {
        let s = FileShared::default();
        let t0 = s.epoch;
        let mut samples = (0..997u64).map(|k| Duration::from_micros(1_500_000 + k * 3_010));
        let mut next = samples.next();
        let mut rates = Vec::new();
        let mut at = first;
        while at < Duration::from_secs(5) {
            while let Some(t) = next.filter(|t| *t < at) {
                let text = s.render_stats_at(t0 + t);
                rates.push(stat(&text, "read_bytes_per_sec"));
                next = samples.next();
            }
            s.record_io_at(Direction::Read, bytes, t0 + at);
            at += every;
        }
        assert_eq!(rates.len(), 997);
        rates
    }

    #[test]
    fn steady_flow_reads_as_its_rate_at_every_phase() {
        // 1 KiB every 1 ms: 1,024,000 B/s. Only the oldest slot is
        // estimated, so every sample is within one request of the rate
        // (summing ten slots read 0.9-1.0 of it).
        for rate in steady_flow_rates(1024, MS, Duration::ZERO) {
            assert!(rate.abs_diff(1_024_000) <= 1024, "read {rate} B/s");
        }
    }

    #[test]
    fn coarse_steady_flow_averages_to_its_rate() {
        // 64 KiB every 62.5 ms, 1 MiB/s exactly, as a throttled reader does:
        // a sample may be a request off, but the phases average out to the
        // rate (the old window averaged 0.95 of it: 896-1024 KiB/s). Such a
        // flow puts requests at only 8 phases of a slot, so it is run at 20
        // offsets spread over 12.5 ms, as jitter spreads a real one.
        let rates: Vec<u64> = (0..20u64)
            .flat_map(|k| {
                let first = Duration::from_micros(k * 625);
                steady_flow_rates(64 * 1024, Duration::from_micros(62_500), first)
            })
            .collect();
        let mean = rates.iter().sum::<u64>() as f64 / rates.len() as f64;
        assert!(
            (mean / 1_048_576.0 - 1.0).abs() < 0.005,
            "mean of samples {mean} B/s"
        );
        for rate in rates {
            assert!(rate.abs_diff(1_048_576) <= 64 * 1024, "read {rate} B/s");
        }
    }

    #[test]
    fn lateness_quantiles_are_never_low_and_within_a_bucket() {
        let mut l = Lateness::default();
        for us in 1..=100u64 {
            l.record(Duration::from_micros(us));
        }
        let p50 = l.quantile_ns(50);
        let p99 = l.quantile_ns(99);
        assert!((50_000..=50_000 * 17 / 16).contains(&p50), "{p50}");
        assert!((99_000..=100_000).contains(&p99), "{p99}");
        assert_eq!(l.max_ns, 100_000);
        assert_eq!(l.count, 100);
        // Each value lies in its bucket: above the previous bucket's top,
        // at most its own.
        for ns in [0, 1, 15, 16, 17, 31, 32, 33, 1000, 999_999, 1 << 30] {
            let b = Lateness::bucket(ns);
            assert!(ns <= Lateness::bucket_top_ns(b), "{ns} in {b}");
            if b > 0 {
                assert!(ns > Lateness::bucket_top_ns(b - 1), "{ns} in {b}");
            }
        }
        assert_eq!(
            Lateness::bucket(u64::MAX),
            LATENESS_OCTAVES * LATENESS_SUB_BUCKETS - 1
        );
    }

    #[test]
    fn counters_are_exact() {
        let s = FileShared::default();
        for _ in 0..3 {
            s.record_io(Direction::Read, 4096);
        }
        s.record_io(Direction::Write, 10);
        s.record_queued();
        s.record_queued();
        s.record_dequeued(Duration::from_millis(5));
        let text = s.render_stats();
        assert!(text.contains("read_bytes=12288\n"), "{text}");
        assert!(text.contains("read_ops=3\n"));
        assert!(text.contains("write_bytes=10\n"));
        assert!(text.contains("write_ops=1\n"));
        assert!(text.contains("wait_ns=5000000\n"));
        assert!(text.contains("waiting=1\n"));
        assert!(text.contains("read_bytes_per_sec=12288\n"));
        assert!(text.ends_with("passthrough_handles=0\n"), "{text}");
    }
}
