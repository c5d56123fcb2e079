//! Operations that must reach the source file as they are: image locking,
//! SEEK_DATA/SEEK_HOLE, fallocate modes, O_DIRECT.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{KIB, MIB, Mount, pattern, qemu_img_create, run, run_unchecked};

/// Kills a helper process if the test ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn image_locks_work_through_the_mount() {
    let m = Mount::start_with(&["--iops", "1000"]);
    let img = m.path("img.qcow2");
    qemu_img_create("qcow2", &img, "16M");
    // The holder: an interactive qemu-io reading commands from a pipe; a
    // qcow2 image opened read-write takes QEMU's "write" lock, unshared.
    let mut holder = KillOnDrop(
        Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io"),
    );
    let mut stdin = holder.0.stdin.take().unwrap();
    let stdout = holder.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    writeln!(stdin, "read 0 512").unwrap();
    stdin.flush().unwrap();
    // Wait (bounded) until the holder has the image open and answered.
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let done = line.contains("read 512/512 bytes");
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(e) => panic!("qemu-io holder did not answer ({e}); stdout so far: {seen:?}"),
        }
    }

    let second = run_unchecked(
        "qemu-io",
        &[
            OsStr::new("-f"),
            OsStr::new("raw"),
            OsStr::new("-c"),
            OsStr::new("read 0 512"),
            img.as_os_str(),
        ],
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second qemu-io opened the image while it was in use: {}",
        common::describe("qemu-io", &["-f", "raw", "-c", "read 0 512"], &second)
    );
    assert!(
        err.contains("Failed to get \"write\" lock") || err.contains("lock"),
        "second qemu-io failed, but not because of the lock:\n{err}"
    );
    let info = run_unchecked("qemu-img", &[OsStr::new("info"), img.as_os_str()]);
    assert!(
        !info.status.success() && String::from_utf8_lossy(&info.stderr).contains("lock"),
        "qemu-img info ignored the lock: {}",
        common::describe("qemu-img", &["info"], &info)
    );

    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let status = wait_child(&mut holder.0, Duration::from_secs(30));
    assert!(status.success(), "qemu-io holder exited with {status}");
    // Released: the image opens again.
    common::qemu_io_fmt("qcow2", &img, &[], &["read 0 512"]);
}

fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> Result<u64, std::io::Error> {
    // SAFETY: lseek on a valid, open descriptor.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[test]
fn seek_data_and_seek_hole_see_the_source_holes() {
    let mut m = Mount::new();
    let chunk = pattern(4096, 1);
    {
        let f = File::create(m.src_path("sparse.img")).unwrap();
        f.write_all_at(&chunk, 0).unwrap();
        f.write_all_at(&chunk, 8 * MIB).unwrap();
        f.sync_all().unwrap();
        assert!(
            lseek(&f, 0, libc::SEEK_HOLE).unwrap() < 8 * MIB,
            "the source filesystem does not report holes; this test cannot run here"
        );
    }
    m.start(&["--bps", "100M"]);
    let f = File::open(m.path("sparse.img")).unwrap();
    let size = 8 * MIB + 4096;
    assert_eq!(f.metadata().unwrap().len(), size);
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).unwrap(), 0, "data at 0");
    let hole = lseek(&f, 0, libc::SEEK_HOLE).unwrap();
    assert!(
        (4096..8 * MIB).contains(&hole),
        "SEEK_HOLE from 0 gave {hole}, expected the hole after the first 4 KiB (not passed through?)"
    );
    let data = lseek(&f, hole, libc::SEEK_DATA).unwrap();
    assert!(
        data > hole && data <= 8 * MIB,
        "SEEK_DATA from the hole at {hole} gave {data}, expected data at or before 8 MiB"
    );
    assert_eq!(
        lseek(&f, 8 * MIB, libc::SEEK_HOLE).unwrap(),
        size,
        "the end of file is a hole"
    );
    let past = lseek(&f, size, libc::SEEK_DATA);
    assert_eq!(
        past.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENXIO)),
        "SEEK_DATA at EOF must fail with ENXIO"
    );
    // Reading through the hole gives zeros, the chunks their data.
    let mut buf = vec![0xffu8; 4096];
    f.read_exact_at(&mut buf, 4 * MIB).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    f.read_exact_at(&mut buf, 8 * MIB).unwrap();
    assert!(buf == chunk);
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a valid, open descriptor.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn blocks(path: &std::path::Path) -> u64 {
    fs::metadata(path).unwrap().blocks()
}

#[test]
fn fallocate_punch_hole_zero_range_and_extend() {
    let mut m = Mount::new();
    fs::write(m.src_path("punch.img"), vec![0xffu8; 64 * KIB as usize]).unwrap();
    fs::write(m.src_path("zero.img"), vec![0xeeu8; 64 * KIB as usize]).unwrap();
    File::create(m.src_path("grow.img")).unwrap();
    m.start(&["--bps-wr", "100M"]);

    // Punch hole with the util-linux tool: zeros, same size, space freed.
    let before = blocks(&m.src_path("punch.img"));
    let p = m.path("punch.img");
    run(
        "fallocate",
        &[
            OsStr::new("-p"),
            OsStr::new("-o"),
            OsStr::new("4096"),
            OsStr::new("-l"),
            OsStr::new("8192"),
            p.as_os_str(),
        ],
    );
    let got = fs::read(&p).unwrap();
    assert_eq!(
        got.len(),
        64 * KIB as usize,
        "punching a hole changed the size"
    );
    assert!(got[..4096].iter().all(|b| *b == 0xff));
    assert!(
        got[4096..12288].iter().all(|b| *b == 0),
        "punched range is not zero"
    );
    assert!(got[12288..].iter().all(|b| *b == 0xff));
    assert_eq!(fs::read(m.src_path("punch.img")).unwrap(), got);
    let after = blocks(&m.src_path("punch.img"));
    assert!(
        after < before,
        "the hole was not punched in the source (blocks {before} -> {after})"
    );

    // Punch hole with libc, unaligned, keeping the size.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        30000,
        5000,
    )
    .unwrap();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 64 * KIB as usize);
    assert!(got[30000..35000].iter().all(|b| *b == 0));
    assert!(
        got[29999] == 0xff && got[35000] == 0xff,
        "punched outside the range"
    );

    // Zero range.
    let z = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("zero.img"))
        .unwrap();
    fallocate(&z, libc::FALLOC_FL_ZERO_RANGE, 8192, 16384).unwrap();
    let got = fs::read(m.src_path("zero.img")).unwrap();
    assert_eq!(got.len(), 64 * KIB as usize);
    assert!(got[..8192].iter().all(|b| *b == 0xee));
    assert!(
        got[8192..24576].iter().all(|b| *b == 0),
        "zeroed range is not zero"
    );
    assert!(got[24576..].iter().all(|b| *b == 0xee));
    // Zero range past the end extends the file.
    fallocate(&z, libc::FALLOC_FL_ZERO_RANGE, 64 * KIB, 4096).unwrap();
    assert_eq!(z.metadata().unwrap().len(), 68 * KIB);

    // Plain fallocate extends and allocates.
    let g = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("grow.img"))
        .unwrap();
    fallocate(&g, 0, 0, MIB).unwrap();
    assert_eq!(g.metadata().unwrap().len(), MIB);
    assert_eq!(fs::metadata(m.src_path("grow.img")).unwrap().len(), MIB);
    assert!(
        blocks(&m.src_path("grow.img")) >= MIB / 512,
        "space not allocated in the source"
    );
    // KEEP_SIZE allocates without changing the size.
    fallocate(&g, libc::FALLOC_FL_KEEP_SIZE, MIB, MIB).unwrap();
    assert_eq!(g.metadata().unwrap().len(), MIB);
    let mut buf = vec![1u8; 4096];
    g.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
}

#[test]
fn o_direct_open_read_and_write() {
    let m = Mount::start_with(&["--bps", "100M"]);
    let d = m.path("direct.img");
    let mut of = std::ffi::OsString::from("of=");
    of.push(&d);
    let mut iff = std::ffi::OsString::from("if=");
    iff.push(&d);
    let random = std::ffi::OsString::from("if=/dev/urandom");
    run(
        "dd",
        &[
            random.as_os_str(),
            of.as_os_str(),
            OsStr::new("bs=4096"),
            OsStr::new("count=16"),
            OsStr::new("oflag=direct"),
            OsStr::new("status=none"),
        ],
    );
    let written = fs::read(m.src_path("direct.img")).unwrap();
    assert_eq!(written.len(), 64 * KIB as usize);
    let out = run(
        "dd",
        &[
            iff.as_os_str(),
            OsStr::new("bs=8192"),
            OsStr::new("iflag=direct"),
            OsStr::new("status=none"),
        ],
    );
    assert!(
        out.stdout == written,
        "O_DIRECT read differs from the source"
    );
    // A Rust O_DIRECT open of the same file with an aligned buffer.
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&d)
        .expect("O_DIRECT open through the mount");
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size layout; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null());
    // SAFETY: ptr is valid for 4096 bytes, exclusively ours until dealloc.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
    let res = f.read_exact_at(buf, 8192);
    let same = buf[..] == written[8192..12288];
    buf.fill(0x5a);
    let wres = f.write_all_at(buf, 4096);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    res.expect("O_DIRECT read");
    assert!(same, "O_DIRECT read returned wrong data");
    wres.expect("O_DIRECT write");
    let src = fs::read(m.src_path("direct.img")).unwrap();
    assert!(src[4096..8192].iter().all(|b| *b == 0x5a));
}

/// Pages of `path` resident in the page cache (mincore on a mapping, which
/// itself faults nothing in).
fn resident_pages(path: &std::path::Path) -> usize {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    // SAFETY: a private read-only mapping of an open file, unmapped below.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
        let mut vec = vec![0u8; len.div_ceil(page)];
        let r = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(r, 0, "mincore failed");
        vec.iter().filter(|v| **v & 1 != 0).count()
    }
}

/// Evict `path` from the page cache (clean pages only, after fdatasync).
fn evict(path: &std::path::Path) {
    let file = File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: advice on an open descriptor.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

#[test]
fn o_direct_reaches_the_underlying_file() {
    const LEN: usize = 8 * MIB as usize;
    let data = pattern(LEN, 41);
    let m = Mount::with_setup(|src| fs::write(src.join("disk.img"), &data).unwrap(), &[]);
    evict(&m.src_path("disk.img"));
    if resident_pages(&m.src_path("disk.img")) != 0 {
        eprintln!("skipped: the source filesystem keeps pages resident after DONTNEED");
        return;
    }
    // Aligned direct reads through the mount bypass the host page cache,
    // as the caller (QEMU cache=none) meant, and return the right bytes.
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("disk.img"))
        .unwrap();
    // 512 KiB requests: a Vec is not page-aligned, and the kernel splits a
    // 1 MiB read from an unaligned buffer into two unaligned pieces (which
    // would rightly take the buffered path). QEMU's buffers are aligned.
    const REQ: u64 = 512 * KIB;
    let mut buf = vec![0u8; REQ as usize];
    for i in 0..(LEN as u64 / REQ) {
        direct.read_exact_at(&mut buf, i * REQ).unwrap();
        assert!(buf[..] == data[(i * REQ) as usize..][..REQ as usize]);
    }
    assert_eq!(
        resident_pages(&m.src_path("disk.img")),
        0,
        "direct reads through the mount filled the source's page cache"
    );
    // A caller without O_DIRECT goes through the host page cache, as on the
    // plain file (so the check above can tell the difference).
    let buffered = File::open(m.path("disk.img")).unwrap();
    buffered.read_exact_at(&mut buf, 0).unwrap();
    assert!(resident_pages(&m.src_path("disk.img")) > 0);
}
