//! A small Linux native AIO client (io_setup, io_submit, io_getevents,
//! io_destroy by raw syscall), so that tests can put many direct-I/O
//! requests in flight at once from one thread, as QEMU's `aio=native` and
//! fio's libaio engine do.
//!
//! `Aio` owns every in-flight request's control block and buffer until its
//! completion is reaped, so the kernel never writes into freed memory;
//! dropping it with requests in flight blocks in io_destroy until they
//! complete (the kernel waits for them).

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Alignment of every buffer: a page, so the kernel never has to split a
/// request because its memory is unaligned.
const BUF_ALIGN_BYTES: usize = 4096;

// `struct iocb` keeps `aio_key` and `aio_rw_flags` in an endian-dependent
// order; only the little-endian layout is spelled out here.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "iocb layout is little-endian only"
);

/// `struct iocb` of <linux/aio_abi.h> (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}
const _: () = assert!(std::mem::size_of::<Iocb>() == 64);

/// `struct io_event` of <linux/aio_abi.h>.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// IOCB_CMD_* opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
    Fsync = 2,
    Fdsync = 3,
}

/// A zeroed, page-aligned byte buffer (O_DIRECT needs aligned memory).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(Self::layout(len)) };
        assert!(!ptr.is_null(), "out of memory for a {len} B buffer");
        AlignedBuf { ptr, len }
    }

    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), BUF_ALIGN_BYTES).expect("buffer layout")
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with the same layout.
        unsafe { alloc::dealloc(self.ptr, Self::layout(self.len)) }
    }
}

/// One request to submit.
pub struct Request {
    pub op: Op,
    pub fd: RawFd,
    pub offset: u64,
    /// Read into / written from; empty for fsync.
    pub buf: AlignedBuf,
}

impl Request {
    pub fn read(fd: RawFd, offset: u64, len: usize) -> Request {
        Request {
            op: Op::Read,
            fd,
            offset,
            buf: AlignedBuf::zeroed(len),
        }
    }

    pub fn write(fd: RawFd, offset: u64, data: &[u8]) -> Request {
        Request {
            op: Op::Write,
            fd,
            offset,
            buf: AlignedBuf::from_slice(data),
        }
    }

    pub fn fsync(fd: RawFd, op: Op) -> Request {
        assert!(matches!(op, Op::Fsync | Op::Fdsync));
        Request {
            op,
            fd,
            offset: 0,
            buf: AlignedBuf::zeroed(0),
        }
    }
}

/// A reaped request.
pub struct Completion {
    /// The id `submit` returned for it.
    pub id: u64,
    pub op: Op,
    pub fd: RawFd,
    pub offset: u64,
    /// Bytes moved, or a negative errno.
    pub res: i64,
    pub buf: AlignedBuf,
    /// When io_getevents returned it.
    pub at: Instant,
}

/// In flight: the control block (its address is what the kernel holds) and
/// the request with its buffer.
struct Pending {
    _iocb: Box<Iocb>,
    req: Request,
}

/// One AIO context.
pub struct Aio {
    ctx: libc::c_ulong,
    capacity: usize,
    next_id: u64,
    in_flight: HashMap<u64, Pending>,
}

/// io_getevents returns as soon as this many events are ready.
const MIN_EVENTS: libc::c_long = 1;

fn check(r: libc::c_long, what: &str) -> io::Result<usize> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r as usize)
}

impl Aio {
    /// A context that can hold `capacity` requests in flight.
    pub fn new(capacity: usize) -> Aio {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id into ctx.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, capacity as libc::c_long, &mut ctx) };
        check(r, "io_setup").unwrap();
        Aio {
            ctx,
            capacity,
            next_id: 0,
            in_flight: HashMap::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Submits `reqs` in ONE io_submit call (so the kernel queues them in
    /// this order) and returns their ids. Panics if the kernel refuses or
    /// takes only some of them.
    pub fn submit(&mut self, reqs: Vec<Request>) -> Vec<u64> {
        assert!(
            self.in_flight.len() + reqs.len() <= self.capacity,
            "more requests than the context holds"
        );
        let mut ids = Vec::with_capacity(reqs.len());
        let mut ptrs: Vec<*mut Iocb> = Vec::with_capacity(reqs.len());
        let mut pending = Vec::with_capacity(reqs.len());
        for req in reqs {
            let id = self.next_id;
            self.next_id += 1;
            // fsync takes no buffer: the kernel refuses one (EINVAL).
            let buf = if req.buf.len == 0 {
                0
            } else {
                req.buf.ptr as u64
            };
            let mut iocb = Box::new(Iocb {
                aio_data: id,
                aio_lio_opcode: req.op as u16,
                aio_fildes: req.fd as u32,
                aio_buf: buf,
                aio_nbytes: req.buf.len as u64,
                aio_offset: req.offset as i64,
                ..Iocb::default()
            });
            ptrs.push(&mut *iocb);
            ids.push(id);
            pending.push((id, Pending { _iocb: iocb, req }));
        }
        // SAFETY: every pointer is a live Iocb whose buffer lives in
        // `pending`, which is kept until the completion is reaped.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.ctx,
                ptrs.len() as libc::c_long,
                ptrs.as_mut_ptr(),
            )
        };
        let n = check(r, "io_submit").unwrap();
        // The ones the kernel accepted are in flight whatever happens next.
        let total = pending.len();
        for (id, p) in pending.into_iter().take(n) {
            self.in_flight.insert(id, p);
        }
        assert_eq!(n, total, "io_submit took only {n} of {total} requests");
        ids
    }

    /// Reaps completions until at least `min` have arrived (or nothing is in
    /// flight), waiting at most `timeout`; returns them in the kernel's
    /// completion order, fewer than `min` only on timeout.
    pub fn reap(&mut self, min: usize, timeout: Duration) -> Vec<Completion> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut events = vec![IoEvent::default(); self.capacity];
        while out.len() < min && !self.in_flight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // One event is enough to return, so each is stamped with the
            // time it arrived, not the time the last of `min` did.
            // SAFETY: events has room for `capacity` >= in_flight entries.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    MIN_EVENTS,
                    self.in_flight.len() as libc::c_long,
                    events.as_mut_ptr(),
                    &ts,
                )
            };
            let at = Instant::now();
            let n = match check(r, "io_getevents") {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => panic!("{e}"),
            };
            for ev in &events[..n] {
                let p = self
                    .in_flight
                    .remove(&ev.data)
                    .unwrap_or_else(|| panic!("completion for unknown or reaped id {}", ev.data));
                out.push(Completion {
                    id: ev.data,
                    op: p.req.op,
                    fd: p.req.fd,
                    offset: p.req.offset,
                    res: ev.res,
                    buf: p.req.buf,
                    at,
                });
            }
            if n == 0 && Instant::now() >= deadline {
                break;
            }
        }
        out
    }

    /// Reaps every request in flight; panics naming the missing ids if they
    /// do not all complete within `timeout`.
    pub fn reap_all(&mut self, timeout: Duration) -> Vec<Completion> {
        let n = self.in_flight.len();
        let out = self.reap(n, timeout);
        if !self.in_flight.is_empty() {
            let mut left: Vec<u64> = self.in_flight.keys().copied().collect();
            left.sort_unstable();
            panic!(
                "only {} of {n} requests completed within {timeout:?}; still in flight: {left:?}",
                out.len()
            );
        }
        out
    }
}

impl Aio {
    /// Completions the kernel has ready right now without any request in
    /// flight: there must be none (each request is answered exactly once).
    pub fn stray_events(&self) -> usize {
        let mut events = vec![IoEvent::default(); self.capacity];
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let none: libc::c_long = 0;
        // SAFETY: events has room for `capacity` entries.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.ctx,
                none,
                self.capacity as libc::c_long,
                events.as_mut_ptr(),
                &zero,
            )
        };
        check(r, "io_getevents").unwrap()
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        // io_destroy waits for requests still in flight, so their buffers
        // are freed (with `in_flight`) only after the kernel is done.
        // SAFETY: our own context id.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}
