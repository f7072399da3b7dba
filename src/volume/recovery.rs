//! Opening the store: every object's metadata loaded, and what a crash left half-made removed
//! (or, read-only, reported); metadata that cannot be read kept aside, never taken for absent.

use crate::volume::layout::Layout;
use crate::volume::meta::*;
use crate::volume::pool::{Index, Pool};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::host::files::{self};
use crate::host::os::{Host, NodeKind};
use crate::volume::id::{Id, Kind, SnapshotId, VolumeId};
use crate::volume::inuse::{self, KernelView};

/// Startup recovery of one commit-point directory: loads the metadata, removes temp files and
/// images without metadata (an interrupted create or delete). Unreadable metadata is reported
/// and left untouched with its image.
pub(crate) fn recover_dir<K: Kind, M: Committed<Id = Id<K>>>(
    host: &dyn Host,
    dir: &Path,
    view: &KernelView<'_>,
    recovery: &mut Recovery,
    index: &mut Index,
    clean: bool,
) -> Result<Vec<M>> {
    let remove = |path: &Path| {
        if clean {
            host.remove_durably(path)
        } else {
            Ok(())
        }
    };
    let mut metas = Vec::new();
    let mut images = Vec::new();
    let mut unreadable_stems = Vec::new();
    for path in list_dir(host, dir)? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(files::TEMP_SUFFIX) {
            remove(&path)?;
            recovery.removed_temp_files.push(path);
        } else if let Some(stem) = name.strip_suffix(".json") {
            match load_meta::<M>(host, &path, stem) {
                Ok(meta) => metas.push(meta),
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "unreadable {} metadata; not served, files and node records left untouched", M::WHAT);
                    unreadable_stems.push(stem.to_string());
                    if let Some(id) = Id::parse(stem) {
                        M::unreadable_in(index).insert(
                            id,
                            Unreadable {
                                what: M::WHAT,
                                path: path.clone(),
                                why: err.to_string(),
                                name: salvage_name(host, &path),
                            },
                        );
                    }
                    recovery.unreadable.push(path);
                }
            }
        } else if let Some(stem) = name.strip_suffix(".img") {
            images.push((stem.to_string(), path));
        }
    }
    for (stem, path) in images {
        let committed =
            metas.iter().any(|m| m.id().to_string() == stem) || unreadable_stems.contains(&stem);
        if committed {
            continue;
        }
        let uses = inuse::image_uses(view, &path)?;
        if !uses.is_empty() {
            tracing::warn!(path = %path.display(), uses = %uses.join("; "), "image without metadata is in use; left in place");
            continue;
        }
        if clean {
            // Read-only (the operator CLI) removes nothing, so it says nothing here either.
            tracing::info!(path = %path.display(), "removing the image of an interrupted {} create or delete", M::WHAT);
        }
        remove(&path)?;
        recovery.removed_partial_images.push(path);
    }
    Ok(metas)
}

/// The entries of a directory the layout made: missing is an error, as `read_dir` gives it.
pub(crate) fn list_dir(host: &dyn Host, dir: &Path) -> Result<Vec<PathBuf>> {
    host.list_dir(dir)?.ok_or_else(|| {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        Error::io("read directory", dir, missing)
    })
}

impl Pool {
    pub(crate) fn open_with(layout: Layout, clean: bool) -> Result<(Self, Recovery)> {
        let mut recovery = Recovery::default();
        let mut index = Index::default();
        let host = layout.host();
        let view = KernelView::read(host)?;
        for meta in recover_dir::<_, VolumeMeta>(
            host,
            &layout.volumes_dir(),
            &view,
            &mut recovery,
            &mut index,
            clean,
        )? {
            index.by_name.insert(meta.name.clone(), meta.id);
            index.by_id.insert(meta.id, Arc::new(meta));
        }
        for snap in recover_dir::<_, SnapshotMeta>(
            host,
            &layout.snapshots_dir(),
            &view,
            &mut recovery,
            &mut index,
            clean,
        )? {
            index.snapshots_by_name.insert(snap.name.clone(), snap.id);
            index.snapshots.insert(snap.id, Arc::new(snap));
        }
        for path in list_dir(host, &layout.node_dir())? {
            let known = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(VolumeId::parse)
                // Records of a volume whose metadata cannot be read are kept: they say where it
                // is staged and published, which teardown needs.
                .is_some_and(|id| {
                    index.by_id.contains_key(&id)
                        || index.unreadable.contains_key(&id)
                        // The image is still attached or mounted: its records say where.
                        || inuse::image_uses(&view, &layout.image(&id))
                            .map_or(true, |uses| !uses.is_empty())
                });
            let is_dir = host
                .node(&path)?
                .is_some_and(|n| n.kind == NodeKind::Directory);
            if known && is_dir {
                // A crash-safe record write that did not finish.
                for temp in list_dir(host, &path)? {
                    if temp.to_string_lossy().ends_with(files::TEMP_SUFFIX) {
                        if clean {
                            host.remove_durably(&temp)?;
                        }
                        recovery.removed_temp_files.push(temp);
                    }
                }
                continue;
            }
            if clean {
                tracing::info!(path = %path.display(), "removing stale node records");
                let removed = if is_dir {
                    crate::volume::records::clear(host, &path)
                } else {
                    host.remove_durably(&path)
                };
                // Something odd in the node dir must not keep the driver from starting.
                if let Err(err) = removed {
                    tracing::error!(path = %path.display(), error = %err, "could not remove; left in place");
                    continue;
                }
            }
            recovery.removed_node_records.push(path);
        }
        recovery.volumes = index.by_id.len();
        Ok((
            Pool {
                layout,
                index: RwLock::new(index),
            },
            recovery,
        ))
    }

    /// The metadata of volume `id` exists but cannot be read, if so.
    pub fn unreadable(&self, id: &VolumeId) -> Option<Unreadable> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .unreadable
            .get(id)
            .cloned()
    }

    /// The metadata of snapshot `id` exists but cannot be read, if so.
    pub fn unreadable_snapshot(&self, id: &SnapshotId) -> Option<Unreadable> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .unreadable_snapshots
            .get(id)
            .cloned()
    }

    /// Every volume's, then every snapshot's, metadata that cannot be read, each in id order.
    pub fn unreadable_all(&self) -> Vec<Unreadable> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index
            .unreadable
            .values()
            .chain(index.unreadable_snapshots.values())
            .cloned()
            .collect()
    }

    /// DeleteVolume of a volume whose metadata cannot be read: the CO names the id, so the
    /// files are what it asks to delete (the caller made sure nothing on this node uses them).
    pub(crate) fn delete_unreadable(&self, id: &VolumeId, unreadable: &Unreadable) -> Result<()> {
        if unreadable.what != VolumeMeta::WHAT {
            return Ok(());
        }
        let image = self.layout.image(id);
        self.forget_unreadable::<VolumeMeta>(id, unreadable)?;
        crate::volume::records::clear(self.host(), &self.layout.node_record(id))?;
        self.host().remove_uncommitted(&image)
    }

    /// Removes unreadable metadata (the commit point) for a delete the CO asked for by id.
    pub(crate) fn forget_unreadable<M: Committed>(
        &self,
        id: &M::Id,
        unreadable: &Unreadable,
    ) -> Result<()> {
        tracing::warn!(id = %id, path = %unreadable.path.display(), why = %unreadable.why, "deleting a {} whose metadata is unreadable, as the CO asked", unreadable.what);
        self.host().remove_durably(&unreadable.path)?;
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        M::unreadable_in(&mut index).remove(id);
        Ok(())
    }

    /// A create under `name` could duplicate an object whose metadata cannot be read: refused
    /// while such metadata carries this name, or carries no name that can be read at all.
    pub(crate) fn refuse_unknown_names(&self, what: &'static str, name: &str) -> Result<()> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let blocking = index
            .unreadable
            .values()
            .chain(index.unreadable_snapshots.values())
            .find(|u| {
                u.what == what
                    && u.name
                        .as_deref()
                        .is_none_or(|unreadable| unreadable == name)
            });
        match blocking {
            None => Ok(()),
            Some(u) => Err(Error::NameUnknowable {
                what,
                name: name.to_string(),
                metadata: u.path.clone(),
                why: u.why.clone(),
                names: u.name.clone(),
            }),
        }
    }
}
