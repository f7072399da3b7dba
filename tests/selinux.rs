//! The CSIDriver says `seLinuxMount: true`, so on an SELinux node the kubelet passes the pod's
//! label as `context="..."` in the mount flags of NodeStageVolume and NodePublishVolume and
//! expects the volume's file system to be mounted with it (KEP-1710), instead of relabelling
//! every file. These tests prove the option reaches mount(2) of the volume's own file system:
//! on a kernel with SELinux the staged superblock carries the context; on a kernel without it
//! (like the CI machine) the file system refuses the option with EINVAL and logs
//! "Unknown parameter 'context'", which it could not do had the driver dropped it. (The kubelet
//! only sends the option on nodes where SELinux is enabled.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use common::*;
use loopcsi::host::mount;

/// The kernel's log from now on: records written after this was opened.
struct KernelLog(Option<std::fs::File>);

impl KernelLog {
    fn mark() -> Self {
        // Reading /dev/kmsg needs CAP_SYSLOG; without it the test still checks the errno.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f))
            .map_err(|e| eprintln!("/dev/kmsg not readable ({e}): no kernel log evidence"))
            .ok();
        KernelLog(file)
    }

    /// The messages logged since `mark` (one read returns one record; EAGAIN ends them).
    fn since(&mut self) -> Option<Vec<String>> {
        let file = self.0.as_mut()?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]).to_string();
                    // "prio,seq,usec,flags;message\n"
                    let message = record.split_once(';').map_or(&*record, |(_, m)| m);
                    out.push(message.trim_end().to_string());
                }
                // EPIPE: records were overwritten while we read; the later ones still come.
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        Some(out)
    }
}

fn selinux_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// What the kubelet passes: the pod's label, quoted, with a comma inside the quotes.
const CONTEXT: &str = "context=\"system_u:object_r:container_file_t:s0:c12,c345\"";

async fn context_reaches_the_file_system_mount(fs: &str) {
    let mut d = TestDriver::start().await;
    let plain = mount_cap(fs, snw());
    let labelled = mount_cap_flags(fs, snw(), &[CONTEXT, "noatime"]);
    let id = d
        .create(create_req(
            &format!("pvc-selinux-{fs}"),
            64 * MIB,
            plain.clone(),
        ))
        .await
        .unwrap()
        .volume_id;
    let staging = d.staging("s1");
    let target = d.target("pod-a");

    let mut log = KernelLog::mark();
    let staged = d.stage(&id, &staging, labelled.clone()).await;
    if selinux_enabled() {
        staged.unwrap();
        let entry = mount::mounts()
            .unwrap()
            .into_iter()
            .find(|m| m.mount_point == staging)
            .expect("staging is mounted");
        assert!(
            entry.super_options.contains("context="),
            "the staged {fs} superblock has no context: {}",
            entry.super_options
        );
        eprintln!("SELinux node: {fs} staged with {}", entry.super_options);
        d.unstage(&id, &staging).await.unwrap();
    } else {
        // The option went into the mount's data string: the file system, not the driver,
        // refused it.
        let status = staged.expect_err("a context= option was dropped before mount(2)");
        assert_eq!(status.code(), tonic::Code::Internal, "{}", status.message());
        assert!(
            status.message().contains("mount") && status.message().contains("EINVAL"),
            "not the kernel's refusal of the mount: {}",
            status.message()
        );
        if let Some(messages) = log.since() {
            let needle = format!("{fs}: Unknown parameter 'context'");
            assert!(
                messages.iter().any(|m| m.contains(&needle)),
                "the kernel did not log {needle:?} for the stage; it logged {messages:?}"
            );
            eprintln!("no SELinux: {fs} refused the option, the kernel logged {needle:?}");
        }
        // A failed stage leaves nothing: no mount, no loop device.
        assert!(d.loop_device_of(&id).is_none(), "loop device left attached");
        assert!(
            !mount::mounts()
                .unwrap()
                .iter()
                .any(|m| m.mount_point == staging),
            "staging left mounted"
        );
    }

    // The same volume without the option stages: the option alone made the difference. A
    // publish with the option is a bind of the staged file system, which shares its superblock
    // (and so its context): the bind takes no file-system options, and succeeds.
    d.stage(&id, &staging, plain.clone()).await.unwrap();
    d.publish(&id, &staging, &target, labelled, false)
        .await
        .unwrap();
    assert!(mount::mounts()
        .unwrap()
        .iter()
        .any(|m| m.mount_point == target));
    d.unpublish(&id, &target).await.unwrap();
    d.unstage(&id, &staging).await.unwrap();
    d.delete(&id).await.unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_stage_passes_the_selinux_context_to_mount() {
    context_reaches_the_file_system_mount("ext4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_stage_passes_the_selinux_context_to_mount() {
    context_reaches_the_file_system_mount("xfs").await;
}
