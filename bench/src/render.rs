//! The markdown rendering of the report.

use std::fmt::Write as _;

use crate::data::*;
use crate::provision::*;
use crate::report::*;
use crate::scale::*;
use crate::stats::*;
use crate::MIB;

pub(crate) fn render(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let s = &report.settings;
    let _ = writeln!(out, "# loopcsi benchmark report\n");
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(out, "| | |\n| --- | --- |");
    let _ = writeln!(out, "| CPU | {} ({} cores) |", m.cpu, m.cores);
    let _ = writeln!(out, "| memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(out, "| kernel | {} |", m.kernel);
    let _ = writeln!(out, "| OS | {} |", m.os);
    let _ = writeln!(
        out,
        "| pool dir (\"disk\" pool) | `{}`: {} |",
        m.pool_dir, m.pool_filesystem
    );
    let _ = writeln!(
        out,
        "| \"ram\" pool | a tmpfs the bench mounts in its temp dir |"
    );
    let _ = writeln!(out, "| tools | {} |", m.tools.join("; "));
    let _ = writeln!(out, "| loopcsi | {} |", m.loopcsi_version);
    let _ = writeln!(
        out,
        "| loop devices at start | {} in /sys/block, {} attached |",
        m.loop_entries_at_start, m.loop_devices_attached_at_start
    );
    let _ = writeln!(out, "| command | `{}` |", m.command);
    let timing = if s.fio_runtime_s > 0 {
        format!(
            "{} s measured after {} s ramp",
            s.fio_runtime_s, s.fio_ramp_s
        )
    } else {
        format!("{} I/Os (smoke)", s.fio_number_ios)
    };
    let _ = writeln!(
        out,
        "| settings | rounds {}, fio {timing} on {} MiB, {} volumes of {} MiB per provisioning run at concurrency {:?}, scale {} volumes / {} staged |",
        s.rounds, s.fio_size_mib, s.volumes, s.volume_mib, s.concurrency, s.scale_volumes, s.scale_staged
    );
    let _ = writeln!(out, "| duration | {:.0} s |\n", report.duration_s);

    if !report.data.is_empty() {
        render_data(&mut out, report);
    }
    if let Some(p) = &report.provision {
        render_provision(&mut out, p);
    }
    if let Some(g) = &report.group {
        crate::group::render_group(&mut out, g);
    }
    if let Some(sc) = &report.scale {
        render_scale(&mut out, sc);
    }
    if !report.stall.is_empty() {
        crate::stall::render_stall(&mut out, &report.stall);
    }
    if let Some(c) = &report.cbt {
        render_cbt(&mut out, c);
    }
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(out, "| target | measured | met |\n| --- | --- | --- |");
    for c in &report.targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            c.target,
            c.measured,
            match c.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            }
        );
    }
    out
}

pub(crate) fn render_data(out: &mut String, report: &Report) {
    let s = &report.settings;
    let _ = writeln!(out, "## Data path\n");
    let _ = writeln!(
        out,
        "fio, `direct=1`, libaio, {} round(s), jobs interleaved across targets; cells are the \
         median, ± half the min–max spread. Before every job each backing image is synced and \
         dropped from the page cache.\n",
        s.rounds
    );
    for pool in &report.data {
        let _ = writeln!(out, "### {} pool: {}\n", pool.pool.name(), pool.filesystem);
        let _ = writeln!(
            out,
            "| target | loop device | direct I/O | logical block |\n| --- | --- | --- | --- |"
        );
        for d in &pool.devices {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                d.target, d.device, d.direct_io, d.logical_block_size
            );
        }
        let _ = writeln!(out);
        render_cells(out, pool, Job::heading, |c| {
            format!("{}{}", fmt_metric(c.median), spread(c))
        });
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Ratios, paired by round (the median of the per-round ratios; targets of one kind run \
             back to back): ÷ plain file / **÷ tuned loop** [lowest–highest round] / ÷ \
             buffered-512 loop of the same kind:\n"
        );
        render_ratios(out, pool);
        let _ = writeln!(out);
        let _ = writeln!(out, "Completion latency p99 (µs, median over rounds):\n");
        render_cells(out, pool, Job::key, |c| format!("{:.0}", c.clat_p99_us));
        let _ = writeln!(out);
    }
}

/// The header of a table with a column per job, named by `name`.
fn job_header(out: &mut String, name: fn(Job) -> &'static str) {
    let _ = write!(out, "| target |");
    for job in JOBS {
        let _ = write!(out, " {} |", name(job));
    }
    let _ = writeln!(out, "\n| --- |{}", " ---: |".repeat(JOBS.len()));
}

/// A table of every target's cells, a column per job, each shown by `show` (– when missing).
fn render_cells(
    out: &mut String,
    pool: &DataPoolResult,
    name: fn(Job) -> &'static str,
    show: impl Fn(&DataCell) -> String,
) {
    job_header(out, name);
    for target in &pool.targets {
        let _ = write!(out, "| {target} |");
        for job in JOBS {
            match pool
                .cells
                .iter()
                .find(|c| &c.target == target && c.job == job)
            {
                Some(c) => {
                    let _ = write!(out, " {} |", show(c));
                }
                None => {
                    let _ = write!(out, " – |");
                }
            }
        }
        let _ = writeln!(out);
    }
}

/// The ratios of every loop target, a column per job.
fn render_ratios(out: &mut String, pool: &DataPoolResult) {
    job_header(out, Job::key);
    for kind in DATA_KINDS {
        for variant in [Variant::Volume, Variant::Tuned, Variant::Buffered512] {
            let target = Target::Loop(variant, kind);
            let _ = write!(out, "| {} |", target.key());
            for job in JOBS {
                let _ = write!(out, " {} |", ratio_cell(pool, target, job));
            }
            let _ = writeln!(out);
        }
    }
}

/// A loop target's ratios for one job: ÷ plain file, and for a volume also ÷ tuned loop (with
/// the rounds' range) and ÷ buffered-512 loop.
fn ratio_cell(pool: &DataPoolResult, target: Target, job: Job) -> String {
    let ratio = |base: Target| -> String {
        pool.paired(target, base, job)
            .map_or("–".into(), |r| format!("{:.2}", r.median))
    };
    let Target::Loop(Variant::Volume, kind) = target else {
        return format!("{} / – / –", ratio(Target::Plain));
    };
    let tuned = Target::Loop(Variant::Tuned, kind);
    let range = pool.paired(target, tuned, job).map_or(String::new(), |r| {
        let lo = r.per_round.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.per_round.iter().copied().fold(0.0, f64::max);
        if r.per_round.len() > 1 {
            format!(" [{lo:.2}–{hi:.2}]")
        } else {
            String::new()
        }
    });
    format!(
        "{} / **{}**{range} / {}",
        ratio(Target::Plain),
        ratio(tuned),
        ratio(Target::Loop(Variant::Buffered512, kind))
    )
}

fn thin_or_thick(l: &LifecycleResult) -> &'static str {
    if l.thick {
        "thick"
    } else {
        "thin"
    }
}

pub(crate) fn render_provision(out: &mut String, p: &ProvisionResult) {
    let _ = writeln!(out, "## Provisioning\n");
    let _ = writeln!(
        out,
        "Pool: {}. Each volume ({} MiB) goes Create → Stage → Publish → Unpublish → Unstage → \
         Delete; `concurrency` volumes are in flight at once. \"driver\" is the RPCs of the \
         in-process driver over its unix socket; \"direct\" is the same kernel and tool steps \
         run by the bench itself (durable image file, LOOP_CONFIGURE attach, mkfs, mount, bind, \
         umount, detach, unlink; no blkid -p, which the driver skips for a never-written image). \
         Cells: p50 / p99 in ms.\n",
        p.filesystem, p.volume_mib
    );
    render_lifecycles(out, p);
    for note in &p.notes {
        let _ = writeln!(out, "- {note}");
    }
    if !p.notes.is_empty() {
        let _ = writeln!(out);
    }
    render_direct_steps(out, p);
    let _ = writeln!(out, "Attach and detach, one at a time:\n");
    let _ = writeln!(out, "| step | p50 ms | p99 ms |\n| --- | ---: | ---: |");
    for t in &p.tool_steps {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            t.step,
            fmt_ms(t.summary.p50),
            fmt_ms(t.summary.p99)
        );
    }
    let _ = writeln!(out);
    render_first_stage(out, p);
}

/// Every lifecycle, driver and direct: per RPC p50 / p99, and volumes per second.
fn render_lifecycles(out: &mut String, p: &ProvisionResult) {
    let _ = write!(out, "| kind | prov. | conc. | path |");
    for rpc in RPCS {
        let _ = write!(out, " {rpc} |");
    }
    let _ = writeln!(
        out,
        " volumes/s |\n| --- | --- | ---: | --- |{} ---: |",
        " ---: |".repeat(RPCS.len())
    );
    for l in &p.lifecycles {
        let _ = write!(
            out,
            "| {} | {} | {} | {} |",
            l.kind.name(),
            thin_or_thick(l),
            l.concurrency,
            match l.path {
                LifecyclePath::Driver => "driver",
                LifecyclePath::Direct => "direct",
            }
        );
        for r in &l.rpcs {
            let _ = write!(out, " {} / {} |", fmt_ms(r.p50), fmt_ms(r.p99));
        }
        let _ = writeln!(out, " {:.1} |", l.volumes_per_s);
    }
    let _ = writeln!(out);
}

/// The direct lifecycles step by step.
fn render_direct_steps(out: &mut String, p: &ProvisionResult) {
    let _ = writeln!(
        out,
        "Direct steps (p50 / p99 ms), where the time of a lifecycle goes:\n"
    );
    let _ = write!(out, "| kind | prov. | conc. |");
    for step in STEPS {
        let _ = write!(out, " {step} |");
    }
    let _ = writeln!(
        out,
        "\n| --- | --- | ---: |{}",
        " ---: |".repeat(STEPS.len())
    );
    for l in p
        .lifecycles
        .iter()
        .filter(|l| l.path == LifecyclePath::Direct)
    {
        let _ = write!(
            out,
            "| {} | {} | {} |",
            l.kind.name(),
            thin_or_thick(l),
            l.concurrency
        );
        for st in &l.steps {
            let _ = write!(out, " {} / {} |", fmt_ms(st.p50), fmt_ms(st.p99));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
}

/// First stages: the driver's beside the same steps by hand, paired.
fn render_first_stage(out: &mut String, p: &ProvisionResult) {
    let _ = writeln!(
        out,
        "First stage of a fresh thin ext4 volume. Each driver stage (CreateVolume, then the \
         timed NodeStageVolume) ran back to back with the same steps done by hand on a fresh \
         file in the same pool, the two taking turns going first; the ratio is the median of \
         the per-pair ratios (p50 ms):\n"
    );
    let _ = writeln!(
        out,
        "| pool | size | pairs | driver CreateVolume | driver NodeStageVolume p50 / max | direct attach | direct mkfs | direct mount | direct mkfs + mount | stage ÷ (mkfs + mount) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for b in &p.first_stage {
        let create = b
            .driver_create
            .as_ref()
            .map_or("–".into(), |s| fmt_ms(s.p50));
        let stage = b
            .driver_stage
            .as_ref()
            .map_or(format!("– ({})", b.driver_note), |s| {
                format!("{} / {}", fmt_ms(s.p50), fmt_ms(s.max))
            });
        let ratio = b
            .ratio_to_mkfs_mount
            .as_ref()
            .map_or("–".into(), |r| format!("{:.2}×", r.p50));
        let _ = writeln!(
            out,
            "| {} ({}) | {} MiB | {} | {create} | {stage} | {} | {} | {} | {} | {ratio} |",
            b.pool.name(),
            b.filesystem.split(" mounted at").next().unwrap_or(""),
            b.size_mib,
            b.direct_mkfs.n,
            fmt_ms(b.direct_attach.p50),
            fmt_ms(b.direct_mkfs.p50),
            fmt_ms(b.direct_mount.p50),
            fmt_ms(b.direct_mkfs_mount.p50),
        );
    }
    let _ = writeln!(out);
}

/// "p50 … ms, p99 … ms" of a summary.
fn p50_p99(x: &Summary) -> String {
    format!("p50 {} ms, p99 {} ms", fmt_ms(x.p50), fmt_ms(x.p99))
}

/// Milliseconds, comma-separated.
fn ms_list(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| fmt_ms(*v))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn render_scale(out: &mut String, s: &ScaleResult) {
    let _ = writeln!(out, "## Scale\n");
    let _ = writeln!(
        out,
        "The real `loopcsi` binary as a child (default flags, logs to a file), pool: {}. {} thin \
         ext4 volumes of {} MiB created and {} of them staged (8 RPCs in flight).\n",
        s.filesystem, s.volumes, s.volume_mib, s.staged
    );
    let _ = writeln!(out, "| measure | value |\n| --- | --- |");
    let _ = writeln!(
        out,
        "| first start to ready (empty pool) | {} ms |",
        fmt_ms(s.first_start_to_ready_ms)
    );
    let _ = writeln!(
        out,
        "| CreateVolume | {}; {:.0} volumes/s |",
        p50_p99(&s.create),
        s.create_per_s
    );
    let _ = writeln!(
        out,
        "| NodeStageVolume | {}; {:.1} volumes/s |",
        p50_p99(&s.stage),
        s.stage_per_s
    );
    let _ = writeln!(
        out,
        "| RSS under load (VmRSS / VmHWM / threads) | {:.1} MiB / {:.1} MiB / {} |",
        s.rss_loaded.vm_rss_mib, s.rss_loaded.vm_hwm_mib, s.rss_loaded.threads
    );
    let _ = writeln!(
        out,
        "| ListVolumes of all (one page) | {} |",
        p50_p99(&s.list_all)
    );
    let _ = writeln!(
        out,
        "| ListVolumes of all (pages of 100) | {} |",
        p50_p99(&s.list_paged_100)
    );
    let _ = writeln!(out, "| GetCapacity | {} |", p50_p99(&s.get_capacity));
    let _ = writeln!(
        out,
        "| NodeGetVolumeStats (staged volumes) | {} |",
        p50_p99(&s.volume_stats)
    );
    render_scale_after_load(out, s);
}

/// The scale table's rows from the kernel scans on: scans, restarts, and the teardown.
fn render_scale_after_load(out: &mut String, s: &ScaleResult) {
    let _ = writeln!(
        out,
        "| `loopdev::attached()` ({} loop entries in /sys/block, {} attached) | {} |",
        s.sysfs_loop_entries,
        s.attached_loop_devices,
        p50_p99(&s.scan_loop_devices)
    );
    let _ = writeln!(
        out,
        "| `mount::mounts()` ({} entries in mountinfo) | {} |",
        s.mount_entries,
        p50_p99(&s.scan_mountinfo)
    );
    let _ = writeln!(
        out,
        "| restart (SIGTERM, start) to Probe ready | {} ms (socket accepting after {} ms) |",
        ms_list(&s.restarts_to_ready_ms),
        ms_list(&s.restart_socket_ms)
    );
    let _ = writeln!(
        out,
        "| RSS after restart (VmRSS / VmHWM / threads) | {:.1} MiB / {:.1} MiB / {} |",
        s.rss_after_restart.vm_rss_mib, s.rss_after_restart.vm_hwm_mib, s.rss_after_restart.threads
    );
    let _ = writeln!(
        out,
        "| ListVolumes of all after restart | {} |",
        p50_p99(&s.list_all_after_restart)
    );
    let _ = writeln!(out, "| NodeUnstageVolume | {} |", p50_p99(&s.unstage));
    let _ = writeln!(out, "| DeleteVolume | {} |\n", p50_p99(&s.delete));
}

fn render_cbt(out: &mut String, c: &crate::cbt::CbtResult) {
    let secs = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "## Changed-block tracking\n");
    let _ = writeln!(
        out,
        "A {} GiB thin block volume on {}: {} MiB of data, snapshot A, {} random 4 KiB blocks \
         (1 %) rewritten, snapshot B.\n",
        c.volume_gib,
        c.pool,
        c.base_bytes / MIB,
        c.changed_blocks
    );
    let _ = writeln!(
        out,
        "| RPC | ranges | bytes named | seconds per run |\n| --- | ---: | ---: | --- |"
    );
    let _ = writeln!(
        out,
        "| GetMetadataDelta A→B | {} | {} (exact: {}) | {} |",
        c.delta_ranges,
        c.delta_bytes,
        c.exact,
        secs(&c.delta_s)
    );
    let _ = writeln!(
        out,
        "| GetMetadataAllocated A | {} | | {} |\n",
        c.allocated_ranges,
        secs(&c.allocated_s)
    );
}
