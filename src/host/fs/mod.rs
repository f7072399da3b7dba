//! The file systems loopcsi formats volumes with, behind one seam: everything that differs
//! between them (the mkfs tool and its arguments, the mount options the driver adds, the
//! smallest device, how and when a file system grows, its error counter) lives in one
//! implementation of [`Filesystem`] per file system, in a file of its own. The rest of the
//! driver asks the seam and never matches on [`FsType`] (the one match is [`FsType::get`]), so
//! adding a file system is one variant, one implementation file and its tools in `Tools`.

mod ext4;
mod xfs;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::host::mount::MountOptions;
use crate::host::tools::Tools;

/// The file systems loopcsi formats volumes with (persisted in metadata by these names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// Every file system, for lookups by name.
    pub const ALL: [FsType; 2] = [FsType::Ext4, FsType::Xfs];

    /// The implementation of this file system: the one place an `FsType` is matched.
    pub fn get(self) -> &'static dyn Filesystem {
        match self {
            FsType::Ext4 => &ext4::Ext4,
            FsType::Xfs => &xfs::Xfs,
        }
    }

    pub fn name(self) -> &'static str {
        self.get().name()
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|fs| fs.name() == name)
    }

    /// The names a request may use, for messages: `"ext4" or "xfs"`.
    pub fn choices() -> String {
        let names: Vec<_> = Self::ALL
            .iter()
            .map(|fs| format!("{:?}", fs.name()))
            .collect();
        names.join(" or ")
    }

    /// The smallest device mkfs accepts for a journaled file system of this type.
    pub fn minimum_size(self) -> u64 {
        self.get().minimum_size()
    }
}

/// What the online grow tool of a file system is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrowsAt {
    /// The block device (resize2fs).
    Device,
    /// The mount point of the file system itself, not a bind of it (xfs_growfs).
    MountPoint,
}

/// When a volume whose file system is smaller than its device (a restore or clone into a larger
/// volume) grows it at stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingGrow {
    /// Before the mount, unmounted (`Filesystem::grow_offline`).
    Offline,
    /// After the mount, mounted (`Filesystem::grow_online`).
    Online,
}

/// One file system: how to make, mount, grow and check it.
pub trait Filesystem: Sync {
    /// The kernel's (and blkid's) name of the file system.
    fn name(&self) -> &'static str;

    /// The smallest device mkfs accepts for a useful file system.
    fn minimum_size(&self) -> u64;

    /// The mkfs tool, by the name `Tools` discovered it under.
    fn mkfs_tool(&self) -> &'static str;

    /// The arguments of mkfs before the device.
    fn mkfs_args(&self) -> &'static [&'static str];

    /// Every tool this file system runs (mkfs, checks, growth), by the name `Tools` finds it
    /// under: `Tools::discover` looks for them, so a new file system brings its own tools.
    fn tools(&self) -> &'static [&'static str];

    /// Adds the options the driver always mounts this file system with (unless the request's
    /// flags already say otherwise). `thick` is a fully allocated volume.
    fn mount_defaults(&self, options: &mut MountOptions, thick: bool);

    /// When a pending grow runs at stage.
    fn pending_grow(&self) -> PendingGrow;

    /// Grows the unmounted file system on `device` to the device's size.
    fn grow_offline(&self, tools: &Tools, device: &Path) -> Result<()>;

    /// What `grow_online` is given.
    fn grows_at(&self) -> GrowsAt;

    /// Grows the mounted file system to its device's size; `at` is what `grows_at` asks for.
    fn grow_online(&self, tools: &Tools, at: &Path) -> Result<()>;

    /// Errors the file system recorded on a loop device (`count`, as `Host::fs_error_count`
    /// read it), as a problem for the volume's health; `None` when it has none or keeps no
    /// count. The count is read through the host, so a fake can report errors.
    fn recorded_errors(&self, count: u64) -> Option<String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_persisted_names() {
        for fs in FsType::ALL {
            assert_eq!(FsType::from_name(fs.name()), Some(fs));
            let json = serde_json::to_string(&fs).unwrap();
            assert_eq!(json, format!("\"{}\"", fs.name()));
        }
        assert_eq!(FsType::from_name("btrfs"), None);
        assert_eq!(FsType::choices(), r#""ext4" or "xfs""#);
    }
}
