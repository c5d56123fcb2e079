//! The blocking pool: worker threads that each take one released job at a
//! time from the queue and perform it with plain system calls. Used where
//! io_uring is missing or refused, or `NO_URING_ENV` is set.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use super::flight::Completion;
use super::job::Released;
use super::queue::JobQueue;
use crate::throttle::Direction;

/// Start `threads` blocking workers on `queue`, each reporting through
/// `done` the completions the scheduler must hear of.
pub(crate) fn start_workers(
    threads: usize,
    queue: &Arc<JobQueue>,
    done: impl Fn(Completion) + Send + Clone + 'static,
) -> io::Result<Vec<JoinHandle<()>>> {
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
    Ok(workers)
}
