//! RaftMQ compatibility program driven by the OFFICIAL RocketMQ Rust client,
//! crate `rocketmq` 5.0.0 from crates.io.
//!
//!   rocketmq-compat SCENARIO ENDPOINT [options]
//!
//! Scenarios: normal fifo delay transaction orphan invisible dlq push.
//! Each prints progress, exactly one `KILL-POINT` line at its mid point (the
//! harness then kills the broker group's leader), and on success one final
//! line `RESULT <scenario> ok <figures>` (exit 0). Failure: `FAIL <scenario>:
//! <reason>` and exit 1. A scenario the crate cannot express (push) prints
//! `SKIP <scenario>: <reason>` and exits 77. A panic inside the crate is a
//! failure too (exit 101, `FAIL <scenario>: panic ...`).
//!
//! What rocketmq 5.0.0 offers: Producer (normal, FIFO, delay, transaction
//! messages, transaction checker) and SimpleConsumer (receive, ack). It has no
//! PushConsumer and no ChangeInvisibleDuration; `invisible` makes that one RPC
//! itself (same tonic/prost as the crate) and does everything else through
//! the crate.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::{AckMessageEntry, Message, MessageBuilder, MessageView};
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use rocketmq::{Producer, SimpleConsumer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

static START: OnceLock<Instant> = OnceLock::new();
static SCENARIO: OnceLock<String> = OnceLock::new();
static KILL_PRINTED: AtomicBool = AtomicBool::new(false);

type R<T> = Result<T, String>;

macro_rules! say {
    ($($t:tt)*) => {{
        let e = START.get().map(|s| s.elapsed()).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[{:7.3}s] {}", e.as_secs_f64(), format!($($t)*));
        let _ = out.flush();
    }};
}

macro_rules! bail {
    ($($t:tt)*) => { return Err(format!($($t)*)) };
}

fn kill_point(why: &str) {
    if KILL_PRINTED.swap(true, Ordering::SeqCst) {
        return;
    }
    say!("kill point reached: {why}");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "KILL-POINT");
    let _ = out.flush();
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---------------------------------------------------------------- options

#[derive(Clone, Debug)]
struct Opts {
    scenario: String,
    endpoint: String,
    count: usize,
    topic: Option<String>,
    group: Option<String>,
    long_poll: Duration,
    rpc_timeout: Duration,
    receivers: usize,
    batch: Option<i32>,
    max_late_ms: i64,
    deadline: Duration,
    strict: bool,
    change_invisible: bool,
    probe: Duration,
    run: String,
    fifo_groups: usize,
    lenient_filter: bool,
    max_attempts: i32,
}

const USAGE: &str = "usage: rocketmq-compat SCENARIO ENDPOINT [options]
scenarios: normal fifo delay transaction orphan invisible dlq push
options:
  --count N            messages (normal 40, fifo 30)
  --topic T            topic (defaults: compat-normal, compat-fifo, compat-delay, compat-tx)
  --group G            consumer group (fifo: compat-fifo-group, dlq: compat-dlq-group, else unique)
  --long-poll-secs S   client long polling timeout, also the receive RPC deadline (default 5)
  --timeout-secs S     client RPC timeout (default 3)
  --receivers K        concurrent receive loops per consumer (default 4)
  --batch B            receive batch size (default 32; fifo 1)
  --max-late-ms MS     delay: allowed lateness (default 1500)
  --deadline-secs S    overall deadline (default 80)
  --probe-ms MS        fifo: hold-back probe window (default 3000)
  --fifo-groups N      fifo: message groups (default 3)
  --strict             never accept a duplicate after ack, even for a retried send
  --no-change-invisible  invisible: skip the raw ChangeInvisibleDuration call
  --lenient-filter     count messages that do not match the tag subscription
                       instead of failing (brokers without tag filtering)
  --max-attempts N     dlq: the group's max delivery attempts (default 2)
  --run ID             run id (default: generated)
exit: 0 ok, 1 failed, 2 usage, 77 scenario not supported by rocketmq 5.0.0, 101 panic";

fn parse_args() -> R<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        bail!("{USAGE}");
    }
    let run = format!("{:x}{:04x}", (now_ms() as u64) & 0xff_ffff_ffff, std::process::id() & 0xffff);
    let mut o = Opts {
        scenario: args[0].clone(),
        endpoint: args[1].clone(),
        count: 0,
        topic: None,
        group: None,
        long_poll: Duration::from_secs(5),
        rpc_timeout: Duration::from_secs(3),
        receivers: 4,
        batch: None,
        max_late_ms: 1500,
        deadline: Duration::from_secs(80),
        strict: false,
        change_invisible: true,
        probe: Duration::from_millis(3000),
        run,
        fifo_groups: 3,
        lenient_filter: false,
        max_attempts: 2,
    };
    const SCENARIOS: [&str; 9] =
        ["normal", "fifo", "delay", "transaction", "orphan", "orphan-child", "invisible", "dlq", "push"];
    if !SCENARIOS.contains(&o.scenario.as_str()) {
        bail!("unknown scenario {}\n{USAGE}", o.scenario);
    }
    let mut i = 2;
    let num = |i: usize| -> R<u64> {
        args.get(i + 1)
            .ok_or_else(|| format!("{} needs a value\n{USAGE}", args[i]))?
            .parse::<u64>()
            .map_err(|e| format!("{}: {e}", args[i]))
    };
    let s = |i: usize| -> R<String> {
        args.get(i + 1).cloned().ok_or_else(|| format!("{} needs a value\n{USAGE}", args[i]))
    };
    while i < args.len() {
        let mut two = true;
        match args[i].as_str() {
            "--count" => o.count = num(i)? as usize,
            "--topic" => o.topic = Some(s(i)?),
            "--group" => o.group = Some(s(i)?),
            "--long-poll-secs" => o.long_poll = Duration::from_secs(num(i)?),
            "--timeout-secs" => o.rpc_timeout = Duration::from_secs(num(i)?),
            "--receivers" => o.receivers = (num(i)? as usize).max(1),
            "--batch" => o.batch = Some(num(i)? as i32),
            "--max-late-ms" => o.max_late_ms = num(i)? as i64,
            "--deadline-secs" => o.deadline = Duration::from_secs(num(i)?),
            "--probe-ms" => o.probe = Duration::from_millis(num(i)?),
            "--fifo-groups" => o.fifo_groups = (num(i)? as usize).max(1),
            "--run" => o.run = s(i)?,
            "--max-attempts" => o.max_attempts = num(i)? as i32,
            "--strict" => {
                o.strict = true;
                two = false
            }
            "--lenient-filter" => {
                o.lenient_filter = true;
                two = false
            }
            "--no-change-invisible" => {
                o.change_invisible = false;
                two = false
            }
            other => bail!("unknown option {other}\n{USAGE}"),
        }
        i += if two { 2 } else { 1 };
    }
    Ok(o)
}

impl Opts {
    fn topic_or(&self, d: &str) -> String {
        self.topic.clone().unwrap_or_else(|| d.to_string())
    }
    fn group_or_unique(&self) -> String {
        self.group.clone().unwrap_or_else(|| format!("compat-{}-{}", self.scenario, self.run))
    }
    fn tag(&self) -> String {
        format!("t{}", self.run)
    }
    fn deadline_at(&self) -> Instant {
        *START.get().unwrap() + self.deadline
    }
    fn client_option(&self) -> ClientOption {
        let mut c = ClientOption::default();
        c.set_access_url(self.endpoint.clone());
        c.set_enable_tls(false);
        c.set_timeout(self.rpc_timeout);
        c.set_long_polling_timeout(self.long_poll);
        c
    }
}

// ------------------------------------------------------- messages to send

/// A message built by the crate's MessageBuilder (its validation, its
/// message id), kept as a value so a failed send can be retried with the
/// SAME message id.
#[derive(Clone, Debug)]
struct CMsg {
    id: String,
    topic: String,
    body: Vec<u8>,
    tag: Option<String>,
    keys: Vec<String>,
    props: HashMap<String, String>,
    group: Option<String>,
    delivery: Option<i64>,
    tx: bool,
}

impl CMsg {
    fn from_builder(b: MessageBuilder) -> R<CMsg> {
        let mut m = b.build().map_err(|e| format!("build message: {e}"))?;
        Ok(CMsg {
            id: m.take_message_id(),
            topic: m.take_topic(),
            body: m.take_body(),
            tag: m.take_tag(),
            keys: m.take_keys(),
            props: m.take_properties(),
            group: m.take_message_group(),
            delivery: m.take_delivery_timestamp(),
            tx: m.transaction_enabled(),
        })
    }
}

impl Message for CMsg {
    fn take_message_id(&mut self) -> String {
        self.id.clone()
    }
    fn take_topic(&mut self) -> String {
        self.topic.clone()
    }
    fn take_body(&mut self) -> Vec<u8> {
        self.body.clone()
    }
    fn take_tag(&mut self) -> Option<String> {
        self.tag.clone()
    }
    fn take_keys(&mut self) -> Vec<String> {
        self.keys.clone()
    }
    fn take_properties(&mut self) -> HashMap<String, String> {
        self.props.clone()
    }
    fn take_message_group(&mut self) -> Option<String> {
        self.group.clone()
    }
    fn take_delivery_timestamp(&mut self) -> Option<i64> {
        self.delivery
    }
    fn transaction_enabled(&mut self) -> bool {
        self.tx
    }
}

fn props(o: &Opts, seq: usize) -> HashMap<String, String> {
    let mut p = HashMap::new();
    p.insert("seq".to_string(), seq.to_string());
    p.insert("run".to_string(), o.run.clone());
    p
}

fn keys(o: &Opts, seq: usize) -> Vec<String> {
    vec![format!("key-{seq}"), format!("k{}", o.run)]
}

fn body(o: &Opts, what: &str, seq: usize) -> Vec<u8> {
    format!("{} {} #{seq} from rust-official rocketmq 5.0.0", o.run, what).into_bytes()
}

// ------------------------------------------------------- clients

type Checker = Arc<dyn Fn(String, MessageView) -> TransactionResolution + Send + Sync>;

async fn start_producer(o: &Opts, topics: Vec<String>, checker: Option<Checker>) -> R<Producer> {
    let until = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let mut po = ProducerOption::default();
        po.set_topics(topics.clone());
        let p = match &checker {
            None => Producer::new(po, o.client_option()),
            Some(c) => {
                let c = c.clone();
                Producer::new_transaction_producer(po, o.client_option(), Box::new(move |tid, mv| c(tid, mv)))
            }
        };
        let mut p = p.map_err(|e| format!("create producer: {e}"))?;
        match p.start().await {
            Ok(()) => {
                say!(
                    "producer started ({}) for {:?}",
                    if checker.is_some() { "transactional" } else { "plain" },
                    topics
                );
                return Ok(p);
            }
            Err(e) if Instant::now() < until => {
                if n <= 3 {
                    say!("producer start failed (retrying): {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("producer start failed for 20 s: {e}"),
        }
    }
}

async fn start_consumer(o: &Opts, group: &str, topics: Option<Vec<String>>) -> R<SimpleConsumer> {
    let until = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let mut so = SimpleConsumerOption::default();
        so.set_consumer_group(group);
        if let Some(t) = &topics {
            so.set_topics(t.clone());
        }
        let mut c = SimpleConsumer::new(so, o.client_option()).map_err(|e| format!("create consumer: {e}"))?;
        match c.start().await {
            Ok(()) => {
                say!("simple consumer started: group {group}, topics {:?}", topics);
                return Ok(c);
            }
            Err(e) if Instant::now() < until => {
                if n <= 3 {
                    say!("consumer start failed (retrying): {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("consumer start failed for 20 s: {e}"),
        }
    }
}

/// Send until acknowledged (send returns Ok) or `until`. Returns the failed
/// attempts before success.
async fn send_retry(p: &Producer, m: &CMsg, until: Instant) -> R<u32> {
    let mut failures = 0u32;
    loop {
        match p.send(m.clone()).await {
            Ok(r) => {
                if r.message_id() != m.id {
                    bail!("send receipt message id {} differs from the message's id {}", r.message_id(), m.id);
                }
                return Ok(failures);
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 || failures % 20 == 0 {
                    say!("send of {} failed (attempt {failures}, retrying): {e}", m.id);
                }
                if Instant::now() > until {
                    bail!("send of {} not acknowledged before the deadline: {e}", m.id);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

async fn send_tx_retry(p: &Producer, m: &CMsg, until: Instant) -> R<(impl Transaction, u32)> {
    let mut failures = 0u32;
    loop {
        match p.send_transaction_message(m.clone()).await {
            Ok(t) => {
                if t.message_id() != m.id {
                    bail!("transaction send receipt message id {} differs from {}", t.message_id(), m.id);
                }
                if t.transaction_id().is_empty() {
                    bail!("transaction send receipt has an empty transaction id ({})", m.id);
                }
                return Ok((t, failures));
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 || failures % 20 == 0 {
                    say!("half-message send of {} failed (attempt {failures}, retrying): {e}", m.id);
                }
                if Instant::now() > until {
                    bail!("half message {} not acknowledged before the deadline: {e}", m.id);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Ack, retrying a transient failure twice. Err = not acknowledged.
async fn ack_retry(c: &SimpleConsumer, e: &(impl AckMessageEntry + 'static)) -> R<()> {
    let mut last = String::new();
    for i in 0..3 {
        match c.ack(e).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                last = err.to_string();
                say!("ack of {} failed (attempt {}): {last}", e.message_id(), i + 1);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    Err(last)
}

// ------------------------------------------------------- receive pool

struct Got {
    at: Instant,
    wall_ms: i64,
    res: Result<Vec<MessageView>, String>,
}

#[derive(Default)]
struct PoolStats {
    receives: AtomicU64,
    empty: AtomicU64,
    fast_empty: AtomicU64,
    errors: AtomicU64,
}

/// K concurrent receive loops on one SimpleConsumer. The crate picks the next
/// queue of the route round-robin for every receive call, so K loops keep
/// several queues polled at once.
struct Pool {
    name: String,
    rx: mpsc::UnboundedReceiver<Got>,
    handles: Vec<JoinHandle<()>>,
    stats: Arc<PoolStats>,
    printed_errors: u64,
}

impl Pool {
    fn spawn(
        name: &str,
        c: Arc<SimpleConsumer>,
        topic: String,
        expr: String,
        batch: i32,
        invisible: Duration,
        k: usize,
    ) -> Pool {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(PoolStats::default());
        let mut handles = Vec::new();
        for _ in 0..k {
            let (c, topic, expr, tx, stats) = (c.clone(), topic.clone(), expr.clone(), tx.clone(), stats.clone());
            handles.push(tokio::spawn(async move {
                loop {
                    let t0 = Instant::now();
                    let f = FilterExpression::new(FilterType::Tag, expr.clone());
                    let r = c.receive_with(&topic, &f, batch, invisible).await;
                    stats.receives.fetch_add(1, Ordering::Relaxed);
                    let got = match r {
                        Ok(v) if v.is_empty() => {
                            stats.empty.fetch_add(1, Ordering::Relaxed);
                            if t0.elapsed() < Duration::from_millis(50) {
                                stats.fast_empty.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            continue;
                        }
                        Ok(v) => Got { at: Instant::now(), wall_ms: now_ms(), res: Ok(v) },
                        Err(e) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            Got { at: Instant::now(), wall_ms: now_ms(), res: Err(e.to_string()) }
                        }
                    };
                    let was_err = got.res.is_err();
                    if tx.send(got).is_err() {
                        return;
                    }
                    if was_err {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }));
        }
        Pool { name: name.to_string(), rx, handles, stats, printed_errors: 0 }
    }

    /// Next batch of messages received before `until` (errors are printed and
    /// tolerated). None at `until`.
    async fn next(&mut self, until: Instant) -> Option<(Instant, i64, Vec<MessageView>)> {
        loop {
            let now = Instant::now();
            if now >= until {
                return None;
            }
            match tokio::time::timeout(until - now, self.rx.recv()).await {
                Err(_) | Ok(None) => return None,
                Ok(Some(g)) => match g.res {
                    Ok(v) => return Some((g.at, g.wall_ms, v)),
                    Err(e) => {
                        self.printed_errors += 1;
                        if self.printed_errors <= 5 || self.printed_errors % 25 == 0 {
                            say!("{}: receive error #{} (tolerated): {e}", self.name, self.printed_errors);
                        }
                    }
                },
            }
        }
    }

    fn summary(&self) -> String {
        format!(
            "{}: receives={} empty={} fast_empty={} errors={}",
            self.name,
            self.stats.receives.load(Ordering::Relaxed),
            self.stats.empty.load(Ordering::Relaxed),
            self.stats.fast_empty.load(Ordering::Relaxed),
            self.stats.errors.load(Ordering::Relaxed)
        )
    }

    fn stop(&mut self) {
        for h in &self.handles {
            h.abort();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------- tracking

#[derive(Default, Debug)]
struct Rec {
    seq: usize,
    group: Option<String>,
    body: Vec<u8>,
    sent_ok: bool,
    send_failures: u32,
    seen: u32,
    acked: bool,
    ack_failed: bool,
    /// When the last ack attempt failed. Its outcome is unknown (a failover
    /// can apply an ack and still fail the call; the retry then sees a stale
    /// handle): the message is settled either by a redelivery and a good
    /// ack, or by no redelivery within its invisible duration.
    ack_failed_at: Option<Instant>,
    attempts: Vec<i32>,
}

impl Rec {
    fn ack_result(&mut self, r: &R<()>) {
        match r {
            Ok(()) => {
                self.acked = true;
                self.ack_failed_at = None;
            }
            Err(_) => {
                self.ack_failed = true;
                self.ack_failed_at = Some(Instant::now());
            }
        }
    }
    fn settled(&self, now: Instant, invisible: Duration) -> bool {
        self.acked || self.ack_failed_at.map(|t| now > t + invisible + Duration::from_secs(5)).unwrap_or(false)
    }
}

#[derive(Default)]
struct Tracker {
    recs: HashMap<String, Rec>,
    by_seq: Vec<String>,
    sender_error: Option<String>,
    sent: usize,
}

impl Tracker {
    fn acked(&self) -> usize {
        self.recs.values().filter(|r| r.acked).count()
    }
    fn settled(&self, now: Instant, invisible: Duration) -> usize {
        self.recs.values().filter(|r| r.settled(now, invisible)).count()
    }
}

/// A message of another run reached a consumer subscribed to this run's tag.
fn filter_check(o: &Opts, v: &MessageView) -> R<()> {
    if v.tag() != Some(o.tag().as_str()) && !o.lenient_filter {
        bail!(
            "tag filter leak: subscribed to {:?}, got message {} with tag {:?} (use --lenient-filter for brokers without filtering)",
            o.tag(),
            v.message_id(),
            v.tag()
        );
    }
    Ok(())
}

fn is_ours(o: &Opts, v: &MessageView) -> bool {
    v.properties().get("run").map(|r| r == &o.run).unwrap_or(false)
}

/// Compare a received message with what was sent.
fn check_fields(o: &Opts, topic: &str, v: &MessageView, rec: &Rec) -> R<()> {
    let id = v.message_id();
    if v.topic() != topic {
        bail!("message {id}: topic {:?}, expected {topic:?}", v.topic());
    }
    if v.body() != rec.body.as_slice() {
        bail!(
            "message {id}: body {:?}, expected {:?}",
            String::from_utf8_lossy(v.body()),
            String::from_utf8_lossy(&rec.body)
        );
    }
    if v.tag() != Some(o.tag().as_str()) {
        bail!("message {id}: tag {:?}, expected {:?}", v.tag(), o.tag());
    }
    let want_keys = keys(o, rec.seq);
    let mut got_keys = v.keys().to_vec();
    got_keys.sort();
    let mut wk = want_keys.clone();
    wk.sort();
    if got_keys != wk {
        bail!("message {id}: keys {:?}, expected {:?}", v.keys(), want_keys);
    }
    if v.properties().get("seq") != Some(&rec.seq.to_string()) {
        bail!("message {id}: property seq {:?}, expected {}", v.properties().get("seq"), rec.seq);
    }
    if v.message_group() != rec.group.as_deref() {
        bail!("message {id}: message group {:?}, expected {:?}", v.message_group(), rec.group);
    }
    if v.delivery_attempt() < 1 {
        bail!("message {id}: delivery_attempt {} (missing; must be >= 1)", v.delivery_attempt());
    }
    if v.born_timestamp() <= 0 {
        bail!("message {id}: born_timestamp {} missing", v.born_timestamp());
    }
    Ok(())
}

/// Sends `msgs` one after another (each acknowledged before the next), first
/// `gate_after` of them, then waits for the kill gate, then the rest.
fn spawn_sender(
    producer: Arc<Producer>,
    msgs: Vec<CMsg>,
    tr: Arc<Mutex<Tracker>>,
    gate_after: usize,
    mut gate: watch::Receiver<bool>,
    until: Instant,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for (i, m) in msgs.iter().enumerate() {
            if i == gate_after {
                while !*gate.borrow() {
                    if gate.changed().await.is_err() {
                        break;
                    }
                }
                say!("sender: kill gate open, sending the remaining {}", msgs.len() - i);
            }
            match send_retry(&producer, m, until).await {
                Ok(f) => {
                    let mut t = tr.lock().unwrap();
                    let r = t.recs.get_mut(&m.id).unwrap();
                    r.sent_ok = true;
                    r.send_failures = f;
                    t.sent += 1;
                }
                Err(e) => {
                    tr.lock().unwrap().sender_error = Some(e);
                    return;
                }
            }
        }
        say!("sender: all {} sent and acknowledged", msgs.len());
    })
}

// ------------------------------------------------------- scenario: normal / fifo

/// Shared consume loop of `normal` and `fifo`.
async fn sc_ordered(o: &Opts, fifo: bool) -> R<String> {
    let topic = o.topic_or(if fifo { "compat-fifo" } else { "compat-normal" });
    let group =
        if fifo { o.group.clone().unwrap_or_else(|| "compat-fifo-group".to_string()) } else { o.group_or_unique() };
    let n = if o.count > 0 {
        o.count
    } else if fifo {
        30
    } else {
        40
    };
    let ngroups = o.fifo_groups;
    let batch = o.batch.unwrap_or(if fifo { 1 } else { 32 });
    let until = o.deadline_at();

    let consumer = Arc::new(start_consumer(o, &group, Some(vec![topic.clone()])).await?);
    let invisible = Duration::from_secs(15);
    let mut pool = Pool::spawn("consumer", consumer.clone(), topic.clone(), o.tag(), batch, invisible, o.receivers);
    let producer = Arc::new(start_producer(o, vec![topic.clone()], None).await?);

    let tr = Arc::new(Mutex::new(Tracker::default()));
    let mut msgs = Vec::new();
    let mut groups: Vec<String> = Vec::new();
    for g in 0..ngroups {
        groups.push(format!("g{}-{g}", o.run));
    }
    for seq in 0..n {
        let mut b = MessageBuilder::builder()
            .set_topic(topic.clone())
            .set_body(body(o, if fifo { "fifo" } else { "normal" }, seq))
            .set_tag(o.tag())
            .set_keys(keys(o, seq))
            .set_properties(props(o, seq));
        let g = if fifo { Some(groups[seq % ngroups].clone()) } else { None };
        if let Some(g) = &g {
            b = b.set_message_group(g.clone());
        }
        let m = CMsg::from_builder(b)?;
        let mut t = tr.lock().unwrap();
        t.by_seq.push(m.id.clone());
        t.recs.insert(m.id.clone(), Rec { seq, group: g, body: m.body.clone(), ..Default::default() });
        msgs.push(m);
    }
    let (gate_tx, gate_rx) = watch::channel(false);
    let sender = spawn_sender(producer.clone(), msgs, tr.clone(), n / 2, gate_rx, until);
    say!(
        "sending {n} {} messages to {topic} (tag {}, run {}){}",
        if fifo { "FIFO" } else { "normal" },
        o.tag(),
        o.run,
        if fifo { format!(" over {ngroups} message groups") } else { String::new() }
    );

    let mut foreign = 0usize;
    let mut redeliveries = 0usize;
    let mut send_dups = 0usize;
    let mut ack_failures = 0usize;
    let mut order: Vec<usize> = Vec::new();
    // FIFO hold-back probe: (held message, its group, seq, probe end)
    let mut held: Option<(MessageView, String, usize, Instant)> = None;
    let mut probe_done = !fifo;
    let mut probe_released: Option<(Instant, String, usize)> = None;
    let mut probe_next_ms: Option<u128> = None;
    let mut all_done_at: Option<Instant> = None;
    let quiet = Duration::from_secs(3);

    loop {
        if let Some(e) = tr.lock().unwrap().sender_error.clone() {
            bail!("{e}");
        }
        let now = Instant::now();
        // hold-back probe: release the held message at the end of its window
        if matches!(&held, Some((_, _, _, end)) if now >= *end) {
            let (hv, g, s, _) = held.take().unwrap();
            let id = hv.message_id().to_string();
            say!("probe: no other message of {g} during {} ms while seq {s} unacked; acking it", ms(o.probe));
            let ok = ack_retry(&consumer, &hv).await;
            let mut t = tr.lock().unwrap();
            let r = t.recs.get_mut(&id).unwrap();
            r.ack_result(&ok);
            if ok.is_err() {
                ack_failures += 1
            }
            probe_done = true;
            probe_released = Some((Instant::now(), g, s));
        }
        if let Some((t0, g, s)) = &probe_released {
            if probe_next_ms.is_none() && now > *t0 + Duration::from_secs(15) {
                bail!("after acking seq {s} of {g}, the next message of {g} did not come within 15 s");
            }
        }
        {
            let t = tr.lock().unwrap();
            let acked = t.acked();
            let probe_finished = !fifo || probe_next_ms.is_some();
            if probe_done && probe_finished && !KILL_PRINTED.load(Ordering::SeqCst) && acked >= n / 4 {
                drop(t);
                kill_point(&format!("{acked} of {n} acked, {} sends pending", n - n / 2));
                let _ = gate_tx.send(true);
            } else if t.sent == n && t.settled(now, invisible) == n && all_done_at.is_none() && held.is_none() {
                all_done_at = Some(now);
                say!(
                    "all {n} sent and acked ({} with an ack of unknown outcome never redelivered); watching {} s for anything more",
                    n - acked,
                    quiet.as_secs()
                );
            }
        }
        if let Some(d) = all_done_at {
            if now >= d + quiet {
                break;
            }
        }
        if now > until {
            let t = tr.lock().unwrap();
            let missing: Vec<usize> =
                t.recs.values().filter(|r| !r.settled(now, invisible)).map(|r| r.seq).collect::<Vec<_>>();
            bail!(
                "deadline: sent {} of {n}, acked {} of {n}; unacked seqs {:?}; {}",
                t.sent,
                t.acked(),
                {
                    let mut m = missing;
                    m.sort();
                    m
                },
                pool.summary()
            );
        }
        let wait_until = (now + Duration::from_millis(200)).min(until);
        let Some((at, _wall, batch_msgs)) = pool.next(wait_until).await else { continue };
        let mut seen_in_batch: HashSet<String> = HashSet::new();
        for v in batch_msgs {
            let id = v.message_id().to_string();
            if !is_ours(o, &v) {
                foreign += 1;
                filter_check(o, &v)?;
                let _ = consumer.ack(&v).await;
                continue;
            }
            // ----- checks under the lock, ack outside it
            let verdict: R<bool> = {
                let mut t = tr.lock().unwrap();
                let Some(rec) = t.recs.get(&id) else {
                    bail!("received message {id} of this run that was never sent");
                };
                check_fields(o, &topic, &v, rec)?;
                let (seq, g) = (rec.seq, rec.group.clone());
                if rec.acked {
                    if rec.send_failures > 0 && !o.strict {
                        say!("duplicate of seq {seq} after ack: its send was retried (ambiguous first attempt); accepted");
                        send_dups += 1;
                        Ok(true)
                    } else {
                        bail!("seq {seq} ({id}) delivered again after it was acked (attempt {})", v.delivery_attempt());
                    }
                } else if rec.seen > 0 {
                    redeliveries += 1;
                    let r = t.recs.get_mut(&id).unwrap();
                    r.seen += 1;
                    r.ack_failed_at = None;
                    r.attempts.push(v.delivery_attempt());
                    say!("redelivery of unacked seq {seq}, attempt {}", v.delivery_attempt());
                    Ok(true)
                } else {
                    // first reception
                    if fifo {
                        let g = g.clone().unwrap();
                        // every earlier seq of this group must have been acked
                        // (or have had an ack attempt), or be earlier in this batch
                        for e in (seq % ngroups..seq).step_by(ngroups) {
                            let eid = t.by_seq[e].clone();
                            let er = &t.recs[&eid];
                            let ok = er.acked || er.ack_failed || seen_in_batch.contains(&eid);
                            if !ok {
                                bail!(
                                    "FIFO violation in {g}: got seq {seq} while earlier seq {e} is {}",
                                    if er.seen == 0 { "not yet delivered" } else { "delivered but not acked" }
                                );
                            }
                        }
                        if let Some((_, hg, hs, _)) = &held {
                            if *hg == g {
                                bail!("hold-back violated: got seq {seq} of {g} while seq {hs} is held unacked");
                            }
                        }
                        if let Some((t0, pg, _)) = &probe_released {
                            if *pg == g && probe_next_ms.is_none() {
                                probe_next_ms = Some(ms(at - *t0));
                                say!("probe: next message of {g} (seq {seq}) came {} ms after the ack", ms(at - *t0));
                            }
                        }
                    }
                    if v.delivery_attempt() > 1 {
                        say!(
                            "seq {seq} first seen with delivery attempt {} (an earlier delivery never reached this client)",
                            v.delivery_attempt()
                        );
                    }
                    let r = t.recs.get_mut(&id).unwrap();
                    r.seen += 1;
                    r.attempts.push(v.delivery_attempt());
                    order.push(seq);
                    seen_in_batch.insert(id.clone());
                    // start the hold-back probe on the first FIFO message
                    if fifo && !probe_done && held.is_none() {
                        Ok(false)
                    } else {
                        Ok(true)
                    }
                }
            };
            let do_ack = verdict?;
            if !do_ack {
                let (g, s) = {
                    let t = tr.lock().unwrap();
                    let r = &t.recs[&id];
                    (r.group.clone().unwrap(), r.seq)
                };
                say!("probe: holding seq {s} of {g} unacked for {} ms", ms(o.probe));
                held = Some((v, g, s, Instant::now() + o.probe));
                continue;
            }
            let res = ack_retry(&consumer, &v).await;
            let mut t = tr.lock().unwrap();
            let r = t.recs.get_mut(&id).unwrap();
            r.ack_result(&res);
            if res.is_err() {
                ack_failures += 1;
            }
        }
    }
    let _ = sender.await;
    pool.stop();
    say!("{}", pool.summary());
    say!("first-delivery order: {:?}", order);
    let t = tr.lock().unwrap();
    let send_retries: u32 = t.recs.values().map(|r| r.send_failures).sum();
    let mut fig = format!(
        "sent={n} acked={} redeliveries={redeliveries} send_retries={send_retries} send_dups={send_dups} ack_failures={ack_failures} foreign={foreign}",
        t.acked()
    );
    if fifo {
        fig += &format!(" groups={ngroups} probe_next_ms={}", probe_next_ms.unwrap_or(0));
    }
    Ok(fig)
}

// ------------------------------------------------------- scenario: delay

/// Sends a delay message due `secs` from now, rounded up to a whole second
/// (the crate carries whole seconds only: Timestamp{seconds, nanos: 0}).
/// Returns (message, due seconds, sent-ok wall ms, send retries).
async fn send_delay(
    o: &Opts,
    producer: &Producer,
    topic: &str,
    name: &str,
    seq: usize,
    secs: i64,
    until: Instant,
) -> R<(CMsg, i64, i64, u32)> {
    let ts = (now_ms() + secs * 1000 + 999) / 1000;
    let b = MessageBuilder::delay_message_builder(topic.to_string(), body(o, "delay", seq), ts)
        .set_tag(o.tag())
        .set_keys(keys(o, seq))
        .set_properties(props(o, seq));
    let m = CMsg::from_builder(b)?;
    let f = send_retry(producer, &m, until).await?;
    let sent = now_ms();
    say!("sent {name} ({}) due at +{} ms (ts {ts} s), send retries {f}", m.id, ts * 1000 - sent);
    Ok((m, ts, sent, f))
}

async fn sc_delay(o: &Opts) -> R<String> {
    let topic = o.topic_or("compat-delay");
    let group = o.group_or_unique();
    let until = o.deadline_at();
    let consumer = Arc::new(start_consumer(o, &group, Some(vec![topic.clone()])).await?);
    let mut pool =
        Pool::spawn("consumer", consumer.clone(), topic.clone(), o.tag(), 32, Duration::from_secs(15), o.receivers);
    let producer = start_producer(o, vec![topic.clone()], None).await?;

    // id -> (name, delivery timestamp ms, sent-ok wall ms)
    let mut want: HashMap<String, (String, i64, i64)> = HashMap::new();
    let mut recs: HashMap<String, Rec> = HashMap::new();
    let mut late: Vec<(String, i64)> = Vec::new();
    let mut foreign = 0;
    for (name, seq, secs) in [("D1", 0usize, 3i64), ("D2", 1, 6)] {
        let (m, ts, sent, f) = send_delay(o, &producer, &topic, name, seq, secs, until).await?;
        want.insert(m.id.clone(), (name.to_string(), ts * 1000, sent));
        recs.insert(
            m.id.clone(),
            Rec { seq, body: m.body.clone(), sent_ok: true, send_failures: f, ..Default::default() },
        );
    }
    let mut d3_sent = false;
    let mut done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > until {
            let missing: Vec<&String> = want.iter().filter(|(id, _)| !recs[*id].acked).map(|(_, w)| &w.0).collect();
            bail!("deadline: not received {:?}; {}", missing, pool.summary());
        }
        if KILL_PRINTED.load(Ordering::SeqCst) && !d3_sent {
            let (m, ts, sent, f) = send_delay(o, &producer, &topic, "D3", 2, 3, until).await?;
            want.insert(m.id.clone(), ("D3".to_string(), ts * 1000, sent));
            recs.insert(
                m.id.clone(),
                Rec { seq: 2, body: m.body.clone(), sent_ok: true, send_failures: f, ..Default::default() },
            );
            d3_sent = true;
        }
        if d3_sent && done_at.is_none() && recs.values().all(|r| r.settled(now, Duration::from_secs(15))) {
            done_at = Some(now);
            say!("all 3 delayed messages received and acked; watching 2 s for more");
        }
        if let Some(d) = done_at {
            if now > d + Duration::from_secs(2) {
                break;
            }
        }
        let Some((_at, wall, msgs)) = pool.next((now + Duration::from_millis(200)).min(until)).await else {
            continue;
        };
        for v in msgs {
            let id = v.message_id().to_string();
            if !is_ours(o, &v) {
                foreign += 1;
                filter_check(o, &v)?;
                let _ = consumer.ack(&v).await;
                continue;
            }
            let Some((name, due, sent)) = want.get(&id).cloned() else {
                bail!("received unknown message {id} of this run");
            };
            let rec = recs.get_mut(&id).unwrap();
            check_fields(o, &topic, &v, rec)?;
            if let Some(ts) = v.delivery_timestamp() {
                if ts * 1000 != due {
                    bail!("{name}: delivery timestamp {ts} s in the received message, sent {} s", due / 1000);
                }
            }
            if rec.acked {
                if rec.send_failures > 0 && !o.strict {
                    say!("{name}: duplicate after ack of a retried send; accepted");
                    continue;
                }
                bail!("{name} ({id}) delivered again after ack");
            }
            if rec.seen == 0 {
                let early = due - 50 - wall;
                if early > 0 {
                    bail!("{name} received {} ms BEFORE its delivery time (tolerance 50 ms)", due - wall);
                }
                let lateness = wall - due.max(sent);
                say!(
                    "{name} received {} ms after its delivery time (lateness vs max(due, sent) = {lateness} ms), attempt {}",
                    wall - due,
                    v.delivery_attempt()
                );
                if lateness > o.max_late_ms {
                    bail!("{name} arrived {lateness} ms late (> {} ms)", o.max_late_ms);
                }
                late.push((name.clone(), lateness));
            } else {
                say!("{name}: redelivery of unacked message, attempt {}", v.delivery_attempt());
                rec.ack_failed_at = None;
            }
            rec.seen += 1;
            let r = ack_retry(&consumer, &v).await;
            rec.ack_result(&r);
            if name == "D1" {
                kill_point("D1 delivered; D2 still pending in the delay schedule");
            }
        }
    }
    pool.stop();
    say!("{}", pool.summary());
    late.sort();
    Ok(late.iter().map(|(n, l)| format!("{}_late_ms={l}", n.to_lowercase())).collect::<Vec<_>>().join(" ")
        + &format!(" foreign={foreign}"))
}

// ------------------------------------------------------- scenario: transaction

#[derive(Default)]
struct CheckLog {
    /// message id -> resolution to answer (1 commit, 2 rollback, 0 unknown)
    answers: HashMap<String, u8>,
    /// (message id, transaction id, wall ms, answer)
    calls: Vec<(String, String, i64, u8)>,
}

fn resolution(code: u8) -> TransactionResolution {
    match code {
        1 => TransactionResolution::COMMIT,
        2 => TransactionResolution::ROLLBACK,
        _ => TransactionResolution::UNKNOWN,
    }
}

/// After an explicit commit/rollback failed: did a check answer `code` for it?
fn resolved_by_check(log: &Arc<Mutex<CheckLog>>, id: &str, code: u8) -> R<()> {
    let l = log.lock().unwrap();
    if l.calls.iter().any(|c| c.0 == id && c.3 == code) {
        Ok(())
    } else {
        Err("no check resolved it".to_string())
    }
}

fn checker_for(log: Arc<Mutex<CheckLog>>) -> Checker {
    Arc::new(move |tid: String, mv: MessageView| {
        let mut l = log.lock().unwrap();
        let id = mv.message_id().to_string();
        let ans = l.answers.get(&id).copied().unwrap_or(0);
        say!(
            "checker called: message {id} transaction {tid} topic {} -> {}",
            mv.topic(),
            match ans {
                1 => "COMMIT",
                2 => "ROLLBACK",
                _ => "UNKNOWN",
            }
        );
        l.calls.push((id, tid, now_ms(), ans));
        resolution(ans)
    })
}

async fn sc_transaction(o: &Opts) -> R<String> {
    let topic = o.topic_or("compat-tx");
    let group = o.group_or_unique();
    let until = o.deadline_at();
    let consumer = Arc::new(start_consumer(o, &group, Some(vec![topic.clone()])).await?);
    let mut pool =
        Pool::spawn("consumer", consumer.clone(), topic.clone(), o.tag(), 32, Duration::from_secs(15), o.receivers);
    let log = Arc::new(Mutex::new(CheckLog::default()));
    let producer = start_producer(o, vec![topic.clone()], Some(checker_for(log.clone()))).await?;

    let mk = |seq: usize, what: &str| -> R<CMsg> {
        CMsg::from_builder(
            MessageBuilder::transaction_message_builder(topic.clone(), body(o, what, seq))
                .set_tag(o.tag())
                .set_keys(keys(o, seq))
                .set_properties(props(o, seq)),
        )
    };
    let a = mk(0, "tx-commit-A")?;
    let b = mk(1, "tx-rollback-B")?;
    let c = mk(2, "tx-commit-after-failover-C")?;
    // The checker answers UNKNOWN for A and B until this program commits or
    // rolls them back itself (a check can come at any time: the harness sets
    // the check interval to 2 s); C is COMMIT from the start, so a commit
    // lost in the failover is resolved by a check.
    log.lock().unwrap().answers.insert(c.id.clone(), 1);
    let names: HashMap<String, &str> =
        [(a.id.clone(), "A"), (b.id.clone(), "B"), (c.id.clone(), "C")].into_iter().collect();
    let mut recs: HashMap<String, Rec> = HashMap::new();
    for (i, m) in [&a, &b, &c].iter().enumerate() {
        recs.insert(m.id.clone(), Rec { seq: i, body: m.body.clone(), ..Default::default() });
    }

    let (ta, fa) = send_tx_retry(&producer, &a, until).await?;
    say!("half A sent ({}, transaction {})", a.id, ta.transaction_id());
    let (tb, fb) = send_tx_retry(&producer, &b, until).await?;
    say!("half B sent ({}, transaction {})", b.id, tb.transaction_id());
    recs.get_mut(&a.id).unwrap().send_failures = fa;
    recs.get_mut(&b.id).unwrap().send_failures = fb;

    // receive-side state
    let mut got_at: HashMap<String, Instant> = HashMap::new();
    let mut foreign = 0;
    let mut committed_at: HashMap<String, Instant> = HashMap::new();
    let mut rollback_at: Option<Instant> = None;
    let mut c_sent = false;
    let mut c_commit_err: Option<String> = None;
    let phase0_end = Instant::now() + Duration::from_secs(2);
    let mut ta = Some(ta);
    let mut tb = Some(tb);
    let mut done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > until {
            bail!(
                "deadline: received {:?}; checker calls {}; {}",
                got_at.keys().map(|k| names[k]).collect::<Vec<_>>(),
                log.lock().unwrap().calls.len(),
                pool.summary()
            );
        }
        if now >= phase0_end && ta.is_some() {
            say!("nothing visible 2 s after the half messages; committing A, rolling back B");
            let t = ta.take().unwrap();
            log.lock().unwrap().answers.insert(a.id.clone(), 1);
            committed_at.insert(a.id.clone(), Instant::now());
            if let Err(e) = t.commit().await {
                resolved_by_check(&log, &a.id, 1).map_err(|w| format!("commit A: {e} ({w})"))?;
                say!("commit A failed ({e}) but a check had already committed it");
            }
            let t = tb.take().unwrap();
            log.lock().unwrap().answers.insert(b.id.clone(), 2);
            rollback_at = Some(Instant::now());
            if let Err(e) = t.rollback().await {
                resolved_by_check(&log, &b.id, 2).map_err(|w| format!("rollback B: {e} ({w})"))?;
                say!("rollback B failed ({e}) but a check had already rolled it back");
            }
        }
        if let Some(t0) = committed_at.get(&a.id) {
            if !got_at.contains_key(&a.id) && now > *t0 + Duration::from_secs(10) {
                bail!("A not delivered within 10 s of its commit");
            }
        }
        if got_at.contains_key(&a.id) && !KILL_PRINTED.load(Ordering::SeqCst) {
            kill_point("A committed and delivered, B rolled back");
        }
        if KILL_PRINTED.load(Ordering::SeqCst) && !c_sent {
            let (tc, fc) = send_tx_retry(&producer, &c, until).await?;
            recs.get_mut(&c.id).unwrap().send_failures = fc;
            say!("half C sent after the kill point ({}, send retries {fc}); committing", c.id);
            committed_at.insert(c.id.clone(), Instant::now());
            if let Err(e) = tc.commit().await {
                // Transaction::commit consumes the transaction: the checker
                // (answering COMMIT for C) has to resolve it now.
                say!("commit C failed ({e}); the broker's check must resolve it");
                c_commit_err = Some(e.to_string());
            }
            c_sent = true;
        }
        if c_sent && done_at.is_none() && got_at.contains_key(&a.id) && got_at.contains_key(&c.id) {
            let quiet_until = rollback_at.unwrap() + Duration::from_secs(8);
            let end = quiet_until.max(now + Duration::from_secs(2));
            say!("A and C delivered; watching until {} ms from now that B never comes", ms(end - now));
            done_at = Some(end);
        }
        if let Some(d) = done_at {
            if now >= d {
                break;
            }
        }
        let Some((at, _wall, msgs)) = pool.next((now + Duration::from_millis(200)).min(until)).await else {
            continue;
        };
        for v in msgs {
            let id = v.message_id().to_string();
            if !is_ours(o, &v) {
                foreign += 1;
                filter_check(o, &v)?;
                let _ = consumer.ack(&v).await;
                continue;
            }
            let Some(name) = names.get(&id).copied() else {
                bail!("received unknown message {id} of this run");
            };
            let rec = recs.get_mut(&id).unwrap();
            check_fields(o, &topic, &v, rec)?;
            if name == "B" {
                bail!("B was delivered although it was rolled back (attempt {})", v.delivery_attempt());
            }
            match committed_at.get(&id) {
                None => bail!("{name} delivered before its commit"),
                Some(t0) if rec.seen == 0 => {
                    say!("{name} delivered {} ms after its commit", ms(at - *t0));
                }
                _ => {}
            }
            if rec.acked {
                if rec.send_failures > 0 && !o.strict {
                    say!("{name}: duplicate after ack of a retried half message; accepted");
                    continue;
                }
                bail!("{name} delivered again after ack");
            }
            rec.seen += 1;
            got_at.entry(id.clone()).or_insert(at);
            let r = ack_retry(&consumer, &v).await;
            rec.ack_result(&r);
        }
    }
    pool.stop();
    say!("{}", pool.summary());
    let calls = log.lock().unwrap().calls.len();
    Ok(format!(
        "a_ms={} c_ms={} b_quiet_s=8 checker_calls={calls} c_commit={} foreign={foreign}",
        ms(got_at[&a.id] - committed_at[&a.id]),
        ms(got_at[&c.id] - committed_at[&c.id]),
        if c_commit_err.is_some() { "by-check" } else { "client" }
    ))
}

// ------------------------------------------------------- scenario: orphan

async fn sc_orphan_child(o: &Opts) -> R<String> {
    let topic = o.topic_or("compat-tx");
    let until = Instant::now() + Duration::from_secs(30);
    let log = Arc::new(Mutex::new(CheckLog::default()));
    let producer = start_producer(o, vec![topic.clone()], Some(checker_for(log))).await?;
    let m = CMsg::from_builder(
        MessageBuilder::transaction_message_builder(topic.clone(), body(o, "orphan", 0))
            .set_tag(o.tag())
            .set_keys(keys(o, 0))
            .set_properties(props(o, 0)),
    )?;
    let (t, f) = send_tx_retry(&producer, &m, until).await?;
    println!("ORPHAN {} {} {f}", m.id, t.transaction_id());
    let _ = std::io::stdout().flush();
    // exit without commit, rollback or shutdown
    std::process::exit(0);
}

async fn sc_orphan(o: &Opts) -> R<String> {
    let topic = o.topic_or("compat-tx");
    let group = o.group_or_unique();
    let until = o.deadline_at();
    let consumer = Arc::new(start_consumer(o, &group, Some(vec![topic.clone()])).await?);
    let mut pool =
        Pool::spawn("consumer", consumer.clone(), topic.clone(), o.tag(), 32, Duration::from_secs(15), o.receivers);

    // child: sends a half message and exits
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("orphan-child")
        .arg(&o.endpoint)
        .args(["--topic", &topic, "--run", &o.run])
        .args(["--timeout-secs", &o.rpc_timeout.as_secs().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    say!("starting child process to send the orphan half message");
    let out = tokio::time::timeout(Duration::from_secs(40), cmd.output())
        .await
        .map_err(|_| "child did not finish within 40 s".to_string())?
        .map_err(|e| format!("child: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ORPHAN "))
        .ok_or_else(|| format!("child failed ({}): {stdout}", out.status))?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (oid, otid, child_retries) = (parts[1].to_string(), parts[2].to_string(), parts[3].to_string());
    let child_exit = Instant::now();
    say!("child exited ({}) leaving half message {oid} (transaction {otid}) unresolved", out.status);

    let log = Arc::new(Mutex::new(CheckLog::default()));
    log.lock().unwrap().answers.insert(oid.clone(), 1);
    let _producer = start_producer(o, vec![topic.clone()], Some(checker_for(log.clone()))).await?;
    kill_point("new transactional producer with a COMMIT checker is up; orphan unresolved");

    let mut check_at: Option<Instant> = None;
    let mut got: Option<(Instant, i32)> = None;
    let mut acked = false;
    let mut ack_failed_at: Option<Instant> = None;
    let mut foreign = 0;
    let mut done_at: Option<Instant> = None;
    let exp_body = body(o, "orphan", 0);
    loop {
        let now = Instant::now();
        if check_at.is_none() {
            let l = log.lock().unwrap();
            if let Some(c) = l.calls.iter().find(|c| c.0 == oid) {
                if c.1 != otid {
                    say!("note: check for {oid} carries transaction id {}, the send returned {otid}", c.1);
                }
                check_at = Some(now);
                say!("checker called for the orphan {} ms after the child exited", ms(now - child_exit));
            }
        }
        if check_at.is_none() && now > child_exit + Duration::from_secs(30) {
            bail!(
                "the broker did not call the checker for orphan {oid} within 30 s (checker calls: {:?})",
                log.lock().unwrap().calls
            );
        }
        if let Some(c) = check_at {
            if got.is_none() && now > c + Duration::from_secs(15) {
                bail!("orphan committed by the checker but not delivered within 15 s");
            }
        }
        let ack_unknown_settled = ack_failed_at.map(|t| now > t + Duration::from_secs(20)).unwrap_or(false);
        if (acked || ack_unknown_settled) && done_at.is_none() {
            done_at = Some(now + Duration::from_secs(2));
        }
        if let Some(d) = done_at {
            if now > d {
                break;
            }
        }
        if now > until {
            bail!("deadline; {}", pool.summary());
        }
        let Some((at, _wall, msgs)) = pool.next((now + Duration::from_millis(200)).min(until)).await else {
            continue;
        };
        for v in msgs {
            let id = v.message_id().to_string();
            if !is_ours(o, &v) {
                foreign += 1;
                filter_check(o, &v)?;
                let _ = consumer.ack(&v).await;
                continue;
            }
            if id != oid {
                bail!("received unknown message {id} of this run");
            }
            if v.body() != exp_body.as_slice() || v.tag() != Some(o.tag().as_str()) {
                bail!("orphan delivered with wrong body/tag: {:?} {:?}", String::from_utf8_lossy(v.body()), v.tag());
            }
            if check_at.is_none() {
                // the checker's callback and the delivery can race by a few ms
                let l = log.lock().unwrap();
                if !l.calls.iter().any(|c| c.0 == oid) {
                    bail!("orphan {oid} delivered before any check resolved it");
                }
                check_at = Some(at);
            }
            if acked {
                if child_retries != "0" && !o.strict {
                    continue;
                }
                bail!("orphan delivered again after ack");
            }
            if got.is_none() {
                say!(
                    "orphan delivered {} ms after the check, attempt {}",
                    ms(at - check_at.unwrap()),
                    v.delivery_attempt()
                );
                got = Some((at, v.delivery_attempt()));
            }
            if ack_retry(&consumer, &v).await.is_ok() {
                acked = true;
                ack_failed_at = None;
            } else {
                // outcome unknown: a redelivery within the invisible time says it was not applied
                ack_failed_at = Some(Instant::now());
            }
        }
    }
    pool.stop();
    say!("{}", pool.summary());
    let calls = log.lock().unwrap().calls.len();
    Ok(format!(
        "check_after_ms={} deliver_after_check_ms={} checker_calls={calls} foreign={foreign}",
        ms(check_at.unwrap() - child_exit),
        ms(got.unwrap().0 - check_at.unwrap())
    ))
}

// ------------------------------------------------------- scenario: invisible

mod raw {
    //! ChangeInvisibleDuration, which rocketmq 5.0.0 does not expose: one
    //! unary call with the same tonic 0.9 / prost 0.11 the crate uses, field
    //! numbers from the crate's own generated apache.rocketmq.v2 code.
    use std::time::Duration;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(string, tag = "1")]
        pub resource_namespace: String,
        #[prost(string, tag = "2")]
        pub name: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ChangeInvisibleDurationRequest {
        #[prost(message, optional, tag = "1")]
        pub group: Option<Resource>,
        #[prost(message, optional, tag = "2")]
        pub topic: Option<Resource>,
        #[prost(string, tag = "3")]
        pub receipt_handle: String,
        #[prost(message, optional, tag = "4")]
        pub invisible_duration: Option<prost_types::Duration>,
        #[prost(string, tag = "5")]
        pub message_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ChangeInvisibleDurationResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<Status>,
        #[prost(string, tag = "2")]
        pub receipt_handle: String,
    }

    /// Returns (status code, status message, new receipt handle).
    pub async fn change_invisible_duration(
        endpoint: &str,
        group: &str,
        topic: &str,
        handle: &str,
        message_id: &str,
        d: Duration,
    ) -> Result<(i32, String, String), String> {
        // a comma-separated ENDPOINT: the first address that connects
        let mut ch = None;
        let mut errs = Vec::new();
        for addr in endpoint.split(',') {
            let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(5));
            match ep.connect().await {
                Ok(c) => {
                    ch = Some(c);
                    break;
                }
                Err(e) => errs.push(format!("connect {addr}: {e}")),
            }
        }
        let ch = ch.ok_or_else(|| errs.join("; "))?;
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready().await.map_err(|e| format!("channel not ready: {e}"))?;
        let mut req = tonic::Request::new(ChangeInvisibleDurationRequest {
            group: Some(Resource { resource_namespace: String::new(), name: group.to_string() }),
            topic: Some(Resource { resource_namespace: String::new(), name: topic.to_string() }),
            receipt_handle: handle.to_string(),
            invisible_duration: Some(prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
            message_id: message_id.to_string(),
        });
        let md = req.metadata_mut();
        let now =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let id = format!("rocketmq-compat-raw@{}", std::process::id());
        for (k, v) in [
            ("x-mq-client-id", id.as_str()),
            ("x-mq-language", "RUST"),
            ("x-mq-client-version", "5.0.0"),
            ("x-mq-protocol-version", "2.0.0"),
            ("x-mq-date-time", now.as_str()),
        ] {
            if let Ok(v) = v.parse() {
                md.insert(k, v);
            }
        }
        let path = http::uri::PathAndQuery::from_static("/apache.rocketmq.v2.MessagingService/ChangeInvisibleDuration");
        let resp: tonic::Response<ChangeInvisibleDurationResponse> =
            grpc.unary(req, path, tonic::codec::ProstCodec::default()).await.map_err(|e| format!("rpc: {e}"))?;
        let r = resp.into_inner();
        let st = r.status.unwrap_or_default();
        Ok((st.code, st.message, r.receipt_handle))
    }
}

async fn sc_invisible(o: &Opts) -> R<String> {
    let topic = o.topic_or("compat-normal");
    let group = o.group_or_unique();
    let until = o.deadline_at();
    let consumer = Arc::new(start_consumer(o, &group, Some(vec![topic.clone()])).await?);
    let first_invisible = if o.change_invisible { Duration::from_secs(20) } else { Duration::from_secs(2) };
    let mut pool = Pool::spawn("consumer", consumer.clone(), topic.clone(), o.tag(), 32, first_invisible, o.receivers);
    let producer = start_producer(o, vec![topic.clone()], None).await?;
    let m = CMsg::from_builder(
        MessageBuilder::builder()
            .set_topic(topic.clone())
            .set_body(body(o, "invisible", 0))
            .set_tag(o.tag())
            .set_keys(keys(o, 0))
            .set_properties(props(o, 0)),
    )?;
    let f = send_retry(&producer, &m, until).await?;
    say!("sent {} (invisible {} s on receive)", m.id, first_invisible.as_secs());
    let rec = Rec { seq: 0, body: m.body.clone(), send_failures: f, ..Default::default() };

    let mut deliveries: Vec<(Instant, i32, String)> = Vec::new();
    let mut visible_again_from: Option<Instant> = None;
    let mut change_info = String::from("skipped");
    let mut acked_at: Option<Instant> = None;
    let mut ack_failed_at: Option<Instant> = None;
    let mut foreign = 0;
    loop {
        let now = Instant::now();
        if now > until {
            bail!("deadline: deliveries {:?}; {}", deliveries.iter().map(|d| d.1).collect::<Vec<_>>(), pool.summary());
        }
        if let Some(a) = acked_at {
            if now > a + Duration::from_secs(5) {
                break;
            }
        }
        if let Some(a) = ack_failed_at {
            // an ack of unknown outcome and no redelivery within the invisible time: it was applied
            if now > a + first_invisible + Duration::from_secs(5) {
                say!("the failed ack was applied after all: no redelivery");
                break;
            }
        }
        if let Some(v0) = visible_again_from {
            if deliveries.len() == 1 && now > v0 + Duration::from_secs(15) {
                bail!("not redelivered within 15 s after its invisible time ended");
            }
        }
        let Some((at, _wall, msgs)) = pool.next((now + Duration::from_millis(200)).min(until)).await else {
            continue;
        };
        for v in msgs {
            let id = v.message_id().to_string();
            if !is_ours(o, &v) {
                foreign += 1;
                filter_check(o, &v)?;
                let _ = consumer.ack(&v).await;
                continue;
            }
            if id != m.id {
                bail!("received unknown message {id} of this run");
            }
            check_fields(o, &topic, &v, &rec)?;
            let handle = v.receipt_handle();
            if handle.is_empty() {
                bail!("message {id} has an empty receipt handle");
            }
            if let Some(a) = acked_at {
                if f > 0 && !o.strict {
                    say!("duplicate of a retried send after ack; accepted");
                    continue;
                }
                bail!("delivered again {} ms after its ack (attempt {})", ms(at - a), v.delivery_attempt());
            }
            deliveries.push((at, v.delivery_attempt(), handle.clone()));
            ack_failed_at = None;
            if deliveries.len() == 1 {
                say!("delivery 1: attempt {}, handle {}", v.delivery_attempt(), short(&handle));
                if v.delivery_attempt() != 1 {
                    bail!("first delivery has delivery_attempt {}, expected 1", v.delivery_attempt());
                }
                if o.change_invisible {
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        let t0 = Instant::now();
                        match raw::change_invisible_duration(
                            &o.endpoint,
                            &group,
                            &topic,
                            &handle,
                            &id,
                            Duration::from_secs(2),
                        )
                        .await
                        {
                            Ok((20000, _, new_handle)) => {
                                if new_handle.is_empty() {
                                    bail!("ChangeInvisibleDuration returned OK but no receipt handle");
                                }
                                say!(
                                    "ChangeInvisibleDuration to 2 s: OK in {} ms, new handle {} ({})",
                                    ms(t0.elapsed()),
                                    short(&new_handle),
                                    if new_handle == handle { "SAME as before" } else { "differs" }
                                );
                                change_info =
                                    if new_handle == handle { "same-handle".into() } else { "new-handle".into() };
                                visible_again_from = Some(t0 + Duration::from_secs(2));
                                break;
                            }
                            Ok((code, msg, _)) => bail!("ChangeInvisibleDuration answered status {code}: {msg}"),
                            Err(e) if tries < 3 => say!("ChangeInvisibleDuration failed ({e}); retrying"),
                            Err(e) => bail!("ChangeInvisibleDuration failed 3 times: {e}"),
                        }
                    }
                } else {
                    visible_again_from = Some(at + first_invisible);
                }
                kill_point("message received and made visible again in 2 s, not acked");
            } else {
                let v0 = visible_again_from.unwrap();
                let since_change = at.saturating_duration_since(v0 - Duration::from_secs(2));
                say!(
                    "delivery {}: attempt {}, {} ms after the change, handle {}",
                    deliveries.len(),
                    v.delivery_attempt(),
                    ms(since_change),
                    short(&handle)
                );
                if deliveries.len() == 2 {
                    if since_change < Duration::from_millis(1500) {
                        bail!("redelivered after only {} ms (< 1500)", ms(since_change));
                    }
                    if v.delivery_attempt() != 2 {
                        bail!("redelivery has delivery_attempt {}, expected 2", v.delivery_attempt());
                    }
                }
                match ack_retry(&consumer, &v).await {
                    Ok(()) => {
                        acked_at = Some(Instant::now());
                        say!("acked with the handle of delivery {}; watching 5 s", deliveries.len());
                    }
                    Err(e) => {
                        say!("ack failed ({e}); outcome unknown, watching for another redelivery");
                        ack_failed_at = Some(Instant::now());
                    }
                }
            }
        }
    }
    pool.stop();
    say!("{}", pool.summary());
    let v0 = visible_again_from.unwrap();
    let redeliver_ms = ms(deliveries[1].0.saturating_duration_since(v0 - Duration::from_secs(2)));
    Ok(format!(
        "redelivered_after_ms={redeliver_ms} attempts={:?} change={change_info} foreign={foreign}",
        deliveries.iter().map(|d| d.1).collect::<Vec<_>>()
    ))
}

fn short(h: &str) -> String {
    if h.len() > 16 {
        format!("{}..({} chars)", &h[..16], h.len())
    } else {
        h.to_string()
    }
}

// ------------------------------------------------------- scenario: dlq

async fn sc_dlq(o: &Opts) -> R<String> {
    let topic = o.topic_or("compat-normal");
    let group = o.group.clone().unwrap_or_else(|| "compat-dlq-group".to_string());
    let dlq_topic = format!("%DLQ%{group}");
    let reader_group = format!("compat-dlq-reader-{}", o.run);
    let until = o.deadline_at();

    let consumer = Arc::new(start_consumer(o, &group, Some(vec![topic.clone()])).await?);
    let mut pool =
        Pool::spawn("consumer", consumer.clone(), topic.clone(), o.tag(), 32, Duration::from_secs(1), o.receivers);
    // reader of the DLQ topic; no route prefetch (the topic may not exist yet),
    // started now so that a group starting at the queue's end still sees it
    let reader = Arc::new(start_consumer(o, &reader_group, None).await?);
    let mut rpool =
        Pool::spawn("dlq-reader", reader.clone(), dlq_topic.clone(), "*".to_string(), 32, Duration::from_secs(15), 2);
    let producer = start_producer(o, vec![topic.clone()], None).await?;
    let m = CMsg::from_builder(
        MessageBuilder::builder()
            .set_topic(topic.clone())
            .set_body(body(o, "dlq", 0))
            .set_tag(o.tag())
            .set_keys(keys(o, 0))
            .set_properties(props(o, 0)),
    )?;
    let f = send_retry(&producer, &m, until).await?;
    say!("sent {} to {topic}; consumer in {group} will never ack it (invisible 1 s)", m.id);
    let rec = Rec { seq: 0, body: m.body.clone(), send_failures: f, ..Default::default() };

    let mut attempts: Vec<(Instant, i32)> = Vec::new();
    let mut dlq_got: Option<Instant> = None;
    let mut dlq_foreign = 0;
    let mut foreign = 0;
    let mut end: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > until {
            bail!(
                "deadline: attempts seen {:?}, in DLQ: {}; {}; {}",
                attempts.iter().map(|a| a.1).collect::<Vec<_>>(),
                dlq_got.is_some(),
                pool.summary(),
                rpool.summary()
            );
        }
        if let Some(e) = end {
            if now > e {
                break;
            }
        }
        let wait = (now + Duration::from_millis(100)).min(until);
        tokio::select! {
            g = pool.next(wait) => {
                let Some((at, _w, msgs)) = g else { continue };
                for v in msgs {
                    if !is_ours(o, &v) {
                        foreign += 1;
                        filter_check(o, &v)?;
                        let _ = consumer.ack(&v).await;
                        continue;
                    }
                    if v.message_id() != m.id {
                        bail!("unknown message {} of this run", v.message_id());
                    }
                    check_fields(o, &topic, &v, &rec)?;
                    say!("consumer: attempt {} (not acking)", v.delivery_attempt());
                    if let Some(d) = dlq_got {
                        bail!("attempt {} delivered {} ms AFTER the message reached the DLQ", v.delivery_attempt(), ms(at - d));
                    }
                    attempts.push((at, v.delivery_attempt()));
                    if attempts.len() as i32 > o.max_attempts {
                        bail!(
                            "delivered {} times (attempts {:?}); {group} allows {} attempts before the DLQ",
                            attempts.len(),
                            attempts.iter().map(|a| a.1).collect::<Vec<_>>(),
                            o.max_attempts
                        );
                    }
                    if attempts.len() == 1 {
                        kill_point("attempt 1 received and not acked");
                    }
                }
            }
            g = rpool.next(wait) => {
                let Some((at, _w, msgs)) = g else { continue };
                for v in msgs {
                    if v.message_id() != m.id {
                        dlq_foreign += 1;
                        let _ = reader.ack(&v).await;
                        continue;
                    }
                    if v.body() != m.body.as_slice() {
                        bail!("DLQ copy has body {:?}", String::from_utf8_lossy(v.body()));
                    }
                    if dlq_got.is_some() {
                        say!("DLQ copy delivered again (attempt {}) before its ack; ok", v.delivery_attempt());
                    } else {
                        say!(
                            "DLQ reader got {} from {} (topic field {:?}, tag {:?}, seq {:?}), {} ms after attempt {:?}",
                            v.message_id(),
                            dlq_topic,
                            v.topic(),
                            v.tag(),
                            v.properties().get("seq"),
                            attempts.last().map(|a| ms(at - a.0)).unwrap_or(0),
                            attempts.last().map(|a| a.1)
                        );
                        if v.topic() != dlq_topic {
                            bail!(
                                "the DLQ copy says topic {:?}, not {dlq_topic:?}: the crate acks with the message's topic field, so its ack goes to the wrong topic",
                                v.topic()
                            );
                        }
                        dlq_got = Some(at);
                        end = Some(Instant::now() + Duration::from_secs(3));
                    }
                    ack_retry(&reader, &v).await.map_err(|e| format!("ack of the DLQ copy failed: {e}"))?;
                }
            }
        }
    }
    pool.stop();
    rpool.stop();
    say!("{}", pool.summary());
    say!("{}", rpool.summary());
    let seen: Vec<i32> = attempts.iter().map(|a| a.1).collect();
    let want: Vec<i32> = (1..=o.max_attempts).collect();
    if seen != want {
        bail!("consumer saw delivery attempts {:?}, expected exactly {:?}", seen, want);
    }
    let gap = ms(attempts[attempts.len() - 1].0 - attempts[0].0);
    Ok(format!(
        "attempts={:?} first_to_last_attempt_ms={gap} dlq_after_ms={} foreign={foreign} dlq_foreign={dlq_foreign}",
        seen,
        ms(dlq_got.unwrap() - attempts[attempts.len() - 1].0)
    ))
}

// ------------------------------------------------------- main

async fn run(o: &Opts) -> R<String> {
    match o.scenario.as_str() {
        "normal" => sc_ordered(o, false).await,
        "fifo" => sc_ordered(o, true).await,
        "delay" => sc_delay(o).await,
        "transaction" => sc_transaction(o).await,
        "orphan" => sc_orphan(o).await,
        "orphan-child" => sc_orphan_child(o).await,
        "invisible" => sc_invisible(o).await,
        "dlq" => sc_dlq(o).await,
        other => bail!("unknown scenario {other}\n{USAGE}"),
    }
}

fn main() {
    START.get_or_init(Instant::now);
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let _ = SCENARIO.set(o.scenario.clone());
    if o.scenario == "push" {
        println!(
            "SKIP push: the official Rust crate rocketmq 5.0.0 has no PushConsumer (it exports only Producer and SimpleConsumer)"
        );
        std::process::exit(77);
    }
    std::panic::set_hook(Box::new(|info| {
        let sc = SCENARIO.get().cloned().unwrap_or_default();
        let msg = format!("FAIL {sc}: panic in the client (rocketmq 5.0.0 crate or this program): {info}");
        println!("{msg}");
        eprintln!("{msg}");
        let _ = std::io::stdout().flush();
        std::process::exit(101);
    }));
    say!("rocketmq-compat {} against {} (rocketmq crate 5.0.0, run {})", o.scenario, o.endpoint, o.run);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let r = rt.block_on(run(&o));
    match r {
        Ok(fig) => {
            if !KILL_PRINTED.load(Ordering::SeqCst) {
                println!("FAIL {}: finished without reaching its KILL-POINT (program bug)", o.scenario);
                std::process::exit(1);
            }
            let el = START.get().unwrap().elapsed();
            println!("RESULT {} ok {fig} elapsed_ms={}", o.scenario, el.as_millis());
            let _ = std::io::stdout().flush();
            // do not wait for the crate's background tasks (heartbeats, long polls)
            std::process::exit(0);
        }
        Err(e) => {
            println!("FAIL {}: {e}", o.scenario);
            let _ = std::io::stdout().flush();
            eprintln!("FAIL {}: {e}", o.scenario);
            std::process::exit(1);
        }
    }
}
