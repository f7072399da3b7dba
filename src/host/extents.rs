//! Where a file's data lives: its allocated ranges (SEEK_DATA/SEEK_HOLE, which every pool file
//! system answers) and its physical extents (the FIEMAP ioctl, which ext4 and xfs answer). Two
//! reflinked files whose logical range maps to the same physical bytes share those bytes, so the
//! range is the same in both: this is what makes changed-block tracking exact and cheap on a
//! reflink pool. Where FIEMAP cannot tell (no support, delayed or encoded extents), callers
//! compare content with [`differing_ranges`].
//!
//! The kernel contract used here: `FS_IOC_FIEMAP` (`_IOWR('f', 11, struct fiemap)`) fills up
//! to `fm_extent_count` `struct fiemap_extent`s that follow the 32-byte header; extents may start
//! before `fm_start`; `FIEMAP_FLAG_SYNC` flushes delayed allocation first so every extent has a
//! physical address. No crate was taken for it: the FIEMAP crates on crates.io are small and
//! unmaintained (last release years ago, no SYNC flag), and the call is one ioctl.

// FIEMAP has no safe wrapper in nix; the one ioctl below is the only unsafe code of this file.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Error, Result};

/// A byte range `[start, end)` of a file.
pub type Range = (u64, u64);

/// One physical extent: `len` bytes at file offset `logical` stored at device offset `physical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    /// Allocated but never written (reads as zeroes, like a hole).
    pub unwritten: bool,
}

/// The granularity of content comparison: the pool file systems' block size.
pub const COMPARE_BLOCK: u64 = 4096;
/// How much of each file one read brings in during content comparison.
const COMPARE_CHUNK: usize = 4 << 20;

/// The data ranges of `path` within `[from, end)` (clipped to it), ascending. Everything
/// outside them reads back as zeroes.
pub fn data_ranges(path: &Path, from: u64, end: u64) -> Result<Vec<Range>> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let end = i64::try_from(end).map_err(|_| Error::Internal(format!("range end {end}")))?;
    let mut pos = i64::try_from(from).map_err(|_| Error::Internal(format!("offset {from}")))?;
    let mut ranges = Vec::new();
    while pos < end {
        let data = match lseek(&file, pos, Whence::SeekData) {
            Ok(offset) => offset,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(errno) => return Err(Error::io("seek data", path, errno.into())),
        };
        if data >= end {
            break;
        }
        let hole = lseek(&file, data, Whence::SeekHole)
            .map_err(|errno| Error::io("seek hole", path, errno.into()))?
            .min(end);
        ranges.push((data.unsigned_abs(), hole.unsigned_abs()));
        pos = hole;
    }
    Ok(ranges)
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
#[derive(Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// Extents asked for per ioctl.
const BATCH: usize = 4096;

#[repr(C)]
struct FiemapBuffer {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Flags under which the physical address says nothing about identity: unknown location,
/// delayed allocation, encoded (compressed) data, not block-aligned, inline or tail-packed data.
const FIEMAP_EXTENT_VAGUE: u32 = 0x2 | 0x4 | 0x8 | 0x100 | 0x200 | 0x400;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, FiemapHeader);

/// The physical extents of `path` overlapping `[from, end)`, ascending (not clipped). `None`
/// when the file system cannot tell where the data is (no FIEMAP, or an extent whose address is
/// vague): the caller must compare content instead.
pub fn physical_extents(path: &Path, from: u64, end: u64) -> Result<Option<Vec<Extent>>> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut extents = Vec::new();
    let mut pos = from;
    let mut buf = Box::new(FiemapBuffer {
        header: FiemapHeader::default(),
        extents: [FiemapExtent::default(); BATCH],
    });
    while pos < end {
        buf.header = FiemapHeader {
            fm_start: pos,
            fm_length: end - pos,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_extent_count: BATCH as u32,
            ..FiemapHeader::default()
        };
        // SAFETY: `buf` is a live, exclusively borrowed `FiemapBuffer`: the 32-byte header the
        // ioctl's size names, followed by room for `fm_extent_count` (= BATCH) extents, which
        // is all the kernel writes; `file` is an open descriptor for the duration of the call.
        let done = unsafe { fs_ioc_fiemap(file.as_raw_fd(), &mut buf.header) };
        match done {
            Ok(_) => {}
            Err(Errno::EOPNOTSUPP | Errno::ENOTTY) => return Ok(None),
            Err(errno) => return Err(Error::io("FIEMAP", path, errno.into())),
        }
        let mapped = (buf.header.fm_mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            break;
        }
        for e in &buf.extents[..mapped] {
            if e.fe_flags & FIEMAP_EXTENT_VAGUE != 0 {
                return Ok(None);
            }
            extents.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                len: e.fe_length,
                unwritten: e.fe_flags & FIEMAP_EXTENT_UNWRITTEN != 0,
            });
        }
        let last = buf.extents[mapped - 1];
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 {
            break;
        }
        pos = last.fe_logical + last.fe_length;
    }
    Ok(Some(extents))
}

/// Written extents as `(start, end, physical)`, clipped to `[start, end)`; unwritten ones read
/// as zeroes and count as holes.
pub fn written(extents: &[Extent], start: u64, end: u64) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = extents
        .iter()
        .filter(|e| !e.unwritten)
        .filter_map(|e| {
            let s = e.logical.max(start);
            let t = (e.logical + e.len).min(end);
            (s < t).then(|| (s, t, e.physical + (s - e.logical)))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Where `list` maps byte `at` (advancing the cursor `i`), `None` for a hole.
fn mapped_at(list: &[(u64, u64, u64)], i: &mut usize, at: u64) -> Option<u64> {
    while *i < list.len() && list[*i].1 <= at {
        *i += 1;
    }
    let &(s, e, p) = list.get(*i)?;
    (s <= at && at < e).then(|| p + (at - s))
}

/// The ranges of `[start, end)` whose physical mapping differs between `a` and `b`: a hole in
/// both, or the same physical bytes in both, is unchanged.
pub fn extent_delta(a: &[Extent], b: &[Extent], start: u64, end: u64) -> Vec<Range> {
    let (a, b) = (written(a, start, end), written(b, start, end));
    let mut cuts: Vec<u64> = vec![start, end];
    for &(s, e, _) in a.iter().chain(b.iter()) {
        cuts.push(s);
        cuts.push(e);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        if mapped_at(&a, &mut i, s) != mapped_at(&b, &mut j, s) {
            push_merged(&mut out, (s, e));
        }
    }
    out
}

/// The parts of `ranges` (ascending, block-aligned) where `a` and `b` differ, found by
/// reading both in large chunks and comparing block by block; adjacent differing blocks are
/// merged. A hole reads as zeroes, so a range allocated in only one file is compared against
/// zeroes.
pub fn differing_ranges(a: &Path, b: &Path, ranges: &[Range]) -> Result<Vec<Range>> {
    let fa = File::open(a).map_err(|e| Error::io("open", a, e))?;
    let fb = File::open(b).map_err(|e| Error::io("open", b, e))?;
    let mut bufa = vec![0u8; COMPARE_CHUNK];
    let mut bufb = vec![0u8; COMPARE_CHUNK];
    let mut out: Vec<Range> = Vec::new();
    for &(start, end) in ranges {
        let mut pos = start;
        while pos < end {
            let n = usize::try_from(end - pos).map_or(COMPARE_CHUNK, |n| n.min(COMPARE_CHUNK));
            read_full(&fa, a, &mut bufa[..n], pos)?;
            read_full(&fb, b, &mut bufb[..n], pos)?;
            let block = COMPARE_BLOCK as usize;
            for (i, (x, y)) in bufa[..n]
                .chunks(block)
                .zip(bufb[..n].chunks(block))
                .enumerate()
            {
                if x != y {
                    let s = pos + (i * block) as u64;
                    let e = s + x.len() as u64;
                    push_merged(&mut out, (s, e));
                }
            }
            pos += n as u64;
        }
    }
    Ok(out)
}

/// Appends `r` to ascending `out`, merging it into the last range when they touch.
pub fn push_merged(out: &mut Vec<Range>, r: Range) {
    match out.last_mut() {
        Some(last) if last.1 >= r.0 => last.1 = last.1.max(r.1),
        _ => out.push(r),
    }
}

/// Reads `buf.len()` bytes at `offset`; past the end of the file reads as zeroes (a snapshot
/// may be shorter than the range asked for).
fn read_full(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    Ok(())
}
