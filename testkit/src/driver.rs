//! The in-process fixture: a real loopcsi server on a temporary socket and state dir, driven by
//! the CSI clients, against real loop devices, mkfs and mounts. Its Drop stops the server and
//! its [`Scratch`] unmounts and detaches whatever is left under the test's dir, then asserts
//! that nothing is left.

use std::path::{Path, PathBuf};

use loopcsi::config::Config;
use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::identity_client::IdentityClient;
use loopcsi::csi::node_client::NodeClient;
use loopcsi::host::loopdev;
use tonic::transport::Channel;

use crate::client::{connect, Clients};
use crate::leaks::{leftovers_under, release_everything_under, Scratch};
use crate::NODE;

pub struct TestDriver {
    /// Held for its Drop, which runs after the server stops (see `Drop for TestDriver`).
    #[allow(dead_code)]
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
        max_freeze_ms: 5000,
        cbt_block_size: 0,
    }
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
    /// Launches the server on `root` (inside `scratch`) and connects the clients.
    async fn launch_on(scratch: Scratch, root: PathBuf) -> Self {
        let (running, channel) = launch(&root).await;
        let Clients {
            identity,
            controller,
            node,
        } = Clients::new(channel);
        TestDriver {
            scratch,
            root,
            running: Some(running),
            identity,
            controller,
            node,
        }
    }

    /// A fresh driver with an empty state dir.
    pub async fn start() -> Self {
        let scratch = Scratch::new();
        let root = scratch.path().to_path_buf();
        Self::launch_on(scratch, root).await
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
        Self::launch_on(scratch, root).await
    }

    /// Stops the server gracefully (it removes its socket) and starts a new one on the same
    /// state dir, as a restart of the node plugin does.
    pub async fn restart(&mut self) {
        self.stop().await;
        let (running, channel) = launch(&self.root).await;
        self.running = Some(running);
        let clients = Clients::new(channel);
        self.identity = clients.identity;
        self.controller = clients.controller;
        self.node = clients.node;
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

    /// A second view of this driver's state dir through the domain's door, opened as a driver
    /// starting on it opens it (startup recovery runs), on the real host.
    pub fn open_volumes(&self) -> loopcsi::volume::Volumes {
        let tools = loopcsi::host::tools::Tools::discover().expect("the tools are installed");
        let host = std::sync::Arc::new(loopcsi::host::linux::Linux::new(tools));
        loopcsi::volume::Volumes::open(&self.state_dir(), host, true)
            .expect("the state dir opens")
            .0
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

    /// The driver's clients as one [`Clients`] (clones sharing the connection).
    /// A SnapshotMetadata client on its own connection to this driver's socket.
    pub async fn metadata(&self) -> crate::metadata::MetadataClient {
        crate::metadata::MetadataClient::connect(&self.root.join("csi.sock"))
            .await
            .expect("connect the SnapshotMetadata client")
    }

    pub fn clients(&self) -> Clients {
        Clients {
            identity: self.identity.clone(),
            controller: self.controller.clone(),
            node: self.node.clone(),
        }
    }

    // ---- RPC shorthands (each returns the tonic result, so tests can assert codes) ----

    pub async fn create(
        &mut self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::Volume, tonic::Status> {
        self.clients().create(req).await
    }

    pub async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.clients().delete(id).await
    }

    pub async fn stage(
        &mut self,
        id: &str,
        staging: &Path,
        cap: csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.clients().stage(id, staging, cap).await
    }

    pub async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.clients().unstage(id, staging).await
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.clients()
            .publish(id, staging, target, cap, readonly)
            .await
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.clients().unpublish(id, target).await
    }

    pub async fn stats(
        &mut self,
        id: &str,
        path: &Path,
    ) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
        self.clients().stats(id, path).await
    }

    pub async fn list_all(&mut self) -> Vec<csi::Volume> {
        self.clients()
            .list_page(0, String::new())
            .await
            .unwrap()
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
