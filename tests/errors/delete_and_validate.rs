//! DeleteVolume and ValidateVolumeCapabilities: errors, unknown ids and answers.

use super::*;

// ---- DeleteVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_errors_and_unknown_ids() {
    let mut d = TestDriver::start().await;
    assert_err(d.delete("").await, Code::InvalidArgument, &["volume_id"]);
    for unknown in [
        "fake-vol-id".to_string(),
        "../../etc".to_string(),
        "/".to_string(),
        random_id(),
        random_id().to_uppercase(),
    ] {
        d.delete(&unknown)
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume({unknown:?}): {e:?}"));
    }

    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "del-staged", 16 * MIB, cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    assert_err(d.delete(&id).await, Code::FailedPrecondition, &[&id]);
    assert!(
        d.image_path(&id).exists(),
        "a refused delete keeps the data"
    );
    assert_eq!(d.list_all().await.len(), 1);
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.delete(&id).await.unwrap();
    assert!(!d.image_path(&id).exists());
    assert!(d.list_all().await.is_empty());
    d.assert_clean();
}

// ---- ValidateVolumeCapabilities ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_volume_capabilities_errors_and_answers() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = new_volume(&mut d, "val", 16 * MIB, cap.clone()).await;
    let validate =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };

    assert_err(
        d.controller
            .validate_volume_capabilities(validate("", vec![cap.clone()]))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_err(
        d.controller
            .validate_volume_capabilities(validate(&id, vec![]))
            .await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    // Required fields win over NOT_FOUND.
    assert_err(
        d.controller
            .validate_volume_capabilities(validate(&random_id(), vec![]))
            .await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    for unknown in [random_id(), "fake-vol-id".to_string()] {
        assert_err(
            d.controller
                .validate_volume_capabilities(validate(&unknown, vec![cap.clone()]))
                .await,
            Code::NotFound,
            &[&unknown],
        );
    }
    let mut no_mode = cap.clone();
    no_mode.access_mode = None;
    assert_err(
        d.controller
            .validate_volume_capabilities(validate(&id, vec![no_mode]))
            .await,
        Code::InvalidArgument,
        &["access_mode"],
    );

    // Supported: confirmed, echoing the capabilities.
    let supported = vec![
        cap.clone(),
        mount_cap("", Mode::SingleNodeReaderOnly),
        mount_cap("ext4", Mode::SingleNodeMultiWriter),
    ];
    let mut req = validate(&id, supported.clone());
    req.volume_context = params(&[("k", "v")]);
    let reply = d
        .controller
        .validate_volume_capabilities(req)
        .await
        .unwrap()
        .into_inner();
    let confirmed = reply
        .confirmed
        .expect("supported capabilities are confirmed");
    assert_eq!(confirmed.volume_capabilities, supported);
    assert_eq!(confirmed.volume_context, params(&[("k", "v")]));

    // Unsupported: OK, nothing confirmed, and a message saying why.
    for (caps, why) in [
        (vec![block_cap(snw())], "block"),
        (vec![cap.clone(), block_cap(snw())], "block"),
        (vec![mount_cap("xfs", snw())], "xfs"),
        (
            vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            vec![mount_cap("ext4", Mode::MultiNodeReaderOnly)],
            "MULTI_NODE_READER_ONLY",
        ),
    ] {
        let reply = d
            .controller
            .validate_volume_capabilities(validate(&id, caps.clone()))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.confirmed.is_none(), "{caps:?} confirmed");
        assert!(
            reply.message.contains(why),
            "message {:?} does not mention {why:?}",
            reply.message
        );
    }
    d.delete(&id).await.unwrap();
}
