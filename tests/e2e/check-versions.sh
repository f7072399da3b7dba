#!/usr/bin/env bash
# Checks that every CSI sidecar tag loopcsi deploys exists: each image tag in
# deploy/kubernetes/base/daemonset.yaml and in the chart's deploy/helm/loopcsi/values.yaml must be
# a version of the sidecar's Go module on the module proxy (`go list -m -versions`, which asks
# GOPROXY's /@v/list), and tests/e2e/versions.env must pin the same versions as the manifests.
#
#   tests/e2e/check-versions.sh
#
# Needs go and the module proxy (nothing else from the network). A module whose version list the
# proxy refuses counts as checked if the exact tag is served, and is otherwise reported as
# UNCHECKED, by name and with the proxy's answer, never passed silently; the proxy has refused github.com/kubernetes-csi/node-driver-registrar and .../livenessprobe (403 "not
# available", every version). The exit status is 1 if a tag does not exist or a version
# disagrees, and also if a tag is unchecked when CHECK_VERSIONS_STRICT=1.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"

# The sidecar images of both deployments, one "SOURCE IMAGE TAG" line each.
# The opt-in components patch in sidecars of their own (components/snapshot-metadata).
images="$(python3 - "$repo/deploy/helm/loopcsi/values.yaml" "$repo/deploy/kubernetes/base/daemonset.yaml" \
    "$repo/deploy/kubernetes/components/snapshot-metadata/sidecar.yaml" <<'EOF'
import os, sys, yaml
values = sys.argv[1]
for path in sys.argv[2:]:
    doc = yaml.safe_load(open(path))
    # A DaemonSet, or a JSON patch adding containers (components/snapshot-metadata).
    if isinstance(doc, list):
        containers = [op["value"] for op in doc if op["path"].endswith("/containers/-")]
    else:
        containers = doc["spec"]["template"]["spec"]["containers"]
    # The driver's own image (the loopcsi container, and the snapshot-router container that
    # runs the same binary) is no sidecar.
    ours = {c["image"] for c in containers if c["name"] == "loopcsi"}
    for c in containers:
        if c["name"] == "loopcsi" or c["image"] in ours:
            continue
        image, _, tag = c["image"].rpartition(":")
        print(os.path.relpath(path, os.path.dirname(values) + "/../../.."), image, tag)
for name, s in yaml.safe_load(open(values))["sidecars"].items():
    if isinstance(s, dict):
        print("deploy/helm/loopcsi/values.yaml", s["image"]["repository"], s["image"]["tag"])
EOF
)"

# module_of IMAGE TAG: the Go module the image is built from, at the tag's major version. The
# registrar's and the livenessprobe's go.mod files name no major version suffix.
module_of() {
    local major="${2#v}"
    major="${major%%.*}"
    local suffix=""
    [ "$major" -ge 2 ] && suffix="/v$major"
    case "${1##*/}" in
    csi-provisioner) echo "github.com/kubernetes-csi/external-provisioner$suffix" ;;
    csi-resizer) echo "github.com/kubernetes-csi/external-resizer$suffix" ;;
    csi-snapshotter | snapshot-controller) echo "github.com/kubernetes-csi/external-snapshotter$suffix" ;;
    csi-node-driver-registrar) echo "github.com/kubernetes-csi/node-driver-registrar" ;;
    livenessprobe) echo "github.com/kubernetes-csi/livenessprobe" ;;
    # external-snapshot-metadata has no major version suffix below v2.
    csi-snapshot-metadata) echo "github.com/kubernetes-csi/external-snapshot-metadata$suffix" ;;
    *) return 1 ;;
    esac
}

bad=0 unchecked=0 checked=0
declare -A listed=() answer=()
while read -r source image tag; do
    module="$(module_of "$image" "$tag")" || {
        echo "FAIL $source: $image:$tag is no sidecar this script knows (add it to module_of)"
        bad=1
        continue
    }
    if [ -z "${listed[$module]+x}" ]; then
        # One question per module; outside any module, so nothing here is downloaded or built.
        if out="$(cd / && GOFLAGS=-mod=mod go list -m -versions "$module" 2>&1)"; then
            listed[$module]="$out"
        else
            listed[$module]=""
            answer[$module]="$(printf '%s' "$out" | tr '\n\t' '  ' | sed 's/  */ /g')"
        fi
    fi
    if [ -z "${listed[$module]}" ] && (cd / && GOFLAGS=-mod=mod go list -m "$module@$tag") >/dev/null 2>&1; then
        # The proxy refuses some modules' version lists but serves exact versions
        # (external-snapshot-metadata v0.2.0): the tag exists.
        echo "ok $source: $image:$tag is a version of $module (served; the proxy refuses its version list)"
        checked=$((checked + 1))
    elif [ -z "${listed[$module]}" ]; then
        echo "UNCHECKED $source: $image:$tag: the module proxy refused $module (${answer[$module]})"
        unchecked=$((unchecked + 1))
    elif printf '%s\n' "${listed[$module]}" | tr ' ' '\n' | grep -qx -- "$tag"; then
        echo "ok $source: $image:$tag is a version of $module (newest listed: $(printf '%s' "${listed[$module]}" | tr ' ' '\n' | tail -1))"
        checked=$((checked + 1))
    else
        echo "FAIL $source: $image:$tag is not a version of $module; the proxy lists: $(printf '%s' "${listed[$module]#* }" | tr '\n' ' ')"
        bad=1
    fi
done <<<"$images"

# versions.env against the manifests: the e2e tier builds and tags exactly these.
agree() { # VAR_PREFIX IMAGE
    local module_var="${1}_MODULE" version_var="${1}_VERSION" source image tag
    while read -r source image tag; do
        [ "${image##*/}" = "$2" ] || continue
        if [ "$tag" != "${!version_var}" ] || [ "$(module_of "$image" "$tag")" != "${!module_var}" ]; then
            echo "FAIL $source: $image:$tag, but versions.env pins ${!module_var} ${!version_var}"
            bad=1
        fi
    done <<<"$images"
}
agree PROVISIONER csi-provisioner
agree RESIZER csi-resizer
agree SNAPSHOTTER csi-snapshotter
agree REGISTRAR csi-node-driver-registrar
agree LIVENESSPROBE livenessprobe
agree SNAPSHOT_METADATA csi-snapshot-metadata
[ "$bad" = 0 ] && echo "ok versions.env pins the tags of both deployments"

echo "$checked tags checked against the module proxy, $unchecked unchecked (the proxy refused their module), $([ "$bad" = 0 ] && echo no || echo SOME) missing or disagreeing"
[ "$bad" = 0 ] || exit 1
if [ "$unchecked" != 0 ] && [ "${CHECK_VERSIONS_STRICT:-0}" = 1 ]; then
    echo "CHECK_VERSIONS_STRICT=1: unchecked tags fail the check" >&2
    exit 1
fi
