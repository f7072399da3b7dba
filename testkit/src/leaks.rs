//! Leak checks and cleanup: the loop devices and mounts under a dir that a test (or the bench)
//! made, found from the kernel's own tables, released innermost first, and described for
//! assertion messages. Nothing outside the given dir is ever touched.

use std::path::{Path, PathBuf};

use loopcsi::host::{loopdev, mount};

/// A temp dir for one test. Dropping it unmounts and detaches whatever is still under it (even
/// when the test panicked), asserts that nothing is left, then removes it.
pub struct Scratch {
    /// Held for its Drop, which removes the tree after ours has released its mounts.
    #[allow(dead_code)]
    dir: tempfile::TempDir,
    root: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("loopcsi-test-")
            .tempdir()
            .unwrap();
        let root = dir.path().canonicalize().unwrap();
        Scratch { dir, root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        release_everything_under(&self.root);
        let left = leftovers_under(&self.root);
        if !std::thread::panicking() {
            assert_eq!(
                left,
                Vec::<String>::new(),
                "cleanup could not release these"
            );
        }
    }
}

/// Every attached loop device with its backing file, by walking all of /sys/block. Slower than
/// the driver's `loopdev::attached` (which lists only devices with capacity), and independent
/// of it, so the tests also catch a device the driver could not see.
pub fn every_attached_loop_device() -> Vec<(loopdev::LoopDevice, PathBuf)> {
    try_every_attached_loop_device().unwrap()
}

fn try_every_attached_loop_device() -> std::io::Result<Vec<(loopdev::LoopDevice, PathBuf)>> {
    Ok(std::fs::read_dir("/sys/block")?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let number: u32 = name.to_str()?.strip_prefix("loop")?.parse().ok()?;
            let dev = loopdev::LoopDevice(number);
            dev.backing_file().map(|file| (dev, file))
        })
        .collect())
}

/// Mounts and loop devices under `root` (what a test made), described for assertion messages.
pub fn leftovers_under(root: &Path) -> Vec<String> {
    try_leftovers_under(root).unwrap()
}

/// As [`leftovers_under`], with the error of reading the kernel's tables (for the bench).
pub fn try_leftovers_under(root: &Path) -> Result<Vec<String>, LeakCheckError> {
    let mut left: Vec<String> = mount::mounts()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| format!("mount {}", m.mount_point.display()))
        .collect();
    left.extend(
        devices_under(root)?
            .into_iter()
            .map(|(dev, file)| format!("{} -> {}", dev.path().display(), file.display())),
    );
    Ok(left)
}

/// The loop devices whose backing file is under `root`, and those stacked on them (a device
/// layer of a volume's stack: a loop device whose backing file is one of those devices, matched
/// by the backing device's numbers), transitively.
fn devices_under(root: &Path) -> Result<Vec<(loopdev::LoopDevice, PathBuf)>, LeakCheckError> {
    let all = try_every_attached_loop_device()?;
    let (mut under, mut rest): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(_, file)| file.starts_with(root));
    loop {
        let numbers: Vec<_> = under
            .iter()
            .filter_map(|(dev, _)| dev.dev_numbers().ok())
            .collect();
        let (stacked, others): (Vec<_>, Vec<_>) = rest.into_iter().partition(
            |(dev, _)| matches!(dev.backing_device(), Ok(Some(lower)) if numbers.contains(&lower)),
        );
        rest = others;
        if stacked.is_empty() {
            return Ok(under);
        }
        under.extend(stacked);
    }
}

/// Unmounts (deepest first) and detaches everything under `root`; touches nothing else.
pub fn release_everything_under(root: &Path) {
    release_in_rounds(root).unwrap()
}

/// Why the leak checks could not read the kernel's tables or release what they found.
#[derive(Debug)]
pub struct LeakCheckError(String);

impl std::fmt::Display for LeakCheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LeakCheckError {}

impl From<loopcsi::error::Error> for LeakCheckError {
    fn from(err: loopcsi::error::Error) -> Self {
        LeakCheckError(err.to_string())
    }
}

impl From<std::io::Error> for LeakCheckError {
    fn from(err: std::io::Error) -> Self {
        LeakCheckError(format!("reading /sys/block: {err}"))
    }
}

/// As [`release_everything_under`], returning the error instead of failing the test; then
/// anything still left under `root` is an error naming it.
pub fn try_release_everything_under(root: &Path) -> Result<(), LeakCheckError> {
    release_in_rounds(root)?;
    let left = try_leftovers_under(root)?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(LeakCheckError(format!(
            "could not release: {}",
            left.join(", ")
        )))
    }
}

fn release_in_rounds(root: &Path) -> Result<(), LeakCheckError> {
    // Volumes' loop devices may sit on a pool file system that is itself a loop-mounted file
    // under `root`, so unmount and detach in rounds, innermost first, lazily only at the end.
    for round in 0..6 {
        let table = mount::mounts()?;
        let mut points: Vec<PathBuf> = table
            .iter()
            .filter(|m| m.mount_point.starts_with(root))
            .map(|m| m.mount_point.clone())
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for point in &points {
            let flags = if round < 4 {
                nix::mount::MntFlags::UMOUNT_NOFOLLOW
            } else {
                nix::mount::MntFlags::MNT_DETACH
            };
            let _ = nix::mount::umount2(point, flags);
        }
        let table = mount::mounts()?;
        let devices = devices_under(root)?;
        // A device with another stacked on it is released after that one (top-down).
        let lowers: Vec<_> = devices
            .iter()
            .filter_map(|(dev, _)| dev.backing_device().ok().flatten())
            .collect();
        // Stacked devices come last in the list: released first.
        for (dev, _) in devices.iter().rev() {
            let numbers = dev.dev_numbers()?;
            let in_use =
                table.iter().any(|m| (m.major, m.minor) == numbers) || lowers.contains(&numbers);
            if !in_use || round >= 4 {
                dev.detach()?;
            }
        }
        if points.is_empty() && devices.is_empty() {
            break;
        }
    }
    Ok(())
}

/// Thaws the file system mounted at `dir` if it is frozen (`fsfreeze --unfreeze`; an error,
/// such as "not frozen", is ignored: this only ever undoes a freeze).
pub fn thaw(dir: &Path) {
    let _ = std::process::Command::new("fsfreeze")
        .arg("--unfreeze")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Thaws every file system mounted under `root`, so that a freeze a killed driver left behind
/// cannot keep `release_everything_under` from unmounting and detaching it.
pub fn thaw_everything_under(root: &Path) {
    for m in mount::mounts().unwrap() {
        if m.mount_point.starts_with(root) && m.mount_point.is_dir() {
            thaw(&m.mount_point);
        }
    }
}

/// The names of the files in `dir` (none when it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
