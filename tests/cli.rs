#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `loopcsi` binary as a child process: help text, env fallbacks, socket setup and
//! permissions, stale and foreign socket files, graceful shutdown on SIGTERM/SIGINT, flag
//! validation and the RPC log lines.
//!
//! Readiness is never a sleep: a test reads the child's stderr line by line until the
//! "listening" line appears (the socket exists before that line is logged). Every wait is
//! bounded by `LIMIT`, so a broken binary fails the test instead of hanging it. Every child is
//! killed by its guard's Drop (also when the test panics) and every temp dir is removed.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::identity_client::IdentityClient;
use loopcsi::csi::node_client::NodeClient;
use loopcsi_testkit::connect;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_loopcsi");

/// The bound on every wait for the child (a line, an exit).
const LIMIT: Duration = Duration::from_secs(30);

/// Environment the test runner may have that would change what the binary does.
const SCRUBBED_ENV: &[&str] = &[
    "CSI_ENDPOINT",
    "NODE_ID",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
];

// ---- the child process guard ----

/// One running `loopcsi` child. Its stderr is read line by line on a thread (so the pipe never
/// fills and blocks the child); its exit is awaited on another thread. Drop kills the child
/// if it has not exited, and reaps it.
struct Child {
    pid: Pid,
    /// Set by the waiter thread once the child has exited and been reaped.
    status: Arc<Mutex<Option<ExitStatus>>>,
    exited: Option<oneshot::Receiver<ExitStatus>>,
    waiter: Option<std::thread::JoinHandle<()>>,
    /// stderr lines (ANSI escapes removed) not yet consumed by `wait_for_line`.
    lines: mpsc::UnboundedReceiver<String>,
    /// Every stderr line so far, for assertions and failure messages.
    log: Arc<Mutex<Vec<String>>>,
    stdout: Option<oneshot::Receiver<String>>,
    stderr_eof: bool,
}

/// What a finished child left: exit status and its complete output.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// The binary with a clean environment (PATH kept: the driver looks its tools up there) and
/// info logging.
fn loopcsi() -> Command {
    let mut cmd = Command::new(BIN);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

impl Child {
    fn spawn(mut cmd: Command) -> Child {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loopcsi");
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());

        let log = Arc::new(Mutex::new(Vec::new()));
        let (line_tx, lines) = mpsc::unbounded_channel();
        let stderr = child.stderr.take().unwrap();
        let log_writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                log_writer.lock().unwrap().push(line.clone());
                let _ = line_tx.send(line);
            }
            // Dropping line_tx tells the reader that stderr is at EOF.
        });

        let (stdout_tx, stdout_rx) = oneshot::channel();
        let mut out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            let _ = stdout_tx.send(text);
        });

        let status = Arc::new(Mutex::new(None));
        let (exit_tx, exited) = oneshot::channel();
        let status_writer = Arc::clone(&status);
        let waiter = std::thread::spawn(move || {
            let exit = child.wait().expect("wait for loopcsi");
            *status_writer.lock().unwrap() = Some(exit);
            let _ = exit_tx.send(exit);
        });

        Child {
            pid,
            status,
            exited: Some(exited),
            waiter: Some(waiter),
            lines,
            log,
            stdout: Some(stdout_rx),
            stderr_eof: false,
        }
    }

    /// Everything the child wrote to stderr so far.
    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Reads stderr until a line containing `needle` appears and returns it. Fails when the
    /// child closes stderr (exits) first or `LIMIT` passes.
    async fn wait_for_line(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(LIMIT, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => {
                self.stderr_eof = true;
                panic!(
                    "loopcsi closed stderr (exited) before logging {needle:?}; stderr:\n{}",
                    self.log()
                )
            }
            Err(_) => panic!(
                "no {needle:?} line from loopcsi within {LIMIT:?}; stderr:\n{}",
                self.log()
            ),
        }
    }

    /// Waits until the server logs "listening" (its socket exists by then).
    async fn wait_listening(&mut self) -> String {
        self.wait_for_line("listening").await
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid, signal).expect("signal loopcsi");
    }

    /// Waits (bounded) for the child to exit, then for the end of its output.
    async fn finish(&mut self) -> Finished {
        let exited = self.exited.take().expect("finish is called once");
        let status = match tokio::time::timeout(LIMIT, exited).await {
            Ok(status) => status.expect("the waiter thread reports the exit"),
            Err(_) => panic!(
                "loopcsi did not exit within {LIMIT:?}; stderr:\n{}",
                self.log()
            ),
        };
        // The child is gone; its pipes reach EOF unless something it spawned still holds them.
        if !self.stderr_eof {
            let drained =
                tokio::time::timeout(LIMIT, async { while self.lines.recv().await.is_some() {} })
                    .await;
            assert!(drained.is_ok(), "stderr stayed open after loopcsi exited");
            self.stderr_eof = true;
        }
        let stdout = tokio::time::timeout(LIMIT, self.stdout.take().unwrap())
            .await
            .expect("stdout stayed open after loopcsi exited")
            .unwrap_or_default();
        Finished {
            status,
            stdout,
            stderr: self.log(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Not exited yet (or exited a moment ago and not yet recorded; a pid is not reused
        // that fast): kill it. The waiter thread then reaps it.
        if self.status.lock().unwrap().is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.join();
        }
    }
}

/// Runs the binary to its exit (bounded by `LIMIT`).
async fn run(cmd: Command) -> Finished {
    Child::spawn(cmd).finish().await
}

/// Removes the ANSI colour sequences (ESC [ ... final byte) the log formatter may add.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of a `name=value` field in a tracing fmt line (span fields or event fields),
/// without the quotes a string value is printed with.
fn field(line: &str, name: &str) -> Option<String> {
    let key = format!("{name}=");
    let mut from = 0;
    while let Some(at) = line[from..].find(&key) {
        let start = from + at;
        let boundary = start == 0 || matches!(line.as_bytes()[start - 1], b' ' | b'{' | b',');
        if boundary {
            let rest = &line[start + key.len()..];
            let value = if let Some(quoted) = rest.strip_prefix('"') {
                quoted.split('"').next().unwrap_or_default()
            } else {
                rest.split([' ', '}', ':']).next().unwrap_or_default()
            };
            return Some(value.to_string());
        }
        from = start + key.len();
    }
    None
}

// ---- a driver in a temp dir ----

/// A temp dir holding one driver's socket and state dir.
struct Dir {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let dir = tempfile::Builder::new()
            .prefix("loopcsi-cli-")
            .tempdir()
            .unwrap();
        let root = dir.path().canonicalize().unwrap();
        Dir { _dir: dir, root }
    }
    fn socket(&self) -> PathBuf {
        self.root.join("csi.sock")
    }
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    /// `loopcsi serve` configured through the env fallbacks (no --endpoint, no --node-id).
    fn serve_env(&self, node_id: &str) -> Command {
        self.serve_env_with_state(node_id, &self.state_dir())
    }
    fn serve_env_with_state(&self, node_id: &str, state_dir: &Path) -> Command {
        let mut cmd = loopcsi();
        cmd.env("CSI_ENDPOINT", self.endpoint())
            .env("NODE_ID", node_id)
            .arg("serve")
            .arg("--state-dir")
            .arg(state_dir);
        cmd
    }
}

/// Probe must answer OK (ready may still be false while state recovery runs).
async fn probe_ok(channel: Channel) {
    let reply = tokio::time::timeout(
        LIMIT,
        IdentityClient::new(channel).probe(csi::ProbeRequest {}),
    )
    .await
    .expect("Probe answers in time")
    .expect("Probe returns OK")
    .into_inner();
    assert!(reply.ready.is_some(), "Probe reports readiness: {reply:?}");
}

#[track_caller]
fn assert_socket_mode(socket: &Path) {
    let meta = std::fs::symlink_metadata(socket).expect("the socket exists while serving");
    assert!(
        meta.file_type().is_socket(),
        "{} is a socket",
        socket.display()
    );
    let mode = meta.permissions().mode() & 0o7777;
    assert_eq!(
        mode & !0o660,
        0,
        "socket mode is {mode:o}: nothing beyond 0660 (no bits for others, no exec, no setid)"
    );
    assert_eq!(
        mode & 0o600,
        0o600,
        "socket mode {mode:o}: the owner can connect"
    );
}

#[track_caller]
fn assert_failed(done: &Finished, needles: &[&str]) {
    assert!(
        !done.status.success(),
        "loopcsi must fail; it exited with {:?}; stderr:\n{}",
        done.status,
        done.stderr
    );
    assert!(
        done.status.code().is_some(),
        "loopcsi must exit with an error code, not die of a signal ({:?}); stderr:\n{}",
        done.status,
        done.stderr
    );
    for needle in needles {
        assert!(
            done.stderr.contains(needle),
            "stderr does not mention {needle:?}:\n{}",
            done.stderr
        );
    }
    assert!(
        !done.stderr.contains("panicked"),
        "a bad start is an error message, not a panic:\n{}",
        done.stderr
    );
}

#[track_caller]
fn assert_clean_exit(done: Finished) {
    assert!(
        done.status.success(),
        "loopcsi must exit 0 on a shutdown signal, got {:?}; stderr:\n{}",
        done.status,
        done.stderr
    );
}

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
