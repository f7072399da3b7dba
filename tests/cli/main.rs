#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `loopcsi` binary as a child process: help text, env fallbacks, socket setup and
//! permissions, stale and foreign socket files, graceful shutdown on SIGTERM/SIGINT, flag
//! validation and the RPC log lines. This file holds the child guard and the shared checks;
//! the tests are in serving.rs (start, stop, socket path, bad flags) and operating.rs (logs,
//! state-dir lock, node id, startup line, README Quick start).
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

mod operating;
mod serving;

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
