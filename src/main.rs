//! throttlefs: mount a directory of disk images with per-file I/O limits.
//!
//! One binary, two programs: the tools that talk to a mount (`throttlefs
//! stat|top|set|get|unset|completions ...`, src/ctl) and the mount itself
//! (src/mount.rs). This file only chooses between them.

use std::process::ExitCode;

mod daemon;
mod mount;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The tools first: they never detach nor mount, and a command name is
    // not a source directory.
    if args.get(1).is_some_and(|a| throttlefs::ctl::is_command(a)) {
        return throttlefs::ctl::main(args);
    }
    mount::main(args)
}
