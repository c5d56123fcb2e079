//! Cancellation: a queued request whose caller is killed is removed from
//! the queue, answered EINTR (the kernel sends FUSE_INTERRUPT), and charges
//! nothing to the file's buckets.

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{KIB, MIB, Mount, open_direct, pattern};

const LIMIT_BYTES_PER_SEC: u64 = 256 * KIB;

#[test]
fn killed_reader_leaves_the_queue_and_charges_nothing() {
    let m = Mount::with_setup(
        |src| std::fs::write(src.join("disk.img"), pattern(4 * MIB as usize, 7)).unwrap(),
        &["--bps-rd", "256K"],
    );
    let file = open_direct(&m.path("disk.img"), false);
    let start = Instant::now();
    // 512 KiB at t=0 leaves the bucket 486.4 KiB over its 25.6 KiB
    // capacity: the file's next release is at exactly 1.9 s.
    let mut buf = vec![0u8; 512 * KIB as usize];
    file.read_exact_at(&mut buf, 0).unwrap();

    // A 1 MiB read queues behind that deadline; its caller is killed.
    let mut dd = Command::new("dd")
        .arg(format!("if={}", m.path("disk.img").display()))
        .args(["of=/dev/null", "bs=1M", "count=1", "skip=1", "iflag=direct"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dd.id() as libc::pid_t, libc::SIGKILL) };
    dd.wait().unwrap();
    let killed_after = start.elapsed();
    // Without cancellation the killed caller sits in the kernel until the
    // throttle releases its read, at 1.9 s.
    assert!(
        killed_after < Duration::from_millis(1500),
        "the killed reader was only reaped after {killed_after:?}"
    );

    // Had the killed 1 MiB been charged, this read would wait until
    // 1.9 s + 1 MiB / 256 KiB/s = 5.9 s. Uncharged, it goes at 1.9 s.
    let mut small = vec![0u8; 4 * KIB as usize];
    file.read_exact_at(&mut small, 3 * MIB).unwrap();
    let elapsed = start.elapsed();
    let earliest = Duration::from_millis(1900) - Duration::from_millis(1);
    assert!(
        elapsed >= earliest,
        "the read after the cancelled one came too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "the cancelled request was charged: the next read took {elapsed:?} \
         (limit {LIMIT_BYTES_PER_SEC} B/s)"
    );
    assert_eq!(
        small,
        pattern(4 * MIB as usize, 7)[3 * MIB as usize..][..4096]
    );
}
