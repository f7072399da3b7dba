//! Continuous reconciliation: drift is repaired where it is safe, reported where it is not,
//! orphans are collected, and nothing the driver did not create is touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use loopcsi::host::{loopdev, mount};
use loopcsi::volume::reconcile::ReconcileReport;
use loopcsi::volume::Volumes;

/// The node side of a running driver on `d`'s state dir (startup recovery has run).
fn running_node(d: &TestDriver) -> Volumes {
    d.open_volumes()
}

/// One reconciliation round on the driver's state dir, as the running driver does it.
fn reconcile_round(d: &TestDriver) -> ReconcileReport {
    running_node(d).reconcile().unwrap()
}

fn mounted(path: &std::path::Path) -> bool {
    mount::mounts()
        .unwrap()
        .iter()
        .any(|m| m.mount_point == path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_staging_is_reattached_and_targets_rebound() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("drift", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("s"), d.target("p"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"kept").unwrap();
    nix::unistd::sync();
    d.stop().await;

    // Behind the driver's back: the mounts go away and the loop device is detached, but the
    // staging and target directories remain (the CO still expects the volume there).
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    d.loop_device_of(&id).unwrap().detach().unwrap();
    assert!(d.loop_device_of(&id).is_none());

    let report = reconcile_round(&d);
    assert_eq!(report.repaired.len(), 2, "{report:?}");
    assert!(report.unrepairable.is_empty(), "{report:?}");
    assert!(mounted(&staging) && mounted(&target));
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"kept");
    // A second round finds nothing to do.
    assert_eq!(reconcile_round(&d), ReconcileReport::default());

    d.restart().await;
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_that_is_not_safe_to_repair_is_reported_only() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("gone", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.stop().await;
    // The CO removed the staging directory after the mount vanished: nothing is re-created.
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    d.loop_device_of(&id).unwrap().detach().unwrap();
    std::fs::remove_dir(&staging).unwrap();

    let report = reconcile_round(&d);
    assert!(report.repaired.is_empty(), "{report:?}");
    assert_eq!(report.unrepairable.len(), 1, "{report:?}");
    assert!(report.unrepairable[0].contains("is gone"), "{report:?}");
    assert!(!staging.exists(), "the staging directory is not re-created");
    assert!(d.loop_device_of(&id).is_none(), "nothing is attached");

    d.restart().await;
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_collected_and_foreign_devices_left_alone() {
    let mut d = TestDriver::start().await;
    let keep = d
        .create(create_req("keep", 8 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    d.stop().await;
    // Everything below appears while the driver runs (after its startup recovery).
    let node_ops = running_node(&d);
    let volumes = d.state_dir().join("volumes");
    let node = d.state_dir().join("node");
    let attach = |path: &std::path::Path| {
        loopdev::attach(
            path,
            loopdev::AttachOptions {
                direct_io: false,
                read_only: false,
            },
        )
        .unwrap()
    };

    // An image without metadata, attached to a loop device (a deleted volume's leftovers).
    let orphan = volumes.join(format!("{}.img", uuid::Uuid::new_v4()));
    std::fs::File::create(&orphan)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let orphan_dev = attach(&orphan);
    // A loop device whose image was deleted from under it.
    let deleted = volumes.join(format!("{}.img", uuid::Uuid::new_v4()));
    std::fs::File::create(&deleted)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let deleted_dev = attach(&deleted);
    std::fs::remove_file(&deleted).unwrap();
    // Stale temp files and a node record of an unknown volume.
    let temp = volumes.join(format!("{}.json.tmp", uuid::Uuid::new_v4()));
    std::fs::write(&temp, b"{").unwrap();
    let record = node.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&record).unwrap();
    std::fs::write(record.join("staged.json"), b"{}").unwrap();
    // A loop device that is not the driver's: backed by a file outside the pool.
    let foreign = d.root().join("foreign.img");
    std::fs::File::create(&foreign)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let foreign_dev = attach(&foreign);

    let report = node_ops.reconcile().unwrap();
    assert!(report.unrepairable.is_empty(), "{report:?}");
    assert_eq!(report.collected.len(), 5, "{report:?}");
    assert!(orphan_dev.backing_file().is_none() && deleted_dev.backing_file().is_none());
    assert!(!orphan.exists() && !temp.exists() && !record.exists());
    assert_eq!(
        foreign_dev.backing_file(),
        Some(foreign.clone()),
        "a foreign device is never touched"
    );
    assert!(
        d.image_path(&keep).exists(),
        "a live volume is never collected"
    );
    foreign_dev.detach().unwrap();

    d.restart().await;
    d.delete(&keep).await.unwrap();
    d.assert_clean();
}

/// Seen in the e2e tier during a rolling update of the DaemonSet: NodeUnstageVolume unmounted the
/// staging, found the loop device still held by another holder and failed; the reconciler, seeing
/// a stage record and no mount, re-attached and re-mounted the staging before the kubelet's retry.
/// The unstage now records its intent first, and neither a reconciliation round nor a restart of
/// the driver puts back what the CO is taking down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unstage_is_not_undone_by_the_reconciler() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("unstaging", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let dev = d.loop_device_of(&id).unwrap();

    // Another holder keeps the device open: the unmount succeeds, the detach cannot finish.
    let holder = std::fs::File::open(dev.path()).unwrap();
    let err = d.unstage(&id, &staging).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(!mounted(&staging), "the unstage unmounted before it failed");

    d.stop().await;
    let report = reconcile_round(&d);
    assert!(report.repaired.is_empty(), "{report:?}");
    assert!(
        report
            .unrepairable
            .iter()
            .any(|r| r.contains(&id) && r.contains("NodeUnstageVolume") && r.contains("retry")),
        "{report:?}"
    );
    assert!(
        !mounted(&staging),
        "the reconciler re-mounted an unstaging volume"
    );

    // The holder goes; the driver restarts (its startup recovery reconciles too) and the CO's
    // retry of the unstage finishes it.
    drop(holder);
    d.restart().await;
    assert!(
        !mounted(&staging),
        "startup recovery re-mounted an unstaging volume"
    );
    d.unstage(&id, &staging).await.unwrap();
    assert!(d.loop_device_of(&id).is_none());

    // A new stage after all that is an ordinary stage.
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    assert!(mounted(&staging));
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}
