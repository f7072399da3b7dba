//! Changed-block tracking (CSI SnapshotMetadata): the allocated ranges of a snapshot and the
//! ranges that changed between two snapshots of the same volume.
//!
//! A snapshot is a file in the pool, so the kernel already tracks what we need:
//! - **Allocated**: the snapshot file's data ranges (SEEK_DATA/SEEK_HOLE). A hole reads as
//!   zeroes in every copy, so a backup need not carry it.
//! - **Delta, by extents** (reflink pools): snapshots are reflink copies of the volume, so a
//!   block the application did not write between the two snapshots is the *same physical block*
//!   in both files. Ranges whose physical mapping is the same (or that are holes in both) are
//!   unchanged; every other range was written (or discarded) in between and is reported. This is
//!   exact at the file system's block size and reads no data.
//! - **Delta, by content** (pools without reflink, or where FIEMAP cannot tell): both files'
//!   data ranges are read in large chunks and compared block by block; only blocks that differ
//!   are reported. Correct everywhere, at the cost of reading the allocated data once.
//!
//! Ranges come out in one of two shapes (the spec's BlockMetadataType): `Variable` (merged
//! byte ranges, the exact answer) or `Fixed(size)` (every block of `size` bytes that holds a
//! reported byte).

use std::path::Path;

use crate::error::{Error, Result};
use crate::host::extents::{extent_delta, push_merged, Range, COMPARE_BLOCK};
use crate::host::os::Host;

/// The largest fixed block size offered: larger blocks only make a backup copy more.
pub const MAX_FIXED_BLOCK: u64 = 1 << 20;

/// How ranges are reported (the spec's BlockMetadataType).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Merged byte ranges of varying length (VARIABLE_LENGTH).
    Variable,
    /// Blocks of this many bytes (FIXED_LENGTH): a power of two from 4 KiB to 1 MiB.
    Fixed(u64),
}

impl Shape {
    /// The shape for a configured block size: 0 is `Variable`; anything else must be a power
    /// of two from 4 KiB to 1 MiB (volume sizes are whole MiB, so blocks tile every volume).
    pub fn from_block_size(field: &'static str, bytes: u64) -> Result<Shape> {
        match bytes {
            0 => Ok(Shape::Variable),
            b if b.is_power_of_two() && (COMPARE_BLOCK..=MAX_FIXED_BLOCK).contains(&b) => {
                Ok(Shape::Fixed(b))
            }
            b => Err(Error::invalid(
                field,
                format!("{b} is not 0 (variable length) or a power of two from 4096 to 1048576"),
            )),
        }
    }
}

/// How a delta was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Shared physical extents (reflink pool): no data read.
    Extents,
    /// Content compared block by block.
    Content,
}

/// A snapshot's metadata answer: its volume's capacity and `(offset, length)` ranges,
/// ascending, none starting before the requested offset's block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockList {
    pub capacity: u64,
    pub shape: Shape,
    pub ranges: Vec<Range>,
    pub method: Option<Method>,
}

/// The allocated ranges of the snapshot image `image` from `from` on.
pub fn allocated(
    host: &dyn Host,
    image: &Path,
    capacity: u64,
    from: u64,
    shape: Shape,
) -> Result<BlockList> {
    let start = align_down(from, shape);
    let ranges = host.data_ranges(image, start, capacity)?;
    Ok(BlockList {
        capacity,
        shape,
        ranges: shaped(&ranges, shape, start, capacity),
        method: None,
    })
}

/// The ranges of `target` that differ from `base` from `from` on (see the module doc).
/// `reflinks` says whether the pool shares extents between copies.
pub fn delta(
    host: &dyn Host,
    base: &Path,
    target: &Path,
    capacity: u64,
    from: u64,
    (shape, reflinks): (Shape, bool),
) -> Result<BlockList> {
    let start = align_down(from, shape);
    let by_extents = if reflinks {
        // The two maps are independent: read them at the same time.
        let (of_base, of_target) = crate::host::alongside(
            || host.physical_extents(target, start, capacity),
            || host.physical_extents(base, start, capacity),
            || "reading the target snapshot's extents".to_string(),
        );
        match (of_base?, of_target?) {
            (Some(a), Some(b)) => Some(extent_delta(&a, &b, start, capacity)),
            _ => None,
        }
    } else {
        None
    };
    let (changed, method) = match by_extents {
        Some(changed) => (changed, Method::Extents),
        None => (
            content_delta(host, base, target, start, capacity)?,
            Method::Content,
        ),
    };
    Ok(BlockList {
        capacity,
        shape,
        ranges: shaped(&changed, shape, start, capacity),
        method: Some(method),
    })
}

/// Compares content over the union of both files' data ranges (elsewhere both read zeroes).
fn content_delta(
    host: &dyn Host,
    base: &Path,
    target: &Path,
    start: u64,
    end: u64,
) -> Result<Vec<Range>> {
    let mut both = host.data_ranges(base, start, end)?;
    both.extend(host.data_ranges(target, start, end)?);
    both.sort_unstable();
    let mut union = Vec::with_capacity(both.len());
    for (s, e) in both {
        let s = s / COMPARE_BLOCK * COMPARE_BLOCK;
        let e = e.div_ceil(COMPARE_BLOCK) * COMPARE_BLOCK;
        push_merged(&mut union, (s.max(start), e.min(end)));
    }
    host.differing_ranges(base, target, &union)
}

fn align_down(offset: u64, shape: Shape) -> u64 {
    match shape {
        Shape::Variable => offset,
        Shape::Fixed(block) => offset / block * block,
    }
}

/// `(start, end)` ranges as `(offset, length)` in `shape`, clipped to `[from, capacity)`.
pub fn shaped(ranges: &[Range], shape: Shape, from: u64, capacity: u64) -> Vec<Range> {
    let mut merged: Vec<Range> = Vec::new();
    for &(s, e) in ranges {
        let (s, e) = (s.max(from), e.min(capacity));
        if s < e {
            push_merged(&mut merged, (s, e));
        }
    }
    match shape {
        Shape::Variable => merged.into_iter().map(|(s, e)| (s, e - s)).collect(),
        Shape::Fixed(block) => {
            let mut blocks: Vec<Range> = Vec::new();
            for (s, e) in merged {
                let first = s / block;
                let last = e.div_ceil(block);
                for n in first..last {
                    if blocks.last().is_none_or(|&(o, _)| o < n * block) {
                        blocks.push((n * block, block));
                    }
                }
            }
            blocks
        }
    }
}
