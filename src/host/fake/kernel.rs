//! The fake's simulated kernel: loop devices, device layers stacked on them, the mount table,
//! frozen superblocks and exclusive holders, with the answers and errors the real `host/` functions give for the cases
//! the domain relies on (read `loopdev.rs` and `mount.rs` beside this file).
//!
//! What a device holds lives in its backing file, as with the kernel: mkfs writes a marker at
//! the start of the real file, and probe reads it back. So a clone, a snapshot or a re-attach
//! carries the "file system" with the data, and a blank sparse file probes blank.
//!
//! Block devices are known by their device numbers, as in the kernel: loop devices are
//! `(LOOP_MAJOR, N)` at `/dev/loopN`, layers `(LAYER_MAJOR, N)` at `/dev/layerN` (a layer is
//! transparent: it reads and writes its lower device). File systems, mounts, freezes and error
//! counts are keyed by the numbers of whatever device they sit on.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::host::layers::{BlockDev, LayerKind};
use crate::host::loopdev::{AttachOptions, Attached, FileId, LoopDevice, LOGICAL_BLOCK_SIZE};
use crate::host::mount::{self, MountEntry, MountOptions};
use crate::host::tools::{FsType, Probe};

/// The block major of loop devices, as the kernel numbers them.
pub const LOOP_MAJOR: u32 = 7;
/// The block major of the fake's layer devices (a dynamic major, as device-mapper's).
pub const LAYER_MAJOR: u32 = 252;
/// The block major of the devices a test stacks on a volume's devices behind the driver's
/// back (`/dev/dm-N`: someone's device-mapper table over a loop device of ours).
pub const FOREIGN_MAJOR: u32 = 253;
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

/// One open layer: what it is, what it sits on.
#[derive(Debug)]
pub struct FakeLayer {
    pub kind: LayerKind,
    pub lower: (u32, u32),
    pub read_only: bool,
}

#[derive(Debug, Default)]
pub struct Kernel {
    /// Open layers by minor number (`/dev/layerN`; the node goes with the layer).
    pub layers: BTreeMap<u32, FakeLayer>,
    pub loops: BTreeMap<u32, Loop>,
    /// Device nodes that exist (`/dev/loopN` stays after a detach, as udev leaves it).
    pub nodes: BTreeSet<u32>,
    /// The mount table, oldest first (the last entry at a point is the topmost).
    pub table: Vec<MountEntry>,
    /// Superblocks frozen (by device numbers); a frozen one outlives its last mount.
    pub frozen: BTreeSet<(u32, u32)>,
    /// Devices a process holds with O_EXCL (a tool a killed driver started), by numbers.
    pub held: BTreeSet<(u32, u32)>,
    /// Devices someone else stacked on ours (`/dev/dm-N` by minor): the numbers they sit on.
    pub foreign: BTreeMap<u32, (u32, u32)>,
    /// Errors ext4 recorded per device.
    pub fs_errors: BTreeMap<(u32, u32), u64>,
    pub direct_io_supported: bool,
}

/// `N` of `/dev/loopN`.
pub fn loop_number(device: &Path) -> Option<u32> {
    let digits = device.to_str()?.strip_prefix("/dev/loop")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// `N` of `/dev/layerN`.
fn layer_number(device: &Path) -> Option<u32> {
    let digits = device.to_str()?.strip_prefix("/dev/layer")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The node path of the fake device with these numbers.
pub fn node_path(numbers: (u32, u32)) -> PathBuf {
    match numbers.0 {
        LAYER_MAJOR => PathBuf::from(format!("/dev/layer{}", numbers.1)),
        FOREIGN_MAJOR => PathBuf::from(format!("/dev/dm-{}", numbers.1)),
        _ => LoopDevice(numbers.1).path(),
    }
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

    /// Whether anything holds the device `numbers` open: a mount, a frozen superblock, a
    /// process, a layer or a foreign device stacked on it.
    pub fn holds(&self, numbers: (u32, u32)) -> bool {
        self.held.contains(&numbers)
            || self.frozen.contains(&numbers)
            || self.table.iter().any(|m| (m.major, m.minor) == numbers)
            || !self.holders(numbers).is_empty()
    }

    /// The devices stacked on the device `numbers`: the layers and foreign devices over it.
    pub fn holders(&self, numbers: (u32, u32)) -> Vec<BlockDev> {
        let layers = self
            .layers
            .iter()
            .filter(|(_, l)| l.lower == numbers)
            .map(|(n, _)| (LAYER_MAJOR, *n));
        let foreign = self
            .foreign
            .iter()
            .filter(|(_, lower)| **lower == numbers)
            .map(|(n, _)| (FOREIGN_MAJOR, *n));
        layers
            .chain(foreign)
            .map(|numbers| BlockDev {
                path: node_path(numbers),
                numbers,
            })
            .collect()
    }

    /// The numbers of the device node at `path`, when the node exists.
    pub fn numbers_of(&self, path: &Path) -> Option<(u32, u32)> {
        if let Some(n) = loop_number(path) {
            return self.nodes.contains(&n).then_some((LOOP_MAJOR, n));
        }
        let n = layer_number(path)?;
        self.layers.contains_key(&n).then_some((LAYER_MAJOR, n))
    }

    /// The loop device at the bottom of the device `numbers` (itself for a loop device), and
    /// whether anything on the way is read-only.
    fn bottom(&self, numbers: (u32, u32)) -> Option<(u32, &Loop, bool)> {
        let (mut at, mut read_only) = (numbers, false);
        while at.0 == LAYER_MAJOR {
            let layer = self.layers.get(&at.1)?;
            read_only |= layer.read_only;
            at = layer.lower;
        }
        let l = self.loops.get(&at.1).filter(|_| at.0 == LOOP_MAJOR)?;
        Some((at.1, l, read_only || l.read_only))
    }

    /// Opens a `kind` layer over `lower` (an attached loop device or an open layer).
    pub fn open_layer(
        &mut self,
        kind: LayerKind,
        lower: &BlockDev,
        read_only: bool,
    ) -> Result<BlockDev> {
        if self.bottom(lower.numbers).is_none() {
            return Err(Error::sys("open layer", lower.path.display(), Errno::ENXIO));
        }
        let n = (0..).find(|n| !self.layers.contains_key(n)).unwrap_or(0);
        let lower = lower.numbers;
        self.layers.insert(
            n,
            FakeLayer {
                kind,
                lower,
                read_only,
            },
        );
        let numbers = (LAYER_MAJOR, n);
        Ok(BlockDev {
            path: node_path(numbers),
            numbers,
        })
    }

    /// The `kind` layer over `lower`, if one is open.
    pub fn layer_above(&self, kind: LayerKind, lower: &BlockDev) -> Option<BlockDev> {
        let (n, _) = self
            .layers
            .iter()
            .find(|(_, l)| l.kind == kind && l.lower == lower.numbers)?;
        let numbers = (LAYER_MAJOR, *n);
        Some(BlockDev {
            path: node_path(numbers),
            numbers,
        })
    }

    /// Closes the layer `upper`: gone is success, a held one is EBUSY (device-mapper's answer).
    pub fn close_layer(&mut self, upper: &BlockDev) -> Result<()> {
        if upper.numbers.0 != LAYER_MAJOR || !self.layers.contains_key(&upper.numbers.1) {
            return Ok(());
        }
        if self.holds(upper.numbers) {
            return Err(Error::sys(
                "close layer",
                upper.path.display(),
                Errno::EBUSY,
            ));
        }
        if let Some(closed) = self.layers.remove(&upper.numbers.1) {
            // A detach of the device under it that waited for this layer completes now.
            self.settle(closed.lower);
        }
        Ok(())
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
        if self.holds((LOOP_MAJOR, dev.0)) {
            if let Some(l) = self.loops.get_mut(&dev.0) {
                l.detach_pending = true;
            }
            return Err(Error::DeviceStillOpen { device: dev.path() });
        }
        self.loops.remove(&dev.0);
        Ok(())
    }

    /// Completes a deferred detach once nothing holds the device any more.
    pub fn settle(&mut self, numbers: (u32, u32)) {
        let n = numbers.1;
        if numbers.0 == LOOP_MAJOR
            && self.loops.get(&n).is_some_and(|l| l.detach_pending)
            && !self.holds(numbers)
        {
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

    /// The device behind the node at `device` (`/dev/loopN`, `/dev/layerN`): its numbers, the
    /// loop device at its bottom (which holds the data), and whether it is read-only.
    fn device(&self, device: &Path) -> Result<((u32, u32), &Loop, bool)> {
        let numbers = self.numbers_of(device).ok_or_else(|| no_device(device))?;
        match self.bottom(numbers) {
            Some((_, l, read_only)) => Ok((numbers, l, read_only)),
            None => Err(Error::sys("open", device.display(), Errno::ENXIO)),
        }
    }

    /// What the device's backing file starts with, as blkid -p would name it.
    pub fn probe(&self, device: &Path) -> Result<Probe> {
        let (_, l, _) = match self.device(device) {
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
        let (numbers, l, read_only) = self.device(device)?;
        if read_only {
            return Err(tool_error(
                &tool,
                format!("{}: Read-only file system", device.display()),
            ));
        }
        if self.holds(numbers) {
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
        let (numbers, _, read_only) = self.device(device).map_err(|e| match e {
            Error::Sys { errno, .. } => sys(errno),
            _ => sys(Errno::ENOENT),
        })?;
        if read_only && !opts.read_only() {
            return Err(sys(Errno::EACCES));
        }
        if self.probe(device)? != Probe::FileSystem(fs_type.to_string()) {
            return Err(sys(Errno::EINVAL));
        }
        let mode = if opts.read_only() { "ro" } else { "rw" };
        self.table.push(MountEntry {
            major: numbers.0,
            minor: numbers.1,
            root: "/".into(),
            mount_point: target.to_path_buf(),
            options: format!("{mode},relatime"),
            fs_type: fs_type.to_string(),
            source: device.display().to_string(),
            super_options: mode.into(),
        });
        Ok(())
    }

    /// A bind of a device node (`/dev/loopN`, `/dev/layerN`) shows devtmpfs's numbers and the
    /// node's name as root, as the kernel's; a bind of a directory shows the mount it comes from.
    pub fn bind(&mut self, source: &Path, target: &Path, opts: &MountOptions) -> Result<()> {
        let sys = |errno| Error::sys("bind mount", target.display(), errno);
        let target_node = std::fs::symlink_metadata(target).map_err(|_| sys(Errno::ENOENT))?;
        let mode = if opts.read_only() { "ro" } else { "rw" };
        let node = loop_number(source).is_some() || layer_number(source).is_some();
        let entry = if node {
            let Some(numbers) = self.numbers_of(source) else {
                return Err(sys(Errno::ENOENT));
            };
            if target_node.is_dir() {
                return Err(sys(Errno::ENOTDIR));
            }
            MountEntry {
                major: DEVTMPFS.0,
                minor: DEVTMPFS.1,
                root: node_path(numbers)
                    .display()
                    .to_string()
                    .replace("/dev/", "/"),
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
        self.settle((gone.major, gone.minor));
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
        self.settle(numbers);
        Ok(())
    }

    /// The fake device a file system is mounted from at exactly `path`, if any.
    pub fn device_mounted_at(&self, path: &Path) -> Option<(u32, u32)> {
        mount::mounted_at(&self.table, path)
            .filter(|m| m.major == LOOP_MAJOR || m.major == LAYER_MAJOR)
            .map(|m| (m.major, m.minor))
    }

    /// The device whose node is bound at `path`, if any.
    pub fn node_bound_at(&self, path: &Path) -> Option<(u32, u32)> {
        let m = mount::mounted_at(&self.table, path).filter(|m| (m.major, m.minor) == DEVTMPFS)?;
        let node = Path::new("/dev").join(m.root.trim_start_matches('/'));
        if let Some(n) = loop_number(&node) {
            return Some((LOOP_MAJOR, n));
        }
        layer_number(&node).map(|n| (LAYER_MAJOR, n))
    }

    /// The capacity of the device `numbers` (its bottom loop device's: layers add nothing).
    pub fn capacity(&self, numbers: (u32, u32)) -> Option<u64> {
        self.bottom(numbers).map(|(_, l, _)| l.capacity)
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
