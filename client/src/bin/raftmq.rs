//! `raftmq`: the admin and test CLI (in the style of RocketMQ's `mqadmin`).
//! Human output by default, `--json` for scripts.

use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use raftmq_client::Admin;
use raftmq_client::Delivery;
use raftmq_client::Filter;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::SimpleConsumer;
use raftmq_client::admin_pb::FoundMessage;
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
    /// Name server (route and cluster lists).
    #[arg(long, default_value = "127.0.0.1:9876", global = true)]
    namesrv: String,
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
        /// Message tag.
        #[arg(long)]
        tag: Option<String>,
        /// Message key (repeat for several).
        #[arg(long)]
        key: Vec<String>,
        /// FIFO message group (message type FIFO).
        #[arg(long = "message-group", alias = "group")]
        message_group: Option<String>,
        /// Deliver this many milliseconds after sending (message type DELAY).
        #[arg(long, conflicts_with_all = ["delay_level", "message_group"])]
        delay_ms: Option<u64>,
        /// RocketMQ delay level 1..=18 (1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h).
        #[arg(long, conflicts_with = "message_group")]
        delay_level: Option<u32>,
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
        /// Only messages with these tags (`a || b`).
        #[arg(long, conflicts_with = "filter_sql")]
        filter_tag: Option<String>,
        /// Only messages whose properties match this SQL92 expression (`a > 3`).
        #[arg(long)]
        filter_sql: Option<String>,
    },
    /// Find stored messages by id or key.
    Message {
        #[command(subcommand)]
        cmd: MessageCmd,
    },
    /// A consumer group's dead-letter queue: list, show, resend.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
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
    /// The nodes given with --server: role, term, indexes, disk, reads.
    Broker {
        #[command(subcommand)]
        cmd: BrokerCmd,
    },
    /// A node's configuration: show it, or change a run-time setting on
    /// every node of the group (in memory).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Serve the web console at http://LISTEN/ (files built in; works
    /// offline). It talks to the nodes given with --server and the name
    /// server given with --namesrv.
    Console {
        #[arg(long, default_value = "127.0.0.1:8088")]
        listen: String,
        /// Write actions need this key (the page asks for it). Without a key
        /// the console is read-only when the group has ACL on.
        #[arg(long)]
        admin_key: Option<String>,
        /// No write actions.
        #[arg(long)]
        read_only: bool,
        /// A host name the console may be reached by (repeatable). IP
        /// addresses and `localhost` always work; other names in the Host
        /// header are refused (DNS rebinding).
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BrokerCmd {
    Status,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// The configuration in effect on each node given with --server.
    Get,
    /// Sets `section.key` (limits, follower_read, consumer, transaction) to
    /// a TOML value on every node of the group, e.g. `limits.max_body_bytes 1048576`.
    Update { key: String, value: String },
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
    /// Per queue: first and end offset, messages kept.
    Status {
        name: String,
    },
    /// The groups serving a topic, from the name server (--namesrv).
    Route {
        name: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Every node of the group this node belongs to.
    Status,
    /// Every group and node the name server (--namesrv) knows.
    List,
}

#[derive(Subcommand)]
enum ConsumerCmd {
    Progress {
        group: String,
        #[arg(long, default_value = "")]
        topic: String,
    },
    /// The group's consumers heard from by heartbeat.
    Connections { group: String },
    /// Moves the group's offsets on a topic to the first messages stored at
    /// or after a time: milliseconds since the epoch, or `-30m` / `-2h` /
    /// `-1d` from now. In every broker group the name server routes the
    /// topic to (the group behind --server when no name server answers).
    ResetOffset {
        group: String,
        topic: String,
        #[arg(long, allow_hyphen_values = true)]
        time: String,
    },
}

/// `--time`: epoch milliseconds, or `-<n><s|m|h|d>` before now.
fn parse_time_ms(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    if let Some(rel) = s.strip_prefix('-') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: i64 = n.parse().map_err(|_| anyhow::anyhow!("bad time {s:?}: use epoch ms or -30m, -2h, -1d"))?;
        let ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => anyhow::bail!("bad time unit in {s:?}: s, m, h or d"),
        };
        return Ok(now_ms - n * ms);
    }
    s.parse().map_err(|_| anyhow::anyhow!("bad time {s:?}: use epoch ms or -30m, -2h, -1d"))
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
enum MessageCmd {
    /// By message id (`--id`, optionally in `--topic`) or by key (`--topic` and `--key`).
    Query {
        #[arg(long, conflicts_with = "key", required_unless_present = "key")]
        id: Option<String>,
        #[arg(long, required_unless_present = "id")]
        key: Option<String>,
        #[arg(long)]
        topic: Option<String>,
        /// At most this many (by key).
        #[arg(long, default_value_t = 32)]
        max: u32,
        /// Also each message's delivery to this consumer group.
        #[arg(long)]
        group: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// Dead letters of a group, from an offset of its dead-letter queue.
    List {
        #[arg(long, short)]
        group: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 32)]
        max: u32,
    },
    /// One dead letter: body and properties.
    Show {
        #[arg(long, short)]
        group: String,
        #[arg(long)]
        offset: u64,
    },
    /// Hand a dead letter back to its group (delivered again from attempt 1).
    Resend {
        #[arg(long, short)]
        group: String,
        #[arg(long)]
        offset: u64,
    },
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

fn found_json(m: &FoundMessage) -> serde_json::Value {
    json!({"topic": m.topic, "broker": m.broker_name, "queue": m.queue_id, "offset": m.offset,
        "message_id": m.message_id, "tag": m.tag, "keys": m.keys, "properties": m.properties,
        "message_group": m.message_group, "born_timestamp_ms": m.born_timestamp_ms,
        "store_timestamp_ms": m.store_timestamp_ms, "delivery_timestamp_ms": m.delivery_timestamp_ms,
        "origin_queue": m.origin_queue_id, "origin_offset": m.origin_offset, "attempts": m.attempts,
        "group_state": m.group_state,
        "body_size": m.body.len(), "body": String::from_utf8_lossy(&m.body)})
}

/// At most `n` characters of a body, on one line.
fn preview(body: &[u8], n: usize) -> String {
    let s: String = String::from_utf8_lossy(body).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().count() > n { format!("{}…", s.chars().take(n).collect::<String>()) } else { s }
}

fn print_found(m: &FoundMessage) {
    println!("topic:          {}", m.topic);
    println!("broker:         {}", m.broker_name);
    println!("queue/offset:   {} @ {}", m.queue_id, m.offset);
    println!("message id:     {}", m.message_id);
    println!("tag:            {}", m.tag);
    println!("keys:           {}", m.keys.join(", "));
    if !m.message_group.is_empty() {
        println!("message group:  {}", m.message_group);
    }
    println!("born / stored:  {} / {} (unix ms)", m.born_timestamp_ms, m.store_timestamp_ms);
    if m.delivery_timestamp_ms > 0 {
        println!("deliver at:     {} (unix ms)", m.delivery_timestamp_ms);
    }
    if m.attempts > 0 {
        println!("origin:         queue {} @ {}, {} attempts", m.origin_queue_id, m.origin_offset, m.attempts);
    }
    let mut props: Vec<_> = m.properties.iter().collect();
    props.sort();
    println!("properties:");
    for (k, v) in props {
        println!("  {k} = {v}");
    }
    println!("body ({} bytes):", m.body.len());
    println!("{}", String::from_utf8_lossy(&m.body));
}

/// The first node that answers.
fn namesrv(
    addr: &str,
) -> anyhow::Result<raftmq_proto::namesrv::name_server_client::NameServerClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(raftmq_proto::namesrv::name_server_client::NameServerClient::new(ch))
}

/// Groups and their nodes, as a name server sees them (with a topic's
/// queue count per group for a route).
fn print_groups(groups: &[raftmq_proto::namesrv::GroupRoute], json_out: bool, route: bool) {
    if json_out {
        let v: Vec<_> = groups
            .iter()
            .map(|g| {
                let nodes: Vec<_> = g
                    .nodes
                    .iter()
                    .map(|n| json!({"node_id": n.node_id, "address": n.address, "leader": n.leader, "term": n.term}))
                    .collect();
                json!({"group": g.broker_name, "queues": g.queues, "nodes": nodes})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return;
    }
    let queues = |q: String| if route { format!(" {q:>6}") } else { String::new() };
    println!("{:<20}{} {:>5} {:<24} {:<9} {:>6}", "GROUP", queues("QUEUES".into()), "NODE", "ADDRESS", "ROLE", "TERM");
    for g in groups {
        for n in &g.nodes {
            let role = if n.leader { "leader" } else { "follower" };
            let q = queues(g.queues.to_string());
            println!("{:<20}{q} {:>5} {:<24} {:<9} {:>6}", g.broker_name, n.node_id, n.address, role, n.term);
        }
    }
}

/// The name server's route of `topic`: every broker group serving it.
async fn topic_route(namesrv_addr: &str, topic: &str) -> anyhow::Result<raftmq_proto::namesrv::GetRouteReply> {
    let mut ns = namesrv(namesrv_addr)?;
    Ok(tokio::time::timeout(
        Duration::from_secs(3),
        ns.get_route(raftmq_proto::namesrv::GetRouteRequest { topic: topic.to_string() }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{namesrv_addr}: timed out"))?
    .map_err(|s| anyhow::anyhow!("{namesrv_addr}: {}", s.message()))?
    .into_inner())
}

/// The broker groups holding queues of `topic`, each with its nodes' addresses.
async fn topic_groups(namesrv_addr: &str, topic: &str) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    Ok(topic_route(namesrv_addr, topic)
        .await?
        .groups
        .into_iter()
        .filter(|g| g.queues > 0)
        .map(|g| (g.broker_name, g.nodes.into_iter().map(|n| n.address).collect()))
        .collect())
}

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
                TopicCmd::Status { name } => {
                    let topics = a.list_topics().await?;
                    let t = topics
                        .into_iter()
                        .find(|t| t.config.as_ref().is_some_and(|c| c.name == name))
                        .ok_or_else(|| anyhow::anyhow!("topic {name} not found"))?;
                    if json_out {
                        let v: Vec<_> = t.queues.iter().map(|q| json!({"queue": q.queue_id, "min_offset": q.min_offset, "max_offset": q.max_offset})).collect();
                        println!("{}", json!({"topic": name, "queues": v}));
                    } else {
                        println!("{:>5} {:>14} {:>14} {:>12}", "QUEUE", "MIN OFFSET", "MAX OFFSET", "MESSAGES");
                        for q in &t.queues {
                            println!(
                                "{:>5} {:>14} {:>14} {:>12}",
                                q.queue_id,
                                q.min_offset,
                                q.max_offset,
                                q.max_offset - q.min_offset
                            );
                        }
                    }
                }
                TopicCmd::Route { name } => {
                    let route = topic_route(&cli.namesrv, &name).await?;
                    print_groups(&route.groups, json_out, true);
                }
                TopicCmd::List => {
                    let topics = a.list_topics().await?;
                    if json_out {
                        let v: Vec<_> = topics
                            .iter()
                            .map(|t| {
                                let c = t.config.clone().unwrap_or_default();
                                json!({"name": c.name, "queues": c.queues, "type": raftmq_client::message_type_name(c.message_type),
                                       "queue_max_offsets": t.queues.iter().map(|q| q.max_offset).collect::<Vec<_>>()})
                            })
                            .collect();
                        println!("{}", serde_json::Value::Array(v));
                    } else {
                        println!("{:<32} {:>6} {:<12} {:>12}", "TOPIC", "QUEUES", "TYPE", "MESSAGES");
                        for t in topics {
                            let c = t.config.unwrap_or_default();
                            let n: u64 = t.queues.iter().map(|q| q.max_offset - q.min_offset).sum();
                            println!(
                                "{:<32} {:>6} {:<12} {:>12}",
                                c.name,
                                c.queues,
                                raftmq_client::message_type_name(c.message_type),
                                n
                            );
                        }
                    }
                }
            }
        }
        Cmd::Cluster { cmd: ClusterCmd::List } => {
            let mut ns = namesrv(&cli.namesrv)?;
            let c = ns
                .get_cluster(raftmq_proto::namesrv::GetClusterRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", cli.namesrv, s.message()))?
                .into_inner();
            print_groups(&c.groups, json_out, false);
        }
        Cmd::Broker { cmd: BrokerCmd::Status } => {
            let mut rows = Vec::new();
            for s in &cli.server {
                let a = Admin::connect(s)?;
                match tokio::time::timeout(Duration::from_secs(3), a.node_status()).await {
                    Ok(Ok(n)) => {
                        rows.push(json!({"server": s, "node_id": n.node_id, "group": n.broker_name, "role": n.role,
                        "term": n.term, "commit_index": n.commit_index, "applied_index": n.applied_index,
                        "leader_id": n.leader_id, "disk_bytes": n.disk_bytes, "reads_served": n.reads_served}))
                    }
                    Ok(Err(e)) => rows.push(json!({"server": s, "error": e.to_string()})),
                    Err(_) => rows.push(json!({"server": s, "error": "timed out"})),
                }
            }
            if json_out {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for r in rows {
                    println!("{r}");
                }
            }
        }
        Cmd::Console { listen, admin_key, read_only, allow_host } => {
            let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listen {listen}"))?;
            let config = raftmq_client::console::ConsoleConfig {
                servers: cli.server.clone(),
                namesrv: cli.namesrv.clone(),
                admin_key,
                read_only,
                allowed_hosts: allow_host,
            };
            println!("console at http://{}/", listener.local_addr()?);
            raftmq_client::console::serve(listener, config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        }
        Cmd::Config { cmd: ConfigCmd::Get } => {
            for s in &cli.server {
                let a = Admin::connect(s)?;
                match a.get_config().await {
                    Ok(t) => println!("# {s}\n{t}"),
                    Err(e) => println!("# {s}: {e}"),
                }
            }
        }
        Cmd::Config { cmd: ConfigCmd::Update { key, value } } => {
            let a = admin(&cli.server).await?;
            let mut failed = 0;
            for n in a.cluster_status().await? {
                match Admin::connect(&n.address)?.update_config(&key, &value).await {
                    Ok(m) => println!("{m}"),
                    Err(e) => {
                        failed += 1;
                        println!("node {} ({}): {e}", n.node_id, n.address);
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} node(s) did not take the change");
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
        Cmd::Consumer { cmd: ConsumerCmd::Connections { group } } => {
            let a = admin(&cli.server).await?;
            let c = a.consumer_connections(&group).await?;
            if json_out {
                let v: Vec<_> = c.iter().map(|c| json!({"client_id": c.client_id, "last_heartbeat_ms_ago": c.last_heartbeat_ms_ago, "alive": c.alive})).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<48} {:>18} {:>6}", "CLIENT", "LAST HEARTBEAT", "ALIVE");
                for c in &c {
                    println!("{:<48} {:>15} ms {:>6}", c.client_id, c.last_heartbeat_ms_ago, c.alive);
                }
                println!("{} consumer(s)", c.len());
            }
        }
        Cmd::Consumer { cmd: ConsumerCmd::ResetOffset { group, topic, time } } => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            let ts = parse_time_ms(&time, now)?;
            // Every broker group that serves the topic (the name server's
            // route); only the group behind --server when no name server
            // answers.
            let groups: Vec<(String, Vec<String>)> = match topic_groups(&cli.namesrv, &topic).await {
                Ok(g) if !g.is_empty() => g,
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "no route for the topic".into(),
                    };
                    eprintln!("name server {}: {why}; resetting the group behind --server only", cli.namesrv);
                    vec![(String::new(), cli.server.clone())]
                }
            };
            let mut all = Vec::new();
            for (broker, addrs) in &groups {
                let a = admin(addrs).await.with_context(|| format!("broker group {broker}"))?;
                for q in a.reset_offset_by_time(&group, &topic, ts).await? {
                    all.push((broker.clone(), q));
                }
            }
            if json_out {
                let v: Vec<_> =
                    all.iter().map(|(b, q)| json!({"broker": b, "queue": q.queue_id, "offset": q.offset})).collect();
                println!("{}", json!({"group": group, "topic": topic, "timestamp_ms": ts, "queues": v}));
            } else {
                for (b, q) in &all {
                    let at = if b.is_empty() { String::new() } else { format!(" ({b})") };
                    println!("{topic} queue {}{at}: offset {}", q.queue_id, q.offset);
                }
                println!("reset {group} on {topic} to {ts} ms in {} broker group(s)", groups.len());
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
        Cmd::Send { topic, body, size, count, tag, key, message_group, delay_ms, delay_level } => {
            if let Some(l) = delay_level {
                raftmq_client::delay_level(l)?;
            }
            let delivery = match (delay_ms, delay_level) {
                (Some(ms), _) => Some(Delivery::After(Duration::from_millis(ms))),
                (None, Some(l)) => Some(Delivery::Level(l)),
                (None, None) => None,
            };
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
                    message_group: message_group.clone(),
                    delivery,
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
        Cmd::Consume { topic, group, max, wait_ms, no_ack, filter_tag, filter_sql } => {
            let c = SimpleConsumer::new(&cli.server, &group)?;
            match (filter_tag, filter_sql) {
                (Some(t), _) => c.subscribe(&topic, Filter::Tag(t)),
                (None, Some(s)) => c.subscribe(&topic, Filter::Sql(s)),
                (None, None) => {}
            }
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
        Cmd::Message { cmd: MessageCmd::Query { id, key, topic, max, group } } => {
            let a = admin(&cli.server).await?;
            if id.is_none() && (key.is_none() || topic.is_none()) {
                anyhow::bail!("give --id, or --key with --topic");
            }
            let req = raftmq_client::admin_pb::QueryMessageRequest {
                topic: topic.unwrap_or_default(),
                message_id: id.unwrap_or_default(),
                key: key.unwrap_or_default(),
                max,
                group: group.clone().unwrap_or_default(),
            };
            let found = a.query_messages(req).await?;
            if json_out {
                println!("{}", serde_json::Value::Array(found.iter().map(found_json).collect()));
            } else if found.is_empty() {
                println!("no message found");
            } else {
                println!(
                    "{:<24} {:<10} {:>5} {:>10} {:<34} {:<12} {:<20} BODY",
                    "TOPIC", "BROKER", "QUEUE", "OFFSET", "MESSAGE ID", "TAG", "KEYS"
                );
                for m in &found {
                    println!(
                        "{:<24} {:<10} {:>5} {:>10} {:<34} {:<12} {:<20} {}",
                        m.topic,
                        m.broker_name,
                        m.queue_id,
                        m.offset,
                        m.message_id,
                        m.tag,
                        m.keys.join(","),
                        preview(&m.body, 40)
                    );
                    if let Some(g) = &group {
                        let attempt = if m.attempts > 0 { format!(", attempt {}", m.attempts) } else { String::new() };
                        println!("  to {g}: {}{attempt}", m.group_state);
                    }
                }
            }
        }
        Cmd::Dlq { cmd: DlqCmd::List { group, from, max } } => {
            let a = admin(&cli.server).await?;
            let r = a.dead_letters(&group, from, max).await?;
            if json_out {
                let v: Vec<_> = r.messages.iter().map(found_json).collect();
                println!(
                    "{}",
                    json!({"group": group, "messages": v, "next_offset": r.next_offset, "end_offset": r.end_offset})
                );
            } else {
                println!(
                    "{:>8} {:<34} {:<24} {:>12} {:>8} BODY",
                    "OFFSET", "MESSAGE ID", "TOPIC", "ORIGIN", "ATTEMPTS"
                );
                for m in &r.messages {
                    let origin = format!("{}@{}", m.origin_queue_id, m.origin_offset);
                    println!(
                        "{:>8} {:<34} {:<24} {:>12} {:>8} {}",
                        m.offset,
                        m.message_id,
                        m.topic,
                        origin,
                        m.attempts,
                        preview(&m.body, 40)
                    );
                }
                println!(
                    "{} shown; next offset {}, dead-letter queue ends at {}",
                    r.messages.len(),
                    r.next_offset,
                    r.end_offset
                );
            }
        }
        Cmd::Dlq { cmd: DlqCmd::Show { group, offset } } => {
            let a = admin(&cli.server).await?;
            let Some(m) = a.dead_letter(&group, offset).await? else {
                anyhow::bail!("no dead letter of group {group} at offset {offset}");
            };
            if json_out {
                println!("{}", found_json(&m));
            } else {
                print_found(&m);
            }
        }
        Cmd::Dlq { cmd: DlqCmd::Resend { group, offset } } => {
            let m = admin(&cli.server).await?.resend_dead_letter(&group, offset).await?;
            if json_out {
                println!("{}", json!({"group": group, "offset": offset, "result": m}));
            } else {
                println!("dead letter {offset} of {group}: {m}");
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

#[cfg(test)]
mod tests {
    use super::parse_time_ms;

    #[test]
    fn times_are_epoch_ms_or_relative_to_now() {
        assert_eq!(parse_time_ms("1700000000000", 0).unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time_ms("-30m", 10_000_000).unwrap(), 10_000_000 - 30 * 60_000);
        assert_eq!(parse_time_ms("-1d", 100_000_000).unwrap(), 100_000_000 - 86_400_000);
        assert!(parse_time_ms("-5w", 0).is_err());
        assert!(parse_time_ms("yesterday", 0).is_err());
    }
}
