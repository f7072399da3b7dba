# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# The data features, each on its own claims: xfs; snapshot and restore (filesystem and block);
# clone; expansion (xfs online; ext4 online where the driver has CAP_SYS_RESOURCE, offline
# otherwise); ReadWriteOncePod; fsGroup; the published storage capacity and the scheduler's use
# of it; the metrics endpoints. Every scenario deletes what it made and waits until its volumes'
# and snapshots' files have left the pool.
E2E_SCENARIOS+=(xfs snapshot clone expansion_xfs expansion_ext4 rwop fsgroup capacity metrics)

# ---------------------------------------------------------------- helpers of this file

# data_claim NAME CLASS MODE SIZE KIND SOURCE: a claim whose dataSource is the VolumeSnapshot
# (KIND=VolumeSnapshot) or the claim (KIND=PersistentVolumeClaim) SOURCE.
data_claim() {
    local group=""
    [ "$5" = VolumeSnapshot ] && group="apiGroup: snapshot.storage.k8s.io, "
    pvc "$1" "$2" "$3" "$4" ReadWriteOnce "{${group}kind: $5, name: $6}"
}

data_snapshot() {
    kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: $1, namespace: default}
spec:
  volumeSnapshotClassName: loopcsi-snapshot
  source: {persistentVolumeClaimName: $2}
EOF
}

data_snapshot_ready() {
    [ "$(kubectl get volumesnapshot "$1" -o jsonpath='{.status.readyToUse}')" = true ]
}

# data_logs POD: what the pod printed, NULs (from reading a raw device) dropped.
data_logs() { { kubectl logs "$1" 2>/dev/null || true; } | tr -d '\0'; }
data_logs_are() { [ "$(data_logs "$1")" = "$2" ]; }

# data_size_kib POD: the size of the file system at /data in POD, in KiB.
data_size_kib() { kubectl exec "$1" -- df -kP /data | awk 'NR == 2 {print $2}'; }

data_volume_of() { kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
data_handle_of() { kubectl get pv "$1" -o jsonpath='{.spec.csi.volumeHandle}'; }

data_scheduling_message() {
    kubectl get pod "$1" -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].message}'
}
# data_unschedulable POD TEXT: POD is Pending and the scheduler's message says TEXT.
data_unschedulable() { phase_is "$1" Pending && grep -q "$2" <<<"$(data_scheduling_message "$1")"; }

# data_cleanup KIND/NAME...: deletes the pods, then the snapshots, then the claims named, and
# waits until their PersistentVolumes and VolumeSnapshotContents are gone and the pool holds no
# file of them (the volumes' and snapshots' images and metadata).
data_cleanup() {
    local item pods=() snaps=() claims=() gone=() files=() pv vsc handle left
    for item in "$@"; do
        case "$item" in
            pod/*) pods+=("$item") ;;
            volumesnapshot/*)
                snaps+=("$item")
                vsc="$(kubectl get "$item" -o jsonpath='{.status.boundVolumeSnapshotContentName}' 2>/dev/null || true)"
                if [ -n "$vsc" ]; then
                    gone+=("volumesnapshotcontent/$vsc")
                    handle="$(kubectl get "volumesnapshotcontent/$vsc" -o jsonpath='{.status.snapshotHandle}' 2>/dev/null || true)"
                    [ -n "$handle" ] && files+=("$pool/snapshots/$handle.img" "$pool/snapshots/$handle.json")
                fi
                ;;
            pvc/*)
                claims+=("$item")
                pv="$(data_volume_of "${item#pvc/}" 2>/dev/null || true)"
                if [ -n "$pv" ]; then
                    gone+=("pv/$pv")
                    handle="$(data_handle_of "$pv" 2>/dev/null || true)"
                    [ -n "$handle" ] && files+=("$pool/volumes/$handle.img" "$pool/volumes/$handle.json")
                fi
                ;;
            *) fail "data_cleanup: cannot delete '$item'" ;;
        esac
    done
    if [ "${#pods[@]}" -gt 0 ]; then
        kubectl delete "${pods[@]}" --ignore-not-found --timeout=120s >/dev/null ||
            fail "cleanup: a pod is stuck deleting: $(kubectl get pods -o wide)"
    fi
    [ "${#snaps[@]}" -eq 0 ] || kubectl delete "${snaps[@]}" --ignore-not-found --wait=false >/dev/null
    [ "${#claims[@]}" -eq 0 ] || kubectl delete "${claims[@]}" --ignore-not-found --wait=false >/dev/null
    if [ "${#gone[@]}" -gt 0 ]; then
        kubectl wait --for=delete "${gone[@]}" --timeout=120s >/dev/null 2>&1 ||
            fail "cleanup: still there after 120 s: $(kubectl get "${gone[@]}" -o name 2>&1 | tr '\n' ' ')"
    fi
    left=""
    for item in "${files[@]}"; do [ -e "$item" ] && left="$left $item"; done
    [ -z "$left" ] || fail "cleanup: the pool still holds:$left"
}

# data_driver_pid: the host pid of the loopcsi process in the plugin pod (its containerd task).
data_driver_pid() {
    local id
    id="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node \
        -o jsonpath='{.items[0].status.containerStatuses[?(@.name=="loopcsi")].containerID}')"
    ctr_k8s tasks ls | awk -v id="${id#containerd://}" '$1 == id {print $2}'
}

# ---------------------------------------------------------------- xfs

scenario_xfs() {
    local mounts size
    write_then_read xfs fs loopcsi-xfs 'cat > /data/token' 'cat /data/token' 300Mi
    # shellcheck disable=SC2016  # awk reads the fields, in the pod
    mounts="$(kubectl exec xfs-app -- awk '$2 == "/data" {print $1, $3}' /proc/mounts)"
    size="$(data_size_kib xfs-app)"
    case "$mounts" in /dev/loop*" xfs") ;; *) fail "xfs: /data in xfs-app is '$mounts', not an xfs loop device" ;; esac
    pass "xfs: /data in xfs-app is '$mounts', $size KiB"
    data_cleanup pod/xfs-app pvc/xfs-pvc
}

# ---------------------------------------------------------------- snapshot and restore

# data_snapshot_restore PREFIX MODE WRITE READ: PREFIX-pvc written with a token; a VolumeSnapshot
# of it becomes ReadyToUse; the source is overwritten afterwards; a claim restored from the
# snapshot holds the token, not the later write.
data_snapshot_restore() {
    local prefix="$1" mode="$2" write="$3" read="$4" t=$SECONDS token got vm vsc handle
    vm="$([ "$mode" = block ] && echo Block || echo Filesystem)"
    write_then_read "$prefix" "$mode" loopcsi-ext4 "$write" "$read"
    token="$(data_logs "$prefix-app")"
    t=$SECONDS
    data_snapshot "$prefix-snap" "$prefix-pvc"
    until_true 120 "$prefix-snap ReadyToUse" data_snapshot_ready "$prefix-snap" ||
        fail "snapshot: $prefix-snap is not ReadyToUse after 120 s: $(kubectl describe volumesnapshot "$prefix-snap" | tail -8)"
    vsc="$(kubectl get volumesnapshot "$prefix-snap" -o jsonpath='{.status.boundVolumeSnapshotContentName}')"
    handle="$(kubectl get volumesnapshotcontent "$vsc" -o jsonpath='{.status.snapshotHandle}')"
    [ -f "$pool/snapshots/$handle.img" ] || fail "snapshot: $prefix-snap is ready but $pool/snapshots/$handle.img does not exist"
    pass "snapshot ($mode): $prefix-snap ReadyToUse in $((SECONDS - t)) s, restoreSize $(kubectl get volumesnapshot "$prefix-snap" -o jsonpath='{.status.restoreSize}'), content $vsc, snapshots/$handle.img in the pool"

    # The source changes after the snapshot: the restore must show the data of the snapshot.
    kubectl exec "$prefix-app" -- sh -c "echo overwritten | $write && sync" ||
        fail "snapshot: could not overwrite $prefix-pvc"
    t=$SECONDS
    data_claim "$prefix-restored-pvc" loopcsi-ext4 "$vm" 64Mi VolumeSnapshot "$prefix-snap"
    app_pod "$prefix-restored" "$prefix-restored-pvc" "$mode" "$read; while true; do sleep 1; done"
    wait_phase "$prefix-restored" Running
    until_true 30 "$prefix-restored log" has_log "$prefix-restored" || true
    got="$(data_logs "$prefix-restored")"
    [ "$got" = "$token" ] || fail "snapshot: the restored volume reads '$got', not the snapshot's '$token'"
    pass "restore ($mode): $prefix-restored-pvc from $prefix-snap reads '$got' (the source now holds 'overwritten'); pod Running $((SECONDS - t)) s after the claim"
    data_cleanup "pod/$prefix-app" "pod/$prefix-restored" "volumesnapshot/$prefix-snap" \
        "pvc/$prefix-pvc" "pvc/$prefix-restored-pvc"
}

scenario_snapshot() {
    data_snapshot_restore snap fs 'cat > /data/token' 'cat /data/token'
    data_snapshot_restore bsnap block 'dd of=/dev/xvda bs=512 count=1 conv=sync 2>/dev/null' \
        'dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1'
}

# ---------------------------------------------------------------- clone

scenario_clone() {
    local t token got src clone
    write_then_read clsrc fs loopcsi-ext4 'cat > /data/token' 'cat /data/token'
    token="$(data_logs clsrc-app)"
    t=$SECONDS
    data_claim clone-pvc loopcsi-ext4 Filesystem 64Mi PersistentVolumeClaim clsrc-pvc
    app_pod clone-app clone-pvc fs "cat /data/token; while true; do sleep 1; done"
    wait_phase clone-app Running
    until_true 30 "clone-app log" has_log clone-app || true
    got="$(data_logs clone-app)"
    [ "$got" = "$token" ] || fail "clone: clone-pvc reads '$got', not the source's '$token'"
    src="$(data_volume_of clsrc-pvc)"
    clone="$(data_volume_of clone-pvc)"
    [ "$src" != "$clone" ] || fail "clone: clone-pvc is bound to the source's volume $src"
    pass "clone: clone-pvc ($clone) of clsrc-pvc ($src) reads '$got'; pod Running $((SECONDS - t)) s after the claim"

    # The two are independent: what one writes the other does not see.
    kubectl exec clone-app -- sh -c 'echo clone > /data/token && echo x > /data/only-clone && sync'
    kubectl exec clsrc-app -- sh -c 'echo x > /data/only-source && sync'
    got="$(kubectl exec clsrc-app -- sh -c 'cat /data/token; ls /data | tr "\n" " "')"
    case "$got" in "$token"*only-clone*) fail "clone: the source sees the clone's file: $got" ;; "$token"*) ;;
        *) fail "clone: the source's token changed after a write to the clone: $got" ;; esac
    local other
    other="$(kubectl exec clone-app -- sh -c 'cat /data/token; ls /data | tr "\n" " "')"
    case "$other" in *only-source*) fail "clone: the clone sees the source's file: $other" ;; clone*) ;;
        *) fail "clone: the clone lost its own write: $other" ;; esac
    pass "clone: independent after the clone: source reads [$(echo "$got" | tr '\n' ' ')], clone reads [$(echo "$other" | tr '\n' ' ')]"
    data_cleanup pod/clone-app pod/clsrc-app pvc/clone-pvc pvc/clsrc-pvc
}

# ---------------------------------------------------------------- expansion

# data_resize_done PVC SIZE: the claim reports SIZE and no resize is pending or failed (the
# claim's other conditions, such as Unused, do not matter here).
data_resize_done() {
    local got
    got="$(kubectl get pvc "$1" -o jsonpath='{.status.capacity.storage} [{.status.allocatedResourceStatuses}] {.status.conditions[*].type}')"
    case "$got" in "$2 [] "*) ;; *) return 1 ;; esac
    ! grep -qwE 'Resizing|FileSystemResizePending|ControllerResizeError|NodeResizeError' <<<"$got"
}
data_resize_state() {
    kubectl get pvc "$1" -o jsonpath='capacity {.status.capacity.storage}, conditions [{range .status.conditions[*]}{.type}: {.message}; {end}], allocatedResourceStatuses {.status.allocatedResourceStatuses}'
}
data_resize_error() {
    kubectl get pvc exp4-pvc -o jsonpath='{.status.conditions[?(@.type=="NodeResizeError")].message}'
}
data_resize_error_names() { grep -q "$1" <<<"$(data_resize_error)"; }
data_grown_or_refused() { data_size_at_least "$1" "$2" || data_resize_error_names CAP_SYS_RESOURCE; }
data_size_at_least() { [ "$(data_size_kib "$1")" -ge "$2" ]; }
data_resize() {
    kubectl patch pvc "$1" --type merge -p "{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"$2\"}}}}" >/dev/null ||
        fail "expansion: the resize of $1 to $2 was refused"
}

scenario_expansion_xfs() {
    local t uid before after
    pvc exp-xfs-pvc loopcsi-xfs Filesystem 300Mi
    app_pod exp-xfs-app exp-xfs-pvc fs 'while true; do sleep 1; done'
    wait_phase exp-xfs-app Running
    uid="$(kubectl get pod exp-xfs-app -o jsonpath='{.metadata.uid}')"
    before="$(data_size_kib exp-xfs-app)" || fail "expansion_xfs: df in exp-xfs-app failed"
    t=$SECONDS
    data_resize exp-xfs-pvc 500Mi
    # 200 MiB more, less what xfs keeps for itself.
    until_true 180 "exp-xfs-app sees the grown file system" data_size_at_least exp-xfs-app $((before + 190 * 1024)) ||
        fail "expansion_xfs: the pod still sees $(data_size_kib exp-xfs-app) KiB (was $before) 180 s after the resize; claim: $(data_resize_state exp-xfs-pvc)"
    after="$(data_size_kib exp-xfs-app)"
    until_true 60 "exp-xfs-pvc resized" data_resize_done exp-xfs-pvc 500Mi ||
        fail "expansion_xfs: the pod sees $after KiB but the claim says: $(data_resize_state exp-xfs-pvc)"
    [ "$(kubectl get pod exp-xfs-app -o jsonpath='{.metadata.uid} {.status.containerStatuses[0].restartCount}')" = "$uid 0" ] ||
        fail "expansion_xfs: the pod was replaced or restarted during the online expansion"
    pass "expansion_xfs: online 300Mi -> 500Mi while exp-xfs-app ran (same pod, 0 restarts): df $before -> $after KiB in $((SECONDS - t)) s; claim $(data_resize_state exp-xfs-pvc)"
    data_cleanup pod/exp-xfs-app pvc/exp-xfs-pvc
}

# The kernel lets only CAP_SYS_RESOURCE grow a mounted ext4. Where the driver has it, the growth is
# online; where it has not (this machine drops it from every process), the online attempt must
# fail visibly, saying why, and the growth must happen offline: at the next stage.
scenario_expansion_ext4() {
    local t pid caps online before after message
    pvc exp4-pvc loopcsi-ext4 Filesystem 64Mi
    app_pod exp4-app exp4-pvc fs 'while true; do sleep 1; done'
    wait_phase exp4-app Running
    before="$(data_size_kib exp4-app)" || fail "expansion_ext4: df in exp4-app failed"
    pid="$(data_driver_pid)"
    [ -n "$pid" ] || fail "expansion_ext4: cannot find the driver's process"
    caps="$(awk '$1 == "CapEff:" {print $2}' "/proc/$pid/status")"
    # CAP_SYS_RESOURCE is capability 24.
    if (((16#$caps >> 24) & 1)); then online=yes; else online=no; fi
    log "expansion_ext4: driver pid $pid CapEff $caps: CAP_SYS_RESOURCE $online"
    t=$SECONDS
    data_resize exp4-pvc 128Mi
    if [ "$online" = yes ]; then
        until_true 180 "exp4-app sees the grown file system" data_size_at_least exp4-app $((before + 48 * 1024)) ||
            fail "expansion_ext4: the driver has CAP_SYS_RESOURCE but the pod still sees $(data_size_kib exp4-app) KiB (was $before); claim: $(data_resize_state exp4-pvc)"
        until_true 60 "exp4-pvc resized" data_resize_done exp4-pvc 128Mi ||
            fail "expansion_ext4: claim after the online growth: $(data_resize_state exp4-pvc)"
        pass "expansion_ext4: online 64Mi -> 128Mi: df $before -> $(data_size_kib exp4-app) KiB in $((SECONDS - t)) s"
    else
        # What the user sees: the claim's NodeResizeError condition, with the driver's reason.
        until_true 180 "exp4-pvc reports why the online growth failed" data_resize_error_names CAP_SYS_RESOURCE ||
            fail "expansion_ext4: no NodeResizeError naming CAP_SYS_RESOURCE 180 s after the resize; claim: $(data_resize_state exp4-pvc)"
        after="$(data_size_kib exp4-app)"
        [ "$after" = "$before" ] || fail "expansion_ext4: the file system changed size ($before -> $after KiB) although the growth was refused"
        [ "$(kubectl get pvc exp4-pvc -o jsonpath='{.status.capacity.storage}')" = 64Mi ] ||
            fail "expansion_ext4: the claim reports a new capacity although the growth failed: $(data_resize_state exp4-pvc)"
        pass "expansion_ext4: online growth refused (driver lacks CAP_SYS_RESOURCE), the claim says so in $((SECONDS - t)) s and still reports 64Mi, the pod still sees $after KiB: \"$(data_resize_error | tr '\n' ' ')\""
        # Offline: the pod goes (the volume is unstaged); the next stage grows the file system
        # before mounting it.
        t=$SECONDS
        data_cleanup pod/exp4-app
        app_pod exp4-app exp4-pvc fs 'while true; do sleep 1; done'
        wait_phase exp4-app Running
        after="$(data_size_kib exp4-app)"
        [ "$after" -ge $((before + 48 * 1024)) ] ||
            fail "expansion_ext4: after the pod's restart the file system is $after KiB (was $before); claim: $(data_resize_state exp4-pvc)"
        until_true 60 "exp4-pvc resized" data_resize_done exp4-pvc 128Mi ||
            fail "expansion_ext4: the pod sees $after KiB but the claim says: $(data_resize_state exp4-pvc)"
        pass "expansion_ext4: offline growth at the next stage: a new pod sees $before -> $after KiB, $((SECONDS - t)) s from the old pod's deletion; claim $(data_resize_state exp4-pvc)"
    fi

    # Offline from the start: the claim is resized while no pod uses it. The kubelet calls
    # NodeExpandVolume only after it staged and published the volume for the next pod, so on a
    # node without CAP_SYS_RESOURCE that call (which grows the image) is refused like an online
    # one: the pod runs at the old size, the claim says why, and the pod after it gets the size.
    before="$(data_size_kib exp4-app)"
    data_cleanup pod/exp4-app
    t=$SECONDS
    data_resize exp4-pvc 192Mi
    app_pod exp4-app exp4-pvc fs 'while true; do sleep 1; done'
    wait_phase exp4-app Running
    until_true 60 "exp4-app grown, or the claim refused" data_grown_or_refused exp4-app $((before + 48 * 1024)) ||
        fail "expansion_ext4: resized to 192Mi while unused, the next pod sees $(data_size_kib exp4-app) KiB (was $before) and the claim says: $(data_resize_state exp4-pvc)"
    if ! data_size_at_least exp4-app $((before + 48 * 1024)); then
        [ "$online" = no ] || fail "expansion_ext4: the driver has CAP_SYS_RESOURCE but the growth was refused: $(data_resize_error)"
        after="$(data_size_kib exp4-app)"
        [ "$after" = "$before" ] || fail "expansion_ext4: the file system changed size ($before -> $after KiB) although the growth was refused"
        pass "expansion_ext4: resized 128Mi -> 192Mi while unused: the next pod runs at the old size ($after KiB), $((SECONDS - t)) s after the resize, and the claim says why: \"$(data_resize_error | tr '\n' ' ')\""
        t=$SECONDS
        data_cleanup pod/exp4-app
        app_pod exp4-app exp4-pvc fs 'while true; do sleep 1; done'
        wait_phase exp4-app Running
        data_size_at_least exp4-app $((before + 48 * 1024)) ||
            fail "expansion_ext4: the second pod after the resize to 192Mi sees $(data_size_kib exp4-app) KiB (was $before); claim: $(data_resize_state exp4-pvc)"
    fi
    until_true 60 "exp4-pvc resized" data_resize_done exp4-pvc 192Mi ||
        fail "expansion_ext4: the pod sees the new size but the claim says: $(data_resize_state exp4-pvc)"
    pass "expansion_ext4: resized 128Mi -> 192Mi while unused: a pod sees $before -> $(data_size_kib exp4-app) KiB, Running $((SECONDS - t)) s after the resize (or after the previous pod's deletion); claim $(data_resize_state exp4-pvc)"
    data_cleanup pod/exp4-app pvc/exp4-pvc
}

# ---------------------------------------------------------------- ReadWriteOncePod

scenario_rwop() {
    local t message
    pvc rwop-pvc loopcsi-ext4 Filesystem 64Mi ReadWriteOncePod
    app_pod rwop-a rwop-pvc fs 'echo written-by-a > /data/a && sync; while true; do sleep 1; done'
    wait_phase rwop-a Running
    app_pod rwop-b rwop-pvc fs 'cat /data/a; while true; do sleep 1; done'
    until_true 60 "rwop-b refused by the scheduler" data_unschedulable rwop-b ReadWriteOncePod ||
        fail "rwop: rwop-b is $(pod_phase rwop-b) ('$(data_scheduling_message rwop-b)'), not Pending for ReadWriteOncePod"
    message="$(data_scheduling_message rwop-b)"
    phase_is rwop-a Running || fail "rwop: rwop-a is $(pod_phase rwop-a) while rwop-b waits"
    pass "rwop: rwop-b stays Pending while rwop-a runs: \"$message\""
    t=$SECONDS
    data_cleanup pod/rwop-a
    wait_phase rwop-b Running
    until_true 30 "rwop-b log" data_logs_are rwop-b written-by-a ||
        fail "rwop: rwop-b read '$(data_logs rwop-b)', not 'written-by-a'"
    pass "rwop: rwop-b Running $((SECONDS - t)) s after rwop-a's deletion began, reads 'written-by-a'"
    data_cleanup pod/rwop-b pvc/rwop-pvc
}

# ---------------------------------------------------------------- fsGroup

scenario_fsgroup() {
    local t=$SECONDS got
    pvc fsg-pvc loopcsi-ext4 Filesystem 64Mi
    kubectl apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: fsg-app, namespace: default}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 5
  securityContext: {runAsUser: 1000, runAsGroup: 1000, fsGroup: 2000}
  containers:
    - name: app
      image: loopcsi.dev/e2e/busybox:1.35
      imagePullPolicy: Never
      command:
        - sh
        - -c
        - >-
          trap "exit 0" TERM;
          mkdir /data/dir && echo hello > /data/dir/file && sync &&
          echo "id: $(id -u) $(id -G)" &&
          stat -c '%n %u:%g %A' /data /data/dir /data/dir/file ||
          echo "WRITE FAILED";
          while true; do sleep 1; done
      volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: fsg-pvc}}]
EOF
    wait_phase fsg-app Running
    until_true 30 "fsg-app log" has_log fsg-app || true
    got="$(data_logs fsg-app)"
    # The pod's user is not root and not in the volume's original group: it can write only
    # because the kubelet gave the volume to group 2000 (group-writable, setgid), and the setgid
    # bit makes what it creates group 2000 too.
    ! grep -q 'WRITE FAILED' <<<"$got" || fail "fsgroup: uid 1000 with fsGroup 2000 could not write to the volume: $(tr '\n' ' ' <<<"$got")"
    grep -qx 'id: 1000 1000 2000' <<<"$got" || fail "fsgroup: the pod runs as '$got', not uid 1000 with groups 1000 2000"
    grep -qx '/data 0:2000 drwxrwsr-x' <<<"$got" || fail "fsgroup: the volume root is not group 2000 with setgid: $got"
    grep -qx '/data/dir 1000:2000 drwxr-sr-x' <<<"$got" || fail "fsgroup: the pod's directory is not 1000:2000 setgid: $got"
    grep -qx '/data/dir/file 1000:2000 -rw-r--r--' <<<"$got" || fail "fsgroup: the pod's file is not 1000:2000: $got"
    pass "fsgroup: runAsUser 1000 / fsGroup 2000 wrote to the volume: $(printf '%s' "$got" | tr '\n' ';'); $((SECONDS - t)) s"
    data_cleanup pod/fsg-app pvc/fsg-pvc
}

# ---------------------------------------------------------------- storage capacity

# data_capacities: one line per CSIStorageCapacity of the driver's namespace: "class node bytes".
data_capacities() {
    kubectl -n loopcsi get csistoragecapacities -o json | python3 -c '
import json, sys
from decimal import Decimal
units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
def q(s):
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return int(Decimal(s[:-len(u)]) * f)
    return int(Decimal(s))
for o in json.load(sys.stdin)["items"]:
    node = o.get("nodeTopology", {}).get("matchLabels", {}).get("topology.loopcsi.dev/node", "-")
    print(o["storageClassName"], node, q(o.get("capacity", "0")))'
}
# data_capacity CLASS: the capacity published for CLASS on this node, in bytes.
data_capacity() { data_capacities | awk -v c="$1" -v n="$node" '$1 == c && $2 == n {print $3}'; }
data_pool_avail() { df -B1 --output=avail "$pool" | tail -1 | tr -d ' '; }
data_all_published() {
    local c
    for c in loopcsi-ext4 loopcsi-xfs loopcsi-thick; do [ -n "$(data_capacity "$c")" ] || return 1; done
}
data_capacity_below() { [ "$(data_capacity loopcsi-ext4)" -le "$1" ]; }
data_capacity_above() { [ "$(data_capacity loopcsi-ext4)" -ge "$1" ]; }

scenario_capacity() {
    local t=$SECONDS c cap avail diff lines before low images big
    local gib=$((1 << 30)) slack=$((2 << 30))
    until_true 120 "a CSIStorageCapacity per StorageClass" data_all_published ||
        fail "capacity: not every class has a CSIStorageCapacity for node $node: $(data_capacities | tr '\n' ';')"
    lines="$(data_capacities | tr '\n' ';')"
    # The provisioner polls every minute and after each CreateVolume and DeleteVolume; the pool's
    # file system is shared with the rest of the machine, so the published figure may be up to a
    # poll behind, while other work on the machine writes: it must match df within 2 GiB.
    avail="$(data_pool_avail)"
    for c in loopcsi-ext4 loopcsi-xfs loopcsi-thick; do
        cap="$(data_capacity "$c")"
        diff=$((cap > avail ? cap - avail : avail - cap))
        [ "$diff" -le "$slack" ] || fail "capacity: $c publishes $cap bytes, df of the pool says $avail available"
    done
    pass "capacity: published for every class on $node: $lines df of $pool: $avail bytes available"

    # It tracks the pool: a thick volume of 8 GiB takes 8 GiB of it at once.
    before="$(data_capacity loopcsi-ext4)"
    pvc cap-thick-pvc loopcsi-thick Filesystem 8Gi
    app_pod cap-thick cap-thick-pvc fs 'while true; do sleep 1; done'
    wait_phase cap-thick Running
    until_true 90 "the capacity drops by the thick volume" data_capacity_below $((before - 8 * gib + slack)) ||
        fail "capacity: $(data_capacity loopcsi-ext4) bytes published after an 8 GiB thick volume was allocated (before: $before)"
    low="$(data_capacity loopcsi-ext4)"
    avail="$(data_pool_avail)"
    pass "capacity: an 8Gi thick volume took the published capacity of loopcsi-ext4 from $before to $low bytes (df: $avail available)"
    data_cleanup pod/cap-thick pvc/cap-thick-pvc
    until_true 90 "the capacity grows back" data_capacity_above $((low + 8 * gib - slack)) ||
        fail "capacity: $(data_capacity loopcsi-ext4) bytes published after the thick volume was deleted (was $low)"
    pass "capacity: back to $(data_capacity loopcsi-ext4) bytes after its deletion"

    # A claim larger than the capacity: the scheduler keeps its pod Pending, nothing is created.
    images="$(find "$pool" -name '*.img' | sort)"
    big="$(((before / gib) + 16))Gi"
    pvc cap-big-pvc loopcsi-ext4 Filesystem "$big"
    app_pod cap-big cap-big-pvc fs 'while true; do sleep 1; done'
    until_true 60 "cap-big refused for storage" data_unschedulable cap-big 'did not have enough free storage' ||
        fail "capacity: cap-big is $(pod_phase cap-big) ('$(data_scheduling_message cap-big)'), not Pending for lack of storage"
    [ "$(kubectl get pvc cap-big-pvc -o jsonpath='{.status.phase}')" = Pending ] || fail "capacity: cap-big-pvc was bound"
    [ "$(find "$pool" -name '*.img' | sort)" = "$images" ] || fail "capacity: the pool changed for a claim that cannot fit"
    pass "capacity: a $big claim (capacity $(data_capacity loopcsi-ext4) bytes) keeps cap-big Pending: \"$(data_scheduling_message cap-big)\"; claim Pending, nothing created in the pool; $((SECONDS - t)) s"
    data_cleanup pod/cap-big pvc/cap-big-pvc
}

# ---------------------------------------------------------------- metrics

# data_scrape PORT PATH: the body of http://<plugin pod>:PORT/PATH, fetched inside the run's
# network namespace (the pod's address is on its bridge).
data_scrape() {
    local ip
    ip="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o jsonpath='{.items[0].status.podIP}')"
    in_ns python3 -c '
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    sys.stdout.write(r.read().decode())' "http://$ip:$1/$2"
}
# data_metric TEXT NAME: the value of the sample NAME (with its labels, as printed) in TEXT.
data_metric() { printf '%s\n' "$1" | awk -v m="$2" '$1 == m {print $2}'; }
data_gauges() {
    local text="$1" m out=""
    for m in 'loopcsi_volumes{state="created"}' 'loopcsi_volumes{state="staged"}' \
        'loopcsi_volumes{state="published"}' loopcsi_snapshots loopcsi_loop_devices_attached; do
        out="$out $(data_metric "$text" "$m")"
    done
    echo "${out# }"
}

scenario_metrics() {
    local t=$SECONDS base text now want port body ops images loops m
    local -a b
    text="$(data_scrape 9898 metrics)" || fail "metrics: :9898/metrics does not answer"
    base="$(data_gauges "$text")"
    read -r -a b <<<"$base"
    [ "${#b[@]}" = 5 ] || fail "metrics: the gauges are missing from :9898/metrics: '$base'"
    # Two volumes, published, and a snapshot.
    write_then_read met-fs fs loopcsi-ext4 'cat > /data/token' 'cat /data/token'
    write_then_read met-blk block loopcsi-ext4 'dd of=/dev/xvda bs=512 count=1 conv=sync 2>/dev/null' \
        'dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1'
    data_snapshot met-snap met-fs-pvc
    until_true 120 "met-snap ReadyToUse" data_snapshot_ready met-snap || fail "metrics: met-snap is not ready"
    text="$(data_scrape 9898 metrics)"
    now="$(data_gauges "$text")"
    want="$((b[0] + 2)) $((b[1] + 2)) $((b[2] + 2)) $((b[3] + 1)) $((b[4] + 2))"
    [ "$now" = "$want" ] ||
        fail "metrics: volumes created/staged/published, snapshots, loop devices: '$now', expected '$want' (before: '$base')"
    images="$(find "$pool/volumes" -name '*.img' | wc -l)"
    loops="$(our_loops | wc -l)"
    [ "$(data_metric "$text" 'loopcsi_volumes{state="created"}')" = "$images" ] ||
        fail "metrics: loopcsi_volumes{state=\"created\"} is not the $images images of the pool"
    [ "$(data_metric "$text" loopcsi_loop_devices_attached)" = "$loops" ] ||
        fail "metrics: loopcsi_loop_devices_attached is not the $loops loop devices backed by the pool"
    [ "$(data_metric "$text" loopcsi_pool_capacity_bytes)" = "$(df -B1 --output=size "$pool" | tail -1 | tr -d ' ')" ] ||
        fail "metrics: loopcsi_pool_capacity_bytes is not the size df gives for $pool"
    for m in CreateVolume NodeStageVolume NodePublishVolume CreateSnapshot; do
        [ -n "$(data_metric "$text" "loopcsi_rpc_requests_total{method=\"$m\",code=\"Ok\"}")" ] ||
            fail "metrics: no loopcsi_rpc_requests_total for $m with code Ok"
    done
    ops="$(printf '%s\n' "$text" | awk '/^loopcsi_rpc_requests_total/ {sub(/loopcsi_rpc_requests_total/, ""); printf "%s=%s ", $1, $2}')"
    pass "metrics: :9898 lists the 2 volumes and the snapshot made here (created staged published snapshots loop-devices: $base -> $now; $images images, $loops loop devices in the pool); pool $(data_metric "$text" loopcsi_pool_capacity_bytes) bytes as df says; rpc_requests_total $ops"

    # The sidecars: each serves its metrics, and the CSI calls it made are counted there.
    local found=""
    for port in 9810:CreateVolume 9811: 9812:CreateSnapshot; do
        body="$(data_scrape "${port%%:*}" metrics)" || fail "metrics: :${port%%:*}/metrics does not answer"
        # A here-string, not a pipe: grep -q stops reading at the first match, and the writer of a
        # pipe would then fail with SIGPIPE (pipefail) on a body larger than the pipe's buffer.
        grep -q '^csi_sidecar_operations_seconds' <<<"$body" ||
            fail "metrics: :${port%%:*}/metrics has no csi_sidecar_operations_seconds"
        if [ -n "${port#*:}" ]; then
            grep -q "method_name=\"/csi.v1.Controller/${port#*:}\"" <<<"$body" ||
                fail "metrics: :${port%%:*}/metrics does not count ${port#*:}"
        fi
        found="$found :${port%%:*} $(grep -c '^csi_sidecar_operations_seconds_count' <<<"$body") operation series;"
    done
    for port in 9808 9809; do
        data_scrape "$port" healthz >/dev/null || fail "metrics: :$port/healthz does not answer"
    done
    pass "metrics: sidecars answer:$found :9808/healthz and :9809/healthz OK"
    data_cleanup pod/met-fs-app pod/met-blk-app volumesnapshot/met-snap pvc/met-fs-pvc pvc/met-blk-pvc
    now="$(data_gauges "$(data_scrape 9898 metrics)")"
    [ "$now" = "$base" ] || fail "metrics: after the cleanup the gauges are '$now', not '$base'"
    pass "metrics: back to '$now' after the cleanup; $((SECONDS - t)) s"
}
