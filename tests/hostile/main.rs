//! Hostile input through the real gRPC server: path-like, NUL-carrying, oversized and unicode
//! ids, names, fs types, mount flags, paths and sizes, for every RPC that takes them.
//!
//! Each must get a bounded, clear gRPC error with the right code (or, for legal CSI names, be
//! kept as an opaque name), the server must keep serving, nothing outside the test's dir may be
//! touched, and no tool may run through a shell. Each test collects every violation it sees
//! and reports them together, so one run lists all of them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod fs_types_and_mount_flags;
mod names;
mod no_shell;
mod parameters;
mod paths;
mod snapshot_names;
mod volume_ids;
mod volume_paths_and_sizes;

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use common::*;
use loopcsi::csi;
use loopcsi::error::shown;
use loopcsi::volume::id::VolumeId;
use tonic::Code;

/// Every error message must stay under this, whatever the size of the input.
const MAX_MESSAGE: usize = 1024;
const HUNDRED_KB: usize = 100 * 1024;
const PWNED: &str = "/tmp/pwned";

// ---- helpers ----

/// The violations one test found; reported all at once at the end.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    /// `result` must fail with one of `codes`, with a bounded message naming every needle.
    #[track_caller]
    fn refused<T: Debug>(
        &mut self,
        what: &str,
        result: Result<T, tonic::Status>,
        codes: &[Code],
        needles: &[&str],
    ) {
        match result {
            Ok(reply) => self.0.push(format!(
                "{what}: expected {codes:?}, got OK {}",
                shown(&format!("{reply:?}"))
            )),
            Err(status) => self.message(what, &status, codes, needles),
        }
    }

    fn message(&mut self, what: &str, status: &tonic::Status, codes: &[Code], needles: &[&str]) {
        let message = status.message();
        if !codes.contains(&status.code()) {
            self.0.push(format!(
                "{what}: expected {codes:?}, got {:?}: {}",
                status.code(),
                shown(message)
            ));
        }
        if message.len() >= MAX_MESSAGE {
            self.0.push(format!(
                "{what}: the message is {} bytes (unbounded): {}",
                message.len(),
                shown(message)
            ));
        }
        for needle in needles {
            if !message.contains(needle) {
                self.0.push(format!(
                    "{what}: message {} does not name {needle:?}",
                    shown(message)
                ));
            }
        }
    }

    /// `result` must succeed.
    fn ok<T>(&mut self, what: &str, result: Result<T, tonic::Status>) -> Option<T> {
        match result {
            Ok(reply) => Some(reply),
            Err(status) => {
                self.0.push(format!(
                    "{what}: expected OK, got {:?}: {}",
                    status.code(),
                    shown(status.message())
                ));
                None
            }
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    #[track_caller]
    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} violation(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// Every path under `dir`, relative to it (symlinks are not followed).
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
    out.sort();
    out
}

/// Mount points at or under `path`.
fn mounts_under(path: &Path) -> Vec<PathBuf> {
    loopcsi::host::mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(path))
        .map(|m| m.mount_point)
        .collect()
}

fn is_mount_point(path: &Path) -> bool {
    loopcsi::host::mount::mounts()
        .unwrap()
        .iter()
        .any(|m| m.mount_point == path)
}

/// The state dir holds nothing but `volumes/<id>.{img,json}`, `snapshots/<id>.{img,json}`,
/// `node/<id>/` records and the driver's fixed files (`lock`, `node-id`), so no name, id or path from a request ever became a path there. Returns the
/// volume ids it names.
fn check_state_dir(d: &TestDriver, findings: &mut Findings) -> HashSet<String> {
    let mut ids = HashSet::new();
    for rel in walk(&d.state_dir()) {
        let text = rel.display().to_string();
        // The driver's own fixed names: its directories, the state dir's lock (one driver per
        // state dir) and the node id it was first served under.
        if ["volumes", "node", "snapshots", "frozen", "lock", "node-id"].contains(&text.as_str()) {
            continue;
        }
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let ok = match parts.as_slice() {
            [dir, file] if dir == "volumes" || dir == "snapshots" => {
                let stem = file
                    .strip_suffix(".json")
                    .or_else(|| file.strip_suffix(".img"));
                stem.filter(|stem| VolumeId::parse(stem).is_some())
                    .map(|stem| {
                        if dir != "snapshots" {
                            ids.insert(stem.to_string());
                        }
                    })
                    .is_some()
            }
            // frozen/<volume id>.json records a freeze in flight (frozen/<id>.mnt its thaw).
            [dir, file] if dir == "frozen" => file
                .strip_suffix(".json")
                .or_else(|| file.strip_suffix(".mnt"))
                .is_some_and(|stem| VolumeId::parse(stem).is_some()),
            // node/<volume id>/ holds staged.json and target-<16 hex>.json records.
            [dir, id] if dir == "node" => VolumeId::parse(id)
                .map(|_| ids.insert(id.clone()))
                .is_some(),
            [dir, id, file] if dir == "node" => {
                let hex = file
                    .strip_prefix("target-")
                    .and_then(|f| f.strip_suffix(".json"));
                VolumeId::parse(id).is_some()
                    && (file == "staged.json"
                        || hex.is_some_and(|h| {
                            h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit())
                        }))
            }
            _ => false,
        };
        findings.check(ok, || {
            format!(
                "the state dir holds {} which is not named by a volume id",
                shown(&text)
            )
        });
    }
    ids
}

fn no_shell_ran(root: &Path, findings: &mut Findings) {
    for path in [PathBuf::from(PWNED), root.join("pwned")] {
        findings.check(!path.exists(), || {
            format!("{} exists: a shell ran hostile input", path.display())
        });
    }
}

/// The server still answers: Probe is ready, and a normal CreateVolume/DeleteVolume works.
async fn still_serving(d: &mut TestDriver) {
    let probe = d
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .expect("Probe after hostile input")
        .into_inner();
    assert_eq!(probe.ready, Some(true), "ready after hostile input");
    let name = format!("after-hostile-{}", uuid::Uuid::new_v4());
    let vol = d
        .create(create_req(&name, 16 * MIB, mount_cap("ext4", snw())))
        .await
        .expect("a normal CreateVolume after hostile input");
    d.delete(&vol.volume_id)
        .await
        .expect("a normal DeleteVolume after hostile input");
}

/// Volume ids a CO (or an attacker speaking gRPC) might send, several built around a real id.
fn hostile_ids(real: &str) -> Vec<String> {
    vec![
        "../".into(),
        "../../etc/passwd".into(),
        "/etc/passwd".into(),
        "..".into(),
        ".".into(),
        "a\0b".into(),
        "\0".into(),
        "id\nwith\nnewlines".into(),
        "\n".into(),
        "\u{202e}dwssap/cte/".into(),
        "\u{200b}".into(),
        "x".repeat(HUNDRED_KB),
        "../".repeat(HUNDRED_KB / 3),
        format!("{real}\u{200b}"),
        format!("\u{202e}{real}"),
        format!("../{real}"),
        format!("{real}/../{real}"),
        format!("volumes/{real}"),
        format!("../volumes/{real}.img"),
        format!("{real}\0"),
        format!("{real}\n"),
        format!(" {real}"),
        format!("{real}.json"),
        format!("{{{real}}}"),
        real.to_uppercase(),
        real.replace('-', ""),
        format!("{real}{}", "\u{200b}".repeat(HUNDRED_KB / 3)),
    ]
}

fn validate_req(id: &str, cap: csi::VolumeCapability) -> csi::ValidateVolumeCapabilitiesRequest {
    csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

fn stage_req(id: &str, staging: &str, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unstage_req(id: &str, staging: &str) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
    }
}

fn publish_req(
    id: &str,
    staging: &str,
    target: &str,
    cap: csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &str) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
    }
}

fn stats_req(id: &str, path: &str) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    }
}

fn capacity_req(cap: csi::VolumeCapability) -> csi::GetCapacityRequest {
    csi::GetCapacityRequest {
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

async fn new_volume(d: &mut TestDriver, name: &str, cap: csi::VolumeCapability) -> String {
    d.create(create_req(name, 16 * MIB, cap))
        .await
        .unwrap()
        .volume_id
}
