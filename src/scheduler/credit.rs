//! Credit: an allowance the scheduler has already charged to a file's
//! buckets, which the FUSE threads may spend without a round trip to the
//! scheduler.
//!
//! At queue depth 1 a request that the buckets admit at once would
//! otherwise cross three threads (FUSE thread, scheduler, I/O worker), each
//! crossing waking a sleeping one. After a release that leaves a file's
//! queue empty, the scheduler charges the file's buckets ahead for what
//! they still admit at once (`ThrottleState::headroom`: every bucket stays
//! at or below its capacity, so a request after the allowance is still
//! admitted at once) and hands that allowance to the FUSE threads. A
//! request that fits in it is counted in flight and performed at once on
//! the FUSE thread, as a request released by the scheduler at the moment
//! of the grant would be. Only the scheduler charges and refunds buckets.
//!
//! The rules that keep the throttle exact:
//! - Granted only while nothing of the file waits in its queue, and every
//!   request that goes to the scheduler takes what is left back first
//!   (`Credit::revoke`, refunded with its `Msg::Submit`), so no request
//!   spends credit while an earlier one waits, and a barrier (fsync, flush)
//!   sees every write performed on credit before it in flight.
//! - A credit lasts `CREDIT_VALID_US`, and what was spent of it counts as
//!   spent when it is settled (`ThrottleState::give_back`), never earlier:
//!   the leak of a bucket that stood empty while the credit waited is not
//!   lent to requests that spent it late. So requests on credit are never
//!   admitted earlier than they would have been one by one through the
//!   scheduler at the settling; a short validity keeps that delay in the
//!   accounting small (requests spent early are charged up to 2 ms late,
//!   in their disfavour).
//! - Not granted while messages wait in the scheduler's inbox: one of
//!   them may be a request of the file, which a request spending credit
//!   would overtake.
//! - Not for members of a throttle group (their turns are the group's
//!   call), nor while draining.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Scheduler;
use crate::io::Flight;
use crate::throttle::{Direction, Limits, NANO_UNITS_PER_UNIT};

/// How long a credit may be spent after its grant. Short against the
/// 100 ms a bucket holds without a burst, so what a credit can add over a
/// window is at most 2 % of a bucket, and long enough that at queue depth
/// 1 (tens of microseconds a request) one grant serves many requests.
const CREDIT_VALID_US: u64 = 2_000;

/// At most this many bytes are charged ahead in one grant: with a limit
/// that is never reached the headroom is huge, and what is not spent is
/// given back anyway.
const CREDIT_BYTES_MAX: u64 = 64 << 20;

/// At most this many operations are charged ahead in one grant.
const CREDIT_OPS_MAX: u128 = 1024;

/// What one direction of a credit has left; `None`: no bucket of that kind
/// applies (nothing to charge, nothing to run out of).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Left {
    bytes: Option<u64>,
    nano_ops: Option<u128>,
    /// What was charged ahead: (bytes, nano-ops).
    charged: (u64, u128),
}

#[derive(Default)]
struct Grant {
    /// [read, write]; `None`: no credit that way.
    lanes: [Option<Left>; 2],
    /// Spendable before this.
    until: Option<Instant>,
    /// The limits it was charged under, for what a request counts as.
    limits: Limits,
    /// The file's in-flight counts, as for a request the scheduler
    /// releases.
    flight: Option<Arc<Flight>>,
}

/// A file's credit, shared by its FUSE threads and the scheduler.
#[derive(Default)]
pub struct Credit {
    grant: Mutex<Grant>,
}

/// A credit taken back, for the scheduler to settle with the file's
/// buckets (`ThrottleState::give_back`). [read, write]: what was charged
/// ahead and what is left of it, each (bytes, nano-ops).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leftover([Settle; 2]);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Settle {
    charged: (u64, u128),
    left: (u64, u128),
}

impl Leftover {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|l| l.charged == (0, 0))
    }
}

impl Credit {
    /// Spend credit on a request of `bytes` going `dir` at `now`: the file's
    /// in-flight counts, with the request counted in, when it fits.
    /// Counted under the lock, so a `revoke` after it (by a request going
    /// to the scheduler) finds it in flight.
    pub fn take(&self, dir: Direction, bytes: u64, now: Instant) -> Option<Arc<Flight>> {
        let mut g = self.grant.lock().expect("credit");
        if g.until.is_none_or(|until| now >= until) {
            return None;
        }
        let ops = g.limits.nano_ops(bytes);
        let left = g.lanes[dir as usize].as_mut()?;
        if left.bytes.is_some_and(|b| b < bytes) || left.nano_ops.is_some_and(|o| o < ops) {
            return None;
        }
        if let Some(b) = left.bytes.as_mut() {
            *b -= bytes;
        }
        if let Some(o) = left.nano_ops.as_mut() {
            *o -= ops;
        }
        let flight = g.flight.clone()?;
        flight.start(dir == Direction::Write);
        Some(flight)
    }

    /// Take back what is left, to give back to the buckets.
    pub fn revoke(&self) -> Leftover {
        self.grant.lock().expect("credit").revoke()
    }

    /// Whether there is credit to spend now (tests).
    #[cfg(test)]
    fn is_open(&self, now: Instant) -> bool {
        let g = self.grant.lock().expect("credit");
        g.until.is_some_and(|until| now < until) && g.lanes.iter().any(Option::is_some)
    }
}

impl Grant {
    fn revoke(&mut self) -> Leftover {
        let mut back = Leftover::default();
        for (lane, left) in self.lanes.iter_mut().enumerate() {
            if let Some(left) = left.take() {
                back.0[lane] = Settle {
                    charged: left.charged,
                    left: (left.bytes.unwrap_or(0), left.nano_ops.unwrap_or(0)),
                };
            }
        }
        self.until = None;
        self.flight = None;
        back
    }
}

impl Scheduler {
    /// Give back what `file`'s credit has left, if anything.
    pub(super) fn take_back_credit(&mut self, file: u64, now: Instant) {
        if let Some(back) = self.files.get(&file).map(|f| f.shared.credit.revoke()) {
            self.settle_credit(file, back, now);
        }
    }

    /// Settle credit of `file` taken back (`back`) with its buckets.
    pub(super) fn settle_credit(&mut self, file: u64, back: Leftover, now: Instant) {
        if back.is_empty() {
            return;
        }
        let at = self.since_epoch(now);
        if let Some(f) = self.files.get_mut(&file) {
            give_back(&mut f.state, back, at);
        }
    }

    /// Credit `file` for `dirs` ([read, write]) after a release that left
    /// its queue empty: what is left of an earlier credit goes back to the
    /// buckets, and what they admit now is charged ahead and handed out.
    pub(super) fn grant_credit(&mut self, file: u64, dirs: [bool; 2], now: Instant) {
        let at = self.since_epoch(now);
        let draining = self.draining;
        if self.inbox.as_ref().is_some_and(|rx| !rx.is_empty()) {
            return;
        }
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if dirs == [false; 2]
            || draining
            || f.forgotten
            || f.group.is_some()
            || !f.queue.is_empty()
            || f.state.limits().is_unlimited()
        {
            return;
        }
        let mut g = f.shared.credit.grant.lock().expect("credit");
        let back = g.revoke();
        give_back(&mut f.state, back, at);
        for dir in [Direction::Read, Direction::Write] {
            if !dirs[dir as usize] {
                continue;
            }
            let room = f.state.headroom(dir, at);
            let bytes = room.bytes.map(|b| b.min(CREDIT_BYTES_MAX));
            let nano_ops = room
                .nano_ops
                .map(|o| o.min(CREDIT_OPS_MAX * NANO_UNITS_PER_UNIT));
            // Not even one request's operation fits: nothing to hand out.
            if bytes == Some(0) || nano_ops.is_some_and(|o| o < NANO_UNITS_PER_UNIT) {
                continue;
            }
            let charged = (bytes.unwrap_or(0), nano_ops.unwrap_or(0));
            f.state.charge_ahead(dir, charged.0, charged.1, at);
            g.lanes[dir as usize] = Some(Left {
                bytes,
                nano_ops,
                charged,
            });
        }
        if g.lanes.iter().any(Option::is_some) {
            g.until = Some(now + Duration::from_micros(CREDIT_VALID_US));
            g.limits = *f.state.limits();
            g.flight = Some(f.flight.clone());
        }
    }
}

/// Settle a credit taken back (`back`) with `state`'s buckets.
pub(super) fn give_back(state: &mut crate::throttle::ThrottleState, back: Leftover, at: Duration) {
    for dir in [Direction::Read, Direction::Write] {
        let l = back.0[dir as usize];
        if l.charged != (0, 0) {
            state.give_back(dir, l.charged, l.left, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::{BucketKind, ThrottleState};

    fn granted(limits: Limits, lanes: [Option<Left>; 2], now: Instant) -> Credit {
        let c = Credit::default();
        {
            let mut g = c.grant.lock().unwrap();
            g.lanes = lanes;
            g.until = Some(now + Duration::from_micros(CREDIT_VALID_US));
            g.limits = limits;
            g.flight = Some(Arc::default());
        }
        c
    }

    #[test]
    fn a_request_spends_credit_only_while_it_fits_and_lasts() {
        let now = Instant::now();
        let left = Left {
            bytes: Some(10_000),
            nano_ops: Some(2 * NANO_UNITS_PER_UNIT),
            charged: (10_000, 2 * NANO_UNITS_PER_UNIT),
        };
        let c = granted(Limits::default(), [Some(left), None], now);
        // No credit for writes.
        assert!(c.take(Direction::Write, 1, now).is_none());
        // Too large for what is left.
        assert!(c.take(Direction::Read, 10_001, now).is_none());
        let flight = c.take(Direction::Read, 4_000, now).expect("fits");
        assert_eq!(flight.jobs(), 1);
        assert!(c.take(Direction::Read, 4_000, now).is_some());
        // Two operations spent: the third does not fit, whatever its size.
        assert!(c.take(Direction::Read, 1, now).is_none());
        assert_eq!(flight.jobs(), 2);
        // Expired.
        let c = granted(Limits::default(), [Some(left), None], now);
        let later = now + Duration::from_micros(CREDIT_VALID_US);
        assert!(c.take(Direction::Read, 1, later).is_none());
        assert!(!c.is_open(later));
    }

    #[test]
    fn revoking_hands_back_what_is_left_once() {
        let now = Instant::now();
        let l = Limits {
            iops_size: 4096,
            ..Default::default()
        };
        let read = Left {
            bytes: Some(100_000),
            nano_ops: None,
            charged: (100_000, 0),
        };
        let write = Left {
            bytes: None,
            nano_ops: Some(5 * NANO_UNITS_PER_UNIT),
            charged: (0, 5 * NANO_UNITS_PER_UNIT),
        };
        let c = granted(l, [Some(read), Some(write)], now);
        assert!(c.take(Direction::Read, 30_000, now).is_some());
        // 8 KiB is two operations of iops_size.
        assert!(c.take(Direction::Write, 8192, now).is_some());
        let back = c.revoke();
        let settle = |charged, left| Settle { charged, left };
        assert_eq!(
            back.0,
            [
                settle((100_000, 0), (70_000, 0)),
                settle((0, 5 * NANO_UNITS_PER_UNIT), (0, 3 * NANO_UNITS_PER_UNIT))
            ]
        );
        assert!(c.revoke().is_empty());
        assert!(c.take(Direction::Read, 1, now).is_none());
    }

    #[test]
    fn giving_back_a_whole_credit_leaves_the_buckets_as_they_were() {
        let mut l = Limits::default();
        l.get_mut(BucketKind::BpsTotal).avg = 1 << 20;
        l.get_mut(BucketKind::IopsRead).avg = 100;
        let mut s = ThrottleState::new(l, Duration::ZERO);
        s.account(Direction::Write, 5000, Duration::ZERO);
        let before = s.clone();
        let room = s.headroom(Direction::Read, Duration::ZERO);
        let (bytes, ops) = (room.bytes.unwrap(), room.nano_ops.unwrap());
        s.charge_ahead(Direction::Read, bytes, ops, Duration::ZERO);
        let whole = Settle {
            charged: (bytes, ops),
            left: (bytes, ops),
        };
        give_back(&mut s, Leftover([whole, Settle::default()]), Duration::ZERO);
        assert_eq!(
            s.headroom(Direction::Read, Duration::ZERO),
            before.clone().headroom(Direction::Read, Duration::ZERO)
        );
        assert_eq!(
            s.wait(Direction::Write, Duration::ZERO),
            before.clone().wait(Direction::Write, Duration::ZERO)
        );
    }

    /// Credit spent at the end of its 2 ms, after an idle bucket: settled,
    /// the bucket holds what was spent as if the requests had come to the
    /// scheduler at the settling, not less (the leak while the credit
    /// waited is not lent to them).
    #[test]
    fn credit_spent_late_is_charged_as_spent_at_the_settling() {
        let mut l = Limits::default();
        l.get_mut(BucketKind::BpsRead).avg = 1_000_000;
        let grant = Duration::from_secs(1);
        let settle_at = grant + Duration::from_micros(CREDIT_VALID_US);
        let mut s = ThrottleState::new(l, Duration::ZERO);
        let room = s.headroom(Direction::Read, grant);
        let bytes = room.bytes.unwrap();
        s.charge_ahead(Direction::Read, bytes, 0, grant);
        // 50 000 bytes spent just before the credit ran out.
        let spent = 50_000;
        let back = Settle {
            charged: (bytes, 0),
            left: (bytes - spent, 0),
        };
        give_back(&mut s, Leftover([back, Settle::default()]), settle_at);
        let mut direct = ThrottleState::new(l, Duration::ZERO);
        direct.account(Direction::Read, spent, settle_at);
        assert_eq!(
            s.headroom(Direction::Read, settle_at),
            direct.headroom(Direction::Read, settle_at)
        );
        // The bucket had stood empty: without this rule it would hold 2 ms
        // of leak (2000 bytes at 1 MB/s) less than the requests put in.
        assert_eq!(
            s.headroom(Direction::Read, settle_at).bytes,
            Some(room.bytes.unwrap() - spent)
        );
    }
}
