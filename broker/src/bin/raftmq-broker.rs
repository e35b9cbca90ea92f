//! `raftmq-broker --config node.toml`: runs one node of a broker group.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use raftmq_broker::BrokerConfig;
use raftmq_broker::BrokerNode;

#[derive(Parser)]
#[command(version, about = "One node of a RaftMQ broker group")]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if json { b.json().init() } else { b.init() }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_json);
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let config = BrokerConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        rt.worker_threads(config.worker_threads);
    }
    rt.enable_all().build().context("starting the async runtime")?.block_on(run(config))
}

async fn run(config: BrokerConfig) -> anyhow::Result<()> {
    let addr = config.listen_addr().parse().with_context(|| format!("listen address {}", config.listen_addr()))?;
    tracing::info!(node = config.node_id, group = %config.broker_name, %addr, "starting");
    let node = BrokerNode::start(config).await?;
    raftmq_broker::registry::spawn(node.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(raftmq_broker::server::serve(node.clone(), addr, async move {
        let _ = stop_rx.await;
    }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = server => { r??; return Ok(()); }
    }
    tracing::info!("stopping: handing over leadership and checkpointing");
    node.shutdown().await;
    let _ = stop_tx.send(());
    Ok(())
}
