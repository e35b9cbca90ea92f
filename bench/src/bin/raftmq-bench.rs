//! `raftmq-bench`: load against a running RaftMQ group (for example the local
//! cluster of `scripts/dev-up.sh`). Prints msgs/s, MB/s, latency p50/p99/p999
//! and the brokers' CPU seconds per million messages.
//!
//!   raftmq-bench produce  --producers 16 --size 1024 --seconds 10
//!   raftmq-bench consume  --group bench --messages 100000
//!   raftmq-bench failover --kill-cmd 'scripts/cluster.sh kill-node {id}' --restart-cmd 'scripts/cluster.sh restart-node {id}'

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use clap::Parser;
use clap::Subcommand;
use raftmq_bench::Latencies;
use raftmq_bench::pids_cpu_seconds;
use raftmq_client::Admin;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::SimpleConsumer;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Load generator for RaftMQ")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8081,127.0.0.1:8082,127.0.0.1:8083", value_delimiter = ',', global = true)]
    servers: Vec<String>,
    #[arg(long, default_value = "bench", global = true)]
    topic: String,
    /// Broker pids (comma-separated) to report CPU seconds for.
    #[arg(long, value_delimiter = ',', global = true)]
    broker_pids: Vec<u32>,
    /// Also print the result as one JSON line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Concurrent producers, each waiting for its durable ack before the next send.
    Produce {
        #[arg(long, default_value_t = 16)]
        producers: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Messages per send request.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Drain the topic as a simple consumer group.
    Consume {
        #[arg(long, default_value = "bench-consumer")]
        group: String,
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        #[arg(long, default_value_t = 4)]
        consumers: usize,
    },
    /// Kill the leader under a steady producer; report time to the first ack after the kill.
    Failover {
        /// Command to kill node `{id}`.
        #[arg(long)]
        kill_cmd: String,
        /// Command to start node `{id}` again.
        #[arg(long)]
        restart_cmd: String,
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
}

async fn ensure_topic(servers: &[String], topic: &str) -> anyhow::Result<()> {
    for s in servers {
        if let Ok(a) = Admin::connect(s) {
            match a.create_topic(topic, 8, 1, false).await {
                Ok(_) => return Ok(()),
                Err(e) if e.to_string().contains("exists") => return Ok(()),
                Err(_) => continue,
            }
        }
    }
    anyhow::bail!("could not create topic {topic} on any of {servers:?}")
}

async fn leader(servers: &[String]) -> Option<u64> {
    for s in servers {
        if let Ok(a) = Admin::connect(s)
            && let Ok(Ok(st)) = tokio::time::timeout(Duration::from_millis(500), a.node_status()).await
            && let Some(l) = st.leader_id
        {
            return Some(l);
        }
    }
    None
}

fn run_cmd(template: &str, id: u64) -> anyhow::Result<()> {
    let cmd = template.replace("{id}", &id.to_string());
    let ok = std::process::Command::new("sh").args(["-c", &cmd]).status()?.success();
    anyhow::ensure!(ok, "command failed: {cmd}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure_topic(&args.servers, &args.topic).await?;
    let cpu0 = pids_cpu_seconds(&args.broker_pids);
    match args.cmd {
        Cmd::Produce { producers, size, seconds, batch } => {
            let p = Producer::new(&args.servers, ProducerOptions::default())?;
            let body = vec![b'x'; size];
            let stop = Instant::now() + Duration::from_secs(seconds);
            let count = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let lat = Arc::new(Mutex::new(Latencies::default()));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..producers {
                let (p, body, count, errors, lat, topic) =
                    (p.clone(), body.clone(), count.clone(), errors.clone(), lat.clone(), args.topic.clone());
                tasks.push(tokio::spawn(async move {
                    let mut local = Latencies::default();
                    let msgs: Vec<OutMessage> = (0..batch).map(|_| OutMessage::new(body.clone())).collect();
                    while Instant::now() < stop {
                        let t = Instant::now();
                        match p.send_batch(&topic, &msgs).await {
                            Ok(_) => {
                                local.record(t.elapsed());
                                count.fetch_add(batch as u64, Ordering::Relaxed);
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    lat.lock().unwrap().merge(local);
                }));
            }
            for t in tasks {
                t.await?;
            }
            let secs = started.elapsed().as_secs_f64();
            let n = count.load(Ordering::Relaxed);
            let l = lat.lock().unwrap().clone();
            let cpu = pids_cpu_seconds(&args.broker_pids) - cpu0;
            let r = json!({"workload": "produce", "producers": producers, "size": size, "batch": batch,
                "messages": n, "errors": errors.load(Ordering::Relaxed), "seconds": secs,
                "msgs_per_s": n as f64 / secs, "mb_per_s": (n as f64 * size as f64) / secs / 1e6,
                "p50_ms": l.percentile_ms(0.5), "p99_ms": l.percentile_ms(0.99), "p999_ms": l.percentile_ms(0.999),
                "broker_cpu_s_per_million": if n > 0 && !args.broker_pids.is_empty() { cpu / n as f64 * 1e6 } else { 0.0 }});
            println!(
                "produce: {producers} producers x batch {batch}, {size} B: {n} msgs in {secs:.1} s = {:.0} msg/s, {:.1} MB/s; send latency p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms; errors {}",
                r["msgs_per_s"].as_f64().unwrap(),
                r["mb_per_s"].as_f64().unwrap(),
                r["p50_ms"].as_f64().unwrap(),
                r["p99_ms"].as_f64().unwrap(),
                r["p999_ms"].as_f64().unwrap(),
                r["errors"]
            );
            if args.json {
                println!("{r}");
            }
        }
        Cmd::Consume { group, messages, consumers } => {
            let c = SimpleConsumer::new(&args.servers, &group)?;
            let count = Arc::new(AtomicU64::new(0));
            let bytes = Arc::new(AtomicU64::new(0));
            let lat = Arc::new(Mutex::new(Latencies::default()));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..consumers {
                let (c, count, bytes, lat, topic) =
                    (c.clone(), count.clone(), bytes.clone(), lat.clone(), args.topic.clone());
                tasks.push(tokio::spawn(async move {
                    let mut local = Latencies::default();
                    let mut empty = 0;
                    while count.load(Ordering::Relaxed) < messages && empty < 3 {
                        let t = Instant::now();
                        match c.receive(&topic, None, 32, Duration::from_secs(60), Duration::from_secs(1)).await {
                            Ok(batch) if batch.is_empty() => empty += 1,
                            Ok(batch) => {
                                empty = 0;
                                local.record(t.elapsed());
                                for m in &batch {
                                    let _ = c.ack(m).await;
                                    bytes.fetch_add(m.body.len() as u64, Ordering::Relaxed);
                                }
                                count.fetch_add(batch.len() as u64, Ordering::Relaxed);
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                    lat.lock().unwrap().merge(local);
                }));
            }
            for t in tasks {
                t.await?;
            }
            let secs = started.elapsed().as_secs_f64();
            let n = count.load(Ordering::Relaxed);
            let l = lat.lock().unwrap().clone();
            println!(
                "consume: {consumers} consumers: {n} msgs in {secs:.1} s = {:.0} msg/s, {:.1} MB/s; receive latency p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms",
                n as f64 / secs,
                bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
                l.percentile_ms(0.5),
                l.percentile_ms(0.99),
                l.percentile_ms(0.999)
            );
        }
        Cmd::Failover { kill_cmd, restart_cmd, rounds } => {
            let opts = ProducerOptions { max_attempts: 1, request_timeout: Duration::from_secs(2) };
            let p = Producer::new(&args.servers, opts)?;
            let mut times = Vec::new();
            for round in 0..rounds {
                let Some(l) = leader(&args.servers).await else { anyhow::bail!("no leader") };
                // Warm: 20 acked writes (a node restarted last round may still be starting).
                let (mut warm, warm_until) = (0, Instant::now() + Duration::from_secs(30));
                while warm < 20 && Instant::now() < warm_until {
                    match p.send(&args.topic, OutMessage::new("warm")).await {
                        Ok(_) => warm += 1,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                anyhow::ensure!(warm == 20, "round {round}: the group does not take writes before the kill");
                let killed = Instant::now();
                run_cmd(&kill_cmd, l)?;
                let mut first_ack = None;
                while killed.elapsed() < Duration::from_secs(30) {
                    if p.send(&args.topic, OutMessage::new("after-kill")).await.is_ok() {
                        first_ack = Some(killed.elapsed());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let Some(t) = first_ack else {
                    anyhow::bail!("round {round}: no write acknowledged within 30 s of the kill")
                };
                println!(
                    "failover round {round}: killed leader {l}, first acknowledged write after {:.0} ms",
                    t.as_secs_f64() * 1e3
                );
                times.push(t.as_secs_f64() * 1e3);
                run_cmd(&restart_cmd, l)?;
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "failover: {} rounds, median {:.0} ms, worst {:.0} ms",
                times.len(),
                times[times.len() / 2],
                times.last().copied().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
