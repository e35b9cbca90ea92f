//! `raftmq-namesrv [--config namesrv.toml] [--listen host:port]`

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use raftmq_namesrv::NamesrvConfig;

#[derive(Parser)]
#[command(version, about = "RaftMQ name server")]
struct Args {
    /// TOML configuration (optional; every key has a default).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address; overrides the configuration.
    #[arg(long)]
    listen: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}", p.display()))?
        }
        None => NamesrvConfig::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    raftmq_namesrv::serve(config, async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await
}
