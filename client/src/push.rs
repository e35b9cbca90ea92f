//! [`PushConsumer`]: calls a handler for every message of the queues the
//! broker assigns to this consumer, and settles each message for it.
//!
//! What runs, all bounded:
//! - Heartbeat (group, client type PUSH_CONSUMER) to every endpoint every
//!   10 s; a Telemetry stream per endpoint with the consumer's Settings
//!   (subscription: group, topic, filter); the broker's reply sets the retry
//!   policy (`backoff_policy.max_attempts`, backoff table) and FIFO mode;
//! - QueryAssignment every 5 s: one receive loop per assigned queue, started
//!   and stopped as the assignment changes;
//! - a receive loop long-polls its queue for at most `batch_size` messages,
//!   and only while fewer than `max_inflight` messages are held in total;
//! - the handler is a plain (sync) closure run on Tokio's blocking threads,
//!   at most `consume_threads` at a time. It may block. A panic counts as
//!   [`ConsumeResult::Failure`];
//! - Success: AckMessage. Failure: ChangeInvisibleDuration by the backoff
//!   of the delivery attempt; when the attempt reaches the group's max
//!   attempts, ForwardMessageToDeadLetterQueue instead.
//! - FIFO groups (the broker's Settings say so): a queue's messages are
//!   handled one after the other, in order.
//!
//! [`PushConsumer::shutdown`] stops receiving, waits (bounded) for the
//! messages in hand, and sends NotifyClientTermination.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raftmq_proto::rocketmq as pb;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ClientError;
use crate::Endpoints;
use crate::Result;
use crate::backoff::RetryPolicy;
use crate::check;
use crate::filter::Filter;
use crate::headers::user_agent;
use crate::message::Received;
use crate::pb_duration;
use crate::resource;
use crate::simple::ReceiveArgs;
use crate::simple::ack_raw;
use crate::simple::change_invisible_raw;
use crate::simple::forward_dlq_raw;
use crate::simple::receive_raw;
use crate::telemetry;
use crate::telemetry::sleep_or_shutdown;

/// What the handler made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumeResult {
    /// Done: the message is acked.
    Success,
    /// Try again later (after the backoff), or dead-letter it when its
    /// attempts are used up.
    Failure,
}

/// Push consumer settings. Every queue and loop is bounded by one of these.
#[derive(Debug, Clone)]
pub struct PushConsumerOptions {
    /// Handlers running at the same time, at most. Default: 20.
    pub consume_threads: usize,
    /// Messages received and not yet settled, at most (over all queues).
    /// Default: 1024.
    pub max_inflight: usize,
    /// Messages per receive, at most. Default: 32.
    pub batch_size: u32,
    /// Long-polling time of a receive (the broker caps it). Default: 20 s.
    pub long_polling_timeout: Duration,
    /// `None` (default): the broker picks the invisible time and renews it
    /// while the consumer lives (`auto_renew`, like the official clients).
    /// `Some(d)`: every message is invisible for `d`, no renewal.
    pub invisible_duration: Option<Duration>,
    /// Timeout of the unary calls. Default: 10 s.
    pub request_timeout: Duration,
    /// Heartbeat period. Default: 10 s.
    pub heartbeat_interval: Duration,
    /// QueryAssignment period. Default: 5 s.
    pub assignment_interval: Duration,
    /// How long [`PushConsumer::start`] waits for the broker's Settings
    /// reply before going on with the default retry policy. Default: 3 s.
    pub settings_wait: Duration,
    /// How long [`PushConsumer::shutdown`] waits for handlers in progress.
    /// Default: 30 s.
    pub shutdown_timeout: Duration,
}

impl Default for PushConsumerOptions {
    fn default() -> Self {
        Self {
            consume_threads: 20,
            max_inflight: 1024,
            batch_size: 32,
            long_polling_timeout: Duration::from_secs(20),
            invisible_duration: None,
            request_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(10),
            assignment_interval: Duration::from_secs(5),
            settings_wait: Duration::from_secs(3),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of a push consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Messages received.
    pub received: u64,
    /// Handled with Success and acked.
    pub acked: u64,
    /// Handled with Failure and given back for a retry.
    pub retried: u64,
    /// Forwarded to the dead-letter queue.
    pub dead_lettered: u64,
    /// Settle calls that failed (the message comes back after its invisible time).
    pub settle_errors: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    settle_errors: AtomicU64,
}

type Handler = dyn Fn(&Received) -> ConsumeResult + Send + Sync + 'static;

/// A queue the broker assigned: (broker group, queue id).
type QueueKey = (String, i32);

struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Inner {
    endpoints: Arc<Endpoints>,
    group: String,
    topic: String,
    filter: Filter,
    options: PushConsumerOptions,
    handler: Arc<Handler>,
    policy: Mutex<RetryPolicy>,
    fifo: AtomicBool,
    /// Permits = messages that may be held (received, not settled).
    inflight: Arc<Semaphore>,
    /// Permits = handlers that may run.
    consume: Arc<Semaphore>,
    workers: Mutex<HashMap<QueueKey, Worker>>,
    /// Set (under the `workers` lock) when shutting down: no new receive loop.
    stopping: AtomicBool,
    counters: Counters,
}

/// A push consumer (see the module documentation).
pub struct PushConsumer {
    inner: Arc<Inner>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl PushConsumer {
    /// Starts consuming `topic` (messages passing `filter`) as a member of
    /// `group`: `handler` is called for every message, on a blocking thread.
    /// Returns once the Settings exchange is done (or `settings_wait` passed);
    /// queues come with the first assignment. Needs a Tokio runtime.
    pub async fn start(
        endpoints: &[String],
        group: &str,
        topic: &str,
        filter: Filter,
        options: PushConsumerOptions,
        handler: impl Fn(&Received) -> ConsumeResult + Send + Sync + 'static,
    ) -> Result<Self> {
        if group.is_empty() || topic.is_empty() {
            return Err(ClientError::Input("a push consumer needs a group and a topic".into()));
        }
        if options.consume_threads == 0 || options.max_inflight == 0 || options.batch_size == 0 {
            return Err(ClientError::Input("consume_threads, max_inflight and batch_size must be positive".into()));
        }
        let endpoints = Arc::new(Endpoints::new(endpoints)?);
        let inner = Arc::new(Inner {
            endpoints: endpoints.clone(),
            group: group.to_string(),
            topic: topic.to_string(),
            filter,
            inflight: Arc::new(Semaphore::new(options.max_inflight)),
            consume: Arc::new(Semaphore::new(options.consume_threads)),
            options,
            handler: Arc::new(handler),
            policy: Mutex::new(RetryPolicy::default()),
            fifo: AtomicBool::new(false),
            workers: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let (tx, rx) = mpsc::channel(64);
        let mut tasks = telemetry::spawn_sessions(endpoints, inner.settings(), tx, stopped.clone());
        let (settled_tx, mut settled_rx) = watch::channel(false);
        tasks.push(tokio::spawn(inner.clone().serve_telemetry(rx, settled_tx)));
        // The retry policy and FIFO mode come with the broker's reply.
        let wait = inner.options.settings_wait;
        if tokio::time::timeout(wait, settled_rx.wait_for(|s| *s)).await.is_err() {
            tracing::warn!(group, "no Settings reply from the broker in {wait:?}: default retry policy");
        }
        tasks.push(tokio::spawn(inner.clone().heartbeat_loop(stopped.clone())));
        tasks.push(tokio::spawn(inner.clone().assignment_loop(stopped)));
        Ok(Self { inner, shutdown: stop, tasks })
    }

    /// The `x-mq-client-id` this consumer sends.
    pub fn client_id(&self) -> &str {
        &self.inner.endpoints.client_id
    }

    /// The queues being consumed now, as (broker group, queue id).
    pub fn assigned(&self) -> Vec<(String, i32)> {
        let mut v: Vec<QueueKey> = lock(&self.inner.workers).keys().cloned().collect();
        v.sort();
        v
    }

    /// The retry policy in force (from the broker's Settings reply).
    pub fn retry_policy(&self) -> RetryPolicy {
        lock(&self.inner.policy).clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> PushStats {
        let c = &self.inner.counters;
        PushStats {
            received: c.received.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            settle_errors: c.settle_errors.load(Ordering::Relaxed),
        }
    }

    /// Stops receiving, waits up to `shutdown_timeout` for the messages in
    /// hand to be handled and settled, then sends NotifyClientTermination to
    /// every endpoint. Messages still unsettled come back to the group after
    /// their invisible time.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.send_replace(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let workers = self.inner.stop_workers();
        let inner = self.inner.clone();
        let drained = tokio::time::timeout(inner.options.shutdown_timeout, async {
            for w in workers {
                let _ = w.task.await;
            }
            // Every in-flight permit back = every message settled.
            let _all = inner.inflight.acquire_many(inner.options.max_inflight as u32).await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(group = %inner.group, "shutdown: messages still being handled; they will be redelivered");
        }
        inner.endpoints.notify_termination(resource(&inner.group), inner.options.request_timeout).await
    }
}

impl Drop for PushConsumer {
    /// Stops every loop (without NotifyClientTermination: use
    /// [`shutdown`](Self::shutdown) for a clean exit).
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.inner.stop_workers();
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The assignment as queue keys, deduplicated and sorted.
fn assignment_keys(assignments: &[pb::Assignment]) -> Vec<QueueKey> {
    let mut keys: Vec<QueueKey> = assignments
        .iter()
        .filter_map(|a| a.message_queue.as_ref())
        .map(|q| (q.broker.as_ref().map(|b| b.name.clone()).unwrap_or_default(), q.id))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// What changes between two assignments: (queues to start, queues to stop).
fn assignment_diff(current: &[QueueKey], wanted: &[QueueKey]) -> (Vec<QueueKey>, Vec<QueueKey>) {
    let start = wanted.iter().filter(|k| !current.contains(k)).cloned().collect();
    let stop = current.iter().filter(|k| !wanted.contains(k)).cloned().collect();
    (start, stop)
}

/// What to do with a message the handler failed: the backoff before the
/// next attempt, or `None` for the dead-letter queue.
fn on_failure(policy: &RetryPolicy, attempt: u32) -> Option<Duration> {
    if policy.exhausted(attempt) { None } else { Some(policy.delay(attempt)) }
}

impl Inner {
    /// Stops every receive loop (each finishes the messages it holds) and
    /// lets no new one start; returns them.
    fn stop_workers(&self) -> Vec<Worker> {
        let mut workers = lock(&self.workers);
        self.stopping.store(true, Ordering::SeqCst);
        let stopped: Vec<Worker> = workers.drain().map(|(_, w)| w).collect();
        for w in &stopped {
            w.stop.send_replace(true);
        }
        stopped
    }

    fn settings(&self) -> pb::Settings {
        pb::Settings {
            client_type: Some(pb::ClientType::PushConsumer as i32),
            access_point: Some(self.endpoints.access_point()),
            backoff_policy: None,
            request_timeout: Some(pb_duration(self.options.request_timeout)),
            pub_sub: Some(pb::settings::PubSub::Subscription(pb::Subscription {
                group: resource(&self.group),
                subscriptions: vec![pb::SubscriptionEntry {
                    topic: resource(&self.topic),
                    expression: Some(self.filter.to_pb()),
                }],
                fifo: None,
                receive_batch_size: Some(self.options.batch_size as i32),
                long_polling_timeout: Some(pb_duration(self.options.long_polling_timeout)),
                lite_subscription_quota: None,
                max_lite_topic_size: None,
            })),
            user_agent: Some(user_agent()),
            metric: Some(pb::Metric { on: false, endpoints: None }),
        }
    }

    /// Applies the broker's Settings replies; other commands are logged.
    async fn serve_telemetry(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<telemetry::Inbound>,
        settled: watch::Sender<bool>,
    ) {
        while let Some((endpoint, cmd)) = rx.recv().await {
            match cmd.command {
                Some(pb::telemetry_command::Command::Settings(s)) => {
                    if let Some(st) = &cmd.status
                        && st.code != pb::Code::Ok as i32
                    {
                        tracing::warn!(code = st.code, message = %st.message, "broker refused the consumer settings");
                        continue;
                    }
                    if let Some(p) = &s.backoff_policy {
                        let policy = RetryPolicy::from_pb(p);
                        tracing::debug!(endpoint, max_attempts = policy.max_attempts, "retry policy from the broker");
                        *lock(&self.policy) = policy;
                    }
                    if let Some(pb::settings::PubSub::Subscription(sub)) = &s.pub_sub
                        && let Some(fifo) = sub.fifo
                    {
                        self.fifo.store(fifo, Ordering::Relaxed);
                    }
                    settled.send_replace(true);
                }
                _ => tracing::debug!(endpoint, "telemetry command ignored by the push consumer"),
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        loop {
            for i in 0..self.endpoints.addrs.len() {
                let req = pb::HeartbeatRequest {
                    group: resource(&self.group),
                    client_type: pb::ClientType::PushConsumer as i32,
                };
                let mut c = self.endpoints.clients[i].clone();
                match tokio::time::timeout(self.options.request_timeout, c.heartbeat(req)).await {
                    Ok(Ok(r)) => {
                        if let Err(e) = check(r.into_inner().status) {
                            tracing::debug!(endpoint = %self.endpoints.addrs[i], error = %e, "heartbeat refused");
                        }
                    }
                    Ok(Err(s)) => {
                        tracing::debug!(endpoint = %self.endpoints.addrs[i], code = ?s.code(), "heartbeat failed")
                    }
                    Err(_) => tracing::debug!(endpoint = %self.endpoints.addrs[i], "heartbeat timed out"),
                }
            }
            if !sleep_or_shutdown(self.options.heartbeat_interval, &mut stopped).await {
                return;
            }
        }
    }

    async fn query_assignment(&self) -> Result<Vec<QueueKey>> {
        let req = pb::QueryAssignmentRequest {
            topic: resource(&self.topic),
            group: resource(&self.group),
            endpoints: Some(self.endpoints.access_point()),
        };
        let (_, r) = self
            .endpoints
            .unary(None, self.options.request_timeout, |mut c| {
                let req = req.clone();
                async move { c.query_assignment(req).await }
            })
            .await?;
        check(r.status)?;
        Ok(assignment_keys(&r.assignments))
    }

    async fn assignment_loop(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        loop {
            match self.query_assignment().await {
                Ok(wanted) => self.reconcile(&wanted),
                Err(e) => {
                    tracing::warn!(group = %self.group, topic = %self.topic, error = %e, "QueryAssignment failed")
                }
            }
            if !sleep_or_shutdown(self.options.assignment_interval, &mut stopped).await {
                return;
            }
        }
    }

    /// Starts receive loops for new queues, stops those of queues gone.
    fn reconcile(self: &Arc<Self>, wanted: &[QueueKey]) {
        let mut workers = lock(&self.workers);
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let current: Vec<QueueKey> = workers.keys().cloned().collect();
        let (start, stop) = assignment_diff(&current, wanted);
        for k in stop {
            if let Some(w) = workers.remove(&k) {
                tracing::info!(group = %self.group, broker = %k.0, queue = k.1, "queue unassigned");
                // The loop finishes the messages it holds, then ends.
                w.stop.send_replace(true);
            }
        }
        for k in start {
            tracing::info!(group = %self.group, broker = %k.0, queue = k.1, "queue assigned");
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(self.clone().receive_loop(k.clone(), stopped));
            workers.insert(k, Worker { stop, task });
        }
    }

    async fn receive_loop(self: Arc<Self>, (broker, queue): QueueKey, mut stopped: watch::Receiver<bool>) {
        let batch = (self.options.batch_size as usize).min(self.options.max_inflight).max(1);
        let mut failures = 0u32;
        loop {
            if *stopped.borrow() {
                return;
            }
            // Bounded in-flight: hold permits for a whole batch before asking.
            let permits = tokio::select! {
                p = self.inflight.clone().acquire_many_owned(batch as u32) => match p { Ok(p) => p, Err(_) => return },
                _ = stopped.changed() => return,
            };
            let args = ReceiveArgs {
                topic: &self.topic,
                broker: Some(&broker),
                queue,
                filter: &self.filter,
                batch: batch as u32,
                invisible: self.options.invisible_duration,
                wait: self.options.long_polling_timeout,
            };
            let got = tokio::select! {
                r = receive_raw(&self.endpoints, &self.group, args) => r,
                _ = stopped.changed() => return,
            };
            match got {
                Ok(messages) => {
                    failures = 0;
                    self.counters.received.fetch_add(messages.len() as u64, Ordering::Relaxed);
                    self.dispatch(messages, permits).await;
                }
                Err(e) => {
                    drop(permits);
                    failures += 1;
                    let wait = telemetry::next_backoff(Duration::from_millis(500) * failures.min(6));
                    tracing::warn!(group = %self.group, broker = %broker, queue, error = %e, "receive failed");
                    if !sleep_or_shutdown(wait, &mut stopped).await {
                        return;
                    }
                }
            }
        }
    }

    /// Hands messages to the handler: one task each (or in order, FIFO),
    /// each holding one in-flight permit until settled. Unused permits go
    /// back at once.
    async fn dispatch(self: &Arc<Self>, messages: Vec<Received>, mut permits: OwnedSemaphorePermit) {
        let fifo = self.fifo.load(Ordering::Relaxed);
        for m in messages {
            let Some(permit) = permits.split(1) else {
                // More messages than asked for: the handler still gets them.
                tracing::debug!("broker returned more messages than the batch size");
                self.clone().consume(m, None).await;
                continue;
            };
            if fifo {
                self.clone().consume(m, Some(permit)).await;
            } else {
                tokio::spawn(self.clone().consume(m, Some(permit)));
            }
        }
    }

    /// Runs the handler on a blocking thread and settles the message.
    async fn consume(self: Arc<Self>, m: Received, _inflight: Option<OwnedSemaphorePermit>) {
        let result = {
            let Ok(_slot) = self.consume.clone().acquire_owned().await else { return };
            let handler = self.handler.clone();
            let msg = m.clone();
            match tokio::task::spawn_blocking(move || handler(&msg)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(message_id = %m.message_id, error = %e, "handler panicked: counted as a failure");
                    ConsumeResult::Failure
                }
            }
        };
        self.settle(m, result).await;
    }

    /// Ack on success; on failure retry later or dead-letter. A settle call
    /// is tried up to three times (the message is redelivered anyway if all fail).
    async fn settle(&self, mut m: Received, result: ConsumeResult) {
        let c = &self.counters;
        let outcome = match result {
            ConsumeResult::Success => {
                let r = retry(|| ack_raw(&self.endpoints, &self.group, &m)).await;
                if r.is_ok() {
                    c.acked.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
            ConsumeResult::Failure => {
                let policy = lock(&self.policy).clone();
                match on_failure(&policy, m.delivery_attempt) {
                    Some(delay) => {
                        let mut tries = 0;
                        let r = loop {
                            tries += 1;
                            match change_invisible_raw(&self.endpoints, &self.group, &mut m, delay).await {
                                Err(e) if e.retryable() && tries < 3 => {
                                    tokio::time::sleep(Duration::from_millis(500)).await
                                }
                                r => break r,
                            }
                        };
                        if r.is_ok() {
                            c.retried.fetch_add(1, Ordering::Relaxed);
                        }
                        r
                    }
                    None => {
                        let r = retry(|| forward_dlq_raw(&self.endpoints, &self.group, &m, policy.max_attempts)).await;
                        if r.is_ok() {
                            tracing::info!(message_id = %m.message_id, attempt = m.delivery_attempt, "message dead-lettered");
                            c.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        }
                        r
                    }
                }
            }
        };
        if let Err(e) = outcome {
            c.settle_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(message_id = %m.message_id, ?result, error = %e, "settling a message failed");
        }
    }
}

/// Up to three tries of a call that fails retryably, 500 ms apart.
async fn retry<F, Fut>(mut call: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match call().await {
            Err(e) if e.retryable() && tries < 3 => tokio::time::sleep(Duration::from_millis(500)).await,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(broker: &str, id: i32) -> pb::Assignment {
        pb::Assignment {
            message_queue: Some(pb::MessageQueue {
                topic: resource("t"),
                id,
                broker: Some(pb::Broker { name: broker.into(), id: 0, endpoints: None }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn assignments_become_sorted_unique_keys() {
        let keys =
            assignment_keys(&[assignment("b", 1), assignment("a", 2), assignment("b", 1), pb::Assignment::default()]);
        assert_eq!(keys, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
    }

    #[test]
    fn assignment_changes() {
        let k = |b: &str, q: i32| (b.to_string(), q);
        let (start, stop) = assignment_diff(&[k("a", 0), k("a", 1)], &[k("a", 1), k("b", 0)]);
        assert_eq!(start, vec![k("b", 0)]);
        assert_eq!(stop, vec![k("a", 0)]);
        let (start, stop) = assignment_diff(&[k("a", 0)], &[]);
        assert!(start.is_empty());
        assert_eq!(stop, vec![k("a", 0)]);
    }

    #[test]
    fn failures_back_off_then_dead_letter() {
        let p = RetryPolicy::default();
        assert_eq!(on_failure(&p, 1), Some(Duration::from_secs(1)));
        assert_eq!(on_failure(&p, 3), Some(Duration::from_secs(10)));
        assert_eq!(on_failure(&p, 16), Some(Duration::from_secs(1800)));
        assert_eq!(on_failure(&p, 17), None);
        let p = RetryPolicy::from_pb(&pb::RetryPolicy { max_attempts: 2, strategy: None });
        assert_eq!(on_failure(&p, 1), Some(Duration::from_secs(1)));
        assert_eq!(on_failure(&p, 2), None);
    }

    #[tokio::test]
    async fn bad_options_are_refused() {
        let opts = PushConsumerOptions { consume_threads: 0, ..Default::default() };
        let r = PushConsumer::start(&["127.0.0.1:1".into()], "g", "t", Filter::all(), opts, |_| ConsumeResult::Success)
            .await;
        assert!(matches!(r, Err(ClientError::Input(_))));
        let r = PushConsumer::start(&["127.0.0.1:1".into()], "", "t", Filter::all(), Default::default(), |_| {
            ConsumeResult::Success
        })
        .await;
        assert!(matches!(r, Err(ClientError::Input(_))));
    }

    #[tokio::test]
    async fn starts_and_shuts_down_without_a_broker() {
        let opts = PushConsumerOptions {
            settings_wait: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let c = PushConsumer::start(&["127.0.0.1:1".into()], "g", "t", Filter::all(), opts, |_| ConsumeResult::Success)
            .await
            .unwrap();
        assert_eq!(c.retry_policy(), RetryPolicy::default());
        assert!(c.assigned().is_empty());
        assert_eq!(c.stats(), PushStats::default());
        // Nobody answers NotifyClientTermination.
        assert!(tokio::time::timeout(Duration::from_secs(10), c.shutdown()).await.unwrap().is_err());
    }
}
