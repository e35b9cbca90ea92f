//! Unit tests of the CommitLog, one per behaviour and per injected fault.

use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use tempfile::TempDir;

use crate::config::LogConfig;
use crate::error::LogError;
use crate::fault::CrashMode;
use crate::fault::FaultFs;
use crate::fault::flip_byte;
use crate::fault::truncate_file;
use crate::fs::DiskUsage;
use crate::log::CommitLog;
use crate::log::RecordRef;
use crate::meta::StoredLogId;
use crate::meta::StoredVote;
use crate::record::EntryKind;
use crate::record::HEADER_LEN;

pub(crate) struct Env {
    pub dir: TempDir,
    pub fs: FaultFs,
    pub config: LogConfig,
}

impl Env {
    pub fn new() -> Self {
        Self::with_config(LogConfig::small_for_tests())
    }

    pub fn with_config(config: LogConfig) -> Self {
        Env { dir: tempfile::tempdir().unwrap(), fs: FaultFs::new(), config }
    }

    pub fn open(&self) -> CommitLog {
        self.try_open().unwrap()
    }

    pub fn try_open(&self) -> Result<CommitLog, LogError> {
        CommitLog::open(self.dir.path(), self.config.clone(), Arc::new(self.fs.clone())).map(|(l, _)| l)
    }

    pub fn segments(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.dir.path().join("data"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }
}

pub(crate) fn body(index: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (index as usize * 31 + i) as u8).collect()
}

/// Appends entries `from..to` of `len` bytes each in term `term`, one batch.
pub(crate) fn append(log: &CommitLog, from: u64, to: u64, term: u64, len: usize) {
    let bodies: Vec<Vec<u8>> = (from..to).map(|i| body(i, len)).collect();
    let recs: Vec<RecordRef<'_>> = (from..to)
        .zip(&bodies)
        .map(|(index, b)| RecordRef { index, term, leader_node: 1, kind: EntryKind::Normal, body: b })
        .collect();
    log.append(&recs).unwrap();
}

fn assert_entries(log: &CommitLog, from: u64, to: u64, len: usize) {
    for i in from..to {
        let r = log.read(i).unwrap_or_else(|e| panic!("entry {i}: {e}"));
        assert_eq!(r.index, i);
        assert_eq!(&r.body[..], &body(i, len)[..], "body of entry {i}");
    }
}

#[test]
fn append_and_read_back() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 10, 1, 100);
    assert_eq!(log.first_index(), 0);
    assert_eq!(log.last_entry().unwrap().index, 9);
    assert_entries(&log, 0, 10, 100);
    let range = log.read_range(3, 7).unwrap();
    assert_eq!(range.iter().map(|r| r.index).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
    // By position, as a ConsumeQueue stores it.
    let (pos, len) = log.position_of(5).unwrap();
    assert_eq!(len as usize, HEADER_LEN + 100);
    let r = log.read_at(pos).unwrap();
    assert_eq!(r.index, 5);
    let raw = log.read_slice(pos + HEADER_LEN as u64, 100).unwrap();
    assert_eq!(&raw[..], &body(5, 100)[..]);
    assert_eq!(&raw.clone().into_bytes()[..], &body(5, 100)[..]);
    // Past the end and before the start are NotFound.
    assert!(matches!(log.read(10), Err(LogError::NotFound(_))));
    assert!(matches!(log.read_slice(log.end_pos(), 1), Err(LogError::NotFound(_))));
}

#[test]
fn bad_appends_are_rejected_and_change_nothing() {
    let env = Env::new();
    let log = env.open();
    append(&log, 5, 8, 2, 10);
    let gap = [RecordRef { index: 9, term: 2, leader_node: 1, kind: EntryKind::Normal, body: b"x" }];
    assert!(matches!(log.append(&gap), Err(LogError::Invalid(_))));
    let old_term = [RecordRef { index: 8, term: 1, leader_node: 1, kind: EntryKind::Normal, body: b"x" }];
    assert!(matches!(log.append(&old_term), Err(LogError::Invalid(_))));
    let big = vec![0u8; env.config.max_entry_bytes as usize + 1];
    let oversized = [RecordRef { index: 8, term: 2, leader_node: 1, kind: EntryKind::Normal, body: &big }];
    assert!(matches!(log.append(&oversized), Err(LogError::Invalid(_))));
    assert_eq!(log.last_entry().unwrap().index, 7);
    append(&log, 8, 9, 2, 10);
    assert_entries(&log, 5, 9, 10);
}

#[test]
fn a_batch_in_one_segment_is_one_data_write_and_one_fdatasync() {
    let config = LogConfig {
        segment_bytes: 1 << 20,
        max_unsynced_bytes: 1 << 20,
        index_slots_per_file: 1024,
        ..LogConfig::small_for_tests()
    };
    let env = Env::with_config(config);
    let log = env.open();
    append(&log, 0, 1, 1, 10); // creates the segment and the index file
    log.sync().unwrap();
    let (w0, s0) = (env.fs.write_count(), env.fs.sync_count());
    append(&log, 1, 257, 1, 1000);
    log.sync().unwrap();
    // One pwrite of the records, one of their index slots; one fdatasync.
    assert_eq!(env.fs.write_count() - w0, 2);
    assert_eq!(env.fs.sync_count() - s0, 1);
}

#[test]
fn segments_roll_and_everything_survives_reopen() {
    let env = Env::new();
    let log = env.open();
    for i in 0..40 {
        append(&log, i * 10, i * 10 + 10, 1 + i / 10, 500);
    }
    assert!(env.segments().len() >= 4, "expected several segments, got {}", env.segments().len());
    assert_entries(&log, 0, 400, 500);
    drop(log);
    let (log, report) = CommitLog::open(env.dir.path(), env.config.clone(), Arc::new(env.fs.clone())).unwrap();
    assert!(report.scanned_entries > 0, "no checkpoint was written, so recovery scans");
    assert_entries(&log, 0, 400, 500);
    log.close().unwrap();
    let (log, report) = CommitLog::open(env.dir.path(), env.config.clone(), Arc::new(env.fs.clone())).unwrap();
    assert_eq!(report.scanned_entries, 0, "after a clean close nothing is rescanned");
    assert_entries(&log, 0, 400, 500);
    append(&log, 400, 410, 5, 500);
    assert_entries(&log, 0, 410, 500);
}

#[test]
fn power_loss_keeps_exactly_what_was_synced() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 20, 1, 200);
    log.sync().unwrap();
    append(&log, 20, 30, 1, 200);
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    assert_eq!(log.last_entry().unwrap().index, 19);
    assert_entries(&log, 0, 20, 200);
    append(&log, 20, 25, 2, 200);
    assert_entries(&log, 20, 25, 200);
}

#[test]
fn torn_last_write_is_cut_cleanly() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 20, 1, 200);
    log.sync().unwrap();
    // The last data write: records 20..30, of which nothing lands.
    append(&log, 20, 30, 1, 200);
    drop(log);
    // Keep 3.5 records of the batch.
    env.fs.crash(CrashMode::TearLastWrite { keep_bytes: 0, suffix: ".seg" }).unwrap();
    let log = env.open();
    assert_eq!(log.last_entry().unwrap().index, 19);
    drop(log);

    let env = Env::new();
    let log = env.open();
    append(&log, 0, 20, 1, 200);
    log.sync().unwrap();
    let data_pos = log.end_pos();
    append(&log, 20, 30, 1, 200);
    let seg = env.segments().pop().unwrap();
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    // Write a torn copy: 3 full records and half of the fourth.
    let full = (HEADER_LEN + 200) as u64;
    let mut bytes = Vec::new();
    for i in 20..24u64 {
        crate::record::encode_record(
            &mut bytes,
            &crate::record::RecordHeader {
                body_len: 200,
                index: i,
                term: 1,
                leader_node: 1,
                pos: data_pos + (i - 20) * full,
                kind: EntryKind::Normal,
            },
            &body(i, 200),
        );
    }
    bytes.truncate((3 * full + full / 2) as usize);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&seg).unwrap(),
        &bytes,
        data_pos,
    )
    .unwrap();
    let (log, report) = CommitLog::open(env.dir.path(), env.config.clone(), Arc::new(env.fs.clone())).unwrap();
    assert_eq!(log.last_entry().unwrap().index, 22, "three whole records survive, the torn one goes");
    assert_eq!(report.torn_tail_bytes, Some(full / 2));
    assert_entries(&log, 0, 23, 200);
    // The cut is clean: new appends go where the torn record was.
    append(&log, 23, 26, 2, 200);
    drop(log);
    let log = env.open();
    assert_entries(&log, 0, 26, 200);
}

#[test]
fn flipped_byte_before_the_tail_is_a_typed_error_naming_file_and_offset() {
    let env = Env::new();
    let log = env.open();
    for i in 0..30 {
        append(&log, i * 10, i * 10 + 10, 1, 500);
    }
    let (pos, _) = log.position_of(3).unwrap();
    drop(log);
    let first_seg = env.segments()[0].clone();
    flip_byte(&first_seg, pos + HEADER_LEN as u64 + 7).unwrap();
    match env.try_open() {
        Err(LogError::Corruption { path, offset, .. }) => {
            assert_eq!(path, first_seg);
            assert_eq!(offset, pos);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn flipped_byte_below_the_checkpoint_is_caught_on_read() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 50, 1, 300);
    log.close().unwrap();
    let (pos, _) = {
        let log = env.open();
        log.position_of(7).unwrap()
    };
    let seg = env.segments()[0].clone();
    flip_byte(&seg, pos + HEADER_LEN as u64 + 1).unwrap();
    let log = env.open();
    match log.read(7) {
        Err(LogError::Corruption { path, offset, .. }) => {
            assert_eq!(path, seg);
            assert_eq!(offset, pos);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert_entries(&log, 8, 50, 300);
}

#[test]
fn damaged_index_is_rebuilt_from_the_data() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 150, 1, 100);
    log.close().unwrap();
    // Slot 70 lives in index file 1 (64 slots per file) at slot 6.
    let idx = env.dir.path().join("index").join("0000000001.idx");
    flip_byte(&idx, 6 * 32 + 3).unwrap();
    let (log, report) = CommitLog::open(env.dir.path(), env.config.clone(), Arc::new(env.fs.clone())).unwrap();
    assert_eq!(report.index_rebuilt_from, Some(70));
    assert_entries(&log, 0, 150, 100);
    // A missing index file is rebuilt too.
    drop(log);
    std::fs::remove_file(&idx).unwrap();
    let log = env.open();
    assert_entries(&log, 0, 150, 100);
}

#[test]
fn truncated_segment_file_is_a_typed_error() {
    let env = Env::new();
    let log = env.open();
    for i in 0..20 {
        append(&log, i * 10, i * 10 + 10, 1, 500);
    }
    log.close().unwrap();
    let seg = env.segments()[1].clone();
    truncate_file(&seg, 1000).unwrap();
    match env.try_open() {
        Err(LogError::Corruption { path, reason, .. }) => {
            assert_eq!(path, seg);
            assert!(reason.contains("truncated"), "{reason}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn truncate_after_is_durable_and_nothing_comes_back() {
    let env = Env::new();
    let log = env.open();
    for i in 0..10 {
        append(&log, i * 10, i * 10 + 10, 1, 1000);
    }
    log.close().unwrap();
    let log = env.open();
    let segs_before = env.segments().len();
    log.truncate_after(Some(34)).unwrap();
    assert_eq!(log.last_entry().unwrap().index, 34);
    assert!(env.segments().len() < segs_before);
    assert!(matches!(log.read(35), Err(LogError::NotFound(_))));
    // New leader's entries, same length as the old ones: the bytes after them
    // are zero, so no old entry can be resurrected.
    append(&log, 35, 37, 2, 1000);
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    // The appends after the truncation were never synced.
    assert_eq!(log.last_entry().unwrap().index, 34);
    assert_entries(&log, 0, 35, 1000);
    append(&log, 35, 40, 2, 1000);
    log.sync().unwrap();
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    assert_eq!(log.last_entry().unwrap().index, 39);
    assert_eq!(log.read(36).unwrap().term, 2);
    // Truncating everything.
    log.truncate_after(None).unwrap();
    assert!(log.last_entry().is_none());
    drop(log);
    let log = env.open();
    assert!(log.last_entry().is_none());
    append(&log, 0, 3, 3, 10);
    assert_entries(&log, 0, 3, 10);
}

#[test]
fn purge_drops_a_prefix_and_whole_files() {
    let env = Env::new();
    let log = env.open();
    for i in 0..20 {
        append(&log, i * 10, i * 10 + 10, 1, 500);
    }
    let segs = env.segments().len();
    log.purge(StoredLogId { term: 1, leader_node: 1, index: 120 }).unwrap();
    assert_eq!(log.first_index(), 121);
    assert!(matches!(log.read(120), Err(LogError::NotFound(_))));
    assert!(env.segments().len() < segs);
    assert_entries(&log, 121, 200, 500);
    drop(log);
    let log = env.open();
    assert_eq!(log.first_index(), 121);
    assert_eq!(log.purged().unwrap().index, 120);
    assert_entries(&log, 121, 200, 500);
    // Purge past the end (a snapshot newer than the log), then continue.
    log.purge(StoredLogId { term: 2, leader_node: 1, index: 250 }).unwrap();
    assert!(log.last_entry().is_none());
    append(&log, 251, 260, 2, 500);
    drop(log);
    let log = env.open();
    assert_eq!(log.first_index(), 251);
    assert_entries(&log, 251, 260, 500);
}

#[test]
fn retention_by_age_never_passes_what_is_needed() {
    let env = Env::new();
    // A disk far from full, whatever the machine's disk holds.
    let seg = env.config.segment_bytes;
    env.fs.set_disk_usage(Some(DiskUsage { total_bytes: 1000 * seg, available_bytes: 900 * seg }));
    let log = env.open();
    for i in 0..40 {
        append(&log, i * 10, i * 10 + 10, 1, 1000);
    }
    let now = SystemTime::now();
    assert_eq!(log.retention_point(now, 400).unwrap(), None, "nothing is 72 h old");
    let later = now + Duration::from_secs(73 * 3600);
    let point = log.retention_point(later, 400).unwrap().unwrap();
    assert!(point.index < 400);
    let (last_seg_start, _) = log.position_of(point.index + 1).unwrap();
    assert!(last_seg_start >= log.end_pos() - env.config.segment_bytes, "keeps the segment being written");
    // Bounded by what the caller still needs.
    let bounded = log.retention_point(later, 150).unwrap().unwrap();
    assert!(bounded.index < 150);
    let purged = log.apply_retention(later, 150).unwrap().unwrap();
    assert_eq!(purged, bounded);
    assert_eq!(log.first_index(), bounded.index + 1);
    assert_entries(&log, bounded.index + 1, 400, 1000);
}

#[test]
fn real_disk_usage_counts_like_df() {
    let u = crate::fs::FileSystem::disk_usage(&crate::fs::StdFs, std::path::Path::new("/")).unwrap();
    assert!(u.available_bytes <= u.total_bytes);
    let ratio = u.used_ratio();
    assert!((0.0..=1.0).contains(&ratio), "{ratio}");
}

#[test]
fn retention_by_disk_ratio_frees_the_oldest_segments() {
    let env = Env::new();
    let log = env.open();
    for i in 0..40 {
        append(&log, i * 10, i * 10 + 10, 1, 1000);
    }
    let seg = env.config.segment_bytes;
    // 90 % used of a disk 10 segments large: free at least 1.5 segments.
    env.fs.set_disk_usage(Some(DiskUsage { total_bytes: 10 * seg, available_bytes: seg }));
    let point = log.retention_point(SystemTime::now(), 1000).unwrap().unwrap();
    let segs_before = env.segments().len();
    log.purge(point).unwrap();
    let freed = segs_before - env.segments().len();
    assert!((2..segs_before).contains(&freed), "freed {freed} of {segs_before} segments");
    env.fs.set_disk_usage(Some(DiskUsage { total_bytes: 10 * seg, available_bytes: 5 * seg }));
    assert_eq!(log.retention_point(SystemTime::now(), 1000).unwrap(), None);
}

#[test]
fn disk_full_fails_the_append_and_corrupts_nothing() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 10, 1, 300);
    log.sync().unwrap();
    // A write that lands partly, then ENOSPC.
    env.fs.set_enospc(Some(500));
    let bodies: Vec<Vec<u8>> = (10..20).map(|i| body(i, 300)).collect();
    let recs: Vec<RecordRef<'_>> = (10..20u64)
        .zip(&bodies)
        .map(|(index, b)| RecordRef { index, term: 1, leader_node: 1, kind: EntryKind::Normal, body: b })
        .collect();
    assert!(matches!(log.append(&recs), Err(LogError::NoSpace { .. })));
    assert_eq!(log.last_entry().unwrap().index, 9);
    assert_entries(&log, 0, 10, 300);
    // Segment allocation fails too.
    env.fs.set_enospc(Some(0));
    let big: Vec<Vec<u8>> = (10..200).map(|i| body(i, 1000)).collect();
    let recs: Vec<RecordRef<'_>> = (10..200u64)
        .zip(&big)
        .map(|(index, b)| RecordRef { index, term: 1, leader_node: 1, kind: EntryKind::Normal, body: b })
        .collect();
    assert!(matches!(log.append(&recs), Err(LogError::NoSpace { .. })));
    assert_eq!(log.last_entry().unwrap().index, 9);
    // Space again: the same entries go in.
    env.fs.set_enospc(None);
    append(&log, 10, 20, 1, 300);
    log.sync().unwrap();
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    assert_entries(&log, 0, 20, 300);
}

#[test]
fn failed_fdatasync_poisons_the_log_until_reopened() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 5, 1, 100);
    env.fs.set_fail_sync(true);
    assert!(log.sync().is_err());
    env.fs.set_fail_sync(false);
    let one = [RecordRef { index: 5, term: 1, leader_node: 1, kind: EntryKind::Normal, body: b"x" }];
    assert!(matches!(log.append(&one), Err(LogError::Poisoned(_))));
    assert!(matches!(log.sync(), Err(LogError::Poisoned(_))));
    drop(log);
    let log = env.open();
    assert_entries(&log, 0, 5, 100);
}

#[test]
fn vote_is_durable_when_save_returns() {
    let env = Env::new();
    let log = env.open();
    let v = StoredVote { term: 7, node_id: 3, committed: true };
    log.save_vote(v).unwrap();
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    assert_eq!(log.vote(), Some(v));
}

#[test]
fn corrupt_meta_is_a_typed_error() {
    let env = Env::new();
    let log = env.open();
    log.save_vote(StoredVote { term: 1, node_id: 1, committed: false }).unwrap();
    drop(log);
    flip_byte(&env.dir.path().join("meta"), 5).unwrap();
    assert!(matches!(env.try_open(), Err(LogError::Corruption { .. })));
}

#[test]
fn unsynced_bytes_stay_bounded() {
    let env = Env::new();
    let log = env.open();
    let s0 = env.fs.sync_count();
    // 100 KiB written without calling sync: the log syncs by itself.
    for i in 0..100 {
        append(&log, i, i + 1, 1, 1000);
    }
    assert!(env.fs.sync_count() > s0, "the unsynced window forced syncs");
    log.check_invariants();
}

/// Found by the model test: purge to an empty log, append, sync, then two
/// crashes in a row lost the synced entry.
#[test]
fn synced_entry_after_purge_to_empty_survives_two_crashes() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 11, 1, 2526);
    append(&log, 11, 23, 1, 2825);
    log.purge(StoredLogId { term: 1, leader_node: 1, index: 0 }).unwrap();
    log.purge(StoredLogId { term: 1, leader_node: 1, index: 22 }).unwrap();
    append(&log, 23, 24, 1, 2603);
    log.sync().unwrap();
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    assert_eq!(log.last_entry().map(|l| l.index), Some(23));
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    assert_eq!(log.last_entry().map(|l| l.index), Some(23));
    assert_entries(&log, 23, 24, 2603);
}

/// Review finding D1: a truncation must not drop other segments' unsynced
/// writes from the next sync.
#[test]
fn truncation_keeps_earlier_unsynced_entries_syncable() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 55, 1, 1000);
    log.sync().unwrap();
    append(&log, 55, 80, 1, 1000);
    assert!(env.segments().len() >= 2);
    log.truncate_after(Some(70)).unwrap();
    log.sync().unwrap();
    drop(log);
    env.fs.crash(CrashMode::LoseUnsynced).unwrap();
    let log = env.open();
    assert_eq!(log.last_entry().unwrap().index, 70);
    assert_entries(&log, 0, 71, 1000);
}

/// Review finding D2: a log need not begin at index 0.
#[test]
fn log_starting_above_zero_reopens() {
    let env = Env::new();
    let log = env.open();
    append(&log, 5, 8, 1, 100);
    drop(log);
    let log = env.open();
    assert_eq!(log.first_index(), 5);
    assert_entries(&log, 5, 8, 100);
    log.close().unwrap();
    let log = env.open();
    assert_eq!(log.first_index(), 5);
    assert_entries(&log, 5, 8, 100);
}

/// Review finding D3: after a purge past the end, an index rebuild accepts
/// the jump from the purged records to the first kept one.
#[test]
fn index_rebuild_after_purge_past_the_end() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 30, 1, 100);
    log.purge(StoredLogId { term: 1, leader_node: 1, index: 50 }).unwrap();
    append(&log, 51, 60, 2, 100);
    log.close().unwrap();
    for f in std::fs::read_dir(env.dir.path().join("index")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let (log, report) = CommitLog::open(env.dir.path(), env.config.clone(), Arc::new(env.fs.clone())).unwrap();
    assert!(report.index_rebuilt_from.is_some() || report.scanned_entries > 0);
    assert_eq!(log.first_index(), 51);
    assert_entries(&log, 51, 60, 100);
}

/// Review finding P1: a lost page inside the last unsynced write, with later
/// pages of it on disk, is a torn tail: cut, not left behind the end.
#[test]
fn hole_inside_a_torn_write_is_cut() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 10, 1, 1000);
    log.sync().unwrap();
    let end = log.end_pos();
    append(&log, 10, 20, 1, 1000);
    drop(log);
    // The unsynced write persisted except for its first 2 KiB.
    let seg = env.segments()[0].clone();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; 2048], end).unwrap();
    drop(f);
    let (log, report) = CommitLog::open(env.dir.path(), env.config.clone(), Arc::new(env.fs.clone())).unwrap();
    assert_eq!(log.last_entry().unwrap().index, 9);
    assert!(report.torn_tail_bytes.is_some());
    append(&log, 10, 12, 2, 1000);
    log.check_invariants();
    drop(log);
    let log = env.open();
    assert_entries(&log, 0, 10, 1000);
    assert_eq!(log.read(11).unwrap().term, 2);
}

/// Writes what `ship_upto` returned into `dir` the way a snapshot receiver
/// does: the first `send_len` bytes, the rest of the file zeros.
fn receive_shipped(shipped: &crate::log::ShippedLog, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for seg in &shipped.segments {
        let mut buf = vec![0u8; seg.send_len as usize];
        seg.file.read_exact_at(&mut buf, 0).unwrap();
        let f = std::fs::File::create(dir.join(&seg.name)).unwrap();
        f.set_len(seg.size).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, 0).unwrap();
        f.sync_all().unwrap();
    }
}

#[test]
fn shipped_segments_replace_a_log_byte_for_byte() {
    let src = Env::new();
    let log = src.open();
    append(&log, 0, 40, 1, 4000);
    log.sync().unwrap();
    let seg_size = src.config.segment_bytes;
    assert!(src.segments().len() >= 3, "the test needs several segments");
    // Retention removed the first segment; the sender keeps writing after the
    // snapshot point, and ships only up to it.
    let first_seg_last = log.retention_point(SystemTime::now() + Duration::from_secs(100 * 3600), 20).unwrap();
    let purged = first_seg_last.expect("a closed segment");
    log.purge(purged).unwrap();
    let shipped = log.ship_upto(30).unwrap();
    append(&log, 40, 45, 1, 4000);
    assert_eq!(shipped.purged, Some(purged));
    assert_eq!(shipped.end_pos, log.position_of(30).unwrap().0 + log.position_of(30).unwrap().1 as u64);
    assert!(shipped.segments.iter().all(|s| s.size == seg_size && s.send_len <= s.size));
    // Shipping up to the purge point, whose next entry opens a segment,
    // sends that segment empty: the receiver continues at its start.
    let edge = log.ship_upto(purged.index).unwrap();
    assert_eq!(edge.end_pos, log.position_of(purged.index + 1).unwrap().0);
    assert_eq!(edge.segments.len(), 1);
    assert_eq!(edge.segments[0].send_len, 0, "the segment after the cut goes empty");

    // A follower that had an older, shorter history.
    let dst = Env::new();
    let flog = dst.open();
    append(&flog, 0, 5, 1, 4000);
    flog.save_vote(StoredVote { term: 3, node_id: 2, committed: true }).unwrap();
    let incoming = dst.dir.path().join("incoming");
    receive_shipped(&shipped, &incoming);
    flog.replace_with(&incoming, shipped.purged, shipped.end_pos).unwrap();
    assert_eq!(flog.last_entry().map(|l| l.index), Some(30));
    assert_eq!(flog.first_index(), purged.index + 1);
    assert_eq!(flog.vote(), Some(StoredVote { term: 3, node_id: 2, committed: true }), "the vote is kept");
    assert_entries(&flog, purged.index + 1, 31, 4000);
    // Same bytes at the same positions: a position recorded by the sender
    // reads the same entry here.
    for i in purged.index + 1..31 {
        let (pos, _) = log.position_of(i).unwrap();
        assert_eq!(flog.read_at(pos).unwrap().index, i);
        assert_eq!(flog.position_of(i).unwrap(), log.position_of(i).unwrap());
    }
    // It continues where the sender continued, at the same positions.
    append(&flog, 31, 45, 1, 4000);
    for i in 31..45 {
        assert_eq!(flog.position_of(i).unwrap(), log.position_of(i).unwrap(), "entry {i}");
    }
    flog.sync().unwrap();
    drop(flog);
    let flog = dst.open();
    assert_entries(&flog, purged.index + 1, 45, 4000);
}

#[test]
fn raft_purge_keeps_the_bytes_until_retention() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 20, 1, 100);
    log.sync().unwrap();
    let (pos5, _) = log.position_of(5).unwrap();
    log.set_raft_purged(StoredLogId { term: 1, leader_node: 1, index: 10 }).unwrap();
    assert_eq!(log.raft_purged().map(|p| p.index), Some(10));
    assert_eq!(log.purged(), None, "nothing removed physically");
    assert_eq!(log.read_at(pos5).unwrap().index, 5, "bytes stay readable by position");
    assert!(log.ship_upto(4).is_ok());
    drop(log);
    let log = env.open();
    assert_eq!(log.raft_purged().map(|p| p.index), Some(10), "durable");
    // A point past the end supersedes the whole log.
    log.set_raft_purged(StoredLogId { term: 2, leader_node: 1, index: 30 }).unwrap();
    assert_eq!(log.purged().map(|p| p.index), Some(30));
    assert_eq!(log.last_entry(), None);
    append(&log, 31, 33, 2, 100);
    assert_eq!(log.last_entry().map(|l| l.index), Some(32));
    assert!(log.ship_upto(10).is_err(), "entries no longer present cannot be shipped");
}

#[test]
fn a_log_replaced_by_nothing_continues_at_the_senders_position() {
    let env = Env::new();
    let log = env.open();
    append(&log, 0, 3, 1, 100);
    let incoming = env.dir.path().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    log.replace_with(&incoming, Some(StoredLogId { term: 2, leader_node: 1, index: 99 }), 5_000_000).unwrap();
    assert_eq!(log.last_entry(), None);
    assert_eq!(log.first_pos(), 5_000_000);
    append(&log, 100, 102, 2, 100);
    assert_eq!(log.position_of(100).unwrap().0, 5_000_000);
}

#[test]
fn sync_latency_lands_in_its_bucket() {
    use crate::log::LogStats;
    use crate::log::SYNC_BUCKETS_US;

    let mut s = LogStats::default();
    s.record_sync(Duration::from_micros(100)); // at a bound: that bucket
    s.record_sync(Duration::from_micros(101)); // just above: the next
    s.record_sync(Duration::from_secs(3)); // above every bound: the last
    assert_eq!(s.sync_buckets[0], 1);
    assert_eq!(s.sync_buckets[1], 1);
    assert_eq!(s.sync_buckets[SYNC_BUCKETS_US.len()], 1);
    assert_eq!(s.syncs, 3);
    assert_eq!(s.sync_us_total, 100 + 101 + 3_000_000);
}
