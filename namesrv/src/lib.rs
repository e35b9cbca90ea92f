//! The RaftMQ name server: a stateless routing peer. Name servers never talk
//! to each other; every broker node registers with each of them (every 30 s
//! and at once on a role change). A scan every `scan_interval_ms` drops nodes
//! silent for `node_expiry_ms`. State is memory only: a restarted name server
//! is whole again after one registration round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
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
}

impl Default for NamesrvConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9876".into(), scan_interval_ms: 10_000, node_expiry_ms: 120_000 }
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

#[tonic::async_trait]
impl NameServer for Registry {
    async fn register_broker(
        &self,
        req: Request<pb::RegisterBrokerRequest>,
    ) -> Result<Response<pb::RegisterBrokerReply>, Status> {
        self.register(req.into_inner(), Instant::now()).map_err(Status::invalid_argument)?;
        Ok(Response::new(pb::RegisterBrokerReply {}))
    }

    async fn get_route(&self, req: Request<pb::GetRouteRequest>) -> Result<Response<pb::GetRouteReply>, Status> {
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

/// Runs a name server until `shutdown` resolves.
pub async fn serve(
    config: NamesrvConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = Registry::default();
    let r = registry.clone();
    let (scan, expiry) = (Duration::from_millis(config.scan_interval_ms), Duration::from_millis(config.node_expiry_ms));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(scan);
        loop {
            tick.tick().await;
            r.expire(Instant::now(), expiry);
        }
    });
    let addr = config.listen.parse()?;
    tracing::info!(%addr, "name server listening");
    tonic::transport::Server::builder()
        .add_service(raftmq_proto::namesrv::name_server_server::NameServerServer::new(registry))
        .serve_with_shutdown(addr, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
