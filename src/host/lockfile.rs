//! An exclusive, process-lifetime lock on a file (`flock(2)`), with the holder's PID written
//! into the file so that whoever is refused can be told who holds it.
//!
//! Contract: the lock belongs to the open file description, so it is released when the holder
//! drops the `LockFile` or dies in any way (SIGKILL, OOM kill, power cut): a crashed holder never
//! leaves a stale lock behind. The file is opened close-on-exec, so a child the holder spawns
//! (mkfs, blkid) never inherits it. The file itself is never removed or replaced (a rename or
//! unlink would let a second process lock a new inode while the first still holds the old one);
//! only its contents are rewritten, in place, by each new holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};

/// A held lock; dropping it releases the lock (the file stays).
#[derive(Debug)]
pub struct LockFile {
    _lock: Flock<File>,
    path: PathBuf,
}

impl LockFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who holds a lock, as its file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// None when the file does not say (yet): a holder writes its PID just after locking.
    pub pid: Option<u32>,
    /// What the holder said it is (e.g. `loopcsi serve`), empty when unknown.
    pub what: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.what.is_empty() {
            "another process"
        } else {
            &self.what
        };
        match self.pid {
            Some(pid) => write!(f, "{what} (PID {pid})"),
            None => write!(f, "{what} (PID not written yet)"),
        }
    }
}

/// Takes the exclusive lock on `path` (creating the file if needed) without waiting, and writes
/// `<pid> <what>` into it. `Ok(Err(holder))` when another open file description holds it
/// (another process, or another lock in this process).
pub fn try_lock(path: &Path, what: &str) -> Result<std::result::Result<LockFile, Holder>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|e| Error::io("open lock file", path, e))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => return Ok(Err(read_holder(&mut file))),
        Err((_, errno)) => {
            return Err(Error::Sys {
                op: "flock",
                target: path.display().to_string(),
                errno,
            })
        }
    };
    // In place (never write-then-rename, see the module doc). Not fsynced: the PID only
    // matters while this process lives, and the lock dies with it.
    let note = format!("{} {what}\n", std::process::id());
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| lock.write_all(note.as_bytes()))
        .map_err(|e| Error::io("write lock file", path, e))?;
    Ok(Ok(LockFile {
        _lock: lock,
        path: path.to_path_buf(),
    }))
}

/// What the holder wrote; a holder that has locked but not written yet reads as unknown.
fn read_holder(file: &mut File) -> Holder {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let line = text.lines().next().unwrap_or("").trim();
    let (pid, what) = line.split_once(' ').unwrap_or((line, ""));
    Holder {
        pid: pid.parse().ok(),
        what: what.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holder_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = try_lock(&path, "loopcsi serve").unwrap().unwrap();
        // flock locks belong to the open file description: a second open in the same process
        // conflicts like another process would.
        let holder = try_lock(&path, "loopcsi gc").unwrap().unwrap_err();
        assert_eq!(
            holder,
            Holder {
                pid: Some(std::process::id()),
                what: "loopcsi serve".into()
            }
        );
        assert!(holder.to_string().contains(&std::process::id().to_string()));
        drop(first);
        let again = try_lock(&path, "loopcsi gc").unwrap().unwrap();
        assert_eq!(again.path(), path);
        assert!(path.exists(), "the lock file is never removed");
    }
}
