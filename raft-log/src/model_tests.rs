//! Model test: random sequences of append / sync / truncate / purge / reopen /
//! close / crash against an in-memory model. After every step the log holds
//! exactly the model's entries; after a crash it holds every entry known
//! durable plus possibly a prefix of the rest, never a partial or altered one.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use crate::fault::CrashMode;
use crate::log::CommitLog;
use crate::log::RecordRef;
use crate::log::tests::Env;
use crate::meta::StoredLogId;
use crate::record::EntryKind;

#[derive(Debug, Clone)]
enum Op {
    Append { count: u8, len: u16, bump_term: bool },
    Sync,
    Truncate { back: u8 },
    Purge { ahead: u8 },
    Reopen,
    Close,
    Crash { tear: Option<(u16, bool)> },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..24, 0u16..3000, proptest::bool::weighted(0.2))
            .prop_map(|(count, len, bump_term)| Op::Append { count, len, bump_term }),
        2 => Just(Op::Sync),
        1 => (0u8..30).prop_map(|back| Op::Truncate { back }),
        1 => (0u8..40).prop_map(|ahead| Op::Purge { ahead }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Close),
        2 => proptest::option::of((0u16..6000, any::<bool>())).prop_map(|tear| Op::Crash { tear }),
    ]
}

struct Model {
    entries: BTreeMap<u64, (u64, Vec<u8>)>,
    /// Index the next append carries.
    next: u64,
    term: u64,
    /// Highest index known durable.
    synced: Option<u64>,
    /// Seed for bodies.
    salt: u64,
}

impl Model {
    fn first(&self) -> u64 {
        self.entries.keys().next().copied().unwrap_or(self.next)
    }

    fn last(&self) -> Option<u64> {
        self.entries.keys().next_back().copied()
    }
}

fn body(salt: u64, index: u64, len: usize) -> Vec<u8> {
    let mut x = salt ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn check_equal(log: &CommitLog, m: &Model) {
    assert_eq!(log.first_index(), m.first(), "first index");
    assert_eq!(log.last_entry().map(|l| l.index), m.last(), "last index");
    for (&i, (term, b)) in &m.entries {
        let r = log.read(i).unwrap_or_else(|e| panic!("entry {i}: {e}"));
        assert_eq!(r.term, *term, "term of {i}");
        assert_eq!(&r.body[..], &b[..], "body of {i}");
    }
}

fn run(ops: Vec<Op>) {
    let env = Env::new();
    let mut log = Some(env.open());
    let mut m = Model { entries: BTreeMap::new(), next: 0, term: 1, synced: None, salt: 1 };
    for op in ops {
        let l = log.as_ref().expect("open");
        match op {
            Op::Append { count, len, bump_term } => {
                if bump_term {
                    m.term += 1;
                }
                m.salt += 1;
                let bodies: Vec<Vec<u8>> = (0..count as u64).map(|k| body(m.salt, m.next + k, len as usize)).collect();
                let recs: Vec<RecordRef<'_>> = bodies
                    .iter()
                    .enumerate()
                    .map(|(k, b)| RecordRef {
                        index: m.next + k as u64,
                        term: m.term,
                        leader_node: 1,
                        kind: EntryKind::Normal,
                        body: b,
                    })
                    .collect();
                l.append(&recs).unwrap();
                for (k, b) in bodies.into_iter().enumerate() {
                    m.entries.insert(m.next + k as u64, (m.term, b));
                }
                m.next += count as u64;
            }
            Op::Sync => {
                l.sync().unwrap();
                m.synced = m.last().or(m.synced);
            }
            Op::Truncate { back } => {
                let Some(last) = m.last() else { continue };
                let keep = last.checked_sub(back as u64).filter(|k| *k >= m.first());
                l.truncate_after(keep).unwrap();
                let from = keep.map(|k| k + 1).unwrap_or(m.first());
                m.entries.retain(|i, _| *i < from);
                m.next = from;
                m.synced = m.last();
                // A new leader's entries come in a higher term.
                m.term += 1;
            }
            Op::Purge { ahead } => {
                let upto = m.first() + ahead as u64;
                let term = m.entries.get(&upto).map(|e| e.0).unwrap_or(m.term);
                l.purge(StoredLogId { term, leader_node: 1, index: upto }).unwrap();
                m.entries.retain(|i, _| *i > upto);
                m.next = m.next.max(upto + 1);
                m.synced = m.last();
            }
            Op::Reopen => {
                drop(log.take());
                log = Some(env.open());
                // Recovery fsyncs what it found.
                m.synced = m.last().or(m.synced);
            }
            Op::Close => {
                log.take().expect("open").close().unwrap();
                log = Some(env.open());
                m.synced = m.last().or(m.synced);
            }
            Op::Crash { tear } => {
                drop(log.take());
                let mode = match tear {
                    Some((k, data)) => {
                        CrashMode::TearLastWrite { keep_bytes: k as usize, suffix: if data { ".seg" } else { ".idx" } }
                    }
                    None => CrashMode::LoseUnsynced,
                };
                env.fs.crash(mode).unwrap();
                let (reopened, _) =
                    CommitLog::open(env.dir.path(), env.config.clone(), Arc::new(env.fs.clone())).unwrap();
                // Every durable entry is there; what follows is a prefix of the
                // model; nothing else.
                let got_last = reopened.last_entry().map(|l| l.index);
                if let Some(s) = m.synced.filter(|s| *s >= m.first()) {
                    assert!(got_last.is_some_and(|g| g >= s), "durable entry {s} lost; log ends at {got_last:?}");
                }
                if let Some(g) = got_last {
                    assert!(m.last().is_some_and(|l| g <= l), "log ends at {g}, past the model");
                    m.entries.retain(|i, _| *i <= g);
                } else {
                    m.entries.clear();
                }
                m.next = got_last.map(|g| g + 1).unwrap_or(m.first().min(m.next));
                if m.entries.is_empty() {
                    m.next = reopened.first_index();
                }
                m.synced = m.last().or(m.synced);
                log = Some(reopened);
            }
        }
        let l = log.as_ref().expect("open");
        check_equal(l, &m);
        l.check_invariants();
    }
}

/// Found by a long run: a torn-write crash named an index file a purge had deleted.
#[test]
fn regression_tear_after_purge_deleted_the_file() {
    run(vec![
        Op::Purge { ahead: 19 },
        Op::Purge { ahead: 22 },
        Op::Append { count: 1, len: 0, bump_term: false },
        Op::Truncate { back: 1 },
        Op::Reopen,
        Op::Purge { ahead: 20 },
        Op::Crash { tear: Some((0, false)) },
    ]);
}

proptest! {
    // PROPTEST_CASES overrides the count for long runs.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        .. ProptestConfig::default()
    })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
