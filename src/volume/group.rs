//! Volume group snapshots (CSI GroupController): several volumes' snapshots taken at one
//! instant, committed as one.
//!
//! CreateVolumeGroupSnapshot, once the door holds every member's volume guard (taken in id
//! order) and a guard for each new snapshot id:
//! 1. the group's `creating` record names every snapshot it will make (see `groups.rs`);
//! 2. on a pool without reflink, every member is copied while its application writes on;
//! 3. every member's mounted file system is frozen (each with its crash-safe freeze intent,
//!    `freeze.rs`), then every member is reflinked (or the blocks written since its pre-copy
//!    copied again), then all are thawed: that window is the group's one instant. A raw block
//!    member has no file system to freeze; its copy is taken inside the same window;
//! 4. each member's snapshot metadata is committed, then the record becomes `committed`.
//!
//! Any failure undoes what was made and thaws what was frozen; a crash leaves a `creating`
//! record that startup recovery rolls back, and freeze intents that the thaw-abandoned
//! machinery thaws. So the group exists whole or not at all, and nothing stays frozen.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::host::os::Host;
use crate::volume::freeze::{FreezeTarget, Recorded, DEFAULT_FREEZE_LIMIT};
use crate::volume::groups::{new_record, GroupMeta, GroupState, Groups, Member};
use crate::volume::id::VolumeId;
use crate::volume::locks::{SnapshotGuard, VolumeGuard};
use crate::volume::meta::{SnapshotMeta, VolumeMeta, META_VERSION};
use crate::volume::pool::Pool;

/// A member's image and its snapshot's, `len` bytes.
struct MemberImage {
    src: PathBuf,
    dst: PathBuf,
    len: u64,
}

/// What the copy of a member holds before the freeze.
enum Before {
    /// A copy and a catch-up pass (a pool without reflink): compared again while frozen.
    Copied,
    /// A reflink (with its extent map, when the pool can tell): the ranges changed since are
    /// cloned again while frozen.
    Reflinked(Option<Vec<crate::host::extents::Extent>>),
}

/// One member of a group being made: its volume, held stable, and its new snapshot's id.
pub(crate) struct GroupMember {
    pub(crate) volume: VolumeGuard,
    pub(crate) meta: Arc<VolumeMeta>,
    /// `Some` when the volume's file system is mounted (it takes writes until frozen).
    pub(crate) freeze: Option<FreezeTarget>,
    pub(crate) snapshot: SnapshotGuard,
}

/// How long the members' file systems were frozen, for the logs and the benchmark.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupTiming {
    pub frozen_ms: u64,
}

impl Pool {
    /// Makes group `id` named `name` of `members` (see the module doc for the steps).
    pub(crate) fn create_group(
        &self,
        groups: &Groups,
        id: VolumeId,
        name: &str,
        members: &[GroupMember],
    ) -> Result<Arc<GroupMeta>> {
        let list = members
            .iter()
            .map(|m| Member {
                volume: *m.volume.id(),
                snapshot: *m.snapshot.id(),
            })
            .collect();
        let mut record = new_record(id, name, list);
        groups.record(&record)?;
        crate::faults::crash_point("group.intent_recorded");
        let made = self
            .copy_members(members)
            .and_then(|(instant, timing)| {
                tracing::info!(
                    group_snapshot.id = %id,
                    frozen_ms = timing.frozen_ms,
                    members = members.len(),
                    "group members copied at one instant"
                );
                record.created_unix_nanos = instant;
                self.commit_members(name, members, instant)
            })
            .and_then(|()| {
                crate::faults::crash_point("group.members_committed");
                record.state = GroupState::Committed;
                groups.record(&record)
            });
        match made {
            Ok(committed) => {
                crate::faults::crash_point("group.committed");
                Ok(committed)
            }
            Err(err) => {
                // Not committed: nothing of the group may stay.
                let snapshots: Vec<&SnapshotGuard> = members.iter().map(|m| &m.snapshot).collect();
                if let Err(undo) = self.remove_members(&snapshots) {
                    tracing::error!(error = %undo, "could not remove the members of a failed group snapshot; the next start does");
                    return Err(err);
                }
                let _ = groups.remove(&id);
                Err(err)
            }
        }
    }

    /// Copies every member into its snapshot image at one instant: all file systems frozen
    /// together, for as short a time as the pool allows. Returns that instant.
    fn copy_members(&self, members: &[GroupMember]) -> Result<(u128, GroupTiming)> {
        let host = self.host();
        let images: Vec<MemberImage> = members
            .iter()
            .map(|m| MemberImage {
                src: self.layout.image(m.volume.id()),
                dst: self.layout.snapshot_image(m.snapshot.id()),
                len: m.meta.capacity_bytes,
            })
            .collect();
        let before = self.precopy(&images)?;
        let targets: Vec<&FreezeTarget> =
            members.iter().filter_map(|m| m.freeze.as_ref()).collect();
        let limit = targets.first().map_or(DEFAULT_FREEZE_LIMIT, |t| t.limit());
        // Every intent is recorded (and every file system synced) before the first freeze.
        let mut recorded = FreezeTarget::record_all(&targets)?.into_iter();
        let recorded: Vec<Option<Recorded>> = members
            .iter()
            .map(|m| m.freeze.as_ref().and_then(|_| recorded.next()))
            .collect();
        let started = Instant::now();
        let instant = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let work: Vec<(&MemberImage, &Before)> = images.iter().zip(&before).collect();
        let copy = |m: &GroupMember, (image, before): &(&MemberImage, &Before)| {
            copy_frozen(host, m, image, before, (started, limit))
        };
        let copied = in_window(members, &work, recorded, copy);
        let timing = GroupTiming {
            frozen_ms: started.elapsed().as_millis() as u64,
        };
        copied?;
        for image in &images {
            host.sync_file(&image.dst)?;
        }
        host.sync_file(&self.layout.snapshots_dir())?;
        Ok((instant, timing))
    }

    /// The part of every member's copy made while its application still writes.
    fn precopy(&self, images: &[MemberImage]) -> Result<Vec<Before>> {
        let host = self.host();
        if host.reflinks(&self.layout.snapshots_dir()) {
            // Reflinked now; only what the application writes meanwhile is cloned again while
            // frozen (a whole-file reflink of a busy image takes tens of milliseconds, during
            // which its writes wait: see `host::reclone`).
            return images
                .iter()
                .map(|i| {
                    Ok(Before::Reflinked(
                        host.preclone(&i.src, &i.dst, i.len, i.len)?.base,
                    ))
                })
                .collect();
        }
        // The bulk of the copy runs while the applications write on; only what they wrote
        // meanwhile is copied again while frozen.
        for i in images {
            host.copy_image(&i.src, &i.dst, i.len, i.len)?;
        }
        crate::faults::crash_point("group.precopied");
        // A catch-up pass, still unfrozen, so the frozen one has little left to rewrite.
        for i in images {
            host.patch_image(&i.src, &i.dst, i.len, None)?;
        }
        Ok(images.iter().map(|_| Before::Copied).collect())
    }

    /// Commits each member's snapshot metadata: from here on they are ordinary snapshots.
    fn commit_members(&self, name: &str, members: &[GroupMember], instant: u128) -> Result<()> {
        for m in members {
            let meta = SnapshotMeta {
                version: META_VERSION,
                id: *m.snapshot.id(),
                name: member_name(name, m.volume.id()),
                source_volume_id: *m.volume.id(),
                size_bytes: m.meta.capacity_bytes,
                kind: m.meta.kind,
                formatted: m.meta.formatted,
                pending_fs_grow: m.meta.pending_fs_grow,
                created_unix_nanos: instant,
            };
            self.commit_snapshot_meta(meta)?;
        }
        Ok(())
    }

    fn commit_snapshot_meta(&self, meta: SnapshotMeta) -> Result<()> {
        let id = meta.id;
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| {
            crate::error::Error::Internal(format!("serialising snapshot {id}: {e}"))
        })?;
        self.host()
            .write_record(&self.layout.snapshot_meta(&id), &json)?;
        let meta = Arc::new(meta);
        let mut index = self
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        index.snapshots_by_name.insert(meta.name.clone(), id);
        index.snapshots.insert(id, meta);
        Ok(())
    }

    /// Removes the member snapshots (committed or only copied) of a group that does not exist
    /// or no longer should: a failed or interrupted create, or a delete.
    pub(crate) fn remove_members(&self, snapshots: &[&SnapshotGuard]) -> Result<()> {
        for held in snapshots {
            self.delete_snapshot(held)?;
            // An image copied but never committed has no metadata for the delete to find.
            self.host()
                .remove_durably(&self.layout.snapshot_image(held.id()))?;
        }
        Ok(())
    }

    /// DeleteVolumeGroupSnapshot: marks the group `deleting`, removes its members, then its
    /// record. The caller holds the group's and every member snapshot's guard.
    pub(crate) fn delete_group(
        &self,
        groups: &Groups,
        group: &GroupMeta,
        snapshots: &[&SnapshotGuard],
    ) -> Result<()> {
        let mut deleting = group.clone();
        deleting.state = GroupState::Deleting;
        groups.record(&deleting)?;
        crate::faults::crash_point("delete_group.marked");
        self.remove_members(snapshots)?;
        crate::faults::crash_point("delete_group.members_removed");
        groups.remove(&group.id)
    }
}

/// A member snapshot's name: unique per group and volume, and not one a CO would choose for a
/// CreateSnapshot (the CO names group members only through the group).
pub(crate) fn member_name(group: &str, volume: &VolumeId) -> String {
    format!("group-snapshot:{volume}:{group}")
}

/// One thread per member: it freezes its file system, copies its image (the file system holds
/// still from its freeze on, so the copy is of that instant), waits until every member is
/// frozen (the group's instant lies after the last freeze and before the first thaw) and
/// thaws. So an application waits for the slowest freeze or its own copy, not for the sum of
/// every member's (an ext4 freeze flushes its journal; a reflink of a busy image takes 15-20 ms
/// on an xfs pool). A member without a file system (raw block) has nothing to freeze: it is
/// copied meanwhile. Nothing is flushed while frozen: the copies are made durable after the
/// thaw, before the group's commit.
fn in_window<W: Sync>(
    members: &[GroupMember],
    images: &[W],
    recorded: Vec<Option<Recorded>>,
    copy: impl Fn(&GroupMember, &W) -> Result<()> + Sync,
) -> Result<()> {
    let window = Window::new(recorded.iter().filter(|r| r.is_some()).count());
    std::thread::scope(|scope| {
        let running: Vec<_> = members
            .iter()
            .zip(images)
            .zip(recorded)
            .map(|((m, image), recorded)| {
                let (window, copy) = (&window, &copy);
                scope.spawn(move || match recorded {
                    None => copy(m, image),
                    Some(recorded) => window.frozen_copy(recorded, || copy(m, image)),
                })
            })
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(Error::Internal("a group copy thread panicked".to_string()))
                })
            })
            .collect::<Result<Vec<()>>>()
            .map(drop)
    })
}

/// The members' freezes of one group snapshot: no member is thawed before every member is
/// frozen, and a failed freeze thaws them all.
struct Window {
    all_frozen: std::sync::Barrier,
    failed: std::sync::atomic::AtomicBool,
}

impl Window {
    fn new(members: usize) -> Self {
        Window {
            all_frozen: std::sync::Barrier::new(members),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Freezes, copies (unless a freeze failed), waits for every member's freeze, thaws.
    fn frozen_copy(&self, recorded: Recorded, copy: impl FnOnce() -> Result<()>) -> Result<()> {
        use std::sync::atomic::Ordering;
        let frozen = recorded.freeze();
        if frozen.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        let copied = match &frozen {
            // A panic must still reach the barrier below, or every other member would stay
            // frozen waiting for this one.
            Ok(_) if !self.failed.load(Ordering::SeqCst) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(copy)).unwrap_or_else(|_| {
                    Err(Error::Internal(
                        "a group member's copy panicked".to_string(),
                    ))
                })
            }
            _ => Ok(()),
        };
        self.all_frozen.wait();
        if self.failed.load(Ordering::SeqCst) {
            // The group cannot be whole: every member thaws (the drop), and the failed freeze's
            // error is the call's (its copy and the others' are removed by the caller).
            return frozen.map(drop);
        }
        crate::faults::crash_point("group.frozen");
        drop(frozen); // thaw this member
        copied
    }
}

/// Copies a frozen member's image into its snapshot image: where it was reflinked, the ranges
/// written since are cloned again; elsewhere the last comparison after the pre-copy and
/// catch-up, bounded by the freeze limit like a single snapshot's (see `SourceCopy::copy_to`).
fn copy_frozen(
    host: &dyn Host,
    m: &GroupMember,
    MemberImage { src, dst, len }: &MemberImage,
    before: &Before,
    (started, limit): (Instant, std::time::Duration),
) -> Result<()> {
    if let Before::Reflinked(base) = before {
        return host
            .reclone_changed(src, dst, *len, base.as_deref())
            .map(drop);
    }
    let patched = host.patch_image(src, dst, *len, Some(started + limit))?;
    if !patched.finished {
        return Err(Error::FreezeLimit {
            volume: *m.volume.id(),
            limit,
            compared: patched.compared,
            data: *len,
        });
    }
    Ok(())
}
