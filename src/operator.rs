//! The operator commands `loopcsi status` and `loopcsi gc`. Neither needs the driver to be
//! running, and both are safe beside a live one: status only reads, and gc only removes
//! orphans old enough not to belong to an operation in flight.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::host::tools::Tools;
use crate::volume::node::NodeOps;
use crate::volume::params::VolumeKind;
use crate::volume::pool::{Layout, Pool};
use crate::volume::reconcile::{GcPolicy, ReconcileReport};
use crate::volume::status::VolumeStatus;

fn open_read_only(state_dir: &Path) -> Result<NodeOps> {
    if !state_dir.join("volumes").is_dir() {
        return Err(Error::invalid(
            "--state-dir",
            format!("{} holds no loopcsi pool", state_dir.display()),
        ));
    }
    let layout = Layout::prepare(state_dir)?;
    if let Some(warning) = layout.durability_warning() {
        tracing::warn!("{warning}");
    }
    let (pool, recovery) = Pool::open_read_only(layout)?;
    for path in &recovery.unreadable {
        tracing::warn!(path = %path.display(), "unreadable metadata (the volume is not listed)");
    }
    Ok(NodeOps::new(Arc::new(pool), Tools::discover()?, true))
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

fn table(volumes: &[VolumeStatus]) -> String {
    let header = [
        "ID",
        "NAME",
        "SIZE",
        "ALLOCATED",
        "FS",
        "DEVICE",
        "STAGED",
        "PUBLISHED",
        "HEALTH",
    ];
    let rows: Vec<[String; 9]> = volumes
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.name.escape_debug().to_string(),
                human(v.capacity_bytes),
                human(v.allocated_bytes),
                match v.kind {
                    VolumeKind::Filesystem(fs) => fs.name().to_string(),
                    VolumeKind::Block => "block".to_string(),
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

/// `loopcsi status`: this node's volumes as a table or JSON.
pub fn status(state_dir: &Path, json: bool) -> Result<String> {
    let node = open_read_only(state_dir)?;
    let volumes = node.volume_statuses()?;
    if json {
        serde_json::to_string_pretty(&volumes)
            .map(|s| s + "\n")
            .map_err(|e| Error::Internal(format!("encoding JSON: {e}")))
    } else {
        Ok(table(&volumes))
    }
}

/// `loopcsi gc`: collects (or, with `dry_run`, lists) orphans older than `min_age`.
pub fn gc(state_dir: &Path, dry_run: bool, min_age: Duration) -> Result<ReconcileReport> {
    let node = open_read_only(state_dir)?;
    let mut report = ReconcileReport::default();
    node.collect_orphans(GcPolicy { min_age, dry_run }, &mut report)?;
    Ok(report)
}
