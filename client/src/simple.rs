//! [`SimpleConsumer`], and the receive / ack / nack / dead-letter calls the
//! push consumer shares with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raftmq_proto::rocketmq as pb;

use crate::ClientError;
use crate::Endpoints;
use crate::Result;
use crate::backoff::DEFAULT_MAX_ATTEMPTS;
use crate::backoff::consumer_backoff;
use crate::check;
use crate::check_stream_status;
use crate::filter::Filter;
use crate::message::Received;
use crate::message::received;
use crate::pb_duration;
use crate::resource;
use crate::transport;

/// Timeout of the unary consumer calls (ack, change invisibility, DLQ).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One ReceiveMessage call.
pub(crate) struct ReceiveArgs<'a> {
    pub topic: &'a str,
    /// Broker group of the queue (`None`: the group of the endpoint).
    pub broker: Option<&'a str>,
    /// Queue id, -1 for any queue of that group.
    pub queue: i32,
    pub filter: &'a Filter,
    pub batch: u32,
    /// `None`: the broker picks it and renews it while the consumer lives
    /// (push consumers, `auto_renew`).
    pub invisible: Option<Duration>,
    pub wait: Duration,
}

/// Receives from one queue (or any queue of a group) with long polling.
pub(crate) async fn receive_raw(endpoints: &Endpoints, group: &str, a: ReceiveArgs<'_>) -> Result<Vec<Received>> {
    let i = endpoints.pick();
    let mut c = endpoints.clients[i].clone();
    let req = pb::ReceiveMessageRequest {
        group: resource(group),
        message_queue: Some(pb::MessageQueue {
            topic: resource(a.topic),
            id: a.queue,
            broker: a.broker.map(|b| pb::Broker { name: b.to_string(), id: 0, endpoints: None }),
            ..Default::default()
        }),
        filter_expression: Some(a.filter.to_pb()),
        batch_size: a.batch.max(1) as i32,
        invisible_duration: a.invisible.map(pb_duration),
        auto_renew: a.invisible.is_none(),
        long_polling_timeout: Some(pb_duration(a.wait)),
        attempt_id: None,
    };
    let mut r = tonic::Request::new(req);
    r.set_timeout(a.wait + Duration::from_secs(10));
    let mut stream = match c.receive_message(r).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            endpoints.failed(i);
            return Err(transport(&endpoints.addrs[i], s));
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
                endpoints.failed(i);
                return Err(transport(&endpoints.addrs[i], s));
            }
        }
    }
    endpoints.succeeded(i);
    Ok(out)
}

/// Acks at the node the message came from (another one if it is down).
pub(crate) async fn ack_raw(endpoints: &Endpoints, group: &str, m: &Received) -> Result<()> {
    let req = pb::AckMessageRequest {
        group: resource(group),
        topic: resource(&m.topic),
        entries: vec![pb::AckMessageEntry {
            message_id: m.message_id.clone(),
            receipt_handle: m.receipt_handle.clone(),
            lite_topic: None,
        }],
    };
    let (_, resp) = endpoints
        .unary(Some(m.endpoint), CALL_TIMEOUT, |mut c| {
            let req = req.clone();
            async move { c.ack_message(req).await }
        })
        .await?;
    check(resp.status)?;
    for e in resp.entries {
        if e.status.is_some() {
            check(e.status)?;
        }
    }
    Ok(())
}

/// ChangeInvisibleDuration; `m` gets the new receipt handle.
pub(crate) async fn change_invisible_raw(
    endpoints: &Endpoints,
    group: &str,
    m: &mut Received,
    invisible: Duration,
) -> Result<()> {
    let req = pb::ChangeInvisibleDurationRequest {
        group: resource(group),
        topic: resource(&m.topic),
        receipt_handle: m.receipt_handle.clone(),
        invisible_duration: Some(pb_duration(invisible)),
        message_id: m.message_id.clone(),
        lite_topic: None,
        suspend: None,
    };
    let (_, resp) = endpoints
        .unary(Some(m.endpoint), CALL_TIMEOUT, |mut c| {
            let req = req.clone();
            async move { c.change_invisible_duration(req).await }
        })
        .await?;
    check(resp.status)?;
    if resp.receipt_handle.is_empty() {
        return Err(ClientError::Broker {
            code: 0,
            message: "ChangeInvisibleDuration without a receipt handle".into(),
        });
    }
    m.receipt_handle = resp.receipt_handle;
    Ok(())
}

/// ForwardMessageToDeadLetterQueue: the message goes to `%DLQ%<group>`.
pub(crate) async fn forward_dlq_raw(endpoints: &Endpoints, group: &str, m: &Received, max_attempts: u32) -> Result<()> {
    let req = pb::ForwardMessageToDeadLetterQueueRequest {
        group: resource(group),
        topic: resource(&m.topic),
        receipt_handle: m.receipt_handle.clone(),
        message_id: m.message_id.clone(),
        delivery_attempt: m.delivery_attempt as i32,
        max_delivery_attempts: max_attempts as i32,
        lite_topic: None,
    };
    let (_, resp) = endpoints
        .unary(Some(m.endpoint), CALL_TIMEOUT, |mut c| {
            let req = req.clone();
            async move { c.forward_message_to_dead_letter_queue(req).await }
        })
        .await?;
    check(resp.status)
}

/// Receives messages of a consumer group; each one is invisible to others
/// until acked or until its invisible duration passes (then redelivered).
#[derive(Clone)]
pub struct SimpleConsumer {
    endpoints: Arc<Endpoints>,
    group: String,
    /// Topic -> filter ([`subscribe`](Self::subscribe)); every message otherwise.
    filters: Arc<Mutex<HashMap<String, Filter>>>,
}

impl SimpleConsumer {
    /// A consumer of `group` at these nodes; connects lazily.
    pub fn new(endpoints: &[String], group: &str) -> Result<Self> {
        Ok(Self {
            endpoints: Arc::new(Endpoints::new(endpoints)?),
            group: group.to_string(),
            filters: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The `x-mq-client-id` this consumer sends.
    pub fn client_id(&self) -> &str {
        &self.endpoints.client_id
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Receives only messages of `topic` that pass `filter` (sent with every
    /// receive as `filter_expression`). Replaces an earlier filter.
    pub fn subscribe(&self, topic: &str, filter: Filter) {
        self.filters.lock().unwrap_or_else(|e| e.into_inner()).insert(topic.to_string(), filter);
    }

    /// Builder form of [`subscribe`](Self::subscribe).
    pub fn with_filter(self, topic: &str, filter: Filter) -> Self {
        self.subscribe(topic, filter);
        self
    }

    fn filter(&self, topic: &str) -> Filter {
        self.filters.lock().unwrap_or_else(|e| e.into_inner()).get(topic).cloned().unwrap_or_default()
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
        let filter = self.filter(topic);
        let args = ReceiveArgs {
            topic,
            broker,
            queue: queue.map(|q| q as i32).unwrap_or(-1),
            filter: &filter,
            batch: max,
            invisible: Some(invisible),
            wait,
        };
        receive_raw(&self.endpoints, &self.group, args).await
    }

    /// Acknowledges a received message (at the node it came from).
    pub async fn ack(&self, m: &Received) -> Result<()> {
        ack_raw(&self.endpoints, &self.group, m).await
    }

    /// Changes when the message becomes visible again; `m` gets the new
    /// receipt handle (ack with it).
    pub async fn change_invisible_duration(&self, m: &mut Received, invisible: Duration) -> Result<()> {
        change_invisible_raw(&self.endpoints, &self.group, m, invisible).await
    }

    /// Gives a message back for a later retry: it becomes visible again after
    /// `delay`, or, with `None`, after RocketMQ's consumer backoff for its
    /// delivery attempt (1s 5s 10s 30s 1m … 2h, see [`consumer_backoff`]).
    /// `m` gets the new receipt handle. Returns the delay used.
    pub async fn nack(&self, m: &mut Received, delay: Option<Duration>) -> Result<Duration> {
        let d = delay.unwrap_or_else(|| consumer_backoff(m.delivery_attempt));
        self.change_invisible_duration(m, d).await?;
        Ok(d)
    }

    /// Moves the message to the group's dead-letter queue (`%DLQ%<group>`)
    /// now, whatever its delivery attempt.
    pub async fn forward_to_dead_letter(&self, m: &Received) -> Result<()> {
        forward_dlq_raw(&self.endpoints, &self.group, m, DEFAULT_MAX_ATTEMPTS.max(m.delivery_attempt)).await
    }
}
