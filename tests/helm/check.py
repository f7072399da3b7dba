#!/usr/bin/env python3
"""Offline checks of the rendered Helm chart (deploy/helm/loopcsi), run by tests/helm/run.sh.

  check.py validate FILE...            every object, strictly, against the Kubernetes schemas
  check.py compare KUSTOMIZE HELM      the same objects with the same spec (what may differ: below)
  check.py every-value HELM CHART ALL  each value in ALL differs from the default and changes the render
  check.py wiring FILE                 what no schema knows: driver name, kubelet paths, ports

Every failure is printed as one line saying what was expected and what was seen; the exit status
is 1 if there was any.
"""
import base64
import binascii
import copy
import json
import re
import subprocess
import sys
import tempfile

import yaml

try:
    from kubernetes_validate import utils as kv
    from kubernetes_validate.version import __version__ as kv_version
except ImportError as e:  # the same package and version tests/manifests.rs uses
    sys.exit(f"cannot import kubernetes_validate ({e}): pip install kubernetes-validate==1.37.0")

# The oldest Kubernetes the deployment supports and the newest the pinned validator knows: the
# versions of tests/manifests.rs (KUBE_VERSIONS).
KUBE_VERSIONS = ["1.33.0", "1.37.0"]

# Labels Helm charts conventionally put on every object and pod: they name the release and the
# chart, which the kustomize base has no notion of. Nothing selects on them (the DaemonSet's
# selector is app.kubernetes.io/name alone, as in the base).
HELM_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}

# Cluster-scoped kinds of the deployment. kustomize's `namespace:` sets metadata.namespace on
# every kind it does not know to be cluster-scoped, the VolumeSnapshotClass (a CRD) among them;
# the API server drops metadata.namespace of a cluster-scoped object, so it is not compared.
CLUSTER_SCOPED = {"Namespace", "CSIDriver", "StorageClass", "VolumeSnapshotClass", "ClusterRole",
                  "ClusterRoleBinding", "VolumeGroupSnapshotClass", "SnapshotMetadataService"}

problems = []


def problem(text):
    problems.append(text)
    print(f"  problem: {text}", file=sys.stderr)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def ident(obj):
    md = dict(obj.get("metadata", {}))
    if obj.get("kind") in CLUSTER_SCOPED:
        md.pop("namespace", None)
    return f"{obj.get('kind')} {md.get('namespace', '') + '/' if md.get('namespace') else ''}{md.get('name')}"


# ------------------------------------------------------------------------------ validate
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")


def only_keys(value, allowed, at):
    if not isinstance(value, dict):
        problem(f"{at} is not a mapping")
        return
    extra = sorted(set(value) - set(allowed))
    if extra:
        problem(f"{at}: unknown fields {extra} (allowed: {sorted(allowed)})")


def check_metadata(obj, at, namespaced):
    md = obj.get("metadata") or {}
    only_keys(md, ["name", "namespace", "labels", "annotations"], f"{at} metadata")
    if not DNS_SUBDOMAIN.match(md.get("name") or ""):
        problem(f"{at}: metadata.name is not a DNS subdomain")
    if namespaced and not md.get("namespace"):
        problem(f"{at}: a namespaced object without metadata.namespace")
    for key in ("labels", "annotations"):
        if any(not isinstance(v, str) for v in (md.get(key) or {}).values()):
            problem(f"{at}: metadata.{key} values must be strings")


def check_crd_object(obj):
    """The custom resources that kubernetes-validate has no schema for, checked by their
    published v1 APIs: the snapshot class (as tests/manifests.rs checks it) and the Prometheus
    Operator's monitors (the fields this chart uses, each with its documented type)."""
    kind, at = obj.get("kind"), ident(obj)
    if kind == "SnapshotMetadataService":
        return check_snapshot_metadata_service(obj, at)
    if kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
        api = "snapshot.storage.k8s.io/v1" if kind == "VolumeSnapshotClass" else "groupsnapshot.storage.k8s.io/v1"
        if obj.get("apiVersion") != api:
            problem(f"{at}: apiVersion {obj.get('apiVersion')} is not {api}")
        check_metadata(obj, at, namespaced=False)
        only_keys(obj, ["apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"], at)
        if not obj.get("driver"):
            problem(f"{at}: driver is required")
        if obj.get("deletionPolicy") not in ("Delete", "Retain"):
            problem(f"{at}: deletionPolicy {obj.get('deletionPolicy')!r} is not Delete or Retain")
        return True
    if kind in ("PodMonitor", "ServiceMonitor"):
        if obj.get("apiVersion") != "monitoring.coreos.com/v1":
            problem(f"{at}: apiVersion {obj.get('apiVersion')} is not monitoring.coreos.com/v1")
        check_metadata(obj, at, namespaced=True)
        only_keys(obj, ["apiVersion", "kind", "metadata", "spec"], at)
        spec = obj.get("spec") or {}
        endpoints = "podMetricsEndpoints" if kind == "PodMonitor" else "endpoints"
        only_keys(spec, ["selector", "namespaceSelector", endpoints, "jobLabel"], f"{at} spec")
        sel = spec.get("selector") or {}
        only_keys(sel, ["matchLabels", "matchExpressions"], f"{at} spec.selector")
        if not sel.get("matchLabels"):
            problem(f"{at}: spec.selector.matchLabels is empty (it would select every pod)")
        eps = spec.get(endpoints)
        if not isinstance(eps, list) or not eps:
            problem(f"{at}: spec.{endpoints} must be a non-empty list")
            return True
        for i, ep in enumerate(eps):
            only_keys(ep, ["port", "path", "interval", "scheme", "scrapeTimeout"], f"{at} spec.{endpoints}[{i}]")
            if not isinstance(ep.get("port"), str) or not ep["port"]:
                problem(f"{at}: spec.{endpoints}[{i}].port must be a port name")
            if not str(ep.get("path", "/")).startswith("/"):
                problem(f"{at}: spec.{endpoints}[{i}].path must be absolute")
            if "interval" in ep and not DURATION.match(str(ep["interval"])):
                problem(f"{at}: spec.{endpoints}[{i}].interval {ep['interval']!r} is not a duration")
        return True
    return False


def check_snapshot_metadata_service(obj, at):
    """cbt.storage.k8s.io/v1alpha1 (external-snapshot-metadata client v0.1.0 config/crd): address,
    audience and caCert (format: byte, base64) are required; as tests/manifests.rs checks it."""
    if obj.get("apiVersion") != "cbt.storage.k8s.io/v1alpha1":
        problem(f"{at}: apiVersion {obj.get('apiVersion')} is not cbt.storage.k8s.io/v1alpha1")
    check_metadata(obj, at, namespaced=False)
    only_keys(obj, ["apiVersion", "kind", "metadata", "spec"], at)
    spec = obj.get("spec") or {}
    only_keys(spec, ["address", "audience", "caCert"], f"{at} spec")
    for field in ("address", "audience", "caCert"):
        if not isinstance(spec.get(field), str) or not spec[field]:
            problem(f"{at}: spec.{field} is required")
    host, _, port = str(spec.get("address", "")).rpartition(":")
    if not host or not port.isdigit():
        problem(f"{at}: spec.address {spec.get('address')!r} is not host:port")
    try:
        base64.b64decode(str(spec.get("caCert", "")), validate=True)
    except binascii.Error:
        problem(f"{at}: spec.caCert is not base64")
    return True


def validate(paths):
    for path in paths:
        docs = load(path)
        if not docs:
            problem(f"{path}: no objects rendered")
        for obj in docs:
            if check_crd_object(obj):
                continue
            for version in KUBE_VERSIONS:
                try:
                    kv.validate(obj, version, strict=True)
                except kv.SchemaNotFoundError as e:
                    problem(f"{path}: {ident(obj)} (Kubernetes {version}): no schema: {e.message}")
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    problem(f"{path}: {ident(obj)} (Kubernetes {version}): {where}: {e.message}")
        print(f"validated {len(docs)} objects of {path} against Kubernetes {' and '.join(KUBE_VERSIONS)} "
              f"(kubernetes-validate {kv_version}, strict)")


# ------------------------------------------------------------------------------ compare
def normalise(obj):
    """What may differ between the kustomize base and the chart, taken out:
    - Helm's labels (HELM_LABELS) on objects and pod templates;
    - metadata.namespace of cluster-scoped objects (CLUSTER_SCOPED);
    - imagePullPolicy: the base leaves it out and the API server defaults it (IfNotPresent for
      a tag other than :latest, Always for :latest or no tag); the chart writes it out.
    Comments and key order vanish with the YAML parse. Everything else must be equal."""
    obj = copy.deepcopy(obj)
    if obj.get("kind") in CLUSTER_SCOPED:
        obj["metadata"].pop("namespace", None)
    for md in (obj.get("metadata"), (((obj.get("spec") or {}).get("template") or {}).get("metadata"))):
        if md and "labels" in md:
            for key in HELM_LABELS:
                md["labels"].pop(key, None)
            if not md["labels"]:
                del md["labels"]
    pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        if "imagePullPolicy" not in c:
            ref = c.get("image", "").split("@")[0]
            tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
            c["imagePullPolicy"] = "Always" if tag in ("", "latest") else "IfNotPresent"
    return obj


def diff(a, b, at, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{at}.{k}: only in the chart: {json.dumps(b[k])[:200]}")
            elif k not in b:
                out.append(f"{at}.{k}: only in kustomize: {json.dumps(a[k])[:200]}")
            else:
                diff(a[k], b[k], f"{at}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            name = x.get("name") if isinstance(x, dict) else None
            diff(x, y, f"{at}[{name if name else i}]", out)
    elif a != b:
        out.append(f"{at}: kustomize {json.dumps(a)[:200]}, chart {json.dumps(b)[:200]}")


def compare(kustomize_path, helm_path):
    ks = {ident(o): o for o in load(kustomize_path)}
    hs = {ident(o): o for o in load(helm_path)}
    # The one object that differs by design: the chart installs into the release namespace
    # (helm install --namespace, created beforehand or with --create-namespace, as Helm charts
    # do), so it renders no Namespace; the base creates its namespace with the Pod Security
    # labels, which the docs and NOTES.txt tell Helm users to set.
    namespaces = [k for k, o in ks.items() if o.get("kind") == "Namespace"]
    for k in namespaces:
        del ks[k]
    if len(namespaces) != 1:
        problem(f"{kustomize_path}: expected one Namespace in the kustomize render, saw {namespaces}")
    if any(o.get("kind") == "Namespace" for o in hs.values()):
        problem(f"{helm_path}: the chart renders a Namespace; it must use the release namespace")
    for k in sorted(set(ks) - set(hs)):
        problem(f"{k}: in {kustomize_path} but not in the chart's render {helm_path}")
    for k in sorted(set(hs) - set(ks)):
        problem(f"{k}: in the chart's render {helm_path} but not in {kustomize_path}")
    same = 0
    for k in sorted(set(ks) & set(hs)):
        out = []
        diff(normalise(ks[k]), normalise(hs[k]), k, out)
        for line in out:
            problem(line)
        same += not out
    print(f"compared {kustomize_path} with {helm_path}: {same} of {len(ks)} objects equal "
          f"(besides the Namespace, which the chart leaves to Helm)")


# ------------------------------------------------------------------------------ every value
def leaves(value, path=()):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaves(v, path + (k,))
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value) and path != ("tolerations",) and path != ("imagePullSecrets",):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))
    else:
        yield path, value


def get(value, path):
    for p in path:
        if isinstance(value, dict):
            if p not in value:
                return KeyError
            value = value[p]
        elif isinstance(value, list):
            if p >= len(value):
                return KeyError
            value = value[p]
        else:
            return KeyError
    return value


def put(value, path, leaf):
    for p in path[:-1]:
        value = value[p]
    value[path[-1]] = leaf


# Switches that the every-value file keeps at their default, and why. Each is checked the other
# way: the defaults with it switched alone must change the render.
KEPT_DEFAULT = {
    "metrics.enabled": "the PodMonitor and ServiceMonitor the file turns on need the metrics port",
    "storageClasses.0.enabled": "so that the every-value render has a class to validate "
                                "(classes 1 and 2 are disabled there)",
    "volumeSnapshotClass.enabled": "so that the every-value render has a snapshot class to validate",
    "volumeGroupSnapshotClass.enabled": "so that the every-value render has a group snapshot class to validate",
}


def every_value(helm, chart, all_values_path):
    """Each leaf of values.yaml is set in ALL to something other than its default (KEPT_DEFAULT
    aside), and that value matters: the defaults with it alone, or ALL without it, render other
    objects. So no value is forgotten by the test file or ignored by the chart."""
    with open(f"{chart}/values.yaml") as f:
        defaults = yaml.safe_load(f)
    with open(all_values_path) as f:
        everything = yaml.safe_load(f)

    def render(values):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(values, f)
            f.flush()
            r = subprocess.run([helm, "template", "loopcsi", chart, "--namespace", "loopcsi", "-f", f.name],
                               capture_output=True, text=True)
        if r.returncode != 0:
            return None, r.stderr.strip()
        return r.stdout, None

    base, err = render(defaults)
    full, err_full = render(everything)
    if base is None or full is None:
        problem(f"the defaults or {all_values_path} do not render: {err or err_full}")
        return
    checked = 0
    for path, default in leaves(defaults):
        name = ".".join(str(p) for p in path)
        value = get(everything, path)
        if value is KeyError:
            problem(f"{all_values_path} does not set {name}")
            continue
        if value == default:
            if name not in KEPT_DEFAULT:
                problem(f"{all_values_path} sets {name} to its default {default!r}: set it to something else")
                continue
            value = not default  # a switch: its other position
        one = copy.deepcopy(defaults)
        put(one, path, copy.deepcopy(value))
        alone, err = render(one)
        if alone is not None and alone != base:
            checked += 1
            continue
        rest = copy.deepcopy(everything)
        put(rest, path, copy.deepcopy(default))
        without, err2 = render(rest)
        if without is not None and without != full:
            checked += 1
        elif without is None and name in (err2 or ""):
            # A value required by the others (snapshotMetadata.caCert when enabled): the chart
            # refuses to render without it and says which.
            checked += 1
        else:
            problem(f"{name}={json.dumps(value)} changes nothing, neither alone ({err or 'same render'}) "
                    f"nor left out of {all_values_path} ({err2 or 'same render'}): the chart ignores it")
    print(f"every value: {checked} values of values.yaml, each as {all_values_path} sets it (or switched "
          f"alone: {', '.join(KEPT_DEFAULT)}), change the render")


# ------------------------------------------------------------------------------ wiring
def wiring(path):
    """The couplings a schema cannot see, for any values: one driver name everywhere; every
    kubelet path under the one kubelet directory, the kubelet-dir mount at its host path; the
    registrar announces the socket the driver serves; the metrics port is the one declared."""
    docs = load(path)
    by_kind = {}
    for o in docs:
        by_kind.setdefault(o["kind"], []).append(o)
    (driver,) = by_kind["CSIDriver"]
    name = driver["metadata"]["name"]
    for sc in by_kind.get("StorageClass", []):
        if sc["provisioner"] != name:
            problem(f"{path}: {ident(sc)} provisioner {sc['provisioner']} is not the CSIDriver {name}")
    for vsc in by_kind.get("VolumeSnapshotClass", []):
        if vsc["driver"] != name:
            problem(f"{path}: {ident(vsc)} driver {vsc['driver']} is not the CSIDriver {name}")
    (ds,) = by_kind["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    drv = containers["loopcsi"]
    if f"--driver-name={name}" not in drv["args"]:
        problem(f"{path}: the driver's args {drv['args']} lack --driver-name={name}")
    kubelet = volumes["kubelet-dir"]["hostPath"]["path"]
    mount = [m for m in drv["volumeMounts"] if m["name"] == "kubelet-dir"][0]
    if mount["mountPath"] != kubelet or mount.get("mountPropagation") != "Bidirectional":
        problem(f"{path}: the kubelet-dir mount {mount} is not at its host path {kubelet}, Bidirectional")
    socket_dir = volumes["socket-dir"]["hostPath"]["path"]
    if socket_dir != f"{kubelet}/plugins/{name}":
        problem(f"{path}: socket-dir {socket_dir} is not {kubelet}/plugins/{name}")
    if volumes["registration-dir"]["hostPath"]["path"] != f"{kubelet}/plugins_registry":
        problem(f"{path}: registration-dir {volumes['registration-dir']} is not under {kubelet}")
    reg = {e["name"]: e.get("value") for e in containers["node-driver-registrar"]["env"]}
    endpoint = [a for a in drv["args"] if a.startswith("--endpoint=unix://")]
    sock_mount = [m["mountPath"] for m in drv["volumeMounts"] if m["name"] == "socket-dir"][0]
    if endpoint != [f"--endpoint=unix://{sock_mount}/csi.sock"] or reg["DRIVER_REG_SOCK_PATH"] != f"{socket_dir}/csi.sock":
        problem(f"{path}: the driver serves {endpoint} in {sock_mount} (host {socket_dir}) but the "
                f"registrar announces {reg['DRIVER_REG_SOCK_PATH']}")
    metrics = [a.rsplit(":", 1)[1] for a in drv["args"] if a.startswith("--metrics-address=")]
    ports = {p["name"]: p["containerPort"] for p in drv.get("ports", [])}
    if metrics != ([str(ports["metrics"])] if "metrics" in ports else []):
        problem(f"{path}: --metrics-address port {metrics} is not the metrics containerPort {ports.get('metrics')}")
    for c in pod["containers"]:
        if not re.search(r":[A-Za-z0-9_][A-Za-z0-9_.-]*$", c["image"].rsplit("/", 1)[-1]):
            problem(f"{path}: container {c['name']} image {c['image']} has no tag")
    print(f"wiring of {path}: driver {name}, kubelet dir {kubelet}, socket {reg['DRIVER_REG_SOCK_PATH']}, "
          f"pool {volumes['pool-dir']['hostPath']['path']}, metrics port {ports.get('metrics', 'off')}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"validate": lambda: validate(args), "compare": lambda: compare(*args),
     "every-value": lambda: every_value(*args), "wiring": lambda: wiring(*args)}[cmd]()
    if problems:
        print(f"check.py {cmd}: {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
