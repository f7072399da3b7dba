//! CSI Controller service. loopcsi runs it on every node, and it acts on that node's pool only.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::{self, controller_server::Controller};
use crate::error::{shown, Error, Result};
use crate::rpc_span;
use crate::service::{capability, required, snapshot_id, volume_id, CapabilityError, Driver};
use crate::volume::id::{OfSnapshot, OfVolume};
use crate::volume::params::{CapacityRange, StorageClassParams};
use crate::volume::pool::NewVolume;

pub(crate) mod convert;

use convert::{
    content_source, creation_capabilities, optional_id, page_size, snapshot_parameters,
    snapshot_reply, volume_name,
};

#[derive(Clone)]
pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { driver }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    /// CreateVolume. MUST be idempotent by name: same name and compatible arguments → OK with
    /// the same volume; incompatible → ALREADY_EXISTS. capacity_range honoured exactly
    /// (OUT_OF_RANGE when impossible), RESOURCE_EXHAUSTED when the pool cannot hold the volume or
    /// the topology requirement excludes this node, ABORTED while the same name is in flight
    /// or while the content source is being changed (deleted, staged, expanded); restores and
    /// clones of one source, and backups reading it, run at the same time.
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let rpc = crate::service::Rpc::new(
            "CreateVolume",
            tracing::info_span!("rpc", rpc.method = "CreateVolume", volume.name = %shown(&req.name), volume.id = tracing::field::Empty),
        );
        let this = self.clone();
        self.driver
            .run(rpc, move |domain| {
                let name = volume_name(&req.name)?;
                let params = StorageClassParams::try_from(&req.parameters)?;
                let (kind, caps) =
                    creation_capabilities(&req.volume_capabilities, params.fs, domain)?;
                if !req.mutable_parameters.is_empty() {
                    return Err(Error::invalid(
                        "mutable_parameters",
                        "are not supported (MODIFY_VOLUME is not advertised)",
                    ));
                }
                let source = content_source(req.volume_content_source.as_ref())?;
                this.check_topology(req.accessibility_requirements.as_ref())?;
                let capacity = req.capacity_range.map_or(CapacityRange::default(), |r| CapacityRange {
                    required_bytes: r.required_bytes,
                    limit_bytes: r.limit_bytes,
                });
                let mut access_modes: Vec<_> = caps.iter().map(|c| c.access).collect();
                access_modes.sort();
                access_modes.dedup();
                let (meta, created) = domain.create(
                    NewVolume {
                        name: name.to_string(),
                        capacity,
                        kind,
                        access_modes,
                        params: params.volume,
                        source,
                    },
                    |err| this.source_elsewhere(err),
                )?;
                tracing::Span::current().record("volume.id", tracing::field::display(meta.id));
                tracing::info!(created = ?created, capacity_bytes = meta.capacity_bytes, volume.kind = ?meta.kind, "volume ready");
                Ok(csi::CreateVolumeResponse {
                    volume: Some(this.volume_reply(&meta)),
                })
            })
            .await
    }

    /// DeleteVolume. A volume that does not exist (or an id that was never ours) is OK;
    /// FAILED_PRECONDITION while the volume is staged on this node; ABORTED while another
    /// operation on it is in flight.
    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(rpc_span!("DeleteVolume", &req.volume_id), move |domain| {
                required("volume_id", &req.volume_id)?;
                let Some(id) = crate::volume::id::VolumeId::parse(&req.volume_id) else {
                    return Ok(csi::DeleteVolumeResponse {});
                };
                domain.delete(&id)?;
                Ok(csi::DeleteVolumeResponse {})
            })
            .await
    }

    /// ValidateVolumeCapabilities: NOT_FOUND for an unknown volume; `confirmed` only when every
    /// capability is served by this volume, otherwise OK with a message saying why not.
    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        self.driver
            .run(
                rpc_span!("ValidateVolumeCapabilities", &req.volume_id),
                move |domain| {
                    required("volume_id", &req.volume_id)?;
                    if req.volume_capabilities.is_empty() {
                        return Err(Error::invalid(
                            "volume_capabilities",
                            "is required (at least one)",
                        ));
                    }
                    let id = volume_id("volume_id", &req.volume_id)?;
                    let meta = domain.get(&id)?;
                    let mut problems = Vec::new();
                    for cap in &req.volume_capabilities {
                        match capability("volume_capabilities", cap, Some(domain)) {
                            Ok(parsed) => {
                                if let Err(why) = parsed.check_against(meta.kind) {
                                    problems.push(why);
                                }
                            }
                            Err(CapabilityError::Malformed(err)) => return Err(err),
                            Err(CapabilityError::Unsupported(err)) => {
                                problems.push(err.to_string())
                            }
                        }
                    }
                    if let Err(err) = StorageClassParams::try_from(&req.parameters) {
                        problems.push(err.to_string());
                    }
                    if !req.mutable_parameters.is_empty() {
                        problems.push("mutable_parameters are not supported".into());
                    }
                    if !problems.is_empty() {
                        return Ok(csi::ValidateVolumeCapabilitiesResponse {
                            confirmed: None,
                            message: problems.join("; "),
                        });
                    }
                    Ok(csi::ValidateVolumeCapabilitiesResponse {
                        confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                            volume_context: req.volume_context,
                            volume_capabilities: req.volume_capabilities,
                            parameters: req.parameters,
                            mutable_parameters: HashMap::new(),
                        }),
                        message: String::new(),
                    })
                },
            )
            .await
    }

    /// ListVolumes: volumes in id order; max_entries 0 means all; next_token set when more
    /// remain. A starting_token this process did not issue is ABORTED (as after a restart).
    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let this = self.clone();
        self.driver
            .run(rpc_span!("ListVolumes"), move |domain| {
                let max = page_size(req.max_entries)?;
                let after = this.driver.redeem_token(&req.starting_token)?;
                let (page, more) = domain.list(after, max);
                let next_token = match (more, page.last()) {
                    (true, Some(last)) => this.driver.issue_token(&last.id),
                    _ => String::new(),
                };
                Ok(csi::ListVolumesResponse {
                    entries: page
                        .iter()
                        .map(|meta| csi::list_volumes_response::Entry {
                            volume: Some(this.volume_reply(meta)),
                            status: None,
                        })
                        .collect(),
                    next_token,
                })
            })
            .await
    }

    /// GetCapacity: what CreateVolume would accept for these capabilities and parameters on this
    /// node — the pool's free space (whole MiB) — and 0 for another node's topology or for
    /// capabilities loopcsi does not serve. maximum_volume_size is the same figure.
    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let this = self.clone();
        self.driver
            .run(rpc_span!("GetCapacity"), move |domain| {
                let params = StorageClassParams::try_from(&req.parameters)?;
                let zero = csi::GetCapacityResponse {
                    available_capacity: 0,
                    maximum_volume_size: Some(0),
                    minimum_volume_size: None,
                };
                if let Some(topology) = &req.accessible_topology {
                    if !this.driver.is_this_node(topology) {
                        return Ok(zero);
                    }
                }
                let mut minimum = crate::volume::params::MINIMUM_BLOCK_SIZE;
                if !req.volume_capabilities.is_empty() {
                    match creation_capabilities(&req.volume_capabilities, params.fs, domain) {
                        Ok((kind, _)) => minimum = kind.minimum_size(),
                        Err(CapabilityError::Unsupported(why)) => {
                            tracing::debug!(reason = %why, "capabilities not served: capacity 0");
                            return Ok(zero);
                        }
                        Err(CapabilityError::Malformed(err)) => return Err(err),
                    }
                }
                let granularity = crate::volume::params::SIZE_GRANULARITY;
                let available = domain.capacity()?.available_bytes;
                let available = available - available % granularity;
                let available = if available < minimum { 0 } else { available };
                let bytes = i64::try_from(available).unwrap_or(i64::MAX);
                Ok(csi::GetCapacityResponse {
                    available_capacity: bytes,
                    maximum_volume_size: Some(bytes),
                    minimum_volume_size: Some(i64::try_from(minimum).unwrap_or(i64::MAX)),
                })
            })
            .await
    }

    /// ControllerGetCapabilities: what works today; nothing else is advertised. GET_SNAPSHOT
    /// (alpha in CSI v1.12) is left out under `--no-get-snapshot-capability`, for sidecars that
    /// crash on an enum value their CSI spec does not know; GetSnapshot is served either way.
    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::rpc::Type;
        let rpc = |kind: Type| csi::ControllerServiceCapability {
            r#type: Some(csi::controller_service_capability::Type::Rpc(
                csi::controller_service_capability::Rpc {
                    r#type: kind as i32,
                },
            )),
        };
        let advertised = [
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::SingleNodeMultiWriter,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::GetSnapshot,
            Type::CloneVolume,
            Type::GetVolume,
            Type::VolumeCondition,
        ];
        let reply = csi::ControllerGetCapabilitiesResponse {
            capabilities: advertised
                .into_iter()
                .filter(|kind| *kind != Type::GetSnapshot || self.driver.advertise_get_snapshot)
                .map(rpc)
                .collect(),
        };
        self.driver
            .answer(rpc_span!("ControllerGetCapabilities"), Ok(reply))
    }

    // The RPCs below belong to capabilities loopcsi does not advertise; the spec's answer for
    // those is UNIMPLEMENTED (Error::Unsupported).

    async fn controller_publish_volume(
        &self,
        _request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        self.driver.answer(
            rpc_span!("ControllerPublishVolume"),
            Err(Error::Unsupported("ControllerPublishVolume")),
        )
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        self.driver.answer(
            rpc_span!("ControllerUnpublishVolume"),
            Err(Error::Unsupported("ControllerUnpublishVolume")),
        )
    }

    /// CreateSnapshot: a point-in-time copy of the source's backing file (reflink where the pool
    /// can; the source's file system frozen meanwhile when mounted). Idempotent by name; the same
    /// name for another source is ALREADY_EXISTS; NOT_FOUND for an unknown source.
    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let rpc = crate::service::Rpc::new(
            "CreateSnapshot",
            tracing::info_span!("rpc", rpc.method = "CreateSnapshot", volume.id = %shown(&req.source_volume_id), snapshot.name = %shown(&req.name)),
        );
        self.driver
            .run(rpc, move |domain| {
                let name = volume_name(&req.name)?;
                required("source_volume_id", &req.source_volume_id)?;
                snapshot_parameters(&req.parameters)?;
                let source = volume_id("source_volume_id", &req.source_volume_id)?;
                let (snap, created) = domain.create_snapshot(name, &source)?;
                tracing::info!(snapshot.id = %snap.id, created = ?created, "snapshot ready");
                Ok(csi::CreateSnapshotResponse {
                    snapshot: Some(snapshot_reply(&snap, domain.group_of(&snap.id))),
                })
            })
            .await
    }

    /// DeleteSnapshot: OK for a snapshot that does not exist. Volumes restored from it keep
    /// their data (they are independent files). ABORTED while anything reads it (a restore,
    /// GetMetadataAllocated, GetMetadataDelta).
    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let rpc = crate::service::Rpc::new(
            "DeleteSnapshot",
            tracing::info_span!("rpc", rpc.method = "DeleteSnapshot", snapshot.id = %shown(&req.snapshot_id)),
        );
        self.driver
            .run(rpc, move |domain| {
                required("snapshot_id", &req.snapshot_id)?;
                if let Some(id) = crate::volume::id::SnapshotId::parse(&req.snapshot_id) {
                    domain.delete_snapshot(&id)?;
                }
                Ok(csi::DeleteSnapshotResponse {})
            })
            .await
    }

    /// ListSnapshots: filtered by snapshot_id and/or source_volume_id (an id that is not ours
    /// matches nothing), paged like ListVolumes (ABORTED for a token we did not issue).
    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let this = self.clone();
        self.driver
            .run(rpc_span!("ListSnapshots"), move |domain| {
                let max = page_size(req.max_entries)?;
                let after = this.driver.redeem_token(&req.starting_token)?;
                // An id that is not ours matches nothing (`Some(None)`); empty means any.
                let (by_id, by_source) = (
                    optional_id::<OfSnapshot>(&req.snapshot_id),
                    optional_id::<OfVolume>(&req.source_volume_id),
                );
                let no_match = matches!(by_id, Some(None)) || matches!(by_source, Some(None));
                let (page, more) = if no_match {
                    (Vec::new(), false)
                } else {
                    domain.list_snapshots(after, max, |s| {
                        by_id.flatten().is_none_or(|id| s.id == id)
                            && by_source
                                .flatten()
                                .is_none_or(|id| s.source_volume_id == id)
                    })
                };
                let next_token = match (more, page.last()) {
                    (true, Some(last)) => this.driver.issue_token(&last.id),
                    _ => String::new(),
                };
                Ok(csi::ListSnapshotsResponse {
                    entries: page
                        .iter()
                        .map(|s| csi::list_snapshots_response::Entry {
                            snapshot: Some(snapshot_reply(s, domain.group_of(&s.id))),
                        })
                        .collect(),
                    next_token,
                })
            })
            .await
    }

    /// GetSnapshot: NOT_FOUND for an unknown snapshot.
    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        let rpc = crate::service::Rpc::new(
            "GetSnapshot",
            tracing::info_span!("rpc", rpc.method = "GetSnapshot", snapshot.id = %shown(&req.snapshot_id)),
        );
        self.driver
            .run(rpc, move |domain| {
                let id = snapshot_id("snapshot_id", &req.snapshot_id)?;
                let snap = domain.snapshot(&id)?;
                Ok(csi::GetSnapshotResponse {
                    snapshot: Some(snapshot_reply(&snap, domain.group_of(&snap.id))),
                })
            })
            .await
    }

    /// ControllerExpandVolume: EXPAND_VOLUME is advertised by the node service only, so this
    /// is UNIMPLEMENTED (spec). In a node-local deployment the cluster's one resizer runs on a
    /// single node and could not reach the pools of the others; the kubelet's NodeExpandVolume,
    /// on the node that holds the volume, does the whole expansion.
    async fn controller_expand_volume(
        &self,
        _request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        self.driver.answer(
            rpc_span!("ControllerExpandVolume"),
            Err(Error::Unsupported("ControllerExpandVolume")),
        )
    }

    /// ControllerGetVolume: the volume and its condition (backing file missing or truncated,
    /// loop device gone while staged, file system read-only after errors). NOT_FOUND if unknown.
    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let this = self.clone();
        self.driver
            .run(
                rpc_span!("ControllerGetVolume", &req.volume_id),
                move |domain| {
                    let id = volume_id("volume_id", &req.volume_id)?;
                    let meta = domain.get(&id)?;
                    let condition = domain.condition(&id)?;
                    Ok(csi::ControllerGetVolumeResponse {
                        volume: Some(this.volume_reply(&meta)),
                        status: Some(csi::controller_get_volume_response::VolumeStatus {
                            published_node_ids: Vec::new(),
                            volume_condition: Some(csi::VolumeCondition {
                                abnormal: condition.abnormal,
                                message: condition.message,
                            }),
                        }),
                    })
                },
            )
            .await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        self.driver.answer(
            rpc_span!("ControllerModifyVolume"),
            Err(Error::Unsupported("ControllerModifyVolume")),
        )
    }
}
