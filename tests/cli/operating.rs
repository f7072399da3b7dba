//! What an operator meets: the RPC log lines, one driver per state dir and its node id, the
//! startup line and one-line errors, and the README's Quick start as written.

use super::*;

// ---- 6. logs ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rpc_logs_its_method_and_code() {
    let dir = Dir::new();
    let mut child = Child::spawn(dir.serve_env("n1"));
    child.wait_listening().await;
    let channel = connect(dir.socket()).await;

    NodeClient::new(channel.clone())
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo returns OK");
    let line = child.wait_for_line("NodeGetInfo").await;
    assert_eq!(
        field(&line, "rpc.method").as_deref(),
        Some("NodeGetInfo"),
        "the RPC line carries rpc.method: {line}"
    );
    assert_eq!(
        field(&line, "grpc.code").as_deref(),
        Some("OK"),
        "the RPC line carries grpc.code: {line}"
    );

    // A refused RPC logs its code too.
    let refused = ControllerClient::new(channel)
        .controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
        .await
        .expect_err("ControllerPublishVolume is not supported");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    let line = child.wait_for_line("ControllerPublishVolume").await;
    assert_eq!(
        field(&line, "rpc.method").as_deref(),
        Some("ControllerPublishVolume"),
        "{line}"
    );
    assert_eq!(
        field(&line, "grpc.code").as_deref(),
        Some("Unimplemented"),
        "{line}"
    );

    child.signal(Signal::SIGTERM);
    assert_clean_exit(child.finish().await);
}

#[test]
fn log_parsing_helpers() {
    let line = "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                \u{1b}[1mrpc\u{1b}[0m{\u{1b}[3mrpc.method\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"Probe\"}: \
                loopcsi::service: done \u{1b}[3mgrpc.code\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"OK\" \
                duration_us=3";
    let plain = strip_ansi(line);
    assert!(!plain.contains('\u{1b}'), "{plain}");
    assert_eq!(field(&plain, "rpc.method").as_deref(), Some("Probe"));
    assert_eq!(field(&plain, "grpc.code").as_deref(), Some("OK"));
    assert_eq!(field(&plain, "duration_us").as_deref(), Some("3"));
    assert_eq!(
        field(
            "x{rpc.method=\"A\"}: m: failed grpc.code=NotFound",
            "grpc.code"
        )
        .as_deref(),
        Some("NotFound")
    );
    assert_eq!(field("xgrpc.code=1", "grpc.code"), None);
}

// ---- 7. one driver per state dir, and the node id it was first served with ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_driver_on_the_same_state_dir_is_refused_with_the_holders_pid() {
    let dir = Dir::new();
    let mut first = Child::spawn(dir.serve_env("n1"));
    first.wait_listening().await;
    let kept = connect(dir.socket()).await;

    // Its own socket, the first one's state dir: only the state dir is contended.
    let other = dir.root.join("other.sock");
    let mut cmd = loopcsi();
    cmd.env("CSI_ENDPOINT", format!("unix://{}", other.display()))
        .env("NODE_ID", "n1")
        .arg("serve")
        .arg("--state-dir")
        .arg(dir.state_dir());
    let done = run(cmd).await;
    let pid = first.pid.to_string();
    assert_failed(
        &done,
        &[
            &format!("PID {pid}"),
            "one driver per state dir",
            &dir.state_dir().display().to_string(),
        ],
    );
    assert!(
        std::fs::symlink_metadata(&other).is_err(),
        "the refused driver bound nothing"
    );

    // The first keeps serving, and its lock file is still there.
    probe_ok(kept).await;
    probe_ok(connect(dir.socket()).await).await;
    first.signal(Signal::SIGTERM);
    assert_clean_exit(first.finish().await);
    assert!(dir.state_dir().join("lock").exists(), "the lock file stays");

    // Once the first is gone, the state dir is free again.
    let mut second = Child::spawn(dir.serve_env("n1"));
    second.wait_listening().await;
    second.signal(Signal::SIGTERM);
    assert_clean_exit(second.finish().await);
}

/// Serves `cmd` until listening, checks NodeGetInfo names `node_id`, stops it cleanly.
async fn serve_once_as(dir: &Dir, cmd: Command, node_id: &str) {
    let mut child = Child::spawn(cmd);
    child.wait_listening().await;
    let info = NodeClient::new(connect(dir.socket()).await)
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo returns OK")
        .into_inner();
    assert_eq!(info.node_id, node_id);
    child.signal(Signal::SIGTERM);
    assert_clean_exit(child.finish().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_node_id_is_refused_unless_the_operator_allows_it() {
    let dir = Dir::new();
    serve_once_as(&dir, dir.serve_env("node-a"), "node-a").await;
    let recorded = dir.state_dir().join("node-id");
    assert_eq!(std::fs::read_to_string(&recorded).unwrap(), "node-a\n");

    let done = run(dir.serve_env("node-b")).await;
    assert_failed(
        &done,
        &["\"node-a\"", "\"node-b\"", "--allow-node-id-change"],
    );
    assert!(!dir.socket().exists(), "nothing is bound");
    assert_eq!(
        std::fs::read_to_string(&recorded).unwrap(),
        "node-a\n",
        "a refused start changes nothing"
    );

    // The flag (here through its env fallback) says the node really was renamed.
    let mut allowed = dir.serve_env("node-b");
    allowed.env("ALLOW_NODE_ID_CHANGE", "true");
    serve_once_as(&dir, allowed, "node-b").await;
    assert_eq!(std::fs::read_to_string(&recorded).unwrap(), "node-b\n");
    // From then on the new id is the recorded one.
    serve_once_as(&dir, dir.serve_env("node-b"), "node-b").await;
}

// ---- 8. what an operator sees: the startup line, errors ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_logs_version_node_state_dir_driver_name_and_direct_io() {
    let dir = Dir::new();
    let mut cmd = dir.serve_env("n1");
    cmd.arg("--buffered-io");
    let mut child = Child::spawn(cmd);
    let line = child.wait_for_line("starting loopcsi").await;
    assert!(line.contains("INFO"), "{line}");
    let state_dir = dir.state_dir().display().to_string();
    for (name, value) in [
        ("version", env!("CARGO_PKG_VERSION")),
        ("node.id", "n1"),
        ("state_dir", state_dir.as_str()),
        ("driver.name", "loopcsi.dev"),
        ("direct_io.requested", "false"),
    ] {
        assert_eq!(
            field(&line, name).as_deref(),
            Some(value),
            "{name} in {line}"
        );
    }
    child.wait_listening().await;
    child.signal(Signal::SIGTERM);
    assert_clean_exit(child.finish().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_error_is_one_line_without_a_backtrace() {
    let dir = Dir::new();
    // A file where the state dir should be: an I/O error with an OS cause.
    std::fs::write(dir.state_dir(), b"not a directory\n").unwrap();
    for args in [
        vec!["status", "--state-dir"],
        vec!["serve", "--node-id", "n1", "--state-dir"],
    ] {
        let mut cmd = loopcsi();
        cmd.env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "1")
            .env("CSI_ENDPOINT", dir.endpoint())
            .args(&args)
            .arg(dir.state_dir());
        let done = run(cmd).await;
        assert_eq!(
            done.status.code(),
            Some(1),
            "{args:?}: exit code 1; stderr:\n{}",
            done.stderr
        );
        let errors: Vec<&str> = done
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: one error line:\n{}",
            done.stderr
        );
        assert!(
            errors[0].contains(&dir.state_dir().display().to_string()),
            "{args:?}: the error names the path: {}",
            errors[0]
        );
        for noise in ["backtrace", "Backtrace", "Caused by", "Error: "] {
            assert!(
                !done.stderr.contains(noise),
                "{args:?}: no {noise:?} in:\n{}",
                done.stderr
            );
        }
    }
}

// ---- 9. the README's Quick start, as written ----

/// The words of a command line as a POSIX shell splits them (whitespace outside double
/// quotes), enough for the README's commands; `$(hostname -s)` is the only substitution.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let short = host.trim().split('.').next().unwrap().to_string();
    words
        .into_iter()
        .map(|w| w.replace("$(hostname -s)", &short))
        .collect()
}

/// Quick start command 1 of README.md: the `cargo run ...` part of its first command line.
fn readme_command_1() -> (String, String) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## Quick start")
        .nth(1)
        .expect("README.md has a Quick start section");
    let section = section.split("\n## ").next().unwrap();
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Quick start has a sh block");
    let mut lines = block.lines().skip_while(|l| !l.starts_with("# 1."));
    lines.next().expect("a `# 1.` comment");
    let command = lines
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .expect("command 1 follows its comment");
    let cargo = command
        .split(" && ")
        .find(|part| part.trim_start().starts_with("cargo run"))
        .expect("command 1 runs `cargo run`")
        .trim()
        .to_string();
    (section.to_string(), cargo)
}

/// `cargo metadata` of this package (no build, no network): what `cargo run` would pick.
fn cargo_package_metadata() -> serde_json::Value {
    let out = Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "loopcsi")
        .cloned()
        .expect("the loopcsi package")
}

/// Starts `cmd` on a thread that first enters a private mount namespace with its own empty
/// /var/lib and /run (tmpfs) and `run_dir` bound at /run/loopcsi: a command that uses the
/// driver's defaults can run as written without touching a real install's /var/lib/loopcsi or
/// /run/loopcsi. The child inherits the thread's namespace; the namespace, its tmpfs and the
/// state in it vanish when the child exits. Mount propagation is made private first, so
/// nothing mounted here is seen outside.
fn spawn_in_private_mounts(cmd: Command, run_dir: PathBuf) -> Child {
    use nix::mount::{mount, MsFlags};
    std::thread::spawn(move || {
        // CLONE_NEWNS implies CLONE_FS: only this thread (and what it spawns) leaves the
        // test process's mount namespace.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        let none: Option<&str> = None;
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
            .expect("make / private");
        for dir in ["/var/lib", "/run"] {
            mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            )
            .unwrap_or_else(|e| panic!("tmpfs on {dir}: {e}"));
        }
        std::fs::create_dir("/run/loopcsi").unwrap();
        mount(Some(&run_dir), "/run/loopcsi", none, MsFlags::MS_BIND, none)
            .expect("bind the test's run dir");
        Child::spawn(cmd)
    })
    .join()
    .expect("the namespace thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_command_1_serves_as_written() {
    let (section, cargo_run) = readme_command_1();
    let package = cargo_package_metadata();

    // `cargo run` must be able to choose the binary, and the stated toolchain must build it.
    assert_eq!(
        package["default_run"], "loopcsi",
        "Cargo.toml needs default-run = \"loopcsi\" for the README's `cargo run`"
    );
    let rust_version = package["rust_version"].as_str().expect("rust-version");
    assert!(
        section.contains(&format!("Rust ≥ {rust_version}")),
        "the Quick start must state Cargo.toml's rust-version {rust_version}"
    );

    // Building a release binary from a test would take many minutes and contend for the build
    // directory with the test run itself, so `cargo run --release --` (which default-run, checked
    // above, makes start the `loopcsi` binary) is replaced by the binary this test run built;
    // every argument after it is run as written.
    let words = shell_words(&cargo_run);
    assert_eq!(
        words.get(..4),
        Some(&["cargo", "run", "--release", "--"].map(String::from)[..]),
        "{cargo_run}"
    );
    let args = &words[4..];
    assert_eq!(
        args.first().map(String::as_str),
        Some("serve"),
        "{cargo_run}"
    );
    let endpoint = args
        .iter()
        .position(|a| a == "--endpoint")
        .and_then(|i| args.get(i + 1))
        .expect("command 1 gives --endpoint");
    assert_eq!(
        endpoint, "unix:///run/loopcsi/csi.sock",
        "the test maps /run/loopcsi to its own dir; update it with the README"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--state-dir")),
        "command 1 uses the default state dir, which the test hides in a private namespace"
    );

    let dir = Dir::new();
    let run_dir = dir.root.join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let socket = run_dir.join("csi.sock");
    let mut cmd = loopcsi();
    cmd.args(args);
    let mut child = spawn_in_private_mounts(cmd, run_dir);

    let started = child.wait_for_line("starting loopcsi").await;
    assert_eq!(
        field(&started, "state_dir").as_deref(),
        Some("/var/lib/loopcsi"),
        "the default state dir: {started}"
    );
    child.wait_listening().await;
    // Ready once state recovery is done: ask again after each answer, bounded by LIMIT.
    let channel = connect(socket.clone()).await;
    let ready = tokio::time::timeout(LIMIT, async {
        loop {
            let reply = IdentityClient::new(channel.clone())
                .probe(csi::ProbeRequest {})
                .await
                .expect("Probe returns OK")
                .into_inner();
            if reply.ready == Some(true) {
                break;
            }
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "not ready within {LIMIT:?}:\n{}",
        child.log()
    );

    child.signal(Signal::SIGTERM);
    let done = child.finish().await;
    drop(channel);
    let stderr = done.stderr.clone();
    assert_clean_exit(done);
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the socket is removed; stderr:\n{stderr}"
    );
}
