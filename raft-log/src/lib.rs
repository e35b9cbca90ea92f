//! # raft-log: the RaftMQ CommitLog
//!
//! The Raft log *is* the CommitLog (the DLedger way): every broker command,
//! message batches included, is a Raft entry, stored once, in segmented,
//! preallocated, memory-mapped files. Consumers read message bytes straight
//! from the mapping by position.
//!
//! Modules, one job each:
//! - [`config`]: [`LogConfig`], every default documented;
//! - [`fs`]: the [`FileSystem`] boundary all file I/O goes through;
//! - [`fault`]: a fault-injecting file system (power loss, torn writes,
//!   ENOSPC, EIO) for tests and the fault-injection suite;
//! - [`record`]: on-disk formats (record header with CRC32C, index slot);
//! - [`log`]: [`CommitLog`]: append, read, sync, truncate, purge, retention,
//!   checkpoint and recovery;
//! - [`meta`]: the vote, purge point and checkpoint file;
//! - [`mapped`]: zero-copy slices of the mapping;
//! - [`store`]: openraft's `RaftLogStorage` over the CommitLog, with the
//!   group-commit flusher.

pub mod config;
pub mod error;
pub mod fault;
pub mod fs;
pub mod log;
pub mod mapped;
pub mod meta;
pub mod record;
pub mod store;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod store_tests;

pub use config::FlushMode;
pub use config::LogConfig;
pub use error::LogError;
pub use fs::FileSystem;
pub use fs::StdFs;
pub use log::CommitLog;
pub use log::Record;
pub use log::RecordRef;
pub use log::ShippedLog;
pub use log::ShippedSegment;
pub use mapped::MappedSlice;
pub use record::EntryKind;
pub use store::LogBytes;
pub use store::RaftLogStore;
