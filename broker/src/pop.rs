//! Which messages of one queue a Pop hands to a consumer group: pure
//! selection over the group's state on that queue, applied the same way on
//! every node (the state machine runs it when applying a Pop, and dry-runs
//! it to know whether a Pop would do anything).
//!
//! Order of business:
//! 1. in-flight messages whose invisibility expired: handed out again with
//!    attempt + 1, or, when their attempts reached the maximum, given up on
//!    (the caller moves them to the dead-letter queue);
//! 2. in FIFO mode, messages passed over earlier because their message
//!    group had one in flight (`held`), in offset order;
//! 3. new messages from `pop_offset`: those the filter rejects are skipped
//!    (consumed for this group); in FIFO mode one whose message group has a
//!    message in flight is held.
//!
//! FIFO: a message group has at most one message in flight; different
//! message groups of the queue proceed in parallel. Messages without a
//! message group are not ordered.

use std::collections::BTreeSet;
use std::collections::HashSet;

use crate::command::Popped;
use crate::sm::GroupQueue;
use crate::sm::Inflight;

/// New messages looked at per queue per Pop, at most.
pub const SCAN_LIMIT: u64 = 4096;
/// Messages a FIFO group may hold back per queue, at most (beyond, the pop
/// stops looking further ahead until some are delivered). A FIFO pop reads
/// the message group of every held and in-flight message from the log, so
/// this bounds its work too.
pub const HELD_LIMIT: usize = 8_192;

/// What a pop needs to know of a message.
#[derive(Debug, Clone, Default)]
pub struct MsgInfo {
    /// Its message group ("" for none).
    pub message_group: String,
    /// It passes the consumer's filter.
    pub passes: bool,
}

/// How to pop.
#[derive(Debug, Clone, Copy)]
pub struct PopRules {
    pub now_ms: u64,
    pub invisible_ms: u64,
    /// The log index of the Pop (receipt handles carry it).
    pub pop_index: u64,
    /// Hand out at most this many.
    pub max: usize,
    pub fifo: bool,
    /// A message delivered this many times is given up on.
    pub max_attempts: u32,
    /// A filter is set (otherwise every message passes).
    pub filtered: bool,
}

/// What a pop did to one queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QueuePop {
    pub popped: Vec<Popped>,
    /// (offset, attempts) given up on: for the dead-letter queue.
    pub dead: Vec<(u64, u32)>,
    /// The group's state changed (also when only skipping or holding).
    pub changed: bool,
}

/// Pops from one queue (`queue`, whose end is `max_offset`) for a group
/// whose state there is `g`. `info` reads a message's group and filter
/// verdict; it is only called in FIFO mode or with a filter.
pub fn pop_queue(
    g: &mut GroupQueue,
    queue: u32,
    max_offset: u64,
    rules: &PopRules,
    info: &mut dyn FnMut(u64) -> MsgInfo,
) -> QueuePop {
    let mut out = QueuePop::default();
    let max_attempts = rules.max_attempts.max(1);
    let visible_at = rules.now_ms.saturating_add(rules.invisible_ms);
    let mut blocked: HashSet<String> = HashSet::new();
    let block = |blocked: &mut HashSet<String>, mg: &str| {
        if rules.fifo && !mg.is_empty() {
            blocked.insert(mg.to_string());
        }
    };
    let is_blocked = |blocked: &HashSet<String>, mg: &str| rules.fifo && !mg.is_empty() && blocked.contains(mg);

    // 1 + 2: in flight and held, in offset order.
    let pending: BTreeSet<u64> = g.inflight.keys().chain(g.held.iter()).copied().collect();
    for offset in pending {
        let mg = if rules.fifo { info(offset).message_group } else { String::new() };
        if let Some(inf) = g.inflight.get_mut(&offset) {
            if inf.visible_at_ms > rules.now_ms || is_blocked(&blocked, &mg) {
                block(&mut blocked, &mg);
                continue;
            }
            if inf.attempt >= max_attempts {
                out.dead.push((offset, inf.attempt));
                continue;
            }
            block(&mut blocked, &mg);
            if out.popped.len() < rules.max {
                inf.attempt += 1;
                inf.visible_at_ms = visible_at;
                inf.pop_index = rules.pop_index;
                out.popped.push(Popped { queue, offset, attempt: inf.attempt });
            }
        } else {
            // Held (FIFO only).
            if is_blocked(&blocked, &mg) {
                continue;
            }
            block(&mut blocked, &mg);
            if out.popped.len() < rules.max {
                g.held.remove(&offset);
                g.inflight
                    .insert(offset, Inflight { visible_at_ms: visible_at, attempt: 1, pop_index: rules.pop_index });
                out.popped.push(Popped { queue, offset, attempt: 1 });
            }
        }
    }
    for (offset, _) in &out.dead {
        g.inflight.remove(offset);
    }

    // 3: new messages.
    let scan_end = g.pop_offset.saturating_add(SCAN_LIMIT).min(max_offset);
    let start = g.pop_offset;
    while g.pop_offset < scan_end && out.popped.len() < rules.max && g.held.len() < HELD_LIMIT {
        let offset = g.pop_offset;
        let (mg, passes) = if rules.fifo || rules.filtered {
            let i = info(offset);
            (i.message_group, i.passes || !rules.filtered)
        } else {
            (String::new(), true)
        };
        g.pop_offset += 1;
        if !passes {
            continue;
        }
        if is_blocked(&blocked, &mg) {
            g.held.insert(offset);
            continue;
        }
        block(&mut blocked, &mg);
        g.inflight.insert(offset, Inflight { visible_at_ms: visible_at, attempt: 1, pop_index: rules.pop_index });
        out.popped.push(Popped { queue, offset, attempt: 1 });
    }
    out.changed = !out.popped.is_empty() || !out.dead.is_empty() || g.pop_offset != start;
    if out.changed {
        g.recompute_committed();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(now_ms: u64, max: usize, fifo: bool) -> PopRules {
        PopRules { now_ms, invisible_ms: 100, pop_index: now_ms + 1, max, fifo, max_attempts: 3, filtered: false }
    }

    /// Message `o` belongs to group "g{o % 2}"; odd offsets fail the filter.
    fn info(o: u64) -> MsgInfo {
        MsgInfo { message_group: format!("g{}", o % 2), passes: o % 2 == 0 }
    }

    #[test]
    fn plain_pop_hands_out_new_then_redelivers_then_gives_up() {
        let mut g = GroupQueue::default();
        let p = pop_queue(&mut g, 0, 3, &rules(0, 10, false), &mut info);
        assert_eq!(p.popped.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![0, 1, 2]);
        // Not visible yet: nothing.
        let p = pop_queue(&mut g, 0, 3, &rules(50, 10, false), &mut info);
        assert!(!p.changed);
        for attempt in 2..=3 {
            let p = pop_queue(&mut g, 0, 3, &rules(1000 * u64::from(attempt), 10, false), &mut info);
            assert!(p.popped.iter().all(|p| p.attempt == attempt));
        }
        let p = pop_queue(&mut g, 0, 3, &rules(10_000, 10, false), &mut info);
        assert!(p.popped.is_empty());
        assert_eq!(p.dead, vec![(0, 3), (1, 3), (2, 3)]);
        assert!(g.inflight.is_empty());
        assert_eq!(g.committed, 3);
    }

    #[test]
    fn a_filter_skips_and_still_moves_on() {
        let mut g = GroupQueue::default();
        let r = PopRules { filtered: true, ..rules(0, 10, false) };
        let p = pop_queue(&mut g, 0, 6, &r, &mut info);
        assert_eq!(p.popped.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![0, 2, 4]);
        assert_eq!(g.pop_offset, 6);
    }

    #[test]
    fn fifo_holds_the_next_of_a_message_group_until_the_previous_is_settled() {
        let mut g = GroupQueue::default();
        // Offsets 0..6: groups g0 g1 g0 g1 g0 g1.
        let p = pop_queue(&mut g, 0, 6, &rules(0, 10, true), &mut info);
        assert_eq!(p.popped.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(g.held.iter().copied().collect::<Vec<_>>(), vec![2, 3, 4, 5]);
        // Still in flight: nothing new.
        let p = pop_queue(&mut g, 0, 6, &rules(10, 10, true), &mut info);
        assert!(p.popped.is_empty() && !p.changed);
        // Settle 0: 2 (g0) comes next; g1 still waits for 1.
        g.inflight.remove(&0);
        let p = pop_queue(&mut g, 0, 6, &rules(20, 10, true), &mut info);
        assert_eq!(p.popped.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![2]);
        // 1 expires: it is redelivered before 3.
        let p = pop_queue(&mut g, 0, 6, &rules(500, 10, true), &mut info);
        let got: Vec<(u64, u32)> = p.popped.iter().map(|p| (p.offset, p.attempt)).collect();
        assert_eq!(got, vec![(1, 2), (2, 2)]);
        assert_eq!(g.committed, 1);
    }

    #[test]
    fn every_offset_is_accounted_for() {
        // Random pops, acks and expiries: every offset below pop_offset is
        // in flight, held, or settled, never lost; committed never passes
        // an unsettled offset.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for fifo in [false, true] {
            let mut g = GroupQueue::default();
            let mut settled = BTreeSet::new();
            let mut max_offset = 0;
            for step in 0..2000u64 {
                match rnd() % 3 {
                    0 => max_offset += rnd() % 5,
                    1 => {
                        let r = PopRules { max_attempts: 100, ..rules(step * 40, (rnd() % 4) as usize, fifo) };
                        pop_queue(&mut g, 0, max_offset, &r, &mut info);
                    }
                    _ => {
                        if let Some(&o) = g.inflight.keys().nth((rnd() % 4) as usize) {
                            g.inflight.remove(&o);
                            g.recompute_committed();
                            settled.insert(o);
                        }
                    }
                }
                for o in 0..g.pop_offset {
                    let n = [g.inflight.contains_key(&o), g.held.contains(&o), settled.contains(&o)];
                    assert_eq!(n.iter().filter(|b| **b).count(), 1, "offset {o} at step {step}");
                }
                let lowest = g.inflight.keys().chain(g.held.iter()).min().copied().unwrap_or(g.pop_offset);
                assert!(g.committed <= lowest);
            }
        }
    }
}
