//! RaftMQ through our Rust client (`raftmq-client`).

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use raftmq_client::Admin;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::PullConsumer;

/// Queues of the benchmark topic (RocketMQ's default for a new topic).
pub const QUEUES: u32 = 8;

/// Messages per pull (the broker caps it at `limits.max_receive_batch`).
const PULL_BATCH: u32 = 256;

#[derive(Clone)]
pub struct Raftmq {
    servers: Vec<String>,
    topic: String,
    producer: Producer,
}

impl Raftmq {
    /// Connects and creates the topic `name` with [`QUEUES`] queues.
    pub async fn connect(servers: &[String], name: &str) -> anyhow::Result<Self> {
        let mut last = None;
        for s in servers {
            let Ok(a) = Admin::connect(s) else { continue };
            match a.create_topic(name, QUEUES, 1, false).await {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) if e.to_string().contains("exists") => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            anyhow::bail!("could not create topic {name} at {servers:?}: {e}");
        }
        let producer = Producer::new(servers, ProducerOptions::default())?;
        Ok(Self { servers: servers.to_vec(), topic: name.to_string(), producer })
    }

    /// Deletes the topic (its messages stay in the CommitLog until retention).
    pub async fn reset(&self) -> anyhow::Result<()> {
        for s in &self.servers {
            if let Ok(a) = Admin::connect(s)
                && a.delete_topic(&self.topic).await.is_ok()
            {
                return Ok(());
            }
        }
        anyhow::bail!("could not delete topic {}", self.topic)
    }

    pub fn publisher(&self) -> Publisher {
        Publisher { producer: self.producer.clone(), topic: self.topic.clone() }
    }

    /// Consumer `index` of `count`: reads queues `index`, `index + count`, ...
    /// of the topic from their group offsets.
    pub async fn consumer(&self, group: &str, index: usize, count: usize) -> anyhow::Result<Consumer> {
        let c = PullConsumer::new(&self.servers, group)?;
        let mut queues = Vec::new();
        for q in (index..QUEUES as usize).step_by(count.max(1)) {
            let offset = c.committed(&self.topic, q as u32).await.context("reading the group's offset")?;
            queues.push((q as u32, offset));
        }
        anyhow::ensure!(!queues.is_empty(), "consumer {index} of {count} has no queue ({QUEUES} queues)");
        Ok(Consumer { c, topic: self.topic.clone(), queues, next: 0 })
    }
}

pub struct Publisher {
    producer: Producer,
    topic: String,
}

impl Publisher {
    pub async fn publish(&mut self, body: Bytes) -> anyhow::Result<()> {
        self.producer.send(&self.topic, OutMessage::new(body.to_vec())).await?;
        Ok(())
    }
}

pub struct Consumer {
    c: PullConsumer,
    topic: String,
    /// (queue, next offset)
    queues: Vec<(u32, u64)>,
    next: usize,
}

impl Consumer {
    /// Pulls the next non-empty queue (round robin), then commits the new
    /// offset. With one queue the pull long-polls for `wait`; with several,
    /// each is polled without waiting and the call sleeps 1 ms between
    /// empty rounds until `wait` is over.
    pub async fn receive(&mut self, wait: Duration) -> anyhow::Result<Vec<Bytes>> {
        let deadline = tokio::time::Instant::now() + wait;
        let n = self.queues.len();
        loop {
            for _ in 0..n {
                let k = self.next;
                self.next = (self.next + 1) % n;
                let (queue, offset) = self.queues[k];
                let poll = if n == 1 { wait } else { Duration::ZERO };
                let (msgs, next) = self.c.pull(&self.topic, queue, offset, PULL_BATCH, poll).await?;
                if next != offset {
                    self.queues[k].1 = next;
                    self.c.commit(&self.topic, queue, next).await?;
                }
                if !msgs.is_empty() {
                    return Ok(msgs.into_iter().map(|m| Bytes::from(m.body)).collect());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
