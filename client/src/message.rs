//! Messages going out ([`OutMessage`]) and coming in ([`Received`]).

use std::collections::HashMap;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use raftmq_proto::rocketmq as pb;

use crate::ClientError;
use crate::Result;
use crate::backoff::delay_level;
use crate::now_ms;
use crate::pb_timestamp_ms;
use crate::resource;
use crate::timestamp_ms;

/// When a delay message becomes deliverable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// At this time.
    At(SystemTime),
    /// This long after the send.
    After(Duration),
    /// RocketMQ delay level 1..=18 (1s … 2h, see [`crate::DELAY_LEVELS`]);
    /// anything else fails the send.
    Level(u32),
}

impl Delivery {
    /// The delivery time in Unix milliseconds, for a send at `now_ms`.
    pub fn timestamp_ms(&self, now_ms: i64) -> Result<i64> {
        Ok(match self {
            Delivery::At(t) => t
                .duration_since(UNIX_EPOCH)
                .map_err(|_| ClientError::Input("delivery time before 1970".into()))?
                .as_millis() as i64,
            Delivery::After(d) => now_ms.saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
            Delivery::Level(l) => now_ms + delay_level(*l)?.as_millis() as i64,
        })
    }
}

/// A message to send.
#[derive(Debug, Clone, Default)]
pub struct OutMessage {
    /// The payload.
    pub body: Vec<u8>,
    /// One tag (consumers filter by it).
    pub tag: Option<String>,
    /// Keys the message can be looked up by.
    pub keys: Vec<String>,
    /// User properties (SQL filters read them).
    pub properties: HashMap<String, String>,
    /// FIFO message group: the message type is FIFO.
    pub message_group: Option<String>,
    /// Delay message: the message type is DELAY.
    pub delivery: Option<Delivery>,
}

impl OutMessage {
    /// A message with this body and nothing else.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Self { body: body.into(), ..Default::default() }
    }

    /// Sets the tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Adds a key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Sets a user property.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Makes it a FIFO message of this message group.
    pub fn message_group(mut self, group: impl Into<String>) -> Self {
        self.message_group = Some(group.into());
        self
    }

    /// Makes it a delay message delivered at `at`.
    pub fn deliver_at(mut self, at: SystemTime) -> Self {
        self.delivery = Some(Delivery::At(at));
        self
    }

    /// Makes it a delay message delivered `delay` after the send.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delivery = Some(Delivery::After(delay));
        self
    }

    /// Makes it a delay message of RocketMQ delay level `level` (1..=18:
    /// 1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h). Out of
    /// range fails at send.
    pub fn delay_level(mut self, level: u32) -> Self {
        self.delivery = Some(Delivery::Level(level));
        self
    }

    /// The message type this message is sent as (`transactional`: a half
    /// message of a transaction). A message is one of NORMAL, FIFO, DELAY,
    /// TRANSACTION: combinations are refused.
    pub(crate) fn message_type(&self, transactional: bool) -> Result<pb::MessageType> {
        match (transactional, &self.message_group, &self.delivery) {
            (true, None, None) => Ok(pb::MessageType::Transaction),
            (true, _, _) => {
                Err(ClientError::Input("a transactional message cannot have a message group or a delivery time".into()))
            }
            (false, Some(_), Some(_)) => {
                Err(ClientError::Input("a message is FIFO (message group) or DELAY, not both".into()))
            }
            (false, Some(g), None) if g.is_empty() => Err(ClientError::Input("empty message group".into())),
            (false, Some(_), None) => Ok(pb::MessageType::Fifo),
            (false, None, Some(_)) => Ok(pb::MessageType::Delay),
            (false, None, None) => Ok(pb::MessageType::Normal),
        }
    }

    /// The message on the wire.
    pub(crate) fn to_pb(
        &self,
        topic: &str,
        message_id: String,
        born_host: &str,
        transactional: bool,
    ) -> Result<pb::Message> {
        let now = now_ms();
        let message_type = self.message_type(transactional)?;
        let delivery_timestamp = match &self.delivery {
            Some(d) => Some(pb_timestamp_ms(d.timestamp_ms(now)?)),
            None => None,
        };
        Ok(pb::Message {
            topic: resource(topic),
            user_properties: self.properties.clone(),
            system_properties: Some(pb::SystemProperties {
                tag: self.tag.clone(),
                keys: self.keys.clone(),
                message_id,
                body_encoding: pb::Encoding::Identity as i32,
                message_type: message_type as i32,
                born_timestamp: Some(pb_timestamp_ms(now)),
                born_host: born_host.to_string(),
                message_group: self.message_group.clone(),
                delivery_timestamp,
                ..Default::default()
            }),
            body: self.body.clone(),
        })
    }
}

/// What the broker answered for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// The message id (made by the client).
    pub message_id: String,
    /// Its offset in its queue.
    pub offset: u64,
    /// For a transactional (half) message: the id to end the transaction with.
    pub transaction_id: String,
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    /// The topic it was sent to.
    pub topic: String,
    /// The id the producer gave it.
    pub message_id: String,
    /// Its queue and offset.
    pub queue: u32,
    pub offset: u64,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    /// User properties.
    pub properties: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The handle to ack or change invisibility with (popped messages).
    pub receipt_handle: String,
    /// 1 on the first delivery.
    pub delivery_attempt: u32,
    pub store_timestamp_ms: i64,
    pub born_timestamp_ms: i64,
    /// FIFO message group, if any.
    pub message_group: Option<String>,
    /// Delay messages: when it was due.
    pub delivery_timestamp_ms: Option<i64>,
    /// `apache.rocketmq.v2.MessageType` as a number (1 NORMAL, 2 FIFO, 3 DELAY, 4 TRANSACTION).
    pub message_type: i32,
    /// Upper-case hex CRC32 of the body as sent by the broker.
    pub body_crc32: String,
    /// The endpoint it came from (acks go there).
    pub(crate) endpoint: usize,
}

/// A message from the broker, received through endpoint `endpoint`.
pub(crate) fn received(m: pb::Message, endpoint: usize) -> Received {
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
        store_timestamp_ms: sp.store_timestamp.as_ref().map(timestamp_ms).unwrap_or(0),
        born_timestamp_ms: sp.born_timestamp.as_ref().map(timestamp_ms).unwrap_or(0),
        message_group: sp.message_group,
        delivery_timestamp_ms: sp.delivery_timestamp.as_ref().map(timestamp_ms),
        message_type: sp.message_type,
        body_crc32: sp.body_digest.map(|d| d.checksum).unwrap_or_default(),
        endpoint,
    }
}

/// The name of a RocketMQ message type (1 NORMAL, 2 FIFO, 3 DELAY,
/// 4 TRANSACTION), as the CLI and the console show it.
pub fn message_type_name(t: i32) -> &'static str {
    match t {
        2 => "FIFO",
        3 => "DELAY",
        4 => "TRANSACTION",
        _ => "NORMAL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_types() {
        let m = OutMessage::new("x");
        assert_eq!(m.message_type(false).unwrap(), pb::MessageType::Normal);
        assert_eq!(m.message_type(true).unwrap(), pb::MessageType::Transaction);
        assert_eq!(m.clone().message_group("g").message_type(false).unwrap(), pb::MessageType::Fifo);
        assert_eq!(m.clone().delay_level(3).message_type(false).unwrap(), pb::MessageType::Delay);
        assert!(m.clone().message_group("g").delay(Duration::from_secs(1)).message_type(false).is_err());
        assert!(m.clone().message_group("g").message_type(true).is_err());
        assert!(m.clone().message_group("").message_type(false).is_err());
    }

    #[test]
    fn delivery_timestamps() {
        let now = 1_000_000;
        assert_eq!(Delivery::After(Duration::from_millis(1500)).timestamp_ms(now).unwrap(), now + 1500);
        assert_eq!(Delivery::Level(1).timestamp_ms(now).unwrap(), now + 1000);
        assert_eq!(Delivery::Level(18).timestamp_ms(now).unwrap(), now + 7_200_000);
        assert!(Delivery::Level(0).timestamp_ms(now).is_err());
        assert!(Delivery::Level(19).timestamp_ms(now).is_err());
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(Delivery::At(at).timestamp_ms(now).unwrap(), 1_700_000_000_123);
    }

    #[test]
    fn delay_message_on_the_wire() {
        let m = OutMessage::new("x").with_tag("t").with_key("k").delay(Duration::from_secs(10));
        let p = m.to_pb("topic", "ID".into(), "host", false).unwrap();
        let sp = p.system_properties.unwrap();
        assert_eq!(sp.message_type, pb::MessageType::Delay as i32);
        let due = timestamp_ms(&sp.delivery_timestamp.unwrap());
        let born = timestamp_ms(&sp.born_timestamp.unwrap());
        assert_eq!(due - born, 10_000);
        assert_eq!(sp.tag.as_deref(), Some("t"));
        assert_eq!(sp.keys, vec!["k".to_string()]);
        assert!(OutMessage::new("x").delay_level(19).to_pb("t", "ID".into(), "h", false).is_err());
        let fifo = OutMessage::new("x").message_group("g").to_pb("t", "ID".into(), "h", false).unwrap();
        let sp = fifo.system_properties.unwrap();
        assert_eq!(sp.message_type, pb::MessageType::Fifo as i32);
        assert_eq!(sp.message_group.as_deref(), Some("g"));
        assert!(sp.delivery_timestamp.is_none());
    }
}
