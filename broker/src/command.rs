//! Broker commands: what a Raft entry of a broker group says.
//!
//! Every state change is a command in the Raft log. Two encodings, told
//! apart by the first byte of the entry body:
//!
//! - `SEND` (1), a message batch, laid out so that every message's bytes
//!   sit at a known offset of the entry (the ConsumeQueue points at them):
//!   `1 | topic_len u16 | topic | queue_id u32 | count u32 | (len u32 | StoredMessage)*`
//! - `CONTROL` (2): a [`Control`] encoded with MessagePack.

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

use crate::error::BrokerError;

pub const SEND: u8 = 1;
pub const CONTROL: u8 = 2;

/// Commands other than message batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Control {
    CreateTopic {
        name: String,
        queues: u32,
        message_type: i32,
        update: bool,
    },
    DeleteTopic {
        name: String,
    },
    /// Take up to `max` messages of `queues` for `group`: first those whose
    /// invisibility expired, then new ones; they become invisible until
    /// `now_ms + invisible_ms`. `now_ms` is the proposer's clock, so every node
    /// applies the same result.
    ///
    /// Messages that do not pass `filter` are skipped (consumed for this
    /// group). A message whose delivery attempts reach the group's maximum
    /// (its config, else `max_attempts`) goes to `%DLQ%<group>` instead of
    /// being handed out again. In a FIFO group, a message group has at most
    /// one message in flight: the next waits until the previous is settled.
    Pop {
        group: String,
        topic: String,
        queues: Vec<u32>,
        max: u32,
        invisible_ms: u64,
        now_ms: u64,
        #[serde(default)]
        filter: Option<FilterSpec>,
        /// The broker's default maximum of delivery attempts.
        #[serde(default)]
        max_attempts: u32,
    },
    /// Moves delayed messages due at `now_ms` (at most [`MAX_MOVED`]) into
    /// their ConsumeQueues.
    Deliver {
        now_ms: u64,
    },
    /// Resolves a half (transactional) message: commit makes it visible
    /// (or delayed, when its delivery time is later), rollback discards it.
    EndTransaction {
        tx: TxId,
        commit: bool,
        now_ms: u64,
        /// The topic the producer names: a half message of another topic
        /// is refused (ACL permissions are per topic). Empty: not checked.
        #[serde(default)]
        topic: String,
    },
    /// Counts a check-back of every half message due for one at `now_ms`
    /// (the first `interval_ms` after it was stored, then every
    /// `interval_ms`); one already checked `max_checks` times is rolled back.
    CheckTransactions {
        now_ms: u64,
        interval_ms: u64,
        max_checks: u32,
    },
    /// Moves a popped message to `%DLQ%<group>` (the client gave up on it).
    ToDeadLetter {
        group: String,
        topic: String,
        queue: u32,
        offset: u64,
        pop_index: u64,
    },
    /// Hands dead letter `dlq_offset` of `group` back to the group: it is
    /// delivered again, from attempt 1.
    ResendDeadLetter {
        group: String,
        dlq_offset: u64,
    },
    /// Keeps a popped message invisible until `visible_at_ms` without
    /// changing its receipt handle (the broker renews for push consumers).
    Renew {
        group: String,
        topic: String,
        queue: u32,
        offset: u64,
        pop_index: u64,
        visible_at_ms: u64,
    },
    /// A consumer of `group` is alive at `now_ms` (queue assignment).
    ClientHeartbeat {
        group: String,
        client_id: String,
        now_ms: u64,
    },
    /// A consumer of `group` said goodbye.
    ClientGone {
        group: String,
        client_id: String,
    },
    /// Settle a popped message. `pop_index` is the log index of the Pop (or
    /// ChangeInvisible) that handed it out: a stale handle does nothing.
    Ack {
        group: String,
        topic: String,
        queue: u32,
        offset: u64,
        pop_index: u64,
    },
    ChangeInvisible {
        group: String,
        topic: String,
        queue: u32,
        offset: u64,
        pop_index: u64,
        invisible_ms: u64,
        now_ms: u64,
    },
    /// Set a group's committed offset (pull consumers).
    UpdateOffset {
        group: String,
        topic: String,
        queue: u32,
        offset: u64,
    },
    /// Create or replace a consumer group's configuration.
    UpdateGroup {
        config: GroupConf,
    },
    /// Remove a consumer group's configuration (its offsets stay).
    DeleteGroup {
        name: String,
    },
}

/// At most this many messages move per Deliver or CheckTransactions entry.
pub const MAX_MOVED: usize = 10_000;

/// A message filter as a consumer gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSpec {
    pub sql: bool,
    pub expression: String,
}

/// A half message: the log index of its send batch and its slot in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxId {
    pub index: u64,
    pub slot: u32,
}

/// Where a sent message goes when its batch is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Into its ConsumeQueue now.
    Queue,
    /// Held until its delivery time.
    Delayed,
    /// Held as a half message until its transaction is resolved.
    Half,
}

/// The one rule, used when applying and when answering the producer.
pub fn placement(m: &raftmq_proto::store::StoredMessage) -> Placement {
    if m.message_type == TRANSACTION_TYPE {
        Placement::Half
    } else if m.delivery_timestamp_ms > m.store_timestamp_ms {
        Placement::Delayed
    } else {
        Placement::Queue
    }
}

/// apache.rocketmq.v2.MessageType TRANSACTION.
pub const TRANSACTION_TYPE: i32 = 4;

/// A consumer group's configuration (RocketMQ's subscription group config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConf {
    pub name: String,
    /// Consumers may receive. Default: true.
    pub consume_enabled: bool,
    /// Delivery attempts before the dead-letter queue; 0: the broker default.
    pub max_delivery_attempts: u32,
    /// Consume FIFO topics in order.
    pub fifo: bool,
    pub broadcast_enabled: bool,
}

/// A message handed out by a Pop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Popped {
    pub queue: u32,
    pub offset: u64,
    /// 1 for the first delivery.
    pub attempt: u32,
}

/// The result of applying a command: the openraft response type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub enum Response {
    #[default]
    Done,
    /// Queue offsets given to a batch: `first_offset .. first_offset + count`.
    /// Messages already stored under the same message id in this topic (a
    /// producer retrying a send whose answer it lost) are not stored again:
    /// `duplicates` lists (slot in the batch, queue, offset of the copy kept).
    Sent {
        queue: u32,
        first_offset: u64,
        count: u32,
        #[serde(default)]
        duplicates: Vec<(u32, u32, u64)>,
    },
    /// Messages popped; their receipt handles carry this entry's log index.
    Popped { messages: Vec<Popped> },
    /// Orphaned half messages checked: the node that holds a producer's
    /// Telemetry stream asks it to resolve them.
    Checked { txs: Vec<TxId> },
    /// The command was refused when applied (the same on every node).
    Refused { code: RefusedCode, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusedCode {
    TopicNotFound,
    TopicExists,
    BadQueue,
    InvalidReceiptHandle,
    BadRequest,
    GroupNotFound,
    ConsumeDisabled,
    /// EndTransaction for a half message that is unknown or already resolved.
    TransactionNotFound,
    /// A filter expression that does not parse.
    BadFilter,
}

/// A message batch, decoded without copying message bytes.
#[derive(Debug, Clone)]
pub struct SendBatch {
    pub topic: String,
    pub queue: u32,
    /// (offset of the message bytes within the entry body, the bytes).
    pub messages: Vec<(u32, Bytes)>,
}

pub fn encode_send(topic: &str, queue: u32, messages: &[Vec<u8>]) -> Vec<u8> {
    let total: usize = messages.iter().map(|m| m.len() + 4).sum();
    let mut out = Vec::with_capacity(1 + 2 + topic.len() + 8 + total);
    out.push(SEND);
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&queue.to_le_bytes());
    out.extend_from_slice(&(messages.len() as u32).to_le_bytes());
    for m in messages {
        out.extend_from_slice(&(m.len() as u32).to_le_bytes());
        out.extend_from_slice(m);
    }
    out
}

pub fn encode_control(c: &Control) -> Vec<u8> {
    let mut out = vec![CONTROL];
    out.extend_from_slice(&rmp_serde::to_vec(c).expect("control encodes"));
    out
}

/// A decoded entry body.
#[derive(Debug, Clone)]
pub enum Command {
    Send(SendBatch),
    Control(Control),
}

fn bad(what: &str) -> BrokerError {
    BrokerError::Corrupt(format!("command: {what}"))
}

pub fn decode(body: &Bytes) -> Result<Command, BrokerError> {
    let b = &body[..];
    match b.first() {
        Some(&SEND) => {
            let mut at = 1usize;
            let take = |at: &mut usize, n: usize| -> Result<&[u8], BrokerError> {
                let s = b.get(*at..*at + n).ok_or_else(|| bad("truncated send batch"))?;
                *at += n;
                Ok(s)
            };
            let tlen = u16::from_le_bytes(take(&mut at, 2)?.try_into().expect("2")) as usize;
            let topic = std::str::from_utf8(take(&mut at, tlen)?).map_err(|_| bad("topic not UTF-8"))?.to_string();
            let queue = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4"));
            let count = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4")) as usize;
            if count > b.len() {
                return Err(bad("message count larger than the entry"));
            }
            let mut messages = Vec::with_capacity(count);
            for _ in 0..count {
                let len = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4")) as usize;
                let start = at;
                take(&mut at, len)?;
                messages.push((start as u32, body.slice(start..start + len)));
            }
            if at != b.len() {
                return Err(bad("trailing bytes after the send batch"));
            }
            Ok(Command::Send(SendBatch { topic, queue, messages }))
        }
        Some(&CONTROL) => {
            Ok(Command::Control(rmp_serde::from_slice(&b[1..]).map_err(|e| bad(&format!("control: {e}")))?))
        }
        Some(k) => Err(bad(&format!("unknown kind {k}"))),
        None => Err(bad("empty")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn control_roundtrip() {
        let c = Control::Ack { group: "g".into(), topic: "t".into(), queue: 3, offset: 9, pop_index: 77 };
        match decode(&Bytes::from(encode_control(&c))).unwrap() {
            Command::Control(d) => assert_eq!(d, c),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn send_roundtrip_offsets_point_at_messages(
            topic in "[a-zA-Z0-9_%-]{1,40}",
            queue in 0u32..64,
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        ) {
            let body = Bytes::from(encode_send(&topic, queue, &msgs));
            let Command::Send(b) = decode(&body).unwrap() else { panic!("not a send") };
            prop_assert_eq!(&b.topic, &topic);
            prop_assert_eq!(b.queue, queue);
            prop_assert_eq!(b.messages.len(), msgs.len());
            for ((off, bytes), m) in b.messages.iter().zip(&msgs) {
                prop_assert_eq!(&bytes[..], &m[..]);
                prop_assert_eq!(&body[*off as usize..*off as usize + m.len()], &m[..]);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
