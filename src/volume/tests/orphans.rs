//! Orphan stacks on the fake host (`volume::orphans`): the layers a stage opened over a loop
//! device whose volume is gone are closed top-down and the device detached, only when every
//! device of the stack is provably dead; anything else is kept and reported. Each test is
//! named for what it proves.

use std::path::PathBuf;

use super::{bed, fs_cap, new_volume, Bed};
use crate::host::fake::Op;
use crate::host::layers::{BlockDev, LayerKind};
use crate::host::loopdev::AttachOptions;
use crate::host::os::Host;
use crate::volume::id::VolumeId;
use crate::volume::params::{FsType, VolumeKind};
use crate::volume::reconcile::{GcPolicy, ReconcileReport};

/// The fake's layer device with these numbers.
fn layer_dev(numbers: (u32, u32)) -> BlockDev {
    BlockDev {
        path: PathBuf::from(format!("/dev/layer{}", numbers.1)),
        numbers,
    }
}

impl Bed {
    /// A file-system volume with two stacked-loop layers over its loop device, staged.
    fn staged_two_layers(&self, name: &str) -> VolumeId {
        let mut new = new_volume(name, VolumeKind::Filesystem(FsType::Ext4));
        new.params.layers = vec![LayerKind::StackedLoop, LayerKind::StackedLoop];
        let (meta, _) = self.volumes.create(new, |e| e).unwrap();
        self.volumes
            .stage(&meta.id, &self.staging(&meta.id), &fs_cap())
            .unwrap();
        meta.id
    }

    /// The volume's metadata and node records are deleted behind the driver: its loop device
    /// and layers are an orphan stack.
    fn forget(&self, id: &VolumeId) {
        let state = self.state();
        std::fs::remove_file(state.join("volumes").join(format!("{id}.json"))).unwrap();
        std::fs::remove_dir_all(state.join("node").join(id.to_string())).unwrap();
    }

    /// A staged two-layer volume made an orphan stack with nothing mounted on it.
    fn orphan_stack(&self) -> VolumeId {
        let id = self.staged_two_layers("v");
        self.host.unmount(&self.staging(&id)).unwrap();
        self.forget(&id);
        id
    }

    fn gc(&self, dry_run: bool) -> ReconcileReport {
        let policy = GcPolicy {
            dry_run,
            ..GcPolicy::IN_DRIVER
        };
        self.volumes.collect_orphans(policy).unwrap()
    }

    /// The closes and detaches called so far, in order.
    fn teardown_ops(&self) -> Vec<Op> {
        let ops = self.host.ops().into_iter();
        ops.filter(|op| matches!(op, Op::CloseLayer | Op::Detach))
            .collect()
    }
}

#[test]
fn an_orphan_stack_is_closed_top_down_then_detached() {
    let b = bed();
    b.orphan_stack();
    let layers = b.host.layers();
    let (lower, top) = (layers[0].1, layers[1].1);
    b.host.clear_calls();

    let report = b.gc(false);
    assert!(report.unrepairable.is_empty(), "{report:?}");
    assert_eq!(
        b.teardown_ops(),
        vec![Op::CloseLayer, Op::CloseLayer, Op::Detach]
    );
    let closed: Vec<String> = b
        .host
        .calls_of(Op::CloseLayer)
        .into_iter()
        .map(|c| c.arg)
        .collect();
    let top_first = [top, lower].map(|layer| format!("/dev/layer{} stacked-loop", layer.1));
    assert_eq!(closed, top_first, "the top closes first");
    assert!(b.host.layers().is_empty() && b.devices().is_empty());
    let detached = &report.collected[0];
    assert!(
        detached.starts_with("detached orphan loop device")
            && detached.contains("after closing its layers top-down"),
        "{report:?}"
    );
    assert!(
        report
            .collected
            .iter()
            .any(|c| c.contains("image without metadata")),
        "the image goes in the same round: {report:?}"
    );
    assert!(b.files_in("volumes").is_empty());
}

#[test]
fn a_dry_run_lists_an_orphan_stack_and_changes_nothing() {
    let b = bed();
    b.orphan_stack();
    b.host.clear_calls();

    let report = b.gc(true);
    assert!(
        report.collected[0].starts_with("would detach orphan loop device")
            && report.collected[0].contains("(stacked-loop)"),
        "{report:?}"
    );
    assert!(b.teardown_ops().is_empty());
    assert_eq!(b.host.layers().len(), 2);
    assert_eq!(b.devices().len(), 1);
}

#[test]
fn a_mounted_layer_keeps_its_stack_and_is_reported() {
    let b = bed();
    let id = b.staged_two_layers("v");
    b.forget(&id);
    b.host.clear_calls();

    let report = b.gc(false);
    assert!(report.collected.is_empty(), "{report:?}");
    assert!(b.teardown_ops().is_empty(), "nothing closed or detached");
    let line = &report.unrepairable[0];
    let top = b.host.layers()[1].1;
    let staging = b.staging(&id);
    let mounted = format!("/dev/layer{} mounted at {}", top.1, staging.display());
    assert!(
        line.contains("still in use") && line.contains(&mounted),
        "{line}"
    );
    assert_eq!(b.host.layers().len(), 2);
    assert!(b.mounted_at(&staging));
    assert_eq!(b.files_in("volumes").len(), 1, "the image is kept");
}

#[test]
fn a_foreign_device_stacked_on_our_orphan_keeps_it() {
    let b = bed();
    b.orphan_stack();
    let bottom = b.host.dev_numbers(b.device()).unwrap();
    let foreign = b.host.stack_foreign(bottom);
    b.host.clear_calls();

    let report = b.gc(false);
    assert!(report.collected.is_empty(), "{report:?}");
    assert!(b.teardown_ops().is_empty(), "nothing closed or detached");
    assert!(
        report.unrepairable[0].contains(&format!(
            "/dev/dm-{} ({}:{}) is built on /dev/loop",
            foreign.1, foreign.0, foreign.1
        )),
        "{report:?}"
    );
    assert_eq!(b.host.layers().len(), 2);

    // Once the foreign device is gone, the stack is provably dead.
    b.host.unstack_foreign(foreign);
    let report = b.gc(false);
    assert!(report.unrepairable.is_empty(), "{report:?}");
    assert!(b.host.layers().is_empty() && b.devices().is_empty());
}

#[test]
fn a_top_held_open_exclusively_keeps_the_stack() {
    let b = bed();
    b.orphan_stack();
    let top = b.host.layers()[1].1;
    b.host.hold_device(top);
    b.host.clear_calls();

    let report = b.gc(false);
    assert!(report.collected.is_empty(), "{report:?}");
    assert!(
        report.unrepairable[0].contains("is held open exclusively"),
        "{report:?}"
    );
    assert!(b.teardown_ops().is_empty());
}

#[test]
fn a_loop_device_found_held_once_its_layers_are_closed_is_not_detached() {
    let b = bed();
    b.orphan_stack();
    // Held below the layers: only asked once nothing of the stack is over it.
    b.host.hold(b.device());
    b.host.clear_calls();

    let report = b.gc(false);
    assert_eq!(b.teardown_ops(), vec![Op::CloseLayer, Op::CloseLayer]);
    assert!(
        report.unrepairable[0].contains("is kept")
            && report.unrepairable[0].contains("/dev/loop0 (7:0) is held open exclusively"),
        "{report:?}"
    );
    assert_eq!(b.devices().len(), 1, "never detached while held");
}

#[test]
fn a_crash_left_half_open_stack_of_a_staged_volume_is_reused_not_collected() {
    let b = bed();
    let id = b.staged_two_layers("v");
    // What a crash between opening the first layer and mounting leaves: the stage record,
    // the loop device, the first layer open; the second layer and the mount are not there.
    b.host.unmount(&b.staging(&id)).unwrap();
    let top = b.host.layers()[1].1;
    b.host
        .close_layer(LayerKind::StackedLoop, &layer_dev(top))
        .unwrap();
    b.host.clear_calls();

    let report = b.gc(false);
    assert_eq!(
        report,
        ReconcileReport::default(),
        "a staged volume is no orphan"
    );
    assert!(b.teardown_ops().is_empty());

    // The CO's retry of the stage re-finds the loop device and the first layer and opens
    // only what is missing.
    b.volumes.stage(&id, &b.staging(&id), &fs_cap()).unwrap();
    assert!(
        b.host.calls_of(Op::Attach).is_empty(),
        "the loop device is reused"
    );
    assert_eq!(b.host.calls_of(Op::OpenLayer).len(), 1, "one layer opened");
    let layers = b.host.layers();
    assert_eq!(layers.len(), 2, "{layers:?}");
    let table = b.host.mount_table();
    let m = crate::host::mount::mounted_at(&table, &b.staging(&id)).unwrap();
    assert_eq!((m.major, m.minor), layers[1].1, "mounted on the new top");
}

#[test]
fn a_layer_over_a_loop_device_that_is_not_ours_is_never_touched() {
    let b = bed();
    let file = b.root.join("foreign.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let options = AttachOptions {
        direct_io: false,
        read_only: false,
    };
    let dev = b.host.attach(&file, options).unwrap();
    let lower = BlockDev {
        path: dev.path(),
        numbers: b.host.dev_numbers(dev).unwrap(),
    };
    b.host
        .open_layer(LayerKind::StackedLoop, &lower, false)
        .unwrap();
    b.host.clear_calls();

    let report = b.gc(false);
    assert_eq!(report, ReconcileReport::default());
    assert!(b.teardown_ops().is_empty());
    assert_eq!(b.host.layers().len(), 1);
    assert_eq!(b.devices().len(), 1);
}
