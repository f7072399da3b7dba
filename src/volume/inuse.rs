//! One definition of "in use", shared by DeleteVolume, the reconciler, `loopcsi gc` and startup
//! recovery, so that none of them can detach or delete what another would have kept.
//!
//! A volume's image is in use when any of these holds:
//! - its node records say it is staged or published on this node (or cannot be read: then
//!   nobody can tell, and unknown is never "free");
//! - a loop device holds the image, matched by the backing file's identity (device and inode
//!   numbers), never by the path the kernel renders, which depends on the reader's mount
//!   namespace; the identity recorded at stage counts too, for an image deleted or replaced
//!   behind the driver's back;
//! - any mount uses such a device: a file system mounted from it (mountinfo's major:minor) or a
//!   bind of its device node, as a raw block publish is (mountinfo shows the numbers of the file
//!   system holding the node, e.g. devtmpfs, so the bound node's `st_rdev` is compared);
//! - a device layer is stacked on such a device (`host::layers`, found by device numbers), and
//!   so, transitively, any use of that layer's device.
//!
//! A loop device whose backing file cannot be identified is unknown: it is never taken for
//! "not this volume's" (see `host::loopdev::Attached::backing`).

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::host::layers::{BlockDev, LayerKind};
use crate::host::loopdev::{Attached, FileId, LoopDevice};
use crate::host::mount::MountEntry;
use crate::host::os::{Host, NodeKind};
use crate::volume::records::{self, NodeRecord};

/// File systems whose mount points are never stat-ed while looking for bound device nodes: a
/// dead server would hang the call, and no device node of ours is ever bound from one.
const REMOTE: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "ceph",
    "9p",
    "glusterfs",
    "lustre",
];

/// The kernel's view needed to judge use, read once: attached loop devices with the identity
/// of their backing files, and the mount table; and the host it was read from, for the stats
/// a judgement needs later.
pub struct KernelView<'h> {
    host: &'h dyn Host,
    pub attached: Vec<Attached>,
    pub table: Vec<MountEntry>,
    /// Device nodes bound somewhere (a mount whose root is a single file that is a block
    /// device): their `st_rdev` and mount point. Read once, lazily, as it needs a stat each.
    bound_nodes: std::cell::OnceCell<Vec<(u64, PathBuf)>>,
}

impl<'h> KernelView<'h> {
    pub fn read(host: &'h dyn Host) -> Result<Self> {
        Ok(KernelView {
            host,
            attached: host.attached_devices()?,
            table: host.mounts()?,
            bound_nodes: std::cell::OnceCell::new(),
        })
    }

    fn bound_nodes(&self) -> &[(u64, PathBuf)] {
        self.bound_nodes.get_or_init(|| {
            self.table
                .iter()
                // A whole file system is mounted at "/"; a bind of one file has its path.
                .filter(|m| m.root != "/" && !REMOTE.contains(&m.fs_type.as_str()))
                .filter(|m| !m.fs_type.starts_with("fuse"))
                .filter_map(|m| {
                    let node = self.host.node(&m.mount_point).ok()??;
                    (node.kind == NodeKind::BlockDevice).then(|| (node.rdev, m.mount_point.clone()))
                })
                .collect()
        })
    }

    /// The devices holding `file` (by identity).
    pub fn devices_holding(&self, file: &FileId) -> Vec<&Attached> {
        self.attached.iter().filter(|a| a.backs(file)).collect()
    }

    /// Every use of `dev` by a mount ("mounted at X", "device node bound at Y") or by a device
    /// layer stacked on it (and that layer's own uses).
    pub fn mounts_of(&self, dev: &LoopDevice) -> Vec<String> {
        let Ok(numbers) = self.host.dev_numbers(*dev) else {
            return vec![format!(
                "{} (its numbers cannot be read)",
                dev.path().display()
            )];
        };
        self.uses_of_device(&BlockDev {
            path: dev.path(),
            numbers,
        })
    }

    fn uses_of_device(&self, dev: &BlockDev) -> Vec<String> {
        let mut uses = self.direct_uses(dev);
        for kind in LayerKind::ALL {
            match self.host.layer_above(*kind, dev) {
                Ok(None) => {}
                Ok(Some(upper)) => {
                    uses.push(format!(
                        "{} ({kind}) stacked on {}",
                        upper.path.display(),
                        dev.path.display()
                    ));
                    uses.extend(self.uses_of_device(&upper));
                }
                // Unknown is never "free".
                Err(err) => uses.push(format!(
                    "cannot tell whether a {kind} layer is stacked on {}: {err}",
                    dev.path.display()
                )),
            }
        }
        uses
    }

    /// The mounts of `dev` itself: a file system mounted from it (by its numbers), a bind of
    /// its node (by the bound node's `st_rdev`). Layers over it are not looked at.
    pub(crate) fn direct_uses(&self, dev: &BlockDev) -> Vec<String> {
        let mut uses: Vec<String> = self
            .table
            .iter()
            .filter(|m| (m.major, m.minor) == dev.numbers)
            .map(|m| {
                format!(
                    "{} mounted at {}",
                    dev.path.display(),
                    m.mount_point.display()
                )
            })
            .collect();
        uses.extend(
            self.bound_nodes()
                .iter()
                .filter(|(bound, _)| *bound == dev.rdev())
                .map(|(_, at)| format!("{} bound at {}", dev.path.display(), at.display())),
        );
        uses
    }

    /// Every use of the file with identity `file`: the devices holding it, and their mounts.
    pub fn uses_of_file(&self, file: &FileId) -> Vec<String> {
        let mut uses = Vec::new();
        for held in self.devices_holding(file) {
            uses.push(format!("attached to {}", held.device.path().display()));
            uses.extend(self.mounts_of(&held.device));
        }
        uses
    }
}

/// Every use of the file at `image` by the kernel (devices holding it and their mounts);
/// nothing when there is no file there.
pub fn image_uses(view: &KernelView<'_>, image: &Path) -> Result<Vec<String>> {
    Ok(view
        .host
        .file_id(image)?
        .map(|file| view.uses_of_file(&file))
        .unwrap_or_default())
}

/// Why the volume whose image is at `image` and whose node records are in `records_dir` is in
/// use, or nothing when it is provably unused on this node.
pub fn volume_uses(view: &KernelView<'_>, image: &Path, records_dir: &Path) -> Result<Vec<String>> {
    let mut uses = Vec::new();
    let record = records::load(view.host, records_dir)?;
    uses.extend(record_uses(&record));
    let mut files: Vec<FileId> = view.host.file_id(image)?.into_iter().collect();
    if let Some(recorded) = record.staged.as_ref().and_then(|s| s.image) {
        if !files.contains(&recorded) {
            files.push(recorded);
        }
    }
    for file in &files {
        uses.extend(view.uses_of_file(file));
    }
    Ok(uses)
}

/// What the node records say is in use.
fn record_uses(record: &NodeRecord) -> Vec<String> {
    let mut uses = Vec::new();
    if let Some(staged) = &record.staged {
        uses.push(format!("staged at {} (node record)", staged.path.display()));
    }
    for published in &record.published {
        uses.push(format!(
            "published at {} (node record)",
            published.target.display()
        ));
    }
    for (path, why) in &record.damaged {
        uses.push(format!(
            "node record {} is unreadable ({why}); it may say staged or published",
            path.display()
        ));
    }
    uses
}
