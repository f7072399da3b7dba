//! The fake's simulated kernel: loop devices, the mount table, frozen superblocks and
//! exclusive holders, with the answers and errors the real `host/` functions give for the cases
//! the domain relies on (read `loopdev.rs` and `mount.rs` beside this file).
//!
//! What a device holds lives in its backing file, as with the kernel: mkfs writes a marker at
//! the start of the real file, and probe reads it back. So a clone, a snapshot or a re-attach
//! carries the "file system" with the data, and a blank sparse file probes blank.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::host::loopdev::{AttachOptions, Attached, FileId, LoopDevice, LOGICAL_BLOCK_SIZE};
use crate::host::mount::{self, MountEntry, MountOptions};
use crate::host::tools::{FsType, Probe};

/// The block major of loop devices, as the kernel numbers them.
pub const LOOP_MAJOR: u32 = 7;
/// devtmpfs's device numbers as mountinfo shows a bind of a device node (`0:5`).
pub const DEVTMPFS: (u32, u32) = (0, 5);
/// The signature the fake mkfs writes at the start of the backing file.
pub const FS_MARK: &[u8] = b"LOOPCSI-FAKE-FS:";
/// What a mkfs interrupted halfway leaves: a signature no file system owns.
pub const PARTIAL_MARK: &[u8] = b"LOOPCSI-FAKE-PARTIAL";

/// One attached loop device. The open backing file is the kernel's reference: the data stays
/// reachable after the file is unlinked, as with a real device.
#[derive(Debug)]
pub struct Loop {
    pub file: Arc<File>,
    pub id: FileId,
    pub shown: PathBuf,
    pub read_only: bool,
    pub direct_io: bool,
    pub capacity: u64,
    /// LOOP_CLR_FD came while a holder had it: it detaches when the last holder lets go.
    pub detach_pending: bool,
    /// The backing file cannot be identified (`status` fails), as a device whose node is gone.
    pub unidentified: bool,
}

#[derive(Debug, Default)]
pub struct Kernel {
    pub loops: BTreeMap<u32, Loop>,
    /// Device nodes that exist (`/dev/loopN` stays after a detach, as udev leaves it).
    pub nodes: BTreeSet<u32>,
    /// The mount table, oldest first (the last entry at a point is the topmost).
    pub table: Vec<MountEntry>,
    /// Superblocks frozen (by device numbers); a frozen one outlives its last mount.
    pub frozen: BTreeSet<(u32, u32)>,
    /// Devices a process holds with O_EXCL (a tool a killed driver started).
    pub held: BTreeSet<u32>,
    /// Errors ext4 recorded per device.
    pub fs_errors: BTreeMap<u32, u64>,
    pub direct_io_supported: bool,
}

/// `N` of `/dev/loopN`.
pub fn loop_number(device: &Path) -> Option<u32> {
    let digits = device.to_str()?.strip_prefix("/dev/loop")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn no_device(device: &Path) -> Error {
    Error::io(
        "open",
        device,
        std::io::Error::from_raw_os_error(nix::libc::ENOENT),
    )
}

fn tool_error(tool: &str, stderr: String) -> Error {
    Error::Tool {
        tool: tool.to_string(),
        code: Some(1),
        stderr,
    }
}

impl Kernel {
    pub fn new() -> Self {
        Kernel {
            direct_io_supported: true,
            ..Kernel::default()
        }
    }

    /// Whether anything holds device `n` open: a mount, a frozen superblock, a process.
    pub fn holds(&self, n: u32) -> bool {
        let numbers = (LOOP_MAJOR, n);
        self.held.contains(&n)
            || self.frozen.contains(&numbers)
            || self.table.iter().any(|m| (m.major, m.minor) == numbers)
    }

    pub fn attach(&mut self, path: &Path, opts: AttachOptions) -> Result<LoopDevice> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
        if meta.len() < u64::from(LOGICAL_BLOCK_SIZE) {
            return Err(Error::TinyImage {
                path: path.to_path_buf(),
                bytes: meta.len(),
                block: LOGICAL_BLOCK_SIZE,
            });
        }
        let id = FileId::of(path).map_err(|e| Error::io("stat", path, e))?;
        // LOOP_CTL_GET_FREE hands out the lowest free number.
        let n = (0..).find(|n| !self.loops.contains_key(n)).unwrap_or(0);
        self.nodes.insert(n);
        self.loops.insert(
            n,
            Loop {
                file: Arc::new(file),
                id,
                shown: path.to_path_buf(),
                read_only: opts.read_only,
                direct_io: opts.direct_io && self.direct_io_supported,
                capacity: meta.len(),
                detach_pending: false,
                unidentified: false,
            },
        );
        Ok(LoopDevice(n))
    }

    /// As `LoopDevice::detach`: gone is success; a held device is marked to detach on its last
    /// close and reported as still held.
    pub fn detach(&mut self, dev: LoopDevice) -> Result<()> {
        if !self.loops.contains_key(&dev.0) {
            return Ok(());
        }
        if self.holds(dev.0) {
            if let Some(l) = self.loops.get_mut(&dev.0) {
                l.detach_pending = true;
            }
            return Err(Error::DeviceStillOpen { device: dev.path() });
        }
        self.loops.remove(&dev.0);
        Ok(())
    }

    /// Completes a deferred detach once nothing holds the device any more.
    pub fn settle(&mut self, n: u32) {
        if self.loops.get(&n).is_some_and(|l| l.detach_pending) && !self.holds(n) {
            self.loops.remove(&n);
        }
    }

    pub fn attached(&self) -> Vec<Attached> {
        self.loops
            .iter()
            .map(|(n, l)| Attached {
                device: LoopDevice(*n),
                backing: (!l.unidentified).then_some(l.id),
                shown: l.shown.clone(),
                read_only: l.read_only,
            })
            .collect()
    }

    pub fn status(&self, dev: LoopDevice) -> Result<Option<(FileId, bool)>> {
        match self.loops.get(&dev.0) {
            None => Ok(None),
            Some(l) if l.unidentified => Err(Error::Internal(format!(
                "{} is attached but its device node is missing; cannot tell its backing file",
                dev.path().display()
            ))),
            Some(l) => Ok(Some((l.id, l.read_only))),
        }
    }

    /// The attached device behind the path `/dev/loopN`.
    fn device(&self, device: &Path) -> Result<(u32, &Loop)> {
        let n = loop_number(device).ok_or_else(|| no_device(device))?;
        match self.loops.get(&n) {
            Some(l) => Ok((n, l)),
            None if self.nodes.contains(&n) => {
                Err(Error::sys("open", device.display(), Errno::ENXIO))
            }
            None => Err(no_device(device)),
        }
    }

    /// What the device's backing file starts with, as blkid -p would name it.
    pub fn probe(&self, device: &Path) -> Result<Probe> {
        let (_, l) = match self.device(device) {
            // blkid finds nothing on a device without a backing file (exit code 2).
            Err(Error::Sys { .. }) => return Ok(Probe::Blank),
            other => other?,
        };
        let mut head = [0u8; 64];
        let n = l
            .file
            .read_at(&mut head, 0)
            .map_err(|e| Error::io("read", device, e))?;
        let head = &head[..n];
        if head.starts_with(PARTIAL_MARK) {
            return Ok(Probe::Other("a partial signature".into()));
        }
        Ok(match head.strip_prefix(FS_MARK) {
            Some(rest) => {
                let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
                Probe::FileSystem(String::from_utf8_lossy(&rest[..end]).into_owned())
            }
            None => Probe::Blank,
        })
    }

    /// Writes `fs`'s signature (or, `halfway`, a partial one) into the device's backing file.
    pub fn mkfs(&self, fs: FsType, device: &Path, halfway: bool) -> Result<()> {
        let tool = format!("mkfs.{}", fs.name());
        let (n, l) = self.device(device)?;
        if l.read_only {
            return Err(tool_error(
                &tool,
                format!("{}: Read-only file system", device.display()),
            ));
        }
        if self.holds(n) {
            return Err(tool_error(
                &tool,
                format!("{} is apparently in use by the system", device.display()),
            ));
        }
        let mark = match halfway {
            true => PARTIAL_MARK.to_vec(),
            false => [FS_MARK, fs.name().as_bytes(), b"\n"].concat(),
        };
        l.file
            .write_all_at(&mark, 0)
            .map_err(|e| Error::io("write", device, e))?;
        match halfway {
            true => Err(tool_error(&tool, "fake: interrupted halfway".into())),
            false => Ok(()),
        }
    }

    pub fn mount_device(
        &mut self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        opts: &MountOptions,
    ) -> Result<()> {
        let sys = |errno| Error::sys("mount", target.display(), errno);
        directory_at(target).map_err(sys)?;
        // A missing node is ENOENT; a node without a backing file, ENXIO.
        let (n, l) = self.device(device).map_err(|e| match e {
            Error::Sys { errno, .. } => sys(errno),
            _ => sys(Errno::ENOENT),
        })?;
        if l.read_only && !opts.read_only() {
            return Err(sys(Errno::EACCES));
        }
        if self.probe(device)? != Probe::FileSystem(fs_type.to_string()) {
            return Err(sys(Errno::EINVAL));
        }
        let mode = if opts.read_only() { "ro" } else { "rw" };
        self.table.push(MountEntry {
            major: LOOP_MAJOR,
            minor: n,
            root: "/".into(),
            mount_point: target.to_path_buf(),
            options: format!("{mode},relatime"),
            fs_type: fs_type.to_string(),
            source: device.display().to_string(),
            super_options: mode.into(),
        });
        Ok(())
    }

    /// A bind of a device node (`/dev/loopN`) shows devtmpfs's numbers and the node's name as
    /// root, as the kernel's; a bind of a directory shows the mount it comes from.
    pub fn bind(&mut self, source: &Path, target: &Path, opts: &MountOptions) -> Result<()> {
        let sys = |errno| Error::sys("bind mount", target.display(), errno);
        let target_node = std::fs::symlink_metadata(target).map_err(|_| sys(Errno::ENOENT))?;
        let mode = if opts.read_only() { "ro" } else { "rw" };
        let entry = if let Some(n) = loop_number(source) {
            if !self.nodes.contains(&n) {
                return Err(sys(Errno::ENOENT));
            }
            if target_node.is_dir() {
                return Err(sys(Errno::ENOTDIR));
            }
            MountEntry {
                major: DEVTMPFS.0,
                minor: DEVTMPFS.1,
                root: format!("/loop{n}"),
                mount_point: target.to_path_buf(),
                options: format!("{mode},nosuid"),
                fs_type: "devtmpfs".into(),
                source: "udev".into(),
                super_options: "rw".into(),
            }
        } else {
            let options = format!("{mode},relatime");
            match mount::mounted_at(&self.table, source) {
                Some(from) => MountEntry {
                    mount_point: target.to_path_buf(),
                    options,
                    ..from
                },
                // A plain directory: its own file system's numbers, itself as root.
                None => {
                    let dev = std::fs::metadata(source)
                        .map_err(|_| sys(Errno::ENOENT))?
                        .dev();
                    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
                    MountEntry {
                        major: u32::try_from(major).unwrap_or(u32::MAX),
                        minor: u32::try_from(minor).unwrap_or(u32::MAX),
                        root: source.display().to_string(),
                        mount_point: target.to_path_buf(),
                        options,
                        fs_type: "unknown".into(),
                        source: "none".into(),
                        super_options: "rw".into(),
                    }
                }
            }
        };
        self.table.push(entry);
        Ok(())
    }

    /// As `mount::unmount`: not a mount point is success. The last mount of a frozen file
    /// system leaves its superblock (and so the device) held.
    pub fn unmount(&mut self, target: &Path) {
        let Some(index) = self.table.iter().rposition(|m| m.mount_point == target) else {
            return;
        };
        let gone = self.table.remove(index);
        if gone.major == LOOP_MAJOR {
            self.settle(gone.minor);
        }
    }

    /// The mounted file system at `path` with `numbers`, as `freeze.rs`'s `open_fs` checks.
    pub fn fs_at(&self, path: &Path, numbers: (u32, u32)) -> Result<()> {
        directory_at(path).map_err(|errno| {
            Error::io(
                "open",
                path,
                std::io::Error::from_raw_os_error(errno as i32),
            )
        })?;
        match mount::mounted_at(&self.table, path) {
            Some(m) if (m.major, m.minor) == numbers => Ok(()),
            _ => Err(Error::FileSystemMoved {
                path: path.to_path_buf(),
                major: numbers.0,
                minor: numbers.1,
            }),
        }
    }

    pub fn thaw(&mut self, numbers: (u32, u32)) -> std::result::Result<(), Errno> {
        if !self.frozen.remove(&numbers) {
            return Err(Errno::EINVAL);
        }
        if numbers.0 == LOOP_MAJOR {
            self.settle(numbers.1);
        }
        Ok(())
    }

    /// The device a fake file system is mounted from at exactly `path`, if any.
    pub fn loop_mounted_at(&self, path: &Path) -> Option<u32> {
        mount::mounted_at(&self.table, path)
            .filter(|m| m.major == LOOP_MAJOR)
            .map(|m| m.minor)
    }

    /// The device whose node is bound at `path`, if any.
    pub fn node_bound_at(&self, path: &Path) -> Option<u32> {
        mount::mounted_at(&self.table, path)
            .filter(|m| (m.major, m.minor) == DEVTMPFS)
            .and_then(|m| m.root.strip_prefix("/loop")?.parse().ok())
    }
}

/// The kernel's errors for a mount point that is missing or not a directory.
fn directory_at(path: &Path) -> std::result::Result<(), Errno> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Errno::ENOTDIR),
        Err(_) => Err(Errno::ENOENT),
    }
}
