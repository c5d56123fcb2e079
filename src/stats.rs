//! What the FUSE threads, the scheduler and the I/O workers share about one
//! file: whether it may skip the scheduler, the limits in force and where
//! they came from, and its counters for `user.throttle.stats`.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::throttle::{Direction, Limits};

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
}

/// Width of one slot of the rate window; the window is RATE_SLOTS of them.
const RATE_SLOT: Duration = Duration::from_millis(100);
/// Slots in the rate window: 10 x 100 ms = the last second.
const RATE_SLOTS: usize = 10;

/// Bytes and operations per 100 ms slot over the last second.
#[derive(Default)]
struct RateWindow {
    /// Index (in slots since `FileShared::epoch`) of the newest slot.
    newest: u64,
    bytes: [[u64; RATE_SLOTS]; 2],
    ops: [[u64; RATE_SLOTS]; 2],
}

impl RateWindow {
    /// Move the window forward to slot `now`, zeroing slots that passed.
    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        let passed = (now - self.newest).min(RATE_SLOTS as u64);
        for i in 1..=passed {
            let slot = ((self.newest + i) % RATE_SLOTS as u64) as usize;
            for lane in 0..2 {
                self.bytes[lane][slot] = 0;
                self.ops[lane][slot] = 0;
            }
        }
        self.newest = now;
    }
}

fn lane(dir: Direction) -> usize {
    match dir {
        Direction::Read => 0,
        Direction::Write => 1,
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
    epoch: Instant,
    bytes: [AtomicU64; 2],
    ops: [AtomicU64; 2],
    wait_ns_total: AtomicU64,
    waiting: AtomicU64,
    window: Mutex<RateWindow>,
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
            epoch: Instant::now(),
            bytes: Default::default(),
            ops: Default::default(),
            wait_ns_total: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            window: Mutex::new(RateWindow::default()),
        }
    }
}

impl FileShared {
    fn slot(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_nanos() / RATE_SLOT.as_nanos()) as u64
    }

    /// One request done: `bytes` moved (its actual result).
    pub fn record_io(&self, dir: Direction, bytes: u64) {
        let l = lane(dir);
        self.bytes[l].fetch_add(bytes, Ordering::Relaxed);
        self.ops[l].fetch_add(1, Ordering::Relaxed);
        let now = self.slot(Instant::now());
        let mut w = self.window.lock().expect("rate window");
        w.advance(now);
        let slot = (now % RATE_SLOTS as u64) as usize;
        w.bytes[l][slot] += bytes;
        w.ops[l][slot] += 1;
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

    /// `user.throttle.stats`: one `name=value` a line; the names are stable.
    pub fn render_stats(&self) -> String {
        let now = self.slot(Instant::now());
        let (rate_bytes, rate_ops) = {
            let mut w = self.window.lock().expect("rate window");
            w.advance(now);
            let sum = |a: &[u64; RATE_SLOTS]| a.iter().sum::<u64>();
            (
                [sum(&w.bytes[0]), sum(&w.bytes[1])],
                [sum(&w.ops[0]), sum(&w.ops[1])],
            )
        };
        let mut out = String::new();
        let mut line = |name: &str, value: u64| {
            let _ = writeln!(out, "{name}={value}");
        };
        line("read_bytes", self.bytes[0].load(Ordering::Relaxed));
        line("read_ops", self.ops[0].load(Ordering::Relaxed));
        line("write_bytes", self.bytes[1].load(Ordering::Relaxed));
        line("write_ops", self.ops[1].load(Ordering::Relaxed));
        line("wait_ns", self.wait_ns_total.load(Ordering::Relaxed));
        line("waiting", self.waiting.load(Ordering::Relaxed));
        line("read_bytes_per_sec", rate_bytes[0]);
        line("read_ops_per_sec", rate_ops[0]);
        line("write_bytes_per_sec", rate_bytes[1]);
        line("write_ops_per_sec", rate_ops[1]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_forgets_slots_older_than_a_second() {
        let mut w = RateWindow::default();
        w.advance(3);
        w.bytes[0][3] = 100;
        w.advance(12); // 0.9 s later: slot 3 still counts
        assert_eq!(w.bytes[0].iter().sum::<u64>(), 100);
        w.advance(13); // 1.0 s later: it is gone
        assert_eq!(w.bytes[0].iter().sum::<u64>(), 0);
        w.bytes[1][(13 % 10) as usize] = 7;
        w.advance(1_000); // a long idle gap clears everything
        assert_eq!(w.bytes[1].iter().sum::<u64>(), 0);
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
    }
}
