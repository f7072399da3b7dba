//! Data services against real loop devices, file systems and pools (run as root): online
//! expansion, snapshots (consistent while written), restores, clones, and volume health.
//!
//! Snapshot and clone tests run on two pools of their own: an xfs pool with reflink (the copy
//! shares extents) and an ext4 pool (the copy falls back to copying data extents).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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

/// Whether this process may grow a mounted ext4 (CAP_SYS_RESOURCE in its effective set).
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff in /proc/self/status")
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << CAP_SYS_RESOURCE) != 0
}

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

// ---- expansion ----
//
// Expansion is all NodeExpandVolume's, on the node that holds the volume: it grows the backing
// file to capacity_range, the loop device, and the file system at volume_path. The controller
// does not advertise EXPAND_VOLUME (in a node-local deployment the cluster's one resizer could
// not reach the other nodes' pools).

/// The length of a volume's backing file.
fn image_len(d: &TestDriver, id: &str) -> i64 {
    i64::try_from(std::fs::metadata(d.image_path(id)).unwrap().len()).unwrap()
}

/// The size ListVolumes reports for `id` (what the driver recorded).
async fn recorded_size(d: &mut TestDriver, id: &str) -> i64 {
    d.list_all()
        .await
        .into_iter()
        .find(|v| v.volume_id == id)
        .unwrap_or_else(|| panic!("{id} is listed"))
        .capacity_bytes
}

/// statvfs' total bytes of the file system mounted at `path`.
fn fs_total(path: &Path) -> i64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    i64::try_from(st.blocks() * st.fragment_size()).unwrap()
}

/// Asserts the volume, its backing file and (when attached) its loop device all have `size`.
#[track_caller]
fn assert_sizes(d: &TestDriver, id: &str, size: i64, after: &str) {
    assert_eq!(image_len(d, id), size, "backing file after {after}");
    if let Some(dev) = d.loop_device_of(id) {
        assert_eq!(device_size(&dev.path()), size, "loop device after {after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_expands_online_while_written() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("xfs", snw());
    let vol = d
        .create(create_req("grow-xfs", 300 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let (staging, target) = mount_volume(&mut d, &id, "grow-xfs", &cap).await;
    let before = bytes_total(&mut d, &id, &target).await;
    let kept = write_synced(&target.join("kept.bin"), &pattern(3, 4 << 20));

    let writer = Writer::start(&target.join("live.bin"), 11, 256);
    let grown = expand(&mut d, &id, &target, 400 * MIB, 0).await.unwrap();
    assert_eq!(grown.capacity_bytes, 400 * MIB);
    writer.assert_progress("the expansion");
    assert_sizes(&d, &id, 400 * MIB, "the expansion");
    assert_eq!(recorded_size(&mut d, &id).await, 400 * MIB);
    let after = bytes_total(&mut d, &id, &target).await;
    assert!(
        (before + 99 * MIB..=400 * MIB).contains(&after),
        "statvfs total {after} after growing from {before}"
    );
    assert_eq!(fs_total(&target), after);
    assert_eq!(fs_total(&staging), after);

    // Nothing to do, OK with the current size: a repeat, a smaller required_bytes, a range the
    // volume is within, and no capacity_range at all (just grow the file system to the device,
    // here at the staging path, where the file system is too).
    for (what, req) in [
        ("a repeat", expand_req(&id, &target, Some((400 * MIB, 0)))),
        (
            "a smaller required_bytes",
            expand_req(&id, &target, Some((350 * MIB, 0))),
        ),
        (
            "a range the volume is within",
            expand_req(&id, &target, Some((0, 500 * MIB))),
        ),
        (
            "no capacity_range, at the staging path",
            expand_req(&id, &staging, None),
        ),
    ] {
        let again = node_expand(&mut d, req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(again.capacity_bytes, 400 * MIB, "{what}");
        assert_sizes(&d, &id, 400 * MIB, what);
        assert_eq!(bytes_total(&mut d, &id, &target).await, after, "{what}");
    }

    // Shrinking is refused and changes nothing.
    assert_code(
        expand(&mut d, &id, &target, 300 * MIB, 300 * MIB).await,
        Code::OutOfRange,
        "shrinking",
    );
    assert_sizes(&d, &id, 400 * MIB, "a refused shrink");
    writer.assert_progress("a refused shrink");

    let written = writer.finish();
    assert_eq!(
        file_checksum(&target.join("live.bin")),
        checksum(&ring_image(11, 256, written)),
        "the writer's data is intact after {written} chunks"
    );
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);
    assert_eq!(recorded_size(&mut d, &id).await, 400 * MIB);

    unmount_volume(&mut d, &id, &staging, &target).await;
    // The new size survives a re-stage.
    let (staging, target) = mount_volume(&mut d, &id, "grow-xfs", &cap).await;
    assert_sizes(&d, &id, 400 * MIB, "a re-stage");
    assert_eq!(bytes_total(&mut d, &id, &target).await, after);
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);
    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// Staged but not published (the kubelet's NodeExpandVolume at the staging path): the whole
/// expansion still happens, rounded up to a whole MiB as CreateVolume rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_expands_while_staged_not_published() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("xfs", snw());
    let vol = d
        .create(create_req("grow-staged", 300 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let staging = d.staging("grow-staged");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let kept = write_synced(&staging.join("kept.bin"), &pattern(4, 4 << 20));
    let before = bytes_total(&mut d, &id, &staging).await;

    // Its target is not where the volume is (yet): NOT_FOUND, nothing grown.
    let target = d.target("grow-staged");
    assert_code(
        expand(&mut d, &id, &target, 400 * MIB, 0).await,
        Code::NotFound,
        &id,
    );
    assert_sizes(
        &d,
        &id,
        300 * MIB,
        "NodeExpandVolume at an unpublished target",
    );

    let grown = expand(&mut d, &id, &staging, 350 * MIB + 1, 0)
        .await
        .unwrap();
    assert_eq!(grown.capacity_bytes, 351 * MIB, "rounded up to a whole MiB");
    assert_sizes(&d, &id, 351 * MIB, "the expansion");
    assert_eq!(recorded_size(&mut d, &id).await, 351 * MIB);
    let after = bytes_total(&mut d, &id, &staging).await;
    assert!(
        (before + 50 * MIB..=351 * MIB).contains(&after),
        "statvfs total {after} after growing from {before}"
    );
    assert_eq!(fs_total(&staging), after);

    // Published afterwards, the pod sees the grown file system and the data.
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(bytes_total(&mut d, &id, &target).await, after);
    assert_eq!(fs_total(&target), after);
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);
    // And a repeat at the target is OK with the size.
    let again = expand(&mut d, &id, &target, 350 * MIB + 1, 0)
        .await
        .unwrap();
    assert_eq!(again.capacity_bytes, 351 * MIB);
    assert_eq!(bytes_total(&mut d, &id, &target).await, after);

    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_errors() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let vol = d
        .create(create_req("grow-errors", 32 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let idle = d
        .create(create_req("grow-idle", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "grow-errors", &cap).await;

    // The controller does not expand: EXPAND_VOLUME is the node's.
    assert_code(
        d.controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 64 * MIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        "ControllerExpandVolume",
    );
    assert_sizes(&d, &id, 32 * MIB, "ControllerExpandVolume");

    // Required fields.
    assert_code(
        node_expand(&mut d, expand_req("", &target, Some((64 * MIB, 0)))).await,
        Code::InvalidArgument,
        "volume_id",
    );
    assert_code(
        node_expand(&mut d, expand_req(&id, Path::new(""), Some((64 * MIB, 0)))).await,
        Code::InvalidArgument,
        "volume_path",
    );
    // Unknown volume.
    let unknown = random_id();
    assert_code(
        expand(&mut d, &unknown, &target, 64 * MIB, 0).await,
        Code::NotFound,
        &unknown,
    );
    // A path where this volume is not: NOT_FOUND, and nothing is grown.
    let elsewhere = d.staging("not-the-volume");
    assert_code(
        expand(&mut d, &id, &elsewhere, 64 * MIB, 0).await,
        Code::NotFound,
        &id,
    );
    // Another volume's path.
    assert_code(
        expand(&mut d, &idle, &target, 64 * MIB, 0).await,
        Code::NotFound,
        &idle,
    );
    // A volume staged nowhere (this node does not hold it live): NOT_FOUND, not grown.
    let idle_staging = d.staging("grow-idle");
    assert_code(
        expand(&mut d, &idle, &idle_staging, 64 * MIB, 0).await,
        Code::NotFound,
        &idle,
    );
    assert_sizes(
        &d,
        &idle,
        32 * MIB,
        "NodeExpandVolume of an unstaged volume",
    );
    // Negative sizes.
    assert_code(
        expand(&mut d, &id, &target, -1, 0).await,
        Code::InvalidArgument,
        "capacity_range.required_bytes",
    );
    assert_code(
        expand(&mut d, &id, &target, 64 * MIB, -1).await,
        Code::InvalidArgument,
        "capacity_range.limit_bytes",
    );
    // A limit under required_bytes.
    assert_code(
        expand(&mut d, &id, &target, 64 * MIB, 48 * MIB).await,
        Code::OutOfRange,
        "limit_bytes",
    );
    // Shrinking.
    assert_code(
        expand(&mut d, &id, &target, 16 * MIB, 16 * MIB).await,
        Code::OutOfRange,
        "shrinking",
    );
    assert_code(
        expand(&mut d, &id, &target, 0, 16 * MIB).await,
        Code::OutOfRange,
        "shrinking",
    );
    // More than the pool has free.
    let too_much = (pool_free(&d) / MIB + 1024) * MIB;
    assert_code(
        expand(&mut d, &id, &target, too_much, 0).await,
        Code::ResourceExhausted,
        "available",
    );
    // A capability of another kind of volume, or of another file system, or none at all.
    let mut malformed = cap.clone();
    malformed.access_type = None;
    for (what, wrong) in [
        ("block", block_cap(snw())),
        ("xfs", mount_cap("xfs", snw())),
        ("no access type", malformed),
    ] {
        let mut req = expand_req(&id, &target, Some((64 * MIB, 0)));
        req.volume_capability = Some(wrong);
        let result = node_expand(&mut d, req).await;
        assert!(
            matches!(&result, Err(s) if s.code() == Code::InvalidArgument && s.message().contains("volume_capability")),
            "a {what} capability: {result:?}"
        );
    }
    assert_sizes(&d, &id, 32 * MIB, "the refused requests");
    assert_eq!(recorded_size(&mut d, &id).await, 32 * MIB);
    assert_eq!(
        device_size(&d.loop_device_of(&id).unwrap().path()),
        32 * MIB
    );

    // The right capability, and a range the volume is within: OK (nothing to grow).
    let mut req = expand_req(&id, &target, Some((32 * MIB, 0)));
    req.volume_capability = Some(cap.clone());
    assert_eq!(
        node_expand(&mut d, req).await.unwrap().capacity_bytes,
        32 * MIB
    );
    let mut req = expand_req(&id, &staging, Some((0, 0)));
    req.volume_capability = Some(mount_cap("", snw()));
    assert_eq!(
        node_expand(&mut d, req).await.unwrap().capacity_bytes,
        32 * MIB
    );
    assert_sizes(&d, &id, 32 * MIB, "requests within the size");

    unmount_volume(&mut d, &id, &staging, &target).await;
    // Unstaged now: the paths it had are no longer where it is.
    assert_code(
        expand(&mut d, &id, &staging, 64 * MIB, 0).await,
        Code::NotFound,
        &id,
    );
    assert_sizes(&d, &id, 32 * MIB, "NodeExpandVolume after unstage");
    d.delete(&id).await.unwrap();
    d.delete(&idle).await.unwrap();
    d.assert_clean();
}

/// Thick volumes stay fully allocated (and thin ones sparse) through expansions, each on a new
/// attachment: the size also survives an unstage and a re-stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thick_volume_stays_fully_allocated_after_expansion() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());
    let thick = d
        .create(with_params(
            create_req("grow-thick", 16 * MIB, cap.clone()),
            &[("provisioning", "thick")],
        ))
        .await
        .unwrap()
        .volume_id;
    let thin = d
        .create(create_req("grow-thin", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    assert!(allocated(&d.image_path(&thick)) >= 16 * MIB);

    let mut previous = 16 * MIB;
    for size in [32 * MIB, 48 * MIB] {
        for (tag, vol) in [("thick", &thick), ("thin", &thin)] {
            let (staging, target) = mount_volume(&mut d, vol, tag, &cap).await;
            assert_eq!(device_size(&target), previous, "{tag} attached again");
            let grown = expand(&mut d, vol, &target, size, 0).await.unwrap();
            assert_eq!(grown.capacity_bytes, size);
            assert_sizes(&d, vol, size, tag);
            assert_eq!(device_size(&target), size, "{tag} at its target");
            unmount_volume(&mut d, vol, &staging, &target).await;
        }
        assert!(
            allocated(&d.image_path(&thick)) >= size,
            "a thick volume stays fully allocated: {} of {size}",
            allocated(&d.image_path(&thick))
        );
        assert!(
            allocated(&d.image_path(&thin)) < 4 * MIB,
            "a thin volume stays sparse: {}",
            allocated(&d.image_path(&thin))
        );
        previous = size;
    }
    d.delete(&thick).await.unwrap();
    d.delete(&thin).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_expands_while_published() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());
    let vol = d
        .create(create_req("grow-block", 16 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let (staging, target) = mount_volume(&mut d, &id, "grow-block", &cap).await;
    let data = pattern(5, 1 << 20);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.write_all(&data).unwrap();
        dev.sync_all().unwrap();
    }
    assert_eq!(device_size(&target), 16 * MIB);

    let grown = expand(&mut d, &id, &target, 48 * MIB, 0).await.unwrap();
    assert_eq!(grown.capacity_bytes, 48 * MIB);
    assert_eq!(
        device_size(&target),
        48 * MIB,
        "the device at the target has the new size"
    );
    assert_sizes(&d, &id, 48 * MIB, "the expansion");
    let dev = d.loop_device_of(&id).unwrap();
    let sectors: i64 = std::fs::read_to_string(format!("/sys/block/loop{}/size", dev.0))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(sectors * 512, 48 * MIB);
    assert_eq!(bytes_total(&mut d, &id, &target).await, 48 * MIB);
    assert_eq!(recorded_size(&mut d, &id).await, 48 * MIB);
    // Repeats, with and without a capacity_range: OK, nothing changes.
    for req in [
        expand_req(&id, &target, Some((48 * MIB, 0))),
        expand_req(&id, &target, None),
    ] {
        assert_eq!(
            node_expand(&mut d, req).await.unwrap().capacity_bytes,
            48 * MIB
        );
        assert_eq!(device_size(&target), 48 * MIB);
    }
    assert_code(
        expand(&mut d, &id, &target, 32 * MIB, 32 * MIB).await,
        Code::OutOfRange,
        "shrinking",
    );
    assert_eq!(device_size(&target), 48 * MIB);

    let tail = pattern(6, 1 << 20);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(46 << 20)).unwrap();
        dev.write_all(&tail).unwrap();
        dev.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.read_exact(&mut back).unwrap();
        assert!(back == data, "data before the expansion is intact");
        dev.seek(SeekFrom::Start(46 << 20)).unwrap();
        dev.read_exact(&mut back).unwrap();
        assert!(back == tail, "the new range is usable");
    }
    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// ext4 grows online only with CAP_SYS_RESOURCE. Without it NodeExpandVolume is
/// FAILED_PRECONDITION naming the capability, yet the volume, its file and its loop device are
/// grown and recorded, and the next stage grows the file system offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_online_expansion_succeeds_or_names_cap_sys_resource() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let vol = d
        .create(create_req("grow-ext4", 64 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let (staging, target) = mount_volume(&mut d, &id, "grow-ext4", &cap).await;
    let kept = write_synced(&target.join("kept.bin"), &pattern(8, 4 << 20));
    let before = bytes_total(&mut d, &id, &target).await;

    let result = expand(&mut d, &id, &target, 96 * MIB, 0).await;
    if has_cap_sys_resource() {
        eprintln!("CAP_SYS_RESOURCE held: expecting an online ext4 grow");
        assert_eq!(result.unwrap().capacity_bytes, 96 * MIB);
        let after = bytes_total(&mut d, &id, &target).await;
        assert!(
            after >= before + 24 * MIB,
            "statvfs total {after} after growing from {before}"
        );
    } else {
        eprintln!("CAP_SYS_RESOURCE not held: expecting FAILED_PRECONDITION naming it");
        assert_code(result, Code::FailedPrecondition, "CAP_SYS_RESOURCE");
        assert_eq!(
            bytes_total(&mut d, &id, &target).await,
            before,
            "the refused online grow leaves the file system as it was"
        );
        assert_eq!(fs_total(&target), before);
        // Retries (the kubelet's), with the range or without one (grow the file system to the
        // device), try the file system again and get the same answer.
        for req in [
            expand_req(&id, &target, Some((96 * MIB, 0))),
            expand_req(&id, &staging, None),
        ] {
            assert_code(
                node_expand(&mut d, req).await,
                Code::FailedPrecondition,
                "CAP_SYS_RESOURCE",
            );
        }
        assert_eq!(fs_total(&target), before);
    }
    // Either way the volume, its backing file and its loop device have the new size.
    assert_sizes(&d, &id, 96 * MIB, "NodeExpandVolume");
    assert_eq!(recorded_size(&mut d, &id).await, 96 * MIB);
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);

    // Unpublish, unstage, stage again: the file system has the grown size (grown offline at
    // stage when the online grow was refused).
    unmount_volume(&mut d, &id, &staging, &target).await;
    let (staging, target) = mount_volume(&mut d, &id, "grow-ext4", &cap).await;
    assert_sizes(&d, &id, 96 * MIB, "a re-stage");
    let after = bytes_total(&mut d, &id, &target).await;
    assert!(
        (before + 24 * MIB..=96 * MIB).contains(&after),
        "statvfs total {after} after the re-stage, grown from {before}"
    );
    assert_eq!(fs_total(&target), after);
    assert_eq!(fs_total(&staging), after);
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);
    // Grown: a repeat has nothing left to do, even without CAP_SYS_RESOURCE.
    let again = expand(&mut d, &id, &target, 96 * MIB, 0).await.unwrap();
    assert_eq!(again.capacity_bytes, 96 * MIB);
    assert_eq!(bytes_total(&mut d, &id, &target).await, after);
    unmount_volume(&mut d, &id, &staging, &target).await;

    // The offline grow left a consistent file system.
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(d.image_path(&id))
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn after the expansion exited {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// A snapshot and a clone of an ext4 volume whose online grow was refused (file and device
/// grown, file system not yet) are as large as the volume, so their file systems must be grown
/// at their first stage too, as the source's is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn copies_of_a_volume_with_a_pending_grow_are_grown_at_stage() {
    if has_cap_sys_resource() {
        eprintln!("CAP_SYS_RESOURCE held: the online grow succeeds, nothing is left pending");
        return;
    }
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("pending", 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "pending", &cap).await;
    let before = bytes_total(&mut d, &id, &target).await;
    assert_code(
        expand(&mut d, &id, &target, 96 * MIB, 0).await,
        Code::FailedPrecondition,
        "CAP_SYS_RESOURCE",
    );
    let snap = create_snapshot(&mut d, "pending-snap", &id).await.unwrap();
    assert_eq!(snap.size_bytes, 96 * MIB);
    let restored = d
        .create(from_source(
            create_req("pending-restore", 96 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap()
        .volume_id;
    let clone = d
        .create(from_source(
            create_req("pending-clone", 96 * MIB, cap.clone()),
            volume_source(&id),
        ))
        .await
        .unwrap()
        .volume_id;
    unmount_volume(&mut d, &id, &staging, &target).await;
    for (tag, vol) in [
        ("the source", &id),
        ("the restore", &restored),
        ("the clone", &clone),
    ] {
        let (staging, target) = mount_volume(&mut d, vol, "pending-copy", &cap).await;
        let total = bytes_total(&mut d, vol, &target).await;
        unmount_volume(&mut d, vol, &staging, &target).await;
        assert!(
            total >= before + 24 * MIB,
            "{tag}'s file system is {total} bytes at stage, not grown from {before} to its 96 MiB"
        );
    }
    for vol in [&restored, &clone, &id] {
        d.delete(vol).await.unwrap();
    }
    delete_snapshot(&mut d, &snap.snapshot_id).await.unwrap();
    d.assert_clean();
}

// ---- snapshots, restores, clones ----

/// On a pool of `pool_fs`: a snapshot and a clone of a published ext4 volume taken while a
/// writer writes are consistent file systems; restores (same size, larger, after the source is
/// deleted) and the clone hold the data.
async fn snapshot_restore_and_clone(pool_fs: &str) {
    const SLOTS: u64 = 128; // an 8 MiB ring
    let mut d = TestDriver::start_on_small_pool(pool_fs, 1024).await;
    if pool_fs == "xfs" {
        assert_reflink_pool(&d);
    }
    let cap = mount_cap("ext4", snw());
    let src = d
        .create(create_req("src", 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (src_staging, src_target) = mount_volume(&mut d, &src, "src", &cap).await;
    let pre = write_synced(&src_target.join("pre.bin"), &pattern(1, 16 << 20));
    let src_total = bytes_total(&mut d, &src, &src_target).await;

    let writer = Writer::start(&src_target.join("live.bin"), 2, SLOTS);
    let asked_at = unix_now();
    let snap = create_snapshot(&mut d, "snap-a", &src).await.unwrap();
    writer.assert_progress("CreateSnapshot (the source must be thawed)");
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 64 * MIB, "the source's capacity");
    assert_eq!(snap.source_volume_id, src);
    let created = snap.creation_time.expect("creation_time is set");
    assert!(
        (asked_at - 1..=unix_now() + 1).contains(&created.seconds),
        "creation_time {created:?} is when the snapshot was taken"
    );
    assert!((0..1_000_000_000).contains(&created.nanos));

    // A clone while the writer writes: the source is frozen for the copy.
    let clone = d
        .create(from_source(
            create_req("clone", 64 * MIB, cap.clone()),
            volume_source(&src),
        ))
        .await
        .unwrap();
    writer.assert_progress("the clone (the source must be thawed)");
    assert_eq!(clone.capacity_bytes, 64 * MIB);
    assert_eq!(clone.content_source, Some(volume_source(&src)));
    let written = writer.finish();
    assert_eq!(
        file_checksum(&src_target.join("live.bin")),
        checksum(&ring_image(2, SLOTS, written)),
        "the source's writer data is intact"
    );

    // Both copies were taken frozen and are consistent file systems.
    assert_frozen_copy(&snapshot_image(&d, &snap.snapshot_id));
    assert_frozen_copy(&d.image_path(&clone.volume_id));

    // Restores: same size, larger; smaller and other kinds are refused.
    let same = d
        .create(from_source(
            create_req("restore-same", 64 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap();
    assert_eq!(same.capacity_bytes, 64 * MIB);
    assert_eq!(
        same.content_source,
        Some(snapshot_source(&snap.snapshot_id))
    );
    let again = d
        .create(from_source(
            create_req("restore-same", 64 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap();
    assert_eq!(again.volume_id, same.volume_id, "idempotent by name");
    let big = d
        .create(from_source(
            create_req("restore-big", 96 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap();
    assert_eq!(big.capacity_bytes, 96 * MIB);
    let mut small = from_source(
        create_req("restore-small", 32 * MIB, cap.clone()),
        snapshot_source(&snap.snapshot_id),
    );
    small.capacity_range.as_mut().unwrap().limit_bytes = 32 * MIB;
    assert_code(d.create(small).await, Code::OutOfRange, "limit_bytes");
    assert_code(
        d.create(from_source(
            create_req("restore-xfs", 300 * MIB, mount_cap("xfs", snw())),
            snapshot_source(&snap.snapshot_id),
        ))
        .await,
        Code::InvalidArgument,
        "volume_content_source",
    );
    assert_code(
        d.create(from_source(
            create_req("restore-block", 64 * MIB, block_cap(snw())),
            snapshot_source(&snap.snapshot_id),
        ))
        .await,
        Code::InvalidArgument,
        "volume_content_source",
    );

    // The source goes away; its snapshot does not.
    unmount_volume(&mut d, &src, &src_staging, &src_target).await;
    d.delete(&src).await.unwrap();
    assert_eq!(
        get_snapshot(&mut d, &snap.snapshot_id)
            .await
            .unwrap()
            .snapshot_id,
        snap.snapshot_id
    );
    let after = d
        .create(from_source(
            create_req("restore-after", 64 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .expect("a snapshot restores after its source was deleted");

    let mut snap_state = None;
    for (vol, tag) in [
        (&same, "restore-same"),
        (&big, "restore-big"),
        (&after, "restore-after"),
        (&clone, "clone"),
    ] {
        let (staging, target) = mount_volume(&mut d, &vol.volume_id, tag, &cap).await;
        assert_eq!(
            file_checksum(&target.join("pre.bin")),
            pre,
            "{tag}: the data written before the copy"
        );
        let live = std::fs::read(target.join("live.bin")).unwrap();
        let state = ring_state(&live, 2, SLOTS)
            .unwrap_or_else(|| panic!("{tag}: live.bin is not a state the writer went through"));
        assert!(
            (1..=written).contains(&state),
            "{tag}: {state} of {written}"
        );
        if tag == "clone" {
            assert!(
                snap_state.is_some_and(|s| state >= s),
                "the clone was taken after the snapshot"
            );
        } else {
            assert!(
                snap_state.is_none_or(|s| s == state),
                "{tag}: every restore of one snapshot is the same"
            );
            snap_state = Some(state);
        }
        let total = bytes_total(&mut d, &vol.volume_id, &target).await;
        if tag == "restore-big" {
            assert!(
                (src_total + 24 * MIB..=96 * MIB).contains(&total),
                "{tag}: statvfs total {total} must show the larger size (source {src_total})"
            );
        } else {
            assert_eq!(total, src_total, "{tag}: the source's size");
        }
        // The copy is a volume of its own: writable.
        write_synced(&target.join("own.bin"), &pattern(9, 1 << 20));
        unmount_volume(&mut d, &vol.volume_id, &staging, &target).await;
        d.delete(&vol.volume_id).await.unwrap();
    }

    delete_snapshot(&mut d, &snap.snapshot_id).await.unwrap();
    delete_snapshot(&mut d, &snap.snapshot_id).await.unwrap();
    assert!(!snapshot_image(&d, &snap.snapshot_id).exists());
    assert!(d.list_all().await.is_empty());
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_clone_on_xfs_reflink_pool() {
    snapshot_restore_and_clone("xfs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_clone_on_ext4_pool() {
    snapshot_restore_and_clone("ext4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rpcs_idempotency_listing_and_deletion() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());
    let a = d
        .create(create_req("snap-src-a", 8 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let b = d
        .create(create_req("snap-src-b", 8 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;

    let s1 = create_snapshot(&mut d, "s1", &a).await.unwrap();
    assert!(s1.ready_to_use);
    assert_eq!(s1.size_bytes, 8 * MIB);
    let again = create_snapshot(&mut d, "s1", &a).await.unwrap();
    assert_eq!(again, s1, "idempotent by name: the same snapshot");
    assert_code(
        create_snapshot(&mut d, "s1", &b).await,
        Code::AlreadyExists,
        "s1",
    );
    let unknown = random_id();
    assert_code(
        create_snapshot(&mut d, "s-unknown", &unknown).await,
        Code::NotFound,
        &unknown,
    );
    assert_code(
        create_snapshot(&mut d, "s-bogus", "vol-1").await,
        Code::NotFound,
        "vol-1",
    );
    assert_code(
        create_snapshot(&mut d, "", &a).await,
        Code::InvalidArgument,
        "name",
    );
    assert_code(
        create_snapshot(&mut d, "s-empty", "").await,
        Code::InvalidArgument,
        "source_volume_id",
    );

    assert_eq!(get_snapshot(&mut d, &s1.snapshot_id).await.unwrap(), s1);
    assert_code(
        get_snapshot(&mut d, &unknown).await,
        Code::NotFound,
        &unknown,
    );

    let s2 = create_snapshot(&mut d, "s2", &a).await.unwrap();
    let s3 = create_snapshot(&mut d, "s3", &b).await.unwrap();
    let mut all = vec![
        s1.snapshot_id.clone(),
        s2.snapshot_id.clone(),
        s3.snapshot_id.clone(),
    ];
    all.sort();
    assert_eq!(
        listed_ids(&mut d, csi::ListSnapshotsRequest::default()).await,
        all
    );
    assert_eq!(
        listed_ids(
            &mut d,
            csi::ListSnapshotsRequest {
                snapshot_id: s2.snapshot_id.clone(),
                ..Default::default()
            }
        )
        .await,
        vec![s2.snapshot_id.clone()]
    );
    let mut of_a = vec![s1.snapshot_id.clone(), s2.snapshot_id.clone()];
    of_a.sort();
    assert_eq!(
        listed_ids(
            &mut d,
            csi::ListSnapshotsRequest {
                source_volume_id: a.clone(),
                ..Default::default()
            }
        )
        .await,
        of_a
    );
    assert_eq!(
        listed_ids(
            &mut d,
            csi::ListSnapshotsRequest {
                source_volume_id: b.clone(),
                ..Default::default()
            }
        )
        .await,
        vec![s3.snapshot_id.clone()]
    );
    // Both filters: s3 is not a snapshot of a.
    assert!(listed_ids(
        &mut d,
        csi::ListSnapshotsRequest {
            snapshot_id: s3.snapshot_id.clone(),
            source_volume_id: a.clone(),
            ..Default::default()
        }
    )
    .await
    .is_empty());
    // Ids that are not ours match nothing.
    for req in [
        csi::ListSnapshotsRequest {
            snapshot_id: unknown.clone(),
            ..Default::default()
        },
        csi::ListSnapshotsRequest {
            snapshot_id: "snap-1".into(),
            ..Default::default()
        },
        csi::ListSnapshotsRequest {
            source_volume_id: unknown.clone(),
            ..Default::default()
        },
        csi::ListSnapshotsRequest {
            source_volume_id: "vol-1".into(),
            ..Default::default()
        },
    ] {
        assert!(listed_ids(&mut d, req).await.is_empty());
    }

    // Paging, one at a time.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = list_snapshots(
            &mut d,
            csi::ListSnapshotsRequest {
                max_entries: 1,
                starting_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(page.entries.len(), 1, "{page:?}");
        paged.push(
            page.entries[0]
                .snapshot
                .as_ref()
                .unwrap()
                .snapshot_id
                .clone(),
        );
        if page.next_token.is_empty() {
            break;
        }
        assert!(paged.len() < 3, "a token after the last page");
        token = page.next_token;
    }
    paged.sort();
    assert_eq!(paged, all);
    assert_code(
        list_snapshots(
            &mut d,
            csi::ListSnapshotsRequest {
                starting_token: "bogus-token".into(),
                ..Default::default()
            },
        )
        .await,
        Code::Aborted,
        "bogus-token",
    );
    assert_code(
        list_snapshots(
            &mut d,
            csi::ListSnapshotsRequest {
                max_entries: -1,
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "max_entries",
    );

    // Deletion: OK, idempotent, unknown is OK.
    delete_snapshot(&mut d, &s1.snapshot_id).await.unwrap();
    assert!(!snapshot_image(&d, &s1.snapshot_id).exists());
    delete_snapshot(&mut d, &s1.snapshot_id).await.unwrap();
    assert_code(
        get_snapshot(&mut d, &s1.snapshot_id).await,
        Code::NotFound,
        &s1.snapshot_id,
    );
    delete_snapshot(&mut d, &unknown).await.unwrap();
    delete_snapshot(&mut d, "snap-1").await.unwrap();
    assert_code(
        delete_snapshot(&mut d, "").await,
        Code::InvalidArgument,
        "snapshot_id",
    );
    // The name is free again, for any source.
    let reused = create_snapshot(&mut d, "s1", &b).await.unwrap();
    assert_ne!(reused.snapshot_id, s1.snapshot_id);

    for id in [&reused.snapshot_id, &s2.snapshot_id, &s3.snapshot_id] {
        delete_snapshot(&mut d, id).await.unwrap();
    }
    assert!(listed_ids(&mut d, csi::ListSnapshotsRequest::default())
        .await
        .is_empty());
    d.delete(&a).await.unwrap();
    d.delete(&b).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_sparse_thin_volume_stays_sparse() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("sparse", 256 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "sparse", &cap).await;
    let data = write_synced(&target.join("small.bin"), &pattern(4, 1 << 20));
    let snap = create_snapshot(&mut d, "sparse-snap", &id).await.unwrap();
    let image = snapshot_image(&d, &snap.snapshot_id);
    let size = i64::try_from(std::fs::metadata(&image).unwrap().len()).unwrap();
    assert_eq!(size, 256 * MIB);
    assert!(
        allocated(&image) < size / 8,
        "the snapshot of a thin volume is sparse: {} of {size} bytes allocated",
        allocated(&image)
    );
    assert!(
        allocated(&image) <= allocated(&d.image_path(&id)) + MIB,
        "the snapshot allocates no more than its source"
    );
    // And the restore of it too.
    let restored = d
        .create(from_source(
            create_req("sparse-restore", 256 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap()
        .volume_id;
    assert!(allocated(&d.image_path(&restored)) < size / 8);
    unmount_volume(&mut d, &id, &staging, &target).await;
    let (staging, target) = mount_volume(&mut d, &restored, "sparse-restore", &cap).await;
    assert_eq!(file_checksum(&target.join("small.bin")), data);
    unmount_volume(&mut d, &restored, &staging, &target).await;
    d.delete(&restored).await.unwrap();
    d.delete(&id).await.unwrap();
    delete_snapshot(&mut d, &snap.snapshot_id).await.unwrap();
    d.assert_clean();
}

/// Snapshots a 256 MiB ext4 volume holding 64 MiB of data on a pool of `pool_fs`; returns the
/// pool's free-space drop, the source image's allocation, and the time CreateSnapshot took.
async fn snapshot_space_and_time(pool_fs: &str) -> (i64, i64, Duration) {
    let mut d = TestDriver::start_on_small_pool(pool_fs, 1024).await;
    if pool_fs == "xfs" {
        assert_reflink_pool(&d);
    }
    // No background inode-table zeroing, so the source's allocation holds still.
    let cap = mount_cap_flags("ext4", snw(), &["noinit_itable"]);
    let id = d
        .create(create_req("bench", 256 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "bench", &cap).await;
    let sum = write_synced(&target.join("data.bin"), &pattern(12, 64 << 20));
    let source_allocated = allocated(&d.image_path(&id));
    assert!(source_allocated >= 64 * MIB);

    let free_before = pool_free(&d);
    let started = Instant::now();
    let snap = create_snapshot(&mut d, "bench-snap", &id).await.unwrap();
    let took = started.elapsed();
    let drop = free_before - pool_free(&d);

    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    let restored = d
        .create(from_source(
            create_req("bench-restore", 256 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &restored, "bench-restore", &cap).await;
    assert_eq!(file_checksum(&target.join("data.bin")), sum);
    unmount_volume(&mut d, &restored, &staging, &target).await;
    d.delete(&restored).await.unwrap();
    delete_snapshot(&mut d, &snap.snapshot_id).await.unwrap();
    d.assert_clean();
    (drop, source_allocated, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_shares_extents_on_reflink_pool_and_copies_on_ext4_pool() {
    let (xfs_drop, xfs_source, xfs_time) = snapshot_space_and_time("xfs").await;
    let (ext4_drop, ext4_source, ext4_time) = snapshot_space_and_time("ext4").await;
    eprintln!(
        "snapshot of a 256 MiB volume with 64 MiB of data: reflink pool (xfs) {xfs_time:?}, \
         pool free space -{} KiB; copy pool (ext4) {ext4_time:?}, pool free space -{} KiB",
        xfs_drop >> 10,
        ext4_drop >> 10
    );
    assert!(
        xfs_drop < 8 * MIB,
        "on a reflink pool the snapshot shares the source's {xfs_source} bytes: free space dropped {xfs_drop}"
    );
    assert!(
        (64 * MIB..=ext4_source + 8 * MIB).contains(&ext4_drop),
        "on an ext4 pool the snapshot copies the source's {ext4_source} data bytes: free space dropped {ext4_drop}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_snapshot_restores_to_a_larger_volume_grown_online() {
    let mut d = TestDriver::start_on_small_pool("xfs", 1536).await;
    assert_reflink_pool(&d);
    let cap = mount_cap("xfs", snw());
    let src = d
        .create(create_req("xsrc", 300 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &src, "xsrc", &cap).await;
    let sum = write_synced(&target.join("data.bin"), &pattern(21, 8 << 20));
    let src_total = bytes_total(&mut d, &src, &target).await;
    let snap = create_snapshot(&mut d, "xsnap", &src).await.unwrap();
    assert_eq!(snap.size_bytes, 300 * MIB);
    unmount_volume(&mut d, &src, &staging, &target).await;

    let big = d
        .create(from_source(
            create_req("xbig", 400 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap();
    assert_eq!(big.capacity_bytes, 400 * MIB);
    assert_eq!(big.content_source, Some(snapshot_source(&snap.snapshot_id)));
    let (staging, target) = mount_volume(&mut d, &big.volume_id, "xbig", &cap).await;
    let total = bytes_total(&mut d, &big.volume_id, &target).await;
    assert!(
        (src_total + 99 * MIB..=400 * MIB).contains(&total),
        "the larger xfs restore is grown at stage: statvfs total {total} (source {src_total})"
    );
    assert_eq!(file_checksum(&target.join("data.bin")), sum);
    unmount_volume(&mut d, &big.volume_id, &staging, &target).await;
    // Grown once: a re-stage keeps the size.
    let (staging, target) = mount_volume(&mut d, &big.volume_id, "xbig", &cap).await;
    assert_eq!(bytes_total(&mut d, &big.volume_id, &target).await, total);
    unmount_volume(&mut d, &big.volume_id, &staging, &target).await;

    let mut small = from_source(
        create_req("xsmall", 300 * MIB, cap.clone()),
        snapshot_source(&snap.snapshot_id),
    );
    small.capacity_range.as_mut().unwrap().limit_bytes = 299 * MIB;
    assert_code(d.create(small).await, Code::OutOfRange, "limit_bytes");

    for id in [&big.volume_id, &src] {
        d.delete(id).await.unwrap();
    }
    delete_snapshot(&mut d, &snap.snapshot_id).await.unwrap();
    d.assert_clean();
}

/// A loopcsi volume's copies always live on the node of their source, so a restore or a clone
/// of an xfs volume must mount while the source is mounted (same xfs UUID).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_restore_and_clone_mount_beside_their_mounted_source() {
    let mut d = TestDriver::start_on_small_pool("xfs", 1536).await;
    let cap = mount_cap("xfs", snw());
    let src = d
        .create(create_req("xsrc", 300 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (src_staging, src_target) = mount_volume(&mut d, &src, "xsrc", &cap).await;
    let sum = write_synced(&src_target.join("data.bin"), &pattern(22, 4 << 20));
    let snap = create_snapshot(&mut d, "xsnap", &src).await.unwrap();
    let restored = d
        .create(from_source(
            create_req("xrestore", 300 * MIB, cap.clone()),
            snapshot_source(&snap.snapshot_id),
        ))
        .await
        .unwrap()
        .volume_id;
    let clone = d
        .create(from_source(
            create_req("xclone", 300 * MIB, cap.clone()),
            volume_source(&src),
        ))
        .await
        .unwrap()
        .volume_id;
    let mut failures = Vec::new();
    for (id, tag) in [(&restored, "xrestore"), (&clone, "xclone")] {
        let staging = d.staging(tag);
        let target = d.target(tag);
        match d.stage(id, &staging, cap.clone()).await {
            Ok(()) => {
                d.publish(id, &staging, &target, cap.clone(), false)
                    .await
                    .unwrap();
                assert_eq!(file_checksum(&target.join("data.bin")), sum);
                unmount_volume(&mut d, id, &staging, &target).await;
            }
            Err(status) => {
                failures.push(format!("{tag}: {:?} {}", status.code(), status.message()))
            }
        }
    }
    unmount_volume(&mut d, &src, &src_staging, &src_target).await;
    for id in [&restored, &clone, &src] {
        d.delete(id).await.unwrap();
    }
    delete_snapshot(&mut d, &snap.snapshot_id).await.unwrap();
    d.assert_clean();
    assert!(
        failures.is_empty(),
        "copies of an xfs volume must stage while the source is mounted: {failures:#?}"
    );
}

// ---- health ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_volumes_report_a_normal_condition() {
    let mut d = TestDriver::start().await;
    for (name, cap) in [
        ("healthy-ext4", mount_cap("ext4", snw())),
        ("healthy-block", block_cap(snw())),
    ] {
        let id = d
            .create(create_req(name, 16 * MIB, cap.clone()))
            .await
            .unwrap()
            .volume_id;
        let unstaged = condition(&mut d, &id).await;
        assert!(!unstaged.abnormal, "{name} unstaged: {unstaged:?}");
        let (staging, target) = mount_volume(&mut d, &id, name, &cap).await;
        let staged = condition(&mut d, &id).await;
        assert!(!staged.abnormal, "{name} published: {staged:?}");
        let stats = d.stats(&id, &target).await.unwrap();
        let from_node = stats
            .volume_condition
            .expect("NodeGetVolumeStats reports the volume condition");
        assert!(!from_node.abnormal, "{name}: {from_node:?}");
        unmount_volume(&mut d, &id, &staging, &target).await;
        d.delete(&id).await.unwrap();
    }
    // Mounted read-only on purpose is not a fault.
    let ro = mount_cap_flags("ext4", snw(), &["ro"]);
    let id = d
        .create(create_req("healthy-ro", 16 * MIB, ro.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "healthy-ro", &ro).await;
    let c = condition(&mut d, &id).await;
    assert!(!c.abnormal, "a volume staged with ro: {c:?}");
    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_missing_backing_file_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let truncated = d
        .create(create_req("truncated", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let missing = d
        .create(create_req("missing", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    // Formatted and holding data, then unstaged.
    for id in [&truncated, &missing] {
        let (staging, target) = mount_volume(&mut d, id, id, &cap).await;
        write_synced(&target.join("data.bin"), &pattern(30, 1 << 20));
        unmount_volume(&mut d, id, &staging, &target).await;
    }

    std::fs::OpenOptions::new()
        .write(true)
        .open(d.image_path(&truncated))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert_abnormal(&condition(&mut d, &truncated).await, "truncated");
    std::fs::remove_file(d.image_path(&missing)).unwrap();
    assert_abnormal(&condition(&mut d, &missing).await, "missing");

    // Cleanup: the broken volumes can still be deleted.
    d.delete(&truncated).await.unwrap();
    d.delete(&missing).await.unwrap();
    assert!(d.list_all().await.is_empty());
    d.assert_clean();
}

/// A backing file emptied behind the driver's back would give a loop device without capacity,
/// which the kernel does not list in /proc/partitions (where the driver finds attached devices):
/// stage refuses it with a message naming the file, and attaches nothing, also when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_backing_file_is_refused_at_stage_and_leaks_no_device() {
    let mut d = TestDriver::start().await;
    for cap in [mount_cap("ext4", snw()), block_cap(snw())] {
        let name = format!(
            "emptied-{}",
            cap.access_type.as_ref().map_or(0, |t| match t {
                csi::volume_capability::AccessType::Mount(_) => 1,
                csi::volume_capability::AccessType::Block(_) => 2,
            })
        );
        let id = d
            .create(create_req(&name, 32 * MIB, cap.clone()))
            .await
            .unwrap()
            .volume_id;
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.image_path(&id))
            .unwrap()
            .set_len(0)
            .unwrap();
        let staging = d.staging(&name);
        for _ in 0..2 {
            assert_code(
                d.stage(&id, &staging, cap.clone()).await,
                tonic::Code::Internal,
                "less than one 4096-byte block",
            );
            let image = d.image_path(&id);
            assert!(
                every_attached_loop_device()
                    .iter()
                    .all(|(_, file)| *file != image),
                "no device may be left attached"
            );
        }
        assert_abnormal(&condition(&mut d, &id).await, "truncated");
        d.delete(&id).await.unwrap();
    }
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_volume_whose_loop_device_is_gone_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("detached", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("detached");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    assert!(!condition(&mut d, &id).await.abnormal);

    // Behind the driver's back.
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    d.loop_device_of(&id).unwrap().detach().unwrap();
    assert!(d.loop_device_of(&id).is_none());
    assert_abnormal(&condition(&mut d, &id).await, "loop device is gone");

    d.unstage(&id, &staging).await.unwrap();
    assert!(!condition(&mut d, &id).await.abnormal, "unstaged: healthy");
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_system_remounted_read_only_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("went-ro", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "went-ro", &cap).await;
    assert!(!condition(&mut d, &id).await.abnormal);

    nix::mount::mount(
        None::<&str>,
        &staging,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    assert_abnormal(&condition(&mut d, &id).await, "read-only");
    let stats = d.stats(&id, &target).await.unwrap();
    assert_abnormal(
        stats.volume_condition.as_ref().expect("volume_condition"),
        "read-only",
    );

    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// The real thing: ext4 with errors=remount-ro meets an error (the kernel's own trigger), and
/// goes read-only by itself; nothing remounts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_read_only_after_a_file_system_error_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap_flags("ext4", snw(), &["errors=remount-ro"]);
    let id = d
        .create(create_req("fs-error", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "fs-error", &cap).await;
    assert!(!condition(&mut d, &id).await.abnormal);

    let dev = d.loop_device_of(&id).unwrap();
    std::fs::write(
        format!("/sys/fs/ext4/loop{}/trigger_fs_error", dev.0),
        "loopcsi test",
    )
    .unwrap();
    let write = std::fs::File::create(target.join("after-error"));
    assert_eq!(
        write.map(drop).unwrap_err().raw_os_error(),
        Some(nix::libc::EROFS),
        "the kernel made the file system read-only"
    );
    let from_controller = condition(&mut d, &id).await;
    let from_node = d
        .stats(&id, &target)
        .await
        .unwrap()
        .volume_condition
        .expect("volume_condition");

    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
    assert_abnormal(&from_controller, "read-only");
    assert_abnormal(&from_node, "read-only");
}
