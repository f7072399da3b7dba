//! Changed-block tracking (CSI SnapshotMetadata) against real loop devices, file systems and
//! pools (run as root). `walkthrough.rs`: the backup a backup tool makes — a full copy of
//! snapshot A from its allocated ranges, then only the ranges GetMetadataDelta A→B names
//! copied onto it, and the result is B byte for byte — for ext4, xfs and block volumes, on an
//! xfs pool with reflink (deltas from shared extents) and an ext4 pool (deltas by content).
//! `rpcs.rs`: paging, the block metadata types, and every error code the spec lists.
//! `concurrent.rs`: readers of one snapshot (backup streams, restores) at once all succeed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod concurrent;
mod rpcs;
mod walkthrough;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use loopcsi::csi;

/// A volume under test: how it is used and how big it is.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Ext4,
    Xfs,
    Block,
}

impl Kind {
    fn cap(self) -> csi::VolumeCapability {
        match self {
            Kind::Ext4 => mount_cap("ext4", snw()),
            Kind::Xfs => mount_cap("xfs", snw()),
            Kind::Block => block_cap(snw()),
        }
    }

    /// xfs refuses file systems under 300 MiB.
    fn size(self) -> i64 {
        match self {
            Kind::Xfs => 300 * MIB,
            Kind::Ext4 | Kind::Block => 64 * MIB,
        }
    }
}

/// `len` bytes of data that differ with `seed` in every 4 KiB block.
fn data(seed: u64, len: usize) -> Vec<u8> {
    loopcsi_testkit::pseudo_random(seed, len)
}

fn snapshot_image(d: &TestDriver, id: &str) -> PathBuf {
    d.state_dir().join("snapshots").join(format!("{id}.img"))
}

async fn snapshot(d: &mut TestDriver, name: &str, source: &str) -> csi::Snapshot {
    d.controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e:?}"))
        .into_inner()
        .snapshot
        .expect("CreateSnapshot returns a snapshot")
}

/// Copies `ranges` of `from` into the same places of `into`, as a backup tool applies them.
fn apply(from: &Path, into: &Path, ranges: &[(i64, i64)]) {
    let src = std::fs::File::open(from).unwrap();
    let dst = std::fs::OpenOptions::new().write(true).open(into).unwrap();
    for &(offset, len) in ranges {
        let mut buf = vec![0u8; usize::try_from(len).unwrap()];
        src.read_exact_at(&mut buf, u64::try_from(offset).unwrap())
            .unwrap();
        dst.write_all_at(&buf, u64::try_from(offset).unwrap())
            .unwrap();
    }
    dst.sync_all().unwrap();
}

/// A new sparse file of `len` bytes at `path`.
fn blank(path: &Path, len: i64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(u64::try_from(len).unwrap()).unwrap();
}

#[track_caller]
fn assert_same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {at}", a.display(), b.display());
    }
}

/// Ranges are ascending, do not overlap, lie inside the capacity and are not empty.
#[track_caller]
fn assert_well_formed(r: &Ranges) {
    let mut end = 0;
    for &(o, l) in &r.ranges {
        assert!(
            l > 0 && o >= end && o + l <= r.capacity,
            "bad range ({o}, {l}) in {r:?}"
        );
        end = o + l;
    }
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}
