//! Section 2, provisioning: whole lifecycles through the driver and the same steps done
//! directly, and the cost of single tool steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::args::*;
use crate::data::*;
use crate::driver::*;
use crate::first_stage::*;
use crate::scratch::*;
use crate::stats::*;
use crate::tools::*;
use crate::*;
use anyhow::{anyhow, Context, Result};
use loopcsi::host::{files, loopdev, mount};
use serde::Serialize;

pub(crate) const RPCS: [&str; 6] = [
    "Create",
    "Stage",
    "Publish",
    "Unpublish",
    "Unstage",
    "Delete",
];

/// The kernel and tool steps of a lifecycle done directly, in order.
pub(crate) const STEPS: [&str; 10] = [
    "create file",
    "attach",
    "blkid -p (not run)",
    "mkfs",
    "mount",
    "bind",
    "unbind",
    "umount",
    "detach",
    "delete file",
];

/// Which direct steps make up each RPC.
pub(crate) const RPC_STEPS: [&[usize]; 6] = [&[0], &[1, 2, 3, 4], &[5], &[6], &[7, 8], &[9]];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LifecyclePath {
    /// Through the driver's RPCs.
    Driver,
    /// The same kernel and tool steps run directly.
    Direct,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct LifecycleResult {
    pub(crate) kind: VolKind,
    pub(crate) thick: bool,
    pub(crate) concurrency: usize,
    pub(crate) path: LifecyclePath,
    pub(crate) volumes: usize,
    pub(crate) wall_s: f64,
    pub(crate) volumes_per_s: f64,
    /// Per RPC (or its direct equivalent), in RPCS order.
    pub(crate) rpcs: Vec<Summary>,
    /// Direct only: per step, in STEPS order.
    pub(crate) steps: Vec<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ToolStep {
    pub(crate) step: String,
    pub(crate) summary: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct FirstStageResult {
    pub(crate) pool: PoolKind,
    pub(crate) filesystem: String,
    pub(crate) size_mib: u64,
    /// Driver: CreateVolume and the first NodeStageVolume (ms); None with the reason when the
    /// pool cannot hold the volume.
    pub(crate) driver_create: Option<Summary>,
    pub(crate) driver_stage: Option<Summary>,
    pub(crate) driver_note: String,
    /// Direct, the same steps by hand (ms): LOOP_CONFIGURE, mkfs, mount, and mkfs + mount.
    pub(crate) direct_attach: Summary,
    pub(crate) direct_mkfs: Summary,
    pub(crate) direct_mount: Summary,
    pub(crate) direct_mkfs_mount: Summary,
    /// Per pair (the two ran back to back, in alternating order): driver stage ÷ direct
    /// mkfs + mount. Drift of the machine moves both halves of a pair alike.
    pub(crate) ratio_to_mkfs_mount: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProvisionResult {
    pub(crate) filesystem: String,
    pub(crate) volume_mib: u64,
    pub(crate) lifecycles: Vec<LifecycleResult>,
    pub(crate) tool_steps: Vec<ToolStep>,
    pub(crate) first_stage: Vec<FirstStageResult>,
    pub(crate) notes: Vec<String>,
}

impl ProvisionResult {
    pub(crate) fn find(
        &self,
        kind: VolKind,
        thick: bool,
        concurrency: usize,
        path: LifecyclePath,
    ) -> Option<&LifecycleResult> {
        self.lifecycles.iter().find(|l| {
            l.kind == kind && l.thick == thick && l.concurrency == concurrency && l.path == path
        })
    }
}

/// The provisioning section: lifecycles through the driver and directly, single tool steps,
/// and first stages of fresh volumes on both pools.
pub(crate) async fn provision_section(
    settings: &Settings,
    tools: &Tools,
    scratch: &Scratch,
    log: &Progress,
) -> Result<ProvisionResult> {
    let root = scratch.path("provision");
    let state = root.join("state");
    let dirs = LifecycleDirs {
        co: root.join("co"),
        direct: root.join("direct"),
    };
    for dir in [&dirs.co, &dirs.direct] {
        std::fs::create_dir_all(dir)?;
    }
    let filesystem = filesystem_of(&root);
    let mut driver = InProcDriver::start(&scratch.socket("provision"), &state).await?;
    let clients = driver.clients.clone();
    let size = settings.volume_mib * MIB;
    let mut notes = Vec::new();
    let free = u64::try_from(clients.get_capacity().await?).unwrap_or(0);
    let mut lifecycles = Vec::new();
    for &concurrency in &settings.concurrency {
        for thick in [false, true] {
            // Thick volumes hold their size for real: at most `concurrency` exist at once.
            let needed = concurrency as u64 * size / 4 * 5 + GIB;
            if thick && needed > free {
                notes.push(format!(
                    "thick at concurrency {concurrency} skipped: it needs {} MiB of free space, the pool has {} MiB",
                    needed / MIB,
                    free / MIB
                ));
                continue;
            }
            for kind in [VolKind::Ext4, VolKind::Block] {
                let spec = LifecycleSpec {
                    kind,
                    thick,
                    concurrency,
                    volumes: settings.volumes,
                    bytes: size,
                };
                let pair = lifecycle_pair(tools, &clients, spec, &dirs, log).await?;
                lifecycles.extend(pair);
            }
        }
    }
    driver.stop().await?;

    log.say("provision: tool step costs");
    let tools_copy = tools.clone();
    let dir = root.join("tools");
    let samples = settings.tool_samples;
    let tool_steps =
        tokio::task::spawn_blocking(move || tool_step_costs(&tools_copy, &dir, samples, size))
            .await
            .context("tool step task")??;
    let first_stage = first_stages(settings, tools, scratch, log).await?;
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    Ok(ProvisionResult {
        filesystem,
        volume_mib: settings.volume_mib,
        lifecycles,
        tool_steps,
        first_stage,
        notes,
    })
}

/// Where lifecycles run: the CO's dirs for the driver, the bench's own for the direct steps.
struct LifecycleDirs {
    co: PathBuf,
    direct: PathBuf,
}

/// One lifecycle configuration through the driver, then the same steps directly.
async fn lifecycle_pair(
    tools: &Tools,
    clients: &Clients,
    spec: LifecycleSpec,
    dirs: &LifecycleDirs,
    log: &Progress,
) -> Result<[LifecycleResult; 2]> {
    let tag = format!(
        "{}-{}-c{}",
        spec.kind.name(),
        if spec.thick { "thick" } else { "thin" },
        spec.concurrency
    );
    let d = driver_lifecycle(clients, spec, &dirs.co, &tag).await?;
    log.say(format!(
        "provision {tag:18} driver {:8.1} volumes/s  Create p50 {:.2} ms  Stage p50 {:.2} ms",
        d.volumes_per_s, d.rpcs[0].p50, d.rpcs[1].p50
    ));
    let dir = dirs.direct.join(&tag);
    let tools_copy = tools.clone();
    let x = tokio::task::spawn_blocking(move || direct_lifecycle(&tools_copy, spec, &dir))
        .await
        .context("direct lifecycle task")??;
    log.say(format!(
        "provision {tag:18} direct {:8.1} volumes/s  create p50 {:.2} ms  stage p50 {:.2} ms",
        x.volumes_per_s, x.rpcs[0].p50, x.rpcs[1].p50
    ));
    Ok([d, x])
}

/// First stages of a fresh volume of the provisioning size and of the big size, on the disk
/// and the ram pool.
async fn first_stages(
    settings: &Settings,
    tools: &Tools,
    scratch: &Scratch,
    log: &Progress,
) -> Result<Vec<FirstStageResult>> {
    let mut first_stage = Vec::new();
    for pool in [PoolKind::Disk, PoolKind::Ram] {
        for (bytes, samples) in [
            (settings.volume_mib * MIB, settings.stage_pairs),
            (settings.big_volume_gib * GIB, settings.big_volume_samples),
        ] {
            log.say(format!(
                "provision: first stage of a {} MiB volume, {} pool, {samples} pairs",
                bytes / MIB,
                pool.name()
            ));
            first_stage.push(first_stage_pairs(tools, scratch, pool, bytes, samples).await?);
        }
    }
    Ok(first_stage)
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct LifecycleSpec {
    pub(crate) kind: VolKind,
    pub(crate) thick: bool,
    pub(crate) concurrency: usize,
    pub(crate) volumes: usize,
    pub(crate) bytes: u64,
}

/// `volumes` volumes through the whole lifecycle, `concurrency` at a time, through the driver.
pub(crate) async fn driver_lifecycle(
    clients: &Clients,
    spec: LifecycleSpec,
    co: &Path,
    tag: &str,
) -> Result<LifecycleResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..spec.concurrency {
        let clients = clients.clone();
        let next = Arc::clone(&next);
        let co = co.to_path_buf();
        let tag = tag.to_string();
        workers.push(tokio::spawn(async move {
            let mut lat: Vec<Vec<f64>> = vec![Vec::new(); RPCS.len()];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= spec.volumes {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let name = format!("bench-{tag}-{i}");
                // What the CO prepares (kubelet makes the staging dir and the pod dir).
                let staging = co.join("staging").join(&name);
                let pod = co.join("pods").join(&name);
                let target = pod.join("volume");
                std::fs::create_dir_all(&staging)?;
                std::fs::create_dir_all(&pod)?;
                let t = Instant::now();
                let id = clients
                    .create(&name, spec.bytes, spec.kind, spec.thick)
                    .await?;
                lat[0].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.stage(&id, &staging, spec.kind).await?;
                lat[1].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.publish(&id, &staging, &target, spec.kind).await?;
                lat[2].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.unpublish(&id, &target).await?;
                lat[3].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.unstage(&id, &staging).await?;
                lat[4].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.delete(&id).await?;
                lat[5].push(ms(t.elapsed()));
                std::fs::remove_dir(&staging)?;
                std::fs::remove_dir(&pod)?;
            }
        }));
    }
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); RPCS.len()];
    for worker in workers {
        let lat = worker.await.context("lifecycle worker")??;
        for (mine, theirs) in all.iter_mut().zip(lat) {
            mine.extend(theirs);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    Ok(LifecycleResult {
        kind: spec.kind,
        thick: spec.thick,
        concurrency: spec.concurrency,
        path: LifecyclePath::Driver,
        volumes: spec.volumes,
        wall_s: wall,
        volumes_per_s: spec.volumes as f64 / wall,
        rpcs: all.iter().map(|v| summarize(v)).collect(),
        steps: Vec::new(),
    })
}

/// A backing file made durable, as an admin would for a volume that must survive a crash:
/// created and sized by the driver's own function (fallocate for thick), then fsynced with its
/// directory.
pub(crate) fn create_image(path: &Path, bytes: u64, thick: bool) -> Result<()> {
    let allocation = if thick {
        files::Allocation::Full
    } else {
        files::Allocation::Sparse
    };
    let file = files::create_backing_file(path, bytes, allocation).map_err(|e| anyhow!("{e}"))?;
    file.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    fsync_dir(path.parent().unwrap_or(Path::new("/")))
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    files::fsync_dir(dir).map_err(|e| anyhow!("{e}"))
}

/// Attaches `image` the way the driver does (one LOOP_CONFIGURE, direct I/O, 4096-byte blocks).
pub(crate) fn attach_direct(image: &Path) -> Result<loopdev::LoopDevice> {
    loopdev::attach(
        image,
        loopdev::AttachOptions {
            direct_io: true,
            read_only: false,
        },
    )
    .map_err(|e| anyhow!("{e}"))
}

/// One volume's lifecycle done directly; the duration of every step (ms), in STEPS order.
pub(crate) fn direct_one(
    tools: &Tools,
    spec: LifecycleSpec,
    dir: &Path,
    i: usize,
) -> Result<[f64; 10]> {
    let mut t = [0.0; 10];
    let image = dir.join(format!("{i}.img"));
    let staging = dir.join(format!("{i}.staging"));
    let pod = dir.join(format!("{i}.pod"));
    let target = pod.join("volume");
    std::fs::create_dir_all(&pod)?;
    if spec.kind.is_fs() {
        std::fs::create_dir_all(&staging)?;
    }
    let clock = Instant::now();
    create_image(&image, spec.bytes, spec.thick)?;
    t[0] = ms(clock.elapsed());
    let clock = Instant::now();
    let dev = attach_direct(&image)?;
    t[1] = ms(clock.elapsed());
    let none = mount::MountOptions::default();
    if spec.kind.is_fs() {
        // No blkid -p here: the driver skips it for a never-written image (the tool step
        // costs list what it costs when it runs).
        let clock = Instant::now();
        tools.mkfs(spec.kind, &dev.path())?;
        t[3] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::mount_device(&dev.path(), &staging, spec.kind.name(), &none)
            .map_err(|e| anyhow!("{e}"))?;
        t[4] = ms(clock.elapsed());
        let clock = Instant::now();
        std::fs::create_dir(&target)?;
        mount::bind(&staging, &target, &none).map_err(|e| anyhow!("{e}"))?;
        t[5] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::unmount(&target).map_err(|e| anyhow!("{e}"))?;
        std::fs::remove_dir(&target)?;
        t[6] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::unmount(&staging).map_err(|e| anyhow!("{e}"))?;
        t[7] = ms(clock.elapsed());
    } else {
        let clock = Instant::now();
        std::fs::File::create(&target)?;
        mount::bind(&dev.path(), &target, &none).map_err(|e| anyhow!("{e}"))?;
        t[5] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::unmount(&target).map_err(|e| anyhow!("{e}"))?;
        std::fs::remove_file(&target)?;
        t[6] = ms(clock.elapsed());
    }
    let clock = Instant::now();
    dev.detach().map_err(|e| anyhow!("{e}"))?;
    t[8] = ms(clock.elapsed());
    let clock = Instant::now();
    std::fs::remove_file(&image)?;
    fsync_dir(dir)?;
    t[9] = ms(clock.elapsed());
    std::fs::remove_dir(&pod)?;
    if spec.kind.is_fs() {
        std::fs::remove_dir(&staging)?;
    }
    Ok(t)
}

/// The same lifecycles as `driver_lifecycle`, with the kernel and tool steps run directly on
/// `concurrency` threads.
pub(crate) fn direct_lifecycle(
    tools: &Tools,
    spec: LifecycleSpec,
    dir: &Path,
) -> Result<LifecycleResult> {
    std::fs::create_dir_all(dir)?;
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let per_volume: Vec<[f64; 10]> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..spec.concurrency)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<[f64; 10]>> {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= spec.volumes {
                            return Ok(mine);
                        }
                        mine.push(direct_one(tools, spec, dir, i)?);
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            let mine = worker
                .join()
                .map_err(|_| anyhow!("a direct lifecycle thread panicked"))??;
            all.extend(mine);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let wall = started.elapsed().as_secs_f64();
    let rpcs = RPC_STEPS
        .iter()
        .map(|steps| {
            let sums: Vec<f64> = per_volume
                .iter()
                .map(|t| steps.iter().map(|&s| t[s]).sum())
                .collect();
            summarize(&sums)
        })
        .collect();
    let steps = (0..STEPS.len())
        .map(|s| summarize(&per_volume.iter().map(|t| t[s]).collect::<Vec<_>>()))
        .collect();
    std::fs::remove_dir_all(dir)?;
    Ok(LifecycleResult {
        kind: spec.kind,
        thick: spec.thick,
        concurrency: spec.concurrency,
        path: LifecyclePath::Direct,
        volumes: spec.volumes,
        wall_s: wall,
        volumes_per_s: spec.volumes as f64 / wall,
        rpcs,
        steps,
    })
}

/// What the attach and detach steps cost through losetup and through the library's one ioctl.
pub(crate) fn tool_step_costs(
    tools: &Tools,
    dir: &Path,
    samples: usize,
    bytes: u64,
) -> Result<Vec<ToolStep>> {
    std::fs::create_dir_all(dir)?;
    let image = dir.join("tool.img");
    std::fs::File::create(&image)?.set_len(bytes)?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 5];
    for _ in 0..samples {
        let clock = Instant::now();
        let dev = tools.losetup_attach(&image, true)?;
        times[0].push(ms(clock.elapsed()));
        let clock = Instant::now();
        tools.losetup_detach(&dev)?;
        times[1].push(ms(clock.elapsed()));
        let clock = Instant::now();
        let dev = attach_direct(&image)?;
        times[2].push(ms(clock.elapsed()));
        let clock = Instant::now();
        tools.blkid_probe(&dev.path())?;
        times[4].push(ms(clock.elapsed()));
        let clock = Instant::now();
        dev.detach().map_err(|e| anyhow!("{e}"))?;
        times[3].push(ms(clock.elapsed()));
    }
    std::fs::remove_dir_all(dir)?;
    let names = [
        "losetup --find --show --direct-io=on --sector-size 4096",
        "losetup -d",
        "loopcsi::host::loopdev::attach (one LOOP_CONFIGURE)",
        "LoopDevice::detach (LOOP_CLR_FD)",
        "blkid -p of a blank device (what the driver's probe costs when it runs)",
    ];
    Ok(names
        .iter()
        .zip(times)
        .map(|(name, t)| ToolStep {
            step: (*name).to_string(),
            summary: summarize(&t),
        })
        .collect())
}
