//! External tools (blkid, mkfs.*, e2fsck, resize2fs, xfs_growfs): found once at startup, run
//! through one function with an argument list (never a shell) and a deadline, and their
//! failures reported with tool, exit code and stderr. What a file system runs lives in its
//! implementation in `host::fs`; this file only knows the tools by name.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

use crate::error::{Error, Result};
pub use crate::host::fs::FsType;

/// What a low-level probe found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all: the device is blank and may be formatted.
    Blank,
    /// A file system of this type (blkid's TYPE).
    FileSystem(String),
    /// Something that is not a file system we know (a partition table, RAID member, ...).
    Other(String),
}

/// Which deadline a tool run gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// mkfs, e2fsck, resize2fs, xfs_growfs: they take as long as the device is large, so they
    /// get the whole configured timeout.
    Long,
    /// blkid: reads a few blocks; it gets at most `PROBE_TIMEOUT`.
    Probe,
}

/// The default of `--tool-timeout`: generous, as e2fsck of a large, full volume on a slow pool
/// takes minutes; the deadline is there to free the volume's lock from a tool hung in D state
/// or on a dead device, not to hurry a working one.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(600);
/// The most a probe waits: blkid reads a few blocks, and every stage waits on it.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Tools the driver cannot run without.
const REQUIRED: &[&str] = &["blkid", "mkfs.ext4"];

/// Resolved paths of the tools the driver runs, and how long a run may take.
#[derive(Clone, Debug)]
pub struct Tools {
    found: BTreeMap<&'static str, PathBuf>,
    timeout: Duration,
}

/// Where tools live on Debian-like systems, also when PATH lacks the sbin directories.
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl Tools {
    /// Finds the tools. blkid and mkfs.ext4 are required; mkfs.xfs is optional (xfs volumes are
    /// then refused with a clear message). Runs get `DEFAULT_TOOL_TIMEOUT` (see `with_timeout`).
    pub fn discover() -> Result<Self> {
        let mut found = BTreeMap::new();
        for name in REQUIRED {
            let path = find(name).ok_or(Error::RequiredToolMissing {
                tool: name,
                searched: FALLBACK_DIRS,
            })?;
            found.insert(*name, path);
        }
        // The tools of each file system (`Filesystem::tools`): their absence only refuses the
        // file system, or the grow, that needs them.
        for name in FsType::ALL.iter().flat_map(|fs| fs.get().tools()) {
            if found.contains_key(name) {
                continue;
            }
            if let Some(path) = find(name) {
                found.insert(*name, path);
            }
        }
        Ok(Tools {
            found,
            timeout: DEFAULT_TOOL_TIMEOUT,
        })
    }

    /// The same tools with another deadline for long runs (`--tool-timeout`); probes get the
    /// shorter of it and `PROBE_TIMEOUT`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Uses `path` as the tool `name` (tests put stand-ins in place of real tools).
    pub fn with_tool(mut self, name: &'static str, path: impl Into<PathBuf>) -> Self {
        self.found.insert(name, path.into());
        self
    }

    pub fn supports(&self, fs: FsType) -> bool {
        self.found.contains_key(fs.get().mkfs_tool())
    }

    fn path(&self, name: &str) -> Result<&Path> {
        self.found
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::ToolNotInstalled {
                tool: name.to_string(),
            })
    }

    /// Runs the tool discovered as `name`; FAILED_PRECONDITION when the node lacks it.
    /// `ok_codes` are exit codes that are not failures; returns the exit code and stdout.
    pub fn run_named(
        &self,
        name: &str,
        args: &[&OsStr],
        ok_codes: &[i32],
        deadline: Deadline,
    ) -> Result<(i32, String)> {
        let after = match deadline {
            Deadline::Long => self.timeout,
            Deadline::Probe => self.timeout.min(PROBE_TIMEOUT),
        };
        self.run(self.path(name)?, args, ok_codes, after)
    }

    /// The one place a tool is run. The tool leads a process group of its own, so that on
    /// expiry of `after` it is killed with everything it started, then reaped.
    fn run(
        &self,
        tool: &Path,
        args: &[&OsStr],
        ok_codes: &[i32],
        after: Duration,
    ) -> Result<(i32, String)> {
        let mut child = Command::new(tool)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io("run", tool, e))?;
        // Both pipes are drained while the tool runs, or a chatty tool would block on a full
        // pipe and look hung.
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        if !exits_within(&mut child, after) {
            return Err(Error::ToolTimedOut {
                tool: tool.display().to_string(),
                after,
            });
        }
        let status = child.wait().map_err(|e| Error::io("wait for", tool, e))?;
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        let code = status.code();
        match code {
            Some(c) if c == 0 || ok_codes.contains(&c) => {
                Ok((c, String::from_utf8_lossy(&stdout).into_owned()))
            }
            _ => Err(Error::Tool {
                tool: tool.display().to_string(),
                code,
                stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
            }),
        }
    }

    /// Low-level probe of `device` for any signature (blkid -p bypasses the blkid cache).
    pub fn probe(&self, device: &Path) -> Result<Probe> {
        // blkid exits 2 when it found nothing.
        let (code, stdout) = self.run_named(
            "blkid",
            &[
                "-p".as_ref(),
                "-o".as_ref(),
                "export".as_ref(),
                device.as_os_str(),
            ],
            &[2],
            Deadline::Probe,
        )?;
        if code == 2 {
            return Ok(Probe::Blank);
        }
        let mut fs_type = None;
        let mut other = Vec::new();
        for line in stdout.lines() {
            match line.split_once('=') {
                Some(("TYPE", value)) => fs_type = Some(value.to_string()),
                Some(("PTTYPE" | "USAGE", value)) => other.push(value.to_string()),
                _ => {}
            }
        }
        Ok(match (fs_type, other.is_empty()) {
            (Some(t), _) => Probe::FileSystem(t),
            (None, true) => Probe::Other("an unrecognised signature".into()),
            (None, false) => Probe::Other(other.join(", ")),
        })
    }

    /// Creates a file system on `device` with its mkfs and arguments (`host::fs`). Discard is
    /// switched off for every file system: on a thin volume it is a wasted pass over holes, and
    /// on a thick one it would punch the allocation back out.
    pub fn mkfs(&self, fs: FsType, device: &Path) -> Result<()> {
        let fs = fs.get();
        let mut args: Vec<&OsStr> = fs.mkfs_args().iter().map(OsStr::new).collect();
        args.push(device.as_os_str());
        self.run_named(fs.mkfs_tool(), &args, &[], Deadline::Long)
            .map(drop)
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Waits up to `after` for `child` to exit, without reaping it: a thread blocks in
/// `waitid(WNOWAIT)` and reports over a channel, so there is neither a poll loop nor a global
/// SIGCHLD handler. False when the deadline passed: the child's process group was then killed
/// and the child reaped. Until it is reaped its pid (and so its group id) cannot be reused, so
/// the kill reaches the tool's own processes only.
fn exits_within(child: &mut Child, after: Duration) -> bool {
    let Ok(pid) = i32::try_from(child.id()).map(Pid::from_raw) else {
        return true; // A pid beyond i32 does not exist on Linux; plain `wait` then.
    };
    let (exited, exit) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ));
    });
    match exit.recv_timeout(after) {
        Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = child.wait();
            false
        }
    }
}
