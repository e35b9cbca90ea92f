//! RaftMQ protocol definitions, generated from `proto/`:
//!
//! - [`rocketmq`]: `apache.rocketmq.v2`, the RocketMQ 5 gRPC client API
//!   (wire-compatible with the official clients; see `PROTOCOL-NOTES.md`);
//! - [`raft`]: the Raft transport between the nodes of a group;
//! - [`store`]: how a message is stored in a CommitLog entry;
//! - [`admin`]: the admin API of a node (CLI, forwarding, follower reads);
//! - [`namesrv`]: the name server;
//! - [`auth`]: how client requests are signed (ACL);
//! - [`metrics`]: Prometheus text exposition and its `GET /metrics` server
//!   (broker and name server).

#![allow(clippy::all, missing_docs)]

pub mod rocketmq {
    tonic::include_proto!("apache.rocketmq.v2");
}

pub mod raft {
    tonic::include_proto!("raftmq.raft");
}

pub mod store {
    tonic::include_proto!("raftmq.store");
}

pub mod admin {
    tonic::include_proto!("raftmq.admin");
}

pub mod auth;
pub mod metrics;

/// Response header in which a broker names its group leader's address
/// (SendMessage replies); our client sends its writes there.
pub const LEADER_HEADER: &str = "x-raftmq-leader";

pub mod namesrv {
    tonic::include_proto!("raftmq.namesrv");
}
