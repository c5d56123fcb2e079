//! `throttlefs completions SHELL`: the shell completion script, generated
//! from the clap definitions of the mount and of every command, so that it
//! cannot drift from them (contrib/completions/ holds the generated files,
//! checked by tests/docs.rs).

use std::ffi::OsString;
use std::io::Write;

use clap::{Command, Parser};
use clap_complete::Shell;

use super::failure::{Failure, parse};
use super::{set, stat, top};
use crate::options::mount_command;

/// The program name the scripts complete.
const BIN_NAME: &str = "throttlefs";

#[derive(Parser, Debug)]
#[command(
    about = "Print the shell completion script for SHELL on standard output",
    after_help = "bash: save as /usr/share/bash-completion/completions/throttlefs\n\
                  zsh:  save as _throttlefs in a directory of $fpath\n\
                  fish: save as ~/.config/fish/completions/throttlefs.fish"
)]
struct CompletionsCli {
    /// the shell
    #[arg(value_enum)]
    shell: Shell,
}

/// The mount command with every command as a subcommand: the whole
/// command line as the completion generators see it.
pub fn full_command() -> Command {
    let [set, get, unset] = set::commands();
    let commands = [
        ("stat", stat::command()),
        ("top", top::command()),
        ("set", set),
        ("get", get),
        ("unset", unset),
        (
            "completions",
            <CompletionsCli as clap::CommandFactory>::command(),
        ),
    ];
    let mut cmd = mount_command()
        .bin_name(BIN_NAME)
        .subcommand_negates_reqs(true)
        // `throttlefs help` would mount a directory named help.
        .disable_help_subcommand(true)
        .args_conflicts_with_subcommands(true);
    for (name, command) in commands {
        cmd = cmd.subcommand(command.name(name));
    }
    cmd
}

pub fn main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: CompletionsCli = parse(args)?;
    let mut script = Vec::new();
    clap_complete::generate(cli.shell, &mut full_command(), BIN_NAME, &mut script);
    std::io::stdout()
        .write_all(&script)
        .map_err(|e| Failure::failed(format!("writing the script: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mount's `--help` lists every command with its own `about`, and
    /// nothing else in that list.
    #[test]
    fn mount_help_lists_each_command_with_its_about() {
        let mount = mount_command();
        let help = mount.get_after_help().expect("after_help").to_string();
        let listed: Vec<&str> = help
            .lines()
            .skip_while(|l| !l.starts_with("Commands for a running mount"))
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect();
        let full = full_command();
        let expected: Vec<String> = full
            .get_subcommands()
            .map(|c| format!("  {:<12} {}", c.get_name(), c.get_about().expect("about")))
            .collect();
        assert_eq!(listed, expected);
    }
}
