//! Transactional messages: [`TransactionProducer`] sends half messages in a
//! [`Transaction`], which commits or rolls them back (EndTransaction,
//! source CLIENT). While it runs, the producer keeps a Telemetry stream to
//! every endpoint open, announcing its topics (Settings, client type
//! PRODUCER); the broker pushes a `RecoverOrphanedTransactionCommand` there
//! for a half message left unresolved, and the producer answers with its
//! [`TransactionChecker`]'s verdict (EndTransaction, source SERVER_CHECK;
//! nothing for [`TransactionResolution::Unknown`]: the broker asks again).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use raftmq_proto::rocketmq as pb;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ClientError;
use crate::Endpoints;
use crate::Result;
use crate::check;
use crate::headers::user_agent;
use crate::message::OutMessage;
use crate::message::Received;
use crate::message::SendReceipt;
use crate::message::received;
use crate::pb_duration;
use crate::producer::Producer;
use crate::producer::ProducerOptions;
use crate::resource;
use crate::telemetry;

/// What a transaction's half message becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionResolution {
    /// Deliver it to consumers.
    Commit,
    /// Drop it.
    Rollback,
    /// Not known yet: the broker checks again later.
    Unknown,
}

/// Answers the broker's question "what became of this half message?" for
/// transactions the producer did not end (it crashed, or the commit was
/// lost). Runs on a blocking thread, so it may block (e.g. query a database).
/// Closures `Fn(&Received) -> TransactionResolution` are checkers.
pub trait TransactionChecker: Send + Sync + 'static {
    /// The verdict for the half message `message`.
    fn check(&self, message: &Received) -> TransactionResolution;
}

impl<F> TransactionChecker for F
where
    F: Fn(&Received) -> TransactionResolution + Send + Sync + 'static,
{
    fn check(&self, message: &Received) -> TransactionResolution {
        self(message)
    }
}

/// How often the producer heartbeats (like the official clients).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Checks answered at the same time, at most.
const MAX_CONCURRENT_CHECKS: usize = 8;
/// Commands waiting for a checker, at most (more are dropped: the broker repeats).
const CHECK_QUEUE: usize = 256;
/// A check of a transaction answered this recently is not answered again
/// (several nodes may ask about the same half message).
const CHECK_DEDUP_FOR: Duration = Duration::from_secs(5);
/// Transactions remembered for deduplication, at most.
const CHECK_DEDUP_MAX: usize = 10_000;
/// Timeout of one EndTransaction call.
const END_TIMEOUT: Duration = Duration::from_secs(10);

/// One half message of a transaction.
#[derive(Debug, Clone)]
struct Half {
    topic: String,
    message_id: String,
    transaction_id: String,
    /// The endpoint that took it (EndTransaction goes there first).
    endpoint: usize,
}

/// A transaction: the half messages sent with [`TransactionProducer::send`],
/// committed or rolled back together. Dropping it without either leaves
/// them to the broker's check (the [`TransactionChecker`] decides).
pub struct Transaction {
    endpoints: Arc<Endpoints>,
    halves: Vec<Half>,
    ended: bool,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction").field("halves", &self.halves).field("ended", &self.ended).finish()
    }
}

impl Transaction {
    /// The (message id, transaction id) of every half message sent so far.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.halves.iter().map(|h| (h.message_id.clone(), h.transaction_id.clone())).collect()
    }

    /// Makes every half message deliverable.
    pub async fn commit(mut self) -> Result<()> {
        self.ended = true;
        self.end(TransactionResolution::Commit).await
    }

    /// Drops every half message.
    pub async fn rollback(mut self) -> Result<()> {
        self.ended = true;
        self.end(TransactionResolution::Rollback).await
    }

    /// Ends every half message; tries all of them and reports the first error.
    async fn end(&self, resolution: TransactionResolution) -> Result<()> {
        let mut first_err = None;
        for h in &self.halves {
            if let Err(e) = end_transaction(&self.endpoints, h, resolution, pb::TransactionSource::SourceClient).await {
                tracing::warn!(message_id = %h.message_id, error = %e, "ending a transaction failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.ended && !self.halves.is_empty() {
            tracing::warn!(
                halves = self.halves.len(),
                "transaction dropped without commit or rollback: the broker will check it back"
            );
        }
    }
}

fn resolution_pb(r: TransactionResolution) -> pb::TransactionResolution {
    match r {
        TransactionResolution::Commit => pb::TransactionResolution::Commit,
        TransactionResolution::Rollback => pb::TransactionResolution::Rollback,
        TransactionResolution::Unknown => pb::TransactionResolution::Unspecified,
    }
}

/// EndTransaction at the endpoint that holds the half message (others if it
/// is unreachable).
async fn end_transaction(
    endpoints: &Endpoints,
    h: &Half,
    resolution: TransactionResolution,
    source: pb::TransactionSource,
) -> Result<()> {
    let req = pb::EndTransactionRequest {
        topic: resource(&h.topic),
        message_id: h.message_id.clone(),
        transaction_id: h.transaction_id.clone(),
        resolution: resolution_pb(resolution) as i32,
        source: source as i32,
        trace_context: String::new(),
    };
    let (_, resp) = endpoints
        .unary(Some(h.endpoint), END_TIMEOUT, |mut c| {
            let req = req.clone();
            async move { c.end_transaction(req).await }
        })
        .await?;
    check(resp.status)
}

/// Recently answered checks, bounded: (transaction id) -> when.
#[derive(Default)]
struct RecentChecks(HashMap<String, Instant>);

impl RecentChecks {
    /// True if `tx` should be checked now (and remembers it).
    fn admit(&mut self, tx: &str, now: Instant) -> bool {
        if self.0.get(tx).is_some_and(|at| now.duration_since(*at) < CHECK_DEDUP_FOR) {
            return false;
        }
        if self.0.len() >= CHECK_DEDUP_MAX {
            self.0.retain(|_, at| now.duration_since(*at) < CHECK_DEDUP_FOR);
            if self.0.len() >= CHECK_DEDUP_MAX {
                self.0.clear();
            }
        }
        self.0.insert(tx.to_string(), now);
        true
    }
}

/// A producer of transactional messages (see the module documentation).
/// Also sends ordinary messages through [`producer`](Self::producer).
pub struct TransactionProducer {
    producer: Producer,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl TransactionProducer {
    /// Starts a producer for `topics` at these nodes: opens the Telemetry
    /// streams (Settings with the topics) and the heartbeat, and serves the
    /// broker's checks with `checker`. Needs a Tokio runtime.
    pub async fn start(
        endpoints: &[String],
        topics: &[String],
        options: ProducerOptions,
        checker: impl TransactionChecker,
    ) -> Result<Self> {
        if topics.is_empty() {
            return Err(ClientError::Input(
                "a transaction producer needs its topics (the broker checks by topic)".into(),
            ));
        }
        let endpoints = Arc::new(Endpoints::new(endpoints)?);
        let producer = Producer::with_endpoints(endpoints.clone(), options.clone());
        let settings = pb::Settings {
            client_type: Some(pb::ClientType::Producer as i32),
            access_point: Some(endpoints.access_point()),
            backoff_policy: None,
            request_timeout: Some(pb_duration(options.request_timeout)),
            pub_sub: Some(pb::settings::PubSub::Publishing(pb::Publishing {
                topics: topics.iter().filter_map(|t| resource(t)).collect(),
                max_body_size: 0,
                validate_message_type: false,
            })),
            user_agent: Some(user_agent()),
            metric: Some(pb::Metric { on: false, endpoints: None }),
        };
        let (stop, stopped) = watch::channel(false);
        let (tx, rx) = mpsc::channel(CHECK_QUEUE);
        let mut tasks = telemetry::spawn_sessions(endpoints.clone(), settings, tx, stopped.clone());
        tasks.push(tokio::spawn(serve_checks(endpoints.clone(), Arc::new(checker), rx)));
        tasks.push(tokio::spawn(heartbeat(endpoints, stopped)));
        Ok(Self { producer, shutdown: stop, tasks })
    }

    /// The producer underneath, for ordinary sends.
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// The `x-mq-client-id` this producer sends (its Telemetry streams too).
    pub fn client_id(&self) -> &str {
        self.producer.client_id()
    }

    /// A new, empty transaction.
    pub fn begin(&self) -> Transaction {
        Transaction { endpoints: self.producer.endpoints.clone(), halves: Vec::new(), ended: false }
    }

    /// Sends `m` as a half message of `tx` (type TRANSACTION): consumers see
    /// it only after [`Transaction::commit`]. The receipt carries the
    /// transaction id. A message group or delivery time is refused.
    pub async fn send(&self, tx: &mut Transaction, topic: &str, m: OutMessage) -> Result<SendReceipt> {
        let (endpoint, mut r) = self.producer.send_batch_at(topic, std::slice::from_ref(&m), true).await?;
        let receipt = r.pop().ok_or_else(|| ClientError::Broker { code: 0, message: "no send result".into() })?;
        if receipt.transaction_id.is_empty() {
            return Err(ClientError::Broker { code: 0, message: "half message sent without a transaction id".into() });
        }
        tx.halves.push(Half {
            topic: topic.to_string(),
            message_id: receipt.message_id.clone(),
            transaction_id: receipt.transaction_id.clone(),
            endpoint,
        });
        Ok(receipt)
    }

    /// Stops checking and heartbeating, tells the nodes
    /// (NotifyClientTermination). Open transactions are left to the broker.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.send_replace(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.producer.endpoints.notify_termination(None, END_TIMEOUT).await
    }
}

impl Drop for TransactionProducer {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Heartbeats every endpoint (client type PRODUCER) until shut down.
async fn heartbeat(endpoints: Arc<Endpoints>, mut stopped: watch::Receiver<bool>) {
    loop {
        for i in 0..endpoints.addrs.len() {
            let mut c = endpoints.clients[i].clone();
            let req = pb::HeartbeatRequest { group: None, client_type: pb::ClientType::Producer as i32 };
            match tokio::time::timeout(END_TIMEOUT, c.heartbeat(req)).await {
                Ok(Ok(r)) => {
                    if let Err(e) = check(r.into_inner().status) {
                        tracing::debug!(endpoint = %endpoints.addrs[i], error = %e, "heartbeat refused");
                    }
                }
                Ok(Err(s)) => tracing::debug!(endpoint = %endpoints.addrs[i], code = ?s.code(), "heartbeat failed"),
                Err(_) => tracing::debug!(endpoint = %endpoints.addrs[i], "heartbeat timed out"),
            }
        }
        if !telemetry::sleep_or_shutdown(HEARTBEAT_EVERY, &mut stopped).await {
            return;
        }
    }
}

/// Answers the broker's orphaned-transaction checks, a bounded number at a time.
async fn serve_checks(
    endpoints: Arc<Endpoints>,
    checker: Arc<dyn TransactionChecker>,
    mut rx: mpsc::Receiver<telemetry::Inbound>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS));
    let recent = Arc::new(Mutex::new(RecentChecks::default()));
    while let Some((endpoint, cmd)) = rx.recv().await {
        let check_cmd = match cmd.command {
            Some(pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(c)) => c,
            Some(pb::telemetry_command::Command::Settings(_)) => {
                if let Some(s) = cmd.status
                    && s.code != pb::Code::Ok as i32
                {
                    tracing::warn!(code = s.code, message = %s.message, "broker refused the producer settings");
                }
                continue;
            }
            _ => {
                tracing::debug!("telemetry command ignored by the transaction producer");
                continue;
            }
        };
        let Some(message) = check_cmd.message else {
            tracing::warn!(transaction_id = %check_cmd.transaction_id, "transaction check without a message");
            continue;
        };
        let tx_id = check_cmd.transaction_id;
        if !recent.lock().unwrap_or_else(|e| e.into_inner()).admit(&tx_id, Instant::now()) {
            tracing::debug!(transaction_id = %tx_id, "transaction check answered a moment ago: skipped");
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let (endpoints, checker) = (endpoints.clone(), checker.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let m = received(message, endpoint);
            let half = Half {
                topic: m.topic.clone(),
                message_id: m.message_id.clone(),
                transaction_id: tx_id.clone(),
                endpoint,
            };
            let verdict = match tokio::task::spawn_blocking(move || checker.check(&m)).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(transaction_id = %tx_id, error = %e, "transaction checker panicked");
                    TransactionResolution::Unknown
                }
            };
            tracing::debug!(transaction_id = %tx_id, message_id = %half.message_id, ?verdict, "transaction checked");
            if verdict == TransactionResolution::Unknown {
                return;
            }
            if let Err(e) = end_transaction(&endpoints, &half, verdict, pb::TransactionSource::SourceServerCheck).await
            {
                tracing::warn!(transaction_id = %tx_id, error = %e, "answering a transaction check failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_deduplicated_for_a_while() {
        let mut r = RecentChecks::default();
        let t0 = Instant::now();
        assert!(r.admit("a", t0));
        assert!(!r.admit("a", t0 + Duration::from_secs(1)));
        assert!(r.admit("b", t0 + Duration::from_secs(1)));
        assert!(r.admit("a", t0 + CHECK_DEDUP_FOR + Duration::from_millis(1)));
    }

    #[test]
    fn dedup_memory_is_bounded() {
        let mut r = RecentChecks::default();
        let t0 = Instant::now();
        for i in 0..CHECK_DEDUP_MAX * 2 {
            assert!(r.admit(&i.to_string(), t0));
        }
        assert!(r.0.len() <= CHECK_DEDUP_MAX);
    }

    #[test]
    fn resolutions_on_the_wire() {
        assert_eq!(resolution_pb(TransactionResolution::Commit), pb::TransactionResolution::Commit);
        assert_eq!(resolution_pb(TransactionResolution::Rollback), pb::TransactionResolution::Rollback);
        assert_eq!(resolution_pb(TransactionResolution::Unknown), pb::TransactionResolution::Unspecified);
    }

    #[test]
    fn closures_are_checkers() {
        let c = |m: &Received| {
            if m.keys.iter().any(|k| k == "paid") {
                TransactionResolution::Commit
            } else {
                TransactionResolution::Unknown
            }
        };
        let mut m = received(pb::Message::default(), 0);
        assert_eq!(c.check(&m), TransactionResolution::Unknown);
        m.keys.push("paid".into());
        assert_eq!(c.check(&m), TransactionResolution::Commit);
    }

    #[tokio::test]
    async fn transactional_sends_refuse_groups_and_delays() {
        let p = TransactionProducer::start(
            &["127.0.0.1:1".into()],
            &["t".into()],
            ProducerOptions::default(),
            |_: &Received| TransactionResolution::Unknown,
        )
        .await
        .unwrap();
        let mut tx = p.begin();
        let e = p.send(&mut tx, "t", OutMessage::new("x").message_group("g")).await.unwrap_err();
        assert!(matches!(e, ClientError::Input(_)), "{e}");
        assert!(tx.messages().is_empty());
        // Nothing to end: commit is a no-op.
        tx.commit().await.unwrap();
        drop(p);
    }
}
