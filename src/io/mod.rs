//! The I/O side: jobs that perform a released request on the underlying
//! file and send its reply, and the worker pool that runs them so that a slow
//! disk under one file never delays the scheduler.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::throttle::Direction;

mod buffer;
mod flight;
mod handle;
mod job;
mod queue;
pub mod uring;

pub use buffer::{AlignedBuf, WriteData};
pub use flight::{Completion, Flight};
pub use handle::{DirectFd, Handle, copy_range, fsync, pwrite_full};
pub use job::{Job, Released};
pub use queue::{DirectSender, JobSender};
use queue::{JobQueue, Wake};
use uring::RingWake;

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
                return Ok((IoPool { workers }, JobSender::new(queue)));
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
                        while let Some(Released { file, flight, job }) = queue.next_job() {
                            let write = job.direction() == Some(Direction::Write);
                            let unmoved = job.run();
                            flight.report(file, write, unmoved, &done);
                        }
                    })?,
            );
        }
        Ok((IoPool { workers }, JobSender::new(queue)))
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
        queue.set_rings(
            rings
                .iter()
                .map(|(_, w)| w.clone() as Arc<dyn Wake>)
                .collect(),
        );
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
