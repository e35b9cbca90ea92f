//! Registration with the name servers: every node registers with every name
//! server every 30 s, and at once when its role or the leader changes.

use openraft::async_runtime::watch::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use raftmq_proto::namesrv::BrokerNode as PbNode;
use raftmq_proto::namesrv::RegisterBrokerRequest;
use raftmq_proto::namesrv::TopicQueues;
use raftmq_proto::namesrv::name_server_client::NameServerClient;

use crate::network::channel;
use crate::node::BrokerNode;

/// Interval between registrations.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

fn request(node: &BrokerNode) -> RegisterBrokerRequest {
    let m = node.raft.metrics().borrow_watched().clone();
    let topics = node
        .sm
        .read()
        .topics
        .values()
        .map(|t| TopicQueues { topic: t.name.clone(), queues: t.queues, message_type: t.message_type })
        .collect();
    RegisterBrokerRequest {
        cluster: node.config.cluster.clone(),
        broker_name: node.config.broker_name.clone(),
        node: Some(PbNode {
            node_id: node.id(),
            address: node.config.advertised_addr(),
            leader: m.current_leader == Some(node.id()),
            term: m.current_term,
        }),
        topics,
    }
}

pub fn spawn(node: Arc<BrokerNode>) {
    if node.config.namesrv.is_empty() {
        return;
    }
    let clients: Vec<(String, NameServerClient<tonic::transport::Channel>)> = node
        .config
        .namesrv
        .iter()
        .filter_map(|a| channel(a, Duration::from_secs(1)).ok().map(|c| (a.clone(), NameServerClient::new(c))))
        .collect();
    let weak = Arc::downgrade(&node);
    let mut metrics = node.raft.metrics();
    drop(node);
    tokio::spawn(async move {
        loop {
            let Some(node) = weak.upgrade() else { return };
            let req = request(&node);
            let last_topics = req.topics.clone();
            let role = (node.leader_id(), node.raft.metrics().borrow_watched().current_term);
            drop(node);
            for (addr, c) in &clients {
                let mut c = c.clone();
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(Duration::from_secs(3));
                if let Err(e) = c.register_broker(r).await {
                    tracing::debug!(namesrv = %addr, error = %e.message(), "registration failed");
                }
            }
            // Until the interval passes, the role changes or the topics change.
            let wait = tokio::time::sleep(HEARTBEAT_INTERVAL);
            tokio::pin!(wait);
            let mut topic_check = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    _ = topic_check.tick() => {
                        let Some(node) = weak.upgrade() else { return };
                        let topics = request(&node).topics;
                        if topics != last_topics {
                            break;
                        }
                    }
                    changed = metrics.changed() => {
                        if changed.is_err() { return; }
                        let m = metrics.borrow_watched().clone();
                        if role != (m.current_leader, m.current_term) { break; }
                    }
                }
            }
        }
    });
}
