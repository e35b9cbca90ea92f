//! Snapshots of a broker group, on disk and on the wire.
//!
//! The log is the message store (the DLedger way), so a snapshot has two
//! parts:
//! - the state machine at the snapshot's last log id `L`: topics, consumer
//!   groups, every ConsumeQueue's records and the key index, written here as
//!   a directory under `state/snapshots/<snapshot_id>/`;
//! - the CommitLog segments holding the retained entries up to `L`. They are
//!   not copied into the directory: the sender opens the live segment files
//!   when it ships the snapshot ([`raft_log::CommitLog::ship_upto`]), and the
//!   receiver installs them byte for byte
//!   ([`raft_log::CommitLog::replace_with`]), so every position the
//!   ConsumeQueues record is valid on the receiver.
//!
//! A directory is complete once its `meta.bin` exists (written last, then
//! the directory is renamed into place). The newest complete one is the
//! current snapshot; older ones are removed, keeping one spare so a transfer
//! in progress can finish.
//!
//! Wire: [`TransferHeader`] in the first chunk, then the files as
//! `sm/<relative path>` and `log/<segment name>` chunks (see
//! [`crate::network`]).

use std::fs::File;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use raft_log::meta::StoredLogId;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::sm::GroupKey;
use crate::sm::GroupQueue;
use crate::sm::TopicConf;
use crate::types::LogId;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::Vote;

pub const META_FILE: &str = "meta.bin";
pub const STATE_FILE: &str = "state.bin";
pub const KEYS_FILE: &str = "keys.bin";
pub const CQ_DIR: &str = "cq";
/// In a received snapshot: the sender's [`TransferHeader`].
pub const HEADER_FILE: &str = "header.bin";
/// In a received snapshot: the state machine part (a snapshot directory).
pub const SM_PART: &str = "sm";
/// In a received snapshot: the shipped CommitLog segments.
pub const LOG_PART: &str = "log";

/// The handle openraft passes around: a directory. A snapshot built or kept
/// here holds the state machine part only; a received one holds `sm/`,
/// `log/` and `header.bin`.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    pub dir: PathBuf,
}

/// The state machine's tables at the snapshot's last log id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub topics: Vec<TopicConf>,
    #[serde(default)]
    pub group_confs: Vec<crate::command::GroupConf>,
    pub groups: Vec<(GroupKey, GroupQueue)>,
    /// (topic, queue, record count); the records are in `cq/<topic>/<queue>`.
    pub queues: Vec<(String, u32, u64)>,
    pub messages_applied: u64,
    /// The held tables' rows (delayed and half messages, dead-letter
    /// origins, consumers), as stored in RocksDB.
    #[serde(default)]
    pub held_rows: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Sent first in a snapshot transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferHeader {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    /// The sender's physical purge point; the receiver's log gets the same.
    pub log_purged: Option<StoredLogId>,
    /// Position just after entry `L` in the shipped segments.
    pub log_end_pos: u64,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("snapshot data encodes")
}

pub fn decode<T: DeserializeOwned>(what: &Path, b: &[u8]) -> io::Result<T> {
    rmp_serde::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", what.display())))
}

pub fn read_file<T: DeserializeOwned>(path: &Path) -> io::Result<T> {
    decode(path, &std::fs::read(path)?)
}

/// Writes and fsyncs a whole file.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Path of a queue's records inside a snapshot directory.
pub fn cq_path(dir: &Path, topic: &str, queue: u32) -> PathBuf {
    dir.join(CQ_DIR).join(topic).join(queue.to_string())
}

/// Writes key-index rows, each length-prefixed (u32 little endian).
pub struct KeyWriter {
    out: BufWriter<File>,
    pub rows: u64,
}

impl KeyWriter {
    pub fn create(dir: &Path) -> io::Result<Self> {
        Ok(KeyWriter { out: BufWriter::new(File::create(dir.join(KEYS_FILE))?), rows: 0 })
    }

    pub fn push(&mut self, row: &[u8]) -> io::Result<()> {
        self.out.write_all(&(row.len() as u32).to_le_bytes())?;
        self.out.write_all(row)?;
        self.rows += 1;
        Ok(())
    }

    pub fn finish(self) -> io::Result<()> {
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    }
}

/// Reads the rows [`KeyWriter`] wrote, calling `f` on each.
pub fn for_each_key(dir: &Path, mut f: impl FnMut(Vec<u8>) -> io::Result<()>) -> io::Result<u64> {
    let path = dir.join(KEYS_FILE);
    let mut r = BufReader::new(File::open(&path)?);
    let mut n = 0;
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(n),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > 64 << 10 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: a key row of {len} bytes", path.display()),
            ));
        }
        let mut row = vec![0u8; len];
        r.read_exact(&mut row)?;
        f(row)?;
        n += 1;
    }
}

/// Every file under `dir`, as (path relative to `dir` with `/` separators, path).
pub fn list_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("under dir").to_string_lossy().replace('\\', "/");
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Checks a relative path received from a peer: no `..`, not absolute.
pub fn safe_relative(rel: &str) -> io::Result<&Path> {
    let p = Path::new(rel);
    let ok =
        !rel.is_empty() && p.components().all(|c| matches!(c, std::path::Component::Normal(_))) && rel.len() < 1024;
    if ok {
        Ok(p)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad file name {rel:?} in a snapshot")))
    }
}

/// A snapshot's directory name: its last log id, sortable.
pub fn dir_name(meta: &SnapshotMeta) -> String {
    match meta.last_log_id {
        Some(l) => format!("{:020}-{}-{}", l.index, l.leader_id.term, l.leader_id.node_id),
        None => "none".into(),
    }
}

/// Snapshot directories under `root`.
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        // Leftovers of an interrupted build or transfer.
        for e in std::fs::read_dir(&root)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("tmp-") || name.starts_with("incoming-") {
                std::fs::remove_dir_all(e.path())?;
            }
        }
        Ok(Store { root })
    }

    /// A fresh directory for a snapshot being built or received.
    pub fn temp_dir(&self, kind: &str) -> io::Result<PathBuf> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let d = self.root.join(format!("{kind}-{nanos}"));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// The newest complete snapshot.
    pub fn current(&self) -> io::Result<Option<(SnapshotMeta, PathBuf)>> {
        let mut best: Option<(SnapshotMeta, PathBuf)> = None;
        for e in std::fs::read_dir(&self.root)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("tmp-") || name.starts_with("incoming-") || !e.file_type()?.is_dir() {
                continue;
            }
            let meta_path = e.path().join(META_FILE);
            if !meta_path.exists() {
                continue;
            }
            let meta: SnapshotMeta = read_file(&meta_path)?;
            if best.as_ref().is_none_or(|(b, _)| meta.last_log_id > b.last_log_id) {
                best = Some((meta, e.path()));
            }
        }
        Ok(best)
    }

    /// Seals a filled directory as snapshot `meta`: writes `meta.bin` last,
    /// renames it into place, and removes all but the newest two.
    pub fn seal(&self, filled: &Path, meta: &SnapshotMeta) -> io::Result<PathBuf> {
        write_file(&filled.join(META_FILE), &encode(meta))?;
        sync_dir(filled)?;
        let dest = self.root.join(dir_name(meta));
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::rename(filled, &dest)?;
        sync_dir(&self.root)?;
        self.prune(2)?;
        Ok(dest)
    }

    fn prune(&self, keep: usize) -> io::Result<()> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(&self.root)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("tmp-") || name.starts_with("incoming-") {
                continue;
            }
            match read_file::<SnapshotMeta>(&e.path().join(META_FILE)) {
                Ok(m) => all.push((m.last_log_id, e.path())),
                Err(_) => all.push((None, e.path())),
            }
        }
        all.sort_by_key(|b| std::cmp::Reverse(b.0));
        for (_, p) in all.into_iter().skip(keep) {
            std::fs::remove_dir_all(&p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_and_paths_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let mut w = KeyWriter::create(d.path()).unwrap();
        w.push(b"k/a\0b").unwrap();
        w.push(b"").unwrap();
        w.finish().unwrap();
        let mut got = Vec::new();
        assert_eq!(
            for_each_key(d.path(), |r| {
                got.push(r);
                Ok(())
            })
            .unwrap(),
            2
        );
        assert_eq!(got, vec![b"k/a\0b".to_vec(), Vec::new()]);
        assert!(safe_relative("cq/t/0").is_ok());
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("").is_err());
    }

    #[test]
    fn newest_sealed_snapshot_is_current() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path().to_path_buf()).unwrap();
        assert!(store.current().unwrap().is_none());
        let mk = |index: u64| {
            let t = store.temp_dir("tmp").unwrap();
            let meta = SnapshotMeta {
                last_log_id: Some(LogId::new(raft_log::store::AdvLeaderId { term: 1, node_id: 1 }, index)),
                last_membership: Default::default(),
            };
            store.seal(&t, &meta).unwrap();
        };
        mk(5);
        mk(9);
        mk(7);
        let (meta, _) = store.current().unwrap().unwrap();
        assert_eq!(meta.last_log_id.unwrap().index, 9);
        // Two kept.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
        // An unsealed directory is ignored and removed on the next start.
        store.temp_dir("tmp").unwrap();
        assert_eq!(store.current().unwrap().unwrap().0.last_log_id.unwrap().index, 9);
        Store::new(d.path().to_path_buf()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }
}
