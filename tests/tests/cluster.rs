//! A three-node group of real processes: replication, failover, restart,
//! follower reads, bad input, name-server routes.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use raftmq_client::Admin;
use raftmq_client::ClientError;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::SimpleConsumer;
use raftmq_tests::Cluster;

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Waits until some node reports a leader that every reachable node agrees on.
/// The group's leader, once every node that answers names it. A node
/// reporting itself leader is not enough: with openraft's advanced leader
/// ids (term, node id), a second candidate of the same term can still take
/// over right after the first one won at startup (seen in a parallel CI
/// run: node 2 led term 1, then node 3 did).
pub(crate) async fn wait_for_leader(c: &Cluster, within: Duration) -> (u64, Admin) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut leader = None;
        let mut named = Vec::new();
        for (_, addr) in &c.nodes {
            let Ok(a) = Admin::connect(addr) else { continue };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), a.node_status()).await {
                named.push(s.leader_id);
                if s.role == "leader" {
                    leader = Some((s.node_id, a));
                }
            }
        }
        if let Some((id, a)) = leader
            && named.iter().all(|l| *l == Some(id))
        {
            return (id, a);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.dump_logs();
    panic!("no leader within {within:?}");
}

pub(crate) async fn create_topic(a: &Admin, name: &str, queues: u32) {
    for _ in 0..50 {
        match a.create_topic(name, queues, 1, false).await {
            Ok(_) => return,
            Err(e) if e.to_string().contains("exists") => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("could not create topic {name}");
}

/// Consumes until every id in `expect` arrived or `within` passes; acks all.
pub(crate) async fn drain(
    consumer: &SimpleConsumer,
    topic: &str,
    expect: &HashSet<String>,
    within: Duration,
) -> Vec<(String, u32, u64)> {
    let deadline = Instant::now() + within;
    let mut got: Vec<(String, u32, u64)> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    while Instant::now() < deadline && !expect.iter().all(|id| seen.contains(id)) {
        match consumer.receive(topic, None, 32, Duration::from_secs(20), Duration::from_secs(2)).await {
            Ok(batch) => {
                // Acks of one batch in parallel: each is a Raft commit.
                futures::future::join_all(batch.iter().map(|m| consumer.ack(m))).await;
                for m in batch {
                    let body = String::from_utf8(m.body.clone()).unwrap();
                    seen.insert(body.clone());
                    got.push((body, m.queue, m.offset));
                }
            }
            Err(e) => {
                eprintln!("receive: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    got
}

/// Waits until the node at `addr` applied everything the leader committed.
pub async fn wait_caught_up(c: &Cluster, leader: &Admin, addr: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let commit = leader.node_status().await.unwrap().commit_index;
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(1), async { Admin::connect(addr)?.node_status().await }).await
            && s.applied_index >= commit
        {
            return;
        }
        if Instant::now() > deadline {
            c.dump_logs();
            panic!("{addr} did not catch up to {commit} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn leader_kill_mid_stream_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, "");
    let rt = runtime();
    const TOTAL: u64 = 10_000;
    const PRODUCERS: u64 = 8;
    let (acked, unknown, failover) = rt.block_on(async {
        let (_, admin) = wait_for_leader(&c, Duration::from_secs(30)).await;
        create_topic(&admin, "orders", 4).await;
        let opts =
            ProducerOptions { max_attempts: 20, request_timeout: Duration::from_secs(5), ..ProducerOptions::default() };
        let producer = Producer::new(&c.addrs(), opts).unwrap();
        let acked: Arc<Mutex<BTreeMap<String, (u64, u64)>>> = Arc::default(); // body -> (producer, seq)
        let unknown: Arc<Mutex<HashSet<String>>> = Arc::default();
        // Set when the leader is killed; then the first ack of a send started after it.
        let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let first_after_kill: Arc<Mutex<Option<Instant>>> = Arc::default();
        let mut tasks = Vec::new();
        for p in 0..PRODUCERS {
            let (producer, acked, unknown, killed_at, first_after_kill) =
                (producer.clone(), acked.clone(), unknown.clone(), killed_at.clone(), first_after_kill.clone());
            tasks.push(tokio::spawn(async move {
                for seq in 0..TOTAL / PRODUCERS {
                    let body = format!("p{p}-{seq}");
                    let m =
                        OutMessage { body: body.clone().into_bytes(), keys: vec![body.clone()], ..Default::default() };
                    let mut done = false;
                    for _ in 0..5 {
                        let started = Instant::now();
                        match producer.send("orders", m.clone()).await {
                            Ok(_) => {
                                acked.lock().unwrap().insert(body.clone(), (p, seq));
                                if killed_at.lock().unwrap().is_some_and(|k| started > k) {
                                    first_after_kill.lock().unwrap().get_or_insert_with(Instant::now);
                                }
                                done = true;
                                break;
                            }
                            Err(e) if e.retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                            Err(e) => panic!("send {body}: {e}"),
                        }
                    }
                    if !done {
                        unknown.lock().unwrap().insert(body);
                    }
                }
            }));
        }
        // Kill the leader once a third is acknowledged.
        while acked.lock().unwrap().len() < (TOTAL / 3) as usize {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (leader, _) = wait_for_leader(&c, Duration::from_secs(10)).await;
        c.kill_node(c.index_of(leader));
        let kill = Instant::now();
        *killed_at.lock().unwrap() = Some(kill);
        // Failover: from the kill to the first ack of a send started after it.
        let mut failover = None;
        while failover.is_none() && kill.elapsed() < Duration::from_secs(30) {
            failover = first_after_kill.lock().unwrap().map(|t| t - kill);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("killed leader node {leader}; first acknowledged write after {failover:?}");
        for t in tasks {
            t.await.unwrap();
        }
        // Restart the killed node; it catches up from the new leader.
        c.start_node(c.index_of(leader));
        let acked = acked.lock().unwrap().clone();
        let unknown = unknown.lock().unwrap().clone();
        (acked, unknown, failover)
    });
    assert!(failover.is_some(), "no write was acknowledged after the leader was killed");

    let got = rt.block_on(async {
        let consumer = SimpleConsumer::new(&c.addrs(), "checker").unwrap();
        let expect: HashSet<String> = acked.keys().cloned().collect();
        drain(&consumer, "orders", &expect, Duration::from_secs(120)).await
    });
    let received: HashSet<&String> = got.iter().map(|(b, _, _)| b).collect();
    let lost: Vec<&String> = acked.keys().filter(|b| !received.contains(b)).collect();
    let unexpected: Vec<&String> =
        received.iter().copied().filter(|b| !acked.contains_key(*b) && !unknown.contains(*b)).collect();
    let duplicates = got.len() - received.len();
    println!(
        "acked {}, unknown outcome {}, received {} distinct ({duplicates} redeliveries), lost {}, unexpected {}",
        acked.len(),
        unknown.len(),
        received.len(),
        lost.len(),
        unexpected.len()
    );
    if !lost.is_empty() {
        c.dump_logs();
    }
    assert!(lost.is_empty(), "acknowledged but never delivered: {:?}", &lost[..lost.len().min(10)]);
    assert!(unexpected.is_empty(), "delivered but never sent: {unexpected:?}");
    // Per-queue order: one producer's messages in one queue keep send order.
    let mut by_queue: HashMap<(u32, u64), Vec<(u64, u64)>> = HashMap::new(); // (queue, producer) -> (offset, seq)
    let mut first_seen: HashSet<&String> = HashSet::new();
    for (body, q, off) in &got {
        if let Some((p, seq)) = acked.get(body)
            && first_seen.insert(body)
        {
            by_queue.entry((*q, *p)).or_default().push((*off, *seq));
        }
    }
    for ((q, p), mut v) in by_queue {
        v.sort();
        assert!(v.windows(2).all(|w| w[0].1 < w[1].1), "queue {q}: producer {p}'s messages out of send order");
    }
    // The restarted node caught up.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, admin) = wait_for_leader(&c, Duration::from_secs(10)).await;
            let nodes = admin.cluster_status().await.unwrap();
            let max_applied = nodes.iter().map(|n| n.applied_index).max().unwrap();
            if nodes.iter().all(|n| n.role != "unreachable" && n.applied_index == max_applied) {
                for n in &nodes {
                    assert!(n.applied_index <= n.commit_index, "node {} applied past its commit index", n.node_id);
                }
                break;
            }
            assert!(Instant::now() < deadline, "restarted node did not catch up: {nodes:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn follower_reads_serve_consumers_of_a_loaded_leader() {
    let dir = tempfile::tempdir().unwrap();
    // Every read on the leader counts as "loaded": all go to followers.
    let c = Cluster::start(dir.path(), 3, "[follower_read]\nmax_inflight_reads = 0\n");
    let rt = runtime();
    rt.block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(30)).await;
        create_topic(&admin, "reads", 2).await;
        let leader_addr = c.nodes[c.index_of(leader)].1.clone();
        let producer = Producer::new(std::slice::from_ref(&leader_addr), ProducerOptions::default()).unwrap();
        let mut sent = HashSet::new();
        for i in 0..200 {
            let body = format!("r{i}");
            producer.send("reads", OutMessage::new(body.clone())).await.unwrap();
            sent.insert(body);
        }
        // Consume through the leader only.
        let consumer = SimpleConsumer::new(std::slice::from_ref(&leader_addr), "readers").unwrap();
        let got = drain(&consumer, "reads", &sent, Duration::from_secs(60)).await;
        let received: HashSet<String> = got.into_iter().map(|(b, _, _)| b).collect();
        assert_eq!(received, sent, "every message read back through follower reads");
        let nodes = admin.cluster_status().await.unwrap();
        let follower_reads: u64 = nodes.iter().filter(|n| n.node_id != leader).map(|n| n.follower_reads_served).sum();
        println!("follower reads served: {follower_reads}");
        if follower_reads == 0 {
            // Seen once under a parallel CI run: the node the test took for
            // the leader served the reads itself. Keep what explains it.
            c.dump_logs();
        }
        assert!(
            follower_reads > 0,
            "no read was served by a follower (leader taken: node {leader} at {leader_addr}): {nodes:?}"
        );
        for n in &nodes {
            assert!(n.applied_index <= n.commit_index, "node {} applied past its commit index", n.node_id);
        }
    });
}

#[test]
fn bad_input_gets_clear_errors_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    let rt = runtime();
    rt.block_on(async {
        let (_, admin) = wait_for_leader(&c, Duration::from_secs(30)).await;
        create_topic(&admin, "good", 1).await;
        let producer = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
        producer.send("good", OutMessage::new("before")).await.unwrap();

        let code = |e: ClientError| match e {
            ClientError::Broker { code, message } => (code, message),
            other => panic!("expected a broker status, got {other}"),
        };
        // Unknown topic.
        let (c1, m1) = code(producer.send("nosuch", OutMessage::new("x")).await.unwrap_err());
        assert_eq!(c1, 40402, "{m1}");
        // Oversized body (4 MiB limit).
        let (c2, m2) = code(producer.send("good", OutMessage::new(vec![0u8; 4 * 1024 * 1024 + 1])).await.unwrap_err());
        assert_eq!(c2, 41301, "{m2}");
        assert!(m2.contains("4194304"), "{m2}");
        // A key holding a NUL (index rows separate their fields with NUL).
        let mut nul = OutMessage::new("x");
        nul.keys = vec!["a\0b".into()];
        let (c4, m4) = code(producer.send("good", nul).await.unwrap_err());
        assert_eq!(c4, 40000, "{m4}");
        assert!(m4.contains("NUL"), "{m4}");
        // Bad topic name.
        let e = admin.create_topic("bad name!", 1, 1, false).await.unwrap_err();
        assert!(e.to_string().contains("character"), "{e}");
        let e = admin.create_topic("zero", 0, 1, false).await.unwrap_err();
        assert!(e.to_string().contains("queues"), "{e}");
        // A forged receipt handle.
        let consumer = SimpleConsumer::new(&c.addrs(), "g").unwrap();
        let mut got = consumer.receive("good", None, 1, Duration::from_secs(30), Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 1);
        let mut forged = got[0].clone();
        forged.receipt_handle = "not-a-handle".into();
        let (c3, _) = code(consumer.ack(&forged).await.unwrap_err());
        assert_eq!(c3, 40013);
        // The real handle works; acking it again (a client retrying an ack
        // whose answer it lost) is a no-op, like RocketMQ's.
        consumer.ack(&got[0]).await.unwrap();
        consumer.ack(&got.pop().unwrap()).await.expect("a repeated ack of a settled message is a no-op");
        // Nothing acknowledged was lost.
        producer.send("good", OutMessage::new("after")).await.unwrap();
        let got = consumer.receive("good", None, 8, Duration::from_secs(30), Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.iter().map(|m| String::from_utf8_lossy(&m.body).to_string()).collect::<Vec<_>>(), vec!["after"]);

        // Group configuration goes through the log: a disabled group cannot
        // receive, on any node; re-enabled, it can.
        let mut conf =
            raftmq_proto::admin::GroupConfig { name: "g".into(), consume_enabled: false, ..Default::default() };
        admin.update_group(conf.clone()).await.unwrap();
        for addr in c.addrs() {
            let a = Admin::connect(&addr).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !a.list_groups().await.unwrap().iter().any(|g| g.name == "g" && !g.consume_enabled) {
                assert!(Instant::now() < deadline, "{addr} never applied the group config");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        producer.send("good", OutMessage::new("held")).await.unwrap();
        let e = consumer.receive("good", None, 8, Duration::from_secs(30), Duration::from_secs(1)).await.unwrap_err();
        assert!(e.to_string().contains("disabled"), "{e}");
        conf.consume_enabled = true;
        admin.update_group(conf).await.unwrap();
        let got = consumer.receive("good", None, 8, Duration::from_secs(30), Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 1, "re-enabled group receives");
        let e = admin.delete_group("nope").await.unwrap_err();
        assert!(e.to_string().contains("no configuration"), "{e}");
    });
}

#[test]
fn name_server_routes_to_the_group_and_its_leader() {
    use raftmq_proto::namesrv::GetRouteRequest;
    use raftmq_proto::namesrv::name_server_client::NameServerClient;
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    let rt = runtime();
    rt.block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(30)).await;
        create_topic(&admin, "routed", 3).await;
        // Registration happens at once on a role change and every 30 s; the
        // topic shows up with the next registration after creation.
        let mut ns = NameServerClient::connect(format!("http://{}", c.namesrv_addr)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(r) = ns.get_route(GetRouteRequest { topic: "routed".into() }).await {
                let groups = r.into_inner().groups;
                assert_eq!(groups.len(), 1);
                assert_eq!(groups[0].queues, 3);
                let leaders: Vec<u64> = groups[0].nodes.iter().filter(|n| n.leader).map(|n| n.node_id).collect();
                if leaders == vec![leader] && groups[0].nodes.len() == 3 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "route never showed the group with its leader");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}
