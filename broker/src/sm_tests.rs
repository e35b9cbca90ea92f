//! Property tests of the state machine. Random command sequences are applied
//! to one replica, with checkpoints, crash-restarts (state reopened from
//! disk, the entries after its stored applied id applied again, as openraft
//! does) and snapshots (built, installed into a fresh replica that then
//! carries on) along the way. After every step the invariants hold, and every
//! restarted or installed copy equals the replica it replaces.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use proptest::prelude::*;
use raft_log::EntryKind;
use raft_log::LogBytes;
use raft_log::LogConfig;
use raft_log::RecordRef;
use raft_log::StdFs;
use raft_log::store::AdvLeaderId;

use super::*;

const TOPICS: [&str; 2] = ["ta", "tb"];
const GROUPS: [&str; 2] = ["g0", "g1"];

#[derive(Debug, Clone)]
enum Op {
    CreateTopic {
        t: usize,
        queues: u32,
    },
    DeleteTopic {
        t: usize,
    },
    /// kind 0: normal, 1: delayed, 2: half (transactional).
    Send {
        t: usize,
        queue: u32,
        n: usize,
        kind: u8,
        delay_ms: u64,
    },
    Pop {
        g: usize,
        t: usize,
        max: u32,
        invisible_ms: u64,
        filter: Option<String>,
    },
    /// A producer retrying an earlier send (same messages, same ids), to
    /// the same queue or, as a client does after a failover, another one.
    SendAgain {
        pick: usize,
        queue: Option<u32>,
    },
    Deliver,
    EndTx {
        pick: usize,
        commit: bool,
    },
    CheckTx {
        interval_ms: u64,
        max_checks: u32,
    },
    ToDeadLetter {
        pick: usize,
    },
    Resend {
        g: usize,
        offset: u64,
    },
    Heartbeat {
        g: usize,
        c: usize,
    },
    Renew {
        pick: usize,
        ms: u64,
    },
    Ack {
        pick: usize,
    },
    ChangeInvisible {
        pick: usize,
        invisible_ms: u64,
    },
    UpdateOffset {
        g: usize,
        t: usize,
        queue: u32,
        offset: u64,
    },
    UpdateGroup {
        g: usize,
        enabled: bool,
        fifo: bool,
        max_attempts: u32,
    },
    Garbage {
        bytes: Vec<u8>,
    },
    Tick {
        ms: u64,
    },
    Checkpoint,
    Crash,
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..2usize, 1..4u32).prop_map(|(t, queues)| Op::CreateTopic { t, queues }),
        1 => (0..2usize).prop_map(|t| Op::DeleteTopic { t }),
        6 => (0..2usize, 0..4u32, 1..5usize, prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)], 0..5000u64)
            .prop_map(|(t, queue, n, kind, delay_ms)| Op::Send { t, queue, n, kind, delay_ms }),
        4 => (0..2usize, 0..2usize, 1..6u32, 1..3000u64, prop_oneof![
                3 => Just(None),
                1 => Just(Some("TagA".to_string())),
                1 => Just(Some("(".to_string())),
            ])
            .prop_map(|(g, t, max, invisible_ms, filter)| Op::Pop { g, t, max, invisible_ms, filter }),
        2 => (any::<usize>(), prop_oneof![Just(None), (0..4u32).prop_map(Some)])
            .prop_map(|(pick, queue)| Op::SendAgain { pick, queue }),
        1 => Just(Op::Deliver),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, commit)| Op::EndTx { pick, commit }),
        1 => (1..3000u64, 0..3u32).prop_map(|(interval_ms, max_checks)| Op::CheckTx { interval_ms, max_checks }),
        1 => any::<usize>().prop_map(|pick| Op::ToDeadLetter { pick }),
        1 => (0..2usize, 0..4u64).prop_map(|(g, offset)| Op::Resend { g, offset }),
        1 => (0..2usize, 0..3usize).prop_map(|(g, c)| Op::Heartbeat { g, c }),
        1 => (any::<usize>(), 0..3000u64).prop_map(|(pick, ms)| Op::Renew { pick, ms }),
        3 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        1 => (any::<usize>(), 0..3000u64).prop_map(|(pick, invisible_ms)| Op::ChangeInvisible { pick, invisible_ms }),
        1 => (0..2usize, 0..2usize, 0..4u32, 0..20u64)
            .prop_map(|(g, t, queue, offset)| Op::UpdateOffset { g, t, queue, offset }),
        1 => (0..2usize, prop_oneof![3 => Just(true), 1 => Just(false)], any::<bool>(), 0..4u32)
            .prop_map(|(g, enabled, fifo, max_attempts)| Op::UpdateGroup { g, enabled, fifo, max_attempts }),
        1 => proptest::collection::vec(any::<u8>(), 0..16).prop_map(|bytes| Op::Garbage { bytes }),
        2 => (0..4000u64).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Crash),
        1 => Just(Op::Snapshot),
    ]
}

/// A receipt: (group, topic, queue, offset, pop index).
type Receipt = (String, String, u32, u64, u64);

struct Rig {
    root: tempfile::TempDir,
    state_dir: PathBuf,
    log: Arc<CommitLog>,
    sm: Option<StateMachineStore>,
    /// Every entry applied, to apply again after a crash.
    entries: Vec<(u64, Vec<u8>)>,
    next_index: u64,
    now_ms: u64,
    receipts: Vec<Receipt>,
    replicas: u32,
    /// Every send: (topic, queue, encoded messages).
    sends: Vec<(usize, u32, Vec<Vec<u8>>)>,
}

/// How a test message is sent.
#[derive(Clone, Copy)]
struct Kind {
    /// 0: normal, 1: delayed, 2: half.
    kind: u8,
    now_ms: u64,
    delay_ms: u64,
}

fn entry(index: u64, cmd: &[u8]) -> openraft::type_config::alias::EntryOf<TypeConfig> {
    openraft::Entry {
        log_id: openraft::LogId::new(AdvLeaderId { term: 1, node_id: 1 }, index),
        payload: EntryPayload::Normal(LogBytes(Bytes::copy_from_slice(cmd))),
    }
}

fn message(topic: &str, i: u64) -> Vec<u8> {
    message_of(topic, i, Kind { kind: 0, now_ms: 0, delay_ms: 0 })
}

fn message_of(topic: &str, i: u64, k: Kind) -> Vec<u8> {
    let body = format!("body-{i}").into_bytes();
    StoredMessage {
        topic: topic.to_string(),
        message_id: format!("id-{i}"),
        keys: vec![format!("k{}", i % 3)],
        tag: if i % 2 == 0 { "TagA".into() } else { "TagB".into() },
        message_group: format!("mg{}", i % 3),
        body_crc32: crc32fast::hash(&body),
        body: body.into(),
        store_timestamp_ms: k.now_ms as i64,
        delivery_timestamp_ms: if k.kind == 1 { (k.now_ms + k.delay_ms + 1) as i64 } else { 0 },
        message_type: if k.kind == 2 { command::TRANSACTION_TYPE } else { 1 },
        ..Default::default()
    }
    .encode_to_vec()
}

/// What a client could observe of a replica.
#[derive(Debug, PartialEq)]
struct Observed {
    last_applied: Option<LogId>,
    topics: BTreeMap<String, TopicConf>,
    group_confs: BTreeMap<String, GroupConf>,
    groups: BTreeMap<GroupKey, GroupQueue>,
    messages: BTreeMap<(String, u32), Vec<Bytes>>,
    keys: BTreeMap<(String, String), Vec<(u32, u64)>>,
    held: Vec<(Vec<u8>, Vec<u8>)>,
    /// The dedupe answer for every message id sent: where its kept copy is.
    dedupe: BTreeMap<(String, String), Option<(u32, u64)>>,
}

/// Panics naming the fields in which `got` differs from `want` (the whole
/// state is too long to read in a failure message).
fn assert_same(got: &Observed, want: &Observed, what: &str) {
    if got == want {
        return;
    }
    let mut diffs = Vec::new();
    macro_rules! field {
        ($f:ident) => {
            if got.$f != want.$f {
                diffs.push(format!("{}: got {:?}\n  want {:?}", stringify!($f), got.$f, want.$f));
            }
        };
    }
    field!(last_applied);
    field!(topics);
    field!(group_confs);
    field!(groups);
    field!(keys);
    field!(held);
    if got.messages != want.messages {
        diffs.push(format!("messages of queues {:?} vs {:?}", got.messages.keys(), want.messages.keys()));
    }
    let ids: BTreeSet<_> = got.dedupe.keys().chain(want.dedupe.keys()).collect();
    for id in ids {
        let (g, w) = (got.dedupe.get(id), want.dedupe.get(id));
        if g != w {
            diffs.push(format!("dedupe of {id:?}: got {g:?}, want {w:?}"));
        }
    }
    panic!("{what}:\n{}", diffs.join("\n"));
}

/// The message ids of `sends`, with their topics.
fn sent_ids(sends: &[(usize, u32, Vec<Vec<u8>>)]) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    for (t, _, msgs) in sends {
        for b in msgs {
            let m = StoredMessage::decode(b.as_slice()).expect("test messages decode");
            ids.push((TOPICS[*t].to_string(), m.message_id));
        }
    }
    ids
}

fn observe(sh: &SmShared, ids: &[(String, String)]) -> Observed {
    let held = sh.read().held.rows();
    let (last_applied, topics, group_confs, groups, lengths) = {
        let st = sh.read();
        let lengths: Vec<(String, u32, u64)> =
            st.queues.iter().map(|((t, q), c)| (t.clone(), *q, c.max_offset())).collect();
        (
            st.last_applied,
            st.topics.clone(),
            st.group_confs.clone(),
            st.groups.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            lengths,
        )
    };
    let mut messages = BTreeMap::new();
    for (t, q, n) in lengths {
        let offsets: Vec<u64> = (0..n).collect();
        let read = sh.read_messages(&t, q, &offsets).expect("every counted message reads");
        assert_eq!(read.len() as u64, n, "{t}/{q}: every record reads back");
        messages.insert((t, q), read.into_iter().map(|r| r.raw).collect());
    }
    let mut keys = BTreeMap::new();
    for t in TOPICS {
        for k in ["k0", "k1", "k2"] {
            let found = sh.find_by_key(t, k, 10_000).expect("key index reads");
            if !found.is_empty() {
                keys.insert((t.to_string(), k.to_string()), found);
            }
        }
    }
    let dedupe = {
        let st = sh.read();
        ids.iter()
            .map(|(t, id)| ((t.clone(), id.clone()), sh.stored_copy(&st, t, id).expect("dedupe rows read")))
            .collect()
    };
    Observed { last_applied, topics, group_confs, groups, messages, keys, held, dedupe }
}

/// Invariants of the live state.
fn check_invariants(sh: &SmShared) {
    let st = sh.read();
    for t in st.topics.values() {
        for q in 0..t.queues {
            assert!(st.queues.contains_key(&(t.name.clone(), q)), "topic {} lacks queue {q}", t.name);
        }
    }
    assert_eq!(st.queues.len() as u32, st.topics.values().map(|t| t.queues).sum::<u32>(), "no orphan queues");
    for ((g, t, q), gq) in &st.groups {
        let max = st.queues.get(&(t.clone(), *q)).map(|c| c.max_offset()).unwrap_or(0);
        assert!(gq.committed <= gq.pop_offset, "{g}/{t}/{q}: committed {} > pop {}", gq.committed, gq.pop_offset);
        assert!(
            gq.pop_offset <= max.max(gq.committed),
            "{g}/{t}/{q}: pop offset {} past the queue end {max}",
            gq.pop_offset
        );
        for o in gq.inflight.keys().chain(gq.held.iter()) {
            assert!(*o >= gq.committed && *o < gq.pop_offset, "{g}/{t}/{q}: pending {o} outside [committed, pop)");
        }
        assert!(gq.held.iter().all(|o| !gq.inflight.contains_key(o)), "{g}/{t}/{q}: held and in flight at once");
    }
    for m in st.held.delayed.values().chain(st.held.halves.values().map(|h| &h.msg)) {
        assert!(m.pos >= sh.log.first_pos(), "a held message's bytes are kept");
    }
}

impl Rig {
    fn sh(&self) -> &SmShared {
        &self.sm.as_ref().expect("open").shared
    }

    /// Closes the state and opens it again from what is on disk (no entry
    /// applied again: see `Op::Crash`).
    fn reopen(&mut self) {
        drop(self.sm.take());
        self.sm =
            Some(StateMachineStore::open(&self.state_dir, self.log.clone()).unwrap_or_else(|e| panic!("reopen: {e}")));
    }

    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 256 * 1024,
            max_entry_bytes: 16 * 1024,
            max_unsynced_bytes: 1 << 20,
            ..LogConfig::small_for_tests()
        };
        let (log, _) = CommitLog::open(root.path().join("log"), config, Arc::new(StdFs)).unwrap();
        let log = Arc::new(log);
        let state_dir = root.path().join("state-0");
        let sm = StateMachineStore::open(&state_dir, log.clone()).unwrap();
        Rig {
            root,
            state_dir,
            log,
            sm: Some(sm),
            entries: Vec::new(),
            next_index: 1,
            now_ms: 1_000,
            receipts: Vec::new(),
            replicas: 0,
            sends: Vec::new(),
        }
    }

    fn apply(&mut self, cmd: Vec<u8>) -> Response {
        let index = self.next_index;
        self.next_index += 1;
        let rec = RecordRef { index, term: 1, leader_node: 1, kind: EntryKind::Normal, body: &cmd };
        if index == 1 {
            // The log starts at 1 here (entry 0 would be openraft's blank).
            self.log.purge(raft_log::meta::StoredLogId { term: 0, leader_node: 0, index: 0 }).unwrap();
        }
        self.log.append(&[rec]).unwrap();
        let (r, _) = self.sh().apply_entry(entry(index, &cmd)).unwrap();
        self.entries.push((index, cmd));
        r
    }

    fn control(&mut self, c: Control) -> Response {
        self.apply(command::encode_control(&c))
    }

    fn step(&mut self, op: &Op) {
        match op.clone() {
            Op::CreateTopic { t, queues } => {
                let update = self.sh().read().topics.contains_key(TOPICS[t]);
                self.control(Control::CreateTopic { name: TOPICS[t].into(), queues, message_type: 1, update });
            }
            Op::DeleteTopic { t } => {
                self.control(Control::DeleteTopic { name: TOPICS[t].into() });
            }
            Op::Send { t, queue, n, kind, delay_ms } => {
                let k = Kind { kind, now_ms: self.now_ms, delay_ms };
                let msgs: Vec<Vec<u8>> =
                    (0..n).map(|i| message_of(TOPICS[t], self.next_index * 10 + i as u64, k)).collect();
                let r = self.apply(command::encode_send(TOPICS[t], queue, &msgs));
                self.sends.push((t, queue, msgs));
                let exists = self.sh().read().queues.contains_key(&(TOPICS[t].to_string(), queue));
                assert_eq!(
                    matches!(r, Response::Sent { .. }),
                    exists,
                    "a send is stored exactly when its queue exists: {r:?}"
                );
            }
            Op::Pop { g, t, max, invisible_ms, filter } => {
                let queues: Vec<u32> = match self.sh().read().topics.get(TOPICS[t]) {
                    Some(c) => (0..c.queues).collect(),
                    None => vec![0],
                };
                let index = self.next_index;
                let r = self.control(Control::Pop {
                    group: GROUPS[g].into(),
                    topic: TOPICS[t].into(),
                    queues,
                    max,
                    invisible_ms,
                    now_ms: self.now_ms,
                    filter: filter.map(|expression| command::FilterSpec { sql: false, expression }),
                    max_attempts: 3,
                });
                if let Response::Popped { messages } = r {
                    assert!(messages.len() <= max as usize);
                    for p in messages {
                        self.receipts.push((GROUPS[g].into(), TOPICS[t].into(), p.queue, p.offset, index));
                    }
                }
            }
            Op::Ack { pick } => {
                if self.receipts.is_empty() {
                    return;
                }
                let (group, topic, queue, offset, pop_index) = self.receipts.remove(pick % self.receipts.len());
                self.control(Control::Ack { group, topic, queue, offset, pop_index });
            }
            Op::ChangeInvisible { pick, invisible_ms } => {
                if self.receipts.is_empty() {
                    return;
                }
                let i = pick % self.receipts.len();
                let (group, topic, queue, offset, pop_index) = self.receipts[i].clone();
                let index = self.next_index;
                let r = self.control(Control::ChangeInvisible {
                    group,
                    topic,
                    queue,
                    offset,
                    pop_index,
                    invisible_ms,
                    now_ms: self.now_ms,
                });
                if matches!(r, Response::Popped { .. }) {
                    self.receipts[i].4 = index;
                }
            }
            Op::UpdateOffset { g, t, queue, offset } => {
                self.control(Control::UpdateOffset { group: GROUPS[g].into(), topic: TOPICS[t].into(), queue, offset });
            }
            Op::SendAgain { pick, queue } => {
                if self.sends.is_empty() {
                    return;
                }
                let (t, first_queue, msgs) = self.sends[pick % self.sends.len()].clone();
                let (topic, queue) = (TOPICS[t], queue.unwrap_or(first_queue));
                // Where each message's id is kept now (None: not kept, or
                // not a message that goes to its queue at once).
                let copies: Vec<Option<(u32, u64)>> = {
                    let st = self.sh().read();
                    msgs.iter()
                        .map(|b| StoredMessage::decode(b.as_slice()).expect("test messages decode"))
                        .map(|m| match command::placement(&m) {
                            Placement::Queue => self.sh().stored_copy(&st, topic, &m.message_id).expect("dedupe reads"),
                            _ => None,
                        })
                        .collect()
                };
                let before: u64 = self.sh().read().queues.values().map(|q| q.max_offset()).sum();
                let r = self.apply(command::encode_send(topic, queue, &msgs));
                let after: u64 = self.sh().read().queues.values().map(|q| q.max_offset()).sum();
                if let Response::Sent { count, duplicates, .. } = &r {
                    assert_eq!(after - before, u64::from(*count));
                    let expected: Vec<(u32, u32, u64)> =
                        copies.iter().enumerate().filter_map(|(slot, c)| c.map(|(q, o)| (slot as u32, q, o))).collect();
                    assert_eq!(duplicates, &expected, "a retry (to queue {queue}) is answered with the kept copies");
                }
                self.sends.push((t, queue, msgs));
            }
            Op::Deliver => {
                self.control(Control::Deliver { now_ms: self.now_ms });
                assert!(self.sh().read().held.next_due_ms().is_none_or(|d| d > self.now_ms), "everything due released");
            }
            Op::EndTx { pick, commit } => {
                let halves: Vec<TxId> = self.sh().read().held.halves.keys().copied().collect();
                let tx = halves.get(pick % halves.len().max(1)).copied().unwrap_or(TxId { index: 0, slot: 0 });
                let r = self.control(Control::EndTransaction { tx, commit, now_ms: self.now_ms, topic: String::new() });
                assert_eq!(matches!(r, Response::Done), !halves.is_empty(), "{r:?}");
                assert!(!self.sh().read().held.halves.contains_key(&tx), "a resolved half is gone");
            }
            Op::CheckTx { interval_ms, max_checks } => {
                let r = self.control(Control::CheckTransactions { now_ms: self.now_ms, interval_ms, max_checks });
                assert!(matches!(r, Response::Checked { .. }), "{r:?}");
            }
            Op::ToDeadLetter { pick } => {
                if self.receipts.is_empty() {
                    return;
                }
                let (group, topic, queue, offset, pop_index) = self.receipts.remove(pick % self.receipts.len());
                self.control(Control::ToDeadLetter { group, topic, queue, offset, pop_index });
            }
            Op::Resend { g, offset } => {
                self.control(Control::ResendDeadLetter { group: GROUPS[g].into(), dlq_offset: offset });
            }
            Op::Heartbeat { g, c } => {
                let client_id = format!("c{c}");
                self.control(Control::ClientHeartbeat { group: GROUPS[g].into(), client_id, now_ms: self.now_ms });
            }
            Op::Renew { pick, ms } => {
                if self.receipts.is_empty() {
                    return;
                }
                let (group, topic, queue, offset, pop_index) = self.receipts[pick % self.receipts.len()].clone();
                let visible_at_ms = self.now_ms + ms;
                self.control(Control::Renew { group, topic, queue, offset, pop_index, visible_at_ms });
            }
            Op::UpdateGroup { g, enabled, fifo, max_attempts } => {
                let config = GroupConf {
                    name: GROUPS[g].into(),
                    consume_enabled: enabled,
                    max_delivery_attempts: max_attempts,
                    fifo,
                    broadcast_enabled: false,
                };
                self.control(Control::UpdateGroup { config });
            }
            Op::Garbage { bytes } => {
                let r = self.apply(bytes);
                assert!(matches!(
                    r,
                    Response::Refused { .. }
                        | Response::Done
                        | Response::Sent { .. }
                        | Response::Popped { .. }
                        | Response::Checked { .. }
                ));
            }
            Op::Tick { ms } => self.now_ms += ms,
            Op::Checkpoint => self.sh().checkpoint().unwrap(),
            Op::Crash => {
                let ids = sent_ids(&self.sends);
                let before = observe(self.sh(), &ids);
                // Reopen from what is on disk; openraft re-applies the
                // committed entries after the stored applied id.
                self.reopen();
                let applied = self.sh().read().last_applied.map(|l| l.index).unwrap_or(0);
                for (index, cmd) in self.entries.iter().filter(|(i, _)| *i > applied) {
                    self.sh().apply_entry(entry(*index, cmd)).unwrap();
                }
                assert_same(&observe(self.sh(), &ids), &before, "a restarted replica resumes exactly");
            }
            Op::Snapshot => {
                if self.sh().read().last_applied.is_none() {
                    // openraft never snapshots an empty state machine.
                    return;
                }
                let ids = sent_ids(&self.sends);
                let before = observe(self.sh(), &ids);
                let snap = self.sh().build_snapshot().unwrap();
                self.replicas += 1;
                let dir = self.root.path().join(format!("state-{}", self.replicas));
                let fresh = StateMachineStore::open(&dir, self.log.clone()).unwrap();
                fresh.shared.install_snapshot(&snap.meta, &snap.snapshot.dir).unwrap();
                assert_same(&observe(&fresh.shared, &ids), &before, "an installed snapshot equals its source");
                // The installed replica carries on.
                self.sm = Some(fresh);
                self.state_dir = dir;
            }
        }
        check_invariants(self.sh());
    }
}

proptest! {
    // PROPTEST_CASES overrides the count for long runs.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn state_machine_survives_restarts_and_snapshots(ops in proptest::collection::vec(op(), 1..60)) {
        let mut rig = Rig::new();
        for o in &ops {
            rig.step(o);
        }
        // A final crash and a final snapshot must both reproduce the state.
        rig.step(&Op::Crash);
        rig.step(&Op::Snapshot);
    }
}

#[test]
fn undecodable_commands_are_refused_not_fatal() {
    let mut rig = Rig::new();
    for bytes in [vec![], vec![9], vec![1, 0], vec![2, 0xc1]] {
        let r = rig.apply(bytes.clone());
        assert!(matches!(r, Response::Refused { code: RefusedCode::BadRequest, .. }), "{bytes:?}: {r:?}");
    }
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 1, message_type: 1, update: false });
    assert!(matches!(rig.apply(command::encode_send("ta", 0, &[message("ta", 1)])), Response::Sent { .. }));
}

#[test]
fn disabled_group_cannot_pop_and_config_survives_restart() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 1, message_type: 1, update: false });
    rig.apply(command::encode_send("ta", 0, &[message("ta", 1)]));
    rig.step(&Op::UpdateGroup { g: 0, enabled: false, fifo: false, max_attempts: 0 });
    let pop = Control::Pop {
        group: "g0".into(),
        topic: "ta".into(),
        queues: vec![0],
        max: 1,
        invisible_ms: 10,
        now_ms: 1,
        filter: None,
        max_attempts: 0,
    };
    assert!(matches!(rig.control(pop.clone()), Response::Refused { code: RefusedCode::ConsumeDisabled, .. }));
    rig.step(&Op::Checkpoint);
    rig.step(&Op::Crash);
    assert!(!rig.sh().read().group_confs["g0"].consume_enabled);
    rig.step(&Op::UpdateGroup { g: 0, enabled: true, fifo: false, max_attempts: 0 });
    assert!(matches!(rig.control(pop), Response::Popped { messages } if messages.len() == 1));
}

#[test]
fn delayed_messages_wait_for_their_time_and_survive_a_restart() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 1, message_type: 3, update: false });
    let k = Kind { kind: 1, now_ms: 1000, delay_ms: 4000 };
    rig.apply(command::encode_send("ta", 0, &[message_of("ta", 7, k)]));
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 0)), "not visible before its time");
    rig.step(&Op::Checkpoint);
    rig.step(&Op::Crash);
    rig.control(Control::Deliver { now_ms: 4000 });
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 0)), "still early");
    rig.control(Control::Deliver { now_ms: 5001 });
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 1)), "visible once due");
    let read = rig.sh().read_messages("ta", 0, &[0]).unwrap();
    assert_eq!(&read[0].message.body[..], b"body-7");
    assert_eq!(rig.sh().find_by_id("id-7", 10).unwrap(), vec![("ta".to_string(), 0, 0)]);
}

#[test]
fn an_unresolved_half_message_is_checked_then_rolled_back() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 1, message_type: 4, update: false });
    let k = Kind { kind: 2, now_ms: 0, delay_ms: 0 };
    rig.apply(command::encode_send("ta", 0, &[message_of("ta", 1, k), message_of("ta", 2, k)]));
    let check = |rig: &mut Rig, now_ms| match rig.control(Control::CheckTransactions {
        now_ms,
        interval_ms: 30_000,
        max_checks: 2,
    }) {
        Response::Checked { txs } => txs.len(),
        other => panic!("{other:?}"),
    };
    assert_eq!(check(&mut rig, 29_999), 0, "first check one interval after it was stored");
    assert_eq!(check(&mut rig, 30_000), 2);
    assert_eq!(check(&mut rig, 30_001), 0, "then every interval");
    // One is committed by the producer's answer.
    let first = *rig.sh().read().held.halves.keys().next().unwrap();
    let r = rig.control(Control::EndTransaction { tx: first, commit: true, now_ms: 31_000, topic: "tb".into() });
    assert!(matches!(r, Response::Refused { code: RefusedCode::TransactionNotFound, .. }), "another topic's: {r:?}");
    assert!(matches!(
        rig.control(Control::EndTransaction { tx: first, commit: true, now_ms: 31_000, topic: "ta".into() }),
        Response::Done
    ));
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 1)));
    assert_eq!(check(&mut rig, 60_000), 1);
    // Checked max_checks times: the next due check rolls it back.
    assert_eq!(check(&mut rig, 90_000), 0);
    assert!(rig.sh().read().held.halves.is_empty(), "rolled back");
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 1)), "never delivered");
    let r = rig.control(Control::EndTransaction { tx: first, commit: true, now_ms: 91_000, topic: "ta".into() });
    assert!(matches!(r, Response::Refused { code: RefusedCode::TransactionNotFound, .. }), "{r:?}");
}

#[test]
fn a_retried_send_is_stored_once_also_across_a_restart() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 2, message_type: 1, update: false });
    assert!(matches!(rig.apply(command::encode_send("ta", 0, &[message("ta", 1)])), Response::Sent { count: 1, .. }));
    // The retry lands in another queue, as a producer's round robin does.
    match rig.apply(command::encode_send("ta", 1, &[message("ta", 1), message("ta", 2)])) {
        Response::Sent { count, duplicates, .. } => {
            assert_eq!(count, 1, "only the new message is stored");
            assert_eq!(duplicates, vec![(0, 0, 0)], "the copy kept: queue 0, offset 0");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.sh().queue_range("ta", 1), Some((0, 1)));
    // Entries applied after the checkpoint are applied again at restart:
    // their own index rows must not make them duplicates of themselves.
    rig.step(&Op::Crash);
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 1)));
    assert_eq!(rig.sh().queue_range("ta", 1), Some((0, 1)));
}

#[test]
fn copies_of_a_delayed_message_released_together_keep_the_first_copy_across_a_replay() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 1, message_type: 3, update: false });
    // A delayed send and its retry: both are held (held messages are not
    // deduplicated), and one Deliver releases both.
    let k = Kind { kind: 1, now_ms: 1000, delay_ms: 100 };
    for _ in 0..2 {
        rig.apply(command::encode_send("ta", 0, &[message_of("ta", 7, k)]));
    }
    rig.control(Control::Deliver { now_ms: 2000 });
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 2)));
    let copy = |rig: &Rig| rig.sh().stored_copy(&rig.sh().read(), "ta", "id-7").unwrap();
    assert_eq!(copy(&rig), Some((0, 0)), "the first copy released is the one kept");
    // No checkpoint: the restart applies every entry again, with the rows
    // the first apply wrote already in RocksDB. It must answer the same.
    rig.step(&Op::Crash);
    assert_eq!(rig.sh().queue_range("ta", 0), Some((0, 2)));
    assert_eq!(copy(&rig), Some((0, 0)), "a replayed Deliver keeps the same copy");
}

#[test]
fn id_rows_parse_whatever_the_id_holds_and_the_first_copy_gets_the_dedupe_row() {
    let row = k_id_index("a\0b", "ta", 3, 9);
    assert_eq!(parse_id_row(&row), Some((&b"a\0b"[..], &b"ta"[..], 3, 9)));
    assert_eq!(parse_id_row(b"k/\x01short"), None);
    assert_eq!(parse_id_row(&k_key_index("ta", "key", 1, 2)), None, "a key row is not an id row");
    let mut batch = rocksdb::WriteBatch::default();
    let mut unique = UniqueRows::default();
    for row in [k_id_index("m1", "ta", 0, 4), k_id_index("m1", "ta", 1, 7), k_id_index("m1", "tb", 0, 1)] {
        unique.push(&mut batch, &row);
    }
    assert_eq!(unique.count, 2, "one row per (topic, id), the first copy's");
}

#[test]
fn a_store_without_dedupe_rows_gets_them_when_opened() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 2, message_type: 1, update: false });
    rig.apply(command::encode_send("ta", 0, &[message("ta", 1)]));
    rig.sh().checkpoint().unwrap();
    // A store written before dedupe rows existed: the id index only.
    let db = &rig.sh().db;
    let mut gone = rocksdb::WriteBatch::default();
    gone.delete_range(b"u/".to_vec(), b"u0".to_vec());
    gone.delete(K_UNIQUE_BUILT);
    db.write(gone).unwrap();
    assert!(db.get(k_unique("ta", "id-1")).unwrap().is_none());
    rig.reopen();
    match rig.apply(command::encode_send("ta", 1, &[message("ta", 1)])) {
        Response::Sent { count, duplicates, .. } => {
            assert_eq!((count, duplicates), (0, vec![(0, 0, 0)]), "the retry is known as a duplicate");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_store_checkpointed_by_a_binary_without_dedupe_rows_gets_them_again() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 2, message_type: 1, update: false });
    rig.apply(command::encode_send("ta", 0, &[message("ta", 1)]));
    rig.sh().checkpoint().unwrap();
    let db = &rig.sh().db;
    let built = db.get(K_UNIQUE_BUILT).unwrap();
    assert_eq!(built, db.get(K_APPLIED).unwrap(), "a checkpoint records the rows as built");
    // A downgraded binary stores id-2 without its dedupe row and
    // checkpoints: the applied id moves, the marker does not.
    rig.apply(command::encode_send("ta", 0, &[message("ta", 2)]));
    rig.sh().checkpoint().unwrap();
    let db = &rig.sh().db;
    let mut old = rocksdb::WriteBatch::default();
    old.delete(k_unique("ta", "id-2"));
    old.put(K_UNIQUE_BUILT, built.unwrap());
    db.write(old).unwrap();
    rig.reopen();
    match rig.apply(command::encode_send("ta", 1, &[message("ta", 2)])) {
        Response::Sent { count, duplicates, .. } => {
            assert_eq!((count, duplicates), (0, vec![(0, 0, 1)]), "the retry is known as a duplicate");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_replica_installed_from_a_snapshot_knows_the_stored_ids() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 2, message_type: 1, update: false });
    rig.apply(command::encode_send("ta", 1, &[message("ta", 1), message("ta", 2)]));
    rig.step(&Op::Snapshot);
    assert_eq!(rig.replicas, 1, "the rig carries on with the installed replica");
    match rig.apply(command::encode_send("ta", 0, &[message("ta", 2), message("ta", 3)])) {
        Response::Sent { count, duplicates, .. } => {
            assert_eq!(count, 1, "only the new message is stored");
            assert_eq!(duplicates, vec![(0, 1, 1)], "the copy kept: queue 1, offset 1");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_group_s_delivery_state_tells_in_flight_held_consumed_and_dead_lettered_apart() {
    let mut rig = Rig::new();
    rig.control(Control::CreateTopic { name: "ta".into(), queues: 1, message_type: 1, update: false });
    let config = GroupConf {
        name: "g0".into(),
        consume_enabled: true,
        max_delivery_attempts: 1,
        fifo: true,
        broadcast_enabled: false,
    };
    rig.control(Control::UpdateGroup { config });
    // Offsets 0 and 1 share message group mg1; offset 2 is mg2.
    rig.apply(command::encode_send("ta", 0, &[message("ta", 1), message("ta", 4), message("ta", 2)]));
    let state = |rig: &Rig, offset| rig.sh().delivery_state("g0", "ta", 0, offset);
    assert_eq!(state(&rig, 0), ("not delivered".into(), 0));
    let pop = |rig: &mut Rig, now_ms| {
        let index = rig.next_index;
        let r = rig.control(Control::Pop {
            group: "g0".into(),
            topic: "ta".into(),
            queues: vec![0],
            max: 10,
            invisible_ms: 1_000,
            now_ms,
            filter: None,
            max_attempts: 0,
        });
        (index, r)
    };
    let (pop_index, r) = pop(&mut rig, 1_000);
    assert!(matches!(&r, Response::Popped { messages } if messages.len() == 2), "{r:?}");
    assert_eq!(state(&rig, 0), ("in flight".into(), 1));
    assert!(state(&rig, 1).0.starts_with("held (FIFO"), "{:?}", state(&rig, 1));
    rig.control(Control::Ack { group: "g0".into(), topic: "ta".into(), queue: 0, offset: 2, pop_index });
    assert_eq!(state(&rig, 2), ("consumed".into(), 0));
    // Offset 0 expires at its one allowed attempt: dead-lettered, and the
    // held one behind it is delivered.
    pop(&mut rig, 5_000);
    assert_eq!(state(&rig, 0), ("dead-lettered (%DLQ%g0 at offset 0)".into(), 1));
    assert_eq!(state(&rig, 1), ("in flight".into(), 1));
    assert_eq!(rig.sh().delivery_state("other", "ta", 0, 0), ("not delivered".into(), 0));
}

#[test]
fn a_stale_dedupe_row_of_a_recreated_topic_does_not_decide() {
    let mut rig = Rig::new();
    let create = Control::CreateTopic { name: "ta".into(), queues: 2, message_type: 1, update: false };
    rig.control(create.clone());
    rig.apply(command::encode_send("ta", 0, &[message("ta", 9), message("ta", 1)]));
    rig.control(Control::DeleteTopic { name: "ta".into() });
    rig.control(create);
    // id-1's old dedupe row points at (0, 1), past the new queue 0's end.
    assert!(matches!(rig.apply(command::encode_send("ta", 1, &[message("ta", 1)])), Response::Sent { count: 1, .. }));
    // A node whose dedupe row names the stale copy (a snapshot rebuild picks
    // the lowest id row) answers as one naming the live copy: the id index
    // decides.
    rig.sh().db.put(k_unique("ta", "id-1"), queue_offset_bytes(0, 1)).unwrap();
    match rig.apply(command::encode_send("ta", 0, &[message("ta", 1)])) {
        Response::Sent { count, duplicates, .. } => assert_eq!((count, duplicates), (0, vec![(0, 1, 0)])),
        other => panic!("{other:?}"),
    }
}
