//! `raftmq-namesrv [--config namesrv.toml] [--listen host:port]`
//!
//! SIGTERM or SIGINT stop it; SIGHUP reloads `scan_interval_ms` and
//! `node_expiry_ms`. Under systemd (`Type=notify`) it reports READY once its
//! ports are open.

use std::path::Path;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use raftmq_namesrv::NamesrvConfig;
use raftmq_namesrv::Settings;
use sd_notify::NotifyState;
use tokio::signal::unix::SignalKind;
use tokio::signal::unix::signal;

#[derive(Parser)]
#[command(version, about = "RaftMQ name server")]
struct Args {
    /// TOML configuration (optional; every key has a default).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address; overrides the configuration.
    #[arg(long)]
    listen: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Check the configuration and exit: 0 if valid.
    #[arg(long)]
    check: bool,
}

fn read_config(path: Option<&Path>, listen: Option<&str>) -> anyhow::Result<NamesrvConfig> {
    let mut config = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            NamesrvConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => NamesrvConfig::default(),
    };
    if let Some(l) = listen {
        config.listen = l.to_string();
    }
    Ok(config)
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_json {
        b.json().init()
    } else {
        b.init()
    }
    let config = read_config(args.config.as_deref(), args.listen.as_deref())?;
    if args.check {
        config.validate().map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
        println!("configuration valid (listen {})", config.listen);
        return Ok(());
    }
    let settings = Settings::new(&config);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s = settings.clone();
    let running = config.clone();
    let watcher = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    match NotifyState::monotonic_usec_now() {
                        Ok(now) => notify(&[NotifyState::Reloading, now]),
                        Err(_) => notify(&[NotifyState::Reloading]),
                    }
                    match read_config(args.config.as_deref(), args.listen.as_deref()) {
                        Ok(new) => {
                            s.apply(&new);
                            let restart = running.restart_only_changes(&new);
                            if restart.is_empty() {
                                tracing::info!("configuration reloaded");
                            } else {
                                tracing::warn!(keys = ?restart, "configuration reloaded; these keys take effect only after a restart");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "reload refused; settings unchanged"),
                    }
                    notify(&[NotifyState::Ready]);
                }
            }
        }
        notify(&[NotifyState::Stopping]);
        let _ = stop_tx.send(());
    });
    let served = raftmq_namesrv::serve(
        config,
        settings,
        || notify(&[NotifyState::Ready, NotifyState::Status("serving routes")]),
        async move {
            let _ = stop_rx.await;
        },
    )
    .await;
    watcher.abort();
    served
}
