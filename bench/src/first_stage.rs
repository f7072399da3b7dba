//! Section 2, first stage: the first NodeStageVolume of fresh volumes beside the same steps
//! by hand.

use std::path::Path;
use std::time::Instant;

use crate::args::*;
use crate::data::*;
use crate::driver::*;
use crate::provision::*;
use crate::scratch::*;
use crate::stats::*;
use crate::tools::*;
use crate::*;
use anyhow::{anyhow, Context, Result};
use loopcsi::host::mount;

/// The first NodeStageVolume of fresh thin ext4 volumes of `bytes`, each beside the same
/// steps done by hand (attach, mkfs, mount) on a file of the same size in the same pool. The
/// two halves of a pair run back to back and take turns going first, so the per-pair ratio is
/// steady even where the disk's speed swings between runs.
pub(crate) async fn first_stage_pairs(
    tools: &Tools,
    scratch: &Scratch,
    pool: PoolKind,
    bytes: u64,
    samples: usize,
) -> Result<FirstStageResult> {
    let label = format!("first-{}-{}", pool.name(), bytes / MIB);
    let root = scratch.path(&label);
    match pool {
        PoolKind::Disk => std::fs::create_dir_all(&root)?,
        // Sparse: only the file systems' metadata is really written.
        PoolKind::Ram => mount_tmpfs(&root, 2 * bytes + 4 * GIB)?,
    }
    let filesystem = filesystem_of(&root);
    let co = root.join("co");
    std::fs::create_dir_all(&co)?;
    let mut driver = InProcDriver::start(&scratch.socket(&label), &root.join("state")).await?;
    let clients = driver.clients.clone();
    let (mut creates, mut stages, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut attach, mut mkfs, mut mount_ms, mut mkfs_mount) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut note = String::new();
    for i in 0..samples {
        let mut driver_stage = None;
        let mut direct = None;
        for half in 0..2 {
            if (half + i) % 2 == 0 {
                if note.is_empty() {
                    match driver_first_stage(&clients, &co, i, bytes).await? {
                        Ok((create, stage)) => {
                            creates.push(create);
                            driver_stage = Some(stage);
                        }
                        Err(why) => note = why,
                    }
                }
            } else {
                // Blocking work (mkfs, mount): off the runtime the in-process driver serves on.
                let (tools, root) = (tools.clone(), root.clone());
                direct = Some(
                    tokio::task::spawn_blocking(move || {
                        direct_first_stage(&tools, &root, i, bytes)
                    })
                    .await
                    .context("direct first-stage task")??,
                );
            }
        }
        let (a, m, n) = direct.context("the direct half of a pair did not run")?;
        attach.push(a);
        mkfs.push(m);
        mount_ms.push(n);
        mkfs_mount.push(m + n);
        if let Some(stage) = driver_stage {
            stages.push(stage);
            ratios.push(stage / (m + n));
        }
    }
    driver.stop().await?;
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    let summary = |v: &Vec<f64>| (!v.is_empty()).then(|| summarize(v));
    Ok(FirstStageResult {
        pool,
        filesystem,
        size_mib: bytes / MIB,
        driver_create: summary(&creates),
        driver_stage: summary(&stages),
        driver_note: note,
        direct_attach: summarize(&attach),
        direct_mkfs: summarize(&mkfs),
        direct_mount: summarize(&mount_ms),
        direct_mkfs_mount: summarize(&mkfs_mount),
        ratio_to_mkfs_mount: summary(&ratios),
    })
}

/// One fresh volume through the driver: CreateVolume and NodeStageVolume timed (ms), then
/// unstaged and deleted. `Err` (the inner one) with the reason when CreateVolume is refused.
pub(crate) async fn driver_first_stage(
    clients: &Clients,
    co: &Path,
    i: usize,
    bytes: u64,
) -> Result<std::result::Result<(f64, f64), String>> {
    let name = format!("bench-first-{i}");
    let clock = Instant::now();
    let id = match clients
        .create_raw(&name, bytes, VolKind::Ext4, false)
        .await?
    {
        Ok(id) => id,
        Err(status) => {
            return Ok(Err(format!(
                "CreateVolume refused: {:?}: {}",
                status.code(),
                status.message()
            )))
        }
    };
    let create = ms(clock.elapsed());
    let staging = co.join(&name);
    std::fs::create_dir_all(&staging)?;
    let clock = Instant::now();
    clients.stage(&id, &staging, VolKind::Ext4).await?;
    let stage = ms(clock.elapsed());
    clients.unstage(&id, &staging).await?;
    clients.delete(&id).await?;
    Ok(Ok((create, stage)))
}

/// The same steps by hand on a fresh sparse file: attach, mkfs and mount timed (ms), then
/// unmounted, detached and removed.
pub(crate) fn direct_first_stage(
    tools: &Tools,
    root: &Path,
    i: usize,
    bytes: u64,
) -> Result<(f64, f64, f64)> {
    let image = root.join(format!("direct-{i}.img"));
    let mount_point = root.join(format!("direct-{i}.mnt"));
    std::fs::create_dir_all(&mount_point)?;
    create_image(&image, bytes, false)?;
    let clock = Instant::now();
    let dev = attach_direct(&image)?;
    let attach = ms(clock.elapsed());
    let clock = Instant::now();
    tools.mkfs(VolKind::Ext4, &dev.path())?;
    let mkfs = ms(clock.elapsed());
    let clock = Instant::now();
    mount::mount_device(
        &dev.path(),
        &mount_point,
        "ext4",
        &mount::MountOptions::default(),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let mounted = ms(clock.elapsed());
    mount::unmount(&mount_point).map_err(|e| anyhow!("{e}"))?;
    dev.detach().map_err(|e| anyhow!("{e}"))?;
    std::fs::remove_file(&image)?;
    std::fs::remove_dir(&mount_point)?;
    Ok((attach, mkfs, mounted))
}
