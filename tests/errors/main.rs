//! Every error case of every RPC the driver serves: the exact gRPC code, and a message that
//! names the offending field or value (CSI v1.12 spec and what csi-sanity asserts).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod controller_capabilities;
mod create_volume;
mod delete_and_validate;
mod identity;
mod list_and_capacity;
mod node_publish;
mod node_stage;
mod node_unpublish_stats_info;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use common::*;
use loopcsi::csi;
use loopcsi::csi::volume_capability::access_mode::Mode;
use tonic::Code;

const GIB: i64 = 1 << 30;
const TOPOLOGY_KEY: &str = "topology.loopcsi.dev/node";

// ---- helpers ----

/// A well-formed volume id that names no volume.
fn random_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Asserts a tonic result failed with `code` and that the message mentions every needle.
#[track_caller]
fn assert_err<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needles: &[&str]) {
    match result {
        Ok(v) => panic!("expected {code:?} mentioning {needles:?}, got OK {v:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "wrong code; message: {}",
                status.message()
            );
            for needle in needles {
                assert!(
                    status.message().contains(needle),
                    "message {:?} does not mention {needle:?}",
                    status.message()
                );
            }
        }
    }
}

fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.to_string())]),
    }
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn exact_range(bytes: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: bytes,
        limit_bytes: bytes,
    })
}

fn range(required_bytes: i64, limit_bytes: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes,
        limit_bytes,
    })
}

/// Creates a volume that must succeed and returns its id.
async fn new_volume(
    d: &mut TestDriver,
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> String {
    d.create(create_req(name, bytes, cap))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"))
        .volume_id
}

async fn capacity(d: &mut TestDriver, req: csi::GetCapacityRequest) -> csi::GetCapacityResponse {
    d.controller.get_capacity(req).await.unwrap().into_inner()
}

async fn list(
    d: &mut TestDriver,
    max_entries: i32,
    starting_token: &str,
) -> Result<csi::ListVolumesResponse, tonic::Status> {
    d.controller
        .list_volumes(csi::ListVolumesRequest {
            max_entries,
            starting_token: starting_token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn stage_req(
    id: &str,
    staging: &str,
    cap: Option<csi::VolumeCapability>,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: cap,
        ..Default::default()
    }
}

fn publish_req(
    id: &str,
    staging: &str,
    target: &str,
    cap: Option<csi::VolumeCapability>,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: cap,
        ..Default::default()
    }
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// Mount points at exactly `path`.
fn mounts_at(path: &Path) -> usize {
    loopcsi::host::mount::mounts()
        .unwrap()
        .iter()
        .filter(|m| m.mount_point == path)
        .count()
}

/// Free bytes of the file system holding the driver's pool.
fn pool_free(d: &TestDriver) -> i64 {
    let st = nix::sys::statvfs::statvfs(&d.state_dir().join("volumes")).unwrap();
    i64::try_from(st.blocks_available() * st.fragment_size()).unwrap()
}

/// Every path below `dir`, relative to it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(next) = todo.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                todo.push(path);
            }
        }
    }
    out
}
