//! The heap of wake-up deadlines: what each entry is for, how one is armed
//! (once; a stale entry is skipped when it comes up), and what the
//! scheduler does when deadlines come.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::Scheduler;

/// Arm (or disarm, with `None`) the deadline in `next` for `wake`, whose
/// current deadline is `armed`: pushed once; heap entries that no longer
/// match `armed` are stale and skipped when they come up.
pub(super) fn arm_wake(
    deadlines: &mut BinaryHeap<Reverse<(Instant, Wake)>>,
    armed: &mut Option<Instant>,
    wake: Wake,
    next: Option<Duration>,
    now: Instant,
) {
    match next {
        Some(wait) => {
            let when = now + wait;
            if *armed != Some(when) {
                *armed = Some(when);
                deadlines.push(Reverse((when, wake)));
            }
        }
        None => *armed = None,
    }
}

/// What one wakeup in the heap is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Wake {
    File(u64),
    Group(String),
    /// Look again at the callers of interrupted requests.
    Interrupted,
    /// A forgotten file's buckets are empty: its state may go.
    Collect(u64),
}

impl Scheduler {
    /// Pop every deadline that has come and release what it was for.
    pub(super) fn fire_due(&mut self, now: Instant) {
        while let Some(Reverse((when, _))) = self.deadlines.peek() {
            if *when > now {
                break;
            }
            let Some(Reverse((when, wake))) = self.deadlines.pop() else {
                break;
            };
            match wake {
                Wake::File(file) => {
                    if let Some(f) = self.files.get_mut(&file)
                        && f.armed == Some(when)
                    {
                        f.armed = None;
                        f.shared
                            .record_release_lateness(now.saturating_duration_since(when));
                        self.pump(file, now);
                    }
                }
                Wake::Collect(file) => {
                    if let Some(f) = self.files.get_mut(&file)
                        && f.collect_at == Some(when)
                    {
                        f.collect_at = None;
                        self.collect(file, now);
                    }
                }
                Wake::Group(name) => {
                    if let Some(g) = self.groups.get_mut(&name)
                        && g.armed == Some(when)
                    {
                        g.armed = None;
                        self.pump_group(&name, now);
                    }
                }
                Wake::Interrupted => {
                    if self.interrupted_armed == Some(when) {
                        self.interrupted_armed = None;
                        self.recheck_interrupted(now);
                    }
                }
            }
        }
    }

    /// Put `file`'s deadline in the heap (or take it out).
    pub(super) fn arm(&mut self, file: u64, next: Option<Duration>, now: Instant) {
        if let Some(f) = self.files.get_mut(&file) {
            arm_wake(
                &mut self.deadlines,
                &mut f.armed,
                Wake::File(file),
                next,
                now,
            );
        }
    }
}
