//! RaftMQ protocol definitions: RocketMQ 5 gRPC API, Raft transport, admin.
//!
//! This crate is part of the layout set by issue #2 and is still empty: its
//! work is tracked in issue #3. See `ARCHITECTURE.md` for where it fits.
