//! One definition of "in use", and what happens when the state dir loses or tears files under
//! a live volume: nothing in use is ever detached, deleted or collected; teardown works from
//! the node records and the kernel without metadata; an image deleted under a live volume is
//! reported and its data rescued, never destroyed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use loopcsi::host::tools::Tools;
use loopcsi::volume::pool::{Layout, Pool};
use loopcsi::volume::Volumes;

/// The node side of a driver on `d`'s state dir, as a second view (startup recovery runs).
fn node_view(d: &TestDriver) -> Volumes {
    d.open_volumes()
}

fn meta_path(d: &TestDriver, id: &str) -> std::path::PathBuf {
    d.state_dir().join("volumes").join(format!("{id}.json"))
}

async fn stats(
    d: &mut TestDriver,
    id: &str,
    path: &std::path::Path,
) -> loopcsi::csi::NodeGetVolumeStatsResponse {
    d.node
        .node_get_volume_stats(loopcsi::csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Creates a volume named `name` and stages and publishes it, as the CO does for a pod.
async fn in_use_volume(
    d: &mut TestDriver,
    name: &str,
    bytes: i64,
    cap: &loopcsi::csi::VolumeCapability,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let id = d
        .create(create_req(name, bytes, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("s"), d.target("t"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    (id, staging, target)
}

/// Item 3: a raw block volume is published as a bind of its device node, which mountinfo
/// shows with devtmpfs's numbers. With its metadata and node records gone, only that bind
/// says the device is in use: neither recovery nor the reconciler may detach it or delete the
/// image under the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_block_volume_is_in_use_even_without_metadata_or_records() {
    let mut d = TestDriver::start().await;
    let id = d
        .create(create_req("pvc-block", 16 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("s"), d.target("t"));
    d.stage(&id, &staging, block_cap(snw())).await.unwrap();
    d.publish(&id, &staging, &target, block_cap(snw()), false)
        .await
        .unwrap();
    let device = d.loop_device_of(&id).unwrap();
    let meta = std::fs::read(meta_path(&d, &id)).unwrap();
    let records = d.state_dir().join("node").join(&id);
    let saved_records = std::fs::read(records.join("staged.json")).unwrap();
    d.stop().await;
    std::fs::remove_file(meta_path(&d, &id)).unwrap();
    std::fs::remove_dir_all(&records).unwrap();

    let node = node_view(&d); // startup recovery
    let report = node.reconcile().unwrap();
    assert!(report.collected.is_empty(), "{report:?}");
    assert!(
        d.image_path(&id).exists(),
        "the image of a bound device is kept"
    );
    assert_eq!(
        d.loop_device_of(&id),
        Some(device),
        "the device stays attached"
    );
    let (_, recovery) = Pool::open(
        Layout::prepare(
            &d.state_dir(),
            std::sync::Arc::new(loopcsi::host::linux::Linux::new(Tools::discover().unwrap())),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(recovery.removed_partial_images.is_empty(), "{recovery:?}");

    // Put the state back; the CO tears down as usual.
    std::fs::write(meta_path(&d, &id), meta).unwrap();
    std::fs::create_dir_all(&records).unwrap();
    std::fs::write(records.join("staged.json"), saved_records).unwrap();
    d.restart().await;
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// Item 4: metadata that cannot be read (torn, empty, of an unknown version) while the volume
/// is staged and published: its node records survive recovery, teardown works from them,
/// DeleteVolume refuses while in use and deletes after, and no CreateVolume can make a
/// duplicate of a volume whose name cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_metadata_never_strands_or_duplicates_a_volume() {
    for damage in [
        &b""[..],
        b"{\"version\":1,\"na",
        b"{\"version\":99,\"name\":\"pvc-x\"}",
    ] {
        let mut d = TestDriver::start().await;
        let cap = mount_cap("ext4", snw());
        let (id, staging, target) = in_use_volume(&mut d, "pvc-x", 32 * MIB, &cap).await;
        std::fs::write(meta_path(&d, &id), damage).unwrap();
        d.restart().await;
        assert!(
            d.state_dir()
                .join("node")
                .join(&id)
                .join("staged.json")
                .exists(),
            "recovery keeps the records of a volume whose metadata is unreadable"
        );
        let err = d
            .create(create_req("pvc-x", 32 * MIB, cap.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(&format!("{id}.json")), "{err:?}");
        let err = d.delete(&id).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        d.unpublish(&id, &target).await.unwrap();
        d.unstage(&id, &staging).await.unwrap();
        assert!(
            d.loop_device_of(&id).is_none(),
            "unstage detached without metadata"
        );
        d.delete(&id).await.unwrap();
        assert!(!d.image_path(&id).exists() && !meta_path(&d, &id).exists());
        // The name is free again.
        let again = d
            .create(create_req("pvc-x", 32 * MIB, cap.clone()))
            .await
            .unwrap()
            .volume_id;
        d.delete(&again).await.unwrap();
        d.assert_clean();
    }
}

/// Item 5: the image deleted under a published volume. Health says so; unpublish works;
/// unstage refuses to destroy the only copy; `rescue` copies the device into a new image, and
/// then the volume tears down and its data is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_deleted_under_a_live_volume_is_reported_and_rescued() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let (id, staging, target) = in_use_volume(&mut d, "pvc-gone", 32 * MIB, &cap).await;
    std::fs::write(target.join("precious"), b"the only copy").unwrap();
    nix::unistd::sync();
    let device = d.loop_device_of(&id).unwrap();
    // The identity of what it holds: the number may be reused by another test once freed.
    let held = device.status().unwrap();
    std::fs::remove_file(d.image_path(&id)).unwrap();

    let response = stats(&mut d, &id, &target).await;
    let condition = response.volume_condition.unwrap();
    assert!(
        condition.abnormal && condition.message.contains("missing"),
        "{condition:?}"
    );
    let report = node_view(&d).reconcile().unwrap();
    assert!(
        report.unrepairable.iter().any(|l| l.contains("only copy")),
        "{report:?}"
    );
    assert!(
        device.status().unwrap() == held,
        "nothing detached the only copy"
    );

    d.unpublish(&id, &target).await.unwrap();
    let err = d.unstage(&id, &staging).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("rescue"), "{err:?}");

    // The operator's command, beside the live driver.
    let rescue = std::process::Command::new(env!("CARGO_BIN_EXE_loopcsi"))
        .args(["rescue", "--volume", &id, "--state-dir"])
        .arg(d.state_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&rescue.stdout);
    assert!(
        rescue.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&rescue.stderr)
    );
    assert!(said.contains("rescued volume"), "{said}");
    assert!(
        device.status().unwrap() != held,
        "the old device is released"
    );
    d.unstage(&id, &staging).await.unwrap();
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("precious")).unwrap(),
        b"the only copy"
    );
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// Item 6: after a reboot nothing is attached, but the node records say staged and
/// published: the volume is in use (the kubelet will re-publish it), so DeleteVolume refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_a_reboot_respects_the_node_records() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("xfs", snw());
    let (id, staging, target) = in_use_volume(&mut d, "pvc-reboot", 300 * MIB, &cap).await;
    std::fs::write(target.join("kept"), b"across the reboot").unwrap();
    d.stop().await;
    d.simulate_reboot();
    d.restart().await;
    let err = d.delete(&id).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("node record"), "{err:?}");
    // The kubelet re-publishes without staging first, as it does after a reboot.
    std::fs::create_dir_all(&target).unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("kept")).unwrap(),
        b"across the reboot"
    );
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// Item 7: a torn stage or target record. Every node RPC keeps working from the CO's paths and
/// the kernel; the records heal (rewritten or removed) instead of failing for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_node_records_heal_instead_of_failing_for_ever() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("pvc-torn", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("s"), d.target("t"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let records = d.state_dir().join("node").join(&id);
    std::fs::write(records.join("staged.json"), b"{\"path\":").unwrap();
    // Publish adopts the staging the kernel shows and rewrites the record.
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let staged = std::fs::read_to_string(records.join("staged.json")).unwrap();
    assert!(staged.contains(&staging.display().to_string()), "{staged}");
    // A torn target record: stats and unpublish still work, and the record goes.
    let target_record = std::fs::read_dir(&records)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("target-")
        })
        .unwrap();
    std::fs::write(&target_record, b"").unwrap();
    let response = stats(&mut d, &id, &target).await;
    assert!(!response.volume_condition.unwrap().abnormal);
    d.unpublish(&id, &target).await.unwrap();
    assert!(!target_record.exists(), "the torn target record is removed");
    std::fs::write(records.join("staged.json"), b"").unwrap();
    d.unstage(&id, &staging).await.unwrap();
    assert!(!records.exists());
    d.delete(&id).await.unwrap();
    d.assert_clean();
}
