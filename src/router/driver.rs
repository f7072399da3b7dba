//! Asks the driver on this node, over its CSI socket as the sidecars do, whether it holds a
//! volume (ControllerGetVolume) or a snapshot (GetSnapshot). Each node's driver knows only its
//! own pool, so OK means "on this node" and NOT_FOUND "not here" (an id it cannot parse is
//! NOT_FOUND too); any other answer, or no answer, is unknown and decides nothing. Never a
//! guess from the id's form.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

use super::decide::{Handle, Locality};
use crate::csi;
use crate::csi::controller_client::ControllerClient;

/// How long one question may take: the driver answers from memory and its pool's metadata.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// A lazily connected client of the driver's socket; it reconnects by itself when the driver
/// restarts.
#[derive(Clone)]
pub struct Driver {
    client: ControllerClient<Channel>,
}

impl Driver {
    /// A client of the socket at `socket` (connected at the first question, so the router may
    /// start before the driver).
    pub fn new(socket: PathBuf) -> Self {
        // The authority is never used for routing on a unix socket; a name that is not a host
        // keeps it from being mistaken for one.
        let channel = Endpoint::from_static("http://loopcsi.invalid")
            .timeout(ASK_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }));
        Self {
            client: ControllerClient::new(channel),
        }
    }

    /// Where `handle` is, as far as this node's driver knows.
    pub async fn locate(&self, handle: &Handle) -> Locality {
        let mut client = self.client.clone();
        let answer = match handle {
            Handle::Volume(id) => client
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: id.clone(),
                })
                .await
                .map(drop),
            Handle::Snapshot(id) => client
                .get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        };
        locality(answer)
    }
}

/// The CSI answer as a locality (see the module doc).
fn locality(answer: Result<(), tonic::Status>) -> Locality {
    match answer {
        Ok(()) => Locality::Here,
        Err(status) if status.code() == Code::NotFound => Locality::NotHere,
        Err(status) => Locality::Unknown(format!("{:?}: {}", status.code(), status.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ok_and_not_found_decide() {
        assert_eq!(locality(Ok(())), Locality::Here);
        assert_eq!(
            locality(Err(tonic::Status::not_found("no volume"))),
            Locality::NotHere
        );
        let unknown = locality(Err(tonic::Status::unavailable("connection refused")));
        assert!(
            matches!(unknown, Locality::Unknown(ref m) if m.contains("Unavailable") && m.contains("refused"))
        );
        assert!(matches!(
            locality(Err(tonic::Status::invalid_argument("x"))),
            Locality::Unknown(_)
        ));
    }
}
