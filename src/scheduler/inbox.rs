//! The scheduler's inbox: how the FUSE threads (and the I/O workers) hand
//! it messages, and how it sleeps until one comes or its next deadline,
//! without spinning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::thread::{self, Thread};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::Msg;

/// The scheduler's inbox: a crossbeam channel, with a wake-up of our own.
/// crossbeam's blocking receive spins and yields before it sleeps; on a
/// 2-core host that spinning took a quarter of the scheduler's CPU and the
/// cores the FUSE and I/O threads needed. The scheduler instead sleeps in
/// `park` (no spinning) and a sender unparks it only when it sleeps.
pub fn channel() -> (SchedulerTx, SchedulerRx) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = Arc::new(Bell::default());
    (
        SchedulerTx {
            tx,
            wake: wake.clone(),
        },
        SchedulerRx { rx, wake },
    )
}

#[derive(Default)]
struct Bell {
    /// The scheduler is about to sleep or sleeping.
    sleeping: AtomicBool,
    thread: std::sync::OnceLock<Thread>,
}

impl Bell {
    fn notify(&self) {
        // Pairs with the fence in `SchedulerRx::recv_until`: either the
        // scheduler sees the message, or this sees it sleeping.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst)
            && self.sleeping.swap(false, Ordering::SeqCst)
            && let Some(t) = self.thread.get()
        {
            t.unpark();
        }
    }
}

/// The sending side of the scheduler's inbox.
pub struct SchedulerTx {
    tx: Sender<Msg>,
    wake: Arc<Bell>,
}

impl Clone for SchedulerTx {
    fn clone(&self) -> Self {
        SchedulerTx {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }
}

/// The scheduler has stopped (only during teardown). The message was
/// dropped, which answers any request inside it with EIO.
#[derive(Debug)]
pub struct Stopped;

impl SchedulerTx {
    pub fn send(&self, msg: Msg) -> Result<(), Stopped> {
        self.tx.send(msg).map_err(|_| Stopped)?;
        self.wake.notify();
        Ok(())
    }
}

impl Drop for SchedulerTx {
    fn drop(&mut self) {
        // The last sender going away must wake the scheduler to see it.
        self.wake.sleeping.store(true, Ordering::SeqCst);
        self.wake.notify();
    }
}

/// The receiving side, used by the scheduler thread only.
pub struct SchedulerRx {
    rx: Receiver<Msg>,
    wake: Arc<Bell>,
}

/// Why `recv_until` returned without a message.
pub(super) enum Idle {
    Timeout,
    Disconnected,
}

impl SchedulerRx {
    /// A second end of the channel, to ask whether anything waits in it.
    pub(super) fn watcher(&self) -> Receiver<Msg> {
        self.rx.clone()
    }

    pub(super) fn try_recv(&self) -> Option<Msg> {
        self.rx.try_recv().ok()
    }

    /// A message, or why there is none to wait for; `None`: none yet.
    fn poll(&self) -> Option<Result<Msg, Idle>> {
        match self.rx.try_recv() {
            Ok(msg) => Some(Ok(msg)),
            Err(TryRecvError::Disconnected) => Some(Err(Idle::Disconnected)),
            Err(TryRecvError::Empty) => None,
        }
    }

    /// The next message, waiting until `deadline` (or for ever) without
    /// spinning.
    pub(super) fn recv_until(&self, deadline: Option<Instant>) -> Result<Msg, Idle> {
        let _ = self.wake.thread.set(thread::current());
        loop {
            if let Some(r) = self.poll() {
                return r;
            }
            self.wake.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(r) = self.poll() {
                self.wake.sleeping.store(false, Ordering::SeqCst);
                return r;
            }
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        self.wake.sleeping.store(false, Ordering::SeqCst);
                        return Err(Idle::Timeout);
                    }
                    thread::park_timeout(d - now);
                }
                None => thread::park(),
            }
            self.wake.sleeping.store(false, Ordering::SeqCst);
        }
    }
}
