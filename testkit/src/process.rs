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

/// The `loopcsi` binary of this build: Cargo puts it in the profile's dir (target/debug), and
/// a test executable in its deps/ subdir; Cargo builds it before the integration tests of the
/// loopcsi package run. (`env!("CARGO_BIN_EXE_loopcsi")` exists only inside that package.)
pub fn driver_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let binary = profile_dir.join("loopcsi");
    assert!(
        binary.is_file(),
        "{} does not exist: build it with `cargo build --bin loopcsi`",
        binary.display()
    );
    binary
}

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
        let mut command = Command::new(driver_binary());
        command
            .arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg(crate::NODE)
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
        let channel = crate::client::connect(socket.clone()).await;
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

/// A child process killed (and reaped) when dropped, even when the test or the bench fails.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Polls until the child exits; kills it after `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> std::io::Result<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let Some(child) = self.0.as_mut() else {
                return Err(std::io::Error::other("no child"));
            };
            if let Some(status) = child.try_wait()? {
                self.0 = None;
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.0 = None;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("child did not exit within {timeout:?}; killed"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

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
