//! `raftmq console`: the web console. A small HTTP/1.1 server serving the
//! page (`console/`, built into the binary: no build step, no CDN) and a JSON
//! API that forwards each call to the same admin API the CLI uses (and the
//! name server for routes); nothing is computed here that the CLI does not.
//!
//! Write actions (POST, DELETE) need the admin key when one is set
//! (`X-Admin-Key` header); without a key the console is read-only when the
//! group has ACL on, or when started with `--read-only`.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] requests at once, request heads up to
//! [`MAX_HEAD_BYTES`], bodies up to [`MAX_BODY_BYTES`], each request answered
//! within [`REQUEST_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use crate::Admin;
use crate::OutMessage;
use crate::Producer;
use crate::ProducerOptions;
use crate::admin_pb;

pub const MAX_CONNECTIONS: usize = 64;
pub const MAX_HEAD_BYTES: usize = 16 << 10;
pub const MAX_BODY_BYTES: usize = 1 << 20;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const STYLE_CSS: &str = include_str!("../console/style.css");

/// How the console reaches the cluster and who may change it.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Broker nodes to start from (any node of a group).
    pub servers: Vec<String>,
    /// Name server (groups and routes), host:port.
    pub namesrv: String,
    /// Required in `X-Admin-Key` for write actions, when set.
    pub admin_key: Option<String>,
    /// No write actions at all.
    pub read_only: bool,
    /// Host names (besides IP addresses and `localhost`) the console
    /// answers to in the `Host` header; any other name is refused, so a web
    /// page whose DNS name is rebound to this address cannot use it.
    pub allowed_hosts: Vec<String>,
}

struct Console {
    config: ConsoleConfig,
    /// Decided at start: read-only unless allowed to write (see module doc).
    read_only: bool,
}

/// An answer: status, content type, body.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn json(v: Value) -> Reply {
        Reply { status: "200 OK", content_type: "application/json", body: v.to_string() }
    }
    fn error(status: &'static str, message: impl std::fmt::Display) -> Reply {
        Reply { status, content_type: "application/json", body: json!({ "error": message.to_string() }).to_string() }
    }
    fn file(content_type: &'static str, body: &str) -> Reply {
        Reply { status: "200 OK", content_type, body: body.to_string() }
    }
}

/// A parsed request.
struct HttpRequest {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Serves the console on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ConsoleConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.servers.is_empty(), "the console needs at least one broker address");
    // Fails closed: a group whose configuration cannot be read counts as
    // having ACL on.
    let acl_on = acl_enabled(&config.servers).await.unwrap_or(true);
    let read_only = config.read_only || (acl_on && config.admin_key.is_none());
    if read_only {
        tracing::info!(acl_on, "console is read-only");
    }
    let console = Arc::new(Console { config, read_only });
    raftmq_proto::metrics::accept_bounded(listener, MAX_CONNECTIONS, REQUEST_TIMEOUT, shutdown, move |stream| {
        let c = console.clone();
        async move { c.connection(stream).await }
    })
    .await;
    Ok(())
}

/// Whether the group behind `servers` checks ACL (from its configuration);
/// None when no node told.
async fn acl_enabled(servers: &[String]) -> Option<bool> {
    for s in servers {
        let Ok(a) = Admin::connect(s) else { continue };
        if let Ok(Ok(toml)) = tokio::time::timeout(Duration::from_secs(3), a.get_config()).await {
            return Some(acl_on_in(&toml));
        }
    }
    None
}

/// Whether a broker's configuration (as `config get` prints it) has
/// `enabled = true` in its `[acl]` table.
fn acl_on_in(toml: &str) -> bool {
    let mut in_acl = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_acl = line == "[acl]";
        } else if in_acl && line.replace(' ', "") == "enabled=true" {
            return true;
        }
    }
    false
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Result<HttpRequest, Reply> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.map_err(|e| Reply::error("400 Bad Request", e))?;
        if n == 0 {
            return Err(Reply::error("400 Bad Request", "connection closed before the request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Reply::error("431 Request Header Fields Too Large", "request head too long"));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if length > MAX_BODY_BYTES {
        return Err(Reply::error("413 Payload Too Large", format!("body over {MAX_BODY_BYTES} bytes")));
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.map_err(|e| Reply::error("400 Bad Request", e))?;
        if n == 0 {
            return Err(Reply::error("400 Bad Request", "connection closed before the body ended"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.clone(), BTreeMap::new()),
    };
    Ok(HttpRequest { method, path, query, headers, body })
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

impl Console {
    async fn connection(&self, mut stream: tokio::net::TcpStream) {
        let reply = match read_request(&mut stream).await {
            Ok(req) => self.route(req).await,
            Err(r) => r,
        };
        let head = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
            reply.status,
            reply.content_type,
            reply.body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(reply.body.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    fn may_write(&self, req: &HttpRequest) -> Result<(), Reply> {
        if self.read_only {
            return Err(Reply::error("403 Forbidden", "the console is read-only (ACL is on and no admin key is set)"));
        }
        if let Some(key) = &self.config.admin_key
            && req.headers.get("x-admin-key") != Some(key)
        {
            return Err(Reply::error("401 Unauthorized", "this action needs the admin key"));
        }
        Ok(())
    }

    /// Whether the request names this console in its `Host` header: an IP
    /// address, `localhost`, or a name given with `--allow-host`. A DNS
    /// rebinding page (evil.example resolving to 127.0.0.1) sends its own
    /// name and is refused.
    fn host_allowed(&self, req: &HttpRequest) -> Result<(), Reply> {
        let Some(host) = req.headers.get("host") else {
            return Err(Reply::error("400 Bad Request", "the request has no Host header"));
        };
        let name = match host.strip_prefix('[') {
            // [v6]:port
            Some(rest) => rest.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || self.config.allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(&name))
        {
            return Ok(());
        }
        Err(Reply::error(
            "421 Misdirected Request",
            format!("host {name:?} is not allowed; start the console with --allow-host {name} to serve it"),
        ))
    }

    async fn route(&self, req: HttpRequest) -> Reply {
        if let Err(r) = self.host_allowed(&req) {
            return r;
        }
        let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let write = matches!(req.method.as_str(), "POST" | "DELETE");
        if write && let Err(r) = self.may_write(&req) {
            return r;
        }
        // A cross-site form or `text/plain` fetch cannot send JSON without a
        // CORS preflight, which this server never answers.
        if write && !req.headers.get("content-type").is_some_and(|c| c.starts_with("application/json")) {
            return Reply::error("415 Unsupported Media Type", "write actions take application/json");
        }
        let body: Value = if req.body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return Reply::error("400 Bad Request", format!("body is not JSON: {e}")),
            }
        };
        let r = match (req.method.as_str(), segs.as_slice()) {
            ("GET", [""] | ["index.html"]) => return Reply::file("text/html", INDEX_HTML),
            ("GET", ["app.js"]) => return Reply::file("text/javascript", APP_JS),
            ("GET", ["style.css"]) => return Reply::file("text/css", STYLE_CSS),
            ("GET", ["api", "mode"]) => Ok(json!({
                "read_only": self.read_only,
                "needs_key": self.config.admin_key.is_some(),
            })),
            ("GET", ["api", "cluster"]) => self.cluster().await,
            ("GET", ["api", "topics"]) => self.topics().await,
            ("POST", ["api", "topics"]) => self.save_topic(&body).await,
            ("DELETE", ["api", "topics", name]) => self.delete_topic(name).await,
            ("GET", ["api", "groups"]) => self.groups().await,
            ("GET", ["api", "groups", g]) => self.group(g).await,
            ("POST", ["api", "groups", g, "reset-offset"]) => self.reset_offset(g, &body).await,
            ("POST", ["api", "groups", g, "dlq", offset, "resend"]) => self.resend(g, offset).await,
            ("GET", ["api", "messages"]) => self.find_messages(&req.query).await,
            ("POST", ["api", "messages"]) => self.send_message(&body).await,
            ("POST", ["api", "leader"]) => self.transfer_leader(&body).await,
            ("POST", ["api", "nodes"]) => self.add_node(&body).await,
            ("DELETE", ["api", "nodes", id]) => self.remove_node(id).await,
            ("GET", _) => return Reply::error("404 Not Found", format!("no page {}", req.path)),
            _ => return Reply::error("405 Method Not Allowed", format!("{} {}", req.method, req.path)),
        };
        match r {
            Ok(v) => Reply::json(v),
            Err(e) => Reply::error("502 Bad Gateway", format!("{e:#}")),
        }
    }

    /// The first broker node that answers.
    async fn admin(&self) -> anyhow::Result<Admin> {
        let mut last = String::new();
        for s in &self.config.servers {
            let a = Admin::connect(s)?;
            match tokio::time::timeout(Duration::from_secs(2), a.node_status()).await {
                Ok(Ok(_)) => return Ok(a),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("{s}: timed out"),
            }
        }
        anyhow::bail!("no broker node answered ({last})")
    }

    /// Groups and nodes: the name server's view (up/down) joined with each
    /// group's own status (roles, indexes, lag, reads, disk).
    async fn cluster(&self) -> anyhow::Result<Value> {
        let mut registered: BTreeMap<String, Vec<raftmq_proto::namesrv::BrokerNode>> = BTreeMap::new();
        let mut namesrv_error = Value::Null;
        match self.namesrv_cluster().await {
            Ok(c) => {
                for g in c.groups {
                    registered.insert(g.broker_name, g.nodes);
                }
            }
            Err(e) => namesrv_error = json!(e.to_string()),
        }
        // Each group's status from one of its nodes: those the name server
        // lists, and the group behind --server.
        let mut entry_points: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (g, nodes) in &registered {
            entry_points.insert(g.clone(), nodes.iter().map(|n| n.address.clone()).collect());
        }
        if let Ok(a) = self.admin().await
            && let Ok(s) = a.node_status().await
        {
            entry_points.entry(s.broker_name).or_default().insert(0, a.addr().to_string());
        }
        let mut groups = Vec::new();
        for (name, addrs) in entry_points {
            let mut nodes: Vec<admin_pb::NodeStatus> = Vec::new();
            let mut error = Value::Null;
            for a in &addrs {
                match tokio::time::timeout(Duration::from_secs(3), Admin::connect(a)?.cluster_status()).await {
                    Ok(Ok(n)) => {
                        nodes = n;
                        error = Value::Null;
                        break;
                    }
                    Ok(Err(e)) => error = json!(e.to_string()),
                    Err(_) => error = json!(format!("{a}: timed out")),
                }
            }
            let reg = registered.get(&name);
            let nodes: Vec<Value> = nodes
                .iter()
                .map(|n| {
                    let up = reg.map(|r| r.iter().any(|x| x.node_id == n.node_id));
                    json!({
                        "node_id": n.node_id, "address": n.address, "role": n.role, "term": n.term,
                        "commit_index": n.commit_index, "applied_index": n.applied_index,
                        "last_log_index": n.last_log_index, "leader_id": n.leader_id,
                        "reads_served": n.reads_served, "follower_reads_served": n.follower_reads_served,
                        "disk_bytes": n.disk_bytes, "error": n.error,
                        "followers": n.followers.iter().map(|f| json!({"node_id": f.node_id, "lag": f.lag, "matched_index": f.matched_index})).collect::<Vec<_>>(),
                        "messages_produced": n.messages_produced, "messages_consumed": n.messages_consumed,
                        "registered": up,
                    })
                })
                .collect();
            groups.push(json!({ "name": name, "nodes": nodes, "error": error }));
        }
        Ok(json!({ "groups": groups, "namesrv": self.config.namesrv, "namesrv_error": namesrv_error }))
    }

    async fn namesrv_cluster(&self) -> anyhow::Result<raftmq_proto::namesrv::GetClusterReply> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.config.namesrv))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(3))
            .connect_lazy();
        let mut c = raftmq_proto::namesrv::name_server_client::NameServerClient::new(ch);
        Ok(c.get_cluster(raftmq_proto::namesrv::GetClusterRequest {}).await?.into_inner())
    }

    async fn topics(&self) -> anyhow::Result<Value> {
        let topics = self.admin().await?.list_topics().await?;
        let v: Vec<Value> = topics
            .iter()
            .map(|t| {
                let c = t.config.clone().unwrap_or_default();
                let queues: Vec<Value> = t
                    .queues
                    .iter()
                    .map(|q| json!({"queue": q.queue_id, "min_offset": q.min_offset, "max_offset": q.max_offset, "messages": q.max_offset - q.min_offset}))
                    .collect();
                let messages: u64 = t.queues.iter().map(|q| q.max_offset - q.min_offset).sum();
                json!({"name": c.name, "queues": c.queues, "message_type": crate::message_type_name(c.message_type), "messages": messages, "queue_offsets": queues})
            })
            .collect();
        Ok(json!({ "topics": v }))
    }

    async fn save_topic(&self, body: &Value) -> anyhow::Result<Value> {
        let name = str_field(body, "name")?;
        let queues = body["queues"].as_u64().ok_or_else(|| anyhow::anyhow!("queues must be a number"))? as u32;
        let t = match body["message_type"].as_str().unwrap_or("normal") {
            "normal" => 1,
            "fifo" => 2,
            "delay" => 3,
            "transaction" => 4,
            other => anyhow::bail!("unknown message type {other:?}"),
        };
        let update = body["update"].as_bool().unwrap_or(false);
        let m = self.admin().await?.create_topic(name, queues, t, update).await?;
        Ok(json!({ "message": m }))
    }

    async fn delete_topic(&self, name: &str) -> anyhow::Result<Value> {
        let m = self.admin().await?.delete_topic(&percent_decode(name)).await?;
        Ok(json!({ "message": m }))
    }

    async fn groups(&self) -> anyhow::Result<Value> {
        let a = self.admin().await?;
        let groups = a.all_groups().await?;
        let topics = a.list_topics().await?;
        let dlq_count = |g: &str| -> u64 {
            topics
                .iter()
                .find(|t| t.config.as_ref().is_some_and(|c| c.name == format!("%DLQ%{g}")))
                .map(|t| t.queues.iter().map(|q| q.max_offset - q.min_offset).sum())
                .unwrap_or(0)
        };
        let v: Vec<Value> = groups
            .iter()
            .map(|g| json!({"name": g.name, "consume_enabled": g.consume_enabled, "max_attempts": g.max_delivery_attempts, "fifo": g.fifo, "dead_letters": dlq_count(&g.name)}))
            .collect();
        Ok(json!({ "groups": v }))
    }

    /// One group: progress per queue, members, dead letters.
    async fn group(&self, g: &str) -> anyhow::Result<Value> {
        let g = percent_decode(g);
        let a = self.admin().await?;
        let progress = match a.consumer_progress(&g, "").await {
            Ok(p) => p,
            Err(crate::ClientError::Admin { code: tonic::Code::NotFound, .. }) => Default::default(),
            Err(e) => return Err(e.into()),
        };
        let queues: Vec<Value> = progress
            .queues
            .iter()
            .map(|q| json!({"topic": q.topic, "queue": q.queue_id, "consumer_offset": q.consumer_offset, "max_offset": q.max_offset, "lag": q.lag, "inflight": q.inflight, "retrying": q.retrying}))
            .collect();
        let members: Vec<Value> = a
            .consumer_connections(&g)
            .await?
            .iter()
            .map(|m| json!({"client_id": m.client_id, "alive": m.alive, "last_heartbeat_ms_ago": m.last_heartbeat_ms_ago, "assigned": m.assigned}))
            .collect();
        let dlq = a.dead_letters(&g, 0, 50).await.map(|d| d.messages).unwrap_or_default();
        let dlq: Vec<Value> = dlq.iter().map(found_json).collect();
        Ok(
            json!({"name": g, "queues": queues, "total_lag": progress.total_lag, "members": members, "dead_letters": dlq}),
        )
    }

    async fn reset_offset(&self, g: &str, body: &Value) -> anyhow::Result<Value> {
        let topic = str_field(body, "topic")?;
        let ts = body["timestamp_ms"].as_i64().ok_or_else(|| anyhow::anyhow!("timestamp_ms must be a number"))?;
        let q = self.admin().await?.reset_offset_by_time(&percent_decode(g), topic, ts).await?;
        Ok(json!({"queues": q.iter().map(|q| json!({"queue": q.queue_id, "offset": q.offset})).collect::<Vec<_>>()}))
    }

    async fn resend(&self, g: &str, offset: &str) -> anyhow::Result<Value> {
        let offset: u64 = offset.parse().map_err(|_| anyhow::anyhow!("bad offset {offset:?}"))?;
        let m = self.admin().await?.resend_dead_letter(&percent_decode(g), offset).await?;
        Ok(json!({ "message": m }))
    }

    async fn find_messages(&self, q: &BTreeMap<String, String>) -> anyhow::Result<Value> {
        let get = |k: &str| q.get(k).cloned().unwrap_or_default();
        let req = admin_pb::QueryMessageRequest {
            topic: get("topic"),
            message_id: get("id"),
            key: get("key"),
            max: 32,
            group: get("group"),
        };
        if req.message_id.is_empty() && (req.key.is_empty() || req.topic.is_empty()) {
            anyhow::bail!("give a message id, or a topic and a key");
        }
        let found = self.admin().await?.query_messages(req).await?;
        Ok(json!({ "messages": found.iter().map(found_json).collect::<Vec<_>>() }))
    }

    async fn send_message(&self, body: &Value) -> anyhow::Result<Value> {
        let topic = str_field(body, "topic")?;
        let text = body["body"].as_str().unwrap_or_default();
        let mut m = OutMessage::new(text.as_bytes().to_vec());
        if let Some(t) = body["tag"].as_str().filter(|t| !t.is_empty()) {
            m.tag = Some(t.to_string());
        }
        if let Some(k) = body["key"].as_str().filter(|k| !k.is_empty()) {
            m.keys = vec![k.to_string()];
        }
        let p = Producer::new(&self.config.servers, ProducerOptions { max_attempts: 2, ..ProducerOptions::default() })?;
        let r = p.send(topic, m).await?;
        Ok(json!({"message_id": r.message_id, "offset": r.offset}))
    }

    async fn transfer_leader(&self, body: &Value) -> anyhow::Result<Value> {
        let to = body["node_id"].as_u64().ok_or_else(|| anyhow::anyhow!("node_id must be a number"))?;
        let m = self.admin().await?.transfer_leader(to).await?;
        Ok(json!({ "message": m }))
    }

    async fn add_node(&self, body: &Value) -> anyhow::Result<Value> {
        let id = body["node_id"].as_u64().ok_or_else(|| anyhow::anyhow!("node_id must be a number"))?;
        let address = str_field(body, "address")?;
        let m = self.admin().await?.add_node(id, address).await?;
        Ok(json!({ "message": m }))
    }

    async fn remove_node(&self, id: &str) -> anyhow::Result<Value> {
        let id: u64 = id.parse().map_err(|_| anyhow::anyhow!("bad node id {id:?}"))?;
        let m = self.admin().await?.remove_node(id).await?;
        Ok(json!({ "message": m }))
    }
}

fn str_field<'a>(v: &'a Value, k: &str) -> anyhow::Result<&'a str> {
    v[k].as_str().filter(|s| !s.is_empty()).ok_or_else(|| anyhow::anyhow!("{k} is required"))
}

/// A stored message for the page: body as text when it is UTF-8, and always
/// as hex (the page shows either).
fn found_json(m: &admin_pb::FoundMessage) -> Value {
    let text = std::str::from_utf8(&m.body).ok();
    let hex: String = m.body.iter().take(4096).map(|b| format!("{b:02x}")).collect();
    json!({
        "topic": m.topic, "queue": m.queue_id, "offset": m.offset, "message_id": m.message_id,
        "tag": m.tag, "keys": m.keys, "properties": m.properties,
        "body_text": text, "body_hex": hex, "body_bytes": m.body.len(),
        "born_timestamp_ms": m.born_timestamp_ms, "store_timestamp_ms": m.store_timestamp_ms,
        "delivery_attempts": m.attempts, "group_state": m.group_state,
        "origin_queue": m.origin_queue_id, "origin_offset": m.origin_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(read_only: bool, admin_key: Option<&str>) -> Console {
        let config = ConsoleConfig {
            servers: vec!["127.0.0.1:1".into()],
            namesrv: "127.0.0.1:1".into(),
            admin_key: admin_key.map(str::to_string),
            read_only,
            allowed_hosts: vec!["console.internal".into()],
        };
        Console { config, read_only }
    }

    fn request(method: &str, path: &str, key: Option<&str>) -> HttpRequest {
        let mut headers = BTreeMap::new();
        headers.insert("host".to_string(), "127.0.0.1:8088".to_string());
        if let Some(k) = key {
            headers.insert("x-admin-key".to_string(), k.to_string());
        }
        HttpRequest { method: method.into(), path: path.into(), query: BTreeMap::new(), headers, body: Vec::new() }
    }

    #[tokio::test]
    async fn writes_need_the_key_and_a_read_only_console_refuses_them() {
        let ro = console(true, None);
        assert_eq!(ro.route(request("POST", "/api/leader", None)).await.status, "403 Forbidden");
        assert_eq!(ro.route(request("DELETE", "/api/topics/t", None)).await.status, "403 Forbidden");
        let keyed = console(false, Some("k"));
        assert_eq!(keyed.route(request("POST", "/api/leader", None)).await.status, "401 Unauthorized");
        assert_eq!(keyed.route(request("POST", "/api/leader", Some("wrong"))).await.status, "401 Unauthorized");
        // The right key passes the guard; the body check answers next.
        assert_eq!(keyed.route(request("POST", "/api/leader", Some("k"))).await.status, "415 Unsupported Media Type");
        let mut json_req = request("POST", "/api/leader", Some("k"));
        json_req.headers.insert("content-type".into(), "application/json".into());
        let r = keyed.route(json_req).await;
        assert_eq!(r.status, "502 Bad Gateway", "{}", r.body);
        assert!(r.body.contains("node_id"), "{}", r.body);
        // Pages and reads need no key.
        assert_eq!(ro.route(request("GET", "/", None)).await.status, "200 OK");
        assert_eq!(ro.route(request("GET", "/app.js", None)).await.content_type, "text/javascript");
        assert!(ro.route(request("GET", "/api/mode", None)).await.body.contains("\"read_only\":true"));
        assert_eq!(ro.route(request("GET", "/nope", None)).await.status, "404 Not Found");
        assert_eq!(ro.route(request("PUT", "/api/topics", None)).await.status, "405 Method Not Allowed");
    }

    #[tokio::test]
    async fn only_addresses_localhost_and_allowed_names_are_served() {
        let c = console(true, None);
        let with_host = |host: Option<&str>| {
            let mut r = request("GET", "/api/mode", None);
            r.headers.remove("host");
            if let Some(h) = host {
                r.headers.insert("host".into(), h.into());
            }
            r
        };
        for ok in
            ["127.0.0.1:8088", "10.1.2.3", "[::1]:8088", "localhost:8088", "Console.Internal:80", "console.internal."]
        {
            assert_eq!(c.route(with_host(Some(ok))).await.status, "200 OK", "{ok}");
        }
        // A rebound name: the attacker's page, now resolving to this address.
        let r = c.route(with_host(Some("evil.example:8088"))).await;
        assert_eq!(r.status, "421 Misdirected Request");
        assert!(r.body.contains("--allow-host evil.example"), "{}", r.body);
        assert_eq!(c.route(with_host(None)).await.status, "400 Bad Request");
    }

    #[test]
    fn acl_is_read_from_the_acl_table_only() {
        assert!(acl_on_in("node_id = 1\n\n[acl]\nenabled = true\nmax_clock_skew_ms = 1\n"));
        assert!(!acl_on_in("[acl]\nenabled = false\n[follower_read]\nenabled = true\n"));
        assert!(!acl_on_in("[follower_read]\nenabled = true\n"));
    }

    #[test]
    fn query_strings_decode() {
        let q = parse_query("id=a%20b&topic=t+1&empty=&x");
        assert_eq!(q["id"], "a b");
        assert_eq!(q["topic"], "t 1");
        assert_eq!(q["empty"], "");
        assert_eq!(q["x"], "");
        assert_eq!(percent_decode("%41%zz%"), "A%zz%");
    }
}
