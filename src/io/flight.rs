//! A file's jobs in flight, counted in by the scheduler and out by the
//! workers, and the completions the scheduler must hear of.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::throttle::Direction;

/// What is in flight for one file: released to the pool and not yet
/// performed. The scheduler counts a job in when it releases it and the
/// worker counts it out, so a completion needs no message back unless the
/// scheduler asked to hear of it (`watch`): a barrier waiting for writes,
/// a file that may skip the scheduler once idle, a forgotten file, a
/// shutdown. Both sides use SeqCst so that either the worker sees the
/// watch flag or the scheduler, after setting it, sees the count.
#[derive(Debug, Default)]
pub struct Flight {
    jobs: AtomicUsize,
    writes: AtomicUsize,
    watch: AtomicBool,
}

impl Flight {
    /// A job of this file was released.
    pub fn start(&self, write: bool) {
        self.jobs.fetch_add(1, Ordering::SeqCst);
        if write {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A released job will not be performed here after all (a copy moving
    /// on to its destination's queue).
    pub fn cancel(&self, write: bool) {
        self.finish(write);
    }

    /// A job was performed; true when the scheduler must hear of it (the
    /// file's writes or all its jobs are done and it is watching).
    pub fn finish(&self, write: bool) -> bool {
        let jobs_left = self.jobs.fetch_sub(1, Ordering::SeqCst) - 1;
        let writes_left = if write {
            self.writes.fetch_sub(1, Ordering::SeqCst) - 1
        } else {
            usize::MAX
        };
        (jobs_left == 0 || writes_left == 0) && self.watch.load(Ordering::SeqCst)
    }

    pub fn jobs(&self) -> usize {
        self.jobs.load(Ordering::SeqCst)
    }

    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// A job of `file` was performed (or answered without being performed):
    /// count it out, and tell the scheduler through `done` when it watches
    /// the file or bytes charged for the job were not moved.
    pub fn report(
        &self,
        file: u64,
        write: bool,
        unmoved: Option<(Direction, u64)>,
        done: &impl Fn(Completion),
    ) {
        if self.finish(write) || unmoved.is_some() {
            done(Completion { file, unmoved });
        }
    }

    /// Ask (or stop asking) to hear when the file's writes or jobs are done;
    /// returns whether it was asked before.
    pub fn set_watch(&self, on: bool) -> bool {
        self.watch.swap(on, Ordering::SeqCst)
    }

    /// Tests: everything released has been performed.
    #[cfg(test)]
    pub fn clear(&self) {
        self.jobs.store(0, Ordering::SeqCst);
        self.writes.store(0, Ordering::SeqCst);
    }
}

/// A finished job the scheduler must hear of: a barrier may now go, the
/// file may be idle, or bytes charged for it were not moved.
pub struct Completion {
    pub file: u64,
    /// Bytes charged but not moved (short read at end of file, error).
    pub unmoved: Option<(Direction, u64)>,
}
