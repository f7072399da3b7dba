//! Readers of one snapshot share it: backup workers asking GetMetadataDelta on the same pair
//! of snapshots at once, restores from one snapshot at once (a StatefulSet scaling up from
//! it), and both together all succeed with the same answers; a client leaving mid-stream
//! holds nothing. (That they really overlap is shown on the fake host, in
//! `src/volume/tests/guards.rs`; here the real kernel, pools and gRPC streams.)

use super::*;
use tonic::Code;

/// Concurrent callers of each kind.
const READERS: usize = 6;

/// An unstaged block volume whose image has 4 KiB written every 64 KiB (snapshot A), then
/// every other one of those rewritten (snapshot B): a delta of 512 separate ranges. Returns
/// the driver, A and B.
async fn scattered(pool_fs: &str) -> (TestDriver, String, String) {
    let mut d = TestDriver::start_on_small_pool(pool_fs, 512).await;
    let id = d
        .create(create_req("vol", 64 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    let image = d.image_path(&id);
    write_blocks(&image, (0..1024).map(|n| (n, n)));
    let a = snapshot(&mut d, "a", &id).await.snapshot_id;
    write_blocks(&image, (0..1024).step_by(2).map(|n| (n, n + 5000)));
    let b = snapshot(&mut d, "b", &id).await.snapshot_id;
    (d, a, b)
}

/// Writes 4 KiB of `data(seed)` at every `(n, seed)`'s `n` × 64 KiB, then syncs once (a sync
/// per block costs seconds on a loaded machine).
fn write_blocks(image: &Path, blocks: impl Iterator<Item = (u64, u64)>) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    for (n, seed) in blocks {
        f.write_all_at(&data(seed, 4096), n << 16).unwrap();
    }
    f.sync_all().unwrap();
}

fn restore_req(name: &str, snapshot: &str) -> csi::CreateVolumeRequest {
    let mut req = create_req(name, 64 * MIB, block_cap(snw()));
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    req
}

/// `READERS` GetMetadataDelta streams A→B at once, each on its own connection, one range a
/// message: every one succeeds with the same 512 ranges.
async fn concurrent_deltas_agree(pool_fs: &str) {
    let (d, a, b) = scattered(pool_fs).await;
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..READERS {
        let (md, a, b) = (d.metadata().await, a.clone(), b.clone());
        streams.spawn(async move { md.delta(&a, &b, 0, 1).await });
    }
    let answers: Vec<Ranges> = streams
        .join_all()
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a concurrent GetMetadataDelta failed: {e:?}")))
        .collect();
    let expected: Vec<(i64, i64)> = (0..1024i64).step_by(2).map(|n| (n << 16, 4096)).collect();
    for answer in &answers {
        assert_eq!(answer.ranges, expected);
        assert_eq!(answer.messages, expected.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deltas_on_one_pair_of_snapshots_all_return_the_same_ranges_xfs_reflink() {
    concurrent_deltas_agree("xfs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deltas_on_one_pair_of_snapshots_all_return_the_same_ranges_ext4() {
    concurrent_deltas_agree("ext4").await;
}

/// `READERS` CreateVolume restores from snapshot B at once, while as many backup streams read
/// B: every restore succeeds with B's content byte for byte, every stream with B's ranges.
/// (On the xfs pool, as recommended; on an ext4 pool the test passes as well but its pool
/// takes half a minute to unmount on a loaded machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_restores_from_one_snapshot_all_succeed_with_identical_content() {
    let (d, _, b) = scattered("xfs").await;
    let mut restores = tokio::task::JoinSet::new();
    let mut backups = tokio::task::JoinSet::new();
    for n in 0..READERS {
        let (clients, snap) = (d.clients(), b.clone());
        restores.spawn(async move { clients.create(restore_req(&format!("r{n}"), &snap)).await });
        let (md, snap) = (d.metadata().await, b.clone());
        backups.spawn(async move { md.allocated(&snap, 0, 0).await });
    }
    let restored = restores.join_all().await;
    let read = backups.join_all().await;
    let whole = snapshot_image(&d, &b);
    let expected = std::fs::read(&whole).unwrap();
    for volume in restored {
        let volume = volume.unwrap_or_else(|e| panic!("a concurrent restore failed: {e:?}"));
        let image = d.image_path(&volume.volume_id);
        // A memcmp first: the byte-by-byte search for the first difference is slow unoptimized.
        if std::fs::read(&image).unwrap() != expected {
            assert_same_bytes(&image, &whole);
        }
    }
    for answer in read {
        let answer = answer.unwrap_or_else(|e| panic!("a backup during restores failed: {e:?}"));
        assert_eq!(answer.ranges.len(), 1024, "{answer:?}");
    }
}

/// The answer is computed under the snapshots' guards as it is streamed: a client that reads
/// one message of many and disconnects releases them (the walk ends when the server sees the
/// client go), and DeleteSnapshot of either snapshot then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_leaves_both_snapshots_free() {
    let (mut d, a, b) = scattered("xfs").await;
    let md = d.metadata().await;
    let mut stream =
        md.0.clone()
            .get_metadata_delta(csi::GetMetadataDeltaRequest {
                base_snapshot_id: a.clone(),
                target_snapshot_id: b.clone(),
                starting_offset: 0,
                max_results: 1,
                secrets: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.block_metadata.len(), 1);
    drop(stream);
    drop(md);
    // The answer is computed as it is streamed, so the snapshots are held until the server
    // sees the client go (its stream reset): DeleteSnapshot is ABORTED until then and the CO
    // retries it, as here, for at most 10 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for id in [&a, &b] {
        loop {
            let deleted = d
                .controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await;
            match deleted {
                Ok(_) => break,
                Err(e) if e.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("DeleteSnapshot {id} after the client left: {e:?}"),
            }
        }
    }
    let gone = d.metadata().await.allocated(&a, 0, 0).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}
