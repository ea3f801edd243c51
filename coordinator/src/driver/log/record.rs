//! The byte framing of the command log's segment files, and a streaming reader for them.
//!
//! A segment is a 20-byte header, `IROWAL` + format `u16` + first entry index `u64` + CRC-32 of those
//! 16 bytes, then records. A record is `[len u32][crc32 u32][body]`, the CRC over the body, and the
//! body is `[kind u8][first index u64][count u32][payload]`; little endian throughout. One record holds
//! one group-commit batch, so a batch torn by a crash (its pages reached disk in any order before the
//! fsync) fails its one checksum and is dropped whole, and a good record after a bad one proves the bad
//! one is not a tear. (Only a batch over `MAX_BODY` takes several records. A crash can then leave a
//! prefix of it, which the driver allows, as it was never acknowledged; or, its pages reaching disk
//! out of order, a bad record before a good one of the same batch, which is refused as corruption
//! rather than cut: safe, if inconvenient, for a batch of tens of MB that no real run writes.) The CRC is crc32fast's CRC-32 (IEEE): already in the dependency tree, and as strong
//! as CRC-32C at catching torn writes and flipped bits in records this small.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::state::Command;

pub(crate) const SEGMENT_MAGIC: &[u8; 6] = b"IROWAL";
pub(crate) const SEGMENT_HEADER: usize = 20;
const RECORD_HEADER: usize = 8;
const BODY_PREFIX: usize = 13;
/// The largest record body. A longer length is a damaged length field, and refusing it keeps a corrupt
/// length from allocating without bound. Below 0x2020_2020 on purpose: four bytes of JSON text (all
/// >= 0x20) never read as a plausible length, so a scan for records skips payload bytes at once.
const MAX_BODY: usize = 64 << 20;

/// What a record holds. The command log writes only `Entries`; the Raft log (`crate::raft::storage`, in
/// segments of its own format) writes the other three. Readers refuse kinds they do not know rather than
/// guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// `count` commands, each serde_json encoded and ended by a newline (JSON escapes every newline
    /// inside a string, so the split is exact).
    Entries = 1,
    /// `count` Raft log entries from `first_index` on, each a protobuf `eraftpb::Entry` framed as
    /// `[len u32][bytes]` (`frames`). Replaces every entry read before it from `first_index` on: a
    /// follower whose log its leader overwrote appends, it never rewrites in place.
    RaftEntries = 2,
    /// Raft's HardState (term, vote, commit) as protobuf, `count` 1; the last one read wins.
    HardState = 3,
    /// A Raft snapshot at `first_index` (its term, `u64`, the payload) was installed from the leader and
    /// is durable in the snapshot folder: every entry read before this record is dropped.
    SnapshotInstalled = 4,
}

pub(crate) fn segment_header(format: u16, first_index: u64) -> [u8; SEGMENT_HEADER] {
    let mut header = [0u8; SEGMENT_HEADER];
    header[..6].copy_from_slice(SEGMENT_MAGIC);
    header[6..8].copy_from_slice(&format.to_le_bytes());
    header[8..16].copy_from_slice(&first_index.to_le_bytes());
    let crc = crc32fast::hash(&header[..16]);
    header[16..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The first entry index a segment header names, or why it is not a header of this format.
pub(crate) fn parse_segment_header(format: u16, header: &[u8]) -> Result<u64, String> {
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

/// Appends `commands`, numbered from `first_index`, to `buf` as framed records: one record, unless the
/// batch is over `MAX_BODY`. Err names why a command cannot be stored.
pub(crate) fn encode_entries(buf: &mut Vec<u8>, first_index: u64, commands: &[Command]) -> Result<(), String> {
    encode_within(buf, first_index, commands, MAX_BODY)
}

/// `encode_entries` with the body limit a parameter, so the split can be tested with small batches.
fn encode_within(buf: &mut Vec<u8>, first_index: u64, commands: &[Command], max_body: usize) -> Result<(), String> {
    let mut record = Open::start(buf, first_index);
    let mut line = Vec::new();
    for (command, index) in commands.iter().zip(first_index..) {
        line.clear();
        serde_json::to_writer(&mut line, command).map_err(|e| format!("entry {index} does not encode: {e}"))?;
        line.push(b'\n');
        if BODY_PREFIX + line.len() > max_body {
            return Err(format!("entry {index} is {} bytes, over the {max_body}-byte record limit", line.len()));
        }
        if record.count > 0 && buf.len() - record.body + line.len() > max_body {
            record.close(buf);
            record = Open::start(buf, index);
        }
        buf.extend_from_slice(&line);
        record.count += 1;
    }
    record.close(buf);
    Ok(())
}

/// Appends `frames` (the bytes of items numbered from `first_index`) to `buf` as records of `kind`, each
/// item framed `[len u32][bytes]`: one record, unless they are over `MAX_BODY` together. Err names the
/// item that alone is over the limit.
pub(crate) fn encode_frames<'a>(
    buf: &mut Vec<u8>,
    kind: Kind,
    first_index: u64,
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), String> {
    encode_frames_within(buf, kind, first_index, frames, MAX_BODY)
}

fn encode_frames_within<'a>(
    buf: &mut Vec<u8>,
    kind: Kind,
    first_index: u64,
    frames: impl IntoIterator<Item = &'a [u8]>,
    max_body: usize,
) -> Result<(), String> {
    let mut record = Open::start_kind(buf, kind, first_index);
    for (frame, index) in frames.into_iter().zip(first_index..) {
        let framed = 4 + frame.len();
        if BODY_PREFIX + framed > max_body {
            return Err(format!("item {index} is {} bytes, over the {max_body}-byte record limit", frame.len()));
        }
        if record.count > 0 && buf.len() - record.body + framed > max_body {
            record.close(buf);
            record = Open::start_kind(buf, kind, index);
        }
        buf.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        buf.extend_from_slice(frame);
        record.count += 1;
    }
    record.close(buf);
    Ok(())
}

/// Appends one record of `kind` holding `payload` as is, with `count` stated by the caller.
pub(crate) fn encode_record(buf: &mut Vec<u8>, kind: Kind, first_index: u64, count: u32, payload: &[u8]) {
    let mut record = Open::start_kind(buf, kind, first_index);
    buf.extend_from_slice(payload);
    record.count = count;
    record.close(buf);
}

/// A record being encoded at the end of a buffer: its header is filled in on `close`.
struct Open {
    start: usize,
    body: usize,
    count: u32,
}

impl Open {
    fn start(buf: &mut Vec<u8>, first_index: u64) -> Self {
        Self::start_kind(buf, Kind::Entries, first_index)
    }

    fn start_kind(buf: &mut Vec<u8>, kind: Kind, first_index: u64) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0; RECORD_HEADER]);
        buf.push(kind as u8);
        buf.extend_from_slice(&first_index.to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        Self { start, body: start + RECORD_HEADER, count: 0 }
    }

    fn close(self, buf: &mut [u8]) {
        let count_at = self.body + 1 + 8;
        buf[count_at..count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        // Both fit in u32: the body is at most MAX_BODY.
        let len = (buf.len() - self.body) as u32;
        let crc = crc32fast::hash(&buf[self.body..]);
        buf[self.start..self.start + 4].copy_from_slice(&len.to_le_bytes());
        buf[self.start + 4..self.body].copy_from_slice(&crc.to_le_bytes());
    }
}

/// One checksummed record, borrowed from the reader's buffer.
#[derive(Debug)]
pub(crate) struct Record<'a> {
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

    /// The record's entries, in order, as (index, command JSON), once their number is checked against
    /// `count`. Decoded one at a time with `decode`, so a record of many entries never becomes a
    /// vector of commands, and entries a snapshot covers are never decoded at all.
    pub fn lines(&self) -> Result<impl Iterator<Item = (u64, &[u8])>, String> {
        let lines = || self.payload.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        let found = lines().count();
        if found != self.count as usize {
            return Err(format!("record says {} commands but holds {found}", self.count));
        }
        Ok((self.first_index..).zip(lines()))
    }

    /// The record's `[len u32][bytes]` frames, in order, as (index, bytes), once their number is checked
    /// against `count` and each fits in the payload.
    pub fn frames(&self) -> Result<Vec<(u64, &[u8])>, String> {
        let mut out = Vec::with_capacity(self.count as usize);
        let mut rest = self.payload;
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(format!("a frame length is cut short ({} of 4 bytes)", rest.len()));
            }
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default()) as usize;
            if len > rest.len() - 4 {
                return Err(format!("a frame of {len} bytes runs past the record's end"));
            }
            out.push((self.first_index + out.len() as u64, &rest[4..4 + len]));
            rest = &rest[4 + len..];
        }
        if out.len() != self.count as usize {
            return Err(format!("record says {} items but holds {}", self.count, out.len()));
        }
        Ok(out)
    }

    /// The payload as is (HardState and SnapshotInstalled records).
    pub fn payload(&self) -> &[u8] {
        self.payload
    }
}

/// One entry of a record. A record that passed its checksum but does not decode was written wrong, not
/// torn: the caller reports it as corruption.
pub(crate) fn decode(index: u64, line: &[u8]) -> Result<Command, String> {
    serde_json::from_slice(line).map_err(|e| format!("command {index} does not decode: {e}"))
}

fn decode_body(body: &[u8]) -> Result<Record<'_>, String> {
    if body.len() < BODY_PREFIX {
        return Err(format!("a record body of {} bytes is shorter than its {BODY_PREFIX}-byte prefix", body.len()));
    }
    let kind = match body[0] {
        1 => Kind::Entries,
        2 => Kind::RaftEntries,
        3 => Kind::HardState,
        4 => Kind::SnapshotInstalled,
        other => return Err(format!("unknown record kind {other}")),
    };
    let first_index = u64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
    let count = u32::from_le_bytes(body[9..13].try_into().unwrap_or_default());
    Ok(Record { kind, first_index, count, payload: &body[BODY_PREFIX..] })
}

/// Why reading a segment stopped early.
#[derive(Debug)]
pub(crate) enum ReadError {
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
pub(crate) struct SegmentReader {
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
        if !plausible(len) {
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

fn plausible(len: u32) -> bool {
    (BODY_PREFIX..=MAX_BODY).contains(&(len as usize))
}

/// The offset of the first good record that starts after `bad` in `path`, if any. Only the last,
/// unsynced batch can be torn by a crash, so a good record after a bad one means the bad one is
/// corruption. A record cannot hide inside another's payload: its length field has bytes below 0x20,
/// which serde_json never writes unescaped (see `MAX_BODY`). Streams the file in chunks: memory is a
/// chunk plus the body of one candidate record.
pub(crate) fn good_record_after(path: &Path, bad: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: usize = 1 << 16;
    let mut file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let (mut window, mut body) = (Vec::new(), Vec::new());
    // Every offset from `at` on may start a record; a chunk overlaps the next by a header's length, so
    // a header that straddles two chunks is seen whole.
    let mut at = bad + 1;
    while at + RECORD_HEADER as u64 <= file_len {
        let want = (CHUNK + RECORD_HEADER - 1).min((file_len - at) as usize);
        window.resize(want, 0);
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut window)?;
        let starts = want + 1 - RECORD_HEADER;
        for i in 0..starts {
            let header = &window[i..i + RECORD_HEADER];
            let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
            let body_at = at + (i + RECORD_HEADER) as u64;
            if !plausible(len) || body_at + u64::from(len) > file_len {
                continue;
            }
            let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
            body.resize(len as usize, 0);
            file.seek(SeekFrom::Start(body_at))?;
            file.read_exact(&mut body)?;
            if crc32fast::hash(&body) == crc && decode_body(&body).is_ok() {
                return Ok(Some(at + i as u64));
            }
        }
        at += starts as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expire(now_ms: u64) -> Command {
        Command::ExpireLeases { now_ms }
    }

    /// Decodes framed records from `bytes` as (first index, commands), checking each checksum.
    fn records(mut bytes: &[u8]) -> Vec<(u64, Vec<Command>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            let body = &bytes[RECORD_HEADER..RECORD_HEADER + len];
            assert_eq!(crc32fast::hash(body), crc);
            let record = decode_body(body).unwrap();
            let commands = record.lines().unwrap().map(|(i, line)| decode(i, line).unwrap()).collect();
            out.push((record.first_index, commands));
            bytes = &bytes[RECORD_HEADER + len..];
        }
        out
    }

    #[test]
    fn a_batch_over_the_record_limit_is_split_into_records_numbered_on() {
        let batch: Vec<Command> = (0..10).map(expire).collect();
        let line = serde_json::to_vec(&batch[0]).unwrap().len() + 1;
        let mut one = Vec::new();
        encode_within(&mut one, 7, &batch, MAX_BODY).unwrap();
        assert_eq!(records(&one), vec![(7, batch.clone())], "a batch within the limit is one record");

        let mut split = Vec::new();
        encode_within(&mut split, 7, &batch, BODY_PREFIX + 4 * line).unwrap();
        let found = records(&split);
        assert_eq!(
            found.iter().map(|(first, c)| (*first, c.len())).collect::<Vec<_>>(),
            vec![(7, 4), (11, 4), (15, 2)]
        );
        assert_eq!(found.into_iter().flat_map(|(_, c)| c).collect::<Vec<_>>(), batch);

        let refused = encode_within(&mut Vec::new(), 7, &batch, BODY_PREFIX + line - 1).unwrap_err();
        assert!(refused.contains("entry 7") && refused.contains("record limit"), "{refused}");
    }

    #[test]
    fn framed_items_split_at_the_record_limit_and_read_back_numbered_on() {
        let items: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        let mut buf = Vec::new();
        encode_frames_within(&mut buf, Kind::RaftEntries, 3, items.iter().map(Vec::as_slice), BODY_PREFIX + 2 * 14)
            .unwrap();
        let mut rest = &buf[..];
        let mut read = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            let body = &rest[RECORD_HEADER..RECORD_HEADER + len];
            assert_eq!(crc32fast::hash(body), u32::from_le_bytes(rest[4..8].try_into().unwrap()));
            let record = decode_body(body).unwrap();
            assert_eq!(record.kind, Kind::RaftEntries);
            read.extend(record.frames().unwrap().into_iter().map(|(i, b)| (i, b.to_vec())));
            rest = &rest[RECORD_HEADER + len..];
        }
        assert_eq!(read, (3..).zip(items).collect::<Vec<_>>());
    }
}
