//! The I/O side: jobs that perform a released request on the underlying
//! file and send its reply, and the worker pool that runs them so that a slow
//! disk under one file never delays the scheduler.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

use crate::throttle::Direction;

mod buffer;
mod flight;
mod handle;
mod job;
pub mod uring;

pub use buffer::{AlignedBuf, WriteData};
pub use flight::{Completion, Flight};
pub use handle::{DirectFd, Handle, copy_range, fsync, pwrite_full};
pub use job::{Job, Released};
use uring::RingWake;

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
    rings: Vec<Arc<RingWake>>,
}

/// Where the scheduler puts released jobs. Dropping the last sender closes
/// the queue: workers finish what is queued, then stop.
pub struct JobSender {
    queue: Arc<JobQueue>,
}

impl JobSender {
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
        if to_ring {
            let mut batch = vec![Released {
                file,
                flight: flight.clone(),
                job,
            }];
            match self.queue.push_all(&mut batch) {
                Ok(()) => return,
                Err(lost) => {
                    for r in lost {
                        let _ = r.job.run();
                    }
                }
            }
        } else {
            let _ = job.run();
        }
        flight.finish(write);
    }

    /// Whether `run` hands a job of the handle whose unthrottled requests
    /// `flight` counts to a ring worker: there are ring workers, and others
    /// of the handle are in flight. (A caller that would copy data only for
    /// the ring asks first.)
    pub fn to_ring(&self, flight: &Flight) -> bool {
        self.rings && flight.jobs() > 0
    }
}

impl JobQueue {
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
        if let Some(w) = state
            .rings
            .iter()
            .find(|w| w.sleeping.swap(false, Ordering::SeqCst))
        {
            w.ring();
        }
        drop(state);
        for _ in 0..wake {
            self.ready.notify_one();
        }
        Ok(())
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

/// Set (to anything) in the daemon's environment, the I/O pool uses
/// blocking workers even where io_uring works: for comparison, and for
/// hosts whose io_uring misbehaves.
pub const NO_URING_ENV: &str = "THROTTLEFS_NO_IO_URING";

/// Worker threads that run released jobs.
pub struct IoPool {
    workers: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// Start `threads` workers, each reporting through `done` the
    /// completions the scheduler must hear of. Returns the pool and the one
    /// sender of its queue.
    pub fn start(
        threads: usize,
        done: impl Fn(Completion) + Send + Clone + 'static,
    ) -> io::Result<(IoPool, JobSender)> {
        let queue = Arc::new(JobQueue::default());
        match Self::start_rings(threads, &queue, done.clone()) {
            Ok(workers) if !workers.is_empty() => {
                log::info!("I/O on io_uring, {} ring workers", workers.len());
                return Ok((IoPool { workers }, JobSender { queue }));
            }
            Ok(_) => {}
            Err(e) => log::info!("no io_uring ({e}): I/O on {threads} blocking workers"),
        }
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let queue = queue.clone();
            let done = done.clone();
            workers.push(
                thread::Builder::new()
                    .name(format!("io-{i}"))
                    .spawn(move || {
                        while let Some(Released { file, flight, job }) = next_job(&queue) {
                            let write = job.direction() == Some(Direction::Write);
                            let unmoved = job.run();
                            flight.report(file, write, unmoved, &done);
                        }
                    })?,
            );
        }
        Ok((IoPool { workers }, JobSender { queue }))
    }

    /// Ring workers, one per core up to `threads`, or the error that says
    /// io_uring is not to be had here (then none was started).
    fn start_rings(
        threads: usize,
        queue: &Arc<JobQueue>,
        done: impl Fn(Completion) + Send + Clone + 'static,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        if std::env::var_os(NO_URING_ENV).is_some() {
            return Err(io::Error::other(format!("{NO_URING_ENV} is set")));
        }
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        let n = threads.min(cores).max(1);
        let mut rings = Vec::with_capacity(n);
        for _ in 0..n {
            rings.push((uring::new_ring()?, Arc::new(RingWake::new()?)));
        }
        queue.state.lock().expect("job queue").rings =
            rings.iter().map(|(_, w)| w.clone()).collect();
        let mut workers = Vec::with_capacity(n);
        for (i, (ring, wake)) in rings.into_iter().enumerate() {
            let queue = queue.clone();
            let done = done.clone();
            workers.push(
                thread::Builder::new()
                    .name(format!("io-{i}"))
                    .spawn(move || uring::run(ring, queue, wake, done))?,
            );
        }
        Ok(workers)
    }

    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// The next job, or `None` once the queue is closed and empty.
fn next_job(queue: &JobQueue) -> Option<Released> {
    let mut state = queue.state.lock().expect("job queue");
    loop {
        if let Some(job) = state.jobs.pop_front() {
            return Some(job);
        }
        if state.closed {
            return None;
        }
        state.sleeping += 1;
        state = queue.ready.wait(state).expect("job queue");
        state.sleeping -= 1;
        state.waking = state.waking.saturating_sub(1);
    }
}
