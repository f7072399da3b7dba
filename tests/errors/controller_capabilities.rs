//! ControllerGetCapabilities is exact; unadvertised RPCs are UNIMPLEMENTED.

use super::*;

// ---- ControllerGetCapabilities and unadvertised RPCs ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_capabilities_exact_and_unadvertised_rpcs_unimplemented() {
    let mut d = TestDriver::start().await;
    use csi::controller_service_capability::rpc::Type as Rpc;
    let caps = d
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let kinds: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => r.r#type,
            other => panic!("unexpected controller capability {other:?}"),
        })
        .collect();
    // EXPAND_VOLUME is the node's only: in a node-local deployment the cluster's one resizer
    // could not reach other nodes' pools, so NodeExpandVolume does the whole expansion.
    assert_eq!(kinds.len(), 10, "{kinds:?}");
    assert_eq!(
        kinds.into_iter().collect::<HashSet<_>>(),
        HashSet::from([
            Rpc::CreateDeleteVolume as i32,
            Rpc::ListVolumes as i32,
            Rpc::GetCapacity as i32,
            Rpc::SingleNodeMultiWriter as i32,
            Rpc::CreateDeleteSnapshot as i32,
            Rpc::ListSnapshots as i32,
            Rpc::GetSnapshot as i32,
            Rpc::CloneVolume as i32,
            Rpc::GetVolume as i32,
            Rpc::VolumeCondition as i32,
        ])
    );

    // Only the RPCs of capabilities that are not advertised remain UNIMPLEMENTED.
    let id = random_id();
    assert_err(
        d.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                volume_capability: Some(mount_cap("ext4", snw())),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        &["ControllerPublishVolume"],
    );
    assert_err(
        d.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        &["ControllerUnpublishVolume"],
    );
    assert_err(
        d.controller
            .controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        &["ControllerModifyVolume"],
    );
    // ControllerExpandVolume whatever it is asked: of an unknown volume, without a range, or a
    // well-formed request for a real one (which it must not grow).
    let real = d
        .create(create_req(
            "not-expanded",
            16 * MIB,
            mount_cap("ext4", snw()),
        ))
        .await
        .unwrap()
        .volume_id;
    for req in [
        csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: range(GIB, 0),
            ..Default::default()
        },
        csi::ControllerExpandVolumeRequest::default(),
        csi::ControllerExpandVolumeRequest {
            volume_id: real.clone(),
            capacity_range: range(32 * MIB, 0),
            volume_capability: Some(mount_cap("ext4", snw())),
            ..Default::default()
        },
    ] {
        assert_err(
            d.controller.controller_expand_volume(req).await,
            Code::Unimplemented,
            &["ControllerExpandVolume"],
        );
    }
    assert_eq!(
        std::fs::metadata(d.image_path(&real)).unwrap().len(),
        16 << 20,
        "ControllerExpandVolume grew nothing"
    );
    d.delete(&real).await.unwrap();

    // The advertised ones are served: an unknown id is NOT_FOUND (or OK where the spec says
    // so), never UNIMPLEMENTED.
    assert_err(
        d.controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: "snap".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    d.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot of an unknown snapshot is OK");
    let listed = d
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots is served")
        .into_inner();
    assert!(listed.entries.is_empty() && listed.next_token.is_empty());
    assert_err(
        d.controller
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    assert_err(
        d.controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    assert_err(
        d.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: "/mnt/x".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    d.assert_clean();
}
