//! The one scheduler thread. It owns every file's throttle state, a FIFO of
//! waiting requests per file and a binary heap of wakeup deadlines. It
//! blocks in `recv_deadline` until the earliest deadline or the next
//! message; nothing polls, and no deadline is armed for a file with nothing
//! waiting. Released requests go to the I/O pool; the pool reports each
//! completion back so that barriers (fsync, flush) are answered only after
//! every earlier request of their file has been performed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::io::{Completion, Job, JobSender};
use crate::throttle::{Direction, Limits, ThrottleState};

/// What the scheduler is told.
pub enum Msg {
    /// A request for `file` (the FUSE inode number), with its reply inside.
    Submit { file: u64, job: Job },
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

struct Waiting {
    job: Job,
}

/// One file's throttle state and queue.
struct FileQueue {
    state: ThrottleState,
    /// Waiting requests in arrival order.
    queue: VecDeque<Waiting>,
    /// Released jobs not yet performed by the pool.
    in_flight: usize,
    /// The deadline this file has in the heap, if any; heap entries that do
    /// not match it are stale and skipped.
    armed: Option<Instant>,
    forgotten: bool,
}

impl FileQueue {
    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0
    }
}

pub struct Scheduler {
    /// Time zero of the throttle maths.
    epoch: Instant,
    defaults: Limits,
    files: HashMap<u64, FileQueue>,
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
        self.files.values().all(FileQueue::is_idle)
    }

    fn handle(&mut self, msg: Msg, now: Instant) {
        match msg {
            Msg::Submit { file, job } => {
                let at = self.since_epoch(now);
                let defaults = self.defaults;
                let f = self.files.entry(file).or_insert_with(|| FileQueue {
                    state: ThrottleState::new(defaults, at),
                    queue: VecDeque::new(),
                    in_flight: 0,
                    armed: None,
                    forgotten: false,
                });
                f.forgotten = false;
                f.queue.push_back(Waiting { job });
                self.pump(file, now);
            }
            Msg::Done(Completion { file }) => {
                if let Some(f) = self.files.get_mut(&file) {
                    f.in_flight = f.in_flight.saturating_sub(1);
                    if f.in_flight == 0 && !f.queue.is_empty() {
                        // A barrier at the head may now go.
                        self.pump(file, now);
                    }
                }
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

    /// Release whatever of `file`'s queue may go at `now`, in order, and arm
    /// the file's next deadline.
    ///
    /// Order: with a total limit (reads and writes share a bucket) the queue
    /// is one strict FIFO. With only per-direction limits, reads and writes
    /// are independent FIFOs in one list: a waiting read holds back later
    /// reads but not a write its own buckets allow. A barrier holds back
    /// everything after it and goes only when everything before it has been
    /// performed.
    fn pump(&mut self, file: u64, now: Instant) {
        let at = self.since_epoch(now);
        let Scheduler {
            files,
            deadlines,
            jobs,
            draining,
            ..
        } = self;
        let Some(f) = files.get_mut(&file) else {
            return;
        };
        let strict = f.state.limits().has_total();
        let mut blocked = [false; 2];
        let mut earliest: Option<Duration> = None;
        let mut i = 0;
        while i < f.queue.len() {
            let Some(dir) = f.queue[i].job.direction() else {
                if i == 0 && f.in_flight == 0 {
                    let w = f.queue.pop_front().expect("non-empty");
                    f.in_flight += 1;
                    dispatch(jobs, file, w.job);
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
            let wait = if *draining {
                Duration::ZERO
            } else {
                f.state.wait(dir, at)
            };
            if wait.is_zero() {
                let w = f.queue.remove(i).expect("index in range");
                f.state.account(dir, w.job.bytes(), at);
                f.in_flight += 1;
                dispatch(jobs, file, w.job);
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
        match earliest {
            Some(wait) => {
                let when = now + wait;
                if f.armed != Some(when) {
                    f.armed = Some(when);
                    deadlines.push(Reverse((when, file)));
                }
            }
            None => f.armed = None,
        }
    }
}

fn dispatch(jobs: &JobSender, file: u64, job: Job) {
    if let Err(e) = jobs.send((file, job)) {
        // The pool is gone (only during teardown): dropping the job
        // answers its caller EIO.
        log::warn!("I/O pool gone, failing a request of inode {file}");
        drop(e);
    }
}
