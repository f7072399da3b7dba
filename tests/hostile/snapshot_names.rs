//! Snapshot names are opaque and bounded.

use super::*;

// ---- snapshot names ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_names_are_opaque_and_bounded() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let source = new_volume(&mut d, "source", block_cap(snw())).await;
    let snapshot = |name: &str| csi::CreateSnapshotRequest {
        source_volume_id: source.clone(),
        name: name.into(),
        ..Default::default()
    };
    let advertised = d
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .any(|c| {
            matches!(
                &c.r#type,
                Some(csi::controller_service_capability::Type::Rpc(rpc))
                    if rpc.r#type
                        == csi::controller_service_capability::rpc::Type::CreateDeleteSnapshot
                            as i32
            )
        });
    if !advertised {
        f.refused(
            "CreateSnapshot",
            d.controller.create_snapshot(snapshot("s")).await,
            &[Code::Unimplemented],
            &[],
        );
        still_serving(&mut d).await;
        f.assert_none();
        return;
    }

    let root = s(d.root());
    let mut snaps = Vec::new();
    for name in [
        "../../x".to_string(),
        "a/b".into(),
        "/etc/passwd".into(),
        "..".into(),
        format!("`touch {root}/pwned`"),
        "$(touch /tmp/pwned)".into(),
        format!("{source}.img"),
        source.clone(),
        "\u{202e}gpj.exe".into(),
        "zero\u{200b}width".into(),
    ] {
        let what = format!("CreateSnapshot(name={})", shown(&name));
        if let Some(reply) = f.ok(&what, d.controller.create_snapshot(snapshot(&name)).await) {
            let snap = reply.into_inner().snapshot.unwrap();
            f.check(VolumeId::parse(&snap.snapshot_id).is_some(), || {
                format!("{what}: id {:?} is not a driver id", snap.snapshot_id)
            });
            f.check(snap.snapshot_id != source, || {
                format!("{what}: the id was taken from the name")
            });
            snaps.push(snap.snapshot_id);
        }
    }
    for name in [
        String::new(),
        "a\0b".into(),
        "\u{1b}[2J".into(),
        "n".repeat(HUNDRED_KB),
        "\u{200b}".repeat(HUNDRED_KB / 3),
    ] {
        f.refused(
            &format!("CreateSnapshot(name={})", shown(&name)),
            d.controller.create_snapshot(snapshot(&name)).await,
            &[Code::InvalidArgument],
            &["name"],
        );
    }
    let mut req = snapshot("params");
    req.parameters = HashMap::from([("../x".to_string(), "k".repeat(HUNDRED_KB))]);
    f.refused(
        "CreateSnapshot(parameters=hostile)",
        d.controller.create_snapshot(req).await,
        &[Code::InvalidArgument],
        &["parameters"],
    );

    check_state_dir(&d, &mut f);
    no_shell_ran(d.root(), &mut f);
    still_serving(&mut d).await;
    f.assert_none();
    for id in &snaps {
        d.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    d.delete(&source).await.unwrap();
}
