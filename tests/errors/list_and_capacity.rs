//! ListVolumes paging and GetCapacity: figures the CO can rely on.

use super::*;

// ---- ListVolumes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_paging_and_token_errors() {
    let mut d = TestDriver::start().await;
    let mut created = HashSet::new();
    for i in 0..5 {
        created.insert(new_volume(&mut d, &format!("list-{i}"), 8 * MIB, block_cap(snw())).await);
    }

    // max_entries = 2 visits every volume exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(&mut d, 2, &token).await.unwrap();
        pages += 1;
        assert!(page.entries.len() <= 2, "{} entries", page.entries.len());
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.clone().unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        assert_eq!(page.entries.len(), 2, "a page before the last is full");
        token = page.next_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5, "no duplicates: {seen:?}");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), created);

    // max_entries 0 (and more than there are) returns everything.
    for max in [0, 5, 1000] {
        let all = list(&mut d, max, "").await.unwrap();
        assert_eq!(all.entries.len(), 5, "max_entries {max}");
        assert!(all.next_token.is_empty());
    }

    assert_err(
        list(&mut d, -1, "").await,
        Code::InvalidArgument,
        &["max_entries"],
    );
    assert_err(
        list(&mut d, i32::MIN, "").await,
        Code::InvalidArgument,
        &["max_entries"],
    );

    let first = list(&mut d, 2, "").await.unwrap();
    let good = first.next_token.clone();
    assert!(!good.is_empty());
    assert_eq!(list(&mut d, 2, &good).await.unwrap().entries.len(), 2);
    for bogus in ["invalid-token", "x.y", ".", "1"] {
        assert_err(
            list(&mut d, 2, bogus).await,
            Code::Aborted,
            &["starting_token"],
        );
    }
    // A token whose MAC was altered.
    let mut altered = good.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == '0' { '1' } else { '0' });
    assert_err(
        list(&mut d, 2, &altered).await,
        Code::Aborted,
        &["starting_token"],
    );
    // A token pointing at another id with the same MAC.
    let (_, mac) = good.split_once('.').unwrap();
    let forged = format!("{}.{mac}", random_id());
    assert_err(
        list(&mut d, 2, &forged).await,
        Code::Aborted,
        &["starting_token"],
    );

    // A token issued before a restart.
    d.restart().await;
    assert_err(
        list(&mut d, 2, &good).await,
        Code::Aborted,
        &["starting_token"],
    );
    assert_eq!(list(&mut d, 0, "").await.unwrap().entries.len(), 5);

    // A token stays valid when the volumes it was issued after are deleted: the next page has
    // the rest, no duplicates and nothing deleted.
    let first = list(&mut d, 2, "").await.unwrap();
    let listed: Vec<String> = first
        .entries
        .iter()
        .map(|e| e.volume.clone().unwrap().volume_id)
        .collect();
    for id in &listed {
        d.delete(id).await.unwrap();
    }
    let rest = list(&mut d, 0, &first.next_token).await.unwrap();
    let rest: HashSet<String> = rest
        .entries
        .iter()
        .map(|e| e.volume.clone().unwrap().volume_id)
        .collect();
    let expected: HashSet<String> = created
        .iter()
        .filter(|id| !listed.contains(id))
        .cloned()
        .collect();
    assert_eq!(rest, expected);

    for id in &created {
        d.delete(id).await.unwrap();
    }
    assert!(d.list_all().await.is_empty());
}

// ---- GetCapacity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_reports_pool_space_and_zero_when_unusable() {
    let mut d = TestDriver::start().await;
    d.list_all().await;

    let before = pool_free(&d);
    let all = capacity(&mut d, csi::GetCapacityRequest::default()).await;
    let after = pool_free(&d);
    assert!(all.available_capacity > 0, "{all:?}");
    assert!(
        all.available_capacity <= before.max(after),
        "{} > free space {before}/{after}",
        all.available_capacity
    );
    assert_eq!(all.available_capacity % MIB, 0, "whole MiB");
    if let Some(max) = all.maximum_volume_size {
        assert!(max >= 0 && max <= before.max(after));
    }

    // Supported capabilities, this node's topology, good parameters: positive.
    let ok = capacity(
        &mut d,
        csi::GetCapacityRequest {
            volume_capabilities: vec![
                mount_cap("xfs", snw()),
                mount_cap("xfs", Mode::SingleNodeReaderOnly),
            ],
            parameters: params(&[
                ("provisioning", "thick"),
                ("csi.storage.k8s.io/pvc/name", "x"),
            ]),
            accessible_topology: Some(topology(NODE)),
        },
    )
    .await;
    assert!(ok.available_capacity > 0, "{ok:?}");

    // Another node's topology: nothing here is usable there.
    let other = capacity(
        &mut d,
        csi::GetCapacityRequest {
            accessible_topology: Some(topology("other-node")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(other.available_capacity, 0, "{other:?}");

    // Capabilities loopcsi does not serve: 0.
    for caps in [
        vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
        vec![block_cap(Mode::MultiNodeReaderOnly)],
        vec![mount_cap("btrfs", snw())],
        vec![mount_cap("ext4", snw()), block_cap(snw())],
    ] {
        let reply = capacity(
            &mut d,
            csi::GetCapacityRequest {
                volume_capabilities: caps.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(reply.available_capacity, 0, "{caps:?}: {reply:?}");
    }

    // Bad parameters: the same answer CreateVolume gives.
    for (pairs, needle) in [
        (vec![("bogus-key", "1")], "bogus-key"),
        (vec![("provisioning", "bogus")], "provisioning"),
    ] {
        assert_err(
            d.controller
                .get_capacity(csi::GetCapacityRequest {
                    parameters: params(&pairs),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &[needle],
        );
    }
    // A malformed capability is a bad request, not zero capacity.
    let mut no_mode = mount_cap("ext4", snw());
    no_mode.access_mode = None;
    assert_err(
        d.controller
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![no_mode],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["access_mode"],
    );
}

/// A volume of the reported capacity is not refused for space (thin volumes are sparse, so
/// this costs nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_figure_can_be_created() {
    let mut d = TestDriver::start().await;
    let mut created = None;
    // Other tests write to the same file system concurrently; if the pool shrank between the
    // two calls the refusal is legitimate, so ask again (a bounded number of times).
    for attempt in 0..5 {
        let reply = capacity(
            &mut d,
            csi::GetCapacityRequest {
                volume_capabilities: vec![block_cap(snw())],
                ..Default::default()
            },
        )
        .await;
        let size = reply.available_capacity;
        assert!(size > 0);
        if let Some(max) = reply.maximum_volume_size {
            assert!(max > 0, "{reply:?}");
        }
        match d
            .create(create_req(
                &format!("max-{attempt}"),
                size,
                block_cap(snw()),
            ))
            .await
        {
            Ok(vol) => {
                assert_eq!(vol.capacity_bytes, size);
                created = Some(vol.volume_id);
                break;
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "{}",
                    status.message()
                );
                let now = capacity(&mut d, csi::GetCapacityRequest::default())
                    .await
                    .available_capacity;
                assert!(
                    now < size,
                    "refused {size} bytes for space while {now} are available: {}",
                    status.message()
                );
            }
        }
    }
    let id = created.expect("a volume of the reported capacity was created");
    d.delete(&id).await.unwrap();
    assert!(d.list_all().await.is_empty());
}
