//! The parts of `Error` that are not the list of failures itself: the typed reasons some
//! variants carry, the constructors, and how untrusted input is shown in a message.

use std::path::{Path, PathBuf};

use super::Error;
use crate::volume::params::VolumeKind;
use crate::volume::pool::ContentSource;

/// How an existing volume differs from a CreateVolume of its name.
#[derive(Debug, thiserror::Error)]
pub enum Mismatch {
    #[error("has {size} bytes, outside the requested capacity_range (required_bytes {required}, limit_bytes {limit})")]
    Capacity {
        size: u64,
        required: i64,
        limit: i64,
    },
    #[error("holds {existing}, but {requested} was requested")]
    Kind {
        existing: VolumeKind,
        requested: VolumeKind,
    },
    #[error("was made from {existing:?}, but {requested:?} was requested")]
    ContentSource {
        existing: Option<ContentSource>,
        requested: Option<ContentSource>,
    },
    /// A kept StorageClass parameter differs (see `VolumeParams::conflict`): one generic
    /// variant, so a new parameter needs no new error.
    #[error("was made with {key} {existing}, but {key} {requested} was requested")]
    Parameter {
        key: &'static str,
        existing: String,
        requested: String,
    },
}

/// Why a persisted record cannot be used (the reason after the path in `CorruptRecord`).
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    /// Not the JSON of this record type.
    #[error("{0}")]
    Unparsable(String),
    /// A `what` ("metadata", "freeze record") format version this build does not read.
    #[error("{what} version {found} is not supported by this build (expects {expected})")]
    Version {
        what: &'static str,
        found: u32,
        expected: u32,
    },
    /// The record's id is not the one its file name says.
    #[error("holds {what} id {id} (file name and content disagree)")]
    IdMismatch { what: &'static str, id: String },
}

pub(super) fn joined(paths: &[PathBuf], separator: &str) -> String {
    let shown: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(separator)
}

pub(super) fn names_clause(name: &Option<String>) -> String {
    match name {
        Some(n) => format!(" and names {}", shown(n)),
        None => " and its name is unknown".to_string(),
    }
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn sys(op: &'static str, target: impl std::fmt::Display, errno: nix::errno::Errno) -> Self {
        Error::Sys {
            op,
            target: target.to_string(),
            errno,
        }
    }

    /// A record at `path` that does not parse.
    pub fn unparsable(path: &Path, why: impl std::fmt::Display) -> Self {
        Error::CorruptRecord {
            path: path.to_path_buf(),
            reason: Corruption::Unparsable(why.to_string()),
        }
    }
}

/// Renders untrusted input for an error message: quoted, escaped, and cut short so a 100 KB
/// hostile string cannot flood logs or replies.
pub fn shown(value: &str) -> String {
    const MAX: usize = 80;
    if value.len() <= MAX {
        return format!("{value:?}");
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
}

/// A list of ids for a message: `a, b, c`.
pub fn ids<K: crate::volume::id::Kind>(ids: &[crate::volume::id::Id<K>]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
