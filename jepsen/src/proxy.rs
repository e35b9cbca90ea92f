//! A fault-injecting TCP proxy in front of one node's Raft/admin port. The
//! group's membership names the proxy, so every connection from a peer to
//! this node passes here; the proxy tells peers apart by source address.
//!
//! Rules come from a JSON file, re-read every 100 ms:
//! `{"blocked": ["127.0.0.12"], "delay_ms": 50, "loss": 0.1}`:
//! - `blocked`: sources whose connections are refused, and whose open
//!   connections are cut (a partition);
//! - `delay_ms`: every chunk forwarded waits this long (both directions);
//! - `loss`: probability that a chunk stalls 200 ms first (TCP retransmits
//!   after loss look like this from above).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    pub blocked: HashSet<IpAddr>,
    pub delay_ms: u64,
    pub loss: f64,
}

/// How long a chunk stalls when it is "lost".
const LOSS_STALL: Duration = Duration::from_millis(200);
/// Most bytes forwarded per read.
const CHUNK_BYTES: usize = 64 * 1024;

pub async fn run(listen: &str, to: &str, rules_path: PathBuf) -> anyhow::Result<()> {
    let rules = Arc::new(RwLock::new(Rules::default()));
    let r = rules.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            if let Ok(text) = tokio::fs::read_to_string(&rules_path).await
                && last.as_ref() != Some(&text)
            {
                match serde_json::from_str::<Rules>(&text) {
                    Ok(new) => *r.write().unwrap_or_else(|e| e.into_inner()) = new,
                    Err(e) => tracing::warn!(error = %e, "bad proxy rules"),
                }
                last = Some(text);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, %to, "proxy listening");
    loop {
        let (inbound, peer) = listener.accept().await?;
        let src = peer.ip();
        if rules.read().unwrap_or_else(|e| e.into_inner()).blocked.contains(&src) {
            drop(inbound);
            continue;
        }
        let to = to.to_string();
        let rules = rules.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&to).await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            let a = pump(ri, wo, src, rules.clone());
            let b = pump(ro, wi, src, rules);
            // Either direction ending (or a partition) ends both.
            tokio::select! {
                _ = a => {}
                _ = b => {}
            }
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    src: IpAddr,
    rules: Arc<RwLock<Rules>>,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        // Wake at least every 100 ms to notice a partition on an idle link.
        let n = match tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => Some(n),
            Err(_) => None,
        };
        let (blocked, delay_ms, loss) = {
            let r = rules.read().unwrap_or_else(|e| e.into_inner());
            (r.blocked.contains(&src), r.delay_ms, r.loss)
        };
        if blocked {
            return;
        }
        let Some(n) = n else { continue };
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if loss > 0.0 && rand::random::<f64>() < loss {
            tokio::time::sleep(LOSS_STALL).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
