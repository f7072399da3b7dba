//! The device seam on the fake host: volumes whose file system (or raw block device) sits on
//! device layers over the loop device (`volume::stack`), and the failures of those layers.
//! Each test is named for what it proves or injects.

use std::path::Path;

use nix::errno::Errno;

use super::{bed, block_cap, fs_cap, new_volume, Bed};
use crate::host::fake::Op;
use crate::host::layers::LayerKind;
use crate::host::os::Host;
use crate::volume::id::VolumeId;
use crate::volume::params::{CapacityRange, FsType, VolumeKind};
use crate::volume::volumes::Publish;

/// The fake's layer major (`host::fake::kernel::LAYER_MAJOR`).
const LAYER: u32 = 252;

impl Bed {
    /// A volume with `layers` over its loop device.
    fn create_layered(&self, name: &str, kind: VolumeKind, layers: &[LayerKind]) -> VolumeId {
        let mut new = new_volume(name, kind);
        new.params.layers = layers.to_vec();
        self.volumes
            .create(new, |e| e)
            .map(|(meta, _)| meta.id)
            .unwrap()
    }

    /// A file-system volume with two stacked layers, staged.
    fn staged_layered(&self, name: &str) -> VolumeId {
        let two = [LayerKind::StackedLoop, LayerKind::StackedLoop];
        let id = self.create_layered(name, VolumeKind::Filesystem(FsType::Ext4), &two);
        self.volumes
            .stage(&id, &self.staging(&id), &fs_cap())
            .unwrap();
        id
    }

    /// The device numbers the file system at `path` is mounted from.
    fn mounted_from(&self, path: &Path) -> Option<(u32, u32)> {
        let table = self.host.mount_table();
        let m = crate::host::mount::mounted_at(&table, path)?;
        Some((m.major, m.minor))
    }

    /// The arguments of the calls of `op`, in order.
    fn args_of(&self, op: Op) -> Vec<String> {
        self.host.calls_of(op).into_iter().map(|c| c.arg).collect()
    }
}

#[test]
fn stage_of_a_layered_volume_formats_and_mounts_the_top_device() {
    let b = bed();
    let id = b.staged_layered("v");

    let loop_numbers = b.host.dev_numbers(b.device()).unwrap();
    let layers = b.host.layers();
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert_eq!(
        layers[0].2, loop_numbers,
        "the first layer sits on the loop device"
    );
    assert_eq!(layers[1].2, layers[0].1, "the second on the first");
    let top = layers[1].1;
    assert_eq!(b.mounted_from(&b.staging(&id)), Some(top));
    assert_eq!(
        b.args_of(Op::Mkfs),
        vec![format!("/dev/layer{} ext4", top.1)]
    );

    // Staging again is idempotent: the stack is found, nothing is opened twice.
    b.host.clear_calls();
    b.volumes.stage(&id, &b.staging(&id), &fs_cap()).unwrap();
    assert!(b.args_of(Op::OpenLayer).is_empty());
    assert_eq!(b.host.layers().len(), 2);
    // Publish binds the staged file system; stats and health look at the top device.
    b.publish(&id, "pod").unwrap();
    assert_eq!(b.mounted_from(&b.target(&id, "pod")), Some(top));
    let (_, condition) = b.volumes.stats(&id, &b.target(&id, "pod")).unwrap();
    assert!(!condition.abnormal, "{condition:?}");
}

#[test]
fn a_layer_failing_to_open_detaches_the_loop_device_and_leaves_no_record_change() {
    let b = bed();
    let layers = [LayerKind::StackedLoop, LayerKind::StackedLoop];
    let id = b.create_layered("v", VolumeKind::Filesystem(FsType::Ext4), &layers);
    // The second layer fails: the first, opened by this stage, is closed again.
    b.host.fail_nth(Op::OpenLayer, 2, Errno::EIO);

    let err = b
        .volumes
        .stage(&id, &b.staging(&id), &fs_cap())
        .unwrap_err();
    assert!(err.to_string().contains("open layer"), "{err}");
    assert!(b.host.layers().is_empty(), "the first layer is closed");
    assert!(b.devices().is_empty(), "the loop device is detached");
    assert!(!b.mounted_at(&b.staging(&id)));
    assert!(b.args_of(Op::Mkfs).is_empty(), "nothing formatted");
    assert!(b.record(&id).staged.is_none(), "no stage record is left");

    // The retry stages the whole stack.
    b.volumes.stage(&id, &b.staging(&id), &fs_cap()).unwrap();
    assert_eq!(b.host.layers().len(), 2);
}

#[test]
fn mount_failing_on_the_top_closes_the_layers_and_detaches() {
    let b = bed();
    let id = b.create_layered(
        "v",
        VolumeKind::Filesystem(FsType::Ext4),
        &[LayerKind::StackedLoop],
    );
    b.host.fail_nth(Op::MountDevice, 1, Errno::EIO);

    b.volumes
        .stage(&id, &b.staging(&id), &fs_cap())
        .unwrap_err();
    assert!(b.host.layers().is_empty());
    assert!(b.devices().is_empty());
    let ops = b.host.ops();
    let close = ops.iter().position(|op| *op == Op::CloseLayer).unwrap();
    let detach = ops.iter().position(|op| *op == Op::Detach).unwrap();
    assert!(
        close < detach,
        "the layer closes before the loop device detaches"
    );
}

#[test]
fn unstage_unmounts_then_closes_the_layers_top_down_then_detaches() {
    let b = bed();
    let id = b.staged_layered("v");
    let layers = b.host.layers();
    let (lower, top) = (layers[0].1, layers[1].1);
    b.host.clear_calls();

    b.volumes.unstage(&id, &b.staging(&id)).unwrap();
    let ops: Vec<Op> = b
        .host
        .ops()
        .into_iter()
        .filter(|op| matches!(op, Op::Unmount | Op::CloseLayer | Op::Detach))
        .collect();
    assert_eq!(
        ops,
        vec![Op::Unmount, Op::CloseLayer, Op::CloseLayer, Op::Detach]
    );
    let closed = b.args_of(Op::CloseLayer);
    assert!(
        closed[0].starts_with(&format!("/dev/layer{} ", top.1)),
        "{closed:?}"
    );
    assert!(
        closed[1].starts_with(&format!("/dev/layer{} ", lower.1)),
        "{closed:?}"
    );
    assert!(b.host.layers().is_empty() && b.devices().is_empty());
    assert!(!b.record(&id).exists());
}

#[test]
fn ebusy_closing_a_layer_at_unstage_keeps_the_loop_device_and_the_retry_finishes() {
    let b = bed();
    let id = b.staged_layered("v");
    b.host.fail_nth(Op::CloseLayer, 1, Errno::EBUSY);

    b.volumes.unstage(&id, &b.staging(&id)).unwrap_err();
    assert_eq!(b.devices().len(), 1, "never detached under a layer");
    assert!(b.record(&id).staged.is_some_and(|s| s.unstaging));

    b.volumes.unstage(&id, &b.staging(&id)).unwrap();
    assert!(b.host.layers().is_empty() && b.devices().is_empty());
}

#[test]
fn expand_grows_the_loop_device_then_every_layer_then_the_file_system_on_the_top() {
    let b = bed();
    let id = b.staged_layered("v");
    let top = b.host.layers()[1].1;
    b.host.clear_calls();

    let range = CapacityRange {
        required_bytes: 2 * super::SIZE,
        limit_bytes: 0,
    };
    let size = b.volumes.expand(&id, &b.staging(&id), Some(range)).unwrap();
    assert_eq!(size, 2 * super::SIZE as u64);
    let order: Vec<Op> = b
        .host
        .ops()
        .into_iter()
        .filter(|op| {
            matches!(
                op,
                Op::GrowImage | Op::RefreshCapacity | Op::GrowLayer | Op::GrowExt4Online
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            Op::GrowImage,
            Op::RefreshCapacity,
            Op::RefreshCapacity,
            Op::GrowLayer,
            Op::GrowLayer,
            Op::GrowExt4Online
        ]
    );
    assert_eq!(
        b.args_of(Op::GrowExt4Online),
        vec![format!("/dev/layer{}", top.1)]
    );
}

#[test]
fn a_layer_failing_to_grow_fails_the_expansion_and_the_retry_completes_it() {
    let b = bed();
    let id = b.staged_layered("v");
    b.host.fail_nth(Op::GrowLayer, 2, Errno::EIO);
    let range = CapacityRange {
        required_bytes: 2 * super::SIZE,
        limit_bytes: 0,
    };

    let err = b
        .volumes
        .expand(&id, &b.staging(&id), Some(range))
        .unwrap_err();
    assert!(err.to_string().contains("grow layer"), "{err}");
    assert!(
        b.args_of(Op::GrowExt4Online).is_empty(),
        "the file system waits"
    );

    b.volumes.expand(&id, &b.staging(&id), Some(range)).unwrap();
    assert_eq!(b.args_of(Op::GrowExt4Online).len(), 1);
    assert!(!b.volumes.get(&id).unwrap().pending_fs_grow);
}

#[test]
fn the_reconciler_reopens_a_stack_lost_in_a_reboot() {
    let b = bed();
    let id = b.staged_layered("v");
    b.publish(&id, "pod").unwrap();
    // A reboot: every mount and device is gone; the records stay.
    for m in b.host.mount_table().iter().rev() {
        b.host.unmount(&m.mount_point).unwrap();
    }
    for (_, numbers, _) in b.host.layers().into_iter().rev() {
        b.host.vanish_layer(numbers);
    }
    b.host.vanish(b.device());

    let report = b.volumes.reconcile().unwrap();
    assert!(
        report
            .repaired
            .iter()
            .any(|r| r.contains("re-attached and re-mounted")),
        "{report:?}"
    );
    let layers = b.host.layers();
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert_eq!(b.mounted_from(&b.staging(&id)), Some(layers[1].1));
    assert_eq!(b.mounted_from(&b.target(&id, "pod")), Some(layers[1].1));
    assert!(
        b.args_of(Op::Mkfs).len() == 1,
        "formatted once, at the first stage"
    );
}

#[test]
fn the_reconciler_reopens_a_layer_closed_behind_the_drivers_back() {
    let b = bed();
    let id = b.staged_layered("v");
    let top = b.host.layers()[1].1;
    b.host.unmount(&b.staging(&id)).unwrap();
    b.host.vanish_layer(top);

    let report = b.volumes.reconcile().unwrap();
    assert!(
        report
            .repaired
            .iter()
            .any(|r| r.contains("re-opened the device layers")),
        "{report:?}"
    );
    assert_eq!(b.host.layers().len(), 2);
    assert_eq!(
        b.devices().len(),
        1,
        "the loop device is reused, not attached twice"
    );
    assert!(b.mounted_at(&b.staging(&id)));
}

#[test]
fn a_top_device_vanishing_while_staged_is_reported() {
    let b = bed();
    let id = b.staged_layered("v");
    let top = b.host.layers()[1].1;
    b.host.vanish_layer(top);

    let condition = b.volumes.condition(&id).unwrap();
    assert!(condition.abnormal);
    assert!(
        condition
            .message
            .contains("stacked-loop device layer is gone"),
        "{}",
        condition.message
    );
    // Expansion refuses a volume whose top is gone: nothing to grow the file system on.
    let err = b.volumes.expand(&id, &b.staging(&id), None).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

#[test]
fn a_read_only_block_publish_binds_the_top_of_a_read_only_stack_and_unpublish_closes_it() {
    let b = bed();
    let id = b.create_layered("b", VolumeKind::Block, &[LayerKind::StackedLoop]);
    let staging = b.staging(&id);
    b.volumes.stage(&id, &staging, &block_cap()).unwrap();
    let target = b.target(&id, "pod");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let cap = block_cap();
    let req = Publish {
        staging: &staging,
        target: &target,
        capability: &cap,
        readonly: true,
    };
    b.volumes.publish(&id, req).unwrap();

    let layers = b.host.layers();
    assert_eq!(
        layers.len(),
        2,
        "the writable stack and the read-only one: {layers:?}"
    );
    let opened = b.args_of(Op::OpenLayer);
    assert!(opened[1].ends_with(" ro"), "{opened:?}");
    let bound = b.host.node_followed(&target).unwrap().unwrap();
    let ro_top = layers[1].1;
    assert_eq!(
        bound.rdev,
        nix::sys::stat::makedev(LAYER.into(), ro_top.1.into())
    );

    b.volumes.unpublish(&id, &target).unwrap();
    assert_eq!(b.host.layers().len(), 1, "the read-only stack is closed");
    assert_eq!(b.devices().len(), 1, "and its loop device detached");
    b.volumes.unstage(&id, &staging).unwrap();
    assert!(b.host.layers().is_empty() && b.devices().is_empty());
}

#[test]
fn a_snapshot_freezes_the_file_system_on_the_top_and_a_freeze_left_unmounted_thaws_through_it() {
    let b = bed();
    let id = b.staged_layered("v");
    let top = b.host.layers()[1].1;
    b.host.fail_nth(Op::Thaw, 1, Errno::EIO);

    b.volumes.create_snapshot("snap", &id).unwrap();
    assert!(b.host.is_frozen(top), "the top's file system was frozen");
    // The staging is unmounted behind the driver's back: the frozen superblock keeps the top
    // device held, and only a mount of the top reaches it again.
    b.host.unmount(&b.staging(&id)).unwrap();

    let thawed = b.volumes.thaw_abandoned();
    let through = format!("temporary mount of /dev/layer{}", top.1);
    assert!(
        thawed.thawed.iter().any(|t| t.contains(&through)),
        "{thawed:?}"
    );
    assert!(!b.host.is_frozen(top));
    assert!(b.files_in("frozen").is_empty());
}
