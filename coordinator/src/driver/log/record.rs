//! The byte framing of the command log's segment files, and a streaming reader for them.
//!
//! A segment is a 20-byte header, `IROWAL` + format `u16` + first entry index `u64` + CRC-32 of those
//! 16 bytes, then records. A record is `[len u32][crc32 u32][body]`, the CRC over the body, and the
//! body is `[kind u8][first index u64][count u32][payload]`; little endian throughout. One record holds
//! one group-commit batch, so a batch torn by a crash (its pages reached disk in any order before the
//! fsync) fails its one checksum and is dropped whole, and a good record after a bad one proves the bad
//! one is not a tear. The CRC is crc32fast's CRC-32 (IEEE): already in the dependency tree, and as
//! strong as CRC-32C at catching torn writes and flipped bits in records this small.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::state::Command;

pub(super) const SEGMENT_MAGIC: &[u8; 6] = b"IROWAL";
pub(super) const SEGMENT_HEADER: usize = 20;
const RECORD_HEADER: usize = 8;
const BODY_PREFIX: usize = 13;
/// A batch is at most a few hundred commands of bounded size; a longer length is a damaged length
/// field, and refusing it keeps a corrupt length from allocating without bound.
const MAX_BODY: u32 = 64 << 20;

/// What a record holds. Raft will add its HardState as another kind (review B3), so readers refuse kinds
/// they do not know rather than guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Kind {
    /// `count` commands, each serde_json encoded and ended by a newline (JSON escapes every newline
    /// inside a string, so the split is exact).
    Entries = 1,
}

pub(super) fn segment_header(format: u16, first_index: u64) -> [u8; SEGMENT_HEADER] {
    let mut header = [0u8; SEGMENT_HEADER];
    header[..6].copy_from_slice(SEGMENT_MAGIC);
    header[6..8].copy_from_slice(&format.to_le_bytes());
    header[8..16].copy_from_slice(&first_index.to_le_bytes());
    let crc = crc32fast::hash(&header[..16]);
    header[16..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The first entry index a segment header names, or why it is not a header of this format.
pub(super) fn parse_segment_header(format: u16, header: &[u8]) -> Result<u64, String> {
    if header.len() < SEGMENT_HEADER {
        return Err(format!("the segment header is cut short ({} of {SEGMENT_HEADER} bytes)", header.len()));
    }
    if &header[..6] != SEGMENT_MAGIC {
        return Err("not a command log segment (bad magic)".into());
    }
    if crc32fast::hash(&header[..16]).to_le_bytes() != header[16..SEGMENT_HEADER] {
        return Err("the segment header fails its checksum".into());
    }
    let found = u16::from_le_bytes([header[6], header[7]]);
    if found != format {
        return Err(format!("segment format {found}, this build reads format {format}"));
    }
    Ok(u64::from_le_bytes(header[8..16].try_into().unwrap_or_default()))
}

/// Appends one framed record of `commands`, numbered from `first_index`, to `buf`.
pub(super) fn encode_entries(buf: &mut Vec<u8>, first_index: u64, commands: &[Command]) -> serde_json::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_HEADER]);
    buf.push(Kind::Entries as u8);
    buf.extend_from_slice(&first_index.to_le_bytes());
    buf.extend_from_slice(&(commands.len() as u32).to_le_bytes());
    for command in commands {
        serde_json::to_writer(&mut *buf, command)?;
        buf.push(b'\n');
    }
    let body = start + RECORD_HEADER;
    let len = (buf.len() - body) as u32;
    let crc = crc32fast::hash(&buf[body..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..body].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// One checksummed record, borrowed from the reader's buffer.
#[derive(Debug)]
pub(super) struct Record<'a> {
    pub kind: Kind,
    pub first_index: u64,
    pub count: u32,
    payload: &'a [u8],
}

impl Record<'_> {
    /// Index of the record's last entry (`first_index - 1` for an empty one).
    pub fn last_index(&self) -> u64 {
        self.first_index + u64::from(self.count) - 1
    }

    /// The commands, in order. A record that passed its checksum but does not decode was written
    /// wrong, not torn: the caller reports it as corruption.
    pub fn commands(&self) -> Result<Vec<Command>, String> {
        let lines: Vec<&[u8]> = self.payload.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect::<Vec<_>>();
        if lines.len() != self.count as usize {
            return Err(format!("record says {} commands but holds {}", self.count, lines.len()));
        }
        lines
            .into_iter()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_slice(line)
                    .map_err(|e| format!("command {} does not decode: {e}", self.first_index + i as u64))
            })
            .collect()
    }
}

fn decode_body(body: &[u8]) -> Result<Record<'_>, String> {
    if body.len() < BODY_PREFIX {
        return Err(format!("a record body of {} bytes is shorter than its {BODY_PREFIX}-byte prefix", body.len()));
    }
    let kind = match body[0] {
        1 => Kind::Entries,
        other => return Err(format!("unknown record kind {other}")),
    };
    let first_index = u64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
    let count = u32::from_le_bytes(body[9..13].try_into().unwrap_or_default());
    Ok(Record { kind, first_index, count, payload: &body[BODY_PREFIX..] })
}

/// Why reading a segment stopped early.
#[derive(Debug)]
pub(super) enum ReadError {
    Io(std::io::Error),
    /// The bytes at `offset` are not a good record (or header): cut short, implausible, or failing
    /// their checksum. Whether that is a torn tail or corruption is the caller's call.
    Bad {
        offset: u64,
        why: String,
    },
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Reads a segment one record at a time through a `BufReader`: memory is one record, whatever the
/// segment's size.
pub(super) struct SegmentReader {
    reader: BufReader<File>,
    /// End of the last good record (or of the header): where a torn tail is cut.
    offset: u64,
    file_len: u64,
    first_index: u64,
    body: Vec<u8>,
}

impl SegmentReader {
    pub fn open(path: &Path, format: u16) -> Result<Self, ReadError> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let mut header = vec![0u8; SEGMENT_HEADER.min(file_len as usize)];
        reader.read_exact(&mut header)?;
        let first_index = parse_segment_header(format, &header).map_err(|why| ReadError::Bad { offset: 0, why })?;
        Ok(Self { reader, offset: SEGMENT_HEADER as u64, file_len, first_index, body: Vec::new() })
    }

    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The next good record, or None at a clean end of the file.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, ReadError> {
        let remaining = self.file_len - self.offset;
        if remaining == 0 {
            return Ok(None);
        }
        let bad = |why: String| ReadError::Bad { offset: self.offset, why };
        if remaining < RECORD_HEADER as u64 {
            return Err(bad(format!("a record header is cut short ({remaining} of {RECORD_HEADER} bytes)")));
        }
        let mut header = [0u8; RECORD_HEADER];
        self.reader.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
        if (len as usize) < BODY_PREFIX || len > MAX_BODY {
            return Err(bad(format!("implausible record length {len}")));
        }
        if u64::from(len) > remaining - RECORD_HEADER as u64 {
            return Err(bad(format!(
                "a record of {len} bytes is cut short: the file ends {} bytes into it",
                remaining - RECORD_HEADER as u64
            )));
        }
        self.body.resize(len as usize, 0);
        self.reader.read_exact(&mut self.body)?;
        if crc32fast::hash(&self.body) != crc {
            return Err(bad(format!("record of {len} bytes fails its checksum")));
        }
        let offset = self.offset;
        let record = decode_body(&self.body).map_err(|why| ReadError::Bad { offset, why })?;
        self.offset += (RECORD_HEADER + len as usize) as u64;
        Ok(Some(record))
    }
}

/// The offset of the first good record that starts after `bad` in `path`, if any. Only the last,
/// unsynced batch can be torn by a crash, so a good record after a bad one means the bad one is
/// corruption. A record cannot hide inside another's payload: its length field has bytes below 0x20,
/// which serde_json never writes unescaped. Reads the rest of the file, which is at most one segment.
pub(super) fn good_record_after(path: &Path, bad: u64) -> std::io::Result<Option<u64>> {
    let bytes = std::fs::read(path)?;
    let start = (bad as usize + 1).min(bytes.len());
    for at in start..bytes.len().saturating_sub(RECORD_HEADER) {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        if (len as usize) < BODY_PREFIX || len > MAX_BODY {
            continue;
        }
        let body_start = at + RECORD_HEADER;
        let Some(body) = bytes.get(body_start..body_start + len as usize) else { continue };
        let crc = u32::from_le_bytes(bytes[at + 4..body_start].try_into().unwrap_or_default());
        if crc32fast::hash(body) == crc && decode_body(body).is_ok() {
            return Ok(Some(at as u64));
        }
    }
    Ok(None)
}
