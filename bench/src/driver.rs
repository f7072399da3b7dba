//! The driver under test: in this process on a temp socket, with the bench's view of the
//! shared CSI clients (errors become `anyhow` errors naming the RPC).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::*;
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use loopcsi::csi;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum VolKind {
    Ext4,
    Xfs,
    Block,
}

impl VolKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            VolKind::Ext4 => "ext4",
            VolKind::Xfs => "xfs",
            VolKind::Block => "block",
        }
    }

    pub(crate) fn is_fs(self) -> bool {
        self != VolKind::Block
    }

    pub(crate) fn capability(self) -> csi::VolumeCapability {
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

/// The bench's view of the shared CSI clients (loopcsi-testkit): arguments in the bench's
/// terms (a volume kind, sizes in bytes), every failure an error naming the RPC.
#[derive(Clone)]
pub(crate) struct Clients(pub(crate) loopcsi_testkit::Clients);

fn rpc<T>(what: &str, result: std::result::Result<T, tonic::Status>) -> Result<T> {
    result.map_err(|status| anyhow!("{what}: {:?}: {}", status.code(), status.message()))
}

impl Clients {
    /// Connects to the unix socket.
    pub(crate) async fn connect(socket: &Path) -> Result<Self> {
        let clients = loopcsi_testkit::Clients::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(Clients(clients))
    }

    pub(crate) async fn probe(&self) -> Result<bool> {
        rpc("Probe", self.0.probe().await)
    }

    pub(crate) async fn wait_ready(&self, timeout: Duration) -> Result<()> {
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
    pub(crate) async fn create_raw(
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
        Ok(self.0.create(req).await.map(|v| v.volume_id))
    }

    pub(crate) async fn create(
        &self,
        name: &str,
        bytes: u64,
        kind: VolKind,
        thick: bool,
    ) -> Result<String> {
        self.create_raw(name, bytes, kind, thick)
            .await?
            .map_err(|s| anyhow!("CreateVolume {name}: {:?}: {}", s.code(), s.message()))
    }

    pub(crate) async fn delete(&self, id: &str) -> Result<()> {
        rpc("DeleteVolume", self.0.delete(id).await)
    }

    pub(crate) async fn stage(&self, id: &str, staging: &Path, kind: VolKind) -> Result<()> {
        let result = self.0.stage(id, staging, kind.capability()).await;
        rpc("NodeStageVolume", result)
    }

    pub(crate) async fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        rpc("NodeUnstageVolume", self.0.unstage(id, staging).await)
    }

    pub(crate) async fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        kind: VolKind,
    ) -> Result<()> {
        let cap = kind.capability();
        let result = self.0.publish(id, staging, target, cap, false).await;
        rpc("NodePublishVolume", result)
    }

    pub(crate) async fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        rpc("NodeUnpublishVolume", self.0.unpublish(id, target).await)
    }

    /// ListVolumes from the start, following tokens; the number of volumes seen.
    pub(crate) async fn list_all(&self, page: i32) -> Result<usize> {
        let mut token = String::new();
        let mut seen = 0;
        loop {
            let reply = rpc("ListVolumes", self.0.list_page(page, token).await)?;
            seen += reply.entries.len();
            if reply.next_token.is_empty() {
                return Ok(seen);
            }
            token = reply.next_token;
        }
    }

    pub(crate) async fn get_capacity(&self) -> Result<i64> {
        let req = csi::GetCapacityRequest {
            volume_capabilities: vec![VolKind::Ext4.capability()],
            ..Default::default()
        };
        rpc("GetCapacity", self.0.get_capacity(req).await)
    }

    pub(crate) async fn volume_stats(&self, id: &str, path: &Path) -> Result<()> {
        rpc("NodeGetVolumeStats", self.0.stats(id, path).await).map(drop)
    }
}

/// The driver's config, made by the driver's own command-line parser (so fields added later
/// keep their defaults): reconciliation off, everything else as shipped.
pub(crate) fn driver_config(socket: &Path, state_dir: &Path) -> Result<loopcsi::config::Config> {
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
pub(crate) struct InProcDriver {
    pub(crate) clients: Clients,
    pub(crate) shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task:
        Option<tokio::task::JoinHandle<std::result::Result<(), loopcsi::error::Error>>>,
}

impl InProcDriver {
    pub(crate) async fn start(socket: &Path, state_dir: &Path) -> Result<Self> {
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

    pub(crate) async fn stop(&mut self) -> Result<()> {
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
