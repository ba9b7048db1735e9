//! One function per subcommand, each a thin layer over the library. They print results for the user on stdout;
//! progress and problems go to the log (stderr).

mod bench;
mod config;
mod eval;
mod models;
mod segment;
mod serve;
mod train;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Command, ConfigCommand};

pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Models(cmd) => models::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Segment(args) => segment::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Config(ConfigCommand::Check { file }) => config::check(&file),
        Command::Probe { uri, timeout } => probe(&uri, timeout),
        Command::MergeReports(args) => segment::merge_reports(&args.dir, args.shards),
    }
}

/// `tclseg probe URI`: one line per stream of the source, and one per decoder with its encoded caps.
fn probe(uri: &str, timeout: f64) -> Result<ExitCode> {
    let spec = tclseg::source::SourceSpec::parse(uri, None)?;
    let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.1, 3600.0));
    let (streams, decoders) = tclseg::source::probe::probe(&spec, timeout)?;
    let plural = if streams.len() == 1 { "" } else { "s" };
    println!("{spec}: {} stream{plural}", streams.len());
    for (i, s) in streams.iter().enumerate() {
        println!("  stream {i}: {}", s.caps);
    }
    for d in &decoders {
        println!("  decoder {}: {}", d.decoder, d.caps);
    }
    Ok(ExitCode::SUCCESS)
}
