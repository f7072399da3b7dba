//! Per-volume operation guards. Two operations on the same volume (or the same volume name)
//! never interleave: the second is answered `Pending` (gRPC ABORTED), as the CSI spec asks, and
//! the CO retries. Operations on different volumes never wait for each other.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::volume::id::{SnapshotId, VolumeId};

/// What an operation holds exclusively.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LockKey {
    /// A volume, by id (every Controller and Node operation on it).
    Volume(String),
    /// A volume name during CreateVolume (the id does not exist yet).
    Name(String),
    /// A snapshot, by id.
    Snapshot(String),
    /// A snapshot name during CreateSnapshot.
    SnapshotName(String),
    /// A group snapshot, by id.
    Group(String),
    /// A group snapshot name during CreateVolumeGroupSnapshot.
    GroupName(String),
}

#[derive(Default, Clone)]
pub struct OperationLocks {
    held: Arc<Mutex<HashSet<LockKey>>>,
}

/// Releases its key when dropped, also when the operation panicked or failed.
pub struct OperationGuard {
    held: Arc<Mutex<HashSet<LockKey>>>,
    key: LockKey,
}

/// Proof that the holder runs the one operation on volume `id` (see `volume::volumes`, the only
/// place that takes one). Domain functions that change a volume take it as an argument, so
/// they cannot be called without the guard, and never take it a second time.
pub struct VolumeGuard {
    id: VolumeId,
    _held: OperationGuard,
}

impl VolumeGuard {
    pub fn id(&self) -> &VolumeId {
        &self.id
    }
}

/// Proof that the holder runs the one operation on snapshot `id`.
pub struct SnapshotGuard {
    id: SnapshotId,
    _held: OperationGuard,
}

impl SnapshotGuard {
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }
}

/// The guard of a volume or of a snapshot, where either can be held (a copy's source, an
/// orphan's id).
pub enum ObjectGuard {
    Volume(VolumeGuard),
    Snapshot(SnapshotGuard),
}

impl OperationLocks {
    /// The guard of volume `id`, or `Pending` (ABORTED) while another operation holds it.
    pub(in crate::volume) fn volume(&self, id: &VolumeId) -> Result<VolumeGuard> {
        Ok(VolumeGuard {
            id: *id,
            _held: self.try_lock(LockKey::Volume(id.to_string()))?,
        })
    }

    /// The guard of snapshot `id`, or `Pending`.
    pub(in crate::volume) fn snapshot(&self, id: &SnapshotId) -> Result<SnapshotGuard> {
        Ok(SnapshotGuard {
            id: *id,
            _held: self.try_lock(LockKey::Snapshot(id.to_string()))?,
        })
    }

    /// Held while CreateVolume (or CreateSnapshot, with `LockKey::SnapshotName`) looks a name
    /// up and commits it, so one name never makes two objects.
    pub(in crate::volume) fn name(&self, key: LockKey) -> Result<OperationGuard> {
        self.try_lock(key)
    }

    /// Takes `key`, or answers `Pending` when another operation holds it.
    fn try_lock(&self, key: LockKey) -> Result<OperationGuard> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.insert(key.clone()) {
            let (what, id) = match &key {
                LockKey::Volume(id) => ("volume", id.to_string()),
                LockKey::Name(name) => ("volume name", crate::error::shown(name)),
                LockKey::Snapshot(id) => ("snapshot", id.to_string()),
                LockKey::SnapshotName(name) => ("snapshot name", crate::error::shown(name)),
                LockKey::Group(id) => ("group snapshot", id.to_string()),
                LockKey::GroupName(name) => ("group snapshot name", crate::error::shown(name)),
            };
            return Err(Error::Pending { what, id });
        }
        Ok(OperationGuard {
            held: Arc::clone(&self.held),
            key,
        })
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let locks = OperationLocks::default();
        let key = LockKey::Volume("v".into());
        let guard = locks.try_lock(key.clone()).unwrap();
        assert!(matches!(
            locks.try_lock(key.clone()),
            Err(Error::Pending { .. })
        ));
        assert!(locks.try_lock(LockKey::Name("v".into())).is_ok());
        drop(guard);
        assert!(locks.try_lock(key).is_ok());
    }
}
