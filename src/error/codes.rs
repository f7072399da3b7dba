//! The one mapping from a failure's cause to the gRPC code the CSI spec prescribes, and the
//! reply a client sees.

use super::Error;

impl Error {
    /// True when the cause is a full file system (so the CO hears RESOURCE_EXHAUSTED).
    fn is_out_of_space(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.raw_os_error() == Some(nix::libc::ENOSPC),
            Error::Sys { errno, .. } => *errno == nix::errno::Errno::ENOSPC,
            _ => false,
        }
    }

    /// The gRPC code the CSI spec prescribes for this cause. No wildcard: a new variant does
    /// not compile until its code is decided here (and in the table test below).
    pub fn code(&self) -> tonic::Code {
        if self.is_out_of_space() {
            return tonic::Code::ResourceExhausted;
        }
        // mount(2)'s EBUSY is transient (another holder has the device open exclusively,
        // e.g. a blkid or fsck in flight): UNAVAILABLE tells the CO to retry.
        if matches!(
            self,
            Error::Sys {
                op: "mount",
                errno: nix::errno::Errno::EBUSY,
                ..
            }
        ) {
            return tonic::Code::Unavailable;
        }
        self.code_by_cause()
    }

    /// The code of each variant, whatever its I/O error says.
    fn code_by_cause(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. }
            | Error::SourceNotFound { .. }
            | Error::GroupMemberNotFound { .. } => Code::NotFound,
            Error::VolumeNameTaken { .. }
            | Error::GroupNameTaken { .. }
            | Error::SnapshotNameTaken { .. }
            | Error::StagedDifferently { .. }
            | Error::PublishedDifferently { .. } => Code::AlreadyExists,
            Error::Pending { .. } | Error::DeviceHeld { .. } | Error::InvalidToken { .. } => {
                Code::Aborted
            }
            Error::LimitBelowRequired { .. }
            | Error::RequiredTooLarge { .. }
            | Error::NoSizeFits { .. }
            | Error::LimitBelowSource { .. }
            | Error::Shrink { .. }
            | Error::OffsetBeyondVolume { .. } => Code::OutOfRange,
            Error::NoSpace { .. } | Error::NotAccessibleHere { .. } => Code::ResourceExhausted,
            Error::StagingRequired
            | Error::CapabilityMismatch { .. }
            | Error::RecoveryFailed { .. }
            | Error::StateDirInUse { .. }
            | Error::GcWhileServed { .. }
            | Error::NodeIdChanged { .. }
            | Error::RequiredToolMissing { .. }
            | Error::ToolNotInstalled { .. }
            | Error::NeedsCapability { .. }
            | Error::NotEmptyTarget { .. }
            | Error::NothingToRescue { .. }
            | Error::RescueImageOccupied { .. }
            | Error::RescueWhilePublished { .. }
            | Error::InUse { .. }
            | Error::NameUnknowable { .. }
            | Error::MountInsideRecords { .. }
            | Error::FileSystemMoved { .. }
            | Error::FrozenByOther { .. }
            | Error::FreezeLimit { .. }
            | Error::GroupMember { .. }
            | Error::StagedElsewhere { .. }
            | Error::ForeignMount { .. }
            | Error::ForeignMountLeft { .. }
            | Error::UnidentifiedDevice { .. }
            | Error::WrongFileSystem { .. }
            | Error::ForeignContent { .. }
            | Error::StillPublished { .. }
            | Error::ImageReplaced { .. }
            | Error::NotStaged { .. }
            | Error::SingleTarget { .. }
            | Error::DeviceSwapped { .. }
            | Error::MountBusy { .. }
            | Error::DeviceStillOpen { .. } => Code::FailedPrecondition,
            Error::NotReady => Code::Unavailable,
            // DEADLINE_EXCEEDED names the cause, and it is retryable: the CSI sidecars and the
            // kubelet (`isFinalError`) treat it, like UNAVAILABLE, as "not final, may still be in
            // progress", so they retry and, for a node operation, keep the volume's state
            // uncertain (unstage/unpublish are still called). UNAVAILABLE would instead suggest
            // the plugin itself is down. The tool was killed, so a retry starts afresh.
            Error::ToolTimedOut { .. } => Code::DeadlineExceeded,
            Error::Unsupported(_) => Code::Unimplemented,
            Error::CorruptRecord { .. }
            | Error::FormattedButBlank { .. }
            | Error::TinyImage { .. }
            | Error::Tool { .. }
            | Error::Io { .. }
            | Error::Sys { .. }
            | Error::DeviceNodeMissing { .. }
            | Error::UnexpectedSysfs { .. }
            | Error::UnknownSize { .. }
            | Error::BadFreeDevice { .. }
            | Error::Server(_)
            | Error::SignalHandler { .. }
            | Error::Internal(_) => Code::Internal,
        }
    }
}

/// The longest message a reply carries: paths and tool output inside errors can be long (or
/// hostile), and a reply must stay small.
const MAX_MESSAGE: usize = 1000;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let mut message = err.to_string();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("… (truncated)");
        }
        tonic::Status::new(err.code(), message)
    }
}
