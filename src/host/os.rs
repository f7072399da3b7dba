//! `Host`: everything the domain (src/volume/, src/service/, src/operator.rs) asks of the
//! operating system, as one object-safe trait. [`super::linux::Linux`] is the real kernel;
//! `super::fake::FakeHost` (tests and the `fault-injection` feature) simulates the kernel over
//! real files so domain tests run without root and can be handed the failures the kernel will
//! not give on demand (EBUSY on unmount, mkfs failing halfway, a device vanishing, ENOSPC).
//!
//! What belongs behind the trait: every call that reads or changes state outside the process —
//! loop devices, the mount table, the tools, files in the state dir and under the CO's paths,
//! file-system freeze. Methods are named by purpose where the domain composes several syscalls
//! for one thing ("what node is at this path", "write this record durably", "remove this
//! record directory durably"), so the fake models purposes, not syscalls. They take paths and
//! plain host types (`LoopDevice`, `FileId`, `MountEntry`, `MountOptions`, `FsType`, ...) and
//! know nothing about CSI.
//!
//! What stays out: pure helpers over values already read — `mount::mounted_at` and
//! `mount::mount_holding` over a table, `MountOptions::parse`, `LoopDevice::path` (a name, no
//! I/O), `Attached::backs`, `host::alongside` (threads, not the OS) — stay free functions; a
//! fake of them would only be a second copy to keep in step.
//!
//! `Arc<dyn Host>` over a generic `Volumes<H: Host>`: the domain is large and every generic
//! parameter would be threaded through `Pool`, `NodeOps`, the services and the server, and
//! monomorphised twice (real and fake) for every test binary; the cost of a virtual call is
//! nothing next to the syscall behind it. Tests build the domain with `Arc::new(FakeHost::new())`
//! and keep a clone of the `Arc<FakeHost>` to inspect calls, which a generic would make no
//! easier. The trait is therefore object-safe: no generic methods, no `Self` returns.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::errno::Errno;

use super::extents::{Extent, Range};
use super::files::{Allocation, CopyStats, Patched, Usage};
use super::layers::{BlockDev, LayerKind};
use super::lockfile::{Holder, LockFile};
use super::loopdev::{AttachOptions, Attached, FileId, LoopDevice};
use super::mount::{MountEntry, MountOptions};
use super::reclone::{Preclone, Recloned};
use super::tools::{FsType, Probe};
use crate::error::Result;

/// What kind of node a path names (`lstat`, or `stat` for [`Host::node_followed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Directory,
    File,
    BlockDevice,
    Symlink,
    Other,
}

/// What the domain needs of a node's `stat`: its kind, the device of the file system holding
/// it (`st_dev`: a mount point's differs from its parent's), the device it *is* for a device
/// node (`st_rdev`, which identifies a raw block volume bound at a target), its size and age.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub dev: u64,
    pub rdev: u64,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

/// A backing file just created and not durable yet: [`Host::commit_with`] makes it durable in
/// the same step as the metadata that commits it. Holds the open file, so the flush needs no
/// second open (and a fake can use the same real file).
#[derive(Debug)]
pub struct NewImage {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
}

impl NewImage {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A mounted file system pinned by an open directory on it: freeze and thaw act on that file
/// system whatever happens to the path meanwhile. `file` is `None` in the fake.
#[derive(Debug)]
pub struct FsHandle {
    pub(crate) file: Option<File>,
    pub path: PathBuf,
    pub numbers: (u32, u32),
}

/// Everything the domain asks of the operating system. See the module doc.
pub trait Host: Send + Sync {
    // ---- Loop devices ----------------------------------------------------------------------

    /// Attaches `file` to a free loop device (LOOP_CONFIGURE); nothing is left attached on
    /// failure. A file under one logical block is refused (`Corrupt`).
    fn attach(&self, file: &Path, opts: AttachOptions) -> Result<LoopDevice>;
    /// Detaches `dev`; already detached is success. A device still held (mounted, frozen
    /// superblock) is `FailedPrecondition` and detaches on the holder's last close.
    fn detach(&self, dev: LoopDevice) -> Result<()>;
    /// Every attached loop device with its backing file's identity.
    fn attached_devices(&self) -> Result<Vec<Attached>>;
    /// Every loop device (read-only ones included) holding the file at `path`, by identity.
    fn devices_of(&self, path: &Path) -> Result<Vec<LoopDevice>>;
    /// The writable loop device holding the file at `path`, by identity.
    fn find_by_backing_file(&self, path: &Path) -> Result<Option<LoopDevice>>;
    /// The backing file's identity and read-only flag of `dev`; `None` when detached.
    fn loop_status(&self, dev: LoopDevice) -> Result<Option<(FileId, bool)>>;
    /// The loop device with these device numbers (from mountinfo), if they name one.
    fn loop_device(&self, major: u32, minor: u32) -> Option<LoopDevice>;
    /// `dev`'s device numbers as mountinfo and `st_rdev` show them.
    fn dev_numbers(&self, dev: LoopDevice) -> Result<(u32, u32)>;
    /// Whether the kernel does direct I/O to `dev`'s backing file.
    fn direct_io(&self, dev: LoopDevice) -> bool;
    /// Makes `dev` re-read its backing file's size (after the file grew).
    fn refresh_capacity(&self, dev: LoopDevice) -> Result<()>;
    /// Whether a process (or a mounted file system) holds the block device `device` with O_EXCL.
    fn held_exclusively(&self, device: &Path) -> Result<bool>;
    /// The number of errors ext4 recorded on the file system on `dev` (the top of a volume's
    /// stack; 0 when unknown).
    fn fs_error_count(&self, dev: &BlockDev) -> u64;

    // ---- Device layers (`host::layers`) -----------------------------------------------------

    /// Opens a `kind` layer over `lower` and returns its device; nothing is left open on failure.
    fn open_layer(&self, kind: LayerKind, lower: &BlockDev, read_only: bool) -> Result<BlockDev>;
    /// The `kind` layer's device over `lower` as the kernel shows it (by device numbers).
    fn layer_above(&self, kind: LayerKind, lower: &BlockDev) -> Result<Option<BlockDev>>;
    /// Makes the `kind` layer `upper` take its lower device's new size.
    fn grow_layer(&self, kind: LayerKind, upper: &BlockDev) -> Result<()>;
    /// Closes the `kind` layer `upper`; already closed is success.
    fn close_layer(&self, kind: LayerKind, upper: &BlockDev) -> Result<()>;
    /// The block devices built on `dev`, known by their numbers: the holders the kernel lists
    /// for it (device-mapper, md), its partitions, and the loop devices whose backing file is
    /// its node (the kernel lists no holder for those). A layer of a stack over `dev` is among
    /// them; so is anything someone else stacked on it. Gone is none.
    fn holders(&self, dev: &BlockDev) -> Result<Vec<BlockDev>>;

    // ---- Mounts ----------------------------------------------------------------------------

    /// The mount table of this process's mount namespace.
    fn mounts(&self) -> Result<Vec<MountEntry>>;
    /// Mounts the file system of type `fs_type` on `device` at `target`.
    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        opts: &MountOptions,
    ) -> Result<()>;
    /// Bind-mounts `source` (a directory, or a device node) at `target` with `opts`' flags.
    fn bind(&self, source: &Path, target: &Path, opts: &MountOptions) -> Result<()>;
    /// Unmounts `target`; not a mount point is success, busy is an `EBUSY` error (never lazy).
    fn unmount(&self, target: &Path) -> Result<()>;
    /// For an ext* mount, whether its file system keeps a journal (`None`: cannot tell).
    fn ext_journal(&self, entry: &MountEntry) -> Option<bool>;

    // ---- File-system tools -----------------------------------------------------------------

    /// Whether volumes of `fs` can be made on this node (its mkfs is installed).
    fn supports(&self, fs: FsType) -> bool;
    /// Low-level signature probe of `device`.
    fn probe(&self, device: &Path) -> Result<Probe>;
    /// Makes a file system of type `fs` on `device`.
    fn mkfs(&self, fs: FsType, device: &Path) -> Result<()>;
    /// Grows the unmounted `fs` on `device` to the device's size (see `Filesystem`).
    fn grow_offline(&self, fs: FsType, device: &Path) -> Result<()>;
    /// Grows the mounted `fs` online; `at` is what `Filesystem::grows_at` asks for.
    fn grow_online(&self, fs: FsType, at: &Path) -> Result<()>;

    // ---- Files, records and durable commits ------------------------------------------------

    /// The node at `path` without following a final symbolic link; `None` when nothing is there.
    fn node(&self, path: &Path) -> Result<Option<Node>>;
    /// The node `path` resolves to (links followed); `None` when it does not resolve.
    fn node_followed(&self, path: &Path) -> Result<Option<Node>>;
    /// The identity of the file at `path` (links followed); `None` when there is none.
    fn file_id(&self, path: &Path) -> Result<Option<FileId>>;
    /// `path` with every link and `..` resolved.
    fn canonicalize(&self, path: &Path) -> Result<PathBuf>;
    /// The entries of directory `dir`; `None` when it does not exist.
    fn list_dir(&self, dir: &Path) -> Result<Option<Vec<PathBuf>>>;
    /// The contents of the file at `path`; `None` when it does not exist.
    fn read_file(&self, path: &Path) -> Result<Option<Vec<u8>>>;
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> Result<()>;
    /// Creates an empty regular file at `path` (0600, never through a link); fails if it exists.
    fn create_empty_file(&self, path: &Path) -> Result<()>;
    /// Replaces the record at `path` durably (temp file, fsync, rename, fsync the directory):
    /// a crash leaves the old record or the new one. A missing parent directory is created, and
    /// its entry made durable together with the record.
    fn write_record(&self, path: &Path, contents: &[u8]) -> Result<()>;
    /// `write_record` for a file written at startup, before the driver serves (no crash point).
    fn write_record_at_startup(&self, path: &Path, contents: &[u8]) -> Result<()>;
    /// Removes the file at `path` durably (a record, or an image whose commit failed);
    /// already gone is success.
    fn remove_durably(&self, path: &Path) -> Result<()>;
    /// Removes the directory `dir` and everything in it durably; already gone is success.
    fn remove_record_dir(&self, dir: &Path) -> Result<()>;
    /// Removes a file nothing commits any more, without a directory fsync; gone is success.
    fn remove_uncommitted(&self, path: &Path) -> Result<()>;
    /// Removes the empty directory `dir`. `Ok(false)` when it is not empty (left in place);
    /// already gone is `Ok(true)`.
    fn remove_empty_dir(&self, dir: &Path) -> Result<bool>;
    /// Removes the regular file at `path` (not durably: a mount target). Gone is success.
    fn remove_file(&self, path: &Path) -> Result<()>;

    // ---- Backing files ---------------------------------------------------------------------

    /// Creates a new backing file of `size` bytes (fails if one exists), not durable yet.
    fn create_image(&self, path: &Path, size: u64, allocation: Allocation) -> Result<NewImage>;
    /// Writes the record at `path` durably, making `image` durable in the same step: the
    /// record is the commit point of the image.
    fn commit_with(&self, path: &Path, contents: &[u8], image: &NewImage) -> Result<()>;
    /// Grows the backing file at `path` to `size` (never shrinks); durable on return.
    fn grow_image(&self, path: &Path, size: u64, allocation: Allocation) -> Result<()>;
    /// Makes `dst` (new) a durable sparse copy of the first `len` bytes of `src`, sized `size`.
    fn copy_image(&self, src: &Path, dst: &Path, len: u64, size: u64) -> Result<CopyStats>;
    /// Rewrites the blocks of `dst` that differ from `src` in the first `len` bytes (not
    /// flushed), stopping once `deadline` has passed (see `files::patch_to_match`).
    fn patch_image(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
        deadline: Option<std::time::Instant>,
    ) -> Result<Patched>;
    /// Makes `dst` (new, sized `size`) a reflink of the first `len` bytes of `src` while `src`
    /// may still change, in chunks, and reads the copy's extents (see `reclone::preclone`).
    fn preclone(&self, src: &Path, dst: &Path, len: u64, size: u64) -> Result<Preclone>;
    /// Makes `dst`, a reflink of `src` made earlier whose extents were then `base`, read back as
    /// the first `len` bytes of `src` now, cloning again only what changed (not flushed; see
    /// `reclone::reclone_changed`).
    fn reclone_changed(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
        base: Option<&[Extent]>,
    ) -> Result<Recloned>;
    /// Flushes the file at `path` to the device.
    fn sync_file(&self, path: &Path) -> Result<()>;
    /// Copies the block device `device` into a new image at `image`, durably (a crash leaves no
    /// image or the whole copy). Returns the bytes copied.
    fn copy_device_to_image(&self, device: &Path, image: &Path) -> Result<u64>;
    /// Whether the backing file at `path` has any data extent.
    fn has_data(&self, path: &Path) -> Result<bool>;
    /// Bytes of `path` allocated on disk.
    fn allocated_bytes(&self, path: &Path) -> Result<u64>;
    /// Whether copies into `dir` share extents (reflink) instead of copying data.
    fn reflinks(&self, dir: &Path) -> bool;
    /// Space and inodes of the file system holding `path`.
    fn usage(&self, path: &Path) -> Result<Usage>;
    /// Takes the process-lifetime exclusive lock on `path`; `Ok(Err(holder))` when held.
    fn try_lock(&self, path: &Path, what: &str) -> Result<std::result::Result<LockFile, Holder>>;

    // ---- Freeze ----------------------------------------------------------------------------

    /// Opens the file system mounted at `path`, checking that it is the one with device
    /// numbers `numbers` (`FailedPrecondition` otherwise).
    fn open_fs(&self, path: &Path, numbers: (u32, u32)) -> Result<FsHandle>;
    /// syncfs(2): writes the file system's dirty data and metadata out, while it still runs
    /// (so a FIFREEZE right after has little left to flush while the application waits).
    fn sync_fs(&self, fs: &FsHandle) -> std::result::Result<(), Errno>;
    /// FIFREEZE; `EBUSY` when it is frozen already.
    fn freeze(&self, fs: &FsHandle) -> std::result::Result<(), Errno>;
    /// FITHAW; `EINVAL` when it was not frozen.
    fn thaw(&self, fs: &FsHandle) -> std::result::Result<(), Errno>;

    // ---- Extents (changed-block tracking) --------------------------------------------------

    /// The data ranges of the file at `path` within `[from, end)`, clipped and ascending
    /// (SEEK_DATA/SEEK_HOLE: every pool file system answers). The rest reads as zeroes.
    fn data_ranges(&self, path: &Path, from: u64, end: u64) -> Result<Vec<Range>>;
    /// The physical extents of the file at `path` overlapping `[from, end)` (FIEMAP); `None`
    /// when the file system cannot tell where the data lives.
    fn physical_extents(&self, path: &Path, from: u64, end: u64) -> Result<Option<Vec<Extent>>>;
    /// The parts of `ranges` where the files at `a` and `b` differ, by content, in blocks of
    /// `extents::COMPARE_BLOCK`, merged and ascending.
    fn differing_ranges(&self, a: &Path, b: &Path, ranges: &[Range]) -> Result<Vec<Range>>;
}
