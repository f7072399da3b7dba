//! Snapshots, restores and clones: frozen, consistent copies, data intact.

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
