//! ext4: mkfs.ext4, grown by resize2fs (offline after e2fsck, or online with CAP_SYS_RESOURCE).

use std::path::Path;

use super::{Filesystem, GrowsAt, PendingGrow};
use crate::error::{Error, Result};
use crate::host::mount::MountOptions;
use crate::host::tools::{Deadline, Tools};

pub(super) struct Ext4;

impl Filesystem for Ext4 {
    fn name(&self) -> &'static str {
        "ext4"
    }

    /// Below 16 MiB ext4 gets no useful journal.
    fn minimum_size(&self) -> u64 {
        16 << 20
    }

    fn mkfs_tool(&self) -> &'static str {
        "mkfs.ext4"
    }

    fn tools(&self) -> &'static [&'static str] {
        &["mkfs.ext4", "e2fsck", "resize2fs"]
    }

    /// Discard off (see `Tools::mkfs`); inode tables and journal are initialised lazily: the
    /// device is a fresh file that reads back zeroes, so skipping the zeroing pass is safe.
    fn mkfs_args(&self) -> &'static [&'static str] {
        &[
            "-F",
            "-q",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
        ]
    }

    fn mount_defaults(&self, options: &mut MountOptions, thick: bool) {
        // ext4 zeroes its inode tables lazily after mounting; the loop device turns those zeroes
        // into holes punched in the backing file, which would hand a thick volume's reservation
        // back to the pool. The tables of a fresh volume read back as zeroes anyway.
        if thick && !options.data.iter().any(|o| o.contains("init_itable")) {
            options.data.push("noinit_itable".to_string());
        }
    }

    /// resize2fs grows an unmounted file system without any capability, so a pending grow runs
    /// before the mount.
    fn pending_grow(&self) -> PendingGrow {
        PendingGrow::Offline
    }

    /// Checked first, as resize2fs requires of an unmounted file system.
    fn grow_offline(&self, tools: &Tools, device: &Path) -> Result<()> {
        // e2fsck exits 1 when it fixed something harmless (preen mode); both are fine.
        tools.run_named(
            "e2fsck",
            &["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
            &[1],
            Deadline::Long,
        )?;
        tools
            .run_named("resize2fs", &[device.as_os_str()], &[], Deadline::Long)
            .map(drop)
    }

    fn grows_at(&self) -> GrowsAt {
        GrowsAt::Device
    }

    /// The kernel demands CAP_SYS_RESOURCE for an online grow; a refusal is FAILED_PRECONDITION
    /// naming the missing capability.
    fn grow_online(&self, tools: &Tools, device: &Path) -> Result<()> {
        match tools.run_named("resize2fs", &[device.as_os_str()], &[], Deadline::Long) {
            Err(Error::Tool { stderr, .. }) if stderr.contains("Permission denied") => {
                // A privileged container has every capability of its host's bounding set, so
                // "run it privileged" is not always the remedy: some hosts drop the capability
                // for every process. The next stage grows the file system offline.
                Err(Error::NeedsCapability {
                    device: device.to_path_buf(),
                    capability: "CAP_SYS_RESOURCE",
                    stderr,
                })
            }
            other => other.map(drop),
        }
    }

    /// ext4 counts the errors it met since mkfs in sysfs.
    fn recorded_errors(&self, errors: u64) -> Option<String> {
        (errors > 0).then(|| format!("ext4 recorded {errors} file-system error(s); run e2fsck"))
    }
}
