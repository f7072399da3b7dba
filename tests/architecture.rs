//! The architecture as a test, so it is a fact and not a convention (docs/architecture.md):
//! - imports run only downwards: `service` → `volume` → `host`; `router` (beside `service`)
//!   reaches neither. `host/` knows nothing of the
//!   domain or of CSI; `volume/` knows nothing of gRPC, the services or the metrics;
//! - the domain reaches the OS only through `host/`: no raw `std::fs`, sysfs or procfs in
//!   `volume/` or `service/` (the file-system paths the domain computes are data, not I/O);
//! - the operation guards are taken in one place, the door: `volume/volumes.rs` (and its parts
//!   under `volume/volumes/`);
//! - no file of the driver over 600 lines and no function over 80, so each stays readable
//!   whole.
//!
//! It reads the sources only; it needs no root and no device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;

fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !is_test_code(&path) {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") && !is_test_code(&path) {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    out.sort();
    out
}

/// Unit tests kept in files of their own (`tests.rs`, `tests/`): test code, not the driver.
fn is_test_code(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "tests.rs")
        || path.components().any(|c| c.as_os_str() == "tests")
            && path.starts_with(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// The code of a file before its unit tests (`#[cfg(test)]` modules are test code).
fn production(text: &str) -> &str {
    text.find("\n#[cfg(test)]\nmod tests")
        .map_or(text, |end| &text[..end])
}

/// Lines of `text` outside comments that contain `needle`.
fn code_lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    production(text)
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .filter(|l| l.contains(needle))
        .collect()
}

fn relative(path: &Path) -> String {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn imports_run_only_downwards() {
    let mut wrong = Vec::new();
    let rules: &[(&str, &[&str])] = &[
        (
            "src/host",
            &[
                "crate::volume",
                "crate::service",
                "crate::csi",
                "crate::metrics",
                "tonic",
            ],
        ),
        // The group snapshot router is an outer layer like service/: it asks the driver over
        // its CSI socket, never the domain or the OS directly.
        (
            "src/router",
            &["crate::volume", "crate::host", "crate::service"],
        ),
        (
            "src/volume",
            &[
                "crate::service",
                "crate::csi",
                "crate::metrics",
                "crate::server",
                "tonic::",
            ],
        ),
    ];
    for (dir, forbidden) in rules {
        for (path, text) in sources(dir) {
            for needle in *forbidden {
                for line in code_lines_with(&text, needle) {
                    wrong.push(format!("{}: {}", relative(&path), line.trim()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that run upwards:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_domain_reaches_the_os_only_through_host() {
    let mut wrong = Vec::new();
    for dir in ["src/volume", "src/service"] {
        for (path, text) in sources(dir) {
            for needle in [
                "std::fs",
                "/proc/",
                "/sys/",
                "OpenOptions",
                ".canonicalize()",
            ] {
                for line in code_lines_with(&text, needle) {
                    wrong.push(format!("{}: {}", relative(&path), line.trim()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "OS access outside host/:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn operation_guards_are_taken_in_one_place() {
    let mut wrong = Vec::new();
    for (path, text) in sources("src") {
        let file = relative(&path);
        // The door: volumes.rs and its parts under volumes/ (one file per group of use cases).
        let door = file == "src/volume/volumes.rs" || file.starts_with("src/volume/volumes/");
        if door || file == "src/volume/locks.rs" {
            continue;
        }
        for needle in [
            "locks.volume(",
            "locks.volume_read(",
            "locks.snapshot(",
            "locks.snapshot_read(",
            "locks.freeze(",
            "locks.name(",
            "try_lock(LockKey",
        ] {
            for line in code_lines_with(&text, needle) {
                wrong.push(format!("{file}: {}", line.trim()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "operation guards taken outside volume/volumes.rs:\n{}",
        wrong.join("\n")
    );
}

/// Functions longer than `MAX_FN_LINES`, found by their opening line and the closing brace at
/// the same indentation (rustfmt's layout).
fn long_functions(path: &Path, text: &str) -> Vec<String> {
    let lines: Vec<&str> = production(text).lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let starts_fn = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "async fn ",
            "pub async fn ",
        ]
        .iter()
        .any(|p| trimmed.starts_with(p))
            || (trimmed.starts_with("pub(") && trimmed.contains(") fn "));
        if starts_fn && !trimmed.ends_with(';') {
            let close = format!("{indent}}}");
            let end = (i..lines.len()).find(|&j| lines[j] == close).unwrap_or(i);
            let length = end - i + 1;
            if length > MAX_FN_LINES {
                out.push(format!(
                    "{}:{}: {} lines: {}",
                    relative(path),
                    i + 1,
                    length,
                    trimmed
                ));
            }
            i = end;
        }
        i += 1;
    }
    out
}

#[test]
fn files_and_functions_stay_small() {
    let mut wrong = Vec::new();
    for (path, text) in sources("src") {
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            wrong.push(format!("{}: {lines} lines", relative(&path)));
        }
        wrong.extend(long_functions(&path, &text));
    }
    assert!(
        wrong.is_empty(),
        "over {MAX_FILE_LINES} lines per file or {MAX_FN_LINES} per function:\n{}",
        wrong.join("\n")
    );
}
