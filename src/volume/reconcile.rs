//! Continuous reconciliation of the node: what should exist (the volumes the CO staged and
//! published through this driver, from the node records) is compared with what the kernel shows.
//!
//! - Drift that can be repaired safely is repaired: a staging whose loop device, device layers
//!   or mount went away (detached, closed or unmounted behind the driver's back, a reboot, or a
//!   restart of the plugin) is re-attached, re-opened and re-mounted while its staging directory
//!   still exists, and a recorded target that still exists but lost its bind is bound again.
//! - What cannot be repaired safely (a foreign mount on a path, a path the CO removed) is
//!   reported and left alone.
//! - Orphans are collected: loop devices backed by images of deleted volumes (or by files in
//!   the pool that are no volume's), with the device layers left open over them closed first
//!   when the whole stack is provably dead (`orphans`), images without metadata, stale temp
//!   files, node records of unknown volumes.
//!
//! Every action is one log line. A volume with an operation in flight is skipped this round (its
//! guard is taken with try-lock, as any RPC would). Loop devices and mounts that do not belong
//! to the pool directory are never touched.

use std::collections::HashMap;

use crate::host::loopdev::FileId;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::host::files;
use crate::host::mount;
use crate::host::os::{Host, NodeKind};
use crate::volume::handle::{Near, OpenVolume};
use crate::volume::id::{Id, Kind, OfSnapshot, OfVolume, VolumeId};
use crate::volume::inuse::{self, KernelView};
use crate::volume::locks::ObjectGuard;
use crate::volume::node::{bind_target, publish_options, NodeOps};
use crate::volume::orphans;
use crate::volume::params::VolumeKind;
use crate::volume::records;
use crate::volume::volumes::Skipper;

/// What one reconciliation round did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub repaired: Vec<String>,
    pub unrepairable: Vec<String>,
    pub collected: Vec<String>,
}

impl ReconcileReport {
    fn repaired(&mut self, what: String) {
        tracing::info!(action = "repair", "{what}");
        self.repaired.push(what);
    }
    fn unrepairable(&mut self, what: String) {
        tracing::warn!(action = "report", "{what}");
        self.unrepairable.push(what);
    }
    fn collected(&mut self, what: String) {
        tracing::info!(action = "collect", "{what}");
        self.collected.push(what);
    }
}

/// The volume or snapshot id a pool or record file name starts with (`<id>.img`,
/// `<id>.json.tmp`, ...).
fn id_prefix<K: Kind>(path: &Path) -> Option<Id<K>> {
    let name = path.file_name()?.to_str()?;
    Id::parse(name.get(..uuid::fmt::Hyphenated::LENGTH)?)
}

/// The entries of a directory the layout made: missing is an error, as `read_dir` gives it.
fn list(host: &dyn Host, dir: &Path) -> Result<Vec<PathBuf>> {
    host.list_dir(dir)?.ok_or_else(|| {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Error::io("read directory", dir, missing)
    })
}

/// Something is at `path` (links followed), as `Path::exists` tells.
fn exists(host: &dyn Host, path: &Path) -> bool {
    matches!(host.node_followed(path), Ok(Some(_)))
}

/// `path` is a directory (links followed), as `Path::is_dir` tells.
fn is_dir(host: &dyn Host, path: &Path) -> bool {
    matches!(host.node_followed(path), Ok(Some(n)) if n.kind == NodeKind::Directory)
}

/// How orphans are collected.
#[derive(Clone, Copy, Debug)]
pub struct GcPolicy {
    /// Files younger than this are left alone: they may belong to an operation in flight in
    /// another process (the operator CLI beside a live driver). Zero inside the driver, whose
    /// operation guards already tell what is in flight.
    pub min_age: Duration,
    /// Report what would be collected, change nothing.
    pub dry_run: bool,
}

impl GcPolicy {
    /// The driver's own rounds.
    pub const IN_DRIVER: GcPolicy = GcPolicy {
        min_age: Duration::ZERO,
        dry_run: false,
    };
}

impl NodeOps {
    /// One reconciliation round: repair drift of staged and published volumes, then collect
    /// orphans.
    pub fn reconcile(&self, skipper: &Skipper<'_>) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let thaws = self.thaw_abandoned(skipper);
        report.repaired.extend(thaws.thawed);
        report.unrepairable.extend(thaws.failed);
        for path in list(self.host(), &self.pool.layout().node_dir())? {
            let Some(id) = id_prefix(&path) else { continue };
            let Some(held) = skipper.volume(&id) else {
                continue;
            };
            if self.pool.get(&id).is_none() || path.extension().is_some_and(|e| e == "tmp") {
                continue;
            }
            let opened = self.open(held, Near::Staged);
            if let Err(err) = opened.and_then(|v| self.reconcile_volume(v, &mut report)) {
                report.unrepairable(format!("volume {id}: {err}"));
            }
        }
        self.collect_orphans(GcPolicy::IN_DRIVER, skipper, &mut report)?;
        Ok(report)
    }

    /// Collects orphans: loop devices of images that are no committed volume's, images without
    /// metadata, stale temp files, node records of unknown volumes. Whether a volume exists is
    /// decided by its metadata file on disk at that moment (the commit point), not by this
    /// process's index, so the operator CLI can run beside a live driver.
    pub fn collect_orphans(
        &self,
        policy: GcPolicy,
        skipper: &Skipper<'_>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        self.collect_orphan_devices(policy, skipper, report)?;
        self.collect_orphan_files(policy, skipper, report)
    }

    /// Whether the volume exists: its metadata file (the commit point) is on disk, readable
    /// or not.
    fn committed(&self, id: &VolumeId) -> bool {
        exists(self.host(), &self.pool.layout().meta(id))
    }

    fn reconcile_volume(&self, mut v: OpenVolume<'_>, report: &mut ReconcileReport) -> Result<()> {
        let (id, meta) = (v.id, Arc::clone(v.meta()?));
        let record = v.record.clone();
        for (path, why) in &record.damaged {
            report.unrepairable(format!(
                "volume {id}: node record {} is unreadable ({why}); the CO's next stage, publish, \
                 unpublish or unstage of the volume rewrites or removes it",
                path.display()
            ));
        }
        let Some(staged) = record.staged.clone() else {
            return Ok(());
        };
        if staged.unstaging {
            // NodeUnstageVolume began and did not finish (its device was still held): the CO
            // retries it. Re-mounting now would undo what the CO asked for and race its retry.
            report.unrepairable(format!(
                "volume {id}: NodeUnstageVolume of {} began and has not finished; waiting for the \
                 CO's retry (nothing is re-mounted meanwhile)",
                staged.path.display()
            ));
            return Ok(());
        }
        let observed = &v.observed;
        if let (Some(dev), false) = (observed.device, observed.image_present) {
            report.unrepairable(format!(
                "volume {id}: its image was deleted or replaced behind the driver's back; {} \
                 holds the only copy of its data: stop its pods, then run `loopcsi rescue --volume {id}`",
                dev.path().display()
            ));
            return Ok(());
        }
        let staging_live = match meta.kind {
            VolumeKind::Block => observed.top().is_some(),
            VolumeKind::Filesystem(_) => observed.fs_mounted_at(&staged.path),
        };
        if !staging_live {
            if let Some(other) = mount::mounted_at(&observed.table, &staged.path) {
                report.unrepairable(format!(
                    "volume {id}: staging path {} holds a foreign mount of {}",
                    staged.path.display(),
                    other.source
                ));
                return Ok(());
            }
            if !is_dir(self.host(), &staged.path) {
                report.unrepairable(format!(
                    "volume {id}: staging path {} is gone; waiting for the CO to stage or unstage",
                    staged.path.display()
                ));
                return Ok(());
            }
            let had_device = observed.device.is_some();
            let had_stack = observed.top().is_some();
            self.ensure_staged(&mut v, &staged.path, &staged.capability)?;
            // The kernel changed under this operation: the binds below are made onto what it
            // shows now.
            v.reobserve(Near::Staged)?;
            report.repaired(format!(
                "volume {id}: {} staging at {}",
                match (had_device, had_stack) {
                    (true, true) => "re-mounted",
                    (true, false) => "re-opened the device layers and re-mounted",
                    (false, _) => "re-attached and re-mounted",
                },
                staged.path.display()
            ));
        }
        self.rebind_targets(&v, &staged.path, report)
    }

    /// Re-binds the recorded targets whose binds are gone, onto the (repaired) staging.
    fn rebind_targets(
        &self,
        v: &OpenVolume<'_>,
        staging: &std::path::Path,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let (id, meta, record, observed) = (v.id, v.meta()?, &v.record, &v.observed);
        let image = &v.image;
        let Some(stack) = observed.stack.as_ref().filter(|s| s.complete()) else {
            return Ok(());
        };
        for published in &record.published {
            let target = &published.target;
            if observed.live_at(meta.kind, target) {
                continue;
            }
            if let Some(other) = mount::mounted_at(&observed.table, target) {
                report.unrepairable(format!(
                    "volume {id}: target {} holds a mount of {} that is not this volume's; the CO must republish",
                    target.display(),
                    other.source
                ));
                continue;
            }
            if !matches!(self.host().node(target), Ok(Some(_))) {
                report.unrepairable(format!(
                    "volume {id}: target {} is gone; waiting for the CO to publish or unpublish",
                    target.display()
                ));
                continue;
            }
            let options = publish_options(&published.capability, published.readonly, meta)?;
            bind_target(
                self.host(),
                meta.kind,
                stack,
                image,
                staging,
                target,
                &options,
            )?;
            report.repaired(format!("volume {id}: re-bound target {}", target.display()));
        }
        Ok(())
    }

    /// Loop devices holding a file of the pool directory that is no committed volume's image
    /// (an image without metadata), or a file deleted from the pool directory that no volume
    /// recorded as staged. Files are matched by identity; a device whose backing file cannot be
    /// identified, or that only a path rendered in another mount namespace could tie to the
    /// pool, is unknown and left alone. A device still mounted or bound is never detached.
    fn collect_orphan_devices(
        &self,
        policy: GcPolicy,
        skipper: &Skipper<'_>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let layout = self.pool.layout();
        let host = self.host();
        let volumes_dir = layout.volumes_dir();
        let view = KernelView::read(host)?;
        let (pool_files, recorded) = self.known_images()?;
        let pool_dev = host.file_id(&volumes_dir)?.map(|f| f.dev);
        for attached in &view.attached {
            let dev = attached.device;
            let Some(file) = attached.backing else {
                continue; // unknown: never touched
            };
            if let Some(id) = recorded
                .get(&file)
                .filter(|_| !pool_files.contains_key(&file))
            {
                if self.committed(id) {
                    report.unrepairable(format!(
                        "the image of volume {id} was deleted or replaced behind the driver's back; {} holds the only copy of its data (run `loopcsi rescue --volume {id}`)",
                        dev.path().display()
                    ));
                }
                continue;
            }
            let deleted_here = deleted_pool_image(attached, &volumes_dir, pool_dev);
            let (path, deleted) = match (pool_files.get(&file), deleted_here) {
                (Some(path), _) => (path.clone(), false),
                (None, Some(path)) => (path, true),
                (None, None) => continue, // not ours, or not provably ours
            };
            let id = id_prefix(&path);
            if id.is_some_and(|id| self.committed(&id) && layout.image(&id) == path) {
                if deleted {
                    report.unrepairable(format!(
                        "the image of volume {} was deleted behind the driver's back; {} holds the only copy of its data",
                        id.map(|i| i.to_string()).unwrap_or_default(),
                        dev.path().display()
                    ));
                }
                continue;
            }
            let _guard = match id {
                Some(id) => match skipper.volume(&id) {
                    Some(guard) => Some(guard),
                    None => continue,
                },
                None => None,
            };
            let what = format!(
                "orphan loop device {} (backed by {}, {file})",
                dev.path().display(),
                attached.shown.display()
            );
            self.collect_orphan_stack(policy, &view, dev, id, &what, report)?;
        }
        Ok(())
    }

    /// Closes the layers of the orphan loop device `dev` top-down and detaches it, when every
    /// device of its stack is provably dead (see `orphans`); reports it otherwise.
    fn collect_orphan_stack(
        &self,
        policy: GcPolicy,
        view: &KernelView<'_>,
        dev: crate::host::loopdev::LoopDevice,
        id: Option<VolumeId>,
        what: &str,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let host = self.host();
        let mut stack = match orphans::find(host, dev) {
            Ok(stack) => stack,
            Err(err) => {
                report.unrepairable(format!(
                    "{what} is kept: cannot tell what is stacked on it: {err}"
                ));
                return Ok(());
            }
        };
        let mut uses = orphans::uses(host, view, &stack);
        if let Some(id) = id {
            let record = records::load(host, &self.pool.layout().node_record(&id))?;
            if record.exists() {
                uses.push(format!("node records of volume {id} exist"));
            }
        }
        if !uses.is_empty() {
            report.unrepairable(format!("{what} is still in use: {}", uses.join("; ")));
            return Ok(());
        }
        let layers = orphans::layers_open(&stack)
            .map(|l| format!(" after closing its layers top-down: {l}"))
            .unwrap_or_default();
        if policy.dry_run {
            report.collected(format!("would detach {what}{layers}"));
            return Ok(());
        }
        match orphans::collect(host, &mut stack) {
            Ok(orphans::Collected::All) => report.collected(format!("detached {what}{layers}")),
            Ok(orphans::Collected::Stopped(why)) => {
                let open = orphans::layers_open(&stack)
                    .map(|l| format!("; its layers still open: {l}"))
                    .unwrap_or_default();
                report.unrepairable(format!("{what} is kept: {why}{open}"));
            }
            // A layer that cannot be closed keeps the stack; the round goes on.
            Err(err) if !stack.open.is_empty() => {
                report.unrepairable(format!("{what} is kept: closing its layers failed: {err}"))
            }
            Err(err) => return Err(err),
        }
        Ok(())
    }

    /// The pool's images by file identity, and the identities the stage records hold (the file
    /// that was staged, even if it is gone from the pool since).
    fn known_images(&self) -> Result<(HashMap<FileId, PathBuf>, HashMap<FileId, VolumeId>)> {
        let layout = self.pool.layout();
        let host = self.host();
        let mut pool_files = HashMap::new();
        for path in list(host, &layout.volumes_dir())? {
            if let Some(file) = host.file_id(&path)? {
                pool_files.insert(file, path);
            }
        }
        let mut recorded = HashMap::new();
        for dir in list(host, &layout.node_dir())? {
            if let (Some(id), Ok(record)) = (id_prefix(&dir), records::load(host, &dir)) {
                if let Some(file) = record.staged.and_then(|s| s.image) {
                    recorded.insert(file, id);
                }
            }
        }
        Ok((pool_files, recorded))
    }

    /// Images without metadata, stale temp files and node records of unknown volumes.
    fn collect_orphan_files(
        &self,
        policy: GcPolicy,
        skipper: &Skipper<'_>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let layout = self.pool.layout().clone();
        let host = layout.host();
        let view = KernelView::read(host)?;
        for dir in [
            layout.volumes_dir(),
            layout.snapshots_dir(),
            layout.node_dir(),
        ] {
            for path in list(host, &dir)? {
                let Some(id) = id_prefix::<OfVolume>(&path) else {
                    continue;
                };
                // The same name read as a snapshot's id, for the files of `snapshots/`.
                let snapshot = id_prefix::<OfSnapshot>(&path);
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let what = if name.ends_with(files::TEMP_SUFFIX) {
                    "stale temp file"
                } else if dir == layout.volumes_dir()
                    && name.ends_with(".img")
                    && !self.committed(&id)
                {
                    "image without metadata"
                } else if dir == layout.snapshots_dir()
                    && name.ends_with(".img")
                    && snapshot.is_some_and(|s| !exists(host, &layout.snapshot_meta(&s)))
                {
                    "snapshot image without metadata"
                } else if dir == layout.node_dir()
                    && !self.committed(&id)
                    && inuse::image_uses(&view, &layout.image(&id))?.is_empty()
                {
                    "node record of an unknown volume"
                } else {
                    continue;
                };
                let in_use =
                    dir != layout.node_dir() && !inuse::image_uses(&view, &path)?.is_empty();
                if in_use || !older_than(host, &path, policy.min_age) {
                    continue;
                }
                let held = if dir == layout.snapshots_dir() {
                    snapshot
                        .and_then(|s| skipper.snapshot(&s))
                        .map(ObjectGuard::Snapshot)
                } else {
                    skipper.volume(&id).map(ObjectGuard::Volume)
                };
                let Some(_held) = held else { continue };
                if policy.dry_run {
                    report.collected(format!("would remove {what} {}", path.display()));
                } else {
                    if is_dir(host, &path) {
                        crate::volume::records::clear(host, &path)?;
                    } else {
                        host.remove_durably(&path)?;
                    }
                    crate::faults::crash_point("gc.removed");
                    report.collected(format!("removed {what} {}", path.display()));
                }
            }
        }
        Ok(())
    }
}

/// Whether `path` was last modified at least `age` ago.
fn older_than(host: &dyn Host, path: &Path, age: Duration) -> bool {
    if age.is_zero() {
        return true;
    }
    host.node_followed(path)
        .ok()
        .flatten()
        .and_then(|n| n.modified)
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|elapsed| elapsed >= age)
}

/// The pool image a device still holds although it was deleted: the kernel renders its path
/// with " (deleted)", in the pool directory, on the pool's file system.
fn deleted_pool_image(
    attached: &crate::host::loopdev::Attached,
    volumes_dir: &std::path::Path,
    pool_dev: Option<u64>,
) -> Option<PathBuf> {
    let file = attached.backing?;
    attached
        .shown
        .to_str()
        .and_then(|s| s.strip_suffix(" (deleted)"))
        .map(PathBuf::from)
        .filter(|p| p.parent() == Some(volumes_dir) && Some(file.dev) == pool_dev)
}
