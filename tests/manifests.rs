#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Kubernetes deployment (deploy/kubernetes) and the container image (Dockerfile), checked
//! offline.
//!
//! - The kustomize base, the example overlay and an overlay with another kubelet directory are
//!   rendered with `kubectl kustomize` (kubectl with kustomize v5 must be installed: without it
//!   this test fails, it does not skip).
//! - Every object is validated, strictly (no unknown fields), against the Kubernetes JSON schemas
//!   of the `kubernetes-validate` Python package for each of `KUBE_VERSIONS`. The snapshot CRDs
//!   (VolumeSnapshotClass, VolumeSnapshot) have no schema there and are checked structurally
//!   here. Python also turns the YAML into JSON, which serde_json reads.
//! - Then what no schema knows: the socket the registrar announces is the one the driver
//!   serves; the driver's flags parse with the driver's own command line parser; the names,
//!   topology key and StorageClass parameters match the code; the sidecars get the flags and
//!   downward-API variables that distributed provisioning, capacity and snapshotting need; every
//!   image is pinned; every container asks for resources; only the privileged driver has
//!   Bidirectional mounts; the service account may do what each sidecar does.
//! - The Dockerfile: a builder new enough for Cargo.lock, `--locked`, the runtime tools, the
//!   entry point.
//!
//! No network: kustomize renders local directories and the schemas ship inside the package.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Parser;
use loopcsi::config::{Cli, Command as CliCommand, Config, TOPOLOGY_KEY};
use loopcsi::volume::params::{FsType, Provisioning, StorageClassParams};
use serde_json::Value;

/// Kubernetes versions whose schemas every object must satisfy: the oldest the deployment
/// supports and the newest the pinned kubernetes-validate knows.
const KUBE_VERSIONS: &[&str] = &["1.33.0", "1.37.0"];

/// What to install when Python lacks the validator (the same line as in .ci/run).
const VALIDATOR_INSTALL: &str = "pip install kubernetes-validate==1.37.0";

const NAMESPACE: &str = "loopcsi";
const DAEMONSET: &str = "loopcsi-node";
const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
/// The driver's Prometheus port (--metrics-address), as docs/kubernetes.md documents it.
const METRICS_PORT: u16 = 9898;

const DRIVER: &str = "loopcsi";
const PROVISIONER: &str = "csi-provisioner";
const RESIZER: &str = "csi-resizer";
const SNAPSHOTTER: &str = "csi-snapshotter";
const REGISTRAR: &str = "node-driver-registrar";
const LIVENESS: &str = "liveness-probe";
const SIDECARS: &[&str] = &[PROVISIONER, RESIZER, SNAPSHOTTER, REGISTRAR, LIVENESS];

/// The snapshot CRD kinds the schemas do not cover; checked by `check_snapshot_crd`.
const SNAPSHOT_KINDS: &[&str] = &[
    "VolumeSnapshotClass",
    "VolumeSnapshot",
    "VolumeGroupSnapshotClass",
    "SnapshotMetadataService",
];

#[path = "manifests/crds.rs"]
mod crds;
#[path = "manifests/data_protection.rs"]
mod data_protection;
#[path = "manifests/router.rs"]
mod router;
use crds::check_snapshot_crd;

// ------------------------------------------------------------------------------------------
// Rendering and validation
// ------------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// kubectl: $KUBECTL, else /usr/bin/kubectl, else the first on PATH. Missing is a failure.
fn kubectl() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("KUBECTL") {
        candidates.push(PathBuf::from(path));
    }
    candidates.push(PathBuf::from("/usr/bin/kubectl"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("kubectl")));
    }
    match candidates.into_iter().find(|c| c.is_file()) {
        Some(found) => found,
        None => panic!(
            "kubectl is not installed (looked at $KUBECTL, /usr/bin/kubectl and PATH). The \
             manifests test renders deploy/kubernetes with `kubectl kustomize` (kustomize v5) \
             and does not skip without it: install kubectl, or point KUBECTL at it"
        ),
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("output is UTF-8")
}

/// `kubectl kustomize DIR`, after checking that kubectl's kustomize is v5.
fn kustomize(dir: &Path) -> String {
    let kubectl = kubectl();
    let version = run(
        Command::new(&kubectl).args(["version", "--client", "-o", "json"]),
        "kubectl version",
    );
    let version: Value = serde_json::from_str(&version).expect("kubectl version prints JSON");
    let kustomize = version["kustomizeVersion"].as_str().unwrap_or("");
    assert!(
        kustomize.starts_with("v5."),
        "{} has kustomize {kustomize:?}; the deployment needs kustomize v5 (kubectl 1.27+)",
        kubectl.display()
    );
    run(
        Command::new(&kubectl).arg("kustomize").arg(dir),
        &format!("kubectl kustomize {}", dir.display()),
    )
}

/// Reads a YAML stream with PyYAML and validates each document with kubernetes-validate
/// (strict) for every version of `KUBE_VERSIONS`; prints one JSON object.
const VALIDATOR: &str = r#"
import json, sys
try:
    import yaml
    from kubernetes_validate import utils as kv
    from kubernetes_validate.version import __version__ as kv_version
except ImportError as e:
    sys.stderr.write("cannot import %s: %s\n" % (getattr(e, "name", "?"), e))
    sys.exit(3)
versions = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(sys.stdin.read()) if d is not None]
results = []
for i, doc in enumerate(docs):
    for version in versions:
        r = {"index": i, "version": version}
        try:
            kv.validate(doc, version, strict=True)
            r["status"] = "ok"
        except kv.SchemaNotFoundError as e:
            r["status"] = "no-schema"
            r["message"] = e.message
        except kv.ValidationError as e:
            r["status"] = "invalid"
            r["message"] = "%s: %s" % (".".join(str(p) for p in e.path), e.message)
        except Exception as e:
            r["status"] = "error"
            r["message"] = "%s: %s" % (type(e).__name__, getattr(e, "message", e))
        results.append(r)
json.dump({"validator": kv_version, "objects": docs, "results": results}, sys.stdout, default=str)
"#;

/// The objects of a YAML stream, each validated against the schemas (or, for the snapshot CRDs,
/// structurally). Panics with every problem found.
fn load_and_validate(yaml: &str, what: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(VALIDATOR)
        .args(KUBE_VERSIONS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run python3 ({e}); it validates the manifests"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(3),
        "{what}: {stderr}The manifests are validated offline by the kubernetes-validate Python \
         package (with PyYAML): {VALIDATOR_INSTALL}"
    );
    assert!(
        out.status.success(),
        "{what}: the validator failed ({}): {stderr}",
        out.status
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the validator prints JSON");
    let objects = report["objects"].as_array().unwrap().clone();
    assert!(!objects.is_empty(), "{what}: no objects");

    let mut problems = Vec::new();
    for result in report["results"].as_array().unwrap() {
        let object = &objects[result["index"].as_u64().unwrap() as usize];
        let id = format!(
            "{what}: {} {} (Kubernetes {})",
            object["kind"].as_str().unwrap_or("?"),
            object["metadata"]["name"].as_str().unwrap_or("?"),
            result["version"].as_str().unwrap()
        );
        match result["status"].as_str().unwrap() {
            "ok" => {}
            "no-schema" if SNAPSHOT_KINDS.contains(&object["kind"].as_str().unwrap_or("")) => {}
            _ => problems.push(format!("{id}: {}", result["message"])),
        }
    }
    for object in &objects {
        if SNAPSHOT_KINDS.contains(&object["kind"].as_str().unwrap_or("")) {
            if let Err(why) = check_snapshot_crd(object) {
                problems.push(format!("{what}: {why}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "validated with kubernetes-validate {}:\n{}",
        report["validator"],
        problems.join("\n")
    );
    objects
}

fn render(dir: &Path) -> Vec<Value> {
    load_and_validate(&kustomize(dir), &dir.display().to_string())
}

fn load_file(path: &Path) -> Vec<Value> {
    let yaml = std::fs::read_to_string(path).unwrap();
    load_and_validate(&yaml, &path.display().to_string())
}

/// A DNS-1123 subdomain (the rule for most object names).
fn dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn only_keys(object: &Value, allowed: &[&str], at: &str) -> Result<(), String> {
    let map = object
        .as_object()
        .ok_or_else(|| format!("{at} is not an object"))?;
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(format!(
            "{at}: unknown field {key:?} (allowed: {allowed:?})"
        )),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------------------------------
// Object helpers
// ------------------------------------------------------------------------------------------

fn kind_of<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = kind_of(objects, kind)
        .into_iter()
        .filter(|o| o["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap()
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The pod spec of a Pod or of a workload's pod template.
fn pod_spec(object: &Value) -> Option<&Value> {
    if object["kind"] == "Pod" {
        Some(&object["spec"])
    } else if object["spec"]["template"]["spec"].is_object() {
        Some(&object["spec"]["template"]["spec"])
    } else {
        None
    }
}

fn all_containers(spec: &Value) -> impl Iterator<Item = &Value> {
    array(&spec["initContainers"])
        .iter()
        .chain(array(&spec["containers"]))
}

fn container<'a>(spec: &'a Value, name: &str) -> &'a Value {
    array(&spec["containers"])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("the node plugin has no container {name}"))
}

/// A flag's value: `Some("")` for `--flag`, `Some(v)` for `--flag=v`, None when absent.
fn flag<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    array(&container["args"]).iter().find_map(|arg| {
        let arg = arg.as_str()?;
        if arg == flag {
            Some("")
        } else {
            arg.strip_prefix(flag)?.strip_prefix('=')
        }
    })
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    array(&container["env"]).iter().find(|e| e["name"] == name)
}

/// Asserts that the container's variable comes from the downward API field `path`.
fn assert_field_ref(container: &Value, var: &str, path: &str) {
    let who = container["name"].as_str().unwrap();
    let entry = env(container, var).unwrap_or_else(|| panic!("{who} has no env {var}"));
    assert_eq!(
        entry["valueFrom"]["fieldRef"]["fieldPath"], path,
        "{who}: env {var} must come from the downward API field {path}"
    );
}

/// `$(VAR)` references to literal env values, expanded as the kubelet does.
fn expand(container: &Value, text: &str) -> String {
    let mut out = text.to_string();
    for entry in array(&container["env"]) {
        if let (Some(var), Some(value)) = (entry["name"].as_str(), entry["value"].as_str()) {
            out = out.replace(&format!("$({var})"), value);
        }
    }
    assert!(
        !out.contains("$("),
        "{}: {text:?} refers to a variable with no literal value",
        container["name"]
    );
    out
}

/// Where a path inside the container is on the host, through the container's hostPath mounts
/// (the longest mountPath that contains it). None when it is on no hostPath volume.
fn host_path(spec: &Value, container: &Value, path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    let mount = array(&container["volumeMounts"])
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())?;
    let volume = array(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("volume {} is mounted but not declared", mount["name"]));
    let host = volume["hostPath"]["path"].as_str()?;
    let sub = mount["subPath"].as_str().unwrap_or("");
    let rest = path
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap();
    Some(Path::new(host).join(sub).join(rest))
}

fn volume<'a>(spec: &'a Value, name: &str) -> &'a Value {
    array(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("the node plugin has no volume {name}"))
}

/// A probe's port as a number; a named port must be one the probed container declares.
fn port_number(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).unwrap();
    }
    let port_name = port.as_str().unwrap();
    let number = array(&container["ports"])
        .iter()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| {
            panic!(
                "{}: probe port {port_name:?} is not one of its ports",
                container["name"]
            )
        });
    u16::try_from(number).unwrap()
}

/// Every string of a JSON value: object keys and string values.
fn strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k);
                strings(v, out);
            }
        }
        _ => {}
    }
}

/// A Kubernetes quantity in bytes (the binary and decimal suffixes manifests use).
fn quantity(q: &str) -> u64 {
    let units: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(number) = q.strip_suffix(suffix) {
            return number.parse::<u64>().unwrap() * factor;
        }
    }
    q.parse().unwrap_or_else(|_| panic!("quantity {q:?}"))
}

/// Parses the driver container's command line with loopcsi's own parser, as the container
/// would run it (NODE_ID comes from the downward API; a stand-in node name takes its place).
fn driver_config(driver: &Value) -> Config {
    let mut argv: Vec<String> = vec!["loopcsi".into()];
    argv.extend(
        array(&driver["args"])
            .iter()
            .map(|a| expand(driver, a.as_str().unwrap())),
    );
    assert!(
        !argv.iter().any(|a| a.starts_with("--node-id")),
        "the node id comes from env NODE_ID (spec.nodeName), not a fixed --node-id"
    );
    argv.push("--node-id=node-a".into());
    let parsed = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        // --metrics-address is being added to the driver; until it lands, check the rest.
        Err(e)
            if e.kind() == clap::error::ErrorKind::UnknownArgument
                && e.to_string().contains("--metrics-address") =>
        {
            eprintln!(
                "note: this loopcsi build has no --metrics-address yet; the driver's other \
                 flags are checked without it"
            );
            argv.retain(|a| !a.starts_with("--metrics-address"));
            Cli::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("the driver's args {argv:?} do not parse: {e}"))
        }
        Err(e) => panic!("the driver's args {argv:?} do not parse: {e}"),
    };
    let config = serve_config(parsed.command);
    config
        .validate()
        .unwrap_or_else(|e| panic!("the driver's flags are invalid: {e}"));
    config
}

/// The configuration of `loopcsi serve` (the subcommand the DaemonSet runs).
fn serve_config(command: CliCommand) -> Config {
    match command {
        CliCommand::Serve(config) => config,
        // Other subcommands may exist (or not yet): the DaemonSet must run `serve`.
        #[allow(unreachable_patterns)]
        _ => panic!("the driver container must run `loopcsi serve`"),
    }
}

/// The driver name loopcsi reports when --driver-name is not given.
fn default_driver_name() -> String {
    let cli = Cli::try_parse_from([
        "loopcsi",
        "serve",
        "--endpoint=unix:///x.sock",
        "--node-id=n",
    ])
    .unwrap();
    serve_config(cli.command).driver_name
}

// ------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------

/// The DaemonSet: sockets, flags, mounts, probes. Returns the driver's configuration.
fn check_node_plugin(objects: &[Value], kubelet_dir: &str) -> Config {
    let daemonsets = kind_of(objects, "DaemonSet");
    assert_eq!(daemonsets.len(), 1, "one DaemonSet, the node plugin");
    let ds = daemonsets[0];
    assert_eq!(name(ds), DAEMONSET);
    let spec = pod_spec(ds).unwrap();
    let driver = container(spec, DRIVER);
    let config = driver_config(driver);

    // The node id is the node name (it becomes the topology label's value).
    assert_field_ref(driver, "NODE_ID", "spec.nodeName");

    // The kubelet directory: a hostPath mounted at the same path, Bidirectional, so that the
    // staging and publish targets the kubelet names are the paths the driver mounts on.
    let kubelet = volume(spec, "kubelet-dir");
    assert_eq!(
        kubelet["hostPath"]["path"], kubelet_dir,
        "kubelet-dir hostPath"
    );
    let mount = array(&driver["volumeMounts"])
        .iter()
        .find(|m| m["name"] == "kubelet-dir")
        .expect("the driver mounts kubelet-dir");
    assert_eq!(
        mount["mountPath"], kubelet_dir,
        "kubelet-dir must be mounted at its host path"
    );
    assert_eq!(mount["mountPropagation"], "Bidirectional");

    // The socket: the driver serves --endpoint; on the host that is
    // <kubelet>/plugins/<driver name>/csi.sock, which the registrar announces and the sidecars
    // dial.
    let socket = config.socket_path().unwrap();
    let host_socket = host_path(spec, driver, socket.to_str().unwrap())
        .unwrap_or_else(|| panic!("the driver's socket {socket:?} is not on a hostPath volume"));
    let expected = PathBuf::from(format!(
        "{kubelet_dir}/plugins/{}/csi.sock",
        config.driver_name
    ));
    assert_eq!(host_socket, expected, "the driver's socket on the host");
    let registrar = container(spec, REGISTRAR);
    let announced = expand(
        registrar,
        flag(registrar, "--kubelet-registration-path").expect("--kubelet-registration-path"),
    );
    assert_eq!(
        PathBuf::from(&announced),
        host_socket,
        "the registrar announces {announced} but the driver serves {}",
        host_socket.display()
    );
    for sidecar in SIDECARS {
        let c = container(spec, sidecar);
        let address =
            flag(c, "--csi-address").unwrap_or_else(|| panic!("{sidecar}: --csi-address"));
        let address = expand(c, address.trim_start_matches("unix://"));
        assert_eq!(
            host_path(spec, c, &address),
            Some(host_socket.clone()),
            "{sidecar} dials {address}, which is not the driver's socket"
        );
    }
    let registration = host_path(spec, registrar, "/registration")
        .expect("the registrar mounts the kubelet's registration directory at /registration");
    assert_eq!(
        registration,
        PathBuf::from(format!("{kubelet_dir}/plugins_registry")),
        "the registrar must announce the plugin in the kubelet's plugins_registry"
    );
    assert_eq!(
        volume(spec, "registration-dir")["hostPath"]["type"],
        "Directory"
    );

    // The pool is a hostPath outside the kubelet directory: it must outlive the pod.
    let pool = host_path(spec, driver, config.state_dir.to_str().unwrap()).unwrap_or_else(|| {
        panic!(
            "--state-dir {:?} is not on a hostPath volume: the volumes would die with the pod",
            config.state_dir
        )
    });
    assert!(
        !pool.starts_with(kubelet_dir),
        "the pool {pool:?} must not live under the kubelet directory"
    );
    assert_eq!(
        host_path(spec, driver, "/dev"),
        Some(PathBuf::from("/dev")),
        "the driver needs the host's /dev"
    );

    // Privilege: only the driver is privileged, and only it has Bidirectional mounts.
    for c in all_containers(spec) {
        let who = c["name"].as_str().unwrap();
        let privileged = c["securityContext"]["privileged"] == true;
        assert_eq!(
            privileged,
            who == DRIVER,
            "{who}: only the driver container is privileged"
        );
        for m in array(&c["volumeMounts"]) {
            if m["mountPropagation"] == "Bidirectional" {
                assert!(
                    who == DRIVER && privileged,
                    "{who}: Bidirectional mount propagation only on the privileged driver"
                );
            }
        }
    }
    assert_eq!(
        spec["hostNetwork"],
        Value::Null,
        "the node plugin needs no host network"
    );

    // Liveness: the driver's probe asks the livenessprobe sidecar, which calls Probe.
    let liveness = container(spec, LIVENESS);
    let health_port: u16 = flag(liveness, "--health-port")
        .unwrap_or("9808")
        .parse()
        .unwrap();
    for probe in ["livenessProbe", "startupProbe"] {
        let get = &driver[probe]["httpGet"];
        if probe == "livenessProbe" {
            assert!(get.is_object(), "the driver needs an httpGet livenessProbe");
        }
        if get.is_object() {
            assert_eq!(get["path"], "/healthz", "driver {probe} path");
            assert_eq!(
                port_number(driver, &get["port"]),
                health_port,
                "the driver's {probe} must hit the livenessprobe sidecar's port"
            );
        }
    }

    // Metrics on 9898, declared as a named port so Prometheus can find it.
    let metrics = flag(driver, "--metrics-address").expect("the driver needs --metrics-address");
    let metrics_port: u16 = metrics.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(metrics_port, METRICS_PORT);
    let declared = array(&driver["ports"])
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("the driver declares a port named metrics");
    assert_eq!(declared["containerPort"], METRICS_PORT);

    // Distributed provisioning with storage capacity.
    let provisioner = container(spec, PROVISIONER);
    for required in [
        "--node-deployment",
        "--feature-gates=Topology=true",
        "--strict-topology",
        "--immediate-topology=false",
        "--enable-capacity",
        "--capacity-ownerref-level=1",
        "--extra-create-metadata",
    ] {
        let args: Vec<_> = array(&provisioner["args"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args.contains(&required),
            "csi-provisioner needs {required} (has {args:?})"
        );
    }
    assert_eq!(
        flag(provisioner, "--leader-election"),
        None,
        "one provisioner per node: no election"
    );
    assert_field_ref(provisioner, "NODE_NAME", "spec.nodeName");
    assert_field_ref(provisioner, "NAMESPACE", "metadata.namespace");
    assert_field_ref(provisioner, "POD_NAME", "metadata.name");

    // Distributed snapshotting.
    let snapshotter = container(spec, SNAPSHOTTER);
    assert_eq!(
        flag(snapshotter, "--node-deployment"),
        Some(""),
        "csi-snapshotter --node-deployment"
    );
    assert_eq!(flag(snapshotter, "--leader-election"), None);
    assert_field_ref(snapshotter, "NODE_NAME", "spec.nodeName");

    // The resizer has no per-node mode: one leader in the cluster, never one per node racing.
    let resizer = container(spec, RESIZER);
    assert_eq!(
        flag(resizer, "--leader-election"),
        Some(""),
        "csi-resizer needs --leader-election"
    );
    assert_eq!(
        flag(resizer, "--leader-election-namespace"),
        Some("$(NAMESPACE)"),
        "the resizer's lease lives in its own namespace"
    );
    assert_field_ref(resizer, "NAMESPACE", "metadata.namespace");

    // Ports are unique in the pod (they share its network namespace).
    let mut ports = BTreeSet::new();
    for c in all_containers(spec) {
        for p in array(&c["ports"]) {
            assert!(
                ports.insert(p["containerPort"].as_u64().unwrap()),
                "port {} is declared twice",
                p["containerPort"]
            );
        }
    }
    config
}

/// Every container everywhere: a pinned image and resource requests.
fn check_containers(objects: &[Value], what: &str) {
    for object in objects {
        let Some(spec) = pod_spec(object) else {
            continue;
        };
        for c in all_containers(spec) {
            let who = format!(
                "{what}: {} {} container {}",
                object["kind"],
                name(object),
                c["name"]
            );
            let image = c["image"]
                .as_str()
                .unwrap_or_else(|| panic!("{who} has no image"));
            assert!(
                pinned(image),
                "{who}: image {image} is not pinned to a version tag"
            );
            let requests = &c["resources"]["requests"];
            assert!(
                requests["cpu"].is_string() && requests["memory"].is_string(),
                "{who} must request cpu and memory (has {requests})"
            );
        }
    }
}

/// A version tag (not latest) or a digest.
fn pinned(image: &str) -> bool {
    if image.contains("@sha256:") {
        return true;
    }
    let last = image.rsplit('/').next().unwrap();
    match last.rsplit_once(':') {
        Some((_, tag)) => {
            let version = tag.strip_prefix('v').unwrap_or(tag);
            tag != "latest" && version.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

/// The sidecars come from registry.k8s.io/sig-storage; csi-provisioner is v6; the driver's
/// tag is the crate's version.
fn check_images(objects: &[Value], driver_image_name: &str) {
    let ds = object(objects, "DaemonSet", DAEMONSET);
    let spec = pod_spec(ds).unwrap();
    for (sidecar, image) in [
        (PROVISIONER, "csi-provisioner"),
        (RESIZER, "csi-resizer"),
        (SNAPSHOTTER, "csi-snapshotter"),
        (REGISTRAR, "csi-node-driver-registrar"),
        (LIVENESS, "livenessprobe"),
    ] {
        let got = container(spec, sidecar)["image"].as_str().unwrap();
        let prefix = format!("registry.k8s.io/sig-storage/{image}:v");
        assert!(
            got.starts_with(&prefix),
            "{sidecar}: {got} is not {prefix}…"
        );
    }
    let provisioner = container(spec, PROVISIONER)["image"].as_str().unwrap();
    assert!(
        provisioner.contains(":v6."),
        "csi-provisioner must be v6.x (distributed capacity as configured here): {provisioner}"
    );
    let driver = container(spec, DRIVER)["image"].as_str().unwrap();
    assert_eq!(
        driver,
        format!("{driver_image_name}:v{}", env!("CARGO_PKG_VERSION")),
        "the driver image's tag follows Cargo.toml's version"
    );
}

fn check_driver_objects(objects: &[Value], config: &Config) {
    assert_eq!(
        config.driver_name,
        default_driver_name(),
        "the manifests name the driver {:?}, but the binary's default is {:?}",
        config.driver_name,
        default_driver_name()
    );
    let driver_name = config.driver_name.as_str();

    let drivers = kind_of(objects, "CSIDriver");
    assert_eq!(drivers.len(), 1);
    let csidriver = drivers[0];
    assert_eq!(
        name(csidriver),
        driver_name,
        "CSIDriver name = --driver-name"
    );
    let spec = &csidriver["spec"];
    assert_eq!(spec["attachRequired"], false);
    assert_eq!(spec["podInfoOnMount"], true);
    assert_eq!(spec["fsGroupPolicy"], "File");
    assert_eq!(spec["storageCapacity"], true);
    assert_eq!(spec["seLinuxMount"], true);
    assert_eq!(
        spec["volumeLifecycleModes"],
        serde_json::json!(["Persistent"])
    );

    // StorageClasses: the three classes, WaitForFirstConsumer, parameters loopcsi accepts.
    let classes = kind_of(objects, "StorageClass");
    let names: BTreeSet<_> = classes.iter().map(|c| name(c)).collect();
    assert_eq!(
        names,
        BTreeSet::from(["loopcsi-ext4", "loopcsi-thick", "loopcsi-xfs"])
    );
    for class in &classes {
        let class_name = name(class);
        assert_eq!(
            class["provisioner"], driver_name,
            "{class_name}: provisioner"
        );
        assert_eq!(
            class["volumeBindingMode"], "WaitForFirstConsumer",
            "{class_name}"
        );
        assert_eq!(class["allowVolumeExpansion"], true, "{class_name}");
        assert_eq!(class["reclaimPolicy"], "Delete", "{class_name}");
        let parameters: HashMap<String, String> =
            serde_json::from_value(class["parameters"].clone()).unwrap();
        let parsed = StorageClassParams::try_from(&parameters)
            .unwrap_or_else(|e| panic!("{class_name}: loopcsi refuses its parameters: {e}"));
        let fs = FsType::from_name(&parameters["csi.storage.k8s.io/fstype"])
            .unwrap_or_else(|| panic!("{class_name}: fstype is not one loopcsi formats"));
        let expected = match class_name {
            "loopcsi-ext4" => (FsType::Ext4, Provisioning::Thin),
            "loopcsi-xfs" => (FsType::Xfs, Provisioning::Thin),
            _ => (FsType::Ext4, Provisioning::Thick),
        };
        assert_eq!((fs, parsed.provisioning), expected, "{class_name}");
    }

    for kind in ["VolumeSnapshotClass", "VolumeGroupSnapshotClass"] {
        let classes = kind_of(objects, kind);
        assert_eq!(classes.len(), 1, "one {kind}");
        assert_eq!(classes[0]["driver"], driver_name, "{kind} driver");
    }

    // Namespaced objects live in the driver's namespace, which admits privileged pods.
    let namespace = object(objects, "Namespace", NAMESPACE);
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let cluster_scoped = [
        "Namespace",
        "CSIDriver",
        "StorageClass",
        "VolumeSnapshotClass",
        "VolumeGroupSnapshotClass",
        "SnapshotMetadataService",
        "ClusterRole",
        "ClusterRoleBinding",
    ];
    for o in objects {
        if !cluster_scoped.contains(&o["kind"].as_str().unwrap()) {
            assert_eq!(
                o["metadata"]["namespace"],
                NAMESPACE,
                "{} {}",
                o["kind"],
                name(o)
            );
        }
    }
}

/// How many objects carry the default-class annotations, by name.
fn defaults(objects: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (kind, annotation) in [
        (
            "StorageClass",
            "storageclass.kubernetes.io/is-default-class",
        ),
        (
            "VolumeSnapshotClass",
            "snapshot.storage.kubernetes.io/is-default-class",
        ),
    ] {
        for o in kind_of(objects, kind) {
            if let Some(value) = o["metadata"]["annotations"][annotation].as_str() {
                assert_eq!(value, "true", "{kind} {}: {annotation}", name(o));
                out.push((kind.to_string(), name(o).to_string()));
            }
        }
    }
    out
}

/// (apiGroup, resource) -> verbs granted.
type Grants = BTreeMap<(String, String), BTreeSet<String>>;

fn grant(grants: &mut Grants, role: &Value) {
    for rule in array(&role["rules"]) {
        for group in array(&rule["apiGroups"]) {
            for resource in array(&rule["resources"]) {
                let verbs = grants
                    .entry((
                        group.as_str().unwrap().into(),
                        resource.as_str().unwrap().into(),
                    ))
                    .or_default();
                for verb in array(&rule["verbs"]) {
                    let verb = verb.as_str().unwrap();
                    assert_ne!(verb, "*", "{}: no wildcard verbs", name(role));
                    verbs.insert(verb.into());
                }
            }
        }
        for field in ["apiGroups", "resources"] {
            assert!(
                !array(&rule[field]).iter().any(|v| v == "*"),
                "{}: no wildcard {field}",
                name(role)
            );
        }
    }
}

/// What the DaemonSet's service account may do cluster-wide and in its namespace.
fn grants(objects: &[Value]) -> (Grants, Grants) {
    let ds = object(objects, "DaemonSet", DAEMONSET);
    let account = pod_spec(ds).unwrap()["serviceAccountName"]
        .as_str()
        .expect("the node plugin names its service account");
    object(objects, "ServiceAccount", account);
    let is_ours = |binding: &Value| {
        array(&binding["subjects"]).iter().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == NAMESPACE
        })
    };
    let (mut cluster, mut namespaced) = (Grants::new(), Grants::new());
    for binding in kind_of(objects, "ClusterRoleBinding")
        .into_iter()
        .filter(|b| is_ours(b))
    {
        assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
        let role = object(
            objects,
            "ClusterRole",
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        grant(&mut cluster, role);
    }
    for binding in kind_of(objects, "RoleBinding")
        .into_iter()
        .filter(|b| is_ours(b))
    {
        let role_name = binding["roleRef"]["name"].as_str().unwrap();
        let role = match binding["roleRef"]["kind"].as_str().unwrap() {
            "Role" => object(objects, "Role", role_name),
            _ => object(objects, "ClusterRole", role_name),
        };
        grant(&mut namespaced, role);
    }
    for (key, verbs) in &cluster {
        namespaced
            .entry(key.clone())
            .or_default()
            .extend(verbs.iter().cloned());
    }
    (cluster, namespaced)
}

fn check_rbac(objects: &[Value]) {
    let (cluster, namespaced) = grants(objects);
    let missing = |grants: &Grants, who: &str, group: &str, resource: &str, verbs: &[&str]| {
        let have = grants
            .get(&(group.to_string(), resource.to_string()))
            .cloned()
            .unwrap_or_default();
        verbs
            .iter()
            .filter(|v| !have.contains(**v))
            .map(|v| format!("{who}: {verb} {resource} ({group:?})", verb = v))
            .collect::<Vec<_>>()
    };
    let mut problems = Vec::new();
    let watch = ["get", "list", "watch"];
    // Cluster-wide, as the upstream RBAC examples of each sidecar.
    for (who, group, resource, verbs) in [
        (
            PROVISIONER,
            "",
            "persistentvolumes",
            &["get", "list", "watch", "create", "delete"][..],
        ),
        (
            PROVISIONER,
            "",
            "persistentvolumeclaims",
            &["get", "list", "watch", "update"][..],
        ),
        (PROVISIONER, "storage.k8s.io", "storageclasses", &watch[..]),
        (
            PROVISIONER,
            "",
            "events",
            &["list", "watch", "create", "update", "patch"][..],
        ),
        (PROVISIONER, "storage.k8s.io", "csinodes", &watch[..]),
        (PROVISIONER, "", "nodes", &watch[..]),
        (
            PROVISIONER,
            "storage.k8s.io",
            "volumeattachments",
            &watch[..],
        ),
        (
            PROVISIONER,
            "snapshot.storage.k8s.io",
            "volumesnapshots",
            &["get", "list"][..],
        ),
        (
            PROVISIONER,
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            &["get", "list"][..],
        ),
        (
            RESIZER,
            "",
            "persistentvolumes",
            &["get", "list", "watch", "patch"][..],
        ),
        (RESIZER, "", "persistentvolumeclaims", &watch[..]),
        (RESIZER, "", "persistentvolumeclaims/status", &["patch"][..]),
        (RESIZER, "", "pods", &watch[..]),
        (RESIZER, "", "events", &["create", "patch"][..]),
        (
            SNAPSHOTTER,
            "snapshot.storage.k8s.io",
            "volumesnapshotclasses",
            &watch[..],
        ),
        (
            SNAPSHOTTER,
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            &["get", "list", "watch", "update", "patch"][..],
        ),
        (
            SNAPSHOTTER,
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents/status",
            &["update", "patch"][..],
        ),
        (SNAPSHOTTER, "", "events", &["create", "patch"][..]),
    ] {
        problems.extend(missing(&cluster, who, group, resource, verbs));
    }
    // In the namespace: capacity objects and their owner chain, the resizer's lease.
    for (who, group, resource, verbs) in [
        (
            PROVISIONER,
            "storage.k8s.io",
            "csistoragecapacities",
            &["get", "list", "watch", "create", "update", "delete"][..],
        ),
        (PROVISIONER, "", "pods", &["get"][..]),
        (PROVISIONER, "apps", "daemonsets", &["get"][..]),
        (PROVISIONER, "apps", "replicasets", &["get"][..]),
        (
            RESIZER,
            "coordination.k8s.io",
            "leases",
            &["get", "list", "watch", "create", "update"][..],
        ),
    ] {
        problems.extend(missing(&namespaced, who, group, resource, verbs));
    }
    // loopcsi uses no secrets.
    assert!(
        !cluster.contains_key(&(String::new(), "secrets".into()))
            && !namespaced.contains_key(&(String::new(), "secrets".into())),
        "the node plugin must not be able to read secrets"
    );
    assert!(
        problems.is_empty(),
        "the service account lacks:\n{}",
        problems.join("\n")
    );
}

/// Every mention of a loopcsi topology key is the key the driver reports.
fn check_topology_key(objects: &[Value]) -> usize {
    let mut all = Vec::new();
    objects.iter().for_each(|o| strings(o, &mut all));
    let mentions: Vec<_> = all
        .into_iter()
        .filter(|s| s.contains("topology") && s.contains("loopcsi"))
        .collect();
    for mention in &mentions {
        assert_eq!(
            *mention, TOPOLOGY_KEY,
            "topology key in the manifests vs the code"
        );
    }
    mentions.len()
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

#[test]
fn base_renders_validates_and_wires_the_driver() {
    let objects = render(&deploy().join("base"));
    let config = check_node_plugin(&objects, DEFAULT_KUBELET_DIR);
    check_driver_objects(&objects, &config);
    check_containers(&objects, "base");
    check_images(&objects, "loopcsi");
    check_rbac(&objects);
    check_topology_key(&objects);
    assert_eq!(
        defaults(&objects),
        vec![],
        "the base makes nothing the default class"
    );
}

#[test]
fn example_overlay_renders_validates_and_sets_defaults() {
    let objects = render(&deploy().join("overlays/example"));
    let config = check_node_plugin(&objects, DEFAULT_KUBELET_DIR);
    check_driver_objects(&objects, &config);
    check_containers(&objects, "overlays/example");
    check_images(&objects, "registry.example.com/storage/loopcsi");
    check_rbac(&objects);
    check_topology_key(&objects);
    assert_eq!(
        defaults(&objects),
        vec![
            ("StorageClass".to_string(), "loopcsi-ext4".to_string()),
            (
                "VolumeSnapshotClass".to_string(),
                "loopcsi-snapshot".to_string()
            ),
        ]
    );
    assert!(
        kind_of(&objects, "ConfigMap").is_empty(),
        "the kubelet-dir ConfigMap only steers the build (local-config)"
    );
}

/// `a` relative to `b` (both absolute), for kustomize, which refuses absolute paths.
fn relative(a: &Path, b: &Path) -> PathBuf {
    let a: Vec<_> = a.components().collect();
    let b: Vec<_> = b.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push(Component::ParentDir);
    }
    for part in &a[common..] {
        out.push(part);
    }
    out
}

#[test]
fn kubelet_dir_is_set_in_one_place() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().canonicalize().unwrap();
    let deploy = deploy().canonicalize().unwrap();
    let kubelet_dir = "/var/lib/k0s/kubelet";
    let example =
        std::fs::read_to_string(deploy.join("overlays/example/kubelet-dir.yaml")).unwrap();
    let moved = example.replace(
        &format!("path: {DEFAULT_KUBELET_DIR}\n"),
        &format!("path: {kubelet_dir}\n"),
    );
    assert_ne!(
        moved, example,
        "overlays/example/kubelet-dir.yaml sets data.path"
    );
    std::fs::write(root.join("kubelet-dir.yaml"), moved).unwrap();
    std::fs::write(
        root.join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\n  - kubelet-dir.yaml\ncomponents:\n  - {}\n",
            relative(&deploy.join("base"), &root).display(),
            relative(&deploy.join("components/kubelet-dir"), &root).display()
        ),
    )
    .unwrap();
    let objects = render(&root);
    check_node_plugin(&objects, kubelet_dir);
    let mut all = Vec::new();
    strings(object(&objects, "DaemonSet", DAEMONSET), &mut all);
    let stale: Vec<_> = all
        .iter()
        .filter(|s| s.contains(DEFAULT_KUBELET_DIR))
        .collect();
    assert!(
        stale.is_empty(),
        "paths the kubelet-dir component missed: {stale:?}"
    );
}

#[test]
fn examples_validate_and_fit_the_classes() {
    let base = render(&deploy().join("base"));
    let classes: BTreeMap<_, _> = kind_of(&base, "StorageClass")
        .into_iter()
        .map(|c| (name(c).to_string(), c.clone()))
        .collect();
    let snapshot_class = name(kind_of(&base, "VolumeSnapshotClass")[0]).to_string();

    let dir = deploy().join("examples");
    let mut objects = Vec::new();
    for file in [
        "filesystem.yaml",
        "block.yaml",
        "snapshot.yaml",
        "restore.yaml",
    ] {
        objects.extend(load_file(&dir.join(file)));
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "block.yaml",
            "filesystem.yaml",
            "restore.yaml",
            "snapshot.yaml"
        ]
    );
    check_containers(&objects, "examples");
    assert!(
        check_topology_key(&objects) > 0,
        "the restore example co-locates its pod by the driver's topology key"
    );

    let pvcs: BTreeMap<_, _> = kind_of(&objects, "PersistentVolumeClaim")
        .into_iter()
        .map(|p| (name(p).to_string(), p))
        .collect();
    let request = |pvc: &Value| {
        quantity(
            pvc["spec"]["resources"]["requests"]["storage"]
                .as_str()
                .unwrap(),
        )
    };
    for (pvc_name, pvc) in &pvcs {
        let class = pvc["spec"]["storageClassName"].as_str().unwrap();
        let class = classes
            .get(class)
            .unwrap_or_else(|| panic!("PVC {pvc_name}: no StorageClass {class}"));
        let block = pvc["spec"]["volumeMode"] == "Block";
        if !block {
            let fs = FsType::from_name(
                class["parameters"]["csi.storage.k8s.io/fstype"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
            assert!(
                request(pvc) >= fs.minimum_size(),
                "PVC {pvc_name} is below the {fs:?} minimum"
            );
        }
        // The pod using it mounts a file system, or gets the device for a Block claim.
        let users: Vec<_> = kind_of(&objects, "Pod")
            .into_iter()
            .filter_map(|pod| {
                let volume = array(&pod["spec"]["volumes"])
                    .iter()
                    .find(|v| v["persistentVolumeClaim"]["claimName"] == pvc_name.as_str())?;
                Some((pod, volume["name"].clone()))
            })
            .collect();
        assert_eq!(users.len(), 1, "PVC {pvc_name}: one example pod uses it");
        let (pod, volume) = &users[0];
        let field = if block {
            "volumeDevices"
        } else {
            "volumeMounts"
        };
        assert!(
            array(&pod["spec"]["containers"])
                .iter()
                .any(|c| array(&c[field]).iter().any(|m| m["name"] == *volume)),
            "pod {} must use PVC {pvc_name} through {field}",
            name(pod)
        );
    }
    assert!(
        pvcs.values().any(|p| p["spec"]["volumeMode"] == "Block"),
        "a Block example"
    );

    let snapshots = kind_of(&objects, "VolumeSnapshot");
    assert_eq!(snapshots.len(), 1);
    let snapshot = snapshots[0];
    assert_eq!(
        snapshot["spec"]["volumeSnapshotClassName"],
        snapshot_class.as_str()
    );
    let source = pvcs[snapshot["spec"]["source"]["persistentVolumeClaimName"]
        .as_str()
        .unwrap()];
    let restores: Vec<_> = pvcs
        .values()
        .filter(|p| p["spec"]["dataSource"].is_object())
        .collect();
    assert_eq!(restores.len(), 1, "one restore example");
    let data_source = &restores[0]["spec"]["dataSource"];
    assert_eq!(data_source["apiGroup"], "snapshot.storage.k8s.io");
    assert_eq!(data_source["kind"], "VolumeSnapshot");
    assert_eq!(data_source["name"], snapshot["metadata"]["name"]);
    assert!(
        request(restores[0]) >= request(source),
        "a restore is at least the snapshot's size"
    );
}

// ------------------------------------------------------------------------------------------
// The container image
// ------------------------------------------------------------------------------------------

fn version(text: &str) -> Vec<u64> {
    text.trim()
        .split('.')
        .map(|n| n.parse().unwrap_or_else(|_| panic!("version {text:?}")))
        .collect()
}

/// The `rust-version` of a Cargo.toml's [package] table.
fn rust_version(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(value) = line.strip_prefix("rust-version") {
                let value = value.trim_start().strip_prefix('=')?.trim();
                return Some(value.trim_matches('"').to_string());
            }
        }
    }
    None
}

/// The highest rust-version among the registry packages of Cargo.lock whose sources cargo has
/// unpacked (all that this platform builds). Returns (version, package, how many were read).
fn locked_msrv() -> (Vec<u64>, String, usize) {
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let sources: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/src"))
        .map(|dirs| dirs.map(|d| d.unwrap().path()).collect())
        .unwrap_or_default();
    let (mut best, mut best_name, mut read) = (vec![0], String::new(), 0);
    for package in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            package.lines().find_map(|l| {
                Some(
                    l.strip_prefix(key)?
                        .trim_start()
                        .strip_prefix('=')?
                        .trim()
                        .trim_matches('"')
                        .to_string(),
                )
            })
        };
        let (Some(name), Some(ver), Some(source)) =
            (field("name"), field("version"), field("source"))
        else {
            continue;
        };
        if !source.starts_with("registry+") {
            continue;
        }
        let Some(manifest) = sources
            .iter()
            .map(|s| s.join(format!("{name}-{ver}/Cargo.toml")))
            .find(|m| m.is_file())
        else {
            continue;
        };
        read += 1;
        if let Some(msrv) = rust_version(&std::fs::read_to_string(manifest).unwrap()) {
            let msrv = version(&msrv);
            if msrv > best {
                (best, best_name) = (msrv, format!("{name} {ver}"));
            }
        }
    }
    (best, best_name, read)
}

#[test]
fn dockerfile_builds_locked_with_a_new_enough_rust() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    // Instructions, with continuation lines joined and comments dropped.
    let joined = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instructions: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let arg = |key: &str| {
        instructions.iter().find_map(|l| {
            l.strip_prefix("ARG ")?
                .strip_prefix(key)?
                .strip_prefix('=')
                .map(str::to_string)
        })
    };
    let rust = arg("RUST_VERSION").expect("ARG RUST_VERSION=x.y.z");
    let release = arg("DEBIAN_RELEASE").expect("ARG DEBIAN_RELEASE=…");
    let froms: Vec<_> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "a builder stage and a runtime stage");
    assert_eq!(
        *froms[0],
        "FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder"
    );
    assert_eq!(
        *froms[1], "FROM debian:${DEBIAN_RELEASE}-slim",
        "the runtime: slim Debian, the builder's release"
    );
    assert!(!release.is_empty());

    // The builder is pinned to a full version, at least Cargo.toml's rust-version and every
    // locked dependency's (else `cargo build --locked` fails inside the image).
    let rust = version(&rust);
    assert_eq!(rust.len(), 3, "RUST_VERSION is pinned to x.y.z");
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let declared = version(&rust_version(&manifest).expect("Cargo.toml has rust-version"));
    assert!(
        rust >= declared,
        "the builder's Rust {rust:?} is older than rust-version {declared:?}"
    );
    let (needed, by, read) = locked_msrv();
    assert!(
        read > 0,
        "no unpacked sources of Cargo.lock's packages under $CARGO_HOME/registry/src"
    );
    assert!(
        rust >= needed,
        "the builder's Rust {rust:?} is older than {by} needs ({needed:?}); raise RUST_VERSION \
         (and Cargo.toml's rust-version)"
    );

    let build = instructions
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build step");
    for needed in ["--locked", "--release", "--bin loopcsi"] {
        assert!(
            build.contains(needed),
            "cargo build needs {needed}: {build}"
        );
    }
    let install = instructions
        .iter()
        .find(|l| l.contains("apt-get install"))
        .expect("the runtime installs its tools");
    for needed in [
        "-y",
        "--no-install-recommends",
        "e2fsprogs",
        "xfsprogs",
        "util-linux",
        "rm -rf /var/lib/apt/lists/*",
    ] {
        assert!(
            install.contains(needed),
            "the runtime's apt-get step needs {needed}"
        );
    }
    assert!(instructions.contains(&"ARG DEBIAN_FRONTEND=noninteractive"));
    assert!(!instructions
        .iter()
        .any(|l| l.to_ascii_uppercase().starts_with("HEALTHCHECK")));
    assert_eq!(
        instructions
            .iter()
            .filter(|l| l.starts_with("ENTRYPOINT"))
            .collect::<Vec<_>>(),
        [&r#"ENTRYPOINT ["loopcsi"]"#]
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("COPY --from=builder") && l.ends_with("/usr/local/bin/loopcsi")),
        "the binary goes to /usr/local/bin/loopcsi (on PATH, for the entry point)"
    );

    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let ignored: BTreeSet<_> = ignore.lines().map(str::trim).collect();
    for needed in ["target", ".git"] {
        assert!(
            ignored.contains(needed),
            ".dockerignore must keep {needed} out of the context"
        );
    }
    for kept in ["src", "proto", "build.rs", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !ignored.contains(kept),
            ".dockerignore must not drop {kept}"
        );
    }
}
