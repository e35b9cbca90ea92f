//! A fault-injecting [`FileSystem`] over the real one, for tests and the
//! fault-injection suite.
//!
//! It remembers, per file, the bytes every unsynced write replaced. Then:
//! - [`FaultFs::crash`] with [`CrashMode::LoseUnsynced`] puts them back: the
//!   files look as a power loss leaves them (everything not fdatasynced gone);
//! - [`CrashMode::TearLastWrite`] does the same but keeps a prefix of the last
//!   write, as a write torn by the power loss;
//! - [`FaultFs::set_enospc`] makes writes and allocations fail with ENOSPC
//!   after a byte budget (a partial write lands first, as on a real disk);
//! - [`FaultFs::set_fail_sync`] makes fdatasync fail with EIO;
//! - [`FaultFs::set_disk_usage`] overrides what the disk reports, for retention.
//!
//! Byte flips and truncations of stored files need no help from this layer:
//! [`flip_byte`] and [`truncate_file`] change files directly.
//!
//! Removals and renames are not undone by a crash (the log fsyncs the
//! directory right after each), and files created since the last directory
//! sync are removed by a crash.

use std::collections::HashMap;
use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::SystemTime;

use memmap2::Mmap;

use crate::fs::DiskUsage;
use crate::fs::FileSystem;
use crate::fs::FsFile;
use crate::fs::StdFile;
use crate::fs::StdFs;

/// What a simulated power loss keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every write not covered by a later fdatasync of its file is lost.
    LoseUnsynced,
    /// Like `LoseUnsynced`, but the first `keep_bytes` bytes of the last
    /// unsynced write to a file whose name ends with `suffix` survive (for
    /// the log: `".seg"` tears entry data, `".idx"` an index write).
    TearLastWrite { keep_bytes: usize, suffix: &'static str },
}

#[derive(Debug)]
enum Undo {
    /// Bytes at `offset` before a write.
    Bytes { offset: u64, old: Vec<u8> },
    /// The file's length before it grew.
    Len(u64),
}

#[derive(Debug, Default)]
struct State {
    /// Per path: undo records of writes since the last sync, oldest first.
    undo: HashMap<PathBuf, Vec<Undo>>,
    /// The newest unsynced writes (path, offset, length), at most
    /// `RECENT_WRITES`, oldest first.
    recent_writes: Vec<(PathBuf, u64, usize)>,
    /// Files created since their directory was last synced.
    created: HashSet<PathBuf>,
    /// Bytes that may still be written before ENOSPC; `None`: unlimited.
    enospc_budget: Option<u64>,
    fail_sync: bool,
    disk_usage: Option<DiskUsage>,
    syncs: u64,
    writes: u64,
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct FaultFs {
    state: Arc<Mutex<State>>,
}

struct FaultFile {
    inner: StdFile,
    state: Arc<Mutex<State>>,
}

/// How many recent unsynced writes are remembered for tearing.
const RECENT_WRITES: usize = 64;

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl FaultFs {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After `budget` more bytes, writes and allocations fail with ENOSPC.
    /// `None` lifts the limit.
    pub fn set_enospc(&self, budget: Option<u64>) {
        self.lock().enospc_budget = budget;
    }

    /// Makes every fdatasync fail with EIO while `fail` holds.
    pub fn set_fail_sync(&self, fail: bool) {
        self.lock().fail_sync = fail;
    }

    /// Overrides the disk usage reported for every path.
    pub fn set_disk_usage(&self, usage: Option<DiskUsage>) {
        self.lock().disk_usage = usage;
    }

    /// Number of successful fdatasync calls on files so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// Number of write calls so far.
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }

    /// Number of files with writes not yet covered by an fdatasync.
    pub fn unsynced_files(&self) -> usize {
        self.lock().undo.values().filter(|u| !u.is_empty()).count()
    }

    /// Simulates a power loss: rewrites the files as the disk would hold them.
    /// Call it after the log using this file system is dropped.
    pub fn crash(&self, mode: CrashMode) -> io::Result<()> {
        let mut st = self.lock();
        let recent = std::mem::take(&mut st.recent_writes);
        let last = match mode {
            CrashMode::TearLastWrite { suffix, .. } => {
                recent.iter().rev().find(|(p, _, _)| p.to_string_lossy().ends_with(suffix)).cloned()
            }
            CrashMode::LoseUnsynced => None,
        };
        let torn_prefix = match (mode, &last) {
            (CrashMode::TearLastWrite { keep_bytes, .. }, Some((path, offset, len))) if path.exists() => {
                let keep = keep_bytes.min(*len);
                let f = StdFile::open(path, false)?;
                let mut buf = vec![0u8; keep];
                f.read_exact_at(&mut buf, *offset)?;
                Some((path.clone(), *offset, buf))
            }
            _ => None,
        };
        for (path, undos) in st.undo.drain() {
            if undos.is_empty() || !path.exists() {
                continue;
            }
            let f = StdFile::open(&path, false)?;
            for undo in undos.into_iter().rev() {
                match undo {
                    Undo::Bytes { offset, old } => f.file().write_all_at_compat(&old, offset)?,
                    Undo::Len(len) => f.file().set_len(len)?,
                }
            }
        }
        if let Some((path, offset, bytes)) = torn_prefix {
            if path.exists() {
                let f = StdFile::open(&path, false)?;
                f.write_all_at(&bytes, offset)?;
            }
        }
        for path in st.created.drain() {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }
}

/// `FileExt::write_all_at` under a name that does not clash with `FsFile`.
trait WriteAtCompat {
    fn write_all_at_compat(&self, buf: &[u8], offset: u64) -> io::Result<()>;
}

impl WriteAtCompat for std::fs::File {
    fn write_all_at_compat(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
}

impl FaultFile {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the bytes `[offset, offset + len)` hold now, and the length if
    /// the write grows the file.
    fn remember(&self, st: &mut State, offset: u64, len: usize) -> io::Result<()> {
        let file_len = self.inner.len()?;
        let undos = st.undo.entry(self.inner.path().to_path_buf()).or_default();
        let end = offset + len as u64;
        if end > file_len {
            undos.push(Undo::Len(file_len));
        }
        if offset < file_len {
            let n = (file_len.min(end) - offset) as usize;
            let mut old = vec![0u8; n];
            self.inner.read_exact_at(&mut old, offset)?;
            undos.push(Undo::Bytes { offset, old });
        }
        Ok(())
    }
}

impl FsFile for FaultFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.writes += 1;
        let allowed = match st.enospc_budget {
            Some(budget) => budget.min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        self.remember(&mut st, offset, allowed)?;
        self.inner.write_all_at(&buf[..allowed], offset)?;
        if st.recent_writes.len() == RECENT_WRITES {
            st.recent_writes.remove(0);
        }
        st.recent_writes.push((self.inner.path().to_path_buf(), offset, allowed));
        if let Some(budget) = st.enospc_budget.as_mut() {
            *budget -= allowed as u64;
        }
        if allowed < buf.len() { Err(enospc()) } else { Ok(()) }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.lock();
        if st.fail_sync {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync_data()?;
        st.syncs += 1;
        st.undo.remove(self.inner.path());
        let path = self.inner.path();
        st.recent_writes.retain(|(p, _, _)| p != path);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let cur = self.inner.len()?;
        if len > cur {
            if let Some(budget) = st.enospc_budget {
                if budget < len - cur {
                    return Err(enospc());
                }
                st.enospc_budget = Some(budget - (len - cur));
            }
            st.undo.entry(self.inner.path().to_path_buf()).or_default().push(Undo::Len(cur));
        }
        self.inner.allocate(len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        self.remember(&mut st, offset, len as usize)?;
        self.inner.zero_range(offset, len)
    }

    fn map(&self) -> io::Result<Mmap> {
        self.inner.map()
    }
}

impl FileSystem for FaultFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        StdFs.create_dir_all(path)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FsFile>> {
        let existed = path.exists();
        let inner = StdFile::open(path, create)?;
        if !existed {
            self.lock().created.insert(path.to_path_buf());
        }
        Ok(Arc::new(FaultFile { inner, state: self.state.clone() }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.undo.remove(path);
        st.created.remove(path);
        st.recent_writes.retain(|(p, _, _)| p != path);
        StdFs.remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(u) = st.undo.remove(from) {
            st.undo.insert(to.to_path_buf(), u);
        }
        for w in st.recent_writes.iter_mut().filter(|(p, _, _)| p == from) {
            w.0 = to.to_path_buf();
        }
        if st.created.remove(from) {
            st.created.insert(to.to_path_buf());
        }
        StdFs.rename(from, to)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        if st.fail_sync {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        st.created.retain(|p| p.parent() != Some(dir));
        StdFs.sync_dir(dir)
    }

    fn exists(&self, path: &Path) -> bool {
        StdFs.exists(path)
    }

    fn modified(&self, path: &Path) -> io::Result<SystemTime> {
        StdFs.modified(path)
    }

    fn disk_usage(&self, path: &Path) -> io::Result<DiskUsage> {
        match self.lock().disk_usage {
            Some(u) => Ok(u),
            None => StdFs.disk_usage(path),
        }
    }
}

/// Flips every bit of the byte at `offset` of a file (bypassing any log).
pub fn flip_byte(path: &Path, offset: u64) -> io::Result<()> {
    let f = StdFile::open(path, false)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)?;
    b[0] ^= 0xFF;
    f.write_all_at(&b, offset)?;
    f.sync_data()
}

/// Cuts a file to `len` bytes (bypassing any log).
pub fn truncate_file(path: &Path, len: u64) -> io::Result<()> {
    let f = StdFile::open(path, false)?;
    f.file().set_len(len)?;
    f.sync_data()
}
