//! Loop devices: the kernel contract, and the only file of the crate allowed `unsafe`.
//!
//! A volume's backing file is attached with one `LOOP_CONFIGURE` ioctl (kernel ≥ 5.8), which sets
//! the file, the logical block size and the flags atomically, so no half-configured device is
//! ever visible. We ask for direct I/O (no second page cache between the volume's file system and
//! the pool's) and a 4096-byte logical block size; `/sys/block/loopN/loop/dio` tells whether the
//! kernel honoured direct I/O, and we log loudly when it fell back to buffered I/O.
//!
//! Which device backs which file is never recorded by us, and never judged by a path: the
//! kernel keeps the backing file's identity (the device and inode numbers of the file, from
//! `LOOP_GET_STATUS64`), and that is compared with a `stat` of the image whenever the question
//! comes up. The path in `/sys/block/loopN/loop/backing_file` is only for people: the kernel
//! renders it with d_path() from the *reader's* mount namespace, so the same device shows
//! `/var/lib/loopcsi/volumes/<id>.img` to the driver that attached it and `/volumes/<id>.img` to
//! its successor once the first container's bind of the pool is gone. A device whose backing
//! file cannot be identified is "unknown", never "not ours".
//! `AUTOCLEAR` is deliberately not set: a raw block volume is handed to the pod as a bind mount
//! of the device node, which holds no open reference, so autoclear would detach it under the pod.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::{Error, Result};
pub use crate::host::fileid::FileId;
pub use crate::host::loopscan::{
    attached, attached_devices, devices_backed_by, devices_of, find_by_backing_file, Attached,
};

/// Logical block size of every loop device we attach. It is part of the on-disk contract: an
/// xfs made on a 4096-byte-sector device cannot be mounted from a 512-byte one, so it must never
/// change for existing volumes.
pub const LOGICAL_BLOCK_SIZE: u32 = 4096;

/// The block major of loop devices (`LOOP_MAJOR` in the kernel).
const LOOP_MAJOR: u32 = 7;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The loop ioctls predate the _IOW/_IOR encoding, hence the "bad" variants.
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);
nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);
nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
// FICLONE (linux/fs.h: _IOW(0x94, 9, int)): the whole file shares the source's extents.
nix::ioctl_write_int_bad!(ficlone, 0x4004_9409);

/// Makes `dst` share every extent of `src` (FICLONE): one call, whatever the number of
/// extents, where the file system can (xfs with reflink, btrfs); EOPNOTSUPP, EXDEV or EINVAL
/// elsewhere. `dst` takes `src`'s size.
pub fn clone_file(src: &File, dst: &File) -> std::result::Result<(), Errno> {
    // SAFETY: FICLONE takes the source's file descriptor as its integer argument; both
    // descriptors are open for the duration of the call (borrowed `File`s), and the kernel
    // reads nothing else from this process's memory.
    unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd()) }.map(drop)
}

/// `struct file_clone_range` of linux/fs.h, FICLONERANGE's argument.
#[repr(C)]
pub struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

// FICLONERANGE (linux/fs.h: _IOW(0x94, 13, struct file_clone_range)).
nix::ioctl_write_ptr!(ficlonerange, 0x94, 13, FileCloneRange);

/// Makes `len` bytes of `dst` at `offset` share the extents of `src` at the same offset
/// (FICLONERANGE). Offsets and length must be multiples of the file system's block size, except
/// a length reaching the end of `src`. A hole in `src` becomes a hole in `dst`.
pub fn clone_range(
    src: &File,
    dst: &File,
    offset: u64,
    len: u64,
) -> std::result::Result<(), Errno> {
    let range = FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: offset,
        src_length: len,
        dest_offset: offset,
    };
    // SAFETY: `range` is a live `file_clone_range`, the struct the ioctl's size names, which the
    // kernel only reads; both descriptors are open for the duration of the call.
    unsafe { ficlonerange(dst.as_raw_fd(), &range) }.map(drop)
}

/// One loop device, by number (`/dev/loopN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoopDevice(pub u32);

/// Per loop device number: the attachment's diskseq and its status.
type Memo = HashMap<u32, (u64, Status)>;

/// What LOOP_GET_STATUS64 says of an attached device: the backing file's identity, whether it is
/// read-only, and the device numbers of the backing file when that is a block device
/// (`lo_rdevice`: how a loop device stacked over another one is found).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Status {
    file: FileId,
    read_only: bool,
    rdev: Option<(u32, u32)>,
}

/// How to attach a backing file.
#[derive(Clone, Copy, Debug)]
pub struct AttachOptions {
    pub direct_io: bool,
    pub read_only: bool,
}

impl LoopDevice {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.0))
    }

    /// The loop device with these device numbers (as mountinfo shows them), if they name a
    /// whole loop device. Resolved through sysfs, so it holds whatever the loop module's
    /// `max_part` makes of minor numbers.
    pub fn from_dev_numbers(major: u32, minor: u32) -> Option<Self> {
        if major != LOOP_MAJOR {
            return None;
        }
        let name = super::block_device_name(major, minor)?;
        let number = name.strip_prefix("loop")?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        number.parse().ok().map(LoopDevice)
    }

    fn sysfs(&self, leaf: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}/{leaf}", self.0))
    }

    /// The file this device is attached to, as the kernel reports it; `None` when detached.
    pub fn backing_file(&self) -> Option<PathBuf> {
        let raw = std::fs::read_to_string(self.sysfs("loop/backing_file")).ok()?;
        let trimmed = raw.trim_end_matches('\n');
        (!trimmed.is_empty()).then(|| PathBuf::from(trimmed))
    }

    /// The attachment's sequence number (`/sys/block/loopN/diskseq`): the kernel gives each
    /// attach of a device a new one, so (number, diskseq) names one attachment for ever.
    fn diskseq(&self) -> Option<u64> {
        std::fs::read_to_string(self.sysfs("diskseq"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `status`, remembered per attachment (see `diskseq`). Asking the kernel means opening the
    /// device, and an open device turns a concurrent LOOP_CLR_FD into a deferred one; the
    /// answer never changes while the attachment lives, so each attachment is asked once. The
    /// memo holds one entry per loop device number (a newer attachment replaces the older).
    pub fn status(&self) -> Result<Option<(FileId, bool)>> {
        Ok(self.memo_status()?.map(|s| (s.file, s.read_only)))
    }

    /// The device numbers of this device's backing file when it is a block device (a loop
    /// device stacked on another one); `None` when detached or backed by a regular file.
    pub fn backing_device(&self) -> Result<Option<(u32, u32)>> {
        Ok(self.memo_status()?.and_then(|s| s.rdev))
    }

    fn memo_status(&self) -> Result<Option<Status>> {
        static KNOWN: std::sync::Mutex<Option<Memo>> = std::sync::Mutex::new(None);
        let before = self.diskseq();
        if let Some(seq) = before {
            let known = KNOWN
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, status)) = known
                .as_ref()
                .and_then(|m| m.get(&self.0))
                .filter(|(known_seq, _)| *known_seq == seq)
            {
                return Ok(Some(*status));
            }
        }
        let status = self.ask_status()?;
        if let (Some(seq), Some(found)) = (before, status) {
            // Only an answer about the same attachment from start to end is remembered.
            if self.diskseq() == Some(seq) {
                KNOWN
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert_with(HashMap::new)
                    .insert(self.0, (seq, found));
            }
        }
        Ok(status)
    }

    /// The identity of the backing file and whether the device is read-only, from
    /// LOOP_GET_STATUS64; `None` when the device is not attached.
    fn ask_status(&self) -> Result<Option<Status>> {
        let dev = match OpenOptions::new().read(true).open(self.path()) {
            Ok(dev) => dev,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => {
                return Err(Error::DeviceNodeMissing {
                    device: self.path(),
                })
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => return Ok(None),
            Err(e) => return Err(Error::io("open", self.path(), e)),
        };
        let mut info = LoopInfo64::zeroed();
        // SAFETY: `dev` is an open loop device descriptor and `info` is a writable, fully
        // initialised `struct loop_info64` that outlives the call.
        match unsafe { loop_get_status64(dev.as_raw_fd(), &mut info) } {
            Ok(_) => {
                // huge_encode_dev, as `lo_device`: decoded the same way (0 for a regular file).
                let rdev = FileId::from_kernel(info.lo_rdevice, 0).dev;
                let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
                Ok(Some(Status {
                    file: FileId::from_kernel(info.lo_device, info.lo_inode),
                    read_only: info.lo_flags & LO_FLAGS_READ_ONLY != 0,
                    rdev: (rdev != 0)
                        .then(|| Some((u32::try_from(major).ok()?, u32::try_from(minor).ok()?)))
                        .flatten(),
                }))
            }
            Err(Errno::ENXIO) => Ok(None),
            Err(errno) => Err(Error::sys(
                "LOOP_GET_STATUS64",
                self.path().display(),
                errno,
            )),
        }
    }

    /// Whether the device was attached read-only (the kernel refuses every write to it).
    pub fn read_only(&self) -> bool {
        std::fs::read_to_string(self.sysfs("ro")).is_ok_and(|s| s.trim() == "1")
    }

    /// Whether the kernel is doing direct I/O to the backing file.
    pub fn direct_io(&self) -> bool {
        std::fs::read_to_string(self.sysfs("loop/dio")).is_ok_and(|s| s.trim() == "1")
    }

    /// The device number (major, minor) as mountinfo and `st_rdev` show it.
    pub fn dev_numbers(&self) -> Result<(u32, u32)> {
        let path = self.sysfs("dev");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
        parse_dev_numbers(text.trim()).ok_or_else(|| Error::UnexpectedSysfs {
            path: path.clone(),
            content: text.clone(),
        })
    }

    /// Detaches the device. A device that is already detached is success (idempotent).
    /// If something still holds it open, the kernel detaches it on the last close.
    pub fn detach(&self) -> Result<()> {
        let dev = match OpenOptions::new().read(true).open(self.path()) {
            Ok(dev) => dev,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(()),
            Err(e) => return Err(Error::io("open", self.path(), e)),
        };
        // SAFETY: `dev` is an open loop device descriptor for the duration of the call, and
        // LOOP_CLR_FD takes no argument.
        match unsafe { loop_clr_fd(dev.as_raw_fd()) } {
            Ok(_) | Err(Errno::ENXIO) => {}
            Err(errno) => return Err(Error::sys("LOOP_CLR_FD", self.path().display(), errno)),
        }
        drop(dev);
        self.wait_detached()
    }

    /// LOOP_CLR_FD on a device that someone else holds open (a reader that is just looking, or
    /// a frozen file system's superblock) only marks it for detaching on the last close. The
    /// detach is reported done only once the kernel shows it done: a short reader is waited
    /// for (bounded); a holder that stays is an error the caller can retry, never a silent OK
    /// with the device left behind.
    fn wait_detached(&self) -> Result<()> {
        const TRIES: u32 = 500;
        for _ in 0..TRIES {
            if self.backing_file().is_none() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Err(Error::DeviceStillOpen {
            device: self.path(),
        })
    }

    /// Tells the device to re-read its backing file's size (after the file was grown).
    pub fn refresh_capacity(&self) -> Result<()> {
        let dev = OpenOptions::new()
            .read(true)
            .open(self.path())
            .map_err(|e| Error::io("open", self.path(), e))?;
        // SAFETY: `dev` is an open loop device descriptor; LOOP_SET_CAPACITY takes no argument.
        unsafe { loop_set_capacity(dev.as_raw_fd()) }
            .map(drop)
            .map_err(|errno| Error::sys("LOOP_SET_CAPACITY", self.path().display(), errno))
    }
}

pub(crate) fn parse_dev_numbers(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Attaches `file` to a free loop device with one LOOP_CONFIGURE. Nothing is left attached when
/// this fails. Two attaches may race for the same free device; the loser retries.
pub fn attach(file: &Path, opts: AttachOptions) -> Result<LoopDevice> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .open(file)
        .map_err(|e| Error::io("open", file, e))?;
    // A device over less than one logical block has no capacity: it would be useless, and
    // invisible to `attached` (so a retry would attach another one). A block device (a layer
    // stacked over a volume's device) has no length in its stat: its end is its size.
    let stat = backing.metadata().map_err(|e| Error::io("stat", file, e))?;
    let len = if std::os::unix::fs::FileTypeExt::is_block_device(&stat.file_type()) {
        std::io::Seek::seek(&mut &backing, std::io::SeekFrom::End(0))
            .map_err(|e| Error::io("seek", file, e))?
    } else {
        stat.len()
    };
    if len < u64::from(LOGICAL_BLOCK_SIZE) {
        return Err(Error::TinyImage {
            path: file.to_path_buf(),
            bytes: len,
            block: LOGICAL_BLOCK_SIZE,
        });
    }
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| Error::io("open", "/dev/loop-control", e))?;

    let mut last = Errno::EBUSY;
    for _ in 0..64 {
        // SAFETY: `control` is an open /dev/loop-control descriptor; LOOP_CTL_GET_FREE takes no
        // argument and returns a device number.
        let number = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
            .map_err(|errno| Error::sys("LOOP_CTL_GET_FREE", "/dev/loop-control", errno))?;
        let dev = LoopDevice(u32::try_from(number).map_err(|_| Error::BadFreeDevice { number })?);
        let node = match open_device(&dev) {
            Ok(node) => node,
            // Another process may have grabbed and removed it; try another one.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => continue,
            Err(e) => return Err(Error::io("open", dev.path(), e)),
        };
        match configure(&node, &backing, file, opts) {
            Ok(()) => return Ok(dev),
            // Lost a race for this device; another caller configured it first.
            Err(Errno::EBUSY) => last = Errno::EBUSY,
            // Some kernels refuse direct I/O outright when the pool file system cannot do it:
            // fall back to buffered I/O on the same device, loudly.
            Err(Errno::EINVAL) if opts.direct_io => {
                tracing::warn!(
                    backing.file = %file.display(),
                    "the pool file system refused direct I/O; attaching with buffered I/O"
                );
                let buffered = AttachOptions {
                    direct_io: false,
                    ..opts
                };
                match configure(&node, &backing, file, buffered) {
                    Ok(()) => return Ok(dev),
                    Err(Errno::EBUSY) => last = Errno::EBUSY,
                    Err(errno) => {
                        return Err(Error::sys("LOOP_CONFIGURE", dev.path().display(), errno))
                    }
                }
            }
            Err(errno) => return Err(Error::sys("LOOP_CONFIGURE", dev.path().display(), errno)),
        }
    }
    Err(Error::sys("LOOP_CONFIGURE", file.display(), last))
}

fn open_device(dev: &LoopDevice) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).open(dev.path())
}

fn configure(node: &File, backing: &File, file: &Path, opts: AttachOptions) -> Result<(), Errno> {
    let mut flags = 0;
    if opts.direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| Errno::EBADF)?;
    let mut info = LoopInfo64 {
        lo_flags: flags,
        ..LoopInfo64::zeroed()
    };
    // The kernel shows this name in losetup's listing; the authoritative path is in sysfs.
    let name = file.as_os_str().as_encoded_bytes();
    let len = name.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..len].copy_from_slice(&name[..len]);
    let config = LoopConfig {
        fd,
        block_size: LOGICAL_BLOCK_SIZE,
        info,
        reserved: [0; 8],
    };
    // SAFETY: `node` is an open loop device descriptor, `config` is a fully initialised
    // `struct loop_config` that lives across the call, and `config.fd` is the descriptor of
    // `backing`, which stays open until the ioctl returns (the kernel takes its own reference).
    unsafe { loop_configure(node.as_raw_fd(), &config) }.map(drop)
}

// FIFREEZE and FITHAW from <linux/fs.h> (`_IOWR('X', 119, int)`, `_IOWR('X', 120, int)`). They
// live here because this is the one file allowed `unsafe`; they act on a file system, not a loop
// device. The kernel ignores the argument.
nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);

/// Freezes the file system `fs` (an open directory on it) is on: flushes it and blocks new
/// writes. The errno tells the caller what happened (EBUSY: already frozen).
pub fn freeze_fs(fs: &File) -> std::result::Result<(), Errno> {
    let mut unused: nix::libc::c_int = 0;
    // SAFETY: `fs` is an open descriptor for the duration of the call, and `unused` is a valid
    // int the kernel may read or write (it does neither for FIFREEZE).
    unsafe { fifreeze(fs.as_raw_fd(), &mut unused) }.map(drop)
}

/// Thaws the file system `fs` is on (EINVAL: it was not frozen).
pub fn thaw_fs(fs: &File) -> std::result::Result<(), Errno> {
    let mut unused: nix::libc::c_int = 0;
    // SAFETY: as in `freeze_fs`; FITHAW ignores its argument too.
    unsafe { fithaw(fs.as_raw_fd(), &mut unused) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_parse() {
        assert_eq!(parse_dev_numbers("7:12"), Some((7, 12)));
        assert_eq!(parse_dev_numbers("7"), None);
        assert_eq!(parse_dev_numbers("x:1"), None);
    }

    #[test]
    fn kernel_device_numbers_decode_like_the_c_library() {
        // huge_encode_dev(MKDEV(259, 300)): minor low byte, major, minor high bits above.
        let kernel = (300 & 0xff) | (259 << 8) | ((300 & !0xff) << 12);
        let id = FileId::from_kernel(kernel, 42);
        assert_eq!(nix::sys::stat::major(id.dev), 259);
        assert_eq!(nix::sys::stat::minor(id.dev), 300);
        assert_eq!(id.ino, 42);
        let small = FileId::from_kernel((8 << 8) | 1, 7);
        assert_eq!(small.dev, nix::sys::stat::makedev(8, 1));
    }

    #[test]
    fn struct_layout_matches_the_kernel() {
        // <linux/loop.h>: sizeof(struct loop_info64) == 232, sizeof(struct loop_config) == 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
