//! The one error type of the driver, and the one place that decides which gRPC code each cause
//! gets (`impl From<Error> for tonic::Status`). Domain and host code return `Error` variants
//! named by cause; they never build a `Status` themselves.

use std::path::PathBuf;

/// Everything that can go wrong, named by cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed (`field` is the CSI field name).
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// A volume, path or other object the request names does not exist.
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },

    /// The content source of a CreateVolume is not in this node's pool (it may be in another
    /// node's: loopcsi volumes and snapshots live on one node). The message says so.
    #[error("{0}")]
    SourceNotFound(String),

    /// An object exists already, but not the way the request asks for it.
    #[error("{0}")]
    AlreadyExists(String),

    /// Another operation on the same volume (or volume name) is in flight.
    #[error("an operation on {0} is already in progress; retry later")]
    Pending(String),

    /// A list/paging token this server did not issue (or issued before a restart).
    #[error("starting_token {0} was not issued by this driver (or it restarted); list again from the start")]
    InvalidToken(String),

    /// A capacity the driver cannot honour.
    #[error("{0}")]
    OutOfRange(String),

    /// The pool cannot hold what was asked for.
    #[error("the pool has {available} bytes available, {requested} bytes requested")]
    NoSpace { requested: u64, available: u64 },

    /// The request's topology requirements exclude this node.
    #[error("{0}")]
    Topology(String),

    /// The volume is not in the state this call needs (in use, not staged, ...).
    #[error("{0}")]
    FailedPrecondition(String),

    /// The driver is still recovering its state after a start.
    #[error("the driver is starting up (state recovery in progress); retry shortly")]
    NotReady,

    /// An external tool (mkfs, blkid, ...) failed.
    #[error("{tool} failed (exit code {code:?}): {stderr}")]
    Tool {
        tool: String,
        code: Option<i32>,
        stderr: String,
    },

    /// An external tool did not finish within its deadline (`--tool-timeout`); it was killed.
    #[error("{tool} did not finish within {} s and was killed; the operation can be retried", after.as_secs_f64())]
    ToolTimedOut {
        tool: String,
        after: std::time::Duration,
    },

    /// A file-system operation on a path failed.
    #[error("{op} {path}: {source}", path = path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A syscall (ioctl, mount, umount) failed.
    #[error("{op} {target}: {errno}")]
    Sys {
        op: &'static str,
        target: String,
        errno: nix::errno::Errno,
    },

    /// Persisted state is unreadable or contradicts itself; nothing is changed on disk.
    #[error("{0}")]
    Corrupt(String),

    /// An RPC whose capability the driver does not advertise (the spec's UNIMPLEMENTED).
    #[error("{0} is not supported by loopcsi (its capability is not advertised)")]
    Unsupported(&'static str),

    /// A server-side invariant broke (a blocking task panicked, ...).
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn sys(op: &'static str, target: impl std::fmt::Display, errno: nix::errno::Errno) -> Self {
        Error::Sys {
            op,
            target: target.to_string(),
            errno,
        }
    }

    /// True when the cause is a full file system (so the CO hears RESOURCE_EXHAUSTED).
    fn is_out_of_space(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.raw_os_error() == Some(nix::libc::ENOSPC),
            Error::Sys { errno, .. } => *errno == nix::errno::Errno::ENOSPC,
            _ => false,
        }
    }

    /// The gRPC code the CSI spec prescribes for this cause.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        if self.is_out_of_space() {
            return Code::ResourceExhausted;
        }
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. } | Error::SourceNotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Pending(_) | Error::InvalidToken(_) => Code::Aborted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::NoSpace { .. } | Error::Topology(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            // mount(2)'s EBUSY is transient (another holder has the device open exclusively,
            // e.g. a blkid or fsck in flight): UNAVAILABLE tells the CO to retry.
            Error::NotReady
            | Error::Sys {
                op: "mount",
                errno: nix::errno::Errno::EBUSY,
                ..
            } => Code::Unavailable,
            // DEADLINE_EXCEEDED names the cause, and it is retryable: the CSI sidecars and the
            // kubelet (`isFinalError`) treat it, like UNAVAILABLE, as "not final, may still be in
            // progress", so they retry and, for a node operation, keep the volume's state
            // uncertain (unstage/unpublish are still called). UNAVAILABLE would instead suggest
            // the plugin itself is down. The tool was killed, so a retry starts afresh.
            Error::ToolTimedOut { .. } => Code::DeadlineExceeded,
            Error::Unsupported(_) => Code::Unimplemented,
            Error::Tool { .. }
            | Error::Io { .. }
            | Error::Sys { .. }
            | Error::Corrupt(_)
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

/// Renders untrusted input for an error message: quoted, escaped, and cut short so a 100 KB
/// hostile string cannot flood logs or replies.
pub fn shown(value: &str) -> String {
    const MAX: usize = 80;
    if value.len() <= MAX {
        return format!("{value:?}");
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
