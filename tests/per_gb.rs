//! Limits per GiB of the disk (`iops_per_gb`, ...), on real mounts: the
//! size is a qcow2 image's virtual size or a raw file's size, the limit in
//! force follows a resize through the mount (qemu-img resize, truncate, a
//! write that grows the file) on a handle held open, within the floor and
//! ceiling; conflicts with fixed limits are refused; Cinder's names are
//! aliases; the set survives a remount.
//!
//! Timed runs read REQ_BYTES O_DIRECT requests on a handle opened before
//! the resize: N requests under `iops` (bucket 0.1 s of it) cannot finish
//! earlier than (N - 1 - 0.1 iops) / iops seconds, a strict lower bound.

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    KIB, Mount, assert_elapsed_between, getfattr, loose_upper, open_direct, qemu_img_create, run,
    setfattr, setfattr_out,
};

const GIB: u64 = 1 << 30;
const REQ_BYTES: usize = 4 * KIB as usize;
/// How soon a resize through the mount must show in `effective`.
const RESIZE_SEEN_WITHIN: Duration = Duration::from_secs(1);

fn effective(path: &Path) -> BTreeMap<String, String> {
    getfattr(path, "user.throttle.effective")
        .expect("effective")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn field(path: &Path, name: &str) -> Option<String> {
    effective(path).get(name).cloned()
}

/// Polls `effective` until `name` reads `want`; how long that took.
fn wait_for_field(path: &Path, name: &str, want: &str) -> Duration {
    let start = Instant::now();
    loop {
        if field(path, name).as_deref() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < RESIZE_SEEN_WITHIN * 5,
            "{name} never became {want}: {:?}",
            effective(path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sparse raw file of `bytes` in the source.
fn sparse(dir: &Path, name: &str, bytes: u64) {
    File::create(dir.join(name))
        .unwrap()
        .set_len(bytes)
        .unwrap();
}

/// `count` reads of REQ_BYTES on `file` (held open): how long they took.
fn timed_reads(file: &File, count: usize) -> Duration {
    let mut buf = common::aio::AlignedBuf::zeroed(REQ_BYTES);
    let start = Instant::now();
    // Within the first 32 KiB, which even a new qcow2 image has.
    for i in 0..count {
        file.read_at(&mut buf[..], ((i % 8) * REQ_BYTES) as u64)
            .expect("read");
    }
    start.elapsed()
}

/// The strict lower bound of `count` requests under `iops`.
fn lower_bound(count: usize, iops: u64) -> f64 {
    (count as f64 - 1.0 - 0.1 * iops as f64) / iops as f64
}

#[test]
fn qcow2_virtual_size_and_qemu_img_resize_through_the_mount() {
    let m = Mount::start_with(&["-o", "iops_per_gb=3,iops_per_gb_min=100"]);
    let image = m.path("x.qcow2");
    qemu_img_create("qcow2", &image, "50G");
    let e = effective(&image);
    assert_eq!(e["iops"], "150", "{e:?}");
    assert_eq!(e["size"], (50 * GIB).to_string(), "{e:?}");
    assert_eq!(e["size_gib"], "50", "{e:?}");
    assert_eq!(e["size_from"], "qcow2", "{e:?}");
    assert_eq!(e["per_gb_limits"], "iops", "{e:?}");

    // Held open across the resize: the new limit reaches it, no reopen.
    let held = open_direct(&image, false);
    run(
        "qemu-img",
        &["resize", "-q", image.to_str().unwrap(), "100G"],
    );
    let seen = wait_for_field(&image, "iops", "300");
    assert!(seen < RESIZE_SEEN_WITHIN, "iops=300 after {seen:?}");
    assert_eq!(field(&image, "size_gib").as_deref(), Some("100"));
    let count = 100;
    let took = timed_reads(&held, count);
    let lower = lower_bound(count, 300);
    assert_elapsed_between(
        "100 reads at 300 IOPS",
        took,
        lower,
        loose_upper(count as f64 / 300.0),
    );
    let out = common::ctl_ok(&["get", image.to_str().unwrap()]);
    assert!(
        out.contains("iops=300") && out.contains("size_gib=100"),
        "{out}"
    );
}

#[test]
fn a_truncate_on_a_held_handle_lowers_the_limit_at_once() {
    let m = Mount::with_setup(|src| sparse(src, "raw.img", 100 * GIB), &[]);
    let image = m.path("raw.img");
    setfattr(&image, "user.throttle.iops_per_gb", "3");
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    assert_eq!(field(&image, "iops").as_deref(), Some("300"));
    // ftruncate through the mount: a setattr of the size.
    held.set_len(20 * GIB).unwrap();
    assert_eq!(field(&image, "iops").as_deref(), Some("60"));
    assert_eq!(field(&image, "size_from").as_deref(), Some("file"));
    // Under the old 300 IOPS these would go nearly at once (30 fit in the
    // bucket); under 60 they cannot be done before the lower bound.
    let direct = open_direct(&image, false);
    let count = 24;
    let took = timed_reads(&direct, count);
    assert_elapsed_between(
        "24 reads at 60 IOPS",
        took,
        lower_bound(count, 60),
        loose_upper(count as f64 / 60.0),
    );
    // truncate(1) larger, by path: the limit follows again.
    run(
        "truncate",
        &["-s", &(40 * GIB).to_string(), image.to_str().unwrap()],
    );
    assert_eq!(field(&image, "iops").as_deref(), Some("120"));
    drop(held);
}

#[test]
fn a_raw_file_growing_by_writes_into_its_next_gib() {
    let m = Mount::with_setup(|src| sparse(src, "grow.img", GIB - 4 * KIB), &[]);
    let image = m.path("grow.img");
    setfattr(&image, "user.throttle.bps_wr_per_gb", "1M");
    let file = OpenOptions::new().write(true).open(&image).unwrap();
    assert_eq!(field(&image, "bps_wr").as_deref(), Some("1048576"));
    // Inside its GiB: nothing to re-evaluate, the limit stands.
    file.write_all_at(&[7u8; 4096], GIB - 4 * KIB).unwrap();
    assert_eq!(field(&image, "size_gib").as_deref(), Some("1"));
    // Past it: 2 GiB, twice the rate.
    file.write_all_at(&[7u8; 4096], GIB).unwrap();
    wait_for_field(&image, "bps_wr", "2097152");
    assert_eq!(
        field(&image, "size").as_deref(),
        Some((GIB + 4 * KIB).to_string().as_str())
    );
}

/// A qcow2 header with virtual size `bytes`, as a guest could write it
/// into the first sector of its raw disk.
fn forged_qcow2_header(bytes: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[24..32].copy_from_slice(&bytes.to_be_bytes());
    h
}

#[test]
fn a_guest_writing_a_qcow2_header_into_its_raw_disk_keeps_its_limit() {
    let m = Mount::with_setup(|src| sparse(src, "guest.img", 100 * GIB), &[]);
    let image = m.path("guest.img");
    setfattr(&image, "user.throttle.iops_per_gb", "3");
    // So that qemu-img's writes to the emptied file below go quickly.
    setfattr(&image, "user.throttle.iops_per_gb_min", "300");
    let guest = OpenOptions::new().write(true).open(&image).unwrap();
    assert_eq!(field(&image, "iops").as_deref(), Some("300"));
    // 32 bytes the guest owns would otherwise make it a 1 EiB disk.
    guest
        .write_all_at(&forged_qcow2_header(1 << 60), 0)
        .unwrap();
    let e = effective(&image);
    assert_eq!(e["iops"], "300", "{e:?}");
    assert_eq!(e["size_from"], "file", "{e:?}");
    drop(guest);
    // Made a qcow2 through the mount (emptied first, as qemu-img does),
    // it is one.
    qemu_img_create("qcow2", &image, "200G");
    assert_eq!(field(&image, "size_from").as_deref(), Some("qcow2"));
    assert_eq!(field(&image, "iops").as_deref(), Some("600"));
    // Raw with data again, then made a qcow2 while no per-GiB limit
    // watched it: read as a qcow2 when one is set again.
    let held = OpenOptions::new().write(true).open(&image).unwrap();
    held.write_all_at(&[1u8; 512], 0).unwrap();
    assert_eq!(field(&image, "size_from").as_deref(), Some("file"));
    for name in ["iops_per_gb_min", "iops_per_gb"] {
        run(
            "setfattr",
            &[
                "-x",
                &format!("user.throttle.{name}"),
                image.to_str().unwrap(),
            ],
        );
    }
    qemu_img_create("qcow2", &image, "300G");
    setfattr(&image, "user.throttle.iops_per_gb", "3");
    assert_eq!(field(&image, "size_from").as_deref(), Some("qcow2"));
    assert_eq!(field(&image, "iops").as_deref(), Some("900"));
    drop(held);
}

#[test]
fn floor_ceiling_bursts_and_conflicts() {
    let m = Mount::with_setup(
        |src| {
            sparse(src, "small.img", 10 * GIB);
            sparse(src, "big.img", 100 * GIB);
        },
        &[],
    );
    let (small, big) = (m.path("small.img"), m.path("big.img"));
    for f in [&small, &big] {
        setfattr(f, "user.throttle.iops_per_gb", "3");
        setfattr(f, "user.throttle.iops_per_gb_min", "100");
        setfattr(f, "user.throttle.iops_per_gb_cap", "200");
    }
    assert_eq!(field(&small, "iops").as_deref(), Some("100"), "the floor");
    assert_eq!(field(&big, "iops").as_deref(), Some("200"), "the ceiling");

    // A burst below the computed limit is not in force, and says so.
    setfattr(&big, "user.throttle.iops_max", "150");
    let e = effective(&big);
    assert_eq!(e.get("iops_max"), None, "{e:?}");
    assert_eq!(e["iops_max_ignored"], "150", "{e:?}");
    setfattr(&small, "user.throttle.iops_max", "150");
    assert_eq!(field(&small, "iops_max").as_deref(), Some("150"));

    // One limit under two forms, or a total with a per-GiB split: EINVAL,
    // the set as it was.
    let before = effective(&small);
    for (name, value) in [
        ("user.throttle.iops", "500"),
        ("user.throttle.iops_rd_per_gb", "5"),
        ("user.throttle.iops_per_gb_min", "300"),
    ] {
        let out = setfattr_out(&small, name, value);
        assert!(!out.status.success(), "{name}={value} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Invalid argument"),
            "{name}: {out:?}"
        );
        assert_eq!(effective(&small), before, "{name} changed the set");
    }
    // A group has no size.
    let out = setfattr_out(m.mnt(), "user.throttle.group.g.iops_per_gb", "3");
    assert!(!out.status.success(), "a group took a per-GiB limit");
}

#[test]
fn cinder_names_directories_and_remount() {
    let mut m = Mount::with_setup(
        |src| {
            std::fs::create_dir(src.join("vms")).unwrap();
            sparse(&src.join("vms"), "a.img", 10 * GIB);
            sparse(&src.join("vms"), "b.img", 30 * GIB);
        },
        &[],
    );
    let dir = m.path("vms");
    setfattr(&dir, "user.throttle.read_bytes_sec_per_gb", "1M");
    setfattr(&dir, "user.throttle.read_bytes_sec_per_gb_min", "20M");
    // Stored and listed under our names.
    let listed = run(
        "getfattr",
        &[
            "--absolute-names",
            "-d",
            "-m",
            "user.throttle",
            dir.to_str().unwrap(),
        ],
    );
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("user.throttle.bps_rd_per_gb=\"1048576\"")
            && listed.contains("user.throttle.bps_rd_per_gb_min=\"20971520\""),
        "{listed}"
    );
    // Each file below gets its own size's limit from the directory's set.
    let a = m.path("vms/a.img");
    let b = m.path("vms/b.img");
    assert_eq!(
        field(&a, "bps_rd").as_deref(),
        Some((20 << 20).to_string().as_str())
    );
    assert_eq!(
        field(&b, "bps_rd").as_deref(),
        Some((30 << 20).to_string().as_str())
    );
    assert_eq!(field(&b, "source").as_deref(), Some("directory:/vms"));

    let src = m.src().to_path_buf();
    m.terminate();
    let m2 = Mount::with_source(&src, &[]);
    let b = m2.path("vms/b.img");
    assert_eq!(
        field(&b, "bps_rd").as_deref(),
        Some((30 << 20).to_string().as_str())
    );
    assert_eq!(field(&b, "bps_rd_per_gb_min").as_deref(), Some("20971520"));
}

/// `user.throttle.image_format=raw` on a directory: a raw disk's guest
/// writing a qcow2 header gets no larger limit, not even after a remount,
/// where `auto` (the mount remembers nothing) believes the header.
#[test]
fn image_format_raw_keeps_a_forged_header_out_across_a_remount() {
    let setup = |src: &Path| {
        for dir in ["raw", "auto"] {
            std::fs::create_dir(src.join(dir)).unwrap();
            sparse(&src.join(dir), "guest.img", 100 * GIB);
        }
    };
    let mut m = Mount::with_setup(setup, &["-o", "iops_per_gb=3"]);
    setfattr(&m.path("raw"), "user.throttle.image_format", "raw");
    for dir in ["raw", "auto"] {
        let image = m.path(&format!("{dir}/guest.img"));
        let guest = OpenOptions::new().write(true).open(&image).unwrap();
        // 1 TiB by the header: 3072 IOPS instead of 300.
        guest
            .write_all_at(&forged_qcow2_header(1 << 40), 0)
            .unwrap();
        let e = effective(&image);
        assert_eq!(
            (e["iops"].as_str(), e["size_from"].as_str()),
            ("300", "file"),
            "{dir}: {e:?}"
        );
    }
    let e = effective(&m.path("raw/guest.img"));
    assert_eq!(e["image_format"], "raw", "{e:?}");
    assert_eq!(e["image_format_source"], "directory:/raw", "{e:?}");

    let src = m.src().to_path_buf();
    m.terminate();
    let m = Mount::with_source(&src, &["-o", "iops_per_gb=3"]);
    let (raw, auto) = (m.path("raw/guest.img"), m.path("auto/guest.img"));
    let e = effective(&auto);
    assert_eq!(
        (e["iops"].as_str(), e["size_from"].as_str()),
        ("3072", "qcow2"),
        "auto: {e:?}"
    );
    let e = effective(&raw);
    assert_eq!(
        (e["iops"].as_str(), e["size_from"].as_str()),
        ("300", "file"),
        "raw: {e:?}"
    );

    // Live on a handle held open: the file's own `auto` wins over the
    // directory's `raw` at once, and its removal gives `raw` back.
    let _held = open_direct(&raw, false);
    setfattr(&raw, "user.throttle.image_format", "auto");
    assert_eq!(field(&raw, "iops").as_deref(), Some("3072"));
    run(
        "setfattr",
        &["-x", "user.throttle.image_format", raw.to_str().unwrap()],
    );
    assert_eq!(field(&raw, "iops").as_deref(), Some("300"));

    // Another value: EINVAL, the old one kept.
    let dir = m.path("raw");
    let out = setfattr_out(&dir, "user.throttle.image_format", "vmdk");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Invalid argument"),
        "{out:?}"
    );
    assert_eq!(
        getfattr(&dir, "user.throttle.image_format").as_deref(),
        Some("raw")
    );
    assert_eq!(field(&raw, "image_format").as_deref(), Some("raw"));
}

/// `qcow2` and `auto` read a real qcow2 image's virtual size, `raw` (here
/// the mount option) its file size; `qcow2` on a file without a header
/// counts the file size.
#[test]
fn image_format_qcow2_auto_and_the_mount_option() {
    let m = Mount::with_setup(
        |src| sparse(src, "plain.img", 40 * GIB),
        &["-o", "iops_per_gb=3,iops_per_gb_min=100,image_format=raw"],
    );
    let image = m.path("x.qcow2");
    qemu_img_create("qcow2", &image, "50G");
    let e = effective(&image);
    assert_eq!(
        (e["iops"].as_str(), e["size_from"].as_str()),
        ("100", "file"),
        "{e:?}"
    );
    assert_eq!(e["image_format_source"], "mount", "{e:?}");
    for format in ["qcow2", "auto"] {
        setfattr(&image, "user.throttle.image_format", format);
        let e = effective(&image);
        assert_eq!(
            (e["iops"].as_str(), e["size_from"].as_str()),
            ("150", "qcow2"),
            "{format}: {e:?}"
        );
        assert_eq!(
            (
                e["image_format"].as_str(),
                e["image_format_source"].as_str()
            ),
            (format, "file")
        );
    }
    let plain = m.path("plain.img");
    setfattr(&plain, "user.throttle.image_format", "qcow2");
    let e = effective(&plain);
    assert_eq!(
        (e["iops"].as_str(), e["size_from"].as_str()),
        ("120", "file"),
        "{e:?}"
    );
    // Shown by `throttlefs get`, removed by `throttlefs unset`.
    let out = common::ctl_ok(&["get", plain.to_str().unwrap()]);
    assert!(out.contains("own image format: qcow2"), "{out}");
    common::ctl_ok(&["unset", plain.to_str().unwrap(), "image_format"]);
    assert_eq!(field(&plain, "image_format").as_deref(), Some("raw"));
    common::ctl_ok(&["set", "--image-format", "auto", plain.to_str().unwrap()]);
    assert_eq!(
        getfattr(&plain, "user.throttle.image_format").as_deref(),
        Some("auto")
    );
}
