#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Keeps the benchmark from rotting: runs `loopcsi-bench --smoke` (a tiny configuration of every
//! section, a few seconds, against real loop devices, mkfs, mounts and fio) and checks only that
//! it succeeds, prints every report section, writes its JSON, and leaves nothing behind. No
//! timing is asserted. Needs root and fio, like the rest of the suite needs root.

use std::path::Path;
use std::process::Command;

use loopcsi::host::{loopdev, mount};

#[test]
fn bench_smoke_runs_every_section_and_cleans_up() {
    let dir = tempfile::Builder::new()
        .prefix("loopcsi-bench-smoke-")
        .tempdir()
        .unwrap();
    let pool = dir.path().canonicalize().unwrap();
    let json = pool.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loopcsi-bench"))
        .arg("--smoke")
        .arg("--pool-dir")
        .arg(&pool)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run loopcsi-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loopcsi-bench --smoke failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for section in [
        "## Machine",
        "## Data path",
        "### ram pool",
        "## Provisioning",
        "## Scale",
        "## Snapshot write stall",
        "## Changed-block tracking",
        "## Targets",
    ] {
        assert!(
            stdout.contains(section),
            "the report lacks {section:?}:\n{stdout}"
        );
    }

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(!report["data"].as_array().unwrap().is_empty());
    assert!(!report["provision"]["lifecycles"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(report["scale"]["volumes"].as_u64().unwrap() > 0);
    assert_eq!(report["cbt"]["exact"], serde_json::Value::Bool(true));
    assert!(!report["targets"].as_array().unwrap().is_empty());

    // Nothing left: no files but the report, no mounts, no loop devices under the pool dir.
    let left: Vec<_> = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &json)
        .collect();
    assert_eq!(left, Vec::<std::path::PathBuf>::new(), "files left behind");
    assert_nothing_attached_or_mounted_under(&pool);
}

fn assert_nothing_attached_or_mounted_under(root: &Path) {
    let mounts: Vec<_> = mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| m.mount_point)
        .collect();
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    let devices: Vec<_> = loopdev::attached()
        .unwrap()
        .into_iter()
        .filter(|(_, file)| file.starts_with(root))
        .collect();
    assert!(devices.is_empty(), "loop devices left behind: {devices:?}");
}
