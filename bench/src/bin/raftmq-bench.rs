//! `raftmq-bench`: load against RaftMQ, NATS JetStream or RabbitMQ (already
//! running; `bench/compare.sh` starts them). Each run prints a summary line
//! and, with `--out`, writes a JSON result; `report` turns a directory of
//! results into Markdown tables and SVG plots.
//!
//!   raftmq-bench --system raftmq produce --producers 64 --size 1024 --seconds 10
//!   raftmq-bench --system nats fixed-rate --rate 5000 --producers 64
//!   raftmq-bench --system rabbitmq e2e --rate 2000 --consumers 4
//!   raftmq-bench --system raftmq drain --messages 1000000 --consumers 8
//!   raftmq-bench failover --kill-cmd 'scripts/cluster.sh kill-node {id}' --restart-cmd 'scripts/cluster.sh restart-node {id}'
//!   raftmq-bench report --dir bench/results/latest

use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use clap::Parser;
use clap::Subcommand;
use raftmq_bench::drivers::Driver;
use raftmq_bench::drivers::Endpoints;
use raftmq_bench::drivers::System;
use raftmq_bench::result;
use raftmq_bench::result::RunResult;
use raftmq_bench::workload;
use raftmq_client::Admin;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;

#[derive(Parser)]
#[command(about = "RaftMQ, NATS JetStream and RabbitMQ quorum queues, measured the same way")]
struct Args {
    #[arg(long, value_enum, default_value = "raftmq", global = true)]
    system: System,
    /// RaftMQ nodes.
    #[arg(long, default_value = "127.0.0.1:8081,127.0.0.1:8082,127.0.0.1:8083", value_delimiter = ',', global = true)]
    servers: Vec<String>,
    /// NATS servers (comma-separated URLs).
    #[arg(long, default_value = "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224", global = true)]
    nats_url: String,
    #[arg(long, default_value = "amqp://bench:bench@127.0.0.1:5672/%2f", global = true)]
    amqp_url: String,
    /// Server pids (comma-separated) whose CPU time and peak RSS are reported.
    #[arg(long, value_delimiter = ',', global = true)]
    server_pids: Vec<u32>,
    /// The durability class the servers were started with (a label for the
    /// report: `equal` or `default`).
    #[arg(long, default_value = "equal", global = true)]
    durability: String,
    /// Message size in bytes.
    #[arg(long, default_value_t = 1024, global = true)]
    size: usize,
    /// Write the result as JSON here.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed loop: each producer sends its next message once the last is acknowledged.
    Produce {
        #[arg(long, default_value_t = 16)]
        producers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Open loop at a fixed rate; latency from each message's scheduled send time.
    FixedRate {
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 64)]
        producers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Fixed-rate producers and concurrent consumers; latency from send to receive.
    E2e {
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 16)]
        producers: usize,
        #[arg(long, default_value_t = 8)]
        consumers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Build a backlog, then drain it; figures are the drain's.
    Drain {
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 64)]
        producers: usize,
        #[arg(long, default_value_t = 8)]
        consumers: usize,
    },
    /// RaftMQ only: kill the leader under a steady producer; time to the first ack after the kill.
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
    /// Markdown tables (printed, and written to DIR/report.md) and one SVG
    /// per workload from the JSON results in DIR.
    Report {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn print(r: &RunResult) {
    println!(
        "{} [{}] {}: {:.0} msg/s, {:.1} MB/s, p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, server CPU {:.1} s/M msgs, server peak anon RSS {:.0} MiB, errors {}{}",
        r.system,
        r.durability,
        r.key(),
        r.msgs_per_s,
        r.mb_per_s,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.server_cpu_s_per_million,
        r.server_peak_rss_mib,
        r.errors,
        if r.note.is_empty() { String::new() } else { format!(" ({})", r.note) }
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = match &args.cmd {
        Cmd::Report { dir } => return report(dir),
        Cmd::Failover { kill_cmd, restart_cmd, rounds } => {
            return failover(&args.servers, kill_cmd, restart_cmd, *rounds).await;
        }
        Cmd::Produce { .. } => "produce",
        Cmd::FixedRate { .. } => "fixed-rate",
        Cmd::E2e { .. } => "e2e",
        Cmd::Drain { .. } => "drain",
    };
    let ep = Endpoints { raftmq: args.servers.clone(), nats: args.nats_url.clone(), amqp: args.amqp_url.clone() };
    // A fresh destination per run, deleted afterwards.
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let name = format!("bench-{run}-{stamp}");
    let d = Driver::connect(args.system, &ep, &name).await?;
    let c = workload::Common {
        system: args.system.name().into(),
        durability: args.durability.clone(),
        size_bytes: args.size,
        server_pids: args.server_pids.clone(),
    };
    let r = match args.cmd {
        Cmd::Produce { producers, seconds } => workload::produce(&d, &c, producers, seconds).await,
        Cmd::FixedRate { rate, producers, seconds } => workload::fixed_rate(&d, &c, producers, 0, rate, seconds).await,
        Cmd::E2e { rate, producers, consumers, seconds } => {
            anyhow::ensure!(consumers > 0, "e2e needs consumers");
            workload::fixed_rate(&d, &c, producers, consumers, rate, seconds).await
        }
        Cmd::Drain { messages, producers, consumers } => workload::drain(&d, &c, producers, consumers, messages).await,
        Cmd::Report { .. } | Cmd::Failover { .. } => unreachable!(),
    };
    if let Err(e) = d.reset().await {
        eprintln!("cleanup: {e:#}");
    }
    let r = r?;
    print(&r);
    if let Some(out) = &args.out {
        r.save(out)?;
    }
    Ok(())
}

fn report(dir: &std::path::Path) -> anyhow::Result<()> {
    let results = result::load_dir(dir)?;
    anyhow::ensure!(!results.is_empty(), "no *.json results in {}", dir.display());
    let md = result::markdown(&results);
    std::fs::write(dir.join("report.md"), &md)?;
    let mut keys: Vec<(String, String)> = results.iter().map(|r| (r.durability.clone(), r.key())).collect();
    keys.sort();
    keys.dedup();
    for (durability, key) in keys {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.durability == durability && r.key() == key).collect();
        let title = format!("{key} ({durability} durability)");
        let file = dir.join(format!("{}-{durability}.svg", result::slug(&key)));
        std::fs::write(&file, result::svg_plot(&title, &runs))?;
    }
    println!("{md}");
    Ok(())
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

async fn failover(servers: &[String], kill_cmd: &str, restart_cmd: &str, rounds: u32) -> anyhow::Result<()> {
    let topic = "bench-failover";
    for s in servers {
        if let Ok(a) = Admin::connect(s)
            && a.create_topic(topic, 8, 1, false).await.is_ok()
        {
            break;
        }
    }
    let opts =
        ProducerOptions { max_attempts: 1, request_timeout: Duration::from_secs(2), ..ProducerOptions::default() };
    let p = Producer::new(servers, opts)?;
    let mut times = Vec::new();
    for round in 0..rounds {
        let Some(l) = leader(servers).await else { anyhow::bail!("no leader") };
        // Warm: 20 acked writes (a node restarted last round may still be starting).
        let (mut warm, warm_until) = (0, Instant::now() + Duration::from_secs(30));
        while warm < 20 && Instant::now() < warm_until {
            match p.send(topic, OutMessage::new("warm")).await {
                Ok(_) => warm += 1,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        anyhow::ensure!(warm == 20, "round {round}: the group does not take writes before the kill");
        let killed = Instant::now();
        run_cmd(kill_cmd, l)?;
        let mut first_ack = None;
        while killed.elapsed() < Duration::from_secs(30) {
            if p.send(topic, OutMessage::new("after-kill")).await.is_ok() {
                first_ack = Some(killed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Some(t) = first_ack else { anyhow::bail!("round {round}: no write acknowledged within 30 s of the kill") };
        println!(
            "failover round {round}: killed leader {l}, first acknowledged write after {:.0} ms",
            t.as_secs_f64() * 1e3
        );
        times.push(t.as_secs_f64() * 1e3);
        run_cmd(restart_cmd, l)?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "failover: {} rounds, median {:.0} ms, worst {:.0} ms (rounds sorted: {:?})",
        times.len(),
        times[times.len() / 2],
        times.last().copied().unwrap_or(0.0),
        times.iter().map(|t| t.round() as u64).collect::<Vec<_>>()
    );
    Ok(())
}
