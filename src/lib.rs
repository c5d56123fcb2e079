//! throttlefs: a FUSE passthrough filesystem that throttles each file's I/O
//! with QEMU's disk-limit semantics.

pub mod ctl;
pub mod fs;
pub mod io;
pub mod options;
pub mod qos;
pub mod sandbox;
pub mod scheduler;
pub mod sizing;
pub mod stats;
pub mod throttle;
pub mod xattr;
