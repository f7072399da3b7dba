//! Mounts: what is mounted where is read from `/proc/self/mountinfo` every time it matters, and
//! changed only through mount(2)/umount2(2) with typed flags (no `mount` binary, no shell).

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    /// The path inside the source file system that is mounted (`/` unless a bind of a subtree
    /// or of a single file such as a device node).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,...`).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Options of the file system itself (`rw,errors=remount-ro,...`).
    pub super_options: String,
}

impl MountEntry {
    /// This mount is read-only (a per-mount flag, as a read-only bind has).
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    /// The file system itself went read-only, e.g. ext4 after errors (`errors=remount-ro`
    /// shows as `ro` or `emergency_ro` in the super options, not in the per-mount ones).
    pub fn fs_read_only(&self) -> bool {
        self.super_options
            .split(',')
            .any(|o| o == "ro" || o == "emergency_ro")
    }
}

/// Decodes the octal escapes (`\040` for a space) the kernel uses in mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let (head, tail) = line.split_once(" - ")?;
    let mut fields = head.split(' ');
    let _mount_id = fields.next()?;
    let _parent_id = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = PathBuf::from(unescape(fields.next()?));
    let options = fields.next()?.to_string();
    let mut tail = tail.split(' ');
    let fs_type = tail.next()?.to_string();
    let source = unescape(tail.next().unwrap_or(""));
    let super_options = tail.next().unwrap_or("").to_string();
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root,
        mount_point,
        options,
        fs_type,
        source,
        super_options,
    })
}

/// The current mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mounted_at(table: &[MountEntry], path: &Path) -> Option<MountEntry> {
    table.iter().rev().find(|m| m.mount_point == path).cloned()
}

/// The mount that holds `path` (canonical): the topmost mount on the longest mount point that
/// is an ancestor of `path`.
pub fn mount_holding(table: &[MountEntry], path: &Path) -> Option<MountEntry> {
    // `max_by_key` keeps the last of equal keys: the topmost of mounts stacked on one point.
    table
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .cloned()
}

/// For an ext2/ext3/ext4 mount, whether its file system keeps a journal: jbd2 lists each
/// journal it runs as `/proc/fs/jbd2/<device>-<journal inode>`. `None` for other file systems,
/// or when the device has no name in sysfs or jbd2's list cannot be read (no guess either way).
pub fn ext_journal(entry: &MountEntry) -> Option<bool> {
    match entry.fs_type.as_str() {
        "ext2" => return Some(false),
        "ext3" | "ext4" => {}
        _ => return None,
    }
    let device = super::block_device_name(entry.major, entry.minor)?;
    let journals = std::fs::read_dir("/proc/fs/jbd2").ok()?;
    Some(journals.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .strip_prefix(device.as_str())
            .is_some_and(|rest| rest.starts_with('-'))
    }))
}

/// Mount options from a CSI `mount_flags` list, split into the generic per-mount flags the
/// kernel takes as bits and the file-system specific options it takes as a data string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            data: Vec::new(),
        }
    }
}

/// Generic options and the flag each one sets (`true`) or clears (`false`).
const GENERIC: &[(&str, MsFlags, bool)] = &[
    ("ro", MsFlags::MS_RDONLY, true),
    ("rw", MsFlags::MS_RDONLY, false),
    ("nosuid", MsFlags::MS_NOSUID, true),
    ("suid", MsFlags::MS_NOSUID, false),
    ("nodev", MsFlags::MS_NODEV, true),
    ("dev", MsFlags::MS_NODEV, false),
    ("noexec", MsFlags::MS_NOEXEC, true),
    ("exec", MsFlags::MS_NOEXEC, false),
    ("sync", MsFlags::MS_SYNCHRONOUS, true),
    ("async", MsFlags::MS_SYNCHRONOUS, false),
    ("dirsync", MsFlags::MS_DIRSYNC, true),
    ("noatime", MsFlags::MS_NOATIME, true),
    ("atime", MsFlags::MS_NOATIME, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, true),
    ("diratime", MsFlags::MS_NODIRATIME, false),
    ("relatime", MsFlags::MS_RELATIME, true),
    ("norelatime", MsFlags::MS_RELATIME, false),
    ("strictatime", MsFlags::MS_STRICTATIME, true),
    ("lazytime", MsFlags::MS_LAZYTIME, true),
    ("nolazytime", MsFlags::MS_LAZYTIME, false),
];

/// Options that would change what is mounted rather than how; never taken from a request.
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

/// File-system options that trade the node's or the data's safety away; never taken from a
/// request: `errors=panic` panics the node's kernel on the first file-system error (one bad
/// volume would take every pod on the node down), and `noload`/`norecovery` mount without
/// replaying the journal, so a volume that was not unmounted cleanly shows stale or
/// inconsistent data.
const UNSAFE: &[(&str, &str)] = &[
    (
        "errors=panic",
        "would panic the node's kernel on the first file-system error",
    ),
    (
        "noload",
        "skips the journal replay and can show inconsistent data",
    ),
    (
        "norecovery",
        "skips the journal replay and can show inconsistent data",
    ),
];

/// SELinux context options, which the kubelet passes (quoted, with commas inside the quotes)
/// when the CSIDriver has seLinuxMount enabled.
const SELINUX_CONTEXTS: &[&str] = &["context", "fscontext", "defcontext", "rootcontext"];

impl MountOptions {
    /// Parses and validates CSI mount flags. The reason names the offending flag.
    pub fn parse(flags: &[String]) -> std::result::Result<Self, String> {
        let total: usize = flags.iter().map(String::len).sum();
        if total > 4096 {
            return Err(format!("{total} bytes in all; the CSI limit is 4096"));
        }
        let mut opts = MountOptions::default();
        for flag in flags {
            let shown = crate::error::shown(flag);
            if flag.is_empty() || flag == "defaults" {
                continue;
            }
            if let Some((_, bit, set)) = GENERIC.iter().find(|(name, _, _)| *name == flag) {
                opts.flags.set(*bit, *set);
                continue;
            }
            if let Some((_, why)) = UNSAFE.iter().find(|(name, _)| *name == flag) {
                return Err(format!("{shown} is not allowed: it {why}"));
            }
            let key = flag.split_once('=').map_or(flag.as_str(), |(k, _)| k);
            if FORBIDDEN.contains(&key) || key.starts_with("x-") {
                return Err(format!("{shown} is not allowed"));
            }
            if !flag.starts_with(|c: char| c.is_ascii_alphanumeric()) {
                return Err(format!("{shown} does not start with a letter or digit"));
            }
            if SELINUX_CONTEXTS.contains(&key) {
                if !valid_selinux_context(flag, key) {
                    return Err(format!("{shown} is not a valid SELinux context option"));
                }
            } else if !flag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:+@=-".contains(&b))
            {
                return Err(format!(
                    "{shown} has characters outside [A-Za-z0-9_.:+@=-] (one option per flag)"
                ));
            }
            if !opts.data.contains(flag) {
                opts.data.push(flag.clone());
            }
        }
        Ok(opts)
    }

    pub fn read_only(&self) -> bool {
        self.flags.contains(MsFlags::MS_RDONLY)
    }

    fn data_string(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

fn valid_selinux_context(flag: &str, key: &str) -> bool {
    let Some(value) = flag.strip_prefix(key).and_then(|v| v.strip_prefix('=')) else {
        return false;
    };
    // A comma is only safe inside quotes: unquoted, the kernel would split the option there
    // and read what follows as further options.
    let (inner, quoted) = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => (inner, true),
        None => (value, false),
    };
    !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b) || (quoted && b == b','))
}

/// Mounts the file system on `device` at `target`.
pub fn mount_device(
    device: &Path,
    target: &Path,
    fs_type: &str,
    opts: &MountOptions,
) -> Result<()> {
    let data = opts.data_string();
    nix::mount::mount(
        Some(device),
        target,
        Some(fs_type),
        opts.flags,
        data.as_deref(),
    )
    .map_err(|errno| Error::sys("mount", target.display(), errno))
}

/// Bind-mounts `source` (a directory or a device node) onto `target`, then applies the generic
/// flags (read-only and friends) with a bind remount, as the kernel ignores them on the first call.
/// File-system specific options do not apply to a bind mount and are not passed.
pub fn bind(source: &Path, target: &Path, opts: &MountOptions) -> Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| Error::sys("bind mount", target.display(), errno))?;
    if opts.flags.is_empty() {
        return Ok(());
    }
    let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | opts.flags;
    if let Err(errno) = nix::mount::mount(None::<&str>, target, None::<&str>, remount, None::<&str>)
    {
        // Never leave a writable bind behind when read-only was asked for.
        let _ = unmount(target);
        return Err(Error::sys("remount bind", target.display(), errno));
    }
    Ok(())
}

/// Unmounts `target`. Not a mount point (or no such path) is success: the caller observed the
/// mount table first, and a repeated call must change nothing. A busy mount is an error; it is
/// never detached lazily, as that would hide a live user of the volume.
pub fn unmount(target: &Path) -> Result<()> {
    match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(errno) => Err(Error::sys("umount", target.display(), errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_holding_a_path_is_the_deepest_topmost_one() {
        let text = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    2 1 0:30 / /var/tmp rw - tmpfs tmpfs rw\n\
                    3 1 7:1 / /var/tmp rw - xfs /dev/loop1 rw\n\
                    4 1 7:2 / /var/tmpx rw - xfs /dev/loop2 rw\n";
        let table = parse_mountinfo(text);
        let holding = |p: &str| mount_holding(&table, Path::new(p)).map(|m| m.source);
        assert_eq!(holding("/var/tmp/pool").as_deref(), Some("/dev/loop1"));
        assert_eq!(holding("/var/tmp").as_deref(), Some("/dev/loop1"));
        assert_eq!(holding("/var/tmpy/pool").as_deref(), Some("/dev/sda1"));
        assert_eq!(holding("/var/tmpx/a").as_deref(), Some("/dev/loop2"));
        assert_eq!(mount_holding(&table[1..], Path::new("/etc")), None);
        assert_eq!(ext_journal(&table[1]), None, "tmpfs has no say");
    }

    #[test]
    fn parses_mountinfo_lines() {
        let text =
            "36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    garbage line\n\
                    40 36 7:3 / /var/lib/kubelet/x ro,relatime shared:5 - xfs /dev/loop3 rw\n";
        let table = parse_mountinfo(text);
        assert_eq!(table.len(), 2);
        assert_eq!(table[0].mount_point, PathBuf::from("/mnt 2"));
        assert_eq!(table[0].root, "/mnt1");
        assert_eq!((table[1].major, table[1].minor), (7, 3));
        assert!(table[1].read_only());
        assert_eq!(table[1].fs_type, "xfs");
        assert_eq!(table[1].source, "/dev/loop3");
    }

    #[test]
    fn unescape_keeps_odd_backslashes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\9"), "a\\9");
        assert_eq!(unescape("end\\"), "end\\");
    }

    #[test]
    fn mount_flags_split_and_validate() {
        let flags = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let opts =
            MountOptions::parse(&flags(&["ro", "noatime", "data=ordered", "discard"])).unwrap();
        assert!(opts.read_only());
        assert!(opts.flags.contains(MsFlags::MS_NOATIME));
        assert_eq!(opts.data, vec!["data=ordered", "discard"]);

        for bad in [
            "a,b",
            "x;rm -rf /",
            "bind",
            "x-mount.mkdir",
            "$(id)",
            "opt with space",
            "a\0b",
            "journal_path=/dev/sda",
            "errors=panic",
            "noload",
            "norecovery",
        ] {
            assert!(
                MountOptions::parse(&flags(&[bad])).is_err(),
                "{bad:?} accepted"
            );
        }
        let ctx = MountOptions::parse(&flags(&[
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\"",
        ]))
        .unwrap();
        // The kernel gets the option as given, quotes and the comma inside them included.
        assert_eq!(
            ctx.data_string().as_deref(),
            Some("context=\"system_u:object_r:container_file_t:s0:c1,c2\"")
        );
        assert!(MountOptions::parse(&flags(&["context=\"a\" ,x\""])).is_err());
        assert!(MountOptions::parse(&[("x".repeat(5000))]).is_err());
    }
}
