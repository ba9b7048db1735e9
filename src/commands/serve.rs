//! `tclseg serve`: hands the config file to the daemon, with the same model lookup as `segment`.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::ServeArgs;

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    tclseg::daemon::run(&args.config, super::segment::resolve_model)?;
    Ok(ExitCode::SUCCESS)
}
