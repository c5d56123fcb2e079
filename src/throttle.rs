//! Leaky-bucket throttle maths ("leaky bucket as a meter", as QEMU's
//! `util/throttle.c`), kept pure: no clock, no threads, no FUSE. Every
//! function that needs the time takes `now`, a `Duration` since an arbitrary
//! epoch chosen by the caller, so tests drive it with a fake clock and get
//! exact deadlines.
//!
//! Levels are kept in integer *nano-units* (bytes or operations times 10^9)
//! so that leaking at `avg` units per second for `d` nanoseconds removes
//! exactly `avg * d` nano-units: no floating point, no rounding drift, and
//! waits are rounded up so a request is never released early.

use std::fmt;
use std::time::Duration;

/// Nano-units per unit: one byte (or one operation) is 10^9 nano-units.
pub const NANO_UNITS_PER_UNIT: u128 = 1_000_000_000;

/// Without a burst setting a bucket holds this much I/O at the average rate
/// (QEMU: avg/10), so short bursts pass and steady flow stays smooth.
pub const BUCKET_WITHOUT_BURST: Duration = Duration::from_millis(100);

/// The burst-rate bucket holds this much I/O at the burst rate (QEMU: max/10).
pub const BURST_RATE_BUCKET: Duration = Duration::from_millis(100);

/// Burst length used when `*_max` is set without `*_max_length` (QEMU's default).
pub const DEFAULT_BURST_LENGTH: Duration = Duration::from_secs(1);

/// Largest accepted rate or size, QEMU's THROTTLE_VALUE_MAX (10^15).
pub const MAX_LIMIT_VALUE: u64 = 1_000_000_000_000_000;

/// Number of buckets a file has (one per basic limit).
pub const BUCKET_COUNT: usize = 6;

/// Which way a request moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Read,
    Write,
}

/// The six basic limits, in QEMU's order; `as usize` indexes `Limits::buckets`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BucketKind {
    BpsTotal = 0,
    BpsRead = 1,
    BpsWrite = 2,
    IopsTotal = 3,
    IopsRead = 4,
    IopsWrite = 5,
}

impl BucketKind {
    pub const ALL: [BucketKind; BUCKET_COUNT] = [
        BucketKind::BpsTotal,
        BucketKind::BpsRead,
        BucketKind::BpsWrite,
        BucketKind::IopsTotal,
        BucketKind::IopsRead,
        BucketKind::IopsWrite,
    ];

    /// QEMU's `block_set_io_throttle` name of the average limit.
    pub fn name(self) -> &'static str {
        match self {
            BucketKind::BpsTotal => "bps",
            BucketKind::BpsRead => "bps_rd",
            BucketKind::BpsWrite => "bps_wr",
            BucketKind::IopsTotal => "iops",
            BucketKind::IopsRead => "iops_rd",
            BucketKind::IopsWrite => "iops_wr",
        }
    }

    pub fn from_name(name: &str) -> Option<BucketKind> {
        BucketKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Bytes (true) or operations (false).
    pub fn counts_bytes(self) -> bool {
        matches!(
            self,
            BucketKind::BpsTotal | BucketKind::BpsRead | BucketKind::BpsWrite
        )
    }

    pub fn is_total(self) -> bool {
        matches!(self, BucketKind::BpsTotal | BucketKind::IopsTotal)
    }

    /// Whether a request going `dir` is metered by this bucket.
    pub fn applies_to(self, dir: Direction) -> bool {
        match self {
            BucketKind::BpsTotal | BucketKind::IopsTotal => true,
            BucketKind::BpsRead | BucketKind::IopsRead => dir == Direction::Read,
            BucketKind::BpsWrite | BucketKind::IopsWrite => dir == Direction::Write,
        }
    }
}

/// One limit: average rate, optional burst rate and burst length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitSpec {
    /// Average rate in units (bytes or operations) per second; 0 = unlimited.
    pub avg: u64,
    /// Burst rate in units per second; 0 = no burst.
    pub max: u64,
    /// How long a burst at `max` may last; `None` = `DEFAULT_BURST_LENGTH`.
    pub max_length: Option<Duration>,
}

impl LimitSpec {
    pub fn is_set(&self) -> bool {
        self.avg != 0 || self.max != 0 || self.max_length.is_some()
    }

    fn burst_length(&self) -> Duration {
        self.max_length.unwrap_or(DEFAULT_BURST_LENGTH)
    }

    /// Capacities in nano-units of the main bucket and, with a burst, of
    /// the burst-rate bucket. Saturating: limits that validate() would
    /// refuse must still not overflow.
    fn capacities(&self) -> (u128, Option<u128>) {
        if self.max == 0 {
            let main = u128::from(self.avg).saturating_mul(nanos(BUCKET_WITHOUT_BURST));
            (main, None)
        } else {
            let main = u128::from(self.max).saturating_mul(nanos(self.burst_length()));
            let burst = u128::from(self.max).saturating_mul(nanos(BURST_RATE_BUCKET));
            (main, Some(burst))
        }
    }
}

/// A limit that scales with the size of the disk (`iops_per_gb`, ...):
/// `rate` units per second for each GiB, the result kept within `min`
/// and `cap`. All 0 = not set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerGbSpec {
    /// Units per second per GiB of the disk; 0 = not set.
    pub rate: u64,
    /// Floor of the derived limit (Cinder's `*_per_gb_min`); 0 = none.
    pub min: u64,
    /// Ceiling of the derived limit; 0 = none.
    pub cap: u64,
}

impl PerGbSpec {
    pub fn is_set(&self) -> bool {
        self.rate != 0 || self.min != 0 || self.cap != 0
    }

    /// The limit in force for a disk of `size_bytes`: whole GiB (rounded
    /// up, at least 1, as Cinder's sizes are whole GB and never 0) times
    /// the rate, within the floor and the ceiling, and never above
    /// MAX_LIMIT_VALUE. Never 0 while a rate is set: a per-GiB limit never
    /// means unlimited.
    pub fn derive(&self, size_bytes: u64) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        let product = u128::from(gib_of(size_bytes)) * u128::from(self.rate);
        let mut limit = u64::try_from(product.min(u128::from(MAX_LIMIT_VALUE))).unwrap_or(0);
        if self.cap != 0 {
            limit = limit.min(self.cap);
        }
        limit.max(self.min)
    }
}

/// Bytes in one GiB, the unit of the per-GiB limits.
pub const BYTES_PER_GIB: u64 = 1 << 30;

/// The size in whole GiB that per-GiB limits count: rounded up, at least 1.
pub fn gib_of(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(BYTES_PER_GIB).max(1)
}

/// Every limit of one file (or of one set of defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Indexed by `BucketKind as usize`.
    pub buckets: [LimitSpec; BUCKET_COUNT],
    /// Requests larger than this many bytes count as size/iops_size
    /// operations; 0 = every request is one operation.
    pub iops_size: u64,
    /// Per-GiB forms of the averages, indexed as `buckets`. A set that has
    /// any is turned into fixed averages for one size by `derive`; the
    /// throttle maths reads only `buckets`.
    pub per_gb: [PerGbSpec; BUCKET_COUNT],
}

/// A set of limits made concrete for one disk size (`Limits::derive`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    /// The limits in force: the per-GiB averages filled in.
    pub limits: Limits,
    /// Bursts dropped because the derived average passed them, as the
    /// burst name and its value.
    pub ignored: Vec<(String, u64)>,
}

/// Why a set of limits was refused; the message names the offending option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidLimits(pub String);

impl fmt::Display for InvalidLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidLimits {}

impl Limits {
    pub fn get(&self, kind: BucketKind) -> &LimitSpec {
        &self.buckets[kind as usize]
    }

    pub fn get_mut(&mut self, kind: BucketKind) -> &mut LimitSpec {
        &mut self.buckets[kind as usize]
    }

    /// Whether any average is given per GiB of the disk.
    pub fn has_per_gb(&self) -> bool {
        self.per_gb.iter().any(|p| p.rate != 0)
    }

    pub fn per_gb(&self, kind: BucketKind) -> &PerGbSpec {
        &self.per_gb[kind as usize]
    }

    pub fn per_gb_mut(&mut self, kind: BucketKind) -> &mut PerGbSpec {
        &mut self.per_gb[kind as usize]
    }

    /// The limits in force for a disk of `size_bytes`: each per-GiB
    /// average becomes a fixed one (`PerGbSpec::derive`); the per-GiB
    /// specs stay, to say where it came from. A burst (`*_max`) that the
    /// derived average has passed would be refused in a set as written;
    /// here the disk's size made it so, so the burst is dropped (with its
    /// length) and reported in `ignored` instead of failing the file.
    pub fn derive(&self, size_bytes: u64) -> Derived {
        let mut limits = *self;
        let mut ignored = Vec::new();
        for kind in BucketKind::ALL {
            let per_gb = *self.per_gb(kind);
            if per_gb.rate == 0 {
                continue;
            }
            let spec = limits.get_mut(kind);
            spec.avg = per_gb.derive(size_bytes);
            if spec.max != 0 && spec.max < spec.avg {
                ignored.push((format!("{}_max", kind.name()), spec.max));
                spec.max = 0;
                spec.max_length = None;
            }
        }
        Derived { limits, ignored }
    }

    /// No bucket limits anything: requests need not be metered at all.
    pub fn is_unlimited(&self) -> bool {
        self.buckets.iter().all(|b| b.avg == 0)
    }

    /// A total (read + write) limit is set, so reads and writes share budget
    /// and must be released in one arrival order.
    pub fn has_total(&self) -> bool {
        BucketKind::ALL
            .iter()
            .any(|k| k.is_total() && self.get(*k).avg != 0)
    }

    /// QEMU's `throttle_is_valid` rules, with messages naming the option.
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        let err = |msg: String| Err(InvalidLimits(msg));
        for (total, rd, wr) in [
            (
                BucketKind::BpsTotal,
                BucketKind::BpsRead,
                BucketKind::BpsWrite,
            ),
            (
                BucketKind::IopsTotal,
                BucketKind::IopsRead,
                BucketKind::IopsWrite,
            ),
        ] {
            // An average given as a fixed rate or per GiB: its name as set.
            let given = |k: BucketKind| {
                if self.get(k).avg != 0 {
                    Some(k.name().to_string())
                } else if self.per_gb(k).rate != 0 {
                    Some(format!("{}_per_gb", k.name()))
                } else {
                    None
                }
            };
            if let Some(t) = given(total)
                && let Some(split) = given(rd).or_else(|| given(wr))
            {
                return err(format!("{split} cannot be used together with {t}"));
            }
            let (t, r, w) = (self.get(total), self.get(rd), self.get(wr));
            if t.max != 0 && (r.max != 0 || w.max != 0) {
                let split = if r.max != 0 { rd } else { wr };
                return err(format!(
                    "{}_max cannot be used together with {}_max",
                    split.name(),
                    total.name()
                ));
            }
        }
        for kind in BucketKind::ALL {
            let spec = self.get(kind);
            let name = kind.name();
            let per_gb = self.per_gb(kind);
            for (value, field) in [
                (per_gb.rate, "_per_gb"),
                (per_gb.min, "_per_gb_min"),
                (per_gb.cap, "_per_gb_cap"),
            ] {
                if value > MAX_LIMIT_VALUE {
                    return err(format!("{name}{field} must be at most {MAX_LIMIT_VALUE}"));
                }
            }
            if per_gb.rate != 0 && spec.avg != 0 {
                return err(format!(
                    "{name}_per_gb cannot be used together with {name} (one limit, two forms)"
                ));
            }
            if per_gb.rate == 0 && per_gb.min != 0 {
                return err(format!("{name}_per_gb_min requires {name}_per_gb"));
            }
            if per_gb.rate == 0 && per_gb.cap != 0 {
                return err(format!("{name}_per_gb_cap requires {name}_per_gb"));
            }
            if per_gb.cap != 0 && per_gb.min > per_gb.cap {
                return err(format!(
                    "{name}_per_gb_min must not be higher than {name}_per_gb_cap"
                ));
            }
            if spec.avg > MAX_LIMIT_VALUE {
                return err(format!("{name} must be at most {MAX_LIMIT_VALUE}"));
            }
            if spec.max > MAX_LIMIT_VALUE {
                return err(format!("{name}_max must be at most {MAX_LIMIT_VALUE}"));
            }
            if spec.max != 0 && spec.avg == 0 && per_gb.rate == 0 {
                return err(format!("{name}_max requires {name}"));
            }
            if spec.max != 0 && spec.max < spec.avg {
                return err(format!("{name}_max must not be lower than {name}"));
            }
            if let Some(length) = spec.max_length {
                if spec.max == 0 {
                    return err(format!("{name}_max_length requires {name}_max"));
                }
                if length.is_zero() {
                    return err(format!("{name}_max_length must be greater than 0"));
                }
                // QEMU's bound: the burst bucket (max * length) stays within
                // the value range, so levels can never overflow.
                let too_long = u128::from(spec.max)
                    .checked_mul(length.as_nanos())
                    .is_none_or(|units| units > u128::from(MAX_LIMIT_VALUE) * NANO_UNITS_PER_UNIT);
                if too_long {
                    return err(format!(
                        "{name}_max_length is too long for {name}_max (max * length must be at most {MAX_LIMIT_VALUE})"
                    ));
                }
            }
        }
        if self.iops_size > MAX_LIMIT_VALUE {
            return err(format!("iops_size must be at most {MAX_LIMIT_VALUE}"));
        }
        Ok(())
    }

    /// How many operations a request of `bytes` counts as, in nano-ops.
    pub fn nano_ops(&self, bytes: u64) -> u128 {
        if self.iops_size != 0 && bytes > self.iops_size {
            // Rounded up: an iops limit must never be undercharged.
            (u128::from(bytes) * NANO_UNITS_PER_UNIT).div_ceil(u128::from(self.iops_size))
        } else {
            NANO_UNITS_PER_UNIT
        }
    }
}

/// Fill levels of one bucket, in nano-units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Level {
    /// Leaks at `avg`; capacity avg*100ms, or max*max_length with a burst.
    main: u128,
    /// Leaks at `max`; capacity max*100ms; only used with a burst, where it
    /// caps the rate during the burst.
    burst: u128,
}

fn nanos(d: Duration) -> u128 {
    d.as_nanos()
}

/// Saturating `Duration` from nanoseconds (a wait of centuries is still a wait).
fn duration_from_nanos(ns: u128) -> Duration {
    let secs = ns / 1_000_000_000;
    if secs > u128::from(u64::MAX) {
        return Duration::MAX;
    }
    Duration::new(secs as u64, (ns % 1_000_000_000) as u32)
}

/// Wait until `level` has leaked down to `capacity` at `rate` units/s.
fn wait_for(level: u128, capacity: u128, rate: u64) -> Option<u128> {
    // Leaking at `rate` units/s removes `rate` nano-units per nanosecond.
    (level > capacity).then(|| (level - capacity).div_ceil(u128::from(rate)))
}

/// What the buckets going one way still hold room for (`headroom`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Headroom {
    /// Bytes the bps buckets take; `None`: none applies.
    pub bytes: Option<u64>,
    /// Nano-ops the iops buckets take; `None`: none applies.
    pub nano_ops: Option<u128>,
}

/// One bucket in force as `user.throttle.stats` shows it: how full it is
/// and, with a `*_max` burst, how much burst is left (see `readings`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketReading {
    pub kind: BucketKind,
    /// Units (bytes or operations) in the bucket now, rounded down.
    pub level: u64,
    /// Units it holds before requests wait: avg*100ms, or max*max_length
    /// with a burst.
    pub capacity: u64,
    /// With a burst whose rate is above the average: how long a flow at
    /// the burst rate may go on from now before the bucket is full and the
    /// average rate applies, `(capacity - level) / (max - avg)`, rounded
    /// down. `None` without a burst, or when max == avg (nothing to spend).
    pub burst_left: Option<Duration>,
    /// With a burst: what the bucket can still take, in percent of its
    /// capacity, rounded down (AWS's BurstBalance). `None` without.
    pub burst_balance_pct: Option<u64>,
}

/// The meter of one file: its limits and its buckets' levels.
#[derive(Clone, Debug)]
pub struct ThrottleState {
    limits: Limits,
    levels: [Level; BUCKET_COUNT],
    last_leak: Duration,
}

impl ThrottleState {
    pub fn new(limits: Limits, now: Duration) -> ThrottleState {
        ThrottleState {
            limits,
            levels: [Level::default(); BUCKET_COUNT],
            last_leak: now,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Change limits on the fly. Buckets keep what they hold (a lowered limit
    /// slows the next releases; a raised one drains the debt faster); a bucket
    /// whose limit is removed forgets its level.
    pub fn set_limits(&mut self, limits: Limits, now: Duration) {
        self.leak(now);
        for kind in BucketKind::ALL {
            if limits.get(kind).avg == 0 {
                self.levels[kind as usize] = Level::default();
            }
            if limits.get(kind).max == 0 {
                self.levels[kind as usize].burst = 0;
            }
        }
        self.limits = limits;
    }

    /// Let every bucket leak for the time since the last call. Time that
    /// goes backwards is ignored.
    pub fn leak(&mut self, now: Duration) {
        let Some(delta) = now.checked_sub(self.last_leak) else {
            return;
        };
        let delta_ns = nanos(delta);
        for kind in BucketKind::ALL {
            let spec = self.limits.get(kind);
            let level = &mut self.levels[kind as usize];
            level.main = level
                .main
                .saturating_sub(u128::from(spec.avg).saturating_mul(delta_ns));
            level.burst = level
                .burst
                .saturating_sub(u128::from(spec.max).saturating_mul(delta_ns));
        }
        self.last_leak = now;
    }

    /// How long a request going `dir` must still wait at `now`; zero means
    /// it may be dispatched now. Every bucket that applies must be at or
    /// below its capacity; the longest wait wins.
    pub fn wait(&mut self, dir: Direction, now: Duration) -> Duration {
        self.leak(now);
        let mut longest: u128 = 0;
        for kind in BucketKind::ALL {
            if !kind.applies_to(dir) {
                continue;
            }
            let spec = self.limits.get(kind);
            if spec.avg == 0 {
                continue;
            }
            let level = self.levels[kind as usize];
            // With a burst the main bucket holds max*length, refilled at
            // avg, and the burst bucket caps the rate at max. Both must
            // have room, so the longer wait is the deadline.
            let wait = match spec.capacities() {
                (capacity, None) => wait_for(level.main, capacity, spec.avg),
                (capacity, Some(burst_capacity)) => {
                    let main = wait_for(level.main, capacity, spec.avg);
                    let burst = wait_for(level.burst, burst_capacity, spec.max);
                    main.max(burst)
                }
            };
            longest = longest.max(wait.unwrap_or(0));
        }
        duration_from_nanos(longest)
    }

    /// How long from `now` until every bucket is empty: from then on this
    /// state admits exactly what a new one would, so it may be dropped.
    pub fn until_empty(&mut self, now: Duration) -> Duration {
        self.leak(now);
        let mut longest: u128 = 0;
        for kind in BucketKind::ALL {
            let spec = self.limits.get(kind);
            let level = self.levels[kind as usize];
            if spec.avg != 0 {
                longest = longest.max(wait_for(level.main, 0, spec.avg).unwrap_or(0));
            }
            if spec.max != 0 {
                longest = longest.max(wait_for(level.burst, 0, spec.max).unwrap_or(0));
            }
        }
        duration_from_nanos(longest)
    }

    /// Give back bytes charged for a request that moved fewer (a read at
    /// end of file, a failed request): bps buckets only, since the request
    /// still was an operation.
    pub fn refund(&mut self, dir: Direction, bytes: u64, now: Duration) {
        self.leak(now);
        let nano_bytes = u128::from(bytes) * NANO_UNITS_PER_UNIT;
        for kind in BucketKind::ALL {
            if !kind.applies_to(dir) || !kind.counts_bytes() {
                continue;
            }
            let level = &mut self.levels[kind as usize];
            level.main = level.main.saturating_sub(nano_bytes);
            level.burst = level.burst.saturating_sub(nano_bytes);
        }
    }

    /// What may be charged going `dir` at `now` with every bucket that
    /// applies staying at or below its capacity, so that a request after
    /// it would still be admitted at once: bytes for the bps buckets and
    /// nano-ops for the iops buckets, `None` where no bucket of that kind
    /// applies. Charged ahead (`charge_ahead`), this is an allowance that
    /// requests may spend without asking again.
    pub fn headroom(&mut self, dir: Direction, now: Duration) -> Headroom {
        self.leak(now);
        let mut room = Headroom::default();
        for kind in BucketKind::ALL {
            let spec = self.limits.get(kind);
            if !kind.applies_to(dir) || spec.avg == 0 {
                continue;
            }
            let level = self.levels[kind as usize];
            let (capacity, burst_capacity) = spec.capacities();
            let mut free = capacity.saturating_sub(level.main);
            if let Some(b) = burst_capacity {
                free = free.min(b.saturating_sub(level.burst));
            }
            if kind.counts_bytes() {
                let bytes = u64::try_from(free / NANO_UNITS_PER_UNIT).unwrap_or(u64::MAX);
                room.bytes = Some(room.bytes.map_or(bytes, |b| b.min(bytes)));
            } else {
                room.nano_ops = Some(room.nano_ops.map_or(free, |o| o.min(free)));
            }
        }
        room
    }

    /// Charge an allowance going `dir` ahead of the requests that will
    /// spend it: `bytes` to the bps buckets and `nano_ops` to the iops
    /// buckets that apply.
    pub fn charge_ahead(&mut self, dir: Direction, bytes: u64, nano_ops: u128, now: Duration) {
        self.leak(now);
        self.add(dir, u128::from(bytes) * NANO_UNITS_PER_UNIT, nano_ops);
    }

    /// Settle an allowance charged ahead (`charge_ahead`) of which
    /// `left` is unspent: bytes for the bps buckets and nano-ops for the
    /// iops buckets, of `charged`. What was spent counts as spent now, at
    /// the settling: the allowance comes off the buckets whole (as far as
    /// they still hold it after leaking) and the part spent goes back on.
    /// So the leak of a bucket that would have stood empty while the
    /// allowance waited to be spent is never lent to the requests that
    /// spent it late: never earlier than requests that came to the
    /// scheduler one by one.
    pub fn give_back(
        &mut self,
        dir: Direction,
        charged: (u64, u128),
        left: (u64, u128),
        now: Duration,
    ) {
        self.leak(now);
        for kind in BucketKind::ALL {
            let spec = self.limits.get(kind);
            if !kind.applies_to(dir) || spec.avg == 0 {
                continue;
            }
            let (charged, left) = if kind.counts_bytes() {
                (
                    u128::from(charged.0) * NANO_UNITS_PER_UNIT,
                    u128::from(left.0) * NANO_UNITS_PER_UNIT,
                )
            } else {
                (charged.1, left.1)
            };
            let spent = charged.saturating_sub(left);
            let level = &mut self.levels[kind as usize];
            level.main = level.main.saturating_sub(charged) + spent;
            if spec.max != 0 {
                level.burst = level.burst.saturating_sub(charged) + spent;
            }
        }
    }

    /// Add `nano_bytes` to the bps buckets and `nano_ops` to the iops
    /// buckets that apply to `dir`.
    fn add(&mut self, dir: Direction, nano_bytes: u128, nano_ops: u128) {
        for kind in BucketKind::ALL {
            let spec = self.limits.get(kind);
            if !kind.applies_to(dir) || spec.avg == 0 {
                continue;
            }
            let amount = if kind.counts_bytes() {
                nano_bytes
            } else {
                nano_ops
            };
            let level = &mut self.levels[kind as usize];
            level.main = level.main.saturating_add(amount);
            if spec.max != 0 {
                level.burst = level.burst.saturating_add(amount);
            }
        }
    }

    /// Every bucket in force (a non-zero average), in QEMU's order, as it
    /// stands at `now`: leaked on a copy, so reading changes nothing.
    /// While the main bucket of a burst fills at the burst rate it also
    /// leaks at the average rate, so it fills at `max - avg` net: an empty
    /// one lasts `max * max_length / (max - avg)`, a little longer than
    /// `max_length` (QEMU's bucket behaves the same).
    pub fn readings(&self, now: Duration) -> Vec<BucketReading> {
        let mut state = self.clone();
        state.leak(now);
        let units = |nano: u128| u64::try_from(nano / NANO_UNITS_PER_UNIT).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for kind in BucketKind::ALL {
            let spec = state.limits.get(kind);
            if spec.avg == 0 {
                continue;
            }
            let level = state.levels[kind as usize].main;
            let (capacity, burst) = spec.capacities();
            let room = capacity.saturating_sub(level);
            let burst_left = (burst.is_some() && spec.max > spec.avg).then(|| {
                // room nano-units at (max - avg) units/s, i.e. nano-units
                // per ns: the quotient is in nanoseconds.
                duration_from_nanos(room / u128::from(spec.max - spec.avg))
            });
            // An empty capacity (a burst rate of 0 is no burst) cannot
            // occur with a burst; 100 % if it did.
            let burst_balance_pct = burst.map(|_| {
                room.saturating_mul(100)
                    .checked_div(capacity)
                    .map_or(100, |pct| u64::try_from(pct).unwrap_or(100))
            });
            out.push(BucketReading {
                kind,
                level: units(level),
                capacity: units(capacity),
                burst_left,
                burst_balance_pct,
            });
        }
        out
    }

    /// Charge a dispatched request of `bytes` going `dir` to every bucket
    /// that applies: its bytes to bps buckets, its operation count
    /// (1, or bytes/iops_size when larger) to iops buckets.
    pub fn account(&mut self, dir: Direction, bytes: u64, now: Duration) {
        self.leak(now);
        let nano_ops = self.limits.nano_ops(bytes);
        self.add(dir, u128::from(bytes) * NANO_UNITS_PER_UNIT, nano_ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits(kind: BucketKind, avg: u64) -> Limits {
        let mut l = Limits::default();
        l.get_mut(kind).avg = avg;
        l
    }

    #[test]
    fn unlimited_never_waits() {
        let mut s = ThrottleState::new(Limits::default(), Duration::ZERO);
        for _ in 0..1000 {
            assert_eq!(s.wait(Direction::Read, Duration::ZERO), Duration::ZERO);
            s.account(Direction::Read, MIB, Duration::ZERO);
        }
        assert!(Limits::default().is_unlimited());
    }

    #[test]
    fn bps_read_exact_deadline() {
        // 1 MiB/s: the bucket holds 0.1 s = 104857.6 bytes.
        let mut s = ThrottleState::new(limits(BucketKind::BpsRead, MIB), Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), Duration::ZERO);
        s.account(Direction::Read, 256 * KIB, Duration::ZERO);
        // Level 262144 B, capacity 104857.6 B: 157286.4 B over, at 1 MiB/s
        // that is exactly 0.15 s.
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(150));
        assert_eq!(s.wait(Direction::Read, ms(100)), ms(50));
        assert_eq!(s.wait(Direction::Read, ms(150)), Duration::ZERO);
        // Writes are not metered by a read limit.
        assert_eq!(s.wait(Direction::Write, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn wait_rounds_up_never_early() {
        // 3 B/s, capacity 0.3 B; 1 byte over by 0.7 B needs 233333333.33 ns.
        let mut s = ThrottleState::new(limits(BucketKind::BpsWrite, 3), Duration::ZERO);
        s.account(Direction::Write, 1, Duration::ZERO);
        assert_eq!(
            s.wait(Direction::Write, Duration::ZERO),
            Duration::from_nanos(233_333_334)
        );
    }

    #[test]
    fn bps_total_meters_both_directions() {
        let mut s = ThrottleState::new(limits(BucketKind::BpsTotal, MIB), Duration::ZERO);
        s.account(Direction::Read, 128 * KIB, Duration::ZERO);
        s.account(Direction::Write, 128 * KIB, Duration::ZERO);
        // 262144 - 104857.6 = 157286.4 B over at 1 MiB/s = 150 ms for both.
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(150));
        assert_eq!(s.wait(Direction::Write, Duration::ZERO), ms(150));
    }

    #[test]
    fn iops_counts_operations() {
        // 100 ops/s: capacity 10 ops. Eleven ops fill it one past capacity.
        let mut s = ThrottleState::new(limits(BucketKind::IopsWrite, 100), Duration::ZERO);
        for _ in 0..10 {
            s.account(Direction::Write, 4 * KIB, Duration::ZERO);
        }
        assert_eq!(s.wait(Direction::Write, Duration::ZERO), Duration::ZERO);
        s.account(Direction::Write, MIB, Duration::ZERO);
        assert_eq!(s.wait(Direction::Write, Duration::ZERO), ms(10));
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn iops_total_meters_both_directions() {
        let mut s = ThrottleState::new(limits(BucketKind::IopsTotal, 10), Duration::ZERO);
        s.account(Direction::Read, 1, Duration::ZERO);
        s.account(Direction::Write, 1, Duration::ZERO);
        // 2 ops, capacity 1 op: 1 op over at 10/s = 100 ms.
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(100));
        assert_eq!(s.wait(Direction::Write, Duration::ZERO), ms(100));
    }

    #[test]
    fn iops_size_splits_large_requests() {
        let mut l = limits(BucketKind::IopsRead, 10);
        l.iops_size = 64 * KIB;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        // 1 MiB counts as 16 ops; capacity 1 op; 15 over at 10/s = 1.5 s.
        s.account(Direction::Read, MIB, Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(1500));
        // A request at or below iops_size is one op.
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Read, 64 * KIB, Duration::ZERO);
        s.account(Direction::Read, 1, Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(100));
        // Fractions count: 96 KiB is 1.5 ops; 0.5 over = 50 ms.
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Read, 96 * KIB, Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(50));
    }

    #[test]
    fn request_larger_than_bucket_goes_then_file_waits() {
        // 511 B/s and a 1 MiB request: it must be dispatched at once (no hang)
        // and then the file waits for the bucket to drain.
        let mut s = ThrottleState::new(limits(BucketKind::BpsRead, 511), Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), Duration::ZERO);
        s.account(Direction::Read, MIB, Duration::ZERO);
        // (1048576 - 51.1) / 511 s, rounded up to the nanosecond.
        let expected_ns = (1_048_576u128 * 1_000_000_000 - 51_100_000_000).div_ceil(511);
        assert_eq!(
            s.wait(Direction::Read, Duration::ZERO),
            duration_from_nanos(expected_ns)
        );
    }

    #[test]
    fn burst_allows_max_for_length_then_avg() {
        // avg 1 MiB/s, burst 10 MiB/s for 2 s: the main bucket holds 20 MiB;
        // the burst bucket (1 MiB) caps the burst rate at 10 MiB/s.
        let mut l = limits(BucketKind::BpsWrite, MIB);
        l.get_mut(BucketKind::BpsWrite).max = 10 * MIB;
        l.get_mut(BucketKind::BpsWrite).max_length = Some(Duration::from_secs(2));
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Write, 2 * MIB, Duration::ZERO);
        // Burst bucket: 2 MiB - 1 MiB over at 10 MiB/s = 100 ms.
        assert_eq!(s.wait(Direction::Write, Duration::ZERO), ms(100));
        // Keep writing at the burst rate until the main bucket is full.
        let mut now = Duration::ZERO;
        let mut written = 2 * MIB;
        loop {
            let w = s.wait(Direction::Write, now);
            now += w;
            assert_eq!(s.wait(Direction::Write, now), Duration::ZERO);
            s.account(Direction::Write, MIB, now);
            written += MIB;
            if s.wait(Direction::Write, now) > ms(100) {
                break;
            }
        }
        // The burst lasted about 2 s at 10 MiB/s, minus the avg leak.
        assert!(written >= 20 * MIB, "burst wrote only {written}");
        assert!(
            now >= Duration::from_millis(1800) && now <= Duration::from_millis(2300),
            "{now:?}"
        );
        // After the burst the wait is set by avg: each further MiB costs 1 s.
        let w = s.wait(Direction::Write, now);
        now += w;
        s.account(Direction::Write, MIB, now);
        assert_eq!(s.wait(Direction::Write, now), Duration::from_secs(1));
    }

    #[test]
    fn readings_show_the_burst_spent_and_refilled() {
        // bps_rd=1M, bps_rd_max=10M, bps_rd_max_length=4: the bucket holds
        // 40 MiB and fills at 9 MiB/s net while reading at 10 MiB/s.
        let mut l = limits(BucketKind::BpsRead, MIB);
        l.get_mut(BucketKind::BpsRead).max = 10 * MIB;
        l.get_mut(BucketKind::BpsRead).max_length = Some(Duration::from_secs(4));
        let mut s = ThrottleState::new(l, Duration::ZERO);
        let full_ns = 40 * 1_000_000_000 / 9; // 4.444 s
        let r = s.readings(Duration::ZERO);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, BucketKind::BpsRead);
        assert_eq!((r[0].level, r[0].capacity), (0, 40 * MIB));
        assert_eq!(r[0].burst_left, Some(Duration::from_nanos(full_ns)));
        assert_eq!(r[0].burst_balance_pct, Some(100));
        // Read at the burst rate for 2 s: 20 MiB in, 2 MiB leaked.
        let mut now = Duration::ZERO;
        for _ in 0..200 {
            now += s.wait(Direction::Read, now);
            s.account(Direction::Read, 100 * KIB, now);
        }
        let r = s.readings(now)[0];
        let expected_level = 200 * 100 * KIB - (now.as_nanos() as u64 * MIB / 1_000_000_000);
        assert!(r.level.abs_diff(expected_level) <= 1, "{r:?} at {now:?}");
        let left = (40 * MIB - r.level) as f64 / (9 * MIB) as f64;
        assert!((r.burst_left.unwrap().as_secs_f64() - left).abs() < 1e-6);
        assert_eq!(
            r.burst_balance_pct,
            Some((40 * MIB - r.level) * 100 / (40 * MIB))
        );
        // Reading does not leak the state itself: the same answer twice.
        assert_eq!(s.readings(now), s.readings(now));
        // Bursting on until the bucket is full: nothing left. (100 KiB
        // waits 10 ms at the burst rate, about 100 ms once it is spent.)
        loop {
            let w = s.wait(Direction::Read, now);
            if w > ms(50) {
                break;
            }
            now += w;
            s.account(Direction::Read, 100 * KIB, now);
        }
        let r = s.readings(now)[0];
        assert!(r.burst_left.unwrap() < ms(20), "{r:?}");
        assert_eq!(r.burst_balance_pct, Some(0));
        assert!(now > ms(4300) && now < ms(4600), "{now:?}");
        // Idle for 20 s: 20 MiB leaked, half the burst is back.
        let r = s.readings(now + Duration::from_secs(20))[0];
        assert!(r.burst_balance_pct.unwrap().abs_diff(50) <= 1, "{r:?}");
        // Idle for 45 s (40 MiB and what the last request put over): all
        // of it.
        let r = s.readings(now + Duration::from_secs(45))[0];
        assert_eq!(r.burst_left, Some(Duration::from_nanos(full_ns)));
        assert_eq!(r.level, 0);
    }

    #[test]
    fn readings_without_a_burst_or_with_max_equal_to_avg() {
        let mut l = limits(BucketKind::IopsTotal, 100);
        l.get_mut(BucketKind::BpsWrite).avg = MIB;
        l.get_mut(BucketKind::BpsWrite).max = MIB;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Write, 512 * KIB, Duration::ZERO);
        let r = s.readings(Duration::ZERO);
        assert_eq!(r.len(), 2);
        // bps_wr first (QEMU's order): max == avg has a capacity (1 s at
        // max) and a balance, but no burst to run out of.
        assert_eq!(r[0].kind, BucketKind::BpsWrite);
        assert_eq!((r[0].level, r[0].capacity), (512 * KIB, MIB));
        assert_eq!(r[0].burst_left, None);
        assert_eq!(r[0].burst_balance_pct, Some(50));
        // iops without a burst: level and capacity (100 ms at avg) only.
        assert_eq!(r[1].kind, BucketKind::IopsTotal);
        assert_eq!((r[1].level, r[1].capacity), (1, 10));
        assert_eq!((r[1].burst_left, r[1].burst_balance_pct), (None, None));
        assert!(
            ThrottleState::new(Limits::default(), Duration::ZERO)
                .readings(Duration::ZERO)
                .is_empty()
        );
    }

    #[test]
    fn burst_deadline_covers_both_buckets() {
        // avg = max = 1 B/s: main bucket 1 B, burst bucket 0.1 B. After 2
        // bytes, main needs 1 s and burst 1.9 s: the deadline is the later.
        let mut l = limits(BucketKind::BpsRead, 1);
        l.get_mut(BucketKind::BpsRead).max = 1;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Read, 2, Duration::ZERO);
        let w = s.wait(Direction::Read, Duration::ZERO);
        assert_eq!(w, ms(1900));
        assert_eq!(s.wait(Direction::Read, w), Duration::ZERO);
    }

    #[test]
    fn validate_refuses_a_burst_product_beyond_u128() {
        let mut l = limits(BucketKind::BpsTotal, 1);
        l.get_mut(BucketKind::BpsTotal).max = 1 << 49;
        l.get_mut(BucketKind::BpsTotal).max_length = Some(Duration::from_nanos(u64::MAX) * 65_536);
        assert!(l.validate().unwrap_err().0.contains("too long"));
    }

    #[test]
    fn burst_with_default_length() {
        let mut l = limits(BucketKind::IopsRead, 10);
        l.get_mut(BucketKind::IopsRead).max = 100;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        // Main capacity 100 ops (1 s at max); burst capacity 10 ops.
        for _ in 0..11 {
            s.account(Direction::Read, 1, Duration::ZERO);
        }
        // Burst bucket 11 > 10: 1 op over at 100/s = 10 ms.
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(10));
    }

    #[test]
    fn longest_wait_of_all_applicable_buckets_wins() {
        let mut l = limits(BucketKind::BpsTotal, MIB);
        l.get_mut(BucketKind::IopsRead).avg = 1;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Read, 4 * KIB, Duration::ZERO);
        s.account(Direction::Read, 4 * KIB, Duration::ZERO);
        // iops_rd: 2 ops, capacity 0.1, 1.9 ops over at 1/s = 1.9 s.
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(1900));
        // Writes only see the bps bucket, which has room.
        assert_eq!(s.wait(Direction::Write, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn set_limits_keeps_debt_and_clears_removed_buckets() {
        let mut s = ThrottleState::new(limits(BucketKind::BpsRead, MIB), Duration::ZERO);
        s.account(Direction::Read, 256 * KIB, Duration::ZERO);
        // Raising to 2 MiB/s: capacity 209715.2, over 52428.8 B = 25 ms.
        s.set_limits(limits(BucketKind::BpsRead, 2 * MIB), Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(25));
        s.set_limits(Limits::default(), Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), Duration::ZERO);
        // Setting it back starts from an empty bucket.
        s.set_limits(limits(BucketKind::BpsRead, MIB), Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn until_empty_is_when_every_bucket_has_leaked_to_zero() {
        let mut l = limits(BucketKind::BpsRead, 1_000);
        l.get_mut(BucketKind::IopsRead).avg = 10;
        let mut s = ThrottleState::new(l, ms(0));
        assert_eq!(s.until_empty(ms(0)), Duration::ZERO);
        s.account(Direction::Read, 500, ms(0));
        // 500 bytes at 1000 B/s: 500 ms; one operation at 10/s: 100 ms.
        assert_eq!(s.until_empty(ms(0)), ms(500));
        assert_eq!(s.until_empty(ms(400)), ms(100));
        assert_eq!(s.until_empty(ms(500)), Duration::ZERO);
    }

    #[test]
    fn headroom_is_what_the_buckets_hold_below_capacity() {
        let mut l = limits(BucketKind::BpsRead, 1_000_000);
        l.get_mut(BucketKind::IopsTotal).avg = 100;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        // Empty: a tenth of a second of each rate.
        let room = s.headroom(Direction::Read, Duration::ZERO);
        assert_eq!(room.bytes, Some(100_000));
        assert_eq!(room.nano_ops, Some(10 * NANO_UNITS_PER_UNIT));
        // Writes: no bps bucket applies; the total iops one does.
        let room = s.headroom(Direction::Write, Duration::ZERO);
        assert_eq!(room.bytes, None);
        assert_eq!(room.nano_ops, Some(10 * NANO_UNITS_PER_UNIT));
        s.account(Direction::Read, 40_000, Duration::ZERO);
        let room = s.headroom(Direction::Read, Duration::ZERO);
        assert_eq!(room.bytes, Some(60_000));
        assert_eq!(room.nano_ops, Some(9 * NANO_UNITS_PER_UNIT));
        // Leaking makes room again: 20 ms at 1 MB/s is 20,000 bytes.
        let room = s.headroom(Direction::Read, ms(20));
        assert_eq!(room.bytes, Some(80_000));
        // Above capacity there is none.
        s.account(Direction::Read, MIB, ms(20));
        assert_eq!(s.headroom(Direction::Read, ms(20)).bytes, Some(0));
    }

    #[test]
    fn headroom_with_a_burst_is_bounded_by_both_buckets() {
        let mut l = limits(BucketKind::IopsRead, 10);
        l.get_mut(BucketKind::IopsRead).max = 100;
        l.get_mut(BucketKind::IopsRead).max_length = Some(Duration::from_secs(2));
        let mut s = ThrottleState::new(l, Duration::ZERO);
        // The burst-rate bucket (100/s for 100 ms) is the smaller.
        let room = s.headroom(Direction::Read, Duration::ZERO);
        assert_eq!(room.nano_ops, Some(10 * NANO_UNITS_PER_UNIT));
    }

    #[test]
    fn an_allowance_charged_ahead_still_admits_the_next_request_and_goes_back_whole() {
        let mut l = limits(BucketKind::BpsTotal, MIB);
        l.get_mut(BucketKind::IopsRead).avg = 50;
        l.iops_size = 4 * KIB;
        let fresh = ThrottleState::new(l, Duration::ZERO);
        let mut s = fresh.clone();
        s.account(Direction::Write, 30 * KIB, Duration::ZERO);
        let before = s.clone();
        let room = s.headroom(Direction::Read, ms(5));
        let (bytes, nano_ops) = (room.bytes.unwrap(), room.nano_ops.unwrap());
        s.charge_ahead(Direction::Read, bytes, nano_ops, ms(5));
        // Full to capacity, not beyond: a request after the allowance is
        // still admitted at once, and nothing more may be charged ahead.
        assert_eq!(s.wait(Direction::Read, ms(5)), Duration::ZERO);
        assert_eq!(s.wait(Direction::Write, ms(5)), Duration::ZERO);
        assert_eq!(s.headroom(Direction::Read, ms(5)).bytes, Some(0));
        // Spent in part: a 4 KiB read and a 10 KiB one (1 + 2.5 ops).
        let spent_bytes = 14 * KIB;
        let spent_ops = l.nano_ops(4 * KIB) + l.nano_ops(10 * KIB);
        assert_eq!(spent_ops, 3_500_000_000);
        s.give_back(
            Direction::Read,
            (bytes, nano_ops),
            (bytes - spent_bytes, nano_ops - spent_ops),
            ms(5),
        );
        // As if those two reads had been charged at 5 ms.
        let mut reference = before;
        reference.account(Direction::Read, 4 * KIB, ms(5));
        reference.account(Direction::Read, 10 * KIB, ms(5));
        assert_eq!(s.levels, reference.levels);
    }

    #[test]
    fn refund_gives_back_bytes_not_operations() {
        let mut l = limits(BucketKind::BpsRead, MIB);
        l.get_mut(BucketKind::IopsRead).avg = 10;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Read, MIB, Duration::ZERO);
        s.account(Direction::Read, MIB, Duration::ZERO);
        // The second read hit end of file and moved nothing.
        s.refund(Direction::Read, MIB, Duration::ZERO);
        // bps: 1 MiB - 0.1 MiB over = 900 ms; iops: 2 ops - 1 = 100 ms.
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(900));
        s.refund(Direction::Read, 10 * MIB, Duration::ZERO);
        assert_eq!(s.wait(Direction::Read, Duration::ZERO), ms(100));
    }

    #[test]
    fn time_going_backwards_is_ignored() {
        let mut s = ThrottleState::new(limits(BucketKind::BpsRead, MIB), ms(1000));
        s.account(Direction::Read, 256 * KIB, ms(1000));
        assert_eq!(s.wait(Direction::Read, ms(500)), ms(150));
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut l = limits(BucketKind::BpsTotal, u64::MAX);
        l.get_mut(BucketKind::BpsTotal).max = u64::MAX;
        l.get_mut(BucketKind::IopsTotal).avg = 1;
        l.iops_size = 1;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        for _ in 0..4 {
            s.account(Direction::Write, u64::MAX, Duration::MAX);
        }
        let _ = s.wait(Direction::Write, Duration::MAX);
        let _ = s.wait(Direction::Write, Duration::ZERO);
    }

    #[test]
    fn validate_rejects_total_with_split() {
        let mut l = limits(BucketKind::BpsTotal, MIB);
        l.get_mut(BucketKind::BpsWrite).avg = MIB;
        assert_eq!(
            l.validate().unwrap_err().0,
            "bps_wr cannot be used together with bps"
        );
        let mut l = limits(BucketKind::IopsRead, 5);
        l.get_mut(BucketKind::IopsTotal).avg = 5;
        assert_eq!(
            l.validate().unwrap_err().0,
            "iops_rd cannot be used together with iops"
        );
        // Read and write splits together are fine.
        let mut l = limits(BucketKind::BpsRead, MIB);
        l.get_mut(BucketKind::BpsWrite).avg = MIB;
        l.get_mut(BucketKind::IopsTotal).avg = 100;
        assert!(l.validate().is_ok());
    }

    #[test]
    fn validate_rejects_bad_bursts() {
        let mut l = Limits::default();
        l.get_mut(BucketKind::BpsRead).max = MIB;
        assert_eq!(l.validate().unwrap_err().0, "bps_rd_max requires bps_rd");
        let mut l = limits(BucketKind::IopsTotal, 100);
        l.get_mut(BucketKind::IopsTotal).max = 50;
        assert_eq!(
            l.validate().unwrap_err().0,
            "iops_max must not be lower than iops"
        );
        let mut l = limits(BucketKind::BpsWrite, MIB);
        l.get_mut(BucketKind::BpsWrite).max_length = Some(Duration::from_secs(5));
        assert_eq!(
            l.validate().unwrap_err().0,
            "bps_wr_max_length requires bps_wr_max"
        );
        l.get_mut(BucketKind::BpsWrite).max = 2 * MIB;
        assert!(l.validate().is_ok());
        l.get_mut(BucketKind::BpsWrite).max_length = Some(Duration::ZERO);
        assert_eq!(
            l.validate().unwrap_err().0,
            "bps_wr_max_length must be greater than 0"
        );
        let mut l = limits(BucketKind::BpsTotal, MIB);
        l.get_mut(BucketKind::BpsTotal).max = MIB;
        l.get_mut(BucketKind::BpsRead).max = MIB;
        assert_eq!(
            l.validate().unwrap_err().0,
            "bps_rd_max cannot be used together with bps_max"
        );
        let l = limits(BucketKind::BpsTotal, MAX_LIMIT_VALUE + 1);
        assert!(
            l.validate()
                .unwrap_err()
                .0
                .starts_with("bps must be at most")
        );
    }

    fn per_gb(kind: BucketKind, rate: u64, min: u64, cap: u64) -> Limits {
        let mut l = Limits::default();
        *l.per_gb_mut(kind) = PerGbSpec { rate, min, cap };
        l
    }

    #[test]
    fn whole_gib_are_counted_rounded_up_and_at_least_one() {
        assert_eq!(gib_of(0), 1);
        assert_eq!(gib_of(1), 1);
        assert_eq!(gib_of(BYTES_PER_GIB), 1);
        assert_eq!(gib_of(BYTES_PER_GIB + 1), 2);
        assert_eq!(gib_of(50 * BYTES_PER_GIB), 50);
        assert_eq!(gib_of(u64::MAX), 1 << 34);
    }

    #[test]
    fn per_gb_derives_size_times_rate_within_floor_and_ceiling() {
        let spec = PerGbSpec {
            rate: 3,
            min: 100,
            cap: 0,
        };
        assert_eq!(spec.derive(50 * BYTES_PER_GIB), 150);
        assert_eq!(spec.derive(100 * BYTES_PER_GIB), 300);
        assert_eq!(spec.derive(10 * BYTES_PER_GIB), 100, "the floor");
        assert_eq!(spec.derive(0), 100, "an empty disk counts 1 GiB");
        let capped = PerGbSpec { cap: 200, ..spec };
        assert_eq!(capped.derive(100 * BYTES_PER_GIB), 200, "the ceiling");
        let bare = PerGbSpec {
            rate: 3,
            min: 0,
            cap: 0,
        };
        assert_eq!(bare.derive(0), 3, "never 0, which would be unlimited");
        assert_eq!(bare.derive(BYTES_PER_GIB / 2), 3);
        let huge = PerGbSpec {
            rate: MAX_LIMIT_VALUE,
            min: 0,
            cap: 0,
        };
        assert_eq!(huge.derive(u64::MAX), MAX_LIMIT_VALUE, "no overflow");
    }

    #[test]
    fn derive_fills_the_averages_and_drops_bursts_they_passed() {
        let mut l = per_gb(BucketKind::IopsTotal, 3, 100, 0);
        l.get_mut(BucketKind::IopsTotal).max = 200;
        l.get_mut(BucketKind::IopsTotal).max_length = Some(Duration::from_secs(4));
        l.validate().unwrap();
        let small = l.derive(50 * BYTES_PER_GIB);
        assert_eq!(small.limits.get(BucketKind::IopsTotal).avg, 150);
        assert_eq!(small.limits.get(BucketKind::IopsTotal).max, 200);
        assert!(small.ignored.is_empty());
        assert_eq!(small.limits.per_gb, l.per_gb, "the rule stays, to be shown");
        let big = l.derive(100 * BYTES_PER_GIB);
        assert_eq!(big.limits.get(BucketKind::IopsTotal).avg, 300);
        assert_eq!(
            *big.limits.get(BucketKind::IopsTotal),
            LimitSpec {
                avg: 300,
                max: 0,
                max_length: None
            }
        );
        assert_eq!(big.ignored, vec![("iops_max".to_string(), 200)]);
        // Other buckets are untouched.
        let mut mixed = per_gb(BucketKind::BpsRead, MIB, 0, 0);
        mixed.get_mut(BucketKind::IopsWrite).avg = 7;
        let d = mixed.derive(2 * BYTES_PER_GIB);
        assert_eq!(d.limits.get(BucketKind::BpsRead).avg, 2 * MIB);
        assert_eq!(d.limits.get(BucketKind::IopsWrite).avg, 7);
        assert!(!mixed.is_unlimited() || mixed.has_per_gb());
    }

    #[test]
    fn validate_per_gb_rules() {
        let msg = |l: Limits| l.validate().unwrap_err().0;
        let mut two_forms = per_gb(BucketKind::IopsTotal, 3, 0, 0);
        two_forms.get_mut(BucketKind::IopsTotal).avg = 500;
        assert_eq!(
            msg(two_forms),
            "iops_per_gb cannot be used together with iops (one limit, two forms)"
        );
        let mut split = per_gb(BucketKind::IopsRead, 3, 0, 0);
        split.get_mut(BucketKind::IopsTotal).avg = 500;
        assert_eq!(
            msg(split),
            "iops_rd_per_gb cannot be used together with iops"
        );
        let mut split = per_gb(BucketKind::BpsTotal, 3, 0, 0);
        split.get_mut(BucketKind::BpsWrite).avg = 500;
        assert_eq!(msg(split), "bps_wr cannot be used together with bps_per_gb");
        assert_eq!(
            msg(per_gb(BucketKind::BpsRead, 0, 5, 0)),
            "bps_rd_per_gb_min requires bps_rd_per_gb"
        );
        assert_eq!(
            msg(per_gb(BucketKind::BpsRead, 0, 0, 5)),
            "bps_rd_per_gb_cap requires bps_rd_per_gb"
        );
        assert_eq!(
            msg(per_gb(BucketKind::IopsWrite, 3, 500, 400)),
            "iops_wr_per_gb_min must not be higher than iops_wr_per_gb_cap"
        );
        assert!(
            msg(per_gb(BucketKind::IopsWrite, MAX_LIMIT_VALUE + 1, 0, 0))
                .starts_with("iops_wr_per_gb must be at most")
        );
        // A burst on a per-GiB average is checked when it is computed.
        let mut burst = per_gb(BucketKind::IopsTotal, 3, 0, 0);
        burst.get_mut(BucketKind::IopsTotal).max = 1;
        assert!(burst.validate().is_ok());
        per_gb(BucketKind::IopsWrite, 3, 400, 400)
            .validate()
            .unwrap();
    }
}
