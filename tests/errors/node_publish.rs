//! NodePublishVolume: preconditions, access modes, read-only enforcement, and paths and flags
//! that must never reach the kernel. The other node RPCs: node_unpublish_stats_info.rs.

use super::*;

// ---- NodePublishVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_required_fields_and_preconditions() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let staging = d.staging("s");
    let target = d.target("p");
    let (st, tg) = (s(&staging), s(&target));

    // Required fields, checked before the (unknown) id is looked up.
    assert_err(
        d.node
            .node_publish_volume(csi::NodePublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req("", &st, &tg, Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(&random_id(), &st, "", Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["target_path"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(&random_id(), &st, &tg, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(&random_id(), "", &tg, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(
                &random_id(),
                &st,
                "relative/target",
                Some(cap.clone()),
            ))
            .await,
        Code::InvalidArgument,
        &["target_path"],
    );
    // Unknown volume, complete request.
    let unknown = random_id();
    assert_err(
        d.node
            .node_publish_volume(publish_req(&unknown, &st, &tg, Some(cap.clone())))
            .await,
        Code::NotFound,
        &[&unknown],
    );

    let id = new_volume(&mut d, "pub", 16 * MIB, cap.clone()).await;
    // Not staged.
    assert_err(
        d.publish(&id, &staging, &target, cap.clone(), false).await,
        Code::FailedPrecondition,
        &[&id],
    );
    assert!(!target.exists());
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    // staging_target_path missing although STAGE_UNSTAGE_VOLUME is advertised.
    assert_err(
        d.node
            .node_publish_volume(publish_req(&id, "", &tg, Some(cap.clone())))
            .await,
        Code::FailedPrecondition,
        &["staging_target_path"],
    );
    // Staged elsewhere than the staging path given.
    assert_err(
        d.publish(&id, &d.staging("other"), &target, cap.clone(), false)
            .await,
        Code::FailedPrecondition,
        &[&id],
    );
    // A capability the volume cannot serve.
    assert_err(
        d.publish(&id, &staging, &target, block_cap(snw()), false)
            .await,
        Code::FailedPrecondition,
        &["volume_capability"],
    );
    assert_eq!(mounts_at(&target), 0);

    // Published; then the same target with readonly flipped or another capability.
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_err(
        d.publish(&id, &staging, &target, cap.clone(), true).await,
        Code::AlreadyExists,
        &[&id],
    );
    assert_err(
        d.publish(
            &id,
            &staging,
            &target,
            mount_cap_flags("ext4", snw(), &["noexec"]),
            false,
        )
        .await,
        Code::AlreadyExists,
        &[&id],
    );
    assert_eq!(mounts_at(&target), 1, "no stacked mount");

    // A target that is a symlink to a directory: refused, nothing mounted at its destination.
    let dest = d.root().join("elsewhere");
    std::fs::create_dir_all(&dest).unwrap();
    let link = d.target("link");
    std::os::unix::fs::symlink(&dest, &link).unwrap();
    d.unpublish(&id, &target).await.unwrap();
    assert_err(
        d.publish(&id, &staging, &link, cap.clone(), false).await,
        Code::InvalidArgument,
        &["target_path"],
    );
    assert_eq!(mounts_at(&dest), 0, "mounted through the symlink");
    assert_eq!(mounts_at(&link), 0);
    // target == staging.
    assert_err(
        d.publish(&id, &staging, &staging, cap.clone(), false).await,
        Code::InvalidArgument,
        &["target_path"],
    );
    // A target inside the state dir.
    assert_err(
        d.publish(&id, &staging, &d.state_dir().join("t"), cap.clone(), false)
            .await,
        Code::InvalidArgument,
        &["target_path", "state dir"],
    );

    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

/// Publishing at a second target: only SINGLE_NODE_MULTI_WRITER allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_second_target_depends_on_access_mode() {
    let mut d = TestDriver::start().await;
    for (m, second_ok) in [
        (Mode::SingleNodeSingleWriter, false),
        (Mode::SingleNodeWriter, false),
        (Mode::SingleNodeReaderOnly, false),
        (Mode::SingleNodeMultiWriter, true),
    ] {
        let name = m.as_str_name().to_lowercase();
        let cap = mount_cap("ext4", m);
        let id = new_volume(&mut d, &name, 16 * MIB, cap.clone()).await;
        let staging = d.staging(&name);
        let first = d.target(&format!("{name}-1"));
        let second = d.target(&format!("{name}-2"));
        d.stage(&id, &staging, cap.clone()).await.unwrap();
        d.publish(&id, &staging, &first, cap.clone(), false)
            .await
            .unwrap();
        let result = d.publish(&id, &staging, &second, cap.clone(), false).await;
        if second_ok {
            result.unwrap_or_else(|e| panic!("{name}: second target refused: {e:?}"));
            assert_eq!(mounts_at(&second), 1);
            d.unpublish(&id, &second).await.unwrap();
        } else {
            assert_err(result, Code::FailedPrecondition, &[&id]);
            assert_eq!(mounts_at(&second), 0, "{name}");
            d.unpublish(&id, &second).await.unwrap();
        }
        assert!(!second.exists(), "{name}: second target left behind");
        // After the first target is gone, another target works.
        d.unpublish(&id, &first).await.unwrap();
        d.publish(&id, &staging, &second, cap.clone(), false)
            .await
            .unwrap();
        d.unpublish(&id, &second).await.unwrap();
        d.unstage(&id, &staging).await.unwrap();
        d.assert_clean();
        d.delete(&id).await.unwrap();
    }

    // Block volumes follow the same rule.
    let cap = block_cap(Mode::SingleNodeSingleWriter);
    let id = new_volume(&mut d, "blk-snsw", 8 * MIB, cap.clone()).await;
    let staging = d.staging("blk");
    let (first, second) = (d.target("blk-1"), d.target("blk-2"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &first, cap.clone(), false)
        .await
        .unwrap();
    assert_err(
        d.publish(&id, &staging, &second, cap.clone(), false).await,
        Code::FailedPrecondition,
        &[&id],
    );
    d.unpublish(&id, &first).await.unwrap();
    d.unpublish(&id, &second).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_readonly_is_enforced() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "ro", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    let (rw, ro) = (d.target("rw"), d.target("ro"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();

    d.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();
    d.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();
    let err = std::fs::write(ro.join("file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    let err = std::fs::create_dir(ro.join("dir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    d.unpublish(&id, &ro).await.unwrap();

    // readonly applied to that target only: a writable publish of the same staging works.
    d.publish(&id, &staging, &rw, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(rw.join("file"), b"x").unwrap();
    d.unpublish(&id, &rw).await.unwrap();

    // SINGLE_NODE_READER_ONLY publishes read-only even without readonly=true.
    let ro_cap = mount_cap("ext4", Mode::SingleNodeReaderOnly);
    let ro_id = new_volume(&mut d, "ro-mode", 16 * MIB, ro_cap.clone()).await;
    let ro_staging = d.staging("ro-mode");
    let ro_target = d.target("ro-mode");
    d.stage(&ro_id, &ro_staging, ro_cap.clone()).await.unwrap();
    d.publish(&ro_id, &ro_staging, &ro_target, ro_cap.clone(), false)
        .await
        .unwrap();
    let err = std::fs::write(ro_target.join("file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    d.unpublish(&ro_id, &ro_target).await.unwrap();
    d.unstage(&ro_id, &ro_staging).await.unwrap();

    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    for v in [&id, &ro_id] {
        d.delete(v).await.unwrap();
    }
}

/// readonly=true on a raw block volume: the device at the target refuses writes (spec: the SP
/// MUST publish the volume read-only), and nothing written through it reaches the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_readonly_block_device_is_not_writable() {
    let mut d = TestDriver::start().await;
    let blk = block_cap(snw());
    let blk_id = new_volume(&mut d, "ro-blk", 8 * MIB, blk.clone()).await;
    let blk_staging = d.staging("blk");
    let blk_target = d.target("blk");
    d.stage(&blk_id, &blk_staging, blk.clone()).await.unwrap();
    d.publish(&blk_id, &blk_staging, &blk_target, blk.clone(), true)
        .await
        .unwrap();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&blk_target)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, b"written through a readonly publish")
                .and_then(|_| f.sync_all())
        });
    let mut head = [0u8; 34];
    {
        use std::io::Read;
        let dev = d.loop_device_of(&blk_id).unwrap();
        std::fs::File::open(dev.path())
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
    }
    // Clean up before asserting, so a failure leaves nothing behind.
    d.unpublish(&blk_id, &blk_target).await.unwrap();
    d.unstage(&blk_id, &blk_staging).await.unwrap();
    d.assert_clean();
    d.delete(&blk_id).await.unwrap();
    assert_ne!(
        &head, b"written through a readonly publish",
        "the write reached the volume"
    );
    let err = written.expect_err("writing to a readonly-published block device succeeded");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(nix::libc::EROFS) | Some(nix::libc::EPERM) | Some(nix::libc::EACCES)
        ),
        "{err}"
    );
}

// ---- issue 12 item 11: paths and flags that used to reach the kernel ----

/// Targets and staging paths under /proc, /sys and /dev (also through a symlink), and a path
/// with a component over NAME_MAX, are INVALID_ARGUMENT naming the field, as are the mount
/// flags that would panic the node (`errors=panic`) or skip the journal replay (`noload`,
/// `norecovery`). The paths are ones the kernel cannot create, so even a driver without the
/// checks makes nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_trees_long_components_and_unsafe_flags_are_invalid_arguments() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "kernel-trees", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    let link = d.root().join("proc-link");
    std::os::unix::fs::symlink("/proc/self", &link).unwrap();
    let long = d.root().join("x".repeat(300)).join("t");
    for (path, why) in [
        ("/proc/self/loopcsi-target".to_string(), "/proc"),
        ("/sys/loopcsi-target".to_string(), "/sys"),
        ("/dev/null/loopcsi-target".to_string(), "/dev"),
        (s(&link.join("loopcsi-target")), "/proc"),
        (s(&long), "300-byte component"),
    ] {
        assert_err(
            d.node
                .node_stage_volume(stage_req(&id, &path, Some(cap.clone())))
                .await,
            Code::InvalidArgument,
            &["staging_target_path", why],
        );
        assert_err(
            d.node
                .node_publish_volume(publish_req(&id, &s(&staging), &path, Some(cap.clone())))
                .await,
            Code::InvalidArgument,
            &["target_path", why],
        );
    }
    for flag in ["errors=panic", "noload", "norecovery"] {
        let flagged = mount_cap_flags("ext4", snw(), &[flag]);
        assert_err(
            d.create(create_req("unsafe-flags", 16 * MIB, flagged.clone()))
                .await,
            Code::InvalidArgument,
            &["mount_flags", flag],
        );
        assert_err(
            d.stage(&id, &staging, flagged).await,
            Code::InvalidArgument,
            &["mount_flags", flag],
        );
    }
    // `errors=` with a safe value is still a valid ext4 option.
    d.stage(
        &id,
        &staging,
        mount_cap_flags("ext4", snw(), &["errors=remount-ro"]),
    )
    .await
    .unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// NodePublish onto an existing directory with entries the driver did not create is refused
/// (FAILED_PRECONDITION), leaving the entries visible; an empty existing directory (what the
/// kubelet and csi-sanity pass) and a repeated publish still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_over_a_non_empty_host_directory_is_refused() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "non-empty-target", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let target = d.target("t");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("host-data"), b"keep me").unwrap();
    assert_err(
        d.publish(&id, &staging, &target, cap.clone(), false).await,
        Code::FailedPrecondition,
        &["target_path", "entries"],
    );
    assert_eq!(
        mounts_at(&target),
        0,
        "nothing mounted over the host's data"
    );
    assert_eq!(std::fs::read(target.join("host-data")).unwrap(), b"keep me");

    std::fs::remove_file(target.join("host-data")).unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(target.join("pod-data"), b"the volume's own").unwrap();
    // A repeat publish sees the volume's own entries through the mount: still idempotent.
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}
