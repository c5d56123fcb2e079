//! From a file's queue to the I/O pool: a request joins its queue, the
//! queue (or its group's turns) releases what its buckets admit, released
//! jobs go to the pool in one batch a round, and a file with no limit and
//! nothing pending goes back to bypassing the scheduler.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fuser::Errno;

use super::deadline::{Wake, arm_wake};
use super::group::Group;
use super::interrupt::caller_dying;
use super::queue::{Arrival, FileQueue};
use super::{Scheduler, Waiting};
use crate::io::{Job, JobSender, Released};
use crate::throttle::{Direction, Limits};

impl Scheduler {
    pub(super) fn enqueue(&mut self, file: u64, mut w: Waiting, now: Instant, arrival: Arrival) {
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
        f.push(w, arrival);
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
    pub(super) fn settle(&mut self, file: u64) {
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
    pub(super) fn watching_all(&self) -> bool {
        self.draining || self.exiting || !self.idle_waiters.is_empty()
    }

    pub(super) fn watch_all(&mut self) {
        let ids: Vec<u64> = self.files.keys().copied().collect();
        for id in ids {
            self.settle(id);
        }
    }

    /// Add `file` to group `name` (made on first use, unlimited until its
    /// limits are set), or note that a member has requests again: it
    /// resumes no lower than the group's virtual time.
    pub(super) fn join_group(&mut self, name: &str, file: u64, at: Duration) {
        let g = self
            .groups
            .entry(name.to_string())
            .or_insert_with(|| Group::new(Limits::default(), at));
        g.rejoin(file);
    }

    /// Release what may go of `file`'s queue (or of its whole group) at
    /// `now` and arm the next deadlines.
    pub(super) fn pump(&mut self, file: u64, now: Instant) {
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
    pub(super) fn classify(&mut self, name: &str, file: u64, now: Instant) {
        let at = self.since_epoch(now);
        let (Some(g), Some(f)) = (self.groups.get_mut(name), self.files.get_mut(&file)) else {
            return;
        };
        let own = g.classify(file, f, at, self.draining);
        self.arm(file, own, now);
    }

    pub(super) fn pump_file(&mut self, file: u64, now: Instant) {
        let at = self.since_epoch(now);
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        let mut released = Vec::new();
        let next = f.release(at, self.draining, &mut released, None, usize::MAX);
        self.arm(file, next, now);
        // Reads and writes that went: the next of their kind may spend
        // credit instead of coming here (see `credit.rs`).
        let mut dirs = [false; 2];
        for w in &released {
            if let Job::Read { .. } | Job::Write { .. } = w.job {
                dirs[w.job.direction().map_or(0, |d| d as usize)] = true;
            }
        }
        let handoffs = self.finish(file, released, now);
        self.grant_credit(file, dirs, now);
        self.settle(file);
        for (next, w) in handoffs {
            self.enqueue(next, w, now, Arrival::Now);
        }
    }

    /// Turns within a group (see `Group::turns`), then dispatch.
    pub(super) fn pump_group(&mut self, name: &str, now: Instant) {
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

    /// Give back bytes charged to `file` and its group; the group's name
    /// if it got some back.
    pub(super) fn refund(
        &mut self,
        file: u64,
        dir: Direction,
        bytes: u64,
        now: Instant,
    ) -> Option<String> {
        let at = self.since_epoch(now);
        let f = self.files.get_mut(&file)?;
        f.state.refund(dir, bytes, at);
        let name = f.group.as_ref()?;
        let g = self.groups.get_mut(name)?;
        g.state.refund(dir, bytes, at);
        // Its statistics count what moved, as the file's do.
        let lane = &mut g.bytes[dir as usize];
        *lane = lane.saturating_sub(bytes);
        Some(name.clone())
    }

    /// Dispatch released requests; returns the copies that must now queue
    /// on their destination file.
    pub(super) fn finish(
        &mut self,
        file: u64,
        released: Vec<Waiting>,
        now: Instant,
    ) -> Vec<(u64, Waiting)> {
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

/// Hand released jobs to the I/O pool, all at once.
pub(super) fn dispatch(jobs: &JobSender, batch: &mut Vec<Released>) {
    if let Err(lost) = jobs.send_all(batch) {
        // The pool is gone (only during teardown).
        log::warn!("I/O pool gone, failing {} released requests", lost.len());
        for r in lost {
            r.job.fail(Errno::EIO);
        }
    }
}
