//! Holding one call of the fake host until the test lets it go: a test runs a second operation
//! while the first is in the middle of its work (its guards held), without sleeping for it.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::Op;

/// How long a test waits for a held call to arrive before failing (instead of hanging).
const ARRIVAL_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Seen {
    arrived: bool,
    open: bool,
}

/// Where a held call waits.
#[derive(Debug, Default)]
pub(super) struct Gate {
    seen: Mutex<Seen>,
    changed: Condvar,
}

impl Gate {
    /// Called by the held call: says it arrived, then waits until the test opens the gate.
    pub(super) fn pass(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.arrived = true;
        self.changed.notify_all();
        while !seen.open {
            seen = (self.changed.wait(seen)).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn open(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.open = true;
        self.changed.notify_all();
    }
}

/// The test's end of a held call of `op` ([`super::FakeHost::hold_next`]). Dropping it lets the
/// call go on, also when the test panics, so no thread stays blocked.
#[derive(Debug)]
pub struct Held {
    pub op: Op,
    pub(super) gate: Arc<Gate>,
}

impl Held {
    /// Waits until the held call has arrived (its operation is then in the middle of its
    /// work); panics if it does not arrive within a minute.
    pub fn wait_arrived(&self) {
        let seen = self
            .gate
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (seen, _) = (self.gate.changed)
            .wait_timeout_while(seen, ARRIVAL_LIMIT, |s| !s.arrived)
            .unwrap_or_else(PoisonError::into_inner);
        assert!(
            seen.arrived,
            "no call of {:?} arrived within {ARRIVAL_LIMIT:?}",
            self.op
        );
    }

    /// Lets the held call go on.
    pub fn release(self) {}
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gate.open();
    }
}
