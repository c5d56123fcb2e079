//! Starting throttlefs the ways FUSE filesystems are started: `mount -t
//! fuse.throttlefs` (through mount.fuse3), fstab-style options, the detach
//! once the mount is live, `-f`, and systemd's readiness notification.
//!
//! mount(8) drops PATH from its helpers' environment, so mount.fuse3's
//! shell finds `throttlefs` on the shell's default path, whose first entry
//! is /usr/local/sbin. Each test that runs mount(8) moves its thread into a
//! mount namespace of its own (slave to the host's, so nothing propagates
//! back) and binds a directory holding a `throttlefs` link to the binary
//! under test over /usr/local/sbin there: the machine's own directories
//! stay untouched and tests do not see each other's binaries.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{EXIT_TIMEOUT, KIB, MIB, Mount, binary, is_mounted, make_file, open_direct};

/// Where the shell that mount.fuse3 starts looks first for `throttlefs`.
const HELPER_SEARCH_DIR: &str = "/usr/local/sbin";

const READ_LIMIT_BYTES_PER_SEC: u64 = 512 * KIB;
const READ_REQUEST_BYTES: u64 = 128 * KIB;
const READ_TOTAL_BYTES: u64 = MIB;

/// Moves this thread (and every process it starts from now on) into a
/// private mount namespace where `throttlefs` on the helper path is the
/// binary under test.
fn use_binary_under_test_for_mount(scratch: &Path) {
    let bin = scratch.join("helper-bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(binary(), bin.join("throttlefs")).unwrap();
    let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let (root, source, target) = (
        cstr(Path::new("/")),
        cstr(&bin),
        cstr(Path::new(HELPER_SEARCH_DIR)),
    );
    // SAFETY: unshare affects the calling thread only (CLONE_NEWNS
    // implies CLONE_FS); mount(2) on NUL-terminated paths.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare(CLONE_NEWNS)");
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null()
            ),
            0,
            "make / a slave mount: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null()
            ),
            0,
            "bind {} on {HELPER_SEARCH_DIR}: {}",
            bin.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// The name of the daemon's unmount helper (src/sandbox/keeper.rs), a
/// child with the daemon's command line.
const UNMOUNT_HELPER_COMM: &str = "throttlefs-umnt";

/// Processes of the binary under test whose command line names `mnt`:
/// the daemons serving (or trying to serve) it and their unmount helpers.
fn processes_on(mnt: &Path) -> Vec<libc::pid_t> {
    let exe = fs::canonicalize(binary()).unwrap();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        if fs::read_link(entry.path().join("exe")).ok().as_ref() != Some(&exe) {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == mnt.as_os_str().as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

fn is_unmount_helper(pid: libc::pid_t) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == UNMOUNT_HELPER_COMM)
}

/// The daemons serving (or trying to serve) `mnt`, without their unmount
/// helpers.
fn daemons_on(mnt: &Path) -> Vec<libc::pid_t> {
    processes_on(mnt)
        .into_iter()
        .filter(|&pid| !is_unmount_helper(pid))
        .collect()
}

/// The unmount helpers of the daemons on `mnt`, with their parents.
fn helpers_on(mnt: &Path) -> Vec<(libc::pid_t, libc::pid_t)> {
    processes_on(mnt)
        .into_iter()
        .filter(|&pid| is_unmount_helper(pid))
        .map(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            (pid, ppid)
        })
        .collect()
}

/// Waits until no daemon serves `mnt` and no unmount helper is left;
/// false if one is left after `timeout`.
fn daemons_gone(mnt: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !processes_on(mnt).is_empty() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A `Mount` whose daemon detached (started by mount(8) or without -f),
/// so the guard does not own it: dropping this stops any daemon left on
/// the mountpoint, then `Mount`'s drop unmounts whatever remains.
struct Detached {
    m: Mount,
}

impl Drop for Detached {
    fn drop(&mut self) {
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            for pid in processes_on(self.m.mnt()) {
                // SAFETY: kill(2) on a daemon of the binary under test that
                // serves this test's own mountpoint.
                unsafe { libc::kill(pid, signal) };
            }
            if daemons_gone(self.m.mnt(), EXIT_TIMEOUT) {
                break;
            }
        }
    }
}

fn mount_cmd(m: &Mount, options: &str) -> Output {
    common::run_unchecked(
        "mount",
        &[
            "-t".as_ref(),
            "fuse.throttlefs".as_ref(),
            m.src().as_os_str(),
            m.mnt().as_os_str(),
            "-o".as_ref(),
            options.as_ref(),
        ],
    )
}

/// Reads the whole file with O_DIRECT in READ_REQUEST_BYTES requests;
/// returns the time taken and the bytes.
fn timed_read(path: &Path) -> (Duration, Vec<u8>) {
    let mut f = open_direct(path, false);
    let start = Instant::now();
    let mut data = Vec::new();
    // O_DIRECT wants an aligned buffer: a page-aligned slice of a larger one.
    let mut raw = vec![0u8; (READ_REQUEST_BYTES + 4 * KIB) as usize];
    let offset = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[offset..offset + READ_REQUEST_BYTES as usize];
    loop {
        let n = f.read(buf).unwrap();
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    (start.elapsed(), data)
}

/// Strict lower bound for reading READ_TOTAL_BYTES at the limit: the first
/// request goes at once and the bucket lets a tenth of a second through.
fn read_lower_bound_secs() -> f64 {
    let avg = READ_LIMIT_BYTES_PER_SEC as f64;
    (READ_TOTAL_BYTES as f64 - READ_REQUEST_BYTES as f64 - avg * 0.1) / avg
}

fn umount_and_wait(m: &Mount) {
    common::run("umount", &[m.mnt()]);
    assert!(!is_mounted(m.mnt()), "still mounted after umount");
    assert!(
        daemons_gone(m.mnt(), EXIT_TIMEOUT),
        "the daemon did not exit after umount"
    );
}

/// The filesystem type mountinfo gives for `mnt` (the field after " - "),
/// as `findmnt -t` and `umount -t` match it.
fn fstype_of(mnt: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/thread-self/mountinfo").ok()?;
    info.lines()
        .filter_map(throttlefs::options::mountinfo_entry)
        .find(|(point, _)| point == mnt)
        .map(|(_, fstype)| fstype.to_string())
}

#[test]
fn mount_t_returns_once_live_and_the_limit_from_o_holds() {
    let m = Detached { m: Mount::new() };
    use_binary_under_test_for_mount(m.m.root());
    let data = make_file(m.m.src(), "disk.img", READ_TOTAL_BYTES, 7);
    let out = mount_cmd(
        &m.m,
        &format!("bps_rd={READ_LIMIT_BYTES_PER_SEC},allow_other"),
    );
    // Checked at once: mount must not return before the mount exists.
    let mounted = is_mounted(m.m.mnt());
    assert!(
        out.status.success(),
        "{}",
        common::describe("mount", &[""], &out)
    );
    assert!(mounted, "mount returned 0 before the mount was live");
    assert_eq!(
        fstype_of(m.m.mnt()).as_deref(),
        Some("fuse.throttlefs"),
        "mounted with the type an fstab line names"
    );
    assert_eq!(
        daemons_on(m.m.mnt()).len(),
        1,
        "one daemon serves the mount"
    );

    let (elapsed, read) = timed_read(&m.m.path("disk.img"));
    assert!(
        read == data,
        "data read through the mount differs from the source"
    );
    let lower = read_lower_bound_secs();
    common::assert_elapsed_between(
        "1 MiB read at -o bps_rd=512K",
        elapsed,
        lower,
        common::loose_upper(lower),
    );
    umount_and_wait(&m.m);
}

#[test]
fn mount_t_refusals_fail_with_one_line_and_leave_nothing() {
    let m = Detached { m: Mount::new() };
    use_binary_under_test_for_mount(m.m.root());
    let missing = m.m.root().join("missing");
    let cases: [(&str, Option<&Path>, String); 3] = [
        (
            "bps_rd=10M,bogus",
            None,
            "throttlefs: unknown mount option 'bogus'".into(),
        ),
        (
            "bps=1M,bps_rd=1M",
            None,
            "throttlefs: bps_rd cannot be used together with bps".into(),
        ),
        (
            "bps_rd=1M",
            Some(&missing),
            format!("throttlefs: source '{}'", missing.display()),
        ),
    ];
    for (options, source, needle) in cases {
        let src = source.unwrap_or(m.m.src());
        let out = common::run_unchecked(
            "mount",
            &[
                "-t".as_ref(),
                "fuse.throttlefs".as_ref(),
                src.as_os_str(),
                m.m.mnt().as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mount -o {options} succeeded");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "mount -o {options}: not one line:\n{stderr}"
        );
        assert!(
            stderr.starts_with(&needle),
            "mount -o {options}: expected '{needle}...', got:\n{stderr}"
        );
        assert!(!is_mounted(m.m.mnt()), "mount -o {options} left a mount");
        assert!(
            daemons_on(m.m.mnt()).is_empty(),
            "mount -o {options} left a daemon"
        );
    }
    // Busy: a mountpoint that is not empty.
    fs::write(m.m.mnt().join("stray"), b"x").unwrap();
    let out = mount_cmd(&m.m, "bps_rd=1M");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert!(daemons_on(m.m.mnt()).is_empty());
    fs::remove_file(m.m.mnt().join("stray")).unwrap();

    // Busy: a live throttlefs mount already there (its source is empty, so
    // the mountpoint looks empty); a second mount is refused and the first
    // keeps serving.
    let out = mount_cmd(&m.m, "bps_rd=1M");
    assert!(
        out.status.success(),
        "{}",
        common::describe("mount", &[""], &out)
    );
    let out = mount_cmd(&m.m, "bps_rd=2M");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second mount on a live one succeeded"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is already mounted"), "{stderr}");
    assert_eq!(
        daemons_on(m.m.mnt()).len(),
        1,
        "one daemon serves the mount"
    );
    assert!(fs::read_dir(m.m.mnt()).is_ok());
    umount_and_wait(&m.m);
}

#[test]
fn fstab_style_options_are_accepted_and_ro_is_read_only() {
    let m = Detached { m: Mount::new() };
    use_binary_under_test_for_mount(m.m.root());
    let data = make_file(m.m.src(), "disk.img", 64 * KIB, 3);
    let out = mount_cmd(
        &m.m,
        "defaults,rw,nofail,_netdev,x-systemd.automount,noauto,comment=vm,\
         relatime,group.tenant.a.bps=10M,ro,bps_wr=1M",
    );
    assert!(
        out.status.success(),
        "{}",
        common::describe("mount", &[""], &out)
    );
    assert!(is_mounted(m.m.mnt()));
    assert!(fs::read(m.m.path("disk.img")).unwrap() == data);
    // `ro` came after `rw`: the last one wins, as with mount(8).
    let err = fs::write(m.m.path("disk.img"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // The group defined in -o exists: joining it is accepted. (The mount
    // is read-only, so check on a second, writable mount below.)
    umount_and_wait(&m.m);

    let out = mount_cmd(&m.m, "group.tenant.a.bps=10M,group.tenant.a.iops=100");
    assert!(
        out.status.success(),
        "{}",
        common::describe("mount", &[""], &out)
    );
    common::run(
        "setfattr",
        &[
            "-n".as_ref(),
            "user.throttle.group".as_ref(),
            "-v".as_ref(),
            "tenant.a".as_ref(),
            m.m.path("disk.img").as_os_str(),
        ],
    );
    umount_and_wait(&m.m);
}

#[test]
fn without_f_it_detaches_once_live_and_keeps_serving() {
    let m = Detached { m: Mount::new() };
    let data = make_file(m.m.src(), "disk.img", 256 * KIB, 5);
    // Output captured through pipes: returning means the daemon let go of
    // them too, as a shell's $(...) or mount.fuse3 would need.
    let out = Command::new(binary())
        .args(["--bps-rd", "1M"])
        .arg(m.m.src())
        .arg(m.m.mnt())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mounted = is_mounted(m.m.mnt());
    assert!(
        out.status.success(),
        "{}",
        common::describe(binary(), &[""], &out)
    );
    assert!(mounted, "returned before the mount was live");
    assert_eq!(fstype_of(m.m.mnt()).as_deref(), Some("fuse.throttlefs"));
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
    let daemons = daemons_on(m.m.mnt());
    assert_eq!(daemons.len(), 1, "one detached daemon");
    // Its own session, away from ours.
    // SAFETY: getsid on a live pid.
    assert_eq!(unsafe { libc::getsid(daemons[0]) }, daemons[0]);
    // Its unmount helper is its child, and let go of the pipes too.
    assert_eq!(
        helpers_on(m.m.mnt())
            .iter()
            .map(|&(_, ppid)| ppid)
            .collect::<Vec<_>>(),
        vec![daemons[0]],
        "the unmount helper"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(fs::read(m.m.path("disk.img")).unwrap() == data);
    umount_and_wait(&m.m);
}

#[test]
fn f_stays_in_the_foreground() {
    let mut m = Mount::new();
    m.start(&[]); // the harness passes -f
    std::thread::sleep(Duration::from_millis(300));
    assert!(m.try_wait().is_none(), "the -f daemon exited");
    assert_eq!(daemons_on(m.mnt()), vec![m.pid()], "the -f daemon forked");
    // Its one child is the unmount helper of its sandbox.
    assert_eq!(
        helpers_on(m.mnt())
            .iter()
            .map(|&(_, ppid)| ppid)
            .collect::<Vec<_>>(),
        vec![m.pid()],
        "the unmount helper"
    );
    assert!(m.terminate().success());
}

#[test]
fn ready_is_notified_only_once_the_mount_is_live() {
    let mut m = Mount::new();
    let socket_path: PathBuf = m.root().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(common::MOUNT_TIMEOUT))
        .unwrap();
    m.daemon_env
        .push(("NOTIFY_SOCKET".into(), socket_path.display().to_string()));
    let mnt = m.mnt().to_path_buf();
    let src = m.src().to_path_buf();
    m.spawn([src.as_os_str(), mnt.as_os_str()]);
    let mut buf = [0u8; 256];
    let n = socket
        .recv(&mut buf)
        .expect("no READY=1 within the timeout");
    let mounted = is_mounted(&mnt);
    assert_eq!(&buf[..n], b"READY=1\n");
    assert!(mounted, "READY=1 came before the mount was live");
    m.signal(libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("no STOPPING=1 after SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert!(m.wait_exit(EXIT_TIMEOUT).is_some_and(|s| s.success()));
}

#[test]
fn a_mount_failing_after_the_detach_reports_like_the_foreground() {
    // As nobody, with allow_other: refused by /dev/fuse's mode or by
    // fusermount3 (no user_allow_other), after the options were accepted,
    // so in the detached child; its parent must print the same line and
    // return the same status as -f does.
    let m = Detached { m: Mount::new() };
    let bin = m.m.root().join("throttlefs");
    fs::copy(binary(), &bin).unwrap();
    common::chmod(m.m.root(), 0o755);
    common::chmod(&bin, 0o755);
    common::run("chown", &["nobody".as_ref(), m.m.mnt().as_os_str()]);
    let run = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = extra.iter().map(|a| a.as_ref()).collect();
        args.extend([
            m.m.src().as_os_str(),
            m.m.mnt().as_os_str(),
            "-o".as_ref(),
            "allow_other,bps_rd=1M".as_ref(),
        ]);
        common::as_nobody(bin.to_str().unwrap(), &args)
    };
    let foreground = run(&["-f"]);
    assert!(
        !foreground.status.success(),
        "nobody mounted with allow_other"
    );
    assert!(daemons_gone(m.m.mnt(), EXIT_TIMEOUT));
    let detached = run(&[]);
    assert_eq!(detached.status.code(), foreground.status.code());
    let stderr = String::from_utf8_lossy(&detached.stderr);
    assert_eq!(stderr, String::from_utf8_lossy(&foreground.stderr));
    assert!(stderr.starts_with("throttlefs: mounting on"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!is_mounted(m.m.mnt()));
    assert!(daemons_gone(m.m.mnt(), EXIT_TIMEOUT));
}
