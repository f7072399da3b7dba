# shellcheck shell=bash disable=SC2154  # the variables below come from run.sh
# The e2e tier's scenarios, sourced by run.sh once the cluster runs loopcsi (it provides kubectl,
# until_true, pass, fail, log, our_loops, $pool, $kubelet_dir, $work, $node). Each step prints
# PASS with its evidence or FAILs the run.

# app_pod NAME PVC MODE SCRIPT: a busybox pod using PVC at /data (MODE=fs) or as the block device
# /dev/xvda (MODE=block), running SCRIPT. It stops at once on SIGTERM.
app_pod() {
    local name="$1" pvc="$2" mode="$3" script="$4" mount
    if [ "$mode" = block ]; then
        mount="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
    else
        mount="volumeMounts: [{name: v, mountPath: /data}]"
    fi
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: default}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 5
  containers:
    - name: app
      image: loopcsi.dev/e2e/busybox:1.35
      imagePullPolicy: Never
      command: [sh, -c, 'trap "exit 0" TERM; $script']
      $mount
  volumes: [{name: v, persistentVolumeClaim: {claimName: $pvc}}]
EOF
}

# pvc NAME CLASS MODE: a 64 MiB ReadWriteOnce claim (MODE is Filesystem or Block).
pvc() {
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: default}
spec:
  storageClassName: $2
  volumeMode: $3
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
EOF
}

has_log() { [ -n "$(kubectl logs "$1" 2>/dev/null)" ]; }

pod_phase() { kubectl get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null; }
phase_is() { [ "$(pod_phase "$1")" = "$2" ]; }
wait_phase() {
    until_true "${3:-180}" "pod $1 $2" phase_is "$1" "$2" ||
        fail "pod $1 is $(pod_phase "$1"), not $2: $(kubectl describe pod "$1" | tail -15)"
}

# Loop devices attached more than once to the same backing file (device and inode), as
# "back-maj:min back-ino count" lines; empty when every image has at most one.
double_loops() {
    losetup --json --list -O NAME,BACK-MAJ:MIN,BACK-INO | python3 -c '
import collections, json, sys
c = collections.Counter((d["back-maj:min"].strip(), d["back-ino"]) for d in json.load(sys.stdin).get("loopdevices", []))
[print(k[0], k[1], n) for k, n in c.items() if n > 1]'
}

loop_evidence() {
    local dev
    for dev in $(our_loops); do
        losetup --json --list -O NAME,BACK-MAJ:MIN,BACK-INO "$dev" | python3 -c '
import json, sys
d = json.load(sys.stdin)["loopdevices"][0]
print("%s(back %s ino %s)" % (d["name"], d["back-maj:min"].strip(), d["back-ino"]), end=" ")'
    done
}

plugin_ready_and_new() {
    local old="$1" name ready
    name="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o name | head -1)"
    [ "$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o name | wc -l)" = 1 ] || return 1
    [ "$name" != "pod/$old" ] || return 1
    ready="$(kubectl -n loopcsi get "$name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')"
    [ "$ready" = True ]
}

# write_then_read PREFIX MODE CLASS WRITE READ: a claim PREFIX-pvc; a pod PREFIX-writer runs WRITE
# (reading the token on its standard input) and exits; after it is deleted, a
# pod PREFIX-app prints what READ reads and keeps running; its output must be the token.
write_then_read() {
    local prefix="$1" mode="$2" class="$3" write="$4" read="$5" t=$SECONDS got
    local token="$prefix-$RANDOM-$RANDOM"
    pvc "$prefix-pvc" "$class" "$([ "$mode" = block ] && echo Block || echo Filesystem)"
    [ "$(kubectl get pvc "$prefix-pvc" -o jsonpath='{.status.phase}')" = Pending ] ||
        fail "$prefix: a WaitForFirstConsumer claim was bound before any pod used it"
    app_pod "$prefix-writer" "$prefix-pvc" "$mode" "echo $token | $write && sync"
    wait_phase "$prefix-writer" Succeeded
    kubectl delete pod "$prefix-writer" --timeout=120s >/dev/null || fail "$prefix: $prefix-writer stuck deleting"
    app_pod "$prefix-app" "$prefix-pvc" "$mode" "$read; while true; do sleep 1; done"
    wait_phase "$prefix-app" Running
    until_true 30 "$prefix-app log" has_log "$prefix-app" || true
    got="$(kubectl logs "$prefix-app" | tr -d '\0')"
    [ "$got" = "$token" ] || fail "$prefix: the new pod read '$got', not '$token'"
    pass "$prefix ($mode, $class, WaitForFirstConsumer): $prefix-writer wrote '$token', $prefix-app read '$got' after $prefix-writer was deleted; pv $(kubectl get pvc "$prefix-pvc" -o jsonpath='{.spec.volumeName}'); $((SECONDS - t)) s"
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
    old="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o jsonpath='{.items[0].metadata.name}')"
    before="$(loop_evidence)"
    [ -n "$before" ] || fail "restart: no loop device backs the pool's images before the restart"
    kubectl -n loopcsi delete pod "$old" --timeout=120s >/dev/null || fail "restart: the plugin pod $old did not go"
    until_true 300 "a new plugin pod Ready" plugin_ready_and_new "$old" ||
        fail "restart: no new plugin pod became Ready: $(kubectl -n loopcsi get pods -o wide)"
    new="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o jsonpath='{.items[0].metadata.name}')"
    # The registrar of the new pod registers again; wait until the kubelet lists the driver.
    until_true 120 "CSINode lists loopcsi.dev" csinode_registered ||
        fail "restart: the kubelet does not list loopcsi.dev after the restart"
    pass "restart: plugin pod $old deleted, $new Ready in $((SECONDS - t)) s"

    # The pods keep their data and can write.
    local got token2="after-$RANDOM"
    got="$(kubectl exec fs-app -- sh -c "cat /data/token && echo $token2 > /data/token2 && sync && cat /data/token2" | tr '\n' ' ')"
    case "$got" in fs-*" $token2 ") ;; *) fail "restart: fs-app read/write after the restart gave '$got'" ;; esac
    got="$(kubectl exec blk-app -- sh -c "echo $token2 | dd of=/dev/xvda bs=512 seek=8 count=1 conv=sync 2>/dev/null && sync && dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1 && dd if=/dev/xvda bs=512 skip=8 count=1 2>/dev/null | head -n1" | tr -d '\0' | tr '\n' ' ')"
    case "$got" in blk-*" $token2 ") ;; *) fail "restart: blk-app read/write after the restart gave '$got'" ;; esac
    pass "restart: fs-app and blk-app still read their data and wrote '$token2' ($got)"

    # The reconciler of the new driver must not attach a second loop device to a published image.
    after="$(loop_evidence)"
    doubles="$(double_loops)"
    [ -z "$doubles" ] || fail "restart: a backing file is attached to more than one loop device: $doubles (before: $before; after: $after)"
    [ "$before" = "$after" ] || fail "restart: the loop devices changed: before: $before; after: $after"
    pass "restart: no loop device attached twice; the same devices before and after: $after"
    # The driver's view after the restart: its metrics list the volumes it knows.
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

run_scenarios() {
    scenario_filesystem
    scenario_block
    scenario_plugin_restart
    scenario_unpublish_and_delete
}
