//! Property tests for the parsers that see untrusted input: volume ids, mount flags, mountinfo,
//! capacity ranges, StorageClass parameters and the on-disk metadata. None of them may panic on
//! any input, and each must uphold the invariants the rest of the driver relies on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use loopcsi::error::Error;
use loopcsi::host::mount::{parse_mountinfo, MountOptions};
use loopcsi::volume::id::VolumeId;
use loopcsi::volume::params::{
    AccessMode, CapacityRange, ClaimRef, FsType, Provisioning, StorageClassParams, VolumeKind,
    MINIMUM_BLOCK_SIZE,
};
use loopcsi::volume::pool::{Layout, Pool, VolumeMeta};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// No failure files are written into the repository; a failure prints its minimal case.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A string of `0..max` characters drawn from `alphabet`.
fn chars_from(alphabet: &'static [char], max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(alphabet), 0..max)
        .prop_map(|v| v.into_iter().collect())
}

// ---- VolumeId ----

/// The only spelling the driver issues: lower-case hyphenated 8-4-4-4-12 hex.
fn is_canonical_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(b),
        })
}

fn uuid_text(n: u128) -> String {
    uuid::Uuid::from_u128(n).hyphenated().to_string()
}

/// Arbitrary strings, and strings close to a canonical id (one character changed, other
/// spellings of a UUID, path pieces around one).
fn id_candidates() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F-]{34,38}",
        any::<u128>().prop_map(uuid_text),
        (any::<u128>(), any::<prop::sample::Index>(), any::<char>()).prop_map(|(n, at, c)| {
            let mut chars: Vec<char> = uuid_text(n).chars().collect();
            let i = at.index(chars.len());
            chars[i] = c;
            chars.into_iter().collect()
        }),
        (any::<u128>(), 0usize..6).prop_map(|(n, how)| {
            let id = uuid::Uuid::from_u128(n);
            match how {
                0 => id.simple().to_string(),
                1 => id.braced().to_string(),
                2 => id.urn().to_string(),
                3 => id.hyphenated().to_string().to_uppercase(),
                4 => format!("../{}", id.hyphenated()),
                _ => format!("{}\0", id.hyphenated()),
            }
        }),
        (
            any::<u128>(),
            "(\\.\\./|/|\\.|\0|\n| |)",
            "(/\\.\\.|/|\\.|\0|\n| |)"
        )
            .prop_map(|(n, pre, post)| format!("{pre}{}{post}", uuid_text(n))),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn volume_id_parse_accepts_exactly_canonical_uuids(text in id_candidates()) {
        let parsed = VolumeId::parse(&text);
        prop_assert_eq!(parsed.is_some(), is_canonical_uuid(&text), "{:?}", text);
        if let Some(id) = parsed {
            prop_assert_eq!(id.to_string(), text.clone());
            prop_assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
            prop_assert!(
                !text.contains(['/', '.', '\0']),
                "accepted id {:?} could name a path",
                text
            );
        }
        // The metadata files spell ids through serde: it must agree with `parse`.
        let via_serde =
            serde_json::from_value::<VolumeId>(serde_json::Value::String(text.clone())).ok();
        prop_assert_eq!(via_serde, parsed);
    }

    #[test]
    fn volume_id_round_trips(n in any::<u128>()) {
        let text = uuid_text(n);
        let id = VolumeId::parse(&text).expect("a canonical id parses");
        prop_assert_eq!(id.to_string(), text.clone());
        prop_assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(serde_json::from_str::<VolumeId>(&json).unwrap(), id);
    }
}

#[test]
fn volume_id_random_ids_round_trip() {
    for _ in 0..1000 {
        let id = VolumeId::new_random();
        assert!(is_canonical_uuid(&id.to_string()), "{id:?}");
        assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
    }
}

// ---- MountOptions ----

/// The generic options the parser turns into MS_* bits (never into data options).
const GENERIC: &[&str] = &[
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "sync",
    "async",
    "dirsync",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
    "relatime",
    "norelatime",
    "strictatime",
    "lazytime",
    "nolazytime",
];
/// Options that change what is mounted; never accepted.
const FORBIDDEN: &[&str] = &[
    "bind",
    "rbind",
    "remount",
    "move",
    "loop",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "private",
    "rprivate",
    "unbindable",
    "runbindable",
    "mand",
    "user",
    "users",
    "owner",
    "group",
];
const SELINUX: &[&str] = &["context", "fscontext", "defcontext", "rootcontext"];
/// Characters a shell or the kernel's option parser would treat specially.
const SHELL_META: &[char] = &['$', ';', '&', '|', '`', '(', ')', '<', '>', '\\', '\'', '"'];

/// Why an accepted data option is unsafe to hand to mount(2), if it is.
fn unsafe_data_option(option: &str) -> Option<String> {
    let bad_char = |c: char| {
        c.is_whitespace() || c.is_control() || c == '\0' || c == '/' || SHELL_META.contains(&c)
    };
    if option.is_empty() {
        return Some("empty data option".into());
    }
    let key = option.split_once('=').map_or(option, |(k, _)| k);
    if GENERIC.contains(&option) {
        return Some("a generic option was passed as file-system data".into());
    }
    if FORBIDDEN.contains(&key) || key.starts_with("x-") {
        return Some(format!("forbidden option key {key:?}"));
    }
    // An SELinux context may carry commas, but only inside its quotes.
    if SELINUX.contains(&key) {
        let value = &option[key.len()..];
        let Some(value) = value.strip_prefix('=') else {
            return Some("SELinux context without a value".into());
        };
        let (quoted, inner) = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(inner) => (true, inner),
            None => (false, value),
        };
        if inner.is_empty() {
            return Some("empty SELinux context".into());
        }
        if let Some(c) = inner.chars().find(|c| bad_char(*c)) {
            return Some(format!("SELinux context carries {c:?}"));
        }
        if !quoted && inner.contains(',') {
            return Some(
                "unquoted SELinux context carries a ',' (mount(2) splits the data string there, \
                 so the text after it is parsed as further options)"
                    .into(),
            );
        }
        return None;
    }
    if let Some(c) = option.chars().find(|c| bad_char(*c) || *c == ',') {
        return Some(format!("carries {c:?}"));
    }
    None
}

const FLAG_BODY: &[char] = &[
    'a', 'b', 'z', 'A', '0', '9', ':', ',', '_', '.', '=', '"', '$', ';', '&', '|', '`', '(', ')',
    '<', '>', ' ', '\\', '\'', '/', '\t', '\n', '\0', '@', '+', '-', 'é', '\u{202e}', '\u{200b}',
];

fn mount_flag() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "",
        "context=",
        "fscontext=",
        "defcontext=",
        "rootcontext=",
        "context",
        "ro",
        "rw",
        "exec",
        "noexec",
        "defaults",
        "bind",
        "loop=",
        "x-",
        "data=",
        "errors=",
        "discard",
        "-",
        "--",
        "Bind",
    ]);
    prop_oneof![
        any::<String>(),
        prop::sample::select(GENERIC).prop_map(str::to_string),
        prop::sample::select(FORBIDDEN).prop_map(str::to_string),
        (key, chars_from(FLAG_BODY, 16)).prop_map(|(k, b)| format!("{k}{b}")),
        (
            prop::sample::select(SELINUX),
            chars_from(FLAG_BODY, 16),
            chars_from(FLAG_BODY, 3)
        )
            .prop_map(|(k, b, tail)| format!("{k}=\"{b}\"{tail}")),
        (prop::sample::select(SELINUX), "[a-z0-9_:,.-]{0,24}")
            .prop_map(|(k, v)| format!("{k}={v}")),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn mount_options_accept_only_safe_data(flags in prop::collection::vec(mount_flag(), 0..6)) {
        let total: usize = flags.iter().map(String::len).sum();
        match MountOptions::parse(&flags) {
            Ok(opts) => {
                prop_assert!(total <= 4096, "{} bytes of flags accepted", total);
                for option in &opts.data {
                    prop_assert!(flags.contains(option), "{:?} was not asked for", option);
                    if let Some(why) = unsafe_data_option(option) {
                        prop_assert!(false, "accepted data option {:?}: {}", option, why);
                    }
                }
                // The last of ro/rw decides; nothing else sets the read-only bit.
                let last = flags.iter().rev().find(|f| *f == "ro" || *f == "rw");
                prop_assert_eq!(opts.read_only(), last.is_some_and(|f| f == "ro"), "{:?}", flags);
            }
            Err(why) => {
                prop_assert!(why.len() < 1024, "unbounded reason ({} bytes)", why.len());
            }
        }
    }

    #[test]
    fn mount_options_over_4096_bytes_are_refused(
        flags in prop::collection::vec(
            ("[a-z=.-]{1,4}", 1usize..400).prop_map(|(unit, n)| unit.repeat(n)),
            1..8
        ),
        padding in 0usize..64,
    ) {
        let mut flags = flags;
        let total: usize = flags.iter().map(String::len).sum();
        if total <= 4096 {
            flags.push("a".repeat(4097 - total + padding));
        }
        let result = MountOptions::parse(&flags);
        prop_assert!(result.is_err(), "{} bytes of flags accepted", total);
        prop_assert!(result.unwrap_err().len() < 1024);
    }
}

#[test]
fn mount_options_unquoted_selinux_context_cannot_smuggle_options() {
    // What the kubelet sends is quoted; without quotes a ',' ends the option in mount(2)'s
    // data string and what follows is parsed as another option.
    let flags = vec!["context=system_u:object_r:container_file_t:s0,nouser_xattr".to_string()];
    if let Ok(opts) = MountOptions::parse(&flags) {
        for option in &opts.data {
            assert_eq!(
                unsafe_data_option(option),
                None,
                "accepted data option {option:?}"
            );
        }
    }
}

// ---- mountinfo ----

const MOUNTINFO_NOISE: &[&str] = &[
    " ", "-", " - ", "\\", "\\0", "\\04", "\\040", "\\134", "\\777", "\\999", "1", "42", ":",
    "7:3", "\n", "\r\n", "é", "/", "ro", "shared:1", "ext4", "\0", "\u{202e}",
];

/// Characters of generated paths, including the ones the kernel escapes in mountinfo.
const PATH_CHARS: &[char] = &[
    'a', 'Z', '0', '-', '_', '.', ' ', '\t', '\n', '\\', '#', ':', ',', 'é', '卷', '\u{202e}',
    '\u{200b}', '$', '(', '0', '4',
];

/// The kernel's mountinfo escaping (`mangle` in fs/proc_namespace.c): space, tab, newline and
/// backslash become 3-digit octal escapes.
fn escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn mount_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::collection::vec(prop::sample::select(PATH_CHARS), 1..10)
            .prop_map(|v| v.into_iter().collect::<String>()),
        0..4,
    )
    .prop_map(|parts| format!("/{}", parts.join("/")))
}

#[derive(Clone, Debug)]
struct Line {
    major: u32,
    minor: u32,
    root: String,
    mount_point: String,
    options: String,
    optional: Vec<String>,
    fs_type: String,
    source: String,
}

fn mountinfo_line() -> impl Strategy<Value = Line> {
    (
        (any::<u32>(), any::<u32>()),
        (mount_path(), mount_path()),
        "(rw|ro)(,(nosuid|nodev|noexec|relatime|noatime)){0,3}",
        prop::collection::vec("(shared|master|propagate_from):[0-9]{1,4}|unbindable", 0..3),
        "(ext4|xfs|tmpfs|proc|fuse\\.sshfs)",
        prop_oneof![mount_path(), Just("none".to_string()), Just(String::new())],
    )
        .prop_map(
            |((major, minor), (root, mount_point), options, optional, fs_type, source)| Line {
                major,
                minor,
                root,
                mount_point,
                options,
                optional,
                fs_type,
                source,
            },
        )
}

impl Line {
    fn render(&self, mount_id: u32) -> String {
        let mut head = format!(
            "{mount_id} 1 {}:{} {} {} {}",
            self.major,
            self.minor,
            escape(&self.root),
            escape(&self.mount_point),
            self.options
        );
        for field in &self.optional {
            head.push(' ');
            head.push_str(field);
        }
        format!(
            "{head} - {} {} rw,errors=continue",
            self.fs_type,
            escape(&self.source)
        )
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn mountinfo_parser_never_panics(
        text in prop_oneof![
            any::<String>(),
            prop::collection::vec(prop::sample::select(MOUNTINFO_NOISE), 0..40)
                .prop_map(|v| v.concat()),
        ]
    ) {
        let entries = parse_mountinfo(&text);
        prop_assert!(entries.len() <= text.lines().count());
    }

    #[test]
    fn mountinfo_round_trips_mount_points(lines in prop::collection::vec(mountinfo_line(), 1..6)) {
        let text: String = lines
            .iter()
            .enumerate()
            .map(|(i, line)| format!("{}\n", line.render(100 + i as u32)))
            .collect();
        let entries = parse_mountinfo(&text);
        prop_assert_eq!(entries.len(), lines.len(), "{:?}", text);
        for (entry, line) in entries.iter().zip(&lines) {
            prop_assert_eq!(&entry.mount_point, &PathBuf::from(&line.mount_point));
            prop_assert_eq!(&entry.root, &line.root);
            prop_assert_eq!((entry.major, entry.minor), (line.major, line.minor));
            prop_assert_eq!(&entry.options, &line.options);
            prop_assert_eq!(&entry.fs_type, &line.fs_type);
            prop_assert_eq!(&entry.source, &line.source);
            prop_assert_eq!(entry.read_only(), line.options.split(',').any(|o| o == "ro"));
        }
    }
}

// ---- CapacityRange ----

fn byte_count() -> impl Strategy<Value = i64> {
    let mib = MIB as i64;
    prop_oneof![
        any::<i64>(),
        Just(0i64),
        Just(-1i64),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(i64::MAX - 1),
        (0i64..=1 << 16).prop_map(move |k| k * mib),
        (0i64..=1 << 16, -2i64..=2).prop_map(move |(k, d)| k * mib + d),
        (0i64..=4096).prop_map(|k| i64::MAX - k),
        (0i64..=4).prop_map(move |k| (i64::MAX / mib - k) * mib),
    ]
}

/// The minimums the driver passes: those of its volume kinds, and other whole-MiB sizes.
fn minimum_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(MINIMUM_BLOCK_SIZE),
        Just(FsType::Ext4.minimum_size()),
        Just(FsType::Xfs.minimum_size()),
        (0u64..=4096).prop_map(|k| k * MIB),
    ]
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn capacity_resolve_honours_the_range(
        required_bytes in byte_count(),
        limit_bytes in byte_count(),
        minimum in minimum_size(),
    ) {
        let range = CapacityRange { required_bytes, limit_bytes };
        let result = range.resolve(minimum);
        if required_bytes < 0 || limit_bytes < 0 {
            let field = if required_bytes < 0 { "required_bytes" } else { "limit_bytes" };
            match &result {
                Err(err @ Error::InvalidArgument { .. }) => {
                    prop_assert!(err.to_string().contains(field), "{}", err);
                }
                other => prop_assert!(false, "negative input gave {:?}", other),
            }
            return Ok(());
        }
        let required = required_bytes as u64;
        let limit = limit_bytes as u64;
        let floor = minimum.max(MIB);
        // The smallest whole-MiB size that satisfies the range, if there is one.
        let smallest = required
            .max(floor)
            .checked_next_multiple_of(MIB)
            .filter(|s| *s <= i64::MAX as u64 && (limit == 0 || *s <= limit));
        match result {
            Ok(size) => {
                prop_assert_eq!(size % MIB, 0, "{} is not whole MiB", size);
                prop_assert!(size >= minimum && size >= floor, "{} < minimum {}", size, minimum);
                prop_assert!(required == 0 || size >= required, "{} < required {}", size, required);
                prop_assert!(limit == 0 || size <= limit, "{} > limit {}", size, limit);
                prop_assert!(size <= i64::MAX as u64);
                prop_assert!(range.admits(size), "resolve gave {} but admits() refuses it", size);
                if required > 0 {
                    // Rounded up to a whole MiB and to the minimum, no further.
                    prop_assert_eq!(Some(size), smallest);
                } else if limit == 0 {
                    prop_assert_eq!(size, GIB.max(floor));
                } else {
                    prop_assert_eq!(size, GIB.max(floor).min(limit - limit % MIB));
                }
            }
            Err(
                err @ (Error::LimitBelowRequired { .. }
                | Error::RequiredTooLarge { .. }
                | Error::NoSizeFits { .. }),
            ) => {
                let message = err.to_string();
                prop_assert!(
                    smallest.is_none(),
                    "OUT_OF_RANGE ({}) although {:?} fits", message, smallest
                );
                prop_assert!(message.len() < 1024);
            }
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }
}

// ---- StorageClassParams ----

const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

fn parameter_key() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        Just("provisioning".to_string()),
        prop::sample::select(vec![
            "Provisioning",
            "provisioning ",
            " provisioning",
            "provisioning\0",
            "csi.storage.k8s.io",
            "CSI.storage.k8s.io/pvc/name",
            "csi.storage.k8s.io\\pvc",
            "../provisioning",
            "csi.storage.k8s.io/pvc/name",
            "csi.storage.k8s.io/pvc/namespace",
            "csi.storage.k8s.io/pv/name",
            "csi.storage.k8s.io/fstype",
        ])
        .prop_map(str::to_string),
        any::<String>().prop_map(|s| format!("{SIDECAR_PREFIX}{s}")),
    ]
}

fn parameter_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::sample::select(vec![
            "thin",
            "thick",
            "Thin",
            "thick ",
            "",
            "thin\0",
            "thin;thick"
        ])
        .prop_map(str::to_string),
        ("[a-z]{1,8}", 2500usize..4000).prop_map(|(unit, n)| unit.repeat(n)),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn storage_class_parameters_refuse_unknown_keys(
        pairs in prop::collection::vec((parameter_key(), parameter_value()), 0..5)
    ) {
        let map: HashMap<String, String> = pairs.into_iter().collect();
        let unknown: Vec<&String> = map
            .keys()
            .filter(|k| *k != "provisioning" && !k.starts_with(SIDECAR_PREFIX))
            .collect();
        let bad_provisioning = map
            .get("provisioning")
            .is_some_and(|v| v != "thin" && v != "thick");
        // The one sidecar key loopcsi reads: the file system, when the CO passes it so.
        let bad_fstype = map
            .get("csi.storage.k8s.io/fstype")
            .is_some_and(|v| !v.is_empty() && v != "ext4" && v != "xfs");
        match StorageClassParams::try_from(&map) {
            Ok(params) => {
                prop_assert!(unknown.is_empty(), "unknown keys {:?} accepted", unknown);
                prop_assert!(!bad_provisioning);
                prop_assert!(!bad_fstype);
                let expected = match map.get("provisioning").map(String::as_str) {
                    Some("thick") => Provisioning::Thick,
                    _ => Provisioning::Thin,
                };
                prop_assert_eq!(params.provisioning, expected);
                prop_assert_eq!(
                    params.claim.name.as_ref(),
                    map.get("csi.storage.k8s.io/pvc/name")
                );
                prop_assert_eq!(
                    params.claim.namespace.as_ref(),
                    map.get("csi.storage.k8s.io/pvc/namespace")
                );
                prop_assert_eq!(
                    params.claim.pv_name.as_ref(),
                    map.get("csi.storage.k8s.io/pv/name")
                );
            }
            Err(err) => {
                prop_assert!(matches!(err, Error::InvalidArgument { .. }), "{:?}", err);
                prop_assert!(
                    !unknown.is_empty() || bad_provisioning || bad_fstype,
                    "refused: {}",
                    err
                );
                let message = err.to_string();
                prop_assert!(message.starts_with("parameters"), "{}", message);
                prop_assert!(message.len() < 1024, "unbounded message ({} bytes)", message.len());
                // The message names the offending key (escaped and cut short).
                let named = unknown
                    .iter()
                    .any(|k| message.contains(&loopcsi::error::shown(k)))
                    || (bad_provisioning && message.contains("parameters.provisioning"))
                    || (bad_fstype && message.contains("csi.storage.k8s.io/fstype"));
                prop_assert!(named, "{} names no offending key", message);
            }
        }
    }
}

// ---- VolumeMeta (the metadata parser) ----

/// Well-formed metadata. It is built as JSON and parsed, so fields added later with serde
/// defaults keep this test compiling.
fn volume_meta() -> impl Strategy<Value = VolumeMeta> {
    (
        any::<u128>(),
        any::<String>(),
        any::<u64>(),
        prop::sample::select(vec![
            VolumeKind::Block,
            VolumeKind::Filesystem(FsType::Ext4),
            VolumeKind::Filesystem(FsType::Xfs),
        ]),
        prop::sample::select(vec![Provisioning::Thin, Provisioning::Thick]),
        prop::collection::vec(
            prop::sample::select(vec![
                AccessMode::SingleNodeWriter,
                AccessMode::SingleNodeReaderOnly,
                AccessMode::SingleNodeSingleWriter,
                AccessMode::SingleNodeMultiWriter,
            ]),
            0..4,
        ),
        (any::<u64>(), any::<bool>()),
        prop::option::of(any::<String>()),
    )
        .prop_map(
            |(n, name, capacity, kind, provisioning, modes, (created, formatted), pvc)| {
                let claim = ClaimRef {
                    namespace: None,
                    name: pvc,
                    pv_name: None,
                };
                let json = serde_json::json!({
                    "version": 1,
                    "id": uuid_text(n),
                    "name": name,
                    "capacity_bytes": capacity,
                    "kind": kind,
                    "provisioning": provisioning,
                    "access_modes": modes,
                    "created_unix": created,
                    "formatted": formatted,
                    "claim": claim,
                });
                serde_json::from_value::<VolumeMeta>(json).expect("well-formed metadata parses")
            },
        )
}

/// Valid metadata JSON with bytes changed, inserted or cut off.
fn damaged_meta_json() -> impl Strategy<Value = Vec<u8>> {
    (
        volume_meta(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..4),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(|(meta, edits, cut)| {
            let mut bytes = serde_json::to_vec_pretty(&meta).unwrap();
            for (at, byte, how) in edits {
                let i = at.index(bytes.len());
                match how {
                    0 => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => {
                        bytes.remove(i);
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            if let Some(cut) = cut {
                if !bytes.is_empty() {
                    bytes.truncate(cut.index(bytes.len()));
                }
            }
            bytes
        })
}

/// JSON that parses but must still be refused (wrong version, wrong field types, nesting).
fn hostile_meta_json() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (volume_meta(), 2u32..u32::MAX).prop_map(|(meta, version)| {
            let mut value = serde_json::to_value(&meta).unwrap();
            value["version"] = serde_json::json!(version);
            serde_json::to_vec(&value).unwrap()
        }),
        Just(b"{}".to_vec()),
        Just(b"null".to_vec()),
        Just(br#"{"version":1,"id":"../../etc/passwd"}"#.to_vec()),
        (1usize..100_000).prop_map(|depth| {
            let mut v = "[".repeat(depth).into_bytes();
            v.extend("]".repeat(depth).into_bytes());
            v
        }),
        volume_meta().prop_map(|meta| {
            let mut value = serde_json::to_value(&meta).unwrap();
            value["capacity_bytes"] = serde_json::json!(-1);
            serde_json::to_vec(&value).unwrap()
        }),
        volume_meta().prop_map(|meta| {
            let mut value = serde_json::to_value(&meta).unwrap();
            value["kind"] = serde_json::json!({"filesystem": "ntfs"});
            serde_json::to_vec(&value).unwrap()
        }),
    ]
}

fn metadata_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        any::<String>().prop_map(String::into_bytes),
        damaged_meta_json(),
        hostile_meta_json(),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn metadata_parser_never_panics(bytes in metadata_bytes()) {
        let _ = serde_json::from_slice::<VolumeMeta>(&bytes);
    }

    #[test]
    fn metadata_round_trips(meta in volume_meta()) {
        let json = serde_json::to_vec_pretty(&meta).unwrap();
        prop_assert_eq!(serde_json::from_slice::<VolumeMeta>(&json).unwrap(), meta);
    }
}

/// Whether `Pool::open` may load `bytes` as the metadata (of type `M`) of `id`: it parses,
/// and its version and id are the ones this build writes for that file name.
fn loads_as<M: serde::de::DeserializeOwned>(bytes: &[u8], id: VolumeId) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return false;
    };
    serde_json::from_slice::<M>(bytes).is_ok()
        && value["version"] == 1
        && value["id"] == serde_json::json!(id.to_string())
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn pool_open_leaves_unreadable_metadata_and_its_image_alone(
        garbage in metadata_bytes(),
        stray_stem in prop_oneof![Just("not-a-uuid".to_string()), "[a-zA-Z0-9._-]{1,40}"],
        good in volume_meta(),
        n in any::<u128>(),
        m in any::<u128>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(dir.path(), std::sync::Arc::new(loopcsi::host::linux::Linux::new(loopcsi::host::tools::Tools::discover().unwrap()))).unwrap();
        let volumes = layout.volumes_dir();
        let snapshots = dir.path().canonicalize().unwrap().join("snapshots");

        // A volume in good order beside the damaged ones.
        std::fs::write(layout.meta(&good.id), serde_json::to_vec_pretty(&good).unwrap()).unwrap();
        std::fs::write(layout.image(&good.id), b"good data").unwrap();
        // Damaged metadata named by an id, and by a stem that is no id, each with an image.
        let id = VolumeId::parse(&uuid_text(n)).unwrap();
        prop_assume!(id != good.id);
        std::fs::write(layout.meta(&id), &garbage).unwrap();
        std::fs::write(layout.image(&id), b"precious").unwrap();
        let stray_meta = volumes.join(format!("{stray_stem}.json"));
        let stray_image = volumes.join(format!("{stray_stem}.img"));
        std::fs::write(&stray_meta, &garbage).unwrap();
        std::fs::write(&stray_image, b"precious too").unwrap();
        // The same garbage as a snapshot's metadata, when this build keeps snapshots.
        let snap = VolumeId::parse(&uuid_text(m)).unwrap();
        let snap_files = snapshots.is_dir().then(|| {
            let meta = snapshots.join(format!("{snap}.json"));
            let image = snapshots.join(format!("{snap}.img"));
            std::fs::write(&meta, &garbage).unwrap();
            std::fs::write(&image, b"precious snapshot").unwrap();
            (meta, image)
        });

        let (pool, recovery) = Pool::open(layout.clone()).expect("recovery runs");

        prop_assert!(pool.get(&good.id).is_some(), "the good volume is served");
        prop_assert_eq!(std::fs::read(layout.image(&good.id)).unwrap(), b"good data".to_vec());
        // Never deleted, never changed.
        prop_assert_eq!(std::fs::read(layout.image(&id)).unwrap(), b"precious".to_vec());
        prop_assert_eq!(std::fs::read(layout.meta(&id)).unwrap(), garbage.clone());
        prop_assert_eq!(std::fs::read(&stray_image).unwrap(), b"precious too".to_vec());
        prop_assert_eq!(std::fs::read(&stray_meta).unwrap(), garbage.clone());
        prop_assert!(recovery.removed_partial_images.is_empty(), "{:?}", recovery);
        prop_assert!(recovery.unreadable.contains(&stray_meta), "{:?}", recovery);
        if loads_as::<VolumeMeta>(&garbage, id) {
            prop_assert!(pool.get(&id).is_some());
        } else {
            prop_assert!(
                recovery.unreadable.contains(&layout.meta(&id)),
                "unreadable metadata not reported: {:?}",
                recovery
            );
            prop_assert!(pool.get(&id).is_none(), "unreadable volume is served");
            prop_assert_eq!(recovery.volumes, 1);
        }
        if let Some((meta, image)) = snap_files {
            prop_assert_eq!(std::fs::read(&image).unwrap(), b"precious snapshot".to_vec());
            prop_assert_eq!(std::fs::read(&meta).unwrap(), garbage.clone());
            if !loads_as::<loopcsi::volume::pool::SnapshotMeta>(&garbage, snap) {
                prop_assert!(
                    recovery.unreadable.contains(&meta),
                    "unreadable snapshot metadata not reported: {:?}",
                    recovery
                );
            }
        }
    }
}
