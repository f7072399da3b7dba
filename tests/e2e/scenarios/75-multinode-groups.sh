# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# Group snapshots on several nodes, routed by the snapshot-router (loopcsi route-snapshots) and
# nothing else: two claims on the second node and two on the first, one VolumeGroupSnapshot per
# node created at the same instant (so the VolumeGroupSnapshotClass is handed over between the
# nodes' routers), both ReadyToUse with their members; the second node's members restore on it;
# a group of one claim per node is not routed (an Event says why); everything is deleted and
# the second node's pool keeps no snapshot file. It joins the second
# node itself when no earlier scenario left it up (E2E_ONLY='group_snapshot|multinode_group'),
# and removes it again if it joined it. Helpers from 50-multinode.sh and 70-data-protection.sh.
E2E_SCENARIOS+=(multinode_group_snapshot)

# mg_group NAME: a VolumeGroupSnapshot of the claims labelled loopcsi-e2e-group=NAME.
mg_group() {
    kubectl apply -f - >/dev/null <<EOF
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: $1, namespace: default}
spec:
  volumeGroupSnapshotClassName: loopcsi-group-snapshot
  source: {selector: {matchLabels: {loopcsi-e2e-group: $1}}}
EOF
}

mg_both_ready() { dp_group_ready mg-1 && dp_group_ready mg-2; }
mg_gone() { dp_members_gone mg-1 && dp_members_gone mg-2; }
# mg_router_says NODE TEXT: the snapshot-router of NODE's plugin pod logged TEXT.
mg_router_says() {
    local pod
    pod="$(kubectl -n loopcsi get pods --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}')"
    kubectl -n loopcsi logs "$pod" -c snapshot-router 2>/dev/null | grep -F -- "$2"
}

# mg_not_routed CONTENT: the NotRouted Events the routers recorded on a group content.
mg_not_routed() {
    kubectl get events -n default --field-selector "involvedObject.name=$1,reason=NotRouted" \
        -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' 2>/dev/null
}
mg_has_not_routed() { [ -n "$(mg_not_routed "$1")" ]; }
mg_has_content() { [ -n "$(dp_group_content "$1" 2>/dev/null)" ]; }
mg_x_gone() {
    ! kubectl get volumegroupsnapshot mg-x >/dev/null 2>&1 &&
        ! kubectl get volumegroupsnapshotcontent "$1" >/dev/null 2>&1
}

# mg_refused: a group of one claim of each node is never routed: no node's label on its content,
# a NotRouted Event saying why. Deleting it needs the content's finalizer removed by hand (only a
# csi-snapshotter removes it), as docs/kubernetes.md says.
mg_refused() {
    local t=$SECONDS content msg
    kubectl label pvc mg1-a-pvc mg2-a-pvc loopcsi-e2e-cross=mg-x >/dev/null
    kubectl apply -f - >/dev/null <<EOF
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: mg-x, namespace: default}
spec:
  volumeGroupSnapshotClassName: loopcsi-group-snapshot
  source: {selector: {matchLabels: {loopcsi-e2e-cross: mg-x}}}
EOF
    until_true 60 "mg-x has a content" mg_has_content mg-x ||
        fail "multinode_group_snapshot: the snapshot-controller made no content for mg-x"
    content="$(dp_group_content mg-x)"
    until_true 60 "a NotRouted Event on $content" mg_has_not_routed "$content" ||
        fail "multinode_group_snapshot: no NotRouted Event on $content (routers: $(mg_router_says "$node" 'not routed'; mg_router_says "$node2" 'not routed'))"
    msg="$(mg_not_routed "$content" | head -1)"
    case "$msg" in *"several nodes"*) ;; *) fail "multinode_group_snapshot: the NotRouted Event does not say why: $msg" ;; esac
    [ -z "$(dp_managed_by_of "volumegroupsnapshotcontent/$content")" ] ||
        fail "multinode_group_snapshot: the cross-node content $content was labelled"
    ! dp_group_ready mg-x || fail "multinode_group_snapshot: the cross-node group mg-x became ready"
    pass "multinode_group_snapshot: a group of one claim per node is not routed: $content unlabelled, Event NotRouted: $msg; $((SECONDS - t)) s"
    t=$SECONDS
    kubectl delete volumegroupsnapshot mg-x --wait=false >/dev/null
    kubectl delete volumegroupsnapshotcontent "$content" --wait=false >/dev/null 2>&1 || true
    kubectl patch volumegroupsnapshotcontent "$content" --type json \
        -p '[{"op": "remove", "path": "/metadata/finalizers"}]' >/dev/null 2>&1 || true
    until_true 60 "mg-x and $content gone" mg_x_gone "$content" ||
        fail "multinode_group_snapshot: mg-x or $content stayed: $(kubectl get volumegroupsnapshot mg-x -o jsonpath='{.metadata.finalizers}' 2>&1) $(kubectl get volumegroupsnapshotcontent "$content" -o jsonpath='{.metadata.finalizers}' 2>&1)"
    kubectl label pvc mg1-a-pvc mg2-a-pvc loopcsi-e2e-cross- >/dev/null
    pass "multinode_group_snapshot: mg-x deleted (its content's finalizer removed by hand); $((SECONDS - t)) s"
}

scenario_multinode_group_snapshot() {
    local t=$SECONDS joined=0 c m got n members1 members2 restored=() cleanup=() tokens=() c1 c2 h1 h2
    if ! node_ready "$node2" 2>/dev/null; then
        add_node "$node2" 2 "$node2_pool_size"
        joined=1
        until_true 300 "plugin ready on 2 nodes" daemonset_ready_on 2 ||
            fail "multinode_group_snapshot: the plugin did not become ready on $node2: $(kubectl -n loopcsi get pods -o wide)"
        until_true 120 "CSINode $node2 lists loopcsi.dev" csinode_lists "$node2" ||
            fail "multinode_group_snapshot: the kubelet of $node2 never registered loopcsi.dev"
    fi
    tokens=("mg1a-$RANDOM" "mg1b-$RANDOM" "mg2a-$RANDOM" "mg2b-$RANDOM")
    for c in mg1-a mg1-b mg2-a mg2-b; do pvc "$c-pvc" loopcsi-ext4 Filesystem; done
    kubectl label pvc mg1-a-pvc mg1-b-pvc loopcsi-e2e-group=mg-1 >/dev/null
    kubectl label pvc mg2-a-pvc mg2-b-pvc loopcsi-e2e-group=mg-2 >/dev/null
    dp_app mg-app-1 "$node" "${tokens[0]}" "${tokens[1]}" mg1-a-pvc mg1-b-pvc
    dp_app mg-app-2 "$node2" "${tokens[2]}" "${tokens[3]}" mg2-a-pvc mg2-b-pvc
    wait_phase mg-app-1 Running
    wait_phase mg-app-2 Running
    until_true 30 "mg apps wrote" eval 'has_log mg-app-1 && has_log mg-app-2' || fail "multinode_group_snapshot: an app wrote nothing"
    [ "$(pv_node mg2-a-pvc)" = "$node2" ] && [ "$(pv_node mg2-b-pvc)" = "$node2" ] ||
        fail "multinode_group_snapshot: the claims of mg-app-2 are not on $node2"

    # Both group snapshots at once: one class, two nodes.
    t=$SECONDS
    mg_group mg-1
    mg_group mg-2
    until_true 180 "mg-1 and mg-2 ReadyToUse" mg_both_ready ||
        fail "multinode_group_snapshot: not ReadyToUse after 180 s: mg-1 '$(dp_group_error mg-1)', mg-2 '$(dp_group_error mg-2)'; routers: $(mg_router_says "$node" 'not routed'; mg_router_says "$node2" 'not routed')"
    c1="$(dp_managed_by_of "volumegroupsnapshotcontent/$(dp_group_content mg-1)")"
    c2="$(dp_managed_by_of "volumegroupsnapshotcontent/$(dp_group_content mg-2)")"
    [ "$c1" = "$node" ] && [ "$c2" = "$node2" ] ||
        fail "multinode_group_snapshot: group contents labelled '$c1' and '$c2', not $node and $node2"
    mapfile -t members1 < <(dp_members mg-1)
    mapfile -t members2 < <(dp_members mg-2)
    [ "${#members1[@]}" = 2 ] && [ "${#members2[@]}" = 2 ] ||
        fail "multinode_group_snapshot: members '${members1[*]}' and '${members2[*]}', not two each"
    for m in "${members1[@]}" "${members2[@]}"; do
        until_true 60 "$m ReadyToUse" data_snapshot_ready "$m" || fail "multinode_group_snapshot: member $m is not ReadyToUse"
    done
    # Each node's group needed the class, so each router took it (or renewed its claim) for its
    # own group content at least once: the hand-over. The routers' lines name the contents.
    h1="$(mg_router_says "$node" 'class held by this node' | grep -c -F -- "$(dp_group_content mg-1)")"
    h2="$(mg_router_says "$node2" 'class held by this node' | grep -c -F -- "$(dp_group_content mg-2)")"
    log "routers: $(mg_router_says "$node" 'class held by this node' | tail -2 | tr '\n' ' ')| $(mg_router_says "$node2" 'class held by this node' | tail -2 | tr '\n' ' ')"
    [ "$h1" -ge 1 ] && [ "$h2" -ge 1 ] ||
        fail "multinode_group_snapshot: the class was taken for mg-1 $h1 time(s) by $node's router and for mg-2 $h2 by $node2's: no hand-over"
    pass "multinode_group_snapshot: mg-1 (on $node) and mg-2 (on $node2), made at once, ReadyToUse in $((SECONDS - t)) s; contents routed to $c1 and $c2; the class taken for them $h1 time(s) by $node's router, $h2 by $node2's; members ${members1[*]} ${members2[*]}"

    # The second node's members restore there, each to its own claim's token.
    t=$SECONDS
    kubectl exec mg-app-2 -- sh -c 'echo overwritten > /a/token; echo overwritten > /b/token; sync'
    dp_restore_each multinode_group_snapshot "$node2" "${tokens[2]} ${tokens[3]}" "${members2[@]}"
    pass "multinode_group_snapshot: mg-2's members restored on $node2 read '${restored[0]}' and '${restored[1]}'; $((SECONDS - t)) s"

    mg_refused
    t=$SECONDS
    kubectl delete volumegroupsnapshot mg-1 mg-2 --wait=false >/dev/null
    until_true 120 "mg-1 and mg-2 members gone" mg_gone ||
        fail "multinode_group_snapshot: members outlive their group: $(dp_members mg-1 | tr '\n' ' ') $(dp_members mg-2 | tr '\n' ' ')"
    data_cleanup pod/mg-app-1 pod/mg-app-2 "${cleanup[@]}" pvc/mg1-a-pvc pvc/mg1-b-pvc pvc/mg2-a-pvc pvc/mg2-b-pvc
    n="$(find "$(node_pool_fs "$node2")/pool" -path '*snap*' -type f | wc -l)"
    [ "$n" = 0 ] || fail "multinode_group_snapshot: $n snapshot files stayed in $node2's pool"
    if [ "$joined" = 1 ]; then
        remove_node "$node2"
        until_true 120 "the DaemonSet back to one node" daemonset_ready_on 1 ||
            fail "multinode_group_snapshot: the DaemonSet did not settle on one node: $(kubectl -n loopcsi get pods -o wide)"
    fi
    pass "multinode_group_snapshot: both group snapshots, their members, restores and claims deleted; no snapshot file left on $node2; $((SECONDS - t)) s"
}
