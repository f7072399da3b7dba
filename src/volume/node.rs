//! Node operations: stage (attach + format-if-blank + mount), publish (bind), and their undo.
//!
//! Every operation observes first (sysfs for the loop device backing the volume's image,
//! mountinfo for what is mounted at the paths) and then does only what is missing, so repeating
//! a call that already took effect changes nothing.
//!
//! `node/<id>.json` records what the CO asked for (the staging path and capability, the
//! published targets), because that is the one thing the kernel cannot tell after a reboot:
//! a kubelet may then call NodePublishVolume without NodeStageVolume, and the record lets
//! publish re-stage the volume instead of binding an empty directory. The record is intent; the
//! kernel remains the truth of what exists.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host::files::Usage;
use crate::host::mount::{self};
use crate::host::os::{Host, NodeKind};
use crate::volume::id::VolumeId;
use crate::volume::locks::VolumeGuard;
pub(crate) use crate::volume::observed::Observed;
use crate::volume::params::{Capability, VolumeKind};
use crate::volume::pool::{Pool, VolumeMeta};
use crate::volume::records::{self, NodeRecord, PublishRecord, StageRecord};
pub(crate) use crate::volume::targets::*;
use crate::volume::volumes::Publish;

/// Usage of a volume as NodeGetVolumeStats reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeStats {
    Filesystem(Usage),
    Block { total_bytes: u64 },
}

pub struct NodeOps {
    pub(crate) pool: Arc<Pool>,
    pub(crate) direct_io: bool,
}

impl NodeOps {
    pub fn new(pool: Arc<Pool>, direct_io: bool) -> Self {
        NodeOps { pool, direct_io }
    }

    /// The operating system, through the pool's layout (the one `Host` of the domain).
    pub(crate) fn host(&self) -> &dyn Host {
        self.pool.layout().host()
    }

    pub(crate) fn load_record(&self, id: &VolumeId) -> Result<NodeRecord> {
        records::load(self.host(), &self.pool.layout().node_record(id))
    }

    /// The kernel's view of volume `id` (see `Observed::read_for`), matching loop devices to
    /// the image by identity, including the identity recorded when it was staged.
    pub(crate) fn observe(
        &self,
        id: &VolumeId,
        record: &NodeRecord,
        hint: Option<&Path>,
    ) -> Result<Observed<'_>> {
        let recorded = record.staged.as_ref().and_then(|s| s.image);
        Observed::read_for(self.host(), &self.pool.layout().image(id), recorded, hint)
    }

    pub(crate) fn records_dir(&self, id: &VolumeId) -> PathBuf {
        self.pool.layout().node_record(id)
    }

    /// The volume and its operation guard; NOT_FOUND for an unknown id, and
    /// FAILED_PRECONDITION when the capability does not fit the volume.
    pub(crate) fn checked(
        &self,
        id: &VolumeId,
        capability: Option<&Capability>,
    ) -> Result<Arc<VolumeMeta>> {
        let meta = self.pool.require(id)?;
        if let Some(cap) = capability {
            cap.check_against(meta.kind)
                .map_err(|reason| Error::CapabilityMismatch { reason })?;
        }
        Ok(meta)
    }

    /// The kind of volume to tear down: from the metadata, or, when the metadata is missing or
    /// unreadable, from what the node records say the CO asked for. Teardown (unpublish,
    /// unstage) must work without metadata, or mounts and devices would leak for ever.
    /// NOT_FOUND only when nothing at all is known of the volume on this node.
    pub(crate) fn teardown_kind(
        &self,
        id: &VolumeId,
        record: &NodeRecord,
        path: &Path,
    ) -> Result<VolumeKind> {
        if let Some(meta) = self.pool.get(id) {
            return Ok(meta.kind);
        }
        let from_records = record
            .staged
            .as_ref()
            .map(|s| s.capability.volume_kind())
            .or_else(|| record.published.first().map(|p| p.capability.volume_kind()));
        if let Some(kind) = from_records {
            return Ok(kind);
        }
        if record.exists() || self.pool.unreadable(id).is_some() {
            // Nothing readable says which kind: the kernel does (a device node is bound for a
            // raw block volume, a directory is mounted for a file system).
            let node =
                matches!(self.host().node(path), Ok(Some(n)) if n.kind == NodeKind::BlockDevice);
            return Ok(if node {
                VolumeKind::Block
            } else {
                VolumeKind::Filesystem(crate::volume::params::FsType::Ext4)
            });
        }
        Err(Error::NotFound {
            what: "volume",
            id: id.to_string(),
        })
    }

    /// NodeUnstageVolume: unmount the staging path and detach the loop device. Not staged at
    /// that path is success. Still published is FAILED_PRECONDITION (the CO unpublishes first).
    pub fn unstage(&self, held: &VolumeGuard, staging: &Path) -> Result<()> {
        let id = held.id();
        let record = self.load_record(id)?;
        let kind = self.teardown_kind(id, &record, staging)?;
        if let Some(staged) = &record.staged {
            if staged.path != staging {
                // Staged elsewhere (or never here): nothing to undo at this path.
                return Ok(());
            }
        }
        let observed = self.observe(id, &record, Some(staging))?;
        let published: Vec<PathBuf> = record
            .published
            .iter()
            .filter(|p| observed.live_at(kind, &p.target))
            .map(|p| p.target.clone())
            .chain(match kind {
                VolumeKind::Filesystem(_) => observed.other_mounts(staging),
                VolumeKind::Block => Vec::new(),
            })
            .collect();
        if let Some(target) = published.first() {
            return Err(Error::StillPublished {
                volume: *id,
                target: target.to_path_buf(),
            });
        }
        if let (Some(dev), false) = (observed.device, observed.image_present) {
            // Detaching would destroy the only copy of the data.
            return Err(Error::ImageReplaced {
                volume: *id,
                device: dev.path(),
            });
        }
        if let Some(dev) = observed.device {
            // The intent first: if the device is still held after the unmount, this call fails
            // and the CO retries it; until then the reconciler must not re-mount the staging.
            if let Some(staged) = record.staged.as_ref().filter(|s| !s.unstaging) {
                let unstaging = StageRecord {
                    unstaging: true,
                    ..staged.clone()
                };
                records::save_staged(self.host(), &self.records_dir(id), &unstaging)?;
            }
            if observed.fs_mounted_at(staging) {
                self.host().unmount(staging).map_err(busy_is_precondition)?;
                crate::faults::crash_point("unstage.unmounted");
            }
            self.host().detach(dev)?;
            crate::faults::crash_point("unstage.detached");
            for (read_only, _) in &observed.read_only_devices {
                self.host().detach(*read_only)?;
            }
            tracing::info!(device = %dev.path().display(), volume.id = %id, "detached");
        }
        if record.exists() {
            records::clear(self.host(), &self.records_dir(id))?;
        }
        Ok(())
    }

    /// NodePublishVolume: bind the staged file system (or the device node) at `target`, after
    /// repairing the staging if a reboot took it away.
    pub fn publish(&self, held: &VolumeGuard, req: Publish<'_>) -> Result<()> {
        let id = held.id();
        let Publish {
            staging,
            target,
            capability: cap,
            readonly,
        } = req;
        let meta = self.checked(id, Some(cap))?;
        let mut record = self.load_record(id)?;
        if record.staged.is_none() && record.staged_damaged(&self.records_dir(id)) {
            // The stage record is unreadable: the kernel tells whether the volume is staged at
            // the path the CO names, and the record is written anew from this call.
            record.staged = self.adopt_staging(id, &record, staging, cap)?;
        }
        let Some(staged) = record.staged.clone().filter(|s| s.path == staging) else {
            return Err(Error::NotStaged {
                volume: *id,
                staging: staging.to_path_buf(),
            });
        };
        let observed = self.observe(id, &record, Some(staging))?;
        let options = publish_options(cap, readonly, &meta)?;
        let wanted_ro = options.read_only();
        if observed.live_at(meta.kind, target) {
            return self.already_published(id, &record, &observed, &req, wanted_ro);
        }
        refuse_a_second_target(id, &record, &observed, meta.kind, &req)?;
        if let Some(other) = mount::mounted_at(&observed.table, target) {
            return Err(Error::ForeignMount {
                field: "target_path",
                path: target.to_path_buf(),
                mounted: other.source.clone(),
            });
        }
        let dev = self.ensure_staged(held, &meta, staging, &staged.capability, observed)?;
        if staged.unstaging {
            // Staged again for this publish: the unstage the CO began is over.
            let restaged = StageRecord {
                unstaging: false,
                ..staged.clone()
            };
            records::save_staged(self.host(), &self.records_dir(id), &restaged)?;
        }
        bind_target(
            self.host(),
            meta.kind,
            &dev,
            &self.pool.layout().image(id),
            staging,
            target,
            &options,
        )?;
        crate::faults::crash_point("publish.bound");
        let published = PublishRecord {
            target: target.to_path_buf(),
            capability: cap.clone(),
            readonly,
        };
        if let Err(err) = records::add_published(self.host(), &self.records_dir(id), &published) {
            let _ = self.host().unmount(target);
            return Err(err);
        }
        Ok(())
    }

    /// A publish at a target where the volume is already live: OK when it is what this call
    /// asks for (a bind made by a call that crashed before recording it is adopted),
    /// ALREADY_EXISTS otherwise.
    fn already_published(
        &self,
        id: &VolumeId,
        record: &NodeRecord,
        observed: &Observed<'_>,
        req: &Publish<'_>,
        wanted_ro: bool,
    ) -> Result<()> {
        let target = req.target;
        let same = match record.published.iter().find(|p| p.target == target) {
            Some(existing) => {
                existing.capability == *req.capability && existing.readonly == req.readonly
            }
            None => mount::mounted_at(&observed.table, target)
                .is_some_and(|m| m.read_only() == wanted_ro),
        };
        if !same {
            return Err(Error::PublishedDifferently {
                volume: *id,
                target: target.to_path_buf(),
            });
        }
        if !record.published.iter().any(|p| p.target == target) {
            let adopted = PublishRecord {
                target: target.to_path_buf(),
                capability: req.capability.clone(),
                readonly: req.readonly,
            };
            records::add_published(self.host(), &self.records_dir(id), &adopted)?;
        }
        Ok(())
    }

    /// A stage record rebuilt from the kernel when the one on disk cannot be read: the volume's
    /// device is live at `staging` (its file system mounted there, or for a raw block volume,
    /// attached). Written crash-safely over the damaged file.
    fn adopt_staging(
        &self,
        id: &VolumeId,
        record: &NodeRecord,
        staging: &Path,
        cap: &Capability,
    ) -> Result<Option<StageRecord>> {
        let observed = self.observe(id, record, Some(staging))?;
        let live = observed.device.is_some()
            && (cap.volume_kind() == VolumeKind::Block || observed.fs_mounted_at(staging));
        if !live {
            return Ok(None);
        }
        let adopted = StageRecord {
            path: staging.to_path_buf(),
            capability: cap.clone(),
            image: self.host().file_id(&self.pool.layout().image(id))?,
            unstaging: false,
        };
        records::save_staged(self.host(), &self.records_dir(id), &adopted)?;
        tracing::warn!(volume.id = %id, staging = %staging.display(), "rewrote an unreadable stage record from the kernel's view");
        Ok(Some(adopted))
    }

    /// NodeUnpublishVolume: unmount `target` and delete the file or directory publish created.
    /// A target that is not mounted (or does not exist) is success.
    pub fn unpublish(&self, held: &VolumeGuard, target: &Path) -> Result<()> {
        let id = held.id();
        let record = self.load_record(id)?;
        let kind = self.teardown_kind(id, &record, target)?;
        let observed = self.observe(id, &record, Some(target))?;
        if observed.live_at(kind, target) {
            let read_only_device = observed.read_only_device_at(target);
            self.host().unmount(target).map_err(busy_is_precondition)?;
            if let Some(dev) = read_only_device {
                self.host().detach(dev)?;
            }
        } else if let Some(other) = mount::mounted_at(&observed.table, target) {
            return Err(Error::ForeignMountLeft {
                target: target.to_path_buf(),
                mounted: other.source.clone(),
            });
        }
        remove_target(self.host(), target, kind)?;
        if record.published.iter().any(|p| p.target == target)
            || record.target_damaged(&self.records_dir(id), target)
        {
            records::remove_published(self.host(), &self.records_dir(id), target)?;
        }
        Ok(())
    }

    /// NodeGetVolumeStats for `path`, which must be where this volume is staged or published.
    pub fn stats(&self, id: &VolumeId, path: &Path) -> Result<VolumeStats> {
        let meta = self.checked(id, None)?;
        let not_here = || Error::NotFound {
            what: "volume at path",
            id: format!("{id} at {}", crate::error::shown(&path.to_string_lossy())),
        };
        if !path.is_absolute() {
            return Err(not_here());
        }
        let record = self.load_record(id)?;
        let observed = self.observe(id, &record, Some(path))?;
        match meta.kind {
            VolumeKind::Filesystem(_) if observed.fs_mounted_at(path) => {
                Ok(VolumeStats::Filesystem(self.host().usage(path)?))
            }
            VolumeKind::Block => {
                let staged_here = record
                    .staged
                    .is_some_and(|s| s.path == path && observed.device.is_some());
                if staged_here || observed.device_bound_at(path) {
                    Ok(VolumeStats::Block {
                        total_bytes: meta.capacity_bytes,
                    })
                } else {
                    Err(not_here())
                }
            }
            VolumeKind::Filesystem(_) => Err(not_here()),
        }
    }
}

/// A single-target access mode (on either side) refuses a second live target.
fn refuse_a_second_target(
    id: &VolumeId,
    record: &NodeRecord,
    observed: &Observed<'_>,
    kind: VolumeKind,
    req: &Publish<'_>,
) -> Result<()> {
    let other = record
        .published
        .iter()
        .find(|p| p.target != req.target && observed.live_at(kind, &p.target));
    if let Some(other) = other {
        if !req.capability.access.allows_several_targets()
            || !other.capability.access.allows_several_targets()
        {
            return Err(Error::SingleTarget {
                volume: *id,
                target: other.target.clone(),
            });
        }
    }
    Ok(())
}
