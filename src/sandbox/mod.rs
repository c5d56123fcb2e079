//! The sandbox the daemon enters once mounted: Landlock confines it to the
//! source directory, it keeps only the capabilities the passthrough needs,
//! and it can gain no new privileges (see docs/reliability.md).

pub mod seccomp;

#[cfg(feature = "sandbox-probe")]
pub mod probe;
