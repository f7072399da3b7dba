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
use crate::host;
use crate::host::files::Usage;
use crate::host::loopdev::{AttachOptions, FileId, LoopDevice};
use crate::host::mount::{self, MountEntry, MountOptions};
use crate::host::os::{Host, NodeKind};
use crate::host::tools::Probe;
use crate::volume::id::VolumeId;
use crate::volume::locks::VolumeGuard;
use crate::volume::params::{AccessKind, Capability, VolumeKind};
use crate::volume::pool::{Pool, VolumeMeta};
use crate::volume::records::{self, NodeRecord, PublishRecord, StageRecord};
use crate::volume::volumes::Publish;

/// Usage of a volume as NodeGetVolumeStats reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeStats {
    Filesystem(Usage),
    Block { total_bytes: u64 },
}

pub struct NodeOps {
    pub(crate) pool: Arc<Pool>,
    direct_io: bool,
}

/// The kernel's view of one volume, read once per operation, and the host it was read from
/// (for the stats of paths asked about later).
pub(crate) struct Observed<'h> {
    host: &'h dyn Host,
    /// The volume's writable loop device (the one staging attaches).
    pub(crate) device: Option<LoopDevice>,
    pub(crate) dev_numbers: Option<(u32, u32)>,
    /// Read-only loop devices of read-only raw block publishes, with their numbers.
    pub(crate) read_only_devices: Vec<(LoopDevice, (u32, u32))>,
    pub(crate) table: Vec<MountEntry>,
    /// The image at the volume's path is the file that was staged (or, with no stage record,
    /// there is a file there at all). False means the image was deleted or replaced behind the
    /// driver's back: a device still attached holds the only copy of the staged data.
    pub(crate) image_present: bool,
    /// Attached loop devices whose backing file could not be identified: any of them might
    /// hold this volume's image, so nothing is attached while one exists.
    pub(crate) unidentified: Vec<LoopDevice>,
}

impl<'h> Observed<'h> {
    pub(crate) fn read(host: &'h dyn Host, image: &Path) -> Result<Self> {
        Self::read_for(host, image, None, None)
    }

    pub(crate) fn read_near(host: &'h dyn Host, image: &Path, hint: Option<&Path>) -> Result<Self> {
        Self::read_for(host, image, None, hint)
    }

    /// The kernel's view of the volume whose image is at `image`. Loop devices are matched to
    /// the image by the backing file's identity (device and inode numbers), never by the path
    /// the kernel renders, which depends on the reader's mount namespace. `recorded` is the
    /// image's identity when the volume was staged (from its stage record): a device still
    /// holding that file is the volume's even when the image was deleted or replaced since.
    ///
    /// `hint` is a staging path or target the caller expects the volume's file system at: when
    /// the device mounted there is attached writable to the image, the scan of every attached
    /// device is skipped (~2 ms per call on a node with 200 staged volumes). The shortcut is
    /// only taken for a mounted file system, which never has the read-only devices of
    /// read-only raw block publishes; anything else is scanned.
    pub(crate) fn read_for(
        host: &'h dyn Host,
        image: &Path,
        recorded: Option<FileId>,
        hint: Option<&Path>,
    ) -> Result<Self> {
        let table = host.mounts()?;
        let current = host.file_id(image)?;
        let ours = |file: &FileId| Some(*file) == current || Some(*file) == recorded;
        let hinted = hint
            .and_then(|path| mount::mounted_at(&table, path))
            .and_then(|m| host.loop_device(m.major, m.minor))
            .filter(|dev| {
                matches!(host.loop_status(*dev), Ok(Some((file, read_only))) if !read_only && ours(&file))
            });
        if let Some(dev) = hinted {
            return Ok(Observed {
                host,
                device: Some(dev),
                dev_numbers: Some(host.dev_numbers(dev)?),
                read_only_devices: Vec::new(),
                table,
                image_present: current.is_some() && current == recorded.or(current),
                unidentified: Vec::new(),
            });
        }
        let mut device = None;
        let mut read_only_devices = Vec::new();
        let mut unidentified = Vec::new();
        for attached in host.attached_devices()? {
            let Some(file) = attached.backing else {
                unidentified.push(attached.device);
                continue;
            };
            if !ours(&file) {
                continue;
            }
            let dev = attached.device;
            if attached.read_only {
                read_only_devices.push((dev, host.dev_numbers(dev)?));
            } else if device.is_none() || Some(file) == recorded {
                // The device of the recorded file wins: it holds what the CO staged.
                device = Some(dev);
            }
        }
        let dev_numbers = device.map(|d| host.dev_numbers(d)).transpose()?;
        Ok(Observed {
            host,
            device,
            dev_numbers,
            read_only_devices,
            table,
            image_present: current.is_some() && current == recorded.or(current),
            unidentified,
        })
    }

    /// The read-only device whose node is bound at `path`, if any.
    pub(crate) fn read_only_device_at(&self, path: &Path) -> Option<LoopDevice> {
        mount::mounted_at(&self.table, path)?;
        let rdev = self.host.node_followed(path).ok()??.rdev;
        self.read_only_devices
            .iter()
            .find(|(_, (major, minor))| {
                rdev == nix::sys::stat::makedev((*major).into(), (*minor).into())
            })
            .map(|(dev, _)| *dev)
    }

    /// The volume's file system is mounted at `path`.
    pub(crate) fn fs_mounted_at(&self, path: &Path) -> bool {
        match (self.dev_numbers, mount::mounted_at(&self.table, path)) {
            (Some(numbers), Some(m)) => (m.major, m.minor) == numbers,
            _ => false,
        }
    }

    /// One of the volume's device nodes (writable, or a read-only one) is bind-mounted at `path`.
    pub(crate) fn device_bound_at(&self, path: &Path) -> bool {
        let (Some((major, minor)), Some(_)) =
            (self.dev_numbers, mount::mounted_at(&self.table, path))
        else {
            return false;
        };
        let writable = matches!(self.host.node_followed(path), Ok(Some(n)) if {
            n.kind == NodeKind::BlockDevice
                && n.rdev == nix::sys::stat::makedev(major.into(), minor.into())
        });
        writable || self.read_only_device_at(path).is_some()
    }

    pub(crate) fn live_at(&self, kind: VolumeKind, path: &Path) -> bool {
        match kind {
            VolumeKind::Block => self.device_bound_at(path),
            VolumeKind::Filesystem(_) => self.fs_mounted_at(path),
        }
    }

    /// Mount points of the volume's file system other than `except`.
    fn other_mounts(&self, except: &Path) -> Vec<PathBuf> {
        let Some(numbers) = self.dev_numbers else {
            return Vec::new();
        };
        self.table
            .iter()
            .filter(|m| (m.major, m.minor) == numbers && m.mount_point != except)
            .map(|m| m.mount_point.clone())
            .collect()
    }
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

    fn records_dir(&self, id: &VolumeId) -> PathBuf {
        self.pool.layout().node_record(id)
    }

    /// The volume and its operation guard; NOT_FOUND for an unknown id, and
    /// FAILED_PRECONDITION when the capability does not fit the volume.
    fn checked(&self, id: &VolumeId, capability: Option<&Capability>) -> Result<Arc<VolumeMeta>> {
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
    fn teardown_kind(&self, id: &VolumeId, record: &NodeRecord, path: &Path) -> Result<VolumeKind> {
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

    /// NodeStageVolume: attach, create the file system if (and only if) the device is blank and
    /// was never formatted, mount at `staging`. Block volumes are only attached.
    pub fn stage(&self, held: &VolumeGuard, staging: &Path, cap: &Capability) -> Result<()> {
        let id = held.id();
        let meta = self.checked(id, Some(cap))?;
        let record = self.load_record(id)?;
        let observed = self.observe(
            id,
            &record,
            record.staged.as_ref().map(|s| s.path.as_path()),
        )?;
        if let Some(staged) = &record.staged {
            let live = observed.device.is_some()
                && (meta.kind == VolumeKind::Block || observed.fs_mounted_at(&staged.path));
            if staged.path != staging && live {
                return Err(Error::StagedElsewhere {
                    volume: *id,
                    staging: staged.path.clone(),
                });
            }
            if staged.path == staging && live && staged.capability != *cap {
                return Err(Error::StagedDifferently {
                    volume: *id,
                    staging: staging.to_path_buf(),
                });
            }
        }
        // The identity of what is being staged. While a device still holds the recorded file,
        // that file is the volume's, even if something else now sits at the image's path.
        let recorded = record.staged.as_ref().and_then(|s| s.image);
        let image = match recorded {
            Some(recorded) if observed.device.is_some() && !observed.image_present => {
                Some(recorded)
            }
            _ => self
                .host()
                .file_id(&self.pool.layout().image(id))?
                .or(recorded),
        };
        let wanted = StageRecord {
            path: staging.to_path_buf(),
            capability: cap.clone(),
            image,
            unstaging: false,
        };
        if record.staged.as_ref() == Some(&wanted) {
            return self
                .ensure_staged(held, &meta, staging, cap, observed)
                .map(drop);
        }
        // The record is intent and does not depend on the kernel work, so it is written (two
        // or three fsyncs on a disk pool) while attach, mkfs and mount run, not after them. A
        // crash in between leaves a record of a stage that did not finish: the state a reboot
        // leaves, which publish and the reconciler already repair, and which the CO's retry of
        // this call completes. A failed stage puts the previous record back.
        let dir = self.records_dir(id);
        let (staged, saved) = host::alongside(
            || records::save_staged(self.host(), &dir, &wanted),
            || self.ensure_staged(held, &meta, staging, cap, observed),
            || format!("writing the stage record of volume {id}"),
        );
        match (staged, saved) {
            (Ok(_), saved) => saved,
            (Err(err), saved) => {
                let restored = match (&record.staged, saved) {
                    (_, Err(_)) => Ok(()),
                    (Some(previous), Ok(())) => records::save_staged(self.host(), &dir, previous),
                    (None, Ok(())) => records::remove_staged(self.host(), &dir),
                };
                if let Err(restore) = restored {
                    tracing::error!(volume.id = %id, error = %restore, "could not put the stage record back after a failed stage");
                }
                Err(err)
            }
        }
    }

    /// Brings the kernel to "staged at `staging`" from whatever it shows now. On failure,
    /// a loop device attached by this call is detached again.
    pub(crate) fn ensure_staged(
        &self,
        held: &VolumeGuard,
        meta: &VolumeMeta,
        staging: &Path,
        cap: &Capability,
        observed: Observed<'_>,
    ) -> Result<LoopDevice> {
        let fs = match meta.kind {
            VolumeKind::Filesystem(fs) => Some(fs),
            VolumeKind::Block => None,
        };
        if let (Some(dev), None) = (observed.device, fs) {
            return Ok(dev);
        }
        if let Some(dev) = observed.device {
            if observed.fs_mounted_at(staging) {
                return Ok(dev);
            }
        }
        if let Some(other) = mount::mounted_at(&observed.table, staging) {
            return Err(Error::ForeignMount {
                field: "staging_target_path",
                path: staging.to_path_buf(),
                mounted: other.source.clone(),
            });
        }
        let options = match fs {
            Some(_) => mount_options(cap, meta)?,
            None => MountOptions::default(),
        };
        if fs.is_some() {
            // Refuse a bad staging path before touching the volume (no attach, no mkfs).
            ensure_directory(self.host(), staging, "staging_target_path")?;
        }
        let (dev, attached_here) = match observed.device {
            Some(dev) => (dev, false),
            None => {
                // Never a second writable device for one image: when a device's backing file
                // cannot be identified, it might be this image's.
                if let Some(unknown) = observed.unidentified.first() {
                    return Err(Error::UnidentifiedDevice {
                        device: unknown.path(),
                        volume: meta.id,
                    });
                }
                (self.attach(meta)?, true)
            }
        };
        // A tool that a killed driver started (mkfs, e2fsck, resize2fs) outlives it and holds
        // the device exclusively until it ends: probing, formatting or mounting now would fail
        // with EBUSY or race its writes. A device mounted nowhere yet held is that case: ABORTED,
        // and the CO's retry finds the tool's work done.
        let mounted =
            |numbers: (u32, u32)| observed.table.iter().any(|m| (m.major, m.minor) == numbers);
        if !attached_here
            && !observed.dev_numbers.is_some_and(mounted)
            && self.host().held_exclusively(&dev.path())?
        {
            return Err(Error::DeviceHeld {
                volume: meta.id,
                device: dev.path(),
            });
        }
        crate::faults::crash_point("stage.attached");
        let Some(fs) = fs else {
            return Ok(dev);
        };
        let result = (|| {
            if self.format_if_blank(held, meta, &dev, fs)? {
                self.mount_fresh(held, &dev, staging, fs, &options)?;
                tracing::info!(volume.id = %meta.id, fs = fs.name(), device = %dev.path().display(), "stage formatted a blank volume");
            } else {
                self.grow_pending(held, meta, &dev.path(), None)?;
                self.host()
                    .mount_device(&dev.path(), staging, fs.name(), &options)?;
                self.grow_pending(held, meta, &dev.path(), Some(staging))?;
                tracing::info!(volume.id = %meta.id, fs = fs.name(), device = %dev.path().display(), "stage found the volume's file system and mounted it (nothing formatted)");
            }
            crate::faults::crash_point("stage.mounted");
            Ok(())
        })();
        if let Err(err) = result {
            if attached_here {
                if let Err(detach) = self.host().detach(dev) {
                    tracing::error!(device = %dev.path().display(), error = %detach, "could not detach after a failed stage");
                }
            }
            return Err(err);
        }
        Ok(dev)
    }

    fn attach(&self, meta: &VolumeMeta) -> Result<LoopDevice> {
        let image = self.pool.layout().image(&meta.id);
        let dev = self.host().attach(
            &image,
            AttachOptions {
                direct_io: self.direct_io,
                read_only: false,
            },
        )?;
        let direct_io = self.host().direct_io(dev);
        if self.direct_io && !direct_io {
            tracing::warn!(
                device = %dev.path().display(),
                backing.file = %image.display(),
                "direct I/O is off for this loop device (the pool file system does not support it): \
                 the volume runs with buffered I/O and double page caching"
            );
        }
        tracing::info!(device = %dev.path().display(), volume.id = %meta.id, direct_io, "attached");
        Ok(dev)
    }

    /// Mounts a file system mkfs just made, recording in the metadata that the driver formatted
    /// the volume while the mount runs (two fsyncs on a disk pool, which would otherwise follow
    /// mkfs one after the other with the mount). Nothing can be pending to grow: mkfs spanned the
    /// whole device. The record is needed before the next stage, not before this mount: a crash
    /// before it is durable leaves a file system that the next stage's probe finds and records.
    fn mount_fresh(
        &self,
        held: &VolumeGuard,
        dev: &LoopDevice,
        staging: &Path,
        fs: crate::volume::params::FsType,
        options: &MountOptions,
    ) -> Result<()> {
        let (mounted, marked) = host::alongside(
            || self.pool.mark_formatted(held),
            || {
                self.host()
                    .mount_device(&dev.path(), staging, fs.name(), options)
            },
            || format!("recording that volume {} was formatted", held.id()),
        );
        mounted?;
        if let Err(err) = marked {
            // Fail as a whole: the CO retries, and the retry's probe records the format.
            if let Err(unmount) = self.host().unmount(staging) {
                tracing::error!(staging = %staging.display(), error = %unmount, "could not unmount after a failed stage");
            }
            return Err(err);
        }
        Ok(())
    }

    /// Never formats a device that has any signature, or a volume the driver formatted before
    /// (a blank probe then means damage, and formatting would hide it). True when it ran mkfs
    /// now; the caller then records the format (`mount_fresh`).
    fn format_if_blank(
        &self,
        held: &VolumeGuard,
        meta: &VolumeMeta,
        dev: &LoopDevice,
        fs: crate::volume::params::FsType,
    ) -> Result<bool> {
        // A backing file with no data extents at all is blank to the last byte: no signature
        // can hide in it, so the (costly) blkid probe is skipped. Anything written, or a volume
        // the driver formatted before, is probed.
        let image = self.pool.layout().image(&meta.id);
        let probe = if !meta.formatted && !self.host().has_data(&image)? {
            Probe::Blank
        } else {
            self.host().probe(&dev.path())?
        };
        match probe {
            // Formatted by a call that crashed before it could record so: record it now.
            Probe::FileSystem(found) if found == fs.name() => {
                self.pool.mark_formatted(held).map(|()| false)
            }
            Probe::FileSystem(found) => Err(Error::WrongFileSystem {
                volume: meta.id,
                found,
                wanted: fs.name(),
            }),
            Probe::Other(found) => Err(Error::ForeignContent {
                volume: meta.id,
                found,
            }),
            Probe::Blank if meta.formatted => Err(Error::FormattedButBlank { volume: meta.id }),
            Probe::Blank => {
                self.host().mkfs(fs, &dev.path())?;
                crate::faults::crash_point("stage.formatted");
                Ok(true)
            }
        }
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
            let same = match record.published.iter().find(|p| p.target == target) {
                Some(existing) => existing.capability == *cap && existing.readonly == readonly,
                // Bound by a call that crashed before recording it: adopt the bind when it
                // is what this call asks for.
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
                    capability: cap.clone(),
                    readonly,
                };
                records::add_published(self.host(), &self.records_dir(id), &adopted)?;
            }
            return Ok(());
        }
        let others: Vec<&PublishRecord> = record
            .published
            .iter()
            .filter(|p| p.target != target && observed.live_at(meta.kind, &p.target))
            .collect();
        if let Some(other) = others.first() {
            if !cap.access.allows_several_targets()
                || !other.capability.access.allows_several_targets()
            {
                return Err(Error::SingleTarget {
                    volume: *id,
                    target: other.target.clone(),
                });
            }
        }
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

/// Creates the target (directory, or file for a device node) and binds the staged file system
/// or the loop device onto it.
pub(crate) fn bind_target(
    host: &dyn Host,
    kind: VolumeKind,
    dev: &LoopDevice,
    image: &Path,
    staging: &Path,
    target: &Path,
    options: &MountOptions,
) -> Result<()> {
    match kind {
        VolumeKind::Block if options.read_only() => {
            // A read-only bind does not stop writes to a device node: give the target a
            // device the kernel itself keeps read-only.
            ensure_file(host, target)?;
            // The read-only device must hold the very file the writable one does: checked by
            // identity, as the path the kernel shows for `dev` depends on who reads it.
            let held = host.loop_status(*dev)?.map(|(file, _)| file);
            if held.is_none() || host.file_id(image)? != held {
                return Err(Error::DeviceSwapped {
                    device: dev.path(),
                    image: image.to_path_buf(),
                });
            }
            let options_ro = AttachOptions {
                direct_io: host.direct_io(*dev),
                read_only: true,
            };
            let read_only = host.attach(image, options_ro)?;
            host.bind(&read_only.path(), target, options)
                .inspect_err(|_| {
                    let _ = host.detach(read_only);
                })
        }
        VolumeKind::Block => {
            ensure_file(host, target)?;
            host.bind(&dev.path(), target, options)
        }
        VolumeKind::Filesystem(_) => {
            ensure_directory(host, target, "target_path")?;
            host.bind(staging, target, options)
        }
    }
}

/// The options of a publish bind: the capability's generic flags, read-only when asked for.
pub(crate) fn publish_options(
    cap: &Capability,
    readonly: bool,
    meta: &VolumeMeta,
) -> Result<MountOptions> {
    let mut options = match &cap.kind {
        AccessKind::Mount { .. } => mount_options(cap, meta)?,
        AccessKind::Block => MountOptions::default(),
    };
    if readonly || cap.access.read_only() {
        options.flags.insert(nix::mount::MsFlags::MS_RDONLY);
    }
    Ok(options)
}

fn mount_options(cap: &Capability, meta: &VolumeMeta) -> Result<MountOptions> {
    let mut options = cap.mount_options().clone();
    if let VolumeKind::Filesystem(fs) = meta.kind {
        let thick = meta.params.provisioning == crate::volume::params::Provisioning::Thick;
        fs.get().mount_defaults(&mut options, thick);
    }
    if cap.access.read_only() || meta.access_modes.iter().all(|m| m.read_only()) {
        options.flags.insert(nix::mount::MsFlags::MS_RDONLY);
    }
    Ok(options)
}

/// EBUSY from umount means a process still uses the mount: the CO must stop it first.
fn busy_is_precondition(err: Error) -> Error {
    match err {
        Error::Sys {
            errno: nix::errno::Errno::EBUSY,
            target,
            ..
        } => Error::MountBusy { target },
        other => other,
    }
}

/// Makes sure `path` is a directory (creating it if missing), refusing symlinks.
fn ensure_directory(host: &dyn Host, path: &Path, field: &'static str) -> Result<()> {
    match host.node(path)?.map(|n| n.kind) {
        Some(NodeKind::Symlink) => Err(Error::invalid(
            field,
            format!(
                "{} is a symbolic link; refusing to mount through it",
                path.display()
            ),
        )),
        Some(NodeKind::Directory) => Ok(()),
        Some(_) => Err(Error::invalid(
            field,
            format!("{} exists and is not a directory", path.display()),
        )),
        None => host.create_dir_all(path),
    }
}

/// Makes sure `path` is a regular file to bind a device node onto, refusing symlinks.
fn ensure_file(host: &dyn Host, path: &Path) -> Result<()> {
    match host.node(path)?.map(|n| n.kind) {
        Some(NodeKind::Symlink) => Err(Error::invalid(
            "target_path",
            format!(
                "{} is a symbolic link; refusing to mount through it",
                path.display()
            ),
        )),
        Some(NodeKind::File) => Ok(()),
        Some(_) => Err(Error::invalid(
            "target_path",
            format!("{} exists and is not a regular file", path.display()),
        )),
        None => host.create_empty_file(path),
    }
}

/// Deletes what publish created at `target` (spec: the SP MUST delete it). A directory that is
/// not empty holds something the driver did not put there, and is left with a warning.
fn remove_target(host: &dyn Host, target: &Path, kind: VolumeKind) -> Result<()> {
    let Some(node) = host.node(target)? else {
        return Ok(());
    };
    match (kind, node.kind) {
        (VolumeKind::Filesystem(_), NodeKind::Directory) => {
            if !host.remove_empty_dir(target)? {
                tracing::warn!(target = %target.display(), "target_path is not empty after unmount; left in place");
            }
            Ok(())
        }
        (VolumeKind::Block, NodeKind::File) => host.remove_file(target),
        _ => {
            tracing::warn!(target = %target.display(), "target_path is not what publish created; left in place");
            Ok(())
        }
    }
}
