//! Stopping the daemon: SIGTERM with requests queued, SIGINT and
//! `fusermount3 -u` on an idle mount. Each must end with exit status 0 and
//! no mount left behind.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::{KIB, Mount, is_mounted, pattern, run};

const WORKERS: usize = 6;
const CHUNK: usize = 256 * KIB as usize;

/// Mounts with `limit` (64 KiB/s for the direction under test), starts six
/// threads each doing one 256 KiB request at its own offset, SIGTERMs the
/// daemon after 0.5 s, and checks that every request is answered within
/// 15 s, that the daemon exits 0 and unmounts. At 64 KiB/s the first request
/// starts at once and the others would be released about 4 s apart (the
/// last after ~20 s), so they are still queued when SIGTERM arrives.
/// Returns which requests succeeded, and the source file's final content.
fn sigterm_with_queued(limit: &[&str], write: bool) -> (Vec<bool>, Vec<u8>) {
    let mut m = Mount::new();
    fs::write(m.src_path("disk.img"), pattern(CHUNK * WORKERS, 1)).unwrap();
    m.start(limit);
    let (tx, rx) = mpsc::channel();
    for i in 0..WORKERS {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(m.path("disk.img"))
            .unwrap();
        let tx = tx.clone();
        thread::spawn(move || {
            let off = (i * CHUNK) as u64;
            let res = if write {
                file.write_all_at(&pattern(CHUNK, 100 + i as u64), off)
                    .map(|_| Vec::new())
            } else {
                let mut buf = vec![0u8; CHUNK];
                file.read_exact_at(&mut buf, off).map(|_| buf)
            };
            drop(file);
            let _ = tx.send((i, res));
        });
    }
    drop(tx);
    // Give the workers time to get their requests queued in the daemon
    // (each makes one syscall); at 64 KiB/s none but the first can finish.
    thread::sleep(Duration::from_millis(500));
    m.signal(libc::SIGTERM);
    let sent = Instant::now();
    let mut answered = [None; WORKERS];
    let expected = pattern(CHUNK * WORKERS, 1);
    while answered.iter().any(Option::is_none) {
        let left = Duration::from_secs(15).saturating_sub(sent.elapsed());
        match rx.recv_timeout(left) {
            Ok((i, res)) => {
                if let Ok(buf) = &res
                    && !write
                {
                    assert!(
                        buf[..] == expected[i * CHUNK..(i + 1) * CHUNK],
                        "reader {i} got wrong data"
                    );
                }
                answered[i] = Some(res.is_ok());
            }
            Err(RecvTimeoutError::Timeout) => panic!(
                "requests not answered within 15 s of SIGTERM: {:?}",
                (0..WORKERS)
                    .filter(|i| answered[*i].is_none())
                    .collect::<Vec<_>>()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!("a worker thread died"),
        }
    }
    let ok: Vec<bool> = answered.iter().map(|a| a.unwrap()).collect();
    eprintln!("after SIGTERM, succeeded: {ok:?}");
    let left = Duration::from_secs(15).saturating_sub(sent.elapsed()) + Duration::from_secs(1);
    let status = m.wait_exit(left).unwrap_or_else(|| {
        panic!(
            "throttlefs still running 15 s after SIGTERM\n{}",
            m.daemon_output()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "throttlefs exited with {status} after SIGTERM\n{}",
        m.daemon_output()
    );
    assert!(
        !is_mounted(m.mnt()),
        "mount left behind after SIGTERM\n{}",
        m.daemon_output()
    );
    (ok, fs::read(m.src_path("disk.img")).unwrap())
}

#[test]
fn sigterm_with_queued_reads_answers_every_read() {
    // Each read may succeed (with the right data, checked above) or fail;
    // what matters is that none is left hanging.
    sigterm_with_queued(&["--bps-rd", "64K"], false);
}

#[test]
fn sigterm_with_queued_writes_loses_no_acknowledged_write() {
    let (ok, src) = sigterm_with_queued(&["--bps-wr", "64K"], true);
    for (i, _) in ok.iter().enumerate().filter(|(_, ok)| **ok) {
        assert!(
            src[i * CHUNK..(i + 1) * CHUNK] == pattern(CHUNK, 100 + i as u64)[..],
            "write {i} was acknowledged but its data is not in the source"
        );
    }
}

#[test]
fn sigterm_on_idle_mount_exits_zero() {
    let mut m = Mount::start_with(&["--bps", "1M"]);
    fs::write(m.path("f"), b"hello").unwrap();
    let status = m.terminate();
    assert_eq!(status.code(), Some(0), "{}", m.daemon_output());
    assert!(!is_mounted(m.mnt()), "mount left behind after SIGTERM");
    assert_eq!(fs::read(m.src_path("f")).unwrap(), b"hello");
}

fn idle_signal_exits_zero(signal: libc::c_int) {
    let mut m = Mount::start_with(&[]);
    m.signal(signal);
    let status = m
        .wait_exit(common::EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("no exit after signal {signal}\n{}", m.daemon_output()));
    assert_eq!(status.code(), Some(0), "{}", m.daemon_output());
    assert!(
        !is_mounted(m.mnt()),
        "mount left behind after signal {signal}"
    );
}

#[test]
fn sigint_on_idle_mount_exits_zero() {
    idle_signal_exits_zero(libc::SIGINT);
}

#[test]
fn sighup_on_idle_mount_exits_zero() {
    idle_signal_exits_zero(libc::SIGHUP);
}

#[test]
fn fusermount_unmount_makes_daemon_exit_zero() {
    let mut m = Mount::start_with(&["--iops", "100"]);
    run(
        "fusermount3",
        &[std::ffi::OsStr::new("-u"), m.mnt().as_os_str()],
    );
    let status = m
        .wait_exit(common::EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("no exit after fusermount3 -u\n{}", m.daemon_output()));
    assert_eq!(status.code(), Some(0), "{}", m.daemon_output());
    assert!(!is_mounted(m.mnt()));
}

#[test]
fn harness_unmounts_after_a_killed_daemon() {
    // The guard itself: even when the daemon dies without unmounting
    // (SIGKILL leaves a dead connection mounted), dropping it leaves no
    // mount behind.
    let mut m = Mount::start_with(&[]);
    let mnt = m.mnt().to_path_buf();
    m.signal(libc::SIGKILL);
    let status = m.wait_exit(common::EXIT_TIMEOUT).expect("SIGKILL ends it");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    drop(m);
    assert!(
        !is_mounted(&mnt),
        "the guard left {} mounted",
        mnt.display()
    );
}
