//! Changed-block tracking (components/snapshot-metadata) and group snapshots
//! (VolumeGroupSnapshotClass), checked offline like the rest of the deployment: rendered,
//! validated, and wired the way the external-snapshot-metadata sidecar v0.2.0 and backup tools
//! need it.

use std::path::Path;

use serde_json::Value;

use super::*;

const SIDECAR: &str = "csi-snapshot-metadata";
const SECRET: &str = "loopcsi-snapshot-metadata-tls";

/// An overlay of the base with the snapshot-metadata component and the ConfigMap it reads, the
/// way docs/kubernetes.md tells operators to write it.
fn render_with_component(root: &Path, ca_cert: &str) -> Vec<Value> {
    let deploy = deploy().canonicalize().unwrap();
    std::fs::write(
        root.join("snapshot-metadata.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: loopcsi-snapshot-metadata\n  \
             annotations:\n    config.kubernetes.io/local-config: \"true\"\n\
             data:\n  caCert: {ca_cert}\n  audience: loopcsi-backup\n"
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\n  - snapshot-metadata.yaml\ncomponents:\n  - {}\n",
            relative(&deploy.join("base"), root).display(),
            relative(&deploy.join("components/snapshot-metadata"), root).display()
        ),
    )
    .unwrap();
    render(root)
}

/// The sidecar's listening port (--port, default 50051) by the name the Service targets.
fn named_port(container: &Value, port_name: &str) -> u16 {
    array(&container["ports"])
        .iter()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{} has no port {port_name}", container["name"])) as u16
}

#[test]
fn snapshot_metadata_component_wires_sidecar_service_and_object() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().canonicalize().unwrap();
    let objects = render_with_component(&root, "Zm9vYmFy");
    let config = check_node_plugin(&objects, DEFAULT_KUBELET_DIR);
    check_driver_objects(&objects, &config);
    check_containers(&objects, "components/snapshot-metadata");
    check_rbac(&objects);

    let ds = object(&objects, "DaemonSet", DAEMONSET);
    let spec = pod_spec(ds).unwrap();
    let sidecar = container(spec, SIDECAR);
    // The same socket as every other sidecar: the SnapshotMetadata service is on the driver's.
    assert_eq!(
        flag(sidecar, "--csi-address"),
        flag(container(spec, SNAPSHOTTER), "--csi-address"),
        "{SIDECAR} dials the driver's socket"
    );
    let port: u16 = flag(sidecar, "--port").unwrap().parse().unwrap();
    assert_eq!(named_port(sidecar, "snap-metadata"), port);
    // The certificate and key come from the operator's TLS Secret, mounted read-only.
    let mount = array(&sidecar["volumeMounts"])
        .iter()
        .find(|m| m["name"] == "snapshot-metadata-tls")
        .expect("the sidecar mounts the TLS Secret");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        volume(spec, "snapshot-metadata-tls")["secret"]["secretName"],
        SECRET
    );
    let tls_dir = mount["mountPath"].as_str().unwrap();
    for (f, file) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")] {
        assert_eq!(
            flag(sidecar, f),
            Some(format!("{tls_dir}/{file}").as_str()),
            "{f}"
        );
    }

    // The Service selects the node plugin pods and keeps clients on their own node.
    let service = object(&objects, "Service", "loopcsi-snapshot-metadata");
    assert_eq!(service["metadata"]["namespace"], NAMESPACE);
    assert_eq!(service["spec"]["internalTrafficPolicy"], "Local");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service selects the plugin pods by {k}");
    }
    let service_port = &array(&service["spec"]["ports"])[0];
    assert_eq!(service_port["targetPort"], "snap-metadata");

    // The SnapshotMetadataService: named after the driver, pointing at the Service.
    let sms = object(&objects, "SnapshotMetadataService", &config.driver_name);
    assert_eq!(
        sms["spec"]["address"],
        format!(
            "loopcsi-snapshot-metadata.{NAMESPACE}:{}",
            service_port["port"]
        )
    );
    assert_eq!(
        sms["spec"]["caCert"], "Zm9vYmFy",
        "caCert from the ConfigMap"
    );
    assert_eq!(
        sms["spec"]["audience"], "loopcsi-backup",
        "audience from the ConfigMap"
    );
    assert!(
        kind_of(&objects, "ConfigMap").is_empty(),
        "the ConfigMap is local-config"
    );

    // The sidecar's service account may review tokens and access, and read snapshots.
    let (cluster, _) = grants(&objects);
    for (group, resource, verb) in [
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
        ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
        ("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
    ] {
        assert!(
            cluster
                .get(&(group.to_string(), resource.to_string()))
                .is_some_and(|verbs| verbs.contains(verb)),
            "the node plugin's service account may not {verb} {group}/{resource}"
        );
    }
}

#[test]
fn snapshot_metadata_needs_base64_ca_and_is_opt_in() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().canonicalize().unwrap();
    let caught = std::panic::catch_unwind(|| render_with_component(&root, "not base64!"));
    let why = caught.expect_err("a caCert that is not base64 must fail validation");
    let why = why.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(why.contains("spec.caCert"), "names the field: {why}");

    // The base runs no sidecar that would crash-loop on a driver without the service or wait
    // for a Secret nobody made.
    let base = render(&deploy().join("base"));
    let spec = pod_spec(object(&base, "DaemonSet", DAEMONSET)).unwrap();
    assert!(array(&spec["containers"])
        .iter()
        .all(|c| c["name"] != SIDECAR));
    assert!(kind_of(&base, "SnapshotMetadataService").is_empty());
    assert_eq!(kind_of(&base, "VolumeGroupSnapshotClass").len(), 1);
}

#[test]
fn sidecar_tag_matches_the_pinned_e2e_version() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().canonicalize().unwrap();
    let objects = render_with_component(&root, "Zm9v");
    let spec = pod_spec(object(&objects, "DaemonSet", DAEMONSET)).unwrap();
    let image = container(spec, SIDECAR)["image"]
        .as_str()
        .unwrap()
        .to_string();
    let env = std::fs::read_to_string(repo().join("tests/e2e/versions.env")).unwrap();
    let pinned = env
        .lines()
        .find_map(|l| l.strip_prefix("SNAPSHOT_METADATA_VERSION="))
        .expect("versions.env pins SNAPSHOT_METADATA_VERSION");
    assert_eq!(
        image,
        format!("registry.k8s.io/sig-storage/csi-snapshot-metadata:{pinned}")
    );
}
