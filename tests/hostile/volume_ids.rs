//! Hostile volume ids name no volume and touch nothing.

use super::*;

// ---- volume ids ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_volume_ids_name_no_volume() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let real = new_volume(&mut d, "real", cap.clone()).await;
    let staging = d.staging("s");
    let target = d.target("t");
    let (staging, target) = (s(&staging), s(&target));

    for id in hostile_ids(&real) {
        let shown_id = shown(&id);
        let what = |rpc: &str| format!("{rpc}(volume_id={shown_id})");
        let not_found = &[Code::NotFound][..];
        // DeleteVolume of something that is not one of our ids: nothing to delete (spec: OK).
        f.ok(&what("DeleteVolume"), d.delete(&id).await);
        f.refused(
            &what("ValidateVolumeCapabilities"),
            d.controller
                .validate_volume_capabilities(validate_req(&id, cap.clone()))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeStageVolume"),
            d.node
                .node_stage_volume(stage_req(&id, &staging, cap.clone()))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeUnstageVolume"),
            d.node.node_unstage_volume(unstage_req(&id, &staging)).await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodePublishVolume"),
            d.node
                .node_publish_volume(publish_req(&id, &staging, &target, cap.clone()))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeUnpublishVolume"),
            d.node
                .node_unpublish_volume(unpublish_req(&id, &target))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeGetVolumeStats"),
            d.node.node_get_volume_stats(stats_req(&id, &staging)).await,
            not_found,
            &["volume"],
        );
        f.refused(
            &format!("ListVolumes(starting_token={shown_id})"),
            d.controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 1,
                    starting_token: id.clone(),
                })
                .await,
            &[Code::Aborted],
            &["starting_token"],
        );
        f.refused(
            &what("ControllerPublishVolume"),
            d.controller
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: NODE.into(),
                    ..Default::default()
                })
                .await,
            &[Code::Unimplemented],
            &[],
        );
        // The RPCs of optional capabilities: NOT_FOUND, or UNIMPLEMENTED when not advertised.
        let optional = &[Code::NotFound, Code::Unimplemented][..];
        // EXPAND_VOLUME is advertised by the node service (NodeExpandVolume does the whole
        // expansion), not by the controller.
        f.refused(
            &what("NodeExpandVolume"),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: staging.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            not_found,
            &[],
        );
        f.refused(
            &what("ControllerExpandVolume"),
            d.controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            &[Code::Unimplemented],
            &["ControllerExpandVolume"],
        );
        f.refused(
            &what("ControllerGetVolume"),
            d.controller
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: id.clone(),
                })
                .await,
            optional,
            &[],
        );
        f.refused(
            &format!("CreateSnapshot(source_volume_id={shown_id})"),
            d.controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: id.clone(),
                    name: "snap".into(),
                    ..Default::default()
                })
                .await,
            optional,
            &[],
        );
        f.refused(
            &format!("GetSnapshot(snapshot_id={shown_id})"),
            d.controller
                .get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await,
            optional,
            &[],
        );
        match d
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => {}
            Err(status) => f.message(
                &format!("DeleteSnapshot(snapshot_id={shown_id})"),
                &status,
                &[Code::Unimplemented],
                &[],
            ),
        }
        for (field, req) in [
            (
                "snapshot_id",
                csi::ListSnapshotsRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                },
            ),
            (
                "source_volume_id",
                csi::ListSnapshotsRequest {
                    source_volume_id: id.clone(),
                    ..Default::default()
                },
            ),
        ] {
            match d.controller.list_snapshots(req).await {
                Ok(reply) => {
                    let n = reply.into_inner().entries.len();
                    f.check(n == 0, || {
                        format!("ListSnapshots({field}={shown_id}) lists {n} snapshots")
                    });
                }
                Err(status) => f.message(
                    &format!("ListSnapshots({field}={shown_id})"),
                    &status,
                    &[Code::Unimplemented],
                    &[],
                ),
            }
        }
        f.refused(
            &format!("ListSnapshots(starting_token={shown_id})"),
            d.controller
                .list_snapshots(csi::ListSnapshotsRequest {
                    starting_token: id.clone(),
                    ..Default::default()
                })
                .await,
            &[Code::Aborted, Code::Unimplemented],
            &[],
        );
        for (field, source) in [
            (
                "snapshot",
                csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: id.clone(),
                    },
                ),
            ),
            (
                "volume",
                csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: id.clone(),
                    },
                ),
            ),
        ] {
            let mut req = create_req("from-hostile-source", 16 * MIB, cap.clone());
            req.volume_content_source = Some(csi::VolumeContentSource {
                r#type: Some(source),
            });
            f.refused(
                &format!("CreateVolume(volume_content_source.{field}={shown_id})"),
                d.create(req).await,
                &[Code::NotFound, Code::InvalidArgument],
                &[field],
            );
        }
    }

    // An empty id is a missing field.
    let invalid = &[Code::InvalidArgument][..];
    f.refused(
        "DeleteVolume(\"\")",
        d.delete("").await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "ValidateVolumeCapabilities(\"\")",
        d.controller
            .validate_volume_capabilities(validate_req("", cap.clone()))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeStageVolume(\"\")",
        d.node
            .node_stage_volume(stage_req("", &staging, cap.clone()))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeUnstageVolume(\"\")",
        d.node.node_unstage_volume(unstage_req("", &staging)).await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodePublishVolume(\"\")",
        d.node
            .node_publish_volume(publish_req("", &staging, &target, cap.clone()))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeUnpublishVolume(\"\")",
        d.node
            .node_unpublish_volume(unpublish_req("", &target))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeGetVolumeStats(\"\")",
        d.node.node_get_volume_stats(stats_req("", &staging)).await,
        invalid,
        &["volume_id"],
    );

    // The real volume is untouched by all of it, and nothing was made anywhere.
    let listed: Vec<String> = d
        .list_all()
        .await
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    f.check(listed == vec![real.clone()], || {
        format!("volumes after hostile ids: {listed:?}")
    });
    f.check(d.image_path(&real).exists(), || {
        "the real volume's image is gone".into()
    });
    f.check(d.loop_device_of(&real).is_none(), || {
        "the real volume got attached".into()
    });
    f.check(mounts_under(d.root()).is_empty(), || {
        format!("mounts appeared: {:?}", mounts_under(d.root()))
    });
    f.check(!Path::new(&target).exists(), || {
        "a target path was created".into()
    });
    let ids = check_state_dir(&d, &mut f);
    f.check(ids == HashSet::from([real.clone()]), || {
        format!("state dir names {ids:?}")
    });
    no_shell_ran(d.root(), &mut f);

    still_serving(&mut d).await;
    f.assert_none();
    d.delete(&real).await.unwrap();
    d.assert_clean();
}
