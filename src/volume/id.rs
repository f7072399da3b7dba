//! Object identifiers. A `VolumeId` or a `SnapshotId` is a random UUID chosen by the driver; it is
//! parsed from a request exactly once, and a string that is not one of ours never becomes an id,
//! so no request can name a path (`../`, `/`, NUL) through it. File names derive from it alone.
//!
//! Both are `Id<K>` with a different kind `K`: the same text on the wire and on disk, but
//! distinct types, so the compiler refuses a volume id where a snapshot id is wanted (a snapshot
//! is looked up in the snapshots, guarded by the snapshot's guard, stored under `snapshots/`),
//! and the reverse.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What an id names. Sealed: only the kinds below exist.
pub trait Kind: sealed::Sealed + 'static {
    /// The type's name, for `Debug`.
    const TYPE: &'static str;
    /// The object, as messages name it ("volume", "snapshot").
    const WHAT: &'static str;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::OfVolume {}
    impl Sealed for super::OfSnapshot {}
}

/// The kind of a `VolumeId`.
#[derive(Debug)]
pub enum OfVolume {}

/// The kind of a `SnapshotId`.
#[derive(Debug)]
pub enum OfSnapshot {}

impl Kind for OfVolume {
    const TYPE: &'static str = "VolumeId";
    const WHAT: &'static str = "volume";
}

impl Kind for OfSnapshot {
    const TYPE: &'static str = "SnapshotId";
    const WHAT: &'static str = "snapshot";
}

/// The id of an object of kind `K` (see the module doc). One kind is never taken for the other:
///
/// ```compile_fail
/// use loopcsi::volume::id::{SnapshotId, VolumeId};
/// let snapshot: SnapshotId = VolumeId::new_random();
/// ```
///
/// ```compile_fail
/// use loopcsi::volume::id::{SnapshotId, VolumeId};
/// let volume: VolumeId = SnapshotId::new_random();
/// ```
pub struct Id<K: Kind> {
    uuid: uuid::Uuid,
    // `fn() -> K`: an `Id` owns no `K` (there is none), so it is Send, Sync and Copy whatever K.
    kind: PhantomData<fn() -> K>,
}

pub type VolumeId = Id<OfVolume>;
pub type SnapshotId = Id<OfSnapshot>;

impl<K: Kind> Id<K> {
    fn from_uuid(uuid: uuid::Uuid) -> Self {
        Id {
            uuid,
            kind: PhantomData,
        }
    }

    pub fn new_random() -> Self {
        Self::from_uuid(uuid::Uuid::new_v4())
    }

    /// Parses an id this driver issued (lower-case hyphenated UUID). Anything else is `None`:
    /// to a CSI caller such an id simply names no object.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != uuid::fmt::Hyphenated::LENGTH {
            return None;
        }
        let id = uuid::Uuid::try_parse(text).ok()?;
        // Only the canonical spelling, so one object has exactly one id string.
        (id.hyphenated().to_string() == text).then_some(Self::from_uuid(id))
    }
}

// By hand rather than derived: a derive would demand the same traits of the kind marker `K`.
impl<K: Kind> Clone for Id<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K: Kind> Copy for Id<K> {}
impl<K: Kind> PartialEq for Id<K> {
    fn eq(&self, other: &Self) -> bool {
        self.uuid == other.uuid
    }
}
impl<K: Kind> Eq for Id<K> {}
impl<K: Kind> PartialOrd for Id<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Kind> Ord for Id<K> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.uuid.cmp(&other.uuid)
    }
}
impl<K: Kind> Hash for Id<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.uuid.hash(state)
    }
}

impl<K: Kind> fmt::Display for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.uuid.hyphenated().fmt(f)
    }
}

impl<K: Kind> fmt::Debug for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({self})", K::TYPE)
    }
}

impl<K: Kind> Serialize for Id<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, K: Kind> Deserialize<'de> for Id<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Id::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("bad {} id {text:?}", K::WHAT)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_everything_else() {
        let id = VolumeId::new_random();
        assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
        for bad in [
            "",
            "../../etc/passwd",
            "fake-vol-id",
            "/",
            "a\0b",
            &id.to_string().to_uppercase(),
            &format!("{{{id}}}"),
            &id.uuid.simple().to_string(),
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad:?}");
        }
    }

    /// A snapshot id has the text of a volume id: the files and the wire keep their format.
    #[test]
    fn a_snapshot_id_is_written_as_a_volume_id_was() {
        let text = "0b5c1e9a-3f4d-4c2b-9a57-1d2e3f405162";
        let id = SnapshotId::parse(text).unwrap();
        assert_eq!(id.to_string(), text);
        assert_eq!(format!("{id:?}"), format!("SnapshotId({text})"));
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{text}\""));
        let back: SnapshotId = serde_json::from_str(&format!("\"{text}\"")).unwrap();
        assert_eq!(back, id);
        let err = serde_json::from_str::<SnapshotId>("\"snap-1\"").unwrap_err();
        assert!(err.to_string().contains("bad snapshot id"), "{err}");
    }
}
