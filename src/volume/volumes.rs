//! The one door into the domain. The services and the operator commands see only [`Volumes`],
//! with one method per use case (create, delete, stage, publish, snapshot, expand, capacity,
//! inventory, reconcile, ...), each named for the CSI call or command it serves.
//!
//! **The operation guards are taken here and nowhere else.** Each method takes the guard of the
//! volume (or snapshot, or name) it works on, exactly once, and hands it down as proof (a
//! reader's guard where it only reads the object: a copy's source, changed-block tracking;
//! readers share, see `locks.rs`): the
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

mod snapshots;

use crate::volume::content::{self, SourceCopy};
use crate::volume::data::Condition;
use crate::volume::freeze::Thawed;
use crate::volume::group::GroupMember;
use crate::volume::groups::{GroupMeta, Groups, Unfinished};
use crate::volume::handle::Near;
use crate::volume::id::{SnapshotId, VolumeId};
use crate::volume::inuse::{self, KernelView};
use crate::volume::locks::{LockKey, ObjectGuard, OperationLocks, SnapshotGuard, VolumeGuard};
use crate::volume::metadata::{Shape, Walk};
use crate::volume::node::{NodeOps, VolumeStats};
use crate::volume::params::{Capability, CapacityRange};
use crate::volume::pool::{
    Committed, ContentSource, Created, Layout, NewVolume, Pool, Recovery, SnapshotMeta,
    SourceFacts, VolumeMeta,
};
use crate::volume::reconcile::{GcPolicy, ReconcileReport};
use crate::volume::status::{Inventory, VolumeStatus};

/// The volumes of this node: the metadata store, the node machinery and the operation guards.
pub struct Volumes {
    store: Arc<Pool>,
    node: NodeOps,
    locks: OperationLocks,
    /// The group snapshots' records (`groups.rs`).
    groups: Groups,
}

/// Takes guards for a background round: never waits, and answers `None` for what an
/// operation holds, reading or changing it (the round skips it; the next one gets it). Its
/// guards are a writer's: a round may repair, thaw or remove what it holds.
pub struct Skipper<'a> {
    locks: &'a OperationLocks,
}

impl Skipper<'_> {
    pub fn volume(&self, id: &VolumeId) -> Option<VolumeGuard> {
        self.locks.volume(id, ROUND).ok()
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Option<SnapshotGuard> {
        self.locks.snapshot(id, ROUND).ok()
    }
}

/// The operation a background round's guard names in a refusal.
const ROUND: &str = "a background round (reconciliation, thaw, status)";

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
        let (pool, recovery) = Pool::open(layout.clone())?;
        let (groups, unfinished) = Groups::open(layout, true)?;
        let volumes = Self::with(pool, groups, direct_io);
        volumes.recover_groups(unfinished)?;
        Ok((volumes, recovery))
    }

    /// Opens the pool without changing anything on disk (the operator commands, beside a live
    /// driver).
    pub fn open_read_only(state_dir: &Path, host: Arc<dyn Host>) -> Result<(Self, Recovery)> {
        let layout = Layout::prepare(state_dir, host)?;
        if let Some(warning) = layout.durability_warning() {
            tracing::warn!("{warning}");
        }
        let (pool, recovery) = Pool::open_read_only(layout.clone())?;
        // Read-only: a group a crash left unfinished is not served, and left for the driver.
        let (groups, _unfinished) = Groups::open(layout, false)?;
        Ok((Self::with(pool, groups, true), recovery))
    }

    fn with(pool: Pool, groups: Groups, direct_io: bool) -> Self {
        let store = Arc::new(pool);
        Volumes {
            node: NodeOps::new(Arc::clone(&store), direct_io),
            store,
            locks: OperationLocks::default(),
            groups,
        }
    }

    /// The longest a snapshot or clone of a live volume may keep its file system frozen
    /// (`--max-freeze-ms`; see `SourceCopy::copy_to`).
    pub fn set_freeze_limit(&mut self, limit: std::time::Duration) {
        self.node.freeze_limit = limit;
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
    /// does not hold (it may be on another node). The store decides the volume and commits it;
    /// in between, the image is made blank or copied from the source (`content.rs`).
    pub fn create(
        &self,
        req: NewVolume,
        elsewhere: impl FnOnce(Error) -> Error,
    ) -> Result<(Arc<VolumeMeta>, Created)> {
        let _name = self
            .locks
            .name(LockKey::Name(req.name.clone()), "CreateVolume")?;
        if let Some(existing) = self.store.existing(&req)? {
            return Ok((existing, Created::AlreadyExisted));
        }
        let source = match &req.source {
            Some(source) => Some(
                self.stable_source(source, "CreateVolume")
                    .map_err(elsewhere)?,
            ),
            None => None,
        };
        // Held until the commit, so the reconciler never takes the image for an orphan.
        let new = self.locks.volume(&VolumeId::new_random(), "CreateVolume")?;
        let pending = self
            .store
            .reserve(&new, req, source.as_ref().map(|s| &s.facts))?;
        let fresh = match source {
            None => Some(self.store.blank_image(&pending)?),
            Some(source) => {
                content::fill_volume(self.host(), &pending, source)?;
                None
            }
        };
        let meta = self.store.commit(pending, fresh)?;
        Ok((meta, Created::New))
    }

    /// DeleteVolume: OK for a volume that does not exist; FAILED_PRECONDITION while it is in
    /// use on this node (see `inuse`).
    pub fn delete(&self, id: &VolumeId) -> Result<()> {
        let held = self.locks.volume(id, "DeleteVolume")?;
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
        let held = self.locks.volume(id, "ExpandVolume")?;
        self.node
            .node_expand(self.node.open(held, Near::At(path))?, path, range)
    }

    /// Why the volume is not healthy, if it is not (VolumeCondition).
    pub fn condition(&self, id: &VolumeId) -> Result<Condition> {
        self.node.condition(id, &self.skipper())
    }

    // ---- the node's use cases ----

    /// NodeStageVolume (see `NodeOps::stage`).
    pub fn stage(&self, id: &VolumeId, staging: &Path, cap: &Capability) -> Result<()> {
        let held = self.locks.volume(id, "NodeStageVolume")?;
        self.node
            .stage(self.node.open(held, Near::Staged)?, staging, cap)
    }

    /// NodeUnstageVolume (see `NodeOps::unstage`).
    pub fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<()> {
        let held = self.locks.volume(id, "NodeUnstageVolume")?;
        self.node
            .unstage(self.node.open(held, Near::At(staging))?, staging)
    }

    /// NodePublishVolume (see `NodeOps::publish`).
    pub fn publish(&self, id: &VolumeId, req: Publish<'_>) -> Result<()> {
        let held = self.locks.volume(id, "NodePublishVolume")?;
        self.node
            .publish(self.node.open(held, Near::At(req.staging))?, req)
    }

    /// NodeUnpublishVolume (see `NodeOps::unpublish`).
    pub fn unpublish(&self, id: &VolumeId, target: &Path) -> Result<()> {
        let held = self.locks.volume(id, "NodeUnpublishVolume")?;
        self.node
            .unpublish(self.node.open(held, Near::At(target))?, target)
    }

    /// NodeGetVolumeStats: usage at `path` and the volume's condition. Reads only, so it takes
    /// no guard: a stats call never makes another operation ABORTED.
    pub fn stats(&self, id: &VolumeId, path: &Path) -> Result<(VolumeStats, Condition)> {
        self.store.require(id)?;
        let view = self.node.view(id, Near::At(path))?;
        let stats = self.node.stats(&view, path)?;
        Ok((stats, self.node.condition_of(&view, &self.skipper())?))
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
        let held = self.locks.volume(id, "loopcsi rescue")?;
        self.node.rescue(self.node.open(held, Near::Staged)?)
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
            .map(|u| u.path)
            .collect()
    }
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
