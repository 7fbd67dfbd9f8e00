//! `dcam-stream config check`: validates a file and prints the effective configuration.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::Settings;

#[derive(clap::Subcommand)]
pub(super) enum Command {
    /// Validate a config file and print the effective configuration.
    Check { file: PathBuf },
}

pub(super) fn run(command: &Command) -> Result<()> {
    let Command::Check { file } = command;
    let settings = Settings::load(Some(file))?;
    println!("# {} is valid; effective configuration:", file.display());
    print!("{}", settings.to_toml_masked());
    Ok(())
}
