//! Section 3, scale: the real `loopcsi` binary as a child with many volumes.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::args::*;
use crate::data::*;
use crate::driver::*;
use crate::scratch::*;
use crate::stats::*;
use crate::*;
use anyhow::{anyhow, bail, Context, Result};
use loopcsi::host::{loopdev, mount};
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Rss {
    pub(crate) vm_rss_mib: f64,
    pub(crate) vm_hwm_mib: f64,
    pub(crate) threads: u64,
}

pub(crate) fn read_rss(pid: u32) -> Result<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Rss {
        vm_rss_mib: field("VmRSS:") as f64 / 1024.0,
        vm_hwm_mib: field("VmHWM:") as f64 / 1024.0,
        threads: field("Threads:"),
    })
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ScaleResult {
    pub(crate) filesystem: String,
    pub(crate) volumes: usize,
    pub(crate) staged: usize,
    pub(crate) volume_mib: u64,
    pub(crate) first_start_to_ready_ms: f64,
    pub(crate) create: Summary,
    pub(crate) create_per_s: f64,
    pub(crate) stage: Summary,
    pub(crate) stage_per_s: f64,
    pub(crate) rss_loaded: Rss,
    pub(crate) list_all: Summary,
    pub(crate) list_paged_100: Summary,
    pub(crate) get_capacity: Summary,
    pub(crate) volume_stats: Summary,
    /// What every node RPC reads to observe the kernel, timed in the bench process with the
    /// driver's own functions: the loop device scan and the mount table.
    pub(crate) sysfs_loop_entries: usize,
    pub(crate) attached_loop_devices: usize,
    pub(crate) mount_entries: usize,
    pub(crate) scan_loop_devices: Summary,
    pub(crate) scan_mountinfo: Summary,
    pub(crate) restarts_to_ready_ms: Vec<f64>,
    pub(crate) restart_socket_ms: Vec<f64>,
    pub(crate) rss_after_restart: Rss,
    pub(crate) list_all_after_restart: Summary,
    pub(crate) unstage: Summary,
    pub(crate) delete: Summary,
}

/// The real driver binary as a child process.
pub(crate) struct ChildDriver {
    pub(crate) guard: ChildGuard,
    pub(crate) clients: Clients,
    pub(crate) pid: u32,
}

/// Starts `loopcsi serve` (default flags, logging to a file) and waits for Probe ready.
/// Returns the driver, the time until its socket accepted a connection and until it was ready.
pub(crate) async fn spawn_driver(
    bin: &Path,
    socket: &Path,
    state: &Path,
    log: &Path,
) -> Result<(ChildDriver, f64, f64)> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let started = Instant::now();
    let child = Command::new(bin)
        .arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--node-id")
        .arg(NODE_ID)
        .arg("--state-dir")
        .arg(state)
        .env_remove("LOOPCSI_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut guard = ChildGuard(Some(child));
    let pid = guard.pid().ok_or_else(|| anyhow!("no child pid"))?;
    let deadline = started + Duration::from_secs(60);
    let clients = loop {
        if let Some(child) = guard.0.as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was ready; see {}",
                    bin.display(),
                    log.display()
                );
            }
        }
        if socket.exists() {
            if let Ok(clients) = Clients::connect(socket).await {
                break clients;
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not open its socket within 60 s", bin.display());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let socket_ms = ms(started.elapsed());
    clients
        .wait_ready(deadline.saturating_duration_since(Instant::now()))
        .await?;
    let ready_ms = ms(started.elapsed());
    Ok((
        ChildDriver {
            guard,
            clients,
            pid,
        },
        socket_ms,
        ready_ms,
    ))
}

impl ChildDriver {
    /// SIGTERM, and wait for the graceful exit.
    pub(crate) async fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = self.guard.wait(Duration::from_secs(30)).await?;
        if !status.success() {
            bail!("loopcsi exited with {status} after SIGTERM");
        }
        Ok(())
    }
}

/// Runs `op` for every index in 0..n, `concurrency` at a time; per-call latency (ms) and the
/// wall time (s).
pub(crate) async fn fan_out<F, Fut>(n: usize, concurrency: usize, op: F) -> Result<(Vec<f64>, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let op = Arc::clone(&op);
        let next = Arc::clone(&next);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let clock = Instant::now();
                op(i).await?;
                lat.push(ms(clock.elapsed()));
            }
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.context("worker")??);
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

pub(crate) async fn repeat<F, Fut>(times: usize, mut op: F) -> Result<Summary>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut lat = Vec::with_capacity(times);
    for _ in 0..times {
        let clock = Instant::now();
        op().await?;
        lat.push(ms(clock.elapsed()));
    }
    Ok(summarize(&lat))
}

/// The scale section: the real binary with `scale_volumes` volumes, `scale_staged` of them
/// staged, measured loaded and after restarts, then emptied.
pub(crate) async fn scale_section(
    settings: &Settings,
    scratch: &Scratch,
    bin: &Path,
    log: &Progress,
) -> Result<ScaleResult> {
    let root = scratch.path("scale");
    let state = root.join("state");
    let co = Arc::new(root.join("co"));
    std::fs::create_dir_all(co.as_path())?;
    let socket = scratch.socket("scale");
    let driver_log = root.join("driver.log");
    let mut result = ScaleResult {
        filesystem: filesystem_of(&root),
        volumes: settings.scale_volumes,
        staged: settings.scale_staged,
        volume_mib: settings.scale_volume_mib,
        ..Default::default()
    };
    let (mut driver, _, ready) = spawn_driver(bin, &socket, &state, &driver_log).await?;
    result.first_start_to_ready_ms = ready;
    let clients = driver.clients.clone();
    let mut fleet = Fleet {
        ids: create_volumes(settings, &clients, &mut result, log).await?,
        clients,
        co,
    };
    stage_volumes(settings, &fleet, &mut result, log).await?;

    log.say("scale: RSS, ListVolumes, GetCapacity, NodeGetVolumeStats");
    result.rss_loaded = read_rss(driver.pid)?;
    measure_loaded(settings, &fleet, &mut result).await?;
    scan_kernel(settings, &mut result)?;

    log.say("scale: restarts");
    for _ in 0..3 {
        driver.stop().await?;
        let (next, socket_ms, ready_ms) = spawn_driver(bin, &socket, &state, &driver_log).await?;
        result.restart_socket_ms.push(socket_ms);
        result.restarts_to_ready_ms.push(ready_ms);
        driver = next;
    }
    result.rss_after_restart = read_rss(driver.pid)?;
    fleet.clients = driver.clients.clone();
    let clients = &fleet.clients;
    result.list_all_after_restart = repeat(list_times(settings), || async {
        clients.list_all(0).await.map(drop)
    })
    .await?;

    log.say("scale: unstaging and deleting");
    empty_pool(settings, &fleet, &mut result).await?;
    driver.stop().await?;
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    Ok(result)
}

/// How often each ListVolumes measure repeats.
fn list_times(settings: &Settings) -> usize {
    if settings.smoke {
        2
    } else {
        20
    }
}

/// Creates the thin ext4 volumes, 8 RPCs in flight; returns their ids by index.
async fn create_volumes(
    settings: &Settings,
    clients: &Clients,
    result: &mut ScaleResult,
    log: &Progress,
) -> Result<Arc<Vec<String>>> {
    log.say(format!(
        "scale: creating {} volumes",
        settings.scale_volumes
    ));
    let ids: Arc<std::sync::Mutex<Vec<Option<String>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; settings.scale_volumes]));
    let bytes = settings.scale_volume_mib * MIB;
    let (lat, wall) = {
        let clients = clients.clone();
        let ids = Arc::clone(&ids);
        fan_out(settings.scale_volumes, 8, move |i| {
            let clients = clients.clone();
            let ids = Arc::clone(&ids);
            async move {
                let id = clients
                    .create(&format!("bench-scale-{i}"), bytes, VolKind::Ext4, false)
                    .await?;
                if let Ok(mut ids) = ids.lock() {
                    ids[i] = Some(id);
                }
                Ok(())
            }
        })
        .await?
    };
    result.create = summarize(&lat);
    result.create_per_s = settings.scale_volumes as f64 / wall;
    let ids: Vec<String> = ids
        .lock()
        .map_err(|_| anyhow!("id list poisoned"))?
        .iter()
        .map(|id| id.clone().unwrap_or_default())
        .collect();
    Ok(Arc::new(ids))
}

/// The scale section's volumes: the clients of the driver serving them, their ids by index,
/// and the CO's dir their staging dirs are made under.
struct Fleet {
    clients: Clients,
    ids: Arc<Vec<String>>,
    co: Arc<PathBuf>,
}

impl Fleet {
    /// Where the `i`th volume is staged.
    fn staging(&self, i: usize) -> PathBuf {
        staging_dir(&self.co, i)
    }

    /// Runs `op(clients, id, staging dir)` for the first `n` volumes, 8 at a time.
    async fn fan_out<F, Fut>(&self, n: usize, op: F) -> Result<(Vec<f64>, f64)>
    where
        F: Fn(Clients, String, PathBuf) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send,
    {
        let (clients, ids, co) = (
            self.clients.clone(),
            Arc::clone(&self.ids),
            Arc::clone(&self.co),
        );
        fan_out(n, 8, move |i| {
            op(clients.clone(), ids[i].clone(), staging_dir(&co, i))
        })
        .await
    }
}

/// The staging dir of the `i`th volume under the CO's dir.
fn staging_dir(co: &Path, i: usize) -> PathBuf {
    co.join(format!("staging-{i}"))
}

/// Stages the first `scale_staged` volumes, 8 RPCs in flight.
async fn stage_volumes(
    settings: &Settings,
    fleet: &Fleet,
    result: &mut ScaleResult,
    log: &Progress,
) -> Result<()> {
    log.say(format!("scale: staging {}", settings.scale_staged));
    for i in 0..settings.scale_staged {
        std::fs::create_dir_all(fleet.staging(i))?;
    }
    let (lat, wall) = fleet
        .fan_out(settings.scale_staged, |c, id, staging| async move {
            c.stage(&id, &staging, VolKind::Ext4).await
        })
        .await?;
    result.stage = summarize(&lat);
    result.stage_per_s = settings.scale_staged as f64 / wall;
    Ok(())
}

/// The read RPCs with every volume in place: ListVolumes (one page and pages of 100),
/// GetCapacity, NodeGetVolumeStats of the staged volumes.
async fn measure_loaded(
    settings: &Settings,
    fleet: &Fleet,
    result: &mut ScaleResult,
) -> Result<()> {
    let clients = &fleet.clients;
    let expected = settings.scale_volumes;
    let list_times = list_times(settings);
    result.list_all = repeat(list_times, || async {
        let seen = clients.list_all(0).await?;
        if seen != expected {
            bail!("ListVolumes returned {seen} volumes, expected {expected}");
        }
        Ok(())
    })
    .await?;
    result.list_paged_100 = repeat(list_times, || async {
        clients.list_all(100).await.map(drop)
    })
    .await?;
    result.get_capacity = repeat(if settings.smoke { 5 } else { 200 }, || async {
        clients.get_capacity().await.map(drop)
    })
    .await?;
    let mut stats = Vec::new();
    for _ in 0..2 {
        for (i, id) in fleet.ids.iter().enumerate().take(settings.scale_staged) {
            let clock = Instant::now();
            clients.volume_stats(id, &fleet.staging(i)).await?;
            stats.push(ms(clock.elapsed()));
        }
    }
    result.volume_stats = summarize(&stats);
    Ok(())
}

/// What every node RPC reads to observe the kernel, timed with the driver's own functions:
/// the loop device scan and the mount table.
fn scan_kernel(settings: &Settings, result: &mut ScaleResult) -> Result<()> {
    result.sysfs_loop_entries = std::fs::read_dir("/sys/block")
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .count()
        })
        .unwrap_or(0);
    let mut scans = Vec::new();
    let mut tables = Vec::new();
    for _ in 0..if settings.smoke { 5 } else { 200 } {
        let clock = Instant::now();
        result.attached_loop_devices = loopdev::attached().map_err(|e| anyhow!("{e}"))?.len();
        scans.push(ms(clock.elapsed()));
        let clock = Instant::now();
        result.mount_entries = mount::mounts().map_err(|e| anyhow!("{e}"))?.len();
        tables.push(ms(clock.elapsed()));
    }
    result.scan_loop_devices = summarize(&scans);
    result.scan_mountinfo = summarize(&tables);
    Ok(())
}

/// Unstages the staged volumes and deletes them all, 8 RPCs in flight.
async fn empty_pool(settings: &Settings, fleet: &Fleet, result: &mut ScaleResult) -> Result<()> {
    let (lat, _) = fleet
        .fan_out(settings.scale_staged, |c, id, staging| async move {
            c.unstage(&id, &staging).await
        })
        .await?;
    result.unstage = summarize(&lat);
    let (lat, _) = fleet
        .fan_out(settings.scale_volumes, |c, id, _| async move {
            c.delete(&id).await
        })
        .await?;
    result.delete = summarize(&lat);
    Ok(())
}
