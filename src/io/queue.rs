//! The queue of released jobs between the scheduler (and the FUSE threads,
//! for files without limits) and the pool's workers: blocking workers sleep
//! on its condition variable, ring workers in their rings until woken.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use super::flight::{Completion, Flight};
use super::job::{Job, Released};
use crate::throttle::Direction;

/// How a sender wakes a ring worker, which sleeps in its ring rather than
/// on the queue's condition variable (see `uring::RingWake`).
pub(crate) trait Wake: Send + Sync {
    /// Clear the worker's mark that it is asleep (set under the queue's
    /// lock, by `take`'s `idle`); returns whether it was set.
    fn take_sleeping(&self) -> bool;

    /// Wake the worker.
    fn ring(&self);
}

/// The queue of released jobs. A mutex and a condition variable rather
/// than a channel: idle workers sleep without spinning, which on a 2-core
/// machine would take the CPU from the threads doing the work.
#[derive(Default)]
pub(crate) struct JobQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

impl JobQueue {
    /// For ring workers: move up to `max` queued jobs into `out`. When it
    /// takes none, `idle` runs under the queue's lock (the worker marks
    /// itself asleep, so a sender that queues a job after this sees it).
    /// Returns whether the queue is closed.
    pub(crate) fn take(&self, max: usize, out: &mut Vec<Released>, idle: impl FnOnce()) -> bool {
        let mut state = self.state.lock().expect("job queue");
        let n = max.min(state.jobs.len());
        out.extend(state.jobs.drain(..n));
        if out.is_empty() && !state.closed {
            idle();
        }
        state.closed
    }

    /// For blocking workers: the next job, or `None` once the queue is
    /// closed and empty.
    pub(crate) fn next_job(&self) -> Option<Released> {
        let mut state = self.state.lock().expect("job queue");
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state.sleeping += 1;
            state = self.ready.wait(state).expect("job queue");
            state.sleeping -= 1;
            state.waking = state.waking.saturating_sub(1);
        }
    }

    /// Give the queue its ring workers' wake-ups, before any job is queued.
    pub(crate) fn set_rings(&self, rings: Vec<Arc<dyn Wake>>) {
        self.state.lock().expect("job queue").rings = rings;
    }

    fn has_rings(&self) -> bool {
        !self.state.lock().expect("job queue").rings.is_empty()
    }

    fn push_all(&self, batch: &mut Vec<Released>) -> Result<(), Vec<Released>> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock().expect("job queue");
        if state.closed {
            return Err(std::mem::take(batch));
        }
        let mut wake = 0;
        for r in batch.drain(..) {
            state.jobs.push_back(r);
            if state.sleeping > state.waking {
                state.waking += 1;
                wake += 1;
            }
        }
        // One ring worker takes the whole batch: wake one that sleeps, if
        // none is awake to come back for it.
        if let Some(w) = state.rings.iter().find(|w| w.take_sleeping()) {
            w.ring();
        }
        drop(state);
        for _ in 0..wake {
            self.ready.notify_one();
        }
        Ok(())
    }
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Released>,
    closed: bool,
    /// Workers asleep on `ready`.
    sleeping: usize,
    /// Wake-ups sent and not yet taken: no more workers are woken than
    /// there are jobs for them, since every wake-up is a context switch.
    waking: usize,
    /// Ring workers (io_uring), when the pool has them instead of blocking
    /// workers.
    rings: Vec<Arc<dyn Wake>>,
}

/// Where the scheduler puts released jobs. Dropping the last sender closes
/// the queue: workers finish what is queued, then stop.
pub struct JobSender {
    queue: Arc<JobQueue>,
}

impl JobSender {
    /// The one sender of `queue`, which its pool's workers take from.
    pub(crate) fn new(queue: Arc<JobQueue>) -> JobSender {
        JobSender { queue }
    }

    /// Queue a batch of jobs under one lock, waking at most one sleeping
    /// worker per job. After the pool has stopped the jobs are handed back.
    pub fn send_all(&self, batch: &mut Vec<Released>) -> Result<(), Vec<Released>> {
        self.queue.push_all(batch)
    }

    /// A way for the FUSE threads to hand jobs of files without limits to
    /// the ring workers directly (it does not keep the pool open).
    pub fn direct(&self) -> DirectSender {
        DirectSender {
            queue: self.queue.clone(),
            rings: self.queue.has_rings(),
        }
    }
}

impl Drop for JobSender {
    fn drop(&mut self) {
        let mut state = self.queue.state.lock().expect("job queue");
        state.closed = true;
        for w in &state.rings {
            w.ring();
        }
        drop(state);
        self.queue.ready.notify_all();
    }
}

/// Hands jobs of files without limits straight to the ring workers,
/// bypassing the scheduler.
#[derive(Clone)]
pub struct DirectSender {
    queue: Arc<JobQueue>,
    /// The pool has ring workers (fixed once it has started).
    rings: bool,
}

impl DirectSender {
    /// Run `job` of a file without limits: on this thread when nothing else
    /// of the handle is in flight (the lowest latency), else on a ring
    /// worker, which keeps many in flight without blocking this thread (the
    /// lowest cost at queue depth). Without ring workers always here.
    pub fn run(&self, file: u64, flight: &Arc<Flight>, job: Job) {
        let write = job.direction() == Some(Direction::Write);
        let to_ring = self.to_ring(flight);
        flight.start(write);
        let here = if to_ring {
            let released = Released {
                file,
                flight: flight.clone(),
                job,
            };
            match self.to_ring_worker(released) {
                None => return,
                Some(back) => back.job,
            }
        } else {
            job
        };
        let _ = here.run();
        flight.finish(write);
    }

    /// Hand `released` to a ring worker; it comes back if the queue has
    /// closed (the workers stopped), to be run here instead.
    fn to_ring_worker(&self, released: Released) -> Option<Released> {
        let mut batch = vec![released];
        self.queue.push_all(&mut batch).err()?.pop()
    }

    /// Run `job` of `file`, already counted in the file's `flight` (charged
    /// ahead by the scheduler and spent as credit): on a ring worker when
    /// others of the file are in flight, as `run` does, else here, telling
    /// `done` what the scheduler must hear of it, as a worker would.
    pub fn run_counted(
        &self,
        file: u64,
        flight: Arc<Flight>,
        job: Job,
        done: &impl Fn(Completion),
    ) {
        let write = job.direction() == Some(Direction::Write);
        let (flight, job) = if self.to_ring_counted(&flight) {
            match self.to_ring_worker(Released { file, flight, job }) {
                None => return,
                Some(back) => (back.flight, back.job),
            }
        } else {
            (flight, job)
        };
        let unmoved = job.run();
        flight.report(file, write, unmoved, done);
    }

    /// Whether `run_counted` hands a job counted in `flight` to a ring
    /// worker: there are ring workers, and others are in flight.
    pub fn to_ring_counted(&self, flight: &Flight) -> bool {
        self.rings && flight.jobs() > 1
    }

    /// Whether `run` hands a job of the handle whose unthrottled requests
    /// `flight` counts to a ring worker: there are ring workers, and others
    /// of the handle are in flight, or (on a FUSE ring thread, with
    /// `--io-uring`) other requests wait for this thread. (A caller that
    /// would copy data only for the ring asks first.)
    pub fn to_ring(&self, flight: &Flight) -> bool {
        self.rings && (flight.jobs() > 0 || fuser::ring_backlog() > 0)
    }
}
