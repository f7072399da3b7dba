//! The group-snapshot steps of the crash scenarios: CreateVolumeGroupSnapshot of the run's
//! mounted volume (frozen, copied, committed as a group) and DeleteVolumeGroupSnapshot. After a
//! crash anywhere in them, the retried call must succeed and leave the whole group or none of
//! it, and nothing frozen.

use loopcsi::csi;
use loopcsi::csi::group_controller_client::GroupControllerClient;

use super::ChildDriver;

/// The group the run made: its id and its member snapshots.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub id: String,
    pub snapshots: Vec<String>,
}

async fn client(d: &ChildDriver) -> GroupControllerClient<tonic::transport::Channel> {
    GroupControllerClient::new(super::connect(d.socket.clone()).await)
}

/// CreateVolumeGroupSnapshot "group-crash" of `volume`; a retry returns the same group.
pub async fn create(d: &ChildDriver, volume: &str) -> Result<Group, tonic::Status> {
    let group = client(d)
        .await
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "group-crash".into(),
            source_volume_ids: vec![volume.to_string()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .group_snapshot
        .expect("a group snapshot");
    assert!(group.ready_to_use);
    assert_eq!(group.snapshots.len(), 1, "one member: {group:?}");
    let member = &group.snapshots[0];
    assert_eq!(member.source_volume_id, volume);
    assert_eq!(member.group_snapshot_id, group.group_snapshot_id);
    Ok(Group {
        id: group.group_snapshot_id,
        snapshots: vec![member.snapshot_id.clone()],
    })
}

/// DeleteVolumeGroupSnapshot of `group`; then the group is gone.
pub async fn delete(d: &ChildDriver, group: &Group) -> Result<(), tonic::Status> {
    let mut c = client(d).await;
    c.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.id.clone(),
        snapshot_ids: group.snapshots.clone(),
        ..Default::default()
    })
    .await?;
    let gone = c
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.id.clone(),
            snapshot_ids: group.snapshots.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(gone.map(drop).unwrap_err().code(), tonic::Code::NotFound);
    Ok(())
}
