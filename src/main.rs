//! The loopcsi binary: parse the command line, set up logging, serve.

use std::io::IsTerminal;

use clap::Parser;
use loopcsi::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            let shutdown = loopcsi::server::termination_signal()?;
            let server = loopcsi::server::bind(&config)?;
            server.serve(shutdown).await?;
        }
        Command::Status(args) => {
            print!("{}", loopcsi::operator::status(&args.state_dir, args.json)?);
        }
        Command::Gc(args) => {
            let min_age = std::time::Duration::from_secs(args.min_age);
            let report = loopcsi::operator::gc(&args.state_dir, args.dry_run, min_age)?;
            for line in report.collected.iter().chain(&report.unrepairable) {
                println!("{line}");
            }
            if report.collected.is_empty() && report.unrepairable.is_empty() {
                println!("no orphans");
            }
        }
    }
    Ok(())
}
