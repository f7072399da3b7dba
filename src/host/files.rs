//! Files in the state dir: crash-safe replacement (temp file, fsync, rename, fsync the directory),
//! backing-file creation, and file-system capacity.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::FallocateFlags;

use crate::error::{Error, Result};

/// Suffix of the temporary file a crash-safe write goes through; startup removes leftovers.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Flushes a directory, making the creations, renames and removals inside it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMP_SUFFIX);
    PathBuf::from(name)
}

/// Replaces `path` with `contents` so that a crash at any instant leaves either the old file or
/// the new one, complete. The only good copy is never rewritten in place.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomic_with(path, contents, None)
}

/// `write_atomic` for a file written at startup, before the driver serves (the node id): the
/// same steps without the `atomic.temp_written` crash point, which the crash tests use to kill
/// a driver that already serves, in the middle of a pool write.
pub fn write_atomic_at_startup(path: &Path, contents: &[u8]) -> Result<()> {
    replace(path, contents, None, false)
}

/// `write_atomic`, also making `companion` durable before the rename: a file just created
/// beside `path` that the new `path` commits (a volume's image and its metadata), or the
/// directory a new record directory was made in. The companion's fsync runs on a scoped thread
/// while the temp file is written and flushed: two fsyncs issued together wait for one device
/// cache flush (the block layer merges flushes that are pending at once; a journaling file
/// system commits both inodes in one transaction), where one after the other costs two. Both
/// are complete before the rename, so a crash before the directory fsync that follows leaves
/// the old state (a companion without the file that commits it, which recovery removes as
/// half-made).
pub fn write_atomic_with(
    path: &Path,
    contents: &[u8],
    companion: Option<(&File, &Path)>,
) -> Result<()> {
    replace(path, contents, companion, true)
}

fn replace(
    path: &Path,
    contents: &[u8],
    companion: Option<(&File, &Path)>,
    crash_point: bool,
) -> Result<()> {
    let temp = temp_path(path);
    let result = (|| {
        match companion {
            None => write_temp(&temp, contents)?,
            Some((file, file_path)) => {
                let (written, synced) = super::alongside(
                    || {
                        file.sync_all()
                            .map_err(|e| Error::io("fsync", file_path, e))
                    },
                    || write_temp(&temp, contents),
                    || format!("the fsync of {}", file_path.display()),
                );
                written.and(synced)?;
            }
        }
        if crash_point {
            crate::faults::crash_point("atomic.temp_written");
        }
        std::fs::rename(&temp, path).map_err(|e| Error::io("rename", &temp, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result?;
    fsync_dir(parent(path))
}

/// Creates (or truncates) `temp` with `contents`, flushed to the device.
fn write_temp(temp: &Path, contents: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(temp)
        .map_err(|e| Error::io("create", temp, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write", temp, e))
}

/// Removes `path` durably; a file that is already gone is success.
pub fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => fsync_dir(parent(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Removes a file that nothing commits any more (an image whose metadata is already durably
/// gone); a file that is already gone is success. No directory fsync: if a crash undoes the
/// removal, startup recovery finds the file without its metadata and removes it again, so the
/// fsync (a device cache flush) would buy nothing.
pub fn remove_uncommitted(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// How a backing file's blocks are provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Sparse: blocks are allocated as the volume writes them.
    Sparse,
    /// Every block reserved up front (fallocate), so writes can never hit ENOSPC.
    Full,
}

/// Creates a new backing file of `size` bytes (failing if it exists). It is not durable yet:
/// the caller makes it durable together with the metadata that commits it
/// (`write_atomic_with`), which flushes both at once. On failure nothing is left behind.
pub fn create_backing_file(path: &Path, size: u64, allocation: Allocation) -> Result<File> {
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        match allocation {
            Allocation::Sparse => file
                .set_len(size)
                .map_err(|e| Error::io("truncate", path, e))?,
            Allocation::Full => allocate(&file, path, 0, size)?,
        }
        Ok(file)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Space of a mounted file system, in bytes and inodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

/// statvfs(2) of the file system holding `path`.
pub fn usage(path: &Path) -> Result<Usage> {
    let st =
        nix::sys::statvfs::statvfs(path).map_err(|e| Error::sys("statvfs", path.display(), e))?;
    let frsize = st.fragment_size();
    let blocks = st.blocks();
    let free = st.blocks_free();
    Ok(Usage {
        total_bytes: blocks.saturating_mul(frsize),
        available_bytes: st.blocks_available().saturating_mul(frsize),
        used_bytes: blocks.saturating_sub(free).saturating_mul(frsize),
        total_inodes: st.files(),
        free_inodes: st.files_free(),
        used_inodes: st.files().saturating_sub(st.files_free()),
    })
}

/// Bytes of `path` really allocated on disk (st_blocks × 512).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .map_err(|e| Error::io("stat", path, e))
}

/// How a copy was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of data extents handed to copy_file_range (shared by reflink where the pool file
    /// system can, copied otherwise).
    pub data_bytes: u64,
    /// Number of data extents.
    pub extents: u64,
}

/// The data extents of the first `len` bytes of `file` (SEEK_DATA/SEEK_HOLE), as
/// `(start, end)` byte ranges in order. Everything outside them reads back as zeroes.
fn data_ranges(file: &File, path: &Path, len: u64) -> Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let end = i64::try_from(len).map_err(|_| Error::Internal(format!("copy of {len} bytes")))?;
    let mut ranges = Vec::new();
    let mut pos: i64 = 0;
    while pos < end {
        let data = match lseek(file, pos, Whence::SeekData) {
            Ok(offset) => offset,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
            Err(errno) => return Err(Error::io("seek data", path, errno.into())),
        };
        if data >= end {
            break;
        }
        let hole = lseek(file, data, Whence::SeekHole)
            .map_err(|errno| Error::io("seek hole", path, errno.into()))?
            .min(end);
        ranges.push((data.unsigned_abs(), hole.unsigned_abs()));
        pos = hole;
    }
    Ok(ranges)
}

/// Makes `dst` (new) a copy of the first `len` bytes of `src`, sized `size` (≥ `len`): only the
/// data extents are transferred (SEEK_DATA/SEEK_HOLE), so holes stay holes, and each extent goes
/// through copy_file_range, which the kernel turns into a reflink (shared extents, no data
/// copied) on xfs with reflink and on btrfs, and into an in-kernel copy elsewhere. The copy is
/// made durable; on failure nothing is left behind.
pub fn copy_sparse(src: &Path, dst: &Path, len: u64, size: u64) -> Result<CopyStats> {
    copy_sparse_with(src, dst, len, size, true)
}

/// `copy_sparse` without the flushes: for a copy taken while file systems are frozen, made
/// durable (`sync_file` of the copy and of its directory) after the thaw.
pub fn copy_sparse_unsynced(src: &Path, dst: &Path, len: u64, size: u64) -> Result<CopyStats> {
    copy_sparse_with(src, dst, len, size, false)
}

fn copy_sparse_with(
    src: &Path,
    dst: &Path,
    len: u64,
    size: u64,
    durable: bool,
) -> Result<CopyStats> {
    let result = (|| {
        let input = File::open(src).map_err(|e| Error::io("open", src, e))?;
        let output = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)
            .map_err(|e| Error::io("create", dst, e))?;
        let whole = input.metadata().is_ok_and(|m| m.len() == len) && len <= size;
        if whole && crate::host::loopdev::clone_file(&input, &output).is_ok() {
            // One FICLONE instead of a copy_file_range per extent: a snapshot's frozen window
            // on a reflink pool stays the same whatever the volume's fragmentation.
            output
                .set_len(size)
                .map_err(|e| Error::io("truncate", dst, e))?;
            let ranges = data_ranges(&input, src, len)?;
            let stats = CopyStats {
                data_bytes: ranges.iter().map(|(d, h)| h - d).sum(),
                extents: ranges.len() as u64,
            };
            if durable {
                output.sync_all().map_err(|e| Error::io("fsync", dst, e))?;
                fsync_dir(parent(dst))?;
            }
            return Ok(stats);
        }
        output
            .set_len(size)
            .map_err(|e| Error::io("truncate", dst, e))?;
        let mut stats = CopyStats::default();
        for (data, hole) in data_ranges(&input, src, len)? {
            let (mut off_in, mut off_out) = (data as i64, data as i64);
            let end = hole as i64;
            while off_in < end {
                let chunk = usize::try_from(end - off_in)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                let copied = nix::fcntl::copy_file_range(
                    &input,
                    Some(&mut off_in),
                    &output,
                    Some(&mut off_out),
                    chunk,
                )
                .map_err(|errno| Error::io("copy_file_range", dst, errno.into()))?;
                if copied == 0 {
                    return Err(Error::io(
                        "copy_file_range",
                        dst,
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "source shrank during the copy",
                        ),
                    ));
                }
            }
            stats.data_bytes += hole - data;
            stats.extents += 1;
        }
        if durable {
            output.sync_all().map_err(|e| Error::io("fsync", dst, e))?;
            fsync_dir(parent(dst))?;
        }
        Ok(stats)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Size of the blocks `patch_to_match` compares and rewrites: the pool's and the volumes' block
/// size.
const PATCH_BLOCK: usize = 4096;

/// What `patch_to_match` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Patched {
    /// Bytes of `dst` rewritten because they differed.
    pub rewritten: u64,
    /// Bytes compared.
    pub compared: u64,
    /// False when the deadline passed first: `dst` is then only partly patched.
    pub finished: bool,
}

/// Makes the first `len` bytes of `dst` equal to those of `src` by rewriting only the blocks
/// that differ. Every range where either file has data is compared (ranges that are holes in
/// both read back as zeroes in both), so afterwards `dst` reads back exactly as `src` did,
/// whatever either held before. Not flushed: the caller fsyncs `dst` when it is done
/// (`sync_file`). With a `deadline`, it stops between chunks once the deadline has passed
/// (`finished` false): a caller holding a file system frozen meanwhile bounds the freeze.
pub fn patch_to_match(
    src: &Path,
    dst: &Path,
    len: u64,
    deadline: Option<std::time::Instant>,
) -> Result<Patched> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let input = File::open(src).map_err(|e| Error::io("open", src, e))?;
    let output = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dst)
        .map_err(|e| Error::io("open", dst, e))?;
    let mut ranges = data_ranges(&input, src, len)?;
    ranges.extend(data_ranges(&output, dst, len)?);
    ranges.sort_unstable();
    let mut theirs = vec![0u8; CHUNK];
    let mut ours = vec![0u8; CHUNK];
    let mut rewritten = 0;
    let mut compared = 0;
    let mut done = 0; // everything below this offset already matches
    for (start, end) in ranges {
        let mut pos = start.max(done);
        while pos < end {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(Patched {
                    rewritten,
                    compared,
                    finished: false,
                });
            }
            let n = usize::try_from(end - pos).unwrap_or(CHUNK).min(CHUNK);
            input
                .read_exact_at(&mut theirs[..n], pos)
                .map_err(|e| Error::io("read", src, e))?;
            output
                .read_exact_at(&mut ours[..n], pos)
                .map_err(|e| Error::io("read", dst, e))?;
            if theirs[..n] != ours[..n] {
                for offset in (0..n).step_by(PATCH_BLOCK) {
                    let block = offset..(offset + PATCH_BLOCK).min(n);
                    if theirs[block.clone()] != ours[block.clone()] {
                        output
                            .write_all_at(&theirs[block.clone()], pos + offset as u64)
                            .map_err(|e| Error::io("write", dst, e))?;
                        rewritten += block.len() as u64;
                    }
                }
            }
            pos += n as u64;
            compared += n as u64;
        }
        done = done.max(end);
    }
    Ok(Patched {
        rewritten,
        compared,
        finished: true,
    })
}

/// Flushes `path`'s data and metadata to the device.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("fsync", path, e))
}

/// Whether copy_file_range on the file system holding `dir` shares extents (reflink) instead
/// of copying data: btrfs always, xfs when made with reflink=1 (mkfs.xfs's default since
/// xfsprogs 5.1). A copy there takes milliseconds whatever the size.
pub fn reflinks(dir: &Path) -> bool {
    use nix::sys::statfs::{statfs, BTRFS_SUPER_MAGIC, XFS_SUPER_MAGIC};
    statfs(dir).is_ok_and(|s| {
        let fs = s.filesystem_type();
        fs == BTRFS_SUPER_MAGIC || fs == XFS_SUPER_MAGIC
    })
}

/// Grows an existing backing file to `size` bytes (never shrinks it); a fully allocated file
/// gets the new range allocated too. Durable on return.
pub fn grow_backing_file(path: &Path, size: u64, allocation: Allocation) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let current = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    if current < size {
        match allocation {
            Allocation::Sparse => file
                .set_len(size)
                .map_err(|e| Error::io("truncate", path, e))?,
            Allocation::Full => allocate(&file, path, 0, size)?,
        }
    } else if allocation == Allocation::Full {
        // A restored or cloned thick volume: fill the holes the sparse copy left.
        allocate(&file, path, 0, size)?;
    }
    file.sync_all().map_err(|e| Error::io("fsync", path, e))
}

fn allocate(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    let too_big = || {
        Error::io(
            "fallocate",
            path,
            std::io::Error::from_raw_os_error(nix::libc::EFBIG),
        )
    };
    let offset = i64::try_from(offset).map_err(|_| too_big())?;
    let len = i64::try_from(len).map_err(|_| too_big())?;
    nix::fcntl::fallocate(file, FallocateFlags::empty(), offset, len)
        .map_err(|errno| Error::io("fallocate", path, errno.into()))
}

/// Whether `path` has any data extent (SEEK_DATA). A sparse file that was never written, or
/// one that is fully allocated but unwritten, has none: it reads back as zeroes throughout.
pub fn has_data(path: &Path) -> Result<bool> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    match nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekData) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::ENXIO) => Ok(false),
        Err(errno) => Err(Error::io("seek data", path, errno.into())),
    }
}

/// Size of a file in bytes.
pub fn file_size(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::io("stat", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_with_a_companion_commits_the_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("v.img");
        let meta = dir.path().join("v.json");
        let file = create_backing_file(&image, 1 << 20, Allocation::Sparse).unwrap();
        write_atomic_with(&meta, b"{}", Some((&file, &image))).unwrap();
        assert_eq!(std::fs::read(&meta).unwrap(), b"{}");
        assert!(!temp_path(&meta).exists());
        // A directory is a companion too (a record directory's parent).
        let parent = File::open(dir.path()).unwrap();
        write_atomic_with(&meta, b"[]", Some((&parent, dir.path()))).unwrap();
        assert_eq!(std::fs::read(&meta).unwrap(), b"[]");
    }

    #[test]
    fn a_companion_that_cannot_be_flushed_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("v.json");
        write_atomic(&meta, b"old").unwrap();
        // procfs files refuse fsync (EINVAL): the commit must not happen.
        let unflushable = Path::new("/proc/self/stat");
        let companion = File::open(unflushable).unwrap();
        let err = write_atomic_with(&meta, b"new", Some((&companion, unflushable))).unwrap_err();
        assert!(err.to_string().contains("/proc/self/stat"), "{err}");
        assert_eq!(std::fs::read(&meta).unwrap(), b"old");
        assert!(!temp_path(&meta).exists());
    }

    #[test]
    fn removing_an_uncommitted_file_twice_is_success() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("v.img");
        drop(create_backing_file(&image, 4096, Allocation::Sparse).unwrap());
        remove_uncommitted(&image).unwrap();
        remove_uncommitted(&image).unwrap();
        assert!(!image.exists());
    }

    #[test]
    fn patching_makes_the_copy_equal_to_a_source_that_changed_since() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        let size = 8 << 20;
        let file = create_backing_file(&src, size, Allocation::Sparse).unwrap();
        file.write_all_at(&[1; 10_000], 4096).unwrap();
        file.write_all_at(&[2; 4096], 5 << 20).unwrap();
        copy_sparse(&src, &dst, size, size).unwrap();
        // Writes after the copy: into copied data, into a hole, and a punched-out range.
        file.write_all_at(&[3; 100], 6000).unwrap();
        file.write_all_at(&[4; 4096], 7 << 20).unwrap();
        nix::fcntl::fallocate(
            &file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            5 << 20,
            4096,
        )
        .unwrap();
        // A deadline already passed stops the pass before its first chunk.
        let late = std::time::Instant::now();
        let stopped = patch_to_match(&src, &dst, size, Some(late)).unwrap();
        assert_eq!((stopped.finished, stopped.compared), (false, 0));
        let rewritten = patch_to_match(&src, &dst, size, None).unwrap().rewritten;
        assert_eq!(rewritten, 3 * 4096, "only the changed blocks are rewritten");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let again = patch_to_match(&src, &dst, size, None).unwrap();
        assert_eq!(again.rewritten, 0);
        assert!(again.finished && again.compared > 0);
    }
}
