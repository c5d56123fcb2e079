//! The `user.throttle.*` extended attributes: which names are ours, the
//! canonical form of values, a file's or directory's own set of limits as
//! stored on the underlying object, and the text of the read-only
//! attributes. Pure: the filesystem does the syscalls.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;

use crate::options::{
    GROUP_NAME_RULE, apply_limit, canonical_limit_name, format_limit, limit_is_set, limit_names,
    split_group_limit, valid_group_name,
};
use crate::sizing::{IMAGE_FORMAT, ImageFormat, Sizing};
use crate::stats::{Activity, Effective, Origin};
use crate::throttle::{BucketKind, Limits, gib_of};

pub const PREFIX: &str = "user.throttle.";
/// Read-only: the limits in force and where they came from.
pub const EFFECTIVE: &str = "user.throttle.effective";
/// Read-only: what the throttle is doing for the file.
pub const STATS: &str = "user.throttle.stats";
/// Read-only, on the mount root: the files open or active, one a line.
pub const ACTIVE: &str = "user.throttle.active";
/// The throttle group of a file, or of the files below a directory.
pub const GROUP: &str = "user.throttle.group";

/// Room kept at the end of a bounded generated value for what counts the
/// entries that did not fit (`members_unlisted=N`, `files_unlisted=N`).
pub const UNLISTED_LINE_BYTES: usize = 40;

/// What an attribute name in our namespace is.
#[derive(Debug, PartialEq, Eq)]
pub enum Attr {
    /// A limit, by its QEMU name (`bps_rd`, `iops_max_length`, ...).
    Limit(String),
    Effective,
    Stats,
    /// `user.throttle.active` on the mount root (read-only).
    Active,
    /// `user.throttle.group`: the throttle group a file (or the files below
    /// a directory) belongs to.
    Group,
    /// `user.throttle.group.NAME.<limit>` on the mount root.
    GroupLimit {
        group: String,
        limit: String,
    },
    /// `user.throttle.group.NAME.stats` on the mount root (read-only).
    GroupStats(String),
    /// `user.throttle.weight`, `reserve_iops` or `reserve_bps` (see
    /// `crate::qos`), inherited like `Group`.
    Qos(String),
    /// `user.throttle.image_format`: how per-GiB limits size a file's disk
    /// (see `crate::sizing::ImageFormat`), inherited like `Group`.
    ImageFormat,
    /// Under `user.throttle.` but not a name we know.
    Unknown,
}

impl Attr {
    /// Read-only and made up on each read: readable by name but never
    /// listed, so that copy tools do not try to write them back.
    pub fn is_generated(&self) -> bool {
        matches!(
            self,
            Attr::Effective | Attr::Stats | Attr::Active | Attr::GroupStats(_)
        )
    }
}

/// Whether `name` is listed by listxattr: everything but the generated
/// attributes (stored copies of those names are shadowed by them).
pub fn is_listed(name: &[u8]) -> bool {
    !classify(name).is_some_and(|attr| attr.is_generated())
}

/// The name of a limit attribute given under an alias of the limit
/// (`user.throttle.total_bytes_sec`, `user.throttle.group.G.bps-total`;
/// see `options::LIMIT_ALIASES`) rewritten to its canonical name, so that
/// it is stored, read and removed as that one; any other name as it is.
pub fn canonical_name(name: &OsStr) -> Cow<'_, OsStr> {
    let Some(rest) = name
        .as_bytes()
        .strip_prefix(PREFIX.as_bytes())
        .and_then(|r| std::str::from_utf8(r).ok())
    else {
        return Cow::Borrowed(name);
    };
    let (head, limit) = match rest.strip_prefix("group.") {
        Some(group_attr) => match split_group_limit(group_attr) {
            Some((group, limit)) => (format!("group.{group}."), limit),
            None => return Cow::Borrowed(name),
        },
        None => (String::new(), rest),
    };
    match canonical_limit_name(limit) {
        Some(canonical) if canonical != limit => {
            Cow::Owned(OsString::from(format!("{PREFIX}{head}{canonical}")))
        }
        _ => Cow::Borrowed(name),
    }
}

/// `None` for names outside `user.throttle.`, which pass through untouched.
pub fn classify(name: &[u8]) -> Option<Attr> {
    let rest = name.strip_prefix(PREFIX.as_bytes())?;
    let Ok(rest) = std::str::from_utf8(rest) else {
        return Some(Attr::Unknown);
    };
    if let Some(group_attr) = rest.strip_prefix("group.") {
        // Limit names have no dots, so the group name is all before the
        // last one (group names may have dots).
        let Some((group, last)) = group_attr.rsplit_once('.') else {
            return Some(Attr::Unknown);
        };
        if !valid_group_name(group) {
            return Some(Attr::Unknown);
        }
        let group = group.to_string();
        return Some(match last {
            "stats" => Attr::GroupStats(group),
            _ if limit_names().iter().any(|n| n == last) => Attr::GroupLimit {
                group,
                limit: last.to_string(),
            },
            _ => Attr::Unknown,
        });
    }
    Some(match rest {
        "effective" => Attr::Effective,
        "stats" => Attr::Stats,
        "active" => Attr::Active,
        "group" => Attr::Group,
        crate::sizing::IMAGE_FORMAT => Attr::ImageFormat,
        _ if crate::qos::is_name(rest) => Attr::Qos(rest.to_string()),
        _ if limit_names().iter().any(|n| n == rest) => Attr::Limit(rest.to_string()),
        _ => Attr::Unknown,
    })
}

/// The canonical text of `value` for limit `name` (plain integers,
/// durations in seconds), or why it is not a valid value.
pub fn canonical(name: &str, value: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(value).map_err(|_| format!("{name}: value is not UTF-8"))?;
    // getfattr/setfattr users may leave a trailing newline or NUL.
    let text = text.trim_end_matches(['\n', '\0']);
    let mut scratch = Limits::default();
    apply_limit(&mut scratch, name, text)?;
    format_limit(&scratch, name).ok_or_else(|| format!("unknown limit {name}"))
}

/// An object's own limits, as stored in its `user.throttle.<limit>`
/// attributes: name to stored text. Any attribute present makes the set
/// the object's own, even `0` (which lets a file opt out of its
/// directory's limits).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnSet {
    pub values: BTreeMap<String, String>,
}

impl OwnSet {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The set as limits, checked with the same rules as the command line.
    pub fn limits(&self) -> Result<Limits, String> {
        let mut limits = Limits::default();
        for (name, value) in &self.values {
            apply_limit(&mut limits, name, value.trim_end_matches(['\n', '\0']))?;
        }
        limits.validate().map_err(|e| e.to_string())?;
        Ok(limits)
    }
}

/// Every limit that `limits` sets, as (name, canonical value), in the
/// order of `limit_names`.
pub fn set_limits(limits: &Limits) -> Vec<(String, String)> {
    limit_names()
        .into_iter()
        .filter(|name| limit_is_set(limits, name))
        .filter_map(|name| format_limit(limits, &name).map(|value| (name, value)))
        .collect()
}

/// `user.throttle.effective`: `source=` (file, directory:PATH or mount),
/// one `name=value` a line for each limit in force, then `group=NAME` and
/// `group_source=` when the file belongs to a throttle group, then its
/// weight and reservations (`QosSettings::render`), then
/// `passthrough_handles=N` when `passthrough` handles (opened in FUSE
/// passthrough, which no limit reaches) are open.
pub fn render_effective(e: &Effective, passthrough: u64) -> String {
    let mut out = format!("source={}\n", e.origin.describe());
    for (name, value) in set_limits(&e.limits) {
        let _ = writeln!(out, "{name}={value}");
    }
    match &e.sizing {
        Some(s) => render_sizing(&mut out, s, &e.image_format),
        // Without per-GiB limits, shown only where an attribute sets it.
        None if e.image_format.1 != Origin::Mount => render_image_format(&mut out, &e.image_format),
        None => {}
    }
    if let Some((group, origin)) = &e.group {
        let _ = writeln!(out, "group={group}");
        let _ = writeln!(out, "group_source={}", origin.describe());
    }
    out.push_str(&e.qos.render(e.group.is_some()));
    if passthrough > 0 {
        let _ = writeln!(out, "{PASSTHROUGH_HANDLES}={passthrough}");
    }
    out
}

/// The lines of `user.throttle.effective` that say how per-GiB limits
/// were made concrete: `size=` (bytes) and `size_gib=` (as counted),
/// `size_from=` (`qcow2`: the virtual size in its header; `file`: the
/// file's size), `image_format=` and `image_format_source=` (how the size
/// was read, `render_image_format`), `per_gb_limits=` (the averages computed from a per-GiB
/// rate), and `NAME_ignored=VALUE` for each burst the computed average
/// passed, which is not in force.
fn render_sizing(out: &mut String, s: &Sizing, format: &(ImageFormat, Origin)) {
    let _ = writeln!(out, "{SIZE_FIELD}={}", s.size.bytes);
    let _ = writeln!(out, "size_gib={}", gib_of(s.size.bytes));
    let _ = writeln!(out, "size_from={}", s.size.source());
    render_image_format(out, format);
    let derived: Vec<&str> = BucketKind::ALL
        .iter()
        .filter(|k| s.set.per_gb(**k).rate != 0)
        .map(|k| k.name())
        .collect();
    let _ = writeln!(out, "per_gb_limits={}", derived.join(","));
    for (burst, value) in &s.ignored {
        let _ = writeln!(out, "{burst}_ignored={value}");
    }
}

/// `image_format=` (raw, qcow2 or auto) and `image_format_source=`
/// (file, directory:PATH, or mount: the mount option or its default).
fn render_image_format(out: &mut String, (format, origin): &(ImageFormat, Origin)) {
    let _ = writeln!(out, "{IMAGE_FORMAT}={}", format.as_str());
    let _ = writeln!(out, "{IMAGE_FORMAT}_source={}", origin.describe());
}

/// The first of the lines `render_sizing` writes.
pub const SIZE_FIELD: &str = "size";

/// The field of `user.throttle.effective`, `user.throttle.stats` and
/// `user.throttle.active` that counts a file's open handles in passthrough.
pub const PASSTHROUGH_HANDLES: &str = "passthrough_handles";

/// The value of `user.throttle.group`: a valid group name (a trailing
/// newline or NUL is forgiven), or why not.
pub fn group_name(value: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(value)
        .map_err(|_| "group: name is not UTF-8".to_string())?
        .trim_end_matches(['\n', '\0']);
    if valid_group_name(text) {
        Ok(text.to_string())
    } else {
        Err(format!("group: '{text}' is not {GROUP_NAME_RULE}"))
    }
}

/// The prefix of a group's limit attributes on the root.
pub fn group_prefix(group: &str) -> String {
    format!("{PREFIX}group.{group}.")
}

/// One file of `user.throttle.active`.
pub struct ActiveFile {
    /// The file's inode number, handed to `render_active`'s `path_of`
    /// (only the files listed cost a path lookup), and the tie-break.
    pub ino: u64,
    /// Open handles.
    pub open: u64,
    /// Of those, handles in passthrough.
    pub passthrough: u64,
    pub activity: Activity,
    /// The limits in force, if they were ever resolved.
    pub effective: Option<Effective>,
}

/// Escapes a value of `user.throttle.active` so that it holds no space,
/// newline or other control character: `\\`, `\s`, `\n`, `\xHH`.
pub fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            ' ' => out.push_str("\\s"),
            '\n' => out.push_str("\\n"),
            // Control characters are all below U+0100.
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The inverse of `escape_value`; an unknown escape is kept as written.
pub fn unescape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('s') => out.push(' '),
            Some('n') => out.push('\n'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    Some(c) => out.push(c),
                    None => out.push_str(&format!("\\x{hex}")),
                }
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// The share of `user.throttle.active` its `groups=` line may take (about
/// 250 groups of the longest names).
const GROUPS_LINE_MAX_BYTES: usize = 16 * 1024;

/// The `groups=A,B,...` line of `user.throttle.active` (empty without
/// groups), at most GROUPS_LINE_MAX_BYTES; the groups left out are counted
/// in a ` groups_unlisted=K` field.
fn known_groups_line(groups: &[String]) -> String {
    let mut line = String::new();
    let mut listed = 0;
    for g in groups {
        if line.len() + g.len() + UNLISTED_LINE_BYTES > GROUPS_LINE_MAX_BYTES {
            break;
        }
        line.push_str(if listed == 0 { "groups=" } else { "," });
        line.push_str(g);
        listed += 1;
    }
    if listed < groups.len() {
        let _ = write!(line, " groups_unlisted={}", groups.len() - listed);
    }
    if !line.is_empty() {
        line.push('\n');
    }
    line
}

/// `user.throttle.active`: `files=N`, then one line per file, busiest
/// first (bytes, then requests in the last second, then waiting, then
/// open handles), of space-separated `name=value` fields with escaped
/// values, for as many files as fit in `max_bytes` with the last line;
/// then `files_unlisted=K` if some did not; last, `groups=...`, the
/// `groups` the mount knows (so that `stat` and `top` show idle groups
/// too). `path_of` gives a file's path from the mount root.
pub fn render_active(
    mut files: Vec<ActiveFile>,
    path_of: impl Fn(u64) -> String,
    groups: &[String],
    max_bytes: usize,
) -> String {
    let groups_line = known_groups_line(groups);
    let max_bytes = max_bytes - groups_line.len();
    let score = |f: &ActiveFile| {
        let a = &f.activity;
        (
            a.bytes_per_sec[0].saturating_add(a.bytes_per_sec[1]),
            a.ops_per_sec[0].saturating_add(a.ops_per_sec[1]),
            a.waiting,
            f.open,
        )
    };
    files.sort_by(|a, b| score(b).cmp(&score(a)).then_with(|| a.ino.cmp(&b.ino)));
    let mut out = format!("files={}\n", files.len());
    for (listed, f) in files.iter().enumerate() {
        let mut line = format!("path={} open={}", escape_value(&path_of(f.ino)), f.open);
        for (name, value) in f.activity.fields() {
            let _ = write!(line, " {name}={value}");
        }
        match &f.effective {
            Some(e) => {
                let _ = write!(line, " source={}", escape_value(&e.origin.describe()));
                let limits: Vec<String> = set_limits(&e.limits)
                    .into_iter()
                    .map(|(n, v)| format!("{n}:{v}"))
                    .collect();
                if !limits.is_empty() {
                    let _ = write!(line, " limits={}", limits.join(","));
                }
                if let Some(s) = &e.sizing {
                    let _ = write!(
                        line,
                        " size_gib={} size_from={}",
                        gib_of(s.size.bytes),
                        s.size.source()
                    );
                }
                if let Some((group, origin)) = &e.group {
                    let _ = write!(
                        line,
                        " group={group} group_source={}",
                        escape_value(&origin.describe())
                    );
                }
                if e.group.is_some() || !e.qos.is_empty() {
                    let _ = write!(line, " qos={}", e.qos.compact());
                }
            }
            None => line.push_str(" source=unknown"),
        }
        if f.passthrough > 0 {
            let _ = write!(line, " {PASSTHROUGH_HANDLES}={}", f.passthrough);
        }
        line.push('\n');
        if out.len() + line.len() + UNLISTED_LINE_BYTES > max_bytes {
            let _ = writeln!(out, "files_unlisted={}", files.len() - listed);
            break;
        }
        out.push_str(&line);
    }
    out + &groups_line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Origin;
    use std::time::Duration;

    #[test]
    fn classify_names() {
        assert_eq!(classify(b"user.foo"), None);
        assert_eq!(classify(b"user.throttlex"), None);
        assert_eq!(
            classify(b"user.throttle.bps_rd"),
            Some(Attr::Limit("bps_rd".into()))
        );
        assert_eq!(
            classify(b"user.throttle.iops_wr_max_length"),
            Some(Attr::Limit("iops_wr_max_length".into()))
        );
        assert_eq!(classify(b"user.throttle.effective"), Some(Attr::Effective));
        assert_eq!(classify(b"user.throttle.stats"), Some(Attr::Stats));
        assert_eq!(classify(b"user.throttle.bogus"), Some(Attr::Unknown));
        assert_eq!(classify(b"user.throttle.group"), Some(Attr::Group));
        assert_eq!(
            classify(b"user.throttle.weight"),
            Some(Attr::Qos("weight".into()))
        );
        assert_eq!(
            classify(b"user.throttle.reserve_bps"),
            Some(Attr::Qos("reserve_bps".into()))
        );
        assert_eq!(
            classify(b"user.throttle.group.tenant.a.bps_rd_max"),
            Some(Attr::GroupLimit {
                group: "tenant.a".into(),
                limit: "bps_rd_max".into()
            })
        );
        assert_eq!(
            classify(b"user.throttle.group.t1.stats"),
            Some(Attr::GroupStats("t1".into()))
        );
        assert_eq!(
            classify(b"user.throttle.group.t1.speed"),
            Some(Attr::Unknown)
        );
        assert_eq!(
            classify(b"user.throttle.group.bad name.bps"),
            Some(Attr::Unknown)
        );
        assert_eq!(classify(b"user.throttle.group.nodot"), Some(Attr::Unknown));
        assert_eq!(group_name(b"vm-1.a\n").unwrap(), "vm-1.a");
        assert!(group_name(b"").is_err());
        assert!(group_name(b"a/b").is_err());
        assert_eq!(classify(b"user.throttle.\xff"), Some(Attr::Unknown));
    }

    #[test]
    fn aliases_are_renamed_to_the_canonical_name() {
        let renamed = |name: &str| canonical_name(OsStr::new(name)).into_owned();
        for (alias, canonical) in [
            ("user.throttle.total_bytes_sec", "user.throttle.bps"),
            (
                "user.throttle.read_iops_sec_max",
                "user.throttle.iops_rd_max",
            ),
            (
                "user.throttle.write_bytes_sec_max_length",
                "user.throttle.bps_wr_max_length",
            ),
            ("user.throttle.size_iops_sec", "user.throttle.iops_size"),
            ("user.throttle.bps-total-max", "user.throttle.bps_max"),
            (
                "user.throttle.throttling.iops-size",
                "user.throttle.iops_size",
            ),
            (
                "user.throttle.group.t.a.total_iops_sec",
                "user.throttle.group.t.a.iops",
            ),
            (
                "user.throttle.group.t1.throttling.bps-read-max-length",
                "user.throttle.group.t1.bps_rd_max_length",
            ),
            // Unchanged: canonical, ours but not a limit, or not ours.
            ("user.throttle.bps", "user.throttle.bps"),
            ("user.throttle.group", "user.throttle.group"),
            (
                "user.throttle.group.t1.stats",
                "user.throttle.group.t1.stats",
            ),
            (
                "user.throttle.size_iops_sec_max",
                "user.throttle.size_iops_sec_max",
            ),
            (
                "user.throttle.throttling.bps",
                "user.throttle.throttling.bps",
            ),
            ("user.total_bytes_sec", "user.total_bytes_sec"),
        ] {
            assert_eq!(renamed(alias), OsStr::new(canonical), "{alias}");
        }
    }

    #[test]
    fn generated_attributes_are_not_listed() {
        for name in [
            &b"user.throttle.effective"[..],
            b"user.throttle.stats",
            b"user.throttle.group.t1.stats",
            b"user.throttle.active",
        ] {
            assert!(!is_listed(name), "{}", String::from_utf8_lossy(name));
        }
        for name in [
            &b"user.foo"[..],
            b"user.throttle.bps_rd",
            b"user.throttle.group",
            b"user.throttle.group.t1.bps",
            b"user.throttle.bogus",
        ] {
            assert!(is_listed(name), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn canonical_values() {
        assert_eq!(canonical("bps_wr", b"10M").unwrap(), "10485760");
        assert_eq!(canonical("bps_wr", b"10M\n").unwrap(), "10485760");
        assert_eq!(canonical("iops", b"500").unwrap(), "500");
        assert_eq!(canonical("bps_max_length", b"500ms").unwrap(), "0.5");
        assert_eq!(canonical("bps_max_length", b"1m").unwrap(), "60");
        assert_eq!(canonical("iops_size", b"4K").unwrap(), "4096");
        assert_eq!(canonical("bps", b"0").unwrap(), "0");
        assert!(canonical("bps", b"ten").unwrap_err().contains("bps"));
        assert!(canonical("iops", b"1K").is_err());
        assert!(canonical("bps", b"\xff").is_err());
    }

    #[test]
    fn own_set_is_validated_as_a_whole() {
        let mut set = OwnSet::default();
        set.values.insert("bps_rd".into(), "1048576".into());
        assert_eq!(
            set.limits().unwrap().get(BucketKind::BpsRead).avg,
            1_048_576
        );
        set.values.insert("bps".into(), "1048576".into());
        assert_eq!(
            set.limits().unwrap_err(),
            "bps_rd cannot be used together with bps"
        );
        let mut zero = OwnSet::default();
        zero.values.insert("bps".into(), "0".into());
        assert!(!zero.is_empty());
        assert!(zero.limits().unwrap().is_unlimited());
    }

    #[test]
    fn effective_lists_what_is_set() {
        let mut limits = Limits::default();
        limits.get_mut(BucketKind::BpsWrite).avg = 100;
        limits.get_mut(BucketKind::BpsWrite).max = 200;
        limits.get_mut(BucketKind::BpsWrite).max_length = Some(Duration::from_secs(3));
        limits.get_mut(BucketKind::IopsTotal).avg = 7;
        let text = render_effective(
            &Effective {
                limits,
                origin: Origin::Directory("/vms".into()),
                group: None,
                qos: Default::default(),
                sizing: None,
                image_format: (ImageFormat::Auto, Origin::Mount),
            },
            0,
        );
        assert_eq!(
            text,
            "source=directory:/vms\nbps_wr=100\nbps_wr_max=200\nbps_wr_max_length=3\niops=7\n"
        );
        let text = render_effective(
            &Effective {
                limits: Limits::default(),
                origin: Origin::Mount,
                group: Some(("t1".into(), Origin::File)),
                qos: Default::default(),
                sizing: None,
                image_format: (ImageFormat::Auto, Origin::Mount),
            },
            2,
        );
        assert_eq!(
            text,
            "source=mount\ngroup=t1\ngroup_source=file\nweight=100\nweight_source=default\n\
             passthrough_handles=2\n"
        );
    }

    #[test]
    fn effective_says_how_per_gb_limits_were_computed() {
        use crate::sizing::{DiskSize, Sizing};
        let mut set = Limits::default();
        set.per_gb_mut(BucketKind::IopsTotal).rate = 3;
        set.per_gb_mut(BucketKind::IopsTotal).min = 100;
        set.get_mut(BucketKind::IopsTotal).max = 200;
        let size = DiskSize {
            bytes: 100 << 30,
            qcow2: true,
        };
        let derived = set.derive(size.bytes);
        let text = render_effective(
            &Effective {
                limits: derived.limits,
                origin: Origin::File,
                group: None,
                qos: Default::default(),
                sizing: Some(Sizing {
                    set,
                    size,
                    ignored: derived.ignored,
                }),
                image_format: (ImageFormat::Auto, Origin::Mount),
            },
            0,
        );
        assert_eq!(
            text,
            "source=file\niops=300\niops_per_gb=3\niops_per_gb_min=100\n\
             size=107374182400\nsize_gib=100\nsize_from=qcow2\nimage_format=auto\nimage_format_source=mount\nper_gb_limits=iops\n\
             iops_max_ignored=200\n"
        );
    }
}
