//! The node's Prometheus metrics (`metrics_listen`; README "Metrics" lists
//! every name). Rendered on each scrape from the node's status, its counters
//! and the state machine; nothing here is on the message path.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::async_runtime::watch::WatchReceiver;
use raftmq_proto::metrics::Exposition;
use raftmq_proto::metrics::Kind;

use crate::node::BrokerNode;

/// Reads one counter of a topic.
type CounterOf = fn(&crate::node::TopicCounters) -> u64;

/// Role names exported one-hot in `raftmq_raft_role`.
const ROLES: [&str; 5] = ["leader", "follower", "candidate", "learner", "shutdown"];

/// Serves the metrics page on `addr` until `shutdown` resolves, and counts
/// elections and leader changes while the node runs.
pub async fn serve(
    node: Arc<BrokerNode>,
    addr: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    spawn_role_watch(node.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    raftmq_proto::metrics::serve_on(listener, move || render(&node), shutdown).await
}

/// Counts term advances (elections) and leader changes from Raft's metrics.
fn spawn_role_watch(node: Arc<BrokerNode>) {
    tokio::spawn(async move {
        let mut rx = node.raft.metrics();
        let (mut term, mut leader) = {
            let m = rx.borrow_watched();
            (m.current_term, m.current_leader)
        };
        while rx.changed().await.is_ok() {
            let (t, l) = {
                let m = rx.borrow_watched();
                (m.current_term, m.current_leader)
            };
            if t > term {
                node.stats.elections.fetch_add(t - term, Ordering::Relaxed);
            }
            if l.is_some() && l != leader {
                node.stats.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            (term, leader) = (t, l);
        }
    });
}

/// The metrics page.
pub fn render(node: &BrokerNode) -> String {
    let s = node.status();
    let node_id = node.id().to_string();
    let group = node.config.broker_name.as_str();
    let base = [("group", group), ("node", node_id.as_str())];
    let mut e = Exposition::new();

    e.single(
        "raftmq_node_info",
        "Always 1; labels name the node.",
        Kind::Gauge,
        &[("cluster", &node.config.cluster), ("group", group), ("node", &node_id), ("address", &s.address)],
        1.0,
    );
    e.single(
        "raftmq_uptime_seconds",
        "Seconds since the node started.",
        Kind::Gauge,
        &base,
        node.uptime().as_secs_f64(),
    );

    e.family("raftmq_raft_role", "1 for this node's current Raft role, 0 for the others.", Kind::Gauge);
    for r in ROLES {
        e.sample("raftmq_raft_role", &[base[0], base[1], ("role", r)], f64::from(u8::from(s.role == r)));
    }
    e.single("raftmq_raft_term", "Current Raft term.", Kind::Gauge, &base, s.term as f64);
    e.single(
        "raftmq_raft_leader_id",
        "Node id of the leader this node knows (0: none).",
        Kind::Gauge,
        &base,
        s.leader_id.unwrap_or(0) as f64,
    );
    e.single(
        "raftmq_raft_commit_index",
        "Highest log index known committed.",
        Kind::Gauge,
        &base,
        s.commit_index as f64,
    );
    e.single(
        "raftmq_raft_applied_index",
        "Highest log index applied here.",
        Kind::Gauge,
        &base,
        s.applied_index as f64,
    );
    e.single("raftmq_raft_last_log_index", "Last log index stored here.", Kind::Gauge, &base, s.last_log_index as f64);
    e.family(
        "raftmq_raft_replication_lag_entries",
        "On the leader: entries a follower is behind the leader's last entry.",
        Kind::Gauge,
    );
    for f in &s.followers {
        let follower = f.node_id.to_string();
        e.sample("raftmq_raft_replication_lag_entries", &[base[0], base[1], ("follower", &follower)], f.lag as f64);
    }
    e.single(
        "raftmq_raft_elections_total",
        "Elections seen since start (how far the term advanced).",
        Kind::Counter,
        &base,
        node.stats.elections.load(Ordering::Relaxed) as f64,
    );
    e.single(
        "raftmq_raft_leader_changes_total",
        "Times the known leader changed since start.",
        Kind::Counter,
        &base,
        node.stats.leader_changes.load(Ordering::Relaxed) as f64,
    );

    let log = node.log.stats();
    e.family("raftmq_log_fsync_seconds", "CommitLog fdatasync latency.", Kind::Histogram);
    let bounds: Vec<f64> = raft_log::log::SYNC_BUCKETS_US.iter().map(|us| *us as f64 / 1e6).collect();
    e.histogram("raftmq_log_fsync_seconds", &base, &bounds, &log.sync_buckets, log.sync_us_total as f64 / 1e6);
    e.single(
        "raftmq_log_appended_bytes_total",
        "Bytes appended to the CommitLog since start.",
        Kind::Counter,
        &base,
        log.bytes_appended as f64,
    );
    e.single(
        "raftmq_log_appended_entries_total",
        "Entries appended to the CommitLog since start.",
        Kind::Counter,
        &base,
        log.entries_appended as f64,
    );
    e.single(
        "raftmq_log_first_index",
        "Oldest log index kept (retention).",
        Kind::Gauge,
        &base,
        s.log_first_index as f64,
    );
    e.single("raftmq_disk_used_bytes", "Bytes of the CommitLog on disk.", Kind::Gauge, &base, s.disk_bytes as f64);
    if let Ok(u) = node.log.disk_usage() {
        e.single(
            "raftmq_disk_used_ratio",
            "Share of the data directory's file system in use (retention acts at log.disk_max_used_ratio).",
            Kind::Gauge,
            &base,
            u.used_ratio(),
        );
    }

    e.single(
        "raftmq_reads_served_total",
        "Messages read for consumers on this node.",
        Kind::Counter,
        &base,
        node.stats.reads_served.load(Ordering::Relaxed) as f64,
    );
    e.single(
        "raftmq_follower_reads_served_total",
        "Of those, reads a loaded leader handed to this node.",
        Kind::Counter,
        &base,
        node.stats.follower_reads_served.load(Ordering::Relaxed) as f64,
    );

    let topics = node.stats.topics.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let families: [(&str, &str, CounterOf); 4] = [
        ("raftmq_topic_produced_messages_total", "Messages produced to the topic through this node.", |c| {
            c.produced_messages
        }),
        ("raftmq_topic_produced_bytes_total", "Body bytes produced to the topic through this node.", |c| {
            c.produced_bytes
        }),
        ("raftmq_topic_consumed_messages_total", "Messages of the topic handed to consumers by this node.", |c| {
            c.consumed_messages
        }),
        ("raftmq_topic_consumed_bytes_total", "Body bytes of the topic handed to consumers by this node.", |c| {
            c.consumed_bytes
        }),
    ];
    for (name, help, get) in families {
        e.family(name, help, Kind::Counter);
        for (topic, c) in &topics {
            e.sample(name, &[base[0], base[1], ("topic", topic)], get(c) as f64);
        }
    }

    // The numbers are copied under the state lock and formatted after it,
    // so a scrape holds up the state machine's apply as little as possible.
    let (lags, ends) = {
        let st = node.sm.read();
        let lags: Vec<(String, String, u32, u64)> = st
            .groups
            .iter()
            .map(|((g, topic, q), state)| {
                let end = st.queues.get(&(topic.clone(), *q)).map(|c| c.max_offset()).unwrap_or(0);
                (g.clone(), topic.clone(), *q, end.saturating_sub(state.committed))
            })
            .collect();
        let ends: Vec<(String, u32, u64)> =
            st.queues.iter().map(|((t, q), c)| (t.clone(), *q, c.max_offset())).collect();
        (lags, ends)
    };
    e.family(
        "raftmq_consumer_lag_messages",
        "Messages of a queue not yet consumed by a group (queue end minus the group's offset), as applied here.",
        Kind::Gauge,
    );
    for (g, topic, q, lag) in &lags {
        let queue = q.to_string();
        e.sample(
            "raftmq_consumer_lag_messages",
            &[base[0], base[1], ("consumer_group", g), ("topic", topic), ("queue", &queue)],
            *lag as f64,
        );
    }
    e.family("raftmq_queue_max_offset", "Messages ever stored in a queue (its end offset).", Kind::Gauge);
    for (topic, q, end) in &ends {
        let queue = q.to_string();
        e.sample("raftmq_queue_max_offset", &[base[0], base[1], ("topic", topic), ("queue", &queue)], *end as f64);
    }
    e.finish()
}
