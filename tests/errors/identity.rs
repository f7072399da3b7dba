//! Identity: name, version, capabilities and readiness.

use super::*;

// ---- Identity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_name_version_capabilities_and_readiness() {
    let mut d = TestDriver::start().await;
    let info = d
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "loopcsi.dev");
    // csi-sanity: 2..=63 chars, a letter at both ends.
    let bytes = info.name.as_bytes();
    assert!(bytes.len() >= 2 && bytes.len() <= 63);
    assert!(bytes[0].is_ascii_alphabetic() && bytes[bytes.len() - 1].is_ascii_alphabetic());
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    use csi::plugin_capability::service::Type as Service;
    let caps = d
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use csi::plugin_capability::volume_expansion::Type as Expansion;
    let mut services = HashSet::new();
    let mut expansion = Vec::new();
    for c in &caps {
        match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => {
                services.insert(s.r#type);
            }
            Some(csi::plugin_capability::Type::VolumeExpansion(e)) => expansion.push(e.r#type),
            other => panic!("unexpected plugin capability {other:?}"),
        }
    }
    // Changed with the GroupController and SnapshotMetadata services (issue 15): they are
    // advertised as a fourth and a fifth.
    assert_eq!(caps.len(), 5, "{caps:?}");
    assert_eq!(
        services,
        HashSet::from([
            Service::ControllerService as i32,
            Service::VolumeAccessibilityConstraints as i32,
            Service::GroupControllerService as i32,
            Service::SnapshotMetadataService as i32
        ])
    );
    assert_eq!(
        expansion,
        vec![Expansion::Online as i32],
        "online volume expansion"
    );

    // Any RPC that needs the recovered state waits for recovery; after it, Probe is ready.
    d.list_all().await;
    let probe = d
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}
