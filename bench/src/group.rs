//! Section "group": the longest write stall an application sees while a group snapshot of
//! four of its volumes is taken, on an xfs pool with reflink (an xfs image on a tmpfs, so the
//! pool's disk does not blur the figure). Each volume is a mounted ext4 with a writer doing
//! 4 KiB writes, each followed by fdatasync; a write's latency includes any freeze it waited
//! for. Measured without snapshots first (the baseline), then around each group snapshot.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use loopcsi::csi;
use loopcsi::csi::group_controller_client::GroupControllerClient;
use serde::Serialize;

use crate::args::Settings;
use crate::data::mount_tmpfs;
use crate::driver::{InProcDriver, VolKind};
use crate::provision::attach_direct;
use crate::scratch::Scratch;
use crate::writer::Writer;
use crate::{Progress, MIB};

/// Volumes in the group (the target: 4).
const MEMBERS: usize = 4;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct GroupResult {
    pub(crate) members: usize,
    pub(crate) volume_mib: u64,
    pub(crate) rounds: usize,
    /// The longest single write (write + fdatasync) of any writer with no snapshot running.
    pub(crate) baseline_max_ms: f64,
    /// The longest single write of any writer across every group snapshot.
    pub(crate) longest_stall_ms: f64,
    /// Each CreateVolumeGroupSnapshot, end to end.
    pub(crate) rpc_ms: Vec<f64>,
}

/// An xfs file system with reflink on a sparse image in a tmpfs, mounted at `root/state`.
fn reflink_pool(root: &Path, mib: u64) -> Result<PathBuf> {
    mount_tmpfs(root, (mib + 64) * MIB)?;
    let image = root.join("pool.img");
    std::fs::File::create(&image)?.set_len(mib * MIB)?;
    let status = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "reflink=1", "-s", "size=4096"])
        .arg(&image)
        .status()
        .context("running mkfs.xfs")?;
    if !status.success() {
        return Err(anyhow!("mkfs.xfs of the group pool: {status}"));
    }
    let dev = attach_direct(&image)?;
    let state = root.join("state");
    std::fs::create_dir_all(&state)?;
    nix::mount::mount(
        Some(&dev.path()),
        &state,
        Some("xfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting the group pool")?;
    Ok(state)
}

/// The four volumes, staged and published: (id, staging, target).
async fn make_volumes(
    clients: &crate::driver::Clients,
    root: &Path,
    volume_mib: u64,
) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let mut volumes = Vec::new();
    for i in 0..MEMBERS {
        let name = format!("group-{i}");
        let id = clients
            .create(&name, volume_mib * MIB, VolKind::Ext4, false)
            .await?;
        let staging = root.join(format!("{i}-staging"));
        let target = root.join(format!("{i}-target"));
        std::fs::create_dir_all(&staging)?;
        clients.stage(&id, &staging, VolKind::Ext4).await?;
        clients
            .publish(&id, &staging, &target, VolKind::Ext4)
            .await?;
        volumes.push((id, staging, target));
    }
    Ok(volumes)
}

/// One group snapshot of `ids` (deleted again): its RPC time and the longest write meanwhile.
async fn one_round(
    groups: &mut GroupControllerClient<tonic::transport::Channel>,
    writers: &[Writer],
    ids: &[String],
    round: usize,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    let group = groups
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: format!("bench-group-{round}"),
            source_volume_ids: ids.to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("CreateVolumeGroupSnapshot: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .group_snapshot
        .ok_or_else(|| anyhow!("CreateVolumeGroupSnapshot returned no group"))?;
    let rpc_ms = started.elapsed().as_secs_f64() * 1e3;
    for w in writers {
        w.wait_writes(2).await?;
    }
    let longest = writers.iter().map(Writer::take_max_ms).fold(0.0, f64::max);
    groups
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id,
            snapshot_ids: group.snapshots.into_iter().map(|s| s.snapshot_id).collect(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("DeleteVolumeGroupSnapshot: {:?}: {}", s.code(), s.message()))?;
    Ok((rpc_ms, longest))
}

pub(crate) async fn group_section(
    settings: &Settings,
    scratch: &Scratch,
    log: &Progress,
) -> Result<GroupResult> {
    let volume_mib = if settings.smoke { 64 } else { 256 };
    let root = scratch.path("group");
    let state = reflink_pool(&root, MEMBERS as u64 * volume_mib + 512)?;
    let socket = scratch.socket("group");
    let mut driver = InProcDriver::start(&socket, &state).await?;
    let mut groups = GroupControllerClient::new(loopcsi_testkit::connect(socket.clone()).await);
    let clients = driver.clients.clone();
    let volumes = make_volumes(&clients, &root, volume_mib).await?;
    let writers: Vec<Writer> = volumes
        .iter()
        .map(|(_, _, target)| Writer::start(target.join("app.bin"), 16 * MIB, 4096))
        .collect();
    for w in &writers {
        w.wait_writes(200).await?;
    }
    let baseline = writers.iter().map(Writer::take_max_ms).fold(0.0, f64::max);
    let ids: Vec<String> = volumes.iter().map(|(id, _, _)| id.clone()).collect();
    let (mut longest, mut rpc_ms) = (0.0f64, Vec::new());
    for round in 0..settings.rounds {
        let (rpc, stall) = one_round(&mut groups, &writers, &ids, round).await?;
        rpc_ms.push(rpc);
        longest = longest.max(stall);
        log.say(format!("group round {round}: longest write {stall:.1} ms"));
    }
    for w in writers {
        w.finish()?;
    }
    for (id, staging, target) in &volumes {
        clients.unpublish(id, target).await?;
        clients.unstage(id, staging).await?;
        clients.delete(id).await?;
    }
    driver.stop().await?;
    Ok(GroupResult {
        members: MEMBERS,
        volume_mib,
        rounds: settings.rounds,
        baseline_max_ms: baseline,
        longest_stall_ms: longest,
        rpc_ms,
    })
}

/// The target: the longest write stall under a group snapshot of four volumes < 100 ms.
pub(crate) fn check_group(g: &GroupResult) -> crate::report::TargetCheck {
    crate::report::TargetCheck {
        target: format!(
            "group snapshot of {} volumes on an xfs-reflink pool: longest write stall < 100 ms",
            g.members
        ),
        measured: format!(
            "{:.1} ms over {} round(s) (no snapshot: {:.1} ms)",
            g.longest_stall_ms, g.rounds, g.baseline_max_ms
        ),
        met: Some(g.longest_stall_ms < 100.0),
    }
}

pub(crate) fn render_group(out: &mut String, g: &GroupResult) {
    use std::fmt::Write;
    let _ = writeln!(out, "## Group snapshot write stall\n");
    let _ = writeln!(
        out,
        "{} mounted ext4 volumes of {} MiB on an xfs pool with reflink (an image on a tmpfs), \
         each with a writer doing 4 KiB writes + fdatasync; CreateVolumeGroupSnapshot of all \
         four, {} round(s).\n",
        g.members, g.volume_mib, g.rounds
    );
    let _ = writeln!(out, "| | ms |\n| --- | --- |");
    let _ = writeln!(
        out,
        "| longest write, no snapshot | {:.1} |",
        g.baseline_max_ms
    );
    let _ = writeln!(
        out,
        "| longest write, any group snapshot | {:.1} |",
        g.longest_stall_ms
    );
    let mut rpc = g.rpc_ms.clone();
    rpc.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (rpc.first(), rpc.last()) {
        let _ = writeln!(
            out,
            "| CreateVolumeGroupSnapshot, min–max | {min:.1}–{max:.1} |\n"
        );
    }
}
