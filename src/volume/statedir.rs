//! Who may work on a state dir, and for which node.
//!
//! On-disk contract (beside the pool's `volumes/`, `snapshots/` and `node/`):
//! - `<state-dir>/lock`    one process works on a state dir at a time: a serving driver holds an
//!   exclusive `flock` on this file for its whole life, and so does `loopcsi gc` while it removes
//!   orphans. Without it, two drivers would each collect the other's work in flight as orphans
//!   (a snapshot acknowledged and then deleted). The file holds the holder's PID, for the
//!   message the next process gets. It is never removed, by the driver or by gc: removing it
//!   would let a second process lock a new file while the first holds the old one.
//! - `<state-dir>/node-id` the node id the state dir was first served with, written crash-safely
//!   (temp file, fsync, rename, fsync the directory). Every volume's accessible_topology is
//!   derived from the serving node id, so starting with another id would silently move every
//!   volume to a node that does not hold it; that is refused unless the operator says the node
//!   was renamed.
//!
//! `loopcsi status` and `loopcsi gc --dry-run` only read, and take no lock.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::host::lockfile::{Holder, LockFile};
use crate::host::os::Host;

/// The lock file's name in the state dir.
pub const LOCK_FILE: &str = "lock";
/// The recorded node id's file name in the state dir.
pub const NODE_ID_FILE: &str = "node-id";

/// Claims `state_dir` for a serving driver: creates it if needed, takes its lock (refused at
/// once, naming the holder's PID, when another process holds it), then checks `node_id` against
/// the recorded one and records it on first start. The lock is held until the returned value
/// is dropped.
pub fn claim_for_driver(
    host: &dyn Host,
    state_dir: &Path,
    node_id: &str,
    allow_node_id_change: bool,
) -> Result<LockFile> {
    host.create_dir_all(state_dir)?;
    let lock = lock(
        host,
        state_dir,
        "loopcsi serve",
        |state_dir, holder, lock_file| Error::StateDirInUse {
            state_dir,
            holder,
            lock_file,
        },
    )?;
    // Under the lock: no other driver can be recording its own id at the same time.
    check_node_id(host, state_dir, node_id, allow_node_id_change)?;
    Ok(lock)
}

/// Takes the state dir's lock for `loopcsi gc`, which removes files: refused (naming the
/// driver's PID) while a driver serves the state dir, whose own reconciliation rounds collect
/// the same orphans without racing its operations in flight.
pub fn lock_for_gc(host: &dyn Host, state_dir: &Path) -> Result<LockFile> {
    lock(
        host,
        state_dir,
        "loopcsi gc",
        |state_dir, holder, lock_file| Error::GcWhileServed {
            state_dir,
            holder,
            lock_file,
        },
    )
}

/// `refused` names the refusal from the state dir, the holder and the lock file.
fn lock(
    host: &dyn Host,
    state_dir: &Path,
    what: &str,
    refused: impl FnOnce(PathBuf, Holder, PathBuf) -> Error,
) -> Result<LockFile> {
    let path = state_dir.join(LOCK_FILE);
    host.try_lock(&path, what)?
        .map_err(|holder| refused(state_dir.to_path_buf(), holder, path))
}

/// Refuses a node id other than the recorded one (unless allowed), and records the id.
fn check_node_id(
    host: &dyn Host,
    state_dir: &Path,
    node_id: &str,
    allow_change: bool,
) -> Result<()> {
    let path = state_dir.join(NODE_ID_FILE);
    let recorded = match host.read_file(&path)? {
        Some(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| {
                let invalid = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
                Error::io("read", &path, invalid)
            })?;
            Some(text.trim_end_matches('\n').to_string())
        }
        None => None,
    };
    match recorded {
        Some(old) if old == node_id => return Ok(()),
        Some(old) if !allow_change => {
            return Err(Error::NodeIdChanged {
                requested: node_id.to_string(),
                recorded: old,
                file: path,
            })
        }
        Some(old) => tracing::warn!(
            node.old_id = %old,
            node.id = %node_id,
            "--allow-node-id-change: the node id changes; every volume's accessible_topology \
             now names the new id"
        ),
        None => tracing::info!(node.id = %node_id, path = %path.display(), "recording the node id"),
    }
    host.write_record_at_startup(&path, format!("{node_id}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_id_is_recorded_then_enforced_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let host = &crate::host::fake::FakeHost::new(dir.path());
        let state = dir.path().join("state");
        drop(claim_for_driver(host, &state, "n1", false).unwrap());
        assert_eq!(
            std::fs::read_to_string(state.join(NODE_ID_FILE)).unwrap(),
            "n1\n"
        );
        drop(claim_for_driver(host, &state, "n1", false).unwrap());
        let err = claim_for_driver(host, &state, "n2", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"n1\"") && err.contains("\"n2\"") && err.contains("--allow"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(state.join(NODE_ID_FILE)).unwrap(),
            "n1\n",
            "a refused start records nothing"
        );
        drop(claim_for_driver(host, &state, "n2", true).unwrap());
        drop(claim_for_driver(host, &state, "n2", false).unwrap());
    }

    #[test]
    fn gc_is_refused_while_a_driver_holds_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let host = &crate::host::fake::FakeHost::new(dir.path());
        let driver = claim_for_driver(host, dir.path(), "n1", false).unwrap();
        let err = lock_for_gc(host, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("PID {}", std::process::id())) && err.contains("loopcsi serve"),
            "{err}"
        );
        let err = claim_for_driver(host, dir.path(), "n1", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("one driver per state dir"), "{err}");
        drop(driver);
        drop(lock_for_gc(host, dir.path()).unwrap());
        assert!(dir.path().join(LOCK_FILE).exists());
    }
}
