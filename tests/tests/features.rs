//! RocketMQ's message features through our own Rust client against a
//! three-node group: delay, transactions (commit, rollback, check-back),
//! FIFO, tag and SQL filters, dead letters (list, resend), query by id and
//! key, push consumers sharing a group, broadcasting.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

use raftmq_client::ConsumeResult;
use raftmq_client::Filter;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::SimpleConsumer;
use raftmq_tests::Cluster;

fn ms_since_epoch() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn drain(c: &SimpleConsumer, topic: &str, want: usize, within: Duration) -> Vec<raftmq_client::Received> {
    let until = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < until {
        if let Ok(batch) = c.receive(topic, None, 16, Duration::from_secs(20), Duration::from_secs(2)).await {
            for m in batch {
                c.ack(&m).await.expect("ack");
                got.push(m);
            }
        }
    }
    got
}

#[test]
fn our_client_covers_the_message_features() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[transaction]\ncheck_interval_ms = 1500\n";
    let c = Cluster::start(dir.path(), 3, extra);
    let eps = c.addrs();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let admin = raftmq_client::Admin::connect(&eps[0]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        for (t, ty) in [("f-delay", 3), ("f-tx", 4), ("f-fifo", 2), ("f-normal", 1)] {
            loop {
                match admin.create_topic(t, 2, ty, false).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => panic!("create {t}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        for (name, fifo, max) in [("f-fifo-g", true, 0), ("f-dlq-g", false, 2)] {
            let config = raftmq_proto::admin::GroupConfig {
                name: name.into(),
                consume_enabled: true,
                max_delivery_attempts: max,
                fifo,
                broadcast_enabled: false,
            };
            admin.update_group(config).await.unwrap();
        }
        let producer = Producer::new(&eps, ProducerOptions::default()).unwrap();

        // Delay: not before its time, and soon after it.
        let consumer = SimpleConsumer::new(&eps[1..2], "f-delay-g").unwrap();
        let at = SystemTime::now() + Duration::from_secs(2);
        let due_ms = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
        producer.send("f-delay", OutMessage::new("later").deliver_at(at)).await.unwrap();
        producer.send("f-delay", OutMessage::new("level-1").delay_level(1)).await.unwrap();
        let got = drain(&consumer, "f-delay", 1, Duration::from_secs(15)).await;
        assert_eq!(got.len(), 1, "the 1 s delay level arrives first");
        assert_eq!(got[0].body, b"level-1");
        let got = drain(&consumer, "f-delay", 1, Duration::from_secs(15)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, b"later");
        let received_ms = ms_since_epoch();
        println!("delay: 'later' received {} ms after its delivery time", received_ms - due_ms);
        assert!(received_ms >= due_ms, "not before its time");
        assert!(received_ms - due_ms < 1500, "released promptly");

        // Transactions: commit visible, rollback never; an orphan is checked back.
        let checked = Arc::new(Mutex::new(Vec::new()));
        let seen = checked.clone();
        let txp = raftmq_client::TransactionProducer::start(
            &eps[..1],
            &["f-tx".to_string()],
            ProducerOptions::default(),
            move |m: &raftmq_client::Received| {
                seen.lock().unwrap().push(m.message_id.clone());
                raftmq_client::TransactionResolution::Commit
            },
        )
        .await
        .unwrap();
        let mut t1 = txp.begin();
        txp.send(&mut t1, "f-tx", OutMessage::new("commit-me")).await.unwrap();
        let mut t2 = txp.begin();
        txp.send(&mut t2, "f-tx", OutMessage::new("roll-me-back")).await.unwrap();
        let mut t3 = txp.begin();
        let orphan = txp.send(&mut t3, "f-tx", OutMessage::new("orphan")).await.unwrap();
        let tx_consumer = SimpleConsumer::new(&eps[2..3], "f-tx-g").unwrap();
        let early = tx_consumer.receive("f-tx", None, 16, Duration::from_secs(20), Duration::from_millis(500)).await;
        assert!(early.map(|v| v.is_empty()).unwrap_or(true), "half messages are invisible");
        t1.commit().await.unwrap();
        t2.rollback().await.unwrap();
        drop(t3); // never resolved by the producer: the broker asks it
        let got = drain(&tx_consumer, "f-tx", 2, Duration::from_secs(20)).await;
        let bodies: HashSet<Vec<u8>> = got.iter().map(|m| m.body.clone()).collect();
        assert!(bodies.contains(b"commit-me".as_slice()) && bodies.contains(b"orphan".as_slice()), "{bodies:?}");
        assert!(checked.lock().unwrap().contains(&orphan.message_id), "the orphan was checked back");
        let more = drain(&tx_consumer, "f-tx", 1, Duration::from_secs(3)).await;
        assert!(more.iter().all(|m| m.body != b"roll-me-back"), "a rolled-back message is never delivered");
        txp.shutdown().await.unwrap();

        // FIFO: per message group in send order, next held until the previous is acked.
        for i in 0..12 {
            let g = format!("mg{}", i % 3);
            producer.send("f-fifo", OutMessage::new(format!("{g}:{i}")).message_group(g)).await.unwrap();
        }
        let fifo = SimpleConsumer::new(&eps[..1], "f-fifo-g").unwrap();
        let mut order: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let until = Instant::now() + Duration::from_secs(30);
        while order.values().map(Vec::len).sum::<usize>() < 12 && Instant::now() < until {
            let batch = fifo.receive("f-fifo", None, 16, Duration::from_secs(20), Duration::from_secs(1)).await;
            let batch = batch.unwrap_or_default();
            let groups: Vec<&str> = batch.iter().filter_map(|m| m.message_group.as_deref()).collect();
            let distinct: HashSet<&&str> = groups.iter().collect();
            assert_eq!(distinct.len(), groups.len(), "one message per message group in flight");
            for m in &batch {
                let s = String::from_utf8_lossy(&m.body).to_string();
                let (g, i) = s.split_once(':').unwrap();
                order.entry(g.to_string()).or_default().push(i.parse().unwrap());
                fifo.ack(m).await.unwrap();
            }
        }
        for (g, seq) in &order {
            assert!(seq.windows(2).all(|w| w[0] < w[1]), "{g} out of order: {seq:?}");
        }
        assert_eq!(order.values().map(Vec::len).sum::<usize>(), 12);

        // Filters: tags and SQL92.
        for i in 0..6 {
            let tag = if i % 2 == 0 { "red" } else { "blue" };
            let m = OutMessage::new(format!("f{i}"))
                .with_tag(tag)
                .with_property("n", i.to_string())
                .with_key(format!("key-{i}"));
            producer.send("f-normal", m).await.unwrap();
        }
        let by_tag =
            SimpleConsumer::new(&eps[..1], "f-tag-g").unwrap().with_filter("f-normal", Filter::Tag("red".into()));
        let got = drain(&by_tag, "f-normal", 3, Duration::from_secs(15)).await;
        assert!(got.len() == 3 && got.iter().all(|m| m.tag.as_deref() == Some("red")), "{got:?}");
        let by_sql =
            SimpleConsumer::new(&eps[..1], "f-sql-g").unwrap().with_filter("f-normal", Filter::Sql("n >= 4".into()));
        let got = drain(&by_sql, "f-normal", 2, Duration::from_secs(15)).await;
        let mut ns: Vec<String> = got.iter().map(|m| m.properties["n"].clone()).collect();
        ns.sort();
        assert_eq!(ns, vec!["4", "5"]);

        // Query by key and by id.
        let found = admin.query_message_by_key("f-normal", "key-3", 10).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].body.as_ref(), b"f3");
        let by_id = admin.query_message_by_id(&found[0].message_id, None).await.unwrap();
        assert_eq!(by_id.len(), 1);

        // Dead letters: two attempts, then the DLQ; the CLI's resend brings it back.
        producer.send("f-normal", OutMessage::new("doomed").with_tag("doom")).await.unwrap();
        let dlq =
            SimpleConsumer::new(&eps[..1], "f-dlq-g").unwrap().with_filter("f-normal", Filter::Tag("doom".into()));
        let mut attempts = Vec::new();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && attempts.len() < 3 {
            for mut m in dlq
                .receive("f-normal", None, 4, Duration::from_secs(20), Duration::from_secs(1))
                .await
                .unwrap_or_default()
            {
                attempts.push(m.delivery_attempt);
                dlq.nack(&mut m, Some(Duration::from_millis(500))).await.unwrap();
            }
            let letters = admin.dead_letters("f-dlq-g", 0, 10).await.unwrap();
            if !letters.messages.is_empty() {
                break;
            }
        }
        assert_eq!(attempts, vec![1, 2], "two attempts, then the dead-letter queue");
        let letters = admin.dead_letters("f-dlq-g", 0, 10).await.unwrap();
        assert_eq!(letters.messages.len(), 1);
        assert_eq!(letters.messages[0].body.as_ref(), b"doomed");
        assert_eq!(letters.messages[0].attempts, 2);
        admin.resend_dead_letter("f-dlq-g", 0).await.unwrap();
        let back = drain(&dlq, "f-normal", 1, Duration::from_secs(10)).await;
        assert_eq!(back.len(), 1, "a resent dead letter is delivered again");
        assert_eq!(back[0].delivery_attempt, 1);

        // Push consumers sharing a group, then broadcasting.
        let counts: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let mut pushers = Vec::new();
        for name in ["a", "b"] {
            let counts = counts.clone();
            let p = raftmq_client::PushConsumer::start(
                &eps[..1],
                "f-push-g",
                "f-normal",
                Filter::Tag("push".into()),
                raftmq_client::PushConsumerOptions::default(),
                move |_m: &raftmq_client::Received| {
                    *counts.lock().unwrap().entry(name.to_string()).or_default() += 1;
                    ConsumeResult::Success
                },
            )
            .await
            .unwrap();
            pushers.push(p);
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut bc1 =
            raftmq_client::BroadcastConsumer::new(&eps[..1], "f-bc", "f-normal", Default::default()).await.unwrap();
        let mut bc2 =
            raftmq_client::BroadcastConsumer::new(&eps[1..2], "f-bc", "f-normal", Default::default()).await.unwrap();
        for i in 0..40 {
            producer.send("f-normal", OutMessage::new(format!("p{i}")).with_tag("push")).await.unwrap();
        }
        let until = Instant::now() + Duration::from_secs(30);
        while counts.lock().unwrap().values().sum::<usize>() < 40 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let counts = counts.lock().unwrap().clone();
        println!("push consumers: {counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 40);
        assert_eq!(counts.len(), 2, "both push consumers of the group got queues");
        for p in pushers {
            p.shutdown().await.unwrap();
        }
        for bc in [&mut bc1, &mut bc2] {
            let mut got = 0;
            let until = Instant::now() + Duration::from_secs(20);
            while got < 40 && Instant::now() < until {
                got += bc.poll(64, Duration::from_secs(1)).await.unwrap().len();
            }
            assert_eq!(got, 40, "every broadcast consumer gets every message");
        }
    });
}
