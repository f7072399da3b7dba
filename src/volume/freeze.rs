//! Freezing a volume's file system for a copy, as an intent that survives the driver.
//!
//! On-disk contract: `<state-dir>/frozen/<volume-id>.json` names the volume, the mount point its
//! file system was frozen at, the file system type and the frozen file system's device numbers.
//! It is written durably *before* FIFREEZE and removed only after FITHAW (or after proving the
//! file system is not frozen), so a driver killed at any instant in between leaves a record of
//! every file system it may have frozen. A frozen file system blocks every writer until someone
//! thaws it, and keeps its loop device attached after unmount (the superblock stays alive), so
//! forgetting one is not recoverable by the CO.
//!
//! Startup recovery and every reconciliation round thaw what such a record names (`thaw_abandoned`):
//! through any mount of that device in this mount namespace, or, when none is left (the CO
//! unstaged the frozen file system), by mounting the device on a private directory beside the
//! record (`<id>.mnt`), thawing it there and unmounting it again, the operator's manual
//! workaround. The file system is identified by its device numbers, checked with fstat on the
//! opened directory, never by a mount point's path alone. Only what loopcsi recorded is ever
//! thawed: a freeze by someone else (an operator's `fsfreeze`) is left alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::error::{Corruption, Error, Result};
use crate::host::files;
use crate::host::mount::{self, MountOptions};
use crate::host::os::{FsHandle, Host};
use crate::host::tools::FsType;
use crate::volume::id::VolumeId;
use crate::volume::node::NodeOps;
use crate::volume::pool::Layout;
use crate::volume::volumes::Skipper;

const INTENT_VERSION: u32 = 1;

/// The record of one freeze, written before FIFREEZE and removed after FITHAW.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Intent {
    version: u32,
    volume: VolumeId,
    /// Where the file system was mounted when frozen (for the logs; it is found again by its
    /// device numbers).
    mount_point: PathBuf,
    major: u32,
    minor: u32,
    fs_type: FsType,
}

impl Intent {
    fn numbers(&self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

fn intents_dir(layout: &Layout) -> PathBuf {
    layout.root().join("frozen")
}

fn intent_path(layout: &Layout, id: &VolumeId) -> PathBuf {
    intents_dir(layout).join(format!("{id}.json"))
}

/// Where a file system with no mount left is mounted for the length of its thaw.
fn thaw_mount_point(layout: &Layout, id: &VolumeId) -> PathBuf {
    intents_dir(layout).join(format!("{id}.mnt"))
}

fn read_intent(host: &dyn Host, path: &Path) -> Result<Intent> {
    let text = host.read_file(path)?.ok_or_else(|| {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Error::io("read", path, missing)
    })?;
    let intent: Intent = serde_json::from_slice(&text).map_err(|e| Error::unparsable(path, e))?;
    if intent.version != INTENT_VERSION {
        return Err(Error::CorruptRecord {
            path: path.to_path_buf(),
            reason: Corruption::Version {
                what: "freeze record",
                found: intent.version,
                expected: INTENT_VERSION,
            },
        });
    }
    Ok(intent)
}

/// A volume's mounted file system that a copy may freeze.
#[derive(Clone, Debug)]
pub(crate) struct FreezeTarget {
    layout: Layout,
    intent: Intent,
    limit: Duration,
}

/// How long a copy may keep a file system frozen, unless `--max-freeze-ms` says otherwise.
pub const DEFAULT_FREEZE_LIMIT: Duration = Duration::from_secs(5);

impl FreezeTarget {
    pub(crate) fn new(
        layout: Layout,
        volume: VolumeId,
        mount_point: PathBuf,
        numbers: (u32, u32),
        fs_type: FsType,
    ) -> Self {
        FreezeTarget {
            layout,
            intent: Intent {
                version: INTENT_VERSION,
                volume,
                mount_point,
                major: numbers.0,
                minor: numbers.1,
                fs_type,
            },
            limit: DEFAULT_FREEZE_LIMIT,
        }
    }

    /// The longest the copy may keep the file system frozen (see `SourceCopy::copy_to`).
    pub(crate) fn with_limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    pub(crate) fn volume(&self) -> VolumeId {
        self.intent.volume
    }

    /// Records the intent durably, then freezes the file system. EBUSY (already frozen) is
    /// taken as "frozen" only when a record from an earlier life of this driver says we froze
    /// it: the file system has then been frozen since, which is what the copy needs, and the
    /// returned guard thaws it afterwards. Any other freeze belongs to someone else, and the
    /// snapshot is refused rather than thawing it under them.
    pub(crate) fn freeze(&self) -> Result<Frozen> {
        self.record()?.freeze()
    }

    /// Records every target's intent (and syncs its file system) before any is frozen: a
    /// group snapshot (see `group.rs`), whose members are then frozen all at once. Dropped
    /// without `freeze`, a `Recorded` removes its record again.
    pub(crate) fn record_all(targets: &[&FreezeTarget]) -> Result<Vec<Recorded>> {
        targets.iter().map(|t| t.record()).collect()
    }

    /// Opens the file system and records the intent durably (the step before FIFREEZE).
    fn record(&self) -> Result<Recorded> {
        let intent = &self.intent;
        let host = self.layout.host();
        // The directory, held open, names the file system whatever happens to the path.
        let fs = host.open_fs(&intent.mount_point, intent.numbers())?;
        // Flushed while the application still runs, so the freeze itself (which flushes what
        // is dirty while every write waits) is short. A failure here costs only that speed.
        if let Err(errno) = host.sync_fs(&fs) {
            tracing::warn!(mount_point = %intent.mount_point.display(), %errno, "syncfs before a freeze failed");
        }
        let path = intent_path(&self.layout, &intent.volume);
        let inherited = read_intent(host, &path).is_ok_and(|old| old.numbers() == intent.numbers());
        host.create_dir_all(&intents_dir(&self.layout))?;
        let json = serde_json::to_vec_pretty(intent)
            .map_err(|e| Error::Internal(format!("serialising a freeze record: {e}")))?;
        host.write_record(&path, &json)?;
        crate::faults::crash_point("freeze.intent_recorded");
        Ok(Recorded {
            target: self.clone(),
            fs: Some(fs),
            inherited,
        })
    }
}

/// A freeze whose intent is recorded and whose file system is not frozen yet. Dropped without
/// `freeze`, it removes its record again (unless the record is from an earlier life: that
/// freeze must still be thawed).
pub(crate) struct Recorded {
    target: FreezeTarget,
    /// `None` once frozen (moved into the `Frozen`).
    fs: Option<FsHandle>,
    inherited: bool,
}

impl Recorded {
    pub(crate) fn freeze(mut self) -> Result<Frozen> {
        let intent = self.target.intent.clone();
        let host = self.target.layout.host();
        let fs = self
            .fs
            .take()
            .ok_or_else(|| Error::Internal("frozen twice".into()))?;
        match host.freeze(&fs) {
            Ok(()) => {}
            Err(Errno::EBUSY) if self.inherited => tracing::warn!(
                volume.id = %intent.volume,
                mount_point = %intent.mount_point.display(),
                "the file system is still frozen by an interrupted snapshot of this driver; \
                 copying it as it is and thawing it afterwards"
            ),
            Err(errno) => {
                // We did not freeze it: the record must not make anyone thaw it (Drop removes
                // it, unless it is from an earlier life, whose freeze is still thawed).
                self.fs = Some(fs);
                return Err(match errno {
                    Errno::EBUSY => Error::FrozenByOther {
                        volume: intent.volume,
                        mount_point: intent.mount_point.clone(),
                    },
                    _ => Error::sys("FIFREEZE", intent.mount_point.display(), errno),
                });
            }
        }
        crate::faults::crash_point("freeze.frozen");
        Ok(Frozen {
            layout: self.target.layout.clone(),
            intent,
            fs,
        })
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if self.fs.is_some() && !self.inherited {
            let layout = &self.target.layout;
            let _ = layout
                .host()
                .remove_durably(&intent_path(layout, &self.target.intent.volume));
        }
    }
}

/// A file system frozen by `FreezeTarget::freeze`: thawed, and its record removed, when dropped
/// (also on every error path). Should the thaw fail, the record stays and the reconciler
/// retries it.
pub(crate) struct Frozen {
    layout: Layout,
    intent: Intent,
    /// The frozen file system, held open: the thaw reaches it even if its mount moved.
    fs: FsHandle,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let host = self.layout.host();
        let thawed = match host.thaw(&self.fs) {
            // EINVAL: not frozen (someone thawed it already); nothing of ours is left.
            Ok(()) | Err(Errno::EINVAL) => Ok(()),
            Err(errno) => Err(Error::sys(
                "FITHAW",
                self.intent.mount_point.display(),
                errno,
            )),
        };
        let removed = thawed.and_then(|()| {
            crate::faults::crash_point("thaw.thawed");
            host.remove_durably(&intent_path(&self.layout, &self.intent.volume))
        });
        if let Err(err) = removed {
            tracing::error!(
                volume.id = %self.intent.volume,
                mount_point = %self.intent.mount_point.display(),
                error = %err,
                "could not thaw the file system or clear its freeze record; the reconciler retries"
            );
        }
    }
}

/// Thaws the file system mounted at `path` if it is the one with `numbers`. Whether it was
/// frozen.
fn thaw_at(host: &dyn Host, path: &Path, numbers: (u32, u32)) -> Result<bool> {
    let fs = host.open_fs(path, numbers)?;
    match host.thaw(&fs) {
        Ok(()) => Ok(true),
        Err(Errno::EINVAL) => Ok(false),
        Err(errno) => Err(Error::sys("FITHAW", path.display(), errno)),
    }
}

/// Thaws what `intent` names, wherever it is now, and removes the record. Returns what was done.
fn thaw_recorded(layout: &Layout, intent: &Intent) -> Result<String> {
    let host = layout.host();
    let numbers = intent.numbers();
    let scratch = thaw_mount_point(layout, &intent.volume);
    let table = host.mounts()?;
    let done = if let Some(m) = table.iter().find(|m| (m.major, m.minor) == numbers) {
        match thaw_at(host, &m.mount_point, numbers)? {
            true => format!("thawed its file system through {}", m.mount_point.display()),
            false => "its file system was not frozen".to_string(),
        }
    } else if let Some(dev) = frozen_device(host, &layout.image(&intent.volume), numbers)? {
        // No mount left, but the volume's device is still attached (a frozen superblock keeps
        // it so): mounting it again reaches that superblock, which can then be thawed.
        host.create_dir_all(&scratch)?;
        let options = MountOptions::parse(&["nosuid".into(), "nodev".into(), "noexec".into()])
            .map_err(|why| Error::Internal(format!("thaw mount options: {why}")))?;
        let mounted = host
            .mount_device(&dev, &scratch, intent.fs_type.name(), &options)
            .or_else(|_| {
                // A file system frozen while read-only only mounts read-only again.
                let ro = MountOptions::parse(&["ro".into(), "nosuid".into(), "nodev".into()])
                    .map_err(|why| Error::Internal(format!("thaw mount options: {why}")))?;
                host.mount_device(&dev, &scratch, intent.fs_type.name(), &ro)
            });
        mounted?;
        let thawed = thaw_at(host, &scratch, numbers);
        host.unmount(&scratch)?;
        match thawed? {
            true => format!(
                "thawed its unmounted file system through a temporary mount of {}",
                dev.display()
            ),
            false => "its unmounted file system was not frozen".to_string(),
        }
    } else {
        "its device is gone; nothing of it can be frozen".to_string()
    };
    // A temporary mount a crash left behind (the thaw above went through it).
    let table = host.mounts()?;
    if mount::mounted_at(&table, &scratch).is_some_and(|m| (m.major, m.minor) == numbers) {
        host.unmount(&scratch)?;
    }
    if !host.remove_empty_dir(&scratch)? {
        let not_empty = std::io::Error::from_raw_os_error(nix::libc::ENOTEMPTY);
        return Err(Error::io("remove directory", &scratch, not_empty));
    }
    host.remove_durably(&intent_path(layout, &intent.volume))?;
    Ok(done)
}

/// The device with `numbers` among the volume's devices: a loop device holding `image`, or a
/// device layer stacked on one (the file system of a volume with layers is on the top). The
/// stacks are discovered (`Stack::find` without the metadata): a freeze record names no layers.
fn frozen_device(host: &dyn Host, image: &Path, numbers: (u32, u32)) -> Result<Option<PathBuf>> {
    for dev in host.devices_of(image)? {
        let Ok(bottom) = host.dev_numbers(dev) else {
            continue;
        };
        let stack = crate::volume::stack::Stack::find(host, dev, bottom, None)?;
        let found = stack
            .devices()
            .find(|d| d.numbers == numbers)
            .map(|d| d.path.clone());
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// What `thaw_abandoned` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Thawed {
    pub thawed: Vec<String>,
    pub failed: Vec<String>,
}

impl NodeOps {
    /// Thaws every file system a driver froze and did not thaw (it died mid-copy), and removes
    /// their records. A volume with an operation in flight in this process is skipped (its
    /// freeze may be live). Called by startup recovery and by every reconciliation round.
    pub fn thaw_abandoned(&self, skipper: &Skipper<'_>) -> Thawed {
        let layout = self.pool.layout();
        let dir = intents_dir(layout);
        let mut outcome = Thawed::default();
        let host = layout.host();
        let entries = match host.list_dir(&dir) {
            Ok(Some(entries)) => entries,
            Ok(None) => return outcome,
            Err(err) => {
                outcome.failed.push(err.to_string());
                return outcome;
            }
        };
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(files::TEMP_SUFFIX) {
                // A record write that did not finish: FIFREEZE only follows the rename.
                let _ = host.remove_durably(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".json").and_then(VolumeId::parse) else {
                continue;
            };
            let Some(_guard) = skipper.volume(&id) else {
                continue;
            };
            match read_intent(host, &path).and_then(|intent| thaw_recorded(layout, &intent)) {
                Ok(done) => {
                    let what = format!(
                        "volume {id}: a snapshot that did not finish had frozen it; {done}"
                    );
                    tracing::info!(action = "thaw", "{what}");
                    outcome.thawed.push(what);
                }
                Err(err) => {
                    let what = format!(
                        "volume {id}: its file system may still be frozen by a snapshot that did \
                         not finish, and could not be thawed: {err}; see \"A volume was left \
                         frozen\" in docs/kubernetes.md"
                    );
                    tracing::warn!(action = "thaw", "{what}");
                    outcome.failed.push(what);
                }
            }
        }
        outcome
    }

    /// Why the volume's file system may be frozen with no copy of it in flight: a record of a
    /// freeze exists and no operation on the volume is running in this process.
    pub(crate) fn abandoned_freeze(&self, id: &VolumeId, skipper: &Skipper<'_>) -> Option<String> {
        let path = intent_path(self.pool.layout(), id);
        if !matches!(self.host().node_followed(&path), Ok(Some(_))) {
            return None;
        }
        // A held guard means an operation (a snapshot or clone of it, maybe) is in flight.
        let _guard = skipper.volume(id)?;
        let at = read_intent(self.host(), &path)
            .map(|i| i.mount_point.display().to_string())
            .unwrap_or_else(|_| "its staging path".to_string());
        Some(format!(
            "the file system at {at} was frozen by a snapshot or clone that did not finish: \
             writes to it block until it is thawed (each reconciliation round and each driver \
             start retry; see \"A volume was left frozen\" in docs/kubernetes.md)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_other_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(
            dir.path(),
            std::sync::Arc::new(crate::host::linux::Linux::new(
                crate::host::tools::Tools::discover().unwrap(),
            )),
        )
        .unwrap();
        let id = VolumeId::new_random();
        let target = FreezeTarget::new(
            layout.clone(),
            id,
            PathBuf::from("/staging"),
            (7, 3),
            FsType::Ext4,
        );
        let path = intent_path(&layout, &id);
        std::fs::create_dir_all(intents_dir(&layout)).unwrap();
        std::fs::write(&path, serde_json::to_vec(&target.intent).unwrap()).unwrap();
        assert_eq!(read_intent(layout.host(), &path).unwrap(), target.intent);
        let mut newer = target.intent.clone();
        newer.version = INTENT_VERSION + 1;
        std::fs::write(&path, serde_json::to_vec(&newer).unwrap()).unwrap();
        assert!(matches!(
            read_intent(layout.host(), &path),
            Err(Error::CorruptRecord { .. })
        ));
    }

    #[test]
    fn a_directory_on_another_file_system_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // No file system has device numbers 0:0.
        let host = crate::host::linux::Linux::new(crate::host::tools::Tools::discover().unwrap());
        assert!(matches!(
            host.open_fs(dir.path(), (0, 0)),
            Err(Error::FileSystemMoved { .. })
        ));
    }
}
