//! CommitLog configuration. Every field documents its default; unknown keys in
//! TOML are rejected (`deny_unknown_fields`).

use serde::Deserialize;
use serde::Serialize;

/// When the log makes appended entries durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// fdatasync before an append is reported flushed (the default). Appends
    /// that arrive while a sync runs share the next one (group commit).
    Sync,
    /// Report appends flushed as soon as they are written to the page cache and
    /// fdatasync every `flush_interval_ms` (DLedger's 10 ms). Opt-in: a power
    /// loss can lose acknowledged entries on this node.
    Async,
}

/// Configuration of one CommitLog directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Size of one data segment file, preallocated on creation.
    /// Default: 1 GiB (1073741824). Must be at least 64 KiB.
    pub segment_bytes: u64,
    /// Index slots (32 bytes each) per index file. Default: 4194304 (128 MiB files).
    pub index_slots_per_file: u64,
    /// Largest body of one entry. Default: 16 MiB. Must fit in a segment.
    pub max_entry_bytes: u32,
    /// Flush mode. Default: `sync`.
    pub flush_mode: FlushMode,
    /// In `async` mode, how often the flusher calls fdatasync. Default: 10 ms.
    pub flush_interval_ms: u64,
    /// Most bytes written but not yet fdatasynced. An append that would pass it
    /// syncs first. Recovery treats damage inside this window at the end of the
    /// log as a torn write; damage followed by more data than this is
    /// corruption. Default: 64 MiB.
    pub max_unsynced_bytes: u64,
    /// How often the index is fsynced and the recovery checkpoint advanced.
    /// Recovery rescans the data written after the checkpoint. Default: 10000 ms.
    pub checkpoint_interval_ms: u64,
    /// Retention: whole segments whose last write is older than this are
    /// deleted (never past what the caller still needs). Default: 72 h.
    pub file_reserved_time_hours: u64,
    /// Retention: when the disk holding the log is fuller than this ratio,
    /// the oldest segments are deleted (never past what the caller still
    /// needs). Default: 0.75 (RocketMQ's `diskMaxUsedSpaceRatio`).
    pub disk_max_used_ratio: f64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            index_slots_per_file: 1 << 22,
            max_entry_bytes: 16 << 20,
            flush_mode: FlushMode::Sync,
            flush_interval_ms: 10,
            max_unsynced_bytes: 64 << 20,
            checkpoint_interval_ms: 10_000,
            file_reserved_time_hours: 72,
            disk_max_used_ratio: 0.75,
        }
    }
}

impl LogConfig {
    /// Checks the relations between fields; returns a message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.segment_bytes < 64 * 1024 {
            return Err(format!("segment_bytes = {} is below the minimum 65536", self.segment_bytes));
        }
        if self.index_slots_per_file < 16 {
            return Err(format!("index_slots_per_file = {} is below the minimum 16", self.index_slots_per_file));
        }
        let largest_record = crate::record::HEADER_LEN as u64 + u64::from(self.max_entry_bytes) + 4;
        if largest_record > self.segment_bytes {
            return Err(format!(
                "max_entry_bytes = {} does not fit in segment_bytes = {}",
                self.max_entry_bytes, self.segment_bytes
            ));
        }
        if self.max_unsynced_bytes < largest_record {
            return Err(format!(
                "max_unsynced_bytes = {} is smaller than one largest entry ({largest_record} bytes)",
                self.max_unsynced_bytes
            ));
        }
        if !(self.disk_max_used_ratio > 0.0 && self.disk_max_used_ratio <= 1.0) {
            return Err(format!("disk_max_used_ratio = {} must be in (0, 1]", self.disk_max_used_ratio));
        }
        if self.flush_interval_ms == 0 {
            return Err("flush_interval_ms must be at least 1".into());
        }
        Ok(())
    }

    /// A configuration with small files, for tests.
    pub fn small_for_tests() -> Self {
        Self {
            segment_bytes: 64 * 1024,
            index_slots_per_file: 64,
            max_entry_bytes: 8 * 1024,
            max_unsynced_bytes: 32 * 1024,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_documented_values_hold() {
        let c = LogConfig::default();
        c.validate().unwrap();
        assert_eq!(c.segment_bytes, 1 << 30);
        assert_eq!(c.flush_mode, FlushMode::Sync);
        assert_eq!(c.file_reserved_time_hours, 72);
        LogConfig::small_for_tests().validate().unwrap();
    }

    #[test]
    fn rejects_entry_larger_than_segment() {
        let c = LogConfig { max_entry_bytes: 1 << 20, segment_bytes: 64 * 1024, ..LogConfig::default() };
        assert!(c.validate().unwrap_err().contains("max_entry_bytes"));
    }
}
