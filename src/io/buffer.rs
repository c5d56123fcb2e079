//! Buffers: the aligned heap buffer O_DIRECT needs, each thread's
//! reusable scratch buffers, and a queued write's data.

use std::io;
use std::mem::MaybeUninit;

/// A heap buffer with the alignment O_DIRECT needs.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    /// Bytes initialised: by `copy_from`, or by a read into `spare`,
    /// which then sets it.
    pub(super) len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn new(capacity: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(capacity.max(1), align)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf {
            ptr,
            layout,
            len: 0,
        })
    }

    /// A copy of `data` in a buffer aligned to `align`.
    pub fn from_slice(data: &[u8], align: usize) -> io::Result<AlignedBuf> {
        let mut buf = AlignedBuf::new(data.len(), align)?;
        buf.copy_from(data);
        Ok(buf)
    }

    /// Make the buffer's contents a copy of `data`, which must fit.
    pub(super) fn copy_from(&mut self, data: &[u8]) {
        assert!(data.len() <= self.layout.size());
        // SAFETY: the allocation has room for data.len() bytes; the
        // regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), data.len()) };
        self.len = data.len();
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The first `len` bytes, which the caller had filled (a read into
    /// `as_mut_ptr`).
    pub(crate) fn filled(&self, len: usize) -> &[u8] {
        assert!(len <= self.layout.size());
        // SAFETY: within the allocation; the caller filled them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    /// Whether this buffer can hold `size` bytes at alignment `align`.
    fn fits(&self, size: usize, align: usize) -> bool {
        self.layout.size() >= size && self.layout.align() >= align
    }

    /// The whole capacity as uninitialised bytes, for a read to fill.
    pub(super) fn spare(&mut self, size: usize) -> &mut [MaybeUninit<u8>] {
        assert!(size <= self.layout.size());
        // SAFETY: the allocation holds at least `size` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<MaybeUninit<u8>>(), size) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

thread_local! {
    /// Each thread's reusable read and alignment buffers: a read is
    /// answered straight from here (the reply is sent from the slice), so
    /// steady I/O allocates nothing per request.
    pub(super) static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { aligned: None, plain: Vec::new() })
    };
}

pub(super) struct Scratch {
    aligned: Option<AlignedBuf>,
    pub(super) plain: Vec<u8>,
}

impl Scratch {
    /// The aligned buffer, grown to hold `size` bytes at `align`.
    pub(super) fn aligned(&mut self, size: usize, align: usize) -> io::Result<&mut AlignedBuf> {
        if !self.aligned.as_ref().is_some_and(|b| b.fits(size, align)) {
            self.aligned = None;
            self.aligned = Some(AlignedBuf::new(size, align)?);
        }
        Ok(self.aligned.as_mut().expect("just set"))
    }
}

/// Data of a write waiting in the queue: copied once out of the kernel's
/// request buffer, into an aligned buffer when it will go to the O_DIRECT
/// descriptor, so the worker does not copy it again.
#[derive(Debug)]
pub enum WriteData {
    Plain(Vec<u8>),
    Aligned(AlignedBuf),
}

impl WriteData {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            WriteData::Plain(v) => v,
            WriteData::Aligned(b) => b.as_slice(),
        }
    }
}
