//! Running fio: the order of targets, flushing the backing files, one job and its JSON, and
//! the rounds of every job on every target.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::args::*;
use crate::data::*;
use crate::scratch::*;
use crate::stats::*;
use crate::tools::*;
use crate::*;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// The order of the targets for one job of one round. Targets of one kind (the volume, its
/// tuned loop and its buffered-512 loop) run back to back, so their ratios compare runs made
/// within seconds of each other; the order of the groups and inside each group is shuffled
/// afresh for every job and round, so no target always follows the same neighbour (whose
/// writeback could slow it down).
pub(crate) fn run_order(prepared: &[Prepared], seed: u64) -> Vec<usize> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let kind_of = |t: Target| match t {
        Target::Plain => None,
        Target::Loop(_, kind) => Some(kind),
    };
    for (i, p) in prepared.iter().enumerate() {
        let kind = kind_of(p.target);
        match groups
            .iter_mut()
            .find(|g| kind.is_some() && kind_of(prepared[g[0]].target) == kind)
        {
            Some(group) => group.push(i),
            None => groups.push(vec![i]),
        }
    }
    let mut order = Vec::with_capacity(prepared.len());
    for (g, pick) in shuffled(groups.len(), seed).into_iter().enumerate() {
        let group = &groups[pick];
        for k in shuffled(
            group.len(),
            seed.wrapping_mul(31).wrapping_add(g as u64 + 1),
        ) {
            order.push(group[k]);
        }
    }
    order
}

/// A permutation of 0..n, fixed by `seed` (xorshift64* Fisher–Yates; no randomness needed
/// beyond decorrelating the order of targets).
pub(crate) fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Syncs every backing image and drops it from the page cache (buffered loop devices would
/// otherwise serve reads from memory and leave writeback to the next target).
pub(crate) fn flush_backing(prepared: &[Prepared]) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    for p in prepared {
        if let Ok(file) = std::fs::File::open(&p.backing) {
            let _ = file.sync_data();
            let _ = posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        }
    }
}

/// Prefills every target, then runs every job on every target for the rounds, in the order
/// of [`run_order`]; one cell per target and job.
pub(crate) async fn measure(
    settings: &Settings,
    tools: &Tools,
    prepared: &[Prepared],
    fio_out: &Path,
    pool: PoolKind,
    log: &Progress,
) -> Result<Vec<DataCell>> {
    // Prefill every file and device, so reads hit written blocks and writes overwrite.
    log.say(format!(
        "data/{}: prefilling {} targets",
        pool.name(),
        prepared.len()
    ));
    for p in prepared {
        run_fio(
            tools,
            settings,
            &p.fio_file,
            None,
            &fio_out.join("prefill.json"),
        )
        .await?;
    }

    let mut samples: BTreeMap<(usize, usize), Vec<FioResult>> = BTreeMap::new();
    for round in 0..settings.rounds {
        for (j, job) in JOBS.iter().enumerate() {
            for t in run_order(prepared, (round * JOBS.len() + j) as u64) {
                let p = &prepared[t];
                flush_backing(prepared);
                let out = fio_out.join(format!("r{round}-{}-{t}.json", job.key()));
                let result = run_fio(tools, settings, &p.fio_file, Some(*job), &out).await?;
                log.say(format!(
                    "data/{} round {}/{} {:24} {:28} {:>10.1} {}",
                    pool.name(),
                    round + 1,
                    settings.rounds,
                    job.key(),
                    p.target.key(),
                    result.metric(*job),
                    if job.bandwidth() { "MiB/s" } else { "IOPS" }
                ));
                samples.entry((t, j)).or_default().push(result);
            }
        }
    }
    Ok(cells_of(prepared, &samples))
}

/// The cells of the samples of (target, job) over the rounds: median, range, and the median
/// of the rounds' p99 latencies.
fn cells_of(
    prepared: &[Prepared],
    samples: &BTreeMap<(usize, usize), Vec<FioResult>>,
) -> Vec<DataCell> {
    let mut cells = Vec::new();
    for ((t, j), results) in samples {
        let job = JOBS[*j];
        let values: Vec<f64> = results.iter().map(|r| r.metric(job)).collect();
        let p99s: Vec<f64> = results.iter().map(|r| r.clat_p99_us).collect();
        cells.push(DataCell {
            target: prepared[*t].target.key(),
            job,
            unit: if job.bandwidth() { "MiB/s" } else { "IOPS" },
            median: median(&values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(0.0, f64::max),
            samples: values,
            clat_p99_us: median(&p99s),
        });
    }
    cells
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct FioResult {
    pub(crate) iops: f64,
    pub(crate) bw_mib_s: f64,
    pub(crate) clat_p50_us: f64,
    pub(crate) clat_p99_us: f64,
}

impl FioResult {
    pub(crate) fn metric(&self, job: Job) -> f64 {
        if job.bandwidth() {
            self.bw_mib_s
        } else {
            self.iops
        }
    }
}

/// Runs one fio job (`None`: the prefill, a sequential write of the whole file) and parses its
/// JSON output.
pub(crate) async fn run_fio(
    tools: &Tools,
    settings: &Settings,
    file: &Path,
    job: Option<Job>,
    out: &Path,
) -> Result<FioResult> {
    let mut args: Vec<String> = vec![
        "--name=bench".into(),
        format!("--filename={}", file.display()),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        format!("--size={}M", settings.fio_size_mib),
        "--randrepeat=0".into(),
        "--norandommap".into(),
        "--group_reporting".into(),
        "--output-format=json".into(),
        format!("--output={}", out.display()),
    ];
    match job {
        None => args.extend([
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            "--end_fsync=1".into(),
        ]),
        Some(job) => {
            args.extend(job.fio_args());
            if settings.fio_runtime_s > 0 {
                args.extend([
                    "--time_based".into(),
                    format!("--runtime={}", settings.fio_runtime_s),
                    format!("--ramp_time={}", settings.fio_ramp_s),
                ]);
            } else {
                args.push(format!("--number_ios={}", settings.fio_number_ios));
            }
        }
    }
    let child = Command::new(&tools.fio)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting fio")?;
    let mut guard = ChildGuard(Some(child));
    // fio writes little to stderr; read it after exit.
    let status = guard
        .wait(Duration::from_secs(
            600 + settings.fio_runtime_s + settings.fio_ramp_s,
        ))
        .await?;
    if !status.success() {
        bail!(
            "fio {} failed ({status}); see {}",
            args.join(" "),
            out.display()
        );
    }
    let text =
        std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    parse_fio(&text, job.is_none_or(Job::reads))
        .with_context(|| format!("parsing fio output {}", out.display()))
}

pub(crate) fn parse_fio(text: &str, reads: bool) -> Result<FioResult> {
    // fio may print notes before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio output"))?;
    let value: serde_json::Value = serde_json::from_str(&text[start..])?;
    let job = value["jobs"]
        .get(0)
        .ok_or_else(|| anyhow!("no job in fio output"))?;
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio job error {}", job["error"]);
    }
    // The prefill is a write; measured jobs report on their own direction.
    let side = if reads && job["read"]["io_bytes"].as_u64().unwrap_or(0) > 0 {
        &job["read"]
    } else {
        &job["write"]
    };
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1e3;
    Ok(FioResult {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bw_mib_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / MIB as f64,
        clat_p50_us: pct("50.000000"),
        clat_p99_us: pct("99.000000"),
    })
}
