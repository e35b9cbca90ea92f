//! [`Producer`]: sends messages to any node of the cluster.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raftmq_proto::rocketmq as pb;

use crate::ClientError;
use crate::Endpoints;
use crate::Result;
use crate::check;
use crate::headers::hostname;
use crate::message::OutMessage;
use crate::message::SendReceipt;
use crate::now_ms;
use crate::transport;

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// Attempts per send (first try included). Default: 3.
    pub max_attempts: u32,
    /// Timeout of one attempt. Default: 10 s.
    pub request_timeout: Duration,
    /// Whether concurrent [`Producer::send`] calls (of this producer and
    /// its clones) for one topic share a SendMessage request: each still
    /// waits for its own durable acknowledgement and gets its own receipt,
    /// but the request and Raft costs are paid once per batch, as a Kafka
    /// producer batches. A lone sender is not delayed (its batch is itself).
    /// Default: true.
    pub coalesce: bool,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self { max_attempts: 3, request_timeout: Duration::from_secs(10), coalesce: true }
    }
}

/// Coalesced requests of one topic under way at once; sends that arrive
/// while they run form the next batch.
const COALESCE_IN_FLIGHT: usize = 4;
/// Most messages in one coalesced request (the broker's default limit is 1024).
const COALESCE_MAX_MESSAGES: usize = 512;
/// Most body bytes in one coalesced request (a larger message goes alone).
const COALESCE_MAX_BYTES: usize = 4 << 20;
/// Sends waiting per topic at most; beyond it `send` fails at once.
const COALESCE_MAX_WAITING: usize = 65_536;

struct Waiting {
    message: pb::Message,
    reply: tokio::sync::oneshot::Sender<Result<SendReceipt>>,
}

#[derive(Default)]
struct Lane {
    waiting: VecDeque<Waiting>,
    in_flight: usize,
}

/// Sends messages to any node of a group.
#[derive(Clone)]
pub struct Producer {
    pub(crate) endpoints: Arc<Endpoints>,
    pub(crate) options: ProducerOptions,
    host: String,
    /// Coalesced sends waiting, per topic.
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
}

impl Producer {
    /// A producer for these nodes (`host:port`); connects lazily.
    pub fn new(endpoints: &[String], options: ProducerOptions) -> Result<Self> {
        Ok(Self::with_endpoints(Arc::new(Endpoints::new(endpoints)?), options))
    }

    pub(crate) fn with_endpoints(endpoints: Arc<Endpoints>, options: ProducerOptions) -> Self {
        Self { endpoints, options, host: hostname(), lanes: Arc::default() }
    }

    /// The `x-mq-client-id` this producer sends.
    pub fn client_id(&self) -> &str {
        &self.endpoints.client_id
    }

    /// A message id unique across producers, processes and hosts: the
    /// broker stores a message once per id (a retried send is not stored
    /// twice), so two messages must never share one. Time (ms), a hash of
    /// the host name, the process id, and a counter shared by every
    /// producer of the process.
    fn message_id(&self) -> String {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        // getpid is a system call per message otherwise (glibc stopped caching it).
        static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let pid = *PID.get_or_init(std::process::id);
        let host =
            self.host.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        format!(
            "{:012X}{:08X}{:06X}{:06X}",
            now_ms() as u64 & 0xFFFF_FFFF_FFFF,
            host as u32,
            pid & 0xFF_FFFF,
            seq & 0xFF_FFFF
        )
    }

    /// Sends messages of one topic in one request; one receipt per message.
    /// Retries on another endpoint after a retryable failure (the message ids
    /// stay the same across retries). A message with a bad delivery time
    /// (e.g. delay level out of range) fails before anything is sent.
    pub async fn send_batch(&self, topic: &str, messages: &[OutMessage]) -> Result<Vec<SendReceipt>> {
        Ok(self.send_batch_at(topic, messages, false).await?.1)
    }

    /// Like [`send_batch`](Self::send_batch); also says which endpoint took
    /// the messages. `transactional`: half messages (type TRANSACTION).
    pub(crate) async fn send_batch_at(
        &self,
        topic: &str,
        messages: &[OutMessage],
        transactional: bool,
    ) -> Result<(usize, Vec<SendReceipt>)> {
        let messages = messages
            .iter()
            .map(|m| m.to_pb(topic, self.message_id(), &self.host, transactional))
            .collect::<Result<Vec<_>>>()?;
        let (i, results) = self.send_request(&pb::SendMessageRequest { messages }).await?;
        Ok((i, results.into_iter().collect::<Result<Vec<_>>>()?))
    }

    /// One SendMessage request, retried on another endpoint after a
    /// retryable failure of the whole request. Returns the endpoint that
    /// answered and one result per message.
    async fn send_request(&self, req: &pb::SendMessageRequest) -> Result<(usize, Vec<Result<SendReceipt>>)> {
        let mut last = ClientError::NoEndpoint;
        for _ in 0..self.options.max_attempts.max(1) {
            let i = self.endpoints.pick_for_write();
            let mut c = self.endpoints.clients[i].clone();
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(self.options.request_timeout);
            let result = match c.send_message(r).await {
                Ok(resp) => {
                    self.endpoints.note_leader(resp.metadata());
                    entry_results(resp.into_inner())
                }
                Err(s) => Err(transport(&self.endpoints.addrs[i], s)),
            };
            match result {
                Ok(r) => {
                    self.endpoints.succeeded(i);
                    return Ok((i, r));
                }
                Err(e) if e.retryable() => {
                    tracing::debug!(endpoint = %self.endpoints.addrs[i], error = %e, "send failed, retrying");
                    self.endpoints.failed(i);
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Queues a message in its topic's lane and starts a flusher if fewer
    /// than [`COALESCE_IN_FLIGHT`] run.
    async fn send_coalesced(&self, topic: &str, message: pb::Message) -> Result<SendReceipt> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            let lane = lanes.entry(topic.to_string()).or_default();
            if lane.waiting.len() >= COALESCE_MAX_WAITING {
                return Err(ClientError::Input(format!("{COALESCE_MAX_WAITING} sends already wait for topic {topic}")));
            }
            lane.waiting.push_back(Waiting { message, reply });
            lane.in_flight < COALESCE_IN_FLIGHT && {
                lane.in_flight += 1;
                true
            }
        };
        if start {
            // A task of its own: this caller may stop waiting, the others not.
            let (p, topic) = (self.clone(), topic.to_string());
            tokio::spawn(async move { p.flush_lane(&topic).await });
        }
        answer.await.map_err(|_| ClientError::Input("send abandoned".into()))?
    }

    /// Sends the lane's waiting messages, a batch per request, until none wait.
    async fn flush_lane(&self, topic: &str) {
        loop {
            let batch: Vec<Waiting> = {
                let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                let Some(lane) = lanes.get_mut(topic) else { return };
                let (mut n, mut bytes, mut out) = (0, 0, Vec::new());
                while let Some(w) = lane.waiting.front() {
                    let b = w.message.body.len();
                    if !out.is_empty() && (n + 1 > COALESCE_MAX_MESSAGES || bytes + b > COALESCE_MAX_BYTES) {
                        break;
                    }
                    n += 1;
                    bytes += b;
                    out.push(lane.waiting.pop_front().expect("front exists"));
                }
                if out.is_empty() {
                    lane.in_flight -= 1;
                    if lane.in_flight == 0 {
                        lanes.remove(topic);
                    }
                    return;
                }
                out
            };
            let (messages, replies): (Vec<pb::Message>, Vec<_>) =
                batch.into_iter().map(|w| (w.message, w.reply)).unzip();
            let n = messages.len();
            let req = pb::SendMessageRequest { messages };
            match self.send_request(&req).await {
                Ok((_, results)) if results.len() == n => {
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(r);
                    }
                }
                Ok((_, results)) => {
                    let e =
                        ClientError::Broker { code: 0, message: format!("{} results for {n} messages", results.len()) };
                    replies.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
                }
                // The broker refuses a whole request for one bad message:
                // send each alone so only that one fails.
                Err(e) if n > 1 && !e.retryable() => {
                    for (m, reply) in req.messages.into_iter().zip(replies) {
                        let one = pb::SendMessageRequest { messages: vec![m] };
                        let r = self.send_request(&one).await.and_then(|(_, mut r)| {
                            r.pop().unwrap_or_else(|| {
                                Err(ClientError::Broker { code: 0, message: "no send result".into() })
                            })
                        });
                        let _ = reply.send(r);
                    }
                }
                Err(e) => replies.into_iter().for_each(|r| drop(r.send(Err(e.clone())))),
            }
        }
    }

    /// Sends one message and waits for the broker's acknowledgement.
    pub async fn send(&self, topic: &str, m: OutMessage) -> Result<SendReceipt> {
        if self.options.coalesce {
            return self.send_coalesced(topic, m.to_pb(topic, self.message_id(), &self.host, false)?).await;
        }
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
            if let Err(e) = p.send(&topic, m).await {
                tracing::debug!(topic = %topic, error = %e, "one-way send failed");
            }
        });
    }
}

/// The receipts of a SendMessage reply; the first refused entry fails it.
#[cfg(test)]
fn send_result(resp: pb::SendMessageResponse) -> Result<Vec<SendReceipt>> {
    entry_results(resp)?.into_iter().collect()
}

/// One result per entry of a SendMessage reply; a refused request fails whole.
fn entry_results(resp: pb::SendMessageResponse) -> Result<Vec<Result<SendReceipt>>> {
    check(resp.status)?;
    Ok(resp
        .entries
        .into_iter()
        .map(|e| {
            if let Some(s) = &e.status {
                check(Some(s.clone()))?;
            }
            Ok(SendReceipt {
                message_id: e.message_id,
                offset: e.offset.max(0) as u64,
                transaction_id: e.transaction_id,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_proto::rocketmq::Code;

    #[tokio::test]
    async fn message_ids_never_repeat_across_producers_of_a_process() {
        let eps = ["127.0.0.1:1".to_string()];
        let a = Producer::new(&eps, ProducerOptions::default()).unwrap();
        let b = Producer::new(&eps, ProducerOptions::default()).unwrap();
        let ids: std::collections::HashSet<String> = (0..1000).flat_map(|_| [a.message_id(), b.message_id()]).collect();
        assert_eq!(ids.len(), 2000);
        assert!(ids.iter().all(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())));
    }

    fn ok() -> Option<pb::Status> {
        Some(pb::Status { code: Code::Ok as i32, message: String::new() })
    }

    #[test]
    fn send_results() {
        let r = send_result(pb::SendMessageResponse {
            status: ok(),
            entries: vec![pb::SendResultEntry {
                status: ok(),
                message_id: "M".into(),
                transaction_id: "T".into(),
                offset: 7,
                recall_handle: String::new(),
            }],
        })
        .unwrap();
        assert_eq!(r, vec![SendReceipt { message_id: "M".into(), offset: 7, transaction_id: "T".into() }]);
        let refused = send_result(pb::SendMessageResponse {
            status: ok(),
            entries: vec![pb::SendResultEntry {
                status: Some(pb::Status { code: Code::IllegalDeliveryTime as i32, message: "late".into() }),
                ..Default::default()
            }],
        });
        assert_eq!(refused.unwrap_err().code(), Some(Code::IllegalDeliveryTime as i32));
    }

    #[test]
    fn bad_delay_level_fails_before_sending() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            // Nothing listens on port 1: an attempt to send would be a transport error.
            let p = Producer::new(&["127.0.0.1:1".into()], ProducerOptions::default()).unwrap();
            let e = p.send("t", OutMessage::new("x").delay_level(19)).await.unwrap_err();
            assert!(matches!(e, ClientError::Input(_)), "{e}");
        });
    }
}
