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
    let temp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| Error::io("create", &temp, e))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &temp, e))?;
        crate::faults::crash_point("atomic.temp_written");
        std::fs::rename(&temp, path).map_err(|e| Error::io("rename", &temp, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result?;
    fsync_dir(parent(path))
}

/// Removes `path` durably; a file that is already gone is success.
pub fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => fsync_dir(parent(path)),
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

/// Creates a new backing file of `size` bytes (failing if it exists) and makes it durable.
/// On failure nothing is left behind.
pub fn create_backing_file(path: &Path, size: u64, allocation: Allocation) -> Result<()> {
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
            Allocation::Full => {
                let len = i64::try_from(size).map_err(|_| {
                    Error::io(
                        "fallocate",
                        path,
                        std::io::Error::from_raw_os_error(nix::libc::EFBIG),
                    )
                })?;
                nix::fcntl::fallocate(&file, FallocateFlags::empty(), 0, len)
                    .map_err(|errno| Error::io("fallocate", path, errno.into()))?;
            }
        }
        file.sync_all().map_err(|e| Error::io("fsync", path, e))?;
        fsync_dir(parent(path))
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
