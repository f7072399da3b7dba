//! CreateVolume: every malformed or conflicting request gets the right code and a message naming the field.

use super::*;

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
