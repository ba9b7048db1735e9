//! `tclseg config check FILE`: validates a daemon config (with the environment's overrides and secret files)
//! and prints what would run, or every problem with its location.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

pub fn check(file: &Path) -> Result<ExitCode> {
    match tclseg::config::load(file) {
        Ok((config, plans)) => {
            println!("{}: ok", file.display());
            for warning in tclseg::config::validate::warnings(&config) {
                eprintln!("warning: {warning}");
            }
            println!(
                "  model: {} on {} ({})",
                config
                    .model
                    .path
                    .as_ref()
                    .map_or("default".to_string(), |p| p.display().to_string()),
                config.model.device,
                config.model.precision
            );
            for plan in &plans {
                let names: Vec<&str> = plan.queries.specs.iter().map(|s| s.name.trim()).collect();
                println!(
                    "  pipeline '{}': {} ({:?} queue{}), queries [{}] -> {}",
                    plan.config.name,
                    plan.source,
                    plan.queue,
                    plan.config
                        .max_fps
                        .map_or(String::new(), |f| format!(", at most {f} fps")),
                    names.join(", "),
                    plan.config.output.dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprint!("{errors}");
            Ok(ExitCode::from(1))
        }
    }
}
