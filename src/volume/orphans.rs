//! Orphan stacks. An orphan loop device (see `reconcile.rs`: its backing file is this driver's
//! pool image, provably no committed volume's, and no node record names it) may carry device
//! layers that a stage opened before the volume's records and metadata went away behind the
//! driver, or before a crash. The collector closes them top-down and then detaches the loop
//! device, but only once every device of the stack is proved dead:
//!
//! - The layers are found from the kernel's view over the loop device, by device numbers
//!   (`Stack::find` without metadata: every layer this build has is looked for). Only a layer
//!   found over our loop device (or over such a layer) is ours; a device someone else built on
//!   it is not part of the stack, and is never touched.
//! - No device of the stack is mounted, and none has its node bound
//!   (`KernelView::direct_uses`, by numbers and `st_rdev`, never by a path string).
//! - Every holder of a device of the stack (`Host::holders`: device-mapper and md holders,
//!   partitions, loop devices backed by its node) is the next layer of the stack. Anything else
//!   built on it keeps the whole stack.
//! - The top is not held open exclusively (a tool a killed driver started, a frozen superblock).
//!   A layer may claim the devices below it (device-mapper does), so a lower device's
//!   exclusivity can only be judged once the layers over it are closed: it is asked again just
//!   before each close and before the detach, and a device held then stops the collection there
//!   (reported; what was closed above it was provably unused by anyone).
//!
//! What cannot be proved dead stays, and the report line names every use found.

use crate::error::Result;
use crate::host::layers::BlockDev;
use crate::host::loopdev::LoopDevice;
use crate::host::os::Host;
use crate::volume::inuse::KernelView;
use crate::volume::stack::Stack;

/// The stack over the orphan loop device `dev`, as the kernel shows it now.
pub(crate) fn find(host: &dyn Host, dev: LoopDevice) -> Result<Stack> {
    let numbers = host.dev_numbers(dev)?;
    Stack::find(host, dev, numbers, None)
}

/// Why the stack cannot be proved dead; nothing when it can.
pub(crate) fn uses(host: &dyn Host, view: &KernelView<'_>, stack: &Stack) -> Vec<String> {
    let devices: Vec<&BlockDev> = stack.devices().collect();
    let mut uses = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        uses.extend(view.direct_uses(dev));
        let next = devices.get(i + 1).map(|upper| upper.numbers);
        match host.holders(dev) {
            Ok(holders) => {
                uses.extend(holders.iter().filter(|h| Some(h.numbers) != next).map(|h| {
                    format!(
                        "{} is built on {} and is no layer of its stack",
                        shown(h),
                        shown(dev)
                    )
                }))
            }
            // Unknown is never "free".
            Err(err) => uses.push(format!(
                "cannot tell what is built on {}: {err}",
                shown(dev)
            )),
        }
    }
    if uses.is_empty() {
        uses.extend(held(host, stack.highest()));
    }
    uses
}

/// What stops closing or detaching `dev` now that nothing of the stack is over it: held open
/// exclusively, or that cannot be asked.
fn held(host: &dyn Host, dev: &BlockDev) -> Option<String> {
    match host.held_exclusively(&dev.path) {
        Ok(false) => None,
        Ok(true) => Some(format!("{} is held open exclusively", shown(dev))),
        Err(err) => Some(format!(
            "cannot tell whether {} is held open: {err}",
            shown(dev)
        )),
    }
}

/// How a collection of a stack proved dead ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Collected {
    /// Every layer closed and the loop device detached.
    All,
    /// Stopped before closing or detaching a device that turned out held; the layers above it
    /// were closed.
    Stopped(String),
}

/// Closes the layers of `stack` top-down, then detaches its loop device (see the module doc).
pub(crate) fn collect(host: &dyn Host, stack: &mut Stack) -> Result<Collected> {
    while let Some((kind, upper)) = stack.open.last() {
        if let Some(why) = held(host, upper) {
            return Ok(Collected::Stopped(why));
        }
        host.close_layer(*kind, upper)?;
        tracing::info!(layer = %kind, device = %upper.path.display(), "closed a layer of an orphan stack");
        stack.open.pop();
    }
    // The top was asked already by `uses`; a lower device has nothing over it only now.
    if !stack.wanted.is_empty() {
        if let Some(why) = held(host, &stack.bottom) {
            return Ok(Collected::Stopped(why));
        }
    }
    host.detach(stack.device)?;
    Ok(Collected::All)
}

/// The layers of `stack` still open, top first, for a report line (`None` when none is).
pub(crate) fn layers_open(stack: &Stack) -> Option<String> {
    let layers: Vec<String> = stack
        .open
        .iter()
        .rev()
        .map(|(kind, dev)| format!("{} ({kind})", shown(dev)))
        .collect();
    (!layers.is_empty()).then(|| layers.join(", "))
}

/// A device as the report names it: its node and its numbers.
fn shown(dev: &BlockDev) -> String {
    format!(
        "{} ({}:{})",
        dev.path.display(),
        dev.numbers.0,
        dev.numbers.1
    )
}
