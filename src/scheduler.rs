//! The one scheduler thread. It owns every file's throttle state, a FIFO of
//! waiting requests per file and a binary heap of wakeup deadlines. It
//! blocks in `recv_deadline` until the earliest deadline or the next
//! message; nothing polls, and no deadline is armed for a file with nothing
//! waiting. Released requests go to the I/O pool; the pool reports each
//! completion back so that barriers (fsync, flush) are answered only after
//! every earlier request of their file has been performed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fuser::Errno;

use crate::io::{Completion, Job, JobSender};
use crate::stats::FileShared;
use crate::throttle::{Direction, Limits, ThrottleState};

/// What the scheduler is told.
pub enum Msg {
    /// A request for `file` (the FUSE inode number), with its reply inside;
    /// `unique` is the kernel's id of the request.
    Submit { file: u64, unique: u64, job: Job },
    /// The kernel interrupts request `unique` (its caller got a signal).
    Interrupt(u64),
    /// The limits in force for `file` changed (or are set the first time):
    /// applied at once, to queued requests too.
    Limits {
        file: u64,
        limits: Limits,
        shared: Arc<FileShared>,
    },
    /// The I/O pool finished a job of this file.
    Done(Completion),
    /// The kernel forgot the inode: its state may go once it is idle.
    Forget(u64),
    /// Shutting down: release every queued request now, and every new one
    /// at once, so no caller waits on a throttle that is going away.
    Drain,
    /// The session has ended: drain, then stop once nothing is queued or in
    /// flight.
    Exit,
    /// Answer on this channel once nothing is queued or in flight.
    WhenIdle(Sender<()>),
}

/// What the queue needs to know of a request.
pub trait Queued {
    /// Read or write, or `None` for a barrier (which charges nothing).
    fn direction(&self) -> Option<Direction>;
    /// Bytes charged to bps buckets.
    fn bytes(&self) -> u64;
}

/// A request waiting in a file's queue, with the kernel's id for it.
struct Waiting {
    unique: u64,
    job: Job,
    /// When it joined this queue.
    since: Instant,
}

impl Queued for Waiting {
    fn direction(&self) -> Option<Direction> {
        self.job.direction()
    }
    fn bytes(&self) -> u64 {
        self.job.bytes()
    }
}

/// Interrupts that arrived before their request reached us (another FUSE
/// thread may still be handing it over) are remembered, at most this many;
/// the oldest ids go first. Interrupts for requests that never come here
/// (files without limits, requests already answered) are what fills it.
const EARLY_INTERRUPTS_MAX: usize = 1024;

/// One file's throttle state and queue: the ordering rules, kept free of
/// threads and clocks so they are tested with a fake clock.
struct FileQueue<J> {
    state: ThrottleState,
    /// Waiting requests in arrival order.
    queue: VecDeque<J>,
    /// Released jobs not yet performed by the pool.
    in_flight: usize,
    /// The deadline this file has in the heap, if any; heap entries that do
    /// not match it are stale and skipped.
    armed: Option<Instant>,
    forgotten: bool,
    /// Counters and the bypass flag, shared with the FUSE threads.
    shared: Arc<FileShared>,
}

impl<J: Queued> FileQueue<J> {
    fn new(limits: Limits, at: Duration) -> FileQueue<J> {
        FileQueue {
            state: ThrottleState::new(limits, at),
            queue: VecDeque::new(),
            in_flight: 0,
            armed: None,
            forgotten: false,
            shared: Arc::default(),
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0
    }

    /// Move whatever may go at `at` to `out`, in order, charging it, and
    /// return how long until the next waiting request may be looked at
    /// again (`None` when nothing waits on a bucket).
    ///
    /// Order: with a total limit (reads and writes share a bucket) the queue
    /// is one strict FIFO. With only per-direction limits, reads and writes
    /// are independent FIFOs in one list: a waiting read holds back later
    /// reads but not a write its own buckets allow. A barrier holds back
    /// everything after it and goes only when everything before it has been
    /// performed. When draining, the buckets are not asked.
    fn release(&mut self, at: Duration, draining: bool, out: &mut Vec<J>) -> Option<Duration> {
        let strict = self.state.limits().has_total();
        let mut blocked = [false; 2];
        let mut earliest: Option<Duration> = None;
        let mut i = 0;
        while i < self.queue.len() {
            let Some(dir) = self.queue[i].direction() else {
                if i == 0 && self.in_flight == 0 {
                    let job = self.queue.pop_front().expect("non-empty");
                    self.in_flight += 1;
                    out.push(job);
                    continue;
                }
                break;
            };
            let lane = match dir {
                Direction::Read => 0,
                Direction::Write => 1,
            };
            if blocked[lane] {
                i += 1;
                continue;
            }
            let wait = if draining {
                Duration::ZERO
            } else {
                self.state.wait(dir, at)
            };
            if wait.is_zero() {
                let job = self.queue.remove(i).expect("index in range");
                self.state.account(dir, job.bytes(), at);
                self.in_flight += 1;
                out.push(job);
                continue;
            }
            earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
            if strict {
                break;
            }
            blocked[lane] = true;
            if blocked == [true, true] {
                break;
            }
            i += 1;
        }
        earliest
    }
}

pub struct Scheduler {
    /// Time zero of the throttle maths.
    epoch: Instant,
    defaults: Limits,
    files: HashMap<u64, FileQueue<Waiting>>,
    /// Which file's queue holds each waiting request, by kernel id.
    waiting: HashMap<u64, u64>,
    early_interrupts: BTreeSet<u64>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    jobs: JobSender,
    draining: bool,
    exiting: bool,
    idle_waiters: Vec<Sender<()>>,
}

impl Scheduler {
    pub fn new(defaults: Limits, jobs: JobSender) -> Scheduler {
        Scheduler {
            epoch: Instant::now(),
            defaults,
            files: HashMap::new(),
            waiting: HashMap::new(),
            early_interrupts: BTreeSet::new(),
            deadlines: BinaryHeap::new(),
            jobs,
            draining: false,
            exiting: false,
            idle_waiters: Vec::new(),
        }
    }

    pub fn spawn(self, rx: Receiver<Msg>) -> std::io::Result<JoinHandle<()>> {
        thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || self.run(rx))
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            if self.exiting && self.is_idle() {
                break;
            }
            let received = match self.deadlines.peek() {
                Some(Reverse((when, _))) => match rx.recv_deadline(*when) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => break,
                },
            };
            let now = Instant::now();
            if let Some(msg) = received {
                self.handle(msg, now);
            }
            self.fire_due(now);
            if !self.idle_waiters.is_empty() && self.is_idle() {
                for w in self.idle_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
        // Anything still queued here (only if every sender vanished) is
        // dropped, which answers it EIO rather than leaving it hanging.
        log::debug!("scheduler stopped");
    }

    fn is_idle(&self) -> bool {
        self.files.values().all(|f| f.is_idle())
    }

    fn handle(&mut self, msg: Msg, now: Instant) {
        match msg {
            Msg::Submit { file, unique, job } => {
                if self.early_interrupts.remove(&unique) {
                    job.fail(Errno::EINTR);
                } else {
                    let w = Waiting {
                        unique,
                        job,
                        since: now,
                    };
                    self.enqueue(file, w, now);
                }
            }
            Msg::Limits {
                file,
                limits,
                shared,
            } => {
                let at = self.since_epoch(now);
                let f = self
                    .files
                    .entry(file)
                    .or_insert_with(|| FileQueue::new(limits, at));
                f.shared = shared;
                f.forgotten = false;
                // Levels are kept: a raised limit releases queued requests
                // now, a lowered one slows the next releases.
                f.state.set_limits(limits, at);
                self.pump(file, now);
            }
            Msg::Interrupt(unique) => self.interrupt(unique, now),
            Msg::Done(Completion { file, unmoved }) => {
                let at = self.since_epoch(now);
                if let Some(f) = self.files.get_mut(&file) {
                    f.in_flight = f.in_flight.saturating_sub(1);
                    let mut pump = f.in_flight == 0 && !f.queue.is_empty();
                    if let Some((dir, bytes)) = unmoved {
                        // Charge what moved, not what was asked for.
                        f.state.refund(dir, bytes, at);
                        pump |= !f.queue.is_empty();
                    }
                    if pump {
                        // A barrier at the head, or a request the refund
                        // lets through, may now go.
                        self.pump(file, now);
                    }
                }
                self.settle(file);
                self.collect(file);
            }
            Msg::Forget(file) => {
                if let Some(f) = self.files.get_mut(&file) {
                    f.forgotten = true;
                }
                self.collect(file);
            }
            Msg::Drain | Msg::Exit => {
                self.exiting |= matches!(msg, Msg::Exit);
                if !self.draining {
                    log::info!("releasing every queued request without throttling");
                }
                self.draining = true;
                let ids: Vec<u64> = self.files.keys().copied().collect();
                for id in ids {
                    self.pump(id, now);
                }
            }
            Msg::WhenIdle(tx) => self.idle_waiters.push(tx),
        }
    }

    /// Cancel a request still waiting: it is answered EINTR and charges
    /// nothing. One already released completes normally.
    fn interrupt(&mut self, unique: u64, now: Instant) {
        let Some(file) = self.waiting.remove(&unique) else {
            self.early_interrupts.insert(unique);
            while self.early_interrupts.len() > EARLY_INTERRUPTS_MAX {
                self.early_interrupts.pop_first();
            }
            return;
        };
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if let Some(pos) = f.queue.iter().position(|w| w.unique == unique) {
            let w = f.queue.remove(pos).expect("found");
            f.shared
                .record_dequeued(now.saturating_duration_since(w.since));
            log::debug!("request {unique} of inode {file} interrupted while queued");
            w.job.fail(Errno::EINTR);
            // Whatever waited behind it may go now.
            self.pump(file, now);
            self.collect(file);
        }
    }

    fn enqueue(&mut self, file: u64, mut w: Waiting, now: Instant) {
        self.waiting.insert(w.unique, file);
        w.since = now;
        let at = self.since_epoch(now);
        let defaults = self.defaults;
        let f = self
            .files
            .entry(file)
            .or_insert_with(|| FileQueue::new(defaults, at));
        f.forgotten = false;
        f.shared.bypass.store(false, Ordering::SeqCst);
        f.shared.record_queued();
        f.queue.push_back(w);
        self.pump(file, now);
    }

    /// A file without limits and with nothing queued or in flight may be
    /// served inline again, without the scheduler; not before, so that a
    /// barrier or a queued request is never overtaken.
    fn settle(&mut self, file: u64) {
        if let Some(f) = self.files.get(&file)
            && f.is_idle()
            && f.state.limits().is_unlimited()
        {
            f.shared.bypass.store(true, Ordering::SeqCst);
        }
    }

    /// Drop the state of a forgotten file once nothing of it is pending.
    fn collect(&mut self, file: u64) {
        if self
            .files
            .get(&file)
            .is_some_and(|f| f.forgotten && f.is_idle())
        {
            self.files.remove(&file);
        }
    }

    fn since_epoch(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }

    /// Pop every deadline that has come and release what it was for.
    fn fire_due(&mut self, now: Instant) {
        while let Some(Reverse((when, file))) = self.deadlines.peek().copied() {
            if when > now {
                break;
            }
            self.deadlines.pop();
            let current = self.files.get(&file).is_some_and(|f| f.armed == Some(when));
            if current {
                self.files.get_mut(&file).expect("checked").armed = None;
                self.pump(file, now);
            }
        }
    }

    /// Release whatever of `file`'s queue may go at `now` and arm the
    /// file's next deadline.
    fn pump(&mut self, file: u64, now: Instant) {
        let at = self.since_epoch(now);
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        let mut released = Vec::new();
        let next = f.release(at, self.draining, &mut released);
        match next {
            Some(wait) => {
                let when = now + wait;
                if f.armed != Some(when) {
                    f.armed = Some(when);
                    self.deadlines.push(Reverse((when, file)));
                }
            }
            None => f.armed = None,
        }
        let shared = f.shared.clone();
        for mut w in released {
            self.waiting.remove(&w.unique);
            shared.record_dequeued(now.saturating_duration_since(w.since));
            match w.job.hand_off() {
                // A copy passed its source's buckets: it is not in flight
                // there, and now queues on its destination as a write.
                Some(next) => {
                    if let Some(f) = self.files.get_mut(&file) {
                        f.in_flight = f.in_flight.saturating_sub(1);
                    }
                    self.enqueue(next, w, now);
                }
                None => dispatch(&self.jobs, file, w.job),
            }
        }
        self.settle(file);
    }
}

fn dispatch(jobs: &JobSender, file: u64, job: Job) {
    if let Err(job) = jobs.send(file, job) {
        // The pool is gone (only during teardown).
        log::warn!("I/O pool gone, failing a request of inode {file}");
        job.fail(Errno::EIO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::BucketKind;

    const KIB: u64 = 1024;

    #[derive(Debug, PartialEq)]
    struct Fake {
        id: u32,
        dir: Option<Direction>,
        bytes: u64,
    }

    impl Queued for Fake {
        fn direction(&self) -> Option<Direction> {
            self.dir
        }
        fn bytes(&self) -> u64 {
            self.bytes
        }
    }

    fn read(id: u32, bytes: u64) -> Fake {
        Fake {
            id,
            dir: Some(Direction::Read),
            bytes,
        }
    }

    fn write(id: u32, bytes: u64) -> Fake {
        Fake {
            id,
            dir: Some(Direction::Write),
            bytes,
        }
    }

    fn barrier(id: u32) -> Fake {
        Fake {
            id,
            dir: None,
            bytes: 0,
        }
    }

    fn limits(kind: BucketKind, avg: u64) -> Limits {
        let mut l = Limits::default();
        l.get_mut(kind).avg = avg;
        l
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ids(v: &[Fake]) -> Vec<u32> {
        v.iter().map(|f| f.id).collect()
    }

    /// Run the queue with a fake clock: jump from deadline to deadline and
    /// record when each request is released.
    fn drive(q: &mut FileQueue<Fake>, mut at: Duration) -> Vec<(u32, Duration)> {
        let mut log = Vec::new();
        loop {
            let mut out = Vec::new();
            let next = q.release(at, false, &mut out);
            log.extend(out.iter().map(|f| (f.id, at)));
            q.in_flight = 0; // performed at once
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
        assert_eq!(q.release(Duration::ZERO, false, &mut out), Some(ms(400)));
        assert_eq!(ids(&out), vec![1]);
        q.queue.push_back(read(3, 1));
        out.clear();
        assert_eq!(q.release(ms(10), false, &mut out), Some(ms(390)));
        assert!(out.is_empty(), "the small read overtook the queue");
        out.clear();
        q.release(ms(400), false, &mut out);
        assert_eq!(ids(&out), vec![2]);
        out.clear();
        q.release(ms(900), false, &mut out);
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
        let next = q.release(Duration::ZERO, false, &mut out);
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
        q.release(Duration::ZERO, false, &mut out);
        assert_eq!(ids(&out), vec![1]);
        // At the deadline write 2 goes, but the barrier stays: 1 and 2 are
        // still being performed, and write 4 may not pass the barrier.
        out.clear();
        q.release(ms(540), false, &mut out);
        assert_eq!(ids(&out), vec![2]);
        assert_eq!(q.in_flight, 2);
        out.clear();
        q.release(ms(541), false, &mut out);
        assert!(out.is_empty());
        // Both performed: the barrier goes, and write 4 after it.
        q.in_flight = 0;
        out.clear();
        q.release(ms(1200), false, &mut out);
        assert_eq!(ids(&out), vec![3, 4]);
    }

    #[test]
    fn draining_releases_everything_in_order() {
        let mut q = FileQueue::new(limits(BucketKind::BpsTotal, 1), Duration::ZERO);
        for id in 1..=5 {
            q.queue.push_back(write(id, 64 * KIB));
        }
        let mut out = Vec::new();
        assert_eq!(q.release(Duration::ZERO, true, &mut out), None);
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
        assert_eq!(q.release(Duration::ZERO, false, &mut out), None);
        assert_eq!(out.len(), 100);
    }
}
