//! Every error case of every RPC the driver serves: the exact gRPC code, and a message that
//! names the offending field or value (CSI v1.12 spec and what csi-sanity asserts).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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

// ---- Identity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_name_version_capabilities_and_readiness() {
    let mut d = TestDriver::start().await;
    let info = d
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "loopcsi.dev");
    // csi-sanity: 2..=63 chars, a letter at both ends.
    let bytes = info.name.as_bytes();
    assert!(bytes.len() >= 2 && bytes.len() <= 63);
    assert!(bytes[0].is_ascii_alphabetic() && bytes[bytes.len() - 1].is_ascii_alphabetic());
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    use csi::plugin_capability::service::Type as Service;
    let caps = d
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use csi::plugin_capability::volume_expansion::Type as Expansion;
    let mut services = HashSet::new();
    let mut expansion = Vec::new();
    for c in &caps {
        match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => {
                services.insert(s.r#type);
            }
            Some(csi::plugin_capability::Type::VolumeExpansion(e)) => expansion.push(e.r#type),
            other => panic!("unexpected plugin capability {other:?}"),
        }
    }
    assert_eq!(caps.len(), 3, "{caps:?}");
    assert_eq!(
        services,
        HashSet::from([
            Service::ControllerService as i32,
            Service::VolumeAccessibilityConstraints as i32
        ])
    );
    assert_eq!(
        expansion,
        vec![Expansion::Online as i32],
        "online volume expansion"
    );

    // Any RPC that needs the recovered state waits for recovery; after it, Probe is ready.
    d.list_all().await;
    let probe = d
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

// ---- CreateVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_rejects_missing_and_unsupported_capabilities() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());

    // Missing name, missing capabilities.
    assert_err(
        d.create(create_req("", 16 * MIB, cap.clone())).await,
        Code::InvalidArgument,
        &["name"],
    );
    let mut no_caps = create_req("pvc-nocaps", 16 * MIB, cap.clone());
    no_caps.volume_capabilities.clear();
    assert_err(
        d.create(no_caps).await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );

    // A capability without access_mode, with an UNKNOWN mode, or without access_type.
    let mut no_mode = cap.clone();
    no_mode.access_mode = None;
    assert_err(
        d.create(create_req("pvc-nomode", 16 * MIB, no_mode)).await,
        Code::InvalidArgument,
        &["volume_capabilities", "access_mode"],
    );
    assert_err(
        d.create(create_req(
            "pvc-unknown-mode",
            16 * MIB,
            mount_cap("ext4", Mode::Unknown),
        ))
        .await,
        Code::InvalidArgument,
        &["access_mode"],
    );
    let mut no_type = cap.clone();
    no_type.access_type = None;
    assert_err(
        d.create(create_req("pvc-notype", 16 * MIB, no_type)).await,
        Code::InvalidArgument,
        &["volume_capabilities", "access_type"],
    );

    // Multi-node access modes: a loop device lives on one node.
    for m in [
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter,
    ] {
        assert_err(
            d.create(create_req("pvc-multi", 16 * MIB, mount_cap("ext4", m)))
                .await,
            Code::InvalidArgument,
            &["volume_capabilities", m.as_str_name()],
        );
        assert_err(
            d.create(create_req("pvc-multi-blk", 16 * MIB, block_cap(m)))
                .await,
            Code::InvalidArgument,
            &[m.as_str_name()],
        );
        // Also when only one of several capabilities is unsupported.
        let mut mixed = create_req("pvc-multi-2", 16 * MIB, cap.clone());
        mixed.volume_capabilities.push(mount_cap("ext4", m));
        assert_err(
            d.create(mixed).await,
            Code::InvalidArgument,
            &[m.as_str_name()],
        );
    }

    // File system types loopcsi does not make, or that smuggle options.
    for fs in ["btrfs", "ext4 -o x", "ext4,xfs", "../ext4"] {
        assert_err(
            d.create(create_req("pvc-fs", 16 * MIB, mount_cap(fs, snw())))
                .await,
            Code::InvalidArgument,
            &["fs_type", fs],
        );
    }

    // Mount and block at once, or two file systems at once.
    let mut both = create_req("pvc-both", 16 * MIB, cap.clone());
    both.volume_capabilities.push(block_cap(snw()));
    assert_err(
        d.create(both).await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    let mut two_fs = create_req("pvc-two-fs", 300 * MIB, cap.clone());
    two_fs.volume_capabilities.push(mount_cap("xfs", snw()));
    assert_err(
        d.create(two_fs).await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );

    assert!(
        d.list_all().await.is_empty(),
        "no refused request made a volume"
    );
    assert_eq!(
        walk(&d.state_dir().join("volumes")),
        Vec::<PathBuf>::new(),
        "no refused request left a file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_name_rules() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());

    let max = "n".repeat(128);
    let too_long = "n".repeat(129);
    // 127 ASCII bytes + a 2-byte character = 129 bytes in 128 characters.
    let too_long_utf8 = format!("{}é", "n".repeat(127));
    for bad in [&too_long, &too_long_utf8] {
        assert_err(
            d.create(create_req(bad, 8 * MIB, cap.clone())).await,
            Code::InvalidArgument,
            &["name", "128"],
        );
    }
    for bad in [
        "nul\u{0}byte",
        "bell\u{7}",
        "vt\u{b}",
        "ff\u{c}",
        "esc\u{1b}[31m",
        "del\u{7f}",
        "c1\u{85}",
        "c1\u{9f}",
    ] {
        assert_err(
            d.create(create_req(bad, 8 * MIB, cap.clone())).await,
            Code::InvalidArgument,
            &["name", "control character"],
        );
    }

    let good = [
        max.clone(),
        "a/b".to_string(),
        "../../etc/passwd".to_string(),
        "/absolute".to_string(),
        ".".to_string(),
        "..".to_string(),
        "with spaces in it".to_string(),
        "ünïcødé-卷-💾".to_string(),
        "tab\tnewline\ncr\r".to_string(),
        format!("{}é", "n".repeat(126)), // exactly 128 bytes
    ];
    let mut ids = HashSet::new();
    for name in &good {
        let vol = d
            .create(create_req(name, 8 * MIB, cap.clone()))
            .await
            .unwrap_or_else(|e| panic!("name {name:?} refused: {e:?}"));
        assert_eq!(vol.capacity_bytes, 8 * MIB);
        // Idempotent by that name.
        let again = d
            .create(create_req(name, 8 * MIB, cap.clone()))
            .await
            .unwrap();
        assert_eq!(again.volume_id, vol.volume_id, "{name:?}");
        ids.insert(vol.volume_id);
    }
    assert_eq!(ids.len(), good.len(), "one volume per name");
    assert_eq!(d.list_all().await.len(), good.len());

    // No name ever becomes a path: the state dir holds only <uuid>.img/.json files.
    for rel in walk(&d.state_dir()) {
        let text = rel.display().to_string();
        // The driver's own directories and fixed files (the state dir's lock and node id).
        if ["volumes", "node", "snapshots", "frozen", "lock", "node-id"].contains(&text.as_str()) {
            continue;
        }
        let file = rel.file_name().unwrap().to_str().unwrap();
        let stem = file
            .strip_suffix(".img")
            .or_else(|| file.strip_suffix(".json"))
            .unwrap_or_else(|| panic!("unexpected file {text:?} in the state dir"));
        assert!(ids.contains(stem), "{text:?} is not named by a volume id");
        assert_eq!(rel.components().count(), 2, "{text:?}");
    }
    // Nothing was made beside the state dir either.
    let mut top: Vec<String> = std::fs::read_dir(d.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, vec!["csi.sock".to_string(), "state".to_string()]);

    for id in &ids {
        d.delete(id).await.unwrap();
    }
    assert!(d.list_all().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_capacity_range_errors() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let with_range = |name: &str, r: Option<csi::CapacityRange>| {
        let mut req = create_req(name, 0, cap.clone());
        req.capacity_range = r;
        req
    };

    assert_err(
        d.create(with_range("neg-req", range(-1, 0))).await,
        Code::InvalidArgument,
        &["required_bytes", "-1"],
    );
    assert_err(
        d.create(with_range("neg-req-2", range(-(64 * MIB), 64 * MIB)))
            .await,
        Code::InvalidArgument,
        &["required_bytes"],
    );
    assert_err(
        d.create(with_range("neg-lim", range(0, -1))).await,
        Code::InvalidArgument,
        &["limit_bytes", "-1"],
    );
    assert_err(
        d.create(with_range("neg-lim-2", range(16 * MIB, -(16 * MIB))))
            .await,
        Code::InvalidArgument,
        &["limit_bytes"],
    );

    // limit < required.
    assert_err(
        d.create(with_range("lim-lt-req", range(64 * MIB, 32 * MIB)))
            .await,
        Code::OutOfRange,
        &["limit_bytes"],
    );
    // An exact size that is not a whole MiB: no size the driver makes fits.
    assert_err(
        d.create(with_range("odd-exact", exact_range(20 * MIB + 1)))
            .await,
        Code::OutOfRange,
        &["capacity_range"],
    );
    // A limit under the file system's minimum (ext4 16 MiB, xfs 300 MiB).
    assert_err(
        d.create(with_range("tiny-limit", range(0, 8 * MIB))).await,
        Code::OutOfRange,
        &["capacity_range"],
    );
    let mut xfs = create_req("xfs-limit", 0, mount_cap("xfs", snw()));
    xfs.capacity_range = range(100 * MIB, 200 * MIB);
    assert_err(d.create(xfs).await, Code::OutOfRange, &["capacity_range"]);
    // Sizes no file can have.
    assert_err(
        d.create(with_range("max", range(i64::MAX, 0))).await,
        Code::OutOfRange,
        &["required_bytes"],
    );
    assert_err(
        d.create(with_range("max-exact", exact_range(i64::MAX)))
            .await,
        Code::OutOfRange,
        &["capacity_range"],
    );

    // Larger than what the pool can hold.
    let available = capacity(&mut d, csi::GetCapacityRequest::default())
        .await
        .available_capacity;
    assert!(available > 0);
    let too_big = available + GIB;
    assert_err(
        d.create(with_range("too-big", range(too_big, 0))).await,
        Code::ResourceExhausted,
        &[&too_big.to_string(), "available"],
    );

    assert!(
        d.list_all().await.is_empty(),
        "no refused request made a volume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_sizes_exact_default_and_rounded() {
    let mut d = TestDriver::start().await;

    // required = limit = 10 GiB: exactly 10 GiB, and sparse.
    let mut req = create_req("ten-gib", 0, mount_cap("ext4", snw()));
    req.capacity_range = exact_range(10 * GIB);
    let ten = d.create(req.clone()).await.unwrap();
    assert_eq!(ten.capacity_bytes, 10 * GIB);
    let image = std::fs::metadata(d.image_path(&ten.volume_id)).unwrap();
    assert_eq!(image.len(), 10 << 30);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&image) * 512 < (1 << 20),
        "a thin volume is sparse"
    );
    assert_eq!(d.create(req).await.unwrap(), ten, "idempotent");

    // No capacity_range: 1 GiB.
    let mut req = create_req("default", 0, mount_cap("ext4", snw()));
    req.capacity_range = None;
    let default = d.create(req).await.unwrap();
    assert_eq!(default.capacity_bytes, GIB);

    // xfs under 300 MiB rounds up to 300 MiB; ext4 and block round up to a whole MiB.
    let xfs = d
        .create(create_req("small-xfs", 100 * MIB, mount_cap("xfs", snw())))
        .await
        .unwrap();
    assert_eq!(xfs.capacity_bytes, 300 * MIB);
    let ext4 = d
        .create(create_req(
            "odd-ext4",
            20 * MIB + 1,
            mount_cap("ext4", snw()),
        ))
        .await
        .unwrap();
    assert_eq!(ext4.capacity_bytes, 21 * MIB);
    let tiny = d
        .create(create_req("tiny-ext4", 1, mount_cap("ext4", snw())))
        .await
        .unwrap();
    assert_eq!(tiny.capacity_bytes, 16 * MIB, "ext4 minimum");
    // Only a limit: the largest whole MiB under it.
    let mut limited = create_req("limit-only", 0, block_cap(snw()));
    limited.capacity_range = range(0, 10 * MIB + 5);
    assert_eq!(d.create(limited).await.unwrap().capacity_bytes, 10 * MIB);

    for v in d.list_all().await {
        d.delete(&v.volume_id).await.unwrap();
    }
    assert!(d.list_all().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_same_name_other_arguments_already_exists() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let first = d
        .create(create_req("pvc-a", 32 * MIB, cap.clone()))
        .await
        .unwrap();

    // Same arguments: the same volume, the same response.
    let again = d
        .create(create_req("pvc-a", 32 * MIB, cap.clone()))
        .await
        .unwrap();
    assert_eq!(again, first);
    // A compatible range (the existing size fits it) is the same volume too.
    let mut fits = create_req("pvc-a", 0, cap.clone());
    fits.capacity_range = range(16 * MIB, 64 * MIB);
    assert_eq!(d.create(fits).await.unwrap().volume_id, first.volume_id);

    // Another size.
    assert_err(
        d.create(create_req("pvc-a", 64 * MIB, cap.clone())).await,
        Code::AlreadyExists,
        &["pvc-a"],
    );
    let mut smaller = create_req("pvc-a", 0, cap.clone());
    smaller.capacity_range = exact_range(16 * MIB);
    assert_err(d.create(smaller).await, Code::AlreadyExists, &["pvc-a"]);
    // Another file system, or block.
    assert_err(
        d.create(create_req("pvc-a", 32 * MIB, mount_cap("xfs", snw())))
            .await,
        Code::AlreadyExists,
        &["pvc-a", "xfs"],
    );
    assert_err(
        d.create(create_req("pvc-a", 32 * MIB, block_cap(snw())))
            .await,
        Code::AlreadyExists,
        &["pvc-a"],
    );
    // Other parameters.
    assert_err(
        d.create(with_params(
            create_req("pvc-a", 32 * MIB, cap.clone()),
            &[("provisioning", "thick")],
        ))
        .await,
        Code::AlreadyExists,
        &["pvc-a"],
    );

    assert_eq!(d.list_all().await.len(), 1, "still one volume");
    d.delete(&first.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_parameters_source_and_mutable_parameters() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());

    assert_err(
        d.create(with_params(
            create_req("p-unknown", 16 * MIB, cap.clone()),
            &[("bogus-key", "1")],
        ))
        .await,
        Code::InvalidArgument,
        &["parameters", "bogus-key"],
    );
    assert_err(
        d.create(with_params(
            create_req("p-unknown-2", 16 * MIB, cap.clone()),
            &[("provisioning", "thin"), ("fsType", "xfs")],
        ))
        .await,
        Code::InvalidArgument,
        &["parameters", "fsType"],
    );
    assert_err(
        d.create(with_params(
            create_req("p-bogus", 16 * MIB, cap.clone()),
            &[("provisioning", "bogus")],
        ))
        .await,
        Code::InvalidArgument,
        &["provisioning", "bogus"],
    );

    // Keys the Kubernetes sidecars add are accepted.
    let sidecar = d
        .create(with_params(
            create_req("p-sidecar", 16 * MIB, cap.clone()),
            &[
                ("csi.storage.k8s.io/pvc/name", "data"),
                ("csi.storage.k8s.io/pvc/namespace", "default"),
                ("csi.storage.k8s.io/pv/name", "pvc-1234"),
                ("csi.storage.k8s.io/fstype", "ext4"),
                ("csi.storage.k8s.io/something-new", "x"),
                ("provisioning", "thin"),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(sidecar.capacity_bytes, 16 * MIB);

    // A content source that names nothing of ours: NOT_FOUND (a snapshot id of another shape,
    // well-formed ids of no snapshot or volume); a source of no type: INVALID_ARGUMENT.
    use csi::volume_content_source::{SnapshotSource, Type as Source, VolumeSource};
    let unknown = random_id();
    for (source, needles) in [
        (
            Source::Snapshot(SnapshotSource {
                snapshot_id: "snap-1".into(),
            }),
            vec!["snapshot", "snap-1"],
        ),
        (
            Source::Snapshot(SnapshotSource {
                snapshot_id: unknown.clone(),
            }),
            // A well-formed id of no snapshot here may be another node's: the message says which
            // node's pool was looked in.
            vec![
                "snapshot",
                unknown.as_str(),
                "in the pool of node",
                "only on that node",
            ],
        ),
        (
            Source::Volume(VolumeSource {
                volume_id: unknown.clone(),
            }),
            vec!["volume", unknown.as_str(), "in the pool of node"],
        ),
    ] {
        let mut req = create_req("p-source", 16 * MIB, cap.clone());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        assert_err(d.create(req).await, Code::NotFound, &needles);
    }
    let mut req = create_req("p-source", 16 * MIB, cap.clone());
    req.volume_content_source = Some(csi::VolumeContentSource { r#type: None });
    assert_err(
        d.create(req).await,
        Code::InvalidArgument,
        &["volume_content_source"],
    );

    // mutable_parameters without MODIFY_VOLUME.
    let mut req = create_req("p-mutable", 16 * MIB, cap.clone());
    req.mutable_parameters = params(&[("iops", "100")]);
    assert_err(
        d.create(req).await,
        Code::InvalidArgument,
        &["mutable_parameters"],
    );

    assert_eq!(d.list_all().await.len(), 1);
    d.delete(&sidecar.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_from_an_existing_volume_is_a_clone() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let source = new_volume(&mut d, "c-source", 16 * MIB, cap.clone()).await;
    use csi::volume_content_source::{Type as Source, VolumeSource};
    let content = csi::VolumeContentSource {
        r#type: Some(Source::Volume(VolumeSource {
            volume_id: source.clone(),
        })),
    };
    let mut req = create_req("c-clone", 16 * MIB, cap.clone());
    req.volume_content_source = Some(content.clone());
    let clone = d
        .create(req.clone())
        .await
        .expect("a clone of an existing volume");
    assert_ne!(clone.volume_id, source);
    assert_eq!(clone.capacity_bytes, 16 * MIB);
    assert_eq!(clone.content_source, Some(content));
    // Idempotent by name.
    assert_eq!(d.create(req).await.unwrap().volume_id, clone.volume_id);
    assert_eq!(d.list_all().await.len(), 2);
    d.delete(&clone.volume_id).await.unwrap();
    d.delete(&source).await.unwrap();
    assert!(d.list_all().await.is_empty());
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_topology_requirements() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());

    let mut elsewhere = create_req("t-elsewhere", 8 * MIB, cap.clone());
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topology("other-node"), topology("third-node")],
        preferred: vec![topology("other-node")],
    });
    assert_err(
        d.create(elsewhere).await,
        Code::ResourceExhausted,
        &["requisite", NODE],
    );
    let mut other_key = create_req("t-other-key", 8 * MIB, cap.clone());
    other_key.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: HashMap::from([("topology.kubernetes.io/zone".into(), "z1".into())]),
        }],
        preferred: vec![],
    });
    assert_err(
        d.create(other_key).await,
        Code::ResourceExhausted,
        &["requisite"],
    );
    assert!(d.list_all().await.is_empty());

    let mut here = create_req("t-here", 8 * MIB, cap.clone());
    here.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topology("other-node"), topology(NODE)],
        preferred: vec![topology(NODE)],
    });
    let vol = d.create(here).await.unwrap();
    assert_eq!(vol.accessible_topology, vec![topology(NODE)]);
    // Without requirements the volume still reports where it lives.
    let plain = d
        .create(create_req("t-plain", 8 * MIB, cap.clone()))
        .await
        .unwrap();
    assert_eq!(plain.accessible_topology, vec![topology(NODE)]);

    d.delete(&vol.volume_id).await.unwrap();
    d.delete(&plain.volume_id).await.unwrap();
}

// ---- DeleteVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_errors_and_unknown_ids() {
    let mut d = TestDriver::start().await;
    assert_err(d.delete("").await, Code::InvalidArgument, &["volume_id"]);
    for unknown in [
        "fake-vol-id".to_string(),
        "../../etc".to_string(),
        "/".to_string(),
        random_id(),
        random_id().to_uppercase(),
    ] {
        d.delete(&unknown)
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume({unknown:?}): {e:?}"));
    }

    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "del-staged", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    assert_err(d.delete(&id).await, Code::FailedPrecondition, &[&id]);
    assert!(
        d.image_path(&id).exists(),
        "a refused delete keeps the data"
    );
    assert_eq!(d.list_all().await.len(), 1);
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.delete(&id).await.unwrap();
    assert!(!d.image_path(&id).exists());
    assert!(d.list_all().await.is_empty());
    d.assert_clean();
}

// ---- ValidateVolumeCapabilities ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_volume_capabilities_errors_and_answers() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "val", 16 * MIB, cap.clone()).await;
    let validate =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };

    assert_err(
        d.controller
            .validate_volume_capabilities(validate("", vec![cap.clone()]))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.controller
            .validate_volume_capabilities(validate(&id, vec![]))
            .await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    // Required fields win over NOT_FOUND.
    assert_err(
        d.controller
            .validate_volume_capabilities(validate(&random_id(), vec![]))
            .await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.controller
                .validate_volume_capabilities(validate(&unknown, vec![cap.clone()]))
                .await,
            Code::NotFound,
            &[&unknown],
        );
    }
    let mut no_mode = cap.clone();
    no_mode.access_mode = None;
    assert_err(
        d.controller
            .validate_volume_capabilities(validate(&id, vec![no_mode]))
            .await,
        Code::InvalidArgument,
        &["access_mode"],
    );

    // Supported: confirmed, echoing the capabilities.
    let supported = vec![
        cap.clone(),
        mount_cap("", Mode::SingleNodeReaderOnly),
        mount_cap("ext4", Mode::SingleNodeMultiWriter),
    ];
    let mut req = validate(&id, supported.clone());
    req.volume_context = params(&[("k", "v")]);
    let reply = d
        .controller
        .validate_volume_capabilities(req)
        .await
        .unwrap()
        .into_inner();
    let confirmed = reply
        .confirmed
        .expect("supported capabilities are confirmed");
    assert_eq!(confirmed.volume_capabilities, supported);
    assert_eq!(confirmed.volume_context, params(&[("k", "v")]));

    // Unsupported: OK, nothing confirmed, and a message saying why.
    for (caps, why) in [
        (vec![block_cap(snw())], "block"),
        (vec![cap.clone(), block_cap(snw())], "block"),
        (vec![mount_cap("xfs", snw())], "xfs"),
        (
            vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            vec![mount_cap("ext4", Mode::MultiNodeReaderOnly)],
            "MULTI_NODE_READER_ONLY",
        ),
    ] {
        let reply = d
            .controller
            .validate_volume_capabilities(validate(&id, caps.clone()))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.confirmed.is_none(), "{caps:?} confirmed");
        assert!(
            reply.message.contains(why),
            "message {:?} does not mention {why:?}",
            reply.message
        );
    }
    d.delete(&id).await.unwrap();
}

// ---- ListVolumes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_paging_and_token_errors() {
    let mut d = TestDriver::start().await;
    let mut created = HashSet::new();
    for i in 0..5 {
        created.insert(new_volume(&mut d, &format!("list-{i}"), 8 * MIB, block_cap(snw())).await);
    }

    // max_entries = 2 visits every volume exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(&mut d, 2, &token).await.unwrap();
        pages += 1;
        assert!(page.entries.len() <= 2, "{} entries", page.entries.len());
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.clone().unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        assert_eq!(page.entries.len(), 2, "a page before the last is full");
        token = page.next_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5, "no duplicates: {seen:?}");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), created);

    // max_entries 0 (and more than there are) returns everything.
    for max in [0, 5, 1000] {
        let all = list(&mut d, max, "").await.unwrap();
        assert_eq!(all.entries.len(), 5, "max_entries {max}");
        assert!(all.next_token.is_empty());
    }

    assert_err(
        list(&mut d, -1, "").await,
        Code::InvalidArgument,
        &["max_entries"],
    );
    assert_err(
        list(&mut d, i32::MIN, "").await,
        Code::InvalidArgument,
        &["max_entries"],
    );

    let first = list(&mut d, 2, "").await.unwrap();
    let good = first.next_token.clone();
    assert!(!good.is_empty());
    assert_eq!(list(&mut d, 2, &good).await.unwrap().entries.len(), 2);
    for bogus in ["invalid-token", "x.y", ".", "1"] {
        assert_err(
            list(&mut d, 2, bogus).await,
            Code::Aborted,
            &["starting_token"],
        );
    }
    // A token whose MAC was altered.
    let mut altered = good.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == '0' { '1' } else { '0' });
    assert_err(
        list(&mut d, 2, &altered).await,
        Code::Aborted,
        &["starting_token"],
    );
    // A token pointing at another id with the same MAC.
    let (_, mac) = good.split_once('.').unwrap();
    let forged = format!("{}.{mac}", random_id());
    assert_err(
        list(&mut d, 2, &forged).await,
        Code::Aborted,
        &["starting_token"],
    );

    // A token issued before a restart.
    d.restart().await;
    assert_err(
        list(&mut d, 2, &good).await,
        Code::Aborted,
        &["starting_token"],
    );
    assert_eq!(list(&mut d, 0, "").await.unwrap().entries.len(), 5);

    // A token stays valid when the volumes it was issued after are deleted: the next page has
    // the rest, no duplicates and nothing deleted.
    let first = list(&mut d, 2, "").await.unwrap();
    let listed: Vec<String> = first
        .entries
        .iter()
        .map(|e| e.volume.clone().unwrap().volume_id)
        .collect();
    for id in &listed {
        d.delete(id).await.unwrap();
    }
    let rest = list(&mut d, 0, &first.next_token).await.unwrap();
    let rest: HashSet<String> = rest
        .entries
        .iter()
        .map(|e| e.volume.clone().unwrap().volume_id)
        .collect();
    let expected: HashSet<String> = created
        .iter()
        .filter(|id| !listed.contains(id))
        .cloned()
        .collect();
    assert_eq!(rest, expected);

    for id in &created {
        d.delete(id).await.unwrap();
    }
    assert!(d.list_all().await.is_empty());
}

// ---- GetCapacity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_reports_pool_space_and_zero_when_unusable() {
    let mut d = TestDriver::start().await;
    d.list_all().await;

    let before = pool_free(&d);
    let all = capacity(&mut d, csi::GetCapacityRequest::default()).await;
    let after = pool_free(&d);
    assert!(all.available_capacity > 0, "{all:?}");
    assert!(
        all.available_capacity <= before.max(after),
        "{} > free space {before}/{after}",
        all.available_capacity
    );
    assert_eq!(all.available_capacity % MIB, 0, "whole MiB");
    if let Some(max) = all.maximum_volume_size {
        assert!(max >= 0 && max <= before.max(after));
    }

    // Supported capabilities, this node's topology, good parameters: positive.
    let ok = capacity(
        &mut d,
        csi::GetCapacityRequest {
            volume_capabilities: vec![
                mount_cap("xfs", snw()),
                mount_cap("xfs", Mode::SingleNodeReaderOnly),
            ],
            parameters: params(&[
                ("provisioning", "thick"),
                ("csi.storage.k8s.io/pvc/name", "x"),
            ]),
            accessible_topology: Some(topology(NODE)),
        },
    )
    .await;
    assert!(ok.available_capacity > 0, "{ok:?}");

    // Another node's topology: nothing here is usable there.
    let other = capacity(
        &mut d,
        csi::GetCapacityRequest {
            accessible_topology: Some(topology("other-node")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(other.available_capacity, 0, "{other:?}");

    // Capabilities loopcsi does not serve: 0.
    for caps in [
        vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
        vec![block_cap(Mode::MultiNodeReaderOnly)],
        vec![mount_cap("btrfs", snw())],
        vec![mount_cap("ext4", snw()), block_cap(snw())],
    ] {
        let reply = capacity(
            &mut d,
            csi::GetCapacityRequest {
                volume_capabilities: caps.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(reply.available_capacity, 0, "{caps:?}: {reply:?}");
    }

    // Bad parameters: the same answer CreateVolume gives.
    for (pairs, needle) in [
        (vec![("bogus-key", "1")], "bogus-key"),
        (vec![("provisioning", "bogus")], "provisioning"),
    ] {
        assert_err(
            d.controller
                .get_capacity(csi::GetCapacityRequest {
                    parameters: params(&pairs),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &[needle],
        );
    }
    // A malformed capability is a bad request, not zero capacity.
    let mut no_mode = mount_cap("ext4", snw());
    no_mode.access_mode = None;
    assert_err(
        d.controller
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![no_mode],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["access_mode"],
    );
}

/// A volume of the reported capacity is not refused for space (thin volumes are sparse, so
/// this costs nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_figure_can_be_created() {
    let mut d = TestDriver::start().await;
    let mut created = None;
    // Other tests write to the same file system concurrently; if the pool shrank between the
    // two calls the refusal is legitimate, so ask again (a bounded number of times).
    for attempt in 0..5 {
        let reply = capacity(
            &mut d,
            csi::GetCapacityRequest {
                volume_capabilities: vec![block_cap(snw())],
                ..Default::default()
            },
        )
        .await;
        let size = reply.available_capacity;
        assert!(size > 0);
        if let Some(max) = reply.maximum_volume_size {
            assert!(max > 0, "{reply:?}");
        }
        match d
            .create(create_req(
                &format!("max-{attempt}"),
                size,
                block_cap(snw()),
            ))
            .await
        {
            Ok(vol) => {
                assert_eq!(vol.capacity_bytes, size);
                created = Some(vol.volume_id);
                break;
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "{}",
                    status.message()
                );
                let now = capacity(&mut d, csi::GetCapacityRequest::default())
                    .await
                    .available_capacity;
                assert!(
                    now < size,
                    "refused {size} bytes for space while {now} are available: {}",
                    status.message()
                );
            }
        }
    }
    let id = created.expect("a volume of the reported capacity was created");
    d.delete(&id).await.unwrap();
    assert!(d.list_all().await.is_empty());
}

// ---- ControllerGetCapabilities and unadvertised RPCs ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_capabilities_exact_and_unadvertised_rpcs_unimplemented() {
    let mut d = TestDriver::start().await;
    use csi::controller_service_capability::rpc::Type as Rpc;
    let caps = d
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let kinds: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => r.r#type,
            other => panic!("unexpected controller capability {other:?}"),
        })
        .collect();
    // EXPAND_VOLUME is the node's only: in a node-local deployment the cluster's one resizer
    // could not reach other nodes' pools, so NodeExpandVolume does the whole expansion.
    assert_eq!(kinds.len(), 10, "{kinds:?}");
    assert_eq!(
        kinds.into_iter().collect::<HashSet<_>>(),
        HashSet::from([
            Rpc::CreateDeleteVolume as i32,
            Rpc::ListVolumes as i32,
            Rpc::GetCapacity as i32,
            Rpc::SingleNodeMultiWriter as i32,
            Rpc::CreateDeleteSnapshot as i32,
            Rpc::ListSnapshots as i32,
            Rpc::GetSnapshot as i32,
            Rpc::CloneVolume as i32,
            Rpc::GetVolume as i32,
            Rpc::VolumeCondition as i32,
        ])
    );

    // Only the RPCs of capabilities that are not advertised remain UNIMPLEMENTED.
    let id = random_id();
    assert_err(
        d.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                volume_capability: Some(mount_cap("ext4", snw())),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        &["ControllerPublishVolume"],
    );
    assert_err(
        d.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        &["ControllerUnpublishVolume"],
    );
    assert_err(
        d.controller
            .controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        &["ControllerModifyVolume"],
    );
    // ControllerExpandVolume whatever it is asked: of an unknown volume, without a range, or a
    // well-formed request for a real one (which it must not grow).
    let real = d
        .create(create_req(
            "not-expanded",
            16 * MIB,
            mount_cap("ext4", snw()),
        ))
        .await
        .unwrap()
        .volume_id;
    for req in [
        csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: range(GIB, 0),
            ..Default::default()
        },
        csi::ControllerExpandVolumeRequest::default(),
        csi::ControllerExpandVolumeRequest {
            volume_id: real.clone(),
            capacity_range: range(32 * MIB, 0),
            volume_capability: Some(mount_cap("ext4", snw())),
            ..Default::default()
        },
    ] {
        assert_err(
            d.controller.controller_expand_volume(req).await,
            Code::Unimplemented,
            &["ControllerExpandVolume"],
        );
    }
    assert_eq!(
        std::fs::metadata(d.image_path(&real)).unwrap().len(),
        16 << 20,
        "ControllerExpandVolume grew nothing"
    );
    d.delete(&real).await.unwrap();

    // The advertised ones are served: an unknown id is NOT_FOUND (or OK where the spec says
    // so), never UNIMPLEMENTED.
    assert_err(
        d.controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: "snap".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    d.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot of an unknown snapshot is OK");
    let listed = d
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots is served")
        .into_inner();
    assert!(listed.entries.is_empty() && listed.next_token.is_empty());
    assert_err(
        d.controller
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    assert_err(
        d.controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    assert_err(
        d.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: "/mnt/x".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &[&id],
    );
    d.assert_clean();
}

// ---- NodeStageVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_required_fields_and_unknown_volume() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let staging = s(&d.staging("s"));

    assert_err(
        d.node
            .node_stage_volume(stage_req("", &staging, Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    // Required fields are checked before the (unknown) id is looked up.
    assert_err(
        d.node
            .node_stage_volume(stage_req(&random_id(), "", Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["staging_target_path"],
    );
    assert_err(
        d.node
            .node_stage_volume(stage_req(&random_id(), &staging, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    assert_err(
        d.node
            .node_stage_volume(stage_req("fake-vol-id", &staging, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    let mut no_type = cap.clone();
    no_type.access_type = None;
    assert_err(
        d.node
            .node_stage_volume(stage_req(&random_id(), &staging, Some(no_type)))
            .await,
        Code::InvalidArgument,
        &["volume_capability", "access_type"],
    );
    assert_err(
        d.node
            .node_stage_volume(csi::NodeStageVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );

    // Unknown ids, well-formed or not.
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.node
                .node_stage_volume(stage_req(&unknown, &staging, Some(cap.clone())))
                .await,
            Code::NotFound,
            &[&unknown],
        );
    }

    // A real volume with no capability (csi-sanity).
    let id = new_volume(&mut d, "st", 16 * MIB, cap.clone()).await;
    assert_err(
        d.node
            .node_stage_volume(stage_req(&id, &staging, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_rejects_bad_staging_paths() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "paths", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");

    let relative = "relative/staging";
    let dotdot = format!("{}/../s", s(&staging));
    let state = d.state_dir();
    let inside_state = state.join("volumes");
    let images = state.join("volumes").join(format!("{id}.img"));
    for (path, why) in [
        (relative.to_string(), "absolute"),
        (dotdot, ".."),
        (s(&state), "state dir"),
        (s(&inside_state), "state dir"),
        (s(&images), "state dir"),
        ("/".to_string(), "/"),
    ] {
        assert_err(
            d.node
                .node_stage_volume(stage_req(&id, &path, Some(cap.clone())))
                .await,
            Code::InvalidArgument,
            &["staging_target_path", why],
        );
    }

    // A staging path that is a symlink to another directory: refused, nothing mounted at the
    // link's destination.
    let dest = d.root().join("elsewhere");
    std::fs::create_dir_all(&dest).unwrap();
    let link = d.root().join("staging").join("link");
    std::os::unix::fs::symlink(&dest, &link).unwrap();
    assert_err(
        d.stage(&id, &link, cap.clone()).await,
        Code::InvalidArgument,
        &["staging_target_path"],
    );
    assert_eq!(mounts_at(&dest), 0, "mounted through the symlink");
    assert_eq!(mounts_at(&link), 0);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    d.assert_clean();

    // A symlink into the state dir.
    let into_state = d.root().join("staging").join("link-state");
    std::os::unix::fs::symlink(&inside_state, &into_state).unwrap();
    assert_err(
        d.stage(&id, &into_state, cap.clone()).await,
        Code::InvalidArgument,
        &["staging_target_path", "state dir"],
    );
    assert_eq!(mounts_at(&inside_state), 0);
    d.assert_clean();

    // The volume is still usable at a proper path.
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

/// The stage record is written while the kernel work runs; a stage that fails must leave the
/// record as it was, so that neither publish nor the reconciler acts on a stage that never was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_stage_leaves_the_stage_record_as_it_was() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "record", 16 * MIB, cap.clone()).await;
    let record = d.state_dir().join("node").join(&id).join("staged.json");
    let not_a_dir = d.root().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();

    // Never staged: a failed stage leaves no record, and publish does not stage it from one.
    assert!(d.stage(&id, &not_a_dir, cap.clone()).await.is_err());
    assert!(!record.exists(), "a failed stage left a record");
    let target = d.target("t");
    assert_err(
        d.node
            .node_publish_volume(publish_req(
                &id,
                &s(&not_a_dir),
                &s(&target),
                Some(cap.clone()),
            ))
            .await,
        Code::FailedPrecondition,
        &["stag"],
    );
    d.assert_clean();

    // Staged elsewhere before (and lost to a reboot): a failed stage keeps the earlier record.
    let staging = d.staging("good");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let before = std::fs::read(&record).unwrap();
    d.simulate_reboot();
    assert!(d.stage(&id, &not_a_dir, cap.clone()).await.is_err());
    assert_eq!(
        std::fs::read(&record).unwrap(),
        before,
        "the earlier record changed"
    );
    d.assert_clean();

    // The earlier record still lets the volume be staged where it was.
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_capability_mismatch_conflicts_and_mount_flags() {
    let mut d = TestDriver::start().await;
    let ext4 = mount_cap("ext4", snw());
    let fs_vol = new_volume(&mut d, "ext4", 16 * MIB, ext4.clone()).await;
    let xfs_vol = new_volume(&mut d, "xfs", 300 * MIB, mount_cap("xfs", snw())).await;
    let blk_vol = new_volume(&mut d, "blk", 8 * MIB, block_cap(snw())).await;
    let staging = d.staging("s");

    // Capabilities the volume cannot serve.
    assert_err(
        d.stage(&fs_vol, &staging, block_cap(snw())).await,
        Code::FailedPrecondition,
        &["volume_capability"],
    );
    assert_err(
        d.stage(&xfs_vol, &staging, ext4.clone()).await,
        Code::FailedPrecondition,
        &["xfs", "ext4"],
    );
    assert_err(
        d.stage(&blk_vol, &staging, ext4.clone()).await,
        Code::FailedPrecondition,
        &["volume_capability"],
    );
    assert_err(
        d.stage(
            &fs_vol,
            &staging,
            mount_cap("ext4", Mode::MultiNodeMultiWriter),
        )
        .await,
        Code::InvalidArgument,
        &["MULTI_NODE_MULTI_WRITER"],
    );
    d.assert_clean();

    // Mount flags that are shell syntax, several options in one, or change what is mounted.
    for flag in [
        "$(reboot)",
        "a;b",
        "a,b",
        "bind",
        "rbind",
        "remount",
        "a b",
        "`id`",
    ] {
        assert_err(
            d.stage(&fs_vol, &staging, mount_cap_flags("ext4", snw(), &[flag]))
                .await,
            Code::InvalidArgument,
            &["mount_flags"],
        );
    }
    // More than the CSI limit of 4 KiB of mount flags in all.
    let long = "a".repeat(1000);
    let many: Vec<&str> = vec![long.as_str(); 5];
    assert_err(
        d.stage(&fs_vol, &staging, mount_cap_flags("ext4", snw(), &many))
            .await,
        Code::InvalidArgument,
        &["mount_flags"],
    );
    // volume_mount_group without VOLUME_MOUNT_GROUP.
    let mut group = ext4.clone();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = group.access_type.as_mut() {
        m.volume_mount_group = "1000".into();
    }
    assert_err(
        d.stage(&fs_vol, &staging, group).await,
        Code::InvalidArgument,
        &["volume_mount_group"],
    );
    d.assert_clean();

    // Staged at the same path with other mount flags (or another mode): ALREADY_EXISTS.
    d.stage(&fs_vol, &staging, ext4.clone()).await.unwrap();
    assert_err(
        d.stage(
            &fs_vol,
            &staging,
            mount_cap_flags("ext4", snw(), &["noatime"]),
        )
        .await,
        Code::AlreadyExists,
        &[&fs_vol],
    );
    assert_err(
        d.stage(
            &fs_vol,
            &staging,
            mount_cap("ext4", Mode::SingleNodeMultiWriter),
        )
        .await,
        Code::AlreadyExists,
        &[&fs_vol],
    );
    // The identical request is still fine.
    d.stage(&fs_vol, &staging, ext4.clone()).await.unwrap();
    assert_eq!(mounts_at(&staging), 1);
    d.unstage(&fs_vol, &staging).await.unwrap();
    d.assert_clean();
    for id in [&fs_vol, &xfs_vol, &blk_vol] {
        d.delete(id).await.unwrap();
    }
}

// ---- NodeUnstageVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unstage_errors() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let staging = d.staging("s");
    let unstage = |id: &str, path: &str| csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
    };

    assert_err(
        d.node.node_unstage_volume(unstage("", &s(&staging))).await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node.node_unstage_volume(unstage(&random_id(), "")).await,
        Code::InvalidArgument,
        &["staging_target_path"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.unstage(&unknown, &staging).await,
            Code::NotFound,
            &[&unknown],
        );
    }

    let id = new_volume(&mut d, "un", 16 * MIB, cap.clone()).await;
    // Never staged: OK (csi-sanity's cleanup does this for every volume).
    d.unstage(&id, &staging).await.unwrap();
    d.unstage(&id, &d.staging("never")).await.unwrap();

    // While published: FAILED_PRECONDITION, and nothing is torn down.
    let target = d.target("p");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_err(
        d.unstage(&id, &staging).await,
        Code::FailedPrecondition,
        &[&id],
    );
    assert_eq!((mounts_at(&staging), mounts_at(&target)), (1, 1));
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

// ---- NodePublishVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_required_fields_and_preconditions() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let staging = d.staging("s");
    let target = d.target("p");
    let (st, tg) = (s(&staging), s(&target));

    // Required fields, checked before the (unknown) id is looked up.
    assert_err(
        d.node
            .node_publish_volume(csi::NodePublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req("", &st, &tg, Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(&random_id(), &st, "", Some(cap.clone())))
            .await,
        Code::InvalidArgument,
        &["target_path"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(&random_id(), &st, &tg, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(&random_id(), "", &tg, None))
            .await,
        Code::InvalidArgument,
        &["volume_capability"],
    );
    assert_err(
        d.node
            .node_publish_volume(publish_req(
                &random_id(),
                &st,
                "relative/target",
                Some(cap.clone()),
            ))
            .await,
        Code::InvalidArgument,
        &["target_path"],
    );
    // Unknown volume, complete request.
    let unknown = random_id();
    assert_err(
        d.node
            .node_publish_volume(publish_req(&unknown, &st, &tg, Some(cap.clone())))
            .await,
        Code::NotFound,
        &[&unknown],
    );

    let id = new_volume(&mut d, "pub", 16 * MIB, cap.clone()).await;
    // Not staged.
    assert_err(
        d.publish(&id, &staging, &target, cap.clone(), false).await,
        Code::FailedPrecondition,
        &[&id],
    );
    assert!(!target.exists());
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    // staging_target_path missing although STAGE_UNSTAGE_VOLUME is advertised.
    assert_err(
        d.node
            .node_publish_volume(publish_req(&id, "", &tg, Some(cap.clone())))
            .await,
        Code::FailedPrecondition,
        &["staging_target_path"],
    );
    // Staged elsewhere than the staging path given.
    assert_err(
        d.publish(&id, &d.staging("other"), &target, cap.clone(), false)
            .await,
        Code::FailedPrecondition,
        &[&id],
    );
    // A capability the volume cannot serve.
    assert_err(
        d.publish(&id, &staging, &target, block_cap(snw()), false)
            .await,
        Code::FailedPrecondition,
        &["volume_capability"],
    );
    assert_eq!(mounts_at(&target), 0);

    // Published; then the same target with readonly flipped or another capability.
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_err(
        d.publish(&id, &staging, &target, cap.clone(), true).await,
        Code::AlreadyExists,
        &[&id],
    );
    assert_err(
        d.publish(
            &id,
            &staging,
            &target,
            mount_cap_flags("ext4", snw(), &["noexec"]),
            false,
        )
        .await,
        Code::AlreadyExists,
        &[&id],
    );
    assert_eq!(mounts_at(&target), 1, "no stacked mount");

    // A target that is a symlink to a directory: refused, nothing mounted at its destination.
    let dest = d.root().join("elsewhere");
    std::fs::create_dir_all(&dest).unwrap();
    let link = d.target("link");
    std::os::unix::fs::symlink(&dest, &link).unwrap();
    d.unpublish(&id, &target).await.unwrap();
    assert_err(
        d.publish(&id, &staging, &link, cap.clone(), false).await,
        Code::InvalidArgument,
        &["target_path"],
    );
    assert_eq!(mounts_at(&dest), 0, "mounted through the symlink");
    assert_eq!(mounts_at(&link), 0);
    // target == staging.
    assert_err(
        d.publish(&id, &staging, &staging, cap.clone(), false).await,
        Code::InvalidArgument,
        &["target_path"],
    );
    // A target inside the state dir.
    assert_err(
        d.publish(&id, &staging, &d.state_dir().join("t"), cap.clone(), false)
            .await,
        Code::InvalidArgument,
        &["target_path", "state dir"],
    );

    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

/// Publishing at a second target: only SINGLE_NODE_MULTI_WRITER allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_second_target_depends_on_access_mode() {
    let mut d = TestDriver::start().await;
    for (m, second_ok) in [
        (Mode::SingleNodeSingleWriter, false),
        (Mode::SingleNodeWriter, false),
        (Mode::SingleNodeReaderOnly, false),
        (Mode::SingleNodeMultiWriter, true),
    ] {
        let name = m.as_str_name().to_lowercase();
        let cap = mount_cap("ext4", m);
        let id = new_volume(&mut d, &name, 16 * MIB, cap.clone()).await;
        let staging = d.staging(&name);
        let first = d.target(&format!("{name}-1"));
        let second = d.target(&format!("{name}-2"));
        d.stage(&id, &staging, cap.clone()).await.unwrap();
        d.publish(&id, &staging, &first, cap.clone(), false)
            .await
            .unwrap();
        let result = d.publish(&id, &staging, &second, cap.clone(), false).await;
        if second_ok {
            result.unwrap_or_else(|e| panic!("{name}: second target refused: {e:?}"));
            assert_eq!(mounts_at(&second), 1);
            d.unpublish(&id, &second).await.unwrap();
        } else {
            assert_err(result, Code::FailedPrecondition, &[&id]);
            assert_eq!(mounts_at(&second), 0, "{name}");
            d.unpublish(&id, &second).await.unwrap();
        }
        assert!(!second.exists(), "{name}: second target left behind");
        // After the first target is gone, another target works.
        d.unpublish(&id, &first).await.unwrap();
        d.publish(&id, &staging, &second, cap.clone(), false)
            .await
            .unwrap();
        d.unpublish(&id, &second).await.unwrap();
        d.unstage(&id, &staging).await.unwrap();
        d.assert_clean();
        d.delete(&id).await.unwrap();
    }

    // Block volumes follow the same rule.
    let cap = block_cap(Mode::SingleNodeSingleWriter);
    let id = new_volume(&mut d, "blk-snsw", 8 * MIB, cap.clone()).await;
    let staging = d.staging("blk");
    let (first, second) = (d.target("blk-1"), d.target("blk-2"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &first, cap.clone(), false)
        .await
        .unwrap();
    assert_err(
        d.publish(&id, &staging, &second, cap.clone(), false).await,
        Code::FailedPrecondition,
        &[&id],
    );
    d.unpublish(&id, &first).await.unwrap();
    d.unpublish(&id, &second).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_readonly_is_enforced() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "ro", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    let (rw, ro) = (d.target("rw"), d.target("ro"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();

    d.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();
    d.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();
    let err = std::fs::write(ro.join("file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    let err = std::fs::create_dir(ro.join("dir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    d.unpublish(&id, &ro).await.unwrap();

    // readonly applied to that target only: a writable publish of the same staging works.
    d.publish(&id, &staging, &rw, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(rw.join("file"), b"x").unwrap();
    d.unpublish(&id, &rw).await.unwrap();

    // SINGLE_NODE_READER_ONLY publishes read-only even without readonly=true.
    let ro_cap = mount_cap("ext4", Mode::SingleNodeReaderOnly);
    let ro_id = new_volume(&mut d, "ro-mode", 16 * MIB, ro_cap.clone()).await;
    let ro_staging = d.staging("ro-mode");
    let ro_target = d.target("ro-mode");
    d.stage(&ro_id, &ro_staging, ro_cap.clone()).await.unwrap();
    d.publish(&ro_id, &ro_staging, &ro_target, ro_cap.clone(), false)
        .await
        .unwrap();
    let err = std::fs::write(ro_target.join("file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    d.unpublish(&ro_id, &ro_target).await.unwrap();
    d.unstage(&ro_id, &ro_staging).await.unwrap();

    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    for v in [&id, &ro_id] {
        d.delete(v).await.unwrap();
    }
}

/// readonly=true on a raw block volume: the device at the target refuses writes (spec: the SP
/// MUST publish the volume read-only), and nothing written through it reaches the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_readonly_block_device_is_not_writable() {
    let mut d = TestDriver::start().await;
    let blk = block_cap(snw());
    let blk_id = new_volume(&mut d, "ro-blk", 8 * MIB, blk.clone()).await;
    let blk_staging = d.staging("blk");
    let blk_target = d.target("blk");
    d.stage(&blk_id, &blk_staging, blk.clone()).await.unwrap();
    d.publish(&blk_id, &blk_staging, &blk_target, blk.clone(), true)
        .await
        .unwrap();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&blk_target)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, b"written through a readonly publish")
                .and_then(|_| f.sync_all())
        });
    let mut head = [0u8; 34];
    {
        use std::io::Read;
        let dev = d.loop_device_of(&blk_id).unwrap();
        std::fs::File::open(dev.path())
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
    }
    // Clean up before asserting, so a failure leaves nothing behind.
    d.unpublish(&blk_id, &blk_target).await.unwrap();
    d.unstage(&blk_id, &blk_staging).await.unwrap();
    d.assert_clean();
    d.delete(&blk_id).await.unwrap();
    assert_ne!(
        &head, b"written through a readonly publish",
        "the write reached the volume"
    );
    let err = written.expect_err("writing to a readonly-published block device succeeded");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(nix::libc::EROFS) | Some(nix::libc::EPERM) | Some(nix::libc::EACCES)
        ),
        "{err}"
    );
}

// ---- NodeUnpublishVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unpublish_errors_and_idempotency() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let target = d.target("p");
    let unpublish = |id: &str, path: &str| csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: path.into(),
    };

    assert_err(
        d.node
            .node_unpublish_volume(unpublish("", &s(&target)))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node
            .node_unpublish_volume(unpublish(&random_id(), ""))
            .await,
        Code::InvalidArgument,
        &["target_path"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.unpublish(&unknown, &target).await,
            Code::NotFound,
            &[&unknown],
        );
    }

    let id = new_volume(&mut d, "unpub", 16 * MIB, cap.clone()).await;
    // Never published (target does not exist): OK.
    d.unpublish(&id, &target).await.unwrap();
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.unpublish(&id, &target).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists(), "unpublish removes the target");
    // Already removed: OK.
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.assert_clean();
    d.delete(&id).await.unwrap();
}

// ---- NodeGetVolumeStats ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_volume_stats_errors() {
    let mut d = TestDriver::start().await;
    let stats = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };

    assert_err(
        d.node.node_get_volume_stats(stats("", "some/path")).await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.node.node_get_volume_stats(stats(&random_id(), "")).await,
        Code::InvalidArgument,
        &["volume_path"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.node
                .node_get_volume_stats(stats(&unknown, "some/path"))
                .await,
            Code::NotFound,
            &[&unknown],
        );
    }

    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "stats", 16 * MIB, cap.clone()).await;
    let other = new_volume(&mut d, "other", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    let other_staging = d.staging("other");
    let target = d.target("p");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.stage(&other, &other_staging, cap.clone()).await.unwrap();

    // A staged and published volume, asked about a path that is not its mount.
    let pods = d.root().join("pods");
    for path in [
        "some/path".to_string(),
        s(&pods),
        s(&d.root().join("does-not-exist")),
        s(&other_staging),
        "/".to_string(),
    ] {
        assert_err(
            d.node.node_get_volume_stats(stats(&id, &path)).await,
            Code::NotFound,
            &[&id],
        );
    }
    // The right paths answer.
    assert!(!d.stats(&id, &target).await.unwrap().usage.is_empty());
    assert!(!d.stats(&id, &staging).await.unwrap().usage.is_empty());
    // After unpublish, the old target is no longer this volume's.
    d.unpublish(&id, &target).await.unwrap();
    assert_err(d.stats(&id, &target).await, Code::NotFound, &[&id]);

    d.unstage(&id, &staging).await.unwrap();
    d.unstage(&other, &other_staging).await.unwrap();
    assert_err(d.stats(&id, &staging).await, Code::NotFound, &[&id]);
    d.assert_clean();
    d.delete(&id).await.unwrap();
    d.delete(&other).await.unwrap();
}

// ---- NodeGetCapabilities, NodeGetInfo ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_capabilities_and_info() {
    let mut d = TestDriver::start().await;
    use csi::node_service_capability::rpc::Type as Rpc;
    let caps = d
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let kinds: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(csi::node_service_capability::Type::Rpc(r)) => r.r#type,
            other => panic!("unexpected node capability {other:?}"),
        })
        .collect();
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    assert_eq!(
        kinds.into_iter().collect::<HashSet<_>>(),
        HashSet::from([
            Rpc::StageUnstageVolume as i32,
            Rpc::GetVolumeStats as i32,
            Rpc::SingleNodeMultiWriter as i32,
            Rpc::ExpandVolume as i32,
            Rpc::VolumeCondition as i32,
        ])
    );

    let info = d
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    assert!(info.max_volumes_per_node >= 0);
    assert_eq!(info.accessible_topology, Some(topology(NODE)));

    // The node's topology is accepted back as a CreateVolume requisite (csi-sanity does this).
    let mut req = create_req("topo", 8 * MIB, block_cap(snw()));
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![info.accessible_topology.clone().unwrap()],
        preferred: vec![],
    });
    let vol = d.create(req).await.unwrap();
    assert_eq!(vol.accessible_topology, vec![topology(NODE)]);
    d.delete(&vol.volume_id).await.unwrap();
}

// ---- issue 12 item 11: paths and flags that used to reach the kernel ----

/// Targets and staging paths under /proc, /sys and /dev (also through a symlink), and a path
/// with a component over NAME_MAX, are INVALID_ARGUMENT naming the field, as are the mount
/// flags that would panic the node (`errors=panic`) or skip the journal replay (`noload`,
/// `norecovery`). The paths are ones the kernel cannot create, so even a driver without the
/// checks makes nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_trees_long_components_and_unsafe_flags_are_invalid_arguments() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "kernel-trees", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    let link = d.root().join("proc-link");
    std::os::unix::fs::symlink("/proc/self", &link).unwrap();
    let long = d.root().join("x".repeat(300)).join("t");
    for (path, why) in [
        ("/proc/self/loopcsi-target".to_string(), "/proc"),
        ("/sys/loopcsi-target".to_string(), "/sys"),
        ("/dev/null/loopcsi-target".to_string(), "/dev"),
        (s(&link.join("loopcsi-target")), "/proc"),
        (s(&long), "300-byte component"),
    ] {
        assert_err(
            d.node
                .node_stage_volume(stage_req(&id, &path, Some(cap.clone())))
                .await,
            Code::InvalidArgument,
            &["staging_target_path", why],
        );
        assert_err(
            d.node
                .node_publish_volume(publish_req(&id, &s(&staging), &path, Some(cap.clone())))
                .await,
            Code::InvalidArgument,
            &["target_path", why],
        );
    }
    for flag in ["errors=panic", "noload", "norecovery"] {
        let flagged = mount_cap_flags("ext4", snw(), &[flag]);
        assert_err(
            d.create(create_req("unsafe-flags", 16 * MIB, flagged.clone()))
                .await,
            Code::InvalidArgument,
            &["mount_flags", flag],
        );
        assert_err(
            d.stage(&id, &staging, flagged).await,
            Code::InvalidArgument,
            &["mount_flags", flag],
        );
    }
    // `errors=` with a safe value is still a valid ext4 option.
    d.stage(
        &id,
        &staging,
        mount_cap_flags("ext4", snw(), &["errors=remount-ro"]),
    )
    .await
    .unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// NodePublish onto an existing directory with entries the driver did not create is refused
/// (FAILED_PRECONDITION), leaving the entries visible; an empty existing directory (what the
/// kubelet and csi-sanity pass) and a repeated publish still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_over_a_non_empty_host_directory_is_refused() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "non-empty-target", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let target = d.target("t");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("host-data"), b"keep me").unwrap();
    assert_err(
        d.publish(&id, &staging, &target, cap.clone(), false).await,
        Code::FailedPrecondition,
        &["target_path", "entries"],
    );
    assert_eq!(
        mounts_at(&target),
        0,
        "nothing mounted over the host's data"
    );
    assert_eq!(std::fs::read(target.join("host-data")).unwrap(), b"keep me");

    std::fs::remove_file(target.join("host-data")).unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(target.join("pod-data"), b"the volume's own").unwrap();
    // A repeat publish sees the volume's own entries through the mount: still idempotent.
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}
