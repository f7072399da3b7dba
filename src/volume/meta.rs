//! What the store persists: the metadata of volumes and snapshots (each file the commit point of
//! its object), how it is read back, and what CreateVolume asks for.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Corruption, Error, Mismatch, Result};
use crate::host::os::Host;
use crate::volume::id::{SnapshotId, VolumeId};
use crate::volume::params::{AccessMode, CapacityRange, VolumeKind, VolumeParams};
use crate::volume::pool::Index;

/// Metadata format version written by this build.
pub(crate) const META_VERSION: u32 = 1;

/// Everything about a volume that the kernel cannot tell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub version: u32,
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    pub kind: VolumeKind,
    /// The StorageClass parameters the volume keeps (`provisioning`, `claim`), flattened into
    /// the top level of the JSON.
    #[serde(flatten)]
    pub params: VolumeParams,
    pub access_modes: Vec<AccessMode>,
    pub created_unix: u64,
    /// Set once the driver created the file system: from then on a volume that probes blank is
    /// damaged, and is never formatted again.
    #[serde(default)]
    pub formatted: bool,
    /// The snapshot or volume this volume was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<ContentSource>,
    /// The volume is larger than the file system copied into it: the next stage grows it.
    #[serde(default)]
    pub pending_fs_grow: bool,
}

/// Where a volume's initial content came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

/// A point-in-time copy of a volume's backing file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub version: u32,
    pub id: SnapshotId,
    pub name: String,
    pub source_volume_id: VolumeId,
    /// The source volume's size when the snapshot was taken: the smallest volume it restores to.
    pub size_bytes: u64,
    pub kind: VolumeKind,
    pub formatted: bool,
    pub created_unix_nanos: u128,
    /// The source's file system had not been grown to the source's size yet: copies of this
    /// snapshot grow it at their first stage.
    #[serde(default)]
    pub pending_fs_grow: bool,
}

impl Committed for SnapshotMeta {
    const WHAT: &'static str = "snapshot";
    type Id = SnapshotId;
    fn id(&self) -> SnapshotId {
        self.id
    }
    fn unreadable_in(index: &mut Index) -> &mut BTreeMap<SnapshotId, Unreadable> {
        &mut index.unreadable_snapshots
    }
    fn version(&self) -> u32 {
        self.version
    }
}

/// What a new object's metadata takes from its content source (the copy itself, and the guards
/// that keep the source stable meanwhile, are the domain's: see `content::SourceCopy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceFacts {
    pub content: ContentSource,
    pub size_bytes: u64,
    pub kind: VolumeKind,
    pub formatted: bool,
    /// The source's file system is smaller than the source (a grow is still pending there).
    pub pending_fs_grow: bool,
}

/// What CreateVolume asks for, typed.
#[derive(Clone, Debug)]
pub struct NewVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub kind: VolumeKind,
    pub access_modes: Vec<AccessMode>,
    /// The StorageClass parameters the volume keeps (compared whole on a retry).
    pub params: VolumeParams,
    /// `Some` to fill the new volume from a snapshot or another volume.
    pub source: Option<ContentSource>,
}

/// Whether CreateVolume made the volume or found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    New,
    AlreadyExisted,
}

/// Metadata that exists but cannot be read (torn, emptied, of an unknown version). Its object
/// is not served, but it is never taken for absent: its files and node records are kept, and
/// its name, when it can be salvaged, stays taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub what: &'static str,
    pub path: PathBuf,
    pub why: String,
    /// The `name` field, when the file still parses as JSON (e.g. an unknown version).
    pub name: Option<String>,
}

/// What startup recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub volumes: usize,
    pub removed_partial_images: Vec<PathBuf>,
    pub removed_temp_files: Vec<PathBuf>,
    pub removed_node_records: Vec<PathBuf>,
    /// Metadata that could not be read: left untouched, its volume not served.
    pub unreadable: Vec<PathBuf>,
}

/// Metadata whose file is the commit point of an object in a directory of `<id>.img` and
/// `<id>.json` pairs (volumes, snapshots).
pub(crate) trait Committed: serde::de::DeserializeOwned {
    const WHAT: &'static str;
    /// The id type of the object (`VolumeId`, `SnapshotId`): the file name's stem.
    type Id: Copy + Ord + Display;
    fn id(&self) -> Self::Id;
    fn version(&self) -> u32;
    /// The index's map of this kind's unreadable metadata.
    fn unreadable_in(index: &mut Index) -> &mut BTreeMap<Self::Id, Unreadable>;
}

impl Committed for VolumeMeta {
    const WHAT: &'static str = "volume";
    type Id = VolumeId;
    fn id(&self) -> VolumeId {
        self.id
    }
    fn unreadable_in(index: &mut Index) -> &mut BTreeMap<VolumeId, Unreadable> {
        &mut index.unreadable
    }
    fn version(&self) -> u32 {
        self.version
    }
}

pub(crate) fn load_meta<M: Committed>(host: &dyn Host, path: &Path, stem: &str) -> Result<M> {
    let text = host.read_file(path)?.ok_or_else(|| {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Error::io("read", path, missing)
    })?;
    let meta: M = serde_json::from_slice(&text).map_err(|e| Error::unparsable(path, e))?;
    let corrupt = |reason| Error::CorruptRecord {
        path: path.to_path_buf(),
        reason,
    };
    if meta.version() != META_VERSION {
        return Err(corrupt(Corruption::Version {
            what: "metadata",
            found: meta.version(),
            expected: META_VERSION,
        }));
    }
    if meta.id().to_string() != stem {
        return Err(corrupt(Corruption::IdMismatch {
            what: M::WHAT,
            id: meta.id().to_string(),
        }));
    }
    Ok(meta)
}

/// The `name` of metadata that no longer deserialises as this build's format but still parses
/// as JSON (e.g. written by a newer version).
pub(crate) fn salvage_name(host: &dyn Host, path: &Path) -> Option<String> {
    let bytes = host.read_file(path).ok()??;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("name")?.as_str().map(str::to_string)
}

/// Same name, compatible arguments → the existing volume; otherwise ALREADY_EXISTS saying why.
pub(crate) fn check_compatible(existing: &VolumeMeta, req: &NewVolume) -> Result<()> {
    req.capacity.validate()?;
    let mismatch = if !req.capacity.admits(existing.capacity_bytes) {
        Some(Mismatch::Capacity {
            size: existing.capacity_bytes,
            required: req.capacity.required_bytes,
            limit: req.capacity.limit_bytes,
        })
    } else if existing.kind != req.kind {
        Some(Mismatch::Kind {
            existing: existing.kind,
            requested: req.kind,
        })
    } else if existing.content_source != req.source {
        Some(Mismatch::ContentSource {
            existing: existing.content_source,
            requested: req.source,
        })
    } else {
        existing.params.conflict(&req.params)
    };
    match mismatch {
        Some(mismatch) => Err(Error::VolumeNameTaken {
            name: existing.name.clone(),
            volume: existing.id,
            mismatch,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::layout::Layout;
    use crate::volume::pool::Pool;

    /// A snapshot, and a volume restored from it, as the driver wrote them while snapshot ids
    /// were `VolumeId`s: both load (the id text is the same), the volume's source is the
    /// snapshot's `SnapshotId`, and both are written back with the same keys and values.
    #[test]
    fn metadata_written_before_snapshot_ids_had_their_own_type_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let host = std::sync::Arc::new(crate::host::fake::FakeHost::new(&root));
        let layout = Layout::prepare(&root.join("state"), host).unwrap();
        let (snap, vol, src) = (
            "0b5c1e9a-3f4d-4c2b-9a57-1d2e3f405162",
            "fc64749b-889e-46e8-aa8b-5a9c943168c6",
            "5d1f0e2a-7b3c-4d4e-8f5a-6b7c8d9e0f10",
        );
        let snapshot = format!(
            r#"{{"version":1,"id":"{snap}","name":"snap-a","source_volume_id":"{src}","size_bytes":67108864,"kind":"block","formatted":false,"created_unix_nanos":5,"pending_fs_grow":false}}"#
        );
        let volume = format!(
            r#"{{"version":1,"id":"{vol}","name":"pvc-1","capacity_bytes":67108864,"kind":"block","provisioning":"thin","access_modes":["single_node_writer"],"created_unix":5,"formatted":false,"claim":{{}},"content_source":{{"snapshot":"{snap}"}},"pending_fs_grow":false}}"#
        );
        let snapshots = layout.snapshots_dir();
        std::fs::write(snapshots.join(format!("{snap}.json")), &snapshot).unwrap();
        std::fs::write(snapshots.join(format!("{snap}.img")), b"").unwrap();
        std::fs::write(layout.volumes_dir().join(format!("{vol}.json")), &volume).unwrap();
        std::fs::write(layout.volumes_dir().join(format!("{vol}.img")), b"").unwrap();

        let (pool, recovery) = Pool::open(layout).unwrap();
        assert!(recovery.unreadable.is_empty(), "{recovery:?}");
        assert!(recovery.removed_partial_images.is_empty(), "{recovery:?}");
        let snap_id = SnapshotId::parse(snap).unwrap();
        let loaded = pool.require_snapshot(&snap_id).unwrap();
        assert_eq!(loaded.source_volume_id, VolumeId::parse(src).unwrap());
        let restored = pool.require(&VolumeId::parse(vol).unwrap()).unwrap();
        assert_eq!(
            restored.content_source,
            Some(ContentSource::Snapshot(snap_id))
        );
        let same = |written: &str, again: serde_json::Value| {
            assert_eq!(
                again,
                serde_json::from_str::<serde_json::Value>(written).unwrap()
            )
        };
        same(&snapshot, serde_json::to_value(&*loaded).unwrap());
        same(&volume, serde_json::to_value(&*restored).unwrap());
    }
}
