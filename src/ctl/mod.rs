//! The commands that watch and tune a running mount: `throttlefs stat`,
//! `top`, `set`, `get`, `unset` and `completions`, a second program in the
//! same binary.
//!
//! Everything they read or change goes through the mount's `user.throttle.*`
//! extended attributes (docs/attributes.md), so the kernel's
//! permission checks on those apply to them as to `getfattr`/`setfattr`:
//! there is no second control channel.
//!
//! Which file holds what, the imports pointing one way (command -> output
//! formats -> model -> attribute calls): this file only picks the command;
//! `failure.rs` holds how a command stops (`Failure`, exit status, clap
//! parsing) and `attr.rs` the attribute system calls. `snapshot.rs` is the
//! model: what one reading of a mount or file gathers (`Report`,
//! `MountSnapshot`, `FileRow`, `GroupRow`), parsed from the attributes.
//! The output formats each render that model and know nothing of each
//! other: `table.rs` the plain table (`stat`'s and `top`'s), `json.rs`
//! `stat --json`, `prometheus.rs` `stat --prometheus`. The commands:
//! `stat.rs` (one snapshot in one of those formats), `top.rs` (the live
//! table), `set.rs` (`set`, `get`, `unset`) and `completions.rs` (the shell
//! scripts, from the clap definitions of the mount and every command).

pub mod attr;
pub mod completions;
pub mod failure;
pub mod json;
pub mod prometheus;
pub mod set;
pub mod snapshot;
pub mod stat;
pub mod table;
pub mod top;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

/// The first arguments that select a command instead of a mount. A source
/// directory literally named like one is reached as `./stat`.
pub const COMMANDS: [&str; 6] = ["stat", "top", "set", "get", "unset", "completions"];

/// Whether `arg` (argv[1]) names one of the commands.
pub fn is_command(arg: &OsStr) -> bool {
    COMMANDS.iter().any(|c| c.as_bytes() == arg.as_bytes())
}

/// Runs the command named by `args[1]`; `args[0]` is the program.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let command = args[1].to_string_lossy().into_owned();
    // clap sees "throttlefs stat ...", so usage lines name the command.
    let mut argv = args;
    let program = argv.remove(0);
    argv[0] = format!("{} {command}", program.to_string_lossy()).into();
    let result = match command.as_str() {
        "stat" => stat::main(argv),
        "top" => top::main(argv),
        "set" => set::set_main(argv),
        "get" => set::get_main(argv),
        "completions" => completions::main(argv),
        _ => set::unset_main(argv),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.code == 0 => {
            println!("{}", f.msg);
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("throttlefs: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}
