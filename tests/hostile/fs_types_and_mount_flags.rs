//! Hostile fs_type values and mount flags are refused.

use super::*;

// ---- fs_type ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fs_types_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let real = new_volume(&mut d, "real", mount_cap("ext4", snw())).await;
    let staging = s(&d.staging("s"));
    let target = s(&d.target("t"));
    let root = s(d.root());

    let fs_types = vec![
        "ext4 -O x".to_string(),
        "ext4 -E root_owner=0:0".into(),
        "../xfs".into(),
        "../../sbin/mkfs.ext4".into(),
        "ext4\0".into(),
        "ext4\0xfs".into(),
        "/bin/sh".into(),
        "/sbin/mkfs.ext4".into(),
        "sh".into(),
        "ext4;id".into(),
        "ext4 && id".into(),
        "$(touch /tmp/pwned)".into(),
        format!("`touch {root}/pwned`"),
        "`id`".into(),
        "-o".into(),
        "--help".into(),
        "EXT4".into(),
        " ext4".into(),
        "ext4 ".into(),
        "ext4\n".into(),
        "xfs,ext4".into(),
        "ext4\u{200b}".into(),
        "\u{202e}4txe".into(),
        "ext3".into(),
        "btrfs".into(),
        "e".repeat(HUNDRED_KB),
    ];
    for (i, fs) in fs_types.iter().enumerate() {
        let cap = mount_cap(fs, snw());
        let what = |rpc: &str| format!("{rpc}(fs_type={})", shown(fs));
        f.refused(
            &what("CreateVolume"),
            d.create(create_req(&format!("fs-{i}"), 16 * MIB, cap.clone()))
                .await,
            &[Code::InvalidArgument],
            &["fs_type"],
        );
        // Validation of a well-formed but unserved capability: OK, not confirmed, saying why.
        if let Some(reply) = f.ok(
            &what("ValidateVolumeCapabilities"),
            d.controller
                .validate_volume_capabilities(validate_req(&real, cap.clone()))
                .await,
        ) {
            {
                let reply = reply.into_inner();
                f.check(reply.confirmed.is_none(), || {
                    format!("{} confirmed it", what("ValidateVolumeCapabilities"))
                });
                f.check(
                    reply.message.contains("fs_type") && reply.message.len() < MAX_MESSAGE,
                    || {
                        format!(
                            "{}: message {} is unbounded or does not name fs_type",
                            what("ValidateVolumeCapabilities"),
                            shown(&reply.message)
                        )
                    },
                );
            }
        }
        if let Some(reply) = f.ok(
            &what("GetCapacity"),
            d.controller.get_capacity(capacity_req(cap.clone())).await,
        ) {
            let reply = reply.into_inner();
            f.check(reply.available_capacity == 0, || {
                format!(
                    "{}: capacity {}",
                    what("GetCapacity"),
                    reply.available_capacity
                )
            });
        }
        f.refused(
            &what("NodeStageVolume"),
            d.node
                .node_stage_volume(stage_req(&real, &staging, cap.clone()))
                .await,
            &[Code::InvalidArgument],
            &["volume_capability", "fs_type"],
        );
        f.refused(
            &what("NodePublishVolume"),
            d.node
                .node_publish_volume(publish_req(&real, &staging, &target, cap.clone()))
                .await,
            &[Code::InvalidArgument],
            &["volume_capability", "fs_type"],
        );
    }

    // Nothing ran: the volume was never attached or formatted, and nothing was mounted.
    let listed = d.list_all().await;
    f.check(listed.len() == 1, || {
        format!("{} volumes after hostile fs types", listed.len())
    });
    f.check(d.loop_device_of(&real).is_none(), || {
        "the volume got attached".into()
    });
    let allocated = loopcsi::host::files::allocated_bytes(&d.image_path(&real)).unwrap();
    f.check(allocated == 0, || {
        format!("the thin image has {allocated} bytes allocated: something wrote to it")
    });
    f.check(mounts_under(d.root()).is_empty(), || {
        format!("mounts appeared: {:?}", mounts_under(d.root()))
    });
    check_state_dir(&d, &mut f);
    no_shell_ran(d.root(), &mut f);

    still_serving(&mut d).await;
    f.assert_none();
    d.delete(&real).await.unwrap();
    d.assert_clean();
}

// ---- mount flags ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_mount_flags_are_refused() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let plain = mount_cap("ext4", snw());
    let real = new_volume(&mut d, "real", plain.clone()).await;
    let unstaged = new_volume(&mut d, "unstaged", plain.clone()).await;
    let staging = d.staging("s");
    d.stage(&real, &staging, plain.clone()).await.unwrap();
    let staging = s(&staging);
    let unstaged_staging = s(&d.staging("u"));
    let root = s(d.root());

    let one = |flag: &str| vec![flag.to_string()];
    let mut cases: Vec<Vec<String>> = [
        "rw,exec",
        "ro,exec",
        "$(touch /tmp/pwned)",
        "`id`",
        "x;y",
        "--help",
        "-o",
        "-oexec",
        "-",
        "bind",
        "rbind",
        "remount",
        "move",
        "shared",
        "loop",
        "loop=/dev/sda",
        "x-mount.mkdir",
        "x-mount.mkdir=/tmp/x",
        "context=\"a\",exec",
        "context=\"a\" exec",
        "context=a,exec",
        "context=system_u:object_r:container_file_t:s0,nouser_xattr",
        "context=",
        "context=\"\"",
        "ro bind",
        "a\0b",
        "noexec\0",
        "a\nb",
        "\tro",
        "|id",
        "&&id",
        "\\",
        "'ro'",
        "\"ro\"",
        "data=journal,exec",
        "journal_path=/dev/sda",
        "errors=remount-ro;id",
        "uid=$(id -u)",
        "ro\u{200b}",
    ]
    .iter()
    .map(|flag| one(flag))
    .collect();
    cases.push(one(&format!("`touch {root}/pwned`")));
    cases.push(one(&format!(";touch {root}/pwned")));
    cases.push(one(&"a".repeat(HUNDRED_KB)));
    cases.push(one(&"o".repeat(5000)));
    cases.push(vec!["ro".into(), "bind".into()]);
    cases.push(vec!["defaults".into(), "$(id)".into()]);
    cases.push(vec!["noatime".into(); 2000]);

    for (i, flags) in cases.iter().enumerate() {
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cap = mount_cap_flags("ext4", snw(), &refs);
        let shown_flags = shown(&format!("{flags:?}"));
        let what = |rpc: &str| format!("{rpc}(mount_flags={shown_flags})");
        let invalid = &[Code::InvalidArgument][..];
        f.refused(
            &what("CreateVolume"),
            d.create(create_req(&format!("flags-{i}"), 16 * MIB, cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        f.refused(
            &what("ValidateVolumeCapabilities"),
            d.controller
                .validate_volume_capabilities(validate_req(&real, cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        f.refused(
            &what("GetCapacity"),
            d.controller.get_capacity(capacity_req(cap.clone())).await,
            invalid,
            &["mount_flags"],
        );
        f.refused(
            &what("NodeStageVolume"),
            d.node
                .node_stage_volume(stage_req(&unstaged, &unstaged_staging, cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        let target = d.target(&format!("f{i}"));
        f.refused(
            &what("NodePublishVolume"),
            d.node
                .node_publish_volume(publish_req(&real, &staging, &s(&target), cap.clone()))
                .await,
            invalid,
            &["mount_flags"],
        );
        if is_mount_point(&target) {
            f.0.push(format!(
                "{}: the target got mounted",
                what("NodePublishVolume")
            ));
            let _ = d.unpublish(&real, &target).await;
        }
        if d.loop_device_of(&unstaged).is_some() {
            f.0.push(format!(
                "{}: the volume got attached",
                what("NodeStageVolume")
            ));
            let _ = d.unstage(&unstaged, Path::new(&unstaged_staging)).await;
        }
    }

    no_shell_ran(d.root(), &mut f);
    check_state_dir(&d, &mut f);
    let mounted = mounts_under(d.root());
    f.check(mounted == vec![PathBuf::from(&staging)], || {
        format!("mounts after hostile flags: {mounted:?}")
    });
    still_serving(&mut d).await;
    f.assert_none();

    d.unstage(&real, Path::new(&staging)).await.unwrap();
    for vol in d.list_all().await {
        d.delete(&vol.volume_id).await.unwrap();
    }
    d.assert_clean();
}
