//! Hostile, symlinked and odd staging and target paths: refused, or resolved and released.

use super::*;

// ---- staging and target paths ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_staging_and_target_paths_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let real = new_volume(&mut d, "real", cap.clone()).await;
    let fresh = new_volume(&mut d, "fresh", cap.clone()).await;
    let good_staging = d.staging("good");
    d.stage(&real, &good_staging, cap.clone()).await.unwrap();
    let good_target = d.target("good");
    let (good_staging, good_target) = (s(&good_staging), s(&good_target));
    let root = d.root().to_path_buf();
    let state = d.state_dir();
    let link_to_state = root.join("link-to-state");
    std::os::unix::fs::symlink(state.join("volumes"), &link_to_state).unwrap();

    let paths: Vec<String> = vec![
        "relative/path".into(),
        "./x".into(),
        "x/../y".into(),
        "~/x".into(),
        "staging".into(),
        format!("{}/staging/a\0b", root.display()),
        "/\0".into(),
        format!("{}\0/../../etc", root.display()),
        format!("{}/staging/../../../etc", root.display()),
        format!("{}/pods/..", root.display()),
        format!("{}/staging/x/..", root.display()),
        format!("{}/staging/good/../good", root.display()),
        "/".into(),
        "//".into(),
        format!("{}/{}", root.display(), "a/".repeat(HUNDRED_KB / 2)),
        format!("{}/{}", root.display(), "a".repeat(HUNDRED_KB)),
        format!("{}/{}", root.display(), "../".repeat(HUNDRED_KB / 3)),
        s(&state),
        s(&state.join("volumes")),
        s(&state.join("node")),
        s(&state.join("volumes").join(format!("{real}.img"))),
        s(&state.join("volumes").join("new-dir")),
        s(&state.join("node").join("x").join("y")),
        format!("{}/", state.display()),
        s(&root),
        s(&link_to_state),
        s(&link_to_state.join(format!("{real}.json"))),
    ];
    let invalid = &[Code::InvalidArgument][..];
    for path in &paths {
        let shown_path = shown(path);
        let what = |rpc: &str, field: &str| format!("{rpc}({field}={shown_path})");
        f.refused(
            &what("NodeStageVolume", "staging_target_path"),
            d.node
                .node_stage_volume(stage_req(&fresh, path, cap.clone()))
                .await,
            invalid,
            &["staging_target_path"],
        );
        f.refused(
            &what("NodeUnstageVolume", "staging_target_path"),
            d.node.node_unstage_volume(unstage_req(&fresh, path)).await,
            invalid,
            &["staging_target_path"],
        );
        f.refused(
            &what("NodePublishVolume", "target_path"),
            d.node
                .node_publish_volume(publish_req(&real, &good_staging, path, cap.clone()))
                .await,
            invalid,
            &["target_path"],
        );
        f.refused(
            &what("NodePublishVolume", "staging_target_path"),
            d.node
                .node_publish_volume(publish_req(&real, path, &good_target, cap.clone()))
                .await,
            invalid,
            &["staging_target_path"],
        );
        f.refused(
            &what("NodeUnpublishVolume", "target_path"),
            d.node
                .node_unpublish_volume(unpublish_req(&real, path))
                .await,
            invalid,
            &["target_path"],
        );
    }
    // Empty paths are missing fields; a publish without staging path is the README's
    // FAILED_PRECONDITION (STAGE_UNSTAGE_VOLUME is advertised).
    f.refused(
        "NodeStageVolume(staging_target_path=\"\")",
        d.node
            .node_stage_volume(stage_req(&fresh, "", cap.clone()))
            .await,
        invalid,
        &["staging_target_path"],
    );
    f.refused(
        "NodeUnstageVolume(staging_target_path=\"\")",
        d.node.node_unstage_volume(unstage_req(&fresh, "")).await,
        invalid,
        &["staging_target_path"],
    );
    f.refused(
        "NodePublishVolume(target_path=\"\")",
        d.node
            .node_publish_volume(publish_req(&real, &good_staging, "", cap.clone()))
            .await,
        invalid,
        &["target_path"],
    );
    f.refused(
        "NodePublishVolume(staging_target_path=\"\")",
        d.node
            .node_publish_volume(publish_req(&real, "", &good_target, cap.clone()))
            .await,
        &[Code::FailedPrecondition],
        &["staging_target_path"],
    );
    f.refused(
        "NodeUnpublishVolume(target_path=\"\")",
        d.node.node_unpublish_volume(unpublish_req(&real, "")).await,
        invalid,
        &["target_path"],
    );

    // Nothing was mounted, attached or created by any of it.
    let mounted = mounts_under(&root);
    f.check(mounted == vec![PathBuf::from(&good_staging)], || {
        format!("mounts after hostile paths: {mounted:?}")
    });
    f.check(d.loop_device_of(&fresh).is_none(), || {
        "the fresh volume got attached".into()
    });
    f.check(!Path::new(&good_target).exists(), || {
        "the good target was created".into()
    });
    check_state_dir(&d, &mut f);
    no_shell_ran(&root, &mut f);
    still_serving(&mut d).await;
    f.assert_none();

    std::fs::remove_file(&link_to_state).unwrap();
    d.unstage(&real, Path::new(&good_staging)).await.unwrap();
    d.delete(&real).await.unwrap();
    d.delete(&fresh).await.unwrap();
    d.assert_clean();
}

/// A directory standing for "somewhere else" (it is under the test's dir, so nothing real is
/// ever at risk), holding a marker file and a regular file a device might be bound onto.
fn outside_dir(d: &TestDriver) -> PathBuf {
    let outside = d.root().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("marker"), b"marker").unwrap();
    std::fs::write(outside.join("devnode"), b"not a device").unwrap();
    outside
}

fn check_outside_untouched(outside: &Path, f: &mut Findings) {
    let mounted = mounts_under(outside);
    f.check(mounted.is_empty(), || {
        format!("something was mounted outside: {mounted:?}")
    });
    let listed = walk(outside);
    f.check(
        listed == [PathBuf::from("devnode"), PathBuf::from("marker")],
        || format!("files appeared outside: {listed:?}"),
    );
    f.check(
        std::fs::read(outside.join("devnode")).unwrap() == b"not a device",
        || "the file outside was changed".into(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_target_and_staging_paths_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let outside = outside_dir(&d);
    let cap = mount_cap("ext4", snw());
    let bcap = block_cap(snw());
    let vol = new_volume(&mut d, "fs", cap.clone()).await;
    let other = new_volume(&mut d, "other", cap.clone()).await;
    let block = new_volume(&mut d, "block", bcap.clone()).await;
    let staging = d.staging("s");
    let block_staging = d.staging("b");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    d.stage(&block, &block_staging, bcap.clone()).await.unwrap();

    // A target path that is a symlink to a directory elsewhere.
    let dir_link = d.target("dir-link");
    std::os::unix::fs::symlink(&outside, &dir_link).unwrap();
    f.refused(
        "NodePublishVolume(target_path=symlink to a directory)",
        d.publish(&vol, &staging, &dir_link, cap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    // A block target that is a symlink to a file elsewhere.
    let file_link = d.target("file-link");
    std::os::unix::fs::symlink(outside.join("devnode"), &file_link).unwrap();
    f.refused(
        "NodePublishVolume(block, target_path=symlink to a file)",
        d.publish(&block, &block_staging, &file_link, bcap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    // A staging path that is a symlink to a directory elsewhere.
    let staging_link = d.root().join("staging").join("link");
    std::os::unix::fs::symlink(&outside, &staging_link).unwrap();
    f.refused(
        "NodeStageVolume(staging_target_path=symlink)",
        d.stage(&other, &staging_link, cap.clone()).await,
        &[Code::InvalidArgument],
        &["staging_target_path"],
    );
    f.check(d.loop_device_of(&other).is_none(), || {
        "a refused stage left the volume attached".into()
    });
    // Refused before anything was done to the volume: no mkfs ran on it.
    let allocated = loopcsi::host::files::allocated_bytes(&d.image_path(&other)).unwrap();
    f.check(allocated == 0, || {
        format!(
            "NodeStageVolume refused the symlinked staging path only after formatting the \
             volume ({allocated} bytes written to its thin image)"
        )
    });
    // Publishing from a symlink to the real staging path.
    let staging_alias = d.root().join("staging").join("alias");
    std::os::unix::fs::symlink(&staging, &staging_alias).unwrap();
    let target = d.target("via-alias");
    let via_alias = d
        .publish(&vol, &staging_alias, &target, cap.clone(), false)
        .await;
    f.check(via_alias.is_err(), || {
        "NodePublishVolume from a symlinked staging path that is not the staged path succeeded"
            .into()
    });
    if via_alias.is_ok() {
        let _ = d.unpublish(&vol, &target).await;
    }
    check_outside_untouched(&outside, &mut f);
    for link in [&dir_link, &file_link, &staging_link, &staging_alias] {
        f.check(
            std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()),
            || format!("{} is no longer the symlink it was", link.display()),
        );
    }

    // Unpublish and unstage through symlinks to the real paths: they name no publication or
    // staging of the volume, so nothing may be unmounted or removed through them.
    let real_target = d.target("real");
    d.publish(&vol, &staging, &real_target, cap.clone(), false)
        .await
        .unwrap();
    let target_alias = d.target("target-alias");
    std::os::unix::fs::symlink(&real_target, &target_alias).unwrap();
    if let Err(status) = d.unpublish(&vol, &target_alias).await {
        f.message(
            "NodeUnpublishVolume(target_path=symlink to the published target)",
            &status,
            &[Code::InvalidArgument],
            &["target_path"],
        );
    }
    f.check(is_mount_point(&real_target), || {
        "unpublish through a symlink unmounted the real target".into()
    });
    f.check(target_alias.is_symlink(), || {
        "unpublish through a symlink removed the symlink's target".into()
    });
    if let Err(status) = d.unstage(&vol, &staging_alias).await {
        f.message(
            "NodeUnstageVolume(staging_target_path=symlink to the staging path)",
            &status,
            &[Code::InvalidArgument, Code::FailedPrecondition],
            &["staging_target_path"],
        );
    }
    f.check(is_mount_point(&staging), || {
        "unstage through a symlink unmounted the real staging path".into()
    });
    f.check(d.loop_device_of(&vol).is_some(), || {
        "unstage through a symlink detached the volume".into()
    });
    check_outside_untouched(&outside, &mut f);
    no_shell_ran(d.root(), &mut f);
    still_serving(&mut d).await;
    f.assert_none();

    d.unpublish(&vol, &real_target).await.unwrap();
    d.unstage(&vol, &staging).await.unwrap();
    d.unstage(&block, &block_staging).await.unwrap();
    for id in [&vol, &other, &block] {
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_through_a_symlinked_parent_into_the_state_dir_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let bcap = block_cap(snw());
    let vol = new_volume(&mut d, "fs", cap.clone()).await;
    let other = new_volume(&mut d, "other", cap.clone()).await;
    let block = new_volume(&mut d, "block", bcap.clone()).await;
    let staging = d.staging("s");
    let block_staging = d.staging("b");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    d.stage(&block, &block_staging, bcap.clone()).await.unwrap();

    // The CO's directories are symlinks into the state dir, and the leaf does not exist yet:
    // every path below lands inside the state dir once the symlink is followed.
    let pods = d.root().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let into_volumes = pods.join("into-volumes");
    std::os::unix::fs::symlink(d.state_dir().join("volumes"), &into_volumes).unwrap();
    let into_node = d.root().join("staging").join("into-node");
    std::os::unix::fs::symlink(d.state_dir().join("node"), &into_node).unwrap();

    let target = into_volumes.join("new-target");
    f.refused(
        "NodePublishVolume(target_path=<symlink into state/volumes>/new-target)",
        d.publish(&vol, &staging, &target, cap.clone(), false).await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    let block_target = into_volumes.join("new-device");
    f.refused(
        "NodePublishVolume(block, target_path=<symlink into state/volumes>/new-device)",
        d.publish(&block, &block_staging, &block_target, bcap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    let stage_path = into_node.join("new-staging");
    f.refused(
        "NodeStageVolume(staging_target_path=<symlink into state/node>/new-staging)",
        d.stage(&other, &stage_path, cap.clone()).await,
        &[Code::InvalidArgument],
        &["staging_target_path"],
    );

    let in_state = mounts_under(&d.state_dir());
    f.check(in_state.is_empty(), || {
        format!("mounted inside the state dir: {in_state:?}")
    });
    check_state_dir(&d, &mut f);

    // Undo whatever the driver did, through the same paths, before cleaning up.
    let _ = d.unpublish(&vol, &target).await;
    let _ = d.unpublish(&block, &block_target).await;
    let _ = d.unstage(&other, &stage_path).await;
    for stray in [
        d.state_dir().join("volumes").join("new-target"),
        d.state_dir().join("volumes").join("new-device"),
        d.state_dir().join("node").join("new-staging"),
    ] {
        let _ = nix::mount::umount2(&stray, nix::mount::MntFlags::UMOUNT_NOFOLLOW);
        let _ = std::fs::remove_dir(&stray);
        let _ = std::fs::remove_file(&stray);
    }
    std::fs::remove_file(&into_volumes).unwrap();
    std::fs::remove_file(&into_node).unwrap();
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    d.unstage(&block, &block_staging).await.unwrap();
    for id in [&vol, &other, &block] {
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

/// Policy (README, "Paths"): a path that IS a symlink is refused; symlinks in its ancestors are
/// followed, as the kernel follows them when mounting (a kubelet root dir may itself be a
/// symlink). The driver then works with the resolved path throughout, so what it mounts there
/// it also finds and releases again: nothing is left behind where the symlink points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_through_a_symlinked_parent_are_resolved_and_released() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let outside = outside_dir(&d);
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "fs", cap.clone()).await;
    let other = new_volume(&mut d, "other", cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();

    // The pod directory is a symlink elsewhere; the target itself does not exist yet.
    let pods = d.root().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let pod = pods.join("linked-pod");
    std::os::unix::fs::symlink(&outside, &pod).unwrap();
    let target = pod.join("volume");
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert!(
        is_mount_point(&outside.join("volume")),
        "mounted at the resolved path"
    );
    assert!(!d.stats(&vol, &target).await.unwrap().usage.is_empty());
    let staging_parent = d.root().join("staging").join("linked");
    std::os::unix::fs::symlink(&outside, &staging_parent).unwrap();
    let stage_path = staging_parent.join("new-staging");
    std::fs::create_dir_all(&stage_path).unwrap();
    d.stage(&other, &stage_path, cap.clone()).await.unwrap();
    assert!(is_mount_point(&outside.join("new-staging")));

    // Released through the same (unresolved) paths: nothing stays mounted where they point.
    d.unpublish(&vol, &target).await.unwrap();
    d.unstage(&other, &stage_path).await.unwrap();
    f.check(!is_mount_point(&outside.join("volume")), || {
        "the target stayed mounted after unpublish".to_string()
    });
    f.check(!outside.join("volume").exists(), || {
        "unpublish left the target directory".to_string()
    });
    f.check(!is_mount_point(&outside.join("new-staging")), || {
        "the staging stayed mounted after unstage".to_string()
    });
    let _ = std::fs::remove_dir(outside.join("new-staging"));
    check_outside_untouched(&outside, &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    for id in [&vol, &other] {
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_legal_paths_work_and_are_released() {
    // Paths with the characters mountinfo escapes (space, tab, newline, backslash), a literal
    // "\040", and unicode: a legal path must be mounted, recognised and unmounted correctly.
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "odd", cap.clone()).await;
    let odd = "a b\tc\nd\\e\\040f - g\u{202e}h\u{200b}i#卷";
    let staging = d.staging(odd);
    let target = d.target(odd);

    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    assert!(is_mount_point(&staging), "the odd staging path is mounted");
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert!(is_mount_point(&target), "the odd target path is mounted");
    std::fs::write(target.join("file"), b"data").unwrap();
    assert!(!d.stats(&vol, &target).await.unwrap().usage.is_empty());
    // Unstage while published is refused: the driver sees the odd target in mountinfo.
    assert_code(
        d.unstage(&vol, &staging).await,
        Code::FailedPrecondition,
        "published",
    );
    d.unpublish(&vol, &target).await.unwrap();
    assert!(!target.exists(), "the target is removed");
    d.unstage(&vol, &staging).await.unwrap();
    d.unstage(&vol, &staging).await.unwrap();
    d.assert_clean();
    still_serving(&mut d).await;
    d.delete(&vol).await.unwrap();
}

// ---- legal paths near PATH_MAX ----

/// A legal absolute path of about `len` bytes under `base` (components of 200 bytes).
fn long_path(base: &Path, len: usize) -> PathBuf {
    let mut path = base.to_path_buf();
    while path.as_os_str().len() + 201 < len {
        path.push("c".repeat(200));
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_path_max_paths_give_bounded_messages() {
    // co_path admits paths up to 4096 bytes; errors about them must still stay under 1 KB.
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let outside = outside_dir(&d);
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "long", cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();

    let long_dir = long_path(&d.root().join("long"), 3900);
    std::fs::create_dir_all(&long_dir).unwrap();
    let long_link = long_dir.join("link");
    std::os::unix::fs::symlink(&outside, &long_link).unwrap();
    let long_missing = long_dir.join("missing");

    f.refused(
        "NodePublishVolume(staging_target_path=<3.9 KB, not staged>)",
        d.publish(&vol, &long_missing, &d.target("t"), cap.clone(), false)
            .await,
        &[Code::FailedPrecondition],
        &["staging_target_path"],
    );
    f.refused(
        "NodePublishVolume(target_path=<3.9 KB symlink>)",
        d.publish(&vol, &staging, &long_link, cap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    f.refused(
        "NodeGetVolumeStats(volume_path=<3.9 KB>)",
        d.stats(&vol, &long_missing).await,
        &[Code::NotFound],
        &[],
    );
    check_outside_untouched(&outside, &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    d.delete(&vol).await.unwrap();
    d.assert_clean();
}
