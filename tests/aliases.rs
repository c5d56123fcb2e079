//! libvirt `<iotune>` and QEMU `throttling.*` names as aliases of the
//! limits, on real mounts: in `-o` (the limit holds), in `user.throttle.*`
//! attributes (stored and listed under the canonical name, readable and
//! removable by alias), and in `throttlefs set`/`unset`.
//!
//! The timed read follows tests/xattr.rs: O_DIRECT requests of REQ bytes,
//! so N bytes under `avg` B/s (bucket capacity 0.1 s of avg) cannot finish
//! earlier than (N - REQ - 0.1 avg) / avg seconds, a strict lower bound.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use common::attrs::lgetxattr;
use common::{
    KIB, MIB, Mount, assert_elapsed_between, ctl, ctl_ok, getfattr, loose_upper, make_file,
    open_direct, run, run_unchecked, setfattr,
};

/// Request size of the timed read.
const REQ_BYTES: u64 = 128 * KIB;
/// The read limit given under its libvirt name, and how much is read.
const READ_LIMIT_BYTES_PER_SEC: u64 = MIB;
const READ_LEN_BYTES: u64 = 2 * MIB;

/// `getfattr -d -m user.throttle PATH`: the listed attributes with values.
fn dump(path: &Path) -> BTreeMap<String, String> {
    let out = run(
        "getfattr",
        &[
            OsStr::new("--absolute-names"),
            OsStr::new("-d"),
            OsStr::new("-m"),
            OsStr::new("user.throttle"),
            path.as_os_str(),
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

fn effective(path: &Path) -> String {
    getfattr(path, "user.throttle.effective").expect("effective")
}

#[test]
fn libvirt_names_in_o_hold_the_limit() {
    let mut m = Mount::new();
    let data = make_file(m.src(), "vm.img", READ_LEN_BYTES, 7);
    m.start(&[
        "-o",
        &format!("read_bytes_sec={READ_LIMIT_BYTES_PER_SEC},throttling.iops-size=4K"),
    ]);
    let path = m.path("vm.img");
    assert_eq!(
        effective(&path),
        format!("source=mount\nbps_rd={READ_LIMIT_BYTES_PER_SEC}\niops_size=4096\n")
    );
    let file = open_direct(&path, false);
    let mut buf = vec![0u8; REQ_BYTES as usize];
    let start = Instant::now();
    for off in (0..READ_LEN_BYTES).step_by(REQ_BYTES as usize) {
        file.read_exact_at(&mut buf, off).unwrap();
        assert!(buf[..] == data[off as usize..(off + REQ_BYTES) as usize]);
    }
    let avg = READ_LIMIT_BYTES_PER_SEC as f64;
    let lower = (READ_LEN_BYTES as f64 - REQ_BYTES as f64 - avg * 0.1) / avg;
    assert_elapsed_between(
        "read under -o read_bytes_sec",
        start.elapsed(),
        lower,
        loose_upper(lower),
    );
}

#[test]
fn attributes_set_by_alias_are_stored_and_listed_canonically() {
    let m = Mount::with_setup(
        |src| {
            make_file(src, "vm.img", 4096, 1);
        },
        &[],
    );
    let path = m.path("vm.img");
    let set = |name: &str, value: &str| setfattr(&path, name, value);
    set("user.throttle.write_bytes_sec", "10M");
    set("user.throttle.throttling.bps-write-max", "20M");
    set("user.throttle.write_bytes_sec_max_length", "500ms");
    let listed = dump(&path);
    assert_eq!(
        listed,
        BTreeMap::from([
            ("user.throttle.bps_wr".to_string(), "10485760".to_string()),
            (
                "user.throttle.bps_wr_max".to_string(),
                "20971520".to_string()
            ),
            (
                "user.throttle.bps_wr_max_length".to_string(),
                "0.5".to_string()
            ),
        ]),
        "getfattr -d after setting by alias"
    );
    // Stored on the source under the canonical names only.
    let src = m.src_path("vm.img");
    assert_eq!(
        lgetxattr(&src, "user.throttle.bps_wr").unwrap(),
        b"10485760"
    );
    assert!(lgetxattr(&src, "user.throttle.write_bytes_sec").is_err());
    // Read by any of its names.
    for name in [
        "user.throttle.bps_wr",
        "user.throttle.write_bytes_sec",
        "user.throttle.bps-write",
        "user.throttle.throttling.bps-write",
    ] {
        assert_eq!(getfattr(&path, name).as_deref(), Some("10485760"), "{name}");
    }
    // Checked as one set whatever the names: a total with the split.
    let refused = run_unchecked(
        "setfattr",
        &[
            OsStr::new("-n"),
            OsStr::new("user.throttle.total_bytes_sec"),
            OsStr::new("-v"),
            OsStr::new("1M"),
            path.as_os_str(),
        ],
    );
    assert!(!refused.status.success(), "bps with bps_wr was accepted");
    // Removed by alias, in an order that keeps the set valid.
    for name in [
        "user.throttle.bps-write-max-length",
        "user.throttle.write_bytes_sec_max",
        "user.throttle.throttling.bps-write",
    ] {
        run(
            "setfattr",
            &[OsStr::new("-x"), OsStr::new(name), path.as_os_str()],
        );
    }
    assert!(dump(&path).is_empty(), "{:?}", dump(&path));
    assert_eq!(effective(&path), "source=mount\n");
    // Group limits on the root take aliases too.
    setfattr(m.mnt(), "user.throttle.group.t1.total_iops_sec", "400");
    setfattr(
        m.mnt(),
        "user.throttle.group.t1.throttling.iops-total-max",
        "800",
    );
    let root = dump(m.mnt());
    assert_eq!(
        root.get("user.throttle.group.t1.iops").map(String::as_str),
        Some("400")
    );
    assert_eq!(
        root.get("user.throttle.group.t1.iops_max")
            .map(String::as_str),
        Some("800")
    );
    assert_eq!(root.len(), 2, "{root:?}");
}

#[test]
fn set_and_unset_by_alias_round_trip() {
    let m = Mount::with_setup(
        |src| {
            make_file(src, "vm.img", 4096, 2);
        },
        &[],
    );
    let path = m.path("vm.img");
    let p = path.to_str().unwrap();
    ctl_ok(&[
        "set",
        p,
        "-o",
        "read_iops_sec=100,read_iops_sec_max=200,iops-read-max-length=2s,size_iops_sec=8K",
    ]);
    assert_eq!(
        dump(&path),
        BTreeMap::from([
            ("user.throttle.iops_rd".to_string(), "100".to_string()),
            ("user.throttle.iops_rd_max".to_string(), "200".to_string()),
            (
                "user.throttle.iops_rd_max_length".to_string(),
                "2".to_string()
            ),
            ("user.throttle.iops_size".to_string(), "8192".to_string()),
        ])
    );
    let got = ctl_ok(&["get", p]);
    assert!(
        got.contains(
            "own limits:      iops_rd=100 iops_rd_max=200 iops_rd_max_length=2 iops_size=8192"
        ),
        "{got}"
    );
    // The same limit under two names is refused, and nothing changes.
    let out = ctl(&["set", p, "--iops-rd", "5", "-o", "read_iops_sec=6"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "throttlefs: iops_rd given twice (as iops_rd and read_iops_sec)"
    );
    let out = ctl(&["unset", p, "iops_size", "throttling.iops-size"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(dump(&path).len(), 4);
    ctl_ok(&[
        "unset",
        p,
        "read_iops_sec_max_length",
        "throttling.iops-read-max",
        "read_iops_sec",
        "iops-size",
    ]);
    assert!(dump(&path).is_empty(), "{:?}", dump(&path));
    assert_eq!(effective(&path), "source=mount\n");
}
