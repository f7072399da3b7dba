//! The operator commands `loopcsi status` and `loopcsi gc`. Neither needs the driver to be
//! running. `status` only reads, so it is safe beside a live driver; so is `gc --dry-run`.
//! `gc` removes files, so it takes the state dir's lock (`volume::statedir`) and is refused
//! while a driver serves the state dir: that driver's own reconciliation rounds collect the
//! same orphans without racing its operations in flight.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::host::linux::Linux;
use crate::host::os::Host;
use crate::host::tools::Tools;
use crate::volume::params::VolumeKind;
use crate::volume::pool::{self, SnapshotMeta, VolumeMeta};
use crate::volume::reconcile::{GcPolicy, ReconcileReport};
use crate::volume::statedir;
use crate::volume::status::VolumeStatus;
use crate::volume::Volumes;

fn require_pool(state_dir: &Path) -> Result<()> {
    if state_dir.join("volumes").is_dir() {
        Ok(())
    } else {
        Err(Error::invalid(
            "--state-dir",
            format!("{} holds no loopcsi pool", state_dir.display()),
        ))
    }
}

/// The pool opened without changing anything, with the metadata files it could not read.
fn open_read_only(state_dir: &Path) -> Result<(Volumes, Vec<PathBuf>)> {
    require_pool(state_dir)?;
    let host = std::sync::Arc::new(Linux::new(Tools::discover()?));
    let (volumes, recovery) = Volumes::open_read_only(state_dir, host)?;
    Ok((volumes, recovery.unreadable))
}

/// A metadata file `status` could not read. It is listed (never silently left out), unhealthy,
/// with the path and the reason.
#[derive(Clone, Debug, Serialize)]
struct Unreadable {
    id: String,
    path: PathBuf,
    unreadable: bool,
    reason: String,
    healthy: bool,
    health: String,
}

impl Unreadable {
    fn new(host: &dyn Host, path: PathBuf) -> Self {
        let id = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        // Read it again for the reason (recovery logs it but keeps only the path).
        let loaded = if path.parent().and_then(Path::file_name) == Some("snapshots".as_ref()) {
            pool::load_meta::<SnapshotMeta>(host, &path, &id).map(drop)
        } else {
            pool::load_meta::<VolumeMeta>(host, &path, &id).map(drop)
        };
        let reason = match loaded {
            Ok(()) => "unreadable when the pool was opened; readable now".to_string(),
            Err(Error::Io { op, source, .. }) => format!("{op}: {source}"),
            Err(Error::CorruptRecord { reason, .. }) => reason.to_string(),
            Err(other) => other.to_string(),
        };
        let health = format!("UNREADABLE {}: {reason}", path.display());
        Unreadable {
            id,
            path,
            unreadable: true,
            reason,
            healthy: false,
            health,
        }
    }
}

/// One line of `status`: a volume, or metadata that could not be read.
#[derive(Serialize)]
#[serde(untagged)]
enum Entry {
    Volume(VolumeStatus),
    Unreadable(Unreadable),
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn table(entries: &[Entry]) -> String {
    let header = [
        "ID",
        "NAME",
        "SIZE",
        "ALLOCATED",
        "FS",
        "FORMATTED",
        "DEVICE",
        "STAGED",
        "PUBLISHED",
        "HEALTH",
    ];
    let rows: Vec<[String; 10]> = entries
        .iter()
        .map(|entry| match entry {
            Entry::Volume(v) => volume_row(v),
            Entry::Unreadable(u) => {
                let mut row: [String; 10] = std::array::from_fn(|_| "?".to_string());
                row[0] = u.id.clone();
                row[9] = u.health.clone();
                row
            }
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    out.join("\n") + "\n"
}

fn volume_row(v: &VolumeStatus) -> [String; 10] {
    [
        v.id.clone(),
        v.name.escape_debug().to_string(),
        human(v.capacity_bytes),
        human(v.allocated_bytes),
        match v.kind {
            VolumeKind::Filesystem(fs) => fs.name().to_string(),
            VolumeKind::Block => "block".to_string(),
        },
        match (v.kind, v.formatted) {
            (VolumeKind::Block, _) => "-".to_string(),
            (_, true) => "yes".to_string(),
            (_, false) => "no".to_string(),
        },
        v.loop_device.clone().unwrap_or_else(|| "-".into()),
        v.staged_at
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string()),
        if v.published_at.is_empty() {
            "-".into()
        } else {
            v.published_at
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(",")
        },
        v.health.clone(),
    ]
}

/// `loopcsi status`: this node's volumes as a table or JSON, then the metadata files that
/// could not be read (marked unreadable, with the path and the reason).
pub fn status(state_dir: &Path, json: bool) -> Result<String> {
    let (node, mut unreadable) = open_read_only(state_dir)?;
    unreadable.sort();
    let entries: Vec<Entry> = node
        .statuses()?
        .into_iter()
        .map(Entry::Volume)
        .chain(
            unreadable
                .into_iter()
                .map(|p| Entry::Unreadable(Unreadable::new(node.host(), p))),
        )
        .collect();
    if json {
        serde_json::to_string_pretty(&entries)
            .map(|s| s + "\n")
            .map_err(|e| Error::Internal(format!("encoding JSON: {e}")))
    } else {
        Ok(table(&entries))
    }
}

/// `loopcsi gc`: collects (or, with `dry_run`, lists) orphans older than `min_age`. Collecting
/// holds the state dir's lock, so it is refused while a driver serves the state dir.
pub fn gc(state_dir: &Path, dry_run: bool, min_age: Duration) -> Result<ReconcileReport> {
    require_pool(state_dir)?;
    let _lock = if dry_run {
        None
    } else {
        let host = Linux::new(Tools::discover()?);
        Some(statedir::lock_for_gc(&host, state_dir)?)
    };
    let (node, _) = open_read_only(state_dir)?;
    node.collect_orphans(GcPolicy { min_age, dry_run })
}

/// `loopcsi rescue`: copies a staged volume whose image is gone from its loop device into a
/// new image (see `volume::rescue`). It opens the pool without changing anything else, so it is
/// safe beside a live driver, whose NodeUnstageVolume refuses to detach that device meanwhile
/// and whose reconciler only reports it.
pub fn rescue(state_dir: &Path, volume: &str) -> Result<String> {
    let id = crate::volume::id::VolumeId::parse(volume).ok_or_else(|| {
        Error::invalid(
            "--volume",
            format!("{} is not a loopcsi volume id", crate::error::shown(volume)),
        )
    })?;
    let (node, _) = open_read_only(state_dir)?;
    node.rescue(&id)
}
