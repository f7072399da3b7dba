//! CSI Node service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::{self, node_server::Node};
use crate::error::{Error, Result};
use crate::rpc_span;
use crate::service::{required, required_capability, volume_id, Driver};
use crate::volume::node::VolumeStats;
use crate::volume::volumes::Publish;

pub struct NodeService {
    driver: Arc<Driver>,
}

impl NodeService {
    pub fn new(driver: Arc<Driver>) -> Self {
        NodeService { driver }
    }
}

fn usage(
    unit: csi::volume_usage::Unit,
    total: u64,
    available: Option<u64>,
    used: Option<u64>,
) -> csi::VolumeUsage {
    let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    csi::VolumeUsage {
        available: available.map_or(0, signed),
        total: signed(total),
        used: used.map_or(0, signed),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    /// NodeStageVolume: attach the backing file to a loop device (direct I/O, 4096-byte blocks),
    /// create the file system only when the device is blank and was never formatted, mount it at
    /// staging_target_path. Block volumes are attached only. MUST be idempotent; ALREADY_EXISTS
    /// when staged at that path with another capability; NOT_FOUND for an unknown volume;
    /// FAILED_PRECONDITION when the capability does not fit the volume.
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(
                rpc_span!("NodeStageVolume", &req.volume_id),
                move |domain| {
                    required("volume_id", &req.volume_id)?;
                    let staging =
                        domain.co_path("staging_target_path", &req.staging_target_path)?;
                    let cap = required_capability(req.volume_capability.as_ref(), domain)?;
                    let id = volume_id("volume_id", &req.volume_id)?;
                    domain.stage(&id, &staging, &cap)?;
                    Ok(csi::NodeStageVolumeResponse {})
                },
            )
            .await
    }

    /// NodeUnstageVolume: unmount the staging path and detach the loop device. MUST be
    /// idempotent: not staged at that path is OK. NOT_FOUND for an unknown volume;
    /// FAILED_PRECONDITION while the volume is still published.
    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(
                rpc_span!("NodeUnstageVolume", &req.volume_id),
                move |domain| {
                    required("volume_id", &req.volume_id)?;
                    let staging =
                        domain.co_path("staging_target_path", &req.staging_target_path)?;
                    let id = volume_id("volume_id", &req.volume_id)?;
                    domain.unstage(&id, &staging)?;
                    Ok(csi::NodeUnstageVolumeResponse {})
                },
            )
            .await
    }

    /// NodePublishVolume: bind-mount the staged file system (or the device node, for block) at
    /// target_path, which the driver creates; read-only when asked. MUST be idempotent;
    /// ALREADY_EXISTS at the same target with other arguments; FAILED_PRECONDITION when not
    /// staged, or when a single-target access mode is already published elsewhere. After a
    /// reboot the staging is repaired (re-attached, re-mounted) before binding.
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(
                rpc_span!("NodePublishVolume", &req.volume_id),
                move |domain| {
                    required("volume_id", &req.volume_id)?;
                    let target = domain.co_path("target_path", &req.target_path)?;
                    let cap = required_capability(req.volume_capability.as_ref(), domain)?;
                    if req.staging_target_path.is_empty() {
                        // STAGE_UNSTAGE_VOLUME is advertised, so the CO must stage first (spec).
                        return Err(Error::StagingRequired);
                    }
                    let staging =
                        domain.co_path("staging_target_path", &req.staging_target_path)?;
                    if staging == target {
                        return Err(Error::invalid(
                            "target_path",
                            "must differ from staging_target_path",
                        ));
                    }
                    let id = volume_id("volume_id", &req.volume_id)?;
                    domain.unclaimed_target("target_path", &target)?;
                    domain.publish(
                        &id,
                        Publish {
                            staging: &staging,
                            target: &target,
                            capability: &cap,
                            readonly: req.readonly,
                        },
                    )?;
                    Ok(csi::NodePublishVolumeResponse {})
                },
            )
            .await
    }

    /// NodeUnpublishVolume: unmount target_path and delete what publish created there. MUST be
    /// idempotent: an unmounted or missing target is OK. NOT_FOUND for an unknown volume.
    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(
                rpc_span!("NodeUnpublishVolume", &req.volume_id),
                move |domain| {
                    required("volume_id", &req.volume_id)?;
                    let target = domain.co_path("target_path", &req.target_path)?;
                    let id = volume_id("volume_id", &req.volume_id)?;
                    domain.unpublish(&id, &target)?;
                    Ok(csi::NodeUnpublishVolumeResponse {})
                },
            )
            .await
    }

    /// NodeGetVolumeStats: bytes and inodes of a staged or published file-system volume, bytes
    /// of a block volume; NOT_FOUND when volume_path is not where this volume is.
    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(
                rpc_span!("NodeGetVolumeStats", &req.volume_id),
                move |domain| {
                    use csi::volume_usage::Unit;
                    required("volume_id", &req.volume_id)?;
                    required("volume_path", &req.volume_path)?;
                    let id = volume_id("volume_id", &req.volume_id)?;
                    domain.get(&id)?;
                    let path = domain.volume_path(&id, &req.volume_path)?;
                    let (stats, condition) = domain.stats(&id, &path)?;
                    let usage = match stats {
                        VolumeStats::Filesystem(u) => vec![
                            usage(
                                Unit::Bytes,
                                u.total_bytes,
                                Some(u.available_bytes),
                                Some(u.used_bytes),
                            ),
                            usage(
                                Unit::Inodes,
                                u.total_inodes,
                                Some(u.free_inodes),
                                Some(u.used_inodes),
                            ),
                        ],
                        VolumeStats::Block { total_bytes } => {
                            vec![usage(Unit::Bytes, total_bytes, None, None)]
                        }
                    };
                    Ok(csi::NodeGetVolumeStatsResponse {
                        usage,
                        volume_condition: Some(csi::VolumeCondition {
                            abnormal: condition.abnormal,
                            message: condition.message,
                        }),
                    })
                },
            )
            .await
    }

    /// NodeExpandVolume: all of the expansion, online, on the node that holds the volume:
    /// grows the backing file to capacity_range (a thick volume stays fully allocated), the loop
    /// device (LOOP_SET_CAPACITY), and the file system at volume_path (resize2fs for ext4, which
    /// needs CAP_SYS_RESOURCE — FAILED_PRECONDITION naming it when the kernel refuses; xfs_growfs
    /// for xfs). Shrinking is OUT_OF_RANGE; repeating a done expansion is OK; NOT_FOUND when the
    /// volume is not at volume_path.
    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(
                rpc_span!("NodeExpandVolume", &req.volume_id),
                move |domain| {
                    required("volume_id", &req.volume_id)?;
                    required("volume_path", &req.volume_path)?;
                    let cap = req
                        .volume_capability
                        .as_ref()
                        .map(|c| crate::service::capability("volume_capability", c, Some(domain)))
                        .transpose()?;
                    let id = volume_id("volume_id", &req.volume_id)?;
                    let meta = domain.get(&id)?;
                    if let Some(cap) = cap {
                        cap.check_against(meta.kind)
                            .map_err(|why| Error::invalid("volume_capability", why))?;
                    }
                    let range = req
                        .capacity_range
                        .map(|r| crate::volume::params::CapacityRange {
                            required_bytes: r.required_bytes,
                            limit_bytes: r.limit_bytes,
                        });
                    if let Some(range) = &range {
                        range.validate()?;
                    }
                    let path = domain.volume_path(&id, &req.volume_path)?;
                    let size = domain.expand(&id, &path, range)?;
                    Ok(csi::NodeExpandVolumeResponse {
                        capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
                    })
                },
            )
            .await
    }

    /// NodeGetCapabilities: staging, volume stats, and the single-node multi/single writer modes.
    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::rpc::Type;
        let rpc = |kind: Type| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc {
                    r#type: kind as i32,
                },
            )),
        };
        let reply = csi::NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Type::StageUnstageVolume),
                rpc(Type::GetVolumeStats),
                rpc(Type::SingleNodeMultiWriter),
                rpc(Type::ExpandVolume),
                rpc(Type::VolumeCondition),
            ],
        };
        self.driver
            .answer(rpc_span!("NodeGetCapabilities"), Ok(reply))
    }

    /// NodeGetInfo: node id, the topology segment volumes made here carry, and the volume limit.
    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let reply = csi::NodeGetInfoResponse {
            node_id: self.driver.node_id.clone(),
            max_volumes_per_node: self.driver.max_volumes_per_node,
            accessible_topology: Some(self.driver.topology()),
        };
        self.driver.answer(rpc_span!("NodeGetInfo"), Ok(reply))
    }
}
