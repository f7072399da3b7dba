//! `stacked-loop`: a second loop device whose backing file is the lower device's node. A test
//! layer (test builds and the `fault-injection` feature only): it transforms nothing, and
//! exists to prove on the real kernel that a file system can sit on a layer of the volume's
//! stack and that stage, expand, restart and unstage find, grow and close it.
//!
//! Found by identity: LOOP_GET_STATUS64's `lo_rdevice` is the device numbers of a backing file
//! that is a block device, so the layer over `lower` is the attached loop device whose backing
//! device has `lower`'s numbers — whatever path any mount namespace shows for its backing file.

use crate::error::Result;
use crate::host::layers::{BlockDev, Layer};
use crate::host::loopdev::{self, AttachOptions, LoopDevice};
use crate::host::loopscan;

pub(super) struct StackedLoop;

/// The loop device a `BlockDev` of this layer is (its numbers, not its path).
fn loop_of(dev: &BlockDev) -> Option<LoopDevice> {
    LoopDevice::from_dev_numbers(dev.numbers.0, dev.numbers.1)
}

fn block_dev(dev: LoopDevice) -> Result<BlockDev> {
    Ok(BlockDev {
        path: dev.path(),
        numbers: dev.dev_numbers()?,
    })
}

impl Layer for StackedLoop {
    fn name(&self) -> &'static str {
        "stacked-loop"
    }

    fn open(&self, lower: &BlockDev, read_only: bool) -> Result<BlockDev> {
        // Buffered: the lower loop device already chose how to reach the pool.
        let options = AttachOptions {
            direct_io: false,
            read_only,
        };
        let dev = loopdev::attach(&lower.path, options)?;
        block_dev(dev).inspect_err(|_| {
            let _ = dev.detach();
        })
    }

    fn above(&self, lower: &BlockDev) -> Result<Option<BlockDev>> {
        for attached in loopscan::attached_devices()? {
            // A device that cannot be asked is unknown, and so never taken for this layer.
            if attached.device.backing_device().ok().flatten() == Some(lower.numbers) {
                return block_dev(attached.device).map(Some);
            }
        }
        Ok(None)
    }

    fn grow(&self, upper: &BlockDev) -> Result<()> {
        match loop_of(upper) {
            Some(dev) => dev.refresh_capacity(),
            None => Err(not_a_loop(upper)),
        }
    }

    fn close(&self, upper: &BlockDev) -> Result<()> {
        match loop_of(upper) {
            Some(dev) => dev.detach(),
            // Gone (no such device any more): closed.
            None => Ok(()),
        }
    }
}

fn not_a_loop(dev: &BlockDev) -> crate::error::Error {
    crate::error::Error::Internal(format!(
        "{} ({}:{}) is not a loop device",
        dev.path.display(),
        dev.numbers.0,
        dev.numbers.1
    ))
}
