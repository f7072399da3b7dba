//! xfs: mkfs.xfs (optional on a node), grown online only, by xfs_growfs on its mount point.

use std::path::Path;

use super::{Filesystem, GrowsAt, PendingGrow};
use crate::error::{Error, Result};
use crate::host::mount::MountOptions;
use crate::host::tools::{Deadline, Tools};

pub(super) struct Xfs;

impl Filesystem for Xfs {
    fn name(&self) -> &'static str {
        "xfs"
    }

    /// mkfs.xfs refuses anything under 300 MiB.
    fn minimum_size(&self) -> u64 {
        300 << 20
    }

    fn mkfs_tool(&self) -> &'static str {
        "mkfs.xfs"
    }

    fn tools(&self) -> &'static [&'static str] {
        &["mkfs.xfs", "xfs_growfs"]
    }

    /// `-K`: no discard (see `Tools::mkfs`).
    fn mkfs_args(&self) -> &'static [&'static str] {
        &["-f", "-q", "-K"]
    }

    fn mount_defaults(&self, options: &mut MountOptions, _thick: bool) {
        // A restore or clone carries its source's xfs UUID, and both live on this node: without
        // nouuid the second of them would not mount.
        if !options.data.iter().any(|o| o == "nouuid") {
            options.data.push("nouuid".to_string());
        }
    }

    /// xfs only grows mounted.
    fn pending_grow(&self) -> PendingGrow {
        PendingGrow::Online
    }

    fn grow_offline(&self, _tools: &Tools, device: &Path) -> Result<()> {
        Err(Error::Internal(format!(
            "xfs cannot grow unmounted (on {})",
            device.display()
        )))
    }

    fn grows_at(&self) -> GrowsAt {
        GrowsAt::MountPoint
    }

    fn grow_online(&self, tools: &Tools, mount_point: &Path) -> Result<()> {
        tools
            .run_named(
                "xfs_growfs",
                &["-d".as_ref(), mount_point.as_os_str()],
                &[],
                Deadline::Long,
            )
            .map(drop)
    }

    /// xfs keeps no error count in sysfs; errors show as a shut-down (read-only) file system.
    fn recorded_errors(&self, _count: u64) -> Option<String> {
        None
    }
}
