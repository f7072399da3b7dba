//! The real `loopcsi` binary as a child process, for tests that kill it (SIGKILL) or signal it.
//! Readiness is the "listening" log line on its stderr (read line by line, no sleeps); the child
//! is killed in Drop even when the test panics.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::identity_client::IdentityClient;
use loopcsi::csi::node_client::NodeClient;
use tonic::transport::Channel;

/// How long a child may take to say it is listening before the test fails (a broken binary
/// must fail the test, not hang it).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ChildDriver {
    child: Child,
    pub socket: PathBuf,
    /// Every stderr line after "listening", for tests that inspect the logs.
    pub log: mpsc::Receiver<String>,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl ChildDriver {
    /// Starts `loopcsi serve` on `root/csi.sock` with state in `root/state`. With `crash_at`,
    /// the (test-built) binary kills itself at that crash point.
    pub async fn spawn(root: &Path, crash_at: Option<&str>) -> Self {
        let mut command = Self::command(&root.join("csi.sock"), &root.join("state"));
        if let Some(point) = crash_at {
            command.env("LOOPCSI_CRASH_AT", point);
        }
        Self::spawn_command(command, root.join("csi.sock")).await
    }

    /// The `loopcsi serve` command line on `socket` with state in `state_dir`, for callers that
    /// adjust it (environment, a private mount namespace) before `spawn_command`.
    pub fn command(socket: &Path, state_dir: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_loopcsi"));
        command
            .arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg(super::NODE)
            .arg("--state-dir")
            .arg(state_dir)
            .env("RUST_LOG", "info")
            .env_remove("LOOPCSI_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Starts `command` (see `command`), waits for it to listen on `socket` and connects.
    pub async fn spawn_command(mut command: Command, socket: PathBuf) -> Self {
        let mut child = command.spawn().expect("spawn loopcsi");
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let (log_tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                let _ = log_tx.send(line);
            }
        });
        let mut guard = ChildGuard(Some(child));
        ready_rx
            .recv_timeout(READY_TIMEOUT)
            .expect("loopcsi did not report listening");
        let channel = super::connect(socket.clone()).await;
        ChildDriver {
            child: guard.0.take().expect("child"),
            socket,
            log,
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for the child to exit (after a crash point or a signal).
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for loopcsi")
    }

    /// Whether the child has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

/// Kills a child that a failed spawn would otherwise leak.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
