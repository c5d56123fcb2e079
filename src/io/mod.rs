//! The I/O side: jobs that perform a released request on the underlying
//! file and send its reply, and the worker pool that runs them so that a slow
//! disk under one file never delays the scheduler.
//!
//! - `job`: a job (`Job`), released with its file (`Released`), and how it
//!   is performed with plain system calls.
//! - `flight`: a file's jobs in flight (`Flight`), counted in by the
//!   scheduler and out by the workers, and the `Completion`s the scheduler
//!   must hear of.
//! - `handle`: an open file of the underlying tree (`Handle`, `DirectFd`)
//!   and the plain system calls on it.
//! - `buffer`: the aligned buffers O_DIRECT needs, each thread's scratch
//!   buffers, and a queued write's data (`WriteData`).
//! - `errors`: a failed request of the underlying file, counted in its
//!   file's `ErrorLog` and logged once per kind (`record_error`).
//! - `queue`: the queue of released jobs and its senders (`JobSender` for
//!   the scheduler, `DirectSender` for files without limits).
//! - `uring` and `blocking`: the two pools that take jobs from the queue,
//!   on io_uring where the kernel offers it, else on blocking threads;
//!   `IoPool`, here, chooses.
//!
//! The pools use the job types and the queue, never each other: another
//! pool would be one more file beside them.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

mod blocking;
mod buffer;
mod errors;
mod flight;
mod handle;
mod job;
mod queue;
mod uring;

pub use buffer::{AlignedBuf, WriteData};
pub use errors::{ErrorLog, IoOp, record_error, record_outcome, record_write};
pub use flight::{Completion, Flight};
pub use handle::{DirectFd, Handle, copy_range, fsync, on_fuse, pwrite_full};
pub use job::{Job, Released, unmoved};
use queue::JobQueue;
pub use queue::{DirectSender, JobSender};

/// Set (to anything) in the daemon's environment, the I/O pool uses
/// blocking workers even where io_uring works: for comparison, and for
/// hosts whose io_uring misbehaves.
pub const NO_URING_ENV: &str = "THROTTLEFS_NO_IO_URING";

/// Worker threads that run released jobs: ring workers (`uring`) where
/// io_uring works, else blocking workers (`blocking`).
pub struct IoPool {
    workers: Vec<JoinHandle<()>>,
}

/// The pool before its threads start: the queue and, where io_uring
/// works, the rings. The rings are set up here, before the daemon enters
/// its sandbox (src/sandbox), and the threads start after it, so that
/// they inherit it.
pub struct PreparedPool {
    threads: usize,
    queue: Arc<JobQueue>,
    rings: Vec<uring::WorkerRing>,
}

impl IoPool {
    /// Set up the queue and the rings for `threads` workers, starting no
    /// thread. Returns them and the one sender of the queue.
    pub fn prepare(threads: usize) -> io::Result<(PreparedPool, JobSender)> {
        let queue = Arc::new(JobQueue::default());
        let rings = if std::env::var_os(NO_URING_ENV).is_some() {
            Err(io::Error::other(format!("{NO_URING_ENV} is set")))
        } else {
            uring::make_rings(threads, &queue)
        };
        let rings = match rings {
            Ok(rings) => rings,
            Err(e) => {
                log::info!("no io_uring ({e}): I/O on {threads} blocking workers");
                Vec::new()
            }
        };
        let prepared = PreparedPool {
            threads,
            queue: queue.clone(),
            rings,
        };
        Ok((prepared, JobSender::new(queue)))
    }

    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }
}

impl PreparedPool {
    /// Start the workers: one per ring, or `threads` blocking ones without
    /// rings; each reports through `done` the completions the scheduler
    /// must hear of.
    pub fn start(self, done: impl Fn(Completion) + Send + Clone + 'static) -> io::Result<IoPool> {
        if self.rings.is_empty() {
            let workers = blocking::start_workers(self.threads, &self.queue, done)?;
            return Ok(IoPool { workers });
        }
        log::info!("I/O on io_uring, {} ring workers", self.rings.len());
        let workers = uring::start_workers(self.rings, &self.queue, done)?;
        Ok(IoPool { workers })
    }
}
