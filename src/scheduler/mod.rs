//! The one scheduler thread. It alone owns every file's throttle state, a
//! FIFO of waiting requests per file and a binary heap of wake-up
//! deadlines. It blocks until the earliest deadline or the next message;
//! nothing polls, and no deadline is armed for a file with nothing
//! waiting. Released requests go to the I/O pool; the pool reports each
//! completion back so that barriers (fsync, flush) are answered only after
//! every earlier request of their file has been performed.
//!
//! One concern a file:
//! - `mod.rs` (here): the thread, its messages and its loop;
//! - `inbox.rs`: the channel and the wake-up that never spins;
//! - `queue.rs`: a file's buckets and FIFO, and the one walk of the
//!   ordering rules (arrival order, directions, barriers) that both the
//!   release of requests and a group's choice of candidates use;
//! - `group.rs`: a throttle group's turns (a due reservation first, else
//!   least service for the weight; O(log members) a turn);
//! - `release.rs`: from a queue to the I/O pool, and back to bypassing;
//! - `deadline.rs`: the heap of wake-ups and what each is for;
//! - `interrupt.rs`: interrupted requests and their callers;
//! - `forget.rs`: the state of files the kernel forgot;
//! - `credit.rs`: allowances charged ahead that the FUSE threads spend
//!   without a round trip (queue depth 1 at the cost of no hand-off).
//!
//! The throttle maths itself is pure and lives in `crate::throttle`.

mod credit;
mod deadline;
#[cfg(test)]
mod fake;
mod forget;
mod group;
mod inbox;
mod interrupt;
mod queue;
mod release;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use fuser::Errno;

use crate::io::{Completion, Job, JobSender, Released};
use crate::qos::Qos;
use crate::stats::FileShared;
use crate::throttle::{BucketReading, Direction, Limits};

pub use credit::{Credit, Leftover};
use deadline::Wake;
use group::Group;
use inbox::Idle;
pub use inbox::{SchedulerRx, SchedulerTx, Stopped, channel};
use interrupt::caller_dying;
use queue::{Arrival, FileQueue, Queued};
use release::dispatch;

/// What the scheduler is told.
pub enum Msg {
    /// A request for `file` (the FUSE inode number), with its reply inside;
    /// `unique` is the kernel's id of the request, `pid` the id of the
    /// thread that sent it (0 when not in our pid namespace).
    Submit {
        file: u64,
        unique: u64,
        pid: u32,
        job: Job,
        /// The file's credit, taken back unspent before this request came
        /// here (see `credit.rs`): given back to its buckets first.
        leftover: Leftover,
    },
    /// The kernel interrupts request `unique` (its caller got a signal,
    /// harmless or fatal).
    Interrupt(u64),
    /// The limits in force for `file` changed (or are set the first time):
    /// applied at once, to queued requests too.
    Limits {
        file: u64,
        limits: Limits,
        /// The throttle group the file belongs to, if any.
        group: Option<String>,
        /// Its weight and reservations in that group.
        qos: Qos,
        shared: Arc<FileShared>,
    },
    /// A group's limits changed (or are set the first time).
    GroupLimits { name: String, limits: Limits },
    /// Report on a group.
    GroupStats {
        name: String,
        reply: Sender<GroupReport>,
    },
    /// The buckets of `file` and of its group as they stand now.
    FileBuckets {
        file: u64,
        reply: Sender<FileBuckets>,
    },
    /// The I/O pool finished a job of this file.
    Done(Completion),
    /// The kernel forgot the inode. With `keep` (a descriptor of the
    /// underlying file, so its number cannot be reused meanwhile) the state
    /// stays until the file is idle and its buckets are empty, for a new
    /// lookup of the same file to find; without (the file was unlinked),
    /// it goes once the file is idle.
    Forget { file: u64, keep: Option<OwnedFd> },
    /// Shutting down: release every queued request now, and every new one
    /// at once, so no caller waits on a throttle that is going away.
    Drain,
    /// The session has ended: drain, then stop once nothing is queued or in
    /// flight.
    Exit,
    /// Answer on this channel once nothing is queued or in flight.
    WhenIdle(Sender<()>),
}

/// What `user.throttle.group.NAME.stats` shows.
#[derive(Clone, Debug, Default)]
pub struct GroupReport {
    pub limits: Limits,
    /// Member files (FUSE inode numbers).
    pub members: Vec<u64>,
    /// Requests of members waiting now.
    pub waiting: usize,
    /// Bytes and requests released through the group, [read, write].
    pub bytes: [u64; 2],
    pub ops: [u64; 2],
    /// The members' reservations, summed.
    pub reserved_iops: u64,
    pub reserved_bps: u64,
    /// Requests released because a reservation was due.
    pub reserved_ops: u64,
    /// The group's buckets in force, as they stand now.
    pub buckets: Vec<BucketReading>,
}

/// What `user.throttle.stats` shows of a file's buckets and its group's;
/// `None` where the scheduler has no state (the buckets are empty).
#[derive(Clone, Debug, Default)]
pub struct FileBuckets {
    pub file: Option<Vec<BucketReading>>,
    pub group: Option<Vec<BucketReading>>,
}

/// A request waiting in a file's queue, with the kernel's id for it.
struct Waiting {
    unique: u64,
    /// The thread that sent it, looked at only when it is interrupted.
    pid: u32,
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
    fn unique(&self) -> u64 {
        self.unique
    }
}

/// Messages handled in one round before released jobs go to the pool and
/// deadlines are looked at: big enough to batch a queue depth of 128, small
/// enough that a due deadline is never kept waiting long.
const BATCH_MESSAGES_MAX: usize = 64;

/// The scheduler thread's state: everything the throttle decides with,
/// owned by this thread alone.
pub struct Scheduler {
    /// Time zero of the throttle maths.
    epoch: Instant,
    defaults: Limits,
    files: HashMap<u64, FileQueue<Waiting>>,
    groups: HashMap<String, Group>,
    /// Which file's queue holds each waiting request, by kernel id.
    waiting: HashMap<u64, u64>,
    early_interrupts: BTreeSet<u64>,
    /// Queued requests interrupted by a harmless signal, by kernel id, with
    /// their caller's thread id; and the deadline of their next look.
    interrupted: HashMap<u64, u32>,
    interrupted_armed: Option<Instant>,
    deadlines: BinaryHeap<Reverse<(Instant, Wake)>>,
    jobs: JobSender,
    /// Jobs released in this round, handed to the pool together.
    outbox: Vec<Released>,
    /// Files to pump again at the end of this round (see `settle`).
    recheck: Vec<u64>,
    draining: bool,
    exiting: bool,
    idle_waiters: Vec<Sender<()>>,
    /// The inbox, to see whether requests wait in it (see `credit.rs`).
    inbox: Option<crossbeam_channel::Receiver<Msg>>,
}

impl Scheduler {
    pub fn new(defaults: Limits, jobs: JobSender) -> Scheduler {
        Scheduler {
            epoch: Instant::now(),
            defaults,
            files: HashMap::new(),
            groups: HashMap::new(),
            waiting: HashMap::new(),
            early_interrupts: BTreeSet::new(),
            interrupted: HashMap::new(),
            interrupted_armed: None,
            deadlines: BinaryHeap::new(),
            jobs,
            outbox: Vec::new(),
            recheck: Vec::new(),
            draining: false,
            exiting: false,
            idle_waiters: Vec::new(),
            inbox: None,
        }
    }

    pub fn spawn(self, rx: SchedulerRx) -> std::io::Result<JoinHandle<()>> {
        thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || self.run(rx))
    }

    fn run(mut self, rx: SchedulerRx) {
        tune_scheduler_thread();
        self.inbox = Some(rx.watcher());
        loop {
            if self.exiting && self.is_idle() {
                break;
            }
            let deadline = self.deadlines.peek().map(|Reverse((when, _))| *when);
            let received = match rx.recv_until(deadline) {
                Ok(msg) => Some(msg),
                Err(Idle::Timeout) => None,
                Err(Idle::Disconnected) => break,
            };
            let mut now = Instant::now();
            if let Some(msg) = received {
                self.handle(msg, now);
                // Under load, take what else has arrived before handing
                // anything to the pool: one wake-up serves a batch.
                for _ in 1..BATCH_MESSAGES_MAX {
                    match rx.try_recv() {
                        Some(msg) => self.handle(msg, now),
                        None => break,
                    }
                }
                now = Instant::now();
            }
            self.fire_due(now);
            while let Some(file) = self.recheck.pop() {
                self.pump(file, now);
            }
            dispatch(&self.jobs, &mut self.outbox);
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
            Msg::Submit {
                file,
                unique,
                pid,
                job,
                leftover,
            } => {
                self.settle_credit(file, leftover, now);
                let interrupted = self.early_interrupts.remove(&unique);
                if interrupted && caller_dying(pid) {
                    job.fail(Errno::EINTR);
                } else {
                    let w = Waiting {
                        unique,
                        pid,
                        job,
                        since: now,
                    };
                    if interrupted {
                        self.keep_interrupted(unique, pid, now);
                    }
                    self.enqueue(file, w, now, Arrival::KernelOrder);
                }
            }
            Msg::Limits {
                file,
                limits,
                group,
                qos,
                shared,
            } => {
                // Credit was charged under the old limits: back first.
                self.take_back_credit(file, now);
                let at = self.since_epoch(now);
                let f = self
                    .files
                    .entry(file)
                    .or_insert_with(|| FileQueue::new(limits, at));
                f.shared = shared;
                f.forgotten = false;
                // The group sees it when the member is sorted again below.
                f.qos = qos;
                // Levels are kept: a raised limit releases queued requests
                // now, a lowered one slows the next releases.
                f.state.set_limits(limits, at);
                let old = std::mem::replace(&mut f.group, group.clone());
                if old != group {
                    if let Some(g) = old.as_ref().and_then(|o| self.groups.get_mut(o)) {
                        g.leave(file);
                    }
                    if let Some(name) = &group {
                        self.join_group(name, file, at);
                    }
                    if let Some(old) = old {
                        // Its former mates may have waited behind it.
                        self.pump_group(&old, now);
                    }
                }
                self.pump(file, now);
            }
            Msg::GroupLimits { name, limits } => {
                let at = self.since_epoch(now);
                let g = self
                    .groups
                    .entry(name.clone())
                    .or_insert_with(|| Group::new(limits, at));
                g.set_limits(limits, at);
                let members: Vec<u64> = g.members.keys().copied().collect();
                if !limits.is_unlimited() {
                    for member in &members {
                        if let Some(f) = self.files.get(member) {
                            f.shared.bypass.store(false, Ordering::SeqCst);
                        }
                    }
                }
                // Which lanes are one strict FIFO may have changed: sort
                // every member again (O(members), on a limit change only).
                for member in &members {
                    self.classify(&name, *member, now);
                }
                self.pump_group(&name, now);
                for member in members {
                    self.settle(member);
                }
            }
            Msg::GroupStats { name, reply } => {
                let report = self.groups.get(&name).map(|g| {
                    let mut members: Vec<u64> = g.members.keys().copied().collect();
                    members.sort_unstable();
                    let qos = || {
                        members
                            .iter()
                            .filter_map(|m| self.files.get(m))
                            .map(|f| f.qos)
                    };
                    GroupReport {
                        // Saturating: each is at most 10^15, but a group
                        // has no bound on its members.
                        reserved_iops: qos().fold(0, |s, q| s.saturating_add(q.reserve_iops)),
                        reserved_bps: qos().fold(0, |s, q| s.saturating_add(q.reserve_bps)),
                        reserved_ops: g.reserved_ops,
                        limits: *g.state.limits(),
                        waiting: members
                            .iter()
                            .filter_map(|m| self.files.get(m))
                            .map(|f| f.queue.len())
                            .sum(),
                        members,
                        bytes: g.bytes,
                        ops: g.ops,
                        buckets: g.state.readings(self.since_epoch(now)),
                    }
                });
                let _ = reply.send(report.unwrap_or_default());
            }
            Msg::FileBuckets { file, reply } => {
                let at = self.since_epoch(now);
                let f = self.files.get(&file);
                let group = f
                    .and_then(|f| f.group.as_ref())
                    .and_then(|name| self.groups.get(name));
                let _ = reply.send(FileBuckets {
                    file: f.map(|f| f.state.readings(at)),
                    group: group.map(|g| g.state.readings(at)),
                });
            }
            Msg::Interrupt(unique) => self.interrupt(unique, now),
            Msg::Done(Completion { file, unmoved }) => {
                // Charge what moved, not what was asked for, to the file and
                // to its group.
                let refunded_group =
                    unmoved.and_then(|(dir, bytes)| self.refund(file, dir, bytes, now));
                if let Some(f) = self.files.get(&file) {
                    if !f.queue.is_empty() {
                        // A barrier at the head, or a request the refund
                        // lets through, may now go (a member's pump takes
                        // its group's turns too).
                        self.pump(file, now);
                    } else if let Some(name) = refunded_group {
                        // Its mates may go on what was given back.
                        self.pump_group(&name, now);
                    }
                }
                self.settle(file);
                self.collect(file, now);
            }
            Msg::Forget { file, keep } => {
                self.take_back_credit(file, now);
                if let Some(f) = self.files.get_mut(&file) {
                    f.forgotten = true;
                    f.anchor = keep;
                }
                self.settle(file);
                self.collect(file, now);
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
                self.watch_all();
            }
            Msg::WhenIdle(tx) => {
                self.idle_waiters.push(tx);
                self.watch_all();
            }
        }
    }

    fn since_epoch(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }
}

/// Timer slack of the scheduler thread: the kernel may otherwise defer its
/// wake-up by the default 50 us to batch timers, which is release
/// lateness and nothing else.
const SCHEDULER_TIMER_SLACK_NS: libc::c_ulong = 1;
/// Nice value of the scheduler thread: it does little work but every
/// release waits for it, so a busy host should not keep it off the CPU
/// behind the I/O threads and the guests. Only root (CAP_SYS_NICE) may
/// lower it; otherwise it stays as it is.
const SCHEDULER_NICE: libc::c_int = -10;

fn tune_scheduler_thread() {
    // SAFETY: prctl and setpriority on the calling thread, plain values.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, SCHEDULER_TIMER_SLACK_NS, 0, 0, 0);
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, SCHEDULER_NICE) != 0 {
            log::debug!(
                "scheduler thread keeps its priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // Needed only for the line above.
    crate::sandbox::drop_sys_nice();
}
