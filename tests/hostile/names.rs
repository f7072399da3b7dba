//! Path-like and unicode names are opaque.

use super::*;

// ---- names ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_like_and_unicode_names_are_opaque() {
    let mut d = TestDriver::start().await;
    let mut f = Findings::default();
    let cap = block_cap(snw());
    let root = s(d.root());
    let passwd_before = std::fs::metadata("/etc/passwd")
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    let unrelated_id = uuid::Uuid::new_v4().to_string();

    // Legal CSI names (at most 128 bytes, no banned control characters): opaque strings.
    let legal = vec![
        "../../x".to_string(),
        "a/b".into(),
        "/etc/passwd".into(),
        "..".into(),
        ".".into(),
        "../../../../../../tmp/pwned".into(),
        "$(touch /tmp/pwned)".into(),
        format!("`touch {root}/pwned`"),
        format!("x;touch {root}/pwned"),
        "volumes/../node/x".into(),
        format!("{unrelated_id}.img"),
        unrelated_id.clone(),
        "\u{202e}gpj.exe".into(),
        "zero\u{200b}width".into(),
        "\u{feff}bom".into(),
        "名前/卷/💾".into(),
        "line\nbreak".into(),
    ];
    let mut ids = HashSet::new();
    for name in &legal {
        let what = format!("CreateVolume(name={})", shown(name));
        let Some(vol) = f.ok(&what, d.create(create_req(name, MIB, cap.clone())).await) else {
            continue;
        };
        f.check(VolumeId::parse(&vol.volume_id).is_some(), || {
            format!("{what}: id {:?} is not a driver id", vol.volume_id)
        });
        f.check(vol.volume_id != unrelated_id, || {
            format!("{what}: the id was taken from the name")
        });
        if let Some(again) = f.ok(
            &format!("{what} again"),
            d.create(create_req(name, MIB, cap.clone())).await,
        ) {
            f.check(again.volume_id == vol.volume_id, || {
                format!("{what}: not idempotent")
            });
        }
        ids.insert(vol.volume_id);
    }
    f.check(ids.len() == legal.len(), || {
        format!("{} volumes for {} names", ids.len(), legal.len())
    });

    // Names the spec does not allow.
    for name in [
        String::new(),
        "a\0b".into(),
        "\0".into(),
        "\u{1b}[2J".into(),
        "del\u{7f}".into(),
        "n".repeat(HUNDRED_KB),
        "../".repeat(HUNDRED_KB / 3),
        "\u{200b}".repeat(HUNDRED_KB / 3),
    ] {
        f.refused(
            &format!("CreateVolume(name={})", shown(&name)),
            d.create(create_req(&name, MIB, cap.clone())).await,
            &[Code::InvalidArgument],
            &["name"],
        );
    }

    // No name became a path: only <uuid> files in the state dir, nothing beside it.
    let on_disk = check_state_dir(&d, &mut f);
    f.check(on_disk == ids, || {
        format!("state dir ids {on_disk:?} != created {ids:?}")
    });
    let mut top: Vec<String> = std::fs::read_dir(d.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    f.check(top == ["csi.sock", "state"], || {
        format!("the test dir holds {top:?}")
    });
    let passwd_after = std::fs::metadata("/etc/passwd")
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    f.check(passwd_before == passwd_after, || {
        "/etc/passwd changed".into()
    });
    no_shell_ran(d.root(), &mut f);

    for id in &ids {
        f.ok("DeleteVolume", d.delete(id).await);
    }
    f.check(d.list_all().await.is_empty(), || "volumes left".into());
    still_serving(&mut d).await;
    f.assert_none();
}
