//! Request builders and the status assertion the tests share.

use loopcsi::csi;

pub fn mode(
    m: csi::volume_capability::access_mode::Mode,
) -> Option<csi::volume_capability::AccessMode> {
    Some(csi::volume_capability::AccessMode { mode: m as i32 })
}

pub fn mount_cap(fs: &str, m: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    mount_cap_flags(fs, m, &[])
}

pub fn mount_cap_flags(
    fs: &str,
    m: csi::volume_capability::access_mode::Mode,
    flags: &[&str],
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                volume_mount_group: String::new(),
            },
        )),
        access_mode: mode(m),
    }
}

pub fn block_cap(m: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: mode(m),
    }
}

pub fn snw() -> csi::volume_capability::access_mode::Mode {
    csi::volume_capability::access_mode::Mode::SingleNodeWriter
}

pub fn create_req(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn with_params(
    mut req: csi::CreateVolumeRequest,
    params: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    req.parameters = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    req
}

/// Asserts a tonic result failed with `code`, and that the message mentions `needle`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Ok(v) => panic!("expected {code:?} mentioning {needle:?}, got OK {v:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "wrong code; message: {}",
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                status.message()
            );
        }
    }
}
