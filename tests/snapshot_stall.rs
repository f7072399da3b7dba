//! How long an application's writes stall while a live ext4 volume is snapshotted on a pool
//! without reflink (this machine's ext4): the figures of "Snapshot write stall" in
//! docs/benchmarks.md. A measurement, not a test (it asserts nothing about time); run it with
//! `cargo test --test snapshot_stall -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use loopcsi::csi;

const GIB: i64 = 1 << 30;

/// An application: 4 KiB writes, each followed by fdatasync, over a 64 MiB file; remembers the
/// longest write (write + fdatasync) since the last `take_max`.
struct Writer {
    stop: Arc<AtomicBool>,
    max_ns: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(path: std::path::PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_ns = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, m, w) = (stop.clone(), max_ns.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::create(&path).unwrap();
            file.set_len(64 << 20).unwrap();
            let block = [0x5au8; 4096];
            let mut offset = 0u64;
            while !s.load(Ordering::Relaxed) {
                let started = Instant::now();
                file.write_all_at(&block, offset).unwrap();
                file.sync_data().unwrap();
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                m.fetch_max(took, Ordering::Relaxed);
                w.fetch_add(1, Ordering::Relaxed);
                offset = (offset + 4096 * 17) % (64 << 20);
            }
        });
        Writer {
            stop,
            max_ns,
            writes,
            thread: Some(thread),
        }
    }

    /// Waits until two more writes have completed, so a write that was blocked during the
    /// phase just ended is counted in it.
    fn settle(&self) {
        let seen = self.writes.load(Ordering::Relaxed);
        while self.writes.load(Ordering::Relaxed) < seen + 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn take_max(&self) -> (Duration, u64) {
        self.settle();
        (
            Duration::from_nanos(self.max_ns.swap(0, Ordering::Relaxed)),
            self.writes.swap(0, Ordering::Relaxed),
        )
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/benchmarks.md"]
async fn write_stall_while_a_live_1g_ext4_volume_is_snapshotted() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("pvc-stall", GIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("s");
    d.stage(&id, &staging, cap).await.unwrap();
    // 900 MiB of data to copy.
    {
        let fill = std::fs::File::create(staging.join("fill")).unwrap();
        let chunk: Vec<u8> = (0..(8 << 20)).map(|i: u32| (i % 251) as u8).collect();
        for i in 0..112u64 {
            fill.write_all_at(&chunk, i * (8 << 20)).unwrap();
        }
        fill.sync_all().unwrap();
    }
    let writer = Writer::start(staging.join("app"));
    std::thread::sleep(Duration::from_secs(2)); // a baseline, not readiness
    let (base, n) = writer.take_max();
    println!("baseline: longest write {base:?} over {n} writes");

    let image = d.image_path(&id);
    let mut snapshots = Vec::new();
    for round in 0..2 {
        // The old behaviour: frozen for the whole copy (and its flush).
        let copy = d.root().join(format!("frozen-copy-{round}.img"));
        writer.take_max();
        let started = Instant::now();
        let fs = std::fs::File::open(&staging).unwrap();
        loopcsi::host::loopdev::freeze_fs(&fs).unwrap();
        let copied = loopcsi::host::files::copy_sparse(&image, &copy, GIB as u64, GIB as u64);
        loopcsi::host::loopdev::thaw_fs(&fs).unwrap();
        drop(fs);
        let took = started.elapsed();
        let (stall, n) = writer.take_max();
        std::fs::remove_file(&copy).unwrap();
        println!(
            "frozen copy: {} bytes in {took:?}; longest write {stall:?} ({n} writes)",
            copied.unwrap().data_bytes
        );

        // CreateSnapshot as it is now.
        writer.take_max();
        let started = Instant::now();
        let snap = d
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: format!("snap-stall-{round}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        let took = started.elapsed();
        let (stall, n) = writer.take_max();
        println!("CreateSnapshot: {took:?}; longest write {stall:?} ({n} writes)");
        snapshots.push(snap.snapshot_id);
    }
    drop(writer);
    for snapshot_id in snapshots {
        d.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
}
