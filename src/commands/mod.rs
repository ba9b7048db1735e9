//! One function per subcommand, each a thin layer over the library. They print results for the user on stdout;
//! progress and problems go to the log (stderr).

mod config;
mod models;
mod segment;
mod serve;
mod train;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Command, ConfigCommand};

/// Exit status of a subcommand that exists in the CLI but whose work has not landed yet.
const NOT_AVAILABLE: u8 = 2;

pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Models(cmd) => models::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Segment(args) => segment::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(_) => not_available("eval", "the 8-dataset evaluation, issue #6"),
        Command::Config(ConfigCommand::Check { file }) => config::check(&file),
    }
}

fn not_available(command: &str, lands_with: &str) -> Result<ExitCode> {
    tracing::error!(
        "`tclseg {command}` is not available in this build yet ({lands_with}); nothing was done"
    );
    Ok(ExitCode::from(NOT_AVAILABLE))
}
