//! The unix-socket gRPC server: socket setup (stale socket replaced, mode 0660), the three CSI
//! services, and graceful shutdown (stop accepting, let in-flight RPCs finish, remove the socket).

use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

use crate::authority::AuthorityFix;

use crate::config::Config;
use crate::csi::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
    snapshot_metadata_server::SnapshotMetadataServer,
};
use crate::error::{Error, Result};
use crate::host::linux::Linux;
use crate::host::os::Host;
use crate::host::tools::Tools;
use crate::service::{
    controller::ControllerService, group::GroupControllerService, identity::IdentityService,
    node::NodeService, snapshot_metadata::SnapshotMetadataService, Driver,
};

/// A bound socket, ready to serve: a client may connect as soon as this exists.
pub struct BoundServer {
    listener: UnixListener,
    socket: PathBuf,
    driver: Arc<Driver>,
    metrics: Option<std::net::TcpListener>,
}

/// Validates the config, finds the external tools (fails fast when one is missing), binds the
/// socket and starts state recovery.
pub fn bind(config: &Config) -> Result<BoundServer> {
    config.validate()?;
    let tools = Tools::discover()?.with_timeout(config.tool_timeout());
    let host: Arc<dyn Host> = Arc::new(Linux::new(tools));
    let state_dir_lock = crate::volume::statedir::claim_for_driver(
        &*host,
        &config.state_dir,
        &config.node_id,
        config.allow_node_id_change,
    )?;
    let socket = config.socket_path()?;
    check_socket_path_length(&socket)?;
    remove_stale_socket(&socket)?;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    }
    let listener = bind_private(&socket)?;
    let metrics = config
        .metrics_address
        .map(|addr| {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| Error::io("bind metrics address", addr.to_string(), e));
            if listener.is_err() {
                let _ = std::fs::remove_file(&socket);
            }
            listener
        })
        .transpose()?;
    let driver = Driver::start(config, host, state_dir_lock);
    Ok(BoundServer {
        listener,
        socket,
        driver,
        metrics,
    })
}

/// The longest socket path the kernel binds or connects to: `sun_path` is 108 bytes with its
/// terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A socket path no client could connect to is refused up front, naming the flag.
fn check_socket_path_length(socket: &Path) -> Result<()> {
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::invalid(
            "--endpoint",
            format!(
                "{} is {len} bytes; a unix socket path can be at most {MAX_SOCKET_PATH} bytes \
                 (the kernel's sun_path)",
                socket.display()
            ),
        ));
    }
    Ok(())
}

/// Binds the socket inside a fresh 0700 directory beside it, sets its mode to 0660, and renames
/// it into place: at no instant can anyone else connect to a socket with looser permissions,
/// whatever the process umask.
fn bind_private(socket: &Path) -> Result<UnixListener> {
    let parent = socket.parent().unwrap_or(Path::new("/"));
    let private = parent.join(format!(".loopcsi-bind-{}", uuid::Uuid::new_v4()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| Error::io("create directory", &private, e))?;
    let result = (|| {
        // The private dir's own path is ~60 bytes longer than the endpoint's and would overflow
        // sun_path for any endpoint longer than ~47 bytes (MicroK8s's plugin dir is 61), so the
        // socket is bound through the dir's descriptor: /proc/self/fd/N/csi.sock is short
        // whatever the dir's path, and names the very dir created above.
        let dir = std::fs::File::open(&private).map_err(|e| Error::io("open", &private, e))?;
        let staged = PathBuf::from(format!("/proc/self/fd/{}/csi.sock", dir.as_raw_fd()));
        let listener = UnixListener::bind(&staged).map_err(|e| Error::io("bind", &staged, e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| Error::io("chmod", &staged, e))?;
        std::fs::rename(&staged, socket).map_err(|e| Error::io("rename", &staged, e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// A socket file left by a driver that died is replaced; a live one (something answers) or a
/// file that is not a socket is left alone and reported.
fn remove_stale_socket(socket: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", socket, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::invalid(
            "--endpoint",
            format!(
                "{} exists and is not a socket; not replacing it",
                socket.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(Error::invalid(
            "--endpoint",
            format!("{} is being served by another process", socket.display()),
        ));
    }
    std::fs::remove_file(socket).map_err(|e| Error::io("remove stale socket", socket, e))
}

impl BoundServer {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bound metrics address (useful with port 0).
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains in-flight RPCs and removes the socket.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let BoundServer {
            listener,
            socket,
            driver,
            metrics,
        } = self;
        let metrics_task = match metrics {
            Some(listener) => {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| Error::io("listen", "metrics address", e))?;
                tracing::info!(address = ?listener.local_addr().ok(), "serving metrics at /metrics");
                Some(tokio::spawn(serve_metrics(listener, Arc::clone(&driver))))
            }
            None => None,
        };
        tracing::info!(socket = %socket.display(), "listening");
        let result = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(IdentityService::new(Arc::clone(
                &driver,
            ))))
            .add_service(ControllerServer::new(ControllerService::new(Arc::clone(
                &driver,
            ))))
            .add_service(NodeServer::new(NodeService::new(Arc::clone(&driver))))
            .add_service(GroupControllerServer::new(GroupControllerService::new(
                Arc::clone(&driver),
            )))
            // Changed-block tracking, on the same socket: the external-snapshot-metadata
            // sidecar dials the driver's CSI socket.
            .add_service(SnapshotMetadataServer::new(SnapshotMetadataService::new(
                Arc::clone(&driver),
            )))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityFix::new)),
                shutdown,
            )
            .await;
        driver.stop_background();
        if let Some(task) = metrics_task {
            task.abort();
        }
        let _ = std::fs::remove_file(&socket);
        tracing::info!(socket = %socket.display(), "stopped");
        result.map_err(Error::Server)
    }
}

/// Serves GET /metrics over HTTP/1.1: counters from the RPC path, gauges read from the pool and
/// the kernel at scrape time (on the blocking pool). Anything else is 404.
async fn serve_metrics(listener: tokio::net::TcpListener, driver: Arc<Driver>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let driver = Arc::clone(&driver);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let driver = Arc::clone(&driver);
                    async move {
                        let response = if request.method() == hyper::Method::GET
                            && request.uri().path() == "/metrics"
                        {
                            let inventory = match driver.ready_domain() {
                                Some(domain) => {
                                    tokio::task::spawn_blocking(move || domain.inventory())
                                        .await
                                        .ok()
                                        .and_then(|r| {
                                            r.inspect_err(
                                                |e| tracing::warn!(error = %e, "metrics inventory"),
                                            )
                                            .ok()
                                        })
                                }
                                None => None,
                            };
                            hyper::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(
                                    driver.metrics.render(inventory.as_ref()),
                                )))
                        } else {
                            hyper::Response::builder()
                                .status(hyper::StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(
                                    b"not found; metrics are at /metrics\n",
                                )))
                        };
                        response
                    }
                },
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %err, "metrics connection");
            }
        });
    }
}

/// Installs the SIGTERM and SIGINT handlers now (so a signal that arrives right after the
/// socket is bound is a graceful shutdown, not the default kill) and returns the future that
/// resolves when one arrives. Call it before `bind`.
pub fn termination_signal() -> Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| Error::SignalHandler {
            signal: name,
            source,
        })
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}
