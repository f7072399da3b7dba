//! Expansion: NodeExpandVolume grows the image, the loop device and the file system, data intact
//! (xfs online and staged, thick, raw block). Refused and pending grows: expansion_refusals.rs.

use super::*;

// ---- expansion ----
//
// Expansion is all NodeExpandVolume's, on the node that holds the volume: it grows the backing
// file to capacity_range, the loop device, and the file system at volume_path. The controller
// does not advertise EXPAND_VOLUME (in a node-local deployment the cluster's one resizer could
// not reach the other nodes' pools).

/// The length of a volume's backing file.
fn image_len(d: &TestDriver, id: &str) -> i64 {
    i64::try_from(std::fs::metadata(d.image_path(id)).unwrap().len()).unwrap()
}

/// The size ListVolumes reports for `id` (what the driver recorded).
pub(super) async fn recorded_size(d: &mut TestDriver, id: &str) -> i64 {
    d.list_all()
        .await
        .into_iter()
        .find(|v| v.volume_id == id)
        .unwrap_or_else(|| panic!("{id} is listed"))
        .capacity_bytes
}

/// statvfs' total bytes of the file system mounted at `path`.
pub(super) fn fs_total(path: &Path) -> i64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    i64::try_from(st.blocks() * st.fragment_size()).unwrap()
}

/// Asserts the volume, its backing file and (when attached) its loop device all have `size`.
#[track_caller]
pub(super) fn assert_sizes(d: &TestDriver, id: &str, size: i64, after: &str) {
    assert_eq!(image_len(d, id), size, "backing file after {after}");
    if let Some(dev) = d.loop_device_of(id) {
        assert_eq!(device_size(&dev.path()), size, "loop device after {after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_expands_online_while_written() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("xfs", snw());
    let vol = d
        .create(create_req("grow-xfs", 300 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let (staging, target) = mount_volume(&mut d, &id, "grow-xfs", &cap).await;
    let before = bytes_total(&mut d, &id, &target).await;
    let kept = write_synced(&target.join("kept.bin"), &pattern(3, 4 << 20));

    let writer = Writer::start(&target.join("live.bin"), 11, 256);
    let grown = expand(&mut d, &id, &target, 400 * MIB, 0).await.unwrap();
    assert_eq!(grown.capacity_bytes, 400 * MIB);
    writer.assert_progress("the expansion");
    assert_sizes(&d, &id, 400 * MIB, "the expansion");
    assert_eq!(recorded_size(&mut d, &id).await, 400 * MIB);
    let after = bytes_total(&mut d, &id, &target).await;
    assert!(
        (before + 99 * MIB..=400 * MIB).contains(&after),
        "statvfs total {after} after growing from {before}"
    );
    assert_eq!(fs_total(&target), after);
    assert_eq!(fs_total(&staging), after);

    // Nothing to do, OK with the current size: a repeat, a smaller required_bytes, a range the
    // volume is within, and no capacity_range at all (just grow the file system to the device,
    // here at the staging path, where the file system is too).
    for (what, req) in [
        ("a repeat", expand_req(&id, &target, Some((400 * MIB, 0)))),
        (
            "a smaller required_bytes",
            expand_req(&id, &target, Some((350 * MIB, 0))),
        ),
        (
            "a range the volume is within",
            expand_req(&id, &target, Some((0, 500 * MIB))),
        ),
        (
            "no capacity_range, at the staging path",
            expand_req(&id, &staging, None),
        ),
    ] {
        let again = node_expand(&mut d, req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(again.capacity_bytes, 400 * MIB, "{what}");
        assert_sizes(&d, &id, 400 * MIB, what);
        assert_eq!(bytes_total(&mut d, &id, &target).await, after, "{what}");
    }

    // Shrinking is refused and changes nothing.
    assert_code(
        expand(&mut d, &id, &target, 300 * MIB, 300 * MIB).await,
        Code::OutOfRange,
        "shrinking",
    );
    assert_sizes(&d, &id, 400 * MIB, "a refused shrink");
    writer.assert_progress("a refused shrink");

    let written = writer.finish();
    assert_eq!(
        file_checksum(&target.join("live.bin")),
        checksum(&ring_image(11, 256, written)),
        "the writer's data is intact after {written} chunks"
    );
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);
    assert_eq!(recorded_size(&mut d, &id).await, 400 * MIB);

    unmount_volume(&mut d, &id, &staging, &target).await;
    // The new size survives a re-stage.
    let (staging, target) = mount_volume(&mut d, &id, "grow-xfs", &cap).await;
    assert_sizes(&d, &id, 400 * MIB, "a re-stage");
    assert_eq!(bytes_total(&mut d, &id, &target).await, after);
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);
    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// Staged but not published (the kubelet's NodeExpandVolume at the staging path): the whole
/// expansion still happens, rounded up to a whole MiB as CreateVolume rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_expands_while_staged_not_published() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("xfs", snw());
    let vol = d
        .create(create_req("grow-staged", 300 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let staging = d.staging("grow-staged");
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    let kept = write_synced(&staging.join("kept.bin"), &pattern(4, 4 << 20));
    let before = bytes_total(&mut d, &id, &staging).await;

    // Its target is not where the volume is (yet): NOT_FOUND, nothing grown.
    let target = d.target("grow-staged");
    assert_code(
        expand(&mut d, &id, &target, 400 * MIB, 0).await,
        Code::NotFound,
        &id,
    );
    assert_sizes(
        &d,
        &id,
        300 * MIB,
        "NodeExpandVolume at an unpublished target",
    );

    let grown = expand(&mut d, &id, &staging, 350 * MIB + 1, 0)
        .await
        .unwrap();
    assert_eq!(grown.capacity_bytes, 351 * MIB, "rounded up to a whole MiB");
    assert_sizes(&d, &id, 351 * MIB, "the expansion");
    assert_eq!(recorded_size(&mut d, &id).await, 351 * MIB);
    let after = bytes_total(&mut d, &id, &staging).await;
    assert!(
        (before + 50 * MIB..=351 * MIB).contains(&after),
        "statvfs total {after} after growing from {before}"
    );
    assert_eq!(fs_total(&staging), after);

    // Published afterwards, the pod sees the grown file system and the data.
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(bytes_total(&mut d, &id, &target).await, after);
    assert_eq!(fs_total(&target), after);
    assert_eq!(file_checksum(&target.join("kept.bin")), kept);
    // And a repeat at the target is OK with the size.
    let again = expand(&mut d, &id, &target, 350 * MIB + 1, 0)
        .await
        .unwrap();
    assert_eq!(again.capacity_bytes, 351 * MIB);
    assert_eq!(bytes_total(&mut d, &id, &target).await, after);

    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

/// Thick volumes stay fully allocated (and thin ones sparse) through expansions, each on a new
/// attachment: the size also survives an unstage and a re-stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thick_volume_stays_fully_allocated_after_expansion() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());
    let thick = d
        .create(with_params(
            create_req("grow-thick", 16 * MIB, cap.clone()),
            &[("provisioning", "thick")],
        ))
        .await
        .unwrap()
        .volume_id;
    let thin = d
        .create(create_req("grow-thin", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    assert!(allocated(&d.image_path(&thick)) >= 16 * MIB);

    let mut previous = 16 * MIB;
    for size in [32 * MIB, 48 * MIB] {
        for (tag, vol) in [("thick", &thick), ("thin", &thin)] {
            let (staging, target) = mount_volume(&mut d, vol, tag, &cap).await;
            assert_eq!(device_size(&target), previous, "{tag} attached again");
            let grown = expand(&mut d, vol, &target, size, 0).await.unwrap();
            assert_eq!(grown.capacity_bytes, size);
            assert_sizes(&d, vol, size, tag);
            assert_eq!(device_size(&target), size, "{tag} at its target");
            unmount_volume(&mut d, vol, &staging, &target).await;
        }
        assert!(
            allocated(&d.image_path(&thick)) >= size,
            "a thick volume stays fully allocated: {} of {size}",
            allocated(&d.image_path(&thick))
        );
        assert!(
            allocated(&d.image_path(&thin)) < 4 * MIB,
            "a thin volume stays sparse: {}",
            allocated(&d.image_path(&thin))
        );
        previous = size;
    }
    d.delete(&thick).await.unwrap();
    d.delete(&thin).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_expands_while_published() {
    let mut d = TestDriver::start().await;
    let cap = block_cap(snw());
    let vol = d
        .create(create_req("grow-block", 16 * MIB, cap.clone()))
        .await
        .unwrap();
    let id = vol.volume_id.clone();
    let (staging, target) = mount_volume(&mut d, &id, "grow-block", &cap).await;
    let data = pattern(5, 1 << 20);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.write_all(&data).unwrap();
        dev.sync_all().unwrap();
    }
    assert_eq!(device_size(&target), 16 * MIB);

    let grown = expand(&mut d, &id, &target, 48 * MIB, 0).await.unwrap();
    assert_eq!(grown.capacity_bytes, 48 * MIB);
    assert_eq!(
        device_size(&target),
        48 * MIB,
        "the device at the target has the new size"
    );
    assert_sizes(&d, &id, 48 * MIB, "the expansion");
    let dev = d.loop_device_of(&id).unwrap();
    let sectors: i64 = std::fs::read_to_string(format!("/sys/block/loop{}/size", dev.0))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(sectors * 512, 48 * MIB);
    assert_eq!(bytes_total(&mut d, &id, &target).await, 48 * MIB);
    assert_eq!(recorded_size(&mut d, &id).await, 48 * MIB);
    // Repeats, with and without a capacity_range: OK, nothing changes.
    for req in [
        expand_req(&id, &target, Some((48 * MIB, 0))),
        expand_req(&id, &target, None),
    ] {
        assert_eq!(
            node_expand(&mut d, req).await.unwrap().capacity_bytes,
            48 * MIB
        );
        assert_eq!(device_size(&target), 48 * MIB);
    }
    assert_code(
        expand(&mut d, &id, &target, 32 * MIB, 32 * MIB).await,
        Code::OutOfRange,
        "shrinking",
    );
    assert_eq!(device_size(&target), 48 * MIB);

    let tail = pattern(6, 1 << 20);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(46 << 20)).unwrap();
        dev.write_all(&tail).unwrap();
        dev.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.read_exact(&mut back).unwrap();
        assert!(back == data, "data before the expansion is intact");
        dev.seek(SeekFrom::Start(46 << 20)).unwrap();
        dev.read_exact(&mut back).unwrap();
        assert!(back == tail, "the new range is usable");
    }
    unmount_volume(&mut d, &id, &staging, &target).await;
    d.delete(&id).await.unwrap();
    d.assert_clean();
}
