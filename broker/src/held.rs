//! What the state machine holds besides ConsumeQueues and offsets:
//! delayed messages (until their delivery time), half messages (until their
//! transaction is resolved), where each dead letter came from, and the live
//! consumers of each group (queue assignment).
//!
//! Held messages stay where they were written in the CommitLog; only a
//! small record of where they are lives here. When one becomes visible, a
//! ConsumeQueue record pointing at the same bytes is appended: nothing is
//! copied.
//!
//! Every table is kept in memory and as RocksDB rows under its own prefix.
//! A change stages its row in `dirty`; the next checkpoint writes the staged
//! rows in the same batch as the applied log id. Snapshots carry the rows
//! ([`Held::rows`]) and loading goes through [`Held::load_row`], the same
//! path as opening the database.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use serde::Deserialize;
use serde::Serialize;

use crate::command::TxId;
use crate::error::BrokerError;
use crate::error::Result;

/// A message stored in the CommitLog but not (yet) in its ConsumeQueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMessage {
    pub topic: String,
    pub queue: u32,
    /// CommitLog position and size of the encoded message.
    pub pos: u64,
    pub size: u32,
    pub tag_hash: u64,
    pub store_ms: u64,
    /// 0 when it has none.
    pub delivery_ms: u64,
}

/// An unresolved transactional message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Half {
    pub msg: HeldMessage,
    /// Check-backs so far.
    pub checks: u32,
    /// Next check-back due; 0: `check interval` after `store_ms`.
    pub next_check_ms: u64,
}

/// Where a dead letter came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadOrigin {
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    pub attempts: u32,
}

const P_DELAYED: &[u8] = b"d/";
const P_HALF: &[u8] = b"x/";
const P_DEAD: &[u8] = b"l/";
const P_CLIENT: &[u8] = b"n/";

/// The RocksDB prefixes of the held tables.
pub const PREFIXES: [&[u8]; 4] = [P_DELAYED, P_HALF, P_DEAD, P_CLIENT];

/// A consumer not heard from for this long is forgotten for good when its
/// group's next heartbeat is applied (bounds the table).
const CLIENT_FORGET_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Default)]
pub struct Held {
    /// By (due time, id): the next due is first.
    pub delayed: BTreeMap<(u64, TxId), HeldMessage>,
    pub halves: BTreeMap<TxId, Half>,
    /// By (group, offset in `%DLQ%<group>`). Changed only through
    /// [`Held::put_dead`], [`Held::remove_dead`] and [`Held::load_row`],
    /// which keep `dead_origins` in step.
    pub dead: BTreeMap<(String, u64), DeadOrigin>,
    /// (group, topic, queue, offset, DLQ offset) of every dead letter: the
    /// admin query finds a message's dead letter without a scan of its
    /// group's.
    dead_origins: BTreeSet<(String, String, u32, u64, u64)>,
    /// (group, client id) -> last heartbeat, ms.
    pub clients: BTreeMap<(String, String), u64>,
    dirty: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("held state encodes")
}

fn dec<T: for<'de> Deserialize<'de>>(k: &[u8], v: &[u8]) -> Result<T> {
    rmp_serde::from_slice(v)
        .map_err(|e| BrokerError::Corrupt(format!("held row {:?}: {e}", String::from_utf8_lossy(k))))
}

fn tx_bytes(id: &TxId, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.index.to_be_bytes());
    out.extend_from_slice(&id.slot.to_be_bytes());
}

fn k_delayed(due_ms: u64, id: &TxId) -> Vec<u8> {
    let mut k = P_DELAYED.to_vec();
    k.extend_from_slice(&due_ms.to_be_bytes());
    tx_bytes(id, &mut k);
    k
}

fn k_half(id: &TxId) -> Vec<u8> {
    let mut k = P_HALF.to_vec();
    tx_bytes(id, &mut k);
    k
}

fn k_dead(group: &str, offset: u64) -> Vec<u8> {
    let mut k = P_DEAD.to_vec();
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

fn k_client(group: &str, client: &str) -> Vec<u8> {
    let mut k = P_CLIENT.to_vec();
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(client.as_bytes());
    k
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

fn be_tx(b: &[u8]) -> Option<TxId> {
    if b.len() != 12 {
        return None;
    }
    Some(TxId { index: be_u64(&b[..8])?, slot: u32::from_be_bytes(b[8..].try_into().ok()?) })
}

impl Held {
    pub fn put_delayed(&mut self, id: TxId, m: HeldMessage) {
        let due = m.delivery_ms;
        self.dirty.insert(k_delayed(due, &id), Some(enc(&m)));
        self.delayed.insert((due, id), m);
    }

    /// Removes and returns the delayed messages due at `now_ms`, oldest
    /// due first, at most `max`.
    pub fn take_due(&mut self, now_ms: u64, max: usize) -> Vec<(TxId, HeldMessage)> {
        let keys: Vec<(u64, TxId)> = self
            .delayed
            .range(..=(now_ms, TxId { index: u64::MAX, slot: u32::MAX }))
            .take(max)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                self.dirty.insert(k_delayed(k.0, &k.1), None);
                self.delayed.remove(&k).map(|m| (k.1, m))
            })
            .collect()
    }

    /// When the next delayed message is due.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.delayed.keys().next().map(|k| k.0)
    }

    pub fn put_half(&mut self, id: TxId, h: Half) {
        self.dirty.insert(k_half(&id), Some(enc(&h)));
        self.halves.insert(id, h);
    }

    pub fn remove_half(&mut self, id: &TxId) -> Option<Half> {
        let h = self.halves.remove(id)?;
        self.dirty.insert(k_half(id), None);
        Some(h)
    }

    /// When a half message is next due for a check-back.
    pub fn check_due_ms(h: &Half, interval_ms: u64) -> u64 {
        if h.next_check_ms == 0 { h.msg.store_ms.saturating_add(interval_ms) } else { h.next_check_ms }
    }

    pub fn put_dead(&mut self, group: &str, dlq_offset: u64, origin: DeadOrigin) {
        self.dirty.insert(k_dead(group, dlq_offset), Some(enc(&origin)));
        self.insert_dead(group.to_string(), dlq_offset, origin);
    }

    fn insert_dead(&mut self, group: String, dlq_offset: u64, origin: DeadOrigin) {
        self.dead_origins.insert((group.clone(), origin.topic.clone(), origin.queue, origin.offset, dlq_offset));
        if let Some(old) = self.dead.insert((group.clone(), dlq_offset), origin) {
            self.dead_origins.remove(&(group, old.topic, old.queue, old.offset, dlq_offset));
        }
    }

    pub fn remove_dead(&mut self, group: &str, dlq_offset: u64) -> Option<DeadOrigin> {
        let o = self.dead.remove(&(group.to_string(), dlq_offset))?;
        self.dead_origins.remove(&(group.to_string(), o.topic.clone(), o.queue, o.offset, dlq_offset));
        self.dirty.insert(k_dead(group, dlq_offset), None);
        Some(o)
    }

    /// The first dead letter (lowest DLQ offset) of `group` made from the
    /// message at `offset` of a topic's queue.
    pub fn dead_letter_of(&self, group: &str, topic: &str, queue: u32, offset: u64) -> Option<(u64, &DeadOrigin)> {
        let (g, t) = (group.to_string(), topic.to_string());
        let &(.., dlq_offset) = self
            .dead_origins
            .range((g.clone(), t.clone(), queue, offset, 0)..=(g.clone(), t, queue, offset, u64::MAX))
            .next()?;
        self.dead.get(&(g, dlq_offset)).map(|o| (dlq_offset, o))
    }

    /// Records a consumer's heartbeat, and forgets the group's consumers
    /// silent for 10 minutes.
    pub fn client_seen(&mut self, group: &str, client: &str, now_ms: u64) {
        let stale: Vec<(String, String)> = self
            .group_clients(group)
            .filter(|(_, seen)| seen.saturating_add(CLIENT_FORGET_MS) < now_ms)
            .map(|(c, _)| (group.to_string(), c.to_string()))
            .collect();
        for k in stale {
            self.dirty.insert(k_client(&k.0, &k.1), None);
            self.clients.remove(&k);
        }
        self.dirty.insert(k_client(group, client), Some(enc(&now_ms)));
        self.clients.insert((group.to_string(), client.to_string()), now_ms);
    }

    pub fn client_gone(&mut self, group: &str, client: &str) {
        if self.clients.remove(&(group.to_string(), client.to_string())).is_some() {
            self.dirty.insert(k_client(group, client), None);
        }
    }

    /// (client id, last heartbeat) of a group's consumers.
    pub fn group_clients<'a>(&'a self, group: &'a str) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        self.clients
            .range((group.to_string(), String::new())..)
            .take_while(move |((g, _), _)| g == group)
            .map(|((_, c), seen)| (c.as_str(), *seen))
    }

    /// The lowest log index a held message was written at: retention keeps
    /// the log from there.
    pub fn min_index(&self) -> Option<u64> {
        let d = self.delayed.keys().map(|(_, id)| id.index).min();
        let h = self.halves.keys().next().map(|id| id.index);
        d.into_iter().chain(h).min()
    }

    /// The rows changed since the last call: `None` deletes.
    pub fn take_dirty(&mut self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        std::mem::take(&mut self.dirty)
    }

    /// Every row, for a snapshot.
    pub fn rows(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        out.extend(self.delayed.iter().map(|((due, id), m)| (k_delayed(*due, id), enc(m))));
        out.extend(self.halves.iter().map(|(id, h)| (k_half(id), enc(h))));
        out.extend(self.dead.iter().map(|((g, o), d)| (k_dead(g, *o), enc(d))));
        out.extend(self.clients.iter().map(|((g, c), seen)| (k_client(g, c), enc(seen))));
        out
    }

    /// Loads one stored row (opening the database, or a snapshot).
    pub fn load_row(&mut self, k: &[u8], v: &[u8]) -> Result<()> {
        let bad = || BrokerError::Corrupt(format!("held row key {:?}", String::from_utf8_lossy(k)));
        let rest = &k[2.min(k.len())..];
        match k.get(..2) {
            Some(p) if p == P_DELAYED => {
                let due = rest.get(..8).and_then(be_u64).ok_or_else(bad)?;
                let id = rest.get(8..).and_then(be_tx).ok_or_else(bad)?;
                self.delayed.insert((due, id), dec(k, v)?);
            }
            Some(p) if p == P_HALF => {
                self.halves.insert(be_tx(rest).ok_or_else(bad)?, dec(k, v)?);
            }
            Some(p) if p == P_DEAD => {
                let split = rest.len().checked_sub(9).ok_or_else(bad)?;
                if rest[split] != 0 {
                    return Err(bad());
                }
                let group = String::from_utf8(rest[..split].to_vec()).map_err(|_| bad())?;
                let offset = be_u64(&rest[split + 1..]).ok_or_else(bad)?;
                self.insert_dead(group, offset, dec(k, v)?);
            }
            Some(p) if p == P_CLIENT => {
                let zero = rest.iter().position(|b| *b == 0).ok_or_else(bad)?;
                let group = String::from_utf8(rest[..zero].to_vec()).map_err(|_| bad())?;
                let client = String::from_utf8(rest[zero + 1..].to_vec()).map_err(|_| bad())?;
                self.clients.insert((group, client), dec(k, v)?);
            }
            _ => return Err(bad()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_s_dead_letter_is_found_by_its_origin() {
        let mut h = Held::default();
        let origin = |offset| DeadOrigin { topic: "t".into(), queue: 2, offset, attempts: 17 };
        h.put_dead("g", 4, origin(10));
        h.put_dead("g", 5, origin(11));
        h.put_dead("g", 9, origin(10)); // resent, then dead again
        h.put_dead("other", 1, origin(10));
        assert_eq!(h.dead_letter_of("g", "t", 2, 10).map(|(o, _)| o), Some(4), "the first one");
        assert_eq!(h.dead_letter_of("g", "t", 2, 11).map(|(o, _)| o), Some(5));
        assert_eq!(h.dead_letter_of("g", "t", 2, 12), None);
        assert_eq!(h.dead_letter_of("g", "u", 2, 10), None);
        assert_eq!(h.dead_letter_of("g", "t", 3, 10), None);
        h.remove_dead("g", 4);
        assert_eq!(h.dead_letter_of("g", "t", 2, 10).map(|(o, _)| o), Some(9));
        h.remove_dead("g", 9);
        assert_eq!(h.dead_letter_of("g", "t", 2, 10), None);
        assert_eq!(h.dead_letter_of("other", "t", 2, 10).map(|(o, _)| o), Some(1));
        // Overwriting a DLQ offset's origin moves its index entry too.
        h.put_dead("g", 5, origin(12));
        assert_eq!(h.dead_letter_of("g", "t", 2, 11), None);
        assert_eq!(h.dead_letter_of("g", "t", 2, 12).map(|(o, _)| o), Some(5));
    }

    fn msg(delivery_ms: u64) -> HeldMessage {
        HeldMessage { topic: "t".into(), queue: 1, pos: 7, size: 9, tag_hash: 3, store_ms: 100, delivery_ms }
    }

    #[test]
    fn rows_roundtrip_through_load_row() {
        let mut h = Held::default();
        h.put_delayed(TxId { index: 5, slot: 0 }, msg(900));
        h.put_delayed(TxId { index: 6, slot: 2 }, msg(300));
        h.put_half(TxId { index: 8, slot: 1 }, Half { msg: msg(0), checks: 2, next_check_ms: 77 });
        h.put_dead("g-1", 4, DeadOrigin { topic: "t".into(), queue: 2, offset: 10, attempts: 17 });
        h.client_seen("g-1", "c@1", 1000);
        let mut back = Held::default();
        for (k, v) in h.rows() {
            back.load_row(&k, &v).unwrap();
        }
        assert_eq!(back.delayed, h.delayed);
        assert_eq!(back.halves, h.halves);
        assert_eq!(back.dead, h.dead);
        assert_eq!(back.dead_origins, h.dead_origins);
        assert_eq!(back.clients, h.clients);
        // Staged rows are the same rows.
        let staged: Vec<(Vec<u8>, Vec<u8>)> =
            h.take_dirty().into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
        assert_eq!(staged.len(), h.rows().len());
    }

    #[test]
    fn due_messages_come_out_in_due_order_and_bounded() {
        let mut h = Held::default();
        for (i, due) in [500u64, 100, 300, 900].into_iter().enumerate() {
            h.put_delayed(TxId { index: i as u64, slot: 0 }, msg(due));
        }
        assert_eq!(h.next_due_ms(), Some(100));
        assert_eq!(h.min_index(), Some(0));
        let got: Vec<u64> = h.take_due(600, 2).into_iter().map(|(_, m)| m.delivery_ms).collect();
        assert_eq!(got, vec![100, 300]);
        let got: Vec<u64> = h.take_due(600, 10).into_iter().map(|(_, m)| m.delivery_ms).collect();
        assert_eq!(got, vec![500]);
        assert_eq!(h.next_due_ms(), Some(900));
    }

    #[test]
    fn silent_clients_are_forgotten_and_groups_do_not_mix() {
        let mut h = Held::default();
        h.client_seen("g", "old", 0);
        h.client_seen("g2", "other", 0);
        h.client_seen("g", "new", CLIENT_FORGET_MS + 1);
        let g: Vec<&str> = h.group_clients("g").map(|(c, _)| c).collect();
        assert_eq!(g, vec!["new"]);
        assert_eq!(h.group_clients("g2").count(), 1);
    }

    #[test]
    fn garbage_rows_are_errors() {
        let mut h = Held::default();
        for k in [&b"d/"[..], b"x/123", b"l/g", b"n/nozero", b"zz"] {
            assert!(h.load_row(k, b"").is_err(), "{k:?}");
        }
    }
}
