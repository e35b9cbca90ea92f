//! The file-system boundary. All file I/O of the log goes through
//! [`FileSystem`] and [`FsFile`] so tests can inject faults ([`crate::fault`]).
//! Reads of entry data go through read-only memory maps of the same files.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use memmap2::Mmap;

/// Space on the file system holding a path. `total_bytes` is what this
/// process can use: used plus available (reserved blocks excluded, as df does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl DiskUsage {
    /// Share of the disk in use, in [0, 1].
    pub fn used_ratio(&self) -> f64 {
        if self.total_bytes == 0 {
            return 0.0;
        }
        1.0 - (self.available_bytes as f64 / self.total_bytes as f64)
    }
}

/// An open file. Methods take `&self` so one handle can be shared between the
/// writer and the flusher thread.
pub trait FsFile: Send + Sync + 'static {
    fn path(&self) -> &Path;
    /// Writes all of `buf` at `offset` (pwrite).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset` (pread).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Reserves blocks so the file is at least `len` bytes long (posix_fallocate).
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros without changing the length.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Maps the whole file read-only.
    fn map(&self) -> io::Result<Mmap>;
}

/// The directory operations the log needs.
pub trait FileSystem: Send + Sync + 'static {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Opens a file for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FsFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// File names (not paths) in a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// fsync of a directory, making creations, renames and removals durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Last modification time of a file.
    fn modified(&self, path: &Path) -> io::Result<SystemTime>;
    fn disk_usage(&self, path: &Path) -> io::Result<DiskUsage>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

/// A real file.
#[derive(Debug)]
pub struct StdFile {
    path: PathBuf,
    file: File,
}

impl StdFile {
    pub fn open(path: &Path, create: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl FsFile for StdFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain syscall on an fd we own.
        let ret = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), 0, len) };
        match ret {
            0 => Ok(()),
            // File systems without fallocate: extend the file (sparse) instead.
            libc::EOPNOTSUPP | libc::EINVAL => self.file.set_len(self.len()?.max(len as u64)),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on an fd we own.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if cvt(ret).is_ok() {
            return Ok(());
        }
        // Fallback: write zeros, at most 1 MiB at a time.
        let chunk = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn map(&self) -> io::Result<Mmap> {
        // SAFETY: the log never shrinks a mapped file (segments are only ever
        // deleted whole, and a deleted file stays mapped until unmapped), so
        // the mapping cannot be invalidated under a reader.
        unsafe { Mmap::map(&self.file) }
    }
}

impl FileSystem for StdFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FsFile>> {
        Ok(Arc::new(StdFile::open(path, create)?))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn modified(&self, path: &Path) -> io::Result<SystemTime> {
        std::fs::metadata(path)?.modified()
    }

    fn disk_usage(&self, path: &Path) -> io::Result<DiskUsage> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: statvfs writes into the zeroed struct we pass.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
        let frsize = st.f_frsize as u64;
        // As df counts: blocks reserved for root are neither used nor
        // available to us, so "total" is used + available.
        let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64);
        let available = st.f_bavail as u64;
        Ok(DiskUsage { total_bytes: (used + available) * frsize, available_bytes: available * frsize })
    }
}

/// Reads a whole small file.
pub(crate) fn read_small(fs: &dyn FileSystem, path: &Path) -> io::Result<Vec<u8>> {
    let f = fs.open(path, false)?;
    let len = f.len()?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Replaces a small file atomically and durably: write a temporary file,
/// fdatasync it, rename it over the target, fsync the directory.
pub(crate) fn write_atomic(fs: &dyn FileSystem, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    if fs.exists(&tmp) {
        fs.remove_file(&tmp)?;
    }
    let f = fs.open(&tmp, true)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()?;
    drop(f);
    fs.rename(&tmp, &dir.join(name))?;
    fs.sync_dir(dir)
}
