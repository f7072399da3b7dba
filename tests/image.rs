//! The image builder (deploy/image/build.sh, no Docker) and the Dockerfile stay in agreement.
//!
//! Read here with a parser of its own, the Dockerfile's runtime stage says: the base (Debian
//! release, `-slim`), the packages `apt-get install` adds, where COPY puts the binary, the
//! ENTRYPOINT, and nothing else (no USER, ENV, LABEL, CMD, WORKDIR, EXPOSE, VOLUME, ...: the
//! builder would have to learn each). The builder's own reading of the Dockerfile
//! (deploy/image/dockerfile.py) must say the same and refuse what it does not reproduce, and an
//! image it builds must carry all of it: its config (entrypoint, no cmd, no user, Debian's PATH
//! and nothing else, no labels), its manifest's base annotation, and in its layer the binary at
//! the COPY destination, the entrypoint resolving to it through PATH, the packages in
//! /var/lib/dpkg/status, the release in /usr/lib/os-release and the tools the driver runs.
//!
//! Building the image fetches Debian packages with `apt-get download` (network to the Debian
//! mirror in the host's apt sources; the .debs are cached under target/) and needs a host that
//! runs the Dockerfile's Debian release: `built_image_matches_the_dockerfile` fails with the
//! builder's message where either is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the Dockerfile's runtime stage sets.
#[derive(Debug, PartialEq)]
struct Runtime {
    base: String,
    release: String,
    packages: Vec<String>,
    binary_path: String,
    entrypoint: Vec<String>,
}

/// Instructions (keyword upper-cased, arguments whitespace-normalised), comments dropped and
/// continuation lines joined.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, rest) = l.split_once(' ').unwrap_or((l, ""));
            (
                k.to_ascii_uppercase(),
                rest.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn runtime_stage(dockerfile: &str) -> Runtime {
    let all = instructions(dockerfile);
    let mut global = BTreeMap::new();
    for (k, rest) in all.iter().take_while(|(k, _)| k != "FROM") {
        if let ("ARG", Some((key, value))) = (k.as_str(), rest.split_once('=')) {
            global.insert(key.to_string(), value.to_string());
        }
    }
    let last_from = all.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let stage = &all[last_from..];
    let mut base = stage[0].1.clone();
    for (key, value) in &global {
        base = base.replace(&format!("${{{key}}}"), value);
    }
    let release = base
        .strip_prefix("debian:")
        .and_then(|b| b.strip_suffix("-slim"))
        .unwrap_or_else(|| panic!("the runtime is {base}, not debian:<release>-slim"))
        .to_string();
    assert_eq!(
        Some(&release),
        global.get("DEBIAN_RELEASE"),
        "the runtime's release is ARG DEBIAN_RELEASE (the builder stage's too)"
    );
    let mut runtime = Runtime {
        base,
        release,
        packages: Vec::new(),
        binary_path: String::new(),
        entrypoint: Vec::new(),
    };
    for (k, rest) in &stage[1..] {
        match k.as_str() {
            "ARG" => assert_eq!(rest, "DEBIAN_FRONTEND=noninteractive"),
            "RUN" => {
                let install = rest
                    .split("&&")
                    .map(str::trim)
                    .find_map(|c| c.strip_prefix("apt-get install -y --no-install-recommends "))
                    .unwrap_or_else(|| panic!("a RUN the builder does not reproduce: {rest}"));
                runtime.packages = install.split(' ').map(str::to_string).collect();
            }
            "COPY" => {
                let words: Vec<&str> = rest.split(' ').collect();
                assert_eq!(words[0], "--from=builder", "COPY {rest}");
                runtime.binary_path = words[2].to_string();
            }
            "ENTRYPOINT" => {
                runtime.entrypoint = serde_json::from_str(rest).expect("ENTRYPOINT in exec form");
            }
            other => panic!(
                "the runtime stage has {other} {rest}: teach deploy/image/build.sh (and this \
                 test) to reproduce it"
            ),
        }
    }
    runtime
}

/// The builder's own reading (dockerfile.py prints shell assignments).
fn builders_reading(dockerfile: &Path) -> Result<Runtime, String> {
    let out = Command::new("python3")
        .arg(repo().join("deploy/image/dockerfile.py"))
        .arg(dockerfile)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    // Evaluate the assignments with bash, the way build.sh does, and print them plainly.
    let shown = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{text}\nprintf '%s\\n' \"$base\" \"$release\" \"$packages\" \"$binary_path\" \"${{entrypoint[*]}}\""
        ))
        .output()
        .unwrap();
    let lines: Vec<String> = String::from_utf8(shown.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    Ok(Runtime {
        base: lines[0].clone(),
        release: lines[1].clone(),
        packages: lines[2].split(' ').map(str::to_string).collect(),
        binary_path: lines[3].clone(),
        entrypoint: lines[4].split(' ').map(str::to_string).collect(),
    })
}

#[test]
fn the_builder_reads_the_dockerfile_as_this_test_does() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let ours = runtime_stage(&dockerfile);
    assert_eq!(builders_reading(&repo().join("Dockerfile")).unwrap(), ours);
    assert_eq!(ours.packages, ["e2fsprogs", "xfsprogs", "util-linux"]);

    // Whatever else the runtime stage could set, the builder refuses instead of building a
    // different image.
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        "USER 65534",
        "ENV RUST_LOG=debug",
        "LABEL org.opencontainers.image.source=x",
        "CMD [\"serve\"]",
        "WORKDIR /var/lib/loopcsi",
        "EXPOSE 9898",
        "VOLUME /var/lib/loopcsi",
        "RUN apt-get update && apt-get install -y kmod",
        "STOPSIGNAL SIGINT",
    ] {
        let changed = dir.path().join("Dockerfile");
        std::fs::write(&changed, format!("{dockerfile}\n{extra}\n")).unwrap();
        let refused = builders_reading(&changed).expect_err(extra);
        assert!(
            refused.contains("teach deploy/image/build.sh"),
            "{extra}: {refused}"
        );
    }
}

/// `tar -tvf` of `archive`: one line per member.
fn tar_list(archive: &Path) -> Vec<String> {
    let out = Command::new("tar")
        .args(["-tvf"])
        .arg(archive)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The bytes of `member` of `archive`.
fn tar_read(archive: &Path, member: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .args(["-xOf"])
        .arg(archive)
        .arg(member)
        .output()
        .unwrap();
    assert!(out.status.success(), "{member} in {}", archive.display());
    out.stdout
}

fn blob(archive: &Path, digest: &str) -> Vec<u8> {
    tar_read(
        archive,
        &format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap()),
    )
}

#[test]
fn built_image_matches_the_dockerfile() {
    let runtime = runtime_stage(&std::fs::read_to_string(repo().join("Dockerfile")).unwrap());
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("loopcsi.tar");
    let binary = env!("CARGO_BIN_EXE_loopcsi");
    let debs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-debs");
    let started = std::time::Instant::now();
    let built = Command::new(repo().join("deploy/image/build.sh"))
        .args([
            "--binary",
            binary,
            "--name",
            "loopcsi.test/loopcsi:image-test",
        ])
        .arg("--debs")
        .arg(&debs)
        .arg(&archive)
        .env("TMPDIR", work.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "deploy/image/build.sh failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    eprintln!(
        "built in {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&built.stdout).trim()
    );

    // The index names the image; the manifest names its base.
    let index: Value = serde_json::from_slice(&tar_read(&archive, "index.json")).unwrap();
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["annotations"]["io.containerd.image.name"],
        "loopcsi.test/loopcsi:image-test"
    );
    let manifest: Value =
        serde_json::from_slice(&blob(&archive, desc["digest"].as_str().unwrap())).unwrap();
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.base.name"],
        runtime.base.as_str()
    );
    let config: Value = serde_json::from_slice(&blob(
        &archive,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(runtime.entrypoint));
    // ENTRYPOINT in a Dockerfile clears the base image's CMD; no USER, LABEL or WORKDIR.
    assert!(c["Cmd"].is_null(), "{c}");
    assert!(c["User"].is_null() || c["User"] == "", "{c}");
    assert!(c["Labels"].is_null(), "{c}");
    assert!(c["WorkingDir"].is_null() || c["WorkingDir"] == "/", "{c}");
    // The debian image's one variable, and no ENV of the Dockerfile's.
    let path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    assert_eq!(c["Env"], serde_json::json!([format!("PATH={path}")]));

    // The layer.
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
    let layer = work.path().join("layer.tar");
    std::fs::write(&layer, blob(&archive, layer_digest)).unwrap();
    let listing = tar_list(&layer);
    let entry = |name: &str| {
        listing
            .iter()
            .find(|l| l.ends_with(&format!(" {name}")) || l.contains(&format!(" {name} -> ")))
            .cloned()
    };
    let bin = runtime.binary_path.trim_start_matches('/');
    let line = entry(bin).unwrap_or_else(|| panic!("no {bin} in the layer"));
    assert!(line.starts_with("-rwxr-xr-x root/root"), "{line}");
    assert_eq!(
        tar_read(&layer, bin),
        std::fs::read(binary).unwrap(),
        "the layer's {bin} is not the binary given"
    );
    // The entrypoint, resolved through PATH as the runtime does, is the binary.
    let resolved = path
        .split(':')
        .map(|d| format!("{}/{}", d.trim_start_matches('/'), runtime.entrypoint[0]))
        .find(|p| entry(p).is_some());
    assert_eq!(resolved.as_deref(), Some(bin));

    let status = String::from_utf8(tar_read(&layer, "var/lib/dpkg/status")).unwrap();
    for package in runtime.packages.iter().chain([&"base-files".to_string()]) {
        assert!(
            status.contains(&format!(
                "Package: {package}\nStatus: install ok installed\n"
            )),
            "{package} is not in the image's /var/lib/dpkg/status"
        );
    }
    let os_release = String::from_utf8(tar_read(&layer, "usr/lib/os-release")).unwrap();
    assert!(
        os_release.contains(&format!("VERSION_CODENAME={}\n", runtime.release)),
        "{os_release}"
    );
    // The tools the driver runs (host/tools.rs), from those packages.
    for tool in [
        "blkid",
        "mkfs.ext4",
        "e2fsck",
        "resize2fs",
        "mkfs.xfs",
        "xfs_growfs",
    ] {
        assert!(
            ["sbin", "usr/sbin", "bin", "usr/bin"]
                .iter()
                .any(|d| entry(&format!("{d}/{tool}")).is_some()),
            "{tool} is not in the image"
        );
    }
}
