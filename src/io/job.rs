//! A job: a request waiting for (or released by) the throttle with the
//! reply that answers it, what it charges, and how it is performed with
//! plain system calls.

use std::sync::Arc;

use fuser::{Errno, ReplyData, ReplyEmpty, ReplyWrite};

use super::buffer::WriteData;
use super::errors::{IoOp, record_error, record_outcome, record_write};
use super::flight::Flight;
use super::handle::{Handle, copy_range, fsync};
use crate::sizing;
use crate::throttle::Direction;

/// A request waiting for (or released by) the throttle, with the reply
/// that answers it. Dropping a job without running it answers EIO (fuser's
/// safety net), so no caller can be left hanging.
pub enum Job {
    Read {
        handle: Arc<Handle>,
        offset: u64,
        size: u32,
        reply: ReplyData,
    },
    Write {
        handle: Arc<Handle>,
        offset: u64,
        data: WriteData,
        reply: ReplyWrite,
    },
    /// A barrier: answered only after every earlier request of the file has
    /// been performed (seed 004), then fsyncs the underlying file.
    Fsync {
        handle: Arc<Handle>,
        datasync: bool,
        reply: ReplyEmpty,
    },
    /// A barrier with nothing to do on the underlying file.
    Flush { reply: ReplyEmpty },
    /// copy_file_range: charged as a read on the source file, then handed
    /// to the destination file's queue and charged as a write there.
    Copy {
        src: Arc<Handle>,
        offset_in: u64,
        dst: Arc<Handle>,
        offset_out: u64,
        len: u32,
        /// Still waiting on the source's buckets.
        at_source: bool,
        reply: ReplyWrite,
    },
}

impl Job {
    /// Read or write, or `None` for a barrier (which charges nothing).
    pub fn direction(&self) -> Option<Direction> {
        match self {
            Job::Read { .. } => Some(Direction::Read),
            Job::Write { .. } => Some(Direction::Write),
            Job::Fsync { .. } | Job::Flush { .. } => None,
            Job::Copy { at_source, .. } => Some(if *at_source {
                Direction::Read
            } else {
                Direction::Write
            }),
        }
    }

    /// For a copy released by its source's buckets: the file whose queue it
    /// must go through next (it is now charged as a write there).
    pub fn hand_off(&mut self) -> Option<u64> {
        match self {
            Job::Copy { at_source, dst, .. } if *at_source => {
                *at_source = false;
                Some(dst.file)
            }
            _ => None,
        }
    }

    /// Bytes the request moves, as charged to bps buckets.
    pub fn bytes(&self) -> u64 {
        match self {
            Job::Read { size, .. } => u64::from(*size),
            Job::Write { data, .. } => data.as_slice().len() as u64,
            Job::Fsync { .. } | Job::Flush { .. } => 0,
            Job::Copy { len, .. } => u64::from(*len),
        }
    }

    /// Answer the caller with `errno` without performing the request.
    pub fn fail(self, errno: Errno) {
        match self {
            Job::Read { reply, .. } => reply.error(errno),
            Job::Write { reply, .. } | Job::Copy { reply, .. } => reply.error(errno),
            Job::Fsync { reply, .. } | Job::Flush { reply } => reply.error(errno),
        }
    }

    /// Perform the request on the underlying file and answer the caller,
    /// with the underlying errno on failure. Returns the bytes charged for
    /// it that it did not move.
    pub fn run(self) -> Option<(Direction, u64)> {
        let requested = self.bytes();
        match self {
            Job::Read {
                handle,
                offset,
                size,
                reply,
            } => handle.read_with(offset, size as usize, |r| {
                let moved = record_outcome(&handle, Direction::Read, r.as_ref().map(|d| d.len()));
                match r {
                    Ok(data) => reply.data(data),
                    Err(e) => reply.error(Errno::from(e)),
                }
                unmoved(Direction::Read, requested, moved)
            }),
            Job::Write {
                handle,
                offset,
                data,
                reply,
            } => {
                let r = handle.write_queued(offset, &data);
                let moved = record_write(&handle, offset, r.as_ref().copied());
                match r {
                    Ok(n) => reply.written(n as u32),
                    Err(e) => reply.error(Errno::from(e)),
                }
                unmoved(Direction::Write, requested, moved)
            }
            Job::Fsync {
                handle,
                datasync,
                reply,
            } => {
                match fsync(handle.raw(), datasync) {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        record_error(&handle, IoOp::Fsync, &e);
                        reply.error(Errno::from(e));
                    }
                }
                None
            }
            Job::Flush { reply } => {
                reply.ok();
                None
            }
            Job::Copy {
                src,
                offset_in,
                dst,
                offset_out,
                len,
                reply,
                ..
            } => {
                match copy_range(src.raw(), offset_in, dst.raw(), offset_out, len as usize) {
                    Ok(n) => {
                        src.shared.record_io(Direction::Read, n as u64);
                        dst.shared.record_io(Direction::Write, n as u64);
                        reply.written(n as u32);
                        sizing::after_write(dst.file, &dst.shared, dst.raw(), offset_out, n as u64);
                    }
                    Err(e) => {
                        record_error(&dst, IoOp::Copy, &e);
                        reply.error(Errno::from(e));
                    }
                }
                // Completes on the destination's queue; the source's charge
                // stands (a copy rarely comes up short).
                None
            }
        }
    }
}

pub fn unmoved(dir: Direction, requested: u64, moved: usize) -> Option<(Direction, u64)> {
    let short = requested.saturating_sub(moved as u64);
    (short > 0).then_some((dir, short))
}

/// A released job with the file it belongs to and that file's in-flight
/// count.
pub struct Released {
    pub file: u64,
    pub flight: Arc<Flight>,
    pub job: Job,
}
