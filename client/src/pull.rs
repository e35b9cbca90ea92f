//! [`PullConsumer`]: reads queues by offset.

use std::sync::Arc;
use std::time::Duration;

use raftmq_proto::rocketmq as pb;

use crate::Endpoints;
use crate::QueueRef;
use crate::Result;
use crate::allocate;
use crate::check;
use crate::check_stream_status;
use crate::filter::Filter;
use crate::message::Received;
use crate::message::received;
use crate::pb_duration;
use crate::resource;
use crate::transport;

/// Reads queues by offset; the application keeps or commits its offsets.
#[derive(Clone)]
pub struct PullConsumer {
    endpoints: Arc<Endpoints>,
    group: String,
}

fn mq_of(topic: &str, q: &QueueRef) -> Option<pb::MessageQueue> {
    Some(pb::MessageQueue {
        topic: resource(topic),
        id: q.queue as i32,
        broker: Some(pb::Broker { name: q.broker.clone(), id: 0, endpoints: None }),
        ..Default::default()
    })
}

impl PullConsumer {
    /// A consumer of `group` at these nodes; connects lazily.
    pub fn new(endpoints: &[String], group: &str) -> Result<Self> {
        Ok(Self { endpoints: Arc::new(Endpoints::new(endpoints)?), group: group.to_string() })
    }

    /// The `x-mq-client-id` this consumer sends.
    pub fn client_id(&self) -> &str {
        &self.endpoints.client_id
    }

    fn mq(topic: &str, queue: u32) -> Option<pb::MessageQueue> {
        Some(pb::MessageQueue { topic: resource(topic), id: queue as i32, ..Default::default() })
    }

    /// Every queue of `topic`, in every broker group.
    pub async fn queues(&self, topic: &str) -> Result<Vec<QueueRef>> {
        self.endpoints.route(topic).await
    }

    /// The queues of `topic` this consumer should read when the consumers
    /// `all_consumers` (ids, including `me`) share the group, by one of
    /// RocketMQ's classic allocation strategies (see [`allocate`]).
    pub async fn allocated_queues(
        &self,
        topic: &str,
        strategy: &allocate::Strategy,
        me: &str,
        all_consumers: &[String],
    ) -> Result<Vec<QueueRef>> {
        let queues = self.queues(topic).await?;
        Ok(allocate::allocate_in_topic(strategy, &self.group, topic, me, all_consumers, &queues))
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
        self.pull_mq(mq_of(topic, q), offset, max, wait, None).await
    }

    /// Like [`pull_queue`](Self::pull_queue), with a filter sent as the
    /// request's `filter_expression`.
    pub async fn pull_queue_filtered(
        &self,
        topic: &str,
        q: &QueueRef,
        offset: u64,
        max: u32,
        wait: Duration,
        filter: &Filter,
    ) -> Result<(Vec<Received>, u64)> {
        self.pull_mq(mq_of(topic, q), offset, max, wait, Some(filter.to_pb())).await
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
        self.pull_mq(Self::mq(topic, queue), offset, max, wait, None).await
    }

    async fn pull_mq(
        &self,
        mq: Option<pb::MessageQueue>,
        offset: u64,
        max: u32,
        wait: Duration,
        filter_expression: Option<pb::FilterExpression>,
    ) -> Result<(Vec<Received>, u64)> {
        let i = self.endpoints.pick();
        let mut c = self.endpoints.clients[i].clone();
        let req = pb::PullMessageRequest {
            group: resource(&self.group),
            message_queue: mq,
            offset: offset as i64,
            batch_size: max as i32,
            filter_expression,
            long_polling_timeout: Some(pb_duration(wait)),
        };
        let mut r = tonic::Request::new(req);
        r.set_timeout(wait + Duration::from_secs(10));
        let mut stream = match c.pull_message(r).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                self.endpoints.failed(i);
                return Err(transport(&self.endpoints.addrs[i], s));
            }
        };
        let (mut out, mut next) = (Vec::new(), offset);
        while let Some(resp) = stream.message().await.map_err(|s| transport(&self.endpoints.addrs[i], s))? {
            match resp.content {
                Some(pb::pull_message_response::Content::Status(s)) => check_stream_status(s)?,
                Some(pb::pull_message_response::Content::Message(m)) => out.push(received(m, i)),
                Some(pb::pull_message_response::Content::NextOffset(n)) => next = n.max(0) as u64,
                None => {}
            }
        }
        self.endpoints.succeeded(i);
        Ok((out, next))
    }

    /// The first offset still stored in a queue (QueryOffset BEGINNING).
    pub async fn min_offset(&self, topic: &str, q: &QueueRef) -> Result<u64> {
        self.query_offset(topic, q, pb::QueryOffsetPolicy::Beginning).await
    }

    /// The offset after the last message of a queue (QueryOffset END).
    pub async fn max_offset(&self, topic: &str, q: &QueueRef) -> Result<u64> {
        self.query_offset(topic, q, pb::QueryOffsetPolicy::End).await
    }

    async fn query_offset(&self, topic: &str, q: &QueueRef, policy: pb::QueryOffsetPolicy) -> Result<u64> {
        let req = pb::QueryOffsetRequest {
            message_queue: mq_of(topic, q),
            query_offset_policy: policy as i32,
            timestamp: None,
        };
        let (_, r) = self
            .endpoints
            .unary(None, Duration::from_secs(10), |mut c| {
                let req = req.clone();
                async move { c.query_offset(req).await }
            })
            .await?;
        check(r.status)?;
        Ok(r.offset.max(0) as u64)
    }

    /// Stores the group's offset of a queue (of the endpoint's group).
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

    /// The group's stored offset of a queue (of the endpoint's group).
    pub async fn committed(&self, topic: &str, queue: u32) -> Result<u64> {
        let i = self.endpoints.pick();
        let mut c = self.endpoints.clients[i].clone();
        let req = pb::GetOffsetRequest { group: resource(&self.group), message_queue: Self::mq(topic, queue) };
        let r = c.get_offset(req).await.map_err(|s| transport(&self.endpoints.addrs[i], s))?.into_inner();
        check(r.status)?;
        Ok(r.offset.max(0) as u64)
    }
}
