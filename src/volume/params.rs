//! Typed request parameters: StorageClass parameters, capacity ranges and volume capabilities,
//! each parsed once from what the CO sent. Errors name the CSI field and the offending value.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{shown, Error, Mismatch, Result};
pub use crate::host::fs::FsType;
use crate::host::mount::MountOptions;

/// The file system a volume gets when the request names none.
pub const DEFAULT_FS: FsType = FsType::Ext4;
/// The size a volume gets when the request has no capacity_range (or only a larger limit).
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// Volume sizes are whole MiB: the loop device's 4096-byte blocks divide it, and mkfs likes it.
pub const SIZE_GRANULARITY: u64 = 1 << 20;
/// Smallest raw block volume.
pub const MINIMUM_BLOCK_SIZE: u64 = 1 << 20;

/// What a volume holds: decided at creation, it never changes (so a raw block volume is never
/// mistaken for a blank file system and formatted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    Filesystem(FsType),
    Block,
}

impl VolumeKind {
    pub fn minimum_size(self) -> u64 {
        match self {
            VolumeKind::Filesystem(fs) => fs.minimum_size(),
            VolumeKind::Block => MINIMUM_BLOCK_SIZE,
        }
    }
}

impl std::fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeKind::Filesystem(fs) => write!(f, "a {} file system", fs.name()),
            VolumeKind::Block => f.write_str("a raw block device"),
        }
    }
}

/// The CSI access modes loopcsi serves: every single-node mode (a loop device lives on one node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub fn read_only(self) -> bool {
        self == AccessMode::SingleNodeReaderOnly
    }

    /// Whether the volume may be published at more than one target path on this node.
    pub fn allows_several_targets(self) -> bool {
        self == AccessMode::SingleNodeMultiWriter
    }
}

/// How a volume is to be accessed, from one CSI VolumeCapability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access: AccessMode,
    pub kind: AccessKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    Block,
    Mount {
        /// `None` when the request left fs_type empty (the volume's own type applies).
        fs: Option<FsType>,
        flags: MountFlags,
    },
}

/// A capability's `mount_flags`, validated and parsed once, where the request is parsed. Node
/// records persist them as the list the CO sent (the format records had before the parsed form
/// was kept); loading a record parses that list again. Flags a later build refuses make the
/// record unreadable, which the records treat as damaged (never as absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct MountFlags {
    sent: Vec<String>,
    parsed: MountOptions,
}

impl MountFlags {
    /// Validates `sent` (see `MountOptions::parse`); the reason names the offending flag.
    pub fn parse(sent: Vec<String>) -> std::result::Result<Self, String> {
        let parsed = MountOptions::parse(&sent)?;
        Ok(MountFlags { sent, parsed })
    }

    /// The flags as the CO sent them.
    pub fn as_sent(&self) -> &[String] {
        &self.sent
    }

    /// The flags as the kernel takes them.
    pub fn options(&self) -> &MountOptions {
        &self.parsed
    }
}

impl TryFrom<Vec<String>> for MountFlags {
    type Error = String;

    fn try_from(sent: Vec<String>) -> std::result::Result<Self, String> {
        MountFlags::parse(sent)
    }
}

impl From<MountFlags> for Vec<String> {
    fn from(flags: MountFlags) -> Self {
        flags.sent
    }
}

impl Capability {
    /// The kind of volume this capability asks to be created.
    pub fn volume_kind(&self) -> VolumeKind {
        match &self.kind {
            AccessKind::Block => VolumeKind::Block,
            AccessKind::Mount { fs, .. } => VolumeKind::Filesystem(fs.unwrap_or(DEFAULT_FS)),
        }
    }

    /// The kind of volume to create when the StorageClass names `class_fs`
    /// (`csi.storage.k8s.io/fstype`). Kubernetes' provisioner moves that key into `fs_type`
    /// itself, but other COs and csi-sanity pass it as a parameter: ignoring it would make an
    /// ext4 volume for an xfs class. A raw block volume has no file system, so it is ignored
    /// there (as Kubernetes does for `volumeMode: Block`); the reason when `fs_type` names
    /// another file system.
    pub fn volume_kind_in(
        &self,
        class_fs: Option<FsType>,
    ) -> std::result::Result<VolumeKind, String> {
        match (&self.kind, class_fs) {
            (AccessKind::Mount { fs: None, .. }, Some(class)) => Ok(VolumeKind::Filesystem(class)),
            (AccessKind::Mount { fs: Some(fs), .. }, Some(class)) if *fs != class => Err(format!(
                "mount.fs_type {} disagrees with parameters[\"{FSTYPE_KEY}\"] {}",
                shown(fs.name()),
                shown(class.name())
            )),
            _ => Ok(self.volume_kind()),
        }
    }

    /// Whether a volume of `kind` can be used this way; the reason when it cannot.
    pub fn check_against(&self, kind: VolumeKind) -> std::result::Result<(), String> {
        match (&self.kind, kind) {
            (AccessKind::Block, VolumeKind::Block) => Ok(()),
            (AccessKind::Mount { fs: None, .. }, VolumeKind::Filesystem(_)) => Ok(()),
            (AccessKind::Mount { fs: Some(want), .. }, VolumeKind::Filesystem(have))
                if *want == have =>
            {
                Ok(())
            }
            (AccessKind::Mount { fs: Some(want), .. }, VolumeKind::Filesystem(have)) => {
                Err(format!(
                    "the volume holds a {} file system, not {}",
                    have.name(),
                    want.name()
                ))
            }
            (AccessKind::Block, VolumeKind::Filesystem(_)) => Err(format!(
                "the volume holds {kind}; it cannot be used as a raw block device"
            )),
            (AccessKind::Mount { .. }, VolumeKind::Block) => Err(
                "the volume is a raw block volume; it cannot be mounted as a file system".into(),
            ),
        }
    }

    /// The mount flags as the CO sent them.
    pub fn mount_flags(&self) -> &[String] {
        match &self.kind {
            AccessKind::Mount { flags, .. } => flags.as_sent(),
            AccessKind::Block => &[],
        }
    }

    /// The mount flags as parsed when the request was (none for a raw block volume).
    pub fn mount_options(&self) -> MountOptions {
        match &self.kind {
            AccessKind::Mount { flags, .. } => flags.options().clone(),
            AccessKind::Block => MountOptions::default(),
        }
    }
}

/// StorageClass `provisioning`: thin (sparse file, the default) or thick (fully allocated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    #[default]
    Thin,
    Thick,
}

/// The PVC a volume was provisioned for (from the provisioner's `--extra-create-metadata`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pv_name: Option<String>,
}

/// The StorageClass parameters a volume keeps for its life, declared once: parsed here (the
/// `TryFrom` below), persisted in the volume's metadata (flattened: each field is a top-level
/// key of `volumes/<id>.json`, as before this struct existed), and compared as a whole when a
/// CreateVolume retry finds the volume by name (`conflict`). A new parameter is a field here
/// (with `#[serde(default)]`, so older metadata still loads), its key in the `TryFrom`, and its
/// comparison in `conflict`, which the compiler demands: it destructures the struct.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeParams {
    pub provisioning: Provisioning,
    #[serde(default)]
    pub claim: ClaimRef,
    /// The device layers between the loop device and the file system, lowest first (see
    /// `volume::stack`). Not written when there are none, so such metadata keeps its format.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<crate::host::layers::LayerKind>,
}

impl VolumeParams {
    /// Why an existing volume with these parameters is not what `requested` asks for (the tail
    /// of an ALREADY_EXISTS message, named by the StorageClass key); `None` when it is.
    pub fn conflict(&self, requested: &VolumeParams) -> Option<Mismatch> {
        // No `..`: a field added to the struct must be decided on here.
        let VolumeParams {
            provisioning,
            // Who asked (the PVC) is not what was asked for: a retry names the same claim, and
            // the first claim's name stays on record.
            claim: _,
            layers,
        } = self;
        if *layers != requested.layers {
            let names = |l: &[crate::host::layers::LayerKind]| format!("{l:?}");
            return Some(Mismatch::Parameter {
                key: "layers",
                existing: names(layers),
                requested: names(&requested.layers),
            });
        }
        if *provisioning != requested.provisioning {
            return Some(Mismatch::Parameter {
                key: "provisioning",
                existing: format!("{provisioning:?}"),
                requested: format!("{:?}", requested.provisioning),
            });
        }
        None
    }
}

/// CreateVolume `parameters`, typed: what the volume keeps, and the file system the class
/// names. Reads through to the kept parameters (`params.provisioning`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageClassParams {
    pub volume: VolumeParams,
    /// `csi.storage.k8s.io/fstype`, when the CO passes it as a parameter (see
    /// `Capability::volume_kind_in`). Not kept: it becomes the volume's kind.
    pub fs: Option<FsType>,
}

impl std::ops::Deref for StorageClassParams {
    type Target = VolumeParams;

    fn deref(&self) -> &VolumeParams {
        &self.volume
    }
}

/// Keys the Kubernetes sidecars add on their own; accepted and never interpreted as ours.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";
/// The StorageClass's file system, as Kubernetes names it.
pub const FSTYPE_KEY: &str = "csi.storage.k8s.io/fstype";

impl TryFrom<&HashMap<String, String>> for StorageClassParams {
    type Error = Error;

    fn try_from(map: &HashMap<String, String>) -> Result<Self> {
        let mut params = StorageClassParams::default();
        // Sorted, so the error for several bad keys is the same on every call.
        let mut keys: Vec<_> = map.keys().collect();
        keys.sort();
        for key in keys {
            let value = &map[key];
            match key.as_str() {
                "provisioning" => {
                    params.volume.provisioning = match value.as_str() {
                        "thin" => Provisioning::Thin,
                        "thick" => Provisioning::Thick,
                        _ => {
                            return Err(Error::invalid(
                                "parameters.provisioning",
                                format!("{} is not one of \"thin\", \"thick\"", shown(value)),
                            ))
                        }
                    }
                }
                "csi.storage.k8s.io/pvc/name" => params.volume.claim.name = Some(value.clone()),
                "csi.storage.k8s.io/pvc/namespace" => {
                    params.volume.claim.namespace = Some(value.clone())
                }
                "csi.storage.k8s.io/pv/name" => params.volume.claim.pv_name = Some(value.clone()),
                // Test builds only: a release build has no layer to give (see `LayerKind`).
                #[cfg(any(test, feature = "fault-injection"))]
                crate::volume::stack::LAYERS_KEY => {
                    params.volume.layers = crate::volume::stack::parse_layers(value)?
                }
                // Empty is what a class without an fstype gives: the default applies.
                FSTYPE_KEY if value.is_empty() => {}
                FSTYPE_KEY => {
                    params.fs = Some(FsType::from_name(value).ok_or_else(|| {
                        Error::invalid(
                            "parameters",
                            format!(
                                "\"{FSTYPE_KEY}\" {} is not supported (use {})",
                                shown(value),
                                FsType::choices()
                            ),
                        )
                    })?)
                }
                other if other.starts_with(SIDECAR_PREFIX) => {}
                other => {
                    return Err(Error::invalid(
                        "parameters",
                        format!(
                            "unknown key {}; loopcsi understands \"provisioning\"",
                            shown(other)
                        ),
                    ))
                }
            }
        }
        Ok(params)
    }
}

/// CreateVolume `capacity_range` as sent (0 = unset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapacityRange {
    pub required_bytes: i64,
    pub limit_bytes: i64,
}

impl CapacityRange {
    /// Whether an existing volume of `size` bytes satisfies this range.
    pub fn admits(&self, size: u64) -> bool {
        let required_ok = u64::try_from(self.required_bytes).is_ok_and(|r| size >= r);
        let limit_ok =
            self.limit_bytes == 0 || u64::try_from(self.limit_bytes).is_ok_and(|l| size <= l);
        required_ok && limit_ok
    }

    /// Rejects negative values (the spec forbids them) naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.required_bytes < 0 {
            return Err(Error::invalid(
                "capacity_range.required_bytes",
                format!("{} is negative", self.required_bytes),
            ));
        }
        if self.limit_bytes < 0 {
            return Err(Error::invalid(
                "capacity_range.limit_bytes",
                format!("{} is negative", self.limit_bytes),
            ));
        }
        Ok(())
    }

    /// The size to create, honouring the range exactly as the spec says: at least
    /// `required_bytes` (rounded up to a whole MiB and to the file system's minimum), never more
    /// than `limit_bytes`; `DEFAULT_VOLUME_SIZE` when neither is set. OUT_OF_RANGE when no
    /// whole-MiB size satisfies the range.
    pub fn resolve(&self, minimum: u64) -> Result<u64> {
        self.validate()?;
        let required = self.required_bytes.unsigned_abs();
        let limit = self.limit_bytes.unsigned_abs();
        if limit != 0 && required > limit {
            return Err(Error::LimitBelowRequired { limit, required });
        }
        let floor = minimum.max(SIZE_GRANULARITY);
        let size = if required == 0 {
            let wanted = DEFAULT_VOLUME_SIZE.max(floor);
            if limit != 0 && wanted > limit {
                // Only a limit: the largest whole-MiB size under it.
                limit - limit % SIZE_GRANULARITY
            } else {
                wanted
            }
        } else {
            let wanted = required.max(floor);
            wanted
                .checked_next_multiple_of(SIZE_GRANULARITY)
                .filter(|s| i64::try_from(*s).is_ok())
                .ok_or(Error::RequiredTooLarge { required })?
        };
        if size < floor || (limit != 0 && size > limit) {
            return Err(Error::NoSizeFits {
                floor,
                required,
                limit,
            });
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: i64 = 1 << 20;

    fn range(required_bytes: i64, limit_bytes: i64) -> CapacityRange {
        CapacityRange {
            required_bytes,
            limit_bytes,
        }
    }

    #[test]
    fn capacity_rounds_up_within_the_limit() {
        let min = FsType::Ext4.minimum_size();
        assert_eq!(range(0, 0).resolve(min).unwrap(), DEFAULT_VOLUME_SIZE);
        assert_eq!(range(100 * MIB + 1, 0).resolve(min).unwrap(), 101 << 20);
        assert_eq!(range(10 << 30, 10 << 30).resolve(min).unwrap(), 10 << 30);
        assert_eq!(range(1, 0).resolve(min).unwrap(), min);
        assert_eq!(range(0, 100 * MIB + 5).resolve(min).unwrap(), 100 << 20);
        assert_eq!(range(0, 1 << 40).resolve(min).unwrap(), DEFAULT_VOLUME_SIZE);
    }

    #[test]
    fn impossible_ranges_are_out_of_range_and_negatives_invalid() {
        let min = FsType::Ext4.minimum_size();
        assert!(matches!(
            range(MIB + 1, MIB + 2).resolve(min),
            Err(Error::NoSizeFits { .. })
        ));
        assert!(matches!(
            range(0, MIB).resolve(min),
            Err(Error::NoSizeFits { .. })
        ));
        assert!(matches!(
            range(2 * MIB, MIB).resolve(min),
            Err(Error::LimitBelowRequired { .. })
        ));
        assert!(matches!(
            range(i64::MAX, 0).resolve(min),
            Err(Error::RequiredTooLarge { .. })
        ));
        assert!(matches!(
            range(-1, 0).resolve(min),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            range(0, -1).resolve(min),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            range(0, 299 * MIB).resolve(FsType::Xfs.minimum_size()),
            Err(Error::NoSizeFits { .. })
        ));
    }

    #[test]
    fn storage_class_parameters() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let p = StorageClassParams::try_from(&map(&[
            ("provisioning", "thick"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/fstype", "xfs"),
        ]))
        .unwrap();
        assert_eq!(p.provisioning, Provisioning::Thick);
        assert_eq!(p.claim.name.as_deref(), Some("data"));
        assert_eq!(p.fs, Some(FsType::Xfs));
        let p = StorageClassParams::try_from(&map(&[(FSTYPE_KEY, "")])).unwrap();
        assert_eq!(p.fs, None);
        let err = StorageClassParams::try_from(&map(&[(FSTYPE_KEY, "btrfs")])).unwrap_err();
        assert!(err.to_string().contains(FSTYPE_KEY) && err.to_string().contains("btrfs"));
        let err = StorageClassParams::try_from(&map(&[("provisioning", "fat")])).unwrap_err();
        assert!(
            err.to_string().contains("parameters.provisioning") && err.to_string().contains("fat")
        );
        let err = StorageClassParams::try_from(&map(&[("bogus", "1")])).unwrap_err();
        assert!(err.to_string().contains("bogus"));
    }

    #[test]
    fn kept_parameters_conflict_on_every_compared_field() {
        let thin = VolumeParams::default();
        let thick = VolumeParams {
            provisioning: Provisioning::Thick,
            ..VolumeParams::default()
        };
        assert!(thin.conflict(&thin).is_none());
        assert_eq!(
            thick.conflict(&thin).map(|m| m.to_string()).as_deref(),
            Some("was made with provisioning Thick, but provisioning Thin was requested")
        );
        let other_claim = VolumeParams {
            claim: ClaimRef {
                name: Some("other".into()),
                ..ClaimRef::default()
            },
            ..VolumeParams::default()
        };
        assert!(thin.conflict(&other_claim).is_none());
    }

    /// Volume metadata as the driver wrote it before the kept parameters became one struct:
    /// it loads, and is written back with the same keys and values.
    #[test]
    fn metadata_written_before_volume_params_still_loads() {
        use crate::volume::pool::VolumeMeta;
        let written = r#"{
  "version": 1,
  "id": "fc64749b-889e-46e8-aa8b-5a9c943168c6",
  "name": "pvc-1",
  "capacity_bytes": 1073741824,
  "kind": {
    "filesystem": "ext4"
  },
  "provisioning": "thick",
  "access_modes": [
    "single_node_writer"
  ],
  "created_unix": 5,
  "formatted": true,
  "claim": {
    "namespace": "ns",
    "name": "data",
    "pv_name": "pv-1"
  },
  "pending_fs_grow": false
}"#;
        let meta: VolumeMeta = serde_json::from_str(written).unwrap();
        assert_eq!(meta.params.provisioning, Provisioning::Thick);
        assert_eq!(meta.params.claim.pv_name.as_deref(), Some("pv-1"));
        assert_eq!(meta.kind, VolumeKind::Filesystem(FsType::Ext4));
        let again: serde_json::Value = serde_json::to_value(&meta).unwrap();
        let before: serde_json::Value = serde_json::from_str(written).unwrap();
        assert_eq!(again, before);
        // Older still: no claim at all.
        let no_claim = written.replace(
            r#""claim": {
    "namespace": "ns",
    "name": "data",
    "pv_name": "pv-1"
  },"#,
            "",
        );
        let meta: VolumeMeta = serde_json::from_str(&no_claim).unwrap();
        assert_eq!(meta.params.claim, ClaimRef::default());
    }
}
