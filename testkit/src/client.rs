//! The one CSI client wrapper: the three gRPC clients on one connection to a driver's unix
//! socket, with shorthands for the RPCs that return tonic's result, so that tests can assert
//! codes and the bench can turn a status into its own error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::identity_client::IdentityClient;
use loopcsi::csi::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

/// Opens a channel to the driver's unix socket. The authority is a fixed name: the socket path
/// is not a host name (see DESIGN.md, "Be liberal in what clients you accept").
pub async fn try_connect(socket: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://loopcsi.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}

/// As [`try_connect`], for tests: a socket that does not answer fails the test.
pub async fn connect(socket: PathBuf) -> Channel {
    try_connect(socket)
        .await
        .expect("connect to the driver socket")
}

/// The three CSI clients on one connection (cheap to clone: they share the channel).
#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

impl Clients {
    pub fn new(channel: Channel) -> Self {
        Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    /// Connects to the driver's unix socket.
    pub async fn connect(socket: &Path) -> Result<Self, tonic::transport::Error> {
        try_connect(socket.to_path_buf()).await.map(Clients::new)
    }

    /// Probe: whether the driver says it is ready.
    pub async fn probe(&self) -> Result<bool, Status> {
        let reply = self.identity.clone().probe(csi::ProbeRequest {}).await?;
        Ok(reply.into_inner().ready.unwrap_or(false))
    }

    pub async fn create(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        self.controller
            .clone()
            .create_volume(req)
            .await?
            .into_inner()
            .volume
            .ok_or_else(|| Status::internal("CreateVolume returned no volume"))
    }

    pub async fn delete(&self, id: &str) -> Result<(), Status> {
        self.controller
            .clone()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: HashMap::new(),
            })
            .await
            .map(drop)
    }

    pub async fn stage(
        &self,
        id: &str,
        staging: &Path,
        cap: csi::VolumeCapability,
    ) -> Result<(), Status> {
        self.node
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn unstage(&self, id: &str, staging: &Path) -> Result<(), Status> {
        self.node
            .clone()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
            })
            .await
            .map(drop)
    }

    pub async fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), Status> {
        self.node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
                target_path: path_str(target),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn unpublish(&self, id: &str, target: &Path) -> Result<(), Status> {
        self.node
            .clone()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: path_str(target),
            })
            .await
            .map(drop)
    }

    pub async fn stats(
        &self,
        id: &str,
        path: &Path,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        self.node
            .clone()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path_str(path),
                staging_target_path: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// One page of ListVolumes.
    pub async fn list_page(
        &self,
        max_entries: i32,
        starting_token: String,
    ) -> Result<csi::ListVolumesResponse, Status> {
        self.controller
            .clone()
            .list_volumes(csi::ListVolumesRequest {
                max_entries,
                starting_token,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get_capacity(&self, req: csi::GetCapacityRequest) -> Result<i64, Status> {
        self.controller
            .clone()
            .get_capacity(req)
            .await
            .map(|r| r.into_inner().available_capacity)
    }
}
