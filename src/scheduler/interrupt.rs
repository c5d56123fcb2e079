//! Interrupts (FUSE_INTERRUPT): a queued request whose caller is dying is
//! cancelled with EINTR and charges nothing; after a harmless signal it
//! keeps its place and completes, and its caller is looked at again until
//! it is released, since the kernel sends only one interrupt per request.

use std::time::{Duration, Instant};

use fuser::Errno;

use super::Scheduler;
use super::deadline::{Wake, arm_wake};

/// Interrupts that arrived before their request reached us (another FUSE
/// thread may still be handing it over) are remembered, at most this many;
/// the oldest ids go first. Interrupts for requests that never come here
/// (files without limits, requests already answered) are what fills it.
pub(super) const EARLY_INTERRUPTS_MAX: usize = 1024;

/// How often the callers of queued requests that were interrupted by a
/// harmless signal are looked at again: the kernel sends one interrupt per
/// request, so a caller killed after it is only noticed here (and at its
/// release), at most this late.
const INTERRUPTED_RECHECK_MS: u64 = 100;

/// Whether the thread `tid` that sent a request is going away: its /proc
/// entry is gone, or SIGKILL is pending on it (a signal that kills adds
/// SIGKILL to every thread of the process). A caller we cannot see (tid 0,
/// another pid namespace) counts as staying.
pub(super) fn caller_dying(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => sigkill_pending(&status),
        Err(_) => true,
    }
}

/// SIGKILL in the thread's or the process's pending set of a /proc status.
fn sigkill_pending(status: &str) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .any(|mask| u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0))
}

impl Scheduler {
    /// A request still waiting whose caller is going away (a fatal
    /// signal) is cancelled; after a harmless signal it keeps its place
    /// and is looked at again every `INTERRUPTED_RECHECK_MS`. One already
    /// released completes normally.
    pub(super) fn interrupt(&mut self, unique: u64, now: Instant) {
        let Some(&file) = self.waiting.get(&unique) else {
            self.early_interrupts.insert(unique);
            while self.early_interrupts.len() > EARLY_INTERRUPTS_MAX {
                self.early_interrupts.pop_first();
            }
            return;
        };
        let Some(pid) = self
            .files
            .get(&file)
            .and_then(|f| f.queue.iter().find(|w| w.unique == unique))
            .map(|w| w.pid)
        else {
            return;
        };
        if caller_dying(pid) {
            self.cancel(unique, now);
        } else {
            self.keep_interrupted(unique, pid, now);
        }
    }

    /// Remember a queued request whose caller got a harmless signal, and
    /// make sure its caller is looked at again.
    pub(super) fn keep_interrupted(&mut self, unique: u64, pid: u32, now: Instant) {
        self.interrupted.insert(unique, pid);
        if self.interrupted_armed.is_none() {
            arm_wake(
                &mut self.deadlines,
                &mut self.interrupted_armed,
                Wake::Interrupted,
                Some(Duration::from_millis(INTERRUPTED_RECHECK_MS)),
                now,
            );
        }
    }

    /// Cancel the interrupted requests whose callers are going away now;
    /// look again later while any is left.
    pub(super) fn recheck_interrupted(&mut self, now: Instant) {
        let dying: Vec<u64> = self
            .interrupted
            .iter()
            .filter(|&(_, &pid)| caller_dying(pid))
            .map(|(&unique, _)| unique)
            .collect();
        for unique in dying {
            self.cancel(unique, now);
        }
        let next =
            (!self.interrupted.is_empty()).then(|| Duration::from_millis(INTERRUPTED_RECHECK_MS));
        arm_wake(
            &mut self.deadlines,
            &mut self.interrupted_armed,
            Wake::Interrupted,
            next,
            now,
        );
    }

    /// Remove a waiting request: it is answered EINTR and charges nothing.
    pub(super) fn cancel(&mut self, unique: u64, now: Instant) {
        self.interrupted.remove(&unique);
        let Some(file) = self.waiting.remove(&unique) else {
            return;
        };
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if let Some(pos) = f.queue.iter().position(|w| w.unique == unique) {
            let w = f.queue.remove(pos).expect("found");
            f.shared
                .record_dequeued(now.saturating_duration_since(w.since));
            log::debug!("request {unique} of inode {file} interrupted while queued");
            w.job.fail(Errno::EINTR);
            // Whatever waited behind it may go now.
            self.pump(file, now);
            self.collect(file, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigkill_is_seen_in_either_pending_set() {
        let status = |sig: &str, shd: &str| format!("Name:\tdd\nSigPnd:\t{sig}\nShdPnd:\t{shd}\n");
        assert!(!sigkill_pending(&status(
            "0000000000000000",
            "0000000000000000"
        )));
        // SIGUSR1 (bit 10) and SIGALRM (bit 14) are not SIGKILL.
        assert!(!sigkill_pending(&status(
            "0000000000002200",
            "0000000000000200"
        )));
        assert!(sigkill_pending(&status(
            "0000000000000100",
            "0000000000000000"
        )));
        assert!(sigkill_pending(&status(
            "0000000000000000",
            "0000000000000300"
        )));
    }

    #[test]
    fn a_gone_caller_is_dying_and_an_unknown_one_is_not() {
        assert!(!caller_dying(0));
        assert!(!caller_dying(std::process::id()));
        // Above the largest pid the kernel hands out (2^22).
        assert!(caller_dying(1 << 23));
    }
}
