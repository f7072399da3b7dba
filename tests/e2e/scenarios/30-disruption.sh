# shellcheck shell=bash disable=SC2154,SC2016,SC2015
# SC2154: the variables come from run.sh. SC2016: the pods' scripts are single-quoted on purpose
# ($TOKEN and $i are the pod shell's). SC2015: `A && B || fail ...` is meant: fail exits.
# Disruptions a node lives through while volumes are published: a rolling update of the
# DaemonSet (an upgrade), a power loss and reboot of the node, and the driver killed with
# SIGKILL during a burst of 20 claims and pods and during their deletion (with the same burst
# without kills first, as the baseline). Each leaves the cluster as it found it. The helpers
# node_plugin_pod, driver_metrics and wait_reconciled are in 10-basic.sh.
E2E_SCENARIOS+=(rolling_update node_reboot burst burst_kill)

# ---------------------------------------------------------------- objects
# claim_yaml NAME CLASS MODE [SIZE] [LABEL]: a claim (MODE: fs or block), labelled e2e=LABEL.
claim_yaml() {
    cat <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: default, labels: {e2e: "${5:-disrupt}"}}
spec:
  storageClassName: $2
  volumeMode: $([ "$3" = block ] && echo Block || echo Filesystem)
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: ${4:-64Mi}}}
EOF
}

# pod_yaml NAME CLAIM MODE TOKEN SCRIPT [LABEL]: a busybox pod with the claim at /data (fs) or as
# /dev/xvda (block), running SCRIPT (no single quotes) with $TOKEN in its environment. Unlike
# app_pod it is restarted like a workload's pod (restartPolicy Always: after a reboot the
# kubelet starts it again) and pinned to our node (the one whose driver the scenario disturbs).
pod_yaml() {
    local mount
    if [ "$3" = block ]; then
        mount="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
    else
        mount="volumeMounts: [{name: v, mountPath: /data}]"
    fi
    cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: default, labels: {e2e: "${6:-disrupt}"}}
spec:
  nodeSelector: {kubernetes.io/hostname: $node}
  terminationGracePeriodSeconds: 5
  containers:
    - name: app
      image: loopcsi.dev/e2e/busybox:1.35
      imagePullPolicy: Never
      env: [{name: TOKEN, value: "$4"}]
      command: [sh, -c, 'trap "exit 0" TERM; $5']
      $mount
  volumes: [{name: v, persistentVolumeClaim: {claimName: $2}}]
EOF
}

idle='while true; do sleep 1; done'

pv_of() { kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
handle_of() { kubectl get pv "$(pv_of "$1")" -o jsonpath='{.spec.csi.volumeHandle}'; }
image_of() { echo "$pool/volumes/$(handle_of "$1").img"; }
# The loop devices backed by FILE, matched by the backing file's device and inode.
loops_of_file() {
    local ids
    ids="$(find "$1" -maxdepth 0 -printf '%D %i\n' | while read -r d i; do
        printf '%d:%d %s\n' "$(((d >> 8) & 0xfff))" "$(((d & 0xff) | ((d >> 12) & 0xfff00)))" "$i"
    done)"
    loops_with_identity "$ids"
}
# loops_with_identity "MAJ:MIN INO" lines: the loop devices backed by those files, deleted or not
# (the kernel keeps a deleted backing file's inode while a device holds it).
loops_with_identity() {
    losetup --json --list -O NAME,BACK-MAJ:MIN,BACK-INO | python3 -c '
import json, sys
ids = {tuple(l.split()) for l in sys.argv[1].splitlines() if l.strip()}
for d in json.load(sys.stdin).get("loopdevices", []):
    if (d["back-maj:min"].strip(), str(d["back-ino"])) in ids:
        print(d["name"])
' "$1"
}
# Identities (as loops_with_identity takes them) of the images of CLAIMS.
image_identities() {
    local c
    for c in "$@"; do
        find "$(image_of "$c")" -maxdepth 0 -printf '%D %i\n' | while read -r d i; do
            printf '%d:%d %s\n' "$(((d >> 8) & 0xfff))" "$(((d & 0xff) | ((d >> 12) & 0xfff00)))" "$i"
        done
    done
}
# CSI staging and publish mounts under the kubelet directory (see unpublish_and_delete).
csi_mounts() {
    awk -v k="$kubelet_dir/" 'index($5, k) == 1 && $5 ~ /kubernetes.io[~\/]csi/ {print $5}' /proc/self/mountinfo
}
container_id() {
    kubectl get pod "$1" ${3:+-n "$3"} -o jsonpath="{.status.containerStatuses[?(@.name==\"$2\")].containerID}"
}
restarts() {
    kubectl get pod "$1" ${3:+-n "$3"} -o jsonpath="{.status.containerStatuses[?(@.name==\"$2\")].restartCount}"
}
# container_renewed POD CONTAINER OLD_ID [NS]: the container runs under an id other than OLD_ID
# and is ready.
container_renewed() {
    local id ready
    id="$(container_id "$1" "$2" "${4:-}")"
    ready="$(kubectl get pod "$1" ${4:+-n "$4"} -o jsonpath="{.status.containerStatuses[?(@.name==\"$2\")].ready}")"
    [ -n "$id" ] && [ "$id" != "$3" ] && [ "$ready" = true ]
}

# delete_and_check WHAT LABEL: deletes the pods and claims labelled e2e=LABEL, waits until their
# PVs are gone, and checks that nothing of them is left: no image or metadata in the pool, no
# loop device backed by their images (by identity, deleted files included), no CSI mount, no
# image attached twice. KILL_DURING_DELETE=1 also kills the driver while it works.
delete_and_check() {
    local what="$1" label="$2" t=$SECONDS claims pvs=() handles=() ids c
    claims="$(kubectl get pvc -l "e2e=$label" -o jsonpath='{.items[*].metadata.name}')"
    for c in $claims; do
        pvs+=("$(pv_of "$c")")
        handles+=("$(handle_of "$c")")
    done
    # shellcheck disable=SC2086  # a list of names
    ids="$(image_identities $claims)"
    kubectl delete pods -l "e2e=$label" --wait=false >/dev/null
    kubectl delete pvc -l "e2e=$label" --wait=false >/dev/null
    if [ "${KILL_DURING_DELETE:-0}" = 1 ]; then
        until_true 180 "the first of the $label pods gone" pods_fewer "$label" "$(echo "$claims" | wc -w)" ||
            fail "$what: no pod went within 180 s: $(kubectl get pods -l "e2e=$label" -o wide | tail -5)"
        kill_driver "$what: deleting, $(count_pods "$label") pods left (NodeUnpublishVolume and NodeUnstageVolume in flight)"
        until_true 300 "the first of the $label PVs gone" pvs_fewer "${#pvs[@]}" "${pvs[@]}" ||
            fail "$what: no PV went within 300 s: $(kubectl get pv | tail -5)"
        kill_driver "$what: deleting, $(count_existing_pvs "${pvs[@]}") of ${#pvs[@]} PVs left (DeleteVolume in flight)"
    fi
    until_true 300 "the $label pods gone" no_pods_labelled "$label" ||
        fail "$what: pods stuck deleting: $(kubectl get pods -l "e2e=$label" -o wide | tail -5; tail -3 "$work/logs/kubelet.log")"
    local pods_gone=$((SECONDS - t))
    # Generous: after several kills the kubelet holds the driver, and the provisioner (which
    # exits when the driver's socket goes away), in CrashLoopBackOff (80 s by the fourth), and a
    # DeleteVolume refused while the kubelet still unstages is retried with growing back-off.
    until_true 600 "the $label PVs gone" pvs_fewer 1 "${pvs[@]}" ||
        fail "$what: PVs left: $(kubectl get pv "${pvs[@]}" 2>&1 | tail -5)"
    local h left="" loops mounts
    for h in "${handles[@]}"; do
        for f in "$pool/volumes/$h.img" "$pool/volumes/$h.json" "$pool/node/$h"; do
            [ -e "$f" ] && left="$left $f"
        done
    done
    loops="$(loops_with_identity "$ids")"
    mounts="$(csi_mounts)"
    [ -z "$left$loops$mounts" ] ||
        fail "$what: left behind: pool files [$left] loop devices [$loops] CSI mounts [$mounts]"
    [ -z "$(double_loops)" ] || fail "$what: a backing file attached twice: $(double_loops)"
    pass "$what: ${#pvs[@]} pods and claims deleted (pods gone in $pods_gone s, PVs in $((SECONDS - t)) s); no image or record of ${#handles[@]} volumes, no loop device backed by their images, no CSI mount, nothing attached twice"
}
count_pods() { kubectl get pods -l "e2e=$1" -o name | wc -l; }
no_pods_labelled() { [ "$(count_pods "$1")" = 0 ]; }
pods_fewer() { [ "$(count_pods "$1")" -lt "$2" ]; }
count_existing_pvs() { kubectl get pv "$@" -o name --ignore-not-found 2>/dev/null | wc -l; }
pvs_fewer() {
    local n="$1"
    shift
    [ "$(count_existing_pvs "$@")" -lt "$n" ]
}

# ---------------------------------------------------------------- the driver process
# The pid (on the host) of the running loopcsi container of our node's plugin pod, found by its
# container's labels in our containerd and checked by its command line.
driver_pid() {
    local id pid
    for id in $(ctr_k8s containers ls -q 'labels."io.kubernetes.container.name"==loopcsi,labels."io.kubernetes.pod.namespace"==loopcsi'); do
        pid="$(ctr_k8s tasks ls | awk -v id="$id" '$1 == id && $3 == "RUNNING" {print $2}')"
        # (Containers of killed drivers stay, stopped, until the kubelet collects them.)
        # The image's entrypoint is `loopcsi` (found on PATH, as the Dockerfile has it): the
        # process is known by its executable and its subcommand, not by how argv[0] is spelled.
        if [ -n "$pid" ] && [ "$(basename "$(readlink "/proc/$pid/exe")")" = loopcsi ] &&
            tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE '^[^ ]*loopcsi serve '; then
            echo "$pid"
        fi
    done
}
process_gone() { ! kill -0 "$1" 2>/dev/null; }
one_driver() { [ "$(driver_pid | wc -l)" = 1 ]; }
driver_other_than() { one_driver && [ "$(driver_pid)" != "$1" ]; }
# kill_driver WHEN: SIGKILL to the driver process; prints WHEN as evidence.
kill_driver() {
    local pid
    until_true 120 "one running driver process" one_driver ||
        fail "kill -9: no running loopcsi process to kill ($1): $(kubectl -n loopcsi get pods -o wide)"
    pid="$(driver_pid)"
    kill -KILL "$pid"
    killed_drivers=$((${killed_drivers:-0} + 1))
    log "kill -9 of the driver (pid $pid) while $1"
    # The next kill must hit the restarted driver, not this one's corpse.
    until_true 120 "the killed driver gone" process_gone "$pid" ||
        fail "kill -9: the driver process $pid survived SIGKILL"
}

# ---------------------------------------------------------------- rolling update
running_ready() {
    [ "$(pod_phase "$1")" = Running ] &&
        [ "$(kubectl get pod "$1" -o jsonpath='{.status.containerStatuses[0].ready}')" = true ]
}
both_writing() { [ "$(ticks)" -ge 2 ] && [ "$(blk_counter)" -ge 2 ]; }
ticks() { kubectl exec ru-fs -- wc -l /data/ticks | awk '{print $1}'; }
blk_counter() {
    kubectl exec ru-blk -- sh -c 'dd if=/dev/xvda bs=512 skip=8 count=1 2>/dev/null | head -n1' | tr -d '\0'
}
# The kubelet's view of the volumes (NodeGetVolumeStats, cached for up to its aggregation period
# of a minute): "claim usedBytes capacityBytes" for each of CLAIMS it lists.
summary_stats() {
    kubectl get --raw "/api/v1/nodes/$node/proxy/stats/summary" | python3 -c '
import json, sys
want = set(sys.argv[1:])
for p in json.load(sys.stdin).get("pods", []):
    for v in p.get("volume") or []:
        r = v.get("pvcRef") or {}
        if r.get("name") in want:
            print(r["name"], v.get("usedBytes"), v.get("capacityBytes"))
' "$@"
}
# stats_answered POD HANDLE...: the driver in POD answered NodeGetVolumeStats for each volume.
stats_answered() {
    local logs h
    logs="$(kubectl -n loopcsi logs "$1" -c loopcsi | grep 'NodeGetVolumeStats' | grep ' done ')"
    shift
    for h in "$@"; do grep -qF "$h" <<<"$logs" || return 1; done
}
pvc_capacity() { kubectl get pvc "$1" -o jsonpath='{.status.capacity.storage}'; }
capacity_is() { [ "$(pvc_capacity "$1")" = "$2" ]; }
# Our node runs exactly one plugin pod, not OLD, and it is Ready.
node_plugin_ready_and_new() {
    local pods
    pods="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node \
        --field-selector "spec.nodeName=$node" -o jsonpath='{.items[*].metadata.name}')"
    [ -n "$pods" ] && [ "$pods" = "${pods%% *}" ] && [ "$pods" != "$1" ] &&
        [ "$(kubectl -n loopcsi get pod "$pods" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
rollout_done() {
    kubectl -n loopcsi rollout status ds/loopcsi-node --timeout=5s
}
# rollout WHAT OLD_POD: waits until the DaemonSet's rollout is complete and our node runs a new,
# ready plugin pod that the kubelet lists as the driver; sets new_plugin.
rollout() {
    local t=$SECONDS
    until_true 300 "rollout of ds/loopcsi-node ($1)" rollout_done ||
        fail "rolling update ($1): the rollout did not complete in 300 s: $(kubectl -n loopcsi get ds,pods -o wide)"
    until_true 120 "a new plugin pod Ready" node_plugin_ready_and_new "$2" ||
        fail "rolling update ($1): no new plugin pod is Ready: $(kubectl -n loopcsi get pods -o wide)"
    until_true 120 "CSINode lists loopcsi.dev" csinode_registered ||
        fail "rolling update ($1): the kubelet does not list loopcsi.dev after the rollout"
    new_plugin="$(node_plugin_pod)"
    pass "rolling update ($1): rollout complete in $((SECONDS - t)) s, $2 replaced by $new_plugin (generation $(kubectl -n loopcsi get ds loopcsi-node -o jsonpath='{.metadata.generation}'), $(kubectl -n loopcsi get ds loopcsi-node -o jsonpath='{.status.updatedNumberScheduled}') updated, $(kubectl -n loopcsi get ds loopcsi-node -o jsonpath='{.status.numberReady}') ready), driver registered"
}

# A DaemonSet rollout while a file-system pod (xfs, so that it can grow online) and a block pod
# write to their volumes: `rollout restart` and then a changed pod template (a new environment
# variable, as an upgrade changes the image), undone at the end (a third rollout).
scenario_rolling_update() {
    local t=$SECONDS token="ru-$RANDOM-$RANDOM" old before_ticks before_count fs_uid blk_uid
    {
        claim_yaml ru-fs-pvc loopcsi-xfs fs
        echo ---
        claim_yaml ru-blk-pvc loopcsi-ext4 block
        echo ---
        # Writes a line a second, and stops (the container fails) the moment a write fails.
        pod_yaml ru-fs ru-fs-pvc fs "$token" 'echo $TOKEN > /data/token && sync && while date +%s >> /data/ticks && sync; do sleep 1; done; exit 1'
        echo ---
        # The token at sector 0, then a counter at sector 8, rewritten each second.
        pod_yaml ru-blk ru-blk-pvc block "$token" 'echo $TOKEN | dd of=/dev/xvda bs=512 count=1 conv=sync 2>/dev/null && sync && i=0 && while i=$((i + 1)) && echo $i | dd of=/dev/xvda bs=512 seek=8 count=1 conv=sync 2>/dev/null && sync; do sleep 1; done; exit 1'
    } | kubectl apply -f - >/dev/null
    wait_phase ru-fs Running
    wait_phase ru-blk Running
    until_true 60 "ru-fs and ru-blk writing" both_writing ||
        fail "rolling update: the pods do not write: ticks '$(ticks)', counter '$(blk_counter)'"
    fs_uid="$(kubectl get pod ru-fs -o jsonpath='{.metadata.uid}')"
    blk_uid="$(kubectl get pod ru-blk -o jsonpath='{.metadata.uid}')"
    before_ticks="$(ticks)"
    before_count="$(blk_counter)"
    local loops_before
    loops_before="$(loop_evidence)"
    pass "rolling update: ru-fs (xfs) and ru-blk (block) Running and writing ($before_ticks lines, counter $before_count) after $((SECONDS - t)) s; loop devices $loops_before"

    old="$(node_plugin_pod)"
    kubectl -n loopcsi rollout restart ds/loopcsi-node >/dev/null
    rollout "kubectl rollout restart" "$old"
    old="$new_plugin"
    kubectl -n loopcsi set env ds/loopcsi-node -c loopcsi E2E_ROLLOUT="$token" >/dev/null
    rollout "pod template changed: env E2E_ROLLOUT=$token" "$old"
    local upgraded="$new_plugin"
    [ "$(kubectl -n loopcsi get pod "$upgraded" -o jsonpath='{.spec.containers[?(@.name=="loopcsi")].env[?(@.name=="E2E_ROLLOUT")].value}')" = "$token" ] ||
        fail "rolling update: the new plugin pod $upgraded does not have the changed template"

    # The pods kept writing through both rollouts, in the same pods and containers.
    local after_ticks after_count got
    after_ticks="$(ticks)"
    after_count="$(blk_counter)"
    [ "$after_ticks" -gt "$before_ticks" ] && [ "$after_count" -gt "$before_count" ] ||
        fail "rolling update: the pods stopped writing: lines $before_ticks -> $after_ticks, counter $before_count -> $after_count"
    [ "$(kubectl get pod ru-fs -o jsonpath='{.metadata.uid}')" = "$fs_uid" ] &&
        [ "$(kubectl get pod ru-blk -o jsonpath='{.metadata.uid}')" = "$blk_uid" ] &&
        [ "$(restarts ru-fs app)" = 0 ] && [ "$(restarts ru-blk app)" = 0 ] ||
        fail "rolling update: an app pod was replaced or its container restarted (a write failed): restarts ru-fs $(restarts ru-fs app), ru-blk $(restarts ru-blk app)"
    got="$(kubectl exec ru-fs -- cat /data/token) $(kubectl exec ru-blk -- sh -c 'dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1' | tr -d '\0')"
    [ "$got" = "$token $token" ] || fail "rolling update: the tokens read '$got', not '$token $token'"
    local gap
    gap="$(kubectl exec ru-fs -- awk 'NR > 1 && $1 - p > g {g = $1 - p} {p = $1} END {print g + 0}' /data/ticks)"
    pass "rolling update: both pods kept writing through the rollouts without a failed write or a restart (lines $before_ticks -> $after_ticks, largest gap between lines ${gap} s; counter $before_count -> $after_count); both read '$token'"

    # NodeGetVolumeStats, answered by the new driver (the kubelet asks about once a minute).
    local h_fs h_blk stats
    h_fs="$(handle_of ru-fs-pvc)"
    h_blk="$(handle_of ru-blk-pvc)"
    until_true 150 "NodeGetVolumeStats answered by $upgraded" stats_answered "$upgraded" "$h_fs" "$h_blk" ||
        fail "rolling update: the new driver answered no NodeGetVolumeStats for both volumes in 150 s: $(kubectl -n loopcsi logs "$upgraded" -c loopcsi | grep NodeGetVolumeStats | tail -4)"
    stats="$(summary_stats ru-fs-pvc ru-blk-pvc | tr '\n' ';')"
    [[ "$stats" == *"ru-fs-pvc "[0-9]*" "[0-9]* ]] ||
        fail "rolling update: the kubelet's stats summary lacks ru-fs-pvc's bytes: '$stats'"
    pass "rolling update: the new driver answered NodeGetVolumeStats for both volumes ($(driver_metrics "$upgraded" | grep '^loopcsi_rpc_requests_total{method="NodeGetVolumeStats"' | tr '\n' ' ')); kubelet stats summary (claim used capacity): $stats"

    # Expansion after the rollout: xfs online, block (the loop device's capacity) online.
    local fs_kb_before fs_kb_after blk_bytes
    fs_kb_before="$(kubectl exec ru-fs -- df -k /data | awk 'NR == 2 {print $2}')"
    t=$SECONDS
    kubectl patch pvc ru-fs-pvc -p '{"spec":{"resources":{"requests":{"storage":"400Mi"}}}}' >/dev/null
    kubectl patch pvc ru-blk-pvc -p '{"spec":{"resources":{"requests":{"storage":"96Mi"}}}}' >/dev/null
    until_true 180 "ru-fs-pvc 400Mi" capacity_is ru-fs-pvc 400Mi ||
        fail "rolling update: ru-fs-pvc did not grow to 400Mi: capacity $(pvc_capacity ru-fs-pvc): $(kubectl describe pvc ru-fs-pvc | tail -6)"
    until_true 180 "ru-blk-pvc 96Mi" capacity_is ru-blk-pvc 96Mi ||
        fail "rolling update: ru-blk-pvc did not grow to 96Mi: capacity $(pvc_capacity ru-blk-pvc): $(kubectl describe pvc ru-blk-pvc | tail -6)"
    fs_kb_after="$(kubectl exec ru-fs -- df -k /data | awk 'NR == 2 {print $2}')"
    blk_bytes="$(kubectl exec ru-blk -- blockdev --getsize64 /dev/xvda)"
    [ "$fs_kb_after" -gt "$fs_kb_before" ] && [ "$blk_bytes" = $((96 << 20)) ] ||
        fail "rolling update: after expansion the pods see a file system of $fs_kb_before -> $fs_kb_after KiB and a device of $blk_bytes bytes (want $((96 << 20)))"
    pass "rolling update: expansion after the rollout in $((SECONDS - t)) s: ru-fs-pvc 400Mi (df in the pod $fs_kb_before -> $fs_kb_after KiB), ru-blk-pvc 96Mi (/dev/xvda $blk_bytes bytes)"

    # No second loop device after a reconciliation round of the upgraded driver.
    t=$SECONDS
    wait_reconciled "$upgraded" "rolling update"
    local loops_after
    loops_after="$(loop_evidence)"
    [ -z "$(double_loops)" ] || fail "rolling update: a backing file attached twice after a reconciliation round: $(double_loops)"
    [ "$loops_after" = "$loops_before" ] ||
        fail "rolling update: the loop devices changed: before $loops_before, after $loops_after"
    pass "rolling update: $upgraded finished a reconciliation round (waited $((SECONDS - t)) s; $(driver_metrics "$upgraded" | grep '^loopcsi_reconciler_actions_total' | tr '\n' ' ')); the same loop devices as before the rollouts, none attached twice: $loops_after"

    delete_and_check "rolling update: delete" disrupt

    # The DaemonSet as it was (its template without the variable; one more rollout).
    old="$upgraded"
    kubectl -n loopcsi set env ds/loopcsi-node -c loopcsi E2E_ROLLOUT- >/dev/null
    rollout "pod template restored" "$old"
}

# ---------------------------------------------------------------- node reboot
# What a power loss does to the node's processes, then what a reboot does to the kernel's state:
# the kubelet, every container and containerd die (SIGKILL, no clean shutdown); the mounts under
# the kubelet's directory and containerd's state (on a real node a tmpfs) go, the loop devices go,
# the pods' network namespaces go. The pool's files stay, as on a disk.
power_off_node() {
    local id pid m ns netnses
    netnses="$(ctr_k8s containers ls -q | while read -r id; do
        ctr_k8s containers info "$id" |
            python3 -c 'import json,sys; [print(n["path"]) for n in json.load(sys.stdin)["Spec"]["linux"]["namespaces"] if n["type"]=="network" and n.get("path")]'
    done | sort -u)"
    kill -KILL "${pids[kubelet]}"
    wait "${pids[kubelet]}" 2>/dev/null || true
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do ctr_k8s tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    # containerd's CRI plugin deletes a task when it exits: one may be gone before we look.
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
        until_true 30 "task $id stopped" task_stopped "$id" || fail "reboot: the container $id did not die"
        ctr_k8s tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    until_true 30 "no task left" no_tasks || fail "reboot: containers still running: $(ctr_k8s tasks ls)"
    kill -KILL "${pids[containerd]}"
    wait "${pids[containerd]}" 2>/dev/null || true
    for pid in $(pids_naming "$work/containerd/containerd.sock"); do kill -KILL "$pid" 2>/dev/null || true; done
    # Deepest first; a mount still busy (nothing should be) is detached lazily.
    awk -v k="$kubelet_dir" -v s="$work/containerd/state" \
        '$5 == k || index($5, k "/") == 1 || index($5, s "/") == 1 {print $5}' /proc/self/mountinfo |
        sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
    for ns in $netnses; do
        case "$ns" in /var/run/netns/cni-* | /run/netns/cni-*)
            umount "$ns" 2>/dev/null || true
            rm -f "$ns"
            ;;
        esac
    done
    # The kubelet's own loop devices on our block volumes' device nodes first (they hold them).
    for m in $(kubelet_block_loops) $(our_loops); do losetup -d "$m"; done
    until_true 30 "the pool's loop devices detached" no_our_loops ||
        fail "reboot: loop devices still attached after the unmounts: $(our_loops)"
}

cri_started() { [ "$(grep -c 'Start streaming server' "$work/logs/containerd.log")" -gt "$1" ]; }
no_tasks() { [ -z "$(ctr_k8s tasks ls -q)" ]; }
no_our_loops() { [ -z "$(our_loops)" ]; }
fs_uuid() { blkid -o value -s UUID "$1"; }

# Volumes published (ext4, xfs, block); power loss and reboot; the kubelet brings the plugin
# and the pods back; the data is there and nothing was formatted again.
scenario_node_reboot() {
    local t=$SECONDS token="rb-$RANDOM-$RANDOM" c
    {
        claim_yaml rb-ext4-pvc loopcsi-ext4 fs
        echo ---
        claim_yaml rb-xfs-pvc loopcsi-xfs fs
        echo ---
        claim_yaml rb-blk-pvc loopcsi-ext4 block
        echo ---
        pod_yaml rb-ext4 rb-ext4-pvc fs "$token" "$idle"
        echo ---
        pod_yaml rb-xfs rb-xfs-pvc fs "$token" "$idle"
        echo ---
        pod_yaml rb-blk rb-blk-pvc block "$token" "$idle"
    } | kubectl apply -f - >/dev/null
    for c in rb-ext4 rb-xfs rb-blk; do wait_phase "$c" Running; done
    kubectl exec rb-ext4 -- sh -c 'echo $TOKEN > /data/token && sync' &&
        kubectl exec rb-xfs -- sh -c 'echo $TOKEN > /data/token && sync' &&
        kubectl exec rb-blk -- sh -c 'echo $TOKEN | dd of=/dev/xvda bs=512 count=1 conv=sync 2>/dev/null && sync' ||
        fail "reboot: writing the tokens failed"
    # What identifies each file system: its UUID, read on the host from the volume's loop device.
    local -A uuid=() cid=()
    for c in rb-ext4 rb-xfs; do
        uuid[$c]="$(fs_uuid "$(loops_of_file "$(image_of "$c-pvc")")")"
        [ -n "${uuid[$c]}" ] || fail "reboot: no file-system UUID on the loop device of $c-pvc"
    done
    local plugin
    plugin="$(node_plugin_pod)"
    cid[plugin]="$(container_id "$plugin" loopcsi loopcsi)"
    for c in rb-ext4 rb-xfs rb-blk; do cid[$c]="$(container_id "$c" app)"; done
    pass "reboot: rb-ext4, rb-xfs, rb-blk Running and wrote '$token' in $((SECONDS - t)) s; file systems ext4 ${uuid[rb-ext4]}, xfs ${uuid[rb-xfs]}; loop devices $(loop_evidence)"

    t=$SECONDS
    power_off_node
    local left
    left="$(awk -v k="$kubelet_dir" 'index($5, k) == 1' /proc/self/mountinfo | wc -l)"
    pass "reboot: power off in $((SECONDS - t)) s: kubelet, containers and containerd killed; $left mounts under the kubelet dir, $(our_loops | wc -l) loop devices of the pool left"

    t=$SECONDS
    # containerd answers before its CRI plugin has reloaded its state, and a kubelet started in
    # between exits ("server is not initialized yet"; on a real node systemd would restart it).
    # The CRI plugin marks itself initialized right after it logs "Start streaming server".
    local boots
    boots="$(grep -c 'Start streaming server' "$work/logs/containerd.log")"
    start_containerd
    until_true 60 "containerd's CRI plugin initialized" cri_started "$boots" ||
        fail "reboot: containerd's CRI plugin did not start (see $work/logs/containerd.log)"
    start_kubelet
    until_true 300 "the plugin pod running again" container_renewed "$plugin" loopcsi "${cid[plugin]}" loopcsi ||
        fail "reboot: the plugin pod $plugin did not come back: $(kubectl -n loopcsi get pods -o wide)"
    until_true 120 "CSINode lists loopcsi.dev" csinode_registered ||
        fail "reboot: the kubelet does not list loopcsi.dev after the reboot"
    local plugin_back=$((SECONDS - t))
    for c in rb-ext4 rb-xfs rb-blk; do
        until_true 300 "$c running again" container_renewed "$c" app "${cid[$c]}" ||
            fail "reboot: $c did not come back: $(kubectl describe pod "$c" | tail -8)"
    done
    pass "reboot: the kubelet restarted the plugin pod $plugin (Ready after $plugin_back s) and the three app pods (all running $((SECONDS - t)) s after containerd started); restarts: plugin $(restarts "$plugin" loopcsi loopcsi), rb-ext4 $(restarts rb-ext4 app), rb-xfs $(restarts rb-xfs app), rb-blk $(restarts rb-blk app)"

    # The same file systems (not formatted again), the same data, and they take new writes.
    local now got token2="rb2-$RANDOM"
    for c in rb-ext4 rb-xfs; do
        now="$(fs_uuid "$(loops_of_file "$(image_of "$c-pvc")")")"
        [ "$now" = "${uuid[$c]}" ] || fail "reboot: $c-pvc has the file system $now, not ${uuid[$c]}: it was formatted again"
    done
    got="$(kubectl exec rb-ext4 -- cat /data/token) $(kubectl exec rb-xfs -- cat /data/token) $(kubectl exec rb-blk -- sh -c 'dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1' | tr -d '\0')"
    [ "$got" = "$token $token $token" ] || fail "reboot: the pods read '$got' after the reboot, not '$token' thrice"
    got="$(kubectl exec rb-ext4 -- sh -c "echo $token2 > /data/token2 && sync && cat /data/token2") $(kubectl exec rb-xfs -- sh -c "echo $token2 > /data/token2 && sync && cat /data/token2") $(kubectl exec rb-blk -- sh -c "echo $token2 | dd of=/dev/xvda bs=512 seek=8 count=1 conv=sync 2>/dev/null && sync && dd if=/dev/xvda bs=512 skip=8 count=1 2>/dev/null | head -n1" | tr -d '\0')"
    [ "$got" = "$token2 $token2 $token2" ] || fail "reboot: new writes read back '$got', not '$token2' thrice"
    pass "reboot: the same file systems (ext4 ${uuid[rb-ext4]}, xfs ${uuid[rb-xfs]}: nothing formatted again), the pods read '$token' and wrote '$token2'"

    t=$SECONDS
    plugin="$(node_plugin_pod)"
    wait_reconciled "$plugin" reboot
    local n
    n="$(our_loops | wc -l)"
    [ -z "$(double_loops)" ] && [ "$n" = 3 ] ||
        fail "reboot: after a reconciliation round, $n loop devices back the pool's images (want 3), attached twice: '$(double_loops)'"
    pass "reboot: after a reconciliation round of the restarted driver (waited $((SECONDS - t)) s): one loop device per volume, none attached twice: $(loop_evidence)"

    delete_and_check "reboot: delete" disrupt
}

# ---------------------------------------------------------------- burst of 20
burst_pods_running() {
    [ "$(kubectl get pods -l "e2e=$1" --field-selector status.phase=Running -o name | wc -l)" = "$2" ]
}
running_count() { kubectl get pods -l "e2e=$1" --field-selector status.phase=Running -o name | wc -l; }
bound_count() { kubectl get pvc -l "e2e=$1" -o jsonpath='{range .items[*]}{.spec.volumeName}{"\n"}{end}' | grep -c . || true; }
at_least() {
    local n
    n="$("$2" "$3")"
    [ "$n" -ge "$1" ]
}

# burst LABEL KILLS: 20 claims (10 ext4, 10 block) and 20 pods created at once; with KILLS=1 the
# driver is killed twice while they are created (once the first PVs exist: CreateVolume in
# flight; once some pods run: NodeStageVolume in flight) and twice while they are deleted.
burst() {
    local label="$1" kills="$2" n=20 i name mode t0 created
    local -A token=()
    killed_drivers=0
    {
        for i in $(seq -w 1 "$n"); do
            name="$label-$i"
            mode=$([ $((10#$i % 2)) = 0 ] && echo block || echo fs)
            token[$name]="$name-$RANDOM-$RANDOM"
            claim_yaml "$name-pvc" loopcsi-ext4 "$mode" 64Mi "$label"
            echo ---
            if [ "$mode" = block ]; then
                pod_yaml "$name" "$name-pvc" block "${token[$name]}" 'echo $TOKEN | dd of=/dev/xvda bs=512 count=1 conv=sync 2>/dev/null && sync && dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1; while true; do sleep 1; done' "$label"
            else
                pod_yaml "$name" "$name-pvc" fs "${token[$name]}" 'echo $TOKEN > /data/token && sync && cat /data/token; while true; do sleep 1; done' "$label"
            fi
            echo ---
        done
    } >"$work/$label.yaml"
    local restarts_before apply deadline
    restarts_before="$(restarts "$(node_plugin_pod)" loopcsi loopcsi)"
    t0=$SECONDS
    # In the background: the provisioning starts while the rest is still being created.
    (
        kubectl apply -f "$work/$label.yaml" >/dev/null
        echo "$((SECONDS - t0))" >"$work/$label.applied"
    ) &
    apply=$!
    if [ "$kills" = 1 ]; then
        # The first kill as soon as the first claim is bound (CreateVolume of the others in
        # flight): a tighter poll than until_true's second.
        deadline=$((SECONDS + 300))
        until [ "$(bound_count "$label")" -ge 1 ]; do
            [ "$SECONDS" -lt "$deadline" ] || fail "$label: no claim was bound in 300 s"
            sleep 0.2
        done
        local first_pid
        first_pid="$(driver_pid)"
        kill_driver "creating: $(bound_count "$label") of $n claims bound, $(running_count "$label") pods Running"
        until_true 180 "a restarted driver" driver_other_than "$first_pid" ||
            fail "$label: the driver did not come back after kill -9: $(kubectl -n loopcsi get pods -o wide)"
        until_true 300 "5 $label pods Running" at_least 5 running_count "$label" ||
            fail "$label: not 5 pods Running 300 s after the kill: $(kubectl get pods -l "e2e=$label" | tail -5)"
        if [ "$(running_count "$label")" -lt "$n" ]; then
            kill_driver "creating: $(bound_count "$label") of $n claims bound, $(running_count "$label") pods Running"
        else
            log "$label: all pods were Running before the second kill; skipped"
        fi
    fi
    wait "$apply" || fail "$label: kubectl apply of the claims and pods failed"
    created="$(cat "$work/$label.applied")"
    until_true 900 "all $n $label pods Running" burst_pods_running "$label" "$n" ||
        fail "$label: $(running_count "$label") of $n pods Running after 900 s: $(kubectl get pods -l "e2e=$label" | grep -v Running | head -5)"
    local all_running=$((SECONDS - t0))
    # Each pod read its own token, and its own volume's image holds it (the block pods' token at
    # offset 0; the ext4 pods' in a data block of their file system): no volume was mixed up.
    local got img bad=""
    for name in "${!token[@]}"; do
        until_true 60 "$name log" has_log "$name" || true
        got="$(kubectl logs "$name" | tr -d '\0')"
        [ "$got" = "${token[$name]}" ] || bad="$bad $name read '$got', not '${token[$name]}';"
        img="$(image_of "$name-pvc")"
        grep -qaF "${token[$name]}" "$img" || bad="$bad the image of $name-pvc lacks its token;"
    done
    [ -z "$bad" ] || fail "$label:$bad"
    local loops
    loops="$(our_loops | wc -l)"
    [ -z "$(double_loops)" ] && [ "$loops" = "$n" ] ||
        fail "$label: $loops loop devices back the pool's images (want $n), attached twice: '$(double_loops)'"
    local app_restarts
    app_restarts="$(kubectl get pods -l "e2e=$label" -o jsonpath='{range .items[*]}{.status.containerStatuses[0].restartCount}{"\n"}{end}' | awk '{s += $1} END {print s + 0}')"
    pass "$label: $n claims (10 ext4, 10 block) and $n pods created at once (kubectl apply returned after $created s): all $n pods Running $all_running s after the claims were created$([ "$kills" = 1 ] && echo ", through $killed_drivers kill -9 of the driver"); each read its own token back and its image holds it; $loops loop devices, none twice; app container restarts $app_restarts; driver container restarts $(($(restarts "$(node_plugin_pod)" loopcsi loopcsi) - restarts_before))"
    KILL_DURING_DELETE="$kills" delete_and_check "$label: delete$([ "$kills" = 1 ] && echo " with kill -9")" "$label"
}

scenario_burst() { burst burst 0; }
scenario_burst_kill() { burst burstk 1; }
