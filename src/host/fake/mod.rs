//! `FakeHost`: a recording [`Host`] for unit tests of the domain without root, and for the
//! failures the kernel will not give on demand (DESIGN.md, example 11; youki's `Syscall` fake).
//!
//! - Files are real, under a directory the test owns (`root`): records, metadata and images
//!   are real files written by the same code as on a node, and any path outside `root` is
//!   refused, so a unit test can never touch the machine's state.
//! - The kernel is simulated ([`kernel`]): loop devices (`/dev/loopN`, major 7 minor N) over
//!   the real backing files, a mount table of `MountEntry`s, frozen superblocks, exclusive
//!   holders. File-system *contents* are not simulated: a mount point is the real directory.
//! - Every call is recorded ([`FakeHost::calls`]) so tests can assert order ("detach never runs
//!   before unmount") and absence ("nothing was formatted").
//! - Failures are injected per operation ([`FakeHost::fail`], [`FakeHost::fail_nth`]), with the
//!   error shape the real function gives for that errno (`Sys` for a syscall, `Tool` for a tool,
//!   `Io` for a file), plus the ones no errno describes: [`FakeHost::mkfs_fails_halfway`],
//!   [`FakeHost::vanish`], [`FakeHost::hold`]. [`FakeHost::hold_next`] holds one call until
//!   the test lets it go, to overlap two operations without sleeps. Methods that cannot fail (`direct_io`,
//!   `supports`, ...) are recorded and never fail.
//! - Device layers (`host::layers`) are modelled as transparent devices of their own major
//!   (`/dev/layerN`) over a loop device or another layer, whatever their kind.

mod calls;
mod gate;
mod host_impl;
pub mod kernel;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;

pub use calls::{Call, Op};
pub use gate::Held;
use kernel::Kernel;

use crate::error::{Error, Result};
use crate::host::loopdev::{Attached, LoopDevice};
use crate::host::mount::MountEntry;
use crate::host::tools::FsType;

/// An open layer as [`FakeHost::layers`] lists it: its kind, its device numbers and its lower
/// device's numbers.
pub type OpenLayer = (crate::host::layers::LayerKind, (u32, u32), (u32, u32));

/// One injected failure: `skip` further calls of `op` pass first; `once` removes it after it
/// fires.
#[derive(Debug)]
struct Rule {
    op: Op,
    errno: Errno,
    skip: u32,
    once: bool,
}

#[derive(Debug)]
struct State {
    kernel: Kernel,
    calls: Vec<Call>,
    rules: Vec<Rule>,
    mkfs_halfway: bool,
    slow_patch: bool,
    no_reflink: bool,
    missing_tools: Vec<FsType>,
    /// Calls to hold until the test lets them go (`hold_next`), at most one each.
    gates: Vec<(Op, Arc<gate::Gate>)>,
}

/// The recording fake of the host. See the module doc.
#[derive(Debug)]
pub struct FakeHost {
    root: PathBuf,
    state: Mutex<State>,
}

impl FakeHost {
    /// A fake whose files live under `root` (a temp dir the test owns and removes).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FakeHost {
            root: root.into(),
            state: Mutex::new(State {
                kernel: Kernel::new(),
                calls: Vec::new(),
                rules: Vec::new(),
                mkfs_halfway: false,
                slow_patch: false,
                no_reflink: false,
                missing_tools: Vec::new(),
                gates: Vec::new(),
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ---- What happened ---------------------------------------------------------------------

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The operations called so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.state().calls.iter().map(|c| c.op).collect()
    }

    /// The calls of `op` so far, in order.
    pub fn calls_of(&self, op: Op) -> Vec<Call> {
        self.state()
            .calls
            .iter()
            .filter(|c| c.op == op)
            .cloned()
            .collect()
    }

    /// Forgets the calls recorded so far (e.g. after a test's setup).
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// The simulated mount table (not recorded as a call).
    pub fn mount_table(&self) -> Vec<MountEntry> {
        self.state().kernel.table.clone()
    }

    /// The simulated attached loop devices (not recorded as a call).
    pub fn loop_devices(&self) -> Vec<Attached> {
        self.state().kernel.attached()
    }

    /// Whether the file system with device numbers `numbers` is frozen.
    pub fn is_frozen(&self, numbers: (u32, u32)) -> bool {
        self.state().kernel.frozen.contains(&numbers)
    }

    // ---- Failures on demand ----------------------------------------------------------------

    /// Every further call of `op` fails with `errno` (until `clear_failures`).
    pub fn fail(&self, op: Op, errno: Errno) {
        self.state().rules.push(Rule {
            op,
            errno,
            skip: 0,
            once: false,
        });
    }

    /// The `n`th call of `op` from now (1: the next one) fails with `errno`, once.
    pub fn fail_nth(&self, op: Op, n: u32, errno: Errno) {
        self.state().rules.push(Rule {
            op,
            errno,
            skip: n.saturating_sub(1),
            once: true,
        });
    }

    pub fn clear_failures(&self) {
        let mut state = self.state();
        state.rules.clear();
        state.mkfs_halfway = false;
        state.slow_patch = false;
    }

    /// Every patch pass with a deadline runs out of time at its first chunk, as on a pool too
    /// slow to compare a volume's data within the freeze limit.
    pub fn patch_too_slow(&self) {
        self.state().slow_patch = true;
    }

    /// The pool shares no extents, whatever the test's temp dir can do.
    pub fn without_reflink(&self) {
        self.state().no_reflink = true;
    }

    /// The next mkfs dies halfway: it leaves a partial signature (the device then probes as
    /// `Other`) and fails as a tool error.
    pub fn mkfs_fails_halfway(&self) {
        self.state().mkfs_halfway = true;
    }

    /// `dev` disappears, as after an external `losetup -d` (its mounts stay in the table, as
    /// a lazily detached device's would).
    pub fn vanish(&self, dev: LoopDevice) {
        self.state().kernel.loops.remove(&dev.0);
    }

    /// A process (a tool a killed driver started) holds `dev` with O_EXCL until `release`.
    pub fn hold(&self, dev: LoopDevice) {
        self.hold_device((kernel::LOOP_MAJOR, dev.0));
    }

    /// A process holds the device `numbers` (a loop device or a layer) with O_EXCL.
    pub fn hold_device(&self, numbers: (u32, u32)) {
        self.state().kernel.held.insert(numbers);
    }

    pub fn release(&self, dev: LoopDevice) {
        let mut state = self.state();
        state.kernel.held.remove(&(kernel::LOOP_MAJOR, dev.0));
        state.kernel.settle((kernel::LOOP_MAJOR, dev.0));
    }

    /// Someone stacks a device of their own (`/dev/dm-N`) on the device `lower` behind the
    /// driver's back; returns its numbers. It holds `lower` until `unstack_foreign`.
    pub fn stack_foreign(&self, lower: (u32, u32)) -> (u32, u32) {
        let mut state = self.state();
        let foreign = &mut state.kernel.foreign;
        let n = (0..).find(|n| !foreign.contains_key(n)).unwrap_or(0);
        foreign.insert(n, lower);
        (kernel::FOREIGN_MAJOR, n)
    }

    /// The foreign device `numbers` goes away.
    pub fn unstack_foreign(&self, numbers: (u32, u32)) {
        let mut state = self.state();
        if let Some(lower) = state.kernel.foreign.remove(&numbers.1) {
            state.kernel.settle(lower);
        }
    }

    /// The next call of `op` (recorded, its injected failure decided) waits until the returned
    /// [`Held`] is released or dropped: a second operation can run while the first is in the
    /// middle of its work, its guards held.
    pub fn hold_next(&self, op: Op) -> Held {
        let gate = Arc::new(gate::Gate::default());
        self.state().gates.push((op, Arc::clone(&gate)));
        Held { op, gate }
    }

    /// `dev`'s backing file can no longer be identified (its status fails).
    pub fn unidentify(&self, dev: LoopDevice) {
        if let Some(l) = self.state().kernel.loops.get_mut(&dev.0) {
            l.unidentified = true;
        }
    }

    /// ext4 on `dev` has recorded `count` errors.
    pub fn set_fs_errors(&self, dev: LoopDevice, count: u64) {
        let numbers = (kernel::LOOP_MAJOR, dev.0);
        self.state().kernel.fs_errors.insert(numbers, count);
    }

    /// The open layers: each one's kind, device numbers and lower device's numbers (not
    /// recorded as a call).
    pub fn layers(&self) -> Vec<OpenLayer> {
        let state = self.state();
        let layers = state.kernel.layers.iter();
        layers
            .map(|(n, l)| (l.kind, (kernel::LAYER_MAJOR, *n), l.lower))
            .collect()
    }

    /// The layer device `numbers` disappears, as after an external `dmsetup remove --force`
    /// (its mounts stay in the table).
    pub fn vanish_layer(&self, numbers: (u32, u32)) {
        self.state().kernel.layers.remove(&numbers.1);
    }

    /// The node has no mkfs for `fs`.
    pub fn without_tool(&self, fs: FsType) {
        self.state().missing_tools.push(fs);
    }

    /// The pool's file system refuses direct I/O: devices attach buffered.
    pub fn without_direct_io(&self) {
        self.state().kernel.direct_io_supported = false;
    }

    // ---- Plumbing for the `Host` implementation --------------------------------------------

    /// Records a call of `op` and returns the errno injected for it, if any.
    fn enter(&self, op: Op, arg: String) -> Option<Errno> {
        let mut state = self.state();
        state.calls.push(Call { op, arg });
        let mut fired = None;
        // Every rule of `op` counts this call; the first one due fires (a second one due
        // fires at the next call).
        state.rules.retain_mut(|rule| {
            if rule.op != op {
                return true;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                return true;
            }
            if fired.is_some() {
                return true;
            }
            fired = Some(rule.errno);
            !rule.once
        });
        fired
    }

    /// `enter`, with the injected errno as the error the real function would return.
    fn check(&self, op: Op, arg: String) -> Result<()> {
        let fired = self.enter(op, arg.clone());
        let gate = {
            let mut state = self.state();
            let at = state.gates.iter().position(|(o, _)| *o == op);
            at.map(|i| state.gates.remove(i).1)
        };
        if let Some(gate) = gate {
            gate.pass();
        }
        match fired {
            Some(errno) => Err(op.error(errno, &arg)),
            None => Ok(()),
        }
    }

    /// Refuses a path outside the fake's root: a unit test never touches the machine.
    fn inside(&self, path: &Path) -> Result<()> {
        if path.is_absolute() && path.starts_with(&self.root) {
            return Ok(());
        }
        Err(Error::Internal(format!(
            "fake host: {} is outside its root {}",
            path.display(),
            self.root.display()
        )))
    }
}
