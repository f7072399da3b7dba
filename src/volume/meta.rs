//! What the store persists: the metadata of volumes and snapshots (each file the commit point of
//! its object), how it is read back, and what CreateVolume asks for.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Corruption, Error, Mismatch, Result};
use crate::host::os::Host;
use crate::volume::freeze::FreezeTarget;
use crate::volume::id::VolumeId;
use crate::volume::locks::ObjectGuard;
use crate::volume::params::{AccessMode, CapacityRange, VolumeKind, VolumeParams};

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
    Snapshot(VolumeId),
    Volume(VolumeId),
}

/// A point-in-time copy of a volume's backing file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub version: u32,
    pub id: VolumeId,
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
    fn id(&self) -> VolumeId {
        self.id
    }
    fn version(&self) -> u32 {
        self.version
    }
}

/// A copy source prepared by the caller: its image is stable (frozen or unused) for as long
/// as the caller holds the guards inside.
pub struct SourceCopy {
    pub image: PathBuf,
    pub size_bytes: u64,
    pub kind: VolumeKind,
    pub formatted: bool,
    /// The source's file system is smaller than the source (a grow is still pending there).
    pub pending_fs_grow: bool,
    pub content: ContentSource,
    /// Held while copying: the source's operation guard.
    pub guard: ObjectGuard,
    /// `Some` when the source is a mounted file system that takes writes until frozen (see
    /// `SourceCopy::copy_to`).
    pub(crate) freeze: Option<FreezeTarget>,
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
    fn id(&self) -> VolumeId;
    fn version(&self) -> u32;
}

impl Committed for VolumeMeta {
    const WHAT: &'static str = "volume";
    fn id(&self) -> VolumeId {
        self.id
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
            id: meta.id(),
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
