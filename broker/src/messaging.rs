//! The client API: `apache.rocketmq.v2.MessagingService`, as the official
//! RocketMQ 5 clients expect it (see `proto/PROTOCOL-NOTES.md`).
//!
//! Any node serves every call. Commands (send, pop, ack, ...) go to the group
//! leader through Raft; message bytes are read from the local CommitLog once
//! the local state machine has applied the command (a follower reads as soon
//! as it catches up), or, when the leader is loaded, from a follower.
//!
//! A topic may span several groups. Like RocketMQ 5's proxy, every node
//! serves the whole cluster: routes list the queues of every group (broker
//! name = group), sends are spread over them, and a request for a queue of
//! another group (by broker name, or by the group inside a receipt handle)
//! is forwarded once to a node of that group ([`FORWARDED_HEADER`]).

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use futures::Stream;
use prost::Message as _;
use raftmq_proto::admin::ReadRequest;
use raftmq_proto::rocketmq as pb;
use raftmq_proto::rocketmq::Code;
use raftmq_proto::rocketmq::messaging_service_server::MessagingService;
use raftmq_proto::store::StoredMessage;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::acl::Action;
use crate::acl::Resource;
use crate::batcher::Outcome;
use crate::clients::CLIENT_ID_HEADER;
use crate::clients::Clients;
use crate::command::Control;
use crate::command::FilterSpec;
use crate::command::Popped;
use crate::command::RefusedCode;
use crate::command::{self};
use crate::error::BrokerError;
use crate::error::Result;
use crate::node::BrokerNode;
use crate::sm::ReadMessage;
use crate::sm::check_name;

type Stream_<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;
/// The client API of a node of another group (forwarding).
type PeerClient = pb::messaging_service_client::MessagingServiceClient<tonic::transport::Channel>;

pub struct Messaging {
    pub node: Arc<BrokerNode>,
    pub clients: Arc<Clients>,
}

/// What a producer learns of one stored message.
pub struct SendOutcome {
    pub message_id: String,
    /// Queue offset; 0 for delayed and half messages (they get theirs later).
    pub offset: u64,
    /// Half messages: the id EndTransaction names.
    pub transaction_id: String,
}

/// Wall-clock milliseconds (plus the clock-skew test hook's offset).
pub fn now_ms() -> u64 {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    (ms + crate::faults::clock_offset_ms()).max(0) as u64
}

fn ok() -> pb::Status {
    pb::Status { code: Code::Ok as i32, message: "OK".into() }
}

fn err_status(e: &BrokerError) -> pb::Status {
    pb::Status { code: e.code() as i32, message: e.to_string() }
}

fn code_status(code: Code, message: impl Into<String>) -> pb::Status {
    pb::Status { code: code as i32, message: message.into() }
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn ts_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

fn dur_ms(d: &prost_types::Duration) -> u64 {
    (d.seconds.max(0) as u64).saturating_mul(1000).saturating_add((d.nanos.max(0) as u64) / 1_000_000)
}

fn dur(ms: u64) -> prost_types::Duration {
    prost_types::Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Marks a request one node forwarded to a node of another group: served
/// there, never forwarded again.
pub const FORWARDED_HEADER: &str = "x-raftmq-forwarded";

/// Receipt handle: `queue.offset.pop_index.group` (opaque to clients; the
/// group routes acks to the group that popped the message).
pub fn encode_handle(group: &str, queue: u32, offset: u64, pop_index: u64) -> String {
    format!("{queue}.{offset}.{pop_index}.{group}")
}

/// A decoded receipt handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub group: String,
    pub queue: u32,
    pub offset: u64,
    pub pop_index: u64,
}

pub fn decode_handle(h: &str) -> Result<Handle> {
    let bad = || BrokerError::InvalidReceiptHandle(format!("{h:?} is not a receipt handle of this cluster"));
    let mut it = h.splitn(4, '.');
    let queue = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let offset = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let pop_index = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let group = it.next().filter(|g| !g.is_empty()).ok_or_else(bad)?.to_string();
    Ok(Handle { group, queue, offset, pop_index })
}

/// Proposes a command; a refusal (the same on every node) becomes the
/// error a client gets for it. `topic` names the topic for "not found".
pub(crate) async fn propose_accepted(node: &BrokerNode, topic: &str, cmd: Vec<u8>) -> Result<(command::Response, u64)> {
    let (resp, index) = node.propose(cmd).await?;
    match resp {
        command::Response::Refused { code, message } => Err(match code {
            RefusedCode::TopicNotFound => BrokerError::TopicNotFound(topic.to_string()),
            RefusedCode::InvalidReceiptHandle => BrokerError::InvalidReceiptHandle(message),
            RefusedCode::BadFilter => BrokerError::BadFilter(message),
            RefusedCode::TransactionNotFound => BrokerError::TransactionNotFound(message),
            RefusedCode::BadRequest
            | RefusedCode::BadQueue
            | RefusedCode::TopicExists
            | RefusedCode::GroupNotFound
            | RefusedCode::ConsumeDisabled => BrokerError::Refused(message),
        }),
        resp => Ok((resp, index)),
    }
}

/// A command that answers `Done` when accepted.
async fn propose_done(node: &BrokerNode, topic: &str, cmd: &Control) -> Result<()> {
    match propose_accepted(node, topic, command::encode_control(cmd)).await?.0 {
        command::Response::Done => Ok(()),
        other => Err(BrokerError::Raft(format!("unexpected response {other:?}"))),
    }
}

/// Adds messages handed to a consumer to their topic's counters.
fn count_consumed(node: &BrokerNode, topic: &str, read: &[ReadMessage]) {
    let bytes: usize = read.iter().map(|r| r.message.body.len()).sum();
    node.stats.count_topic(topic, |c| {
        c.consumed_messages += read.len() as u64;
        c.consumed_bytes += bytes as u64;
    });
}

/// The prefix of dead-letter topics.
pub const DLQ_PREFIX: &str = "%DLQ%";

/// The signature headers of a request (ACL), kept to check it and to pass
/// it on when forwarding.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    authorization: Option<String>,
    date_time: Option<String>,
}

impl Auth {
    pub fn of<T>(req: &Request<T>) -> Auth {
        let get = |k: &str| req.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        Auth { authorization: get(crate::acl::AUTHORIZATION_HEADER), date_time: get(crate::acl::DATE_TIME_HEADER) }
    }

    fn copy_to(&self, md: &mut tonic::metadata::MetadataMap) {
        for (k, v) in
            [(crate::acl::AUTHORIZATION_HEADER, &self.authorization), (crate::acl::DATE_TIME_HEADER, &self.date_time)]
        {
            if let Some(v) = v.as_ref().and_then(|v| v.parse().ok()) {
                md.insert(k, v);
            }
        }
    }
}

/// Where a request comes from: a client, or a node of another group that
/// forwarded it (with the client's signature headers).
pub struct Origin {
    forwarded: bool,
    auth: Auth,
    /// Passed on too: the serving node knows the client (simple consumers
    /// pop every queue, push consumers' messages are renewed).
    client_id: Option<String>,
}

impl Origin {
    fn of<T>(req: &Request<T>) -> Origin {
        Origin {
            forwarded: req.metadata().contains_key(FORWARDED_HEADER),
            auth: Auth::of(req),
            client_id: client_id_of(req),
        }
    }
}

fn client_id_of<T>(req: &Request<T>) -> Option<String> {
    req.metadata().get(CLIENT_ID_HEADER).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()).map(str::to_string)
}

/// A receive's filter; a bad one is the client's error.
fn filter_spec(f: Option<&pb::FilterExpression>) -> Result<Option<FilterSpec>> {
    let Some(f) = f else { return Ok(None) };
    let sql = f.r#type == pb::FilterType::Sql as i32;
    let kind = if sql { crate::filter::FilterKind::Sql } else { crate::filter::FilterKind::Tag };
    let parsed =
        crate::filter::Filter::parse(kind, &f.expression).map_err(|e| BrokerError::BadFilter(e.to_string()))?;
    Ok((!parsed.is_all()).then(|| FilterSpec { sql, expression: f.expression.clone() }))
}

fn broker_of(mq: Option<&pb::MessageQueue>) -> Option<&str> {
    mq.and_then(|q| q.broker.as_ref()).map(|b| b.name.as_str()).filter(|n| !n.is_empty())
}

/// Reads the deadline the client gave (`grpc-timeout` header).
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Converts a stored message to what a consumer receives.
pub fn to_v2_message(
    m: &StoredMessage,
    namespace: &str,
    queue: u32,
    offset: u64,
    attempt: Option<u32>,
    handle: Option<String>,
    store_host: &str,
) -> pb::Message {
    let sp = pb::SystemProperties {
        tag: (!m.tag.is_empty()).then(|| m.tag.clone()),
        keys: m.keys.clone(),
        message_id: m.message_id.clone(),
        body_digest: Some(pb::Digest {
            r#type: pb::DigestType::Crc32 as i32,
            checksum: format!("{:08X}", m.body_crc32),
        }),
        body_encoding: pb::Encoding::Identity as i32,
        message_type: if m.message_type == 0 { pb::MessageType::Normal as i32 } else { m.message_type },
        born_timestamp: Some(ts(m.born_timestamp_ms)),
        born_host: m.born_host.clone(),
        store_timestamp: Some(ts(m.store_timestamp_ms)),
        store_host: store_host.to_string(),
        delivery_timestamp: (m.delivery_timestamp_ms > 0).then(|| ts(m.delivery_timestamp_ms)),
        receipt_handle: handle,
        queue_id: queue as i32,
        queue_offset: Some(offset as i64),
        delivery_attempt: attempt.map(|a| a as i32),
        message_group: (!m.message_group.is_empty()).then(|| m.message_group.clone()),
        ..Default::default()
    };
    pb::Message {
        topic: Some(pb::Resource { resource_namespace: namespace.to_string(), name: m.topic.clone() }),
        user_properties: m.properties.clone(),
        system_properties: Some(sp),
        body: m.body.to_vec(),
    }
}

/// The machine's memory, read once.
fn total_memory_bytes() -> u64 {
    static TOTAL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(read_total_memory_bytes)
}

fn read_total_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

impl Messaging {
    /// Checks a request's signature and permissions when ACL is on.
    fn authorize(&self, auth: &Auth, action: Action, resources: &[Resource<'_>]) -> Result<()> {
        let settings = self.node.settings();
        if !settings.acl.enabled() {
            return Ok(());
        }
        settings
            .acl
            .check(auth.authorization.as_deref(), auth.date_time.as_deref(), now_ms(), action, resources)
            .map(|_| ())
            .map_err(|e| match e {
                crate::acl::AclError::Forbidden(m) => BrokerError::Forbidden(m),
                crate::acl::AclError::Unauthenticated(m) | crate::acl::AclError::Config(m) => {
                    BrokerError::Unauthorized(m)
                }
            })
    }

    /// The push consumers of `group` heard from within
    /// `consumer.client_expire_ms` (replicated heartbeats), plus `me`, sorted.
    fn live_consumers(&self, group: &str, me: &str) -> Vec<String> {
        let now = now_ms();
        let expire = self.node.settings().consumer.client_expire_ms;
        let st = self.node.sm.read();
        let mut live: Vec<String> = st
            .held
            .group_clients(group)
            .filter(|(_, seen)| seen.saturating_add(expire) >= now)
            .map(|(c, _)| c.to_string())
            .collect();
        if !live.iter().any(|c| c == me) {
            live.push(me.to_string());
        }
        live.sort();
        live
    }

    fn topic_conf_now(&self, topic: &str) -> Result<crate::sm::TopicConf> {
        check_name("topic", topic)?;
        self.node.sm.read().topics.get(topic).cloned().ok_or_else(|| BrokerError::TopicNotFound(topic.to_string()))
    }

    /// The topic's config. A follower may not have applied a topic the
    /// leader just created: it waits up to a second for its applied index to
    /// reach what it knows is committed before it answers "not found".
    async fn topic_conf(&self, topic: &str) -> Result<crate::sm::TopicConf> {
        match self.topic_conf_now(topic) {
            Err(BrokerError::TopicNotFound(_)) if !self.node.is_leader() => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Ok(c) = self.topic_conf_now(topic) {
                        return Ok(c);
                    }
                }
                self.topic_conf_now(topic)
            }
            other => other,
        }
    }

    /// The group a request for `broker` belongs to when it is not this one.
    fn remote(&self, broker: Option<&str>) -> Option<String> {
        broker.filter(|b| *b != self.node.config.broker_name).map(str::to_string)
    }

    /// Forwards a client call to a node of `group` (its leader first, the
    /// others while unreachable), marked as forwarded. `timeout` bounds it.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        group: &str,
        topic: &str,
        forwarded: &Origin,
        req: Req,
        timeout: Option<Duration>,
        call: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(PeerClient, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        if forwarded.forwarded {
            return Err(BrokerError::BadRequest(format!(
                "a forwarded request for broker group {group} reached group {}",
                self.node.config.broker_name
            )));
        }
        let addrs = self.node.routes.group_addrs(group, topic).await;
        if addrs.is_empty() {
            return Err(BrokerError::TopicNotFound(format!("{topic} in broker group {group} (no route to it)")));
        }
        let mut last = String::new();
        for addr in &addrs {
            let client = self.node.messaging_client(addr)?;
            let mut r = Request::new(req.clone());
            r.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
            forwarded.auth.copy_to(r.metadata_mut());
            if let Some(id) = forwarded.client_id.as_ref().and_then(|id| id.parse().ok()) {
                r.metadata_mut().insert(CLIENT_ID_HEADER, id);
            }
            r.set_timeout(timeout.unwrap_or(Duration::from_secs(10)));
            match call(client, r).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable => last = format!("{addr}: {}", s.message()),
                Err(s) => return Err(BrokerError::Unreachable(addr.clone(), s.message().to_string())),
            }
        }
        Err(BrokerError::Unreachable(format!("broker group {group}"), last))
    }

    /// (group, topic) of a message queue in another group.
    fn remote_queue(&self, mq: Option<&pb::MessageQueue>) -> Option<(String, String)> {
        let group = self.remote(broker_of(mq))?;
        let topic = mq.and_then(|q| q.topic.as_ref()).map(|t| t.name.clone()).unwrap_or_default();
        Some((group, topic))
    }

    /// Forwards a unary call to another group; a failure becomes the
    /// response `on_err` builds from its status.
    async fn forward_unary<Req, Resp, F, Fut>(
        &self,
        (group, topic): (String, String),
        forwarded: &Origin,
        req: Req,
        call: F,
        on_err: impl FnOnce(pb::Status) -> Resp,
    ) -> Response<Resp>
    where
        Req: Clone,
        F: Fn(PeerClient, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        Response::new(match self.forward(&group, &topic, forwarded, req, None, call).await {
            Ok(r) => r,
            Err(e) => on_err(err_status(&e)),
        })
    }

    /// Forwards a server-streaming call to another group and relays the
    /// items; a failure ends the stream with the item `status_item` builds.
    async fn forward_stream<Req, T, F, Fut>(
        &self,
        (group, topic): (String, String),
        forwarded: &Origin,
        req: Req,
        timeout: Option<Duration>,
        call: F,
        status_item: fn(pb::Status) -> T,
    ) -> Response<Stream_<T>>
    where
        Req: Clone,
        T: Send + 'static,
        F: Fn(PeerClient, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<tonic::Streaming<T>>, Status>>,
    {
        let mut items = Vec::new();
        match self.forward(&group, &topic, forwarded, req, timeout, call).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(s) => {
                        items.push(status_item(err_status(&BrokerError::Unreachable(group, s.message().to_string()))));
                        break;
                    }
                }
            },
            Err(e) => items.push(status_item(err_status(&e))),
        }
        Response::new(Box::pin(tokio_stream::iter(items.into_iter().map(Ok))))
    }

    /// The topic here (if this group has it) and in the other groups (unless
    /// the request was forwarded: then only here). Not found anywhere is an
    /// error.
    async fn topic_everywhere(
        &self,
        topic: &str,
        forwarded: bool,
    ) -> Result<(Option<crate::sm::TopicConf>, Vec<raftmq_proto::namesrv::GroupRoute>)> {
        check_name("topic", topic)?;
        let local = self.topic_conf_now(topic).ok();
        let remote = if forwarded { Vec::new() } else { self.node.routes.remote_groups(topic).await };
        if local.is_none() && remote.is_empty() && topic.starts_with(DLQ_PREFIX) {
            // A consumer may subscribe to a dead-letter queue before anything
            // went there: it is this group's, with one queue.
            let synth = crate::sm::TopicConf { name: topic.to_string(), queues: 1, message_type: 0 };
            return Ok((Some(synth), remote));
        }
        if local.is_none() && remote.is_empty() {
            // Maybe just created and not applied here yet.
            return Ok((Some(self.topic_conf(topic).await?), remote));
        }
        Ok((local, remote))
    }

    /// Which group stores a send: `None` for this one. Spread over every
    /// queue of every group serving the topic (round robin, or by message
    /// group so a FIFO group stays in one place).
    async fn send_target(&self, messages: &[pb::Message], forwarded: bool) -> Result<Option<String>> {
        let Some(first) = messages.first() else { return Ok(None) };
        if forwarded {
            return Ok(None);
        }
        let topic = first.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let (local, remote) = self.topic_everywhere(&topic, false).await?;
        if remote.is_empty() {
            return Ok(None);
        }
        let local_queues = u64::from(local.map(|c| c.queues).unwrap_or(0));
        let total = local_queues + remote.iter().map(|g| u64::from(g.queues)).sum::<u64>();
        let message_group = first.system_properties.as_ref().and_then(|p| p.message_group.clone());
        let mut k = match message_group.filter(|g| !g.is_empty()) {
            Some(g) => crate::cq::tag_hash(&g) % total,
            None => self.node.next_group_round_robin() % total,
        };
        if k < local_queues {
            return Ok(None);
        }
        k -= local_queues;
        for g in remote {
            if k < u64::from(g.queues) {
                return Ok(Some(g.broker_name));
            }
            k -= u64::from(g.queues);
        }
        Ok(None)
    }

    fn advertised(&self) -> String {
        self.node.config.advertised_addr()
    }

    /// Validates one message and turns it into its stored form.
    fn to_stored(&self, m: &pb::Message, now: i64) -> Result<StoredMessage> {
        let topic = m.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let limit = self.node.settings().limits.max_body_bytes;
        if m.body.len() > limit as usize {
            return Err(BrokerError::BodyTooLarge { size: m.body.len(), limit });
        }
        let sp = m.system_properties.clone().unwrap_or_default();
        if sp.message_id.is_empty() {
            return Err(BrokerError::BadRequest("message without message_id".into()));
        }
        check_indexed("message_id", &sp.message_id, MAX_MESSAGE_ID_BYTES)?;
        for k in &sp.keys {
            check_indexed("key", k, MAX_KEY_BYTES)?;
        }
        if sp.body_encoding == pb::Encoding::Gzip as i32 {
            return Err(BrokerError::BadRequest("gzip bodies are not supported; send IDENTITY".into()));
        }
        if let Some(t) = sp.delivery_timestamp.as_ref().map(ts_ms)
            && t > now.saturating_add(self.node.settings().limits.max_delay_ms as i64)
        {
            return Err(BrokerError::BadDeliveryTime(format!(
                "delivery time {t} is more than limits.max_delay_ms = {} ms from now",
                self.node.settings().limits.max_delay_ms
            )));
        }
        let props_bytes: usize = m.user_properties.iter().map(|(k, v)| k.len() + v.len()).sum();
        if props_bytes > 32 * 1024 {
            return Err(BrokerError::BadRequest(format!("user properties of {props_bytes} bytes exceed 32 KiB")));
        }
        Ok(StoredMessage {
            topic,
            message_id: sp.message_id,
            tag: sp.tag.unwrap_or_default(),
            keys: sp.keys,
            properties: m.user_properties.clone(),
            body: m.body.clone().into(),
            born_timestamp_ms: sp.born_timestamp.as_ref().map(ts_ms).unwrap_or(now),
            born_host: sp.born_host,
            message_group: sp.message_group.unwrap_or_default(),
            delivery_timestamp_ms: sp.delivery_timestamp.as_ref().map(ts_ms).unwrap_or(0),
            store_timestamp_ms: now,
            message_type: sp.message_type,
            queue_id: 0,
            body_crc32: crc32fast::hash(&m.body),
        })
    }

    /// Stores messages (all of one topic); one outcome per message, in order.
    pub async fn send(&self, messages: &[pb::Message]) -> Result<Vec<SendOutcome>> {
        if messages.is_empty() {
            return Err(BrokerError::BadRequest("no messages".into()));
        }
        if messages.len() > self.node.settings().limits.max_batch_messages as usize {
            return Err(BrokerError::BadRequest(format!(
                "{} messages in one request; at most {}",
                messages.len(),
                self.node.settings().limits.max_batch_messages
            )));
        }
        let topic = messages[0].topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        if messages.iter().any(|m| m.topic.as_ref().map(|t| t.name.as_str()) != Some(topic.as_str())) {
            return Err(BrokerError::BadRequest("all messages of one request must have the same topic".into()));
        }
        let conf = self.topic_conf(&topic).await?;
        let now = now_ms() as i64;
        // Messages of a FIFO message group go to the queue their group
        // hashes to; the others to the queue their batch picks.
        let mut by_lane: HashMap<Option<u32>, Vec<(usize, StoredMessage)>> = HashMap::new();
        for (i, m) in messages.iter().enumerate() {
            let s = self.to_stored(m, now)?;
            let lane = (!s.message_group.is_empty())
                .then(|| (crate::cq::tag_hash(&s.message_group) % u64::from(conf.queues)) as u32);
            by_lane.entry(lane).or_default().push((i, s));
        }
        let mut out: Vec<SendOutcome> = messages
            .iter()
            .map(|m| SendOutcome {
                message_id: m.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default(),
                offset: 0,
                transaction_id: String::new(),
            })
            .collect();
        for (lane, items) in by_lane {
            let (slots, stored): (Vec<usize>, Vec<StoredMessage>) = items.into_iter().unzip();
            let outcomes = self.node.sends.send(&self.node, &topic, lane, conf.queues, stored).await?;
            for (i, o) in slots.into_iter().zip(outcomes) {
                match o {
                    Outcome::Queued { offset, .. } => out[i].offset = offset,
                    Outcome::Half(tx) => {
                        out[i].transaction_id = crate::clients::encode_tx(&self.node.config.broker_name, tx)
                    }
                    Outcome::Delayed => {}
                }
            }
        }
        self.node.stats.messages_sent.fetch_add(messages.len() as u64, Ordering::Relaxed);
        let bytes: usize = messages.iter().map(|m| m.body.len()).sum();
        self.node.stats.count_topic(&topic, |c| {
            c.produced_messages += messages.len() as u64;
            c.produced_bytes += bytes as u64;
        });
        Ok(out)
    }

    /// Pops messages for a group, long-polling until `deadline`.
    #[allow(clippy::too_many_arguments)]
    pub async fn pop(
        &self,
        group: &str,
        topic: &str,
        queues: Vec<u32>,
        max: u32,
        invisible_ms: u64,
        poll: Duration,
        filter: Option<FilterSpec>,
    ) -> Result<Vec<(Popped, u64, ReadMessage)>> {
        let until = tokio::time::Instant::now() + poll;
        let default_attempts = self.node.settings().limits.max_delivery_attempts;
        // A Pop may only skip filtered messages or hold FIFO ones: look again
        // at once, a bounded number of times, before waiting for news.
        let mut again = 0u32;
        loop {
            let now = now_ms();
            let notified = self.node.sm.activity.notified();
            if self.node.sm.poppable_with(group, topic, &queues, now, filter.as_ref(), default_attempts) {
                let cmd = Control::Pop {
                    group: group.to_string(),
                    topic: topic.to_string(),
                    queues: queues.clone(),
                    max,
                    invisible_ms,
                    now_ms: now,
                    filter: filter.clone(),
                    max_attempts: default_attempts,
                };
                let (resp, index) = propose_accepted(&self.node, topic, command::encode_control(&cmd)).await?;
                match resp {
                    command::Response::Popped { messages } if !messages.is_empty() => {
                        let read = self.read_popped(topic, &messages, index).await?;
                        let mut by_offset: HashMap<(u32, u64), ReadMessage> =
                            read.into_iter().map(|r| ((r.queue, r.offset), r)).collect();
                        let mut out = Vec::with_capacity(messages.len());
                        for p in messages {
                            match by_offset.remove(&(p.queue, p.offset)) {
                                Some(r) => out.push((p, index, r)),
                                None => {
                                    // Retention removed it before anyone consumed it:
                                    // it is consumed as far as the group is concerned.
                                    let ack = Control::Ack {
                                        group: group.to_string(),
                                        topic: topic.to_string(),
                                        queue: p.queue,
                                        offset: p.offset,
                                        pop_index: index,
                                    };
                                    if let Err(e) = self.node.propose(command::encode_control(&ack)).await {
                                        tracing::warn!(error = %e, "acking an expired message");
                                    }
                                }
                            }
                        }
                        if !out.is_empty() {
                            return Ok(out);
                        }
                        continue;
                    }
                    command::Response::Popped { .. } if again < 64 => {
                        again += 1;
                        continue;
                    }
                    command::Response::Popped { .. } => {}
                    other => return Err(BrokerError::Raft(format!("unexpected response {other:?}"))),
                }
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return Ok(Vec::new());
            }
            // Wake on new messages, on the next invisibility expiry, or at the end.
            let mut wake = until;
            if let Some(v) = self.node.sm.next_visible_ms(group, topic, &queues) {
                let in_ms = v.saturating_sub(now_ms());
                wake = wake.min(now + Duration::from_millis(in_ms.max(5)));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Reads popped messages: locally once applied here, or from a follower
    /// when this node leads and is loaded.
    async fn read_popped(&self, topic: &str, popped: &[Popped], index: u64) -> Result<Vec<ReadMessage>> {
        let node = &self.node;
        let inflight = node.stats.inflight_reads.fetch_add(1, Ordering::Relaxed) + 1;
        let _guard = scopeguard(|| {
            node.stats.inflight_reads.fetch_sub(1, Ordering::Relaxed);
        });
        let settings = node.settings();
        let fr = &settings.follower_read;
        if fr.enabled && node.is_leader() {
            let loaded = inflight > u64::from(fr.max_inflight_reads) || self.lag_over_memory_ratio(topic, popped);
            if loaded && let Some(read) = self.read_from_follower(topic, popped, index).await {
                count_consumed(node, topic, &read);
                return Ok(read);
            }
        }
        node.sm.wait_applied(index, Duration::from_secs(2)).await?;
        let out = self.read_local(topic, popped)?;
        node.stats.reads_served.fetch_add(out.len() as u64, Ordering::Relaxed);
        count_consumed(node, topic, &out);
        Ok(out)
    }

    /// The popped messages still present, in order.
    fn read_local(&self, topic: &str, popped: &[Popped]) -> Result<Vec<ReadMessage>> {
        let mut out = Vec::with_capacity(popped.len());
        for p in popped {
            // Empty when retention removed the message.
            out.extend(self.node.sm.read_messages(topic, p.queue, &[p.offset])?);
        }
        Ok(out)
    }

    /// RocketMQ's rule: a consumer far behind (unread bytes over a share of
    /// memory) reads from a follower.
    fn lag_over_memory_ratio(&self, topic: &str, popped: &[Popped]) -> bool {
        let Some(first) = popped.first() else { return false };
        let Some(pos) = self.node.sm.message_position(topic, first.queue, first.offset) else { return false };
        let behind = self.node.log.end_pos().saturating_sub(pos);
        behind as f64 > self.node.settings().follower_read.lag_memory_ratio * total_memory_bytes() as f64
    }

    async fn read_from_follower(&self, topic: &str, popped: &[Popped], index: u64) -> Option<Vec<ReadMessage>> {
        let (followers, membership) = {
            let m = self.node.raft.metrics();
            let m = m.borrow_watched();
            let followers: Vec<u64> = m
                .replication
                .as_ref()?
                .iter()
                .filter(|(id, matched)| **id != self.node.id() && matched.is_some_and(|l| l.index >= index))
                .map(|(id, _)| *id)
                .collect();
            (followers, m.membership_config.membership().clone())
        };
        let pick = *followers.get((index as usize) % followers.len().max(1))?;
        let addr = membership.get_node(&pick)?.addr.clone();
        let mut client = self.node.admin_client(&addr).ok()?;
        let mut by_queue: HashMap<u32, Vec<u64>> = HashMap::new();
        for p in popped {
            by_queue.entry(p.queue).or_default().push(p.offset);
        }
        let mut got: HashMap<(u32, u64), ReadMessage> = HashMap::new();
        for (queue, offsets) in by_queue {
            let req = ReadRequest {
                topic: topic.to_string(),
                queue_id: queue,
                offsets: offsets.clone(),
                min_applied: index,
                wait_ms: self.node.settings().follower_read.wait_ms,
            };
            let reply = client.read(req).await.ok()?.into_inner();
            if reply.messages.len() != offsets.len() {
                return None;
            }
            for (o, raw) in offsets.into_iter().zip(reply.messages) {
                let message = StoredMessage::decode(raw.clone()).ok()?;
                got.insert((queue, o), ReadMessage { queue, offset: o, pos: 0, message, raw });
            }
        }
        tracing::debug!(follower = pick, n = popped.len(), "read served by a follower");
        popped.iter().map(|p| got.remove(&(p.queue, p.offset))).collect()
    }

    fn queues_for(&self, conf: &crate::sm::TopicConf, mq: Option<&pb::MessageQueue>) -> Result<Vec<u32>> {
        match mq.map(|q| q.id) {
            None | Some(-1) => Ok((0..conf.queues).collect()),
            Some(id) if id >= 0 && (id as u32) < conf.queues => Ok(vec![id as u32]),
            Some(id) => Err(BrokerError::BadRequest(format!("topic {} has no queue {id}", conf.name))),
        }
    }

    fn settings_reply(&self, s: &pb::Settings) -> pb::Settings {
        let settings = self.node.settings();
        let limits = &settings.limits;
        let mut out = s.clone();
        match &mut out.pub_sub {
            Some(pb::settings::PubSub::Publishing(p)) => {
                p.max_body_size = limits.max_body_bytes as i32;
                out.backoff_policy = Some(pb::RetryPolicy {
                    max_attempts: 3,
                    strategy: Some(pb::retry_policy::Strategy::ExponentialBackoff(pb::ExponentialBackoff {
                        initial: Some(dur(10)),
                        max: Some(dur(1000)),
                        multiplier: 2.0,
                    })),
                });
            }
            Some(pb::settings::PubSub::Subscription(sub)) => {
                if sub.long_polling_timeout.is_none() {
                    sub.long_polling_timeout = Some(dur(limits.max_long_polling_ms));
                }
                // The group's configuration, when an operator set one.
                let conf = sub.group.as_ref().and_then(|g| self.node.sm.read().group_confs.get(&g.name).cloned());
                match &conf {
                    Some(c) => sub.fifo = Some(c.fifo),
                    None => {
                        sub.fifo.get_or_insert(false);
                    }
                }
                let max_attempts =
                    conf.map(|c| c.max_delivery_attempts).filter(|m| *m > 0).unwrap_or(limits.max_delivery_attempts);
                // RocketMQ's consumer backoff: 1s 5s 10s 30s 1m 2m ... 2h, 17 attempts.
                let next = [1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200]
                    .into_iter()
                    .map(|s| dur(s * 1000))
                    .collect();
                out.backoff_policy = Some(pb::RetryPolicy {
                    max_attempts: max_attempts as i32,
                    strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(pb::CustomizedBackoff { next })),
                });
            }
            None => {}
        }
        out.metric = Some(pb::Metric { on: false, endpoints: None });
        out
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    G(Some(f))
}

fn group_name(r: &Option<pb::Resource>) -> Result<String> {
    let g = r.as_ref().map(|g| g.name.clone()).unwrap_or_default();
    check_name("consumer group", &g)?;
    Ok(g)
}

#[tonic::async_trait]
impl MessagingService for Messaging {
    type ReceiveMessageStream = Stream_<pb::ReceiveMessageResponse>;
    type PullMessageStream = Stream_<pb::PullMessageResponse>;
    type TelemetryStream = Stream_<pb::TelemetryCommand>;

    async fn query_route(
        &self,
        req: Request<pb::QueryRouteRequest>,
    ) -> std::result::Result<Response<pb::QueryRouteResponse>, Status> {
        // Not behind ACL: routes say which queues exist, nothing more, and a
        // client with a bad signature then gets the clear refusal of the
        // call it makes next instead of "no route".
        let req = req.into_inner();
        let topic = req.topic.clone().unwrap_or_default();
        let (local, remote) = match self.topic_everywhere(&topic.name, false).await {
            Ok(c) => c,
            Err(e) => {
                return Ok(Response::new(pb::QueryRouteResponse {
                    status: Some(err_status(&e)),
                    message_queues: vec![],
                }));
            }
        };
        // Like the Java proxy: the endpoints the client used; this node serves
        // (or forwards) everything, for every group.
        let endpoints = req.endpoints.filter(|e| !e.addresses.is_empty()).unwrap_or_else(|| {
            let addr = self.advertised();
            let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, "0"));
            pb::Endpoints {
                scheme: pb::AddressScheme::IPv4 as i32,
                addresses: vec![pb::Address { host: host.to_string(), port: port.parse().unwrap_or(0) }],
            }
        });
        let accept = |t: i32| vec![if t == 0 { pb::MessageType::Normal as i32 } else { t }];
        let mut groups: Vec<(String, u32, i32)> = Vec::new();
        if let Some(c) = &local {
            groups.push((self.node.config.broker_name.clone(), c.queues, c.message_type));
        }
        groups.extend(remote.iter().map(|g| (g.broker_name.clone(), g.queues, g.message_type)));
        let message_queues = groups
            .into_iter()
            .flat_map(|(name, queues, message_type)| {
                let (topic, endpoints, accept) = (topic.clone(), endpoints.clone(), accept(message_type));
                (0..queues).map(move |q| pb::MessageQueue {
                    topic: Some(topic.clone()),
                    id: q as i32,
                    permission: pb::Permission::ReadWrite as i32,
                    broker: Some(pb::Broker { name: name.clone(), id: 0, endpoints: Some(endpoints.clone()) }),
                    accept_message_types: accept.clone(),
                })
            })
            .collect();
        Ok(Response::new(pb::QueryRouteResponse { status: Some(ok()), message_queues }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        let auth = Auth::of(&req);
        let client_id = client_id_of(&req);
        let req = req.into_inner();
        let group = req.group.as_ref().map(|g| g.name.clone()).filter(|g| !g.is_empty());
        let resources: Vec<Resource<'_>> = group.as_deref().map(Resource::Group).into_iter().collect();
        if let Err(e) = self.authorize(&auth, Action::Sub, &resources) {
            return Ok(Response::new(pb::HeartbeatResponse { status: Some(err_status(&e)) }));
        }
        let Some(client_id) = client_id else {
            return Ok(Response::new(pb::HeartbeatResponse { status: Some(ok()) }));
        };
        self.clients.seen(&client_id, req.client_type);
        // Push consumers' liveness is replicated: any node of the group
        // computes the same assignment.
        if req.client_type == pb::ClientType::PushConsumer as i32
            && let Some(group) = group
            && check_name("consumer group", &group).is_ok()
            && self.clients.should_record_heartbeat(&group, &client_id)
        {
            let cmd = Control::ClientHeartbeat { group: group.clone(), client_id: client_id.clone(), now_ms: now_ms() };
            if let Err(e) = self.node.propose(command::encode_control(&cmd)).await {
                self.clients.forget_heartbeat(&group, &client_id);
                return Ok(Response::new(pb::HeartbeatResponse { status: Some(err_status(&e)) }));
            }
        }
        Ok(Response::new(pb::HeartbeatResponse { status: Some(ok()) }))
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> std::result::Result<Response<pb::SendMessageResponse>, Status> {
        let forwarded = Origin::of(&req);
        let timeout = grpc_timeout(&req);
        let req = req.into_inner();
        let topic0 = req.messages.first().and_then(|m| m.topic.as_ref()).map(|t| t.name.clone()).unwrap_or_default();
        let allowed = self.authorize(&forwarded.auth, Action::Pub, &[Resource::Topic(&topic0)]);
        let target = match allowed.map(|_| self.send_target(&req.messages, forwarded.forwarded)) {
            Err(e) => Err(e),
            Ok(fut) => fut.await,
        };
        let target = match target {
            Ok(Some(group)) => {
                let topic = req.messages[0].topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
                let call = |mut c: PeerClient, r| async move { c.send_message(r).await };
                self.forward(&group, &topic, &forwarded, req.clone(), timeout, call).await.map(Some)
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let ids: Vec<String> = req
            .messages
            .iter()
            .map(|m| m.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default())
            .collect();
        let result = match target {
            Ok(Some(forwarded_reply)) => return Ok(Response::new(forwarded_reply)),
            Ok(None) => self.send(&req.messages).await,
            Err(e) => Err(e),
        };
        let resp = match result {
            Ok(results) => pb::SendMessageResponse {
                status: Some(ok()),
                entries: results
                    .into_iter()
                    .map(|o| pb::SendResultEntry {
                        status: Some(ok()),
                        message_id: o.message_id,
                        transaction_id: o.transaction_id,
                        offset: o.offset as i64,
                        recall_handle: String::new(),
                    })
                    .collect(),
            },
            Err(e) => {
                tracing::debug!(error = %e, "send refused");
                let s = err_status(&e);
                // One entry per message even on failure: the Rust client takes entries[0].
                let entries = if ids.is_empty() { vec![String::new()] } else { ids }
                    .into_iter()
                    .map(|message_id| pb::SendResultEntry { status: Some(s.clone()), message_id, ..Default::default() })
                    .collect();
                pb::SendMessageResponse { status: Some(s), entries }
            }
        };
        let mut resp = Response::new(resp);
        // Our client sends to the leader once it knows it (one hop fewer);
        // other clients ignore the header.
        if let Some(addr) = self.node.leader_addr()
            && let Ok(v) = addr.parse()
        {
            resp.metadata_mut().insert(raftmq_proto::LEADER_HEADER, v);
        }
        Ok(resp)
    }

    async fn query_assignment(
        &self,
        req: Request<pb::QueryAssignmentRequest>,
    ) -> std::result::Result<Response<pb::QueryAssignmentResponse>, Status> {
        let auth = Auth::of(&req);
        let client_id = client_id_of(&req);
        let req = req.into_inner();
        let group = match group_name(&req.group).and_then(|g| {
            let topic = req.topic.as_ref().map(|t| t.name.as_str()).unwrap_or_default();
            self.authorize(&auth, Action::Sub, &[Resource::Topic(topic), Resource::Group(&g)]).map(|_| g)
        }) {
            Ok(g) => g,
            Err(e) => {
                return Ok(Response::new(pb::QueryAssignmentResponse {
                    status: Some(err_status(&e)),
                    assignments: vec![],
                }));
            }
        };
        let route = self
            .query_route(Request::new(pb::QueryRouteRequest { topic: req.topic, endpoints: req.endpoints }))
            .await?
            .into_inner();
        let mut queues = route.message_queues;
        queues.sort_by(|a, b| (broker_of(Some(a)), a.id).cmp(&(broker_of(Some(b)), b.id)));
        // RocketMQ's averagely strategy over the group's live consumers:
        // every queue to exactly one, reassigned when one leaves or dies.
        let mine: Vec<pb::MessageQueue> = match client_id {
            None => queues,
            Some(me) => {
                let consumers = self.live_consumers(&group, &me);
                let picked = crate::clients::allocate_averagely(queues.len(), &consumers, &me);
                picked.into_iter().map(|i| queues[i].clone()).collect()
            }
        };
        let assignments = mine.into_iter().map(|q| pb::Assignment { message_queue: Some(q) }).collect();
        Ok(Response::new(pb::QueryAssignmentResponse { status: route.status, assignments }))
    }

    async fn receive_message(
        &self,
        req: Request<pb::ReceiveMessageRequest>,
    ) -> std::result::Result<Response<Self::ReceiveMessageStream>, Status> {
        let deadline = grpc_timeout(&req);
        let forwarded = Origin::of(&req);
        let auth = Auth::of(&req);
        let client_id = client_id_of(&req);
        let namespace = req.get_ref().group.as_ref().map(|g| g.resource_namespace.clone()).unwrap_or_default();
        let req = req.into_inner();
        if let Some(target) = self.remote_queue(req.message_queue.as_ref()) {
            let call = |mut c: PeerClient, r| async move { c.receive_message(r).await };
            let status =
                |s| pb::ReceiveMessageResponse { content: Some(pb::receive_message_response::Content::Status(s)) };
            return Ok(self.forward_stream(target, &forwarded, req, deadline, call, status).await);
        }
        let settings = self.node.settings();
        let limits = &settings.limits;
        let client_id = client_id.unwrap_or_default();
        let result: Result<Vec<pb::ReceiveMessageResponse>> = async {
            let group = group_name(&req.group)?;
            let mq = req.message_queue.as_ref();
            let topic = mq.and_then(|q| q.topic.as_ref()).map(|t| t.name.clone()).unwrap_or_default();
            self.authorize(&auth, Action::Sub, &[Resource::Topic(&topic), Resource::Group(&group)])?;
            let filter = filter_spec(req.filter_expression.as_ref())?;
            let conf = match self.topic_conf(&topic).await {
                // A dead-letter queue nothing went to yet: empty.
                Err(BrokerError::TopicNotFound(_)) if topic.starts_with(DLQ_PREFIX) => {
                    tokio::time::sleep(Duration::from_millis(limits.max_long_polling_ms.min(2000))).await;
                    return Ok(vec![pb::ReceiveMessageResponse {
                        content: Some(pb::receive_message_response::Content::Status(code_status(
                            Code::MessageNotFound,
                            "no new message",
                        ))),
                    }]);
                }
                other => other?,
            };
            // Like RocketMQ 5's proxy, a simple consumer pops from every queue
            // of the broker whatever queue it names (the official clients
            // round-robin queue ids and would otherwise long-poll an empty
            // queue while another holds messages). Push consumers keep to
            // their assigned queues.
            let simple = self.clients.client_type(&client_id) == Some(pb::ClientType::SimpleConsumer as i32);
            let queues = if simple { self.queues_for(&conf, None)? } else { self.queues_for(&conf, mq)? };
            let max = (req.batch_size.max(1) as u32).min(limits.max_receive_batch);
            let invisible_ms = req.invisible_duration.as_ref().map(dur_ms).unwrap_or(limits.default_invisible_ms);
            if invisible_ms == 0 || invisible_ms > 12 * 3600 * 1000 {
                return Err(BrokerError::BadRequest(format!("invisible duration {invisible_ms} ms outside (0, 12 h]")));
            }
            let mut poll = req.long_polling_timeout.as_ref().map(dur_ms).unwrap_or(limits.max_long_polling_ms);
            poll = poll.min(limits.max_long_polling_ms);
            if let Some(d) = deadline {
                poll = poll.min((d.as_millis() as u64).saturating_sub(300));
            }
            let got = self.pop(&group, &topic, queues, max, invisible_ms, Duration::from_millis(poll), filter).await?;
            // A push consumer's messages stay invisible while it is alive.
            let push =
                req.auto_renew || self.clients.client_type(&client_id) == Some(pb::ClientType::PushConsumer as i32);
            let advertised = self.advertised();
            let mut out = Vec::with_capacity(got.len() + 2);
            out.push(pb::ReceiveMessageResponse {
                content: Some(pb::receive_message_response::Content::Status(if got.is_empty() {
                    code_status(Code::MessageNotFound, "no new message")
                } else {
                    ok()
                })),
            });
            let started_ms = now_ms();
            for (p, index, r) in got {
                let handle = encode_handle(&self.node.config.broker_name, p.queue, p.offset, index);
                if push {
                    let renewal = crate::clients::Renewal {
                        client_id: client_id.clone(),
                        group: group.clone(),
                        topic: topic.clone(),
                        queue: p.queue,
                        offset: p.offset,
                        pop_index: index,
                        invisible_ms,
                        visible_at_ms: started_ms + invisible_ms,
                        started_ms,
                    };
                    self.clients.track(handle.clone(), renewal, self.node.settings().consumer.max_renewing);
                }
                let mut m = to_v2_message(
                    &r.message,
                    &namespace,
                    p.queue,
                    p.offset,
                    Some(p.attempt),
                    Some(handle),
                    &advertised,
                );
                if let Some(sp) = m.system_properties.as_mut() {
                    sp.invisible_duration = Some(dur(invisible_ms));
                }
                // A dead letter is delivered as a message of the DLQ topic
                // (its bytes name the topic it was sent to).
                if let Some(t) = m.topic.as_mut() {
                    t.name = topic.clone();
                }
                out.push(pb::ReceiveMessageResponse {
                    content: Some(pb::receive_message_response::Content::Message(m)),
                });
            }
            out.push(pb::ReceiveMessageResponse {
                content: Some(pb::receive_message_response::Content::DeliveryTimestamp(ts(now_ms() as i64))),
            });
            Ok(out)
        }
        .await;
        let items = match result {
            Ok(items) => items,
            Err(e) => vec![pb::ReceiveMessageResponse {
                content: Some(pb::receive_message_response::Content::Status(err_status(&e))),
            }],
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))))
    }

    async fn ack_message(
        &self,
        req: Request<pb::AckMessageRequest>,
    ) -> std::result::Result<Response<pb::AckMessageResponse>, Status> {
        let forwarded = Origin::of(&req);
        let req = req.into_inner();
        let group = match group_name(&req.group) {
            Ok(g) => g,
            Err(e) => {
                return Ok(Response::new(pb::AckMessageResponse { status: Some(err_status(&e)), entries: vec![] }));
            }
        };
        let topic = req.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        if let Err(e) =
            self.authorize(&forwarded.auth, Action::Sub, &[Resource::Topic(&topic), Resource::Group(&group)])
        {
            return Ok(Response::new(pb::AckMessageResponse { status: Some(err_status(&e)), entries: vec![] }));
        }
        let mut entries = Vec::with_capacity(req.entries.len());
        let mut first_err: Option<pb::Status> = None;
        for e in &req.entries {
            let r: Result<()> = async {
                let h = decode_handle(&e.receipt_handle)?;
                if let Some(remote) = self.remote(Some(&h.group)) {
                    let one = pb::AckMessageRequest { entries: vec![e.clone()], ..req.clone() };
                    let call = |mut c: pb::messaging_service_client::MessagingServiceClient<
                        tonic::transport::Channel,
                    >,
                                r| async move { c.ack_message(r).await };
                    let reply = self.forward(&remote, &topic, &forwarded, one, None, call).await?;
                    let status = reply.entries.first().and_then(|x| x.status.clone()).or(reply.status);
                    return match status {
                        Some(s) if s.code != Code::Ok as i32 => Err(BrokerError::Refused(s.message)),
                        _ => Ok(()),
                    };
                }
                let (queue, offset, pop_index) = (h.queue, h.offset, h.pop_index);
                self.clients.untrack(&e.receipt_handle);
                let cmd = Control::Ack { group: group.clone(), topic: topic.clone(), queue, offset, pop_index };
                propose_done(&self.node, &topic, &cmd).await
            }
            .await;
            let status = match r {
                Ok(()) => ok(),
                Err(err) => {
                    let s = err_status(&err);
                    first_err.get_or_insert(s.clone());
                    s
                }
            };
            entries.push(pb::AckMessageResultEntry {
                message_id: e.message_id.clone(),
                receipt_handle: e.receipt_handle.clone(),
                status: Some(status),
            });
        }
        Ok(Response::new(pb::AckMessageResponse { status: Some(first_err.unwrap_or_else(ok)), entries }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> std::result::Result<Response<pb::ForwardMessageToDeadLetterQueueResponse>, Status> {
        let forwarded = Origin::of(&req);
        let req = req.into_inner();
        let topic = req.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        if let Ok(h) = decode_handle(&req.receipt_handle)
            && let Some(group) = self.remote(Some(&h.group))
        {
            let call = |mut c: PeerClient, r| async move { c.forward_message_to_dead_letter_queue(r).await };
            let on_err = |s| pb::ForwardMessageToDeadLetterQueueResponse { status: Some(s) };
            return Ok(self.forward_unary((group, topic), &forwarded, req, call, on_err).await);
        }
        let r: Result<()> = async {
            let group = group_name(&req.group)?;
            self.authorize(&forwarded.auth, Action::Sub, &[Resource::Topic(&topic), Resource::Group(&group)])?;
            let Handle { queue, offset, pop_index, .. } = decode_handle(&req.receipt_handle)?;
            self.clients.untrack(&req.receipt_handle);
            let cmd = Control::ToDeadLetter { group, topic: topic.clone(), queue, offset, pop_index };
            propose_done(&self.node, &topic, &cmd).await
        }
        .await;
        Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse {
            status: Some(match r {
                Ok(()) => ok(),
                Err(e) => err_status(&e),
            }),
        }))
    }

    async fn pull_message(
        &self,
        req: Request<pb::PullMessageRequest>,
    ) -> std::result::Result<Response<Self::PullMessageStream>, Status> {
        let forwarded = Origin::of(&req);
        let timeout = grpc_timeout(&req);
        let req = req.into_inner();
        if let Some(target) = self.remote_queue(req.message_queue.as_ref()) {
            let call = |mut c: PeerClient, r| async move { c.pull_message(r).await };
            let status = |s| pb::PullMessageResponse { content: Some(pb::pull_message_response::Content::Status(s)) };
            return Ok(self.forward_stream(target, &forwarded, req, timeout, call, status).await);
        }
        let advertised = self.advertised();
        let result: Result<Vec<pb::PullMessageResponse>> = async {
            let mq = req.message_queue.as_ref();
            let topic = mq.and_then(|q| q.topic.as_ref()).map(|t| t.name.clone()).unwrap_or_default();
            let group = req.group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
            self.authorize(&forwarded.auth, Action::Sub, &[Resource::Topic(&topic), Resource::Group(&group)])?;
            let conf = self.topic_conf(&topic).await?;
            let queue = match mq.map(|q| q.id) {
                Some(id) if id >= 0 && (id as u32) < conf.queues => id as u32,
                other => return Err(BrokerError::BadRequest(format!("pull needs a queue of {topic}, got {other:?}"))),
            };
            if req.offset < 0 {
                return Err(BrokerError::BadRequest(format!("offset {} is negative", req.offset)));
            }
            let start = req.offset as u64;
            let n = (req.batch_size.max(1) as u64).min(u64::from(self.node.settings().limits.max_receive_batch));
            let poll = req
                .long_polling_timeout
                .as_ref()
                .map(dur_ms)
                .unwrap_or(0)
                .min(self.node.settings().limits.max_long_polling_ms);
            let until = tokio::time::Instant::now() + Duration::from_millis(poll);
            loop {
                let notified = self.node.sm.activity.notified();
                let (min, max) = self.node.sm.queue_range(&topic, queue).unwrap_or((0, 0));
                // Below the queue's minimum, retention removed the messages:
                // the pull starts at the oldest one kept.
                let start = start.max(min);
                if start < max || tokio::time::Instant::now() >= until {
                    let offsets: Vec<u64> = (start..max.min(start + n)).collect();
                    let read = self.node.sm.read_messages(&topic, queue, &offsets)?;
                    self.node.stats.reads_served.fetch_add(read.len() as u64, Ordering::Relaxed);
                    count_consumed(&self.node, &topic, &read);
                    let mut out = vec![pb::PullMessageResponse {
                        content: Some(pb::pull_message_response::Content::Status(if read.is_empty() {
                            code_status(Code::MessageNotFound, "no new message")
                        } else {
                            ok()
                        })),
                    }];
                    let next = start + read.len() as u64;
                    for r in read {
                        let m = to_v2_message(&r.message, "", queue, r.offset, None, None, &advertised);
                        out.push(pb::PullMessageResponse {
                            content: Some(pb::pull_message_response::Content::Message(m)),
                        });
                    }
                    out.push(pb::PullMessageResponse {
                        content: Some(pb::pull_message_response::Content::NextOffset(next.max(start) as i64)),
                    });
                    return Ok(out);
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
        }
        .await;
        let items = match result {
            Ok(items) => items,
            Err(e) => vec![pb::PullMessageResponse {
                content: Some(pb::pull_message_response::Content::Status(err_status(&e))),
            }],
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))))
    }

    async fn update_offset(
        &self,
        req: Request<pb::UpdateOffsetRequest>,
    ) -> std::result::Result<Response<pb::UpdateOffsetResponse>, Status> {
        let forwarded = Origin::of(&req);
        let req = req.into_inner();
        if let Some(target) = self.remote_queue(req.message_queue.as_ref()) {
            let call = |mut c: PeerClient, r| async move { c.update_offset(r).await };
            return Ok(self
                .forward_unary(target, &forwarded, req, call, |s| pb::UpdateOffsetResponse { status: Some(s) })
                .await);
        }
        let r: Result<()> = async {
            let group = group_name(&req.group)?;
            let mq = req.message_queue.as_ref().ok_or_else(|| BrokerError::BadRequest("no message queue".into()))?;
            let topic = mq.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
            self.authorize(&forwarded.auth, Action::Sub, &[Resource::Topic(&topic), Resource::Group(&group)])?;
            self.topic_conf(&topic).await?;
            if mq.id < 0 || req.offset < 0 {
                return Err(BrokerError::BadRequest("queue id and offset must not be negative".into()));
            }
            let cmd =
                Control::UpdateOffset { group, topic: topic.clone(), queue: mq.id as u32, offset: req.offset as u64 };
            propose_done(&self.node, &topic, &cmd).await
        }
        .await;
        let status = match r {
            Ok(()) => ok(),
            Err(e) => err_status(&e),
        };
        Ok(Response::new(pb::UpdateOffsetResponse { status: Some(status) }))
    }

    async fn get_offset(
        &self,
        req: Request<pb::GetOffsetRequest>,
    ) -> std::result::Result<Response<pb::GetOffsetResponse>, Status> {
        let forwarded = Origin::of(&req);
        let req = req.into_inner();
        if let Some(target) = self.remote_queue(req.message_queue.as_ref()) {
            let call = |mut c: PeerClient, r| async move { c.get_offset(r).await };
            return Ok(self
                .forward_unary(target, &forwarded, req, call, |s| pb::GetOffsetResponse { status: Some(s), offset: 0 })
                .await);
        }
        let r: Result<u64> = async {
            let group = group_name(&req.group)?;
            let mq = req.message_queue.as_ref().ok_or_else(|| BrokerError::BadRequest("no message queue".into()))?;
            let topic = mq.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
            self.authorize(&forwarded.auth, Action::Sub, &[Resource::Topic(&topic), Resource::Group(&group)])?;
            // Linearizable: a committed offset is never read back older.
            self.node.linearizable_barrier().await?;
            self.topic_conf_now(&topic)?;
            let st = self.node.sm.read();
            Ok(st.groups.get(&(group, topic, mq.id.max(0) as u32)).map(|g| g.committed).unwrap_or(0))
        }
        .await;
        Ok(Response::new(match r {
            Ok(o) => pb::GetOffsetResponse { status: Some(ok()), offset: o as i64 },
            Err(e) => pb::GetOffsetResponse { status: Some(err_status(&e)), offset: 0 },
        }))
    }

    async fn query_offset(
        &self,
        req: Request<pb::QueryOffsetRequest>,
    ) -> std::result::Result<Response<pb::QueryOffsetResponse>, Status> {
        let forwarded = Origin::of(&req);
        let req = req.into_inner();
        if let Some(target) = self.remote_queue(req.message_queue.as_ref()) {
            let call = |mut c: PeerClient, r| async move { c.query_offset(r).await };
            return Ok(self
                .forward_unary(target, &forwarded, req, call, |s| pb::QueryOffsetResponse {
                    status: Some(s),
                    offset: 0,
                })
                .await);
        }
        let r: Result<u64> = (|| {
            let mq = req.message_queue.as_ref().ok_or_else(|| BrokerError::BadRequest("no message queue".into()))?;
            let topic = mq.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
            self.authorize(&forwarded.auth, Action::Sub, &[Resource::Topic(&topic)])?;
            self.topic_conf_now(&topic)?;
            let (min, max) = self
                .node
                .sm
                .queue_range(&topic, mq.id.max(0) as u32)
                .ok_or_else(|| BrokerError::BadRequest(format!("topic {topic} has no queue {}", mq.id)))?;
            match pb::QueryOffsetPolicy::try_from(req.query_offset_policy) {
                Ok(pb::QueryOffsetPolicy::Beginning) => Ok(min),
                Ok(pb::QueryOffsetPolicy::End) => Ok(max),
                _ => {
                    // By time: the first message stored at or after it.
                    let t = req.timestamp.as_ref().map(ts_ms).unwrap_or(0);
                    let (mut lo, mut hi) = (min, max);
                    while lo < hi {
                        let mid = lo + (hi - lo) / 2;
                        let m = self.node.sm.read_messages(&topic, mq.id as u32, &[mid])?;
                        if m.first().is_some_and(|m| m.message.store_timestamp_ms < t) {
                            lo = mid + 1;
                        } else {
                            hi = mid;
                        }
                    }
                    Ok(lo)
                }
            }
        })();
        Ok(Response::new(match r {
            Ok(o) => pb::QueryOffsetResponse { status: Some(ok()), offset: o as i64 },
            Err(e) => pb::QueryOffsetResponse { status: Some(err_status(&e)), offset: 0 },
        }))
    }

    async fn end_transaction(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> std::result::Result<Response<pb::EndTransactionResponse>, Status> {
        let forwarded = Origin::of(&req);
        let req = req.into_inner();
        let topic = req.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let decoded = crate::clients::decode_tx(&req.transaction_id);
        if let Some((group, _)) = &decoded
            && let Some(group) = self.remote(Some(group))
        {
            let call = |mut c: PeerClient, r| async move { c.end_transaction(r).await };
            let on_err = |s| pb::EndTransactionResponse { status: Some(s) };
            return Ok(self.forward_unary((group, topic), &forwarded, req, call, on_err).await);
        }
        let r: Result<()> = async {
            self.authorize(&forwarded.auth, Action::Pub, &[Resource::Topic(&topic)])?;
            let (_, tx) = decoded.ok_or_else(|| {
                BrokerError::TransactionNotFound(format!(
                    "{:?} is not a transaction id of this cluster",
                    req.transaction_id
                ))
            })?;
            let commit = match pb::TransactionResolution::try_from(req.resolution) {
                Ok(pb::TransactionResolution::Commit) => true,
                Ok(pb::TransactionResolution::Rollback) => false,
                _ => return Err(BrokerError::BadRequest("resolution must be COMMIT or ROLLBACK".into())),
            };
            let cmd = Control::EndTransaction { tx, commit, now_ms: now_ms(), topic: topic.clone() };
            propose_done(&self.node, &topic, &cmd).await?;
            tracing::debug!(transaction = %req.transaction_id, commit, source = req.source, "transaction ended");
            Ok(())
        }
        .await;
        Ok(Response::new(pb::EndTransactionResponse {
            status: Some(match r {
                Ok(()) => ok(),
                Err(e) => err_status(&e),
            }),
        }))
    }

    async fn telemetry(
        &self,
        req: Request<tonic::Streaming<pb::TelemetryCommand>>,
    ) -> std::result::Result<Response<Self::TelemetryStream>, Status> {
        let client_id = client_id_of(&req);
        let auth = Auth::of(&req);
        if let Err(e) = self.authorize(&auth, Action::Sub, &[]) {
            return Err(e.to_status());
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<pb::TelemetryCommand, Status>>(64);
        let this = Messaging { node: self.node.clone(), clients: self.clients.clone() };
        tokio::spawn(async move {
            let mut stream_id = None;
            while let Ok(Some(cmd)) = inbound.message().await {
                if let Some(pb::telemetry_command::Command::Settings(s)) = cmd.command {
                    if let Some(id) = &client_id {
                        stream_id = Some(this.clients.settings(id, &s, tx.clone()));
                    }
                    let reply = pb::TelemetryCommand {
                        status: Some(ok()),
                        command: Some(pb::telemetry_command::Command::Settings(this.settings_reply(&s))),
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                }
            }
            if let (Some(id), Some(sid)) = (&client_id, stream_id) {
                this.clients.stream_closed(id, sid);
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn notify_client_termination(
        &self,
        req: Request<pb::NotifyClientTerminationRequest>,
    ) -> std::result::Result<Response<pb::NotifyClientTerminationResponse>, Status> {
        let client_id = client_id_of(&req);
        let req = req.into_inner();
        let Some(client_id) = client_id else {
            return Ok(Response::new(pb::NotifyClientTerminationResponse { status: Some(ok()) }));
        };
        let was_push = self.clients.client_type(&client_id) == Some(pb::ClientType::PushConsumer as i32);
        self.clients.remove(&client_id);
        let group = req.group.as_ref().map(|g| g.name.clone()).filter(|g| !g.is_empty());
        if was_push && let Some(group) = group {
            self.clients.forget_heartbeat(&group, &client_id);
            let cmd = Control::ClientGone { group, client_id };
            if let Err(e) = self.node.propose(command::encode_control(&cmd)).await {
                return Ok(Response::new(pb::NotifyClientTerminationResponse { status: Some(err_status(&e)) }));
            }
        }
        Ok(Response::new(pb::NotifyClientTerminationResponse { status: Some(ok()) }))
    }

    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> std::result::Result<Response<pb::ChangeInvisibleDurationResponse>, Status> {
        let forwarded = Origin::of(&req);
        let req = req.into_inner();
        if let Ok(h) = decode_handle(&req.receipt_handle)
            && let Some(group) = self.remote(Some(&h.group))
        {
            let topic = req.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
            let call = |mut c: PeerClient, r| async move { c.change_invisible_duration(r).await };
            let on_err = |s| pb::ChangeInvisibleDurationResponse { status: Some(s), receipt_handle: String::new() };
            return Ok(self.forward_unary((group, topic), &forwarded, req, call, on_err).await);
        }
        let r: Result<String> = async {
            let group = group_name(&req.group)?;
            let topic = req.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
            self.authorize(&forwarded.auth, Action::Sub, &[Resource::Topic(&topic), Resource::Group(&group)])?;
            let Handle { queue, offset, pop_index, .. } = decode_handle(&req.receipt_handle)?;
            self.clients.untrack(&req.receipt_handle);
            let invisible_ms = req.invisible_duration.as_ref().map(dur_ms).unwrap_or(0);
            if invisible_ms > 12 * 3600 * 1000 {
                return Err(BrokerError::BadRequest(format!("invisible duration {invisible_ms} ms above 12 h")));
            }
            let cmd = Control::ChangeInvisible {
                group,
                topic: topic.clone(),
                queue,
                offset,
                pop_index,
                invisible_ms,
                now_ms: now_ms(),
            };
            match propose_accepted(&self.node, &topic, command::encode_control(&cmd)).await? {
                (command::Response::Popped { .. }, index) => {
                    Ok(encode_handle(&self.node.config.broker_name, queue, offset, index))
                }
                (other, _) => Err(BrokerError::Raft(format!("unexpected response {other:?}"))),
            }
        }
        .await;
        Ok(Response::new(match r {
            Ok(h) => pb::ChangeInvisibleDurationResponse { status: Some(ok()), receipt_handle: h },
            Err(e) => {
                pb::ChangeInvisibleDurationResponse { status: Some(err_status(&e)), receipt_handle: req.receipt_handle }
            }
        }))
    }

    async fn recall_message(
        &self,
        _req: Request<pb::RecallMessageRequest>,
    ) -> std::result::Result<Response<pb::RecallMessageResponse>, Status> {
        Ok(Response::new(pb::RecallMessageResponse {
            status: Some(code_status(Code::NotImplemented, "recall is not implemented")),
            message_id: String::new(),
        }))
    }

    async fn sync_lite_subscription(
        &self,
        _req: Request<pb::SyncLiteSubscriptionRequest>,
    ) -> std::result::Result<Response<pb::SyncLiteSubscriptionResponse>, Status> {
        Ok(Response::new(pb::SyncLiteSubscriptionResponse {
            status: Some(code_status(Code::NotImplemented, "lite subscriptions are not implemented")),
        }))
    }
}

/// Longest message id taken (the official clients' ids are 34 characters).
const MAX_MESSAGE_ID_BYTES: usize = 128;
/// Longest message key taken.
const MAX_KEY_BYTES: usize = 1024;

/// Checks a message id or key. Both name rows of the index (whose keys
/// separate their fields with NUL), so a NUL in one would make lookups of
/// another id or key find it.
fn check_indexed(what: &str, v: &str, max_bytes: usize) -> Result<()> {
    if v.len() > max_bytes {
        return Err(BrokerError::BadRequest(format!("{what} of {} bytes exceeds {max_bytes}", v.len())));
    }
    if v.contains('\0') {
        return Err(BrokerError::BadRequest(format!("{what} {v:?} holds a NUL character")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_keys_with_nul_or_too_long_are_refused() {
        assert!(check_indexed("key", "order-17", MAX_KEY_BYTES).is_ok());
        assert!(check_indexed("key", &"k".repeat(MAX_KEY_BYTES), MAX_KEY_BYTES).is_ok());
        let e = check_indexed("key", &"k".repeat(MAX_KEY_BYTES + 1), MAX_KEY_BYTES).unwrap_err();
        assert!(e.to_string().contains("exceeds 1024"), "{e}");
        let e = check_indexed("message_id", "a\0b", MAX_MESSAGE_ID_BYTES).unwrap_err();
        assert!(matches!(e, BrokerError::BadRequest(_)) && e.to_string().contains("NUL"), "{e}");
    }

    #[test]
    fn handles_roundtrip_and_reject_garbage() {
        assert_eq!(
            decode_handle(&encode_handle("broker-a", 3, 99, 1234)).unwrap(),
            Handle { group: "broker-a".into(), queue: 3, offset: 99, pop_index: 1234 }
        );
        for bad in ["", "1.2", "a.b.c", "1.2.3", "1.2.3.", "-1.2.3.g"] {
            assert!(decode_handle(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_convert() {
        assert_eq!(ts_ms(&ts(1_700_000_123_456)), 1_700_000_123_456);
        assert_eq!(dur_ms(&dur(61_500)), 61_500);
    }
}
