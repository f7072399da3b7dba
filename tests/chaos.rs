//! Chaos: the real `loopcsi` binary, driven by a CO-like client that cycles every RPC (create,
//! stage, publish, write and verify checksums, snapshot, restore, clone, expand, unpublish,
//! unstage, delete) over ext4, xfs and raw block volumes at once, while a killer task sends
//! SIGKILL to the driver at random instants and the client restarts it on the same state dir and
//! endpoint, as a DaemonSet's kubelet-restarted plugin would come back.
//!
//! The client behaves like kubelet and the external-provisioner: a call that failed because the
//! driver died is sent again, unchanged, to the restarted driver; ABORTED is retried; teardown is
//! always finished. The run asserts convergence (every retried call succeeds), no data loss (the
//! checksum of what was written is read back after every restart, after a re-stage, and from
//! every restore and clone, which must hold the pattern of snapshot time), no file system left
//! frozen by a killed driver (a child's write to every mount under the run's dir completes within
//! a bounded wait, checked after every restart), and at the end no leaked volume, snapshot,
//! record file, loop device or mount.
//!
//! `harness = false` (Cargo.toml): `cargo test` runs a bounded default; the soak is
//! `cargo test --release --test chaos -- --duration 30m --seed N`. The closing line is
//! `chaos: N passed, M failed` (N cycles passed, M failures) and the exit code is non-zero on any
//! failure. The seed drives the kill delays and the data patterns; the instants at which the
//! kernel schedules things are not reproducible, so a seed reproduces the run's shape, not every
//! interleaving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::process::ChildDriver;
use common::*;
use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::node_client::NodeClient;
use tokio::sync::{watch, Mutex};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// What a bounded run (plain `cargo test`) lasts.
const DEFAULT_DURATION: Duration = Duration::from_secs(45);

/// A bound on anything that must finish (an RPC answer, a write, a read): turns a hang, such
/// as a file system left frozen, into a failure that says so. Never a timed assertion on speed.
const LIVENESS: Duration = Duration::from_secs(60);

/// How often one call may be cut by a kill (or be ABORTED) before the run calls it "no
/// progress" (a livelock is a failure too, not a hang).
const MAX_TRIES: u32 = 500;

// ---- configuration ----

#[derive(Clone, Debug)]
struct Options {
    duration: Duration,
    seed: u64,
    /// Upper bound of the random delay between a driver's start and its SIGKILL.
    kill_max: Duration,
    /// 0 turns the killer off (a baseline: the same cycles without chaos).
    kills: bool,
    snapshots: bool,
    kinds: Vec<Kind>,
    /// Diagnosis only: also retry INTERNAL and UNAVAILABLE from a live driver, with backoff,
    /// as kubelet retries every error. Shows whether the driver converges for such a CO when
    /// the strict run (which fails on them) does not.
    retry_internal: bool,
}

const USAGE: &str = "usage: chaos [--duration 45s|30m|1h] [--seed N] [--kill-max-ms N] \
                     [--no-kills] [--no-snapshots] [--kinds ext4,xfs,block] [--retry-internal]";

/// Parses a duration: `90`, `90s`, `30m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("--duration {text:?}: not a number of s, m or h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("--duration {text:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// What to do, from the command line. libtest's own flags (which `cargo test -- ...` may pass
/// to every test binary) are accepted and ignored; a name filter that does not match "chaos"
/// skips the run, as libtest would.
enum Command {
    Run(Options),
    List,
    Skip,
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut options = Options {
        duration: DEFAULT_DURATION,
        seed: fresh_seed(),
        kill_max: Duration::from_millis(300),
        kills: true,
        snapshots: true,
        kinds: vec![Kind::Ext4, Kind::Xfs, Kind::Block],
        retry_internal: false,
    };
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or(format!("{name} needs a value; {USAGE}"))
        };
        match flag {
            "--duration" => options.duration = parse_duration(&value("--duration")?)?,
            "--seed" => {
                let v = value("--seed")?;
                options.seed = v.parse().map_err(|_| format!("--seed {v:?}: not a u64"))?;
            }
            "--kill-max-ms" => {
                let v = value("--kill-max-ms")?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--kill-max-ms {v:?}: not a number"))?;
                if ms == 0 {
                    return Err("--kill-max-ms 0: use --no-kills to turn kills off".into());
                }
                options.kill_max = Duration::from_millis(ms);
            }
            "--no-kills" => options.kills = false,
            "--no-snapshots" => options.snapshots = false,
            "--retry-internal" => options.retry_internal = true,
            "--kinds" => {
                let v = value("--kinds")?;
                options.kinds = v
                    .split(',')
                    .map(|k| match k {
                        "ext4" => Ok(Kind::Ext4),
                        "xfs" => Ok(Kind::Xfs),
                        "block" => Ok(Kind::Block),
                        other => Err(format!(
                            "--kinds: unknown kind {other:?} (ext4, xfs, block)"
                        )),
                    })
                    .collect::<Result<_, _>>()?;
                if options.kinds.is_empty() {
                    return Err(format!("--kinds {v:?}: name at least one kind"));
                }
            }
            "--list" => return Ok(Command::List),
            "-h" | "--help" => return Err(USAGE.into()),
            // libtest flags with a value, then those without.
            "--test-threads" | "--color" | "--format" | "--logfile" | "--skip" | "-Z" => {
                let _ = value(flag);
            }
            f if f.starts_with('-') => {}
            filter => filters.push(filter.to_string()),
        }
    }
    if !filters.is_empty() && !filters.iter().any(|f| "chaos".contains(f.as_str())) {
        return Ok(Command::Skip);
    }
    Ok(Command::Run(options))
}

fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

// ---- a seeded PRNG (xorshift64*) ----

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed: nearby seeds give unrelated streams, and never the zero state.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- data ----

/// Bytes of each pattern written to a volume.
const DATA_BYTES: usize = 1 << 20;

/// `DATA_BYTES` of pseudo-random bytes from `seed`.
fn pattern(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(DATA_BYTES);
    while out.len() < DATA_BYTES {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out
}

fn checksum(data: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(data);
    hasher.finish()
}

/// Runs blocking I/O on a thread of its own and waits for it at most `LIVENESS`: a write to a
/// file system left frozen blocks in the kernel, and must fail the run, not hang it. (A thread
/// blocked that way finishes when the cleanup thaws the file system.)
async fn bounded<T: Send + 'static>(
    what: String,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    match tokio::time::timeout(LIVENESS, rx).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(err))) => Err(format!("{what}: {err}")),
        Ok(Err(_)) => Err(format!("{what}: the I/O thread died")),
        Err(_) => Err(format!(
            "{what}: did not complete within {LIVENESS:?} (a file system left frozen?)"
        )),
    }
}

/// Where a volume's data is read and written: a file in a mounted file system, or the raw
/// device node a block volume is published at.
fn data_path(kind: Kind, target: &Path) -> PathBuf {
    match kind {
        Kind::Block => target.to_path_buf(),
        _ => target.join("data"),
    }
}

/// Writes pattern `seed` durably (fsync) at the start of the data path; returns its checksum.
async fn write_pattern(kind: Kind, target: &Path, seed: u64) -> Result<u64, String> {
    let path = data_path(kind, target);
    let what = format!("write {}", path.display());
    bounded(what, move || {
        let data = pattern(seed);
        let mut options = std::fs::OpenOptions::new();
        options.write(true);
        if kind != Kind::Block {
            options.create(true).truncate(true);
        }
        let mut file = options.open(&path)?;
        file.write_all(&data)?;
        file.sync_all()?;
        Ok(checksum(&data))
    })
    .await
}

/// The checksum of the `DATA_BYTES` at the start of the data path, read past the page cache
/// (O_DIRECT) so that what is checked is what the device holds.
async fn read_checksum(kind: Kind, target: &Path) -> Result<u64, String> {
    let path = data_path(kind, target);
    let what = format!("read {}", path.display());
    bounded(what, move || {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&path)?;
        // O_DIRECT wants an aligned buffer: read into an over-sized one at a 4096 boundary.
        let mut raw = vec![0u8; DATA_BYTES + 4096];
        let skew = raw.as_ptr().align_offset(4096);
        let buf = &mut raw[skew..skew + DATA_BYTES];
        let mut got = 0;
        while got < DATA_BYTES {
            match file.read(&mut buf[got..])? {
                0 => break,
                n => got += n,
            }
        }
        Ok(checksum(&buf[..got]))
    })
    .await
}

/// Whether a child process can write (and fsync) a file in `dir` within `LIVENESS`. A file
/// system left frozen blocks the write; the caller thaws it, which lets the child finish.
fn write_probe(dir: &Path) -> Result<(), String> {
    let probe = dir.join(".chaos-probe");
    let mut child = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", probe.display()))
        .args(["bs=4096", "count=1", "conv=fsync", "status=none"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn dd: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let outcome = match rx.recv_timeout(LIVENESS) {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("a write to {} failed: dd {status}", dir.display())),
        Ok(Err(e)) => Err(format!("wait for dd: {e}")),
        Err(_) => {
            // Thaw, so that the child's write completes and the waiter reaps it.
            thaw(dir);
            let _ = waiter.join();
            let _ = std::fs::remove_file(&probe);
            return Err(format!(
                "a write to {} (dd, pid {pid}) did not complete within {LIVENESS:?}: \
                 the file system was left frozen (thawed now)",
                dir.display()
            ));
        }
    };
    let _ = waiter.join();
    let _ = std::fs::remove_file(&probe);
    outcome
}

/// Every mounted directory under `root` (file system mounts and their binds; a raw block
/// volume's bind of a device node is not a directory and has nothing to freeze).
fn mounted_dirs_under(root: &Path) -> Vec<PathBuf> {
    loopcsi::host::mount::mounts()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(root) && p.is_dir())
        .collect()
}

/// The storage tools running on the machine (pid, parent, command line): evidence, in a
/// failure's report, of a tool that a killed driver left running.
fn tools_running() -> Vec<String> {
    const TOOLS: &[&str] = &[
        "mkfs",
        "mke2fs",
        "blkid",
        "resize2fs",
        "xfs_growfs",
        "fsfreeze",
    ];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let program = args.first()?.rsplit('/').next()?.to_string();
            if !TOOLS.iter().any(|t| program.starts_with(t)) {
                return None;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .to_string();
            Some(format!("pid {pid} ppid {ppid}: {}", args.join(" ")))
        })
        .collect()
}

// ---- the driver under chaos ----

#[derive(Clone)]
struct Clients {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

/// The current driver process and what the killer did to it.
struct Slot {
    driver: Option<ChildDriver>,
    generation: u64,
    killed: bool,
}

#[derive(Default)]
struct Counters {
    kills: AtomicU64,
    restarts: AtomicU64,
    rpcs: AtomicU64,
    rpcs_ok: AtomicU64,
    retried_after_kill: AtomicU64,
    retried_internal: AtomicU64,
    aborted: AtomicU64,
    cycles: AtomicU64,
    verifications: AtomicU64,
    probes: AtomicU64,
}

struct Chaos {
    root: PathBuf,
    options: Options,
    /// Per call in flight: how many times in a row a kill cut it (see `killer`).
    cut_streaks: std::sync::Mutex<HashMap<u64, u32>>,
    slot: Mutex<Slot>,
    generation: watch::Sender<u64>,
    counters: Counters,
    /// Calls in flight, by call number: named in every kill's log line, for evidence.
    in_flight: std::sync::Mutex<BTreeMap<u64, String>>,
    next_call: AtomicU64,
    /// The last kills: what was in flight when each came.
    kill_log: std::sync::Mutex<Vec<String>>,
    /// The last log lines of each killed driver (its stderr), kept for a failure's report.
    last_logs: std::sync::Mutex<Vec<String>>,
    failures: std::sync::Mutex<Vec<String>>,
    stop: AtomicBool,
    deadline: Instant,
}

impl Chaos {
    async fn start(root: &Path, options: Options) -> Arc<Self> {
        let driver = ChildDriver::spawn(root, None).await;
        let (generation, _) = watch::channel(0);
        Arc::new(Chaos {
            root: root.to_path_buf(),
            deadline: Instant::now() + options.duration,
            options,
            slot: Mutex::new(Slot {
                driver: Some(driver),
                generation: 0,
                killed: false,
            }),
            generation,
            counters: Counters::default(),
            in_flight: Default::default(),
            cut_streaks: Default::default(),
            next_call: AtomicU64::new(0),
            kill_log: Default::default(),
            last_logs: Default::default(),
            failures: Default::default(),
            stop: AtomicBool::new(false),
        })
    }

    fn fail(&self, what: String) {
        eprintln!("chaos: FAILURE: {what}");
        for line in tools_running() {
            eprintln!("chaos:   still running: {line}");
        }
        let mut failures = self.failures.lock().unwrap();
        if failures.is_empty() {
            eprintln!("chaos:   the last log lines of the last killed driver:");
            for line in self.last_logs.lock().unwrap().iter() {
                eprintln!("chaos:     {line}");
            }
        }
        failures.push(what);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || Instant::now() >= self.deadline
    }

    async fn clients(&self) -> (Clients, u64) {
        let slot = self.slot.lock().await;
        let d = slot.driver.as_ref().expect("a driver is running");
        (
            Clients {
                controller: d.controller.clone(),
                node: d.node.clone(),
            },
            slot.generation,
        )
    }

    fn current_generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// The killer: after each start of the driver, waits a random delay and sends SIGKILL,
    /// whatever is in flight. The delay's bound is `kill_max`, doubled for each time in a row
    /// that the most often cut call in flight was cut (up to `PATIENCE`): an operation that
    /// takes longer than `kill_max` on a loaded machine (a clone of a live xfs volume) still
    /// gets to finish, so "no progress" means a livelock of the driver, not of the schedule.
    async fn killer(self: Arc<Self>, mut rng: Rng) {
        const PATIENCE: Duration = Duration::from_secs(30);
        let mut started = self.generation.subscribe();
        loop {
            let streak = self.cut_streaks.lock().unwrap().values().copied().max();
            let bound = self
                .options
                .kill_max
                .saturating_mul(1 << streak.unwrap_or(0).min(8))
                .min(PATIENCE.max(self.options.kill_max));
            let delay = Duration::from_micros(rng.below(bound.as_micros().max(1) as u64));
            tokio::time::sleep(delay).await;
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            {
                let mut slot = self.slot.lock().await;
                if slot.killed {
                    // Not restarted yet (no call has noticed): wait for the restart below.
                } else if let Some(driver) = slot.driver.as_mut() {
                    // Under the lock the child is not reaped (only the restart reaps it, under
                    // this lock), so its pid cannot have been reused.
                    if driver.exited().is_none() {
                        let _ =
                            nix::sys::signal::kill(driver.pid(), nix::sys::signal::Signal::SIGKILL);
                        slot.killed = true;
                        let n = self.counters.kills.fetch_add(1, Ordering::SeqCst) + 1;
                        let in_flight: Vec<String> =
                            self.in_flight.lock().unwrap().values().cloned().collect();
                        let mut log = self.kill_log.lock().unwrap();
                        log.push(format!(
                            "kill #{n} of generation {} after {delay:?}; in flight: {in_flight:?}",
                            slot.generation
                        ));
                        let excess = log.len().saturating_sub(20);
                        log.drain(..excess);
                    }
                }
            }
            // The next kill comes only after a restart.
            if started.changed().await.is_err() {
                return;
            }
        }
    }

    /// Replaces the driver of `generation` (killed) by a new one on the same state dir and
    /// endpoint, unless another caller already did. Right after the start, before any call
    /// reaches the new driver, checks that the killed one left no file system frozen.
    async fn restart(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.generation != generation {
            return;
        }
        if let Some(mut old) = slot.driver.take() {
            // SIGKILL was sent (or the driver died by itself, which `wait` shows): reap it.
            let status = old.wait();
            // Every line the dead driver wrote: its stderr ends (EOF) now that it is dead.
            let mut lines = Vec::new();
            while let Ok(line) = old.log.recv_timeout(LIVENESS) {
                lines.push(line);
            }
            let tail = lines[lines.len().saturating_sub(15)..].to_vec();
            *self.last_logs.lock().unwrap() = tail;
            if !slot.killed {
                self.fail(format!(
                    "driver generation {generation} died by itself: {status}"
                ));
            }
        }
        let root = self.root.clone();
        let spawned = tokio::spawn(async move { ChildDriver::spawn(&root, None).await }).await;
        match spawned {
            Ok(driver) => slot.driver = Some(driver),
            Err(err) => {
                self.fail(format!(
                    "the driver did not start again after kill {}: {err}",
                    self.counters.kills.load(Ordering::SeqCst)
                ));
                // Nothing can go on without a driver; the run ends with what it has.
                panic!("no driver to continue with");
            }
        }
        slot.generation += 1;
        slot.killed = false;
        self.counters.restarts.fetch_add(1, Ordering::SeqCst);
        for dir in mounted_dirs_under(&self.root) {
            self.counters.probes.fetch_add(1, Ordering::SeqCst);
            if let Err(why) = write_probe(&dir) {
                let kills = self.kill_log.lock().unwrap().last().cloned();
                self.fail(format!("{why}; after {kills:?}"));
            }
        }
        self.generation.send_replace(slot.generation);
    }

    /// `call` with one request, cloned for every try; an error becomes the failure's text.
    async fn send<R, T, F, Fut>(&self, what: &str, req: R, rpc: F) -> Result<T, String>
    where
        R: Clone,
        F: Fn(Clients, R) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(what, |c| rpc(c, req.clone()))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| status_text(what, &s))
    }

    /// One CO call: sent again, unchanged, to the restarted driver when the driver it went to
    /// was killed; retried while ABORTED. Any other answer is the caller's to judge.
    async fn call<T, F, Fut>(&self, what: &str, mut rpc: F) -> Result<T, Status>
    where
        F: FnMut(Clients) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let call = self.next_call.fetch_add(1, Ordering::SeqCst);
        let result = self.call_tries(call, what, &mut rpc).await;
        self.cut_streaks.lock().unwrap().remove(&call);
        result
    }

    async fn call_tries<T, F, Fut>(&self, call: u64, what: &str, rpc: &mut F) -> Result<T, Status>
    where
        F: FnMut(Clients) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut backoff = Duration::from_millis(10);
        let mut aborted_backoff = Duration::from_millis(10);
        for _ in 0..MAX_TRIES {
            let (clients, generation) = self.clients().await;
            self.in_flight
                .lock()
                .unwrap()
                .insert(call, format!("{what} (gen {generation})"));
            self.counters.rpcs.fetch_add(1, Ordering::Relaxed);
            let result = tokio::time::timeout(LIVENESS, rpc(clients)).await;
            self.in_flight.lock().unwrap().remove(&call);
            let killed = {
                let slot = self.slot.lock().await;
                slot.generation != generation || slot.killed
            };
            match result {
                Ok(Ok(value)) => {
                    self.counters.rpcs_ok.fetch_add(1, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok(Err(_)) | Err(_) if killed => {
                    self.counters
                        .retried_after_kill
                        .fetch_add(1, Ordering::Relaxed);
                    *self.cut_streaks.lock().unwrap().entry(call).or_insert(0) += 1;
                    self.restart(generation).await;
                }
                Ok(Err(status)) if status.code() == Code::Aborted => {
                    // As kubelet and the provisioner, back off (up to 1 s) before retrying: a
                    // pause between the CO's tries, not a wait for readiness.
                    self.counters.aborted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(aborted_backoff).await;
                    aborted_backoff = (aborted_backoff * 2).min(Duration::from_secs(1));
                }
                Ok(Err(status))
                    if self.options.retry_internal
                        && matches!(status.code(), Code::Internal | Code::Unavailable)
                        && backoff < Duration::from_secs(30) =>
                {
                    // kubelet's exponential backoff: a pause between tries of the CO, not a
                    // wait for readiness.
                    eprintln!(
                        "chaos: retrying ({}) {what}: {}",
                        status.code(),
                        status.message()
                    );
                    self.counters
                        .retried_internal
                        .fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "{what}: no answer within {LIVENESS:?} from a live driver"
                    )))
                }
            }
        }
        Err(Status::deadline_exceeded(format!(
            "{what}: no progress in {MAX_TRIES} tries (cut by kills or ABORTED every time)"
        )))
    }
}

// ---- the CO-like client, one per volume kind ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ext4,
    Xfs,
    Block,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ext4 => "ext4",
            Kind::Xfs => "xfs",
            Kind::Block => "block",
        }
    }

    fn cap(self) -> csi::VolumeCapability {
        match self {
            Kind::Block => block_cap(snw()),
            fs => mount_cap(fs.name(), snw()),
        }
    }

    /// A size each kind accepts (xfs's minimum is 300 MiB).
    fn size(self) -> i64 {
        match self {
            Kind::Ext4 => 64 * MIB,
            Kind::Xfs => 320 * MIB,
            Kind::Block => 16 * MIB,
        }
    }
}

/// Something a cycle made, torn down in reverse order, also when the cycle failed.
#[derive(Clone, Debug)]
enum Made {
    Volume(String),
    Snapshot(String),
    Staged(String, PathBuf),
    Published(String, PathBuf),
}

type Step = Result<(), String>;

struct Client {
    chaos: Arc<Chaos>,
    kind: Kind,
    rng: Rng,
    cycle: u64,
    made: Vec<Made>,
    /// Published volumes' expected checksums, by target, re-verified after every restart.
    expected: HashMap<PathBuf, u64>,
    verified_generation: u64,
}

fn status_text(what: &str, status: &Status) -> String {
    format!("{what}: {:?}: {}", status.code(), status.message())
}

impl Client {
    fn name(&self, part: &str) -> String {
        format!("chaos-{}-{}-{part}", self.kind.name(), self.cycle)
    }

    async fn create(&mut self, req: csi::CreateVolumeRequest) -> Result<String, String> {
        let what = format!("CreateVolume {}", req.name);
        let volume = self
            .chaos
            .send(&what, req, |mut c, r| async move {
                c.controller.create_volume(r).await
            })
            .await?
            .volume
            .ok_or(format!("{what}: no volume in the reply"))?;
        self.made.push(Made::Volume(volume.volume_id.clone()));
        Ok(volume.volume_id)
    }

    async fn stage(&mut self, id: &str, staging: &Path) -> Step {
        std::fs::create_dir_all(staging).map_err(|e| e.to_string())?;
        let req = csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(self.kind.cap()),
            ..Default::default()
        };
        let what = format!("NodeStageVolume {id}");
        // Recorded before the call, as kubelet marks a stage "uncertain": a stage that failed
        // may have done part of its work, and the teardown unstages it all the same.
        self.made.push(Made::Staged(id.into(), staging.into()));
        self.chaos
            .send(&what, req, |mut c, r| async move {
                c.node.node_stage_volume(r).await
            })
            .await
            .map(drop)
    }

    async fn publish(&mut self, id: &str, staging: &Path, target: &Path) -> Step {
        std::fs::create_dir_all(target.parent().unwrap()).map_err(|e| e.to_string())?;
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(self.kind.cap()),
            ..Default::default()
        };
        let what = format!("NodePublishVolume {id}");
        // Uncertain until it answers OK, as for the stage.
        self.made.push(Made::Published(id.into(), target.into()));
        self.chaos
            .send(&what, req, |mut c, r| async move {
                c.node.node_publish_volume(r).await
            })
            .await
            .map(drop)
    }

    /// Tears down what was made after `mark`, newest first, through the driver, under chaos.
    async fn undo_to(&mut self, mark: usize) -> Step {
        let mut first_error = Ok(());
        while self.made.len() > mark {
            let made = self.made.pop().unwrap();
            if let Err(e) = self.undo(&made).await {
                if first_error.is_ok() {
                    first_error = Err(e);
                }
            }
        }
        first_error
    }

    async fn undo(&mut self, made: &Made) -> Step {
        let chaos = &self.chaos;
        match made.clone() {
            Made::Published(id, target) => {
                self.expected.remove(&target);
                let req = csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.display().to_string(),
                };
                let what = format!("NodeUnpublishVolume {id}");
                let done = chaos
                    .send(&what, req, |mut c, r| async move {
                        c.node.node_unpublish_volume(r).await
                    })
                    .await;
                let _ = std::fs::remove_dir(target.parent().unwrap());
                done.map(drop)
            }
            Made::Staged(id, staging) => {
                let req = csi::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.display().to_string(),
                };
                let what = format!("NodeUnstageVolume {id}");
                let done = chaos
                    .send(&what, req, |mut c, r| async move {
                        c.node.node_unstage_volume(r).await
                    })
                    .await;
                let _ = std::fs::remove_dir(&staging);
                done.map(drop)
            }
            Made::Volume(id) => {
                let req = csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                };
                let what = format!("DeleteVolume {id}");
                chaos
                    .send(&what, req, |mut c, r| async move {
                        c.controller.delete_volume(r).await
                    })
                    .await
                    .map(drop)
            }
            Made::Snapshot(id) => {
                let req = csi::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                };
                let what = format!("DeleteSnapshot {id}");
                chaos
                    .send(&what, req, |mut c, r| async move {
                        c.controller.delete_snapshot(r).await
                    })
                    .await
                    .map(drop)
            }
        }
    }

    /// Checks that `target` holds the data whose checksum is `expected`.
    async fn verify(&mut self, target: &Path, expected: u64, after: &str) -> Step {
        self.chaos
            .counters
            .verifications
            .fetch_add(1, Ordering::Relaxed);
        let got = read_checksum(self.kind, target).await?;
        if got != expected {
            return Err(format!(
                "data lost or changed at {} after {after}: checksum {got:#x}, expected {expected:#x}",
                target.display()
            ));
        }
        Ok(())
    }

    /// After a restart of the driver, re-reads every published volume of this client.
    async fn verify_after_restart(&mut self, after: &str) -> Step {
        let generation = self.chaos.current_generation();
        if generation == self.verified_generation {
            return Ok(());
        }
        self.verified_generation = generation;
        let expected: Vec<(PathBuf, u64)> =
            self.expected.iter().map(|(p, c)| (p.clone(), *c)).collect();
        for (target, sum) in expected {
            self.verify(&target, sum, &format!("a restart of the driver ({after})"))
                .await?;
        }
        Ok(())
    }

    async fn write(&mut self, target: &Path) -> Result<u64, String> {
        let seed = self.rng.next();
        let sum = write_pattern(self.kind, target, seed).await?;
        self.expected.insert(target.to_path_buf(), sum);
        Ok(sum)
    }

    fn paths(&self, part: &str) -> (PathBuf, PathBuf) {
        let root = &self.chaos.root;
        let name = self.name(part);
        (
            root.join("staging").join(&name),
            root.join("pods").join(&name).join("volume"),
        )
    }

    async fn expand(&mut self, id: &str, target: &Path, bytes: i64) -> Step {
        let req = csi::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let what = format!("NodeExpandVolume {id} to {bytes}");
        match self
            .chaos
            .call(&what, |mut c| {
                let req = req.clone();
                async move { c.node.node_expand_volume(req).await }
            })
            .await
        {
            Ok(reply) if reply.get_ref().capacity_bytes >= bytes => Ok(()),
            Ok(reply) => Err(format!(
                "{what}: answered capacity {} < {bytes}",
                reply.get_ref().capacity_bytes
            )),
            // Without CAP_SYS_RESOURCE a mounted ext4 cannot grow: the file and device have,
            // and the file system grows at the next stage (README, Expansion). The kubelet
            // would retry; the re-stage below is what makes a retry succeed.
            Err(s)
                if self.kind == Kind::Ext4
                    && s.code() == Code::FailedPrecondition
                    && s.message().contains("CAP_SYS_RESOURCE") =>
            {
                Ok(())
            }
            Err(s) => Err(status_text(&what, &s)),
        }
    }

    /// Stages and publishes a volume the cycle made; returns its target.
    async fn mount(&mut self, id: &str, part: &str) -> Result<PathBuf, String> {
        let (staging, target) = self.paths(part);
        self.stage(id, &staging).await?;
        self.publish(id, &staging, &target).await?;
        Ok(target)
    }

    /// One cycle of every RPC on one fresh volume (see the module doc).
    async fn cycle(&mut self) -> Step {
        let kind = self.kind;
        let size = kind.size();
        let grown = size + 16 * MIB;
        let id = self
            .create(create_req(&self.name("vol"), size, kind.cap()))
            .await?;
        let mut vol_mark = self.made.len();
        let target = self.mount(&id, "vol").await?;
        self.verify_after_restart("publish").await?;

        let first = self.write(&target).await?;
        self.verify(&target, first, "the first write").await?;
        let mut snapshot = None;
        if self.chaos.options.snapshots {
            let req = csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: self.name("snap"),
                ..Default::default()
            };
            let what = format!("CreateSnapshot of {id}");
            let snap = self
                .chaos
                .send(&what, req, |mut c, r| async move {
                    c.controller.create_snapshot(r).await
                })
                .await?
                .snapshot
                .ok_or(format!("{what}: no snapshot in the reply"))?;
            // Below the stage and publish, so that the re-stage below keeps the snapshot.
            self.made
                .insert(vol_mark, Made::Snapshot(snap.snapshot_id.clone()));
            vol_mark += 1;
            snapshot = Some((snap.snapshot_id, first));
            self.verify_after_restart("CreateSnapshot").await?;
        }
        let second = self.write(&target).await?;
        self.expand(&id, &target, grown).await?;
        self.verify_after_restart("NodeExpandVolume").await?;
        self.verify(&target, second, "NodeExpandVolume").await?;

        // Unpublish and unstage, then stage and publish again: a fresh mount reads the disk.
        self.undo_to(vol_mark).await?;
        let target = self.mount(&id, "vol").await?;
        self.expected.insert(target.clone(), second);
        self.verify(&target, second, "unstage and re-stage").await?;
        // The ext4 grow left pending for lack of CAP_SYS_RESOURCE is done now: a retry is OK.
        self.expand(&id, &target, grown).await?;
        self.verify_after_restart("re-stage").await?;

        if let Some((snap_id, at_snapshot)) = snapshot {
            let mark = self.made.len();
            let mut req = create_req(&self.name("restore"), grown, kind.cap());
            req.volume_content_source = Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: snap_id,
                    },
                )),
            });
            let restored = self.create(req).await?;
            let restored_target = self.mount(&restored, "restore").await?;
            self.expected.insert(restored_target.clone(), at_snapshot);
            self.verify(&restored_target, at_snapshot, "a restore from the snapshot")
                .await?;
            self.verify_after_restart("restore").await?;
            self.undo_to(mark).await?;

            // A clone of the published source: its data now, the second pattern.
            let mut req = create_req(&self.name("clone"), grown, kind.cap());
            req.volume_content_source = Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: id.clone(),
                    },
                )),
            });
            let clone = self.create(req).await?;
            let clone_target = self.mount(&clone, "clone").await?;
            self.expected.insert(clone_target.clone(), second);
            self.verify(&clone_target, second, "a clone of the volume")
                .await?;
            self.verify_after_restart("clone").await?;
            self.undo_to(mark).await?;
        }
        self.verify(&target, second, "the copies").await?;
        self.undo_to(0).await
    }

    async fn run(mut self) {
        while !self.chaos.stopping() {
            let outcome = self.cycle().await;
            // The CO always finishes its teardown, also after a failure.
            let teardown = self.undo_to(0).await;
            let why = match (outcome, teardown) {
                (Ok(()), Ok(())) => {
                    self.chaos.counters.cycles.fetch_add(1, Ordering::SeqCst);
                    self.cycle += 1;
                    continue;
                }
                (Err(failed), Ok(())) => failed,
                (Ok(()), Err(teardown)) => format!("teardown: {teardown}"),
                (Err(failed), Err(teardown)) => format!("{failed}; then teardown: {teardown}"),
            };
            self.chaos
                .fail(format!("{} cycle {}: {why}", self.kind.name(), self.cycle));
            return;
        }
    }
}

// ---- the run ----

/// Records a failure when a listing that must be empty after the run is not.
fn expect_none(chaos: &Chaos, what: &str, listed: Result<Vec<String>, Status>) {
    match listed {
        Ok(ids) if ids.is_empty() => {}
        Ok(ids) => chaos.fail(format!(
            "{what} left after every cycle deleted its own: {ids:?}"
        )),
        Err(s) => chaos.fail(status_text(what, &s)),
    }
}

/// After the chaos: everything was torn down through the driver; a last restart runs startup
/// recovery over the end state; then nothing may be left.
async fn final_checks(chaos: &Arc<Chaos>) {
    let generation = chaos.current_generation();
    {
        let mut slot = chaos.slot.lock().await;
        if let Some(driver) = slot.driver.as_mut() {
            if driver.exited().is_none() {
                let _ = nix::sys::signal::kill(driver.pid(), nix::sys::signal::Signal::SIGKILL);
            }
            slot.killed = true;
        }
    }
    chaos.restart(generation).await;
    let volumes = chaos
        .call("ListVolumes", |mut c| async move {
            c.controller
                .list_volumes(csi::ListVolumesRequest::default())
                .await
        })
        .await
        .map(|reply| {
            let entries = reply.into_inner().entries.into_iter();
            entries
                .filter_map(|e| e.volume.map(|v| v.volume_id))
                .collect()
        });
    expect_none(chaos, "volumes", volumes);
    let snapshots = chaos
        .call("ListSnapshots", |mut c| async move {
            c.controller
                .list_snapshots(csi::ListSnapshotsRequest::default())
                .await
        })
        .await
        .map(|reply| {
            let entries = reply.into_inner().entries.into_iter();
            entries
                .filter_map(|e| e.snapshot.map(|s| s.snapshot_id))
                .collect()
        });
    expect_none(chaos, "snapshots", snapshots);
    // Stop the driver, then look at what the kernel and the state dir hold.
    {
        let mut slot = chaos.slot.lock().await;
        slot.driver = None;
    }
    for dir in mounted_dirs_under(&chaos.root) {
        if let Err(why) = write_probe(&dir) {
            chaos.fail(why);
        }
    }
    let left = leftovers_under(&chaos.root);
    if !left.is_empty() {
        chaos.fail(format!("loop devices or mounts left: {left:?}"));
    }
    let state = chaos.root.join("state");
    for sub in ["volumes", "snapshots", "node"] {
        let files = files_in(&state.join(sub));
        if !files.is_empty() {
            chaos.fail(format!("files left in state/{sub}: {files:?}"));
        }
    }
}

/// Thaws, unmounts and detaches whatever a failed run left under the scratch dir before the
/// scratch dir's own guard checks it (a frozen file system could not be released).
struct ThawGuard(PathBuf);

impl Drop for ThawGuard {
    fn drop(&mut self) {
        thaw_everything_under(&self.0);
    }
}

fn run(options: &Options) -> bool {
    let scratch = Scratch::new();
    let root = scratch.path().to_path_buf();
    let _thaw = ThawGuard(root.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let chaos = runtime.block_on(async {
        let chaos = Chaos::start(&root, options.clone()).await;
        let killer = options
            .kills
            .then(|| tokio::spawn(chaos.clone().killer(Rng::new(options.seed))));
        let clients: Vec<_> = options
            .kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                tokio::spawn(
                    Client {
                        chaos: chaos.clone(),
                        kind,
                        rng: Rng::new(options.seed.wrapping_add(1 + i as u64)),
                        cycle: 0,
                        made: Vec::new(),
                        expected: HashMap::new(),
                        verified_generation: 0,
                    }
                    .run(),
                )
            })
            .collect();
        for client in clients {
            if let Err(err) = client.await {
                chaos.fail(format!("a client task panicked: {err}"));
            }
        }
        chaos.stop.store(true, Ordering::SeqCst);
        if let Some(killer) = killer {
            // The killer may be waiting for a restart that no call will make now.
            killer.abort();
            let _ = killer.await;
        }
        final_checks(&chaos).await;
        chaos
    });
    let c = &chaos.counters;
    let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
    println!(
        "chaos: seed {} ran {:.0?}: {} cycles ({}), {} kills, {} restarts, {} RPCs sent \
         ({} answered OK, {} cut by a kill and sent again, {} ABORTED and retried, \
         {} INTERNAL or UNAVAILABLE retried), {} data verifications, {} frozen-fs probes",
        options.seed,
        started.elapsed(),
        load(&c.cycles),
        options
            .kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join("+"),
        load(&c.kills),
        load(&c.restarts),
        load(&c.rpcs),
        load(&c.rpcs_ok),
        load(&c.retried_after_kill),
        load(&c.aborted),
        load(&c.retried_internal),
        load(&c.verifications),
        load(&c.probes),
    );
    let failures = chaos.failures.lock().unwrap().clone();
    if !failures.is_empty() {
        eprintln!("chaos: the last kills:");
        for line in chaos.kill_log.lock().unwrap().iter() {
            eprintln!("  {line}");
        }
    }
    let passed = load(&c.cycles);
    drop(runtime);
    drop(chaos);
    println!("chaos: {passed} passed, {} failed", failures.len());
    failures.is_empty()
}

/// The arguments that repeat this run's configuration.
fn rerun_args(o: &Options) -> String {
    let kinds: Vec<&str> = o.kinds.iter().map(|k| k.name()).collect();
    let mut args = format!(
        "--seed {} --duration {}s --kill-max-ms {} --kinds {}",
        o.seed,
        o.duration.as_secs(),
        o.kill_max.as_millis(),
        kinds.join(",")
    );
    for (on, flag) in [
        (!o.kills, " --no-kills"),
        (!o.snapshots, " --no-snapshots"),
        (o.retry_internal, " --retry-internal"),
    ] {
        if on {
            args.push_str(flag);
        }
    }
    args
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(Command::Run(options)) => options,
        Ok(Command::List) => {
            println!("chaos: test");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Skip) => return ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("chaos: {why}");
            return ExitCode::from(2);
        }
    };
    println!(
        "chaos: seed {} (rerun: cargo test --release --test chaos -- {})",
        options.seed,
        rerun_args(&options)
    );
    match std::panic::catch_unwind(|| run(&options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(_) => {
            println!("chaos: 0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}
