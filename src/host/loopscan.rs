//! Which loop devices are attached, and to which files: read from `/proc/partitions` and the
//! kernel's answer to LOOP_GET_STATUS64 (see `loopdev`), matched by file identity.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::host::fileid::FileId;
use crate::host::loopdev::LoopDevice;

/// What the kernel says of one attached loop device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub device: LoopDevice,
    /// The backing file's identity; `None` when the device could not be asked (its node is
    /// missing from /dev, or it detached meanwhile): such a device is unknown, not foreign.
    pub backing: Option<FileId>,
    /// The backing file's path as this process's mount namespace renders it (for messages and
    /// for the pool-directory check of devices whose identity is unknown).
    pub shown: PathBuf,
    pub read_only: bool,
}

impl Attached {
    /// Whether this device's backing file is `file` (by identity).
    pub fn backs(&self, file: &FileId) -> bool {
        self.backing.as_ref() == Some(file)
    }
}

/// Every attached loop device with the path of its backing file as this process sees it (for
/// people: listings, benchmarks, tests). Decisions use [`attached_devices`], which identifies
/// backing files by identity.
pub fn attached() -> Result<Vec<(LoopDevice, PathBuf)>> {
    Ok(attached_numbers()?
        .into_iter()
        .filter_map(|dev| dev.backing_file().map(|file| (dev, file)))
        .collect())
}

/// Every attached loop device with its backing file's identity, read from the kernel.
///
/// The candidates come from one read of `/proc/partitions`, which lists block devices of
/// non-zero capacity only: a detached loop device has none, so the list holds the attached
/// ones. Only those are then asked. Walking `/sys/block` instead costs a failed sysfs lookup
/// per detached device (about 1 ms per call on a node with 200 loop devices, paid by every node
/// RPC). A device attached to an empty file has no capacity and is not listed; `attach`
/// refuses such files, so no device of ours is ever missed.
pub fn attached_devices() -> Result<Vec<Attached>> {
    let mut out = Vec::new();
    for device in attached_numbers()? {
        // Detached between the listing and now: nothing to report.
        let Some(shown) = device.backing_file() else {
            continue;
        };
        let (backing, read_only) = match device.status() {
            Ok(Some((id, read_only))) => (Some(id), read_only),
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!(device = %device.path().display(), error = %err, "cannot identify the backing file of a loop device; treating it as unknown");
                (None, device.read_only())
            }
        };
        out.push(Attached {
            device,
            backing,
            shown,
            read_only,
        });
    }
    Ok(out)
}

fn attached_numbers() -> Result<Vec<LoopDevice>> {
    let table = Path::new("/proc/partitions");
    let text = std::fs::read_to_string(table).map_err(|e| Error::io("read", table, e))?;
    Ok(loop_numbers_in_partitions(&text)
        .into_iter()
        .map(LoopDevice)
        .collect())
}

/// The numbers of the whole loop devices (`loopN`, not their partitions `loopNpM`) listed in
/// the text of `/proc/partitions` ("major minor #blocks name" after a header).
fn loop_numbers_in_partitions(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|name| name.strip_prefix("loop"))
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|digits| digits.parse().ok())
        .collect()
}

/// Every loop device whose backing file is `file` (by identity), read-only ones included.
pub fn devices_backed_by(file: &FileId) -> Result<Vec<Attached>> {
    Ok(attached_devices()?
        .into_iter()
        .filter(|a| a.backs(file))
        .collect())
}

/// Every loop device attached to the file at `path` (by identity: whatever path the kernel
/// renders for it). No file at `path` means no device can be found through it.
pub fn devices_of(path: &Path) -> Result<Vec<LoopDevice>> {
    let Some(file) = FileId::at(path)? else {
        return Ok(Vec::new());
    };
    Ok(devices_backed_by(&file)?
        .into_iter()
        .map(|a| a.device)
        .collect())
}

/// The writable loop device attached to the file at `path`, if any (read-only ones left out).
pub fn find_by_backing_file(path: &Path) -> Result<Option<LoopDevice>> {
    let Some(file) = FileId::at(path)? else {
        return Ok(None);
    };
    Ok(devices_backed_by(&file)?
        .into_iter()
        .find(|a| !a.read_only)
        .map(|a| a.device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_list_whole_loop_devices_only() {
        let text = "major minor  #blocks  name\n\n 254        0  268435456 vda\n 254        1  1000 vda1\n   7        0    1048576 loop0\n   7       12    1048576 loop12\n 259        0      1024 loop12p1\n   7        3       10 loopx\n";
        assert_eq!(loop_numbers_in_partitions(text), vec![0, 12]);
        assert_eq!(loop_numbers_in_partitions(""), Vec::<u32>::new());
    }
}
