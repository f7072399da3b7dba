//! The bench's scratch space: one temp dir under --pool-dir, released (mounts, loop devices,
//! tmpfs) and removed at the end, also on error or signal, with the shared test kit's leak checks.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub(crate) use loopcsi_testkit::process::ChildGuard;

/// The bench's temp dir. Dropping it unmounts every mount under it (deepest first), detaches
/// every loop device whose backing file is under it, and removes it. Nothing else is touched.
pub(crate) struct Scratch {
    pub(crate) root: PathBuf,
    /// Unix sockets need short paths (108 bytes, and the driver binds in a temp dir beside the
    /// socket first), so they live in a short dir of their own under the system temp dir.
    sockets: PathBuf,
    done: bool,
}

impl Scratch {
    pub(crate) fn new(parent: &Path) -> Result<Self> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating --pool-dir {}", parent.display()))?;
        let parent = parent
            .canonicalize()
            .with_context(|| format!("resolving {}", parent.display()))?;
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let root = parent.join(format!("loopcsi-bench-{unique}"));
        let sockets = std::env::temp_dir().join(format!("lcb-{}", &unique[..12]));
        for dir in [&root, &sockets] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Scratch {
            root,
            sockets,
            done: false,
        })
    }

    pub(crate) fn path(&self, leaf: &str) -> PathBuf {
        self.root.join(leaf)
    }

    pub(crate) fn socket(&self, name: &str) -> PathBuf {
        self.sockets.join(format!("{name}.sock"))
    }

    /// Releases and removes everything; an error names what could not be released.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.done = true;
        release_under(&self.root)?;
        std::fs::remove_dir_all(&self.sockets)
            .with_context(|| format!("removing {}", self.sockets.display()))?;
        std::fs::remove_dir_all(&self.root)
            .with_context(|| format!("removing {}", self.root.display()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(err) = release_under(&self.root) {
            eprintln!("loopcsi-bench: cleanup: {err:#}");
        }
        let _ = std::fs::remove_dir_all(&self.sockets);
        if let Err(err) = std::fs::remove_dir_all(&self.root) {
            eprintln!(
                "loopcsi-bench: cleanup: removing {}: {err}",
                self.root.display()
            );
        }
    }
}

/// Unmounts every mount under `root` and detaches every loop device backed by a file under it
/// (the test kit's rounds: innermost first, lazily at the end); an error names what is left.
pub(crate) fn release_under(root: &Path) -> Result<()> {
    loopcsi_testkit::leaks::try_release_everything_under(root).map_err(anyhow::Error::from)
}
