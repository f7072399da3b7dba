//! The node RPCs after publishing: NodeUnpublishVolume (errors, idempotency),
//! NodeGetVolumeStats errors, NodeGetCapabilities and NodeGetInfo.

use super::*;

// ---- NodeUnpublishVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unpublish_errors_and_idempotency() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let target = d.target("p");
    let unpublish = |id: &str, path: &str| csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: path.into(),
    };

    assert_err(
        d.node
            .node_unpublish_volume(unpublish("", &s(&target)))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node
            .node_unpublish_volume(unpublish(&random_id(), ""))
            .await,
        Code::InvalidArgument,
        &["target_path"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.unpublish(&unknown, &target).await,
            Code::NotFound,
            &[&unknown],
        );
    }

    let id = new_volume(&mut d, "unpub", 16 * MIB, cap.clone()).await;
    // Never published (target does not exist): OK.
    d.unpublish(&id, &target).await.unwrap();
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.unpublish(&id, &target).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists(), "unpublish removes the target");
    // Already removed: OK.
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

// ---- NodeGetVolumeStats ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_volume_stats_errors() {
    let mut d = TestDriver::start().await;
    let stats = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };

    assert_err(
        d.node.node_get_volume_stats(stats("", "some/path")).await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node.node_get_volume_stats(stats(&random_id(), "")).await,
        Code::InvalidArgument,
        &["volume_path"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.node
                .node_get_volume_stats(stats(&unknown, "some/path"))
                .await,
            Code::NotFound,
            &[&unknown],
        );
    }

    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "stats", 16 * MIB, cap.clone()).await;
    let other = new_volume(&mut d, "other", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    let other_staging = d.staging("other");
    let target = d.target("p");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.stage(&other, &other_staging, cap.clone()).await.unwrap();

    // A staged and published volume, asked about a path that is not its mount.
    let pods = d.root().join("pods");
    for path in [
        "some/path".to_string(),
        s(&pods),
        s(&d.root().join("does-not-exist")),
        s(&other_staging),
        "/".to_string(),
    ] {
        assert_err(
            d.node.node_get_volume_stats(stats(&id, &path)).await,
            Code::NotFound,
            &[&id],
        );
    }
    // The right paths answer.
    assert!(!d.stats(&id, &target).await.unwrap().usage.is_empty());
    assert!(!d.stats(&id, &staging).await.unwrap().usage.is_empty());
    // After unpublish, the old target is no longer this volume's.
    d.unpublish(&id, &target).await.unwrap();
    assert_err(d.stats(&id, &target).await, Code::NotFound, &[&id]);

    d.unstage(&id, &staging).await.unwrap();
    d.unstage(&other, &other_staging).await.unwrap();
    assert_err(d.stats(&id, &staging).await, Code::NotFound, &[&id]);
    d.assert_clean();
    d.delete(&id).await.unwrap();
    d.delete(&other).await.unwrap();
}

// ---- NodeGetCapabilities, NodeGetInfo ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_capabilities_and_info() {
    let mut d = TestDriver::start().await;
    use csi::node_service_capability::rpc::Type as Rpc;
    let caps = d
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let kinds: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(csi::node_service_capability::Type::Rpc(r)) => r.r#type,
            other => panic!("unexpected node capability {other:?}"),
        })
        .collect();
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    assert_eq!(
        kinds.into_iter().collect::<HashSet<_>>(),
        HashSet::from([
            Rpc::StageUnstageVolume as i32,
            Rpc::GetVolumeStats as i32,
            Rpc::SingleNodeMultiWriter as i32,
            Rpc::ExpandVolume as i32,
            Rpc::VolumeCondition as i32,
        ])
    );

    let info = d
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    assert!(info.max_volumes_per_node >= 0);
    assert_eq!(info.accessible_topology, Some(topology(NODE)));

    // The node's topology is accepted back as a CreateVolume requisite (csi-sanity does this).
    let mut req = create_req("topo", 8 * MIB, block_cap(snw()));
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![info.accessible_topology.clone().unwrap()],
        preferred: vec![],
    });
    let vol = d.create(req).await.unwrap();
    assert_eq!(vol.accessible_topology, vec![topology(NODE)]);
    d.delete(&vol.volume_id).await.unwrap();
}
