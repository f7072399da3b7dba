//! Crash points for the crash-safety tests. With the `fault-injection` feature (enabled only by
//! the test build, through the crate's dev-dependency on itself), the process kills itself with
//! SIGKILL when it reaches the point named by `LOOPCSI_CRASH_AT`: no destructors, no flushes,
//! exactly what an OOM kill or a power cut does to the process. Release builds compile every
//! point to nothing.

/// Marks a point where a crash must leave recoverable state.
#[cfg(feature = "fault-injection")]
pub fn crash_point(name: &str) {
    if std::env::var("LOOPCSI_CRASH_AT").is_ok_and(|wanted| wanted == name) {
        tracing::warn!(point = name, "fault injection: killing the process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Marks a point where a crash must leave recoverable state (no-op in this build).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// Every crash point, for the tests that iterate over them.
pub const POINTS: &[&str] = &[
    "atomic.temp_written",
    "create.image_written",
    "create.meta_committed",
    "delete.meta_removed",
    "stage.attached",
    "stage.formatted",
    "stage.mounted",
    "unstage.unmounted",
    "unstage.detached",
    "publish.bound",
    "freeze.intent_recorded",
    "freeze.frozen",
    "thaw.thawed",
    "copy.precopied",
    "group.intent_recorded",
    "group.precopied",
    "group.frozen",
    "group.members_committed",
    "group.committed",
    "delete_group.marked",
    "delete_group.members_removed",
    "snapshot.copied",
    "snapshot.committed",
    "delete_snapshot.meta_removed",
    "restore.copied",
    "clone.copied",
    "expand.file_grown",
    "gc.removed",
];
