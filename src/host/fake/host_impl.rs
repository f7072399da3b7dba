//! `Host` for `FakeHost`: each method records its call, fails when a failure is injected for
//! it, then asks the simulated kernel (devices, mounts, tools, freeze) or does the real file
//! work under the fake's root (records, images), with the same code as `Linux`.

use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::kernel::{loop_number, node_path, DEVTMPFS, LOOP_MAJOR};
use super::{FakeHost, Op};
use crate::error::{Error, Result};
use crate::host::extents::{self, Extent, Range};
use crate::host::files::{self, Allocation, CopyStats, Usage};
use crate::host::layers::{BlockDev, LayerKind};
use crate::host::linux;
use crate::host::lockfile::{self, Holder, LockFile};
use crate::host::loopdev::{AttachOptions, Attached, FileId, LoopDevice};
use crate::host::mount::{MountEntry, MountOptions};
use crate::host::os::{FsHandle, Host, NewImage, Node, NodeKind};
use crate::host::reclone::{Preclone, Recloned};
use crate::host::tools::{FsType, Probe};

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn makedev(numbers: (u32, u32)) -> u64 {
    nix::sys::stat::makedev(numbers.0.into(), numbers.1.into())
}

impl FakeHost {
    /// A real file operation under the root, after recording and injection.
    fn file<T>(&self, op: Op, path: &Path, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check(op, shown(path))?;
        self.inside(path)?;
        work()
    }

    /// The node at `path` as the simulated kernel shows it: a device node exists once its
    /// device was made; a mount point shows the mounted file system's device; a bound device
    /// node is a block device with that device's numbers.
    fn node_seen(&self, op: Op, path: &Path, follow: bool) -> Result<Option<Node>> {
        self.check(op, shown(path))?;
        if loop_number(path).is_some() || path.to_string_lossy().starts_with("/dev/layer") {
            let numbers = self.state().kernel.numbers_of(path);
            return Ok(numbers.map(|numbers| Node {
                kind: NodeKind::BlockDevice,
                dev: makedev(DEVTMPFS),
                rdev: makedev(numbers),
                len: 0,
                modified: None,
            }));
        }
        self.inside(path)?;
        let Some(mut node) = linux::node_at(path, follow)? else {
            return Ok(None);
        };
        let state = self.state();
        if let Some(numbers) = state.kernel.node_bound_at(path) {
            node.kind = NodeKind::BlockDevice;
            node.dev = makedev(DEVTMPFS);
            node.rdev = makedev(numbers);
        } else if let Some(numbers) = state.kernel.device_mounted_at(path) {
            node.dev = makedev(numbers);
        }
        Ok(Some(node))
    }
}

impl Host for FakeHost {
    fn attach(&self, file: &Path, opts: AttachOptions) -> Result<LoopDevice> {
        self.file(Op::Attach, file, || self.state().kernel.attach(file, opts))
    }
    fn detach(&self, dev: LoopDevice) -> Result<()> {
        self.check(Op::Detach, shown(&dev.path()))?;
        self.state().kernel.detach(dev)
    }
    fn attached_devices(&self) -> Result<Vec<Attached>> {
        self.check(Op::AttachedDevices, "/proc/partitions".into())?;
        Ok(self.state().kernel.attached())
    }
    fn devices_of(&self, path: &Path) -> Result<Vec<LoopDevice>> {
        let file = self.file(Op::DevicesOf, path, || FileId::at(path))?;
        let attached = self.state().kernel.attached();
        Ok(file.map_or_else(Vec::new, |file| {
            attached
                .into_iter()
                .filter(|a| a.backs(&file))
                .map(|a| a.device)
                .collect()
        }))
    }
    fn find_by_backing_file(&self, path: &Path) -> Result<Option<LoopDevice>> {
        let file = self.file(Op::FindByBackingFile, path, || FileId::at(path))?;
        let attached = self.state().kernel.attached();
        Ok(file.and_then(|file| {
            attached
                .into_iter()
                .find(|a| a.backs(&file) && !a.read_only)
                .map(|a| a.device)
        }))
    }
    fn loop_status(&self, dev: LoopDevice) -> Result<Option<(FileId, bool)>> {
        self.check(Op::LoopStatus, shown(&dev.path()))?;
        self.state().kernel.status(dev)
    }
    fn loop_device(&self, major: u32, minor: u32) -> Option<LoopDevice> {
        self.enter(Op::LoopDevice, format!("{major}:{minor}"));
        let exists = self.state().kernel.nodes.contains(&minor);
        (major == LOOP_MAJOR && exists).then_some(LoopDevice(minor))
    }
    fn dev_numbers(&self, dev: LoopDevice) -> Result<(u32, u32)> {
        self.check(Op::DevNumbers, shown(&dev.path()))?;
        if self.state().kernel.nodes.contains(&dev.0) {
            return Ok((LOOP_MAJOR, dev.0));
        }
        let sysfs = format!("/sys/block/loop{}/dev", dev.0);
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Err(Error::io("read", sysfs, missing))
    }
    fn direct_io(&self, dev: LoopDevice) -> bool {
        self.enter(Op::DirectIo, shown(&dev.path()));
        self.state()
            .kernel
            .loops
            .get(&dev.0)
            .is_some_and(|l| l.direct_io)
    }
    fn refresh_capacity(&self, dev: LoopDevice) -> Result<()> {
        self.check(Op::RefreshCapacity, shown(&dev.path()))?;
        let mut state = self.state();
        let Some(l) = state.kernel.loops.get_mut(&dev.0) else {
            let target = dev.path().display().to_string();
            return Err(Error::sys("LOOP_SET_CAPACITY", target, Errno::ENXIO));
        };
        l.capacity = l
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &l.shown, e))?
            .len();
        Ok(())
    }
    fn held_exclusively(&self, device: &Path) -> Result<bool> {
        self.check(Op::HeldExclusively, shown(device))?;
        let state = self.state();
        match state.kernel.numbers_of(device) {
            Some(numbers) => Ok(state.kernel.holds(numbers)),
            None => Err(Error::io(
                "open exclusively",
                device,
                std::io::Error::from_raw_os_error(nix::libc::ENOENT),
            )),
        }
    }
    fn fs_error_count(&self, dev: &BlockDev) -> u64 {
        self.enter(Op::FsErrorCount, shown(&dev.path));
        let state = self.state();
        state
            .kernel
            .fs_errors
            .get(&dev.numbers)
            .copied()
            .unwrap_or(0)
    }

    fn open_layer(&self, kind: LayerKind, lower: &BlockDev, read_only: bool) -> Result<BlockDev> {
        let arg = format!(
            "{} {kind}{}",
            lower.path.display(),
            if read_only { " ro" } else { "" }
        );
        self.check(Op::OpenLayer, arg)?;
        self.state().kernel.open_layer(kind, lower, read_only)
    }
    fn layer_above(&self, kind: LayerKind, lower: &BlockDev) -> Result<Option<BlockDev>> {
        self.check(Op::LayerAbove, format!("{} {kind}", lower.path.display()))?;
        Ok(self.state().kernel.layer_above(kind, lower))
    }
    fn grow_layer(&self, kind: LayerKind, upper: &BlockDev) -> Result<()> {
        self.check(Op::GrowLayer, format!("{} {kind}", upper.path.display()))?;
        match self.state().kernel.capacity(upper.numbers) {
            Some(_) => Ok(()),
            None => Err(Error::sys("grow layer", upper.path.display(), Errno::ENXIO)),
        }
    }
    fn close_layer(&self, kind: LayerKind, upper: &BlockDev) -> Result<()> {
        self.check(Op::CloseLayer, format!("{} {kind}", upper.path.display()))?;
        self.state().kernel.close_layer(upper)
    }
    fn holders(&self, dev: &BlockDev) -> Result<Vec<BlockDev>> {
        self.check(Op::Holders, shown(&dev.path))?;
        Ok(self.state().kernel.holders(dev.numbers))
    }

    fn mounts(&self) -> Result<Vec<MountEntry>> {
        self.check(Op::Mounts, "/proc/self/mountinfo".into())?;
        Ok(self.state().kernel.table.clone())
    }
    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        opts: &MountOptions,
    ) -> Result<()> {
        let arg = format!("{} {} {fs_type}", target.display(), device.display());
        self.check(Op::MountDevice, arg)?;
        self.inside(target)?;
        let mut state = self.state();
        state.kernel.mount_device(device, target, fs_type, opts)
    }
    fn bind(&self, source: &Path, target: &Path, opts: &MountOptions) -> Result<()> {
        let arg = format!("{} {}", target.display(), source.display());
        self.check(Op::Bind, arg)?;
        self.inside(target)?;
        self.state().kernel.bind(source, target, opts)
    }
    fn unmount(&self, target: &Path) -> Result<()> {
        self.check(Op::Unmount, shown(target))?;
        self.inside(target)?;
        self.state().kernel.unmount(target);
        Ok(())
    }
    fn ext_journal(&self, entry: &MountEntry) -> Option<bool> {
        self.enter(Op::ExtJournal, shown(&entry.mount_point));
        match entry.fs_type.as_str() {
            "ext2" => Some(false),
            "ext3" | "ext4" => Some(true),
            _ => None,
        }
    }

    fn supports(&self, fs: FsType) -> bool {
        self.enter(Op::Supports, fs.name().into());
        !self.state().missing_tools.contains(&fs)
    }
    fn probe(&self, device: &Path) -> Result<Probe> {
        self.check(Op::Probe, shown(device))?;
        self.state().kernel.probe(device)
    }
    fn mkfs(&self, fs: FsType, device: &Path) -> Result<()> {
        self.check(Op::Mkfs, format!("{} {}", device.display(), fs.name()))?;
        let mut state = self.state();
        if state.missing_tools.contains(&fs) {
            return Err(Error::ToolNotInstalled {
                tool: format!("mkfs.{}", fs.name()),
            });
        }
        let halfway = std::mem::take(&mut state.mkfs_halfway);
        state.kernel.mkfs(fs, device, halfway)
    }
    fn grow_offline(&self, fs: FsType, device: &Path) -> Result<()> {
        match fs {
            FsType::Ext4 => self.grow_ext4_offline(device),
            FsType::Xfs => Err(Error::Internal(format!(
                "xfs cannot grow unmounted (on {})",
                device.display()
            ))),
        }
    }
    fn grow_online(&self, fs: FsType, at: &Path) -> Result<()> {
        match fs {
            FsType::Ext4 => self.grow_ext4_online(at),
            FsType::Xfs => self.grow_xfs(at),
        }
    }

    fn node(&self, path: &Path) -> Result<Option<Node>> {
        self.node_seen(Op::Node, path, false)
    }
    fn node_followed(&self, path: &Path) -> Result<Option<Node>> {
        self.node_seen(Op::NodeFollowed, path, true)
    }
    fn file_id(&self, path: &Path) -> Result<Option<FileId>> {
        self.file(Op::FileId, path, || FileId::at(path))
    }
    fn canonicalize(&self, path: &Path) -> Result<PathBuf> {
        self.file(Op::Canonicalize, path, || {
            path.canonicalize()
                .map_err(|e| Error::io("canonicalize", path, e))
        })
    }
    fn list_dir(&self, dir: &Path) -> Result<Option<Vec<PathBuf>>> {
        self.file(Op::ListDir, dir, || linux::list_dir(dir))
    }
    fn read_file(&self, path: &Path) -> Result<Option<Vec<u8>>> {
        self.file(Op::ReadFile, path, || {
            linux::absent_ok("read", path, std::fs::read(path))
        })
    }
    fn create_dir_all(&self, dir: &Path) -> Result<()> {
        self.file(Op::CreateDirAll, dir, || {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))
        })
    }
    fn create_empty_file(&self, path: &Path) -> Result<()> {
        self.file(Op::CreateEmptyFile, path, || linux::create_empty_file(path))
    }
    fn write_record(&self, path: &Path, contents: &[u8]) -> Result<()> {
        self.file(Op::WriteRecord, path, || {
            linux::write_record(path, contents)
        })
    }
    fn write_record_at_startup(&self, path: &Path, contents: &[u8]) -> Result<()> {
        self.file(Op::WriteRecordAtStartup, path, || {
            files::write_atomic_at_startup(path, contents)
        })
    }
    fn remove_durably(&self, path: &Path) -> Result<()> {
        self.file(Op::RemoveDurably, path, || files::remove_durably(path))
    }
    fn remove_record_dir(&self, dir: &Path) -> Result<()> {
        self.file(Op::RemoveRecordDir, dir, || linux::remove_record_dir(dir))
    }
    fn remove_uncommitted(&self, path: &Path) -> Result<()> {
        self.file(Op::RemoveUncommitted, path, || {
            files::remove_uncommitted(path)
        })
    }
    fn remove_empty_dir(&self, dir: &Path) -> Result<bool> {
        self.file(Op::RemoveEmptyDir, dir, || linux::remove_empty_dir(dir))
    }
    fn remove_file(&self, path: &Path) -> Result<()> {
        self.file(Op::RemoveFile, path, || files::remove_uncommitted(path))
    }

    fn create_image(&self, path: &Path, size: u64, allocation: Allocation) -> Result<NewImage> {
        self.file(Op::CreateImage, path, || {
            let file = files::create_backing_file(path, size, allocation)?;
            let path = path.to_path_buf();
            Ok(NewImage { file, path })
        })
    }
    fn commit_with(&self, path: &Path, contents: &[u8], image: &NewImage) -> Result<()> {
        self.file(Op::CommitWith, path, || {
            let companion = Some((&image.file, image.path.as_path()));
            files::write_atomic_with(path, contents, companion)
        })
    }
    fn grow_image(&self, path: &Path, size: u64, allocation: Allocation) -> Result<()> {
        self.file(Op::GrowImage, path, || {
            files::grow_backing_file(path, size, allocation)
        })
    }
    fn copy_image(&self, src: &Path, dst: &Path, len: u64, size: u64) -> Result<CopyStats> {
        self.file(Op::CopyImage, dst, || {
            self.inside(src)?;
            files::copy_sparse(src, dst, len, size)
        })
    }
    fn patch_image(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
        deadline: Option<std::time::Instant>,
    ) -> Result<files::Patched> {
        self.file(Op::PatchImage, dst, || {
            self.inside(src)?;
            let deadline = match self.state().slow_patch {
                // The simulated pool compares slower than any deadline: out of time at once.
                true => deadline.map(|_| std::time::Instant::now()),
                false => deadline,
            };
            files::patch_to_match(src, dst, len, deadline)
        })
    }
    fn preclone(&self, src: &Path, dst: &Path, len: u64, size: u64) -> Result<Preclone> {
        // The fake's pool need not share extents: a plain copy, compared again when frozen.
        self.file(Op::CopyImage, dst, || {
            self.inside(src)?;
            let stats = files::copy_sparse_unsynced(src, dst, len, size)?;
            Ok(Preclone { stats, base: None })
        })
    }
    fn reclone_changed(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
        _base: Option<&[Extent]>,
    ) -> Result<Recloned> {
        // The fake's pool need not share extents: the same result by comparing content.
        self.file(Op::PatchImage, dst, || {
            self.inside(src)?;
            let patched = files::patch_to_match(src, dst, len, None)?;
            Ok(Recloned {
                bytes: patched.rewritten,
                ranges: 0,
                whole: false,
            })
        })
    }
    fn sync_file(&self, path: &Path) -> Result<()> {
        self.file(Op::SyncFile, path, || files::sync_file(path))
    }
    fn copy_device_to_image(&self, device: &Path, image: &Path) -> Result<u64> {
        let arg = format!("{} {}", image.display(), device.display());
        self.check(Op::CopyDeviceToImage, arg)?;
        self.inside(image)?;
        // The device reads as its backing file, which the fake's kernel holds open.
        let (file, size) = {
            let state = self.state();
            let l = loop_number(device).and_then(|n| state.kernel.loops.get(&n));
            let l = l.ok_or_else(|| Error::sys("open", device.display(), Errno::ENXIO))?;
            (std::sync::Arc::clone(&l.file), l.capacity)
        };
        linux::copy_into_image(&file, device, size, image)
    }
    fn has_data(&self, path: &Path) -> Result<bool> {
        self.file(Op::HasData, path, || files::has_data(path))
    }
    fn allocated_bytes(&self, path: &Path) -> Result<u64> {
        self.file(Op::AllocatedBytes, path, || files::allocated_bytes(path))
    }
    fn reflinks(&self, dir: &Path) -> bool {
        self.enter(Op::Reflinks, shown(dir));
        !self.state().no_reflink && self.inside(dir).is_ok() && files::reflinks(dir)
    }
    fn usage(&self, path: &Path) -> Result<Usage> {
        self.check(Op::Usage, shown(path))?;
        self.inside(path)?;
        let state = self.state();
        // A fake file system has the device's size, all of it free.
        let mounted = state.kernel.device_mounted_at(path);
        match mounted.and_then(|numbers| state.kernel.capacity(numbers)) {
            Some(capacity) => Ok(Usage {
                total_bytes: capacity,
                available_bytes: capacity,
                used_bytes: 0,
                total_inodes: capacity / 16384,
                free_inodes: capacity / 16384,
                used_inodes: 0,
            }),
            None => files::usage(path),
        }
    }
    fn try_lock(&self, path: &Path, what: &str) -> Result<std::result::Result<LockFile, Holder>> {
        self.file(Op::TryLock, path, || lockfile::try_lock(path, what))
    }

    fn open_fs(&self, path: &Path, numbers: (u32, u32)) -> Result<FsHandle> {
        self.check(Op::OpenFs, shown(path))?;
        self.inside(path)?;
        self.state().kernel.fs_at(path, numbers)?;
        let path = path.to_path_buf();
        Ok(FsHandle {
            file: None,
            path,
            numbers,
        })
    }
    fn sync_fs(&self, fs: &FsHandle) -> std::result::Result<(), Errno> {
        self.enter(Op::SyncFs, shown(&fs.path)).map_or(Ok(()), Err)
    }
    fn freeze(&self, fs: &FsHandle) -> std::result::Result<(), Errno> {
        if let Some(errno) = self.enter(Op::Freeze, shown(&fs.path)) {
            return Err(errno);
        }
        match self.state().kernel.frozen.insert(fs.numbers) {
            true => Ok(()),
            false => Err(Errno::EBUSY),
        }
    }
    fn thaw(&self, fs: &FsHandle) -> std::result::Result<(), Errno> {
        if let Some(errno) = self.enter(Op::Thaw, shown(&fs.path)) {
            return Err(errno);
        }
        self.state().kernel.thaw(fs.numbers)
    }
    fn data_ranges(&self, path: &Path, from: u64, end: u64) -> Result<Vec<Range>> {
        self.file(Op::DataRanges, path, || {
            extents::data_ranges(path, from, end)
        })
    }
    fn physical_extents(&self, path: &Path, from: u64, end: u64) -> Result<Option<Vec<Extent>>> {
        self.file(Op::PhysicalExtents, path, || {
            extents::physical_extents(path, from, end)
        })
    }
    fn differing_ranges(&self, a: &Path, b: &Path, ranges: &[Range]) -> Result<Vec<Range>> {
        self.file(Op::DifferingRanges, b, || {
            self.inside(a)?;
            extents::differing_ranges(a, b, ranges)
        })
    }
}

impl FakeHost {
    /// A grow tool on `device`: it must hold a file system of type `fs`, mounted (`online`)
    /// or not, as resize2fs and xfs_growfs demand.
    fn grow(&self, device: &Path, fs: &str, online: bool) -> Result<()> {
        let state = self.state();
        let tool = if fs == "xfs" {
            "xfs_growfs"
        } else {
            "resize2fs"
        };
        let fail = |why: String| Error::Tool {
            tool: tool.into(),
            code: Some(1),
            stderr: why,
        };
        if state.kernel.probe(device)? != Probe::FileSystem(fs.into()) {
            return Err(fail(format!("{}: bad magic number", device.display())));
        }
        let numbers = state.kernel.numbers_of(device);
        let mounted = state
            .kernel
            .table
            .iter()
            .any(|m| Some((m.major, m.minor)) == numbers);
        match (online, mounted) {
            (true, false) => Err(fail(format!("{} is not mounted", device.display()))),
            (false, true) => Err(fail(format!(
                "{} is mounted; run it offline",
                device.display()
            ))),
            _ => Ok(()),
        }
    }
}

/// The simulated grows, one per tool the real seam runs.
impl FakeHost {
    fn grow_ext4_offline(&self, device: &Path) -> Result<()> {
        self.check(Op::GrowExt4Offline, shown(device))?;
        self.grow(device, "ext4", false)
    }
    fn grow_ext4_online(&self, device: &Path) -> Result<()> {
        self.check(Op::GrowExt4Online, shown(device))?;
        self.grow(device, "ext4", true)
    }
    fn grow_xfs(&self, mount_point: &Path) -> Result<()> {
        self.check(Op::GrowXfs, shown(mount_point))?;
        let numbers = self.state().kernel.device_mounted_at(mount_point);
        let Some(numbers) = numbers else {
            return Err(Error::Tool {
                tool: "xfs_growfs".into(),
                code: Some(1),
                stderr: format!("{} is not a mounted XFS filesystem", mount_point.display()),
            });
        };
        self.grow(&node_path(numbers), "xfs", true)
    }
}
