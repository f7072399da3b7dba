//! What an operator (the `loopcsi status` command) and a metrics scrape see: every volume with
//! its size, allocation, loop device, staging and publish paths and health, read from the pool,
//! the node records and the kernel at that instant. Reading it changes nothing.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::Result;
use crate::host::loopdev::FileId;
use crate::host::mount;
use crate::volume::handle::Near;
use crate::volume::node::NodeOps;
use crate::volume::params::{Provisioning, VolumeKind};
use crate::volume::records;
use crate::volume::volumes::Skipper;

/// What a scrape reads from the pool and the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub volumes: u64,
    pub staged: u64,
    pub published: u64,
    pub snapshots: u64,
    pub loop_devices: u64,
    pub pool_capacity_bytes: u64,
    pub pool_available_bytes: u64,
    /// Bytes really allocated by volume and snapshot images (shared extents counted per file).
    pub allocated_bytes: u64,
}

/// One volume as `loopcsi status` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeStatus {
    pub id: String,
    pub name: String,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub kind: VolumeKind,
    pub provisioning: Provisioning,
    /// The driver made the file system (false for a block volume, and for a file system
    /// volume not staged yet).
    pub formatted: bool,
    pub loop_device: Option<String>,
    pub direct_io: Option<bool>,
    pub staged_at: Option<PathBuf>,
    pub published_at: Vec<PathBuf>,
    pub healthy: bool,
    pub health: String,
}

impl NodeOps {
    /// Every volume's status, in id order.
    pub fn volume_statuses(&self, skipper: &Skipper<'_>) -> Result<Vec<VolumeStatus>> {
        let mut out = Vec::new();
        for meta in self.pool.volumes() {
            let image = self.pool.layout().image(&meta.id);
            let device = self.host().find_by_backing_file(&image)?;
            let v = self.view(&meta.id, Near::Staged)?;
            let condition = self.condition_of(&v, skipper)?;
            let record = v.record;
            out.push(VolumeStatus {
                id: meta.id.to_string(),
                name: meta.name.clone(),
                capacity_bytes: meta.capacity_bytes,
                allocated_bytes: self.host().allocated_bytes(&image).unwrap_or(0),
                kind: meta.kind,
                provisioning: meta.params.provisioning,
                formatted: meta.formatted,
                loop_device: device.map(|d| d.path().display().to_string()),
                direct_io: device.map(|d| self.host().direct_io(d)),
                staged_at: record.staged.map(|s| s.path),
                published_at: record.published.into_iter().map(|p| p.target).collect(),
                healthy: !condition.abnormal,
                health: condition.message,
            });
        }
        Ok(out)
    }

    /// The figures a metrics scrape reports, each read once (one sysfs scan, one mountinfo
    /// read), so a scrape stays cheap with thousands of volumes.
    pub fn inventory(&self) -> Result<Inventory> {
        let layout = self.pool.layout();
        let host = self.host();
        // Devices are the pool's when they hold a volume's image (by identity: the path the
        // kernel shows depends on the mount namespace that attached them).
        let images: std::collections::HashSet<FileId> = self
            .pool
            .volumes()
            .iter()
            .filter_map(|meta| host.file_id(&layout.image(&meta.id)).ok().flatten())
            .collect();
        let devices: Vec<_> = host
            .attached_devices()?
            .into_iter()
            .filter(|a| a.backing.is_some_and(|file| images.contains(&file)))
            .collect();
        let table = host.mounts()?;
        let mut published = 0u64;
        let mut allocated = 0u64;
        for meta in self.pool.volumes() {
            allocated += host.allocated_bytes(&layout.image(&meta.id)).unwrap_or(0);
            let record = records::load(host, &layout.node_record(&meta.id))?;
            published += record
                .published
                .iter()
                .filter(|p| mount::mounted_at(&table, &p.target).is_some())
                .count() as u64;
        }
        let (snapshots, _) = self.pool.list_snapshots(None, usize::MAX, |_| true);
        for snap in &snapshots {
            allocated += host
                .allocated_bytes(&layout.snapshot_image(&snap.id))
                .unwrap_or(0);
        }
        let usage = self.pool.usage()?;
        Ok(Inventory {
            volumes: self.pool.len() as u64,
            staged: devices.iter().filter(|a| !a.read_only).count() as u64,
            published,
            snapshots: snapshots.len() as u64,
            loop_devices: devices.len() as u64,
            pool_capacity_bytes: usage.total_bytes,
            pool_available_bytes: usage.available_bytes,
            allocated_bytes: allocated,
        })
    }
}
