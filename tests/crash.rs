//! Crash safety: the driver is killed (SIGKILL, from a crash point compiled into the test build)
//! inside CreateVolume, DeleteVolume, NodeStage, NodePublish, NodeUnstage, CreateSnapshot
//! (around the freeze of a staged file system, mid-copy, around the commit), DeleteSnapshot,
//! CreateVolumeGroupSnapshot and DeleteVolumeGroupSnapshot (every step of the group commit),
//! restores and clones, NodeExpandVolume and `loopcsi gc`; it is restarted on the same state dir
//! and the interrupted call is retried, as the CO would. Every run must end with the retry
//! succeeding, the data (and every snapshot, restore and clone of it) intact, nothing left
//! frozen, and nothing half-made or leaked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "crash/group.rs"]
mod group;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use common::process::ChildDriver;
use common::*;
use loopcsi::csi;

/// One step of the scenario a CO drives.
#[derive(Clone, Copy, Debug)]
enum Step {
    Create,
    Stage,
    Publish,
    WriteData,
    Unpublish,
    Unstage,
    CheckData,
    Delete,
    Snapshot,
    /// The volume's file system is not frozen, and no freeze record is left.
    CheckThawed,
    Restore,
    Clone,
    /// Every restore and clone holds the data written before the snapshot or clone.
    CheckCopies,
    DeleteCopies,
    Expand,
    DeleteSnapshot,
    /// CreateVolumeGroupSnapshot of the volume; its member becomes the run's snapshot.
    GroupSnapshot,
    DeleteGroup,
}

const SCENARIO: &[Step] = &[
    Step::Create,
    Step::Stage,
    Step::Publish,
    Step::WriteData,
    Step::Unpublish,
    Step::Unstage,
    Step::Stage,
    Step::Publish,
    Step::CheckData,
    Step::Unpublish,
    Step::Unstage,
    Step::Delete,
];

/// Snapshot, restore, clone and expansion of a staged, published file system.
const DATA_SCENARIO: &[Step] = &[
    Step::Create,
    Step::Stage,
    Step::Publish,
    Step::WriteData,
    Step::Snapshot,
    Step::CheckThawed,
    Step::Clone,
    Step::CheckThawed,
    Step::Restore,
    Step::CheckCopies,
    Step::DeleteCopies,
    Step::Expand,
    Step::DeleteSnapshot,
    Step::CheckData,
    Step::Unpublish,
    Step::Unstage,
    Step::Delete,
];

/// A group snapshot of a staged, published file system, restored from, then deleted.
const GROUP_SCENARIO: &[Step] = &[
    Step::Create,
    Step::Stage,
    Step::Publish,
    Step::WriteData,
    Step::GroupSnapshot,
    Step::CheckThawed,
    Step::Restore,
    Step::CheckCopies,
    Step::DeleteCopies,
    Step::DeleteGroup,
    Step::CheckData,
    Step::Unpublish,
    Step::Unstage,
    Step::Delete,
];

struct Run {
    root: PathBuf,
    id: String,
    snapshot: String,
    group: group::Group,
    /// Restores and clones, by name and id.
    copies: Vec<(&'static str, String)>,
    size: i64,
    /// The file system's size before the first expansion call.
    fs_bytes: Option<u64>,
    cap: csi::VolumeCapability,
    staging: PathBuf,
    target: PathBuf,
}

const DATA: &[u8] = b"written before the crash, read after it";

impl Run {
    /// A run under `root` with a `fs` volume of `size` bytes; makes the CO's directories.
    fn new(root: &Path, fs: &str, size: i64) -> Self {
        let run = Run {
            root: root.to_path_buf(),
            id: String::new(),
            snapshot: String::new(),
            group: group::Group::default(),
            copies: Vec::new(),
            size,
            fs_bytes: None,
            cap: mount_cap(fs, snw()),
            staging: root.join("staging"),
            target: root.join("pod").join("volume"),
        };
        std::fs::create_dir_all(&run.staging).unwrap();
        std::fs::create_dir_all(run.target.parent().unwrap()).unwrap();
        run
    }

    async fn step(&mut self, d: &mut ChildDriver, step: Step) -> Result<(), tonic::Status> {
        let id = self.id.clone();
        match step {
            Step::Create => {
                let req = create_req("pvc-crash", self.size, self.cap.clone());
                self.id = create_volume(d, req).await?;
            }
            Step::Stage => {
                d.node
                    .node_stage_volume(csi::NodeStageVolumeRequest {
                        volume_id: id,
                        staging_target_path: self.staging.display().to_string(),
                        volume_capability: Some(self.cap.clone()),
                        ..Default::default()
                    })
                    .await?;
            }
            Step::Publish => {
                d.node
                    .node_publish_volume(csi::NodePublishVolumeRequest {
                        volume_id: id,
                        staging_target_path: self.staging.display().to_string(),
                        target_path: self.target.display().to_string(),
                        volume_capability: Some(self.cap.clone()),
                        ..Default::default()
                    })
                    .await?;
            }
            Step::WriteData => {
                std::fs::write(self.target.join("data"), DATA).unwrap();
                nix::unistd::sync();
            }
            Step::CheckData => {
                assert_eq!(
                    std::fs::read(self.target.join("data")).unwrap(),
                    DATA,
                    "data intact"
                );
            }
            Step::Unpublish => {
                d.node
                    .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                        volume_id: id,
                        target_path: self.target.display().to_string(),
                    })
                    .await?;
            }
            Step::Unstage => {
                d.node
                    .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                        volume_id: id,
                        staging_target_path: self.staging.display().to_string(),
                    })
                    .await?;
            }
            Step::Delete => {
                d.controller
                    .delete_volume(csi::DeleteVolumeRequest {
                        volume_id: id,
                        ..Default::default()
                    })
                    .await?;
            }
            Step::Snapshot => {
                let snapshot = d
                    .controller
                    .create_snapshot(csi::CreateSnapshotRequest {
                        source_volume_id: id,
                        name: "snap-crash".into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .snapshot
                    .unwrap();
                assert!(snapshot.ready_to_use);
                self.snapshot = snapshot.snapshot_id;
            }
            Step::CheckThawed => {
                assert_not_frozen(&self.staging);
                assert_eq!(
                    files_in(&self.root.join("state").join("frozen")),
                    Vec::<String>::new(),
                    "freeze records left"
                );
            }
            Step::Restore => {
                let source = csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: self.snapshot.clone(),
                    },
                );
                self.copy(d, "pvc-restore", source).await?;
            }
            Step::Clone => {
                let source = csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource { volume_id: id },
                );
                self.copy(d, "pvc-clone", source).await?;
            }
            Step::CheckCopies => {
                let staging = self.root.join("copy-staging");
                std::fs::create_dir_all(&staging).unwrap();
                for (name, copy) in &self.copies {
                    let staged = csi::NodeStageVolumeRequest {
                        volume_id: copy.clone(),
                        staging_target_path: staging.display().to_string(),
                        volume_capability: Some(self.cap.clone()),
                        ..Default::default()
                    };
                    d.node.node_stage_volume(staged).await?;
                    let read = std::fs::read(staging.join("data"));
                    d.node
                        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                            volume_id: copy.clone(),
                            staging_target_path: staging.display().to_string(),
                        })
                        .await?;
                    assert_eq!(read.unwrap(), DATA, "{name}: data intact");
                }
            }
            Step::DeleteCopies => {
                for (_, copy) in &self.copies {
                    d.controller
                        .delete_volume(csi::DeleteVolumeRequest {
                            volume_id: copy.clone(),
                            ..Default::default()
                        })
                        .await?;
                }
            }
            Step::Expand => {
                let bytes = |path: &Path| {
                    let fs = nix::sys::statvfs::statvfs(path).unwrap();
                    fs.blocks() * fs.fragment_size()
                };
                // Before this call, or before the crash the retry follows.
                let before = *self.fs_bytes.get_or_insert_with(|| bytes(&self.target));
                let reply = d
                    .node
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: id,
                        volume_path: self.target.display().to_string(),
                        capacity_range: Some(csi::CapacityRange {
                            required_bytes: self.size + 64 * MIB,
                            limit_bytes: 0,
                        }),
                        volume_capability: Some(self.cap.clone()),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                assert_eq!(reply.capacity_bytes, self.size + 64 * MIB);
                let after = bytes(&self.target);
                assert!(
                    after > before,
                    "the file system grew: {before} → {after} bytes"
                );
            }
            Step::GroupSnapshot => {
                self.group = group::create(d, &id).await?;
                self.snapshot = self.group.snapshots[0].clone();
            }
            Step::DeleteGroup => group::delete(d, &self.group).await?,
            Step::DeleteSnapshot => {
                d.controller
                    .delete_snapshot(csi::DeleteSnapshotRequest {
                        snapshot_id: self.snapshot.clone(),
                        ..Default::default()
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// CreateVolume `name` from `source`; remembers its id (a retry returns the same one).
    async fn copy(
        &mut self,
        d: &mut ChildDriver,
        name: &'static str,
        source: csi::volume_content_source::Type,
    ) -> Result<(), tonic::Status> {
        let mut req = create_req(name, self.size, self.cap.clone());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        let id = create_volume(d, req).await?;
        self.copies.retain(|(n, _)| *n != name);
        self.copies.push((name, id));
        Ok(())
    }
}

/// CreateVolume; the new (or existing) volume's id.
async fn create_volume(
    d: &mut ChildDriver,
    req: csi::CreateVolumeRequest,
) -> Result<String, tonic::Status> {
    let reply = d.controller.create_volume(req).await?.into_inner();
    Ok(reply.volume.unwrap().volume_id)
}

/// Fails if the file system mounted at `path` is frozen. FITHAW answers EINVAL for a file system
/// that is not frozen; should it succeed, the file system was frozen (and is thawed now, so the
/// cleanup that follows the failure does not hang on it).
fn assert_not_frozen(path: &Path) {
    let fs = std::fs::File::open(path).unwrap();
    assert_eq!(
        loopcsi::host::loopdev::thaw_fs(&fs),
        Err(nix::errno::Errno::EINVAL),
        "the file system at {} was left frozen",
        path.display()
    );
}

/// Runs the scenario with the driver set to die at `point`; returns after asserting the end
/// state. Panics if the point was never reached (the test would prove nothing).
///
/// The data scenario runs on xfs: this machine's driver lacks CAP_SYS_RESOURCE, without which a
/// mounted ext4 cannot grow (tests/data.rs), and xfs grows online without it.
async fn crash_and_recover(point: &str, scenario: &[Step]) {
    let (fs, size) =
        if std::ptr::eq(scenario, DATA_SCENARIO) || std::ptr::eq(scenario, GROUP_SCENARIO) {
            ("xfs", 320 * MIB)
        } else {
            ("ext4", 32 * MIB)
        };
    let scratch = Scratch::new();
    let root = scratch.path().to_path_buf();
    let mut run = Run::new(&root, fs, size);

    let mut driver = ChildDriver::spawn(&root, Some(point)).await;
    let mut crashed = false;
    for &step in scenario {
        match run.step(&mut driver, step).await {
            Ok(()) => {}
            // A dead driver is a transport error; any other answer is a real failure (and
            // waiting for the driver to die would hang).
            Err(status)
                if !crashed
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
            {
                // The driver died mid-call: the CO sees a transport error.
                let exit = driver.wait();
                assert_eq!(
                    exit.signal(),
                    Some(9),
                    "{point}: driver died by SIGKILL ({status:?})"
                );
                crashed = true;
                driver = ChildDriver::spawn(&run.root, None).await;
                // The CO retries the interrupted call.
                run.step(&mut driver, step).await.unwrap_or_else(|e| {
                    panic!("{point}: retry of {step:?} after the crash failed: {e:?}")
                });
            }
            Err(status) => panic!("{point}: {step:?} failed after recovery: {status:?}"),
        }
    }
    assert!(
        crashed,
        "crash point {point} was never reached by the scenario"
    );

    // A final restart runs recovery once more over the end state.
    drop(driver);
    let _driver = ChildDriver::spawn(&root, None).await;
    let state = root.join("state");
    assert_eq!(
        files_in(&state.join("volumes")),
        Vec::<String>::new(),
        "{point}: volume files left"
    );
    for dir in ["node", "snapshots", "frozen", "groups"] {
        assert_eq!(
            files_in(&state.join(dir)),
            Vec::<String>::new(),
            "{point}: files left in {dir}"
        );
    }
    assert_eq!(
        leftovers_under(&root),
        Vec::<String>::new(),
        "{point}: devices or mounts left"
    );
}

macro_rules! crash_tests {
    ($($name:ident => $point:literal in $scenario:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_and_recover($point, $scenario).await;
            }
        )*

        /// Every crash point the driver has is exercised by a test above (or, for `loopcsi
        /// gc`, by `crash_mid_gc`).
        #[test]
        fn every_crash_point_is_tested() {
            let tested = [$($point,)* GC_POINT];
            for point in loopcsi::faults::POINTS {
                assert!(tested.contains(point), "crash point {point} has no test");
            }
        }
    };
}

crash_tests! {
    crash_while_writing_metadata_temp_file => "atomic.temp_written" in SCENARIO,
    crash_after_image_before_metadata => "create.image_written" in SCENARIO,
    crash_after_metadata_commit => "create.meta_committed" in SCENARIO,
    crash_mid_delete => "delete.meta_removed" in SCENARIO,
    crash_after_attach_before_mkfs => "stage.attached" in SCENARIO,
    crash_after_mkfs_before_recording_it => "stage.formatted" in SCENARIO,
    crash_after_stage_mount_before_record => "stage.mounted" in SCENARIO,
    crash_after_unmount_before_detach => "unstage.unmounted" in SCENARIO,
    crash_after_detach_before_record => "unstage.detached" in SCENARIO,
    crash_after_bind_before_record => "publish.bound" in SCENARIO,
    crash_after_freeze_record_before_freeze => "freeze.intent_recorded" in DATA_SCENARIO,
    crash_while_frozen_for_a_snapshot => "freeze.frozen" in DATA_SCENARIO,
    crash_after_thaw_before_clearing_the_record => "thaw.thawed" in DATA_SCENARIO,
    crash_mid_snapshot_copy => "copy.precopied" in DATA_SCENARIO,
    crash_after_snapshot_copy_before_commit => "snapshot.copied" in DATA_SCENARIO,
    crash_after_snapshot_commit => "snapshot.committed" in DATA_SCENARIO,
    crash_mid_snapshot_delete => "delete_snapshot.meta_removed" in DATA_SCENARIO,
    crash_after_restore_copy_before_commit => "restore.copied" in DATA_SCENARIO,
    crash_after_clone_copy_before_commit => "clone.copied" in DATA_SCENARIO,
    crash_mid_expand => "expand.file_grown" in DATA_SCENARIO,
    crash_after_group_intent_before_copies => "group.intent_recorded" in GROUP_SCENARIO,
    crash_after_group_precopy_before_freeze => "group.precopied" in GROUP_SCENARIO,
    crash_while_a_group_is_frozen => "group.frozen" in GROUP_SCENARIO,
    crash_after_group_members_before_group_commit => "group.members_committed" in GROUP_SCENARIO,
    crash_after_group_commit => "group.committed" in GROUP_SCENARIO,
    crash_after_group_marked_deleting => "delete_group.marked" in GROUP_SCENARIO,
    crash_after_group_members_removed => "delete_group.members_removed" in GROUP_SCENARIO,
}

/// The crash point inside orphan collection, run by `loopcsi gc` here.
const GC_POINT: &str = "gc.removed";

/// Runs `loopcsi gc` on `state`, killed at `crash_at` if given.
fn gc(state: &Path, crash_at: Option<&str>) -> std::process::ExitStatus {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_loopcsi"));
    command
        .args(["gc", "--min-age", "0", "--state-dir"])
        .arg(state)
        .env_remove("LOOPCSI_CRASH_AT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(point) = crash_at {
        command.env("LOOPCSI_CRASH_AT", point);
    }
    command.status().unwrap()
}

/// `loopcsi gc` killed after collecting one orphan of several: run again, it collects the rest,
/// and leaves the live volume alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_gc() {
    let scratch = Scratch::new();
    let root = scratch.path().to_path_buf();
    let state = root.join("state");
    let live = {
        let mut driver = ChildDriver::spawn(&root, None).await;
        let req = create_req("pvc-live", 16 * MIB, mount_cap("ext4", snw()));
        let volume = driver.controller.create_volume(req).await.unwrap();
        volume.into_inner().volume.unwrap().volume_id
    };
    let orphans = [
        state
            .join("volumes")
            .join(format!("{}.img", uuid::Uuid::new_v4())),
        state
            .join("snapshots")
            .join(format!("{}.img", uuid::Uuid::new_v4())),
        state
            .join("volumes")
            .join(format!("{}.json.tmp", uuid::Uuid::new_v4())),
    ];
    for orphan in &orphans {
        std::fs::write(orphan, b"orphan").unwrap();
    }
    let killed = gc(&state, Some(GC_POINT));
    assert_eq!(killed.signal(), Some(9), "gc died at {GC_POINT}");
    let left = orphans.iter().filter(|o| o.exists()).count();
    assert_eq!(left, orphans.len() - 1, "killed after the first removal");
    assert!(gc(&state, None).success());
    assert!(orphans.iter().all(|o| !o.exists()), "orphans left");
    let mut kept = files_in(&state.join("volumes"));
    kept.sort();
    assert_eq!(kept, [format!("{live}.img"), format!("{live}.json")]);
}

/// The failure of issue 12: the driver is killed while a staged file system is frozen for a
/// snapshot, and the CO (or kubelet's cleanup) unmounts the target and the staging path before
/// the driver is back. No mount of the frozen file system is left, yet its superblock stays
/// frozen and keeps the loop device attached. The restarted driver must thaw it (through a
/// temporary mount of the device), so the retried snapshot, the unstage and the delete succeed
/// and nothing is left attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_file_system_unmounted_while_the_driver_was_dead_is_thawed_at_start() {
    let scratch = Scratch::new();
    let root = scratch.path().to_path_buf();
    let mut run = Run::new(&root, "ext4", 32 * MIB);
    let mut driver = ChildDriver::spawn(&root, Some("freeze.frozen")).await;
    for step in [Step::Create, Step::Stage, Step::Publish, Step::WriteData] {
        run.step(&mut driver, step).await.unwrap();
    }
    assert!(run.step(&mut driver, Step::Snapshot).await.is_err());
    assert_eq!(driver.wait().signal(), Some(9), "died while frozen");
    let device = {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&run.staging).unwrap().dev();
        PathBuf::from(format!("/dev/loop{}", nix::sys::stat::minor(dev)))
    };
    // Unmounting a frozen file system succeeds; its superblock stays frozen.
    for path in [&run.target, &run.staging] {
        nix::mount::umount(path.as_path()).unwrap();
    }
    let _thaw = ThawIfFailing {
        device,
        dir: root.join("test-thaw"),
    };
    let mut driver = ChildDriver::spawn(&root, None).await;
    for step in [
        Step::Snapshot,
        Step::Unpublish,
        Step::Unstage,
        Step::DeleteSnapshot,
        Step::Delete,
    ] {
        run.step(&mut driver, step)
            .await
            .unwrap_or_else(|e| panic!("{step:?} after the restart: {e:?}"));
    }
    assert_eq!(leftovers_under(&root), Vec::<String>::new());
    assert_eq!(
        files_in(&root.join("state").join("frozen")),
        Vec::<String>::new()
    );
}

/// Should the test fail with the file system still frozen and unmounted, its superblock would
/// keep the loop device attached for ever (the fixture cannot detach it): thaw it the way an
/// operator would, by mounting the device again. Dropped before the fixture's cleanup.
struct ThawIfFailing {
    device: PathBuf,
    dir: PathBuf,
}

impl Drop for ThawIfFailing {
    fn drop(&mut self) {
        if !std::thread::panicking() || std::fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        let flags = nix::mount::MsFlags::empty();
        if nix::mount::mount(
            Some(&self.device),
            &self.dir,
            Some("ext4"),
            flags,
            None::<&str>,
        )
        .is_ok()
        {
            if let Ok(fs) = std::fs::File::open(&self.dir) {
                let _ = loopcsi::host::loopdev::thaw_fs(&fs);
            }
            let _ = nix::mount::umount(&self.dir);
        }
    }
}

/// Freezes the file system at `staging` as the driver does, and writes the record the driver
/// writes before it (`src/volume/freeze.rs`), as a driver killed right after its FIFREEZE
/// leaves them.
fn freeze_as_a_dead_driver(state: &Path, volume_id: &str, staging: &Path) {
    use std::os::unix::fs::MetadataExt;
    let fs = std::fs::File::open(staging).unwrap();
    let dev = fs.metadata().unwrap().dev();
    let record = serde_json::json!({
        "version": 1,
        "volume": volume_id,
        "mount_point": staging,
        "major": nix::sys::stat::major(dev),
        "minor": nix::sys::stat::minor(dev),
        "fs_type": "ext4",
    });
    std::fs::create_dir_all(state.join("frozen")).unwrap();
    std::fs::write(
        state.join("frozen").join(format!("{volume_id}.json")),
        record.to_string(),
    )
    .unwrap();
    loopcsi::host::loopdev::freeze_fs(&fs).unwrap();
}

async fn condition(d: &mut TestDriver, id: &str) -> csi::VolumeCondition {
    d.controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap()
}

/// A freeze the driver recorded and nobody thawed is reported by ControllerGetVolume, taken
/// over by a retried CreateSnapshot, and thawed by a reconciliation round; a freeze by someone
/// else is never thawed by the driver, and refuses the snapshot with FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_freeze_is_reported_taken_over_and_thawed() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("pvc-frozen", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    std::fs::write(staging.join("data"), DATA).unwrap();
    let snapshot = |name: &str| csi::CreateSnapshotRequest {
        source_volume_id: id.clone(),
        name: name.into(),
        ..Default::default()
    };

    // Someone else's freeze: refused, reported by nobody, left for them to thaw.
    let theirs = std::fs::File::open(&staging).unwrap();
    loopcsi::host::loopdev::freeze_fs(&theirs).unwrap();
    let refused = d.controller.create_snapshot(snapshot("snap-a")).await;
    loopcsi::host::loopdev::thaw_fs(&theirs).unwrap();
    drop(theirs); // an open directory would keep the unstage from unmounting
    assert_code(
        refused,
        tonic::Code::FailedPrecondition,
        "frozen by someone else",
    );
    assert!(!condition(&mut d, &id).await.abnormal);

    // A freeze a dead driver recorded: abnormal, then taken over by the retried snapshot.
    freeze_as_a_dead_driver(&d.state_dir(), &id, &staging);
    let health = condition(&mut d, &id).await;
    assert!(
        health.abnormal && health.message.contains("frozen"),
        "{health:?}"
    );
    let taken = d.controller.create_snapshot(snapshot("snap-a")).await;
    assert_not_frozen(&staging);
    let snap_id = taken.unwrap().into_inner().snapshot.unwrap().snapshot_id;
    assert!(!condition(&mut d, &id).await.abnormal);

    // The same, thawed by a reconciliation round (as the running driver does every interval).
    freeze_as_a_dead_driver(&d.state_dir(), &id, &staging);
    let volumes = d.open_volumes();
    let report = volumes.reconcile().unwrap();
    assert_not_frozen(&staging);
    assert!(
        report.repaired.iter().any(|r| r.contains("thawed")),
        "{report:?}"
    );
    assert_eq!(
        files_in(&d.state_dir().join("frozen")),
        Vec::<String>::new()
    );

    d.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap_id,
            ..Default::default()
        })
        .await
        .unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
}
