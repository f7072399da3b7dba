//! The `stall` section: how long an application's writes wait while its live volume is
//! snapshotted on a pool that cannot share extents (the --pool-dir file system when it is ext4).
//!
//! For each volume size: a thin ext4 volume is staged and filled with data; an application
//! thread does 4 KiB writes, each followed by fdatasync, into a 64 MiB file on it, and the
//! longest write (write + fdatasync) is recorded during each phase:
//! - baseline: no copy, for as long as the snapshot below takes;
//! - frozen copy: the behaviour before the snapshot stall work (freeze, copy all, flush, thaw),
//!   done by hand on the same image;
//! - CreateSnapshot: the driver as it is (copy while the writer runs, catch up, freeze, a last
//!   comparison bounded by --max-freeze-ms, thaw), over gRPC.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use loopcsi::csi;
use serde::Serialize;

use crate::driver::{InProcDriver, VolKind};
use crate::writer::Writer;
use crate::*;

/// One volume size's figures.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct StallResult {
    pub(crate) volume_bytes: u64,
    pub(crate) data_bytes: u64,
    pub(crate) reflink: bool,
    pub(crate) baseline_ms: f64,
    pub(crate) frozen_copy_s: f64,
    pub(crate) frozen_copy_stall_ms: f64,
    pub(crate) snapshot_s: f64,
    pub(crate) snapshot_stall_ms: f64,
    /// Set when CreateSnapshot failed (e.g. the freeze limit): its message.
    pub(crate) snapshot_error: Option<String>,
}

/// Runs the section: one in-process driver with its pool in the scratch dir (on --pool-dir).
pub(crate) async fn stall_section(
    settings: &Settings,
    scratch: &Scratch,
    log: &Progress,
) -> Result<Vec<StallResult>> {
    let state = scratch.path("stall-state");
    let mut driver = InProcDriver::start(&scratch.socket("stall"), &state).await?;
    let mut results = Vec::new();
    for (i, &(volume, data)) in settings.stall_volumes.iter().enumerate() {
        log.say(format!(
            "stall: {} MiB volume with {} MiB of data",
            volume / MIB,
            data / MIB
        ));
        let result = one_size(&driver, scratch, &state, i, volume, data).await;
        match result {
            Ok(r) => results.push(r),
            Err(err) => {
                driver.stop().await?;
                return Err(err);
            }
        }
    }
    driver.stop().await?;
    Ok(results)
}

async fn one_size(
    driver: &InProcDriver,
    scratch: &Scratch,
    state: &Path,
    index: usize,
    volume: u64,
    data: u64,
) -> Result<StallResult> {
    let c = &driver.clients;
    let id = c
        .create(&format!("stall-{index}"), volume, VolKind::Ext4, false)
        .await?;
    let staging = scratch.path(&format!("stall-staging-{index}"));
    std::fs::create_dir_all(&staging)?;
    c.stage(&id, &staging, VolKind::Ext4).await?;
    fill(&staging.join("fill"), data)?;
    let image = state.join("volumes").join(format!("{id}.img"));
    let writer = Writer::start(staging.join("app"), 64 * MIB, 4096 * 17);
    writer.phase_max_ms().await?;

    let frozen_copy = scratch.path(&format!("stall-frozen-copy-{index}.img"));
    let started = Instant::now();
    let fs = std::fs::File::open(&staging)?;
    loopcsi::host::loopdev::freeze_fs(&fs)?;
    let copied = loopcsi::host::files::copy_sparse(&image, &frozen_copy, volume, volume);
    loopcsi::host::loopdev::thaw_fs(&fs)?;
    drop(fs);
    let frozen_copy_s = started.elapsed().as_secs_f64();
    let frozen_copy_stall_ms = writer.phase_max_ms().await?;
    std::fs::remove_file(&frozen_copy)?;
    copied?;

    let started = Instant::now();
    let snapshot =
        c.0.controller
            .clone()
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: format!("stall-snap-{index}"),
                ..Default::default()
            })
            .await;
    let snapshot_s = started.elapsed().as_secs_f64();
    let snapshot_stall_ms = writer.phase_max_ms().await?;

    // The baseline lasts as long as the snapshot did.
    tokio::time::sleep(Duration::from_secs_f64(snapshot_s.max(1.0))).await;
    let baseline_ms = writer.phase_max_ms().await?;
    writer.finish()?;

    let snapshot_error = match snapshot {
        Ok(reply) => {
            if let Some(snap) = reply.into_inner().snapshot {
                c.0.controller
                    .clone()
                    .delete_snapshot(csi::DeleteSnapshotRequest {
                        snapshot_id: snap.snapshot_id,
                        ..Default::default()
                    })
                    .await
                    .context("DeleteSnapshot")?;
            }
            None
        }
        Err(status) => Some(format!("{:?}: {}", status.code(), status.message())),
    };
    c.unstage(&id, &staging).await?;
    c.delete(&id).await?;
    Ok(StallResult {
        volume_bytes: volume,
        data_bytes: data,
        reflink: loopcsi::host::files::reflinks(state),
        baseline_ms,
        frozen_copy_s,
        frozen_copy_stall_ms,
        snapshot_s,
        snapshot_stall_ms,
        snapshot_error,
    })
}

/// `bytes` of incompressible-enough data in a file, flushed.
fn fill(path: &Path, bytes: u64) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let chunk: Vec<u8> = (0..(8 * MIB as u32)).map(|i| (i % 251) as u8).collect();
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// The section's rows of the report.
pub(crate) fn render_stall(out: &mut String, results: &[StallResult]) {
    use std::fmt::Write;
    let _ = writeln!(out, "\n## Snapshot write stall\n");
    let _ = writeln!(
        out,
        "| volume / data | pool reflinks | baseline longest write | frozen copy: time / longest write | CreateSnapshot: time / longest write |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- |");
    for r in results {
        let snapshot = match &r.snapshot_error {
            None => format!("{:.2} s / **{:.0} ms**", r.snapshot_s, r.snapshot_stall_ms),
            Some(err) => format!(
                "refused after {:.2} s, longest write **{:.0} ms** ({err})",
                r.snapshot_s, r.snapshot_stall_ms
            ),
        };
        let _ = writeln!(
            out,
            "| {} MiB / {} MiB | {} | {:.0} ms | {:.2} s / **{:.0} ms** | {snapshot} |",
            r.volume_bytes / MIB,
            r.data_bytes / MIB,
            if r.reflink { "yes" } else { "no" },
            r.baseline_ms,
            r.frozen_copy_s,
            r.frozen_copy_stall_ms,
        );
    }
}
