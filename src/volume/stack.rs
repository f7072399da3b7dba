//! A volume's device stack: its loop device at the bottom, then the device layers its metadata
//! names (`VolumeParams::layers`, lowest first), then the file system or the raw block device
//! handed to pods, which sit on the top. This module opens the missing layers, finds the stack
//! from the kernel's view, grows it and closes it; each layer's own work is behind
//! `Host::{open_layer, layer_above, grow_layer, close_layer}` (`host::layers`).
//!
//! - **Found, not recorded.** Which device is stacked over which is read from the kernel, by
//!   device numbers (see `host::layers`), every time; nothing of it is persisted but the list of
//!   layers the volume should have.
//! - **Undo on failure.** `open_missing` closes again what it opened when a layer fails, and
//!   its caller closes what it opened when a later step (mkfs, mount, bind) fails.
//! - **Only what is provably the volume's is closed**: a layer found over the volume's own loop
//!   device (by its numbers), or over such a layer. With no layers, a stack is its loop device
//!   and nothing here calls the host.

use crate::error::{Error, Result};
use crate::host::layers::{BlockDev, LayerKind};
use crate::host::loopdev::LoopDevice;
use crate::host::os::Host;

/// The StorageClass key that gives a volume device layers: a comma-separated list of layer
/// names, lowest first. Only test builds and the `fault-injection` feature have layers (see
/// `LayerKind`), and only they accept the key.
pub const LAYERS_KEY: &str = "test.loopcsi.dev/layers";

/// Parses the value of [`LAYERS_KEY`]: every name must be a layer this build has.
pub fn parse_layers(value: &str) -> Result<Vec<LayerKind>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            LayerKind::from_name(name).ok_or_else(|| {
                let known: Vec<_> = LayerKind::ALL.iter().map(|l| l.name()).collect();
                Error::invalid(
                    "parameters",
                    format!(
                        "\"{LAYERS_KEY}\" names {}, which is not a layer of this build (it has: {})",
                        crate::error::shown(name),
                        known.join(", ")
                    ),
                )
            })
        })
        .collect()
}

/// One stack as the kernel shows it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stack {
    /// The loop device at the bottom, and its numbers.
    pub(crate) device: LoopDevice,
    pub(crate) bottom: BlockDev,
    /// The layers found open, lowest first: a prefix of `wanted`.
    pub(crate) open: Vec<(LayerKind, BlockDev)>,
    /// The layers the volume has (from its metadata).
    pub(crate) wanted: Vec<LayerKind>,
}

impl Stack {
    /// The stack over the loop device `device`, as the kernel shows it. `layers` is what the
    /// metadata says; `None` when it cannot be read (teardown without metadata): then every
    /// layer this build has is looked for, so none is left open over a device being detached.
    pub(crate) fn find(
        host: &dyn Host,
        device: LoopDevice,
        numbers: (u32, u32),
        layers: Option<&[LayerKind]>,
    ) -> Result<Stack> {
        let mut stack = Stack::bare(device, numbers, layers.unwrap_or_default());
        match layers {
            Some(layers) => {
                for kind in layers {
                    let Some(upper) = host.layer_above(*kind, stack.highest())? else {
                        break;
                    };
                    stack.open.push((*kind, upper));
                }
            }
            None => stack.discover(host)?,
        }
        Ok(stack)
    }

    /// The stack of a loop device just attached: nothing is open over it yet.
    pub(crate) fn bare(device: LoopDevice, numbers: (u32, u32), wanted: &[LayerKind]) -> Stack {
        Stack {
            device,
            bottom: BlockDev {
                path: device.path(),
                numbers,
            },
            open: Vec::new(),
            wanted: wanted.to_vec(),
        }
    }

    /// Finds any layers over the bottom (the metadata is unreadable): they become the wanted ones.
    fn discover(&mut self, host: &dyn Host) -> Result<()> {
        'level: loop {
            for kind in LayerKind::ALL {
                if let Some(upper) = host.layer_above(*kind, self.highest())? {
                    self.open.push((*kind, upper));
                    self.wanted.push(*kind);
                    continue 'level;
                }
            }
            return Ok(());
        }
    }

    /// Every layer is open.
    pub(crate) fn complete(&self) -> bool {
        self.open.len() == self.wanted.len()
    }

    /// The device the file system sits on (or that pods get): the top, when every layer is open.
    pub(crate) fn top(&self) -> Option<&BlockDev> {
        self.complete().then(|| self.highest())
    }

    /// The highest device open (the loop device when no layer is).
    pub(crate) fn highest(&self) -> &BlockDev {
        self.open.last().map_or(&self.bottom, |(_, dev)| dev)
    }

    /// Every device of the stack, bottom first.
    pub(crate) fn devices(&self) -> impl Iterator<Item = &BlockDev> {
        std::iter::once(&self.bottom).chain(self.open.iter().map(|(_, dev)| dev))
    }

    /// The first wanted layer that is not open.
    pub(crate) fn missing(&self) -> Option<LayerKind> {
        self.wanted.get(self.open.len()).copied()
    }

    /// Opens the layers that are not open, bottom up, and returns how many were open before
    /// (what `close_above` keeps when the caller undoes this call). When a layer fails to
    /// open, the ones this call opened are closed again.
    pub(crate) fn open_missing(&mut self, host: &dyn Host, read_only: bool) -> Result<usize> {
        let before = self.open.len();
        while let Some(kind) = self.missing() {
            match host.open_layer(kind, self.highest(), read_only) {
                Ok(upper) => {
                    tracing::info!(layer = %kind, device = %upper.path.display(), lower = %self.highest().path.display(), "opened a device layer");
                    self.open.push((kind, upper));
                }
                Err(err) => {
                    self.undo(host, before);
                    return Err(err);
                }
            }
        }
        Ok(before)
    }

    /// Closes the layers above the first `keep`, top-down.
    pub(crate) fn close_above(&mut self, host: &dyn Host, keep: usize) -> Result<()> {
        while self.open.len() > keep {
            let Some((kind, upper)) = self.open.last() else {
                break;
            };
            host.close_layer(*kind, upper)?;
            tracing::info!(layer = %kind, device = %upper.path.display(), "closed a device layer");
            self.open.pop();
        }
        Ok(())
    }

    /// Closes every layer, top-down (the loop device is the caller's to detach).
    pub(crate) fn close(&mut self, host: &dyn Host) -> Result<()> {
        self.close_above(host, 0)
    }

    /// `close_above` on a failure path: what cannot be closed is logged (the caller's error is
    /// what the CO sees) and left to the reconciler and the operator.
    pub(crate) fn undo(&mut self, host: &dyn Host, keep: usize) {
        if let Err(err) = self.close_above(host, keep) {
            tracing::error!(device = %self.highest().path.display(), error = %err, "could not close a device layer after a failure");
        }
    }

    /// Makes every open layer take the new size of the one below, bottom up (after the loop
    /// device re-read its backing file's size).
    pub(crate) fn grow(&self, host: &dyn Host) -> Result<()> {
        for (kind, upper) in &self.open {
            host.grow_layer(*kind, upper)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::pool::VolumeMeta;

    #[test]
    fn the_layers_parameter_names_layers_of_this_build() {
        assert_eq!(
            parse_layers("stacked-loop").unwrap(),
            vec![LayerKind::StackedLoop]
        );
        assert_eq!(parse_layers("").unwrap(), Vec::<LayerKind>::new());
        let err = parse_layers("stacked-loop,crypt").unwrap_err().to_string();
        assert!(err.contains(LAYERS_KEY) && err.contains("crypt"), "{err}");
    }

    /// Metadata written before volumes had layers (no `layers` key) loads with none, and a
    /// volume without layers is written back with the same keys, values and order as before.
    #[test]
    fn metadata_without_layers_loads_and_is_written_as_before() {
        let written = concat!(
            r#"{"version":1,"id":"fc64749b-889e-46e8-aa8b-5a9c943168c6","name":"pvc-1","#,
            r#""capacity_bytes":1073741824,"kind":{"filesystem":"ext4"},"provisioning":"thin","#,
            r#""claim":{},"access_modes":["single_node_writer"],"created_unix":5,"#,
            r#""formatted":true,"pending_fs_grow":false}"#
        );
        let meta: VolumeMeta = serde_json::from_str(written).unwrap();
        assert!(meta.params.layers.is_empty());
        assert_eq!(serde_json::to_string(&meta).unwrap(), written);
        let mut layered = meta.clone();
        layered.params.layers = vec![LayerKind::StackedLoop];
        let json = serde_json::to_string(&layered).unwrap();
        assert!(json.contains(r#""layers":["stacked-loop"]"#), "{json}");
        let back: VolumeMeta = serde_json::from_str(&json).unwrap();
        assert_eq!(back, layered);
    }
}
