//! Workloads, driven through our Rust client and recorded in the history.
//!
//! - Queue: producers send unique messages (id = key = body) over the
//!   topic's queues; a consumer group of several simple consumers receives
//!   and acks. After the fault period and a recovery period the consumers
//!   drain until every acknowledged message arrived (or the drain timeout),
//!   then every queue is read back from the log (`final` events).
//! - Offsets register: clients commit random offsets of one queue for one
//!   consumer group and read them back; checked for linearizability.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raftmq_client::Admin;
use raftmq_client::ClientError;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::PullConsumer;
use raftmq_client::SimpleConsumer;
use tokio::time::Instant;

use crate::history::Event;
use crate::history::F;
use crate::history::Kind;
use crate::history::Recorder;

pub const TOPIC: &str = "jepsen";
pub const QUEUES: u32 = 4;
pub const REG_TOPIC: &str = "jepsen-reg";
/// Messages in the register topic: committed offsets stay below this.
pub const REG_MESSAGES: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct Spec {
    pub endpoints: Vec<String>,
    pub producers: usize,
    pub consumers: usize,
    pub registers: usize,
    /// Sends per second, all producers together.
    pub rate: f64,
    pub time_limit: Duration,
    pub recovery: Duration,
    pub drain_timeout: Duration,
}

fn outcome(e: &ClientError) -> Kind {
    if e.retryable() { Kind::Info } else { Kind::Fail }
}

/// Creates the topics (retrying while the group elects) and fills the
/// register topic.
pub async fn prepare(spec: &Spec) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    'topics: loop {
        for addr in &spec.endpoints {
            let Ok(a) = Admin::connect(addr) else { continue };
            let r1 = a.create_topic(TOPIC, QUEUES, 1, false).await;
            let r2 = a.create_topic(REG_TOPIC, 1, 1, false).await;
            let ok = |r: &Result<String, ClientError>| match r {
                Ok(_) => true,
                Err(e) => e.to_string().contains("exists"),
            };
            if ok(&r1) && ok(&r2) {
                break 'topics;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "could not create the topics within 60 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let p = Producer::new(&spec.endpoints, ProducerOptions::default())?;
    let mut sent = 0;
    while sent < REG_MESSAGES {
        let batch: Vec<OutMessage> =
            (0..500).map(|i| OutMessage::new(format!("reg-{}", sent + i).into_bytes())).collect();
        match p.send_batch(REG_TOPIC, &batch).await {
            Ok(_) => sent += 500,
            Err(e) => {
                anyhow::ensure!(Instant::now() < deadline, "filling {REG_TOPIC}: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    Ok(())
}

struct Shared {
    acked: Mutex<HashSet<String>>,
    delivered: Mutex<HashSet<String>>,
}

async fn producer(p: usize, spec: Spec, rec: Arc<Recorder>, shared: Arc<Shared>, until: Instant) {
    // RocketMQ's default send timeout.
    let opts = ProducerOptions { request_timeout: Duration::from_secs(3), ..ProducerOptions::default() };
    let Ok(prod) = Producer::new(&spec.endpoints, opts) else { return };
    let process = format!("p{p}");
    let gap = Duration::from_secs_f64(spec.producers as f64 / spec.rate.max(0.1));
    let mut seq = 0u64;
    let mut next = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep_until(next).await;
        next += gap;
        seq += 1;
        let id = format!("{process}-{seq}");
        rec.log(&Event::new(&process, Kind::Invoke, F::Send, &id));
        let mut m = OutMessage::new(id.clone().into_bytes());
        m.keys = vec![id.clone()];
        let r = tokio::time::timeout(Duration::from_secs(15), prod.send(TOPIC, m)).await;
        match r {
            Ok(Ok(receipt)) => {
                rec.log(&Event::new(&process, Kind::Ok, F::Send, &id).offset(receipt.offset));
                shared.acked.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
            }
            Ok(Err(e)) => rec.log(&Event::new(&process, outcome(&e), F::Send, &id).error(&e)),
            Err(_) => rec.log(&Event::new(&process, Kind::Info, F::Send, &id).error("timed out after 15 s")),
        }
    }
}

async fn consumer(c: usize, spec: Spec, rec: Arc<Recorder>, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let Ok(cons) = SimpleConsumer::new(&spec.endpoints, "jepsen") else { return };
    let process = format!("c{c}");
    while !stop.load(Ordering::Relaxed) {
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            cons.receive(TOPIC, None, 16, Duration::from_secs(10), Duration::from_secs(1)),
        )
        .await;
        let batch = match got {
            Ok(Ok(b)) => b,
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for m in batch {
            let id = String::from_utf8_lossy(&m.body).to_string();
            let mut e = Event::new(&process, Kind::Event, F::Receive, &id).at(m.queue, m.offset);
            e.attempt = Some(m.delivery_attempt);
            rec.log(&e);
            shared.delivered.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone());
            rec.log(&Event::new(&process, Kind::Invoke, F::Ack, &id));
            match tokio::time::timeout(Duration::from_secs(10), cons.ack(&m)).await {
                Ok(Ok(())) => rec.log(&Event::new(&process, Kind::Ok, F::Ack, &id)),
                Ok(Err(e)) => rec.log(&Event::new(&process, outcome(&e), F::Ack, &id).error(&e)),
                Err(_) => rec.log(&Event::new(&process, Kind::Info, F::Ack, &id).error("timed out")),
            }
        }
    }
}

async fn register(r: usize, spec: Spec, rec: Arc<Recorder>, until: Instant) {
    let Ok(pc) = PullConsumer::new(&spec.endpoints, "jepsen-reg") else { return };
    let process = format!("r{r}");
    // Unique values (client r writes r+1, r+1+n, ...), below the queue's end.
    let mut next_value = r as u64 + 1;
    while Instant::now() < until {
        let write = rand::random::<bool>();
        if write {
            let v = next_value;
            next_value += spec.registers as u64;
            if v >= REG_MESSAGES {
                break;
            }
            rec.log(&Event::new(&process, Kind::Invoke, F::Write, "").offset(v));
            match tokio::time::timeout(Duration::from_secs(10), pc.commit(REG_TOPIC, 0, v)).await {
                Ok(Ok(())) => rec.log(&Event::new(&process, Kind::Ok, F::Write, "").offset(v)),
                Ok(Err(e)) => rec.log(&Event::new(&process, outcome(&e), F::Write, "").error(&e)),
                Err(_) => rec.log(&Event::new(&process, Kind::Info, F::Write, "").error("timed out")),
            }
        } else {
            rec.log(&Event::new(&process, Kind::Invoke, F::Read, ""));
            match tokio::time::timeout(Duration::from_secs(10), pc.committed(REG_TOPIC, 0)).await {
                Ok(Ok(v)) => rec.log(&Event::new(&process, Kind::Ok, F::Read, "").offset(v)),
                Ok(Err(e)) => rec.log(&Event::new(&process, Kind::Fail, F::Read, "").error(&e)),
                Err(_) => rec.log(&Event::new(&process, Kind::Fail, F::Read, "").error("timed out")),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node applied what the leader committed (a node still
/// catching up would answer pulls with less than the log holds), then reads
/// every queue back up to the highest end any node reports.
async fn final_read(spec: &Spec, rec: &Recorder) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut ends = vec![0u64; QUEUES as usize];
    loop {
        let mut commit = 0;
        let mut applied = Vec::new();
        for addr in &spec.endpoints {
            let Ok(a) = Admin::connect(addr) else { continue };
            if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), a.node_status()).await {
                if st.role == "leader" {
                    commit = st.commit_index;
                }
                applied.push((addr.clone(), st.applied_index));
            }
            if let Ok(Ok(topics)) = tokio::time::timeout(Duration::from_secs(2), a.list_topics()).await
                && let Some(t) = topics.iter().find(|t| t.config.as_ref().is_some_and(|c| c.name == TOPIC))
            {
                for q in &t.queues {
                    let e = &mut ends[q.queue_id as usize];
                    *e = (*e).max(q.max_offset);
                }
            }
        }
        let behind: Vec<_> = applied.iter().filter(|(_, a)| commit == 0 || *a < commit).collect();
        if commit > 0 && behind.is_empty() && applied.len() == spec.endpoints.len() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("workload: nodes not caught up before the final read (leader commit {commit}): {applied:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pc = PullConsumer::new(&spec.endpoints, "jepsen-final")?;
    let mut n = 0;
    for q in 0..QUEUES {
        let mut offset = 0;
        let end = ends[q as usize];
        while offset < end {
            match pc.pull(TOPIC, q, offset, 32, Duration::ZERO).await {
                Ok((batch, next)) if !batch.is_empty() => {
                    for m in batch {
                        let id = String::from_utf8_lossy(&m.body).to_string();
                        rec.log(&Event::new("final", Kind::Event, F::Final, id).at(q, m.offset));
                        n += 1;
                    }
                    offset = next;
                }
                // Empty before the end: that node lags; ask another.
                Ok(_) | Err(_) => {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "final read of queue {q} stuck at offset {offset} of {end}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    Ok(n)
}

/// Runs the workloads: `time_limit` of load, `recovery` of quiet, the drain,
/// the final read. The nemesis runs beside it over the same clock.
pub async fn run(spec: Spec, rec: Arc<Recorder>, start: Instant) -> anyhow::Result<()> {
    let until = start + spec.time_limit;
    let shared = Arc::new(Shared { acked: Mutex::new(HashSet::new()), delivered: Mutex::new(HashSet::new()) });
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..spec.producers {
        tasks.push(tokio::spawn(producer(p, spec.clone(), rec.clone(), shared.clone(), until)));
    }
    for r in 0..spec.registers {
        tasks.push(tokio::spawn(register(r, spec.clone(), rec.clone(), until)));
    }
    let consumers: Vec<_> = (0..spec.consumers)
        .map(|c| tokio::spawn(consumer(c, spec.clone(), rec.clone(), shared.clone(), stop.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::sleep_until(until + spec.recovery).await;
    eprintln!("workload: load over; draining");
    let drain_until = Instant::now() + spec.drain_timeout;
    loop {
        let missing = {
            let acked = shared.acked.lock().unwrap_or_else(|e| e.into_inner());
            let delivered = shared.delivered.lock().unwrap_or_else(|e| e.into_inner());
            acked.difference(&delivered).count()
        };
        if missing == 0 || Instant::now() > drain_until {
            eprintln!("workload: drain done, {missing} acknowledged messages not delivered");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }
    let n = final_read(&spec, &rec).await?;
    eprintln!("workload: final read found {n} messages in the log");
    Ok(())
}
