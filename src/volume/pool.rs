//! The pool: one sparse (or fully allocated) backing file per volume plus its metadata, in the
//! state dir.
//!
//! On-disk contract (`<state-dir>` is canonicalised at start):
//! - `volumes/<id>.img`  the backing file the loop device is attached to;
//! - `volumes/<id>.json` the volume's metadata (name, size, kind, provisioning), written
//!   crash-safely. **The metadata file is the commit point**: CreateVolume makes the image
//!   durable first and then the metadata; DeleteVolume removes the metadata first and then the
//!   image. So after a crash at any instant, an image without metadata is a half-made or
//!   half-deleted volume and startup recovery removes it; a volume with metadata is complete.
//! - `node/<id>.json`    what the CO asked this node to stage and publish (see `node.rs`).
//! - `*.tmp`             a crash-safe write that did not finish; removed at start.
//!
//! Nothing the kernel knows (which loop device backs which image, what is mounted where) is
//! stored here: it is read from sysfs and mountinfo when needed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{shown, Error, Result};
use crate::host::files::{self, Allocation, Usage};
use crate::host::loopdev;
use crate::volume::id::VolumeId;
use crate::volume::locks::{LockKey, OperationGuard, OperationLocks};
use crate::volume::params::{AccessMode, CapacityRange, ClaimRef, Provisioning, VolumeKind};

/// Metadata format version written by this build.
const META_VERSION: u32 = 1;

/// Where everything lives under the state dir.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Creates the directories if needed and canonicalises the root (the kernel reports
    /// canonical backing-file paths, which we compare against).
    pub fn prepare(state_dir: &Path) -> Result<Self> {
        for dir in [
            state_dir.to_path_buf(),
            state_dir.join("volumes"),
            state_dir.join("node"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        }
        let root = state_dir
            .canonicalize()
            .map_err(|e| Error::io("canonicalize", state_dir, e))?;
        Ok(Layout { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }
    pub fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }
    pub fn image(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.img"))
    }
    pub fn meta(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.json"))
    }
    pub fn node_record(&self, id: &VolumeId) -> PathBuf {
        self.node_dir().join(format!("{id}.json"))
    }
}

/// Everything about a volume that the kernel cannot tell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub version: u32,
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    pub kind: VolumeKind,
    pub provisioning: Provisioning,
    pub access_modes: Vec<AccessMode>,
    pub created_unix: u64,
    /// Set once the driver created the file system: from then on a volume that probes blank is
    /// damaged, and is never formatted again.
    #[serde(default)]
    pub formatted: bool,
    #[serde(default)]
    pub claim: ClaimRef,
}

/// What CreateVolume asks for, typed.
#[derive(Clone, Debug)]
pub struct NewVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub kind: VolumeKind,
    pub access_modes: Vec<AccessMode>,
    pub provisioning: Provisioning,
    pub claim: ClaimRef,
}

/// Whether CreateVolume made the volume or found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    New,
    AlreadyExisted,
}

#[derive(Default)]
struct Index {
    by_id: BTreeMap<VolumeId, Arc<VolumeMeta>>,
    by_name: HashMap<String, VolumeId>,
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

pub struct Pool {
    layout: Layout,
    index: RwLock<Index>,
    locks: OperationLocks,
}

impl Pool {
    /// Opens the pool and recovers from any crash: loads every volume's metadata, removes
    /// half-made images (no metadata), stale temp files and node records of deleted volumes.
    pub fn open(layout: Layout) -> Result<(Self, Recovery)> {
        let mut recovery = Recovery::default();
        let mut index = Index::default();
        let volumes_dir = layout.volumes_dir();
        let mut images = Vec::new();
        for path in list_dir(&volumes_dir)? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(files::TEMP_SUFFIX) {
                files::remove_durably(&path)?;
                recovery.removed_temp_files.push(path);
            } else if let Some(stem) = name.strip_suffix(".json") {
                match load_meta(&path, stem) {
                    Ok(meta) => {
                        index.by_name.insert(meta.name.clone(), meta.id);
                        index.by_id.insert(meta.id, Arc::new(meta));
                    }
                    Err(err) => {
                        tracing::error!(path = %path.display(), error = %err, "unreadable volume metadata; volume not served, files left untouched");
                        recovery.unreadable.push(path);
                    }
                }
            } else if let Some(stem) = name.strip_suffix(".img") {
                images.push((stem.to_string(), path));
            }
        }
        let attached: Vec<PathBuf> = loopdev::attached()?.into_iter().map(|(_, f)| f).collect();
        for (stem, path) in images {
            let has_meta = VolumeId::parse(&stem).is_some_and(|id| index.by_id.contains_key(&id))
                || recovery
                    .unreadable
                    .iter()
                    .any(|u| u.file_stem().and_then(|s| s.to_str()) == Some(&stem));
            if has_meta {
                continue;
            }
            if attached.contains(&path) {
                tracing::warn!(path = %path.display(), "image without metadata is attached to a loop device; left in place");
                continue;
            }
            tracing::info!(path = %path.display(), "removing image of an interrupted CreateVolume/DeleteVolume");
            files::remove_durably(&path)?;
            recovery.removed_partial_images.push(path);
        }
        for path in list_dir(&layout.node_dir())? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let known = name
                .strip_suffix(".json")
                .and_then(VolumeId::parse)
                .is_some_and(|id| index.by_id.contains_key(&id));
            if name.ends_with(files::TEMP_SUFFIX) || !known {
                tracing::info!(path = %path.display(), "removing stale node record");
                files::remove_durably(&path)?;
                if name.ends_with(files::TEMP_SUFFIX) {
                    recovery.removed_temp_files.push(path);
                } else {
                    recovery.removed_node_records.push(path);
                }
            }
        }
        recovery.volumes = index.by_id.len();
        Ok((
            Pool {
                layout,
                index: RwLock::new(index),
                locks: OperationLocks::default(),
            },
            recovery,
        ))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Takes the operation guard of a volume (ABORTED when another operation holds it).
    pub fn lock_volume(&self, id: &VolumeId) -> Result<OperationGuard> {
        self.locks.try_lock(LockKey::Volume(id.to_string()))
    }

    pub fn get(&self, id: &VolumeId) -> Option<Arc<VolumeMeta>> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(id)
            .cloned()
    }

    /// The volume, or NOT_FOUND naming the id.
    pub fn require(&self, id: &VolumeId) -> Result<Arc<VolumeMeta>> {
        self.get(id).ok_or_else(|| Error::NotFound {
            what: "volume",
            id: id.to_string(),
        })
    }

    pub fn find_by_name(&self, name: &str) -> Option<Arc<VolumeMeta>> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index
            .by_name
            .get(name)
            .and_then(|id| index.by_id.get(id))
            .cloned()
    }

    /// Up to `max` volumes in id order, starting after `after`; the flag tells whether more follow.
    pub fn list(&self, after: Option<VolumeId>, max: usize) -> (Vec<Arc<VolumeMeta>>, bool) {
        use std::ops::Bound;
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut iter = index
            .by_id
            .range((start, Bound::Unbounded))
            .map(|(_, m)| Arc::clone(m));
        let page: Vec<_> = iter.by_ref().take(max).collect();
        let more = iter.next().is_some();
        (page, more)
    }

    pub fn len(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Space of the pool's file system.
    pub fn usage(&self) -> Result<Usage> {
        files::usage(&self.layout.volumes_dir())
    }

    /// CreateVolume. Idempotent by name: the same name with compatible arguments returns the
    /// existing volume; with incompatible ones, ALREADY_EXISTS. Concurrent calls with one name
    /// never make two volumes (the second is ABORTED while the first runs).
    pub fn create(&self, req: NewVolume) -> Result<(Arc<VolumeMeta>, Created)> {
        let _guard = self.locks.try_lock(LockKey::Name(req.name.clone()))?;
        // The name is looked up before any size or space check, so a retry is answered the same
        // way even when the pool has filled up since.
        if let Some(existing) = self.find_by_name(&req.name) {
            check_compatible(&existing, &req)?;
            return Ok((existing, Created::AlreadyExisted));
        }
        let size = req.capacity.resolve(req.kind.minimum_size())?;
        let available = self.usage()?.available_bytes;
        if size > available {
            return Err(Error::NoSpace {
                requested: size,
                available,
            });
        }
        let id = VolumeId::new_random();
        // Held until the volume is committed, so the reconciler never takes the image of a
        // create in flight for an orphan.
        let _id_guard = self.lock_volume(&id)?;
        let meta = VolumeMeta {
            version: META_VERSION,
            id,
            name: req.name,
            capacity_bytes: size,
            kind: req.kind,
            provisioning: req.provisioning,
            access_modes: req.access_modes,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            formatted: false,
            claim: req.claim,
        };
        let image = self.layout.image(&id);
        let allocation = match meta.provisioning {
            Provisioning::Thin => Allocation::Sparse,
            Provisioning::Thick => Allocation::Full,
        };
        files::create_backing_file(&image, size, allocation).map_err(|err| match err {
            Error::Io { ref source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) => {
                Error::NoSpace {
                    requested: size,
                    available,
                }
            }
            other => other,
        })?;
        crate::faults::crash_point("create.image_written");
        if let Err(err) = self.write_meta(&meta) {
            // Not committed: take the image back so nothing half-made stays.
            let _ = files::remove_durably(&image);
            return Err(err);
        }
        crate::faults::crash_point("create.meta_committed");
        let meta = Arc::new(meta);
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        index.by_name.insert(meta.name.clone(), id);
        index.by_id.insert(id, Arc::clone(&meta));
        Ok((meta, Created::New))
    }

    fn write_meta(&self, meta: &VolumeMeta) -> Result<()> {
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| Error::Internal(format!("serialising metadata of {}: {e}", meta.id)))?;
        files::write_atomic(&self.layout.meta(&meta.id), &json)
    }

    /// Records that the driver formatted the volume (crash-safe metadata update).
    pub fn mark_formatted(&self, id: &VolumeId) -> Result<()> {
        let current = self.require(id)?;
        if current.formatted {
            return Ok(());
        }
        let mut updated = (*current).clone();
        updated.formatted = true;
        self.write_meta(&updated)?;
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .insert(*id, Arc::new(updated));
        Ok(())
    }

    /// DeleteVolume. A volume that does not exist is success. A volume still attached to a loop
    /// device (staged on this node) is FAILED_PRECONDITION: its data is in use.
    /// The caller holds the volume's operation guard.
    pub fn delete(&self, id: &VolumeId) -> Result<()> {
        let Some(meta) = self.get(id) else {
            return Ok(());
        };
        let image = self.layout.image(id);
        if let Some(dev) = loopdev::devices_of(&image)?.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is in use: attached to {} (staged on this node); NodeUnstageVolume it first",
                dev.path().display()
            )));
        }
        // Commit point: once the metadata is gone the volume is gone.
        files::remove_durably(&self.layout.meta(id))?;
        crate::faults::crash_point("delete.meta_removed");
        {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            index.by_id.remove(id);
            if index.by_name.get(&meta.name) == Some(id) {
                index.by_name.remove(&meta.name);
            }
        }
        // Leftovers from here on are cleaned by startup recovery if this fails part-way.
        files::remove_durably(&self.layout.node_record(id))?;
        files::remove_durably(&image)?;
        Ok(())
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("read directory", dir, e))?;
    Ok(entries.flatten().map(|e| e.path()).collect())
}

fn load_meta(path: &Path, stem: &str) -> Result<VolumeMeta> {
    let text = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let meta: VolumeMeta = serde_json::from_slice(&text)
        .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
    if meta.version != META_VERSION {
        return Err(Error::Corrupt(format!(
            "{}: metadata version {} is not supported by this build (expects {META_VERSION})",
            path.display(),
            meta.version
        )));
    }
    if meta.id.to_string() != stem {
        return Err(Error::Corrupt(format!(
            "{}: holds volume id {} (file name and content disagree)",
            path.display(),
            meta.id
        )));
    }
    Ok(meta)
}

/// Same name, compatible arguments → the existing volume; otherwise ALREADY_EXISTS saying why.
fn check_compatible(existing: &VolumeMeta, req: &NewVolume) -> Result<()> {
    req.capacity.validate()?;
    let name = shown(&existing.name);
    let conflict = if !req.capacity.admits(existing.capacity_bytes) {
        Some(format!(
            "has {} bytes, outside the requested capacity_range (required_bytes {}, limit_bytes {})",
            existing.capacity_bytes, req.capacity.required_bytes, req.capacity.limit_bytes
        ))
    } else if existing.kind != req.kind {
        Some(format!(
            "holds {}, but {} was requested",
            existing.kind, req.kind
        ))
    } else if existing.provisioning != req.provisioning {
        Some(format!(
            "is provisioned {:?}, but {:?} was requested",
            existing.provisioning, req.provisioning
        ))
    } else {
        None
    };
    match conflict {
        Some(why) => Err(Error::AlreadyExists(format!(
            "volume {name} already exists ({}) and {why}",
            existing.id
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_volume(name: &str) -> NewVolume {
        NewVolume {
            name: name.into(),
            capacity: CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            },
            kind: VolumeKind::Block,
            access_modes: vec![AccessMode::SingleNodeWriter],
            provisioning: Provisioning::Thin,
            claim: ClaimRef::default(),
        }
    }

    #[test]
    fn create_is_idempotent_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(dir.path()).unwrap();
        let (pool, _) = Pool::open(layout.clone()).unwrap();
        let (a, how) = pool.create(new_volume("a/../b")).unwrap();
        assert_eq!(how, Created::New);
        let (again, how) = pool.create(new_volume("a/../b")).unwrap();
        assert_eq!((again.id, how), (a.id, Created::AlreadyExisted));
        let mut bigger = new_volume("a/../b");
        bigger.capacity.required_bytes = 128 << 20;
        assert!(matches!(pool.create(bigger), Err(Error::AlreadyExists(_))));
        // A crash between image and metadata leaves an image without metadata, and a torn
        // temp file: recovery removes both and keeps the complete volume.
        let orphan = layout.image(&VolumeId::new_random());
        std::fs::write(&orphan, b"").unwrap();
        let temp = layout.volumes_dir().join("x.json.tmp");
        std::fs::write(&temp, b"{").unwrap();
        drop(pool);
        let (pool, recovery) = Pool::open(layout.clone()).unwrap();
        assert_eq!(recovery.volumes, 1);
        assert_eq!(recovery.removed_partial_images, vec![orphan]);
        assert_eq!(recovery.removed_temp_files, vec![temp]);
        assert_eq!(pool.find_by_name("a/../b").unwrap().id, a.id);
        pool.delete(&a.id).unwrap();
        pool.delete(&a.id).unwrap();
        assert!(!layout.image(&a.id).exists() && !layout.meta(&a.id).exists());
    }

    #[test]
    fn unreadable_metadata_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(dir.path()).unwrap();
        let id = VolumeId::new_random();
        std::fs::write(layout.meta(&id), b"not json").unwrap();
        std::fs::write(layout.image(&id), b"precious").unwrap();
        let (pool, recovery) = Pool::open(layout.clone()).unwrap();
        assert_eq!(recovery.unreadable, vec![layout.meta(&id)]);
        assert!(pool.is_empty());
        assert_eq!(std::fs::read(layout.image(&id)).unwrap(), b"precious");
    }
}
