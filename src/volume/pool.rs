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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Corruption, Error, Mismatch, Result};
use crate::host::files::{self, Allocation, Usage};
use crate::host::mount;
use crate::host::os::{Host, NewImage, NodeKind};
use crate::volume::freeze::FreezeTarget;
use crate::volume::id::VolumeId;
use crate::volume::inuse::{self, KernelView};
use crate::volume::locks::{ObjectGuard, SnapshotGuard, VolumeGuard};
use crate::volume::params::{AccessMode, CapacityRange, Provisioning, VolumeKind, VolumeParams};

/// Metadata format version written by this build.
const META_VERSION: u32 = 1;

/// Where everything lives under the state dir, and the host it lives on: everything that holds
/// a layout (the pool, the node machinery, a freeze target) reaches the operating system
/// through that one `Host`, so a test that builds the layout on a fake host gets a domain that
/// touches nothing else.
#[derive(Clone)]
pub struct Layout {
    root: PathBuf,
    host: Arc<dyn Host>,
}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout").field("root", &self.root).finish()
    }
}

impl Layout {
    /// Creates the directories if needed and canonicalises the root (the kernel reports
    /// canonical backing-file paths, which we compare against).
    pub fn prepare(state_dir: &Path, host: Arc<dyn Host>) -> Result<Self> {
        for dir in [
            state_dir.to_path_buf(),
            state_dir.join("volumes"),
            state_dir.join("snapshots"),
            state_dir.join("node"),
        ] {
            host.create_dir_all(&dir)?;
        }
        let root = host.canonicalize(state_dir)?;
        Ok(Layout { root, host })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The operating system the state dir is on.
    pub fn host(&self) -> &dyn Host {
        &*self.host
    }

    /// The host, shared.
    pub fn shared_host(&self) -> Arc<dyn Host> {
        Arc::clone(&self.host)
    }

    /// Why the file system under the pool cannot keep the driver's crash-safety promises, if it
    /// cannot: the commit points (temp file, fsync, rename, fsync the directory) need a file
    /// system whose metadata survives a power loss consistent, and volumes need one that
    /// survives a reboot at all. Read once at startup, for a loud warning; the driver still
    /// serves (the operator chose the pool).
    pub fn durability_warning(&self) -> Option<String> {
        let table = self.host.mounts().ok()?;
        let fs = mount::mount_holding(&table, &self.root)?;
        let what = format!(
            "--state-dir {} is on {} ({} mounted at {})",
            self.root.display(),
            fs.fs_type,
            fs.source,
            fs.mount_point.display()
        );
        if self.host.ext_journal(&fs) == Some(false) {
            return Some(format!(
                "{what}, which has no journal: after a power loss or kernel crash it needs \
                 e2fsck, and a volume created, deleted or staged just before may come back \
                 half-made; put the pool on a journaled file system (ext4 with its journal, \
                 xfs, btrfs)"
            ));
        }
        if matches!(fs.fs_type.as_str(), "tmpfs" | "ramfs") {
            return Some(format!(
                "{what}, which is memory: every volume and its data are gone after a reboot"
            ));
        }
        None
    }
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }
    pub fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }
    pub fn image(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.img"))
    }
    pub fn meta(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.json"))
    }
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn snapshot_image(&self, id: &VolumeId) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.img"))
    }
    pub fn snapshot_meta(&self, id: &VolumeId) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.json"))
    }
    /// The directory of a volume's node records (see `records.rs`).
    pub fn node_record(&self, id: &VolumeId) -> PathBuf {
        self.node_dir().join(id.to_string())
    }
}

/// Everything about a volume that the kernel cannot tell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub version: u32,
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    pub kind: VolumeKind,
    /// The StorageClass parameters the volume keeps (`provisioning`, `claim`), flattened into
    /// the top level of the JSON.
    #[serde(flatten)]
    pub params: VolumeParams,
    pub access_modes: Vec<AccessMode>,
    pub created_unix: u64,
    /// Set once the driver created the file system: from then on a volume that probes blank is
    /// damaged, and is never formatted again.
    #[serde(default)]
    pub formatted: bool,
    /// The snapshot or volume this volume was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<ContentSource>,
    /// The volume is larger than the file system copied into it: the next stage grows it.
    #[serde(default)]
    pub pending_fs_grow: bool,
}

/// Where a volume's initial content came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentSource {
    Snapshot(VolumeId),
    Volume(VolumeId),
}

/// A point-in-time copy of a volume's backing file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub version: u32,
    pub id: VolumeId,
    pub name: String,
    pub source_volume_id: VolumeId,
    /// The source volume's size when the snapshot was taken: the smallest volume it restores to.
    pub size_bytes: u64,
    pub kind: VolumeKind,
    pub formatted: bool,
    pub created_unix_nanos: u128,
    /// The source's file system had not been grown to the source's size yet: copies of this
    /// snapshot grow it at their first stage.
    #[serde(default)]
    pub pending_fs_grow: bool,
}

impl Committed for SnapshotMeta {
    const WHAT: &'static str = "snapshot";
    fn id(&self) -> VolumeId {
        self.id
    }
    fn version(&self) -> u32 {
        self.version
    }
}

/// A copy source prepared by the caller: its image is stable (frozen or unused) for as long
/// as the caller holds the guards inside.
pub struct SourceCopy {
    pub image: PathBuf,
    pub size_bytes: u64,
    pub kind: VolumeKind,
    pub formatted: bool,
    /// The source's file system is smaller than the source (a grow is still pending there).
    pub pending_fs_grow: bool,
    pub content: ContentSource,
    /// Held while copying: the source's operation guard.
    pub guard: ObjectGuard,
    /// `Some` when the source is a mounted file system that takes writes until frozen (see
    /// `SourceCopy::copy_to`).
    pub(crate) freeze: Option<FreezeTarget>,
}

/// What CreateVolume asks for, typed.
#[derive(Clone, Debug)]
pub struct NewVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub kind: VolumeKind,
    pub access_modes: Vec<AccessMode>,
    /// The StorageClass parameters the volume keeps (compared whole on a retry).
    pub params: VolumeParams,
    /// `Some` to fill the new volume from a snapshot or another volume.
    pub source: Option<ContentSource>,
}

/// Whether CreateVolume made the volume or found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    New,
    AlreadyExisted,
}

#[derive(Default)]
struct Index {
    by_id: BTreeMap<VolumeId, Arc<VolumeMeta>>,
    by_name: HashMap<String, VolumeId>,
    snapshots: BTreeMap<VolumeId, Arc<SnapshotMeta>>,
    snapshots_by_name: HashMap<String, VolumeId>,
    /// Volumes and snapshots whose metadata exists but cannot be read, by id.
    unreadable: BTreeMap<VolumeId, Unreadable>,
}

/// Metadata that exists but cannot be read (torn, emptied, of an unknown version). Its object
/// is not served, but it is never taken for absent: its files and node records are kept, and
/// its name, when it can be salvaged, stays taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub what: &'static str,
    pub path: PathBuf,
    pub why: String,
    /// The `name` field, when the file still parses as JSON (e.g. an unknown version).
    pub name: Option<String>,
}

/// What startup recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub volumes: usize,
    pub removed_partial_images: Vec<PathBuf>,
    pub removed_temp_files: Vec<PathBuf>,
    pub removed_node_records: Vec<PathBuf>,
    /// Metadata that could not be read: left untouched, its volume not served.
    pub unreadable: Vec<PathBuf>,
}

/// The metadata store: the index of volumes and snapshots and their crash-safe files. It takes
/// no operation guard: the door (`volume::volumes`) holds it, and the functions that change an
/// object take its guard as proof.
pub struct Pool {
    layout: Layout,
    index: RwLock<Index>,
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

    fn open_with(layout: Layout, clean: bool) -> Result<(Self, Recovery)> {
        let mut recovery = Recovery::default();
        let mut index = Index::default();
        let host = layout.host();
        let view = KernelView::read(host)?;
        for meta in recover_dir::<VolumeMeta>(
            host,
            &layout.volumes_dir(),
            &view,
            &mut recovery,
            &mut index,
            clean,
        )? {
            index.by_name.insert(meta.name.clone(), meta.id);
            index.by_id.insert(meta.id, Arc::new(meta));
        }
        for snap in recover_dir::<SnapshotMeta>(
            host,
            &layout.snapshots_dir(),
            &view,
            &mut recovery,
            &mut index,
            clean,
        )? {
            index.snapshots_by_name.insert(snap.name.clone(), snap.id);
            index.snapshots.insert(snap.id, Arc::new(snap));
        }
        for path in list_dir(host, &layout.node_dir())? {
            let known = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(VolumeId::parse)
                // Records of a volume whose metadata cannot be read are kept: they say where it
                // is staged and published, which teardown needs.
                .is_some_and(|id| {
                    index.by_id.contains_key(&id)
                        || index.unreadable.contains_key(&id)
                        // The image is still attached or mounted: its records say where.
                        || inuse::image_uses(&view, &layout.image(&id))
                            .map_or(true, |uses| !uses.is_empty())
                });
            let is_dir = host
                .node(&path)?
                .is_some_and(|n| n.kind == NodeKind::Directory);
            if known && is_dir {
                // A crash-safe record write that did not finish.
                for temp in list_dir(host, &path)? {
                    if temp.to_string_lossy().ends_with(files::TEMP_SUFFIX) {
                        if clean {
                            host.remove_durably(&temp)?;
                        }
                        recovery.removed_temp_files.push(temp);
                    }
                }
                continue;
            }
            if clean {
                tracing::info!(path = %path.display(), "removing stale node records");
                let removed = if is_dir {
                    crate::volume::records::clear(host, &path)
                } else {
                    host.remove_durably(&path)
                };
                // Something odd in the node dir must not keep the driver from starting.
                if let Err(err) = removed {
                    tracing::error!(path = %path.display(), error = %err, "could not remove; left in place");
                    continue;
                }
            }
            recovery.removed_node_records.push(path);
        }
        recovery.volumes = index.by_id.len();
        Ok((
            Pool {
                layout,
                index: RwLock::new(index),
            },
            recovery,
        ))
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
        let mut minimum = req.kind.minimum_size();
        if let Some(source) = &source {
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
        // A fresh image is made durable with the metadata below; a copy is durable already.
        let filled = match &source {
            None => self.host().create_image(&image, size, allocation).map(Some),
            Some(source) => source
                .copy_to(self.host(), &image, size)
                .and_then(|stats| {
                    tracing::info!(
                        data_bytes = stats.data_bytes,
                        extents = stats.extents,
                        "copied the source"
                    );
                    let host = self.host();
                    host.grow_image(&image, size, allocation).inspect_err(|_| {
                        let _ = host.remove_durably(&image);
                    })
                })
                .map(|()| None),
        };
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

impl Pool {
    /// The metadata of `id` exists but cannot be read, if so.
    pub fn unreadable(&self, id: &VolumeId) -> Option<Unreadable> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .unreadable
            .get(id)
            .cloned()
    }

    /// Every volume and snapshot whose metadata cannot be read, in id order.
    pub fn unreadable_all(&self) -> Vec<(VolumeId, Unreadable)> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index
            .unreadable
            .iter()
            .map(|(id, u)| (*id, u.clone()))
            .collect()
    }

    /// DeleteVolume of a volume whose metadata cannot be read: the CO names the id, so the
    /// files are what it asks to delete (the caller made sure nothing on this node uses them).
    fn delete_unreadable(&self, id: &VolumeId, unreadable: &Unreadable) -> Result<()> {
        if unreadable.what != VolumeMeta::WHAT {
            return Ok(());
        }
        let image = self.layout.image(id);
        self.forget_unreadable(id, unreadable)?;
        crate::volume::records::clear(self.host(), &self.layout.node_record(id))?;
        self.host().remove_uncommitted(&image)
    }

    /// Removes unreadable metadata (the commit point) for a delete the CO asked for by id.
    fn forget_unreadable(&self, id: &VolumeId, unreadable: &Unreadable) -> Result<()> {
        tracing::warn!(id = %id, path = %unreadable.path.display(), why = %unreadable.why, "deleting a {} whose metadata is unreadable, as the CO asked", unreadable.what);
        self.host().remove_durably(&unreadable.path)?;
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .unreadable
            .remove(id);
        Ok(())
    }

    /// A create under `name` could duplicate an object whose metadata cannot be read: refused
    /// while such metadata carries this name, or carries no name that can be read at all.
    fn refuse_unknown_names(&self, what: &'static str, name: &str) -> Result<()> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let blocking = index.unreadable.values().find(|u| {
            u.what == what
                && u.name
                    .as_deref()
                    .is_none_or(|unreadable| unreadable == name)
        });
        match blocking {
            None => Ok(()),
            Some(u) => Err(Error::NameUnknowable {
                what,
                name: name.to_string(),
                metadata: u.path.clone(),
                why: u.why.clone(),
                names: u.name.clone(),
            }),
        }
    }
}

/// The entries of a directory the layout made: missing is an error, as `read_dir` gives it.
fn list_dir(host: &dyn Host, dir: &Path) -> Result<Vec<PathBuf>> {
    host.list_dir(dir)?.ok_or_else(|| {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Error::io("read directory", dir, missing)
    })
}

/// Metadata whose file is the commit point of an object in a directory of `<id>.img` and
/// `<id>.json` pairs (volumes, snapshots).
pub(crate) trait Committed: serde::de::DeserializeOwned {
    const WHAT: &'static str;
    fn id(&self) -> VolumeId;
    fn version(&self) -> u32;
}

impl Committed for VolumeMeta {
    const WHAT: &'static str = "volume";
    fn id(&self) -> VolumeId {
        self.id
    }
    fn version(&self) -> u32 {
        self.version
    }
}

pub(crate) fn load_meta<M: Committed>(host: &dyn Host, path: &Path, stem: &str) -> Result<M> {
    let text = host.read_file(path)?.ok_or_else(|| {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Error::io("read", path, missing)
    })?;
    let meta: M = serde_json::from_slice(&text).map_err(|e| Error::unparsable(path, e))?;
    let corrupt = |reason| Error::CorruptRecord {
        path: path.to_path_buf(),
        reason,
    };
    if meta.version() != META_VERSION {
        return Err(corrupt(Corruption::Version {
            what: "metadata",
            found: meta.version(),
            expected: META_VERSION,
        }));
    }
    if meta.id().to_string() != stem {
        return Err(corrupt(Corruption::IdMismatch {
            what: M::WHAT,
            id: meta.id(),
        }));
    }
    Ok(meta)
}

/// Startup recovery of one commit-point directory: loads the metadata, removes temp files and
/// images without metadata (an interrupted create or delete). Unreadable metadata is reported
/// and left untouched with its image.
fn recover_dir<M: Committed>(
    host: &dyn Host,
    dir: &Path,
    view: &KernelView<'_>,
    recovery: &mut Recovery,
    index: &mut Index,
    clean: bool,
) -> Result<Vec<M>> {
    let remove = |path: &Path| {
        if clean {
            host.remove_durably(path)
        } else {
            Ok(())
        }
    };
    let mut metas = Vec::new();
    let mut images = Vec::new();
    let mut unreadable_stems = Vec::new();
    for path in list_dir(host, dir)? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(files::TEMP_SUFFIX) {
            remove(&path)?;
            recovery.removed_temp_files.push(path);
        } else if let Some(stem) = name.strip_suffix(".json") {
            match load_meta::<M>(host, &path, stem) {
                Ok(meta) => metas.push(meta),
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "unreadable {} metadata; not served, files and node records left untouched", M::WHAT);
                    unreadable_stems.push(stem.to_string());
                    if let Some(id) = VolumeId::parse(stem) {
                        index.unreadable.insert(
                            id,
                            Unreadable {
                                what: M::WHAT,
                                path: path.clone(),
                                why: err.to_string(),
                                name: salvage_name(host, &path),
                            },
                        );
                    }
                    recovery.unreadable.push(path);
                }
            }
        } else if let Some(stem) = name.strip_suffix(".img") {
            images.push((stem.to_string(), path));
        }
    }
    for (stem, path) in images {
        let committed =
            metas.iter().any(|m| m.id().to_string() == stem) || unreadable_stems.contains(&stem);
        if committed {
            continue;
        }
        let uses = inuse::image_uses(view, &path)?;
        if !uses.is_empty() {
            tracing::warn!(path = %path.display(), uses = %uses.join("; "), "image without metadata is in use; left in place");
            continue;
        }
        if clean {
            // Read-only (the operator CLI) removes nothing, so it says nothing here either.
            tracing::info!(path = %path.display(), "removing the image of an interrupted {} create or delete", M::WHAT);
        }
        remove(&path)?;
        recovery.removed_partial_images.push(path);
    }
    Ok(metas)
}

/// The `name` of metadata that no longer deserialises as this build's format but still parses
/// as JSON (e.g. written by a newer version).
fn salvage_name(host: &dyn Host, path: &Path) -> Option<String> {
    let bytes = host.read_file(path).ok()??;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("name")?.as_str().map(str::to_string)
}

/// Same name, compatible arguments → the existing volume; otherwise ALREADY_EXISTS saying why.
fn check_compatible(existing: &VolumeMeta, req: &NewVolume) -> Result<()> {
    req.capacity.validate()?;
    let mismatch = if !req.capacity.admits(existing.capacity_bytes) {
        Some(Mismatch::Capacity {
            size: existing.capacity_bytes,
            required: req.capacity.required_bytes,
            limit: req.capacity.limit_bytes,
        })
    } else if existing.kind != req.kind {
        Some(Mismatch::Kind {
            existing: existing.kind,
            requested: req.kind,
        })
    } else if existing.content_source != req.source {
        Some(Mismatch::ContentSource {
            existing: existing.content_source,
            requested: req.source,
        })
    } else {
        existing.params.conflict(&req.params)
    };
    match mismatch {
        Some(mismatch) => Err(Error::VolumeNameTaken {
            name: existing.name.clone(),
            volume: existing.id,
            mismatch,
        }),
        None => Ok(()),
    }
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
