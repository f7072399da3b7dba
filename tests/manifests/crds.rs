//! The custom resources of the deployment that kubernetes-validate has no schema for, checked
//! structurally after their CRDs' OpenAPI schemas (moved out of manifests.rs, which is long).

use serde_json::Value;

use super::{dns_subdomain, only_keys};

/// The snapshot.storage.k8s.io/v1 and groupsnapshot.storage.k8s.io/v1 CRDs, after their OpenAPI
/// schemas (kubernetes-csi/external-snapshotter client/config/crd), and the
/// cbt.storage.k8s.io/v1alpha1 SnapshotMetadataService (external-snapshot-metadata client v0.1.0).
pub fn check_snapshot_crd(object: &Value) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap_or("");
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let at = format!("{kind} {name}");
    let api_version = match kind {
        "VolumeGroupSnapshotClass" => "groupsnapshot.storage.k8s.io/v1",
        "SnapshotMetadataService" => "cbt.storage.k8s.io/v1alpha1",
        _ => "snapshot.storage.k8s.io/v1",
    };
    if object["apiVersion"] != api_version {
        return Err(format!(
            "{at}: apiVersion {} is not {api_version}",
            object["apiVersion"]
        ));
    }
    if !dns_subdomain(name) {
        return Err(format!("{at}: metadata.name is not a DNS subdomain"));
    }
    only_keys(
        &object["metadata"],
        &["name", "namespace", "labels", "annotations"],
        &format!("{at} metadata"),
    )?;
    for map in ["labels", "annotations"] {
        if let Some(values) = object["metadata"][map].as_object() {
            if values.values().any(|v| !v.is_string()) {
                return Err(format!("{at}: metadata.{map} values must be strings"));
            }
        }
    }
    match kind {
        // The group class has the fields of the snapshot class (groupsnapshot.storage.k8s.io
        // volumegroupsnapshotclasses CRD of external-snapshotter v8.7.0).
        "VolumeSnapshotClass" | "VolumeGroupSnapshotClass" => {
            only_keys(
                object,
                &[
                    "apiVersion",
                    "kind",
                    "metadata",
                    "driver",
                    "deletionPolicy",
                    "parameters",
                ],
                &at,
            )?;
            if object["driver"].as_str().is_none_or(str::is_empty) {
                return Err(format!("{at}: driver is required"));
            }
            if !matches!(object["deletionPolicy"].as_str(), Some("Delete" | "Retain")) {
                return Err(format!("{at}: deletionPolicy must be Delete or Retain"));
            }
            if let Some(params) = object.get("parameters") {
                let params = params
                    .as_object()
                    .ok_or_else(|| format!("{at}: parameters is not a map"))?;
                if params.values().any(|v| !v.is_string()) {
                    return Err(format!("{at}: parameters values must be strings"));
                }
            }
        }
        "VolumeSnapshot" => {
            only_keys(object, &["apiVersion", "kind", "metadata", "spec"], &at)?;
            let spec = &object["spec"];
            only_keys(
                spec,
                &["source", "volumeSnapshotClassName"],
                &format!("{at} spec"),
            )?;
            let source = &spec["source"];
            only_keys(
                source,
                &["persistentVolumeClaimName", "volumeSnapshotContentName"],
                &format!("{at} spec.source"),
            )?;
            let set: Vec<_> = source.as_object().unwrap().values().collect();
            if set.len() != 1 || !set[0].as_str().is_some_and(dns_subdomain) {
                return Err(format!(
                    "{at}: spec.source needs exactly one of persistentVolumeClaimName and \
                     volumeSnapshotContentName, naming an object"
                ));
            }
            if let Some(class) = spec.get("volumeSnapshotClassName") {
                if !class.as_str().is_some_and(dns_subdomain) {
                    return Err(format!("{at}: volumeSnapshotClassName must be a name"));
                }
            }
        }
        "SnapshotMetadataService" => check_snapshot_metadata_service(object, &at)?,
        other => return Err(format!("{at}: no structural check for kind {other}")),
    }
    Ok(())
}

/// SnapshotMetadataService (cbt.storage.k8s.io_snapshotmetadataservices.yaml): spec.address,
/// spec.audience and spec.caCert are all required; caCert is `format: byte` (base64), and the
/// address is the host:port a backup tool dials.
fn check_snapshot_metadata_service(object: &Value, at: &str) -> Result<(), String> {
    only_keys(object, &["apiVersion", "kind", "metadata", "spec"], at)?;
    let spec = &object["spec"];
    only_keys(
        spec,
        &["address", "audience", "caCert"],
        &format!("{at} spec"),
    )?;
    for field in ["address", "audience", "caCert"] {
        if spec[field].as_str().is_none_or(str::is_empty) {
            return Err(format!("{at}: spec.{field} is required"));
        }
    }
    let address = spec["address"].as_str().unwrap_or("");
    let port_ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(format!("{at}: spec.address {address:?} is not host:port"));
    }
    let ca = spec["caCert"].as_str().unwrap_or("");
    if !base64(ca) {
        return Err(format!(
            "{at}: spec.caCert {ca:?} is not base64 (format: byte)"
        ));
    }
    Ok(())
}

/// Standard base64 with padding, as `format: byte` requires (no crate for one check).
fn base64(text: &str) -> bool {
    let body = text.trim_end_matches('=');
    text.len().is_multiple_of(4)
        && text.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}
