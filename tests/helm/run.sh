#!/usr/bin/env bash
# Checks the Helm chart deploy/helm/loopcsi offline, as tests/manifests.rs checks the kustomize
# base (run by .ci/run after cargo test; no cluster, no network beyond the Go module proxy that
# builds helm the first time):
#
#   tests/helm/run.sh
#
# 1. helm, built from the pinned Go module (tests/e2e/versions.env, HELM_VERSION) by
#    tests/e2e/build.sh and cached in ~/.cache/loopcsi-e2e/helm-<version>/.
# 2. helm lint --strict, with the default values and with tests/helm/values-all.yaml (every value
#    set); values.schema.json must refuse bad values (a few are tried).
# 3. helm template with the defaults, the every-value file, the example values and a moved kubelet
#    directory; every object validated strictly against the Kubernetes 1.33 and 1.37 schemas
#    (kubernetes-validate 1.37.0, as tests/manifests.rs), the snapshot class and the Prometheus
#    Operator monitors structurally; the wiring no schema sees (driver name, kubelet paths,
#    registrar socket, metrics port).
# 4. The chart and kustomize render the same objects with the same spec: the defaults against
#    deploy/kubernetes/base, tests/helm/values-example.yaml against overlays/example, and a
#    kubelet directory and pool moved by values against the same moved by an overlay using
#    components/kubelet-dir. What may differ is listed in check.py (normalise, compare).
# 5. Every value in values.yaml changes the render (check.py every-value).
#
# Prints PASS lines with the evidence; exits non-zero on the first failing step.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../e2e/versions.env
. "$repo/tests/e2e/versions.env"
chart="$repo/deploy/helm/loopcsi"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi-e2e"
work="$(mktemp -d /tmp/loopcsi-helm.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# helm keeps its config, cache and plugins here, not in the user's home.
export HELM_CONFIG_HOME="$work/helm/config" HELM_CACHE_HOME="$work/helm/cache" HELM_DATA_HOME="$work/helm/data"

pass() { printf '[helm] PASS %s\n' "$*" >&2; }
fail() {
    printf '[helm] FAIL %s\n' "$*" >&2
    exit 1
}
command -v kubectl >/dev/null || fail "kubectl (with kustomize v5) is needed to render deploy/kubernetes"

"$repo/tests/e2e/build.sh" helm
helm="$cache/helm-$HELM_VERSION/helm"
version="$("$helm" version --template '{{.Version}}')"
[ "$version" = "$HELM_VERSION" ] || fail "helm reports version $version, not the pinned $HELM_VERSION"
pass "helm $version ($helm)"

# ---------------------------------------------------------------- lint and schema
for values in "" "$here/values-all.yaml"; do
    out="$("$helm" lint --strict "$chart" ${values:+-f "$values"} 2>&1)" ||
        fail "helm lint --strict ${values:+-f $values} failed: $out"
    pass "helm lint --strict${values:+ -f ${values#"$repo"/}}: $(printf '%s' "$out" | tail -1)"
done

# refused WHY EXPECTED VALUES_YAML: the chart must refuse to render with these values, and say
# EXPECTED (a regular expression) about it: refused for the right reason, not any.
refused() {
    local why="$1" expected="$2" out
    printf '%s\n' "$3" >"$work/refused.yaml"
    if out="$("$helm" template loopcsi "$chart" --namespace loopcsi -f "$work/refused.yaml" 2>&1)"; then
        fail "helm template accepted $3 ($why)"
    fi
    printf '%s' "$out" | grep -qE -- "$expected" ||
        fail "helm template refused $3 ($why), but not with /$expected/: $out"
    pass "refused ($why) $(printf '%s' "$3" | tr '\n' ' ' | cut -c1-60): $(printf '%s' "$out" | grep -m1 -E -- "$expected")"
}
# class NAME DEFAULT FSTYPE PROVISIONING: one storageClasses entry, as flow YAML.
class() {
    local name="$1" default="$2" fs="$3" prov="$4"
    printf '{name: %s, enabled: true, default: %s, fsType: %s, provisioning: %s, reclaimPolicy: Delete, allowVolumeExpansion: true}' \
        "$name" "$default" "$fs" "$prov"
}
refused "the driver makes ext4 and xfs only" "fsType': value must be one of" \
    "storageClasses: [$(class a false btrfs thin)]"
refused "thin or thick" "provisioning': value must be one of" "storageClasses: [$(class a false ext4 thinner)]"
refused "two default classes" "at most one default class, not a, b" \
    "storageClasses: [$(class a true ext4 thin), $(class b true xfs thin)]"
refused "one class twice" "a is listed twice" "storageClasses: [$(class a false ext4 thin), $(class a false xfs thin)]"
refused "a relative kubelet directory" "/kubeletDir': 'var/lib/kubelet' does not match pattern" "kubeletDir: var/lib/kubelet"
refused "the pool must not be the root directory" "/poolDir': 'not' failed" "poolDir: /"
refused "not a domain-style name" "/driverName': '-bad' does not match pattern" "driverName: -bad"
refused "the registrar's port" "/metrics/port': 'not' failed" "metrics: {port: 9809}"
refused "an unknown value" "additional properties 'imageTag' not allowed" "imageTag: v1"
refused "an untagged sidecar image" "/sidecars/provisioner/image/tag': '' does not match pattern" "sidecars: {provisioner: {image: {tag: ''}}}"
refused "a PodMonitor without the metrics port" "need metrics.enabled" \
    "metrics: {enabled: false, podMonitor: {enabled: true}}"
refused "changed-block tracking without the CA" "snapshotMetadata.caCert is required" \
    "snapshotMetadata: {enabled: true}"
refused "a caCert that is not base64" "/snapshotMetadata/caCert': 'not base64!' does not match pattern" \
    "snapshotMetadata: {enabled: true, caCert: 'not base64!'}"

# ---------------------------------------------------------------- render and validate
render() { # NAME ARGS...: helm template into $work/NAME.yaml
    local name="$1"
    shift
    "$helm" template loopcsi "$chart" --namespace loopcsi "$@" >"$work/$name.yaml" ||
        fail "helm template $* failed"
}
render default
render all -f "$here/values-all.yaml"
render example -f "$here/values-example.yaml"
render moved --set kubeletDir=/var/lib/k0s/kubelet --set poolDir=/srv/loopcsi
render no-metrics --set metrics.enabled=false
render cbt -f "$here/values-snapshot-metadata.yaml"
for name in default all example moved no-metrics cbt; do
    python3 "$here/check.py" validate "$work/$name.yaml" || fail "$name: an object is invalid (above)"
    python3 "$here/check.py" wiring "$work/$name.yaml" || fail "$name: the wiring is wrong (above)"
done
pass "every object of 6 renders valid for Kubernetes 1.33 and 1.37; wiring consistent"
if ! grep -q 'kind: PodMonitor' "$work/all.yaml" || ! grep -q 'kind: ServiceMonitor' "$work/all.yaml"; then
    fail "values-all.yaml turns on both monitors, but the render lacks one"
fi
! grep -qE 'kind: (PodMonitor|ServiceMonitor)|--metrics-address' "$work/no-metrics.yaml" ||
    fail "metrics.enabled=false still renders a monitor or --metrics-address"

# ---------------------------------------------------------------- the same objects as kustomize
kubectl kustomize "$repo/deploy/kubernetes/base" >"$work/k-base.yaml"
kubectl kustomize "$repo/deploy/kubernetes/overlays/example" >"$work/k-example.yaml"
# An overlay that moves the kubelet directory the documented way (components/kubelet-dir) and
# the pool by a patch, as the e2e tier's overlay does; kustomize takes bases by relative path.
mkdir -p "$work/overlay"
deploy="$(realpath --relative-to="$work/overlay" "$repo/deploy/kubernetes")"
cat >"$work/overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [$deploy/base, kubelet-dir.yaml]
components: [$deploy/components/kubelet-dir]
patches:
  - target: {kind: DaemonSet, name: loopcsi-node}
    patch: |-
      - {op: test, path: /spec/template/spec/volumes/4/name, value: pool-dir}
      - {op: replace, path: /spec/template/spec/volumes/4/hostPath/path, value: /srv/loopcsi}
EOF
cat >"$work/overlay/kubelet-dir.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: loopcsi-kubelet-dir
  annotations: {config.kubernetes.io/local-config: "true"}
data: {path: /var/lib/k0s/kubelet}
EOF
kubectl kustomize "$work/overlay" >"$work/k-moved.yaml"
# Changed-block tracking the documented way: components/snapshot-metadata and its ConfigMap, made
# from the caCert and audience of tests/helm/values-snapshot-metadata.yaml.
mkdir -p "$work/cbt"
deploy="$(realpath --relative-to="$work/cbt" "$repo/deploy/kubernetes")"
cat >"$work/cbt/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [$deploy/base, snapshot-metadata.yaml]
components: [$deploy/components/snapshot-metadata]
EOF
python3 -c '
import sys, yaml
v = yaml.safe_load(open(sys.argv[1]))["snapshotMetadata"]
print(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
    "metadata": {"name": "loopcsi-snapshot-metadata",
                 "annotations": {"config.kubernetes.io/local-config": "true"}},
    "data": {"caCert": v["caCert"], "audience": v["audience"]}}))
' "$here/values-snapshot-metadata.yaml" >"$work/cbt/snapshot-metadata.yaml"
kubectl kustomize "$work/cbt" >"$work/k-cbt.yaml"
python3 "$here/check.py" compare "$work/k-base.yaml" "$work/default.yaml" ||
    fail "the default render differs from deploy/kubernetes/base (above)"
python3 "$here/check.py" compare "$work/k-example.yaml" "$work/example.yaml" ||
    fail "values-example.yaml renders other objects than overlays/example (above)"
python3 "$here/check.py" compare "$work/k-moved.yaml" "$work/moved.yaml" ||
    fail "kubeletDir/poolDir move other paths than components/kubelet-dir and the pool patch (above)"
python3 "$here/check.py" compare "$work/k-cbt.yaml" "$work/cbt.yaml" ||
    fail "values-snapshot-metadata.yaml renders other objects than components/snapshot-metadata (above)"
pass "the chart renders the objects of the base (defaults), of overlays/example (values-example.yaml), of components/snapshot-metadata (values-snapshot-metadata.yaml) and of a kubelet dir and pool moved by an overlay (kubeletDir, poolDir): $(grep -c '^kind:' "$work/default.yaml") objects each, equal but for Helm's labels and the Namespace"

# ---------------------------------------------------------------- every value matters
python3 "$here/check.py" every-value "$helm" "$chart" "$here/values-all.yaml" ||
    fail "a value is missing from values-all.yaml or has no effect (above)"
pass "every value of values.yaml is set by values-all.yaml and changes the render"
