//! loopcsi-bench: measures loopcsi on the machine it runs on, against the same kernel and tool
//! steps done by hand, and prints a markdown report (see docs/benchmarks.md).
//!
//! Sections:
//! - `data`: fio (direct=1) on a plain file in the pool file system, inside ext4, xfs and raw block
//!   volumes published by the real driver (in-process, on a temp socket), and on hand-made loop
//!   devices (tuned: direct I/O and 4096-byte sectors; buffered with 512-byte sectors). Every job
//!   runs on every target, interleaved, for several rounds; medians and spread are reported. It
//!   runs on the `--pool-dir` file system ("disk") and on a tmpfs the bench mounts ("ram").
//! - `provision`: volumes through Create → Stage → Publish → Unpublish → Unstage → Delete at
//!   several concurrencies, thin and thick, ext4 and block, beside the same steps done directly.
//! - `scale`: the real `loopcsi` binary as a child with 1000 volumes (200 staged): RSS, restart to
//!   ready, ListVolumes, GetCapacity, NodeGetVolumeStats.
//! - `stall`: the longest write an application sees while its live ext4 volume is snapshotted
//!   (1 GiB and 20 GiB volumes) on the --pool-dir file system, before and after the bounded
//!   freeze.
//!
//! - `cbt`: GetMetadataDelta between two snapshots of a 100 GiB thin volume with 1 % of its
//!   blocks rewritten, on a tmpfs-backed xfs pool with reflink.
//!
//! Everything the bench makes lives in one temp dir under `--pool-dir`; it is released (mounts,
//! loop devices, tmpfs) and removed at the end, also on error or SIGINT/SIGTERM. Nothing outside
//! it is touched.

mod args;
mod cbt;
mod data;
mod driver;
mod fio;
mod first_stage;
mod group;
mod provision;
mod render;
mod report;
mod scale;
mod scratch;
mod stall;
mod stats;
mod tools;
mod writer;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use args::*;
use data::*;
use provision::*;
use render::*;
use report::*;
use scale::*;
use scratch::*;
use tools::*;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;
pub(crate) const NODE_ID: &str = "bench-node";
/// The mkfs options the driver uses (src/host/tools.rs), for the hand-made loop devices.
pub(crate) const MKFS_EXT4_OPTS: &str = "nodiscard,lazy_itable_init=1,lazy_journal_init=1";

pub(crate) fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("loopcsi-bench: starting the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_until_signal(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loopcsi-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the bench; SIGINT or SIGTERM drops the run (its guards release everything it made).
pub(crate) async fn run_until_signal(args: Args) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        result = run(args) => result,
        _ = term.recv() => Err(anyhow!("terminated by SIGTERM (everything the bench made was released)")),
        _ = int.recv() => Err(anyhow!("interrupted by SIGINT (everything the bench made was released)")),
    }
}

pub(crate) async fn run(args: Args) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root: the bench attaches loop devices and mounts file systems");
    }
    let settings = Settings::from_args(&args)?;
    let tools = Tools::find()?;
    let started = Instant::now();
    let scratch = Scratch::new(&args.pool_dir)?;
    let log = Progress { started };
    log.say(format!("temp dir {}", scratch.root.display()));
    let machine = machine_info(&args.pool_dir, &settings, &tools);
    let mut report = Report {
        machine,
        settings: settings.clone(),
        data: Vec::new(),
        provision: None,
        scale: None,
        stall: Vec::new(),
        group: None,
        cbt: None,
        targets: Vec::new(),
        duration_s: 0.0,
    };
    if settings.runs(Section::Data) {
        for &pool in &settings.pools {
            let result = data_section(&settings, &tools, &scratch, pool, &log).await?;
            report.data.push(result);
        }
    }
    if settings.runs(Section::Provision) {
        report.provision = Some(provision_section(&settings, &tools, &scratch, &log).await?);
    }
    if settings.runs(Section::Scale) {
        let bin = match &args.driver_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .context("locating this binary")?
                .with_file_name("loopcsi"),
        };
        if !bin.is_file() {
            bail!(
                "the scale section runs the real driver binary, and {} does not exist; build it \
                 (cargo build --release --bin loopcsi) or pass --driver-bin",
                bin.display()
            );
        }
        report.scale = Some(scale_section(&settings, &scratch, &bin, &log).await?);
    }
    if settings.runs(Section::Stall) {
        report.stall = stall::stall_section(&settings, &scratch, &log).await?;
    }
    if settings.runs(Section::Group) {
        report.group = Some(group::group_section(&settings, &scratch, &log).await?);
    }
    if settings.runs(Section::Cbt) {
        report.cbt = Some(cbt::cbt_section(&settings, &scratch, &log).await?);
    }
    scratch.finish()?;
    report.duration_s = started.elapsed().as_secs_f64();
    report.targets = evaluate(&report);
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Progress lines on stderr (the report goes to stdout).
pub(crate) struct Progress {
    pub(crate) started: Instant,
}

impl Progress {
    pub(crate) fn say(&self, line: impl AsRef<str>) {
        eprintln!(
            "[{:7.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            line.as_ref()
        );
    }
}
