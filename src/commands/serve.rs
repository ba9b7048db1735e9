//! `tclseg serve`: hands the config file to the daemon (which finds the model as `segment` does:
//! `model::resolve_bundle_dir`), with the shard of the config's pipelines it is to run (`--shard`).

use std::process::ExitCode;

use anyhow::Result;
use tclseg::shard::{self, Shard};

use crate::cli::ServeArgs;

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let shard = daemon_shard(&args)?;
    tclseg::daemon::run(&args.config, shard)?;
    Ok(ExitCode::SUCCESS)
}

/// `--shard I/N` (or `TCLSEG_SHARD`), or `auto`: the ordinal at the end of the host name.
fn daemon_shard(args: &ServeArgs) -> Result<Option<Shard>> {
    let Some(arg) = args.shard.as_deref() else {
        if let Some(n) = args.shards {
            anyhow::bail!("--shards {n} (or TCLSEG_SHARDS) without --shard: give --shard auto or --shard I/{n}");
        }
        return Ok(None);
    };
    let host = if arg == "auto" {
        hostname()
    } else {
        String::new()
    };
    shard::host_shard(arg, args.shards, &host).map(Some)
}

/// The host name: `$HOSTNAME` (Kubernetes sets it to the pod's name), else the kernel's.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
