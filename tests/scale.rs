//! Many files on a real mount: thousands of looked-up inodes under the
//! common soft descriptor limit of 1024, directory renames and root
//! attribute changes with thousands of files known since the mount, and
//! O_DIRECT descriptors shared per inode and access mode.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::attrs::{sys_get_attr, sys_set_attr};
use common::{KIB, Mount, assert_elapsed_between, describe, loose_upper, run_unchecked};

const EFFECTIVE: &str = "user.throttle.effective";
const BPS_RD: &str = "user.throttle.bps_rd";

/// The soft descriptor limit many systems start a process with.
const LOW_SOFT_NOFILE: libc::rlim_t = 1024;

/// Well past LOW_SOFT_NOFILE: each looked-up inode holds a descriptor.
const MANY_FILES: usize = 2_500;

/// Files opened through the mount before the renames and the root change.
const KNOWN_FILES: usize = 4_000;

const RENAMES: usize = 200;

/// Loose: 200 renames took 35 s and more with 4,000 known files when each
/// rename re-resolved every one of them; ext4 alone takes milliseconds.
const RENAMES_UPPER_SECS: f64 = 5.0;

const WARNING: &str = "out of file descriptors";

/// Lowers this test process's soft RLIMIT_NOFILE (the hard limit stays), so
/// the daemon it spawns starts with it, as under a default login shell.
fn lower_soft_nofile(soft: libc::rlim_t) {
    // SAFETY: getrlimit/setrlimit on valid structures.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = soft.min(lim.rlim_max);
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

fn hard_nofile() -> libc::rlim_t {
    // SAFETY: as above.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max
}

fn daemon_fds(m: &Mount) -> usize {
    fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .count()
}

/// `ls -ln` with full times: every field a stat gives, per name.
fn ls(dir: &Path) -> String {
    let out = run_unchecked(
        "ls",
        &[
            "-ln".as_ref(),
            "--time-style=full-iso".as_ref(),
            dir.as_os_str(),
        ],
    );
    assert!(out.status.success(), "{}", describe("ls", &[dir], &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ls_of_thousands_of_files_succeeds_from_a_soft_limit_of_1024() {
    if hard_nofile() < (MANY_FILES as libc::rlim_t) * 2 {
        eprintln!("hard RLIMIT_NOFILE below {}: skipped", MANY_FILES * 2);
        return;
    }
    lower_soft_nofile(LOW_SOFT_NOFILE);
    let mut m = Mount::new();
    for i in 0..MANY_FILES {
        fs::write(m.src_path(&format!("f{i:05}")), vec![b'x'; i % 7000]).unwrap();
    }
    m.start(&[]);
    // Every entry is looked up (and held) before ls prints anything.
    let through = ls(m.mnt());
    assert_eq!(
        through,
        ls(m.src()),
        "ls -ln through the mount and of the source differ"
    );
    assert_eq!(through.lines().count(), MANY_FILES + 1, "{through:.300}");
    assert!(
        daemon_fds(&m) > MANY_FILES,
        "the daemon does not hold a descriptor per looked-up inode"
    );
    assert!(!m.stderr().contains(WARNING), "{}", m.stderr());
}

#[test]
fn running_out_of_descriptors_is_logged_once() {
    let mut m = Mount::new();
    for i in 0..400 {
        fs::write(m.src_path(&format!("f{i}")), b"").unwrap();
    }
    m.start(&[]);
    // Far fewer descriptors than inodes, from now on.
    let lim = libc::rlimit {
        rlim_cur: 128,
        rlim_max: 128,
    };
    // SAFETY: prlimit on our own child with a valid structure.
    let r = unsafe { libc::prlimit(m.pid(), libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
    let failed = (0..400)
        .filter(|i| fs::metadata(m.path(&format!("f{i}"))).is_err())
        .count();
    assert!(
        failed > 100,
        "only {failed} of 400 stats failed under 128 descriptors"
    );
    let warnings = m.stderr().matches(WARNING).count();
    assert_eq!(warnings, 1, "{failed} failures:\n{}", m.stderr());
}

/// Opens (and closes) every file, so the daemon resolves its limits.
fn open_all(dir: &Path, n: usize) {
    for i in 0..n {
        File::open(dir.join(format!("f{i}"))).unwrap();
    }
}

fn effective_first_lines(path: &Path) -> String {
    let text = sys_get_attr(path, EFFECTIVE).expect("effective");
    text.lines().take(2).collect::<Vec<_>>().join(" ")
}

#[test]
fn renaming_a_directory_of_thousands_of_known_files_is_fast_and_inheritance_follows() {
    let m = Mount::with_setup(
        |src| {
            for d in ["a/d", "b"] {
                fs::create_dir_all(src.join(d)).unwrap();
            }
            for i in 0..KNOWN_FILES {
                fs::write(src.join(format!("a/d/f{i}")), b"").unwrap();
            }
        },
        &[],
    );
    sys_set_attr(&m.path("a"), BPS_RD, "1M");
    sys_set_attr(&m.path("b"), BPS_RD, "2M");
    open_all(&m.path("a/d"), KNOWN_FILES);
    // Held open across the renames: resolved at once, not at next use.
    let held = File::open(m.path("a/d/f0")).unwrap();
    let (a, b) = (m.path("a/d"), m.path("b/d"));
    let start = Instant::now();
    for _ in 0..RENAMES / 2 {
        fs::rename(&a, &b).unwrap();
        fs::rename(&b, &a).unwrap();
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed.as_secs_f64() < RENAMES_UPPER_SECS,
        "{RENAMES} renames with {KNOWN_FILES} known files took {elapsed:?}"
    );
    fs::rename(&a, &b).unwrap();
    for i in [0, 1, KNOWN_FILES / 2, KNOWN_FILES - 1] {
        assert_eq!(
            effective_first_lines(&m.path(&format!("b/d/f{i}"))),
            "source=directory:/b bps_rd=2097152",
            "f{i} after its directory moved under b"
        );
    }
    // A file's own limits still win over its new directory's.
    sys_set_attr(&m.path("b/d/f1"), BPS_RD, "3M");
    assert_eq!(
        effective_first_lines(&m.path("b/d/f1")),
        "source=file bps_rd=3145728"
    );
    drop(held);
}

/// Under bps_rd=64K (a bucket of 0.1 s = 6.4 KiB), three 64 KiB reads:
/// the third cannot start before (2 * 64K - 6.4K) / 64K = 1.9 s.
const SLOW_BPS: u64 = 64 * KIB;
const SLOW_REQ: u64 = 64 * KIB;

fn timed_reads(file: &File, count: u64) -> Duration {
    let mut buf = vec![0u8; SLOW_REQ as usize];
    let start = Instant::now();
    for i in 0..count {
        file.read_exact_at(&mut buf, i * SLOW_REQ).unwrap();
    }
    start.elapsed()
}

#[test]
fn a_root_limit_set_with_thousands_of_known_files_applies_to_them() {
    let m = Mount::with_setup(
        |src| {
            for i in 0..KNOWN_FILES {
                let len = if i < 2 { 3 * SLOW_REQ as usize } else { 0 };
                fs::write(src.join(format!("f{i}")), vec![7u8; len]).unwrap();
            }
        },
        &[],
    );
    open_all(m.mnt(), KNOWN_FILES);
    let held = File::open(m.path("f0")).unwrap();
    let start = Instant::now();
    sys_set_attr(m.mnt(), BPS_RD, &SLOW_BPS.to_string());
    let set_took = start.elapsed();
    assert!(
        set_took < Duration::from_secs(2),
        "root setxattr took {set_took:?}"
    );
    for i in [0, 1, KNOWN_FILES / 2, KNOWN_FILES - 1] {
        assert_eq!(
            effective_first_lines(&m.path(&format!("f{i}"))),
            format!("source=directory:/ bps_rd={SLOW_BPS}"),
            "f{i}"
        );
    }
    // Both the file held open and one opened again are throttled.
    let lower = (2 * SLOW_REQ) as f64 / SLOW_BPS as f64 - 0.1;
    let again = OpenOptions::new().read(true).open(m.path("f1")).unwrap();
    for (what, f) in [("held f0", &held), ("reopened f1", &again)] {
        let took = timed_reads(f, 3);
        assert_elapsed_between(what, took, lower, loose_upper(lower + 0.1));
    }
}

#[test]
fn o_direct_descriptors_are_shared_per_access_mode_and_keep_their_meaning() {
    let mut m = Mount::new();
    fs::write(m.src_path("img"), vec![0u8; 64 * KIB as usize]).unwrap();
    m.start(&[]);
    let img = m.path("img");
    fs::metadata(&img).unwrap();
    let base = daemon_fds(&m);
    let open = |write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(&img)
            .unwrap()
    };
    // A read-only O_DIRECT descriptor first: a read-write handle opened
    // after it must not get it, or its aligned writes would fail EBADF.
    let ro = open(false);
    let rws: Vec<File> = (0..4).map(|_| open(true)).collect();
    // One reopen per handle, one O_DIRECT descriptor per access mode.
    assert_eq!(
        daemon_fds(&m) - base,
        5 + 2,
        "descriptors for 5 O_DIRECT handles"
    );
    let block = vec![0x5a_u8; 4096];
    rws[3].write_all_at(&block, 8192).unwrap();
    let mut back = vec![0u8; 4096];
    ro.read_exact_at(&mut back, 8192).unwrap();
    assert_eq!(back, block);
    assert_eq!(
        &fs::read(m.src_path("img")).unwrap()[8192..12288],
        &block[..]
    );
    drop(ro);
    drop(rws);
    // Releases reach the daemon asynchronously after close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon_fds(&m) != base && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        daemon_fds(&m),
        base,
        "descriptors left after every handle closed"
    );
}
