//! The two-pass reflink copy of a live image (`host::reclone`), on a real xfs pool with
//! reflink: whatever the source did between the first pass and the frozen one (rewrote blocks,
//! wrote into holes, punched data away), the copy reads back exactly as the source, and only
//! what changed is cloned again.

use super::*;
use loopcsi::host::reclone::{preclone, reclone_changed};

const BLOCK: u64 = 4096;

fn punch(file: &std::fs::File, offset: u64, len: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file, flags, offset as i64, len as i64).unwrap();
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "sizes of {} and {}",
        a.display(),
        b.display()
    );
    let first = x.iter().zip(&y).position(|(p, q)| p != q);
    assert_eq!(first, None, "first differing byte of the copy");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reclone_after_rewrites_holes_filled_and_punches_reads_back_as_the_source() {
    let d = TestDriver::start_on_small_pool("xfs", 512).await;
    assert_reflink_pool(&d);
    let dir = d.state_dir().join("reclone-test");
    std::fs::create_dir_all(&dir).unwrap();
    let (src, dst) = (dir.join("src.img"), dir.join("dst.img"));
    const LEN: u64 = 16 << 20;
    // Data in the first 8 MiB and at 12 MiB, holes elsewhere; written in many small pieces so
    // the image has several extents.
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&src)
        .unwrap();
    file.set_len(LEN).unwrap();
    let data = pattern(7, 8 << 20);
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        file.write_all_at(piece, (i as u64) * (512 << 10) % (8 << 20))
            .unwrap();
    }
    file.write_all_at(&pattern(8, 1 << 20), 12 << 20).unwrap();
    file.sync_all().unwrap();

    let pre = preclone(&src, &dst, LEN, LEN).unwrap();
    assert!(pre.base.is_some(), "xfs tells where a reflink's data is");
    assert_same(&src, &dst);

    // What an application does meanwhile: rewrite blocks, fill a hole, punch data away.
    file.write_all_at(&pattern(9, 64 << 10)[..3 * BLOCK as usize], 64 * BLOCK)
        .unwrap();
    file.write_all_at(
        &pattern(10, 64 << 10)[..BLOCK as usize],
        (10 << 20) + 5 * BLOCK,
    )
    .unwrap();
    punch(&file, 12 << 20, 256 << 10);
    file.sync_all().unwrap();

    let done = reclone_changed(&src, &dst, LEN, pre.base.as_deref()).unwrap();
    assert!(!done.whole, "the extents told what changed: {done:?}");
    assert_same(&src, &dst);
    assert!(
        done.bytes <= 1 << 20,
        "only the changed ranges are cloned again, not the 9 MiB of data: {done:?}"
    );

    // Without the first pass's extents, the whole file is cloned again, as exactly.
    file.write_all_at(&pattern(11, 64 << 10)[..BLOCK as usize], 0)
        .unwrap();
    file.sync_all().unwrap();
    let whole = reclone_changed(&src, &dst, LEN, None).unwrap();
    assert!(whole.whole);
    assert_same(&src, &dst);
    drop(file);
    std::fs::remove_dir_all(&dir).unwrap();
}
