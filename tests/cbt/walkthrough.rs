//! The backup walk-through: data, snapshot A, some blocks changed, snapshot B; a full backup of
//! A from GetMetadataAllocated, then an incremental one from GetMetadataDelta A→B applied onto
//! it equals B byte for byte.

use super::*;

/// What the application does between the snapshots: for a block volume, exact 4 KiB-aligned
/// writes (so the delta is known exactly); for a file system, file writes, whose blocks the
/// delta must cover (with the file system's own metadata blocks besides).
async fn write_before(kind: Kind, target: &Path) {
    match kind {
        Kind::Block => {
            write_at(target, 0, &data(1, 8 << 20));
            write_at(target, 32 << 20, &data(2, 1 << 20));
        }
        Kind::Ext4 | Kind::Xfs => {
            write_file(&target.join("a.bin"), &data(1, 8 << 20));
            write_file(&target.join("b.bin"), &data(2, 1 << 20));
        }
    }
}

/// The exact byte ranges a block volume's changes touch.
const BLOCK_CHANGES: [(i64, i64); 3] = [
    (1 << 20, 64 << 10),
    ((5 << 20) + 4096, 4096),
    (40 << 20, 128 << 10),
];

async fn change(kind: Kind, target: &Path) {
    match kind {
        Kind::Block => {
            for (i, &(offset, len)) in BLOCK_CHANGES.iter().enumerate() {
                let bytes = data(10 + i as u64, usize::try_from(len).unwrap());
                write_at(target, u64::try_from(offset).unwrap(), &bytes);
            }
        }
        Kind::Ext4 | Kind::Xfs => {
            write_at(&target.join("a.bin"), 1 << 20, &data(10, 64 << 10));
            write_at(&target.join("a.bin"), (5 << 20) + 4096, &data(11, 4096));
            write_file(&target.join("c.bin"), &data(12, 128 << 10));
            std::fs::remove_file(target.join("b.bin")).unwrap();
        }
    }
}

async fn backup_walkthrough(pool_fs: &str, kind: Kind) {
    let mut d = TestDriver::start_on_small_pool(pool_fs, 1536).await;
    let cap = kind.cap();
    let id = d
        .create(create_req("vol", kind.size(), cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("vol"), d.target("vol"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    write_before(kind, &target).await;
    let a = snapshot(&mut d, "a", &id).await.snapshot_id;
    change(kind, &target).await;
    let b = snapshot(&mut d, "b", &id).await.snapshot_id;
    let md = d.metadata().await;

    // The full backup: only A's allocated ranges, onto a blank file, give A.
    let allocated = md.allocated(&a, 0, 0).await.unwrap();
    assert_eq!(allocated.capacity, kind.size());
    assert_eq!(
        allocated.block_metadata_type,
        csi::BlockMetadataType::VariableLength as i32
    );
    assert_well_formed(&allocated);
    let backup = d.root().join("backup.img");
    blank(&backup, kind.size());
    apply(&snapshot_image(&d, &a), &backup, &allocated.ranges);
    assert_same_bytes(&backup, &snapshot_image(&d, &a));

    // The incremental backup, paged 3 ranges a message: only the delta, onto A's copy, gives B.
    let delta = md.delta(&a, &b, 0, 3).await.unwrap();
    assert_well_formed(&delta);
    assert_eq!(delta.capacity, kind.size());
    assert!(!delta.ranges.is_empty(), "something changed");
    assert!(delta.messages >= delta.ranges.len().div_ceil(3));
    let copied: i64 = delta.ranges.iter().map(|r| r.1).sum();
    apply(&snapshot_image(&d, &b), &backup, &delta.ranges);
    assert_same_bytes(&backup, &snapshot_image(&d, &b));
    match kind {
        Kind::Block => assert_eq!(delta.ranges, BLOCK_CHANGES, "exactly the blocks written"),
        // The changed file data (196 KiB) and the file systems' own metadata: far less than
        // the volume, and far less than the data it holds.
        Kind::Ext4 | Kind::Xfs => assert!(
            copied < 8 << 20,
            "an incremental backup copies {copied} bytes of a {} byte volume",
            kind.size()
        ),
    }
    let all: i64 = allocated.ranges.iter().map(|r| r.1).sum();
    eprintln!("{pool_fs} pool, {kind:?}: full backup {all} bytes, incremental {copied} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_ext4_volume_on_xfs_reflink_pool() {
    backup_walkthrough("xfs", Kind::Ext4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_xfs_volume_on_xfs_reflink_pool() {
    backup_walkthrough("xfs", Kind::Xfs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_block_volume_on_xfs_reflink_pool() {
    backup_walkthrough("xfs", Kind::Block).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_ext4_volume_on_ext4_pool() {
    backup_walkthrough("ext4", Kind::Ext4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_xfs_volume_on_ext4_pool() {
    backup_walkthrough("ext4", Kind::Xfs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_block_volume_on_ext4_pool() {
    backup_walkthrough("ext4", Kind::Block).await;
}
