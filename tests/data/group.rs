//! Volume group snapshots (CSI GroupController) against real volumes: an ext4, an xfs and a
//! block volume snapshotted at one instant while written; idempotency, refusals, get, delete,
//! a restore of a member, and the members as ordinary (listed, got) snapshots.

use super::*;
use csi::group_controller_client::GroupControllerClient;
use tonic::transport::Channel;

async fn groups(d: &TestDriver) -> GroupControllerClient<Channel> {
    GroupControllerClient::new(connect(d.root().join("csi.sock")).await)
}

async fn create_group(
    g: &mut GroupControllerClient<Channel>,
    name: &str,
    volumes: &[&str],
) -> Result<csi::VolumeGroupSnapshot, tonic::Status> {
    g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().group_snapshot.expect("a group snapshot"))
}

async fn get_group(
    g: &mut GroupControllerClient<Channel>,
    id: &str,
    snapshots: &[String],
) -> Result<csi::VolumeGroupSnapshot, tonic::Status> {
    g.get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snapshots.to_vec(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().group_snapshot.expect("a group snapshot"))
}

async fn delete_group(
    g: &mut GroupControllerClient<Channel>,
    id: &str,
    snapshots: &[String],
) -> Result<(), tonic::Status> {
    g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snapshots.to_vec(),
        ..Default::default()
    })
    .await
    .map(drop)
}

fn member_ids(group: &csi::VolumeGroupSnapshot) -> Vec<String> {
    let mut ids: Vec<String> = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    ids.sort();
    ids
}

/// The members of `group`, by source volume.
fn member_of<'a>(group: &'a csi::VolumeGroupSnapshot, volume: &str) -> &'a csi::Snapshot {
    group
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == volume)
        .unwrap_or_else(|| panic!("no member of {volume} in {group:?}"))
}

/// Three volumes of three kinds, two of them mounted and written, one group snapshot: every
/// member consistent and taken while the writers were held only for the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_ext4_xfs_and_block_volumes_is_one_consistent_instant() {
    const SLOTS: u64 = 64;
    let mut d = TestDriver::start_on_small_pool("xfs", 1536).await;
    assert_reflink_pool(&d);
    let mut g = groups(&d).await;
    let ext4_cap = mount_cap("ext4", snw());
    let xfs_cap = mount_cap("xfs", snw());
    let ext4 = d.create(create_req("g-ext4", 64 * MIB, ext4_cap.clone()));
    let ext4 = ext4.await.unwrap().volume_id;
    let xfs = d.create(create_req("g-xfs", 320 * MIB, xfs_cap.clone()));
    let xfs = xfs.await.unwrap().volume_id;
    let block = d.create(create_req("g-block", 16 * MIB, block_cap(snw())));
    let block = block.await.unwrap().volume_id;
    // The block volume is not attached: its image is its content.
    let raw = pattern(7, 4 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.image_path(&block))
        .unwrap()
        .write_all_at(&raw, 0)
        .unwrap();
    let (e_staging, e_target) = mount_volume(&mut d, &ext4, "g-ext4", &ext4_cap).await;
    let (x_staging, x_target) = mount_volume(&mut d, &xfs, "g-xfs", &xfs_cap).await;
    let pre = write_synced(&e_target.join("pre.bin"), &pattern(1, 4 << 20));
    let ext4_writer = Writer::start(&e_target.join("live.bin"), 2, SLOTS);
    let xfs_writer = Writer::start(&x_target.join("live.bin"), 3, SLOTS);

    let group = create_group(&mut g, "group-a", &[&ext4, &xfs, &block])
        .await
        .unwrap();
    ext4_writer.assert_progress("the group snapshot (ext4 must be thawed)");
    xfs_writer.assert_progress("the group snapshot (xfs must be thawed)");
    assert!(group.ready_to_use);
    assert_eq!(group.snapshots.len(), 3);
    for s in &group.snapshots {
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
        assert_eq!(s.creation_time, group.creation_time, "one instant");
        assert!(s.ready_to_use);
    }
    assert_frozen_copy(&snapshot_image(&d, &member_of(&group, &ext4).snapshot_id));
    let block_copy = std::fs::read(snapshot_image(&d, &member_of(&group, &block).snapshot_id));
    assert_eq!(checksum(&block_copy.unwrap()[..raw.len()]), checksum(&raw));
    ext4_writer.finish();
    xfs_writer.finish();

    group_is_idempotent_and_refuses_conflicts(&mut d, &mut g, &group, [&ext4, &xfs, &block]).await;
    group_members_are_snapshots(&mut d, &group).await;
    // A member restores like any snapshot.
    let ext4_member = member_of(&group, &ext4).snapshot_id.clone();
    let restored = d
        .create(from_source(
            create_req("g-restored", 64 * MIB, ext4_cap.clone()),
            snapshot_source(&ext4_member),
        ))
        .await
        .unwrap()
        .volume_id;
    let (r_staging, r_target) = mount_volume(&mut d, &restored, "g-restored", &ext4_cap).await;
    assert_eq!(file_checksum(&r_target.join("pre.bin")), pre);
    unmount_volume(&mut d, &restored, &r_staging, &r_target).await;
    d.delete(&restored).await.unwrap();

    group_get_and_delete(&mut d, &mut g, &group).await;
    unmount_volume(&mut d, &ext4, &e_staging, &e_target).await;
    unmount_volume(&mut d, &xfs, &x_staging, &x_target).await;
    for id in [&ext4, &xfs, &block] {
        d.delete(id).await.unwrap();
    }
}

/// Same name and volumes (in any order) → the same group; same name and other volumes →
/// ALREADY_EXISTS; bad requests name their field.
async fn group_is_idempotent_and_refuses_conflicts(
    d: &mut TestDriver,
    g: &mut GroupControllerClient<Channel>,
    group: &csi::VolumeGroupSnapshot,
    [ext4, xfs, block]: [&str; 3],
) {
    let again = create_group(g, "group-a", &[block, ext4, xfs])
        .await
        .unwrap();
    assert_eq!(again.group_snapshot_id, group.group_snapshot_id);
    assert_eq!(member_ids(&again), member_ids(group));
    assert_code(
        create_group(g, "group-a", &[ext4]).await,
        Code::AlreadyExists,
        "group-a",
    );
    let unknown = random_id();
    assert_code(
        create_group(g, "group-b", &[ext4, &unknown]).await,
        Code::NotFound,
        &unknown,
    );
    assert_code(
        create_group(g, "group-b", &[ext4, "not-ours"]).await,
        Code::NotFound,
        "not-ours",
    );
    assert_code(
        create_group(g, "", &[ext4]).await,
        Code::InvalidArgument,
        "name",
    );
    assert_code(
        create_group(g, "group-b", &[]).await,
        Code::InvalidArgument,
        "source_volume_ids",
    );
    assert_code(
        create_group(g, "group-b", &[ext4, ext4]).await,
        Code::InvalidArgument,
        "source_volume_ids",
    );
    // Nothing of the refused groups was made.
    let listed = listed_ids(d, csi::ListSnapshotsRequest::default()).await;
    assert_eq!(listed, member_ids(group));
}

/// The members are ordinary snapshots: listed and got with their group's id, and refused
/// alone by DeleteSnapshot (they go with their group).
async fn group_members_are_snapshots(d: &mut TestDriver, group: &csi::VolumeGroupSnapshot) {
    let reply = list_snapshots(d, csi::ListSnapshotsRequest::default())
        .await
        .unwrap();
    assert_eq!(reply.entries.len(), 3);
    for entry in reply.entries {
        let snap = entry.snapshot.unwrap();
        assert_eq!(snap.group_snapshot_id, group.group_snapshot_id);
    }
    let one = &group.snapshots[0];
    let got = get_snapshot(d, &one.snapshot_id).await.unwrap();
    assert_eq!(got.group_snapshot_id, group.group_snapshot_id);
    assert_code(
        delete_snapshot(d, &one.snapshot_id).await,
        Code::FailedPrecondition,
        &group.group_snapshot_id,
    );
}

/// GetVolumeGroupSnapshot and DeleteVolumeGroupSnapshot, with their snapshot_ids checks.
async fn group_get_and_delete(
    d: &mut TestDriver,
    g: &mut GroupControllerClient<Channel>,
    group: &csi::VolumeGroupSnapshot,
) {
    let id = &group.group_snapshot_id;
    let members = member_ids(group);
    let got = get_group(g, id, &members).await.unwrap();
    assert_eq!(got.group_snapshot_id, *id);
    assert_eq!(member_ids(&got), members);
    assert_eq!(got.creation_time, group.creation_time);
    assert_code(
        get_group(g, id, &members[..2]).await,
        Code::InvalidArgument,
        "snapshot_ids",
    );
    assert_code(
        get_group(g, &random_id(), &members).await,
        Code::NotFound,
        "group snapshot",
    );
    assert_code(
        delete_group(g, id, &[members[0].clone(), random_id()]).await,
        Code::InvalidArgument,
        "snapshot_ids",
    );
    delete_group(g, id, &members).await.unwrap();
    for member in &members {
        assert!(!snapshot_image(d, member).exists(), "{member} removed");
    }
    assert!(listed_ids(d, csi::ListSnapshotsRequest::default())
        .await
        .is_empty());
    delete_group(g, id, &members).await.unwrap();
    assert_code(get_group(g, id, &members).await, Code::NotFound, id);
}
