//! The history: one JSON object per line, in the order events happened.
//!
//! Client operations are an `invoke` followed by one completion: `ok`,
//! `fail` (it certainly did not happen) or `info` (unknown: a timeout or a
//! lost connection). Deliveries, the final read of the log and the nemesis
//! are single events.

use std::io::BufRead;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use serde::Deserialize;
use serde::Serialize;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum F {
    /// A producer's send; `value` is the message id (also its key and body).
    Send,
    /// A message handed to a consumer; `queue`, `offset`, `attempt` set.
    Receive,
    /// A consumer's ack of a delivery.
    Ack,
    /// Offsets workload: commit `offset` for the register.
    Write,
    /// Offsets workload: read the register; `offset` in the completion.
    Read,
    /// After the run: a message present in the log at `queue`/`offset`.
    Final,
    /// A fault starts (`value`: its name and targets).
    NemesisStart,
    /// Every fault of the preceding start is healed.
    NemesisStop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
    /// A single event (deliveries, final reads, nemesis).
    Event,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall clock, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Client process (producer `p3`, consumer `c1`, register `r0`, `nemesis`).
    pub process: String,
    pub kind: Kind,
    pub f: F,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Error text of a fail or info.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Event {
    pub fn new(process: &str, kind: Kind, f: F, value: impl Into<String>) -> Self {
        Event {
            time_us: now_us(),
            process: process.to_string(),
            kind,
            f,
            value: value.into(),
            queue: None,
            offset: None,
            attempt: None,
            error: String::new(),
        }
    }

    pub fn at(mut self, queue: u32, offset: u64) -> Self {
        self.queue = Some(queue);
        self.offset = Some(offset);
        self
    }

    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    pub fn error(mut self, e: impl std::fmt::Display) -> Self {
        self.error = e.to_string();
        self
    }
}

/// Appends events to a file, one line each, flushed per event (a crash of
/// the tool keeps what happened so far).
pub struct Recorder {
    out: Mutex<std::fs::File>,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Recorder { out: Mutex::new(f) })
    }

    pub fn log(&self, e: &Event) {
        let mut line = serde_json::to_vec(e).expect("event encodes");
        line.push(b'\n');
        let mut f = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // A history that cannot be written makes the run worthless: stop.
        f.write_all(&line).expect("writing the history");
    }
}

/// Reads a history file (events sorted by time).
pub fn read(path: &Path) -> anyhow::Result<Vec<Event>> {
    let f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))?);
    }
    out.sort_by_key(|e: &Event| e.time_us);
    Ok(out)
}
