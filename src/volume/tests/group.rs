//! Group snapshots under injected failures: whatever fails, every member is thawed and nothing
//! of the group is committed (no member snapshot, no record), and the CO's retry succeeds.

use nix::errno::Errno;

use super::{bed, Bed};
use crate::error::Error;
use crate::host::fake::Op;
use crate::host::os::Host;
use crate::volume::id::VolumeId;
use crate::volume::params::VolumeKind;

/// Two staged file systems and an unstaged block volume.
fn three_members(b: &Bed) -> Vec<VolumeId> {
    vec![
        b.staged_fs("a"),
        b.staged_fs("b"),
        b.create("c", VolumeKind::Block),
    ]
}

/// Nothing frozen, no member snapshot, no freeze record, no group record: the group is not.
#[track_caller]
fn assert_nothing_of_the_group(b: &Bed) {
    for dev in b.devices() {
        let numbers = b.host.dev_numbers(dev.device).unwrap();
        assert!(!b.host.is_frozen(numbers), "{dev:?} left frozen");
    }
    assert!(b.files_in("snapshots").is_empty(), "no member snapshot");
    assert!(b.files_in("frozen").is_empty(), "no freeze record");
    assert!(b.files_in("groups").is_empty(), "no group record");
    assert!(b.volumes.list_snapshots(None, 10, |_| true).0.is_empty());
}

#[test]
fn the_second_members_freeze_failing_thaws_the_first_and_commits_nothing() {
    let b = bed();
    let members = three_members(&b);
    b.host.fail_nth(Op::Freeze, 2, Errno::EIO);

    let err = b.volumes.create_group_snapshot("g", &members).unwrap_err();
    assert!(matches!(err, Error::Sys { op: "FIFREEZE", .. }), "{err:?}");
    assert_eq!(
        b.host.calls_of(Op::Thaw).len(),
        1,
        "the first member thawed"
    );
    assert_nothing_of_the_group(&b);

    // The name is free for the CO's retry, which makes the whole group.
    let (group, _) = b.volumes.create_group_snapshot("g", &members).unwrap();
    assert_eq!(group.members.len(), 3);
    assert_eq!(
        b.files_in("snapshots").len(),
        6,
        "three images, three metadata files"
    );
    assert_eq!(b.files_in("groups"), vec![format!("{}.json", group.id)]);
}

#[test]
fn enospc_on_the_group_commit_removes_every_member_snapshot() {
    let b = bed();
    let members = three_members(&b);
    // Records written: the group's intent, two freeze intents, three member metadata files,
    // then the group's commit.
    b.host.clear_calls();
    b.host.fail_nth(Op::WriteRecord, 7, Errno::ENOSPC);

    let err = b.volumes.create_group_snapshot("g", &members).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let writes = b.host.calls_of(Op::WriteRecord);
    assert_eq!(writes.len(), 7, "{writes:?}");
    assert!(
        writes[6].arg.contains("/groups/"),
        "the commit failed: {}",
        writes[6]
    );
    assert_nothing_of_the_group(&b);
    assert!(b.volumes.create_group_snapshot("g", &members).is_ok());
}

#[test]
fn a_group_left_half_made_by_a_crash_is_rolled_back_at_start() {
    let b = bed();
    let members = three_members(&b);
    let (group, _) = b.volumes.create_group_snapshot("g", &members).unwrap();
    // As a crash before the commit leaves it: the record still says `creating`.
    let path = b.state().join("groups").join(format!("{}.json", group.id));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"committed\"", "\"creating\"")).unwrap();

    let host: std::sync::Arc<dyn Host> = b.host.clone();
    let (reopened, _) = crate::volume::Volumes::open(&b.state(), host, true).unwrap();
    assert!(reopened.group(&group.id).is_none());
    assert!(b.files_in("snapshots").is_empty(), "members removed");
    assert!(b.files_in("groups").is_empty(), "record removed");
    assert!(reopened.list_snapshots(None, 10, |_| true).0.is_empty());
}
