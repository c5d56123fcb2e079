//! `throttlefs stat --json`: a reading as one JSON object.

use std::fmt::Write as _;

use super::snapshot::{BucketRow, FileRow, Report};
use crate::stats::Activity;

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

/// Buckets as an object by limit name: `{"bps_rd":{"level":0,"capacity":..,
/// "burst_left_ms":..,"burst_balance_pct":..}}`, the burst fields only
/// where the bucket has them.
fn json_buckets(buckets: &[BucketRow]) -> String {
    let items: Vec<String> = buckets
        .iter()
        .map(|b| {
            let mut fields = format!("\"level\":{},\"capacity\":{}", b.level, b.capacity);
            if let Some(ms) = b.burst_left_ms {
                let _ = write!(fields, ",\"burst_left_ms\":{ms}");
            }
            if let Some(pct) = b.burst_balance_pct {
                let _ = write!(fields, ",\"burst_balance_pct\":{pct}");
            }
            format!("{}:{{{fields}}}", json_string(&b.name))
        })
        .collect();
    format!("{{{}}}", items.join(","))
}

fn json_file(f: &FileRow, mount: Option<&str>) -> String {
    format!(
        "{{\"path\":{},\"mount\":{},\"open\":{},\"passthrough_handles\":{},{},\"source\":{},\"limits\":{},\"group\":{},\"group_source\":{},\"qos\":{},\"buckets\":{},\"group_buckets\":{}}}",
        json_string(&f.path),
        mount.map_or("null".into(), json_string),
        f.open.map_or("null".into(), |n| n.to_string()),
        f.passthrough,
        json_activity(&f.activity),
        json_string(&f.source),
        json_limits(&f.limits),
        json_opt(&f.group),
        json_opt(&f.group_source),
        json_limits(&f.qos),
        json_buckets(&f.buckets),
        json_buckets(&f.group_buckets),
    )
}

/// `{"mounts":[{"mount","files_unlisted","groups_unlisted"}],"files":[...],"groups":[...]}`;
/// the field names are those of `user.throttle.stats`. Written by hand: a
/// flat list of strings and integers does not need serde.
pub fn render(report: &Report) -> String {
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
                 \"read_bytes_per_sec\":{},\"read_ops_per_sec\":{},\"write_bytes_per_sec\":{},\"write_ops_per_sec\":{},\
                 \"reserved_iops\":{},\"reserved_bps\":{},\"oversubscribed\":{},\"buckets\":{}}}",
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
                g.reserved_iops,
                g.reserved_bps,
                g.oversubscribed,
                json_buckets(&g.buckets),
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
    fn buckets_are_an_object_by_limit_with_the_burst_fields_they_have() {
        let buckets = [
            BucketRow {
                name: "bps_rd".into(),
                level: 5,
                capacity: 40,
                burst_left_ms: Some(3),
                burst_balance_pct: Some(87),
            },
            BucketRow {
                name: "iops".into(),
                level: 0,
                capacity: 10,
                ..BucketRow::default()
            },
        ];
        assert_eq!(
            json_buckets(&buckets),
            "{\"bps_rd\":{\"level\":5,\"capacity\":40,\"burst_left_ms\":3,\"burst_balance_pct\":87},\
             \"iops\":{\"level\":0,\"capacity\":10}}"
        );
        assert_eq!(json_buckets(&[]), "{}");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(
            json_string("a\"b\\c\nd\u{1}é"),
            "\"a\\\"b\\\\c\\nd\\u0001é\""
        );
    }
}
