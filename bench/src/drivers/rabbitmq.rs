//! RabbitMQ through `lapin`: a quorum queue (replicated by Raft on every
//! node of the cluster; it fsyncs before confirming), persistent messages,
//! publisher confirms.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::Channel;
use lapin::Connection;
use lapin::ConnectionProperties;
use lapin::options::BasicAckOptions;
use lapin::options::BasicConsumeOptions;
use lapin::options::BasicPublishOptions;
use lapin::options::BasicQosOptions;
use lapin::options::ConfirmSelectOptions;
use lapin::options::QueueDeclareOptions;
use lapin::options::QueueDeleteOptions;
use lapin::types::AMQPValue;
use lapin::types::FieldTable;

/// Unacknowledged deliveries a consumer may hold; also the batch it acks.
const PREFETCH: u16 = 256;

#[derive(Clone)]
pub struct Rabbitmq {
    conn: std::sync::Arc<Connection>,
    queue: String,
}

impl Rabbitmq {
    /// Connects (`url`: one `amqp://` URL) and declares the quorum queue `name`.
    pub async fn connect(url: &str, name: &str) -> anyhow::Result<Self> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to RabbitMQ at {url}"))?;
        let ch = conn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        ch.queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
            .await
            .with_context(|| format!("declaring quorum queue {name}"))?;
        Ok(Self { conn: std::sync::Arc::new(conn), queue: name.to_string() })
    }

    pub async fn reset(&self) -> anyhow::Result<()> {
        let ch = self.conn.create_channel().await?;
        ch.queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default()).await?;
        Ok(())
    }

    /// A channel of its own in confirm mode.
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        let ch = self.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { ch, queue: self.queue.clone() })
    }

    pub async fn consumer(&self) -> anyhow::Result<Consumer> {
        let ch = self.conn.create_channel().await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(self.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        Ok(Consumer { _ch: ch, consumer })
    }
}

pub struct Publisher {
    ch: Channel,
    queue: String,
}

impl Publisher {
    /// Publishes a persistent message to the queue and waits for its confirm.
    pub async fn publish(&mut self, body: Bytes) -> anyhow::Result<()> {
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "publish not confirmed: {confirm:?}");
        Ok(())
    }
}

pub struct Consumer {
    _ch: Channel,
    consumer: lapin::Consumer,
}

impl Consumer {
    /// The deliveries that arrive within `wait` of the first (at most
    /// [`PREFETCH`], without waiting after the first), acknowledged
    /// together with `multiple`.
    pub async fn receive(&mut self, wait: Duration) -> anyhow::Result<Vec<Bytes>> {
        let first = match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => anyhow::bail!("consumer cancelled"),
            Ok(Some(d)) => d?,
        };
        let mut out = vec![Bytes::from(first.data.clone())];
        let mut last = first;
        while out.len() < PREFETCH as usize {
            match self.consumer.next().now_or_never() {
                Some(Some(d)) => {
                    let d = d?;
                    out.push(Bytes::from(d.data.clone()));
                    last = d;
                }
                _ => break,
            }
        }
        last.ack(BasicAckOptions { multiple: true }).await?;
        Ok(out)
    }
}
