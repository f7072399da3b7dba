# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# More nodes for the e2e cluster, sourced by run.sh. Node 1 ($node) is the kubelet and containerd
# that run.sh starts in the host's mount namespace. Each further node is another kubelet with its
# own node name, root dir, containerd, ports and loopcsi pool, as on a separate machine:
#
# - It runs in a mount namespace of its own, in which the kubelet directory and the pool directory
#   (the same paths as node 1's, because one DaemonSet serves every node and its hostPaths are the
#   same everywhere) are this node's own directories. A real node has its own /var/lib/kubelet
#   and /var/lib/loopcsi; so does this one, and nothing either node mounts is seen by the other.
# - Its pool is a tmpfs of a given size, so that its capacity differs from node 1's (whose pool is
#   on the disk) and can be filled on purpose. The pool is a directory inside that tmpfs, which
#   leaves room beside the pool for a filler file that is not the driver's.
# - It shares node 1's network namespace and pod network (bridge and IP allocation), on ports of
#   its own (the kubelet's 10250+10*i, healthz 10248+10*i): the test is about storage, and one
#   network namespace keeps the apiserver, both kubelets and every pod reachable without routes.
#
# add_node NAME INDEX POOL_SIZE starts it and waits until it is Ready; remove_node NAME stops it
# and removes everything it made (also called by the teardown for any node still up).

declare -a extra_nodes=()

node_dir() { echo "$work/nodes/$1"; }
node_pool_fs() { echo "$work/nodes/$1/poolfs"; }
# in_node NAME COMMAND...: COMMAND in the node's mount namespace and the cluster's network one.
in_node() {
    local name="$1"
    shift
    nsenter --mount="$work/mntns/$name" --net="/run/netns/$netns" -- "$@"
}
ctr_node() {
    local name="$1"
    shift
    ctr --address "$(node_dir "$name")/containerd/containerd.sock" -n k8s.io "$@"
}
node_task_stopped() { ! ctr_node "$1" tasks ls 2>/dev/null | grep -v STOPPED | grep -q "^$2 "; }
node_ready() {
    [ "$(kubectl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# start_in_node NODE NAME COMMAND...: like run.sh's start, inside the node's namespaces.
start_in_node() {
    local node_name="$1" name="$2"
    shift 2
    nsenter --mount="$work/mntns/$node_name" --net="/run/netns/$netns" -- "$@" \
        >>"$work/logs/$name.log" 2>&1 &
    pids[$name]=$!
    log "started $name (pid ${pids[$name]})"
}

add_node() {
    local name="$1" index="$2" size="$3" d
    d="$(node_dir "$name")"
    extra_nodes+=("$name")
    mkdir -p "$d/kubelet" "$d/poolfs" "$d/containerd" "$d/pod-logs" "$work/mntns"
    mount -t tmpfs -o "size=$size,mode=0755" "loopcsi-e2e-$name-pool" "$d/poolfs"
    mkdir -p "$d/poolfs/pool"
    # A mount namespace is kept alive by binding its nsfs file, which must not sit on a shared
    # mount: the directory is bound onto itself and made private first.
    if ! mountpoint -q "$work/mntns"; then
        mount --bind "$work/mntns" "$work/mntns"
        mount --make-private "$work/mntns"
    fi
    touch "$work/mntns/$name"
    # Private: nothing node 1 mounts later shows up in this node, as on another machine.
    unshare --mount="$work/mntns/$name" --propagation private true
    # The node's own kubelet and pool directories at the paths every node uses. The copy of node
    # 1's kubelet-dir mounts goes first, and the new kubelet dir is shared from the start, for the
    # plugin's Bidirectional mounts (containerd judges the lowest mount at a path, so a private
    # one under a shared one fails the plugin). And its own device-plugin directory: the kubelet
    # always serves /var/lib/kubelet/device-plugins/kubelet.sock, whatever its root dir, and two
    # kubelets must not take each other's socket.
    nsenter --mount="$work/mntns/$name" -- sh -ec '
        if mountpoint -q "$2"; then umount -R "$2"; fi
        mount --bind "$1" "$2"
        mount --make-rshared "$2"
        mount --bind "$3" "$4"
        mkdir -p /var/lib/kubelet/device-plugins
        mount -t tmpfs -o size=1m,mode=0755 loopcsi-e2e-device-plugins /var/lib/kubelet/device-plugins
    ' sh "$d/kubelet" "$kubelet_dir" "$d/poolfs/pool" "$pool"

    # containerd: node 1's configuration with this node's directories.
    sed "s|$work/containerd|$d/containerd|g" "$work/containerd/config.toml" >"$d/containerd/config.toml"
    start_in_node "$name" "containerd-$name" containerd --config "$d/containerd/config.toml"
    until_true 60 "containerd of $name" ctr_node "$name" version || fail "containerd of $name did not start"
    local image
    for image in "$work"/images/*.tar; do
        ctr_node "$name" images import "$image" >/dev/null
    done

    # The kubelet: node 1's configuration with this node's runtime, ports and log directory.
    sed -e "s|$work/containerd/containerd.sock|$d/containerd/containerd.sock|" \
        -e "s|^port: 10250\$|port: $((10250 + 10 * (index - 1)))|" \
        -e "s|^healthzPort: 10248\$|healthzPort: $((10248 + 10 * (index - 1)))|" \
        -e "s|^podLogsDir: .*|podLogsDir: $d/pod-logs|" \
        "$work/kubelet.yaml" >"$d/kubelet.yaml"
    grep -q "^port: $((10250 + 10 * (index - 1)))\$" "$d/kubelet.yaml" ||
        fail "add_node $name: the kubelet configuration has no port line to change"
    start_in_node "$name" "kubelet-$name" "$k8s/kubelet" --config "$d/kubelet.yaml" \
        --root-dir "$kubelet_dir" --kubeconfig "$work/pki/admin.kubeconfig" \
        --hostname-override "$name" --node-ip "$gw" -v 2 --cert-dir "$kubelet_dir/pki"
    until_true 180 "node $name Ready" node_ready "$name" ||
        fail "node $name did not become Ready (see $work/logs/kubelet-$name.log)"
}

# remove_node NAME: the node's kubelet, containers and containerd stopped, its namespace and pool
# released, its loop devices (found by identity) detached, its Node object and pods deleted.
remove_node() {
    # Like the teardown, it goes on past what fails (a task that already ended cannot be killed);
    # the leak check judges the result. `local -` restores set -e when the function returns.
    local -
    set +e
    local name="$1" d id pid
    d="$(node_dir "$name")"
    [ -n "${pids[kubelet-$name]:-}" ] && stop_pid "${pids[kubelet-$name]}"
    local netnses=""
    if [ -S "$d/containerd/containerd.sock" ]; then
        # The sandboxes' network namespace files: their mounts live in the node's mount
        # namespace and go with it, but the files are in the host's /run and stay.
        netnses="$(sandbox_netns ctr_node "$name")"
        for id in $(ctr_node "$name" tasks ls -q 2>/dev/null); do
            ctr_node "$name" tasks kill -s SIGKILL "$id" >/dev/null 2>&1
        done
        for id in $(ctr_node "$name" tasks ls -q 2>/dev/null); do
            until_true 30 "task $id of $name stopped" node_task_stopped "$name" "$id"
            ctr_node "$name" tasks delete -f "$id" >/dev/null 2>&1
        done
        for id in $(ctr_node "$name" containers ls -q 2>/dev/null); do
            ctr_node "$name" containers rm "$id" >/dev/null 2>&1
        done
    fi
    [ -n "${pids[containerd-$name]:-}" ] && stop_pid "${pids[containerd-$name]}"
    for pid in $(pids_naming "$d/containerd/containerd.sock"); do kill -KILL "$pid"; done
    # With no process left in it, the namespace ends with its last reference, and with it every
    # mount the node made (volume mounts, pod network namespaces, its device-plugin tmpfs).
    if [ -e "$work/mntns/$name" ]; then
        umount "$work/mntns/$name" 2>/dev/null
        rm -f "$work/mntns/$name"
    fi
    # shellcheck disable=SC2086  # one path per word
    remove_netns_files $netnses
    local dev
    for dev in $(loops_backed_by "$(node_pool_fs "$name")"); do losetup -d "$dev"; done
    mountpoint -q "$(node_pool_fs "$name")" && umount "$(node_pool_fs "$name")"
    kubectl delete node "$name" --wait=false >/dev/null 2>&1
    local pod
    for pod in $(kubectl get pods -A --field-selector "spec.nodeName=$name" \
        -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}' 2>/dev/null); do
        kubectl delete pod -n "${pod%%/*}" "${pod#*/}" --force --grace-period=0 >/dev/null 2>&1
    done
    unset "pids[kubelet-$name]" "pids[containerd-$name]"
    local kept=()
    for id in "${extra_nodes[@]}"; do [ "$id" = "$name" ] || kept+=("$id"); done
    extra_nodes=("${kept[@]}")
    log "node $name removed"
}
