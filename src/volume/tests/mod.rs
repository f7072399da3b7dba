//! Failure injection through the whole domain, on `FakeHost`: the failures the kernel will not
//! give on demand (EBUSY on unmount, mkfs dying halfway, a device vanishing, ENOSPC on a record
//! or metadata write, a freeze or thaw failing), driven through `Volumes` as the services drive
//! it. Each test is named for the failure it injects and asserts what the operator sees (the
//! error and its gRPC code) and that nothing is lost or leaked (devices, mounts, records,
//! images). No root needed; the real-kernel suites in tests/ stay the truth of the happy paths.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod data;
mod group;
mod guards;
mod layers;
mod metadata;
mod node;
mod orphans;
mod pool;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::host::fake::FakeHost;
use crate::host::loopdev::{Attached, LoopDevice};
use crate::host::os::Host;
use crate::volume::id::VolumeId;
use crate::volume::params::{
    AccessKind, AccessMode, Capability, CapacityRange, FsType, MountFlags, VolumeKind, VolumeParams,
};
use crate::volume::pool::NewVolume;
use crate::volume::records::{self, NodeRecord};
use crate::volume::volumes::{Publish, Volumes};

/// A domain on a fake host whose files live in a temp dir the test owns.
pub(super) struct Bed {
    _dir: tempfile::TempDir,
    root: PathBuf,
    host: Arc<FakeHost>,
    volumes: Volumes,
}

pub(super) const SIZE: i64 = 64 << 20;

pub(super) fn bed() -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let host = Arc::new(FakeHost::new(&root));
    let shared: Arc<dyn Host> = Arc::clone(&host) as Arc<dyn Host>;
    let (volumes, _) = Volumes::open(&root.join("state"), shared, true).unwrap();
    Bed {
        _dir: dir,
        root,
        host,
        volumes,
    }
}

pub(super) fn fs_cap() -> Capability {
    Capability {
        access: AccessMode::SingleNodeWriter,
        kind: AccessKind::Mount {
            fs: Some(FsType::Ext4),
            flags: MountFlags::parse(Vec::new()).unwrap(),
        },
    }
}

pub(super) fn block_cap() -> Capability {
    Capability {
        access: AccessMode::SingleNodeWriter,
        kind: AccessKind::Block,
    }
}

impl Bed {
    pub(super) fn create(&self, name: &str, kind: VolumeKind) -> VolumeId {
        self.volumes
            .create(new_volume(name, kind), |e| e)
            .map(|(meta, _)| meta.id)
            .unwrap()
    }

    /// A file-system volume, staged at `staging(id)`.
    pub(super) fn staged_fs(&self, name: &str) -> VolumeId {
        let id = self.create(name, VolumeKind::Filesystem(FsType::Ext4));
        self.volumes
            .stage(&id, &self.staging(&id), &fs_cap())
            .unwrap();
        id
    }

    /// Where the kubelet would stage volume `id` (inside the fake's root).
    pub(super) fn staging(&self, id: &VolumeId) -> PathBuf {
        self.root
            .join("kubelet")
            .join(id.to_string())
            .join("staging")
    }

    pub(super) fn target(&self, id: &VolumeId, pod: &str) -> PathBuf {
        self.root.join("pods").join(pod).join(id.to_string())
    }

    pub(super) fn publish(&self, id: &VolumeId, pod: &str) -> crate::error::Result<()> {
        let cap = fs_cap();
        let (staging, target) = (self.staging(id), self.target(id, pod));
        let req = Publish {
            staging: &staging,
            target: &target,
            capability: &cap,
            readonly: false,
        };
        self.volumes.publish(id, req)
    }

    pub(super) fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The volume's node records, as the next operation would read them.
    pub(super) fn record(&self, id: &VolumeId) -> NodeRecord {
        let dir = self.state().join("node").join(id.to_string());
        records::load(&*self.host, &dir).unwrap()
    }

    pub(super) fn devices(&self) -> Vec<Attached> {
        self.host.loop_devices()
    }

    /// The one attached loop device (the tests stage one volume at a time).
    pub(super) fn device(&self) -> LoopDevice {
        let devices = self.devices();
        assert_eq!(devices.len(), 1, "one device attached: {devices:?}");
        devices[0].device
    }

    pub(super) fn mounted_at(&self, path: &Path) -> bool {
        self.host
            .mount_table()
            .iter()
            .any(|m| m.mount_point == path)
    }

    /// The files in a directory of the state dir (`volumes`, `snapshots`, `frozen`).
    pub(super) fn files_in(&self, dir: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.state().join(dir)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

pub(super) fn new_volume(name: &str, kind: VolumeKind) -> NewVolume {
    NewVolume {
        name: name.into(),
        capacity: CapacityRange {
            required_bytes: SIZE,
            limit_bytes: 0,
        },
        kind,
        access_modes: vec![AccessMode::SingleNodeWriter],
        params: VolumeParams::default(),
        source: None,
    }
}
