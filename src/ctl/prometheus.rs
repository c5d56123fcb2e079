//! `throttlefs stat --prometheus`: the Prometheus text exposition format
//! (version 0.0.4), as node_exporter's textfile collector reads it. Each
//! metric family is written once, with HELP and TYPE, all its samples
//! together.

use std::fmt::Write as _;

use super::snapshot::{BucketRow, FileRow, GroupRow, Report};
use crate::stats::Activity;

/// A label value: backslash, double quote and newline escaped.
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let items: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
        .collect();
    format!("{{{}}}", items.join(","))
}

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{labels} {value}");
    }
}

type FileValue = fn(&Activity) -> u64;

const FILE_COUNTERS: [(&str, &str, FileValue); 4] = [
    (
        "throttlefs_read_bytes_total",
        "Bytes read from the file through the mount since it was mounted.",
        |a| a.bytes[0],
    ),
    (
        "throttlefs_write_bytes_total",
        "Bytes written to the file through the mount since it was mounted.",
        |a| a.bytes[1],
    ),
    (
        "throttlefs_read_ops_total",
        "Read requests completed since the mount.",
        |a| a.ops[0],
    ),
    (
        "throttlefs_write_ops_total",
        "Write requests completed since the mount.",
        |a| a.ops[1],
    ),
];

const GROUP_COUNTERS: [(&str, &str, FileValue); 4] = [
    (
        "throttlefs_group_read_bytes_total",
        "Bytes read through the throttle group since it was made.",
        |a| a.bytes[0],
    ),
    (
        "throttlefs_group_write_bytes_total",
        "Bytes written through the throttle group since it was made.",
        |a| a.bytes[1],
    ),
    (
        "throttlefs_group_read_ops_total",
        "Read requests released through the throttle group since it was made.",
        |a| a.ops[0],
    ),
    (
        "throttlefs_group_write_ops_total",
        "Write requests released through the throttle group since it was made.",
        |a| a.ops[1],
    ),
];

type BucketValue = fn(&BucketRow) -> Option<f64>;

/// The bucket families, for files (`throttlefs_bucket_*`, files read by
/// path only) and groups (`throttlefs_group_bucket_*`).
const BUCKET_GAUGES: [(&str, &str, BucketValue); 4] = [
    (
        "bucket_level",
        "Units (bytes or operations) in a throttle bucket in force, by its limit's name.",
        |b| Some(b.level as f64),
    ),
    (
        "bucket_capacity",
        "Units a throttle bucket holds before requests wait: a tenth of a second at the limit, or limit_max * limit_max_length with a burst.",
        |b| Some(b.capacity as f64),
    ),
    (
        "bucket_burst_left_seconds",
        "How long a flow at the burst rate may go on from now: (capacity - level) / (max - avg).",
        |b| b.burst_left_ms.map(|ms| ms as f64 / 1e3),
    ),
    (
        "bucket_burst_balance_ratio",
        "Room left in a burst bucket, as a fraction of its capacity (AWS's BurstBalance / 100).",
        |b| b.burst_balance_pct.map(|pct| pct as f64 / 100.0),
    ),
];

/// One family per bucket field, a sample per (labels, bucket) that has it.
fn bucket_families(out: &mut String, prefix: &str, rows: &[(String, &[BucketRow])]) {
    for (field, help, value) in BUCKET_GAUGES {
        let name = format!("{prefix}{field}");
        let mut fam = Family::new(out, &name, "gauge", help);
        for (l, buckets) in rows {
            for b in buckets.iter() {
                if let Some(v) = value(b) {
                    let l = format!("{},limit=\"{}\"}}", l.trim_end_matches('}'), b.name);
                    fam.sample(&name, &l, v);
                }
            }
        }
    }
}

pub fn render(report: &Report) -> String {
    // A file named and also listed under its mount is one series.
    let mut seen = std::collections::HashSet::new();
    let files: Vec<&FileRow> = report
        .mounts
        .iter()
        .flat_map(|m| &m.files)
        .chain(&report.files)
        .filter(|f| seen.insert(f.path.as_str()))
        .collect();
    let file_labels: Vec<String> = files.iter().map(|f| labels(&[("file", &f.path)])).collect();
    let mut out = String::new();
    for (name, help, value) in FILE_COUNTERS {
        let mut fam = Family::new(&mut out, name, "counter", help);
        for (f, l) in files.iter().zip(&file_labels) {
            fam.sample(name, l, value(&f.activity));
        }
    }
    let name = "throttlefs_wait_seconds_total";
    let mut fam = Family::new(
        &mut out,
        name,
        "counter",
        "Time requests spent waiting in the throttle queue, summed over requests.",
    );
    for (f, l) in files.iter().zip(&file_labels) {
        fam.sample(name, l, f.activity.wait_ns as f64 / 1e9);
    }
    let name = "throttlefs_waiting_requests";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "Requests waiting in the throttle queue now.",
    );
    for (f, l) in files.iter().zip(&file_labels) {
        fam.sample(name, l, f.activity.waiting);
    }
    let name = "throttlefs_open_handles";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "Open handles of the file on the mount.",
    );
    for (f, l) in files.iter().zip(&file_labels) {
        if let Some(open) = f.open {
            fam.sample(name, l, open);
        }
    }
    let name = "throttlefs_passthrough_handles";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "Open handles of the file in FUSE passthrough: the kernel reads and writes them without the daemon, so no limit applies to them and their I/O is not counted.",
    );
    for (f, l) in files.iter().zip(&file_labels) {
        fam.sample(name, l, f.passthrough);
    }
    let name = "throttlefs_limit";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "A limit in force for the file, by QEMU name: bytes/s, operations/s, bytes for iops_size, seconds for *_max_length.",
    );
    for f in &files {
        for (limit, value) in &f.limits {
            let l = labels(&[("file", &f.path), ("limit", limit), ("source", &f.source)]);
            fam.sample(name, &l, value);
        }
    }
    let name = "throttlefs_qos";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "The file's weight (setting=weight) and reservations (reserve_iops in operations/s, reserve_bps in bytes/s) in its throttle group.",
    );
    for f in &files {
        for (setting, value) in &f.qos {
            let l = labels(&[("file", &f.path), ("setting", setting)]);
            fam.sample(name, &l, value);
        }
    }
    let rows: Vec<(String, &[BucketRow])> = files
        .iter()
        .zip(&file_labels)
        .map(|(f, l)| (l.clone(), f.buckets.as_slice()))
        .collect();
    bucket_families(&mut out, "throttlefs_", &rows);
    let name = "throttlefs_files_unlisted";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "Files open or active on the mount that did not fit in user.throttle.active.",
    );
    for m in &report.mounts {
        fam.sample(name, &labels(&[("mount", &m.mount)]), m.files_unlisted);
    }

    let groups: Vec<(String, &GroupRow)> = report
        .mounts
        .iter()
        .flat_map(|m| {
            m.groups
                .iter()
                .map(|g| (labels(&[("mount", &m.mount), ("group", &g.name)]), g))
        })
        .collect();
    for (name, help, value) in GROUP_COUNTERS {
        let mut fam = Family::new(&mut out, name, "counter", help);
        for (l, g) in &groups {
            fam.sample(name, l, value(&g.activity));
        }
    }
    let name = "throttlefs_group_waiting_requests";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "Requests of the group's members waiting now.",
    );
    for (l, g) in &groups {
        fam.sample(name, l, g.activity.waiting);
    }
    let name = "throttlefs_group_members";
    let mut fam = Family::new(&mut out, name, "gauge", "Files in the throttle group.");
    for (l, g) in &groups {
        fam.sample(name, l, g.members);
    }
    let name = "throttlefs_group_reserved";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "The members' reservations summed: operations/s (unit=iops) or bytes/s (unit=bps).",
    );
    for m in &report.mounts {
        for g in &m.groups {
            for (unit, value) in [("iops", g.reserved_iops), ("bps", g.reserved_bps)] {
                let l = labels(&[("mount", &m.mount), ("group", &g.name), ("unit", unit)]);
                fam.sample(name, &l, value);
            }
        }
    }
    let name = "throttlefs_group_oversubscribed";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "1 when the members' reservations add up to more than the group's limit in their unit.",
    );
    for (l, g) in &groups {
        fam.sample(name, l, u8::from(g.oversubscribed));
    }
    let rows: Vec<(String, &[BucketRow])> = groups
        .iter()
        .map(|(l, g)| (l.clone(), g.buckets.as_slice()))
        .collect();
    bucket_families(&mut out, "throttlefs_group_", &rows);
    let name = "throttlefs_group_limit";
    let mut fam = Family::new(
        &mut out,
        name,
        "gauge",
        "A limit in force for the throttle group, in the unit of throttlefs_limit.",
    );
    for m in &report.mounts {
        for g in &m.groups {
            for (limit, value) in &g.limits {
                let l = labels(&[
                    ("mount", &m.mount),
                    ("group", &g.name),
                    ("limit", limit),
                    ("source", &g.source),
                ]);
                fam.sample(name, &l, value);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_gauges_labelled_with_their_limit() {
        let file = FileRow {
            path: "/mnt/a \"b\"".into(),
            buckets: vec![
                BucketRow {
                    name: "bps_rd".into(),
                    level: 1024,
                    capacity: 4096,
                    burst_left_ms: Some(1500),
                    burst_balance_pct: Some(75),
                },
                BucketRow {
                    name: "iops".into(),
                    capacity: 10,
                    ..BucketRow::default()
                },
            ],
            ..FileRow::default()
        };
        let report = Report {
            files: vec![file],
            ..Report::default()
        };
        let text = render(&report);
        for line in [
            "throttlefs_bucket_level{file=\"/mnt/a \\\"b\\\"\",limit=\"bps_rd\"} 1024",
            "throttlefs_bucket_capacity{file=\"/mnt/a \\\"b\\\"\",limit=\"iops\"} 10",
            "throttlefs_bucket_burst_left_seconds{file=\"/mnt/a \\\"b\\\"\",limit=\"bps_rd\"} 1.5",
            "throttlefs_bucket_burst_balance_ratio{file=\"/mnt/a \\\"b\\\"\",limit=\"bps_rd\"} 0.75",
            "# TYPE throttlefs_group_bucket_level gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        // No burst, no burst sample.
        assert!(!text.contains("burst_left_seconds{file=\"/mnt/a \\\"b\\\"\",limit=\"iops\"}"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
