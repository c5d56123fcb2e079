//! Command line and `-o` option parsing.
//!
//! Limit names and value syntax follow QEMU's `block_set_io_throttle`, so
//! users can carry settings over. Everything here returns plain one-line
//! messages (no clap types) because `apply_limit` and the value parsers are
//! reused for per-file xattr values.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, ValueHint};

use crate::sizing::{IMAGE_FORMAT, ImageFormat};
use crate::throttle::{BucketKind, Limits};

/// Worker threads doing the real file I/O when `--io-threads` is not given.
pub const DEFAULT_IO_THREAD_COUNT: usize = 8;

/// Upper bound for `--io-threads`; more only burns memory and descriptors.
pub const MAX_IO_THREAD_COUNT: usize = 1024;

/// Exit code for bad usage or bad values (clap's and sysexits' convention).
const USAGE_EXIT_CODE: i32 = 2;

/// Exit code after printing help or version.
const HELP_EXIT_CODE: i32 = 0;

/// Most decimal places accepted in a size: keeps `fraction * 2^60` within u128.
const MAX_SIZE_FRACTION_DIGITS: usize = 20;

/// Decimal places in a nanosecond count.
const NANOS_FRACTION_DIGITS: usize = 9;

/// Limit name of the iops size setting, which is not tied to one bucket.
const IOPS_SIZE_NAME: &str = "iops_size";

/// Option name of the worker thread count in `-o`.
const IO_THREADS_NAME: &str = "io_threads";

/// `-o passthrough`, the same as `--passthrough`.
const PASSTHROUGH_NAME: &str = "passthrough";

/// Option name of the FUSE transport choice in `-o`.
const IO_URING_NAME: &str = "io_uring";

/// How FUSE requests reach the daemon: over io_uring (Linux 6.14+, when
/// the administrator has set the fuse module parameter `enable_uring`) or
/// by a read and a write on `/dev/fuse` per request.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum IoUringMode {
    /// io_uring when the kernel offers it, else `/dev/fuse` (said at -v).
    Auto,
    /// io_uring or fail to mount.
    On,
    /// `/dev/fuse` only.
    Off,
}

impl IoUringMode {
    fn parse(value: &str) -> Result<IoUringMode, String> {
        choose(
            IO_URING_NAME,
            value,
            &[
                ("auto", IoUringMode::Auto),
                ("on", IoUringMode::On),
                ("off", IoUringMode::Off),
            ],
        )
    }
}

/// `value` of option `option` as one of `choices` (its word, its value),
/// or an error naming the option and the words it takes.
fn choose<T: Copy>(option: &str, value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    if let Some(&(_, v)) = choices.iter().find(|(word, _)| *word == value) {
        return Ok(v);
    }
    let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
    let expected = match words.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => words.concat(),
    };
    Err(format!("{option}: expected {expected}, got '{value}'"))
}

/// Option name of the sandbox choice in `-o`.
const SANDBOX_NAME: &str = "sandbox";

/// How the daemon confines itself once mounted (see src/sandbox and
/// docs/reliability.md): Landlock to the source directory, the capabilities
/// it needs and no more, and no new privileges.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SandboxMode {
    /// Not given: the sandbox, as far as the kernel supports Landlock (a
    /// kernel without it gets one warning).
    Default,
    /// `landlock`, asked for explicitly: a kernel that cannot enforce it
    /// fully fails the mount.
    Landlock,
    /// `none`: no Landlock, every capability kept, as before the sandbox.
    None,
}

impl SandboxMode {
    fn parse(value: &str) -> Result<SandboxMode, String> {
        choose(
            SANDBOX_NAME,
            value,
            &[
                ("landlock", SandboxMode::Landlock),
                ("none", SandboxMode::None),
            ],
        )
    }
}

/// Option name of the seccomp choice in `-o`.
const SECCOMP_NAME: &str = "seccomp";

/// What the daemon's seccomp filter does with a system call it does not
/// make (see src/sandbox/seccomp.rs and docs/reliability.md).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SeccompMode {
    /// Not given: as `Kill` where the kernel has seccomp, else nothing (a
    /// kernel without it gets one warning).
    Default,
    /// `kill`, asked for explicitly: kill the whole daemon; a kernel
    /// without seccomp fails the mount.
    Kill,
    /// `log`: allow it, and have the kernel log it (for diagnosing a kill).
    Log,
    /// `none`: no filter.
    None,
}

impl SeccompMode {
    fn parse(value: &str) -> Result<SeccompMode, String> {
        choose(
            SECCOMP_NAME,
            value,
            &[
                ("kill", SeccompMode::Kill),
                ("log", SeccompMode::Log),
                ("none", SeccompMode::None),
            ],
        )
    }
}

/// The transport when `--io-uring` is not given: `/dev/fuse`. io_uring
/// costs less CPU, but every request holds a ring entry of its caller's
/// CPU until answered, so a throttled file with a deep queue can make
/// other files' requests from that CPU wait in the kernel; over
/// `/dev/fuse` only its own requests wait. See docs/operations.md.
pub const DEFAULT_IO_URING: IoUringMode = IoUringMode::Off;

/// `-o group.NAME.LIMIT=VALUE`: one limit of throttle group NAME (a group
/// spec has commas, which `-o` splits on, so each limit is its own item).
const GROUP_OPTION_PREFIX: &str = "group.";

/// Options mount(8), fstab and mount.fuse3 pass along that mean nothing to
/// a FUSE mount (they are for mount(8) itself, systemd or the admin);
/// accepted and ignored. Atime variants other than atime/noatime are here
/// too: access times are the underlying filesystem's.
const IGNORED_MOUNT_OPTIONS: [&str; 20] = [
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "silent",
    "loud",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
];

/// Prefixes of ignored options with a value or a namespace: `x-systemd.*`,
/// `x-gvfs-*`, `comment=...` (util-linux's userspace options).
const IGNORED_MOUNT_OPTION_PREFIXES: [&str; 2] = ["x-", "comment="];

/// Flags that cancel each other; the later one wins, as with mount(8)
/// (fstab's `defaults,ro` or mount.fuse3 adding `dev,suid` after `nodev`).
const OPPOSITE_FLAGS: [(&str, &str); 6] = [
    ("ro", "rw"),
    ("dev", "nodev"),
    ("suid", "nosuid"),
    ("exec", "noexec"),
    ("atime", "noatime"),
    ("sync", "async"),
];

/// Everything `main` needs to mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Canonicalized existing directory whose files are served.
    pub source: PathBuf,
    /// Canonicalized empty directory the filesystem is mounted on.
    pub mountpoint: PathBuf,
    /// Validated defaults applied to every file.
    pub limits: Limits,
    /// FUSE options from `-o`, without `allow_other`.
    pub fuse_options: Vec<fuser::MountOption>,
    pub allow_other: bool,
    /// Number of `-v` given.
    pub verbose: u8,
    /// Worker threads for file I/O, 1..=MAX_IO_THREAD_COUNT.
    pub io_threads: usize,
    /// Throttle groups' limits from `--group` and `-o group.NAME.LIMIT=`,
    /// validated.
    pub groups: Vec<(String, Limits)>,
    /// `-f`: stay attached to the caller instead of detaching once mounted.
    pub foreground: bool,
    /// `--passthrough`: files without a limit in force when they are
    /// opened are read and written by the kernel straight from the
    /// underlying file (FUSE passthrough); see docs/limits.md.
    pub passthrough: bool,

    /// `--io-uring` / `-o io_uring=`: the FUSE transport.
    pub io_uring: IoUringMode,

    /// `--sandbox` / `-o sandbox=`: how the daemon confines itself.
    pub sandbox: SandboxMode,

    /// `--seccomp` / `-o seccomp=`: the system call filter.
    pub seccomp: SeccompMode,

    /// `--image-format` / `-o image_format=`: how per-GiB limits size a
    /// disk where no `user.throttle.image_format` says.
    pub image_format: ImageFormat,
}

/// Longest throttle group name.
pub const GROUP_NAME_MAX_CHARS: usize = 64;

/// What `valid_group_name` accepts, for error messages.
pub const GROUP_NAME_RULE: &str = "1 to 64 characters of A-Z a-z 0-9 . _ -";

/// A group name is 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn valid_group_name(name: &str) -> bool {
    (1..=GROUP_NAME_MAX_CHARS).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `--group NAME:LIMIT=VALUE[,LIMIT=VALUE...]`: the group's name and its
/// validated limits.
pub fn parse_group(spec: &str) -> Result<(String, Limits), String> {
    let (name, list) = spec
        .split_once(':')
        .ok_or_else(|| format!("group '{spec}': expected NAME:LIMIT=VALUE[,...]"))?;
    if !valid_group_name(name) {
        return Err(format!("group '{name}': a name is {GROUP_NAME_RULE}"));
    }
    let mut limits = Limits::default();
    let mut seen: HashMap<String, &str> = HashMap::new();
    for item in list.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("group {name}: '{item}' is not LIMIT=VALUE"))?;
        let canonical = canonical_limit_name(key).unwrap_or_else(|| key.to_string());
        if is_per_gb_name(&canonical) {
            return Err(format!("group {name}: {}", per_gb_in_group(key)));
        }
        if let Some(first) = seen.insert(canonical.clone(), key) {
            return Err(format!(
                "group {name}: {}",
                given_twice(&canonical, first, key)
            ));
        }
        apply_limit(&mut limits, key, value).map_err(|e| format!("group {name}: {e}"))?;
    }
    limits
        .validate()
        .map_err(|e| format!("group {name}: {e}"))?;
    Ok((name.to_string(), limits))
}

/// The six limit flags, shared by the mount command and `throttlefs set`
/// so that both have the same names, help and parsing. Values are kept as
/// given and checked by the caller (the mount's rules for both).
#[derive(Args, Debug)]
pub struct LimitFlags {
    /// limit total (read + write) bytes per second (0 = unlimited)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true, action = ArgAction::Append)]
    pub bps: Vec<String>,
    /// limit read bytes per second (0 = unlimited)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true, action = ArgAction::Append)]
    pub bps_rd: Vec<String>,
    /// limit write bytes per second (0 = unlimited)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true, action = ArgAction::Append)]
    pub bps_wr: Vec<String>,
    /// limit total operations per second (0 = unlimited)
    #[arg(long, value_name = "N", allow_negative_numbers = true, action = ArgAction::Append)]
    pub iops: Vec<String>,
    /// limit read operations per second (0 = unlimited)
    #[arg(long, value_name = "N", allow_negative_numbers = true, action = ArgAction::Append)]
    pub iops_rd: Vec<String>,
    /// limit write operations per second (0 = unlimited)
    #[arg(long, value_name = "N", allow_negative_numbers = true, action = ArgAction::Append)]
    pub iops_wr: Vec<String>,
}

impl LimitFlags {
    /// Each flag's bucket and its values, in the order of `--help`.
    pub fn by_kind(&self) -> [(BucketKind, &Vec<String>); 6] {
        [
            (BucketKind::BpsTotal, &self.bps),
            (BucketKind::BpsRead, &self.bps_rd),
            (BucketKind::BpsWrite, &self.bps_wr),
            (BucketKind::IopsTotal, &self.iops),
            (BucketKind::IopsRead, &self.iops_rd),
            (BucketKind::IopsWrite, &self.iops_wr),
        ]
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "throttlefs",
    version,
    about = "Mount SOURCE on MOUNTPOINT through FUSE, throttling each file's I/O \
             with QEMU's disk-limit semantics. Detaches once the mount is live \
             (like sshfs or bindfs); -f stays in the foreground."
)]
struct Cli {
    /// stay in the foreground, logging to stderr, instead of detaching once
    /// the mount is live (and logging to syslog)
    #[arg(short = 'f', long)]
    foreground: bool,
    #[command(flatten)]
    limits: LimitFlags,
    /// limit (NAME=VALUE, see below) or FUSE mount option; repeatable
    #[arg(short = 'o', value_name = "OPT[,OPT...]", action = ArgAction::Append)]
    options: Vec<String>,
    /// more log output; repeat for even more
    #[arg(short = 'v', action = ArgAction::Count)]
    verbose: u8,
    /// I/O worker threads (1 to 1024, default 8; with io_uring, at most one per core)
    #[arg(long, value_name = "N", allow_negative_numbers = true, action = ArgAction::Append)]
    io_threads: Vec<String>,
    /// FUSE requests over io_uring: auto (when the kernel offers it), on
    /// (or fail), off (/dev/fuse only, the default)
    #[arg(long, value_name = "auto|on|off", action = ArgAction::Append)]
    io_uring: Vec<String>,
    /// confine the daemon once mounted: landlock (the default: only the
    /// source directory, only the capabilities it needs; asked for
    /// explicitly, a kernel without Landlock fails the mount), none
    #[arg(long, value_name = "landlock|none", action = ArgAction::Append)]
    sandbox: Vec<String>,
    /// system calls the daemon never makes: kill (the default: they kill
    /// it), log (they are logged by the kernel, for diagnosing), none
    #[arg(long, value_name = "kill|log|none", action = ArgAction::Append)]
    seccomp: Vec<String>,
    /// how per-GiB limits size a disk where no user.throttle.image_format
    /// says: raw (the file's size), qcow2 (the header's virtual size), auto
    /// (probe the header, the default)
    #[arg(long, value_name = "raw|qcow2|auto", action = ArgAction::Append)]
    image_format: Vec<String>,
    /// limits shared by the files of throttle group NAME, e.g. tenant1:bps=20M,iops=400; repeatable
    #[arg(long, value_name = "NAME:LIMIT=VALUE[,...]", action = ArgAction::Append)]
    group: Vec<String>,
    /// open files without a limit in FUSE passthrough: the kernel reads and writes them itself (needs CAP_SYS_ADMIN; a limit set later applies from the next open)
    #[arg(long)]
    passthrough: bool,
    /// directory whose contents are served
    #[arg(value_hint = ValueHint::DirPath)]
    source: PathBuf,
    /// empty directory to mount on (not inside SOURCE)
    #[arg(value_hint = ValueHint::DirPath)]
    mountpoint: PathBuf,
}

/// All limit names accepted by `apply_limit`: per bucket the average, its
/// burst rate and burst length, then `iops_size`, then per bucket the
/// per-GiB average with its floor and ceiling.
pub fn limit_names() -> Vec<String> {
    let mut names = Vec::new();
    for kind in BucketKind::ALL {
        let name = kind.name();
        names.push(name.to_string());
        names.push(format!("{name}_max"));
        names.push(format!("{name}_max_length"));
    }
    names.push(IOPS_SIZE_NAME.to_string());
    for kind in BucketKind::ALL {
        for (suffix, _) in PER_GB_SUFFIXES {
            names.push(format!("{}{suffix}", kind.name()));
        }
    }
    names
}

/// Suffixes of the per-GiB limits (`iops_per_gb`, its floor
/// `iops_per_gb_min` and its ceiling `iops_per_gb_cap`), and whether
/// Cinder has the same suffix after its names (`total_iops_sec_per_gb`,
/// `total_iops_sec_per_gb_min`; Cinder has no ceiling). Not `_per_gb_max`:
/// `*_max` is a burst rate here.
const PER_GB_SUFFIXES: [(&str, bool); 3] = [
    ("_per_gb", true),
    ("_per_gb_min", true),
    ("_per_gb_cap", false),
];

/// Why a throttle group refuses the per-GiB limit `name` (as given).
pub fn per_gb_in_group(name: &str) -> String {
    format!("{name}: a group has no size; per-GiB limits are set on files and directories")
}

/// Whether `name` (canonical) is a per-GiB limit or its floor or ceiling,
/// which a throttle group, having no size, cannot take.
pub fn is_per_gb_name(name: &str) -> bool {
    matches!(
        lookup_limit(name),
        Some((
            _,
            LimitField::PerGb | LimitField::PerGbMin | LimitField::PerGbCap
        ))
    )
}

/// Other spellings of the limits, so that settings can be pasted from
/// libvirt or QEMU: (ours, libvirt `<iotune>`, QEMU `throttling.*` without
/// the prefix). Burst names follow each spelling's own pattern:
/// `total_bytes_sec_max_length` in libvirt, `bps-total-max-length` in QEMU.
/// `iops_size` has no bursts.
pub const LIMIT_ALIASES: [(&str, &str, &str); 7] = [
    ("bps", "total_bytes_sec", "bps-total"),
    ("bps_rd", "read_bytes_sec", "bps-read"),
    ("bps_wr", "write_bytes_sec", "bps-write"),
    ("iops", "total_iops_sec", "iops-total"),
    ("iops_rd", "read_iops_sec", "iops-read"),
    ("iops_wr", "write_iops_sec", "iops-write"),
    (IOPS_SIZE_NAME, "size_iops_sec", "iops-size"),
];

/// QEMU's prefix of its throttling options (`-drive ...,throttling.bps-total=`),
/// accepted before QEMU's names.
const QEMU_THROTTLING_PREFIX: &str = "throttling.";

/// Burst suffixes: (ours and libvirt's, QEMU's).
const BURST_SUFFIXES: [(&str, &str); 2] = [("_max_length", "-max-length"), ("_max", "-max")];

/// Every alias and the limit it stands for, in the order of `LIMIT_ALIASES`,
/// each base before its burst names, then Cinder's per-GiB names (for
/// documentation and tests).
pub fn limit_aliases() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (ours, libvirt, qemu) in LIMIT_ALIASES {
        out.push((libvirt.to_string(), ours.to_string()));
        out.push((qemu.to_string(), ours.to_string()));
        if ours == IOPS_SIZE_NAME {
            continue;
        }
        for (suffix, qemu_suffix) in BURST_SUFFIXES.iter().rev() {
            out.push((format!("{libvirt}{suffix}"), format!("{ours}{suffix}")));
            out.push((format!("{qemu}{qemu_suffix}"), format!("{ours}{suffix}")));
        }
    }
    for (ours, cinder, _) in LIMIT_ALIASES.iter().filter(|a| a.0 != IOPS_SIZE_NAME) {
        for (suffix, _) in PER_GB_SUFFIXES.iter().filter(|s| s.1) {
            out.push((format!("{cinder}{suffix}"), format!("{ours}{suffix}")));
        }
    }
    out
}

/// The canonical name of a limit given by its name or an alias (see
/// `LIMIT_ALIASES`); None for anything else.
pub fn canonical_limit_name(name: &str) -> Option<String> {
    if name == IOPS_SIZE_NAME || lookup_limit(name).is_some() {
        return Some(name.to_string());
    }
    let (qemu_name, prefixed) = match name.strip_prefix(QEMU_THROTTLING_PREFIX) {
        Some(rest) => (rest, true),
        None => (name, false),
    };
    for (ours, libvirt, qemu) in LIMIT_ALIASES {
        let bursts = if ours == IOPS_SIZE_NAME {
            &[][..]
        } else {
            &BURST_SUFFIXES[..]
        };
        // Cinder's per-GiB names are libvirt's with Cinder's suffixes.
        if !prefixed && ours != IOPS_SIZE_NAME {
            for (suffix, _) in PER_GB_SUFFIXES.iter().filter(|s| s.1) {
                if name.strip_prefix(libvirt) == Some(*suffix) {
                    return Some(format!("{ours}{suffix}"));
                }
            }
        }
        let plain = std::iter::once(("", ""));
        for (suffix, qemu_suffix) in plain.chain(bursts.iter().copied()) {
            let libvirt_match = !prefixed
                && name
                    .strip_prefix(libvirt)
                    .is_some_and(|rest| rest == suffix);
            let qemu_match = qemu_name
                .strip_prefix(qemu)
                .is_some_and(|rest| rest == qemu_suffix);
            if libvirt_match || qemu_match {
                return Some(format!("{ours}{suffix}"));
            }
        }
    }
    None
}

/// The error for a limit named twice, `first` and `second` as given
/// (the same limit under two of its names says so).
pub fn given_twice(canonical: &str, first: &str, second: &str) -> String {
    if first == second {
        format!("{second} given twice")
    } else {
        format!("{canonical} given twice (as {first} and {second})")
    }
}

/// Splits `NAME.LIMIT` (a group's limit in `-o group.NAME.LIMIT=` or
/// `user.throttle.group.NAME.LIMIT`). Limit names have no dots, so the
/// group is all before the last one (group names may have dots), except
/// that a QEMU name keeps its `throttling.` prefix.
pub fn split_group_limit(s: &str) -> Option<(&str, &str)> {
    let (group, limit) = s.rsplit_once('.')?;
    let prefix = QEMU_THROTTLING_PREFIX.trim_end_matches('.');
    if let Some(short) = group.strip_suffix(prefix).and_then(|g| g.strip_suffix('.'))
        && limit.contains('-')
        && canonical_limit_name(limit).is_some()
    {
        return Some((short, &s[short.len() + 1..]));
    }
    Some((group, limit))
}

/// Which field of a `LimitSpec` a limit name sets.
#[derive(Clone, Copy)]
enum LimitField {
    Avg,
    Max,
    MaxLength,
    PerGb,
    PerGbMin,
    PerGbCap,
}

/// Split a limit name into its bucket and field; None for unknown names.
fn lookup_limit(name: &str) -> Option<(BucketKind, LimitField)> {
    let (base, field) = if let Some(base) = name.strip_suffix("_per_gb") {
        (base, LimitField::PerGb)
    } else if let Some(base) = name.strip_suffix("_per_gb_min") {
        (base, LimitField::PerGbMin)
    } else if let Some(base) = name.strip_suffix("_per_gb_cap") {
        (base, LimitField::PerGbCap)
    } else if let Some(base) = name.strip_suffix("_max_length") {
        (base, LimitField::MaxLength)
    } else if let Some(base) = name.strip_suffix("_max") {
        (base, LimitField::Max)
    } else {
        (name, LimitField::Avg)
    };
    BucketKind::from_name(base).map(|kind| (kind, field))
}

/// Set one limit by its QEMU name. Does not validate the whole set (call
/// `Limits::validate` once everything is applied) and does not detect
/// repeats, so callers may overwrite.
/// Aliases (`LIMIT_ALIASES`) are accepted; messages name the limit as given.
pub fn apply_limit(limits: &mut Limits, name: &str, value: &str) -> Result<(), String> {
    let named = |msg: String| format!("{name}: {msg}");
    let canonical = canonical_limit_name(name).ok_or_else(|| format!("unknown limit {name}"))?;
    if canonical == IOPS_SIZE_NAME {
        limits.iops_size = parse_size(value).map_err(named)?;
        return Ok(());
    }
    let (kind, field) = lookup_limit(&canonical).ok_or_else(|| format!("unknown limit {name}"))?;
    let parse_rate = |v: &str| {
        if kind.counts_bytes() {
            parse_size(v)
        } else {
            parse_count(v)
        }
    };
    let rate = || parse_rate(value).map_err(named);
    match field {
        LimitField::Avg => limits.get_mut(kind).avg = rate()?,
        LimitField::Max => limits.get_mut(kind).max = rate()?,
        LimitField::MaxLength => {
            limits.get_mut(kind).max_length = Some(parse_duration(value).map_err(named)?)
        }
        LimitField::PerGb => limits.per_gb_mut(kind).rate = rate()?,
        LimitField::PerGbMin => limits.per_gb_mut(kind).min = rate()?,
        LimitField::PerGbCap => limits.per_gb_mut(kind).cap = rate()?,
    }
    Ok(())
}

/// The canonical text of one limit of `limits`: plain integers, and
/// durations in seconds (a decimal fraction only when needed). `None` for
/// an unknown name or a burst length left at its default.
pub fn format_limit(limits: &Limits, name: &str) -> Option<String> {
    let name = &canonical_limit_name(name)?;
    if name == IOPS_SIZE_NAME {
        return Some(limits.iops_size.to_string());
    }
    let (kind, field) = lookup_limit(name)?;
    let spec = limits.get(kind);
    let per_gb = limits.per_gb(kind);
    Some(match field {
        LimitField::Avg => spec.avg.to_string(),
        LimitField::Max => spec.max.to_string(),
        LimitField::MaxLength => format_seconds(spec.max_length?),
        LimitField::PerGb => per_gb.rate.to_string(),
        LimitField::PerGbMin => per_gb.min.to_string(),
        LimitField::PerGbCap => per_gb.cap.to_string(),
    })
}

/// Whether `limits` sets the limit `name` (a non-zero rate or size, a
/// burst length given explicitly); false for an unknown name.
pub fn limit_is_set(limits: &Limits, name: &str) -> bool {
    let Some(name) = canonical_limit_name(name) else {
        return false;
    };
    if name == IOPS_SIZE_NAME {
        return limits.iops_size != 0;
    }
    let Some((kind, field)) = lookup_limit(&name) else {
        return false;
    };
    let spec = limits.get(kind);
    let per_gb = limits.per_gb(kind);
    match field {
        LimitField::Avg => spec.avg != 0,
        LimitField::Max => spec.max != 0,
        LimitField::MaxLength => spec.max_length.is_some(),
        LimitField::PerGb => per_gb.rate != 0,
        LimitField::PerGbMin => per_gb.min != 0,
        LimitField::PerGbCap => per_gb.cap != 0,
    }
}

/// "2", "0.5", "1.25": seconds without trailing zeros.
fn format_seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        return d.as_secs().to_string();
    }
    let text = format!("{}.{:09}", d.as_secs(), d.subsec_nanos());
    text.trim_end_matches('0').to_string()
}

/// Bytes per unit for a size suffix (case-insensitive): none or "B" = bytes;
/// K M G T P E, each optionally followed by "B" or "iB", are powers of 1024
/// (QEMU reads sizes this way, so "MB" means MiB too).
fn size_multiplier(suffix: &str) -> Option<u64> {
    let lower = suffix.to_ascii_lowercase();
    if lower.is_empty() || lower == "b" {
        return Some(1);
    }
    let mut chars = lower.chars();
    let shift_bits = match chars.next()? {
        'k' => 10,
        'm' => 20,
        'g' => 30,
        't' => 40,
        'p' => 50,
        'e' => 60,
        _ => return None,
    };
    matches!(chars.as_str(), "" | "b" | "ib").then_some(1u64 << shift_bits)
}

/// Decimal digits to a u128, None on overflow.
fn digits_to_u128(digits: &str) -> Option<u128> {
    digits.bytes().try_fold(0u128, |acc, d| {
        acc.checked_mul(10)?.checked_add(u128::from(d - b'0'))
    })
}

/// Split "12.5rest" into ("12", Some("5"), "rest"); the integer part may be
/// empty and the fraction is None when there is no dot.
fn split_number(s: &str) -> (&str, Option<&str>, &str) {
    let int_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (int, rest) = s.split_at(int_end);
    let Some(after_dot) = rest.strip_prefix('.') else {
        return (int, None, rest);
    };
    let frac_end = after_dot
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after_dot.len());
    let (frac, rest) = after_dot.split_at(frac_end);
    (int, Some(frac), rest)
}

/// Parse a size in bytes: "4096", "10M" (= 10 MiB), "1.5G". Suffixes are
/// binary (see `size_multiplier`). A fraction needs a suffix and the result
/// is rounded down to a whole byte. No surrounding whitespace or sign.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size '{s}'");
    let (int, frac, suffix) = split_number(s);
    if int.is_empty() || frac.is_some_and(str::is_empty) {
        return Err(invalid());
    }
    let multiplier = size_multiplier(suffix).ok_or_else(invalid)?;
    let too_large = || format!("invalid size '{s}': too large (at most {} bytes)", u64::MAX);
    let whole = digits_to_u128(int)
        .and_then(|n| n.checked_mul(u128::from(multiplier)))
        .ok_or_else(too_large)?;
    let part = match frac {
        None => 0,
        // QEMU rejects fractional bytes too: they cannot be meant.
        Some(_) if multiplier == 1 => {
            return Err(format!(
                "invalid size '{s}': a fraction needs a suffix (K, M, G, ...)"
            ));
        }
        Some(f) if f.len() > MAX_SIZE_FRACTION_DIGITS => {
            return Err(format!("invalid size '{s}': too many decimal places"));
        }
        Some(f) => {
            // Exact: floor(0.f * multiplier), fits u128 by the digit cap.
            let numerator = digits_to_u128(f).ok_or_else(invalid)? * u128::from(multiplier);
            numerator / 10u128.pow(f.len() as u32)
        }
    };
    u64::try_from(whole + part).map_err(|_| too_large())
}

/// Parse an operation count: a plain unsigned decimal integer.
pub fn parse_count(s: &str) -> Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid count '{s}'"));
    }
    // Only digits remain, so the only possible failure is overflow.
    s.parse::<u64>()
        .map_err(|_| format!("invalid count '{s}': too large (at most {})", u64::MAX))
}

/// Parse a duration: humantime ("30s", "1m", "500ms", "1s 500ms") or a bare
/// number of seconds ("2", "1.5"; digits past nanoseconds are dropped).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (int, frac, rest) = split_number(s);
    if !int.is_empty() && rest.is_empty() && !frac.is_some_and(str::is_empty) {
        let too_long = || format!("invalid duration '{s}': too long");
        let secs = int.parse::<u64>().map_err(|_| too_long())?;
        let frac = frac.unwrap_or("");
        let nanos_digits = &frac[..frac.len().min(NANOS_FRACTION_DIGITS)];
        let nanos = format!("{nanos_digits:0<NANOS_FRACTION_DIGITS$}")
            .parse::<u32>()
            .map_err(|_| format!("invalid duration '{s}'"))?;
        return Ok(Duration::new(secs, nanos));
    }
    humantime::parse_duration(s).map_err(|_| {
        format!("invalid duration '{s}' (use e.g. 30s, 500ms, 1m or a number of seconds)")
    })
}

/// What each limit name means, for the help text.
fn limit_meaning(name: &str) -> String {
    if name == IOPS_SIZE_NAME {
        return "requests larger than this many bytes count as size/iops_size operations"
            .to_string();
    }
    if let Some(base) = name.strip_suffix("_per_gb") {
        return format!("{base} per GiB of the disk's size (see docs/limits.md)");
    }
    if let Some(base) = name.strip_suffix("_per_gb_min") {
        return format!("floor of the {base} derived from {base}_per_gb");
    }
    if let Some(base) = name.strip_suffix("_per_gb_cap") {
        return format!("ceiling of the {base} derived from {base}_per_gb");
    }
    if let Some(base) = name.strip_suffix("_max_length") {
        return format!("how long a burst at {base}_max may last (default 1s)");
    }
    if let Some(base) = name.strip_suffix("_max") {
        return format!("burst rate for {base}");
    }
    match BucketKind::from_name(name) {
        Some(BucketKind::BpsTotal) => "limit total (read + write) bytes per second",
        Some(BucketKind::BpsRead) => "limit read bytes per second",
        Some(BucketKind::BpsWrite) => "limit write bytes per second",
        Some(BucketKind::IopsTotal) => "limit total operations per second",
        Some(BucketKind::IopsRead) => "limit read operations per second",
        Some(BucketKind::IopsWrite) => "limit write operations per second",
        None => "",
    }
    .to_string()
}

/// Value placeholder of a limit name, for the help text.
fn limit_value_name(name: &str) -> &'static str {
    match lookup_limit(name) {
        _ if name == IOPS_SIZE_NAME => "SIZE",
        Some((_, LimitField::MaxLength)) => "DURATION",
        Some((kind, _)) if kind.counts_bytes() => "SIZE",
        _ => "N",
    }
}

/// FUSE flag options accepted in `-o`, without a value.
const FUSE_FLAGS: [(&str, fuser::MountOption); 14] = [
    (
        "default_permissions",
        fuser::MountOption::DefaultPermissions,
    ),
    ("ro", fuser::MountOption::RO),
    ("rw", fuser::MountOption::RW),
    ("dev", fuser::MountOption::Dev),
    ("nodev", fuser::MountOption::NoDev),
    ("suid", fuser::MountOption::Suid),
    ("nosuid", fuser::MountOption::NoSuid),
    ("exec", fuser::MountOption::Exec),
    ("noexec", fuser::MountOption::NoExec),
    ("atime", fuser::MountOption::Atime),
    ("noatime", fuser::MountOption::NoAtime),
    ("sync", fuser::MountOption::Sync),
    ("async", fuser::MountOption::Async),
    ("dirsync", fuser::MountOption::DirSync),
];

/// The commands for a running mount, each with its `about` (a unit test in
/// src/ctl/completions.rs holds the two together).
const COMMANDS_HELP: &str = "\
Commands for a running mount (throttlefs COMMAND --help for more):
  stat         One snapshot of a mount's or a file's rates, limits and group
  top          Live view of a mount's open or active files and groups
  set          Set limits or the throttle group of a file or directory
  get          Show the limits and group of a file, a directory or a group
  unset        Remove limits or the group membership of a file or directory
  completions  Print the shell completion script for SHELL on standard output

";

fn after_help() -> String {
    let mut text = String::from(COMMANDS_HELP);
    text.push_str(
        "Limits, also settable as -o NAME=VALUE (0 = unlimited; each name at most once):\n",
    );
    for name in limit_names() {
        let left = format!("{name}={}", limit_value_name(&name));
        text.push_str(&format!("  {left:<28} {}\n", limit_meaning(&name)));
    }
    text.push_str(
        "\nSIZE is in bytes and takes binary suffixes K, M, G, T, P, E (powers of 1024,\n\
         case-insensitive; KiB and KB both mean 1024). Fractions like 1.5M are allowed\n\
         (with a suffix only) and rounded down to whole bytes. DURATION is like 30s,\n\
         500ms, 1m, or a plain number of seconds. Burst rules follow QEMU: a total limit (bps, iops) cannot be\n\
         combined with its read/write split, *_max needs its average and must not be\n\
         lower, *_max_length needs *_max.\n\
         \nlibvirt <iotune> names (total_bytes_sec, read_iops_sec_max, size_iops_sec, ...)\n\
         and QEMU's (bps-total, iops-read-max-length, throttling.iops-size, ...) are\n\
         accepted too, in -o, attributes and throttlefs set/unset (see throttlefs(1)).\n\
         \nPer-file limits, live: setfattr -n user.throttle.NAME -v VALUE FILE-OR-DIR.\n\
         Throttle groups: --group NAME:bps=20M,... and user.throttle.group=NAME on a\n\
         file or directory (see throttlefs(1)).\n\
         \nOther -o options (FUSE mount options):\n  allow_other",
    );
    for (i, (name, _)) in FUSE_FLAGS.iter().enumerate() {
        // Break the list so it stays within 80 columns.
        text.push_str(if i == 7 { ",\n  " } else { ", " });
        text.push_str(name);
    }
    text.push_str(
        ",\n  fsname=NAME, subtype=NAME, io_threads=N (same as --io-threads),\n  \
         io_uring=auto|on|off (same as --io-uring),\n  \
         sandbox=landlock|none (same as --sandbox),\n  \
         seccomp=kill|log|none (same as --seccomp),\n  \
         image_format=raw|qcow2|auto (same as --image-format),\n  \
         group.NAME.LIMIT=VALUE (same as --group NAME:LIMIT=VALUE, one limit per item),\n  \
         passthrough (same as --passthrough).\n\
         Options for mount(8) and systemd (defaults, auto, noauto, user, users, nofail,\n\
         _netdev, x-*, comment=..., relatime and the other atime variants) are ignored.",
    );
    text
}

/// The mount command's clap definition with its help text (also the base
/// of the shell completions).
pub fn mount_command() -> clap::Command {
    Cli::command().after_help(after_help())
}

/// Render a clap error: help/version in full, anything else as one line.
pub fn clap_error(err: clap::Error) -> (String, i32) {
    let text = err.render().to_string();
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return (text.trim_end().to_string(), HELP_EXIT_CODE);
    }
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut line = lines
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string();
    // "the following required arguments were not provided:" lists them on
    // the next lines; fold them in so the one line names what is missing.
    if line.ends_with(':') {
        for next in lines.take_while(|l| !l.starts_with("Usage:")) {
            line.push(' ');
            line.push_str(next);
        }
    }
    (line, USAGE_EXIT_CODE)
}

/// Strip io::Error's " (os error N)" tail: users want the strerror text only.
fn io_message(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Canonicalize an existing directory; `role` is "source" or "mountpoint".
fn existing_dir(role: &str, path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    let canonical =
        fs::canonicalize(path).map_err(|e| format!("{role} '{shown}': {}", io_message(&e)))?;
    let meta =
        fs::metadata(&canonical).map_err(|e| format!("{role} '{shown}': {}", io_message(&e)))?;
    if !meta.is_dir() {
        return Err(format!("{role} '{shown}' is not a directory"));
    }
    Ok(canonical)
}

/// A mountpoint whose FUSE daemon died (kill -9, crash) answers ENOTCONN.
/// Detach that dead mount so a new one can take its place; say how to do it
/// by hand when we may not.
fn clear_stale_mount(mountpoint: &Path) -> Result<(), String> {
    match fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        _ => return Ok(()),
    }
    let shown = mountpoint.display();
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("mountpoint '{shown}': contains a NUL byte"))?;
    // SAFETY: unmount of a NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
        // Logging is not set up yet while options are parsed.
        eprintln!(
            "throttlefs: mountpoint '{shown}': detached a stale FUSE mount left by a dead daemon"
        );
        return Ok(());
    }
    Err(format!(
        "mountpoint '{shown}' is a stale FUSE mount (its daemon died); run: fusermount3 -u '{shown}'"
    ))
}

/// The type of a live FUSE filesystem mounted on `mountpoint` (a canonical
/// path), from /proc/self/mountinfo. Mounting over it would hide it, and
/// two throttlefs on one directory (fstab and a unit, `mount` run twice)
/// would leave the first serving nobody; mount(8) refuses the like for
/// block devices.
fn live_fuse_mount(mountpoint: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(mountinfo_entry)
        .find_map(|(point, fstype)| {
            (point == mountpoint && (fstype == "fuse" || fstype.starts_with("fuse.")))
                .then(|| fstype.to_string())
        })
}

/// One line of a /proc mountinfo file: the mount point (its octal escapes
/// decoded) and the filesystem type. The tests read mountinfo with this
/// too.
pub fn mountinfo_entry(line: &str) -> Option<(PathBuf, &str)> {
    use std::os::unix::ffi::OsStringExt;
    let fields: Vec<&str> = line.split(' ').collect();
    let point = OsString::from_vec(unescape_mountinfo(fields.get(4)?));
    let dash = fields.iter().position(|f| *f == "-")?;
    Some((PathBuf::from(point), fields.get(dash + 1)?))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| {
                u8::try_from(d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'))).ok()
            });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn check_paths(source: &Path, mountpoint: &Path) -> Result<(PathBuf, PathBuf), String> {
    let canonical_source = existing_dir("source", source)?;
    clear_stale_mount(mountpoint)?;
    let canonical_mountpoint = existing_dir("mountpoint", mountpoint)?;
    let shown = mountpoint.display();
    if let Some(fstype) = live_fuse_mount(&canonical_mountpoint) {
        return Err(format!(
            "mountpoint '{shown}' is already mounted ({fstype}); unmount it first"
        ));
    }
    // Serving a tree from under our own mount would recurse into ourselves.
    if canonical_mountpoint.starts_with(&canonical_source) {
        return Err(format!(
            "mountpoint '{shown}' lies inside the source '{}'",
            source.display()
        ));
    }
    let mut entries = fs::read_dir(&canonical_mountpoint)
        .map_err(|e| format!("mountpoint '{shown}': {}", io_message(&e)))?;
    match entries.next() {
        None => Ok((canonical_source, canonical_mountpoint)),
        Some(Ok(_)) => Err(format!("mountpoint '{shown}' is not empty")),
        Some(Err(e)) => Err(format!("mountpoint '{shown}': {}", io_message(&e))),
    }
}

/// Options gathered from long flags and `-o`, with repeat detection.
#[derive(Default)]
struct Collected {
    limits: Limits,
    /// Options given so far: canonical name to the name as given.
    seen: HashMap<String, String>,
    fuse_options: Vec<fuser::MountOption>,
    allow_other: bool,
    passthrough: bool,
    io_threads: Option<usize>,
    io_uring: Option<IoUringMode>,
    sandbox: Option<SandboxMode>,
    seccomp: Option<SeccompMode>,
    image_format: Option<ImageFormat>,
    /// `-o group.NAME.LIMIT=VALUE` items by group, in order.
    groups: Vec<(String, Vec<String>)>,
}

impl Collected {
    /// Record that `name` was given; a second time is an error.
    fn once(&mut self, name: &str) -> Result<(), String> {
        self.once_as(name, name)
    }

    /// As `once`, for an option that `typed` names under its canonical name.
    fn once_as(&mut self, canonical: &str, typed: &str) -> Result<(), String> {
        match self.seen.get(canonical) {
            None => {
                self.seen.insert(canonical.to_string(), typed.to_string());
                Ok(())
            }
            Some(first) => Err(given_twice(canonical, first, typed)),
        }
    }

    fn limit(&mut self, name: &str, value: &str) -> Result<(), String> {
        let canonical =
            canonical_limit_name(name).ok_or_else(|| format!("unknown limit {name}"))?;
        self.once_as(&canonical, name)?;
        apply_limit(&mut self.limits, name, value)
    }

    fn io_threads(&mut self, value: &str) -> Result<(), String> {
        self.once(IO_THREADS_NAME)?;
        let named = |msg: String| format!("{IO_THREADS_NAME}: {msg}");
        let count = parse_count(value).map_err(named)?;
        match usize::try_from(count) {
            Ok(n) if (1..=MAX_IO_THREAD_COUNT).contains(&n) => {
                self.io_threads = Some(n);
                Ok(())
            }
            _ => Err(named(format!(
                "must be between 1 and {MAX_IO_THREAD_COUNT}, got {value}"
            ))),
        }
    }

    fn io_uring(&mut self, value: &str) -> Result<(), String> {
        self.once(IO_URING_NAME)?;
        self.io_uring = Some(IoUringMode::parse(value)?);
        Ok(())
    }

    fn sandbox(&mut self, value: &str) -> Result<(), String> {
        self.once(SANDBOX_NAME)?;
        self.sandbox = Some(SandboxMode::parse(value)?);
        Ok(())
    }

    fn seccomp(&mut self, value: &str) -> Result<(), String> {
        self.once(SECCOMP_NAME)?;
        self.seccomp = Some(SeccompMode::parse(value)?);
        Ok(())
    }

    fn image_format(&mut self, value: &str) -> Result<(), String> {
        self.once(IMAGE_FORMAT)?;
        self.image_format = Some(ImageFormat::parse(value)?);
        Ok(())
    }

    /// `group.NAME.LIMIT=VALUE`: collected per group, validated with
    /// `parse_group` once all are in. Group names may hold dots, limit
    /// names do not, so the limit is after the last dot.
    fn group_limit(&mut self, opt: &str) -> Result<(), String> {
        let rest = &opt[GROUP_OPTION_PREFIX.len()..];
        let (name_limit, value) = rest.split_once('=').unwrap_or((rest, ""));
        let Some((name, limit)) = split_group_limit(name_limit) else {
            return Err(format!("'{opt}': expected group.NAME.LIMIT=VALUE"));
        };
        if !valid_group_name(name) {
            return Err(format!("group '{name}': a name is {GROUP_NAME_RULE}"));
        }
        let item = format!("{limit}={value}");
        match self.groups.iter_mut().find(|(n, _)| n == name) {
            Some((_, items)) => items.push(item),
            None => self.groups.push((name.to_string(), vec![item])),
        }
        Ok(())
    }

    /// A FUSE flag; drops an earlier copy or opposite so the last wins.
    fn fuse_flag(&mut self, opt: &str, option: &fuser::MountOption) {
        let opposite = OPPOSITE_FLAGS
            .iter()
            .find_map(|&(a, b)| (a == opt).then_some(b).or((b == opt).then_some(a)));
        self.fuse_options.retain(|o| {
            let name = FUSE_FLAGS.iter().find(|(_, f)| f == o).map(|(n, _)| *n);
            name != Some(opt) && name != opposite
        });
        self.fuse_options.push(option.clone());
    }

    /// One `-o` item: a limit, io_threads, a group limit, passthrough, a
    /// FUSE mount option, or one of mount(8)'s that is ignored.
    fn mount_option(&mut self, opt: &str) -> Result<(), String> {
        if IGNORED_MOUNT_OPTIONS.contains(&opt)
            || IGNORED_MOUNT_OPTION_PREFIXES
                .iter()
                .any(|p| opt.starts_with(p))
        {
            return Ok(());
        }
        if opt.starts_with(GROUP_OPTION_PREFIX) {
            return self.group_limit(opt);
        }
        if let Some((key, value)) = opt.split_once('=') {
            if canonical_limit_name(key).is_some() {
                return self.limit(key, value);
            }
            if key == IO_THREADS_NAME {
                return self.io_threads(value);
            }
            if key == IO_URING_NAME {
                return self.io_uring(value);
            }
            if key == SANDBOX_NAME {
                return self.sandbox(value);
            }
            if key == SECCOMP_NAME {
                return self.seccomp(value);
            }
            if key == IMAGE_FORMAT {
                return self.image_format(value);
            }
            let make: fn(String) -> fuser::MountOption = match key {
                "fsname" => fuser::MountOption::FSName,
                "subtype" => fuser::MountOption::Subtype,
                _ => return Err(format!("unknown mount option '{opt}'")),
            };
            self.once(key)?;
            if value.is_empty() {
                return Err(format!("{key}: empty value"));
            }
            self.fuse_options.push(make(value.to_string()));
            return Ok(());
        }
        if opt == "allow_other" {
            self.allow_other = true;
            return Ok(());
        }
        if opt == PASSTHROUGH_NAME {
            self.passthrough = true;
            return Ok(());
        }
        if let Some((name, option)) = FUSE_FLAGS.iter().find(|(name, _)| *name == opt) {
            self.fuse_flag(name, option);
            return Ok(());
        }
        if opt == IO_THREADS_NAME
            || opt == IO_URING_NAME
            || opt == SANDBOX_NAME
            || opt == SECCOMP_NAME
            || canonical_limit_name(opt).is_some()
        {
            return Err(format!("{opt}: missing value (use -o {opt}=VALUE)"));
        }
        Err(format!("unknown mount option '{opt}'"))
    }
}

/// Values and paths are quoted into messages as given; escape control
/// characters (a newline in a value) so an error stays one line.
pub fn one_line(msg: &str) -> String {
    msg.chars()
        .flat_map(|c| -> Vec<char> {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Parse argv (including argv[0]). Errors are one line without a trailing
/// newline, naming the offending option, with exit code 2; for --help and
/// --version the error holds the full text (trailing newline trimmed) and
/// exit code 0.
pub fn parse_args<I, T>(args: I) -> Result<MountConfig, (String, i32)>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = mount_command()
        .try_get_matches_from(args)
        .map_err(clap_error)?;
    let cli = Cli::from_arg_matches(&matches).map_err(clap_error)?;
    let usage = |msg: String| (one_line(&msg), USAGE_EXIT_CODE);

    let mut collected = Collected::default();
    for (kind, values) in cli.limits.by_kind() {
        for value in values {
            collected.limit(kind.name(), value).map_err(usage)?;
        }
    }
    for value in &cli.io_threads {
        collected.io_threads(value).map_err(usage)?;
    }
    for value in &cli.io_uring {
        collected.io_uring(value).map_err(usage)?;
    }
    for value in &cli.sandbox {
        collected.sandbox(value).map_err(usage)?;
    }
    for value in &cli.seccomp {
        collected.seccomp(value).map_err(usage)?;
    }
    for value in &cli.image_format {
        collected.image_format(value).map_err(usage)?;
    }
    for group in &cli.options {
        // Empty items ("a,,b") are skipped, as mount(8) does.
        for opt in group.split(',').filter(|o| !o.is_empty()) {
            collected.mount_option(opt).map_err(usage)?;
        }
    }
    collected.limits.validate().map_err(|e| usage(e.0))?;
    let mut groups: Vec<(String, Limits)> = Vec::new();
    let from_options = collected
        .groups
        .iter()
        .map(|(name, items)| format!("{name}:{}", items.join(",")));
    for spec in cli.group.iter().cloned().chain(from_options) {
        let (name, limits) = parse_group(&spec).map_err(usage)?;
        if groups.iter().any(|(n, _)| *n == name) {
            return Err(usage(format!("group {name} given twice")));
        }
        groups.push((name, limits));
    }

    let (source, mountpoint) = check_paths(&cli.source, &cli.mountpoint).map_err(usage)?;
    Ok(MountConfig {
        source,
        mountpoint,
        limits: collected.limits,
        fuse_options: collected.fuse_options,
        allow_other: collected.allow_other,
        verbose: cli.verbose,
        foreground: cli.foreground,
        io_threads: collected.io_threads.unwrap_or(DEFAULT_IO_THREAD_COUNT),
        io_uring: collected.io_uring.unwrap_or(DEFAULT_IO_URING),
        sandbox: collected.sandbox.unwrap_or(SandboxMode::Default),
        seccomp: collected.seccomp.unwrap_or(SeccompMode::Default),
        image_format: collected.image_format.unwrap_or_default(),
        groups,
        passthrough: cli.passthrough || collected.passthrough,
    })
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn group_specs() {
        let (name, limits) = parse_group("tenant-1.a:bps=20M,iops=400").unwrap();
        assert_eq!(name, "tenant-1.a");
        assert_eq!(limits.get(BucketKind::BpsTotal).avg, 20 * 1024 * 1024);
        assert_eq!(limits.get(BucketKind::IopsTotal).avg, 400);
        assert!(
            parse_group("nolimits")
                .unwrap_err()
                .contains("NAME:LIMIT=VALUE")
        );
        assert!(
            parse_group("bad name:bps=1M")
                .unwrap_err()
                .contains("1 to 64")
        );
        assert!(parse_group(&format!("{}:bps=1", "g".repeat(65))).is_err());
        assert!(
            parse_group("g:bps=1M,bps_rd=1M")
                .unwrap_err()
                .contains("bps_rd cannot be used")
        );
        assert!(
            parse_group("g:bps=1M,bps=2M")
                .unwrap_err()
                .contains("bps given twice")
        );
        assert!(
            parse_group("g:speed=1")
                .unwrap_err()
                .contains("unknown limit speed")
        );
        assert!(
            parse_group("g:bps")
                .unwrap_err()
                .contains("not LIMIT=VALUE")
        );
        assert!(valid_group_name("a"));
        assert!(!valid_group_name(""));
        assert!(!valid_group_name("a/b"));
        assert!(!valid_group_name("ä"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain"), b"/plain");
        // A backslash not followed by three octal digits stays.
        assert_eq!(unescape_mountinfo(r"/x\9"), br"/x\9");
        assert_eq!(unescape_mountinfo(r"/x\+12"), br"/x\+12");
        let line = r"36 35 0:40 / /mnt/my\040images rw,nosuid - fuse.throttlefs /srv/images rw";
        assert_eq!(
            mountinfo_entry(line),
            Some((PathBuf::from("/mnt/my images"), "fuse.throttlefs"))
        );
    }

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    const TIB: u64 = 1024 * GIB;

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "throttlefs-options-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A source with one file and an empty mountpoint beside it.
    struct Fixture {
        root: TempDir,
        source: PathBuf,
        mountpoint: PathBuf,
    }

    fn fixture() -> Fixture {
        let root = TempDir::new();
        let source = root.0.join("src");
        let mountpoint = root.0.join("mnt");
        fs::create_dir(&source).unwrap();
        fs::create_dir(&mountpoint).unwrap();
        fs::write(source.join("file"), b"data").unwrap();
        Fixture {
            root,
            source,
            mountpoint,
        }
    }

    fn argv(flags: &[&str], source: &Path, mountpoint: &Path) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["throttlefs".into()];
        v.extend(flags.iter().map(OsString::from));
        v.push(source.into());
        v.push(mountpoint.into());
        v
    }

    fn parse(flags: &[&str]) -> Result<MountConfig, (String, i32)> {
        let f = fixture();
        parse_args(argv(flags, &f.source, &f.mountpoint))
    }

    fn parse_err(flags: &[&str]) -> String {
        let (msg, code) = parse(flags).unwrap_err();
        assert_eq!(code, 2, "{msg}");
        assert!(!msg.contains('\n'), "not one line: {msg:?}");
        msg
    }

    #[test]
    fn size_accepts_plain_and_binary_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("10M"), Ok(10_485_760));
        assert_eq!(parse_size("10MB"), Ok(10 * MIB));
        assert_eq!(parse_size("10mib"), Ok(10 * MIB));
        assert_eq!(parse_size("1K"), Ok(KIB));
        assert_eq!(parse_size("1k"), Ok(KIB));
        assert_eq!(parse_size("1KiB"), Ok(KIB));
        assert_eq!(parse_size("2G"), Ok(2 * GIB));
        assert_eq!(parse_size("1T"), Ok(TIB));
        assert_eq!(parse_size("1.5M"), Ok(MIB + MIB / 2));
        assert_eq!(parse_size("16383P"), Ok(16383 << 50));
        // 0.3 KiB = 307.2 bytes, rounded down.
        assert_eq!(parse_size("0.3K"), Ok(307));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn size_rejects_bad_input() {
        for bad in [
            "", "-1", "abc", "10X", "x1", "1.", ".5M", "+1", " 1", "1 ", "1KK", "1iB",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(format!("invalid size '{bad}'")),
                "{bad:?}"
            );
        }
        // Fractional bytes get a more helpful message.
        assert!(
            parse_size("1.5")
                .unwrap_err()
                .contains("fraction needs a suffix")
        );
        for big in [
            "16385P",
            "16384P",
            "99999999999999999999",
            "16E",
            "999999999999999999999999999999999999999999M",
        ] {
            let err = parse_size(big).unwrap_err();
            assert!(err.contains("too large"), "{big}: {err}");
        }
    }

    #[test]
    fn count_parsing() {
        assert_eq!(parse_count("0"), Ok(0));
        assert_eq!(parse_count("500"), Ok(500));
        assert_eq!(parse_count("18446744073709551615"), Ok(u64::MAX));
        for bad in ["", "-1", "+1", "1K", "1.5", "abc"] {
            assert_eq!(parse_count(bad), Err(format!("invalid count '{bad}'")));
        }
        assert!(
            parse_count("18446744073709551616")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn duration_parsing() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.0000000019"), Ok(Duration::from_nanos(1)));
        for bad in ["", "abc", "-1", "1.", "1.5x", "99999999999999999999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn apply_limit_sets_every_name() {
        let names = limit_names();
        // 6 x (avg, _max, _max_length) + iops_size + 6 x (_per_gb, _min, _cap).
        assert_eq!(names.len(), 19 + 18);
        for name in &names {
            let mut limits = Limits::default();
            let value = if name.ends_with("_max_length") {
                "3s"
            } else {
                "7"
            };
            apply_limit(&mut limits, name, value).unwrap();
            let mut expected = Limits::default();
            if name == "iops_size" {
                expected.iops_size = 7;
            } else {
                let (kind, field) = lookup_limit(name).unwrap();
                let spec = expected.get_mut(kind);
                match field {
                    LimitField::Avg => spec.avg = 7,
                    LimitField::Max => spec.max = 7,
                    LimitField::MaxLength => spec.max_length = Some(Duration::from_secs(3)),
                    LimitField::PerGb => expected.per_gb_mut(kind).rate = 7,
                    LimitField::PerGbMin => expected.per_gb_mut(kind).min = 7,
                    LimitField::PerGbCap => expected.per_gb_mut(kind).cap = 7,
                }
            }
            assert_eq!(limits, expected, "{name}");
        }
        let mut limits = Limits::default();
        apply_limit(&mut limits, "bps_wr", "10M").unwrap();
        apply_limit(&mut limits, "bps_wr_max", "1G").unwrap();
        apply_limit(&mut limits, "iops_size", "4K").unwrap();
        assert_eq!(limits.get(BucketKind::BpsWrite).avg, 10 * MIB);
        assert_eq!(limits.get(BucketKind::BpsWrite).max, GIB);
        assert_eq!(limits.iops_size, 4 * KIB);
    }

    #[test]
    fn apply_limit_errors_name_the_limit() {
        let mut limits = Limits::default();
        assert_eq!(
            apply_limit(&mut limits, "bps_rd", "x1"),
            Err("bps_rd: invalid size 'x1'".into())
        );
        assert_eq!(
            apply_limit(&mut limits, "iops", "1M"),
            Err("iops: invalid count '1M'".into())
        );
        assert!(
            apply_limit(&mut limits, "iops_rd_max_length", "abc")
                .unwrap_err()
                .starts_with("iops_rd_max_length: invalid duration 'abc'")
        );
        assert_eq!(
            apply_limit(&mut limits, "bps_max_max", "1"),
            Err("unknown limit bps_max_max".into())
        );
        assert_eq!(
            apply_limit(&mut limits, "foo", "1"),
            Err("unknown limit foo".into())
        );
        assert_eq!(limits, Limits::default());
    }

    #[test]
    fn libvirt_and_qemu_names_are_aliases() {
        let aliases = limit_aliases();
        // 6 rates x (name, _max, _max_length) x 2 spellings, + 2 for
        // iops_size, + 6 rates x Cinder's (_per_gb, _per_gb_min).
        assert_eq!(aliases.len(), 6 * 3 * 2 + 2 + 6 * 2);
        for (alias, canonical) in &aliases {
            assert!(limit_names().contains(canonical), "{canonical}");
            assert_eq!(canonical_limit_name(alias).as_ref(), Some(canonical));
            if alias.contains('-') {
                let prefixed = format!("throttling.{alias}");
                assert_eq!(canonical_limit_name(&prefixed).as_ref(), Some(canonical));
            }
        }
        for name in limit_names() {
            assert_eq!(canonical_limit_name(&name), Some(name.clone()));
        }
        for unknown in [
            "size_iops_sec_max",
            "iops-size-max",
            "throttling.bps",
            "throttling.total_bytes_sec",
            "total_bytes_sec_maximum",
            "bps-total_max",
            "total-bytes-sec",
            "group_name",
        ] {
            assert_eq!(canonical_limit_name(unknown), None, "{unknown}");
        }
        let cfg = parse(&[
            "-o",
            "read_bytes_sec=10M,read_bytes_sec_max=20M,read_bytes_sec_max_length=30s",
            "-o",
            "throttling.iops-write=100,iops-write-max=200,size_iops_sec=64K",
        ])
        .unwrap();
        let l = cfg.limits;
        assert_eq!(l.get(BucketKind::BpsRead).avg, 10 * MIB);
        assert_eq!(l.get(BucketKind::BpsRead).max, 20 * MIB);
        assert_eq!(
            l.get(BucketKind::BpsRead).max_length,
            Some(Duration::from_secs(30))
        );
        assert_eq!(l.get(BucketKind::IopsWrite).avg, 100);
        assert_eq!(l.get(BucketKind::IopsWrite).max, 200);
        assert_eq!(l.iops_size, 64 * KIB);
        // Messages name the limit as given; rules apply across spellings.
        assert_eq!(
            parse_err(&["-o", "total_bytes_sec=x"]),
            "total_bytes_sec: invalid size 'x'"
        );
        assert_eq!(
            parse_err(&["-o", "total_bytes_sec=1M,read_bytes_sec=1M"]),
            "bps_rd cannot be used together with bps"
        );
        assert_eq!(
            parse_err(&["-o", "total_bytes_sec"]),
            "total_bytes_sec: missing value (use -o total_bytes_sec=VALUE)"
        );
    }

    #[test]
    fn per_gb_limits_and_cinder_names() {
        let cfg = parse(&[
            "-o",
            "iops_per_gb=3,iops_per_gb_min=100,bps_rd_per_gb=1M,bps_rd_per_gb_cap=1G",
        ]);
        let l = cfg.unwrap().limits;
        assert_eq!(
            *l.per_gb(BucketKind::IopsTotal),
            crate::throttle::PerGbSpec {
                rate: 3,
                min: 100,
                cap: 0
            }
        );
        assert_eq!(l.per_gb(BucketKind::BpsRead).cap, GIB);
        for (cinder, ours) in [
            ("total_iops_sec_per_gb", "iops_per_gb"),
            ("read_iops_sec_per_gb_min", "iops_rd_per_gb_min"),
            ("write_bytes_sec_per_gb", "bps_wr_per_gb"),
            ("total_bytes_sec_per_gb_min", "bps_per_gb_min"),
        ] {
            assert_eq!(canonical_limit_name(cinder).as_deref(), Some(ours));
        }
        // No QEMU spelling, no Cinder ceiling, and never `_per_gb_max`,
        // which would read as a burst.
        for unknown in [
            "iops_per_gb_max",
            "total_iops_sec_per_gb_cap",
            "iops-total-per-gb",
            "throttling.total_iops_sec_per_gb",
            "iops_size_per_gb",
        ] {
            assert_eq!(canonical_limit_name(unknown), None, "{unknown}");
        }
        assert_eq!(
            parse_err(&["-o", "iops=100,total_iops_sec_per_gb=3"]),
            "iops_per_gb cannot be used together with iops (one limit, two forms)"
        );
        assert_eq!(
            parse_err(&["-o", "iops_per_gb=x"]),
            "iops_per_gb: invalid count 'x'"
        );
        assert_eq!(
            parse_err(&["-o", "bps_per_gb=1M,bps_per_gb_min=2M,bps_per_gb_cap=1M"]),
            "bps_per_gb_min must not be higher than bps_per_gb_cap"
        );
        assert_eq!(
            parse_group("g:iops=9,total_iops_sec_per_gb=3").unwrap_err(),
            "group g: total_iops_sec_per_gb: a group has no size; per-GiB limits are set on files and directories"
        );
        assert!(is_per_gb_name("iops_wr_per_gb_cap") && !is_per_gb_name("iops_wr_max"));
    }

    #[test]
    fn a_limit_under_two_names_is_given_twice() {
        assert_eq!(
            parse_err(&["--bps", "1M", "-o", "total_bytes_sec=2M"]),
            "bps given twice (as bps and total_bytes_sec)"
        );
        assert_eq!(
            parse_err(&["-o", "bps-total=1M,throttling.bps-total=2M"]),
            "bps given twice (as bps-total and throttling.bps-total)"
        );
        assert_eq!(
            parse_err(&["-o", "total_iops_sec=1", "-o", "total_iops_sec=2"]),
            "total_iops_sec given twice"
        );
        assert_eq!(
            parse_err(&["-o", "group.g.iops=1,group.g.total_iops_sec=2"]),
            "group g: iops given twice (as iops and total_iops_sec)"
        );
        assert_eq!(
            parse_err(&["--group", "g:bps-read=1M,read_bytes_sec=2M"]),
            "group g: bps_rd given twice (as bps-read and read_bytes_sec)"
        );
    }

    #[test]
    fn group_limits_take_aliases() {
        let cfg = parse(&[
            "-o",
            "group.t.a.total_bytes_sec=20M,group.t.a.throttling.iops-total=400",
            "--group",
            "b:read_iops_sec=100",
        ])
        .unwrap();
        let names: Vec<_> = cfg.groups.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "t.a"]);
        assert_eq!(cfg.groups[0].1.get(BucketKind::IopsRead).avg, 100);
        let a = &cfg.groups[1].1;
        assert_eq!(a.get(BucketKind::BpsTotal).avg, 20 * MIB);
        assert_eq!(a.get(BucketKind::IopsTotal).avg, 400);
        // A group named like the prefix still works with our names.
        assert_eq!(
            split_group_limit("x.throttling.bps"),
            Some(("x.throttling", "bps"))
        );
        assert_eq!(
            split_group_limit("x.throttling.bps-total"),
            Some(("x", "throttling.bps-total"))
        );
    }

    #[test]
    fn valid_command_line() {
        let f = fixture();
        let config = parse_args(argv(
            &[
                "--bps-wr",
                "1M",
                "-o",
                "iops=500",
                "-v",
                "-v",
                "--io-threads",
                "4",
            ],
            &f.source,
            &f.mountpoint,
        ))
        .unwrap();
        assert_eq!(config.source, fs::canonicalize(&f.source).unwrap());
        assert_eq!(config.mountpoint, fs::canonicalize(&f.mountpoint).unwrap());
        assert_eq!(config.limits.get(BucketKind::BpsWrite).avg, MIB);
        assert_eq!(config.limits.get(BucketKind::IopsTotal).avg, 500);
        assert_eq!(config.verbose, 2);
        assert_eq!(config.io_threads, 4);
        assert!(!config.allow_other);
        assert!(config.fuse_options.is_empty());
    }

    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.io_threads, DEFAULT_IO_THREAD_COUNT);
        assert_eq!(config.verbose, 0);
        assert!(!config.passthrough, "passthrough is off by default");
    }

    #[test]
    fn passthrough_from_the_flag_or_o() {
        assert!(parse(&["--passthrough"]).unwrap().passthrough);
        let config = parse(&["-o", "allow_other,passthrough"]).unwrap();
        assert!(config.passthrough);
        assert!(config.allow_other);
        assert!(config.fuse_options.is_empty(), "not a FUSE mount option");
        // Both at once, or twice, is the same switch.
        assert!(
            parse(&["--passthrough", "-o", "passthrough"])
                .unwrap()
                .passthrough
        );
        assert_eq!(
            parse_err(&["-o", "passthrough=1"]),
            "unknown mount option 'passthrough=1'"
        );
    }

    #[test]
    fn every_long_flag_and_burst_options() {
        let config = parse(&[
            "--bps-rd",
            "1M",
            "--bps-wr",
            "2M",
            "--iops-rd",
            "10",
            "--iops-wr",
            "20",
            "-o",
            "bps_rd_max=4M,bps_rd_max_length=30s,iops_size=64K",
        ])
        .unwrap();
        let l = config.limits;
        assert_eq!(l.get(BucketKind::BpsRead).avg, MIB);
        assert_eq!(l.get(BucketKind::BpsWrite).avg, 2 * MIB);
        assert_eq!(l.get(BucketKind::IopsRead).avg, 10);
        assert_eq!(l.get(BucketKind::IopsWrite).avg, 20);
        assert_eq!(l.get(BucketKind::BpsRead).max, 4 * MIB);
        assert_eq!(
            l.get(BucketKind::BpsRead).max_length,
            Some(Duration::from_secs(30))
        );
        assert_eq!(l.iops_size, 64 * KIB);
        let l = parse(&["--bps", "5M", "--iops", "100"]).unwrap().limits;
        assert_eq!(l.get(BucketKind::BpsTotal).avg, 5 * MIB);
        assert_eq!(l.get(BucketKind::IopsTotal).avg, 100);
    }

    #[test]
    fn long_flag_values_name_the_limit() {
        assert_eq!(
            parse_err(&["--bps-rd", "abc"]),
            "bps_rd: invalid size 'abc'"
        );
        assert_eq!(parse_err(&["--bps", "-1"]), "bps: invalid size '-1'");
        assert_eq!(
            parse_err(&["--iops-wr", "1.5"]),
            "iops_wr: invalid count '1.5'"
        );
        assert_eq!(parse_err(&["-o", "bps_wr=x1"]), "bps_wr: invalid size 'x1'");
    }

    #[test]
    fn duplicates_are_rejected() {
        assert_eq!(
            parse_err(&["--bps", "1M", "-o", "bps=2M"]),
            "bps given twice"
        );
        assert_eq!(parse_err(&["-o", "bps=1M,bps=2M"]), "bps given twice");
        assert_eq!(
            parse_err(&["-o", "iops=1", "-o", "iops=2"]),
            "iops given twice"
        );
        assert_eq!(
            parse_err(&["--bps", "1M", "--bps", "2M"]).lines().count(),
            1
        );
        assert_eq!(
            parse_err(&["--io-threads", "2", "-o", "io_threads=3"]),
            "io_threads given twice"
        );
    }

    #[test]
    fn validation_messages() {
        assert_eq!(
            parse_err(&["--bps", "1M", "--bps-rd", "1M"]),
            "bps_rd cannot be used together with bps"
        );
        assert_eq!(parse_err(&["-o", "bps_max=2M"]), "bps_max requires bps");
        assert_eq!(
            parse_err(&["--iops", "100", "-o", "iops_max=50"]),
            "iops_max must not be lower than iops"
        );
        assert_eq!(
            parse_err(&["--bps-wr", "1M", "-o", "bps_wr_max_length=5s"]),
            "bps_wr_max_length requires bps_wr_max"
        );
    }

    #[test]
    fn mount_options() {
        let config = parse(&[
            "-o",
            "allow_other,ro",
            "-o",
            "fsname=data,subtype=throttle,noatime",
        ])
        .unwrap();
        assert!(config.allow_other);
        assert_eq!(
            config.fuse_options,
            vec![
                fuser::MountOption::RO,
                fuser::MountOption::FSName("data".into()),
                fuser::MountOption::Subtype("throttle".into()),
                fuser::MountOption::NoAtime,
            ]
        );
        for (name, option) in &FUSE_FLAGS {
            assert_eq!(
                parse(&["-o", name]).unwrap().fuse_options,
                vec![option.clone()]
            );
        }
        assert_eq!(parse(&["-o", "io_threads=1024"]).unwrap().io_threads, 1024);
        assert_eq!(
            parse_err(&["-o", "nonempty"]),
            "unknown mount option 'nonempty'"
        );
        assert_eq!(parse_err(&["-o", "ro=1"]), "unknown mount option 'ro=1'");
        assert_eq!(
            parse_err(&["-o", "bps"]),
            "bps: missing value (use -o bps=VALUE)"
        );
        assert_eq!(parse_err(&["-o", "fsname="]), "fsname: empty value");
        assert_eq!(
            parse_err(&["-o", "bps_foo=1"]),
            "unknown mount option 'bps_foo=1'"
        );
    }

    #[test]
    fn io_threads_range() {
        assert!(
            parse_err(&["--io-threads", "0"]).starts_with("io_threads: must be between 1 and 1024")
        );
        assert!(
            parse_err(&["--io-threads", "1025"])
                .starts_with("io_threads: must be between 1 and 1024")
        );
        assert_eq!(
            parse_err(&["--io-threads", "x"]),
            "io_threads: invalid count 'x'"
        );
        assert_eq!(parse(&["--io-threads", "1"]).unwrap().io_threads, 1);
    }

    #[test]
    fn sandbox_modes() {
        assert_eq!(parse(&[]).unwrap().sandbox, SandboxMode::Default);
        assert_eq!(
            parse(&["-o", "sandbox=none"]).unwrap().sandbox,
            SandboxMode::None
        );
        assert_eq!(
            parse(&["--sandbox", "landlock"]).unwrap().sandbox,
            SandboxMode::Landlock
        );
        assert_eq!(
            parse_err(&["--sandbox=chroot"]),
            "sandbox: expected landlock or none, got 'chroot'"
        );
        assert_eq!(
            parse_err(&["-o", "sandbox"]),
            "sandbox: missing value (use -o sandbox=VALUE)"
        );
        assert_eq!(
            parse_err(&["--sandbox", "none", "-o", "sandbox=landlock"]),
            "sandbox given twice"
        );
    }

    #[test]
    fn seccomp_modes() {
        assert_eq!(parse(&[]).unwrap().seccomp, SeccompMode::Default);
        assert_eq!(
            parse(&["-o", "seccomp=log"]).unwrap().seccomp,
            SeccompMode::Log
        );
        assert_eq!(
            parse(&["--seccomp", "kill"]).unwrap().seccomp,
            SeccompMode::Kill
        );
        assert_eq!(
            parse(&["--seccomp=none"]).unwrap().seccomp,
            SeccompMode::None
        );
        assert_eq!(
            parse_err(&["--seccomp=trap"]),
            "seccomp: expected kill, log or none, got 'trap'"
        );
        assert_eq!(
            parse_err(&["-o", "seccomp"]),
            "seccomp: missing value (use -o seccomp=VALUE)"
        );
        assert_eq!(
            parse_err(&["--seccomp", "none", "-o", "seccomp=kill"]),
            "seccomp given twice"
        );
    }

    #[test]
    fn image_format_option() {
        assert_eq!(parse(&[]).unwrap().image_format, ImageFormat::Auto);
        assert_eq!(
            parse(&["-o", "image_format=raw"]).unwrap().image_format,
            ImageFormat::Raw
        );
        assert_eq!(
            parse(&["--image-format", "qcow2"]).unwrap().image_format,
            ImageFormat::Qcow2
        );
        assert_eq!(
            parse_err(&["--image-format=vmdk"]),
            "image_format: expected raw, qcow2 or auto, got 'vmdk'"
        );
        assert_eq!(
            parse_err(&["--image-format", "raw", "-o", "image_format=auto"]),
            "image_format given twice"
        );
    }

    #[test]
    fn io_uring_modes() {
        assert_eq!(parse(&[]).unwrap().io_uring, DEFAULT_IO_URING);
        assert_eq!(
            parse(&["-o", "io_uring=on"]).unwrap().io_uring,
            IoUringMode::On
        );
        assert_eq!(
            parse(&["--io-uring", "off"]).unwrap().io_uring,
            IoUringMode::Off
        );
        assert_eq!(
            parse(&["--io-uring=auto"]).unwrap().io_uring,
            IoUringMode::Auto
        );
        assert_eq!(
            parse_err(&["-o", "io_uring=yes"]),
            "io_uring: expected auto, on or off, got 'yes'"
        );
        assert_eq!(
            parse_err(&["-o", "io_uring"]),
            "io_uring: missing value (use -o io_uring=VALUE)"
        );
        assert_eq!(
            parse_err(&["--io-uring", "on", "-o", "io_uring=off"]),
            "io_uring given twice"
        );
    }

    #[test]
    fn path_rejections() {
        let f = fixture();
        let missing = f.root.0.join("missing");
        let file = f.source.join("file");
        let err = |src: &Path, mnt: &Path| {
            let (msg, code) = parse_args(argv(&[], src, mnt)).unwrap_err();
            assert_eq!(code, 2);
            msg
        };
        assert_eq!(
            err(&missing, &f.mountpoint),
            format!("source '{}': No such file or directory", missing.display())
        );
        assert_eq!(
            err(&file, &f.mountpoint),
            format!("source '{}' is not a directory", file.display())
        );
        assert_eq!(
            err(&f.source, &missing),
            format!(
                "mountpoint '{}': No such file or directory",
                missing.display()
            )
        );
        assert_eq!(
            err(&f.source, &file),
            format!("mountpoint '{}' is not a directory", file.display())
        );
        assert_eq!(
            err(&f.source, &f.root.0),
            format!("mountpoint '{}' is not empty", f.root.0.display())
        );
        let inside = f.source.join("sub");
        fs::create_dir(&inside).unwrap();
        assert_eq!(
            err(&f.source, &inside),
            format!(
                "mountpoint '{}' lies inside the source '{}'",
                inside.display(),
                f.source.display()
            )
        );
        // Equal paths, also spelled differently, count as inside.
        let dotted = f.root.0.join("src/sub/..");
        assert_eq!(
            err(&f.source, &dotted),
            format!(
                "mountpoint '{}' lies inside the source '{}'",
                dotted.display(),
                f.source.display()
            )
        );
    }

    #[test]
    fn clap_errors_are_one_line() {
        let f = fixture();
        let (msg, code) = parse_args(argv(&["--foo"], &f.source, &f.mountpoint)).unwrap_err();
        assert_eq!(
            (msg.as_str(), code),
            ("error: unexpected argument '--foo' found", 2)
        );
        let (msg, code) = parse_args(["throttlefs"]).unwrap_err();
        assert_eq!(code, 2);
        assert!(!msg.contains('\n'), "{msg:?}");
        assert!(
            msg.contains("<SOURCE>") && msg.contains("<MOUNTPOINT>"),
            "{msg}"
        );
        let (msg, code) = parse_args(["throttlefs", "a", "b", "c"]).unwrap_err();
        assert_eq!(code, 2);
        assert!(!msg.contains('\n') && msg.contains("'c'"), "{msg:?}");
    }

    #[test]
    fn help_and_version() {
        let (help, code) = parse_args(["throttlefs", "--help"]).unwrap_err();
        assert_eq!(code, 0);
        assert!(help.contains("limit read bytes per second"), "{help}");
        assert!(help.contains("0 = unlimited"));
        assert!(help.contains("binary suffixes"));
        assert!(help.contains("burst rate for bps"));
        assert!(help.contains("how long a burst at bps_max may last (default 1s)"));
        assert!(
            help.contains(
                "requests larger than this many bytes count as size/iops_size operations"
            )
        );
        for name in limit_names() {
            assert!(
                help.contains(&format!("{name}=")),
                "{name} missing from help"
            );
        }
        let (version, code) = parse_args(["throttlefs", "--version"]).unwrap_err();
        assert_eq!(code, 0);
        assert!(version.contains(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn mount8_and_fstab_options_are_accepted() {
        let cfg = parse(&[
            "-o",
            "defaults,rw,nofail,_netdev,x-systemd.automount,x-systemd.idle-timeout=30,noauto,auto",
            "-o",
            "user,users,nouser,owner,group,comment=vm disks,relatime,lazytime,nodiratime,bps_rd=1M",
        ])
        .unwrap();
        assert_eq!(cfg.limits.get(BucketKind::BpsRead).avg, MIB);
        assert_eq!(cfg.fuse_options, vec![fuser::MountOption::RW]);
        assert!(!cfg.foreground);
        assert!(parse(&["-f"]).unwrap().foreground);
        assert!(parse(&["--foreground"]).unwrap().foreground);
    }

    #[test]
    fn of_opposite_flags_the_last_wins() {
        let cfg = parse(&["-o", "rw,nodev,ro,dev,suid,nosuid,ro"]).unwrap();
        assert_eq!(
            cfg.fuse_options,
            vec![
                fuser::MountOption::Dev,
                fuser::MountOption::NoSuid,
                fuser::MountOption::RO
            ]
        );
    }

    #[test]
    fn groups_in_o_are_one_limit_per_item() {
        let cfg = parse(&[
            "-o",
            "group.tenant.a.bps=20M,group.b.iops_rd=100,group.tenant.a.iops=400",
        ])
        .unwrap();
        let names: Vec<_> = cfg.groups.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["tenant.a", "b"]);
        let a = &cfg.groups[0].1;
        assert_eq!(a.get(BucketKind::BpsTotal).avg, 20 * MIB);
        assert_eq!(a.get(BucketKind::IopsTotal).avg, 400);
        assert_eq!(cfg.groups[1].1.get(BucketKind::IopsRead).avg, 100);
        assert_eq!(
            parse_err(&["-o", "group.g.bps=1M,group.g.bps_rd=1M"]),
            "group g: bps_rd cannot be used together with bps"
        );
        assert_eq!(
            parse_err(&["-o", "group.g.bps=1M", "--group", "g:iops=1"]),
            "group g given twice"
        );
        assert_eq!(
            parse_err(&["-o", "group.g.bps=1M,group.g.bps=2M"]),
            "group g: bps given twice"
        );
        assert!(parse_err(&["-o", "group.nolimit"]).contains("expected group.NAME.LIMIT=VALUE"));
        assert!(parse_err(&["-o", "group.a/b.bps=1"]).contains("a name is"));
        assert!(parse_err(&["-o", "group.g.speed=1"]).contains("unknown limit speed"));
    }
}
