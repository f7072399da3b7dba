#!/usr/bin/env bash
# Builds (or finds in the cache) every Go binary the e2e tier runs, from the pinned module
# versions in versions.env, with the ordinary go command through the module proxy.
#
#   tests/e2e/build.sh            # prints the cache directory of each component
#
# Binaries are cached per component and version under
# ${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi-e2e/<component>-<version>/; a directory counts only once
# its .complete stamp exists, so an interrupted build is redone, never half used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi-e2e"
mkdir -p "$cache"
# One build at a time per cache: concurrent runs wait for the first instead of building into the
# same directories.
exec 9>"$cache/.build.lock"
flock 9
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -trimpath"
export CGO_ENABLED=0

log() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# build_in DIR NAME: run the remaining arguments to fill DIR, timed, unless DIR is complete.
build_in() {
    local dir="$1" name="$2"
    shift 2
    if [ -e "$dir/.complete" ]; then
        log "$name: cached in $dir"
        return 0
    fi
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp"
    local start=$SECONDS
    log "$name: building"
    "$@" "$dir.tmp"
    echo "$((SECONDS - start))" >"$dir.tmp/.build-seconds"
    touch "$dir.tmp/.complete"
    mv "$dir.tmp" "$dir"
    log "$name: built in $((SECONDS - start)) s"
}

# A module that requires k8s.io/kubernetes and points its staging modules (required there as
# v0.0.0 with replace directives, which `go install mod@version` refuses) at their published
# versions.
build_kubernetes() {
    local out="$1" src="$1/src"
    mkdir -p "$src"
    {
        echo "module loopcsi.dev/e2e/kubernetes"
        echo "go 1.26"
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo "replace ("
        local m
        for m in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go \
            cloud-provider cluster-bootstrap code-generator component-base component-helpers \
            controller-manager cri-api cri-client cri-streaming csi-translation-lib \
            dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator \
            kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics \
            mount-utils pod-security-admission sample-apiserver sample-cli-plugin \
            sample-controller streaming; do
            echo "  k8s.io/$m => k8s.io/$m $K8S_STAGING_VERSION"
        done
        echo ")"
    } >"$src/go.mod"
    local minor="${K8S_VERSION#v1.}"
    minor="${minor%%.*}"
    local v=k8s.io/component-base/version
    local ldflags="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor"
    ldflags="$ldflags -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
    ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    (
        cd "$src"
        go mod download k8s.io/kubernetes
        go build -mod=mod -ldflags "$ldflags" -o "$out/" \
            k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
            k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
            k8s.io/kubernetes/cmd/kubectl
    )
    rm -rf "$src"
}

# etcd's published server module has the etcdmain package; its main package lives in the
# repository's root module, which has replace directives, so a two-line main calls etcdmain.
build_etcd() {
    local out="$1" src="$1/src"
    mkdir -p "$src"
    printf 'module loopcsi.dev/e2e/etcd\ngo 1.26\nrequire go.etcd.io/etcd/server/v3 %s\n' \
        "$ETCD_VERSION" >"$src/go.mod"
    cat >"$src/main.go" <<'GO'
// etcd: the etcd server, as the etcd repository's own main runs it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (cd "$src" && go build -mod=mod -ldflags "-s -w" -o "$out/etcd" .)
    rm -rf "$src"
}

# go_build MODULE VERSION PACKAGE DIR: build PACKAGE of MODULE@VERSION into DIR. The sidecars'
# go.mod files carry replace directives (pinning k8s.io staging modules), which `go install
# pkg@version` refuses, so a wrapper module requires MODULE and repeats its replace directives; a
# replace by a local directory (./client) becomes the published module of the same version, or of
# LOCAL_VERSION when set (external-snapshot-metadata v0.2.0's ./client was published as v0.1.0
# only). More than one PACKAGE may be given; the last argument is DIR.
go_build() {
    local module="$1" version="$2" out="${*: -1}" src gomod
    local pkgs=("${@:3:$#-3}")
    src="$out/src"
    mkdir -p "$src"
    gomod="$(go mod download -json "$module@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
    {
        echo "module loopcsi.dev/e2e/sidecar"
        echo "go 1.26"
        echo "require $module $version"
        python3 - "$gomod" "${LOCAL_VERSION:-$version}" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
lines = re.findall(r"^replace\s+(\S+)\s+=>\s+(\S+)(?:\s+(\S+))?\s*$", text, re.M)
block = re.search(r"^replace \((.*?)^\)", text, re.M | re.S)
if block:
    lines += re.findall(r"^\s*(\S+)\s+=>\s+(\S+)(?:\s+(\S+))?\s*$", block.group(1), re.M)
for old, new, ver in lines:
    if new.startswith("."):
        new, ver = old, sys.argv[2]
    print(f"replace {old} => {new} {ver}".rstrip())
PY
    } >"$src/go.mod"
    (cd "$src" && go build -mod=mod -ldflags "-s -w" -o "$out/" "${pkgs[@]}")
    rm -rf "$src"
}

# helm: its main package with the version stamped as helm's Makefile does (helm version, and the
# user agent, report it). Helm's go.mod has no replace directives: one require is enough.
build_helm() {
    local out="$1" src="$1/src"
    mkdir -p "$src"
    printf 'module loopcsi.dev/e2e/helm\ngo 1.26\nrequire %s %s\n' "$HELM_MODULE" "$HELM_VERSION" >"$src/go.mod"
    (cd "$src" && go build -mod=mod -o "$out/" \
        -ldflags "-s -w -X $HELM_MODULE/internal/version.version=$HELM_VERSION -X $HELM_MODULE/internal/version.metadata=" \
        "$HELM_MODULE/cmd/helm")
    rm -rf "$src"
}

what="${1:-all}"
case "$what" in
kubernetes | all)
    build_in "$cache/kubernetes-$K8S_VERSION" "kubernetes $K8S_VERSION" build_kubernetes ;;&
etcd | all)
    build_in "$cache/etcd-$ETCD_VERSION" "etcd $ETCD_VERSION" build_etcd ;;&
sidecars | all)
    build_in "$cache/csi-provisioner-$PROVISIONER_VERSION" "csi-provisioner $PROVISIONER_VERSION" \
        go_build "$PROVISIONER_MODULE" "$PROVISIONER_VERSION" "$PROVISIONER_MODULE/cmd/csi-provisioner"
    build_in "$cache/csi-provisioner-$OLDEST_PROVISIONER_VERSION" "csi-provisioner $OLDEST_PROVISIONER_VERSION" \
        go_build "$OLDEST_PROVISIONER_MODULE" "$OLDEST_PROVISIONER_VERSION" "$OLDEST_PROVISIONER_MODULE/cmd/csi-provisioner"
    build_in "$cache/csi-resizer-$RESIZER_VERSION" "csi-resizer $RESIZER_VERSION" \
        go_build "$RESIZER_MODULE" "$RESIZER_VERSION" "$RESIZER_MODULE/cmd/csi-resizer"
    build_in "$cache/csi-snapshotter-$SNAPSHOTTER_VERSION" "csi-snapshotter $SNAPSHOTTER_VERSION" \
        go_build "$SNAPSHOTTER_MODULE" "$SNAPSHOTTER_VERSION" "$SNAPSHOTTER_MODULE/cmd/csi-snapshotter"
    build_in "$cache/snapshot-controller-$SNAPSHOTTER_VERSION" "snapshot-controller $SNAPSHOTTER_VERSION" \
        go_build "$SNAPSHOTTER_MODULE" "$SNAPSHOTTER_VERSION" "$SNAPSHOTTER_MODULE/cmd/snapshot-controller"
    # The sidecar goes into an image (images.sh: one image per binary of the directory), so its
    # directory holds nothing else; the example client runs on the node, beside kubectl.
    LOCAL_VERSION="$SNAPSHOT_METADATA_CLIENT_VERSION" build_in \
        "$cache/csi-snapshot-metadata-$SNAPSHOT_METADATA_VERSION" "csi-snapshot-metadata $SNAPSHOT_METADATA_VERSION" \
        go_build "$SNAPSHOT_METADATA_MODULE" "$SNAPSHOT_METADATA_VERSION" "$SNAPSHOT_METADATA_MODULE/cmd/csi-snapshot-metadata"
    LOCAL_VERSION="$SNAPSHOT_METADATA_CLIENT_VERSION" build_in \
        "$cache/snapshot-metadata-lister-$SNAPSHOT_METADATA_VERSION" "snapshot-metadata-lister $SNAPSHOT_METADATA_VERSION" \
        go_build "$SNAPSHOT_METADATA_MODULE" "$SNAPSHOT_METADATA_VERSION" "$SNAPSHOT_METADATA_MODULE/examples/snapshot-metadata-lister"
    ;;&
helm | all)
    build_in "$cache/helm-$HELM_VERSION" "helm $HELM_VERSION" build_helm ;;&
crds | all)
    # The snapshot and group snapshot CRDs ship in the snapshotter's client module (config/crd),
    # the SnapshotMetadataService CRD in external-snapshot-metadata's (client/config/crd).
    go mod download -json "$SNAPSHOTTER_CLIENT_MODULE@$SNAPSHOTTER_VERSION" >/dev/null
    go mod download -json "$SNAPSHOT_METADATA_CLIENT_MODULE@$SNAPSHOT_METADATA_CLIENT_VERSION" >/dev/null
    ;;
esac
