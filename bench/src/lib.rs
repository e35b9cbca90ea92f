//! `raftmq-bench`: RaftMQ side by side with NATS JetStream and RabbitMQ
//! quorum queues. Code map:
//! - [`drivers`]: one client per system behind publish / receive;
//! - [`workload`]: closed-loop produce, fixed-rate produce, end-to-end
//!   latency, backlog drain, each measured the same way for every system;
//! - [`stats`]: latency percentiles, per-second throughput, server CPU and
//!   peak memory from `/proc`;
//! - [`result`]: one JSON file per run, the README's Markdown tables and a
//!   throughput-over-time SVG per workload.
//!
//! The tool installs and starts nothing: `bench/compare.sh` does (with
//! `bench/peers.sh` for the peers).

pub mod drivers;
pub mod result;
pub mod stats;
pub mod workload;

pub use stats::Latencies;
pub use stats::pids_cpu_seconds;
pub use stats::process_cpu_seconds;
