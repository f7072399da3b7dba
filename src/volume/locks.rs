//! Per-object operation guards, shared by readers. Two operations that change the same volume
//! or snapshot (or use the same name) never interleave: the second is answered `Pending`
//! (gRPC ABORTED, naming the operation in progress), as the CSI spec asks, and the CO retries.
//! Nothing ever waits for a guard.
//!
//! Operations that only *read* an object share it: GetMetadataAllocated, GetMetadataDelta and a
//! restore's copy read a snapshot; a clone's or a snapshot's copy reads its source volume. Any
//! number of readers hold an object at once; a writer (DeleteSnapshot, a group snapshot's
//! delete of its members, the node operations, a background round) is refused while one
//! does, and readers are refused while a writer holds it. A live volume's copy also freezes
//! its file system, which two copies cannot do at once: its reader takes the volume's freeze
//! exclusively besides (`LockKey::Freeze`).
//!
//! Every guard is released when dropped, also when its operation failed or panicked.
//! Operations on different objects never wait for each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::volume::id::{SnapshotId, VolumeId};

/// What an operation holds. Each kind of object has its own variant, so a volume and a
/// snapshot whose ids read the same never share a guard.
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
    /// The freeze of a volume's file system, by volume id: one at a time (FIFREEZE is not
    /// nested, and the freeze's record is one per volume).
    Freeze(String),
}

impl LockKey {
    /// How a refusal names the key: what it is, and its id (names shown escaped).
    fn shown(&self) -> (&'static str, String) {
        match self {
            LockKey::Volume(id) => ("volume", id.to_string()),
            LockKey::Name(name) => ("volume name", crate::error::shown(name)),
            LockKey::Snapshot(id) => ("snapshot", id.to_string()),
            LockKey::SnapshotName(name) => ("snapshot name", crate::error::shown(name)),
            LockKey::Group(id) => ("group snapshot", id.to_string()),
            LockKey::GroupName(name) => ("group snapshot name", crate::error::shown(name)),
            LockKey::Freeze(id) => ("the file system freeze of volume", id.to_string()),
        }
    }
}

/// How a key is held.
#[derive(Debug)]
enum Holders {
    /// By one operation that may change the object.
    Writer(&'static str),
    /// By operations that only read it (one entry each, in the order they came).
    Readers(Vec<&'static str>),
}

impl Holders {
    /// The operation(s) in progress, for a refusal.
    fn describe(&self) -> String {
        match self {
            Holders::Writer(op) => (*op).to_string(),
            Holders::Readers(ops) => match ops.as_slice() {
                [] | [_] => ops.join(""),
                [first, more @ ..] => format!("{first} and {} more reader(s)", more.len()),
            },
        }
    }
}

type Table = Arc<Mutex<HashMap<LockKey, Holders>>>;

#[derive(Default, Clone)]
pub struct OperationLocks {
    held: Table,
}

/// Releases its hold of a key when dropped, also when the operation panicked or failed: a
/// writer's removes the key, a reader's takes its operation off the readers (the last one
/// removes the key).
pub struct OperationGuard {
    held: Table,
    key: LockKey,
    op: &'static str,
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

/// Proof that the holder reads volume `id` and nothing changes it meanwhile (other readers
/// may read it too): a clone's or a snapshot's source.
pub struct VolumeReadGuard {
    id: VolumeId,
    _held: OperationGuard,
}

/// Proof that the holder alone freezes volume `id`'s file system (held with a
/// [`VolumeReadGuard`] or a [`VolumeGuard`] of the same volume).
pub struct FreezeGuard {
    _held: OperationGuard,
}

/// What may read a volume: its readers' guard, or its writer's (a writer may also read).
pub trait ReadsVolume {
    fn id(&self) -> &VolumeId;
}

impl ReadsVolume for VolumeGuard {
    fn id(&self) -> &VolumeId {
        &self.id
    }
}

impl ReadsVolume for VolumeReadGuard {
    fn id(&self) -> &VolumeId {
        &self.id
    }
}

/// Proof that the holder runs the one operation on snapshot `id` (it may delete it).
pub struct SnapshotGuard {
    id: SnapshotId,
    _held: OperationGuard,
}

impl SnapshotGuard {
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }
}

/// Proof that snapshot `id` is not deleted (nor made) while the holder reads it; other
/// readers may read it too.
pub struct SnapshotReadGuard {
    id: SnapshotId,
    _held: OperationGuard,
}

impl SnapshotReadGuard {
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }
}

/// The guard of a volume or of a snapshot, where either can be held (a copy's source, an
/// orphan's id).
pub enum ObjectGuard {
    Volume(VolumeGuard),
    Snapshot(SnapshotGuard),
    /// A copy's source volume, shared with other readers; with its freeze when it is live.
    VolumeRead(VolumeReadGuard, Option<FreezeGuard>),
    /// A restore's source snapshot, shared with other readers.
    SnapshotRead(SnapshotReadGuard),
}

/// Whether an operation changes the object or only reads it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Access {
    Write,
    Read,
}

impl OperationLocks {
    /// The guard of volume `id` for operation `op`, or `Pending` (ABORTED) while another
    /// operation holds it.
    pub(in crate::volume) fn volume(&self, id: &VolumeId, op: &'static str) -> Result<VolumeGuard> {
        Ok(VolumeGuard {
            id: *id,
            _held: self.take(LockKey::Volume(id.to_string()), Access::Write, op)?,
        })
    }

    /// A reader's guard of volume `id`, or `Pending` while an operation that changes it runs.
    pub(in crate::volume) fn volume_read(
        &self,
        id: &VolumeId,
        op: &'static str,
    ) -> Result<VolumeReadGuard> {
        Ok(VolumeReadGuard {
            id: *id,
            _held: self.take(LockKey::Volume(id.to_string()), Access::Read, op)?,
        })
    }

    /// The freeze of the volume `reading` reads, or `Pending` while another reader freezes it.
    pub(in crate::volume) fn freeze(
        &self,
        reading: &impl ReadsVolume,
        op: &'static str,
    ) -> Result<FreezeGuard> {
        Ok(FreezeGuard {
            _held: self.take(LockKey::Freeze(reading.id().to_string()), Access::Write, op)?,
        })
    }

    /// The guard of snapshot `id`, or `Pending` while another operation reads or changes it.
    pub(in crate::volume) fn snapshot(
        &self,
        id: &SnapshotId,
        op: &'static str,
    ) -> Result<SnapshotGuard> {
        Ok(SnapshotGuard {
            id: *id,
            _held: self.take(LockKey::Snapshot(id.to_string()), Access::Write, op)?,
        })
    }

    /// A reader's guard of snapshot `id`, or `Pending` while an operation that changes it runs.
    pub(in crate::volume) fn snapshot_read(
        &self,
        id: &SnapshotId,
        op: &'static str,
    ) -> Result<SnapshotReadGuard> {
        Ok(SnapshotReadGuard {
            id: *id,
            _held: self.take(LockKey::Snapshot(id.to_string()), Access::Read, op)?,
        })
    }

    /// Held while CreateVolume (or CreateSnapshot, with `LockKey::SnapshotName`) looks a name
    /// up and commits it, so one name never makes two objects.
    pub(in crate::volume) fn name(&self, key: LockKey, op: &'static str) -> Result<OperationGuard> {
        self.take(key, Access::Write, op)
    }

    /// Takes `key` for `op`, or answers `Pending` naming the operation that holds it. Readers
    /// share a key; a writer shares it with no one.
    fn take(&self, key: LockKey, access: Access, op: &'static str) -> Result<OperationGuard> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        match (held.get_mut(&key), access) {
            (None, Access::Write) => {
                held.insert(key.clone(), Holders::Writer(op));
            }
            (None, Access::Read) => {
                held.insert(key.clone(), Holders::Readers(vec![op]));
            }
            (Some(Holders::Readers(ops)), Access::Read) => ops.push(op),
            (Some(holders), _) => {
                let (what, id) = key.shown();
                return Err(Error::Pending {
                    what,
                    id,
                    by: holders.describe(),
                });
            }
        }
        Ok(OperationGuard {
            held: Arc::clone(&self.held),
            key,
            op,
        })
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let last = match held.get_mut(&self.key) {
            Some(Holders::Readers(ops)) if ops.len() > 1 => {
                if let Some(at) = ops.iter().position(|o| *o == self.op) {
                    ops.remove(at);
                }
                false
            }
            _ => true,
        };
        if last {
            held.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl OperationLocks {
        /// A writer's hold of `key` (the tests' shorthand).
        fn try_lock(&self, key: LockKey) -> Result<OperationGuard> {
            self.take(key, Access::Write, "a test")
        }

        fn is_free(&self, key: &LockKey) -> bool {
            !self.held.lock().unwrap().contains_key(key)
        }
    }

    fn refused_by(result: Result<impl Sized>) -> String {
        match result {
            Err(Error::Pending { by, .. }) => by,
            Err(other) => panic!("not Pending: {other}"),
            Ok(_) => panic!("not refused"),
        }
    }

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

    #[test]
    fn two_readers_of_a_snapshot_share_it() {
        let locks = OperationLocks::default();
        let id = SnapshotId::new_random();
        let first = locks.snapshot_read(&id, "GetMetadataDelta").unwrap();
        let second = locks.snapshot_read(&id, "GetMetadataDelta").unwrap();
        let third = locks.snapshot_read(&id, "CreateVolume").unwrap();
        assert_eq!((first.id(), second.id(), third.id()), (&id, &id, &id));
        let volume = VolumeId::new_random();
        let _a = locks.volume_read(&volume, "CreateSnapshot").unwrap();
        let _b = locks.volume_read(&volume, "CreateVolume").unwrap();
    }

    #[test]
    fn a_writer_is_refused_while_a_reader_holds_naming_the_reader() {
        let locks = OperationLocks::default();
        let id = SnapshotId::new_random();
        let reader = locks.snapshot_read(&id, "GetMetadataDelta").unwrap();
        let by = refused_by(locks.snapshot(&id, "DeleteSnapshot"));
        assert_eq!(by, "GetMetadataDelta");
        let other = locks.snapshot_read(&id, "GetMetadataAllocated").unwrap();
        let err = locks.snapshot(&id, "DeleteSnapshot").err().unwrap();
        assert_eq!(err.code(), tonic::Code::Aborted);
        let text = err.to_string();
        assert!(text.contains(&id.to_string()), "{text}");
        assert!(text.contains("GetMetadataDelta and 1 more"), "{text}");
        drop(reader);
        assert_eq!(
            refused_by(locks.snapshot(&id, "DeleteSnapshot")),
            "GetMetadataAllocated"
        );
        drop(other);
        assert!(locks.snapshot(&id, "DeleteSnapshot").is_ok());
    }

    #[test]
    fn a_reader_is_refused_while_a_writer_holds_naming_the_writer() {
        let locks = OperationLocks::default();
        let id = SnapshotId::new_random();
        let writer = locks.snapshot(&id, "DeleteSnapshot").unwrap();
        assert_eq!(
            refused_by(locks.snapshot_read(&id, "GetMetadataDelta")),
            "DeleteSnapshot"
        );
        assert_eq!(
            refused_by(locks.snapshot(&id, "DeleteSnapshot")),
            "DeleteSnapshot"
        );
        drop(writer);
        assert!(locks.snapshot_read(&id, "GetMetadataDelta").is_ok());
        let volume = VolumeId::new_random();
        let stage = locks.volume(&volume, "NodeStageVolume").unwrap();
        assert_eq!(
            refused_by(locks.volume_read(&volume, "CreateSnapshot")),
            "NodeStageVolume"
        );
        drop(stage);
        let reading = locks.volume_read(&volume, "CreateSnapshot").unwrap();
        assert_eq!(
            refused_by(locks.volume(&volume, "NodeStageVolume")),
            "CreateSnapshot"
        );
        drop(reading);
    }

    #[test]
    fn every_guard_is_released_when_dropped_the_last_reader_frees_the_key() {
        let locks = OperationLocks::default();
        let id = SnapshotId::new_random();
        let key = LockKey::Snapshot(id.to_string());
        let readers: Vec<_> = (0..3)
            .map(|_| locks.snapshot_read(&id, "GetMetadataAllocated").unwrap())
            .collect();
        let mut readers = readers.into_iter();
        drop(readers.next());
        drop(readers.next());
        assert!(!locks.is_free(&key));
        drop(readers);
        assert!(locks.is_free(&key));
        drop(locks.snapshot(&id, "DeleteSnapshot").unwrap());
        assert!(locks.is_free(&key));
    }

    #[test]
    fn guards_are_released_when_their_operation_panics() {
        let locks = OperationLocks::default();
        let id = SnapshotId::new_random();
        let volume = VolumeId::new_random();
        let _other_reader = locks.snapshot_read(&id, "GetMetadataDelta").unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _reading = locks.snapshot_read(&id, "GetMetadataDelta").unwrap();
            let _writing = locks.volume(&volume, "NodeStageVolume").unwrap();
            panic!("the operation panics while it holds its guards");
        }));
        assert!(panicked.is_err());
        assert!(locks.is_free(&LockKey::Volume(volume.to_string())));
        drop(_other_reader);
        assert!(locks.is_free(&LockKey::Snapshot(id.to_string())));
        assert!(locks.snapshot(&id, "DeleteSnapshot").is_ok());
    }

    #[test]
    fn a_volume_and_a_snapshot_with_the_same_text_never_collide() {
        let locks = OperationLocks::default();
        let volume = VolumeId::new_random();
        let snapshot = SnapshotId::parse(&volume.to_string()).unwrap();
        assert_eq!(volume.to_string(), snapshot.to_string());
        let _v = locks.volume(&volume, "DeleteVolume").unwrap();
        let _s = locks.snapshot(&snapshot, "DeleteSnapshot").unwrap();
        let _f = locks.freeze(&_v, "CreateVolumeGroupSnapshot").unwrap();
        let text = volume.to_string();
        for key in [
            LockKey::Name(text.clone()),
            LockKey::SnapshotName(text.clone()),
            LockKey::Group(text.clone()),
            LockKey::GroupName(text),
        ] {
            assert!(locks.try_lock(key).is_ok());
        }
    }

    #[test]
    fn one_freeze_of_a_volume_at_a_time_among_its_readers() {
        let locks = OperationLocks::default();
        let volume = VolumeId::new_random();
        let a = locks.volume_read(&volume, "CreateSnapshot").unwrap();
        let b = locks.volume_read(&volume, "CreateVolume").unwrap();
        let frozen = locks.freeze(&a, "CreateSnapshot").unwrap();
        assert_eq!(
            refused_by(locks.freeze(&b, "CreateVolume")),
            "CreateSnapshot"
        );
        drop(frozen);
        assert!(locks.freeze(&b, "CreateVolume").is_ok());
    }
}
