//! [`MappedSlice`]: bytes of the log handed out without copying.

use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::Mmap;

/// A range of a read-only file mapping. Holding it keeps the mapping alive,
/// also after its segment is deleted (the kernel keeps unlinked mapped files).
///
/// Zero-copy slices are meant for committed data, which is never rewritten.
/// Entries that may still be truncated (openraft's log reads) are copied once
/// with [`MappedSlice::to_bytes`].
#[derive(Clone)]
pub struct MappedSlice {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl MappedSlice {
    pub(crate) fn new(map: Arc<Mmap>, start: usize, len: usize) -> Self {
        assert!(start + len <= map.len(), "slice {start}+{len} past a mapping of {}", map.len());
        Self { map, start, len }
    }

    /// Copies the bytes out (the one copy).
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self)
    }

    /// Wraps the slice as `Bytes` without copying.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for MappedSlice {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for MappedSlice {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for MappedSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedSlice({} bytes at {})", self.len, self.start)
    }
}
