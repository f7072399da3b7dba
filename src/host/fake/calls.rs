//! What the fake records: one `Call` per `Host` method call, named by an `Op` (one per method),
//! and the error an injected errno becomes for each operation — the shape the real function
//! gives for it, so the domain's handling (`EBUSY` → FAILED_PRECONDITION, `ENOSPC` → no space)
//! is exercised as on a node.

use nix::errno::Errno;

use crate::error::Error;

/// One `Host` method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Attach,
    Detach,
    AttachedDevices,
    DevicesOf,
    FindByBackingFile,
    LoopStatus,
    LoopDevice,
    DevNumbers,
    DirectIo,
    RefreshCapacity,
    HeldExclusively,
    FsErrorCount,
    OpenLayer,
    LayerAbove,
    GrowLayer,
    CloseLayer,
    Holders,
    Mounts,
    MountDevice,
    Bind,
    Unmount,
    ExtJournal,
    Supports,
    Probe,
    Mkfs,
    GrowExt4Offline,
    GrowExt4Online,
    GrowXfs,
    Node,
    NodeFollowed,
    FileId,
    Canonicalize,
    ListDir,
    ReadFile,
    CreateDirAll,
    CreateEmptyFile,
    WriteRecord,
    WriteRecordAtStartup,
    RemoveDurably,
    RemoveRecordDir,
    RemoveUncommitted,
    RemoveEmptyDir,
    RemoveFile,
    CreateImage,
    CommitWith,
    GrowImage,
    CopyImage,
    PatchImage,
    SyncFile,
    CopyDeviceToImage,
    HasData,
    AllocatedBytes,
    Reflinks,
    Usage,
    TryLock,
    OpenFs,
    SyncFs,
    Freeze,
    Thaw,
    DataRanges,
    PhysicalExtents,
    DifferingRanges,
}

/// One recorded call: the operation and its arguments, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub arg: String,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}", self.op, self.arg)
    }
}

impl Op {
    /// The error the real function returns when the kernel answers `errno`; `arg` is the
    /// call's recorded argument text (its first word is the path or device acted on).
    pub fn error(self, errno: Errno, arg: &str) -> Error {
        let target = arg.split(' ').next().unwrap_or(arg);
        let sys = |op| Error::sys(op, target, errno);
        let tool = |name: &str| Error::Tool {
            tool: name.to_string(),
            code: Some(1),
            stderr: format!("{target}: {}", errno.desc()),
        };
        match self {
            Op::Attach => sys("LOOP_CONFIGURE"),
            Op::Detach => sys("LOOP_CLR_FD"),
            Op::LoopStatus => sys("LOOP_GET_STATUS64"),
            Op::RefreshCapacity => sys("LOOP_SET_CAPACITY"),
            Op::OpenLayer => sys("open layer"),
            Op::GrowLayer => sys("grow layer"),
            Op::CloseLayer => sys("close layer"),
            Op::MountDevice => sys("mount"),
            Op::Bind => sys("bind mount"),
            Op::Unmount => sys("umount"),
            Op::Freeze => sys("FIFREEZE"),
            Op::Thaw => sys("FITHAW"),
            Op::Usage => sys("statvfs"),
            Op::Probe => tool("blkid"),
            Op::Mkfs => tool("mkfs"),
            Op::GrowExt4Offline | Op::GrowExt4Online => tool("resize2fs"),
            Op::GrowXfs => tool("xfs_growfs"),
            other => Error::io(
                other.verb(),
                target,
                std::io::Error::from_raw_os_error(errno as i32),
            ),
        }
    }

    /// The `op` of an `Error::Io` for a file operation, as the real function names it.
    fn verb(self) -> &'static str {
        match self {
            Op::ListDir => "read directory",
            Op::ReadFile | Op::Mounts | Op::AttachedDevices => "read",
            Op::CreateDirAll => "create directory",
            Op::CreateEmptyFile | Op::CreateImage => "create",
            Op::WriteRecord | Op::WriteRecordAtStartup | Op::CommitWith | Op::PatchImage => "write",
            Op::RemoveDurably | Op::RemoveUncommitted | Op::RemoveFile => "remove",
            Op::RemoveRecordDir | Op::RemoveEmptyDir => "remove directory",
            Op::GrowImage => "truncate",
            Op::CopyImage => "copy_file_range",
            Op::SyncFile => "fsync",
            Op::CopyDeviceToImage => "read",
            Op::Canonicalize => "canonicalize",
            Op::TryLock => "open lock file",
            Op::OpenFs => "open",
            Op::SyncFs => "syncfs",
            Op::DataRanges => "seek data",
            Op::PhysicalExtents => "FIEMAP",
            Op::DifferingRanges => "read",
            _ => "stat",
        }
    }
}
