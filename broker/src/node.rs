//! One broker node: the CommitLog, the state machine, the openraft node, and
//! the way commands reach the leader.

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use openraft::BasicNode;
use openraft::ServerState;
use openraft::error::ClientWriteError;
use openraft::error::RaftError;
use raft_log::CommitLog;
use raft_log::LogBytes;
use raft_log::RaftLogStore;
use raftmq_proto::admin::ProposeRequest;
use raftmq_proto::admin::admin_service_client::AdminServiceClient;
use raftmq_proto::rocketmq::messaging_service_client::MessagingServiceClient;
use tonic::transport::Channel;

use crate::command::Response;
use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::error::Result;
use crate::network::Network;
use crate::network::channel;
use crate::routes::Routes;
use crate::sm::SmShared;
use crate::sm::StateMachineStore;
use crate::types::Raft;
use crate::types::TypeConfig;

/// Counters reported in cluster status.
#[derive(Default)]
pub struct Stats {
    /// Message reads served to consumers by this node.
    pub reads_served: AtomicU64,
    /// Of those, reads a loaded leader handed to this node.
    pub follower_reads_served: AtomicU64,
    /// Reads running now.
    pub inflight_reads: AtomicU64,
    pub messages_sent: AtomicU64,
    /// Per topic: messages and bytes produced through this node and consumed
    /// from it (counted once a request named an existing topic).
    pub topics: Mutex<BTreeMap<String, TopicCounters>>,
    /// Elections seen: how far the term advanced since start.
    pub elections: AtomicU64,
    /// Times the known leader changed since start.
    pub leader_changes: AtomicU64,
}

/// See [`Stats::topics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicCounters {
    pub produced_messages: u64,
    pub produced_bytes: u64,
    pub consumed_messages: u64,
    pub consumed_bytes: u64,
}

impl Stats {
    /// Adds to a topic's counters.
    pub fn count_topic(&self, topic: &str, f: impl FnOnce(&mut TopicCounters)) {
        let mut t = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        match t.get_mut(topic) {
            Some(c) => f(c),
            None => f(t.entry(topic.to_string()).or_default()),
        }
    }
}

/// The run-time part of the configuration (see [`BrokerConfig::reloadable`]),
/// replaced whole on reload: readers take one consistent `Arc` of it.
pub struct Settings {
    /// What these settings were made from.
    pub source: crate::config::Reloadable,
    pub limits: crate::config::Limits,
    pub follower_read: crate::config::FollowerRead,
    pub consumer: crate::config::ConsumerConfig,
    pub transaction: crate::config::TransactionConfig,
    pub acl: crate::acl::Acl,
}

impl Settings {
    pub fn new(r: crate::config::Reloadable) -> std::result::Result<Settings, String> {
        Ok(Settings {
            acl: crate::acl::Acl::new(&r.acl).map_err(|e| format!("acl: {e}"))?,
            limits: r.limits.clone(),
            follower_read: r.follower_read.clone(),
            consumer: r.consumer.clone(),
            transaction: r.transaction.clone(),
            source: r,
        })
    }
}

pub struct BrokerNode {
    /// The configuration the node started with. Keys that SIGHUP reloads are
    /// read from [`BrokerNode::settings`] instead.
    pub config: BrokerConfig,
    settings: std::sync::RwLock<Arc<Settings>>,
    pub raft: Arc<Raft>,
    pub sm: Arc<SmShared>,
    pub log: Arc<CommitLog>,
    pub stats: Stats,
    /// Routes to the other groups of the cluster.
    pub routes: Routes,
    /// Concurrent sends batched into shared Raft entries.
    pub sends: crate::batcher::SendBatcher,
    /// One lazily connected channel per peer address, shared by the admin
    /// and client-API clients made on it.
    peers: Mutex<HashMap<String, Channel>>,
    round_robin: AtomicU64,
    group_round_robin: AtomicU64,
    started: Instant,
}

/// How often the leader looks for due delayed messages and half messages
/// due for a check-back: a delayed message becomes visible within about
/// this (plus one commit) of its time.
const TIMER_TICK: Duration = Duration::from_millis(20);

/// How long a stopping leader waits for the node it hands leadership to.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// How long a proposal keeps retrying while there is no leader.
const PROPOSE_PATIENCE: Duration = Duration::from_secs(8);

impl BrokerNode {
    /// A state machine that applied entries its log no longer holds (a disk
    /// that lost fsynced writes: recovery cut the log's tail) points into
    /// bytes that are gone, and new entries would be written over the
    /// positions it records. openraft would take the state for a snapshot
    /// and purge the whole log, so this node would serve its queues with
    /// every earlier message missing. When the log still starts at entry 1,
    /// the state is dropped and rebuilt by applying the log again (the
    /// leader sends the lost tail); otherwise the node refuses to start and
    /// says how to rejoin empty. Returns the state to run with.
    fn state_ahead_of_log(
        log: &Arc<CommitLog>,
        sm: StateMachineStore,
        state_dir: &std::path::Path,
    ) -> anyhow::Result<StateMachineStore> {
        let applied = sm.shared.applied_index();
        let purged = log.purged().map(|p| p.index).max(log.raft_purged().map(|p| p.index));
        let log_end = log.last_entry().map(|e| e.index).max(purged).unwrap_or(0);
        if applied <= log_end {
            return Ok(sm);
        }
        if purged.is_some() || log.first_index() > 1 {
            anyhow::bail!(
                "the state applied entry {applied} but the CommitLog ends at {log_end} (its tail was lost) and no longer \
                 starts at entry 1, so the state cannot be rebuilt from it: move {} aside and start this node empty to \
                 copy the group's data from the leader",
                state_dir.parent().unwrap_or(state_dir).display()
            );
        }
        tracing::error!(
            applied,
            log_end,
            "the state applied entries the CommitLog lost (its tail was cut at recovery): rebuilding the state from the log"
        );
        drop(sm);
        let moved = state_dir.with_extension(format!("ahead-of-log-{applied}"));
        let _ = std::fs::remove_dir_all(&moved);
        std::fs::rename(state_dir, &moved).map_err(|e| anyhow::anyhow!("moving {} aside: {e}", state_dir.display()))?;
        let fresh =
            StateMachineStore::open(state_dir, log.clone()).map_err(|e| anyhow::anyhow!("opening a new state: {e}"))?;
        std::fs::remove_dir_all(&moved).map_err(|e| anyhow::anyhow!("removing {}: {e}", moved.display()))?;
        Ok(fresh)
    }

    /// Opens the data directory (running log recovery), starts Raft, and
    /// bootstraps the group on first start.
    pub async fn start(config: BrokerConfig) -> anyhow::Result<Arc<Self>> {
        config.validate().map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
        let log_dir = config.data_dir.join("log");
        crate::faults::start_clock_hook();
        if config.bind_source {
            let ip = config
                .listen_addr()
                .parse::<std::net::SocketAddr>()
                .map_err(|e| anyhow::anyhow!("bind_source needs an IP listen address: {e}"))?
                .ip();
            crate::network::set_source_ip(ip);
        }
        let (log, report) = CommitLog::open(&log_dir, config.log.clone(), crate::faults::log_file_system())
            .map_err(|e| anyhow::anyhow!("opening the CommitLog in {}: {e}", log_dir.display()))?;
        tracing::info!(?report, last = ?log.last_entry(), "CommitLog recovered");
        let log = Arc::new(log);
        let store: RaftLogStore<TypeConfig> = RaftLogStore::new(log.clone())?;
        let state_dir = config.data_dir.join("state");
        let sm =
            StateMachineStore::open(&state_dir, log.clone()).map_err(|e| anyhow::anyhow!("opening the state: {e}"))?;
        let sm = Self::state_ahead_of_log(&log, sm, &state_dir)?;
        let shared = sm.shared.clone();

        let r = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: format!("{}/{}", config.cluster, config.broker_name),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            max_payload_entries: r.max_payload_entries,
            // The log is the data: openraft never snapshots or purges it;
            // retention purges whole segments (raft-log).
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: u64::MAX,
            enable_heartbeat: true,
            enable_elect: true,
            // A node cut off from the group asks first whether it could win
            // before it raises its term: rejoining, it does not depose a
            // working leader.
            enable_pre_vote: Some(true),
            // A leader that restarts must win an election again. Restoring
            // leadership in the old term would serve ReadIndex reads from the
            // commit index it knew before the crash (the stored one is a
            // lagging hint): stale reads, as the fault-injection suite showed
            // (README, "Faults found and fixed"); openraft documents the
            // hazard for state machines that do not flush on apply.
            enable_leader_restore: Some(false),
            // A follower whose disk lost fsynced entries (a truncated or
            // damaged tail cut at recovery) reports a shorter log than it
            // acknowledged. Raft tolerates that on a minority: the leader
            // resends. openraft's default panics the leader instead, which
            // the fault-injection suite hit (README, "Faults found and
            // fixed").
            allow_log_reversion: Some(true),
            ..Default::default()
        }
        .validate()?;
        let network = Network { group: config.broker_name.clone(), log: log.clone() };
        let raft = Arc::new(openraft::Raft::new(config.node_id, Arc::new(raft_config), network, store, sm).await?);

        if config.bootstrap && !raft.is_initialized().await? {
            let members: BTreeMap<u64, BasicNode> =
                config.peers.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!("initialized the group"),
                Err(e) => tracing::info!(error = %e, "group already initialized"),
            }
        }

        let node = Arc::new(BrokerNode {
            raft,
            sm: shared,
            log,
            stats: Stats::default(),
            routes: Routes::new(&config.broker_name, &config.namesrv),
            sends: crate::batcher::SendBatcher::default(),
            peers: Mutex::new(HashMap::new()),
            settings: std::sync::RwLock::new(Arc::new(
                Settings::new(config.reloadable()).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?,
            )),
            config,
            round_robin: AtomicU64::new(0),
            group_round_robin: AtomicU64::new(0),
            started: Instant::now(),
        });
        // A Raft core that stopped on its own (a storage error, a panic)
        // leaves a process that answers but cannot replicate: exit instead,
        // so the service manager restarts the node and recovery runs.
        let mut metrics = node.raft.metrics();
        tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                let running = metrics.borrow_watched().running_state.clone();
                match running {
                    Ok(()) | Err(openraft::error::Fatal::Stopped) => {}
                    Err(fatal) => {
                        tracing::error!(error = %fatal, "the Raft core stopped: exiting so the node restarts and recovers");
                        std::process::exit(70);
                    }
                }
            }
        });
        let weak = Arc::downgrade(&node);
        let retention_every = Duration::from_millis(node.config.raft.retention_check_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(retention_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(n) = weak.upgrade() else { return };
                match n.run_retention().await {
                    Ok(Some(upto)) => tracing::info!(upto, "retention removed log segments"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "retention did not run"),
                }
            }
        });
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TIMER_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_check = Instant::now() - Duration::from_secs(60);
            loop {
                tick.tick().await;
                let Some(n) = weak.upgrade() else { return };
                if n.is_leader() {
                    n.run_timers(&mut last_check).await;
                }
            }
        });
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(n) = weak.upgrade() else { return };
                let sm = n.sm.clone();
                drop(n);
                if let Err(e) = tokio::task::spawn_blocking(move || sm.checkpoint()).await.expect("join") {
                    // The changes it took are not on disk; a later checkpoint
                    // would store a newer applied id without them. Exit: the
                    // restart resumes at the last good checkpoint and
                    // re-applies the log from there.
                    tracing::error!(error = %e, "state checkpoint failed: exiting so the node restarts and recovers");
                    std::process::exit(70);
                }
            }
        });
        Ok(node)
    }

    /// The leader's timers: releases due delayed messages and counts the
    /// check-backs of orphaned half messages (at most one such entry per
    /// second). Both carry the leader's clock, so every node applies the
    /// same result.
    async fn run_timers(&self, last_check: &mut Instant) {
        let now = crate::messaging::now_ms();
        let settings = self.settings();
        let tx = &settings.transaction;
        if self.sm.next_delay_due_ms().is_some_and(|d| d <= now) {
            let cmd = crate::command::Control::Deliver { now_ms: now };
            if let Err(e) = self.propose_local(crate::command::encode_control(&cmd)).await {
                tracing::debug!(error = %e, "releasing delayed messages");
            }
        }
        if last_check.elapsed() >= Duration::from_secs(1) {
            *last_check = Instant::now();
            if self.sm.check_due(now, tx.check_interval_ms) {
                let cmd = crate::command::Control::CheckTransactions {
                    now_ms: now,
                    interval_ms: tx.check_interval_ms,
                    max_checks: tx.max_checks,
                };
                if let Err(e) = self.propose_local(crate::command::encode_control(&cmd)).await {
                    tracing::debug!(error = %e, "checking half messages");
                }
            }
        }
    }

    pub fn id(&self) -> u64 {
        self.config.node_id
    }

    /// This node's Raft role, indexes, follower lag and disk use (admin
    /// API, CLI and metrics).
    pub fn status(&self) -> raftmq_proto::admin::NodeStatus {
        use raftmq_proto::admin as pb;
        let n = self;
        let (produced, consumed) = {
            let topics = n.stats.topics.lock().unwrap_or_else(|e| e.into_inner());
            topics.values().fold((0, 0), |(p, c), t| (p + t.produced_messages, c + t.consumed_messages))
        };
        let m = n.raft.metrics().borrow_watched().clone();
        let commit = m.local_committed.map(|l| l.index).unwrap_or(0);
        let followers = m
            .replication
            .as_ref()
            .map(|r| {
                let last = m.last_log_index.unwrap_or(0);
                r.iter()
                    .filter(|(id, _)| **id != n.id())
                    .map(|(id, l)| {
                        let matched = l.map(|l| l.index).unwrap_or(0);
                        pb::FollowerLag { node_id: *id, matched_index: matched, lag: last.saturating_sub(matched) }
                    })
                    .collect()
            })
            .unwrap_or_default();
        pb::NodeStatus {
            node_id: n.id(),
            broker_name: n.config.broker_name.clone(),
            address: n.config.advertised_addr(),
            role: role_name(m.state).into(),
            term: m.current_term,
            commit_index: commit,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            leader_id: m.current_leader,
            reads_served: n.stats.reads_served.load(Ordering::Relaxed),
            follower_reads_served: n.stats.follower_reads_served.load(Ordering::Relaxed),
            followers,
            disk_bytes: n.log.disk_bytes(),
            error: String::new(),
            log_first_index: n.log.first_index(),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            messages_produced: produced,
            messages_consumed: consumed,
        }
    }

    /// The current run-time settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The configuration in effect: the one the node started with, with the
    /// settings reloaded since.
    pub fn effective_config(&self) -> BrokerConfig {
        self.config_with(&self.settings())
    }

    /// The start configuration with the run-time settings of `s`.
    fn config_with(&self, s: &Settings) -> BrokerConfig {
        let r = s.source.clone();
        BrokerConfig {
            limits: r.limits,
            follower_read: r.follower_read,
            consumer: r.consumer,
            transaction: r.transaction,
            acl: r.acl,
            ..self.config.clone()
        }
    }

    /// Takes the reloadable settings of `new` (SIGHUP). Returns the keys
    /// that differ from the running configuration but need a restart; an
    /// invalid `new` changes nothing.
    pub fn reload(&self, new: &BrokerConfig) -> std::result::Result<Vec<&'static str>, String> {
        new.validate()?;
        Self::install_settings(&mut self.settings.write().unwrap_or_else(|e| e.into_inner()), new)?;
        Ok(self.config.restart_only_changes(new))
    }

    /// Changes one run-time setting (`section.key`, admin `config update`)
    /// in memory. The read of the current settings and the write of the new
    /// ones happen under one lock, so concurrent updates (and a SIGHUP
    /// reload) never undo one another.
    pub fn update_setting(&self, key: &str, value: &str) -> std::result::Result<(), String> {
        let mut current = self.settings.write().unwrap_or_else(|e| e.into_inner());
        // Validated by with_setting.
        let new = self.config_with(&current).with_setting(key, value)?;
        debug_assert!(self.config.restart_only_changes(&new).is_empty(), "with_setting changes run-time keys only");
        Self::install_settings(&mut current, &new)
    }

    /// Makes the run-time settings of `new` (a validated config) current,
    /// under the settings lock its caller holds; on an error nothing changes.
    fn install_settings(current: &mut Arc<Settings>, new: &BrokerConfig) -> std::result::Result<(), String> {
        *current = Arc::new(Settings::new(new.reloadable())?);
        Ok(())
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn leader_id(&self) -> Option<u64> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// The address of node `id` in the group's membership.
    pub fn node_addr(&self, id: u64) -> Option<String> {
        self.raft.metrics().borrow_watched().membership_config.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// The current leader's address, if this node knows one.
    pub fn leader_addr(&self) -> Option<String> {
        self.leader_id().and_then(|l| self.node_addr(l))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Round robin over this group's queues.
    pub fn next_round_robin(&self) -> u64 {
        self.round_robin.fetch_add(1, Ordering::Relaxed)
    }

    /// Round robin over every group's queues of a topic (a separate counter,
    /// so the choice of queue inside the group does not skew it).
    pub fn next_group_round_robin(&self) -> u64 {
        self.group_round_robin.fetch_add(1, Ordering::Relaxed)
    }

    /// The channel to a peer address (cached).
    fn peer_channel(&self, addr: &str) -> Result<Channel> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let ch = channel(addr, Duration::from_millis(500))
            .map_err(|e| BrokerError::Unreachable(addr.to_string(), e.to_string()))?;
        peers.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// An admin client for a peer address.
    pub fn admin_client(&self, addr: &str) -> Result<AdminServiceClient<Channel>> {
        Ok(AdminServiceClient::new(self.peer_channel(addr)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// A client-API client for a node of another group.
    pub fn messaging_client(&self, addr: &str) -> Result<MessagingServiceClient<Channel>> {
        Ok(MessagingServiceClient::new(self.peer_channel(addr)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// Proposes a command on this node, which must be the leader (no forwarding).
    pub async fn propose_local(&self, cmd: Vec<u8>) -> Result<(Response, u64)> {
        self.write_result(self.raft.client_write(LogBytes(cmd.into())).await)
    }

    /// Proposes a command forwarded by another node, which saw this node lead
    /// in `term`: appended only while this node still leads in that term
    /// (openraft checks it before the append), else refused as "not leader".
    /// A forward that arrives late, after the forwarder gave up on it and
    /// forwarded the command again elsewhere, is thus never applied twice.
    pub async fn propose_forwarded(&self, cmd: Vec<u8>, term: u64) -> Result<(Response, u64)> {
        if term == 0 {
            return Err(BrokerError::BadRequest("a forwarded proposal names no leader term".into()));
        }
        let expected = raft_log::store::AdvLeaderId { term, node_id: self.id() };
        let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
        self.raft
            .write(LogBytes(cmd.into()))
            .with_leader(expected)
            .responder(responder)
            .await
            .map_err(|e| BrokerError::Raft(e.to_string()))?;
        let r = rx.await.map_err(|_| BrokerError::Raft("Raft stopped before answering a proposal".into()))?;
        self.write_result(r.map_err(RaftError::APIError))
    }

    fn write_result(
        &self,
        r: std::result::Result<
            openraft::raft::ClientWriteResponse<TypeConfig>,
            RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
        >,
    ) -> Result<(Response, u64)> {
        match r {
            Ok(r) => Ok((r.data, r.log_id.index)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(BrokerError::NoLeader(format!("{} (leader is {:?})", self.config.broker_name, f.leader_id)))
            }
            Err(e) => Err(BrokerError::Raft(e.to_string())),
        }
    }

    /// Proposes a command to the group: locally if this node leads, else
    /// forwarded to the leader; retried while an election runs. Returns the
    /// command's response and its log index.
    pub async fn propose(&self, cmd: Vec<u8>) -> Result<(Response, u64)> {
        let deadline = Instant::now() + PROPOSE_PATIENCE;
        let mut last_err = BrokerError::NoLeader(self.config.broker_name.clone());
        while Instant::now() < deadline {
            // The leader and its term from one metrics snapshot: the term
            // fences the forward (see `propose_forwarded`).
            let (leader, term) = {
                let rx = self.raft.metrics();
                let m = rx.borrow_watched();
                (m.current_leader, m.current_term)
            };
            if leader == Some(self.id()) {
                match self.propose_local(cmd.clone()).await {
                    Err(BrokerError::NoLeader(m)) => last_err = BrokerError::NoLeader(m),
                    other => return other,
                }
            } else if let Some(l) = leader {
                if let Some(addr) = self.node_addr(l) {
                    let mut client = self.admin_client(&addr)?;
                    let mut req =
                        tonic::Request::new(ProposeRequest { command: cmd.clone().into(), leader_term: term });
                    req.set_timeout(Duration::from_secs(5));
                    // A leader that stops answering (paused, cut off) is
                    // replaced by an election long before the call times out:
                    // stop waiting as soon as this node learns of a new leader
                    // and forward there. (If the old leader had already
                    // replicated the command it may be stored twice: a
                    // producer retry, which RocketMQ allows.)
                    let mut metrics = self.raft.metrics();
                    let leader_changed = async move {
                        loop {
                            if metrics.borrow_watched().current_leader != Some(l) {
                                return;
                            }
                            if metrics.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                    };
                    let outcome = tokio::select! {
                        r = client.propose(req) => Some(r),
                        () = leader_changed => None,
                    };
                    let Some(outcome) = outcome else {
                        tracing::debug!(old = l, "leader changed while forwarding; forwarding again");
                        last_err = BrokerError::NoLeader(format!("{} (leader changed)", self.config.broker_name));
                        continue;
                    };
                    match outcome {
                        Ok(r) => {
                            let r = r.into_inner();
                            let resp: Response = rmp_serde::from_slice(&r.response)
                                .map_err(|e| BrokerError::Raft(format!("bad forwarded response: {e}")))?;
                            return Ok((resp, r.log_index));
                        }
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            last_err = BrokerError::Unreachable(addr, s.message().to_string())
                        }
                        Err(s) => return Err(BrokerError::Raft(format!("leader {l}: {}", s.message()))),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last_err)
    }

    /// One retention pass: finds the closed segments to drop (by age and disk
    /// ratio, never past what is applied), makes sure a snapshot covers them
    /// (openraft purges only what a snapshot covers, and a follower that
    /// needs them later gets that snapshot), has openraft purge them, then
    /// removes the files. Returns the last entry removed.
    pub async fn run_retention(&self) -> Result<Option<u64>> {
        // Delayed and half messages stay where they were written: the log
        // is kept from the oldest of them.
        let needed_from = (self.sm.applied_index() + 1).min(self.sm.held_min_index().unwrap_or(u64::MAX));
        let log = self.log.clone();
        let point = tokio::task::spawn_blocking(move || log.retention_point(std::time::SystemTime::now(), needed_from))
            .await
            .map_err(|e| BrokerError::Raft(e.to_string()))??;
        let Some(p) = point else { return Ok(None) };
        let snapshot_covers = |m: &openraft::RaftMetrics<TypeConfig>| m.snapshot.is_some_and(|s| s.index >= p.index);
        if !snapshot_covers(&self.raft.metrics().borrow_watched()) {
            self.raft.trigger().snapshot().await.map_err(|e| BrokerError::Raft(e.to_string()))?;
            self.raft
                .wait(Some(Duration::from_secs(120)))
                .metrics(snapshot_covers, "a snapshot covering the retention point")
                .await
                .map_err(|e| BrokerError::Timeout(e.to_string()))?;
        }
        self.raft.trigger().purge_log(p.index).await.map_err(|e| BrokerError::Raft(e.to_string()))?;
        self.raft
            .wait(Some(Duration::from_secs(60)))
            .metrics(|m| m.purged.is_some_and(|x| x.index >= p.index), "openraft purged to the retention point")
            .await
            .map_err(|e| BrokerError::Timeout(e.to_string()))?;
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.purge(p)).await.map_err(|e| BrokerError::Raft(e.to_string()))??;
        Ok(Some(p.index))
    }

    /// This node's read index as leader (ReadIndex: leadership confirmed by
    /// a quorum, everything committed before the read applied here).
    pub async fn leader_read_index(&self) -> Result<u64> {
        match self.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex).await {
            Ok(r) => Ok(r.log_id().index),
            Err(e) => Err(BrokerError::NoLeader(format!("{}: {e}", self.config.broker_name))),
        }
    }

    /// Makes a local read linearizable: everything committed before it
    /// started is applied here first. On the leader, its read index; on a
    /// follower, the leader's read index, then waits to apply up to it.
    /// Retried while an election runs (up to [`PROPOSE_PATIENCE`]).
    pub async fn linearizable_barrier(&self) -> Result<()> {
        let deadline = Instant::now() + PROPOSE_PATIENCE;
        loop {
            match self.linearizable_barrier_once().await {
                Err(BrokerError::NoLeader(_) | BrokerError::Unreachable(..)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    async fn linearizable_barrier_once(&self) -> Result<()> {
        if self.is_leader() {
            self.leader_read_index().await?;
            return Ok(());
        }
        let m = self.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader.ok_or_else(|| BrokerError::NoLeader(self.config.broker_name.clone()))?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .ok_or_else(|| BrokerError::NoLeader(self.config.broker_name.clone()))?;
        let mut c = self.admin_client(&addr)?;
        let mut req = tonic::Request::new(raftmq_proto::admin::Empty {});
        req.set_timeout(Duration::from_secs(3));
        let index = c
            .read_index(req)
            .await
            .map_err(|s| BrokerError::Unreachable(addr.clone(), s.message().to_string()))?
            .into_inner()
            .index;
        self.sm.wait_applied(index, Duration::from_secs(3)).await
    }

    /// Shuts Raft down after a final state checkpoint. A leader first hands
    /// leadership to its most caught-up follower and waits (up to
    /// [`HANDOVER_WAIT`]) until that node leads, so clients see no election
    /// timeout, only a redirect.
    pub async fn shutdown(&self) {
        if self.is_leader() {
            let target = {
                let rx = self.raft.metrics();
                let m = rx.borrow_watched();
                let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
                m.replication.as_ref().and_then(|r| {
                    r.iter()
                        // A learner cannot win the election a transfer starts.
                        .filter(|(id, _)| **id != self.id() && voters.contains(id))
                        .max_by_key(|(_, matched)| matched.map(|l| l.index))
                        .map(|(id, _)| *id)
                })
            };
            if let Some(to) = target {
                tracing::info!(to, "handing leadership over");
                match self.raft.trigger().transfer_leader(to).await {
                    Ok(()) => {
                        let moved = self
                            .raft
                            .wait(Some(HANDOVER_WAIT))
                            .metrics(|m| m.current_leader.is_some_and(|l| l != m.id), "another node leads")
                            .await;
                        match moved {
                            Ok(m) => tracing::info!(leader = ?m.current_leader, "leadership handed over"),
                            Err(e) => tracing::warn!(error = %e, "leadership not handed over in time; stopping anyway"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "leadership transfer failed; stopping anyway"),
                }
            }
        }
        if let Err(e) = self.sm.checkpoint() {
            tracing::error!(error = %e, "final checkpoint failed");
        }
        let _ = self.raft.shutdown().await;
    }
}

/// The name of a Raft role, as the admin API and metrics show it.
pub fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}
