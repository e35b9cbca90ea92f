//! Routes to the other broker groups of the cluster, learned from the name
//! servers and cached.
//!
//! Every node serves the whole cluster to clients (like RocketMQ 5's proxy):
//! a request for a queue of another group (by broker name) is forwarded to a
//! node of that group, its leader first. The cache answers for
//! [`FRESH_FOR`]; after that a name server is asked again, and when none
//! answers the stale entry keeps serving: a node keeps routing with every
//! name server down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use raftmq_proto::namesrv::GetRouteRequest;
use raftmq_proto::namesrv::GroupRoute;
use raftmq_proto::namesrv::name_server_client::NameServerClient;
use tonic::transport::Channel;

use crate::network::channel;

/// How long a cached route is used without asking a name server.
pub const FRESH_FOR: Duration = Duration::from_secs(3);
/// Most topics whose routes are cached; the oldest entry goes first.
const MAX_CACHED_TOPICS: usize = 4096;

struct Cached {
    fetched: Instant,
    groups: Vec<GroupRoute>,
}

pub struct Routes {
    local_group: String,
    namesrv: Vec<(String, NameServerClient<Channel>)>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Routes {
    pub fn new(local_group: &str, namesrv: &[String]) -> Self {
        let namesrv = namesrv
            .iter()
            .filter_map(|a| channel(a, Duration::from_millis(500)).ok().map(|c| (a.clone(), NameServerClient::new(c))))
            .collect();
        Routes { local_group: local_group.to_string(), namesrv, cache: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the name servers in turn; `None` when none answers.
    async fn fetch(&self, topic: &str) -> Option<Vec<GroupRoute>> {
        for (addr, c) in &self.namesrv {
            let mut c = c.clone();
            let mut r = tonic::Request::new(GetRouteRequest { topic: topic.to_string() });
            r.set_timeout(Duration::from_secs(1));
            match c.get_route(r).await {
                Ok(reply) => return Some(reply.into_inner().groups),
                Err(s) if s.code() == tonic::Code::NotFound => return Some(Vec::new()),
                Err(s) => tracing::debug!(namesrv = %addr, error = %s.message(), "route lookup failed"),
            }
        }
        None
    }

    /// Every group serving `topic` as the name servers last said, this one
    /// included.
    pub async fn topic_route(&self, topic: &str) -> Vec<GroupRoute> {
        if let Some(c) = self.lock().get(topic)
            && c.fetched.elapsed() < FRESH_FOR
        {
            return c.groups.clone();
        }
        match self.fetch(topic).await {
            Some(groups) => {
                let mut cache = self.lock();
                if cache.len() >= MAX_CACHED_TOPICS
                    && !cache.contains_key(topic)
                    && let Some(oldest) = cache.iter().min_by_key(|(_, c)| c.fetched).map(|(k, _)| k.clone())
                {
                    cache.remove(&oldest);
                }
                cache.insert(topic.to_string(), Cached { fetched: Instant::now(), groups: groups.clone() });
                groups
            }
            // No name server answered: the last known route, however old.
            None => self.lock().get(topic).map(|c| c.groups.clone()).unwrap_or_default(),
        }
    }

    /// The other groups serving `topic` (with at least one queue).
    pub async fn remote_groups(&self, topic: &str) -> Vec<GroupRoute> {
        self.topic_route(topic)
            .await
            .into_iter()
            .filter(|g| g.broker_name != self.local_group && g.queues > 0 && !g.nodes.is_empty())
            .collect()
    }

    /// Addresses of the nodes of `group`, its leader first, as the route of
    /// `topic` lists them (empty when unknown).
    pub async fn group_addrs(&self, group: &str, topic: &str) -> Vec<String> {
        let route = self.topic_route(topic).await;
        let Some(g) = route.into_iter().find(|g| g.broker_name == group) else { return Vec::new() };
        let mut nodes = g.nodes;
        nodes.sort_by_key(|n| (!n.leader, n.node_id));
        nodes.into_iter().map(|n| n.address).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_proto::namesrv::BrokerNode;

    #[tokio::test]
    async fn stale_routes_serve_when_no_name_server_answers() {
        // A name server address nothing listens on.
        let r = Routes::new("a", &["127.0.0.1:1".to_string()]);
        assert!(r.topic_route("t").await.is_empty());
        let g = GroupRoute {
            broker_name: "b".into(),
            nodes: vec![
                BrokerNode { node_id: 1, address: "x:1".into(), leader: false, term: 1 },
                BrokerNode { node_id: 2, address: "x:2".into(), leader: true, term: 1 },
            ],
            queues: 2,
            message_type: 1,
        };
        let own = GroupRoute { broker_name: "a".into(), ..g.clone() };
        r.lock().insert(
            "t".into(),
            Cached { fetched: Instant::now() - Duration::from_secs(3600), groups: vec![own, g.clone()] },
        );
        assert_eq!(r.remote_groups("t").await, vec![g]);
        assert_eq!(r.group_addrs("b", "t").await, vec!["x:2".to_string(), "x:1".to_string()], "leader first");
        assert!(r.group_addrs("c", "t").await.is_empty());
    }
}
