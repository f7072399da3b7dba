//! Hostile StorageClass and mutable parameters are refused; sidecar keys stay opaque.

use super::*;

// ---- StorageClass and mutable parameters ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_parameters_are_refused_and_sidecar_keys_opaque() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = block_cap(snw());
    let real = new_volume(&mut d, "real", cap.clone()).await;
    let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let long = "k".repeat(HUNDRED_KB);
    let bad: Vec<HashMap<String, String>> = vec![
        map(&[("../x", "1")]),
        map(&[("/etc/passwd", "x")]),
        map(&[("provisioning\0", "thin")]),
        map(&[("\u{202e}provisioning", "thin")]),
        map(&[("provisioning\u{200b}", "thin")]),
        map(&[("Provisioning", "thin")]),
        map(&[("csi.storage.k8s.io", "x")]),
        map(&[(long.as_str(), "v")]),
        map(&[("provisioning", "thin; rm -rf /")]),
        map(&[("provisioning", "$(touch /tmp/pwned)")]),
        map(&[("provisioning", "thin\0")]),
        map(&[("provisioning", long.as_str())]),
        map(&[("fsType", "ext4 -O x")]),
    ];
    for (i, params) in bad.iter().enumerate() {
        let what = |rpc: &str| format!("{rpc}(parameters={})", shown(&format!("{params:?}")));
        let mut req = create_req(&format!("params-{i}"), MIB, cap.clone());
        req.parameters = params.clone();
        f.refused(
            &what("CreateVolume"),
            d.create(req).await,
            &[Code::InvalidArgument],
            &["parameters"],
        );
        f.refused(
            &what("GetCapacity"),
            d.controller
                .get_capacity(csi::GetCapacityRequest {
                    parameters: params.clone(),
                    ..Default::default()
                })
                .await,
            &[Code::InvalidArgument],
            &["parameters"],
        );
        let mut validate = validate_req(&real, cap.clone());
        validate.parameters = params.clone();
        if let Some(reply) = f.ok(
            &what("ValidateVolumeCapabilities"),
            d.controller.validate_volume_capabilities(validate).await,
        ) {
            let reply = reply.into_inner();
            f.check(reply.confirmed.is_none(), || {
                format!("{}: confirmed", what("ValidateVolumeCapabilities"))
            });
            f.check(
                reply.message.contains("parameters") && reply.message.len() < MAX_MESSAGE,
                || {
                    format!(
                        "{}: message {} is unbounded or does not name parameters",
                        what("ValidateVolumeCapabilities"),
                        shown(&reply.message)
                    )
                },
            );
        }
    }
    let mut req = create_req("mutable", MIB, cap.clone());
    req.mutable_parameters = map(&[("../x", &long)]);
    f.refused(
        "CreateVolume(mutable_parameters=hostile)",
        d.create(req).await,
        &[Code::InvalidArgument],
        &["mutable_parameters"],
    );

    // Keys the sidecars own are accepted, and their values never become paths.
    let mut req = create_req("sidecar", MIB, cap.clone());
    req.parameters = map(&[
        ("csi.storage.k8s.io/../../x", "y"),
        ("csi.storage.k8s.io/pvc/name", "../../etc/passwd"),
        ("csi.storage.k8s.io/pvc/namespace", "/tmp/pwned"),
        ("csi.storage.k8s.io/pv/name", "$(touch /tmp/pwned)"),
    ]);
    let sidecar = f.ok("CreateVolume(sidecar parameters)", d.create(req).await);

    check_state_dir(&d, &mut f);
    no_shell_ran(d.root(), &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    if let Some(vol) = sidecar {
        d.delete(&vol.volume_id).await.unwrap();
    }
    d.delete(&real).await.unwrap();
    assert!(d.list_all().await.is_empty(), "volumes left");
}
