//! `--passthrough` (kernel FUSE passthrough) on a real mount: a file with
//! no limit in force when it is opened is read and written by the kernel
//! straight from the source file, never through the daemon; everything
//! else keeps the throttled path.
//!
//! A handle in passthrough is recognised by what the daemon does not see:
//! its reads and writes are not in `user.throttle.stats`, and the file's
//! `passthrough_handles` (in `stats`, and in `effective` while it is not
//! 0) counts it. Data is compared with the same operations done on a copy
//! in the source directory. Timed reads use the strict lower bound of
//! tests/rates.rs: N bytes in requests of R under `avg` B/s cannot take
//! less than (N - R - 0.1 avg) / avg seconds.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::aio::AlignedBuf;
use common::attrs::{stats, sys_get_attr, sys_set_attr};
use common::{
    KIB, MIB, Mount, assert_elapsed_between, ctl_ok, loose_upper, make_file, pattern, run, setfattr,
};

const EFFECTIVE: &str = "user.throttle.effective";
const PASSTHROUGH_HANDLES: &str = "passthrough_handles";

/// The timed reads: 8 MiB in 1 MiB requests under bps_rd=4M.
const TIMED_BYTES: u64 = 8 * MIB;
const TIMED_REQ_BYTES: u64 = MIB;
const TIMED_BPS: u64 = 4 * MIB;

fn effective(path: &Path) -> String {
    sys_get_attr(path, EFFECTIVE).unwrap_or_else(|| panic!("no {EFFECTIVE} on {}", path.display()))
}

/// `passthrough_handles` of `user.throttle.stats`, checked against
/// `user.throttle.effective` (which names it only when it is not 0).
/// The two are read one after the other, so a release that the kernel
/// sends in between (it sends it after close returned) changes the count
/// under them: read again until they agree, for at most a second.
fn passthrough_handles(path: &Path) -> u64 {
    let agree = |n: u64, eff: &str| {
        if n == 0 {
            !eff.contains(PASSTHROUGH_HANDLES)
        } else {
            eff.ends_with(&format!("{PASSTHROUGH_HANDLES}={n}\n"))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let n = stats(path)[PASSTHROUGH_HANDLES];
        let eff = effective(path);
        if agree(n, &eff) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "stats say {n}, effective:\n{eff}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to 5 s) until the file has `n` handles in passthrough: the
/// kernel sends a release after the close has returned.
fn wait_passthrough_handles(path: &Path, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while passthrough_handles(path) != n {
        assert!(
            Instant::now() < deadline,
            "{}: passthrough_handles stays {}, not {n}",
            path.display(),
            passthrough_handles(path)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes the daemon read and wrote for the file.
fn daemon_bytes(path: &Path) -> (u64, u64) {
    let s = stats(path);
    (s["read_bytes"], s["write_bytes"])
}

fn open_rw(path: &Path, flags: i32) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Reads `len` bytes from the start in requests of `req`; the time taken.
fn timed_read(file: &File, expected: &[u8], req: u64) -> Duration {
    let mut buf = AlignedBuf::zeroed(req as usize);
    let start = Instant::now();
    for off in (0..expected.len() as u64).step_by(req as usize) {
        file.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf[..] == expected[off as usize..(off + req) as usize],
            "wrong data read at {off}"
        );
    }
    start.elapsed()
}

fn timed_lower_bound() -> f64 {
    (TIMED_BYTES - TIMED_REQ_BYTES) as f64 / TIMED_BPS as f64 - 0.1
}

/// The same writes on `file` (through the mount) and on `reference` (the
/// plain source): unaligned ones, one past the end, and aligned O_DIRECT
/// ones through a second handle of each.
fn write_both(mount_path: &Path, reference: &Path) {
    for (path, counted) in [(mount_path, true), (reference, false)] {
        let f = open_rw(path, 0);
        if counted {
            assert_eq!(passthrough_handles(path), 1);
        }
        let patch = pattern(10_000, 2);
        f.write_all_at(&patch, 12_345).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(&patch, len - 100).unwrap();
        let direct = open_rw(path, libc::O_DIRECT);
        if counted {
            assert_eq!(passthrough_handles(path), 2, "the O_DIRECT handle too");
        }
        let block = AlignedBuf::from_slice(&pattern(64 * KIB as usize, 3));
        direct.write_all_at(&block, 3 * MIB).unwrap();
        let mut back = AlignedBuf::zeroed(64 * KIB as usize);
        direct.read_exact_at(&mut back, 3 * MIB).unwrap();
        assert!(back[..] == block[..], "O_DIRECT read back");
        direct.sync_all().unwrap();
    }
}

#[test]
fn an_unlimited_file_is_read_and_written_in_passthrough_like_the_source() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", TIMED_BYTES, 1);
    fs::write(m.src_path("ref.img"), &data).unwrap();
    m.start(&["--passthrough"]);
    let path = m.path("disk.img");
    assert_eq!(passthrough_handles(&path), 0, "nothing open yet");
    let f = File::open(&path).unwrap();
    assert_eq!(passthrough_handles(&path), 1);
    timed_read(&f, &data, 256 * KIB);
    drop(f);
    wait_passthrough_handles(&path, 0);
    write_both(&path, &m.src_path("ref.img"));
    let through = fs::read(&path).unwrap();
    let plain = fs::read(m.src_path("ref.img")).unwrap();
    assert_eq!(through.len(), plain.len(), "size through the mount");
    assert!(
        through == plain,
        "data through the mount differs from the source's"
    );
    assert!(
        fs::read(m.src_path("disk.img")).unwrap() == plain,
        "on the source"
    );
    // Every byte above went past the daemon.
    assert_eq!(daemon_bytes(&path), (0, 0));
    wait_passthrough_handles(&path, 0);
    // A file made through the mount (CREATE) too.
    let made = m.path("made.img");
    let data = pattern(MIB as usize + 123, 14);
    fs::write(&made, &data).unwrap();
    assert!(fs::read(m.src_path("made.img")).unwrap() == data);
    assert!(fs::read(&made).unwrap() == data);
    assert_eq!(daemon_bytes(&made), (0, 0));
}

/// A fio job on `file`: 4 KiB random writes at depth 32 with libaio and
/// O_DIRECT, each block stamped with a checksum; fio reads them back and
/// checks them (at depth too), or with `verify_only` only checks.
fn fio_verify(file: &Path, verify_only: bool) {
    let filename = format!("--filename={}", file.display());
    let mut args = vec![
        "--name=pt",
        filename.as_str(),
        "--ioengine=libaio",
        "--direct=1",
        "--iodepth=32",
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--randseed=15",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=terse",
        "--verify_state_save=0",
    ];
    if verify_only {
        args.push("--verify_only");
    }
    run("fio", &args);
}

#[test]
fn fio_at_depth_in_passthrough_is_on_the_source() {
    let mut m = Mount::new();
    make_file(m.src(), "disk.img", 16 * MIB, 4);
    m.start(&["-o", "passthrough"]);
    let path = m.path("disk.img");
    // Written and verified through the mount, then verified again on the
    // source itself.
    fio_verify(&path, false);
    fio_verify(&m.src_path("disk.img"), true);
    assert_eq!(daemon_bytes(&path), (0, 0), "fio's I/O reached the daemon");
}

#[test]
fn a_file_with_a_limit_in_force_is_throttled_with_passthrough_on() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "own.img", TIMED_BYTES, 5);
    sys_set_attr(&m.src_path("own.img"), "user.throttle.bps_rd", "4M");
    fs::create_dir(m.src_path("dir")).unwrap();
    sys_set_attr(&m.src_path("dir"), "user.throttle.iops_rd", "100000");
    make_file(&m.src_path("dir"), "inherits.img", MIB, 6);
    make_file(m.src(), "member.img", MIB, 7);
    sys_set_attr(&m.src_path("member.img"), "user.throttle.group", "g");
    make_file(m.src(), "opted-out.img", MIB, 8);
    sys_set_attr(&m.src_path("opted-out.img"), "user.throttle.bps", "0");
    m.start(&["--passthrough", "--group", "g:bps=1G"]);

    let own = m.path("own.img");
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&own)
        .unwrap();
    assert_eq!(passthrough_handles(&own), 0);
    let elapsed = timed_read(&f, &data, TIMED_REQ_BYTES);
    let lower = timed_lower_bound();
    assert_elapsed_between(
        "8 MiB at bps_rd=4M with --passthrough",
        elapsed,
        lower,
        loose_upper(lower),
    );
    assert_eq!(daemon_bytes(&own).0, TIMED_BYTES);

    // Inherited from a directory, and a group member: throttled path.
    for name in ["dir/inherits.img", "member.img"] {
        let path = m.path(name);
        let f = File::open(&path).unwrap();
        assert_eq!(passthrough_handles(&path), 0, "{name}");
        let mut buf = vec![0u8; MIB as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(daemon_bytes(&path).0, MIB, "{name}");
    }
    // Its own set of `bps=0` leaves no limit: passthrough.
    let path = m.path("opted-out.img");
    let _f = File::open(&path).unwrap();
    assert_eq!(passthrough_handles(&path), 1, "a set of bps=0 is no limit");
}

#[test]
fn a_mount_wide_limit_keeps_every_file_throttled() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", TIMED_BYTES, 9);
    m.start(&["--passthrough", "--bps-rd", "4M"]);
    let path = m.path("disk.img");
    let f = File::open(&path).unwrap();
    assert_eq!(passthrough_handles(&path), 0);
    let elapsed = timed_read(&f, &data, TIMED_REQ_BYTES);
    let lower = timed_lower_bound();
    assert_elapsed_between("8 MiB at --bps-rd 4M", elapsed, lower, loose_upper(lower));
}

#[test]
fn a_limit_set_on_an_open_passthrough_handle_applies_from_the_next_open() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", TIMED_BYTES, 10);
    m.start(&["--passthrough"]);
    let path = m.path("disk.img");
    let old = File::open(&path).unwrap();
    assert_eq!(passthrough_handles(&path), 1);

    setfattr(&path, "user.throttle.bps_rd", "4M");
    // Stored and shown, with the handle that does not obey it.
    assert_eq!(
        sys_get_attr(&path, "user.throttle.bps_rd").as_deref(),
        Some("4194304")
    );
    assert_eq!(
        sys_get_attr(&m.src_path("disk.img"), "user.throttle.bps_rd").as_deref(),
        Some("4194304")
    );
    assert_eq!(
        effective(&path),
        "source=file\nbps_rd=4194304\npassthrough_handles=1\n"
    );
    assert_eq!(passthrough_handles(&path), 1);
    let mnt = m.mnt().to_str().unwrap();
    let file = path.to_str().unwrap();
    let get = ctl_ok(&["get", file]);
    assert!(
        get.contains("passthrough:     1 passthrough handle not throttled"),
        "{get}"
    );
    let table = ctl_ok(&["stat", mnt]);
    assert!(
        table.contains("bps_rd=4M (file); 1 passthrough handle not throttled"),
        "{table}"
    );
    let json = ctl_ok(&["stat", "--json", mnt]);
    assert!(
        json.contains(&format!("\"path\":\"{file}\""))
            && json.contains("\"passthrough_handles\":1"),
        "{json}"
    );
    let prom = ctl_ok(&["stat", "--prometheus", mnt]);
    assert!(
        prom.contains(&format!(
            "throttlefs_passthrough_handles{{file=\"{file}\"}} 1\n"
        )),
        "{prom}"
    );

    // The old handle is not throttled, and not counted.
    let mut buf = vec![0u8; TIMED_BYTES as usize];
    old.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == data);
    assert_eq!(daemon_bytes(&path).0, 0);

    // A new open is throttled.
    let new = File::open(&path).unwrap();
    assert_eq!(passthrough_handles(&path), 1, "only the old handle");
    let elapsed = timed_read(&new, &data, TIMED_REQ_BYTES);
    let lower = timed_lower_bound();
    assert_elapsed_between(
        "8 MiB on a new open after bps_rd=4M",
        elapsed,
        lower,
        loose_upper(lower),
    );
    assert_eq!(daemon_bytes(&path).0, TIMED_BYTES);
    drop(old);
    drop(new);
    wait_passthrough_handles(&path, 0);
    assert_eq!(effective(&path), "source=file\nbps_rd=4194304\n");
}

#[test]
fn without_the_option_nothing_is_in_passthrough() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", MIB, 11);
    m.start(&[]);
    let path = m.path("disk.img");
    let f = File::open(&path).unwrap();
    assert_eq!(passthrough_handles(&path), 0);
    let mut buf = vec![0u8; MIB as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == data);
    assert_eq!(
        daemon_bytes(&path).0,
        MIB,
        "the read went through the daemon"
    );
}

/// In a user namespace, root has CAP_SYS_ADMIN there only: it may mount
/// FUSE, but the kernel refuses it a backing file (EPERM). The script
/// mounts with `--passthrough`, opens the file and reads it, then prints
/// its `effective`, `---` and its `stats`.
const WITHOUT_CAP_SYS_ADMIN: &str = r#"
bin=$1 src=$2 mnt=$3 log=$4
"$bin" -f --passthrough "$src" "$mnt" 2>"$log" &
pid=$!
trap 'umount "$mnt" 2>/dev/null; wait $pid' EXIT
i=0
until mountpoint -q "$mnt"; do
    i=$((i + 1))
    [ $i -lt 200 ] && kill -0 $pid || exit 10
    sleep 0.05
done
exec 3<"$mnt/disk.img"
getfattr --absolute-names -n user.throttle.effective --only-values "$mnt/disk.img"
echo ---
cmp "$mnt/disk.img" "$src/disk.img"
getfattr --absolute-names -n user.throttle.stats --only-values "$mnt/disk.img"
exec 3<&-
"#;

#[test]
fn without_cap_sys_admin_the_mount_works_without_passthrough() {
    let m = Mount::new();
    make_file(m.src(), "disk.img", MIB, 12);
    let log = m.root().join("userns-daemon.log");
    let out = run(
        "unshare",
        &[
            OsStr::new("--user"),
            OsStr::new("--map-root-user"),
            OsStr::new("--mount"),
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new(WITHOUT_CAP_SYS_ADMIN),
            OsStr::new("sh"),
            OsStr::new(common::binary()),
            m.src().as_os_str(),
            m.mnt().as_os_str(),
            log.as_os_str(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (eff, stats) = text.split_once("---\n").expect("script output");
    assert!(!eff.contains(PASSTHROUGH_HANDLES), "{eff}");
    assert!(stats.contains(&format!("read_bytes={MIB}\n")), "{stats}");
    assert!(stats.contains("passthrough_handles=0\n"), "{stats}");
    let log = fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("passthrough refused by the kernel") && log.contains("CAP_SYS_ADMIN"),
        "{log}"
    );
    assert_eq!(
        log.matches("passthrough refused").count(),
        1,
        "logged once: {log}"
    );
}

#[test]
fn opens_off_the_passthrough_path_mix_with_passthrough_handles() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "disk.img", MIB, 13);
    fs::write(m.src_path("ref.img"), &data).unwrap();
    m.start(&["--passthrough"]);
    let path = m.path("disk.img");
    // The kernel wants every open of a file with passthrough handles
    // registered too: an O_APPEND open then appends through the daemon.
    for (p, counted) in [
        (path.as_path(), true),
        (m.src_path("ref.img").as_path(), false),
    ] {
        let plain = open_rw(p, 0);
        let appending = OpenOptions::new().append(true).open(p).unwrap();
        if counted {
            assert_eq!(passthrough_handles(p), 1, "the O_APPEND handle is not");
        }
        (&appending).write_all(b"appended").unwrap();
        plain.write_all_at(b"start", 0).unwrap();
        (&appending).write_all(b"again").unwrap();
    }
    wait_passthrough_handles(&path, 0);
    assert_eq!(
        daemon_bytes(&path),
        (0, 13),
        "the appends went through the daemon"
    );
    assert!(fs::read(m.src_path("disk.img")).unwrap() == fs::read(m.src_path("ref.img")).unwrap());

    // A handle on the throttled path keeps later opens off passthrough,
    // even once the file has no limit, until it is closed.
    setfattr(&path, "user.throttle.bps_rd", "100M");
    let throttled = File::open(&path).unwrap();
    setfattr(&path, "user.throttle.bps_rd", "0");
    let later = File::open(&path).unwrap();
    assert_eq!(passthrough_handles(&path), 0);
    let mut buf = vec![0u8; 4096];
    later.read_exact_at(&mut buf, 4096).unwrap();
    throttled.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(daemon_bytes(&path).0, 8192);
    drop((throttled, later));
    // The kernel sends the releases after the closes: wait for them to
    // reach the daemon, then a new open is in passthrough again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let f = File::open(&path).unwrap();
        if passthrough_handles(&path) == 1 {
            break;
        }
        drop(f);
        assert!(Instant::now() < deadline, "no passthrough after the close");
        std::thread::sleep(Duration::from_millis(20));
    }
}
