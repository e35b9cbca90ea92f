//! One node of a RaftMQ broker group.
//!
//! - [`config`]: TOML configuration, every default documented;
//! - [`command`]: the commands a Raft entry carries (message batches, control);
//! - [`sm`]: the state machine (ConsumeQueues in [`cq`], state in RocksDB);
//!   [`pop`] picks what a Pop hands out (FIFO, filters, dead letters);
//!   [`held`] keeps delayed and half messages, dead-letter origins, consumers;
//! - [`filter`]: tag and SQL92 filters;
//! - [`acl`]: access keys, request signatures, permissions;
//! - [`snapshot`]: snapshots (state machine files + shipped CommitLog segments);
//! - [`node`]: CommitLog + state machine + openraft; proposing to the leader;
//! - [`network`]: the Raft transport over gRPC;
//! - [`messaging`]: the RocketMQ 5 client API (`apache.rocketmq.v2`);
//! - [`admin`]: the admin API (CLI, forwarding, follower reads);
//! - [`clients`]: the clients connected to this node (Telemetry streams,
//!   transaction check-backs, push consumers' renewals, queue assignment);
//! - [`registry`]: registration with the name servers;
//! - [`routes`]: routes to the other groups (from the name servers, cached);
//! - [`server`]: one gRPC port serving all of the above;
//! - [`metrics`]: the Prometheus metrics page (`metrics_listen`);
//! - [`faults`]: test hooks of the fault-injection suite (off by default).

pub mod acl;
pub mod admin;
pub mod batcher;
pub mod clients;
pub mod command;
pub mod config;
pub mod cq;
pub mod error;
pub mod faults;
pub mod filter;
pub mod held;
pub mod messaging;
pub mod metrics;
pub mod network;
pub mod node;
pub mod pop;
pub mod registry;
pub mod routes;
pub mod server;
pub mod sm;
pub mod snapshot;
pub mod types;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use node::BrokerNode;
