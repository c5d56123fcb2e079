//! How a command ends when it cannot do its work: [`Failure`], a one-line
//! message and an exit status; and [`parse`], which turns clap's errors
//! (and `--help`) into one.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches};

use crate::options::clap_error;

/// Exit status for bad usage or a refused value, as for the mount.
pub const USAGE_EXIT_CODE: u8 = 2;
/// Exit status when the command could not do its work.
pub const FAILURE_EXIT_CODE: u8 = 1;

/// Why a command stopped: a one-line message and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub msg: String,
    pub code: u8,
}

impl Failure {
    pub fn usage(msg: impl Into<String>) -> Failure {
        Failure {
            msg: crate::options::one_line(&msg.into()),
            code: USAGE_EXIT_CODE,
        }
    }

    pub fn failed(msg: impl Into<String>) -> Failure {
        Failure {
            msg: crate::options::one_line(&msg.into()),
            code: FAILURE_EXIT_CODE,
        }
    }
}

/// Parses a command's arguments with clap; errors are one line (exit 2),
/// `--help` comes back as a `Failure` with code 0 and the full text.
pub(crate) fn parse<P: CommandFactory + FromArgMatches>(args: Vec<OsString>) -> Result<P, Failure> {
    let bin_name = args[0].to_string_lossy().into_owned();
    let to_failure = |e: clap::Error| {
        let (msg, code) = clap_error(e);
        Failure {
            msg,
            code: u8::try_from(code).unwrap_or(USAGE_EXIT_CODE),
        }
    };
    let matches = P::command()
        .bin_name(bin_name)
        .try_get_matches_from(args)
        .map_err(to_failure)?;
    P::from_arg_matches(&matches).map_err(to_failure)
}
