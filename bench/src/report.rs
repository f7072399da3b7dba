//! The report: machine facts, the measurements, and the check of the targets.

use std::path::Path;

use crate::args::*;
use crate::data::*;
use crate::driver::*;
use crate::provision::*;
use crate::scale::*;
use crate::tools::*;
use loopcsi::host::loopdev;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    pub(crate) os: String,
    pub(crate) pool_dir: String,
    pub(crate) pool_filesystem: String,
    pub(crate) tools: Vec<String>,
    pub(crate) loopcsi_version: String,
    pub(crate) command: String,
    /// Loop devices the kernel lists at the start (attached or not: they stay after detach).
    pub(crate) loop_entries_at_start: usize,
    pub(crate) loop_devices_attached_at_start: usize,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct TargetCheck {
    pub(crate) target: String,
    pub(crate) measured: String,
    /// None: not measurable on this machine (said why in `measured`).
    pub(crate) met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    pub(crate) settings: Settings,
    pub(crate) data: Vec<DataPoolResult>,
    pub(crate) provision: Option<ProvisionResult>,
    pub(crate) scale: Option<ScaleResult>,
    pub(crate) stall: Vec<crate::stall::StallResult>,
    pub(crate) group: Option<crate::group::GroupResult>,
    pub(crate) cbt: Option<crate::cbt::CbtResult>,
    pub(crate) targets: Vec<TargetCheck>,
    pub(crate) duration_s: f64,
}

pub(crate) fn machine_info(pool_dir: &Path, settings: &Settings, tools: &Tools) -> Machine {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_string());
    let memory_kb: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("unknown".into(), |v| v.trim_matches('"').to_string());
    let command = std::env::args()
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let _ = settings;
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: memory_kb / 1024.0 / 1024.0,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        os,
        pool_dir: pool_dir.display().to_string(),
        pool_filesystem: filesystem_of(pool_dir),
        tools: vec![
            tool_version(&tools.fio, "--version"),
            tool_version(&tools.mkfs_ext4, "-V"),
            tool_version(&tools.mkfs_xfs, "-V"),
            tool_version(&tools.losetup, "--version"),
        ],
        loopcsi_version: env!("CARGO_PKG_VERSION").to_string(),
        command,
        loop_entries_at_start: std::fs::read_dir("/sys/block").map_or(0, |dir| {
            dir.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .count()
        }),
        loop_devices_attached_at_start: loopdev::attached().map_or(0, |v| v.len()),
    }
}

/// Checks the targets against the measurements.
/// Checks the targets against the measurements.
pub(crate) fn evaluate(report: &Report) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    check_data(report, &mut checks);
    if let Some(p) = &report.provision {
        check_provision(report, p, &mut checks);
    }
    if let Some(s) = &report.scale {
        check_scale(s, &mut checks);
    }
    if let Some(g) = &report.group {
        checks.push(crate::group::check_group(g));
    }
    if let Some(c) = &report.cbt {
        let worst = c.delta_s.iter().copied().fold(0.0, f64::max);
        checks.push(TargetCheck {
            target: format!(
                "GetMetadataDelta of a {} GiB thin volume with 1 % of its blocks changed, all \
                 ranges streamed, < 1 s (xfs-reflink pool)",
                c.volume_gib
            ),
            measured: format!(
                "{:.3} s (worst of {}), {} ranges, exact: {}",
                worst,
                c.delta_s.len(),
                c.delta_ranges,
                c.exact
            ),
            met: Some(worst < 1.0 && c.exact),
        });
    }
    checks
}

/// The data-path targets: every volume within its margin of the base it is compared with.
fn check_data(report: &Report, checks: &mut Vec<TargetCheck>) {
    for pool in &report.data {
        let mut worst: Option<(f64, String)> = None;
        let mut misses = Vec::new();
        for kind in [VolKind::Ext4, VolKind::Xfs, VolKind::Block] {
            for job in JOBS {
                let Some(paired) = pool.paired(
                    Target::Loop(Variant::Volume, kind),
                    Target::Loop(Variant::Tuned, kind),
                    job,
                ) else {
                    continue;
                };
                let ratio = paired.median;
                let what = format!("{} {}", kind.name(), job.key());
                if ratio < 0.95 {
                    misses.push(format!("{what} {ratio:.2}"));
                }
                if worst.as_ref().is_none_or(|(w, _)| ratio < *w) {
                    worst = Some((ratio, what));
                }
            }
        }
        if let Some((ratio, what)) = worst {
            checks.push(TargetCheck {
                target: format!(
                    "every fio job through a volume ≥ 0.95× the tuned loop ({} pool)",
                    pool.pool.name()
                ),
                measured: if misses.is_empty() {
                    format!("lowest {ratio:.2} ({what})")
                } else {
                    format!("below: {}", misses.join(", "))
                },
                met: Some(misses.is_empty()),
            });
        }
    }
}

/// The provisioning targets: first stage, lifecycle latencies and scaling with concurrency.
fn check_provision(report: &Report, p: &ProvisionResult, checks: &mut Vec<TargetCheck>) {
    checks.extend(
        p.first_stage
            .iter()
            .map(|first| check_first_stage(p, first)),
    );
    let c8 = if report.settings.concurrency.contains(&8) {
        8
    } else {
        report
            .settings
            .concurrency
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
    };
    for kind in [VolKind::Ext4, VolKind::Block] {
        if let Some(d) = p.find(kind, false, c8, LifecyclePath::Driver) {
            let s = &d.rpcs[0];
            checks.push(TargetCheck {
                target: format!(
                    "CreateVolume (thin, {}) p50 ≤ 2 ms and p99 ≤ 10 ms at concurrency {c8}",
                    kind.name()
                ),
                measured: format!("p50 {:.2} ms, p99 {:.2} ms", s.p50, s.p99),
                met: Some(s.p50 <= 2.0 && s.p99 <= 10.0),
            });
        }
    }
    for kind in [VolKind::Ext4, VolKind::Block] {
        for thick in [false, true] {
            if let (Some(one), Some(many)) = (
                p.find(kind, thick, 1, LifecyclePath::Driver),
                p.find(kind, thick, c8, LifecyclePath::Driver),
            ) {
                if c8 == 1 {
                    continue;
                }
                let ratio = many.volumes_per_s / one.volumes_per_s;
                checks.push(TargetCheck {
                    target: format!(
                        "lifecycle throughput at concurrency {c8} ≥ 2× concurrency 1 ({} {})",
                        kind.name(),
                        if thick { "thick" } else { "thin" }
                    ),
                    measured: format!(
                        "{:.1} vs {:.1} volumes/s: {ratio:.2}×",
                        many.volumes_per_s, one.volumes_per_s
                    ),
                    met: Some(ratio >= 2.0),
                });
            }
        }
    }
}

/// The first-stage target of one measured size and pool: the ratio to mkfs + mount by hand for
/// the provisioning size, under a second for the big one, or why the driver could not run it.
fn check_first_stage(p: &ProvisionResult, first: &FirstStageResult) -> TargetCheck {
    let big = first.size_mib != p.volume_mib;
    let (target, measured, met) = match (&first.driver_stage, &first.ratio_to_mkfs_mount) {
        (Some(stage), Some(ratio)) if !big => (
            format!(
                "Stage of a fresh {} MiB ext4 volume ≤ 1.2× the same mkfs + mount done directly ({} pool)",
                first.size_mib,
                first.pool.name()
            ),
            format!(
                "{:.2}× (median of {} back-to-back pairs; p50 driver stage {:.2} ms, direct mkfs + mount {:.2} ms, direct attach {:.2} ms)",
                ratio.p50,
                ratio.n,
                stage.p50,
                first.direct_mkfs_mount.p50,
                first.direct_attach.p50
            ),
            Some(ratio.p50 <= 1.2),
        ),
        (Some(stage), _) => (
            format!(
                "first stage of a {} GiB volume < 1 s ({} pool)",
                first.size_mib / 1024,
                first.pool.name()
            ),
            format!(
                "{:.0} ms max of {} (direct mkfs + mount p50 {:.0} ms)",
                stage.max, stage.n, first.direct_mkfs_mount.p50
            ),
            Some(stage.max < 1000.0),
        ),
        (None, _) => (
            format!(
                "first stage of a {} MiB volume ({} pool)",
                first.size_mib,
                first.pool.name()
            ),
            format!(
                "not measurable through the driver: {}; done directly: mkfs + mount {:.0} ms p50",
                first.driver_note, first.direct_mkfs_mount.p50
            ),
            None,
        ),
    };
    TargetCheck {
        target,
        measured,
        met,
    }
}

/// The scale targets: memory, restart to ready and the listing RPCs with many volumes.
fn check_scale(s: &ScaleResult, checks: &mut Vec<TargetCheck>) {
    checks.push(TargetCheck {
        target: "CreateVolume (thin) p50 ≤ 2 ms and p99 ≤ 10 ms with 8 in flight, creates \
                 only (scale section, real binary)"
            .into(),
        measured: format!(
            "p50 {:.2} ms, p99 {:.2} ms over {} creates",
            s.create.p50, s.create.p99, s.create.n
        ),
        met: Some(s.create.p50 <= 2.0 && s.create.p99 <= 10.0),
    });
    let rss = s.rss_loaded.vm_rss_mib.max(s.rss_after_restart.vm_rss_mib);
    checks.push(TargetCheck {
        target: format!(
            "driver RSS ≤ 32 MiB with {} volumes, {} staged",
            s.volumes, s.staged
        ),
        measured: format!(
            "{:.1} MiB after the load (peak {:.1}), {:.1} MiB after a restart",
            s.rss_loaded.vm_rss_mib, s.rss_loaded.vm_hwm_mib, s.rss_after_restart.vm_rss_mib
        ),
        met: Some(rss <= 32.0),
    });
    let worst = s.restarts_to_ready_ms.iter().copied().fold(0.0, f64::max);
    checks.push(TargetCheck {
        target: "restart to ready (Probe) ≤ 1 s".into(),
        measured: format!(
            "{} ms",
            s.restarts_to_ready_ms
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        met: Some(worst <= 1000.0 && !s.restarts_to_ready_ms.is_empty()),
    });
    checks.push(TargetCheck {
        target: format!("ListVolumes of all {} volumes ≤ 50 ms", s.volumes),
        measured: format!("p50 {:.1} ms, p99 {:.1} ms", s.list_all.p50, s.list_all.p99),
        met: Some(s.list_all.p99 <= 50.0),
    });
}

pub(crate) fn fmt_metric(value: f64) -> String {
    if value >= 100_000.0 {
        format!("{:.0}k", value / 1e3)
    } else if value >= 10_000.0 {
        format!("{:.1}k", value / 1e3)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

pub(crate) fn fmt_ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

pub(crate) fn spread(cell: &DataCell) -> String {
    if cell.samples.len() < 2 || cell.median <= 0.0 {
        return String::new();
    }
    let pct = (cell.max - cell.min) / cell.median * 100.0;
    format!(" ±{:.0}%", pct / 2.0)
}
