//! The client's side of the protocol against the in-process mock broker
//! (`mock.rs`): what each client sends, on which streams, with which headers.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raftmq_proto::rocketmq as pb;

use crate::BroadcastConsumer;
use crate::BroadcastOptions;
use crate::ConsumeResult;
use crate::Filter;
use crate::OutMessage;
use crate::Producer;
use crate::ProducerOptions;
use crate::PushConsumer;
use crate::PushConsumerOptions;
use crate::QueueRef;
use crate::Received;
use crate::SimpleConsumer;
use crate::StartPosition;
use crate::TransactionProducer;
use crate::TransactionResolution;
use crate::from_pb_duration;
use crate::mock::Mock;
use crate::mock::delivered;
use crate::pb_duration;
use crate::resource;
use crate::timestamp_ms;

fn orphan_check(id: &str, key: &str) -> pb::TelemetryCommand {
    let mut m = delivered("T", id, "half", 0, 0, 1);
    if let Some(sp) = m.system_properties.as_mut() {
        sp.keys = vec![key.into()];
        sp.message_type = pb::MessageType::Transaction as i32;
    }
    pb::TelemetryCommand {
        status: None,
        command: Some(pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(
            pb::RecoverOrphanedTransactionCommand { message: Some(m), transaction_id: format!("tx-{id}") },
        )),
    }
}

#[tokio::test]
async fn producer_sends_delay_and_fifo_messages_with_the_client_id() {
    let (addr, mock) = Mock::start().await;
    let p = Producer::new(&[addr], ProducerOptions::default()).unwrap();
    p.send("T", OutMessage::new("a").delay_level(2)).await.unwrap();
    p.send("T", OutMessage::new("b").message_group("g1")).await.unwrap();
    let st = mock.lock();
    let sp: Vec<pb::SystemProperties> =
        st.sends.iter().map(|s| s.messages[0].system_properties.clone().unwrap()).collect();
    assert_eq!(sp[0].message_type, pb::MessageType::Delay as i32);
    let due = timestamp_ms(sp[0].delivery_timestamp.as_ref().unwrap());
    assert_eq!(due - timestamp_ms(sp[0].born_timestamp.as_ref().unwrap()), 5000);
    assert_eq!(sp[1].message_type, pb::MessageType::Fifo as i32);
    assert_eq!(sp[1].message_group.as_deref(), Some("g1"));
    assert!(st.calls.iter().all(|(_, id)| id.as_deref() == Some(p.client_id())), "{:?}", st.calls);
}

#[tokio::test]
async fn transactions_commit_and_answer_checks() {
    let (addr, mock) = Mock::start().await;
    let checked = Arc::new(AtomicU32::new(0));
    let c2 = checked.clone();
    let checker = move |m: &Received| {
        c2.fetch_add(1, Ordering::SeqCst);
        match m.keys.first().map(String::as_str) {
            Some("commit") => TransactionResolution::Commit,
            Some("rollback") => TransactionResolution::Rollback,
            _ => TransactionResolution::Unknown,
        }
    };
    let p = TransactionProducer::start(&[addr], &["T".into()], ProducerOptions::default(), checker).await.unwrap();
    // Settings first: a producer publishing T, on a stream with our client id.
    mock.wait_for("producer settings", |s| !s.settings.is_empty() && !s.heartbeats.is_empty()).await;
    {
        let st = mock.lock();
        let s = &st.settings[0];
        assert_eq!(s.client_type, Some(pb::ClientType::Producer as i32));
        match &s.pub_sub {
            Some(pb::settings::PubSub::Publishing(p)) => assert_eq!(p.topics, vec![resource("T").unwrap()]),
            other => panic!("settings without publishing: {other:?}"),
        }
        assert_eq!(st.streams[0].1, p.client_id());
        assert_eq!(st.heartbeats[0].client_type, pb::ClientType::Producer as i32);
    }

    // A transaction: half message, then commit from the client.
    let mut tx = p.begin();
    let r = p.send(&mut tx, "T", OutMessage::new("half")).await.unwrap();
    assert_eq!(r.transaction_id, format!("tx-{}", r.message_id));
    tx.commit().await.unwrap();
    let mut tx = p.begin();
    p.send(&mut tx, "T", OutMessage::new("half 2")).await.unwrap();
    tx.rollback().await.unwrap();
    {
        let st = mock.lock();
        let sp = st.sends[0].messages[0].system_properties.clone().unwrap();
        assert_eq!(sp.message_type, pb::MessageType::Transaction as i32);
        let e = &st.ends[0];
        assert_eq!(
            (e.message_id.as_str(), e.transaction_id.as_str()),
            (r.message_id.as_str(), r.transaction_id.as_str())
        );
        assert_eq!(e.topic, resource("T"));
        assert_eq!(e.resolution, pb::TransactionResolution::Commit as i32);
        assert_eq!(e.source, pb::TransactionSource::SourceClient as i32);
        assert_eq!(st.ends[1].resolution, pb::TransactionResolution::Rollback as i32);
    }

    // The broker's checks: commit, rollback, unknown (no answer).
    for (id, key) in [("M1", "commit"), ("M2", "rollback"), ("M3", "unknown")] {
        mock.push(orphan_check(id, key)).await;
    }
    mock.wait_for("checks answered", |s| s.ends.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let st = mock.lock();
        let mut checks: Vec<(String, i32, i32)> =
            st.ends[2..].iter().map(|e| (e.transaction_id.clone(), e.resolution, e.source)).collect();
        let server = pb::TransactionSource::SourceServerCheck as i32;
        checks.sort();
        assert_eq!(
            checks,
            vec![
                ("tx-M1".to_string(), pb::TransactionResolution::Commit as i32, server),
                ("tx-M2".to_string(), pb::TransactionResolution::Rollback as i32, server),
            ]
        );
    }
    assert_eq!(checked.load(Ordering::SeqCst), 3);
    // The same check again right away (another node asking): answered once.
    mock.push(orphan_check("M1", "commit")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(checked.load(Ordering::SeqCst), 3);

    // The broker drops the stream: the producer reconnects and sends its Settings again.
    mock.drop_streams();
    mock.wait_for("telemetry reconnect", |s| s.settings.len() >= 2 && !s.streams.is_empty()).await;
    mock.push(orphan_check("M4", "commit")).await;
    mock.wait_for("check after reconnect", |s| s.ends.iter().any(|e| e.transaction_id == "tx-M4")).await;

    let id = p.client_id().to_string();
    p.shutdown().await.unwrap();
    let st = mock.lock();
    assert_eq!(st.terminations.len(), 1);
    assert!(st.calls.iter().all(|(_, c)| c.as_deref() == Some(id.as_str())), "{:?}", st.calls);
}

#[tokio::test]
async fn push_consumer_acks_retries_and_dead_letters() {
    let (addr, mock) = Mock::start().await;
    {
        let mut st = mock.lock();
        st.retry = Some(pb::RetryPolicy {
            max_attempts: 2,
            strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(pb::CustomizedBackoff {
                next: vec![pb_duration(Duration::from_secs(3))],
            })),
        });
        st.assignment = vec![("broker-a".into(), 0)];
        st.to_deliver.extend([
            delivered("T", "ok", "ok", 0, 0, 1),
            delivered("T", "fail1", "fail", 0, 1, 1),
            delivered("T", "fail2", "fail", 0, 2, 2),
            delivered("T", "boom", "panic", 0, 3, 1),
        ]);
    }
    let opts = PushConsumerOptions {
        batch_size: 2,
        max_inflight: 4,
        consume_threads: 2,
        long_polling_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let handler = |m: &Received| match m.body.as_slice() {
        b"ok" => ConsumeResult::Success,
        b"panic" => panic!("handler bug"),
        _ => ConsumeResult::Failure,
    };
    let c = PushConsumer::start(&[addr], "G", "T", Filter::Tag("a || b".into()), opts, handler).await.unwrap();
    // The broker's Settings reply set the policy before start returned.
    assert_eq!(c.retry_policy().max_attempts, 2);
    assert_eq!(c.retry_policy().delay(1), Duration::from_secs(3));
    mock.wait_for("all settled", |s| s.acks.len() == 1 && s.changes.len() == 2 && s.dead_letters.len() == 1).await;
    assert_eq!(c.assigned(), vec![("broker-a".to_string(), 0)]);
    // The mock records a call before it answers; the consumer counts it
    // after the answer: wait (bounded) for the counters to catch up.
    let counts = |c: &PushConsumer| {
        let s = c.stats();
        (s.received, s.acked, s.retried, s.dead_lettered)
    };
    for _ in 0..100 {
        if counts(&c) == (4, 1, 2, 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counts(&c), (4, 1, 2, 1));
    {
        let st = mock.lock();
        assert_eq!(st.acks[0].entries[0].message_id, "ok");
        assert_eq!(st.acks[0].group, resource("G"));
        for ch in &st.changes {
            assert_eq!(from_pb_duration(ch.invisible_duration.as_ref().unwrap()), Duration::from_secs(3));
        }
        let d = &st.dead_letters[0];
        assert_eq!((d.message_id.as_str(), d.delivery_attempt, d.max_delivery_attempts), ("fail2", 2, 2));
        let r = &st.receives[0];
        assert_eq!(r.group, resource("G"));
        assert_eq!(r.filter_expression, Some(Filter::Tag("a || b".into()).to_pb()));
        let mq = r.message_queue.as_ref().unwrap();
        assert_eq!((mq.broker.as_ref().unwrap().name.as_str(), mq.id), ("broker-a", 0));
        assert!(r.auto_renew && r.invisible_duration.is_none());
        assert!(r.batch_size <= 2);
        let q = &st.assignment_queries[0];
        assert_eq!((q.topic.clone(), q.group.clone()), (resource("T"), resource("G")));
        assert!(q.endpoints.as_ref().is_some_and(|e| !e.addresses.is_empty()));
        let h = &st.heartbeats[0];
        assert_eq!((h.group.clone(), h.client_type), (resource("G"), pb::ClientType::PushConsumer as i32));
        let s = &st.settings[0];
        assert_eq!(s.client_type, Some(pb::ClientType::PushConsumer as i32));
        match &s.pub_sub {
            Some(pb::settings::PubSub::Subscription(sub)) => {
                assert_eq!(sub.group, resource("G"));
                assert_eq!(sub.subscriptions[0].topic, resource("T"));
            }
            other => panic!("settings without subscription: {other:?}"),
        }
        let id = c.client_id();
        assert!(st.calls.iter().all(|(_, c)| c.as_deref() == Some(id)), "{:?}", st.calls);
    }
    // Unassigned: the receive loop stops.
    mock.lock().assignment.clear();
    mock.wait_for("unassigned", |_| c.assigned().is_empty()).await;
    c.shutdown().await.unwrap();
    assert_eq!(mock.lock().terminations[0].group, resource("G"));
}

#[tokio::test]
async fn push_consumer_bounds_in_flight_messages() {
    let (addr, mock) = Mock::start().await;
    {
        let mut st = mock.lock();
        st.assignment = vec![("b".into(), 0), ("b".into(), 1)];
        st.to_deliver.extend((0..20).map(|i| delivered("T", &format!("m{i}"), "x", 0, i, 1)));
    }
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let (r2, p2) = (running.clone(), peak.clone());
    let handler = move |_: &Received| {
        let now = r2.fetch_add(1, Ordering::SeqCst) + 1;
        p2.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        r2.fetch_sub(1, Ordering::SeqCst);
        ConsumeResult::Success
    };
    let opts = PushConsumerOptions {
        batch_size: 8,
        max_inflight: 3,
        consume_threads: 2,
        long_polling_timeout: Duration::from_millis(50),
        settings_wait: Duration::from_millis(500),
        ..Default::default()
    };
    let c = PushConsumer::start(&[addr], "G", "T", Filter::all(), opts, handler).await.unwrap();
    mock.wait_for("all acked", |s| s.acks.len() == 20).await;
    assert!(peak.load(Ordering::SeqCst) <= 2, "at most consume_threads handlers at once");
    // Never more than max_inflight asked for per receive.
    assert!(mock.lock().receives.iter().all(|r| r.batch_size <= 3));
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn simple_consumer_filters_nacks_and_dead_letters() {
    let (addr, mock) = Mock::start().await;
    {
        let mut st = mock.lock();
        st.route = vec![("broker-a".into(), 0)];
        st.to_deliver.push_back(delivered("T", "m1", "x", 0, 0, 3));
    }
    let c = SimpleConsumer::new(&[addr], "G").unwrap().with_filter("T", Filter::Sql("a > 3".into()));
    let mut got = c.receive("T", None, 4, Duration::from_secs(30), Duration::from_millis(100)).await.unwrap();
    assert_eq!(got.len(), 1);
    let m = &mut got[0];
    // Attempt 3 failed: RocketMQ's third backoff step, 10 s.
    assert_eq!(c.nack(m, None).await.unwrap(), Duration::from_secs(10));
    assert_eq!(m.receipt_handle, "handle-m1-3-changed", "the new handle replaces the old one");
    assert_eq!(c.nack(m, Some(Duration::from_secs(2))).await.unwrap(), Duration::from_secs(2));
    c.forward_to_dead_letter(m).await.unwrap();
    let st = mock.lock();
    let r = &st.receives[0];
    assert_eq!(
        r.filter_expression,
        Some(pb::FilterExpression { r#type: pb::FilterType::Sql as i32, expression: "a > 3".into() })
    );
    assert_eq!(r.message_queue.as_ref().unwrap().broker.as_ref().unwrap().name, "broker-a");
    assert_eq!(from_pb_duration(st.changes[0].invisible_duration.as_ref().unwrap()), Duration::from_secs(10));
    assert_eq!(st.dead_letters[0].receipt_handle, "handle-m1-3-changed-changed");
    assert_eq!(st.dead_letters[0].delivery_attempt, 3);
}

#[tokio::test]
async fn broadcast_consumer_reads_every_queue_and_keeps_offsets() {
    let (addr, mock) = Mock::start().await;
    {
        let mut st = mock.lock();
        st.route = vec![("a".into(), 0), ("a".into(), 1)];
        st.stored.insert(("a".into(), 0), (0..5).map(|i| delivered("T", &format!("q0-{i}"), "x", 0, i, 1)).collect());
        st.stored.insert(("a".into(), 1), (0..3).map(|i| delivered("T", &format!("q1-{i}"), "x", 1, i, 1)).collect());
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("offsets.json");
    let opts = BroadcastOptions {
        start: StartPosition::Beginning,
        offsets_file: Some(file.clone()),
        batch_size: 2,
        persist_interval: Duration::from_secs(3600),
    };
    let mut c = BroadcastConsumer::new(std::slice::from_ref(&addr), "G", "T", opts.clone()).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..10 {
        let got = c.poll(3, Duration::ZERO).await.unwrap();
        assert!(got.len() <= 3);
        ids.extend(got.into_iter().map(|m| m.message_id));
    }
    ids.sort();
    assert_eq!(ids.len(), 8, "every message once: {ids:?}");
    ids.dedup();
    assert_eq!(ids.len(), 8);
    let q0 = QueueRef { broker: "a".into(), queue: 0 };
    let q1 = QueueRef { broker: "a".into(), queue: 1 };
    assert_eq!((c.offsets().get(&q0), c.offsets().get(&q1)), (Some(5), Some(3)));
    // Nothing new: a long poll comes back empty after waiting.
    assert!(c.poll(3, Duration::from_millis(100)).await.unwrap().is_empty());
    c.close().unwrap();

    // A restarted instance goes on from the file: only the new message.
    mock.lock().stored.get_mut(&("a".to_string(), 1)).unwrap().push(delivered("T", "q1-3", "x", 1, 3, 1));
    let mut c = BroadcastConsumer::new(std::slice::from_ref(&addr), "G", "T", opts.clone()).await.unwrap();
    let got = c.poll(10, Duration::from_millis(500)).await.unwrap();
    assert_eq!(got.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), vec!["q1-3"]);

    // Another instance without a file, starting at the end: nothing old.
    let mut fresh = BroadcastConsumer::new(&[addr], "G", "T", BroadcastOptions::default()).await.unwrap();
    assert_eq!((fresh.offsets().get(&q0), fresh.offsets().get(&q1)), (Some(5), Some(4)));
    assert!(fresh.poll(10, Duration::ZERO).await.unwrap().is_empty());
}
