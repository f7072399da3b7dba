//! The application the stall measurements run: 4 KiB writes, each followed by fdatasync,
//! round a file until stopped, remembering the longest write (write + fdatasync).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// One application writer thread.
pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    max_ns: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Writer {
    /// Starts writing round the first `span` bytes of a new file at `path`, `stride` bytes
    /// apart.
    pub(crate) fn start(path: PathBuf, span: u64, stride: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_ns = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, m, w) = (stop.clone(), max_ns.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::create(&path)?;
            file.set_len(span)?;
            let block = [0x5au8; 4096];
            let mut offset = 0u64;
            while !s.load(Ordering::Relaxed) {
                let started = Instant::now();
                file.write_all_at(&block, offset)?;
                file.sync_data()?;
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                m.fetch_max(took, Ordering::Relaxed);
                w.fetch_add(1, Ordering::Relaxed);
                offset = (offset + stride) % span;
            }
            Ok(())
        });
        Writer {
            stop,
            max_ns,
            writes,
            thread: Some(thread),
        }
    }

    /// The longest write since the last call, in milliseconds.
    pub(crate) fn take_max_ms(&self) -> f64 {
        self.max_ns.swap(0, Ordering::Relaxed) as f64 / 1e6
    }

    /// Waits (polling) until the writer completed `n` more writes: every write that was
    /// waiting on a freeze has then finished and been counted.
    pub(crate) async fn wait_writes(&self, n: u64) -> Result<()> {
        let target = self.writes.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.writes.load(Ordering::Relaxed) < target {
            if Instant::now() > deadline {
                return Err(anyhow!("a writer made no progress for 60 s (left frozen?)"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// The longest write of the phase that just ended, once a write blocked in it is counted.
    pub(crate) async fn phase_max_ms(&self) -> Result<f64> {
        self.wait_writes(2).await?;
        Ok(self.take_max_ms())
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .take()
            .ok_or_else(|| anyhow!("writer joined twice"))?;
        thread
            .join()
            .map_err(|_| anyhow!("a writer panicked"))?
            .context("a writer's write failed")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
