//! Per-file limits set live through `user.throttle.*` extended attributes on
//! a real mount: set/get/list/remove, canonical values stored on the source
//! and honoured after a remount, live retuning (also of queued requests),
//! directory defaults as whole sets, validation, the read-only `effective`
//! and `stats` attributes, permissions for other users, and renames/links.
//!
//! Timed reads use O_DIRECT and requests of at most 512 KiB, so each one
//! reaches throttlefs as a single FUSE request. As in tests/rates.rs, for N
//! bytes read in requests of R under an average of `avg` B/s (bucket
//! capacity avg * 0.1 s), the last request cannot start earlier than
//! (N - R - 0.1 avg) / avg seconds after the first: that strict lower bound
//! is asserted. For counting completions in a window of T seconds, the same
//! bucket allows at most (0.1 avg + T avg) / R + 1 releases.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::attrs::{cpath, lgetxattr, llist_attrs, sys_remove_attr, sys_set_attr};
use common::{
    KIB, MIB, Mount, as_nobody, assert_elapsed_between, chmod, describe, getfattr, loose_upper,
    make_file, open_direct, pattern, run_unchecked, setfattr, setfattr_out,
};

const BPS_RD: &str = "user.throttle.bps_rd";
const EFFECTIVE: &str = "user.throttle.effective";
const STATS: &str = "user.throttle.stats";

/// Request size of the timed reads.
const REQ: u64 = 128 * KIB;

// ---------------------------------------------------------------------------
// Attribute helpers through setfattr/getfattr here and in common
// (`setfattr`, `getfattr`); the in-process ones (`sys_set_attr`,
// `lgetxattr`, ...) are in common::attrs.

/// `setfattr -n NAME -v VALUE PATH`, asserting that it fails with `msg`.
fn set_attr_fails(path: &Path, name: &str, value: &str, msg: &str) {
    let out = setfattr_out(path, name, value);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(msg),
        "setting {name}={value} on {} should fail with {msg:?}: {}",
        path.display(),
        describe("setfattr", &[name, value], &out)
    );
}

fn remove_out(path: &Path, name: &str) -> Output {
    run_unchecked(
        "setfattr",
        &[OsStr::new("-x"), OsStr::new(name), path.as_os_str()],
    )
}

/// `setfattr -x NAME PATH`, asserting success.
fn remove_attr(path: &Path, name: &str) {
    let out = remove_out(path, name);
    assert!(
        out.status.success(),
        "removing {name} failed: {}",
        describe("setfattr", &["-x", name], &out)
    );
}

/// `setfattr -x NAME PATH`, asserting that it fails with `msg`.
fn remove_attr_fails(path: &Path, name: &str, msg: &str) {
    let out = remove_out(path, name);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(msg),
        "removing {name} from {} should fail with {msg:?}: {}",
        path.display(),
        describe("setfattr", &["-x", name], &out)
    );
}

/// The value of `name` stored on a source object, as text; `None` if it
/// has no such attribute.
fn src_attr(path: &Path, name: &str) -> Option<String> {
    match lgetxattr(path, name) {
        Ok(v) => Some(String::from_utf8_lossy(&v).into_owned()),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => None,
        Err(e) => panic!("getxattr {name} on {}: {e}", path.display()),
    }
}

/// `user.throttle.effective` of `path`, parsed: the `source=` value and the
/// limits listed.
fn effective(path: &Path) -> (String, BTreeMap<String, String>) {
    let text = getfattr(path, EFFECTIVE)
        .unwrap_or_else(|| panic!("cannot read {EFFECTIVE} of {}", path.display()));
    parse_effective(&text)
}

fn parse_effective(text: &str) -> (String, BTreeMap<String, String>) {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let source = first
        .strip_prefix("source=")
        .unwrap_or_else(|| panic!("effective does not start with source=: {text:?}"))
        .to_string();
    let limits = lines
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("bad effective line {l:?} in {text:?}"));
            (k.to_string(), v.to_string())
        })
        .collect();
    (source, limits)
}

/// Asserts `user.throttle.effective` of `path` is `source=SOURCE` with
/// exactly `limits`.
fn assert_effective(path: &Path, source: &str, limits: &[(&str, &str)]) {
    let expected: BTreeMap<String, String> = limits
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let got = effective(path);
    assert_eq!(
        got,
        (source.to_string(), expected),
        "user.throttle.effective of {}",
        path.display()
    );
}

/// `user.throttle.stats` of `path`, parsed, asserting that every expected
/// key is there.
///
/// Read in-process (lgetxattr(2)), not with getfattr: see
/// `common::attrs::sys_set_attr`.
fn stats(path: &Path) -> BTreeMap<String, u64> {
    let map = common::attrs::stats(path);
    for key in [
        "read_bytes",
        "read_ops",
        "write_bytes",
        "write_ops",
        "wait_ns",
        "waiting",
        "read_bytes_per_sec",
        "read_ops_per_sec",
        "write_bytes_per_sec",
        "write_ops_per_sec",
    ] {
        assert!(map.contains_key(key), "stats lack {key}: {map:?}");
    }
    map
}

// ---------------------------------------------------------------------------
// I/O helpers

/// Reads `len` bytes of `file` from `offset` in requests of `req`, checking
/// them against `expected` (the whole file).
fn read_range(file: &File, expected: &[u8], offset: u64, len: u64, req: u64) {
    let mut buf = vec![0u8; req as usize];
    let mut off = offset;
    while off < offset + len {
        file.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf[..] == expected[off as usize..(off + req) as usize],
            "wrong data read at offset {off}"
        );
        off += req;
    }
}

/// Opens `path` with O_DIRECT, then times reading `len` bytes from the
/// start in requests of `req`.
fn timed_read(path: &Path, expected: &[u8], len: u64, req: u64) -> Duration {
    let file = open_direct(path, false);
    let start = Instant::now();
    read_range(&file, expected, 0, len, req);
    start.elapsed()
}

/// Strict lower bound for `total` units moved in requests of `req` units
/// under an average of `avg` units/s without burst.
fn lower_bound(total: u64, req: u64, avg: u64) -> f64 {
    (total as f64 - req as f64 - avg as f64 * 0.1) / avg as f64
}

/// Asserts that reading `len` bytes of `path` in requests of REQ obeys a
/// read limit of `avg` B/s.
fn assert_read_limited(what: &str, path: &Path, expected: &[u8], len: u64, avg: u64) {
    let elapsed = timed_read(path, expected, len, REQ);
    let lower = lower_bound(len, REQ, avg);
    assert_elapsed_between(what, elapsed, lower, loose_upper(lower));
}

/// Asserts that reading `len` bytes of `path` in requests of REQ is fast:
/// under `slow_avg` B/s it could not finish within half the strict lower
/// bound.
fn assert_read_fast(what: &str, path: &Path, expected: &[u8], len: u64, slow_avg: u64) {
    let elapsed = timed_read(path, expected, len, REQ);
    let limit = lower_bound(len, REQ, slow_avg) / 2.0;
    assert!(
        elapsed.as_secs_f64() < limit,
        "{what}: took {elapsed:?}, a limit of {slow_avg} B/s still seems to apply (expected < {limit:.3} s)"
    );
}

// ---------------------------------------------------------------------------
// 1. set, get, list, remove; stored on the source; honoured after a remount

#[test]
fn set_get_list_remove_and_remount() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", 2 * MIB, 1);
    fs::write(m.src_path("meta"), b"meta").unwrap();
    let args = ["--iops-rd", "1000"];
    m.start(&args);
    let f = m.path("disk.img");

    assert_effective(&f, "mount", &[("iops_rd", "1000")]);
    assert_eq!(getfattr(&f, BPS_RD), None, "no own limit yet");

    // Set: canonical value through the mount and on the source.
    setfattr(&f, BPS_RD, "1M");
    assert_eq!(getfattr(&f, BPS_RD).as_deref(), Some("1048576"));
    assert_eq!(
        src_attr(&m.src_path("disk.img"), BPS_RD).as_deref(),
        Some("1048576"),
        "the canonical value is not stored on the source file"
    );
    // The file's own set replaces the mount's iops_rd entirely.
    assert_effective(&f, "file", &[("bps_rd", "1048576")]);

    // Canonical forms of sizes and durations.
    let meta = m.path("meta");
    setfattr(&meta, "user.throttle.bps_wr", "10M");
    setfattr(&meta, "user.throttle.bps_wr_max", "20M");
    setfattr(&meta, "user.throttle.bps_wr_max_length", "500ms");
    setfattr(&meta, "user.throttle.iops_size", "4K");
    for (name, value) in [
        ("user.throttle.bps_wr", "10485760"),
        ("user.throttle.bps_wr_max", "20971520"),
        ("user.throttle.bps_wr_max_length", "0.5"),
        ("user.throttle.iops_size", "4096"),
    ] {
        assert_eq!(getfattr(&meta, name).as_deref(), Some(value), "{name}");
        assert_eq!(
            src_attr(&m.src_path("meta"), name).as_deref(),
            Some(value),
            "{name} on the source"
        );
    }
    setfattr(&meta, "user.throttle.bps_wr_max_length", "2s");
    assert_eq!(
        getfattr(&meta, "user.throttle.bps_wr_max_length").as_deref(),
        Some("2")
    );
    setfattr(&meta, "user.throttle.bps_wr_max_length", "3");
    assert_eq!(
        getfattr(&meta, "user.throttle.bps_wr_max_length").as_deref(),
        Some("3")
    );
    assert_effective(
        &meta,
        "file",
        &[
            ("bps_wr", "10485760"),
            ("bps_wr_max", "20971520"),
            ("bps_wr_max_length", "3"),
            ("iops_size", "4096"),
        ],
    );

    // Other attributes pass through untouched and change nothing.
    setfattr(&f, "user.foo", "bar");
    assert_eq!(getfattr(&f, "user.foo").as_deref(), Some("bar"));
    assert_eq!(
        src_attr(&m.src_path("disk.img"), "user.foo").as_deref(),
        Some("bar")
    );
    assert_effective(&f, "file", &[("bps_rd", "1048576")]);

    // List: the stored attributes only (the read-only ones are unlisted).
    let names = llist_attrs(&f);
    for name in [BPS_RD, "user.foo"] {
        assert!(
            names.iter().any(|n| n == name),
            "listxattr lacks {name}: {names:?}"
        );
    }

    // Remove: back to the mount's limits, gone from the source, and the
    // file reads fast again (at 1 MiB/s 2 MiB takes at least 1.78 s).
    remove_attr(&f, BPS_RD);
    assert_eq!(getfattr(&f, BPS_RD), None);
    assert_eq!(src_attr(&m.src_path("disk.img"), BPS_RD), None);
    assert!(!llist_attrs(&f).iter().any(|n| n == BPS_RD));
    assert_effective(&f, "mount", &[("iops_rd", "1000")]);
    assert_read_fast("2 MiB read after removing bps_rd", &f, &data, 2 * MIB, MIB);

    // Set again, plus a non-canonical value written on the source directly,
    // then mount the same source with a new daemon.
    setfattr(&f, BPS_RD, "1M");
    fs::write(m.src_path("direct"), b"x").unwrap();
    let direct_src = cpath(&m.src_path("direct"));
    let value = b"2M";
    // SAFETY: valid path, name and value buffer.
    let r = unsafe {
        libc::setxattr(
            direct_src.as_ptr(),
            c"user.throttle.bps_wr".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr on the source: {}",
        io::Error::last_os_error()
    );
    m.terminate();
    assert!(!m.is_mounted(), "still mounted after the daemon exited");

    let m2 = Mount::with_source(m.src(), &args);
    let f2 = m2.path("disk.img");
    assert_effective(&f2, "file", &[("bps_rd", "1048576")]);
    assert_eq!(getfattr(&f2, BPS_RD).as_deref(), Some("1048576"));
    assert_eq!(getfattr(&f2, "user.foo").as_deref(), Some("bar"));
    let direct = m2.path("direct");
    assert_eq!(
        getfattr(&direct, "user.throttle.bps_wr").as_deref(),
        Some("2097152"),
        "a limit written on the source is read back in canonical form"
    );
    assert_effective(&direct, "file", &[("bps_wr", "2097152")]);
    assert_read_limited(
        "2 MiB read at bps_rd=1M after a remount",
        &f2,
        &data,
        2 * MIB,
        MIB,
    );
}

// ---------------------------------------------------------------------------
// 2. live retuning

/// Most releases a bucket of `avg` B/s (capacity 0.1 avg) allows within
/// `window` for requests of `req` bytes.
fn max_releases(avg: u64, req: u64, window: Duration) -> usize {
    let avg = avg as f64;
    ((avg * 0.1 + avg * window.as_secs_f64()) / req as f64).floor() as usize + 1
}

#[test]
fn live_retune_changes_the_rate_of_a_running_reader() {
    const RREQ: u64 = 256 * KIB;
    const FILE_LEN: u64 = 4 * MIB;
    let mut m = Mount::new();
    let data = Arc::new(make_file(m.src(), "disk.img", FILE_LEN, 2));
    m.start(&[]);
    let f = m.path("disk.img");
    setfattr(&f, BPS_RD, "512K");

    let file = open_direct(&f, false);
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let reader = {
        let (stop, data) = (stop.clone(), data.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; RREQ as usize];
            let mut done = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = (i * RREQ) % FILE_LEN;
                file.read_exact_at(&mut buf, off).unwrap();
                done.push(Instant::now());
                assert!(
                    buf[..] == data[off as usize..(off + RREQ) as usize],
                    "wrong data at {off}"
                );
                i += 1;
            }
            done
        })
    };

    let sleep_until = |t: Instant| thread::sleep(t.saturating_duration_since(Instant::now()));
    sleep_until(t0 + Duration::from_secs(1));
    let s1 = Instant::now();
    sys_set_attr(&f, BPS_RD, "4M");
    sleep_until(s1 + Duration::from_secs(1));
    let s2 = Instant::now();
    sys_set_attr(&f, BPS_RD, "256K");
    let s2_done = Instant::now();
    sleep_until(s2_done + Duration::from_millis(2500));
    let end = Instant::now();
    stop.store(true, Ordering::SeqCst);
    // Release the reader's last, queued request.
    sys_remove_attr(&f, BPS_RD);
    let done = reader.join().expect("reader thread");

    let count =
        |from: Instant, to: Instant| done.iter().filter(|t| **t > from && **t <= to).count();
    let (a, b, c) = (count(t0, s1), count(s1, s2), count(s2_done, end));
    let summary = format!(
        "completions of 256 KiB reads: {a} at 512K in {:?}, {b} at 4M in {:?}, {c} at 256K in {:?}",
        s1 - t0,
        s2 - s1,
        end - s2_done
    );
    eprintln!("{summary}");
    // At 512 KiB/s: at most 3 in the first second.
    assert!(
        a >= 1 && a <= max_releases(512 * KIB, RREQ, s1 - t0),
        "{summary}: the initial 512K limit is not enforced"
    );
    // Raised to 4 MiB/s: about 16 a second (512K would allow 3 or 4), and
    // still limited (one more for a read released before the change).
    assert!(
        b >= 8,
        "{summary}: raising the limit to 4M did not speed the reader up within a second"
    );
    assert!(
        b <= max_releases(4 * MIB, RREQ, s2 - s1) + 1,
        "{summary}: the raised 4M limit is not enforced"
    );
    // Lowered to 256 KiB/s: at most 4 in 2.5 s (one of them possibly
    // released before the change); at 4M there would be about 40.
    assert!(
        c <= max_releases(256 * KIB, RREQ, end - s2_done) + 1,
        "{summary}: lowering the limit to 256K did not slow the reader down"
    );
}

#[test]
fn raising_a_limit_releases_queued_requests_at_once() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", 2 * MIB, 3);
    m.start(&[]);
    let f = m.path("disk.img");
    setfattr(&f, BPS_RD, "128K");

    // 512 KiB at once leaves the bucket 499.2 KiB over its 12.8 KiB
    // capacity: nothing else can go for 3.9 s.
    let first = open_direct(&f, false);
    let mut buf = vec![0u8; 512 * KIB as usize];
    first.read_exact_at(&mut buf, 0).unwrap();

    let (tx, rx) = mpsc::channel();
    for (id, offset) in [(0usize, 512 * KIB), (1, MIB)] {
        let file = open_direct(&f, false);
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 512 * KIB as usize];
            let res = file.read_exact_at(&mut buf, offset).map(|_| buf);
            let at = Instant::now();
            // Closed before reporting: the close's FLUSH is a barrier that
            // shows in `waiting` while it is queued.
            drop(file);
            let _ = tx.send((id, offset, at, res));
        });
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    assert!(
        rx.try_recv().is_err(),
        "a read completed at once although the 128K bucket was full"
    );
    let st = stats(&f);
    assert_eq!(st["waiting"], 2, "stats while two reads are queued: {st:?}");

    // In-process setxattr: a spawned setfattr would wait for the queued
    // reads (see `sys_set_attr`).
    let set_start = Instant::now();
    sys_set_attr(&f, BPS_RD, "100M");
    let set_done = Instant::now();
    for _ in 0..2 {
        let (id, offset, at, res) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("queued read did not complete");
        let got = res.unwrap_or_else(|e| panic!("read {id} failed: {e}"));
        assert!(
            got[..] == data[offset as usize..(offset + 512 * KIB) as usize],
            "read {id}: wrong data"
        );
        let after = at.saturating_duration_since(set_done);
        assert!(
            after <= Duration::from_millis(300),
            "queued read {id} completed {after:?} after raising the limit \
             (setxattr took {:?}); it should be released at once",
            set_done - set_start
        );
    }
    assert_eq!(stats(&f)["waiting"], 0);
}

// ---------------------------------------------------------------------------
// 3. directory defaults, whole sets

#[test]
fn directory_limits_are_inherited_as_whole_sets() {
    let mut m = Mount::new();
    fs::create_dir_all(m.src_path("dir/sub")).unwrap();
    let a_data = make_file(m.src(), "dir/a", 2 * MIB, 4);
    let b_data = make_file(m.src(), "dir/b", 2 * MIB, 5);
    make_file(m.src(), "dir/sub/c", 4 * KIB, 6);
    make_file(m.src(), "top", 4 * KIB, 7);
    m.start(&[]);
    let (dir, a, b, c, top) = (
        m.path("dir"),
        m.path("dir/a"),
        m.path("dir/b"),
        m.path("dir/sub/c"),
        m.path("top"),
    );
    assert_effective(&a, "mount", &[]);

    setfattr(&dir, BPS_RD, "1M");
    assert_eq!(
        src_attr(&m.src_path("dir"), BPS_RD).as_deref(),
        Some("1048576"),
        "the directory's limit is not stored on the source directory"
    );
    assert_eq!(getfattr(&dir, BPS_RD).as_deref(), Some("1048576"));
    let dir_set = [("bps_rd", "1048576")];
    assert_effective(&dir, "directory:/dir", &dir_set);
    assert_effective(&a, "directory:/dir", &dir_set);
    assert_effective(&c, "directory:/dir", &dir_set);
    assert_effective(&top, "mount", &[]);
    assert_read_limited(
        "2 MiB read of a file under a directory with bps_rd=1M",
        &a,
        &a_data,
        2 * MIB,
        MIB,
    );

    // The file's own iops_rd replaces the directory's whole set.
    setfattr(&a, "user.throttle.iops_rd", "1000");
    assert_effective(&a, "file", &[("iops_rd", "1000")]);
    assert_read_fast(
        "2 MiB read of a file with its own iops_rd under a bps_rd directory",
        &a,
        &a_data,
        2 * MIB,
        MIB,
    );

    // Removing the file's last own limit falls back to the directory.
    remove_attr(&a, "user.throttle.iops_rd");
    assert_effective(&a, "directory:/dir", &dir_set);
    assert_read_limited(
        "1 MiB read after the file's own limits were removed",
        &a,
        &a_data,
        MIB,
        MIB,
    );

    // An own bps=0 opts out of the directory's limits.
    setfattr(&b, "user.throttle.bps", "0");
    assert_eq!(getfattr(&b, "user.throttle.bps").as_deref(), Some("0"));
    assert_effective(&b, "file", &[]);
    assert_read_fast(
        "2 MiB read of a file with its own bps=0 under a bps_rd directory",
        &b,
        &b_data,
        2 * MIB,
        MIB,
    );

    // The mount root counts as a directory; the nearest one wins.
    setfattr(m.mnt(), "user.throttle.iops_wr", "500");
    assert_effective(&top, "directory:/", &[("iops_wr", "500")]);
    assert_effective(&c, "directory:/dir", &dir_set);
    // A live change of the directory reaches files already resolved.
    setfattr(&dir, BPS_RD, "2M");
    assert_effective(&a, "directory:/dir", &[("bps_rd", "2097152")]);
}

// ---------------------------------------------------------------------------
// 4. invalid values and conflicts

#[test]
fn invalid_values_and_conflicts_are_refused() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", 2 * MIB, 8);
    fs::write(m.src_path("other"), b"other").unwrap();
    m.start(&[]);
    let f = m.path("disk.img");
    setfattr(&f, BPS_RD, "1M");

    let inval = "Invalid argument";
    set_attr_fails(&f, BPS_RD, "banana", inval);
    set_attr_fails(&f, BPS_RD, "-5", inval);
    set_attr_fails(&f, "user.throttle.nonsense", "1", inval);
    set_attr_fails(&f, "user.throttle.iops_rd", "1K", inval);
    set_attr_fails(&f, "user.throttle.bps", "1M", inval);
    set_attr_fails(&f, "user.throttle.bps_rd_max", "512K", inval);
    set_attr_fails(&f, "user.throttle.bps_wr_max", "2M", inval);
    set_attr_fails(&f, "user.throttle.bps_rd_max_length", "2s", inval);
    set_attr_fails(&f, "user.throttle.bps_rd_max_length", "soon", inval);

    // Nothing changed: value, source, effective set and the rate.
    assert_eq!(getfattr(&f, BPS_RD).as_deref(), Some("1048576"));
    let src_names: Vec<String> = llist_attrs(&m.src_path("disk.img"))
        .into_iter()
        .filter(|n| n.starts_with("user.throttle."))
        .collect();
    assert_eq!(src_names, [BPS_RD], "refused attributes reached the source");
    assert_eq!(
        src_attr(&m.src_path("disk.img"), BPS_RD).as_deref(),
        Some("1048576")
    );
    assert_effective(&f, "file", &[("bps_rd", "1048576")]);

    // A removal that would leave bps_wr_max without bps_wr is refused.
    let other = m.path("other");
    setfattr(&other, "user.throttle.bps_wr", "1M");
    setfattr(&other, "user.throttle.bps_wr_max", "2M");
    remove_attr_fails(&other, "user.throttle.bps_wr", inval);
    assert_effective(
        &other,
        "file",
        &[("bps_wr", "1048576"), ("bps_wr_max", "2097152")],
    );
    assert_eq!(
        src_attr(&m.src_path("other"), "user.throttle.bps_wr").as_deref(),
        Some("1048576")
    );
    remove_attr(&other, "user.throttle.bps_wr_max");
    remove_attr(&other, "user.throttle.bps_wr");
    assert_effective(&other, "mount", &[]);

    assert_read_limited(
        "2 MiB read at bps_rd=1M after refused changes",
        &f,
        &data,
        2 * MIB,
        MIB,
    );
}

// ---------------------------------------------------------------------------
// 5. read-only attributes

#[test]
fn effective_and_stats_are_read_only_and_unlisted() {
    let mut m = Mount::new();
    fs::write(m.src_path("f"), b"data").unwrap();
    fs::create_dir(m.src_path("d")).unwrap();
    m.start(&["--bps-wr", "1M"]);
    let (f, d) = (m.path("f"), m.path("d"));

    let eperm = "Operation not permitted";
    for name in [EFFECTIVE, STATS] {
        set_attr_fails(&f, name, "source=file", eperm);
        set_attr_fails(&d, name, "x", eperm);
        remove_attr_fails(&f, name, eperm);
    }
    // Readable by name.
    assert_effective(&f, "mount", &[("bps_wr", "1048576")]);
    assert_effective(&d, "mount", &[("bps_wr", "1048576")]);
    assert_eq!(stats(&f)["read_ops"], 0);

    // Not listed, so copy tools do not try to write them back.
    sys_set_attr(&f, BPS_RD, "1M");
    for path in [&f, &d] {
        let names = llist_attrs(path);
        assert!(
            !names.iter().any(|n| n == EFFECTIVE || n == STATS),
            "listxattr on {} lists a read-only attribute: {names:?}",
            path.display()
        );
    }
    assert_eq!(llist_attrs(&f), [BPS_RD], "listxattr on a file");
    let err = lgetxattr(&d, STATS).expect_err("stats on a directory");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENODATA),
        "stats on a directory"
    );

    // getfattr -d -m - dumps the stored limit but not the generated ones;
    // getfattr -n still reads them.
    let dump = common::run(
        "getfattr",
        &[
            OsStr::new("--absolute-names"),
            OsStr::new("-d"),
            OsStr::new("-m"),
            OsStr::new("-"),
            f.as_os_str(),
        ],
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("user.throttle.bps_rd=\"1048576\"")
            && !dump.contains(EFFECTIVE)
            && !dump.contains(STATS),
        "getfattr -d -m - output: {dump}"
    );
    let named = common::run(
        "getfattr",
        &[
            OsStr::new("--absolute-names"),
            OsStr::new("-n"),
            OsStr::new(STATS),
            f.as_os_str(),
        ],
    );
    let named = String::from_utf8_lossy(&named.stdout);
    assert!(
        named.contains("user.throttle.stats=\"read_bytes="),
        "getfattr -n {STATS} output: {named}"
    );

    // A stored copy of a generated name on the source (written there
    // directly) is shadowed: not listed, and the generated value is read.
    sys_set_attr(&m.src_path("f"), STATS, "stale");
    assert!(
        !llist_attrs(&f).iter().any(|n| n == STATS),
        "a stored {STATS} is listed through the mount"
    );
    assert_eq!(stats(&f)["read_ops"], 0);
    sys_remove_attr(&m.src_path("f"), STATS);

    // They are generated, never stored on the source.
    let src_names = llist_attrs(&m.src_path("f"));
    assert!(
        !src_names.iter().any(|n| n == EFFECTIVE || n == STATS),
        "read-only attributes stored on the source: {src_names:?}"
    );
}

// ---------------------------------------------------------------------------
// 6. other users

#[test]
fn changing_limits_needs_write_permission() {
    let mut m = Mount::new();
    for p in [m.root(), m.src(), m.mnt()] {
        chmod(p, 0o755);
    }
    for (name, mode) in [("file", 0o644), ("open", 0o666), ("private", 0o600)] {
        fs::write(m.src_path(name), name.as_bytes()).unwrap();
        chmod(&m.src_path(name), mode);
    }
    m.start(&["-o", "allow_other"]);
    let file = m.path("file");

    // Nobody can reach and read the file through the mount...
    let cat = as_nobody("cat", &[file.as_os_str()]);
    assert!(
        cat.status.success() && cat.stdout == b"file",
        "nobody cannot read a 0644 file through an allow_other mount: {}",
        describe("setpriv cat", &[&file], &cat)
    );
    // ...and read its effective limits...
    let get = as_nobody(
        "getfattr",
        &[
            OsStr::new("--absolute-names"),
            OsStr::new("-n"),
            OsStr::new(EFFECTIVE),
            OsStr::new("--only-values"),
            file.as_os_str(),
        ],
    );
    assert!(
        get.status.success() && get.stdout == b"source=mount\n",
        "nobody cannot read {EFFECTIVE}: {}",
        describe("setpriv getfattr", &[&file], &get)
    );
    // ...but not change them without write permission.
    let args = |p: &PathBuf| {
        [
            OsStr::new("-n").to_owned(),
            OsStr::new(BPS_RD).to_owned(),
            OsStr::new("-v").to_owned(),
            OsStr::new("1M").to_owned(),
            p.as_os_str().to_owned(),
        ]
    };
    let set_args = args(&file);
    let set_refs: Vec<&OsStr> = set_args.iter().map(|s| s.as_os_str()).collect();
    let set = as_nobody("setfattr", &set_refs);
    let stderr = String::from_utf8_lossy(&set.stderr);
    assert!(
        !set.status.success()
            && (stderr.contains("Permission denied") || stderr.contains("Operation not permitted")),
        "nobody set a limit on root's 0644 file: {}",
        describe("setpriv setfattr", &set_refs, &set)
    );
    assert_eq!(
        src_attr(&m.src_path("file"), BPS_RD),
        None,
        "the refused limit reached the source"
    );
    assert_effective(&file, "mount", &[]);
    let rm = as_nobody(
        "setfattr",
        &[OsStr::new("-x"), OsStr::new(BPS_RD), file.as_os_str()],
    );
    assert!(!rm.status.success(), "nobody removed an attribute");

    // Control: with write permission (a 0666 file) the same user can.
    let open = m.path("open");
    let open_args = args(&open);
    let open_refs: Vec<&OsStr> = open_args.iter().map(|s| s.as_os_str()).collect();
    let set = as_nobody("setfattr", &open_refs);
    assert!(
        set.status.success(),
        "nobody cannot set a limit on a 0666 file: {}",
        describe("setpriv setfattr", &open_refs, &set)
    );
    assert_eq!(
        src_attr(&m.src_path("open"), BPS_RD).as_deref(),
        Some("1048576")
    );
    assert_effective(&open, "file", &[("bps_rd", "1048576")]);

    // Reading needs read permission.
    let private = m.path("private");
    let get = as_nobody(
        "getfattr",
        &[
            OsStr::new("--absolute-names"),
            OsStr::new("-n"),
            OsStr::new(EFFECTIVE),
            private.as_os_str(),
        ],
    );
    assert!(
        !get.status.success() && String::from_utf8_lossy(&get.stderr).contains("Permission denied"),
        "nobody read {EFFECTIVE} of a 0600 file: {}",
        describe("setpriv getfattr", &[&private], &get)
    );
}

// ---------------------------------------------------------------------------
// 7. stats

#[test]
fn stats_count_bytes_ops_and_waiting() {
    const SREQ: u64 = 64 * KIB;
    let mut m = Mount::new();
    let free_data = make_file(m.src(), "free", MIB, 9);
    let lim_data = make_file(m.src(), "limited", MIB, 10);
    let q_data = make_file(m.src(), "queued", MIB, 11);
    m.start(&[]);

    // 6 reads of 64 KiB and 3 writes of 32 KiB on each file.
    let io = |path: &Path, data: &[u8]| -> Duration {
        let file = open_direct(path, true);
        let start = Instant::now();
        read_range(&file, data, 0, 6 * SREQ, SREQ);
        let w = pattern(32 * KIB as usize, 12);
        for i in 0..3u64 {
            file.write_all_at(&w, 512 * KIB + i * 32 * KIB).unwrap();
        }
        start.elapsed()
    };
    let check = |path: &Path, st: &BTreeMap<String, u64>| {
        for (key, value) in [
            ("read_bytes", 6 * SREQ),
            ("read_ops", 6),
            ("write_bytes", 96 * KIB),
            ("write_ops", 3),
            ("waiting", 0),
        ] {
            assert_eq!(st[key], value, "{key} of {}: {st:?}", path.display());
        }
    };

    // Unlimited: exact counts, nothing waited.
    let free = m.path("free");
    let before = stats(&free);
    assert!(
        before.values().all(|v| *v == 0),
        "stats before any I/O: {before:?}"
    );
    let t = Instant::now();
    io(&free, &free_data);
    let st = stats(&free);
    let recent = t.elapsed() < Duration::from_millis(800);
    check(&free, &st);
    assert_eq!(st["wait_ns"], 0, "an unlimited file waited: {st:?}");
    if recent {
        // All of it happened within the last second.
        assert_eq!(st["read_bytes_per_sec"], 6 * SREQ, "{st:?}");
        assert_eq!(st["read_ops_per_sec"], 6, "{st:?}");
        assert_eq!(st["write_bytes_per_sec"], 96 * KIB, "{st:?}");
        assert_eq!(st["write_ops_per_sec"], 3, "{st:?}");
    }

    // bps_rd=1M (capacity 102.4 KiB): from the third 64 KiB read on, reads
    // wait about 62 ms each.
    let limited = m.path("limited");
    setfattr(&limited, BPS_RD, "1M");
    let elapsed = io(&limited, &lim_data);
    let lower = lower_bound(6 * SREQ, SREQ, MIB);
    assert!(
        elapsed.as_secs_f64() >= lower,
        "6 x 64 KiB at bps_rd=1M took {elapsed:?} < {lower:.3} s"
    );
    let st = stats(&limited);
    check(&limited, &st);
    assert!(
        st["wait_ns"] > 0 && st["wait_ns"] as u128 <= elapsed.as_nanos(),
        "wait_ns after {elapsed:?} of reads that had to wait: {st:?}"
    );

    // A request queued right now shows in `waiting`; removing the limit
    // lets it go.
    let queued = m.path("queued");
    setfattr(&queued, BPS_RD, "256K");
    let file = open_direct(&queued, false);
    read_range(&file, &q_data, 0, 512 * KIB, 512 * KIB);
    let (tx, rx) = mpsc::channel();
    let reader = open_direct(&queued, false);
    let queued_at = Instant::now();
    thread::spawn(move || {
        let mut buf = vec![0u8; SREQ as usize];
        let res = reader.read_exact_at(&mut buf, 512 * KIB).map(|_| buf);
        drop(reader);
        let _ = tx.send(res);
    });
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut st = stats(&queued);
    while st["waiting"] != 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        st = stats(&queued);
    }
    assert_eq!(st["waiting"], 1, "a read queued for 1.9 s: {st:?}");
    assert_eq!(
        st["read_ops"], 1,
        "a read still queued was already counted as done: {st:?}"
    );
    assert_eq!(st["wait_ns"], 0, "nothing has left the queue yet: {st:?}");
    // Removing the limit releases it at once (it owed about 1.9 s).
    sys_remove_attr(&queued, BPS_RD);
    let removed = Instant::now();
    let got = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("queued read did not complete after removing the limit")
        .expect("queued read failed");
    assert!(
        removed.elapsed() < Duration::from_millis(500),
        "the queued read completed {:?} after its limit was removed",
        removed.elapsed()
    );
    assert!(got[..] == q_data[512 * KIB as usize..(512 * KIB + SREQ) as usize]);
    let total = queued_at.elapsed();
    let st = stats(&queued);
    assert_eq!(st["waiting"], 0, "{st:?}");
    assert_eq!(st["read_ops"], 2, "{st:?}");
    assert_eq!(st["read_bytes"], 512 * KIB + SREQ, "{st:?}");
    // One request waited, for less than the time since it was issued.
    assert!(
        st["wait_ns"] > 0 && st["wait_ns"] as u128 <= total.as_nanos(),
        "wait_ns of one read queued for at most {total:?}: {st:?}"
    );

    // A second later the per-second rates are back to 0; totals stay.
    thread::sleep(Duration::from_millis(1200));
    let st = stats(&free);
    check(&free, &st);
    for key in [
        "read_bytes_per_sec",
        "read_ops_per_sec",
        "write_bytes_per_sec",
        "write_ops_per_sec",
    ] {
        assert_eq!(st[key], 0, "{key} more than a second after the I/O: {st:?}");
    }
}

// ---------------------------------------------------------------------------
// 8. renames and hard links

#[test]
fn rename_and_hard_link_keep_own_limits_and_bucket() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "a", 2 * MIB, 13);
    m.start(&[]);
    let a = m.path("a");
    setfattr(&a, BPS_RD, "1M");

    // 512 KiB at once fills the bucket 0.4 s beyond its capacity.
    let start = Instant::now();
    read_range(&open_direct(&a, false), &data, 0, 512 * KIB, 512 * KIB);

    fs::create_dir(m.path("d")).unwrap();
    let b = m.path("d/b");
    fs::rename(&a, &b).unwrap();
    let c = m.path("c");
    fs::hard_link(&b, &c).unwrap();
    assert!(!a.exists());
    for p in [&b, &c] {
        assert_effective(p, "file", &[("bps_rd", "1048576")]);
        assert_eq!(getfattr(p, BPS_RD).as_deref(), Some("1048576"));
    }

    // The rest through the link: 2 MiB in all since `start`. Had the
    // rename or link given the file a fresh bucket, the last 1.5 MiB alone
    // would only need about 1.3 s.
    let file = open_direct(&c, false);
    read_range(&file, &data, 512 * KIB, 3 * 512 * KIB, REQ);
    let elapsed = start.elapsed();
    let lower = lower_bound(2 * MIB, REQ, MIB);
    assert_elapsed_between(
        "512 KiB before and 1.5 MiB after a rename and link at bps_rd=1M",
        elapsed,
        lower,
        loose_upper(lower),
    );
    assert_effective(&b, "file", &[("bps_rd", "1048576")]);
}
