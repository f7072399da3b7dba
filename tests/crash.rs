//! Crash safety: the driver is killed (SIGKILL, from a crash point compiled into the test build)
//! inside CreateVolume, DeleteVolume, NodeStage, NodePublish and NodeUnstage; it is restarted
//! on the same state dir and the interrupted call is retried, as the CO would. Every run must
//! end with the retry succeeding, the data intact, and nothing half-made or leaked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

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

struct Run {
    root: PathBuf,
    id: String,
    cap: csi::VolumeCapability,
    staging: PathBuf,
    target: PathBuf,
}

const DATA: &[u8] = b"written before the crash, read after it";

impl Run {
    async fn step(&mut self, d: &mut ChildDriver, step: Step) -> Result<(), tonic::Status> {
        let id = self.id.clone();
        match step {
            Step::Create => {
                let req = create_req("pvc-crash", 32 * MIB, self.cap.clone());
                let volume = d
                    .controller
                    .create_volume(req)
                    .await?
                    .into_inner()
                    .volume
                    .unwrap();
                self.id = volume.volume_id;
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
        }
        Ok(())
    }
}

/// Runs the scenario with the driver set to die at `point`; returns after asserting the end
/// state. Panics if the point was never reached (the test would prove nothing).
async fn crash_and_recover(point: &str) {
    let scratch = Scratch::new();
    let root = scratch.path().to_path_buf();
    let mut run = Run {
        root: root.clone(),
        id: String::new(),
        cap: mount_cap("ext4", snw()),
        staging: root.join("staging"),
        target: root.join("pod").join("volume"),
    };
    std::fs::create_dir_all(&run.staging).unwrap();
    std::fs::create_dir_all(run.target.parent().unwrap()).unwrap();

    let mut driver = ChildDriver::spawn(&root, Some(point)).await;
    let mut crashed = false;
    for &step in SCENARIO {
        match run.step(&mut driver, step).await {
            Ok(()) => {}
            Err(status) if !crashed => {
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
    assert_eq!(
        files_in(&state.join("node")),
        Vec::<String>::new(),
        "{point}: node records left"
    );
    assert_eq!(
        leftovers_under(&root),
        Vec::<String>::new(),
        "{point}: devices or mounts left"
    );
}

macro_rules! crash_tests {
    ($($name:ident => $point:literal,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_and_recover($point).await;
            }
        )*

        /// Every crash point the driver has is exercised by a test above.
        #[test]
        fn every_crash_point_is_tested() {
            let tested = [$($point),*];
            for point in loopcsi::faults::POINTS {
                assert!(tested.contains(point), "crash point {point} has no test");
            }
        }
    };
}

crash_tests! {
    crash_while_writing_metadata_temp_file => "atomic.temp_written",
    crash_after_image_before_metadata => "create.image_written",
    crash_after_metadata_commit => "create.meta_committed",
    crash_mid_delete => "delete.meta_removed",
    crash_after_attach_before_mkfs => "stage.attached",
    crash_after_mkfs_before_recording_it => "stage.formatted",
    crash_after_stage_mount_before_record => "stage.mounted",
    crash_after_unmount_before_detach => "unstage.unmounted",
    crash_after_detach_before_record => "unstage.detached",
    crash_after_bind_before_record => "publish.bound",
}
