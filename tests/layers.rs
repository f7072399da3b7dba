//! The device seam on the real kernel: a volume whose file system sits on a device layer of its
//! stack (the test layer `stacked-loop`: a second loop device over the volume's loop device),
//! driven through the CSI RPCs as the kubelet drives it. The file system must be made and
//! mounted on the top device, found again after a driver restart, grown through every layer,
//! and the stack closed top-down at unstage with no device left behind.
//!
//! Root, real loop devices, real mkfs and mounts; the fixture's Drop releases what is left
//! (stacked devices first) and asserts nothing leaked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use loopcsi::csi;
use loopcsi::host::loopdev::LoopDevice;
use loopcsi::host::mount;
use tonic::Code;

/// CreateVolume of a volume with the stacked-loop layer over its loop device.
fn layered(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    let key = loopcsi::volume::stack::LAYERS_KEY;
    with_params(create_req(name, bytes, cap), &[(key, "stacked-loop")])
}

/// The device numbers the file system at `path` is mounted from, per /proc/self/mountinfo.
fn mounted_from(path: &Path) -> (u32, u32) {
    let table = mount::mounts().unwrap();
    let m = mount::mounted_at(&table, path).unwrap_or_else(|| panic!("{path:?} is mounted"));
    (m.major, m.minor)
}

/// The kernel's name of a block device (`loop7`), from sysfs.
fn sysfs_name(numbers: (u32, u32)) -> String {
    let link = std::fs::read_link(format!("/sys/dev/block/{}:{}", numbers.0, numbers.1)).unwrap();
    link.file_name().unwrap().to_string_lossy().into_owned()
}

/// The numbers of the block device a loop device (by name) is backed by: sysfs's backing file,
/// which must be a device node, and that node's `st_rdev`.
fn backing_device_of(name: &str) -> (u32, u32) {
    let file = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap();
    let node = std::fs::metadata(file.trim_end()).unwrap();
    let rdev = node.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    (u32::try_from(major).unwrap(), u32::try_from(minor).unwrap())
}

/// A device's size in bytes, from sysfs (512-byte sectors).
fn device_bytes(name: &str) -> i64 {
    let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size")).unwrap();
    sectors.trim().parse::<i64>().unwrap() * 512
}

/// Checks the stack of volume `id` mounted at `path`: the file system is on a loop device whose
/// backing device is the volume's own loop device. Returns the top device's sysfs name.
fn assert_on_the_layer(d: &TestDriver, id: &str, path: &Path) -> String {
    let volume_loop: LoopDevice = d.loop_device_of(id).expect("the volume's loop device");
    let top = mounted_from(path);
    assert_ne!(
        top,
        volume_loop.dev_numbers().unwrap(),
        "not on the loop device itself"
    );
    let name = sysfs_name(top);
    assert!(name.starts_with("loop"), "the top is a loop device: {name}");
    assert_eq!(
        backing_device_of(&name),
        volume_loop.dev_numbers().unwrap(),
        "{name} is backed by the volume's loop device"
    );
    name
}

fn statvfs_total(path: &Path) -> i64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    i64::try_from(st.blocks() * st.fragment_size()).unwrap()
}

async fn expand(
    d: &mut TestDriver,
    id: &str,
    path: &Path,
    bytes: i64,
) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
    let req = csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    d.node.node_expand_volume(req).await.map(|r| r.into_inner())
}

/// Stages and publishes volume `id` as `name`; returns (staging, target).
async fn mount_it(
    d: &mut TestDriver,
    id: &str,
    name: &str,
    cap: &csi::VolumeCapability,
) -> (PathBuf, PathBuf) {
    let (staging, target) = (d.staging(name), d.target(name));
    d.stage(id, &staging, cap.clone()).await.unwrap();
    d.publish(id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    (staging, target)
}

/// Unpublishes and unstages; then no device of the test is left (stacked ones included).
async fn unmount_it(d: &mut TestDriver, id: &str, staging: &Path, target: &Path) {
    d.unpublish(id, target).await.unwrap();
    d.unstage(id, staging).await.unwrap();
    assert_eq!(
        d.loop_device_of(id),
        None,
        "the volume's loop device is detached"
    );
    assert_eq!(
        leftovers_under(d.root()),
        Vec::<String>::new(),
        "no mount or loop device (stacked or not) is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ext4_volume_lives_on_a_stacked_loop_layer_across_a_restart() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(layered("layered-ext4", 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_it(&mut d, &id, "layered-ext4", &cap).await;
    let top = assert_on_the_layer(&d, &id, &staging);
    assert_eq!(mounted_from(&target), mounted_from(&staging));
    let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let mut file = std::fs::File::create(target.join("kept.bin")).unwrap();
    file.write_all(&data).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let devices_before = leftovers_under(d.root()).len();

    // A restart of the plugin: the new driver finds the stack from the kernel's view.
    d.restart().await;
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(assert_on_the_layer(&d, &id, &staging), top, "the same top");
    assert_eq!(
        leftovers_under(d.root()).len(),
        devices_before,
        "nothing attached, opened or mounted twice"
    );
    let stats = d.stats(&id, &target).await.unwrap();
    assert!(
        !stats.usage.is_empty(),
        "stats found the file system on the top"
    );
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);

    // Expansion grows the loop device, the layer, then ext4 on the top: online only with
    // CAP_SYS_RESOURCE (resize2fs), which this machine may not give.
    let result = expand(&mut d, &id, &target, 96 * MIB).await;
    assert_eq!(
        device_bytes(&top),
        96 * MIB,
        "the layer grew with the loop device"
    );
    if has_cap_sys_resource() {
        eprintln!("CAP_SYS_RESOURCE held: ext4 grew online on the layer");
        assert_eq!(result.unwrap().capacity_bytes, 96 * MIB);
        assert!(statvfs_total(&target) > 64 * MIB);
    } else {
        eprintln!(
            "CAP_SYS_RESOURCE not held: the online ext4 grow is refused (resize2fs EPERM); \
             the xfs test grows a layered file system online"
        );
        assert_code(result, Code::FailedPrecondition, "CAP_SYS_RESOURCE");
    }
    let mut back = Vec::new();
    std::fs::File::open(target.join("kept.bin"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data, "the data is intact on the layer");

    unmount_it(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xfs_volume_on_a_stacked_loop_layer_grows_online_through_the_layer() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("xfs", snw());
    let id = d
        .create(layered("layered-xfs", 300 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_it(&mut d, &id, "layered-xfs", &cap).await;
    let top = assert_on_the_layer(&d, &id, &staging);
    let before = statvfs_total(&target);

    let grown = expand(&mut d, &id, &target, 400 * MIB).await.unwrap();
    assert_eq!(grown.capacity_bytes, 400 * MIB);
    assert_eq!(device_bytes(&top), 400 * MIB, "the layer grew");
    let after = statvfs_total(&target);
    assert!(
        after >= before + 90 * MIB,
        "xfs on the layer grew: {before} -> {after}"
    );

    unmount_it(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_block_volume_publishes_the_top_of_its_stack_read_write_and_read_only() {
    let mut d = TestDriver::start().await;
    // Two targets of one volume: a multi-writer mode.
    let cap = block_cap(csi::volume_capability::access_mode::Mode::SingleNodeMultiWriter);
    let id = d
        .create(layered("layered-block", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("layered-block");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let (rw, ro) = (d.target("block-rw"), d.target("block-ro"));
    d.publish(&id, &staging, &rw, cap.clone(), false)
        .await
        .unwrap();
    d.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();
    let volume_loop = d.loop_device_of(&id).unwrap().dev_numbers().unwrap();
    for target in [&rw, &ro] {
        let rdev = std::fs::metadata(target).unwrap().rdev();
        let numbers = (
            u32::try_from(nix::sys::stat::major(rdev)).unwrap(),
            u32::try_from(nix::sys::stat::minor(rdev)).unwrap(),
        );
        let name = sysfs_name(numbers);
        assert_ne!(
            numbers, volume_loop,
            "{target:?} is the top, not the loop device"
        );
        // The read-only stack sits on a read-only loop device of the same image.
        let lower = backing_device_of(&name);
        let lower_name = sysfs_name(lower);
        let image =
            std::fs::read_to_string(format!("/sys/block/{lower_name}/loop/backing_file")).unwrap();
        assert_eq!(Path::new(image.trim_end()), d.image_path(&id));
    }
    let ro_name = {
        let rdev = std::fs::metadata(&ro).unwrap().rdev();
        sysfs_name((
            u32::try_from(nix::sys::stat::major(rdev)).unwrap(),
            u32::try_from(nix::sys::stat::minor(rdev)).unwrap(),
        ))
    };
    let ro_flag = std::fs::read_to_string(format!("/sys/block/{ro_name}/ro")).unwrap();
    assert_eq!(
        ro_flag.trim(),
        "1",
        "the read-only target's top is read-only"
    );

    d.unpublish(&id, &ro).await.unwrap();
    d.unpublish(&id, &rw).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    assert_eq!(leftovers_under(d.root()), Vec::<String>::new());
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// After a reboot (every mount and device gone, the node records kept) the kubelet re-publishes
/// without re-staging: publish re-attaches the loop device, re-opens the layer over it and
/// mounts the file system found on the top, without formatting it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_is_repaired_by_the_next_publish_which_reopens_the_layer() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(layered("layered-reboot", 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = mount_it(&mut d, &id, "layered-reboot", &cap).await;
    std::fs::write(target.join("before-reboot"), b"precious").unwrap();
    nix::unistd::sync();

    d.stop().await;
    d.simulate_reboot();
    d.restart().await;
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_on_the_layer(&d, &id, &staging);
    assert_eq!(mounted_from(&target), mounted_from(&staging));
    assert_eq!(
        std::fs::read(target.join("before-reboot")).unwrap(),
        b"precious",
        "the file system on the layer was found, not made anew"
    );

    unmount_it(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// An orphan stack: a layered volume staged, then its mount, metadata and node records gone
/// behind the driver (as a deleted volume's leftovers). While a layer is mounted `loopcsi gc`
/// reports it and keeps it; once nothing uses the stack, gc closes the layer, detaches the loop
/// device and removes the image, and no device is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_stack_is_collected_by_gc_top_down_and_no_device_is_left() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(layered("layered-orphan", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("layered-orphan");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let top = assert_on_the_layer(&d, &id, &staging);
    let image = d.image_path(&id);
    d.stop().await;
    let state = d.state_dir();
    std::fs::remove_file(state.join("volumes").join(format!("{id}.json"))).unwrap();
    std::fs::remove_dir_all(state.join("node").join(&id)).unwrap();
    let gc = |dry_run| loopcsi::operator::gc(&state, dry_run, std::time::Duration::ZERO).unwrap();

    // The layer's file system is still mounted: the stack is in use, and kept.
    let report = gc(false);
    assert!(report.collected.is_empty(), "{report:?}");
    let line = &report.unrepairable[0];
    assert!(
        line.contains(&format!("/dev/{top} mounted at {}", staging.display())),
        "{line}"
    );
    assert!(image.exists() && d.loop_device_of(&id).is_some());

    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    let listed = gc(true);
    assert!(
        listed.collected[0].starts_with("would detach")
            && listed.collected[0].contains(&format!("/dev/{top} (")),
        "{listed:?}"
    );
    assert!(
        image.exists() && d.loop_device_of(&id).is_some(),
        "a dry run changes nothing"
    );

    let report = gc(false);
    assert!(report.unrepairable.is_empty(), "{report:?}");
    assert!(
        report.collected[0].starts_with("detached orphan loop device")
            && report.collected[0].contains("after closing its layers top-down")
            && report.collected[0].contains(&format!("/dev/{top} (")),
        "{report:?}"
    );
    assert!(
        !image.exists(),
        "the image without metadata goes in the same run"
    );
    assert_eq!(
        leftovers_under(d.root()),
        Vec::<String>::new(),
        "no loop device (stacked or not) is left"
    );
    d.restart().await;
    d.assert_clean();
}
