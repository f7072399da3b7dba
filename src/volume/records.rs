//! Node records: what the CO asked this node to stage and publish — the one thing the kernel
//! cannot tell after a reboot. Layout, per volume, in `node/<id>/`:
//! - `staged.json`: the staging path and capability;
//! - `target-<hash>.json`: one file per published target (the hash names the target path).
//!
//! One small file per fact, each written crash-safely, so that tearing down (unpublish,
//! unstage, delete) only ever *removes* files: it works on a pool that is full to the last
//! block, where writing even a small record would fail with ENOSPC.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::host::loopdev::FileId;
use crate::host::os::Host;
use crate::volume::params::Capability;

const STAGED: &str = "staged.json";
const TARGET_PREFIX: &str = "target-";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StageRecord {
    pub(crate) path: PathBuf,
    pub(crate) capability: Capability,
    /// The identity of the image that was staged: the loop device holding this file is the
    /// volume's, whatever path the kernel renders for it and even if the image is deleted or
    /// replaced behind the driver's back. Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) image: Option<FileId>,
    /// Written by NodeUnstageVolume before it unmounts and detaches; the record goes when it
    /// finishes. While set, the CO is taking the staging down: an unstage that failed part-way
    /// (the device still held after the unmount) is retried by the CO, and the reconciler must
    /// not put back what the CO asked to remove. Only NodeStageVolume or NodePublishVolume
    /// stage the volume again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) unstaging: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PublishRecord {
    pub(crate) target: PathBuf,
    pub(crate) capability: Capability,
    pub(crate) readonly: bool,
}

/// The in-memory view of a volume's records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeRecord {
    pub(crate) staged: Option<StageRecord>,
    /// Sorted by target path.
    pub(crate) published: Vec<PublishRecord>,
    /// Record files that exist but cannot be read (torn, emptied, foreign), with why. They are
    /// never taken for "no record": teardown works from the CO's paths and the kernel, the next
    /// write of the same fact replaces them, and until then the volume counts as in use.
    pub(crate) damaged: Vec<(PathBuf, String)>,
}

impl NodeRecord {
    /// Whether any record file exists for the volume (readable or not).
    pub(crate) fn exists(&self) -> bool {
        self.staged.is_some() || !self.published.is_empty() || !self.damaged.is_empty()
    }

    /// The stage record could not be read.
    pub(crate) fn staged_damaged(&self, dir: &Path) -> bool {
        let file = dir.join(STAGED);
        self.damaged.iter().any(|(p, _)| *p == file)
    }

    /// The record of `target` could not be read.
    pub(crate) fn target_damaged(&self, dir: &Path, target: &Path) -> bool {
        let file = target_file(dir, target);
        self.damaged.iter().any(|(p, _)| *p == file)
    }
}

/// FNV-1a of the target path: a stable, dependency-free file name for it (the file content
/// holds the full path, which is what is compared).
fn target_file(dir: &Path, target: &Path) -> PathBuf {
    let hash = target
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    dir.join(format!("{TARGET_PREFIX}{hash:016x}.json"))
}

fn read_json<T: serde::de::DeserializeOwned>(host: &dyn Host, path: &Path) -> Result<Option<T>> {
    match host.read_file(path)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::unparsable(path, e)),
        None => Ok(None),
    }
}

/// `read_json`, listing a file that cannot be parsed in `record.damaged` instead of failing.
fn readable<T: serde::de::DeserializeOwned>(
    host: &dyn Host,
    path: PathBuf,
    record: &mut NodeRecord,
) -> Result<Option<T>> {
    match read_json(host, &path) {
        Ok(value) => Ok(value),
        Err(err @ Error::CorruptRecord { .. }) => {
            let why = err.to_string();
            tracing::warn!(path = %path.display(), "{why}");
            record.damaged.push((path, why));
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Reads a volume's records from `dir` (`node/<id>`); no directory means no records. A file
/// that cannot be parsed is listed in `damaged`, never an error: one damaged file must not make
/// every RPC on the volume fail for ever.
pub(crate) fn load(host: &dyn Host, dir: &Path) -> Result<NodeRecord> {
    let mut record = NodeRecord::default();
    record.staged = readable(host, dir.join(STAGED), &mut record)?;
    let Some(entries) = host.list_dir(dir)? else {
        return Ok(record);
    };
    for entry in entries {
        let Some(name) = entry.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if name.starts_with(TARGET_PREFIX) && name.ends_with(".json") {
            if let Some(published) = readable(host, entry, &mut record)? {
                record.published.push(published);
            }
        }
    }
    record.published.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(record)
}

/// Writes one record file into the volume's record directory (`Host::write_record`: crash-safe,
/// and a missing directory is created with its entry flushed beside the record's temp file, so
/// a first stage waits for two rounds of flushes instead of three). Until it returns, a crash
/// may lose the record (or leave an empty record directory, which means "no records"), as it
/// may lose any record not yet acknowledged.
fn write_record<T: Serialize>(host: &dyn Host, file: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Internal(format!("serialising {}: {e}", file.display())))?;
    host.write_record(file, &json)
}

pub(crate) fn save_staged(host: &dyn Host, dir: &Path, staged: &StageRecord) -> Result<()> {
    write_record(host, &dir.join(STAGED), staged)
}

/// Forgets the staging; only removes a file.
pub(crate) fn remove_staged(host: &dyn Host, dir: &Path) -> Result<()> {
    host.remove_durably(&dir.join(STAGED))
}

pub(crate) fn add_published(host: &dyn Host, dir: &Path, published: &PublishRecord) -> Result<()> {
    write_record(host, &target_file(dir, &published.target), published)
}

/// Forgets a published target; only removes a file.
pub(crate) fn remove_published(host: &dyn Host, dir: &Path, target: &Path) -> Result<()> {
    host.remove_durably(&target_file(dir, target))
}

/// Forgets everything about the volume on this node; only removes files. A directory with a
/// mount inside (which a record directory never has) is refused, never walked into.
pub(crate) fn clear(host: &dyn Host, dir: &Path) -> Result<()> {
    if matches!(host.node(dir), Ok(None)) {
        return Ok(());
    }
    if let Some(m) = host
        .mounts()?
        .iter()
        .find(|m| m.mount_point.starts_with(dir))
    {
        return Err(Error::MountInsideRecords {
            dir: dir.to_path_buf(),
            mount_point: m.mount_point.clone(),
        });
    }
    host.remove_record_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::params::{AccessKind, AccessMode};

    #[test]
    fn records_round_trip_and_clear() {
        let root = tempfile::tempdir().unwrap();
        let host = &crate::host::fake::FakeHost::new(root.path());
        let dir = root.path().join("vol");
        let cap = Capability {
            access: AccessMode::SingleNodeWriter,
            kind: AccessKind::Block,
        };
        assert_eq!(load(host, &dir).unwrap(), NodeRecord::default());
        let staged = StageRecord {
            path: "/s".into(),
            capability: cap.clone(),
            image: Some(FileId { dev: 1, ino: 2 }),
            unstaging: false,
        };
        save_staged(host, &dir, &staged).unwrap();
        for target in ["/b", "/a"] {
            let p = PublishRecord {
                target: target.into(),
                capability: cap.clone(),
                readonly: false,
            };
            add_published(host, &dir, &p).unwrap();
        }
        let loaded = load(host, &dir).unwrap();
        assert_eq!(loaded.staged, Some(staged));
        assert_eq!(loaded.published.len(), 2);
        assert_eq!(loaded.published[0].target, PathBuf::from("/a"));
        remove_published(host, &dir, Path::new("/a")).unwrap();
        remove_published(host, &dir, Path::new("/a")).unwrap();
        assert_eq!(load(host, &dir).unwrap().published.len(), 1);
        clear(host, &dir).unwrap();
        clear(host, &dir).unwrap();
        assert!(!dir.exists());
    }

    /// Records as the driver wrote them before the capability carried its parsed mount flags:
    /// they load, with the flags parsed, and are written back byte for byte the same.
    #[test]
    fn records_written_before_parsed_mount_flags_still_load() {
        use crate::volume::params::FsType;
        let staged = r#"{"path":"/s","capability":{"access":"single_node_writer","kind":{"mount":{"fs":"xfs","flags":["noatime","ro"]}}},"image":{"dev":1,"ino":2}}"#;
        let record: StageRecord = serde_json::from_str(staged).unwrap();
        let AccessKind::Mount { fs, flags } = &record.capability.kind else {
            panic!("a mount capability loads as one: {record:?}");
        };
        assert_eq!(*fs, Some(FsType::Xfs));
        assert_eq!(flags.as_sent(), ["noatime", "ro"]);
        assert!(flags.options().read_only());
        assert!(flags
            .options()
            .flags
            .contains(nix::mount::MsFlags::MS_NOATIME));
        assert_eq!(serde_json::to_string(&record).unwrap(), staged);

        let published = r#"{"target":"/t","capability":{"access":"single_node_reader_only","kind":"block"},"readonly":true}"#;
        let record: PublishRecord = serde_json::from_str(published).unwrap();
        assert_eq!(record.capability.kind, AccessKind::Block);
        assert_eq!(serde_json::to_string(&record).unwrap(), published);

        // Flags the parser refuses make the record unreadable (damaged), never silently empty.
        let hostile = staged.replace("\"ro\"", "\"bind\"");
        let err = serde_json::from_str::<StageRecord>(&hostile).unwrap_err();
        assert!(err.to_string().contains("bind"), "{err}");
    }
}
