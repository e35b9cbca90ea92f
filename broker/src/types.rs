//! The openraft type configuration of a broker group.

use raft_log::LogBytes;

use crate::command::Response;

openraft::declare_raft_types!(
    /// Entries carry encoded broker commands; nodes are known by address.
    pub TypeConfig:
        D = LogBytes,
        R = Response,
        Node = openraft::BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, crate::sm::StateMachineStore>;
pub type LogId = openraft::LogId<raft_log::store::AdvLeaderId>;
pub type StoredMembership = openraft::StoredMembership<raft_log::store::AdvLeaderId, u64, openraft::BasicNode>;
pub type Vote = openraft::impls::Vote<raft_log::store::AdvLeaderId>;
pub type SnapshotMeta = openraft::SnapshotMeta<raft_log::store::AdvLeaderId, u64, openraft::BasicNode>;
pub type Snapshot =
    openraft::storage::Snapshot<raft_log::store::AdvLeaderId, u64, openraft::BasicNode, crate::snapshot::SnapshotDir>;
