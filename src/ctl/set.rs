//! `throttlefs set`, `get` and `unset`: the `user.throttle.<limit>` and
//! `user.throttle.group` attributes of a file or directory, and with
//! `--group-limits NAME` a group's `user.throttle.group.NAME.<limit>` on
//! the mount root, for users without the `attr` tools. Values are checked with the mount command's
//! parser and rules (src/options.rs, src/xattr.rs), and the whole resulting
//! set is checked before anything is changed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Parser};

use super::attr::{get_attr, get_text, io_failure, list_attrs, remove_attr, set_attr};
use super::failure::{Failure, parse};
use super::snapshot::{FileRow, is_mount_root, parse_effective, parse_group};
use super::table::passthrough_note;
use crate::options::{
    GROUP_NAME_RULE, LimitFlags, canonical_limit_name, given_twice, limit_names, valid_group_name,
};
use crate::qos;
use crate::sizing::{IMAGE_FORMAT, ImageFormat};
use crate::xattr::{self, Attr, OwnSet};

/// The name `unset` takes for the group membership.
const GROUP_NAME: &str = "group";

#[derive(Parser, Debug)]
#[command(
    about = "Set limits or the throttle group of a file or directory",
    long_about = "Set limits or the throttle group of a file or directory on a throttlefs mount \
                  (its user.throttle.* attributes); live, persisted, validated as a whole",
    after_help = "Other limits (bursts, iops_size): -o NAME=VALUE, as for the mount. \
                  Weight and reservations within the file's group: --weight, --reserve-iops, \
                  --reserve-bps (or -o weight=N, ...); each is an attribute of its own. \
                  A value of 0 sets the limit to unlimited and keeps the set the file's own. \
                  libvirt <iotune> and QEMU throttling names are accepted too \
                  (-o total_bytes_sec=10M, -o bps-write-max=50M)."
)]
struct SetCli {
    #[command(flatten)]
    limits: LimitFlags,
    /// any limit by its name (bps_max, iops_size, ...); repeatable
    #[arg(short = 'o', value_name = "LIMIT=VALUE[,...]", action = ArgAction::Append)]
    options: Vec<String>,
    /// join throttle group NAME (files below a directory inherit it)
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// share of its group when the group is saturated, 1 to 10000 (default 100)
    #[arg(long, value_name = "N", conflicts_with = "group_limits")]
    weight: Option<String>,
    /// operations/s reserved in its group while it has requests waiting
    #[arg(long, value_name = "N", conflicts_with = "group_limits")]
    reserve_iops: Option<String>,
    /// bytes/s reserved in its group while it has requests waiting
    #[arg(long, value_name = "BYTES", conflicts_with = "group_limits")]
    reserve_bps: Option<String>,
    /// how per-GiB limits size the disk: raw (the file's size), qcow2
    /// (the header's virtual size) or auto (probe; files below a directory
    /// inherit it)
    #[arg(long, value_name = "raw|qcow2|auto", conflicts_with = "group_limits")]
    image_format: Option<String>,
    /// set the limits of throttle group NAME instead (PATH: the mount point)
    #[arg(long, value_name = "NAME", conflicts_with = "group")]
    group_limits: Option<String>,
    /// a file or directory on a throttlefs mount
    path: PathBuf,
}

#[derive(Parser, Debug)]
#[command(
    about = "Show the limits and group of a file, a directory or a group",
    long_about = "Show a file's or directory's own limits and group, and those in force; \
                  or a group's limits and where they come from"
)]
struct GetCli {
    /// show the limits of throttle group NAME instead (PATH: the mount point)
    #[arg(long, value_name = "NAME")]
    group_limits: Option<String>,
    /// a file or directory on a throttlefs mount
    path: PathBuf,
}

#[derive(Parser, Debug)]
#[command(
    about = "Remove limits or the group membership of a file or directory",
    long_about = "Remove limits (or the group membership, as `group`) from a file or directory; \
                  with none of its own left, it inherits again"
)]
struct UnsetCli {
    /// remove limits of throttle group NAME instead (PATH: the mount point)
    #[arg(long, value_name = "NAME")]
    group_limits: Option<String>,
    /// a file or directory on a throttlefs mount
    path: PathBuf,
    /// limit names (bps_wr, iops_max, ...), `group`, `weight`, `reserve_iops`, `reserve_bps` or `image_format`
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

/// The clap definitions of `set`, `get` and `unset`, for the shell
/// completions.
pub(crate) fn commands() -> [clap::Command; 3] {
    use clap::CommandFactory;
    [SetCli::command(), GetCli::command(), UnsetCli::command()]
}

/// Whose limits a command reads or changes: a file's or directory's own
/// (`user.throttle.<limit>`), or a group's, stored on the mount root
/// (`user.throttle.group.NAME.<limit>`).
enum Target {
    Object,
    Group(String),
}

impl Target {
    /// From `--group-limits NAME`, the name checked as the mount checks
    /// `--group NAME:...`.
    fn new(group_limits: Option<&String>) -> Result<Target, Failure> {
        match group_limits {
            None => Ok(Target::Object),
            Some(g) if valid_group_name(g) => Ok(Target::Group(g.clone())),
            Some(g) => Err(Failure::usage(format!(
                "group '{g}': a name is {GROUP_NAME_RULE}"
            ))),
        }
    }

    fn attr(&self, limit: &str) -> String {
        match self {
            Target::Object => format!("{}{limit}", xattr::PREFIX),
            Target::Group(g) => format!("{}{limit}", xattr::group_prefix(g)),
        }
    }

    /// A refused value, in the words the mount uses for the same value
    /// (`group NAME: ...` for `--group NAME:LIMIT=VALUE`).
    fn usage(&self, msg: impl Into<String>) -> Failure {
        match self {
            Target::Object => Failure::usage(msg),
            Target::Group(g) => Failure::usage(format!("group {g}: {}", msg.into())),
        }
    }
}

/// One attribute change: a limit set to a canonical value, or removed.
#[derive(Clone, Debug)]
struct Change {
    limit: String,
    value: Option<String>,
}

/// The own set of `path` or of the target group (its stored limits, as
/// the mount reads them). Also checks that `path` is on a throttlefs
/// mount, and its root for a group.
fn own_set(path: &Path, target: &Target) -> Result<OwnSet, Failure> {
    get_attr(path, xattr::EFFECTIVE).map_err(|e| io_failure(path, "effective", &e))?;
    if matches!(target, Target::Group(_)) && !is_mount_root(path) {
        return Err(Failure::usage(format!(
            "{}: group limits are kept on the mount point; give it instead",
            path.display()
        )));
    }
    let names = list_attrs(path).map_err(|e| io_failure(path, "listing attributes", &e))?;
    let mut set = OwnSet::default();
    for name in names {
        let limit = match (xattr::classify(name.as_bytes()), target) {
            (Some(Attr::Limit(limit)), Target::Object) => limit,
            (Some(Attr::GroupLimit { group, limit }), Target::Group(g)) if group == *g => limit,
            _ => continue,
        };
        let value = get_text(path, &name).map_err(|e| io_failure(path, &name, &e))?;
        set.values.insert(limit, value);
    }
    Ok(set)
}

fn apply(set: &OwnSet, change: &Change) -> OwnSet {
    let mut next = set.clone();
    match &change.value {
        Some(v) => next.values.insert(change.limit.clone(), v.clone()),
        None => next.values.remove(&change.limit),
    };
    next
}

/// An order in which every change leaves a set the mount accepts (it
/// checks the whole set at each attribute): e.g. a burst after its average
/// when both are new, before it when the average is lowered below the old
/// burst. The final set is checked first, with the mount's message.
fn plan(current: &OwnSet, changes: Vec<Change>, target: &Target) -> Result<Vec<Change>, Failure> {
    let final_set = changes.iter().fold(current.clone(), |s, c| apply(&s, c));
    final_set.limits().map_err(|e| target.usage(e))?;
    let mut left = changes;
    let mut order = Vec::new();
    let mut set = current.clone();
    while !left.is_empty() {
        let Some(i) = left.iter().position(|c| apply(&set, c).limits().is_ok()) else {
            return Err(target.usage(
                "these changes cannot be made one attribute at a time; set them in two steps",
            ));
        };
        let c = left.remove(i);
        set = apply(&set, &c);
        order.push(c);
    }
    Ok(order)
}

fn perform(path: &Path, order: &[Change], target: &Target) -> Result<(), Failure> {
    for (done, c) in order.iter().enumerate() {
        let name = target.attr(&c.limit);
        let r = match &c.value {
            Some(v) => set_attr(path, &name, v.as_bytes()),
            None => remove_attr(path, &name),
        };
        if let Err(e) = r {
            let mut f = io_failure(path, &name, &e);
            if done > 0 {
                f.msg
                    .push_str(&format!(" ({done} change(s) before it were made)"));
            }
            return Err(f);
        }
    }
    Ok(())
}

pub fn set_main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: SetCli = parse(args)?;
    let target = Target::new(cli.group_limits.as_ref())?;
    // Every value is checked before anything is read or written. Limits
    // are keyed by canonical name (aliases are accepted), with the name
    // as first given for the "given twice" message.
    let mut given: BTreeMap<String, (String, String)> = BTreeMap::new();
    // Weight and reservations: attributes of their own, not part of the
    // set of limits (see crate::qos).
    let mut qos_given: BTreeMap<String, String> = BTreeMap::new();
    let mut add = |name: &str, value: &str| -> Result<(), Failure> {
        if qos::is_name(name) {
            if matches!(target, Target::Group(_)) {
                return Err(target.usage(format!(
                    "{name}: weights and reservations are set on members, not on a group"
                )));
            }
            let text = qos::canonical(name, value.as_bytes()).map_err(Failure::usage)?;
            if qos_given.insert(name.to_string(), text).is_some() {
                return Err(Failure::usage(format!("{name} given twice")));
            }
            return Ok(());
        }
        let limit = canonical_limit_name(name)
            .ok_or_else(|| target.usage(format!("unknown limit {name}")))?;
        let text = xattr::canonical(name, value.as_bytes()).map_err(|e| target.usage(e))?;
        if let Some((first, _)) = given.get(&limit) {
            return Err(target.usage(given_twice(&limit, first, name)));
        }
        given.insert(limit, (name.to_string(), text));
        Ok(())
    };
    for (kind, values) in cli.limits.by_kind() {
        for value in values {
            add(kind.name(), value)?;
        }
    }
    for (name, value) in [
        (qos::WEIGHT, &cli.weight),
        (qos::RESERVE_IOPS, &cli.reserve_iops),
        (qos::RESERVE_BPS, &cli.reserve_bps),
    ] {
        if let Some(value) = value {
            add(name, value)?;
        }
    }
    for opt in cli
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        match opt.split_once('=') {
            Some((name, value)) => add(name, value)?,
            None if canonical_limit_name(opt).is_some() => {
                return Err(target.usage(format!("{opt}: missing value (use -o {opt}=VALUE)")));
            }
            None => return Err(target.usage(format!("unknown limit {opt}"))),
        }
    }
    let group = match &cli.group {
        Some(g) => Some(xattr::group_name(g.as_bytes()).map_err(Failure::usage)?),
        None => None,
    };
    let image_format = match &cli.image_format {
        Some(f) => Some(ImageFormat::parse(f).map_err(Failure::usage)?),
        None => None,
    };
    if given.is_empty() && group.is_none() && qos_given.is_empty() && image_format.is_none() {
        return Err(Failure::usage(match target {
            Target::Object => {
                "nothing to set: give a limit (--bps-wr 10M, -o bps_max=20M), --group NAME, \
                 --weight N, a reservation or --image-format"
            }
            Target::Group(_) => "nothing to set: give a limit (--bps 200M, -o bps_max=400M)",
        }));
    }
    let current = own_set(&cli.path, &target)?;
    let changes = given
        .into_iter()
        .map(|(limit, (_, value))| Change {
            limit,
            value: Some(value),
        })
        .collect();
    let order = plan(&current, changes, &target)?;
    perform(&cli.path, &order, &target)?;
    if let Some(group) = group {
        set_attr(&cli.path, xattr::GROUP, group.as_bytes())
            .map_err(|e| io_failure(&cli.path, xattr::GROUP, &e))?;
    }
    for (name, value) in qos_given {
        let attr = format!("{}{name}", xattr::PREFIX);
        set_attr(&cli.path, &attr, value.as_bytes())
            .map_err(|e| io_failure(&cli.path, &attr, &e))?;
    }
    if let Some(format) = image_format {
        let attr = format!("{}{IMAGE_FORMAT}", xattr::PREFIX);
        set_attr(&cli.path, &attr, format.as_str().as_bytes())
            .map_err(|e| io_failure(&cli.path, &attr, &e))?;
    }
    Ok(())
}

pub fn unset_main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: UnsetCli = parse(args)?;
    let target = Target::new(cli.group_limits.as_ref())?;
    let mut group = false;
    let mut qos_names: Vec<&String> = Vec::new();
    // (canonical, as given); aliases are accepted.
    let mut limits: Vec<(String, &String)> = Vec::new();
    for name in &cli.names {
        if name == GROUP_NAME && matches!(target, Target::Object) {
            group = true;
            continue;
        }
        // Removed as weight and reservations are: an attribute of its own.
        if (qos::is_name(name) || name == IMAGE_FORMAT) && matches!(target, Target::Object) {
            if !qos_names.contains(&name) {
                qos_names.push(name);
            }
            continue;
        }
        let Some(limit) = canonical_limit_name(name) else {
            return Err(Failure::usage(format!("unknown limit {name}")));
        };
        if let Some((_, first)) = limits.iter().find(|(l, _)| *l == limit) {
            return Err(Failure::usage(given_twice(&limit, first, name)));
        }
        limits.push((limit, name));
    }
    let current = own_set(&cli.path, &target)?;
    for (limit, name) in &limits {
        if !current.values.contains_key(limit) {
            return Err(Failure::usage(match &target {
                Target::Object => format!("{name}: not set on {}", cli.path.display()),
                Target::Group(g) => format!("{name}: not set for group {g} on the mount root"),
            }));
        }
    }
    if group && get_attr(&cli.path, xattr::GROUP).is_err() {
        return Err(Failure::usage(format!(
            "group: not set on {}",
            cli.path.display()
        )));
    }
    for name in &qos_names {
        if get_attr(&cli.path, &format!("{}{name}", xattr::PREFIX)).is_err() {
            return Err(Failure::usage(format!(
                "{name}: not set on {}",
                cli.path.display()
            )));
        }
    }
    let changes = limits
        .into_iter()
        .map(|(limit, _)| Change { limit, value: None })
        .collect();
    let order = plan(&current, changes, &target)?;
    perform(&cli.path, &order, &target)?;
    if group {
        remove_attr(&cli.path, xattr::GROUP)
            .map_err(|e| io_failure(&cli.path, xattr::GROUP, &e))?;
    }
    for name in qos_names {
        let attr = format!("{}{name}", xattr::PREFIX);
        remove_attr(&cli.path, &attr).map_err(|e| io_failure(&cli.path, &attr, &e))?;
    }
    Ok(())
}

fn join_limits(limits: &[(String, String)]) -> String {
    if limits.is_empty() {
        return "none".into();
    }
    limits
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A stored set's limits in the order of `limit_names`, each as the mount
/// reads it back.
fn listed(own: &OwnSet) -> Vec<(String, String)> {
    limit_names()
        .into_iter()
        .filter_map(|n| {
            let v = own.values.get(&n)?;
            let v = xattr::canonical(&n, v.as_bytes()).unwrap_or_else(|_| v.clone());
            Some((n, v))
        })
        .collect()
}

/// `get --group-limits NAME MOUNTPOINT`: the group's set on the root, and
/// the limits in force from its `stats` with where they come from.
fn get_group(path: &Path, target: &Target, group: &str) -> Result<(), Failure> {
    let own = own_set(path, target)?;
    let attr = format!("{}stats", xattr::group_prefix(group));
    let stats = get_text(path, &attr).map_err(|e| io_failure(path, &attr, &e))?;
    let row = parse_group(group, &stats);
    let origin = match row.source.as_str() {
        "root" => format!("root: {}* on the mount point", xattr::group_prefix(group)),
        "mount" => "mount: --group at mount time".to_string(),
        // `none`: no limits set either way.
        _ => "none".to_string(),
    };
    println!("own limits:      {}", join_limits(&listed(&own)));
    if row.limits.is_empty() {
        println!("limits in force: none");
    } else {
        println!(
            "limits in force: {} (from {origin})",
            join_limits(&row.limits)
        );
    }
    println!("members:         {}", row.members);
    Ok(())
}

pub fn get_main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: GetCli = parse(args)?;
    let path = &cli.path;
    let target = Target::new(cli.group_limits.as_ref())?;
    if let Target::Group(g) = &target {
        return get_group(path, &target, g);
    }
    let own = own_set(path, &target)?;
    let own_limits = listed(&own);
    let own_group = get_text(path, xattr::GROUP).ok();
    let effective =
        get_text(path, xattr::EFFECTIVE).map_err(|e| io_failure(path, "effective", &e))?;
    let mut in_force = FileRow::default();
    parse_effective(&mut in_force, &effective);
    println!("own limits:      {}", join_limits(&own_limits));
    println!(
        "own group:       {}",
        own_group.as_deref().unwrap_or("none")
    );
    println!(
        "limits in force: {} (from {})",
        join_limits(&in_force.limits),
        in_force.source
    );
    let own_qos: Vec<(String, String)> = qos::NAMES
        .iter()
        .filter_map(|n| {
            let v = get_text(path, &format!("{}{n}", xattr::PREFIX)).ok()?;
            Some((n.to_string(), v.trim_end_matches(['\n', '\0']).to_string()))
        })
        .collect();
    if !own_qos.is_empty() {
        println!("own qos:         {}", join_limits(&own_qos));
    }
    if let Ok(v) = get_text(path, &format!("{}{IMAGE_FORMAT}", xattr::PREFIX)) {
        println!("own image format: {}", v.trim_end_matches(['\n', '\0']));
    }
    if !in_force.sizing.is_empty() {
        let fields: Vec<String> = in_force
            .sizing
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        println!("sized by:        {}", fields.join(", "));
    }
    match (in_force.group, in_force.group_source) {
        (Some(g), Some(s)) => println!("group in force:  {g} (from {s})"),
        _ => println!("group in force:  none"),
    }
    // Each of weight and reservations with where it comes from, as
    // user.throttle.effective has them.
    let sourced: Vec<String> = in_force
        .qos
        .iter()
        .map(|(n, v)| {
            let source = effective
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{n}_source=")))
                .unwrap_or("default");
            format!("{n}={v} (from {source})")
        })
        .collect();
    if !sourced.is_empty() {
        println!("qos in force:    {}", sourced.join(" "));
    }
    if effective.lines().any(|l| l.starts_with("qos=inert")) {
        println!("                 (inert: weights and reservations apply in a group only)");
    }
    if in_force.passthrough > 0 {
        println!(
            "passthrough:     {}; the limits apply from the file's next open",
            passthrough_note(in_force.passthrough)
        );
    }
    Ok(())
}
