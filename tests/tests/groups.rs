//! Two broker groups, one topic spanning both: every node serves the whole
//! cluster, forwarding by broker name; routes survive the name server.

use std::collections::HashSet;
use std::time::Duration;
use std::time::Instant;

use raftmq_client::Admin;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::PullConsumer;
use raftmq_client::SimpleConsumer;
use raftmq_tests::Cluster;

use crate::cluster::create_topic;
use crate::cluster::drain;
use crate::cluster::runtime;
use crate::cluster::wait_for_leader;

const TOPIC: &str = "spread";

/// Messages stored for `TOPIC` in one group (sum of its queues' max offsets).
async fn stored(admin: &Admin) -> u64 {
    let topics = admin.list_topics().await.unwrap();
    let t = topics.iter().find(|t| t.config.as_ref().is_some_and(|c| c.name == TOPIC)).expect("topic listed");
    t.queues.iter().map(|q| q.max_offset).sum()
}

async fn send_numbered(p: &Producer, from: u32, to: u32) -> HashSet<String> {
    let mut ids = HashSet::new();
    for i in from..to {
        let body = format!("s-{i}");
        p.send(TOPIC, OutMessage::new(body.clone().into_bytes())).await.unwrap_or_else(|e| panic!("send {i}: {e}"));
        ids.insert(body);
    }
    ids
}

#[test]
fn a_topic_spans_two_groups_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Cluster::start_group(dir.path(), "broker-a", 3, "", None);
    let b = Cluster::start_group(dir.path(), "broker-b", 3, "", Some(&a.namesrv_addr.clone()));
    runtime().block_on(async {
        let (_, admin_a) = wait_for_leader(&a, Duration::from_secs(20)).await;
        let (_, admin_b) = wait_for_leader(&b, Duration::from_secs(20)).await;
        create_topic(&admin_a, TOPIC, 2).await;
        create_topic(&admin_b, TOPIC, 3).await;

        // Any node of either group routes the topic over both groups' queues.
        let deadline = Instant::now() + Duration::from_secs(15);
        for addr in [&a.addrs()[1], &b.addrs()[2]] {
            let pc = PullConsumer::new(std::slice::from_ref(addr), "route-check").unwrap();
            loop {
                let queues = pc.queues(TOPIC).await.unwrap_or_default();
                let brokers: HashSet<&str> = queues.iter().map(|q| q.broker.as_str()).collect();
                if queues.len() == 5 && brokers == HashSet::from(["broker-a", "broker-b"]) {
                    break;
                }
                assert!(Instant::now() < deadline, "route at {addr}: {queues:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }

        // A producer that knows only group a's nodes: sends spread over both.
        let p = Producer::new(&a.addrs(), ProducerOptions::default()).unwrap();
        let mut expect = send_numbered(&p, 0, 200).await;
        let (in_a, in_b) = (stored(&admin_a).await, stored(&admin_b).await);
        eprintln!("200 sends through group a: {in_a} stored in broker-a, {in_b} in broker-b");
        assert_eq!(in_a + in_b, 200);
        assert!(in_b >= 50, "sends reach the other group ({in_b} of 200)");

        // A consumer that knows only group b's nodes receives every message
        // of both groups; its acks route back by the group in the handle.
        let consumer = SimpleConsumer::new(&b.addrs(), "spread-readers").unwrap();
        let got = drain(&consumer, TOPIC, &expect, Duration::from_secs(60)).await;
        let seen: HashSet<String> = got.iter().map(|(body, _, _)| body.clone()).collect();
        assert_eq!(seen, expect, "every message of both groups is received");
        for (admin, name) in [(&admin_a, "broker-a"), (&admin_b, "broker-b")] {
            let progress = admin.consumer_progress("spread-readers", TOPIC).await.unwrap();
            assert_eq!(progress.total_lag, 0, "{name}: every message acked ({progress:?})");
        }
        // The CLI resets the group's offsets in both broker groups (the
        // name server's route), not only in the one behind --server.
        let out = std::process::Command::new(raftmq_tests::bin("raftmq"))
            .args(["--server", &a.addrs()[0], "--namesrv", &a.namesrv_addr, "consumer", "reset-offset"])
            .args(["spread-readers", TOPIC, "--time", "0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("in 2 broker group(s)"), "{text}");
        for (admin, name, stored_here) in [(&admin_a, "broker-a", in_a), (&admin_b, "broker-b", in_b)] {
            let progress = admin.consumer_progress("spread-readers", TOPIC).await.unwrap();
            assert_eq!(progress.total_lag, stored_here, "{name}: back to the start ({progress:?})");
        }

        // A pull consumer on group a's nodes reads group b's queues by broker name.
        let pc = PullConsumer::new(&a.addrs(), "pullers").unwrap();
        let mut pulled_from_b = 0;
        for q in pc.queues(TOPIC).await.unwrap().iter().filter(|q| q.broker == "broker-b") {
            let (msgs, _) = pc.pull_queue(TOPIC, q, 0, 32, Duration::ZERO).await.unwrap();
            pulled_from_b += msgs.len() as u64;
        }
        let topics = admin_b.list_topics().await.unwrap();
        let t = topics.iter().find(|t| t.config.as_ref().is_some_and(|c| c.name == TOPIC)).unwrap();
        let expect_pulled: u64 = t.queues.iter().map(|q| q.max_offset.min(32)).sum();
        assert_eq!(pulled_from_b, expect_pulled, "pulls of broker-b queues through group a");

        // Every name server down: nodes route from their cached routes.
        a.kill_namesrv();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let more = send_numbered(&p, 200, 260).await;
        let (in_a2, in_b2) = (stored(&admin_a).await, stored(&admin_b).await);
        eprintln!("60 sends with no name server: broker-a +{}, broker-b +{}", in_a2 - in_a, in_b2 - in_b);
        assert_eq!(in_a2 + in_b2, 260);
        assert!(in_b2 > in_b, "the other group is still reached from cached routes");
        expect = more;
        let got = drain(&consumer, TOPIC, &expect, Duration::from_secs(60)).await;
        let seen: HashSet<String> = got.iter().map(|(body, _, _)| body.clone()).collect();
        assert!(expect.is_subset(&seen), "received with no name server");
    });
}
