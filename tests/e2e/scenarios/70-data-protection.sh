# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# Group snapshots as backup tools use them (issue 15): a VolumeGroupSnapshot of two claims of a
# running pod, restored member by member (changed-block tracking is in 71-cbt.sh). A driver
# without the group controller fails the scenario at once, naming the missing capability,
# instead of waiting out a timeout. Run only the data protection scenarios with
# E2E_ONLY='group_snapshot|cbt'.
E2E_SCENARIOS+=(group_snapshot)

# The label with which csi-snapshotter --node-deployment selects the objects of its node.
dp_managed_by=snapshot.storage.kubernetes.io/managed-by

# dp_snapshotter_says TEXT: the plugin's csi-snapshotter logged TEXT.
dp_snapshotter_says() {
    kubectl -n loopcsi logs ds/loopcsi-node -c csi-snapshotter 2>/dev/null | grep -F -- "$1"
}

# dp_group_ready NAME: the group snapshot NAME is ReadyToUse. Nothing labels its objects here:
# the plugin's snapshot-router puts the managed-by label of the members' node on the group
# content, its member contents and the class (docs/kubernetes.md, "Group snapshots").
dp_group_ready() {
    [ "$(kubectl get volumegroupsnapshot "$1" -o jsonpath='{.status.readyToUse}')" = true ]
}

# dp_group_content NAME: the VolumeGroupSnapshotContent bound to the group snapshot NAME.
dp_group_content() {
    kubectl get volumegroupsnapshot "$1" -o jsonpath='{.status.boundVolumeGroupSnapshotContentName}'
}

# dp_managed_by_of KIND/NAME: the managed-by label of an object (empty when unlabelled).
dp_managed_by_of() {
    kubectl get "$1" -o jsonpath="{.metadata.labels.${dp_managed_by//./\\.}}" 2>/dev/null
}

# dp_group_error NAME: the error the snapshot controller or sidecar recorded, if any.
dp_group_error() { kubectl get volumegroupsnapshot "$1" -o jsonpath='{.status.error.message}' 2>/dev/null; }

# dp_members NAME: the VolumeSnapshots the group snapshot NAME made.
dp_members() {
    kubectl get volumesnapshot -o jsonpath="{range .items[?(@.status.volumeGroupSnapshotName==\"$1\")]}{.metadata.name}{'\n'}{end}"
}

# dp_app NAME NODE TOKEN_A TOKEN_B CLAIM_A CLAIM_B: a pod on NODE writing a token to each claim
# and staying up (the group snapshot is of mounted volumes).
dp_app() {
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: default}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 5
  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$2]}]}]}}}
  containers:
    - name: app
      image: loopcsi.dev/e2e/busybox:1.35
      imagePullPolicy: Never
      command: [sh, -c, 'trap "exit 0" TERM; echo $3 > /a/token; echo $4 > /b/token; sync; echo written; while true; do sleep 1; done']
      volumeMounts: [{name: a, mountPath: /a}, {name: b, mountPath: /b}]
  volumes:
    - {name: a, persistentVolumeClaim: {claimName: $5}}
    - {name: b, persistentVolumeClaim: {claimName: $6}}
EOF
}

# dp_restore_each SCENARIO NODE TOKENS MEMBER...: restores each member VolumeSnapshot to a claim
# that a pod (on NODE; anywhere when NODE is empty) reads, and fails unless each holds one of
# TOKENS (space-separated), no two the same. Appends to the caller's `restored` and `cleanup`
# (bash locals are visible to the functions a function calls).
dp_restore_each() {
    local scenario=$1 on=$2 tokens=" $3 " m got
    shift 3
    for m in "$@"; do
        data_claim "$m-restored" loopcsi-ext4 Filesystem 64Mi VolumeSnapshot "$m"
        if [ -n "$on" ]; then
            placed_pod "$m-reader" "$m-restored" required "$on" 'cat /data/token; while true; do sleep 1; done'
        else
            app_pod "$m-reader" "$m-restored" fs 'cat /data/token; while true; do sleep 1; done'
        fi
        wait_phase "$m-reader" Running
        until_true 30 "$m-reader log" has_log "$m-reader" || true
        got="$(data_logs "$m-reader")"
        case "$tokens" in *" $got "*) ;; *) fail "$scenario: the claim restored from $m reads '$got', not a token its source's pod wrote" ;; esac
        restored+=("$got")
        cleanup+=("pod/$m-reader" "pvc/$m-restored")
    done
    [ "${restored[0]}" != "${restored[1]}" ] || fail "$scenario: both members restore to '${restored[0]}'"
}

# ---------------------------------------------------------------- group snapshot

scenario_group_snapshot() {
    local t token_a token_b members m got restored=() cleanup=() msg
    # Fail fast on a driver without the group controller: csi-snapshotter says so at start, as
    # an error when the driver serves no GroupController (Unimplemented) or as a warning when
    # it lacks the capability.
    if msg="$(dp_snapshotter_says 'error determining if driver supports create/delete group snapshot')" ||
        msg="$(dp_snapshotter_says 'does not support GroupControllerCreateVolumeGroupSnapshot')"; then
        fail "group_snapshot: driver lacks GROUP_CONTROLLER_SERVICE (CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT); csi-snapshotter: $msg"
    fi
    if msg="$(dp_snapshotter_says 'VolumeGroupSnapshot CRDs were not found')"; then
        fail "group_snapshot: csi-snapshotter runs without group snapshots: $msg"
    fi
    token_a="group-a-$RANDOM" token_b="group-b-$RANDOM"
    pvc gs-a-pvc loopcsi-ext4 Filesystem
    pvc gs-b-pvc loopcsi-ext4 Filesystem
    kubectl label pvc gs-a-pvc gs-b-pvc loopcsi-e2e-group=gs >/dev/null
    # One pod writes both claims and keeps running: the group snapshot is of mounted volumes.
    dp_app gs-app "$node" "$token_a" "$token_b" gs-a-pvc gs-b-pvc
    wait_phase gs-app Running
    until_true 30 "gs-app wrote" has_log gs-app || fail "group_snapshot: gs-app wrote nothing"
    t=$SECONDS
    kubectl apply -f - >/dev/null <<EOF
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: gs, namespace: default}
spec:
  volumeGroupSnapshotClassName: loopcsi-group-snapshot
  source: {selector: {matchLabels: {loopcsi-e2e-group: gs}}}
EOF
    if ! until_true 120 "gs ReadyToUse" dp_group_ready gs; then
        fail "group_snapshot: gs is not ReadyToUse after 120 s (error: '$(dp_group_error gs)'): $(kubectl describe volumegroupsnapshot gs | tail -8)"
    fi
    mapfile -t members < <(dp_members gs)
    [ "${#members[@]}" = 2 ] || fail "group_snapshot: gs made ${#members[@]} VolumeSnapshots (${members[*]}), not 2"
    for m in "${members[@]}"; do
        until_true 60 "$m ReadyToUse" data_snapshot_ready "$m" || fail "group_snapshot: member $m is not ReadyToUse"
    done
    got="$(dp_managed_by_of "volumegroupsnapshotcontent/$(dp_group_content gs)")"
    [ "$got" = "$node" ] || fail "group_snapshot: the group content of gs is labelled for '$got', not $node"
    pass "group_snapshot: gs of gs-a-pvc and gs-b-pvc (mounted by the running gs-app) ReadyToUse in $((SECONDS - t)) s with members ${members[*]}, routed to $node by the snapshot-router"

    # Each member restores to a claim holding its source's token, not the other's.
    kubectl exec gs-app -- sh -c 'echo overwritten > /a/token; echo overwritten > /b/token; sync'
    dp_restore_each group_snapshot "" "$token_a $token_b" "${members[@]}"
    pass "group_snapshot: restored ${members[0]} reads '${restored[0]}', ${members[1]} reads '${restored[1]}' (the sources now hold 'overwritten')"
    # The group snapshot's members go with it (deletionPolicy Delete).
    kubectl delete volumegroupsnapshot gs --wait=false >/dev/null
    until_true 120 "gs members gone" dp_members_gone gs || fail "group_snapshot: the members of gs outlive it: $(dp_members gs | tr '\n' ' ')"
    data_cleanup pod/gs-app "${cleanup[@]}" pvc/gs-a-pvc pvc/gs-b-pvc
}

dp_members_gone() { [ -z "$(dp_members "$1")" ] && ! kubectl get volumegroupsnapshot "$1" >/dev/null 2>&1; }
