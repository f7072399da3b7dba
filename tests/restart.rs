//! The node plugin restarted the way a DaemonSet restarts it: the driver runs in a mount
//! namespace of its own (a container), where the pool is a bind mount of the host's directory
//! and the kubelet's directory is shared with the host (mount propagation Bidirectional). It
//! attaches and mounts volumes, is SIGKILLed, and its namespace dies with it; the new driver
//! runs in a new namespace with a new bind of the pool. The kernel now renders the backing
//! files of the old devices with a path from a namespace that no longer exists
//! (`/volumes/<id>.img`), so only their identity ties them to the volumes. Every RPC, the
//! reconciler, `status` and `gc` must still know them: nothing attached twice, nothing leaked,
//! nothing deleted while in use, and the data intact.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// `pre_exec` is unsafe: the child enters its own mount namespace between fork and exec.
#![allow(unsafe_code)]

mod common;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::process::ChildDriver;
use common::*;
use loopcsi::csi;
use loopcsi::host::loopdev::{self, FileId};
use loopcsi::host::mount;
use nix::mount::MsFlags;

/// The host side of the emulated node: the pool's real directory, the directory the driver's
/// container sees it at, and the kubelet's directory, shared both ways.
struct Node {
    scratch: Scratch,
    host_state: PathBuf,
    /// Empty on the host; inside each driver's namespace the pool is bound here. Lives under a
    /// private mount, so that bind never propagates to the host.
    container_state: PathBuf,
    kubelet: PathBuf,
    socket: PathBuf,
}

impl Node {
    fn new() -> Self {
        let scratch = Scratch::new();
        let root = scratch.path().to_path_buf();
        let host_state = root.join("host-state");
        let private = root.join("private");
        let container_state = private.join("state");
        let kubelet = root.join("kubelet");
        for dir in [&host_state, &container_state, &kubelet] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let none = None::<&str>;
        // The container's view of the pool is bound under a private mount: invisible outside.
        nix::mount::mount(Some(&private), &private, none, MsFlags::MS_BIND, none).unwrap();
        nix::mount::mount(none, &private, none, MsFlags::MS_PRIVATE, none).unwrap();
        // The kubelet's directory is a shared mount: what the driver mounts there in its
        // namespace appears on the host, as with Bidirectional propagation.
        nix::mount::mount(Some(&kubelet), &kubelet, none, MsFlags::MS_BIND, none).unwrap();
        nix::mount::mount(none, &kubelet, none, MsFlags::MS_SHARED, none).unwrap();
        Node {
            socket: root.join("csi.sock"),
            scratch,
            host_state,
            container_state,
            kubelet,
        }
    }

    /// Starts the driver in a new mount namespace (a new container) with the pool bound at
    /// `container_state`. It is the namespace's only process: killing it ends the namespace.
    async fn start_container(&self, extra: &[&str]) -> ChildDriver {
        let mut command = ChildDriver::command(&self.socket, &self.container_state);
        command.args(extra);
        // The reconciler's rounds are logged at debug level; the test waits for them.
        command.env("RUST_LOG", "info,loopcsi::service=debug");
        let (source, target) = (self.host_state.clone(), self.container_state.clone());
        // SAFETY: between fork and exec the child only makes raw system calls (unshare,
        // mount) on paths prepared before the fork; nothing allocates or takes a lock.
        unsafe {
            command.pre_exec(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                nix::mount::mount(
                    Some(&source),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )?;
                Ok(())
            });
        }
        ChildDriver::spawn_command(command, self.socket.clone()).await
    }

    fn image(&self, id: &str) -> PathBuf {
        self.host_state.join("volumes").join(format!("{id}.img"))
    }

    /// The loop devices holding the image of `id`, by identity.
    fn devices_of(&self, id: &str) -> Vec<loopdev::Attached> {
        let file = FileId::of(&self.image(id)).unwrap();
        loopdev::devices_backed_by(&file).unwrap()
    }

    fn operator(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopcsi"))
            .args(args)
            .arg("--state-dir")
            .arg(&self.host_state)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Node {
    /// Devices of the dead namespaces show paths that are not under the scratch dir, so the
    /// scratch dir's cleanup cannot find them: they are released here by identity first.
    fn drop(&mut self) {
        let files: Vec<FileId> = std::fs::read_dir(self.host_state.join("volumes"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| FileId::of(&e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        release_everything_under(self.scratch.path());
        let attached = loopdev::attached_devices().unwrap_or_default();
        let ours: Vec<_> = attached
            .iter()
            .filter(|a| a.backing.is_some_and(|f| files.contains(&f)))
            .collect();
        // A device layer stacked on one of them (a loop device backed by its node) goes first.
        let numbers: Vec<_> = ours
            .iter()
            .filter_map(|a| a.device.dev_numbers().ok())
            .collect();
        for stacked in &attached {
            if matches!(stacked.device.backing_device(), Ok(Some(lower)) if numbers.contains(&lower))
            {
                let _ = stacked.device.detach();
            }
        }
        for attached in ours {
            let _ = attached.device.detach();
        }
    }
}

/// One volume the test drives through the restart.
struct Vol {
    id: String,
    cap: csi::VolumeCapability,
    staging: PathBuf,
    target: PathBuf,
    block: bool,
}

const DATA: &[u8] = b"written before the plugin restarted";

fn node_req_stats(v: &Vol, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: v.id.clone(),
        volume_path: path.display().to_string(),
        staging_target_path: v.staging.display().to_string(),
    }
}

async fn stage_and_publish(d: &mut ChildDriver, v: &Vol) {
    d.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: v.staging.display().to_string(),
            volume_capability: Some(v.cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    d.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: v.staging.display().to_string(),
            target_path: v.target.display().to_string(),
            volume_capability: Some(v.cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn unpublish_and_unstage(d: &mut ChildDriver, v: &Vol) {
    d.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.id.clone(),
            target_path: v.target.display().to_string(),
        })
        .await
        .unwrap();
    d.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: v.staging.display().to_string(),
        })
        .await
        .unwrap();
}

fn write_data(v: &Vol) {
    use std::io::Write;
    if v.block {
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&v.target)
            .unwrap();
        dev.write_all(DATA).unwrap();
        dev.sync_all().unwrap();
    } else {
        std::fs::write(v.target.join("data"), DATA).unwrap();
        nix::unistd::sync();
    }
}

fn read_data(v: &Vol) -> Vec<u8> {
    use std::io::Read;
    if v.block {
        let mut buf = vec![0; DATA.len()];
        std::fs::File::open(&v.target)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        buf
    } else {
        std::fs::read(v.target.join("data")).unwrap()
    }
}

/// Waits (bounded, no sleeps) until the driver logs `count` completed reconciliation rounds.
fn wait_for_rounds(d: &ChildDriver, count: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rounds = 0;
    while rounds < count {
        let line = d
            .log
            .recv_timeout(Duration::from_secs(60))
            .expect("the driver did not finish a reconciliation round");
        if line.contains("reconciliation round") {
            rounds += 1;
        }
        lines.push(line);
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_plugin_container_still_knows_every_device_it_attached() {
    let node = Node::new();
    let mut first = node.start_container(&[]).await;
    let mut vols = Vec::new();
    for (name, cap, block) in [
        ("ext4", mount_cap("ext4", snw()), false),
        ("xfs", mount_cap("xfs", snw()), false),
        ("block", block_cap(snw()), true),
    ] {
        let id = first
            .controller
            .create_volume(create_req(&format!("pvc-{name}"), 300 * MIB, cap.clone()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let v = Vol {
            id,
            cap,
            staging: node.kubelet.join(format!("staging-{name}")),
            target: node.kubelet.join(format!("pods/{name}/target")),
            block,
        };
        std::fs::create_dir_all(v.target.parent().unwrap()).unwrap();
        stage_and_publish(&mut first, &v).await;
        write_data(&v);
        vols.push(v);
    }
    let before: HashMap<String, u32> = vols
        .iter()
        .map(|v| {
            let devices = node.devices_of(&v.id);
            assert_eq!(devices.len(), 1, "{}: {devices:?}", v.id);
            (v.id.clone(), devices[0].device.0)
        })
        .collect();

    // The plugin pod is deleted: SIGKILL, and its mount namespace is gone with it.
    drop(first);
    for v in &vols {
        let shown = node.devices_of(&v.id)[0].shown.clone();
        assert!(
            !shown.starts_with(&node.host_state) && !shown.starts_with(&node.container_state),
            "the kernel now renders {} from a dead namespace, not as {}",
            shown.display(),
            node.image(&v.id).display()
        );
    }

    // The new pod: a new namespace, a new bind of the pool, reconciling every second.
    let mut second = node.start_container(&["--reconcile-interval", "1"]).await;
    let log = wait_for_rounds(&second, 2);
    assert!(
        !log.iter()
            .any(|l| l.contains("action=\"repair\"") || l.contains("detached orphan")),
        "the reconciler must find nothing to repair or collect: {log:#?}"
    );
    for v in &vols {
        let devices = node.devices_of(&v.id);
        assert_eq!(
            devices.iter().map(|a| a.device.0).collect::<Vec<_>>(),
            vec![before[&v.id]],
            "{}: still exactly the device attached before the restart",
            v.id
        );
        assert_eq!(read_data(v), DATA, "{}: data intact", v.id);
        // Stats see the published volume.
        let stats = second
            .node
            .node_get_volume_stats(node_req_stats(v, &v.target))
            .await
            .unwrap()
            .into_inner();
        let condition = stats.volume_condition.unwrap();
        assert!(!condition.abnormal, "{}: {}", v.id, condition.message);
        // Still in use: DeleteVolume refuses and keeps the image.
        let err = second
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(node.image(&v.id).exists());
    }
    // Expansion of the published volumes works across the restart (xfs and block online).
    for v in vols.iter().filter(|v| v.block || v.id == vols[1].id) {
        let grown = second
            .node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: v.id.clone(),
                volume_path: v.target.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 400 * MIB,
                    limit_bytes: 0,
                }),
                staging_target_path: v.staging.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grown.capacity_bytes, 400 * MIB, "{}", v.id);
    }
    // The operator commands, from the host's namespace (a third view of the same files).
    let (ok, status) = node.operator(&["status"]);
    assert!(ok, "{status}");
    for v in &vols {
        let line = status
            .lines()
            .find(|l| l.contains(&v.id))
            .unwrap_or_else(|| panic!("{status}"));
        assert!(
            line.contains(&format!("/dev/loop{}", before[&v.id])),
            "{line}"
        );
    }
    let (ok, gc) = node.operator(&["gc", "--dry-run"]);
    assert!(ok, "{gc}");
    assert!(
        !gc.contains("would detach") && !gc.contains("would remove"),
        "{gc}"
    );

    // Teardown through the new driver: every mount and device goes, once.
    for v in &vols {
        unpublish_and_unstage(&mut second, v).await;
        assert!(node.devices_of(&v.id).is_empty(), "{}: detached", v.id);
        second
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!node.image(&v.id).exists());
    }
    let left: Vec<_> = mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&node.kubelet) && m.mount_point != node.kubelet)
        .map(|m| m.mount_point)
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
}

/// The numbers of the device a file system is mounted from at `path` (the host's mountinfo:
/// the kubelet's directory is shared with the driver's namespace).
fn mounted_from(path: &Path) -> (u32, u32) {
    let table = mount::mounts().unwrap();
    let m = mount::mounted_at(&table, path).unwrap_or_else(|| panic!("{path:?} is mounted"));
    (m.major, m.minor)
}

/// A volume on a device layer (the stacked-loop test layer) across a restart of the plugin's
/// container: the new driver, in a new namespace, finds the layer by the numbers of the device
/// under it (never by the path its backing file shows), repairs nothing, and tears it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_plugin_container_still_finds_a_volumes_device_layer() {
    let node = Node::new();
    let mut first = node.start_container(&[]).await;
    let cap = mount_cap("ext4", snw());
    let layers = (loopcsi::volume::stack::LAYERS_KEY, "stacked-loop");
    let req = with_params(create_req("pvc-layered", 64 * MIB, cap.clone()), &[layers]);
    let created = first.controller.create_volume(req).await.unwrap();
    let v = Vol {
        id: created.into_inner().volume.unwrap().volume_id,
        cap,
        staging: node.kubelet.join("staging-layered"),
        target: node.kubelet.join("pods/layered/target"),
        block: false,
    };
    std::fs::create_dir_all(v.target.parent().unwrap()).unwrap();
    stage_and_publish(&mut first, &v).await;
    write_data(&v);
    let volume_loop = node.devices_of(&v.id)[0].device;
    let top = mounted_from(&v.staging);
    let top_loop = loopdev::LoopDevice::from_dev_numbers(top.0, top.1).expect("a loop device");
    assert_eq!(
        top_loop.backing_device().unwrap(),
        Some(volume_loop.dev_numbers().unwrap()),
        "the file system is on the layer over the volume's loop device"
    );

    drop(first);
    let mut second = node.start_container(&["--reconcile-interval", "1"]).await;
    let log = wait_for_rounds(&second, 2);
    assert!(
        !log.iter().any(|l| l.contains("action=\"repair\"")),
        "the layer is found, not re-opened: {log:#?}"
    );
    assert_eq!(mounted_from(&v.staging), top, "still on the same layer");
    assert_eq!(mounted_from(&v.target), top);
    assert_eq!(node.devices_of(&v.id).len(), 1, "nothing attached twice");
    assert_eq!(read_data(&v), DATA);
    let stats = second
        .node
        .node_get_volume_stats(node_req_stats(&v, &v.target))
        .await
        .unwrap()
        .into_inner();
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);

    unpublish_and_unstage(&mut second, &v).await;
    assert_eq!(
        top_loop.backing_device().unwrap(),
        None,
        "the layer is closed"
    );
    assert!(
        node.devices_of(&v.id).is_empty(),
        "and the loop device detached"
    );
}
