//! The fake behaves as the kernel (and the real `host/` functions) do for the cases the
//! domain relies on; no root needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use super::{FakeHost, Op};
use crate::error::Error;
use crate::host::files::Allocation;
use crate::host::loopdev::{AttachOptions, FileId, LoopDevice};
use crate::host::mount::MountOptions;
use crate::host::os::{Host, NodeKind};
use crate::host::tools::{FsType, Probe};

const RW: AttachOptions = AttachOptions {
    direct_io: true,
    read_only: false,
};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    fake: Arc<FakeHost>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let fake = Arc::new(FakeHost::new(&root));
    Setup {
        _dir: dir,
        root,
        fake,
    }
}

impl Setup {
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.root.join(name);
        let image = self
            .fake
            .create_image(&path, size, Allocation::Sparse)
            .unwrap();
        drop(image);
        path
    }

    fn dir(&self, name: &str) -> PathBuf {
        let path = self.root.join(name);
        self.fake.create_dir_all(&path).unwrap();
        path
    }

    /// An attached image with an ext4 on it, mounted at `staging`.
    fn staged(&self) -> (LoopDevice, PathBuf) {
        let image = self.image("v.img", 16 << 20);
        let dev = self.fake.attach(&image, RW).unwrap();
        self.fake.mkfs(FsType::Ext4, &dev.path()).unwrap();
        let staging = self.dir("staging");
        let opts = MountOptions::default();
        self.fake
            .mount_device(&dev.path(), &staging, "ext4", &opts)
            .unwrap();
        (dev, staging)
    }
}

fn errno_of(err: &Error) -> Option<Errno> {
    match err {
        Error::Sys { errno, .. } => Some(*errno),
        Error::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
        _ => None,
    }
}

#[test]
fn attach_hands_out_the_lowest_free_device_and_matches_by_identity() {
    let s = setup();
    let host: Arc<dyn Host> = s.fake.clone();
    let image = s.image("v.img", 1 << 20);
    let dev = host.attach(&image, RW).unwrap();
    assert_eq!(dev, LoopDevice(0));
    let ro = AttachOptions {
        direct_io: false,
        read_only: true,
    };
    assert_eq!(host.attach(&image, ro).unwrap(), LoopDevice(1));
    let id = FileId::of(&image).unwrap();
    let attached = host.attached_devices().unwrap();
    assert!(attached.iter().all(|a| a.backs(&id)));
    assert_eq!(host.devices_of(&image).unwrap().len(), 2);
    assert_eq!(host.find_by_backing_file(&image).unwrap(), Some(dev));
    assert_eq!(host.loop_status(dev).unwrap(), Some((id, false)));
    assert_eq!(host.dev_numbers(dev).unwrap(), (7, 0));
    assert_eq!(host.loop_device(7, 1), Some(LoopDevice(1)));
    assert_eq!(host.loop_device(8, 1), None);
    assert!(host.direct_io(dev));

    let tiny = s.root.join("tiny.img");
    std::fs::write(&tiny, b"x").unwrap();
    assert!(matches!(
        host.attach(&tiny, RW),
        Err(Error::TinyImage { .. })
    ));
    // A detached device is free again; detaching it twice is success.
    host.detach(dev).unwrap();
    host.detach(dev).unwrap();
    assert_eq!(host.loop_status(dev).unwrap(), None);
    assert_eq!(host.attach(&image, RW).unwrap(), LoopDevice(0));
}

#[test]
fn a_file_system_lives_in_the_backing_file() {
    let s = setup();
    let image = s.image("v.img", 16 << 20);
    let dev = s.fake.attach(&image, RW).unwrap();
    assert_eq!(s.fake.probe(&dev.path()).unwrap(), Probe::Blank);
    assert!(!s.fake.has_data(&image).unwrap());
    s.fake.mkfs(FsType::Xfs, &dev.path()).unwrap();
    assert_eq!(
        s.fake.probe(&dev.path()).unwrap(),
        Probe::FileSystem("xfs".into())
    );
    assert!(s.fake.has_data(&image).unwrap());
    // Detached and attached again (another number, same file): still xfs.
    let other = s.image("w.img", 16 << 20);
    let first = s.fake.attach(&other, RW).unwrap();
    s.fake.detach(dev).unwrap();
    s.fake.detach(first).unwrap();
    let again = s.fake.attach(&image, RW).unwrap();
    assert_eq!(
        s.fake.probe(&again.path()).unwrap(),
        Probe::FileSystem("xfs".into())
    );
}

#[test]
fn mount_checks_the_type_and_shows_the_device_at_the_mount_point() {
    let s = setup();
    let (dev, staging) = s.staged();
    let other = s.dir("other");
    let err = s
        .fake
        .mount_device(&dev.path(), &other, "xfs", &MountOptions::default())
        .unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::EINVAL), "{err}");
    let table = s.fake.mounts().unwrap();
    assert_eq!(table.len(), 1);
    assert_eq!((table[0].major, table[0].minor), (7, 0));
    assert_eq!(table[0].mount_point, staging);
    let node = s.fake.node(&staging).unwrap().unwrap();
    assert_eq!(node.kind, NodeKind::Directory);
    assert_eq!(node.dev, nix::sys::stat::makedev(7, 0));
    assert!(s.fake.held_exclusively(&dev.path()).unwrap());
    // mkfs refuses a device in use, as mkfs.ext4 does.
    let busy = s.fake.mkfs(FsType::Ext4, &dev.path()).unwrap_err();
    assert!(matches!(busy, Error::Tool { .. }), "{busy}");
}

#[test]
fn unmounting_a_path_that_is_no_mount_point_is_success() {
    // The kernel says EINVAL; `mount::unmount` takes it as "nothing to do".
    let s = setup();
    let plain = s.dir("plain");
    s.fake.unmount(&plain).unwrap();
    s.fake.unmount(&s.root.join("missing")).unwrap();
    assert_eq!(
        s.fake.ops(),
        vec![Op::CreateDirAll, Op::Unmount, Op::Unmount]
    );
}

#[test]
fn detaching_a_mounted_device_is_deferred_until_its_last_unmount() {
    let s = setup();
    let (dev, staging) = s.staged();
    let err = s.fake.detach(dev).unwrap_err();
    assert!(matches!(err, Error::DeviceStillOpen { .. }), "{err}");
    assert_eq!(s.fake.loop_devices().len(), 1, "still attached");
    s.fake.unmount(&staging).unwrap();
    assert!(
        s.fake.loop_devices().is_empty(),
        "detached on the last close"
    );
    // Nothing was formatted twice, and the detach came before the unmount only as a refusal.
    assert_eq!(s.fake.calls_of(Op::Mkfs).len(), 1);
}

#[test]
fn a_bound_device_node_is_a_block_device_with_the_devices_numbers() {
    let s = setup();
    let image = s.image("v.img", 1 << 20);
    let dev = s.fake.attach(&image, RW).unwrap();
    let target = s.root.join("target");
    s.fake.create_empty_file(&target).unwrap();
    s.fake
        .bind(&dev.path(), &target, &MountOptions::default())
        .unwrap();
    let entry = s.fake.mounts().unwrap().pop().unwrap();
    assert_eq!((entry.major, entry.minor), (0, 5), "devtmpfs's numbers");
    assert_eq!(entry.root, "/loop0");
    let node = s.fake.node(&target).unwrap().unwrap();
    assert_eq!(node.kind, NodeKind::BlockDevice);
    assert_eq!(node.rdev, nix::sys::stat::makedev(7, 0));
    // A bound node holds no open reference: the device detaches under it.
    assert!(!s.fake.held_exclusively(&dev.path()).unwrap());
    s.fake.detach(dev).unwrap();
    // A bind of a device node onto a directory is refused.
    let dir = s.dir("dir");
    let err = s
        .fake
        .bind(&dev.path(), &dir, &MountOptions::default())
        .unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::ENOTDIR));
}

#[test]
fn injected_ebusy_on_unmount_leaves_the_mount() {
    let s = setup();
    let (_, staging) = s.staged();
    s.fake.fail(Op::Unmount, Errno::EBUSY);
    for _ in 0..2 {
        let err = s.fake.unmount(&staging).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Sys {
                    op: "umount",
                    errno: Errno::EBUSY,
                    ..
                }
            ),
            "{err}"
        );
    }
    assert_eq!(s.fake.mount_table().len(), 1);
    s.fake.clear_failures();
    s.fake.unmount(&staging).unwrap();
    assert!(s.fake.mount_table().is_empty());
}

#[test]
fn the_nth_record_write_fails_with_enospc_and_keeps_the_old_record() {
    let s = setup();
    let record = s.root.join("node").join("v").join("staged.json");
    s.fake.fail_nth(Op::WriteRecord, 2, Errno::ENOSPC);
    s.fake.write_record(&record, b"one").unwrap();
    let err = s.fake.write_record(&record, b"two").unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::ENOSPC), "{err}");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert_eq!(s.fake.read_file(&record).unwrap().unwrap(), b"one");
    s.fake.write_record(&record, b"three").unwrap();
    assert_eq!(s.fake.read_file(&record).unwrap().unwrap(), b"three");
}

#[test]
fn mkfs_failing_halfway_leaves_a_signature_that_is_no_file_system() {
    let s = setup();
    let image = s.image("v.img", 16 << 20);
    let dev = s.fake.attach(&image, RW).unwrap();
    s.fake.mkfs_fails_halfway();
    let err = s.fake.mkfs(FsType::Ext4, &dev.path()).unwrap_err();
    assert!(matches!(err, Error::Tool { .. }), "{err}");
    assert!(matches!(
        s.fake.probe(&dev.path()).unwrap(),
        Probe::Other(_)
    ));
    // Only the next one: a retry formats.
    s.fake.mkfs(FsType::Ext4, &dev.path()).unwrap();
    assert_eq!(
        s.fake.probe(&dev.path()).unwrap(),
        Probe::FileSystem("ext4".into())
    );
}

#[test]
fn a_vanished_device_is_gone_for_every_question() {
    let s = setup();
    let image = s.image("v.img", 1 << 20);
    let dev = s.fake.attach(&image, RW).unwrap();
    s.fake.vanish(dev);
    assert!(s.fake.attached_devices().unwrap().is_empty());
    assert_eq!(s.fake.loop_status(dev).unwrap(), None);
    assert!(s.fake.devices_of(&image).unwrap().is_empty());
    s.fake.detach(dev).unwrap();
    let err = s.fake.probe(&dev.path()).unwrap();
    assert_eq!(
        err,
        Probe::Blank,
        "blkid finds nothing on a detached device"
    );
}

#[test]
fn a_frozen_file_system_outlives_its_last_mount_and_thaws_through_a_new_one() {
    let s = setup();
    let (dev, staging) = s.staged();
    let fs = s.fake.open_fs(&staging, (7, 0)).unwrap();
    assert!(matches!(
        s.fake.open_fs(&staging, (7, 9)),
        Err(Error::FileSystemMoved { .. })
    ));
    s.fake.freeze(&fs).unwrap();
    assert_eq!(s.fake.freeze(&fs), Err(Errno::EBUSY), "already frozen");
    s.fake.unmount(&staging).unwrap();
    // The frozen superblock keeps the device.
    assert!(s.fake.held_exclusively(&dev.path()).unwrap());
    assert!(s.fake.detach(dev).is_err());
    assert!(s.fake.is_frozen((7, 0)));
    // Mounting it again reaches the frozen superblock, which thaws; the deferred detach ends.
    let scratch = s.dir("scratch");
    s.fake
        .mount_device(&dev.path(), &scratch, "ext4", &MountOptions::default())
        .unwrap();
    let fs = s.fake.open_fs(&scratch, (7, 0)).unwrap();
    s.fake.thaw(&fs).unwrap();
    assert_eq!(s.fake.thaw(&fs), Err(Errno::EINVAL), "not frozen");
    s.fake.unmount(&scratch).unwrap();
    assert!(s.fake.loop_devices().is_empty());
}

#[test]
fn calls_are_recorded_in_order_with_their_arguments() {
    let s = setup();
    let (dev, staging) = s.staged();
    s.fake.clear_calls();
    s.fake.unmount(&staging).unwrap();
    s.fake.detach(dev).unwrap();
    let calls = s.fake.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].op, Op::Unmount);
    assert_eq!(calls[0].arg, staging.display().to_string());
    assert_eq!(calls[1].to_string(), "Detach /dev/loop0");
    assert!(
        s.fake.calls_of(Op::Mkfs).is_empty(),
        "nothing was formatted"
    );
}

#[test]
fn paths_outside_the_root_are_refused() {
    let s = setup();
    let outside = Path::new("/etc/loopcsi-fake-must-not-exist");
    assert!(matches!(
        s.fake.write_record(outside, b"x"),
        Err(Error::Internal(_))
    ));
    assert!(!outside.exists());
    assert!(s.fake.unmount(Path::new("/")).is_err());
}

#[test]
fn records_and_their_directories_are_real_files() {
    let s = setup();
    let dir = s.root.join("node").join("v");
    assert_eq!(s.fake.list_dir(&dir).unwrap(), None);
    s.fake.write_record(&dir.join("a.json"), b"{}").unwrap();
    assert_eq!(s.fake.list_dir(&dir).unwrap().unwrap().len(), 1);
    s.fake.remove_durably(&dir.join("a.json")).unwrap();
    s.fake.remove_durably(&dir.join("a.json")).unwrap();
    assert!(s.fake.remove_empty_dir(&dir).unwrap());
    assert_eq!(s.fake.node(&dir).unwrap(), None);
    let image = s.root.join("v.img");
    let new = s
        .fake
        .create_image(&image, 8192, Allocation::Sparse)
        .unwrap();
    s.fake
        .commit_with(&s.root.join("v.json"), b"{}", &new)
        .unwrap();
    assert_eq!(s.fake.node_followed(&image).unwrap().unwrap().len, 8192);
}

#[test]
fn a_device_whose_image_was_deleted_still_reads_its_data() {
    use std::os::unix::fs::FileExt;
    let s = setup();
    let image = s.image("v.img", 1 << 20);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.write_all_at(b"precious", 8192).unwrap();
    let dev = s.fake.attach(&image, RW).unwrap();
    std::fs::remove_file(&image).unwrap();
    let copied = s.fake.copy_device_to_image(&dev.path(), &image).unwrap();
    assert_eq!(copied, 1 << 20);
    let data = std::fs::read(&image).unwrap();
    assert_eq!(&data[8192..8200], b"precious");
}

#[test]
fn binding_a_staged_file_system_shows_its_device_at_the_target() {
    let s = setup();
    let (dev, staging) = s.staged();
    let target = s.dir("target");
    let ro = MountOptions::parse(&["ro".into()]).unwrap();
    s.fake.bind(&staging, &target, &ro).unwrap();
    let entry = s.fake.mounts().unwrap().pop().unwrap();
    assert_eq!((entry.major, entry.minor), (7, dev.0));
    assert!(entry.read_only());
    // Mounting a device that was never made is ENOENT, one without a backing file ENXIO.
    let opts = MountOptions::default();
    let err = s
        .fake
        .mount_device(&LoopDevice(9).path(), &target, "ext4", &opts)
        .unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::ENOENT), "{err}");
    s.fake.unmount(&target).unwrap();
    s.fake.unmount(&staging).unwrap();
    s.fake.detach(dev).unwrap();
    let err = s
        .fake
        .mount_device(&dev.path(), &target, "ext4", &opts)
        .unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::ENXIO), "{err}");
}
