//! The FUSE transport (`-o io_uring=auto|on|off`): a mount with `on` really
//! serves its requests from ring entries, `on` fails with one clear line
//! where the kernel's switch (`enable_uring`) is off, `auto` falls back and
//! says so at `-v`, and data written and read through the ring, at depth
//! and throttled, is intact.
//!
//! Which checks run depends on the kernel's switch, which the tests never
//! change: `.ci/run` runs this file once with it off and once with it on.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{KIB, MIB, Mount, make_file, open_direct, run, uring_switch};

/// Skips a test (with a note) unless the kernel's switch is `want`.
fn switch_is(want: bool) -> bool {
    let on = uring_switch() == Some(true);
    if on != want {
        eprintln!(
            "skipped: this check needs enable_uring={}",
            if want {
                "Y"
            } else {
                "N (or no such parameter)"
            }
        );
    }
    on == want
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

/// Voluntary context switches of the daemon's threads whose name starts
/// with `prefix`: each wake-up for a request counts one.
fn thread_wakeups(pid: libc::pid_t, prefix: &str) -> u64 {
    wakeups_of(pid, |name| name.starts_with(prefix))
}

/// `/dev/fuse` session threads are named fuser-0, fuser-1, ...; ring
/// threads fuser-uring-0, ...
fn dev_fuse_wakeups(pid: libc::pid_t) -> u64 {
    wakeups_of(pid, |name| {
        name.strip_prefix("fuser-")
            .is_some_and(|n| n.parse::<u32>().is_ok())
    })
}

/// Voluntary context switches of the daemon's threads whose name `pick`s.
fn wakeups_of(pid: libc::pid_t, pick: impl Fn(&str) -> bool) -> u64 {
    common::threads(pid)
        .iter()
        .filter(|(name, _)| pick(name))
        .map(|(_, status)| {
            common::status_field(status, "voluntary_ctxt_switches")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn on_fails_with_one_line_naming_the_switch_when_it_is_off() {
    if !switch_is(false) {
        return;
    }
    let mut m = Mount::new();
    let src = m.src().to_str().unwrap().to_owned();
    let mnt = m.mnt().to_str().unwrap().to_owned();
    let status = m
        .run_to_exit(&["-o", "io_uring=on", &src, &mnt], Duration::from_secs(10))
        .expect("throttlefs -o io_uring=on did not exit");
    let stderr = m.stderr();
    assert!(!status.success(), "mounted anyway:\n{stderr}");
    assert!(!m.is_mounted(), "left a mount behind");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line:\n{stderr}");
    assert!(lines[0].contains("enable_uring"), "{stderr}");
    assert!(lines[0].contains(&kernel_release()), "{stderr}");
    assert!(!lines[0].contains("ERROR"), "{stderr}");
}

#[test]
fn auto_falls_back_to_dev_fuse_and_says_so() {
    if !switch_is(false) {
        return;
    }
    let m = Mount::with_setup(
        |src| {
            make_file(src, "f", 64 * KIB, 1);
        },
        &["-v", "-o", "io_uring=auto"],
    );
    assert_eq!(fs::read(m.path("f")).unwrap().len(), 64 * KIB as usize);
    let log = m.stderr();
    assert!(
        log.contains("transport: /dev/fuse (the kernel does not offer io_uring"),
        "{log}"
    );
}

#[test]
fn off_uses_dev_fuse() {
    let m = Mount::start_with(&["-v", "-o", "io_uring=off"]);
    fs::write(m.path("f"), b"x").unwrap();
    let log = m.stderr();
    assert!(log.contains("transport: /dev/fuse"), "{log}");
    let pid = m.pid();
    assert_eq!(thread_wakeups(pid, "fuser-uring"), 0, "ring threads exist");
}

/// Reads of `len` bytes at every 4 KiB offset of `f` through O_DIRECT, in a
/// scrambled order, compared with `data`.
fn read_and_compare(path: &std::path::Path, data: &[u8]) {
    let f = open_direct(path, false);
    let mut buf = common::aio::AlignedBuf::zeroed(4096);
    let blocks = data.len() / 4096;
    for i in 0..blocks {
        let b = (i * 7919) % blocks;
        let n = f.read_at(&mut buf, (b * 4096) as u64).unwrap();
        assert_eq!(n, 4096);
        assert!(
            buf[..] == data[b * 4096..(b + 1) * 4096],
            "block {b} differs"
        );
    }
}

#[test]
fn on_serves_requests_from_ring_entries() {
    if !switch_is(true) {
        return;
    }
    let mut data = Vec::new();
    let m = Mount::with_setup(
        |src| {
            data = make_file(src, "f", 8 * MIB, 2);
        },
        &["-v", "-o", "io_uring=on"],
    );
    // Answered once INIT is, after the transport is logged.
    fs::metadata(m.path("f")).unwrap();
    let log = m.stderr();
    assert!(log.contains("transport: io_uring"), "{log}");
    let pid = m.pid();
    let ring_before = thread_wakeups(pid, "fuser-uring");
    let dev_before = dev_fuse_wakeups(pid);
    read_and_compare(&m.path("f"), &data);
    let ring = thread_wakeups(pid, "fuser-uring") - ring_before;
    let dev = dev_fuse_wakeups(pid) - dev_before;
    // 2048 requests, each of which wakes the thread that serves it.
    assert!(
        ring >= 1000 && dev < 100,
        "ring threads woke {ring} times, /dev/fuse threads {dev} times"
    );
    assert!(!m.stderr().contains("ERROR"), "{}", m.daemon_output());
}

#[test]
fn auto_uses_the_ring_where_the_kernel_offers_it() {
    if !switch_is(true) {
        return;
    }
    let m = Mount::start_with(&["-v", "-o", "io_uring=auto"]);
    fs::write(m.path("f"), b"x").unwrap();
    let log = m.stderr();
    assert!(log.contains("transport: io_uring"), "{log}");
}

/// fio writes with verification at depth 32 through the ring, throttled
/// (replies from the I/O workers) and not (replies from the ring threads
/// and the workers), then the source is compared with what fio read.
#[test]
fn data_through_the_ring_is_intact_at_depth() {
    if !switch_is(true) {
        return;
    }
    for limit in [None, Some("iops=4000")] {
        let mut args = vec!["-o", "io_uring=on"];
        if let Some(l) = limit {
            args.extend(["-o", l]);
        }
        let m = Mount::start_with(&args);
        let file = m.path("fio.img");
        run(
            "fio",
            &[
                "--name=ring",
                &format!("--filename={}", file.display()),
                "--size=16M",
                "--bs=4k",
                "--rw=randwrite",
                "--ioengine=libaio",
                "--iodepth=32",
                "--direct=1",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                // No local-*-verify.state file in the working directory.
                "--verify_state_save=0",
                "--randrepeat=0",
            ],
        );
        let through = fs::read(&file).unwrap();
        let source = fs::read(m.src_path("fio.img")).unwrap();
        assert!(through == source, "{limit:?}: mount and source differ");
        assert!(!m.stderr().contains("ERROR"), "{}", m.daemon_output());
    }
}

/// Over io_uring, a read or write that needs no scheduler (no limit, or
/// within credit) goes on the ring that brought it, into or out of the
/// ring entry's own buffer: the I/O workers stay asleep at depth 32, the
/// data is intact, and a read across the end of a file is short as on the
/// source.
#[test]
fn io_without_the_scheduler_goes_on_the_ring_itself() {
    if !switch_is(true) {
        return;
    }
    for limit in [None, Some("bps=1000000000000000")] {
        let mut args = vec!["-o", "io_uring=on"];
        if let Some(l) = limit {
            args.extend(["-o", l]);
        }
        let m = Mount::with_setup(
            |src| {
                make_file(src, "f", 16 * MIB, 3);
                make_file(src, "tail", 6000, 4);
            },
            &args,
        );
        fs::metadata(m.path("f")).unwrap();
        let pid = m.pid();
        // One direction at a time: credit is granted per direction, for
        // the direction that was released last (see credit.rs).
        for rw in ["randread", "randwrite"] {
            let workers_before = thread_wakeups(pid, "io-");
            let ops = 4096;
            run(
                "fio",
                &[
                    "--name=ring",
                    &format!("--filename={}", m.path("f").display()),
                    "--bs=4k",
                    &format!("--rw={rw}"),
                    "--ioengine=libaio",
                    "--iodepth=32",
                    "--direct=1",
                    &format!("--number_ios={ops}"),
                    "--randrepeat=0",
                    "--output=/dev/null",
                ],
            );
            let workers = thread_wakeups(pid, "io-") - workers_before;
            // Under a limit, each time the credit runs out (every 2 ms) the
            // requests that arrive until the scheduler grants it again go
            // through the scheduler to the workers: under load, up to a
            // quarter of them was seen.
            let most = if limit.is_some() { ops / 2 } else { ops / 20 };
            assert!(
                workers < most,
                "{limit:?} {rw}: the I/O workers woke {workers} times for {ops} requests"
            );
        }
        let through = fs::read(m.path("f")).unwrap();
        let source = fs::read(m.src_path("f")).unwrap();
        assert!(through == source, "{limit:?}: mount and source differ");
        // Buffered, so the kernel asks for whole pages: 8 KiB at 0 of a
        // 6000-byte file.
        let tail = fs::read(m.path("tail")).unwrap();
        assert_eq!(tail, fs::read(m.src_path("tail")).unwrap(), "{limit:?}");
        let f = fs::File::open(m.path("tail")).unwrap();
        let mut buf = vec![0u8; 8192];
        let n = f.read_at(&mut buf, 4096).unwrap();
        assert_eq!(n, 6000 - 4096, "{limit:?}: short read at the end");
        assert!(!m.stderr().contains("ERROR"), "{}", m.daemon_output());
    }
}
