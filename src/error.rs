//! The one error type of the driver, and the one place that decides which gRPC code each cause
//! gets (`Error::code`, used by `impl From<Error> for tonic::Status`). Domain and host code return
//! `Error` variants named by cause; they never build a `Status` or a message themselves.
//!
//! This file is the list of every failure an operator can see, grouped by what the operator
//! sees: request errors, conflicts, operations in flight, state/precondition errors, damaged
//! state, host failures, and internal invariants. Each variant's message is its whole text.

use std::path::PathBuf;

use crate::host::lockfile::Holder;
use crate::volume::id::{SnapshotId, VolumeId};

/// Everything that can go wrong, named by cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- Request errors: the request itself is wrong or asks what this driver cannot do. ----
    /// A request field is missing or malformed (`field` is the CSI field name).
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A volume, path or other object the request names does not exist.
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },
    /// The content source of a CreateVolume is not in this node's pool (it may be in another
    /// node's: loopcsi volumes and snapshots live on one node).
    #[error(
        "volume_content_source: {what} {id} does not exist in the pool of node {node}; a loopcsi \
         {what} lives on one node, and a volume can be restored or cloned from it only on that node"
    )]
    SourceNotFound {
        what: &'static str,
        id: String,
        node: String,
    },
    /// A member of a CreateVolumeGroupSnapshot is not in this node's pool.
    #[error(
        "source_volume_ids: volume {} does not exist in this node's pool; a loopcsi volume lives \
         on one node, and a group snapshot takes only volumes of the node that serves it",
        shown(.id)
    )]
    GroupMemberNotFound { id: String },
    /// A list/paging token this server did not issue (or issued before a restart).
    #[error("starting_token {} was not issued by this driver (or it restarted); list again from the start", shown(.token))]
    InvalidToken { token: String },
    /// An RPC whose capability the driver does not advertise (the spec's UNIMPLEMENTED).
    #[error("{0} is not supported by loopcsi (its capability is not advertised)")]
    Unsupported(&'static str),
    /// NodePublishVolume without a staging path, although the driver stages volumes.
    #[error("staging_target_path is required: this driver stages volumes (STAGE_UNSTAGE_VOLUME)")]
    StagingRequired,
    /// The volume_capability does not fit the volume (block access to a file system, ...).
    #[error("volume_capability: {reason}")]
    CapabilityMismatch { reason: String },
    /// capacity_range asks for more than it allows.
    #[error("capacity_range.limit_bytes {limit} is smaller than required_bytes {required}")]
    LimitBelowRequired { limit: u64, required: u64 },
    /// capacity_range.required_bytes beyond the largest possible volume.
    #[error("capacity_range.required_bytes {required} is larger than any volume loopcsi can make")]
    RequiredTooLarge { required: u64 },
    /// No whole-MiB size of at least the file system's minimum fits capacity_range.
    #[error(
        "no volume size in whole MiB of at least {floor} bytes fits capacity_range \
         (required_bytes {required}, limit_bytes {limit})"
    )]
    NoSizeFits {
        floor: u64,
        required: u64,
        limit: u64,
    },
    /// A restore or clone whose limit_bytes cannot hold the source.
    #[error(
        "capacity_range.limit_bytes {limit} is smaller than the source ({source_bytes} bytes)"
    )]
    LimitBelowSource { limit: i64, source_bytes: u64 },
    /// A SnapshotMetadata starting offset at or past the end of the volume.
    #[error("{field} {offset} is not inside the volume ({capacity} bytes): use an offset below its size")]
    OffsetBeyondVolume {
        field: &'static str,
        offset: u64,
        capacity: u64,
    },
    /// An expansion to a size below the volume's.
    #[error("volume {volume} has {size} bytes; shrinking to {requested} is not supported")]
    Shrink {
        volume: VolumeId,
        size: u64,
        requested: u64,
    },
    /// The pool cannot hold what was asked for.
    #[error("the pool has {available} bytes available, {requested} bytes requested")]
    NoSpace { requested: u64, available: u64 },
    /// The request's topology requirements exclude this node.
    #[error(
        "accessibility_requirements.requisite does not include this node ({key}={node}); \
         a loopcsi volume is only accessible from the node that holds it",
        key = crate::config::TOPOLOGY_KEY
    )]
    NotAccessibleHere { node: String },

    // ---- Conflicts: an object exists, but not the way the request asks for it. ----
    /// CreateVolume of an existing name with other arguments.
    #[error("volume {} already exists ({volume}) and {mismatch}", shown(.name))]
    VolumeNameTaken {
        name: String,
        volume: VolumeId,
        mismatch: Mismatch,
    },
    /// CreateSnapshot of an existing name for another source volume.
    #[error("snapshot {} already exists ({snapshot}) for volume {of}, not {requested}", shown(.name))]
    SnapshotNameTaken {
        name: String,
        snapshot: SnapshotId,
        of: VolumeId,
        requested: VolumeId,
    },
    /// CreateVolumeGroupSnapshot of an existing name for other volumes.
    #[error(
        "group snapshot {} already exists ({group}) of volumes [{}], not of the volumes [{}] \
         in source_volume_ids", shown(.name), ids(.of), ids(.requested)
    )]
    GroupNameTaken {
        name: String,
        group: VolumeId,
        of: Vec<VolumeId>,
        requested: Vec<VolumeId>,
    },
    /// NodeStageVolume at the same path with another capability.
    #[error("volume {volume} is staged at {} with another volume_capability", .staging.display())]
    StagedDifferently { volume: VolumeId, staging: PathBuf },
    /// NodePublishVolume at the same target with another capability or readonly flag.
    #[error(
        "volume {volume} is published at {} with another volume_capability or readonly flag",
        .target.display()
    )]
    PublishedDifferently { volume: VolumeId, target: PathBuf },

    // ---- In flight: retry later. ----
    /// Another operation holds the `what` ("volume", "snapshot name", ...) `id` (names shown);
    /// `by` names the operation(s) in progress.
    #[error("an operation on {what} {id} is already in progress ({by}); retry later")]
    Pending {
        what: &'static str,
        id: String,
        by: String,
    },
    /// The volume's device is held exclusively by another process (a tool a previous driver
    /// process started, say) while mounted nowhere.
    #[error(
        "an operation on volume {volume} (its device {} is held by another process, such as a \
         tool a previous driver process started) is already in progress; retry later",
        .device.display()
    )]
    DeviceHeld { volume: VolumeId, device: PathBuf },
    /// The driver is still recovering its state after a start.
    #[error("the driver is starting up (state recovery in progress); retry shortly")]
    NotReady,

    // ---- State and preconditions: the node or volume is not in the state the call needs. ----
    /// State recovery at start failed; the driver cannot serve.
    #[error("state recovery failed: {reason}")]
    RecoveryFailed { reason: String },
    /// Another process (a driver) holds the state dir this driver was asked to serve.
    #[error(
        "--state-dir {} is in use by {holder}; one driver per state dir: stop that process, or \
         give this driver its own --state-dir (lock file {})",
        .state_dir.display(), .lock_file.display()
    )]
    StateDirInUse {
        state_dir: PathBuf,
        holder: Holder,
        lock_file: PathBuf,
    },
    /// `loopcsi gc` while a driver serves the state dir.
    #[error(
        "--state-dir {} is in use by {holder}; a serving driver collects orphans itself (every \
         --reconcile-interval seconds). `loopcsi gc --dry-run` lists them beside it; `loopcsi gc` \
         removes them only while no driver serves this state dir (lock file {})",
        .state_dir.display(), .lock_file.display()
    )]
    GcWhileServed {
        state_dir: PathBuf,
        holder: Holder,
        lock_file: PathBuf,
    },
    /// --node-id differs from the one the state dir was first served as.
    #[error(
        "--node-id {requested:?} differs from the node id {recorded:?} recorded in {} when \
         this state dir was first served: every volume in it is labelled \
         {key}={recorded:?}, and serving it as {requested:?} would move them all to \
         a node that does not hold them. Start with --node-id {recorded:?}, or, if this \
         node really was renamed, pass --allow-node-id-change (env \
         ALLOW_NODE_ID_CHANGE=true) once",
        .file.display(), key = crate::config::TOPOLOGY_KEY
    )]
    NodeIdChanged {
        requested: String,
        recorded: String,
        file: PathBuf,
    },
    /// A tool the driver cannot start without is missing.
    #[error("{tool} not found in PATH or {searched:?}; install util-linux and e2fsprogs")]
    RequiredToolMissing {
        tool: &'static str,
        searched: &'static [&'static str],
    },
    /// An optional tool a request needs (mkfs.xfs, resize2fs, ...) is missing.
    #[error("{tool} is not installed on this node")]
    ToolNotInstalled { tool: String },
    /// The kernel refused to grow a mounted ext4 for want of `capability`.
    #[error(
        "the kernel refused to grow the mounted ext4 on {}: the driver process lacks \
         {capability} (run the node plugin privileged, on a host that grants it); \
         the file system grows offline when the volume is next staged (stop its pods, \
         then start them again); resize2fs said: {}",
        .device.display(), .stderr.trim().replace('\n', "; ")
    )]
    NeedsCapability {
        device: PathBuf,
        capability: &'static str,
        stderr: String,
    },
    /// A CO path (`field`) is a directory with entries the driver did not make.
    #[error(
        "{field} {} is a directory with entries that loopcsi did not create; refusing to \
         mount over them (the CO passes a missing or empty directory)",
        shown(&.path.to_string_lossy())
    )]
    NotEmptyTarget { field: &'static str, path: PathBuf },
    /// `loopcsi rescue` of a volume whose image is still the one its device holds.
    #[error(
        "volume {volume} needs no rescue: no loop device holds a file other than its image {}",
        .image.display()
    )]
    NothingToRescue { volume: VolumeId, image: PathBuf },
    /// `loopcsi rescue` would overwrite another file at the image's path.
    #[error(
        "{} holds another file now; move it away first, the rescue writes the volume's data there",
        .image.display()
    )]
    RescueImageOccupied { image: PathBuf },
    /// `loopcsi rescue` of a volume still published (its pods could write to the old device).
    #[error(
        "volume {volume} is still published at {}; stop its pods (NodeUnpublishVolume) first",
        joined(.targets, ", ")
    )]
    RescueWhilePublished {
        volume: VolumeId,
        targets: Vec<PathBuf>,
    },
    /// DeleteVolume of a volume in use on this node (records, devices or mounts: `by`).
    #[error(
        "volume {volume} is in use on this node: {}; NodeUnpublishVolume and NodeUnstageVolume it first",
        .by.join("; ")
    )]
    InUse { volume: VolumeId, by: Vec<String> },
    /// A create whose name unreadable metadata may already carry.
    #[error(
        "cannot tell whether {what} {} already exists: the metadata {} cannot be read ({why}){}; \
         repair or remove that file (see docs/kubernetes.md, \"unreadable metadata\")",
        shown(.name), .metadata.display(), names_clause(.names)
    )]
    NameUnknowable {
        what: &'static str,
        name: String,
        metadata: PathBuf,
        why: String,
        names: Option<String>,
    },
    /// A node record directory with a mount inside it (never walked into).
    #[error("{} has a mount at {} inside it; not removing it", .dir.display(), .mount_point.display())]
    MountInsideRecords { dir: PathBuf, mount_point: PathBuf },
    /// A mount point no longer on the file system about to be frozen or thawed.
    #[error("{} is no longer on the file system of device {major}:{minor}", .path.display())]
    FileSystemMoved {
        path: PathBuf,
        major: u32,
        minor: u32,
    },
    /// A snapshot of a file system someone else froze.
    #[error(
        "the file system of volume {volume} at {} is frozen by someone else, not by \
         loopcsi; whoever froze it must thaw it (fsfreeze -u {}) before a \
         snapshot or clone of the volume can be taken",
        .mount_point.display(), .mount_point.display()
    )]
    FrozenByOther {
        volume: VolumeId,
        mount_point: PathBuf,
    },
    /// A live copy whose frozen pass did not finish within the freeze limit: the file system
    /// was thawed and the copy discarded.
    #[error(
        "the snapshot or clone of volume {volume} was abandoned: its file system stays frozen \
         at most {} ms (--max-freeze-ms), and comparing its data with the copy while frozen \
         had covered {compared} of {data} bytes by then; the application was thawed and \
         nothing was kept. Put the pool on a file system that shares extents (xfs with \
         reflink=1, or btrfs), where the freeze lasts milliseconds; or snapshot the volume \
         while no pod uses it; or raise --max-freeze-ms",
        .limit.as_millis()
    )]
    FreezeLimit {
        volume: VolumeId,
        limit: std::time::Duration,
        compared: u64,
        data: u64,
    },
    /// DeleteSnapshot of a snapshot that is a member of a group snapshot.
    #[error(
        "snapshot {snapshot} is a member of group snapshot {group} (its group_snapshot_id): it is \
         deleted with its group, by DeleteVolumeGroupSnapshot"
    )]
    GroupMember {
        snapshot: crate::volume::id::SnapshotId,
        group: VolumeId,
    },
    /// NodeStageVolume at a path other than where the volume is staged.
    #[error("volume {volume} is already staged at {}", .staging.display())]
    StagedElsewhere { volume: VolumeId, staging: PathBuf },
    /// A CO path (`field`) already has a mount of something else (`mounted`).
    #[error("{field} {} already has a mount of {mounted} that is not this volume", .path.display())]
    ForeignMount {
        field: &'static str,
        path: PathBuf,
        mounted: String,
    },
    /// NodeUnpublishVolume of a target with a mount of something else; left alone.
    #[error(
        "target_path {} has a mount of {mounted} that is not this volume; not touching it",
        .target.display()
    )]
    ForeignMountLeft { target: PathBuf, mounted: String },
    /// A loop device whose backing file cannot be identified might hold the volume's image.
    #[error(
        "cannot tell whether {} already holds the image of volume {volume}; refusing to attach it a second time",
        .device.display()
    )]
    UnidentifiedDevice { device: PathBuf, volume: VolumeId },
    /// The volume holds another file system than its parameters say.
    #[error("volume {volume} holds a {found} file system, not {wanted}; refusing to reformat it")]
    WrongFileSystem {
        volume: VolumeId,
        found: String,
        wanted: &'static str,
    },
    /// The volume holds something that is not a file system (a partition table, ...).
    #[error("volume {volume} holds {found}; refusing to format it")]
    ForeignContent { volume: VolumeId, found: String },
    /// NodeUnstageVolume of a volume still published.
    #[error("volume {volume} is still published at {}; NodeUnpublishVolume it first", .target.display())]
    StillPublished { volume: VolumeId, target: PathBuf },
    /// The image was deleted or replaced while staged: the device holds the only copy.
    #[error(
        "the backing file of volume {volume} was deleted or replaced while it was staged; {} \
         holds the only copy of its data: run `loopcsi rescue --volume {volume}` on this node \
         to copy it into a new image, then retry",
        .device.display()
    )]
    ImageReplaced { volume: VolumeId, device: PathBuf },
    /// NodePublishVolume of a volume not staged at the given path.
    #[error(
        "volume {volume} is not staged at staging_target_path {}; call NodeStageVolume first",
        .staging.display()
    )]
    NotStaged { volume: VolumeId, staging: PathBuf },
    /// A second target for a volume whose access mode allows one.
    #[error(
        "volume {volume} is already published at {} and its access mode allows one target only",
        .target.display()
    )]
    SingleTarget { volume: VolumeId, target: PathBuf },
    /// The writable device no longer holds the image a read-only publish would attach.
    #[error(
        "{} no longer holds the file at {}; refusing a read-only publish of another file",
        .device.display(), .image.display()
    )]
    DeviceSwapped { device: PathBuf, image: PathBuf },
    /// umount refused: a process still uses the mount.
    #[error("{target} is busy (still in use); not unmounting it")]
    MountBusy { target: String },
    /// A detached loop device stays while another holder keeps it open.
    #[error(
        "{} is still open by another holder (a process, a mount, or a frozen file system); \
         the kernel detaches it when the last holder lets go",
        .device.display()
    )]
    DeviceStillOpen { device: PathBuf },

    // ---- Damaged state: persisted or on-disk data contradicts itself; nothing is changed. ----
    /// A metadata, node record or freeze record file that cannot be used.
    #[error("{}: {reason}", .path.display())]
    CorruptRecord { path: PathBuf, reason: Corruption },
    /// A volume formatted before that probes blank now (never formatted again).
    #[error(
        "volume {volume} was formatted before but no file system is found on it now; \
         refusing to format it again (its data would be lost)"
    )]
    FormattedButBlank { volume: VolumeId },
    /// A backing file too small for a loop device.
    #[error(
        "backing file {} holds {bytes} bytes, less than one {block}-byte block; refusing to attach it",
        .path.display()
    )]
    TinyImage {
        path: PathBuf,
        bytes: u64,
        block: u32,
    },

    // ---- Host failures: the operating system or a tool failed. ----
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
    /// An attached loop device without its /dev node.
    #[error(
        "internal error: {} is attached but its device node is missing; cannot tell its backing file",
        .device.display()
    )]
    DeviceNodeMissing { device: PathBuf },
    /// A sysfs attribute the kernel wrote in an unexpected form.
    #[error("internal error: {}: unexpected content {content:?}", .path.display())]
    UnexpectedSysfs { path: PathBuf, content: String },
    /// A device whose size cannot be read.
    #[error("internal error: cannot tell the size of {}", .device.display())]
    UnknownSize { device: PathBuf },
    /// LOOP_CTL_GET_FREE answered a number that is no device.
    #[error("internal error: LOOP_CTL_GET_FREE returned {number}")]
    BadFreeDevice { number: i32 },
    /// The gRPC server stopped with an error.
    #[error("internal error: gRPC server: {0}")]
    Server(#[source] tonic::transport::Error),
    /// A signal handler could not be installed.
    #[error("internal error: installing the {signal} handler: {source}")]
    SignalHandler {
        signal: &'static str,
        source: std::io::Error,
    },

    // ---- Internal invariants: a bug, never a state an operator can fix. ----
    /// A server-side invariant broke (a blocking task panicked, a record failed to serialise).
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

mod codes;
mod parts;
pub use parts::{ids, shown, Corruption, Mismatch};
use parts::{joined, names_clause};

/// The code table of every variant lives beside this file.
#[cfg(test)]
mod tests;
