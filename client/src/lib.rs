//! The RaftMQ Rust client: speaks the RocketMQ 5 gRPC protocol
//! (`apache.rocketmq.v2`) to any node of a broker group, plus the admin API.
//!
//! - [`Producer`]: sync, async (callback) and one-way sends, with retries and
//!   RocketMQ-style latency fault tolerance (a failing endpoint is avoided for
//!   a while, longer after repeated failures); FIFO ([`OutMessage::message_group`])
//!   and delay messages ([`OutMessage::delay`], [`OutMessage::delay_level`]);
//! - [`TransactionProducer`]: half messages committed or rolled back by a
//!   [`Transaction`], and a [`TransactionChecker`] that answers the broker's
//!   orphaned-transaction checks;
//! - [`SimpleConsumer`]: receive (with a tag or SQL [`Filter`]) with an
//!   invisible duration, ack, change invisibility, nack with RocketMQ's
//!   backoff, forward to the dead-letter queue;
//! - [`PushConsumer`]: a handler called for every message of the queues the
//!   broker assigns, with acks, retries and dead letters done for it;
//! - [`PullConsumer`]: read a queue by offset and commit offsets; the classic
//!   queue allocation strategies are in [`allocate`];
//! - [`BroadcastConsumer`]: every instance reads every message, keeping its
//!   own offsets;
//! - [`Admin`]: topics, cluster status, consumer progress, leadership,
//!   membership, message query and dead letters.
//!
//! Every messaging call carries the `x-mq-client-id` header: one stable id
//! per client instance (see [`new_client_id`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use raftmq_proto::rocketmq as pb;
use raftmq_proto::rocketmq::Code;
use raftmq_proto::rocketmq::messaging_service_client::MessagingServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

pub use raftmq_proto::admin as admin_pb;

mod admin;
pub mod allocate;
mod backoff;
mod broadcast;
pub mod console;
mod filter;
mod headers;
mod md5;
mod message;
#[cfg(test)]
mod mock;
mod producer;
#[cfg(test)]
mod protocol_tests;
mod pull;
mod push;
mod simple;
mod telemetry;
mod transaction;

pub use admin::Admin;
pub use backoff::CONSUMER_BACKOFF;
pub use backoff::DEFAULT_MAX_ATTEMPTS;
pub use backoff::DELAY_LEVELS;
pub use backoff::RetryPolicy;
pub use backoff::consumer_backoff;
pub use backoff::delay_level;
pub use broadcast::BroadcastConsumer;
pub use broadcast::BroadcastOptions;
pub use broadcast::OffsetTable;
pub use broadcast::StartPosition;
pub use filter::Filter;
pub use headers::CLIENT_ID_HEADER;
pub use headers::Credentials;
pub use headers::new_client_id;
pub use headers::set_credentials;
pub use message::Delivery;
pub use message::OutMessage;
pub use message::Received;
pub use message::SendReceipt;
pub use message::message_type_name;
pub use producer::Producer;
pub use producer::ProducerOptions;
pub use pull::PullConsumer;
pub use push::ConsumeResult;
pub use push::PushConsumer;
pub use push::PushConsumerOptions;
pub use push::PushStats;
pub use simple::SimpleConsumer;
pub use transaction::Transaction;
pub use transaction::TransactionChecker;
pub use transaction::TransactionProducer;
pub use transaction::TransactionResolution;

/// Client errors. Clone: one failed request answers every send coalesced into it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The client was created without any endpoint.
    #[error("no endpoint given")]
    NoEndpoint,
    /// The call did not reach the node, or the connection broke.
    #[error("transport to {endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    /// The broker answered with a RocketMQ status code.
    #[error("broker refused ({code}): {message}")]
    Broker { code: i32, message: String },
    /// An admin call failed (gRPC status).
    #[error("admin call failed ({code:?}): {message}")]
    Admin { code: tonic::Code, message: String },
    /// The caller asked for something invalid (caught before any call).
    #[error("bad input: {0}")]
    Input(String),
    /// Reading or writing a local file (e.g. broadcast offsets).
    #[error("file {path}: {message}")]
    File { path: String, message: String },
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

    /// The broker's status code, if the broker refused.
    pub fn code(&self) -> Option<i32> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The messaging stub every client uses: a channel plus the client headers.
pub(crate) type Rpc = MessagingServiceClient<InterceptedService<Channel, headers::Headers>>;

pub(crate) fn channel(addr: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Input(format!("endpoint {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) fn check(status: Option<pb::Status>) -> Result<()> {
    let s = status.ok_or_else(|| ClientError::Broker { code: 0, message: "response without status".into() })?;
    if s.code == Code::Ok as i32 { Ok(()) } else { Err(ClientError::Broker { code: s.code, message: s.message }) }
}

/// The status that opens a receive or pull stream: OK, or "nothing new".
pub(crate) fn check_stream_status(s: pb::Status) -> Result<()> {
    if s.code == Code::Ok as i32 || s.code == Code::MessageNotFound as i32 {
        Ok(())
    } else {
        Err(ClientError::Broker { code: s.code, message: s.message })
    }
}

pub(crate) fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource { resource_namespace: String::new(), name: name.to_string() })
}

pub(crate) fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub(crate) fn from_pb_duration(d: &prost_types::Duration) -> Duration {
    Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
}

pub(crate) fn pb_timestamp_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub(crate) fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// A set of endpoints with latency fault tolerance.
pub(crate) struct Endpoints {
    pub(crate) addrs: Vec<String>,
    pub(crate) clients: Vec<Rpc>,
    /// The `x-mq-client-id` every call of this client carries.
    pub(crate) client_id: String,
    /// Per endpoint: (consecutive failures, avoid until).
    health: Mutex<HashMap<usize, (u32, Instant)>>,
    pub(crate) next: AtomicU64,
    /// The endpoint the broker named as its group's leader (`x-raftmq-leader`),
    /// `usize::MAX` if none: writes go there first.
    leader: std::sync::atomic::AtomicUsize,
    /// Topic -> (fetched, its queues as (broker group, queue id)).
    routes: Mutex<HashMap<String, (Instant, Vec<QueueRef>)>>,
}

/// One queue of a topic in one broker group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueRef {
    /// The broker group (RocketMQ's broker name).
    pub broker: String,
    /// The queue id inside that group.
    pub queue: u32,
}

pub use raftmq_proto::LEADER_HEADER;

/// Whether endpoint `i` is outside its avoid window (see [`Endpoints::failed`]).
fn healthy(health: &HashMap<usize, (u32, Instant)>, i: usize, now: Instant) -> bool {
    health.get(&i).is_none_or(|(_, until)| *until <= now)
}

/// How long a topic route is reused before asking again.
const ROUTE_FRESH_FOR: Duration = Duration::from_secs(10);

impl Endpoints {
    pub(crate) fn new(addrs: &[String]) -> Result<Self> {
        Self::with_client_id(addrs, new_client_id())
    }

    pub(crate) fn with_client_id(addrs: &[String], client_id: String) -> Result<Self> {
        if addrs.is_empty() {
            return Err(ClientError::NoEndpoint);
        }
        let h = headers::Headers::new(&client_id)?;
        let clients = addrs
            .iter()
            .map(|a| {
                Ok(MessagingServiceClient::with_interceptor(channel(a)?, h.clone())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            addrs: addrs.to_vec(),
            clients,
            client_id,
            health: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            leader: std::sync::atomic::AtomicUsize::new(usize::MAX),
            routes: Mutex::new(HashMap::new()),
        })
    }

    /// The configured endpoints as the protocol's access point.
    pub(crate) fn access_point(&self) -> pb::Endpoints {
        headers::access_point(&self.addrs)
    }

    /// The queues of `topic` in every group (QueryRoute), cached for
    /// [`ROUTE_FRESH_FOR`]; the stale route when no endpoint answers.
    pub(crate) async fn route(&self, topic: &str) -> Result<Vec<QueueRef>> {
        if let Some((at, r)) = self.routes.lock().unwrap_or_else(|e| e.into_inner()).get(topic)
            && at.elapsed() < ROUTE_FRESH_FOR
        {
            return Ok(r.clone());
        }
        let mut last = ClientError::NoEndpoint;
        for _ in 0..self.addrs.len() {
            let i = self.pick();
            let mut c = self.clients[i].clone();
            let req = pb::QueryRouteRequest { topic: resource(topic), endpoints: Some(self.access_point()) };
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
    pub(crate) async fn brokers(&self, topic: &str) -> Vec<String> {
        let mut b: Vec<String> = self.route(topic).await.unwrap_or_default().into_iter().map(|q| q.broker).collect();
        b.dedup();
        b
    }

    /// The next endpoint to use: round robin over healthy ones; if none is
    /// healthy, the one that becomes healthy first.
    pub(crate) fn pick(&self) -> usize {
        let n = self.addrs.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for k in 0..n {
            let i = (start + k) % n;
            if healthy(&h, i, now) {
                return i;
            }
        }
        (0..n).min_by_key(|i| h.get(i).map(|(_, u)| *u)).unwrap_or(0)
    }

    /// The endpoint for a write: the known leader while it is healthy,
    /// else [`pick`](Self::pick).
    pub(crate) fn pick_for_write(&self) -> usize {
        let l = self.leader.load(Ordering::Relaxed);
        if l < self.addrs.len() {
            let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
            if healthy(&h, l, Instant::now()) {
                return l;
            }
        }
        self.pick()
    }

    /// Remembers the leader a broker named in a reply's `x-raftmq-leader`
    /// header, if it is one of our endpoints.
    pub(crate) fn note_leader(&self, meta: &tonic::metadata::MetadataMap) {
        let Some(addr) = meta.get(LEADER_HEADER).and_then(|v| v.to_str().ok()) else { return };
        if let Some(i) = self.addrs.iter().position(|a| a == addr) {
            self.leader.store(i, Ordering::Relaxed);
        }
    }

    pub(crate) fn failed(&self, i: usize) {
        // A failing leader is forgotten until a reply names one again.
        let _ = self.leader.compare_exchange(i, usize::MAX, Ordering::Relaxed, Ordering::Relaxed);
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let e = h.entry(i).or_insert((0, Instant::now()));
        e.0 += 1;
        // RocketMQ-like: the longer it keeps failing, the longer it is avoided.
        let avoid = Duration::from_millis(500 * 2u64.pow(e.0.min(6))).min(Duration::from_secs(30));
        e.1 = Instant::now() + avoid;
    }

    pub(crate) fn succeeded(&self, i: usize) {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
    }

    /// A unary call: first at `prefer` (or a picked endpoint), then, after a
    /// transport failure, at the other endpoints; at most one try per
    /// endpoint. Returns the endpoint that answered and its reply (whose
    /// status the caller checks).
    /// Says goodbye to every node (NotifyClientTermination, with the
    /// consumer group if any); the first failure is returned after all were tried.
    pub(crate) async fn notify_termination(&self, group: Option<pb::Resource>, timeout: Duration) -> Result<()> {
        let mut first_err = None;
        for i in 0..self.addrs.len() {
            let req = pb::NotifyClientTerminationRequest { group: group.clone() };
            let r = self
                .unary(Some(i), timeout, |mut c| {
                    let req = req.clone();
                    async move { c.notify_client_termination(req).await }
                })
                .await
                .and_then(|(_, r)| check(r.status));
            if let Err(err) = r {
                tracing::debug!(endpoint = %self.addrs[i], error = %err, "NotifyClientTermination failed");
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    pub(crate) async fn unary<T, F, Fut>(
        &self,
        prefer: Option<usize>,
        timeout: Duration,
        mut call: F,
    ) -> Result<(usize, T)>
    where
        F: FnMut(Rpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = ClientError::NoEndpoint;
        let mut tried = Vec::with_capacity(self.addrs.len());
        for k in 0..self.addrs.len() {
            let i = match (k, prefer) {
                (0, Some(p)) if p < self.addrs.len() => p,
                _ => {
                    let i = self.pick();
                    if tried.contains(&i) { (0..self.addrs.len()).find(|j| !tried.contains(j)).unwrap_or(i) } else { i }
                }
            };
            tried.push(i);
            match tokio::time::timeout(timeout, call(self.clients[i].clone())).await {
                Ok(Ok(r)) => {
                    self.succeeded(i);
                    return Ok((i, r.into_inner()));
                }
                Ok(Err(s)) => {
                    self.failed(i);
                    last = transport(&self.addrs[i], s);
                }
                Err(_) => {
                    self.failed(i);
                    last = ClientError::Transport { endpoint: self.addrs[i].clone(), message: "timed out".into() };
                }
            }
        }
        Err(last)
    }
}

pub(crate) fn transport(addr: &str, s: tonic::Status) -> ClientError {
    ClientError::Transport { endpoint: addr.to_string(), message: format!("{:?}: {}", s.code(), s.message()) }
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

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, 1, 999, 1000, 1_700_000_000_123] {
            assert_eq!(timestamp_ms(&pb_timestamp_ms(ms)), ms);
        }
        assert_eq!(from_pb_duration(&pb_duration(Duration::from_millis(1500))), Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn unary_tries_every_endpoint_once() {
        let e = Endpoints::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into(), "127.0.0.1:3".into()]).unwrap();
        let seen = Mutex::new(Vec::new());
        let r: Result<(usize, pb::HeartbeatResponse)> = e
            .unary(Some(2), Duration::from_secs(1), |c| {
                // Which endpoint: compare the stub's identity is not possible,
                // so count calls instead.
                seen.lock().unwrap().push(());
                drop(c);
                async { Err(tonic::Status::unavailable("down")) }
            })
            .await;
        assert!(matches!(r, Err(ClientError::Transport { .. })));
        assert_eq!(seen.lock().unwrap().len(), 3);
    }
}
