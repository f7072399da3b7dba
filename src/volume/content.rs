//! The content of new objects: a restore's, a clone's or a snapshot's copy of its source. The
//! metadata store (`pool.rs`) only decides an object and commits it; between the two, the
//! domain puts its image in place here.
//!
//! Crash-safety contract (the store's, kept across the split): the image is made and filled
//! first, then the metadata file commits it; a failure at any step removes the half-made image
//! (a crash leaves an image without metadata, which startup recovery removes).
//!
//! A copy source is made stable before it is read (`Volumes::stable_source`): a snapshot is
//! immutable, and a reader's guard keeps it from being deleted; a volume's reader's guard is
//! held (no stage, unstage, expand or delete meanwhile; other copies of it may run) and, when
//! its file system is mounted, its freeze is held alone and the file system is frozen (flushed, new writes blocked) for the last pass
//! of the copy only, and always thawed (`SourceCopy::copy_to`; the freeze is recorded so that a
//! driver killed meanwhile is undone, see `freeze.rs`). The source, and with it its guard, is
//! released as soon as its content is durable in the copy, before the commit. The copy itself
//! shares extents (reflink) where the pool file system can, and copies only data extents
//! elsewhere (see `host::files::copy_sparse`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::host::files::CopyStats;
use crate::host::os::Host;
use crate::volume::freeze::FreezeTarget;
use crate::volume::locks::ObjectGuard;
use crate::volume::pool::{ContentSource, PendingSnapshot, PendingVolume, SourceFacts};

/// A copy source prepared by the door: its image is stable (frozen or unused) for as long as
/// the guards inside are held, which is as long as this lives.
pub struct SourceCopy {
    /// What the new object's metadata takes from the source.
    pub facts: SourceFacts,
    pub image: PathBuf,
    /// Held while copying: the source's operation guard (a reader's, shared with other copies
    /// of the same source).
    pub guard: ObjectGuard,
    /// `Some` when the source is a mounted file system that takes writes until frozen (see
    /// `SourceCopy::copy_to`).
    pub(crate) freeze: Option<FreezeTarget>,
}

/// Fills the image of reserved volume `pending` (a restore or a clone) with a copy of `source`,
/// grown to the volume's size, durable. The source is released when this returns, before the
/// commit. On failure no image is left.
pub(crate) fn fill_volume(
    host: &dyn Host,
    pending: &PendingVolume<'_>,
    source: SourceCopy,
) -> Result<()> {
    let image = pending.image();
    let filled = source
        .copy_to(host, image, pending.size())
        .and_then(|stats| {
            tracing::info!(
                data_bytes = stats.data_bytes,
                extents = stats.extents,
                "copied the source"
            );
            host.grow_image(image, pending.size(), pending.allocation())
                .inspect_err(|_| {
                    let _ = host.remove_durably(image);
                })
        });
    if filled.is_ok() {
        crate::faults::crash_point(match source.facts.content {
            ContentSource::Snapshot(_) => "restore.copied",
            ContentSource::Volume(_) => "clone.copied",
        });
    }
    // The copy is durable: release the source before the metadata commit.
    drop(source);
    filled.map_err(|err| pending.no_space(err))
}

/// Copies `source` to the image of reserved snapshot `pending`, durable. The source's guard is
/// released as soon as its content is copied, before the commit. On failure no image is left.
pub(crate) fn copy_snapshot(
    host: &dyn Host,
    pending: &PendingSnapshot<'_>,
    source: SourceCopy,
) -> Result<()> {
    let stats = source.copy_to(host, pending.image(), source.facts.size_bytes)?;
    drop(source);
    crate::faults::crash_point("snapshot.copied");
    tracing::info!(snapshot.id = %pending.id(), data_bytes = stats.data_bytes, extents = stats.extents, "snapshot copied");
    Ok(())
}

impl SourceCopy {
    /// Copies the source into `dst` (new), sized `size`. A source that is not live (a snapshot,
    /// an unstaged volume) is copied as it is: its guard keeps it unchanged. A mounted file
    /// system keeps taking writes until it is frozen, and a frozen one blocks its application,
    /// so the freeze is kept short:
    /// - on a pool that shares extents (reflink: btrfs, xfs), the image is reflinked while the
    ///   application writes on, and only the ranges it wrote since are cloned again while
    ///   frozen (`reclone_live`): milliseconds whatever the size;
    /// - elsewhere the data is copied while the application writes on; a second pass, still
    ///   unfrozen, rewrites what the application changed meanwhile (and leaves both files in
    ///   the page cache); then the file system is frozen (everything it wrote is then in the
    ///   image, and nothing more is written) and a last pass rewrites the blocks of the copy
    ///   that still differ from the image (`files::patch_to_match`): afterwards the copy reads
    ///   back exactly as the frozen image, which is the point-in-time copy. Only that last
    ///   comparison runs frozen, and **never longer than the freeze limit**
    ///   (`--max-freeze-ms`): should it not finish by then, the file system is thawed, the
    ///   copy discarded and the call fails naming the remedies (`Error::FreezeLimit`). The
    ///   flush of the copy runs after the thaw.
    pub fn copy_to(&self, host: &dyn Host, dst: &Path, size: u64) -> Result<CopyStats> {
        let len = self.facts.size_bytes;
        let Some(freeze) = &self.freeze else {
            return host.copy_image(&self.image, dst, len, size);
        };
        let dir = dst.parent().unwrap_or(Path::new("/"));
        if host.reflinks(dir) {
            return self.reclone_live(host, freeze, dst, size);
        }
        let stats = host.copy_image(&self.image, dst, len, size)?;
        crate::faults::crash_point("copy.precopied");
        let patched = (|| {
            let caught_up = host.patch_image(&self.image, dst, len, None)?;
            let frozen = freeze.freeze()?;
            let started = std::time::Instant::now();
            let last = host.patch_image(&self.image, dst, len, Some(started + freeze.limit()));
            drop(frozen); // thaw before the flush
            let frozen_ms = started.elapsed().as_millis() as u64;
            let last = last?;
            if !last.finished {
                return Err(Error::FreezeLimit {
                    volume: freeze.volume(),
                    limit: freeze.limit(),
                    compared: last.compared,
                    data: caught_up.compared,
                });
            }
            host.sync_file(dst)?;
            Ok((caught_up.rewritten, last.rewritten, frozen_ms))
        })();
        match patched {
            Ok((caught_up, rewritten, frozen_ms)) => {
                tracing::info!(
                    caught_up_bytes = caught_up,
                    rewritten_bytes = rewritten,
                    frozen_ms,
                    "copied a live file system: the blocks written during the copy were \
                     copied again while it was frozen"
                );
                Ok(stats)
            }
            Err(err) => {
                let _ = host.remove_durably(dst);
                Err(err)
            }
        }
    }

    /// The copy of a live file system on a pool that shares extents: a reflink taken while the
    /// application writes, then, frozen, the ranges it wrote since cloned again (see
    /// `host::reclone`); flushed after the thaw.
    fn reclone_live(
        &self,
        host: &dyn Host,
        freeze: &FreezeTarget,
        dst: &Path,
        size: u64,
    ) -> Result<CopyStats> {
        let len = self.facts.size_bytes;
        let copied = host.preclone(&self.image, dst, len, size).and_then(|pre| {
            let frozen = freeze.freeze()?;
            let started = std::time::Instant::now();
            let recloned = host.reclone_changed(&self.image, dst, len, pre.base.as_deref());
            drop(frozen); // thaw before the flush
            let frozen_ms = started.elapsed().as_millis() as u64;
            let recloned = recloned?;
            host.sync_file(dst)?;
            host.sync_file(dst.parent().unwrap_or(Path::new("/")))?;
            tracing::info!(
                recloned_bytes = recloned.bytes,
                whole = recloned.whole,
                frozen_ms,
                "reflinked a live file system: the ranges written meanwhile were cloned again \
                 while it was frozen"
            );
            Ok(pre.stats)
        });
        copied.inspect_err(|_| {
            let _ = host.remove_durably(dst);
        })
    }
}
