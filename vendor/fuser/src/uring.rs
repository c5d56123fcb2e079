//! FUSE over io_uring (`FUSE_OVER_IO_URING`, protocol 7.42, Linux 6.14+
//! built with `CONFIG_FUSE_IO_URING`).
//!
//! Requests arrive in ring entries instead of a `read` of `/dev/fuse`, and
//! the reply to each is the next command on its entry (`COMMIT_AND_FETCH`),
//! which also makes the entry available for the next request, instead of a
//! `writev`. INIT, FORGET, INTERRUPT and notifications still use
//! `/dev/fuse`, so the session keeps its `/dev/fuse` threads as well.
//!
//! The kernel has one queue per possible CPU, and a caller's request goes to
//! the queue of the CPU it runs on. Every queue must have an entry
//! registered before the kernel sends anything through the rings (until
//! then requests wait), so every queue gets entries: `queue_depth` each for
//! online CPUs, one for CPUs that are possible but offline.
//!
//! Each ring thread owns one io_uring instance holding the entries of one or
//! more queues (one thread per online CPU). It alone reads the completion
//! queue and dispatches the requests. A reply may be sent from any thread,
//! as with `/dev/fuse`: the replying thread writes the reply into the
//! entry's buffers (the entry is its alone until committed), then, under
//! the ring's submission lock, queues the commit and submits it. The ring
//! thread's own replies are submitted with its next wait, in one system
//! call. The kernel delivers the entry's next request in the context of the
//! thread that submitted the commit, so replies should come from threads
//! that live as long as the session (worker threads, not a thread per
//! request); an entry whose submitting thread has exited is cancelled by
//! the kernel, and the ring thread registers it again.
//!
//! Memory: every entry has a buffer of one page plus the largest payload
//! the kernel may send (max(8 KiB, max_write, max_pages pages)), so
//! `queues x queue_depth x (max_write + 4 KiB)` in all; the pages are only
//! touched, and so resident, as large requests use them.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::ChannelSender;
use crate::dev_fuse::DevFuse;
use crate::ll::Operation;
use crate::passthrough::BackingId;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `FUSE_IO_URING_CMD_REGISTER`: hand an entry's buffers to the kernel.
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: reply, and wait for the next request.
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Not a FUSE command: the tag of a read or write that the filesystem put
/// on the ring for an entry's request (`RingSender::start_io`).
const OP_IO: u32 = 0x100;

/// `struct fuse_uring_req_header`: `in_out[128]` (the `fuse_in_header`
/// of a request, the `fuse_out_header` of its reply), `op_in[128]` (the
/// opcode's own header), then `struct fuse_uring_ent_in_out`.
const REQ_HEADER_SIZE: usize = 288;
const OP_IN_OFFSET: usize = 128;
const OP_IN_SIZE: usize = 128;
/// `fuse_uring_ent_in_out.payload_sz`: bytes of payload, either way.
const PAYLOAD_SZ_OFFSET: usize = 256 + 16;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;
/// An entry's buffer: the kernel's header at the start, the payload from
/// `HEAD_SIZE` on. A request is rebuilt as `/dev/fuse` would deliver it
/// (in header, opcode header, payload) by copying the two headers to just
/// before the payload, so the payload is parsed where the kernel put it.
const HEAD_SIZE: usize = 4096;
/// `FUSE_MIN_READ_BUFFER`: the kernel's smallest payload.
const MIN_PAYLOAD: usize = 8192;
/// Times a REGISTER refused with EAGAIN (INIT not yet processed) is retried.
const REGISTER_RETRIES: u32 = 1000;
/// How long to wait before a command refused with EOPNOTSUPP is tried
/// again: the kernel checks the fuse module parameter `enable_uring` on
/// every command, so an administrator who sets it to N while a connection
/// uses io_uring makes every reply fail until it is Y again.
const DISABLED_RETRY_MS: u64 = 100;

/// How often an idle ring thread wakes to submit what may have been
/// queued without a submit (see `serve`).
const STRANDED_SUBMIT_MS: u32 = 100;

/// Whether the refusal of commands for `enable_uring=N` was logged (once a
/// process; cleared when a command goes through again).
static DISABLED_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// io_uring settings of a session (`Config::io_uring`).
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
pub struct UringConfig {
    /// Entries per queue of an online CPU: how many requests of callers on
    /// one CPU the filesystem may hold at once. Further requests wait in
    /// the kernel's queue, in order.
    pub queue_depth: u16,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self { queue_depth: 8 }
    }
}

thread_local! {
    /// The ring whose thread this is (its address), so that replies made
    /// while it dispatches are submitted with its next wait.
    static RING_THREAD: Cell<usize> = const { Cell::new(0) };
    /// Requests of the ring thread's current batch not yet dispatched.
    static BATCH_LEFT: Cell<usize> = const { Cell::new(0) };
}

/// On a ring thread, while a filesystem method runs: how many requests
/// have arrived on this thread's ring and wait for the method to return.
/// A filesystem that would serve a request on the calling thread (say, a
/// short blocking read) can hand it to a worker instead when others wait.
/// Always 0 on other threads (a `/dev/fuse` thread cannot know).
pub fn ring_backlog() -> usize {
    let ring = RING_THREAD.with(Cell::get) as *const Ring;
    if ring.is_null() {
        return 0;
    }
    // SAFETY: RING_THREAD is set only on the ring's own thread, by `serve`,
    // which holds the ring (an Arc) for as long as the thread runs; only
    // this thread reads the completion queue, and reading its length
    // consumes nothing.
    let waiting = unsafe { (*ring).uring.completion_shared().len() };
    BATCH_LEFT.with(Cell::get) + waiting
}

/// What the ring side knows of one entry.
#[derive(Debug, Default)]
struct EntryState {
    /// `unique` of the request the entry holds in user space, 0 if none.
    awaiting: u64,
    /// The ring thread is in the filesystem's method for this request,
    /// which may still read the request's payload.
    dispatching: bool,
    /// Bytes of payload the request has.
    request_payload: usize,
    /// A reply made while `dispatching` would overwrite that payload: it
    /// waits here, and the ring thread writes it once the method returns.
    deferred: Option<Vec<u8>>,
    /// The read or write on the ring whose completion answers the request.
    io: Option<PendingIo>,
}

/// A read or write that the filesystem hands to a request's ring
/// (`ReplyData::read_on_ring`, `ReplyWrite::write_on_ring`).
pub(crate) struct RingIo {
    pub(crate) write: bool,
    pub(crate) fd: RawFd,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    pub(crate) done: crate::reply::RingIoDone,
}

/// A `RingIo` on the ring, with the request it answers.
struct PendingIo {
    io: RingIo,
    unique: u64,
}

impl fmt::Debug for PendingIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingIo")
            .field("write", &self.io.write)
            .field("len", &self.io.len)
            .field("unique", &self.unique)
            .finish_non_exhaustive()
    }
}

struct Entry {
    qid: u16,
    /// `HEAD_SIZE + payload_size` bytes, page aligned.
    buf: *mut u8,
    /// The two buffers REGISTER hands over: header, payload. Read by the
    /// kernel when the REGISTER is issued, so it lives in the entry.
    iov: [libc::iovec; 2],
    state: Mutex<EntryState>,
    /// `unique` of the last reply committed, to submit it again if its
    /// command is refused for a passing reason (EAGAIN, EINTR).
    last_commit: AtomicU64,
}

impl Entry {
    /// The payload buffer, `HEAD_SIZE` into `buf` (page aligned), as
    /// REGISTER handed it to the kernel.
    fn payload(&self) -> *mut u8 {
        self.iov[1].iov_base.cast()
    }
}

// SAFETY: `buf` is written only by whoever owns the entry at the time (the
// kernel while it has a command for it, the ring thread while it dispatches,
// the one reply after), as the protocol hands it over; `state` is locked.
unsafe impl Send for Entry {}
// SAFETY: as above.
unsafe impl Sync for Entry {}

#[derive(Debug, Default)]
struct SqState {
    /// Commands submitted (or queued) and not yet completed.
    in_kernel: usize,
    /// The ring thread has stopped: nothing is submitted any more.
    closed: bool,
    /// An entry was handed to the kernel.
    registered: bool,
}

/// One io_uring instance with the entries of one or more queues.
pub(crate) struct Ring {
    uring: IoUring<squeue::Entry128, cqueue::Entry>,
    dev: Arc<DevFuse>,
    entries: Box<[Entry]>,
    /// The entries' buffers, one mapping; `None` once leaked.
    region: Option<Region>,
    payload_size: usize,
    sq: Mutex<SqState>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.entries.len())
            .field("payload_size", &self.payload_size)
            .finish_non_exhaustive()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel writes requests into registered buffers: free them only
        // once it cannot (the ring thread saw the connection end), or never
        // had them. Otherwise leak them; this happens only when a session
        // is dropped while its connection is still up.
        let st = self.sq.get_mut();
        if !st.closed && st.registered {
            std::mem::forget(self.region.take());
        }
    }
}

/// Anonymous memory for the entries' buffers: mapped, not allocated, so
/// that pages are zero-filled only when first touched (an allocator would
/// clear the whole aligned block, making every buffer resident at once).
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; who writes which part is the entries' protocol.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        // SAFETY: a fresh private anonymous mapping.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The rings of a session, made before the INIT reply asks for them.
#[derive(Debug)]
pub(crate) struct Rings {
    pub(crate) rings: Vec<Arc<Ring>>,
    pub(crate) queues: usize,
    pub(crate) entries: usize,
    pub(crate) payload_size: usize,
}

/// Parses a kernel CPU list ("0-3,8,10-11").
fn cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

fn read_cpu_list(path: &str) -> io::Result<Vec<usize>> {
    let text = std::fs::read_to_string(path)?;
    cpu_list(&text).ok_or_else(|| io::Error::other(format!("cannot parse {path}: {text:?}")))
}

/// Makes the rings: `queue_depth` entries for each online CPU's queue, one
/// for each other possible CPU's, spread over one ring per online CPU.
pub(crate) fn setup(
    dev: Arc<DevFuse>,
    config: UringConfig,
    payload_size: usize,
) -> io::Result<Rings> {
    // The kernel makes num_possible_cpus() queues, numbered from 0.
    let queues = read_cpu_list("/sys/devices/system/cpu/possible")?.len();
    let online = read_cpu_list("/sys/devices/system/cpu/online").unwrap_or_default();
    let online_queues = online.iter().filter(|&&c| c < queues).count();
    let threads = online_queues.clamp(1, queues.max(1));
    let payload_size = payload_size.max(MIN_PAYLOAD);
    let depth = usize::from(config.queue_depth.max(1));
    let page = page_size::get();
    let stride = (HEAD_SIZE + payload_size).div_ceil(page) * page;
    let mut rings = Vec::with_capacity(threads);
    let mut total = 0;
    for t in 0..threads {
        let qids: Vec<usize> = (t..queues).step_by(threads).collect();
        let per_queue: Vec<(usize, usize)> = qids
            .iter()
            .map(|&q| (q, if online.contains(&q) { depth } else { 1 }))
            .collect();
        let count: usize = per_queue.iter().map(|&(_, n)| n).sum();
        let region = Region::new(count * stride)?;
        let mut entries: Vec<Entry> = Vec::with_capacity(count);
        for &(q, n) in &per_queue {
            for _ in 0..n {
                // SAFETY: within the region.
                let buf = unsafe { region.ptr.add(entries.len() * stride) };
                entries.push(Entry {
                    // The kernel's qids are u16; CPUs are fewer.
                    qid: q as u16,
                    buf,
                    iov: [
                        libc::iovec {
                            iov_base: buf.cast(),
                            iov_len: REQ_HEADER_SIZE,
                        },
                        libc::iovec {
                            // SAFETY: within the entry's part of the region.
                            iov_base: unsafe { buf.add(HEAD_SIZE) }.cast(),
                            iov_len: payload_size,
                        },
                    ],
                    state: Mutex::new(EntryState::default()),
                    last_commit: AtomicU64::new(0),
                });
            }
        }
        total += entries.len();
        let slots = u32::try_from(entries.len().next_power_of_two())
            .map_err(|_| io::Error::other("too many ring entries"))?;
        let uring = restricted_ring(slots)?;
        rings.push(Arc::new(Ring {
            uring,
            dev: dev.clone(),
            entries: entries.into_boxed_slice(),
            region: Some(region),
            payload_size,
            sq: Mutex::new(SqState::default()),
        }));
    }
    Ok(Rings {
        rings,
        queues,
        entries: total,
        payload_size,
    })
}

/// A ring of `slots` entries that accepts only `IORING_OP_URING_CMD`
/// (REGISTER and COMMIT_AND_FETCH on `/dev/fuse`) and the reads and writes
/// a filesystem puts on it for a request (`ReplyData::read_on_ring`,
/// `ReplyWrite::write_on_ring`), with no SQE flags and no
/// `io_uring_register` operation once enabled. io_uring submissions do not
/// pass through a seccomp filter, so a filesystem that confines itself with
/// one gets rings that cannot do more than this. The ring is made disabled,
/// as restrictions can only be registered before it is enabled.
fn restricted_ring(slots: u32) -> io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    let uring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_cqsize(slots * 2)
        .setup_r_disabled()
        .build(slots)?;
    let submitter = uring.submitter();
    submitter.register_restrictions(&mut [
        io_uring::register::Restriction::sqe_op(opcode::UringCmd80::CODE),
        io_uring::register::Restriction::sqe_op(opcode::Read::CODE),
        io_uring::register::Restriction::sqe_op(opcode::Write::CODE),
    ])?;
    submitter.register_enable_rings()?;
    Ok(uring)
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Ring {
    fn sqe(&self, idx: usize, op: u32, commit_id: u64) -> squeue::Entry128 {
        let ent = &self.entries[idx];
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 pad[6]; }
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&ent.qid.to_ne_bytes());
        let mut b = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), op).cmd(cmd);
        if op == CMD_REGISTER {
            b = b.addr(Some(ent.iov.as_ptr() as u64));
        }
        let mut sqe = b.build().user_data((u64::from(op) << 32) | idx as u64);
        if op == CMD_REGISTER {
            // sqe->len is the number of iovecs, 2; UringCmd80 has no setter
            // for it. It is the u32 at byte 24 of the (repr(C)) entry.
            // SAFETY: within the 128-byte entry.
            unsafe {
                ptr::write_unaligned((&raw mut sqe).cast::<u8>().add(24).cast::<u32>(), 2);
            }
        }
        sqe
    }

    /// The commit of entry `idx` once more: its reply is still in the
    /// entry.
    fn commit_again(&self, idx: usize) -> squeue::Entry128 {
        let unique = self.entries[idx].last_commit.load(Ordering::Relaxed);
        self.sqe(idx, CMD_COMMIT_AND_FETCH, unique)
    }

    /// Queues a command and, unless on this ring's thread (which submits
    /// with its next wait), submits it.
    fn push(&self, sqe: &squeue::Entry128) -> io::Result<()> {
        {
            let mut st = self.sq.lock();
            if st.closed {
                return Err(errno(libc::ENODEV));
            }
            // SAFETY: the submission queue is only written under `sq`; the
            // entry points at buffers that outlive the command.
            let pushed = unsafe { self.uring.submission_shared().push(sqe) };
            if pushed.is_err() {
                // Cannot happen: the queue has a slot for every entry, and an
                // entry has at most one command.
                return Err(io::Error::other("io_uring submission queue full"));
            }
            st.in_kernel += 1;
            st.registered = true;
        }
        if RING_THREAD.with(Cell::get) != ptr::from_ref(self) as usize {
            self.submit()?;
        }
        Ok(())
    }

    fn submit(&self) -> io::Result<()> {
        loop {
            match self.uring.submitter().submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes a reply (a `fuse_out_header`, then its payload, in `bufs`)
    /// into entry `idx` and commits it.
    fn write_and_commit(&self, idx: usize, unique: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let buf = self.entries[idx].buf;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let payload = total.saturating_sub(OUT_HEADER_SIZE);
        if total < OUT_HEADER_SIZE || payload > self.payload_size {
            error!(
                "FUSE reply of {total} bytes does not fit the ring entry ({} bytes); replying EIO",
                self.payload_size
            );
            let mut h = [0u8; OUT_HEADER_SIZE];
            h[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
            h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            h[8..16].copy_from_slice(&unique.to_ne_bytes());
            return self.write_and_commit(idx, unique, &[IoSlice::new(&h)]);
        }
        let mut at = 0usize;
        for b in bufs {
            let mut src: &[u8] = b;
            while !src.is_empty() {
                let (dst, room) = if at < OUT_HEADER_SIZE {
                    // SAFETY: within the header.
                    (unsafe { buf.add(at) }, OUT_HEADER_SIZE - at)
                } else {
                    // SAFETY: within the payload, checked above.
                    (
                        unsafe { buf.add(HEAD_SIZE + at - OUT_HEADER_SIZE) },
                        total - at,
                    )
                };
                let n = room.min(src.len());
                // SAFETY: the entry is ours until committed; `src` may be
                // the request's own payload (ptr::copy allows overlap).
                unsafe { ptr::copy(src.as_ptr(), dst, n) };
                src = &src[n..];
                at += n;
            }
        }
        // SAFETY: within the header.
        unsafe {
            ptr::write_unaligned(buf.add(PAYLOAD_SZ_OFFSET).cast::<u32>(), payload as u32);
        }
        self.entries[idx]
            .last_commit
            .store(unique, Ordering::Relaxed);
        self.push(&self.sqe(idx, CMD_COMMIT_AND_FETCH, unique))
    }

    /// The I/O of entry `idx` completed with `res`: finish it, tell the
    /// filesystem, and commit the reply.
    fn finish_io(&self, idx: usize, res: i32) {
        let ent = &self.entries[idx];
        let Some(PendingIo { io, unique }) = ent.state.lock().io.take() else {
            error!("FUSE io_uring: an I/O completed for ring entry {idx}, which has none");
            return;
        };
        let payload = ent.payload();
        let result = if res >= 0 {
            let n = res as usize;
            if n == 0 || n >= io.len {
                Ok(n)
            } else {
                // Short (a read at the end of the file, or cut by a
                // signal): the rest, as pread and pwrite loops would.
                rest_of_io(&io, payload, n)
            }
        } else if matches!(-res, libc::EAGAIN | libc::EINTR) {
            rest_of_io(&io, payload, 0)
        } else {
            Err(errno(-res))
        };
        let mut head = [0u8; OUT_HEADER_SIZE];
        let payload_len = match &result {
            Ok(n) if io.write => {
                // struct fuse_write_out { u32 size; u32 padding; }
                let mut out = [0u8; 8];
                out[0..4].copy_from_slice(&(*n as u32).to_ne_bytes());
                // SAFETY: within the payload, which is at least 8 KiB.
                unsafe { ptr::copy_nonoverlapping(out.as_ptr(), payload, out.len()) };
                out.len()
            }
            Ok(n) => *n,
            Err(e) => {
                let err = e.raw_os_error().unwrap_or(libc::EIO);
                head[4..8].copy_from_slice(&(-err).to_ne_bytes());
                0
            }
        };
        head[0..4].copy_from_slice(&((OUT_HEADER_SIZE + payload_len) as u32).to_ne_bytes());
        head[8..16].copy_from_slice(&unique.to_ne_bytes());
        (io.done)(&result);
        // SAFETY: the header, and the payload size field, of an entry that
        // is ours until the commit.
        unsafe {
            ptr::copy_nonoverlapping(head.as_ptr(), ent.buf, OUT_HEADER_SIZE);
            ptr::write_unaligned(
                ent.buf.add(PAYLOAD_SZ_OFFSET).cast::<u32>(),
                payload_len as u32,
            );
        }
        ent.last_commit.store(unique, Ordering::Relaxed);
        if let Err(e) = self.push(&self.sqe(idx, CMD_COMMIT_AND_FETCH, unique)) {
            debug!("FUSE reply not delivered: {e}");
        }
    }

    /// Parses and dispatches the request that arrived in entry `idx`.
    fn dispatch<FS: Filesystem>(self: &Arc<Self>, idx: usize, se: &SessionEventLoop<FS>) {
        let ent = &self.entries[idx];
        let buf = ent.buf;
        // SAFETY: the kernel wrote the header before completing the command;
        // reads of plain integers.
        let (len, unique, payload) = unsafe {
            (
                ptr::read_unaligned(buf.cast::<u32>()) as usize,
                ptr::read_unaligned(buf.add(8).cast::<u64>()),
                ptr::read_unaligned(buf.add(PAYLOAD_SZ_OFFSET).cast::<u32>()) as usize,
            )
        };
        {
            let mut st = ent.state.lock();
            st.awaiting = unique;
            st.dispatching = true;
            st.request_payload = payload;
            st.deferred = None;
        }
        let sender = RingSender {
            ring: self.clone(),
            idx,
            unique,
            ch: se.ch.sender(),
        };
        let op_len = len
            .checked_sub(IN_HEADER_SIZE + payload)
            .filter(|&n| n <= OP_IN_SIZE && n % 8 == 0 && payload <= self.payload_size);
        match op_len {
            Some(op_len) => {
                let start = HEAD_SIZE - IN_HEADER_SIZE - op_len;
                // SAFETY: both copies stay within the entry's buffer, between
                // the kernel's header (288 bytes) and the payload, and the
                // entry is ours until the reply.
                let data = unsafe {
                    ptr::copy_nonoverlapping(buf, buf.add(start), IN_HEADER_SIZE);
                    ptr::copy_nonoverlapping(
                        buf.add(OP_IN_OFFSET),
                        buf.add(start + IN_HEADER_SIZE),
                        op_len,
                    );
                    std::slice::from_raw_parts(buf.add(start), len)
                };
                match RequestWithSender::with_ring(se.ch.sender(), sender.clone(), data) {
                    // DESTROY (sent only to fuseblk mounts) comes through the
                    // rings too; the connection ends after it.
                    Some(req) if matches!(req.request.operation(), Ok(Operation::Destroy(_))) => {
                        req.reply::<ReplyEmpty>().ok();
                    }
                    Some(req) => req.dispatch(se),
                    None => sender.error(libc::EIO),
                }
            }
            None => {
                error!("malformed FUSE request in a ring entry (len {len}, payload {payload})");
                sender.error(libc::EIO);
            }
        }
        let deferred = {
            let mut st = ent.state.lock();
            st.dispatching = false;
            st.deferred.take()
        };
        if let Some(reply) = deferred {
            if let Err(e) = self.write_and_commit(idx, unique, &[IoSlice::new(&reply)]) {
                debug!("FUSE reply not delivered: {e}");
            }
        }
    }
}

/// Sends the reply of a request that came through a ring entry.
#[derive(Clone)]
pub(crate) struct RingSender {
    ring: Arc<Ring>,
    idx: usize,
    unique: u64,
    /// For the `/dev/fuse` ioctls a reply may need (passthrough).
    ch: ChannelSender,
}

impl fmt::Debug for RingSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingSender")
            .field("entry", &self.idx)
            .field("unique", &self.unique)
            .finish_non_exhaustive()
    }
}

impl RingSender {
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let ent = &self.ring.entries[self.idx];
        {
            let mut st = ent.state.lock();
            if st.awaiting != self.unique {
                // Answered already: the entry may hold another request now.
                return Err(errno(libc::ENOENT));
            }
            st.awaiting = 0;
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            if st.dispatching && st.request_payload > 0 && total > OUT_HEADER_SIZE {
                let mut v = Vec::with_capacity(total);
                for b in bufs {
                    v.extend_from_slice(b);
                }
                st.deferred = Some(v);
                return Ok(());
            }
        }
        self.ring.write_and_commit(self.idx, self.unique, bufs)
    }

    /// Whether this thread may put an I/O of `len` bytes for the request
    /// on its ring (`start_io`): it is the ring's thread, still in the
    /// filesystem's method for the request, and the entry's buffer holds
    /// `len` bytes.
    pub(crate) fn can_do_io(&self, len: usize) -> bool {
        RING_THREAD.with(Cell::get) == Arc::as_ptr(&self.ring) as usize
            && len <= self.ring.payload_size
            && {
                let st = self.ring.entries[self.idx].state.lock();
                st.dispatching && st.awaiting == self.unique
            }
    }

    /// Whether `data` is the request's payload, where the kernel put it in
    /// the entry's buffer.
    pub(crate) fn holds_payload(&self, data: &[u8]) -> bool {
        let ent = &self.ring.entries[self.idx];
        let payload = ent.payload();
        ptr::eq(data.as_ptr(), payload) && data.len() == ent.state.lock().request_payload
    }

    /// Put `io` on the ring, into (or from) the entry's payload buffer; its
    /// completion answers the request (`Ring::finish_io`). The ring thread
    /// submits it with its next wait.
    pub(crate) fn start_io(&self, io: RingIo) {
        let ent = &self.ring.entries[self.idx];
        let payload = ent.payload();
        let len = u32::try_from(io.len).unwrap_or(u32::MAX);
        let sqe: squeue::Entry128 = if io.write {
            opcode::Write::new(types::Fd(io.fd), payload, len)
                .offset(io.offset)
                .build()
        } else {
            opcode::Read::new(types::Fd(io.fd), payload, len)
                .offset(io.offset)
                .build()
        }
        .user_data((u64::from(OP_IO) << 32) | self.idx as u64)
        .into();
        {
            let mut st = ent.state.lock();
            // The reply is the ring's to make now.
            st.awaiting = 0;
            st.io = Some(PendingIo {
                io,
                unique: self.unique,
            });
        }
        if let Err(e) = self.ring.push(&sqe) {
            // The ring thread has stopped: the connection is gone, nobody
            // waits for the reply.
            let pending = ent.state.lock().io.take();
            if let Some(p) = pending {
                (p.io.done)(&Err(e));
            }
        }
    }

    fn error(&self, err: i32) {
        let mut h = [0u8; OUT_HEADER_SIZE];
        h[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
        h[4..8].copy_from_slice(&(-err).to_ne_bytes());
        h[8..16].copy_from_slice(&self.unique.to_ne_bytes());
        if let Err(e) = self.send(&[IoSlice::new(&h)]) {
            debug!("FUSE reply not delivered: {e}");
        }
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> io::Result<BackingId> {
        self.ch.open_backing(fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { self.ch.wrap_backing(id) }
    }
}

/// The ring thread: registers every entry, then dispatches the requests
/// that arrive until the connection ends.
pub(crate) fn serve<FS: Filesystem>(ring: Arc<Ring>, se: SessionEventLoop<FS>) -> io::Result<()> {
    RING_THREAD.with(|c| c.set(Arc::as_ptr(&ring) as usize));
    let n = ring.entries.len();
    for idx in 0..n {
        ring.push(&ring.sqe(idx, CMD_REGISTER, 0))?;
    }
    let mut alive = n;
    let mut gone = false;
    let mut retries = 0u32;
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(2 * n);
    // The wait has a timeout so that a command queued but not submitted
    // (seen once under load: a reply in the submission queue, the ring
    // thread asleep, a caller waiting for good) goes in at the latest
    // after STRANDED_SUBMIT_MS instead of never.
    let stranded = types::Timespec::new().nsec(STRANDED_SUBMIT_MS * 1_000_000);
    let wait_args = types::SubmitArgs::new().timespec(&stranded);
    loop {
        match ring.uring.submitter().submit_with_args(1, &wait_args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::ETIME)) => {}
            Err(e) => {
                error!("FUSE io_uring: waiting for requests failed: {e}");
                ring.sq.lock().closed = true;
                return Err(e);
            }
        }
        {
            // SAFETY: only this thread reads the completion queue.
            let cq = unsafe { ring.uring.completion_shared() };
            done.extend(cq.map(|c| (c.user_data(), c.result())));
        }
        if !done.is_empty() {
            let mut st = ring.sq.lock();
            st.in_kernel = st.in_kernel.saturating_sub(done.len());
        }
        let batch = done.len();
        for (i, (data, res)) in done.drain(..).enumerate() {
            BATCH_LEFT.with(|c| c.set(batch - i - 1));
            let idx = (data & 0xffff_ffff) as usize;
            let op = (data >> 32) as u32;
            if op == OP_IO {
                ring.finish_io(idx, res);
                continue;
            }
            if res >= 0 {
                if DISABLED_LOGGED.load(Ordering::Relaxed)
                    && DISABLED_LOGGED.swap(false, Ordering::Relaxed)
                {
                    warn!("FUSE io_uring: the kernel takes replies again (enable_uring is Y)");
                }
                ring.dispatch(idx, &se);
                continue;
            }
            let err = -res;
            if err == libc::EOPNOTSUPP && !gone {
                // enable_uring was set to N under a live connection: the
                // reply is still in the entry (or the entry still waits to
                // be registered). Nothing can answer the request but this
                // entry, so try again until the parameter is Y again.
                if !DISABLED_LOGGED.swap(true, Ordering::Relaxed) {
                    error!(
                        "FUSE io_uring: the kernel refuses this mount's replies (EOPNOTSUPP): the fuse module parameter enable_uring was set to N while the mount uses io_uring; its requests wait until it is Y again"
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(DISABLED_RETRY_MS));
                let again = if op == CMD_REGISTER {
                    ring.sqe(idx, CMD_REGISTER, 0)
                } else {
                    ring.commit_again(idx)
                };
                if ring.push(&again).is_err() {
                    alive -= 1;
                }
                continue;
            }
            if op == CMD_REGISTER {
                if err == libc::EAGAIN && retries < REGISTER_RETRIES {
                    retries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    if ring.push(&ring.sqe(idx, CMD_REGISTER, 0)).is_ok() {
                        continue;
                    }
                }
                alive -= 1;
                if matches!(err, libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV) {
                    gone = true;
                } else {
                    warn!(
                        "FUSE io_uring: registering a ring entry failed: {}",
                        errno(err)
                    );
                }
            } else if gone {
                alive -= 1;
            } else if matches!(err, libc::EAGAIN | libc::EINTR) {
                // Not taken: the reply is still in the entry.
                if ring.push(&ring.commit_again(idx)).is_err() {
                    alive -= 1;
                }
            } else {
                // The entry's command ended without a request: the connection
                // is ending, or the kernel cancelled the entry (the thread
                // that submitted its last commit exited). Registering it
                // again tells which: it fails once the connection is gone.
                debug!(
                    "FUSE io_uring: ring entry {idx} ended ({}); registering it again",
                    errno(err)
                );
                if ring.push(&ring.sqe(idx, CMD_REGISTER, 0)).is_err() {
                    alive -= 1;
                }
            }
        }
        if gone || alive == 0 {
            let mut st = ring.sq.lock();
            if st.in_kernel == 0 {
                st.closed = true;
                debug!("FUSE io_uring: ring thread done");
                return Ok(());
            }
        }
    }
}

/// The rest of a ring I/O after `done` bytes, with plain `pread`/`pwrite`
/// on the ring thread (rare: a short transfer, or EAGAIN), until all of it
/// is moved, the end of the file, or an error, which fails the whole I/O:
/// a short count would not reach the caller as one (the kernel takes a
/// short FUSE read for the end of the file, and turns a short asynchronous
/// direct write into EIO, losing the errno).
fn rest_of_io(io: &RingIo, payload: *mut u8, mut done: usize) -> io::Result<usize> {
    while done < io.len {
        // SAFETY: within the entry's payload buffer (`io.len` fits it), which
        // is ours until the commit.
        let r = unsafe {
            let at = payload.add(done);
            let off = (io.offset + done as u64) as libc::off_t;
            if io.write {
                libc::pwrite(io.fd, at.cast(), io.len - done, off)
            } else {
                libc::pread(io.fd, at.cast(), io.len - done, off)
            }
        };
        match r {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submits `sqe` and returns its completion's result.
    fn complete_one(
        ring: &IoUring<squeue::Entry128, cqueue::Entry>,
        sqe: &squeue::Entry128,
    ) -> i32 {
        // SAFETY: the entry points at nothing that outlives the wait.
        unsafe { ring.submission_shared().push(sqe) }.expect("room in a fresh ring");
        ring.submitter().submit_and_wait(1).expect("submit");
        // SAFETY: this thread alone reads the completion queue.
        unsafe { ring.completion_shared() }
            .next()
            .expect("a completion")
            .result()
    }

    /// A FUSE ring passes IORING_OP_URING_CMD to the device (here
    /// /dev/null), and reads and writes, and refuses any other operation,
    /// SQE flag or registration with EACCES.
    #[test]
    fn a_ring_accepts_only_uring_cmd_read_and_write() {
        let Ok(ring) = restricted_ring(4) else {
            eprintln!("no io_uring here: nothing to check");
            return;
        };
        let null = std::fs::File::open("/dev/null").unwrap();
        let cmd = opcode::UringCmd80::new(types::Fd(null.as_raw_fd()), CMD_REGISTER).build();
        // Whatever the device makes of it, the ring let it through.
        assert_ne!(complete_one(&ring, &cmd), -libc::EACCES);
        let nop: squeue::Entry128 = opcode::Nop::new().build().into();
        assert_eq!(complete_one(&ring, &nop), -libc::EACCES);
        let mut buf = [0u8; 8];
        let read: squeue::Entry128 =
            opcode::Read::new(types::Fd(null.as_raw_fd()), buf.as_mut_ptr(), 8)
                .build()
                .into();
        assert_eq!(complete_one(&ring, &read), 0);
        let write: squeue::Entry128 =
            opcode::Write::new(types::Fd(null.as_raw_fd()), buf.as_ptr(), 8)
                .build()
                .into();
        assert_eq!(complete_one(&ring, &write), -libc::EBADF);
        let fsync: squeue::Entry128 = opcode::Fsync::new(types::Fd(null.as_raw_fd()))
            .build()
            .into();
        assert_eq!(complete_one(&ring, &fsync), -libc::EACCES);
        let linked = cmd.clone().flags(squeue::Flags::IO_LINK);
        assert_eq!(complete_one(&ring, &linked), -libc::EACCES);
        let err = ring
            .submitter()
            .register_files(&[null.as_raw_fd()])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }
}
