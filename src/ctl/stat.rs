//! `throttlefs stat MOUNTPOINT|FILE...`: one snapshot, as a table, JSON or
//! Prometheus text.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use super::failure::{Failure, parse};
use super::{json, prometheus, snapshot, table};

#[derive(Parser, Debug)]
#[command(
    about = "One snapshot of a mount's or a file's rates, limits and group",
    long_about = "One snapshot of what the throttle does: for a mount point, its files that are \
                  open or active and every group it knows; for a file, that file"
)]
struct StatCli {
    /// JSON instead of a table
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Prometheus text exposition format (for node_exporter's textfile collector)
    #[arg(long)]
    prometheus: bool,
    /// mount points (their root directory) and files on a throttlefs mount
    #[arg(required = true, value_name = "MOUNTPOINT|FILE")]
    paths: Vec<PathBuf>,
}

/// The clap definition, for the shell completions.
pub(crate) fn command() -> clap::Command {
    <StatCli as clap::CommandFactory>::command()
}

pub fn main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: StatCli = parse(args)?;
    let report = snapshot::collect(&cli.paths)?;
    let text = if cli.json {
        json::render(&report)
    } else if cli.prometheus {
        prometheus::render(&report)
    } else {
        table::render(&report)
    };
    print!("{text}");
    Ok(())
}
