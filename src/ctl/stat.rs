//! `throttlefs stat MOUNTPOINT|FILE...`: one snapshot, as a table, JSON or
//! Prometheus text; and the table both `stat` and `top` draw.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Parser;

use super::snapshot::{self, FileRow, GroupRow, MountSnapshot};
use super::{Failure, parse};
use crate::stats::Activity;

#[derive(Parser, Debug)]
#[command(
    about = "One snapshot of what the throttle does: for a mount point, its files that are \
             open or active and every group it knows; for a file, that file"
)]
struct StatCli {
    /// JSON instead of a table
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Prometheus text exposition format (for node_exporter's textfile collector)
    #[arg(long)]
    prometheus: bool,
    /// mount points (their root directory) and files on a throttlefs mount
    #[arg(required = true, value_name = "MOUNTPOINT|FILE")]
    paths: Vec<PathBuf>,
}

/// The clap definition, for the shell completions.
pub(crate) fn command() -> clap::Command {
    <StatCli as clap::CommandFactory>::command()
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
    for path in paths {
        if path.is_dir() {
            report.mounts.push(snapshot::of_mount(path)?);
        } else {
            report.files.push(snapshot::of_file(path)?);
        }
    }
    Ok(report)
}

pub fn main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: StatCli = parse(args)?;
    let report = collect(&cli.paths)?;
    let text = if cli.json {
        json(&report)
    } else if cli.prometheus {
        super::prometheus::render(&report)
    } else {
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
    };
    print!("{text}");
    Ok(())
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
}

impl Row {
    pub fn file(f: &FileRow) -> Row {
        Row {
            label: f.path.clone(),
            is_group: false,
            group: f.group.clone().unwrap_or_else(|| "-".into()),
            limits: describe_limits(&f.limits, &f.source),
            activity: f.activity,
            count: f.open,
        }
    }

    pub fn group(g: &GroupRow) -> Row {
        Row {
            label: format!("group {}", g.name),
            is_group: true,
            group: g.name.clone(),
            limits: describe_limits(&g.limits, &g.source),
            activity: g.activity,
            count: Some(g.members),
        }
    }
}

/// A limit value made short: sizes with a binary suffix when exact.
pub fn short_value(name: &str, value: &str) -> String {
    if name.ends_with("_max_length") {
        return format!("{value}s");
    }
    let bytes = name.starts_with("bps") || name == "iops_size";
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

const HEADERS: [&str; 8] = [
    "READ MiB/s",
    "WRITE MiB/s",
    "R IOPS",
    "W IOPS",
    "WAITING",
    "WAITED s",
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
    let mut headers: Vec<&str> = HEADERS[..6].to_vec();
    if totals {
        headers.extend(TOTAL_HEADERS);
    }
    headers.extend(&HEADERS[6..]);
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

/// A JSON string literal (RFC 8259): quotes, backslashes and control
/// characters escaped; everything else as UTF-8.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_opt(s: &Option<String>) -> String {
    s.as_deref().map_or("null".into(), json_string)
}

/// Limits as an object of numbers (canonical values are plain integers or
/// decimal seconds, both valid JSON numbers).
fn json_limits(limits: &[(String, String)]) -> String {
    let items: Vec<String> = limits
        .iter()
        .map(|(n, v)| format!("{}:{v}", json_string(n)))
        .collect();
    format!("{{{}}}", items.join(","))
}

fn json_activity(a: &Activity) -> String {
    a.fields()
        .iter()
        .map(|(n, v)| format!("\"{n}\":{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn json_file(f: &FileRow, mount: Option<&str>) -> String {
    format!(
        "{{\"path\":{},\"mount\":{},\"open\":{},{},\"source\":{},\"limits\":{},\"group\":{},\"group_source\":{}}}",
        json_string(&f.path),
        mount.map_or("null".into(), json_string),
        f.open.map_or("null".into(), |n| n.to_string()),
        json_activity(&f.activity),
        json_string(&f.source),
        json_limits(&f.limits),
        json_opt(&f.group),
        json_opt(&f.group_source),
    )
}

/// `{"mounts":[{"mount","files_unlisted","groups_unlisted"}],"files":[...],"groups":[...]}`;
/// the field names are those of `user.throttle.stats`. Written by hand: a
/// flat list of strings and integers does not need serde.
pub fn json(report: &Report) -> String {
    let mut mounts = Vec::new();
    let mut files = Vec::new();
    let mut groups = Vec::new();
    for m in &report.mounts {
        mounts.push(format!(
            "{{\"mount\":{},\"files\":{},\"files_unlisted\":{},\"groups_unlisted\":{}}}",
            json_string(&m.mount),
            m.files.len(),
            m.files_unlisted,
            m.groups_unlisted
        ));
        files.extend(m.files.iter().map(|f| json_file(f, Some(&m.mount))));
        for g in &m.groups {
            let a = &g.activity;
            groups.push(format!(
                "{{\"mount\":{},\"name\":{},\"source\":{},\"limits\":{},\"members\":{},\"waiting\":{},\
                 \"read_bytes\":{},\"read_ops\":{},\"write_bytes\":{},\"write_ops\":{},\
                 \"read_bytes_per_sec\":{},\"read_ops_per_sec\":{},\"write_bytes_per_sec\":{},\"write_ops_per_sec\":{}}}",
                json_string(&m.mount),
                json_string(&g.name),
                json_string(&g.source),
                json_limits(&g.limits),
                g.members,
                a.waiting,
                a.bytes[0],
                a.ops[0],
                a.bytes[1],
                a.ops[1],
                a.bytes_per_sec[0],
                a.ops_per_sec[0],
                a.bytes_per_sec[1],
                a.ops_per_sec[1],
            ));
        }
    }
    files.extend(report.files.iter().map(|f| json_file(f, None)));
    format!(
        "{{\"mounts\":[{}],\"files\":[{}],\"groups\":[{}]}}\n",
        mounts.join(","),
        files.join(","),
        groups.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(
            json_string("a\"b\\c\nd\u{1}é"),
            "\"a\\\"b\\\\c\\nd\\u0001é\""
        );
    }

    #[test]
    fn short_values() {
        assert_eq!(short_value("bps_wr", "10485760"), "10M");
        assert_eq!(short_value("bps", "1000"), "1000");
        assert_eq!(short_value("iops", "1024"), "1024");
        assert_eq!(short_value("bps_max_length", "0.5"), "0.5s");
        assert_eq!(short_value("iops_size", "4096"), "4K");
    }
}
