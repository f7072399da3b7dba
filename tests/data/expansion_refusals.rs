//! Expansion refused or pending: every NodeExpandVolume error, an online ext4 grow refused for
//! want of CAP_SYS_RESOURCE (finished at the next stage), and copies of a volume whose grow is
//! still pending.

use super::expansion::{assert_sizes, fs_total, recorded_size};
use super::*;

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
