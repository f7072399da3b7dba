//! Section `cbt`: changed-block tracking. A thin block volume (100 GiB; smoke: 1 GiB) on an
//! xfs pool with reflink, made on a tmpfs-backed image so the figure is steady: 1 MiB of data
//! every 100 MiB, snapshot A, then 1 % of the volume's 4 KiB blocks rewritten at random,
//! snapshot B. Timed: GetMetadataDelta A→B with every range streamed to the client (the
//! target: under 1 s), and GetMetadataAllocated of A. The volume's image is written directly
//! (the loop device would write the same file); the driver never sees the writes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::args::*;
use crate::data::*;
use crate::driver::*;
use crate::scratch::*;
use crate::*;
use loopcsi::csi;
use loopcsi_testkit::MetadataClient;

const BLOCK: u64 = 4096;
/// Timed runs of each RPC.
const RUNS: usize = 3;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct CbtResult {
    pub(crate) volume_gib: u64,
    pub(crate) pool: String,
    pub(crate) base_bytes: u64,
    pub(crate) changed_blocks: u64,
    pub(crate) delta_ranges: usize,
    pub(crate) delta_bytes: u64,
    /// The delta names exactly the rewritten blocks (no more, no fewer).
    pub(crate) exact: bool,
    pub(crate) delta_s: Vec<f64>,
    pub(crate) allocated_ranges: usize,
    pub(crate) allocated_s: Vec<f64>,
}

/// A tmpfs, an xfs image with reflink on it, mounted as the driver's state dir.
fn xfs_pool(root: &Path, image_bytes: u64) -> Result<std::path::PathBuf> {
    mount_tmpfs(root, image_bytes + GIB)?;
    let image = root.join("pool.img");
    std::fs::File::create(&image)?.set_len(image_bytes)?;
    let mkfs = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "reflink=1", "-s", "size=4096"])
        .arg(&image)
        .status()
        .context("running mkfs.xfs")?;
    if !mkfs.success() {
        bail!("mkfs.xfs of the cbt pool failed: {mkfs}");
    }
    let dev = loopcsi::host::loopdev::attach(
        &image,
        loopcsi::host::loopdev::AttachOptions {
            direct_io: false,
            read_only: false,
        },
    )?;
    let state = root.join("state");
    std::fs::create_dir_all(&state)?;
    nix::mount::mount(
        Some(&dev.path()),
        &state,
        Some("xfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting the cbt pool")?;
    Ok(state)
}

/// 1 MiB of data every 100 MiB (at least one piece).
fn write_base(image: &Path, bytes: u64) -> Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    let piece = vec![0xA5u8; MIB as usize];
    let mut written = 0;
    let mut at = 0;
    while at + MIB <= bytes {
        f.write_all_at(&piece, at)?;
        written += MIB;
        at += 100 * MIB;
    }
    f.sync_all()?;
    Ok(written)
}

/// Rewrites 1 % of the 4 KiB blocks, chosen at random (distinct); returns them, sorted.
fn change_blocks(image: &Path, bytes: u64) -> Result<Vec<u64>> {
    let blocks = bytes / BLOCK;
    let want = (blocks / 100).max(1);
    let mut chosen = std::collections::BTreeSet::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while (chosen.len() as u64) < want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chosen.insert(x % blocks);
    }
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    let mut buf = vec![0u8; BLOCK as usize];
    for &b in &chosen {
        buf[..8].copy_from_slice(&b.to_le_bytes());
        buf[8..16].copy_from_slice(&x.to_le_bytes());
        f.write_all_at(&buf, b * BLOCK)?;
    }
    f.sync_all()?;
    Ok(chosen.into_iter().collect())
}

async fn snapshot(clients: &Clients, name: &str, source: &str) -> Result<String> {
    let reply = clients
        .0
        .controller
        .clone()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CreateSnapshot {name}"))?;
    Ok(reply
        .into_inner()
        .snapshot
        .context("CreateSnapshot returned no snapshot")?
        .snapshot_id)
}

pub(crate) async fn cbt_section(
    settings: &Settings,
    scratch: &Scratch,
    log: &Progress,
) -> Result<CbtResult> {
    let bytes = settings.cbt_volume_gib * GIB;
    let root = scratch.path("cbt");
    let state = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || xfs_pool(&root, bytes + 8 * GIB)).await??
    };
    let socket = scratch.socket("cbt");
    let mut driver = InProcDriver::start(&socket, &state).await?;
    let result = measure(&driver.clients, &socket, &state, bytes, log).await;
    driver.stop().await?;
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    result
}

async fn measure(
    clients: &Clients,
    socket: &Path,
    state: &Path,
    bytes: u64,
    log: &Progress,
) -> Result<CbtResult> {
    let id = match clients
        .create_raw("bench-cbt", bytes, VolKind::Block, false)
        .await?
    {
        Ok(id) => id,
        Err(status) => bail!("CreateVolume of the cbt volume: {status:?}"),
    };
    let image = state.join("volumes").join(format!("{id}.img"));
    let base_bytes = write_base(&image, bytes)?;
    let a = snapshot(clients, "bench-cbt-a", &id).await?;
    log.say(format!(
        "cbt: {} GiB volume, rewriting 1 % of its blocks",
        bytes / GIB
    ));
    let changed = {
        let image = image.clone();
        tokio::task::spawn_blocking(move || change_blocks(&image, bytes)).await??
    };
    let b = snapshot(clients, "bench-cbt-b", &id).await?;
    let md = MetadataClient::connect(socket).await?;
    let (mut delta_s, mut allocated_s) = (Vec::new(), Vec::new());
    let mut delta = None;
    let mut allocated = None;
    for _ in 0..RUNS {
        let clock = Instant::now();
        let d = md.delta(&a, &b, 0, 0).await.context("GetMetadataDelta")?;
        delta_s.push(clock.elapsed().as_secs_f64());
        delta = Some(d);
        let clock = Instant::now();
        let r = md
            .allocated(&a, 0, 0)
            .await
            .context("GetMetadataAllocated")?;
        allocated_s.push(clock.elapsed().as_secs_f64());
        allocated = Some(r);
    }
    let delta = delta.context("no delta run")?;
    let allocated = allocated.context("no allocated run")?;
    let delta_bytes: u64 = delta.ranges.iter().map(|r| r.1.unsigned_abs()).sum();
    let covered = changed.iter().all(|&blk| {
        let at = i64::try_from(blk * BLOCK).unwrap_or(i64::MAX);
        let i = delta.ranges.partition_point(|r| r.0 + r.1 <= at);
        delta.ranges.get(i).is_some_and(|r| r.0 <= at)
    });
    Ok(CbtResult {
        volume_gib: bytes / GIB,
        pool: "xfs (reflink=1) on a loop device over a tmpfs file".into(),
        base_bytes,
        changed_blocks: changed.len() as u64,
        delta_ranges: delta.ranges.len(),
        delta_bytes,
        exact: covered && delta_bytes == changed.len() as u64 * BLOCK,
        delta_s,
        allocated_ranges: allocated.ranges.len(),
        allocated_s,
    })
}
