//! The external tools the bench runs (no shell), found once at start.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::driver::*;
use crate::*;
use anyhow::{anyhow, bail, Context, Result};

/// Paths of the external tools the bench runs.
#[derive(Clone, Debug)]
pub(crate) struct Tools {
    pub(crate) fio: PathBuf,
    pub(crate) losetup: PathBuf,
    pub(crate) blkid: PathBuf,
    pub(crate) mkfs_ext4: PathBuf,
    pub(crate) mkfs_xfs: PathBuf,
}

pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl Tools {
    pub(crate) fn find() -> Result<Self> {
        let need = |name: &str, package: &str| {
            find_tool(name).ok_or_else(|| anyhow!("{name} not found; apt-get install -y {package}"))
        };
        Ok(Tools {
            fio: need("fio", "fio")?,
            losetup: need("losetup", "util-linux")?,
            blkid: need("blkid", "util-linux")?,
            mkfs_ext4: need("mkfs.ext4", "e2fsprogs")?,
            mkfs_xfs: need("mkfs.xfs", "xfsprogs")?,
        })
    }

    pub(crate) fn mkfs(&self, kind: VolKind, device: &Path) -> Result<()> {
        match kind {
            VolKind::Ext4 => run_tool(
                &self.mkfs_ext4,
                &[
                    "-F".into(),
                    "-q".into(),
                    "-E".into(),
                    MKFS_EXT4_OPTS.into(),
                    device.into(),
                ],
                &[],
            ),
            VolKind::Xfs => run_tool(
                &self.mkfs_xfs,
                &["-f".into(), "-q".into(), "-K".into(), device.into()],
                &[],
            ),
            VolKind::Block => Ok(String::new()),
        }
        .map(drop)
    }

    pub(crate) fn blkid_probe(&self, device: &Path) -> Result<()> {
        run_tool(
            &self.blkid,
            &["-p".into(), "-o".into(), "export".into(), device.into()],
            &[2],
        )
        .map(drop)
    }

    /// `losetup --find --show`: tuned is direct I/O with 4096-byte sectors (the best way by
    /// hand); otherwise losetup's defaults (buffered, 512-byte sectors).
    pub(crate) fn losetup_attach(&self, image: &Path, tuned: bool) -> Result<PathBuf> {
        let mut args: Vec<OsString> = vec!["--find".into(), "--show".into()];
        if tuned {
            args.extend([
                "--direct-io=on".into(),
                "--sector-size".into(),
                "4096".into(),
            ]);
        }
        args.push(image.into());
        let out = run_tool(&self.losetup, &args, &[])?;
        let dev = out.trim();
        if !dev.starts_with("/dev/loop") {
            bail!("losetup printed {dev:?}, not a loop device");
        }
        Ok(PathBuf::from(dev))
    }

    pub(crate) fn losetup_detach(&self, device: &Path) -> Result<()> {
        run_tool(&self.losetup, &["-d".into(), device.into()], &[]).map(drop)
    }
}

/// Runs a tool (no shell) and returns its stdout; `ok_codes` are non-zero codes that are fine.
pub(crate) fn run_tool(tool: &Path, args: &[OsString], ok_codes: &[i32]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    match out.status.code() {
        Some(code) if code == 0 || ok_codes.contains(&code) => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        _ => bail!(
            "{} {:?} failed ({}): {}",
            tool.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Version line of a tool, for the report.
pub(crate) fn tool_version(tool: &Path, arg: &str) -> String {
    Command::new(tool)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .map(|out| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "unknown".into())
}
