//! [`CommitLog`]: the segmented, memory-mapped log of Raft entries.
//!
//! Layout of a log directory:
//! - `data/{base:020}-{size}.seg`: data segments, preallocated to `size`
//!   bytes, holding records back to back from global position `base`;
//! - `index/{no:010}.idx`: index files of `index_slots_per_file` 32-byte slots,
//!   slot `i` giving entry `i`'s position and length;
//! - `meta`: vote, purge point, recovery checkpoint, committed hint.
//!
//! Writes are `pwrite`s through [`FileSystem`]; reads are slices of read-only
//! maps of the same files. The index is derived data: it is fsynced only at
//! checkpoints and rebuilt from the data after the checkpoint on open.
//!
//! Invariants (checked in debug builds after every change, see `check_invariants`):
//! - entries `first_index ..= last.index` are present, contiguous, terms non-decreasing;
//! - every byte of a segment past `write_pos` reads as zero (truncation zeroes),
//!   so recovery cannot resurrect a truncated entry;
//! - at most `max_unsynced_bytes` are written but not fdatasynced;
//! - segment files are never shrunk while mapped, only deleted whole.

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;
use std::sync::RwLockWriteGuard;
use std::time::Duration;
use std::time::SystemTime;

use memmap2::Mmap;

use crate::config::LogConfig;
use crate::error::LogError;
use crate::error::Result;
use crate::fs::FileSystem;
use crate::fs::FsFile;
use crate::mapped::MappedSlice;
use crate::meta::Checkpoint;
use crate::meta::Meta;
use crate::meta::StoredLogId;
use crate::meta::StoredVote;
use crate::record::DecodeError;
use crate::record::EntryKind;
use crate::record::HEADER_LEN;
use crate::record::PAD_MAGIC;
use crate::record::RecordHeader;
use crate::record::SLOT_LEN;
use crate::record::Slot;
use crate::record::decode_header;
use crate::record::decode_record;
use crate::record::encode_record;

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub index: u64,
    pub term: u64,
    pub leader_node: u64,
    pub kind: EntryKind,
    pub body: &'a [u8],
}

/// An entry read back. The body is a slice of the mapping: no copy.
#[derive(Debug, Clone)]
pub struct Record {
    pub index: u64,
    pub term: u64,
    pub leader_node: u64,
    pub kind: EntryKind,
    /// Position of the record in the whole log.
    pub pos: u64,
    pub body: MappedSlice,
}

impl Record {
    /// Bytes the record takes in the log (header + body).
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.body.len() as u64
    }
}

/// The last entry of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastEntry {
    pub index: u64,
    pub term: u64,
    pub leader_node: u64,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Sequence number of this append; `sync` reports the highest it covers.
    pub seq: u64,
    /// Position of the first record appended.
    pub first_pos: u64,
    /// Position just after the last record appended.
    pub end_pos: u64,
}

/// Counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub appends: u64,
    pub entries_appended: u64,
    pub bytes_appended: u64,
    pub syncs: u64,
    pub checkpoints: u64,
    pub segments_deleted: u64,
    /// Syncs by how long their fdatasyncs took: slot `i` counts those of at
    /// most [`SYNC_BUCKETS_US`]`[i]` (and more than the bound before); the
    /// last slot counts the rest.
    pub sync_buckets: [u64; SYNC_BUCKETS_US.len() + 1],
    /// Total time spent in fdatasync, microseconds.
    pub sync_us_total: u64,
}

/// Upper bounds of the sync latency buckets of [`LogStats`], microseconds.
pub const SYNC_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

impl LogStats {
    pub(crate) fn record_sync(&mut self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let slot = SYNC_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(SYNC_BUCKETS_US.len());
        self.sync_buckets[slot] += 1;
        self.sync_us_total = self.sync_us_total.saturating_add(us);
        self.syncs += 1;
    }
}

/// What recovery found on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Entries whose records were scanned and CRC-checked.
    pub scanned_entries: u64,
    /// Bytes of a torn tail that were cut off, if any.
    pub torn_tail_bytes: Option<u64>,
    /// Index of the first slot found damaged, if the index was rebuilt.
    pub index_rebuilt_from: Option<u64>,
    /// Empty segment files left by an interrupted creation, removed.
    pub removed_incomplete_segments: u64,
}

struct Segment {
    base: u64,
    size: u64,
    path: PathBuf,
    file: Arc<dyn FsFile>,
    map: Arc<Mmap>,
}

impl Segment {
    fn end(&self) -> u64 {
        self.base + self.size
    }

    fn bytes(&self) -> &[u8] {
        &self.map[..]
    }
}

struct IndexFile {
    path: PathBuf,
    file: Arc<dyn FsFile>,
    map: Arc<Mmap>,
}

struct State {
    segments: BTreeMap<u64, Segment>,
    index_files: BTreeMap<u64, IndexFile>,
    /// First present index (or the next to append when empty).
    first_index: u64,
    last: Option<LastEntry>,
    /// The index the next append must carry; `None` on a fresh log.
    next_index: Option<u64>,
    /// Where the next record goes.
    write_pos: u64,
    /// Data files with writes not yet fdatasynced.
    dirty: Vec<Arc<dyn FsFile>>,
    /// Index files written since the last checkpoint.
    index_dirty: Vec<Arc<dyn FsFile>>,
    unsynced_bytes: u64,
    append_seq: u64,
    synced_seq: u64,
    poisoned: Option<String>,
    stats: LogStats,
}

/// A segment file shipped in a snapshot: the first `send_len` bytes matter,
/// the rest of its `size` reads as zeros.
pub struct ShippedSegment {
    pub name: String,
    pub size: u64,
    pub send_len: u64,
    pub file: Arc<dyn FsFile>,
}

/// The log up to a snapshot's last entry, as [`CommitLog::ship_upto`] found it.
pub struct ShippedLog {
    /// Physical purge point of the sender: the receiver purges the same.
    pub purged: Option<StoredLogId>,
    /// Position just after the snapshot's last entry.
    pub end_pos: u64,
    pub segments: Vec<ShippedSegment>,
}

/// The CommitLog. Cheap to share: wrap it in an `Arc`; reads take a shared
/// lock only long enough to find a mapping; appends take the exclusive lock
/// for their `pwrite`s, never for an fdatasync (except the rare forced sync
/// when `max_unsynced_bytes` would be passed).
pub struct CommitLog {
    dir: PathBuf,
    data_dir: PathBuf,
    index_dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    config: LogConfig,
    state: RwLock<State>,
    meta: Mutex<Meta>,
    /// Serialises truncate, purge and checkpoint with each other.
    maintenance: Mutex<()>,
    /// Serialises syncs.
    sync_lock: Mutex<()>,
    /// Committed log id reported by openraft, not yet stored.
    pending_committed: Mutex<Option<Option<StoredLogId>>>,
}

fn push_unique(v: &mut Vec<Arc<dyn FsFile>>, f: &Arc<dyn FsFile>) {
    if !v.iter().any(|x| Arc::ptr_eq(x, f)) {
        v.push(f.clone());
    }
}

fn segment_name(base: u64, size: u64) -> String {
    format!("{base:020}-{size}.seg")
}

fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (base, size) = stem.split_once('-')?;
    Some((base.parse().ok()?, size.parse().ok()?))
}

fn index_name(no: u64) -> String {
    format!("{no:010}.idx")
}

fn parse_index_name(name: &str) -> Option<u64> {
    name.strip_suffix(".idx")?.parse().ok()
}

/// Whether a record with `index` may follow during a scan that expects
/// `expected` next, where entries below `min_index` are purged: purged records
/// follow each other; the first kept one is `min_index` (or, on a log never
/// purged, whatever comes first); kept ones follow each other.
fn index_follows(index: u64, expected: Option<u64>, min_index: u64) -> bool {
    if index < min_index {
        return expected.is_none_or(|e| index == e);
    }
    match expected {
        Some(e) if e > min_index => index == e,
        Some(_) => index == min_index,
        None => min_index == 0 || index == min_index,
    }
}

/// First offset at or after `from` holding a nonzero byte.
fn first_nonzero(bytes: &[u8], from: usize) -> Option<usize> {
    if from >= bytes.len() {
        return None;
    }
    let tail = &bytes[from..];
    let chunks = tail.chunks_exact(64);
    let rest = chunks.remainder();
    for (i, c) in chunks.enumerate() {
        if c.iter().any(|&b| b != 0) {
            let j = c.iter().position(|&b| b != 0).expect("nonzero");
            return Some(from + i * 64 + j);
        }
    }
    rest.iter().position(|&b| b != 0).map(|j| from + tail.len() - rest.len() + j)
}

impl CommitLog {
    /// Opens (creating if needed) the log in `dir`, running recovery.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig, fs: Arc<dyn FileSystem>) -> Result<(Self, RecoveryReport)> {
        config.validate().map_err(LogError::Config)?;
        let dir = dir.as_ref().to_path_buf();
        let data_dir = dir.join("data");
        let index_dir = dir.join("index");
        for d in [&dir, &data_dir, &index_dir] {
            fs.create_dir_all(d).map_err(|e| LogError::io(d, e))?;
            // The directory entry itself must be durable before any file in it.
            if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs.sync_dir(parent).map_err(|e| LogError::io(parent, e))?;
            }
        }
        let meta = Meta::load(fs.as_ref(), &dir)?;
        let first_index = meta.purged.map(|p| p.index + 1).unwrap_or(0);
        let log = CommitLog {
            dir,
            data_dir,
            index_dir,
            fs,
            config,
            state: RwLock::new(State {
                segments: BTreeMap::new(),
                index_files: BTreeMap::new(),
                first_index,
                last: None,
                next_index: meta.purged.map(|p| p.index + 1),
                write_pos: 0,
                dirty: Vec::new(),
                index_dirty: Vec::new(),
                unsynced_bytes: 0,
                append_seq: 0,
                synced_seq: 0,
                poisoned: None,
                stats: LogStats::default(),
            }),
            meta: Mutex::new(meta),
            maintenance: Mutex::new(()),
            sync_lock: Mutex::new(()),
            pending_committed: Mutex::new(None),
        };
        let report = log.recover()?;
        log.check_invariants();
        Ok((log, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ----------------------------------------------------------------------
    // Recovery

    fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        let mut st = self.write_state();
        let meta = self.lock_meta().clone();

        // Segments: contiguous, each exactly as long as its name says.
        let names = self.fs.list(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))?;
        let mut found: Vec<(u64, u64, String)> = Vec::new();
        for name in names {
            if let Some((base, size)) = parse_segment_name(&name) {
                found.push((base, size, name));
            } else if name.ends_with(".tmp") {
                let p = self.data_dir.join(&name);
                self.fs.remove_file(&p).map_err(|e| LogError::io(&p, e))?;
                self.fs.sync_dir(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))?;
            }
        }
        found.sort();
        let count = found.len();
        for (i, (base, size, name)) in found.into_iter().enumerate() {
            let path = self.data_dir.join(&name);
            let file = self.fs.open(&path, false).map_err(|e| LogError::io(&path, e))?;
            let len = file.len().map_err(|e| LogError::io(&path, e))?;
            if len != size {
                // The newest segment may be an interrupted creation: empty and short.
                let mut head = [0u8; 4];
                let empty = len < 4 || (file.read_exact_at(&mut head, 0).is_ok() && head == [0; 4]);
                if i + 1 == count && empty {
                    tracing::warn!(path = %path.display(), len, size, "removing incompletely created segment");
                    drop(file);
                    self.fs.remove_file(&path).map_err(|e| LogError::io(&path, e))?;
                    self.fs.sync_dir(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))?;
                    report.removed_incomplete_segments += 1;
                    continue;
                }
                return Err(LogError::corruption(
                    &path,
                    len.min(size),
                    format!("segment is {len} bytes, expected {size}: truncated or damaged"),
                ));
            }
            if let Some((_, prev)) = st.segments.iter().next_back()
                && prev.end() != base
            {
                return Err(LogError::corruption(
                    &path,
                    0,
                    format!("segment starts at {base}, previous ends at {}: a segment is missing", prev.end()),
                ));
            }
            let map = Arc::new(file.map().map_err(|e| LogError::io(&path, e))?);
            st.segments.insert(base, Segment { base, size, path, file, map });
        }

        // Index files; an index of another geometry is dropped and rebuilt.
        let slots = self.config.index_slots_per_file;
        let names = self.fs.list(&self.index_dir).map_err(|e| LogError::io(&self.index_dir, e))?;
        let mut index_usable = true;
        for name in names {
            let Some(no) = parse_index_name(&name) else { continue };
            let path = self.index_dir.join(&name);
            let file = self.fs.open(&path, false).map_err(|e| LogError::io(&path, e))?;
            let len = file.len().map_err(|e| LogError::io(&path, e))?;
            if len != slots * SLOT_LEN as u64 {
                index_usable = false;
                tracing::warn!(path = %path.display(), len, "index file of unexpected size; rebuilding the index");
            }
            let map = Arc::new(file.map().map_err(|e| LogError::io(&path, e))?);
            st.index_files.insert(no, IndexFile { path, file, map });
        }
        if !index_usable {
            let files = std::mem::take(&mut st.index_files);
            for (_, f) in files {
                self.fs.remove_file(&f.path).map_err(|e| LogError::io(&f.path, e))?;
            }
            self.fs.sync_dir(&self.index_dir).map_err(|e| LogError::io(&self.index_dir, e))?;
        }

        // Where to scan from: after the checkpoint if the index up to it is sound.
        let first = st.first_index;
        let start_of_data = st.segments.keys().next().copied();
        let mut scan_from: Option<(u64, Option<u64>, u64)> = None; // (pos, expected index, min term)
        if let Some(cp) = meta.checkpoint {
            match self.validate_index(&st, first, cp) {
                Ok(last) => {
                    if let Some(l) = last {
                        st.last = Some(l);
                    }
                    scan_from = Some((cp.end_pos, Some(cp.next_index), last.map(|l| l.term).unwrap_or(0)));
                    st.next_index = Some(cp.next_index);
                    st.write_pos = cp.end_pos;
                }
                Err(bad) => {
                    tracing::warn!(index = bad, "index damaged; rebuilding it from the data");
                    report.index_rebuilt_from = Some(bad);
                }
            }
        }
        let (from_pos, expected, min_term) = match scan_from {
            Some(s) => s,
            None => {
                st.last = None;
                let pos = start_of_data.unwrap_or(meta.checkpoint.map(|c| c.end_pos).unwrap_or(0));
                st.write_pos = pos;
                (pos, None, 0)
            }
        };
        let durable_floor = if scan_from.is_some() { 0 } else { meta.checkpoint.map(|c| c.end_pos).unwrap_or(0) };
        let first_found = self.scan(&mut st, &mut report, from_pos, expected, first, min_term, durable_floor)?;
        // Scanning from the start of the data found where the log begins (a
        // log need not begin at 0).
        if scan_from.is_none()
            && let Some(f) = first_found
        {
            st.first_index = f;
        }

        // The checkpoint promised entries up to next_index - 1 are durable.
        if let Some(cp) = meta.checkpoint
            && cp.next_index > first
            && st.last.map(|l| l.index + 1).unwrap_or(first) < cp.next_index
        {
            return Err(LogError::corruption(
                &self.data_dir,
                st.write_pos,
                format!("log ends before entry {} that the checkpoint recorded as durable", cp.next_index - 1),
            ));
        }
        // What recovery found after the checkpoint may be only in the page
        // cache (the previous process died before syncing it). openraft treats
        // every entry present at start as persisted, so make it so now.
        for seg in st.segments.values().filter(|s| s.end() > from_pos) {
            seg.file.sync_data().map_err(|e| LogError::io(&seg.path, e))?;
        }
        // Segments wholly before the first present entry (a purge interrupted
        // before it deleted them) go now.
        drop(st);
        self.delete_purged_files()?;
        Ok(report)
    }

    /// Checks index slots `first .. cp.next_index` against each other and the
    /// data headers. Returns the last entry, or the first bad index.
    fn validate_index(&self, st: &State, first: u64, cp: Checkpoint) -> std::result::Result<Option<LastEntry>, u64> {
        let mut last: Option<LastEntry> = None;
        let mut prev_end: Option<u64> = None;
        for i in first..cp.next_index {
            let slot = match self.slot_in(st, i) {
                Some(s) if s.index == i => s,
                _ => return Err(i),
            };
            if let Some(end) = prev_end
                && slot.pos != end
                && !st.segments.contains_key(&slot.pos)
            {
                return Err(i);
            }
            if last.is_some_and(|l| slot.term < l.term) {
                return Err(i);
            }
            let Some(seg) = Self::segment_for(st, slot.pos) else { return Err(i) };
            let off = (slot.pos - seg.base) as usize;
            let hdr = match decode_header(&seg.bytes()[off..]) {
                Ok(h) if h.index == i && h.pos == slot.pos && h.record_len() == u64::from(slot.len) => h,
                _ => return Err(i),
            };
            prev_end = Some(slot.end());
            last = Some(LastEntry { index: i, term: hdr.term, leader_node: hdr.leader_node });
        }
        if let Some(end) = prev_end
            && end != cp.end_pos
            && !st.segments.contains_key(&cp.end_pos)
            && Self::segment_for(st, end).is_some_and(|s| s.end() != cp.end_pos)
        {
            return Err(cp.next_index.saturating_sub(1));
        }
        Ok(last)
    }

    /// Scans records from `pos`, checking CRCs, positions, contiguous indexes
    /// and non-decreasing terms, writing their index slots. Stops at the end of
    /// the data; cuts a torn tail; reports damage followed by more data.
    #[allow(clippy::too_many_arguments)]
    fn scan(
        &self,
        st: &mut State,
        report: &mut RecoveryReport,
        mut pos: u64,
        mut expected: Option<u64>,
        min_index: u64,
        mut prev_term: u64,
        durable_floor: u64,
    ) -> Result<Option<u64>> {
        let mut slots: Vec<Slot> = Vec::new();
        let mut first_found: Option<u64> = None;
        let window = self.torn_window();
        // A start in a gap before the first segment: the segments that held it
        // were deleted because they held only purged entries (and the pad
        // before a roll), so the data resumes at the next segment.
        if Self::segment_for(st, pos).is_none()
            && let Some((&next, _)) = st.segments.range(pos..).next()
        {
            pos = next;
        }
        // The loop ends past the last segment (or exactly at its end).
        while let Some((base, size)) = Self::segment_for(st, pos).map(|s| (s.base, s.size)) {
            let seg = &st.segments[&base];
            let off = (pos - base) as usize;
            if size as usize - off < 4 {
                pos = base + size;
                continue;
            }
            let bytes = seg.bytes();
            let bad: Option<String> = match decode_header(&bytes[off..]) {
                Err(DecodeError::Pad) => {
                    pos = base + size;
                    continue;
                }
                Err(DecodeError::Zero) => {
                    // The end, unless the next segment continues the sequence
                    // (the pad before a roll was lost).
                    if let Some(next) = st.segments.range(base + 1..).next().map(|(_, s)| s)
                        && let Ok(h) = decode_record(next.bytes())
                        && expected.is_some_and(|e| h.index == e)
                    {
                        pos = next.base;
                        continue;
                    }
                    if let Some(at) = self.data_after(st, pos + window) {
                        Some(format!("unwritten space is followed by data at position {at}"))
                    } else if let Some(at) = self.data_after(st, pos) {
                        // Pages of the last unsynced write landed out of order.
                        Some(format!("unwritten space is followed by a torn write at position {at}"))
                    } else {
                        break;
                    }
                }
                Err(DecodeError::Short) => Some("record runs past the end of its segment".into()),
                Err(DecodeError::Bad(r)) => Some(r),
                Ok(h) => match decode_record(&bytes[off..]) {
                    Err(DecodeError::Short) => Some("record runs past the end of its segment".into()),
                    Err(e) => Some(format!("{e:?}")),
                    Ok(_) if h.pos != pos => Some(format!("record claims position {}, found at {pos}", h.pos)),
                    Ok(_) if !index_follows(h.index, expected, min_index) => {
                        Some(format!("index {} where {} was expected", h.index, expected.unwrap_or(min_index)))
                    }
                    Ok(_) if h.index >= min_index && h.term < prev_term => {
                        Some(format!("term {} after term {prev_term}", h.term))
                    }
                    Ok(_) => {
                        report.scanned_entries += 1;
                        if h.index >= min_index {
                            first_found.get_or_insert(h.index);
                            slots.push(Slot { pos, term: h.term, index: h.index, len: h.record_len() as u32 });
                            st.last = Some(LastEntry { index: h.index, term: h.term, leader_node: h.leader_node });
                            prev_term = h.term;
                        }
                        expected = Some(h.index + 1);
                        pos += h.record_len();
                        st.write_pos = pos;
                        st.next_index = expected;
                        None
                    }
                },
            };
            let Some(reason) = bad else { continue };
            // Damage at `pos`. Torn tail only if nothing follows beyond the
            // unsynced window and it lies past everything known durable.
            let seg_path = st.segments[&base].path.clone();
            let data_after = self.data_after(st, pos + window);
            if pos < durable_floor || data_after.is_some() {
                return Err(LogError::corruption(&seg_path, pos - base, reason));
            }
            let torn = self.cut_tail(st, pos)?;
            tracing::warn!(path = %seg_path.display(), offset = pos - base, bytes = torn, %reason, "cut a torn tail");
            report.torn_tail_bytes = Some(torn);
            st.write_pos = pos;
            break;
        }
        // Data past the end in later segments (possible only after the end
        // was found by a zero header at a segment end) is checked by
        // `data_after`; empty later segments are removed.
        let end = st.write_pos;
        let later: Vec<u64> = st.segments.range(end + 1..).map(|(b, _)| *b).collect();
        for b in later {
            if st.segments[&b].base >= end && first_nonzero(st.segments[&b].bytes(), 0).is_none() {
                let seg = st.segments.remove(&b).expect("present");
                self.fs.remove_file(&seg.path).map_err(|e| LogError::io(&seg.path, e))?;
                self.fs.sync_dir(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))?;
            }
        }
        // Slot writes happen after the scan so a corruption error leaves files as found.
        self.write_slots(st, &slots)?;
        if st.last.is_none() && expected.is_some() {
            st.next_index = expected;
        }
        if let Some(l) = st.last {
            st.next_index = Some(l.index + 1);
        }
        if st.next_index.is_some_and(|n| n > st.first_index) && st.last.is_none() {
            st.first_index = st.next_index.expect("some");
        }
        Ok(first_found)
    }

    /// How far garbage of an unsynced write can reach past the point where
    /// recovery finds damage: the unsynced bound, plus the gap a segment roll
    /// skips (at most one largest record and a pad).
    fn torn_window(&self) -> u64 {
        self.config.max_unsynced_bytes + HEADER_LEN as u64 + u64::from(self.config.max_entry_bytes) + 4
    }

    /// Position of the first nonzero byte at or after global position `from`.
    fn data_after(&self, st: &State, from: u64) -> Option<u64> {
        for seg in st.segments.values() {
            if seg.end() <= from {
                continue;
            }
            let off = from.saturating_sub(seg.base) as usize;
            if let Some(at) = first_nonzero(seg.bytes(), off) {
                return Some(seg.base + at as u64);
            }
        }
        None
    }

    /// Zeroes everything from `pos` to the end of its segment, deletes later
    /// segments, and makes that durable. Returns the bytes cut.
    fn cut_tail(&self, st: &mut State, pos: u64) -> Result<u64> {
        let mut cut = 0u64;
        if let Some(seg) = Self::segment_for(st, pos) {
            let off = pos - seg.base;
            let used = first_nonzero(seg.bytes(), off as usize).map(|_| {
                let bytes = seg.bytes();
                let last_nz = bytes.iter().rposition(|&b| b != 0).unwrap_or(0) as u64;
                last_nz + 1 - off
            });
            cut += used.unwrap_or(0);
            seg.file.zero_range(off, seg.size - off).map_err(|e| LogError::io(&seg.path, e))?;
            seg.file.sync_data().map_err(|e| LogError::io(&seg.path, e))?;
        }
        let later: Vec<u64> = st.segments.range(pos + 1..).map(|(b, _)| *b).filter(|b| *b > pos).collect();
        for b in later {
            let seg = st.segments.remove(&b).expect("present");
            cut += first_nonzero(seg.bytes(), 0).map(|_| seg.size).unwrap_or(0);
            st.dirty.retain(|f| !Arc::ptr_eq(f, &seg.file));
            self.fs.remove_file(&seg.path).map_err(|e| LogError::io(&seg.path, e))?;
        }
        self.fs.sync_dir(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))?;
        Ok(cut)
    }

    // ----------------------------------------------------------------------
    // Lookups

    fn segment_for(st: &State, pos: u64) -> Option<&Segment> {
        st.segments.range(..=pos).next_back().map(|(_, s)| s).filter(|s| pos < s.end())
    }

    fn slot_location(&self, index: u64) -> (u64, u64) {
        let per = self.config.index_slots_per_file;
        (index / per, (index % per) * SLOT_LEN as u64)
    }

    fn slot_in(&self, st: &State, index: u64) -> Option<Slot> {
        let (no, off) = self.slot_location(index);
        let f = st.index_files.get(&no)?;
        Slot::decode(&f.map[off as usize..off as usize + SLOT_LEN])
    }

    fn check_readable(st: &State, index: u64) -> Result<()> {
        match st.last {
            Some(l) if index >= st.first_index && index <= l.index => Ok(()),
            _ => Err(LogError::NotFound(format!("entry {index}"))),
        }
    }

    /// The slot of a present entry; a damaged slot is a corruption error.
    fn slot(&self, st: &State, index: u64) -> Result<Slot> {
        Self::check_readable(st, index)?;
        match self.slot_in(st, index) {
            Some(s) if s.index == index => Ok(s),
            _ => {
                let (no, off) = self.slot_location(index);
                let path = self.index_dir.join(index_name(no));
                Err(LogError::corruption(path, off, format!("index slot of entry {index} is damaged")))
            }
        }
    }

    fn read_at_locked(st: &State, pos: u64, expect_index: Option<u64>) -> Result<Record> {
        let seg = Self::segment_for(st, pos).ok_or_else(|| LogError::NotFound(format!("position {pos}")))?;
        let off = (pos - seg.base) as usize;
        let h = decode_record(&seg.bytes()[off..])
            .map_err(|e| LogError::corruption(&seg.path, off as u64, format!("{e:?}")))?;
        if h.pos != pos || expect_index.is_some_and(|i| i != h.index) {
            return Err(LogError::corruption(
                &seg.path,
                off as u64,
                format!("record there is entry {} at {}, not the one expected", h.index, h.pos),
            ));
        }
        let start = off + HEADER_LEN;
        Ok(Record {
            index: h.index,
            term: h.term,
            leader_node: h.leader_node,
            kind: h.kind,
            pos,
            body: MappedSlice::new(seg.map.clone(), start, h.body_len as usize),
        })
    }

    /// Reads entry `index`, checking its CRC.
    pub fn read(&self, index: u64) -> Result<Record> {
        let st = self.read_state();
        let slot = self.slot(&st, index)?;
        Self::read_at_locked(&st, slot.pos, Some(index))
    }

    /// Reads entries `start..end` (clamped to what is present at the end).
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<Record>> {
        let st = self.read_state();
        let Some(last) = st.last else { return Ok(Vec::new()) };
        let end = end.min(last.index + 1);
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        for i in start..end {
            let slot = self.slot(&st, i)?;
            out.push(Self::read_at_locked(&st, slot.pos, Some(i))?);
        }
        Ok(out)
    }

    /// Reads the record at a position (as stored by a ConsumeQueue), checking its CRC.
    pub fn read_at(&self, pos: u64) -> Result<Record> {
        let st = self.read_state();
        if pos >= st.write_pos {
            return Err(LogError::NotFound(format!("position {pos}")));
        }
        Self::read_at_locked(&st, pos, None)
    }

    /// Raw bytes `[pos, pos + len)` of the log, as a slice of the mapping.
    /// They must lie inside one record area of one segment and below the end.
    pub fn read_slice(&self, pos: u64, len: usize) -> Result<MappedSlice> {
        let st = self.read_state();
        if pos + len as u64 > st.write_pos {
            return Err(LogError::NotFound(format!(
                "bytes {pos}..{} (log ends at {})",
                pos + len as u64,
                st.write_pos
            )));
        }
        let seg = Self::segment_for(&st, pos).ok_or_else(|| LogError::NotFound(format!("position {pos}")))?;
        if pos + len as u64 > seg.end() {
            return Err(LogError::Invalid(format!("bytes {pos}..{} cross a segment end", pos + len as u64)));
        }
        Ok(MappedSlice::new(seg.map.clone(), (pos - seg.base) as usize, len))
    }

    /// Position and record length of entry `index`.
    pub fn position_of(&self, index: u64) -> Result<(u64, u32)> {
        let st = self.read_state();
        let s = self.slot(&st, index)?;
        Ok((s.pos, s.len))
    }

    /// First present index (the next to append if the log is empty).
    pub fn first_index(&self) -> u64 {
        self.read_state().first_index
    }

    pub fn last_entry(&self) -> Option<LastEntry> {
        self.read_state().last
    }

    /// Position just after the last record.
    pub fn end_pos(&self) -> u64 {
        self.read_state().write_pos
    }

    pub fn stats(&self) -> LogStats {
        self.read_state().stats
    }

    /// Sequence number of the newest append covered by an fdatasync.
    pub fn synced_seq(&self) -> u64 {
        self.read_state().synced_seq
    }

    pub fn purged(&self) -> Option<StoredLogId> {
        self.lock_meta().purged
    }

    pub fn vote(&self) -> Option<StoredVote> {
        self.lock_meta().vote
    }

    pub fn committed_hint(&self) -> Option<StoredLogId> {
        self.lock_meta().committed
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.read_state().segments.values().map(|s| s.size).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.read_state().segments.len()
    }

    // ----------------------------------------------------------------------
    // Appends

    fn poisoned(st: &State) -> Result<()> {
        match &st.poisoned {
            Some(why) => Err(LogError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Appends entries: one `pwrite` per segment touched (one, unless the
    /// batch crosses a segment end) plus the index slots. Not durable until
    /// [`sync`](Self::sync) covers the returned `seq`.
    pub fn append(&self, records: &[RecordRef<'_>]) -> Result<AppendOutcome> {
        if records.is_empty() {
            let st = self.read_state();
            return Ok(AppendOutcome { seq: st.append_seq, first_pos: st.write_pos, end_pos: st.write_pos });
        }
        let mut st = self.write_state();
        Self::poisoned(&st)?;
        self.validate_append(&st, records)?;
        // Split into parts of at most `max_unsynced_bytes`, syncing between.
        let limit = self.config.max_unsynced_bytes;
        let mut outcome: Option<AppendOutcome> = None;
        let mut start = 0;
        while start < records.len() {
            let mut bytes = 0u64;
            let mut end = start;
            while end < records.len() {
                let n = (HEADER_LEN + records[end].body.len()) as u64 + 4;
                if end > start && bytes + n > limit {
                    break;
                }
                bytes += n;
                end += 1;
            }
            if st.unsynced_bytes > 0 && st.unsynced_bytes + bytes > limit {
                // Sync through the one sync path (never beside a running one),
                // then re-check: the log may have changed meanwhile.
                drop(st);
                self.sync()?;
                st = self.write_state();
                Self::poisoned(&st)?;
                self.validate_append(&st, &records[start..])?;
            }
            let part = self.append_part(&mut st, &records[start..end])?;
            outcome = Some(match outcome {
                None => part,
                Some(o) => AppendOutcome { seq: part.seq, first_pos: o.first_pos, end_pos: part.end_pos },
            });
            start = end;
        }
        drop(st);
        self.check_invariants();
        Ok(outcome.expect("non-empty"))
    }

    fn validate_append(&self, st: &State, records: &[RecordRef<'_>]) -> Result<()> {
        let mut expected = st.next_index;
        let mut term = st.last.map(|l| l.term).unwrap_or(0);
        for r in records {
            if expected.is_some_and(|e| e != r.index) {
                return Err(LogError::Invalid(format!(
                    "append of entry {} where entry {} is next",
                    r.index,
                    expected.unwrap_or(0)
                )));
            }
            if r.index < st.first_index {
                return Err(LogError::Invalid(format!("append of entry {} below the purge point", r.index)));
            }
            if r.term < term {
                return Err(LogError::Invalid(format!("entry {} has term {} after term {term}", r.index, r.term)));
            }
            if r.body.len() > self.config.max_entry_bytes as usize {
                return Err(LogError::Invalid(format!(
                    "entry {} is {} bytes, above max_entry_bytes {}",
                    r.index,
                    r.body.len(),
                    self.config.max_entry_bytes
                )));
            }
            term = r.term;
            expected = Some(r.index + 1);
        }
        Ok(())
    }

    fn append_part(&self, st: &mut State, records: &[RecordRef<'_>]) -> Result<AppendOutcome> {
        // Plan: chunks of bytes per segment, new segments to create, slots.
        struct Chunk {
            base: u64,
            offset: u64,
            bytes: Vec<u8>,
        }
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut new_bases: Vec<u64> = Vec::new();
        let mut slots: Vec<Slot> = Vec::with_capacity(records.len());
        let mut pos = st.write_pos;
        // Sized once: growing a buffer of a large batch by doubling costs
        // copies on the append path.
        let mut remaining: usize = records.iter().map(|r| HEADER_LEN + r.body.len()).sum();
        let first_pos_of = |pos: u64, len: u64, st: &State, new_bases: &[u64]| -> (u64, bool) {
            // Segment holding `pos`, or the base of a new one starting at `pos`.
            let existing = Self::segment_for(st, pos).map(|s| (s.base, s.end()));
            let planned =
                new_bases.last().map(|b| (*b, *b + self.config.segment_bytes)).filter(|(b, e)| pos >= *b && pos < *e);
            match existing.or(planned) {
                Some((_, end)) if pos + len <= end => (pos, false),
                Some((_, end)) => (end, true),
                None => (pos, true),
            }
        };
        for r in records {
            let len = (HEADER_LEN + r.body.len()) as u64;
            let (at, new) = first_pos_of(pos, len, st, &new_bases);
            if new {
                if at != pos {
                    // Pad the rest of the current segment when there is room.
                    if let Some(c) = chunks.last_mut()
                        && at - pos >= 4
                    {
                        c.bytes.extend_from_slice(&PAD_MAGIC.to_le_bytes());
                    } else if at - pos >= 4 {
                        let (base, end) = Self::segment_for(st, pos).map(|s| (s.base, s.end())).unwrap_or((pos, pos));
                        debug_assert!(end >= at);
                        chunks.push(Chunk { base, offset: pos - base, bytes: PAD_MAGIC.to_le_bytes().to_vec() });
                    }
                }
                new_bases.push(at);
                pos = at;
                chunks.push(Chunk { base: at, offset: 0, bytes: Vec::with_capacity(remaining) });
            } else if chunks.is_empty() {
                let base = Self::segment_for(st, pos)
                    .map(|s| s.base)
                    .or_else(|| new_bases.last().copied())
                    .expect("segment planned");
                chunks.push(Chunk { base, offset: pos - base, bytes: Vec::with_capacity(remaining) });
            }
            let c = chunks.last_mut().expect("chunk");
            let h = RecordHeader {
                body_len: r.body.len() as u32,
                index: r.index,
                term: r.term,
                leader_node: r.leader_node,
                pos,
                kind: r.kind,
            };
            encode_record(&mut c.bytes, &h, r.body);
            slots.push(Slot { pos, term: r.term, index: r.index, len: len as u32 });
            pos += len;
            remaining -= len as usize;
        }
        let end_pos = pos;
        let first_pos = slots[0].pos;

        // Create segments, then write; on failure undo what was done.
        let mut created: Vec<u64> = Vec::new();
        let result = (|| -> Result<()> {
            for &b in &new_bases {
                self.create_segment(st, b)?;
                created.push(b);
            }
            for c in &chunks {
                let seg = &st.segments[&c.base];
                debug_assert!(c.offset + c.bytes.len() as u64 <= seg.size);
                seg.file.write_all_at(&c.bytes, c.offset).map_err(|e| LogError::io(&seg.path, e))?;
            }
            self.write_slots(st, &slots)
        })();
        if let Err(e) = result {
            // Zero what may have landed; drop created segments. The log is as before.
            for c in &chunks {
                if let Some(seg) = st.segments.get(&c.base)
                    && let Err(ze) = seg.file.zero_range(c.offset, c.bytes.len() as u64)
                {
                    st.poisoned = Some(format!("could not undo a failed append: {ze}"));
                }
            }
            for b in created {
                if let Some(seg) = st.segments.remove(&b) {
                    let _ = self.fs.remove_file(&seg.path);
                }
            }
            return Err(e);
        }
        for c in &chunks {
            let f = st.segments[&c.base].file.clone();
            push_unique(&mut st.dirty, &f);
        }
        let last = records.last().expect("non-empty");
        if st.last.is_none() {
            st.first_index = records[0].index;
        }
        st.last = Some(LastEntry { index: last.index, term: last.term, leader_node: last.leader_node });
        st.next_index = Some(last.index + 1);
        st.write_pos = end_pos;
        let written: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
        st.unsynced_bytes += written;
        st.append_seq += 1;
        st.stats.appends += 1;
        st.stats.entries_appended += records.len() as u64;
        st.stats.bytes_appended += end_pos - first_pos;
        Ok(AppendOutcome { seq: st.append_seq, first_pos, end_pos })
    }

    fn create_segment(&self, st: &mut State, base: u64) -> Result<()> {
        let size = self.config.segment_bytes;
        let path = self.data_dir.join(segment_name(base, size));
        let made = (|| -> std::io::Result<(Arc<dyn FsFile>, Mmap)> {
            let file = self.fs.open(&path, true)?;
            file.allocate(size)?;
            file.sync_data()?;
            self.fs.sync_dir(&self.data_dir)?;
            let map = file.map()?;
            Ok((file, map))
        })();
        match made {
            Ok((file, map)) => {
                st.segments.insert(base, Segment { base, size, path, file, map: Arc::new(map) });
                Ok(())
            }
            Err(e) => {
                if self.fs.remove_file(&path).is_ok() {
                    let _ = self.fs.sync_dir(path.parent().expect("in a directory"));
                }
                Err(LogError::io(&path, e))
            }
        }
    }

    fn index_file(&self, st: &mut State, no: u64) -> Result<Arc<dyn FsFile>> {
        if let Some(f) = st.index_files.get(&no) {
            return Ok(f.file.clone());
        }
        let path = self.index_dir.join(index_name(no));
        let made = (|| -> std::io::Result<(Arc<dyn FsFile>, Mmap)> {
            let file = self.fs.open(&path, true)?;
            file.allocate(self.config.index_slots_per_file * SLOT_LEN as u64)?;
            file.sync_data()?;
            self.fs.sync_dir(&self.index_dir)?;
            let map = file.map()?;
            Ok((file, map))
        })();
        match made {
            Ok((file, map)) => {
                st.index_files.insert(no, IndexFile { path, file: file.clone(), map: Arc::new(map) });
                Ok(file)
            }
            Err(e) => {
                if self.fs.remove_file(&path).is_ok() {
                    let _ = self.fs.sync_dir(path.parent().expect("in a directory"));
                }
                Err(LogError::io(&path, e))
            }
        }
    }

    /// Writes consecutive slots, one `pwrite` per index file.
    fn write_slots(&self, st: &mut State, slots: &[Slot]) -> Result<()> {
        let mut i = 0;
        while i < slots.len() {
            let (no, off) = self.slot_location(slots[i].index);
            let mut buf = Vec::with_capacity((slots.len() - i) * SLOT_LEN);
            let mut j = i;
            while j < slots.len() && self.slot_location(slots[j].index).0 == no {
                debug_assert!(j == i || slots[j].index == slots[j - 1].index + 1);
                buf.extend_from_slice(&slots[j].encode());
                j += 1;
            }
            let file = self.index_file(st, no)?;
            file.write_all_at(&buf, off).map_err(|e| LogError::io(file.path(), e))?;
            push_unique(&mut st.index_dirty, &file);
            i = j;
        }
        Ok(())
    }

    // ----------------------------------------------------------------------
    // Durability

    /// Makes every append so far durable: one fdatasync per data file written
    /// since the last sync (one, unless a segment rolled). Returns the
    /// sequence number covered. Appends proceed while it runs.
    pub fn sync(&self) -> Result<u64> {
        let _one = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (files, seq, bytes) = {
            let mut st = self.write_state();
            Self::poisoned(&st)?;
            if st.synced_seq == st.append_seq {
                return Ok(st.synced_seq);
            }
            (std::mem::take(&mut st.dirty), st.append_seq, st.unsynced_bytes)
        };
        let started = std::time::Instant::now();
        for f in &files {
            if let Err(e) = f.sync_data() {
                let mut st = self.write_state();
                st.poisoned = Some(format!("fdatasync of {} failed: {e}", f.path().display()));
                return Err(LogError::io(f.path(), e));
            }
        }
        let mut st = self.write_state();
        st.synced_seq = st.synced_seq.max(seq);
        st.unsynced_bytes = st.unsynced_bytes.saturating_sub(bytes);
        st.stats.record_sync(started.elapsed());
        Ok(st.synced_seq)
    }

    /// Makes the index durable and advances the recovery checkpoint to the
    /// current end, so the next open rescans only what follows. Also stores
    /// the committed hint (clamped to the checkpoint).
    pub fn checkpoint(&self) -> Result<()> {
        let _m = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        self.checkpoint_locked()
    }

    fn checkpoint_locked(&self) -> Result<()> {
        let (index_files, next_index, end_pos) = {
            let mut st = self.write_state();
            Self::poisoned(&st)?;
            let Some(next) = st.next_index else { return Ok(()) };
            (std::mem::take(&mut st.index_dirty), next, st.write_pos)
        };
        self.sync()?;
        for f in &index_files {
            if let Err(e) = f.sync_data() {
                let mut st = self.write_state();
                for f in &index_files {
                    push_unique(&mut st.index_dirty, f);
                }
                return Err(LogError::io(f.path(), e));
            }
        }
        // The sync above may have covered appends made after we read the end,
        // but the checkpoint claims only up to `next_index - 1`.
        let mut meta = self.lock_meta();
        let mut new = meta.clone();
        new.checkpoint = Some(Checkpoint { next_index, end_pos });
        {
            let mut pending = self.pending_committed.lock().unwrap_or_else(|e| e.into_inner());
            match *pending {
                // Only a committed id whose entry the checkpoint covers is stored.
                Some(c) if c.is_none_or(|c| c.index < next_index) => {
                    new.committed = c;
                    *pending = None;
                }
                _ => {}
            }
        }
        if new != *meta {
            new.store(self.fs.as_ref(), &self.dir)?;
            *meta = new;
        }
        drop(meta);
        self.write_state().stats.checkpoints += 1;
        Ok(())
    }

    /// Remembers the committed log id; made durable at the next checkpoint,
    /// and only if the checkpoint covers it.
    pub fn set_committed_hint(&self, committed: Option<StoredLogId>) {
        self.pending_committed.lock().unwrap_or_else(|e| e.into_inner()).replace(committed);
    }

    /// Stores the vote durably before returning.
    pub fn save_vote(&self, vote: StoredVote) -> Result<()> {
        let mut meta = self.lock_meta();
        let mut new = meta.clone();
        new.vote = Some(vote);
        new.store(self.fs.as_ref(), &self.dir)?;
        *meta = new;
        Ok(())
    }

    // ----------------------------------------------------------------------
    // Truncation, purge, retention

    /// Removes every entry after `last_kept` (all entries if `None`). Durable
    /// on return: the removed bytes are zeroed and synced, so no crash can
    /// bring them back.
    pub fn truncate_after(&self, last_kept: Option<u64>) -> Result<()> {
        let _m = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        // Entries before the cut that are not yet durable must become so: the
        // dirty list is reset below.
        self.sync()?;
        let (new_end, new_last, cut_from_index) = {
            let st = self.read_state();
            Self::poisoned(&st)?;
            let Some(last) = st.last else { return Ok(()) };
            match last_kept {
                Some(k) if k >= last.index => return Ok(()),
                Some(k) if k >= st.first_index => {
                    let s = self.slot(&st, k)?;
                    let r = Self::read_at_locked(&st, s.pos, Some(k))?;
                    (s.end(), Some(LastEntry { index: k, term: r.term, leader_node: r.leader_node }), k + 1)
                }
                _ => {
                    let s = self.slot(&st, st.first_index)?;
                    (s.pos, None, st.first_index)
                }
            }
        };
        // 1. Lower the checkpoint first, durably, if it covers removed entries.
        {
            let mut meta = self.lock_meta();
            if meta.checkpoint.is_some_and(|c| c.next_index > cut_from_index) {
                let mut new = meta.clone();
                new.checkpoint = Some(Checkpoint { next_index: cut_from_index, end_pos: new_end });
                new.committed = new.committed.filter(|c| c.index < cut_from_index);
                new.store(self.fs.as_ref(), &self.dir)?;
                *meta = new;
            }
        }
        // 2. Zero the removed bytes and delete later segments.
        let mut st = self.write_state();
        if let Err(e) = self.cut_tail(&mut st, new_end) {
            st.poisoned = Some(format!("truncation failed: {e}"));
            return Err(e);
        }
        st.last = new_last;
        st.next_index = Some(cut_from_index);
        st.write_pos = new_end;
        st.unsynced_bytes = 0;
        drop(st);
        self.check_invariants();
        Ok(())
    }

    /// Removes entries up to and including `upto` (a log prefix, for openraft
    /// after a snapshot or for retention). The purge point is durable first;
    /// whole segments and index files below it are then deleted.
    pub fn purge(&self, upto: StoredLogId) -> Result<()> {
        let _m = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        if self.lock_meta().purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        // Make the tail durable and the checkpoint current, so the purge never
        // leaves a checkpoint behind the first present entry.
        self.checkpoint_locked()?;
        {
            let mut meta = self.lock_meta();
            let mut new = meta.clone();
            new.purged = Some(upto);
            // From the checkpoint just written (never from live state, which
            // may hold unsynced appends): entries below `upto + 1` are now
            // purged, so the checkpoint may claim them.
            if let Some(cp) = new.checkpoint
                && cp.next_index <= upto.index
            {
                new.checkpoint = Some(Checkpoint { next_index: upto.index + 1, end_pos: cp.end_pos });
            }
            new.store(self.fs.as_ref(), &self.dir)?;
            *meta = new;
        }
        {
            let mut st = self.write_state();
            st.first_index = upto.index + 1;
            if st.last.is_some_and(|l| l.index <= upto.index) {
                st.last = None;
            }
            if st.next_index.is_none_or(|n| n <= upto.index) {
                st.next_index = Some(upto.index + 1);
            }
        }
        self.delete_purged_files()?;
        self.check_invariants();
        Ok(())
    }

    /// Deletes segments and index files holding only purged entries.
    fn delete_purged_files(&self) -> Result<()> {
        let mut st = self.write_state();
        let first = st.first_index;
        let keep_from = if st.last.is_some() { self.slot(&st, first)?.pos } else { st.write_pos };
        let doomed: Vec<u64> = st.segments.values().filter(|s| s.end() <= keep_from).map(|s| s.base).collect();
        let mut deleted = 0;
        for b in doomed {
            let seg = st.segments.remove(&b).expect("present");
            st.dirty.retain(|f| !Arc::ptr_eq(f, &seg.file));
            self.fs.remove_file(&seg.path).map_err(|e| LogError::io(&seg.path, e))?;
            deleted += 1;
        }
        let per = self.config.index_slots_per_file;
        let doomed_idx: Vec<u64> = st.index_files.keys().copied().filter(|no| (no + 1) * per <= first).collect();
        for no in doomed_idx {
            let f = st.index_files.remove(&no).expect("present");
            st.index_dirty.retain(|x| !Arc::ptr_eq(x, &f.file));
            self.fs.remove_file(&f.path).map_err(|e| LogError::io(&f.path, e))?;
        }
        st.stats.segments_deleted += deleted;
        drop(st);
        self.fs.sync_dir(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))?;
        self.fs.sync_dir(&self.index_dir).map_err(|e| LogError::io(&self.index_dir, e))?;
        Ok(())
    }

    /// Size and free space of the file system holding the segments.
    pub fn disk_usage(&self) -> Result<crate::fs::DiskUsage> {
        self.fs.disk_usage(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))
    }

    /// The highest entry retention would purge: the last entry of the newest
    /// segment that is older than `file_reserved_time_hours` (by last write
    /// time), or, while the disk is fuller than `disk_max_used_ratio`, of the
    /// oldest segments until enough bytes would be freed. Never past
    /// `needed_from - 1`: entries from `needed_from` on are still needed
    /// (not yet applied, or held for a slow follower). The segment being
    /// written is never a candidate.
    pub fn retention_point(&self, now: SystemTime, needed_from: u64) -> Result<Option<StoredLogId>> {
        let st = self.read_state();
        let Some(last) = st.last else { return Ok(None) };
        let max_age = Duration::from_secs(self.config.file_reserved_time_hours * 3600);
        let usage = self.disk_usage()?;
        let over_ratio = usage.used_ratio() > self.config.disk_max_used_ratio;
        let mut bytes_to_free = if over_ratio {
            let target_used = (self.config.disk_max_used_ratio * usage.total_bytes as f64) as u64;
            (usage.total_bytes - usage.available_bytes).saturating_sub(target_used)
        } else {
            0
        };
        // Last entry index of each closed segment: the entry before the first
        // entry of the next segment.
        let mut candidate: Option<u64> = None;
        let segs: Vec<&Segment> = st.segments.values().collect();
        for w in segs.windows(2) {
            let (seg, next) = (w[0], w[1]);
            let expired = self
                .fs
                .modified(&seg.path)
                .map(|m| now.duration_since(m).unwrap_or_default() >= max_age)
                .unwrap_or(false);
            if !expired && bytes_to_free == 0 {
                break;
            }
            let next_first = match decode_header(next.bytes()) {
                Ok(h) => h.index,
                Err(_) => break,
            };
            let seg_last = next_first.saturating_sub(1);
            if next_first == 0 || seg_last < st.first_index || seg_last + 1 > needed_from || seg_last > last.index {
                break;
            }
            candidate = Some(seg_last);
            bytes_to_free = bytes_to_free.saturating_sub(seg.size);
        }
        let Some(index) = candidate else { return Ok(None) };
        let slot = self.slot(&st, index)?;
        let r = Self::read_at_locked(&st, slot.pos, Some(index))?;
        Ok(Some(StoredLogId { term: r.term, leader_node: r.leader_node, index }))
    }

    /// Runs retention directly (for a log not driven by openraft): purges up to
    /// [`retention_point`](Self::retention_point). Returns the purge point.
    /// Under openraft, pass the point to `Raft::trigger().purge_log` instead
    /// so openraft knows the entries are gone.
    pub fn apply_retention(&self, now: SystemTime, needed_from: u64) -> Result<Option<StoredLogId>> {
        let point = self.retention_point(now, needed_from)?;
        if let Some(p) = point {
            self.purge(p)?;
        }
        Ok(point)
    }

    // ----------------------------------------------------------------------
    // Raft's purge point, and shipping the log in a snapshot

    /// The purge point openraft sees: the later of the one it asked for
    /// ([`set_raft_purged`](Self::set_raft_purged)) and the physical one.
    pub fn raft_purged(&self) -> Option<StoredLogId> {
        let meta = self.lock_meta();
        meta.raft_purged.max(meta.purged)
    }

    /// Records openraft's purge point durably without removing data: entries
    /// up to `upto` are no longer served to Raft, but the message bytes stay
    /// readable by position until retention [`purge`](Self::purge)s them.
    /// A point past the last entry purges physically (the whole log is
    /// superseded, and the next append must carry `upto.index + 1`).
    pub fn set_raft_purged(&self, upto: StoredLogId) -> Result<()> {
        let past_end = self.read_state().last.is_none_or(|l| upto.index > l.index);
        if past_end {
            self.purge(upto)?;
        }
        let _m = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        let mut meta = self.lock_meta();
        if meta.raft_purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        let mut new = meta.clone();
        new.raft_purged = Some(upto);
        new.store(self.fs.as_ref(), &self.dir)?;
        *meta = new;
        Ok(())
    }

    /// Position of the first byte still on disk that belongs to a present
    /// entry (the end of the log when it is empty). Message positions below
    /// it were removed by retention.
    pub fn first_pos(&self) -> u64 {
        let st = self.read_state();
        if st.last.is_none() {
            return st.write_pos;
        }
        self.slot_in(&st, st.first_index).map(|s| s.pos).unwrap_or(st.write_pos)
    }

    /// The segment files holding entries up to and including `upto`, opened
    /// (an open file survives a later purge), for a snapshot transfer: the
    /// receiver gets byte-identical segments, so message positions recorded
    /// by the sender's ConsumeQueues are valid there.
    pub fn ship_upto(&self, upto: u64) -> Result<ShippedLog> {
        let _m = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        let st = self.read_state();
        Self::poisoned(&st)?;
        let end_pos = match st.last {
            Some(l) if upto >= st.first_index && upto <= l.index => self.slot(&st, upto)?.end(),
            Some(_) if upto + 1 == st.first_index => self.slot(&st, st.first_index)?.pos,
            None if st.next_index == Some(upto + 1) => st.write_pos,
            _ => {
                return Err(LogError::NotFound(format!(
                    "entry {upto} (the log holds {}..={:?})",
                    st.first_index,
                    st.last.map(|l| l.index)
                )));
            }
        };
        // A segment starting exactly at `end_pos` goes too, empty: the
        // receiver then continues writing at the same position.
        let segments = st
            .segments
            .values()
            .filter(|s| s.base <= end_pos)
            .map(|s| ShippedSegment {
                name: segment_name(s.base, s.size),
                size: s.size,
                send_len: end_pos.saturating_sub(s.base).min(s.size),
                file: s.file.clone(),
            })
            .collect();
        Ok(ShippedLog { purged: self.lock_meta().purged, end_pos, segments })
    }

    /// Replaces the whole log with the segment files in `incoming` (moved,
    /// not copied; same file system), whose entries up to `purged` are
    /// purged, and which end at `end_pos`. The vote is kept. Runs recovery over the new files, which
    /// checks every record's CRC. Used when installing a snapshot whose
    /// ConsumeQueues point into these exact bytes.
    ///
    /// Not crash-atomic: a crash part way leaves a log that may refuse to
    /// open; the node's data directory is then wiped and it re-syncs.
    pub fn replace_with(&self, incoming: &Path, purged: Option<StoredLogId>, end_pos: u64) -> Result<RecoveryReport> {
        let _m = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        let _s = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut st = self.write_state();
            Self::poisoned(&st)?;
            for (_, seg) in std::mem::take(&mut st.segments) {
                self.fs.remove_file(&seg.path).map_err(|e| LogError::io(&seg.path, e))?;
            }
            for (_, f) in std::mem::take(&mut st.index_files) {
                self.fs.remove_file(&f.path).map_err(|e| LogError::io(&f.path, e))?;
            }
            st.first_index = purged.map(|p| p.index + 1).unwrap_or(0);
            st.last = None;
            st.next_index = purged.map(|p| p.index + 1);
            st.write_pos = 0;
            st.dirty.clear();
            st.index_dirty.clear();
            st.unsynced_bytes = 0;
            st.synced_seq = st.append_seq;
        }
        self.fs.sync_dir(&self.index_dir).map_err(|e| LogError::io(&self.index_dir, e))?;
        {
            let mut meta = self.lock_meta();
            let mut new = meta.clone();
            new.purged = purged;
            new.raft_purged = None;
            new.checkpoint = None;
            new.committed = None;
            new.store(self.fs.as_ref(), &self.dir)?;
            *meta = new;
        }
        *self.pending_committed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let names = self.fs.list(incoming).map_err(|e| LogError::io(incoming, e))?;
        for name in names.iter().filter(|n| parse_segment_name(n).is_some()) {
            let to = self.data_dir.join(name);
            self.fs.rename(&incoming.join(name), &to).map_err(|e| LogError::io(&to, e))?;
        }
        self.fs.sync_dir(&self.data_dir).map_err(|e| LogError::io(&self.data_dir, e))?;
        let report = self.recover()?;
        {
            // Nothing shipped (every entry up to the snapshot purged, no
            // segment left): continue at the sender's position all the same.
            let mut st = self.write_state();
            if st.last.is_none() && st.segments.is_empty() {
                st.write_pos = end_pos;
            }
        }
        self.check_invariants();
        tracing::info!(?report, last = ?self.last_entry(), "log replaced by shipped segments");
        Ok(report)
    }

    /// Syncs everything and writes a checkpoint; the next open rescans nothing.
    pub fn close(self) -> Result<()> {
        self.checkpoint()
    }

    // ----------------------------------------------------------------------
    // Invariants

    /// Asserts the in-memory invariants (debug builds).
    pub fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let st = self.read_state();
        if let Some(l) = st.last {
            assert!(l.index >= st.first_index, "last {} < first {}", l.index, st.first_index);
            assert_eq!(st.next_index, Some(l.index + 1));
        }
        let mut prev: Option<&Segment> = None;
        for s in st.segments.values() {
            if let Some(p) = prev {
                assert_eq!(p.end(), s.base, "segments not contiguous");
            }
            prev = Some(s);
        }
        assert!(st.unsynced_bytes <= self.config.max_unsynced_bytes, "unsynced bytes over the bound");
        assert!(st.synced_seq <= st.append_seq);
        if let Some(seg) = Self::segment_for(&st, st.write_pos) {
            let off = (st.write_pos - seg.base) as usize;
            let probe = (off + HEADER_LEN).min(seg.size as usize);
            assert!(seg.bytes()[off..probe].iter().all(|&b| b == 0), "bytes past the end are not zero");
        }
    }
}

impl std::fmt::Debug for CommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.read_state();
        f.debug_struct("CommitLog")
            .field("dir", &self.dir)
            .field("first_index", &st.first_index)
            .field("last", &st.last)
            .field("write_pos", &st.write_pos)
            .field("segments", &st.segments.len())
            .finish()
    }
}

#[cfg(test)]
#[path = "log_tests.rs"]
pub(crate) mod tests;
