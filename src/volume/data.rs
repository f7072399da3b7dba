//! Data services: snapshots, restores and clones (point-in-time copies of backing files),
//! online expansion, and volume health.
//!
//! A copy source is made stable before it is read: a snapshot is immutable; a volume's guard is
//! held (no stage, unstage or delete meanwhile) and, when its file system is mounted, the file
//! system is frozen (flushed, new writes blocked) for the last pass of the copy only, and always
//! thawed (`SourceCopy::copy_to`; the freeze is recorded so that a driver killed meanwhile is
//! undone, see `freeze.rs`). The copy itself shares extents (reflink) where the pool file system
//! can, and copies only data extents elsewhere (see `host::files::copy_sparse`).

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host::files::{Allocation, CopyStats};
use crate::host::fs::{GrowsAt, PendingGrow};
use crate::host::mount;
use crate::host::os::Host;
use crate::volume::freeze::FreezeTarget;
use crate::volume::handle::{Near, OpenVolume, VolumeView};
use crate::volume::id::VolumeId;
use crate::volume::locks::VolumeGuard;
use crate::volume::node::NodeOps;
use crate::volume::params::{CapacityRange, Provisioning, VolumeKind};
use crate::volume::pool::{SourceCopy, VolumeMeta};
use crate::volume::volumes::Skipper;

impl SourceCopy {
    /// Copies the source into `dst` (new), sized `size`. A source that is not live (a snapshot,
    /// an unstaged volume) is copied as it is: its guard keeps it unchanged. A mounted file
    /// system keeps taking writes until it is frozen, and a frozen one blocks its application,
    /// so the freeze is kept short:
    /// - on a pool that shares extents (reflink: btrfs, xfs), it is frozen and copied, which
    ///   takes milliseconds whatever the size;
    /// - elsewhere the data is copied while the application writes on; a second pass, still
    ///   unfrozen, rewrites what the application changed meanwhile (and leaves both files in
    ///   the page cache); then the file system is frozen (everything it wrote is then in the
    ///   image, and nothing more is written) and a last pass rewrites the blocks of the copy
    ///   that still differ from the image (`files::patch_to_match`): afterwards the copy reads
    ///   back exactly as the frozen image, which is the point-in-time copy. Only that last
    ///   comparison runs frozen, and **never longer than the freeze limit**
    ///   (`--max-freeze-ms`): should it not finish by then, the file system is thawed, the
    ///   copy discarded and the call fails naming the remedies (`Error::FreezeLimit`). The
    ///   flush of the copy runs after the thaw.
    pub fn copy_to(&self, host: &dyn Host, dst: &Path, size: u64) -> Result<CopyStats> {
        let len = self.size_bytes;
        let Some(freeze) = &self.freeze else {
            return host.copy_image(&self.image, dst, len, size);
        };
        if host.reflinks(dst.parent().unwrap_or(Path::new("/"))) {
            let _frozen = freeze.freeze()?;
            return host.copy_image(&self.image, dst, len, size);
        }
        let stats = host.copy_image(&self.image, dst, len, size)?;
        crate::faults::crash_point("copy.precopied");
        let patched = (|| {
            let caught_up = host.patch_image(&self.image, dst, len, None)?;
            let frozen = freeze.freeze()?;
            let started = std::time::Instant::now();
            let last = host.patch_image(&self.image, dst, len, Some(started + freeze.limit()));
            drop(frozen); // thaw before the flush
            let frozen_ms = started.elapsed().as_millis() as u64;
            let last = last?;
            if !last.finished {
                return Err(Error::FreezeLimit {
                    volume: freeze.volume(),
                    limit: freeze.limit(),
                    compared: last.compared,
                    data: caught_up.compared,
                });
            }
            host.sync_file(dst)?;
            Ok((caught_up.rewritten, last.rewritten, frozen_ms))
        })();
        match patched {
            Ok((caught_up, rewritten, frozen_ms)) => {
                tracing::info!(
                    caught_up_bytes = caught_up,
                    rewritten_bytes = rewritten,
                    frozen_ms,
                    "copied a live file system: the blocks written during the copy were \
                     copied again while it was frozen"
                );
                Ok(stats)
            }
            Err(err) => {
                let _ = host.remove_durably(dst);
                Err(err)
            }
        }
    }
}

/// Why a volume is not healthy, if it is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl NodeOps {
    /// Makes a volume's image stable for copying: the caller holds its guard (no stage,
    /// unstage, expand or delete meanwhile); when its file system is mounted, says how to
    /// freeze it (see `SourceCopy::copy_to`).
    pub(crate) fn stable_volume(
        &self,
        held: &VolumeGuard,
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
            if let (Some(staged), Some(numbers)) = (staged, observed.dev_numbers) {
                let target =
                    FreezeTarget::new(self.pool.layout().clone(), *id, staged.path, numbers, fs);
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
        Ok(size)
    }

    /// NodeExpandVolume, all of the expansion, online: grows the backing file to `range` (when
    /// given), the loop device, and the file system mounted at `path` (staging or target).
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
        if let VolumeKind::Filesystem(fs_type) = meta.kind {
            let fs = fs_type.get();
            let at = match fs.grows_at() {
                GrowsAt::Device => dev.path(),
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
                                (observed.device, meta.kind)
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
