//! The device layers a volume's stack may hold between its loop device and its file system (or
//! the raw block device handed to a pod): encryption, throttling, ... behind one seam, as the
//! file systems are behind `host::fs`. Everything that differs between layers (how to open one
//! over a lower device, how to find it again in what the kernel shows, how it grows, how it
//! closes) lives in one implementation of [`Layer`] per layer, in a file of its own; the rest of
//! the driver never matches on [`LayerKind`] (the one match is [`LayerKind::get`]).
//!
//! **Devices are known by what they are, never by a path.** A layer finds itself over a lower
//! device by device numbers (the kernel's `dev_t`), because every path the kernel renders
//! (backing files, mountinfo sources) depends on the reader's mount namespace, which changes
//! when the plugin's container restarts. [`BlockDev::path`] is only how this process opens the
//! device node; [`BlockDev::numbers`] is its identity.
//!
//! The domain reaches a layer through the `Host` trait (`open_layer`, `layer_above`,
//! `grow_layer`, `close_layer`), so the fake host can model layers and inject their failures.

#[cfg(any(test, feature = "fault-injection"))]
mod stacked_loop;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A block device of a volume's stack: the node this process opens, and the device numbers that
/// identify it (as mountinfo and `st_rdev` show them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDev {
    pub path: PathBuf,
    pub numbers: (u32, u32),
}

impl BlockDev {
    /// `numbers` as a `dev_t`, for comparing with a node's `st_rdev`.
    pub fn rdev(&self) -> u64 {
        nix::sys::stat::makedev(self.numbers.0.into(), self.numbers.1.into())
    }
}

/// The device layers a volume may have over its loop device, persisted in its metadata (by
/// these names) in the order they stack, lowest first.
///
/// `StackedLoop` is a test layer (a second loop device over the first) that proves the seam on
/// the real kernel; it exists only in test builds and with the `fault-injection` feature, so a
/// release build cannot be asked for it (its name does not parse there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerKind {
    #[cfg(any(test, feature = "fault-injection"))]
    StackedLoop,
}

impl LayerKind {
    /// Every layer this build has, for lookups by name and for "what is stacked on this device".
    pub const ALL: &'static [LayerKind] = &[
        #[cfg(any(test, feature = "fault-injection"))]
        LayerKind::StackedLoop,
    ];

    /// The implementation of this layer: the one place a `LayerKind` is matched.
    pub fn get(self) -> &'static dyn Layer {
        match self {
            #[cfg(any(test, feature = "fault-injection"))]
            LayerKind::StackedLoop => &stacked_loop::StackedLoop,
        }
    }

    pub fn name(self) -> &'static str {
        self.get().name()
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|l| l.name() == name)
    }
}

impl std::fmt::Display for LayerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One device layer: how to open, find, grow and close it over a lower block device.
pub trait Layer: Sync {
    /// The layer's name (persisted in metadata, used in parameters and messages).
    fn name(&self) -> &'static str;

    /// Opens the layer over `lower` (read-only when asked) and returns the device it makes.
    /// Nothing is left open when this fails.
    fn open(&self, lower: &BlockDev, read_only: bool) -> Result<BlockDev>;

    /// This layer's device over `lower`, as the kernel shows it now (matched by `lower`'s device
    /// numbers, never by a path); `None` when it is not open.
    fn above(&self, lower: &BlockDev) -> Result<Option<BlockDev>>;

    /// Makes `upper` take the size of its lower device, after that grew.
    fn grow(&self, upper: &BlockDev) -> Result<()>;

    /// Closes `upper` (already closed is success).
    fn close(&self, upper: &BlockDev) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_persisted_names() {
        for layer in LayerKind::ALL {
            assert_eq!(LayerKind::from_name(layer.name()), Some(*layer));
            let json = serde_json::to_string(layer).unwrap();
            assert_eq!(json, format!("\"{}\"", layer.name()));
        }
        assert_eq!(LayerKind::from_name("crypt"), None);
    }
}
