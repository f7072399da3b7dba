# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# Several nodes: a second kubelet joins with a small pool of its own (nodes.sh). Each node
# publishes its own capacity; a volume is created on a node that can hold it; a pod using a volume
# always runs on that volume's node; a full pool sends new volumes to the other node; a snapshot
# restores on its own node and is refused, with an error naming it, on the other. The scenarios
# run in this order and share the second node and the claims; the last removes them all.
E2E_SCENARIOS+=(multinode_join multinode_placement multinode_restore multinode_full_pool multinode_leave)

node2=e2e-node-2
# The second node's pool: a tmpfs far smaller than node 1's disk pool.
node2_pool_size=$((512 * 1024 * 1024))

# placed_pod NAME PVC KIND NODE SCRIPT: a busybox pod using PVC at /data that must (KIND=required)
# or would rather (KIND=preferred) run on NODE.
placed_pod() {
    local name="$1" pvc="$2" kind="$3" on="$4" script="$5" affinity
    local term="{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$on]}]}"
    if [ "$kind" = required ]; then
        affinity="requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [$term]}"
    else
        affinity="preferredDuringSchedulingIgnoredDuringExecution: [{weight: 100, preference: $term}]"
    fi
    app_pod "$name" "$pvc" fs "$script" "{nodeAffinity: {$affinity}}"
}

pod_node() { kubectl get pod "$1" -o jsonpath='{.spec.nodeName}'; }
# The node a PV is pinned to by its node affinity (the driver's topology key).
pv_node() {
    kubectl get pv "$(kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}')" \
        -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}'
}
# capacity_of NODE CLASS: the bytes the CSIStorageCapacity object of NODE and CLASS publishes.
capacity_of() {
    kubectl -n loopcsi get csistoragecapacities -o json | python3 -c '
import json, sys
units = {"": 1, "k": 1000, "Ki": 1024, "M": 10**6, "Mi": 2**20, "G": 10**9, "Gi": 2**30, "T": 10**12, "Ti": 2**40}
import re
for item in json.load(sys.stdin)["items"]:
    labels = (item.get("nodeTopology") or {}).get("matchLabels") or {}
    if labels.get("topology.loopcsi.dev/node") == sys.argv[1] and item["storageClassName"] == sys.argv[2]:
        m = re.fullmatch(r"(\d+)([a-zA-Z]*)", item.get("capacity", "0"))
        print(int(m.group(1)) * units[m.group(2)])
        break
' "$1" "$2"
}
capacity_between() {
    local c
    c="$(capacity_of "$1" "$2")"
    [ -n "$c" ] && [ "$c" -ge "$3" ] && [ "$c" -le "$4" ]
}
daemonset_ready_on() {
    [ "$(kubectl -n loopcsi get ds loopcsi-node -o jsonpath='{.status.numberReady}')" = "$1" ]
}
csinode_lists() {
    kubectl get csinode "$1" -o jsonpath='{.spec.drivers[*].name}' 2>/dev/null | grep -qw loopcsi.dev
}
pvc_event() {
    kubectl get events -n default --field-selector "involvedObject.name=$1,reason=$2" \
        -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' 2>/dev/null
}
has_pvc_event() { [ -n "$(pvc_event "$1" "$2")" ]; }
snapshot_ready() {
    [ "$(kubectl get volumesnapshot "$1" -o jsonpath='{.status.readyToUse}' 2>/dev/null)" = true ]
}

scenario_multinode_join() {
    local t=$SECONDS
    add_node "$node2" 2 "$node2_pool_size"
    until_true 300 "the DaemonSet ready on both nodes" daemonset_ready_on 2 ||
        fail "multinode: the plugin did not become ready on $node2: $(kubectl -n loopcsi get pods -o wide)"
    until_true 120 "CSINode $node2 lists loopcsi.dev" csinode_lists "$node2" ||
        fail "multinode: the kubelet of $node2 never registered loopcsi.dev"
    local keys
    keys="$(kubectl get csinode "$node2" -o jsonpath='{.spec.drivers[0].topologyKeys}')"
    pass "multinode: $node2 joined (own root dir, containerd, ports and a $((node2_pool_size >> 20)) MiB pool); plugin ready on 2 nodes; CSINode $node2 registers loopcsi.dev with topology keys $keys; $((SECONDS - t)) s"

    # Each node's provisioner publishes its own pool's free space, per StorageClass.
    t=$SECONDS
    until_true 120 "capacity of $node2 published" capacity_between "$node2" loopcsi-ext4 \
        $((node2_pool_size / 2)) "$node2_pool_size" ||
        fail "multinode: no CSIStorageCapacity for $node2 near its pool size: $(kubectl -n loopcsi get csistoragecapacities -o wide)"
    local c1 c2
    c1="$(capacity_of "$node" loopcsi-ext4)"
    c2="$(capacity_of "$node2" loopcsi-ext4)"
    [ -n "$c1" ] && [ "$c1" -gt $((2 * node2_pool_size)) ] ||
        fail "multinode: node 1's capacity '$c1' is not its disk pool's free space"
    pass "multinode: CSIStorageCapacity per node: $node $((c1 >> 20)) MiB (disk pool), $node2 $((c2 >> 20)) MiB (tmpfs pool, df: $(df -B1M --output=avail "$(node_pool_fs "$node2")" | tail -1 | tr -d ' ') MiB); $((SECONDS - t)) s"
}

scenario_multinode_placement() {
    local t=$SECONDS n
    # A volume larger than node 2's pool, for a pod that would rather run on node 2: only node 1
    # can hold it, so the scheduler puts the pod (and the provisioner the volume) there.
    pvc mn-big-pvc loopcsi-ext4 Filesystem 1Gi
    placed_pod mn-big mn-big-pvc preferred "$node2" 'echo big > /data/f && sync && while true; do sleep 1; done'
    wait_phase mn-big Running
    n="$(pod_node mn-big)"
    [ "$n" = "$node" ] && [ "$(pv_node mn-big-pvc)" = "$node" ] ||
        fail "multinode: a 1 GiB volume (more than $node2's pool) went to pod node '$n', PV node '$(pv_node mn-big-pvc)'"
    pass "multinode: a 1 GiB claim whose pod prefers $node2 (pool $((node2_pool_size >> 20)) MiB) was created on $n and its pod runs there; $((SECONDS - t)) s"

    # A small volume made on node 2, then used by a pod that would rather run on node 1: the
    # volume's node affinity wins, the pod runs on node 2 and reads what the first pod wrote.
    t=$SECONDS
    local token="mn-$RANDOM-$RANDOM" got
    pvc mn-small-pvc loopcsi-ext4 Filesystem 64Mi
    placed_pod mn-small-w mn-small-pvc required "$node2" "echo $token > /data/token && sync"
    wait_phase mn-small-w Succeeded
    [ "$(pv_node mn-small-pvc)" = "$node2" ] ||
        fail "multinode: the claim of a pod required on $node2 is on '$(pv_node mn-small-pvc)'"
    [ -n "$(find "$(node_pool_fs "$node2")/pool" -name '*.img')" ] ||
        fail "multinode: no image in $node2's pool after provisioning there"
    kubectl delete pod mn-small-w --timeout=120s >/dev/null
    placed_pod mn-small-r mn-small-pvc preferred "$node" "cat /data/token; while true; do sleep 1; done"
    wait_phase mn-small-r Running
    n="$(pod_node mn-small-r)"
    [ "$n" = "$node2" ] || fail "multinode: a pod using a volume of $node2 was scheduled to $n"
    until_true 30 "mn-small-r log" has_log mn-small-r || true
    got="$(kubectl logs mn-small-r)"
    [ "$got" = "$token" ] || fail "multinode: the pod on $node2 read '$got', not '$token'"
    pass "multinode: a volume made on $node2 (its image in $node2's pool) is used by a pod preferring $node on $n, which reads '$got'; $((SECONDS - t)) s"
}

scenario_multinode_restore() {
    local t=$SECONDS got msg snap_id
    kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: mn-snap, namespace: default}
spec:
  volumeSnapshotClassName: loopcsi-snapshot
  source: {persistentVolumeClaimName: mn-small-pvc}
EOF
    until_true 120 "mn-snap ready" snapshot_ready mn-snap ||
        fail "multinode: the snapshot of $node2's volume is not ready: $(kubectl describe volumesnapshot mn-snap | tail -8)"
    snap_id="$(kubectl get volumesnapshotcontent "$(kubectl get volumesnapshot mn-snap -o jsonpath='{.status.boundVolumeSnapshotContentName}')" -o jsonpath='{.status.snapshotHandle}')"
    local restore
    for restore in mn-restore-here mn-restore-there; do
        data_claim "$restore-pvc" loopcsi-ext4 Filesystem 64Mi VolumeSnapshot mn-snap
    done
    # On the snapshot's own node the restore works.
    placed_pod mn-restore-here mn-restore-here-pvc required "$node2" "cat /data/token; while true; do sleep 1; done"
    wait_phase mn-restore-here Running
    until_true 30 "mn-restore-here log" has_log mn-restore-here || true
    got="$(kubectl logs mn-restore-here)"
    [ "$got" = "$(kubectl logs mn-small-r)" ] ||
        fail "multinode: the restore on $node2 read '$got', not the snapshot's token"
    pass "multinode: snapshot $snap_id of a volume on $node2 restored on $node2: the pod read '$got'; $((SECONDS - t)) s"

    # On the other node the snapshot does not exist: the claim stays Pending and its events say
    # which snapshot is missing and where.
    t=$SECONDS
    placed_pod mn-restore-there mn-restore-there-pvc required "$node" "cat /data/token"
    until_true 120 "a ProvisioningFailed event on mn-restore-there-pvc" has_pvc_event mn-restore-there-pvc ProvisioningFailed ||
        fail "multinode: no ProvisioningFailed event for a restore on $node of a snapshot of $node2: $(kubectl describe pvc mn-restore-there-pvc | tail -8)"
    msg="$(pvc_event mn-restore-there-pvc ProvisioningFailed | tail -1)"
    case "$msg" in
    *NotFound*"$snap_id"*) ;;
    *) fail "multinode: the refusal does not say NotFound with the snapshot id $snap_id: $msg" ;;
    esac
    [ "$(kubectl get pvc mn-restore-there-pvc -o jsonpath='{.status.phase}')" = Pending ] ||
        fail "multinode: a restore of $node2's snapshot on $node was bound"
    pass "multinode: the restore on $node of $node2's snapshot is refused, the claim stays Pending: $msg; $((SECONDS - t)) s"
    t=$SECONDS
    kubectl delete pod mn-restore-here mn-restore-there --timeout=120s >/dev/null
    kubectl delete pvc mn-restore-here-pvc mn-restore-there-pvc --timeout=120s >/dev/null
    # The snapshot-controller keeps a snapshot while a claim restoring from it exists.
    kubectl wait --for=delete pvc/mn-restore-here-pvc pvc/mn-restore-there-pvc --timeout=120s >/dev/null 2>&1 || true
    kubectl delete volumesnapshot mn-snap --wait=false >/dev/null
    # external-provisioner (v6.4.0 too) adds its volumesnapshot-as-source-protection finalizer
    # when a restore starts and removes it only when one succeeds: after the refused restore it
    # stays, and the snapshot with it (kubernetes-csi/external-provisioner#1507). The scenario
    # checks that this finalizer, and nothing of loopcsi's, is what holds the snapshot, and
    # removes it as docs/kubernetes.md tells operators to.
    local orphan=provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection held
    until_true 60 "mn-snap deleted or held only by the provisioner's finalizer" snapshot_gone_or_held_by "$orphan" ||
        fail "multinode: the snapshot of $node2's volume is held: $(kubectl get volumesnapshot mn-snap -o jsonpath='{.metadata.finalizers}')"
    held="$(kubectl get volumesnapshot mn-snap -o jsonpath='{.metadata.finalizers}' 2>/dev/null || true)"
    if [ -n "$held" ]; then
        kubectl patch volumesnapshot mn-snap --type json -p '[{"op": "remove", "path": "/metadata/finalizers"}]' >/dev/null
    fi
    kubectl wait --for=delete volumesnapshot/mn-snap --timeout=120s >/dev/null 2>&1 ||
        fail "multinode: the snapshot of $node2's volume was not deleted: $(kubectl get volumesnapshot mn-snap -o yaml | tail -25)"
    until_true 60 "the snapshot's content deleted" no_snapshot_contents ||
        fail "multinode: the VolumeSnapshotContent stayed: $(kubectl get volumesnapshotcontent)"
    [ -z "$(find "$(node_pool_fs "$node2")/pool" -path '*snap*' -type f)" ] ||
        fail "multinode: the snapshot's files stayed in $node2's pool: $(find "$(node_pool_fs "$node2")/pool" -path '*snap*' -type f)"
    pass "multinode: restores and the snapshot deleted, its files gone from $node2's pool (finalizer left by the provisioner after the refused restore: ${held:-none}); $((SECONDS - t)) s"
}

# snapshot_gone_or_held_by FINALIZER: mn-snap is deleted, or only FINALIZER holds it.
snapshot_gone_or_held_by() {
    local f
    f="$(kubectl get volumesnapshot mn-snap -o jsonpath='{.metadata.finalizers[*]}' 2>/dev/null)" || return 0
    [ -z "$f" ] || [ "$f" = "$1" ]
}
no_snapshot_contents() { [ -z "$(kubectl get volumesnapshotcontent -o name 2>/dev/null)" ]; }

scenario_multinode_full_pool() {
    local t=$SECONDS filler avail c2 n
    # Fill node 2's tmpfs (beside its pool, not in it) until less than 64 MiB is left.
    filler="$(node_pool_fs "$node2")/filler"
    avail="$(df -B1 --output=avail "$(node_pool_fs "$node2")" | tail -1 | tr -d ' ')"
    fallocate -l $((avail - 16 * 1024 * 1024)) "$filler"
    # The provisioner polls GetCapacity once a minute; wait for the smaller figure.
    until_true 150 "$node2's capacity below 64 MiB" capacity_between "$node2" loopcsi-ext4 0 $((64 * 1024 * 1024 - 1)) ||
        fail "multinode: $node2's published capacity stayed $(capacity_of "$node2" loopcsi-ext4) with its pool full"
    c2="$(capacity_of "$node2" loopcsi-ext4)"
    pass "multinode: $node2's pool filled (df: $(df -B1M --output=avail "$(node_pool_fs "$node2")" | tail -1 | tr -d ' ') MiB left); its CSIStorageCapacity fell to $((c2 >> 20)) MiB in $((SECONDS - t)) s"
    t=$SECONDS
    pvc mn-spill-pvc loopcsi-ext4 Filesystem 64Mi
    placed_pod mn-spill mn-spill-pvc preferred "$node2" 'while true; do sleep 1; done'
    wait_phase mn-spill Running
    n="$(pod_node mn-spill)"
    [ "$n" = "$node" ] && [ "$(pv_node mn-spill-pvc)" = "$node" ] ||
        fail "multinode: with $node2's pool full a new claim went to pod node $n, PV node $(pv_node mn-spill-pvc)"
    pass "multinode: with $node2 full, a 64 MiB claim whose pod prefers $node2 was created on $n; $((SECONDS - t)) s"
    rm -f "$filler"
}

scenario_multinode_leave() {
    local t=$SECONDS pvs
    pvs="$(kubectl get pvc mn-big-pvc mn-small-pvc mn-spill-pvc -o jsonpath='{.items[*].spec.volumeName}')"
    kubectl delete pod mn-big mn-small-r mn-spill --timeout=120s >/dev/null ||
        fail "multinode: an app pod is stuck deleting: $(kubectl get pods -o wide)"
    kubectl delete pvc mn-big-pvc mn-small-pvc mn-spill-pvc --timeout=120s >/dev/null
    local pv
    for pv in $pvs; do
        kubectl wait --for=delete "pv/$pv" --timeout=120s >/dev/null 2>&1 || fail "multinode: PV $pv stayed"
    done
    local left2 loops2
    left2="$(find "$(node_pool_fs "$node2")/pool" -name '*.img')"
    loops2="$(loops_backed_by "$(node_pool_fs "$node2")")"
    [ -z "$left2$loops2" ] || fail "multinode: $node2 kept images [$left2] or loop devices [$loops2]"
    remove_node "$node2"
    until_true 120 "the DaemonSet back to one node" daemonset_ready_on 1 ||
        fail "multinode: the DaemonSet did not settle on one node: $(kubectl -n loopcsi get pods -o wide)"
    pass "multinode: every claim deleted (no image or loop device left on either node); $node2 removed; $((SECONDS - t)) s"
}
