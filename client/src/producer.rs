//! [`Producer`]: sends messages to any node of the cluster.

use std::sync::Arc;
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
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self { max_attempts: 3, request_timeout: Duration::from_secs(10) }
    }
}

/// Sends messages to any node of a group.
#[derive(Clone)]
pub struct Producer {
    pub(crate) endpoints: Arc<Endpoints>,
    pub(crate) options: ProducerOptions,
    host: String,
}

impl Producer {
    /// A producer for these nodes (`host:port`); connects lazily.
    pub fn new(endpoints: &[String], options: ProducerOptions) -> Result<Self> {
        Ok(Self::with_endpoints(Arc::new(Endpoints::new(endpoints)?), options))
    }

    pub(crate) fn with_endpoints(endpoints: Arc<Endpoints>, options: ProducerOptions) -> Self {
        Self { endpoints, options, host: hostname() }
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
        let host =
            self.host.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        format!(
            "{:012X}{:08X}{:06X}{:06X}",
            now_ms() as u64 & 0xFFFF_FFFF_FFFF,
            host as u32,
            std::process::id() & 0xFF_FFFF,
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
        let req = pb::SendMessageRequest { messages };
        let mut last = ClientError::NoEndpoint;
        for _ in 0..self.options.max_attempts.max(1) {
            let i = self.endpoints.pick();
            let mut c = self.endpoints.clients[i].clone();
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(self.options.request_timeout);
            let result = match c.send_message(r).await {
                Ok(resp) => send_result(resp.into_inner()),
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
            if let Err(e) = p.send(&topic, m).await {
                tracing::debug!(topic = %topic, error = %e, "one-way send failed");
            }
        });
    }
}

/// The receipts of a SendMessage reply; the first refused entry fails it.
fn send_result(resp: pb::SendMessageResponse) -> Result<Vec<SendReceipt>> {
    check(resp.status)?;
    resp.entries
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
        .collect()
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
