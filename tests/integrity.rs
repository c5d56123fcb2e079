//! Data and metadata pass through unchanged: qemu-io pattern I/O at
//! unaligned offsets (O_DIRECT and buffered), qcow2 images created, written,
//! checked and converted through the mount, and ordinary file operations.

mod common;

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::{KIB, MIB, Mount, pattern, qemu_img_create, qemu_io, qemu_io_fmt, run};

/// Limits loose enough not to slow anything down, so that the throttled
/// code path is the one carrying the data.
const GENEROUS_LIMITS: &[&str] = &["-o", "bps=500M,iops=100000"];

/// Applies `write -P pat off len` to the in-memory model of a file.
fn model_write(model: &mut Vec<u8>, off: usize, len: usize, pat: u8) {
    if model.len() < off + len {
        model.resize(off + len, 0);
    }
    model[off..off + len].fill(pat);
}

fn assert_same_bytes(what: &str, got: &[u8], expected: &[u8]) {
    assert_eq!(got.len(), expected.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, expected {:#04x}",
            got[i], expected[i]
        );
    }
}

/// Maximal runs of equal bytes: (offset, length, byte).
fn runs(data: &[u8]) -> Vec<(usize, usize, u8)> {
    let mut out: Vec<(usize, usize, u8)> = Vec::new();
    for (i, &b) in data.iter().enumerate() {
        match out.last_mut() {
            Some((_, len, pat)) if *pat == b => *len += 1,
            _ => out.push((i, 1, b)),
        }
    }
    out
}

/// Unaligned pattern writes and verified reads on a raw image with the
/// given qemu-io cache mode, then a byte-for-byte check of the source.
fn raw_patterns(cache: &str) {
    const SIZE: usize = MIB as usize;
    let mut m = Mount::new();
    fs::write(m.src_path("disk.raw"), vec![0u8; SIZE]).unwrap();
    m.start(GENEROUS_LIMITS);
    let img = m.path("disk.raw");
    let writes: &[(usize, usize, u8)] = &[
        (1000, 5000, 0xab),
        (65535, 131073, 0xcd),
        (4096, 4096, 0x11),
        (300_001, 1, 0x22),
        (SIZE - 3000, 3000, 0x33),
        (700_000, 200_000, 0x44),
    ];
    let mut model = vec![0u8; SIZE];
    let mut cmds = Vec::new();
    for &(off, len, pat) in writes {
        cmds.push(format!("write -P {pat:#x} {off} {len}"));
        model_write(&mut model, off, len, pat);
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, &["-t", cache], &cmds);
    // Verified reads in a second process: every run of equal bytes of the
    // model, written or untouched, plus a hex dump across a boundary.
    let mut reads: Vec<String> = runs(&model)
        .into_iter()
        .map(|(off, len, pat)| format!("read -P {pat:#x} {off} {len}"))
        .collect();
    reads.push("read -v 4088 16".into());
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    let out = qemu_io(&img, &["-t", cache], &reads);
    assert!(
        out.contains("ab ab ab ab ab ab ab ab 11 11 11 11 11 11 11 11"),
        "read -v 4088 16 did not show the 0xab/0x11 boundary:\n{out}"
    );
    let src = fs::read(m.src_path("disk.raw")).unwrap();
    assert_same_bytes(&format!("source after qemu-io -t {cache}"), &src, &model);
    // And the mount reads back the same bytes.
    let through = fs::read(&img).unwrap();
    assert_same_bytes("file read through the mount", &through, &model);
}

#[test]
fn qemu_io_raw_unaligned_o_direct() {
    raw_patterns("none");
}

#[test]
fn qemu_io_raw_unaligned_buffered() {
    raw_patterns("writeback");
}

#[test]
fn qcow2_create_write_check_convert() {
    let m = Mount::start_with(GENEROUS_LIMITS);
    let img = m.path("x.qcow2");
    qemu_img_create("qcow2", &img, "64M");
    let mut model = vec![0u8; 64 * MIB as usize];
    let direct = [
        (0usize, MIB as usize, 0x11u8),
        (1_000_000, 70_000, 0x22),
        (33_554_431, 4097, 0x33),
        (60 * MIB as usize + 123, 300_000, 0x44),
    ];
    let mut cmds: Vec<String> = direct
        .iter()
        .map(|&(off, len, pat)| format!("write -P {pat:#x} {off} {len}"))
        .collect();
    for &(off, len, pat) in &direct {
        model_write(&mut model, off, len, pat);
    }
    cmds.push("write -z 512K 64K".into());
    model_write(&mut model, 512 * KIB as usize, 64 * KIB as usize, 0);
    // Verify every run of equal bytes of the model (written, zeroed or
    // never touched) in the same process.
    cmds.extend(
        runs(&model)
            .into_iter()
            .map(|(off, len, pat)| format!("read -P {pat:#x} {off} {len}")),
    );
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_fmt("qcow2", &img, &["-t", "none"], &refs);

    // Buffered I/O on the same image, in a new process.
    model_write(&mut model, 20 * MIB as usize + 7, 12345, 0x55);
    model_write(&mut model, 1_000_100, 100, 0);
    qemu_io_fmt(
        "qcow2",
        &img,
        &["-t", "writeback"],
        &[
            "write -P 0x55 20971527 12345",
            "write -z 1000100 100",
            "read -P 0x55 20971527 12345",
            "read -P 0x22 1000000 100",
            "read -P 0 1000100 100",
            "read -P 0x22 1000200 69800",
            "read -P 0x44 62914683 300000",
        ],
    );

    let check = run(
        "qemu-img",
        &[
            OsStr::new("check"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            img.as_os_str(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("No errors were found"),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    let out = m.root().join("converted.raw");
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            img.as_os_str(),
            out.as_os_str(),
        ],
    );
    let cmp = run(
        "qemu-img",
        &[
            OsStr::new("compare"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-F"),
            OsStr::new("raw"),
            img.as_os_str(),
            out.as_os_str(),
        ],
    );
    assert!(String::from_utf8_lossy(&cmp.stdout).contains("Images are identical"));
    let raw = fs::read(&out).unwrap();
    assert_same_bytes("qemu-img convert output", &raw, &model);
}

#[test]
fn create_write_read_rename_unlink() {
    let m = Mount::start_with(GENEROUS_LIMITS);
    let data = pattern(3 * MIB as usize + 12345, 1);
    {
        let mut f = File::create(m.path("a")).unwrap();
        f.write_all(&data).unwrap();
    }
    assert_same_bytes("source of a", &fs::read(m.src_path("a")).unwrap(), &data);
    assert_same_bytes(
        "a through the mount",
        &fs::read(m.path("a")).unwrap(),
        &data,
    );
    assert_eq!(fs::metadata(m.path("a")).unwrap().len(), data.len() as u64);

    // Partial reads and writes at odd offsets.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("a"))
        .unwrap();
    f.write_all_at(b"hello", 1_000_001).unwrap();
    let mut buf = [0u8; 9];
    f.read_exact_at(&mut buf, 999_999).unwrap();
    assert_eq!(&buf[2..7], b"hello");
    assert_eq!(buf[..2], data[999_999..1_000_001]);
    // Reading at EOF gives a short read.
    let mut tail = vec![0u8; 100];
    let n = f.read_at(&mut tail, data.len() as u64 - 10).unwrap();
    assert_eq!(n, 10);
    drop(f);

    // Append mode.
    {
        let mut f = OpenOptions::new().append(true).open(m.path("a")).unwrap();
        f.write_all(b"appended").unwrap();
    }
    let now = fs::read(m.src_path("a")).unwrap();
    assert!(now.ends_with(b"appended"));
    assert_eq!(now.len(), data.len() + 8);

    // Rename, also replacing an existing file.
    fs::write(m.path("b"), b"old b").unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert!(!m.path("a").exists() && !m.src_path("a").exists());
    assert_eq!(fs::read(m.src_path("b")).unwrap(), now);
    fs::create_dir(m.path("sub")).unwrap();
    fs::rename(m.path("b"), m.path("sub/c")).unwrap();
    assert_eq!(fs::read(m.src_path("sub/c")).unwrap(), now);

    // Exclusive create of an existing name fails.
    let err = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path("sub/c"))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);

    // Unlink.
    fs::remove_file(m.path("sub/c")).unwrap();
    assert!(!m.path("sub/c").exists());
    assert!(!m.src_path("sub/c").exists());
    let err = fs::read(m.path("sub/c")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn hard_links_and_symlinks() {
    let m = Mount::start_with(&[]);
    fs::write(m.path("orig"), b"linked data").unwrap();
    fs::hard_link(m.path("orig"), m.path("hard")).unwrap();
    assert_eq!(fs::metadata(m.path("orig")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.src_path("hard")).unwrap().ino(),
        fs::metadata(m.src_path("orig")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(m.path("hard")).unwrap().ino(),
        fs::metadata(m.path("orig")).unwrap().ino(),
        "hard links have different inode numbers through the mount"
    );
    fs::write(m.path("hard"), b"changed via hard").unwrap();
    assert_eq!(fs::read(m.path("orig")).unwrap(), b"changed via hard");
    fs::remove_file(m.path("orig")).unwrap();
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("hard")).unwrap(), b"changed via hard");

    std::os::unix::fs::symlink("hard", m.path("sym")).unwrap();
    assert_eq!(fs::read_link(m.path("sym")).unwrap(), Path::new("hard"));
    assert_eq!(fs::read_link(m.src_path("sym")).unwrap(), Path::new("hard"));
    assert!(
        fs::symlink_metadata(m.path("sym"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(m.path("sym")).unwrap(), b"changed via hard");
    std::os::unix::fs::symlink("/nonexistent/target", m.path("dangling")).unwrap();
    assert_eq!(
        fs::read_link(m.path("dangling")).unwrap(),
        Path::new("/nonexistent/target")
    );
}

#[test]
fn directories_and_readdir() {
    let m = Mount::new();
    fs::write(m.src_path("pre-existing"), b"1").unwrap();
    fs::create_dir(m.src_path("pre-dir")).unwrap();
    fs::write(m.src_path("pre-dir/inner"), b"2").unwrap();
    let mut m = m;
    m.start(&[]);
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir_all(m.path("d/e/f")).unwrap();
    assert!(m.src_path("d/e/f").is_dir());
    fs::write(m.path("d/file"), b"x").unwrap();
    std::os::unix::fs::symlink("file", m.path("d/link")).unwrap();

    let list = |p: &Path| -> BTreeSet<(String, &'static str)> {
        fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                let kind = if t.is_dir() {
                    "dir"
                } else if t.is_symlink() {
                    "symlink"
                } else {
                    "file"
                };
                (e.file_name().into_string().unwrap(), kind)
            })
            .collect()
    };
    let expected: BTreeSet<_> = [("e", "dir"), ("file", "file"), ("link", "symlink")]
        .into_iter()
        .map(|(n, k)| (n.to_string(), k))
        .collect();
    assert_eq!(list(&m.path("d")), expected);
    assert_eq!(list(&m.path("")), list(m.src()));
    assert_eq!(
        list(&m.path("pre-dir")),
        [("inner".to_string(), "file")].into_iter().collect()
    );
    // A directory with many entries (more than one readdir reply).
    fs::create_dir(m.path("many")).unwrap();
    for i in 0..300 {
        fs::write(
            m.path(&format!("many/entry-with-a-longish-name-{i:04}")),
            b"",
        )
        .unwrap();
    }
    assert_eq!(list(&m.path("many")).len(), 300);
    assert_eq!(list(&m.path("many")), list(&m.src_path("many")));

    // rmdir: not while non-empty, then yes.
    assert!(fs::remove_dir(m.path("d/e")).is_err());
    fs::remove_dir(m.path("d/e/f")).unwrap();
    fs::remove_dir(m.path("d/e")).unwrap();
    assert!(!m.src_path("d/e").exists());
}

#[test]
fn chmod_truncate_and_timestamps() {
    let m = Mount::start_with(GENEROUS_LIMITS);
    let data = pattern(10_000, 2);
    fs::write(m.path("f"), &data).unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.path("f")).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(
        fs::metadata(m.src_path("f")).unwrap().mode() & 0o7777,
        0o640
    );
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.src_path("f")).unwrap().mode() & 0o7777,
        0o600
    );

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("f"))
        .unwrap();
    f.set_len(1000).unwrap();
    assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 1000);
    assert_eq!(fs::read(m.src_path("f")).unwrap(), data[..1000]);
    f.set_len(5000).unwrap();
    let now = fs::read(m.path("f")).unwrap();
    assert_eq!(now.len(), 5000);
    assert_eq!(now[..1000], data[..1000]);
    assert!(
        now[1000..].iter().all(|b| *b == 0),
        "growing truncate must read zeros"
    );
    assert_eq!(fs::read(m.src_path("f")).unwrap(), now);
    // truncate by path too.
    run(
        "truncate",
        &[OsStr::new("-s"), OsStr::new("123"), m.path("f").as_os_str()],
    );
    assert_eq!(fs::metadata(m.src_path("f")).unwrap().len(), 123);

    // utimens passes through.
    run(
        "touch",
        &[
            OsStr::new("-m"),
            OsStr::new("-d"),
            OsStr::new("2001-02-03 04:05:06 UTC"),
            m.path("f").as_os_str(),
        ],
    );
    let mtime = fs::metadata(m.src_path("f")).unwrap().mtime();
    assert_eq!(mtime, 981173106);
    assert_eq!(fs::metadata(m.path("f")).unwrap().mtime(), 981173106);
}

#[test]
fn statfs_reports_the_source_filesystem() {
    let m = Mount::start_with(&[]);
    let total = |p: &Path| -> u128 {
        let out = run(
            "stat",
            &[
                OsStr::new("-f"),
                OsStr::new("-c"),
                OsStr::new("%b %S"),
                p.as_os_str(),
            ],
        );
        let s = String::from_utf8(out.stdout).unwrap();
        let v: Vec<u128> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
        v[0] * v[1]
    };
    let (src, mnt) = (total(m.src()), total(m.mnt()));
    assert!(src > 0);
    assert_eq!(
        mnt, src,
        "statfs total size through the mount differs from the source's"
    );
    let df = run("df", &[m.mnt().as_os_str()]);
    assert!(!df.stdout.is_empty());
}

#[test]
fn user_xattrs_pass_through() {
    let m = Mount::start_with(&[]);
    fs::write(m.path("f"), b"x").unwrap();
    let f = m.path("f");
    run(
        "setfattr",
        &[
            OsStr::new("-n"),
            OsStr::new("user.foo"),
            OsStr::new("-v"),
            OsStr::new("bar"),
            f.as_os_str(),
        ],
    );
    let get = |p: &Path| {
        run(
            "getfattr",
            &[
                OsStr::new("-n"),
                OsStr::new("user.foo"),
                OsStr::new("--only-values"),
                p.as_os_str(),
            ],
        )
        .stdout
    };
    assert_eq!(get(&f), b"bar");
    assert_eq!(
        get(&m.src_path("f")),
        b"bar",
        "the xattr did not reach the source"
    );
    let dump = run("getfattr", &[OsStr::new("-d"), f.as_os_str()]);
    assert!(
        String::from_utf8_lossy(&dump.stdout).contains("user.foo=\"bar\""),
        "listxattr: {}",
        String::from_utf8_lossy(&dump.stdout)
    );
    run(
        "setfattr",
        &[OsStr::new("-x"), OsStr::new("user.foo"), f.as_os_str()],
    );
    let gone = common::run_unchecked(
        "getfattr",
        &[OsStr::new("-n"), OsStr::new("user.foo"), f.as_os_str()],
    );
    assert!(!gone.status.success(), "user.foo still there after removal");
    assert!(
        common::run_unchecked(
            "getfattr",
            &[
                OsStr::new("-n"),
                OsStr::new("user.foo"),
                m.src_path("f").as_os_str()
            ]
        )
        .status
        .code()
            != Some(0)
    );
}

#[test]
fn copy_file_range_and_cp_inside_the_mount() {
    let mut m = Mount::new();
    let data = pattern(3 * MIB as usize + 777, 3);
    fs::write(m.src_path("a"), &data).unwrap();
    m.start(GENEROUS_LIMITS);
    // std::io::copy between two files uses copy_file_range on Linux.
    {
        let mut from = File::open(m.path("a")).unwrap();
        let mut to = File::create(m.path("b")).unwrap();
        let n = std::io::copy(&mut from, &mut to).unwrap();
        assert_eq!(n, data.len() as u64);
    }
    assert_same_bytes(
        "b (std::io::copy)",
        &fs::read(m.src_path("b")).unwrap(),
        &data,
    );
    // An explicit copy_file_range at offsets.
    {
        let from = File::open(m.path("a")).unwrap();
        let to = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(m.path("c"))
            .unwrap();
        let (mut off_in, mut off_out): (libc::loff_t, libc::loff_t) = (1000, 5);
        let mut left = 100_000usize;
        while left > 0 {
            use std::os::fd::AsRawFd;
            // SAFETY: valid descriptors and offset pointers.
            let r = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    left,
                    0,
                )
            };
            assert!(
                r > 0,
                "copy_file_range: {}",
                std::io::Error::last_os_error()
            );
            left -= r as usize;
        }
    }
    let c = fs::read(m.src_path("c")).unwrap();
    assert_eq!(c.len(), 100_005);
    assert!(c[..5].iter().all(|b| *b == 0));
    assert_same_bytes("c (copy_file_range)", &c[5..], &data[1000..101_000]);
    // cp from coreutils.
    run("cp", &[m.path("a").as_os_str(), m.path("d").as_os_str()]);
    assert_same_bytes("d (cp)", &fs::read(m.src_path("d")).unwrap(), &data);
    let mut read_back = Vec::new();
    File::open(m.path("d"))
        .unwrap()
        .read_to_end(&mut read_back)
        .unwrap();
    assert_same_bytes("d through the mount", &read_back, &data);
}

#[test]
fn fsync_and_fdatasync() {
    let m = Mount::start_with(GENEROUS_LIMITS);
    let mut f = File::create(m.path("f")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_data().unwrap();
    f.write_all(b" and more").unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read(m.src_path("f")).unwrap(), b"durable and more");
    File::open(m.mnt()).unwrap().sync_all().unwrap();
    let mut of = OsString::from("of=");
    of.push(m.path("g"));
    run(
        "dd",
        &[
            OsStr::new("if=/dev/zero"),
            of.as_os_str(),
            OsStr::new("bs=4096"),
            OsStr::new("count=4"),
            OsStr::new("conv=fsync,fdatasync"),
            OsStr::new("status=none"),
        ],
    );
    assert_eq!(fs::metadata(m.src_path("g")).unwrap().len(), 16384);
}

#[test]
fn read_only_mount_refuses_changes() {
    let mut m = Mount::new();
    fs::write(m.src_path("f"), b"original").unwrap();
    m.start(&["-o", "ro,bps=10M"]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"original");
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        OpenOptions::new().write(true).open(m.path("f")).map(drop),
        "open for writing",
    );
    erofs(fs::write(m.path("new"), b"x"), "create");
    erofs(fs::remove_file(m.path("f")), "unlink");
    erofs(fs::create_dir(m.path("d")), "mkdir");
    assert_eq!(fs::read(m.src_path("f")).unwrap(), b"original");
    assert!(!m.src_path("new").exists());
}

#[test]
fn qemu_img_convert_into_the_mount_with_parallel_writes() {
    // Out-of-order, parallel O_DIRECT writes (-W -m 16) through throttled
    // files, to raw and to qcow2, must land exactly.
    let m = Mount::start_with(&["-o", "bps_wr=200M,iops=5000"]);
    let input = m.root().join("input.raw");
    let data = pattern(16 * MIB as usize, 4);
    fs::write(&input, &data).unwrap();
    for (fmt, name) in [("raw", "out.raw"), ("qcow2", "out.qcow2")] {
        let out = m.path(name);
        run(
            "qemu-img",
            &[
                OsStr::new("convert"),
                OsStr::new("-f"),
                OsStr::new("raw"),
                OsStr::new("-O"),
                OsStr::new(fmt),
                OsStr::new("-t"),
                OsStr::new("none"),
                OsStr::new("-W"),
                OsStr::new("-m"),
                OsStr::new("16"),
                input.as_os_str(),
                out.as_os_str(),
            ],
        );
        let cmp = run(
            "qemu-img",
            &[
                OsStr::new("compare"),
                OsStr::new("-f"),
                OsStr::new("raw"),
                OsStr::new("-F"),
                OsStr::new(fmt),
                input.as_os_str(),
                out.as_os_str(),
            ],
        );
        assert!(String::from_utf8_lossy(&cmp.stdout).contains("Images are identical"));
    }
    assert_same_bytes(
        "out.raw in the source",
        &fs::read(m.src_path("out.raw")).unwrap(),
        &data,
    );
}
