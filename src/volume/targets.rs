//! Staging paths and publish targets: creating them, binding onto them, the options of a bind,
//! and removing what publish created.

use std::path::Path;

use crate::error::{Error, Result};
use crate::host::loopdev::AttachOptions;
use crate::host::mount::MountOptions;
use crate::host::os::{Host, NodeKind};
use crate::volume::params::{AccessKind, Capability, VolumeKind};
use crate::volume::pool::VolumeMeta;
use crate::volume::stack::Stack;

/// Creates the target (directory, or file for a device node) and binds the staged file system
/// or the top of the volume's stack onto it.
pub(crate) fn bind_target(
    host: &dyn Host,
    kind: VolumeKind,
    stack: &Stack,
    image: &Path,
    staging: &Path,
    target: &Path,
    options: &MountOptions,
) -> Result<()> {
    let dev = stack.device;
    match kind {
        VolumeKind::Block if options.read_only() => {
            // A read-only bind does not stop writes to a device node: give the target a
            // device the kernel itself keeps read-only.
            ensure_file(host, target)?;
            // The read-only device must hold the very file the writable one does: checked by
            // identity, as the path the kernel shows for `dev` depends on who reads it.
            let held = host.loop_status(dev)?.map(|(file, _)| file);
            if held.is_none() || host.file_id(image)? != held {
                return Err(Error::DeviceSwapped {
                    device: dev.path(),
                    image: image.to_path_buf(),
                });
            }
            let options_ro = AttachOptions {
                direct_io: host.direct_io(dev),
                read_only: true,
            };
            let read_only = host.attach(image, options_ro)?;
            // The read-only device gets the volume's layers too, opened read-only: the pod sees
            // what the writable stack's top shows.
            let bound = host.dev_numbers(read_only).and_then(|numbers| {
                let mut ro_stack = Stack::bare(read_only, numbers, &stack.wanted);
                ro_stack.open_missing(host, true)?;
                let top = ro_stack.highest().path.clone();
                host.bind(&top, target, options)
                    .inspect_err(|_| ro_stack.undo(host, 0))
            });
            bound.inspect_err(|_| {
                let _ = host.detach(read_only);
            })
        }
        VolumeKind::Block => {
            ensure_file(host, target)?;
            let top = stack.top().ok_or_else(|| missing_layer(stack))?;
            host.bind(&top.path, target, options)
        }
        VolumeKind::Filesystem(_) => {
            ensure_directory(host, target, "target_path")?;
            host.bind(staging, target, options)
        }
    }
}

/// A stack whose layers are not all open where they must be (a caller opens them first).
fn missing_layer(stack: &Stack) -> Error {
    Error::Internal(format!(
        "the {} layer over {} is not open",
        stack.missing().map(|l| l.name()).unwrap_or("?"),
        stack.highest().path.display()
    ))
}

/// The options of a publish bind: the capability's generic flags, read-only when asked for.
pub(crate) fn publish_options(
    cap: &Capability,
    readonly: bool,
    meta: &VolumeMeta,
) -> Result<MountOptions> {
    let mut options = match &cap.kind {
        AccessKind::Mount { .. } => mount_options(cap, meta)?,
        AccessKind::Block => MountOptions::default(),
    };
    if readonly || cap.access.read_only() {
        options.flags.insert(nix::mount::MsFlags::MS_RDONLY);
    }
    Ok(options)
}

pub(crate) fn mount_options(cap: &Capability, meta: &VolumeMeta) -> Result<MountOptions> {
    let mut options = cap.mount_options().clone();
    if let VolumeKind::Filesystem(fs) = meta.kind {
        let thick = meta.params.provisioning == crate::volume::params::Provisioning::Thick;
        fs.get().mount_defaults(&mut options, thick);
    }
    if cap.access.read_only() || meta.access_modes.iter().all(|m| m.read_only()) {
        options.flags.insert(nix::mount::MsFlags::MS_RDONLY);
    }
    Ok(options)
}

/// EBUSY from umount means a process still uses the mount: the CO must stop it first.
pub(crate) fn busy_is_precondition(err: Error) -> Error {
    match err {
        Error::Sys {
            errno: nix::errno::Errno::EBUSY,
            target,
            ..
        } => Error::MountBusy { target },
        other => other,
    }
}

/// Makes sure `path` is a directory (creating it if missing), refusing symlinks.
pub(crate) fn ensure_directory(host: &dyn Host, path: &Path, field: &'static str) -> Result<()> {
    match host.node(path)?.map(|n| n.kind) {
        Some(NodeKind::Symlink) => Err(Error::invalid(
            field,
            format!(
                "{} is a symbolic link; refusing to mount through it",
                path.display()
            ),
        )),
        Some(NodeKind::Directory) => Ok(()),
        Some(_) => Err(Error::invalid(
            field,
            format!("{} exists and is not a directory", path.display()),
        )),
        None => host.create_dir_all(path),
    }
}

/// Makes sure `path` is a regular file to bind a device node onto, refusing symlinks.
pub(crate) fn ensure_file(host: &dyn Host, path: &Path) -> Result<()> {
    match host.node(path)?.map(|n| n.kind) {
        Some(NodeKind::Symlink) => Err(Error::invalid(
            "target_path",
            format!(
                "{} is a symbolic link; refusing to mount through it",
                path.display()
            ),
        )),
        Some(NodeKind::File) => Ok(()),
        Some(_) => Err(Error::invalid(
            "target_path",
            format!("{} exists and is not a regular file", path.display()),
        )),
        None => host.create_empty_file(path),
    }
}

/// Deletes what publish created at `target` (spec: the SP MUST delete it). A directory that is
/// not empty holds something the driver did not put there, and is left with a warning.
pub(crate) fn remove_target(host: &dyn Host, target: &Path, kind: VolumeKind) -> Result<()> {
    let Some(node) = host.node(target)? else {
        return Ok(());
    };
    match (kind, node.kind) {
        (VolumeKind::Filesystem(_), NodeKind::Directory) => {
            if !host.remove_empty_dir(target)? {
                tracing::warn!(target = %target.display(), "target_path is not empty after unmount; left in place");
            }
            Ok(())
        }
        (VolumeKind::Block, NodeKind::File) => host.remove_file(target),
        _ => {
            tracing::warn!(target = %target.display(), "target_path is not what publish created; left in place");
            Ok(())
        }
    }
}
