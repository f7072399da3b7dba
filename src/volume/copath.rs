//! The paths a CO gives (staging and target paths, a stats or expand `volume_path`), checked
//! against the file system before the domain acts on them: absolute and normalised, never under
//! the kernel's trees or the driver's state dir, never through a symlink, and with the symlinks
//! of their ancestors resolved as the kernel resolves them at mount time, so every later
//! comparison with mountinfo uses the same path. This is domain work, not request parsing: it
//! reads the file system, so the services call it instead of doing path I/O themselves.

use std::path::{Component, Path, PathBuf};

use crate::error::{shown, Error, Result};
use crate::host::os::{Host, NodeKind};
use crate::volume::id::VolumeId;

/// The longest name of one path component (Linux NAME_MAX).
const NAME_MAX: usize = 255;

/// Trees of kernel and device file systems: mounting a volume over any of them would shadow
/// the host's view of processes, sysfs or device nodes, and no CO puts a target there.
const KERNEL_TREES: &[&str] = &["/proc", "/sys", "/dev"];

/// The checks of a CO path that need no file system: required, at most PATH_MAX, no NUL,
/// absolute, normalised (no `.` or `..`), not the root, no component over NAME_MAX.
fn well_formed<'a>(field: &'static str, value: &'a str) -> Result<&'a Path> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > 4096 {
        return Err(Error::invalid(
            field,
            format!("{} is longer than PATH_MAX", shown(value)),
        ));
    }
    if value.contains('\0') {
        return Err(Error::invalid(
            field,
            format!("{} contains a NUL byte", shown(value)),
        ));
    }
    let path = Path::new(value);
    if !path.is_absolute() {
        return Err(Error::invalid(
            field,
            format!("{} is not an absolute path", shown(value)),
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        return Err(Error::invalid(
            field,
            format!("{} contains . or .. components", shown(value)),
        ));
    }
    if path.parent().is_none() {
        return Err(Error::invalid(
            field,
            format!("{} is the root directory", shown(value)),
        ));
    }
    if let Some(long) = path
        .components()
        .map(|c| c.as_os_str().len())
        .find(|&len| len > NAME_MAX)
    {
        return Err(Error::invalid(
            field,
            format!(
                "{} has a {long}-byte component; the limit is {NAME_MAX} bytes (NAME_MAX)",
                shown(value)
            ),
        ));
    }
    Ok(path)
}

/// A path the CO gives (staging or target): required, absolute, normalised (no `.`/`..`), not
/// a symlink itself, no component over NAME_MAX, not under /proc, /sys or /dev, and outside the
/// driver's state dir. Returned with the symlinks of its
/// ancestors resolved (see `resolve_existing_prefix`).
pub fn co_path(
    host: &dyn Host,
    field: &'static str,
    value: &str,
    state_dir: &Path,
) -> Result<PathBuf> {
    let path = well_formed(field, value)?;
    // Symlinks in the ancestors are followed, as the kernel does when mounting: the mount and
    // mountinfo show the resolved path, so every later comparison uses it too.
    let resolved = resolve_existing_prefix(host, path);
    if let Some(kernel) = KERNEL_TREES
        .iter()
        .find(|tree| path.starts_with(tree) || resolved.starts_with(tree))
    {
        return Err(Error::invalid(
            field,
            format!(
                "{} is under {kernel}, which belongs to the kernel; a volume is never mounted there",
                shown(value)
            ),
        ));
    }
    if resolved.starts_with(state_dir) || state_dir.starts_with(&resolved) {
        return Err(Error::invalid(
            field,
            format!(
                "{} overlaps the driver's state dir {}",
                shown(value),
                state_dir.display()
            ),
        ));
    }
    if is_symlink(host, path) {
        return Err(Error::invalid(
            field,
            format!(
                "{} is a symbolic link; refusing to mount through it",
                shown(value)
            ),
        ));
    }
    Ok(resolved)
}

/// A NodePublish target that already exists as a plain directory must be empty: the kubelet
/// creates at most an empty target dir (csi-sanity does the same), so a directory with entries
/// is someone else's data, which a mount would hide. A mount point (its device differs from
/// its parent's) is left to the domain, which observes what is mounted there (a repeated
/// publish is idempotent); a missing target is created by the domain; a file is a block target.
pub fn unclaimed_target(host: &dyn Host, field: &'static str, target: &Path) -> Result<()> {
    let Ok(Some(node)) = host.node(target) else {
        return Ok(());
    };
    let parent_dev = target
        .parent()
        .and_then(|p| host.node_followed(p).ok().flatten())
        .map(|n| n.dev);
    if node.kind != NodeKind::Directory || parent_dev != Some(node.dev) {
        return Ok(());
    }
    let entries = host.list_dir(target)?.unwrap_or_default();
    if !entries.is_empty() {
        return Err(Error::NotEmptyTarget {
            field,
            path: target.to_path_buf(),
        });
    }
    Ok(())
}

/// The `volume_path` of NodeGetVolumeStats / NodeExpandVolume: required; anything that cannot
/// be where the volume is (relative, too long, NUL, missing) is NOT_FOUND, as the spec (and
/// csi-sanity) expect; an existing path is resolved like `co_path`.
pub fn volume_path(host: &dyn Host, id: &VolumeId, value: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(Error::invalid("volume_path", "is required"));
    }
    let not_found = || Error::NotFound {
        what: "volume at volume_path",
        id: format!("{id} at {}", shown(value)),
    };
    let path = Path::new(value);
    if value.len() > 4096 || value.contains('\0') || !path.is_absolute() || is_symlink(host, path) {
        return Err(not_found());
    }
    host.canonicalize(path).map_err(|_| not_found())
}

/// `path` itself is a symbolic link (its final component is not followed).
fn is_symlink(host: &dyn Host, path: &Path) -> bool {
    matches!(host.node(path), Ok(Some(n)) if n.kind == NodeKind::Symlink)
}

/// `path` with its deepest existing ancestor canonicalised (symlinks in it followed) and the
/// rest appended: where a mount at `path` would really land, also when the last components do
/// not exist yet and an ancestor is a symlink.
fn resolve_existing_prefix(host: &dyn Host, path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut current = path;
    loop {
        if let Ok(real) = host.canonicalize(current) {
            return rest
                .iter()
                .rev()
                .fold(real, |acc: PathBuf, part| acc.join(part));
        }
        match (current.parent(), current.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                current = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}
