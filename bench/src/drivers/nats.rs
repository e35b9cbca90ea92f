//! NATS JetStream through `async-nats`: a stream of 3 replicas on file
//! storage (the servers' `sync_interval` decides when it fsyncs).

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::stream;
use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;

/// Messages a receive returns at most.
const RECEIVE_BATCH: usize = 256;

#[derive(Clone)]
pub struct Nats {
    js: jetstream::Context,
    stream: String,
}

impl Nats {
    /// Connects to the servers (`url`: comma-separated `nats://` URLs) and
    /// creates the stream `name` (subject `name`) with 3 replicas.
    pub async fn connect(url: &str, name: &str) -> anyhow::Result<Self> {
        let servers: Vec<async_nats::ServerAddr> =
            url.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>().context("bad NATS URL")?;
        let client = async_nats::ConnectOptions::new()
            .connect(servers)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let js = jetstream::new(client);
        let name = name.replace('.', "_");
        js.get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![name.clone()],
            num_replicas: 3,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name} (3 replicas)"))?;
        // A new R3 stream refuses publishes until its Raft group has a
        // leader: wait for one (bounded) so no run starts with errors.
        let stream = js.get_stream(&name).await?;
        for _ in 0..100 {
            let leader = stream.get_info().await.ok().and_then(|i| i.cluster).and_then(|c| c.leader);
            if leader.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self { js, stream: name })
    }

    pub async fn reset(&self) -> anyhow::Result<()> {
        self.js.delete_stream(&self.stream).await.with_context(|| format!("deleting stream {}", self.stream))?;
        Ok(())
    }

    pub fn publisher(&self) -> Publisher {
        Publisher { js: self.js.clone(), subject: self.stream.clone() }
    }

    /// A durable pull consumer `group` (shared by every consumer of the group).
    pub async fn consumer(&self, group: &str) -> anyhow::Result<Consumer> {
        let s = self.js.get_stream(&self.stream).await?;
        let consumer = s
            .get_or_create_consumer(
                group,
                pull::Config {
                    durable_name: Some(group.to_string()),
                    ack_policy: AckPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("creating consumer {group}"))?;
        // The client's continuous pull (batches of 500 requested ahead).
        let messages = consumer.messages().await.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
        Ok(Consumer { messages })
    }
}

pub struct Publisher {
    js: jetstream::Context,
    subject: String,
}

impl Publisher {
    /// Publishes and waits for the stream's PubAck (sent once the stream's
    /// Raft group has the message).
    pub async fn publish(&mut self, body: Bytes) -> anyhow::Result<()> {
        self.js.publish(self.subject.clone(), body).await?.await?;
        Ok(())
    }
}

pub struct Consumer {
    messages: pull::Stream,
}

impl Consumer {
    /// The messages that arrive within `wait` of the first (at most
    /// [`RECEIVE_BATCH`], without waiting after the first), acknowledging
    /// the last one (ack-all covers the batch).
    pub async fn receive(&mut self, wait: Duration) -> anyhow::Result<Vec<Bytes>> {
        let first = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => anyhow::bail!("pull stream ended"),
            Ok(Some(m)) => m.map_err(|e| anyhow::anyhow!("pull: {e}"))?,
        };
        let mut out = vec![first.payload.clone()];
        let mut last = first;
        while out.len() < RECEIVE_BATCH {
            match self.messages.next().now_or_never() {
                Some(Some(m)) => {
                    let m = m.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                    out.push(m.payload.clone());
                    last = m;
                }
                _ => break,
            }
        }
        last.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        Ok(out)
    }
}
