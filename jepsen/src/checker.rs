//! Checks a history: the queue workload's counts and the linearizability of
//! consumer offsets (a register).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;

use serde::Deserialize;
use serde::Serialize;

use crate::history::Event;
use crate::history::F;
use crate::history::Kind;

/// Unavailability after one fault: from its start to the first send
/// acknowledged after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub fault: String,
    pub start_us: u64,
    pub first_ok_after_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// How the cluster was run (netns or loopback) and with which faults.
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub nemeses: Vec<String>,
    pub sends_attempted: usize,
    /// Sends the broker acknowledged.
    pub acked: usize,
    /// Sends refused with a definite error.
    pub failed: usize,
    /// Sends whose outcome is unknown (timeouts, lost connections).
    pub unknown: usize,
    /// Distinct messages delivered to consumers.
    pub delivered: usize,
    /// Acknowledged but never delivered.
    pub lost: usize,
    pub lost_examples: Vec<String>,
    /// Acknowledged but absent from the log after the run.
    pub lost_from_log: usize,
    /// Delivered but never sent.
    pub unexpected: usize,
    pub unexpected_examples: Vec<String>,
    /// Deliveries beyond the first of a message (redelivery after a missed
    /// ack is allowed; counted apart).
    pub duplicated: usize,
    /// Pairs of one producer's messages in one queue whose queue offsets
    /// contradict the order the producer had them acknowledged in.
    pub order_violations: usize,
    pub order_examples: Vec<String>,
    /// Delivered messages missing from the log afterwards: a read of an entry
    /// that was never committed.
    pub reads_past_commit: usize,
    pub unavailability: Vec<Window>,
    pub unavailability_max_ms: Option<f64>,
    pub unavailability_median_ms: Option<f64>,
    /// Offsets register: operations checked and whether a linearization exists.
    pub register_ops: usize,
    pub register_linearizable: Option<bool>,
    /// When not linearizable: the operations around the shortest failing
    /// prefix (times relative to the first operation, in ms).
    pub register_counterexample: Vec<String>,
    pub valid: bool,
}

struct SendOp {
    process: String,
    invoke_us: u64,
    complete_us: Option<u64>,
    kind: Kind,
}

pub fn check(history: &[Event]) -> Results {
    let mut r = Results::default();
    let mut sends: HashMap<&str, SendOp> = HashMap::new();
    let mut deliveries: HashMap<&str, Vec<(u32, u64)>> = HashMap::new();
    let mut final_log: HashMap<&str, (u32, u64)> = HashMap::new();
    for e in history {
        match (e.f, e.kind) {
            (F::Send, Kind::Invoke) => {
                sends.insert(
                    &e.value,
                    SendOp { process: e.process.clone(), invoke_us: e.time_us, complete_us: None, kind: Kind::Invoke },
                );
            }
            (F::Send, k @ (Kind::Ok | Kind::Fail | Kind::Info)) => {
                if let Some(s) = sends.get_mut(e.value.as_str()) {
                    s.complete_us = Some(e.time_us);
                    s.kind = k;
                }
            }
            (F::Receive, Kind::Event) => {
                if let (Some(q), Some(o)) = (e.queue, e.offset) {
                    deliveries.entry(&e.value).or_default().push((q, o));
                }
            }
            (F::Final, Kind::Event) => {
                if let (Some(q), Some(o)) = (e.queue, e.offset) {
                    final_log.insert(&e.value, (q, o));
                }
            }
            _ => {}
        }
    }
    r.sends_attempted = sends.len();
    r.acked = sends.values().filter(|s| s.kind == Kind::Ok).count();
    r.failed = sends.values().filter(|s| s.kind == Kind::Fail).count();
    r.unknown = sends.values().filter(|s| matches!(s.kind, Kind::Info | Kind::Invoke)).count();
    r.delivered = deliveries.len();
    let mut lost: Vec<&str> =
        sends.iter().filter(|(v, s)| s.kind == Kind::Ok && !deliveries.contains_key(*v)).map(|(v, _)| *v).collect();
    lost.sort();
    r.lost = lost.len();
    r.lost_examples = lost.iter().take(10).map(|s| s.to_string()).collect();
    // Only meaningful when the final read of the log happened.
    if !final_log.is_empty() {
        r.lost_from_log = sends.iter().filter(|(v, s)| s.kind == Kind::Ok && !final_log.contains_key(*v)).count();
    }
    let mut unexpected: Vec<&str> = deliveries.keys().filter(|v| !sends.contains_key(*v)).copied().collect();
    unexpected.sort();
    r.unexpected = unexpected.len();
    r.unexpected_examples = unexpected.iter().take(10).map(|s| s.to_string()).collect();
    r.duplicated = deliveries.values().map(|d| d.len().saturating_sub(1)).sum();
    // A delivered message missing from the log afterwards was read before it
    // was committed (then lost with an uncommitted tail). Only meaningful
    // when the final read happened.
    if !final_log.is_empty() {
        r.reads_past_commit = deliveries.keys().filter(|v| !final_log.contains_key(*v)).count();
    }

    // Order: one producer's acknowledged messages, sent one after the other,
    // keep their order inside a queue.
    let mut per_producer: BTreeMap<&str, Vec<(&str, &SendOp)>> = BTreeMap::new();
    for (v, s) in &sends {
        if s.kind == Kind::Ok {
            per_producer.entry(s.process.as_str()).or_default().push((v, s));
        }
    }
    let position = |v: &str| final_log.get(v).copied().or_else(|| deliveries.get(v).and_then(|d| d.first().copied()));
    for (_, mut ops) in per_producer {
        ops.sort_by_key(|(_, s)| s.invoke_us);
        let mut last_in_queue: HashMap<u32, (&str, u64, u64)> = HashMap::new();
        for (v, s) in ops {
            let Some((q, o)) = position(v) else { continue };
            if let Some((pv, po, pdone)) = last_in_queue.get(&q)
                && *pdone <= s.invoke_us
                && *po >= o
            {
                r.order_violations += 1;
                if r.order_examples.len() < 10 {
                    r.order_examples
                        .push(format!("queue {q}: {pv} at {po} acked before {v} was sent, but {v} is at {o}"));
                }
            }
            last_in_queue.insert(q, (v, o, s.complete_us.unwrap_or(u64::MAX)));
        }
    }

    // Unavailability after each fault.
    let mut ok_times: Vec<u64> = sends.values().filter(|s| s.kind == Kind::Ok).filter_map(|s| s.complete_us).collect();
    ok_times.sort_unstable();
    for e in history.iter().filter(|e| e.f == F::NemesisStart) {
        let i = ok_times.partition_point(|t| *t < e.time_us);
        r.unavailability.push(Window {
            fault: e.value.clone(),
            start_us: e.time_us,
            first_ok_after_ms: ok_times.get(i).map(|t| (t - e.time_us) as f64 / 1000.0),
        });
    }
    let mut windows: Vec<f64> = r.unavailability.iter().filter_map(|w| w.first_ok_after_ms).collect();
    windows.sort_by(f64::total_cmp);
    r.unavailability_max_ms = windows.last().copied();
    r.unavailability_median_ms = windows.get(windows.len() / 2).copied();

    let reg = register_ops(history);
    if !reg.is_empty() {
        r.register_ops = reg.len();
        r.register_linearizable = linearizable(&reg, 0);
        if r.register_linearizable == Some(false) {
            // The shortest prefix (by invoke) that cannot be linearized.
            let (mut lo, mut hi) = (1, reg.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if linearizable(&reg[..mid], 0) == Some(false) { hi = mid } else { lo = mid + 1 }
            }
            let t0 = reg[0].invoke_us;
            r.register_counterexample = reg[lo.saturating_sub(8)..lo]
                .iter()
                .map(|o| {
                    format!(
                        "{} {} invoked {:.1} ms, {}",
                        if o.write { "write" } else { "read" },
                        o.value,
                        (o.invoke_us - t0) as f64 / 1000.0,
                        o.complete_us
                            .map(|c| format!("completed {:.1} ms", (c - t0) as f64 / 1000.0))
                            .unwrap_or("unknown".into())
                    )
                })
                .collect();
        }
    }
    r.valid = r.lost == 0
        && r.lost_from_log == 0
        && r.unexpected == 0
        && r.order_violations == 0
        && r.reads_past_commit == 0
        && r.register_linearizable != Some(false);
    r
}

/// One operation on the offsets register.
#[derive(Debug, Clone, PartialEq)]
pub struct RegOp {
    pub invoke_us: u64,
    /// `None`: it may have taken effect at any time after its invoke.
    pub complete_us: Option<u64>,
    pub write: bool,
    pub value: u64,
}

fn register_ops(history: &[Event]) -> Vec<RegOp> {
    let mut open: HashMap<&str, (u64, F, u64)> = HashMap::new();
    let mut ops = Vec::new();
    for e in history {
        if !matches!(e.f, F::Write | F::Read) {
            continue;
        }
        match e.kind {
            Kind::Invoke => {
                open.insert(&e.process, (e.time_us, e.f, e.offset.unwrap_or(0)));
            }
            Kind::Ok => {
                if let Some((t, f, v)) = open.remove(e.process.as_str()) {
                    let value = if f == F::Read { e.offset.unwrap_or(0) } else { v };
                    ops.push(RegOp { invoke_us: t, complete_us: Some(e.time_us), write: f == F::Write, value });
                }
            }
            // A failed operation did nothing; a failed or unknown read
            // constrains nothing.
            Kind::Fail => {
                open.remove(e.process.as_str());
            }
            Kind::Info => {
                if let Some((t, f, v)) = open.remove(e.process.as_str())
                    && f == F::Write
                {
                    ops.push(RegOp { invoke_us: t, complete_us: None, write: true, value: v });
                }
            }
            Kind::Event => {}
        }
    }
    // Writes still open at the end are unknown too.
    for (_, (t, f, v)) in open {
        if f == F::Write {
            ops.push(RegOp { invoke_us: t, complete_us: None, write: true, value: v });
        }
    }
    // An unknown write whose value no read returned may be taken as never
    // having happened: that can only make reads easier to explain. Dropping
    // them keeps the search small.
    let read_values: HashSet<u64> = ops.iter().filter(|o| !o.write).map(|o| o.value).collect();
    ops.retain(|o| o.complete_us.is_some() || read_values.contains(&o.value));
    ops.sort_by_key(|o| o.invoke_us);
    ops
}

/// Whether the register operations have a linearization starting from
/// `initial` (Wing & Gong's search with memoization of (done set, value)).
/// Unknown writes may be linearized anywhere after their invoke, or never.
/// `None` when the search gave up (a bounded budget of steps).
pub fn linearizable(ops: &[RegOp], initial: u64) -> Option<bool> {
    assert!(ops.len() <= 4096, "register histories are bounded");
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let mut seen: HashSet<(Vec<u64>, u64)> = HashSet::new();
    // Depth-first over (done set, value); bounded by the memo.
    let mut stack: Vec<(Vec<u64>, u64)> = vec![(vec![0; words], initial)];
    let required: Vec<usize> = (0..n).filter(|&i| ops[i].complete_us.is_some()).collect();
    let mut budget: u64 = 5_000_000;
    while let Some((done, value)) = stack.pop() {
        if required.iter().all(|&i| done[i / 64] & (1 << (i % 64)) != 0) {
            return Some(true);
        }
        budget -= 1;
        if budget == 0 {
            tracing::warn!("linearizability search budget exhausted: undecided");
            return None;
        }
        // The earliest completion among pending operations bounds which may go next.
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        let horizon = (0..n).filter(|&i| !is_done(i)).filter_map(|i| ops[i].complete_us).min().unwrap_or(u64::MAX);
        for i in (0..n).filter(|&i| !is_done(i)) {
            let op = &ops[i];
            if op.invoke_us > horizon {
                break; // sorted by invoke: none later may go first
            }
            if !op.write && op.value != value {
                continue;
            }
            let mut next = done.clone();
            next[i / 64] |= 1 << (i % 64);
            let v = if op.write { op.value } else { value };
            if seen.insert((next.clone(), v)) {
                stack.push((next, v));
            }
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u64, p: &str, kind: Kind, f: F, v: &str) -> Event {
        let mut e = Event::new(p, kind, f, v);
        e.time_us = t;
        e
    }

    fn at(mut e: Event, q: u32, o: u64) -> Event {
        e.queue = Some(q);
        e.offset = Some(o);
        e
    }

    #[test]
    fn counts_lost_unexpected_duplicates_and_order() {
        let h = vec![
            ev(1, "p0", Kind::Invoke, F::Send, "a"),
            ev(2, "p0", Kind::Ok, F::Send, "a"),
            ev(3, "p0", Kind::Invoke, F::Send, "b"),
            ev(4, "p0", Kind::Ok, F::Send, "b"),
            ev(5, "p0", Kind::Invoke, F::Send, "c"),
            ev(6, "p0", Kind::Ok, F::Send, "c"),
            ev(7, "p0", Kind::Invoke, F::Send, "d"),
            ev(8, "p0", Kind::Info, F::Send, "d"),
            at(ev(10, "c0", Kind::Event, F::Receive, "a"), 0, 5),
            at(ev(11, "c0", Kind::Event, F::Receive, "b"), 0, 4), // b after a, but lower offset
            at(ev(12, "c0", Kind::Event, F::Receive, "b"), 0, 4), // redelivery
            at(ev(13, "c0", Kind::Event, F::Receive, "zz"), 1, 0), // never sent
            at(ev(20, "f", Kind::Event, F::Final, "a"), 0, 5),
            at(ev(20, "f", Kind::Event, F::Final, "b"), 0, 4),
            at(ev(20, "f", Kind::Event, F::Final, "c"), 1, 1),
        ];
        let r = check(&h);
        assert_eq!((r.acked, r.unknown), (3, 1));
        assert_eq!(r.lost, 1, "c was acked, never delivered");
        assert_eq!(r.lost_from_log, 0);
        assert_eq!(r.unexpected, 1);
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.order_violations, 1, "{:?}", r.order_examples);
        assert_eq!(r.reads_past_commit, 1, "zz was delivered and is not in the log");
        assert!(!r.valid);
    }

    #[test]
    fn a_clean_history_is_valid_and_windows_are_measured() {
        let mut h = vec![ev(100, "nemesis", Kind::Event, F::NemesisStart, "kill-leader n1")];
        h.push(ev(1, "p0", Kind::Invoke, F::Send, "a"));
        h.push(ev(2, "p0", Kind::Ok, F::Send, "a"));
        h.push(ev(150, "p0", Kind::Invoke, F::Send, "b"));
        h.push(ev(1_100, "p0", Kind::Ok, F::Send, "b"));
        h.push(at(ev(1_200, "c0", Kind::Event, F::Receive, "a"), 0, 0));
        h.push(at(ev(1_300, "c0", Kind::Event, F::Receive, "b"), 0, 1));
        h.sort_by_key(|e| e.time_us);
        let r = check(&h);
        assert!(r.valid, "{r:?}");
        assert_eq!(r.unavailability_max_ms, Some(1.0));
    }

    fn op(i: u64, c: Option<u64>, write: bool, value: u64) -> RegOp {
        RegOp { invoke_us: i, complete_us: c, write, value }
    }

    #[test]
    fn register_linearizability() {
        // w1 then r1: fine.
        assert_eq!(Some(true), linearizable(&[op(0, Some(1), true, 1), op(2, Some(3), false, 1)], 0));
        // A read of a value written after it completed: not linearizable.
        assert_eq!(Some(false), linearizable(&[op(0, Some(1), false, 5), op(2, Some(3), true, 5)], 0));
        // A stale read after a completed write: not linearizable.
        assert_eq!(Some(false), linearizable(&[op(0, Some(1), true, 1), op(2, Some(3), false, 0)], 0));
        // Concurrent write and read may see either.
        assert_eq!(Some(true), linearizable(&[op(0, Some(10), true, 1), op(1, Some(2), false, 0)], 0));
        assert_eq!(Some(true), linearizable(&[op(0, Some(10), true, 1), op(1, Some(2), false, 1)], 0));
        // An unknown write may take effect late...
        assert_eq!(
            Some(true),
            linearizable(&[op(0, None, true, 7), op(5, Some(6), false, 0), op(7, Some(8), false, 7)], 0)
        );
        // ...but not un-happen once observed.
        assert_eq!(
            Some(false),
            linearizable(&[op(0, None, true, 7), op(5, Some(6), false, 7), op(7, Some(8), false, 0)], 0)
        );
    }
}
