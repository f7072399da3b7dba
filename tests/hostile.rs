//! Hostile input through the real gRPC server: path-like, NUL-carrying, oversized and unicode
//! ids, names, fs types, mount flags, paths and sizes, for every RPC that takes them.
//!
//! Each must get a bounded, clear gRPC error with the right code (or, for legal CSI names, be
//! kept as an opaque name), the server must keep serving, nothing outside the test's dir may be
//! touched, and no tool may run through a shell. Each test collects every violation it sees
//! and reports them together, so one run lists all of them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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

// ---- volume ids ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_volume_ids_name_no_volume() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let real = new_volume(&mut d, "real", cap.clone()).await;
    let staging = d.staging("s");
    let target = d.target("t");
    let (staging, target) = (s(&staging), s(&target));

    for id in hostile_ids(&real) {
        let shown_id = shown(&id);
        let what = |rpc: &str| format!("{rpc}(volume_id={shown_id})");
        let not_found = &[Code::NotFound][..];
        // DeleteVolume of something that is not one of our ids: nothing to delete (spec: OK).
        f.ok(&what("DeleteVolume"), d.delete(&id).await);
        f.refused(
            &what("ValidateVolumeCapabilities"),
            d.controller
                .validate_volume_capabilities(validate_req(&id, cap.clone()))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeStageVolume"),
            d.node
                .node_stage_volume(stage_req(&id, &staging, cap.clone()))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeUnstageVolume"),
            d.node.node_unstage_volume(unstage_req(&id, &staging)).await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodePublishVolume"),
            d.node
                .node_publish_volume(publish_req(&id, &staging, &target, cap.clone()))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeUnpublishVolume"),
            d.node
                .node_unpublish_volume(unpublish_req(&id, &target))
                .await,
            not_found,
            &["volume"],
        );
        f.refused(
            &what("NodeGetVolumeStats"),
            d.node.node_get_volume_stats(stats_req(&id, &staging)).await,
            not_found,
            &["volume"],
        );
        f.refused(
            &format!("ListVolumes(starting_token={shown_id})"),
            d.controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 1,
                    starting_token: id.clone(),
                })
                .await,
            &[Code::Aborted],
            &["starting_token"],
        );
        f.refused(
            &what("ControllerPublishVolume"),
            d.controller
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: NODE.into(),
                    ..Default::default()
                })
                .await,
            &[Code::Unimplemented],
            &[],
        );
        // The RPCs of optional capabilities: NOT_FOUND, or UNIMPLEMENTED when not advertised.
        let optional = &[Code::NotFound, Code::Unimplemented][..];
        // EXPAND_VOLUME is advertised by the node service (NodeExpandVolume does the whole
        // expansion), not by the controller.
        f.refused(
            &what("NodeExpandVolume"),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: staging.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            not_found,
            &[],
        );
        f.refused(
            &what("ControllerExpandVolume"),
            d.controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            &[Code::Unimplemented],
            &["ControllerExpandVolume"],
        );
        f.refused(
            &what("ControllerGetVolume"),
            d.controller
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: id.clone(),
                })
                .await,
            optional,
            &[],
        );
        f.refused(
            &format!("CreateSnapshot(source_volume_id={shown_id})"),
            d.controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: id.clone(),
                    name: "snap".into(),
                    ..Default::default()
                })
                .await,
            optional,
            &[],
        );
        f.refused(
            &format!("GetSnapshot(snapshot_id={shown_id})"),
            d.controller
                .get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await,
            optional,
            &[],
        );
        match d
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => {}
            Err(status) => f.message(
                &format!("DeleteSnapshot(snapshot_id={shown_id})"),
                &status,
                &[Code::Unimplemented],
                &[],
            ),
        }
        for (field, req) in [
            (
                "snapshot_id",
                csi::ListSnapshotsRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                },
            ),
            (
                "source_volume_id",
                csi::ListSnapshotsRequest {
                    source_volume_id: id.clone(),
                    ..Default::default()
                },
            ),
        ] {
            match d.controller.list_snapshots(req).await {
                Ok(reply) => {
                    let n = reply.into_inner().entries.len();
                    f.check(n == 0, || {
                        format!("ListSnapshots({field}={shown_id}) lists {n} snapshots")
                    });
                }
                Err(status) => f.message(
                    &format!("ListSnapshots({field}={shown_id})"),
                    &status,
                    &[Code::Unimplemented],
                    &[],
                ),
            }
        }
        f.refused(
            &format!("ListSnapshots(starting_token={shown_id})"),
            d.controller
                .list_snapshots(csi::ListSnapshotsRequest {
                    starting_token: id.clone(),
                    ..Default::default()
                })
                .await,
            &[Code::Aborted, Code::Unimplemented],
            &[],
        );
        for (field, source) in [
            (
                "snapshot",
                csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: id.clone(),
                    },
                ),
            ),
            (
                "volume",
                csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: id.clone(),
                    },
                ),
            ),
        ] {
            let mut req = create_req("from-hostile-source", 16 * MIB, cap.clone());
            req.volume_content_source = Some(csi::VolumeContentSource {
                r#type: Some(source),
            });
            f.refused(
                &format!("CreateVolume(volume_content_source.{field}={shown_id})"),
                d.create(req).await,
                &[Code::NotFound, Code::InvalidArgument],
                &[field],
            );
        }
    }

    // An empty id is a missing field.
    let invalid = &[Code::InvalidArgument][..];
    f.refused(
        "DeleteVolume(\"\")",
        d.delete("").await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "ValidateVolumeCapabilities(\"\")",
        d.controller
            .validate_volume_capabilities(validate_req("", cap.clone()))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeStageVolume(\"\")",
        d.node
            .node_stage_volume(stage_req("", &staging, cap.clone()))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeUnstageVolume(\"\")",
        d.node.node_unstage_volume(unstage_req("", &staging)).await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodePublishVolume(\"\")",
        d.node
            .node_publish_volume(publish_req("", &staging, &target, cap.clone()))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeUnpublishVolume(\"\")",
        d.node
            .node_unpublish_volume(unpublish_req("", &target))
            .await,
        invalid,
        &["volume_id"],
    );
    f.refused(
        "NodeGetVolumeStats(\"\")",
        d.node.node_get_volume_stats(stats_req("", &staging)).await,
        invalid,
        &["volume_id"],
    );

    // The real volume is untouched by all of it, and nothing was made anywhere.
    let listed: Vec<String> = d
        .list_all()
        .await
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    f.check(listed == vec![real.clone()], || {
        format!("volumes after hostile ids: {listed:?}")
    });
    f.check(d.image_path(&real).exists(), || {
        "the real volume's image is gone".into()
    });
    f.check(d.loop_device_of(&real).is_none(), || {
        "the real volume got attached".into()
    });
    f.check(mounts_under(d.root()).is_empty(), || {
        format!("mounts appeared: {:?}", mounts_under(d.root()))
    });
    f.check(!Path::new(&target).exists(), || {
        "a target path was created".into()
    });
    let ids = check_state_dir(&d, &mut f);
    f.check(ids == HashSet::from([real.clone()]), || {
        format!("state dir names {ids:?}")
    });
    no_shell_ran(d.root(), &mut f);

    still_serving(&mut d).await;
    f.assert_none();
    d.delete(&real).await.unwrap();
    d.assert_clean();
}

// ---- names ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_like_and_unicode_names_are_opaque() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = block_cap(snw());
    let root = s(d.root());
    let passwd_before = std::fs::metadata("/etc/passwd")
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    let unrelated_id = uuid::Uuid::new_v4().to_string();

    // Legal CSI names (at most 128 bytes, no banned control characters): opaque strings.
    let legal = vec![
        "../../x".to_string(),
        "a/b".into(),
        "/etc/passwd".into(),
        "..".into(),
        ".".into(),
        "../../../../../../tmp/pwned".into(),
        "$(touch /tmp/pwned)".into(),
        format!("`touch {root}/pwned`"),
        format!("x;touch {root}/pwned"),
        "volumes/../node/x".into(),
        format!("{unrelated_id}.img"),
        unrelated_id.clone(),
        "\u{202e}gpj.exe".into(),
        "zero\u{200b}width".into(),
        "\u{feff}bom".into(),
        "名前/卷/💾".into(),
        "line\nbreak".into(),
    ];
    let mut ids = HashSet::new();
    for name in &legal {
        let what = format!("CreateVolume(name={})", shown(name));
        let Some(vol) = f.ok(&what, d.create(create_req(name, MIB, cap.clone())).await) else {
            continue;
        };
        f.check(VolumeId::parse(&vol.volume_id).is_some(), || {
            format!("{what}: id {:?} is not a driver id", vol.volume_id)
        });
        f.check(vol.volume_id != unrelated_id, || {
            format!("{what}: the id was taken from the name")
        });
        if let Some(again) = f.ok(
            &format!("{what} again"),
            d.create(create_req(name, MIB, cap.clone())).await,
        ) {
            f.check(again.volume_id == vol.volume_id, || {
                format!("{what}: not idempotent")
            });
        }
        ids.insert(vol.volume_id);
    }
    f.check(ids.len() == legal.len(), || {
        format!("{} volumes for {} names", ids.len(), legal.len())
    });

    // Names the spec does not allow.
    for name in [
        String::new(),
        "a\0b".into(),
        "\0".into(),
        "\u{1b}[2J".into(),
        "del\u{7f}".into(),
        "n".repeat(HUNDRED_KB),
        "../".repeat(HUNDRED_KB / 3),
        "\u{200b}".repeat(HUNDRED_KB / 3),
    ] {
        f.refused(
            &format!("CreateVolume(name={})", shown(&name)),
            d.create(create_req(&name, MIB, cap.clone())).await,
            &[Code::InvalidArgument],
            &["name"],
        );
    }

    // No name became a path: only <uuid> files in the state dir, nothing beside it.
    let on_disk = check_state_dir(&d, &mut f);
    f.check(on_disk == ids, || {
        format!("state dir ids {on_disk:?} != created {ids:?}")
    });
    let mut top: Vec<String> = std::fs::read_dir(d.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    f.check(top == ["csi.sock", "state"], || {
        format!("the test dir holds {top:?}")
    });
    let passwd_after = std::fs::metadata("/etc/passwd")
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    f.check(passwd_before == passwd_after, || {
        "/etc/passwd changed".into()
    });
    no_shell_ran(d.root(), &mut f);

    for id in &ids {
        f.ok("DeleteVolume", d.delete(id).await);
    }
    f.check(d.list_all().await.is_empty(), || "volumes left".into());
    still_serving(&mut d).await;
    f.assert_none();
}

// ---- fs_type ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fs_types_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let real = new_volume(&mut d, "real", mount_cap("ext4", snw())).await;
    let staging = s(&d.staging("s"));
    let target = s(&d.target("t"));
    let root = s(d.root());

    let fs_types = vec![
        "ext4 -O x".to_string(),
        "ext4 -E root_owner=0:0".into(),
        "../xfs".into(),
        "../../sbin/mkfs.ext4".into(),
        "ext4\0".into(),
        "ext4\0xfs".into(),
        "/bin/sh".into(),
        "/sbin/mkfs.ext4".into(),
        "sh".into(),
        "ext4;id".into(),
        "ext4 && id".into(),
        "$(touch /tmp/pwned)".into(),
        format!("`touch {root}/pwned`"),
        "`id`".into(),
        "-o".into(),
        "--help".into(),
        "EXT4".into(),
        " ext4".into(),
        "ext4 ".into(),
        "ext4\n".into(),
        "xfs,ext4".into(),
        "ext4\u{200b}".into(),
        "\u{202e}4txe".into(),
        "ext3".into(),
        "btrfs".into(),
        "e".repeat(HUNDRED_KB),
    ];
    for (i, fs) in fs_types.iter().enumerate() {
        let cap = mount_cap(fs, snw());
        let what = |rpc: &str| format!("{rpc}(fs_type={})", shown(fs));
        f.refused(
            &what("CreateVolume"),
            d.create(create_req(&format!("fs-{i}"), 16 * MIB, cap.clone()))
                .await,
            &[Code::InvalidArgument],
            &["fs_type"],
        );
        // Validation of a well-formed but unserved capability: OK, not confirmed, saying why.
        if let Some(reply) = f.ok(
            &what("ValidateVolumeCapabilities"),
            d.controller
                .validate_volume_capabilities(validate_req(&real, cap.clone()))
                .await,
        ) {
            {
                let reply = reply.into_inner();
                f.check(reply.confirmed.is_none(), || {
                    format!("{} confirmed it", what("ValidateVolumeCapabilities"))
                });
                f.check(
                    reply.message.contains("fs_type") && reply.message.len() < MAX_MESSAGE,
                    || {
                        format!(
                            "{}: message {} is unbounded or does not name fs_type",
                            what("ValidateVolumeCapabilities"),
                            shown(&reply.message)
                        )
                    },
                );
            }
        }
        if let Some(reply) = f.ok(
            &what("GetCapacity"),
            d.controller.get_capacity(capacity_req(cap.clone())).await,
        ) {
            let reply = reply.into_inner();
            f.check(reply.available_capacity == 0, || {
                format!(
                    "{}: capacity {}",
                    what("GetCapacity"),
                    reply.available_capacity
                )
            });
        }
        f.refused(
            &what("NodeStageVolume"),
            d.node
                .node_stage_volume(stage_req(&real, &staging, cap.clone()))
                .await,
            &[Code::InvalidArgument],
            &["volume_capability", "fs_type"],
        );
        f.refused(
            &what("NodePublishVolume"),
            d.node
                .node_publish_volume(publish_req(&real, &staging, &target, cap.clone()))
                .await,
            &[Code::InvalidArgument],
            &["volume_capability", "fs_type"],
        );
    }

    // Nothing ran: the volume was never attached or formatted, and nothing was mounted.
    let listed = d.list_all().await;
    f.check(listed.len() == 1, || {
        format!("{} volumes after hostile fs types", listed.len())
    });
    f.check(d.loop_device_of(&real).is_none(), || {
        "the volume got attached".into()
    });
    let allocated = loopcsi::host::files::allocated_bytes(&d.image_path(&real)).unwrap();
    f.check(allocated == 0, || {
        format!("the thin image has {allocated} bytes allocated: something wrote to it")
    });
    f.check(mounts_under(d.root()).is_empty(), || {
        format!("mounts appeared: {:?}", mounts_under(d.root()))
    });
    check_state_dir(&d, &mut f);
    no_shell_ran(d.root(), &mut f);

    still_serving(&mut d).await;
    f.assert_none();
    d.delete(&real).await.unwrap();
    d.assert_clean();
}

// ---- mount flags ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_mount_flags_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let plain = mount_cap("ext4", snw());
    let real = new_volume(&mut d, "real", plain.clone()).await;
    let unstaged = new_volume(&mut d, "unstaged", plain.clone()).await;
    let staging = d.staging("s");
    d.stage(&real, &staging, plain.clone()).await.unwrap();
    let staging = s(&staging);
    let unstaged_staging = s(&d.staging("u"));
    let root = s(d.root());

    let one = |flag: &str| vec![flag.to_string()];
    let mut cases: Vec<Vec<String>> = [
        "rw,exec",
        "ro,exec",
        "$(touch /tmp/pwned)",
        "`id`",
        "x;y",
        "--help",
        "-o",
        "-oexec",
        "-",
        "bind",
        "rbind",
        "remount",
        "move",
        "shared",
        "loop",
        "loop=/dev/sda",
        "x-mount.mkdir",
        "x-mount.mkdir=/tmp/x",
        "context=\"a\",exec",
        "context=\"a\" exec",
        "context=a,exec",
        "context=system_u:object_r:container_file_t:s0,nouser_xattr",
        "context=",
        "context=\"\"",
        "ro bind",
        "a\0b",
        "noexec\0",
        "a\nb",
        "\tro",
        "|id",
        "&&id",
        "\\",
        "'ro'",
        "\"ro\"",
        "data=journal,exec",
        "journal_path=/dev/sda",
        "errors=remount-ro;id",
        "uid=$(id -u)",
        "ro\u{200b}",
    ]
    .iter()
    .map(|flag| one(flag))
    .collect();
    cases.push(one(&format!("`touch {root}/pwned`")));
    cases.push(one(&format!(";touch {root}/pwned")));
    cases.push(one(&"a".repeat(HUNDRED_KB)));
    cases.push(one(&"o".repeat(5000)));
    cases.push(vec!["ro".into(), "bind".into()]);
    cases.push(vec!["defaults".into(), "$(id)".into()]);
    cases.push(vec!["noatime".into(); 2000]);

    for (i, flags) in cases.iter().enumerate() {
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cap = mount_cap_flags("ext4", snw(), &refs);
        let shown_flags = shown(&format!("{flags:?}"));
        let what = |rpc: &str| format!("{rpc}(mount_flags={shown_flags})");
        let invalid = &[Code::InvalidArgument][..];
        f.refused(
            &what("CreateVolume"),
            d.create(create_req(&format!("flags-{i}"), 16 * MIB, cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        f.refused(
            &what("ValidateVolumeCapabilities"),
            d.controller
                .validate_volume_capabilities(validate_req(&real, cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        f.refused(
            &what("GetCapacity"),
            d.controller.get_capacity(capacity_req(cap.clone())).await,
            invalid,
            &["mount_flags"],
        );
        f.refused(
            &what("NodeStageVolume"),
            d.node
                .node_stage_volume(stage_req(&unstaged, &unstaged_staging, cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        let target = d.target(&format!("f{i}"));
        f.refused(
            &what("NodePublishVolume"),
            d.node
                .node_publish_volume(publish_req(&real, &staging, &s(&target), cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        if is_mount_point(&target) {
            f.0.push(format!(
                "{}: the target got mounted",
                what("NodePublishVolume")
            ));
            let _ = d.unpublish(&real, &target).await;
        }
        if d.loop_device_of(&unstaged).is_some() {
            f.0.push(format!(
                "{}: the volume got attached",
                what("NodeStageVolume")
            ));
            let _ = d.unstage(&unstaged, Path::new(&unstaged_staging)).await;
        }
    }

    no_shell_ran(d.root(), &mut f);
    check_state_dir(&d, &mut f);
    let mounted = mounts_under(d.root());
    f.check(mounted == vec![PathBuf::from(&staging)], || {
        format!("mounts after hostile flags: {mounted:?}")
    });
    still_serving(&mut d).await;
    f.assert_none();

    d.unstage(&real, Path::new(&staging)).await.unwrap();
    for vol in d.list_all().await {
        d.delete(&vol.volume_id).await.unwrap();
    }
    d.assert_clean();
}

// ---- staging and target paths ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_staging_and_target_paths_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let real = new_volume(&mut d, "real", cap.clone()).await;
    let fresh = new_volume(&mut d, "fresh", cap.clone()).await;
    let good_staging = d.staging("good");
    d.stage(&real, &good_staging, cap.clone()).await.unwrap();
    let good_target = d.target("good");
    let (good_staging, good_target) = (s(&good_staging), s(&good_target));
    let root = d.root().to_path_buf();
    let state = d.state_dir();
    let link_to_state = root.join("link-to-state");
    std::os::unix::fs::symlink(state.join("volumes"), &link_to_state).unwrap();

    let paths: Vec<String> = vec![
        "relative/path".into(),
        "./x".into(),
        "x/../y".into(),
        "~/x".into(),
        "staging".into(),
        format!("{}/staging/a\0b", root.display()),
        "/\0".into(),
        format!("{}\0/../../etc", root.display()),
        format!("{}/staging/../../../etc", root.display()),
        format!("{}/pods/..", root.display()),
        format!("{}/staging/x/..", root.display()),
        format!("{}/staging/good/../good", root.display()),
        "/".into(),
        "//".into(),
        format!("{}/{}", root.display(), "a/".repeat(HUNDRED_KB / 2)),
        format!("{}/{}", root.display(), "a".repeat(HUNDRED_KB)),
        format!("{}/{}", root.display(), "../".repeat(HUNDRED_KB / 3)),
        s(&state),
        s(&state.join("volumes")),
        s(&state.join("node")),
        s(&state.join("volumes").join(format!("{real}.img"))),
        s(&state.join("volumes").join("new-dir")),
        s(&state.join("node").join("x").join("y")),
        format!("{}/", state.display()),
        s(&root),
        s(&link_to_state),
        s(&link_to_state.join(format!("{real}.json"))),
    ];
    let invalid = &[Code::InvalidArgument][..];
    for path in &paths {
        let shown_path = shown(path);
        let what = |rpc: &str, field: &str| format!("{rpc}({field}={shown_path})");
        f.refused(
            &what("NodeStageVolume", "staging_target_path"),
            d.node
                .node_stage_volume(stage_req(&fresh, path, cap.clone()))
                .await,
            invalid,
            &["staging_target_path"],
        );
        f.refused(
            &what("NodeUnstageVolume", "staging_target_path"),
            d.node.node_unstage_volume(unstage_req(&fresh, path)).await,
            invalid,
            &["staging_target_path"],
        );
        f.refused(
            &what("NodePublishVolume", "target_path"),
            d.node
                .node_publish_volume(publish_req(&real, &good_staging, path, cap.clone()))
                .await,
            invalid,
            &["target_path"],
        );
        f.refused(
            &what("NodePublishVolume", "staging_target_path"),
            d.node
                .node_publish_volume(publish_req(&real, path, &good_target, cap.clone()))
                .await,
            invalid,
            &["staging_target_path"],
        );
        f.refused(
            &what("NodeUnpublishVolume", "target_path"),
            d.node
                .node_unpublish_volume(unpublish_req(&real, path))
                .await,
            invalid,
            &["target_path"],
        );
    }
    // Empty paths are missing fields; a publish without staging path is the README's
    // FAILED_PRECONDITION (STAGE_UNSTAGE_VOLUME is advertised).
    f.refused(
        "NodeStageVolume(staging_target_path=\"\")",
        d.node
            .node_stage_volume(stage_req(&fresh, "", cap.clone()))
            .await,
        invalid,
        &["staging_target_path"],
    );
    f.refused(
        "NodeUnstageVolume(staging_target_path=\"\")",
        d.node.node_unstage_volume(unstage_req(&fresh, "")).await,
        invalid,
        &["staging_target_path"],
    );
    f.refused(
        "NodePublishVolume(target_path=\"\")",
        d.node
            .node_publish_volume(publish_req(&real, &good_staging, "", cap.clone()))
            .await,
        invalid,
        &["target_path"],
    );
    f.refused(
        "NodePublishVolume(staging_target_path=\"\")",
        d.node
            .node_publish_volume(publish_req(&real, "", &good_target, cap.clone()))
            .await,
        &[Code::FailedPrecondition],
        &["staging_target_path"],
    );
    f.refused(
        "NodeUnpublishVolume(target_path=\"\")",
        d.node.node_unpublish_volume(unpublish_req(&real, "")).await,
        invalid,
        &["target_path"],
    );

    // Nothing was mounted, attached or created by any of it.
    let mounted = mounts_under(&root);
    f.check(mounted == vec![PathBuf::from(&good_staging)], || {
        format!("mounts after hostile paths: {mounted:?}")
    });
    f.check(d.loop_device_of(&fresh).is_none(), || {
        "the fresh volume got attached".into()
    });
    f.check(!Path::new(&good_target).exists(), || {
        "the good target was created".into()
    });
    check_state_dir(&d, &mut f);
    no_shell_ran(&root, &mut f);
    still_serving(&mut d).await;
    f.assert_none();

    std::fs::remove_file(&link_to_state).unwrap();
    d.unstage(&real, Path::new(&good_staging)).await.unwrap();
    d.delete(&real).await.unwrap();
    d.delete(&fresh).await.unwrap();
    d.assert_clean();
}

/// A directory standing for "somewhere else" (it is under the test's dir, so nothing real is
/// ever at risk), holding a marker file and a regular file a device might be bound onto.
fn outside_dir(d: &TestDriver) -> PathBuf {
    let outside = d.root().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("marker"), b"marker").unwrap();
    std::fs::write(outside.join("devnode"), b"not a device").unwrap();
    outside
}

fn check_outside_untouched(outside: &Path, f: &mut Findings) {
    let mounted = mounts_under(outside);
    f.check(mounted.is_empty(), || {
        format!("something was mounted outside: {mounted:?}")
    });
    let listed = walk(outside);
    f.check(
        listed == [PathBuf::from("devnode"), PathBuf::from("marker")],
        || format!("files appeared outside: {listed:?}"),
    );
    f.check(
        std::fs::read(outside.join("devnode")).unwrap() == b"not a device",
        || "the file outside was changed".into(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_target_and_staging_paths_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let outside = outside_dir(&d);
    let cap = mount_cap("ext4", snw());
    let bcap = block_cap(snw());
    let vol = new_volume(&mut d, "fs", cap.clone()).await;
    let other = new_volume(&mut d, "other", cap.clone()).await;
    let block = new_volume(&mut d, "block", bcap.clone()).await;
    let staging = d.staging("s");
    let block_staging = d.staging("b");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    d.stage(&block, &block_staging, bcap.clone()).await.unwrap();

    // A target path that is a symlink to a directory elsewhere.
    let dir_link = d.target("dir-link");
    std::os::unix::fs::symlink(&outside, &dir_link).unwrap();
    f.refused(
        "NodePublishVolume(target_path=symlink to a directory)",
        d.publish(&vol, &staging, &dir_link, cap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    // A block target that is a symlink to a file elsewhere.
    let file_link = d.target("file-link");
    std::os::unix::fs::symlink(outside.join("devnode"), &file_link).unwrap();
    f.refused(
        "NodePublishVolume(block, target_path=symlink to a file)",
        d.publish(&block, &block_staging, &file_link, bcap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    // A staging path that is a symlink to a directory elsewhere.
    let staging_link = d.root().join("staging").join("link");
    std::os::unix::fs::symlink(&outside, &staging_link).unwrap();
    f.refused(
        "NodeStageVolume(staging_target_path=symlink)",
        d.stage(&other, &staging_link, cap.clone()).await,
        &[Code::InvalidArgument],
        &["staging_target_path"],
    );
    f.check(d.loop_device_of(&other).is_none(), || {
        "a refused stage left the volume attached".into()
    });
    // Refused before anything was done to the volume: no mkfs ran on it.
    let allocated = loopcsi::host::files::allocated_bytes(&d.image_path(&other)).unwrap();
    f.check(allocated == 0, || {
        format!(
            "NodeStageVolume refused the symlinked staging path only after formatting the \
             volume ({allocated} bytes written to its thin image)"
        )
    });
    // Publishing from a symlink to the real staging path.
    let staging_alias = d.root().join("staging").join("alias");
    std::os::unix::fs::symlink(&staging, &staging_alias).unwrap();
    let target = d.target("via-alias");
    let via_alias = d
        .publish(&vol, &staging_alias, &target, cap.clone(), false)
        .await;
    f.check(via_alias.is_err(), || {
        "NodePublishVolume from a symlinked staging path that is not the staged path succeeded"
            .into()
    });
    if via_alias.is_ok() {
        let _ = d.unpublish(&vol, &target).await;
    }
    check_outside_untouched(&outside, &mut f);
    for link in [&dir_link, &file_link, &staging_link, &staging_alias] {
        f.check(
            std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()),
            || format!("{} is no longer the symlink it was", link.display()),
        );
    }

    // Unpublish and unstage through symlinks to the real paths: they name no publication or
    // staging of the volume, so nothing may be unmounted or removed through them.
    let real_target = d.target("real");
    d.publish(&vol, &staging, &real_target, cap.clone(), false)
        .await
        .unwrap();
    let target_alias = d.target("target-alias");
    std::os::unix::fs::symlink(&real_target, &target_alias).unwrap();
    if let Err(status) = d.unpublish(&vol, &target_alias).await {
        f.message(
            "NodeUnpublishVolume(target_path=symlink to the published target)",
            &status,
            &[Code::InvalidArgument],
            &["target_path"],
        );
    }
    f.check(is_mount_point(&real_target), || {
        "unpublish through a symlink unmounted the real target".into()
    });
    f.check(target_alias.is_symlink(), || {
        "unpublish through a symlink removed the symlink's target".into()
    });
    if let Err(status) = d.unstage(&vol, &staging_alias).await {
        f.message(
            "NodeUnstageVolume(staging_target_path=symlink to the staging path)",
            &status,
            &[Code::InvalidArgument, Code::FailedPrecondition],
            &["staging_target_path"],
        );
    }
    f.check(is_mount_point(&staging), || {
        "unstage through a symlink unmounted the real staging path".into()
    });
    f.check(d.loop_device_of(&vol).is_some(), || {
        "unstage through a symlink detached the volume".into()
    });
    check_outside_untouched(&outside, &mut f);
    no_shell_ran(d.root(), &mut f);
    still_serving(&mut d).await;
    f.assert_none();

    d.unpublish(&vol, &real_target).await.unwrap();
    d.unstage(&vol, &staging).await.unwrap();
    d.unstage(&block, &block_staging).await.unwrap();
    for id in [&vol, &other, &block] {
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_through_a_symlinked_parent_into_the_state_dir_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let bcap = block_cap(snw());
    let vol = new_volume(&mut d, "fs", cap.clone()).await;
    let other = new_volume(&mut d, "other", cap.clone()).await;
    let block = new_volume(&mut d, "block", bcap.clone()).await;
    let staging = d.staging("s");
    let block_staging = d.staging("b");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    d.stage(&block, &block_staging, bcap.clone()).await.unwrap();

    // The CO's directories are symlinks into the state dir, and the leaf does not exist yet:
    // every path below lands inside the state dir once the symlink is followed.
    let pods = d.root().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let into_volumes = pods.join("into-volumes");
    std::os::unix::fs::symlink(d.state_dir().join("volumes"), &into_volumes).unwrap();
    let into_node = d.root().join("staging").join("into-node");
    std::os::unix::fs::symlink(d.state_dir().join("node"), &into_node).unwrap();

    let target = into_volumes.join("new-target");
    f.refused(
        "NodePublishVolume(target_path=<symlink into state/volumes>/new-target)",
        d.publish(&vol, &staging, &target, cap.clone(), false).await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    let block_target = into_volumes.join("new-device");
    f.refused(
        "NodePublishVolume(block, target_path=<symlink into state/volumes>/new-device)",
        d.publish(&block, &block_staging, &block_target, bcap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    let stage_path = into_node.join("new-staging");
    f.refused(
        "NodeStageVolume(staging_target_path=<symlink into state/node>/new-staging)",
        d.stage(&other, &stage_path, cap.clone()).await,
        &[Code::InvalidArgument],
        &["staging_target_path"],
    );

    let in_state = mounts_under(&d.state_dir());
    f.check(in_state.is_empty(), || {
        format!("mounted inside the state dir: {in_state:?}")
    });
    check_state_dir(&d, &mut f);

    // Undo whatever the driver did, through the same paths, before cleaning up.
    let _ = d.unpublish(&vol, &target).await;
    let _ = d.unpublish(&block, &block_target).await;
    let _ = d.unstage(&other, &stage_path).await;
    for stray in [
        d.state_dir().join("volumes").join("new-target"),
        d.state_dir().join("volumes").join("new-device"),
        d.state_dir().join("node").join("new-staging"),
    ] {
        let _ = nix::mount::umount2(&stray, nix::mount::MntFlags::UMOUNT_NOFOLLOW);
        let _ = std::fs::remove_dir(&stray);
        let _ = std::fs::remove_file(&stray);
    }
    std::fs::remove_file(&into_volumes).unwrap();
    std::fs::remove_file(&into_node).unwrap();
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    d.unstage(&block, &block_staging).await.unwrap();
    for id in [&vol, &other, &block] {
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

/// Policy (README, "Paths"): a path that IS a symlink is refused; symlinks in its ancestors are
/// followed, as the kernel follows them when mounting (a kubelet root dir may itself be a
/// symlink). The driver then works with the resolved path throughout, so what it mounts there
/// it also finds and releases again: nothing is left behind where the symlink points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_through_a_symlinked_parent_are_resolved_and_released() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let outside = outside_dir(&d);
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "fs", cap.clone()).await;
    let other = new_volume(&mut d, "other", cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();

    // The pod directory is a symlink elsewhere; the target itself does not exist yet.
    let pods = d.root().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let pod = pods.join("linked-pod");
    std::os::unix::fs::symlink(&outside, &pod).unwrap();
    let target = pod.join("volume");
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert!(
        is_mount_point(&outside.join("volume")),
        "mounted at the resolved path"
    );
    assert!(!d.stats(&vol, &target).await.unwrap().usage.is_empty());
    let staging_parent = d.root().join("staging").join("linked");
    std::os::unix::fs::symlink(&outside, &staging_parent).unwrap();
    let stage_path = staging_parent.join("new-staging");
    std::fs::create_dir_all(&stage_path).unwrap();
    d.stage(&other, &stage_path, cap.clone()).await.unwrap();
    assert!(is_mount_point(&outside.join("new-staging")));

    // Released through the same (unresolved) paths: nothing stays mounted where they point.
    d.unpublish(&vol, &target).await.unwrap();
    d.unstage(&other, &stage_path).await.unwrap();
    f.check(!is_mount_point(&outside.join("volume")), || {
        "the target stayed mounted after unpublish".to_string()
    });
    f.check(!outside.join("volume").exists(), || {
        "unpublish left the target directory".to_string()
    });
    f.check(!is_mount_point(&outside.join("new-staging")), || {
        "the staging stayed mounted after unstage".to_string()
    });
    let _ = std::fs::remove_dir(outside.join("new-staging"));
    check_outside_untouched(&outside, &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    for id in [&vol, &other] {
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_legal_paths_work_and_are_released() {
    // Paths with the characters mountinfo escapes (space, tab, newline, backslash), a literal
    // "\040", and unicode: a legal path must be mounted, recognised and unmounted correctly.
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "odd", cap.clone()).await;
    let odd = "a b\tc\nd\\e\\040f - g\u{202e}h\u{200b}i#卷";
    let staging = d.staging(odd);
    let target = d.target(odd);

    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    assert!(is_mount_point(&staging), "the odd staging path is mounted");
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.publish(&vol, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert!(is_mount_point(&target), "the odd target path is mounted");
    std::fs::write(target.join("file"), b"data").unwrap();
    assert!(!d.stats(&vol, &target).await.unwrap().usage.is_empty());
    // Unstage while published is refused: the driver sees the odd target in mountinfo.
    assert_code(
        d.unstage(&vol, &staging).await,
        Code::FailedPrecondition,
        "published",
    );
    d.unpublish(&vol, &target).await.unwrap();
    assert!(!target.exists(), "the target is removed");
    d.unstage(&vol, &staging).await.unwrap();
    d.unstage(&vol, &staging).await.unwrap();
    d.assert_clean();
    still_serving(&mut d).await;
    d.delete(&vol).await.unwrap();
}

// ---- legal paths near PATH_MAX ----

/// A legal absolute path of about `len` bytes under `base` (components of 200 bytes).
fn long_path(base: &Path, len: usize) -> PathBuf {
    let mut path = base.to_path_buf();
    while path.as_os_str().len() + 201 < len {
        path.push("c".repeat(200));
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_path_max_paths_give_bounded_messages() {
    // co_path admits paths up to 4096 bytes; errors about them must still stay under 1 KB.
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let outside = outside_dir(&d);
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "long", cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();

    let long_dir = long_path(&d.root().join("long"), 3900);
    std::fs::create_dir_all(&long_dir).unwrap();
    let long_link = long_dir.join("link");
    std::os::unix::fs::symlink(&outside, &long_link).unwrap();
    let long_missing = long_dir.join("missing");

    f.refused(
        "NodePublishVolume(staging_target_path=<3.9 KB, not staged>)",
        d.publish(&vol, &long_missing, &d.target("t"), cap.clone(), false)
            .await,
        &[Code::FailedPrecondition],
        &["staging_target_path"],
    );
    f.refused(
        "NodePublishVolume(target_path=<3.9 KB symlink>)",
        d.publish(&vol, &staging, &long_link, cap.clone(), false)
            .await,
        &[Code::InvalidArgument],
        &["target_path"],
    );
    f.refused(
        "NodeGetVolumeStats(volume_path=<3.9 KB>)",
        d.stats(&vol, &long_missing).await,
        &[Code::NotFound],
        &[],
    );
    check_outside_untouched(&outside, &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    d.delete(&vol).await.unwrap();
    d.assert_clean();
}

// ---- NodeGetVolumeStats and NodeExpandVolume volume_path ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_volume_paths_for_stats_and_expansion_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "stats", cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    let root = s(d.root());
    let link = d.root().join("link");
    std::os::unix::fs::symlink(&staging, &link).unwrap();

    f.refused(
        "NodeGetVolumeStats(volume_path=\"\")",
        d.node.node_get_volume_stats(stats_req(&vol, "")).await,
        &[Code::InvalidArgument],
        &["volume_path"],
    );
    for path in [
        format!("{root}/{}", "a".repeat(HUNDRED_KB)),
        format!("{root}/{}", "a/".repeat(HUNDRED_KB / 2)),
        format!("/{}", "\u{200b}".repeat(HUNDRED_KB / 3)),
        format!("{root}/staging/s\0"),
        "\0".into(),
        "relative/path".into(),
        format!("{root}/staging/s/.."),
        format!("{root}/pods/../staging/s"),
        "/".into(),
        s(&link),
        s(&d.state_dir()),
        s(&d.image_path(&vol)),
    ] {
        f.refused(
            &format!("NodeGetVolumeStats(volume_path={})", shown(&path)),
            d.node.node_get_volume_stats(stats_req(&vol, &path)).await,
            &[Code::InvalidArgument, Code::NotFound],
            &[],
        );
        f.refused(
            &format!("NodeExpandVolume(volume_path={})", shown(&path)),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: vol.clone(),
                    volume_path: path.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            &[Code::InvalidArgument, Code::NotFound],
            &[],
        );
    }
    // No hostile path grew the volume.
    let len = std::fs::metadata(d.image_path(&vol)).map(|m| m.len()).ok();
    f.check(len == Some(16 << 20), || {
        format!("NodeExpandVolume at hostile paths left the backing file at {len:?} bytes")
    });
    f.check(d.stats(&vol, &staging).await.is_ok(), || {
        "stats of the real staging path fail".into()
    });
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    d.delete(&vol).await.unwrap();
    d.assert_clean();
}

// ---- sizes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sizes_get_the_readme_codes() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let mib = MIB;
    let largest = (i64::MAX / mib) * mib;
    let ext4_min = 16 * mib;
    let gib = 1 << 30;
    let invalid = Err(Code::InvalidArgument);
    let out_of_range = Err(Code::OutOfRange);
    let exhausted = Err(Code::ResourceExhausted);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(i64, i64, Result<i64, Code>, &str)> = vec![
        (0, 0, Ok(gib), ""),
        (1, 0, Ok(ext4_min), ""),
        (0, i64::MAX, Ok(gib), ""),
        (0, 16 * mib + 5, Ok(ext4_min), ""),
        (-1, 0, invalid, "capacity_range.required_bytes"),
        (0, -1, invalid, "capacity_range.limit_bytes"),
        (i64::MIN, 0, invalid, "capacity_range.required_bytes"),
        (0, i64::MIN, invalid, "capacity_range.limit_bytes"),
        (i64::MIN, i64::MIN, invalid, "capacity_range"),
        (-1, i64::MAX, invalid, "capacity_range.required_bytes"),
        (i64::MAX, 0, out_of_range, "capacity_range"),
        (i64::MAX - 1, 0, out_of_range, "capacity_range"),
        (i64::MAX, i64::MAX, out_of_range, "capacity_range"),
        (i64::MAX - 1, i64::MAX, out_of_range, "capacity_range"),
        (i64::MAX - 1, i64::MAX - 1, out_of_range, "capacity_range"),
        (largest + 1, 0, out_of_range, "capacity_range"),
        (i64::MAX, 1, out_of_range, "capacity_range"),
        (1, 1, out_of_range, "capacity_range"),
        (0, 1, out_of_range, "capacity_range"),
        (mib + 1, mib + 1, out_of_range, "capacity_range"),
        (ext4_min + 1, ext4_min + 1, out_of_range, "capacity_range"),
        (largest, 0, exhausted, "requested"),
        (largest - mib + 1, 0, exhausted, "requested"),
        (largest, i64::MAX, exhausted, "requested"),
        (0, largest, Ok(gib), ""),
    ];
    let mut created = Vec::new();
    for (i, (required_bytes, limit_bytes, expected, needle)) in cases.into_iter().enumerate() {
        let mut req = create_req(&format!("size-{i}"), 0, cap.clone());
        req.capacity_range = Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        });
        let what =
            format!("CreateVolume(required_bytes={required_bytes}, limit_bytes={limit_bytes})");
        let result = d.create(req).await;
        match expected {
            Ok(size) => {
                if let Some(vol) = f.ok(&what, result) {
                    f.check(vol.capacity_bytes == size, || {
                        format!("{what}: {} bytes, expected {size}", vol.capacity_bytes)
                    });
                    created.push(vol.volume_id);
                }
            }
            Err(code) => f.refused(&what, result, &[code], &[needle]),
        }
    }
    // The same sizes for a name that exists already.
    let same = d
        .create(create_req("same", 16 * mib, cap.clone()))
        .await
        .unwrap();
    created.push(same.volume_id.clone());
    for (required_bytes, limit_bytes, codes, needle) in [
        (-1, 0, vec![Code::InvalidArgument], "required_bytes"),
        (0, i64::MIN, vec![Code::InvalidArgument], "limit_bytes"),
        (i64::MAX, 0, vec![Code::AlreadyExists, Code::OutOfRange], ""),
        (
            i64::MAX - 1,
            i64::MAX,
            vec![Code::AlreadyExists, Code::OutOfRange],
            "",
        ),
    ] {
        let mut req = create_req("same", 0, cap.clone());
        req.capacity_range = Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        });
        f.refused(
            &format!("CreateVolume(existing name, required_bytes={required_bytes}, limit_bytes={limit_bytes})"),
            d.create(req).await,
            &codes,
            &[needle],
        );
    }
    // Expansion of the existing volume with the same hostile sizes. The controller does not
    // expand (EXPAND_VOLUME is the node's): UNIMPLEMENTED whatever the sizes. NodeExpandVolume,
    // which does the whole expansion, at the path where the volume is staged: the README's
    // codes, never a panic (INTERNAL), never a grown volume.
    let staging = d.staging("same");
    d.stage(&same.volume_id, &staging, cap.clone())
        .await
        .unwrap();
    for (required_bytes, limit_bytes, code, needle) in [
        (
            -1,
            0,
            Code::InvalidArgument,
            "capacity_range.required_bytes",
        ),
        (0, -1, Code::InvalidArgument, "capacity_range.limit_bytes"),
        (
            i64::MIN,
            0,
            Code::InvalidArgument,
            "capacity_range.required_bytes",
        ),
        (
            0,
            i64::MIN,
            Code::InvalidArgument,
            "capacity_range.limit_bytes",
        ),
        (i64::MIN, i64::MIN, Code::InvalidArgument, "capacity_range"),
        (
            -1,
            i64::MAX,
            Code::InvalidArgument,
            "capacity_range.required_bytes",
        ),
        (i64::MAX, 0, Code::OutOfRange, "capacity_range"),
        (i64::MAX - 1, 0, Code::OutOfRange, "capacity_range"),
        (i64::MAX, i64::MAX, Code::OutOfRange, "capacity_range"),
        (i64::MAX - 1, i64::MAX, Code::OutOfRange, "capacity_range"),
        (i64::MAX, 1, Code::OutOfRange, "capacity_range"),
        (largest + 1, 0, Code::OutOfRange, "capacity_range"),
        (largest, 0, Code::ResourceExhausted, "requested"),
        (largest - mib + 1, 0, Code::ResourceExhausted, "requested"),
        (largest, i64::MAX, Code::ResourceExhausted, "requested"),
        (mib, mib, Code::OutOfRange, "capacity_range"),
        (1, 1, Code::OutOfRange, "capacity_range"),
        (0, 1, Code::OutOfRange, "capacity_range"),
        (
            16 * mib + 1,
            16 * mib + 1,
            Code::OutOfRange,
            "capacity_range",
        ),
    ] {
        let range = Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        });
        let sizes = format!("required_bytes={required_bytes}, limit_bytes={limit_bytes}");
        f.refused(
            &format!("ControllerExpandVolume({sizes})"),
            d.controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: same.volume_id.clone(),
                    capacity_range: range,
                    ..Default::default()
                })
                .await,
            &[Code::Unimplemented],
            &["ControllerExpandVolume"],
        );
        f.refused(
            &format!("NodeExpandVolume({sizes})"),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: same.volume_id.clone(),
                    volume_path: s(&staging),
                    capacity_range: range,
                    ..Default::default()
                })
                .await,
            &[code],
            &[needle],
        );
    }
    // Ranges the volume is within, however large the limit: OK, nothing grown.
    for (required_bytes, limit_bytes) in [(0, 0), (0, i64::MAX), (16 * mib, i64::MAX), (1, 0)] {
        if let Some(reply) = f.ok(
            &format!(
                "NodeExpandVolume(required_bytes={required_bytes}, limit_bytes={limit_bytes})"
            ),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: same.volume_id.clone(),
                    volume_path: s(&staging),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes,
                        limit_bytes,
                    }),
                    ..Default::default()
                })
                .await,
        ) {
            let size = reply.into_inner().capacity_bytes;
            f.check(size == 16 * mib, || {
                format!(
                    "NodeExpandVolume(required_bytes={required_bytes}, limit_bytes={limit_bytes}): {size} bytes, expected {}",
                    16 * mib
                )
            });
        }
    }
    d.unstage(&same.volume_id, &staging).await.unwrap();
    let after = d.list_all().await;
    let size = after
        .iter()
        .find(|v| v.volume_id == same.volume_id)
        .map(|v| v.capacity_bytes);
    f.check(size == Some(16 * mib), || {
        format!("hostile expansions changed the volume to {size:?} bytes")
    });
    let len = std::fs::metadata(d.image_path(&same.volume_id))
        .map(|m| m.len())
        .ok();
    f.check(len == Some(16 << 20), || {
        format!("hostile expansions left the backing file at {len:?} bytes")
    });

    // ListVolumes paging sizes.
    for max_entries in [-1, i32::MIN] {
        f.refused(
            &format!("ListVolumes(max_entries={max_entries})"),
            d.controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries,
                    starting_token: String::new(),
                })
                .await,
            &[Code::InvalidArgument],
            &["max_entries"],
        );
    }
    if let Some(reply) = f.ok(
        "ListVolumes(max_entries=i32::MAX)",
        d.controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: i32::MAX,
                starting_token: String::new(),
            })
            .await,
    ) {
        let n = reply.into_inner().entries.len();
        f.check(n == created.len(), || {
            format!("ListVolumes lists {n} of {} volumes", created.len())
        });
    }

    // Refused sizes left nothing behind.
    let on_disk = check_state_dir(&d, &mut f);
    let expected: HashSet<String> = created.iter().cloned().collect();
    f.check(on_disk == expected, || {
        format!("state dir ids {on_disk:?}, created {expected:?}")
    });
    still_serving(&mut d).await;
    f.assert_none();
    for id in &created {
        d.delete(id).await.unwrap();
    }
}

// ---- StorageClass and mutable parameters ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_parameters_are_refused_and_sidecar_keys_opaque() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = block_cap(snw());
    let real = new_volume(&mut d, "real", cap.clone()).await;
    let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let long = "k".repeat(HUNDRED_KB);
    let bad: Vec<HashMap<String, String>> = vec![
        map(&[("../x", "1")]),
        map(&[("/etc/passwd", "x")]),
        map(&[("provisioning\0", "thin")]),
        map(&[("\u{202e}provisioning", "thin")]),
        map(&[("provisioning\u{200b}", "thin")]),
        map(&[("Provisioning", "thin")]),
        map(&[("csi.storage.k8s.io", "x")]),
        map(&[(long.as_str(), "v")]),
        map(&[("provisioning", "thin; rm -rf /")]),
        map(&[("provisioning", "$(touch /tmp/pwned)")]),
        map(&[("provisioning", "thin\0")]),
        map(&[("provisioning", long.as_str())]),
        map(&[("fsType", "ext4 -O x")]),
    ];
    for (i, params) in bad.iter().enumerate() {
        let what = |rpc: &str| format!("{rpc}(parameters={})", shown(&format!("{params:?}")));
        let mut req = create_req(&format!("params-{i}"), MIB, cap.clone());
        req.parameters = params.clone();
        f.refused(
            &what("CreateVolume"),
            d.create(req).await,
            &[Code::InvalidArgument],
            &["parameters"],
        );
        f.refused(
            &what("GetCapacity"),
            d.controller
                .get_capacity(csi::GetCapacityRequest {
                    parameters: params.clone(),
                    ..Default::default()
                })
                .await,
            &[Code::InvalidArgument],
            &["parameters"],
        );
        let mut validate = validate_req(&real, cap.clone());
        validate.parameters = params.clone();
        if let Some(reply) = f.ok(
            &what("ValidateVolumeCapabilities"),
            d.controller.validate_volume_capabilities(validate).await,
        ) {
            let reply = reply.into_inner();
            f.check(reply.confirmed.is_none(), || {
                format!("{}: confirmed", what("ValidateVolumeCapabilities"))
            });
            f.check(
                reply.message.contains("parameters") && reply.message.len() < MAX_MESSAGE,
                || {
                    format!(
                        "{}: message {} is unbounded or does not name parameters",
                        what("ValidateVolumeCapabilities"),
                        shown(&reply.message)
                    )
                },
            );
        }
    }
    let mut req = create_req("mutable", MIB, cap.clone());
    req.mutable_parameters = map(&[("../x", &long)]);
    f.refused(
        "CreateVolume(mutable_parameters=hostile)",
        d.create(req).await,
        &[Code::InvalidArgument],
        &["mutable_parameters"],
    );

    // Keys the sidecars own are accepted, and their values never become paths.
    let mut req = create_req("sidecar", MIB, cap.clone());
    req.parameters = map(&[
        ("csi.storage.k8s.io/../../x", "y"),
        ("csi.storage.k8s.io/pvc/name", "../../etc/passwd"),
        ("csi.storage.k8s.io/pvc/namespace", "/tmp/pwned"),
        ("csi.storage.k8s.io/pv/name", "$(touch /tmp/pwned)"),
    ]);
    let sidecar = f.ok("CreateVolume(sidecar parameters)", d.create(req).await);

    check_state_dir(&d, &mut f);
    no_shell_ran(d.root(), &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    if let Some(vol) = sidecar {
        d.delete(&vol.volume_id).await.unwrap();
    }
    d.delete(&real).await.unwrap();
    assert!(d.list_all().await.is_empty(), "volumes left");
}

// ---- snapshot names ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_names_are_opaque_and_bounded() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let source = new_volume(&mut d, "source", block_cap(snw())).await;
    let snapshot = |name: &str| csi::CreateSnapshotRequest {
        source_volume_id: source.clone(),
        name: name.into(),
        ..Default::default()
    };
    let advertised = d
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .any(|c| {
            matches!(
                &c.r#type,
                Some(csi::controller_service_capability::Type::Rpc(rpc))
                    if rpc.r#type
                        == csi::controller_service_capability::rpc::Type::CreateDeleteSnapshot
                            as i32
            )
        });
    if !advertised {
        f.refused(
            "CreateSnapshot",
            d.controller.create_snapshot(snapshot("s")).await,
            &[Code::Unimplemented],
            &[],
        );
        still_serving(&mut d).await;
        f.assert_none();
        return;
    }

    let root = s(d.root());
    let mut snaps = Vec::new();
    for name in [
        "../../x".to_string(),
        "a/b".into(),
        "/etc/passwd".into(),
        "..".into(),
        format!("`touch {root}/pwned`"),
        "$(touch /tmp/pwned)".into(),
        format!("{source}.img"),
        source.clone(),
        "\u{202e}gpj.exe".into(),
        "zero\u{200b}width".into(),
    ] {
        let what = format!("CreateSnapshot(name={})", shown(&name));
        if let Some(reply) = f.ok(&what, d.controller.create_snapshot(snapshot(&name)).await) {
            let snap = reply.into_inner().snapshot.unwrap();
            f.check(VolumeId::parse(&snap.snapshot_id).is_some(), || {
                format!("{what}: id {:?} is not a driver id", snap.snapshot_id)
            });
            f.check(snap.snapshot_id != source, || {
                format!("{what}: the id was taken from the name")
            });
            snaps.push(snap.snapshot_id);
        }
    }
    for name in [
        String::new(),
        "a\0b".into(),
        "\u{1b}[2J".into(),
        "n".repeat(HUNDRED_KB),
        "\u{200b}".repeat(HUNDRED_KB / 3),
    ] {
        f.refused(
            &format!("CreateSnapshot(name={})", shown(&name)),
            d.controller.create_snapshot(snapshot(&name)).await,
            &[Code::InvalidArgument],
            &["name"],
        );
    }
    let mut req = snapshot("params");
    req.parameters = HashMap::from([("../x".to_string(), "k".repeat(HUNDRED_KB))]);
    f.refused(
        "CreateSnapshot(parameters=hostile)",
        d.controller.create_snapshot(req).await,
        &[Code::InvalidArgument],
        &["parameters"],
    );

    check_state_dir(&d, &mut f);
    no_shell_ran(d.root(), &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    for id in &snaps {
        d.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    d.delete(&source).await.unwrap();
}

// ---- no shell ----

/// Tools run through one function with an argument vector: no `sh -c` anywhere in the driver.
#[test]
fn the_driver_never_runs_a_shell() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut commands = Vec::new();
    for rel in walk(&src) {
        let path = src.join(&rel);
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for shell in [
                "\"sh\"",
                "\"/bin/sh\"",
                "\"bash\"",
                "\"/bin/bash\"",
                "\"-c\"",
            ] {
                assert!(
                    !code.contains(shell),
                    "{}:{}: {shell} in {line:?}",
                    rel.display(),
                    n + 1
                );
            }
            // src/bin/loopcsi-bench is the benchmark, not the driver: it runs fio and
            // losetup itself (never through a shell, which the check above covers).
            if code.contains("Command::new") && !rel.starts_with("bin") {
                commands.push(format!("{}:{}", rel.display(), n + 1));
            }
        }
    }
    assert!(
        commands.iter().all(|c| c.starts_with("host/tools.rs:")),
        "processes are started outside host/tools.rs: {commands:?}"
    );
}
