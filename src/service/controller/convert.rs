//! Request parsing and reply building of the Controller service, apart from the RPC handlers.

use std::collections::HashMap;

use crate::csi;
use crate::error::{shown, Error, Result};
use crate::service::{capability, required, snapshot_id, volume_id, CapabilityError};
use crate::volume::id::{Id, Kind, VolumeId};
use crate::volume::params::{Capability, FsType, VolumeKind, FSTYPE_KEY};
use crate::volume::pool::{ContentSource, SnapshotMeta, VolumeMeta};
use crate::volume::Volumes;

/// CSI size limit for names and ids.
const MAX_NAME_BYTES: usize = 128;

use super::ControllerService;

/// A CreateVolume name: required, ≤ 128 bytes, none of the control characters the spec bans.
pub(crate) fn volume_name(name: &str) -> Result<&str> {
    required("name", name)?;
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            "name",
            format!("{} is longer than {MAX_NAME_BYTES} bytes", shown(name)),
        ));
    }
    let banned = |c: char| matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}');
    if name.chars().any(banned) {
        return Err(Error::invalid(
            "name",
            format!("{} contains a control character", shown(name)),
        ));
    }
    Ok(name)
}

/// The capabilities of a CreateVolume: all must be served, and they must agree on one kind of
/// volume (a raw block volume is never also a file system, so it is never formatted by mistake),
/// and with the StorageClass's file system `class_fs` when the parameters name one.
pub(super) fn creation_capabilities(
    caps: &[csi::VolumeCapability],
    class_fs: Option<FsType>,
    domain: &Volumes,
) -> std::result::Result<(VolumeKind, Vec<Capability>), CapabilityError> {
    if caps.is_empty() {
        return Err(CapabilityError::Malformed(Error::invalid(
            "volume_capabilities",
            "is required (at least one)",
        )));
    }
    let parsed = caps
        .iter()
        .map(|c| capability("volume_capabilities", c, Some(domain)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let kinds = parsed
        .iter()
        .map(|c| c.volume_kind_in(class_fs))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|why| CapabilityError::Unsupported(Error::invalid("volume_capabilities", why)))?;
    let kind = kinds[0];
    if let Some(other) = kinds.iter().find(|k| **k != kind) {
        return Err(CapabilityError::Unsupported(Error::invalid(
            "volume_capabilities",
            format!("ask for {kind} and {other} at once; a loopcsi volume is one or the other"),
        )));
    }
    if let VolumeKind::Filesystem(fs) = kind {
        // fs_type itself was checked by `capability`; a file system named only by the
        // parameters is checked here, with the same message.
        if !domain.supports(fs) {
            return Err(CapabilityError::Unsupported(Error::invalid(
                "parameters",
                format!(
                    "\"{FSTYPE_KEY}\" {} is not available: its mkfs is not installed on this node",
                    fs.name()
                ),
            )));
        }
    }
    Ok((kind, parsed))
}

/// CreateVolume `volume_content_source`, typed. A source id that is not one of ours names
/// nothing: NOT_FOUND.
pub(super) fn content_source(
    source: Option<&csi::VolumeContentSource>,
) -> Result<Option<ContentSource>> {
    use csi::volume_content_source::Type;
    match source.map(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(None) => Err(Error::invalid(
            "volume_content_source",
            "names neither a snapshot nor a volume",
        )),
        Some(Some(Type::Snapshot(s))) => Ok(Some(ContentSource::Snapshot(snapshot_id(
            "volume_content_source.snapshot.snapshot_id",
            &s.snapshot_id,
        )?))),
        Some(Some(Type::Volume(v))) => Ok(Some(ContentSource::Volume(volume_id(
            "volume_content_source.volume.volume_id",
            &v.volume_id,
        )?))),
    }
}

/// An optional id filter (ListSnapshots): `None` when empty (anything matches), `Some(None)`
/// for an id that is not one of ours (nothing matches).
pub(super) fn optional_id<K: Kind>(value: &str) -> Option<Option<Id<K>>> {
    (!value.is_empty()).then(|| Id::parse(value))
}

pub(super) fn content_source_reply(source: ContentSource) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    csi::VolumeContentSource {
        r#type: Some(match source {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.to_string(),
            }),
        }),
    }
}

/// A snapshot as CSI shows it; `group` is the group snapshot it is a member of (then it MUST
/// NOT be deleted alone, and says so by its `group_snapshot_id`).
pub(crate) fn snapshot_reply(snap: &SnapshotMeta, group: Option<VolumeId>) -> csi::Snapshot {
    const NANOS: u128 = 1_000_000_000;
    csi::Snapshot {
        size_bytes: i64::try_from(snap.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: snap.id.to_string(),
        source_volume_id: snap.source_volume_id.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(snap.created_unix_nanos / NANOS).unwrap_or(i64::MAX),
            nanos: i32::try_from(snap.created_unix_nanos % NANOS).unwrap_or(0),
        }),
        // The copy is complete when CreateSnapshot answers.
        ready_to_use: true,
        group_snapshot_id: group.map(|g| g.to_string()).unwrap_or_default(),
    }
}

/// CreateSnapshot `parameters`: loopcsi has none of its own; the sidecars' keys are accepted.
pub(crate) fn snapshot_parameters(params: &HashMap<String, String>) -> Result<()> {
    let mut keys: Vec<_> = params.keys().collect();
    keys.sort();
    match keys
        .into_iter()
        .find(|k| !k.starts_with("csi.storage.k8s.io/"))
    {
        Some(key) => Err(Error::invalid(
            "parameters",
            format!("unknown key {}; snapshots take no parameters", shown(key)),
        )),
        None => Ok(()),
    }
}

/// A max_entries field: 0 means no limit; negative is INVALID_ARGUMENT.
pub(super) fn page_size(max_entries: i32) -> Result<usize> {
    match max_entries {
        0 => Ok(usize::MAX),
        n if n < 0 => Err(Error::invalid("max_entries", format!("{n} is negative"))),
        n => Ok(n.unsigned_abs() as usize),
    }
}

impl ControllerService {
    pub(super) fn volume_reply(&self, meta: &VolumeMeta) -> csi::Volume {
        csi::Volume {
            capacity_bytes: i64::try_from(meta.capacity_bytes).unwrap_or(i64::MAX),
            volume_id: meta.id.to_string(),
            volume_context: HashMap::new(),
            content_source: meta.content_source.map(content_source_reply),
            accessible_topology: vec![self.driver.topology()],
        }
    }

    /// `requisite` must include this node: the volume can only ever live here.
    /// CreateVolume's content source is NOT_FOUND (CSI: "the specified source does not exist").
    /// In a cluster the usual cause is a source on another node: the provisioner of the node the
    /// scheduler picked asks only its own driver, and a loopcsi snapshot or volume lives in one
    /// node's pool. The message says which node looked, so a restore on the wrong node explains
    /// itself in the claim's events.
    pub(super) fn source_elsewhere(&self, err: Error) -> Error {
        match err {
            Error::NotFound { what, id } => Error::SourceNotFound {
                what,
                id,
                node: self.driver.node_id.clone(),
            },
            other => other,
        }
    }

    pub(super) fn check_topology(&self, req: Option<&csi::TopologyRequirement>) -> Result<()> {
        let Some(req) = req else { return Ok(()) };
        if req.requisite.is_empty() || req.requisite.iter().any(|t| self.driver.is_this_node(t)) {
            return Ok(());
        }
        Err(Error::NotAccessibleHere {
            node: self.driver.node_id.clone(),
        })
    }
}
