//! The loopcsi binary: parse the command line, set up logging, serve.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use loopcsi::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if matches!(cli.command, Command::Gc(_)) {
        // gc prints its report on stdout; the same lines logged by the reconciler would show
        // every line twice on a terminal. Its errors still show.
        filter = filter.add_directive(
            "loopcsi::volume::reconcile=error"
                .parse()
                .unwrap_or_else(|_| tracing::Level::ERROR.into()),
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line with the cause chain, never a backtrace (even with RUST_BACKTRACE set):
            // an operator reads this, not a developer.
            eprintln!("error: {}", cause_chain(&err));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                node.id = %config.node_id,
                state_dir = %config.state_dir.display(),
                driver.name = %config.driver_name,
                direct_io.requested = !config.buffered_io,
                "starting loopcsi"
            );
            let shutdown = loopcsi::server::termination_signal()?;
            let server = loopcsi::server::bind(&config)?;
            server.serve(shutdown).await?;
        }
        Command::RouteSnapshots(args) => {
            let shutdown = loopcsi::server::termination_signal()?;
            loopcsi::router::run(args, shutdown).await?;
        }
        Command::Status(args) => {
            print!("{}", loopcsi::operator::status(&args.state_dir, args.json)?);
        }
        Command::Rescue(args) => {
            println!(
                "{}",
                loopcsi::operator::rescue(&args.state_dir, &args.volume)?
            );
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

/// The error and its causes, joined by `: `. A cause whose text the message already ends
/// with (an I/O error the message quotes) is not repeated.
fn cause_chain(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !out.ends_with(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}
