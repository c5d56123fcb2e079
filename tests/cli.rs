//! Command-line validation: bad options exit 2 with one stderr line naming
//! the option, before anything is mounted.

mod common;

use std::fs;
use std::process::Command;

use common::{Mount, USAGE_EXIT_WAIT, assert_rejected, rejected};

#[test]
fn total_and_split_bps_together() {
    rejected(&["--bps", "1M", "--bps-rd", "1M"], &["bps_rd", "bps-rd"]);
}

#[test]
fn total_and_split_iops_together_via_o() {
    rejected(&["-o", "iops=10,iops_wr=5"], &["iops_wr", "iops-wr"]);
}

#[test]
fn burst_without_average() {
    rejected(&["-o", "bps_max=2M"], &["bps_max"]);
}

#[test]
fn burst_below_average() {
    rejected(&["-o", "bps=2M,bps_max=1M"], &["bps_max"]);
}

#[test]
fn burst_length_without_burst() {
    rejected(
        &["--bps", "1M", "-o", "bps_max_length=5s"],
        &["bps_max_length"],
    );
}

#[test]
fn burst_length_alone() {
    rejected(&["-o", "bps_max_length=5s"], &["bps_max_length"]);
}

#[test]
fn bad_size_suffix() {
    rejected(&["--bps-wr", "12Q"], &["bps-wr", "bps_wr"]);
}

#[test]
fn bad_size_suffix_via_o() {
    rejected(&["-o", "bps_wr=12Q"], &["bps_wr"]);
}

#[test]
fn iops_overflow() {
    rejected(&["--iops", "99999999999999999999999"], &["iops"]);
}

#[test]
fn value_above_qemu_maximum() {
    // QEMU's THROTTLE_VALUE_MAX is 10^15.
    rejected(&["-o", "iops_rd=1000000000000001"], &["iops_rd"]);
}

#[test]
fn unknown_o_option() {
    rejected(&["-o", "frobnicate=1"], &["frobnicate"]);
}

#[test]
fn option_given_twice() {
    rejected(&["--bps", "1M", "-o", "bps=2M"], &["bps"]);
}

#[test]
fn missing_source() {
    let mut m = Mount::new();
    let missing = m.root().join("does-not-exist");
    let missing = missing.to_str().unwrap().to_owned();
    assert_rejected(&mut m, &[&missing, "MNT"], &["does-not-exist", "source"]);
}

#[test]
fn mountpoint_not_empty() {
    let mut m = Mount::new();
    fs::write(m.mnt().join("occupied"), b"x").unwrap();
    assert_rejected(
        &mut m,
        &["SRC", "MNT"],
        &["mnt", "mountpoint", "mount point", "empty"],
    );
    assert_eq!(fs::read(m.mnt().join("occupied")).unwrap(), b"x");
}

#[test]
fn mountpoint_inside_source() {
    let mut m = Mount::new();
    let inner = m.src().join("inner");
    fs::create_dir(&inner).unwrap();
    let inner = inner.to_str().unwrap().to_owned();
    assert_rejected(
        &mut m,
        &["SRC", &inner],
        &["inner", "inside", "source", "mountpoint"],
    );
    assert!(!common::is_mounted(&m.src().join("inner")));
}

#[test]
fn missing_mountpoint_argument() {
    let mut m = Mount::new();
    let src = m.src().to_str().unwrap().to_owned();
    let status = m.run_to_exit(&[&src], USAGE_EXIT_WAIT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "stderr:\n{}",
        m.stderr()
    );
    assert!(!m.stderr().trim().is_empty());
}

#[test]
fn help_exits_zero_and_explains_limits() {
    let out = Command::new(common::binary())
        .arg("--help")
        .output()
        .expect("run throttlefs --help");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--help failed: {}",
        common::describe(common::binary(), &["--help"], &out)
    );
    assert!(
        stdout.contains("limit read bytes per second"),
        "--help does not explain --bps-rd:\n{stdout}"
    );
    for flag in [
        "--bps",
        "--bps-rd",
        "--bps-wr",
        "--iops",
        "--iops-rd",
        "--iops-wr",
        "-o",
    ] {
        assert!(
            stdout.contains(flag),
            "--help does not mention {flag}:\n{stdout}"
        );
    }
}

/// `--help` tells of the commands for a running mount, each on its line.
#[test]
fn help_names_every_command() {
    let out = Command::new(common::binary())
        .arg("--help")
        .output()
        .expect("run throttlefs --help");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for command in ["stat", "top", "set", "get", "unset", "completions"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(command)),
            "--help has no line for {command}:\n{stdout}"
        );
    }
}

#[test]
fn valid_options_mount() {
    // The counterpart of the rejections: a full set of valid QEMU options
    // is accepted and mounts.
    let m = Mount::start_with(&[
        "--bps-rd",
        "10M",
        "--iops-wr",
        "1000",
        "-o",
        "bps_wr=5M,bps_wr_max=10M,bps_wr_max_length=2s,iops_rd=500,iops_rd_max=1000,iops_size=4K,fsname=throttle-test",
    ]);
    assert!(m.is_mounted());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = m.mnt().to_str().unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mnt))
        .expect("mount in mountinfo");
    assert!(
        line.contains("throttle-test"),
        "fsname=throttle-test not passed to the mount: {line}"
    );
}

#[test]
fn mountpoint_with_a_live_mount_is_refused() {
    // The first mount's source is empty, so its mount point looks empty.
    let first = Mount::start_with(&[]);
    let mnt = first.mnt().to_str().unwrap().to_owned();
    let mut second = Mount::new();
    assert_rejected(
        &mut second,
        &["SRC", &mnt],
        &["already mounted", "mountpoint"],
    );
    let stacked = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(mnt.as_str()))
        .count();
    assert_eq!(stacked, 1, "one mount on {mnt}");
    assert!(
        fs::read_dir(first.mnt()).is_ok(),
        "the first mount still serves"
    );
}
