//! Catch-up by snapshot: a follower that was down while retention removed
//! the log it missed, and a node added to a running group, both end with
//! every retained message readable, byte for byte as on the leader.

use std::collections::BTreeMap;
use std::time::Duration;
use std::time::Instant;

use raftmq_client::Admin;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::PullConsumer;
use raftmq_tests::Cluster;

use crate::cluster::create_topic;
use crate::cluster::runtime;
use crate::cluster::wait_caught_up;
use crate::cluster::wait_for_leader;

const TOPIC: &str = "snap";
const QUEUES: u32 = 2;

/// Small segments, every closed segment expired at once, retention twice a
/// second: the leader's log loses its head while a follower is away.
const CONFIG: &str = "[raft]\nretention_check_interval_ms = 500\n[limits]\nmax_body_bytes = 65536\n\
    [log]\nsegment_bytes = 1048576\nmax_entry_bytes = 524288\nfile_reserved_time_hours = 0\n";

/// Every message of every queue one node holds: queue -> (min offset, offset -> body).
type Held = BTreeMap<u32, (u64, BTreeMap<u64, Vec<u8>>)>;

async fn read_all(addr: &str) -> Held {
    let c = PullConsumer::new(&[addr.to_string()], "snapshot-check").unwrap();
    let mut out = BTreeMap::new();
    for q in 0..QUEUES {
        let mut got = BTreeMap::new();
        let mut offset = 0;
        let mut min = None;
        loop {
            let (batch, next) = c.pull(TOPIC, q, offset, 32, Duration::ZERO).await.unwrap();
            if batch.is_empty() {
                break;
            }
            min.get_or_insert(batch[0].offset);
            for m in batch {
                got.insert(m.offset, m.body);
            }
            offset = next;
        }
        out.insert(q, (min.unwrap_or(offset), got));
    }
    out
}

/// A short description of what a node holds, for failure messages.
fn summary(h: &Held) -> String {
    h.iter()
        .map(|(q, (min, m))| format!("q{q}: min {min}, {} messages, last {:?}", m.len(), m.keys().next_back()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Waits until two nodes hold the same messages. Retention runs on each node
/// on its own schedule, so the oldest retained offset may differ for a
/// moment; with writes stopped both converge on the same active segment.
async fn wait_same(a: &str, b: &str, within: Duration) -> Held {
    let deadline = Instant::now() + within;
    loop {
        let (x, y) = (read_all(a).await, read_all(b).await);
        if x == y {
            return x;
        }
        // Whatever both hold must be byte-identical, at every moment.
        for (q, (_, mx)) in &x {
            for (o, body) in &y[q].1 {
                if let Some(other) = mx.get(o) {
                    assert_eq!(other, body, "queue {q} offset {o} differs between {a} and {b}");
                }
            }
        }
        assert!(Instant::now() < deadline, "{a} holds [{}], {b} holds [{}]", summary(&x), summary(&y));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The node's log says it installed a snapshot with shipped segments.
fn assert_installed_snapshot(c: &Cluster, id: u64) {
    let log = std::fs::read_to_string(c.log_path(id)).unwrap();
    assert!(log.contains("snapshot received"), "node {id} received no snapshot");
    assert!(log.contains("snapshot installed"), "node {id} installed no snapshot");
}

async fn status(addr: &str) -> raftmq_proto::admin::NodeStatus {
    Admin::connect(addr).unwrap().node_status().await.unwrap()
}

#[test]
fn lagging_follower_and_new_node_catch_up_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, CONFIG);
    runtime().block_on(async {
        let (leader_id, leader) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&leader, TOPIC, QUEUES).await;
        let away = c.nodes.iter().map(|(id, _)| *id).find(|id| *id != leader_id).unwrap();
        let away_i = c.index_of(away);
        let away_addr = c.nodes[away_i].1.clone();
        c.kill_node(away_i);

        // About 4 MiB of messages: several segments, so retention has whole
        // closed segments to remove.
        let p = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
        let body = |i: u32| format!("m-{i:06}-{}", "x".repeat(1000)).into_bytes();
        for chunk in 0..125u32 {
            let batch: Vec<OutMessage> = (0..32).map(|k| OutMessage::new(body(chunk * 32 + k))).collect();
            p.send_batch(TOPIC, &batch).await.unwrap();
        }

        // Retention runs on the leader: its log no longer starts at 0.
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader_addr = leader.addr().to_string();
        loop {
            let s = status(&leader_addr).await;
            if s.log_first_index > 0 && s.snapshot_index > 0 {
                eprintln!("leader log starts at {}, snapshot at {}", s.log_first_index, s.snapshot_index);
                break;
            }
            assert!(Instant::now() < deadline, "retention never purged the leader's log: {s:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let on_leader = read_all(&leader_addr).await;
        assert!(on_leader.values().any(|(min, _)| *min > 0), "retention removed no message: {}", summary(&on_leader));

        // The follower comes back: the entries it missed are gone from the
        // leader's log, so only a snapshot (state + segments) can catch it up.
        c.start_node(away_i);
        wait_caught_up(&c, &leader, &away_addr, Duration::from_secs(60)).await;
        let s = status(&away_addr).await;
        assert!(s.log_first_index > 0, "the follower's log came from the leader's segments: {s:?}");
        assert_installed_snapshot(&c, away);
        let held = wait_same(&leader_addr, &away_addr, Duration::from_secs(20)).await;
        let retained: usize = held.values().map(|(_, m)| m.len()).sum();
        assert!(retained > 0, "something is retained");
        eprintln!("follower {away} holds the leader's {retained} retained messages [{}]", summary(&held));

        // A new node joins the running group and catches up the same way.
        let (new_id, new_addr) = c.add_node_process();
        leader.add_node(new_id, &new_addr).await.unwrap();
        wait_caught_up(&c, &leader, &new_addr, Duration::from_secs(60)).await;
        assert_installed_snapshot(&c, new_id);
        let held = wait_same(&leader_addr, &new_addr, Duration::from_secs(20)).await;
        eprintln!("new node {new_id} holds the leader's messages [{}]", summary(&held));

        // Writes keep flowing to all four, and the new node serves them.
        let r = p.send(TOPIC, OutMessage::new(b"after".to_vec())).await.unwrap();
        wait_caught_up(&c, &leader, &new_addr, Duration::from_secs(20)).await;
        let after = read_all(&new_addr).await;
        assert!(
            after.values().any(|(_, m)| m.values().any(|b| b == b"after")),
            "new write reached the new node ({r:?})"
        );
        let st = status(&new_addr).await;
        assert_eq!(st.role, "follower");
    });
}
