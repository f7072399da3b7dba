//! Snapshots of live volumes, expansion and health under injected failures.

use nix::errno::Errno;

use super::{bed, block_cap};
use crate::error::Error;
use crate::host::fake::Op;
use crate::host::os::Host;
use crate::volume::params::{CapacityRange, VolumeKind};

#[test]
fn freeze_failing_refuses_the_snapshot_and_leaves_no_image_and_no_freeze_record() {
    let b = bed();
    let id = b.staged_fs("v");
    b.host.fail(Op::Freeze, Errno::EIO);

    let err = b.volumes.create_snapshot("snap", &id).unwrap_err();
    assert!(matches!(err, Error::Sys { op: "FIFREEZE", .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(b.files_in("snapshots").is_empty(), "no half-made snapshot");
    assert!(
        b.files_in("frozen").is_empty(),
        "no record of a freeze that never was"
    );
    let numbers = b.host.dev_numbers(b.device()).unwrap();
    assert!(!b.host.is_frozen(numbers));
    assert!(b.volumes.list_snapshots(None, 10, |_| true).0.is_empty());
    assert!(!b.volumes.condition(&id).unwrap().abnormal);
}

#[test]
fn thaw_failing_after_a_snapshot_keeps_the_freeze_record_until_reconcile_thaws_it() {
    let b = bed();
    let id = b.staged_fs("v");
    let numbers = b.host.dev_numbers(b.device()).unwrap();
    b.host.fail_nth(Op::Thaw, 1, Errno::EIO);

    // The copy is whole: the snapshot stands, and the failed thaw is the reconciler's.
    b.volumes.create_snapshot("snap", &id).unwrap();
    assert!(
        b.host.is_frozen(numbers),
        "still frozen after the failed thaw"
    );
    assert_eq!(b.files_in("frozen"), vec![format!("{id}.json")]);
    let condition = b.volumes.condition(&id).unwrap();
    assert!(condition.abnormal, "the operator sees it: {condition:?}");
    assert!(
        condition.message.contains("frozen"),
        "{}",
        condition.message
    );

    let report = b.volumes.reconcile().unwrap();
    assert!(
        report.repaired.iter().any(|r| r.contains("thawed")),
        "{report:?}"
    );
    assert!(!b.host.is_frozen(numbers));
    assert!(
        b.files_in("frozen").is_empty(),
        "the record goes with the freeze"
    );
    assert!(!b.volumes.condition(&id).unwrap().abnormal);
}

#[test]
fn a_loop_device_vanishing_while_staged_shows_in_condition_and_reconcile_reattaches_it() {
    let b = bed();
    let id = b.create("v", VolumeKind::Block);
    let staging = b.staging(&id);
    b.host.create_dir_all(&staging).unwrap(); // as the kubelet makes it
    b.volumes.stage(&id, &staging, &block_cap()).unwrap();
    b.host.vanish(b.device());

    let condition = b.volumes.condition(&id).unwrap();
    assert!(condition.abnormal);
    assert!(
        condition.message.contains("loop device is gone"),
        "{}",
        condition.message
    );

    let report = b.volumes.reconcile().unwrap();
    assert!(
        report.repaired.iter().any(|r| r.contains("re-attached")),
        "{report:?}"
    );
    assert_eq!(b.devices().len(), 1, "attached again, once");
    assert!(!b.volumes.condition(&id).unwrap().abnormal);
    assert_eq!(
        b.record(&id).staged.unwrap().path,
        staging,
        "the record kept"
    );
}

#[test]
fn online_grow_failing_during_expand_keeps_the_new_size_and_the_pending_grow() {
    let b = bed();
    let id = b.staged_fs("v");
    let staging = b.staging(&id);
    b.host.fail(Op::GrowExt4Online, Errno::EIO);
    let bigger = CapacityRange {
        required_bytes: 2 * super::SIZE,
        limit_bytes: 0,
    };

    let err = b.volumes.expand(&id, &staging, Some(bigger)).unwrap_err();
    assert!(matches!(err, Error::Tool { .. }), "{err:?}");
    let meta = b.volumes.get(&id).unwrap();
    assert_eq!(meta.capacity_bytes, 2 * super::SIZE as u64, "the file grew");
    assert!(meta.pending_fs_grow, "the file system's grow is still owed");

    b.host.clear_failures();
    assert_eq!(
        b.volumes.expand(&id, &staging, Some(bigger)).unwrap(),
        2 * super::SIZE as u64
    );
    assert!(
        !b.volumes.get(&id).unwrap().pending_fs_grow,
        "the retry grew it"
    );
}

#[test]
fn a_frozen_comparison_outrunning_the_freeze_limit_thaws_and_keeps_nothing() {
    let b = bed();
    let id = b.staged_fs("v");
    let numbers = b.host.dev_numbers(b.device()).unwrap();
    // The frozen pass only exists where extents cannot be shared.
    b.host.without_reflink();
    b.host.patch_too_slow();

    let err = b.volumes.create_snapshot("snap", &id).unwrap_err();
    assert!(matches!(err, Error::FreezeLimit { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.to_string().contains("reflink"),
        "names the remedy: {err}"
    );
    assert!(!b.host.is_frozen(numbers), "thawed at the limit");
    assert!(
        b.files_in("snapshots").is_empty(),
        "the partial copy is gone"
    );
    assert!(
        b.files_in("frozen").is_empty(),
        "the freeze record went with it"
    );
    assert!(b.volumes.list_snapshots(None, 10, |_| true).0.is_empty());
}
