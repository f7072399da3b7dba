//! CSI Controller service. loopcsi runs it on every node, and it acts on that node's pool only.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::{self, controller_server::Controller};
use crate::error::{shown, Error, Result};
use crate::rpc_span;
use crate::service::{capability, required, volume_id, CapabilityError, Domain, Driver};
use crate::volume::params::{Capability, CapacityRange, StorageClassParams, VolumeKind};
use crate::volume::pool::{NewVolume, VolumeMeta};

/// CSI size limit for names and ids.
const MAX_NAME_BYTES: usize = 128;

#[derive(Clone)]
pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { driver }
    }
}

/// A CreateVolume name: required, ≤ 128 bytes, none of the control characters the spec bans.
fn volume_name(name: &str) -> Result<&str> {
    required("name", name)?;
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            "name",
            format!("{} is longer than {MAX_NAME_BYTES} bytes", shown(name)),
        ));
    }
    let banned = |c: char| matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}');
    if name.chars().any(banned) {
        return Err(Error::invalid(
            "name",
            format!("{} contains a control character", shown(name)),
        ));
    }
    Ok(name)
}

/// The capabilities of a CreateVolume: all must be served, and they must agree on one kind of
/// volume (a raw block volume is never also a file system, so it is never formatted by mistake).
fn creation_capabilities(
    caps: &[csi::VolumeCapability],
    domain: &Domain,
) -> std::result::Result<(VolumeKind, Vec<Capability>), CapabilityError> {
    if caps.is_empty() {
        return Err(CapabilityError::Malformed(Error::invalid(
            "volume_capabilities",
            "is required (at least one)",
        )));
    }
    let parsed = caps
        .iter()
        .map(|c| capability("volume_capabilities", c, Some(domain.node.tools())))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let kind = parsed[0].volume_kind();
    if let Some(other) = parsed.iter().find(|c| c.volume_kind() != kind) {
        return Err(CapabilityError::Unsupported(Error::invalid(
            "volume_capabilities",
            format!(
                "ask for {kind} and {} at once; a loopcsi volume is one or the other",
                other.volume_kind()
            ),
        )));
    }
    Ok((kind, parsed))
}

impl ControllerService {
    fn volume_reply(&self, meta: &VolumeMeta) -> csi::Volume {
        csi::Volume {
            capacity_bytes: i64::try_from(meta.capacity_bytes).unwrap_or(i64::MAX),
            volume_id: meta.id.to_string(),
            volume_context: HashMap::new(),
            content_source: None,
            accessible_topology: vec![self.driver.topology()],
        }
    }

    /// `requisite` must include this node: the volume can only ever live here.
    fn check_topology(&self, req: Option<&csi::TopologyRequirement>) -> Result<()> {
        let Some(req) = req else { return Ok(()) };
        if req.requisite.is_empty() || req.requisite.iter().any(|t| self.driver.is_this_node(t)) {
            return Ok(());
        }
        Err(Error::Topology(format!(
            "accessibility_requirements.requisite does not include this node ({}={}); \
             a loopcsi volume is only accessible from the node that holds it",
            crate::config::TOPOLOGY_KEY,
            self.driver.node_id
        )))
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    /// CreateVolume. MUST be idempotent by name: same name and compatible arguments → OK with
    /// the same volume; incompatible → ALREADY_EXISTS. capacity_range honoured exactly
    /// (OUT_OF_RANGE when impossible), RESOURCE_EXHAUSTED when the pool cannot hold the volume or
    /// the topology requirement excludes this node, ABORTED while the same name is in flight.
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("rpc", rpc.method = "CreateVolume", volume.name = %shown(&req.name), volume.id = tracing::field::Empty);
        let this = self.clone();
        self.driver
            .run(span, move |domain| {
                let name = volume_name(&req.name)?;
                let (kind, caps) = creation_capabilities(&req.volume_capabilities, domain)?;
                let params = StorageClassParams::try_from(&req.parameters)?;
                if !req.mutable_parameters.is_empty() {
                    return Err(Error::invalid(
                        "mutable_parameters",
                        "are not supported (MODIFY_VOLUME is not advertised)",
                    ));
                }
                if req.volume_content_source.is_some() {
                    return Err(Error::invalid(
                        "volume_content_source",
                        "creating a volume from a snapshot or another volume is not supported yet",
                    ));
                }
                this.check_topology(req.accessibility_requirements.as_ref())?;
                let capacity = req.capacity_range.map_or(CapacityRange::default(), |r| CapacityRange {
                    required_bytes: r.required_bytes,
                    limit_bytes: r.limit_bytes,
                });
                let mut access_modes: Vec<_> = caps.iter().map(|c| c.access).collect();
                access_modes.sort();
                access_modes.dedup();
                let (meta, created) = domain.pool.create(NewVolume {
                    name: name.to_string(),
                    capacity,
                    kind,
                    access_modes,
                    provisioning: params.provisioning,
                    claim: params.claim,
                })?;
                tracing::Span::current().record("volume.id", tracing::field::display(meta.id));
                tracing::info!(created = ?created, capacity_bytes = meta.capacity_bytes, "volume ready");
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
                let _guard = domain.pool.lock_volume(&id)?;
                domain.pool.delete(&id)?;
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
                    let meta = domain.pool.require(&id)?;
                    let mut problems = Vec::new();
                    for cap in &req.volume_capabilities {
                        match capability("volume_capabilities", cap, Some(domain.node.tools())) {
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
                let max = match req.max_entries {
                    0 => usize::MAX,
                    n if n < 0 => {
                        return Err(Error::invalid("max_entries", format!("{n} is negative")));
                    }
                    n => n.unsigned_abs() as usize,
                };
                let after = this.driver.redeem_token(&req.starting_token)?;
                let (page, more) = domain.pool.list(after, max);
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
                StorageClassParams::try_from(&req.parameters)?;
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
                    match creation_capabilities(&req.volume_capabilities, domain) {
                        Ok((kind, _)) => minimum = kind.minimum_size(),
                        Err(CapabilityError::Unsupported(why)) => {
                            tracing::debug!(reason = %why, "capabilities not served: capacity 0");
                            return Ok(zero);
                        }
                        Err(CapabilityError::Malformed(err)) => return Err(err),
                    }
                }
                let granularity = crate::volume::params::SIZE_GRANULARITY;
                let available = domain.pool.usage()?.available_bytes;
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

    /// ControllerGetCapabilities: what works today; nothing else is advertised.
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
        let reply = csi::ControllerGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Type::CreateDeleteVolume),
                rpc(Type::ListVolumes),
                rpc(Type::GetCapacity),
                rpc(Type::SingleNodeMultiWriter),
            ],
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

    async fn create_snapshot(
        &self,
        _request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        self.driver.answer(
            rpc_span!("CreateSnapshot"),
            Err(Error::Unsupported("CreateSnapshot")),
        )
    }

    async fn delete_snapshot(
        &self,
        _request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        self.driver.answer(
            rpc_span!("DeleteSnapshot"),
            Err(Error::Unsupported("DeleteSnapshot")),
        )
    }

    async fn list_snapshots(
        &self,
        _request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        self.driver.answer(
            rpc_span!("ListSnapshots"),
            Err(Error::Unsupported("ListSnapshots")),
        )
    }

    async fn get_snapshot(
        &self,
        _request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        self.driver.answer(
            rpc_span!("GetSnapshot"),
            Err(Error::Unsupported("GetSnapshot")),
        )
    }

    async fn controller_expand_volume(
        &self,
        _request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        self.driver.answer(
            rpc_span!("ControllerExpandVolume"),
            Err(Error::Unsupported("ControllerExpandVolume")),
        )
    }

    async fn controller_get_volume(
        &self,
        _request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        self.driver.answer(
            rpc_span!("ControllerGetVolume"),
            Err(Error::Unsupported("ControllerGetVolume")),
        )
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
