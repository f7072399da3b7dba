//! Starting and stopping: help, serving from env and flags, graceful shutdown on SIGTERM and
//! SIGINT, what is at the socket path before the start, and bad flags failing fast.

use super::*;

// ---- 1. help ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_the_serve_command() {
    let mut cmd = loopcsi();
    cmd.arg("--help");
    let done = run(cmd).await;
    assert!(done.status.success(), "--help exits 0: {:?}", done.status);
    assert!(
        done.stdout.contains("serve"),
        "--help names the serve command:\n{}",
        done.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_help_documents_every_flag_env_and_default() {
    let mut cmd = loopcsi();
    cmd.args(["serve", "--help"]);
    let done = run(cmd).await;
    assert!(
        done.status.success(),
        "serve --help exits 0: {:?}",
        done.status
    );
    for needle in [
        "--endpoint",
        "--node-id",
        "--state-dir",
        "--driver-name",
        "--max-volumes-per-node",
        "--buffered-io",
        "CSI_ENDPOINT",
        "NODE_ID",
        "/var/lib/loopcsi",
    ] {
        assert!(
            done.stdout.contains(needle),
            "serve --help does not mention {needle:?}:\n{}",
            done.stdout
        );
    }
}

// ---- 2. serving, env fallbacks, graceful shutdown ----

/// Starts through the env fallbacks, checks the socket, Probe and NodeGetInfo, then stops the
/// server with `signal` while a client connection is still open.
async fn serve_and_stop_with(signal: Signal) {
    let dir = Dir::new();
    let mut child = Child::spawn(dir.serve_env("n1"));
    let listening = child.wait_listening().await;
    assert!(
        listening.contains(&dir.socket().display().to_string()),
        "the listening line names the socket: {listening}"
    );
    assert_socket_mode(&dir.socket());

    let channel = connect(dir.socket()).await;
    probe_ok(channel.clone()).await;
    let info = NodeClient::new(channel.clone())
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo returns OK")
        .into_inner();
    assert_eq!(info.node_id, "n1", "NODE_ID is the node id");
    assert_eq!(
        info.accessible_topology
            .expect("NodeGetInfo reports topology")
            .segments
            .get(loopcsi::config::TOPOLOGY_KEY)
            .map(String::as_str),
        Some("n1")
    );

    // Like kubelet, the client keeps its connection open across the shutdown.
    child.signal(signal);
    let done = child.finish().await;
    drop(channel);
    assert!(
        done.status.success(),
        "{signal} is a clean shutdown (exit 0), got {:?}; stderr:\n{}",
        done.status,
        done.stderr
    );
    assert!(
        std::fs::symlink_metadata(dir.socket()).is_err(),
        "the socket is removed on {signal}; stderr:\n{}",
        done.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_env_and_stops_cleanly_on_sigterm() {
    serve_and_stop_with(Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_env_and_stops_cleanly_on_sigint() {
    serve_and_stop_with(Signal::SIGINT).await;
}

/// "listening" is the readiness line, so from then on a shutdown signal must be graceful (exit
/// 0, socket removed), not the default action of the signal. Repeated a few times because the
/// window this guards against is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_listening_is_graceful() {
    for _ in 0..10 {
        let dir = Dir::new();
        let mut child = Child::spawn(dir.serve_env("n1"));
        child.wait_listening().await;
        child.signal(Signal::SIGTERM);
        let done = child.finish().await;
        let stderr = done.stderr.clone();
        assert_clean_exit(done);
        assert!(
            std::fs::symlink_metadata(dir.socket()).is_err(),
            "the socket is removed; stderr:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_override_env() {
    let dir = Dir::new();
    let mut cmd = dir.serve_env("env-node");
    cmd.args(["--node-id", "flag-node", "--max-volumes-per-node", "7"]);
    let mut child = Child::spawn(cmd);
    child.wait_listening().await;
    assert_socket_mode(&dir.socket());
    let info = NodeClient::new(connect(dir.socket()).await)
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo returns OK")
        .into_inner();
    assert_eq!(info.node_id, "flag-node", "--node-id wins over NODE_ID");
    assert_eq!(info.max_volumes_per_node, 7);
    child.signal(Signal::SIGTERM);
    assert_clean_exit(child.finish().await);
}

// ---- 3./4. what is at the socket path before the start ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced() {
    let dir = Dir::new();
    drop(std::os::unix::net::UnixListener::bind(dir.socket()).unwrap());
    assert!(
        std::fs::symlink_metadata(dir.socket())
            .unwrap()
            .file_type()
            .is_socket(),
        "the stale socket file is left behind"
    );

    let mut child = Child::spawn(dir.serve_env("n1"));
    child.wait_listening().await;
    assert_socket_mode(&dir.socket());
    probe_ok(connect(dir.socket()).await).await;

    child.signal(Signal::SIGTERM);
    let done = child.finish().await;
    assert!(done.status.success(), "stderr:\n{}", done.stderr);
    assert!(std::fs::symlink_metadata(dir.socket()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regular_file_at_the_socket_path_is_not_replaced() {
    let dir = Dir::new();
    std::fs::write(dir.socket(), b"not a socket\n").unwrap();

    let done = run(dir.serve_env("n1")).await;
    assert_failed(&done, &[&dir.socket().display().to_string()]);
    let meta = std::fs::symlink_metadata(dir.socket()).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the file is still a regular file"
    );
    assert_eq!(
        std::fs::read(dir.socket()).unwrap(),
        b"not a socket\n",
        "the file is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_not_taken_over() {
    let dir = Dir::new();
    let mut first = Child::spawn(dir.serve_env("n1"));
    first.wait_listening().await;
    let kept = connect(dir.socket()).await;

    // Same endpoint; its own state dir, so only the socket is contended.
    let done = run(dir.serve_env_with_state("n1", &dir.root.join("state-2"))).await;
    assert_failed(&done, &[&dir.socket().display().to_string()]);

    // The first keeps serving: on the open connection, and to new clients through the same
    // socket file (which the second must not have removed).
    probe_ok(kept.clone()).await;
    assert_socket_mode(&dir.socket());
    probe_ok(connect(dir.socket()).await).await;

    first.signal(Signal::SIGTERM);
    let first_done = first.finish().await;
    assert!(
        first_done.status.success(),
        "stderr:\n{}",
        first_done.stderr
    );
    assert!(std::fs::symlink_metadata(dir.socket()).is_err());
}

// ---- 5. bad flags fail fast ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_node_id_is_refused() {
    let dir = Dir::new();
    let mut cmd = loopcsi();
    cmd.args(["serve", "--node-id", "bad/id", "--endpoint"])
        .arg(dir.endpoint())
        .arg("--state-dir")
        .arg(dir.state_dir());
    let done = run(cmd).await;
    assert_failed(&done, &["--node-id", "bad/id"]);
    assert!(!dir.socket().exists(), "nothing is bound on a bad config");
    assert!(
        !dir.state_dir().exists(),
        "nothing is created on a bad config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_node_id_from_env_is_refused() {
    let dir = Dir::new();
    let done = run(dir.serve_env("bad/id")).await;
    assert_failed(&done, &["bad/id"]);
    assert!(!dir.socket().exists(), "nothing is bound on a bad config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_endpoint_is_refused() {
    let dir = Dir::new();
    let mut cmd = loopcsi();
    cmd.args([
        "serve",
        "--node-id",
        "n1",
        "--endpoint",
        "tcp://127.0.0.1:1",
        "--state-dir",
    ])
    .arg(dir.state_dir());
    let done = run(cmd).await;
    assert_failed(&done, &["--endpoint", "tcp://127.0.0.1:1", "unix"]);
    assert!(
        !dir.state_dir().exists(),
        "nothing is created on a bad config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_id_is_refused() {
    let dir = Dir::new();
    let mut cmd = loopcsi();
    cmd.args(["serve", "--endpoint"])
        .arg(dir.endpoint())
        .arg("--state-dir")
        .arg(dir.state_dir());
    let done = run(cmd).await;
    assert_failed(&done, &["--node-id"]);
    assert!(!dir.socket().exists(), "nothing is bound on a bad config");
}
