//! RocketMQ's classic queue allocation strategies: which queues of a topic
//! each consumer of a group reads, computed by every consumer alone from the
//! same inputs (the topic's queues and the group's consumer ids).
//!
//! The strategies behave like the Java client's `AllocateMessageQueue*`
//! classes, given the sorted inputs its rebalance passes them:
//!
//! | strategy | Java class |
//! |---|---|
//! | [`Strategy::Averagely`] | `AllocateMessageQueueAveragely`: consecutive ranges, the first `queues % consumers` consumers take one more |
//! | [`Strategy::AveragelyByCircle`] | `AllocateMessageQueueAveragelyByCircle`: consumer `i` takes queues `i, i + n, i + 2n, …` |
//! | [`Strategy::ByConfig`] | `AllocateMessageQueueByConfig`: the queues configured for this consumer |
//! | [`Strategy::ByMachineRoom`] | `AllocateMessageQueueByMachineRoom`: only queues of brokers named `room@name` whose room is listed, split like averagely with the remainder dealt one by one |
//! | [`Strategy::ConsistentHash`] | `AllocateMessageQueueConsistentHash`: a ring of MD5 hashes of `"<consumer id>-<i>"` (10 virtual nodes by default); a queue goes to the first node at or after the hash of its Java `MessageQueue.toString()` |
//! | [`Strategy::MachineRoomNearby`] | `AllocateMachineRoomNearby`: queues of a room with live consumers go to those consumers (by the inner strategy); queues of rooms without consumers are shared by all |
//!
//! Differences from Java, all deliberate: inputs are sorted and deduplicated
//! here (Java's rebalance sorts them before calling the strategy); invalid
//! inputs (empty id, no queue, no consumer, an id not in the list) give no
//! queue instead of an exception; `ByConfig` leaves out configured queues
//! the topic does not have; a broker or consumer whose machine room the
//! resolver does not know is in the room `""` rather than an error.

use std::collections::BTreeMap;

use crate::QueueRef;
use crate::md5::md5;

/// How the queues of a topic are shared by the consumers of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// Consecutive ranges of queues, as even as possible.
    Averagely,
    /// Queues dealt round robin.
    AveragelyByCircle,
    /// Exactly these queues (each consumer is given its own list).
    ByConfig(Vec<QueueRef>),
    /// Only queues of brokers named `room@name` with `room` in the list,
    /// shared by all consumers.
    ByMachineRoom(Vec<String>),
    /// Consistent hashing over consumer ids (MD5 ring like Java's); few
    /// queues move when consumers come and go.
    ConsistentHash {
        /// Ring positions per consumer (Java's default: 10).
        virtual_nodes: usize,
    },
    /// Prefer consumers in the broker's machine room; queues of rooms with no
    /// consumer are shared by all consumers.
    MachineRoomNearby {
        /// How the queues of one room are shared.
        inner: Box<Strategy>,
        /// The machine room of a broker, from its name.
        broker_room: RoomResolver,
        /// The machine room of a consumer, from its id.
        consumer_room: RoomResolver,
    },
}

impl Strategy {
    /// Consistent hashing with Java's default of 10 virtual nodes.
    pub fn consistent_hash() -> Self {
        Strategy::ConsistentHash { virtual_nodes: 10 }
    }

    /// Machine-room nearby with `room@…` names for brokers and consumers.
    pub fn machine_room_nearby(inner: Strategy) -> Self {
        Strategy::MachineRoomNearby {
            inner: Box::new(inner),
            broker_room: RoomResolver::Prefix('@'),
            consumer_room: RoomResolver::Prefix('@'),
        }
    }

    /// The Java client's name of the strategy (`AVG`, `AVG_BY_CIRCLE`, …).
    pub fn name(&self) -> String {
        match self {
            Strategy::Averagely => "AVG".into(),
            Strategy::AveragelyByCircle => "AVG_BY_CIRCLE".into(),
            Strategy::ByConfig(_) => "CONFIG".into(),
            Strategy::ByMachineRoom(_) => "MACHINE_ROOM".into(),
            Strategy::ConsistentHash { .. } => "CONSISTENT_HASH".into(),
            Strategy::MachineRoomNearby { inner, .. } => format!("MACHINE_ROOM_NEARBY-{}", inner.name()),
        }
    }
}

/// Finds the machine room of a broker (by broker name) or consumer (by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomResolver {
    /// The part of the name before the first separator (the whole name when
    /// there is none): `Prefix('@')` reads `hz@broker-a` as room `hz`.
    Prefix(char),
    /// A fixed table; names not in it are in room `""`.
    Map(BTreeMap<String, String>),
}

impl RoomResolver {
    /// The room of `name`.
    pub fn room(&self, name: &str) -> String {
        match self {
            RoomResolver::Prefix(sep) => name.split(*sep).next().unwrap_or_default().to_string(),
            RoomResolver::Map(m) => m.get(name).cloned().unwrap_or_default(),
        }
    }
}

/// The queues consumer `current_cid` of `consumer_group` reads when the
/// consumers `all_cids` share `queues`. Every consumer computing this with
/// the same inputs gets a share, and (except `ByConfig` with overlapping
/// lists, and `ByMachineRoom`, which leaves out other rooms) every queue is
/// in exactly one share. The consistent hash hashes queues with an empty
/// topic name; use [`allocate_in_topic`] to get Java's ring for a topic.
pub fn allocate(
    strategy: &Strategy,
    consumer_group: &str,
    current_cid: &str,
    all_cids: &[String],
    queues: &[QueueRef],
) -> Vec<QueueRef> {
    allocate_in_topic(strategy, consumer_group, "", current_cid, all_cids, queues)
}

/// [`allocate`] for the queues of `topic` (the consistent hash then places
/// queues exactly where the Java client does).
pub fn allocate_in_topic(
    strategy: &Strategy,
    consumer_group: &str,
    topic: &str,
    current_cid: &str,
    all_cids: &[String],
    queues: &[QueueRef],
) -> Vec<QueueRef> {
    let mut cids: Vec<&str> = all_cids.iter().map(String::as_str).collect();
    cids.sort_unstable();
    cids.dedup();
    let mut mqs = queues.to_vec();
    mqs.sort();
    mqs.dedup();
    if current_cid.is_empty() || mqs.is_empty() || cids.is_empty() {
        return Vec::new();
    }
    if !cids.contains(&current_cid) {
        tracing::info!(group = consumer_group, consumer = current_cid, "consumer is not among the group's consumers");
        return Vec::new();
    }
    run(strategy, topic, current_cid, &cids, &mqs)
}

/// A strategy on checked inputs: `mqs` and `cids` sorted, non-empty, `cid` in `cids`.
fn run(strategy: &Strategy, topic: &str, cid: &str, cids: &[&str], mqs: &[QueueRef]) -> Vec<QueueRef> {
    let index = cids.iter().position(|c| *c == cid).unwrap_or(0);
    let (n, m) = (mqs.len(), cids.len());
    match strategy {
        Strategy::Averagely => {
            let rem = n % m;
            let size = if n <= m {
                1
            } else if rem > 0 && index < rem {
                n / m + 1
            } else {
                n / m
            };
            let start = if rem > 0 && index < rem { index * size } else { index * size + rem };
            let range = size.min(n.saturating_sub(start));
            (0..range).map(|i| mqs[(start + i) % n].clone()).collect()
        }
        Strategy::AveragelyByCircle => mqs.iter().skip(index).step_by(m).cloned().collect(),
        Strategy::ByConfig(config) => {
            let mut out: Vec<QueueRef> = Vec::new();
            for q in config {
                if mqs.binary_search(q).is_ok() && !out.contains(q) {
                    out.push(q.clone());
                }
            }
            out
        }
        Strategy::ByMachineRoom(rooms) => {
            let pre: Vec<&QueueRef> = mqs
                .iter()
                .filter(|q| {
                    let parts = java_split(&q.broker, '@');
                    parts.len() == 2 && rooms.iter().any(|r| r == parts[0])
                })
                .collect();
            let (each, rem) = (pre.len() / m, pre.len() % m);
            let start = each * index;
            let mut out: Vec<QueueRef> = pre[start..start + each].iter().map(|&q| q.clone()).collect();
            if rem > index {
                out.push(pre[index + each * m].clone());
            }
            out
        }
        Strategy::ConsistentHash { virtual_nodes } => {
            let mut ring: BTreeMap<u32, &str> = BTreeMap::new();
            for c in cids {
                for i in 0..*virtual_nodes {
                    ring.insert(ring_hash(&format!("{c}-{i}")), c);
                }
            }
            mqs.iter()
                .filter(|q| {
                    let h = ring_hash(&java_queue_string(topic, q));
                    let owner = ring.range(h..).next().or_else(|| ring.iter().next()).map(|(_, c)| *c);
                    owner == Some(cid)
                })
                .cloned()
                .collect()
        }
        Strategy::MachineRoomNearby { inner, broker_room, consumer_room } => {
            let mut room_queues: BTreeMap<String, Vec<QueueRef>> = BTreeMap::new();
            for q in mqs {
                room_queues.entry(broker_room.room(&q.broker)).or_default().push(q.clone());
            }
            let mut room_consumers: BTreeMap<String, Vec<&str>> = BTreeMap::new();
            for c in cids {
                room_consumers.entry(consumer_room.room(c)).or_default().push(c);
            }
            let here = consumer_room.room(cid);
            let mut out = Vec::new();
            // 1. The queues of my room, shared by the consumers of my room.
            if let Some(qs) = room_queues.remove(&here)
                && !qs.is_empty()
            {
                let mine = room_consumers.get(&here).map(Vec::as_slice).unwrap_or(&[]);
                out.extend(run(inner, topic, cid, mine, &qs));
            }
            // 2. Queues of rooms without consumers, shared by everyone.
            for (room, qs) in &room_queues {
                if !room_consumers.contains_key(room) {
                    out.extend(run(inner, topic, cid, cids, qs));
                }
            }
            out
        }
    }
}

/// Java's `String.split` on a one-character literal: trailing empty parts
/// are dropped (but a string without the separator is one part).
fn java_split(s: &str, sep: char) -> Vec<&str> {
    let mut parts: Vec<&str> = s.split(sep).collect();
    while parts.len() > 1 && parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop();
    }
    if parts.len() == 1 && parts[0].is_empty() && !s.is_empty() {
        // Only separators: Java gives an empty array.
        parts.clear();
    }
    parts
}

/// Java's `MessageQueue.toString()`, the key a queue is hashed by.
fn java_queue_string(topic: &str, q: &QueueRef) -> String {
    format!("MessageQueue [topic={topic}, brokerName={}, queueId={}]", q.broker, q.queue)
}

/// Java's ring hash: the first four bytes of the MD5 digest, big-endian.
fn ring_hash(key: &str) -> u32 {
    let d = md5(key.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn q(broker: &str, queue: u32) -> QueueRef {
        QueueRef { broker: broker.into(), queue }
    }

    fn queues(brokers: &[(&str, u32)]) -> Vec<QueueRef> {
        brokers.iter().flat_map(|(b, n)| (0..*n).map(move |i| q(b, i))).collect()
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn all(strategy: &Strategy, topic: &str, cids: &[String], mqs: &[QueueRef]) -> Vec<Vec<QueueRef>> {
        cids.iter().map(|c| allocate_in_topic(strategy, "g", topic, c, cids, mqs)).collect()
    }

    /// A small deterministic generator (xorshift64*), for the property loops.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i + 1));
            }
        }
    }

    /// Every queue of `expected` is in exactly one share, and nothing else is.
    fn assert_partition(shares: &[Vec<QueueRef>], expected: &[QueueRef], what: &str) {
        let mut seen = BTreeSet::new();
        for s in shares {
            for q in s {
                assert!(seen.insert(q.clone()), "{what}: {q:?} allocated twice: {shares:?}");
            }
        }
        let want: BTreeSet<QueueRef> = expected.iter().cloned().collect();
        assert_eq!(seen, want, "{what}: not every queue allocated exactly once");
    }

    #[test]
    fn every_strategy_covers_every_queue_exactly_once() {
        const ROOMS: [&str; 3] = ["hz", "sh", "bj"];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..400 {
            let brokers: Vec<(String, u32)> = (0..1 + rng.below(4))
                .map(|b| (format!("{}@broker-{b}", ROOMS[rng.below(3)]), 1 + rng.below(8) as u32))
                .collect();
            let mut mqs: Vec<QueueRef> = brokers
                .iter()
                .flat_map(|(b, n)| (0..*n).map(move |i| QueueRef { broker: b.clone(), queue: i }))
                .collect();
            let mut cids: Vec<String> = (0..1 + rng.below(10))
                .map(|c| format!("{}@10.0.0.{c}@{}", ROOMS[rng.below(3)], rng.next() % 1000))
                .collect();
            cids.sort();
            cids.dedup();
            // The consumers see the lists in different orders: no matter.
            rng.shuffle(&mut mqs);
            let inners = [Strategy::Averagely, Strategy::AveragelyByCircle, Strategy::consistent_hash()];
            let mut strategies = vec![
                Strategy::Averagely,
                Strategy::AveragelyByCircle,
                Strategy::ConsistentHash { virtual_nodes: 1 + rng.below(20) },
            ];
            strategies.extend(inners.iter().map(|i| Strategy::machine_room_nearby(i.clone())));
            for s in &strategies {
                let shares: Vec<Vec<QueueRef>> = cids
                    .iter()
                    .map(|c| {
                        let mut view = cids.clone();
                        rng.shuffle(&mut view);
                        allocate_in_topic(s, "g", "T", c, &view, &mqs)
                    })
                    .collect();
                assert_partition(&shares, &mqs, &format!("round {round} {}", s.name()));
                if *s == Strategy::Averagely || *s == Strategy::AveragelyByCircle {
                    let sizes: Vec<usize> = shares.iter().map(Vec::len).collect();
                    let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                    assert!(hi - lo <= 1, "{}: unbalanced {sizes:?}", s.name());
                }
            }
            // By machine room: exactly the queues of the chosen rooms.
            let rooms: Vec<String> = ROOMS.iter().filter(|_| rng.below(2) == 0).map(|r| r.to_string()).collect();
            let s = Strategy::ByMachineRoom(rooms.clone());
            let in_rooms: Vec<QueueRef> =
                mqs.iter().filter(|q| rooms.iter().any(|r| q.broker.starts_with(&format!("{r}@")))).cloned().collect();
            assert_partition(&all(&s, "T", &cids, &mqs), &in_rooms, &format!("round {round} by room {rooms:?}"));
            // By config: each consumer configured with its part of a partition.
            let parts: Vec<Vec<QueueRef>> = {
                let mut parts = vec![Vec::new(); cids.len()];
                for q in &mqs {
                    parts[rng.below(cids.len())].push(q.clone());
                }
                parts
            };
            let shares: Vec<Vec<QueueRef>> = cids
                .iter()
                .zip(&parts)
                .map(|(c, p)| allocate(&Strategy::ByConfig(p.clone()), "g", c, &cids, &mqs))
                .collect();
            assert_partition(&shares, &mqs, &format!("round {round} by config"));
        }
    }

    #[test]
    fn averagely_known_examples() {
        let mqs = queues(&[("broker-a", 10)]);
        let cids = ids(&["c0", "c1", "c2"]);
        let shares = all(&Strategy::Averagely, "T", &cids, &mqs);
        let want: Vec<Vec<u32>> = vec![vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]];
        assert_eq!(shares.iter().map(|s| s.iter().map(|q| q.queue).collect::<Vec<_>>()).collect::<Vec<_>>(), want);
        // More consumers than queues: the last ones get nothing.
        let shares = all(&Strategy::Averagely, "T", &ids(&["a", "b", "c"]), &queues(&[("b", 2)]));
        assert_eq!(shares, vec![vec![q("b", 0)], vec![q("b", 1)], vec![]]);
        // Sorted by broker then queue: broker-a's queues come first.
        let mqs = queues(&[("broker-b", 2), ("broker-a", 2)]);
        let shares = all(&Strategy::Averagely, "T", &ids(&["x", "y"]), &mqs);
        assert_eq!(shares, vec![vec![q("broker-a", 0), q("broker-a", 1)], vec![q("broker-b", 0), q("broker-b", 1)]]);
    }

    #[test]
    fn by_circle_known_example() {
        let shares = all(&Strategy::AveragelyByCircle, "T", &ids(&["c0", "c1", "c2"]), &queues(&[("b", 10)]));
        let got: Vec<Vec<u32>> = shares.iter().map(|s| s.iter().map(|q| q.queue).collect()).collect();
        assert_eq!(got, vec![vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
    }

    #[test]
    fn by_config_returns_the_configured_queues_that_exist() {
        let mqs = queues(&[("b", 4)]);
        let s = Strategy::ByConfig(vec![q("b", 3), q("b", 1), q("b", 3), q("x", 0)]);
        assert_eq!(allocate(&s, "g", "c", &ids(&["c"]), &mqs), vec![q("b", 3), q("b", 1)]);
    }

    #[test]
    fn by_machine_room_known_example() {
        // 8 queues in the rooms hz and sh, 2 in bj (not consumed), 3 consumers:
        // 2 each, the remainder (2) dealt to the first consumers.
        let mqs = queues(&[("hz@b1", 4), ("sh@b2", 4), ("bj@b3", 2), ("nameless", 2)]);
        let s = Strategy::ByMachineRoom(ids(&["hz", "sh"]));
        let shares = all(&s, "T", &ids(&["c0", "c1", "c2"]), &mqs);
        assert_eq!(shares[0], vec![q("hz@b1", 0), q("hz@b1", 1), q("sh@b2", 2)]);
        assert_eq!(shares[1], vec![q("hz@b1", 2), q("hz@b1", 3), q("sh@b2", 3)]);
        assert_eq!(shares[2], vec![q("sh@b2", 0), q("sh@b2", 1)]);
    }

    #[test]
    fn java_split_drops_trailing_empty_parts() {
        assert_eq!(java_split("a@b", '@'), vec!["a", "b"]);
        assert_eq!(java_split("a@b@", '@'), vec!["a", "b"]);
        assert_eq!(java_split("a", '@'), vec!["a"]);
        assert_eq!(java_split("@b", '@'), vec!["", "b"]);
        assert_eq!(java_split("@@", '@'), Vec::<&str>::new());
        assert_eq!(java_split("", '@'), vec![""]);
    }

    #[test]
    fn consistent_hash_matches_java_ring() {
        // Expected shares computed independently (Python: hashlib.md5, first
        // four bytes big-endian, a sorted ring of "<cid>-<i>", keys
        // "MessageQueue [topic=…, brokerName=…, queueId=…]").
        let mqs = queues(&[("broker-a", 4), ("broker-b", 4)]);
        let cids = ids(&["10.0.0.1@c1", "10.0.0.2@c2", "10.0.0.3@c3"]);
        let shares = all(&Strategy::consistent_hash(), "TopicTest", &cids, &mqs);
        assert_eq!(shares[0], vec![q("broker-a", 0)]);
        assert_eq!(shares[1], vec![q("broker-a", 2), q("broker-b", 0)]);
        assert_eq!(
            shares[2],
            vec![q("broker-a", 1), q("broker-a", 3), q("broker-b", 1), q("broker-b", 2), q("broker-b", 3)]
        );
        let shares = all(&Strategy::ConsistentHash { virtual_nodes: 3 }, "TopicTest", &cids, &mqs);
        assert_eq!(shares[0], vec![q("broker-a", 0), q("broker-a", 1)]);
        assert_eq!(shares[1], vec![q("broker-a", 3), q("broker-b", 0), q("broker-b", 2)]);
        assert_eq!(shares[2], vec![q("broker-a", 2), q("broker-b", 1), q("broker-b", 3)]);
        // Without a topic (allocate): the empty topic name is hashed.
        let shares: Vec<Vec<QueueRef>> =
            cids.iter().map(|c| allocate(&Strategy::consistent_hash(), "g", c, &cids, &mqs)).collect();
        assert_eq!(shares[0], vec![q("broker-b", 0)]);
        assert_eq!(shares[1], vec![q("broker-a", 0), q("broker-b", 2), q("broker-b", 3)]);
        // No virtual node: nobody owns anything (as in Java).
        assert!(all(&Strategy::ConsistentHash { virtual_nodes: 0 }, "T", &cids, &mqs).iter().all(Vec::is_empty));
    }

    #[test]
    fn consistent_hash_moves_few_queues_when_a_consumer_leaves() {
        let mqs = queues(&[("a", 16), ("b", 16)]);
        let cids = ids(&["c1", "c2", "c3", "c4"]);
        let before = all(&Strategy::consistent_hash(), "T", &cids, &mqs);
        let after = all(&Strategy::consistent_hash(), "T", &cids[..3], &mqs);
        // The queues of the remaining consumers stay where they were.
        for (b, a) in before.iter().zip(&after) {
            assert!(b.iter().all(|q| a.contains(q)), "{b:?} -> {a:?}");
        }
    }

    #[test]
    fn machine_room_nearby_known_example() {
        let mqs = queues(&[("hz@b1", 2), ("sh@b2", 2), ("bj@b3", 2)]);
        let cids = ids(&["hz@c1", "hz@c2", "sh@c3"]);
        let s = Strategy::machine_room_nearby(Strategy::Averagely);
        assert_eq!(s.name(), "MACHINE_ROOM_NEARBY-AVG");
        let shares = all(&s, "T", &cids, &mqs);
        // hz's queues to hz's consumers, sh's to sh's, bj (no consumer) to all.
        assert_eq!(shares[0], vec![q("hz@b1", 0), q("bj@b3", 0)]);
        assert_eq!(shares[1], vec![q("hz@b1", 1), q("bj@b3", 1)]);
        assert_eq!(shares[2], vec![q("sh@b2", 0), q("sh@b2", 1)]);
        // Resolvers by table.
        let map = |pairs: &[(&str, &str)]| {
            RoomResolver::Map(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect())
        };
        let s = Strategy::MachineRoomNearby {
            inner: Box::new(Strategy::AveragelyByCircle),
            broker_room: map(&[("x", "r1"), ("y", "r2")]),
            consumer_room: map(&[("c1", "r1")]),
        };
        let mqs = queues(&[("x", 2), ("y", 2)]);
        let shares = all(&s, "T", &ids(&["c1", "c2"]), &mqs);
        // c2 is in room "" (unknown): only r2's queues are shared with it.
        assert_eq!(shares[0], vec![q("x", 0), q("x", 1), q("y", 0)]);
        assert_eq!(shares[1], vec![q("y", 1)]);
    }

    #[test]
    fn invalid_inputs_give_nothing() {
        let mqs = queues(&[("b", 4)]);
        let cids = ids(&["c1", "c2"]);
        assert!(allocate(&Strategy::Averagely, "g", "stranger", &cids, &mqs).is_empty());
        assert!(allocate(&Strategy::Averagely, "g", "", &cids, &mqs).is_empty());
        assert!(allocate(&Strategy::Averagely, "g", "c1", &cids, &[]).is_empty());
        assert!(allocate(&Strategy::Averagely, "g", "c1", &[], &mqs).is_empty());
        // Duplicate ids count once.
        let dup = ids(&["c1", "c1", "c2"]);
        assert_eq!(allocate(&Strategy::Averagely, "g", "c2", &dup, &mqs), vec![q("b", 2), q("b", 3)]);
    }
}
