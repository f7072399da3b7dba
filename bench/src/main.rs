//! loopcsi-bench: measures loopcsi on the machine it runs on, against the same kernel and tool
//! steps done by hand, and prints a markdown report (see docs/benchmarks.md).
//!
//! Sections:
//! - `data`: fio (direct=1) on a plain file in the pool file system, inside ext4, xfs and raw block
//!   volumes published by the real driver (in-process, on a temp socket), and on hand-made loop
//!   devices (tuned: direct I/O and 4096-byte sectors; buffered with 512-byte sectors). Every job
//!   runs on every target, interleaved, for several rounds; medians and spread are reported. It
//!   runs on the `--pool-dir` file system ("disk") and on a tmpfs the bench mounts ("ram").
//! - `provision`: volumes through Create → Stage → Publish → Unpublish → Unstage → Delete at
//!   several concurrencies, thin and thick, ext4 and block, beside the same steps done directly.
//! - `scale`: the real `loopcsi` binary as a child with 1000 volumes (200 staged): RSS, restart to
//!   ready, ListVolumes, GetCapacity, NodeGetVolumeStats.
//!
//! Everything the bench makes lives in one temp dir under `--pool-dir`; it is released (mounts,
//! loop devices, tmpfs) and removed at the end, also on error or SIGINT/SIGTERM. Nothing outside
//! it is touched.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::identity_client::IdentityClient;
use loopcsi::csi::node_client::NodeClient;
use loopcsi::host::{files, loopdev, mount};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const NODE_ID: &str = "bench-node";
/// The mkfs options the driver uses (src/host/tools.rs), for the hand-made loop devices.
const MKFS_EXT4_OPTS: &str = "nodiscard,lazy_itable_init=1,lazy_journal_init=1";

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Parser)]
#[command(
    name = "loopcsi-bench",
    about = "Benchmarks loopcsi on this machine (data path, provisioning, scale) and prints a \
             markdown report. Run as root; needs fio, losetup, mkfs.ext4, mkfs.xfs."
)]
struct Args {
    /// A tiny configuration that runs in seconds (used by the test suite): 2 volumes, 1 round,
    /// fio runs of a few I/Os on 16 MiB files, 10 volumes in the scale section.
    #[arg(long, alias = "quick")]
    smoke: bool,

    /// A directory on the file system to benchmark as the pool ("disk"). The bench makes one
    /// temp dir inside it and removes it at the end.
    #[arg(long, default_value = "/var/tmp")]
    pool_dir: PathBuf,

    /// Volumes per provisioning configuration [default: 200; smoke: 2].
    #[arg(long)]
    volumes: Option<usize>,

    /// Rounds of every fio job on every target [default: 5; smoke: 1].
    #[arg(long)]
    rounds: Option<usize>,

    /// Seconds each fio job is measured, after 1 s of ramp [default: 4]. 0 (the smoke default)
    /// runs a fixed, small number of I/Os instead.
    #[arg(long)]
    fio_runtime: Option<u64>,

    /// Size of the file (or device) fio works on, MiB [default: 1024; smoke: 16].
    #[arg(long)]
    fio_size_mib: Option<u64>,

    /// Sections to run.
    #[arg(long, value_delimiter = ',', default_value = "data,provision,scale")]
    sections: Vec<Section>,

    /// Pools for the data-path section [default: disk,ram; smoke: ram].
    #[arg(long, value_delimiter = ',')]
    pools: Option<Vec<PoolKind>>,

    /// Concurrencies of the provisioning section [default: 1,8,32; smoke: 1,2].
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,

    /// Size of each provisioned volume, MiB [default: 1024; smoke: 64].
    #[arg(long)]
    volume_mib: Option<u64>,

    /// Size of the volume whose first stage is timed, GiB [default: 100; smoke: 1].
    #[arg(long)]
    big_volume_gib: Option<u64>,

    /// Volumes created in the scale section [default: 1000; smoke: 10].
    #[arg(long)]
    scale_volumes: Option<usize>,

    /// Of those, volumes staged [default: 200; smoke: 4].
    #[arg(long)]
    scale_staged: Option<usize>,

    /// The `loopcsi` binary for the scale section [default: `loopcsi` next to this binary].
    #[arg(long)]
    driver_bin: Option<PathBuf>,

    /// Also write every measurement as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Section {
    Data,
    Provision,
    Scale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum PoolKind {
    /// The --pool-dir file system.
    Disk,
    /// A tmpfs the bench mounts in its temp dir.
    Ram,
}

impl PoolKind {
    fn name(self) -> &'static str {
        match self {
            PoolKind::Disk => "disk",
            PoolKind::Ram => "ram",
        }
    }
}

/// The resolved configuration of one run.
#[derive(Clone, Debug, Serialize)]
struct Settings {
    smoke: bool,
    sections: Vec<Section>,
    pools: Vec<PoolKind>,
    rounds: usize,
    fio_runtime_s: u64,
    fio_ramp_s: u64,
    fio_size_mib: u64,
    /// When fio_runtime_s is 0: I/Os per job.
    fio_number_ios: u64,
    volumes: usize,
    concurrency: Vec<usize>,
    volume_mib: u64,
    big_volume_gib: u64,
    big_volume_samples: usize,
    /// Back-to-back pairs (driver stage, direct mkfs + mount) of the first-stage comparison.
    stage_pairs: usize,
    scale_volumes: usize,
    scale_staged: usize,
    scale_volume_mib: u64,
    tool_samples: usize,
}

impl Settings {
    fn from_args(args: &Args) -> Result<Self> {
        let smoke = args.smoke;
        let pick = |value: Option<usize>, full: usize, tiny: usize| {
            value.unwrap_or(if smoke { tiny } else { full })
        };
        let pick64 = |value: Option<u64>, full: u64, tiny: u64| {
            value.unwrap_or(if smoke { tiny } else { full })
        };
        let fio_runtime_s = pick64(args.fio_runtime, 4, 0);
        let settings = Settings {
            smoke,
            sections: args.sections.clone(),
            pools: args.pools.clone().unwrap_or(if smoke {
                vec![PoolKind::Ram]
            } else {
                vec![PoolKind::Disk, PoolKind::Ram]
            }),
            rounds: pick(args.rounds, 5, 1),
            fio_runtime_s,
            fio_ramp_s: if fio_runtime_s > 0 { 1 } else { 0 },
            fio_size_mib: pick64(args.fio_size_mib, 1024, 16),
            fio_number_ios: 64,
            volumes: pick(args.volumes, 200, 2),
            concurrency: args.concurrency.clone().unwrap_or(if smoke {
                vec![1, 2]
            } else {
                vec![1, 8, 32]
            }),
            volume_mib: pick64(args.volume_mib, 1024, 64),
            big_volume_gib: pick64(args.big_volume_gib, 100, 1),
            big_volume_samples: if smoke { 1 } else { 3 },
            stage_pairs: if smoke { 2 } else { 40 },
            scale_volumes: pick(args.scale_volumes, 1000, 10),
            scale_staged: pick(args.scale_staged, 200, 4),
            scale_volume_mib: 64,
            tool_samples: if smoke { 2 } else { 20 },
        };
        if settings.rounds == 0 || settings.volumes == 0 || settings.fio_size_mib < 4 {
            bail!("--rounds and --volumes must be at least 1, --fio-size-mib at least 4");
        }
        if settings.concurrency.contains(&0) {
            bail!("--concurrency values must be at least 1");
        }
        if settings.scale_staged > settings.scale_volumes {
            bail!("--scale-staged must not exceed --scale-volumes");
        }
        Ok(settings)
    }

    fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("loopcsi-bench: starting the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_until_signal(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loopcsi-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the bench; SIGINT or SIGTERM drops the run (its guards release everything it made).
async fn run_until_signal(args: Args) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        result = run(args) => result,
        _ = term.recv() => Err(anyhow!("terminated by SIGTERM (everything the bench made was released)")),
        _ = int.recv() => Err(anyhow!("interrupted by SIGINT (everything the bench made was released)")),
    }
}

async fn run(args: Args) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root: the bench attaches loop devices and mounts file systems");
    }
    let settings = Settings::from_args(&args)?;
    let tools = Tools::find()?;
    let started = Instant::now();
    let scratch = Scratch::new(&args.pool_dir)?;
    let log = Progress { started };
    log.say(format!("temp dir {}", scratch.root.display()));
    let machine = machine_info(&args.pool_dir, &settings, &tools);
    let mut report = Report {
        machine,
        settings: settings.clone(),
        data: Vec::new(),
        provision: None,
        scale: None,
        targets: Vec::new(),
        duration_s: 0.0,
    };
    if settings.runs(Section::Data) {
        for &pool in &settings.pools {
            let result = data_section(&settings, &tools, &scratch, pool, &log).await?;
            report.data.push(result);
        }
    }
    if settings.runs(Section::Provision) {
        report.provision = Some(provision_section(&settings, &tools, &scratch, &log).await?);
    }
    if settings.runs(Section::Scale) {
        let bin = match &args.driver_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .context("locating this binary")?
                .with_file_name("loopcsi"),
        };
        if !bin.is_file() {
            bail!(
                "the scale section runs the real driver binary, and {} does not exist; build it \
                 (cargo build --release --bin loopcsi) or pass --driver-bin",
                bin.display()
            );
        }
        report.scale = Some(scale_section(&settings, &scratch, &bin, &log).await?);
    }
    scratch.finish()?;
    report.duration_s = started.elapsed().as_secs_f64();
    report.targets = evaluate(&report);
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Progress lines on stderr (the report goes to stdout).
struct Progress {
    started: Instant,
}

impl Progress {
    fn say(&self, line: impl AsRef<str>) {
        eprintln!(
            "[{:7.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            line.as_ref()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch space and cleanup
// ---------------------------------------------------------------------------------------------

/// The bench's temp dir. Dropping it unmounts every mount under it (deepest first), detaches
/// every loop device whose backing file is under it, and removes it. Nothing else is touched.
struct Scratch {
    root: PathBuf,
    /// Unix sockets need short paths (108 bytes, and the driver binds in a temp dir beside the
    /// socket first), so they live in a short dir of their own under the system temp dir.
    sockets: PathBuf,
    done: bool,
}

impl Scratch {
    fn new(parent: &Path) -> Result<Self> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating --pool-dir {}", parent.display()))?;
        let parent = parent
            .canonicalize()
            .with_context(|| format!("resolving {}", parent.display()))?;
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let root = parent.join(format!("loopcsi-bench-{unique}"));
        let sockets = std::env::temp_dir().join(format!("lcb-{}", &unique[..12]));
        for dir in [&root, &sockets] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Scratch {
            root,
            sockets,
            done: false,
        })
    }

    fn path(&self, leaf: &str) -> PathBuf {
        self.root.join(leaf)
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.sockets.join(format!("{name}.sock"))
    }

    /// Releases and removes everything; an error names what could not be released.
    fn finish(mut self) -> Result<()> {
        self.done = true;
        release_under(&self.root)?;
        std::fs::remove_dir_all(&self.sockets)
            .with_context(|| format!("removing {}", self.sockets.display()))?;
        std::fs::remove_dir_all(&self.root)
            .with_context(|| format!("removing {}", self.root.display()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(err) = release_under(&self.root) {
            eprintln!("loopcsi-bench: cleanup: {err:#}");
        }
        let _ = std::fs::remove_dir_all(&self.sockets);
        if let Err(err) = std::fs::remove_dir_all(&self.root) {
            eprintln!(
                "loopcsi-bench: cleanup: removing {}: {err}",
                self.root.display()
            );
        }
    }
}

/// Unmounts every mount under `root` and detaches every loop device backed by a file under it.
/// A mount that stays busy is detached lazily in the last rounds.
fn release_under(root: &Path) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    for round in 0..8 {
        let flags = if round >= 5 {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        let points: Vec<PathBuf> = mount::mounts()
            .map_err(|e| anyhow!("{e}"))?
            .into_iter()
            .rev()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(root))
            .collect();
        for point in &points {
            let _ = umount2(point, flags);
        }
        let devices: Vec<loopdev::LoopDevice> = loopdev::attached()
            .map_err(|e| anyhow!("{e}"))?
            .into_iter()
            .filter(|(_, file)| file.starts_with(root))
            .map(|(dev, _)| dev)
            .collect();
        for dev in &devices {
            let _ = dev.detach();
        }
        if points.is_empty() && devices.is_empty() {
            return Ok(());
        }
        if round > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let left: Vec<String> = mount::mounts()
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| format!("mount {}", m.mount_point.display()))
        .chain(
            loopdev::attached()
                .map_err(|e| anyhow!("{e}"))?
                .into_iter()
                .filter(|(_, file)| file.starts_with(root))
                .map(|(dev, file)| format!("{} on {}", dev.path().display(), file.display())),
        )
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        bail!("could not release: {}", left.join(", "))
    }
}

/// A child process killed (and reaped) when dropped.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Polls until the child exits; kills it after `timeout`.
    async fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.0.as_mut().ok_or_else(|| anyhow!("no child"))?;
            if let Some(status) = child.try_wait().context("waiting for a child")? {
                self.0 = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.0 = None;
                bail!("child did not exit within {timeout:?}; killed");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// Paths of the external tools the bench runs.
#[derive(Clone, Debug)]
struct Tools {
    fio: PathBuf,
    losetup: PathBuf,
    blkid: PathBuf,
    mkfs_ext4: PathBuf,
    mkfs_xfs: PathBuf,
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl Tools {
    fn find() -> Result<Self> {
        let need = |name: &str, package: &str| {
            find_tool(name).ok_or_else(|| anyhow!("{name} not found; apt-get install -y {package}"))
        };
        Ok(Tools {
            fio: need("fio", "fio")?,
            losetup: need("losetup", "util-linux")?,
            blkid: need("blkid", "util-linux")?,
            mkfs_ext4: need("mkfs.ext4", "e2fsprogs")?,
            mkfs_xfs: need("mkfs.xfs", "xfsprogs")?,
        })
    }

    fn mkfs(&self, kind: VolKind, device: &Path) -> Result<()> {
        match kind {
            VolKind::Ext4 => run_tool(
                &self.mkfs_ext4,
                &[
                    "-F".into(),
                    "-q".into(),
                    "-E".into(),
                    MKFS_EXT4_OPTS.into(),
                    device.into(),
                ],
                &[],
            ),
            VolKind::Xfs => run_tool(
                &self.mkfs_xfs,
                &["-f".into(), "-q".into(), "-K".into(), device.into()],
                &[],
            ),
            VolKind::Block => Ok(String::new()),
        }
        .map(drop)
    }

    fn blkid_probe(&self, device: &Path) -> Result<()> {
        run_tool(
            &self.blkid,
            &["-p".into(), "-o".into(), "export".into(), device.into()],
            &[2],
        )
        .map(drop)
    }

    /// `losetup --find --show`: tuned is direct I/O with 4096-byte sectors (the best way by
    /// hand); otherwise losetup's defaults (buffered, 512-byte sectors).
    fn losetup_attach(&self, image: &Path, tuned: bool) -> Result<PathBuf> {
        let mut args: Vec<OsString> = vec!["--find".into(), "--show".into()];
        if tuned {
            args.extend([
                "--direct-io=on".into(),
                "--sector-size".into(),
                "4096".into(),
            ]);
        }
        args.push(image.into());
        let out = run_tool(&self.losetup, &args, &[])?;
        let dev = out.trim();
        if !dev.starts_with("/dev/loop") {
            bail!("losetup printed {dev:?}, not a loop device");
        }
        Ok(PathBuf::from(dev))
    }

    fn losetup_detach(&self, device: &Path) -> Result<()> {
        run_tool(&self.losetup, &["-d".into(), device.into()], &[]).map(drop)
    }
}

/// Runs a tool (no shell) and returns its stdout; `ok_codes` are non-zero codes that are fine.
fn run_tool(tool: &Path, args: &[OsString], ok_codes: &[i32]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    match out.status.code() {
        Some(code) if code == 0 || ok_codes.contains(&code) => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        _ => bail!(
            "{} {:?} failed ({}): {}",
            tool.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Version line of a tool, for the report.
fn tool_version(tool: &Path, arg: &str) -> String {
    Command::new(tool)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .map(|out| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------------------------
// The driver: in-process, or the real binary as a child; gRPC clients over the unix socket
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
enum VolKind {
    Ext4,
    Xfs,
    Block,
}

impl VolKind {
    fn name(self) -> &'static str {
        match self {
            VolKind::Ext4 => "ext4",
            VolKind::Xfs => "xfs",
            VolKind::Block => "block",
        }
    }

    fn is_fs(self) -> bool {
        self != VolKind::Block
    }

    fn capability(self) -> csi::VolumeCapability {
        use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType};
        let access_type = match self {
            VolKind::Block => AccessType::Block(csi::volume_capability::BlockVolume {}),
            VolKind::Ext4 | VolKind::Xfs => {
                AccessType::Mount(csi::volume_capability::MountVolume {
                    fs_type: self.name().into(),
                    mount_flags: Vec::new(),
                    volume_mount_group: String::new(),
                })
            }
        };
        csi::VolumeCapability {
            access_type: Some(access_type),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }
    }
}

/// The three CSI clients on one connection.
#[derive(Clone)]
struct Clients {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

fn rpc<T>(what: &str, result: std::result::Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| anyhow!("{what}: {:?}: {}", status.code(), status.message()))
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

impl Clients {
    /// Connects to the unix socket (tonic dials `unix:` endpoints itself).
    async fn connect(socket: &Path) -> Result<Self> {
        let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
            .context("endpoint")?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    async fn probe(&self) -> Result<bool> {
        let reply = rpc(
            "Probe",
            self.identity.clone().probe(csi::ProbeRequest {}).await,
        )?;
        Ok(reply.ready.unwrap_or(false))
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.probe().await? {
            if Instant::now() > deadline {
                bail!("the driver was not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// CreateVolume; the raw status is returned so callers can tell RESOURCE_EXHAUSTED.
    async fn create_raw(
        &self,
        name: &str,
        bytes: u64,
        kind: VolKind,
        thick: bool,
    ) -> Result<std::result::Result<String, tonic::Status>> {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: i64::try_from(bytes).context("volume size")?,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![kind.capability()],
            parameters: HashMap::from([(
                "provisioning".to_string(),
                if thick { "thick" } else { "thin" }.to_string(),
            )]),
            ..Default::default()
        };
        Ok(self.controller.clone().create_volume(req).await.map(|r| {
            r.into_inner()
                .volume
                .map(|v| v.volume_id)
                .unwrap_or_default()
        }))
    }

    async fn create(&self, name: &str, bytes: u64, kind: VolKind, thick: bool) -> Result<String> {
        self.create_raw(name, bytes, kind, thick)
            .await?
            .map_err(|s| anyhow!("CreateVolume {name}: {:?}: {}", s.code(), s.message()))
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let req = csi::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        };
        rpc(
            "DeleteVolume",
            self.controller.clone().delete_volume(req).await,
        )
        .map(drop)
    }

    async fn stage(&self, id: &str, staging: &Path, kind: VolKind) -> Result<()> {
        let req = csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path_str(staging),
            volume_capability: Some(kind.capability()),
            ..Default::default()
        };
        rpc(
            "NodeStageVolume",
            self.node.clone().node_stage_volume(req).await,
        )
        .map(drop)
    }

    async fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        let req = csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path_str(staging),
        };
        rpc(
            "NodeUnstageVolume",
            self.node.clone().node_unstage_volume(req).await,
        )
        .map(drop)
    }

    async fn publish(&self, id: &str, staging: &Path, target: &Path, kind: VolKind) -> Result<()> {
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path_str(staging),
            target_path: path_str(target),
            volume_capability: Some(kind.capability()),
            readonly: false,
            ..Default::default()
        };
        rpc(
            "NodePublishVolume",
            self.node.clone().node_publish_volume(req).await,
        )
        .map(drop)
    }

    async fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: path_str(target),
        };
        rpc(
            "NodeUnpublishVolume",
            self.node.clone().node_unpublish_volume(req).await,
        )
        .map(drop)
    }

    /// ListVolumes from the start, following tokens; the number of volumes seen.
    async fn list_all(&self, page: i32) -> Result<usize> {
        let mut token = String::new();
        let mut seen = 0;
        loop {
            let req = csi::ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            };
            let reply = rpc(
                "ListVolumes",
                self.controller.clone().list_volumes(req).await,
            )?;
            seen += reply.entries.len();
            if reply.next_token.is_empty() {
                return Ok(seen);
            }
            token = reply.next_token;
        }
    }

    async fn get_capacity(&self) -> Result<i64> {
        let req = csi::GetCapacityRequest {
            volume_capabilities: vec![VolKind::Ext4.capability()],
            ..Default::default()
        };
        let reply = rpc(
            "GetCapacity",
            self.controller.clone().get_capacity(req).await,
        )?;
        Ok(reply.available_capacity)
    }

    async fn volume_stats(&self, id: &str, path: &Path) -> Result<()> {
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path_str(path),
            staging_target_path: String::new(),
        };
        rpc(
            "NodeGetVolumeStats",
            self.node.clone().node_get_volume_stats(req).await,
        )
        .map(drop)
    }
}

/// The driver's config, made by the driver's own command-line parser (so fields added later
/// keep their defaults): reconciliation off, everything else as shipped.
fn driver_config(socket: &Path, state_dir: &Path) -> Result<loopcsi::config::Config> {
    use loopcsi::config::{Cli, Command as DriverCommand};
    let args: Vec<OsString> = vec![
        "loopcsi".into(),
        "serve".into(),
        "--endpoint".into(),
        format!("unix://{}", socket.display()).into(),
        "--node-id".into(),
        NODE_ID.into(),
        "--state-dir".into(),
        state_dir.into(),
        "--reconcile-interval".into(),
        "0".into(),
    ];
    let cli = Cli::try_parse_from(args).context("building the driver config")?;
    #[allow(unreachable_patterns)]
    match cli.command {
        DriverCommand::Serve(config) => Ok(config),
        _ => bail!("the driver's command line did not parse as `serve`"),
    }
}

/// The real driver served in this process on a temp socket.
struct InProcDriver {
    clients: Clients,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::result::Result<(), loopcsi::error::Error>>>,
}

impl InProcDriver {
    async fn start(socket: &Path, state_dir: &Path) -> Result<Self> {
        let config = driver_config(socket, state_dir)?;
        let server = loopcsi::server::bind(&config).context("binding the driver socket")?;
        let socket = server.socket().to_path_buf();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(async move {
                    let _ = rx.await;
                })
                .await
        });
        let mut driver = InProcDriver {
            clients: Clients::connect(&socket).await?,
            shutdown: Some(tx),
            task: Some(task),
        };
        if let Err(err) = driver.clients.wait_ready(Duration::from_secs(60)).await {
            driver.stop().await?;
            return Err(err);
        }
        Ok(driver)
    }

    async fn stop(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.context("driver task")?.context("driver serve")?;
        }
        Ok(())
    }
}

impl Drop for InProcDriver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Latency summary, milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
struct Summary {
    n: usize,
    p50: f64,
    p99: f64,
    mean: f64,
    min: f64,
    max: f64,
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarize(samples: &[f64]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    Summary {
        n,
        p50: percentile(&sorted, 50.0),
        p99: percentile(&sorted, 99.0),
        mean: if n == 0 {
            0.0
        } else {
            sorted.iter().sum::<f64>() / n as f64
        },
        min: sorted.first().copied().unwrap_or(0.0),
        max: sorted.last().copied().unwrap_or(0.0),
    }
}

/// Median of few samples (mean of the middle two for an even count).
fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Section 1: data path
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Job {
    RandRead4k,
    RandWrite4k,
    SeqRead1m,
    SeqWrite1m,
    FsyncWrite4k,
}

const JOBS: [Job; 5] = [
    Job::RandRead4k,
    Job::RandWrite4k,
    Job::SeqRead1m,
    Job::SeqWrite1m,
    Job::FsyncWrite4k,
];

impl Job {
    fn key(self) -> &'static str {
        match self {
            Job::RandRead4k => "randread-4k-qd32",
            Job::RandWrite4k => "randwrite-4k-qd32",
            Job::SeqRead1m => "read-1m-qd8",
            Job::SeqWrite1m => "write-1m-qd8",
            Job::FsyncWrite4k => "randwrite-4k-qd1-fsync",
        }
    }

    fn heading(self) -> &'static str {
        match self {
            Job::RandRead4k => "4k randread qd32 (IOPS)",
            Job::RandWrite4k => "4k randwrite qd32 (IOPS)",
            Job::SeqRead1m => "1M read qd8 (MiB/s)",
            Job::SeqWrite1m => "1M write qd8 (MiB/s)",
            Job::FsyncWrite4k => "4k randwrite qd1 +fsync (IOPS)",
        }
    }

    fn reads(self) -> bool {
        matches!(self, Job::RandRead4k | Job::SeqRead1m)
    }

    fn bandwidth(self) -> bool {
        matches!(self, Job::SeqRead1m | Job::SeqWrite1m)
    }

    fn fio_args(self) -> Vec<String> {
        let (rw, bs, depth) = match self {
            Job::RandRead4k => ("randread", "4k", 32),
            Job::RandWrite4k => ("randwrite", "4k", 32),
            Job::SeqRead1m => ("read", "1M", 8),
            Job::SeqWrite1m => ("write", "1M", 8),
            Job::FsyncWrite4k => ("randwrite", "4k", 1),
        };
        let mut args = vec![
            format!("--rw={rw}"),
            format!("--bs={bs}"),
            format!("--iodepth={depth}"),
        ];
        if self == Job::FsyncWrite4k {
            args.push("--fsync=1".into());
        }
        args
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Variant {
    /// Published by loopcsi.
    Volume,
    /// `losetup --direct-io=on --sector-size 4096` by hand.
    Tuned,
    /// `losetup` defaults: buffered I/O, 512-byte sectors.
    Buffered512,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Plain,
    Loop(Variant, VolKind),
}

impl Target {
    fn key(self) -> String {
        match self {
            Target::Plain => "plain file".into(),
            Target::Loop(Variant::Volume, kind) => format!("loopcsi {} volume", kind.name()),
            Target::Loop(Variant::Tuned, kind) => format!("tuned loop {}", kind.name()),
            Target::Loop(Variant::Buffered512, kind) => {
                format!("buffered-512 loop {}", kind.name())
            }
        }
    }
}

/// What to undo for a target.
enum Teardown {
    Nothing,
    Volume {
        id: String,
        staging: PathBuf,
        target: PathBuf,
    },
    Hand {
        device: PathBuf,
        mount_point: Option<PathBuf>,
    },
}

/// A target ready for fio.
struct Prepared {
    target: Target,
    /// What fio reads and writes: a file, or a device node.
    fio_file: PathBuf,
    /// Files synced and dropped from the page cache before every job (backing images), so no
    /// target inherits another's writeback or cache.
    backing: PathBuf,
    teardown: Teardown,
    device: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
struct DeviceInfo {
    target: String,
    device: String,
    direct_io: String,
    logical_block_size: String,
}

/// One fio job on one target over the rounds.
#[derive(Clone, Debug, Serialize)]
struct DataCell {
    target: String,
    job: Job,
    unit: &'static str,
    samples: Vec<f64>,
    median: f64,
    min: f64,
    max: f64,
    /// Median of the per-round completion-latency p99, microseconds.
    clat_p99_us: f64,
}

#[derive(Clone, Debug, Serialize)]
struct DataPoolResult {
    pool: PoolKind,
    path: String,
    filesystem: String,
    devices: Vec<DeviceInfo>,
    cells: Vec<DataCell>,
    targets: Vec<String>,
    /// Every volume against its bases, paired by round.
    ratios: Vec<RatioCell>,
}

/// A volume's result divided by a base's, round by round (the two ran close together in time,
/// so slow phases of the disk cancel out), and the median of those ratios.
#[derive(Clone, Debug, Serialize)]
struct RatioCell {
    volume: String,
    base: String,
    job: Job,
    per_round: Vec<f64>,
    median: f64,
}

impl DataPoolResult {
    fn cell(&self, target: Target, job: Job) -> Option<&DataCell> {
        let key = target.key();
        self.cells.iter().find(|c| c.target == key && c.job == job)
    }

    /// Median of the per-round ratios `a / b`.
    fn paired(&self, a: Target, b: Target, job: Job) -> Option<RatioCell> {
        let (x, y) = (self.cell(a, job)?, self.cell(b, job)?);
        let per_round: Vec<f64> = x
            .samples
            .iter()
            .zip(&y.samples)
            .filter(|(_, base)| **base > 0.0)
            .map(|(v, base)| v / base)
            .collect();
        (!per_round.is_empty()).then(|| RatioCell {
            volume: a.key(),
            base: b.key(),
            job,
            median: median(&per_round),
            per_round,
        })
    }
}

/// Sizes of the data-path images: the fio file plus room for the file system's metadata.
fn image_bytes(kind: VolKind, fio_bytes: u64) -> u64 {
    match kind {
        VolKind::Block => fio_bytes,
        VolKind::Ext4 | VolKind::Xfs => {
            let size = fio_bytes + fio_bytes / 4 + 128 * MIB;
            let size = size.div_ceil(MIB) * MIB;
            if kind == VolKind::Xfs {
                size.max(300 * MIB)
            } else {
                size
            }
        }
    }
}

fn mem_available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Mounts a tmpfs of `bytes` at `dir` (inside the scratch dir; released by its guard).
fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<()> {
    use nix::mount::MsFlags;
    std::fs::create_dir_all(dir)?;
    let data = format!("size={}m,mode=0700", bytes.div_ceil(MIB));
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .with_context(|| format!("mounting a tmpfs at {}", dir.display()))
}

/// The file system holding `path`: "type on source (options)".
fn filesystem_of(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else {
        return "unknown".into();
    };
    let Ok(table) = mount::mounts() else {
        return "unknown".into();
    };
    mount::mount_holding(&table, &path).map_or("unknown".into(), |m| {
        // Without a journal every fsync is a device cache flush of its own (no group commit)
        // and each new inode scans past recently deleted ones: it shows in provisioning.
        let journal = match mount::ext_journal(&m) {
            Some(true) => ", with a journal",
            Some(false) => ", **without a journal**",
            None => "",
        };
        format!(
            "{} on {} mounted at {} ({}; {}){journal}",
            m.fs_type,
            m.source,
            m.mount_point.display(),
            m.options,
            m.super_options,
        )
    })
}

fn sysfs_of(device: &Path, leaf: &str) -> String {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/{leaf}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The loop device attached to a driver volume's image.
fn device_of_volume(id: &str) -> Option<PathBuf> {
    let leaf = format!("{id}.img");
    loopdev::attached()
        .ok()?
        .into_iter()
        .find_map(|(dev, file)| {
            (file.file_name().and_then(|n| n.to_str()) == Some(leaf.as_str())).then(|| dev.path())
        })
}

async fn data_section(
    settings: &Settings,
    tools: &Tools,
    scratch: &Scratch,
    pool: PoolKind,
    log: &Progress,
) -> Result<DataPoolResult> {
    let root = scratch.path(&format!("data-{}", pool.name()));
    let fio_bytes = settings.fio_size_mib * MIB;
    let kinds = [VolKind::Ext4, VolKind::Xfs, VolKind::Block];
    match pool {
        PoolKind::Disk => std::fs::create_dir_all(&root)?,
        PoolKind::Ram => {
            // An upper bound of what the images can hold, and what they will really use.
            let limit = fio_bytes
                + kinds
                    .iter()
                    .map(|&k| 3 * image_bytes(k, fio_bytes))
                    .sum::<u64>()
                + 512 * MIB;
            let use_estimate = 10 * fio_bytes + fio_bytes / 2 + 512 * MIB;
            let available = mem_available_bytes();
            if use_estimate > available / 10 * 7 {
                bail!(
                    "the ram pool needs about {} MiB of memory and {} MiB are available; \
                     use a smaller --fio-size-mib or --pools disk",
                    use_estimate / MIB,
                    available / MIB
                );
            }
            mount_tmpfs(&root, limit)?;
        }
    }
    let filesystem = filesystem_of(&root);
    log.say(format!("data/{}: pool {filesystem}", pool.name()));
    let state = root.join("state");
    let co = root.join("co");
    let hand = root.join("hand");
    let fio_out = root.join("fio-out");
    for dir in [&co, &hand, &fio_out] {
        std::fs::create_dir_all(dir)?;
    }
    let socket = scratch.socket(&format!("data-{}", pool.name()));
    let mut driver = InProcDriver::start(&socket, &state).await?;
    let clients = driver.clients.clone();

    let mut prepared: Vec<Prepared> = Vec::new();
    let plain = root.join("plain.fio");
    prepared.push(Prepared {
        target: Target::Plain,
        fio_file: plain.clone(),
        backing: plain,
        teardown: Teardown::Nothing,
        device: None,
    });
    for kind in kinds {
        // The driver's volume.
        let name = format!("bench-data-{}", kind.name());
        let id = clients
            .create(&name, image_bytes(kind, fio_bytes), kind, false)
            .await?;
        let staging = co.join("staging").join(kind.name());
        let target = co.join("pods").join(kind.name()).join("volume");
        std::fs::create_dir_all(&staging)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        clients.stage(&id, &staging, kind).await?;
        clients.publish(&id, &staging, &target, kind).await?;
        let fio_file = if kind.is_fs() {
            target.join("fio.dat")
        } else {
            target.clone()
        };
        prepared.push(Prepared {
            target: Target::Loop(Variant::Volume, kind),
            fio_file,
            backing: state.join("volumes").join(format!("{id}.img")),
            device: device_of_volume(&id),
            teardown: Teardown::Volume {
                id,
                staging,
                target,
            },
        });
        // The hand-made loop devices.
        for (variant, tuned) in [(Variant::Tuned, true), (Variant::Buffered512, false)] {
            let stem = format!("{}-{}", if tuned { "tuned" } else { "buf512" }, kind.name());
            let image = hand.join(format!("{stem}.img"));
            std::fs::File::create(&image)?.set_len(image_bytes(kind, fio_bytes))?;
            let device = tools.losetup_attach(&image, tuned)?;
            let mut entry = Prepared {
                target: Target::Loop(variant, kind),
                fio_file: device.clone(),
                backing: image,
                device: Some(device.clone()),
                teardown: Teardown::Hand {
                    device: device.clone(),
                    mount_point: None,
                },
            };
            if kind.is_fs() {
                tools.mkfs(kind, &device)?;
                let mount_point = hand.join(format!("{stem}.mnt"));
                std::fs::create_dir_all(&mount_point)?;
                mount::mount_device(
                    &device,
                    &mount_point,
                    kind.name(),
                    &mount::MountOptions::default(),
                )
                .map_err(|e| anyhow!("{e}"))?;
                entry.fio_file = mount_point.join("fio.dat");
                entry.teardown = Teardown::Hand {
                    device,
                    mount_point: Some(mount_point),
                };
            }
            prepared.push(entry);
        }
    }
    let devices: Vec<DeviceInfo> = prepared
        .iter()
        .filter_map(|p| {
            let dev = p.device.as_ref()?;
            Some(DeviceInfo {
                target: p.target.key(),
                device: dev.display().to_string(),
                direct_io: sysfs_of(dev, "loop/dio"),
                logical_block_size: sysfs_of(dev, "queue/logical_block_size"),
            })
        })
        .collect();

    // Prefill every file and device, so reads hit written blocks and writes overwrite.
    log.say(format!(
        "data/{}: prefilling {} targets",
        pool.name(),
        prepared.len()
    ));
    for p in &prepared {
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
            for t in run_order(&prepared, (round * JOBS.len() + j) as u64) {
                let p = &prepared[t];
                flush_backing(&prepared);
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
    let mut cells = Vec::new();
    for ((t, j), results) in &samples {
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

    // Teardown: hand-made devices, then the driver's volumes, then the driver and the pool.
    for p in prepared.iter().rev() {
        match &p.teardown {
            Teardown::Nothing => {}
            Teardown::Hand {
                device,
                mount_point,
            } => {
                if let Some(point) = mount_point {
                    mount::unmount(point).map_err(|e| anyhow!("{e}"))?;
                }
                tools.losetup_detach(device)?;
            }
            Teardown::Volume {
                id,
                staging,
                target,
            } => {
                clients.unpublish(id, target).await?;
                clients.unstage(id, staging).await?;
                clients.delete(id).await?;
            }
        }
    }
    driver.stop().await?;
    release_under(&root)?;
    if pool == PoolKind::Ram {
        // The tmpfs is gone; what is left is the empty mount point.
        std::fs::remove_dir_all(&root)?;
    } else {
        std::fs::remove_dir_all(&root)?;
    }
    let mut result = DataPoolResult {
        pool,
        path: root.display().to_string(),
        filesystem,
        devices,
        cells,
        targets: prepared.iter().map(|p| p.target.key()).collect(),
        ratios: Vec::new(),
    };
    for kind in kinds {
        for job in JOBS {
            let volume = Target::Loop(Variant::Volume, kind);
            for base in [
                Target::Plain,
                Target::Loop(Variant::Tuned, kind),
                Target::Loop(Variant::Buffered512, kind),
            ] {
                if let Some(ratio) = result.paired(volume, base, job) {
                    result.ratios.push(ratio);
                }
            }
        }
    }
    Ok(result)
}

/// The order of the targets for one job of one round. Targets of one kind (the volume, its
/// tuned loop and its buffered-512 loop) run back to back, so their ratios compare runs made
/// within seconds of each other; the order of the groups and inside each group is shuffled
/// afresh for every job and round, so no target always follows the same neighbour (whose
/// writeback could slow it down).
fn run_order(prepared: &[Prepared], seed: u64) -> Vec<usize> {
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
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
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
fn flush_backing(prepared: &[Prepared]) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    for p in prepared {
        if let Ok(file) = std::fs::File::open(&p.backing) {
            let _ = file.sync_data();
            let _ = posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct FioResult {
    iops: f64,
    bw_mib_s: f64,
    clat_p50_us: f64,
    clat_p99_us: f64,
}

impl FioResult {
    fn metric(&self, job: Job) -> f64 {
        if job.bandwidth() {
            self.bw_mib_s
        } else {
            self.iops
        }
    }
}

/// Runs one fio job (`None`: the prefill, a sequential write of the whole file) and parses its
/// JSON output.
async fn run_fio(
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

fn parse_fio(text: &str, reads: bool) -> Result<FioResult> {
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

// ---------------------------------------------------------------------------------------------
// Section 2: provisioning
// ---------------------------------------------------------------------------------------------

const RPCS: [&str; 6] = [
    "Create",
    "Stage",
    "Publish",
    "Unpublish",
    "Unstage",
    "Delete",
];

/// The kernel and tool steps of a lifecycle done directly, in order.
const STEPS: [&str; 10] = [
    "create file",
    "attach",
    "blkid -p (not run)",
    "mkfs",
    "mount",
    "bind",
    "unbind",
    "umount",
    "detach",
    "delete file",
];

/// Which direct steps make up each RPC.
const RPC_STEPS: [&[usize]; 6] = [&[0], &[1, 2, 3, 4], &[5], &[6], &[7, 8], &[9]];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum LifecyclePath {
    /// Through the driver's RPCs.
    Driver,
    /// The same kernel and tool steps run directly.
    Direct,
}

#[derive(Clone, Debug, Serialize)]
struct LifecycleResult {
    kind: VolKind,
    thick: bool,
    concurrency: usize,
    path: LifecyclePath,
    volumes: usize,
    wall_s: f64,
    volumes_per_s: f64,
    /// Per RPC (or its direct equivalent), in RPCS order.
    rpcs: Vec<Summary>,
    /// Direct only: per step, in STEPS order.
    steps: Vec<Summary>,
}

#[derive(Clone, Debug, Serialize)]
struct ToolStep {
    step: String,
    summary: Summary,
}

#[derive(Clone, Debug, Serialize)]
struct FirstStageResult {
    pool: PoolKind,
    filesystem: String,
    size_mib: u64,
    /// Driver: CreateVolume and the first NodeStageVolume (ms); None with the reason when the
    /// pool cannot hold the volume.
    driver_create: Option<Summary>,
    driver_stage: Option<Summary>,
    driver_note: String,
    /// Direct, the same steps by hand (ms): LOOP_CONFIGURE, mkfs, mount, and mkfs + mount.
    direct_attach: Summary,
    direct_mkfs: Summary,
    direct_mount: Summary,
    direct_mkfs_mount: Summary,
    /// Per pair (the two ran back to back, in alternating order): driver stage ÷ direct
    /// mkfs + mount. Drift of the machine moves both halves of a pair alike.
    ratio_to_mkfs_mount: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
struct ProvisionResult {
    filesystem: String,
    volume_mib: u64,
    lifecycles: Vec<LifecycleResult>,
    tool_steps: Vec<ToolStep>,
    first_stage: Vec<FirstStageResult>,
    notes: Vec<String>,
}

impl ProvisionResult {
    fn find(
        &self,
        kind: VolKind,
        thick: bool,
        concurrency: usize,
        path: LifecyclePath,
    ) -> Option<&LifecycleResult> {
        self.lifecycles.iter().find(|l| {
            l.kind == kind && l.thick == thick && l.concurrency == concurrency && l.path == path
        })
    }
}

async fn provision_section(
    settings: &Settings,
    tools: &Tools,
    scratch: &Scratch,
    log: &Progress,
) -> Result<ProvisionResult> {
    let root = scratch.path("provision");
    let state = root.join("state");
    let co = root.join("co");
    let direct = root.join("direct");
    for dir in [&co, &direct] {
        std::fs::create_dir_all(dir)?;
    }
    let filesystem = filesystem_of(&root);
    let mut driver = InProcDriver::start(&scratch.socket("provision"), &state).await?;
    let clients = driver.clients.clone();
    let size = settings.volume_mib * MIB;
    let mut notes = Vec::new();
    let free = u64::try_from(clients.get_capacity().await?).unwrap_or(0);
    let mut lifecycles = Vec::new();
    for &concurrency in &settings.concurrency {
        for thick in [false, true] {
            // Thick volumes hold their size for real: at most `concurrency` exist at once.
            let needed = concurrency as u64 * size / 4 * 5 + GIB;
            if thick && needed > free {
                notes.push(format!(
                    "thick at concurrency {concurrency} skipped: it needs {} MiB of free space, the pool has {} MiB",
                    needed / MIB,
                    free / MIB
                ));
                continue;
            }
            for kind in [VolKind::Ext4, VolKind::Block] {
                let spec = LifecycleSpec {
                    kind,
                    thick,
                    concurrency,
                    volumes: settings.volumes,
                    bytes: size,
                };
                let tag = format!(
                    "{}-{}-c{concurrency}",
                    kind.name(),
                    if thick { "thick" } else { "thin" }
                );
                let d = driver_lifecycle(&clients, spec, &co, &tag).await?;
                log.say(format!(
                    "provision {tag:18} driver {:8.1} volumes/s  Create p50 {:.2} ms  Stage p50 {:.2} ms",
                    d.volumes_per_s, d.rpcs[0].p50, d.rpcs[1].p50
                ));
                let dir = direct.join(&tag);
                let tools_copy = tools.clone();
                let x =
                    tokio::task::spawn_blocking(move || direct_lifecycle(&tools_copy, spec, &dir))
                        .await
                        .context("direct lifecycle task")??;
                log.say(format!(
                    "provision {tag:18} direct {:8.1} volumes/s  create p50 {:.2} ms  stage p50 {:.2} ms",
                    x.volumes_per_s, x.rpcs[0].p50, x.rpcs[1].p50
                ));
                lifecycles.push(d);
                lifecycles.push(x);
            }
        }
    }
    driver.stop().await?;

    log.say("provision: tool step costs");
    let tools_copy = tools.clone();
    let dir = root.join("tools");
    let samples = settings.tool_samples;
    let tool_steps =
        tokio::task::spawn_blocking(move || tool_step_costs(&tools_copy, &dir, samples, size))
            .await
            .context("tool step task")??;

    let mut first_stage = Vec::new();
    for pool in [PoolKind::Disk, PoolKind::Ram] {
        for (bytes, samples) in [
            (size, settings.stage_pairs),
            (settings.big_volume_gib * GIB, settings.big_volume_samples),
        ] {
            log.say(format!(
                "provision: first stage of a {} MiB volume, {} pool, {samples} pairs",
                bytes / MIB,
                pool.name()
            ));
            first_stage.push(first_stage_pairs(tools, scratch, pool, bytes, samples).await?);
        }
    }
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    Ok(ProvisionResult {
        filesystem,
        volume_mib: settings.volume_mib,
        lifecycles,
        tool_steps,
        first_stage,
        notes,
    })
}

#[derive(Clone, Copy, Debug)]
struct LifecycleSpec {
    kind: VolKind,
    thick: bool,
    concurrency: usize,
    volumes: usize,
    bytes: u64,
}

/// `volumes` volumes through the whole lifecycle, `concurrency` at a time, through the driver.
async fn driver_lifecycle(
    clients: &Clients,
    spec: LifecycleSpec,
    co: &Path,
    tag: &str,
) -> Result<LifecycleResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..spec.concurrency {
        let clients = clients.clone();
        let next = Arc::clone(&next);
        let co = co.to_path_buf();
        let tag = tag.to_string();
        workers.push(tokio::spawn(async move {
            let mut lat: Vec<Vec<f64>> = vec![Vec::new(); RPCS.len()];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= spec.volumes {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let name = format!("bench-{tag}-{i}");
                // What the CO prepares (kubelet makes the staging dir and the pod dir).
                let staging = co.join("staging").join(&name);
                let pod = co.join("pods").join(&name);
                let target = pod.join("volume");
                std::fs::create_dir_all(&staging)?;
                std::fs::create_dir_all(&pod)?;
                let t = Instant::now();
                let id = clients
                    .create(&name, spec.bytes, spec.kind, spec.thick)
                    .await?;
                lat[0].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.stage(&id, &staging, spec.kind).await?;
                lat[1].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.publish(&id, &staging, &target, spec.kind).await?;
                lat[2].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.unpublish(&id, &target).await?;
                lat[3].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.unstage(&id, &staging).await?;
                lat[4].push(ms(t.elapsed()));
                let t = Instant::now();
                clients.delete(&id).await?;
                lat[5].push(ms(t.elapsed()));
                std::fs::remove_dir(&staging)?;
                std::fs::remove_dir(&pod)?;
            }
        }));
    }
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); RPCS.len()];
    for worker in workers {
        let lat = worker.await.context("lifecycle worker")??;
        for (mine, theirs) in all.iter_mut().zip(lat) {
            mine.extend(theirs);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    Ok(LifecycleResult {
        kind: spec.kind,
        thick: spec.thick,
        concurrency: spec.concurrency,
        path: LifecyclePath::Driver,
        volumes: spec.volumes,
        wall_s: wall,
        volumes_per_s: spec.volumes as f64 / wall,
        rpcs: all.iter().map(|v| summarize(v)).collect(),
        steps: Vec::new(),
    })
}

/// A backing file made durable, as an admin would for a volume that must survive a crash:
/// created and sized by the driver's own function (fallocate for thick), then fsynced with its
/// directory.
fn create_image(path: &Path, bytes: u64, thick: bool) -> Result<()> {
    let allocation = if thick {
        files::Allocation::Full
    } else {
        files::Allocation::Sparse
    };
    let file = files::create_backing_file(path, bytes, allocation).map_err(|e| anyhow!("{e}"))?;
    file.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    fsync_dir(path.parent().unwrap_or(Path::new("/")))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    files::fsync_dir(dir).map_err(|e| anyhow!("{e}"))
}

/// Attaches `image` the way the driver does (one LOOP_CONFIGURE, direct I/O, 4096-byte blocks).
fn attach_direct(image: &Path) -> Result<loopdev::LoopDevice> {
    loopdev::attach(
        image,
        loopdev::AttachOptions {
            direct_io: true,
            read_only: false,
        },
    )
    .map_err(|e| anyhow!("{e}"))
}

/// One volume's lifecycle done directly; the duration of every step (ms), in STEPS order.
fn direct_one(tools: &Tools, spec: LifecycleSpec, dir: &Path, i: usize) -> Result<[f64; 10]> {
    let mut t = [0.0; 10];
    let image = dir.join(format!("{i}.img"));
    let staging = dir.join(format!("{i}.staging"));
    let pod = dir.join(format!("{i}.pod"));
    let target = pod.join("volume");
    std::fs::create_dir_all(&pod)?;
    if spec.kind.is_fs() {
        std::fs::create_dir_all(&staging)?;
    }
    let clock = Instant::now();
    create_image(&image, spec.bytes, spec.thick)?;
    t[0] = ms(clock.elapsed());
    let clock = Instant::now();
    let dev = attach_direct(&image)?;
    t[1] = ms(clock.elapsed());
    let none = mount::MountOptions::default();
    if spec.kind.is_fs() {
        // No blkid -p here: the driver skips it for a never-written image (the tool step
        // costs list what it costs when it runs).
        let clock = Instant::now();
        tools.mkfs(spec.kind, &dev.path())?;
        t[3] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::mount_device(&dev.path(), &staging, spec.kind.name(), &none)
            .map_err(|e| anyhow!("{e}"))?;
        t[4] = ms(clock.elapsed());
        let clock = Instant::now();
        std::fs::create_dir(&target)?;
        mount::bind(&staging, &target, &none).map_err(|e| anyhow!("{e}"))?;
        t[5] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::unmount(&target).map_err(|e| anyhow!("{e}"))?;
        std::fs::remove_dir(&target)?;
        t[6] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::unmount(&staging).map_err(|e| anyhow!("{e}"))?;
        t[7] = ms(clock.elapsed());
    } else {
        let clock = Instant::now();
        std::fs::File::create(&target)?;
        mount::bind(&dev.path(), &target, &none).map_err(|e| anyhow!("{e}"))?;
        t[5] = ms(clock.elapsed());
        let clock = Instant::now();
        mount::unmount(&target).map_err(|e| anyhow!("{e}"))?;
        std::fs::remove_file(&target)?;
        t[6] = ms(clock.elapsed());
    }
    let clock = Instant::now();
    dev.detach().map_err(|e| anyhow!("{e}"))?;
    t[8] = ms(clock.elapsed());
    let clock = Instant::now();
    std::fs::remove_file(&image)?;
    fsync_dir(dir)?;
    t[9] = ms(clock.elapsed());
    std::fs::remove_dir(&pod)?;
    if spec.kind.is_fs() {
        std::fs::remove_dir(&staging)?;
    }
    Ok(t)
}

/// The same lifecycles as `driver_lifecycle`, with the kernel and tool steps run directly on
/// `concurrency` threads.
fn direct_lifecycle(tools: &Tools, spec: LifecycleSpec, dir: &Path) -> Result<LifecycleResult> {
    std::fs::create_dir_all(dir)?;
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let per_volume: Vec<[f64; 10]> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..spec.concurrency)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<[f64; 10]>> {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= spec.volumes {
                            return Ok(mine);
                        }
                        mine.push(direct_one(tools, spec, dir, i)?);
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            let mine = worker
                .join()
                .map_err(|_| anyhow!("a direct lifecycle thread panicked"))??;
            all.extend(mine);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let wall = started.elapsed().as_secs_f64();
    let rpcs = RPC_STEPS
        .iter()
        .map(|steps| {
            let sums: Vec<f64> = per_volume
                .iter()
                .map(|t| steps.iter().map(|&s| t[s]).sum())
                .collect();
            summarize(&sums)
        })
        .collect();
    let steps = (0..STEPS.len())
        .map(|s| summarize(&per_volume.iter().map(|t| t[s]).collect::<Vec<_>>()))
        .collect();
    std::fs::remove_dir_all(dir)?;
    Ok(LifecycleResult {
        kind: spec.kind,
        thick: spec.thick,
        concurrency: spec.concurrency,
        path: LifecyclePath::Direct,
        volumes: spec.volumes,
        wall_s: wall,
        volumes_per_s: spec.volumes as f64 / wall,
        rpcs,
        steps,
    })
}

/// What the attach and detach steps cost through losetup and through the library's one ioctl.
fn tool_step_costs(tools: &Tools, dir: &Path, samples: usize, bytes: u64) -> Result<Vec<ToolStep>> {
    std::fs::create_dir_all(dir)?;
    let image = dir.join("tool.img");
    std::fs::File::create(&image)?.set_len(bytes)?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 5];
    for _ in 0..samples {
        let clock = Instant::now();
        let dev = tools.losetup_attach(&image, true)?;
        times[0].push(ms(clock.elapsed()));
        let clock = Instant::now();
        tools.losetup_detach(&dev)?;
        times[1].push(ms(clock.elapsed()));
        let clock = Instant::now();
        let dev = attach_direct(&image)?;
        times[2].push(ms(clock.elapsed()));
        let clock = Instant::now();
        tools.blkid_probe(&dev.path())?;
        times[4].push(ms(clock.elapsed()));
        let clock = Instant::now();
        dev.detach().map_err(|e| anyhow!("{e}"))?;
        times[3].push(ms(clock.elapsed()));
    }
    std::fs::remove_dir_all(dir)?;
    let names = [
        "losetup --find --show --direct-io=on --sector-size 4096",
        "losetup -d",
        "loopcsi::host::loopdev::attach (one LOOP_CONFIGURE)",
        "LoopDevice::detach (LOOP_CLR_FD)",
        "blkid -p of a blank device (what the driver's probe costs when it runs)",
    ];
    Ok(names
        .iter()
        .zip(times)
        .map(|(name, t)| ToolStep {
            step: (*name).to_string(),
            summary: summarize(&t),
        })
        .collect())
}

/// The first NodeStageVolume of fresh thin ext4 volumes of `bytes`, each beside the same
/// steps done by hand (attach, mkfs, mount) on a file of the same size in the same pool. The
/// two halves of a pair run back to back and take turns going first, so the per-pair ratio is
/// steady even where the disk's speed swings between runs.
async fn first_stage_pairs(
    tools: &Tools,
    scratch: &Scratch,
    pool: PoolKind,
    bytes: u64,
    samples: usize,
) -> Result<FirstStageResult> {
    let label = format!("first-{}-{}", pool.name(), bytes / MIB);
    let root = scratch.path(&label);
    match pool {
        PoolKind::Disk => std::fs::create_dir_all(&root)?,
        // Sparse: only the file systems' metadata is really written.
        PoolKind::Ram => mount_tmpfs(&root, 2 * bytes + 4 * GIB)?,
    }
    let filesystem = filesystem_of(&root);
    let co = root.join("co");
    std::fs::create_dir_all(&co)?;
    let mut driver = InProcDriver::start(&scratch.socket(&label), &root.join("state")).await?;
    let clients = driver.clients.clone();
    let (mut creates, mut stages, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut attach, mut mkfs, mut mount_ms, mut mkfs_mount) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut note = String::new();
    for i in 0..samples {
        let mut driver_stage = None;
        let mut direct = None;
        for half in 0..2 {
            if (half + i) % 2 == 0 {
                if note.is_empty() {
                    match driver_first_stage(&clients, &co, i, bytes).await? {
                        Ok((create, stage)) => {
                            creates.push(create);
                            driver_stage = Some(stage);
                        }
                        Err(why) => note = why,
                    }
                }
            } else {
                // Blocking work (mkfs, mount): off the runtime the in-process driver serves on.
                let (tools, root) = (tools.clone(), root.clone());
                direct = Some(
                    tokio::task::spawn_blocking(move || {
                        direct_first_stage(&tools, &root, i, bytes)
                    })
                    .await
                    .context("direct first-stage task")??,
                );
            }
        }
        let (a, m, n) = direct.context("the direct half of a pair did not run")?;
        attach.push(a);
        mkfs.push(m);
        mount_ms.push(n);
        mkfs_mount.push(m + n);
        if let Some(stage) = driver_stage {
            stages.push(stage);
            ratios.push(stage / (m + n));
        }
    }
    driver.stop().await?;
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    let summary = |v: &Vec<f64>| (!v.is_empty()).then(|| summarize(v));
    Ok(FirstStageResult {
        pool,
        filesystem,
        size_mib: bytes / MIB,
        driver_create: summary(&creates),
        driver_stage: summary(&stages),
        driver_note: note,
        direct_attach: summarize(&attach),
        direct_mkfs: summarize(&mkfs),
        direct_mount: summarize(&mount_ms),
        direct_mkfs_mount: summarize(&mkfs_mount),
        ratio_to_mkfs_mount: summary(&ratios),
    })
}

/// One fresh volume through the driver: CreateVolume and NodeStageVolume timed (ms), then
/// unstaged and deleted. `Err` (the inner one) with the reason when CreateVolume is refused.
async fn driver_first_stage(
    clients: &Clients,
    co: &Path,
    i: usize,
    bytes: u64,
) -> Result<std::result::Result<(f64, f64), String>> {
    let name = format!("bench-first-{i}");
    let clock = Instant::now();
    let id = match clients
        .create_raw(&name, bytes, VolKind::Ext4, false)
        .await?
    {
        Ok(id) => id,
        Err(status) => {
            return Ok(Err(format!(
                "CreateVolume refused: {:?}: {}",
                status.code(),
                status.message()
            )))
        }
    };
    let create = ms(clock.elapsed());
    let staging = co.join(&name);
    std::fs::create_dir_all(&staging)?;
    let clock = Instant::now();
    clients.stage(&id, &staging, VolKind::Ext4).await?;
    let stage = ms(clock.elapsed());
    clients.unstage(&id, &staging).await?;
    clients.delete(&id).await?;
    Ok(Ok((create, stage)))
}

/// The same steps by hand on a fresh sparse file: attach, mkfs and mount timed (ms), then
/// unmounted, detached and removed.
fn direct_first_stage(tools: &Tools, root: &Path, i: usize, bytes: u64) -> Result<(f64, f64, f64)> {
    let image = root.join(format!("direct-{i}.img"));
    let mount_point = root.join(format!("direct-{i}.mnt"));
    std::fs::create_dir_all(&mount_point)?;
    create_image(&image, bytes, false)?;
    let clock = Instant::now();
    let dev = attach_direct(&image)?;
    let attach = ms(clock.elapsed());
    let clock = Instant::now();
    tools.mkfs(VolKind::Ext4, &dev.path())?;
    let mkfs = ms(clock.elapsed());
    let clock = Instant::now();
    mount::mount_device(
        &dev.path(),
        &mount_point,
        "ext4",
        &mount::MountOptions::default(),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let mounted = ms(clock.elapsed());
    mount::unmount(&mount_point).map_err(|e| anyhow!("{e}"))?;
    dev.detach().map_err(|e| anyhow!("{e}"))?;
    std::fs::remove_file(&image)?;
    std::fs::remove_dir(&mount_point)?;
    Ok((attach, mkfs, mounted))
}

// ---------------------------------------------------------------------------------------------
// Section 3: scale, with the real binary as a child
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Serialize)]
struct Rss {
    vm_rss_mib: f64,
    vm_hwm_mib: f64,
    threads: u64,
}

fn read_rss(pid: u32) -> Result<Rss> {
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
struct ScaleResult {
    filesystem: String,
    volumes: usize,
    staged: usize,
    volume_mib: u64,
    first_start_to_ready_ms: f64,
    create: Summary,
    create_per_s: f64,
    stage: Summary,
    stage_per_s: f64,
    rss_loaded: Rss,
    list_all: Summary,
    list_paged_100: Summary,
    get_capacity: Summary,
    volume_stats: Summary,
    /// What every node RPC reads to observe the kernel, timed in the bench process with the
    /// driver's own functions: the loop device scan and the mount table.
    sysfs_loop_entries: usize,
    attached_loop_devices: usize,
    mount_entries: usize,
    scan_loop_devices: Summary,
    scan_mountinfo: Summary,
    restarts_to_ready_ms: Vec<f64>,
    restart_socket_ms: Vec<f64>,
    rss_after_restart: Rss,
    list_all_after_restart: Summary,
    unstage: Summary,
    delete: Summary,
}

/// The real driver binary as a child process.
struct ChildDriver {
    guard: ChildGuard,
    clients: Clients,
    pid: u32,
}

/// Starts `loopcsi serve` (default flags, logging to a file) and waits for Probe ready.
/// Returns the driver, the time until its socket accepted a connection and until it was ready.
async fn spawn_driver(
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
    async fn stop(mut self) -> Result<()> {
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
async fn fan_out<F, Fut>(n: usize, concurrency: usize, op: F) -> Result<(Vec<f64>, f64)>
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

async fn repeat<F, Fut>(times: usize, mut op: F) -> Result<Summary>
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

async fn scale_section(
    settings: &Settings,
    scratch: &Scratch,
    bin: &Path,
    log: &Progress,
) -> Result<ScaleResult> {
    let root = scratch.path("scale");
    let state = root.join("state");
    let co = root.join("co");
    std::fs::create_dir_all(&co)?;
    let socket = scratch.socket("scale");
    let driver_log = root.join("driver.log");
    let mut result = ScaleResult {
        filesystem: filesystem_of(&root),
        volumes: settings.scale_volumes,
        staged: settings.scale_staged,
        volume_mib: settings.scale_volume_mib,
        ..Default::default()
    };
    let (driver, _, ready) = spawn_driver(bin, &socket, &state, &driver_log).await?;
    result.first_start_to_ready_ms = ready;
    let clients = driver.clients.clone();

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
    let ids = Arc::new(ids);
    let staging_of = {
        let co = co.clone();
        move |i: usize| co.join(format!("staging-{i}"))
    };

    log.say(format!("scale: staging {}", settings.scale_staged));
    for i in 0..settings.scale_staged {
        std::fs::create_dir_all(staging_of(i))?;
    }
    let (lat, wall) = {
        let clients = clients.clone();
        let ids = Arc::clone(&ids);
        let staging_of = staging_of.clone();
        fan_out(settings.scale_staged, 8, move |i| {
            let clients = clients.clone();
            let ids = Arc::clone(&ids);
            let staging = staging_of(i);
            async move { clients.stage(&ids[i], &staging, VolKind::Ext4).await }
        })
        .await?
    };
    result.stage = summarize(&lat);
    result.stage_per_s = settings.scale_staged as f64 / wall;

    log.say("scale: RSS, ListVolumes, GetCapacity, NodeGetVolumeStats");
    result.rss_loaded = read_rss(driver.pid)?;
    let expected = settings.scale_volumes;
    let list_times = if settings.smoke { 2 } else { 20 };
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
        for i in 0..settings.scale_staged {
            let clock = Instant::now();
            clients.volume_stats(&ids[i], &staging_of(i)).await?;
            stats.push(ms(clock.elapsed()));
        }
    }
    result.volume_stats = summarize(&stats);
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

    log.say("scale: restarts");
    let mut driver = driver;
    for _ in 0..3 {
        driver.stop().await?;
        let (next, socket_ms, ready_ms) = spawn_driver(bin, &socket, &state, &driver_log).await?;
        result.restart_socket_ms.push(socket_ms);
        result.restarts_to_ready_ms.push(ready_ms);
        driver = next;
    }
    result.rss_after_restart = read_rss(driver.pid)?;
    let clients = driver.clients.clone();
    result.list_all_after_restart =
        repeat(list_times, || async { clients.list_all(0).await.map(drop) }).await?;

    log.say("scale: unstaging and deleting");
    let (lat, _) = {
        let clients = clients.clone();
        let ids = Arc::clone(&ids);
        let staging_of = staging_of.clone();
        fan_out(settings.scale_staged, 8, move |i| {
            let clients = clients.clone();
            let ids = Arc::clone(&ids);
            let staging = staging_of(i);
            async move { clients.unstage(&ids[i], &staging).await }
        })
        .await?
    };
    result.unstage = summarize(&lat);
    let (lat, _) = {
        let clients = clients.clone();
        let ids = Arc::clone(&ids);
        fan_out(settings.scale_volumes, 8, move |i| {
            let clients = clients.clone();
            let ids = Arc::clone(&ids);
            async move { clients.delete(&ids[i]).await }
        })
        .await?
    };
    result.delete = summarize(&lat);
    driver.stop().await?;
    release_under(&root)?;
    std::fs::remove_dir_all(&root)?;
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
    os: String,
    pool_dir: String,
    pool_filesystem: String,
    tools: Vec<String>,
    loopcsi_version: String,
    command: String,
    /// Loop devices the kernel lists at the start (attached or not: they stay after detach).
    loop_entries_at_start: usize,
    loop_devices_attached_at_start: usize,
}

#[derive(Clone, Debug, Serialize)]
struct TargetCheck {
    target: String,
    measured: String,
    /// None: not measurable on this machine (said why in `measured`).
    met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
struct Report {
    machine: Machine,
    settings: Settings,
    data: Vec<DataPoolResult>,
    provision: Option<ProvisionResult>,
    scale: Option<ScaleResult>,
    targets: Vec<TargetCheck>,
    duration_s: f64,
}

fn machine_info(pool_dir: &Path, settings: &Settings, tools: &Tools) -> Machine {
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

/// Checks the issue's targets against the measurements.
fn evaluate(report: &Report) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
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
    if let Some(p) = &report.provision {
        for first in &p.first_stage {
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
            checks.push(TargetCheck {
                target,
                measured,
                met,
            });
        }
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
    if let Some(s) = &report.scale {
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
    checks
}

fn fmt_metric(value: f64) -> String {
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

fn fmt_ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn spread(cell: &DataCell) -> String {
    if cell.samples.len() < 2 || cell.median <= 0.0 {
        return String::new();
    }
    let pct = (cell.max - cell.min) / cell.median * 100.0;
    format!(" ±{:.0}%", pct / 2.0)
}

fn render(report: &Report) -> String {
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
    if let Some(sc) = &report.scale {
        render_scale(&mut out, sc);
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

fn render_data(out: &mut String, report: &Report) {
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
        let _ = write!(out, "| target |");
        for job in JOBS {
            let _ = write!(out, " {} |", job.heading());
        }
        let _ = writeln!(out, "\n| --- |{}", " ---: |".repeat(JOBS.len()));
        for target in &pool.targets {
            let _ = write!(out, "| {target} |");
            for job in JOBS {
                match pool
                    .cells
                    .iter()
                    .find(|c| &c.target == target && c.job == job)
                {
                    Some(c) => {
                        let _ = write!(out, " {}{} |", fmt_metric(c.median), spread(c));
                    }
                    None => {
                        let _ = write!(out, " – |");
                    }
                }
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Ratios, paired by round (the median of the per-round ratios; targets of one kind run \
             back to back): ÷ plain file / **÷ tuned loop** [lowest–highest round] / ÷ \
             buffered-512 loop of the same kind:\n"
        );
        let _ = write!(out, "| target |");
        for job in JOBS {
            let _ = write!(out, " {} |", job.key());
        }
        let _ = writeln!(out, "\n| --- |{}", " ---: |".repeat(JOBS.len()));
        for kind in [VolKind::Ext4, VolKind::Xfs, VolKind::Block] {
            for variant in [Variant::Volume, Variant::Tuned, Variant::Buffered512] {
                let target = Target::Loop(variant, kind);
                let _ = write!(out, "| {} |", target.key());
                for job in JOBS {
                    let ratio = |base: Target| -> String {
                        pool.paired(target, base, job)
                            .map_or("–".into(), |r| format!("{:.2}", r.median))
                    };
                    let cell = match variant {
                        Variant::Volume => {
                            let tuned = Target::Loop(Variant::Tuned, kind);
                            let range =
                                pool.paired(target, tuned, job).map_or(String::new(), |r| {
                                    let lo =
                                        r.per_round.iter().copied().fold(f64::INFINITY, f64::min);
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
                        _ => format!("{} / – / –", ratio(Target::Plain)),
                    };
                    let _ = write!(out, " {cell} |");
                }
                let _ = writeln!(out);
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Completion latency p99 (µs, median over rounds):\n");
        let _ = write!(out, "| target |");
        for job in JOBS {
            let _ = write!(out, " {} |", job.key());
        }
        let _ = writeln!(out, "\n| --- |{}", " ---: |".repeat(JOBS.len()));
        for target in &pool.targets {
            let _ = write!(out, "| {target} |");
            for job in JOBS {
                match pool
                    .cells
                    .iter()
                    .find(|c| &c.target == target && c.job == job)
                {
                    Some(c) => {
                        let _ = write!(out, " {:.0} |", c.clat_p99_us);
                    }
                    None => {
                        let _ = write!(out, " – |");
                    }
                }
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
    }
}

fn render_provision(out: &mut String, p: &ProvisionResult) {
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
            if l.thick { "thick" } else { "thin" },
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
    for note in &p.notes {
        let _ = writeln!(out, "- {note}");
    }
    if !p.notes.is_empty() {
        let _ = writeln!(out);
    }
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
            if l.thick { "thick" } else { "thin" },
            l.concurrency
        );
        for st in &l.steps {
            let _ = write!(out, " {} / {} |", fmt_ms(st.p50), fmt_ms(st.p99));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
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

fn render_scale(out: &mut String, s: &ScaleResult) {
    let _ = writeln!(out, "## Scale\n");
    let _ = writeln!(
        out,
        "The real `loopcsi` binary as a child (default flags, logs to a file), pool: {}. {} thin \
         ext4 volumes of {} MiB created and {} of them staged (8 RPCs in flight).\n",
        s.filesystem, s.volumes, s.volume_mib, s.staged
    );
    let sum = |x: &Summary| format!("p50 {} ms, p99 {} ms", fmt_ms(x.p50), fmt_ms(x.p99));
    let _ = writeln!(out, "| measure | value |\n| --- | --- |");
    let _ = writeln!(
        out,
        "| first start to ready (empty pool) | {} ms |",
        fmt_ms(s.first_start_to_ready_ms)
    );
    let _ = writeln!(
        out,
        "| CreateVolume | {}; {:.0} volumes/s |",
        sum(&s.create),
        s.create_per_s
    );
    let _ = writeln!(
        out,
        "| NodeStageVolume | {}; {:.1} volumes/s |",
        sum(&s.stage),
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
        sum(&s.list_all)
    );
    let _ = writeln!(
        out,
        "| ListVolumes of all (pages of 100) | {} |",
        sum(&s.list_paged_100)
    );
    let _ = writeln!(out, "| GetCapacity | {} |", sum(&s.get_capacity));
    let _ = writeln!(
        out,
        "| NodeGetVolumeStats (staged volumes) | {} |",
        sum(&s.volume_stats)
    );
    let _ = writeln!(
        out,
        "| `loopdev::attached()` ({} loop entries in /sys/block, {} attached) | {} |",
        s.sysfs_loop_entries,
        s.attached_loop_devices,
        sum(&s.scan_loop_devices)
    );
    let _ = writeln!(
        out,
        "| `mount::mounts()` ({} entries in mountinfo) | {} |",
        s.mount_entries,
        sum(&s.scan_mountinfo)
    );
    let _ = writeln!(
        out,
        "| restart (SIGTERM, start) to Probe ready | {} ms (socket accepting after {} ms) |",
        s.restarts_to_ready_ms
            .iter()
            .map(|v| fmt_ms(*v))
            .collect::<Vec<_>>()
            .join(", "),
        s.restart_socket_ms
            .iter()
            .map(|v| fmt_ms(*v))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "| RSS after restart (VmRSS / VmHWM / threads) | {:.1} MiB / {:.1} MiB / {} |",
        s.rss_after_restart.vm_rss_mib, s.rss_after_restart.vm_hwm_mib, s.rss_after_restart.threads
    );
    let _ = writeln!(
        out,
        "| ListVolumes of all after restart | {} |",
        sum(&s.list_all_after_restart)
    );
    let _ = writeln!(out, "| NodeUnstageVolume | {} |", sum(&s.unstage));
    let _ = writeln!(out, "| DeleteVolume | {} |\n", sum(&s.delete));
}
