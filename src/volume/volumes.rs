//! The one door into the domain. The services and the operator commands see only [`Volumes`],
//! with one method per use case (create, delete, stage, publish, snapshot, expand, capacity,
//! inventory, reconcile, ...), each named for the CSI call or command it serves.
//!
//! **The operation guards are taken here and nowhere else.** Each method takes the guard of the
//! volume (or snapshot, or name) it works on, exactly once, and hands it down as proof: the
//! metadata store (`pool.rs`) and the node machinery (`node.rs`, `data.rs`, ...) take a
//! `&VolumeGuard` where they change a volume, so they can neither forget the guard nor take it
//! twice. Background rounds (reconciliation, thawing what a dead driver froze) get a
//! [`Skipper`]: it takes guards without waiting and skips what is busy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host::files::Usage;
use crate::host::os::Host;
use crate::host::tools::FsType;
use crate::volume::copath;

use crate::volume::data::Condition;
use crate::volume::freeze::Thawed;
use crate::volume::id::VolumeId;
use crate::volume::inuse::{self, KernelView};
use crate::volume::locks::{LockKey, ObjectGuard, OperationLocks, SnapshotGuard, VolumeGuard};
use crate::volume::metadata::{self, BlockList, Shape};
use crate::volume::node::{NodeOps, VolumeStats};
use crate::volume::params::{Capability, CapacityRange};
use crate::volume::pool::{
    Committed, ContentSource, Created, Layout, NewVolume, Pool, Recovery, SnapshotMeta, SourceCopy,
    VolumeMeta,
};
use crate::volume::reconcile::{GcPolicy, ReconcileReport};
use crate::volume::status::{Inventory, VolumeStatus};

/// The volumes of this node: the metadata store, the node machinery and the operation guards.
pub struct Volumes {
    store: Arc<Pool>,
    node: NodeOps,
    locks: OperationLocks,
}

/// Takes guards for a background round: never waits, and answers `None` for what an
/// operation holds (the round skips it; the next one gets it).
pub struct Skipper<'a> {
    locks: &'a OperationLocks,
}

impl Skipper<'_> {
    pub fn volume(&self, id: &VolumeId) -> Option<VolumeGuard> {
        self.locks.volume(id).ok()
    }

    pub fn snapshot(&self, id: &VolumeId) -> Option<SnapshotGuard> {
        self.locks.snapshot(id).ok()
    }
}

/// A NodePublishVolume request, typed.
pub struct Publish<'a> {
    pub staging: &'a Path,
    pub target: &'a Path,
    pub capability: &'a Capability,
    pub readonly: bool,
}

impl Volumes {
    /// Opens the pool under `state_dir`, recovering from any crash (see `Pool::open`).
    /// Every OS access of the domain goes through `host` (`Linux` on a node, `FakeHost` in
    /// unit tests).
    pub fn open(
        state_dir: &Path,
        host: Arc<dyn Host>,
        direct_io: bool,
    ) -> Result<(Self, Recovery)> {
        let layout = Layout::prepare(state_dir, host)?;
        if let Some(warning) = layout.durability_warning() {
            tracing::warn!("{warning}");
        }
        let (pool, recovery) = Pool::open(layout)?;
        Ok((Self::with(pool, direct_io), recovery))
    }

    /// Opens the pool without changing anything on disk (the operator commands, beside a live
    /// driver).
    pub fn open_read_only(state_dir: &Path, host: Arc<dyn Host>) -> Result<(Self, Recovery)> {
        let layout = Layout::prepare(state_dir, host)?;
        if let Some(warning) = layout.durability_warning() {
            tracing::warn!("{warning}");
        }
        let (pool, recovery) = Pool::open_read_only(layout)?;
        Ok((Self::with(pool, true), recovery))
    }

    fn with(pool: Pool, direct_io: bool) -> Self {
        let store = Arc::new(pool);
        Volumes {
            node: NodeOps::new(Arc::clone(&store), direct_io),
            store,
            locks: OperationLocks::default(),
        }
    }

    fn skipper(&self) -> Skipper<'_> {
        Skipper { locks: &self.locks }
    }

    /// The driver's state dir (CO paths must stay outside it).
    pub fn state_dir(&self) -> &Path {
        self.store.layout().root()
    }

    /// The operating system the domain runs on (for the operator commands' own reads).
    pub fn host(&self) -> &dyn Host {
        self.store.layout().host()
    }

    /// Whether this node can make file system `fs` (its mkfs is installed).
    pub fn supports(&self, fs: FsType) -> bool {
        self.store.layout().host().supports(fs)
    }

    /// A staging or target path the CO gives, checked and resolved (see `copath::co_path`).
    pub fn co_path(&self, field: &'static str, value: &str) -> Result<PathBuf> {
        copath::co_path(self.host(), field, value, self.state_dir())
    }

    /// A publish target must not be a directory with someone else's entries
    /// (see `copath::unclaimed_target`).
    pub fn unclaimed_target(&self, field: &'static str, target: &Path) -> Result<()> {
        copath::unclaimed_target(self.host(), field, target)
    }

    /// The `volume_path` of a stats or expand call (see `copath::volume_path`).
    pub fn volume_path(&self, id: &VolumeId, value: &str) -> Result<PathBuf> {
        copath::volume_path(self.host(), id, value)
    }

    // ---- the controller's use cases ----

    /// CreateVolume: idempotent by name (the name's guard is held from the lookup to the
    /// commit, so one name never makes two volumes); a content source is held stable, and
    /// frozen when live, for the length of its copy. `elsewhere` rewords a source this pool
    /// does not hold (it may be on another node).
    pub fn create(
        &self,
        req: NewVolume,
        elsewhere: impl FnOnce(Error) -> Error,
    ) -> Result<(Arc<VolumeMeta>, Created)> {
        let _name = self.locks.name(LockKey::Name(req.name.clone()))?;
        if let Some(existing) = self.store.existing(&req)? {
            return Ok((existing, Created::AlreadyExisted));
        }
        let source = match &req.source {
            Some(source) => Some(self.stable_source(source).map_err(elsewhere)?),
            None => None,
        };
        let new = self.locks.volume(&VolumeId::new_random())?;
        let meta = self.store.create(&new, req, source)?;
        Ok((meta, Created::New))
    }

    /// DeleteVolume: OK for a volume that does not exist; FAILED_PRECONDITION while it is in
    /// use on this node (see `inuse`).
    pub fn delete(&self, id: &VolumeId) -> Result<()> {
        let held = self.locks.volume(id)?;
        let unreadable_volume = self
            .store
            .unreadable(id)
            .is_some_and(|u| u.what == <VolumeMeta as Committed>::WHAT);
        if self.store.get(id).is_some() || unreadable_volume {
            self.refuse_in_use(id)?;
        }
        self.store.delete(&held)
    }

    /// FAILED_PRECONDITION naming every use when the volume is in use on this node: staged or
    /// published by its records, attached, or mounted.
    fn refuse_in_use(&self, id: &VolumeId) -> Result<()> {
        let layout = self.store.layout();
        let uses = inuse::volume_uses(
            &KernelView::read(layout.host())?,
            &layout.image(id),
            &layout.node_record(id),
        )?;
        if uses.is_empty() {
            return Ok(());
        }
        Err(Error::InUse {
            volume: *id,
            by: uses,
        })
    }

    /// The volume, or NOT_FOUND.
    pub fn get(&self, id: &VolumeId) -> Result<Arc<VolumeMeta>> {
        self.store.require(id)
    }

    /// ListVolumes: up to `max` volumes after `after`, in id order, and whether more follow.
    pub fn list(&self, after: Option<VolumeId>, max: usize) -> (Vec<Arc<VolumeMeta>>, bool) {
        self.store.list(after, max)
    }

    /// GetCapacity: the space of the pool's file system.
    pub fn capacity(&self) -> Result<Usage> {
        self.store.usage()
    }

    /// ControllerExpandVolume and NodeExpandVolume: the whole expansion, online, on this node
    /// (backing file, loop device, file system at `path`).
    pub fn expand(&self, id: &VolumeId, path: &Path, range: Option<CapacityRange>) -> Result<u64> {
        let held = self.locks.volume(id)?;
        self.node.node_expand(&held, path, range)
    }

    /// Why the volume is not healthy, if it is not (VolumeCondition).
    pub fn condition(&self, id: &VolumeId) -> Result<Condition> {
        self.node.condition(id, &self.skipper())
    }

    // ---- snapshots ----

    /// CreateSnapshot: idempotent by name; the same name for another source is ALREADY_EXISTS.
    /// The source is held stable (and frozen, when live, as briefly as the pool allows) for
    /// the length of the copy.
    pub fn create_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
    ) -> Result<(Arc<SnapshotMeta>, Created)> {
        self.store.require(source)?;
        let _name = self.locks.name(LockKey::SnapshotName(name.to_string()))?;
        if let Some(existing) = self.store.existing_snapshot(name, source)? {
            return Ok((existing, Created::AlreadyExisted));
        }
        let copy = self.stable_source(&ContentSource::Volume(*source))?;
        let new = self.locks.snapshot(&VolumeId::new_random())?;
        let meta = self.store.create_snapshot(&new, name, copy)?;
        Ok((meta, Created::New))
    }

    /// DeleteSnapshot: OK for a snapshot that does not exist.
    pub fn delete_snapshot(&self, id: &VolumeId) -> Result<()> {
        let held = self.locks.snapshot(id)?;
        self.store.delete_snapshot(&held)
    }

    /// The snapshot, or NOT_FOUND.
    pub fn snapshot(&self, id: &VolumeId) -> Result<Arc<SnapshotMeta>> {
        self.store.require_snapshot(id)
    }

    /// ListSnapshots: snapshots in id order after `after` matching `filter`, at most `max`.
    pub fn list_snapshots(
        &self,
        after: Option<VolumeId>,
        max: usize,
        filter: impl Fn(&SnapshotMeta) -> bool,
    ) -> (Vec<Arc<SnapshotMeta>>, bool) {
        self.store.list_snapshots(after, max, filter)
    }

    /// A restore's or clone's source (or a snapshot's), held stable for its copy.
    fn stable_source(&self, source: &ContentSource) -> Result<SourceCopy> {
        match source {
            ContentSource::Snapshot(id) => {
                let held = self.locks.snapshot(id)?;
                let snap = self.store.require_snapshot(id)?;
                Ok(SourceCopy {
                    image: self.store.layout().snapshot_image(id),
                    size_bytes: snap.size_bytes,
                    kind: snap.kind,
                    formatted: snap.formatted,
                    pending_fs_grow: snap.pending_fs_grow,
                    content: *source,
                    guard: ObjectGuard::Snapshot(held),
                    freeze: None,
                })
            }
            ContentSource::Volume(id) => {
                let held = self.locks.volume(id)?;
                let (meta, freeze) = self.node.stable_volume(&held)?;
                Ok(SourceCopy {
                    image: self.store.layout().image(id),
                    size_bytes: meta.capacity_bytes,
                    kind: meta.kind,
                    formatted: meta.formatted,
                    pending_fs_grow: meta.pending_fs_grow,
                    content: *source,
                    guard: ObjectGuard::Volume(held),
                    freeze,
                })
            }
        }
    }

    // ---- the node's use cases ----

    /// NodeStageVolume (see `NodeOps::stage`).
    pub fn stage(&self, id: &VolumeId, staging: &Path, cap: &Capability) -> Result<()> {
        let held = self.locks.volume(id)?;
        self.node.stage(&held, staging, cap)
    }

    /// NodeUnstageVolume (see `NodeOps::unstage`).
    pub fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<()> {
        let held = self.locks.volume(id)?;
        self.node.unstage(&held, staging)
    }

    /// NodePublishVolume (see `NodeOps::publish`).
    pub fn publish(&self, id: &VolumeId, req: Publish<'_>) -> Result<()> {
        let held = self.locks.volume(id)?;
        self.node.publish(&held, req)
    }

    /// NodeUnpublishVolume (see `NodeOps::unpublish`).
    pub fn unpublish(&self, id: &VolumeId, target: &Path) -> Result<()> {
        let held = self.locks.volume(id)?;
        self.node.unpublish(&held, target)
    }

    /// NodeGetVolumeStats: usage at `path` and the volume's condition. Reads only, so it takes
    /// no guard: a stats call never makes another operation ABORTED.
    pub fn stats(&self, id: &VolumeId, path: &Path) -> Result<(VolumeStats, Condition)> {
        self.store.require(id)?;
        let stats = self.node.stats(id, path)?;
        Ok((stats, self.condition(id)?))
    }

    // ---- background work and the operator's commands ----

    /// Thaws every file system a killed driver left frozen (startup, and each round).
    pub fn thaw_abandoned(&self) -> Thawed {
        self.node.thaw_abandoned(&self.skipper())
    }

    /// One reconciliation round: thaw what a dead driver froze, repair drift of staged and
    /// published volumes, collect orphans.
    pub fn reconcile(&self) -> Result<ReconcileReport> {
        self.node.reconcile(&self.skipper())
    }

    /// `loopcsi gc`: orphans older than the policy's age, collected or listed.
    pub fn collect_orphans(&self, policy: GcPolicy) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        self.node
            .collect_orphans(policy, &self.skipper(), &mut report)?;
        Ok(report)
    }

    /// `loopcsi rescue`: the data of a staged volume whose image is gone, copied from its loop
    /// device into a new image.
    pub fn rescue(&self, id: &VolumeId) -> Result<String> {
        let held = self.locks.volume(id)?;
        self.node.rescue(&held)
    }

    /// `loopcsi status`: every volume's status, in id order.
    pub fn statuses(&self) -> Result<Vec<VolumeStatus>> {
        self.node.volume_statuses(&self.skipper())
    }

    /// The figures a metrics scrape reports.
    pub fn inventory(&self) -> Result<Inventory> {
        self.node.inventory()
    }

    /// Metadata files that could not be read (listed by `status`, never left out).
    pub fn unreadable_paths(&self) -> Vec<PathBuf> {
        self.store
            .unreadable_all()
            .into_iter()
            .map(|(_, u)| u.path)
            .collect()
    }

    // ---- changed-block tracking (SnapshotMetadata) ----

    /// GetMetadataAllocated: the allocated ranges of snapshot `id` from byte `from` on. The
    /// snapshot's guard is held while its file is read, so a DeleteSnapshot cannot race it
    /// (it is ABORTED meanwhile, and retried by the CO).
    pub fn metadata_allocated(&self, id: &VolumeId, from: u64, shape: Shape) -> Result<BlockList> {
        let _held = self.locks.snapshot(id)?;
        let snap = self.store.require_snapshot(id)?;
        within_volume("starting_offset", from, snap.size_bytes)?;
        let image = self.store.layout().snapshot_image(id);
        metadata::allocated(self.host(), &image, snap.size_bytes, from, shape)
    }

    /// GetMetadataDelta: the ranges of snapshot `target` that changed since snapshot `base`
    /// of the same volume, from byte `from` on (see `volume::metadata`). Both guards are held
    /// while the files are read. Snapshots of different volumes, or a base taken after the
    /// target, are INVALID_ARGUMENT (the spec's "argument value is invalid").
    pub fn metadata_delta(
        &self,
        base: &VolumeId,
        target: &VolumeId,
        from: u64,
        shape: Shape,
    ) -> Result<BlockList> {
        let _base_held = self.locks.snapshot(base)?;
        let _target_held = if base == target {
            None
        } else {
            Some(self.locks.snapshot(target)?)
        };
        let older = self.store.require_snapshot(base)?;
        let newer = self.store.require_snapshot(target)?;
        if older.source_volume_id != newer.source_volume_id {
            return Err(Error::invalid(
                "target_snapshot_id",
                format!(
                    "{target} is a snapshot of volume {}, base_snapshot_id {base} of volume {}: \
                     a delta is only defined between snapshots of the same volume",
                    newer.source_volume_id, older.source_volume_id
                ),
            ));
        }
        if older.created_unix_nanos > newer.created_unix_nanos {
            return Err(Error::invalid(
                "base_snapshot_id",
                format!("{base} was taken after target_snapshot_id {target}; swap them"),
            ));
        }
        within_volume("starting_offset", from, newer.size_bytes)?;
        let layout = self.store.layout();
        let reflinks = self.host().reflinks(&layout.snapshots_dir());
        metadata::delta(
            self.host(),
            &layout.snapshot_image(base),
            &layout.snapshot_image(target),
            newer.size_bytes,
            from,
            (shape, reflinks),
        )
    }
}

/// OUT_OF_RANGE when `offset` is not inside a volume of `capacity` bytes (spec: "the
/// starting offset exceeds the volume size").
fn within_volume(field: &'static str, offset: u64, capacity: u64) -> Result<()> {
    if offset >= capacity {
        return Err(Error::OffsetBeyondVolume {
            field,
            offset,
            capacity,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::linux::Linux;
    use crate::host::tools::Tools;
    use crate::volume::params::{AccessMode, VolumeKind, VolumeParams};

    fn new_volume(name: &str) -> NewVolume {
        NewVolume {
            name: name.into(),
            capacity: CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            },
            kind: VolumeKind::Block,
            access_modes: vec![AccessMode::SingleNodeWriter],
            params: VolumeParams::default(),
            source: None,
        }
    }

    fn open(dir: &Path) -> (Volumes, Recovery) {
        let host = Arc::new(Linux::new(Tools::discover().unwrap()));
        Volumes::open(dir, host, true).unwrap()
    }

    /// Moved from the pool's tests when the name guard moved to the door.
    #[test]
    fn create_is_idempotent_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = open(dir.path());
        let layout = pool.store.layout().clone();
        let (a, how) = pool.create(new_volume("a/../b"), |e| e).unwrap();
        assert_eq!(how, Created::New);
        let (again, how) = pool.create(new_volume("a/../b"), |e| e).unwrap();
        assert_eq!((again.id, how), (a.id, Created::AlreadyExisted));
        let mut bigger = new_volume("a/../b");
        bigger.capacity.required_bytes = 128 << 20;
        assert!(matches!(
            pool.create(bigger, |e| e),
            Err(Error::VolumeNameTaken { .. })
        ));
        // A crash between image and metadata leaves an image without metadata, and a torn
        // temp file: recovery removes both and keeps the complete volume.
        let orphan = layout.image(&VolumeId::new_random());
        std::fs::write(&orphan, b"").unwrap();
        let temp = layout.volumes_dir().join("x.json.tmp");
        std::fs::write(&temp, b"{").unwrap();
        drop(pool);
        let (pool, recovery) = open(dir.path());
        assert_eq!(recovery.volumes, 1);
        assert_eq!(recovery.removed_partial_images, vec![orphan]);
        assert_eq!(recovery.removed_temp_files, vec![temp]);
        assert_eq!(pool.store.find_by_name("a/../b").unwrap().id, a.id);
        pool.delete(&a.id).unwrap();
        pool.delete(&a.id).unwrap();
        assert!(!layout.image(&a.id).exists() && !layout.meta(&a.id).exists());
    }
}
