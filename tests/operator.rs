//! Operating loopcsi: the Prometheus metrics endpoint, and the `status` and `gc` commands run
//! beside a live driver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

/// GET `path` from the metrics server with a plain HTTP/1.1 request; returns (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the first sample line that starts with `series`.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_rpcs_volumes_pool_and_devices() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let id = d
        .create(create_req("metered", 32 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("s"), d.target("p"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let _ = d.delete("not-a-volume-id").await;
    assert_code(
        d.unstage(&id, &staging).await,
        tonic::Code::FailedPrecondition,
        "published",
    );

    let addr = d.metrics_address();
    let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &body,
            r#"loopcsi_rpc_requests_total{method="CreateVolume",code="Ok"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"loopcsi_rpc_requests_total{method="NodeUnstageVolume",code="FailedPrecondition"}"#
        ),
        1.0
    );
    assert!(
        body.contains(r#"loopcsi_rpc_duration_seconds_bucket{le="#),
        "latency histogram"
    );
    assert_eq!(sample(&body, r#"loopcsi_volumes{state="created"}"#), 1.0);
    assert_eq!(sample(&body, r#"loopcsi_volumes{state="staged"}"#), 1.0);
    assert_eq!(sample(&body, r#"loopcsi_volumes{state="published"}"#), 1.0);
    assert_eq!(sample(&body, "loopcsi_loop_devices_attached"), 1.0);
    assert!(sample(&body, "loopcsi_pool_capacity_bytes") > 0.0);
    assert!(sample(&body, "loopcsi_pool_available_bytes") > 0.0);
    assert!(
        sample(&body, "loopcsi_pool_allocated_bytes") > 0.0,
        "mkfs wrote something"
    );
    let (status, _) = tokio::task::spawn_blocking(move || http_get(addr, "/other"))
        .await
        .unwrap();
    assert_eq!(status, 404);

    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    let (_, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(sample(&body, r#"loopcsi_volumes{state="staged"}"#), 0.0);
    assert_eq!(sample(&body, "loopcsi_loop_devices_attached"), 0.0);
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

fn loopcsi(args: &[&str], state_dir: &Path) -> (bool, String, String) {
    loopcsi_logging(args, state_dir, "warn")
}

/// `loopcsi args --state-dir state_dir` with `RUST_LOG=log`: (success, stdout, stderr).
fn loopcsi_logging(args: &[&str], state_dir: &Path, log: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loopcsi"))
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .env("RUST_LOG", log)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `loopcsi(args)` on a blocking thread, so the in-process driver keeps serving meanwhile.
async fn loopcsi_beside(args: &'static [&'static str], state_dir: &Path) -> (bool, String, String) {
    let state_dir = state_dir.to_path_buf();
    tokio::task::spawn_blocking(move || loopcsi(args, &state_dir))
        .await
        .unwrap()
}

/// Every path under `dir` with its size and modification time.
fn snapshot_tree(dir: &Path) -> Vec<(std::path::PathBuf, u64, SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            }
            out.push((entry.path(), meta.len(), meta.modified().unwrap()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_volumes_beside_a_live_driver_and_changes_nothing() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("xfs", snw());
    let id = d
        .create(create_req("shown", 300 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let other = d
        .create(create_req("idle", 8 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (d.staging("s"), d.target("p"));
    d.stage(&id, &staging, cap.clone()).await.unwrap();
    d.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let state = d.state_dir();
    let before = snapshot_tree(&state);

    let (ok, table, stderr) = loopcsi_beside(&["status"], &state).await;
    assert!(ok, "{stderr}");
    let header = table.lines().next().unwrap();
    for column in [
        "ID",
        "NAME",
        "SIZE",
        "ALLOCATED",
        "FS",
        "DEVICE",
        "STAGED",
        "PUBLISHED",
        "HEALTH",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .expect("the staged volume is listed");
    assert!(
        row.contains("shown") && row.contains("xfs") && row.contains("/dev/loop"),
        "{row}"
    );
    assert!(
        row.contains(&*staging.to_string_lossy()) && row.contains(&*target.to_string_lossy()),
        "{row}"
    );
    assert!(
        row.contains("300.0 MiB") && row.contains("healthy"),
        "{row}"
    );
    assert!(table
        .lines()
        .any(|l| l.starts_with(&other) && l.contains("block")));

    let (ok, json, stderr) = loopcsi_beside(&["status", "--json"], &state).await;
    assert!(ok, "{stderr}");
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let volumes = parsed.as_array().unwrap();
    assert_eq!(volumes.len(), 2);
    let shown = volumes.iter().find(|v| v["id"] == id.as_str()).unwrap();
    assert_eq!(shown["capacity_bytes"], 300 * MIB);
    assert_eq!(shown["staged_at"], staging.to_string_lossy().as_ref());
    assert_eq!(shown["healthy"], true);
    assert!(shown["loop_device"]
        .as_str()
        .unwrap()
        .starts_with("/dev/loop"));

    assert_eq!(
        snapshot_tree(&state),
        before,
        "status changed nothing in the state dir"
    );
    let (ok, _, stderr) =
        tokio::task::spawn_blocking(|| loopcsi(&["status"], Path::new("/nonexistent-loopcsi")))
            .await
            .unwrap();
    assert!(!ok && stderr.contains("--state-dir"), "{stderr}");

    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.delete(&other).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_lists_then_removes_only_old_orphans_beside_a_live_driver() {
    let mut d = TestDriver::start().await;
    let live = d
        .create(create_req("live", 8 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("s");
    d.stage(&live, &staging, block_cap(snw())).await.unwrap();
    let volumes = d.state_dir().join("volumes");
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    let make = |name: String, old: bool| {
        let path = volumes.join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        if old {
            file.set_modified(long_ago).unwrap();
        }
        path
    };
    let old_orphan = make(format!("{}.img", uuid::Uuid::new_v4()), true);
    let old_temp = make(format!("{}.json.tmp", uuid::Uuid::new_v4()), true);
    // Young: could be a CreateVolume in flight in the running driver.
    let young_orphan = make(format!("{}.img", uuid::Uuid::new_v4()), false);

    let state = d.state_dir();
    let (ok, listed, stderr) = loopcsi_beside(&["gc", "--dry-run"], &state).await;
    assert!(ok, "{stderr}");
    assert!(
        listed.contains(&*old_orphan.to_string_lossy())
            && listed.contains(&*old_temp.to_string_lossy()),
        "{listed}"
    );
    assert!(listed.lines().all(|l| l.starts_with("would ")), "{listed}");
    assert!(
        !listed.contains(&*young_orphan.to_string_lossy()),
        "{listed}"
    );
    assert!(
        old_orphan.exists() && old_temp.exists(),
        "--dry-run removes nothing"
    );

    // Removing is refused while the driver serves the state dir (its reconciler collects the
    // same orphans without racing its own operations); the message names the driver's PID.
    let (ok, _, refused) = loopcsi_beside(&["gc"], &state).await;
    assert!(
        !ok && refused.contains(&format!("PID {}", std::process::id())),
        "{refused}"
    );
    assert!(
        old_orphan.exists() && old_temp.exists(),
        "a refused gc removes nothing"
    );

    d.stop().await;
    let (ok, removed, stderr) = loopcsi_beside(&["gc"], &state).await;
    assert!(ok, "{stderr}");
    assert_eq!(removed.lines().count(), 2, "{removed}");
    assert!(!old_orphan.exists() && !old_temp.exists());
    assert!(young_orphan.exists(), "a young file is left alone");
    assert!(
        d.loop_device_of(&live).is_some(),
        "the live volume's device is untouched"
    );
    assert!(d.image_path(&live).exists());

    let (ok, nothing, _) = loopcsi_beside(&["gc", "--min-age", "0"], &state).await;
    assert!(ok);
    assert!(
        nothing.contains(&*young_orphan.to_string_lossy()),
        "{nothing}"
    );
    d.restart().await;
    d.unstage(&live, &staging).await.unwrap();
    d.delete(&live).await.unwrap();
    d.assert_clean();
}

/// A pool on a file system that cannot keep the commit points consistent across a power loss
/// (ext4 without a journal) is named, loudly, by `status` and at driver startup (the same
/// check); a journaled pool draws no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_without_a_journal_is_warned_about() {
    let mut journal_less =
        TestDriver::start_on_small_pool_with("ext4", 64, &["-O", "^has_journal"]).await;
    // The driver lays out its pool when its state is recovered, after it binds: an RPC that
    // needs the pool returns only once it is there.
    journal_less.list_all().await;
    let state = journal_less.state_dir();
    let (ok, _, stderr) = loopcsi_beside(&["status"], &state).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("has no journal"),
        "status must warn about a journal-less pool:\n{stderr}"
    );
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    let layout = loopcsi::volume::pool::Layout::prepare(
        &state,
        std::sync::Arc::new(loopcsi::host::linux::Linux::new(
            loopcsi::host::tools::Tools::discover().unwrap(),
        )),
    )
    .unwrap();
    assert!(layout.durability_warning().is_some());
    journal_less.assert_clean();
    drop(journal_less);

    let mut journaled = TestDriver::start_on_small_pool("ext4", 64).await;
    journaled.list_all().await;
    let layout = loopcsi::volume::pool::Layout::prepare(
        &journaled.state_dir(),
        std::sync::Arc::new(loopcsi::host::linux::Linux::new(
            loopcsi::host::tools::Tools::discover().unwrap(),
        )),
    )
    .unwrap();
    assert_eq!(layout.durability_warning(), None);
    let (ok, _, stderr) = loopcsi_beside(&["status"], &journaled.state_dir()).await;
    assert!(ok && !stderr.contains("journal"), "{stderr}");
    journaled.assert_clean();
}

/// Metadata that cannot be read is listed by `status`, marked unreadable with its path and the
/// reason (in the table and in --json), never silently left out; and each volume shows whether
/// the driver formatted its file system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_unreadable_metadata_and_what_the_driver_formatted() {
    let mut d = TestDriver::start().await;
    let cap = mount_cap("ext4", snw());
    let staged = d
        .create(create_req("staged", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let fresh = d
        .create(create_req("fresh", 16 * MIB, cap.clone()))
        .await
        .unwrap()
        .volume_id;
    let block = d
        .create(create_req("raw", 8 * MIB, block_cap(snw())))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("s");
    d.stage(&staged, &staging, cap.clone()).await.unwrap();
    // Another volume's metadata, damaged behind the driver's back.
    let broken = uuid::Uuid::new_v4().to_string();
    let broken_meta = d.state_dir().join("volumes").join(format!("{broken}.json"));
    std::fs::write(&broken_meta, b"{ not json").unwrap();
    let state = d.state_dir();

    let (ok, table, stderr) = loopcsi_beside(&["status"], &state).await;
    assert!(ok, "{stderr}");
    assert!(
        table.lines().next().unwrap().contains("FORMATTED"),
        "{table}"
    );
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} is listed:\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // ID NAME SIZE(2 words) ALLOCATED(2 words) FS FORMATTED ...
    assert_eq!(row(&staged)[7], "yes", "{table}");
    assert_eq!(row(&fresh)[7], "no", "{table}");
    assert_eq!(row(&block)[7], "-", "{table}");
    let broken_row = table
        .lines()
        .find(|l| l.starts_with(&broken))
        .unwrap_or_else(|| {
            panic!("the unreadable volume is listed:\n{table}");
        });
    assert!(
        broken_row.contains("UNREADABLE")
            && broken_row.contains(&*broken_meta.to_string_lossy())
            && broken_row.contains("line 1"),
        "marked, with the path and serde's reason: {broken_row}"
    );

    let (ok, json, stderr) = loopcsi_beside(&["status", "--json"], &state).await;
    assert!(ok, "{stderr}");
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let entries = parsed.as_array().unwrap();
    assert_eq!(entries.len(), 4, "{json}");
    let entry = |id: &str| entries.iter().find(|v| v["id"] == id).unwrap();
    assert_eq!(entry(&staged)["formatted"], true);
    assert_eq!(entry(&fresh)["formatted"], false);
    let unreadable = entry(&broken);
    assert_eq!(unreadable["unreadable"], true, "{json}");
    assert_eq!(unreadable["healthy"], false, "{json}");
    assert_eq!(unreadable["path"], broken_meta.to_string_lossy().as_ref());
    assert!(
        unreadable["reason"].as_str().unwrap().contains("line 1"),
        "{json}"
    );

    std::fs::remove_file(&broken_meta).unwrap();
    d.unstage(&staged, &staging).await.unwrap();
    for id in [&staged, &fresh, &block] {
        d.delete(id).await.unwrap();
    }
    d.assert_clean();
}

/// `gc` prints each orphan once: on stdout, not also as a log line on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_prints_each_line_once() {
    let mut d = TestDriver::start().await;
    let state = d.state_dir();
    d.stop().await;
    let orphan = state
        .join("volumes")
        .join(format!("{}.img", uuid::Uuid::new_v4()));
    std::fs::File::create(&orphan)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let path = orphan.to_string_lossy().into_owned();
    for args in [&["gc", "--dry-run"][..], &["gc"]] {
        let (ok, out, err) = tokio::task::spawn_blocking({
            let state = state.clone();
            move || loopcsi_logging(args, &state, "info")
        })
        .await
        .unwrap();
        assert!(ok, "{err}");
        let printed = out.matches(&path).count() + err.matches(&path).count();
        assert_eq!(printed, 1, "{args:?} stdout:\n{out}\nstderr:\n{err}");
    }
    assert!(!orphan.exists());
}

/// Two in-process drivers on one state dir: the second `bind` is refused, naming the PID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_in_process_driver_on_the_same_state_dir_is_refused() {
    let d = TestDriver::start().await;
    let config = config_for(&d.root().join("second.sock"), d.state_dir());
    let err = loopcsi::server::bind(&config).err().expect("refused");
    assert!(
        err.to_string()
            .contains(&format!("PID {}", std::process::id())),
        "{err}"
    );
    assert!(!d.root().join("second.sock").exists(), "it bound nothing");
    d.assert_clean();
}
