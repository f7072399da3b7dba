//! NodeStageVolume: attach, open the volume's device layers, format the top if blank and never
//! formatted, mount it; and bringing the kernel back to "staged" for publish and the
//! reconciler.

use crate::volume::handle::OpenVolume;
use crate::volume::node::{NodeOps, Observed};
use crate::volume::targets::*;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host;
use crate::host::layers::BlockDev;
use crate::host::loopdev::{AttachOptions, LoopDevice};
use crate::host::mount::{self, MountOptions};
use crate::host::tools::Probe;
use crate::volume::params::{Capability, VolumeKind};
use crate::volume::pool::VolumeMeta;
use crate::volume::records::{self, StageRecord};
use crate::volume::stack::Stack;

impl NodeOps {
    /// NodeStageVolume: attach, create the file system if (and only if) the device is blank and
    /// was never formatted, mount at `staging`. Block volumes are only attached.
    pub(crate) fn stage(
        &self,
        mut v: OpenVolume<'_>,
        staging: &Path,
        cap: &Capability,
    ) -> Result<()> {
        let meta = v.checked(cap)?;
        let (id, record, observed) = (&v.id, &v.record, &v.observed);
        if let Some(staged) = &record.staged {
            let live = observed.top().is_some()
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
            _ => self.host().file_id(&v.image)?.or(recorded),
        };
        let wanted = StageRecord {
            path: staging.to_path_buf(),
            capability: cap.clone(),
            image,
            unstaging: false,
        };
        if record.staged.as_ref() == Some(&wanted) {
            return self.ensure_staged(&mut v, staging, cap).map(drop);
        }
        // The record is intent and does not depend on the kernel work, so it is written (two
        // or three fsyncs on a disk pool) while attach, mkfs and mount run, not after them. A
        // crash in between leaves a record of a stage that did not finish: the state a reboot
        // leaves, which publish and the reconciler already repair, and which the CO's retry of
        // this call completes. A failed stage puts the previous record back.
        let (id, previous, dir) = (*id, record.staged.clone(), v.records.clone());
        let (staged, saved) = host::alongside(
            || records::save_staged(self.host(), &dir, &wanted),
            || self.ensure_staged(&mut v, staging, cap),
            || format!("writing the stage record of volume {id}"),
        );
        match (staged, saved) {
            (Ok(_), saved) => saved,
            (Err(err), saved) => {
                let restored = match (&previous, saved) {
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

    /// Brings the kernel to "staged at `staging`" from whatever it shows now, and returns the
    /// volume's stack. On failure, the layers opened and the loop device attached by this call
    /// are closed and detached again.
    pub(crate) fn ensure_staged(
        &self,
        v: &mut OpenVolume<'_>,
        staging: &Path,
        cap: &Capability,
    ) -> Result<Stack> {
        let meta = Arc::clone(v.meta()?);
        let observed = &v.observed;
        let fs = match meta.kind {
            VolumeKind::Filesystem(fs) => Some(fs),
            VolumeKind::Block => None,
        };
        if let Some(stack) = observed.stack.as_ref().filter(|s| s.complete()) {
            if fs.is_none() || observed.fs_mounted_at(staging) {
                return Ok(stack.clone());
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
            Some(_) => mount_options(cap, &meta)?,
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
                (self.attach(&meta)?, true)
            }
        };
        if !attached_here {
            self.refuse_if_held(&meta, observed)?;
        }
        let mut stack = match observed.stack.clone().filter(|_| !attached_here) {
            Some(stack) => stack,
            None => Stack::bare(dev, self.host().dev_numbers(dev)?, &meta.params.layers),
        };
        let opened = stack.open_missing(self.host(), false);
        crate::faults::crash_point("stage.attached");
        let result = opened.and_then(|kept| {
            let Some(fs) = fs else { return Ok(()) };
            let top = stack.highest().clone();
            let mounted = self.format_and_mount(v, &top, staging, fs, &options);
            if mounted.is_err() {
                stack.undo(self.host(), kept);
            }
            mounted
        });
        if let Err(err) = result {
            if attached_here {
                if let Err(detach) = self.host().detach(dev) {
                    tracing::error!(device = %dev.path().display(), error = %detach, "could not detach after a failed stage");
                }
            }
            return Err(err);
        }
        Ok(stack)
    }

    /// A tool that a killed driver started (mkfs, e2fsck, resize2fs) outlives it and holds the
    /// device exclusively until it ends: probing, formatting or mounting now would fail with
    /// EBUSY or race its writes. A device mounted nowhere yet held is that case: ABORTED, and
    /// the CO's retry finds the tool's work done.
    /// With layers, the highest device open is the one a tool would hold (a layer may claim the
    /// devices below it).
    fn refuse_if_held(&self, meta: &VolumeMeta, observed: &Observed<'_>) -> Result<()> {
        let Some(highest) = observed.stack.as_ref().map(Stack::highest) else {
            return Ok(());
        };
        let mounted = observed
            .table
            .iter()
            .any(|m| (m.major, m.minor) == highest.numbers);
        if !mounted && self.host().held_exclusively(&highest.path)? {
            return Err(Error::DeviceHeld {
                volume: meta.id,
                device: highest.path.clone(),
            });
        }
        Ok(())
    }

    /// Formats the top of the stack if it is blank and was never formatted, else grows what is
    /// pending; then mounts it at `staging`.
    fn format_and_mount(
        &self,
        v: &mut OpenVolume<'_>,
        top: &BlockDev,
        staging: &Path,
        fs: crate::host::fs::FsType,
        options: &MountOptions,
    ) -> Result<()> {
        let (id, dev) = (v.id, top.path.as_path());
        if self.format_if_blank(v, dev, fs)? {
            self.mount_fresh(v, dev, staging, fs, options)?;
            tracing::info!(volume.id = %id, fs = fs.name(), device = %dev.display(), "stage formatted a blank volume");
        } else {
            self.grow_pending(v, dev, None)?;
            self.host().mount_device(dev, staging, fs.name(), options)?;
            self.grow_pending(v, dev, Some(staging))?;
            tracing::info!(volume.id = %id, fs = fs.name(), device = %dev.display(), "stage found the volume's file system and mounted it (nothing formatted)");
        }
        crate::faults::crash_point("stage.mounted");
        Ok(())
    }

    pub(crate) fn attach(&self, meta: &VolumeMeta) -> Result<LoopDevice> {
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
    pub(crate) fn mount_fresh(
        &self,
        v: &mut OpenVolume<'_>,
        dev: &Path,
        staging: &Path,
        fs: crate::volume::params::FsType,
        options: &MountOptions,
    ) -> Result<()> {
        let id = v.id;
        let (mounted, marked) = host::alongside(
            || v.mark_formatted(),
            || self.host().mount_device(dev, staging, fs.name(), options),
            || format!("recording that volume {id} was formatted"),
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
    pub(crate) fn format_if_blank(
        &self,
        v: &mut OpenVolume<'_>,
        dev: &Path,
        fs: crate::volume::params::FsType,
    ) -> Result<bool> {
        let meta = Arc::clone(v.meta()?);
        // A backing file with no data extents at all is blank to the last byte: no signature
        // can hide in it, so the (costly) blkid probe is skipped. Anything written, or a volume
        // the driver formatted before, is probed.
        let probe = if !meta.formatted && !self.host().has_data(&v.image)? {
            Probe::Blank
        } else {
            self.host().probe(dev)?
        };
        match probe {
            // Formatted by a call that crashed before it could record so: record it now.
            Probe::FileSystem(found) if found == fs.name() => v.mark_formatted().map(|()| false),
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
                self.host().mkfs(fs, dev)?;
                crate::faults::crash_point("stage.formatted");
                Ok(true)
            }
        }
    }
}
