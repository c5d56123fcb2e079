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
pub use errors::{ErrorLog, IoOp, record_error};
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

impl IoPool {
    /// Start `threads` workers, each reporting through `done` the
    /// completions the scheduler must hear of. Returns the pool and the one
    /// sender of its queue.
    pub fn start(
        threads: usize,
        done: impl Fn(Completion) + Send + Clone + 'static,
    ) -> io::Result<(IoPool, JobSender)> {
        let queue = Arc::new(JobQueue::default());
        let rings = if std::env::var_os(NO_URING_ENV).is_some() {
            Err(io::Error::other(format!("{NO_URING_ENV} is set")))
        } else {
            uring::start_workers(threads, &queue, done.clone())
        };
        match rings {
            Ok(workers) if !workers.is_empty() => {
                log::info!("I/O on io_uring, {} ring workers", workers.len());
                return Ok((IoPool { workers }, JobSender::new(queue)));
            }
            Ok(_) => {}
            Err(e) => log::info!("no io_uring ({e}): I/O on {threads} blocking workers"),
        }
        let workers = blocking::start_workers(threads, &queue, done)?;
        Ok((IoPool { workers }, JobSender::new(queue)))
    }

    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }
}
