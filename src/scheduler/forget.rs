//! Forgotten files: the kernel forgot the inode, but the file's state is
//! kept until nothing of it is pending and its buckets are empty, so that
//! closing and reopening a file earns no fresh burst.

use std::time::Instant;

use super::Scheduler;
use super::deadline::{Wake, arm_wake};

impl Scheduler {
    /// Drop the state of a forgotten file once nothing of it is pending
    /// and, unless it was unlinked, its buckets are empty: a file looked up
    /// again before then (same number) finds its levels and counters, so
    /// closing it cannot earn a fresh burst. Not empty yet: looked at again
    /// when they will be.
    pub(super) fn collect(&mut self, file: u64, now: Instant) {
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
}
