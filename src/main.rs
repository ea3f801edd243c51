//! The single `iro` binary: clap subcommands wiring the crates together. Logic lives in the crates.

mod cli;
mod logging;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    logging::init(cli.log_format)?;
    cli::run(cli)
}
