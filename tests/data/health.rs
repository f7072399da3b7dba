//! Volume health: conditions reported for what the kernel shows.

use super::*;

// ---- health ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_volumes_report_a_normal_condition() {
    let mut d = TestDriver::start().await;
    for (name, cap) in [
        ("healthy-ext4", mount_cap("ext4", snw())),
        ("healthy-block", block_cap(snw())),
    ] {
        let id = d
            .create(create_req(name, 16 * MIB, cap.clone()))
            .await
            .unwrap()
            .volume_id;
        let unstaged = condition(&mut d, &id).await;
        assert!(!unstaged.abnormal, "{name} unstaged: {unstaged:?}");
        let (staging, target) = mount_volume(&mut d, &id, name, &cap).await;
        let staged = condition(&mut d, &id).await;
        assert!(!staged.abnormal, "{name} published: {staged:?}");
        let stats = d.stats(&id, &target).await.unwrap();
        let from_node = stats
            .volume_condition
            .expect("NodeGetVolumeStats reports the volume condition");
        assert!(!from_node.abnormal, "{name}: {from_node:?}");
        unmount_volume(&mut d, &id, &staging, &target).await;
        d.delete(&id).await.unwrap();
    }
    // Mounted read-only on purpose is not a fault.
    let ro = mount_cap_flags("ext4", snw(), &["ro"]);
    let id = d
        .create(create_req("healthy-ro", 16 * MIB, ro.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "healthy-ro", &ro).await;
    let c = condition(&mut d, &id).await;
    assert!(!c.abnormal, "a volume staged with ro: {c:?}");
    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_missing_backing_file_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let truncated = d
        .create(create_req("truncated", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let missing = d
        .create(create_req("missing", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    // Formatted and holding data, then unstaged.
    for id in [&truncated, &missing] {
        let (staging, target) = mount_volume(&mut d, id, id, &cap).await;
        write_synced(&target.join("data.bin"), &pattern(30, 1 << 20));
        unmount_volume(&mut d, id, &staging, &target).await;
    }

    std::fs::OpenOptions::new()
        .write(true)
        .open(d.image_path(&truncated))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert_abnormal(&condition(&mut d, &truncated).await, "truncated");
    std::fs::remove_file(d.image_path(&missing)).unwrap();
    assert_abnormal(&condition(&mut d, &missing).await, "missing");

    // Cleanup: the broken volumes can still be deleted.
    d.delete(&truncated).await.unwrap();
    d.delete(&missing).await.unwrap();
    assert!(d.list_all().await.is_empty());
    d.assert_clean();
}

/// A backing file emptied behind the driver's back would give a loop device without capacity,
/// which the kernel does not list in /proc/partitions (where the driver finds attached devices):
/// stage refuses it with a message naming the file, and attaches nothing, also when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_backing_file_is_refused_at_stage_and_leaks_no_device() {
    let mut d = TestDriver::start().await;
    for cap in [mount_cap("ext4", snw()), block_cap(snw())] {
        let name = format!(
            "emptied-{}",
            cap.access_type.as_ref().map_or(0, |t| match t {
                csi::volume_capability::AccessType::Mount(_) => 1,
                csi::volume_capability::AccessType::Block(_) => 2,
            })
        );
        let id = d
            .create(create_req(&name, 32 * MIB, cap.clone()))
            .await
            .unwrap()
            .volume_id;
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.image_path(&id))
            .unwrap()
            .set_len(0)
            .unwrap();
        let staging = d.staging(&name);
        for _ in 0..2 {
            assert_code(
                d.stage(&id, &staging, cap.clone()).await,
                tonic::Code::Internal,
                "less than one 4096-byte block",
            );
            let image = d.image_path(&id);
            assert!(
                every_attached_loop_device()
                    .iter()
                    .all(|(_, file)| *file != image),
                "no device may be left attached"
            );
        }
        assert_abnormal(&condition(&mut d, &id).await, "truncated");
        d.delete(&id).await.unwrap();
    }
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_volume_whose_loop_device_is_gone_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("detached", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("detached");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    assert!(!condition(&mut d, &id).await.abnormal);

    // Behind the driver's back.
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    d.loop_device_of(&id).unwrap().detach().unwrap();
    assert!(d.loop_device_of(&id).is_none());
    assert_abnormal(&condition(&mut d, &id).await, "loop device is gone");

    d.unstage(&id, &staging).await.unwrap();
    assert!(!condition(&mut d, &id).await.abnormal, "unstaged: healthy");
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_system_remounted_read_only_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("went-ro", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "went-ro", &cap).await;
    assert!(!condition(&mut d, &id).await.abnormal);

    nix::mount::mount(
        None::<&str>,
        &staging,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    assert_abnormal(&condition(&mut d, &id).await, "read-only");
    let stats = d.stats(&id, &target).await.unwrap();
    assert_abnormal(
        stats.volume_condition.as_ref().expect("volume_condition"),
        "read-only",
    );

    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// The real thing: ext4 with errors=remount-ro meets an error (the kernel's own trigger), and
/// goes read-only by itself; nothing remounts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_read_only_after_a_file_system_error_is_abnormal() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap_flags("ext4", snw(), &["errors=remount-ro"]);
    let id = d
        .create(create_req("fs-error", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_volume(&mut d, &id, "fs-error", &cap).await;
    assert!(!condition(&mut d, &id).await.abnormal);

    let dev = d.loop_device_of(&id).unwrap();
    std::fs::write(
        format!("/sys/fs/ext4/loop{}/trigger_fs_error", dev.0),
        "loopcsi test",
    )
    .unwrap();
    let write = std::fs::File::create(target.join("after-error"));
    assert_eq!(
        write.map(drop).unwrap_err().raw_os_error(),
        Some(nix::libc::EROFS),
        "the kernel made the file system read-only"
    );
    let from_controller = condition(&mut d, &id).await;
    let from_node = d
        .stats(&id, &target)
        .await
        .unwrap()
        .volume_condition
        .expect("volume_condition");

    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
    assert_abnormal(&from_controller, "read-only");
    assert_abnormal(&from_node, "read-only");
}
