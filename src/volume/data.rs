//! Data services: a volume made stable as a copy source (the copy itself is `content.rs`),
//! online expansion, and volume health.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host::files::Allocation;
use crate::host::fs::{GrowsAt, PendingGrow};
use crate::host::mount;
use crate::volume::freeze::FreezeTarget;
use crate::volume::handle::{Near, OpenVolume, VolumeView};
use crate::volume::id::VolumeId;
use crate::volume::locks::ReadsVolume;
use crate::volume::node::NodeOps;
use crate::volume::params::{CapacityRange, Provisioning, VolumeKind};
use crate::volume::pool::VolumeMeta;
use crate::volume::volumes::Skipper;

/// Why a volume is not healthy, if it is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl NodeOps {
    /// Makes a volume's image stable for copying: the caller holds its guard, a reader's or a
    /// writer's (no stage, unstage, expand or delete meanwhile); when its file system is
    /// mounted, says how to freeze it (see `content::SourceCopy::copy_to`).
    pub(crate) fn stable_volume(
        &self,
        held: &impl ReadsVolume,
    ) -> Result<(Arc<VolumeMeta>, Option<FreezeTarget>)> {
        let id = held.id();
        let v = self.view(id, Near::Staged)?;
        let meta = Arc::clone(v.meta()?);
        let mut freeze = None;
        if let VolumeKind::Filesystem(fs) = meta.kind {
            // A device that holds a file no longer at the image's path is not what is copied.
            let observed = &v.observed;
            let staged = (v.record.staged.clone())
                .filter(|s| observed.image_present && observed.fs_mounted_at(&s.path));
            // The file system is on the top of the stack: its numbers are the ones mounted.
            if let (Some(staged), Some(top)) = (staged, observed.top()) {
                let (layout, numbers) = (self.pool.layout().clone(), top.numbers);
                let target = FreezeTarget::new(layout, *id, staged.path, numbers, fs);
                freeze = Some(target.with_limit(self.freeze_limit));
            }
        }
        Ok((meta, freeze))
    }

    /// Grows the volume's backing file to what `range` asks (a thick one stays fully
    /// allocated), records the new size, and tells every loop device attached to it.
    /// Shrinking is OUT_OF_RANGE; a volume already as large as asked is left alone. Returns
    /// the volume's size.
    fn grow_volume(&self, v: &mut OpenVolume<'_>, range: CapacityRange) -> Result<u64> {
        let meta = Arc::clone(v.meta()?);
        range.validate()?;
        if range.admits(meta.capacity_bytes) {
            return Ok(meta.capacity_bytes);
        }
        let size = range.resolve(meta.kind.minimum_size())?;
        if size < meta.capacity_bytes {
            return Err(Error::Shrink {
                volume: meta.id,
                size: meta.capacity_bytes,
                requested: size,
            });
        }
        let available = self.pool.usage()?.available_bytes;
        let growth = size - meta.capacity_bytes;
        if growth > available {
            return Err(Error::NoSpace {
                requested: growth,
                available,
            });
        }
        let image = v.image.clone();
        let allocation = match meta.params.provisioning {
            Provisioning::Thin => Allocation::Sparse,
            Provisioning::Thick => Allocation::Full,
        };
        // File first, metadata second: a crash in between leaves a file larger than recorded,
        // which a retry makes consistent.
        self.host().grow_image(&image, size, allocation)?;
        crate::faults::crash_point("expand.file_grown");
        let mut updated = (*meta).clone();
        updated.capacity_bytes = size;
        // Until it is grown, the file system is smaller than the volume; should the online grow
        // be impossible, the next stage grows it (ext4 offline).
        updated.pending_fs_grow = matches!(meta.kind, VolumeKind::Filesystem(_)) && meta.formatted;
        v.update_meta(updated)?;
        for dev in self.host().devices_of(&image)? {
            self.host().refresh_capacity(dev)?;
        }
        // Then the layers over the read-only devices (the writable stack grows in the caller).
        for read_only in &v.observed.read_only_devices {
            read_only.grow(self.host())?;
        }
        Ok(size)
    }

    /// NodeExpandVolume, all of the expansion, online: grows the backing file to `range` (when
    /// given), the loop device, each layer of its stack bottom up, and the file system mounted
    /// at `path` (staging or target).
    /// Expansion happens on the node because the volume lives there: in a node-local
    /// deployment the cluster's one resizer cannot reach other nodes' pools.
    pub(crate) fn node_expand(
        &self,
        mut v: OpenVolume<'_>,
        path: &Path,
        range: Option<CapacityRange>,
    ) -> Result<u64> {
        let id = v.id;
        let not_here = || Error::NotFound {
            what: "volume at path",
            id: format!("{id} at {}", crate::error::shown(&path.to_string_lossy())),
        };
        let kind = v.meta()?.kind;
        // A device still holding a file that is no longer the image is not this volume's to grow.
        let dev = (v.observed.device)
            .filter(|_| v.observed.image_present)
            .ok_or_else(not_here)?;
        if !path.is_absolute() || !v.observed.live_at(kind, path) {
            return Err(not_here());
        }
        if let Some(range) = range {
            self.grow_volume(&mut v, range)?;
        }
        let meta = Arc::clone(v.meta()?);
        self.host().refresh_capacity(dev)?;
        let stack = v.observed.stack.as_ref().ok_or_else(not_here)?;
        stack.grow(self.host())?;
        let top = stack.top().ok_or_else(not_here)?.path.clone();
        if let VolumeKind::Filesystem(fs_type) = meta.kind {
            let fs = fs_type.get();
            let at = match fs.grows_at() {
                GrowsAt::Device => top,
                // The mount point of the file system itself, not a bind of it.
                GrowsAt::MountPoint => (v.record.staged.as_ref())
                    .map(|s| s.path.clone())
                    .filter(|p| v.observed.fs_mounted_at(p))
                    .unwrap_or_else(|| path.to_path_buf()),
            };
            self.host().grow_online(fs_type, &at)?;
        }
        if meta.pending_fs_grow {
            let mut updated = (*meta).clone();
            updated.pending_fs_grow = false;
            v.update_meta(updated)?;
        }
        Ok(meta.capacity_bytes)
    }

    /// Grows the file system of a restored or cloned volume that is larger than its source, at
    /// stage: offline before the mount (`staging` None) or online after it, as the file system
    /// needs (ext4 offline, xfs online; see `Filesystem::pending_grow`).
    pub(crate) fn grow_pending(
        &self,
        v: &mut OpenVolume<'_>,
        dev: &Path,
        staging: Option<&Path>,
    ) -> Result<()> {
        let current = Arc::clone(v.meta()?);
        if !current.pending_fs_grow {
            return Ok(());
        }
        let VolumeKind::Filesystem(fs_type) = current.kind else {
            return Ok(());
        };
        let fs = fs_type.get();
        match (fs.pending_grow(), staging) {
            (PendingGrow::Offline, None) => self.host().grow_offline(fs_type, dev)?,
            (PendingGrow::Online, Some(mounted)) => {
                let at = match fs.grows_at() {
                    GrowsAt::Device => dev,
                    GrowsAt::MountPoint => mounted,
                };
                self.host().grow_online(fs_type, at)?
            }
            _ => return Ok(()),
        }
        let mut updated = (*current).clone();
        updated.pending_fs_grow = false;
        v.update_meta(updated).map(drop)
    }

    /// The health of a volume as the kernel and the pool show it (ControllerGetVolume and
    /// NodeGetVolumeStats): the backing file missing or truncated, the loop device gone while
    /// staged, the file system read-only after errors.
    pub fn condition(&self, id: &VolumeId, skipper: &Skipper<'_>) -> Result<Condition> {
        self.condition_of(&self.view(id, Near::Staged)?, skipper)
    }

    /// The health of the volume `v` shows (see `condition`).
    pub(crate) fn condition_of(
        &self,
        v: &VolumeView<'_>,
        skipper: &Skipper<'_>,
    ) -> Result<Condition> {
        let (id, meta, image) = (&v.id, v.meta()?, &v.image);
        let mut problems = Vec::new();
        match self.host().node_followed(image) {
            Err(_) | Ok(None) => {
                problems.push(format!("the backing file {} is missing", image.display()))
            }
            Ok(Some(n)) if n.len < meta.capacity_bytes => problems.push(format!(
                "the backing file is truncated: {} bytes of {}",
                n.len, meta.capacity_bytes
            )),
            Ok(Some(_)) => {}
        }
        if let Some(frozen) = self.abandoned_freeze(id, skipper) {
            problems.push(frozen);
        }
        if let Some(staged) = &v.record.staged {
            let observed = &v.observed;
            match (observed.device, meta.kind) {
                (None, _) => problems.push(format!(
                    "the volume is staged at {} but its loop device is gone",
                    staged.path.display()
                )),
                (Some(_), _) if observed.top().is_none() => {
                    let stack = observed.stack.as_ref();
                    let layer = stack.and_then(|s| s.missing()).map_or("?", |l| l.name());
                    problems.push(format!(
                        "the volume is staged at {} but its {layer} device layer is gone",
                        staged.path.display()
                    ))
                }
                (Some(_), VolumeKind::Filesystem(_)) => {
                    match mount::mounted_at(&observed.table, &staged.path) {
                        Some(m) if observed.fs_mounted_at(&staged.path) => {
                            let wanted_ro = staged.capability.access.read_only()
                                || meta.access_modes.iter().all(|a| a.read_only())
                                || staged.capability.mount_flags().iter().any(|f| f == "ro");
                            if (m.read_only() || m.fs_read_only()) && !wanted_ro {
                                problems.push(
                                    "the file system went read-only (I/O or file-system errors; check the kernel log)"
                                        .to_string(),
                                );
                            }
                            if let (Some(dev), VolumeKind::Filesystem(fs)) =
                                (observed.top(), meta.kind)
                            {
                                problems.extend(
                                    fs.get().recorded_errors(self.host().fs_error_count(dev)),
                                );
                            }
                        }
                        _ => problems.push(format!(
                            "the volume is staged at {} but its file system is not mounted there",
                            staged.path.display()
                        )),
                    }
                }
                (Some(_), VolumeKind::Block) => {}
            }
        }
        Ok(Condition {
            abnormal: !problems.is_empty(),
            message: if problems.is_empty() {
                "healthy".to_string()
            } else {
                problems.join("; ")
            },
        })
    }
}
