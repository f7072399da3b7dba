//! Node operations: stage (attach + open layers + format-if-blank + mount), publish (bind), and
//! their undo.
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
use crate::volume::handle::{OpenVolume, VolumeView};
pub(crate) use crate::volume::observed::Observed;
use crate::volume::params::{Capability, VolumeKind};
use crate::volume::pool::Pool;
use crate::volume::records::{self, PublishRecord, StageRecord};
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
    /// The longest a copy may keep a volume's file system frozen.
    pub(crate) freeze_limit: std::time::Duration,
}

impl NodeOps {
    pub fn new(pool: Arc<Pool>, direct_io: bool) -> Self {
        NodeOps {
            pool,
            direct_io,
            freeze_limit: crate::volume::freeze::DEFAULT_FREEZE_LIMIT,
        }
    }

    /// The operating system, through the pool's layout (the one `Host` of the domain).
    pub(crate) fn host(&self) -> &dyn Host {
        self.pool.layout().host()
    }

    /// The kind of volume to tear down: from the metadata, or, when the metadata is missing or
    /// unreadable, from what the node records say the CO asked for. Teardown (unpublish,
    /// unstage) must work without metadata, or mounts and devices would leak for ever.
    /// NOT_FOUND only when nothing at all is known of the volume on this node.
    pub(crate) fn teardown_kind(&self, v: &VolumeView<'_>, path: &Path) -> Result<VolumeKind> {
        let (id, record) = (&v.id, &v.record);
        if let Some(meta) = &v.meta {
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

    /// NodeUnstageVolume: unmount the staging path, close the volume's layers top-down and detach
    /// the loop device. Not staged at that path is success. Still published is
    /// FAILED_PRECONDITION (the CO unpublishes first).
    pub(crate) fn unstage(&self, v: OpenVolume<'_>, staging: &Path) -> Result<()> {
        let (id, record, observed) = (&v.id, &v.record, &v.observed);
        let kind = self.teardown_kind(&v, staging)?;
        if let Some(staged) = &record.staged {
            if staged.path != staging {
                // Staged elsewhere (or never here): nothing to undo at this path.
                return Ok(());
            }
        }
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
                records::save_staged(self.host(), &v.records, &unstaging)?;
            }
            if observed.fs_mounted_at(staging) {
                self.host().unmount(staging).map_err(busy_is_precondition)?;
                crate::faults::crash_point("unstage.unmounted");
            }
            if let Some(mut stack) = observed.stack.clone() {
                stack.close(self.host())?;
            }
            self.host().detach(dev)?;
            crate::faults::crash_point("unstage.detached");
            for read_only in &observed.read_only_devices {
                read_only.clone().close(self.host())?;
                self.host().detach(read_only.device)?;
            }
            tracing::info!(device = %dev.path().display(), volume.id = %id, "detached");
        }
        if record.exists() {
            records::clear(self.host(), &v.records)?;
        }
        Ok(())
    }

    /// NodePublishVolume: bind the staged file system (or the device node) at `target`, after
    /// repairing the staging if a reboot took it away.
    pub(crate) fn publish(&self, mut v: OpenVolume<'_>, req: Publish<'_>) -> Result<()> {
        let Publish {
            staging,
            target,
            capability: cap,
            readonly,
        } = req;
        let meta = v.checked(cap)?;
        if v.record.staged.is_none() && v.record.staged_damaged(&v.records) {
            // The stage record is unreadable: the kernel tells whether the volume is staged at
            // the path the CO names, and the record is written anew from this call.
            let mut record = v.record.clone();
            record.staged = self.adopt_staging(&v, staging, cap)?;
            v.set_record(record);
        }
        let id = v.id;
        let Some(staged) = v.record.staged.clone().filter(|s| s.path == staging) else {
            return Err(Error::NotStaged {
                volume: id,
                staging: staging.to_path_buf(),
            });
        };
        let options = publish_options(cap, readonly, &meta)?;
        if v.observed.live_at(meta.kind, target) {
            return self.already_published(&v, &req, options.read_only());
        }
        refuse_a_second_target(&v, meta.kind, &req)?;
        if let Some(other) = mount::mounted_at(&v.observed.table, target) {
            return Err(Error::ForeignMount {
                field: "target_path",
                path: target.to_path_buf(),
                mounted: other.source.clone(),
            });
        }
        let stack = self.ensure_staged(&mut v, staging, &staged.capability)?;
        if staged.unstaging {
            // Staged again for this publish: the unstage the CO began is over.
            let restaged = StageRecord {
                unstaging: false,
                ..staged.clone()
            };
            records::save_staged(self.host(), &v.records, &restaged)?;
        }
        bind_target(
            self.host(),
            meta.kind,
            &stack,
            &v.image,
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
        if let Err(err) = records::add_published(self.host(), &v.records, &published) {
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
        v: &VolumeView<'_>,
        req: &Publish<'_>,
        wanted_ro: bool,
    ) -> Result<()> {
        let (id, record, observed) = (&v.id, &v.record, &v.observed);
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
            records::add_published(self.host(), &v.records, &adopted)?;
        }
        Ok(())
    }

    /// A stage record rebuilt from the kernel when the one on disk cannot be read: the volume's
    /// device is live at `staging` (its file system mounted there, or for a raw block volume,
    /// attached). Written crash-safely over the damaged file.
    fn adopt_staging(
        &self,
        v: &VolumeView<'_>,
        staging: &Path,
        cap: &Capability,
    ) -> Result<Option<StageRecord>> {
        let (id, observed) = (&v.id, &v.observed);
        let live = observed.top().is_some()
            && (cap.volume_kind() == VolumeKind::Block || observed.fs_mounted_at(staging));
        if !live {
            return Ok(None);
        }
        let adopted = StageRecord {
            path: staging.to_path_buf(),
            capability: cap.clone(),
            image: self.host().file_id(&v.image)?,
            unstaging: false,
        };
        records::save_staged(self.host(), &v.records, &adopted)?;
        tracing::warn!(volume.id = %id, staging = %staging.display(), "rewrote an unreadable stage record from the kernel's view");
        Ok(Some(adopted))
    }

    /// NodeUnpublishVolume: unmount `target` and delete the file or directory publish created.
    /// A target that is not mounted (or does not exist) is success.
    pub(crate) fn unpublish(&self, v: OpenVolume<'_>, target: &Path) -> Result<()> {
        let (record, observed) = (&v.record, &v.observed);
        let kind = self.teardown_kind(&v, target)?;
        if observed.live_at(kind, target) {
            let read_only_device = observed.read_only_device_at(target).cloned();
            self.host().unmount(target).map_err(busy_is_precondition)?;
            if let Some(mut stack) = read_only_device {
                stack.close(self.host())?;
                self.host().detach(stack.device)?;
            }
        } else if let Some(other) = mount::mounted_at(&observed.table, target) {
            return Err(Error::ForeignMountLeft {
                target: target.to_path_buf(),
                mounted: other.source.clone(),
            });
        }
        remove_target(self.host(), target, kind)?;
        if record.published.iter().any(|p| p.target == target)
            || record.target_damaged(&v.records, target)
        {
            records::remove_published(self.host(), &v.records, target)?;
        }
        Ok(())
    }

    /// NodeGetVolumeStats for `path`, which must be where this volume is staged or published.
    pub(crate) fn stats(&self, v: &VolumeView<'_>, path: &Path) -> Result<VolumeStats> {
        let (id, meta) = (&v.id, v.meta()?);
        let not_here = || Error::NotFound {
            what: "volume at path",
            id: format!("{id} at {}", crate::error::shown(&path.to_string_lossy())),
        };
        if !path.is_absolute() {
            return Err(not_here());
        }
        let (record, observed) = (&v.record, &v.observed);
        match meta.kind {
            VolumeKind::Filesystem(_) if observed.fs_mounted_at(path) => {
                Ok(VolumeStats::Filesystem(self.host().usage(path)?))
            }
            VolumeKind::Block => {
                let staged_here = record
                    .staged
                    .as_ref()
                    .is_some_and(|s| s.path == path && observed.top().is_some());
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
fn refuse_a_second_target(v: &VolumeView<'_>, kind: VolumeKind, req: &Publish<'_>) -> Result<()> {
    let (id, record, observed) = (&v.id, &v.record, &v.observed);
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
