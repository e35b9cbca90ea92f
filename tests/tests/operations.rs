//! Operating a group: the Prometheus metrics page, configuration reload on
//! SIGHUP, and the leadership handover of a clean stop (SIGTERM). The same
//! paths run under real systemd in `deploy/test/systemd-test.sh`.

use std::time::Duration;
use std::time::Instant;

use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::PullConsumer;
use raftmq_tests::Cluster;

use crate::cluster::create_topic;
use crate::cluster::runtime;
use crate::cluster::wait_for_leader;

/// The sum of the samples of `name` whose labels contain every `labels`
/// fragment (`topic="t"`), or None when there is none.
fn metric(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n == name && labels.iter().all(|f| l.contains(f)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().expect("a numeric sample");
        }
    }
    found
}

#[test]
fn metrics_report_raft_state_traffic_fsync_and_lag() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "om", 2).await;
        let p = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
        let batch: Vec<OutMessage> = (0..50).map(|i| OutMessage::new(format!("message {i:04}"))).collect();
        p.send_batch("om", &batch).await.unwrap();
        let consumer = PullConsumer::new(&c.addrs(), "om-group").unwrap();
        consumer.commit("om", 0, 5).await.unwrap();
        consumer.commit("om", 1, 5).await.unwrap();
        // The lag a node should report: per queue, its end minus the
        // committed 5 (clamped to the end, as the commit is).
        let expected_lag = |page: &str| -> f64 {
            (0..2)
                .map(|q| {
                    let queue = format!("queue=\"{q}\"");
                    let end = metric(page, "raftmq_queue_max_offset", &["topic=\"om\"", &queue]).unwrap_or(0.0);
                    end - end.min(5.0)
                })
                .sum()
        };
        // Every node applies the commits; wait for the slowest.
        let deadline = Instant::now() + Duration::from_secs(10);
        let pages = loop {
            let pages: Vec<String> = (0..3).map(|i| c.scrape(i).expect("metrics page")).collect();
            let settled = pages.iter().all(|p| {
                metric(p, "raftmq_queue_max_offset", &["topic=\"om\""]) == Some(50.0)
                    && metric(p, "raftmq_consumer_lag_messages", &["consumer_group=\"om-group\""])
                        == Some(expected_lag(p))
            });
            if settled || Instant::now() > deadline {
                break pages;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut produced = 0.0;
        for (i, page) in pages.iter().enumerate() {
            let id = c.nodes[i].0;
            let is_leader = metric(page, "raftmq_raft_role", &["role=\"leader\""]).unwrap();
            assert_eq!(is_leader, if id == leader { 1.0 } else { 0.0 }, "node {id} role\n{page}");
            assert_eq!(metric(page, "raftmq_raft_leader_id", &[]), Some(leader as f64), "node {id}");
            assert!(metric(page, "raftmq_raft_term", &[]).unwrap() >= 1.0);
            assert!(metric(page, "raftmq_raft_applied_index", &[]).unwrap() >= 4.0, "node {id}\n{page}");
            assert!(metric(page, "raftmq_log_fsync_seconds_count", &[]).unwrap() > 0.0, "node {id} never synced?");
            assert!(metric(page, "raftmq_disk_used_bytes", &[]).unwrap() > 0.0);
            assert_eq!(metric(page, "raftmq_queue_max_offset", &["topic=\"om\""]), Some(50.0), "node {id}\n{page}");
            let lag = expected_lag(page);
            assert!(lag >= 40.0, "50 messages, at most 5 + 5 committed");
            assert_eq!(
                metric(page, "raftmq_consumer_lag_messages", &["consumer_group=\"om-group\""]),
                Some(lag),
                "node {id}: 50 messages, offset 5 committed on each queue\n{page}"
            );
            produced += metric(page, "raftmq_topic_produced_messages_total", &["topic=\"om\""]).unwrap_or(0.0);
            if id == leader {
                for (f, _) in c.nodes.iter().filter(|(f, _)| *f != leader) {
                    let lag = metric(page, "raftmq_raft_replication_lag_entries", &[&format!("follower=\"{f}\"")]);
                    assert!(lag.is_some(), "the leader reports follower {f}'s lag\n{page}");
                }
            }
        }
        assert_eq!(produced, 50.0, "each produced message is counted once, by the node that took it");
    });
}

#[test]
fn sighup_reloads_limits_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (_, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "rl", 1).await;
        let opts = ProducerOptions { max_attempts: 1, ..ProducerOptions::default() };
        let p = Producer::new(&c.addrs(), opts).unwrap();
        let big = || OutMessage::new(vec![b'x'; 200]);
        p.send("rl", big()).await.expect("200 bytes under the default 4 MiB limit");

        // A file that does not parse: refused, the running limits stay.
        let originals: Vec<String> =
            c.nodes.iter().map(|(id, _)| std::fs::read_to_string(c.config_path(*id)).unwrap()).collect();
        for (i, (id, _)) in c.nodes.iter().enumerate() {
            std::fs::write(c.config_path(*id), format!("{}\nbogus_key = 1\n", originals[i])).unwrap();
            c.reload_node(i);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.send("rl", big()).await.expect("a refused reload keeps the limits");

        for (i, (id, _)) in c.nodes.iter().enumerate() {
            let lowered = format!("{}\n[limits]\nmax_body_bytes = 100\n", originals[i]);
            std::fs::write(c.config_path(*id), lowered).unwrap();
            c.reload_node(i);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            match p.send("rl", big()).await {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok(_) => panic!("max_body_bytes = 100 not in effect 5 s after SIGHUP"),
            }
        };
        assert!(err.to_string().contains("larger than the limit of 100 bytes"), "{err}");
        p.send("rl", OutMessage::new(vec![b'y'; 50])).await.expect("a body under the new limit");
        let log = std::fs::read_to_string(c.log_path(c.nodes[0].0)).unwrap();
        assert!(log.contains("reload refused"), "the bad file is reported");
        assert!(log.contains("configuration reloaded"));
    });
}

#[test]
fn a_stopped_leader_hands_leadership_to_a_follower_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "ho", 1).await;
        let term = admin.node_status().await.unwrap().term;
        c.stop_node(c.index_of(leader));
        let log = std::fs::read_to_string(c.log_path(leader)).unwrap();
        assert!(log.contains("leadership handed over"), "the stopping leader handed over:\n{log}");
        let (next, admin) = wait_for_leader(&c, Duration::from_secs(10)).await;
        assert_ne!(next, leader);
        // One term: the handover, not a timeout-driven election after it.
        assert_eq!(admin.node_status().await.unwrap().term, term + 1);
        let p = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
        p.send("ho", OutMessage::new("after the handover")).await.unwrap();
    });
}

#[test]
fn admin_api_lists_connections_resets_offsets_by_time_and_changes_settings() {
    use raftmq_client::Admin;
    use raftmq_client::ConsumeResult;
    use raftmq_client::Filter;

    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (_, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "adm", 2).await;
        let opts = ProducerOptions { max_attempts: 1, ..ProducerOptions::default() };
        let p = Producer::new(&c.addrs(), opts).unwrap();
        let early: Vec<OutMessage> = (0..10).map(|i| OutMessage::new(format!("early {i}"))).collect();
        p.send_batch("adm", &early).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cut_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let late: Vec<OutMessage> = (0..7).map(|i| OutMessage::new(format!("late {i}"))).collect();
        p.send_batch("adm", &late).await.unwrap();

        // Reset by time: each queue's offset lands on its first late message.
        let queues = admin.reset_offset_by_time("adm-g", "adm", cut_ms).await.unwrap();
        assert_eq!(queues.len(), 2);
        assert_eq!(queues.iter().map(|q| q.offset).sum::<u64>(), 10, "10 messages before the time: {queues:?}");
        let progress = admin.consumer_progress("adm-g", "adm").await.unwrap();
        assert_eq!(progress.total_lag, 7, "7 messages after it");
        let all = admin.reset_offset_by_time("adm-g", "adm", 0).await.unwrap();
        assert_eq!(all.iter().map(|q| q.offset).sum::<u64>(), 0, "from the beginning");

        // Connections: a push consumer's heartbeats, replicated to every node.
        let push = raftmq_client::PushConsumer::start(
            &c.addrs()[..1],
            "adm-push",
            "adm",
            Filter::Tag("*".into()),
            raftmq_client::PushConsumerOptions::default(),
            |_m: &raftmq_client::Received| ConsumeResult::Success,
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let all_see_it = futures::future::join_all(c.nodes.iter().map(|(_, a)| async move {
                let list = Admin::connect(a).unwrap().consumer_connections("adm-push").await.unwrap_or_default();
                list.len() == 1 && list[0].alive
            }))
            .await
            .into_iter()
            .all(|x| x);
            if all_see_it {
                break;
            }
            assert!(Instant::now() < deadline, "every node lists the push consumer");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(push);

        // A message's delivery to a group: in flight at attempt 1 once
        // received and not acked; not delivered to another group.
        let sc = raftmq_client::SimpleConsumer::new(&c.addrs(), "adm-sc").unwrap();
        let got = sc.receive("adm", None, 1, Duration::from_secs(60), Duration::from_secs(5)).await.unwrap();
        let id = got[0].message_id.clone();
        let query = |group: &str| raftmq_client::admin_pb::QueryMessageRequest {
            message_id: id.clone(),
            group: group.to_string(),
            ..Default::default()
        };
        let found = admin.query_messages(query("adm-sc")).await.unwrap();
        assert_eq!((found[0].group_state.as_str(), found[0].attempts), ("in flight", 1), "{found:?}");
        let found = admin.query_messages(query("someone-else")).await.unwrap();
        assert_eq!(found[0].group_state, "not delivered");

        // Configuration: shown with the defaults; one run-time key changed
        // on every node; a restart-only key refused.
        let shown = admin.get_config().await.unwrap();
        assert!(shown.contains("max_body_bytes = 4194304"), "{shown}");
        for (_, a) in &c.nodes {
            let m = Admin::connect(a).unwrap().update_config("limits.max_body_bytes", "100").await.unwrap();
            assert!(m.contains("in effect"), "{m}");
        }
        let err = p.send("adm", OutMessage::new(vec![b'x'; 200])).await.unwrap_err();
        assert!(err.to_string().contains("larger than the limit of 100 bytes"), "{err}");
        assert!(admin.get_config().await.unwrap().contains("max_body_bytes = 100"));
        let refused = admin.update_config("raft.heartbeat_interval_ms", "50").await.unwrap_err();
        assert!(refused.to_string().contains("config file"), "{refused}");
        let refused = admin.update_config("limits.max_body_bytes", "0").await.unwrap_err();
        assert!(refused.to_string().contains("max_body_bytes"), "{refused}");
    });
}
