//! The door's snapshot use cases: single snapshots, group snapshots (see `group.rs`) and
//! changed-block tracking (see `metadata.rs`). Part of the door: operation guards are taken
//! here as in `volumes.rs`, and nowhere else.

use super::*;

/// The operations named in a refusal.
const CREATE_GROUP: &str = "CreateVolumeGroupSnapshot";
const DELETE_GROUP: &str = "DeleteVolumeGroupSnapshot";

impl Volumes {
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
        let _name = self
            .locks
            .name(LockKey::SnapshotName(name.to_string()), "CreateSnapshot")?;
        if let Some(existing) = self.store.existing_snapshot(name, source)? {
            return Ok((existing, Created::AlreadyExisted));
        }
        let copy = self.stable_source(&ContentSource::Volume(*source), "CreateSnapshot")?;
        let new = self
            .locks
            .snapshot(&SnapshotId::new_random(), "CreateSnapshot")?;
        let pending = self.store.reserve_snapshot(&new, name, source, &copy.facts);
        content::copy_snapshot(self.host(), &pending, copy)?;
        let meta = self.store.commit_snapshot(pending)?;
        Ok((meta, Created::New))
    }

    /// DeleteSnapshot: OK for a snapshot that does not exist; FAILED_PRECONDITION for a member
    /// of a group snapshot (it goes with its group); ABORTED while anything reads it (a
    /// restore, GetMetadataAllocated, GetMetadataDelta).
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let held = self.locks.snapshot(id, "DeleteSnapshot")?;
        if let Some(group) = self.groups.group_of(id) {
            return Err(Error::GroupMember {
                snapshot: *id,
                group,
            });
        }
        self.store.delete_snapshot(&held)
    }

    /// The snapshot, or NOT_FOUND.
    pub fn snapshot(&self, id: &SnapshotId) -> Result<Arc<SnapshotMeta>> {
        self.store.require_snapshot(id)
    }

    /// ListSnapshots: snapshots in id order after `after` matching `filter`, at most `max`.
    pub fn list_snapshots(
        &self,
        after: Option<SnapshotId>,
        max: usize,
        filter: impl Fn(&SnapshotMeta) -> bool,
    ) -> (Vec<Arc<SnapshotMeta>>, bool) {
        self.store.list_snapshots(after, max, filter)
    }

    /// A restore's or clone's source (or a snapshot's), held stable for its copy by `op`.
    ///
    /// A copy only reads its source, so it takes a reader's guard: restores from one snapshot,
    /// and clones and snapshots of one volume, run at the same time, and whatever changes the
    /// source (deleting it; staging, expanding or deleting a volume) is ABORTED meanwhile, as
    /// is a copy while such a change runs. A volume whose file system is mounted is frozen for
    /// its copy, which two copies cannot do at once: that reader also takes the volume's
    /// freeze, and a second copy of the same live volume is ABORTED until the first is done.
    /// (Under the reader's guard nobody stages or unstages the volume, so whether it is live
    /// cannot change between this look and the copy.)
    pub(super) fn stable_source(
        &self,
        source: &ContentSource,
        op: &'static str,
    ) -> Result<SourceCopy> {
        match source {
            ContentSource::Snapshot(id) => {
                let held = self.locks.snapshot_read(id, op)?;
                let snap = self.store.require_snapshot(id)?;
                Ok(SourceCopy {
                    facts: SourceFacts {
                        content: *source,
                        size_bytes: snap.size_bytes,
                        kind: snap.kind,
                        formatted: snap.formatted,
                        pending_fs_grow: snap.pending_fs_grow,
                    },
                    image: self.store.layout().snapshot_image(id),
                    guard: ObjectGuard::SnapshotRead(held),
                    freeze: None,
                })
            }
            ContentSource::Volume(id) => {
                let held = self.locks.volume_read(id, op)?;
                let (meta, freeze) = self.node.stable_volume(&held)?;
                let freezing = match freeze {
                    Some(_) => Some(self.locks.freeze(&held, op)?),
                    None => None,
                };
                Ok(SourceCopy {
                    facts: SourceFacts {
                        content: *source,
                        size_bytes: meta.capacity_bytes,
                        kind: meta.kind,
                        formatted: meta.formatted,
                        pending_fs_grow: meta.pending_fs_grow,
                    },
                    image: self.store.layout().image(id),
                    guard: ObjectGuard::VolumeRead(held, freezing),
                    freeze,
                })
            }
        }
    }

    // ---- group snapshots (see `group.rs`) ----

    /// CreateVolumeGroupSnapshot: idempotent by name (the same name for other volumes is
    /// ALREADY_EXISTS); a volume this node does not hold is NOT_FOUND naming it. Every member's
    /// guard is taken in id order before anything is frozen, and held to the commit.
    pub fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[VolumeId],
    ) -> Result<(Arc<GroupMeta>, Created)> {
        let mut wanted = volumes.to_vec();
        wanted.sort();
        wanted.dedup();
        let _name = self
            .locks
            .name(LockKey::GroupName(name.to_string()), CREATE_GROUP)?;
        if let Some(existing) = self.groups.by_name(name) {
            if existing.volumes() != wanted {
                return Err(Error::GroupNameTaken {
                    name: name.to_string(),
                    group: existing.id,
                    of: existing.volumes(),
                    requested: wanted,
                });
            }
            return Ok((existing, Created::AlreadyExisted));
        }
        if let Some(unknown) = wanted.iter().find(|id| self.store.get(id).is_none()) {
            return Err(Error::GroupMemberNotFound {
                id: unknown.to_string(),
            });
        }
        let mut members = Vec::with_capacity(wanted.len());
        for id in &wanted {
            let volume = self.locks.volume(id, CREATE_GROUP)?;
            let (meta, freeze) = self.node.stable_volume(&volume)?;
            members.push(GroupMember {
                volume,
                meta,
                freeze,
                snapshot: self
                    .locks
                    .snapshot(&SnapshotId::new_random(), CREATE_GROUP)?,
            });
        }
        let group = VolumeId::new_random();
        let _group = self
            .locks
            .name(LockKey::Group(group.to_string()), CREATE_GROUP)?;
        let meta = self
            .store
            .create_group(&self.groups, group, name, &members)?;
        Ok((meta, Created::New))
    }

    /// DeleteVolumeGroupSnapshot: OK for a group that does not exist; `snapshot_ids` must name
    /// exactly its members (INVALID_ARGUMENT otherwise, as the spec asks of a plugin that can
    /// tell).
    pub fn delete_group_snapshot(&self, id: &VolumeId, snapshot_ids: &[SnapshotId]) -> Result<()> {
        let _group = self
            .locks
            .name(LockKey::Group(id.to_string()), DELETE_GROUP)?;
        let Some(group) = self.groups.get(id) else {
            return Ok(());
        };
        check_members(&group, snapshot_ids)?;
        let held = group
            .snapshots()
            .iter()
            .map(|s| self.locks.snapshot(s, DELETE_GROUP))
            .collect::<Result<Vec<_>>>()?;
        self.store
            .delete_group(&self.groups, &group, &held.iter().collect::<Vec<_>>())
    }

    /// GetVolumeGroupSnapshot: the group and its member snapshots; NOT_FOUND for an unknown
    /// group; `snapshot_ids` checked as for the delete.
    pub fn group_snapshot(
        &self,
        id: &VolumeId,
        snapshot_ids: &[SnapshotId],
    ) -> Result<(Arc<GroupMeta>, Vec<Arc<SnapshotMeta>>)> {
        let group = self.groups.get(id).ok_or_else(|| Error::NotFound {
            what: "group snapshot",
            id: id.to_string(),
        })?;
        check_members(&group, snapshot_ids)?;
        let members = group
            .members
            .iter()
            .map(|m| self.store.require_snapshot(&m.snapshot))
            .collect::<Result<Vec<_>>>()?;
        Ok((group, members))
    }

    /// The group snapshot, when it exists.
    pub fn group(&self, id: &VolumeId) -> Option<Arc<GroupMeta>> {
        self.groups.get(id)
    }

    /// The group snapshot `snapshot` is a member of (a Snapshot's `group_snapshot_id`).
    pub fn group_of(&self, snapshot: &SnapshotId) -> Option<VolumeId> {
        self.groups.group_of(snapshot)
    }

    /// Startup recovery of the groups a crash left half-made (rolled back) or half-deleted
    /// (finished): their member snapshots go, then their records.
    pub(super) fn recover_groups(&self, unfinished: Unfinished) -> Result<()> {
        for group in unfinished.0 {
            let held = group
                .snapshots()
                .iter()
                .map(|s| self.locks.snapshot(s, "startup recovery"))
                .collect::<Result<Vec<_>>>()?;
            self.store
                .remove_members(&held.iter().collect::<Vec<_>>())?;
            self.groups.remove(&group.id)?;
            tracing::info!(group_snapshot.id = %group.id, state = ?group.state, "removed a group snapshot a crash left unfinished");
        }
        Ok(())
    }

    // ---- changed-block tracking (SnapshotMetadata) ----

    /// GetMetadataAllocated: the allocated ranges of snapshot `id` from byte `from` on. A
    /// reader's guard of the snapshot is held while its file is read: other reads of it (more
    /// GetMetadata calls, restores) run alongside, and a DeleteSnapshot cannot race it (it is
    /// ABORTED meanwhile, and retried by the CO). The answer is a `Walk`, computed a step at a
    /// time as it is streamed, so its memory is one step's whatever the volume's size; the guard
    /// lives in it, and is released when the stream ends or its client goes away.
    pub fn metadata_allocated(&self, id: &SnapshotId, from: u64, shape: Shape) -> Result<Walk> {
        let held = self.locks.snapshot_read(id, "GetMetadataAllocated")?;
        let snap = self.store.require_snapshot(id)?;
        within_volume("starting_offset", from, snap.size_bytes)?;
        let image = self.store.layout().snapshot_image(id);
        Ok(Walk::allocated(
            self.store.layout().shared_host(),
            image,
            (snap.size_bytes, from, shape),
            Box::new(held),
        ))
    }

    /// GetMetadataDelta: the ranges of snapshot `target` that changed since snapshot `base`
    /// of the same volume, from byte `from` on (see `volume::metadata`). Both snapshots are held
    /// by readers' guards for as long as the walk lives, as for `metadata_allocated`. Snapshots
    /// of different volumes, or a base taken after the target, are INVALID_ARGUMENT (the
    /// spec's "argument value is invalid").
    pub fn metadata_delta(
        &self,
        base: &SnapshotId,
        target: &SnapshotId,
        from: u64,
        shape: Shape,
    ) -> Result<Walk> {
        // A reader's guard may be taken twice (base == target): readers share.
        let base_held = self.locks.snapshot_read(base, "GetMetadataDelta")?;
        let target_held = self.locks.snapshot_read(target, "GetMetadataDelta")?;
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
        Ok(Walk::delta(
            layout.shared_host(),
            (
                layout.snapshot_image(base),
                layout.snapshot_image(target),
                reflinks,
            ),
            (newer.size_bytes, from, shape),
            Box::new((base_held, target_held)),
        ))
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

/// `snapshot_ids` of a group call must name exactly the group's members.
fn check_members(group: &GroupMeta, snapshot_ids: &[SnapshotId]) -> Result<()> {
    let given: std::collections::BTreeSet<SnapshotId> = snapshot_ids.iter().copied().collect();
    if given == group.snapshots() && given.len() == snapshot_ids.len() {
        return Ok(());
    }
    Err(Error::invalid(
        "snapshot_ids",
        format!(
            "[{}] are not the snapshots of group snapshot {}, which are [{}]",
            crate::error::ids(snapshot_ids),
            group.id,
            crate::error::ids(&group.snapshots().into_iter().collect::<Vec<_>>())
        ),
    ))
}
