//! One volume, opened once per operation.
//!
//! A node operation needs the same things every time: the volume's metadata (or the fact that
//! there is none), the paths of its image and node record, the node record (what the CO asked
//! this node for), and the kernel's view (its loop devices and the mount table). They used to
//! be re-read by each function an operation passed through; now the door opens them once into a
//! [`VolumeView`] (read-only calls: stats, condition) or an [`OpenVolume`] (the view plus the
//! volume's operation guard: stage, unstage, publish, unpublish, expand, rescue, a reconcile of
//! one volume), and the operation is a function over it.
//!
//! **The handle never goes stale behind the operation's back.** Changes to the metadata go
//! through the handle ([`OpenVolume::update_meta`], [`OpenVolume::mark_formatted`]), which
//! writes the store and keeps the new copy; after the operation itself changed the kernel (a
//! re-mount by the reconciler), it says so by calling [`OpenVolume::reobserve`].

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::volume::id::VolumeId;
use crate::volume::locks::VolumeGuard;
use crate::volume::node::NodeOps;
use crate::volume::observed::Observed;
use crate::volume::params::Capability;
use crate::volume::pool::{Pool, VolumeMeta};
use crate::volume::records::{self, NodeRecord};

/// Where the operation expects the volume's file system (or device node): the mount found
/// there spares the scan of every attached loop device (see `Observed::read_for`).
#[derive(Clone, Copy)]
pub(crate) enum Near<'p> {
    /// Where the node record says the volume is staged (if anywhere).
    Staged,
    /// A path the CO gave (a staging path or a target).
    At(&'p Path),
}

/// What is known of one volume on this node at the start of an operation.
pub(crate) struct VolumeView<'h> {
    pub(crate) id: VolumeId,
    /// None when the volume has no readable metadata (teardown still works from the records).
    pub(crate) meta: Option<Arc<VolumeMeta>>,
    /// Where the volume's image lives.
    pub(crate) image: PathBuf,
    /// Where the volume's node record lives.
    pub(crate) records: PathBuf,
    pub(crate) record: NodeRecord,
    pub(crate) observed: Observed<'h>,
}

impl<'h> VolumeView<'h> {
    /// Reads everything once: metadata, node record, then the kernel's view, matched to the
    /// image by identity (including the identity recorded when it was staged).
    pub(crate) fn read(store: &'h Pool, id: &VolumeId, near: Near<'_>) -> Result<Self> {
        let layout = store.layout();
        let host = layout.host();
        let image = layout.image(id);
        let records = layout.node_record(id);
        let record = records::load(host, &records)?;
        let meta = store.get(id);
        let observed = observe(store, &image, &record, near, meta.as_deref())?;
        Ok(VolumeView {
            id: *id,
            meta,
            image,
            records,
            record,
            observed,
        })
    }

    /// The volume's metadata, or NOT_FOUND naming the id.
    pub(crate) fn meta(&self) -> Result<&Arc<VolumeMeta>> {
        self.meta.as_ref().ok_or_else(|| Error::NotFound {
            what: "volume",
            id: self.id.to_string(),
        })
    }

    /// The metadata, checked against the capability the CO asks for: FAILED_PRECONDITION when
    /// it does not fit the volume.
    pub(crate) fn checked(&self, cap: &Capability) -> Result<Arc<VolumeMeta>> {
        let meta = self.meta()?;
        cap.check_against(meta.kind)
            .map_err(|reason| Error::CapabilityMismatch { reason })?;
        Ok(Arc::clone(meta))
    }
}

fn observe<'h>(
    store: &'h Pool,
    image: &Path,
    record: &NodeRecord,
    near: Near<'_>,
    meta: Option<&VolumeMeta>,
) -> Result<Observed<'h>> {
    let hint = match near {
        Near::Staged => record.staged.as_ref().map(|s| s.path.as_path()),
        Near::At(path) => Some(path),
    };
    let recorded = record.staged.as_ref().and_then(|s| s.image);
    let layers = meta.map(|m| m.params.layers.as_slice());
    Observed::read_for(store.layout().host(), image, recorded, hint, layers)
}

/// A volume opened for an operation that changes it: its guard (taken by the door) and its
/// view. The guard lives as long as the handle, so the operation holds it to the end.
pub(crate) struct OpenVolume<'h> {
    held: VolumeGuard,
    store: &'h Pool,
    view: VolumeView<'h>,
}

impl<'h> OpenVolume<'h> {
    pub(crate) fn new(held: VolumeGuard, store: &'h Pool, near: Near<'_>) -> Result<Self> {
        let view = VolumeView::read(store, held.id(), near)?;
        Ok(OpenVolume { held, store, view })
    }

    /// Writes new metadata and keeps it as the handle's copy.
    pub(crate) fn update_meta(&mut self, meta: VolumeMeta) -> Result<Arc<VolumeMeta>> {
        let meta = self.store.update(&self.held, meta)?;
        self.view.meta = Some(Arc::clone(&meta));
        Ok(meta)
    }

    /// Records that the driver formatted the volume (nothing to do when it is recorded).
    pub(crate) fn mark_formatted(&mut self) -> Result<()> {
        let current = self.meta()?;
        if current.formatted {
            return Ok(());
        }
        let mut updated = (**current).clone();
        updated.formatted = true;
        self.update_meta(updated).map(drop)
    }

    /// Reads the kernel's view again, after this operation changed it.
    pub(crate) fn reobserve(&mut self, near: Near<'_>) -> Result<()> {
        let (image, record) = (&self.view.image, &self.view.record);
        let meta = self.view.meta.as_deref();
        self.view.observed = observe(self.store, image, record, near, meta)?;
        Ok(())
    }

    /// Replaces the node record the handle holds (after the operation rebuilt it).
    pub(crate) fn set_record(&mut self, record: NodeRecord) {
        self.view.record = record;
    }
}

impl<'h> Deref for OpenVolume<'h> {
    type Target = VolumeView<'h>;

    fn deref(&self) -> &VolumeView<'h> {
        &self.view
    }
}

impl NodeOps {
    /// Opens volume `held` for an operation that changes it (see `OpenVolume`).
    pub(crate) fn open(&self, held: VolumeGuard, near: Near<'_>) -> Result<OpenVolume<'_>> {
        OpenVolume::new(held, &self.pool, near)
    }

    /// Reads volume `id` for an operation that only looks (see `VolumeView`).
    pub(crate) fn view(&self, id: &VolumeId, near: Near<'_>) -> Result<VolumeView<'_>> {
        VolumeView::read(&self.pool, id, near)
    }
}
