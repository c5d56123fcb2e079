//! Weights and reservations inside a throttle group: the attributes
//! `user.throttle.weight`, `user.throttle.reserve_iops` and
//! `user.throttle.reserve_bps`, their values, and what a file has in
//! force. Each is inherited on its own, as group membership is: a file's
//! own attribute, else the nearest directory's. Pure: the filesystem
//! reads the attributes, the scheduler's group turns use `Qos`.

use std::fmt::Write as _;

use crate::options::{parse_count, parse_size};
use crate::scheduler::GroupReport;
use crate::stats::Origin;
use crate::throttle::{BucketKind, Limits, MAX_LIMIT_VALUE};

/// A member's weight when none is set: equal weights share as before
/// weights existed.
pub const WEIGHT_DEFAULT: u32 = 100;
pub const WEIGHT_MIN: u32 = 1;
pub const WEIGHT_MAX: u32 = 10_000;

pub const WEIGHT: &str = "weight";
pub const RESERVE_IOPS: &str = "reserve_iops";
pub const RESERVE_BPS: &str = "reserve_bps";
/// The attribute names after `user.throttle.`.
pub const NAMES: [&str; 3] = [WEIGHT, RESERVE_IOPS, RESERVE_BPS];

/// What a group's turns use of one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qos {
    /// Share of the group among saturating members, 1..=10000.
    pub weight: u32,
    /// Requests per second the member gets at least while it has some
    /// waiting (0: none reserved).
    pub reserve_iops: u64,
    /// Bytes per second likewise.
    pub reserve_bps: u64,
}

impl Default for Qos {
    fn default() -> Qos {
        Qos {
            weight: WEIGHT_DEFAULT,
            reserve_iops: 0,
            reserve_bps: 0,
        }
    }
}

impl Qos {
    pub fn reserves(&self) -> bool {
        self.reserve_iops > 0 || self.reserve_bps > 0
    }
}

/// Whether `name` (after `user.throttle.`) is one of ours.
pub fn is_name(name: &str) -> bool {
    NAMES.contains(&name)
}

/// The value of setting `name` (a trailing newline or NUL is forgiven),
/// or why it is refused, with the limits' wording: `weight` an integer
/// 1..=10000, `reserve_iops` a count, `reserve_bps` a size (`10M`).
pub fn parse(name: &str, text: &str) -> Result<u64, String> {
    let text = text.trim_end_matches(['\n', '\0']);
    let named = |msg: String| format!("{name}: {msg}");
    match name {
        WEIGHT => {
            let w = parse_count(text).map_err(named)?;
            if !(u64::from(WEIGHT_MIN)..=u64::from(WEIGHT_MAX)).contains(&w) {
                return Err(named(format!(
                    "{w} is out of range ({WEIGHT_MIN} to {WEIGHT_MAX})"
                )));
            }
            Ok(w)
        }
        RESERVE_IOPS | RESERVE_BPS => {
            let r = if name == RESERVE_IOPS {
                parse_count(text)
            } else {
                parse_size(text)
            }
            .map_err(named)?;
            // The limits' bound: a reservation is a rate as they are, and
            // the group sums them.
            if r > MAX_LIMIT_VALUE {
                return Err(format!("{name} must be at most {MAX_LIMIT_VALUE}"));
            }
            Ok(r)
        }
        _ => Err(format!("unknown setting {name}")),
    }
}

/// The canonical text of `value` for setting `name` (a plain integer).
pub fn canonical(name: &str, value: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(value).map_err(|_| format!("{name}: value is not UTF-8"))?;
    parse(name, text).map(|v| v.to_string())
}

/// The settings in force for a file, each with where it came from; `None`
/// where neither the file nor a directory above it sets it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QosSettings {
    pub weight: Option<(u32, Origin)>,
    pub reserve_iops: Option<(u64, Origin)>,
    pub reserve_bps: Option<(u64, Origin)>,
}

impl QosSettings {
    pub fn is_empty(&self) -> bool {
        self.weight.is_none() && self.reserve_iops.is_none() && self.reserve_bps.is_none()
    }

    pub fn qos(&self) -> Qos {
        Qos {
            weight: self.weight.as_ref().map_or(WEIGHT_DEFAULT, |(w, _)| *w),
            reserve_iops: self.reserve_iops.as_ref().map_or(0, |(r, _)| *r),
            reserve_bps: self.reserve_bps.as_ref().map_or(0, |(r, _)| *r),
        }
    }

    /// Store setting `name` found at `origin`.
    pub fn put(&mut self, name: &str, value: u64, origin: Origin) {
        match name {
            WEIGHT => self.weight = Some((value as u32, origin)),
            RESERVE_IOPS => self.reserve_iops = Some((value, origin)),
            RESERVE_BPS => self.reserve_bps = Some((value, origin)),
            _ => {}
        }
    }

    /// `weight:W` and each reservation set, comma-separated: the `qos=`
    /// field of `user.throttle.active`.
    pub fn compact(&self) -> String {
        let qos = self.qos();
        let mut out = format!("{WEIGHT}:{}", qos.weight);
        for (name, value) in [
            (RESERVE_IOPS, qos.reserve_iops),
            (RESERVE_BPS, qos.reserve_bps),
        ] {
            if value > 0 {
                let _ = write!(out, ",{name}:{value}");
            }
        }
        out
    }

    /// The lines of `user.throttle.effective`: for a member of a group, or
    /// a file that sets any of them, `weight=` and `weight_source=`
    /// (`default` when none is set), then each reservation set (non-zero)
    /// with its source; outside a group, `qos=inert (in no group)`, since
    /// weights and reservations only order a group's turns.
    pub fn render(&self, in_group: bool) -> String {
        let mut out = String::new();
        if !in_group && self.is_empty() {
            return out;
        }
        let qos = self.qos();
        let source = |o: Option<&Origin>| o.map_or("default".to_string(), Origin::describe);
        let _ = writeln!(out, "{WEIGHT}={}", qos.weight);
        let _ = writeln!(
            out,
            "{WEIGHT}_source={}",
            source(self.weight.as_ref().map(|(_, o)| o))
        );
        for (name, set) in [
            (RESERVE_IOPS, &self.reserve_iops),
            (RESERVE_BPS, &self.reserve_bps),
        ] {
            if let Some((value, origin)) = set
                && *value > 0
            {
                let _ = writeln!(out, "{name}={value}");
                let _ = writeln!(out, "{name}_source={}", origin.describe());
            }
        }
        if !in_group {
            out.push_str("qos=inert (in no group)\n");
        }
        out
    }
}

/// What a group can give, for reservations in `unit` (`iops` or `bps`):
/// its total limit, else the sum of its read and write limits when both
/// are set; `None` when it does not limit that unit both ways.
pub fn group_capacity(limits: &Limits, unit: &str) -> Option<u64> {
    let (total, rd, wr) = if unit == "iops" {
        (
            BucketKind::IopsTotal,
            BucketKind::IopsRead,
            BucketKind::IopsWrite,
        )
    } else {
        (
            BucketKind::BpsTotal,
            BucketKind::BpsRead,
            BucketKind::BpsWrite,
        )
    };
    let avg = |k: BucketKind| limits.get(k).avg;
    match (avg(total), avg(rd), avg(wr)) {
        (0, 0, _) | (0, _, 0) => None,
        (0, r, w) => Some(r.saturating_add(w)),
        (t, _, _) => Some(t),
    }
}

/// The lines of `user.throttle.group.NAME.stats` about reservations, when
/// a member has one: `reserved_iops=` and `reserved_bps=` (summed over the
/// members), `reserved_releases=` (requests that went because a
/// reservation was due), and `oversubscribed=1` when the reservations of
/// a unit add up to more than the group's limit in it (`0` otherwise).
pub fn render_group_reservations(report: &GroupReport, limits: &Limits) -> String {
    if report.reserved_iops == 0 && report.reserved_bps == 0 {
        return String::new();
    }
    let over = [("iops", report.reserved_iops), ("bps", report.reserved_bps)]
        .into_iter()
        .any(|(unit, sum)| group_capacity(limits, unit).is_some_and(|cap| sum > cap));
    format!(
        "reserved_iops={}\nreserved_bps={}\nreserved_releases={}\noversubscribed={}\n",
        report.reserved_iops,
        report.reserved_bps,
        report.reserved_ops,
        u8::from(over)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_like_limits() {
        assert_eq!(parse(WEIGHT, "200\n").unwrap(), 200);
        assert_eq!(parse(WEIGHT, "1").unwrap(), 1);
        assert_eq!(parse(WEIGHT, "10000").unwrap(), 10_000);
        assert_eq!(
            parse(WEIGHT, "0").unwrap_err(),
            "weight: 0 is out of range (1 to 10000)"
        );
        assert!(parse(WEIGHT, "10001").is_err());
        assert_eq!(
            parse(WEIGHT, "ten").unwrap_err(),
            "weight: invalid count 'ten'"
        );
        assert_eq!(parse(RESERVE_IOPS, "600").unwrap(), 600);
        assert!(parse(RESERVE_IOPS, "1K").is_err());
        assert_eq!(parse(RESERVE_BPS, "10M").unwrap(), 10 << 20);
        assert_eq!(parse(RESERVE_BPS, "0").unwrap(), 0);
        // At most 10^15, as every limit: no sum of them wraps.
        assert_eq!(
            parse(RESERVE_IOPS, "1000000000000000").unwrap(),
            1_000_000_000_000_000
        );
        assert_eq!(
            parse(RESERVE_IOPS, "1000000000000001").unwrap_err(),
            "reserve_iops must be at most 1000000000000000"
        );
        assert!(parse(RESERVE_BPS, "18446744073709551615").is_err());
        assert!(parse(RESERVE_BPS, "2P").is_err());
        assert_eq!(canonical(RESERVE_BPS, b"1K").unwrap(), "1024");
        assert!(canonical(WEIGHT, b"\xff").is_err());
    }

    #[test]
    fn oversubscription_is_against_the_groups_limit() {
        let mut limits = Limits::default();
        limits.get_mut(BucketKind::IopsTotal).avg = 1000;
        let mut report = GroupReport {
            reserved_iops: 600,
            ..GroupReport::default()
        };
        let text = render_group_reservations(&report, &limits);
        assert!(text.contains("reserved_iops=600\n"), "{text}");
        assert!(text.ends_with("oversubscribed=0\n"), "{text}");
        report.reserved_iops = 1200;
        assert!(render_group_reservations(&report, &limits).ends_with("oversubscribed=1\n"));
        // Read and write limits both set: their sum is what can be given.
        let mut split = Limits::default();
        split.get_mut(BucketKind::IopsRead).avg = 1000;
        assert_eq!(group_capacity(&split, "iops"), None);
        split.get_mut(BucketKind::IopsWrite).avg = 500;
        assert_eq!(group_capacity(&split, "iops"), Some(1500));
        assert_eq!(group_capacity(&split, "bps"), None);
        assert_eq!(
            render_group_reservations(&GroupReport::default(), &limits),
            ""
        );
    }

    #[test]
    fn effective_lines_say_where_each_comes_from() {
        let mut s = QosSettings::default();
        assert_eq!(s.render(false), "");
        assert_eq!(s.render(true), "weight=100\nweight_source=default\n");
        s.put(WEIGHT, 200, Origin::Directory("/t".into()));
        s.put(RESERVE_IOPS, 600, Origin::File);
        s.put(RESERVE_BPS, 0, Origin::File);
        assert_eq!(
            s.render(true),
            "weight=200\nweight_source=directory:/t\nreserve_iops=600\nreserve_iops_source=file\n"
        );
        assert!(s.render(false).ends_with("qos=inert (in no group)\n"));
        assert_eq!(
            s.qos(),
            Qos {
                weight: 200,
                reserve_iops: 600,
                reserve_bps: 0
            }
        );
    }
}
