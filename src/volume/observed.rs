//! The kernel's view of one volume (`Observed`), read once per operation: its loop devices,
//! matched to the image by file identity, the device layers stacked on them (`volume::stack`),
//! and the mount table. The file system is mounted from (and a raw block target is bound to)
//! the *top* of a stack: the loop device itself for a volume without layers.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::host::layers::{BlockDev, LayerKind};
use crate::host::loopdev::{FileId, LoopDevice};
use crate::host::mount::{self, MountEntry};
use crate::host::os::{Host, NodeKind};
use crate::volume::params::VolumeKind;
use crate::volume::stack::Stack;

/// The kernel's view of one volume, read once per operation, and the host it was read from
/// (for the stats of paths asked about later).
pub(crate) struct Observed<'h> {
    host: &'h dyn Host,
    /// The volume's writable loop device (the one staging attaches).
    pub(crate) device: Option<LoopDevice>,
    /// The stack over `device` (Some exactly when `device` is).
    pub(crate) stack: Option<Stack>,
    /// Read-only loop devices of read-only raw block publishes, each with its stack.
    pub(crate) read_only_devices: Vec<Stack>,
    pub(crate) table: Vec<MountEntry>,
    /// The image at the volume's path is the file that was staged (or, with no stage record,
    /// there is a file there at all). False means the image was deleted or replaced behind the
    /// driver's back: a device still attached holds the only copy of the staged data.
    pub(crate) image_present: bool,
    /// Attached loop devices whose backing file could not be identified: any of them might
    /// hold this volume's image, so nothing is attached while one exists.
    pub(crate) unidentified: Vec<LoopDevice>,
}

impl<'h> Observed<'h> {
    /// The kernel's view of the volume whose image is at `image`. Loop devices are matched to
    /// the image by the backing file's identity (device and inode numbers), never by the path
    /// the kernel renders, which depends on the reader's mount namespace. `recorded` is the
    /// image's identity when the volume was staged (from its stage record): a device still
    /// holding that file is the volume's even when the image was deleted or replaced since.
    ///
    /// `hint` is a staging path or target the caller expects the volume's file system at: when
    /// the device mounted there is attached writable to the image, the scan of every attached
    /// device is skipped (~2 ms per call on a node with 200 staged volumes). The shortcut is
    /// only taken for a mounted file system, which never has the read-only devices of
    /// read-only raw block publishes; anything else is scanned.
    ///
    /// `layers` are the volume's device layers (`None`: its metadata cannot be read); the
    /// stacks over its devices are found from the kernel's view (`Stack::find`).
    pub(crate) fn read_for(
        host: &'h dyn Host,
        image: &Path,
        recorded: Option<FileId>,
        hint: Option<&Path>,
        layers: Option<&[LayerKind]>,
    ) -> Result<Self> {
        let table = host.mounts()?;
        let current = host.file_id(image)?;
        let ours = |file: &FileId| Some(*file) == current || Some(*file) == recorded;
        let hinted = hint
            .and_then(|path| mount::mounted_at(&table, path))
            .and_then(|m| host.loop_device(m.major, m.minor))
            .filter(|dev| {
                matches!(host.loop_status(*dev), Ok(Some((file, read_only))) if !read_only && ours(&file))
            });
        if let Some(dev) = hinted {
            // The file system is on the loop device itself: no layer is over it.
            let numbers = host.dev_numbers(dev)?;
            let stack = Stack::find(host, dev, numbers, Some(layers.unwrap_or_default()))?;
            return Ok(Observed {
                host,
                device: Some(dev),
                stack: Some(stack),
                read_only_devices: Vec::new(),
                table,
                image_present: current.is_some() && current == recorded.or(current),
                unidentified: Vec::new(),
            });
        }
        let mut device = None;
        let mut read_only_devices = Vec::new();
        let mut unidentified = Vec::new();
        for attached in host.attached_devices()? {
            let Some(file) = attached.backing else {
                unidentified.push(attached.device);
                continue;
            };
            if !ours(&file) {
                continue;
            }
            let dev = attached.device;
            if attached.read_only {
                let numbers = host.dev_numbers(dev)?;
                read_only_devices.push(Stack::find(host, dev, numbers, layers)?);
            } else if device.is_none() || Some(file) == recorded {
                // The device of the recorded file wins: it holds what the CO staged.
                device = Some(dev);
            }
        }
        let dev_numbers = device.map(|d| host.dev_numbers(d)).transpose()?;
        let stack = match (device, dev_numbers) {
            (Some(dev), Some(numbers)) => Some(Stack::find(host, dev, numbers, layers)?),
            _ => None,
        };
        Ok(Observed {
            host,
            device,
            stack,
            read_only_devices,
            table,
            image_present: current.is_some() && current == recorded.or(current),
            unidentified,
        })
    }

    /// The top of the volume's writable stack: the device its file system is mounted from and
    /// raw block targets are bound to. `None` when no device is attached, or a layer of the
    /// stack is not open (it vanished, or a stage failed halfway).
    pub(crate) fn top(&self) -> Option<&BlockDev> {
        self.stack.as_ref().and_then(Stack::top)
    }

    fn top_numbers(&self) -> Option<(u32, u32)> {
        self.top().map(|top| top.numbers)
    }

    /// The read-only stack whose node is bound at `path`, if any (matched by the bound node's
    /// `st_rdev` against every device of the stack).
    pub(crate) fn read_only_device_at(&self, path: &Path) -> Option<&Stack> {
        mount::mounted_at(&self.table, path)?;
        let rdev = self.host.node_followed(path).ok()??.rdev;
        self.read_only_devices
            .iter()
            .find(|stack| stack.devices().any(|dev| dev.rdev() == rdev))
    }

    /// The volume's file system is mounted at `path`.
    pub(crate) fn fs_mounted_at(&self, path: &Path) -> bool {
        match (self.top_numbers(), mount::mounted_at(&self.table, path)) {
            (Some(numbers), Some(m)) => (m.major, m.minor) == numbers,
            _ => false,
        }
    }

    /// One of the volume's device nodes (writable, or a read-only one) is bound at `path`.
    pub(crate) fn device_bound_at(&self, path: &Path) -> bool {
        let (Some(top), Some(_)) = (self.top(), mount::mounted_at(&self.table, path)) else {
            return false;
        };
        let writable = matches!(self.host.node_followed(path), Ok(Some(n)) if {
            n.kind == NodeKind::BlockDevice && n.rdev == top.rdev()
        });
        writable || self.read_only_device_at(path).is_some()
    }

    pub(crate) fn live_at(&self, kind: VolumeKind, path: &Path) -> bool {
        match kind {
            VolumeKind::Block => self.device_bound_at(path),
            VolumeKind::Filesystem(_) => self.fs_mounted_at(path),
        }
    }

    /// Mount points of the volume's file system other than `except`.
    pub(crate) fn other_mounts(&self, except: &Path) -> Vec<PathBuf> {
        let Some(numbers) = self.top_numbers() else {
            return Vec::new();
        };
        self.table
            .iter()
            .filter(|m| (m.major, m.minor) == numbers && m.mount_point != except)
            .map(|m| m.mount_point.clone())
            .collect()
    }
}
