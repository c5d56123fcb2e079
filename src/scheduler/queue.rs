//! One file's queue: its throttle state, its FIFO of waiting requests and
//! the ordering rules, kept free of threads and clocks so they are tested
//! with a fake clock. The rules are walked in one place, `FileQueue::walk`;
//! releasing requests and telling a group which lanes a member could go in
//! both ask it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::io::Flight;
use crate::qos::Qos;
use crate::stats::FileShared;
use crate::throttle::{Direction, Limits, ThrottleState};

/// What the queue needs to know of a request.
pub trait Queued {
    /// Read or write, or `None` for a barrier (which charges nothing).
    fn direction(&self) -> Option<Direction>;
    /// Bytes charged to bps buckets.
    fn bytes(&self) -> u64;
    /// The kernel's id of the request, which numbers requests in the order
    /// the kernel queued them.
    fn unique(&self) -> u64;
}

/// Where a request joins its file's queue.
#[derive(Clone, Copy)]
pub(super) enum Arrival {
    /// A new request from the kernel: in the kernel's order, by its id.
    KernelOrder,
    /// A copy moving on to its destination's queue: behind everything.
    Now,
}

/// Lanes of a group's ready sets: a member is in the read (write) lane
/// when the next read (write) `release` would look at is admitted by its
/// own buckets, and in the barrier lane when a barrier of it may go.
pub(super) const LANES: usize = 3;
pub(super) const BARRIER_LANE: usize = 2;

/// What the walk shows its caller: a request at the head of its lane, or a
/// barrier that may go.
#[derive(Clone, Copy)]
enum Head {
    Barrier,
    Request { dir: Direction, bytes: u64 },
}

/// The caller's answer: release it now (the walk charges the file's own
/// buckets for a request), or leave it queued. A request left queued holds
/// back its lane (every lane, in a strict FIFO); a barrier left queued
/// holds back nothing, since it could go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Take,
    Leave,
}

/// One file's throttle state and queue: the ordering rules, kept free of
/// threads and clocks so they are tested with a fake clock.
pub(super) struct FileQueue<J> {
    pub(super) state: ThrottleState,
    /// Waiting requests in arrival order.
    pub(super) queue: VecDeque<J>,
    /// Released jobs not yet performed by the pool, and of those the
    /// writes (a barrier waits for these only); counted out by the workers.
    pub(super) flight: Arc<Flight>,
    /// The deadline this file has in the heap, if any; heap entries that do
    /// not match it are stale and skipped.
    pub(super) armed: Option<Instant>,
    pub(super) forgotten: bool,
    /// Of a forgotten file kept until its buckets are empty: the
    /// underlying file, held so its number is not reused meanwhile.
    pub(super) anchor: Option<OwnedFd>,
    /// The deadline at which a forgotten file is looked at again (as
    /// `armed`).
    pub(super) collect_at: Option<Instant>,
    /// Counters and the bypass flag, shared with the FUSE threads.
    pub(super) shared: Arc<FileShared>,
    /// The throttle group the file belongs to.
    pub(super) group: Option<String>,
    /// Its weight and reservations in that group.
    pub(super) qos: Qos,
}

impl<J: Queued> FileQueue<J> {
    pub(super) fn new(limits: Limits, at: Duration) -> FileQueue<J> {
        FileQueue {
            state: ThrottleState::new(limits, at),
            queue: VecDeque::new(),
            flight: Arc::default(),
            armed: None,
            forgotten: false,
            anchor: None,
            collect_at: None,
            shared: Arc::default(),
            group: None,
            qos: Qos::default(),
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.flight.jobs() == 0
    }

    /// Put `job` in the queue. From the kernel it goes in the kernel's
    /// order: several FUSE threads hand requests over, so one may reach us
    /// a little after a later one, and still-queued later requests of the
    /// file do not keep that lead.
    pub(super) fn push(&mut self, job: J, arrival: Arrival) {
        match arrival {
            Arrival::KernelOrder => {
                let at = self
                    .queue
                    .iter()
                    .rposition(|q| q.unique() < job.unique())
                    .map_or(0, |i| i + 1);
                self.queue.insert(at, job);
            }
            Arrival::Now => self.queue.push_back(job),
        }
    }

    /// The ordering rules, walked once for every use. `decide` is shown, in
    /// queue order, each request at the head of its lane and each barrier
    /// that may go, with the file's own buckets; what it takes is removed
    /// to `out` (at most `max`), counted in flight and, for a request,
    /// charged to the file's own buckets at `at`.
    ///
    /// Order: in a strict FIFO (a total limit, where reads and writes share
    /// a bucket) the first request left queued holds back everything after
    /// it. Otherwise reads and writes are independent FIFOs in one list: a
    /// read left queued holds back later reads but not a write. A barrier
    /// (fsync, flush) follows every earlier write: it may go once no write
    /// is queued before it or being performed. Reads are not held back by
    /// it, nor it by them; a barrier that may not go holds back later
    /// writes.
    fn walk(
        &mut self,
        at: Duration,
        strict: bool,
        max: usize,
        out: &mut Vec<J>,
        mut decide: impl FnMut(&mut ThrottleState, Head) -> Verdict,
    ) {
        // [read, write]: a request of that lane was left queued.
        let mut blocked = [false; 2];
        // A write stays queued before the current position.
        let mut write_waiting = false;
        let mut taken = 0;
        let mut i = 0;
        while i < self.queue.len() && taken < max {
            let Some(dir) = self.queue[i].direction() else {
                if write_waiting || self.flight.writes() > 0 {
                    blocked[Direction::Write as usize] = true;
                    write_waiting = true;
                } else if decide(&mut self.state, Head::Barrier) == Verdict::Take {
                    let job = self.queue.remove(i).expect("index in range");
                    self.flight.start(false);
                    out.push(job);
                    taken += 1;
                    continue;
                }
                i += 1;
                continue;
            };
            let lane = dir as usize;
            if !blocked[lane] {
                let bytes = self.queue[i].bytes();
                if decide(&mut self.state, Head::Request { dir, bytes }) == Verdict::Take {
                    let job = self.queue.remove(i).expect("index in range");
                    self.state.account(dir, bytes, at);
                    self.flight.start(dir == Direction::Write);
                    out.push(job);
                    taken += 1;
                    continue;
                }
                if strict {
                    break;
                }
                blocked[lane] = true;
            }
            write_waiting |= dir == Direction::Write;
            if blocked == [true, true] {
                break;
            }
            i += 1;
        }
    }

    /// Move whatever may go at `at` to `out`, in order, charging it, and
    /// return how long until the next waiting request may be looked at
    /// again (`None` when nothing waits on a bucket). At most `max`
    /// requests go. `gate`, a group's buckets, must admit each request too
    /// and is charged with it. When draining, the buckets are not asked.
    pub(super) fn release(
        &mut self,
        at: Duration,
        draining: bool,
        out: &mut Vec<J>,
        mut gate: Option<&mut ThrottleState>,
        max: usize,
    ) -> Option<Duration> {
        let strict = self.state.limits().has_total()
            || gate.as_ref().is_some_and(|g| g.limits().has_total());
        let mut earliest: Option<Duration> = None;
        self.walk(at, strict, max, out, |own, head| {
            let Head::Request { dir, bytes } = head else {
                return Verdict::Take;
            };
            let wait = if draining {
                Duration::ZERO
            } else {
                let group = gate.as_mut().map_or(Duration::ZERO, |g| g.wait(dir, at));
                own.wait(dir, at).max(group)
            };
            if wait.is_zero() {
                if let Some(g) = gate.as_mut() {
                    g.account(dir, bytes, at);
                }
                Verdict::Take
            } else {
                earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
                Verdict::Leave
            }
        });
        earliest
    }

    /// What `release` would find at `at` if the group admitted everything:
    /// which lanes ([read, write, barrier]) have a request its own buckets
    /// admit now, and how long until its own buckets admit the earliest
    /// request they hold back (`None`: none is held back by them). It takes
    /// nothing: beyond a request its own buckets admit, only what `release`
    /// sees when the group holds that request back matters, since whether
    /// it goes is the group's call. `group_total`: the group has a total
    /// limit, which makes the queue one strict FIFO as in `release`.
    pub(super) fn candidates(
        &mut self,
        at: Duration,
        draining: bool,
        group_total: bool,
    ) -> ([bool; LANES], Option<Duration>) {
        let strict = self.state.limits().has_total() || group_total;
        let mut lanes = [false; LANES];
        let mut own: Option<Duration> = None;
        self.walk(at, strict, usize::MAX, &mut Vec::new(), |state, head| {
            match head {
                Head::Barrier => lanes[BARRIER_LANE] = true,
                Head::Request { dir, .. } => {
                    let wait = if draining {
                        Duration::ZERO
                    } else {
                        state.wait(dir, at)
                    };
                    if wait.is_zero() {
                        lanes[dir as usize] = true;
                    } else {
                        own = Some(own.map_or(wait, |o| o.min(wait)));
                    }
                }
            }
            Verdict::Leave
        });
        (lanes, own)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::scheduler::fake::*;
    use crate::throttle::BucketKind;

    /// Run the queue with a fake clock: jump from deadline to deadline and
    /// record when each request is released.
    fn drive(q: &mut FileQueue<Fake>, mut at: Duration) -> Vec<(u32, Duration)> {
        let mut log = Vec::new();
        loop {
            let mut out = Vec::new();
            let next = q.release(at, false, &mut out, None, usize::MAX);
            log.extend(out.iter().map(|f| (f.id, at)));
            q.flight.clear(); // performed at once
            match next {
                Some(wait) => at += wait,
                None if q.queue.is_empty() => return log,
                None => {} // a barrier waited on in-flight work
            }
        }
    }

    #[test]
    fn queued_requests_go_in_arrival_order_at_exact_deadlines() {
        // iops_rd = 2: capacity 0.2 ops; one op after another every 0.5 s.
        let mut q = FileQueue::new(limits(BucketKind::IopsRead, 2), Duration::ZERO);
        for id in 1..=3 {
            q.queue.push_back(read(id, 4 * KIB));
        }
        let log = drive(&mut q, Duration::ZERO);
        assert_eq!(log, vec![(1, ms(0)), (2, ms(400)), (3, ms(900))]);
    }

    #[test]
    fn new_request_does_not_overtake_queued_ones() {
        // 1 MiB/s read: a 512 KiB read waits; a tiny read arriving later
        // must not pass it even though it alone would fit the bucket.
        let mut q = FileQueue::new(limits(BucketKind::BpsRead, 1024 * KIB), Duration::ZERO);
        let mut out = Vec::new();
        q.queue.push_back(read(1, 512 * KIB));
        q.queue.push_back(read(2, 512 * KIB));
        assert_eq!(
            q.release(Duration::ZERO, false, &mut out, None, usize::MAX),
            Some(ms(400))
        );
        assert_eq!(ids(&out), vec![1]);
        q.queue.push_back(read(3, 1));
        out.clear();
        assert_eq!(
            q.release(ms(10), false, &mut out, None, usize::MAX),
            Some(ms(390))
        );
        assert!(out.is_empty(), "the small read overtook the queue");
        out.clear();
        q.release(ms(400), false, &mut out, None, usize::MAX);
        assert_eq!(ids(&out), vec![2]);
        out.clear();
        q.release(ms(900), false, &mut out, None, usize::MAX);
        assert_eq!(ids(&out), vec![3]);
    }

    #[test]
    fn large_request_is_not_starved_by_small_ones() {
        let mut q = FileQueue::new(limits(BucketKind::BpsRead, 100 * KIB), Duration::ZERO);
        q.queue.push_back(read(1, 64 * KIB));
        q.queue.push_back(read(2, 1024 * KIB));
        for id in 3..10 {
            q.queue.push_back(read(id, 1));
        }
        let log = drive(&mut q, Duration::ZERO);
        assert_eq!(
            log.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            (1..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn directions_are_independent_without_a_total_limit() {
        let mut q = FileQueue::new(limits(BucketKind::BpsRead, 100 * KIB), Duration::ZERO);
        q.queue.push_back(read(1, 64 * KIB));
        q.queue.push_back(read(2, 64 * KIB));
        q.queue.push_back(write(3, 64 * KIB));
        let mut out = Vec::new();
        let next = q.release(Duration::ZERO, false, &mut out, None, usize::MAX);
        // The write is not held back by the waiting read.
        assert_eq!(ids(&out), vec![1, 3]);
        // 65536 - 10240 = 55296 B over at 100 KiB/s = 540 ms.
        assert_eq!(next, Some(ms(540)));
    }

    #[test]
    fn total_limit_keeps_one_strict_fifo() {
        let mut q = FileQueue::new(limits(BucketKind::BpsTotal, 100 * KIB), Duration::ZERO);
        q.queue.push_back(read(1, 64 * KIB));
        q.queue.push_back(read(2, 64 * KIB));
        q.queue.push_back(write(3, 1));
        let log = drive(&mut q, Duration::ZERO);
        assert_eq!(log, vec![(1, ms(0)), (2, ms(540)), (3, ms(1180))]);
    }

    #[test]
    fn barrier_waits_for_earlier_requests_to_be_performed() {
        let mut q = FileQueue::new(limits(BucketKind::BpsWrite, 100 * KIB), Duration::ZERO);
        q.queue.push_back(write(1, 64 * KIB));
        q.queue.push_back(write(2, 64 * KIB));
        q.queue.push_back(barrier(3));
        q.queue.push_back(write(4, 1));
        let mut out = Vec::new();
        q.release(Duration::ZERO, false, &mut out, None, usize::MAX);
        assert_eq!(ids(&out), vec![1]);
        // At the deadline write 2 goes, but the barrier stays: 1 and 2 are
        // still being performed, and write 4 may not pass the barrier.
        out.clear();
        q.release(ms(540), false, &mut out, None, usize::MAX);
        assert_eq!(ids(&out), vec![2]);
        assert_eq!(q.flight.writes(), 2);
        out.clear();
        q.release(ms(541), false, &mut out, None, usize::MAX);
        assert!(out.is_empty());
        // Both performed: the barrier goes, and write 4 after it.
        q.flight.clear();
        out.clear();
        q.release(ms(1200), false, &mut out, None, usize::MAX);
        assert_eq!(ids(&out), vec![3, 4]);
    }

    #[test]
    fn barrier_neither_waits_for_reads_nor_holds_them_back() {
        let mut l = limits(BucketKind::BpsRead, 100 * KIB);
        l.get_mut(BucketKind::BpsWrite).avg = 100 * KIB;
        let mut q = FileQueue::new(l, Duration::ZERO);
        q.queue.push_back(read(1, 64 * KIB));
        q.queue.push_back(read(2, 64 * KIB));
        q.queue.push_back(barrier(3));
        let mut out = Vec::new();
        q.release(Duration::ZERO, false, &mut out, None, usize::MAX);
        // Read 2 waits on its bucket and read 1 is being performed, yet the
        // barrier goes: it orders writes only.
        assert_eq!(ids(&out), vec![1, 3]);

        let mut q = FileQueue::new(l, Duration::ZERO);
        q.queue.push_back(write(1, 64 * KIB));
        q.queue.push_back(write(2, 64 * KIB));
        q.queue.push_back(barrier(3));
        q.queue.push_back(read(4, 1));
        q.queue.push_back(write(5, 1));
        out.clear();
        q.release(Duration::ZERO, false, &mut out, None, usize::MAX);
        // Write 2 waits, so the barrier waits, and so does the write after
        // it; the read behind the barrier goes.
        assert_eq!(ids(&out), vec![1, 4]);
    }

    #[test]
    fn draining_releases_everything_in_order() {
        let mut q = FileQueue::new(limits(BucketKind::BpsTotal, 1), Duration::ZERO);
        for id in 1..=5 {
            q.queue.push_back(write(id, 64 * KIB));
        }
        let mut out = Vec::new();
        assert_eq!(
            q.release(Duration::ZERO, true, &mut out, None, usize::MAX),
            None
        );
        assert_eq!(ids(&out), vec![1, 2, 3, 4, 5]);
        assert!(q.queue.is_empty());
    }

    #[test]
    fn unlimited_file_never_arms_a_deadline() {
        let mut q = FileQueue::new(Limits::default(), Duration::ZERO);
        for id in 1..=100 {
            q.queue.push_back(read(id, 1024 * KIB));
        }
        let mut out = Vec::new();
        assert_eq!(
            q.release(Duration::ZERO, false, &mut out, None, usize::MAX),
            None
        );
        assert_eq!(out.len(), 100);
    }

    #[test]
    fn a_late_arrival_from_the_kernel_takes_its_place_by_id() {
        let mut q = FileQueue::new(limits(BucketKind::IopsRead, 1), Duration::ZERO);
        for (id, arrival) in [
            (2, Arrival::KernelOrder),
            (4, Arrival::KernelOrder),
            (3, Arrival::KernelOrder),
            (1, Arrival::Now),
            (5, Arrival::KernelOrder),
        ] {
            q.push(read(id, 4 * KIB), arrival);
        }
        // A copy moving on (1) goes behind what is queued; a request from
        // the kernel goes after every queued one with a lower id.
        let order: Vec<u32> = q.queue.iter().map(|f| f.id).collect();
        assert_eq!(order, vec![2, 3, 4, 1, 5]);
    }

    /// A queue built from `recipe`: (kind of request, bytes) in order, and
    /// how many of its writes are in flight.
    fn queue_of(
        limits: Limits,
        recipe: &[(u8, u64)],
        writes_in_flight: usize,
        spent: &[(u8, u64)],
    ) -> FileQueue<Fake> {
        let mut q = FileQueue::new(limits, Duration::ZERO);
        for (id, (kind, bytes)) in recipe.iter().enumerate() {
            let id = id as u32;
            q.queue.push_back(match kind % 3 {
                0 => read(id, *bytes),
                1 => write(id, *bytes),
                _ => barrier(id),
            });
        }
        for _ in 0..writes_in_flight {
            q.flight.start(true);
        }
        for (kind, bytes) in spent {
            let dir = if kind % 2 == 0 {
                Direction::Read
            } else {
                Direction::Write
            };
            q.state.account(dir, *bytes, Duration::ZERO);
        }
        q
    }

    proptest::proptest! {
        /// The group relies on this: a member is in a ready lane exactly
        /// when `release` would let a request of that lane go (its first
        /// one, if the group admits it), and the member's own deadline is
        /// `release`'s when nothing may go.
        #[test]
        fn candidates_and_release_follow_the_same_rules(
            kinds in proptest::collection::vec(0usize..6, 0..3),
            avg in 1u64..2_000_000,
            recipe in proptest::collection::vec((0u8..3, 1u64..1_000_000), 0..12),
            writes_in_flight in 0usize..2,
            spent in proptest::collection::vec((0u8..2, 1u64..1_000_000), 0..4),
            at_us in 0u64..2_000_000,
        ) {
            let mut l = Limits::default();
            for k in &kinds {
                l.get_mut(BucketKind::ALL[*k]).avg = avg;
            }
            let at = Duration::from_micros(at_us);
            let mut a = queue_of(l, &recipe, writes_in_flight, &spent);
            let mut b = queue_of(l, &recipe, writes_in_flight, &spent);
            let (lanes, own) = a.candidates(at, false, false);
            let mut out = Vec::new();
            let next = b.release(at, false, &mut out, None, 1);
            match out.first() {
                Some(job) => {
                    let lane = job.dir.map_or(BARRIER_LANE, |d| d as usize);
                    proptest::prop_assert!(lanes[lane], "{lanes:?} {:?}", job);
                }
                None => {
                    proptest::prop_assert_eq!(lanes, [false; LANES]);
                    proptest::prop_assert_eq!(next, own);
                }
            }
        }
    }
}
