//! CSI GroupController service: volume group snapshots (CSI v1.12,
//! CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT). Each handler parses the request and calls one
//! method of `Volumes`; the work is in `volume/group.rs`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::{self, group_controller_server::GroupController};
use crate::error::{shown, Error, Result};
use crate::rpc_span;
use crate::service::controller::convert::{snapshot_parameters, snapshot_reply, volume_name};
use crate::service::{required, Driver};
use crate::volume::groups::GroupMeta;
use crate::volume::id::{SnapshotId, VolumeId};
use crate::volume::pool::SnapshotMeta;

pub struct GroupControllerService {
    driver: Arc<Driver>,
}

impl GroupControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        GroupControllerService { driver }
    }
}

/// `source_volume_ids`: at least one; each one of ours (an id of another shape names no volume
/// here: NOT_FOUND naming it), none twice (INVALID_ARGUMENT naming it).
fn source_volumes(ids: &[String]) -> Result<Vec<VolumeId>> {
    if ids.is_empty() {
        return Err(Error::invalid("source_volume_ids", "is required"));
    }
    let mut parsed = Vec::with_capacity(ids.len());
    for text in ids {
        required("source_volume_ids", text)?;
        let id =
            VolumeId::parse(text).ok_or_else(|| Error::GroupMemberNotFound { id: text.clone() })?;
        if parsed.contains(&id) {
            return Err(Error::invalid(
                "source_volume_ids",
                format!("lists volume {id} twice"),
            ));
        }
        parsed.push(id);
    }
    Ok(parsed)
}

/// `snapshot_ids` of a delete or get: an id that is not one of ours cannot be a member, so it
/// is a mismatch (INVALID_ARGUMENT naming it) when the group exists.
fn member_ids(ids: &[String]) -> std::result::Result<Vec<SnapshotId>, String> {
    ids.iter()
        .map(|text| SnapshotId::parse(text).ok_or_else(|| text.clone()))
        .collect()
}

fn group_reply(group: &GroupMeta, members: &[Arc<SnapshotMeta>]) -> csi::VolumeGroupSnapshot {
    const NANOS: u128 = 1_000_000_000;
    csi::VolumeGroupSnapshot {
        group_snapshot_id: group.id.to_string(),
        snapshots: members
            .iter()
            .map(|s| snapshot_reply(s, Some(group.id)))
            .collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(group.created_unix_nanos / NANOS).unwrap_or(i64::MAX),
            nanos: i32::try_from(group.created_unix_nanos % NANOS).unwrap_or(0),
        }),
        // Every member is a complete copy when the group is committed.
        ready_to_use: true,
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    /// GroupControllerGetCapabilities: CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT.
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        use csi::group_controller_service_capability::{rpc::Type, Rpc, Type as Kind};
        let reply = csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(Kind::Rpc(Rpc {
                    r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        };
        self.driver
            .answer(rpc_span!("GroupControllerGetCapabilities"), Ok(reply))
    }

    /// CreateVolumeGroupSnapshot: every member's file system frozen, every member copied, all
    /// thawed — one instant for the group. MUST be idempotent by name: the same name for the
    /// same volumes → the same group; for other volumes → ALREADY_EXISTS. A volume this node
    /// does not hold → NOT_FOUND naming it; ABORTED while a member has another operation.
    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let rpc = crate::service::Rpc::new(
            "CreateVolumeGroupSnapshot",
            tracing::info_span!("rpc", rpc.method = "CreateVolumeGroupSnapshot", group_snapshot.name = %shown(&req.name), volumes = req.source_volume_ids.len()),
        );
        self.driver
            .run(rpc, move |domain| {
                let name = volume_name(&req.name)?;
                let volumes = source_volumes(&req.source_volume_ids)?;
                snapshot_parameters(&req.parameters)?;
                let (group, created) = domain.create_group_snapshot(name, &volumes)?;
                tracing::info!(group_snapshot.id = %group.id, created = ?created, "group snapshot ready");
                let ids: Vec<SnapshotId> = group.snapshots().into_iter().collect();
                let (group, members) = domain.group_snapshot(&group.id, &ids)?;
                Ok(csi::CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_reply(&group, &members)),
                })
            })
            .await
    }

    /// DeleteVolumeGroupSnapshot: the group and every member snapshot. OK for a group that does
    /// not exist; `snapshot_ids` must name exactly the group's members (INVALID_ARGUMENT).
    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let rpc = crate::service::Rpc::new(
            "DeleteVolumeGroupSnapshot",
            tracing::info_span!("rpc", rpc.method = "DeleteVolumeGroupSnapshot", group_snapshot.id = %shown(&req.group_snapshot_id)),
        );
        self.driver
            .run(rpc, move |domain| {
                required("group_snapshot_id", &req.group_snapshot_id)?;
                // An id of another shape names no group of ours: deleted already.
                let Some(id) = VolumeId::parse(&req.group_snapshot_id) else {
                    return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
                };
                let members = match member_ids(&req.snapshot_ids) {
                    Ok(members) => members,
                    Err(_) if domain.group(&id).is_none() => Vec::new(),
                    Err(bad) => return Err(not_a_member(&id, &bad)),
                };
                domain.delete_group_snapshot(&id, &members)?;
                Ok(csi::DeleteVolumeGroupSnapshotResponse {})
            })
            .await
    }

    /// GetVolumeGroupSnapshot: the group and its members; NOT_FOUND for an unknown group;
    /// `snapshot_ids` must name exactly its members (INVALID_ARGUMENT).
    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> std::result::Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let rpc = crate::service::Rpc::new(
            "GetVolumeGroupSnapshot",
            tracing::info_span!("rpc", rpc.method = "GetVolumeGroupSnapshot", group_snapshot.id = %shown(&req.group_snapshot_id)),
        );
        self.driver
            .run(rpc, move |domain| {
                required("group_snapshot_id", &req.group_snapshot_id)?;
                let unknown = || Error::NotFound {
                    what: "group snapshot",
                    id: req.group_snapshot_id.clone(),
                };
                let id = VolumeId::parse(&req.group_snapshot_id).ok_or_else(unknown)?;
                domain.group(&id).ok_or_else(unknown)?;
                let members =
                    member_ids(&req.snapshot_ids).map_err(|bad| not_a_member(&id, &bad))?;
                let (group, members) = domain.group_snapshot(&id, &members)?;
                Ok(csi::GetVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_reply(&group, &members)),
                })
            })
            .await
    }
}

fn not_a_member(group: &VolumeId, id: &str) -> Error {
    Error::invalid(
        "snapshot_ids",
        format!("{} is not a snapshot of group snapshot {group}", shown(id)),
    )
}
