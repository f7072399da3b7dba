//! Reflink copies of a live image that stall its application as little as possible. A
//! snapshot of a mounted file system on a pool that shares extents is made in two steps:
//! - `preclone`, while the application still writes: the image's data is reflinked in chunks
//!   of at most `CHUNK` bytes (a reflink locks the source file, and the loop device's writes
//!   wait for it: one whole-file FICLONE of a busy, fragmented 256 MiB image held them for
//!   40-100 ms on the development VM's xfs pool), then the copy's extent map is read;
//! - `reclone_changed`, with the file system frozen: clones again only the ranges whose
//!   physical mapping in the source differs from the copy's. A range whose mapping is the same
//!   holds the same bytes: a shared extent is never overwritten in place, so every write since
//!   went to a new extent, and a range reflinked at any moment of the first pass is found
//!   again if it changed afterwards. The frozen pass reads one extent map and clones a handful
//!   of ranges.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};

use std::os::unix::fs::OpenOptionsExt;

use crate::error::{Error, Result};
use crate::host::extents::{data_ranges, extent_delta, physical_extents, written, Extent};
use crate::host::files::CopyStats;
use crate::host::loopdev::{clone_file, clone_range};

/// The most bytes one reflink call of the first pass remaps.
const CHUNK: u64 = 4 << 20;

/// A reflink copy made while its source changed, and the copy's extent map then.
pub struct Preclone {
    pub stats: CopyStats,
    /// `None` when the file system cannot tell where the copy's data is: the frozen pass then
    /// clones the whole file again.
    pub base: Option<Vec<Extent>>,
}

/// Makes `dst` (new, sized `size`) a reflink of the first `len` bytes of `src`, chunk by chunk
/// over `src`'s data ranges (not flushed). Fails where the pool does not share extents.
pub fn preclone(src: &Path, dst: &Path, len: u64, size: u64) -> Result<Preclone> {
    let input = File::open(src).map_err(|e| Error::io("open", src, e))?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| Error::io("create", dst, e))?;
    output
        .set_len(size)
        .map_err(|e| Error::io("truncate", dst, e))?;
    let ranges = data_ranges(src, 0, len)?;
    for &(start, end) in &ranges {
        let mut at = start;
        while at < end {
            let n = CHUNK.min(end - at);
            clone_range(&input, &output, at, n)
                .map_err(|errno| Error::io("FICLONERANGE", dst, errno.into()))?;
            at += n;
        }
    }
    Ok(Preclone {
        stats: CopyStats {
            data_bytes: ranges.iter().map(|(s, e)| e - s).sum(),
            extents: ranges.len() as u64,
        },
        base: physical_extents(dst, 0, len)?,
    })
}

/// What the frozen pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recloned {
    /// Bytes cloned again or punched.
    pub bytes: u64,
    /// Changed ranges.
    pub ranges: usize,
    /// The extents could not tell what changed: the whole file was cloned again.
    pub whole: bool,
}

/// Makes `dst` (a reflink of `src` made earlier, whose extents were then `base`) read back as
/// the first `len` bytes of `src` now. Without `base`, or when the source's extents cannot be
/// read exactly, the whole file is cloned again (one FICLONE, as slow as the first).
pub fn reclone_changed(
    src: &Path,
    dst: &Path,
    len: u64,
    base: Option<&[Extent]>,
) -> Result<Recloned> {
    let input = File::open(src).map_err(|e| Error::io("open", src, e))?;
    let output = OpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(|e| Error::io("open", dst, e))?;
    if let Some(base) = base {
        if let Some(now) = physical_extents(src, 0, len)? {
            if let Ok(done) = reclone_ranges(&input, &output, &now, base, len) {
                return Ok(done);
            }
            // A range the file system refused (alignment): the whole clone below is exact.
        }
    }
    let size = output
        .metadata()
        .map_err(|e| Error::io("stat", dst, e))?
        .len();
    clone_file(&input, &output).map_err(|errno| Error::io("FICLONE", dst, errno.into()))?;
    output
        .set_len(size)
        .map_err(|e| Error::io("truncate", dst, e))?;
    Ok(Recloned {
        bytes: len,
        ranges: 1,
        whole: true,
    })
}

/// Clones again where `src`'s data now lies elsewhere than in `base`, and punches where its
/// data is gone (a discard reached the image): everywhere else the two files share extents.
fn reclone_ranges(
    input: &File,
    output: &File,
    now: &[Extent],
    base: &[Extent],
    len: u64,
) -> std::result::Result<Recloned, nix::errno::Errno> {
    let changed = extent_delta(now, base, 0, len);
    let data = written(now, 0, len);
    let mut done = Recloned {
        ranges: changed.len(),
        ..Recloned::default()
    };
    for (start, end) in changed {
        let mut at = start;
        for &(s, e, _) in data.iter().filter(|(s, e, _)| *s < end && *e > start) {
            let (s, e) = (s.max(start), e.min(end));
            punch(output, at, s)?;
            clone_range(input, output, s, e - s)?;
            at = e;
        }
        punch(output, at, end)?;
        done.bytes += end - start;
    }
    Ok(done)
}

fn punch(file: &File, start: u64, end: u64) -> std::result::Result<(), nix::errno::Errno> {
    if start >= end {
        return Ok(());
    }
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let (offset, len) = (i64::try_from(start), i64::try_from(end - start));
    let (Ok(offset), Ok(len)) = (offset, len) else {
        return Err(nix::errno::Errno::EINVAL);
    };
    fallocate(file, flags, offset, len).map(drop)
}
