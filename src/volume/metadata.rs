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

use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Bytes of the volume one step of a [`Walk`] covers: an answer holds one step's extents and
/// ranges at a time (at most 262 144 extents of 4 KiB per file), whatever the volume's size or
/// how scattered its changes are. A multiple of every fixed block size.
pub const STEP: u64 = 1 << 30;

/// What a walk reads.
enum Source {
    /// A snapshot image's data ranges.
    Allocated { image: PathBuf },
    /// The ranges of `target` that differ from `base`.
    Delta {
        base: PathBuf,
        target: PathBuf,
        reflinks: bool,
    },
}

/// A metadata answer computed one [`STEP`] of the volume at a time, in order, so its memory
/// is one step's. It keeps what it is given to hold (the snapshots' readers' guards) until it
/// is dropped, so the files it reads stay while it is read.
pub struct Walk {
    host: Arc<dyn Host>,
    source: Source,
    pub capacity: u64,
    pub shape: Shape,
    /// Where the next step starts (block-aligned for fixed blocks).
    next: u64,
    /// The last merged range of the steps read so far, when it may continue into the next.
    carry: Option<Range>,
    /// How the last step of a delta was found.
    pub method: Option<Method>,
    /// Bytes per step: `STEP`, smaller in tests.
    step: u64,
    _held: Box<dyn Send + Sync>,
}

impl Walk {
    /// The allocated ranges of the snapshot image `image` from `from` on.
    pub fn allocated(
        host: Arc<dyn Host>,
        image: PathBuf,
        (capacity, from, shape): (u64, u64, Shape),
        held: Box<dyn Send + Sync>,
    ) -> Walk {
        Walk::new(
            host,
            Source::Allocated { image },
            (capacity, from, shape),
            held,
        )
    }

    /// The ranges of `target` that differ from `base` from `from` on (see the module doc).
    /// `reflinks` says whether the pool shares extents between copies.
    pub fn delta(
        host: Arc<dyn Host>,
        (base, target, reflinks): (PathBuf, PathBuf, bool),
        (capacity, from, shape): (u64, u64, Shape),
        held: Box<dyn Send + Sync>,
    ) -> Walk {
        let source = Source::Delta {
            base,
            target,
            reflinks,
        };
        Walk::new(host, source, (capacity, from, shape), held)
    }

    fn new(
        host: Arc<dyn Host>,
        source: Source,
        (capacity, from, shape): (u64, u64, Shape),
        held: Box<dyn Send + Sync>,
    ) -> Walk {
        Walk {
            host,
            source,
            capacity,
            shape,
            next: align_down(from, shape),
            carry: None,
            method: None,
            step: STEP,
            _held: held,
        }
    }

    /// The same walk in steps of `step` bytes (a multiple of the largest fixed block), so that
    /// tests cross step boundaries on small volumes.
    #[cfg(test)]
    pub(crate) fn in_steps_of(mut self, step: u64) -> Walk {
        self.step = step;
        self
    }

    /// The next ranges as `(offset, length)`, ascending, never empty; `None` once the walk is
    /// done. Ranges come out exactly as the whole answer would have them: a range that spans
    /// steps comes out once, merged.
    pub fn next_ranges(&mut self) -> Result<Option<Vec<Range>>> {
        while self.next < self.capacity {
            let (start, end) = (
                self.next,
                self.next.saturating_add(self.step).min(self.capacity),
            );
            self.next = end;
            let raw = match &self.source {
                Source::Allocated { image } => self.host.data_ranges(image, start, end)?,
                Source::Delta {
                    base,
                    target,
                    reflinks,
                } => {
                    let (changed, method) =
                        delta_in(self.host.as_ref(), (base, target), (start, end), *reflinks)?;
                    self.method = Some(method);
                    changed
                }
            };
            let out = self.emit(&raw, start, end);
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
        Ok(self.carry.take().map(|(s, e)| vec![(s, e - s)]))
    }

    /// One step's `(start, end)` ranges in the walk's shape, the last one held back while it
    /// may continue into the next step.
    fn emit(&mut self, raw: &[Range], start: u64, end: u64) -> Vec<Range> {
        if let Shape::Fixed(_) = self.shape {
            // Steps start on block boundaries, so no block lies in two steps.
            return shaped(raw, self.shape, start, end);
        }
        let mut merged: Vec<Range> = self.carry.take().into_iter().collect();
        for &(s, e) in raw {
            let (s, e) = (s.max(start), e.min(end));
            if s < e {
                push_merged(&mut merged, (s, e));
            }
        }
        if end < self.capacity && merged.last().is_some_and(|r| r.1 >= end) {
            self.carry = merged.pop();
        }
        merged.into_iter().map(|(s, e)| (s, e - s)).collect()
    }

    /// The whole answer in memory (tests, and callers that know it is small).
    pub fn collect(mut self) -> Result<BlockList> {
        let mut ranges = Vec::new();
        while let Some(step) = self.next_ranges()? {
            ranges.extend(step);
        }
        Ok(BlockList {
            capacity: self.capacity,
            shape: self.shape,
            ranges,
            method: self.method,
        })
    }
}

/// The ranges of `[start, end)` where `target` differs from `base`, and how they were found.
fn delta_in(
    host: &dyn Host,
    (base, target): (&Path, &Path),
    (start, end): (u64, u64),
    reflinks: bool,
) -> Result<(Vec<Range>, Method)> {
    if reflinks {
        // The two maps are independent: read them at the same time.
        let (of_target, of_base) = crate::host::alongside(
            || host.physical_extents(target, start, end),
            || host.physical_extents(base, start, end),
            || "reading the target snapshot's extents".to_string(),
        );
        if let (Some(a), Some(b)) = (of_base?, of_target?) {
            return Ok((extent_delta(&a, &b, start, end), Method::Extents));
        }
    }
    Ok((
        content_delta(host, base, target, start, end)?,
        Method::Content,
    ))
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
