//! `raftmq-jepsen`: runs a RaftMQ cluster of real processes under faults,
//! records what clients saw, and checks it.
//!
//! ```text
//! raftmq-jepsen run --nodes 3 --nemesis kill-leader,partition-halves,pause-leader --time-limit 120 --out DIR
//! raftmq-jepsen check --history DIR/history.jsonl --out DIR
//! raftmq-jepsen cleanup
//! ```
//!
//! Modules: [`cluster`] (processes, namespaces, cleanup), [`proxy`] (fault
//! proxy), [`nemesis`] (faults and schedule), [`workload`] (clients),
//! [`history`], [`checker`], [`report`].

mod checker;
mod cluster;
mod history;
mod nemesis;
mod proxy;
mod report;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;

use crate::cluster::Mode;

#[derive(Parser)]
#[command(version, about = "Fault injection and checking for RaftMQ clusters")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster, run workloads under faults, check, report.
    Run(RunArgs),
    /// Check a recorded history again and rewrite the report.
    Check {
        #[arg(long)]
        history: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove the namespaces and processes a crashed run left behind.
    Cleanup,
    /// (internal) The fault proxy in front of one node.
    Proxy {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        rules: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Nodes in the group: 3 or 5.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Comma-separated faults (or `all`): kill-leader, kill-random,
    /// kill-minority, kill-majority, pause-leader, pause-random,
    /// partition-halves, partition-leader, partition-bridge (5 nodes),
    /// partition-ring (5 nodes), partition-oneway, loss, delay, clock-skew,
    /// disk-power-loss, disk-truncate-tail, disk-flip, disk-full.
    #[arg(long, default_value = "kill-leader,partition-halves,pause-leader")]
    nemesis: String,
    /// Seconds of load with faults.
    #[arg(long, default_value_t = 120)]
    time_limit: u64,
    /// Seconds without a fault before each fault.
    #[arg(long, default_value_t = 10)]
    normal_secs: u64,
    /// Seconds each fault lasts before it is healed.
    #[arg(long, default_value_t = 10)]
    fault_secs: u64,
    /// Quiet seconds after the load, every fault healed, before the drain.
    #[arg(long, default_value_t = 15)]
    recovery_secs: u64,
    /// Longest drain: consumers stop when every acknowledged message arrived.
    #[arg(long, default_value_t = 90)]
    drain_secs: u64,
    #[arg(long, default_value_t = 4)]
    producers: usize,
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// Clients of the consumer-offsets register (0: off).
    #[arg(long, default_value_t = 2)]
    registers: usize,
    /// Sends per second, all producers together.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// netns or loopback (default: netns when root and it works).
    #[arg(long)]
    mode: Option<Mode>,
    /// Output directory (history, node logs, results.json, report.html).
    #[arg(long, default_value = "jepsen-out")]
    out: PathBuf,
    /// Where raftmq-broker and raftmq-namesrv are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "netns" => Ok(Mode::Netns),
            "loopback" => Ok(Mode::Loopback),
            o => Err(format!("mode {o:?}: netns or loopback")),
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Cleanup => {
            cluster::cleanup();
            println!("cleaned up");
            Ok(())
        }
        Cmd::Proxy { listen, to, rules } => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            rt.block_on(proxy::run(&listen, &to, rules))
        }
        Cmd::Check { history, out } => {
            let h = history::read(&history)?;
            let r = checker::check(&h);
            std::fs::create_dir_all(&out)?;
            report::write(&out, &h, &r, "RaftMQ fault-injection run (re-checked)")?;
            print_summary(&r, &out);
            std::process::exit(if r.valid { 0 } else { 1 });
        }
        Cmd::Run(args) => {
            let valid = run(args)?;
            std::process::exit(if valid { 0 } else { 1 });
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.nodes == 3 || args.nodes == 5, "--nodes must be 3 or 5");
    let names = nemesis::parse(&args.nemesis, args.nodes)?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
    };
    for b in ["raftmq-broker", "raftmq-namesrv"] {
        anyhow::ensure!(
            bin_dir.join(b).exists(),
            "{} not found in {}: build the workspace first",
            b,
            bin_dir.display()
        );
    }
    // Leftovers of an earlier run that crashed.
    cluster::cleanup();
    let (mode, why) = cluster::choose_mode(args.mode);
    println!("mode: {mode} ({why})");
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out).with_context(|| format!("clearing {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    if mode == Mode::Netns {
        if let Err(e) = cluster::setup_netns(args.nodes) {
            cluster::cleanup();
            return Err(e.context("setting up network namespaces"));
        }
        // Before any thread exists: every thread of the tool then lives in
        // the client namespace and reaches the nodes over the bridge.
        cluster::enter_netns(cluster::CLIENT_NS)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(run_async(args.clone(), mode, names.clone(), bin_dir, out.clone()));
    drop(rt);
    cluster::cleanup();
    result?;
    let h = history::read(&out.join("history.jsonl"))?;
    let mut r = checker::check(&h);
    r.mode = format!("{mode:?}").to_lowercase();
    r.nemeses = names;
    report::write(&out, &h, &r, &format!("RaftMQ fault-injection run: {} nodes, {}", args.nodes, args.nemesis))?;
    print_summary(&r, &out);
    Ok(r.valid)
}

async fn run_async(
    args: RunArgs,
    mode: Mode,
    names: Vec<String>,
    bin_dir: PathBuf,
    out: PathBuf,
) -> anyhow::Result<()> {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: cleaning up");
            cluster::cleanup();
            std::process::exit(130);
        }
    });
    let mut c = cluster::Cluster::new(mode, args.nodes, &bin_dir, &out)?;
    c.start()?;
    let spec = workload::Spec {
        endpoints: c.client_addrs(),
        producers: args.producers,
        consumers: args.consumers,
        registers: args.registers,
        rate: args.rate,
        time_limit: Duration::from_secs(args.time_limit),
        recovery: Duration::from_secs(args.recovery_secs),
        drain_timeout: Duration::from_secs(args.drain_secs),
    };
    let cluster = Arc::new(tokio::sync::Mutex::new(c));
    workload::prepare(&spec).await.context("preparing topics")?;
    let rec = Arc::new(history::Recorder::create(&out.join("history.jsonl"))?);
    let start = tokio::time::Instant::now();
    let nem = nemesis::Nemesis::new(cluster.clone(), rec.clone());
    let schedule = tokio::spawn(nemesis::schedule(
        nem,
        names,
        Duration::from_secs(args.normal_secs),
        Duration::from_secs(args.fault_secs),
        start + Duration::from_secs(args.time_limit),
    ));
    let w = workload::run(spec, rec, start).await;
    let nem = schedule.await.context("nemesis task")??;
    drop(nem);
    cluster.lock().await.stop();
    w
}

fn print_summary(r: &checker::Results, out: &std::path::Path) {
    println!("| measure | value |\n|---|---|");
    println!("| mode | {} |", r.mode);
    println!(
        "| sends attempted / acked / failed / unknown | {} / {} / {} / {} |",
        r.sends_attempted, r.acked, r.failed, r.unknown
    );
    println!("| delivered (distinct) | {} |", r.delivered);
    println!("| lost (acked, never delivered) | {} |", r.lost);
    println!("| lost from the log | {} |", r.lost_from_log);
    println!("| unexpected | {} |", r.unexpected);
    println!("| duplicated deliveries | {} |", r.duplicated);
    println!("| order violations | {} |", r.order_violations);
    println!("| reads past the commit index | {} |", r.reads_past_commit);
    println!(
        "| unavailability after a fault, max / median | {} / {} |",
        r.unavailability_max_ms.map(|m| format!("{m:.0} ms")).unwrap_or("-".into()),
        r.unavailability_median_ms.map(|m| format!("{m:.0} ms")).unwrap_or("-".into())
    );
    println!(
        "| offsets register: ops, linearizable | {}, {} |",
        r.register_ops,
        r.register_linearizable.map(|b| b.to_string()).unwrap_or("-".into())
    );
    println!("| **valid** | **{}** |", r.valid);
    println!("report: {}", out.join("report.html").display());
}
