//! The one scheduler thread. It owns every file's throttle state, a FIFO of
//! waiting requests per file and a binary heap of wakeup deadlines. It
//! blocks in `recv_deadline` until the earliest deadline or the next
//! message; nothing polls, and no deadline is armed for a file with nothing
//! waiting. Released requests go to the I/O pool; the pool reports each
//! completion back so that barriers (fsync, flush) are answered only after
//! every earlier request of their file has been performed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use fuser::Errno;

use crate::io::{Completion, Flight, Job, JobSender, Released};
use crate::stats::FileShared;
use crate::throttle::{BucketKind, Direction, Limits, ThrottleState};

/// The scheduler's inbox: a crossbeam channel, with a wake-up of our own.
/// crossbeam's blocking receive spins and yields before it sleeps; on a
/// 2-core host that spinning took a quarter of the scheduler's CPU and the
/// cores the FUSE and I/O threads needed. The scheduler instead sleeps in
/// `park` (no spinning) and a sender unparks it only when it sleeps.
pub fn channel() -> (SchedulerTx, SchedulerRx) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = Arc::new(Bell::default());
    (
        SchedulerTx {
            tx,
            wake: wake.clone(),
        },
        SchedulerRx { rx, wake },
    )
}

#[derive(Default)]
struct Bell {
    /// The scheduler is about to sleep or sleeping.
    sleeping: AtomicBool,
    thread: std::sync::OnceLock<Thread>,
}

impl Bell {
    fn notify(&self) {
        // Pairs with the fence in `SchedulerRx::recv_until`: either the
        // scheduler sees the message, or this sees it sleeping.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst)
            && self.sleeping.swap(false, Ordering::SeqCst)
            && let Some(t) = self.thread.get()
        {
            t.unpark();
        }
    }
}

/// The sending side of the scheduler's inbox.
pub struct SchedulerTx {
    tx: Sender<Msg>,
    wake: Arc<Bell>,
}

impl Clone for SchedulerTx {
    fn clone(&self) -> Self {
        SchedulerTx {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }
}

/// The scheduler has stopped (only during teardown). The message was
/// dropped, which answers any request inside it with EIO.
#[derive(Debug)]
pub struct Stopped;

impl SchedulerTx {
    pub fn send(&self, msg: Msg) -> Result<(), Stopped> {
        self.tx.send(msg).map_err(|_| Stopped)?;
        self.wake.notify();
        Ok(())
    }
}

impl Drop for SchedulerTx {
    fn drop(&mut self) {
        // The last sender going away must wake the scheduler to see it.
        self.wake.sleeping.store(true, Ordering::SeqCst);
        self.wake.notify();
    }
}

/// The receiving side, used by the scheduler thread only.
pub struct SchedulerRx {
    rx: Receiver<Msg>,
    wake: Arc<Bell>,
}

/// Why `recv_until` returned without a message.
enum Idle {
    Timeout,
    Disconnected,
}

impl SchedulerRx {
    fn try_recv(&self) -> Option<Msg> {
        self.rx.try_recv().ok()
    }

    /// A message, or why there is none to wait for; `None`: none yet.
    fn poll(&self) -> Option<Result<Msg, Idle>> {
        match self.rx.try_recv() {
            Ok(msg) => Some(Ok(msg)),
            Err(TryRecvError::Disconnected) => Some(Err(Idle::Disconnected)),
            Err(TryRecvError::Empty) => None,
        }
    }

    /// The next message, waiting until `deadline` (or for ever) without
    /// spinning.
    fn recv_until(&self, deadline: Option<Instant>) -> Result<Msg, Idle> {
        let _ = self.wake.thread.set(thread::current());
        loop {
            if let Some(r) = self.poll() {
                return r;
            }
            self.wake.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(r) = self.poll() {
                self.wake.sleeping.store(false, Ordering::SeqCst);
                return r;
            }
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        self.wake.sleeping.store(false, Ordering::SeqCst);
                        return Err(Idle::Timeout);
                    }
                    thread::park_timeout(d - now);
                }
                None => thread::park(),
            }
            self.wake.sleeping.store(false, Ordering::SeqCst);
        }
    }
}

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
        shared: Arc<FileShared>,
    },
    /// A group's limits changed (or are set the first time).
    GroupLimits { name: String, limits: Limits },
    /// Report on a group.
    GroupStats {
        name: String,
        reply: Sender<GroupReport>,
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

/// What the queue needs to know of a request.
pub trait Queued {
    /// Read or write, or `None` for a barrier (which charges nothing).
    fn direction(&self) -> Option<Direction>;
    /// Bytes charged to bps buckets.
    fn bytes(&self) -> u64;
}

/// A request waiting in a file's queue, with the kernel's id for it.
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
}

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
}

/// Where a request joins its file's queue.
#[derive(Clone, Copy)]
enum Arrival {
    /// A new request from the kernel: in the kernel's order, by its id.
    KernelOrder,
    /// A copy moving on to its destination's queue: behind everything.
    Now,
}

/// Interrupts that arrived before their request reached us (another FUSE
/// thread may still be handing it over) are remembered, at most this many;
/// the oldest ids go first. Interrupts for requests that never come here
/// (files without limits, requests already answered) are what fills it.
const EARLY_INTERRUPTS_MAX: usize = 1024;

/// How often the callers of queued requests that were interrupted by a
/// harmless signal are looked at again: the kernel sends one interrupt per
/// request, so a caller killed after it is only noticed here (and at its
/// release), at most this late.
const INTERRUPTED_RECHECK_MS: u64 = 100;

/// Whether the thread `tid` that sent a request is going away: its /proc
/// entry is gone, or SIGKILL is pending on it (a signal that kills adds
/// SIGKILL to every thread of the process). A caller we cannot see (tid 0,
/// another pid namespace) counts as staying.
fn caller_dying(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => sigkill_pending(&status),
        Err(_) => true,
    }
}

/// SIGKILL in the thread's or the process's pending set of a /proc status.
fn sigkill_pending(status: &str) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .any(|mask| u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0))
}

/// Messages handled in one round before released jobs go to the pool and
/// deadlines are looked at: big enough to batch a queue depth of 128, small
/// enough that a due deadline is never kept waiting long.
const BATCH_MESSAGES_MAX: usize = 64;

/// One file's throttle state and queue: the ordering rules, kept free of
/// threads and clocks so they are tested with a fake clock.
struct FileQueue<J> {
    state: ThrottleState,
    /// Waiting requests in arrival order.
    queue: VecDeque<J>,
    /// Released jobs not yet performed by the pool, and of those the
    /// writes (a barrier waits for these only); counted out by the workers.
    flight: Arc<Flight>,
    /// The deadline this file has in the heap, if any; heap entries that do
    /// not match it are stale and skipped.
    armed: Option<Instant>,
    forgotten: bool,
    /// Of a forgotten file kept until its buckets are empty: the
    /// underlying file, held so its number is not reused meanwhile.
    anchor: Option<OwnedFd>,
    /// The deadline at which a forgotten file is looked at again (as
    /// `armed`).
    collect_at: Option<Instant>,
    /// Counters and the bypass flag, shared with the FUSE threads.
    shared: Arc<FileShared>,
    /// The throttle group the file belongs to.
    group: Option<String>,
}

impl<J: Queued> FileQueue<J> {
    fn new(limits: Limits, at: Duration) -> FileQueue<J> {
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
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.flight.jobs() == 0
    }

    /// Move whatever may go at `at` to `out`, in order, charging it, and
    /// return how long until the next waiting request may be looked at
    /// again (`None` when nothing waits on a bucket). At most `max`
    /// requests go. `gate`, a group's buckets, must admit each request too
    /// and is charged with it.
    ///
    /// Order: with a total limit (reads and writes share a bucket) the queue
    /// is one strict FIFO. With only per-direction limits, reads and writes
    /// are independent FIFOs in one list: a waiting read holds back later
    /// reads but not a write its own buckets allow. A barrier holds back
    /// everything after it and goes only when everything before it has been
    /// performed. When draining, the buckets are not asked.
    fn release(
        &mut self,
        at: Duration,
        draining: bool,
        out: &mut Vec<J>,
        mut gate: Option<&mut ThrottleState>,
        max: usize,
    ) -> Option<Duration> {
        let strict = self.state.limits().has_total()
            || gate.as_ref().is_some_and(|g| g.limits().has_total());
        let mut blocked = [false; 2];
        let mut earliest: Option<Duration> = None;
        let mut released = 0;
        // A write stays queued before the current position.
        let mut write_waiting = false;
        let mut i = 0;
        while i < self.queue.len() && released < max {
            let Some(dir) = self.queue[i].direction() else {
                // A barrier (fsync, flush) follows every earlier write: it
                // goes once none is queued before it or being performed.
                // Reads are not held back by it, nor it by them.
                if !write_waiting && self.flight.writes() == 0 {
                    let job = self.queue.remove(i).expect("index in range");
                    self.flight.start(false);
                    out.push(job);
                    released += 1;
                    continue;
                }
                blocked[1] = true;
                write_waiting = true;
                i += 1;
                continue;
            };
            let lane = match dir {
                Direction::Read => 0,
                Direction::Write => 1,
            };
            if blocked[lane] {
                write_waiting |= dir == Direction::Write;
                i += 1;
                continue;
            }
            let wait = if draining {
                Duration::ZERO
            } else {
                let own = self.state.wait(dir, at);
                let group = gate.as_mut().map_or(Duration::ZERO, |g| g.wait(dir, at));
                own.max(group)
            };
            if wait.is_zero() {
                let job = self.queue.remove(i).expect("index in range");
                self.state.account(dir, job.bytes(), at);
                if let Some(g) = gate.as_mut() {
                    g.account(dir, job.bytes(), at);
                }
                self.flight.start(dir == Direction::Write);
                out.push(job);
                released += 1;
                continue;
            }
            write_waiting |= dir == Direction::Write;
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

    /// What `release` would find at `at` if the group admitted everything:
    /// which lanes ([read, write, barrier]) have a request its own buckets
    /// admit now, and how long until its own buckets admit the earliest
    /// request they hold back (`None`: none is held back by them). Follows
    /// `release`'s order rules; `group_total`: the group has a total limit,
    /// which makes the queue one strict FIFO as in `release`.
    fn candidates(
        &mut self,
        at: Duration,
        draining: bool,
        group_total: bool,
    ) -> ([bool; LANES], Option<Duration>) {
        let strict = self.state.limits().has_total() || group_total;
        let mut lanes = [false; LANES];
        let mut own: Option<Duration> = None;
        let mut blocked = [false; 2];
        let mut write_waiting = false;
        for w in &self.queue {
            let Some(dir) = w.direction() else {
                if !write_waiting && self.flight.writes() == 0 {
                    // It would go, and `release` would look further.
                    lanes[BARRIER_LANE] = true;
                    continue;
                }
                blocked[1] = true;
                write_waiting = true;
                continue;
            };
            let lane = dir as usize;
            write_waiting |= dir == Direction::Write;
            if blocked[lane] {
                continue;
            }
            let wait = if draining {
                Duration::ZERO
            } else {
                self.state.wait(dir, at)
            };
            if wait.is_zero() {
                lanes[lane] = true;
            } else {
                own = Some(own.map_or(wait, |o| o.min(wait)));
            }
            // Beyond this request only what `release` sees when the group
            // holds it back matters: whether it goes is the group's call.
            if strict {
                break;
            }
            blocked[lane] = true;
            if blocked == [true, true] {
                break;
            }
        }
        (lanes, own)
    }
}

/// Lanes of a group's ready sets: a member is in the read (write) lane
/// when the next read (write) `release` would look at is admitted by its
/// own buckets, and in the barrier lane when a barrier of it may go.
const LANES: usize = 3;
const BARRIER_LANE: usize = 2;

/// What a group knows of one member.
#[derive(Default)]
struct Member {
    /// What it has been served: bytes when the group limits bytes, else
    /// requests (start-time fair queuing's finish tag).
    served: u64,
    /// The ready sets it is in.
    lanes: [bool; LANES],
}

/// A throttle group: one set of buckets that its member files share, on
/// top of each member's own.
///
/// Members whose next request only the group may hold back are kept in
/// ready sets ordered by (served, member), one per lane, so a turn costs
/// O(log members) whatever the group's size. A member held back by its own
/// buckets is in no set and waits on its own deadline; when that fires it
/// is classified again. When the group's buckets hold back every lane that
/// has ready members, the group arms one deadline of its own.
struct Group {
    state: ThrottleState,
    members: HashMap<u64, Member>,
    ready: [BTreeSet<(u64, u64)>; LANES],
    /// The service level at which the last request was released (virtual
    /// time): a member that was idle resumes from here, so idling earns no
    /// burst of turns, while a member that keeps one request in flight
    /// (queue depth 1) keeps its place.
    vtime: u64,
    /// Totals charged to the group.
    bytes: [u64; 2],
    ops: [u64; 2],
    /// The group's deadline in the heap, if any (as `FileQueue::armed`).
    armed: Option<Instant>,
    /// Members taken from a ready set by `turns` so far: the work of the
    /// turns, which tests check does not grow with the group's size.
    visits: u64,
    /// Service levels of members whose state was dropped while ahead of
    /// the virtual time: one coming back resumes there, not at the
    /// virtual time, so being forgotten earns no turns. Entries the
    /// virtual time has passed mean nothing and are pruned.
    departed: HashMap<u64, u64>,
    /// `departed` is pruned when it grows to this size.
    departed_mark: usize,
}

/// `Group::departed` is not pruned below this size.
const DEPARTED_PRUNE_MIN: usize = 64;

impl Group {
    fn new(limits: Limits, at: Duration) -> Group {
        Group {
            state: ThrottleState::new(limits, at),
            members: HashMap::new(),
            ready: Default::default(),
            vtime: 0,
            bytes: [0; 2],
            ops: [0; 2],
            armed: None,
            visits: 0,
            departed: HashMap::new(),
            departed_mark: DEPARTED_PRUNE_MIN,
        }
    }

    /// `member` joins, or has requests again after none: it resumes no
    /// lower than the virtual time.
    fn rejoin(&mut self, member: u64) {
        let vtime = self.vtime;
        let departed = &mut self.departed;
        let m = self.members.entry(member).or_insert_with(|| Member {
            served: departed.remove(&member).unwrap_or(vtime).max(vtime),
            lanes: [false; LANES],
        });
        if m.served < vtime {
            self.set_served(member, vtime);
        }
    }

    /// Move `member` to service level `served`, keeping its place in the
    /// ready sets it is in consistent with it.
    fn set_served(&mut self, member: u64, served: u64) {
        let Some(m) = self.members.get_mut(&member) else {
            return;
        };
        for (lane, set) in self.ready.iter_mut().enumerate() {
            if m.lanes[lane] {
                set.remove(&(m.served, member));
                set.insert((served, member));
            }
        }
        m.served = served;
    }

    /// The state of `member`, a forgotten file, is dropped: it leaves, and
    /// its service level is remembered if it was ahead.
    fn depart(&mut self, member: u64) {
        if let Some(m) = self.members.get(&member)
            && m.served > self.vtime
        {
            self.departed.insert(member, m.served);
            if self.departed.len() >= self.departed_mark {
                let vtime = self.vtime;
                self.departed.retain(|_, served| *served > vtime);
                self.departed_mark = DEPARTED_PRUNE_MIN.max(2 * self.departed.len());
            }
        }
        self.leave(member);
    }

    /// `member` leaves the group.
    fn leave(&mut self, member: u64) {
        if let Some(m) = self.members.remove(&member) {
            for set in &mut self.ready {
                set.remove(&(m.served, member));
            }
        }
    }

    /// Put `member` in exactly the ready sets `lanes` says.
    fn set_lanes(&mut self, member: u64, lanes: [bool; LANES]) {
        let Some(m) = self.members.get_mut(&member) else {
            return;
        };
        for (lane, set) in self.ready.iter_mut().enumerate() {
            match (m.lanes[lane], lanes[lane]) {
                (false, true) => {
                    set.insert((m.served, member));
                }
                (true, false) => {
                    set.remove(&(m.served, member));
                }
                _ => {}
            }
        }
        m.lanes = lanes;
    }

    /// Sort `member` (with queue `f`) into the ready sets at `at`; returns
    /// how long until its own buckets admit a request they hold back now
    /// (its own deadline), if any.
    fn classify<J: Queued>(
        &mut self,
        member: u64,
        f: &mut FileQueue<J>,
        at: Duration,
        draining: bool,
    ) -> Option<Duration> {
        if !self.members.contains_key(&member) {
            self.rejoin(member);
        }
        let (lanes, own) = f.candidates(at, draining, self.state.limits().has_total());
        self.set_lanes(member, lanes);
        own
    }

    /// Turns at `at`: the least-served member that may go (in a lane the
    /// group's buckets admit now) releases one request; repeat until none
    /// may. Each turn takes O(log members).
    fn turns<J: Queued>(
        &mut self,
        files: &mut HashMap<u64, FileQueue<J>>,
        at: Duration,
        draining: bool,
    ) -> GroupTurns<J> {
        let by_bytes = self.counts_bytes();
        let mut turns = GroupTurns {
            released: Vec::new(),
            arms: Vec::new(),
            next: None,
        };
        loop {
            let open = [
                draining || self.state.wait(Direction::Read, at).is_zero(),
                draining || self.state.wait(Direction::Write, at).is_zero(),
                true,
            ];
            let pick = (0..LANES)
                .filter(|lane| open[*lane])
                .filter_map(|lane| self.ready[lane].first().copied())
                .min();
            let Some((_, member)) = pick else {
                break;
            };
            self.visits += 1;
            let Some(f) = files.get_mut(&member) else {
                self.set_lanes(member, [false; LANES]);
                continue;
            };
            let mut out = Vec::new();
            let next = f.release(at, draining, &mut out, Some(&mut self.state), 1);
            let Some(job) = out.pop() else {
                // `candidates` and `release` disagree: never spin on it.
                log::warn!("group member {member} was ready but released nothing");
                self.set_lanes(member, [false; LANES]);
                turns.arms.push((member, next));
                continue;
            };
            if let Some(dir) = job.direction() {
                let lane = dir as usize;
                self.bytes[lane] += job.bytes();
                self.ops[lane] += 1;
            }
            let cost = if by_bytes { job.bytes() } else { 1 };
            let served = self.members.get(&member).expect("a ready member").served;
            self.vtime = self.vtime.max(served);
            // To its new level, then sorted again for its next request.
            self.set_served(member, served + cost);
            let own = self.classify(member, f, at, draining);
            turns.arms.push((member, own));
            turns.released.push((member, job));
        }
        if !draining {
            turns.next = [Direction::Read, Direction::Write]
                .into_iter()
                .filter(|d| !self.ready[*d as usize].is_empty())
                .map(|d| self.state.wait(d, at))
                .filter(|w| !w.is_zero())
                .min();
        }
        turns
    }

    fn counts_bytes(&self) -> bool {
        let l = self.state.limits();
        [
            BucketKind::BpsTotal,
            BucketKind::BpsRead,
            BucketKind::BpsWrite,
        ]
        .iter()
        .any(|k| l.get(*k).avg != 0)
    }
}

/// Arm (or disarm, with `None`) the deadline in `next` for `wake`, whose
/// current deadline is `armed`: pushed once; heap entries that no longer
/// match `armed` are stale and skipped when they come up.
fn arm_wake(
    deadlines: &mut BinaryHeap<Reverse<(Instant, Wake)>>,
    armed: &mut Option<Instant>,
    wake: Wake,
    next: Option<Duration>,
    now: Instant,
) {
    match next {
        Some(wait) => {
            let when = now + wait;
            if *armed != Some(when) {
                *armed = Some(when);
                deadlines.push(Reverse((when, wake)));
            }
        }
        None => *armed = None,
    }
}

/// What one wakeup in the heap is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Wake {
    File(u64),
    Group(String),
    /// Look again at the callers of interrupted requests.
    Interrupted,
    /// A forgotten file's buckets are empty: its state may go.
    Collect(u64),
}

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
        }
    }

    pub fn spawn(self, rx: SchedulerRx) -> std::io::Result<JoinHandle<()>> {
        thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || self.run(rx))
    }

    fn run(mut self, rx: SchedulerRx) {
        tune_scheduler_thread();
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
            } => {
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
                g.state.set_limits(limits, at);
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
                    GroupReport {
                        limits: *g.state.limits(),
                        waiting: members
                            .iter()
                            .filter_map(|m| self.files.get(m))
                            .map(|f| f.queue.len())
                            .sum(),
                        members,
                        bytes: g.bytes,
                        ops: g.ops,
                    }
                });
                let _ = reply.send(report.unwrap_or_default());
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

    /// A request still waiting whose caller is going away (a fatal
    /// signal) is cancelled; after a harmless signal it keeps its place
    /// and is looked at again every `INTERRUPTED_RECHECK_MS`. One already
    /// released completes normally.
    fn interrupt(&mut self, unique: u64, now: Instant) {
        let Some(&file) = self.waiting.get(&unique) else {
            self.early_interrupts.insert(unique);
            while self.early_interrupts.len() > EARLY_INTERRUPTS_MAX {
                self.early_interrupts.pop_first();
            }
            return;
        };
        let Some(pid) = self
            .files
            .get(&file)
            .and_then(|f| f.queue.iter().find(|w| w.unique == unique))
            .map(|w| w.pid)
        else {
            return;
        };
        if caller_dying(pid) {
            self.cancel(unique, now);
        } else {
            self.keep_interrupted(unique, pid, now);
        }
    }

    /// Remember a queued request whose caller got a harmless signal, and
    /// make sure its caller is looked at again.
    fn keep_interrupted(&mut self, unique: u64, pid: u32, now: Instant) {
        self.interrupted.insert(unique, pid);
        if self.interrupted_armed.is_none() {
            arm_wake(
                &mut self.deadlines,
                &mut self.interrupted_armed,
                Wake::Interrupted,
                Some(Duration::from_millis(INTERRUPTED_RECHECK_MS)),
                now,
            );
        }
    }

    /// Cancel the interrupted requests whose callers are going away now;
    /// look again later while any is left.
    fn recheck_interrupted(&mut self, now: Instant) {
        let dying: Vec<u64> = self
            .interrupted
            .iter()
            .filter(|&(_, &pid)| caller_dying(pid))
            .map(|(&unique, _)| unique)
            .collect();
        for unique in dying {
            self.cancel(unique, now);
        }
        let next =
            (!self.interrupted.is_empty()).then(|| Duration::from_millis(INTERRUPTED_RECHECK_MS));
        arm_wake(
            &mut self.deadlines,
            &mut self.interrupted_armed,
            Wake::Interrupted,
            next,
            now,
        );
    }

    /// Remove a waiting request: it is answered EINTR and charges nothing.
    fn cancel(&mut self, unique: u64, now: Instant) {
        self.interrupted.remove(&unique);
        let Some(file) = self.waiting.remove(&unique) else {
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
            self.collect(file, now);
        }
    }

    fn enqueue(&mut self, file: u64, mut w: Waiting, now: Instant, arrival: Arrival) {
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
        let was_idle = f.queue.is_empty();
        match arrival {
            Arrival::KernelOrder => {
                // The kernel numbers requests in the order it queues them
                // for us, but several FUSE threads hand them over, so one
                // may reach us a little after a later one. Still-queued
                // later requests of the file do not keep that lead.
                let at = f
                    .queue
                    .iter()
                    .rposition(|q| q.unique < w.unique)
                    .map_or(0, |i| i + 1);
                f.queue.insert(at, w);
            }
            Arrival::Now => f.queue.push_back(w),
        }
        if was_idle && let Some(group) = f.group.clone() {
            self.join_group(&group, file, at);
        }
        self.pump(file, now);
    }

    /// A file without limits and with nothing queued or in flight may be
    /// served inline again, without the scheduler; not before, so that a
    /// barrier or a queued request is never overtaken.
    ///
    /// It also decides whether the workers must report this file's
    /// completions: only when something here waits for them (see `Flight`).
    fn settle(&mut self, file: u64) {
        let Some(f) = self.files.get(&file) else {
            return;
        };
        let unlimited = f.state.limits().is_unlimited()
            && f.group
                .as_ref()
                .and_then(|g| self.groups.get(g))
                .is_none_or(|g| g.state.limits().is_unlimited());
        let watch = unlimited || f.forgotten || !f.queue.is_empty() || self.watching_all();
        // Set before looking at the counts: a job finishing meanwhile then
        // either sees the flag and reports, or is already counted out here.
        let was = f.flight.set_watch(watch);
        if watch && !was && !f.queue.is_empty() {
            // Writes may have finished unreported while nobody watched: a
            // barrier could be waiting for them.
            self.recheck.push(file);
        }
        if unlimited && f.is_idle() {
            f.shared.bypass.store(true, Ordering::SeqCst);
        }
    }

    /// Shutting down, or someone waits for the whole scheduler to be idle:
    /// every completion that empties a file must be heard.
    fn watching_all(&self) -> bool {
        self.draining || self.exiting || !self.idle_waiters.is_empty()
    }

    fn watch_all(&mut self) {
        let ids: Vec<u64> = self.files.keys().copied().collect();
        for id in ids {
            self.settle(id);
        }
    }

    /// Drop the state of a forgotten file once nothing of it is pending
    /// and, unless it was unlinked, its buckets are empty: a file looked up
    /// again before then (same number) finds its levels and counters, so
    /// closing it cannot earn a fresh burst. Not empty yet: looked at again
    /// when they will be.
    fn collect(&mut self, file: u64, now: Instant) {
        let at = self.since_epoch(now);
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if !f.forgotten || !f.is_idle() {
            return;
        }
        if f.anchor.is_some() {
            let wait = f.state.until_empty(at);
            if !wait.is_zero() {
                let wake = Wake::Collect(file);
                arm_wake(
                    &mut self.deadlines,
                    &mut f.collect_at,
                    wake,
                    Some(wait),
                    now,
                );
                return;
            }
        }
        if let Some(f) = self.files.remove(&file)
            && let Some(g) = f.group.and_then(|g| self.groups.get_mut(&g))
        {
            g.depart(file);
        }
    }

    fn since_epoch(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }

    /// Pop every deadline that has come and release what it was for.
    fn fire_due(&mut self, now: Instant) {
        while let Some(Reverse((when, _))) = self.deadlines.peek() {
            if *when > now {
                break;
            }
            let Some(Reverse((when, wake))) = self.deadlines.pop() else {
                break;
            };
            match wake {
                Wake::File(file) => {
                    if let Some(f) = self.files.get_mut(&file)
                        && f.armed == Some(when)
                    {
                        f.armed = None;
                        f.shared
                            .record_release_lateness(now.saturating_duration_since(when));
                        self.pump(file, now);
                    }
                }
                Wake::Collect(file) => {
                    if let Some(f) = self.files.get_mut(&file)
                        && f.collect_at == Some(when)
                    {
                        f.collect_at = None;
                        self.collect(file, now);
                    }
                }
                Wake::Group(name) => {
                    if let Some(g) = self.groups.get_mut(&name)
                        && g.armed == Some(when)
                    {
                        g.armed = None;
                        self.pump_group(&name, now);
                    }
                }
                Wake::Interrupted => {
                    if self.interrupted_armed == Some(when) {
                        self.interrupted_armed = None;
                        self.recheck_interrupted(now);
                    }
                }
            }
        }
    }

    /// Add `file` to group `name` (made on first use, unlimited until its
    /// limits are set), or note that a member has requests again: it
    /// resumes no lower than the group's virtual time.
    fn join_group(&mut self, name: &str, file: u64, at: Duration) {
        let g = self
            .groups
            .entry(name.to_string())
            .or_insert_with(|| Group::new(Limits::default(), at));
        g.rejoin(file);
    }

    /// Release what may go of `file`'s queue (or of its whole group) at
    /// `now` and arm the next deadlines.
    fn pump(&mut self, file: u64, now: Instant) {
        match self.files.get(&file).and_then(|f| f.group.clone()) {
            Some(group) => {
                // Only this member's queue or buckets changed: sort it
                // again, then take turns.
                self.classify(&group, file, now);
                self.pump_group(&group, now);
                self.settle(file);
            }
            None => self.pump_file(file, now),
        }
    }

    /// Sort member `file` of group `name` into the group's ready sets and
    /// arm its own deadline.
    fn classify(&mut self, name: &str, file: u64, now: Instant) {
        let at = self.since_epoch(now);
        let (Some(g), Some(f)) = (self.groups.get_mut(name), self.files.get_mut(&file)) else {
            return;
        };
        let own = g.classify(file, f, at, self.draining);
        self.arm(file, own, now);
    }

    fn pump_file(&mut self, file: u64, now: Instant) {
        let at = self.since_epoch(now);
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        let mut released = Vec::new();
        let next = f.release(at, self.draining, &mut released, None, usize::MAX);
        self.arm(file, next, now);
        let handoffs = self.finish(file, released, now);
        self.settle(file);
        for (next, w) in handoffs {
            self.enqueue(next, w, now, Arrival::Now);
        }
    }

    /// Turns within a group (see `Group::turns`), then dispatch.
    fn pump_group(&mut self, name: &str, now: Instant) {
        let at = self.since_epoch(now);
        let Scheduler {
            files,
            groups,
            draining,
            deadlines,
            ..
        } = self;
        let Some(group) = groups.get_mut(name) else {
            return;
        };
        let turns = group.turns(files, at, *draining);
        // One deadline for the whole group when its buckets hold back
        // members that could go otherwise.
        let wake = Wake::Group(name.to_string());
        arm_wake(deadlines, &mut group.armed, wake, turns.next, now);
        for (member, next) in turns.arms {
            self.arm(member, next, now);
        }
        let mut handoffs = Vec::new();
        for (member, w) in turns.released {
            handoffs.extend(self.finish(member, vec![w], now));
        }
        for (next, w) in handoffs {
            self.enqueue(next, w, now, Arrival::Now);
        }
    }

    /// Put `file`'s deadline in the heap (or take it out).
    fn arm(&mut self, file: u64, next: Option<Duration>, now: Instant) {
        if let Some(f) = self.files.get_mut(&file) {
            arm_wake(
                &mut self.deadlines,
                &mut f.armed,
                Wake::File(file),
                next,
                now,
            );
        }
    }

    /// Give back bytes charged to `file` and its group; the group's name
    /// if it got some back.
    fn refund(&mut self, file: u64, dir: Direction, bytes: u64, now: Instant) -> Option<String> {
        let at = self.since_epoch(now);
        let f = self.files.get_mut(&file)?;
        f.state.refund(dir, bytes, at);
        let name = f.group.as_ref()?;
        self.groups.get_mut(name)?.state.refund(dir, bytes, at);
        Some(name.clone())
    }

    /// Dispatch released requests; returns the copies that must now queue
    /// on their destination file.
    fn finish(&mut self, file: u64, released: Vec<Waiting>, now: Instant) -> Vec<(u64, Waiting)> {
        let mut handoffs = Vec::new();
        let Some((shared, flight)) = self
            .files
            .get(&file)
            .map(|f| (f.shared.clone(), f.flight.clone()))
        else {
            return handoffs;
        };
        for mut w in released {
            self.waiting.remove(&w.unique);
            shared.record_dequeued(now.saturating_duration_since(w.since));
            let interrupted = self.interrupted.remove(&w.unique);
            if interrupted.is_some_and(caller_dying) {
                // Killed since its harmless interrupt, before the next
                // look: it gives back what its release charged.
                let dir = w.job.direction();
                flight.cancel(dir == Some(Direction::Write));
                if let Some(dir) = dir {
                    self.refund(file, dir, w.job.bytes(), now);
                }
                log::debug!("request {} of inode {file} cancelled at release", w.unique);
                w.job.fail(Errno::EINTR);
                self.recheck.push(file);
                continue;
            }
            match w.job.hand_off() {
                // A copy passed its source's buckets: it is not in flight
                // there, and now queues on its destination as a write.
                Some(next) => {
                    if let Some(pid) = interrupted {
                        self.keep_interrupted(w.unique, pid, now);
                    }
                    flight.cancel(false);
                    handoffs.push((next, w));
                }
                None => self.outbox.push(Released {
                    file,
                    flight: flight.clone(),
                    job: w.job,
                }),
            }
        }
        handoffs
    }
}

/// What `Group::turns` released (member, request) in order, the own
/// deadlines of the members it classified again (`None`: disarm), and the
/// group's next deadline.
struct GroupTurns<J> {
    released: Vec<(u64, J)>,
    arms: Vec<(u64, Option<Duration>)>,
    next: Option<Duration>,
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
}

/// Hand released jobs to the I/O pool, all at once.
fn dispatch(jobs: &JobSender, batch: &mut Vec<Released>) {
    if let Err(lost) = jobs.send_all(batch) {
        // The pool is gone (only during teardown).
        log::warn!("I/O pool gone, failing {} released requests", lost.len());
        for r in lost {
            r.job.fail(Errno::EIO);
        }
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

    #[test]
    fn sigkill_is_seen_in_either_pending_set() {
        let status = |sig: &str, shd: &str| format!("Name:\tdd\nSigPnd:\t{sig}\nShdPnd:\t{shd}\n");
        assert!(!sigkill_pending(&status(
            "0000000000000000",
            "0000000000000000"
        )));
        // SIGUSR1 (bit 10) and SIGALRM (bit 14) are not SIGKILL.
        assert!(!sigkill_pending(&status(
            "0000000000002200",
            "0000000000000200"
        )));
        assert!(sigkill_pending(&status(
            "0000000000000100",
            "0000000000000000"
        )));
        assert!(sigkill_pending(&status(
            "0000000000000000",
            "0000000000000300"
        )));
    }

    #[test]
    fn a_gone_caller_is_dying_and_an_unknown_one_is_not() {
        assert!(!caller_dying(0));
        assert!(!caller_dying(std::process::id()));
        // Above the largest pid the kernel hands out (2^22).
        assert!(caller_dying(1 << 23));
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

    /// Run group turns with a fake clock until `until`, jumping from
    /// deadline to deadline; released requests complete at once. Before
    /// each round `refill` may queue more; each release is shown to
    /// `released`. Returns bytes and requests released per member.
    fn drive_group_with(
        files: &mut HashMap<u64, FileQueue<Fake>>,
        group: &mut Group,
        until: Duration,
        mut refill: impl FnMut(&mut HashMap<u64, FileQueue<Fake>>, &mut Group),
        mut released: impl FnMut(u64, &Fake),
    ) -> HashMap<u64, (u64, u64)> {
        let mut moved: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut at = Duration::ZERO;
        // Each member's own deadline and the group's, as the heap holds
        // them; a member is sorted again only when its deadline comes or
        // its queue grows, as the scheduler does.
        let mut own: HashMap<u64, Duration> = HashMap::new();
        let mut group_at: Option<Duration> = None;
        let mut touched: Vec<u64> = group.members.keys().copied().collect();
        while at < until {
            let before: HashMap<u64, usize> =
                files.iter().map(|(m, q)| (*m, q.queue.len())).collect();
            refill(files, group);
            touched.extend(
                files
                    .iter()
                    .filter(|(m, q)| q.queue.len() > before[m])
                    .map(|(m, _)| *m),
            );
            touched.extend(own.iter().filter(|(_, d)| **d <= at).map(|(m, _)| *m));
            for m in touched.drain(..) {
                own.remove(&m);
                if let Some(w) = group.classify(m, files.get_mut(&m).unwrap(), at, false) {
                    own.insert(m, at + w);
                }
            }
            let turns = group.turns(files, at, false);
            for (member, next) in turns.arms {
                match next {
                    Some(w) => own.insert(member, at + w),
                    None => own.remove(&member),
                };
            }
            for (member, job) in turns.released {
                released(member, &job);
                let e = moved.entry(member).or_default();
                e.0 += job.bytes;
                e.1 += 1;
                let q = files.get_mut(&member).unwrap();
                q.flight.clear();
            }
            group_at = turns.next.map(|w| at + w).or(group_at.filter(|g| *g > at));
            match own.values().copied().chain(group_at).min() {
                Some(next) => at = next,
                None => break,
            }
        }
        moved
    }

    fn drive_group(
        files: &mut HashMap<u64, FileQueue<Fake>>,
        group: &mut Group,
        until: Duration,
    ) -> HashMap<u64, (u64, u64)> {
        drive_group_with(files, group, until, |_, _| {}, |_, _| {})
    }

    fn member_queue(limits: Limits, count: u32, bytes: u64) -> FileQueue<Fake> {
        let mut q = FileQueue::new(limits, Duration::ZERO);
        for id in 0..count {
            q.queue.push_back(read(id, bytes));
        }
        q
    }

    fn group_of(limits: Limits, members: &[u64]) -> Group {
        let mut g = Group::new(limits, Duration::ZERO);
        for m in members {
            g.rejoin(*m);
        }
        g
    }

    #[test]
    fn a_forgotten_member_ahead_of_the_group_resumes_where_it_was() {
        let mut g = group_of(Limits::default(), &[1, 2]);
        g.vtime = 100;
        g.set_served(1, 150);
        g.set_served(2, 100);
        g.depart(1);
        g.depart(2);
        assert!(!g.members.contains_key(&1));
        g.rejoin(1);
        g.rejoin(2);
        // Being forgotten earns no turns; one that was not ahead resumes at
        // the virtual time as any idle member does.
        assert_eq!(g.members[&1].served, 150);
        assert_eq!(g.members[&2].served, 100);
        assert!(g.departed.is_empty());
    }

    #[test]
    fn bps_group_shares_bytes_equally_whatever_the_request_sizes() {
        const MIB: u64 = 1024 * KIB;
        let mut files = HashMap::new();
        files.insert(1, member_queue(Limits::default(), 1000, MIB));
        files.insert(2, member_queue(Limits::default(), 10_000, 64 * KIB));
        let mut group = group_of(limits(BucketKind::BpsTotal, 8 * MIB), &[1, 2]);
        let moved = drive_group(&mut files, &mut group, Duration::from_secs(10));
        let (a, b) = (moved[&1].0, moved[&2].0);
        // 10 s at 8 MiB/s, plus the bucket and one request at the start.
        assert!(a + b <= 80 * MIB + MIB + 819_200 + MIB, "{a} + {b}");
        assert!(a + b >= 78 * MIB, "{a} + {b}");
        // Equal shares to within one large request.
        assert!(a.abs_diff(b) <= MIB, "a={a} b={b}");
    }

    #[test]
    fn queue_depth_one_members_share_bytes_equally() {
        // Clients with one request outstanding: each member's queue empties
        // at every release and refills at once (the request completes at
        // once here). Re-joining must not cost a member its place.
        const MIB: u64 = 1024 * KIB;
        let mut files: HashMap<u64, FileQueue<Fake>> = HashMap::new();
        files.insert(1, member_queue(Limits::default(), 0, 0));
        files.insert(2, member_queue(Limits::default(), 0, 0));
        let mut group = group_of(limits(BucketKind::BpsRead, 8 * MIB), &[1, 2]);
        let size = |m: u64| if m == 1 { MIB } else { 64 * KIB };
        let refill = |files: &mut HashMap<u64, FileQueue<Fake>>, group: &mut Group| {
            for m in [1, 2] {
                let q = files.get_mut(&m).unwrap();
                if q.queue.is_empty() {
                    q.queue.push_back(read(0, size(m)));
                    // As Scheduler::enqueue does for a member that had
                    // nothing queued.
                    group.rejoin(m);
                }
            }
        };
        let moved = drive_group_with(
            &mut files,
            &mut group,
            Duration::from_secs(10),
            refill,
            |_, _| {},
        );
        let (a, b) = (moved[&1].0, moved[&2].0);
        assert!(a.abs_diff(b) <= MIB, "a={a} b={b}");
    }

    #[test]
    fn iops_group_shares_operations_equally() {
        let mut files = HashMap::new();
        files.insert(1, member_queue(Limits::default(), 1000, 512 * KIB));
        files.insert(2, member_queue(Limits::default(), 1000, 4 * KIB));
        files.insert(3, member_queue(Limits::default(), 1000, 64 * KIB));
        let mut group = group_of(limits(BucketKind::IopsRead, 300), &[1, 2, 3]);
        let moved = drive_group(&mut files, &mut group, Duration::from_secs(5));
        let ops: Vec<u64> = (1..=3).map(|m| moved[&m].1).collect();
        let (lo, hi) = (*ops.iter().min().unwrap(), *ops.iter().max().unwrap());
        assert!(hi - lo <= 1, "{ops:?}");
        assert!(ops.iter().sum::<u64>() <= 5 * 300 + 30 + 1, "{ops:?}");
    }

    #[test]
    fn member_on_its_own_limit_leaves_the_rest_to_its_mates() {
        const MIB: u64 = 1024 * KIB;
        let mut files = HashMap::new();
        files.insert(
            1,
            member_queue(limits(BucketKind::BpsRead, 2 * MIB), 1000, 256 * KIB),
        );
        files.insert(2, member_queue(Limits::default(), 1000, 256 * KIB));
        let mut group = group_of(limits(BucketKind::BpsTotal, 8 * MIB), &[1, 2]);
        let moved = drive_group(&mut files, &mut group, Duration::from_secs(10));
        let (a, b) = (moved[&1].0, moved[&2].0);
        // The capped member gets its 2 MiB/s (plus its bucket), the other
        // one the rest of the group's 8 MiB/s.
        assert!(a <= 20 * MIB + 205 * KIB + 256 * KIB, "a={a}");
        assert!(a >= 19 * MIB, "a={a}");
        assert!((58 * MIB..=61 * MIB + 512 * KIB).contains(&b), "b={b}");
    }

    #[test]
    fn group_keeps_each_members_fifo() {
        let mut files = HashMap::new();
        files.insert(1, member_queue(Limits::default(), 50, 4 * KIB));
        files.insert(2, member_queue(Limits::default(), 50, 4 * KIB));
        let mut group = group_of(limits(BucketKind::IopsTotal, 100), &[1, 2]);
        let mut seen: HashMap<u64, Vec<u32>> = HashMap::new();
        // 100 requests at 100/s: all released within about a second.
        drive_group_with(
            &mut files,
            &mut group,
            Duration::from_secs(10),
            |_, _| {},
            |m, job| seen.entry(m).or_default().push(job.id),
        );
        for m in [1, 2] {
            assert_eq!(seen[&m], (0..50).collect::<Vec<_>>());
        }
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

    /// Queue-depth-one clients on every member of `group`: each member
    /// queues a read of `bytes` at once and again right after each of its
    /// releases completes. Driven with a fake clock as the scheduler
    /// would: a member is sorted again when it queues or its own deadline
    /// comes, and the group is pumped at its own deadline. Returns the
    /// requests released per member before `until`.
    fn drive_qd1(
        files: &mut HashMap<u64, FileQueue<Fake>>,
        group: &mut Group,
        bytes: u64,
        until: Duration,
    ) -> HashMap<u64, u64> {
        let mut moved: HashMap<u64, u64> = HashMap::new();
        let mut own: BinaryHeap<Reverse<(Duration, u64)>> = BinaryHeap::new();
        let mut armed: HashMap<u64, Duration> = HashMap::new();
        let mut group_at: Option<Duration> = None;
        let mut queued: Vec<u64> = files.keys().copied().collect();
        let mut at = Duration::ZERO;
        while at < until {
            let mut sort_again = Vec::new();
            for m in queued.drain(..) {
                files.get_mut(&m).unwrap().queue.push_back(read(0, bytes));
                group.rejoin(m);
                sort_again.push(m);
            }
            while let Some(Reverse((when, m))) = own.peek().copied() {
                if when > at {
                    break;
                }
                own.pop();
                if armed.get(&m) == Some(&when) {
                    armed.remove(&m);
                    sort_again.push(m);
                }
            }
            let mut arm = |m: u64, next: Option<Duration>| match next {
                Some(w) => {
                    armed.insert(m, at + w);
                    own.push(Reverse((at + w, m)));
                }
                None => {
                    armed.remove(&m);
                }
            };
            for m in sort_again {
                let next = group.classify(m, files.get_mut(&m).unwrap(), at, false);
                arm(m, next);
            }
            let turns = group.turns(files, at, false);
            for (m, next) in turns.arms {
                arm(m, next);
            }
            for (m, _) in turns.released {
                *moved.entry(m).or_default() += 1;
                files.get_mut(&m).unwrap().flight.clear();
                queued.push(m);
            }
            group_at = turns.next.map(|w| at + w).or(group_at.filter(|g| *g > at));
            let next = own
                .peek()
                .map(|Reverse((w, _))| *w)
                .into_iter()
                .chain(group_at)
                .min();
            match next {
                // Resubmissions are seen at the next wakeup.
                Some(next) if queued.is_empty() => at = next,
                Some(next) => at = next.min(at + Duration::from_micros(1)),
                None if queued.is_empty() => break,
                None => at += Duration::from_micros(1),
            }
        }
        moved
    }

    fn unlimited_members(count: u64) -> HashMap<u64, FileQueue<Fake>> {
        (0..count)
            .map(|m| (m, FileQueue::new(Limits::default(), Duration::ZERO)))
            .collect()
    }

    #[test]
    fn ten_thousand_member_group_releases_at_its_rate_with_constant_work_per_request() {
        const RATE_OPS: u64 = 20_000;
        // A bucket of 0.1 s at the average admits this many more at once.
        const CAPACITY_OPS: u64 = RATE_OPS / 10;
        let until = Duration::from_secs(1);
        for members in [10, 10_000] {
            let mut files = unlimited_members(members);
            let ids: Vec<u64> = files.keys().copied().collect();
            let mut group = group_of(limits(BucketKind::IopsRead, RATE_OPS), &ids);
            let moved = drive_qd1(&mut files, &mut group, 4 * KIB, until);
            let released: u64 = moved.values().sum();
            // Released while the level is at most the capacity: the
            // capacity plus one at once, then one every 1/RATE s.
            assert_eq!(released, RATE_OPS + CAPACITY_OPS, "{members} members");
            // Equal turns: every member within one request of the others.
            let lo = ids.iter().map(|m| moved.get(m).copied().unwrap_or(0)).min();
            let hi = ids.iter().map(|m| moved.get(m).copied().unwrap_or(0)).max();
            assert!(hi.unwrap() - lo.unwrap() <= 1, "{members}: {lo:?}..{hi:?}");
            // Each member taken from a ready set released a request: the
            // work per release does not depend on the group's size.
            assert_eq!(group.visits, released, "{members} members");
        }
    }

    #[test]
    fn members_on_their_own_limits_cost_no_turns_in_a_large_group() {
        // 1000 members, half held at 10 requests/s by their own limit, in a
        // group of 20000 requests/s: the capped ones get their 10/s, the
        // others the rest, and no member is looked at without releasing.
        const GROUP_OPS: u64 = 20_000;
        const OWN_OPS: u64 = 10;
        let mut files: HashMap<u64, FileQueue<Fake>> = (0..1000)
            .map(|m| {
                let l = if m < 500 {
                    limits(BucketKind::IopsRead, OWN_OPS)
                } else {
                    Limits::default()
                };
                (m, FileQueue::new(l, Duration::ZERO))
            })
            .collect();
        let ids: Vec<u64> = files.keys().copied().collect();
        let mut group = group_of(limits(BucketKind::IopsRead, GROUP_OPS), &ids);
        let moved = drive_qd1(&mut files, &mut group, 4 * KIB, Duration::from_secs(2));
        let released: u64 = moved.values().sum();
        assert_eq!(group.visits, released);
        assert!(released <= 2 * GROUP_OPS + GROUP_OPS / 10 + 1, "{released}");
        assert!(released >= 2 * GROUP_OPS, "{released}");
        for m in 0..500 {
            // 2 s at 10/s plus the first request and its bucket (1 op).
            assert!((20..=22).contains(&moved[&m]), "member {m}: {}", moved[&m]);
        }
        let rest: Vec<u64> = (500..1000).map(|m| moved[&m]).collect();
        let (lo, hi) = (rest.iter().min().unwrap(), rest.iter().max().unwrap());
        assert!(hi - lo <= 1, "{lo}..{hi}");
    }

    #[test]
    fn group_read_limit_does_not_hold_back_a_members_writes() {
        let mut files = HashMap::new();
        files.insert(1, member_queue(Limits::default(), 1000, 4 * KIB));
        let mut w = FileQueue::new(Limits::default(), Duration::ZERO);
        for id in 0..1000 {
            w.queue.push_back(write(id, 4 * KIB));
        }
        files.insert(2, w);
        let mut group = group_of(limits(BucketKind::IopsRead, 100), &[1, 2]);
        let moved = drive_group(&mut files, &mut group, Duration::from_secs(1));
        // The writer is not limited by the group; the reader gets 100/s.
        assert_eq!(moved[&2].1, 1000);
        assert!((100..=111).contains(&moved[&1].1), "{:?}", moved[&1]);
    }

    #[test]
    fn barrier_goes_at_once_while_the_group_holds_back_everything_else() {
        let mut files = HashMap::new();
        let mut q = FileQueue::new(Limits::default(), Duration::ZERO);
        q.queue.push_back(write(1, 4 * KIB));
        q.queue.push_back(barrier(2));
        files.insert(1, q);
        files.insert(2, member_queue(Limits::default(), 10, 4 * KIB));
        let mut group = group_of(limits(BucketKind::IopsTotal, 1), &[1, 2]);
        for m in [1, 2] {
            group.classify(m, files.get_mut(&m).unwrap(), Duration::ZERO, false);
        }
        let turns = group.turns(&mut files, Duration::ZERO, false);
        assert_eq!(turns.released.len(), 1);
        assert!(turns.next.is_some(), "the group must arm its deadline");
        // The write was performed: its barrier may go, the group's bucket
        // notwithstanding.
        files.get_mut(&1).unwrap().flight.clear();
        let at = ms(1);
        group.classify(1, files.get_mut(&1).unwrap(), at, false);
        let turns = group.turns(&mut files, at, false);
        let got: Vec<(u64, u32)> = turns.released.iter().map(|(m, j)| (*m, j.id)).collect();
        assert_eq!(got, vec![(1, 2)]);
    }
}
