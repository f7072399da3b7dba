//! The pool: one sparse (or fully allocated) backing file per volume plus its metadata, in the
//! state dir.
//!
//! On-disk contract (`<state-dir>` is canonicalised at start):
//! - `volumes/<id>.img`  the backing file the loop device is attached to;
//! - `volumes/<id>.json` the volume's metadata (name, size, kind, provisioning), written
//!   crash-safely. **The metadata file is the commit point**: CreateVolume makes the image
//!   durable first and then the metadata; DeleteVolume removes the metadata first and then the
//!   image. So after a crash at any instant, an image without metadata is a half-made or
//!   half-deleted volume and startup recovery removes it; a volume with metadata is complete.
//! - `node/<id>.json`    what the CO asked this node to stage and publish (see `node.rs`).
//! - `*.tmp`             a crash-safe write that did not finish; removed at start.
//!
//! Nothing the kernel knows (which loop device backs which image, what is mounted where) is
//! stored here: it is read from sysfs and mountinfo when needed.

pub use crate::volume::layout::Layout;
pub use crate::volume::meta::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::host::files::{Allocation, Usage};
use crate::host::os::{Host, NewImage};
use crate::volume::id::VolumeId;
use crate::volume::locks::{SnapshotGuard, VolumeGuard};
use crate::volume::params::{Provisioning, VolumeKind};

#[derive(Default)]
pub(crate) struct Index {
    pub(crate) by_id: BTreeMap<VolumeId, Arc<VolumeMeta>>,
    pub(crate) by_name: HashMap<String, VolumeId>,
    pub(crate) snapshots: BTreeMap<VolumeId, Arc<SnapshotMeta>>,
    pub(crate) snapshots_by_name: HashMap<String, VolumeId>,
    /// Volumes and snapshots whose metadata exists but cannot be read, by id.
    pub(crate) unreadable: BTreeMap<VolumeId, Unreadable>,
}

/// The metadata store: the index of volumes and snapshots and their crash-safe files. It takes
/// no operation guard: the door (`volume::volumes`) holds it, and the functions that change an
/// object take its guard as proof.
pub struct Pool {
    pub(crate) layout: Layout,
    pub(crate) index: RwLock<Index>,
}

impl Pool {
    /// Opens the pool and recovers from any crash: loads every volume's and snapshot's
    /// metadata, removes half-made images (no metadata), stale temp files and node records of
    /// deleted volumes.
    pub fn open(layout: Layout) -> Result<(Self, Recovery)> {
        Self::open_with(layout, true)
    }

    /// Opens the pool without changing anything on disk (for the operator CLI, beside a live
    /// driver): what recovery would remove is reported in `Recovery` but left in place.
    pub fn open_read_only(layout: Layout) -> Result<(Self, Recovery)> {
        Self::open_with(layout, false)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn get(&self, id: &VolumeId) -> Option<Arc<VolumeMeta>> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(id)
            .cloned()
    }

    /// The volume, or NOT_FOUND naming the id.
    pub fn require(&self, id: &VolumeId) -> Result<Arc<VolumeMeta>> {
        self.get(id).ok_or_else(|| Error::NotFound {
            what: "volume",
            id: id.to_string(),
        })
    }

    pub fn find_by_name(&self, name: &str) -> Option<Arc<VolumeMeta>> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index
            .by_name
            .get(name)
            .and_then(|id| index.by_id.get(id))
            .cloned()
    }

    /// Up to `max` volumes in id order, starting after `after`; the flag tells whether more follow.
    pub fn list(&self, after: Option<VolumeId>, max: usize) -> (Vec<Arc<VolumeMeta>>, bool) {
        use std::ops::Bound;
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut iter = index
            .by_id
            .range((start, Bound::Unbounded))
            .map(|(_, m)| Arc::clone(m));
        let page: Vec<_> = iter.by_ref().take(max).collect();
        let more = iter.next().is_some();
        (page, more)
    }

    pub fn snapshot_count(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshots
            .len()
    }

    /// Every volume, in id order.
    pub fn volumes(&self) -> Vec<Arc<VolumeMeta>> {
        self.list(None, usize::MAX).0
    }

    pub fn len(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Space of the pool's file system.
    pub fn usage(&self) -> Result<Usage> {
        self.host().usage(&self.layout.volumes_dir())
    }

    /// The volume CreateVolume names, when it exists with compatible arguments; with
    /// incompatible ones, ALREADY_EXISTS. `None` when the name is free. The caller holds the
    /// name's guard. The name is looked up before any size or space check, so a retry is
    /// answered the same way even when the pool has filled up since.
    pub fn existing(&self, req: &NewVolume) -> Result<Option<Arc<VolumeMeta>>> {
        if let Some(existing) = self.find_by_name(&req.name) {
            check_compatible(&existing, req)?;
            return Ok(Some(existing));
        }
        self.refuse_unknown_names(VolumeMeta::WHAT, &req.name)?;
        Ok(None)
    }

    /// Makes volume `new` (a fresh id whose guard the caller holds) as `req` asks, filled from
    /// `source` when given: the image first, then the metadata, the commit point.
    pub fn create(
        &self,
        new: &VolumeGuard,
        req: NewVolume,
        source: Option<SourceCopy>,
    ) -> Result<Arc<VolumeMeta>> {
        let minimum = minimum_size(&req, source.as_ref())?;
        let size = req.capacity.resolve(minimum)?;
        let available = self.usage()?.available_bytes;
        if size > available {
            return Err(Error::NoSpace {
                requested: size,
                available,
            });
        }
        // The caller holds the new id's guard until the volume is committed, so the reconciler
        // never takes the image of a create in flight for an orphan.
        let id = *new.id();
        let meta = VolumeMeta {
            version: META_VERSION,
            id,
            name: req.name,
            capacity_bytes: size,
            kind: req.kind,
            params: req.params,
            access_modes: req.access_modes,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            formatted: source.as_ref().is_some_and(|s| s.formatted),
            content_source: source.as_ref().map(|s| s.content),
            pending_fs_grow: source.as_ref().is_some_and(|s| {
                s.formatted
                    && (size > s.size_bytes || s.pending_fs_grow)
                    && matches!(req.kind, VolumeKind::Filesystem(_))
            }),
        };
        let image = self.layout.image(&id);
        let allocation = match meta.params.provisioning {
            Provisioning::Thin => Allocation::Sparse,
            Provisioning::Thick => Allocation::Full,
        };
        let filled = self.fill_image(&image, size, allocation, source.as_ref());
        // The copy is durable: release the source before the metadata commit.
        if let (Some(source), Ok(_)) = (source, &filled) {
            crate::faults::crash_point(match source.content {
                ContentSource::Snapshot(_) => "restore.copied",
                ContentSource::Volume(_) => "clone.copied",
            });
        }
        let fresh_image = filled.map_err(|err| match err {
            Error::Io { ref source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) => {
                Error::NoSpace {
                    requested: size,
                    available,
                }
            }
            other => other,
        })?;
        crate::faults::crash_point("create.image_written");
        let committed = self.write_meta_with(&meta, fresh_image.as_ref());
        if let Err(err) = committed {
            // Not committed: take the image back so nothing half-made stays.
            let _ = self.host().remove_durably(&image);
            return Err(err);
        }
        crate::faults::crash_point("create.meta_committed");
        let meta = Arc::new(meta);
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        index.by_name.insert(meta.name.clone(), id);
        index.by_id.insert(id, Arc::clone(&meta));
        Ok(meta)
    }

    /// Makes the new volume's image: a fresh file (made durable with the metadata, so its
    /// handle is returned), or a copy of the source, durable already and grown to `size`.
    fn fill_image(
        &self,
        image: &std::path::Path,
        size: u64,
        allocation: Allocation,
        source: Option<&SourceCopy>,
    ) -> Result<Option<NewImage>> {
        // A fresh image is made durable with the metadata below; a copy is durable already.
        match source {
            None => self.host().create_image(image, size, allocation).map(Some),
            Some(source) => source
                .copy_to(self.host(), image, size)
                .and_then(|stats| {
                    tracing::info!(
                        data_bytes = stats.data_bytes,
                        extents = stats.extents,
                        "copied the source"
                    );
                    let host = self.host();
                    host.grow_image(image, size, allocation).inspect_err(|_| {
                        let _ = host.remove_durably(image);
                    })
                })
                .map(|()| None),
        }
    }

    fn write_meta(&self, meta: &VolumeMeta) -> Result<()> {
        self.write_meta_with(meta, None)
    }

    /// Writes the metadata (the commit point), making `image` (just created beside it) durable
    /// in the same step.
    fn write_meta_with(&self, meta: &VolumeMeta, image: Option<&NewImage>) -> Result<()> {
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| Error::Internal(format!("serialising metadata of {}: {e}", meta.id)))?;
        let path = self.layout.meta(&meta.id);
        match image {
            Some(image) => self.host().commit_with(&path, &json, image),
            None => self.host().write_record(&path, &json),
        }
    }

    /// The operating system the pool is on.
    pub(crate) fn host(&self) -> &dyn Host {
        self.layout.host()
    }

    /// Records that the driver formatted the volume (crash-safe metadata update).
    pub fn mark_formatted(&self, held: &VolumeGuard) -> Result<()> {
        let current = self.require(held.id())?;
        if current.formatted {
            return Ok(());
        }
        let mut updated = (*current).clone();
        updated.formatted = true;
        self.update(held, updated).map(drop)
    }

    pub fn snapshot(&self, id: &VolumeId) -> Option<Arc<SnapshotMeta>> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshots
            .get(id)
            .cloned()
    }

    /// The snapshot, or NOT_FOUND naming the id.
    pub fn require_snapshot(&self, id: &VolumeId) -> Result<Arc<SnapshotMeta>> {
        self.snapshot(id).ok_or_else(|| Error::NotFound {
            what: "snapshot",
            id: id.to_string(),
        })
    }

    /// Snapshots in id order after `after` matching `filter`, at most `max`; the flag tells
    /// whether more follow.
    pub fn list_snapshots(
        &self,
        after: Option<VolumeId>,
        max: usize,
        filter: impl Fn(&SnapshotMeta) -> bool,
    ) -> (Vec<Arc<SnapshotMeta>>, bool) {
        use std::ops::Bound;
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut iter = index
            .snapshots
            .range((start, Bound::Unbounded))
            .map(|(_, m)| m)
            .filter(|m| filter(m))
            .map(Arc::clone);
        let page: Vec<_> = iter.by_ref().take(max).collect();
        let more = iter.next().is_some();
        (page, more)
    }

    /// The snapshot named `name`, when it exists for `source_id`; for another source,
    /// ALREADY_EXISTS. `None` when the name is free. The caller holds the name's guard.
    pub fn existing_snapshot(
        &self,
        name: &str,
        source_id: &VolumeId,
    ) -> Result<Option<Arc<SnapshotMeta>>> {
        let existing = {
            let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
            index
                .snapshots_by_name
                .get(name)
                .and_then(|id| index.snapshots.get(id))
                .cloned()
        };
        if let Some(existing) = existing {
            if existing.source_volume_id != *source_id {
                return Err(Error::SnapshotNameTaken {
                    name: name.to_string(),
                    snapshot: existing.id,
                    of: existing.source_volume_id,
                    requested: *source_id,
                });
            }
            return Ok(Some(existing));
        }
        self.refuse_unknown_names(SnapshotMeta::WHAT, name)?;
        Ok(None)
    }

    /// Makes snapshot `new` (a fresh id whose guard the caller holds) named `name`, a copy of
    /// the prepared (stable) `source`. Like volumes, the metadata file is the commit point.
    pub fn create_snapshot(
        &self,
        new: &SnapshotGuard,
        name: &str,
        source: SourceCopy,
    ) -> Result<Arc<SnapshotMeta>> {
        let id = *new.id();
        let source_id = match source.content {
            ContentSource::Volume(id) => id,
            ContentSource::Snapshot(id) => id,
        };
        let image = self.layout.snapshot_image(&id);
        let stats = source.copy_to(self.host(), &image, source.size_bytes)?;
        let meta = SnapshotMeta {
            version: META_VERSION,
            id,
            name: name.to_string(),
            source_volume_id: source_id,
            size_bytes: source.size_bytes,
            kind: source.kind,
            formatted: source.formatted,
            pending_fs_grow: source.pending_fs_grow,
            created_unix_nanos: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        };
        drop(source); // release the source's guard as soon as its content is copied
        crate::faults::crash_point("snapshot.copied");
        tracing::info!(snapshot.id = %id, data_bytes = stats.data_bytes, extents = stats.extents, "snapshot copied");
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| Error::Internal(format!("serialising snapshot {id}: {e}")))?;
        if let Err(err) = self
            .host()
            .write_record(&self.layout.snapshot_meta(&id), &json)
        {
            let _ = self.host().remove_durably(&image);
            return Err(err);
        }
        crate::faults::crash_point("snapshot.committed");
        let meta = Arc::new(meta);
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        index.snapshots_by_name.insert(meta.name.clone(), id);
        index.snapshots.insert(id, Arc::clone(&meta));
        Ok(meta)
    }

    /// DeleteSnapshot. A snapshot that does not exist is success. Volumes restored from it are
    /// independent files and are not affected.
    pub fn delete_snapshot(&self, held: &SnapshotGuard) -> Result<()> {
        let id = held.id();
        let Some(meta) = self.snapshot(id) else {
            // Unreadable metadata: the CO names the id, so these files are what it deletes.
            if let Some(unreadable) = self.unreadable(id).filter(|u| u.what == SnapshotMeta::WHAT) {
                self.forget_unreadable(id, &unreadable)?;
                return self
                    .host()
                    .remove_uncommitted(&self.layout.snapshot_image(id));
            }
            return Ok(());
        };
        self.host().remove_durably(&self.layout.snapshot_meta(id))?;
        crate::faults::crash_point("delete_snapshot.meta_removed");
        {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            index.snapshots.remove(id);
            if index.snapshots_by_name.get(&meta.name) == Some(id) {
                index.snapshots_by_name.remove(&meta.name);
            }
        }
        self.host()
            .remove_uncommitted(&self.layout.snapshot_image(id))
    }

    /// Replaces a volume's metadata (crash-safe) and its index entry.
    pub fn update(&self, held: &VolumeGuard, meta: VolumeMeta) -> Result<Arc<VolumeMeta>> {
        debug_assert_eq!(held.id(), &meta.id);
        self.write_meta(&meta)?;
        let meta = Arc::new(meta);
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .insert(meta.id, Arc::clone(&meta));
        Ok(meta)
    }

    /// DeleteVolume. A volume that does not exist is success. The caller (the door) has made
    /// sure nothing on this node uses it.
    pub fn delete(&self, held: &VolumeGuard) -> Result<()> {
        let id = held.id();
        let image = self.layout.image(id);
        let meta = match (self.get(id), self.unreadable(id)) {
            (Some(meta), _) => meta,
            (None, Some(unreadable)) => return self.delete_unreadable(id, &unreadable),
            (None, None) => return Ok(()),
        };
        // Commit point: once the metadata is gone the volume is gone.
        self.host().remove_durably(&self.layout.meta(id))?;
        crate::faults::crash_point("delete.meta_removed");
        {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            index.by_id.remove(id);
            if index.by_name.get(&meta.name) == Some(id) {
                index.by_name.remove(&meta.name);
            }
        }
        // Leftovers from here on are cleaned by startup recovery if this fails part-way.
        crate::volume::records::clear(self.host(), &self.layout.node_record(id))?;
        self.host().remove_uncommitted(&image)
    }
}

impl Pool {}

/// The smallest size a new volume may have: its kind's minimum, and no less than its source.
/// A source of another kind is INVALID_ARGUMENT; a limit below the source, OUT_OF_RANGE.
fn minimum_size(req: &NewVolume, source: Option<&SourceCopy>) -> Result<u64> {
    let mut minimum = req.kind.minimum_size();
    if let Some(source) = source {
        if source.kind != req.kind {
            return Err(Error::invalid(
                "volume_content_source",
                format!(
                    "the source holds {}, but {} was requested",
                    source.kind, req.kind
                ),
            ));
        }
        minimum = minimum.max(source.size_bytes);
        if req.capacity.limit_bytes > 0
            && u64::try_from(req.capacity.limit_bytes).is_ok_and(|l| l < source.size_bytes)
        {
            return Err(Error::LimitBelowSource {
                limit: req.capacity.limit_bytes,
                source_bytes: source.size_bytes,
            });
        }
    }
    Ok(minimum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_metadata_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(
            dir.path(),
            std::sync::Arc::new(crate::host::linux::Linux::new(
                crate::host::tools::Tools::discover().unwrap(),
            )),
        )
        .unwrap();
        let id = VolumeId::new_random();
        std::fs::write(layout.meta(&id), b"not json").unwrap();
        std::fs::write(layout.image(&id), b"precious").unwrap();
        let (pool, recovery) = Pool::open(layout.clone()).unwrap();
        assert_eq!(recovery.unreadable, vec![layout.meta(&id)]);
        assert!(pool.is_empty());
        assert_eq!(std::fs::read(layout.image(&id)).unwrap(), b"precious");
    }
}
