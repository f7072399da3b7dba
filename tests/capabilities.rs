//! `serve --no-get-snapshot-capability`: ControllerGetCapabilities leaves GET_SNAPSHOT out (for
//! sidecars on csi-lib-utils v0.20.0 with a CSI spec older than v1.12, which crash on the enum
//! value), lists everything else as before, and GetSnapshot is still served. Without the flag,
//! GET_SNAPSHOT is listed. The config is parsed from the command line, as the DaemonSet passes it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use clap::Parser;
use common::Scratch;
use loopcsi::config::{Cli, Command, Config};
use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::controller_service_capability::rpc::Type;

fn serve_config(root: &Path, extra: &[&str]) -> Config {
    let endpoint = format!("unix://{}", root.join("csi.sock").display());
    let state_dir = root.join("state").display().to_string();
    let mut args = vec![
        "loopcsi",
        "serve",
        "--endpoint",
        &endpoint,
        "--node-id",
        common::NODE,
        "--state-dir",
        &state_dir,
        "--reconcile-interval",
        "0",
    ];
    args.extend_from_slice(extra);
    match Cli::try_parse_from(args).unwrap().command {
        Command::Serve(config) => config,
        other => panic!("not serve: {other:?}"),
    }
}

/// The controller capabilities a driver started with `extra` flags advertises, and the code of
/// its answer to GetSnapshot for a snapshot that does not exist.
async fn capabilities_with(extra: &[&str]) -> (Vec<Type>, tonic::Code) {
    let scratch = Scratch::new();
    let config = serve_config(scratch.path(), extra);
    let server = loopcsi::server::bind(&config).expect("bind");
    let socket = server.socket().to_path_buf();
    let (shutdown, task) = common::serve_in_background(server);
    let mut controller = ControllerClient::new(common::connect(socket).await);
    let caps = controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => {
                Type::try_from(r.r#type).unwrap()
            }
            other => panic!("unexpected controller capability {other:?}"),
        })
        .collect();
    let get = controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .map(drop)
        .map_or_else(|s| s.code(), |()| tonic::Code::Ok);
    let _ = shutdown.send(());
    task.await.unwrap();
    (caps, get)
}

const ALWAYS: [Type; 9] = [
    Type::CreateDeleteVolume,
    Type::ListVolumes,
    Type::GetCapacity,
    Type::SingleNodeMultiWriter,
    Type::CreateDeleteSnapshot,
    Type::ListSnapshots,
    Type::CloneVolume,
    Type::GetVolume,
    Type::VolumeCondition,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_snapshot_is_advertised_by_default() {
    let (caps, get) = capabilities_with(&[]).await;
    let mut want = ALWAYS.to_vec();
    want.insert(6, Type::GetSnapshot);
    assert_eq!(caps, want);
    assert_eq!(get, tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_get_snapshot_capability_leaves_only_get_snapshot_out() {
    let (caps, get) = capabilities_with(&["--no-get-snapshot-capability"]).await;
    assert_eq!(caps, ALWAYS.to_vec());
    // Not advertised, still served: a CO that calls it anyway gets a real answer.
    assert_eq!(get, tonic::Code::NotFound);
}
