//! The admin API of a node (`raftmq.admin.AdminService`): used by the CLI,
//! by other nodes to forward commands to the leader, and by a loaded leader to
//! have a follower serve message reads.

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::BasicNode;
use openraft::ChangeMembers;
use raftmq_proto::admin as pb;
use raftmq_proto::admin::admin_service_server::AdminService;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::command;
use crate::command::Control;
use crate::command::GroupConf;
use crate::command::RefusedCode;
use crate::error::BrokerError;
use crate::node::BrokerNode;
use crate::sm::check_name;

pub struct Admin {
    pub node: Arc<BrokerNode>,
}

fn refused_status(code: RefusedCode, message: String) -> Status {
    match code {
        RefusedCode::TopicNotFound => Status::not_found(message),
        RefusedCode::TopicExists => Status::already_exists(message),
        RefusedCode::GroupNotFound => Status::not_found(message),
        _ => Status::failed_precondition(message),
    }
}

impl Admin {
    async fn control(&self, c: Control) -> Result<pb::AdminReply, Status> {
        match self.node.propose(command::encode_control(&c)).await.map_err(|e| e.to_status())?.0 {
            command::Response::Refused { code, message } => Err(refused_status(code, message)),
            _ => Ok(pb::AdminReply { message: "OK".into() }),
        }
    }

    fn leader_addr(&self) -> Result<String, Status> {
        let m = self.node.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader.ok_or_else(|| Status::unavailable("no leader right now; retry"))?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .ok_or_else(|| Status::unavailable(format!("leader {leader} is not in the membership")))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_topic(&self, req: Request<pb::CreateTopicRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let req = req.into_inner();
        let t = req.topic.ok_or_else(|| Status::invalid_argument("no topic given"))?;
        check_name("topic", &t.name).map_err(|e| e.to_status())?;
        if t.queues == 0 || t.queues > 1024 {
            return Err(Status::invalid_argument(format!("queues must be 1 to 1024, got {}", t.queues)));
        }
        let mt = if t.message_type == 0 { 1 } else { t.message_type };
        if !(1..=4).contains(&mt) {
            return Err(Status::invalid_argument(format!(
                "message type must be 1 (NORMAL), 2 (FIFO), 3 (DELAY) or 4 (TRANSACTION), got {mt}"
            )));
        }
        let c = Control::CreateTopic { name: t.name, queues: t.queues, message_type: mt, update: req.update };
        Ok(Response::new(self.control(c).await?))
    }

    async fn delete_topic(&self, req: Request<pb::DeleteTopicRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let name = req.into_inner().name;
        check_name("topic", &name).map_err(|e| e.to_status())?;
        Ok(Response::new(self.control(Control::DeleteTopic { name }).await?))
    }

    async fn update_group(&self, req: Request<pb::GroupConfig>) -> Result<Response<pb::AdminReply>, Status> {
        let g = req.into_inner();
        check_name("group", &g.name).map_err(|e| e.to_status())?;
        if g.max_delivery_attempts > 1000 {
            return Err(Status::invalid_argument(format!(
                "max_delivery_attempts must be at most 1000, got {}",
                g.max_delivery_attempts
            )));
        }
        let config = GroupConf {
            name: g.name,
            consume_enabled: g.consume_enabled,
            max_delivery_attempts: g.max_delivery_attempts,
            fifo: g.fifo,
            broadcast_enabled: g.broadcast_enabled,
        };
        Ok(Response::new(self.control(Control::UpdateGroup { config }).await?))
    }

    async fn delete_group(&self, req: Request<pb::DeleteGroupRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let name = req.into_inner().name;
        check_name("group", &name).map_err(|e| e.to_status())?;
        Ok(Response::new(self.control(Control::DeleteGroup { name }).await?))
    }

    async fn read_index(&self, _req: Request<pb::Empty>) -> Result<Response<pb::ReadIndexReply>, Status> {
        let index = self.node.leader_read_index().await.map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ReadIndexReply { index }))
    }

    async fn list_groups(&self, _req: Request<pb::Empty>) -> Result<Response<pb::ListGroupsReply>, Status> {
        let st = self.node.sm.read();
        let groups = st
            .group_confs
            .values()
            .map(|g| pb::GroupConfig {
                name: g.name.clone(),
                consume_enabled: g.consume_enabled,
                max_delivery_attempts: g.max_delivery_attempts,
                fifo: g.fifo,
                broadcast_enabled: g.broadcast_enabled,
            })
            .collect();
        let unconfigured: BTreeSet<String> =
            st.groups.keys().map(|(g, _, _)| g.clone()).filter(|g| !st.group_confs.contains_key(g)).collect();
        Ok(Response::new(pb::ListGroupsReply { groups, unconfigured: unconfigured.into_iter().collect() }))
    }

    async fn list_topics(&self, _req: Request<pb::Empty>) -> Result<Response<pb::ListTopicsReply>, Status> {
        let floor = self.node.log.first_pos();
        let floor_of = |c: Option<&crate::cq::ConsumeQueue>| c.map(|c| c.first_offset_at_or_after(floor)).unwrap_or(0);
        let st = self.node.sm.read();
        let topics = st
            .topics
            .values()
            .map(|t| pb::TopicStatus {
                config: Some(pb::TopicConfig { name: t.name.clone(), queues: t.queues, message_type: t.message_type }),
                queues: (0..t.queues)
                    .map(|q| pb::QueueStatus {
                        queue_id: q,
                        min_offset: floor_of(st.queues.get(&(t.name.clone(), q))),
                        max_offset: st.queues.get(&(t.name.clone(), q)).map(|c| c.max_offset()).unwrap_or(0),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListTopicsReply { topics }))
    }

    async fn get_node_status(&self, _req: Request<pb::Empty>) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(self.node.status()))
    }

    async fn cluster_status(&self, _req: Request<pb::Empty>) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let membership = self.node.raft.metrics().borrow_watched().membership_config.membership().clone();
        let mut nodes = Vec::new();
        for (id, node) in membership.nodes() {
            if *id == self.node.id() {
                nodes.push(self.node.status());
                continue;
            }
            let status = match self.node.admin_client(&node.addr) {
                Ok(mut c) => {
                    let mut r = Request::new(pb::Empty {});
                    r.set_timeout(Duration::from_secs(1));
                    c.get_node_status(r).await.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            nodes.push(status.unwrap_or_else(|e| pb::NodeStatus {
                node_id: *id,
                broker_name: self.node.config.broker_name.clone(),
                address: node.addr.clone(),
                role: "unreachable".into(),
                error: e,
                ..Default::default()
            }));
        }
        Ok(Response::new(pb::ClusterStatusReply { nodes }))
    }

    async fn consumer_progress(
        &self,
        req: Request<pb::ConsumerProgressRequest>,
    ) -> Result<Response<pb::ConsumerProgressReply>, Status> {
        let req = req.into_inner();
        let st = self.node.sm.read();
        let mut queues = Vec::new();
        for ((group, topic, q), g) in st.groups.iter() {
            if *group != req.group || (!req.topic.is_empty() && *topic != req.topic) {
                continue;
            }
            let max = st.queues.get(&(topic.clone(), *q)).map(|c| c.max_offset()).unwrap_or(0);
            queues.push(pb::QueueProgress {
                topic: topic.clone(),
                queue_id: *q,
                consumer_offset: g.committed,
                max_offset: max,
                lag: max.saturating_sub(g.committed),
                inflight: g.inflight.len() as u64,
                retrying: g.inflight.values().filter(|i| i.attempt > 1).count() as u64,
            });
        }
        if queues.is_empty() {
            return Err(Status::not_found(format!("consumer group {} has consumed nothing here", req.group)));
        }
        queues.sort_by(|a, b| (&a.topic, a.queue_id).cmp(&(&b.topic, b.queue_id)));
        let total_lag = queues.iter().map(|q| q.lag).sum();
        Ok(Response::new(pb::ConsumerProgressReply { queues, total_lag }))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let to = req.into_inner().to_node;
        if !self.node.config.peers.contains_key(&to)
            && self.node.raft.metrics().borrow_watched().membership_config.membership().get_node(&to).is_none()
        {
            return Err(Status::invalid_argument(format!("node {to} is not in the group")));
        }
        if !self.node.is_leader() {
            let addr = self.leader_addr()?;
            let mut c = self.node.admin_client(&addr).map_err(|e| e.to_status())?;
            return c.transfer_leader(pb::TransferLeaderRequest { to_node: to }).await;
        }
        if to == self.node.id() {
            return Ok(Response::new(pb::AdminReply { message: format!("node {to} already leads") }));
        }
        self.node.raft.trigger().transfer_leader(to).await.map_err(|e| Status::internal(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if self.node.leader_id() == Some(to) {
                return Ok(Response::new(pb::AdminReply { message: format!("node {to} leads now") }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Status::deadline_exceeded(format!("node {to} did not take over within 5 s")))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let req = req.into_inner();
        if !self.node.is_leader() {
            let addr = self.leader_addr()?;
            let mut c = self.node.admin_client(&addr).map_err(|e| e.to_status())?;
            return c.add_node(req).await;
        }
        let raft = &self.node.raft;
        raft.add_learner(req.node_id, BasicNode { addr: req.address.clone() }, true)
            .await
            .map_err(|e| Status::failed_precondition(format!("adding node {} as learner: {e}", req.node_id)))?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.node_id])), false)
            .await
            .map_err(|e| Status::failed_precondition(format!("promoting node {}: {e}", req.node_id)))?;
        Ok(Response::new(pb::AdminReply { message: format!("node {} at {} is a voter", req.node_id, req.address) }))
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let req = req.into_inner();
        if !self.node.is_leader() {
            let addr = self.leader_addr()?;
            let mut c = self.node.admin_client(&addr).map_err(|e| e.to_status())?;
            return c.remove_node(req).await;
        }
        self.node
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([req.node_id])), false)
            .await
            .map_err(|e| Status::failed_precondition(format!("removing node {}: {e}", req.node_id)))?;
        Ok(Response::new(pb::AdminReply { message: format!("node {} removed", req.node_id) }))
    }

    async fn propose(&self, req: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        let req = req.into_inner();
        // Decode first: a malformed command never reaches the log.
        command::decode(&req.command).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (resp, index) =
            self.node.propose_forwarded(req.command.to_vec(), req.leader_term).await.map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ProposeReply {
            response: rmp_serde::to_vec(&resp).expect("encodes").into(),
            log_index: index,
        }))
    }

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let req = req.into_inner();
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(5000)));
        self.node.sm.wait_applied(req.min_applied, wait).await.map_err(|e| e.to_status())?;
        let read = self.node.sm.read_messages(&req.topic, req.queue_id, &req.offsets).map_err(|e| e.to_status())?;
        if read.len() != req.offsets.len() {
            return Err(BrokerError::NoLeader("follower has not applied these offsets".into()).to_status());
        }
        let n = read.len() as u64;
        self.node.stats.reads_served.fetch_add(n, Ordering::Relaxed);
        self.node.stats.follower_reads_served.fetch_add(n, Ordering::Relaxed);
        Ok(Response::new(pb::ReadReply { messages: read.into_iter().map(|r| r.raw).collect() }))
    }

    async fn query_message(
        &self,
        req: Request<pb::QueryMessageRequest>,
    ) -> Result<Response<pb::QueryMessageReply>, Status> {
        let req = req.into_inner();
        let max = if req.max == 0 { 32 } else { req.max.min(1000) } as usize;
        let sm = &self.node.sm;
        let locations: Vec<(String, u32, u64)> = if !req.message_id.is_empty() {
            let found = sm.find_by_id(&req.message_id, max).map_err(|e| e.to_status())?;
            found.into_iter().filter(|(t, _, _)| req.topic.is_empty() || *t == req.topic).collect()
        } else if !req.key.is_empty() {
            check_name("topic", &req.topic).map_err(|e| e.to_status())?;
            let found = sm.find_by_key(&req.topic, &req.key, max).map_err(|e| e.to_status())?;
            found.into_iter().map(|(q, o)| (req.topic.clone(), q, o)).collect()
        } else {
            return Err(Status::invalid_argument("give a message id, or a topic and a key"));
        };
        let mut messages = Vec::with_capacity(locations.len());
        for (topic, queue, offset) in locations {
            for r in sm.read_messages(&topic, queue, &[offset]).map_err(|e| e.to_status())? {
                let mut found = self.found(&r, None);
                if !req.group.is_empty() {
                    (found.group_state, found.attempts) = sm.delivery_state(&req.group, &topic, queue, offset);
                }
                messages.push(found);
            }
        }
        Ok(Response::new(pb::QueryMessageReply { messages }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<pb::DeadLettersRequest>,
    ) -> Result<Response<pb::DeadLettersReply>, Status> {
        let req = req.into_inner();
        check_name("consumer group", &req.group).map_err(|e| e.to_status())?;
        let max = if req.max == 0 { 32 } else { req.max.min(1000) } as usize;
        let (found, end) = self.node.sm.dead_letters(&req.group, req.from_offset, max).map_err(|e| e.to_status())?;
        // A page without readable letters still moves on.
        let page_end = req.from_offset.saturating_add(max as u64).min(end).max(req.from_offset);
        let next = found.last().map(|(o, _, _)| o + 1).unwrap_or(page_end);
        let messages = found.iter().map(|(_, origin, r)| self.found(r, Some(origin))).collect();
        Ok(Response::new(pb::DeadLettersReply { messages, next_offset: next, end_offset: end }))
    }

    async fn resend_dead_letter(
        &self,
        req: Request<pb::ResendDeadLetterRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let req = req.into_inner();
        check_name("consumer group", &req.group).map_err(|e| e.to_status())?;
        Ok(Response::new(self.control(Control::ResendDeadLetter { group: req.group, dlq_offset: req.offset }).await?))
    }

    async fn consumer_connections(
        &self,
        req: Request<pb::ConsumerConnectionsRequest>,
    ) -> Result<Response<pb::ConsumerConnectionsReply>, Status> {
        let group = req.into_inner().group;
        check_name("consumer group", &group).map_err(|e| e.to_status())?;
        let now = crate::messaging::now_ms();
        let expire = self.node.settings().consumer.client_expire_ms;
        let st = self.node.sm.read();
        let mut connections: Vec<pb::ConsumerConnection> = st
            .held
            .group_clients(&group)
            .map(|(client, seen)| pb::ConsumerConnection {
                client_id: client.to_string(),
                last_heartbeat_ms_ago: now.saturating_sub(seen),
                alive: seen.saturating_add(expire) >= now,
                assigned: Vec::new(),
            })
            .collect();
        connections.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        // Assignment over the topics the group has state in, as push
        // consumers get it (QueryAssignment).
        let alive: Vec<String> = connections.iter().filter(|c| c.alive).map(|c| c.client_id.clone()).collect();
        let topics: BTreeSet<&String> = st.groups.keys().filter(|(g, _, _)| *g == group).map(|(_, t, _)| t).collect();
        for c in connections.iter_mut().filter(|c| c.alive) {
            for t in &topics {
                let n = st.topics.get(*t).map_or(0, |conf| conf.queues as usize);
                for q in crate::clients::allocate_averagely(n, &alive, &c.client_id) {
                    c.assigned.push(format!("{t}#{q}"));
                }
            }
        }
        Ok(Response::new(pb::ConsumerConnectionsReply { connections }))
    }

    async fn reset_offset_by_time(
        &self,
        req: Request<pb::ResetOffsetRequest>,
    ) -> Result<Response<pb::ResetOffsetReply>, Status> {
        let req = req.into_inner();
        check_name("consumer group", &req.group).map_err(|e| e.to_status())?;
        check_name("topic", &req.topic).map_err(|e| e.to_status())?;
        // Search what the group has committed, not a stale local copy.
        self.node.linearizable_barrier().await.map_err(|e| e.to_status())?;
        let queues = {
            let st = self.node.sm.read();
            st.topics
                .get(&req.topic)
                .map(|t| t.queues)
                .ok_or_else(|| Status::not_found(format!("topic {}", req.topic)))?
        };
        let mut out = Vec::new();
        for queue in 0..queues {
            let offset = self.offset_at_time(&req.topic, queue, req.timestamp_ms).map_err(|e| e.to_status())?;
            let c = Control::UpdateOffset { group: req.group.clone(), topic: req.topic.clone(), queue, offset };
            self.control(c).await?;
            out.push(pb::QueueOffset { queue_id: queue, offset });
        }
        Ok(Response::new(pb::ResetOffsetReply { queues: out }))
    }

    async fn get_config(&self, _req: Request<pb::Empty>) -> Result<Response<pb::ConfigReply>, Status> {
        Ok(Response::new(pb::ConfigReply { toml: self.node.effective_config().to_toml_redacted() }))
    }

    async fn update_config(&self, req: Request<pb::UpdateConfigRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let req = req.into_inner();
        self.node.update_setting(&req.key, &req.value).map_err(Status::invalid_argument)?;
        tracing::info!(key = %req.key, value = %req.value, "setting changed through the admin API");
        Ok(Response::new(pb::AdminReply {
            message: format!(
                "node {}: {} = {} in effect (in memory: put it in the config file to keep it after a restart)",
                self.node.id(),
                req.key,
                req.value
            ),
        }))
    }
}

impl Admin {
    /// The first offset of a queue whose message was stored at or after
    /// `timestamp_ms` (the queue's end if none), by binary search over store
    /// times: they grow along a queue, up to clock differences between the
    /// nodes that stored them.
    fn offset_at_time(&self, topic: &str, queue: u32, timestamp_ms: i64) -> crate::error::Result<u64> {
        let (mut lo, mut hi) = self.node.sm.queue_range(topic, queue).unwrap_or((0, 0));
        // At most 64 probes: the range halves each time.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let stored = self.node.sm.read_messages(topic, queue, &[mid])?;
            match stored.first() {
                Some(m) if m.message.store_timestamp_ms >= timestamp_ms => hi = mid,
                // Stored earlier, or no longer there (retention): look later.
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    /// A stored message as the admin API shows it.
    fn found(&self, r: &crate::sm::ReadMessage, origin: Option<&crate::held::DeadOrigin>) -> pb::FoundMessage {
        let m = &r.message;
        pb::FoundMessage {
            topic: m.topic.clone(),
            queue_id: r.queue,
            offset: r.offset,
            message_id: m.message_id.clone(),
            tag: m.tag.clone(),
            keys: m.keys.clone(),
            properties: m.properties.clone(),
            body: m.body.clone(),
            born_timestamp_ms: m.born_timestamp_ms,
            store_timestamp_ms: m.store_timestamp_ms,
            message_group: m.message_group.clone(),
            delivery_timestamp_ms: m.delivery_timestamp_ms,
            broker_name: self.node.config.broker_name.clone(),
            origin_queue_id: origin.map(|o| o.queue).unwrap_or(r.queue),
            origin_offset: origin.map(|o| o.offset).unwrap_or(r.offset),
            attempts: origin.map(|o| o.attempts).unwrap_or(0),
            group_state: String::new(),
        }
    }
}
