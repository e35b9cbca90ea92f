//! The clients connected to this node, as far as this node needs to know:
//!
//! - Telemetry streams by client id (`x-mq-client-id`), with the client's
//!   type and topics from its Settings: orphaned half messages are checked
//!   back over a producer's stream ([`spawn_tasks`] listens for the
//!   check-backs the state machine applies);
//! - messages a push consumer holds: the broker renews their invisibility
//!   while the consumer is alive (like RocketMQ 5's proxy), up to
//!   `consumer.renew_max_ms`, without changing their receipt handles;
//! - when this node last recorded a consumer's heartbeat in the log (at
//!   most one entry per consumer every few seconds).
//!
//! This is node-local and soft: a client reconnecting elsewhere registers
//! there. What must survive a leader change (who consumes, what is in
//! flight) is in the replicated state.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use raftmq_proto::rocketmq as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::command;
use crate::command::Control;
use crate::command::TxId;
use crate::node::BrokerNode;

/// Header the official clients identify themselves with.
pub const CLIENT_ID_HEADER: &str = "x-mq-client-id";

/// How often a consumer's heartbeat goes into the log, at most.
const HEARTBEAT_RECORD_EVERY: Duration = Duration::from_secs(5);
/// Most clients remembered; the least recently seen go first.
const MAX_CLIENTS: usize = 100_000;

pub type TelemetryTx = mpsc::Sender<Result<pb::TelemetryCommand, Status>>;

struct Entry {
    client_type: i32,
    topics: Vec<String>,
    telemetry: Option<(u64, TelemetryTx)>,
    last_seen: Instant,
}

/// A message a push consumer holds, renewed by the broker.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub client_id: String,
    pub group: String,
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    pub pop_index: u64,
    pub invisible_ms: u64,
    pub visible_at_ms: u64,
    pub started_ms: u64,
}

#[derive(Default)]
pub struct Clients {
    entries: Mutex<HashMap<String, Entry>>,
    /// By receipt handle.
    renewals: Mutex<HashMap<String, Renewal>>,
    heartbeats: Mutex<HashMap<(String, String), Instant>>,
    next_stream: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops the least recently used half of a map that reached its bound.
fn bound<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, max: usize, at: impl Fn(&V) -> Instant) {
    if map.len() < max {
        return;
    }
    let mut ages: Vec<(Instant, K)> = map.iter().map(|(k, v)| (at(v), k.clone())).collect();
    ages.sort_by_key(|(t, _)| *t);
    for (_, k) in ages.into_iter().take(max / 2) {
        map.remove(&k);
    }
}

impl Clients {
    /// A client's Settings arrived on its Telemetry stream: returns the
    /// stream's id (for [`Clients::stream_closed`]).
    pub fn settings(&self, client_id: &str, s: &pb::Settings, tx: TelemetryTx) -> u64 {
        let topics = match &s.pub_sub {
            Some(pb::settings::PubSub::Publishing(p)) => p.topics.iter().map(|t| t.name.clone()).collect(),
            Some(pb::settings::PubSub::Subscription(sub)) => {
                sub.subscriptions.iter().filter_map(|e| e.topic.as_ref().map(|t| t.name.clone())).collect()
            }
            None => Vec::new(),
        };
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let mut entries = lock(&self.entries);
        bound(&mut entries, MAX_CLIENTS, |e| e.last_seen);
        entries.insert(
            client_id.to_string(),
            Entry {
                client_type: s.client_type.unwrap_or(0),
                topics,
                telemetry: Some((id, tx)),
                last_seen: Instant::now(),
            },
        );
        id
    }

    /// A Telemetry stream ended (unless the client opened a newer one).
    pub fn stream_closed(&self, client_id: &str, stream_id: u64) {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.get_mut(client_id)
            && e.telemetry.as_ref().is_some_and(|(id, _)| *id == stream_id)
        {
            e.telemetry = None;
        }
    }

    /// Any call from the client.
    pub fn seen(&self, client_id: &str, client_type: i32) {
        let mut entries = lock(&self.entries);
        match entries.get_mut(client_id) {
            Some(e) => {
                e.last_seen = Instant::now();
                if client_type != 0 {
                    e.client_type = client_type;
                }
            }
            None => {
                bound(&mut entries, MAX_CLIENTS, |e| e.last_seen);
                entries.insert(
                    client_id.to_string(),
                    Entry { client_type, topics: Vec::new(), telemetry: None, last_seen: Instant::now() },
                );
            }
        }
    }

    /// The client said goodbye.
    pub fn remove(&self, client_id: &str) {
        lock(&self.entries).remove(client_id);
        lock(&self.renewals).retain(|_, r| r.client_id != client_id);
    }

    pub fn client_type(&self, client_id: &str) -> Option<i32> {
        lock(&self.entries).get(client_id).map(|e| e.client_type)
    }

    fn alive(&self, client_id: &str, expire: Duration) -> bool {
        lock(&self.entries).get(client_id).is_some_and(|e| e.telemetry.is_some() || e.last_seen.elapsed() < expire)
    }

    /// Whether this heartbeat should go into the log now.
    pub fn should_record_heartbeat(&self, group: &str, client_id: &str) -> bool {
        let mut hb = lock(&self.heartbeats);
        let key = (group.to_string(), client_id.to_string());
        if hb.get(&key).is_some_and(|t| t.elapsed() < HEARTBEAT_RECORD_EVERY) {
            return false;
        }
        bound(&mut hb, MAX_CLIENTS, |t| *t);
        hb.insert(key, Instant::now());
        true
    }

    pub fn forget_heartbeat(&self, group: &str, client_id: &str) {
        lock(&self.heartbeats).remove(&(group.to_string(), client_id.to_string()));
    }

    /// Telemetry streams of producers publishing to `topic`.
    fn producers_of(&self, topic: &str) -> Vec<TelemetryTx> {
        lock(&self.entries)
            .values()
            .filter(|e| e.client_type == pb::ClientType::Producer as i32 && e.topics.iter().any(|t| t == topic))
            .filter_map(|e| e.telemetry.as_ref().map(|(_, tx)| tx.clone()))
            .collect()
    }

    /// Starts renewing a message a push consumer received.
    pub fn track(&self, handle: String, r: Renewal, max: usize) {
        let mut renewals = lock(&self.renewals);
        if renewals.len() >= max {
            tracing::warn!(max, "too many messages to renew; this one is not renewed");
            return;
        }
        renewals.insert(handle, r);
    }

    /// Stops renewing (acked, nacked, dead-lettered).
    pub fn untrack(&self, handle: &str) {
        lock(&self.renewals).remove(handle);
    }

    /// Renewals due at `now_ms` (a third of the invisible time left), after
    /// dropping those of dead clients and those renewed for too long.
    fn due_renewals(&self, now_ms: u64, renew_max_ms: u64, expire: Duration) -> Vec<(String, Renewal)> {
        let list: Vec<(String, Renewal)> = lock(&self.renewals).iter().map(|(h, r)| (h.clone(), r.clone())).collect();
        let mut due = Vec::new();
        for (h, r) in list {
            let stale = now_ms.saturating_sub(r.started_ms) > renew_max_ms || r.visible_at_ms < now_ms;
            if stale || !self.alive(&r.client_id, expire) {
                self.untrack(&h);
            } else if r.visible_at_ms.saturating_sub(now_ms) <= r.invisible_ms / 3 {
                due.push((h, r));
            }
        }
        due
    }

    fn renewed(&self, handle: &str, visible_at_ms: u64) {
        if let Some(r) = lock(&self.renewals).get_mut(handle) {
            r.visible_at_ms = visible_at_ms;
        }
    }
}

/// RocketMQ's AllocateMessageQueueAveragely: the indexes (into the sorted
/// queue list of length `n_queues`) of the queues of consumer `me` among the
/// sorted `consumers`. Every queue goes to exactly one consumer.
pub fn allocate_averagely(n_queues: usize, consumers: &[String], me: &str) -> Vec<usize> {
    let Some(index) = consumers.iter().position(|c| c == me) else { return Vec::new() };
    let n = consumers.len();
    if n_queues == 0 {
        return Vec::new();
    }
    let rem = n_queues % n;
    let size = if n_queues <= n {
        1
    } else if rem > 0 && index < rem {
        n_queues / n + 1
    } else {
        n_queues / n
    };
    let start = if rem > 0 && index < rem { index * size } else { index * size + rem };
    let range = size.min(n_queues.saturating_sub(start));
    (0..range).map(|i| (start + i) % n_queues).collect()
}

/// The wire form of a half message's transaction id: routes EndTransaction
/// to the group that holds it.
pub fn encode_tx(group: &str, tx: TxId) -> String {
    format!("{}.{}.{group}", tx.index, tx.slot)
}

pub fn decode_tx(s: &str) -> Option<(String, TxId)> {
    let mut it = s.splitn(3, '.');
    let index = it.next()?.parse().ok()?;
    let slot = it.next()?.parse().ok()?;
    let group = it.next().filter(|g| !g.is_empty())?.to_string();
    Some((group, TxId { index, slot }))
}

/// Starts this node's client tasks: transaction check-backs over
/// Telemetry, and invisibility renewal for push consumers.
pub fn spawn_tasks(node: Arc<BrokerNode>, clients: Arc<Clients>) {
    let mut checks = node.sm.tx_checks.subscribe();
    let (n, c) = (node.clone(), clients.clone());
    tokio::spawn(async move {
        loop {
            let txs = match checks.recv().await {
                Ok(txs) => txs,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                    tracing::warn!(missed = k, "transaction check-backs skipped; they come again next interval");
                    continue;
                }
                Err(_) => return,
            };
            for tx in txs {
                check_back(&n, &c, tx).await;
            }
        }
    });
    let weak = Arc::downgrade(&node);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            renew(&node, &clients).await;
        }
    });
}

/// Asks one producer of the half message's topic connected here to resolve it.
async fn check_back(node: &BrokerNode, clients: &Clients, tx: TxId) {
    let Some((held, stored)) = node.sm.half(&tx) else { return };
    let producers = clients.producers_of(&held.topic);
    if producers.is_empty() {
        return;
    }
    let pick = &producers[(tx.index as usize + tx.slot as usize) % producers.len()];
    let message =
        crate::messaging::to_v2_message(&stored, "", held.queue, 0, None, None, &node.config.advertised_addr());
    let cmd = pb::TelemetryCommand {
        status: Some(pb::Status { code: pb::Code::Ok as i32, message: "OK".into() }),
        command: Some(pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(
            pb::RecoverOrphanedTransactionCommand {
                message: Some(message),
                transaction_id: encode_tx(&node.config.broker_name, tx),
            },
        )),
    };
    tracing::info!(topic = %held.topic, message_id = %stored.message_id, "checking back an orphaned half message");
    if pick.try_send(Ok(cmd)).is_err() {
        tracing::debug!("a producer's telemetry stream is full or closed");
    }
}

/// One renewal pass.
async fn renew(node: &BrokerNode, clients: &Clients) {
    let settings = node.settings();
    let cfg = &settings.consumer;
    let now = crate::messaging::now_ms();
    let expire = Duration::from_millis(cfg.client_expire_ms);
    for (handle, r) in clients.due_renewals(now, cfg.renew_max_ms, expire) {
        let visible_at_ms = now + r.invisible_ms;
        let cmd = Control::Renew {
            group: r.group.clone(),
            topic: r.topic.clone(),
            queue: r.queue,
            offset: r.offset,
            pop_index: r.pop_index,
            visible_at_ms,
        };
        match node.propose(command::encode_control(&cmd)).await {
            Ok((command::Response::Done, _)) => clients.renewed(&handle, visible_at_ms),
            Ok(_) => clients.untrack(&handle),
            Err(e) => tracing::debug!(error = %e, "renewing a push consumer's message"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averagely_gives_every_queue_to_exactly_one_consumer() {
        for n_queues in 0..20 {
            for n in 1..8 {
                let consumers: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
                let mut seen = vec![0; n_queues];
                for c in &consumers {
                    for q in allocate_averagely(n_queues, &consumers, c) {
                        seen[q] += 1;
                    }
                }
                assert!(seen.iter().all(|s| *s == 1), "{n_queues} queues, {n} consumers: {seen:?}");
            }
        }
        // Java's example: 8 queues over 3 consumers -> 3, 3, 2.
        let c: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(allocate_averagely(8, &c, "a"), vec![0, 1, 2]);
        assert_eq!(allocate_averagely(8, &c, "c"), vec![6, 7]);
        assert!(allocate_averagely(8, &c, "stranger").is_empty());
    }

    #[test]
    fn transaction_ids_roundtrip() {
        let tx = TxId { index: 99, slot: 3 };
        assert_eq!(decode_tx(&encode_tx("broker-a", tx)), Some(("broker-a".to_string(), tx)));
        for bad in ["", "1", "1.2", "1.2.", "x.2.g", "1.-2.g"] {
            assert_eq!(decode_tx(bad), None, "{bad}");
        }
    }
}
