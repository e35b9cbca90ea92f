//! The `meta` file: the durable vote, the purge point and the recovery
//! checkpoint. Replaced atomically (write temp, fdatasync, rename, fsync dir).
//! Format: JSON followed by a 4-byte CRC32C of the JSON.

use std::path::Path;

use serde::Deserialize;
use serde::Serialize;

use crate::error::LogError;
use crate::error::Result;
use crate::fs::FileSystem;
use crate::fs::read_small;
use crate::fs::write_atomic;

pub(crate) const META_FILE: &str = "meta";

/// A Raft vote as stored: openraft's `Vote` with an advanced-mode leader id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVote {
    pub term: u64,
    pub node_id: u64,
    pub committed: bool,
}

/// A log id as stored: index plus the committed leader id (term, node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StoredLogId {
    pub term: u64,
    pub leader_node: u64,
    pub index: u64,
}

/// Entries before `next_index` and their index slots are durable (or
/// purged); the record of entry `next_index`, if any, starts at `end_pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub next_index: u64,
    pub end_pos: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub vote: Option<StoredVote>,
    pub purged: Option<StoredLogId>,
    pub checkpoint: Option<Checkpoint>,
    /// The committed log id openraft last reported (a hint; may lag).
    #[serde(default)]
    pub committed: Option<StoredLogId>,
    /// The purge point openraft asked for (after a snapshot). Entries up to
    /// it are gone for Raft but their bytes stay readable by position until
    /// retention removes them physically (`purged`): a follower that installs
    /// a snapshot keeps the messages the snapshot's ConsumeQueues point at.
    #[serde(default)]
    pub raft_purged: Option<StoredLogId>,
}

impl Meta {
    pub(crate) fn load(fs: &dyn FileSystem, dir: &Path) -> Result<Meta> {
        let path = dir.join(META_FILE);
        if !fs.exists(&path) {
            return Ok(Meta::default());
        }
        let bytes = read_small(fs, &path).map_err(|e| LogError::io(&path, e))?;
        if bytes.len() < 4 {
            return Err(LogError::corruption(&path, 0, "meta file shorter than its CRC"));
        }
        let (json, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32c::crc32c(json) != stored {
            return Err(LogError::corruption(&path, 0, "meta file CRC mismatch"));
        }
        serde_json::from_slice(json).map_err(|e| LogError::corruption(&path, 0, format!("meta file unreadable: {e}")))
    }

    pub(crate) fn store(&self, fs: &dyn FileSystem, dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec(self).expect("meta serializes");
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        write_atomic(fs, dir, META_FILE, &bytes).map_err(|e| LogError::io(dir.join(META_FILE), e))
    }
}
