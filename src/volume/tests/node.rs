//! Stage, unstage, publish and unpublish under injected failures.

use nix::errno::Errno;

use super::{bed, block_cap, fs_cap};
use crate::error::Error;
use crate::host::fake::Op;
use crate::host::os::Host;
use crate::volume::params::{FsType, VolumeKind};

#[test]
fn ebusy_on_unmount_during_unstage_keeps_the_device_attached_and_the_record() {
    let b = bed();
    let id = b.staged_fs("v");
    let staging = b.staging(&id);
    let dev = b.device();
    b.host.fail(Op::Unmount, Errno::EBUSY);

    let err = b.volumes.unstage(&id, &staging).unwrap_err();
    assert!(matches!(err, Error::MountBusy { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(b.device(), dev, "the device stays attached");
    assert!(b.mounted_at(&staging), "the staging stays mounted");
    let staged = b.record(&id).staged.expect("the stage record stays");
    assert!(
        staged.unstaging,
        "marked as being unstaged, for the CO's retry"
    );
    assert!(b.host.calls_of(Op::Detach).is_empty(), "never detached");

    b.host.clear_failures();
    b.volumes.unstage(&id, &staging).unwrap();
    assert!(b.devices().is_empty() && !b.mounted_at(&staging));
    assert!(!b.record(&id).exists());
}

#[test]
fn mkfs_failing_halfway_detaches_and_the_retry_refuses_to_format_over_its_remains() {
    let b = bed();
    let id = b.create("v", VolumeKind::Filesystem(FsType::Ext4));
    let staging = b.staging(&id);
    b.host.mkfs_fails_halfway();

    let err = b.volumes.stage(&id, &staging, &fs_cap()).unwrap_err();
    assert!(matches!(err, Error::Tool { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(
        b.devices().is_empty(),
        "the device attached for it is detached"
    );
    assert!(!b.mounted_at(&staging));
    assert_eq!(b.record(&id).staged, None, "no stage is recorded");

    // The partial signature is someone's content as far as a probe can tell: never formatted
    // over, and nothing left attached either.
    let err = b.volumes.stage(&id, &staging, &fs_cap()).unwrap_err();
    assert!(matches!(err, Error::ForeignContent { .. }), "{err:?}");
    assert_eq!(b.host.calls_of(Op::Mkfs).len(), 1, "mkfs ran once");
    assert!(b.devices().is_empty());
}

#[test]
fn enospc_on_the_stage_record_write_is_resource_exhausted_and_the_retry_completes_it() {
    let b = bed();
    let id = b.create("v", VolumeKind::Filesystem(FsType::Ext4));
    let staging = b.staging(&id);
    b.host.fail(Op::WriteRecord, Errno::ENOSPC);

    let err = b.volumes.stage(&id, &staging, &fs_cap()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        b.record(&id).staged,
        None,
        "nothing recorded on a full pool"
    );

    b.host.clear_failures();
    b.volumes.stage(&id, &staging, &fs_cap()).unwrap();
    let dev = b.device(); // one device: the retry reused what the first call attached
    assert!(b.mounted_at(&staging));
    assert_eq!(b.record(&id).staged.unwrap().path, staging);
    assert_eq!(b.host.calls_of(Op::Mkfs).len(), 1, "formatted once");
    assert_eq!(b.host.dev_numbers(dev).unwrap().1, dev.0);
}

#[test]
fn mount_ebusy_is_unavailable_detaches_and_the_retry_does_not_format_again() {
    let b = bed();
    let id = b.create("v", VolumeKind::Filesystem(FsType::Ext4));
    let staging = b.staging(&id);
    b.host.fail_nth(Op::MountDevice, 1, Errno::EBUSY);

    let err = b.volumes.stage(&id, &staging, &fs_cap()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(b.devices().is_empty(), "detached after the failed mount");
    assert_eq!(b.record(&id).staged, None);

    b.volumes.stage(&id, &staging, &fs_cap()).unwrap();
    assert!(b.mounted_at(&staging));
    assert_eq!(
        b.host.calls_of(Op::Mkfs).len(),
        1,
        "the file system made before the failed mount is found, not made again"
    );
}

#[test]
fn detach_refused_during_unstage_keeps_the_unstaging_record_and_reconcile_does_not_remount() {
    let b = bed();
    let id = b.staged_fs("v");
    let staging = b.staging(&id);
    b.host.fail(Op::Detach, Errno::EBUSY);

    let err = b.volumes.unstage(&id, &staging).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Sys {
                op: "LOOP_CLR_FD",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!b.mounted_at(&staging), "unmounted before the detach");
    assert_eq!(b.devices().len(), 1, "the device is still there");
    assert!(b.record(&id).staged.unwrap().unstaging);

    let report = b.volumes.reconcile().unwrap();
    assert!(
        !b.mounted_at(&staging),
        "the reconciler leaves it for the CO's retry"
    );
    assert!(
        report
            .unrepairable
            .iter()
            .any(|r| r.contains("has not finished")),
        "{report:?}"
    );

    b.host.clear_failures();
    b.volumes.unstage(&id, &staging).unwrap();
    assert!(b.devices().is_empty() && !b.record(&id).exists());
}

#[test]
fn a_tool_holding_the_device_makes_stage_aborted() {
    let b = bed();
    let id = b.staged_fs("v");
    let staging = b.staging(&id);
    let dev = b.device();
    // The staging was unmounted behind the driver's back while a tool (an e2fsck a killed
    // driver started) holds the device.
    b.host.unmount(&staging).unwrap();
    b.host.hold(dev);
    b.host.clear_calls();

    let err = b.volumes.stage(&id, &staging, &fs_cap()).unwrap_err();
    assert!(matches!(err, Error::DeviceHeld { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert!(b.host.calls_of(Op::Probe).is_empty() && b.host.calls_of(Op::Mkfs).is_empty());
    assert!(
        b.host.calls_of(Op::MountDevice).is_empty(),
        "nothing raced the tool"
    );

    b.host.release(dev);
    b.volumes.stage(&id, &staging, &fs_cap()).unwrap();
    assert_eq!(b.device(), dev, "the same device, mounted again");
    assert!(b.mounted_at(&staging));
}

#[test]
fn an_unidentifiable_loop_device_refuses_to_attach_a_second_one() {
    let b = bed();
    let id = b.create("v", VolumeKind::Block);
    let staging = b.staging(&id);
    b.volumes.stage(&id, &staging, &block_cap()).unwrap();
    let dev = b.device();
    b.host.unidentify(dev);
    b.host.clear_calls();

    let err = b.volumes.stage(&id, &staging, &block_cap()).unwrap_err();
    assert!(matches!(err, Error::UnidentifiedDevice { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(b.host.calls_of(Op::Attach).is_empty(), "no second device");
    assert_eq!(b.devices().len(), 1);
}

#[test]
fn ebusy_on_unmount_during_unpublish_keeps_the_bind_and_its_record() {
    let b = bed();
    let id = b.staged_fs("v");
    b.publish(&id, "p").unwrap();
    let target = b.target(&id, "p");
    b.host.fail(Op::Unmount, Errno::EBUSY);

    let err = b.volumes.unpublish(&id, &target).unwrap_err();
    assert!(matches!(err, Error::MountBusy { .. }), "{err:?}");
    assert!(b.mounted_at(&target));
    assert_eq!(
        b.record(&id).published.len(),
        1,
        "the publish is still recorded"
    );

    b.host.clear_failures();
    b.volumes.unpublish(&id, &target).unwrap();
    assert!(!b.mounted_at(&target) && b.record(&id).published.is_empty());
    assert!(!target.exists(), "the target publish created is removed");
}

#[test]
fn enospc_on_the_publish_record_write_takes_the_bind_back() {
    let b = bed();
    let id = b.staged_fs("v");
    let target = b.target(&id, "p");
    b.host.fail(Op::WriteRecord, Errno::ENOSPC);

    let err = b.publish(&id, "p").unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(!b.mounted_at(&target), "no bind the records do not know of");
    assert!(b.record(&id).published.is_empty());
    assert!(b.mounted_at(&b.staging(&id)), "the staging is untouched");
}
