//! Snapshots, restores and clones: frozen, consistent copies, data intact. The snapshot RPCs'
//! contract and space costs: snapshot_rpcs.rs.

use super::*;

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
