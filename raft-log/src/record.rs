//! The on-disk formats: data records and index slots. Little-endian.
//!
//! Data record (52-byte header, then the body):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `RMQL` (0x4C514D52 read as u32 LE) |
//! | 4 | 4 | body length |
//! | 8 | 8 | Raft index |
//! | 16 | 8 | term |
//! | 24 | 8 | leader node id (openraft's committed leader id is term + node) |
//! | 32 | 8 | position: the record's own byte offset in the whole log |
//! | 40 | 1 | kind: 0 blank, 1 normal, 2 membership |
//! | 41 | 7 | zero |
//! | 48 | 4 | CRC32C of bytes 0..48 followed by the body |
//!
//! A segment ends where the next record would not fit; a 4-byte pad magic
//! `RMQP` marks the end when there is room for it.
//!
//! Index slot (32 bytes), slot `i % slots_per_file` of index file `i / slots_per_file`:
//! position u64 | term u64 | index u64 | record length u32 | CRC32C of bytes 0..28.

/// Magic of a data record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RMQL");
/// Magic of the pad that ends a segment early.
pub const PAD_MAGIC: u32 = u32::from_le_bytes(*b"RMQP");
/// Size of a record header.
pub const HEADER_LEN: usize = 52;
/// Size of an index slot.
pub const SLOT_LEN: usize = 32;

/// What a log entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// openraft's blank entry (a new leader's first entry).
    Blank = 0,
    /// Application data: for RaftMQ, a broker command such as a message batch.
    Normal = 1,
    /// A membership change (JSON-encoded openraft `Membership`).
    Membership = 2,
}

impl EntryKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Blank),
            1 => Some(Self::Normal),
            2 => Some(Self::Membership),
            _ => None,
        }
    }
}

/// A record's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub body_len: u32,
    pub index: u64,
    pub term: u64,
    pub leader_node: u64,
    pub pos: u64,
    pub kind: EntryKind,
}

impl RecordHeader {
    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.body_len)
    }
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a header or than the declared body.
    Short,
    /// All-zero magic: unwritten space.
    Zero,
    /// The pad magic.
    Pad,
    /// Anything else: wrong magic, bad kind, CRC mismatch.
    Bad(String),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Appends one record to `out`.
pub fn encode_record(out: &mut Vec<u8>, h: &RecordHeader, body: &[u8]) {
    debug_assert_eq!(h.body_len as usize, body.len());
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&h.body_len.to_le_bytes());
    out.extend_from_slice(&h.index.to_le_bytes());
    out.extend_from_slice(&h.term.to_le_bytes());
    out.extend_from_slice(&h.leader_node.to_le_bytes());
    out.extend_from_slice(&h.pos.to_le_bytes());
    out.push(h.kind as u8);
    out.extend_from_slice(&[0u8; 7]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 48]), body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    debug_assert_eq!(out.len() - start, HEADER_LEN + body.len());
}

/// Parses and checks the header at the start of `b` without the body CRC.
pub fn decode_header(b: &[u8]) -> Result<RecordHeader, DecodeError> {
    if b.len() < 4 {
        return Err(DecodeError::Short);
    }
    match u32_at(b, 0) {
        0 => return Err(DecodeError::Zero),
        PAD_MAGIC => return Err(DecodeError::Pad),
        RECORD_MAGIC => {}
        m => return Err(DecodeError::Bad(format!("bad magic {m:#010x}"))),
    }
    if b.len() < HEADER_LEN {
        return Err(DecodeError::Short);
    }
    let kind = EntryKind::from_u8(b[40]).ok_or_else(|| DecodeError::Bad(format!("bad kind {}", b[40])))?;
    if b[41..48].iter().any(|&x| x != 0) {
        return Err(DecodeError::Bad("nonzero reserved bytes".into()));
    }
    Ok(RecordHeader {
        body_len: u32_at(b, 4),
        index: u64_at(b, 8),
        term: u64_at(b, 16),
        leader_node: u64_at(b, 24),
        pos: u64_at(b, 32),
        kind,
    })
}

/// Parses the record at the start of `b` and verifies its CRC.
pub fn decode_record(b: &[u8]) -> Result<RecordHeader, DecodeError> {
    let h = decode_header(b)?;
    let total = h.record_len() as usize;
    if b.len() < total {
        return Err(DecodeError::Short);
    }
    let stored = u32_at(b, 48);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..48]), &b[HEADER_LEN..total]);
    if crc != stored {
        return Err(DecodeError::Bad(format!("CRC mismatch: stored {stored:#010x}, computed {crc:#010x}")));
    }
    Ok(h)
}

/// An index slot: where entry `index` lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub pos: u64,
    pub term: u64,
    pub index: u64,
    pub len: u32,
}

impl Slot {
    pub fn encode(&self) -> [u8; SLOT_LEN] {
        let mut b = [0u8; SLOT_LEN];
        b[0..8].copy_from_slice(&self.pos.to_le_bytes());
        b[8..16].copy_from_slice(&self.term.to_le_bytes());
        b[16..24].copy_from_slice(&self.index.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` if the slot is empty or damaged.
    pub fn decode(b: &[u8]) -> Option<Slot> {
        if b.len() < SLOT_LEN || crc32c::crc32c(&b[..28]) != u32_at(b, 28) {
            return None;
        }
        Some(Slot { pos: u64_at(b, 0), term: u64_at(b, 8), index: u64_at(b, 16), len: u32_at(b, 24) })
    }

    pub fn end(&self) -> u64 {
        self.pos + u64::from(self.len)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header(body: &[u8]) -> RecordHeader {
        RecordHeader {
            body_len: body.len() as u32,
            index: 7,
            term: 3,
            leader_node: 2,
            pos: 4096,
            kind: EntryKind::Normal,
        }
    }

    #[test]
    fn record_roundtrip_and_layout() {
        let body = b"hello";
        let mut out = Vec::new();
        encode_record(&mut out, &header(body), body);
        assert_eq!(out.len(), HEADER_LEN + 5);
        assert_eq!(&out[0..4], b"RMQL");
        assert_eq!(decode_record(&out).unwrap(), header(body));
        assert_eq!(&out[HEADER_LEN..], body);
    }

    #[test]
    fn zero_and_pad_are_recognised() {
        assert_eq!(decode_header(&[0u8; 64]), Err(DecodeError::Zero));
        let mut pad = vec![0u8; 64];
        pad[..4].copy_from_slice(&PAD_MAGIC.to_le_bytes());
        assert_eq!(decode_header(&pad), Err(DecodeError::Pad));
    }

    #[test]
    fn truncated_record_is_short() {
        let body = vec![1u8; 100];
        let mut out = Vec::new();
        encode_record(&mut out, &header(&body), &body);
        assert_eq!(decode_record(&out[..out.len() - 1]), Err(DecodeError::Short));
    }

    #[test]
    fn slot_roundtrip_and_empty_slot() {
        let s = Slot { pos: 1, term: 2, index: 3, len: 4 };
        assert_eq!(Slot::decode(&s.encode()), Some(s));
        assert_eq!(Slot::decode(&[0u8; SLOT_LEN]), None);
    }

    proptest! {
        /// Any single flipped bit in a record is detected.
        #[test]
        fn any_bit_flip_is_detected(body in proptest::collection::vec(any::<u8>(), 0..300), bit in 0usize..(8 * 400)) {
            let mut out = Vec::new();
            encode_record(&mut out, &header(&body), &body);
            let bit = bit % (out.len() * 8);
            out[bit / 8] ^= 1 << (bit % 8);
            let decoded = decode_record(&out);
            // A flip in the body-length field may make the record look short; never valid.
            prop_assert!(decoded.is_err(), "flip at bit {} went undetected", bit);
        }
    }
}
