//! The plain table of a reading: `stat`'s (with totals, every row) and
//! `top`'s (rates only, cut to the terminal).

use std::fmt::Write as _;

use super::snapshot::{BucketRow, FileRow, GroupRow, Report};
use crate::stats::Activity;

/// `stat`'s table: every group and file of each mount, then the files
/// named, with totals; then a line for each mount with rows left out.
pub fn render(report: &Report) -> String {
    let mut rows = Vec::new();
    for m in &report.mounts {
        rows.extend(m.groups.iter().map(Row::group));
        rows.extend(m.files.iter().map(Row::file));
    }
    rows.extend(report.files.iter().map(Row::file));
    let mut out = table(&rows, true, usize::MAX);
    for m in report.mounts.iter().filter(|m| m.files_unlisted > 0) {
        let _ = writeln!(
            out,
            "{}: {} more files open or active, not listed",
            m.mount, m.files_unlisted
        );
    }
    for m in report.mounts.iter().filter(|m| m.groups_unlisted > 0) {
        let _ = writeln!(
            out,
            "{}: {} more groups, not listed",
            m.mount, m.groups_unlisted
        );
    }
    out
}

/// One line of the table: a file or a group.
#[derive(Clone, Debug)]
pub struct Row {
    /// The file's path, or `group NAME`.
    pub label: String,
    pub is_group: bool,
    pub group: String,
    /// Limits in force, made short (`bps_wr=10M`), and where from.
    pub limits: String,
    pub activity: Activity,
    /// Open handles, or members for a group.
    pub count: Option<u64>,
    /// The burst left (`burst_left`), or `-`.
    pub burst: String,
}

impl Row {
    pub fn file(f: &FileRow) -> Row {
        let mut limits = describe_limits(&f.limits, &f.source);
        if !f.qos.is_empty() {
            let qos: Vec<String> = f
                .qos
                .iter()
                .map(|(n, v)| format!("{n}={}", short_value(n, v)))
                .collect();
            limits.push_str(&format!("; {}", qos.join(",")));
        }
        if let Some(sized) = sizing_note(&f.sizing) {
            limits.push_str(&format!("; {sized}"));
        }
        if f.passthrough > 0 {
            limits.push_str(&format!("; {}", passthrough_note(f.passthrough)));
        }
        Row {
            label: f.path.clone(),
            is_group: false,
            group: f.group.clone().unwrap_or_else(|| "-".into()),
            limits,
            activity: f.activity,
            count: f.open,
            burst: burst_left(&f.buckets),
        }
    }

    pub fn group(g: &GroupRow) -> Row {
        let mut limits = describe_limits(&g.limits, &g.source);
        if g.reserved_iops > 0 || g.reserved_bps > 0 {
            let reserved: Vec<String> = [("iops", g.reserved_iops), ("bps", g.reserved_bps)]
                .iter()
                .filter(|(_, v)| *v > 0)
                .map(|(unit, v)| format!("{unit}={}", short_value(unit, &v.to_string())))
                .collect();
            limits.push_str(&format!("; reserved {}", reserved.join(",")));
            if g.oversubscribed {
                limits.push_str(" OVERSUBSCRIBED");
            }
        }
        Row {
            label: format!("group {}", g.name),
            is_group: true,
            group: g.name.clone(),
            limits,
            activity: g.activity,
            count: Some(g.members),
            burst: burst_left(&g.buckets),
        }
    }
}

/// Of the buckets with a `*_max` burst, the one with the least balance:
/// the seconds a flow at its burst rate may go on, and the balance in
/// percent (`4.4s 100%`); `-` without a burst (or buckets not read, as
/// for the files `top` and a mount's `stat` list).
pub fn burst_left(buckets: &[BucketRow]) -> String {
    let least = buckets
        .iter()
        .filter_map(|b| Some((b.burst_balance_pct?, b)))
        .min_by_key(|(pct, _)| *pct);
    match least {
        None => "-".into(),
        Some((pct, b)) => match b.burst_left_ms {
            Some(ms) => format!("{:.1}s {pct}%", ms as f64 / 1000.0),
            None => format!("{pct}%"),
        },
    }
}

/// A limit value made short: sizes with a binary suffix when exact.
pub fn short_value(name: &str, value: &str) -> String {
    if name.ends_with("_max_length") {
        return format!("{value}s");
    }
    let bytes = name.starts_with("bps") || name == "iops_size" || name == "reserve_bps";
    match value.parse::<u64>() {
        Ok(mut n) if bytes && n > 0 => {
            let mut suffix = "";
            for s in ["K", "M", "G", "T", "P", "E"] {
                if n % 1024 != 0 {
                    break;
                }
                n /= 1024;
                suffix = s;
            }
            format!("{n}{suffix}")
        }
        _ => value.to_string(),
    }
}

/// What `n` open handles in passthrough mean for the limits shown.
pub fn passthrough_note(n: u64) -> String {
    let handles = if n == 1 { "handle" } else { "handles" };
    format!("{n} passthrough {handles} not throttled")
}

/// The disk size per-GiB limits were computed for (`50 GiB qcow2`), from
/// the `sizing` fields of a file; `None` without per-GiB limits.
pub fn sizing_note(sizing: &[(String, String)]) -> Option<String> {
    let field = |name: &str| sizing.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let gib = field("size_gib")?;
    let from = field("size_from").map_or("", |f| f.as_str());
    Some(
        format!("per-GiB limits for {gib} GiB {from}")
            .trim_end()
            .to_string(),
    )
}

fn describe_limits(limits: &[(String, String)], source: &str) -> String {
    let list: Vec<String> = limits
        .iter()
        .map(|(n, v)| format!("{n}={}", short_value(n, v)))
        .collect();
    let list = if list.is_empty() {
        "none".to_string()
    } else {
        list.join(",")
    };
    format!("{list} ({source})")
}

fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1024.0 * 1024.0))
}

const HEADERS: [&str; 9] = [
    "READ MiB/s",
    "WRITE MiB/s",
    "R IOPS",
    "W IOPS",
    "WAITING",
    "WAITED s",
    "BURST LEFT",
    "GROUP",
    "PATH",
];
const TOTAL_HEADERS: [&str; 3] = ["READ MiB", "WRITE MiB", "OPEN"];

/// The table: right-aligned numbers, then group, path and limits, each
/// line cut at `width` characters. With `totals`, the bytes moved since
/// the mount and the open handles too.
pub fn table(rows: &[Row], totals: bool, width: usize) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let a = &r.activity;
            let mut c = vec![
                mib(a.bytes_per_sec[0]),
                mib(a.bytes_per_sec[1]),
                a.ops_per_sec[0].to_string(),
                a.ops_per_sec[1].to_string(),
                a.waiting.to_string(),
                if r.is_group {
                    "-".to_string()
                } else {
                    format!("{:.2}", a.wait_ns as f64 / 1e9)
                },
                r.burst.clone(),
            ];
            if totals {
                c.push(mib(a.bytes[0]));
                c.push(mib(a.bytes[1]));
                c.push(r.count.map_or("-".into(), |n| n.to_string()));
            }
            c.push(r.group.clone());
            c.push(r.label.clone());
            c.push(r.limits.clone());
            c
        })
        .collect();
    let mut headers: Vec<&str> = HEADERS[..7].to_vec();
    if totals {
        headers.extend(TOTAL_HEADERS);
    }
    headers.extend(&HEADERS[7..]);
    headers.push("LIMITS (FROM)");
    let numbers = headers.len() - 3;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cols.iter().zip(&widths).enumerate() {
            let last = i + 1 == cols.len();
            let _ = match (i < numbers, last) {
                (true, _) => write!(out, "{c:>w$}  "),
                (false, false) => write!(out, "{c:<w$}  "),
                (false, true) => write!(out, "{c}"),
            };
        }
        let mut out: String = out.chars().take(width).collect();
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(headers.clone());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values() {
        assert_eq!(short_value("bps_wr", "10485760"), "10M");
        assert_eq!(short_value("bps", "1000"), "1000");
        assert_eq!(short_value("iops", "1024"), "1024");
        assert_eq!(short_value("bps_max_length", "0.5"), "0.5s");
        assert_eq!(short_value("iops_size", "4096"), "4K");
    }

    #[test]
    fn burst_left_shows_the_bucket_with_the_least() {
        let bucket = |name: &str, ms, pct| BucketRow {
            name: name.into(),
            burst_left_ms: ms,
            burst_balance_pct: pct,
            ..BucketRow::default()
        };
        assert_eq!(burst_left(&[]), "-");
        assert_eq!(burst_left(&[bucket("iops", None, None)]), "-");
        let both = [
            bucket("bps_rd", Some(4444), Some(100)),
            bucket("iops_wr", Some(1260), Some(25)),
            bucket("iops", None, None),
        ];
        assert_eq!(burst_left(&both), "1.3s 25%");
        assert_eq!(burst_left(&[bucket("bps", None, Some(50))]), "50%");
    }

    #[test]
    fn a_file_with_passthrough_handles_says_so() {
        let f = FileRow {
            path: "/mnt/a".into(),
            open: Some(2),
            passthrough: 1,
            source: "file".into(),
            limits: vec![("bps_rd".into(), "4194304".into())],
            ..FileRow::default()
        };
        assert_eq!(
            Row::file(&f).limits,
            "bps_rd=4M (file); 1 passthrough handle not throttled"
        );
        let none = FileRow {
            passthrough: 0,
            ..f
        };
        assert_eq!(Row::file(&none).limits, "bps_rd=4M (file)");
        let weighted = FileRow {
            qos: vec![
                ("weight".into(), "200".into()),
                ("reserve_bps".into(), "1048576".into()),
            ],
            ..none
        };
        assert_eq!(
            Row::file(&weighted).limits,
            "bps_rd=4M (file); weight=200,reserve_bps=1M"
        );
        let g = GroupRow {
            name: "t".into(),
            source: "mount".into(),
            limits: vec![("iops".into(), "1000".into())],
            reserved_iops: 1200,
            oversubscribed: true,
            ..GroupRow::default()
        };
        assert_eq!(
            Row::group(&g).limits,
            "iops=1000 (mount); reserved iops=1200 OVERSUBSCRIBED"
        );
    }
}
