//! Where everything lives under the state dir (see `pool.rs` for the on-disk contract).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::host::mount;
use crate::host::os::Host;
use crate::volume::id::{SnapshotId, VolumeId};

/// Where everything lives under the state dir, and the host it lives on: everything that holds
/// a layout (the pool, the node machinery, a freeze target) reaches the operating system
/// through that one `Host`, so a test that builds the layout on a fake host gets a domain that
/// touches nothing else.
#[derive(Clone)]
pub struct Layout {
    root: PathBuf,
    host: Arc<dyn Host>,
}

impl Layout {
    /// Creates the directories if needed and canonicalises the root (the kernel reports
    /// canonical backing-file paths, which we compare against).
    pub fn prepare(state_dir: &Path, host: Arc<dyn Host>) -> Result<Self> {
        for dir in [
            state_dir.to_path_buf(),
            state_dir.join("volumes"),
            state_dir.join("snapshots"),
            state_dir.join("node"),
        ] {
            host.create_dir_all(&dir)?;
        }
        let root = host.canonicalize(state_dir)?;
        Ok(Layout { root, host })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The operating system the state dir is on.
    pub fn host(&self) -> &dyn Host {
        &*self.host
    }

    /// The host, shared.
    pub fn shared_host(&self) -> Arc<dyn Host> {
        Arc::clone(&self.host)
    }

    /// Why the file system under the pool cannot keep the driver's crash-safety promises, if it
    /// cannot: the commit points (temp file, fsync, rename, fsync the directory) need a file
    /// system whose metadata survives a power loss consistent, and volumes need one that
    /// survives a reboot at all. Read once at startup, for a loud warning; the driver still
    /// serves (the operator chose the pool).
    pub fn durability_warning(&self) -> Option<String> {
        let table = self.host.mounts().ok()?;
        let fs = mount::mount_holding(&table, &self.root)?;
        let what = format!(
            "--state-dir {} is on {} ({} mounted at {})",
            self.root.display(),
            fs.fs_type,
            fs.source,
            fs.mount_point.display()
        );
        if self.host.ext_journal(&fs) == Some(false) {
            return Some(format!(
                "{what}, which has no journal: after a power loss or kernel crash it needs \
                 e2fsck, and a volume created, deleted or staged just before may come back \
                 half-made; put the pool on a journaled file system (ext4 with its journal, \
                 xfs, btrfs)"
            ));
        }
        if matches!(fs.fs_type.as_str(), "tmpfs" | "ramfs") {
            return Some(format!(
                "{what}, which is memory: every volume and its data are gone after a reboot"
            ));
        }
        None
    }
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }
    pub fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }
    pub fn image(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.img"))
    }
    pub fn meta(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.json"))
    }
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn snapshot_image(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.img"))
    }
    pub fn snapshot_meta(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.json"))
    }
    /// The directory of a volume's node records (see `records.rs`).
    pub fn node_record(&self, id: &VolumeId) -> PathBuf {
        self.node_dir().join(id.to_string())
    }
}
impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout").field("root", &self.root).finish()
    }
}
