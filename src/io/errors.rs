//! Errors of the underlying file: each request that fails is counted in
//! its file's `io_errors` (`user.throttle.stats`), and logged once per
//! distinct (file, operation, errno), then at most once every
//! `REPEAT_LOG_INTERVAL` with the count since, so a failing disk under a
//! busy VM fills the log with one line per kind of failure, not one per
//! request. The caller gets the errno either way.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::handle::Handle;
use crate::throttle::Direction;

/// An error already logged for a file is logged again, with the count of
/// its repeats, at most this often.
pub const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(600);

/// The operation on the underlying file that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Fsync,
    Copy,
}

impl IoOp {
    fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Fsync => "fsync",
            IoOp::Copy => "copy_file_range",
        }
    }
}

/// One kind of error seen on a file.
#[derive(Debug)]
struct Seen {
    op: IoOp,
    errno: i32,
    /// When it was last logged.
    logged: Instant,
    /// Repeats since then.
    repeats: u64,
}

/// A file's failed requests: the count, and what was logged when.
#[derive(Debug, Default)]
pub struct ErrorLog {
    count: AtomicU64,
    /// One entry per (operation, errno): a handful at most.
    seen: Mutex<Vec<Seen>>,
}

/// What to log for a failure.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Nothing: it was logged less than `REPEAT_LOG_INTERVAL` ago.
    None,
    /// The first of its kind.
    First,
    /// Again, with the number of repeats since the last line.
    Again(u64),
}

impl ErrorLog {
    /// Failed requests of the file since the mount.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn note(&self, op: IoOp, errno: i32, now: Instant) -> Line {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut seen = self.seen.lock().expect("error log");
        let Some(s) = seen.iter_mut().find(|s| s.op == op && s.errno == errno) else {
            seen.push(Seen {
                op,
                errno,
                logged: now,
                repeats: 0,
            });
            return Line::First;
        };
        s.repeats += 1;
        if now.saturating_duration_since(s.logged) < REPEAT_LOG_INTERVAL {
            return Line::None;
        }
        s.logged = now;
        Line::Again(std::mem::take(&mut s.repeats))
    }
}

/// Whether `errno` answers the request rather than reports a failure of
/// the underlying file: an argument it does not take (EINVAL, EFBIG), a
/// copy between files it cannot do, which the kernel then does another
/// way (EXDEV, EOPNOTSUPP, ENOSYS). These are neither counted nor logged.
fn is_answer(errno: i32) -> bool {
    matches!(
        errno,
        libc::EINVAL | libc::EFBIG | libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS
    )
}

/// A read or write of `handle` going `dir` ended with `result`: count the
/// bytes it moved, or record its failure (`record_error`). The bytes moved.
pub fn record_outcome(handle: &Handle, dir: Direction, result: Result<usize, &io::Error>) -> usize {
    match result {
        Ok(n) => {
            handle.shared.record_io(dir, n as u64);
            n
        }
        Err(e) => {
            let op = match dir {
                Direction::Read => IoOp::Read,
                Direction::Write => IoOp::Write,
            };
            record_error(handle, op, e);
            0
        }
    }
}

/// A write of `handle` at `offset` ended with `result`: `record_outcome`,
/// then, as the write may have resized the disk, its per-GiB limits
/// looked at again (`sizing::after_write`). The bytes written.
pub fn record_write(handle: &Handle, offset: u64, result: Result<usize, &io::Error>) -> usize {
    let moved = record_outcome(handle, Direction::Write, result);
    crate::sizing::after_write(
        handle.file,
        &handle.shared,
        handle.raw(),
        offset,
        moved as u64,
    );
    moved
}

/// `op` on the underlying file of `handle` failed with `e`, and the
/// caller gets `e`: count it and log it as `ErrorLog` says.
pub fn record_error(handle: &Handle, op: IoOp, e: &io::Error) {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    if is_answer(errno) {
        return;
    }
    let line = handle.shared.errors.note(op, errno, Instant::now());
    let path = || {
        std::fs::read_link(format!("/proc/self/fd/{}", handle.raw())).map_or_else(
            |_| format!("inode {}", handle.file),
            |p| p.display().to_string(),
        )
    };
    let op = op.name();
    match line {
        Line::None => log::debug!("{op} of {} failed: {e}", path()),
        Line::First => log::warn!(
            "{op} of {} failed: {e}; repeats are counted in user.throttle.stats (io_errors) \
             and logged at most every {} min",
            path(),
            REPEAT_LOG_INTERVAL.as_secs() / 60
        ),
        Line::Again(repeats) => log::warn!(
            "{op} of {} failed: {e}, {repeats} more times since the last report",
            path()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_logged_once_then_at_most_every_interval_with_its_count() {
        let log = ErrorLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(IoOp::Read, libc::EIO, t0), Line::First);
        assert_eq!(log.note(IoOp::Read, libc::EIO, t0), Line::None);
        // Another errno, another operation: kinds of their own.
        assert_eq!(log.note(IoOp::Read, libc::ENOSPC, t0), Line::First);
        assert_eq!(log.note(IoOp::Write, libc::EIO, t0), Line::First);
        let later = t0 + REPEAT_LOG_INTERVAL - Duration::from_nanos(1);
        assert_eq!(log.note(IoOp::Read, libc::EIO, later), Line::None);
        let due = t0 + REPEAT_LOG_INTERVAL;
        assert_eq!(log.note(IoOp::Read, libc::EIO, due), Line::Again(3));
        assert_eq!(log.note(IoOp::Read, libc::EIO, due), Line::None);
        assert_eq!(
            log.note(IoOp::Read, libc::EIO, due + REPEAT_LOG_INTERVAL),
            Line::Again(2)
        );
        assert_eq!(log.count(), 8);
    }

    #[test]
    fn answers_about_the_request_are_not_failures() {
        for errno in [libc::EINVAL, libc::EXDEV, libc::EOPNOTSUPP] {
            assert!(is_answer(errno));
        }
        for errno in [libc::EIO, libc::ENOSPC, libc::EDQUOT, libc::EROFS] {
            assert!(!is_answer(errno));
        }
    }
}
