//! Rescue of a volume whose image was deleted or replaced behind the driver's back while it was
//! staged: its loop device still holds the old file, which is then the only copy of the data.
//! NodeUnstageVolume refuses to detach it (that would destroy the data); `loopcsi rescue`
//! copies the device into a new image at the volume's path and only then lets it go.

use crate::error::{Error, Result};
use crate::volume::handle::OpenVolume;
use crate::volume::node::NodeOps;
use crate::volume::params::VolumeKind;
use crate::volume::records;

impl NodeOps {
    /// Copies the data of a staged volume whose image is gone from its still-attached loop
    /// device into a new image at the volume's path, then releases the device. Refused while
    /// the volume is published (its application could still write to the old device).
    /// Returns a line saying what was done.
    pub(crate) fn rescue(&self, v: OpenVolume<'_>) -> Result<String> {
        let (id, record, observed) = (&v.id, &v.record, &v.observed);
        let image = v.image.clone();
        let staging = record.staged.as_ref().map(|s| s.path.clone());
        let Some(dev) = observed.device.filter(|_| !observed.image_present) else {
            return Err(Error::NothingToRescue { volume: *id, image });
        };
        let host = self.host();
        if host.file_id(&image)?.is_some() {
            return Err(Error::RescueImageOccupied { image });
        }
        let kind = (v.meta.as_ref())
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
                host.unmount(path)?;
            }
        }
        // The layers over the device go first: the copy is of the loop device (the image's own
        // bytes), and the device cannot be detached while a layer holds it.
        if let Some(mut stack) = observed.stack.clone() {
            stack.close(host)?;
        }
        // Durable on return (temp file, fsync, rename, fsync the directory): a crash leaves no
        // image or the whole copy.
        let size = host.copy_device_to_image(&dev.path(), &image)?;
        host.detach(dev)?;
        if let Some(mut staged) = record.staged.clone() {
            staged.image = host.file_id(&image)?;
            records::save_staged(host, &v.records, &staged)?;
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
