//! Rescue of a volume whose image was deleted or replaced behind the driver's back while it was
//! staged: its loop device still holds the old file, which is then the only copy of the data.
//! NodeUnstageVolume refuses to detach it (that would destroy the data); `loopcsi rescue`
//! copies the device into a new image at the volume's path and only then lets it go.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::host::files::{self, Allocation};
use crate::host::loopdev::FileId;
use crate::host::mount;
use crate::volume::locks::VolumeGuard;
use crate::volume::node::NodeOps;
use crate::volume::params::VolumeKind;
use crate::volume::records;

/// Bytes read from the device at a time; runs of zeroes this long stay holes in the new image.
const CHUNK: usize = 1 << 20;

impl NodeOps {
    /// Copies the data of a staged volume whose image is gone from its still-attached loop
    /// device into a new image at the volume's path, then releases the device. Refused while
    /// the volume is published (its application could still write to the old device).
    /// Returns a line saying what was done.
    pub fn rescue(&self, held: &VolumeGuard) -> Result<String> {
        let id = held.id();
        let record = self.load_record(id)?;
        let image = self.pool.layout().image(id);
        let staging = record.staged.as_ref().map(|s| s.path.clone());
        let observed = self.observe(id, &record, staging.as_deref())?;
        let Some(dev) = observed.device.filter(|_| !observed.image_present) else {
            return Err(Error::NothingToRescue { volume: *id, image });
        };
        if FileId::at(&image)?.is_some() {
            return Err(Error::RescueImageOccupied { image });
        }
        let kind = self
            .pool
            .get(id)
            .map(|m| m.kind)
            .or_else(|| record.staged.as_ref().map(|s| s.capability.volume_kind()));
        let live: Vec<_> = record
            .published
            .iter()
            .filter(|p| kind.is_some_and(|k| observed.live_at(k, &p.target)))
            .map(|p| p.target.clone())
            .collect();
        if !live.is_empty() {
            return Err(Error::RescueWhilePublished {
                volume: *id,
                targets: live,
            });
        }
        // Unmounting flushes the file system: the device is quiescent from here on.
        if let (Some(VolumeKind::Filesystem(_)), Some(path)) = (kind, &staging) {
            if observed.fs_mounted_at(path) {
                mount::unmount(path)?;
            }
        }
        let size = copy_device(&dev.path(), &image)?;
        dev.detach()?;
        if let Some(mut staged) = record.staged {
            staged.image = FileId::at(&image)?;
            records::save_staged(&self.pool.layout().node_record(id), &staged)?;
        }
        let done = format!(
            "rescued volume {id}: copied {size} bytes from {} into {}; the device is detached \
             and the volume can be staged again",
            dev.path().display(),
            image.display()
        );
        tracing::warn!("{done}");
        Ok(done)
    }
}

/// Copies `device` into a new sparse file at `image` (temp file, fsync, rename, fsync the
/// directory): a crash leaves either no image or the whole copy. Returns the size copied.
fn copy_device(device: &Path, image: &Path) -> Result<u64> {
    let mut source = std::fs::File::open(device).map_err(|e| Error::io("open", device, e))?;
    let temp = image.with_extension("img.rescue");
    let size = std::fs::metadata(device)
        .ok()
        .and_then(|_| {
            use std::io::Seek;
            let end = source.seek(std::io::SeekFrom::End(0)).ok();
            source.seek(std::io::SeekFrom::Start(0)).ok()?;
            end
        })
        .ok_or_else(|| Error::UnknownSize {
            device: device.to_path_buf(),
        })?;
    // Left by a rescue that did not finish; only a rescue writes this name.
    files::remove_uncommitted(&temp)?;
    let out = files::create_backing_file(&temp, size, Allocation::Sparse)?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let n = source
            .read(&mut buf)
            .map_err(|e| Error::io("read", device, e))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], offset)
                .map_err(|e| Error::io("write", &temp, e))?;
        }
        offset += n as u64;
    }
    out.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
    std::fs::rename(&temp, image).map_err(|e| Error::io("rename", &temp, e))?;
    files::fsync_dir(image.parent().unwrap_or(Path::new("/")))?;
    Ok(size)
}
