//! I/O workers on io_uring: each worker submits the reads, writes and
//! fsyncs of released jobs to its own ring and replies as they complete,
//! so one thread keeps many requests in flight without blocking (and
//! without a context switch) per request. A worker sleeps in the ring;
//! the scheduler wakes it through an eventfd whose read is always pending
//! there. Where io_uring is not available the blocking pool (`blocking`)
//! is used instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use fuser::{Errno, ReplyData, ReplyEmpty, ReplyWrite};
use io_uring::{IoUring, opcode, register, squeue, types};

use super::buffer::{AlignedBuf, WriteData};
use super::errors::{IoOp, record_error};
use super::flight::{Completion, Flight};
use super::handle::Handle;
use super::job::{Job, Released, unmoved};
use super::queue::{JobQueue, Wake};
use crate::sizing;
use crate::throttle::Direction;

/// Submission queue entries of each ring; one is the eventfd's read.
pub const RING_ENTRIES: u32 = 256;
/// Requests one worker keeps in flight at most.
const OPS_MAX: usize = RING_ENTRIES as usize - 1;
/// `user_data` of the eventfd read (operations use their slot index).
const WAKE_TAG: u64 = u64::MAX;

/// How the scheduler wakes a ring worker: `sleeping` is set under the job
/// queue's lock when the worker found nothing to take, and a sender that
/// finds it set clears it and writes the eventfd.
pub struct RingWake {
    pub sleeping: AtomicBool,
    efd: OwnedFd,
}

impl RingWake {
    pub fn new() -> io::Result<RingWake> {
        // SAFETY: eventfd returns a fresh descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RingWake {
            sleeping: AtomicBool::new(false),
            // SAFETY: fresh descriptor, ours.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

impl Wake for RingWake {
    fn take_sleeping(&self) -> bool {
        self.sleeping.swap(false, Ordering::SeqCst)
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. It cannot
        // block: the worker reads the counter before it overflows.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// A ring worker's ring and how the queue wakes it.
pub(crate) type WorkerRing = (IoUring, Arc<RingWake>);

/// Rings for ring workers, one per core up to `threads`, registered with
/// `queue`; or the error that says io_uring is not to be had here (then
/// none was made).
pub(crate) fn make_rings(threads: usize, queue: &JobQueue) -> io::Result<Vec<WorkerRing>> {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let n = threads.min(cores).max(1);
    let mut rings = Vec::with_capacity(n);
    for _ in 0..n {
        rings.push((new_ring()?, Arc::new(RingWake::new()?)));
    }
    queue.set_rings(
        rings
            .iter()
            .map(|(_, w)| w.clone() as Arc<dyn Wake>)
            .collect(),
    );
    Ok(rings)
}

/// A ring worker on each of `rings`.
pub(crate) fn start_workers(
    rings: Vec<WorkerRing>,
    queue: &Arc<JobQueue>,
    done: impl Fn(Completion) + Send + Clone + 'static,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut workers = Vec::with_capacity(rings.len());
    for (i, (ring, wake)) in rings.into_iter().enumerate() {
        let queue = queue.clone();
        let done = done.clone();
        workers.push(
            thread::Builder::new()
                .name(format!("io-{i}"))
                .spawn(move || run(ring, queue, wake, done))?,
        );
    }
    Ok(workers)
}

/// The only operations a worker's ring accepts: the reads, writes and
/// fsyncs of jobs (and the eventfd's read). io_uring submissions do not
/// pass through the seccomp filter, so the ring itself is restricted to
/// them, with no SQE flags and no later `io_uring_register` operation.
const RING_OPCODES: [u8; 3] = [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE];

/// A ring for one worker, restricted to `RING_OPCODES`, or the error that
/// says io_uring is not to be had (not built in, disabled by sysctl,
/// refused by a seccomp filter, or a kernel before 5.10 without ring
/// restrictions).
fn new_ring() -> io::Result<IoUring> {
    // Made disabled: restrictions can only be registered before the ring
    // is enabled, and nothing can be submitted until then.
    let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
    let mut allowed: Vec<register::Restriction> = RING_OPCODES
        .iter()
        .map(|&op| register::Restriction::sqe_op(op))
        .collect();
    let submitter = ring.submitter();
    submitter.register_restrictions(&mut allowed)?;
    submitter.register_enable_rings()?;
    Ok(ring)
}

/// Buffer a read lands in: aligned for the O_DIRECT descriptor.
enum ReadBuf {
    Plain(Vec<u8>),
    Aligned(AlignedBuf),
}

impl ReadBuf {
    fn ptr(&mut self) -> *mut u8 {
        match self {
            ReadBuf::Plain(v) => v.as_mut_ptr(),
            ReadBuf::Aligned(b) => b.as_mut_ptr(),
        }
    }

    fn slice(&self, len: usize) -> &[u8] {
        match self {
            // SAFETY: the kernel wrote the first `len` bytes (the capacity
            // was allocated for the whole request).
            ReadBuf::Plain(v) => unsafe { std::slice::from_raw_parts(v.as_ptr(), len) },
            ReadBuf::Aligned(b) => b.filled(len),
        }
    }
}

/// What an operation in flight does.
enum Kind {
    Read {
        buf: ReadBuf,
        size: usize,
        reply: ReplyData,
    },
    Write {
        data: WriteData,
        reply: ReplyWrite,
    },
    Fsync {
        datasync: bool,
        reply: ReplyEmpty,
    },
}

/// An operation in flight in the ring, with what it needs until its reply.
struct Op {
    file: u64,
    flight: Arc<Flight>,
    handle: Arc<Handle>,
    fd: RawFd,
    offset: u64,
    /// Bytes moved so far (short transfers are continued).
    done: usize,
    kind: Kind,
}

impl Op {
    /// The next submission for this operation.
    fn entry(&mut self, slot: usize) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        let at = self.offset + self.done as u64;
        let entry = match &mut self.kind {
            Kind::Read { buf, size, .. } => {
                let rest = (*size - self.done) as u32;
                // SAFETY of the pointer: the buffer lives in this Op, which
                // stays in its slot until the completion arrives.
                let ptr = buf.ptr().wrapping_add(self.done);
                opcode::Read::new(fd, ptr, rest).offset(at).build()
            }
            Kind::Write { data, .. } => {
                let bytes = &data.as_slice()[self.done..];
                opcode::Write::new(fd, bytes.as_ptr(), bytes.len() as u32)
                    .offset(at)
                    .build()
            }
            Kind::Fsync { datasync, .. } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
        };
        entry.user_data(slot as u64)
    }

    /// Account a completion with result `res`; the operation comes back
    /// when it must be submitted again (a short transfer, EINTR, EAGAIN).
    fn complete(mut self, res: i32, done: &impl Fn(Completion)) -> Option<Op> {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return Some(self);
        }
        let total = match &self.kind {
            Kind::Read { size, .. } => *size,
            Kind::Write { data, .. } => data.as_slice().len(),
            Kind::Fsync { .. } => 0,
        };
        if res > 0 && !matches!(self.kind, Kind::Fsync { .. }) {
            self.done += res as usize;
            if self.done < total {
                return Some(self);
            }
        }
        // Finished: with all of it, at end of file (0), or with an error,
        // which fails it, also after some bytes (see `transfer` in
        // handle.rs).
        let Op {
            file,
            flight,
            handle,
            offset,
            done: moved,
            kind,
            ..
        } = self;
        let error = (res < 0).then(|| Errno::from_i32(-res));
        // What the caller gets, as charged: nothing of a failed request.
        let moved = if error.is_some() { 0 } else { moved };
        let (write, unmoved) = match kind {
            Kind::Read { buf, reply, .. } => {
                match error {
                    Some(e) => {
                        record_error(&handle, IoOp::Read, &io::Error::from_raw_os_error(-res));
                        reply.error(e);
                    }
                    None => {
                        handle.shared.record_io(Direction::Read, moved as u64);
                        reply.data(buf.slice(moved));
                    }
                }
                (false, unmoved(Direction::Read, total as u64, moved))
            }
            Kind::Write { reply, .. } => {
                match error {
                    Some(e) => {
                        record_error(&handle, IoOp::Write, &io::Error::from_raw_os_error(-res));
                        reply.error(e);
                    }
                    None => {
                        handle.shared.record_io(Direction::Write, moved as u64);
                        reply.written(moved as u32);
                        sizing::after_write(
                            file,
                            &handle.shared,
                            handle.fd.as_raw_fd(),
                            offset,
                            moved as u64,
                        );
                    }
                }
                (true, unmoved(Direction::Write, total as u64, moved))
            }
            Kind::Fsync { reply, .. } => {
                match error {
                    Some(e) => {
                        record_error(&handle, IoOp::Fsync, &io::Error::from_raw_os_error(-res));
                        reply.error(e);
                    }
                    None => reply.ok(),
                }
                (false, None)
            }
        };
        drop(handle);
        flight.report(file, write, unmoved, done);
        None
    }
}

/// Turn a released job into a ring operation, or perform it here when the
/// ring has no operation for it (a flush answers at once; a copy is one
/// copy_file_range call) or must not have one (a read of a file on FUSE,
/// see `on_fuse` in handle.rs).
fn start(r: Released, done: &impl Fn(Completion)) -> Option<Op> {
    let Released { file, flight, job } = r;
    if let Job::Read { handle, .. } = &job
        && handle.sync_reads
    {
        let unmoved = job.run();
        flight.report(file, false, unmoved, done);
        return None;
    }
    let (handle, offset, kind) = match job {
        Job::Read {
            handle,
            offset,
            size,
            reply,
        } => {
            let size = size as usize;
            let direct = handle
                .direct_for(offset, size)
                .map(|d| (d.fd.as_raw_fd(), d.mem_align_bytes));
            let (fd, buf) = match direct {
                Some((fd, align)) => match AlignedBuf::new(size, align) {
                    Ok(b) => (fd, ReadBuf::Aligned(b)),
                    Err(e) => {
                        reply.error(Errno::from(e));
                        let unmoved = unmoved(Direction::Read, size as u64, 0);
                        flight.report(file, false, unmoved, done);
                        return None;
                    }
                },
                None => (handle.raw(), ReadBuf::Plain(Vec::with_capacity(size))),
            };
            (handle, offset, (fd, Kind::Read { buf, size, reply }))
        }
        Job::Write {
            handle,
            offset,
            data,
            reply,
        } => {
            let fd = handle
                .direct_write_fd(&data)
                .unwrap_or_else(|| handle.raw());
            (handle, offset, (fd, Kind::Write { data, reply }))
        }
        Job::Fsync {
            handle,
            datasync,
            reply,
        } => {
            let fd = handle.raw();
            (handle, 0, (fd, Kind::Fsync { datasync, reply }))
        }
        job @ (Job::Flush { .. } | Job::Copy { .. }) => {
            let write = job.direction() == Some(Direction::Write);
            let unmoved = job.run();
            flight.report(file, write, unmoved, done);
            return None;
        }
    };
    let (fd, kind) = kind;
    Some(Op {
        file,
        flight,
        handle,
        fd,
        offset,
        done: 0,
        kind,
    })
}

/// One ring worker: take what the queue holds (as much as the ring has room
/// for), submit it, sleep in the ring until a completion or the eventfd,
/// reply to what completed; stop once the queue is closed and empty and
/// nothing is in flight.
fn run(mut ring: IoUring, queue: Arc<JobQueue>, wake: Arc<RingWake>, done: impl Fn(Completion)) {
    let mut slots: Vec<Option<Op>> = (0..OPS_MAX).map(|_| None).collect();
    let mut free: Vec<usize> = (0..OPS_MAX).rev().collect();
    // The eventfd read's target; on the heap, and dropped after the ring
    // (which cancels the read) at the end.
    let mut counter = Box::new([0u8; 8]);
    let mut wake_armed = false;
    let mut taken = Vec::new();
    loop {
        if !wake_armed {
            let entry = opcode::Read::new(types::Fd(wake.efd.as_raw_fd()), counter.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE_TAG);
            // SAFETY: `counter` is dropped only after the ring.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                wake_armed = true;
            }
        }
        let closed = queue.take(free.len(), &mut taken, || {
            wake.sleeping.store(true, Ordering::SeqCst);
        });
        let in_flight = OPS_MAX - free.len();
        if taken.is_empty() && closed && in_flight == 0 {
            break;
        }
        let took = !taken.is_empty();
        for r in taken.drain(..) {
            if let Some(mut op) = start(r, &done) {
                let slot = free.pop().expect("room was counted");
                let entry = op.entry(slot);
                slots[slot] = Some(op);
                // SAFETY: the entry's buffers live in `slots` until its
                // completion; the ring has room (one entry per free slot).
                while unsafe { ring.submission().push(&entry) }.is_err() {
                    submit(&ring, 0);
                }
            }
        }
        // Sleep only when nothing new was taken: otherwise submit and look
        // at the queue again.
        submit(&ring, if took { 0 } else { 1 });
        wake.sleeping.store(false, Ordering::SeqCst);
        let mut again = Vec::new();
        for cqe in ring.completion() {
            let tag = cqe.user_data();
            if tag == WAKE_TAG {
                wake_armed = false;
                continue;
            }
            let slot = tag as usize;
            let Some(op) = slots[slot].take() else {
                continue;
            };
            match op.complete(cqe.result(), &done) {
                Some(mut op) => {
                    let entry = op.entry(slot);
                    slots[slot] = Some(op);
                    again.push(entry);
                }
                None => free.push(slot),
            }
        }
        for entry in again {
            // SAFETY: as above.
            while unsafe { ring.submission().push(&entry) }.is_err() {
                submit(&ring, 0);
            }
        }
    }
    drop(ring);
    drop(counter);
    drop(slots);
}

fn submit(ring: &IoUring, want: usize) {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // EBUSY: the completion queue is full; the caller reaps it.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return,
            Err(e) => {
                log::error!("io_uring submit: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submits `entry` to `ring` and returns its completion's result.
    fn complete_one(ring: &mut IoUring, entry: squeue::Entry) -> i32 {
        // SAFETY: the entry's buffers outlive the wait below.
        unsafe { ring.submission().push(&entry) }.expect("room in a fresh ring");
        ring.submit_and_wait(1).expect("submit");
        ring.completion().next().expect("a completion").result()
    }

    /// A worker's ring performs its own operations and refuses any other
    /// (EACCES), and registers nothing more once enabled.
    #[test]
    fn worker_ring_is_restricted() {
        let Ok(mut ring) = new_ring() else {
            eprintln!("no io_uring here: nothing to check");
            return;
        };
        let file = tempfile::tempfile().unwrap();
        let fd = types::Fd(file.as_raw_fd());
        let data = *b"restricted";
        let write = opcode::Write::new(fd, data.as_ptr(), data.len() as u32).build();
        assert_eq!(complete_one(&mut ring, write), data.len() as i32);
        let mut back = [0u8; 10];
        let read = opcode::Read::new(fd, back.as_mut_ptr(), 10).build();
        assert_eq!(complete_one(&mut ring, read), 10);
        assert_eq!(back, data);
        assert_eq!(complete_one(&mut ring, opcode::Fsync::new(fd).build()), 0);

        // Allowed by the opcode, refused by its flags: no SQE flag is.
        let linked = opcode::Fsync::new(fd).build().flags(squeue::Flags::IO_LINK);
        assert_eq!(complete_one(&mut ring, linked), -libc::EACCES);
        for refused in [
            opcode::Nop::new().build(),
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/".as_ptr()).build(),
            opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build(),
            opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), c"x".as_ptr()).build(),
        ] {
            assert_eq!(complete_one(&mut ring, refused), -libc::EACCES);
        }
        let err = ring.submitter().register_files(&[fd.0]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }
}
