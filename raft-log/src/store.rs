//! openraft's log storage over the [`CommitLog`].
//!
//! [`RaftLogStore`] implements `RaftLogStorage` for any type config that uses
//! [`LogBytes`] as application data, `u64` node ids and terms and openraft's
//! default (advanced) leader ids; see [`LogTypeConfig`].
//!
//! Durability: `append` writes the entries (page cache) and hands the
//! `IOFlushed` callback to the flusher thread. In `sync` mode the flusher runs
//! one fdatasync for all appends that arrived since the previous one (group
//! commit) and only then fires their callbacks, so openraft never counts an
//! entry as persisted before it is on disk. In `async` mode the callback fires
//! at once and the flusher syncs every `flush_interval_ms`. `save_vote` returns
//! only after the vote is durable. The flusher also writes a checkpoint every
//! `checkpoint_interval_ms`.

use std::collections::VecDeque;
use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use openraft::Entry;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::OptionalSend;
use openraft::RaftTypeConfig;
use openraft::impls::Vote;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::IOFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;
use serde::Deserialize;
use serde::Serialize;

use crate::config::FlushMode;
use crate::error::LogError;
use crate::log::CommitLog;
use crate::log::Record;
use crate::log::RecordRef;
use crate::meta::StoredLogId;
use crate::meta::StoredVote;
use crate::record::EntryKind;

/// Application data of a Raft entry: opaque bytes (for RaftMQ, an encoded
/// broker command). A newtype so it can be `Display` for openraft.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LogBytes(pub Bytes);

impl fmt::Debug for LogBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogBytes({} bytes)", self.0.len())
    }
}

impl fmt::Display for LogBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0.len())
    }
}

impl From<Vec<u8>> for LogBytes {
    fn from(v: Vec<u8>) -> Self {
        LogBytes(Bytes::from(v))
    }
}

impl From<&'static str> for LogBytes {
    fn from(s: &'static str) -> Self {
        LogBytes(Bytes::from_static(s.as_bytes()))
    }
}

/// openraft's default leader id with `u64` term and node id.
pub type AdvLeaderId = LeaderId<u64, u64>;

/// The type configs this store serves.
pub trait LogTypeConfig:
    RaftTypeConfig<
        D = LogBytes,
        NodeId = u64,
        Term = u64,
        LeaderId = AdvLeaderId,
        Vote = Vote<AdvLeaderId>,
        Payload = EntryPayload<LogBytes, u64, <Self as RaftTypeConfig>::Node>,
        Entry = Entry<AdvLeaderId, EntryPayload<LogBytes, u64, <Self as RaftTypeConfig>::Node>>,
    >
{
}

impl<C> LogTypeConfig for C where
    C: RaftTypeConfig<
            D = LogBytes,
            NodeId = u64,
            Term = u64,
            LeaderId = AdvLeaderId,
            Vote = Vote<AdvLeaderId>,
            Payload = EntryPayload<LogBytes, u64, <C as RaftTypeConfig>::Node>,
            Entry = Entry<AdvLeaderId, EntryPayload<LogBytes, u64, <C as RaftTypeConfig>::Node>>,
        >
{
}

fn to_log_id(id: StoredLogId) -> LogId<AdvLeaderId> {
    LogId::new(AdvLeaderId { term: id.term, node_id: id.leader_node }, id.index)
}

fn from_log_id(id: &LogId<AdvLeaderId>) -> StoredLogId {
    StoredLogId { term: id.leader_id.term, leader_node: id.leader_id.node_id, index: id.index }
}

fn decode_entry<C: LogTypeConfig>(r: &Record) -> io::Result<C::Entry> {
    let log_id = LogId::new(AdvLeaderId { term: r.term, node_id: r.leader_node }, r.index);
    let payload = match r.kind {
        EntryKind::Blank => EntryPayload::Blank,
        // One copy: an uncommitted entry's bytes may be rewritten after a truncation.
        EntryKind::Normal => EntryPayload::Normal(LogBytes(r.body.to_bytes())),
        EntryKind::Membership => EntryPayload::Membership(serde_json::from_slice(&r.body).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("membership entry {} unreadable: {e}", r.index))
        })?),
    };
    Ok(Entry { log_id, payload })
}

fn range_to_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

type Callback = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Most callbacks waiting for one fdatasync. openraft bounds its in-flight
/// appends far below this; passing it is a bug.
const MAX_WAITING_CALLBACKS: usize = 1 << 20;

struct FlushQueue {
    waiting: VecDeque<(u64, Callback)>,
    shutdown: bool,
}

struct FlushShared {
    log: Arc<CommitLog>,
    queue: Mutex<FlushQueue>,
    wake: Condvar,
}

/// The flusher thread: group commit in `sync` mode, periodic fdatasync in
/// `async` mode, periodic checkpoints in both.
struct Flusher {
    shared: Arc<FlushShared>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    fn start(log: Arc<CommitLog>) -> io::Result<Self> {
        let shared = Arc::new(FlushShared {
            log,
            queue: Mutex::new(FlushQueue { waiting: VecDeque::new(), shutdown: false }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("raft-log-flusher".into()).spawn(move || flush_loop(&s))?;
        Ok(Self { shared, thread: Some(thread) })
    }

    fn register(&self, seq: u64, cb: Callback) {
        if self.shared.log.synced_seq() >= seq {
            cb(Ok(()));
            return;
        }
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        assert!(q.waiting.len() < MAX_WAITING_CALLBACKS, "flush queue over its bound");
        q.waiting.push_back((seq, cb));
        drop(q);
        self.shared.wake.notify_one();
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).shutdown = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn flush_loop(s: &FlushShared) {
    let cfg = s.log.config().clone();
    let checkpoint_every = Duration::from_millis(cfg.checkpoint_interval_ms);
    let flush_every = Duration::from_millis(cfg.flush_interval_ms);
    let mut last_checkpoint = Instant::now();
    loop {
        let (batch, shutdown) = {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            let wait = match cfg.flush_mode {
                FlushMode::Sync => checkpoint_every.saturating_sub(last_checkpoint.elapsed()),
                FlushMode::Async => flush_every,
            };
            if q.waiting.is_empty() && !q.shutdown {
                q = s.wake.wait_timeout(q, wait).unwrap_or_else(|e| e.into_inner()).0;
            }
            (std::mem::take(&mut q.waiting), q.shutdown)
        };
        // Every callback taken was registered after its append, so one sync
        // started now covers them all.
        if !batch.is_empty() || cfg.flush_mode == FlushMode::Async {
            let result = s.log.sync();
            if let Err(e) = &result {
                tracing::error!(error = %e, "fdatasync failed; the log refuses further writes");
            }
            for (seq, cb) in batch {
                match &result {
                    Ok(synced) => {
                        debug_assert!(*synced >= seq, "sync covered {synced}, callback waits for {seq}");
                        cb(Ok(()))
                    }
                    Err(e) => cb(Err(io::Error::other(e.to_string()))),
                }
            }
        }
        if shutdown || last_checkpoint.elapsed() >= checkpoint_every {
            if let Err(e) = s.log.checkpoint() {
                tracing::warn!(error = %e, "checkpoint failed");
            }
            last_checkpoint = Instant::now();
        }
        if shutdown {
            return;
        }
    }
}

/// openraft log storage over a [`CommitLog`]. Drop it to stop the flusher
/// (which syncs and checkpoints on the way out).
pub struct RaftLogStore<C> {
    log: Arc<CommitLog>,
    flusher: Arc<Flusher>,
    _c: PhantomData<fn() -> C>,
}

impl<C> RaftLogStore<C> {
    /// Wraps an open log and starts its flusher thread.
    pub fn new(log: Arc<CommitLog>) -> io::Result<Self> {
        let flusher = Arc::new(Flusher::start(log.clone())?);
        Ok(Self { log, flusher, _c: PhantomData })
    }

    /// The CommitLog, for reading message bytes by position.
    pub fn commit_log(&self) -> &Arc<CommitLog> {
        &self.log
    }
}

impl<C> Clone for RaftLogStore<C> {
    fn clone(&self) -> Self {
        Self { log: self.log.clone(), flusher: self.flusher.clone(), _c: PhantomData }
    }
}

impl<C> Debug for RaftLogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftLogStore").field("log", &self.log).finish()
    }
}

/// Reads entries for openraft's replication.
pub struct LogReader<C> {
    log: Arc<CommitLog>,
    _c: PhantomData<fn() -> C>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, LogError> + Send + 'static) -> io::Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.spawn_blocking(f).await.map_err(io::Error::other)?.map_err(io::Error::from),
        Err(_) => f().map_err(io::Error::from),
    }
}

fn read_entries<C: LogTypeConfig>(log: &CommitLog, range: &impl RangeBounds<u64>) -> io::Result<Vec<C::Entry>> {
    let (start, end) = range_to_bounds(range);
    // Entries up to openraft's purge point are gone for Raft even while their
    // bytes are kept for the ConsumeQueues.
    let raft_first = log.raft_purged().map(|p| p.index + 1).unwrap_or(0);
    let start = start.max(log.first_index()).max(raft_first);
    if start >= end {
        return Ok(Vec::new());
    }
    log.read_range(start, end)?.iter().map(decode_entry::<C>).collect()
}

fn read_vote(log: &CommitLog) -> Option<Vote<AdvLeaderId>> {
    log.vote().map(|v| Vote { leader_id: AdvLeaderId { term: v.term, node_id: v.node_id }, committed: v.committed })
}

impl<C: LogTypeConfig> RaftLogReader<C> for LogReader<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        read_entries::<C>(&self.log, &range)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<AdvLeaderId>>, io::Error> {
        Ok(read_vote(&self.log))
    }
}

impl<C: LogTypeConfig> RaftLogReader<C> for RaftLogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        read_entries::<C>(&self.log, &range)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<AdvLeaderId>>, io::Error> {
        Ok(read_vote(&self.log))
    }
}

impl<C: LogTypeConfig> RaftLogStorage<C> for RaftLogStore<C> {
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let purged_id = self.log.raft_purged();
        let last_id = self
            .log
            .last_entry()
            .map(|l| StoredLogId { term: l.term, leader_node: l.leader_node, index: l.index })
            .max(purged_id);
        let purged = purged_id.map(to_log_id);
        let last = last_id.map(to_log_id);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader { log: self.log.clone(), _c: PhantomData }
    }

    async fn save_vote(&mut self, vote: &Vote<AdvLeaderId>) -> Result<(), io::Error> {
        let v = StoredVote { term: vote.leader_id.term, node_id: vote.leader_id.node_id, committed: vote.committed };
        let log = self.log.clone();
        blocking(move || log.save_vote(v)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<AdvLeaderId>>) -> Result<(), io::Error> {
        self.log.set_committed_hint(committed.as_ref().map(from_log_id));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<AdvLeaderId>>, io::Error> {
        Ok(self.log.committed_hint().map(to_log_id))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<C::Entry> = entries.into_iter().collect();
        let mut memberships: Vec<Vec<u8>> = Vec::new();
        for e in &entries {
            if let EntryPayload::Membership(m) = &e.payload {
                memberships.push(serde_json::to_vec(m).map_err(io::Error::other)?);
            }
        }
        let mut mi = memberships.iter();
        let records: Vec<RecordRef<'_>> = entries
            .iter()
            .map(|e| {
                let (kind, body): (EntryKind, &[u8]) = match &e.payload {
                    EntryPayload::Blank => (EntryKind::Blank, &[]),
                    EntryPayload::Normal(d) => (EntryKind::Normal, &d.0[..]),
                    EntryPayload::Membership(_) => (EntryKind::Membership, &mi.next().expect("encoded")[..]),
                };
                RecordRef {
                    index: e.log_id.index,
                    term: e.log_id.leader_id.term,
                    leader_node: e.log_id.leader_id.node_id,
                    kind,
                    body,
                }
            })
            .collect();
        let outcome = self.log.append(&records)?;
        match self.log.config().flush_mode {
            FlushMode::Sync => self.flusher.register(outcome.seq, Box::new(move |r| callback.io_completed(r))),
            FlushMode::Async => callback.io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId<AdvLeaderId>>) -> Result<(), io::Error> {
        let log = self.log.clone();
        blocking(move || log.truncate_after(last_log_id.map(|l| l.index))).await
    }

    async fn purge(&mut self, log_id: LogId<AdvLeaderId>) -> Result<(), io::Error> {
        let log = self.log.clone();
        let id = from_log_id(&log_id);
        // Logical: message bytes stay until retention removes them.
        blocking(move || log.set_raft_purged(id)).await
    }
}
