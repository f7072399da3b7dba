# shellcheck shell=bash disable=SC2154  # the variables come from run.sh
# Changed-block tracking as a backup tool uses it (issue 15): components/snapshot-metadata
# deployed the documented way (an operator-made TLS Secret, a ConfigMap with the CA and the
# audience), then the upstream example client snapshot-metadata-lister (built by build.sh at the
# pinned external-snapshot-metadata version) lists a snapshot's allocated blocks and the delta
# between two snapshots of a raw block claim, through the sidecar and its TLS endpoint. A driver
# without SNAPSHOT_METADATA_SERVICE fails the scenario as soon as the sidecar says so.
E2E_SCENARIOS+=(cbt)

# The tier has no DNS and no kube-proxy: the Service gets a fixed cluster IP, the certificate
# names it, the SnapshotMetadataService points at it, and one DNAT rule stands in for kube-proxy
# (as run.sh does for the kubernetes Service).
cbt_ip=10.96.0.50
cbt_mib=1048576

# cbt_sidecar: "ready", "lacks" (the sidecar said the driver lacks the service) or nothing yet,
# for the plugin pod that runs the sidecar.
cbt_sidecar() {
    local pod ready logs
    # (jsonpath filters cannot test a list of container names: awk picks the pod.)
    pod="$(kubectl -n loopcsi get pods -l app.kubernetes.io/name=loopcsi-node \
        -o jsonpath='{range .items[*]}{.metadata.name} {.spec.containers[*].name}{"\n"}{end}' |
        awk '/ csi-snapshot-metadata( |$)/ && !found {print $1; found = 1}')"
    [ -n "$pod" ] || return 0
    # The exited container's log (it restarts) and the running one's.
    logs="$(kubectl -n loopcsi logs "$pod" -c csi-snapshot-metadata --previous 2>/dev/null || true)"
    logs="$logs$(kubectl -n loopcsi logs "$pod" -c csi-snapshot-metadata 2>/dev/null || true)"
    if grep -q 'does not support the SNAPSHOT_METADATA_SERVICE' <<<"$logs"; then
        echo lacks
        return 0
    fi
    ready="$(kubectl -n loopcsi get pod "$pod" -o jsonpath='{.status.containerStatuses[?(@.name=="csi-snapshot-metadata")].ready}')"
    [ "$ready" = true ] && [ "$(kubectl -n loopcsi get pods -o name | wc -l)" = 1 ] && echo ready
    return 0
}
cbt_sidecar_settled() { [ -n "$(cbt_sidecar)" ]; }

# cbt_deploy: the TLS Secret, then the e2e overlay plus the component.
cbt_deploy() {
    local dir="$work/cbt" deploy
    mkdir -p "$dir" "$work/overlay-cbt"
    (
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 \
            -subj /CN=loopcsi-e2e-cbt-ca 2>/dev/null
        printf 'subjectAltName=DNS:loopcsi-snapshot-metadata.loopcsi,DNS:loopcsi-snapshot-metadata.loopcsi.svc,IP:%s\n' \
            "$cbt_ip" >tls.ext
        openssl req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr \
            -subj /CN=loopcsi-snapshot-metadata.loopcsi 2>/dev/null
        openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt \
            -days 1 -extfile tls.ext 2>/dev/null
    )
    kubectl -n loopcsi create secret tls loopcsi-snapshot-metadata-tls \
        --cert "$dir/tls.crt" --key "$dir/tls.key" >/dev/null
    deploy="$(realpath --relative-to="$work/overlay-cbt" "$repo/deploy/kubernetes")"
    cat >"$work/overlay-cbt/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../overlay, snapshot-metadata.yaml]
components: [$deploy/components/snapshot-metadata]
images:
  - {name: registry.k8s.io/sig-storage/csi-snapshot-metadata, newName: loopcsi.dev/e2e/csi-snapshot-metadata, newTag: $SNAPSHOT_METADATA_VERSION}
patches:
  - target: {kind: Service, name: loopcsi-snapshot-metadata}
    patch: |-
      - {op: add, path: /spec/clusterIP, value: $cbt_ip}
  - target: {kind: SnapshotMetadataService}
    patch: |-
      - {op: replace, path: /spec/address, value: "$cbt_ip:6443"}
EOF
    cat >"$work/overlay-cbt/snapshot-metadata.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: loopcsi-snapshot-metadata
  annotations: {config.kubernetes.io/local-config: "true"}
data:
  caCert: $(base64 -w0 "$dir/ca.crt")
  audience: loopcsi-e2e-backup
EOF
    kubectl apply -k "$work/overlay-cbt" >/dev/null
}

# cbt_list ARGS...: snapshot-metadata-lister as the service account cbt-backup, JSON out.
cbt_list() {
    in_ns "$cache/snapshot-metadata-lister-$SNAPSHOT_METADATA_VERSION/snapshot-metadata-lister" \
        -kubeconfig "$work/pki/admin.kubeconfig" -service-account cbt-backup \
        -service-account-namespace default -n default -o json "$@"
}

# cbt_covers JSON START LENGTH: prints the ranges' total and fails unless they cover
# [START, START+LENGTH).
cbt_covers() {
    python3 - "$@" <<'EOF'
import json, sys
records, start, length = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
# The lister prints protobuf JSON: a field at its zero value (byte_offset 0) is left out.
ranges = sorted((b.get("byte_offset", 0), b.get("byte_offset", 0) + b["size_bytes"])
                for r in records for b in r.get("block_metadata") or [])
total = sum(e - s for s, e in ranges)
at = start
for s, e in ranges:
    if s <= at < e:
        at = e
print(f"{len(ranges)} ranges, {total} bytes")
sys.exit(0 if at >= start + length else 1)
EOF
}

scenario_cbt() {
    local state pod_ip t out a_handle summary
    cbt_deploy
    until_true 300 "csi-snapshot-metadata ready or refused" cbt_sidecar_settled ||
        fail "cbt: the csi-snapshot-metadata sidecar neither became ready nor said why: $(kubectl -n loopcsi get pods -o wide)"
    state="$(cbt_sidecar)"
    [ "$state" = ready ] || fail "cbt: driver lacks SNAPSHOT_METADATA_SERVICE (the csi-snapshot-metadata sidecar refuses to serve it)"
    pod_ip="$(kubectl -n loopcsi get pods -o jsonpath='{.items[0].status.podIP}')"
    # A route first: a connect() to an address with no route fails (ENETUNREACH) before the
    # OUTPUT chain's DNAT could rewrite it.
    in_ns ip route replace "$cbt_ip/32" dev e2e0
    in_ns iptables -t nat -A OUTPUT -d "$cbt_ip/32" -p tcp --dport 6443 -j DNAT --to-destination "$pod_ip:50051"
    pass "cbt: sidecar ready in the plugin pod ($pod_ip:50051), Service $cbt_ip:6443, SnapshotMetadataService $(kubectl get snapshotmetadataservice loopcsi.dev -o jsonpath='{.spec.address}')"

    kubectl create serviceaccount cbt-backup >/dev/null
    kubectl create rolebinding cbt-backup --clusterrole=loopcsi-snapshot-metadata-client \
        --serviceaccount=default:cbt-backup >/dev/null
    # A raw block claim: 1 MiB written at 0 before snapshot A, 1 MiB at 8 MiB after it.
    pvc cbt-pvc loopcsi-ext4 Block 64Mi
    app_pod cbt-app cbt-pvc block \
        "dd if=/dev/urandom of=/dev/xvda bs=$cbt_mib count=1 2>/dev/null; sync; echo first"
    wait_phase cbt-app Succeeded
    data_snapshot cbt-a cbt-pvc
    until_true 120 "cbt-a ReadyToUse" data_snapshot_ready cbt-a || fail "cbt: cbt-a is not ReadyToUse"
    kubectl delete pod cbt-app --timeout=120s >/dev/null
    app_pod cbt-app2 cbt-pvc block \
        "dd if=/dev/urandom of=/dev/xvda bs=$cbt_mib count=1 seek=8 2>/dev/null; sync; echo second"
    wait_phase cbt-app2 Succeeded
    data_snapshot cbt-b cbt-pvc
    until_true 120 "cbt-b ReadyToUse" data_snapshot_ready cbt-b || fail "cbt: cbt-b is not ReadyToUse"

    t=$SECONDS
    out="$(cbt_list -s cbt-a 2>&1)" || fail "cbt: snapshot-metadata-lister -s cbt-a failed: $out"
    summary="$(cbt_covers "$out" 0 "$cbt_mib")" ||
        fail "cbt: the allocated blocks of cbt-a ($summary) do not cover the 1 MiB written at 0: $out"
    pass "cbt: allocated blocks of cbt-a: $summary, covering [0, 1 MiB) the pod wrote; $((SECONDS - t)) s"
    t=$SECONDS
    a_handle="$(kubectl get volumesnapshotcontent "$(kubectl get volumesnapshot cbt-a -o jsonpath='{.status.boundVolumeSnapshotContentName}')" -o jsonpath='{.status.snapshotHandle}')"
    out="$(cbt_list -s cbt-b -p cbt-a 2>&1)" || fail "cbt: snapshot-metadata-lister -s cbt-b -p cbt-a failed: $out"
    summary="$(cbt_covers "$out" $((8 * cbt_mib)) "$cbt_mib")" ||
        fail "cbt: the delta cbt-a -> cbt-b ($summary) does not cover the 1 MiB written at 8 MiB: $out"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if sum(b["size_bytes"] for x in r for b in x.get("block_metadata") or []) < 64*2**20 else 1)' "$out" ||
        fail "cbt: the delta cbt-a -> cbt-b is the whole volume ($summary), not what changed"
    pass "cbt: delta cbt-a ($a_handle) -> cbt-b: $summary, covering [8 MiB, 9 MiB) the pod wrote, less than the 64 MiB volume; $((SECONDS - t)) s"

    in_ns iptables -t nat -D OUTPUT -d "$cbt_ip/32" -p tcp --dport 6443 -j DNAT --to-destination "$pod_ip:50051"
    in_ns ip route del "$cbt_ip/32" dev e2e0
    data_cleanup pod/cbt-app2 volumesnapshot/cbt-a volumesnapshot/cbt-b pvc/cbt-pvc
    kubectl delete rolebinding cbt-backup >/dev/null
    kubectl delete serviceaccount cbt-backup >/dev/null
    cbt_undeploy
}

# cbt_undeploy: the plugin as run.sh deployed it, without the component's objects.
cbt_undeploy() {
    local old
    old="$(kubectl -n loopcsi get pods -o jsonpath='{.items[0].metadata.name}')"
    kubectl apply -k "$work/overlay" >/dev/null
    kubectl -n loopcsi delete service loopcsi-snapshot-metadata --ignore-not-found >/dev/null
    kubectl -n loopcsi delete secret loopcsi-snapshot-metadata-tls --ignore-not-found >/dev/null
    kubectl delete snapshotmetadataservice loopcsi.dev --ignore-not-found >/dev/null
    kubectl delete clusterrolebinding loopcsi-snapshot-metadata --ignore-not-found >/dev/null
    kubectl delete clusterrole loopcsi-snapshot-metadata loopcsi-snapshot-metadata-client --ignore-not-found >/dev/null
    until_true 300 "plugin back without the sidecar" plugin_ready_and_new "$old" ||
        fail "cbt: the plugin did not come back without the sidecar: $(kubectl -n loopcsi get pods -o wide)"
}
