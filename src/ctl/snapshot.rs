//! The model every output format renders: one reading of what a mount or
//! a file is doing ([`Report`]), parsed from the generated attributes: `user.throttle.active` and
//! `user.throttle.group.NAME.stats` on a mount root (one read each, however
//! many files), `user.throttle.stats` and `user.throttle.effective` on a
//! file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::attr::{get_attr, get_text, io_failure};
use super::failure::Failure;
use crate::stats::Activity;
use crate::xattr::{self, unescape_value};

/// One bucket in force, as `user.throttle.stats` (or a group's) shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketRow {
    /// The limit's name: `bps_rd`, `iops`, ...
    pub name: String,
    /// Units (bytes or operations) in the bucket, and what it holds.
    pub level: u64,
    pub capacity: u64,
    /// With a `*_max` burst: how long a flow at the burst rate may go on.
    pub burst_left_ms: Option<u64>,
    /// With a `*_max` burst: room left, in percent of the capacity.
    pub burst_balance_pct: Option<u64>,
}

/// Bucket fields (`NAME_level`, ...) in the order they come, one row per
/// bucket. Takes `key` if it is one (prefixed with `prefix`).
fn parse_bucket_field(buckets: &mut Vec<BucketRow>, prefix: &str, key: &str, value: &str) -> bool {
    let Some(key) = key.strip_prefix(prefix) else {
        return false;
    };
    for suffix in [
        "_level",
        "_capacity",
        "_burst_left_ms",
        "_burst_balance_pct",
    ] {
        let Some(name) = key.strip_suffix(suffix) else {
            continue;
        };
        if crate::throttle::BucketKind::from_name(name).is_none() {
            return false;
        }
        let row = match buckets.iter().position(|b| b.name == name) {
            Some(i) => &mut buckets[i],
            None => {
                buckets.push(BucketRow {
                    name: name.to_string(),
                    ..BucketRow::default()
                });
                buckets.last_mut().expect("just pushed")
            }
        };
        let n = value.parse().unwrap_or(0);
        match suffix {
            "_level" => row.level = n,
            "_capacity" => row.capacity = n,
            "_burst_left_ms" => row.burst_left_ms = Some(n),
            _ => row.burst_balance_pct = Some(n),
        }
        return true;
    }
    false
}

/// One file: where it is, what it did, what limits it is under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRow {
    /// Absolute: the mount point joined with the path the mount reports,
    /// or the path given, made absolute.
    pub path: String,
    /// Open handles; `None` when the file was asked for directly.
    pub open: Option<u64>,
    /// Open handles in passthrough: not throttled, their I/O not counted.
    pub passthrough: u64,
    pub activity: Activity,
    /// `file`, `directory:/path` or `mount` (`unknown` if never resolved).
    pub source: String,
    /// (name, canonical value) of each limit in force.
    pub limits: Vec<(String, String)>,
    pub group: Option<String>,
    pub group_source: Option<String>,
    /// (name, value) of its weight and reservations in force (`weight`,
    /// `reserve_iops`, `reserve_bps`), for a group member or a file that
    /// sets them.
    pub qos: Vec<(String, String)>,
    /// With per-GiB limits, the size they were computed for and what
    /// came of it: `size`, `size_gib`, `size_from`, `image_format`,
    /// `image_format_source`, `per_gb_limits` and
    /// any `*_ignored` burst, as `user.throttle.effective` gives them.
    pub sizing: Vec<(String, String)>,
    /// Its buckets in force, and its group's (only when the file was
    /// asked for by path: `user.throttle.active` does not list them).
    pub buckets: Vec<BucketRow>,
    pub group_buckets: Vec<BucketRow>,
}

/// One throttle group of a mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupRow {
    pub name: String,
    /// `root`, `mount` or `none`.
    pub source: String,
    pub limits: Vec<(String, String)>,
    pub members: u64,
    /// The members' reservations summed, and whether they pass the
    /// group's limit.
    pub reserved_iops: u64,
    pub reserved_bps: u64,
    pub oversubscribed: bool,
    pub buckets: Vec<BucketRow>,
    /// Totals released through the group (wait_ns and the rates are not
    /// kept per group: the rates are the sum of its listed members', 0 for
    /// a group none of whose members is listed).
    pub activity: Activity,
}

/// A mount root's reading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountSnapshot {
    pub mount: String,
    pub files: Vec<FileRow>,
    /// Files open or active that did not fit in `user.throttle.active`.
    pub files_unlisted: u64,
    pub groups: Vec<GroupRow>,
    /// Groups the mount knows that did not fit in its `groups=` line.
    pub groups_unlisted: u64,
}

/// Everything one `stat` read.
#[derive(Debug, Default)]
pub struct Report {
    pub mounts: Vec<MountSnapshot>,
    /// Files named on the command line.
    pub files: Vec<FileRow>,
}

/// Reads each path: a directory must be a mount root, anything else is a
/// file on a mount.
pub fn collect(paths: &[PathBuf]) -> Result<Report, Failure> {
    let mut report = Report::default();
    // A path named twice (`stat MNT MNT/`) is reported once: twice would
    // repeat every series of the Prometheus output.
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        if !seen.insert(absolute(path)) {
            continue;
        }
        if path.is_dir() {
            report.mounts.push(of_mount(path)?);
        } else {
            report.files.push(of_file(path)?);
        }
    }
    Ok(report)
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn join(mount: &str, rel: &str) -> String {
    format!("{}{}", mount.trim_end_matches('/'), rel)
}

fn is_limit(name: &str) -> bool {
    crate::options::limit_names().iter().any(|n| n == name)
}

/// Parses `user.throttle.active` of the mount at `mount`.
/// `NAME:VALUE,...` of `user.throttle.active`'s `limits=` and `qos=`
/// fields, as (name, value) pairs.
fn name_value_list(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

pub fn parse_active(mount: &str, text: &str) -> (Vec<FileRow>, u64) {
    let mut files = Vec::new();
    let mut unlisted = 0;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("files_unlisted=") {
            unlisted = n.parse().unwrap_or(0);
            continue;
        }
        if !line.starts_with("path=") {
            continue;
        }
        let mut row = FileRow {
            open: Some(0),
            ..FileRow::default()
        };
        for field in line.split(' ') {
            let Some((name, value)) = field.split_once('=') else {
                continue;
            };
            let value = unescape_value(value);
            match name {
                "path" => row.path = join(mount, &value),
                "open" => row.open = value.parse().ok(),
                "source" => row.source = value,
                "group" => row.group = Some(value),
                "group_source" => row.group_source = Some(value),
                xattr::PASSTHROUGH_HANDLES => row.passthrough = value.parse().unwrap_or(0),
                "qos" => row.qos = name_value_list(&value),
                "size_gib" | "size_from" => row.sizing.push((name.to_string(), value)),
                "limits" => row.limits = name_value_list(&value),
                _ => {
                    row.activity.set(name, value.parse().unwrap_or(0));
                }
            }
        }
        files.push(row);
    }
    (files, unlisted)
}

/// The `groups=A,B,... [groups_unlisted=K]` line of `user.throttle.active`:
/// the groups the mount knows (from `--group` and the root's attributes).
pub fn parse_known_groups(text: &str) -> (Vec<String>, u64) {
    let Some(line) = text.lines().find(|l| l.starts_with("groups=")) else {
        return (Vec::new(), 0);
    };
    let (mut groups, mut unlisted) = (Vec::new(), 0);
    for field in line.split(' ') {
        match field.split_once('=') {
            Some(("groups", list)) => {
                groups = list
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            Some(("groups_unlisted", n)) => unlisted = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    (groups, unlisted)
}

/// Parses `user.throttle.effective` into `row`.
pub fn parse_effective(row: &mut FileRow, text: &str) {
    for line in text.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        match name {
            "source" => row.source = value.to_string(),
            "group" => row.group = Some(value.to_string()),
            "group_source" => row.group_source = Some(value.to_string()),
            xattr::PASSTHROUGH_HANDLES => row.passthrough = value.parse().unwrap_or(0),
            _ if is_limit(name) => row.limits.push((name.to_string(), value.to_string())),
            _ if crate::qos::is_name(name) => row.qos.push((name.to_string(), value.to_string())),
            "size"
            | "size_gib"
            | "size_from"
            | "per_gb_limits"
            | "image_format"
            | "image_format_source" => row.sizing.push((name.to_string(), value.to_string())),
            _ if name.ends_with("_ignored") => {
                row.sizing.push((name.to_string(), value.to_string()))
            }
            _ => {}
        }
    }
}

/// Parses `user.throttle.group.NAME.stats`.
pub fn parse_group(name: &str, text: &str) -> GroupRow {
    let mut row = GroupRow {
        name: name.to_string(),
        ..GroupRow::default()
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "source" => row.source = value.to_string(),
            "members" => row.members = value.parse().unwrap_or(0),
            "reserved_iops" => row.reserved_iops = value.parse().unwrap_or(0),
            "reserved_bps" => row.reserved_bps = value.parse().unwrap_or(0),
            "oversubscribed" => row.oversubscribed = value == "1",
            _ if is_limit(key) => row.limits.push((key.to_string(), value.to_string())),
            _ if parse_bucket_field(&mut row.buckets, "", key, value) => {}
            _ => {
                row.activity.set(key, value.parse().unwrap_or(0));
            }
        }
    }
    row
}

/// One file asked for by path: two reads (stats and effective).
pub fn of_file(path: &Path) -> Result<FileRow, Failure> {
    let stats = get_text(path, xattr::STATS).map_err(|e| io_failure(path, "stats", &e))?;
    let effective =
        get_text(path, xattr::EFFECTIVE).map_err(|e| io_failure(path, "effective", &e))?;
    let mut row = FileRow {
        path: absolute(path).display().to_string(),
        ..FileRow::default()
    };
    for line in stats.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if !parse_bucket_field(&mut row.group_buckets, "group_", name, value)
            && !parse_bucket_field(&mut row.buckets, "", name, value)
        {
            row.activity.set(name, value.parse().unwrap_or(0));
        }
    }
    parse_effective(&mut row, &effective);
    Ok(row)
}

/// A mount root: one read of `user.throttle.active`, then one of each
/// group's stats: every group the mount knows, and those of the files
/// listed (a group named only by members' attributes).
pub fn of_mount(root: &Path) -> Result<MountSnapshot, Failure> {
    let text = get_text(root, xattr::ACTIVE).map_err(|e| match e.raw_os_error() {
        Some(libc::ENODATA) => Failure::failed(format!(
            "{}: not the root of a throttlefs mount",
            root.display()
        )),
        _ => io_failure(root, "active", &e),
    })?;
    let mount = absolute(root).display().to_string();
    let (files, files_unlisted) = parse_active(&mount, &text);
    let (known, groups_unlisted) = parse_known_groups(&text);
    let names: BTreeSet<&String> = known
        .iter()
        .chain(files.iter().filter_map(|f| f.group.as_ref()))
        .collect();
    let mut groups = Vec::new();
    for name in names {
        let attr = format!("{}stats", xattr::group_prefix(name));
        let text = get_text(root, &attr).map_err(|e| io_failure(root, &attr, &e))?;
        let mut row = parse_group(name, &text);
        for f in files.iter().filter(|f| f.group.as_ref() == Some(name)) {
            for i in 0..2 {
                row.activity.bytes_per_sec[i] += f.activity.bytes_per_sec[i];
                row.activity.ops_per_sec[i] += f.activity.ops_per_sec[i];
            }
            row.activity.wait_ns += f.activity.wait_ns;
        }
        groups.push(row);
    }
    Ok(MountSnapshot {
        mount,
        files,
        files_unlisted,
        groups,
        groups_unlisted,
    })
}

/// Whether `path` is a directory that answers `user.throttle.active`: a
/// mount root.
pub fn is_mount_root(path: &Path) -> bool {
    path.is_dir() && get_attr(path, xattr::ACTIVE).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Effective, Origin};
    use crate::throttle::Limits;
    use crate::xattr::{ActiveFile, render_active};

    #[test]
    fn active_round_trips_through_render_and_parse() {
        let mut limits = Limits::default();
        crate::options::apply_limit(&mut limits, "bps_wr", "10M").unwrap();
        crate::options::apply_limit(&mut limits, "bps_wr_max", "20M").unwrap();
        let activity = Activity {
            bytes: [1, 2],
            ops: [3, 4],
            wait_ns: 5,
            waiting: 6,
            bytes_per_sec: [7, 8],
            ops_per_sec: [9, 10],
        };
        let odd = "/dir with space/a\\b\nc=d\te";
        let files = vec![ActiveFile {
            ino: 7,
            open: 2,
            passthrough: 1,
            activity,
            effective: Some(Effective {
                limits,
                origin: Origin::Directory("/dir with space".into()),
                group: Some(("g.1".into(), Origin::File)),
                qos: Default::default(),
                sizing: None,
                image_format: (Default::default(), Origin::Mount),
            }),
        }];
        let text = render_active(files, |_| odd.to_string(), &[], 64 * 1024);
        let (rows, unlisted) = parse_active("/mnt/", &text);
        assert_eq!(unlisted, 0);
        assert_eq!(rows.len(), 1, "{text}");
        let r = &rows[0];
        assert_eq!(r.path, format!("/mnt{odd}"));
        assert_eq!(r.open, Some(2));
        assert_eq!(r.passthrough, 1);
        assert_eq!(r.activity, activity);
        assert_eq!(r.source, "directory:/dir with space");
        assert_eq!(
            r.limits,
            vec![
                ("bps_wr".to_string(), "10485760".to_string()),
                ("bps_wr_max".to_string(), "20971520".to_string())
            ]
        );
        assert_eq!(r.group.as_deref(), Some("g.1"));
        assert_eq!(r.group_source.as_deref(), Some("file"));
    }

    #[test]
    fn active_is_bounded_busiest_first() {
        let files: Vec<ActiveFile> = (0..2000u64)
            .map(|i| ActiveFile {
                ino: i,
                open: 1,
                passthrough: 0,
                activity: Activity {
                    bytes_per_sec: [i, 0],
                    ..Activity::default()
                },
                effective: None,
            })
            .collect();
        let text = render_active(files, |i| format!("/file-{i:04}"), &[], 64 * 1024);
        assert!(text.len() <= 64 * 1024);
        let (rows, unlisted) = parse_active("", &text);
        assert_eq!(rows.len() as u64 + unlisted, 2000);
        assert!(unlisted > 0);
        assert_eq!(rows[0].path, "/file-1999");
        assert!(text.starts_with("files=2000\n"));
    }

    #[test]
    fn known_groups_round_trip_and_are_bounded() {
        let few = vec!["a".to_string(), "b.c".to_string()];
        let text = render_active(Vec::new(), |_| String::new(), &few, 64 * 1024);
        assert_eq!(text, "files=0\ngroups=a,b.c\n");
        assert_eq!(parse_known_groups(&text), (few, 0));
        let many: Vec<String> = (0..1000).map(|i| format!("{i:064}")).collect();
        let text = render_active(Vec::new(), |_| String::new(), &many, 64 * 1024);
        let (listed, unlisted) = parse_known_groups(&text);
        assert!(unlisted > 0 && listed.len() as u64 + unlisted == 1000);
        assert_eq!(listed[..], many[..listed.len()]);
        assert!(text.len() <= 16 * 1024 + "files=0\n".len());
    }

    #[test]
    fn bucket_fields_round_trip_through_render_and_parse() {
        let mut limits = Limits::default();
        crate::options::apply_limit(&mut limits, "bps_rd", "1M").unwrap();
        crate::options::apply_limit(&mut limits, "bps_rd_max", "10M").unwrap();
        crate::options::apply_limit(&mut limits, "bps_rd_max_length", "4").unwrap();
        crate::options::apply_limit(&mut limits, "iops", "100").unwrap();
        let mut text = String::new();
        crate::stats::render_buckets(&mut text, "", &crate::stats::empty_readings(limits));
        let mut group = Limits::default();
        crate::options::apply_limit(&mut group, "iops_wr", "50").unwrap();
        crate::stats::render_buckets(&mut text, "group_", &crate::stats::empty_readings(group));
        let (mut file, mut of_group) = (Vec::new(), Vec::new());
        for line in text.lines() {
            let (k, v) = line.split_once('=').unwrap();
            assert!(
                parse_bucket_field(&mut of_group, "group_", k, v)
                    || parse_bucket_field(&mut file, "", k, v),
                "{line}"
            );
        }
        let mib = 1024 * 1024;
        assert_eq!(
            file,
            vec![
                BucketRow {
                    name: "bps_rd".into(),
                    level: 0,
                    capacity: 40 * mib,
                    burst_left_ms: Some(4444),
                    burst_balance_pct: Some(100),
                },
                BucketRow {
                    name: "iops".into(),
                    level: 0,
                    capacity: 10,
                    burst_left_ms: None,
                    burst_balance_pct: None,
                },
            ]
        );
        assert_eq!(of_group.len(), 1);
        assert_eq!(
            (of_group[0].name.as_str(), of_group[0].capacity),
            ("iops_wr", 5)
        );
        // Other fields are not taken for buckets.
        assert!(!parse_bucket_field(&mut file, "", "read_bytes", "1"));
        assert!(!parse_bucket_field(&mut file, "", "bogus_level", "1"));
    }

    #[test]
    fn known_groups_line() {
        let text = "files=0\ngroups=a,b.c,d-1 groups_unlisted=3\n";
        assert_eq!(
            parse_known_groups(text),
            (vec!["a".into(), "b.c".into(), "d-1".into()], 3)
        );
        assert_eq!(parse_known_groups("files=0\n"), (Vec::new(), 0));
        // Not taken for a file's line.
        assert_eq!(parse_active("", text).0, Vec::new());
    }
}
