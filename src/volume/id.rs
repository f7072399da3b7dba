//! Volume identifiers. A `VolumeId` is a random UUID chosen by the driver; it is parsed from a
//! request exactly once, and a string that is not one of ours never becomes a `VolumeId`, so no
//! request can name a path (`../`, `/`, NUL) through it. File names derive from it alone.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(uuid::Uuid);

impl VolumeId {
    pub fn new_random() -> Self {
        VolumeId(uuid::Uuid::new_v4())
    }

    /// Parses an id this driver issued (lower-case hyphenated UUID). Anything else is `None`:
    /// to a CSI caller such an id simply names no volume.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != uuid::fmt::Hyphenated::LENGTH {
            return None;
        }
        let id = uuid::Uuid::try_parse(text).ok()?;
        // Only the canonical spelling, so one volume has exactly one id string.
        (id.hyphenated().to_string() == text).then_some(VolumeId(id))
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self})")
    }
}

impl Serialize for VolumeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VolumeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        VolumeId::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("bad volume id {text:?}")))
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
            &id.0.simple().to_string(),
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad:?}");
        }
    }
}
