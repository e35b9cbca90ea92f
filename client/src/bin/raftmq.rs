//! `raftmq`: the admin and test CLI (in the style of RocketMQ's `mqadmin`).
//! Human output by default, `--json` for scripts.

use std::time::Duration;
use std::time::Instant;

use clap::Parser;
use clap::Subcommand;
use raftmq_client::Admin;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::SimpleConsumer;
use serde_json::json;

#[derive(Parser)]
#[command(version, about = "RaftMQ admin CLI")]
struct Cli {
    /// Nodes to talk to (any node of the group), comma-separated.
    #[arg(
        long,
        short,
        default_value = "127.0.0.1:8081,127.0.0.1:8082,127.0.0.1:8083",
        value_delimiter = ',',
        global = true
    )]
    server: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create, update, delete and list topics.
    Topic {
        #[command(subcommand)]
        cmd: TopicCmd,
    },
    /// The nodes of the group: role, term, commit and applied index, lag, reads served.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// A consumer group's progress: offset, max offset and lag per queue.
    Consumer {
        #[command(subcommand)]
        cmd: ConsumerCmd,
    },
    /// Consumer group configuration: update, delete, list.
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Send test messages.
    Send {
        topic: String,
        /// Message body (default: "hello N").
        #[arg(long)]
        body: Option<String>,
        /// Body of this many bytes instead.
        #[arg(long)]
        size: Option<usize>,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        key: Vec<String>,
        /// FIFO message group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Receive (and ack) messages as a simple consumer.
    Consume {
        topic: String,
        #[arg(long, short)]
        group: String,
        /// Stop after this many messages.
        #[arg(long, default_value_t = 10)]
        max: u64,
        /// Stop when nothing arrives for this long.
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
        /// Do not ack (the messages come back after the invisible duration).
        #[arg(long)]
        no_ack: bool,
    },
    /// Raft leadership.
    Leader {
        #[command(subcommand)]
        cmd: LeaderCmd,
    },
    /// Raft membership.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
}

#[derive(Subcommand)]
enum TopicCmd {
    Create {
        name: String,
        #[arg(long, default_value_t = 8)]
        queues: u32,
        /// normal, fifo, delay or transaction.
        #[arg(long = "type", default_value = "normal")]
        message_type: String,
    },
    Update {
        name: String,
        #[arg(long)]
        queues: u32,
        #[arg(long = "type", default_value = "normal")]
        message_type: String,
    },
    Delete {
        name: String,
    },
    List,
}

#[derive(Subcommand)]
enum ClusterCmd {
    Status,
}

#[derive(Subcommand)]
enum ConsumerCmd {
    Progress {
        group: String,
        #[arg(long, default_value = "")]
        topic: String,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create or replace a group's configuration.
    Update {
        name: String,
        /// Delivery attempts before the dead-letter queue (0: broker default, 17).
        #[arg(long, default_value_t = 0)]
        max_attempts: u32,
        /// Stop consumption by this group.
        #[arg(long)]
        disable: bool,
        /// Consume FIFO topics in order.
        #[arg(long)]
        fifo: bool,
        /// Allow broadcasting consumption.
        #[arg(long)]
        broadcast: bool,
    },
    Delete {
        name: String,
    },
    List,
}

#[derive(Subcommand)]
enum LeaderCmd {
    /// Hand leadership to a node.
    Transfer { node_id: u64 },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Add a node (it must be running with bootstrap = false).
    Add {
        node_id: u64,
        address: String,
    },
    Remove {
        node_id: u64,
    },
}

fn message_type(s: &str) -> anyhow::Result<i32> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "normal" => 1,
        "fifo" => 2,
        "delay" => 3,
        "transaction" => 4,
        other => anyhow::bail!("unknown message type {other:?}: use normal, fifo, delay or transaction"),
    })
}

fn type_name(t: i32) -> &'static str {
    match t {
        2 => "FIFO",
        3 => "DELAY",
        4 => "TRANSACTION",
        _ => "NORMAL",
    }
}

/// The first node that answers.
async fn admin(servers: &[String]) -> anyhow::Result<Admin> {
    let mut last = None;
    for s in servers {
        let a = Admin::connect(s)?;
        match tokio::time::timeout(Duration::from_secs(2), a.node_status()).await {
            Ok(Ok(_)) => return Ok(a),
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some(format!("{s}: timed out")),
        }
    }
    anyhow::bail!("no node answered ({})", last.unwrap_or_default())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let json_out = cli.json;
    match cli.cmd {
        Cmd::Topic { cmd } => {
            let a = admin(&cli.server).await?;
            match cmd {
                TopicCmd::Create { name, queues, message_type: t } => {
                    let m = a.create_topic(&name, queues, message_type(&t)?, false).await?;
                    println!(
                        "{}",
                        if json_out {
                            json!({"topic": name, "result": m}).to_string()
                        } else {
                            format!("created topic {name}: {m}")
                        }
                    );
                }
                TopicCmd::Update { name, queues, message_type: t } => {
                    let m = a.create_topic(&name, queues, message_type(&t)?, true).await?;
                    println!(
                        "{}",
                        if json_out {
                            json!({"topic": name, "result": m}).to_string()
                        } else {
                            format!("updated topic {name}: {m}")
                        }
                    );
                }
                TopicCmd::Delete { name } => {
                    let m = a.delete_topic(&name).await?;
                    println!(
                        "{}",
                        if json_out {
                            json!({"topic": name, "result": m}).to_string()
                        } else {
                            format!("deleted topic {name}: {m}")
                        }
                    );
                }
                TopicCmd::List => {
                    let topics = a.list_topics().await?;
                    if json_out {
                        let v: Vec<_> = topics
                            .iter()
                            .map(|t| {
                                let c = t.config.clone().unwrap_or_default();
                                json!({"name": c.name, "queues": c.queues, "type": type_name(c.message_type),
                                       "queue_max_offsets": t.queues.iter().map(|q| q.max_offset).collect::<Vec<_>>()})
                            })
                            .collect();
                        println!("{}", serde_json::Value::Array(v));
                    } else {
                        println!("{:<32} {:>6} {:<12} {:>12}", "TOPIC", "QUEUES", "TYPE", "MESSAGES");
                        for t in topics {
                            let c = t.config.unwrap_or_default();
                            let n: u64 = t.queues.iter().map(|q| q.max_offset - q.min_offset).sum();
                            println!("{:<32} {:>6} {:<12} {:>12}", c.name, c.queues, type_name(c.message_type), n);
                        }
                    }
                }
            }
        }
        Cmd::Cluster { cmd: ClusterCmd::Status } => {
            let a = admin(&cli.server).await?;
            let nodes = a.cluster_status().await?;
            if json_out {
                let v: Vec<_> = nodes
                    .iter()
                    .map(|n| json!({"node_id": n.node_id, "group": n.broker_name, "address": n.address, "role": n.role,
                        "term": n.term, "commit_index": n.commit_index, "applied_index": n.applied_index,
                        "last_log_index": n.last_log_index, "leader_id": n.leader_id, "reads_served": n.reads_served,
                        "follower_reads_served": n.follower_reads_served, "disk_bytes": n.disk_bytes,
                        "log_first_index": n.log_first_index, "snapshot_index": n.snapshot_index,
                        "followers": n.followers.iter().map(|f| json!({"node_id": f.node_id, "matched_index": f.matched_index, "lag": f.lag})).collect::<Vec<_>>(),
                        "error": n.error}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<5} {:<10} {:<22} {:<11} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}",
                    "NODE",
                    "GROUP",
                    "ADDRESS",
                    "ROLE",
                    "TERM",
                    "FIRST",
                    "LAST",
                    "COMMIT",
                    "APPLIED",
                    "LAG",
                    "READS",
                    "SNAPSHOT"
                );
                for n in &nodes {
                    let lag = nodes
                        .iter()
                        .flat_map(|l| l.followers.iter())
                        .find(|f| f.node_id == n.node_id)
                        .map(|f| f.lag.to_string())
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<5} {:<10} {:<22} {:<11} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}",
                        n.node_id,
                        n.broker_name,
                        n.address,
                        n.role,
                        n.term,
                        n.log_first_index,
                        n.last_log_index,
                        n.commit_index,
                        n.applied_index,
                        lag,
                        n.reads_served,
                        n.snapshot_index
                    );
                    if !n.error.is_empty() {
                        println!("      error: {}", n.error);
                    }
                }
            }
        }
        Cmd::Group { cmd: GroupCmd::Update { name, max_attempts, disable, fifo, broadcast } } => {
            let a = admin(&cli.server).await?;
            let config = raftmq_proto::admin::GroupConfig {
                name: name.clone(),
                consume_enabled: !disable,
                max_delivery_attempts: max_attempts,
                fifo,
                broadcast_enabled: broadcast,
            };
            let m = a.update_group(config).await?;
            if json_out {
                println!("{}", json!({"group": name, "result": m}));
            } else {
                println!("group {name}: {m}");
            }
        }
        Cmd::Group { cmd: GroupCmd::Delete { name } } => {
            let a = admin(&cli.server).await?;
            let m = a.delete_group(&name).await?;
            if json_out {
                println!("{}", json!({"group": name, "result": m}));
            } else {
                println!("group {name}: {m}");
            }
        }
        Cmd::Group { cmd: GroupCmd::List } => {
            let a = admin(&cli.server).await?;
            let groups = a.list_groups().await?;
            if json_out {
                let v: Vec<_> = groups
                    .iter()
                    .map(|g| {
                        json!({"name": g.name, "consume_enabled": g.consume_enabled,
                        "max_delivery_attempts": g.max_delivery_attempts, "fifo": g.fifo,
                        "broadcast_enabled": g.broadcast_enabled})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<32} {:>8} {:>13} {:>5} {:>10}", "GROUP", "CONSUME", "MAX_ATTEMPTS", "FIFO", "BROADCAST");
                for g in &groups {
                    let attempts = if g.max_delivery_attempts == 0 {
                        "default".to_string()
                    } else {
                        g.max_delivery_attempts.to_string()
                    };
                    println!(
                        "{:<32} {:>8} {:>13} {:>5} {:>10}",
                        g.name,
                        if g.consume_enabled { "on" } else { "off" },
                        attempts,
                        g.fifo,
                        g.broadcast_enabled
                    );
                }
            }
        }
        Cmd::Consumer { cmd: ConsumerCmd::Progress { group, topic } } => {
            let a = admin(&cli.server).await?;
            let p = a.consumer_progress(&group, &topic).await?;
            if json_out {
                let v: Vec<_> = p
                    .queues
                    .iter()
                    .map(|q| json!({"topic": q.topic, "queue": q.queue_id, "consumer_offset": q.consumer_offset, "max_offset": q.max_offset, "lag": q.lag, "inflight": q.inflight}))
                    .collect();
                println!("{}", json!({"group": group, "queues": v, "total_lag": p.total_lag}));
            } else {
                println!(
                    "{:<32} {:>5} {:>14} {:>12} {:>10} {:>9}",
                    "TOPIC", "QUEUE", "CONSUMER OFF", "MAX OFF", "LAG", "INFLIGHT"
                );
                for q in &p.queues {
                    println!(
                        "{:<32} {:>5} {:>14} {:>12} {:>10} {:>9}",
                        q.topic, q.queue_id, q.consumer_offset, q.max_offset, q.lag, q.inflight
                    );
                }
                println!("total lag: {}", p.total_lag);
            }
        }
        Cmd::Send { topic, body, size, count, tag, key, group } => {
            let p = Producer::new(&cli.server, ProducerOptions::default())?;
            let started = Instant::now();
            let mut results = Vec::new();
            for i in 0..count {
                let b = match (&body, size) {
                    (_, Some(n)) => vec![b'x'; n],
                    (Some(b), None) => b.clone().into_bytes(),
                    (None, None) => format!("hello {i}").into_bytes(),
                };
                let m = OutMessage {
                    body: b,
                    tag: tag.clone(),
                    keys: key.clone(),
                    message_group: group.clone(),
                    ..Default::default()
                };
                let r = p.send(&topic, m).await?;
                if !json_out && count <= 20 {
                    println!("sent {} to {topic} at offset {}", r.message_id, r.offset);
                }
                results.push(r);
            }
            let secs = started.elapsed().as_secs_f64();
            if json_out {
                let v: Vec<_> =
                    results.iter().map(|r| json!({"message_id": r.message_id, "offset": r.offset})).collect();
                println!("{}", json!({"sent": count, "seconds": secs, "results": v}));
            } else {
                println!("sent {count} messages in {secs:.3} s ({:.0} msg/s)", count as f64 / secs);
            }
        }
        Cmd::Consume { topic, group, max, wait_ms, no_ack } => {
            let c = SimpleConsumer::new(&cli.server, &group)?;
            let mut got = 0u64;
            let mut out = Vec::new();
            while got < max {
                let batch = c
                    .receive(
                        &topic,
                        None,
                        (max - got).min(32) as u32,
                        Duration::from_secs(30),
                        Duration::from_millis(wait_ms),
                    )
                    .await?;
                if batch.is_empty() {
                    break;
                }
                for m in batch {
                    if !no_ack {
                        c.ack(&m).await?;
                    }
                    got += 1;
                    let body = String::from_utf8_lossy(&m.body).to_string();
                    if json_out {
                        out.push(
                            json!({"message_id": m.message_id, "queue": m.queue, "offset": m.offset, "tag": m.tag,
                            "keys": m.keys, "attempt": m.delivery_attempt, "body": body}),
                        );
                    } else {
                        println!(
                            "{} q{} @{} attempt {} tag {:?}: {}",
                            m.message_id, m.queue, m.offset, m.delivery_attempt, m.tag, body
                        );
                    }
                }
            }
            if json_out {
                println!("{}", serde_json::Value::Array(out));
            } else {
                println!("received {got} messages");
            }
        }
        Cmd::Leader { cmd: LeaderCmd::Transfer { node_id } } => {
            let m = admin(&cli.server).await?.transfer_leader(node_id).await?;
            println!("{}", if json_out { json!({"result": m}).to_string() } else { m });
        }
        Cmd::Node { cmd } => {
            let a = admin(&cli.server).await?;
            let m = match cmd {
                NodeCmd::Add { node_id, address } => a.add_node(node_id, &address).await?,
                NodeCmd::Remove { node_id } => a.remove_node(node_id).await?,
            };
            println!("{}", if json_out { json!({"result": m}).to_string() } else { m });
        }
    }
    Ok(())
}
