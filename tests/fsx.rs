//! Model-based random operations on one file through a real mount, in the
//! spirit of xfstests' fsx: random reads, writes, truncates, fallocates
//! (allocate, keep-size, punch hole, zero range), copy_file_range (within
//! the file and from a second file), mmap reads and MAP_SHARED writes, on
//! buffered and O_DIRECT descriptors. After every step the file's size
//! (fstat) and every byte read are checked against an in-memory model; at
//! the end the whole file, through the mount and in the source, is too.
//!
//! Each run is reproducible from its seed. A failure prints the seed, the
//! step and the last operations, and the command that replays it:
//! `FSX_SEED=<seed> FSX_OPS=<n> FSX_CONFIG=<config> cargo nextest run
//! --test fsx --run-ignored only fsx_long`.

mod common;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use common::attrs::stats;
use common::{KIB, Mount, Rng, env_number, env_seeds, pattern};

/// The file never grows beyond this (fsx's default maximum).
const FILE_MAX_BYTES: usize = 256 * KIB as usize;
/// Largest single read, write, copy or fallocate (fsx's default).
const OP_MAX_BYTES: usize = 64 * KIB as usize;
/// Offsets and lengths of O_DIRECT requests are multiples of this, and
/// their buffers are aligned to it: every filesystem's direct-I/O alignment
/// divides it.
const DIRECT_ALIGN_BYTES: usize = 4096;
/// Size of the second file, the source of cross-file copies.
const OTHER_BYTES: usize = 128 * KIB as usize;
/// Operations shown when a check fails.
const LOG_OPS: usize = 20;
/// The whole file is read back and compared every this many steps.
const FULL_CHECK_EVERY_OPS: usize = 64;

/// A zeroed buffer aligned to DIRECT_ALIGN_BYTES, for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN_BYTES).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: `len` bytes of our own initialised allocation.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// The fallocate modes the source's filesystem supports (tmpfs has no
/// zero range, for example); a mode it refuses is not tried through the
/// mount either, since the mount can only pass it down.
#[derive(Clone, Copy)]
struct Modes {
    zero_range: bool,
    punch_hole: bool,
}

fn probe_modes(dir: &Path) -> Modes {
    let path = dir.join("fsx-probe");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(8 * KIB).unwrap();
    let works = |mode| {
        // SAFETY: fallocate on an open descriptor.
        unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4096) == 0 }
    };
    let modes = Modes {
        zero_range: works(libc::FALLOC_FL_ZERO_RANGE),
        punch_hole: works(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
    };
    drop(f);
    fs::remove_file(&path).unwrap();
    modes
}

/// One run: the file through the mount, its descriptors and the model.
struct Fsx<'a> {
    seed: u64,
    config: &'a str,
    path: &'a Path,
    buffered: File,
    direct: File,
    /// The second file, opened through the mount; never modified.
    other: File,
    other_model: Vec<u8>,
    model: Vec<u8>,
    rng: Rng,
    step: usize,
    ops: usize,
    log: VecDeque<String>,
    modes: Modes,
    /// Bytes written by the writes so far, each write's data different.
    writes: u64,
}

fn open_rw(path: &Path, direct: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn errno_of(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Fsx<'_> {
    /// Panics with everything needed to replay the run.
    fn fail(&self, what: &str) -> ! {
        let log: Vec<&str> = self.log.iter().map(String::as_str).collect();
        panic!(
            "fsx [{}] seed {:#x}, step {}: {what}\nlast operations (oldest first):\n  {}\n\
             replay: FSX_SEED={:#x} FSX_OPS={} FSX_CONFIG={} \
             cargo nextest run --test fsx --run-ignored only fsx_long",
            self.config,
            self.seed,
            self.step,
            log.join("\n  "),
            self.seed,
            self.ops,
            self.config
        );
    }

    fn record(&mut self, op: String) {
        if self.log.len() == LOG_OPS {
            self.log.pop_front();
        }
        self.log.push_back(format!("#{} {op}", self.step));
    }

    /// `what` must have succeeded.
    fn ok<T>(&self, what: &str, r: io::Result<T>) -> T {
        r.unwrap_or_else(|e| self.fail(&format!("{what} failed: {e}")))
    }

    /// Compares `got`, read at `offset`, with the model.
    fn check_read(&self, what: &str, offset: usize, want_len: usize, got: &[u8]) {
        let end = (offset + want_len).min(self.model.len()).max(offset);
        let want = if offset < self.model.len() {
            &self.model[offset..end]
        } else {
            &[][..]
        };
        if got.len() != want.len() {
            self.fail(&format!(
                "{what}: read {} bytes at {offset}, the model has {} there (size {})",
                got.len(),
                want.len(),
                self.model.len()
            ));
        }
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            let n = got[i..]
                .iter()
                .zip(&want[i..])
                .filter(|(a, b)| a != b)
                .count();
            self.fail(&format!(
                "{what}: byte {} is {:#04x}, the model says {:#04x} ({n} bytes differ from there to {})",
                offset + i,
                got[i],
                want[i],
                offset + got.len()
            ));
        }
    }

    fn check_size(&self) {
        let len = self.ok("fstat", self.buffered.metadata()).len();
        if len != self.model.len() as u64 {
            self.fail(&format!(
                "fstat size {len}, the model has {}",
                self.model.len()
            ));
        }
    }

    /// Reads the whole file through the buffered descriptor and compares.
    fn check_all(&self, what: &str) {
        let mut got = vec![0u8; self.model.len() + 4096];
        let n = self.pread_full(&self.buffered, &mut got, 0);
        got.truncate(n);
        self.check_read(what, 0, self.model.len() + 4096, &got);
    }

    /// pread until `buf` is full or end of file; the bytes read.
    fn pread_full(&self, f: &File, buf: &mut [u8], offset: usize) -> usize {
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], (offset + done) as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => self.fail(&format!("pread of {} at {offset}: {e}", buf.len())),
            }
        }
        done
    }

    fn write_model(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if self.model.len() < end {
            self.model.resize(end, 0);
        }
        self.model[offset..end].copy_from_slice(data);
    }

    fn zero_model(&mut self, offset: usize, len: usize, keep_size: bool) {
        let mut end = offset + len;
        if keep_size {
            end = end.min(self.model.len());
        } else if self.model.len() < end {
            self.model.resize(end, 0);
        }
        if offset < end {
            self.model[offset..end].fill(0);
        }
    }

    /// A random (offset, len) for a buffered operation, the range within
    /// FILE_MAX_BYTES; `within` keeps it inside the current size (which
    /// must then be > 0).
    fn range(&mut self, within: bool) -> (usize, usize) {
        let limit = if within {
            self.model.len()
        } else {
            FILE_MAX_BYTES
        };
        let offset = self.rng.below(limit);
        let len = self.rng.range(1, OP_MAX_BYTES.min(limit - offset));
        (offset, len)
    }

    /// The same, multiples of DIRECT_ALIGN_BYTES (without `within`).
    fn aligned_range(&mut self) -> (usize, usize) {
        let blocks = FILE_MAX_BYTES / DIRECT_ALIGN_BYTES;
        let first = self.rng.below(blocks);
        let n = self
            .rng
            .range(1, (OP_MAX_BYTES / DIRECT_ALIGN_BYTES).min(blocks - first));
        (first * DIRECT_ALIGN_BYTES, n * DIRECT_ALIGN_BYTES)
    }

    fn fresh_data(&mut self, len: usize) -> Vec<u8> {
        self.writes += 1;
        pattern(len, self.seed ^ self.writes.wrapping_mul(0x1000_0001))
    }

    fn step(&mut self) {
        let len = self.model.len();
        match self.rng.below(100) {
            0..=13 => {
                let (offset, n) = self.range(false);
                self.record(format!("read      {offset:#x} +{n:#x} (buffered)"));
                let mut buf = vec![0u8; n];
                let got = self.pread_full(&self.buffered, &mut buf, offset);
                self.check_read("buffered read", offset, n, &buf[..got]);
            }
            14..=21 => {
                let (offset, n) = self.aligned_range();
                self.record(format!("read      {offset:#x} +{n:#x} (O_DIRECT)"));
                let mut buf = AlignedBuf::new(n);
                let slice = buf.as_mut_slice(n);
                let got = self.pread_full(&self.direct, slice, offset);
                self.check_read("O_DIRECT read", offset, n, &slice[..got]);
            }
            22..=35 => {
                let (offset, n) = self.range(false);
                self.record(format!("write     {offset:#x} +{n:#x} (buffered)"));
                let data = self.fresh_data(n);
                self.ok(
                    "buffered pwrite",
                    self.buffered.write_all_at(&data, offset as u64),
                );
                self.write_model(offset, &data);
            }
            36..=43 => {
                let (offset, n) = self.aligned_range();
                self.record(format!("write     {offset:#x} +{n:#x} (O_DIRECT)"));
                let data = self.fresh_data(n);
                let mut buf = AlignedBuf::new(n);
                buf.as_mut_slice(n).copy_from_slice(&data);
                self.ok(
                    "O_DIRECT pwrite",
                    self.direct.write_all_at(buf.as_mut_slice(n), offset as u64),
                );
                self.write_model(offset, &data);
            }
            44..=49 => {
                // Half the time block-aligned, so whole blocks come and go.
                let mut size = self.rng.below(FILE_MAX_BYTES + 1);
                if self.rng.below(2) == 0 {
                    size -= size % DIRECT_ALIGN_BYTES;
                }
                self.record(format!("truncate  {len:#x} -> {size:#x}"));
                let f = if self.rng.below(2) == 0 {
                    &self.buffered
                } else {
                    &self.direct
                };
                self.ok("ftruncate", f.set_len(size as u64));
                self.model.resize(size, 0);
            }
            50..=62 => self.fallocate(),
            63..=70 => self.copy_within(),
            71..=76 => {
                let (offset, n) = (self.rng.below(OTHER_BYTES), self.rng.range(1, OP_MAX_BYTES));
                let to = self.rng.below(FILE_MAX_BYTES - n + 1);
                self.record(format!("copy      other {offset:#x} +{n:#x} -> {to:#x}"));
                let copied = self.copy_file_range(&self.other, offset, to, n);
                let want = n.min(OTHER_BYTES - offset);
                if copied != want {
                    self.fail(&format!(
                        "copy_file_range from the other file copied {copied} bytes, expected {want}"
                    ));
                }
                let data = self.other_model[offset..offset + copied].to_vec();
                self.write_model(to, &data);
            }
            77..=84 if len > 0 => {
                let (offset, n) = self.range(true);
                self.record(format!("mapread   {offset:#x} +{n:#x}"));
                let got = self.map(len, false, |m| m[offset..offset + n].to_vec());
                self.check_read("mmap read", offset, n, &got);
            }
            85..=92 if len > 0 => {
                let (offset, n) = self.range(true);
                self.record(format!("mapwrite  {offset:#x} +{n:#x} (msync)"));
                let data = self.fresh_data(n);
                self.map(len, true, |m| m[offset..offset + n].copy_from_slice(&data));
                self.write_model(offset, &data);
            }
            93..=95 => {
                // Close and reopen: release, flush and a fresh open.
                self.record("reopen".to_string());
                self.buffered = open_rw(self.path, false);
                self.direct = open_rw(self.path, true);
            }
            // The rest, and a mapping of an empty file: a buffered read.
            _ => {
                let (offset, n) = self.range(false);
                self.record(format!("read      {offset:#x} +{n:#x} (buffered)"));
                let mut buf = vec![0u8; n];
                let got = self.pread_full(&self.buffered, &mut buf, offset);
                self.check_read("buffered read", offset, n, &buf[..got]);
            }
        }
        self.check_size();
    }

    fn fallocate(&mut self) {
        let (offset, n) = self.range(false);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let (mode, name) = match self.rng.below(5) {
            0 => (0, "allocate"),
            1 => (keep, "allocate keep-size"),
            2 if self.modes.punch_hole => (libc::FALLOC_FL_PUNCH_HOLE | keep, "punch hole"),
            3 if self.modes.zero_range => (libc::FALLOC_FL_ZERO_RANGE, "zero range"),
            4 if self.modes.zero_range => {
                (libc::FALLOC_FL_ZERO_RANGE | keep, "zero range keep-size")
            }
            _ => (0, "allocate"),
        };
        self.record(format!("fallocate {offset:#x} +{n:#x} ({name})"));
        let f = if self.rng.below(2) == 0 {
            &self.buffered
        } else {
            &self.direct
        };
        // SAFETY: fallocate on an open descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, n as i64) };
        self.ok(name, errno_of(r));
        let keep_size = mode & keep != 0;
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            self.zero_model(offset, n, keep_size);
        } else if !keep_size && self.model.len() < offset + n {
            self.model.resize(offset + n, 0);
        }
    }

    /// copy_file_range within the file, between ranges that do not overlap
    /// (the kernel refuses overlapping ones).
    fn copy_within(&mut self) {
        let len = self.model.len();
        if len == 0 {
            return;
        }
        let (from, n) = self.range(true);
        let to = self.rng.below(FILE_MAX_BYTES - n + 1);
        if to < from + n && from < to + n {
            self.record(format!(
                "copy      {from:#x} +{n:#x} -> {to:#x} (overlaps, skipped)"
            ));
            return;
        }
        self.record(format!("copy      {from:#x} +{n:#x} -> {to:#x}"));
        let f = if self.rng.below(2) == 0 {
            &self.buffered
        } else {
            &self.direct
        };
        let copied = self.copy_file_range(f, from, to, n);
        if copied != n {
            self.fail(&format!(
                "copy_file_range within the file copied {copied} bytes, expected {n}"
            ));
        }
        let data = self.model[from..from + n].to_vec();
        self.write_model(to, &data);
    }

    /// copy_file_range(from_file @ from -> the file @ to, n), repeated
    /// until done or a 0 return; the bytes copied.
    fn copy_file_range(&self, from_file: &File, from: usize, to: usize, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            let mut off_in = (from + done) as i64;
            let mut off_out = (to + done) as i64;
            // SAFETY: open descriptors and offsets owned by this frame.
            let r = unsafe {
                libc::copy_file_range(
                    from_file.as_raw_fd(),
                    &mut off_in,
                    self.buffered.as_raw_fd(),
                    &mut off_out,
                    n - done,
                    0,
                )
            };
            if r < 0 {
                self.fail(&format!(
                    "copy_file_range {from:#x} +{n:#x} -> {to:#x}: {}",
                    io::Error::last_os_error()
                ));
            }
            if r == 0 {
                break;
            }
            done += r as usize;
        }
        done
    }

    /// Maps the first `len` bytes of the file MAP_SHARED (writable when
    /// `write`), runs `f` on them, and for a write msyncs before unmapping.
    fn map<T>(&self, len: usize, write: bool, f: impl FnOnce(&mut [u8]) -> T) -> T {
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of `len` bytes (within the file's
        // size, so no access faults past its end), unmapped below; nothing
        // else in this process touches it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.buffered.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                self.fail(&format!("mmap of {len}: {}", io::Error::last_os_error()));
            }
            let out = f(std::slice::from_raw_parts_mut(p.cast::<u8>(), len));
            if write && libc::msync(p, len, libc::MS_SYNC) != 0 {
                let e = io::Error::last_os_error();
                libc::munmap(p, len);
                self.fail(&format!("msync of {len}: {e}"));
            }
            assert_eq!(libc::munmap(p, len), 0, "munmap");
            out
        }
    }
}

/// Runs `ops` random operations from `seed` on a fresh file `fsx-SEED`
/// of mount `m`, then compares the whole file through the mount and in
/// the source with the model; with `queues`, requests must have queued.
fn run(m: &Mount, config: &str, seed: u64, ops: usize, queues: bool) {
    let name = format!("fsx-{seed:x}");
    let other_name = format!("fsx-{seed:x}-other");
    let initial_len = FILE_MAX_BYTES / 2 + (seed as usize % 4096);
    let initial = pattern(initial_len, seed);
    let other_model = pattern(OTHER_BYTES, !seed);
    // Created through the mount, as a user would.
    fs::write(m.path(&name), &initial).unwrap();
    fs::write(m.path(&other_name), &other_model).unwrap();
    let path = m.path(&name);
    let mut fsx = Fsx {
        seed,
        config,
        path: &path,
        buffered: open_rw(&path, false),
        direct: open_rw(&path, true),
        other: File::open(m.path(&other_name)).unwrap(),
        other_model,
        model: initial,
        rng: Rng(seed),
        step: 0,
        ops,
        log: VecDeque::new(),
        modes: probe_modes(m.src()),
        writes: 0,
    };
    fsx.check_size();
    for step in 1..=ops {
        fsx.step = step;
        fsx.step();
        if step % FULL_CHECK_EVERY_OPS == 0 {
            fsx.check_all("full read-back");
        }
    }
    fsx.check_all("final read-back");
    if queues {
        // Read while the file is open: the counters of a file the kernel
        // has forgotten start again from zero.
        let s = stats(&path);
        assert!(
            s["wait_ns"] > 0,
            "[{config}] seed {seed:#x}: no request ever queued, so the throttled path was \
             not exercised: {s:?}"
        );
    }
    drop((fsx.buffered, fsx.direct));
    let src = fs::read(m.src_path(&name)).unwrap();
    if src != fsx.model {
        let i = src.iter().zip(&fsx.model).position(|(a, b)| a != b);
        panic!(
            "fsx [{config}] seed {seed:#x}: the source file differs from the model after {ops} \
             operations (source {} bytes, model {}; first differing byte {i:?})",
            src.len(),
            fsx.model.len()
        );
    }
}

/// A mount configuration: daemon arguments and environment.
struct Config {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    /// Whether requests must have queued in the throttle.
    queues: bool,
}

const NO_URING: (&str, &str) = ("THROTTLEFS_NO_IO_URING", "1");

const CONFIGS: &[Config] = &[
    Config {
        name: "free",
        args: &[],
        env: &[],
        queues: false,
    },
    // Never reached, but every request goes through the scheduler.
    Config {
        name: "bps1g",
        args: &["--bps", "1G"],
        env: &[],
        queues: false,
    },
    // Small enough that a steady stream of requests queues.
    Config {
        name: "iops300",
        args: &["--iops", "300"],
        env: &[],
        queues: true,
    },
    Config {
        name: "free-blocking",
        args: &[],
        env: &[NO_URING],
        queues: false,
    },
    Config {
        name: "iops300-blocking",
        args: &["--iops", "300"],
        env: &[NO_URING],
        queues: true,
    },
];

fn config(name: &str) -> &'static Config {
    CONFIGS.iter().find(|c| c.name == name).unwrap_or_else(|| {
        let names: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
        panic!("unknown FSX_CONFIG {name:?}; one of {names:?}")
    })
}

/// Mounts with `config` and runs each seed on its own file.
fn run_config(config: &Config, seeds: &[u64], ops: usize) {
    let mut m = Mount::new();
    m.daemon_env = config
        .env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.start(config.args);
    for &seed in seeds {
        run(&m, config.name, seed, ops, config.queues);
    }
}

/// The default run: a few seeds per configuration, a few seconds each.
const SEEDS: &[u64] = &[0x5eed_0001, 0x5eed_0002];
const OPS: usize = 1000;

#[test]
fn fsx_unlimited() {
    run_config(config("free"), SEEDS, OPS);
}

#[test]
fn fsx_never_reached_limit() {
    run_config(config("bps1g"), SEEDS, OPS);
}

#[test]
fn fsx_iops_limit() {
    run_config(config("iops300"), SEEDS, OPS);
}

#[test]
fn fsx_unlimited_blocking_workers() {
    run_config(config("free-blocking"), SEEDS, OPS);
}

#[test]
fn fsx_iops_limit_blocking_workers() {
    run_config(config("iops300-blocking"), SEEDS, OPS);
}

/// The long run: FSX_SEED (default: 16 seeds from 1), FSX_OPS operations
/// (default 5000), in FSX_CONFIG (default: every configuration).
#[test]
#[ignore]
fn fsx_long() {
    let seeds = env_seeds("FSX_SEED", 1..=16);
    let ops = env_number("FSX_OPS").map_or(5000, |n| n as usize);
    let configs: Vec<&Config> = match std::env::var("FSX_CONFIG") {
        Ok(name) => vec![config(&name)],
        Err(_) => CONFIGS.iter().collect(),
    };
    for c in configs {
        eprintln!("fsx [{}]: seeds {seeds:x?}, {ops} operations", c.name);
        run_config(c, &seeds, ops);
    }
}
