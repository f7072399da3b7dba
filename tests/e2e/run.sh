#!/usr/bin/env bash
# The Kubernetes end-to-end tier: loopcsi deployed as users deploy it, under a real kubelet.
#
#   sudo tests/e2e/run.sh            # from anywhere; needs root, loop devices, cgroups
#
# It builds (or takes from the cache, see build.sh) the pinned Kubernetes, etcd and CSI sidecars,
# builds the loopcsi release binary and the images (images.sh), starts a one-node cluster —
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, snapshot-controller, containerd
# and the kubelet, all inside one network namespace of its own (the kubelet and containerd share
# the host's mount namespace, as a real node's do) — applies deploy/kubernetes through an overlay
# that changes only image names, the kubelet directory and the pool directory, and runs the
# scenarios. Each scenario prints PASS or FAIL with its evidence; the script exits non-zero on the
# first failure. Whatever happens, the EXIT trap tears everything down (processes, containers,
# mounts, loop devices, the network namespace, the work directory) and checks nothing is left.
#
# Environment: E2E_ONLY=REGEX runs only the scenarios whose names match (the cluster and the
# deploy step always run); E2E_KEEP=1 keeps the logs (in the work directory) after a passing
# run too;
# E2E_LOOPCSI_BINARY=PATH puts that driver binary in the image instead of this tree's release
# build (to show a scenario fails on an older driver); XDG_CACHE_HOME moves the build cache.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi-e2e"
run_start=$SECONDS

log() { printf '[e2e %(%H:%M:%S)T +%4ds] %s\n' -1 "$((SECONDS - run_start))" "$*" >&2; }
pass() { printf '[e2e] PASS %s\n' "$*" >&2; }
fail() {
    printf '[e2e] FAIL %s\n' "$*" >&2
    exit 1
}

# until_true SECONDS WHAT COMMAND...: run COMMAND until it succeeds, at most SECONDS. The cluster
# has no event we could block on for most conditions, so this polls; it never waits a fixed time.
until_true() {
    local limit="$1" what="$2" deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "gave up after ${limit}s waiting for: $what"
            return 1
        fi
        sleep 1
    done
}

[ "$(id -u)" = 0 ] || fail "run as root (loop devices, mounts, network namespaces)"

# ---------------------------------------------------------------- what the tier installs
missing=""
for p in $DEBIAN_PACKAGES iptables; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing Debian packages:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
[ -e /dev/loop-control ] || modprobe loop

# ---------------------------------------------------------------- the work dir and teardown
work="$(mktemp -d /tmp/loopcsi-e2e.XXXXXX)"
# The containerd shims keep sockets and fifos under /run/containerd whatever containerd's own
# state dir is; the teardown removes that tree if the run created it (and only its empty dirs).
# Likewise containerd's CNI result cache (/var/lib/cni) and the kubelet's legacy log links
# (/var/log/containers, links into our pod log dir).
declare -A existed=()
# The kubelet's device-plugin socket is always /var/lib/kubelet/device-plugins/kubelet.sock,
# whatever its root dir: that tree is removed too if the run created it.
for d in /run/containerd /var/lib/cni /var/log/containers /var/lib/kubelet; do
    [ -e "$d" ] && existed[$d]=1
done
netns="loopcsi-e2e-${work##*.}"
kubelet_dir="$work/kubelet"
pool="$work/pool"
node="e2e-node"
declare -A pids=()
log "work dir $work, network namespace $netns"

in_ns() { nsenter --net="/run/netns/$netns" -- "$@"; }
# The apiserver listens on 127.0.0.1 of the namespace: kubectl runs there too.
kubectl() { in_ns "$k8s/kubectl" --kubeconfig "$work/pki/admin.kubeconfig" "$@"; }
ctr_k8s() { ctr --address "$work/containerd/containerd.sock" -n k8s.io "$@"; }
no_pods() { [ -z "$(kubectl get pods -n "$1" -o name 2>/dev/null)" ]; }
no_pvs() { [ -z "$(kubectl get pv -o name 2>/dev/null)" ]; }
task_stopped() { ! ctr_k8s tasks ls 2>/dev/null | grep -v STOPPED | grep -q "^$1 "; }
daemonset_ready() {
    [ "$(kubectl -n loopcsi get ds loopcsi-node -o jsonpath='{.status.numberReady}')" = 1 ]
}
csinode_registered() {
    kubectl get csinode "$node" -o jsonpath='{.spec.drivers[*].name}' | grep -qw loopcsi.dev
}

# start NAME COMMAND...: run COMMAND in the network namespace, appending to $work/logs/NAME.log
# (a restarted daemon keeps its earlier log).
start() {
    local name="$1"
    shift
    # nsenter execs COMMAND after entering the namespace, so $! is COMMAND's own pid.
    nsenter --net="/run/netns/$netns" -- "$@" >>"$work/logs/$name.log" 2>&1 &
    pids[$name]=$!
    log "started $name (pid ${pids[$name]})"
}

stop_pid() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# loops_with_backing IDS: loop devices whose backing file is one of IDS ("MAJ:MIN INODE" lines),
# by the identity the kernel records for it, never by the path it renders.
loops_with_backing() {
    [ -n "$1" ] || return 0
    losetup --json --list -O NAME,BACK-MAJ:MIN,BACK-INO 2>/dev/null | python3 -c '
import json, sys
ids = {tuple(l.split()) for l in sys.argv[1].splitlines()}
for d in json.load(sys.stdin).get("loopdevices", []):
    if (d["back-maj:min"].strip(), str(d["back-ino"])) in ids:
        print(d["name"])
' "$1"
}

# loops_backed_by DIR...: loop devices whose backing file is an image under one of the DIRs, by
# identity (device and inode of the backing file as the kernel records it), never by the path the
# kernel renders.
loops_backed_by() {
    local ids
    ids="$(find "$@" -type f -name '*.img' -printf '%D %i\n' 2>/dev/null | while read -r d i; do
        # st_dev in the kernel's encoding: major in bits 8-19, minor in bits 0-7 and 20-31.
        printf '%d:%d %s\n' "$(((d >> 8) & 0xfff))" "$(((d & 0xff) | ((d >> 12) & 0xfff00)))" "$i"
    done)"
    loops_with_backing "$ids"
}

# Loop devices backed by an image of any node's pool (node 1's, and the tmpfs pools of the nodes
# that nodes.sh adds).
our_loops() {
    local dirs=()
    [ -d "$pool" ] && dirs+=("$pool")
    [ -d "$work/nodes" ] && dirs+=("$work/nodes")
    [ "${#dirs[@]}" -gt 0 ] || return 0
    loops_backed_by "${dirs[@]}"
}

# Loop devices the kubelet attaches to hold our raw block volumes' devices open: backed by the
# device node of one of our_loops (matched by the node's device and inode). A kubelet that dies
# leaves them, and they keep our loop devices attached.
kubelet_block_loops() {
    local ids
    ids="$(our_loops | xargs -r stat -c '%Hd:%Ld %i')"
    loops_with_backing "$ids"
}

# sandbox_netns CTR...: the network namespace files of the pod sandboxes that the command CTR...
# (ctr against one containerd) knows.
sandbox_netns() {
    local id
    "$@" containers ls -q 2>/dev/null | while read -r id; do
        "$@" containers info "$id" 2>/dev/null |
            python3 -c 'import json,sys; [print(n["path"]) for n in json.load(sys.stdin)["Spec"]["linux"]["namespaces"] if n["type"]=="network" and n.get("path")]' 2>/dev/null
    done | sort -u
}
# remove_netns_files PATH...: the CNI network namespace files among PATHs, unmounted and removed
# (the CRI makes them; a killed sandbox leaves them).
remove_netns_files() {
    local ns
    for ns in "$@"; do
        case "$ns" in /var/run/netns/cni-* | /run/netns/cni-*)
            umount "$ns" 2>/dev/null
            rm -f "$ns"
            ;;
        esac
    done
}

# Mounts at or under our work dir, deepest first.
our_mounts() {
    awk -v w="$work" '$5 == w || index($5, w "/") == 1 {print $5}' /proc/self/mountinfo | sort -r
}

# Processes whose command line names STRING, other than this script and the grep that looked
# (gone by the time its output is read, and so skipped by the second look).
pids_naming() {
    local pid
    for pid in $(grep -lsF -- "$1" /proc/[0-9]*/cmdline | cut -d/ -f3); do
        [ "$pid" = "$$" ] && continue
        grep -qsF -- "$1" "/proc/$pid/cmdline" && echo "$pid"
    done
}

# shellcheck source=nodes.sh
. "$here/nodes.sh"

teardown() {
    local rc=$?
    set +e
    trap - EXIT INT TERM ERR
    log "teardown (exit status $rc)"
    if [ -n "${pids[kubelet]:-}" ] && kill -0 "${pids[kubelet]}" 2>/dev/null &&
        [ -S "$work/containerd/containerd.sock" ]; then
        # Let the kubelet remove the pods it runs (volumes unpublished, sandboxes' network
        # namespaces removed by the CRI), bounded; what is left is forced below.
        # The apps first (their volumes need the plugin to unpublish), then their claims (the
        # plugin deletes the volumes), then the plugin.
        kubectl delete pods --all -n default --wait=false >/dev/null 2>&1
        until_true 60 "app pods gone" no_pods default
        # Snapshots before claims and before the plugin: their snapshotter deletes their files.
        kubectl delete volumesnapshots --all -n default --wait=false >/dev/null 2>&1
        kubectl delete pvc --all -n default --wait=false >/dev/null 2>&1
        until_true 60 "volumes deleted" no_pvs
        kubectl delete namespace loopcsi --wait=false >/dev/null 2>&1
        until_true 60 "plugin pods gone" no_pods loopcsi
    fi
    # Nodes added by a scenario (nodes.sh), before node 1 whose network namespace they share.
    local extra
    for extra in "${extra_nodes[@]}"; do remove_node "$extra"; done
    local name
    for name in kubelet snapshot-controller kube-scheduler kube-controller-manager; do
        [ -n "${pids[$name]:-}" ] && stop_pid "${pids[$name]}"
    done
    if [ -S "$work/containerd/containerd.sock" ]; then
        local id
        # The sandboxes' network namespaces, removed after the containers are gone.
        local netnses
        netnses="$(sandbox_netns ctr_k8s)"
        for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
            ctr_k8s tasks kill -s SIGKILL "$id" >/dev/null 2>&1
        done
        for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
            until_true 30 "task $id stopped" task_stopped "$id"
            ctr_k8s tasks delete -f "$id" >/dev/null 2>&1
        done
        for id in $(ctr_k8s containers ls -q 2>/dev/null); do
            ctr_k8s containers rm "$id" >/dev/null 2>&1
        done
        local ns
        remove_netns_files $netnses
    fi
    [ -n "${pids[containerd]:-}" ] && stop_pid "${pids[containerd]}"
    # Shims (and anything else) started for our containerd: found by its socket path in their
    # command line, ended by pid.
    local pid
    for pid in $(pids_naming "$work/containerd/containerd.sock"); do kill -KILL "$pid"; done
    for name in kube-apiserver etcd; do
        [ -n "${pids[$name]:-}" ] && stop_pid "${pids[$name]}"
    done
    local m
    for m in $(our_mounts); do umount "$m" 2>/dev/null || umount -l "$m"; done
    local dev
    for dev in $(kubelet_block_loops) $(our_loops); do losetup -d "$dev"; done
    [ -e "/run/netns/$netns" ] && ip netns delete "$netns"
    [ -d /var/log/containers ] && find /var/log/containers -lname "$work/*" -delete
    [ -z "${existed[/var/lib/kubelet]:-}" ] && rm -f /var/lib/kubelet/device-plugins/kubelet.sock
    for d in /run/containerd /var/lib/cni /var/log/containers /var/lib/kubelet; do
        [ -z "${existed[$d]:-}" ] && [ -d "$d" ] && find "$d" -depth -type d -empty -delete
    done
    # The leak check: nothing of ours may be left.
    local leaks=""
    [ -n "$(our_mounts)" ] && leaks="$leaks mounts:$(our_mounts | tr '\n' ' ')"
    [ -n "$(our_loops)" ] && leaks="$leaks loop-devices:$(our_loops | tr '\n' ' ')"
    [ -e "/run/netns/$netns" ] && leaks="$leaks netns:$netns"
    for name in "${!pids[@]}"; do
        kill -0 "${pids[$name]}" 2>/dev/null && leaks="$leaks process:$name"
    done
    for pid in $(pids_naming "$work/"); do leaks="$leaks pid:$pid($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null))"; done
    if [ -n "$leaks" ]; then
        log "LEAK after teardown:$leaks (work dir kept: $work)"
        rc=1
    elif [ "${E2E_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
        log "logs kept in $work/logs"
        find "$work" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
    else
        rm -rf "$work"
    fi
    [ -z "$leaks" ] && log "teardown done, nothing left"
    log "total $((SECONDS - run_start)) s"
    exit "$rc"
}
trap teardown EXIT
# A step that fails without calling `fail` (set -e) still says which command it was; code that
# runs with set +e on purpose (the teardown, remove_node) is not reported.
set -E
trap 'e2e_err=$?; [[ $- != *e* ]] || log "failed (status $e2e_err) at ${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT TERM
mkdir -p "$work/logs" "$work/pki" "$pool" "$kubelet_dir"

# ---------------------------------------------------------------- binaries and images
t=$SECONDS
"$here/build.sh" all
k8s="$cache/kubernetes-$K8S_VERSION"
log "pinned binaries ready in $((SECONDS - t)) s"

t=$SECONDS
binary="${E2E_LOOPCSI_BINARY:-}"
if [ -z "$binary" ]; then
    (cd "$repo" && cargo build --release --locked --bin loopcsi)
    binary="$repo/target/release/loopcsi"
fi
log "loopcsi binary $binary ready in $((SECONDS - t)) s"

t=$SECONDS
standins="$work/bin/standins-e2e"
(cd "$here/standins" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$standins/" ./...)
E2E_DEBS="$cache/debs-$(. /etc/os-release && echo "$VERSION_CODENAME")" \
    "$here/images.sh" "$work/images" "$binary" "$standins" \
    "$cache/csi-provisioner-$PROVISIONER_VERSION" "$cache/csi-provisioner-$OLDEST_PROVISIONER_VERSION" \
    "$cache/csi-resizer-$RESIZER_VERSION" \
    "$cache/csi-snapshotter-$SNAPSHOTTER_VERSION" "$cache/csi-snapshot-metadata-$SNAPSHOT_METADATA_VERSION"
log "images built in $((SECONDS - t)) s"

# ---------------------------------------------------------------- certificates
# One CA; the apiserver's serving certificate; one client certificate in system:masters that
# every component and kubectl use (a one-node test cluster: the point is loopcsi, not RBAC of
# the control plane; loopcsi's own pods use their service accounts and the manifests' RBAC).
gw=10.244.0.1
(
    cd "$work/pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 \
        -subj /CN=loopcsi-e2e-ca 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' \
        "$gw" >apiserver.ext
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
        -subj /CN=kube-apiserver 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out apiserver.crt -days 2 -extfile apiserver.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
        -subj "/O=system:masters/CN=loopcsi-e2e-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out admin.crt -days 2 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    cat >admin.kubeconfig <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$work/pki/ca.crt"}
users:
  - name: admin
    user: {client-certificate: "$work/pki/admin.crt", client-key: "$work/pki/admin.key"}
contexts:
  - name: e2e
    context: {cluster: e2e, user: admin}
current-context: e2e
EOF
)

# ---------------------------------------------------------------- the network namespace
# Every listener of the cluster lives here; nothing in it routes anywhere else. The bridge is
# the pods' network (made by the CNI bridge plugin in pod namespaces under it); the apiserver
# advertises the bridge's address, and one DNAT rule stands in for kube-proxy so that pods reach
# the `kubernetes` Service (10.96.0.1:443), which the sidecars' in-cluster clients dial.
ip netns add "$netns"
in_ns ip link set lo up
in_ns ip link add e2e0 type bridge
in_ns ip addr add "$gw/24" dev e2e0
in_ns ip link set e2e0 up
in_ns iptables -t nat -A PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$gw:6443"

# ---------------------------------------------------------------- control plane
t=$SECONDS
start etcd "$cache/etcd-$ETCD_VERSION/etcd" --data-dir "$work/etcd" --name e2e \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e2e=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
start kube-apiserver "$k8s/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
    --bind-address 0.0.0.0 --secure-port 6443 --advertise-address "$gw" \
    --service-cluster-ip-range 10.96.0.0/24 \
    --tls-cert-file "$work/pki/apiserver.crt" --tls-private-key-file "$work/pki/apiserver.key" \
    --client-ca-file "$work/pki/ca.crt" \
    --kubelet-client-certificate "$work/pki/admin.crt" --kubelet-client-key "$work/pki/admin.key" \
    --service-account-key-file "$work/pki/sa.pub" --service-account-signing-key-file "$work/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --kubelet-preferred-address-types InternalIP
until_true 120 "apiserver /readyz" kubectl get --raw /readyz || fail "the apiserver did not become ready"
start kube-controller-manager "$k8s/kube-controller-manager" \
    --kubeconfig "$work/pki/admin.kubeconfig" --bind-address 127.0.0.1 --leader-elect=false \
    --service-account-private-key-file "$work/pki/sa.key" --root-ca-file "$work/pki/ca.crt" \
    --use-service-account-credentials=true --controllers '*'
start kube-scheduler "$k8s/kube-scheduler" --kubeconfig "$work/pki/admin.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false
crds="$(go mod download -json "$SNAPSHOTTER_CLIENT_MODULE@$SNAPSHOTTER_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/config/crd"
# The snapshot and group snapshot CRDs (the base has a class of each), and the
# SnapshotMetadataService CRD that changed-block tracking needs (scenarios/71-cbt.sh).
sms_crds="$(go mod download -json "$SNAPSHOT_METADATA_CLIENT_MODULE@$SNAPSHOT_METADATA_CLIENT_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/config/crd"
for f in "$crds"/snapshot.storage.k8s.io_*.yaml "$crds"/groupsnapshot.storage.k8s.io_*.yaml \
    "$sms_crds"/cbt.storage.k8s.io_*.yaml; do
    kubectl apply -f "$f" >/dev/null
done
start snapshot-controller "$cache/snapshot-controller-$SNAPSHOTTER_VERSION/snapshot-controller" \
    --kubeconfig "$work/pki/admin.kubeconfig" --leader-election=false \
    --enable-distributed-snapshotting
log "control plane up in $((SECONDS - t)) s"

# ---------------------------------------------------------------- the node
t=$SECONDS
mkdir -p "$work/containerd" "$work/cni/net.d"
cat >"$work/cni/net.d/10-e2e.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "e2e", "plugins": [
  {"type": "bridge", "bridge": "e2e0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$work/cni/ipam",
            "ranges": [[{"subnet": "10.244.0.0/24", "gateway": "$gw"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
cat >"$work/containerd/config.toml" <<EOF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
[grpc]
  address = "$work/containerd/containerd.sock"
[ttrpc]
  address = "$work/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$work/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "loopcsi.dev/e2e/pause:e2e"
  # The machine lacks CAP_SYS_RESOURCE: containerd may only raise a container's oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$work/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$work/cni/net.d"
EOF
# The node's two daemons, as functions: the reboot scenario stops them and starts them again.
start_containerd() {
    start containerd containerd --config "$work/containerd/config.toml"
    until_true 60 "containerd socket" ctr --address "$work/containerd/containerd.sock" version ||
        fail "containerd did not start"
}
start_containerd
for image in "$work"/images/*.tar; do
    ctr --address "$work/containerd/containerd.sock" -n k8s.io images import "$image" >/dev/null
done
# The archives stay: nodes that a scenario adds import them too.
log "images imported: $(ctr --address "$work/containerd/containerd.sock" -n k8s.io images ls -q | tr '\n' ' ')"

cat >"$work/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The machine has cgroup v1 (kubelet >= 1.35 refuses it unless told).
cgroupDriver: cgroupfs
failCgroupV1: false
# No kubepods hierarchy: the test creates no cgroups it would have to remove.
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix://$work/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$work/pki/ca.crt"}
authorization: {mode: Webhook}
readOnlyPort: 0
port: 10250
healthzPort: 10248
failSwapOn: false
# The shared disk is fuller than the defaults allow: no eviction and no image garbage
# collection may interfere with the test (its images are imported, never pulled).
evictionHard: {memory.available: "100Mi", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDomain: cluster.local
podLogsDir: $work/pod-logs
EOF
start_kubelet() {
    start kubelet "$k8s/kubelet" --config "$work/kubelet.yaml" --root-dir "$kubelet_dir" \
        --kubeconfig "$work/pki/admin.kubeconfig" --hostname-override "$node" --node-ip "$gw" -v 2 \
        --cert-dir "$kubelet_dir/pki"
    until_true 180 "node Ready" kubectl wait --for=condition=Ready "node/$node" --timeout=5s ||
        fail "the node did not become Ready (see $work/logs/kubelet.log)"
}
start_kubelet
log "node Ready in $((SECONDS - t)) s"
pass "cluster: $(kubectl get node "$node" -o jsonpath='{.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion}')"

# ---------------------------------------------------------------- loopcsi, as users deploy it
t=$SECONDS
mkdir -p "$work/overlay"
# kustomize takes bases only by relative path.
deploy="$(realpath --relative-to="$work/overlay" "$repo/deploy/kubernetes")"
cat >"$work/overlay/kustomization.yaml" <<EOF
# The users' way (deploy/kubernetes/overlays/example), with only the image names, the kubelet
# directory and the pool directory changed (the pool lives in the test's work dir so that the
# teardown can prove nothing is left).
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $deploy/base
  - kubelet-dir.yaml
components:
  - $deploy/components/kubelet-dir
images:
  - {name: loopcsi, newName: loopcsi.dev/loopcsi, newTag: e2e}
  - {name: registry.k8s.io/sig-storage/csi-provisioner, newName: loopcsi.dev/e2e/csi-provisioner, newTag: $PROVISIONER_VERSION}
  - {name: registry.k8s.io/sig-storage/csi-resizer, newName: loopcsi.dev/e2e/csi-resizer, newTag: $RESIZER_VERSION}
  - {name: registry.k8s.io/sig-storage/csi-snapshotter, newName: loopcsi.dev/e2e/csi-snapshotter, newTag: $SNAPSHOTTER_VERSION}
  - {name: registry.k8s.io/sig-storage/csi-node-driver-registrar, newName: loopcsi.dev/e2e/node-driver-registrar, newTag: e2e}
  - {name: registry.k8s.io/sig-storage/livenessprobe, newName: loopcsi.dev/e2e/livenessprobe, newTag: e2e}
patches:
  - target: {kind: DaemonSet, name: loopcsi-node}
    patch: |-
      - op: replace
        path: /spec/template/spec/volumes/4/hostPath/path
        value: $pool
EOF
cat >"$work/overlay/kubelet-dir.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: loopcsi-kubelet-dir
  annotations:
    config.kubernetes.io/local-config: "true"
data:
  path: $kubelet_dir
EOF
kubectl kustomize "$work/overlay" >"$work/logs/loopcsi.yaml"
python3 - "$work/logs/loopcsi.yaml" "$pool" <<'EOF' || fail "the overlay's pool patch missed"
import sys
text = open(sys.argv[1]).read()
assert f"path: {sys.argv[2]}\n" in text and "name: pool-dir" in text
EOF
kubectl apply -k "$work/overlay" >/dev/null
until_true 300 "loopcsi DaemonSet ready" daemonset_ready ||
    fail "the loopcsi DaemonSet did not become ready: $(kubectl -n loopcsi get pods -o wide 2>&1)"
until_true 120 "CSINode lists loopcsi.dev" csinode_registered ||
    fail "the kubelet never registered loopcsi.dev"
plugin_pod="$(kubectl -n loopcsi get pods -o jsonpath='{.items[0].metadata.name}')"
pass "deploy: kubectl apply -k; $plugin_pod $(kubectl -n loopcsi get pod "$plugin_pod" -o jsonpath='{range .status.containerStatuses[*]}{.name}={.ready} {end}'); CSINode registered; $((SECONDS - t)) s"

# ---------------------------------------------------------------- scenarios
# Each file in scenarios/ appends the names of its scenarios to E2E_SCENARIOS and defines
# scenario_<name>; files run in the order of their names, scenarios in the order listed. A
# scenario leaves the cluster as it found it (its pods and claims deleted) unless the next one in
# its file says it takes them over. E2E_ONLY=REGEX runs only the scenarios whose names match.
. "$here/helpers.sh"
E2E_SCENARIOS=()
for f in "$here"/scenarios/*.sh; do
    # shellcheck source=/dev/null
    . "$f"
done
for s in "${E2E_SCENARIOS[@]}"; do
    if [ -n "${E2E_ONLY:-}" ] && ! [[ "$s" =~ $E2E_ONLY ]]; then
        log "scenario $s skipped (E2E_ONLY=$E2E_ONLY)"
        continue
    fi
    log "scenario $s"
    t=$SECONDS
    "scenario_$s"
    log "scenario $s passed in $((SECONDS - t)) s"
done
log "all scenarios passed; run time $((SECONDS - run_start)) s"
