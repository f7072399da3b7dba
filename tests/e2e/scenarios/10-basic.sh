# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# The first scenarios: filesystem and block volumes written by one pod and read by the next, the
# plugin pod restarted under them (the bug that motivated the tier), then unpublish and delete.
E2E_SCENARIOS+=(filesystem block plugin_restart unpublish_and_delete)

# The node plugin pod of our node (by node name: other nodes may run one too).
node_plugin_pod() {
    kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node \
        --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}'
}

# driver_metrics POD: the driver's /metrics (the DaemonSet's containerPort 9898), through the
# apiserver's pod proxy (the apiserver shares the network namespace of the pods' bridge).
driver_metrics() {
    kubectl get --raw "/api/v1/namespaces/loopcsi/pods/$1:9898/proxy/metrics"
}

# reconciled POD: the driver in POD has finished at least one reconciliation round. The driver
# counts a round's actions by kind when the round ends (Metrics::observe_reconcile, even when
# every count is zero), so its reconciler_actions series exist from the end of its first round
# on, and a new driver process starts without them.
reconciled() {
    # grep reads all of it (with -q, kubectl could die of SIGPIPE and pipefail fail the check).
    driver_metrics "$1" | grep '^loopcsi_reconciler_actions_total{' >/dev/null
}

# wait_reconciled POD WHAT: waits (the default interval is 60 s after the driver is ready; plus
# slack for a loaded machine) until the driver in POD has finished a reconciliation round.
wait_reconciled() {
    until_true 150 "a reconciliation round of $1" reconciled "$1" ||
        fail "$2: the driver in $1 finished no reconciliation round within 150 s: $(driver_metrics "$1" 2>&1 | grep -E '^loopcsi_(reconciler|volumes)' | tr '\n' ' ')"
}

scenario_filesystem() {
    write_then_read fs fs loopcsi-ext4 'cat > /data/token' 'cat /data/token'
}

scenario_block() {
    write_then_read blk block loopcsi-ext4 'dd of=/dev/xvda bs=512 count=1 conv=sync 2>/dev/null' \
        'dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1'
}

# The bug that motivated the tier: after the plugin pod restarts, the driver must still know
# every loop device attached before (they are matched by identity, not by the path the kernel
# renders in the new container's mount namespace).
scenario_plugin_restart() {
    local t=$SECONDS old new before after doubles
    old="$(node_plugin_pod)"
    before="$(loop_evidence)"
    [ -n "$before" ] || fail "restart: no loop device backs the pool's images before the restart"
    kubectl -n loopcsi delete pod "$old" --timeout=120s >/dev/null || fail "restart: the plugin pod $old did not go"
    until_true 300 "a new plugin pod Ready" plugin_ready_and_new "$old" ||
        fail "restart: no new plugin pod became Ready: $(kubectl -n loopcsi get pods -o wide)"
    new="$(node_plugin_pod)"
    # The registrar of the new pod registers again; wait until the kubelet lists the driver.
    until_true 120 "CSINode lists loopcsi.dev" csinode_registered ||
        fail "restart: the kubelet does not list loopcsi.dev after the restart"
    pass "restart: plugin pod $old deleted, $new Ready in $((SECONDS - t)) s"
    local ready_at=$SECONDS

    # The pods keep their data and can write.
    local got token2="after-$RANDOM"
    got="$(kubectl exec fs-app -- sh -c "cat /data/token && echo $token2 > /data/token2 && sync && cat /data/token2" | tr '\n' ' ')"
    case "$got" in fs-*" $token2 ") ;; *) fail "restart: fs-app read/write after the restart gave '$got'" ;; esac
    got="$(kubectl exec blk-app -- sh -c "echo $token2 | dd of=/dev/xvda bs=512 seek=8 count=1 conv=sync 2>/dev/null && sync && dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1 && dd if=/dev/xvda bs=512 skip=8 count=1 2>/dev/null | head -n1" | tr -d '\0' | tr '\n' ' ')"
    case "$got" in blk-*" $token2 ") ;; *) fail "restart: blk-app read/write after the restart gave '$got'" ;; esac
    pass "restart: fs-app and blk-app still read their data and wrote '$token2' ($got)"

    # The reconciler of the new driver must not attach a second loop device to a published image
    # (the bug of issue 13): look only once it has run a round, not before its first (60 s).
    local actions
    wait_reconciled "$new" restart
    actions="$(driver_metrics "$new" | grep -E '^loopcsi_(reconciler_actions_total|loop_devices_attached|volumes)' | tr '\n' ' ')"
    after="$(loop_evidence)"
    doubles="$(double_loops)"
    [ -z "$doubles" ] || fail "restart: after a reconciliation round of the new driver a backing file is attached to more than one loop device: $doubles (before: $before; after: $after; $actions)"
    [ "$before" = "$after" ] || fail "restart: the loop devices changed after a reconciliation round: before: $before; after: $after ($actions)"
    pass "restart: the new driver finished a reconciliation round ($((SECONDS - ready_at)) s after its pod was Ready; $actions); no loop device attached twice; the same devices before and after: $after"
}

scenario_unpublish_and_delete() {
    local t=$SECONDS pv_fs pv_blk
    pv_fs="$(kubectl get pvc fs-pvc -o jsonpath='{.spec.volumeName}')"
    pv_blk="$(kubectl get pvc blk-pvc -o jsonpath='{.spec.volumeName}')"
    # NodeUnpublishVolume and NodeUnstageVolume after the restart: no pod may stay Terminating.
    kubectl delete pod fs-app blk-app --timeout=120s >/dev/null ||
        fail "unpublish: an app pod is stuck deleting: $(kubectl get pods -o wide; tail -5 "$work/logs/kubelet.log")"
    pass "unpublish: fs-app and blk-app deleted in $((SECONDS - t)) s (no pod stuck Terminating)"
    t=$SECONDS
    kubectl delete pvc fs-pvc blk-pvc --timeout=60s >/dev/null || fail "delete: the claims did not go"
    kubectl wait --for=delete "pv/$pv_fs" "pv/$pv_blk" --timeout=120s >/dev/null 2>&1 ||
        fail "delete: a PersistentVolume stayed: $(kubectl get pv)"
    local images loops mounts
    images="$(find "$pool" -name '*.img' 2>/dev/null)"
    loops="$(our_loops)"
    # CSI publish targets (pods/<uid>/volumes/kubernetes.io~csi/..., pods/<uid>/volumeDevices/...)
    # and staging paths (plugins/kubernetes.io/csi/...); other pod mounts (service-account tokens
    # of the plugin pod) are not volumes.
    mounts="$(awk -v k="$kubelet_dir/" 'index($5, k) == 1 && $5 ~ /kubernetes.io[~\/]csi/ {print $5}' /proc/self/mountinfo)"
    [ -z "$images$loops$mounts" ] ||
        fail "delete: left behind: images [$images] loop devices [$loops] mounts [$mounts]"
    [ -z "$(double_loops)" ] || fail "delete: a backing file attached twice: $(double_loops)"
    pass "delete: both PVs gone in $((SECONDS - t)) s; no image in the pool, no loop device, no pod volume mount left"
}
