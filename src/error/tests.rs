//! The code of every variant, as a table (see `Error::code`).

use super::*;
use nix::errno::Errno;
use tonic::Code;

/// The code table, one row per variant. It is an exhaustive match (a new variant does not
/// compile without a row), and counts its rows, so a variant without a sample below fails.
macro_rules! table {
    ($($variant:ident => $code:ident,)*) => {
        fn expected(err: &Error) -> Code {
            match err {
                $(Error::$variant { .. } => Code::$code,)*
            }
        }
        const ROWS: usize = [$(stringify!($variant)),*].len();
    };
}

table! {
    InvalidArgument => InvalidArgument, NotFound => NotFound, SourceNotFound => NotFound,
    GroupMemberNotFound => NotFound, GroupNameTaken => AlreadyExists,
    GroupMember => FailedPrecondition,
    InvalidToken => Aborted, Unsupported => Unimplemented,
    StagingRequired => FailedPrecondition, CapabilityMismatch => FailedPrecondition,
    LimitBelowRequired => OutOfRange, RequiredTooLarge => OutOfRange,
    NoSizeFits => OutOfRange, LimitBelowSource => OutOfRange, Shrink => OutOfRange,
    OffsetBeyondVolume => OutOfRange,
    NoSpace => ResourceExhausted, NotAccessibleHere => ResourceExhausted,
    VolumeNameTaken => AlreadyExists, SnapshotNameTaken => AlreadyExists,
    StagedDifferently => AlreadyExists, PublishedDifferently => AlreadyExists,
    Pending => Aborted, DeviceHeld => Aborted, NotReady => Unavailable,
    RecoveryFailed => FailedPrecondition, StateDirInUse => FailedPrecondition,
    GcWhileServed => FailedPrecondition, NodeIdChanged => FailedPrecondition,
    RequiredToolMissing => FailedPrecondition, ToolNotInstalled => FailedPrecondition,
    NeedsCapability => FailedPrecondition, NotEmptyTarget => FailedPrecondition,
    NothingToRescue => FailedPrecondition, RescueImageOccupied => FailedPrecondition,
    RescueWhilePublished => FailedPrecondition, InUse => FailedPrecondition,
    NameUnknowable => FailedPrecondition, MountInsideRecords => FailedPrecondition,
    FileSystemMoved => FailedPrecondition, FrozenByOther => FailedPrecondition,
    FreezeLimit => FailedPrecondition,
    StagedElsewhere => FailedPrecondition, ForeignMount => FailedPrecondition,
    ForeignMountLeft => FailedPrecondition, UnidentifiedDevice => FailedPrecondition,
    WrongFileSystem => FailedPrecondition, ForeignContent => FailedPrecondition,
    StillPublished => FailedPrecondition, ImageReplaced => FailedPrecondition,
    NotStaged => FailedPrecondition, SingleTarget => FailedPrecondition,
    DeviceSwapped => FailedPrecondition, MountBusy => FailedPrecondition,
    DeviceStillOpen => FailedPrecondition,
    CorruptRecord => Internal, FormattedButBlank => Internal, TinyImage => Internal,
    ToolTimedOut => DeadlineExceeded, Tool => Internal, Io => Internal, Sys => Internal, DeviceNodeMissing => Internal,
    UnexpectedSysfs => Internal, UnknownSize => Internal, BadFreeDevice => Internal,
    Server => Internal, SignalHandler => Internal, Internal => Internal,
}

/// One value of every variant.
fn samples() -> Vec<Error> {
    let (v, p, s) = (
        VolumeId::new_random(),
        PathBuf::from("/p"),
        String::from("s"),
    );
    let holder = Holder {
        pid: Some(1),
        what: s.clone(),
    };
    let io = || std::io::Error::from(std::io::ErrorKind::Other);
    // A tonic transport error only comes from a transport; an unparsable endpoint gives one.
    let server = tonic::transport::Endpoint::from_shared("\0").unwrap_err();
    vec![
        Error::invalid("f", "r"),
        Error::NotFound {
            what: "volume",
            id: s.clone(),
        },
        Error::SourceNotFound {
            what: "snapshot",
            id: s.clone(),
            node: s.clone(),
        },
        Error::InvalidToken { token: s.clone() },
        Error::Unsupported("ControllerPublishVolume"),
        Error::StagingRequired,
        Error::CapabilityMismatch { reason: s.clone() },
        Error::LimitBelowRequired {
            limit: 1,
            required: 2,
        },
        Error::RequiredTooLarge { required: 1 },
        Error::NoSizeFits {
            floor: 1,
            required: 2,
            limit: 3,
        },
        Error::LimitBelowSource {
            limit: 1,
            source_bytes: 2,
        },
        Error::Shrink {
            volume: v,
            size: 2,
            requested: 1,
        },
        Error::OffsetBeyondVolume {
            field: "starting_offset",
            offset: 2,
            capacity: 1,
        },
        Error::NoSpace {
            requested: 2,
            available: 1,
        },
        Error::NotAccessibleHere { node: s.clone() },
        Error::VolumeNameTaken {
            name: s.clone(),
            volume: v,
            mismatch: Mismatch::Capacity {
                size: 1,
                required: 2,
                limit: 3,
            },
        },
        Error::SnapshotNameTaken {
            name: s.clone(),
            snapshot: crate::volume::id::SnapshotId::new_random(),
            of: v,
            requested: v,
        },
        Error::StagedDifferently {
            volume: v,
            staging: p.clone(),
        },
        Error::PublishedDifferently {
            volume: v,
            target: p.clone(),
        },
        Error::Pending {
            what: "volume",
            id: v.to_string(),
            by: "NodeStageVolume".into(),
        },
        Error::DeviceHeld {
            volume: v,
            device: p.clone(),
        },
        Error::NotReady,
        Error::RecoveryFailed { reason: s.clone() },
        Error::StateDirInUse {
            state_dir: p.clone(),
            holder: holder.clone(),
            lock_file: p.clone(),
        },
        Error::GcWhileServed {
            state_dir: p.clone(),
            holder,
            lock_file: p.clone(),
        },
        Error::NodeIdChanged {
            requested: s.clone(),
            recorded: s.clone(),
            file: p.clone(),
        },
        Error::RequiredToolMissing {
            tool: "blkid",
            searched: &["/sbin"],
        },
        Error::ToolNotInstalled {
            tool: "mkfs.xfs".into(),
        },
        Error::ToolTimedOut {
            tool: s.clone(),
            after: std::time::Duration::from_secs(1),
        },
        Error::NeedsCapability {
            device: p.clone(),
            capability: "CAP_SYS_RESOURCE",
            stderr: s.clone(),
        },
        Error::NotEmptyTarget {
            field: "target_path",
            path: p.clone(),
        },
        Error::NothingToRescue {
            volume: v,
            image: p.clone(),
        },
        Error::RescueImageOccupied { image: p.clone() },
        Error::RescueWhilePublished {
            volume: v,
            targets: vec![p.clone()],
        },
        Error::InUse {
            volume: v,
            by: vec![s.clone()],
        },
        Error::NameUnknowable {
            what: "volume",
            name: s.clone(),
            metadata: p.clone(),
            why: s.clone(),
            names: None,
        },
        Error::MountInsideRecords {
            dir: p.clone(),
            mount_point: p.clone(),
        },
        Error::FileSystemMoved {
            path: p.clone(),
            major: 7,
            minor: 3,
        },
        Error::FreezeLimit {
            volume: v,
            limit: std::time::Duration::from_secs(5),
            compared: 1,
            data: 2,
        },
        Error::FrozenByOther {
            volume: v,
            mount_point: p.clone(),
        },
        Error::GroupMemberNotFound { id: s.clone() },
        Error::GroupNameTaken {
            name: s.clone(),
            group: v,
            of: vec![v],
            requested: vec![v, v],
        },
        Error::GroupMember {
            snapshot: crate::volume::id::SnapshotId::new_random(),
            group: v,
        },
        Error::StagedElsewhere {
            volume: v,
            staging: p.clone(),
        },
        Error::ForeignMount {
            field: "target_path",
            path: p.clone(),
            mounted: s.clone(),
        },
        Error::ForeignMountLeft {
            target: p.clone(),
            mounted: s.clone(),
        },
        Error::UnidentifiedDevice {
            device: p.clone(),
            volume: v,
        },
        Error::WrongFileSystem {
            volume: v,
            found: s.clone(),
            wanted: "ext4",
        },
        Error::ForeignContent {
            volume: v,
            found: s.clone(),
        },
        Error::StillPublished {
            volume: v,
            target: p.clone(),
        },
        Error::ImageReplaced {
            volume: v,
            device: p.clone(),
        },
        Error::NotStaged {
            volume: v,
            staging: p.clone(),
        },
        Error::SingleTarget {
            volume: v,
            target: p.clone(),
        },
        Error::DeviceSwapped {
            device: p.clone(),
            image: p.clone(),
        },
        Error::MountBusy { target: s.clone() },
        Error::DeviceStillOpen { device: p.clone() },
        Error::unparsable(&p, "eof"),
        Error::FormattedButBlank { volume: v },
        Error::TinyImage {
            path: p.clone(),
            bytes: 1,
            block: 4096,
        },
        Error::Tool {
            tool: s.clone(),
            code: Some(1),
            stderr: s.clone(),
        },
        Error::io("read", &p, io()),
        Error::sys("umount", p.display(), Errno::EINVAL),
        Error::DeviceNodeMissing { device: p.clone() },
        Error::UnexpectedSysfs {
            path: p.clone(),
            content: s.clone(),
        },
        Error::UnknownSize { device: p.clone() },
        Error::BadFreeDevice { number: -1 },
        Error::Server(server),
        Error::SignalHandler {
            signal: "SIGTERM",
            source: io(),
        },
        Error::Internal(s),
    ]
}

#[test]
fn every_variant_has_its_code() {
    let samples = samples();
    let kinds: std::collections::HashSet<_> = samples.iter().map(std::mem::discriminant).collect();
    assert_eq!(kinds.len(), samples.len(), "two samples of one variant");
    assert_eq!(samples.len(), ROWS, "a variant of the table has no sample");
    for err in samples {
        let want = expected(&err);
        assert_eq!(err.code(), want, "{err:?}");
        assert_eq!(tonic::Status::from(err).code(), want);
    }
}

#[test]
fn a_full_file_system_is_resource_exhausted_whatever_failed() {
    let full = std::io::Error::from_raw_os_error(nix::libc::ENOSPC);
    assert_eq!(
        Error::io("write", "/f", full).code(),
        Code::ResourceExhausted
    );
    assert_eq!(
        Error::sys("mount", "/t", Errno::ENOSPC).code(),
        Code::ResourceExhausted
    );
}

#[test]
fn a_busy_mount_is_retryable_and_other_mount_failures_are_internal() {
    let busy = Error::sys("mount", "/t", nix::errno::Errno::EBUSY);
    assert_eq!(busy.code(), tonic::Code::Unavailable);
    let other = Error::sys("mount", "/t", nix::errno::Errno::EINVAL);
    assert_eq!(other.code(), tonic::Code::Internal);
    let busy_umount = Error::sys("umount", "/t", nix::errno::Errno::EBUSY);
    assert_eq!(busy_umount.code(), tonic::Code::Internal);
}

#[test]
fn a_tool_past_its_deadline_is_deadline_exceeded_and_says_so() {
    let err = Error::ToolTimedOut {
        tool: "/usr/sbin/mkfs.xfs".into(),
        after: std::time::Duration::from_millis(1500),
    };
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(
        err.to_string(),
        "/usr/sbin/mkfs.xfs did not finish within 1.5 s and was killed; the operation can be retried"
    );
}
