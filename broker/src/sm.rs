//! The state machine of a broker group: applies committed entries.
//!
//! - Message batches: one ConsumeQueue record per message, pointing at the
//!   message's bytes inside its CommitLog entry, plus the key index.
//! - Control commands: topics, pop/ack/invisibility state of consumer groups,
//!   committed offsets.
//!
//! State lives in memory and in RocksDB. A checkpoint (every second, and on
//! shutdown) fsyncs the ConsumeQueue files written since the last one and then
//! writes the changed state together with the applied log id in one synced
//! RocksDB batch: a restart resumes exactly at that applied id, and openraft
//! re-applies the committed entries after it (records past a queue's stored
//! length are overwritten). Every entry applied is committed, so no reader of
//! a ConsumeQueue ever sees an entry past the commit index.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;
use std::sync::RwLockWriteGuard;

use bytes::Bytes;
use futures::StreamExt;
use openraft::EntryPayload;
use openraft::RaftSnapshotBuilder;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use prost::Message as _;
use raft_log::CommitLog;
use raft_log::record::HEADER_LEN;
use raftmq_proto::store::StoredMessage;
use serde::Deserialize;
use serde::Serialize;

use crate::command;
use crate::command::Command;
use crate::command::Control;
use crate::command::GroupConf;
use crate::command::Placement;
use crate::command::Popped;
use crate::command::RefusedCode;
use crate::command::Response;
use crate::command::TxId;
use crate::cq::ConsumeQueue;
use crate::cq::CqRecord;
use crate::cq::tag_hash;
use crate::error::BrokerError;
use crate::error::Result;
use crate::filter::Filter;
use crate::filter::FilterKind;
use crate::held::DeadOrigin;
use crate::held::Half;
use crate::held::Held;
use crate::held::HeldMessage;
use crate::pop::MsgInfo;
use crate::pop::PopRules;
use crate::snapshot;
use crate::snapshot::SnapState;
use crate::snapshot::SnapshotDir;
use crate::types::LogId;
use crate::types::Snapshot as RaftSnapshot;
use crate::types::SnapshotMeta as RaftSnapshotMeta;
use crate::types::StoredMembership;
use crate::types::TypeConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConf {
    pub name: String,
    pub queues: u32,
    pub message_type: i32,
}

/// A popped message not yet acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inflight {
    pub visible_at_ms: u64,
    pub attempt: u32,
    pub pop_index: u64,
}

/// A consumer group's state on one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupQueue {
    /// Every offset below is consumed (acked, or committed by a pull consumer).
    pub committed: u64,
    /// Next offset a pop hands out for the first time.
    pub pop_offset: u64,
    pub inflight: BTreeMap<u64, Inflight>,
    /// FIFO: offsets below `pop_offset` passed over because their message
    /// group had a message in flight; delivered before newer ones.
    #[serde(default)]
    pub held: BTreeSet<u64>,
}

impl GroupQueue {
    pub(crate) fn recompute_committed(&mut self) {
        let inflight = self.inflight.keys().next().copied().unwrap_or(self.pop_offset);
        let held = self.held.iter().next().copied().unwrap_or(self.pop_offset);
        self.committed = self.committed.max(inflight.min(held).min(self.pop_offset));
    }
}

type QueueKey = (String, u32);
/// (group, topic, queue)
pub type GroupKey = (String, String, u32);

#[derive(Default)]
pub struct SmState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub topics: BTreeMap<String, TopicConf>,
    /// Consumer group configurations.
    pub group_confs: BTreeMap<String, GroupConf>,
    pub queues: HashMap<QueueKey, ConsumeQueue>,
    pub groups: HashMap<GroupKey, GroupQueue>,
    /// Delayed and half messages, dead-letter origins, live consumers.
    pub held: Held,
    dirty_topics: HashSet<String>,
    deleted_topics: HashSet<String>,
    dirty_queues: HashSet<QueueKey>,
    dirty_groups: HashSet<GroupKey>,
    /// Group configurations changed (or removed) since the last checkpoint.
    dirty_group_confs: HashSet<String>,
    /// ConsumeQueue directories of deleted topics, removed by the next
    /// checkpoint once the deletion is durable in RocksDB.
    pending_removals: Vec<(String, PathBuf)>,
    pub messages_applied: u64,
}

/// A dead letter: its offset in the DLQ, where it came from, the message.
pub type DeadLetter = (u64, DeadOrigin, ReadMessage);

/// A message read back from the log.
#[derive(Debug, Clone)]
pub struct ReadMessage {
    pub queue: u32,
    pub offset: u64,
    pub pos: u64,
    pub message: StoredMessage,
    /// The encoded StoredMessage, as stored.
    pub raw: Bytes,
}

pub struct SmShared {
    pub log: Arc<CommitLog>,
    db: rocksdb::DB,
    cq_root: PathBuf,
    state: RwLock<SmState>,
    /// Serialises checkpoints: two racing ones could store an older applied id
    /// beside newer state.
    checkpoint_lock: std::sync::Mutex<()>,
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// Woken whenever messages are applied or invisibility may have expired.
    pub activity: tokio::sync::Notify,
    /// Half messages each CheckTransactions entry checked, as applied here:
    /// the node holding a producer's Telemetry stream asks it to resolve them.
    pub tx_checks: tokio::sync::broadcast::Sender<Vec<TxId>>,
    snapshots: snapshot::Store,
}

/// The openraft state machine; cheap to clone.
#[derive(Clone)]
pub struct StateMachineStore {
    pub shared: Arc<SmShared>,
}

const K_APPLIED: &[u8] = b"m/applied";
const K_MEMBERSHIP: &[u8] = b"m/membership";
/// Every id-index row has its dedupe row (`u/`) as of the checkpoint this
/// holds the applied id of: written with [`K_APPLIED`] by every checkpoint
/// (and snapshot install), so a store last checkpointed by a binary that
/// wrote no dedupe rows (before they existed, or after a downgrade) has a
/// different applied id here, and opening it builds the rows again.
const K_UNIQUE_BUILT: &[u8] = b"m/unique-rows";

/// Records the applied log id in `batch`, with the dedupe-rows marker that
/// must always hold the same bytes (see [`K_UNIQUE_BUILT`]).
fn put_applied(batch: &mut rocksdb::WriteBatch, applied: &Option<LogId>) {
    let applied = enc(applied);
    batch.put(K_UNIQUE_BUILT, &applied);
    batch.put(K_APPLIED, applied);
}

fn k_topic(name: &str) -> Vec<u8> {
    format!("t/{name}").into_bytes()
}

fn k_queue(topic: &str, q: u32) -> Vec<u8> {
    format!("q/{topic}/{q}").into_bytes()
}

fn k_group_conf(name: &str) -> Vec<u8> {
    format!("c/{name}").into_bytes()
}

fn k_group(g: &GroupKey) -> Vec<u8> {
    format!("g/{}\0{}\0{}", g.0, g.1, g.2).into_bytes()
}

fn k_key_index(topic: &str, key: &str, queue: u32, offset: u64) -> Vec<u8> {
    let mut k = format!("k/{topic}\0{key}\0").into_bytes();
    k.extend_from_slice(&queue_offset_bytes(queue, offset));
    k
}

/// A RocksDB row (key, value) or the error reading it.
type Row = std::result::Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>;

/// The rows of `db` whose keys start with `prefix`, in key order.
fn rows<'a>(db: &'a rocksdb::DB, prefix: &'a [u8]) -> impl Iterator<Item = Row> + 'a {
    db.prefix_iterator(prefix).take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("state encodes")
}

fn dec<T: for<'de> Deserialize<'de>>(what: &[u8], b: &[u8]) -> Result<T> {
    rmp_serde::from_slice(b)
        .map_err(|e| BrokerError::Corrupt(format!("state {:?}: {e}", String::from_utf8_lossy(what))))
}

/// The dead-letter topic of a consumer group.
pub fn dlq_topic(group: &str) -> String {
    format!("%DLQ%{group}")
}

fn parse_filter(f: &command::FilterSpec) -> std::result::Result<Filter, String> {
    let kind = if f.sql { FilterKind::Sql } else { FilterKind::Tag };
    Filter::parse(kind, &f.expression).map_err(|e| e.to_string())
}

/// The group's maximum of delivery attempts: its config, else the
/// proposer's default, else RocketMQ's 17.
fn max_attempts_of(conf: Option<&GroupConf>, default: u32) -> u32 {
    conf.map(|c| c.max_delivery_attempts).filter(|m| *m > 0).unwrap_or(if default == 0 { 17 } else { default })
}

/// Index rows of a message in its queue: by key (`k/<topic>\0<key>\0`) and
/// by id (`k/\x01<id>\0<topic>\0`), each ending with queue and offset.
/// With `unique`, also the message's dedupe row (`u/<topic>\0<id>`, see
/// [`k_unique`]): the caller has checked that no valid one exists.
fn index_message(
    keys: &mut rocksdb::WriteBatch,
    topic: &str,
    queue: u32,
    offset: u64,
    m: &StoredMessage,
    unique: bool,
) {
    for k in &m.keys {
        keys.put(k_key_index(topic, k, queue, offset), b"");
    }
    if !m.message_id.is_empty() {
        keys.put(k_id_index(&m.message_id, topic, queue, offset), b"");
        if unique {
            keys.put(k_unique(topic, &m.message_id), queue_offset_bytes(queue, offset));
        }
    }
}

/// The dedupe row of a message id in a topic: one exact key, so a send is
/// checked with a point lookup (bloom filters answer the usual "new id"
/// without touching the memtable's skip list or an SST block). Its value is
/// the (queue, offset) of the first copy stored; it is only replaced when
/// that copy is not valid (it points past its queue's end: written before a
/// crash by entries that are being applied again). Not in snapshots: a node
/// installing one rebuilds these rows from the id index
/// ([`UniqueRows`]).
fn k_unique(topic: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + topic.len() + id.len());
    k.extend_from_slice(b"u/");
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn queue_offset_bytes(queue: u32, offset: u64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&queue.to_be_bytes());
    v[4..].copy_from_slice(&offset.to_be_bytes());
    v
}

/// (id, topic, queue, offset) of an id-index row `k/\x01<id>\0<topic>\0<queue><offset>`.
/// Topic names have no NUL (see [`check_name`]), so the topic is what
/// follows the last NUL before the trailing one, whatever the id holds.
fn parse_id_row(row: &[u8]) -> Option<(&[u8], &[u8], u32, u64)> {
    let rest = row.strip_prefix(b"k/\x01")?;
    let (head, qo) = rest.split_at_checked(rest.len().checked_sub(12)?)?;
    let (q, o) = queue_offset(qo)?;
    let head = head.strip_suffix(b"\0")?;
    let zero = head.iter().rposition(|b| *b == 0)?;
    Some((&head[..zero], &head[zero + 1..], q, o))
}

/// Builds the dedupe rows from id-index rows given in key order: rows of
/// one id and topic are adjacent, and the first (lowest queue and offset)
/// gets the row. Used for a snapshot's rows (all valid) and for the
/// one-time build in a store written before dedupe rows existed.
#[derive(Default)]
struct UniqueRows {
    last: Vec<u8>,
    count: u64,
}

impl UniqueRows {
    fn push(&mut self, batch: &mut rocksdb::WriteBatch, row: &[u8]) {
        let Some((id, topic, q, o)) = parse_id_row(row) else { return };
        let prefix = &row[..row.len() - 12];
        if prefix == self.last.as_slice() {
            return;
        }
        self.last.clear();
        self.last.extend_from_slice(prefix);
        let (Ok(topic), Ok(id)) = (std::str::from_utf8(topic), std::str::from_utf8(id)) else { return };
        batch.put(k_unique(topic, id), queue_offset_bytes(q, o));
        self.count += 1;
    }
}

/// The (queue, offset) an index row ends with.
fn queue_offset(b: &[u8]) -> Option<(u32, u64)> {
    if b.len() != 12 {
        return None;
    }
    Some((u32::from_be_bytes(b[0..4].try_into().ok()?), u64::from_be_bytes(b[4..12].try_into().ok()?)))
}

/// The id-index rows of `id` in `topic` start with this; [`k_id_index`]
/// appends the copy's queue and offset.
fn k_id_prefix(id: &str, topic: &str) -> Vec<u8> {
    format!("k/\x01{id}\0{topic}\0").into_bytes()
}

fn k_id_index(id: &str, topic: &str, queue: u32, offset: u64) -> Vec<u8> {
    let mut k = k_id_prefix(id, topic);
    k.extend_from_slice(&queue_offset_bytes(queue, offset));
    k
}

/// Checks a topic or group name: RocketMQ's `^[%|a-zA-Z0-9_-]+$`, at most 127 chars.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 127 {
        return Err(BrokerError::BadRequest(format!("{kind} name must be 1 to 127 characters, got {}", name.len())));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "%|_-".contains(*c))) {
        return Err(BrokerError::BadRequest(format!(
            "{kind} name {name:?} has the character {c:?}; allowed: letters, digits, % | _ -"
        )));
    }
    Ok(())
}

impl StateMachineStore {
    /// Opens (or creates) the state under `dir`.
    pub fn open(dir: &Path, log: Arc<CommitLog>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        // Bloom filters, in SST files and in the memtable, for the dedupe
        // lookup of every sent message (an exact key that is usually absent).
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        opts.set_memtable_prefix_bloom_ratio(0.05);
        opts.set_memtable_whole_key_filtering(true);
        let db = rocksdb::DB::open(&opts, dir.join("db"))?;
        let applied_raw = db.get(K_APPLIED)?;
        if db.get(K_UNIQUE_BUILT)? != applied_raw {
            let mut batch = rocksdb::WriteBatch::default();
            let mut unique = UniqueRows::default();
            for item in rows(&db, b"k/\x01") {
                let (k, _) = item?;
                unique.push(&mut batch, &k);
                if batch.len() >= 10_000 {
                    db.write(std::mem::take(&mut batch))?;
                }
            }
            match &applied_raw {
                Some(a) => batch.put(K_UNIQUE_BUILT, a),
                None => batch.delete(K_UNIQUE_BUILT),
            }
            db.write(batch)?;
            if unique.count > 0 {
                tracing::info!(rows = unique.count, "dedupe rows built for a store written before they existed");
            }
        }
        let cq_root = dir.join("cq");
        let mut st = SmState::default();
        if let Some(b) = &applied_raw {
            st.last_applied = dec(K_APPLIED, b)?;
        }
        if let Some(b) = db.get(K_MEMBERSHIP)? {
            st.membership = dec(K_MEMBERSHIP, &b)?;
        }
        for item in rows(&db, b"t/") {
            let (k, v) = item?;
            let t: TopicConf = dec(&k, &v)?;
            st.topics.insert(t.name.clone(), t);
        }
        for item in rows(&db, b"c/") {
            let (k, v) = item?;
            let g: GroupConf = dec(&k, &v)?;
            st.group_confs.insert(g.name.clone(), g);
        }
        for prefix in crate::held::PREFIXES {
            for item in rows(&db, prefix) {
                let (k, v) = item?;
                st.held.load_row(&k, &v)?;
            }
        }
        let mut lengths: HashMap<QueueKey, u64> = HashMap::new();
        for item in rows(&db, b"q/") {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k[2..]).to_string();
            let (topic, q) = key.rsplit_once('/').ok_or_else(|| BrokerError::Corrupt(format!("queue key {key}")))?;
            let q: u32 = q.parse().map_err(|_| BrokerError::Corrupt(format!("queue key {key}")))?;
            lengths.insert((topic.to_string(), q), dec(&k, &v)?);
        }
        for item in rows(&db, b"g/") {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k[2..]).to_string();
            let parts: Vec<&str> = key.split('\0').collect();
            if parts.len() != 3 {
                return Err(BrokerError::Corrupt(format!("group key {key:?}")));
            }
            let q: u32 = parts[2].parse().map_err(|_| BrokerError::Corrupt(format!("group key {key:?}")))?;
            st.groups.insert((parts[0].to_string(), parts[1].to_string(), q), dec(&k, &v)?);
        }
        for t in st.topics.values() {
            for q in 0..t.queues {
                let len = lengths.get(&(t.name.clone(), q)).copied().unwrap_or(0);
                let cq = ConsumeQueue::open(&cq_root.join(&t.name).join(q.to_string()), len)?;
                st.queues.insert((t.name.clone(), q), cq);
            }
        }
        let applied = st.last_applied.map(|l| l.index).unwrap_or(0);
        let (applied_tx, _) = tokio::sync::watch::channel(applied);
        tracing::info!(applied = ?st.last_applied, topics = st.topics.len(), "state machine opened");
        Ok(StateMachineStore {
            shared: Arc::new(SmShared {
                log,
                db,
                cq_root,
                state: RwLock::new(st),
                checkpoint_lock: std::sync::Mutex::new(()),
                applied_tx,
                activity: tokio::sync::Notify::new(),
                tx_checks: tokio::sync::broadcast::channel(64).0,
                snapshots: snapshot::Store::new(dir.join("snapshots"))?,
            }),
        })
    }
}

impl SmShared {
    pub fn read(&self) -> RwLockReadGuard<'_, SmState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, SmState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied_tx.borrow()
    }

    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Waits until entries up to `index` are applied here, at most `wait`.
    pub async fn wait_applied(&self, index: u64, wait: std::time::Duration) -> Result<()> {
        let mut rx = self.applied_tx.subscribe();
        let fut = rx.wait_for(|a| *a >= index);
        match tokio::time::timeout(wait, fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(BrokerError::Raft("state machine stopped".into())),
            Err(_) => Err(BrokerError::Timeout(format!("applying up to entry {index}"))),
        }
    }

    /// Makes the state durable: fsync ConsumeQueue files written since the
    /// last checkpoint, then one synced RocksDB batch with everything changed
    /// and the applied log id it corresponds to.
    pub fn checkpoint(&self) -> Result<()> {
        let _one = self.checkpoint_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = rocksdb::WriteBatch::default();
        let (files, removals) = {
            let mut st = self.write();
            let mut files = Vec::new();
            for key in std::mem::take(&mut st.dirty_queues) {
                if let Some(q) = st.queues.get_mut(&key) {
                    files.extend(q.take_dirty());
                    batch.put(k_queue(&key.0, key.1), enc(&q.max_offset()));
                }
            }
            for name in std::mem::take(&mut st.dirty_topics) {
                if let Some(t) = st.topics.get(&name) {
                    batch.put(k_topic(&name), enc(t));
                }
            }
            for name in std::mem::take(&mut st.deleted_topics) {
                batch.delete(k_topic(&name));
                batch.delete_range(format!("q/{name}/").into_bytes(), format!("q/{name}0").into_bytes());
            }
            for name in std::mem::take(&mut st.dirty_group_confs) {
                match st.group_confs.get(&name) {
                    Some(g) => batch.put(k_group_conf(&name), enc(g)),
                    None => batch.delete(k_group_conf(&name)),
                }
            }
            for key in std::mem::take(&mut st.dirty_groups) {
                match st.groups.get(&key) {
                    Some(g) => batch.put(k_group(&key), enc(g)),
                    None => batch.delete(k_group(&key)),
                }
            }
            for (k, v) in st.held.take_dirty() {
                match v {
                    Some(v) => batch.put(k, v),
                    None => batch.delete(k),
                }
            }
            put_applied(&mut batch, &st.last_applied);
            batch.put(K_MEMBERSHIP, enc(&st.membership));
            let removals: Vec<PathBuf> = std::mem::take(&mut st.pending_removals)
                .into_iter()
                .filter(|(name, _)| !st.topics.contains_key(name))
                .map(|(_, p)| p)
                .collect();
            (files, removals)
        };
        for f in files {
            f.sync_data()?;
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        for dir in removals {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        Ok(())
    }

    /// Reads messages of a queue by offset, from the mapped CommitLog.
    pub fn read_messages(&self, topic: &str, queue: u32, offsets: &[u64]) -> Result<Vec<ReadMessage>> {
        let records: Vec<(u64, CqRecord)> = {
            let st = self.read();
            let q = st
                .queues
                .get(&(topic.to_string(), queue))
                .ok_or_else(|| BrokerError::TopicNotFound(format!("{topic} queue {queue}")))?;
            // Messages retention removed are skipped.
            let floor = self.log.first_pos();
            offsets.iter().filter_map(|&o| q.get(o).map(|r| (o, r))).filter(|(_, r)| r.pos >= floor).collect()
        };
        let mut out = Vec::with_capacity(records.len());
        for (offset, r) in records {
            let slice = self.log.read_slice(r.pos, r.size as usize)?;
            let raw = slice.into_bytes();
            let message = StoredMessage::decode(raw.clone())
                .map_err(|e| BrokerError::Corrupt(format!("message {topic}/{queue}/{offset} at {}: {e}", r.pos)))?;
            if crc32fast::hash(&message.body) != message.body_crc32 {
                return Err(BrokerError::Corrupt(format!(
                    "message {topic}/{queue}/{offset} at position {}: body CRC mismatch",
                    r.pos
                )));
            }
            out.push(ReadMessage { queue, offset, pos: r.pos, message, raw });
        }
        Ok(out)
    }

    /// CommitLog position of a queue's message, from its ConsumeQueue record
    /// alone (no read of the message).
    pub fn message_position(&self, topic: &str, queue: u32, offset: u64) -> Option<u64> {
        self.read().queues.get(&(topic.to_string(), queue))?.get(offset).map(|r| r.pos)
    }

    /// (min, max) offsets of a queue; below min, retention removed the messages.
    pub fn queue_range(&self, topic: &str, queue: u32) -> Option<(u64, u64)> {
        let st = self.read();
        let floor = self.log.first_pos();
        st.queues.get(&(topic.to_string(), queue)).map(|q| (q.first_offset_at_or_after(floor), q.max_offset()))
    }

    /// Earliest time an in-flight message of these queues becomes visible.
    pub fn next_visible_ms(&self, group: &str, topic: &str, queues: &[u32]) -> Option<u64> {
        let st = self.read();
        queues
            .iter()
            .filter_map(|&q| st.groups.get(&(group.to_string(), topic.to_string(), q)))
            .flat_map(|g| g.inflight.values().map(|i| i.visible_at_ms))
            .min()
    }

    /// What a consumer group has done with the message at `offset` of a
    /// queue, as the admin query shows it, and its delivery attempts.
    pub fn delivery_state(&self, group: &str, topic: &str, queue: u32, offset: u64) -> (String, u32) {
        let st = self.read();
        let Some(g) = st.groups.get(&(group.to_string(), topic.to_string(), queue)) else {
            return ("not delivered".into(), 0);
        };
        if let Some(i) = g.inflight.get(&offset) {
            return ("in flight".into(), i.attempt);
        }
        if g.held.contains(&offset) {
            return ("held (FIFO: an earlier message of its message group is in flight)".into(), 0);
        }
        if offset >= g.pop_offset {
            return ("not delivered".into(), 0);
        }
        match st.held.dead_letter_of(group, topic, queue, offset) {
            Some((dlq_offset, o)) => {
                (format!("dead-lettered ({} at offset {dlq_offset})", dlq_topic(group)), o.attempts)
            }
            None => ("consumed".into(), 0),
        }
    }

    /// (topic, queue, offset) of messages with this id (a resent or
    /// duplicated message may be stored more than once), at most `limit`.
    pub fn find_by_id(&self, id: &str, limit: usize) -> Result<Vec<(String, u32, u64)>> {
        let found = self.index_rows(format!("k/\x01{id}\0").as_bytes(), limit)?;
        Ok(found
            .into_iter()
            .filter_map(|rest| {
                // <topic> \0 queue offset
                let zero = rest.iter().position(|b| *b == 0)?;
                let (q, o) = queue_offset(&rest[zero + 1..])?;
                Some((String::from_utf8_lossy(&rest[..zero]).to_string(), q, o))
            })
            .collect())
    }

    /// When the next delayed message is due (the leader's timer, every tick).
    pub fn next_delay_due_ms(&self) -> Option<u64> {
        self.read().held.next_due_ms()
    }

    /// Whether a half message is due for a check-back at `now_ms` (looks at
    /// every half message: the leader asks at most once a second).
    pub fn check_due(&self, now_ms: u64, check_interval_ms: u64) -> bool {
        self.read().held.halves.values().any(|h| Held::check_due_ms(h, check_interval_ms) <= now_ms)
    }

    /// The lowest log index a held (delayed or half) message sits in.
    pub fn held_min_index(&self) -> Option<u64> {
        self.read().held.min_index()
    }

    /// A held half message, for a check-back.
    pub fn half(&self, tx: &TxId) -> Option<(HeldMessage, StoredMessage)> {
        let h = self.read().held.halves.get(tx)?.msg.clone();
        let m = self.stored_at(h.pos, h.size)?;
        Some((h, m))
    }

    /// A group's dead letters from `from`: (offset, origin, message).
    pub fn dead_letters(&self, group: &str, from: u64, max: usize) -> Result<(Vec<DeadLetter>, u64)> {
        let dlq = dlq_topic(group);
        let end = self.queue_range(&dlq, 0).map(|r| r.1).unwrap_or(0);
        let offsets: Vec<u64> = (from..end.min(from.saturating_add(max as u64))).collect();
        let read = if offsets.is_empty() { Vec::new() } else { self.read_messages(&dlq, 0, &offsets)? };
        let st = self.read();
        let out = read
            .into_iter()
            .filter_map(|r| st.held.dead.get(&(group.to_string(), r.offset)).cloned().map(|o| (r.offset, o, r)))
            .collect();
        Ok((out, end))
    }

    /// (queue, offset) of messages carrying `key`, at most `limit`.
    pub fn find_by_key(&self, topic: &str, key: &str, limit: usize) -> Result<Vec<(u32, u64)>> {
        let found = self.index_rows(format!("k/{topic}\0{key}\0").as_bytes(), limit)?;
        Ok(found.into_iter().filter_map(|rest| queue_offset(&rest)).collect())
    }

    /// What follows `prefix` in the index rows that start with it, at most `limit`.
    fn index_rows(&self, prefix: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for item in rows(&self.db, prefix).take(limit) {
            let (k, _) = item?;
            out.push(k[prefix.len()..].to_vec());
        }
        Ok(out)
    }

    /// Builds a snapshot of the applied state: tables and ConsumeQueue
    /// records are captured under the state lock (with a RocksDB snapshot
    /// for the key index, whose rows are written under the same lock), then
    /// written out without it. The CommitLog part is shipped at send time.
    pub fn build_snapshot(&self) -> io::Result<RaftSnapshot> {
        let started = std::time::Instant::now();
        let tmp = self.snapshots.temp_dir("tmp")?;
        let (state, cqs, db_snap) = {
            let st = self.read();
            let state = SnapState {
                last_applied: st.last_applied,
                membership: st.membership.clone(),
                topics: st.topics.values().cloned().collect(),
                group_confs: st.group_confs.values().cloned().collect(),
                groups: st.groups.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                queues: st.queues.iter().map(|((t, q), c)| (t.clone(), *q, c.max_offset())).collect(),
                messages_applied: st.messages_applied,
                held_rows: st.held.rows(),
            };
            let cqs: Vec<(String, u32, Vec<u8>)> =
                st.queues.iter().map(|((t, q), c)| (t.clone(), *q, c.raw_records())).collect();
            (state, cqs, self.db.snapshot())
        };
        snapshot::write_file(&tmp.join(snapshot::STATE_FILE), &snapshot::encode(&state))?;
        for (t, q, raw) in &cqs {
            snapshot::write_file(&snapshot::cq_path(&tmp, t, *q), raw)?;
        }
        let mut keys = snapshot::KeyWriter::create(&tmp)?;
        for item in db_snap.iterator(rocksdb::IteratorMode::From(b"k/", rocksdb::Direction::Forward)) {
            let (k, _) = item.map_err(io::Error::other)?;
            if !k.starts_with(b"k/") {
                break;
            }
            keys.push(&k)?;
        }
        let key_rows = keys.rows;
        keys.finish()?;
        drop(db_snap);
        let last = state.last_applied;
        let meta = RaftSnapshotMeta { last_log_id: last, last_membership: state.membership.clone() };
        let dir = self.snapshots.seal(&tmp, &meta)?;
        tracing::info!(
            last = ?last, queues = cqs.len(), key_rows, ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        Ok(RaftSnapshot { meta, snapshot: SnapshotDir { dir } })
    }

    /// Whether the local log holds entry `last` ending at `end_pos`: then it
    /// is byte-identical to the sender's up to there (same entries, same
    /// layout), and the snapshot's positions are valid here.
    fn log_matches(&self, last: &LogId, end_pos: u64) -> bool {
        let Ok((pos, len)) = self.log.position_of(last.index) else { return false };
        let Ok(r) = self.log.read(last.index) else { return false };
        r.term == last.leader_id.term && r.leader_node == last.leader_id.node_id && pos + u64::from(len) == end_pos
    }

    /// Installs a snapshot: one received from the leader (`header.bin`,
    /// `sm/`, `log/`), or our own current one at restart.
    ///
    /// A received one first makes the log hold the sender's bytes up to the
    /// snapshot's last entry: kept if the local log already matches there
    /// (never dropping entries this node acknowledged past it), else
    /// replaced by the shipped segments. Then the state machine part becomes
    /// the current snapshot, and the state is loaded from it.
    pub fn install_snapshot(&self, meta: &RaftSnapshotMeta, dir: &Path) -> io::Result<()> {
        let last = meta
            .last_log_id
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a snapshot without a last log id"))?;
        let header_path = dir.join(snapshot::HEADER_FILE);
        let sm_dir = if header_path.exists() {
            let header: snapshot::TransferHeader = snapshot::read_file(&header_path)?;
            if self.log_matches(&last, header.log_end_pos) {
                tracing::info!(?last, "local log already holds the snapshot's entries; keeping it");
            } else {
                self.log
                    .replace_with(&dir.join(snapshot::LOG_PART), header.log_purged, header.log_end_pos)
                    .map_err(io::Error::other)?;
                // Either the log holds entry L where the sender has it, or
                // every entry up to L is purged and the log continues at the
                // sender's position.
                let all_purged = self.log.last_entry().is_none()
                    && self.log.purged().is_some_and(|p| p.index >= last.index)
                    && self.log.end_pos() == header.log_end_pos;
                if !all_purged && !self.log_matches(&last, header.log_end_pos) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("shipped segments do not end with entry {last} at {}", header.log_end_pos),
                    ));
                }
            }
            let sealed = self.snapshots.seal(&dir.join(snapshot::SM_PART), meta)?;
            std::fs::remove_dir_all(dir)?;
            sealed
        } else {
            dir.to_path_buf()
        };
        self.load_snapshot_state(&sm_dir, last)
    }

    /// Replaces the in-memory state, the ConsumeQueue files and RocksDB with
    /// a snapshot's. RocksDB is cleared first and the applied id is written
    /// last, so a crash part way leaves no applied id and the next start
    /// installs the (already current) snapshot again.
    fn load_snapshot_state(&self, sm_dir: &Path, last: LogId) -> io::Result<()> {
        let _one = self.checkpoint_lock.lock().unwrap_or_else(|e| e.into_inner());
        let state: SnapState = snapshot::read_file(&sm_dir.join(snapshot::STATE_FILE))?;
        if state.last_applied != Some(last) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot state is at {:?}, its meta says {last}", state.last_applied),
            ));
        }
        let mut st = self.write();
        st.queues.clear();
        if self.cq_root.exists() {
            std::fs::remove_dir_all(&self.cq_root)?;
        }
        let mut queues = HashMap::new();
        for (t, q, n) in &state.queues {
            let raw = std::fs::read(snapshot::cq_path(sm_dir, t, *q))?;
            if raw.len() as u64 != n * crate::cq::RECORD_LEN as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("snapshot queue {t}/{q}: {} bytes for {n} records", raw.len()),
                ));
            }
            let mut cq = ConsumeQueue::open(&self.cq_root.join(t).join(q.to_string()), 0).map_err(io::Error::other)?;
            cq.append_raw(&raw).map_err(io::Error::other)?;
            for f in cq.take_dirty() {
                f.sync_data()?;
            }
            queues.insert((t.clone(), *q), cq);
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        let mut clear = rocksdb::WriteBatch::default();
        clear.delete_range(b"\x00".to_vec(), b"\xff".to_vec());
        self.db.write_opt(clear, &wo).map_err(io::Error::other)?;
        let mut batch = rocksdb::WriteBatch::default();
        let mut unique = UniqueRows::default();
        let rows = snapshot::for_each_key(sm_dir, |row| {
            if !row.starts_with(b"k/") {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a key-index row without its prefix"));
            }
            unique.push(&mut batch, &row);
            batch.put(row, b"");
            if batch.len() >= 10_000 {
                self.db.write(std::mem::take(&mut batch)).map_err(io::Error::other)?;
            }
            Ok(())
        })?;
        for t in &state.topics {
            batch.put(k_topic(&t.name), enc(t));
        }
        for g in &state.group_confs {
            batch.put(k_group_conf(&g.name), enc(g));
        }
        for (t, q, n) in &state.queues {
            batch.put(k_queue(t, *q), enc(n));
        }
        for (k, g) in &state.groups {
            batch.put(k_group(k), enc(g));
        }
        let mut held = Held::default();
        for (k, v) in &state.held_rows {
            held.load_row(k, v).map_err(io::Error::other)?;
            batch.put(k, v);
        }
        put_applied(&mut batch, &state.last_applied);
        batch.put(K_MEMBERSHIP, enc(&state.membership));
        self.db.write_opt(batch, &wo).map_err(io::Error::other)?;
        st.held = held;

        st.queues = queues;
        st.topics = state.topics.into_iter().map(|t| (t.name.clone(), t)).collect();
        st.group_confs = state.group_confs.into_iter().map(|g| (g.name.clone(), g)).collect();
        st.dirty_group_confs.clear();
        st.groups = state.groups.into_iter().collect();
        st.membership = state.membership;
        st.last_applied = state.last_applied;
        st.messages_applied = state.messages_applied;
        st.dirty_topics.clear();
        st.deleted_topics.clear();
        st.dirty_queues.clear();
        st.dirty_groups.clear();
        st.pending_removals.clear();
        drop(st);
        self.applied_tx.send_replace(last.index);
        self.activity.notify_waiters();
        tracing::info!(%last, key_rows = rows, "snapshot installed");
        Ok(())
    }

    /// Applies one committed entry: its response, and whether consumers
    /// waiting for messages should look again. A command that does not
    /// decode is refused (the same way on every node), never fatal.
    pub(crate) fn apply_entry(
        &self,
        entry: openraft::type_config::alias::EntryOf<TypeConfig>,
    ) -> Result<(Response, bool)> {
        let index = entry.log_id.index;
        let mut st = self.write();
        if let Some(l) = st.last_applied {
            assert!(index > l.index, "entry {index} applied after {}", l.index);
        }
        let mut wake = false;
        let r = match entry.payload {
            EntryPayload::Blank => Response::Done,
            EntryPayload::Membership(m) => {
                st.membership = StoredMembership::new(Some(entry.log_id), m);
                Response::Done
            }
            EntryPayload::Normal(data) => match command::decode(&data.0) {
                Err(e) => Response::Refused { code: RefusedCode::BadRequest, message: format!("entry {index}: {e}") },
                Ok(Command::Send(b)) => {
                    wake = true;
                    let mut keys = rocksdb::WriteBatch::default();
                    let r = self.apply_send(&mut st, index, b, &mut keys)?;
                    // Key rows are written before the applied id moves, so a
                    // checkpoint never covers keys not yet written.
                    if !keys.is_empty() {
                        self.db.write(keys)?;
                    }
                    r
                }
                Ok(Command::Control(c)) => {
                    wake = matches!(
                        c,
                        Control::ChangeInvisible { .. }
                            | Control::Ack { .. }
                            | Control::UpdateOffset { .. }
                            | Control::Deliver { .. }
                            | Control::EndTransaction { .. }
                            | Control::ResendDeadLetter { .. }
                    );
                    let mut keys = rocksdb::WriteBatch::default();
                    let r = self.apply_control(&mut st, index, c, &mut keys)?;
                    if !keys.is_empty() {
                        self.db.write(keys)?;
                    }
                    if let Response::Checked { txs } = &r
                        && !txs.is_empty()
                    {
                        // Nobody listening is fine.
                        let _ = self.tx_checks.send(txs.clone());
                    }
                    r
                }
            },
        };
        st.last_applied = Some(entry.log_id);
        drop(st);
        self.applied_tx.send_replace(index);
        Ok((r, wake))
    }

    fn apply_send(
        &self,
        st: &mut SmState,
        index: u64,
        batch: command::SendBatch,
        keys: &mut rocksdb::WriteBatch,
    ) -> Result<Response> {
        let key = (batch.topic.clone(), batch.queue);
        if !st.topics.contains_key(&batch.topic) {
            return Ok(Response::Refused {
                code: RefusedCode::TopicNotFound,
                message: format!("topic {} not found", batch.topic),
            });
        }
        if !st.queues.contains_key(&key) {
            return Ok(Response::Refused {
                code: RefusedCode::BadQueue,
                message: format!("topic {} has no queue {}", batch.topic, batch.queue),
            });
        }
        let (entry_pos, _) = self.log.position_of(index)?;
        // Everything is checked before anything changes: a refused batch
        // leaves no trace.
        let mut parsed = Vec::with_capacity(batch.messages.len());
        for (off, bytes) in &batch.messages {
            // A malformed message is refused the same way on every node; it
            // must never stop the state machine.
            let Ok(m) = StoredMessage::decode(bytes.clone()) else {
                return Ok(Response::Refused {
                    code: RefusedCode::BadRequest,
                    message: format!("entry {index}: a message does not decode"),
                });
            };
            if m.topic != batch.topic {
                return Ok(Response::Refused {
                    code: RefusedCode::BadRequest,
                    message: format!("entry {index}: message topic differs from the batch"),
                });
            }
            let record = CqRecord {
                pos: entry_pos + HEADER_LEN as u64 + u64::from(*off),
                size: bytes.len() as u32,
                tag_hash: tag_hash(&m.tag),
            };
            parsed.push((record, m));
        }
        // Every message is checked against the state before this batch (two
        // copies inside one batch are both stored, as a retry never shares
        // a batch with its original): one multi-get for the whole batch.
        let checked: Vec<(usize, &StoredMessage)> = parsed
            .iter()
            .enumerate()
            .filter(|(_, (_, m))| command::placement(m) == Placement::Queue && !m.message_id.is_empty())
            .map(|(slot, (_, m))| (slot, m))
            .collect();
        let found = self.db.multi_get(checked.iter().map(|(_, m)| k_unique(&batch.topic, &m.message_id)));
        let mut duplicates = Vec::new();
        for ((slot, m), row) in checked.iter().zip(found) {
            if let Some((q, o)) = self.copy_from_row(st, &batch.topic, &m.message_id, row?.as_deref())? {
                duplicates.push((*slot as u32, q, o));
            }
        }
        let q = st.queues.get_mut(&key).expect("checked");
        let first_offset = q.max_offset();
        let mut records = Vec::with_capacity(parsed.len());
        let mut ids_here: HashSet<&str> = HashSet::with_capacity(parsed.len());
        let mut held = Vec::new();
        for (slot, (record, m)) in parsed.iter().enumerate() {
            match command::placement(m) {
                Placement::Queue if duplicates.iter().any(|d| d.0 == slot as u32) => {}
                Placement::Queue => {
                    let offset = first_offset + records.len() as u64;
                    // The first copy of an id in this batch gets its dedupe row.
                    let first_here = ids_here.insert(&m.message_id);
                    index_message(keys, &batch.topic, batch.queue, offset, m, first_here);
                    records.push(*record);
                }
                p => held.push((slot as u32, p, record, m)),
            }
        }
        // One write for the batch's records (they are consecutive offsets).
        q.append(&records)?;
        let count = records.len() as u32;
        for (slot, p, r, m) in held {
            let id = TxId { index, slot };
            let msg = HeldMessage {
                topic: batch.topic.clone(),
                queue: batch.queue,
                pos: r.pos,
                size: r.size,
                tag_hash: r.tag_hash,
                store_ms: m.store_timestamp_ms.max(0) as u64,
                delivery_ms: m.delivery_timestamp_ms.max(0) as u64,
            };
            match p {
                Placement::Delayed => st.held.put_delayed(id, msg),
                _ => st.held.put_half(id, Half { msg, checks: 0, next_check_ms: 0 }),
            }
        }
        st.dirty_queues.insert(key);
        st.messages_applied += u64::from(count);
        Ok(Response::Sent { queue: batch.queue, first_offset, count, duplicates })
    }

    /// Whether (queue, offset) of a topic is a stored message: dedupe rows
    /// pointing past a queue's current end are ignored: they were written
    /// before a crash by the very entries being applied again now (rows go
    /// to RocksDB at apply, the queue lengths at the checkpoint), so replay
    /// decides exactly as the first apply did.
    fn is_stored(st: &SmState, topic: &str, queue: u32, offset: u64) -> bool {
        st.queues.get(&(topic.to_string(), queue)).is_some_and(|c| offset < c.max_offset())
    }

    /// Where a message with this id is already stored in a ConsumeQueue of
    /// the topic (see [`k_unique`]).
    fn stored_copy(&self, st: &SmState, topic: &str, id: &str) -> Result<Option<(u32, u64)>> {
        if id.is_empty() {
            return Ok(None);
        }
        let row = self.db.get(k_unique(topic, id))?;
        self.copy_from_row(st, topic, id, row.as_deref())
    }

    /// The stored copy a dedupe row points at. A row pointing at no stored
    /// message (a topic deleted and created again, or entries applied again
    /// after a crash) does not decide: the id index rows do, scanned as
    /// every node scans them, so the answer never depends on which copy a
    /// node's dedupe row happens to name (a snapshot rebuild may name
    /// another).
    fn copy_from_row(&self, st: &SmState, topic: &str, id: &str, row: Option<&[u8]>) -> Result<Option<(u32, u64)>> {
        match row.and_then(queue_offset) {
            None => Ok(None),
            Some((q, o)) if Self::is_stored(st, topic, q, o) => Ok(Some((q, o))),
            Some(_) => {
                for rest in self.index_rows(&k_id_prefix(id, topic), 16)? {
                    if let Some((q, o)) = queue_offset(&rest)
                        && Self::is_stored(st, topic, q, o)
                    {
                        return Ok(Some((q, o)));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Appends held messages to their ConsumeQueues (one whose topic or
    /// queue is gone is dropped). As in a send batch, every dedupe lookup is
    /// made against the state before this entry (all of them before the
    /// first append) and the first copy of an id released here gets the
    /// dedupe row. So a replay after a crash decides as the first apply did:
    /// the rows that apply left behind point past the queues' ends until
    /// the appends, and a later copy in the same entry cannot take the row
    /// (a read error, too, leaves the queues as they were).
    fn release(&self, st: &mut SmState, keys: &mut rocksdb::WriteBatch, msgs: &[HeldMessage]) -> Result<()> {
        let mut checked = Vec::with_capacity(msgs.len());
        for m in msgs {
            if !st.queues.contains_key(&(m.topic.clone(), m.queue)) {
                tracing::info!(topic = %m.topic, queue = m.queue, "held message dropped: its queue is gone");
                continue;
            }
            // The message and whether a copy of its id is kept already.
            let stored = match self.stored_at(m.pos, m.size) {
                Some(s) => {
                    let kept = self.stored_copy(st, &m.topic, &s.message_id)?.is_some();
                    Some((s, kept))
                }
                None => None,
            };
            checked.push((m, stored));
        }
        let mut ids_here: HashSet<(&str, String)> = HashSet::new();
        for (m, stored) in checked {
            let key = (m.topic.clone(), m.queue);
            let q = st.queues.get_mut(&key).expect("checked above");
            let offset = q.max_offset();
            q.append(&[CqRecord { pos: m.pos, size: m.size, tag_hash: m.tag_hash }])?;
            if let Some((stored, kept)) = stored {
                let unique = !kept && ids_here.insert((&m.topic, stored.message_id.clone()));
                index_message(keys, &m.topic, m.queue, offset, &stored, unique);
            }
            st.dirty_queues.insert(key);
            st.messages_applied += 1;
        }
        Ok(())
    }

    /// The message at a CommitLog position, if its bytes are still there
    /// (retention may have removed them) and decode.
    fn stored_at(&self, pos: u64, size: u32) -> Option<StoredMessage> {
        if pos < self.log.first_pos() {
            return None;
        }
        let raw = self.log.read_slice(pos, size as usize).ok()?.into_bytes();
        StoredMessage::decode(raw).ok()
    }

    /// What a pop needs of the message at `offset` of a queue.
    fn msg_info(&self, cq: Option<&ConsumeQueue>, offset: u64, filter: Option<&Filter>) -> MsgInfo {
        let stored = cq.and_then(|q| q.get(offset)).and_then(|r| self.stored_at(r.pos, r.size));
        match stored {
            Some(m) => MsgInfo {
                passes: filter.is_none_or(|f| f.matches(&m.tag, &m.properties)),
                message_group: m.message_group,
            },
            // Bytes gone: unordered, and not filtered out (the read finds
            // nothing and the pop acks it).
            None => MsgInfo { message_group: String::new(), passes: true },
        }
    }

    /// Creates the queues `old..queues` of a topic and records its config.
    fn ensure_topic(&self, st: &mut SmState, name: &str, queues: u32, message_type: i32) -> Result<()> {
        let old = st.topics.get(name).map(|t| t.queues).unwrap_or(0);
        for q in old..queues {
            let cq = ConsumeQueue::open(&self.cq_root.join(name).join(q.to_string()), 0)?;
            st.queues.insert((name.to_string(), q), cq);
            st.dirty_queues.insert((name.to_string(), q));
        }
        st.topics.insert(name.to_string(), TopicConf { name: name.to_string(), queues: queues.max(old), message_type });
        st.deleted_topics.remove(name);
        st.dirty_topics.insert(name.to_string());
        Ok(())
    }

    /// Moves message `offset` of `topic`/`queue` to `%DLQ%<group>` (a
    /// record pointing at the same bytes) and remembers where it came from.
    fn dead_letter(
        &self,
        st: &mut SmState,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
        attempts: u32,
    ) -> Result<()> {
        let Some(record) = st.queues.get(&(topic.to_string(), queue)).and_then(|q| q.get(offset)) else {
            return Ok(());
        };
        let dlq = dlq_topic(group);
        if !st.topics.contains_key(&dlq) {
            self.ensure_topic(st, &dlq, 1, 0)?;
        }
        let key = (dlq, 0);
        let q = st.queues.get_mut(&key).expect("created");
        let dlq_offset = q.max_offset();
        q.append(&[record])?;
        st.dirty_queues.insert(key);
        st.held.put_dead(group, dlq_offset, DeadOrigin { topic: topic.to_string(), queue, offset, attempts });
        tracing::info!(group, topic, queue, offset, attempts, dlq_offset, "message moved to the dead-letter queue");
        Ok(())
    }

    /// Whether a Pop with these rules would change anything (hand out,
    /// give up on, skip or hold a message): a dry run on copies.
    pub fn poppable_with(
        &self,
        group: &str,
        topic: &str,
        queues: &[u32],
        now_ms: u64,
        filter: Option<&command::FilterSpec>,
        default_max_attempts: u32,
    ) -> bool {
        let st = self.read();
        let conf = st.group_confs.get(group);
        let fifo = conf.is_some_and(|c| c.fifo);
        let filter = filter.and_then(|f| parse_filter(f).ok()).filter(|f| !f.is_all());
        let max_attempts = max_attempts_of(conf, default_max_attempts);
        queues.iter().any(|&q| {
            let cq = st.queues.get(&(topic.to_string(), q));
            let max = cq.map(|c| c.max_offset()).unwrap_or(0);
            let g = st.groups.get(&(group.to_string(), topic.to_string(), q));
            if !fifo && filter.is_none() {
                return match g {
                    None => max > 0,
                    Some(g) => g.pop_offset < max || g.inflight.values().any(|i| i.visible_at_ms <= now_ms),
                };
            }
            let mut g = g.cloned().unwrap_or_default();
            let rules = PopRules {
                now_ms,
                invisible_ms: 1,
                pop_index: 0,
                max: 1,
                fifo,
                max_attempts,
                filtered: filter.is_some(),
            };
            crate::pop::pop_queue(&mut g, q, max, &rules, &mut |o| self.msg_info(cq, o, filter.as_ref())).changed
        })
    }

    fn apply_control(
        &self,
        st: &mut SmState,
        index: u64,
        c: Control,
        keys: &mut rocksdb::WriteBatch,
    ) -> Result<Response> {
        let refused = |code, message: String| Ok(Response::Refused { code, message });
        match c {
            Control::CreateTopic { name, queues, message_type, update } => {
                // Checked again here: a command may come from any admin client.
                if let Err(e) = check_name("topic", &name) {
                    return refused(RefusedCode::BadRequest, e.to_string());
                }
                if queues == 0 || queues > 1024 {
                    return refused(RefusedCode::BadRequest, format!("queues must be 1 to 1024, got {queues}"));
                }
                if let Some(t) = st.topics.get(&name) {
                    if !update {
                        return refused(RefusedCode::TopicExists, format!("topic {name} exists"));
                    }
                    if queues < t.queues {
                        return refused(
                            RefusedCode::BadRequest,
                            format!("topic {name} has {} queues; queues cannot be removed", t.queues),
                        );
                    }
                }
                self.ensure_topic(st, &name, queues, message_type)?;
                Ok(Response::Done)
            }
            Control::DeleteTopic { name } => {
                let Some(t) = st.topics.remove(&name) else {
                    return refused(RefusedCode::TopicNotFound, format!("topic {name} not found"));
                };
                for q in 0..t.queues {
                    st.queues.remove(&(name.clone(), q));
                    st.dirty_queues.remove(&(name.clone(), q));
                }
                st.pending_removals.push((name.clone(), self.cq_root.join(&name)));
                let gone: Vec<GroupKey> = st.groups.keys().filter(|g| g.1 == name).cloned().collect();
                for g in gone {
                    st.groups.remove(&g);
                    st.dirty_groups.insert(g);
                }
                st.dirty_topics.remove(&name);
                st.deleted_topics.insert(name);
                Ok(Response::Done)
            }
            Control::Pop { group, topic, queues, max, invisible_ms, now_ms, filter, max_attempts } => {
                if st.group_confs.get(&group).is_some_and(|g| !g.consume_enabled) {
                    return refused(RefusedCode::ConsumeDisabled, format!("consumption by group {group} is disabled"));
                }
                // Bounded whatever the proposer asked for.
                let max = max.min(1024) as usize;
                let Some(t) = st.topics.get(&topic) else {
                    return refused(RefusedCode::TopicNotFound, format!("topic {topic} not found"));
                };
                if let Some(q) = queues.iter().find(|q| **q >= t.queues) {
                    return refused(RefusedCode::BadQueue, format!("topic {topic} has no queue {q}"));
                }
                let filter = match filter.as_ref().map(parse_filter).transpose() {
                    Ok(f) => f.filter(|f| !f.is_all()),
                    Err(e) => return refused(RefusedCode::BadFilter, e),
                };
                let conf = st.group_confs.get(&group);
                let rules = PopRules {
                    now_ms,
                    invisible_ms,
                    pop_index: index,
                    max,
                    fifo: conf.is_some_and(|c| c.fifo),
                    max_attempts: max_attempts_of(conf, max_attempts),
                    filtered: filter.is_some(),
                };
                let mut out = Vec::new();
                let mut dead = Vec::new();
                let n = queues.len().max(1);
                // Rotate the starting queue so no queue starves.
                for k in 0..queues.len() {
                    let q = queues[(index as usize + k) % n];
                    if out.len() >= max {
                        break;
                    }
                    let gkey = (group.clone(), topic.clone(), q);
                    let existed = st.groups.contains_key(&gkey);
                    let mut g = st.groups.remove(&gkey).unwrap_or_default();
                    let cq = st.queues.get(&(topic.clone(), q));
                    let max_offset = cq.map(|c| c.max_offset()).unwrap_or(0);
                    let rules = PopRules { max: max - out.len(), ..rules };
                    let r = crate::pop::pop_queue(&mut g, q, max_offset, &rules, &mut |o| {
                        self.msg_info(cq, o, filter.as_ref())
                    });
                    // Nothing changed and nothing stored: leave no empty entry
                    // behind (a restarted replica would not have it).
                    if r.changed || existed {
                        st.groups.insert(gkey.clone(), g);
                    }
                    if r.changed {
                        st.dirty_groups.insert(gkey);
                    }
                    out.extend(r.popped);
                    dead.extend(r.dead.into_iter().map(|(o, a)| (q, o, a)));
                }
                for (q, o, a) in dead {
                    self.dead_letter(st, &group, &topic, q, o, a)?;
                }
                Ok(Response::Popped { messages: out })
            }
            Control::Deliver { now_ms } => {
                let due: Vec<HeldMessage> =
                    st.held.take_due(now_ms, command::MAX_MOVED).into_iter().map(|(_, m)| m).collect();
                self.release(st, keys, &due)?;
                Ok(Response::Done)
            }
            Control::EndTransaction { tx, commit, now_ms, topic } => {
                if !topic.is_empty() && st.held.halves.get(&tx).is_some_and(|h| h.msg.topic != topic) {
                    return refused(
                        RefusedCode::TransactionNotFound,
                        format!("transaction {}.{} is not of topic {topic}", tx.index, tx.slot),
                    );
                }
                let Some(h) = st.held.remove_half(&tx) else {
                    return refused(
                        RefusedCode::TransactionNotFound,
                        format!("transaction {}.{} is unknown or already resolved", tx.index, tx.slot),
                    );
                };
                if !commit {
                    return Ok(Response::Done);
                }
                if h.msg.delivery_ms > now_ms {
                    st.held.put_delayed(tx, h.msg);
                } else {
                    self.release(st, keys, std::slice::from_ref(&h.msg))?;
                }
                Ok(Response::Done)
            }
            Control::CheckTransactions { now_ms, interval_ms, max_checks } => {
                let due: Vec<TxId> = st
                    .held
                    .halves
                    .iter()
                    .filter(|(_, h)| Held::check_due_ms(h, interval_ms) <= now_ms)
                    .take(command::MAX_MOVED)
                    .map(|(id, _)| *id)
                    .collect();
                let mut txs = Vec::with_capacity(due.len());
                for id in due {
                    let Some(mut h) = st.held.remove_half(&id) else { continue };
                    if h.checks >= max_checks {
                        tracing::info!(tx = ?id, checks = h.checks, "half message rolled back: never resolved");
                        continue;
                    }
                    h.checks += 1;
                    h.next_check_ms = now_ms.saturating_add(interval_ms);
                    st.held.put_half(id, h);
                    txs.push(id);
                }
                Ok(Response::Checked { txs })
            }
            Control::ToDeadLetter { group, topic, queue, offset, pop_index } => {
                let gkey = (group.clone(), topic.clone(), queue);
                let attempts = match st.groups.get_mut(&gkey) {
                    Some(g) if g.inflight.get(&offset).is_some_and(|i| i.pop_index == pop_index) => {
                        let i = g.inflight.remove(&offset).expect("checked");
                        g.recompute_committed();
                        i.attempt
                    }
                    _ => {
                        return refused(
                            RefusedCode::InvalidReceiptHandle,
                            format!("offset {offset}: receipt handle is stale or already acked"),
                        );
                    }
                };
                st.dirty_groups.insert(gkey);
                self.dead_letter(st, &group, &topic, queue, offset, attempts)?;
                Ok(Response::Done)
            }
            Control::ResendDeadLetter { group, dlq_offset } => {
                let Some(o) = st.held.dead.get(&(group.clone(), dlq_offset)).cloned() else {
                    return refused(RefusedCode::BadRequest, format!("group {group} has no dead letter {dlq_offset}"));
                };
                if !st.queues.contains_key(&(o.topic.clone(), o.queue)) {
                    return refused(RefusedCode::TopicNotFound, format!("topic {} queue {} is gone", o.topic, o.queue));
                }
                let gkey = (group, o.topic, o.queue);
                let g = st.groups.entry(gkey.clone()).or_default();
                // Due at once, and its next delivery is attempt 1. At or past
                // the group's position (it was reset back) it comes anyway.
                if o.offset < g.pop_offset {
                    g.held.remove(&o.offset);
                    g.inflight.insert(o.offset, Inflight { visible_at_ms: 0, attempt: 0, pop_index: 0 });
                    g.committed = g.committed.min(o.offset);
                }
                st.dirty_groups.insert(gkey);
                Ok(Response::Done)
            }
            Control::Renew { group, topic, queue, offset, pop_index, visible_at_ms } => {
                let gkey = (group, topic, queue);
                match st.groups.get_mut(&gkey).and_then(|g| g.inflight.get_mut(&offset)) {
                    Some(i) if i.pop_index == pop_index => {
                        i.visible_at_ms = visible_at_ms;
                        st.dirty_groups.insert(gkey);
                        Ok(Response::Done)
                    }
                    _ => refused(
                        RefusedCode::InvalidReceiptHandle,
                        format!("offset {offset}: receipt handle is stale or already acked"),
                    ),
                }
            }
            Control::ClientHeartbeat { group, client_id, now_ms } => {
                st.held.client_seen(&group, &client_id, now_ms);
                Ok(Response::Done)
            }
            Control::ClientGone { group, client_id } => {
                st.held.client_gone(&group, &client_id);
                Ok(Response::Done)
            }
            Control::Ack { group, topic, queue, offset, pop_index } => {
                let gkey = (group, topic, queue);
                let Some(g) = st.groups.get_mut(&gkey) else {
                    return refused(RefusedCode::InvalidReceiptHandle, "no such delivery".into());
                };
                match g.inflight.get(&offset) {
                    Some(i) if i.pop_index == pop_index => {
                        g.inflight.remove(&offset);
                        g.recompute_committed();
                        st.dirty_groups.insert(gkey);
                        Ok(Response::Done)
                    }
                    // Already settled (a client retrying an ack whose first
                    // attempt was applied): nothing to do, and not an error.
                    None if offset < g.pop_offset && !g.held.contains(&offset) => Ok(Response::Done),
                    _ => refused(
                        RefusedCode::InvalidReceiptHandle,
                        format!("offset {offset}: receipt handle is stale or already acked"),
                    ),
                }
            }
            Control::ChangeInvisible { group, topic, queue, offset, pop_index, invisible_ms, now_ms } => {
                let gkey = (group, topic, queue);
                let Some(g) = st.groups.get_mut(&gkey) else {
                    return refused(RefusedCode::InvalidReceiptHandle, "no such delivery".into());
                };
                match g.inflight.get_mut(&offset) {
                    Some(i) if i.pop_index == pop_index => {
                        i.visible_at_ms = now_ms + invisible_ms;
                        i.pop_index = index;
                        let attempt = i.attempt;
                        st.dirty_groups.insert(gkey);
                        Ok(Response::Popped { messages: vec![Popped { queue, offset, attempt }] })
                    }
                    _ => refused(
                        RefusedCode::InvalidReceiptHandle,
                        format!("offset {offset}: receipt handle is stale or already acked"),
                    ),
                }
            }
            Control::UpdateGroup { config } => {
                if let Err(e) = check_name("group", &config.name) {
                    return refused(RefusedCode::BadRequest, e.to_string());
                }
                st.dirty_group_confs.insert(config.name.clone());
                st.group_confs.insert(config.name.clone(), config);
                Ok(Response::Done)
            }
            Control::DeleteGroup { name } => {
                if st.group_confs.remove(&name).is_none() {
                    return refused(RefusedCode::GroupNotFound, format!("group {name} has no configuration"));
                }
                st.dirty_group_confs.insert(name);
                Ok(Response::Done)
            }
            Control::UpdateOffset { group, topic, queue, offset } => {
                if st.topics.get(&topic).is_none_or(|t| queue >= t.queues) {
                    return refused(RefusedCode::BadQueue, format!("topic {topic} has no queue {queue}"));
                }
                // The group's position moves to `offset` (forward as a pull
                // consumer commits, or back for a reset): pops continue from
                // there, and what was in flight is delivered again. Past the
                // queue's end is clamped to it.
                let max_offset = st.queues.get(&(topic.clone(), queue)).map(|c| c.max_offset()).unwrap_or(0);
                let offset = offset.min(max_offset);
                let gkey = (group, topic, queue);
                let g = st.groups.entry(gkey.clone()).or_default();
                g.committed = offset;
                g.pop_offset = offset;
                g.inflight.clear();
                g.held.clear();
                st.dirty_groups.insert(gkey);
                Ok(Response::Done)
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotDir;

    async fn build_snapshot(&mut self) -> std::result::Result<RaftSnapshot, io::Error> {
        let sh = self.shared.clone();
        tokio::task::spawn_blocking(move || sh.build_snapshot()).await.map_err(io::Error::other)?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotDir;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> std::result::Result<(Option<LogId>, StoredMembership), io::Error> {
        let st = self.shared.read();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> std::result::Result<(), io::Error>
    where
        Strm: futures::Stream<Item = std::result::Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let sh = &self.shared;
        let mut any_messages = false;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let (response, wake) = sh.apply_entry(entry).map_err(io::Error::other)?;
            any_messages |= wake;
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if any_messages {
            sh.activity.notify_waiters();
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &RaftSnapshotMeta,
        snapshot: SnapshotDir,
    ) -> std::result::Result<(), io::Error> {
        let sh = self.shared.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || sh.install_snapshot(&meta, &snapshot.dir))
            .await
            .map_err(io::Error::other)?
    }

    async fn get_current_snapshot(&mut self) -> std::result::Result<Option<RaftSnapshot>, io::Error> {
        Ok(self.shared.snapshots.current()?.map(|(meta, dir)| RaftSnapshot { meta, snapshot: SnapshotDir { dir } }))
    }
}

#[cfg(test)]
#[path = "sm_tests.rs"]
mod tests;
