# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# loopcsi installed the Helm way. Runs last: it replaces the kustomize deployment by a release
# of deploy/helm/loopcsi (the same image names, kubelet directory and pool as run.sh's overlay),
# writes and reads a volume through it, uninstalls it, checks nothing of it is left, and puts the
# kustomize deployment back as it found it. If it fails half-way, the run's teardown still
# removes the release's pods: the release lives in namespace loopcsi, which the teardown deletes.
E2E_SCENARIOS+=(helm)

helm_cmd() {
    HELM_CONFIG_HOME="$work/helm/config" HELM_CACHE_HOME="$work/helm/cache" HELM_DATA_HOME="$work/helm/data" \
        in_ns "$cache/helm-$HELM_VERSION/helm" --kubeconfig "$work/pki/admin.kubeconfig" "$@"
}
namespace_gone() { ! kubectl get namespace loopcsi >/dev/null 2>&1; }
# How often the kubelet was asked to register the driver at the socket the driver serves (its
# csi_plugin.go logs each attempt; CSINode then shows whether it succeeded). A new plugin pod's
# registrar asks again. CSINode alone cannot tell, since it may still list the driver of the pod
# that went (the e2e stand-in registrar leaves its socket behind).
registrations() {
    grep -c "Register new plugin with name: loopcsi.dev at endpoint: $kubelet_dir/plugins/loopcsi.dev/csi.sock\$" \
        "$work/logs/kubelet.log" || true
}
kubelet_registration_log() {
    grep -E 'Register new plugin with name: loopcsi.dev|RegisterPlugin error' "$work/logs/kubelet.log" | tail -2 | cut -c1-300
}
registered_since() { [ "$(registrations)" -gt "$1" ]; }
# The objects of the release (by Helm's instance label), of every kind the chart makes.
release_objects() {
    kubectl get daemonsets,pods,serviceaccounts,roles,rolebindings,services -n loopcsi \
        -l app.kubernetes.io/instance=loopcsi -o name 2>/dev/null
    kubectl get clusterroles,clusterrolebindings,csidrivers,storageclasses,volumesnapshotclasses \
        -l app.kubernetes.io/instance=loopcsi -o name 2>/dev/null
    # Helm's record of the release, and the capacity objects owned by the DaemonSet.
    kubectl get secrets -n loopcsi -l owner=helm,name=loopcsi -o name 2>/dev/null
    kubectl get csistoragecapacities -n loopcsi -o name 2>/dev/null
}
no_release_objects() { [ -z "$(release_objects)" ]; }
csi_mounts() {
    awk -v k="$kubelet_dir/" 'index($5, k) == 1 && $5 ~ /kubernetes.io[~\/]csi/ {print $5}' /proc/self/mountinfo
}

scenario_helm() {
    local t=$SECONDS old
    [ -z "$(kubectl get pv -o name)" ] ||
        fail "helm: volumes of earlier scenarios are still there ($(kubectl get pv -o name | tr '\n' ' ')); the driver cannot be replaced under them"

    # 1. The kustomize deployment goes (the snapshot CRDs stay: they are not part of it).
    old="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o jsonpath='{.items[0].metadata.name}')"
    kubectl delete -k "$work/overlay" --wait=false >/dev/null || fail "helm: kubectl delete -k of the overlay failed"
    until_true 180 "namespace loopcsi gone" namespace_gone ||
        fail "helm: namespace loopcsi (and plugin pod $old) did not go: $(kubectl get ns loopcsi -o jsonpath='{.status}' 2>&1)"
    local regs left
    left="$(kubectl get csidriver,storageclasses,volumesnapshotclasses -o name | grep loopcsi || true)"
    [ -z "$left" ] || fail "helm: kustomize objects left: $left"
    regs="$(registrations)"
    pass "helm: kustomize deployment deleted (plugin pod $old, namespace loopcsi, CSIDriver, classes gone; kubelet registrations of loopcsi.dev so far: $regs) in $((SECONDS - t)) s"

    # 2. helm install, the way docs/kubernetes.md says: a namespace labelled for privileged pods.
    t=$SECONDS
    cat >"$work/helm-values.yaml" <<EOF
# run.sh's overlay, in the chart's values: the e2e images, the kubelet directory and the pool.
image: {repository: loopcsi.dev/loopcsi, tag: e2e}
kubeletDir: $kubelet_dir
poolDir: $pool
sidecars:
  provisioner: {image: {repository: loopcsi.dev/e2e/csi-provisioner, tag: $PROVISIONER_VERSION}}
  resizer: {image: {repository: loopcsi.dev/e2e/csi-resizer, tag: $RESIZER_VERSION}}
  snapshotter: {image: {repository: loopcsi.dev/e2e/csi-snapshotter, tag: $SNAPSHOTTER_VERSION}}
  nodeDriverRegistrar: {image: {repository: loopcsi.dev/e2e/node-driver-registrar, tag: e2e}}
  livenessProbe: {image: {repository: loopcsi.dev/e2e/livenessprobe, tag: e2e}}
EOF
    kubectl create namespace loopcsi --save-config >/dev/null
    kubectl label namespace loopcsi pod-security.kubernetes.io/enforce=privileged >/dev/null
    helm_cmd install loopcsi "$repo/deploy/helm/loopcsi" --namespace loopcsi -f "$work/helm-values.yaml" \
        >"$work/logs/helm-install.log" 2>&1 || fail "helm: helm install failed: $(cat "$work/logs/helm-install.log")"
    helm_cmd get manifest loopcsi --namespace loopcsi >"$work/logs/loopcsi-helm.yaml"
    until_true 300 "loopcsi DaemonSet ready" daemonset_ready ||
        fail "helm: the DaemonSet did not become ready: $(kubectl -n loopcsi get pods -o wide 2>&1)"
    until_true 120 "the kubelet registers loopcsi.dev again" registered_since "$regs" ||
        fail "helm: the kubelet was not asked to register loopcsi.dev at $kubelet_dir/plugins/loopcsi.dev/csi.sock again; its log: $(kubelet_registration_log)"
    until_true 60 "CSINode lists loopcsi.dev" csinode_registered ||
        fail "helm: the kubelet did not register loopcsi.dev (CSINode does not list it); its log: $(kubelet_registration_log)"
    local pod managed pool_path
    pod="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node -o jsonpath='{.items[0].metadata.name}')"
    managed="$(kubectl -n loopcsi get ds loopcsi-node -o jsonpath='{.metadata.labels.app\.kubernetes\.io/managed-by}')"
    pool_path="$(kubectl -n loopcsi get ds loopcsi-node -o jsonpath='{.spec.template.spec.volumes[?(@.name=="pool-dir")].hostPath.path}')"
    if [ "$managed" != Helm ] || [ "$pool_path" != "$pool" ]; then
        fail "helm: the DaemonSet is not the release's (managed-by '$managed', pool '$pool_path')"
    fi
    pass "helm: helm install ($(helm_cmd list -n loopcsi -o json | python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["chart"], r["status"])')); $pod $(kubectl -n loopcsi get pod "$pod" -o jsonpath='{range .status.containerStatuses[*]}{.name}={.ready} {end}'); registered with the kubelet (attempt $(registrations) at the served socket), CSINode lists it; pool $pool_path; $((SECONDS - t)) s"

    # 3. A volume through the release's driver and StorageClass.
    write_then_read hfs fs loopcsi-ext4 'cat > /data/token' 'cat /data/token'
    t=$SECONDS
    local pv
    pv="$(kubectl get pvc hfs-pvc -o jsonpath='{.spec.volumeName}')"
    kubectl delete pod hfs-app --timeout=120s >/dev/null || fail "helm: hfs-app stuck deleting"
    kubectl delete pvc hfs-pvc --timeout=60s >/dev/null || fail "helm: hfs-pvc did not go"
    kubectl wait --for=delete "pv/$pv" --timeout=120s >/dev/null 2>&1 || fail "helm: $pv stayed: $(kubectl get pv)"
    pass "helm: hfs-app and hfs-pvc deleted, $pv gone in $((SECONDS - t)) s"

    # 4. helm uninstall leaves nothing of the release: objects, pods, mounts, loop devices, images.
    t=$SECONDS
    helm_cmd uninstall loopcsi --namespace loopcsi --wait --timeout 3m >>"$work/logs/helm-install.log" 2>&1 ||
        fail "helm: helm uninstall failed: $(tail -5 "$work/logs/helm-install.log")"
    until_true 120 "the release's objects gone" no_release_objects ||
        fail "helm: left after helm uninstall: $(release_objects | tr '\n' ' ')"
    local images loops mounts
    images="$(find "$pool" -name '*.img' 2>/dev/null)"
    loops="$(our_loops)"
    mounts="$(csi_mounts)"
    [ -z "$images$loops$mounts$(helm_cmd list -n loopcsi -q)" ] ||
        fail "helm: left after uninstall: images [$images] loop devices [$loops] mounts [$mounts] releases [$(helm_cmd list -n loopcsi -q)]"
    pass "helm: helm uninstall in $((SECONDS - t)) s; no object of the release (daemonset, pods, RBAC, CSIDriver, classes, capacities, release secret), no image, loop device or CSI mount left"

    # 5. Back to the kustomize deployment the scenario found.
    t=$SECONDS
    regs="$(registrations)"
    kubectl apply -k "$work/overlay" >/dev/null || fail "helm: re-applying the overlay failed"
    until_true 300 "loopcsi DaemonSet ready" daemonset_ready ||
        fail "helm: the kustomize DaemonSet did not come back: $(kubectl -n loopcsi get pods -o wide 2>&1)"
    until_true 120 "the kubelet registers loopcsi.dev again" registered_since "$regs" ||
        fail "helm: the kubelet did not register the kustomize deployment again"
    pass "helm: kustomize deployment restored in $((SECONDS - t)) s"
}
