//! The identity of a file, by which loop devices are matched to their images (never by the path
//! the kernel renders, which depends on the reader's mount namespace).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result};

/// The identity of a file: the device number of its file system and its inode number, as
/// `stat` shows them (`st_dev` in the C library's encoding, `st_ino`). Two paths name the same
/// file exactly when their identities are equal; while a loop device holds a file, no other
/// file on that file system can take its inode number, even after the file is unlinked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (symbolic links followed, as the kernel's attach does).
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let meta = std::fs::metadata(path)?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The identity of the file at `path`, `None` when there is no file there.
    pub fn at(path: &Path) -> Result<Option<FileId>> {
        match FileId::of(path) {
            Ok(id) => Ok(Some(id)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", path, e)),
        }
    }

    /// From the kernel's `lo_device`/`lo_inode`: `lo_device` is `huge_encode_dev()` (the
    /// kernel's "new" encoding), which differs from the C library's `dev_t` for minors above
    /// 255 and majors above 4095, so it is decoded to major:minor and encoded again.
    pub(crate) fn from_kernel(lo_device: u64, lo_inode: u64) -> FileId {
        let major = (lo_device & 0xfff00) >> 8;
        let minor = (lo_device & 0xff) | ((lo_device >> 12) & 0xfff00);
        FileId {
            dev: nix::sys::stat::makedev(major, minor),
            ino: lo_inode,
        }
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = (
            nix::sys::stat::major(self.dev),
            nix::sys::stat::minor(self.dev),
        );
        write!(f, "inode {} on device {major}:{minor}", self.ino)
    }
}
