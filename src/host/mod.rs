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

/// The block devices built on the device `numbers` (see `Host::holders`): read from sysfs
/// (`/sys/dev/block/M:m/holders/*/dev`, and the `dev` of each partition directory) and from the
/// attached loop devices' LOOP_GET_STATUS64 (`lo_rdevice`: the numbers of a backing file that
/// is a device node). Every answer is a device's numbers, never a path a namespace renders.
///
/// A loop device whose status cannot be read and whose backing file the kernel shows under
/// `/dev/` might be stacked on `numbers`: it is reported as a holder of unknown numbers
/// (`(0, 0)`), so the caller keeps the device (unknown is never "free").
pub fn holders(numbers: (u32, u32)) -> Result<Vec<layers::BlockDev>> {
    let (major, minor) = numbers;
    let sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let mut out = Vec::new();
    let read_dir = |dir: &std::path::Path| match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().map(|e| e.path()).collect::<Vec<_>>()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io("read directory", dir, e)),
    };
    let holders = read_dir(&sys.join("holders"))?;
    let partitions = read_dir(&sys)?
        .into_iter()
        .filter(|dir| dir.join("partition").exists());
    for dir in holders.into_iter().chain(partitions) {
        let file = dir.join("dev");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // gone meanwhile
        };
        let numbers =
            loopdev::parse_dev_numbers(text.trim()).ok_or_else(|| Error::UnexpectedSysfs {
                path: file.clone(),
                content: text.clone(),
            })?;
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        out.push(layers::BlockDev {
            path: std::path::Path::new("/dev").join(&*name),
            numbers,
        });
    }
    for attached in loopscan::attached_devices()? {
        let dev = attached.device;
        let lower = match attached.backing {
            Some(_) => dev.backing_device()?,
            // Unknown: possibly stacked on a device (its backing file shown as a node).
            None if attached.shown.starts_with("/dev/") => Some((0, 0)),
            None => None,
        };
        if lower == Some(numbers) || lower == Some((0, 0)) {
            out.push(layers::BlockDev {
                path: dev.path(),
                numbers: dev.dev_numbers().unwrap_or((0, 0)),
            });
        }
    }
    Ok(out)
}
