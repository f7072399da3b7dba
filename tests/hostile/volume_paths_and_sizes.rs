//! Hostile volume paths for stats and expansion, and hostile sizes, get the README's codes.

use super::*;

// ---- NodeGetVolumeStats and NodeExpandVolume volume_path ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_volume_paths_for_stats_and_expansion_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let vol = new_volume(&mut d, "stats", cap.clone()).await;
    let staging = d.staging("s");
    d.stage(&vol, &staging, cap.clone()).await.unwrap();
    let root = s(d.root());
    let link = d.root().join("link");
    std::os::unix::fs::symlink(&staging, &link).unwrap();

    f.refused(
        "NodeGetVolumeStats(volume_path=\"\")",
        d.node.node_get_volume_stats(stats_req(&vol, "")).await,
        &[Code::InvalidArgument],
        &["volume_path"],
    );
    for path in [
        format!("{root}/{}", "a".repeat(HUNDRED_KB)),
        format!("{root}/{}", "a/".repeat(HUNDRED_KB / 2)),
        format!("/{}", "\u{200b}".repeat(HUNDRED_KB / 3)),
        format!("{root}/staging/s\0"),
        "\0".into(),
        "relative/path".into(),
        format!("{root}/staging/s/.."),
        format!("{root}/pods/../staging/s"),
        "/".into(),
        s(&link),
        s(&d.state_dir()),
        s(&d.image_path(&vol)),
    ] {
        f.refused(
            &format!("NodeGetVolumeStats(volume_path={})", shown(&path)),
            d.node.node_get_volume_stats(stats_req(&vol, &path)).await,
            &[Code::InvalidArgument, Code::NotFound],
            &[],
        );
        f.refused(
            &format!("NodeExpandVolume(volume_path={})", shown(&path)),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: vol.clone(),
                    volume_path: path.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            &[Code::InvalidArgument, Code::NotFound],
            &[],
        );
    }
    // No hostile path grew the volume.
    let len = std::fs::metadata(d.image_path(&vol)).map(|m| m.len()).ok();
    f.check(len == Some(16 << 20), || {
        format!("NodeExpandVolume at hostile paths left the backing file at {len:?} bytes")
    });
    f.check(d.stats(&vol, &staging).await.is_ok(), || {
        "stats of the real staging path fail".into()
    });
    still_serving(&mut d).await;
    f.assert_none();
    d.unstage(&vol, &staging).await.unwrap();
    d.delete(&vol).await.unwrap();
    d.assert_clean();
}

// ---- sizes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sizes_get_the_readme_codes() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = mount_cap("ext4", snw());
    let mib = MIB;
    let largest = (i64::MAX / mib) * mib;
    let ext4_min = 16 * mib;
    let gib = 1 << 30;
    let invalid = Err(Code::InvalidArgument);
    let out_of_range = Err(Code::OutOfRange);
    let exhausted = Err(Code::ResourceExhausted);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(i64, i64, Result<i64, Code>, &str)> = vec![
        (0, 0, Ok(gib), ""),
        (1, 0, Ok(ext4_min), ""),
        (0, i64::MAX, Ok(gib), ""),
        (0, 16 * mib + 5, Ok(ext4_min), ""),
        (-1, 0, invalid, "capacity_range.required_bytes"),
        (0, -1, invalid, "capacity_range.limit_bytes"),
        (i64::MIN, 0, invalid, "capacity_range.required_bytes"),
        (0, i64::MIN, invalid, "capacity_range.limit_bytes"),
        (i64::MIN, i64::MIN, invalid, "capacity_range"),
        (-1, i64::MAX, invalid, "capacity_range.required_bytes"),
        (i64::MAX, 0, out_of_range, "capacity_range"),
        (i64::MAX - 1, 0, out_of_range, "capacity_range"),
        (i64::MAX, i64::MAX, out_of_range, "capacity_range"),
        (i64::MAX - 1, i64::MAX, out_of_range, "capacity_range"),
        (i64::MAX - 1, i64::MAX - 1, out_of_range, "capacity_range"),
        (largest + 1, 0, out_of_range, "capacity_range"),
        (i64::MAX, 1, out_of_range, "capacity_range"),
        (1, 1, out_of_range, "capacity_range"),
        (0, 1, out_of_range, "capacity_range"),
        (mib + 1, mib + 1, out_of_range, "capacity_range"),
        (ext4_min + 1, ext4_min + 1, out_of_range, "capacity_range"),
        (largest, 0, exhausted, "requested"),
        (largest - mib + 1, 0, exhausted, "requested"),
        (largest, i64::MAX, exhausted, "requested"),
        (0, largest, Ok(gib), ""),
    ];
    let mut created = Vec::new();
    for (i, (required_bytes, limit_bytes, expected, needle)) in cases.into_iter().enumerate() {
        let mut req = create_req(&format!("size-{i}"), 0, cap.clone());
        req.capacity_range = Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        });
        let what =
            format!("CreateVolume(required_bytes={required_bytes}, limit_bytes={limit_bytes})");
        let result = d.create(req).await;
        match expected {
            Ok(size) => {
                if let Some(vol) = f.ok(&what, result) {
                    f.check(vol.capacity_bytes == size, || {
                        format!("{what}: {} bytes, expected {size}", vol.capacity_bytes)
                    });
                    created.push(vol.volume_id);
                }
            }
            Err(code) => f.refused(&what, result, &[code], &[needle]),
        }
    }
    // The same sizes for a name that exists already.
    let same = d
        .create(create_req("same", 16 * mib, cap.clone()))
        .await
        .unwrap();
    created.push(same.volume_id.clone());
    for (required_bytes, limit_bytes, codes, needle) in [
        (-1, 0, vec![Code::InvalidArgument], "required_bytes"),
        (0, i64::MIN, vec![Code::InvalidArgument], "limit_bytes"),
        (i64::MAX, 0, vec![Code::AlreadyExists, Code::OutOfRange], ""),
        (
            i64::MAX - 1,
            i64::MAX,
            vec![Code::AlreadyExists, Code::OutOfRange],
            "",
        ),
    ] {
        let mut req = create_req("same", 0, cap.clone());
        req.capacity_range = Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        });
        f.refused(
            &format!("CreateVolume(existing name, required_bytes={required_bytes}, limit_bytes={limit_bytes})"),
            d.create(req).await,
            &codes,
            &[needle],
        );
    }
    // Expansion of the existing volume with the same hostile sizes. The controller does not
    // expand (EXPAND_VOLUME is the node's): UNIMPLEMENTED whatever the sizes. NodeExpandVolume,
    // which does the whole expansion, at the path where the volume is staged: the README's
    // codes, never a panic (INTERNAL), never a grown volume.
    let staging = d.staging("same");
    d.stage(&same.volume_id, &staging, cap.clone())
        .await
        .unwrap();
    for (required_bytes, limit_bytes, code, needle) in [
        (
            -1,
            0,
            Code::InvalidArgument,
            "capacity_range.required_bytes",
        ),
        (0, -1, Code::InvalidArgument, "capacity_range.limit_bytes"),
        (
            i64::MIN,
            0,
            Code::InvalidArgument,
            "capacity_range.required_bytes",
        ),
        (
            0,
            i64::MIN,
            Code::InvalidArgument,
            "capacity_range.limit_bytes",
        ),
        (i64::MIN, i64::MIN, Code::InvalidArgument, "capacity_range"),
        (
            -1,
            i64::MAX,
            Code::InvalidArgument,
            "capacity_range.required_bytes",
        ),
        (i64::MAX, 0, Code::OutOfRange, "capacity_range"),
        (i64::MAX - 1, 0, Code::OutOfRange, "capacity_range"),
        (i64::MAX, i64::MAX, Code::OutOfRange, "capacity_range"),
        (i64::MAX - 1, i64::MAX, Code::OutOfRange, "capacity_range"),
        (i64::MAX, 1, Code::OutOfRange, "capacity_range"),
        (largest + 1, 0, Code::OutOfRange, "capacity_range"),
        (largest, 0, Code::ResourceExhausted, "requested"),
        (largest - mib + 1, 0, Code::ResourceExhausted, "requested"),
        (largest, i64::MAX, Code::ResourceExhausted, "requested"),
        (mib, mib, Code::OutOfRange, "capacity_range"),
        (1, 1, Code::OutOfRange, "capacity_range"),
        (0, 1, Code::OutOfRange, "capacity_range"),
        (
            16 * mib + 1,
            16 * mib + 1,
            Code::OutOfRange,
            "capacity_range",
        ),
    ] {
        let range = Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        });
        let sizes = format!("required_bytes={required_bytes}, limit_bytes={limit_bytes}");
        f.refused(
            &format!("ControllerExpandVolume({sizes})"),
            d.controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: same.volume_id.clone(),
                    capacity_range: range,
                    ..Default::default()
                })
                .await,
            &[Code::Unimplemented],
            &["ControllerExpandVolume"],
        );
        f.refused(
            &format!("NodeExpandVolume({sizes})"),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: same.volume_id.clone(),
                    volume_path: s(&staging),
                    capacity_range: range,
                    ..Default::default()
                })
                .await,
            &[code],
            &[needle],
        );
    }
    // Ranges the volume is within, however large the limit: OK, nothing grown.
    for (required_bytes, limit_bytes) in [(0, 0), (0, i64::MAX), (16 * mib, i64::MAX), (1, 0)] {
        if let Some(reply) = f.ok(
            &format!(
                "NodeExpandVolume(required_bytes={required_bytes}, limit_bytes={limit_bytes})"
            ),
            d.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: same.volume_id.clone(),
                    volume_path: s(&staging),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes,
                        limit_bytes,
                    }),
                    ..Default::default()
                })
                .await,
        ) {
            let size = reply.into_inner().capacity_bytes;
            f.check(size == 16 * mib, || {
                format!(
                    "NodeExpandVolume(required_bytes={required_bytes}, limit_bytes={limit_bytes}): {size} bytes, expected {}",
                    16 * mib
                )
            });
        }
    }
    d.unstage(&same.volume_id, &staging).await.unwrap();
    let after = d.list_all().await;
    let size = after
        .iter()
        .find(|v| v.volume_id == same.volume_id)
        .map(|v| v.capacity_bytes);
    f.check(size == Some(16 * mib), || {
        format!("hostile expansions changed the volume to {size:?} bytes")
    });
    let len = std::fs::metadata(d.image_path(&same.volume_id))
        .map(|m| m.len())
        .ok();
    f.check(len == Some(16 << 20), || {
        format!("hostile expansions left the backing file at {len:?} bytes")
    });

    // ListVolumes paging sizes.
    for max_entries in [-1, i32::MIN] {
        f.refused(
            &format!("ListVolumes(max_entries={max_entries})"),
            d.controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries,
                    starting_token: String::new(),
                })
                .await,
            &[Code::InvalidArgument],
            &["max_entries"],
        );
    }
    if let Some(reply) = f.ok(
        "ListVolumes(max_entries=i32::MAX)",
        d.controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: i32::MAX,
                starting_token: String::new(),
            })
            .await,
    ) {
        let n = reply.into_inner().entries.len();
        f.check(n == created.len(), || {
            format!("ListVolumes lists {n} of {} volumes", created.len())
        });
    }

    // Refused sizes left nothing behind.
    let on_disk = check_state_dir(&d, &mut f);
    let expected: HashSet<String> = created.iter().cloned().collect();
    f.check(on_disk == expected, || {
        format!("state dir ids {on_disk:?}, created {expected:?}")
    });
    still_serving(&mut d).await;
    f.assert_none();
    for id in &created {
        d.delete(id).await.unwrap();
    }
}
