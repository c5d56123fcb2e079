//! `throttlefs set`, `get` and `unset`: the `user.throttle.<limit>` and
//! `user.throttle.group` attributes of a file or directory, for users
//! without the `attr` tools. Values are checked with the mount command's
//! parser and rules (src/options.rs, src/xattr.rs), and the whole resulting
//! set is checked before anything is changed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Parser};

use super::{Failure, get_attr, get_text, io_failure, list_attrs, parse, remove_attr, set_attr};
use crate::options::{LimitFlags, canonical_limit_name, given_twice, limit_names};
use crate::xattr::{self, Attr, OwnSet};

/// The attribute holding a file's or directory's group.
const GROUP_ATTR: &str = "user.throttle.group";
/// The name `unset` takes for the group membership.
const GROUP_NAME: &str = "group";

#[derive(Parser, Debug)]
#[command(
    about = "Set limits or the throttle group of a file or directory on a throttlefs mount \
             (its user.throttle.* attributes); live, persisted, validated as a whole",
    after_help = "Other limits (bursts, iops_size): -o NAME=VALUE, as for the mount. \
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
    /// a file or directory on a throttlefs mount
    path: PathBuf,
}

#[derive(Parser, Debug)]
#[command(about = "Show a file's or directory's own limits and group, and those in force")]
struct GetCli {
    /// a file or directory on a throttlefs mount
    path: PathBuf,
}

#[derive(Parser, Debug)]
#[command(
    about = "Remove limits (or the group membership, as `group`) from a file or directory; \
             with none of its own left, it inherits again"
)]
struct UnsetCli {
    /// a file or directory on a throttlefs mount
    path: PathBuf,
    /// limit names (bps_wr, iops_max, ...) or `group`
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

/// The clap definitions of `set`, `get` and `unset`, for the shell
/// completions.
pub(crate) fn commands() -> [clap::Command; 3] {
    use clap::CommandFactory;
    [SetCli::command(), GetCli::command(), UnsetCli::command()]
}

/// One attribute change: a limit set to a canonical value, or removed.
#[derive(Clone, Debug)]
struct Change {
    limit: String,
    value: Option<String>,
}

/// The own set of `path` (its stored limits, as the mount reads them).
/// Also checks that `path` is on a throttlefs mount.
fn own_set(path: &Path) -> Result<OwnSet, Failure> {
    get_attr(path, xattr::EFFECTIVE).map_err(|e| io_failure(path, "effective", &e))?;
    let names = list_attrs(path).map_err(|e| io_failure(path, "listing attributes", &e))?;
    let mut set = OwnSet::default();
    for name in names {
        if let Some(Attr::Limit(limit)) = xattr::classify(name.as_bytes()) {
            let value = get_text(path, &name).map_err(|e| io_failure(path, &name, &e))?;
            set.values.insert(limit, value);
        }
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
fn plan(current: &OwnSet, changes: Vec<Change>) -> Result<Vec<Change>, Failure> {
    let final_set = changes.iter().fold(current.clone(), |s, c| apply(&s, c));
    final_set.limits().map_err(Failure::usage)?;
    let mut left = changes;
    let mut order = Vec::new();
    let mut set = current.clone();
    while !left.is_empty() {
        let Some(i) = left.iter().position(|c| apply(&set, c).limits().is_ok()) else {
            return Err(Failure::usage(
                "these changes cannot be made one attribute at a time; set them in two steps",
            ));
        };
        let c = left.remove(i);
        set = apply(&set, &c);
        order.push(c);
    }
    Ok(order)
}

fn perform(path: &Path, order: &[Change]) -> Result<(), Failure> {
    for (done, c) in order.iter().enumerate() {
        let name = format!("{}{}", xattr::PREFIX, c.limit);
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
    // Every value is checked before anything is read or written. Limits
    // are keyed by canonical name (aliases are accepted), with the name
    // as first given for the "given twice" message.
    let mut given: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut add = |name: &str, value: &str| -> Result<(), Failure> {
        let limit = canonical_limit_name(name)
            .ok_or_else(|| Failure::usage(format!("unknown limit {name}")))?;
        let text = xattr::canonical(name, value.as_bytes()).map_err(Failure::usage)?;
        if let Some((first, _)) = given.get(&limit) {
            return Err(Failure::usage(given_twice(&limit, first, name)));
        }
        given.insert(limit, (name.to_string(), text));
        Ok(())
    };
    for (kind, values) in cli.limits.by_kind() {
        for value in values {
            add(kind.name(), value)?;
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
                return Err(Failure::usage(format!(
                    "{opt}: missing value (use -o {opt}=VALUE)"
                )));
            }
            None => return Err(Failure::usage(format!("unknown limit {opt}"))),
        }
    }
    let group = match &cli.group {
        Some(g) => Some(xattr::group_name(g.as_bytes()).map_err(Failure::usage)?),
        None => None,
    };
    if given.is_empty() && group.is_none() {
        return Err(Failure::usage(
            "nothing to set: give a limit (--bps-wr 10M, -o bps_max=20M) or --group NAME",
        ));
    }
    let current = own_set(&cli.path)?;
    let changes = given
        .into_iter()
        .map(|(limit, (_, value))| Change {
            limit,
            value: Some(value),
        })
        .collect();
    let order = plan(&current, changes)?;
    perform(&cli.path, &order)?;
    if let Some(group) = group {
        set_attr(&cli.path, GROUP_ATTR, group.as_bytes())
            .map_err(|e| io_failure(&cli.path, GROUP_ATTR, &e))?;
    }
    Ok(())
}

pub fn unset_main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: UnsetCli = parse(args)?;
    let mut group = false;
    // (canonical, as given); aliases are accepted.
    let mut limits: Vec<(String, &String)> = Vec::new();
    for name in &cli.names {
        if name == GROUP_NAME {
            group = true;
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
    let current = own_set(&cli.path)?;
    for (limit, name) in &limits {
        if !current.values.contains_key(limit) {
            return Err(Failure::usage(format!(
                "{name}: not set on {}",
                cli.path.display()
            )));
        }
    }
    if group && get_attr(&cli.path, GROUP_ATTR).is_err() {
        return Err(Failure::usage(format!(
            "group: not set on {}",
            cli.path.display()
        )));
    }
    let changes = limits
        .into_iter()
        .map(|(limit, _)| Change { limit, value: None })
        .collect();
    let order = plan(&current, changes)?;
    perform(&cli.path, &order)?;
    if group {
        remove_attr(&cli.path, GROUP_ATTR).map_err(|e| io_failure(&cli.path, GROUP_ATTR, &e))?;
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

pub fn get_main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: GetCli = parse(args)?;
    let path = &cli.path;
    let own = own_set(path)?;
    let own_limits: Vec<(String, String)> = limit_names()
        .into_iter()
        .filter_map(|n| {
            let v = own.values.get(&n)?;
            // Stored text is shown as the mount reads it back.
            let v = xattr::canonical(&n, v.as_bytes()).unwrap_or_else(|_| v.clone());
            Some((n, v))
        })
        .collect();
    let own_group = get_text(path, GROUP_ATTR).ok();
    let effective =
        get_text(path, xattr::EFFECTIVE).map_err(|e| io_failure(path, "effective", &e))?;
    let mut source = String::new();
    let mut in_force = Vec::new();
    let (mut group, mut group_source) = (None, None);
    for line in effective.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "source" => source = v.to_string(),
            "group" => group = Some(v.to_string()),
            "group_source" => group_source = Some(v.to_string()),
            _ => in_force.push((k.to_string(), v.to_string())),
        }
    }
    println!("own limits:      {}", join_limits(&own_limits));
    println!(
        "own group:       {}",
        own_group.as_deref().unwrap_or("none")
    );
    println!(
        "limits in force: {} (from {source})",
        join_limits(&in_force)
    );
    match (group, group_source) {
        (Some(g), Some(s)) => println!("group in force:  {g} (from {s})"),
        _ => println!("group in force:  none"),
    }
    Ok(())
}
