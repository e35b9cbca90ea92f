//! The RaftMQ Rust client: speaks the RocketMQ 5 gRPC protocol
//! (`apache.rocketmq.v2`) to any node of a broker group, plus the admin API.
//!
//! - [`Producer`]: sync, async (callback) and one-way sends, with retries and
//!   RocketMQ-style latency fault tolerance (a failing endpoint is avoided for
//!   a while, longer after repeated failures);
//! - [`SimpleConsumer`]: receive with an invisible duration, ack, change
//!   invisibility;
//! - [`PullConsumer`]: read a queue by offset and commit offsets;
//! - [`Admin`]: topics, cluster status, consumer progress, leadership, membership.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use raftmq_proto::admin::admin_service_client::AdminServiceClient;
use raftmq_proto::rocketmq as pb;
use raftmq_proto::rocketmq::Code;
use raftmq_proto::rocketmq::messaging_service_client::MessagingServiceClient;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

pub use raftmq_proto::admin as admin_pb;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoint given")]
    NoEndpoint,
    #[error("transport to {endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    /// The broker answered with a RocketMQ status code.
    #[error("broker refused ({code}): {message}")]
    Broker { code: i32, message: String },
    #[error("admin call failed ({code:?}): {message}")]
    Admin { code: tonic::Code, message: String },
    #[error("bad input: {0}")]
    Input(String),
}

impl ClientError {
    /// Whether trying again (maybe elsewhere) can help.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Broker { code, .. } => [
                Code::HaNotAvailable as i32,
                Code::ProxyTimeout as i32,
                Code::InternalError as i32,
                Code::TooManyRequests as i32,
            ]
            .contains(code),
            _ => false,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

fn channel(addr: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Input(format!("endpoint {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn check(status: Option<pb::Status>) -> Result<()> {
    let s = status.ok_or_else(|| ClientError::Broker { code: 0, message: "response without status".into() })?;
    if s.code == Code::Ok as i32 { Ok(()) } else { Err(ClientError::Broker { code: s.code, message: s.message }) }
}

/// The status that opens a receive or pull stream: OK, or "nothing new".
fn check_stream_status(s: pb::Status) -> Result<()> {
    if s.code == Code::Ok as i32 || s.code == Code::MessageNotFound as i32 {
        Ok(())
    } else {
        Err(ClientError::Broker { code: s.code, message: s.message })
    }
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource { resource_namespace: String::new(), name: name.to_string() })
}

/// A set of endpoints with latency fault tolerance.
struct Endpoints {
    addrs: Vec<String>,
    clients: Vec<MessagingServiceClient<Channel>>,
    /// Per endpoint: (consecutive failures, avoid until).
    health: Mutex<HashMap<usize, (u32, Instant)>>,
    next: AtomicU64,
    /// Topic -> (fetched, its queues as (broker group, queue id)).
    routes: Mutex<HashMap<String, (Instant, Vec<QueueRef>)>>,
}

/// One queue of a topic in one broker group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueRef {
    /// The broker group (RocketMQ's broker name).
    pub broker: String,
    pub queue: u32,
}

/// How long a topic route is reused before asking again.
const ROUTE_FRESH_FOR: Duration = Duration::from_secs(10);

impl Endpoints {
    fn new(addrs: &[String]) -> Result<Self> {
        if addrs.is_empty() {
            return Err(ClientError::NoEndpoint);
        }
        let clients = addrs
            .iter()
            .map(|a| {
                Ok(MessagingServiceClient::new(channel(a)?)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            addrs: addrs.to_vec(),
            clients,
            health: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            routes: Mutex::new(HashMap::new()),
        })
    }

    /// The queues of `topic` in every group (QueryRoute), cached for
    /// [`ROUTE_FRESH_FOR`]; the stale route when no endpoint answers.
    async fn route(&self, topic: &str) -> Result<Vec<QueueRef>> {
        if let Some((at, r)) = self.routes.lock().unwrap_or_else(|e| e.into_inner()).get(topic)
            && at.elapsed() < ROUTE_FRESH_FOR
        {
            return Ok(r.clone());
        }
        let mut last = ClientError::NoEndpoint;
        for _ in 0..self.addrs.len() {
            let i = self.pick();
            let mut c = self.clients[i].clone();
            let req = pb::QueryRouteRequest { topic: resource(topic), endpoints: None };
            match c.query_route(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    check(r.status)?;
                    let mut queues: Vec<QueueRef> = r
                        .message_queues
                        .into_iter()
                        .map(|q| QueueRef {
                            broker: q.broker.map(|b| b.name).unwrap_or_default(),
                            queue: q.id.max(0) as u32,
                        })
                        .collect();
                    queues.sort();
                    self.routes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(topic.to_string(), (Instant::now(), queues.clone()));
                    return Ok(queues);
                }
                Err(s) => {
                    self.failed(i);
                    last = transport(&self.addrs[i], s);
                }
            }
        }
        match self.routes.lock().unwrap_or_else(|e| e.into_inner()).get(topic) {
            Some((_, r)) => Ok(r.clone()),
            None => Err(last),
        }
    }

    /// The broker groups serving `topic`, in order.
    async fn brokers(&self, topic: &str) -> Vec<String> {
        let mut b: Vec<String> = self.route(topic).await.unwrap_or_default().into_iter().map(|q| q.broker).collect();
        b.dedup();
        b
    }

    /// The next endpoint to use: round robin over healthy ones; if none is
    /// healthy, the one that becomes healthy first.
    fn pick(&self) -> usize {
        let n = self.addrs.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for k in 0..n {
            let i = (start + k) % n;
            if h.get(&i).is_none_or(|(_, until)| *until <= now) {
                return i;
            }
        }
        (0..n).min_by_key(|i| h.get(i).map(|(_, u)| *u)).unwrap_or(0)
    }

    fn failed(&self, i: usize) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let e = h.entry(i).or_insert((0, Instant::now()));
        e.0 += 1;
        // RocketMQ-like: the longer it keeps failing, the longer it is avoided.
        let avoid = Duration::from_millis(500 * 2u64.pow(e.0.min(6))).min(Duration::from_secs(30));
        e.1 = Instant::now() + avoid;
    }

    fn succeeded(&self, i: usize) {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
    }
}

fn transport(addr: &str, s: tonic::Status) -> ClientError {
    ClientError::Transport { endpoint: addr.to_string(), message: format!("{:?}: {}", s.code(), s.message()) }
}

/// A message to send.
#[derive(Debug, Clone, Default)]
pub struct OutMessage {
    pub body: Vec<u8>,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub properties: HashMap<String, String>,
    /// FIFO message group.
    pub message_group: Option<String>,
}

impl OutMessage {
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Self { body: body.into(), ..Default::default() }
    }
}

/// What the broker answered for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    pub message_id: String,
    pub offset: u64,
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// Attempts per send (first try included). Default: 3.
    pub max_attempts: u32,
    /// Timeout of one attempt. Default: 10 s.
    pub request_timeout: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self { max_attempts: 3, request_timeout: Duration::from_secs(10) }
    }
}

/// Sends messages to any node of a group.
#[derive(Clone)]
pub struct Producer {
    endpoints: Arc<Endpoints>,
    options: ProducerOptions,
    client_id: String,
    seq: Arc<AtomicU64>,
}

impl Producer {
    pub fn new(endpoints: &[String], options: ProducerOptions) -> Result<Self> {
        let client_id = format!("raftmq-rs@{}@{}", std::process::id(), now_ms());
        Ok(Self {
            endpoints: Arc::new(Endpoints::new(endpoints)?),
            options,
            client_id,
            seq: Arc::new(AtomicU64::new(0)),
        })
    }

    fn message_id(&self) -> String {
        format!(
            "{:016X}{:016X}",
            now_ms() as u64,
            self.seq.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u64) << 40
        )
    }

    fn to_pb(&self, topic: &str, m: &OutMessage) -> pb::Message {
        let now = now_ms();
        pb::Message {
            topic: resource(topic),
            user_properties: m.properties.clone(),
            system_properties: Some(pb::SystemProperties {
                tag: m.tag.clone(),
                keys: m.keys.clone(),
                message_id: self.message_id(),
                body_encoding: pb::Encoding::Identity as i32,
                message_type: if m.message_group.is_some() {
                    pb::MessageType::Fifo as i32
                } else {
                    pb::MessageType::Normal as i32
                },
                born_timestamp: Some(prost_types::Timestamp {
                    seconds: now / 1000,
                    nanos: ((now % 1000) * 1_000_000) as i32,
                }),
                born_host: self.client_id.clone(),
                message_group: m.message_group.clone(),
                ..Default::default()
            }),
            body: m.body.clone(),
        }
    }

    /// Sends messages of one topic in one request; one receipt per message.
    /// Retries on another endpoint after a retryable failure (the message ids
    /// stay the same across retries).
    pub async fn send_batch(&self, topic: &str, messages: &[OutMessage]) -> Result<Vec<SendReceipt>> {
        let req = pb::SendMessageRequest { messages: messages.iter().map(|m| self.to_pb(topic, m)).collect() };
        let mut last = ClientError::NoEndpoint;
        for _ in 0..self.options.max_attempts.max(1) {
            let i = self.endpoints.pick();
            let mut c = self.endpoints.clients[i].clone();
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(self.options.request_timeout);
            let result = match c.send_message(r).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    check(resp.status).map(|_| {
                        resp.entries
                            .into_iter()
                            .map(|e| SendReceipt { message_id: e.message_id, offset: e.offset as u64 })
                            .collect()
                    })
                }
                Err(s) => Err(transport(&self.endpoints.addrs[i], s)),
            };
            match result {
                Ok(r) => {
                    self.endpoints.succeeded(i);
                    return Ok(r);
                }
                Err(e) if e.retryable() => {
                    self.endpoints.failed(i);
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Sends one message and waits for the broker's acknowledgement.
    pub async fn send(&self, topic: &str, m: OutMessage) -> Result<SendReceipt> {
        let mut r = self.send_batch(topic, std::slice::from_ref(&m)).await?;
        r.pop().ok_or_else(|| ClientError::Broker { code: 0, message: "no send result".into() })
    }

    /// Sends in the background and calls `callback` with the result.
    pub fn send_async(
        &self,
        topic: &str,
        m: OutMessage,
        callback: impl FnOnce(Result<SendReceipt>) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let p = self.clone();
        let topic = topic.to_string();
        tokio::spawn(async move { callback(p.send(&topic, m).await) })
    }

    /// Sends without waiting for or reporting the result.
    pub fn send_oneway(&self, topic: &str, m: OutMessage) {
        let p = self.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            let _ = p.send(&topic, m).await;
        });
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub message_id: String,
    pub queue: u32,
    pub offset: u64,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub properties: HashMap<String, String>,
    pub body: Vec<u8>,
    pub receipt_handle: String,
    pub delivery_attempt: u32,
    pub store_timestamp_ms: i64,
    /// Upper-case hex CRC32 of the body as sent by the broker.
    pub body_crc32: String,
    /// The endpoint it came from (acks go there).
    endpoint: usize,
}

fn received(m: pb::Message, endpoint: usize) -> Received {
    let sp = m.system_properties.unwrap_or_default();
    Received {
        topic: m.topic.map(|t| t.name).unwrap_or_default(),
        message_id: sp.message_id,
        queue: sp.queue_id.max(0) as u32,
        offset: sp.queue_offset.unwrap_or(0).max(0) as u64,
        tag: sp.tag,
        keys: sp.keys,
        properties: m.user_properties,
        body: m.body,
        receipt_handle: sp.receipt_handle.unwrap_or_default(),
        delivery_attempt: sp.delivery_attempt.unwrap_or(1).max(1) as u32,
        store_timestamp_ms: sp.store_timestamp.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000).unwrap_or(0),
        body_crc32: sp.body_digest.map(|d| d.checksum).unwrap_or_default(),
        endpoint,
    }
}

/// Receives messages of a consumer group; each one is invisible to others
/// until acked or until its invisible duration passes (then redelivered).
#[derive(Clone)]
pub struct SimpleConsumer {
    endpoints: Arc<Endpoints>,
    group: String,
}

impl SimpleConsumer {
    pub fn new(endpoints: &[String], group: &str) -> Result<Self> {
        Ok(Self { endpoints: Arc::new(Endpoints::new(endpoints)?), group: group.to_string() })
    }

    /// Receives up to `max` messages from any queue (`queue: None`) or one
    /// queue, long-polling up to `wait`.
    pub async fn receive(
        &self,
        topic: &str,
        queue: Option<u32>,
        max: u32,
        invisible: Duration,
        wait: Duration,
    ) -> Result<Vec<Received>> {
        // Any queue: the groups serving the topic take turns (like the
        // official clients' round robin over the route).
        let broker = if queue.is_none() {
            let brokers = self.endpoints.brokers(topic).await;
            let k = self.endpoints.next.load(Ordering::Relaxed) as usize;
            brokers.get(k % brokers.len().max(1)).cloned()
        } else {
            None
        };
        self.receive_from(topic, broker.as_deref(), queue, max, invisible, wait).await
    }

    /// Receives from one broker group (`None`: the group of the endpoint).
    pub async fn receive_from(
        &self,
        topic: &str,
        broker: Option<&str>,
        queue: Option<u32>,
        max: u32,
        invisible: Duration,
        wait: Duration,
    ) -> Result<Vec<Received>> {
        let i = self.endpoints.pick();
        let mut c = self.endpoints.clients[i].clone();
        let req = pb::ReceiveMessageRequest {
            group: resource(&self.group),
            message_queue: Some(pb::MessageQueue {
                topic: resource(topic),
                id: queue.map(|q| q as i32).unwrap_or(-1),
                broker: broker.map(|b| pb::Broker { name: b.to_string(), id: 0, endpoints: None }),
                ..Default::default()
            }),
            filter_expression: Some(pb::FilterExpression {
                r#type: pb::FilterType::Tag as i32,
                expression: "*".into(),
            }),
            batch_size: max as i32,
            invisible_duration: Some(prost_types::Duration {
                seconds: invisible.as_secs() as i64,
                nanos: invisible.subsec_nanos() as i32,
            }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: wait.as_secs() as i64,
                nanos: wait.subsec_nanos() as i32,
            }),
            attempt_id: None,
        };
        let mut r = tonic::Request::new(req);
        r.set_timeout(wait + Duration::from_secs(10));
        let mut stream = match c.receive_message(r).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                self.endpoints.failed(i);
                return Err(transport(&self.endpoints.addrs[i], s));
            }
        };
        let mut out = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(resp)) => match resp.content {
                    Some(pb::receive_message_response::Content::Status(s)) => check_stream_status(s)?,
                    Some(pb::receive_message_response::Content::Message(m)) => out.push(received(m, i)),
                    _ => {}
                },
                Ok(None) => break,
                Err(s) => {
                    self.endpoints.failed(i);
                    return Err(transport(&self.endpoints.addrs[i], s));
                }
            }
        }
        self.endpoints.succeeded(i);
        Ok(out)
    }

    /// Acknowledges a received message (at the node it came from).
    pub async fn ack(&self, m: &Received) -> Result<()> {
        let mut c = self.endpoints.clients[m.endpoint].clone();
        let req = pb::AckMessageRequest {
            group: resource(&self.group),
            topic: resource(&m.topic),
            entries: vec![pb::AckMessageEntry {
                message_id: m.message_id.clone(),
                receipt_handle: m.receipt_handle.clone(),
                lite_topic: None,
            }],
        };
        let resp = c.ack_message(req).await.map_err(|s| transport(&self.endpoints.addrs[m.endpoint], s))?.into_inner();
        check(resp.status)
    }

    /// Changes when the message becomes visible again; returns the new handle.
    pub async fn change_invisible_duration(&self, m: &mut Received, invisible: Duration) -> Result<()> {
        let mut c = self.endpoints.clients[m.endpoint].clone();
        let req = pb::ChangeInvisibleDurationRequest {
            group: resource(&self.group),
            topic: resource(&m.topic),
            receipt_handle: m.receipt_handle.clone(),
            invisible_duration: Some(prost_types::Duration {
                seconds: invisible.as_secs() as i64,
                nanos: invisible.subsec_nanos() as i32,
            }),
            message_id: m.message_id.clone(),
            lite_topic: None,
            suspend: None,
        };
        let resp = c
            .change_invisible_duration(req)
            .await
            .map_err(|s| transport(&self.endpoints.addrs[m.endpoint], s))?
            .into_inner();
        check(resp.status)?;
        m.receipt_handle = resp.receipt_handle;
        Ok(())
    }
}

/// Reads queues by offset; the application keeps or commits its offsets.
#[derive(Clone)]
pub struct PullConsumer {
    endpoints: Arc<Endpoints>,
    group: String,
}

impl PullConsumer {
    pub fn new(endpoints: &[String], group: &str) -> Result<Self> {
        Ok(Self { endpoints: Arc::new(Endpoints::new(endpoints)?), group: group.to_string() })
    }

    fn mq(topic: &str, queue: u32) -> Option<pb::MessageQueue> {
        Some(pb::MessageQueue { topic: resource(topic), id: queue as i32, ..Default::default() })
    }

    /// Every queue of `topic`, in every broker group.
    pub async fn queues(&self, topic: &str) -> Result<Vec<QueueRef>> {
        self.endpoints.route(topic).await
    }

    /// Like [`pull`](Self::pull), from a queue of a given broker group.
    pub async fn pull_queue(
        &self,
        topic: &str,
        q: &QueueRef,
        offset: u64,
        max: u32,
        wait: Duration,
    ) -> Result<(Vec<Received>, u64)> {
        self.pull_mq(
            Some(pb::MessageQueue {
                topic: resource(topic),
                id: q.queue as i32,
                broker: Some(pb::Broker { name: q.broker.clone(), id: 0, endpoints: None }),
                ..Default::default()
            }),
            offset,
            max,
            wait,
        )
        .await
    }

    /// Messages from `offset` on (at most `max`), and the next offset.
    pub async fn pull(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        max: u32,
        wait: Duration,
    ) -> Result<(Vec<Received>, u64)> {
        self.pull_mq(Self::mq(topic, queue), offset, max, wait).await
    }

    async fn pull_mq(
        &self,
        mq: Option<pb::MessageQueue>,
        offset: u64,
        max: u32,
        wait: Duration,
    ) -> Result<(Vec<Received>, u64)> {
        let i = self.endpoints.pick();
        let mut c = self.endpoints.clients[i].clone();
        let req = pb::PullMessageRequest {
            group: resource(&self.group),
            message_queue: mq,
            offset: offset as i64,
            batch_size: max as i32,
            filter_expression: None,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: wait.as_secs() as i64,
                nanos: wait.subsec_nanos() as i32,
            }),
        };
        let mut stream = c.pull_message(req).await.map_err(|s| transport(&self.endpoints.addrs[i], s))?.into_inner();
        let (mut out, mut next) = (Vec::new(), offset);
        while let Some(resp) = stream.message().await.map_err(|s| transport(&self.endpoints.addrs[i], s))? {
            match resp.content {
                Some(pb::pull_message_response::Content::Status(s)) => check_stream_status(s)?,
                Some(pb::pull_message_response::Content::Message(m)) => out.push(received(m, i)),
                Some(pb::pull_message_response::Content::NextOffset(n)) => next = n.max(0) as u64,
                None => {}
            }
        }
        Ok((out, next))
    }

    pub async fn commit(&self, topic: &str, queue: u32, offset: u64) -> Result<()> {
        let i = self.endpoints.pick();
        let mut c = self.endpoints.clients[i].clone();
        let req = pb::UpdateOffsetRequest {
            group: resource(&self.group),
            message_queue: Self::mq(topic, queue),
            offset: offset as i64,
        };
        check(c.update_offset(req).await.map_err(|s| transport(&self.endpoints.addrs[i], s))?.into_inner().status)
    }

    pub async fn committed(&self, topic: &str, queue: u32) -> Result<u64> {
        let i = self.endpoints.pick();
        let mut c = self.endpoints.clients[i].clone();
        let req = pb::GetOffsetRequest { group: resource(&self.group), message_queue: Self::mq(topic, queue) };
        let r = c.get_offset(req).await.map_err(|s| transport(&self.endpoints.addrs[i], s))?.into_inner();
        check(r.status)?;
        Ok(r.offset.max(0) as u64)
    }
}

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
    pub fn connect(addr: &str) -> Result<Self> {
        Ok(Self { addr: addr.to_string(), client: AdminServiceClient::new(channel(addr)?) })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn create_topic(&self, name: &str, queues: u32, message_type: i32, update: bool) -> Result<String> {
        let req = admin_pb::CreateTopicRequest {
            topic: Some(admin_pb::TopicConfig { name: name.into(), queues, message_type }),
            update,
        };
        Ok(self.client.clone().create_topic(req).await.map_err(admin_err)?.into_inner().message)
    }

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

    pub async fn list_topics(&self) -> Result<Vec<admin_pb::TopicStatus>> {
        Ok(self.client.clone().list_topics(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner().topics)
    }

    pub async fn cluster_status(&self) -> Result<Vec<admin_pb::NodeStatus>> {
        Ok(self.client.clone().cluster_status(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner().nodes)
    }

    pub async fn node_status(&self) -> Result<admin_pb::NodeStatus> {
        Ok(self.client.clone().get_node_status(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner())
    }

    /// Creates or replaces a consumer group's configuration.
    pub async fn update_group(&self, config: admin_pb::GroupConfig) -> Result<String> {
        Ok(self.client.clone().update_group(config).await.map_err(admin_err)?.into_inner().message)
    }

    pub async fn delete_group(&self, name: &str) -> Result<String> {
        let req = admin_pb::DeleteGroupRequest { name: name.into() };
        Ok(self.client.clone().delete_group(req).await.map_err(admin_err)?.into_inner().message)
    }

    pub async fn list_groups(&self) -> Result<Vec<admin_pb::GroupConfig>> {
        Ok(self.client.clone().list_groups(admin_pb::Empty {}).await.map_err(admin_err)?.into_inner().groups)
    }

    pub async fn consumer_progress(&self, group: &str, topic: &str) -> Result<admin_pb::ConsumerProgressReply> {
        let req = admin_pb::ConsumerProgressRequest { group: group.into(), topic: topic.into() };
        Ok(self.client.clone().consumer_progress(req).await.map_err(admin_err)?.into_inner())
    }

    pub async fn transfer_leader(&self, to: u64) -> Result<String> {
        let req = admin_pb::TransferLeaderRequest { to_node: to };
        Ok(self.client.clone().transfer_leader(req).await.map_err(admin_err)?.into_inner().message)
    }

    pub async fn add_node(&self, id: u64, address: &str) -> Result<String> {
        let req = admin_pb::AddNodeRequest { node_id: id, address: address.into() };
        Ok(self.client.clone().add_node(req).await.map_err(admin_err)?.into_inner().message)
    }

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failing_endpoint_is_avoided_then_retried() {
        let e = Endpoints::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()]).unwrap();
        e.failed(0);
        for _ in 0..10 {
            assert_eq!(e.pick(), 1, "endpoint 0 is avoided after a failure");
        }
        e.failed(1);
        // Both avoided: the one that recovers first.
        assert_eq!(e.pick(), 0);
        e.succeeded(0);
        assert!((0..4).any(|_| e.pick() == 0));
    }

    #[test]
    fn retryable_codes() {
        assert!(ClientError::Broker { code: Code::HaNotAvailable as i32, message: String::new() }.retryable());
        assert!(!ClientError::Broker { code: Code::TopicNotFound as i32, message: String::new() }.retryable());
        assert!(!ClientError::Input(String::new()).retryable());
    }
}
