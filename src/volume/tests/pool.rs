//! Create, delete and snapshot commits under injected failures.

use nix::errno::Errno;

use super::{bed, new_volume};
use crate::error::Error;
use crate::host::fake::Op;
use crate::volume::params::{FsType, VolumeKind};

#[test]
fn enospc_on_the_metadata_commit_of_create_leaves_no_image_and_no_volume() {
    let b = bed();
    b.host.fail_nth(Op::CommitWith, 1, Errno::ENOSPC);

    let err = b
        .volumes
        .create(new_volume("v", VolumeKind::Block), |e| e)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(b.files_in("volumes").is_empty(), "the image is taken back");
    assert!(b.volumes.list(None, 10).0.is_empty());

    // The name is free for the CO's retry.
    let (meta, _) = b
        .volumes
        .create(new_volume("v", VolumeKind::Block), |e| e)
        .unwrap();
    assert_eq!(
        b.files_in("volumes"),
        vec![format!("{}.img", meta.id), format!("{}.json", meta.id)]
    );
}

#[test]
fn enospc_creating_the_image_is_resource_exhausted_and_leaves_nothing() {
    let b = bed();
    b.host.fail_nth(Op::CreateImage, 1, Errno::ENOSPC);

    let err = b
        .volumes
        .create(new_volume("v", VolumeKind::Filesystem(FsType::Ext4)), |e| e)
        .unwrap_err();
    assert!(matches!(err, Error::NoSpace { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(b.files_in("volumes").is_empty());
    assert!(
        b.host.calls_of(Op::CommitWith).is_empty(),
        "nothing committed"
    );
}

#[test]
fn eio_removing_the_metadata_on_delete_keeps_the_whole_volume() {
    let b = bed();
    let id = b.create("v", VolumeKind::Block);
    b.host.fail_nth(Op::RemoveDurably, 1, Errno::EIO);

    let err = b.volumes.delete(&id).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(b.volumes.get(&id).is_ok(), "still served");
    assert_eq!(
        b.files_in("volumes"),
        vec![format!("{id}.img"), format!("{id}.json")],
        "the commit point and the image both stay"
    );

    b.volumes.delete(&id).unwrap();
    assert!(b.files_in("volumes").is_empty());
}

#[test]
fn enospc_on_the_snapshot_metadata_commit_removes_the_copied_image() {
    let b = bed();
    let id = b.create("v", VolumeKind::Block);
    b.host.fail_nth(Op::WriteRecord, 1, Errno::ENOSPC);

    let err = b.volumes.create_snapshot("snap", &id).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(b.host.calls_of(Op::CopyImage).len(), 1, "the copy was made");
    assert!(b.files_in("snapshots").is_empty(), "and taken back");
    assert!(b.volumes.list_snapshots(None, 10, |_| true).0.is_empty());
}

#[test]
fn delete_of_a_staged_volume_is_refused_whatever_the_records_say() {
    let b = bed();
    let id = b.staged_fs("v");
    // The records are gone (a full pool lost them, an operator removed them): the kernel
    // still shows the device and its mount, and that alone keeps the volume.
    std::fs::remove_dir_all(b.state().join("node").join(id.to_string())).unwrap();

    let err = b.volumes.delete(&id).unwrap_err();
    let Error::InUse { by, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(by.iter().any(|u| u.contains("mounted at")), "{by:?}");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(b.files_in("volumes").len(), 2, "nothing deleted");
}
