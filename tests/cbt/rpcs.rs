//! The SnapshotMetadata RPCs' contract: paging by offset and max_results, the capability, and
//! every error code the spec lists.

use super::*;
use tonic::Code;

/// A block volume with data at [0, 1 MiB) and [8 MiB, 9 MiB), snapshotted as A; 4 KiB at
/// 8 MiB + 4 KiB rewritten and snapshotted as B. Returns the driver, volume, A and B.
async fn two_snapshots(pool_fs: &str) -> (TestDriver, String, String, String) {
    let mut d = TestDriver::start_on_small_pool(pool_fs, 512).await;
    let cap = block_cap(snw());
    let id = d
        .create(create_req("vol", 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("vol"), d.target("vol"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    write_at(&target, 0, &data(1, 1 << 20));
    write_at(&target, 8 << 20, &data(2, 1 << 20));
    let a = snapshot(&mut d, "a", &id).await.snapshot_id;
    write_at(&target, (8 << 20) + 4096, &data(3, 4096));
    let b = snapshot(&mut d, "b", &id).await.snapshot_id;
    (d, id, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_by_offset_and_max_results() {
    let (d, _, a, b) = two_snapshots("xfs").await;
    let md = d.metadata().await;
    let whole = md.allocated(&a, 0, 0).await.unwrap();
    assert_eq!(whole.ranges, vec![(0, 1 << 20), (8 << 20, 1 << 20)]);
    assert_eq!((whole.messages, whole.capacity), (1, 64 * MIB));
    // One range a message: the same ranges, two messages.
    let paged = md.allocated(&a, 0, 1).await.unwrap();
    assert_eq!(
        (paged.ranges.clone(), paged.messages),
        (whole.ranges.clone(), 2)
    );
    // Resuming inside a range starts at the offset; past all data, one empty message.
    let resumed = md.allocated(&a, 512 << 10, 0).await.unwrap();
    assert_eq!(
        resumed.ranges,
        vec![(512 << 10, 512 << 10), (8 << 20, 1 << 20)]
    );
    let tail = md.allocated(&a, 32 << 20, 0).await.unwrap();
    assert_eq!((tail.ranges.len(), tail.messages), (0, 1));
    // The delta names exactly the block rewritten; from past it, nothing.
    let delta = md.delta(&a, &b, 0, 0).await.unwrap();
    assert_eq!(delta.ranges, vec![((8 << 20) + 4096, 4096)]);
    let after = md.delta(&a, &b, 9 << 20, 0).await.unwrap();
    assert!(after.ranges.is_empty());
    // A snapshot against itself has no delta.
    assert!(md.delta(&b, &b, 0, 0).await.unwrap().ranges.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_the_spec_lists() {
    let (mut d, _, a, b) = two_snapshots("ext4").await;
    let md = d.metadata().await;
    let code = |r: Result<Ranges, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    // Missing or invalid arguments.
    assert_eq!(code(md.allocated("", 0, 0).await), Code::InvalidArgument);
    assert_eq!(code(md.allocated(&a, -1, 0).await), Code::InvalidArgument);
    assert_eq!(code(md.allocated(&a, 0, -1).await), Code::InvalidArgument);
    assert_eq!(code(md.delta("", &b, 0, 0).await), Code::InvalidArgument);
    assert_eq!(code(md.delta(&a, "", 0, 0).await), Code::InvalidArgument);
    assert_eq!(
        code(md.delta(&a, &b, -4096, 0).await),
        Code::InvalidArgument
    );
    // The base taken after the target.
    let swapped = md.delta(&b, &a, 0, 0).await.unwrap_err();
    assert_eq!(swapped.code(), Code::InvalidArgument);
    assert!(
        swapped.message().contains("base_snapshot_id"),
        "{swapped:?}"
    );
    // Snapshots of different volumes.
    let other = d
        .create(create_req("other", 64 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    let c = snapshot(&mut d, "c", &other).await.snapshot_id;
    let foreign = md.delta(&a, &c, 0, 0).await.unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument);
    assert!(foreign.message().contains("same volume"), "{foreign:?}");
    // Unknown snapshots: never issued, or deleted.
    let unknown = "7b0c6a4e-0000-4000-8000-000000000000";
    assert_eq!(code(md.allocated(unknown, 0, 0).await), Code::NotFound);
    assert_eq!(code(md.allocated("../etc", 0, 0).await), Code::NotFound);
    assert_eq!(code(md.delta(unknown, &b, 0, 0).await), Code::NotFound);
    assert_eq!(code(md.delta(&a, unknown, 0, 0).await), Code::NotFound);
    // Offsets at or past the end of the volume.
    assert_eq!(code(md.allocated(&a, 64 * MIB, 0).await), Code::OutOfRange);
    assert_eq!(
        code(md.delta(&a, &b, 64 * MIB + 1, 0).await),
        Code::OutOfRange
    );
    // The plugin capability is advertised.
    let caps = d
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let wanted = csi::plugin_capability::service::Type::SnapshotMetadataService as i32;
    assert!(caps.iter().any(|c| matches!(
        &c.r#type,
        Some(csi::plugin_capability::Type::Service(s)) if s.r#type == wanted
    )));
    // A deleted snapshot is NOT_FOUND.
    d.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: c.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(code(md.allocated(&c, 0, 0).await), Code::NotFound);
}

/// With `--cbt-block-size 65536` the answers are FIXED_LENGTH blocks covering the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_length_blocks_when_configured() {
    let scratch = Scratch::new();
    let socket = scratch.path().join("csi.sock");
    let config = loopcsi::config::Config {
        cbt_block_size: 64 << 10,
        ..config_for(&socket, scratch.path().join("state"))
    };
    let (shutdown, task) = serve_in_background(loopcsi::server::bind(&config).unwrap());
    let mut clients = Clients::connect(&socket).await.unwrap();
    let id = clients
        .create(create_req("vol", 64 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    // The volume is not staged: its image is written as the loop device would write it.
    let image = scratch.path().join(format!("state/volumes/{id}.img"));
    write_at(&image, 4096, &data(1, 8192));
    write_at(&image, 1 << 20, &data(2, 4096));
    let a = clients
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let md = MetadataClient::connect(&socket).await.unwrap();
    let fixed = md.allocated(&a, 5000, 0).await.unwrap();
    assert_eq!(
        fixed.block_metadata_type,
        csi::BlockMetadataType::FixedLength as i32
    );
    // The offset is rounded down to its block; every tuple is one whole block.
    assert_eq!(fixed.ranges, vec![(0, 65536), (1 << 20, 65536)]);
    let later = md.allocated(&a, 70000, 0).await.unwrap();
    assert_eq!(later.ranges, vec![(1 << 20, 65536)]);
    drop(shutdown);
    task.await.unwrap();
}
