//! `throttlefs set/get/unset/stat/top` against real mounts: round trips
//! through the attributes, refusals that change nothing, exact counters in
//! `stat --json` and `--prometheus`, and `top` in a pseudo-terminal.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::aio::AlignedBuf;
use common::attrs::{list_attrs, sys_get_attr};
use common::{
    KIB, MIB, Mount, assert_elapsed_between, binary, ctl, ctl_ok, loose_upper, make_file,
    open_direct,
};

/// Requests of the known traffic, and their size (O_DIRECT: one request each).
const WRITE_REQUESTS: u64 = 5;
const WRITE_REQUEST_BYTES: u64 = 64 * KIB;
const READ_REQUESTS: u64 = 3;
const READ_REQUEST_BYTES: u64 = 4 * KIB;
/// How long `top` may take to show what it must, and to quit.
const TOP_WAIT: Duration = Duration::from_secs(20);
/// Files held open for the scale measurement.
const SCALE_FILES: usize = 1000;
/// A refresh of `top` with SCALE_FILES open files must stay well under its
/// one-second period (loose: the machine is shared).
const SCALE_REFRESH_MAX: Duration = Duration::from_millis(500);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The `user.throttle.*` attributes stored on a source object, with values.
fn stored(path: &Path) -> BTreeMap<String, String> {
    list_attrs(path)
        .into_iter()
        .filter(|n| n.starts_with("user.throttle."))
        .map(|n| {
            let v = sys_get_attr(path, &n).unwrap_or_default();
            (n, v)
        })
        .collect()
}

#[test]
fn set_get_unset_round_trip() {
    let m = Mount::with_setup(
        |src| {
            fs::create_dir(src.join("dir")).unwrap();
            make_file(&src.join("dir"), "a.img", 4096, 1);
        },
        &["--iops", "500"],
    );
    let file = m.path("dir/a.img");
    let dir = m.path("dir");
    ctl_ok(&[
        "set",
        s(&file),
        "--bps-wr",
        "10M",
        "-o",
        "bps_wr_max=20M,bps_wr_max_length=2s",
        "--iops-rd",
        "100",
    ]);
    let src = m.src_path("dir/a.img");
    assert_eq!(
        stored(&src),
        BTreeMap::from([
            ("user.throttle.bps_wr".into(), "10485760".into()),
            ("user.throttle.bps_wr_max".into(), "20971520".into()),
            ("user.throttle.bps_wr_max_length".into(), "2".into()),
            ("user.throttle.iops_rd".into(), "100".into()),
        ])
    );
    let got = ctl_ok(&["get", s(&file)]);
    assert!(
        got.contains(
            "own limits:      bps_wr=10485760 bps_wr_max=20971520 bps_wr_max_length=2 iops_rd=100\n"
        ),
        "{got}"
    );
    assert!(got.contains("(from file)"), "{got}");

    // Lowering an average below the old burst, together with a new burst:
    // written in an order the mount accepts at every step.
    ctl_ok(&["set", s(&file), "--bps-wr", "40M", "-o", "bps_wr_max=80M"]);
    assert_eq!(
        sys_get_attr(&src, "user.throttle.bps_wr_max").unwrap(),
        "83886080"
    );

    ctl_ok(&["set", s(&dir), "--group", "g1", "--bps", "1M"]);
    ctl_ok(&[
        "unset",
        s(&file),
        "bps_wr_max_length",
        "bps_wr_max",
        "bps_wr",
        "iops_rd",
    ]);
    assert_eq!(stored(&src), BTreeMap::new());
    let got = ctl_ok(&["get", s(&file)]);
    assert!(got.contains("own limits:      none\n"), "{got}");
    assert!(
        got.contains("limits in force: bps=1048576 (from directory:/dir)"),
        "{got}"
    );
    assert!(
        got.contains("group in force:  g1 (from directory:/dir)"),
        "{got}"
    );
    ctl_ok(&["unset", s(&dir), "group", "bps"]);
    let got = ctl_ok(&["get", s(&file)]);
    assert!(
        got.contains("limits in force: iops=500 (from mount)"),
        "{got}"
    );
    assert!(got.contains("group in force:  none"), "{got}");
}

/// The message the mount command gives for the same flags.
fn mount_message(flags: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (src, mnt) = (dir.path().join("s"), dir.path().join("m"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    let mut args = flags.to_vec();
    args.extend([s(&src), s(&mnt)]);
    let out = ctl(&args);
    assert_eq!(out.status.code(), Some(2), "mount {flags:?}");
    String::from_utf8(out.stderr).unwrap()
}

/// Arguments after the file, a word the message must hold, and the mount
/// command's flags for the same value when it has them.
type RefusalCase<'a> = (&'a [&'a str], &'a str, Option<&'a [&'a str]>);

#[test]
fn refusals_exit_2_with_one_line_and_change_nothing() {
    let m = Mount::with_setup(|src| drop(make_file(src, "a.img", 4096, 1)), &[]);
    let file = m.path("a.img");
    let src = m.src_path("a.img");
    ctl_ok(&["set", s(&file), "--bps-rd", "1M", "--group", "g1"]);
    let before = stored(&src);
    assert_eq!(before.len(), 2);
    let cases: &[RefusalCase] = &[
        (&["--bps-wr", "10X"], "bps_wr", Some(&["--bps-wr", "10X"])),
        (&["--iops", "-1"], "iops", Some(&["--iops", "-1"])),
        (
            &["-o", "bps_max=1M"],
            "bps_max",
            Some(&["-o", "bps_max=1M"]),
        ),
        (
            &["--bps-wr", "1M", "--bps-wr", "2M"],
            "twice",
            Some(&["--bps-wr", "1M", "--bps-wr", "2M"]),
        ),
        (
            &["-o", "bps_rd_max=512K"],
            "bps_rd_max",
            Some(&["--bps-rd", "1M", "-o", "bps_rd_max=512K"]),
        ),
        // A conflict with what the file already has.
        (&["--bps", "5M"], "cannot be used together", None),
        (&["--bps-wr", "5M", "--group", "bad name"], "group", None),
        (&["-o", "speed=5"], "speed", None),
        (&[], "nothing to set", None),
    ];
    for (args, needle, mount_flags) in cases {
        let mut argv = vec!["set", s(&file)];
        argv.extend(*args);
        let out = ctl(&argv);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "set {args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "set {args:?}: {err}");
        assert!(err.contains(needle), "set {args:?}: {err}");
        if let Some(flags) = mount_flags {
            assert_eq!(err, mount_message(flags), "set {args:?}");
        }
        assert_eq!(stored(&src), before, "set {args:?} changed something");
    }
    for (names, needle) in [
        (&["bogus"][..], "unknown limit bogus"),
        (&["bps_wr"], "bps_wr: not set"),
        (&["bps_rd", "bps_wr"], "bps_wr: not set"),
    ] {
        let mut argv = vec!["unset", s(&file)];
        argv.extend(names);
        let out = ctl(&argv);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "unset {names:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
        assert_eq!(stored(&src), before);
    }
    // Not on a throttlefs mount: a failure (1), not a usage error.
    let out = ctl(&["get", s(&src)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("not on a throttlefs mount"), "{err}");
}

/// Runs `throttlefs ARGS`, which must be refused: exit 2, one line on
/// stderr holding `needle`; returns that line.
fn refused(args: &[&str], needle: &str) -> String {
    let out = ctl(args);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
    err
}

#[test]
fn group_limits_set_get_unset_and_refusals() {
    let m = Mount::with_setup(
        |src| drop(make_file(src, "a.img", 4096, 1)),
        &["--group", "g1:bps=100M,bps_max=200M"],
    );
    let (mnt, root) = (s(m.mnt()), m.src());
    let got = ctl_ok(&["get", "--group-limits", "g1", mnt]);
    assert_eq!(
        got,
        "own limits:      none\n\
         limits in force: bps=104857600 bps_max=209715200 (from mount: --group at mount time)\n\
         members:         0\n"
    );
    // A burst with its new average: written in an order the mount accepts.
    ctl_ok(&[
        "set",
        mnt,
        "--group-limits",
        "g1",
        "--bps-rd",
        "2M",
        "-o",
        "bps_rd_max=4M",
    ]);
    let expected = BTreeMap::from([
        ("user.throttle.group.g1.bps_rd".into(), "2097152".into()),
        ("user.throttle.group.g1.bps_rd_max".into(), "4194304".into()),
    ]);
    assert_eq!(stored(root), expected);
    let got = ctl_ok(&["get", mnt, "--group-limits", "g1"]);
    assert!(
        got.contains(
            "limits in force: bps_rd=2097152 bps_rd_max=4194304 \
             (from root: user.throttle.group.g1.* on the mount point)\n"
        ),
        "{got}"
    );
    assert!(
        got.starts_with("own limits:      bps_rd=2097152 bps_rd_max=4194304\n"),
        "{got}"
    );

    // Refused values: exit 2, the mount's message for `--group`, nothing
    // changed.
    for (args, needle, mount_flags) in [
        (
            &["--bps", "10X"][..],
            "bps",
            Some(&["--group", "g1:bps=10X"][..]),
        ),
        (
            &["-o", "iops_max=5"],
            "iops_max",
            Some(&["--group", "g1:iops_max=5"]),
        ),
        (&["-o", "bps_rd_max=1M"], "bps_rd_max", None),
        (
            &["--iops", "5", "--group", "g2"],
            "cannot be used with",
            None,
        ),
        (&[], "nothing to set", None),
    ] {
        let mut argv = vec!["set", mnt, "--group-limits", "g1"];
        argv.extend(args);
        let err = refused(&argv, needle);
        if let Some(flags) = mount_flags {
            assert_eq!(err, mount_message(flags), "set {args:?}");
        }
        assert_eq!(stored(root), expected, "set {args:?} changed something");
    }
    let err = refused(
        &["set", mnt, "--group-limits", "bad name", "--bps", "1M"],
        "bad name",
    );
    assert_eq!(err, mount_message(&["--group", "bad name:bps=1M"]));
    // Group limits live on the root only.
    refused(
        &[
            "set",
            s(&m.path("a.img")),
            "--group-limits",
            "g1",
            "--bps",
            "1M",
        ],
        "mount point",
    );
    refused(
        &["unset", mnt, "--group-limits", "g1", "bps_rd"],
        "bps_rd_max",
    );
    refused(&["unset", mnt, "--group-limits", "g1", "iops"], "not set");
    assert_eq!(stored(root), expected);
    assert_eq!(stored(&m.src_path("a.img")), BTreeMap::new());

    // With no set of its own on the root, the mount option's is in force
    // again.
    ctl_ok(&["unset", mnt, "--group-limits", "g1", "bps_rd", "bps_rd_max"]);
    assert_eq!(stored(root), BTreeMap::new());
    let got = ctl_ok(&["get", "--group-limits", "g1", mnt]);
    assert!(got.contains("(from mount: --group at mount time)"), "{got}");
}

#[test]
fn group_limit_set_by_ctl_holds_for_a_member() {
    let data_len = 3 * MIB;
    let m = Mount::with_setup(
        |src| drop(make_file(src, "a.img", data_len, 3)),
        &["--group", "g1:bps=100M"],
    );
    let (mnt, file) = (s(m.mnt()), m.path("a.img"));
    ctl_ok(&["set", mnt, "--group-limits", "g1", "--bps-rd", "2M"]);
    ctl_ok(&["set", s(&file), "--group", "g1"]);
    let (req, avg) = (128 * KIB, 2 * MIB);
    let f = open_direct(&file, false);
    let mut buf = AlignedBuf::zeroed(req as usize);
    let start = std::time::Instant::now();
    for off in (0..data_len).step_by(req as usize) {
        assert_eq!(f.read_at(&mut buf, off).unwrap() as u64, req);
    }
    let elapsed = start.elapsed();
    // The first request and a tenth of a second's burst go at once.
    let lower = (data_len - req) as f64 / avg as f64 - 0.1;
    assert_elapsed_between(
        "3 MiB read in group g1 (bps_rd=2M set with throttlefs set --group-limits)",
        elapsed,
        lower,
        loose_upper(lower),
    );
    let got = ctl_ok(&["get", "--group-limits", "g1", mnt]);
    assert!(got.ends_with("members:         1\n"), "{got}");
}

#[test]
fn stat_lists_every_group_the_mount_knows_even_idle() {
    // More groups with names of the longest kind than the `groups=` line of
    // `user.throttle.active` holds.
    const MANY_GROUPS: usize = 300;
    let long_name = |i: usize| format!("{i:03}{}", "x".repeat(61));
    // Given at mount time: the source's root holds too few attributes.
    let specs: Vec<String> = (0..MANY_GROUPS)
        .map(|i| format!("{}:iops=10", long_name(i)))
        .collect();
    let mut args = vec!["--group", "g1:bps=1M"];
    for spec in &specs {
        args.extend(["--group", spec.as_str()]);
    }
    let many = Mount::start_with(&args);
    let active = common::attrs::getxattr(many.mnt(), "user.throttle.active").unwrap();
    let active = String::from_utf8(active).unwrap();
    assert!(active.len() <= 64 * 1024);
    let line = active.lines().find(|l| l.starts_with("groups=")).unwrap();
    let (list, unlisted) = line.split_once(" groups_unlisted=").expect(line);
    let listed: Vec<&str> = list["groups=".len()..].split(',').collect();
    // Sorted by name: the digits come before the mount's g1.
    assert_eq!(listed[0], long_name(0));
    assert_eq!(
        listed.len() + unlisted.parse::<usize>().unwrap(),
        MANY_GROUPS + 1
    );
    drop(many);

    let m = Mount::with_setup(
        |src| drop(make_file(src, "a.img", 4096, 1)),
        &["--group", "g1:bps=1M"],
    );
    let mnt = s(m.mnt());
    ctl_ok(&["set", mnt, "--group-limits", "g2", "--iops", "10"]);
    // A member's group named by its attribute only, while it is idle, is
    // not known to the mount.
    ctl_ok(&["set", s(&m.path("a.img")), "--group", "g3"]);
    let json = ctl_ok(&["stat", "--json", mnt]);
    assert_eq!(jq(&json, ".files | length"), "0", "{json}");
    assert_eq!(
        jq(
            &json,
            ".groups | map([.name,.source,.members,.read_bytes_per_sec] | map(tostring) | join(\":\")) | join(\" \")"
        ),
        "g1:mount:0:0 g2:root:0:0"
    );
    assert_eq!(jq(&json, ".mounts[0].groups_unlisted"), "0");
}

/// Writes WRITE_REQUESTS requests and reads READ_REQUESTS through `path`
/// with O_DIRECT (one FUSE request each) and returns the file, still open.
fn known_traffic(path: &Path) -> File {
    let f = open_direct(path, true);
    let buf = AlignedBuf::zeroed(WRITE_REQUEST_BYTES as usize);
    for i in 0..WRITE_REQUESTS {
        let n = f.write_at(&buf, i * WRITE_REQUEST_BYTES).unwrap();
        assert_eq!(n as u64, WRITE_REQUEST_BYTES);
    }
    let mut rbuf = AlignedBuf::zeroed(READ_REQUEST_BYTES as usize);
    for i in 0..READ_REQUESTS {
        let n = f.read_at(&mut rbuf, i * READ_REQUEST_BYTES).unwrap();
        assert_eq!(n as u64, READ_REQUEST_BYTES);
    }
    f
}

/// Runs `cmd` with `input` on its stdin and its stdout captured; `Err`
/// only when it cannot be started (a tool that is not installed).
fn output_with_input(cmd: &mut Command, input: &str) -> std::io::Result<Output> {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    Ok(child.wait_with_output().unwrap())
}

fn jq(json: &str, filter: &str) -> String {
    let out = output_with_input(Command::new("jq").args(["-r", filter]), json).expect("jq");
    assert!(out.status.success(), "jq {filter} on {json}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A name that needs escaping in JSON, in Prometheus labels and in
/// `user.throttle.active`.
const ODD_NAME: &str = "we\"ird \\name.img";

#[test]
fn stat_json_counts_known_traffic_exactly() {
    let m = Mount::with_setup(
        |src| {
            make_file(src, ODD_NAME, MIB, 1);
            make_file(src, "idle.img", MIB, 2);
        },
        // Slow enough that the later writes wait in the queue.
        &["--bps-wr", "1M"],
    );
    let path = m.path(ODD_NAME);
    let _open = known_traffic(&path);
    let json = ctl_ok(&["stat", "--json", s(m.mnt()), s(&path)]);
    let mnt = s(m.mnt());
    assert_eq!(jq(&json, ".mounts[0].mount"), mnt);
    assert_eq!(jq(&json, ".mounts[0].files_unlisted"), "0");
    // The idle file, never opened, is not listed; the named one twice (under
    // the mount and as asked).
    assert_eq!(jq(&json, ".files | length"), "2", "{json}");
    let fields = "[.path,.open,.read_bytes,.read_ops,.write_bytes,.write_ops,.waiting,.source,.limits.bps_wr] | map(tostring) | join(\"|\")";
    let expected = format!(
        "{}|{}|{}|{READ_REQUESTS}|{}|{WRITE_REQUESTS}|0|mount|{}",
        path.display(),
        "{open}",
        READ_REQUESTS * READ_REQUEST_BYTES,
        WRITE_REQUESTS * WRITE_REQUEST_BYTES,
        MIB
    );
    assert_eq!(
        jq(&json, &format!(".files[0] | {fields}")),
        expected.replace("{open}", "1")
    );
    assert_eq!(
        jq(&json, &format!(".files[1] | {fields}")),
        expected.replace("{open}", "null")
    );
    // Throttled, so it went through the queue: some wait was counted.
    assert_eq!(jq(&json, ".files[0].wait_ns > 0"), "true");
    // The root attribute is read-only, unlisted, and only on the root.
    let err = common::attrs::setxattr(m.mnt(), "user.throttle.active", b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert!(
        !list_attrs(m.mnt())
            .iter()
            .any(|n| n == "user.throttle.active")
    );
    let err = common::attrs::getxattr(&path, "user.throttle.active").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENODATA));
}

/// Checks the text exposition format: every sample line is
/// `name{labels} value`, its family has exactly one HELP and one TYPE line
/// before its samples, and a family's lines are together.
fn check_exposition(text: &str) {
    let mut series_seen = std::collections::HashSet::new();
    let mut families: Vec<String> = Vec::new();
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut helped = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(
                helped.insert(name.clone(), ()).is_none(),
                "second HELP: {line}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(helped.contains_key(name), "TYPE before HELP: {line}");
            assert!(typed.insert(name.into(), kind.into()).is_none(), "{line}");
            assert!(
                !families.contains(&name.to_string()),
                "family split: {line}"
            );
            families.push(name.into());
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value in {line}"));
        assert!(series_seen.insert(series.to_string()), "twice: {line}");
        let name = series.split('{').next().unwrap();
        assert_eq!(families.last().map(String::as_str), Some(name), "{line}");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if typed[name] == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            // Inside quotes only \\, \" and \n escapes; no raw newline.
            let mut chars = labels[1..labels.len() - 1].chars();
            let mut quoted = false;
            while let Some(c) = chars.next() {
                match (quoted, c) {
                    (true, '\\') => {
                        assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{line}")
                    }
                    (_, '"') => quoted = !quoted,
                    _ => {}
                }
            }
            assert!(!quoted, "{line}");
        }
    }
}

#[test]
fn stat_prometheus_counts_known_traffic_exactly() {
    let m = Mount::with_setup(
        |src| drop(make_file(src, ODD_NAME, MIB, 1)),
        &["--bps-wr", "100M"],
    );
    let path = m.path(ODD_NAME);
    let _open = known_traffic(&path);
    common::attrs::sys_set_attr(&path, "user.throttle.group", "g1");
    let text = ctl_ok(&["stat", "--prometheus", s(m.mnt())]);
    check_exposition(&text);
    // Named twice, the mount is reported once.
    let twice = format!("{}/", m.mnt().display());
    check_exposition(&ctl_ok(&["stat", "--prometheus", s(m.mnt()), &twice]));
    let label = format!("{{file=\"{}/we\\\"ird \\\\name.img\"}}", m.mnt().display());
    for (name, value) in [
        (
            "throttlefs_read_bytes_total",
            READ_REQUESTS * READ_REQUEST_BYTES,
        ),
        ("throttlefs_read_ops_total", READ_REQUESTS),
        (
            "throttlefs_write_bytes_total",
            WRITE_REQUESTS * WRITE_REQUEST_BYTES,
        ),
        ("throttlefs_write_ops_total", WRITE_REQUESTS),
        ("throttlefs_waiting_requests", 0),
        ("throttlefs_open_handles", 1),
    ] {
        let line = format!("{name}{label} {value}\n");
        assert!(text.contains(&line), "no {line:?} in\n{text}");
    }
    let group = format!("{{mount=\"{}\",group=\"g1\"}}", m.mnt().display());
    assert!(
        text.contains(&format!("throttlefs_group_members{group} 1\n")),
        "{text}"
    );
    // promtool, where installed, has the last word on the format.
    if let Ok(out) = output_with_input(
        Command::new("promtool")
            .args(["check", "metrics"])
            .stderr(Stdio::piped()),
        &text,
    ) {
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `top` on a pseudo-terminal: what it drew (all of it) and its process.
struct Top {
    child: std::process::Child,
    master: File,
    screen: Arc<Mutex<String>>,
}

impl Top {
    fn start(mnt: &Path) -> Top {
        let (mut master, mut slave) = (0, 0);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills two descriptors.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &ws,
            )
        };
        assert_eq!(r, 0, "openpty");
        // SAFETY: fresh descriptors, ours.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let child = Command::new(binary())
            .args(["top", "-d", "0.3", s(mnt)])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("spawn top");
        let screen = Arc::new(Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = screen.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Top {
            child,
            master,
            screen,
        }
    }

    /// Waits until `pred` holds for what was drawn so far.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + TOP_WAIT;
        while Instant::now() < deadline {
            if pred(&self.screen.lock().unwrap()) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("top never showed {what}:\n{}", self.screen.lock().unwrap());
    }

    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + TOP_WAIT;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("top did not exit");
    }
}

impl Drop for Top {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of the screen naming `name` whose first column (read MiB/s) is
/// not zero.
fn shows_rate(screen: &str, name: &str) -> bool {
    screen.split(['\n', '\x1b']).any(|l| {
        l.contains(name)
            && l.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
    })
}

#[test]
fn top_shows_the_active_file_and_quits_on_q() {
    let m = Mount::with_setup(
        |src| {
            make_file(src, "busy.img", 8 * MIB, 1);
            make_file(src, "other.img", MIB, 2);
        },
        &["--bps-rd", "2M"],
    );
    // top first: a process spawned while this one has a read queued would
    // close its copy of the descriptor with a FLUSH that waits for it.
    let mut top = Top::start(m.mnt());
    top.wait_for("its header", |t| t.contains("throttlefs top"));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, stop) = (m.path("busy.img"), stop.clone());
        thread::spawn(move || {
            let f = File::open(path).unwrap();
            let mut buf = vec![0u8; 64 * KIB as usize];
            let mut off = 0;
            while !stop.load(Ordering::Relaxed) {
                f.read_exact_at(&mut buf, off).unwrap();
                off = (off + 64 * KIB) % (8 * MIB);
            }
        })
    };
    top.wait_for("busy.img with a read rate", |t| shows_rate(t, "/busy.img"));
    let refreshes = top.screen.lock().unwrap().matches("throttlefs top").count();
    top.wait_for("more refreshes", |t| {
        t.matches("throttlefs top").count() >= refreshes + 2
    });
    top.master.write_all(b"p").unwrap();
    top.wait_for("the path sort", |t| t.contains("sort: path"));
    top.master.write_all(b"q").unwrap();
    assert_eq!(top.exit_code(), Some(0));
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let screen = top.screen.lock().unwrap().clone();
    assert!(
        !screen.contains("other.img"),
        "an idle, closed file is not listed"
    );
    // The alternate screen is left and the cursor shown again.
    assert!(
        screen.ends_with("\x1b[?25h\x1b[?1049l"),
        "{:?}",
        &screen[screen.len().saturating_sub(40)..]
    );
}

#[test]
fn top_restores_the_terminal_on_sigint() {
    let m = Mount::start_with(&[]);
    let mut top = Top::start(m.mnt());
    top.wait_for("its header", |t| t.contains("throttlefs top"));
    // SAFETY: signals our own child.
    unsafe { libc::kill(top.child.id() as i32, libc::SIGINT) };
    assert_eq!(top.exit_code(), Some(0));
    // SAFETY: tcgetattr on the master side reads the pty's settings.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    use std::os::fd::AsRawFd;
    assert_eq!(
        unsafe { libc::tcgetattr(top.master.as_raw_fd(), &mut t) },
        0
    );
    assert_ne!(t.c_lflag & libc::ICANON, 0, "canonical mode back");
    assert_ne!(t.c_lflag & libc::ECHO, 0, "echo back");
}

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a local structure.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// One refresh of `top` (the reading it redraws from) with SCALE_FILES
/// files open, each with some traffic: measured, and bounded loosely.
#[test]
fn top_refresh_with_a_thousand_open_files() {
    raise_nofile();
    let m = Mount::with_setup(
        |src| {
            for i in 0..SCALE_FILES {
                make_file(src, &format!("f{i:04}.img"), 4096, i as u64);
            }
        },
        &["--bps-rd", "100M"],
    );
    let files: Vec<File> = (0..SCALE_FILES)
        .map(|i| {
            let f = File::open(m.path(&format!("f{i:04}.img"))).unwrap();
            let mut buf = [0u8; 512];
            f.read_at(&mut buf, 0).unwrap();
            f
        })
        .collect();
    let mnt: PathBuf = m.mnt().to_path_buf();
    let mut took = Vec::new();
    let mut snap = None;
    for _ in 0..10 {
        let started = Instant::now();
        snap = Some(throttlefs::ctl::snapshot::of_mount(&mnt).expect("snapshot"));
        let shown = throttlefs::ctl::top::screen(
            snap.as_ref().unwrap(),
            throttlefs::ctl::top::Sort::Activity,
            Duration::ZERO,
            (200, 60),
        );
        assert!(shown.contains(".img"));
        took.push(started.elapsed());
    }
    took.sort();
    let snap = snap.unwrap();
    eprintln!(
        "refresh with {SCALE_FILES} open files: median {:?}, max {:?}; {} listed, {} unlisted",
        took[took.len() / 2],
        took[took.len() - 1],
        snap.files.len(),
        snap.files_unlisted
    );
    assert_eq!(
        snap.files.len() as u64 + snap.files_unlisted,
        SCALE_FILES as u64
    );
    assert!(took[took.len() / 2] < SCALE_REFRESH_MAX, "{took:?}");
    drop(files);
}
