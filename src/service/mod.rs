//! The CSI gRPC services. Each handler parses and validates the request into domain types, runs
//! the domain operation on the blocking pool (it does file and device I/O), and builds the reply.
//! Every RPC runs in one tracing span that records method, volume, duration and result code;
//! an error is logged there once, and turned into a gRPC status by `error.rs` alone.

pub mod controller;
pub mod group;
pub mod identity;
pub mod node;
pub mod snapshot_metadata;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{Config, TOPOLOGY_KEY};
use crate::csi;
use crate::error::{shown, Error, Result};
use crate::host::lockfile::LockFile;
use crate::host::os::Host;
use crate::volume::id::{Id, Kind, SnapshotId, VolumeId};
use crate::volume::params::{AccessKind, AccessMode, Capability, FsType, MountFlags};
use crate::volume::Volumes;

#[derive(Clone)]
enum Readiness {
    Starting,
    Ready(Arc<Volumes>),
    Failed(String),
}

/// State shared by the three services.
pub struct Driver {
    pub driver_name: String,
    pub node_id: String,
    pub max_volumes_per_node: i64,
    /// Whether ControllerGetCapabilities lists GET_SNAPSHOT (`--no-get-snapshot-capability`).
    pub advertise_get_snapshot: bool,
    /// How SnapshotMetadata answers (`--cbt-block-size`), checked at startup.
    pub cbt_shape: crate::volume::metadata::Shape,
    readiness: watch::Receiver<Readiness>,
    /// Keys the MAC of ListVolumes tokens, so a token this process did not issue is refused.
    token_key: std::collections::hash_map::RandomState,
    background: tokio::task::AbortHandle,
    /// The state dir's lock (`volume::statedir`), held while this driver serves; released by
    /// `stop_background`, so that a driver restarted in the same process can take it at once.
    state_dir_lock: std::sync::Mutex<Option<LockFile>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Startup recovery: loads the pool (removing what a crash left half-made) and opens the door
/// into the domain.
fn recover(state_dir: &Path, host: Arc<dyn Host>, config: &Config) -> Result<Volumes> {
    let started = Instant::now();
    let direct_io = !config.buffered_io;
    let (mut volumes, recovery) = Volumes::open(state_dir, host, direct_io).inspect_err(|err| {
        tracing::error!(error = %err, "state recovery failed");
    })?;
    volumes.set_freeze_limit(config.max_freeze());
    tracing::info!(
        volumes = recovery.volumes,
        removed.partial_images = recovery.removed_partial_images.len(),
        removed.temp_files = recovery.removed_temp_files.len(),
        removed.node_records = recovery.removed_node_records.len(),
        unreadable = recovery.unreadable.len(),
        duration_ms = started.elapsed().as_millis() as u64,
        "state recovered"
    );
    // Before any RPC: a file system a killed driver left frozen blocks its application.
    volumes.thaw_abandoned();
    Ok(volumes)
}

/// Runs a reconciliation round every `interval`, each on the blocking pool.
async fn reconcile_forever(
    domain: Arc<Volumes>,
    interval: std::time::Duration,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; recovery just ran
    loop {
        ticker.tick().await;
        let domain = Arc::clone(&domain);
        let round = tokio::task::spawn_blocking(move || domain.reconcile()).await;
        match round {
            Ok(Ok(report)) => {
                metrics.observe_reconcile(&report);
                tracing::debug!(
                    repaired = report.repaired.len(),
                    unrepairable = report.unrepairable.len(),
                    collected = report.collected.len(),
                    "reconciliation round done"
                );
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "reconciliation round failed"),
            Err(panicked) => tracing::error!(error = %panicked, "reconciliation round panicked"),
        }
    }
}

impl Driver {
    /// Starts the driver: state recovery runs in the background (Probe answers not-ready until
    /// it is done, and other RPCs wait for it), then reconciliation rounds every
    /// `--reconcile-interval` seconds.
    pub fn start(config: &Config, host: Arc<dyn Host>, state_dir_lock: LockFile) -> Arc<Self> {
        let metrics = crate::metrics::Metrics::new();
        let round_metrics = Arc::clone(&metrics);
        let (tx, rx) = watch::channel(Readiness::Starting);
        let state_dir = config.state_dir.clone();
        let interval = std::time::Duration::from_secs(config.reconcile_interval);
        let recovery_config = config.clone();
        let background = tokio::spawn(async move {
            let recovered =
                tokio::task::spawn_blocking(move || recover(&state_dir, host, &recovery_config))
                    .await;
            let next = match recovered {
                Ok(Ok(domain)) => Readiness::Ready(Arc::new(domain)),
                Ok(Err(err)) => Readiness::Failed(err.to_string()),
                Err(panicked) => Readiness::Failed(format!("recovery task failed: {panicked}")),
            };
            let domain = match &next {
                Readiness::Ready(domain) => Some(Arc::clone(domain)),
                _ => None,
            };
            let _ = tx.send(next);
            if let (Some(domain), false) = (domain, interval.is_zero()) {
                reconcile_forever(domain, interval, round_metrics).await;
            }
        });
        Arc::new(Driver {
            driver_name: config.driver_name.clone(),
            node_id: config.node_id.clone(),
            max_volumes_per_node: config.max_volumes_per_node,
            advertise_get_snapshot: !config.no_get_snapshot_capability,
            cbt_shape: crate::volume::metadata::Shape::from_block_size(
                "--cbt-block-size",
                config.cbt_block_size,
            )
            .unwrap_or(crate::volume::metadata::Shape::Variable),
            readiness: rx,
            token_key: std::collections::hash_map::RandomState::new(),
            background: background.abort_handle(),
            state_dir_lock: std::sync::Mutex::new(Some(state_dir_lock)),
            metrics,
        })
    }

    /// Stops the background work (recovery, reconciliation) at server shutdown, and releases
    /// the state dir's lock.
    pub fn stop_background(&self) {
        self.background.abort();
        drop(
            self.state_dir_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }

    /// `Some(true)` ready, `Some(false)` still recovering, `None` recovery failed (with why).
    pub fn probe(&self) -> std::result::Result<bool, String> {
        match &*self.readiness.borrow() {
            Readiness::Starting => Ok(false),
            Readiness::Ready(_) => Ok(true),
            Readiness::Failed(why) => Err(why.clone()),
        }
    }

    /// The domain if recovery is over, without waiting.
    pub fn ready_domain(&self) -> Option<Arc<Volumes>> {
        match &*self.readiness.borrow() {
            Readiness::Ready(domain) => Some(Arc::clone(domain)),
            _ => None,
        }
    }

    /// Resolves once recovery is over: the domain, or UNAVAILABLE when recovery failed.
    async fn domain(&self) -> Result<Arc<Volumes>> {
        let mut rx = self.readiness.clone();
        let state = rx
            .wait_for(|r| !matches!(r, Readiness::Starting))
            .await
            .map_err(|_| Error::NotReady)?
            .clone();
        match state {
            Readiness::Ready(domain) => Ok(domain),
            _ => Err(Error::NotReady),
        }
    }

    /// Runs one RPC: waits for recovery, runs `op` on the blocking pool inside `span`, logs the
    /// outcome once with its gRPC code and duration, and maps the error to a status.
    pub async fn run<T, F>(
        &self,
        rpc: Rpc,
        op: F,
    ) -> std::result::Result<tonic::Response<T>, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(&Volumes) -> Result<T> + Send + 'static,
    {
        let started = Instant::now();
        let work = async {
            let domain = self.domain().await?;
            let current = tracing::Span::current();
            tokio::task::spawn_blocking(move || current.in_scope(|| op(&domain)))
                .await
                .map_err(|e| Error::Internal(format!("operation task failed: {e}")))?
        };
        let result = work.instrument(rpc.span.clone()).await;
        self.finish(rpc, started, result)
    }

    /// Runs an RPC that needs no I/O and no recovered state (capabilities, plugin info).
    pub fn answer<T>(
        &self,
        rpc: Rpc,
        result: Result<T>,
    ) -> std::result::Result<tonic::Response<T>, tonic::Status> {
        self.finish(rpc, Instant::now(), result)
    }

    /// Logs the outcome once in the RPC's span, counts it in the metrics, and maps the error
    /// to a status (the one `From<Error> for Status`).
    fn finish<T>(
        &self,
        rpc: Rpc,
        started: Instant,
        result: Result<T>,
    ) -> std::result::Result<tonic::Response<T>, tonic::Status> {
        let elapsed = started.elapsed();
        let duration_us = elapsed.as_micros() as u64;
        let _entered = rpc.span.enter();
        let outcome = match result {
            Ok(reply) => {
                tracing::info!(grpc.code = "OK", duration_us, "done");
                Ok(tonic::Response::new(reply))
            }
            Err(err) => {
                // The status carries the bounded message; the log line shows the same.
                let status = tonic::Status::from(err);
                let (code, message) = (status.code(), status.message());
                if code == tonic::Code::Internal {
                    tracing::error!(grpc.code = ?code, duration_us, error = message, "failed");
                } else {
                    tracing::warn!(grpc.code = ?code, duration_us, error = message, "refused");
                }
                Err(status)
            }
        };
        let code = outcome
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.metrics
            .observe_rpc(rpc.method, code, elapsed.as_secs_f64());
        outcome
    }

    pub fn topology(&self) -> csi::Topology {
        csi::Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())]),
        }
    }

    /// Whether a topology segment names this node.
    pub fn is_this_node(&self, topology: &csi::Topology) -> bool {
        topology.segments.get(TOPOLOGY_KEY) == Some(&self.node_id)
    }

    /// A ListVolumes or ListSnapshots token: the last id returned, with a MAC only this
    /// process can make.
    fn issue_token<K: Kind>(&self, after: &Id<K>) -> String {
        format!("{after}.{:016x}", self.token_mac(after))
    }

    fn token_mac<K: Kind>(&self, id: &Id<K>) -> u64 {
        let mut hasher = self.token_key.build_hasher();
        hasher.write(id.to_string().as_bytes());
        hasher.finish()
    }

    /// Parses a token this process issued; anything else is ABORTED (spec).
    fn redeem_token<K: Kind>(&self, token: &str) -> Result<Option<Id<K>>> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || Error::InvalidToken {
            token: token.to_string(),
        };
        let (id, mac) = token.split_once('.').ok_or_else(invalid)?;
        let id = Id::parse(id).ok_or_else(invalid)?;
        let mac = u64::from_str_radix(mac, 16).map_err(|_| invalid())?;
        if mac != self.token_mac(&id) {
            return Err(invalid());
        }
        Ok(Some(id))
    }
}

/// The span of one RPC.
#[macro_export]
macro_rules! rpc_span {
    ($method:literal) => {
        $crate::service::Rpc::new($method, tracing::info_span!("rpc", rpc.method = $method))
    };
    ($method:literal, $id:expr) => {
        $crate::service::Rpc::new(
            $method,
            tracing::info_span!("rpc", rpc.method = $method, volume.id = %$crate::error::shown($id)),
        )
    };
}

/// One RPC: its method name (for metrics) and its tracing span.
pub struct Rpc {
    method: &'static str,
    span: tracing::Span,
}

impl Rpc {
    pub fn new(method: &'static str, span: tracing::Span) -> Self {
        Rpc { method, span }
    }
}

// ---- request parsing shared by the services ----

/// A required string field: INVALID_ARGUMENT naming it when empty.
pub fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        Err(Error::invalid(field, "is required"))
    } else {
        Ok(value)
    }
}

/// A volume id from a request: required, and NOT_FOUND when it is not one this driver issued
/// (an id of the wrong shape names no volume; it is never used as a path).
pub fn volume_id(field: &'static str, value: &str) -> Result<VolumeId> {
    object_id(field, value)
}

/// A snapshot id from a request, like `volume_id`.
pub fn snapshot_id(field: &'static str, value: &str) -> Result<SnapshotId> {
    object_id(field, value)
}

fn object_id<K: Kind>(field: &'static str, value: &str) -> Result<Id<K>> {
    required(field, value)?;
    Id::parse(value).ok_or_else(|| Error::NotFound {
        what: K::WHAT,
        id: shown(value),
    })
}

/// Why a VolumeCapability cannot be used.
pub enum CapabilityError {
    /// A required part is missing: INVALID_ARGUMENT everywhere.
    Malformed(Error),
    /// Well-formed but not something loopcsi serves (a multi-node mode, another fs type):
    /// INVALID_ARGUMENT on create, "not confirmed" on validation, zero capacity on GetCapacity.
    Unsupported(Error),
}

impl From<CapabilityError> for Error {
    fn from(err: CapabilityError) -> Self {
        match err {
            CapabilityError::Malformed(e) | CapabilityError::Unsupported(e) => e,
        }
    }
}

/// Parses one CSI VolumeCapability (`field` names it in errors, e.g. `volume_capabilities[1]`).
pub fn capability(
    field: &'static str,
    cap: &csi::VolumeCapability,
    volumes: Option<&Volumes>,
) -> std::result::Result<Capability, CapabilityError> {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::AccessType;
    let malformed = |why: &str| CapabilityError::Malformed(Error::invalid(field, why.to_string()));
    let unsupported = |why: String| CapabilityError::Unsupported(Error::invalid(field, why));
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| malformed("access_mode is required"))?
        .mode;
    let access = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) => return Err(malformed("access_mode.mode is required (UNKNOWN given)")),
        Ok(other) => {
            return Err(unsupported(format!(
                "access_mode.mode {} is not supported: loopcsi volumes are local to one node",
                other.as_str_name()
            )))
        }
        Err(_) => {
            return Err(unsupported(format!(
                "access_mode.mode {mode} is not a known mode"
            )))
        }
    };
    let kind = match cap.access_type.as_ref() {
        None => return Err(malformed("access_type (mount or block) is required")),
        Some(AccessType::Block(_)) => AccessKind::Block,
        Some(AccessType::Mount(mount)) => {
            let fs = match mount.fs_type.as_str() {
                "" => None,
                name => Some(FsType::from_name(name).ok_or_else(|| {
                    unsupported(format!(
                        "mount.fs_type {} is not supported (use {})",
                        shown(name),
                        FsType::choices()
                    ))
                })?),
            };
            if let (Some(fs), Some(volumes)) = (fs, volumes) {
                if !volumes.supports(fs) {
                    return Err(unsupported(format!(
                        "mount.fs_type {} is not available: its mkfs is not installed on this node",
                        fs.name()
                    )));
                }
            }
            if !mount.volume_mount_group.is_empty() {
                return Err(unsupported(
                    "mount.volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not advertised)".into(),
                ));
            }
            let flags = MountFlags::parse(mount.mount_flags.clone()).map_err(|why| {
                CapabilityError::Malformed(Error::invalid(
                    field,
                    format!("mount.mount_flags: {why}"),
                ))
            })?;
            AccessKind::Mount { fs, flags }
        }
    };
    Ok(Capability { access, kind })
}

/// A required single capability (NodeStage/NodePublish `volume_capability`).
pub fn required_capability(
    cap: Option<&csi::VolumeCapability>,
    volumes: &Volumes,
) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::invalid("volume_capability", "is required"))?;
    Ok(capability("volume_capability", cap, Some(volumes))?)
}
