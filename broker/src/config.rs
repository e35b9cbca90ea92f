//! Broker node configuration (TOML). Every key documents its default; unknown
//! keys and inconsistent peers are errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use raft_log::LogConfig;
use serde::Deserialize;
use serde::Serialize;

/// One node of a broker group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Cluster name reported to name servers. Default: "DefaultCluster".
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Broker group name (RocketMQ's brokerName). Required.
    pub broker_name: String,
    /// This node's id within the group; a key of `peers`. Required.
    pub node_id: u64,
    /// Address this node listens on for clients, admin and Raft (one gRPC
    /// port), host:port. Default: the address of this node in `peers`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Every node of the group: id -> address (host:port). Required; must
    /// hold `node_id`; 1, 3 or 5 nodes.
    pub peers: BTreeMap<u64, String>,
    /// Name servers, host:port. Default: none (routes then come from the
    /// node itself only).
    #[serde(default)]
    pub namesrv: Vec<String>,
    /// Data directory (CommitLog under `log/`, state under `state/`). Required.
    pub data_dir: PathBuf,
    /// Bootstrap the group (initialize Raft membership from `peers`) when the
    /// data directory is empty. Set on every node of a new group: the call is
    /// idempotent and the first election settles it. Default: true.
    #[serde(default = "default_true")]
    pub bootstrap: bool,
    /// Outgoing connections to peers and name servers bind the IP of
    /// `listen` as their source address, so a fault-injecting proxy can tell
    /// the nodes apart on one loopback interface. Default: false.
    #[serde(default)]
    pub bind_source: bool,
    /// Threads of the async runtime that serves clients, Raft and the state
    /// machine. 0: one per CPU core (tokio's default). Several nodes sharing
    /// a small machine (a local three-node group on two cores) run faster
    /// with 1: fewer threads to wake for each request. Default: 0.
    #[serde(default)]
    pub worker_threads: usize,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub follower_read: FollowerRead,
    #[serde(default)]
    pub transaction: TransactionConfig,
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// Access control. Default: off.
    #[serde(default)]
    pub acl: crate::acl::AclConfig,
    /// Prometheus metrics over HTTP (`GET /metrics`, text format), host:port.
    /// Default: none (no metrics listener).
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

/// Transactional messages (RocketMQ's transactionCheckInterval and
/// transactionCheckMax).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransactionConfig {
    /// An unresolved half message is checked back with a producer of its
    /// topic this long after it was stored, then again every interval.
    /// Default: 30000 ms.
    pub check_interval_ms: u64,
    /// Check-backs before an unresolved half message is rolled back.
    /// Default: 15.
    pub max_checks: u32,
}

impl Default for TransactionConfig {
    fn default() -> Self {
        Self { check_interval_ms: 30_000, max_checks: 15 }
    }
}

/// Consumers: liveness for queue assignment, and invisibility renewal for
/// push consumers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// A push consumer without a heartbeat for this long loses its queues
    /// to the others of its group. Default: 30000 ms.
    pub client_expire_ms: u64,
    /// The broker keeps renewing the invisibility of a message a push
    /// consumer holds, while that consumer is alive, up to this long in
    /// total. Default: 3600000 ms (1 h).
    pub renew_max_ms: u64,
    /// Most messages whose invisibility one node renews at once.
    /// Default: 100000.
    pub max_renewing: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self { client_expire_ms: 30_000, renew_max_ms: 3_600_000, max_renewing: 100_000 }
    }
}

fn default_cluster() -> String {
    "DefaultCluster".into()
}

fn default_true() -> bool {
    true
}

/// Raft timing. A dead leader is replaced in about 0.6-1 s: each follower's
/// election timer fires 250-450 ms after the last heartbeat, but openraft's
/// leader lease (the maximum election timeout) makes the other follower
/// refuse that first (pre-)vote, so the election succeeds on a follower's
/// second try. Pre-vote keeps a follower that merely missed heartbeats from
/// disturbing a healthy leader. (openraft's defaults, 50 ms heartbeat and
/// 150-300 ms election, are tighter than fsync on a busy shared disk allows.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    /// Leader heartbeat interval. Default: 100 ms.
    pub heartbeat_interval_ms: u64,
    /// Election timeout, randomized in [min, max); must exceed twice the
    /// heartbeat interval. Default: 250 ms.
    pub election_timeout_min_ms: u64,
    /// Also the leader lease (openraft). Default: 450 ms.
    pub election_timeout_max_ms: u64,
    /// Most entries in one replication request. Default: 2048.
    pub max_payload_entries: u64,
    /// How often retention runs (segment age `log.file_reserved_time_hours`
    /// and disk ratio `log.disk_max_used_ratio`); it builds a snapshot first
    /// when none covers what it removes. Default: 10000 ms.
    pub retention_check_interval_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 450,
            max_payload_entries: 2048,
            retention_check_interval_ms: 10_000,
        }
    }
}

/// Limits on client input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message body. Default: 4 MiB (RocketMQ's default).
    pub max_body_bytes: u32,
    /// Most messages in one SendMessage. Default: 1024.
    pub max_batch_messages: u32,
    /// Longest long poll of ReceiveMessage. Default: 20000 ms.
    pub max_long_polling_ms: u64,
    /// Most messages one ReceiveMessage returns. Default: 32.
    pub max_receive_batch: u32,
    /// Delivery attempts before a message goes to the group's DLQ. Default: 17.
    pub max_delivery_attempts: u32,
    /// Default invisible duration when a client sends none. Default: 30000 ms.
    pub default_invisible_ms: u64,
    /// Latest delivery time a delay message may ask for, from now.
    /// Default: 86400000 ms (24 h).
    pub max_delay_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_batch_messages: 1024,
            max_long_polling_ms: 20_000,
            max_receive_batch: 32,
            max_delivery_attempts: 17,
            default_invisible_ms: 30_000,
            max_delay_ms: 86_400_000,
        }
    }
}

/// When the leader hands message reads to a follower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FollowerRead {
    /// Enable follower reads. Default: true.
    pub enabled: bool,
    /// The leader is loaded when more reads than this run on it at once.
    /// Default: 16.
    pub max_inflight_reads: u32,
    /// The leader is loaded when a consumer's unread bytes exceed this share
    /// of the machine's memory (RocketMQ's accessMessageInMemoryMaxRatio).
    /// Default: 0.4.
    pub lag_memory_ratio: f64,
    /// How long the leader waits for a follower to apply far enough.
    /// Default: 200 ms.
    pub wait_ms: u32,
}

impl Default for FollowerRead {
    fn default() -> Self {
        Self { enabled: true, max_inflight_reads: 16, lag_memory_ratio: 0.4, wait_ms: 200 }
    }
}

impl BrokerConfig {
    /// Parses TOML and checks consistency.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let c: BrokerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.broker_name.is_empty() {
            return Err("broker_name must not be empty".into());
        }
        if !self.peers.contains_key(&self.node_id) {
            return Err(format!("node_id {} is not one of peers {:?}", self.node_id, self.peers.keys()));
        }
        if ![1, 3, 5].contains(&self.peers.len()) && self.bootstrap {
            return Err(format!("a group has 1, 3 or 5 nodes; peers lists {}", self.peers.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (id, addr) in &self.peers {
            if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
                return Err(format!("peer {id} address {addr:?} is not host:port"));
            }
            if !seen.insert(addr) {
                return Err(format!("peer {id} reuses address {addr}"));
            }
        }
        let r = &self.raft;
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms * 2 {
            return Err("raft.election_timeout_min_ms must exceed twice heartbeat_interval_ms".into());
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err("raft.election_timeout_max_ms must exceed election_timeout_min_ms".into());
        }
        if self.limits.max_body_bytes == 0 || self.limits.max_body_bytes > self.log.max_entry_bytes / 2 {
            return Err(format!(
                "limits.max_body_bytes = {} must be positive and at most half of log.max_entry_bytes = {}",
                self.limits.max_body_bytes, self.log.max_entry_bytes
            ));
        }
        // Zero would refuse every send, return nothing from every receive,
        // or expire every push consumer at once: a typo, not a setting.
        for (key, value) in [
            ("limits.max_batch_messages", u64::from(self.limits.max_batch_messages)),
            ("limits.max_receive_batch", u64::from(self.limits.max_receive_batch)),
            ("limits.default_invisible_ms", self.limits.default_invisible_ms),
            ("consumer.client_expire_ms", self.consumer.client_expire_ms),
            ("consumer.max_renewing", self.consumer.max_renewing as u64),
        ] {
            if value == 0 {
                return Err(format!("{key} must be positive"));
            }
        }
        if !(0.0..=1.0).contains(&self.follower_read.lag_memory_ratio) {
            return Err("follower_read.lag_memory_ratio must be in [0, 1]".into());
        }
        if self.transaction.check_interval_ms < 100 {
            return Err("transaction.check_interval_ms must be at least 100".into());
        }
        if let Some(m) = &self.metrics_listen {
            m.parse::<std::net::SocketAddr>().map_err(|e| format!("metrics_listen {m:?} is not ip:port: {e}"))?;
        }
        crate::acl::Acl::new(&self.acl).map_err(|e| format!("acl: {e}"))?;
        self.log.validate().map_err(|e| format!("log: {e}"))?;
        Ok(())
    }

    /// The settings a running node takes again from its file on SIGHUP
    /// (`systemctl reload`): client limits, follower reads, consumers,
    /// transactions and access control.
    pub fn reloadable(&self) -> Reloadable {
        Reloadable {
            limits: self.limits.clone(),
            follower_read: self.follower_read.clone(),
            consumer: self.consumer.clone(),
            transaction: self.transaction.clone(),
            acl: self.acl.clone(),
        }
    }

    /// The keys that differ in `new` but take effect only on a restart.
    /// Every field is named here, so a new one has to be classified.
    pub fn restart_only_changes(&self, new: &BrokerConfig) -> Vec<&'static str> {
        let BrokerConfig {
            cluster,
            broker_name,
            node_id,
            listen,
            peers,
            namesrv,
            data_dir,
            bootstrap,
            bind_source,
            worker_threads,
            raft,
            log,
            metrics_listen,
            limits: _,
            follower_read: _,
            transaction: _,
            consumer: _,
            acl: _,
        } = self;
        let mut changed = Vec::new();
        let mut check = |name: &'static str, same: bool| {
            if !same {
                changed.push(name);
            }
        };
        check("cluster", *cluster == new.cluster);
        check("broker_name", *broker_name == new.broker_name);
        check("node_id", *node_id == new.node_id);
        check("listen", *listen == new.listen);
        check("peers", *peers == new.peers);
        check("namesrv", *namesrv == new.namesrv);
        check("data_dir", *data_dir == new.data_dir);
        check("bootstrap", *bootstrap == new.bootstrap);
        check("bind_source", *bind_source == new.bind_source);
        check("worker_threads", *worker_threads == new.worker_threads);
        check("raft", *raft == new.raft);
        check("log", *log == new.log);
        check("metrics_listen", *metrics_listen == new.metrics_listen);
        changed
    }

    /// The configuration as TOML, secret keys replaced by "<redacted>".
    pub fn to_toml_redacted(&self) -> String {
        fn strip_nulls(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    m.retain(|_, x| !x.is_null());
                    m.values_mut().for_each(strip_nulls);
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(strip_nulls),
                _ => {}
            }
        }
        // Through JSON: it writes the integer keys of [peers] as strings.
        let mut v = serde_json::to_value(self).expect("a config serializes");
        strip_nulls(&mut v);
        if let Some(accounts) = v.pointer_mut("/acl/accounts").and_then(|a| a.as_array_mut()) {
            for a in accounts {
                a["secret_key"] = serde_json::Value::String("<redacted>".into());
            }
        }
        toml::to_string(&v).expect("a config writes as TOML")
    }

    /// Sets one run-time setting, `section.key` of [limits], [follower_read],
    /// [consumer] or [transaction], to a TOML value; the result is
    /// validated. Other keys (and [acl]) change in the file, with a reload.
    pub fn with_setting(&self, key: &str, value: &str) -> Result<BrokerConfig, String> {
        fn set<T: Serialize + serde::de::DeserializeOwned>(
            section: &T,
            field: &str,
            value: toml::Value,
        ) -> Result<T, String> {
            let mut table = toml::Table::try_from(section).map_err(|e| e.to_string())?;
            if !table.contains_key(field) {
                return Err(format!("no key {field} here"));
            }
            table.insert(field.to_string(), value);
            table.try_into().map_err(|e: toml::de::Error| e.to_string())
        }
        let parsed: toml::Table =
            toml::from_str(&format!("v = {value}")).map_err(|e| format!("value {value:?}: {e}"))?;
        let value = parsed.get("v").cloned().ok_or("no value")?;
        let (section, field) = key.split_once('.').ok_or_else(|| format!("key {key:?}: expected section.key"))?;
        let mut c = self.clone();
        match section {
            "limits" => c.limits = set(&c.limits, field, value)?,
            "follower_read" => c.follower_read = set(&c.follower_read, field, value)?,
            "consumer" => c.consumer = set(&c.consumer, field, value)?,
            "transaction" => c.transaction = set(&c.transaction, field, value)?,
            other => {
                return Err(format!(
                    "[{other}] cannot change at run time here: edit the config file (then reload, or restart for keys a reload does not take)"
                ));
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The address this node listens on.
    pub fn listen_addr(&self) -> String {
        self.listen.clone().unwrap_or_else(|| self.peers[&self.node_id].clone())
    }

    /// The address other nodes and clients reach this node at.
    pub fn advertised_addr(&self) -> String {
        self.peers[&self.node_id].clone()
    }
}

/// What SIGHUP reloads; see [`BrokerConfig::reloadable`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reloadable {
    pub limits: Limits,
    pub follower_read: FollowerRead,
    pub consumer: ConsumerConfig,
    pub transaction: TransactionConfig,
    pub acl: crate::acl::AclConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
broker_name = "broker-a"
node_id = 1
data_dir = "/tmp/x"
[peers]
1 = "127.0.0.1:8081"
2 = "127.0.0.1:8082"
3 = "127.0.0.1:8083"
"#;

    #[test]
    fn parses_with_documented_defaults() {
        let c = BrokerConfig::from_toml(OK).unwrap();
        assert_eq!(c.cluster, "DefaultCluster");
        assert_eq!(c.limits.max_body_bytes, 4 << 20);
        assert_eq!(c.limits.max_delivery_attempts, 17);
        assert_eq!(c.raft.heartbeat_interval_ms, 100);
        assert_eq!(c.listen_addr(), "127.0.0.1:8081");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = BrokerConfig::from_toml(&format!("{OK}\nbogus = 1\n")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = BrokerConfig::from_toml(&format!("{OK}\n[raft]\nheartbeat_ms = 5\n")).unwrap_err();
        assert!(e.contains("heartbeat_ms"), "{e}");
    }

    #[test]
    fn inconsistent_peers_are_errors() {
        let e = BrokerConfig::from_toml(&OK.replace("node_id = 1", "node_id = 7")).unwrap_err();
        assert!(e.contains("node_id 7"), "{e}");
        let e = BrokerConfig::from_toml(&OK.replace("127.0.0.1:8083", "127.0.0.1:8082")).unwrap_err();
        assert!(e.contains("reuses"), "{e}");
        let two = OK.replace("3 = \"127.0.0.1:8083\"\n", "");
        assert!(BrokerConfig::from_toml(&two).unwrap_err().contains("1, 3 or 5"));
    }

    #[test]
    fn zero_counts_and_durations_are_errors() {
        for (table, key) in [
            ("limits", "max_batch_messages"),
            ("limits", "max_receive_batch"),
            ("limits", "default_invisible_ms"),
            ("consumer", "client_expire_ms"),
            ("consumer", "max_renewing"),
        ] {
            let e = BrokerConfig::from_toml(&format!("{OK}\n[{table}]\n{key} = 0\n")).unwrap_err();
            assert!(e.contains(&format!("{table}.{key} must be positive")), "{e}");
            let ok = BrokerConfig::from_toml(OK).unwrap();
            assert!(ok.with_setting(&format!("{table}.{key}"), "0").is_err(), "config update refuses it too");
        }
    }

    #[test]
    fn reload_names_the_keys_that_need_a_restart() {
        let old = BrokerConfig::from_toml(OK).unwrap();
        let text = OK.replace("node_id = 1", "node_id = 2")
            + "\n[limits]\nmax_body_bytes = 1024\n[raft]\nheartbeat_interval_ms = 50\n";
        let new = BrokerConfig::from_toml(&text).unwrap();
        assert_eq!(old.restart_only_changes(&new), vec!["node_id", "raft"]);
        assert_ne!(old.reloadable(), new.reloadable());
        assert_eq!(new.reloadable().limits.max_body_bytes, 1024);
        assert!(old.restart_only_changes(&old).is_empty());
    }

    #[test]
    fn the_deploy_example_is_valid_for_each_node() {
        let text = include_str!("../../deploy/config/broker.toml");
        for id in 1..=3 {
            let c = BrokerConfig::from_toml(&text.replace("node_id = 1", &format!("node_id = {id}"))).unwrap();
            assert_eq!(c.node_id, id);
            // The example's commented-out values are the defaults.
            assert_eq!(c.raft, RaftTuning::default());
            assert_eq!(c.limits, Limits::default());
            assert_eq!(c.log, LogConfig::default());
            assert!(c.data_dir.starts_with("/var/lib/raftmq"), "the unit allows writes there only");
        }
        // Every commented-out key line names a real key: uncommented, the
        // file still parses.
        let is_key_line = |k: &str| {
            k.split_once(" = ").is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        };
        let uncommented: String = text
            .lines()
            .take_while(|l| !l.starts_with("# [[acl.accounts]]"))
            .map(|l| match l.strip_prefix("# ") {
                Some(k) if is_key_line(k) => k,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(uncommented.contains("\nflush_mode = \"sync\"\n"), "{uncommented}");
        BrokerConfig::from_toml(&uncommented).expect("the example's commented keys parse");
    }

    #[test]
    fn one_setting_changes_at_run_time_and_others_are_refused() {
        let c = BrokerConfig::from_toml(OK).unwrap();
        let n = c.with_setting("limits.max_body_bytes", "1024").unwrap();
        assert_eq!(n.limits.max_body_bytes, 1024);
        assert_eq!(c.restart_only_changes(&n), Vec::<&str>::new());
        assert!(c.with_setting("limits.bogus", "1").unwrap_err().contains("bogus"));
        assert!(c.with_setting("limits.max_body_bytes", "\"big\"").is_err());
        assert!(c.with_setting("limits.max_body_bytes", "0").unwrap_err().contains("max_body_bytes"));
        assert!(c.with_setting("raft.heartbeat_interval_ms", "50").unwrap_err().contains("config file"));
        assert!(c.with_setting("follower_read.enabled", "false").is_ok());
    }

    #[test]
    fn the_effective_config_prints_as_toml_that_parses_back_without_secrets() {
        let text = format!(
            "{OK}\n[acl]\nenabled = true\n[[acl.accounts]]\naccess_key = \"a\"\nsecret_key = \"s3cret\"\nadmin = true\n"
        );
        let c = BrokerConfig::from_toml(&text).unwrap();
        let out = c.to_toml_redacted();
        assert!(!out.contains("s3cret") && out.contains("<redacted>"), "{out}");
        let back = BrokerConfig::from_toml(&out).unwrap();
        assert_eq!(back.peers, c.peers);
        assert_eq!(back.limits, c.limits);
    }
}
