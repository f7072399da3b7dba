//! The only door to the operating system. Nothing here knows about CSI.

pub mod extents;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fake;
pub mod fileid;
pub mod files;
pub mod fs;
pub mod layers;
pub mod linux;
pub mod lockfile;
pub mod loopdev;
pub mod loopscan;
pub mod mount;
pub mod os;
pub mod reclone;
pub mod tools;

use crate::error::{Error, Result};

/// Runs `background` on a scoped thread while `foreground` runs on this one, and returns both
/// results once both are done. Used to issue independent fsyncs (each a device cache flush)
/// at the same time as other work instead of after it; `what` names the background work if it
/// panics.
pub fn alongside<A, B: Send>(
    background: impl FnOnce() -> Result<B> + Send,
    foreground: impl FnOnce() -> A,
    what: impl FnOnce() -> String,
) -> (A, Result<B>) {
    std::thread::scope(|scope| {
        let running = scope.spawn(background);
        let done = foreground();
        let background = running
            .join()
            .unwrap_or_else(|_| Err(Error::Internal(format!("{} panicked", what()))));
        (done, background)
    })
}

/// The kernel's name (`loop3`, `vda1`, `dm-0`) of the block device with these numbers.
pub fn block_device_name(major: u32, minor: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    Some(link.file_name()?.to_str()?.to_string())
}

/// Whether a process holds the block device at `device` open exclusively (`O_EXCL`): a mounted
/// file system does, and so do mkfs, e2fsck and resize2fs while they run. The probe's own open
/// is closed at once.
pub fn held_exclusively(device: &std::path::Path) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(device)
    {
        Ok(_) => Ok(false),
        Err(err) if err.raw_os_error() == Some(nix::libc::EBUSY) => Ok(true),
        Err(err) => Err(Error::io("open exclusively", device, err)),
    }
}
