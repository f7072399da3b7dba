//! Clients other than tonic and endpoints other than the fixture's short one: the socket must
//! serve every standard gRPC client (Python grpcio sends the socket path as `:authority`; some
//! clients send none), and any endpoint path the kernel accepts (up to 107 bytes, e.g. under
//! MicroK8s's 61-byte kubelet plugin dir), still 0660 from its first instant.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::Scratch;
use loopcsi::config::Config;
use loopcsi::csi;
use loopcsi::csi::identity_client::IdentityClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pinned grpcio version .ci/run installs.
const GRPCIO: &str = "grpcio==1.85.1";

fn config(endpoint: &Path, state_dir: PathBuf) -> Config {
    common::config_for(endpoint, state_dir)
}

/// A driver serving `socket` until dropped (its shutdown then awaited by `stop`).
struct Served {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    /// Binds (the socket exists when this returns: no waiting for readiness) and serves.
    fn start(socket: &Path, state_dir: PathBuf) -> Self {
        let server = loopcsi::server::bind(&config(socket, state_dir)).expect("bind");
        let (shutdown, task) = common::serve_in_background(server);
        Served {
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A failing test still stops its server (the socket is removed by `serve`).
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn probe_and_plugin_name(socket: &Path) -> String {
    let mut identity = IdentityClient::new(common::connect(socket.to_path_buf()).await);
    identity.probe(csi::ProbeRequest {}).await.unwrap();
    identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .name
}

fn assert_socket_0660(socket: &Path) {
    let meta = std::fs::symlink_metadata(socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
}

/// A directory under `scratch` such that `<dir>/csi.sock` is exactly `len` bytes.
fn socket_of_length(scratch: &Path, len: usize) -> PathBuf {
    let base = scratch.join("d");
    let pad = len - base.as_os_str().len() - "/csi.sock".len();
    let dir = PathBuf::from(format!("{}{}", base.display(), "x".repeat(pad)));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("csi.sock");
    assert_eq!(socket.as_os_str().len(), len);
    socket
}

// ---- item 9: long endpoints ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_byte_endpoint_and_the_107_byte_limit_are_served() {
    let scratch = Scratch::new();
    for len in [100, 107] {
        let socket = socket_of_length(scratch.path(), len);
        let served = Served::start(&socket, scratch.path().join(format!("state{len}")));
        assert_socket_0660(&socket);
        assert_eq!(probe_and_plugin_name(&socket).await, "loopcsi.dev");
        served.stop().await;
        assert!(!socket.exists(), "the socket is removed on shutdown");
        let left: Vec<_> = std::fs::read_dir(socket.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "no private bind dir left behind: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_microk8s_plugin_dir_is_served() {
    let scratch = Scratch::new();
    let dir = scratch
        .path()
        .join("var/snap/microk8s/common/var/lib/kubelet/plugins/loopcsi.dev");
    assert!(dir.as_os_str().len() > 61);
    let socket = dir.join("csi.sock");
    let served = Served::start(&socket, scratch.path().join("state"));
    assert_socket_0660(&socket);
    assert_eq!(probe_and_plugin_name(&socket).await, "loopcsi.dev");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_over_107_bytes_is_refused_naming_the_flag() {
    let scratch = Scratch::new();
    let socket = socket_of_length(scratch.path(), 108);
    let err = loopcsi::server::bind(&config(&socket, scratch.path().join("state")))
        .err()
        .expect("a 108-byte socket path is refused");
    let message = err.to_string();
    assert!(
        message.contains("--endpoint") && message.contains("108 bytes") && message.contains("107"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_dir(socket.parent().unwrap()).unwrap().count(),
        0,
        "nothing was made"
    );
}

// ---- item 10: clients that send other :authority values ----

/// Calls Probe and GetPluginInfo with Python grpcio's generic API (no generated code: the
/// requests are empty messages, and the reply's field 1 is read by hand) and prints the name.
const PYTHON_CLIENT: &str = r#"
import sys
import grpc

target, authority = sys.argv[1], sys.argv[2]
options = [("grpc.default_authority", authority)] if authority else []
same = lambda b: b
with grpc.insecure_channel(target, options=options) as channel:
    call = lambda method: channel.unary_unary(
        "/csi.v1.Identity/" + method, request_serializer=same, response_deserializer=same
    )(b"", timeout=300)
    call("Probe")
    reply = call("GetPluginInfo")
    # GetPluginInfoResponse.name is field 1, length-delimited (tag 0x0a); names are < 128 bytes.
    assert reply[0] == 0x0A and reply[1] < 128, reply
    print("name=" + reply[2 : 2 + reply[1]].decode())
"#;

fn require_grpcio() {
    let found = std::process::Command::new("python3")
        .args(["-m", "pip", "show", "--quiet", "grpcio"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "tests/clients.rs needs Python grpcio: `python3 -m pip install {GRPCIO}` (.ci/run does)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_clients_are_served() {
    require_grpcio();
    let scratch = Scratch::new();
    let socket = scratch.path().join("csi.sock");
    let served = Served::start(&socket, scratch.path().join("state"));
    let script = scratch.path().join("client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    let path = socket.display();
    // (target, default authority override): grpcio sends the socket path as :authority for the
    // first two; the last sends what grpc-go sends, as a control.
    for (target, authority) in [
        (format!("unix://{path}"), ""),
        (format!("unix:{path}"), ""),
        (format!("unix://{path}"), "localhost"),
    ] {
        // The client blocks; the server keeps running on the runtime's workers meanwhile.
        let (script, args) = (script.clone(), [target.clone(), authority.to_string()]);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg(script)
                .args(args)
                .output()
        })
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim() == "name=loopcsi.dev",
            "grpcio with {target} authority {authority:?}: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    served.stop().await;
}

/// One HTTP/2 frame as raw bytes.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Makes one unary call by writing HTTP/2 frames by hand, with the `:authority` given (none
/// when `None`), and returns the response's headers and trailers, or the RST_STREAM code.
async fn raw_call(
    socket: &Path,
    authority: Option<&[u8]>,
    path: &[u8],
    message: &[u8],
) -> Result<Vec<(String, String)>, u32> {
    let mut conn = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
    ];
    if let Some(authority) = authority {
        headers.push((b":authority", authority));
    }
    headers.push((b"content-type", b"application/grpc"));
    headers.push((b"te", b"trailers"));
    let mut block = Vec::new();
    for (name, value) in headers {
        loopcsi::authority::encode_literal(name, value, &mut block);
    }
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    out.extend(frame(0x0, 0x1, 1, &body)); // DATA, END_STREAM
    conn.write_all(&out).await.unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut fields = Vec::new();
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.unwrap();
        match kind {
            0x4 if flags & 0x1 == 0 => conn.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
            0x3 => return Err(u32::from_be_bytes(payload[..4].try_into().unwrap())),
            0x1 => {
                assert_ne!(flags & 0x4, 0, "the server's headers fit one frame");
                for (name, value) in decoder.decode(&payload).unwrap() {
                    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
                    fields.push((text(name), text(value)));
                }
                if flags & 0x1 != 0 {
                    return Ok(fields);
                }
            }
            _ => {}
        }
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_or_missing_authority_is_served() {
    let scratch = Scratch::new();
    let socket = scratch.path().join("csi.sock");
    let served = Served::start(&socket, scratch.path().join("state"));
    let path_authority = socket.display().to_string();
    for authority in [
        Some(path_authority.as_bytes()),
        None,
        Some(b"".as_slice()),
        Some(b"localhost".as_slice()),
    ] {
        let shown = authority.map(String::from_utf8_lossy);
        let reply = raw_call(&socket, authority, b"/csi.v1.Identity/GetPluginInfo", b"")
            .await
            .unwrap_or_else(|code| panic!("authority {shown:?}: RST_STREAM code {code}"));
        assert_eq!(
            field(&reply, "grpc-status"),
            Some("0"),
            "authority {shown:?}: {reply:?}"
        );
    }
    served.stop().await;
}

// ---- item 11: a request that is not a valid message ----

/// A string field that is not UTF-8 fails in decoding, before any handler: INVALID_ARGUMENT
/// naming the field (tonic-prost alone says INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_string_field_is_an_invalid_argument() {
    let scratch = Scratch::new();
    let socket = scratch.path().join("csi.sock");
    let served = Served::start(&socket, scratch.path().join("state"));
    // NodePublishVolumeRequest { volume_id (1): "v", target_path (4): 0xff 0xfe }.
    let message = [0x0a, 1, b'v', 0x22, 2, 0xff, 0xfe];
    let reply = raw_call(
        &socket,
        Some(b"localhost"),
        b"/csi.v1.Node/NodePublishVolume",
        &message,
    )
    .await
    .unwrap_or_else(|code| panic!("RST_STREAM code {code}"));
    assert_eq!(field(&reply, "grpc-status"), Some("3"), "{reply:?}");
    let message = field(&reply, "grpc-message").unwrap_or_default();
    assert!(message.contains("target_path"), "{message}");
    served.stop().await;
}
