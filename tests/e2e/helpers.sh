# shellcheck shell=bash disable=SC2154  # the variables below come from run.sh
# Helpers of the e2e tier's scenarios, sourced by run.sh once the cluster runs loopcsi (run.sh
# provides kubectl, until_true, pass, fail, log, our_loops, $pool, $kubelet_dir, $work, $node).
# The scenarios themselves are in scenarios/*.sh.

# app_pod NAME PVC MODE SCRIPT [AFFINITY]: a busybox pod using PVC at /data (MODE=fs) or as the
# block device /dev/xvda (MODE=block), running SCRIPT, with the pod's affinity AFFINITY (a YAML
# flow mapping) if given. It stops at once on SIGTERM.
app_pod() {
    local name="$1" pvc="$2" mode="$3" script="$4" affinity="${5:-}" mount
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
  terminationGracePeriodSeconds: 5${affinity:+
  affinity: $affinity}
  containers:
    - name: app
      image: loopcsi.dev/e2e/busybox:1.35
      imagePullPolicy: Never
      command: [sh, -c, 'trap "exit 0" TERM; $script']
      $mount
  volumes: [{name: v, persistentVolumeClaim: {claimName: $pvc}}]
EOF
}

# pvc NAME CLASS MODE [SIZE] [ACCESS_MODE] [DATA_SOURCE]: a claim (MODE is Filesystem or Block;
# SIZE defaults to 64Mi, ACCESS_MODE to ReadWriteOnce; DATA_SOURCE, a YAML flow mapping, is its
# dataSource).
pvc() {
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: default}
spec:
  storageClassName: $2
  volumeMode: $3
  accessModes: [${5:-ReadWriteOnce}]
  resources: {requests: {storage: ${4:-64Mi}}}${6:+
  dataSource: $6}
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

# write_then_read PREFIX MODE CLASS WRITE READ [SIZE]: a claim PREFIX-pvc (SIZE, default 64Mi); a
# pod PREFIX-writer runs WRITE (reading the token on its standard input) and exits; after it is
# deleted, a pod PREFIX-app prints what READ reads and keeps running; its output must be the token.
write_then_read() {
    local prefix="$1" mode="$2" class="$3" write="$4" read="$5" size="${6:-64Mi}" t=$SECONDS got
    local token="$prefix-$RANDOM-$RANDOM"
    pvc "$prefix-pvc" "$class" "$([ "$mode" = block ] && echo Block || echo Filesystem)" "$size"
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
    pass "$prefix ($mode, $class, $size, WaitForFirstConsumer): $prefix-writer wrote '$token', $prefix-app read '$got' after $prefix-writer was deleted; pv $(kubectl get pvc "$prefix-pvc" -o jsonpath='{.spec.volumeName}'); $((SECONDS - t)) s"
}
