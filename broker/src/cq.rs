//! ConsumeQueue: per (topic, queue), fixed 20-byte records, one per message:
//! CommitLog position u64 | size u32 | tag hash u64 (little-endian), in
//! preallocated files of `RECORDS_PER_FILE` records, written with `pwrite`,
//! read through read-only maps. Derived data: written only when a committed
//! entry is applied, rebuilt by re-applying the log.

use std::collections::BTreeMap;
use std::fs::File;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::BrokerError;
use crate::error::Result;

pub const RECORD_LEN: usize = 20;
/// Records per file: 65536 (1.25 MiB files).
pub const RECORDS_PER_FILE: u64 = 1 << 16;

/// One ConsumeQueue record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqRecord {
    pub pos: u64,
    pub size: u32,
    pub tag_hash: u64,
}

impl CqRecord {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..8].copy_from_slice(&self.pos.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b[12..20].copy_from_slice(&self.tag_hash.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        CqRecord {
            pos: u64::from_le_bytes(b[0..8].try_into().expect("8")),
            size: u32::from_le_bytes(b[8..12].try_into().expect("4")),
            tag_hash: u64::from_le_bytes(b[12..20].try_into().expect("8")),
        }
    }
}

/// FNV-1a of a tag: stable across versions and platforms.
pub fn tag_hash(tag: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

struct CqFile {
    file: Arc<File>,
    map: Mmap,
}

pub struct ConsumeQueue {
    dir: PathBuf,
    files: BTreeMap<u64, CqFile>,
    max_offset: u64,
    /// Files written since the last sync.
    dirty: Vec<Arc<File>>,
}

impl ConsumeQueue {
    /// Opens the queue's directory; `max_offset` is the number of records the
    /// state says are valid (records past it are stale and get overwritten).
    pub fn open(dir: &Path, max_offset: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            let Some(no) = name.strip_suffix(".cq").and_then(|n| n.parse::<u64>().ok()) else { continue };
            files.insert(no, Self::open_file(&e.path())?);
        }
        let q = ConsumeQueue { dir: dir.to_path_buf(), files, max_offset, dirty: Vec::new() };
        // Every record the state counts must be there.
        if max_offset > 0 {
            let last = max_offset - 1;
            if q.get_unchecked(last).is_none_or(|r| r.size == 0) {
                return Err(BrokerError::Corrupt(format!(
                    "consume queue {} lacks record {last} that the state counts",
                    dir.display()
                )));
            }
        }
        Ok(q)
    }

    fn open_file(path: &Path) -> Result<CqFile> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let want = RECORDS_PER_FILE * RECORD_LEN as u64;
        if file.metadata()?.len() < want {
            file.set_len(want)?;
        }
        // SAFETY: the file is never shrunk while mapped.
        let map = unsafe { Mmap::map(&file)? };
        Ok(CqFile { file: Arc::new(file), map })
    }

    pub fn max_offset(&self) -> u64 {
        self.max_offset
    }

    fn get_unchecked(&self, offset: u64) -> Option<CqRecord> {
        let f = self.files.get(&(offset / RECORDS_PER_FILE))?;
        let at = (offset % RECORDS_PER_FILE) as usize * RECORD_LEN;
        Some(CqRecord::decode(&f.map[at..at + RECORD_LEN]))
    }

    /// The record at `offset`, if the queue holds it.
    pub fn get(&self, offset: u64) -> Option<CqRecord> {
        if offset >= self.max_offset {
            return None;
        }
        self.get_unchecked(offset)
    }

    /// Appends records at `max_offset` (one `pwrite` per file touched).
    pub fn append(&mut self, records: &[CqRecord]) -> Result<()> {
        let mut i = 0;
        while i < records.len() {
            let offset = self.max_offset + i as u64;
            let no = offset / RECORDS_PER_FILE;
            let room = (RECORDS_PER_FILE - offset % RECORDS_PER_FILE) as usize;
            let n = room.min(records.len() - i);
            if !self.files.contains_key(&no) {
                let f = Self::open_file(&self.dir.join(format!("{no:020}.cq")))?;
                self.files.insert(no, f);
            }
            let f = &self.files[&no];
            let mut buf = Vec::with_capacity(n * RECORD_LEN);
            for r in &records[i..i + n] {
                debug_assert!(r.size > 0, "a record has a size");
                buf.extend_from_slice(&r.encode());
            }
            f.file.write_all_at(&buf, (offset % RECORDS_PER_FILE) * RECORD_LEN as u64)?;
            if !self.dirty.iter().any(|d| Arc::ptr_eq(d, &f.file)) {
                self.dirty.push(f.file.clone());
            }
            i += n;
        }
        self.max_offset += records.len() as u64;
        Ok(())
    }

    /// The encoded records `0..max_offset`, for a snapshot.
    pub fn raw_records(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.max_offset as usize * RECORD_LEN);
        let mut offset = 0;
        while offset < self.max_offset {
            let no = offset / RECORDS_PER_FILE;
            let n = (RECORDS_PER_FILE - offset % RECORDS_PER_FILE).min(self.max_offset - offset);
            let f = self.files.get(&no).expect("every counted record has its file");
            let at = (offset % RECORDS_PER_FILE) as usize * RECORD_LEN;
            out.extend_from_slice(&f.map[at..at + n as usize * RECORD_LEN]);
            offset += n;
        }
        out
    }

    /// Appends encoded records (as [`raw_records`](Self::raw_records) gives them).
    pub fn append_raw(&mut self, raw: &[u8]) -> Result<()> {
        if raw.len() % RECORD_LEN != 0 {
            return Err(BrokerError::Corrupt(format!("{} bytes of records is not whole records", raw.len())));
        }
        for chunk in raw.chunks(RECORD_LEN * 4096) {
            let records: Vec<CqRecord> = chunk.chunks_exact(RECORD_LEN).map(CqRecord::decode).collect();
            if records.iter().any(|r| r.size == 0) {
                return Err(BrokerError::Corrupt("an empty record in a snapshot's consume queue".into()));
            }
            self.append(&records)?;
        }
        Ok(())
    }

    /// The first offset whose message starts at or after `min_pos` (records
    /// before it point at bytes retention removed). Positions grow with
    /// offsets, so this is a binary search.
    pub fn first_offset_at_or_after(&self, min_pos: u64) -> u64 {
        let (mut lo, mut hi) = (0, self.max_offset);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.get_unchecked(mid).is_some_and(|r| r.pos >= min_pos) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// Takes the files written since the last call, to fsync outside locks.
    pub fn take_dirty(&mut self) -> Vec<Arc<File>> {
        std::mem::take(&mut self.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_get_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = ConsumeQueue::open(dir.path(), 0).unwrap();
        let recs: Vec<CqRecord> =
            (0..(RECORDS_PER_FILE + 10)).map(|i| CqRecord { pos: i * 100, size: 50, tag_hash: i }).collect();
        q.append(&recs).unwrap();
        assert_eq!(q.max_offset(), RECORDS_PER_FILE + 10);
        assert_eq!(q.get(RECORDS_PER_FILE + 3).unwrap().pos, (RECORDS_PER_FILE + 3) * 100);
        assert!(q.get(RECORDS_PER_FILE + 10).is_none());
        drop(q);
        let q = ConsumeQueue::open(dir.path(), RECORDS_PER_FILE + 10).unwrap();
        assert_eq!(q.get(5).unwrap(), CqRecord { pos: 500, size: 50, tag_hash: 5 });
        // The state claiming more records than stored is corruption.
        assert!(ConsumeQueue::open(dir.path(), 3 * RECORDS_PER_FILE).is_err());
    }

    #[test]
    fn raw_roundtrip_and_first_offset_search() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = ConsumeQueue::open(&dir.path().join("a"), 0).unwrap();
        let recs: Vec<CqRecord> =
            (0..70_000u64).map(|i| CqRecord { pos: 100 + i * 10, size: 7, tag_hash: i }).collect();
        q.append(&recs).unwrap();
        let raw = q.raw_records();
        assert_eq!(raw.len(), 70_000 * RECORD_LEN);
        let mut copy = ConsumeQueue::open(&dir.path().join("b"), 0).unwrap();
        copy.append_raw(&raw).unwrap();
        assert_eq!(copy.max_offset(), 70_000);
        assert_eq!(copy.get(65_537), q.get(65_537));
        assert_eq!(q.first_offset_at_or_after(0), 0);
        assert_eq!(q.first_offset_at_or_after(105), 1);
        assert_eq!(q.first_offset_at_or_after(110), 1);
        assert_eq!(q.first_offset_at_or_after(100 + 69_999 * 10 + 1), 70_000);
        assert!(copy.append_raw(&raw[..7]).is_err());
    }

    #[test]
    fn tag_hash_is_stable() {
        assert_eq!(tag_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(tag_hash("a"), tag_hash("b"));
    }
}
