//! Operations that only read a snapshot (or a volume) share it; what changes it is ABORTED
//! meanwhile, naming what is in progress. Each test holds the first operation in the middle
//! of its work with `FakeHost::hold_next` (its guards held), runs the others, then lets it go:
//! no sleeps, and the overlap is certain rather than likely.

use crate::volume::metadata::Walk;
use tonic::Code;

use super::metadata::two_snapshots;
use super::*;
use crate::host::fake::Op;
use crate::volume::id::SnapshotId;
use crate::volume::metadata::Shape;
use crate::volume::pool::ContentSource;

/// `result` is ABORTED and names `op` as the operation in progress.
fn aborted_by<T>(result: crate::error::Result<T>, op: &str) {
    let Err(err) = result else {
        panic!("not refused while {op} runs");
    };
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert!(err.to_string().contains(op), "{err}");
}

fn restore(name: &str, from: SnapshotId) -> NewVolume {
    NewVolume {
        source: Some(ContentSource::Snapshot(from)),
        ..new_volume(name, VolumeKind::Block)
    }
}

#[test]
fn two_deltas_of_the_same_snapshots_at_once_both_succeed() {
    let b = bed();
    let (a, snap_b) = two_snapshots(&b);
    // Extents or content, the delta reads the snapshots' data ranges: hold the first read.
    b.host.without_reflink();
    let held = b.host.hold_next(Op::DataRanges);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            b.volumes
                .metadata_delta(&a, &snap_b, 0, Shape::Variable)
                .and_then(Walk::collect)
        });
        held.wait_arrived();
        let second = b
            .volumes
            .metadata_delta(&a, &snap_b, 0, Shape::Variable)
            .and_then(Walk::collect)
            .unwrap();
        let allocated = b
            .volumes
            .metadata_allocated(&snap_b, 0, Shape::Variable)
            .and_then(Walk::collect);
        assert!(allocated.is_ok(), "{allocated:?}");
        held.release();
        let first = first.join().unwrap().unwrap();
        assert_eq!(first, second);
        assert_eq!(first.ranges, vec![((1 << 20) + 8192, 4096)]);
    });
}

#[test]
fn delete_snapshot_during_a_read_is_aborted_and_succeeds_after() {
    let b = bed();
    let (a, snap_b) = two_snapshots(&b);
    let held = b.host.hold_next(Op::DataRanges);
    std::thread::scope(|s| {
        let reading = s.spawn(|| {
            b.volumes
                .metadata_allocated(&a, 0, Shape::Variable)
                .and_then(Walk::collect)
        });
        held.wait_arrived();
        aborted_by(b.volumes.delete_snapshot(&a), "GetMetadataAllocated");
        // Another snapshot of the same volume is not held.
        b.volumes.delete_snapshot(&snap_b).unwrap();
        held.release();
        assert!(reading.join().unwrap().is_ok());
    });
    b.volumes.delete_snapshot(&a).unwrap();
    assert!(b.files_in("snapshots").is_empty());
}

#[test]
fn two_restores_from_one_snapshot_at_once_both_succeed() {
    let b = bed();
    let (a, _) = two_snapshots(&b);
    let held = b.host.hold_next(Op::CopyImage);
    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(|| b.volumes.create(restore("r1", a), |e| e));
        held.wait_arrived();
        let second = b.volumes.create(restore("r2", a), |e| e).unwrap();
        // A backup may read the snapshot meanwhile; nothing may delete it.
        assert!(b
            .volumes
            .metadata_allocated(&a, 0, Shape::Variable)
            .and_then(Walk::collect)
            .is_ok());
        aborted_by(b.volumes.delete_snapshot(&a), "CreateVolume");
        held.release();
        (first.join().unwrap().unwrap(), second)
    });
    let image = |name: String| std::fs::read(b.state().join(name)).unwrap();
    let snapshot = image(format!("snapshots/{a}.img"));
    assert_eq!(image(format!("volumes/{}.img", first.0.id)), snapshot);
    assert_eq!(image(format!("volumes/{}.img", second.0.id)), snapshot);
    b.volumes.delete_snapshot(&a).unwrap();
}

#[test]
fn a_restore_waits_for_no_one_but_is_aborted_while_the_snapshot_is_deleted() {
    let b = bed();
    let (a, _) = two_snapshots(&b);
    let held = b.host.hold_next(Op::RemoveDurably);
    std::thread::scope(|s| {
        let deleting = s.spawn(|| b.volumes.delete_snapshot(&a));
        held.wait_arrived();
        aborted_by(b.volumes.create(restore("r", a), |e| e), "DeleteSnapshot");
        aborted_by(
            b.volumes
                .metadata_delta(&a, &a, 0, Shape::Variable)
                .and_then(Walk::collect),
            "DeleteSnapshot",
        );
        held.release();
        deleting.join().unwrap().unwrap();
    });
}

#[test]
fn two_clones_of_an_unstaged_volume_at_once_both_succeed_and_its_stage_is_aborted() {
    let b = bed();
    let id = b.create("v", VolumeKind::Block);
    let clone = |name: &str| NewVolume {
        source: Some(ContentSource::Volume(id)),
        ..new_volume(name, VolumeKind::Block)
    };
    let held = b.host.hold_next(Op::CopyImage);
    std::thread::scope(|s| {
        let first = s.spawn(|| b.volumes.create(clone("c1"), |e| e));
        held.wait_arrived();
        assert!(b.volumes.create(clone("c2"), |e| e).is_ok());
        assert!(b.volumes.create_snapshot("s", &id).is_ok());
        let staging = b.staging(&id);
        aborted_by(b.volumes.stage(&id, &staging, &block_cap()), "CreateVolume");
        aborted_by(b.volumes.delete(&id), "CreateVolume");
        held.release();
        assert!(first.join().unwrap().is_ok());
    });
    b.volumes.stage(&id, &b.staging(&id), &block_cap()).unwrap();
}

#[test]
fn a_second_copy_of_a_live_volume_is_aborted_while_the_first_freezes_it() {
    let b = bed();
    let id = b.staged_fs("v");
    let held = b.host.hold_next(Op::CopyImage);
    std::thread::scope(|s| {
        let first = s.spawn(|| b.volumes.create_snapshot("first", &id));
        held.wait_arrived();
        aborted_by(b.volumes.create_snapshot("second", &id), "CreateSnapshot");
        let err = b.volumes.create_snapshot("second", &id).unwrap_err();
        assert!(err.to_string().contains("freeze"), "{err}");
        held.release();
        assert!(first.join().unwrap().is_ok());
    });
    assert!(b.volumes.create_snapshot("second", &id).is_ok());
    assert!(b.files_in("frozen").is_empty());
}
