//! The RaftMQ name server: a stateless routing peer. Name servers never talk
//! to each other; every broker node registers with each of them (every 30 s
//! and at once on a role change). A scan every `scan_interval_ms` drops nodes
//! silent for `node_expiry_ms`. State is memory only: a restarted name server
//! is whole again after one registration round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use raftmq_proto::namesrv as pb;
use raftmq_proto::namesrv::name_server_server::NameServer;
use serde::Deserialize;
use serde::Serialize;
use tonic::Request;
use tonic::Response;
use tonic::Status;

/// Name server configuration (TOML). Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamesrvConfig {
    /// Address to listen on. Default: "127.0.0.1:9876".
    pub listen: String,
    /// How often silent nodes are looked for. Default: 10000 ms.
    pub scan_interval_ms: u64,
    /// A node silent this long is dropped. Default: 120000 ms.
    pub node_expiry_ms: u64,
    /// Prometheus metrics over HTTP (`GET /metrics`), host:port.
    /// Default: none (no metrics listener).
    pub metrics_listen: Option<String>,
}

impl Default for NamesrvConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9876".into(),
            scan_interval_ms: 10_000,
            node_expiry_ms: 120_000,
            metrics_listen: None,
        }
    }
}

impl NamesrvConfig {
    /// Parses a TOML configuration; unknown keys and bad values are errors.
    pub fn from_toml(text: &str) -> Result<NamesrvConfig, String> {
        let c: NamesrvConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.listen.parse::<std::net::SocketAddr>().map_err(|e| format!("listen {:?}: {e}", self.listen))?;
        if let Some(m) = &self.metrics_listen {
            m.parse::<std::net::SocketAddr>().map_err(|e| format!("metrics_listen {m:?}: {e}"))?;
        }
        if self.scan_interval_ms == 0 || self.node_expiry_ms < self.scan_interval_ms {
            return Err("scan_interval_ms must be positive and at most node_expiry_ms".into());
        }
        Ok(())
    }

    /// The keys that differ in `new` but take effect only on a restart
    /// (SIGHUP reloads `scan_interval_ms` and `node_expiry_ms`).
    pub fn restart_only_changes(&self, new: &NamesrvConfig) -> Vec<&'static str> {
        let NamesrvConfig { listen, scan_interval_ms: _, node_expiry_ms: _, metrics_listen } = self;
        let mut changed = Vec::new();
        if *listen != new.listen {
            changed.push("listen");
        }
        if *metrics_listen != new.metrics_listen {
            changed.push("metrics_listen");
        }
        changed
    }
}

/// The settings a running name server takes again on SIGHUP.
#[derive(Debug, Default)]
pub struct Settings {
    scan_interval_ms: AtomicU64,
    node_expiry_ms: AtomicU64,
}

impl Settings {
    pub fn new(c: &NamesrvConfig) -> Arc<Settings> {
        let s = Arc::new(Settings::default());
        s.apply(c);
        s
    }

    pub fn apply(&self, c: &NamesrvConfig) {
        self.scan_interval_ms.store(c.scan_interval_ms, Ordering::Relaxed);
        self.node_expiry_ms.store(c.node_expiry_ms, Ordering::Relaxed);
    }
}

struct NodeEntry {
    node: pb::BrokerNode,
    last_seen: Instant,
}

#[derive(Default)]
struct Group {
    cluster: String,
    nodes: BTreeMap<u64, NodeEntry>,
    topics: BTreeMap<String, pb::TopicQueues>,
}

/// The routing table.
#[derive(Default, Clone)]
pub struct Registry {
    groups: Arc<Mutex<BTreeMap<String, Group>>>,
    /// Requests answered, by kind (metrics).
    registrations: Arc<AtomicU64>,
    route_lookups: Arc<AtomicU64>,
    dropped_nodes: Arc<AtomicU64>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, req: pb::RegisterBrokerRequest, now: Instant) -> Result<(), String> {
        let node = req.node.ok_or("registration without a node")?;
        if req.broker_name.is_empty() || node.address.is_empty() {
            return Err("registration without broker name or address".into());
        }
        let mut groups = self.lock();
        let g = groups.entry(req.broker_name).or_default();
        g.cluster = req.cluster;
        if node.leader {
            // One leader per group: the registration with the highest term wins.
            for e in g.nodes.values_mut() {
                if e.node.node_id != node.node_id && e.node.term <= node.term {
                    e.node.leader = false;
                }
            }
        }
        g.nodes.insert(node.node_id, NodeEntry { node, last_seen: now });
        g.topics = req.topics.into_iter().map(|t| (t.topic.clone(), t)).collect();
        Ok(())
    }

    /// Drops nodes silent for longer than `expiry`, and groups left empty.
    pub fn expire(&self, now: Instant, expiry: Duration) -> usize {
        let mut groups = self.lock();
        let mut dropped = 0;
        for (name, g) in groups.iter_mut() {
            let before = g.nodes.len();
            g.nodes.retain(|id, e| {
                let keep = now.duration_since(e.last_seen) <= expiry;
                if !keep {
                    tracing::warn!(group = %name, node = id, "dropping silent broker node");
                }
                keep
            });
            dropped += before - g.nodes.len();
        }
        groups.retain(|_, g| !g.nodes.is_empty());
        self.dropped_nodes.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    fn route(name: &str, g: &Group, topic: Option<&pb::TopicQueues>) -> pb::GroupRoute {
        pb::GroupRoute {
            broker_name: name.to_string(),
            nodes: g.nodes.values().map(|e| e.node.clone()).collect(),
            queues: topic.map(|t| t.queues).unwrap_or(0),
            message_type: topic.map(|t| t.message_type).unwrap_or(0),
        }
    }

    pub fn get_route(&self, topic: &str) -> Vec<pb::GroupRoute> {
        let groups = self.lock();
        groups.iter().filter_map(|(n, g)| g.topics.get(topic).map(|t| Self::route(n, g, Some(t)))).collect()
    }

    pub fn cluster(&self) -> pb::GetClusterReply {
        let groups = self.lock();
        let mut topics: BTreeMap<String, pb::TopicQueues> = BTreeMap::new();
        for g in groups.values() {
            for (name, t) in &g.topics {
                let e = topics.entry(name.clone()).or_insert_with(|| pb::TopicQueues { queues: 0, ..t.clone() });
                e.queues += t.queues;
            }
        }
        pb::GetClusterReply {
            groups: groups.iter().map(|(n, g)| Self::route(n, g, None)).collect(),
            topics: topics.into_values().collect(),
        }
    }
}

impl Registry {
    /// The metrics page: what this name server knows of each group.
    pub fn render_metrics(&self, now: Instant) -> String {
        use raftmq_proto::metrics::Kind;
        let mut e = raftmq_proto::metrics::Exposition::new();
        let groups = self.lock();
        e.single("raftmq_namesrv_groups", "Broker groups registered.", Kind::Gauge, &[], groups.len() as f64);
        e.family(
            "raftmq_namesrv_node_up",
            "1 for each broker node registered and not yet expired (role as last reported).",
            Kind::Gauge,
        );
        for (name, g) in groups.iter() {
            for e2 in g.nodes.values() {
                let id = e2.node.node_id.to_string();
                let role = if e2.node.leader { "leader" } else { "follower" };
                e.sample(
                    "raftmq_namesrv_node_up",
                    &[
                        ("cluster", &g.cluster),
                        ("group", name),
                        ("node", &id),
                        ("address", &e2.node.address),
                        ("role", role),
                    ],
                    1.0,
                );
            }
        }
        e.family("raftmq_namesrv_node_last_seen_seconds", "Seconds since a broker node last registered.", Kind::Gauge);
        for (name, g) in groups.iter() {
            for e2 in g.nodes.values() {
                let id = e2.node.node_id.to_string();
                let age = now.saturating_duration_since(e2.last_seen).as_secs_f64();
                e.sample("raftmq_namesrv_node_last_seen_seconds", &[("group", name), ("node", &id)], age);
            }
        }
        e.family("raftmq_namesrv_topic_queues", "Queues of a topic in a group.", Kind::Gauge);
        for (name, g) in groups.iter() {
            for (topic, t) in &g.topics {
                e.sample("raftmq_namesrv_topic_queues", &[("group", name), ("topic", topic)], f64::from(t.queues));
            }
        }
        drop(groups);
        for (name, help, v) in [
            ("raftmq_namesrv_registrations_total", "Broker registrations received.", &self.registrations),
            ("raftmq_namesrv_route_lookups_total", "Route lookups answered.", &self.route_lookups),
            ("raftmq_namesrv_dropped_nodes_total", "Broker nodes dropped for silence.", &self.dropped_nodes),
        ] {
            e.single(name, help, Kind::Counter, &[], v.load(Ordering::Relaxed) as f64);
        }
        e.finish()
    }
}

#[tonic::async_trait]
impl NameServer for Registry {
    async fn register_broker(
        &self,
        req: Request<pb::RegisterBrokerRequest>,
    ) -> Result<Response<pb::RegisterBrokerReply>, Status> {
        self.registrations.fetch_add(1, Ordering::Relaxed);
        self.register(req.into_inner(), Instant::now()).map_err(Status::invalid_argument)?;
        Ok(Response::new(pb::RegisterBrokerReply {}))
    }

    async fn get_route(&self, req: Request<pb::GetRouteRequest>) -> Result<Response<pb::GetRouteReply>, Status> {
        self.route_lookups.fetch_add(1, Ordering::Relaxed);
        let topic = req.into_inner().topic;
        let groups = self.get_route(&topic);
        if groups.is_empty() {
            return Err(Status::not_found(format!("no broker group serves topic {topic}")));
        }
        Ok(Response::new(pb::GetRouteReply { groups }))
    }

    async fn get_cluster(&self, _req: Request<pb::GetClusterRequest>) -> Result<Response<pb::GetClusterReply>, Status> {
        Ok(Response::new(self.cluster()))
    }
}

/// Runs a name server until `shutdown` resolves: binds its ports, calls
/// `ready`, then serves routes (and metrics when `metrics_listen` is set).
/// `settings` may be changed while it runs (SIGHUP).
pub async fn serve(
    config: NamesrvConfig,
    settings: Arc<Settings>,
    ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate().map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let registry = Registry::default();
    let r = registry.clone();
    let s = settings.clone();
    let scanner = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(s.scan_interval_ms.load(Ordering::Relaxed))).await;
            r.expire(Instant::now(), Duration::from_millis(s.node_expiry_ms.load(Ordering::Relaxed)));
        }
    });
    let addr: std::net::SocketAddr = config.listen.parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("listen {addr}: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let metrics = match &config.metrics_listen {
        Some(m) => {
            let m: std::net::SocketAddr = m.parse()?;
            let l = tokio::net::TcpListener::bind(m).await.map_err(|e| anyhow::anyhow!("metrics_listen {m}: {e}"))?;
            let r = registry.clone();
            tracing::info!(addr = %m, "metrics at http://{m}/metrics");
            Some(tokio::spawn(raftmq_proto::metrics::serve_on(
                l,
                move || r.render_metrics(Instant::now()),
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    tracing::info!(%addr, "name server listening");
    ready();
    let served = tonic::transport::Server::builder()
        .add_service(raftmq_proto::namesrv::name_server_server::NameServerServer::new(registry))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    scanner.abort();
    if let Some(m) = metrics {
        let _ = m.await;
    }
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deploy_example_is_valid_and_unknown_keys_are_not() {
        let c = NamesrvConfig::from_toml(include_str!("../../deploy/config/namesrv.toml")).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9876");
        assert!(NamesrvConfig::from_toml("bogus = 1").unwrap_err().contains("bogus"));
        assert!(NamesrvConfig::from_toml("node_expiry_ms = 5\nscan_interval_ms = 10").is_err());
    }

    fn reg(name: &str, id: u64, leader: bool, term: u64, topics: &[(&str, u32)]) -> pb::RegisterBrokerRequest {
        pb::RegisterBrokerRequest {
            cluster: "c".into(),
            broker_name: name.into(),
            node: Some(pb::BrokerNode { node_id: id, address: format!("127.0.0.1:{}", 8080 + id), leader, term }),
            topics: topics
                .iter()
                .map(|(t, q)| pb::TopicQueues { topic: t.to_string(), queues: *q, message_type: 1 })
                .collect(),
        }
    }

    #[test]
    fn routes_span_groups_and_follow_the_newest_leader() {
        let r = Registry::default();
        let t0 = Instant::now();
        r.register(reg("a", 1, true, 1, &[("orders", 4)]), t0).unwrap();
        r.register(reg("a", 2, false, 1, &[("orders", 4)]), t0).unwrap();
        r.register(reg("b", 1, true, 3, &[("orders", 2), ("logs", 1)]), t0).unwrap();
        let route = r.get_route("orders");
        assert_eq!(route.len(), 2);
        assert_eq!(r.get_route("logs").len(), 1);
        // Node 2 of group a wins an election.
        r.register(reg("a", 2, true, 2, &[("orders", 4)]), t0).unwrap();
        let a = &r.get_route("orders")[0];
        let leaders: Vec<u64> = a.nodes.iter().filter(|n| n.leader).map(|n| n.node_id).collect();
        assert_eq!(leaders, vec![2]);
        assert_eq!(r.cluster().topics.iter().find(|t| t.topic == "orders").unwrap().queues, 6);
    }

    #[test]
    fn silent_nodes_expire() {
        let r = Registry::default();
        let t0 = Instant::now();
        r.register(reg("a", 1, true, 1, &[("t", 1)]), t0).unwrap();
        r.register(reg("a", 2, false, 1, &[("t", 1)]), t0 + Duration::from_secs(100)).unwrap();
        assert_eq!(r.expire(t0 + Duration::from_secs(121), Duration::from_secs(120)), 1);
        assert_eq!(r.get_route("t")[0].nodes.len(), 1);
        assert_eq!(r.expire(t0 + Duration::from_secs(300), Duration::from_secs(120)), 1);
        assert!(r.get_route("t").is_empty());
    }

    #[test]
    fn bad_registrations_are_refused() {
        let r = Registry::default();
        let mut req = reg("a", 1, true, 1, &[]);
        req.node = None;
        assert!(r.register(req, Instant::now()).is_err());
    }
}
