//! [`BroadcastConsumer`]: every instance reads every message of a topic.
//! It pulls every queue by offset (PullMessage, like [`PullConsumer`]) and
//! keeps its own offsets ([`OffsetTable`]): in memory, and in a file when
//! one is given, so a restarted instance goes on where it stopped.
//!
//! Offsets advance when [`BroadcastConsumer::poll`] returns messages; the
//! file is rewritten (atomically) every `persist_interval` and by
//! [`persist`](BroadcastConsumer::persist) / [`close`](BroadcastConsumer::close).
//! After a crash, the messages polled since the last write come again.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use serde_json::Value;
use serde_json::json;
use tokio::task::JoinSet;

use crate::ClientError;
use crate::QueueRef;
use crate::Result;
use crate::message::Received;
use crate::pull::PullConsumer;

/// Where a broadcast consumer starts in a queue it has no offset for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartPosition {
    /// After the last message: only messages sent from now on (default).
    #[default]
    End,
    /// At the oldest message kept.
    Beginning,
}

/// Broadcast consumer settings.
#[derive(Debug, Clone)]
pub struct BroadcastOptions {
    /// Start of the queues known at start without a stored offset. Queues
    /// that appear later (the topic grew) start at the beginning.
    pub start: StartPosition,
    /// Keep the offsets in this file (JSON); `None`: in memory only.
    pub offsets_file: Option<PathBuf>,
    /// Messages per pull of one queue, at most. Default: 32.
    pub batch_size: u32,
    /// How often changed offsets are written to the file. Default: 5 s.
    pub persist_interval: Duration,
}

impl Default for BroadcastOptions {
    fn default() -> Self {
        Self { start: StartPosition::End, offsets_file: None, batch_size: 32, persist_interval: Duration::from_secs(5) }
    }
}

/// The next offset to read of every queue of one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetTable {
    topic: String,
    offsets: BTreeMap<QueueRef, u64>,
    dirty: bool,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::File { path: path.display().to_string(), message: e.to_string() }
}

impl OffsetTable {
    /// An empty table for `topic`.
    pub fn new(topic: &str) -> Self {
        Self { topic: topic.to_string(), ..Default::default() }
    }

    /// The table stored at `path` (an empty one if the file does not exist).
    /// A file of another topic, or one that does not parse, is an error.
    pub fn load(path: &Path, topic: &str) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new(topic)),
            Err(e) => return Err(file_err(path, e)),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| file_err(path, e))?;
        let stored = v.get("topic").and_then(Value::as_str).unwrap_or_default();
        if stored != topic {
            return Err(file_err(path, format!("holds offsets of topic {stored:?}, not {topic:?}")));
        }
        let mut t = Self::new(topic);
        for e in v.get("offsets").and_then(Value::as_array).ok_or_else(|| file_err(path, "no offsets list"))? {
            let (Some(broker), Some(queue), Some(offset)) = (
                e.get("broker").and_then(Value::as_str),
                e.get("queue").and_then(Value::as_u64),
                e.get("offset").and_then(Value::as_u64),
            ) else {
                return Err(file_err(path, format!("bad entry {e}")));
            };
            let queue = u32::try_from(queue).map_err(|_| file_err(path, format!("bad queue id {queue}")))?;
            t.offsets.insert(QueueRef { broker: broker.to_string(), queue }, offset);
        }
        Ok(t)
    }

    /// Writes the table to `path` atomically (a temporary file, fsync,
    /// rename, directory fsync).
    pub fn save(&mut self, path: &Path) -> Result<()> {
        let entries: Vec<Value> =
            self.offsets.iter().map(|(q, o)| json!({"broker": q.broker, "queue": q.queue, "offset": o})).collect();
        let text = json!({"version": 1, "topic": self.topic, "offsets": entries}).to_string();
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            // Makes the rename durable; not every platform lets a directory be opened.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| file_err(path, e))?;
        self.dirty = false;
        Ok(())
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next offset to read of `q`.
    pub fn get(&self, q: &QueueRef) -> Option<u64> {
        self.offsets.get(q).copied()
    }

    /// Sets the next offset to read of `q`.
    pub fn set(&mut self, q: &QueueRef, offset: u64) {
        if self.offsets.insert(q.clone(), offset) != Some(offset) {
            self.dirty = true;
        }
    }

    /// Every queue and its offset.
    pub fn iter(&self) -> impl Iterator<Item = (&QueueRef, u64)> {
        self.offsets.iter().map(|(q, o)| (q, *o))
    }

    /// Changed since the last [`save`](Self::save).
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Records a pull of `q`: it returned messages at offsets `pulled`
    /// (ascending) and next offset `next`; the first `taken` of them were
    /// handed out. Offsets never move backwards.
    pub fn record(&mut self, q: &QueueRef, pulled: &[u64], taken: usize, next: u64) {
        let Some(current) = self.get(q) else {
            return;
        };
        let taken = taken.min(pulled.len());
        let new = if taken == pulled.len() {
            // Everything (maybe nothing, past messages retention removed).
            next.max(pulled.last().map_or(0, |o| o + 1))
        } else if taken > 0 {
            pulled[taken - 1] + 1
        } else {
            current
        };
        if new > current {
            self.set(q, new);
        }
    }
}

/// Reads every message of a topic (see the module documentation).
pub struct BroadcastConsumer {
    pull: PullConsumer,
    topic: String,
    options: BroadcastOptions,
    table: OffsetTable,
    last_persist: Instant,
    /// Rotates which queue is served first.
    turn: usize,
}

type PullResult = (QueueRef, Result<(Vec<Received>, u64)>);

impl BroadcastConsumer {
    /// A broadcast consumer of `topic` at these nodes, as a member of `group`
    /// (sent with the pulls). Loads the offsets file, if any, and places
    /// every queue without an offset at the start position.
    pub async fn new(endpoints: &[String], group: &str, topic: &str, options: BroadcastOptions) -> Result<Self> {
        let table = match &options.offsets_file {
            Some(p) => OffsetTable::load(p, topic)?,
            None => OffsetTable::new(topic),
        };
        let mut c = Self {
            pull: PullConsumer::new(endpoints, group)?,
            topic: topic.to_string(),
            table,
            options,
            last_persist: Instant::now(),
            turn: 0,
        };
        let start = c.options.start;
        c.refresh(start).await?;
        Ok(c)
    }

    /// The topic's queues; the ones without an offset get one (at `start`).
    async fn refresh(&mut self, start: StartPosition) -> Result<Vec<QueueRef>> {
        let queues = self.pull.queues(&self.topic).await?;
        for q in &queues {
            if self.table.get(q).is_none() {
                let o = match start {
                    StartPosition::End => self.pull.max_offset(&self.topic, q).await?,
                    StartPosition::Beginning => self.pull.min_offset(&self.topic, q).await?,
                };
                tracing::debug!(broker = %q.broker, queue = q.queue, offset = o, "broadcast: queue starts");
                self.table.set(q, o);
            }
        }
        Ok(queues)
    }

    /// The offsets (next to read) of every queue.
    pub fn offsets(&self) -> &OffsetTable {
        &self.table
    }

    /// Moves the read position of `q`.
    pub fn seek(&mut self, q: &QueueRef, offset: u64) {
        self.table.set(q, offset);
    }

    /// Writes the offsets to the file now (nothing without a file).
    pub fn persist(&mut self) -> Result<()> {
        if let Some(p) = self.options.offsets_file.clone() {
            self.table.save(&p)?;
        }
        self.last_persist = Instant::now();
        Ok(())
    }

    /// Writes the offsets and ends.
    pub fn close(mut self) -> Result<()> {
        self.persist()
    }

    fn maybe_persist(&mut self) -> Result<()> {
        if self.table.is_dirty() && self.last_persist.elapsed() >= self.options.persist_interval {
            self.persist()?;
        }
        Ok(())
    }

    fn spawn_pulls(&self, queues: &[QueueRef], max: u32, wait: Duration) -> JoinSet<PullResult> {
        let mut set = JoinSet::new();
        for q in queues {
            let (pull, topic, q) = (self.pull.clone(), self.topic.clone(), q.clone());
            let offset = self.table.get(&q).unwrap_or(0);
            set.spawn(async move {
                let r = pull.pull_queue(&topic, &q, offset, max, wait).await;
                (q, r)
            });
        }
        set
    }

    /// Up to `max` messages from any queues, waiting up to `wait` when none
    /// is there. Offsets advance past what is returned.
    pub async fn poll(&mut self, max: u32, wait: Duration) -> Result<Vec<Received>> {
        let max = max.max(1);
        let queues = self.refresh(StartPosition::Beginning).await?;
        if queues.is_empty() {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        let per_queue = max.min(self.options.batch_size.max(1));
        // First every queue without waiting.
        let mut results: HashMap<QueueRef, Result<(Vec<Received>, u64)>> = HashMap::new();
        let mut set = self.spawn_pulls(&queues, per_queue, Duration::ZERO);
        while let Some(r) = set.join_next().await {
            if let Ok((q, r)) = r {
                results.insert(q, r);
            }
        }
        self.turn = self.turn.wrapping_add(1);
        let n = queues.len();
        let order: Vec<QueueRef> = (0..n).map(|k| queues[(self.turn + k) % n].clone()).collect();
        let mut out = Vec::new();
        let mut first_err = None;
        let mut answered = 0;
        for q in &order {
            match results.remove(q) {
                Some(Ok((msgs, next))) => {
                    answered += 1;
                    self.take(q, msgs, next, max as usize, &mut out);
                }
                Some(Err(e)) => {
                    tracing::warn!(broker = %q.broker, queue = q.queue, error = %e, "broadcast pull failed");
                    first_err.get_or_insert(e);
                }
                None => {}
            }
        }
        if answered == 0
            && let Some(e) = first_err
        {
            return Err(e);
        }
        if out.is_empty() && !wait.is_zero() {
            // Then wait on every queue; the first with messages wins (the
            // others' pulls are dropped: their offsets did not move).
            let mut set = self.spawn_pulls(&order, per_queue, wait);
            while let Some(r) = set.join_next().await {
                let Ok((q, r)) = r else { continue };
                match r {
                    Ok((msgs, next)) => {
                        let got = !msgs.is_empty();
                        self.take(&q, msgs, next, max as usize, &mut out);
                        if got {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(broker = %q.broker, queue = q.queue, error = %e, "broadcast long poll failed")
                    }
                }
            }
            set.abort_all();
        }
        self.maybe_persist()?;
        Ok(out)
    }

    /// Hands out what fits in `max` of one queue's pull and records it.
    fn take(&mut self, q: &QueueRef, msgs: Vec<Received>, next: u64, max: usize, out: &mut Vec<Received>) {
        let room = max.saturating_sub(out.len());
        let offsets: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
        let k = room.min(msgs.len());
        self.table.record(q, &offsets, k, next);
        out.extend(msgs.into_iter().take(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(b: &str, n: u32) -> QueueRef {
        QueueRef { broker: b.into(), queue: n }
    }

    #[test]
    fn record_advances_past_what_was_taken() {
        let mut t = OffsetTable::new("T");
        let a = q("b", 0);
        // Unknown queue: nothing recorded.
        t.record(&a, &[0, 1], 2, 2);
        assert_eq!(t.get(&a), None);
        t.set(&a, 10);
        // All taken: the broker's next offset.
        t.record(&a, &[10, 11, 12], 3, 13);
        assert_eq!(t.get(&a), Some(13));
        // Part taken: after the last one taken.
        t.record(&a, &[13, 14, 15], 1, 16);
        assert_eq!(t.get(&a), Some(14));
        // None taken: unchanged.
        t.record(&a, &[14, 15], 0, 16);
        assert_eq!(t.get(&a), Some(14));
        // Nothing there, but retention moved the start: jump to it.
        t.record(&a, &[], 0, 100);
        assert_eq!(t.get(&a), Some(100));
        // Never backwards.
        t.record(&a, &[], 0, 5);
        assert_eq!(t.get(&a), Some(100));
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets.json");
        assert_eq!(OffsetTable::load(&path, "T").unwrap(), OffsetTable::new("T"), "no file: empty table");
        let mut t = OffsetTable::new("T");
        t.set(&q("broker-a", 0), 5);
        t.set(&q("broker-b", 3), 42);
        assert!(t.is_dirty());
        t.save(&path).unwrap();
        assert!(!t.is_dirty());
        assert!(!path.with_extension("tmp").exists(), "the temporary file is renamed");
        let back = OffsetTable::load(&path, "T").unwrap();
        assert_eq!(back, t);
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![(&q("broker-a", 0), 5), (&q("broker-b", 3), 42)]);
        // Setting the same value does not dirty it.
        let mut back = back;
        back.set(&q("broker-a", 0), 5);
        assert!(!back.is_dirty());
        // Overwrite.
        back.set(&q("broker-a", 0), 6);
        back.save(&path).unwrap();
        assert_eq!(OffsetTable::load(&path, "T").unwrap().get(&q("broker-a", 0)), Some(6));
    }

    #[test]
    fn load_refuses_other_topics_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets.json");
        let mut t = OffsetTable::new("T");
        t.set(&q("b", 0), 1);
        t.save(&path).unwrap();
        assert!(matches!(OffsetTable::load(&path, "Other"), Err(ClientError::File { .. })));
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(OffsetTable::load(&path, "T"), Err(ClientError::File { .. })));
        std::fs::write(&path, r#"{"topic":"T","offsets":[{"broker":"b","queue":0}]}"#).unwrap();
        assert!(matches!(OffsetTable::load(&path, "T"), Err(ClientError::File { .. })));
    }
}
