//! The unix-socket gRPC server: socket setup (stale socket replaced, mode 0660), the three CSI
//! services, and graceful shutdown (stop accepting, let in-flight RPCs finish, remove the socket).

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::csi::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use crate::error::{Error, Result};
use crate::host::tools::Tools;
use crate::service::{
    controller::ControllerService, identity::IdentityService, node::NodeService, Driver,
};

/// A bound socket, ready to serve: a client may connect as soon as this exists.
pub struct BoundServer {
    listener: UnixListener,
    socket: PathBuf,
    driver: Arc<Driver>,
}

/// Validates the config, finds the external tools (fails fast when one is missing), binds the
/// socket and starts state recovery.
pub fn bind(config: &Config) -> Result<BoundServer> {
    config.validate()?;
    let tools = Tools::discover()?;
    let socket = config.socket_path()?;
    remove_stale_socket(&socket)?;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    }
    let listener = UnixListener::bind(&socket).map_err(|e| Error::io("bind", &socket, e))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io("chmod", &socket, e))?;
    let driver = Driver::start(config, tools);
    Ok(BoundServer {
        listener,
        socket,
        driver,
    })
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

    /// Serves until `shutdown` resolves, then drains in-flight RPCs and removes the socket.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let BoundServer {
            listener,
            socket,
            driver,
        } = self;
        tracing::info!(socket = %socket.display(), "listening");
        let result = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(IdentityService::new(Arc::clone(
                &driver,
            ))))
            .add_service(ControllerServer::new(ControllerService::new(Arc::clone(
                &driver,
            ))))
            .add_service(NodeServer::new(NodeService::new(driver)))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await;
        let _ = std::fs::remove_file(&socket);
        tracing::info!(socket = %socket.display(), "stopped");
        result.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; serve until then.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
