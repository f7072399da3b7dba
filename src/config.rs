//! Command line and environment. The parsed `Config` is passed down explicitly; there are no
//! globals, so two drivers can run in one process (the tests do).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};

/// The topology key every volume and node is labelled with.
pub const TOPOLOGY_KEY: &str = "topology.loopcsi.dev/node";

#[derive(Debug, Parser)]
#[command(
    name = "loopcsi",
    version,
    about = "A Kubernetes CSI driver for fast, local, crash-safe volumes: each volume is a sparse \
             file in a pool directory, attached as a loop device"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CSI Identity, Controller and Node services on a unix socket.
    Serve(Config),
    /// Print this node's volumes (id, name, size, allocated, file system, loop device, staged
    /// and published paths, health). Read-only: safe beside a live driver.
    Status(StatusArgs),
    /// List (--dry-run) or remove orphans: loop devices of deleted volumes, images without
    /// metadata, stale temp files and records. Safe beside a live driver: only files older
    /// than --min-age are touched, and existence is judged by the metadata on disk.
    Gc(GcArgs),
    /// Copy the data of a staged volume whose image was deleted or replaced behind the
    /// driver's back from its still-attached loop device into a new image, then detach the
    /// device. Run it on the volume's node (in the plugin container) after the volume's pods
    /// have stopped; NodeUnstageVolume then succeeds. Safe beside a live driver.
    Rescue(RescueArgs),
    /// Route group snapshots to this node's csi-snapshotter: put this node's
    /// `snapshot.storage.kubernetes.io/managed-by` label on the VolumeGroupSnapshotContents,
    /// VolumeSnapshotContents and VolumeGroupSnapshotClass that the snapshot-controller leaves
    /// unlabelled, when the driver on this node holds their volumes or snapshots (it asks the
    /// driver over its CSI socket). Runs in the node plugin pod, in a container of its own.
    RouteSnapshots(RouteArgs),
}

/// `loopcsi route-snapshots` (src/router).
#[derive(Clone, Debug, Args)]
pub struct RouteArgs {
    /// The driver's CSI endpoint on this node: unix:///path/to/csi.sock (or an absolute path).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,

    /// This node's name (spec.nodeName): the value of the managed-by label this node's
    /// csi-snapshotter (--node-deployment) selects its objects with.
    #[arg(long, env = "NODE_ID")]
    pub node_id: String,

    /// The driver name of the objects to route (spec.driver of contents, driver of classes).
    #[arg(long, default_value = "loopcsi.dev")]
    pub driver_name: String,

    /// Seconds between two full passes over every object, besides the passes that watch
    /// events start: they retry what failed (an API conflict, a driver that did not answer).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub resync_interval: u64,

    /// Seconds after which another node's group snapshot content that is still being created
    /// no longer keeps the VolumeGroupSnapshotClass from this node (its node is presumed gone).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub class_hold_timeout: u64,
}

impl RouteArgs {
    /// Checks what clap cannot: the endpoint's form, the node id and the driver name.
    pub fn validate(&self) -> Result<()> {
        socket_path(&self.endpoint)?;
        validate_node_id(&self.node_id)?;
        validate_driver_name(&self.driver_name)
    }

    /// The unix socket path of `--endpoint`.
    pub fn socket_path(&self) -> Result<PathBuf> {
        socket_path(&self.endpoint)
    }
}

#[derive(Clone, Debug, Args)]
pub struct RescueArgs {
    /// The driver's state directory.
    #[arg(long, default_value = "/var/lib/loopcsi")]
    pub state_dir: PathBuf,

    /// The id of the volume to rescue.
    #[arg(long)]
    pub volume: String,
}

#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    /// The driver's state directory.
    #[arg(long, default_value = "/var/lib/loopcsi")]
    pub state_dir: PathBuf,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Args)]
pub struct GcArgs {
    /// The driver's state directory.
    #[arg(long, default_value = "/var/lib/loopcsi")]
    pub state_dir: PathBuf,

    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,

    /// Leave files younger than this many seconds alone (they may belong to an operation in
    /// flight in the running driver).
    #[arg(long, default_value_t = 600)]
    pub min_age: u64,
}

#[derive(Clone, Debug, Args)]
pub struct Config {
    /// The CSI endpoint to listen on: unix:///path/to/csi.sock (a plain absolute path works
    /// too). A stale socket file left by a previous run is replaced; the socket is created with
    /// mode 0660 and removed on shutdown.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,

    /// This node's name (in Kubernetes: spec.nodeName). It is the value of the topology label
    /// topology.loopcsi.dev/node on every volume made here, so it must be a valid label value.
    #[arg(long, env = "NODE_ID")]
    pub node_id: String,

    /// Directory holding the volume pool (backing files and metadata) and the node's records.
    /// Volumes live as long as this directory does; put it on the disk that should hold them.
    #[arg(long, default_value = "/var/lib/loopcsi")]
    pub state_dir: PathBuf,

    /// The driver name reported by GetPluginInfo (the StorageClass provisioner field).
    #[arg(long, default_value = "loopcsi.dev")]
    pub driver_name: String,

    /// The most volumes the CO may place on this node (NodeGetInfo); 0 leaves it to the CO.
    #[arg(long, default_value_t = 0)]
    pub max_volumes_per_node: i64,

    /// Seconds between two reconciliation rounds, which repair drift between what the CO asked
    /// for and what the kernel shows, and collect orphans (see the README); 0 turns them off.
    #[arg(long, default_value_t = 60)]
    pub reconcile_interval: u64,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics, e.g. 0.0.0.0:9898.
    /// Off when not given.
    #[arg(long)]
    pub metrics_address: Option<std::net::SocketAddr>,

    /// Attach loop devices with buffered I/O instead of direct I/O. Direct I/O (the default)
    /// avoids caching every page twice; the driver falls back to buffered I/O by itself, with a
    /// warning, when the pool's file system cannot do direct I/O.
    #[arg(long)]
    pub buffered_io: bool,

    /// Serve a state dir first served under another --node-id. Every volume's topology names
    /// the node id, so a changed id is refused at startup unless this says the node really was
    /// renamed; the new id is then recorded. Leave it off afterwards.
    #[arg(long, env = "ALLOW_NODE_ID_CHANGE")]
    pub allow_node_id_change: bool,

    /// Leave GET_SNAPSHOT (an alpha capability of CSI v1.12) out of ControllerGetCapabilities;
    /// GetSnapshot itself is still served. For sidecars built on csi-lib-utils v0.20.0 with a
    /// CSI spec older than v1.12 (external-provisioner v5.2.0, external-resizer v1.13): they
    /// crash at startup logging the capability list, on an enum value they do not know (see
    /// docs/kubernetes.md, "Sidecar and Kubernetes versions").
    #[arg(long)]
    pub no_get_snapshot_capability: bool,

    /// GetMetadataAllocated/GetMetadataDelta answer in blocks of this many bytes
    /// (FIXED_LENGTH, a power of two from 4096 to 1048576); 0 (the default) answers with exact
    /// byte ranges (VARIABLE_LENGTH).
    #[arg(long, default_value_t = 0)]
    pub cbt_block_size: u64,

    /// Seconds an external tool (mkfs, e2fsck, resize2fs, xfs_growfs) may run before it is
    /// killed and the operation fails with DEADLINE_EXCEEDED (retried by the CO); blkid gets
    /// at most 60 of them. One value for all: the slow tools scale with the volume's size, and
    /// the deadline only has to free a volume from a tool hung on a dead device.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub tool_timeout: u64,

    /// Milliseconds a snapshot or clone of a mounted volume may keep its file system frozen
    /// (its application's writes wait meanwhile). On a pool that shares extents the freeze
    /// takes milliseconds; elsewhere the data is copied while the application runs and only a
    /// last comparison runs frozen. Should that not finish in time, the file system is thawed
    /// and the CreateSnapshot (or clone) fails with FAILED_PRECONDITION naming the remedies.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_freeze_ms: u64,
}

impl Config {
    /// `--tool-timeout` as a duration.
    pub fn tool_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.tool_timeout)
    }

    /// `--max-freeze-ms` as a duration.
    pub fn max_freeze(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.max_freeze_ms)
    }

    /// Checks what clap cannot: endpoint scheme, node id and driver name formats.
    pub fn validate(&self) -> Result<()> {
        self.socket_path()?;
        validate_node_id(&self.node_id)?;
        validate_driver_name(&self.driver_name)?;
        if self.max_volumes_per_node < 0 {
            return Err(Error::invalid(
                "--max-volumes-per-node",
                "must not be negative",
            ));
        }
        crate::volume::metadata::Shape::from_block_size("--cbt-block-size", self.cbt_block_size)?;
        Ok(())
    }

    /// The unix socket path of `--endpoint`.
    pub fn socket_path(&self) -> Result<PathBuf> {
        socket_path(&self.endpoint)
    }
}

/// The unix socket path of an `--endpoint`: `unix:///path`, `unix:/path` or an absolute path.
fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(Error::invalid(
            "--endpoint",
            format!("{endpoint:?} is not unix:///absolute/path (only unix sockets are served)"),
        ));
    }
    Ok(path)
}

/// A Kubernetes label value: ≤ 63 characters, alphanumerics with `-`, `_`, `.` inside.
fn validate_node_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "--node-id",
            format!("{id:?} is not a valid label value (1-63 alphanumerics, '-', '_', '.')"),
        ))
    }
}

/// CSI: domain-name notation, ≤ 63 characters, alphanumeric at both ends.
fn validate_driver_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "--driver-name",
            format!("{name:?} is not a domain-style name of at most 63 characters"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str, node_id: &str) -> Config {
        Config {
            endpoint: endpoint.into(),
            node_id: node_id.into(),
            state_dir: "/tmp/x".into(),
            driver_name: "loopcsi.dev".into(),
            max_volumes_per_node: 0,
            reconcile_interval: 60,
            metrics_address: None,
            buffered_io: false,
            allow_node_id_change: false,
            no_get_snapshot_capability: false,
            tool_timeout: 600,
            max_freeze_ms: 5000,
            cbt_block_size: 0,
        }
    }

    #[test]
    fn endpoints_and_names() {
        assert_eq!(
            config("unix:///run/csi.sock", "n1").socket_path().unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            config("unix:/run/csi.sock", "n1").socket_path().unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(config("tcp://0.0.0.0:1", "n1").validate().is_err());
        assert!(config("unix://relative", "n1").validate().is_err());
        assert!(config("unix:///a", "").validate().is_err());
        assert!(config("unix:///a", "node/../x").validate().is_err());
        assert!(config("unix:///a", &"n".repeat(64)).validate().is_err());
        assert!(config("unix:///a", "worker-1.example").validate().is_ok());
    }
}
