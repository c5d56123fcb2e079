//! Throttle groups on a real mount: members share the group's buckets on
//! top of their own, get equal shares (in bytes for a bps group, in
//! requests for an iops group) whatever their request sizes and queue
//! depths, a member capped by its own limit leaves the rest to its mates,
//! membership and group limits change live and survive a remount, a
//! group of a thousand members keeps its rate, and bad names, values and
//! command lines are refused; weights and reservations change the shares
//! and are validated, inherited and persisted like the membership.
//!
//! Reads use O_DIRECT and requests of at most 512 KiB, so each one reaches
//! throttlefs as a single FUSE request. Reader threads count what they
//! complete; rates are measured over a window after a warm-up. For a
//! leaky bucket of average `avg` (capacity `avg * 0.1 s` without burst) a
//! request is released while the level is at most the capacity, so within
//! a window of T seconds at most `avg * T + capacity + one request` is
//! released; add the requests already in flight when the window opens (one
//! per reader thread) and that bounds what can complete in the window.
//! That bound is asserted strictly; lower bounds on rates are loose, and
//! shares between members get ±10 %.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::attrs::{cpath, list_attrs, setxattr, sys_get_attr, sys_remove_attr, sys_set_attr};
use common::{
    KIB, MIB, Mount, assert_elapsed_between, describe, loose_upper, rejected, run_unchecked,
};

const GROUP: &str = "user.throttle.group";
const EFFECTIVE: &str = "user.throttle.effective";
const BPS_RD: &str = "user.throttle.bps_rd";

/// Size of each test file; readers wrap around.
const FILE_LEN: u64 = 8 * MIB;

/// Let the readers fill their queues and the buckets settle before a
/// window opens.
const WARM_UP: Duration = Duration::from_millis(600);

/// Allowed deviation of a member's share from its fair share.
const SHARE_TOLERANCE: f64 = 0.10;

// ---------------------------------------------------------------------------
// Attribute helpers (in-process syscalls, from common::attrs: see
// `sys_set_attr` there for why no program is spawned while reads are queued)

/// Asserts that setting `name=value` on `path` fails with `errno`.
fn set_attr_fails(path: &Path, name: &str, value: &str, errno: i32) {
    let got = setxattr(path, name, value.as_bytes()).map_err(|e| e.raw_os_error().unwrap_or(0));
    assert_eq!(
        got,
        Err(errno),
        "setxattr {name}={value:?} on {}: expected {}, got {}",
        path.display(),
        io::Error::from_raw_os_error(errno),
        match got {
            Ok(()) => "success".to_string(),
            Err(e) => io::Error::from_raw_os_error(e).to_string(),
        }
    );
}

/// `user.throttle.group.NAME.stats` of the mount root, parsed: every
/// `key=value` line (repeated `member=` lines collected apart).
struct GroupStats {
    text: String,
    values: BTreeMap<String, String>,
    members: Vec<String>,
}

impl GroupStats {
    fn get(&self, key: &str) -> &str {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("group stats lack {key}: {:?}", self.text))
    }

    fn num(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("group stats {key} is not a number: {:?}", self.text))
    }
}

fn group_stats(m: &Mount, group: &str) -> GroupStats {
    let name = format!("user.throttle.group.{group}.stats");
    let text =
        sys_get_attr(m.mnt(), &name).unwrap_or_else(|| panic!("{name} missing on the mount root"));
    let mut values = BTreeMap::new();
    let mut members = Vec::new();
    for line in text.lines() {
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad group stats line {line:?} in {text:?}"));
        if k == "member" {
            members.push(v.to_string());
        } else {
            assert!(
                values.insert(k.to_string(), v.to_string()).is_none(),
                "group stats repeat {k}: {text:?}"
            );
        }
    }
    let s = GroupStats {
        text,
        values,
        members,
    };
    for key in [
        "source",
        "members",
        "waiting",
        "read_bytes",
        "read_ops",
        "write_bytes",
        "write_ops",
    ] {
        s.get(key);
    }
    let unlisted = s
        .values
        .get("members_unlisted")
        .map_or(0, |v| v.parse::<usize>().expect("members_unlisted"));
    assert_eq!(
        s.num("members") as usize,
        s.members.len() + unlisted,
        "members= does not match the member= lines and members_unlisted=: {:?}",
        s.text
    );
    s
}

/// `user.throttle.effective` of `path` as `key -> value`.
fn effective(path: &Path) -> BTreeMap<String, String> {
    let text = sys_get_attr(path, EFFECTIVE)
        .unwrap_or_else(|| panic!("no {EFFECTIVE} on {}", path.display()));
    text.lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("bad effective line {l:?} in {text:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn assert_group_of(path: &Path, group: Option<&str>, source: Option<&str>) {
    let eff = effective(path);
    assert_eq!(
        (
            eff.get("group").map(String::as_str),
            eff.get("group_source").map(String::as_str)
        ),
        (group, source),
        "group and group_source in {EFFECTIVE} of {}: {eff:?}",
        path.display()
    );
}

// ---------------------------------------------------------------------------
// Readers

/// What one file's readers completed so far.
#[derive(Default)]
struct Counter {
    bytes: AtomicU64,
    ops: AtomicU64,
}

/// Reader threads on one file: each opens the file with O_DIRECT and reads
/// `req` bytes at a time, wrapping around, checking the data, until told
/// to stop. Stopped (not joined) on drop, so a failing test does not leave
/// them reading at full speed.
struct Readers {
    what: String,
    req: u64,
    threads: usize,
    counter: Arc<Counter>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Result<(), String>>>,
}

impl Readers {
    fn start(path: &Path, data: &Arc<Vec<u8>>, req: u64, threads: usize) -> Readers {
        let counter = Arc::new(Counter::default());
        let stop = Arc::new(AtomicBool::new(false));
        let len = data.len() as u64;
        assert_eq!(len % req, 0);
        let handles = (0..threads)
            .map(|i| {
                let (path, data) = (path.to_path_buf(), Arc::clone(data));
                let (counter, stop) = (Arc::clone(&counter), Arc::clone(&stop));
                let first = (len / threads as u64 * i as u64) / req * req;
                thread::spawn(move || {
                    let file = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(&path)
                        .map_err(|e| format!("open {}: {e}", path.display()))?;
                    let mut buf = vec![0u8; req as usize];
                    let mut off = first;
                    while !stop.load(Ordering::SeqCst) {
                        file.read_exact_at(&mut buf, off)
                            .map_err(|e| format!("read {} at {off}: {e}", path.display()))?;
                        if buf[..] != data[off as usize..(off + req) as usize] {
                            return Err(format!("wrong data read at {off} of {}", path.display()));
                        }
                        counter.bytes.fetch_add(req, Ordering::SeqCst);
                        counter.ops.fetch_add(1, Ordering::SeqCst);
                        off = (off + req) % len;
                    }
                    Ok(())
                })
            })
            .collect();
        Readers {
            what: path.file_name().unwrap().to_string_lossy().into_owned(),
            req,
            threads,
            counter,
            stop,
            handles,
        }
    }

    fn bytes(&self) -> u64 {
        self.counter.bytes.load(Ordering::SeqCst)
    }

    fn ops(&self) -> u64 {
        self.counter.ops.load(Ordering::SeqCst)
    }

    /// Bytes that may be in flight (released, not yet counted) at any time.
    fn in_flight(&self) -> u64 {
        self.req * self.threads as u64
    }

    /// Stops the threads and waits for them; panics on a read error.
    /// Returns the bytes read in all.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("reader of {}: {e}", self.what),
                Err(_) => panic!("reader of {} panicked", self.what),
            }
        }
        self.bytes()
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What each reader set moved during a window of `secs` seconds.
struct Window {
    secs: f64,
    bytes: Vec<u64>,
    ops: Vec<u64>,
}

/// Sleeps `warm_up`, then measures what each of `readers` completes in
/// the next `len`.
fn measure(readers: &[&Readers], warm_up: Duration, len: Duration) -> Window {
    thread::sleep(warm_up);
    let t0 = Instant::now();
    let b0: Vec<u64> = readers.iter().map(|r| r.bytes()).collect();
    let o0: Vec<u64> = readers.iter().map(|r| r.ops()).collect();
    thread::sleep(len);
    let b1: Vec<u64> = readers.iter().map(|r| r.bytes()).collect();
    let o1: Vec<u64> = readers.iter().map(|r| r.ops()).collect();
    let secs = t0.elapsed().as_secs_f64();
    let w = Window {
        secs,
        bytes: b1.iter().zip(&b0).map(|(a, b)| a - b).collect(),
        ops: o1.iter().zip(&o0).map(|(a, b)| a - b).collect(),
    };
    // Shown when a test fails.
    for (r, (b, o)) in readers.iter().zip(w.bytes.iter().zip(&w.ops)) {
        eprintln!(
            "{}: {:.3} MiB/s, {:.1} requests/s over {secs:.3} s",
            r.what,
            mib(*b as f64) / secs,
            *o as f64 / secs
        );
    }
    w
}

/// Strict upper bound on what can complete in a window of `secs` under an
/// average of `avg` units/s (no burst), requests of at most `max_req`
/// units, and `in_flight` units possibly released before the window.
fn window_max(avg: f64, secs: f64, max_req: f64, in_flight: f64) -> f64 {
    avg * secs + avg * 0.1 + max_req + in_flight
}

fn mib(bytes: f64) -> f64 {
    bytes / MIB as f64
}

/// Asserts that `got` is within SHARE_TOLERANCE of `fair`.
fn assert_share(what: &str, got: f64, fair: f64, unit: &str) {
    let ratio = got / fair;
    assert!(
        (1.0 - SHARE_TOLERANCE..=1.0 + SHARE_TOLERANCE).contains(&ratio),
        "{what}: {got:.2} {unit}, expected {fair:.2} {unit} ±{:.0} % (ratio {ratio:.3})",
        SHARE_TOLERANCE * 100.0
    );
}

/// Source file `name` (relative to the source dir) of FILE_LEN bytes.
fn make_file(m: &Mount, name: &str, seed: u64) -> Arc<Vec<u8>> {
    Arc::new(common::make_file(m.src(), name, FILE_LEN, seed))
}

// ---------------------------------------------------------------------------
// 1. Equal shares whatever the request sizes and depths; a third member
//    joining live makes them thirds.

#[test]
fn members_share_a_bps_group_equally_and_a_third_joins_live() {
    let mut m = Mount::new();
    let a = make_file(&m, "a", 1);
    let b = make_file(&m, "b", 2);
    let c = make_file(&m, "c", 3);
    m.start(&["--group", "g:bps=8M"]);
    for f in ["a", "b"] {
        sys_set_attr(&m.path(f), GROUP, "g");
        assert_group_of(&m.path(f), Some("g"), Some("file"));
    }
    let avg = 8.0 * MIB as f64;

    // a: one reader of 512 KiB; b: four readers of 64 KiB.
    let ra = Readers::start(&m.path("a"), &a, 512 * KIB, 1);
    let rb = Readers::start(&m.path("b"), &b, 64 * KIB, 4);
    let w = measure(&[&ra, &rb], WARM_UP, Duration::from_secs(3));
    let total = (w.bytes[0] + w.bytes[1]) as f64;
    let max = window_max(
        avg,
        w.secs,
        (512 * KIB) as f64,
        (ra.in_flight() + rb.in_flight()) as f64,
    );
    assert!(
        total <= max,
        "two members moved {:.2} MiB in {:.3} s, more than a bps=8M group allows ({:.2} MiB): {:?}",
        mib(total),
        w.secs,
        mib(max),
        w.bytes
    );
    let s = group_stats(&m, "g");
    for (i, f) in ["a", "b"].iter().enumerate() {
        assert_share(
            &format!("{f}'s rate with two members in a bps=8M group"),
            mib(w.bytes[i] as f64) / w.secs,
            4.0,
            "MiB/s",
        );
    }
    assert_eq!(s.get("source"), "mount", "group stats:\n{}", s.text);
    assert_eq!(s.get("bps"), "8388608", "group stats:\n{}", s.text);
    let mut members = s.members.clone();
    members.sort();
    assert_eq!(members, ["/a", "/b"], "group stats:\n{}", s.text);
    assert!(
        s.num("read_bytes") > 0 && s.num("read_ops") > 0,
        "{}",
        s.text
    );

    // c joins live, with two readers of 128 KiB.
    sys_set_attr(&m.path("c"), GROUP, "g");
    let rc = Readers::start(&m.path("c"), &c, 128 * KIB, 2);
    let w = measure(&[&ra, &rb, &rc], WARM_UP, Duration::from_secs(3));
    let total: f64 = w.bytes.iter().sum::<u64>() as f64;
    let in_flight = (ra.in_flight() + rb.in_flight() + rc.in_flight()) as f64;
    let max = window_max(avg, w.secs, (512 * KIB) as f64, in_flight);
    assert!(
        total <= max,
        "three members moved {:.2} MiB in {:.3} s, more than a bps=8M group allows ({:.2} MiB): {:?}",
        mib(total),
        w.secs,
        mib(max),
        w.bytes
    );
    for (i, f) in ["a", "b", "c"].iter().enumerate() {
        assert_share(
            &format!("{f}'s rate with three members in a bps=8M group"),
            mib(w.bytes[i] as f64) / w.secs,
            8.0 / 3.0,
            "MiB/s",
        );
    }
    let s = group_stats(&m, "g");
    assert_eq!(s.num("members"), 3, "group stats:\n{}", s.text);
    let read = ra.finish() + rb.finish() + rc.finish();
    // Everything the readers moved went through the group.
    let s = group_stats(&m, "g");
    assert_eq!(s.num("read_bytes"), read, "group stats:\n{}", s.text);
    assert_eq!(s.num("waiting"), 0, "group stats:\n{}", s.text);
    assert_eq!(s.num("write_bytes"), 0, "group stats:\n{}", s.text);
}

// ---------------------------------------------------------------------------
// 2. A member capped by its own limit does not hold its mate back.

#[test]
fn member_with_own_limit_leaves_the_rest_to_its_mate() {
    let mut m = Mount::new();
    fs::create_dir(m.src_path("vm")).unwrap();
    let capped = make_file(&m, "vm/capped", 4);
    let mate = make_file(&m, "vm/mate", 5);
    m.start(&["--group", "g:bps=8M"]);
    // Membership through the directory; the own limit on the file.
    sys_set_attr(&m.path("vm"), GROUP, "g");
    sys_set_attr(&m.path("vm/capped"), BPS_RD, "2M");
    for f in ["vm/capped", "vm/mate"] {
        assert_group_of(&m.path(f), Some("g"), Some("directory:/vm"));
    }
    assert_eq!(
        effective(&m.path("vm/capped"))
            .get("bps_rd")
            .map(String::as_str),
        Some("2097152")
    );

    let req = 128 * KIB;
    let rc = Readers::start(&m.path("vm/capped"), &capped, req, 2);
    let rm = Readers::start(&m.path("vm/mate"), &mate, req, 2);
    let w = measure(&[&rc, &rm], WARM_UP, Duration::from_secs(3));
    rc.finish();
    rm.finish();
    let (cb, mb) = (w.bytes[0] as f64, w.bytes[1] as f64);

    let own_max = window_max(2.0 * MIB as f64, w.secs, req as f64, (2 * req) as f64);
    assert!(
        cb <= own_max,
        "the member with bps_rd=2M moved {:.2} MiB in {:.3} s, more than its own limit allows ({:.2} MiB)",
        mib(cb),
        w.secs,
        mib(own_max)
    );
    let group_max = window_max(8.0 * MIB as f64, w.secs, req as f64, (4 * req) as f64);
    assert!(
        cb + mb <= group_max,
        "the group moved {:.2} MiB in {:.3} s, more than bps=8M allows ({:.2} MiB)",
        mib(cb + mb),
        w.secs,
        mib(group_max)
    );
    let capped_rate = mib(cb) / w.secs;
    assert!(
        capped_rate >= 2.0 * 0.8,
        "the member with bps_rd=2M only got {capped_rate:.2} MiB/s"
    );
    assert_share(
        "rate of the mate of a member capped at 2 MiB/s in a bps=8M group",
        mib(mb) / w.secs,
        6.0,
        "MiB/s",
    );
}

// ---------------------------------------------------------------------------
// 3. An iops group shares operations, not bytes.

#[test]
fn iops_group_shares_operations_equally() {
    let mut m = Mount::new();
    let small = make_file(&m, "small", 6);
    let big = make_file(&m, "big", 7);
    m.start(&["--group", "g:iops=100"]);
    sys_set_attr(&m.path("small"), GROUP, "g");
    sys_set_attr(&m.path("big"), GROUP, "g");

    let rs = Readers::start(&m.path("small"), &small, 4 * KIB, 2);
    let rb = Readers::start(&m.path("big"), &big, 256 * KIB, 2);
    let w = measure(
        &[&rs, &rb],
        Duration::from_millis(500),
        Duration::from_secs(3),
    );
    rs.finish();
    rb.finish();
    let total = (w.ops[0] + w.ops[1]) as f64;
    let max = window_max(100.0, w.secs, 1.0, 4.0);
    assert!(
        total <= max,
        "the group completed {total} requests in {:.3} s, more than iops=100 allows ({max:.1}): {:?}",
        w.secs,
        w.ops
    );
    assert!(
        total >= 100.0 * w.secs * 0.75,
        "the group completed only {total} requests in {:.3} s under iops=100",
        w.secs
    );
    let fair = total / 2.0;
    assert_share("4 KiB member's requests", w.ops[0] as f64, fair, "requests");
    assert_share(
        "256 KiB member's requests",
        w.ops[1] as f64,
        fair,
        "requests",
    );
    let s = group_stats(&m, "g");
    assert_eq!(s.get("iops"), "100", "group stats:\n{}", s.text);
    assert!(!s.values.contains_key("bps"), "group stats:\n{}", s.text);
}

// ---------------------------------------------------------------------------
// 4. Group limits and membership set through xattrs survive a remount.

/// `getfattr -n NAME --only-values` on a source object (bypassing the
/// mount); `None` when it has no such attribute.
fn getfattr_src(path: &Path, name: &str) -> Option<String> {
    let args = [
        OsStr::new("--absolute-names"),
        OsStr::new("-n"),
        OsStr::new(name),
        OsStr::new("--only-values"),
        path.as_os_str(),
    ];
    let out = run_unchecked("getfattr", &args);
    if out.status.success() {
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("No such attribute"),
            "{}",
            describe("getfattr", &args, &out)
        );
        None
    }
}

#[test]
fn group_limits_and_membership_survive_a_remount() {
    let mut m = Mount::new();
    fs::create_dir(m.src_path("d")).unwrap();
    let data = make_file(&m, "d/f", 8);
    m.start(&[]);
    sys_set_attr(m.mnt(), "user.throttle.group.g2.bps", "4M");
    sys_set_attr(&m.path("d"), GROUP, "g2");
    assert_eq!(
        sys_get_attr(m.mnt(), "user.throttle.group.g2.bps").as_deref(),
        Some("4194304")
    );
    assert_group_of(&m.path("d/f"), Some("g2"), Some("directory:/d"));
    let s = group_stats(&m, "g2");
    assert_eq!(s.get("source"), "root", "group stats:\n{}", s.text);
    assert_eq!(s.get("bps"), "4194304", "group stats:\n{}", s.text);

    // Stored on the source, in canonical form.
    assert_eq!(
        getfattr_src(m.src(), "user.throttle.group.g2.bps").as_deref(),
        Some("4194304")
    );
    assert_eq!(getfattr_src(&m.src_path("d"), GROUP).as_deref(), Some("g2"));
    assert_eq!(getfattr_src(&m.src_path("d/f"), GROUP), None);

    let status = m.terminate();
    assert!(status.success(), "first daemon exited with {status}");
    let m2 = Mount::with_source(m.src(), &[]);
    let f = m2.path("d/f");
    assert_group_of(&f, Some("g2"), Some("directory:/d"));
    let s = group_stats(&m2, "g2");
    assert_eq!(s.get("source"), "root", "group stats:\n{}", s.text);
    assert_eq!(s.get("bps"), "4194304", "group stats:\n{}", s.text);
    assert!(
        list_attrs(m2.mnt()).contains(&"user.throttle.group.g2.bps".to_string()),
        "the root does not list the group limit"
    );

    // 6 MiB in 128 KiB requests under the group's 4 MiB/s.
    let (len, req, avg) = (6 * MIB, 128 * KIB, 4 * MIB);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&f)
        .unwrap();
    let mut buf = vec![0u8; req as usize];
    let start = Instant::now();
    for off in (0..len).step_by(req as usize) {
        file.read_exact_at(&mut buf, off).unwrap();
        assert!(buf[..] == data[off as usize..(off + req) as usize]);
    }
    let elapsed = start.elapsed();
    let lower = (len as f64 - req as f64 - avg as f64 * 0.1) / avg as f64;
    assert_elapsed_between(
        "6 MiB read in group g2 (bps=4M set on the root) after a remount",
        elapsed,
        lower,
        loose_upper(lower),
    );
    let s = group_stats(&m2, "g2");
    assert_eq!(s.members, ["/d/f"], "group stats:\n{}", s.text);
    assert_eq!(s.num("read_bytes"), len, "group stats:\n{}", s.text);
    assert_eq!(s.num("read_ops"), len / req, "group stats:\n{}", s.text);
    drop(file);
}

// ---------------------------------------------------------------------------
// Group stats: where the limits come from, whole sets, unlisted on the root.

#[test]
fn group_stats_show_the_source_of_limits_and_are_unlisted_on_the_root() {
    let mut m = Mount::new();
    fs::write(m.src_path("f"), b"x").unwrap();
    m.start(&["--group", "t1:bps=8M"]);
    let s = group_stats(&m, "t1");
    assert_eq!(s.get("source"), "mount", "group stats:\n{}", s.text);
    assert_eq!(s.get("bps"), "8388608", "group stats:\n{}", s.text);
    assert_eq!(s.num("members"), 0, "group stats:\n{}", s.text);
    assert_eq!(s.num("waiting"), 0, "group stats:\n{}", s.text);

    // A set on the root replaces the option's as a whole.
    sys_set_attr(m.mnt(), "user.throttle.group.t1.iops", "100");
    let s = group_stats(&m, "t1");
    assert_eq!(s.get("source"), "root", "group stats:\n{}", s.text);
    assert_eq!(s.get("iops"), "100", "group stats:\n{}", s.text);
    assert!(!s.values.contains_key("bps"), "group stats:\n{}", s.text);
    sys_remove_attr(m.mnt(), "user.throttle.group.t1.iops");
    let s = group_stats(&m, "t1");
    assert_eq!(s.get("source"), "mount", "group stats:\n{}", s.text);
    assert_eq!(s.get("bps"), "8388608", "group stats:\n{}", s.text);

    // A group named nowhere.
    sys_set_attr(&m.path("f"), GROUP, "t3");
    let s = group_stats(&m, "t3");
    assert_eq!(s.get("source"), "none", "group stats:\n{}", s.text);

    // The stored group limit is listed; the read-only stats are not (so
    // copy tools do not try to write them back) but are readable by name
    // and refused for writing.
    sys_set_attr(m.mnt(), "user.throttle.group.t2.bps_wr", "1M");
    let names = list_attrs(m.mnt());
    assert!(
        names.iter().any(|n| n == "user.throttle.group.t2.bps_wr"),
        "listxattr on the mount root lacks the group limit: {names:?}"
    );
    for group in ["t1", "t2"] {
        let name = format!("user.throttle.group.{group}.stats");
        assert!(
            !names.contains(&name),
            "listxattr on the mount root lists {name}: {names:?}"
        );
        assert!(
            sys_get_attr(m.mnt(), &name).is_some_and(|t| t.contains("source=")),
            "{name} is not readable by name"
        );
        let r = setxattr(m.mnt(), &name, b"x");
        assert_eq!(
            r.as_ref().err().and_then(|e| e.raw_os_error()),
            Some(libc::EPERM),
            "setxattr {name}: {r:?}"
        );
        let (path, cname) = (
            cpath(m.mnt()),
            std::ffi::CString::new(name.clone()).unwrap(),
        );
        // SAFETY: valid NUL-terminated strings.
        let r = unsafe { libc::removexattr(path.as_ptr(), cname.as_ptr()) };
        let err = std::io::Error::last_os_error();
        assert!(
            r == -1 && err.raw_os_error() == Some(libc::EPERM),
            "removexattr {name}: {r} {err}"
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Invalid input.

#[test]
fn invalid_group_attributes_are_refused() {
    let mut m = Mount::new();
    fs::create_dir(m.src_path("d")).unwrap();
    fs::write(m.src_path("d/f"), b"x").unwrap();
    m.start(&["--group", "g:bps=1M"]);
    let (root, d, f) = (m.mnt().to_path_buf(), m.path("d"), m.path("d/f"));

    let long = "n".repeat(65);
    for target in [&f, &d] {
        for bad in ["bad name", long.as_str(), "a/b", "", "ä"] {
            set_attr_fails(target, GROUP, bad, libc::EINVAL);
        }
    }
    assert_eq!(getfattr_src(&m.src_path("d/f"), GROUP), None);
    assert_eq!(getfattr_src(&m.src_path("d"), GROUP), None);
    assert_group_of(&f, None, None);
    // 64 characters is fine.
    let longest = "n".repeat(64);
    sys_set_attr(&f, GROUP, &longest);
    assert_group_of(&f, Some(&longest), Some("file"));

    set_attr_fails(&root, "user.throttle.group.g.bps", "banana", libc::EINVAL);
    for target in [&d, &f] {
        set_attr_fails(target, "user.throttle.group.g.bps", "1M", libc::EINVAL);
    }
    assert_eq!(
        getfattr_src(&m.src_path("d"), "user.throttle.group.g.bps"),
        None
    );
    assert_eq!(
        getfattr_src(&m.src_path("d/f"), "user.throttle.group.g.bps"),
        None
    );
    let s = group_stats(&m, "g");
    assert_eq!(s.get("source"), "mount", "group stats:\n{}", s.text);

    sys_set_attr(&root, "user.throttle.group.g.bps", "2M");
    set_attr_fails(&root, "user.throttle.group.g.bps_rd", "1M", libc::EINVAL);
    assert_eq!(getfattr_src(m.src(), "user.throttle.group.g.bps_rd"), None);
    let s = group_stats(&m, "g");
    assert_eq!(s.get("source"), "root", "group stats:\n{}", s.text);
    assert_eq!(s.get("bps"), "2097152", "group stats:\n{}", s.text);
    assert!(!s.values.contains_key("bps_rd"), "group stats:\n{}", s.text);

    set_attr_fails(&root, "user.throttle.group.g.stats", "1", libc::EPERM);
    assert_eq!(getfattr_src(m.src(), "user.throttle.group.g.stats"), None);
}

#[test]
fn cli_group_with_bad_name() {
    rejected(&["--group", "bad name:bps=1M"], &["group"]);
}

#[test]
fn cli_group_with_conflicting_limits() {
    rejected(&["--group", "g:bps=1M,bps_rd=1M"], &["group"]);
}

#[test]
fn cli_group_without_limits() {
    rejected(&["--group", "g"], &["group"]);
}

#[test]
fn cli_group_given_twice() {
    rejected(&["--group", "g:bps=1M", "--group", "g:bps=2M"], &["group"]);
}

// ---------------------------------------------------------------------------
// 6. Leaving a group live.

#[test]
fn a_member_leaving_reads_at_full_speed_while_its_mate_keeps_the_limit() {
    let mut m = Mount::new();
    let a = make_file(&m, "a", 9);
    let b = make_file(&m, "b", 10);
    m.start(&["--group", "g:bps=4M"]);
    sys_set_attr(&m.path("a"), GROUP, "g");
    sys_set_attr(&m.path("b"), GROUP, "g");
    let req = 256 * KIB;
    let avg = 4.0 * MIB as f64;

    let ra = Readers::start(&m.path("a"), &a, req, 1);
    let rb = Readers::start(&m.path("b"), &b, req, 1);
    let w = measure(
        &[&ra, &rb],
        Duration::from_millis(400),
        Duration::from_millis(1500),
    );
    let max = window_max(avg, w.secs, req as f64, (2 * req) as f64);
    let total = (w.bytes[0] + w.bytes[1]) as f64;
    assert!(
        total <= max,
        "two members moved {:.2} MiB in {:.3} s, more than bps=4M allows ({:.2} MiB)",
        mib(total),
        w.secs,
        mib(max)
    );
    let s = group_stats(&m, "g");
    assert_eq!(s.num("members"), 2, "group stats:\n{}", s.text);

    // a leaves while both are reading.
    sys_remove_attr(&m.path("a"), GROUP);
    let s = group_stats(&m, "g");
    assert_eq!(
        s.members,
        ["/b"],
        "group stats after /a left the group:\n{}",
        s.text
    );
    assert_group_of(&m.path("a"), None, None);
    assert_group_of(&m.path("b"), Some("g"), Some("file"));

    let w = measure(
        &[&ra, &rb],
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    ra.finish();
    rb.finish();
    let (ab, bb) = (w.bytes[0] as f64, w.bytes[1] as f64);
    let limited = window_max(avg, w.secs, req as f64, req as f64);
    assert!(
        ab > 2.0 * limited,
        "after leaving the group a moved only {:.2} MiB in {:.3} s (a bps=4M group allows {:.2} MiB): still limited?",
        mib(ab),
        w.secs,
        mib(limited)
    );
    assert!(
        bb <= limited,
        "the remaining member moved {:.2} MiB in {:.3} s, more than bps=4M allows ({:.2} MiB)",
        mib(bb),
        w.secs,
        mib(limited)
    );
    assert!(
        mib(bb) / w.secs >= 4.0 * 0.7,
        "the remaining member got only {:.2} MiB/s of a bps=4M group",
        mib(bb) / w.secs
    );
}

// ---------------------------------------------------------------------------
// 7. A large group keeps its rate.

/// Members of the large group, made members by their directory's xattr.
const LARGE_GROUP_MEMBERS: usize = 1000;
/// The large group's limit; its bucket holds a tenth of a second of it.
const LARGE_GROUP_IOPS: u64 = 2000;
/// Reads of each member: 6000 in all, three seconds at the limit.
const READS_PER_MEMBER: usize = 6;
/// Reader threads; each keeps one read outstanding and cycles over its
/// share of the members, so every member gets requests, one at a time.
const LARGE_GROUP_READERS: usize = 16;
const LARGE_GROUP_REQ_BYTES: u64 = 4 * KIB;

/// The daemon keeps descriptors for each open member: let it (a child of
/// this process) have as many as the hard limit allows.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn a_thousand_member_group_reaches_its_limit_and_never_exceeds_it() {
    raise_nofile_limit();
    let mut m = Mount::new();
    fs::create_dir(m.src_path("big")).unwrap();
    let data: Vec<Vec<u8>> = (0..LARGE_GROUP_MEMBERS)
        .map(|i| {
            common::make_file(
                m.src(),
                &format!("big/{i}"),
                LARGE_GROUP_REQ_BYTES,
                100 + i as u64,
            )
        })
        .collect();
    let data = Arc::new(data);
    m.start(&["--group", &format!("big:iops_rd={LARGE_GROUP_IOPS}")]);
    sys_set_attr(&m.path("big"), GROUP, "big");

    // Open every member first, so that the timed part is reads only.
    let files: Vec<Vec<(usize, fs::File)>> = (0..LARGE_GROUP_READERS)
        .map(|t| {
            (t..LARGE_GROUP_MEMBERS)
                .step_by(LARGE_GROUP_READERS)
                .map(|i| (i, common::open_direct(&m.path(&format!("big/{i}")), false)))
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    let readers: Vec<JoinHandle<Result<(), String>>> = files
        .into_iter()
        .map(|mine| {
            let data = Arc::clone(&data);
            thread::spawn(move || {
                let mut buf = vec![0u8; LARGE_GROUP_REQ_BYTES as usize];
                for _ in 0..READS_PER_MEMBER {
                    for (i, file) in &mine {
                        file.read_exact_at(&mut buf, 0)
                            .map_err(|e| format!("read member {i}: {e}"))?;
                        if buf != data[*i] {
                            return Err(format!("wrong data read from member {i}"));
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for r in readers {
        r.join().expect("reader panicked").unwrap();
    }
    let elapsed = t0.elapsed();

    let reads = (LARGE_GROUP_MEMBERS * READS_PER_MEMBER) as f64;
    let rate = LARGE_GROUP_IOPS as f64;
    // The bucket (a tenth of a second) plus one request may go at once;
    // every other read waits for the group to leak one.
    let lower = (reads - rate * 0.1 - 1.0) / rate;
    let got = reads / elapsed.as_secs_f64();
    eprintln!("{reads} reads in {elapsed:?}: {got:.0} requests/s");
    assert_elapsed_between(
        &format!(
            "{reads} reads of a {LARGE_GROUP_MEMBERS}-member group under iops_rd={LARGE_GROUP_IOPS}"
        ),
        elapsed,
        lower,
        loose_upper(reads / rate),
    );
    assert!(
        got >= rate * (1.0 - SHARE_TOLERANCE),
        "a {LARGE_GROUP_MEMBERS}-member group reached only {got:.0} of its {rate} requests/s"
    );
    let s = group_stats(&m, "big");
    assert_eq!(s.num("members"), LARGE_GROUP_MEMBERS as u64, "{}", s.text);
    assert_eq!(s.num("read_ops"), reads as u64, "{}", s.text);
    assert_eq!(s.num("waiting"), 0, "{}", s.text);
}

/// Members of a group too large to list in one attribute value.
const UNLISTABLE_GROUP_MEMBERS: usize = 5000;

#[test]
fn stats_of_a_group_too_large_to_list_count_the_members_left_out() {
    raise_nofile_limit();
    let mut m = Mount::new();
    fs::create_dir(m.src_path("many")).unwrap();
    for i in 0..UNLISTABLE_GROUP_MEMBERS {
        fs::write(m.src_path(&format!("many/member-file-{i:05}.img")), b"x").unwrap();
    }
    m.start(&["--group", "many:iops_rd=1000"]);
    sys_set_attr(&m.path("many"), GROUP, "many");
    // Opening a file makes it a member the scheduler knows.
    for i in 0..UNLISTABLE_GROUP_MEMBERS {
        drop(fs::File::open(m.path(&format!("many/member-file-{i:05}.img"))).unwrap());
    }
    let s = group_stats(&m, "many");
    assert!(s.text.len() <= 64 * 1024, "{} bytes", s.text.len());
    let listed = s.members.len() as u64;
    assert_eq!(s.num("members"), UNLISTABLE_GROUP_MEMBERS as u64);
    assert!(listed > 1000, "only {listed} members listed");
    assert_eq!(
        listed + s.num("members_unlisted"),
        UNLISTABLE_GROUP_MEMBERS as u64,
        "listed {listed}"
    );
    assert_eq!(s.num("waiting"), 0, "{}", &s.text[s.text.len() - 200..]);
}

#[test]
fn bytes_a_short_read_did_not_move_go_back_to_the_group() {
    // Group bps_rd=1M: its bucket holds 102.4 KiB. A 1 MiB read of a
    // 64 KiB file is charged 1 MiB at release; if only the file got the
    // 960 KiB back, the mate's read would wait until the group's bucket
    // drained to its capacity, about 0.9 s.
    let mut m = Mount::new();
    fs::create_dir(m.src_path("t")).unwrap();
    fs::write(m.src_path("t/short"), vec![7u8; 64 * KIB as usize]).unwrap();
    fs::write(m.src_path("t/mate"), vec![9u8; 4 * KIB as usize]).unwrap();
    m.start(&["--group", "t:bps_rd=1M"]);
    sys_set_attr(&m.path("t"), GROUP, "t");
    let mut buf = vec![0u8; MIB as usize];
    let short = fs::File::open(m.path("t/short")).unwrap();
    let n = short.read_at(&mut buf, 0).unwrap();
    assert_eq!(n, 64 * KIB as usize);
    let mate = fs::File::open(m.path("t/mate")).unwrap();
    let t0 = Instant::now();
    let n = mate.read_at(&mut buf[..4 * KIB as usize], 0).unwrap();
    let took = t0.elapsed();
    assert_eq!(n, 4 * KIB as usize);
    assert!(
        took < Duration::from_millis(450),
        "the mate's 4 KiB read waited {took:?}: the group kept the short read's charge"
    );
}

// ---------------------------------------------------------------------------
// 6. Weights and reservations (issue 17, part 1).

const WEIGHT: &str = "user.throttle.weight";
const RESERVE_IOPS: &str = "user.throttle.reserve_iops";
const RESERVE_BPS: &str = "user.throttle.reserve_bps";

#[test]
fn weights_two_to_one_and_a_reservation_share_a_saturated_group() {
    let mut m = Mount::new();
    let a = make_file(&m, "a", 11);
    let b = make_file(&m, "b", 12);
    m.start(&["--group", "g:iops=300"]);
    for f in ["a", "b"] {
        sys_set_attr(&m.path(f), GROUP, "g");
    }
    sys_set_attr(&m.path("b"), WEIGHT, "200");
    // Four readers each (four requests queued), 4 KiB and 64 KiB: shares
    // by requests, whatever the sizes.
    let ra = Readers::start(&m.path("a"), &a, 4 * KIB, 4);
    let rb = Readers::start(&m.path("b"), &b, 64 * KIB, 4);
    let w = measure(&[&ra, &rb], WARM_UP, Duration::from_secs(3));
    let total = (w.ops[0] + w.ops[1]) as f64;
    let max = window_max(300.0, w.secs, 1.0, 8.0);
    assert!(
        total <= max,
        "{total} requests in {:.3} s: {:?}",
        w.secs,
        w.ops
    );
    let ratio = w.ops[1] as f64 / w.ops[0] as f64;
    assert!(
        (1.6..=2.5).contains(&ratio),
        "weights 100:200 gave {:?} requests (ratio {ratio:.2}), expected about 1:2",
        w.ops
    );

    // Live: a reserves 200 of the group's 300 requests/s, more than its
    // weighted third: it gets about 200, b the rest.
    sys_set_attr(&m.path("a"), RESERVE_IOPS, "200");
    let w = measure(&[&ra, &rb], WARM_UP, Duration::from_secs(3));
    let a_rate = w.ops[0] as f64 / w.secs;
    assert!(
        a_rate >= 200.0 * 0.85,
        "a reserved 200 requests/s and got {a_rate:.1}: {:?}",
        w.ops
    );
    assert!(w.ops[0] > w.ops[1], "{:?}", w.ops);
    let s = group_stats(&m, "g");
    assert_eq!(s.num("reserved_iops"), 200, "group stats:\n{}", s.text);
    assert_eq!(s.num("oversubscribed"), 0, "group stats:\n{}", s.text);
    assert!(s.num("reserved_releases") > 0, "group stats:\n{}", s.text);
    ra.finish();
    rb.finish();
    let eff = effective(&m.path("a"));
    assert_eq!(eff.get("reserve_iops").map(String::as_str), Some("200"));
    assert_eq!(
        eff.get("reserve_iops_source").map(String::as_str),
        Some("file")
    );
    assert_eq!(
        eff.get("weight_source").map(String::as_str),
        Some("default")
    );
    sys_set_attr(&m.path("b"), RESERVE_IOPS, "200");
    let s = group_stats(&m, "g");
    assert_eq!(s.num("reserved_iops"), 400, "group stats:\n{}", s.text);
    assert_eq!(s.num("oversubscribed"), 1, "group stats:\n{}", s.text);
}

#[test]
fn weight_and_reservations_are_validated_inherited_and_persist() {
    let mut m = Mount::new();
    fs::create_dir(m.src_path("d")).unwrap();
    fs::write(m.src_path("d/f"), b"x").unwrap();
    fs::write(m.src_path("lone"), b"x").unwrap();
    m.start(&[]);
    let (d, f, lone) = (m.path("d"), m.path("d/f"), m.path("lone"));
    sys_set_attr(&d, GROUP, "g");
    sys_set_attr(&d, WEIGHT, "300");
    sys_set_attr(&f, RESERVE_BPS, "1M");
    for bad in ["0", "10001", "ten", "-1", ""] {
        set_attr_fails(&d, WEIGHT, bad, libc::EINVAL);
    }
    set_attr_fails(&f, RESERVE_IOPS, "1K", libc::EINVAL);
    set_attr_fails(&f, RESERVE_BPS, "lots", libc::EINVAL);
    // Refused values leave the old ones.
    assert_eq!(sys_get_attr(&d, WEIGHT).as_deref(), Some("300"));
    assert_eq!(getfattr_src(&m.src_path("d/f"), RESERVE_IOPS), None);
    // Stored in canonical form, inherited like the group.
    assert_eq!(
        getfattr_src(&m.src_path("d/f"), RESERVE_BPS).as_deref(),
        Some("1048576")
    );
    let check = |m: &Mount| {
        let eff = effective(&m.path("d/f"));
        assert_eq!(
            eff.get("weight").map(String::as_str),
            Some("300"),
            "{eff:?}"
        );
        assert_eq!(
            eff.get("weight_source").map(String::as_str),
            Some("directory:/d"),
            "{eff:?}"
        );
        assert_eq!(
            eff.get("reserve_bps").map(String::as_str),
            Some("1048576"),
            "{eff:?}"
        );
        assert!(!eff.contains_key("qos"), "{eff:?}");
    };
    check(&m);
    // Outside a group a reservation is kept but does nothing, and says so.
    sys_set_attr(&lone, RESERVE_IOPS, "50");
    let eff = effective(&lone);
    assert_eq!(eff.get("reserve_iops").map(String::as_str), Some("50"));
    assert_eq!(
        eff.get("qos").map(String::as_str),
        Some("inert (in no group)")
    );

    // The command line sets, shows and removes them too.
    let bin = common::binary();
    let lone_s = lone.to_str().unwrap();
    common::run(
        bin,
        &["set", "--weight", "50", "-o", "reserve_bps=2M", lone_s],
    );
    assert_eq!(sys_get_attr(&lone, WEIGHT).as_deref(), Some("50"));
    assert_eq!(sys_get_attr(&lone, RESERVE_BPS).as_deref(), Some("2097152"));
    let out = common::run(bin, &["get", lone_s]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("weight=50 (from file)"), "{text}");
    assert!(text.contains("inert"), "{text}");
    let bad = run_unchecked(bin, &["set", "--weight", "0", lone_s]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("weight: 0 is out of range"),
        "{}",
        describe(bin, &["set", "--weight", "0", lone_s], &bad)
    );
    common::run(bin, &["unset", lone_s, "weight", "reserve_bps"]);
    assert_eq!(sys_get_attr(&lone, WEIGHT), None);
    assert_eq!(sys_get_attr(&lone, RESERVE_BPS), None);

    let status = m.terminate();
    assert!(status.success(), "first daemon exited with {status}");
    let m2 = Mount::with_source(m.src(), &[]);
    check(&m2);
    assert_eq!(
        sys_get_attr(&m2.path("lone"), RESERVE_IOPS).as_deref(),
        Some("50")
    );
}
