//! The sandbox the daemon enters once mounted (`--sandbox`, on by
//! default), so that a bug in the passthrough cannot reach the rest of the
//! host:
//!
//! - **Landlock** confines it to the source directory: it may read and
//!   change only what lies beneath it, read /proc (callers' status, its own
//!   descriptors' links), and use /dev/fuse (fuser opens one per session
//!   thread) and /dev/null. It may not execute anything, make device
//!   nodes, or bind or connect TCP sockets, and (Landlock ABI 6) not signal
//!   processes outside it nor connect to abstract UNIX sockets made outside
//!   it (unless systemd's NOTIFY_SOCKET is one).
//! - **Capabilities**: only those the passthrough needs are kept
//!   (`KEPT_CAPS`; CAP_SYS_ADMIN too with `--passthrough`, whose backing
//!   files the kernel registers only for it; CAP_SYS_NICE only until the
//!   scheduler thread has lowered its nice value). The bounding, ambient
//!   and inheritable sets are cleared of the rest.
//! - **No new privileges** (PR_SET_NO_NEW_PRIVS).
//!
//! Landlock (below ABI 8) and capabilities belong to a thread and are
//! inherited by the threads it starts, so `enter` runs while the daemon
//! has one thread, after everything that needs the old privileges (the
//! mount, /dev/fuse, the source, RLIMIT_NOFILE, syslog, the I/O rings) and
//! before any thread starts. Unmounting needs them too: `unmounter` forks
//! a small unsandboxed helper first (`keeper`) that unmounts when asked.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use caps::{CapSet, Capability};
use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus,
    Scope,
};

use crate::options::{MountConfig, SandboxMode};

mod keeper;
pub use keeper::{Unmounter, is_helper_gone};

pub mod seccomp;

#[cfg(feature = "sandbox-probe")]
pub mod probe;

/// Capabilities the passthrough needs, kept in the sandbox: CHOWN gives
/// new objects to their creator (the daemon creates as root, then chowns)
/// and serves chown; DAC_OVERRIDE reaches every file whatever its mode
/// (the kernel checks the caller's permissions, default_permissions);
/// FOWNER serves chmod, utimes and attributes on files the daemon does not
/// own; FSETID keeps setuid/setgid bits that the daemon clears itself, as
/// the caller's own rights say (src/fs.rs `kill_suidgid`).
const KEPT_CAPS: [Capability; 4] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
];

/// Set once `enter` reduced the capabilities, so that `drop_sys_nice`
/// acts only in the sandbox.
static SANDBOXED: AtomicBool = AtomicBool::new(false);

/// How the daemon will unmount, for the sandbox `cfg.sandbox` asks for:
/// by itself without one, else through the keeper, forked here. Called
/// first thing, while the process has a single thread and has opened
/// nothing of the mount yet, so that the keeper holds nothing of it (no
/// source, no /dev/fuse, no ring mapping). `quiet`: the daemon is
/// detached, the keeper must not hold the caller's output open.
pub fn unmounter(cfg: &MountConfig, quiet: bool) -> Result<Unmounter> {
    if cfg.sandbox == SandboxMode::None {
        return Ok(Unmounter::direct(&cfg.mountpoint)?);
    }
    Unmounter::keeper(&cfg.mountpoint, quiet).context("starting the unmount helper")
}

/// Enters the sandbox `cfg.sandbox` asks for (nothing for `none`). Fails,
/// before any change, when the process has more than one thread, and when
/// `--sandbox=landlock` was asked for explicitly and the kernel cannot
/// enforce it.
pub fn enter(cfg: &MountConfig) -> Result<()> {
    if cfg.sandbox == SandboxMode::None {
        log::info!("sandbox: none; every capability kept, no Landlock");
        return Ok(());
    }
    let threads = thread_count();
    if threads != Some(1) {
        bail!("internal error: {threads:?} threads before the sandbox, which needs exactly one");
    }
    let ruleset = landlock_ruleset(cfg)?;
    let kept = drop_capabilities(cfg.passthrough).context("dropping capabilities")?;
    // SAFETY: prctl with plain values.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("setting no_new_privs");
    }
    let status = ruleset
        .restrict_self()
        .map_err(|e| anyhow::anyhow!("sandbox: applying the Landlock ruleset: {e}"))?;
    report(cfg, &status, &kept);
    // The seccomp filter comes next (src/mount.rs), after Landlock and
    // the capabilities, whose system calls it does not allow.
    SANDBOXED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Drops CAP_SYS_NICE from the calling thread, in the sandbox: the
/// scheduler thread calls it once it has set its nice value, and the main
/// thread once the scheduler has started, so that no thread keeps it.
pub fn drop_sys_nice() {
    if !SANDBOXED.load(Ordering::SeqCst) {
        return;
    }
    for set in [CapSet::Effective, CapSet::Permitted] {
        if let Err(e) = caps::drop(None, set, Capability::CAP_SYS_NICE) {
            log::warn!("sandbox: could not drop CAP_SYS_NICE: {e}");
        }
    }
}

/// Threads of this process, from /proc/self/status.
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Rights beneath the source directory: everything a passthrough tree
/// needs (read, write, truncate, create and remove files, directories,
/// symlinks, FIFOs and sockets, rename and link across directories), but
/// no execution, no device nodes and no ioctl on devices.
fn tree_access() -> landlock::BitFlags<AccessFs> {
    AccessFs::from_all(ABI::V8)
        & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::IoctlDev)
}

/// landlock_create_ruleset's flag that asks for the kernel's ABI version.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;

/// Why the sandbox cannot have Landlock on this kernel, or None when it
/// can (ABI 2 or later, for Refer).
fn landlock_missing() -> Option<String> {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the
    // ABI version or fails.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    match abi {
        2.. => None,
        1 => Some(
            "the kernel has only its first version (Linux 5.13 to 5.18), under which \
             no file could be renamed or linked across directories"
                .into(),
        ),
        _ => Some(match io::Error::last_os_error().raw_os_error() {
            Some(libc::EOPNOTSUPP) => {
                "Landlock is not enabled at boot (see the kernel's lsm=)".into()
            }
            _ => "the kernel has no Landlock (it needs Linux 5.19 or later built with \
                  CONFIG_SECURITY_LANDLOCK)"
                .into(),
        }),
    }
}

/// The ruleset, created but not applied yet.
fn landlock_ruleset(cfg: &MountConfig) -> Result<RulesetCreated> {
    let explicit = cfg.sandbox == SandboxMode::Landlock;
    if let Some(why) = landlock_missing() {
        if explicit {
            bail!(
                "sandbox=landlock: {why}; mount with sandbox=none, or without the option \
                 to run without Landlock"
            );
        }
        log::warn!(
            "sandbox: no Landlock ({why}): the daemon is not confined to '{}'; it runs \
             with reduced capabilities and no new privileges",
            cfg.source.display()
        );
    }
    let fail = |e: &dyn std::fmt::Display| {
        if explicit {
            anyhow::anyhow!(
                "sandbox=landlock: the kernel cannot enforce Landlock ({e}); \
                 mount with sandbox=none, or without the option to run unconfined"
            )
        } else {
            anyhow::anyhow!("sandbox: building the Landlock ruleset: {e}")
        }
    };
    // Without Refer (Landlock ABI 1, Linux 5.13 to 5.18) a domain refuses
    // every rename and link across directories: rather no Landlock than a
    // broken passthrough. Asked for explicitly, the mount fails instead.
    let required = if explicit {
        CompatLevel::HardRequirement
    } else {
        CompatLevel::SoftRequirement
    };
    let mut scopes = Scope::from_all(ABI::V6);
    if std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| s.as_encoded_bytes().starts_with(b"@")) {
        // systemd's socket is an abstract one, made outside the sandbox.
        scopes.remove(Scope::AbstractUnixSocket);
    }
    let ruleset = Ruleset::default()
        .set_compatibility(required)
        .handle_access(AccessFs::from_all(ABI::V2))
        .and_then(|r| {
            r.set_compatibility(CompatLevel::BestEffort)
                .handle_access(AccessFs::from_all(ABI::V8))
        })
        .and_then(|r| r.handle_access(AccessNet::from_all(ABI::V10)))
        .and_then(|r| r.scope(scopes))
        .and_then(|r| r.create())
        .map_err(|e| fail(&e))?;
    let rules = [
        (cfg.source.as_path(), tree_access()),
        // Callers' /proc/PID/status; /proc/self/fd reopens resolve to the
        // source and are checked there.
        (Path::new("/proc"), AccessFs::ReadFile.into()),
        // fuser opens /dev/fuse again for each session thread and clones
        // the connection onto it (an ioctl).
        (
            Path::new("/dev/fuse"),
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        ),
        // A detached daemon points its standard descriptors there once
        // the mount is live.
        (
            Path::new("/dev/null"),
            AccessFs::ReadFile | AccessFs::WriteFile,
        ),
    ];
    let mut ruleset = ruleset;
    for (path, access) in rules {
        let fd =
            PathFd::new(path).with_context(|| format!("sandbox: opening {}", path.display()))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| fail(&e))?;
    }
    Ok(ruleset)
}

/// Reduces the calling (only) thread's capabilities to `KEPT_CAPS` (and
/// CAP_SYS_ADMIN with `passthrough`), plus CAP_SYS_NICE in the effective
/// and permitted sets until `drop_sys_nice`. Returns what is kept for
/// good. A user without capabilities has nothing to drop.
fn drop_capabilities(passthrough: bool) -> Result<HashSet<Capability>> {
    let mut kept: HashSet<Capability> = KEPT_CAPS.into_iter().collect();
    if passthrough {
        // FUSE_DEV_IOC_BACKING_OPEN, at each passthrough open.
        kept.insert(Capability::CAP_SYS_ADMIN);
    }
    // The bounding set only limits what an exec could gain, which no new
    // privileges already forbids; it is cleared all the same. Dropping
    // from it needs CAP_SETPCAP, which a user does not have.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !kept.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let permitted = caps::read(None, CapSet::Permitted)?;
    let mut now = kept.clone();
    now.insert(Capability::CAP_SYS_NICE);
    let now: HashSet<Capability> = now.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Effective, &now)?;
    caps::set(None, CapSet::Permitted, &now)?;
    Ok(kept.intersection(&permitted).copied().collect())
}

/// Says at -v what the sandbox enforces (a kernel without Landlock got
/// its warning from `landlock_ruleset`).
fn report(cfg: &MountConfig, status: &RestrictionStatus, kept: &HashSet<Capability>) {
    let landlock = match (&status.ruleset, status.landlock) {
        // Partly: rights of later ABIs than the kernel's (UDP, for one)
        // are left out, which the ABI says.
        (
            RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced,
            LandlockStatus::Available { effective_abi, .. },
        ) => format!(
            "Landlock (ABI {}) confines the daemon to '{}'",
            effective_abi as i32,
            cfg.source.display()
        ),
        _ => "no Landlock".to_string(),
    };
    let mut names: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
    names.sort();
    log::info!(
        "sandbox: {landlock}; capabilities kept: {}{}; no new privileges",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        },
        if cfg.passthrough && kept.contains(&Capability::CAP_SYS_ADMIN) {
            " (CAP_SYS_ADMIN for --passthrough, which registers backing files)"
        } else {
            ""
        }
    );
}
