//! External tools (blkid, mkfs.ext4, mkfs.xfs): found once at startup, run through one function
//! with an argument list (never a shell), and their failures reported with tool, exit code and
//! stderr.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file systems loopcsi formats volumes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    /// The smallest device mkfs accepts for a journaled file system of this type
    /// (mkfs.xfs refuses anything under 300 MiB; ext4 below 16 MiB gets no useful journal).
    pub fn minimum_size(self) -> u64 {
        match self {
            FsType::Ext4 => 16 << 20,
            FsType::Xfs => 300 << 20,
        }
    }
}

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

/// Resolved paths of the tools the driver runs.
#[derive(Clone, Debug)]
pub struct Tools {
    blkid: PathBuf,
    mkfs_ext4: PathBuf,
    mkfs_xfs: Option<PathBuf>,
    e2fsck: Option<PathBuf>,
    resize2fs: Option<PathBuf>,
    xfs_growfs: Option<PathBuf>,
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
    /// then refused with a clear message).
    pub fn discover() -> Result<Self> {
        let need = |tool: &'static str| {
            find(tool).ok_or(Error::RequiredToolMissing {
                tool,
                searched: FALLBACK_DIRS,
            })
        };
        Ok(Tools {
            blkid: need("blkid")?,
            mkfs_ext4: need("mkfs.ext4")?,
            mkfs_xfs: find("mkfs.xfs"),
            e2fsck: find("e2fsck"),
            resize2fs: find("resize2fs"),
            xfs_growfs: find("xfs_growfs"),
        })
    }

    pub fn supports(&self, fs: FsType) -> bool {
        match fs {
            FsType::Ext4 => true,
            FsType::Xfs => self.mkfs_xfs.is_some(),
        }
    }

    fn optional<'a>(tool: &'a Option<PathBuf>, name: &'static str) -> Result<&'a Path> {
        tool.as_deref()
            .ok_or(Error::ToolNotInstalled { tool: name })
    }

    /// Grows the ext4 on an unmounted `device` to the device's size (checked first, as
    /// resize2fs requires of an unmounted file system).
    pub fn grow_ext4_offline(&self, device: &Path) -> Result<()> {
        let e2fsck = Self::optional(&self.e2fsck, "e2fsck")?;
        // e2fsck exits 1 when it fixed something harmless (preen mode); both are fine.
        self.run(
            e2fsck,
            &["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
            &[1],
        )?;
        let resize2fs = Self::optional(&self.resize2fs, "resize2fs")?;
        self.run(resize2fs, &[device.as_os_str()], &[]).map(drop)
    }

    /// Grows a mounted ext4 on `device` online. The kernel demands CAP_SYS_RESOURCE for it; a
    /// refusal is FAILED_PRECONDITION naming the missing capability.
    pub fn grow_ext4_online(&self, device: &Path) -> Result<()> {
        let resize2fs = Self::optional(&self.resize2fs, "resize2fs")?;
        match self.run(resize2fs, &[device.as_os_str()], &[]) {
            Err(Error::Tool { stderr, .. }) if stderr.contains("Permission denied") => {
                // A privileged container has every capability of its host's bounding set, so
                // "run it privileged" is not always the remedy: some hosts drop the capability
                // for every process. The next stage grows the file system offline.
                Err(Error::NeedsCapability {
                    device: device.to_path_buf(),
                    capability: "CAP_SYS_RESOURCE",
                    stderr,
                })
            }
            other => other.map(drop),
        }
    }

    /// Grows the xfs mounted at `mount_point` to its device's size.
    pub fn grow_xfs(&self, mount_point: &Path) -> Result<()> {
        let tool = Self::optional(&self.xfs_growfs, "xfs_growfs")?;
        self.run(tool, &["-d".as_ref(), mount_point.as_os_str()], &[])
            .map(drop)
    }

    /// The one place a tool is run. `ok_codes` are exit codes that are not failures.
    fn run(&self, tool: &Path, args: &[&OsStr], ok_codes: &[i32]) -> Result<(i32, String)> {
        let output = Command::new(tool)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| Error::io("run", tool, e))?;
        let code = output.status.code();
        match code {
            Some(c) if c == 0 || ok_codes.contains(&c) => {
                Ok((c, String::from_utf8_lossy(&output.stdout).into_owned()))
            }
            _ => Err(Error::Tool {
                tool: tool.display().to_string(),
                code,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            }),
        }
    }

    /// Low-level probe of `device` for any signature (blkid -p bypasses the blkid cache).
    pub fn probe(&self, device: &Path) -> Result<Probe> {
        // blkid exits 2 when it found nothing.
        let (code, stdout) = self.run(
            &self.blkid,
            &[
                "-p".as_ref(),
                "-o".as_ref(),
                "export".as_ref(),
                device.as_os_str(),
            ],
            &[2],
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

    /// Creates a file system on `device`. Discard is switched off: on a thin volume it is a
    /// wasted pass over holes, and on a thick one it would punch the allocation back out.
    /// ext4's inode tables and journal are initialised lazily: the device is a fresh file that
    /// reads back zeroes, so skipping the zeroing pass is safe.
    pub fn mkfs(&self, fs: FsType, device: &Path) -> Result<()> {
        let dev = device.as_os_str();
        match fs {
            FsType::Ext4 => self.run(
                &self.mkfs_ext4,
                &[
                    "-F".as_ref(),
                    "-q".as_ref(),
                    "-E".as_ref(),
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                    dev,
                ],
                &[],
            ),
            FsType::Xfs => {
                let tool = Self::optional(&self.mkfs_xfs, "mkfs.xfs")?;
                self.run(
                    tool,
                    &["-f".as_ref(), "-q".as_ref(), "-K".as_ref(), dev],
                    &[],
                )
            }
        }
        .map(drop)
    }
}
