//! [`Admin`]: the admin API of a node (`raftmq.admin.AdminService`).

use raftmq_proto::admin::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use crate::ClientError;
use crate::Result;
use crate::admin_pb;
use crate::channel;

/// The admin API of a node.
#[derive(Clone)]
pub struct Admin {
    addr: String,
    client: AdminServiceClient<Channel>,
}

fn admin_err(s: tonic::Status) -> ClientError {
    ClientError::Admin { code: s.code(), message: s.message().to_string() }
}

impl Admin {
    /// An admin client of the node at `addr` (`host:port`); connects lazily.
    pub fn connect(addr: &str) -> Result<Self> {
        // Query and dead-letter replies carry message bodies (up to 4 MiB each).
        let client = AdminServiceClient::new(channel(addr)?).max_decoding_message_size(256 << 20);
        Ok(Self { addr: addr.to_string(), client })
    }

    /// The node's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Creates a topic (`update`: or changes an existing one).
    /// `message_type`: 1 NORMAL, 2 FIFO, 3 DELAY, 4 TRANSACTION.
    pub async fn create_topic(&self, name: &str, queues: u32, message_type: i32, update: bool) -> Result<String> {
        let req = admin_pb::CreateTopicRequest {
            topic: Some(admin_pb::TopicConfig { name: name.into(), queues, message_type }),
            update,
        };
        Ok(self.client.clone().create_topic(req).await.map_err(admin_err)?.into_inner().message)
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str) -> Result<String> {
        Ok(self
            .client
            .clone()
            .delete_topic(admin_pb::DeleteTopicRequest { name: name.into() })
            .await
            .map_err(admin_err)?
            .into_inner()
            .message)
    }

    /// Every topic with its queues' offsets.
    pub async fn list_topics(&self) -> Result<Vec<admin_pb::TopicStatus>> {
        Ok(self.client.clone().list_topics(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner().topics)
    }

    /// Every node of the cluster as this node sees it.
    pub async fn cluster_status(&self) -> Result<Vec<admin_pb::NodeStatus>> {
        Ok(self.client.clone().cluster_status(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner().nodes)
    }

    /// This node's status.
    pub async fn node_status(&self) -> Result<admin_pb::NodeStatus> {
        Ok(self.client.clone().get_node_status(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner())
    }

    /// Creates or replaces a consumer group's configuration.
    pub async fn update_group(&self, config: admin_pb::GroupConfig) -> Result<String> {
        Ok(self.client.clone().update_group(config).await.map_err(admin_err)?.into_inner().message)
    }

    /// Deletes a consumer group's configuration.
    pub async fn delete_group(&self, name: &str) -> Result<String> {
        let req = admin_pb::DeleteGroupRequest { name: name.into() };
        Ok(self.client.clone().delete_group(req).await.map_err(admin_err)?.into_inner().message)
    }

    /// Every consumer group configuration.
    pub async fn list_groups(&self) -> Result<Vec<admin_pb::GroupConfig>> {
        Ok(self.client.clone().list_groups(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner().groups)
    }

    /// Every consumer group: the configured ones, then those with
    /// consumption state only (shown with the defaults: enabled, broker
    /// default attempts).
    pub async fn all_groups(&self) -> Result<Vec<admin_pb::GroupConfig>> {
        let r = self.client.clone().list_groups(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner();
        let mut groups = r.groups;
        groups.extend(r.unconfigured.into_iter().map(|name| admin_pb::GroupConfig {
            name,
            consume_enabled: true,
            ..Default::default()
        }));
        Ok(groups)
    }

    /// A group's offsets, lag and in-flight messages per queue (`topic` empty: every topic).
    pub async fn consumer_progress(&self, group: &str, topic: &str) -> Result<admin_pb::ConsumerProgressReply> {
        let req = admin_pb::ConsumerProgressRequest { group: group.into(), topic: topic.into() };
        Ok(self.client.clone().consumer_progress(req).await.map_err(admin_err)?.into_inner())
    }

    /// Hands Raft leadership of this node's group to node `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<String> {
        let req = admin_pb::TransferLeaderRequest { to_node: to };
        Ok(self.client.clone().transfer_leader(req).await.map_err(admin_err)?.into_inner().message)
    }

    /// Adds a node to this node's group.
    pub async fn add_node(&self, id: u64, address: &str) -> Result<String> {
        let req = admin_pb::AddNodeRequest { node_id: id, address: address.into() };
        Ok(self.client.clone().add_node(req).await.map_err(admin_err)?.into_inner().message)
    }

    /// Removes a node from this node's group.
    pub async fn remove_node(&self, id: u64) -> Result<String> {
        Ok(self
            .client
            .clone()
            .remove_node(admin_pb::RemoveNodeRequest { node_id: id })
            .await
            .map_err(admin_err)?
            .into_inner()
            .message)
    }

    /// Messages with this id (`topic`: only in that topic; `None`: any topic).
    pub async fn query_message_by_id(
        &self,
        message_id: &str,
        topic: Option<&str>,
    ) -> Result<Vec<admin_pb::FoundMessage>> {
        if message_id.is_empty() {
            return Err(ClientError::Input("empty message id".into()));
        }
        let req = admin_pb::QueryMessageRequest {
            topic: topic.unwrap_or_default().into(),
            message_id: message_id.into(),
            ..Default::default()
        };
        Ok(self.client.clone().query_message(req).await.map_err(admin_err)?.into_inner().messages)
    }

    /// Messages of `topic` with key `key`, at most `max` (0: the broker's
    /// default, 32; at most 1000).
    pub async fn query_message_by_key(&self, topic: &str, key: &str, max: u32) -> Result<Vec<admin_pb::FoundMessage>> {
        if topic.is_empty() || key.is_empty() {
            return Err(ClientError::Input("a query by key needs a topic and a key".into()));
        }
        let req = admin_pb::QueryMessageRequest { topic: topic.into(), key: key.into(), max, ..Default::default() };
        Ok(self.client.clone().query_message(req).await.map_err(admin_err)?.into_inner().messages)
    }

    /// Any message query (by id or key), optionally with each message's
    /// delivery state for a consumer group (`req.group`).
    pub async fn query_messages(&self, req: admin_pb::QueryMessageRequest) -> Result<Vec<admin_pb::FoundMessage>> {
        Ok(self.client.clone().query_message(req).await.map_err(admin_err)?.into_inner().messages)
    }

    /// Dead letters of `group` from offset `from` of its dead-letter queue,
    /// at most `max` (0: the broker's default, 32; at most 1000), with the
    /// next offset and the queue's end.
    pub async fn dead_letters(&self, group: &str, from: u64, max: u32) -> Result<admin_pb::DeadLettersReply> {
        let req = admin_pb::DeadLettersRequest { group: group.into(), from_offset: from, max };
        Ok(self.client.clone().list_dead_letters(req).await.map_err(admin_err)?.into_inner())
    }

    /// The dead letter at `offset` of `group`'s dead-letter queue, if any.
    pub async fn dead_letter(&self, group: &str, offset: u64) -> Result<Option<admin_pb::FoundMessage>> {
        let r = self.dead_letters(group, offset, 1).await?;
        Ok(r.messages.into_iter().find(|m| m.offset == offset))
    }

    /// Hands the dead letter at `offset` back to `group`: delivered again
    /// from attempt 1, to that group only.
    pub async fn resend_dead_letter(&self, group: &str, offset: u64) -> Result<String> {
        let req = admin_pb::ResendDeadLetterRequest { group: group.into(), offset };
        Ok(self.client.clone().resend_dead_letter(req).await.map_err(admin_err)?.into_inner().message)
    }

    /// The consumers of `group` heard from by heartbeat.
    pub async fn consumer_connections(&self, group: &str) -> Result<Vec<admin_pb::ConsumerConnection>> {
        let req = admin_pb::ConsumerConnectionsRequest { group: group.into() };
        Ok(self.client.clone().consumer_connections(req).await.map_err(admin_err)?.into_inner().connections)
    }

    /// Moves `group`'s offsets on `topic` to the first messages stored at or
    /// after `timestamp_ms`; returns the new offset of each queue.
    pub async fn reset_offset_by_time(
        &self,
        group: &str,
        topic: &str,
        timestamp_ms: i64,
    ) -> Result<Vec<admin_pb::QueueOffset>> {
        let req = admin_pb::ResetOffsetRequest { group: group.into(), topic: topic.into(), timestamp_ms };
        Ok(self.client.clone().reset_offset_by_time(req).await.map_err(admin_err)?.into_inner().queues)
    }

    /// The node's configuration in effect, as TOML (secrets redacted).
    pub async fn get_config(&self) -> Result<String> {
        Ok(self.client.clone().get_config(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner().toml)
    }

    /// Changes one run-time setting of this node in memory (`limits.x`,
    /// `follower_read.x`, `consumer.x`, `transaction.x`; value in TOML).
    pub async fn update_config(&self, key: &str, value: &str) -> Result<String> {
        let req = admin_pb::UpdateConfigRequest { key: key.into(), value: value.into() };
        Ok(self.client.clone().update_config(req).await.map_err(admin_err)?.into_inner().message)
    }
}
