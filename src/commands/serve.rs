//! `tclseg serve`: hands the config file to the daemon (which finds the model as `segment` does:
//! `model::resolve_bundle_dir`).

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::ServeArgs;

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    tclseg::daemon::run(&args.config)?;
    Ok(ExitCode::SUCCESS)
}
