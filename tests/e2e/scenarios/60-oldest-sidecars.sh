# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# The oldest external-provisioner loopcsi supports, $OLDEST_PROVISIONER_VERSION (built by build.sh,
# imported as loopcsi.dev/e2e/csi-provisioner:<version>), swapped into the DaemonSet in place of
# the pinned one. It is built on csi-lib-utils v0.20.0 with CSI spec v1.11: its gRPC log
# interceptor panics on GET_SNAPSHOT, a capability number its spec does not name. So the
# scenario shows that crash first, then sets the driver's --no-get-snapshot-capability, checks
# that the old provisioner starts and stays up and provisions and deletes a volume, and puts the
# pinned image and the original arguments back.
E2E_SCENARIOS+=(oldest_provisioner)

# ds_field JSONPATH: a field of the DaemonSet.
ds_field() { kubectl -n loopcsi get ds loopcsi-node -o jsonpath="$1"; }

# container_index NAME: NAME's index in the pod template's containers (for JSON patches).
container_index() {
    local i=0 c
    for c in $(ds_field '{.spec.template.spec.containers[*].name}'); do
        [ "$c" = "$1" ] && { echo "$i"; return 0; }
        i=$((i + 1))
    done
    return 1
}

plugin_pod_name() {
    kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o jsonpath='{.items[0].metadata.name}'
}

provisioner_status() {
    kubectl -n loopcsi get pod "$1" -o jsonpath="{.status.containerStatuses[?(@.name==\"csi-provisioner\")].$2}"
}

# A plugin pod other than OLD whose provisioner container has already restarted.
provisioner_crashed_in_new_pod() {
    local old="$1" pods name restarts
    pods="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o name)"
    [ "$(echo "$pods" | wc -l)" = 1 ] || return 1
    name="${pods#pod/}"
    [ -n "$name" ] && [ "$name" != "$old" ] || return 1
    restarts="$(provisioner_status "$name" restartCount)"
    [ "${restarts:-0}" -ge 1 ]
}

# provisioner_panic_logged POD FILE: the provisioner's log in POD (the dead container's, or the
# current one's once it has died again: the kubelet keeps only the last dead container) shows
# the panic; the log is saved in FILE.
provisioner_panic_logged() {
    local previous
    for previous in --previous=true --previous=false; do
        kubectl -n loopcsi logs "$1" -c csi-provisioner "$previous" >"$2" 2>&1 || continue
        grep -q 'nil pointer dereference' "$2" && grep -q protosanitizer "$2" && return 0
    done
    return 1
}

# The provisioner in POD has either restarted or logged the line it writes right after
# ControllerGetCapabilities returned (whether the driver has PUBLISH_UNPUBLISH_VOLUME): a pod
# counts as Ready while a crash-looping container happens to run, so Ready alone proves nothing.
provisioner_settled() {
    [ "$(provisioner_status "$1" restartCount)" != 0 ] ||
        kubectl -n loopcsi logs "$1" -c csi-provisioner 2>/dev/null | grep -q 'PUBLISH_UNPUBLISH_VOLUME'
}

pv_gone() { ! kubectl get pv "$1" >/dev/null 2>&1; }

scenario_oldest_provisioner() {
    local t=$SECONDS old pod prov drv pinned args image restarts log
    local oldest="loopcsi.dev/e2e/csi-provisioner:$OLDEST_PROVISIONER_VERSION"
    prov="$(container_index csi-provisioner)" || fail "oldest: no csi-provisioner container in the DaemonSet"
    drv="$(container_index loopcsi)" || fail "oldest: no loopcsi container in the DaemonSet"
    pinned="$(ds_field "{.spec.template.spec.containers[$prov].image}")"
    args="$(kubectl -n loopcsi get ds loopcsi-node -o json |
        python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)['spec']['template']['spec']['containers'][$drv]['args']))")"
    case "$args" in *--no-get-snapshot-capability*) fail "oldest: the deployed driver already has --no-get-snapshot-capability: $args" ;; esac

    # 1. The old provisioner against the driver as deployed (GET_SNAPSHOT advertised).
    old="$(plugin_pod_name)"
    kubectl -n loopcsi set image ds/loopcsi-node "csi-provisioner=$oldest" >/dev/null
    until_true 240 "the $OLDEST_PROVISIONER_VERSION provisioner restarted in a new plugin pod" \
        provisioner_crashed_in_new_pod "$old" ||
        fail "oldest: $OLDEST_PROVISIONER_VERSION did not crash on GET_SNAPSHOT as its csi-lib-utils v0.20.0 should (or no new pod came): $(kubectl -n loopcsi get pods -o wide)"
    pod="$(plugin_pod_name)"
    log="$work/logs/csi-provisioner-$OLDEST_PROVISIONER_VERSION-crash.log"
    until_true 60 "the panic in the $OLDEST_PROVISIONER_VERSION provisioner's log" provisioner_panic_logged "$pod" "$log" ||
        fail "oldest: the $OLDEST_PROVISIONER_VERSION provisioner restarted (last exit code $(provisioner_status "$pod" lastState.terminated.exitCode)), but its log shows no protosanitizer panic: $(tail -5 "$log")"
    pass "oldest: $OLDEST_PROVISIONER_VERSION with GET_SNAPSHOT advertised crash-loops in $pod (restarts $(provisioner_status "$pod" restartCount), exit code $(provisioner_status "$pod" lastState.terminated.exitCode); '$(grep -m1 'panic:' "$log")' in $(grep -m1 -o 'protosanitizer[.a-zA-Z]*' "$log"); $((SECONDS - t)) s)"

    # 2. The same provisioner with the driver's --no-get-snapshot-capability.
    t=$SECONDS
    old="$pod"
    kubectl -n loopcsi patch ds loopcsi-node --type=json \
        -p "[{\"op\":\"add\",\"path\":\"/spec/template/spec/containers/$drv/args/-\",\"value\":\"--no-get-snapshot-capability\"}]" >/dev/null
    until_true 300 "a new plugin pod Ready with $OLDEST_PROVISIONER_VERSION" plugin_ready_and_new "$old" ||
        fail "oldest: with --no-get-snapshot-capability the plugin pod did not become Ready: $(kubectl -n loopcsi get pods -o wide; kubectl -n loopcsi logs "$(plugin_pod_name)" -c csi-provisioner 2>&1 | tail -5)"
    pod="$(plugin_pod_name)"
    image="$(provisioner_status "$pod" image)"
    [ "$image" = "$oldest" ] || fail "oldest: the provisioner container runs $image, not $oldest"
    until_true 120 "CSINode lists loopcsi.dev" csinode_registered ||
        fail "oldest: the kubelet does not list loopcsi.dev"
    until_true 60 "the $OLDEST_PROVISIONER_VERSION provisioner past ControllerGetCapabilities, or restarted" \
        provisioner_settled "$pod" || fail "oldest: the provisioner neither restarted nor got past ControllerGetCapabilities in 60 s"
    restarts="$(provisioner_status "$pod" restartCount)"
    if [ "$restarts" != 0 ]; then
        until_true 30 "the provisioner's panic" provisioner_panic_logged "$pod" "$log" || true
        fail "oldest: with --no-get-snapshot-capability the $OLDEST_PROVISIONER_VERSION provisioner still restarted $restarts times (last exit code $(provisioner_status "$pod" lastState.terminated.exitCode)): $(grep -m1 -A3 'panic:' "$log")"
    fi
    pass "oldest: $pod Ready in $((SECONDS - t)) s with $image and --no-get-snapshot-capability; the provisioner got past ControllerGetCapabilities ('$(kubectl -n loopcsi logs "$pod" -c csi-provisioner | grep -m1 -o 'CSI driver does not support PUBLISH_UNPUBLISH_VOLUME')'), restarts 0"

    # 3. It provisions (WaitForFirstConsumer, so through the scheduler and the node's capacity)
    # and deletes.
    t=$SECONDS
    local pv token="old-$RANDOM"
    pvc old-pvc loopcsi-ext4 Filesystem
    app_pod old-writer old-pvc fs "echo $token > /data/token && cat /data/token"
    wait_phase old-writer Succeeded
    [ "$(kubectl logs old-writer)" = "$token" ] || fail "oldest: old-writer read '$(kubectl logs old-writer)', not $token"
    pv="$(kubectl get pvc old-pvc -o jsonpath='{.spec.volumeName}')"
    kubectl -n loopcsi logs "$pod" -c csi-provisioner | grep -q "old-pvc" ||
        fail "oldest: the $OLDEST_PROVISIONER_VERSION provisioner's log does not name old-pvc"
    pass "oldest: $OLDEST_PROVISIONER_VERSION provisioned $pv for old-pvc (WaitForFirstConsumer); old-writer wrote and read '$token'; $((SECONDS - t)) s"
    t=$SECONDS
    kubectl delete pod old-writer --timeout=120s >/dev/null || fail "oldest: old-writer stuck deleting"
    kubectl delete pvc old-pvc --timeout=60s >/dev/null || fail "oldest: old-pvc did not go"
    until_true 120 "pv $pv deleted" pv_gone "$pv" || fail "oldest: $pv was not deleted: $(kubectl get pv)"
    [ -z "$(find "$pool" -name '*.img' 2>/dev/null)" ] || fail "oldest: images left in the pool: $(find "$pool" -name '*.img')"
    restarts="$(provisioner_status "$pod" restartCount)"
    [ "$restarts" = 0 ] || fail "oldest: the $OLDEST_PROVISIONER_VERSION provisioner restarted $restarts times with the flag set"
    pass "oldest: $OLDEST_PROVISIONER_VERSION deleted $pv in $((SECONDS - t)) s; no image left in the pool; provisioner restarts 0"

    # 4. Back to the pinned provisioner and the original arguments.
    t=$SECONDS
    old="$pod"
    kubectl -n loopcsi patch ds loopcsi-node --type=json -p "[
        {\"op\":\"replace\",\"path\":\"/spec/template/spec/containers/$drv/args\",\"value\":$args},
        {\"op\":\"replace\",\"path\":\"/spec/template/spec/containers/$prov/image\",\"value\":\"$pinned\"}]" >/dev/null
    until_true 300 "a new plugin pod Ready with $pinned" plugin_ready_and_new "$old" ||
        fail "oldest: the pinned provisioner did not come back: $(kubectl -n loopcsi get pods -o wide)"
    until_true 120 "CSINode lists loopcsi.dev" csinode_registered ||
        fail "oldest: the kubelet does not list loopcsi.dev after the restore"
    pod="$(plugin_pod_name)"
    [ "$(provisioner_status "$pod" image)" = "$pinned" ] || fail "oldest: restore left $(provisioner_status "$pod" image)"
    pass "oldest: restored $pinned and the driver's arguments in $((SECONDS - t)) s ($pod Ready)"
}
