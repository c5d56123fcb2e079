//! An open file of the underlying tree and the plain system calls on it:
//! pread, pwrite, fsync and copy_file_range, retried on EINTR and continued
//! when short.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::buffer::{AlignedBuf, SCRATCH, WriteData};
use super::flight::Flight;
use crate::stats::FileShared;

/// An open file of the underlying tree. Queued requests hold an `Arc` to it,
/// so a `release` that races with a queued request (a caller killed while
/// waiting) cannot close the descriptor, or let its number be reused, under
/// that request.
#[derive(Debug)]
pub struct Handle {
    pub fd: OwnedFd,
    /// When the caller opened with O_DIRECT: the file opened O_DIRECT too,
    /// used for every request that meets its alignment. Shared by the
    /// inode's handles with the same access flags; it closes with the last.
    pub direct: Option<Arc<DirectFd>>,
    /// The scheduler's key for the file (the FUSE inode number).
    pub file: u64,
    /// The file's counters and bypass flag.
    pub shared: Arc<FileShared>,
    /// Requests of this handle served without the scheduler (the file has
    /// no limits) and not yet answered.
    pub unthrottled: Arc<Flight>,
    /// Reads go through pread even on a ring worker: the file is on FUSE
    /// (see `on_fuse`).
    pub sync_reads: bool,
}

/// Whether `fd` is a file on a FUSE filesystem. Linux (seen on 6.18)
/// reads the rest of a short io_uring read of such a file at the old
/// offset when its filesystem did not ask for FUSE_ASYNC_DIO (libfuse asks
/// by default, fuser does not), and a read at the end of the file comes
/// back full of repeated data; pread is right. Which such filesystem
/// asked cannot be seen from here, so every FUSE source is read with
/// pread.
pub fn on_fuse(fd: RawFd) -> bool {
    // SAFETY: fstatfs fills a zeroed, valid out-structure.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstatfs(fd, &mut st) };
    r == 0 && st.f_type == libc::FUSE_SUPER_MAGIC
}

/// A descriptor opened with O_DIRECT and the alignment it demands.
#[derive(Debug)]
pub struct DirectFd {
    pub fd: OwnedFd,
    /// Alignment of buffers in memory, in bytes.
    pub mem_align_bytes: usize,
    /// Alignment of offsets and lengths, in bytes.
    pub offset_align_bytes: u64,
}

impl DirectFd {
    /// The alignment the kernel reports for direct I/O on `fd` (statx
    /// STATX_DIOALIGN), or `None` where the file does not support it.
    pub fn new(fd: OwnedFd) -> Option<DirectFd> {
        // SAFETY: statx fills a zeroed, valid out-structure.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::statx(
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
            return None;
        }
        Some(DirectFd {
            fd,
            mem_align_bytes: (stx.stx_dio_mem_align as usize).max(1),
            offset_align_bytes: u64::from(stx.stx_dio_offset_align),
        })
    }

    pub(crate) fn fits(&self, offset: u64, len: usize) -> bool {
        len > 0
            && offset.is_multiple_of(self.offset_align_bytes)
            && (len as u64).is_multiple_of(self.offset_align_bytes)
    }
}

impl Handle {
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The O_DIRECT descriptor, when the caller asked for O_DIRECT and a
    /// request of `len` bytes at `offset` meets its alignment.
    pub(crate) fn direct_for(&self, offset: u64, len: usize) -> Option<&DirectFd> {
        self.direct.as_deref().filter(|d| d.fits(offset, len))
    }

    /// The O_DIRECT descriptor for queued write data prepared for it (see
    /// `write_data`).
    pub(crate) fn direct_write_fd(&self, data: &WriteData) -> Option<RawFd> {
        match (data, self.direct.as_ref()) {
            (WriteData::Aligned(_), Some(d)) => Some(d.fd.as_raw_fd()),
            _ => None,
        }
    }

    /// Read up to `size` bytes at `offset` into this thread's scratch
    /// buffer, directly when the caller asked for O_DIRECT and the request
    /// is aligned, and hand the bytes read (or the error) to `with`.
    pub fn read_with<T>(
        &self,
        offset: u64,
        size: usize,
        with: impl FnOnce(io::Result<&[u8]>) -> T,
    ) -> T {
        SCRATCH.with_borrow_mut(|scratch| {
            if let Some(d) = self.direct_for(offset, size) {
                let buf = match scratch.aligned(size, d.mem_align_bytes) {
                    Ok(b) => b,
                    Err(e) => return with(Err(e)),
                };
                return match pread_into(d.fd.as_raw_fd(), buf.spare(size), offset) {
                    Ok(n) => {
                        buf.len = n;
                        with(Ok(buf.as_slice()))
                    }
                    Err(e) => with(Err(e)),
                };
            }
            let buf = &mut scratch.plain;
            buf.clear();
            buf.reserve(size);
            match pread_into(self.raw(), &mut buf.spare_capacity_mut()[..size], offset) {
                Ok(n) => {
                    // SAFETY: pread_into initialised the first `n` bytes.
                    unsafe { buf.set_len(n) };
                    with(Ok(buf.as_slice()))
                }
                Err(e) => with(Err(e)),
            }
        })
    }

    /// Copy a write's data out of the kernel's buffer to wait in the queue,
    /// aligned when it will go to the O_DIRECT descriptor.
    pub fn write_data(&self, offset: u64, data: &[u8]) -> WriteData {
        if let Some(d) = self.direct_for(offset, data.len())
            && let Ok(buf) = AlignedBuf::from_slice(data, d.mem_align_bytes)
        {
            return WriteData::Aligned(buf);
        }
        WriteData::Plain(data.to_vec())
    }

    /// Write queued data (see `write_data`) at `offset`.
    pub fn write_queued(&self, offset: u64, data: &WriteData) -> io::Result<usize> {
        match self.direct_write_fd(data) {
            Some(fd) => pwrite_full(fd, offset, data.as_slice()),
            None => self.write_at(offset, data.as_slice()),
        }
    }

    /// Write all of `data` at `offset`, directly (through this thread's
    /// aligned scratch buffer) when the caller asked for O_DIRECT and the
    /// request is aligned.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        if let Some(d) = self.direct_for(offset, data.len()) {
            return SCRATCH.with_borrow_mut(|scratch| {
                let buf = scratch.aligned(data.len(), d.mem_align_bytes)?;
                buf.copy_from(data);
                pwrite_full(d.fd.as_raw_fd(), offset, buf.as_slice())
            });
        }
        pwrite_full(self.raw(), offset, data)
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Move `len` bytes at `offset` with repeated calls of `op(done, offset)`
/// (one pread or pwrite of the rest, returning its byte count or -1) until
/// done, end of file (0), or an error. A short call is continued, so a
/// source that serves a request in pieces is read or written whole. An
/// error fails the whole transfer, also after some bytes: the kernel would
/// take a short FUSE read for the end of the file (a caller such as QEMU
/// with aio=native then reads zeros), and turns a short asynchronous
/// direct write into EIO, losing the errno (ENOSPC, which QEMU's
/// `werror=enospc` pauses the VM on); see docs/reliability.md.
fn transfer(
    len: usize,
    offset: u64,
    what: &str,
    mut op: impl FnMut(usize, libc::off_t) -> libc::ssize_t,
) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        let at = (offset + done as u64) as libc::off_t;
        let n = retry_eintr(|| {
            let r = op(done, at);
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        });
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => {
                if done > 0 {
                    log::debug!("{what} at {offset} failed after {done} bytes: {e}");
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Read into `buf` at `offset` until it is full or the file ends.
fn pread_into(fd: RawFd, buf: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<usize> {
    let len = buf.len();
    transfer(len, offset, "read", |done, at| {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most rest.len() bytes into `rest`.
        unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), at) }
    })
}

/// Write all of `data` at `offset`; an error fails it, also after some bytes
/// (see `transfer`).
pub fn pwrite_full(fd: RawFd, offset: u64, data: &[u8]) -> io::Result<usize> {
    transfer(data.len(), offset, "write", |done, at| {
        let rest = &data[done..];
        // SAFETY: `rest` is a valid slice for the duration of the call.
        unsafe { libc::pwrite(fd, rest.as_ptr().cast(), rest.len(), at) }
    })
}

pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    retry_eintr(|| {
        // SAFETY: plain syscalls on a descriptor we own.
        let r = unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    })
}

/// One copy_file_range call between two open files at explicit offsets.
pub fn copy_range(
    src: RawFd,
    offset_in: u64,
    dst: RawFd,
    offset_out: u64,
    len: usize,
) -> io::Result<usize> {
    let to_off =
        |o: u64| libc::loff_t::try_from(o).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let (mut off_in, mut off_out) = (to_off(offset_in)?, to_off(offset_out)?);
    retry_eintr(|| {
        // SAFETY: two open descriptors and valid offset pointers.
        let n = unsafe { libc::copy_file_range(src, &mut off_in, dst, &mut off_out, len, 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}
