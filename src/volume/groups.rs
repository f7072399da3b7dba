//! The store of volume group snapshots: one record per group, `<state-dir>/groups/<id>.json`.
//!
//! On-disk contract: a record names the group, its CSI name, its members (volume id → snapshot
//! id) and its state. It is written crash-safely through the host (temp file, fsync, rename,
//! fsync the directory), and it is the commit point of the whole group:
//! - `creating` is written *before* any member's image exists, so a driver killed at any
//!   instant of a CreateVolumeGroupSnapshot leaves a record naming every snapshot it may have
//!   made; startup recovery removes those snapshots and the record (the group never existed).
//! - `committed` is written once every member's snapshot is committed: from then on the group
//!   exists, whole.
//! - `deleting` is written before the first member is removed, so a delete interrupted half-way
//!   is finished by startup recovery instead of leaving members that belong to no group.
//!
//! The member snapshots are ordinary snapshots of the pool (`snapshots/<id>.{img,json}`); only
//! their membership lives here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Corruption, Error, Result};
use crate::host::files;
use crate::volume::id::{SnapshotId, VolumeId};
use crate::volume::layout::Layout;

const GROUP_VERSION: u32 = 1;

/// Where a group's record says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupState {
    Creating,
    Committed,
    Deleting,
}

/// One member of a group: the volume and the snapshot taken of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub volume: VolumeId,
    pub snapshot: SnapshotId,
}

/// A volume group snapshot's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    pub version: u32,
    pub id: VolumeId,
    pub name: String,
    pub state: GroupState,
    /// In volume id order.
    pub members: Vec<Member>,
    /// The instant every member was taken at (all file systems frozen).
    pub created_unix_nanos: u128,
}

impl GroupMeta {
    /// The member volumes, in id order.
    pub fn volumes(&self) -> Vec<VolumeId> {
        self.members.iter().map(|m| m.volume).collect()
    }

    /// The member snapshots.
    pub fn snapshots(&self) -> BTreeSet<SnapshotId> {
        self.members.iter().map(|m| m.snapshot).collect()
    }
}

#[derive(Default)]
struct GroupIndex {
    by_id: BTreeMap<VolumeId, Arc<GroupMeta>>,
    by_name: HashMap<String, VolumeId>,
    /// Member snapshot → its group.
    by_snapshot: HashMap<SnapshotId, VolumeId>,
}

impl GroupIndex {
    fn insert(&mut self, meta: Arc<GroupMeta>) {
        self.by_name.insert(meta.name.clone(), meta.id);
        for m in &meta.members {
            self.by_snapshot.insert(m.snapshot, meta.id);
        }
        self.by_id.insert(meta.id, meta);
    }

    fn remove(&mut self, id: &VolumeId) {
        if let Some(meta) = self.by_id.remove(id) {
            if self.by_name.get(&meta.name) == Some(id) {
                self.by_name.remove(&meta.name);
            }
            for m in &meta.members {
                self.by_snapshot.remove(&m.snapshot);
            }
        }
    }
}

/// The group records, indexed. Takes no guard: the door holds them.
pub struct Groups {
    layout: Layout,
    index: RwLock<GroupIndex>,
}

/// What opening the store found that a crash left unfinished: groups being created (to roll
/// back) or deleted (to finish). Both mean: remove the members, then the record.
pub struct Unfinished(pub Vec<GroupMeta>);

fn groups_dir(layout: &Layout) -> PathBuf {
    layout.root().join("groups")
}

fn record_path(layout: &Layout, id: &VolumeId) -> PathBuf {
    groups_dir(layout).join(format!("{id}.json"))
}

impl Groups {
    /// Loads every record. Committed groups are served; the others are returned for recovery.
    /// `clean` removes the temp files of record writes that did not finish. A record that
    /// cannot be read fails the start (like unreadable metadata, it is never taken for absent:
    /// its members would otherwise look like ordinary snapshots).
    pub fn open(layout: Layout, clean: bool) -> Result<(Self, Unfinished)> {
        let host = layout.host();
        let mut index = GroupIndex::default();
        let mut unfinished = Vec::new();
        for path in host.list_dir(&groups_dir(&layout))?.unwrap_or_default() {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(files::TEMP_SUFFIX) {
                if clean {
                    host.remove_durably(&path)?;
                }
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let meta = read_record(&layout, &path)?;
            match meta.state {
                GroupState::Committed => index.insert(Arc::new(meta)),
                GroupState::Creating | GroupState::Deleting => unfinished.push(meta),
            }
        }
        let groups = Groups {
            layout,
            index: RwLock::new(index),
        };
        Ok((groups, Unfinished(unfinished)))
    }

    /// The group, when committed (or being deleted by a delete that failed half-way).
    pub fn get(&self, id: &VolumeId) -> Option<Arc<GroupMeta>> {
        self.read().by_id.get(id).cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<GroupMeta>> {
        let index = self.read();
        index
            .by_name
            .get(name)
            .and_then(|id| index.by_id.get(id))
            .cloned()
    }

    /// The group snapshot `snapshot` is a member of.
    pub fn group_of(&self, snapshot: &SnapshotId) -> Option<VolumeId> {
        self.read().by_snapshot.get(snapshot).copied()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the record durably; a `creating` one stays out of the index (the group does not
    /// exist yet), any other replaces the group's entry.
    pub fn record(&self, meta: &GroupMeta) -> Result<Arc<GroupMeta>> {
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| Error::Internal(format!("serialising group {}: {e}", meta.id)))?;
        self.layout
            .host()
            .write_record(&record_path(&self.layout, &meta.id), &json)?;
        let meta = Arc::new(meta.clone());
        if meta.state != GroupState::Creating {
            let mut index = self.write();
            index.remove(&meta.id);
            index.insert(Arc::clone(&meta));
        }
        Ok(meta)
    }

    /// Removes the record durably, and the group from the index.
    pub fn remove(&self, id: &VolumeId) -> Result<()> {
        self.layout
            .host()
            .remove_durably(&record_path(&self.layout, id))?;
        self.write().remove(id);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, GroupIndex> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, GroupIndex> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn read_record(layout: &Layout, path: &std::path::Path) -> Result<GroupMeta> {
    let text = layout.host().read_file(path)?.ok_or_else(|| {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Error::io("read", path, missing)
    })?;
    let meta: GroupMeta = serde_json::from_slice(&text).map_err(|e| Error::unparsable(path, e))?;
    let corrupt = |reason| Error::CorruptRecord {
        path: path.to_path_buf(),
        reason,
    };
    if meta.version != GROUP_VERSION {
        return Err(corrupt(Corruption::Version {
            what: "group snapshot record",
            found: meta.version,
            expected: GROUP_VERSION,
        }));
    }
    if path.file_stem().and_then(|s| s.to_str()) != Some(&meta.id.to_string()) {
        return Err(corrupt(Corruption::IdMismatch {
            what: "group snapshot",
            id: meta.id.to_string(),
        }));
    }
    Ok(meta)
}

/// A record in the format this build writes (for the group use cases).
pub(crate) fn new_record(id: VolumeId, name: &str, members: Vec<Member>) -> GroupMeta {
    GroupMeta {
        version: GROUP_VERSION,
        id,
        name: name.to_string(),
        state: GroupState::Creating,
        members,
        created_unix_nanos: 0,
    }
}
