//! Changed-block tracking on the fake host: what the operator sees when reading a snapshot's
//! extents or content fails, the content fallback where extents cannot tell, and the pure
//! range arithmetic (extent sharing, shapes) on hand-made extents.

use crate::volume::metadata::Walk;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use tonic::Code;

use super::*;
use crate::host::extents::extent_delta;
use crate::host::extents::Extent;
use crate::host::fake::Op;
use crate::volume::id::SnapshotId;
use crate::volume::metadata::{shaped, Method, Shape};

/// A block volume with 64 KiB of data at 1 MiB, snapshotted as A; 4 KiB at 1 MiB + 8 KiB
/// rewritten and snapshotted as B.
pub(super) fn two_snapshots(b: &Bed) -> (SnapshotId, SnapshotId) {
    let id = b.create("v", VolumeKind::Block);
    let image = b.state().join("volumes").join(format!("{id}.img"));
    let write = |offset: u64, byte: u8, len: usize| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&vec![byte; len], offset).unwrap();
    };
    write(1 << 20, 1, 64 << 10);
    let (a, _) = b.volumes.create_snapshot("a", &id).unwrap();
    write((1 << 20) + 8192, 2, 4096);
    let (snap_b, _) = b.volumes.create_snapshot("b", &id).unwrap();
    (a.id, snap_b.id)
}

#[test]
fn delta_by_content_finds_exactly_the_rewritten_block() {
    let b = bed();
    let (a, snap_b) = two_snapshots(&b);
    let list = b
        .volumes
        .metadata_delta(&a, &snap_b, 0, Shape::Variable)
        .and_then(Walk::collect)
        .unwrap();
    assert_eq!(list.capacity, SIZE as u64);
    // The fake's pool may or may not reflink; either way the answer is the rewritten block
    // (a reflink pool by extents, any other by content).
    assert!(matches!(
        list.method,
        Some(Method::Content | Method::Extents)
    ));
    assert_eq!(list.ranges, vec![((1 << 20) + 8192, 4096)]);
    let fixed = b
        .volumes
        .metadata_delta(&a, &snap_b, 0, Shape::Fixed(1 << 20))
        .and_then(Walk::collect)
        .unwrap();
    assert_eq!(fixed.ranges, vec![(1 << 20, 1 << 20)]);
    let allocated = b
        .volumes
        .metadata_allocated(&a, 0, Shape::Variable)
        .and_then(Walk::collect)
        .unwrap();
    assert_eq!(allocated.ranges, vec![(1 << 20, 64 << 10)]);
}

#[test]
fn reading_extents_or_content_failing_is_an_internal_error_naming_the_file() {
    let b = bed();
    let (a, snap_b) = two_snapshots(&b);
    b.host.fail(Op::DataRanges, Errno::EIO);
    let err = b
        .volumes
        .metadata_allocated(&a, 0, Shape::Variable)
        .and_then(Walk::collect)
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.to_string().contains(&a.to_string()), "{err}");
    b.host.fail(Op::DifferingRanges, Errno::EIO);
    b.host.fail(Op::PhysicalExtents, Errno::EIO);
    let err = b
        .volumes
        .metadata_delta(&a, &snap_b, 0, Shape::Variable)
        .and_then(Walk::collect)
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
}

fn extent(logical: u64, physical: u64, len: u64) -> Extent {
    Extent {
        logical,
        physical,
        len,
        unwritten: false,
    }
}

#[test]
fn shared_extents_are_unchanged_and_everything_else_changed() {
    // Base: [0, 64K) at P100K; target: the first 8K shared, the next 4K moved, the rest shared,
    // plus new data at [1M, 1M+4K) and a range the base had that the target punched out.
    let base = [
        extent(0, 100 << 10, 64 << 10),
        extent(2 << 20, 9 << 20, 4096),
    ];
    let target = [
        extent(0, 100 << 10, 8192),
        extent(8192, 7 << 20, 4096),
        extent(12288, (100 << 10) + 12288, (64 << 10) - 12288),
        extent(1 << 20, 8 << 20, 4096),
    ];
    let changed = extent_delta(&base, &target, 0, 4 << 20);
    assert_eq!(
        changed,
        vec![
            (8192, 12288),
            (1 << 20, (1 << 20) + 4096),
            (2 << 20, (2 << 20) + 4096)
        ]
    );
    // Unwritten extents read as zeroes: against a hole they are unchanged.
    let unwritten = [Extent {
        unwritten: true,
        ..extent(0, 5 << 20, 4096)
    }];
    assert!(extent_delta(&[], &unwritten, 0, 1 << 20).is_empty());
    // From an offset on, nothing before it is reported.
    assert_eq!(
        extent_delta(&base, &target, 1 << 20, 4 << 20),
        vec![(1 << 20, (1 << 20) + 4096), (2 << 20, (2 << 20) + 4096)]
    );
}

#[test]
fn shapes_merge_ranges_or_cover_them_with_fixed_blocks() {
    let ranges = [
        (0, 4096),
        (4096, 8192),
        (70000, 70001),
        (1 << 20, (1 << 20) + 1),
    ];
    assert_eq!(
        shaped(&ranges, Shape::Variable, 0, 2 << 20),
        vec![(0, 8192), (70000, 1), (1 << 20, 1)]
    );
    assert_eq!(
        shaped(&ranges, Shape::Fixed(65536), 0, 2 << 20),
        vec![(0, 65536), (65536, 65536), (1 << 20, 65536)]
    );
    assert_eq!(
        shaped(&ranges, Shape::Variable, 6000, 70000),
        vec![(6000, 2192)]
    );
    assert!(Shape::from_block_size("b", 3000).is_err());
    assert!(Shape::from_block_size("b", 2 << 20).is_err());
    assert_eq!(Shape::from_block_size("b", 0).unwrap(), Shape::Variable);
}

/// A walk gives the same answer in any step size: ranges spanning a step boundary come out
/// once, merged; fixed blocks never twice; an offset inside a range starts there.
#[test]
fn an_answer_walked_in_small_steps_equals_the_answer_in_one_step() {
    let b = bed();
    let id = b.create("v", VolumeKind::Block);
    let image = b.state().join("volumes").join(format!("{id}.img"));
    let write = |offset: u64, len: usize, byte: u8| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&vec![byte; len], offset).unwrap();
    };
    // Data across the 1 MiB and 2 MiB boundaries, and a block at a boundary's edge.
    write((1 << 20) - 8192, 3 << 20, 1);
    write((5 << 20) - 4096, 4096, 1);
    let a = b.volumes.create_snapshot("a", &id).unwrap().0.id;
    write((1 << 20) - 4096, 8192, 2);
    write((2 << 20) - 4096, (1 << 20) + 8192, 2);
    let snap_b = b.volumes.create_snapshot("b", &id).unwrap().0.id;
    for shape in [Shape::Variable, Shape::Fixed(4096), Shape::Fixed(1 << 20)] {
        for from in [0, (1 << 20) + 4096] {
            let whole = |w: crate::error::Result<Walk>| w.and_then(Walk::collect).unwrap().ranges;
            let stepped = |w: crate::error::Result<Walk>| {
                w.map(|w| w.in_steps_of(1 << 20))
                    .and_then(Walk::collect)
                    .unwrap()
                    .ranges
            };
            let delta = || b.volumes.metadata_delta(&a, &snap_b, from, shape);
            let allocated = || b.volumes.metadata_allocated(&a, from, shape);
            assert_eq!(
                stepped(delta()),
                whole(delta()),
                "delta, {shape:?} from {from}"
            );
            assert_eq!(
                stepped(allocated()),
                whole(allocated()),
                "allocated, {shape:?} from {from}"
            );
        }
    }
    let merged = b
        .volumes
        .metadata_allocated(&a, 0, Shape::Variable)
        .map(|w| w.in_steps_of(1 << 20))
        .and_then(Walk::collect)
        .unwrap();
    assert_eq!(
        merged.ranges,
        vec![((1 << 20) - 8192, 3 << 20), ((5 << 20) - 4096, 4096)],
        "one range across three steps"
    );
}
