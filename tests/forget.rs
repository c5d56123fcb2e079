//! What the kernel forgets must not change what a file is: inode numbers
//! are the source's and stay the same, and a file's buckets and counters
//! outlive a forget (`echo 2 > /proc/sys/vm/drop_caches`) at least until
//! the buckets are empty, so closing a file does not escape its limit.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::aio::AlignedBuf;
use common::attrs::stats;
use common::{KIB, MIB, Mount, make_file};

/// The daemon's log of forgets, to know the kernel really forgot.
const FORGET_LOG: &str = "warn,throttlefs::fs=debug";
/// What the daemon logs when the kernel forgets an inode.
const FORGOTTEN_LINE: &str = "forgotten (state kept";

/// How long the daemon may take to log a forget the kernel sent.
const FORGET_LOG_WAIT: Duration = Duration::from_secs(10);

fn ino(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// Asserts that every entry readdir lists in each of `dirs` (under the
/// mount) carries the inode number a lookup of it gives.
fn assert_readdir_ino_matches_lookup(m: &Mount, dirs: &[&str]) {
    for dir in dirs {
        for e in fs::read_dir(m.path(dir)).unwrap() {
            let e = e.unwrap();
            assert_eq!(
                std::os::unix::fs::DirEntryExt::ino(&e),
                ino(&e.path()),
                "readdir ino of {}",
                e.path().display()
            );
        }
    }
}

/// Make the kernel forget every unused inode, ours included.
fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").expect("write drop_caches (needs root)");
}

/// Drop caches until the daemon has logged at least `count` forgets in
/// all; panics if it does not (the test would prove nothing).
fn forget_all(m: &Mount, count: usize) {
    let deadline = Instant::now() + FORGET_LOG_WAIT;
    loop {
        drop_caches();
        if m.stderr().matches(FORGOTTEN_LINE).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel forgot fewer than {count} inodes\n{}",
            m.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mount_logging_forgets(setup: impl FnOnce(&Path), args: &[&str]) -> Mount {
    let mut m = Mount::new();
    setup(m.src());
    m.daemon_env
        .push(("RUST_LOG".to_string(), FORGET_LOG.to_string()));
    m.start(args);
    m
}

#[test]
fn inode_numbers_are_the_sources_and_survive_a_forget() {
    let m = mount_logging_forgets(
        |src| {
            make_file(src, "disk.img", 4096, 1);
            fs::create_dir(src.join("dir")).unwrap();
            make_file(&src.join("dir"), "inner.img", 4096, 2);
            fs::hard_link(src.join("disk.img"), src.join("dir/link.img")).unwrap();
            std::os::unix::fs::symlink("disk.img", src.join("sym")).unwrap();
        },
        &[],
    );
    // Made through the mount: create, mkdir, symlink, link, mknod, rename.
    File::create(m.path("made.img")).unwrap();
    fs::create_dir(m.path("made-dir")).unwrap();
    std::os::unix::fs::symlink("made.img", m.path("made-sym")).unwrap();
    fs::hard_link(m.path("made.img"), m.path("made-dir/made-link.img")).unwrap();
    let fifo = common::attrs::cpath(&m.path("fifo"));
    // SAFETY: mkfifo of a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    fs::rename(m.path("made.img"), m.path("made-dir/renamed.img")).unwrap();

    let names = [
        "disk.img",
        "dir",
        "dir/inner.img",
        "dir/link.img",
        "sym",
        "made-dir",
        "made-dir/renamed.img",
        "made-dir/made-link.img",
        "made-sym",
        "fifo",
    ];
    let before: Vec<u64> = names.iter().map(|n| ino(&m.path(n))).collect();
    for (name, got) in names.iter().zip(&before) {
        assert_eq!(*got, ino(&m.src_path(name)), "st_ino of {name}");
    }
    assert_eq!(before[0], before[3], "hard links share a number");
    // readdir gives the number lookup gives.
    assert_readdir_ino_matches_lookup(&m, &["", "dir", "made-dir"]);

    // Two pairs of names are hard links: one object each.
    forget_all(&m, names.len() - 2);
    let after: Vec<u64> = names.iter().map(|n| ino(&m.path(n))).collect();
    assert_eq!(before, after, "st_ino across drop_caches");
}

/// Read `len` bytes at `offset` in a fresh open, then close. One request:
/// the buffer is page-aligned, so 1 MiB is not split across 257 pages.
fn read_once(path: &Path, offset: u64, len: usize) {
    let f = File::open(path).unwrap();
    let mut buf = AlignedBuf::zeroed(len);
    f.read_exact_at(&mut buf, offset).unwrap();
}

const READS: u64 = 5;
/// bps_rd=1M, 1 MiB reads, default burst (a bucket of 0.1 s): the first
/// read goes at once, each later one when the bucket is back to 0.1 MiB.
const READS_LOWER_BOUND: Duration = Duration::from_millis(3900);
/// Loose: a shared, loaded machine, and drop_caches between reads.
const READS_UPPER_BOUND: Duration = Duration::from_secs(20);

#[test]
fn forgotten_file_keeps_its_buckets() {
    let m = mount_logging_forgets(
        |src| {
            make_file(src, "disk.img", READS * MIB, 3);
        },
        &["--bps-rd", "1M"],
    );
    let path = m.path("disk.img");
    let start = Instant::now();
    for i in 0..READS {
        read_once(&path, i * MIB, MIB as usize);
        if i + 1 < READS {
            let seen = m.stderr().matches(FORGOTTEN_LINE).count();
            forget_all(&m, seen + 1);
        }
    }
    let took = start.elapsed();
    assert!(
        took >= READS_LOWER_BOUND,
        "{READS} reads of 1 MiB at bps_rd=1M with the inode forgotten between them took \
         {took:?}, less than {READS_LOWER_BOUND:?}"
    );
    assert!(took < READS_UPPER_BOUND, "took {took:?}");
    let st = stats(&path);
    assert_eq!(
        st["read_ops"], READS,
        "one request a read, counted across forgets"
    );
    assert_eq!(st["read_bytes"], READS * MIB);
}

/// At 4 KiB/s a 64 KiB read's charge takes 16 s to leak away: the state
/// must still be there after a forget a moment later. (The read itself
/// goes at once: the bucket starts empty.)
const STATS_READ_BYTES: u64 = 64 * KIB;

#[test]
fn stats_survive_a_forget() {
    let m = mount_logging_forgets(
        |src| {
            make_file(src, "disk.img", STATS_READ_BYTES, 4);
        },
        &["--bps-rd", "4K"],
    );
    let path = m.path("disk.img");
    read_once(&path, 0, STATS_READ_BYTES as usize);
    let before = stats(&path);
    assert_eq!(before["read_bytes"], STATS_READ_BYTES);
    let seen = m.stderr().matches(FORGOTTEN_LINE).count();
    forget_all(&m, seen + 1);
    let after = stats(&path);
    assert_eq!(
        after["read_bytes"], STATS_READ_BYTES,
        "read_bytes after a forget"
    );
    assert_eq!(
        after["read_ops"], before["read_ops"],
        "read_ops after a forget"
    );
}

/// A tmpfs mounted inside the source for one test, unmounted on drop (after
/// the throttlefs mount, which is declared after it).
struct Submount(std::path::PathBuf);

impl Drop for Submount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Made-up numbers: objects on another filesystem than the source root's.
const SYNTHETIC_INO_BIT: u64 = 1 << 63;

#[test]
fn objects_of_a_filesystem_mounted_inside_the_source_get_stable_made_up_numbers() {
    let mut m = Mount::new();
    let sub = m.src_path("sub");
    fs::create_dir(&sub).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&sub)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    let _sub = Submount(sub.clone());
    make_file(&sub, "a.img", 4096, 5);
    fs::create_dir(sub.join("d")).unwrap();
    m.daemon_env
        .push(("RUST_LOG".to_string(), FORGET_LOG.to_string()));
    m.start(&[]);

    let names = ["sub", "sub/a.img", "sub/d"];
    let before: Vec<u64> = names.iter().map(|n| ino(&m.path(n))).collect();
    for (name, n) in names.iter().zip(&before) {
        assert!(n & SYNTHETIC_INO_BIT != 0, "{name}: {n:#x} is not made up");
    }
    let mut distinct = before.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), names.len(), "{before:?}");
    // readdir agrees with lookup, also for the mount point itself (whose
    // d_ino in the source is the directory under it).
    assert_readdir_ino_matches_lookup(&m, &["", "sub"]);
    forget_all(&m, names.len());
    let after: Vec<u64> = names.iter().map(|n| ino(&m.path(n))).collect();
    assert_eq!(before, after, "st_ino across drop_caches");
}
