//! The snapshot RPCs' contract (idempotency, listing, deletion) and what a snapshot costs: a
//! sparse source stays sparse, a reflink pool shares extents, an ext4 pool copies data.

use super::*;

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
