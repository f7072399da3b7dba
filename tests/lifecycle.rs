//! Full volume lifecycles against real loop devices, mkfs and mounts (run as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

use common::*;
use loopcsi::csi;

fn write_file(path: &std::path::Path, contents: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(contents).unwrap();
    f.sync_all().unwrap();
}

/// A recognisable 1 MiB pattern.
fn pattern(seed: u8) -> Vec<u8> {
    (0..(1u32 << 20))
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn filesystem_lifecycle(fs: &str, size: i64) {
    let mut d = TestDriver::start().await;
    let cap = mount_cap(fs, snw());
    let vol = d
        .create(create_req(&format!("pvc-{fs}"), size, cap.clone()))
        .await
        .unwrap();
    assert_eq!(vol.capacity_bytes, size);
    assert_eq!(
        vol.accessible_topology[0].segments["topology.loopcsi.dev/node"],
        NODE
    );
    let id = vol.volume_id.clone();
    let staging = d.staging("s1");
    let target = d.target("pod-a");

    d.stage(&id, &staging, cap.clone()).await.unwrap();
    // The loop device runs direct I/O with 4096-byte logical blocks.
    let dev = d.loop_device_of(&id).expect("staged volume is attached");
    assert!(
        dev.direct_io(),
        "direct I/O is on for a pool that supports it"
    );
    let lbs = std::fs::read_to_string(format!("/sys/block/loop{}/queue/logical_block_size", dev.0))
        .unwrap();
    assert_eq!(lbs.trim(), "4096");
    let mounted = loopcsi::host::mount::mounts().unwrap();
    let staged = mounted
        .iter()
        .find(|m| m.mount_point == staging)
        .expect("staging is mounted");
    assert_eq!(staged.fs_type, fs);

    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert!(target.is_dir(), "the driver creates the target directory");
    let data = pattern(7);
    write_file(&target.join("data.bin"), &data);

    let stats = d.stats(&id, &target).await.unwrap();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert!(
        bytes.total > 0 && bytes.total <= size && bytes.used >= 1 << 20,
        "{bytes:?}"
    );
    assert!(stats
        .usage
        .iter()
        .any(|u| u.unit == csi::volume_usage::Unit::Inodes as i32 && u.used > 0));
    // Stats also answer for the staging path.
    d.stats(&id, &staging).await.unwrap();

    d.unpublish(&id, &target).await.unwrap();
    assert!(
        !target.exists(),
        "unpublish deletes the target directory it created"
    );
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();

    // A restart of the driver in between: same state dir, nothing in the kernel.
    d.restart().await;
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("data.bin")).unwrap(),
        data,
        "data survives re-stage and restart"
    );
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    assert!(
        !d.image_path(&id).exists(),
        "delete removes the backing file"
    );
    assert!(d.list_all().await.is_empty());
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_volume_lifecycle_keeps_data_across_restage_and_restart() {
    filesystem_lifecycle("ext4", 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_lifecycle_keeps_data_across_restage_and_restart() {
    filesystem_lifecycle("xfs", 300 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_fs_is_ext4() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("", snw());
    let vol = d
        .create(create_req("pvc-default", 32 * MIB, cap.clone()))
        .await
        .unwrap();
    let staging = d.staging("s");
    d.stage(&vol.volume_id, &staging, cap).await.unwrap();
    let mounted = loopcsi::host::mount::mounts().unwrap();
    assert_eq!(
        mounted
            .iter()
            .find(|m| m.mount_point == staging)
            .unwrap()
            .fs_type,
        "ext4"
    );
    d.unstage(&vol.volume_id, &staging).await.unwrap();
    d.assert_clean();
}

/// A CO other than Kubernetes (and csi-sanity's `-csi.testvolumeparameters`) passes the class's
/// file system as the `csi.storage.k8s.io/fstype` parameter with an empty `fs_type`: the volume
/// gets that file system (it used to get ext4), and a request where the two disagree is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_fstype_parameter_picks_the_file_system() {
    let mut d = TestDriver::start().await;
    let fstype = [("csi.storage.k8s.io/fstype", "xfs")];
    let cap = mount_cap("", snw());
    let vol = d
        .create(with_params(
            create_req("pvc-class-xfs", 300 * MIB, cap.clone()),
            &fstype,
        ))
        .await
        .unwrap();
    let staging = d.staging("s");
    d.stage(&vol.volume_id, &staging, cap).await.unwrap();
    let mounted = loopcsi::host::mount::mounts().unwrap();
    let fs = &mounted
        .iter()
        .find(|m| m.mount_point == staging)
        .unwrap()
        .fs_type;
    assert_eq!(fs, "xfs");
    d.unstage(&vol.volume_id, &staging).await.unwrap();
    d.delete(&vol.volume_id).await.unwrap();

    let conflict = with_params(
        create_req("pvc-conflict", 300 * MIB, mount_cap("ext4", snw())),
        &fstype,
    );
    assert_code(
        d.create(conflict).await,
        tonic::Code::InvalidArgument,
        "csi.storage.k8s.io/fstype",
    );
    let unknown = with_params(
        create_req("pvc-btrfs", 300 * MIB, mount_cap("", snw())),
        &[("csi.storage.k8s.io/fstype", "btrfs")],
    );
    assert_code(
        d.create(unknown).await,
        tonic::Code::InvalidArgument,
        "btrfs",
    );
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_lifecycle_keeps_data_across_restage_and_restart() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());
    let vol = d
        .create(create_req("pvc-block", 16 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let staging = d.staging("s1");
    let target = d.target("pod-b");

    d.stage(&id, &staging, cap.clone()).await.unwrap();
    assert!(d.loop_device_of(&id).is_some());
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()),
        "target is the device"
    );
    let data = pattern(3);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.write_all(&data).unwrap();
        dev.sync_all().unwrap();
    }
    let stats = d.stats(&id, &target).await.unwrap();
    assert_eq!(stats.usage[0].total, 16 * MIB);

    d.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists(), "unpublish deletes the file it created");
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.restart().await;

    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let mut back = vec![0u8; data.len()];
    {
        let mut dev = std::fs::File::open(&target).unwrap();
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.read_exact(&mut back).unwrap();
    }
    assert!(back == data, "block data survives re-stage and restart");
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// After a reboot (no loop devices, no mounts) the kubelet calls NodePublishVolume without a
/// fresh NodeStageVolume: publish repairs the staging instead of binding an empty directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_after_reboot_restages_without_reformatting() {
    let mut d = TestDriver::start().await;
    let fs_cap = mount_cap("ext4", snw());
    let blk_cap = block_cap(snw());
    let fs_vol = d
        .create(create_req("pvc-fs", 32 * MIB, fs_cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let blk_vol = d
        .create(create_req("pvc-blk", 8 * MIB, blk_cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (fs_staging, fs_target) = (d.staging("fs"), d.target("pod-fs"));
    let (blk_staging, blk_target) = (d.staging("blk"), d.target("pod-blk"));
    d.stage(&fs_vol, &fs_staging, fs_cap.clone()).await.unwrap();
    d.publish(&fs_vol, &fs_staging, &fs_target, fs_cap.clone(), false)
        .await
        .unwrap();
    d.stage(&blk_vol, &blk_staging, blk_cap.clone())
        .await
        .unwrap();
    d.publish(&blk_vol, &blk_staging, &blk_target, blk_cap.clone(), false)
        .await
        .unwrap();
    write_file(&fs_target.join("before-reboot"), b"precious");
    {
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&blk_target)
            .unwrap();
        dev.write_all(b"raw precious").unwrap();
        dev.sync_all().unwrap();
    }

    d.stop().await;
    d.simulate_reboot();
    d.restart().await;

    // The kubelet re-publishes; it does not re-stage.
    d.publish(&fs_vol, &fs_staging, &fs_target, fs_cap.clone(), false)
        .await
        .unwrap();
    d.publish(&blk_vol, &blk_staging, &blk_target, blk_cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(fs_target.join("before-reboot")).unwrap(),
        b"precious"
    );
    let mut raw = [0u8; 12];
    std::fs::File::open(&blk_target)
        .unwrap()
        .read_exact(&mut raw)
        .unwrap();
    assert_eq!(&raw, b"raw precious");
    // A repeated publish is a no-op.
    d.publish(&fs_vol, &fs_staging, &fs_target, fs_cap.clone(), false)
        .await
        .unwrap();

    for (id, staging, target) in [
        (&fs_vol, &fs_staging, &fs_target),
        (&blk_vol, &blk_staging, &blk_target),
    ] {
        d.unpublish(id, target).await.unwrap();
        d.unstage(id, staging).await.unwrap();
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

/// Every RPC repeated after it took effect succeeds and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_idempotent() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let req = create_req("pvc-idem", 32 * MIB, cap.clone());
    let first = d.create(req.clone()).await.unwrap();
    let second = d.create(req).await.unwrap();
    assert_eq!(first, second, "same name, same arguments: same response");
    let id = first.volume_id;
    let staging = d.staging("s");
    let target = d.target("p");
    for _ in 0..3 {
        d.stage(&id, &staging, cap.clone()).await.unwrap();
    }
    let dev = d.loop_device_of(&id);
    for _ in 0..3 {
        d.publish(&id, &staging, &target, cap.clone(), false)
            .await
            .unwrap();
    }
    assert_eq!(d.loop_device_of(&id), dev, "no second loop device");
    let mounts_at = |p: &std::path::Path| {
        loopcsi::host::mount::mounts()
            .unwrap()
            .iter()
            .filter(|m| m.mount_point == p)
            .count()
    };
    assert_eq!(
        (mounts_at(&staging), mounts_at(&target)),
        (1, 1),
        "no stacked mounts"
    );
    for _ in 0..3 {
        d.unpublish(&id, &target).await.unwrap();
    }
    for _ in 0..3 {
        d.unstage(&id, &staging).await.unwrap();
    }
    d.assert_clean();
    for _ in 0..3 {
        d.delete(&id).await.unwrap();
    }
    // Capabilities, info and probe are stable too.
    for _ in 0..2 {
        let info = d
            .identity
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "loopcsi.dev");
        assert!(!info.vendor_version.is_empty());
        let probe = d
            .identity
            .probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(probe.ready.is_some());
    }
}

/// Thick volumes are fully allocated on disk, and formatting does not punch them back out;
/// thin volumes allocate only what is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thick_volumes_are_really_allocated_and_thin_ones_sparse() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let size = 64 * MIB;
    let thick = d
        .create(with_params(
            create_req("thick", size, cap.clone()),
            &[("provisioning", "thick")],
        ))
        .await
        .unwrap()
        .volume_id;
    let thin = d
        .create(with_params(
            create_req("thin", size, cap.clone()),
            &[("provisioning", "thin")],
        ))
        .await
        .unwrap()
        .volume_id;
    let volumes = d.state_dir().join("volumes");
    let allocated = |id: &str| {
        std::fs::metadata(volumes.join(format!("{id}.img")))
            .unwrap()
            .blocks() as i64
            * 512
    };
    assert!(
        allocated(&thick) >= size,
        "thick allocates everything up front"
    );
    assert!(allocated(&thin) < size / 8, "thin starts sparse");
    for (id, name) in [(&thick, "thick"), (&thin, "thin")] {
        let staging = d.staging(name);
        d.stage(id, &staging, cap.clone()).await.unwrap();
        d.unstage(id, &staging).await.unwrap();
    }
    assert!(
        allocated(&thick) >= size,
        "mkfs did not discard the thick allocation"
    );
    assert!(
        allocated(&thin) < size / 2,
        "mkfs did not fill the thin volume"
    );
    // The same name with the other provisioning is a different volume: ALREADY_EXISTS.
    assert_code(
        d.create(with_params(
            create_req("thick", size, cap.clone()),
            &[("provisioning", "thin")],
        ))
        .await,
        tonic::Code::AlreadyExists,
        "Thick",
    );
    d.delete(&thick).await.unwrap();
    d.delete(&thin).await.unwrap();
    d.assert_clean();
}

/// Concurrent CreateVolume calls with one name make exactly one volume; the losers are ABORTED
/// (and a retry returns the winner's volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_create_with_one_name_makes_one_volume() {
    let mut d = TestDriver::start().await;
    let req = create_req("pvc-race", 16 * MIB, block_cap(snw()));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = d.controller.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move { client.create_volume(req).await }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(reply) => {
                ids.insert(reply.into_inner().volume.unwrap().volume_id);
            }
            Err(status) => assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}"),
        }
    }
    let retry = d.create(req).await.unwrap();
    ids.insert(retry.volume_id.clone());
    assert_eq!(ids.len(), 1, "one volume id for one name");
    let listed = d.list_all().await;
    assert_eq!(listed.len(), 1);
    let images = std::fs::read_dir(d.state_dir().join("volumes"))
        .unwrap()
        .count();
    assert_eq!(images, 2, "one image and one metadata file");
    d.delete(&retry.volume_id).await.unwrap();
}

/// Node RPCs find a staged file system's loop device from the mount at the staging path (or a
/// target) instead of scanning every attached device: the device numbers mountinfo shows must
/// lead back to the very device the volume is attached to, and nothing else must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_device_numbers_lead_back_to_the_volumes_loop_device() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("numbers", 32 << 20, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("numbers");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let device = d.loop_device_of(&id).expect("staged volume has a device");
    let table = loopcsi::host::mount::mounts().unwrap();
    let entry = loopcsi::host::mount::mounted_at(&table, &staging).expect("staging is mounted");
    assert_eq!(
        loopcsi::host::loopdev::LoopDevice::from_dev_numbers(entry.major, entry.minor),
        Some(device)
    );
    // Not a loop device: the file system the test dir lives on, and a made-up minor.
    let root = table
        .iter()
        .find(|m| m.mount_point == std::path::Path::new("/"))
        .unwrap();
    if root.major != 7 {
        assert_eq!(
            loopcsi::host::loopdev::LoopDevice::from_dev_numbers(root.major, root.minor),
            None
        );
    }
    assert_eq!(
        loopcsi::host::loopdev::LoopDevice::from_dev_numbers(7, u32::MAX >> 12),
        None
    );
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}
