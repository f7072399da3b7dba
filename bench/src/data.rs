//! Section 1, the data path: fio on the pool file system, inside the driver's volumes and on
//! hand-made loop devices.

use std::path::{Path, PathBuf};

use crate::args::*;
use crate::driver::*;
use crate::fio::*;
use crate::scratch::*;
use crate::stats::*;
use crate::tools::*;
use crate::*;
use anyhow::{anyhow, bail, Context, Result};
use loopcsi::host::{loopdev, mount};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Job {
    RandRead4k,
    RandWrite4k,
    SeqRead1m,
    SeqWrite1m,
    FsyncWrite4k,
}

pub(crate) const JOBS: [Job; 5] = [
    Job::RandRead4k,
    Job::RandWrite4k,
    Job::SeqRead1m,
    Job::SeqWrite1m,
    Job::FsyncWrite4k,
];

impl Job {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Job::RandRead4k => "randread-4k-qd32",
            Job::RandWrite4k => "randwrite-4k-qd32",
            Job::SeqRead1m => "read-1m-qd8",
            Job::SeqWrite1m => "write-1m-qd8",
            Job::FsyncWrite4k => "randwrite-4k-qd1-fsync",
        }
    }

    pub(crate) fn heading(self) -> &'static str {
        match self {
            Job::RandRead4k => "4k randread qd32 (IOPS)",
            Job::RandWrite4k => "4k randwrite qd32 (IOPS)",
            Job::SeqRead1m => "1M read qd8 (MiB/s)",
            Job::SeqWrite1m => "1M write qd8 (MiB/s)",
            Job::FsyncWrite4k => "4k randwrite qd1 +fsync (IOPS)",
        }
    }

    pub(crate) fn reads(self) -> bool {
        matches!(self, Job::RandRead4k | Job::SeqRead1m)
    }

    pub(crate) fn bandwidth(self) -> bool {
        matches!(self, Job::SeqRead1m | Job::SeqWrite1m)
    }

    pub(crate) fn fio_args(self) -> Vec<String> {
        let (rw, bs, depth) = match self {
            Job::RandRead4k => ("randread", "4k", 32),
            Job::RandWrite4k => ("randwrite", "4k", 32),
            Job::SeqRead1m => ("read", "1M", 8),
            Job::SeqWrite1m => ("write", "1M", 8),
            Job::FsyncWrite4k => ("randwrite", "4k", 1),
        };
        let mut args = vec![
            format!("--rw={rw}"),
            format!("--bs={bs}"),
            format!("--iodepth={depth}"),
        ];
        if self == Job::FsyncWrite4k {
            args.push("--fsync=1".into());
        }
        args
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Variant {
    /// Published by loopcsi.
    Volume,
    /// `losetup --direct-io=on --sector-size 4096` by hand.
    Tuned,
    /// `losetup` defaults: buffered I/O, 512-byte sectors.
    Buffered512,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Plain,
    Loop(Variant, VolKind),
}

impl Target {
    pub(crate) fn key(self) -> String {
        match self {
            Target::Plain => "plain file".into(),
            Target::Loop(Variant::Volume, kind) => format!("loopcsi {} volume", kind.name()),
            Target::Loop(Variant::Tuned, kind) => format!("tuned loop {}", kind.name()),
            Target::Loop(Variant::Buffered512, kind) => {
                format!("buffered-512 loop {}", kind.name())
            }
        }
    }
}

/// What to undo for a target.
pub(crate) enum Teardown {
    Nothing,
    Volume {
        id: String,
        staging: PathBuf,
        target: PathBuf,
    },
    Hand {
        device: PathBuf,
        mount_point: Option<PathBuf>,
    },
}

/// A target ready for fio.
pub(crate) struct Prepared {
    pub(crate) target: Target,
    /// What fio reads and writes: a file, or a device node.
    pub(crate) fio_file: PathBuf,
    /// Files synced and dropped from the page cache before every job (backing images), so no
    /// target inherits another's writeback or cache.
    pub(crate) backing: PathBuf,
    pub(crate) teardown: Teardown,
    pub(crate) device: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct DeviceInfo {
    pub(crate) target: String,
    pub(crate) device: String,
    pub(crate) direct_io: String,
    pub(crate) logical_block_size: String,
}

/// One fio job on one target over the rounds.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DataCell {
    pub(crate) target: String,
    pub(crate) job: Job,
    pub(crate) unit: &'static str,
    pub(crate) samples: Vec<f64>,
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// Median of the per-round completion-latency p99, microseconds.
    pub(crate) clat_p99_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct DataPoolResult {
    pub(crate) pool: PoolKind,
    pub(crate) path: String,
    pub(crate) filesystem: String,
    pub(crate) devices: Vec<DeviceInfo>,
    pub(crate) cells: Vec<DataCell>,
    pub(crate) targets: Vec<String>,
    /// Every volume against its bases, paired by round.
    pub(crate) ratios: Vec<RatioCell>,
}

/// A volume's result divided by a base's, round by round (the two ran close together in time,
/// so slow phases of the disk cancel out), and the median of those ratios.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RatioCell {
    pub(crate) volume: String,
    pub(crate) base: String,
    pub(crate) job: Job,
    pub(crate) per_round: Vec<f64>,
    pub(crate) median: f64,
}

impl DataPoolResult {
    pub(crate) fn cell(&self, target: Target, job: Job) -> Option<&DataCell> {
        let key = target.key();
        self.cells.iter().find(|c| c.target == key && c.job == job)
    }

    /// Median of the per-round ratios `a / b`.
    pub(crate) fn paired(&self, a: Target, b: Target, job: Job) -> Option<RatioCell> {
        let (x, y) = (self.cell(a, job)?, self.cell(b, job)?);
        let per_round: Vec<f64> = x
            .samples
            .iter()
            .zip(&y.samples)
            .filter(|(_, base)| **base > 0.0)
            .map(|(v, base)| v / base)
            .collect();
        (!per_round.is_empty()).then(|| RatioCell {
            volume: a.key(),
            base: b.key(),
            job,
            median: median(&per_round),
            per_round,
        })
    }
}

/// Sizes of the data-path images: the fio file plus room for the file system's metadata.
pub(crate) fn image_bytes(kind: VolKind, fio_bytes: u64) -> u64 {
    match kind {
        VolKind::Block => fio_bytes,
        VolKind::Ext4 | VolKind::Xfs => {
            let size = fio_bytes + fio_bytes / 4 + 128 * MIB;
            let size = size.div_ceil(MIB) * MIB;
            if kind == VolKind::Xfs {
                size.max(300 * MIB)
            } else {
                size
            }
        }
    }
}

pub(crate) fn mem_available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Mounts a tmpfs of `bytes` at `dir` (inside the scratch dir; released by its guard).
pub(crate) fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<()> {
    use nix::mount::MsFlags;
    std::fs::create_dir_all(dir)?;
    let data = format!("size={}m,mode=0700", bytes.div_ceil(MIB));
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .with_context(|| format!("mounting a tmpfs at {}", dir.display()))
}

/// The file system holding `path`: "type on source (options)".
pub(crate) fn filesystem_of(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else {
        return "unknown".into();
    };
    let Ok(table) = mount::mounts() else {
        return "unknown".into();
    };
    mount::mount_holding(&table, &path).map_or("unknown".into(), |m| {
        // Without a journal every fsync is a device cache flush of its own (no group commit)
        // and each new inode scans past recently deleted ones: it shows in provisioning.
        let journal = match mount::ext_journal(&m) {
            Some(true) => ", with a journal",
            Some(false) => ", **without a journal**",
            None => "",
        };
        format!(
            "{} on {} mounted at {} ({}; {}){journal}",
            m.fs_type,
            m.source,
            m.mount_point.display(),
            m.options,
            m.super_options,
        )
    })
}

pub(crate) fn sysfs_of(device: &Path, leaf: &str) -> String {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/{leaf}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The loop device attached to a driver volume's image.
pub(crate) fn device_of_volume(id: &str) -> Option<PathBuf> {
    let leaf = format!("{id}.img");
    loopdev::attached()
        .ok()?
        .into_iter()
        .find_map(|(dev, file)| {
            (file.file_name().and_then(|n| n.to_str()) == Some(leaf.as_str())).then(|| dev.path())
        })
}

/// The kinds of volume the data path measures, each beside its hand-made loop devices.
pub(crate) const DATA_KINDS: [VolKind; 3] = [VolKind::Ext4, VolKind::Xfs, VolKind::Block];

/// The data path on one pool: every target set up, every job run on every target for the
/// rounds, everything torn down, then each volume's ratios to its bases.
pub(crate) async fn data_section(
    settings: &Settings,
    tools: &Tools,
    scratch: &Scratch,
    pool: PoolKind,
    log: &Progress,
) -> Result<DataPoolResult> {
    let root = scratch.path(&format!("data-{}", pool.name()));
    let fio_bytes = settings.fio_size_mib * MIB;
    make_pool_dir(&root, pool, fio_bytes)?;
    let filesystem = filesystem_of(&root);
    log.say(format!("data/{}: pool {filesystem}", pool.name()));
    let state = root.join("state");
    let co = root.join("co");
    let hand = root.join("hand");
    let fio_out = root.join("fio-out");
    for dir in [&co, &hand, &fio_out] {
        std::fs::create_dir_all(dir)?;
    }
    let socket = scratch.socket(&format!("data-{}", pool.name()));
    let mut driver = InProcDriver::start(&socket, &state).await?;
    let clients = driver.clients.clone();

    let mut prepared = vec![plain_target(&root)];
    for kind in DATA_KINDS {
        prepared.push(volume_target(&clients, kind, fio_bytes, &co, &state).await?);
        for (variant, tuned) in [(Variant::Tuned, true), (Variant::Buffered512, false)] {
            prepared.push(hand_target(
                tools,
                (variant, tuned),
                kind,
                fio_bytes,
                &hand,
            )?);
        }
    }
    let devices = device_infos(&prepared);
    let cells = measure(settings, tools, &prepared, &fio_out, pool, log).await?;

    // Teardown: the targets (hand-made devices, the driver's volumes), then the driver and the
    // pool. On the ram pool the tmpfs is gone after the release; what is left is its empty
    // mount point.
    tear_down(tools, &clients, &prepared).await?;
    driver.stop().await?;
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    let mut result = DataPoolResult {
        pool,
        path: root.display().to_string(),
        filesystem,
        devices,
        cells,
        targets: prepared.iter().map(|p| p.target.key()).collect(),
        ratios: Vec::new(),
    };
    result.ratios = volume_ratios(&result);
    Ok(result)
}

/// Makes the pool's directory: on the disk pool a plain directory, on the ram pool a tmpfs,
/// refused when the machine has too little memory for it.
fn make_pool_dir(root: &Path, pool: PoolKind, fio_bytes: u64) -> Result<()> {
    match pool {
        PoolKind::Disk => std::fs::create_dir_all(root)?,
        PoolKind::Ram => {
            // An upper bound of what the images can hold, and what they will really use.
            let limit = fio_bytes
                + DATA_KINDS
                    .iter()
                    .map(|&k| 3 * image_bytes(k, fio_bytes))
                    .sum::<u64>()
                + 512 * MIB;
            let use_estimate = 10 * fio_bytes + fio_bytes / 2 + 512 * MIB;
            let available = mem_available_bytes();
            if use_estimate > available / 10 * 7 {
                bail!(
                    "the ram pool needs about {} MiB of memory and {} MiB are available; \
                     use a smaller --fio-size-mib or --pools disk",
                    use_estimate / MIB,
                    available / MIB
                );
            }
            mount_tmpfs(root, limit)?;
        }
    }
    Ok(())
}

/// A plain file in the pool's file system: the baseline every volume is compared with.
fn plain_target(root: &Path) -> Prepared {
    let plain = root.join("plain.fio");
    Prepared {
        target: Target::Plain,
        fio_file: plain.clone(),
        backing: plain,
        teardown: Teardown::Nothing,
        device: None,
    }
}

/// The driver's volume of `kind`, created, staged and published as a CO would.
async fn volume_target(
    clients: &Clients,
    kind: VolKind,
    fio_bytes: u64,
    co: &Path,
    state: &Path,
) -> Result<Prepared> {
    let name = format!("bench-data-{}", kind.name());
    let id = clients
        .create(&name, image_bytes(kind, fio_bytes), kind, false)
        .await?;
    let staging = co.join("staging").join(kind.name());
    let target = co.join("pods").join(kind.name()).join("volume");
    std::fs::create_dir_all(&staging)?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    clients.stage(&id, &staging, kind).await?;
    clients.publish(&id, &staging, &target, kind).await?;
    let fio_file = if kind.is_fs() {
        target.join("fio.dat")
    } else {
        target.clone()
    };
    Ok(Prepared {
        target: Target::Loop(Variant::Volume, kind),
        fio_file,
        backing: state.join("volumes").join(format!("{id}.img")),
        device: device_of_volume(&id),
        teardown: Teardown::Volume {
            id,
            staging,
            target,
        },
    })
}

/// A hand-made loop device (`tuned`: direct I/O and 4096-byte sectors) over a new image, with
/// the file system of `kind` made and mounted as the driver would.
fn hand_target(
    tools: &Tools,
    (variant, tuned): (Variant, bool),
    kind: VolKind,
    fio_bytes: u64,
    hand: &Path,
) -> Result<Prepared> {
    let stem = format!("{}-{}", if tuned { "tuned" } else { "buf512" }, kind.name());
    let image = hand.join(format!("{stem}.img"));
    std::fs::File::create(&image)?.set_len(image_bytes(kind, fio_bytes))?;
    let device = tools.losetup_attach(&image, tuned)?;
    let mut entry = Prepared {
        target: Target::Loop(variant, kind),
        fio_file: device.clone(),
        backing: image,
        device: Some(device.clone()),
        teardown: Teardown::Hand {
            device: device.clone(),
            mount_point: None,
        },
    };
    if kind.is_fs() {
        tools.mkfs(kind, &device)?;
        let mount_point = hand.join(format!("{stem}.mnt"));
        std::fs::create_dir_all(&mount_point)?;
        mount::mount_device(
            &device,
            &mount_point,
            kind.name(),
            &mount::MountOptions::default(),
        )
        .map_err(|e| anyhow!("{e}"))?;
        entry.fio_file = mount_point.join("fio.dat");
        entry.teardown = Teardown::Hand {
            device,
            mount_point: Some(mount_point),
        };
    }
    Ok(entry)
}

/// What the kernel says of every target's loop device (direct I/O, logical block size).
fn device_infos(prepared: &[Prepared]) -> Vec<DeviceInfo> {
    prepared
        .iter()
        .filter_map(|p| {
            let dev = p.device.as_ref()?;
            Some(DeviceInfo {
                target: p.target.key(),
                device: dev.display().to_string(),
                direct_io: sysfs_of(dev, "loop/dio"),
                logical_block_size: sysfs_of(dev, "queue/logical_block_size"),
            })
        })
        .collect()
}

/// Undoes every target, last made first.
async fn tear_down(tools: &Tools, clients: &Clients, prepared: &[Prepared]) -> Result<()> {
    for p in prepared.iter().rev() {
        match &p.teardown {
            Teardown::Nothing => {}
            Teardown::Hand {
                device,
                mount_point,
            } => {
                if let Some(point) = mount_point {
                    mount::unmount(point).map_err(|e| anyhow!("{e}"))?;
                }
                tools.losetup_detach(device)?;
            }
            Teardown::Volume {
                id,
                staging,
                target,
            } => {
                clients.unpublish(id, target).await?;
                clients.unstage(id, staging).await?;
                clients.delete(id).await?;
            }
        }
    }
    Ok(())
}

/// Every volume against the plain file and its kind's tuned and buffered-512 loops.
fn volume_ratios(result: &DataPoolResult) -> Vec<RatioCell> {
    let mut ratios = Vec::new();
    for kind in DATA_KINDS {
        for job in JOBS {
            let volume = Target::Loop(Variant::Volume, kind);
            for base in [
                Target::Plain,
                Target::Loop(Variant::Tuned, kind),
                Target::Loop(Variant::Buffered512, kind),
            ] {
                ratios.extend(result.paired(volume, base, job));
            }
        }
    }
    ratios
}
