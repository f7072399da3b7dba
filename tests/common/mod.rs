//! Test fixture: a real loopcsi server on a temporary socket, driven by tonic clients, against
//! real loop devices, mkfs and mounts. Everything a test makes lives under its own temp dir;
//! the fixture's Drop unmounts and detaches whatever is left there (even when the test panics)
//! and then asserts that nothing is left. It touches nothing outside its dir.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod process;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use loopcsi::config::Config;
use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::identity_client::IdentityClient;
use loopcsi::csi::node_client::NodeClient;
use loopcsi::host::{loopdev, mount};
use tonic::transport::{Channel, Endpoint, Uri};

pub const MIB: i64 = 1 << 20;
pub const NODE: &str = "test-node-1";

/// A temp dir for one test. Dropping it unmounts and detaches whatever is still under it (even
/// when the test panicked), asserts that nothing is left, then removes it.
pub struct Scratch {
    dir: tempfile::TempDir,
    root: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("loopcsi-test-")
            .tempdir()
            .unwrap();
        let root = dir.path().canonicalize().unwrap();
        Scratch { dir, root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        release_everything_under(&self.root);
        let left = leftovers_under(&self.root);
        if !std::thread::panicking() {
            assert_eq!(
                left,
                Vec::<String>::new(),
                "cleanup could not release these"
            );
        }
    }
}

pub struct TestDriver {
    scratch: Scratch,
    root: PathBuf,
    running: Option<Running>,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// One in-process server: its shutdown trigger and task.
struct Running {
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    metrics: Option<std::net::SocketAddr>,
}

fn config(root: &Path) -> Config {
    Config {
        metrics_address: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        ..config_for(&root.join("csi.sock"), root.join("state"))
    }
}

/// The config of an in-process driver serving `socket` with state in `state_dir` (no metrics,
/// no reconciliation rounds: tests run those themselves).
pub fn config_for(socket: &Path, state_dir: PathBuf) -> Config {
    Config {
        endpoint: format!("unix://{}", socket.display()),
        node_id: NODE.into(),
        state_dir,
        driver_name: "loopcsi.dev".into(),
        max_volumes_per_node: 0,
        // Tests run reconciliation rounds themselves, when they want one.
        reconcile_interval: 0,
        // An ephemeral loopback port where wanted (see `config`): no fixed ports in tests.
        metrics_address: None,
        buffered_io: false,
        allow_node_id_change: false,
        no_get_snapshot_capability: false,
        tool_timeout: 600,
    }
}

pub async fn connect(socket: PathBuf) -> Channel {
    Endpoint::try_from("http://loopcsi.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to the driver socket")
}

/// Serves a bound driver on the runtime until the returned sender fires (or is dropped).
pub fn serve_in_background(
    server: loopcsi::server::BoundServer,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(async {
                let _ = rx.await;
            })
            .await
            .expect("driver serve");
    });
    (shutdown, task)
}

/// Binds and serves a driver on `root`; the socket exists when this returns, so connecting
/// cannot race the server (no sleeps, no polling).
async fn launch(root: &Path) -> (Running, Channel) {
    let server = loopcsi::server::bind(&config(root)).expect("bind the driver socket");
    let socket = server.socket().to_path_buf();
    let metrics = server.metrics_address();
    let (shutdown, task) = serve_in_background(server);
    (
        Running {
            shutdown,
            task,
            metrics,
        },
        connect(socket).await,
    )
}

impl TestDriver {
    /// A fresh driver with an empty state dir.
    pub async fn start() -> Self {
        let scratch = Scratch::new();
        let root = scratch.path().to_path_buf();
        let (running, channel) = launch(&root).await;
        TestDriver {
            scratch,
            root,
            running: Some(running),
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    /// A driver whose state dir (the pool) is a small file system of its own: a `fs_type`
    /// file system of `mib` MiB made on a loop device in the test's dir, so tests can fill it.
    pub async fn start_on_small_pool(fs_type: &str, mib: u64) -> Self {
        Self::start_on_small_pool_with(fs_type, mib, &[]).await
    }

    /// As `start_on_small_pool`, with extra mkfs arguments (e.g. `-O ^has_journal`).
    pub async fn start_on_small_pool_with(fs_type: &str, mib: u64, mkfs_args: &[&str]) -> Self {
        let scratch = Scratch::new();
        let root = scratch.path().to_path_buf();
        let image = root.join("pool.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        // 4096-byte blocks/sectors: the pool's loop device below has 4096-byte logical blocks.
        let args: &[&str] = if fs_type == "xfs" {
            &["-q", "-f", "-s", "size=4096"]
        } else {
            &["-q", "-F", "-b", "4096"]
        };
        let mkfs = std::process::Command::new(format!("mkfs.{fs_type}"))
            .args(args)
            .args(mkfs_args)
            .arg(&image)
            .status()
            .unwrap();
        assert!(mkfs.success(), "mkfs.{fs_type} of the pool");
        let dev = loopdev::attach(
            &image,
            loopdev::AttachOptions {
                direct_io: false,
                read_only: false,
            },
        )
        .unwrap();
        let state = root.join("state");
        std::fs::create_dir_all(&state).unwrap();
        nix::mount::mount(
            Some(&dev.path()),
            &state,
            Some(fs_type),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let (running, channel) = launch(&root).await;
        TestDriver {
            scratch,
            root,
            running: Some(running),
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    /// Stops the server gracefully (it removes its socket) and starts a new one on the same
    /// state dir, as a restart of the node plugin does.
    pub async fn restart(&mut self) {
        self.stop().await;
        let (running, channel) = launch(&self.root).await;
        self.running = Some(running);
        self.identity = IdentityClient::new(channel.clone());
        self.controller = ControllerClient::new(channel.clone());
        self.node = NodeClient::new(channel);
    }

    /// Where the running driver serves /metrics.
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        self.running
            .as_ref()
            .and_then(|r| r.metrics)
            .expect("the test driver serves metrics")
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // Startup recovery runs in the background of an in-process server and would go on
            // after `serve` returns; a test that then changes the state dir must not race it.
            // Any RPC but Probe waits for recovery to finish (no polling, no sleeps).
            let _ = self
                .controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 1,
                    starting_token: String::new(),
                })
                .await;
            let _ = running.shutdown.send(());
            running.task.await.unwrap();
        }
        assert!(
            !self.root.join("csi.sock").exists(),
            "the socket is removed on shutdown"
        );
    }

    /// Unmounts and detaches everything under this test's dir, as a node reboot would.
    pub fn simulate_reboot(&self) {
        release_everything_under(&self.root);
        assert_eq!(leftovers_under(&self.root), Vec::<String>::new());
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    /// A directory the CO would create for staging (the CO owns staging paths).
    pub fn staging(&self, name: &str) -> PathBuf {
        let path = self.root.join("staging").join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }
    /// A target path whose parent exists (the driver creates the target itself).
    pub fn target(&self, name: &str) -> PathBuf {
        let parent = self.root.join("pods").join(name);
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("volume")
    }

    /// Asserts that no loop device or mount under this test's dir is left by the driver.
    pub fn assert_clean(&self) {
        // A small pool's own file system (mounted at state/, from pool.img) is the fixture's.
        let pool_mount = format!("mount {}", self.state_dir().display());
        let pool_device = format!("-> {}", self.root.join("pool.img").display());
        let left: Vec<String> = leftovers_under(&self.root)
            .into_iter()
            .filter(|l| *l != pool_mount && !l.ends_with(&pool_device))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "the driver left these behind");
    }

    /// The loop device attached to a volume's image, if any.
    pub fn loop_device_of(&self, volume_id: &str) -> Option<loopdev::LoopDevice> {
        let image = self
            .state_dir()
            .join("volumes")
            .join(format!("{volume_id}.img"));
        loopdev::find_by_backing_file(&image).unwrap()
    }

    pub fn image_path(&self, volume_id: &str) -> PathBuf {
        self.state_dir()
            .join("volumes")
            .join(format!("{volume_id}.img"))
    }

    // ---- RPC shorthands (each returns the tonic result, so tests can assert codes) ----

    pub async fn create(
        &mut self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::Volume, tonic::Status> {
        self.controller.create_volume(req).await.map(|r| {
            r.into_inner()
                .volume
                .expect("CreateVolume returns a volume")
        })
    }

    pub async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: HashMap::new(),
            })
            .await
            .map(drop)
    }

    pub async fn stage(
        &mut self,
        id: &str,
        staging: &Path,
        cap: csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(drop)
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(drop)
    }

    pub async fn stats(
        &mut self,
        id: &str,
        path: &Path,
    ) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
        self.node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn list_all(&mut self) -> Vec<csi::Volume> {
        self.controller
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.volume.unwrap())
            .collect()
    }
}

impl Drop for TestDriver {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(());
            // The driver holds <state-dir>/lock open until it stops, and an open file keeps a
            // small pool's file system busy: wait (bounded) for the graceful stop, so that
            // `scratch` can unmount it. Abort only if the stop does not come.
            let mut task = running.task;
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                tokio::task::block_in_place(|| {
                    let _ = handle.block_on(tokio::time::timeout(
                        std::time::Duration::from_secs(30),
                        &mut task,
                    ));
                });
            }
            task.abort();
        }
        // `scratch` is dropped next: it releases and checks everything under the dir.
    }
}

/// Every attached loop device with its backing file, by walking all of /sys/block. Slower than
/// the driver's `loopdev::attached` (which lists only devices with capacity), and independent
/// of it, so the tests also catch a device the driver could not see.
pub fn every_attached_loop_device() -> Vec<(loopdev::LoopDevice, PathBuf)> {
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let number: u32 = name.to_str()?.strip_prefix("loop")?.parse().ok()?;
            let dev = loopdev::LoopDevice(number);
            dev.backing_file().map(|file| (dev, file))
        })
        .collect()
}

/// Mounts and loop devices under `root` (what a test made), described for assertion messages.
pub fn leftovers_under(root: &Path) -> Vec<String> {
    let mut left: Vec<String> = mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| format!("mount {}", m.mount_point.display()))
        .collect();
    left.extend(
        every_attached_loop_device()
            .into_iter()
            .filter(|(_, file)| file.starts_with(root))
            .map(|(dev, file)| format!("{} -> {}", dev.path().display(), file.display())),
    );
    left
}

/// Unmounts (deepest first) and detaches everything under `root`; touches nothing else.
pub fn release_everything_under(root: &Path) {
    // Volumes' loop devices may sit on a pool file system that is itself a loop-mounted file
    // under `root`, so unmount and detach in rounds, innermost first, lazily only at the end.
    for round in 0..6 {
        let table = mount::mounts().unwrap();
        let mut points: Vec<PathBuf> = table
            .iter()
            .filter(|m| m.mount_point.starts_with(root))
            .map(|m| m.mount_point.clone())
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for point in &points {
            let flags = if round < 4 {
                nix::mount::MntFlags::UMOUNT_NOFOLLOW
            } else {
                nix::mount::MntFlags::MNT_DETACH
            };
            let _ = nix::mount::umount2(point, flags);
        }
        let table = mount::mounts().unwrap();
        let devices: Vec<_> = every_attached_loop_device()
            .into_iter()
            .filter(|(_, file)| file.starts_with(root))
            .collect();
        for (dev, _) in &devices {
            let numbers = dev.dev_numbers().unwrap();
            let in_use = table.iter().any(|m| (m.major, m.minor) == numbers);
            if !in_use || round >= 4 {
                dev.detach().unwrap();
            }
        }
        if points.is_empty() && devices.is_empty() {
            break;
        }
    }
}

// ---- request builders ----

pub fn mode(
    m: csi::volume_capability::access_mode::Mode,
) -> Option<csi::volume_capability::AccessMode> {
    Some(csi::volume_capability::AccessMode { mode: m as i32 })
}

pub fn mount_cap(fs: &str, m: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    mount_cap_flags(fs, m, &[])
}

pub fn mount_cap_flags(
    fs: &str,
    m: csi::volume_capability::access_mode::Mode,
    flags: &[&str],
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                volume_mount_group: String::new(),
            },
        )),
        access_mode: mode(m),
    }
}

pub fn block_cap(m: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: mode(m),
    }
}

pub fn snw() -> csi::volume_capability::access_mode::Mode {
    csi::volume_capability::access_mode::Mode::SingleNodeWriter
}

pub fn create_req(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn with_params(
    mut req: csi::CreateVolumeRequest,
    params: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    req.parameters = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    req
}

/// Asserts a tonic result failed with `code`, and that the message mentions `needle`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Ok(v) => panic!("expected {code:?} mentioning {needle:?}, got OK {v:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "wrong code; message: {}",
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                status.message()
            );
        }
    }
}

/// Thaws the file system mounted at `dir` if it is frozen (`fsfreeze --unfreeze`; an error,
/// such as "not frozen", is ignored: this only ever undoes a freeze).
pub fn thaw(dir: &Path) {
    let _ = std::process::Command::new("fsfreeze")
        .arg("--unfreeze")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Thaws every file system mounted under `root`, so that a freeze a killed driver left behind
/// cannot keep `release_everything_under` from unmounting and detaching it.
pub fn thaw_everything_under(root: &Path) {
    for m in mount::mounts().unwrap() {
        if m.mount_point.starts_with(root) && m.mount_point.is_dir() {
            thaw(&m.mount_point);
        }
    }
}

/// The names of the files in `dir` (none when it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
