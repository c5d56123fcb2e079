//! Limits per GiB of the disk (`iops_per_gb`, ...): the disk's size as
//! the guest sees it, and keeping the limits in force in step with it.
//!
//! The size is the virtual size in a qcow2 header, else the file's size;
//! unless the user says the format (`ImageFormat`, from
//! `user.throttle.image_format` or the mount option), as QEMU's `format=`.
//! It is read when a file's limits are resolved, and again, on the thread
//! that performed it, after anything through the mount that may have
//! changed it: a write into the first `QCOW2_SIZE_END_BYTES` bytes (where
//! `qemu-img resize` rewrites the virtual size), a write that grows a raw
//! file into its next GiB, a truncate, a growing fallocate (`SizeWatch`
//! says which writes, with two atomic loads). When the limits in force
//! change, the scheduler gets them as for a setxattr (`Msg::Limits`), so
//! queued requests see them at once; the buckets stay its own.

use std::ffi::CString;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use crate::scheduler::{Msg, SchedulerTx};
use crate::stats::{Effective, FileShared};
use crate::throttle::{BYTES_PER_GIB, Limits, gib_of};

/// The qcow2 magic, "QFI\xfb", at byte 0 of the header.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Byte offset of the virtual size (big-endian u64) in a qcow2 header;
/// the same in qcow version 1.
pub const QCOW2_SIZE_OFFSET_BYTES: usize = 24;

/// The header bytes that say a file is qcow2 and how large its disk is: a
/// write below this may change the size.
pub const QCOW2_SIZE_END_BYTES: u64 = 32;

/// `user.throttle.image_format` (after `user.throttle.`), and the mount
/// option `image_format=`.
pub const IMAGE_FORMAT: &str = "image_format";

/// What the user says a file's format is, for sizing it (QEMU's
/// `format=`): a raw image's first bytes are its guest's, so only the user
/// can say that a qcow2 header in them is data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// Probe: a qcow2 header is believed, unless the mount saw the file
    /// as a raw disk with data before (`SizeWatch::raw_with_data`).
    #[default]
    Auto,
    /// The size is the file's, whatever its first bytes say.
    Raw,
    /// The virtual size in the qcow2 header; without a valid header, the
    /// file's size and one warning.
    Qcow2,
}

impl ImageFormat {
    /// The value as written (a trailing newline or NUL is forgiven), or
    /// why it is refused.
    pub fn parse(text: &str) -> Result<ImageFormat, String> {
        match text.trim_end_matches(['\n', '\0']) {
            "auto" => Ok(ImageFormat::Auto),
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!(
                "{IMAGE_FORMAT}: expected raw, qcow2 or auto, got '{other}'"
            )),
        }
    }

    /// `parse` of an attribute's bytes.
    pub fn parse_bytes(value: &[u8]) -> Result<ImageFormat, String> {
        let text = std::str::from_utf8(value)
            .map_err(|_| format!("{IMAGE_FORMAT}: value is not UTF-8"))?;
        ImageFormat::parse(text)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ImageFormat::Auto => "auto",
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// A disk's size as the guest sees it, and where it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSize {
    pub bytes: u64,
    /// From a qcow2 header (else the file's size).
    pub qcow2: bool,
}

impl DiskSize {
    /// `size_from=` of `user.throttle.effective`.
    pub fn source(&self) -> &'static str {
        if self.qcow2 { "qcow2" } else { "file" }
    }

    /// A write ending past this many bytes of the file may change the
    /// limits in force: for a raw disk, the end of the GiB its size is
    /// counted in; never for a qcow2 disk, whose size is in its header.
    pub fn growth_limit_bytes(&self) -> u64 {
        if self.qcow2 {
            u64::MAX
        } else {
            gib_of(self.bytes).saturating_mul(BYTES_PER_GIB)
        }
    }
}

impl fmt::Display for DiskSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes ({})", self.bytes, self.source())
    }
}

/// The disk's size from the first bytes of a file of `file_bytes` bytes:
/// the virtual size if they are a qcow2 header, else the file's size.
pub fn disk_size(head: &[u8], file_bytes: u64) -> DiskSize {
    let end = QCOW2_SIZE_OFFSET_BYTES + 8;
    if head.len() >= end && head[..4] == QCOW2_MAGIC {
        let field: [u8; 8] = head[QCOW2_SIZE_OFFSET_BYTES..end]
            .try_into()
            .expect("8 bytes");
        return DiskSize {
            bytes: u64::from_be_bytes(field),
            qcow2: true,
        };
    }
    DiskSize {
        bytes: file_bytes,
        qcow2: false,
    }
}

/// The size of the disk in the file `fd` (any descriptor, `O_PATH` too):
/// its header is read through a read-only open of its /proc path, since
/// the descriptor at hand may not be open for reading.
pub fn read_disk_size(fd: RawFd) -> std::io::Result<DiskSize> {
    read_disk_and_file_size(fd).map(|(disk, _)| disk)
}

/// `read_disk_size`, and the file's own size.
fn read_disk_and_file_size(fd: RawFd) -> std::io::Result<(DiskSize, u64)> {
    // SAFETY: fstat fills a zeroed, valid out-structure.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let file_bytes = u64::try_from(st.st_size).unwrap_or(0);
    if file_bytes < QCOW2_SIZE_END_BYTES {
        return Ok((disk_size(&[], file_bytes), file_bytes));
    }
    let path = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    // SAFETY: open of a NUL-terminated path.
    let rfd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if rfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut head = [0u8; QCOW2_SIZE_END_BYTES as usize];
    // SAFETY: reads into a buffer of its length from a descriptor we own.
    let n = unsafe { libc::pread(rfd, head.as_mut_ptr().cast(), head.len(), 0) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(rfd) };
    if n < 0 {
        return Err(err);
    }
    Ok((disk_size(&head[..n as usize], file_bytes), file_bytes))
}

/// How a file's per-GiB limits were made concrete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sizing {
    /// The set as written, with its per-GiB rates and its bursts.
    pub set: Limits,
    /// The size they were computed for.
    pub size: DiskSize,
    /// Bursts dropped because the derived average passed them.
    pub ignored: Vec<(String, u64)>,
}

/// Which of a file's writes may change its limits in force, and who to
/// tell. Checked after every write of a throttled file: two loads.
pub struct SizeWatch {
    /// A per-GiB limit is in force: a write into the header may change it.
    active: AtomicBool,
    /// A write ending past this many bytes may change it (a raw disk
    /// growing into its next GiB); u64::MAX: no write does.
    growth_limit_bytes: AtomicU64,
    /// The scheduler, weakly: a file must not keep its inbox open.
    scheduler: OnceLock<Weak<SchedulerTx>>,
    /// The file was sized as a raw disk with a header's worth of data in
    /// it: a qcow2 header appearing in it later is its guest's data (a
    /// guest owns every byte of a raw disk, and 32 of them would make its
    /// own limit as large as it likes), not a new format. Cleared when
    /// the file is emptied, as `qemu-img create` and `convert` do first.
    raw_with_data: AtomicBool,
    /// Said once that a file stated to be qcow2 has no qcow2 header;
    /// cleared once it has one.
    not_qcow2_warned: AtomicBool,
}

impl Default for SizeWatch {
    fn default() -> Self {
        SizeWatch {
            active: AtomicBool::new(false),
            growth_limit_bytes: AtomicU64::new(u64::MAX),
            scheduler: OnceLock::new(),
            raw_with_data: AtomicBool::new(false),
            not_qcow2_warned: AtomicBool::new(false),
        }
    }
}

impl SizeWatch {
    /// Whether a write of `len` bytes at `offset` may have changed the
    /// disk's size as the limits count it.
    pub fn touched(&self, offset: u64, len: u64) -> bool {
        self.active.load(Ordering::SeqCst)
            && (offset < QCOW2_SIZE_END_BYTES
                || offset.saturating_add(len) > self.growth_limit_bytes.load(Ordering::SeqCst))
    }

    /// Whether a per-GiB limit is in force.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// The size to count for a file of `file_bytes` whose header reads as
    /// `read`: a qcow2 header is believed unless the file was seen before
    /// as a raw disk with data (see `raw_with_data`).
    fn settle(&self, read: DiskSize, file_bytes: u64) -> DiskSize {
        if file_bytes < QCOW2_SIZE_END_BYTES {
            self.raw_with_data.store(false, Ordering::SeqCst);
            return read;
        }
        if !read.qcow2 {
            self.raw_with_data.store(true, Ordering::SeqCst);
            return read;
        }
        if self.raw_with_data.load(Ordering::SeqCst) {
            return DiskSize {
                bytes: file_bytes,
                qcow2: false,
            };
        }
        read
    }

    /// The size to count for a file of `file_bytes` whose header reads as
    /// `read`, when its format is `format`; and whether to warn once that
    /// a file stated to be qcow2 has no header.
    fn size_for(&self, format: ImageFormat, read: DiskSize, file_bytes: u64) -> (DiskSize, bool) {
        let file = DiskSize {
            bytes: file_bytes,
            qcow2: false,
        };
        match format {
            ImageFormat::Auto => (self.settle(read, file_bytes), false),
            ImageFormat::Raw => (file, false),
            ImageFormat::Qcow2 if read.qcow2 => {
                self.not_qcow2_warned.store(false, Ordering::SeqCst);
                (read, false)
            }
            ImageFormat::Qcow2 => (file, !self.not_qcow2_warned.swap(true, Ordering::SeqCst)),
        }
    }
}

/// Turn `eff`'s per-GiB limits, if it has any, into fixed ones for the
/// size of the disk in `fd`, and set `watch` to catch what may change it
/// (or to nothing, without per-GiB limits). The caller holds the file's
/// `effective` lock, so that of two evaluations the one that read the
/// size last is the one stored and sent last.
pub fn derive(eff: &mut Effective, fd: RawFd, watch: &SizeWatch) {
    let set = match &eff.sizing {
        Some(s) => s.set,
        None => eff.limits,
    };
    if !set.has_per_gb() {
        watch.active.store(false, Ordering::SeqCst);
        // Unwatched, the file may be emptied and made a qcow2 unseen.
        watch.raw_with_data.store(false, Ordering::SeqCst);
        eff.sizing = None;
        return;
    }
    // Any write from now until the size is read sends its writer here too,
    // where it waits for the lock and reads the size again.
    watch.growth_limit_bytes.store(0, Ordering::SeqCst);
    watch.active.store(true, Ordering::SeqCst);
    let size = match read_disk_and_file_size(fd) {
        Ok((read, file_bytes)) => {
            let format = eff.image_format.0;
            let (size, warn) = watch.size_for(format, read, file_bytes);
            if warn {
                log::warn!(
                    "inode fd {fd}: image_format=qcow2 but no qcow2 header; \
                     its size is the file's ({file_bytes} bytes)"
                );
            } else if format == ImageFormat::Auto && size != read {
                log::warn!(
                    "inode fd {fd}: a qcow2 header was written into a raw disk; \
                     its size stays the file's ({file_bytes} bytes)"
                );
            }
            size
        }
        Err(e) => {
            // Keep what was in force; the next change retries.
            log::warn!("inode fd {fd}: reading the disk's size for per-GiB limits: {e}");
            match &eff.sizing {
                Some(s) => s.size,
                None => DiskSize {
                    bytes: 0,
                    qcow2: false,
                },
            }
        }
    };
    let derived = set.derive(size.bytes);
    watch
        .growth_limit_bytes
        .store(size.growth_limit_bytes(), Ordering::SeqCst);
    eff.limits = derived.limits;
    eff.sizing = Some(Sizing {
        set,
        size,
        ignored: derived.ignored,
    });
}

/// Remember the scheduler for later re-evaluations of `shared`'s file.
pub fn attach(shared: &FileShared, scheduler: &Arc<SchedulerTx>) {
    let _ = shared.size_watch.scheduler.set(Arc::downgrade(scheduler));
}

/// The disk of `file` (`fd`, any descriptor of it) may have changed size:
/// read it again and, if that changes the limits in force, store them and
/// send them to the scheduler. Called after the write (or truncate) is
/// done, on the thread that did it.
pub fn reevaluate(file: u64, shared: &Arc<FileShared>, fd: RawFd) {
    let mut guard = shared.effective.lock().expect("effective");
    let Some(eff) = guard.as_mut() else {
        return;
    };
    if eff.sizing.is_none() {
        return;
    }
    let before = eff.limits;
    derive(eff, fd, &shared.size_watch);
    if eff.limits == before {
        return;
    }
    if let Some(s) = &eff.sizing {
        log::info!(
            "inode {file}: disk size now {}, limits in force follow",
            s.size
        );
    }
    let Some(scheduler) = shared.size_watch.scheduler.get().and_then(Weak::upgrade) else {
        return;
    };
    // Sent with the lock held, so sends keep the order of the evaluations.
    let _ = scheduler.send(Msg::Limits {
        file,
        limits: eff.limits,
        group: eff.group.as_ref().map(|(g, _)| g.clone()),
        qos: eff.qos.qos(),
        shared: shared.clone(),
    });
}

/// After a write of `len` bytes at `offset` to `file`: re-evaluate its
/// limits if the write may have changed its disk's size.
pub fn after_write(file: u64, shared: &Arc<FileShared>, fd: RawFd, offset: u64, len: u64) {
    if shared.size_watch.touched(offset, len) {
        reevaluate(file, shared, fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_header(virtual_bytes: u64) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&virtual_bytes.to_be_bytes());
        h
    }

    #[test]
    fn qcow2_header_gives_the_virtual_size() {
        let fifty_gib = 50 * BYTES_PER_GIB;
        assert_eq!(
            disk_size(&qcow2_header(fifty_gib), 196_608),
            DiskSize {
                bytes: fifty_gib,
                qcow2: true
            }
        );
        // Only the first 32 bytes matter.
        assert_eq!(
            disk_size(&qcow2_header(7)[..32], 196_608).bytes,
            7,
            "the size is the big-endian u64 at byte 24"
        );
    }

    #[test]
    fn anything_else_is_its_file_size() {
        let mut not_qcow2 = qcow2_header(50 * BYTES_PER_GIB);
        not_qcow2[3] = 0xfa;
        assert_eq!(
            disk_size(&not_qcow2, 4096),
            DiskSize {
                bytes: 4096,
                qcow2: false
            }
        );
        // A header cut short is no header.
        assert_eq!(disk_size(&qcow2_header(9)[..31], 31).bytes, 31);
        assert_eq!(disk_size(&[], 0).bytes, 0);
    }

    #[test]
    fn a_raw_disk_is_watched_up_to_the_end_of_its_gib() {
        let raw = |bytes| DiskSize {
            bytes,
            qcow2: false,
        };
        assert_eq!(raw(0).growth_limit_bytes(), BYTES_PER_GIB);
        assert_eq!(raw(BYTES_PER_GIB).growth_limit_bytes(), BYTES_PER_GIB);
        assert_eq!(
            raw(BYTES_PER_GIB + 1).growth_limit_bytes(),
            2 * BYTES_PER_GIB
        );
        let qcow2 = DiskSize {
            bytes: 1,
            qcow2: true,
        };
        assert_eq!(qcow2.growth_limit_bytes(), u64::MAX);
    }

    #[test]
    fn a_raw_disk_with_data_does_not_become_qcow2_by_a_write() {
        let w = SizeWatch::default();
        let qcow2 = |bytes| DiskSize { bytes, qcow2: true };
        let raw = |bytes| DiskSize {
            bytes,
            qcow2: false,
        };
        // A file first seen as qcow2 stays one through resizes.
        assert_eq!(w.settle(qcow2(50 << 30), 196_608), qcow2(50 << 30));
        assert_eq!(w.settle(qcow2(100 << 30), 196_608), qcow2(100 << 30));
        // A raw disk's guest writes a qcow2 header with a huge size: the
        // size stays the file's.
        assert_eq!(w.settle(raw(2 << 30), 2 << 30), raw(2 << 30));
        assert_eq!(w.settle(qcow2(1 << 60), 2 << 30), raw(2 << 30));
        // Emptied (qemu-img create over it), it may become a qcow2.
        assert_eq!(w.settle(raw(0), 0), raw(0));
        assert_eq!(w.settle(qcow2(20 << 30), 196_608), qcow2(20 << 30));
    }

    #[test]
    fn image_format_values() {
        assert_eq!(ImageFormat::parse("raw"), Ok(ImageFormat::Raw));
        assert_eq!(ImageFormat::parse("qcow2\n"), Ok(ImageFormat::Qcow2));
        assert_eq!(ImageFormat::parse_bytes(b"auto\0"), Ok(ImageFormat::Auto));
        assert_eq!(ImageFormat::default(), ImageFormat::Auto);
        assert_eq!(
            ImageFormat::parse("RAW"),
            Err("image_format: expected raw, qcow2 or auto, got 'RAW'".to_string())
        );
        assert!(ImageFormat::parse("").is_err());
        assert!(ImageFormat::parse_bytes(b"\xff").is_err());
        for f in [ImageFormat::Auto, ImageFormat::Raw, ImageFormat::Qcow2] {
            assert_eq!(ImageFormat::parse(f.as_str()), Ok(f));
        }
    }

    #[test]
    fn the_stated_format_decides_how_the_size_is_read() {
        let qcow2 = |bytes| DiskSize { bytes, qcow2: true };
        let raw = |bytes| DiskSize {
            bytes,
            qcow2: false,
        };
        // raw: the file's size whatever the header says, on a fresh watch
        // (a remount) too.
        let w = SizeWatch::default();
        assert_eq!(
            w.size_for(ImageFormat::Raw, qcow2(1 << 60), 2 << 30),
            (raw(2 << 30), false)
        );
        // auto on a fresh watch believes it; that is what raw is for.
        let w = SizeWatch::default();
        assert_eq!(
            w.size_for(ImageFormat::Auto, qcow2(1 << 60), 2 << 30),
            (qcow2(1 << 60), false)
        );
        // qcow2: the header; without one, the file's size, said once.
        let w = SizeWatch::default();
        assert_eq!(
            w.size_for(ImageFormat::Qcow2, qcow2(50 << 30), 196_608),
            (qcow2(50 << 30), false)
        );
        assert_eq!(
            w.size_for(ImageFormat::Qcow2, raw(4 << 30), 4 << 30),
            (raw(4 << 30), true)
        );
        assert_eq!(
            w.size_for(ImageFormat::Qcow2, raw(4 << 30), 4 << 30),
            (raw(4 << 30), false)
        );
        assert_eq!(
            w.size_for(ImageFormat::Qcow2, qcow2(8 << 30), 196_608),
            (qcow2(8 << 30), false)
        );
        assert_eq!(
            w.size_for(ImageFormat::Qcow2, raw(4 << 30), 4 << 30),
            (raw(4 << 30), true)
        );
    }

    #[test]
    fn watch_catches_header_writes_and_growth_only_when_active() {
        let w = SizeWatch::default();
        assert!(!w.touched(0, 512));
        w.active.store(true, Ordering::SeqCst);
        assert!(w.touched(0, 512));
        assert!(w.touched(24, 8));
        assert!(!w.touched(32, 4096), "past the size field, no growth limit");
        w.growth_limit_bytes.store(BYTES_PER_GIB, Ordering::SeqCst);
        assert!(!w.touched(BYTES_PER_GIB - 4096, 4096));
        assert!(w.touched(BYTES_PER_GIB - 4096, 4097));
        assert!(!w.touched(4096, 0));
    }
}
