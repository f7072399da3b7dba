//! The real host: [`Host`] over the Linux kernel, delegating to the free functions of
//! `loopdev`, `mount`, `files`, `tools` and `lockfile` (their code stays where it is, with its
//! contracts). The few compositions the domain did inline with `std::fs` (a record directory's
//! creation with its first record, a node's kind, the rescue's device copy, the freeze's
//! descriptor) are spelled out here once, with the same steps.

use std::fs::File;
use std::io::Seek;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::extents::{self, Extent, Range};
use super::files::{self, Allocation, CopyStats, Usage};
use super::layers::{BlockDev, LayerKind};
use super::lockfile::{self, Holder, LockFile};
use super::loopdev::{self, AttachOptions, Attached, FileId, LoopDevice};
use super::mount::{self, MountEntry, MountOptions};
use super::os::{FsHandle, Host, NewImage, Node, NodeKind};
use super::reclone::{self, Preclone, Recloned};
use super::tools::{FsType, Probe, Tools};
use crate::error::{Error, Result};

/// Bytes read from a device at a time by the rescue copy; runs of zeroes this long stay holes.
const RESCUE_CHUNK: usize = 1 << 20;

/// The Linux host. `tools` are the paths found at startup (`Tools::discover`).
#[derive(Clone, Debug)]
pub struct Linux {
    tools: Tools,
}

impl Linux {
    pub fn new(tools: Tools) -> Self {
        Linux { tools }
    }

    pub fn tools(&self) -> &Tools {
        &self.tools
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

fn node_of(meta: &std::fs::Metadata) -> Node {
    let t = meta.file_type();
    let kind = if t.is_dir() {
        NodeKind::Directory
    } else if t.is_file() {
        NodeKind::File
    } else if t.is_block_device() {
        NodeKind::BlockDevice
    } else if t.is_symlink() {
        NodeKind::Symlink
    } else {
        NodeKind::Other
    };
    Node {
        kind,
        dev: meta.dev(),
        rdev: meta.rdev(),
        len: meta.len(),
        modified: meta.modified().ok(),
    }
}

/// `Ok(None)` for a missing path, the error named by `op` otherwise.
pub(super) fn absent_ok<T>(
    op: &'static str,
    path: &Path,
    r: std::io::Result<T>,
) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(op, path, e)),
    }
}

impl Host for Linux {
    fn attach(&self, file: &Path, opts: AttachOptions) -> Result<LoopDevice> {
        loopdev::attach(file, opts)
    }
    fn detach(&self, dev: LoopDevice) -> Result<()> {
        dev.detach()
    }
    fn attached_devices(&self) -> Result<Vec<Attached>> {
        loopdev::attached_devices()
    }
    fn devices_of(&self, path: &Path) -> Result<Vec<LoopDevice>> {
        loopdev::devices_of(path)
    }
    fn find_by_backing_file(&self, path: &Path) -> Result<Option<LoopDevice>> {
        loopdev::find_by_backing_file(path)
    }
    fn loop_status(&self, dev: LoopDevice) -> Result<Option<(FileId, bool)>> {
        dev.status()
    }
    fn loop_device(&self, major: u32, minor: u32) -> Option<LoopDevice> {
        LoopDevice::from_dev_numbers(major, minor)
    }
    fn dev_numbers(&self, dev: LoopDevice) -> Result<(u32, u32)> {
        dev.dev_numbers()
    }
    fn direct_io(&self, dev: LoopDevice) -> bool {
        dev.direct_io()
    }
    fn refresh_capacity(&self, dev: LoopDevice) -> Result<()> {
        dev.refresh_capacity()
    }
    fn held_exclusively(&self, device: &Path) -> Result<bool> {
        super::held_exclusively(device)
    }
    fn fs_error_count(&self, dev: &BlockDev) -> u64 {
        // ext4 names its sysfs directory after the kernel's name of the device (loop3, dm-0).
        super::block_device_name(dev.numbers.0, dev.numbers.1)
            .and_then(|name| {
                std::fs::read_to_string(format!("/sys/fs/ext4/{name}/errors_count")).ok()
            })
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    fn open_layer(&self, kind: LayerKind, lower: &BlockDev, read_only: bool) -> Result<BlockDev> {
        kind.get().open(lower, read_only)
    }
    fn layer_above(&self, kind: LayerKind, lower: &BlockDev) -> Result<Option<BlockDev>> {
        kind.get().above(lower)
    }
    fn grow_layer(&self, kind: LayerKind, upper: &BlockDev) -> Result<()> {
        kind.get().grow(upper)
    }
    fn close_layer(&self, kind: LayerKind, upper: &BlockDev) -> Result<()> {
        kind.get().close(upper)
    }
    fn holders(&self, dev: &BlockDev) -> Result<Vec<BlockDev>> {
        super::holders(dev.numbers)
    }

    fn mounts(&self) -> Result<Vec<MountEntry>> {
        mount::mounts()
    }
    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        opts: &MountOptions,
    ) -> Result<()> {
        mount::mount_device(device, target, fs_type, opts)
    }
    fn bind(&self, source: &Path, target: &Path, opts: &MountOptions) -> Result<()> {
        mount::bind(source, target, opts)
    }
    fn unmount(&self, target: &Path) -> Result<()> {
        mount::unmount(target)
    }
    fn ext_journal(&self, entry: &MountEntry) -> Option<bool> {
        mount::ext_journal(entry)
    }

    fn supports(&self, fs: FsType) -> bool {
        self.tools.supports(fs)
    }
    fn probe(&self, device: &Path) -> Result<Probe> {
        self.tools.probe(device)
    }
    fn mkfs(&self, fs: FsType, device: &Path) -> Result<()> {
        self.tools.mkfs(fs, device)
    }
    fn grow_offline(&self, fs: FsType, device: &Path) -> Result<()> {
        fs.get().grow_offline(&self.tools, device)
    }
    fn grow_online(&self, fs: FsType, at: &Path) -> Result<()> {
        fs.get().grow_online(&self.tools, at)
    }

    fn node(&self, path: &Path) -> Result<Option<Node>> {
        node_at(path, false)
    }
    fn node_followed(&self, path: &Path) -> Result<Option<Node>> {
        node_at(path, true)
    }
    fn file_id(&self, path: &Path) -> Result<Option<FileId>> {
        FileId::at(path)
    }
    fn canonicalize(&self, path: &Path) -> Result<PathBuf> {
        path.canonicalize()
            .map_err(|e| Error::io("canonicalize", path, e))
    }
    fn list_dir(&self, dir: &Path) -> Result<Option<Vec<PathBuf>>> {
        list_dir(dir)
    }
    fn read_file(&self, path: &Path) -> Result<Option<Vec<u8>>> {
        absent_ok("read", path, std::fs::read(path))
    }
    fn create_dir_all(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))
    }
    fn create_empty_file(&self, path: &Path) -> Result<()> {
        create_empty_file(path)
    }
    fn write_record(&self, path: &Path, contents: &[u8]) -> Result<()> {
        write_record(path, contents)
    }
    fn write_record_at_startup(&self, path: &Path, contents: &[u8]) -> Result<()> {
        files::write_atomic_at_startup(path, contents)
    }
    fn remove_durably(&self, path: &Path) -> Result<()> {
        files::remove_durably(path)
    }
    fn remove_record_dir(&self, dir: &Path) -> Result<()> {
        remove_record_dir(dir)
    }
    fn remove_uncommitted(&self, path: &Path) -> Result<()> {
        files::remove_uncommitted(path)
    }
    fn remove_empty_dir(&self, dir: &Path) -> Result<bool> {
        remove_empty_dir(dir)
    }
    fn remove_file(&self, path: &Path) -> Result<()> {
        files::remove_uncommitted(path)
    }

    fn create_image(&self, path: &Path, size: u64, allocation: Allocation) -> Result<NewImage> {
        let file = files::create_backing_file(path, size, allocation)?;
        Ok(NewImage {
            file,
            path: path.to_path_buf(),
        })
    }
    fn commit_with(&self, path: &Path, contents: &[u8], image: &NewImage) -> Result<()> {
        files::write_atomic_with(path, contents, Some((&image.file, &image.path)))
    }
    fn grow_image(&self, path: &Path, size: u64, allocation: Allocation) -> Result<()> {
        files::grow_backing_file(path, size, allocation)
    }
    fn copy_image(&self, src: &Path, dst: &Path, len: u64, size: u64) -> Result<CopyStats> {
        files::copy_sparse(src, dst, len, size)
    }
    fn patch_image(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
        deadline: Option<std::time::Instant>,
    ) -> Result<files::Patched> {
        files::patch_to_match(src, dst, len, deadline)
    }
    fn preclone(&self, src: &Path, dst: &Path, len: u64, size: u64) -> Result<Preclone> {
        reclone::preclone(src, dst, len, size)
    }
    fn reclone_changed(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
        base: Option<&[Extent]>,
    ) -> Result<Recloned> {
        reclone::reclone_changed(src, dst, len, base)
    }
    fn sync_file(&self, path: &Path) -> Result<()> {
        files::sync_file(path)
    }
    fn copy_device_to_image(&self, device: &Path, image: &Path) -> Result<u64> {
        let source = File::open(device).map_err(|e| Error::io("open", device, e))?;
        // A block device's size is where a seek to its end lands.
        let size = (&source)
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io("seek", device, e))?;
        copy_into_image(&source, device, size, image)
    }
    fn has_data(&self, path: &Path) -> Result<bool> {
        files::has_data(path)
    }
    fn allocated_bytes(&self, path: &Path) -> Result<u64> {
        files::allocated_bytes(path)
    }
    fn reflinks(&self, dir: &Path) -> bool {
        files::reflinks(dir)
    }
    fn usage(&self, path: &Path) -> Result<Usage> {
        files::usage(path)
    }
    fn try_lock(&self, path: &Path, what: &str) -> Result<std::result::Result<LockFile, Holder>> {
        lockfile::try_lock(path, what)
    }

    fn open_fs(&self, path: &Path, numbers: (u32, u32)) -> Result<FsHandle> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let dev = dir
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .dev();
        if dev != nix::sys::stat::makedev(numbers.0.into(), numbers.1.into()) {
            return Err(Error::FileSystemMoved {
                path: path.to_path_buf(),
                major: numbers.0,
                minor: numbers.1,
            });
        }
        Ok(FsHandle {
            file: Some(dir),
            path: path.to_path_buf(),
            numbers,
        })
    }
    fn sync_fs(&self, fs: &FsHandle) -> std::result::Result<(), Errno> {
        fs.file
            .as_ref()
            .map_or(Err(Errno::EBADF), nix::unistd::syncfs)
    }
    fn freeze(&self, fs: &FsHandle) -> std::result::Result<(), Errno> {
        fs.file
            .as_ref()
            .map_or(Err(Errno::EBADF), loopdev::freeze_fs)
    }
    fn thaw(&self, fs: &FsHandle) -> std::result::Result<(), Errno> {
        fs.file.as_ref().map_or(Err(Errno::EBADF), loopdev::thaw_fs)
    }
    fn data_ranges(&self, path: &Path, from: u64, end: u64) -> Result<Vec<Range>> {
        extents::data_ranges(path, from, end)
    }
    fn physical_extents(&self, path: &Path, from: u64, end: u64) -> Result<Option<Vec<Extent>>> {
        extents::physical_extents(path, from, end)
    }
    fn differing_ranges(&self, a: &Path, b: &Path, ranges: &[Range]) -> Result<Vec<Range>> {
        extents::differing_ranges(a, b, ranges)
    }
}

// The compositions below are shared with the fake (`super::fake`), whose files are real: it
// simulates the kernel, not the file system of the state dir.

/// The node at `path`, following a final link when `follow`; `None` when nothing is there.
pub(super) fn node_at(path: &Path, follow: bool) -> Result<Option<Node>> {
    let meta = match follow {
        true => std::fs::metadata(path),
        false => std::fs::symlink_metadata(path),
    };
    Ok(absent_ok("stat", path, meta)?.map(|m| node_of(&m)))
}

pub(super) fn list_dir(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let Some(entries) = absent_ok("read directory", dir, std::fs::read_dir(dir))? else {
        return Ok(None);
    };
    Ok(Some(entries.flatten().map(|e| e.path()).collect()))
}

/// An empty regular file to bind a device node onto: 0600, never through a link.
pub(super) fn create_empty_file(path: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map(drop)
        .map_err(|e| Error::io("create", path, e))
}

/// `records::write_record`'s steps: a missing record directory is created, and its entry is
/// flushed together with the record's temp file (two rounds of flushes, not three).
pub(super) fn write_record(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = parent(path);
    if dir.is_dir() {
        return files::write_atomic(path, contents);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let above = parent(dir);
    let above_dir = File::open(above).map_err(|e| Error::io("open", above, e))?;
    files::write_atomic_with(path, contents, Some((&above_dir, above)))
}

/// `records::clear`'s removal: the whole directory, then its parent flushed.
pub(super) fn remove_record_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => files::fsync_dir(parent(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove directory", dir, e)),
    }
}

pub(super) fn remove_empty_dir(dir: &Path) -> Result<bool> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(false),
        Err(e) => Err(Error::io("remove directory", dir, e)),
    }
}

/// Copies the first `size` bytes of `source` (a device, named `device` in errors) into a new
/// sparse file at `image` (temp file, fsync, rename, fsync the directory): a crash leaves
/// either no image or the whole copy. The steps of `volume/rescue.rs`'s copy, which moves here
/// when the domain goes through `Host`.
pub(super) fn copy_into_image(
    source: &File,
    device: &Path,
    size: u64,
    image: &Path,
) -> Result<u64> {
    let temp = image.with_extension("img.rescue");
    // Left by a rescue that did not finish; only a rescue writes this name.
    files::remove_uncommitted(&temp)?;
    let out = files::create_backing_file(&temp, size, Allocation::Sparse)?;
    let mut buf = vec![0u8; RESCUE_CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let want = usize::try_from(size - offset).map_or(RESCUE_CHUNK, |n| n.min(RESCUE_CHUNK));
        let n = source
            .read_at(&mut buf[..want], offset)
            .map_err(|e| Error::io("read", device, e))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], offset)
                .map_err(|e| Error::io("write", &temp, e))?;
        }
        offset += n as u64;
    }
    out.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
    std::fs::rename(&temp, image).map_err(|e| Error::io("rename", &temp, e))?;
    files::fsync_dir(parent(image))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn linux() -> std::sync::Arc<dyn Host> {
        std::sync::Arc::new(Linux::new(Tools::discover().unwrap()))
    }

    #[test]
    fn a_record_in_a_missing_directory_creates_it_durably() {
        let host = linux();
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("node").join("v").join("staged.json");
        host.write_record(&record, b"{}").unwrap();
        assert_eq!(host.read_file(&record).unwrap().unwrap(), b"{}");
        let listed = host.list_dir(record.parent().unwrap()).unwrap().unwrap();
        assert_eq!(listed, vec![record.clone()], "no temp file left");
        assert_eq!(host.read_file(&dir.path().join("none")).unwrap(), None);
        host.remove_record_dir(record.parent().unwrap()).unwrap();
        host.remove_record_dir(record.parent().unwrap()).unwrap();
        assert_eq!(host.node(record.parent().unwrap()).unwrap(), None);
    }

    #[test]
    fn nodes_are_told_apart_without_following_links() {
        let host = linux();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("target");
        host.create_empty_file(&file).unwrap();
        assert!(
            host.create_empty_file(&file).is_err(),
            "never over an existing file"
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(host.node(&link).unwrap().unwrap().kind, NodeKind::Symlink);
        assert_eq!(
            host.node_followed(&link).unwrap().unwrap().kind,
            NodeKind::File
        );
        assert_eq!(
            host.node(dir.path()).unwrap().unwrap().kind,
            NodeKind::Directory
        );
        assert!(
            !host.remove_empty_dir(dir.path()).unwrap(),
            "not empty: left"
        );
        let empty = dir.path().join("empty");
        host.create_dir_all(&empty).unwrap();
        assert!(host.remove_empty_dir(&empty).unwrap());
        assert!(host.remove_empty_dir(&empty).unwrap(), "gone is success");
    }
}
