//! The workloads, each against any [`Driver`]: closed-loop produce,
//! fixed-rate produce (latency without coordinated omission), produce then
//! drain a backlog, and end-to-end latency (send to receive).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;

use crate::drivers::Driver;
use crate::result::RunResult;
use crate::stats::Latencies;
use crate::stats::Meter;
use crate::stats::PeakRss;
use crate::stats::pids_cpu_seconds;

/// What every workload shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub system: String,
    pub durability: String,
    pub size_bytes: usize,
    /// Server processes whose CPU time and peak memory are reported.
    pub server_pids: Vec<u32>,
}

/// Longest a run may go on (bounds the per-second series and every loop).
const MAX_RUN_SECS: usize = 3600;

/// Counts the servers' CPU time and peak memory from its creation.
struct CpuClock {
    pids: Vec<u32>,
    start_s: f64,
    rss: PeakRss,
}

impl CpuClock {
    fn start(pids: &[u32]) -> Self {
        Self { pids: pids.to_vec(), start_s: pids_cpu_seconds(pids), rss: PeakRss::start(pids) }
    }

    fn per_million(&self, messages: u64) -> f64 {
        if messages == 0 || self.pids.is_empty() {
            return 0.0;
        }
        (pids_cpu_seconds(&self.pids) - self.start_s) / messages as f64 * 1e6
    }
}

#[allow(clippy::too_many_arguments)]
fn result(
    c: &Common,
    workload: &str,
    producers: usize,
    consumers: usize,
    target_rate: Option<f64>,
    meter: &Meter,
    errors: u64,
    secs: f64,
    lat: &Latencies,
    cpu: &CpuClock,
    per_second: Vec<u64>,
    note: String,
) -> RunResult {
    let n = meter.count();
    let p = lat.percentiles_ms(&[0.5, 0.99, 0.999]);
    RunResult {
        system: c.system.clone(),
        durability: c.durability.clone(),
        workload: workload.into(),
        producers,
        consumers,
        size_bytes: c.size_bytes,
        target_rate,
        messages: n,
        errors,
        seconds: secs,
        msgs_per_s: n as f64 / secs.max(1e-9),
        mb_per_s: meter.bytes() as f64 / secs.max(1e-9) / 1e6,
        p50_ms: p[0],
        p99_ms: p[1],
        p999_ms: p[2],
        server_cpu_s_per_million: cpu.per_million(n),
        server_peak_rss_mib: cpu.rss.peak_mib(),
        per_second,
        note,
    }
}

/// Waits for a run's tasks and stops its sampler: the run's seconds, its
/// messages per second and every task's latencies.
async fn finish(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
    sampler: tokio::task::JoinHandle<()>,
    series: &Mutex<Vec<u64>>,
    lat: &Mutex<Latencies>,
) -> anyhow::Result<(f64, Vec<u64>, Latencies)> {
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    sampler.abort();
    let per_second = series.lock().unwrap().clone();
    let lat = lat.lock().unwrap().clone();
    Ok((secs, per_second, lat))
}

/// Counts an error; prints only the first of a run (the rest show in the count).
fn first_error(errors: &AtomicU64, what: &str, e: &anyhow::Error) {
    if errors.fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!("{what}: {e:#}");
    }
}

/// Microseconds since the first call in this process (a monotonic clock the
/// producer and consumer tasks share).
fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn body(size: usize) -> Bytes {
    Bytes::from(vec![b'x'; size.max(8)])
}

/// A body whose first 8 bytes are the intended send time ([`now_us`]).
fn stamped(size: usize, at_us: u64) -> Bytes {
    let mut b = vec![b'x'; size.max(8)];
    b[..8].copy_from_slice(&at_us.to_le_bytes());
    Bytes::from(b)
}

/// Closed loop: `producers` publishers, each sending its next message as
/// soon as the previous one is acknowledged, for `seconds`.
pub async fn produce(d: &Driver, c: &Common, producers: usize, seconds: u64) -> anyhow::Result<RunResult> {
    let meter = Meter::default();
    let errors = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Latencies::default()));
    let pubs = d.publishers(producers).await?;
    let cpu = CpuClock::start(&c.server_pids);
    let started = Instant::now();
    let stop = started + Duration::from_secs(seconds);
    let (sampler, series) = meter.sample_every_second(MAX_RUN_SECS.min(seconds as usize));
    let mut tasks = Vec::new();
    for mut p in pubs {
        let (meter, errors, lat, b) = (meter.clone(), errors.clone(), lat.clone(), body(c.size_bytes));
        tasks.push(tokio::spawn(async move {
            let mut local = Latencies::default();
            while Instant::now() < stop {
                let t = Instant::now();
                match p.publish(b.clone()).await {
                    Ok(()) => {
                        local.record(t.elapsed());
                        meter.add(1, b.len() as u64);
                    }
                    Err(e) => {
                        first_error(&errors, "publish failed", &e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            lat.lock().unwrap().merge(local);
        }));
    }
    let (secs, per_second, lat) = finish(tasks, started, sampler, &series, &lat).await?;
    Ok(result(
        c,
        "produce",
        producers,
        0,
        None,
        &meter,
        errors.load(Ordering::Relaxed),
        secs,
        &lat,
        &cpu,
        per_second,
        String::new(),
    ))
}

/// Open loop at `rate` messages per second spread over `producers`
/// publishers. Latency counts from each message's scheduled send time, so
/// a stall shows in the percentiles (no coordinated omission). With
/// `consumers` > 0 the messages are also received, and the latency is
/// from the scheduled send to the receipt (end to end).
pub async fn fixed_rate(
    d: &Driver,
    c: &Common,
    producers: usize,
    consumers: usize,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<RunResult> {
    anyhow::ensure!(rate > 0.0 && producers > 0, "rate and producers must be positive");
    let e2e = consumers > 0;
    let sent = Meter::default();
    let received = Meter::default();
    let errors = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Latencies::default()));
    let pubs = d.publishers(producers).await?;
    let cons = d.consumers(&format!("e2e-{}", now_us()), consumers).await?;
    let cpu = CpuClock::start(&c.server_pids);
    let started = Instant::now();
    let t0 = now_us();
    let total = (rate * seconds as f64) as u64;
    let interval_us = 1e6 / rate;
    let (sampler, series) =
        (if e2e { &received } else { &sent }).sample_every_second(MAX_RUN_SECS.min(seconds as usize + 5));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut p in pubs {
        let (sent, errors, lat, next, size) = (sent.clone(), errors.clone(), lat.clone(), next.clone(), c.size_bytes);
        tasks.push(tokio::spawn(async move {
            let mut local = Latencies::default();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let due = t0 + (k as f64 * interval_us) as u64;
                let now = now_us();
                if due > now {
                    tokio::time::sleep(Duration::from_micros(due - now)).await;
                }
                let b = stamped(size, due);
                match p.publish(b.clone()).await {
                    Ok(()) => {
                        if !e2e {
                            local.record_us(now_us().saturating_sub(due));
                        }
                        sent.add(1, b.len() as u64);
                    }
                    Err(e) => {
                        first_error(&errors, "publish failed", &e);
                    }
                }
            }
            lat.lock().unwrap().merge(local);
        }));
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut ctasks = Vec::new();
    for mut con in cons {
        let (received, lat, done) = (received.clone(), lat.clone(), done.clone());
        ctasks.push(tokio::spawn(async move {
            let mut local = Latencies::default();
            let mut failures = 0u32;
            while !done.load(Ordering::Relaxed) {
                match con.receive(Duration::from_millis(200)).await {
                    Ok(batch) => {
                        let now = now_us();
                        for b in &batch {
                            let at = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                            local.record_us(now.saturating_sub(at));
                            received.add(1, b.len() as u64);
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 {
                            eprintln!("receive failed: {e:#}");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            lat.lock().unwrap().merge(local);
        }));
    }
    for t in tasks {
        t.await?;
    }
    if e2e {
        // Let the consumers take what was acknowledged (bounded wait).
        let until = Instant::now() + Duration::from_secs(10);
        while received.count() < sent.count() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    done.store(true, Ordering::Relaxed);
    let (secs, per_second, lat) = finish(ctasks, started, sampler, &series, &lat).await?;
    let (workload, meter, note) = if e2e {
        let missing = sent.count().saturating_sub(received.count());
        (
            "e2e",
            &received,
            format!("{} sent, {} received ({missing} not received within 10 s)", sent.count(), received.count()),
        )
    } else {
        ("fixed-rate", &sent, String::new())
    };
    Ok(result(
        c,
        workload,
        producers,
        consumers,
        Some(rate),
        meter,
        errors.load(Ordering::Relaxed),
        secs,
        &lat,
        &cpu,
        per_second,
        note,
    ))
}

/// Builds a backlog of `messages` with `producers` closed-loop publishers,
/// then drains it with `consumers`; the figures are the drain's (latency:
/// per receive call). The backlog's build rate goes in the note.
pub async fn drain(
    d: &Driver,
    c: &Common,
    producers: usize,
    consumers: usize,
    messages: u64,
) -> anyhow::Result<RunResult> {
    let built = Meter::default();
    let errors = Arc::new(AtomicU64::new(0));
    let claimed = Arc::new(AtomicU64::new(0));
    let build_started = Instant::now();
    let mut tasks = Vec::new();
    for mut p in d.publishers(producers).await? {
        let (built, errors, claimed, b) = (built.clone(), errors.clone(), claimed.clone(), body(c.size_bytes));
        tasks.push(tokio::spawn(async move {
            while claimed.fetch_add(1, Ordering::Relaxed) < messages {
                // Retry until acknowledged: the backlog must be complete.
                let mut tries = 0;
                while let Err(e) = p.publish(b.clone()).await {
                    tries += 1;
                    first_error(&errors, "publish failed (retrying)", &e);
                    if tries > 100 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                built.add(1, b.len() as u64);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let build_secs = build_started.elapsed().as_secs_f64();
    anyhow::ensure!(built.count() == messages, "backlog incomplete: {} of {messages} acknowledged", built.count());

    let received = Meter::default();
    let lat = Arc::new(Mutex::new(Latencies::default()));
    let cons = d.consumers(&format!("drain-{}", now_us()), consumers).await?;
    let cpu = CpuClock::start(&c.server_pids);
    let started = Instant::now();
    let (sampler, series) = received.sample_every_second(MAX_RUN_SECS);
    let mut ctasks = Vec::new();
    for mut con in cons {
        let (received, lat) = (received.clone(), lat.clone());
        ctasks.push(tokio::spawn(async move {
            let mut local = Latencies::default();
            let mut idle_since = Instant::now();
            while received.count() < messages && idle_since.elapsed() < Duration::from_secs(10) {
                let t = Instant::now();
                match con.receive(Duration::from_millis(500)).await {
                    Ok(batch) if batch.is_empty() => {}
                    Ok(batch) => {
                        local.record(t.elapsed());
                        received.add(batch.len() as u64, batch.iter().map(|b| b.len() as u64).sum());
                        idle_since = Instant::now();
                    }
                    Err(e) => {
                        eprintln!("receive failed: {e:#}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            lat.lock().unwrap().merge(local);
        }));
    }
    let (secs, per_second, lat) = finish(ctasks, started, sampler, &series, &lat).await?;
    let note = format!(
        "backlog of {messages} built by {producers} producers in {build_secs:.1} s ({:.0} msg/s); {} received; latency is per receive call",
        messages as f64 / build_secs,
        received.count()
    );
    Ok(result(
        c,
        "drain",
        producers,
        consumers,
        None,
        &received,
        errors.load(Ordering::Relaxed),
        secs,
        &lat,
        &cpu,
        per_second,
        note,
    ))
}
