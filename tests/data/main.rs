//! Data services against real loop devices, file systems and pools (run as root): online
//! expansion, snapshots (consistent while written), restores, clones, and volume health.
//!
//! Snapshot and clone tests run on two pools of their own: an xfs pool with reflink (the copy
//! shares extents) and an ext4 pool (the copy falls back to copying data extents).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod expansion;
mod expansion_refusals;
mod group;
mod health;
mod reclone;
mod snapshot_rpcs;
mod snapshots;

use std::hash::Hasher;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use loopcsi::csi;
use tonic::Code;

// ---- recognisable data ----

/// Unit of every pattern and of the writers' writes.
const CHUNK: usize = 64 << 10;

/// One 64 KiB chunk: a header naming its slot and generation, then pseudo-random words derived
/// from (seed, slot, generation), so a torn, stale or misplaced chunk is told apart.
fn chunk(seed: u64, slot: u64, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK);
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let mut x = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ slot.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ generation.wrapping_mul(0x94D0_49BB_1331_11EB))
        | 1;
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// `bytes` (a multiple of 64 KiB) of pattern `seed`.
fn pattern(seed: u64, bytes: usize) -> Vec<u8> {
    assert_eq!(bytes % CHUNK, 0);
    (0..(bytes / CHUNK) as u64)
        .flat_map(|slot| chunk(seed, slot, 0))
        .collect()
}

/// A checksum of `data` (SipHash over 64 KiB pieces and the length).
fn checksum(data: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for piece in data.chunks(CHUNK) {
        hasher.write(piece);
    }
    hasher.write_u64(data.len() as u64);
    hasher.finish()
}

fn file_checksum(path: &Path) -> u64 {
    checksum(&std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

/// Writes `data` to a new file and makes it durable; returns its checksum.
fn write_synced(path: &Path, data: &[u8]) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(data).unwrap();
    file.sync_all().unwrap();
    checksum(data)
}

/// What a ring writer's file holds after `written` chunks: slot s holds the chunk of the last
/// pass that reached it.
fn ring_image(seed: u64, slots: u64, written: u64) -> Vec<u8> {
    (0..written.min(slots))
        .flat_map(|slot| chunk(seed, slot, (written - 1 - slot) / slots))
        .collect()
}

/// The number of chunks a ring writer had written when its file looked like `data`, if `data`
/// is exactly such a state (no torn, stale or reordered chunk).
fn ring_state(data: &[u8], seed: u64, slots: u64) -> Option<u64> {
    if !data.len().is_multiple_of(CHUNK) {
        return None;
    }
    let n = (data.len() / CHUNK) as u64;
    if n == 0 {
        return Some(0);
    }
    let generation = |slot: u64| {
        let at = slot as usize * CHUNK + 8;
        u64::from_le_bytes(data[at..at + 8].try_into().unwrap())
    };
    let first = generation(0);
    let leading = (0..n).take_while(|&s| generation(s) == first).count() as u64;
    let written = if n < slots {
        n
    } else if leading == n {
        (first + 1) * slots
    } else {
        first * slots + leading
    };
    (data == ring_image(seed, slots, written).as_slice()).then_some(written)
}

/// A bound on waiting for an event that must happen (never a sleep): turns a hang, such as a
/// file system left frozen, into a failure that says so.
const LIVENESS: Duration = Duration::from_secs(120);

/// A thread that keeps writing 64 KiB chunks round a ring of `slots` slots in one file (so it
/// never fills the volume), with an fsync every 16 chunks, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    progress: mpsc::Receiver<u64>,
    thread: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
}

impl Writer {
    /// Starts writing and returns once the first chunk is written.
    fn start(path: &Path, seed: u64, slots: u64) -> Self {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, progress) = mpsc::sync_channel(1);
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut written = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let slot = written % slots;
                file.write_all_at(&chunk(seed, slot, written / slots), slot * CHUNK as u64)?;
                written += 1;
                if written.is_multiple_of(16) {
                    file.sync_data()?;
                }
                let _ = tx.try_send(written);
            }
            file.sync_all()?;
            Ok(written)
        });
        let writer = Writer {
            stop,
            progress,
            thread: Some(thread),
        };
        writer.assert_progress("it started");
        writer
    }

    /// Asserts the writer completes a write after this call (so its file system is not frozen).
    #[track_caller]
    fn assert_progress(&self, after: &str) {
        while self.progress.try_recv().is_ok() {}
        if let Err(e) = self.progress.recv_timeout(LIVENESS) {
            panic!("the writer made no progress after {after} ({e:?}): is the file system still frozen, or did a write fail?");
        }
    }

    /// Stops the writer; returns how many chunks it wrote.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("the writer thread")
            .expect("every write of the writer succeeds")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Only reached with the thread still running when the test panicked: let it stop.
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- RPC shorthands ----

fn snapshot_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: id.into(),
            },
        )),
    }
}

fn volume_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.into(),
            },
        )),
    }
}

fn from_source(
    mut req: csi::CreateVolumeRequest,
    source: csi::VolumeContentSource,
) -> csi::CreateVolumeRequest {
    req.volume_content_source = Some(source);
    req
}

fn random_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn create_snapshot(
    d: &mut TestDriver,
    name: &str,
    source: &str,
) -> Result<csi::Snapshot, tonic::Status> {
    d.controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .map(|r| {
            r.into_inner()
                .snapshot
                .expect("CreateSnapshot returns a snapshot")
        })
}

async fn get_snapshot(d: &mut TestDriver, id: &str) -> Result<csi::Snapshot, tonic::Status> {
    d.controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })
        .await
        .map(|r| {
            r.into_inner()
                .snapshot
                .expect("GetSnapshot returns a snapshot")
        })
}

async fn delete_snapshot(d: &mut TestDriver, id: &str) -> Result<(), tonic::Status> {
    d.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn list_snapshots(
    d: &mut TestDriver,
    req: csi::ListSnapshotsRequest,
) -> Result<csi::ListSnapshotsResponse, tonic::Status> {
    d.controller
        .list_snapshots(req)
        .await
        .map(|r| r.into_inner())
}

/// The snapshot ids a ListSnapshots answers (one page), sorted.
async fn listed_ids(d: &mut TestDriver, req: csi::ListSnapshotsRequest) -> Vec<String> {
    let reply = list_snapshots(d, req).await.unwrap();
    assert!(reply.next_token.is_empty(), "one page: {reply:?}");
    let mut ids: Vec<String> = reply
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect();
    ids.sort();
    ids
}

/// A NodeExpandVolumeRequest for `id` at `path`; `range` is (required_bytes, limit_bytes).
fn expand_req(id: &str, path: &Path, range: Option<(i64, i64)>) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: range.map(|(required_bytes, limit_bytes)| csi::CapacityRange {
            required_bytes,
            limit_bytes,
        }),
        ..Default::default()
    }
}

async fn node_expand(
    d: &mut TestDriver,
    req: csi::NodeExpandVolumeRequest,
) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
    d.node.node_expand_volume(req).await.map(|r| r.into_inner())
}

/// The whole expansion of `id`, on the node, at `path` (where it is staged or published), as
/// the kubelet asks for it: NodeExpandVolume with the new capacity_range.
async fn expand(
    d: &mut TestDriver,
    id: &str,
    path: &Path,
    required_bytes: i64,
    limit_bytes: i64,
) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
    node_expand(d, expand_req(id, path, Some((required_bytes, limit_bytes)))).await
}

/// ControllerGetVolume's condition of a volume.
async fn condition(d: &mut TestDriver, id: &str) -> csi::VolumeCondition {
    let reply = d
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.volume.as_ref().unwrap().volume_id, id);
    reply
        .status
        .expect("ControllerGetVolume has a status")
        .volume_condition
        .expect("ControllerGetVolume reports the volume condition")
}

#[track_caller]
fn assert_abnormal(condition: &csi::VolumeCondition, needle: &str) {
    assert!(condition.abnormal, "abnormal expected: {condition:?}");
    assert!(
        condition.message.contains(needle),
        "the condition message {:?} does not mention {needle:?}",
        condition.message
    );
}

/// NodeGetVolumeStats' BYTES total at `path`.
async fn bytes_total(d: &mut TestDriver, id: &str, path: &Path) -> i64 {
    d.stats(id, path)
        .await
        .unwrap()
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .expect("a BYTES usage")
        .total
}

/// Stages at a staging dir and publishes at a target named after `tag`.
async fn mount_volume(
    d: &mut TestDriver,
    id: &str,
    tag: &str,
    cap: &csi::VolumeCapability,
) -> (PathBuf, PathBuf) {
    let staging = d.staging(tag);
    let target = d.target(tag);
    d.stage(id, &staging, cap.clone())
        .await
        .unwrap_or_else(|e| panic!("stage {tag}: {e:?}"));
    d.publish(id, &staging, &target, cap.clone(), false)
        .await
        .unwrap_or_else(|e| panic!("publish {tag}: {e:?}"));
    (staging, target)
}

async fn unmount_volume(d: &mut TestDriver, id: &str, staging: &Path, target: &Path) {
    d.unpublish(id, target).await.unwrap();
    d.unstage(id, staging).await.unwrap();
}

// ---- host facts ----

/// BLKGETSIZE64 of a block device node (through `blockdev`).
fn device_size(path: &Path) -> i64 {
    let out = Command::new("blockdev")
        .arg("--getsize64")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "blockdev {}: {out:?}", path.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn allocated(path: &Path) -> i64 {
    i64::try_from(std::fs::metadata(path).unwrap().blocks() * 512).unwrap()
}

/// Free bytes of the pool's file system, after flushing everything.
fn pool_free(d: &TestDriver) -> i64 {
    nix::unistd::sync();
    let st = nix::sys::statvfs::statvfs(&d.state_dir().join("volumes")).unwrap();
    i64::try_from(st.blocks_available() * st.fragment_size()).unwrap()
}

fn snapshot_image(d: &TestDriver, id: &str) -> PathBuf {
    d.state_dir().join("snapshots").join(format!("{id}.img"))
}

fn assert_reflink_pool(d: &TestDriver) {
    let out = Command::new("xfs_info")
        .arg(d.state_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("reflink=1"),
        "the xfs pool must have reflink: {text}"
    );
}

/// An ext4 image copied from a mounted file system is what a freeze leaves: the journal
/// flushed and `needs_recovery` cleared (a copy of a live, unfrozen mount keeps it set), and a
/// full read-only check finds nothing to fix.
#[track_caller]
fn assert_frozen_copy(image: &Path) {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&out.stdout);
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("dumpe2fs -h {}: {out:?}", image.display()));
    assert!(
        !features.contains("needs_recovery"),
        "{} was not copied from a frozen file system: {features}",
        image.display()
    );
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {} exited {:?}: the copy is not a consistent file system\n{}{}",
        image.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}
