//! The command line and the resolved settings of one run.

use crate::{GIB, MIB};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "loopcsi-bench",
    about = "Benchmarks loopcsi on this machine (data path, provisioning, scale) and prints a \
             markdown report. Run as root; needs fio, losetup, mkfs.ext4, mkfs.xfs."
)]
pub(crate) struct Args {
    /// A tiny configuration that runs in seconds (used by the test suite): 2 volumes, 1 round,
    /// fio runs of a few I/Os on 16 MiB files, 10 volumes in the scale section.
    #[arg(long, alias = "quick")]
    pub(crate) smoke: bool,

    /// A directory on the file system to benchmark as the pool ("disk"). The bench makes one
    /// temp dir inside it and removes it at the end.
    #[arg(long, default_value = "/var/tmp")]
    pub(crate) pool_dir: PathBuf,

    /// Volumes per provisioning configuration [default: 200; smoke: 2].
    #[arg(long)]
    pub(crate) volumes: Option<usize>,

    /// Rounds of every fio job on every target [default: 5; smoke: 1].
    #[arg(long)]
    pub(crate) rounds: Option<usize>,

    /// Seconds each fio job is measured, after 1 s of ramp [default: 4]. 0 (the smoke default)
    /// runs a fixed, small number of I/Os instead.
    #[arg(long)]
    pub(crate) fio_runtime: Option<u64>,

    /// Size of the file (or device) fio works on, MiB [default: 1024; smoke: 16].
    #[arg(long)]
    pub(crate) fio_size_mib: Option<u64>,

    /// Sections to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "data,provision,scale,stall,group,cbt"
    )]
    pub(crate) sections: Vec<Section>,

    /// Pools for the data-path section [default: disk,ram; smoke: ram].
    #[arg(long, value_delimiter = ',')]
    pub(crate) pools: Option<Vec<PoolKind>>,

    /// Concurrencies of the provisioning section [default: 1,8,32; smoke: 1,2].
    #[arg(long, value_delimiter = ',')]
    pub(crate) concurrency: Option<Vec<usize>>,

    /// Size of each provisioned volume, MiB [default: 1024; smoke: 64].
    #[arg(long)]
    pub(crate) volume_mib: Option<u64>,

    /// Size of the volume whose first stage is timed, GiB [default: 100; smoke: 1].
    #[arg(long)]
    pub(crate) big_volume_gib: Option<u64>,

    /// Volumes created in the scale section [default: 1000; smoke: 10].
    #[arg(long)]
    pub(crate) scale_volumes: Option<usize>,

    /// Of those, volumes staged [default: 200; smoke: 4].
    #[arg(long)]
    pub(crate) scale_staged: Option<usize>,

    /// Sizes of the volumes snapshotted under a writer in the stall section, GiB
    /// [default: 1,20; smoke: one of 64 MiB].
    #[arg(long, value_delimiter = ',')]
    pub(crate) stall_volume_gib: Option<Vec<u64>>,

    /// Data written into each stall volume before it is snapshotted: 90 % of the volume, at
    /// most this many MiB (the pool needs room for it twice) [default: 4096].
    #[arg(long, default_value_t = 4096)]
    pub(crate) stall_data_mib: u64,

    /// The `loopcsi` binary for the scale section [default: `loopcsi` next to this binary].
    #[arg(long)]
    pub(crate) driver_bin: Option<PathBuf>,

    /// Also write every measurement as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Section {
    Data,
    Provision,
    Scale,
    Stall,
    /// The write stall of a group snapshot of four volumes (xfs-reflink pool on a tmpfs).
    Group,
    /// Changed-block tracking: GetMetadataDelta on a large thin volume.
    Cbt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PoolKind {
    /// The --pool-dir file system.
    Disk,
    /// A tmpfs the bench mounts in its temp dir.
    Ram,
}

impl PoolKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            PoolKind::Disk => "disk",
            PoolKind::Ram => "ram",
        }
    }
}

/// The resolved configuration of one run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Settings {
    pub(crate) smoke: bool,
    pub(crate) sections: Vec<Section>,
    pub(crate) pools: Vec<PoolKind>,
    pub(crate) rounds: usize,
    pub(crate) fio_runtime_s: u64,
    pub(crate) fio_ramp_s: u64,
    pub(crate) fio_size_mib: u64,
    /// When fio_runtime_s is 0: I/Os per job.
    pub(crate) fio_number_ios: u64,
    pub(crate) volumes: usize,
    pub(crate) concurrency: Vec<usize>,
    pub(crate) volume_mib: u64,
    pub(crate) big_volume_gib: u64,
    pub(crate) big_volume_samples: usize,
    /// Back-to-back pairs (driver stage, direct mkfs + mount) of the first-stage comparison.
    pub(crate) stage_pairs: usize,
    pub(crate) scale_volumes: usize,
    pub(crate) scale_staged: usize,
    pub(crate) scale_volume_mib: u64,
    pub(crate) tool_samples: usize,
    /// (volume bytes, data bytes) of each volume of the stall section.
    pub(crate) stall_volumes: Vec<(u64, u64)>,
    /// Size of the cbt section's volume, GiB.
    pub(crate) cbt_volume_gib: u64,
}

impl Settings {
    pub(crate) fn from_args(args: &Args) -> Result<Self> {
        let smoke = args.smoke;
        let pick = |value: Option<usize>, full: usize, tiny: usize| {
            value.unwrap_or(if smoke { tiny } else { full })
        };
        let pick64 = |value: Option<u64>, full: u64, tiny: u64| {
            value.unwrap_or(if smoke { tiny } else { full })
        };
        let fio_runtime_s = pick64(args.fio_runtime, 4, 0);
        let settings = Settings {
            smoke,
            sections: args.sections.clone(),
            pools: args.pools.clone().unwrap_or(if smoke {
                vec![PoolKind::Ram]
            } else {
                vec![PoolKind::Disk, PoolKind::Ram]
            }),
            rounds: pick(args.rounds, 5, 1),
            fio_runtime_s,
            fio_ramp_s: if fio_runtime_s > 0 { 1 } else { 0 },
            fio_size_mib: pick64(args.fio_size_mib, 1024, 16),
            fio_number_ios: 64,
            volumes: pick(args.volumes, 200, 2),
            concurrency: args.concurrency.clone().unwrap_or(if smoke {
                vec![1, 2]
            } else {
                vec![1, 8, 32]
            }),
            volume_mib: pick64(args.volume_mib, 1024, 64),
            big_volume_gib: pick64(args.big_volume_gib, 100, 1),
            big_volume_samples: if smoke { 1 } else { 3 },
            stage_pairs: if smoke { 2 } else { 40 },
            scale_volumes: pick(args.scale_volumes, 1000, 10),
            scale_staged: pick(args.scale_staged, 200, 4),
            scale_volume_mib: 64,
            tool_samples: if smoke { 2 } else { 20 },
            stall_volumes: match (&args.stall_volume_gib, smoke) {
                (None, true) => vec![(64 * MIB, 32 * MIB)],
                (sizes, _) => sizes
                    .clone()
                    .unwrap_or_else(|| vec![1, 20])
                    .into_iter()
                    .map(|gib| {
                        (
                            gib * GIB,
                            (gib * GIB / 10 * 9).min(args.stall_data_mib * MIB),
                        )
                    })
                    .collect(),
            },
            cbt_volume_gib: if smoke { 1 } else { 100 },
        };
        if settings.rounds == 0 || settings.volumes == 0 || settings.fio_size_mib < 4 {
            bail!("--rounds and --volumes must be at least 1, --fio-size-mib at least 4");
        }
        if settings.concurrency.contains(&0) {
            bail!("--concurrency values must be at least 1");
        }
        if settings.scale_staged > settings.scale_volumes {
            bail!("--scale-staged must not exceed --scale-volumes");
        }
        Ok(settings)
    }

    pub(crate) fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }
}
