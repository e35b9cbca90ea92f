//! One client per system, behind the same three operations: publish a
//! message and wait for the system's durable acknowledgement; receive a
//! batch and acknowledge it; set up and empty the benchmark's destination.
//!
//! Each driver uses its system's usual client the way that system's
//! documentation recommends for a durable at-least-once pipeline:
//! - RaftMQ: our Rust client; SendMessage (the reply comes once a majority
//!   fsynced the entry); a pull consumer per queue that commits its offset
//!   after each batch.
//! - NATS JetStream (`async-nats`): a stream of 3 replicas on file storage;
//!   `publish` and wait for the PubAck; a durable pull consumer with
//!   ack-all, acknowledging the last message of each batch.
//! - RabbitMQ (`lapin`): a quorum queue; a channel per producer in confirm
//!   mode, one persistent publish at a time; a consumer with a prefetch
//!   window acknowledging each batch with `multiple`.

pub mod nats;
pub mod rabbitmq;
pub mod raftmq;

/// The systems the benchmark knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Raftmq,
    Nats,
    Rabbitmq,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Raftmq => "raftmq",
            System::Nats => "nats",
            System::Rabbitmq => "rabbitmq",
        }
    }
}

/// Where the systems listen (the defaults match `bench/peers.sh` and
/// `scripts/cluster.sh`).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub raftmq: Vec<String>,
    pub nats: String,
    pub amqp: String,
}

/// A connected client of one system, cheap to clone into tasks.
#[derive(Clone)]
pub enum Driver {
    Raftmq(raftmq::Raftmq),
    Nats(nats::Nats),
    Rabbitmq(rabbitmq::Rabbitmq),
}

/// One producer: publishes one message at a time.
pub enum Publisher {
    Raftmq(raftmq::Publisher),
    Nats(nats::Publisher),
    Rabbitmq(rabbitmq::Publisher),
}

/// One consumer: receives batches and acknowledges them. (Boxed: the
/// clients' consumers differ much in size.)
pub enum Consumer {
    Raftmq(Box<raftmq::Consumer>),
    Nats(Box<nats::Consumer>),
    Rabbitmq(Box<rabbitmq::Consumer>),
}

impl Driver {
    /// Connects and makes sure the destination (`name`: topic, stream or
    /// queue) exists.
    pub async fn connect(system: System, ep: &Endpoints, name: &str) -> anyhow::Result<Self> {
        Ok(match system {
            System::Raftmq => Driver::Raftmq(raftmq::Raftmq::connect(&ep.raftmq, name).await?),
            System::Nats => Driver::Nats(nats::Nats::connect(&ep.nats, name).await?),
            System::Rabbitmq => Driver::Rabbitmq(rabbitmq::Rabbitmq::connect(&ep.amqp, name).await?),
        })
    }

    /// Deletes and recreates the destination, so a run starts empty.
    pub async fn reset(&self) -> anyhow::Result<()> {
        match self {
            Driver::Raftmq(d) => d.reset().await,
            Driver::Nats(d) => d.reset().await,
            Driver::Rabbitmq(d) => d.reset().await,
        }
    }

    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        Ok(match self {
            Driver::Raftmq(d) => Publisher::Raftmq(d.publisher()),
            Driver::Nats(d) => Publisher::Nats(d.publisher()),
            Driver::Rabbitmq(d) => Publisher::Rabbitmq(d.publisher().await?),
        })
    }

    /// `n` publishers.
    pub async fn publishers(&self, n: usize) -> anyhow::Result<Vec<Publisher>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.publisher().await?);
        }
        Ok(out)
    }

    /// The `n` consumers of a new consumer group named `group`.
    pub async fn consumers(&self, group: &str, n: usize) -> anyhow::Result<Vec<Consumer>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(self.consumer(group, i, n).await?);
        }
        Ok(out)
    }

    /// Consumer `index` of `count` of the consumer group `group`.
    pub async fn consumer(&self, group: &str, index: usize, count: usize) -> anyhow::Result<Consumer> {
        Ok(match self {
            Driver::Raftmq(d) => Consumer::Raftmq(Box::new(d.consumer(group, index, count).await?)),
            Driver::Nats(d) => Consumer::Nats(Box::new(d.consumer(group).await?)),
            Driver::Rabbitmq(d) => Consumer::Rabbitmq(Box::new(d.consumer().await?)),
        })
    }
}

impl Publisher {
    /// Publishes one message and returns once the system acknowledged it.
    pub async fn publish(&mut self, body: bytes::Bytes) -> anyhow::Result<()> {
        match self {
            Publisher::Raftmq(p) => p.publish(body).await,
            Publisher::Nats(p) => p.publish(body).await,
            Publisher::Rabbitmq(p) => p.publish(body).await,
        }
    }
}

impl Consumer {
    /// The next batch of message bodies (empty after `wait` without
    /// messages), acknowledged before it is returned.
    pub async fn receive(&mut self, wait: std::time::Duration) -> anyhow::Result<Vec<bytes::Bytes>> {
        match self {
            Consumer::Raftmq(c) => c.receive(wait).await,
            Consumer::Nats(c) => c.receive(wait).await,
            Consumer::Rabbitmq(c) => c.receive(wait).await,
        }
    }
}
