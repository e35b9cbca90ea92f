//! Test hooks for the fault-injection suite (`raftmq-jepsen`). Each is off
//! unless its environment variable is set; a production node never sets them.
//!
//! - `RAFTMQ_CLOCK_OFFSET_FILE=path`: the file holds a signed number of
//!   milliseconds added to this node's wall clock (clock skew). Read every
//!   100 ms. Raft timers use the monotonic clock and are not affected, as
//!   with a real skewed clock.
//! - `RAFTMQ_FAULT_FS_CONTROL=path`: the CommitLog runs on
//!   [`raft_log::fault::FaultFs`]; the file holds a command, read every
//!   100 ms: `power-loss` (every write not yet fdatasynced is lost, as the
//!   disk would hold it after a power cut, and the process aborts at once),
//!   `enospc <bytes>` (writes fail with ENOSPC after that many more bytes: a
//!   full disk), or `ok` (no fault).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raft_log::FileSystem;
use raft_log::StdFs;
use raft_log::fault::CrashMode;
use raft_log::fault::FaultFs;

static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// The wall-clock offset in force (0 unless the clock hook is on).
pub fn clock_offset_ms() -> i64 {
    CLOCK_OFFSET_MS.load(Ordering::Relaxed)
}

fn poll(path: PathBuf, what: &'static str, mut on_change: impl FnMut(&str) + Send + 'static) {
    std::thread::Builder::new()
        .name(format!("fault-hook-{what}"))
        .spawn(move || {
            let mut last = String::new();
            loop {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let text = text.trim().to_string();
                    if text != last {
                        tracing::warn!(hook = what, command = %text, "fault-injection hook");
                        on_change(&text);
                        last = text;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .expect("spawn fault hook thread");
}

/// Starts the clock hook if its variable is set.
pub fn start_clock_hook() {
    if let Some(path) = std::env::var_os("RAFTMQ_CLOCK_OFFSET_FILE") {
        poll(PathBuf::from(path), "clock", |text| {
            CLOCK_OFFSET_MS.store(text.parse().unwrap_or(0), Ordering::Relaxed);
        });
    }
}

/// The file system for the CommitLog: the real one, or a [`FaultFs`] driven
/// by the control file when its variable is set.
pub fn log_file_system() -> Arc<dyn FileSystem> {
    let Some(path) = std::env::var_os("RAFTMQ_FAULT_FS_CONTROL") else { return Arc::new(StdFs) };
    let fs = FaultFs::new();
    let hook = fs.clone();
    poll(PathBuf::from(path), "fs", move |text| {
        let mut words = text.split_whitespace();
        match words.next() {
            Some("power-loss") => {
                if let Err(e) = hook.crash(CrashMode::LoseUnsynced) {
                    tracing::error!(error = %e, "simulated power loss failed");
                }
                std::process::abort();
            }
            Some("enospc") => hook.set_enospc(words.next().and_then(|n| n.parse().ok()).or(Some(0))),
            _ => hook.set_enospc(None),
        }
    });
    Arc::new(fs)
}
