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
//! - `snapshots/<id>.img`, `snapshots/<id>.json` a snapshot's copy and its metadata, the
//!   metadata file its commit point likewise (ids are `SnapshotId`s: same text, their own type).
//! - `node/<id>.json`    what the CO asked this node to stage and publish (see `node.rs`).
//! - `*.tmp`             a crash-safe write that did not finish; removed at start.
//!
//! The store persists and does nothing else: it decides a new object (`reserve`,
//! `reserve_snapshot`) and commits it (`commit`, `commit_snapshot`); the image in between is a
//! blank one (`blank_image`) or a copy the domain makes (`content.rs`).
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
use crate::volume::id::{SnapshotId, VolumeId};
use crate::volume::locks::{SnapshotGuard, VolumeGuard};
use crate::volume::params::{Provisioning, VolumeKind};
use std::path::PathBuf;

#[derive(Default)]
pub(crate) struct Index {
    pub(crate) by_id: BTreeMap<VolumeId, Arc<VolumeMeta>>,
    pub(crate) by_name: HashMap<String, VolumeId>,
    pub(crate) snapshots: BTreeMap<SnapshotId, Arc<SnapshotMeta>>,
    pub(crate) snapshots_by_name: HashMap<String, SnapshotId>,
    /// Volumes whose metadata exists but cannot be read, by id.
    pub(crate) unreadable: BTreeMap<VolumeId, Unreadable>,
    /// Snapshots whose metadata exists but cannot be read, by id.
    pub(crate) unreadable_snapshots: BTreeMap<SnapshotId, Unreadable>,
}

/// The metadata store: the index of volumes and snapshots and their crash-safe files. It takes
/// no operation guard: the door (`volume::volumes`) holds it, and the functions that change an
/// object take its guard as proof.
pub struct Pool {
    pub(crate) layout: Layout,
    pub(crate) index: RwLock<Index>,
}

/// A volume the store has decided but not committed (`Pool::reserve`): its metadata, and the
/// guard of its new id, held until the commit so the reconciler never takes the image of a
/// create in flight for an orphan.
pub struct PendingVolume<'g> {
    held: &'g VolumeGuard,
    image: PathBuf,
    meta: VolumeMeta,
    /// The pool's free space when it was reserved, for the NoSpace of a full pool.
    available: u64,
}

impl PendingVolume<'_> {
    /// Where the image goes: the domain fills it, `Pool::commit` makes it a volume.
    pub fn image(&self) -> &std::path::Path {
        &self.image
    }

    pub fn size(&self) -> u64 {
        self.meta.capacity_bytes
    }

    pub fn allocation(&self) -> Allocation {
        match self.meta.params.provisioning {
            Provisioning::Thin => Allocation::Sparse,
            Provisioning::Thick => Allocation::Full,
        }
    }

    /// `err` as the CO should see it: the pool ran out of space while the image was made
    /// (ENOSPC) is RESOURCE_EXHAUSTED, saying how much was asked and free.
    pub fn no_space(&self, err: Error) -> Error {
        match err {
            Error::Io { ref source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) => {
                Error::NoSpace {
                    requested: self.size(),
                    available: self.available,
                }
            }
            other => other,
        }
    }
}

/// A snapshot the store has decided but not committed (`Pool::reserve_snapshot`).
pub struct PendingSnapshot<'g> {
    held: &'g SnapshotGuard,
    image: PathBuf,
    meta: SnapshotMeta,
}

impl PendingSnapshot<'_> {
    /// Where the copy goes: the domain makes it, `Pool::commit_snapshot` makes it a snapshot.
    pub fn image(&self) -> &std::path::Path {
        &self.image
    }

    pub fn id(&self) -> &SnapshotId {
        self.held.id()
    }
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

    /// Decides volume `new` (a fresh id whose guard the caller holds) as `req` asks, sized for
    /// `source` when given: its size, checked against the pool's free space, and its metadata.
    /// Nothing is written yet: the domain puts the image in place (`content.rs`), then `commit`.
    pub fn reserve<'g>(
        &self,
        new: &'g VolumeGuard,
        req: NewVolume,
        source: Option<&SourceFacts>,
    ) -> Result<PendingVolume<'g>> {
        let minimum = minimum_size(&req, source)?;
        let size = req.capacity.resolve(minimum)?;
        let available = self.usage()?.available_bytes;
        if size > available {
            return Err(Error::NoSpace {
                requested: size,
                available,
            });
        }
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
            formatted: source.is_some_and(|s| s.formatted),
            content_source: source.map(|s| s.content),
            pending_fs_grow: source.is_some_and(|s| {
                s.formatted
                    && (size > s.size_bytes || s.pending_fs_grow)
                    && matches!(req.kind, VolumeKind::Filesystem(_))
            }),
        };
        Ok(PendingVolume {
            held: new,
            image: self.layout.image(&id),
            meta,
            available,
        })
    }

    /// The image of a volume without a content source: a fresh file, made durable with the
    /// metadata by `commit` (so its handle is returned).
    pub fn blank_image(&self, pending: &PendingVolume<'_>) -> Result<NewImage> {
        self.host()
            .create_image(&pending.image, pending.size(), pending.allocation())
            .map_err(|err| pending.no_space(err))
    }

    /// Commits a reserved volume whose image is in place: `fresh` is a blank image to make
    /// durable with the metadata (a copy is durable already). The metadata file is the commit
    /// point; should it fail, the image is taken back, so nothing half-made stays.
    pub fn commit(
        &self,
        pending: PendingVolume<'_>,
        fresh: Option<NewImage>,
    ) -> Result<Arc<VolumeMeta>> {
        let PendingVolume {
            held, image, meta, ..
        } = pending;
        crate::faults::crash_point("create.image_written");
        if let Err(err) = self.write_meta_with(&meta, fresh.as_ref()) {
            let _ = self.host().remove_durably(&image);
            return Err(err);
        }
        crate::faults::crash_point("create.meta_committed");
        let meta = Arc::new(meta);
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        index.by_name.insert(meta.name.clone(), *held.id());
        index.by_id.insert(*held.id(), Arc::clone(&meta));
        Ok(meta)
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

    pub fn snapshot(&self, id: &SnapshotId) -> Option<Arc<SnapshotMeta>> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshots
            .get(id)
            .cloned()
    }

    /// The snapshot, or NOT_FOUND naming the id.
    pub fn require_snapshot(&self, id: &SnapshotId) -> Result<Arc<SnapshotMeta>> {
        self.snapshot(id).ok_or_else(|| Error::NotFound {
            what: "snapshot",
            id: id.to_string(),
        })
    }

    /// Snapshots in id order after `after` matching `filter`, at most `max`; the flag tells
    /// whether more follow.
    pub fn list_snapshots(
        &self,
        after: Option<SnapshotId>,
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

    /// Decides snapshot `new` (a fresh id whose guard the caller holds) named `name`, of volume
    /// `of`, which `source` describes. Nothing is written yet: the domain copies the source to
    /// `PendingSnapshot::image` (`content.rs`), then `commit_snapshot`.
    pub fn reserve_snapshot<'g>(
        &self,
        new: &'g SnapshotGuard,
        name: &str,
        of: &VolumeId,
        source: &SourceFacts,
    ) -> PendingSnapshot<'g> {
        let id = *new.id();
        PendingSnapshot {
            held: new,
            image: self.layout.snapshot_image(&id),
            meta: SnapshotMeta {
                version: META_VERSION,
                id,
                name: name.to_string(),
                source_volume_id: *of,
                size_bytes: source.size_bytes,
                kind: source.kind,
                formatted: source.formatted,
                pending_fs_grow: source.pending_fs_grow,
                created_unix_nanos: 0,
            },
        }
    }

    /// Commits a snapshot whose image is copied (and durable). Like volumes, the metadata file
    /// is the commit point; should it fail, the copy is taken back.
    pub fn commit_snapshot(&self, pending: PendingSnapshot<'_>) -> Result<Arc<SnapshotMeta>> {
        let PendingSnapshot {
            held,
            image,
            mut meta,
        } = pending;
        let id = *held.id();
        // The snapshot's time is the end of its copy, which has just finished.
        meta.created_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
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
            if let Some(unreadable) = self.unreadable_snapshot(id) {
                self.forget_unreadable::<SnapshotMeta>(id, &unreadable)?;
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

/// The smallest size a new volume may have: its kind's minimum, and no less than its source.
/// A source of another kind is INVALID_ARGUMENT; a limit below the source, OUT_OF_RANGE.
fn minimum_size(req: &NewVolume, source: Option<&SourceFacts>) -> Result<u64> {
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
