//! `raftmq-broker --config node.toml`: runs one node of a broker group.
//!
//! Signals: SIGTERM or SIGINT stop it cleanly (leadership handed to a caught
//! up follower first); SIGHUP reloads the settings that may change at run
//! time. Under systemd (`Type=notify`) it reports READY once it joined its
//! group, RELOADING/READY around a reload and STOPPING while it hands over.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use raftmq_broker::BrokerConfig;
use raftmq_broker::BrokerNode;
use sd_notify::NotifyState;
use tokio::signal::unix::SignalKind;
use tokio::signal::unix::signal;

#[derive(Parser)]
#[command(version, about = "One node of a RaftMQ broker group")]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Check the configuration (keys, values, peers) and exit: 0 if valid.
    #[arg(long)]
    check: bool,
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
    let config = read_config(&args.config)?;
    if args.check {
        println!("{}: valid (node {} of group {})", args.config.display(), config.node_id, config.broker_name);
        return Ok(());
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        rt.worker_threads(config.worker_threads);
    }
    rt.enable_all().build().context("starting the async runtime")?.block_on(run(args.config, config))
}

fn read_config(path: &Path) -> anyhow::Result<BrokerConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    BrokerConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Tells systemd (`Type=notify`); a no-op outside systemd.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

async fn run(path: PathBuf, config: BrokerConfig) -> anyhow::Result<()> {
    let addr = config.listen_addr().parse().with_context(|| format!("listen address {}", config.listen_addr()))?;
    let metrics_addr: Option<std::net::SocketAddr> = match &config.metrics_listen {
        Some(a) => Some(a.parse().with_context(|| format!("metrics_listen {a}"))?),
        None => None,
    };
    tracing::info!(node = config.node_id, group = %config.broker_name, %addr, "starting");
    notify(&[NotifyState::Status("recovering the CommitLog")]);
    let node = BrokerNode::start(config).await?;
    raftmq_broker::registry::spawn(node.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut server = tokio::spawn(raftmq_broker::server::serve(node.clone(), addr, stopped(stop_rx.clone())));
    if let Some(m) = metrics_addr {
        let n = node.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = raftmq_broker::metrics::serve(n, m, stop).await {
                tracing::error!(error = %e, addr = %m, "metrics listener failed");
            }
        });
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // READY once the log is recovered, the port is open and the node has
    // joined its group (it knows a leader); until then STATUS says why not.
    let mut ready = false;
    let mut waiting = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // systemd 253+ needs MONOTONIC_USEC with RELOADING.
                match NotifyState::monotonic_usec_now() {
                    Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading the configuration")]),
                    Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("reloading the configuration")]),
                }
                reload(&path, &node);
                // READY only once the node has joined (a reload before that
                // must not report the unit started).
                if ready {
                    notify(&[NotifyState::Ready, NotifyState::Status(&serving_status(&node))]);
                }
            }
            _ = waiting.tick(), if !ready => {
                if node.leader_id().is_some() {
                    ready = true;
                    tracing::info!(leader = ?node.leader_id(), "joined the group; ready");
                    notify(&[NotifyState::Ready, NotifyState::Status(&serving_status(&node))]);
                } else {
                    notify(&[NotifyState::Status("log recovered; waiting for the group to elect a leader")]);
                }
            }
            r = &mut server => { r??; return Ok(()); }
        }
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("handing over leadership and checkpointing")]);
    tracing::info!("stopping: handing over leadership and checkpointing");
    node.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

fn serving_status(node: &BrokerNode) -> String {
    let s = node.status();
    format!("serving: {} of group {}, term {}, applied {}", s.role, node.config.broker_name, s.term, s.applied_index)
}

/// SIGHUP: takes the reloadable settings from the file again; a file that
/// does not parse or validate changes nothing.
fn reload(path: &Path, node: &BrokerNode) {
    let new = match read_config(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused; settings unchanged");
            return;
        }
    };
    match node.reload(&new) {
        Ok(restart) if restart.is_empty() => tracing::info!("configuration reloaded"),
        Ok(restart) => tracing::warn!(
            keys = ?restart,
            "configuration reloaded; these keys changed but take effect only after a restart"
        ),
        Err(e) => tracing::error!(error = %e, "reload refused; settings unchanged"),
    }
}
