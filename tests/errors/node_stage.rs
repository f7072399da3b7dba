//! NodeStageVolume and NodeUnstageVolume: required fields, bad paths, conflicts, records left as they were.

use super::*;

// ---- NodeStageVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_required_fields_and_unknown_volume() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let staging = s(&d.staging("s"));

    assert_err(
        d.node
            .node_stage_volume(stage_req("", &staging, Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    // Required fields are checked before the (unknown) id is looked up.
    assert_err(
        d.node
            .node_stage_volume(stage_req(&random_id(), "", Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["staging_target_path"],
    );
    assert_err(
        d.node
            .node_stage_volume(stage_req(&random_id(), &staging, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    assert_err(
        d.node
            .node_stage_volume(stage_req("fake-vol-id", &staging, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    let mut no_type = cap.clone();
    no_type.access_type = None;
    assert_err(
        d.node
            .node_stage_volume(stage_req(&random_id(), &staging, Some(no_type)))
            .await,
        Code::InvalidArgument,
        &["volume_capability", "access_type"],
    );
    assert_err(
        d.node
            .node_stage_volume(csi::NodeStageVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );

    // Unknown ids, well-formed or not.
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.node
                .node_stage_volume(stage_req(&unknown, &staging, Some(cap.clone())))
                .await,
            Code::NotFound,
            &[&unknown],
        );
    }

    // A real volume with no capability (csi-sanity).
    let id = new_volume(&mut d, "st", 16 * MIB, cap.clone()).await;
    assert_err(
        d.node
            .node_stage_volume(stage_req(&id, &staging, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_rejects_bad_staging_paths() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "paths", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");

    let relative = "relative/staging";
    let dotdot = format!("{}/../s", s(&staging));
    let state = d.state_dir();
    let inside_state = state.join("volumes");
    let images = state.join("volumes").join(format!("{id}.img"));
    for (path, why) in [
        (relative.to_string(), "absolute"),
        (dotdot, ".."),
        (s(&state), "state dir"),
        (s(&inside_state), "state dir"),
        (s(&images), "state dir"),
        ("/".to_string(), "/"),
    ] {
        assert_err(
            d.node
                .node_stage_volume(stage_req(&id, &path, Some(cap.clone())))
                .await,
            Code::InvalidArgument,
            &["staging_target_path", why],
        );
    }

    // A staging path that is a symlink to another directory: refused, nothing mounted at the
    // link's destination.
    let dest = d.root().join("elsewhere");
    std::fs::create_dir_all(&dest).unwrap();
    let link = d.root().join("staging").join("link");
    std::os::unix::fs::symlink(&dest, &link).unwrap();
    assert_err(
        d.stage(&id, &link, cap.clone()).await,
        Code::InvalidArgument,
        &["staging_target_path"],
    );
    assert_eq!(mounts_at(&dest), 0, "mounted through the symlink");
    assert_eq!(mounts_at(&link), 0);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    d.assert_clean();

    // A symlink into the state dir.
    let into_state = d.root().join("staging").join("link-state");
    std::os::unix::fs::symlink(&inside_state, &into_state).unwrap();
    assert_err(
        d.stage(&id, &into_state, cap.clone()).await,
        Code::InvalidArgument,
        &["staging_target_path", "state dir"],
    );
    assert_eq!(mounts_at(&inside_state), 0);
    d.assert_clean();

    // The volume is still usable at a proper path.
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

/// The stage record is written while the kernel work runs; a stage that fails must leave the
/// record as it was, so that neither publish nor the reconciler acts on a stage that never was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_stage_leaves_the_stage_record_as_it_was() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "record", 16 * MIB, cap.clone()).await;
    let record = d.state_dir().join("node").join(&id).join("staged.json");
    let not_a_dir = d.root().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();

    // Never staged: a failed stage leaves no record, and publish does not stage it from one.
    assert!(d.stage(&id, &not_a_dir, cap.clone()).await.is_err());
    assert!(!record.exists(), "a failed stage left a record");
    let target = d.target("t");
    assert_err(
        d.node
            .node_publish_volume(publish_req(
                &id,
                &s(&not_a_dir),
                &s(&target),
                Some(cap.clone()),
            ))
            .await,
        Code::FailedPrecondition,
        &["stag"],
    );
    d.assert_clean();

    // Staged elsewhere before (and lost to a reboot): a failed stage keeps the earlier record.
    let staging = d.staging("good");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let before = std::fs::read(&record).unwrap();
    d.simulate_reboot();
    assert!(d.stage(&id, &not_a_dir, cap.clone()).await.is_err());
    assert_eq!(
        std::fs::read(&record).unwrap(),
        before,
        "the earlier record changed"
    );
    d.assert_clean();

    // The earlier record still lets the volume be staged where it was.
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_capability_mismatch_conflicts_and_mount_flags() {
    let mut d = TestDriver::start().await;
    let ext4 = mount_cap("ext4", snw());
    let fs_vol = new_volume(&mut d, "ext4", 16 * MIB, ext4.clone()).await;
    let xfs_vol = new_volume(&mut d, "xfs", 300 * MIB, mount_cap("xfs", snw())).await;
    let blk_vol = new_volume(&mut d, "blk", 8 * MIB, block_cap(snw())).await;
    let staging = d.staging("s");

    // Capabilities the volume cannot serve.
    assert_err(
        d.stage(&fs_vol, &staging, block_cap(snw())).await,
        Code::FailedPrecondition,
        &["volume_capability"],
    );
    assert_err(
        d.stage(&xfs_vol, &staging, ext4.clone()).await,
        Code::FailedPrecondition,
        &["xfs", "ext4"],
    );
    assert_err(
        d.stage(&blk_vol, &staging, ext4.clone()).await,
        Code::FailedPrecondition,
        &["volume_capability"],
    );
    assert_err(
        d.stage(
            &fs_vol,
            &staging,
            mount_cap("ext4", Mode::MultiNodeMultiWriter),
        )
        .await,
        Code::InvalidArgument,
        &["MULTI_NODE_MULTI_WRITER"],
    );
    d.assert_clean();

    // Mount flags that are shell syntax, several options in one, or change what is mounted.
    for flag in [
        "$(reboot)",
        "a;b",
        "a,b",
        "bind",
        "rbind",
        "remount",
        "a b",
        "`id`",
    ] {
        assert_err(
            d.stage(&fs_vol, &staging, mount_cap_flags("ext4", snw(), &[flag]))
                .await,
            Code::InvalidArgument,
            &["mount_flags"],
        );
    }
    // More than the CSI limit of 4 KiB of mount flags in all.
    let long = "a".repeat(1000);
    let many: Vec<&str> = vec![long.as_str(); 5];
    assert_err(
        d.stage(&fs_vol, &staging, mount_cap_flags("ext4", snw(), &many))
            .await,
        Code::InvalidArgument,
        &["mount_flags"],
    );
    // volume_mount_group without VOLUME_MOUNT_GROUP.
    let mut group = ext4.clone();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = group.access_type.as_mut() {
        m.volume_mount_group = "1000".into();
    }
    assert_err(
        d.stage(&fs_vol, &staging, group).await,
        Code::InvalidArgument,
        &["volume_mount_group"],
    );
    d.assert_clean();

    // Staged at the same path with other mount flags (or another mode): ALREADY_EXISTS.
    d.stage(&fs_vol, &staging, ext4.clone()).await.unwrap();
    assert_err(
        d.stage(
            &fs_vol,
            &staging,
            mount_cap_flags("ext4", snw(), &["noatime"]),
        )
        .await,
        Code::AlreadyExists,
        &[&fs_vol],
    );
    assert_err(
        d.stage(
            &fs_vol,
            &staging,
            mount_cap("ext4", Mode::SingleNodeMultiWriter),
        )
        .await,
        Code::AlreadyExists,
        &[&fs_vol],
    );
    // The identical request is still fine.
    d.stage(&fs_vol, &staging, ext4.clone()).await.unwrap();
    assert_eq!(mounts_at(&staging), 1);
    d.unstage(&fs_vol, &staging).await.unwrap();
    d.assert_clean();
    for id in [&fs_vol, &xfs_vol, &blk_vol] {
        d.delete(id).await.unwrap();
    }
}

// ---- NodeUnstageVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unstage_errors() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let staging = d.staging("s");
    let unstage = |id: &str, path: &str| csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
    };

    assert_err(
        d.node.node_unstage_volume(unstage("", &s(&staging))).await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node.node_unstage_volume(unstage(&random_id(), "")).await,
        Code::InvalidArgument,
        &["staging_target_path"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.unstage(&unknown, &staging).await,
            Code::NotFound,
            &[&unknown],
        );
    }

    let id = new_volume(&mut d, "un", 16 * MIB, cap.clone()).await;
    // Never staged: OK (csi-sanity's cleanup does this for every volume).
    d.unstage(&id, &staging).await.unwrap();
    d.unstage(&id, &d.staging("never")).await.unwrap();

    // While published: FAILED_PRECONDITION, and nothing is torn down.
    let target = d.target("p");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_err(
        d.unstage(&id, &staging).await,
        Code::FailedPrecondition,
        &[&id],
    );
    assert_eq!((mounts_at(&staging), mounts_at(&target)), (1, 1));
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}
