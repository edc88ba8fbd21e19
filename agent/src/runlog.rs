//! A run's records on disk: an append-only file of length-prefixed, checksummed frames.
//!
//! Each frame is `len: u32 LE | crc: u32 LE | payload`, where `crc` is the CRC-32C
//! (Castagnoli) of the payload and the payload is the record's sequence number
//! (`u64 LE`) followed by the record as the worker sent it, a `protocol::Record` frame
//! of the wire codec (`shared::codec`). Logs written by protocol version 16, whose frames
//! held the same records as messages of the one enum that then went every way, are read
//! as they are (`codec::decode_stored`); appending to one adds today's frames after them. Frames are
//! written in batches, each batch followed by one `fdatasync`; a record is handed to
//! clients only after the batch holding it is on disk, so whatever any client has seen
//! survives a crash of the agent or the machine.
//!
//! Reading stops at the first frame that is short (a write torn by a crash), longer than
//! [`MAX_RECORD_BYTES`], fails its checksum, does not decode, or breaks the sequence
//! (each record's number is one more than the last's): such a tail is never misread.
//! [`repair`] cuts the file back to its last good frame before more is appended.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use shared::codec;
use shared::protocol::Record;

/// A record larger than this is refused on write and ends the readable part on read.
pub const MAX_RECORD_BYTES: usize = codec::MAX_FRAME_BYTES + 8;
const HEADER: usize = 8;
const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

pub fn crc32c(bytes: &[u8]) -> u32 {
    CASTAGNOLI.checksum(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("record {seq}: {reason}")]
    Record { seq: u64, reason: String },
}

/// Records a page holds at most, and bytes of them: what one read keeps in memory,
/// however long the run.
pub const PAGE_RECORDS: usize = 4096;
pub const PAGE_BYTES: usize = 1 << 20;

/// Where reading goes on: a frame boundary and the number of the record there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub offset: u64,
    pub next_seq: u64,
}

impl Cursor {
    pub const START: Cursor = Cursor { offset: 0, next_seq: 1 };
}

/// Records read from a cursor on.
#[derive(Debug)]
pub struct Page {
    pub records: Vec<(u64, Record)>,
    /// After the last frame read.
    pub cursor: Cursor,
    /// The page stopped at its limits: more good frames may follow.
    pub more: bool,
}

/// What checking a whole log found.
#[derive(Debug, Default)]
pub struct Contents {
    /// Good records, and the last of them.
    pub count: u64,
    pub last: Option<(u64, Record)>,
    /// Bytes of the good frames: where the next frame goes.
    pub good_bytes: u64,
    /// Bytes after them that are not a good frame (a torn or damaged tail).
    pub bad_tail_bytes: u64,
}

/// Walks the good frames of `bytes` (a reader positioned at `cursor`, `len` bytes long
/// in all): frames numbered up to `skip_through` are only checked for their length and
/// number and passed over unread (a client already has them, so they were synced and
/// checked when the log was opened); frames numbered past `through` are not walked
/// (written but perhaps not yet synced); the others are checked against their CRC,
/// decoded and handed to `each`, which returns `false` to stop. Returns the cursor after
/// the last frame walked and whether `each` stopped the walk.
fn walk<R: Read + Seek>(
    reader: &mut BufReader<R>,
    len: u64,
    mut cursor: Cursor,
    skip_through: u64,
    through: u64,
    mut each: impl FnMut(u64, Record, usize) -> bool,
) -> (Cursor, bool) {
    let mut header = [0u8; HEADER + 8];
    let mut payload = Vec::new();
    loop {
        if cursor.next_seq > through
            || len - cursor.offset.min(len) < (HEADER + 8) as u64
            || reader.read_exact(&mut header).is_err()
        {
            return (cursor, false);
        }
        let size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let seq = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
        ]);
        let end = cursor.offset + (HEADER + size) as u64;
        if !(8..=MAX_RECORD_BYTES).contains(&size) || seq != cursor.next_seq || end > len {
            return (cursor, false);
        }
        if seq <= skip_through {
            if reader.seek_relative((size - 8) as i64).is_err() {
                return (cursor, false);
            }
        } else {
            payload.clear();
            payload.extend_from_slice(&header[HEADER..]);
            payload.resize(size, 0);
            if reader.read_exact(&mut payload[8..]).is_err() || crc32c(&payload) != crc {
                return (cursor, false);
            }
            let Ok(message) = codec::decode_stored(&payload[8..]) else { return (cursor, false) };
            cursor = Cursor { offset: end, next_seq: seq + 1 };
            if !each(seq, message, size) {
                return (cursor, true);
            }
            continue;
        }
        cursor = Cursor { offset: end, next_seq: seq + 1 };
    }
}

fn open_at(path: &Path, cursor: Cursor) -> Result<Option<(BufReader<File>, u64)>, LogError> {
    let io = |source| LogError::Io { path: path.to_owned(), source };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    file.seek(SeekFrom::Start(cursor.offset)).map_err(io)?;
    Ok(Some((BufReader::with_capacity(1 << 20, file), len)))
}

/// The records after number `after` and up to number `through` (what is known to be
/// synced), from `cursor` on (a cursor a previous page returned, or [`Cursor::START`]):
/// at most [`PAGE_RECORDS`] of them and about [`PAGE_BYTES`]. Frames up to `after` are
/// passed over without being read.
pub fn read_page(path: &Path, cursor: Cursor, after: u64, through: u64) -> Result<Page, LogError> {
    let Some((mut reader, len)) = open_at(path, cursor)? else {
        return Ok(Page { records: Vec::new(), cursor, more: false });
    };
    let mut records = Vec::new();
    let mut bytes = 0;
    let (cursor, more) = walk(&mut reader, len, cursor, after, through, |seq, m, size| {
        records.push((seq, m));
        bytes += size;
        records.len() < PAGE_RECORDS && bytes < PAGE_BYTES
    });
    Ok(Page { records, cursor, more })
}

/// Every good record of the log at `path` (none if it does not exist), all in memory.
#[cfg(test)]
pub fn read_all(path: &Path) -> Result<Vec<(u64, Record)>, LogError> {
    let mut out = Vec::new();
    let mut cursor = Cursor::START;
    loop {
        let page = read_page(path, cursor, 0, u64::MAX)?;
        out.extend(page.records);
        cursor = page.cursor;
        if !page.more {
            return Ok(out);
        }
    }
}

/// Checks the whole log at `path`, keeping only its last good record.
pub fn check(path: &Path) -> Result<Contents, LogError> {
    let Some((mut reader, len)) = open_at(path, Cursor::START)? else {
        return Ok(Contents::default());
    };
    let mut out = Contents::default();
    let (end, _) = walk(&mut reader, len, Cursor::START, 0, u64::MAX, |seq, m, _| {
        out.count += 1;
        out.last = Some((seq, m));
        true
    });
    out.good_bytes = end.offset;
    out.bad_tail_bytes = len - end.offset;
    Ok(out)
}

/// The good records at the start of `bytes`, and their length.
#[cfg(test)]
pub fn parse(bytes: &[u8]) -> (Vec<(u64, Record)>, u64) {
    let mut reader = BufReader::new(std::io::Cursor::new(bytes));
    let mut out = Vec::new();
    let (end, _) = walk(&mut reader, bytes.len() as u64, Cursor::START, 0, u64::MAX, |seq, m, _| {
        out.push((seq, m));
        true
    });
    (out, end.offset)
}

/// Cuts a torn or damaged tail off the log, so that appends follow its last good frame.
/// Returns what was found.
pub fn repair(path: &Path) -> Result<Contents, LogError> {
    let found = check(path)?;
    if found.bad_tail_bytes > 0 {
        let io = |source| LogError::Io { path: path.to_owned(), source };
        let f = OpenOptions::new().write(true).open(path).map_err(io)?;
        f.set_len(found.good_bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        tracing::warn!(path = %path.display(), bytes = found.bad_tail_bytes, "cut a torn or damaged tail off a run log");
    }
    Ok(found)
}

/// One frame's bytes.
pub fn frame(seq: u64, record: &Record) -> Result<Vec<u8>, LogError> {
    let body = codec::encode(record).map_err(|e| LogError::Record { seq, reason: e.to_string() })?;
    framed_body(seq, &body)
}

/// A frame around an encoded record.
fn framed_body(seq: u64, body: &[u8]) -> Result<Vec<u8>, LogError> {
    let mut payload = Vec::with_capacity(8 + body.len());
    payload.extend_from_slice(&seq.to_le_bytes());
    payload.extend_from_slice(body);
    if payload.len() > MAX_RECORD_BYTES {
        return Err(LogError::Record { seq, reason: format!("larger than {MAX_RECORD_BYTES} bytes") });
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// A log open for appending.
#[derive(Debug)]
pub struct Writer {
    path: PathBuf,
    file: File,
    /// The number of the last record written.
    pub last_seq: u64,
}

impl Writer {
    /// Opens (or creates) the log at `path` after its last good record, repairing it.
    pub fn open(path: &Path) -> Result<(Writer, Contents), LogError> {
        let found = repair(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError::Io { path: path.to_owned(), source })?;
        let last_seq = found.last.as_ref().map_or(0, |(s, _)| *s);
        Ok((Writer { path: path.to_owned(), file, last_seq }, found))
    }

    /// Appends `records` as the next records and syncs them to disk (one `fdatasync`
    /// for the lot). Returns their sequence numbers' range.
    pub fn append(&mut self, records: &[Record]) -> Result<std::ops::RangeInclusive<u64>, LogError> {
        let first = self.last_seq + 1;
        let mut bytes = Vec::new();
        for (i, m) in records.iter().enumerate() {
            bytes.extend(frame(first + i as u64, m)?);
        }
        let io = |source| LogError::Io { path: self.path.clone(), source };
        self.file.write_all(&bytes).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.last_seq += records.len() as u64;
        Ok(first..=self.last_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::{BatchRecord, ErrorCode, JobError};

    fn batch(step: u64) -> Record {
        Record::Batch(BatchRecord {
            job: 1,
            step,
            micro_batch: 1,
            epoch: 1,
            loss: 1.0 / step as f64,
            learning_rate: 0.1,
            allocated_bytes: 1000 * step,
            peak_bytes: 2000 * step,
            reserved_bytes: None,
            device_used_bytes: None,
            host_rss_bytes: 1 << 20,
            step_time_ms: 1.5,
            samples_per_sec: 100.0,
        })
    }

    #[test]
    fn records_round_trip_and_appends_continue_the_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.log");
        let (mut w, found) = Writer::open(&path).expect("open");
        assert_eq!(found.count, 0);
        assert_eq!(w.append(&[batch(1), batch(2)]).expect("append"), 1..=2);
        drop(w);
        let (mut w, found) = Writer::open(&path).expect("reopen");
        assert_eq!((found.count, found.last), (2, Some((2, batch(2)))));
        assert_eq!(w.append(&[batch(3)]).expect("append"), 3..=3);
        let all = read_all(&path).expect("read");
        assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[2].1, batch(3));
        assert_eq!(check(&path).expect("check").bad_tail_bytes, 0);
    }

    #[test]
    fn a_torn_or_damaged_tail_is_never_misread_and_is_cut_before_appending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.log");
        let (mut w, _) = Writer::open(&path).expect("open");
        w.append(&[batch(1), batch(2), batch(3)]).expect("append");
        drop(w);
        let whole = std::fs::read(&path).expect("bytes");
        let one = frame(1, &batch(1)).expect("frame").len();
        // Every cut inside the third frame leaves exactly two records.
        for cut in (2 * one + 1)..whole.len() {
            let (records, good) = parse(&whole[..cut]);
            assert_eq!(records.len(), 2, "cut at {cut}");
            assert_eq!(good as usize, 2 * one);
        }
        // A flipped bit in the second frame's payload ends the log after the first.
        let mut damaged = whole.clone();
        damaged[one + HEADER + 12] ^= 0x40;
        assert_eq!(parse(&damaged).0.len(), 1);
        // A record out of sequence ends it too.
        let mut skipped = frame(1, &batch(1)).expect("frame");
        skipped.extend(frame(3, &batch(3)).expect("frame"));
        assert_eq!(parse(&skipped).0.len(), 1);
        // Garbage never panics and yields nothing.
        assert!(parse(&[0xff; 64]).0.is_empty());
        assert!(parse(&[]).0.is_empty());
        // A torn file is cut back, and appending continues after its last good record.
        std::fs::write(&path, &whole[..whole.len() - 3]).expect("tear");
        let (mut w, found) = Writer::open(&path).expect("repair");
        assert_eq!((found.count, found.bad_tail_bytes as usize), (2, one - 3));
        let failed = Record::Failed { error: JobError { code: ErrorCode::Cancelled, message: "x".into() } };
        assert_eq!(w.append(std::slice::from_ref(&failed)).expect("append"), 3..=3);
        let all = read_all(&path).expect("read");
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].1, failed);
    }

    /// Prints what one synced batch costs per record, side by side for batch sizes 1,
    /// 16 and 256 (the pump writes whatever has arrived, up to 256, per `fdatasync`).
    #[test]
    fn fsync_cost_per_record_is_measured() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _) = Writer::open(&dir.path().join("records.log")).expect("open");
        let mut line = Vec::new();
        for batch_size in [1usize, 16, 256] {
            let batch: Vec<Record> = (0..batch_size as u64).map(|i| batch(i + 1)).collect();
            let rounds = 64;
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                w.append(&batch).expect("append");
            }
            let per = t.elapsed().as_secs_f64() * 1e6 / (rounds * batch_size) as f64;
            line.push(format!("batches of {batch_size}: {per:.1} us a record"));
        }
        println!("run log, append + fdatasync: {}", line.join("; "));
        assert_eq!(check(&dir.path().join("records.log")).expect("check").count, 64 * (1 + 16 + 256));
    }

    #[test]
    fn pages_resume_from_their_cursor_skip_what_the_client_has_and_stop_at_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.log");
        let (mut w, _) = Writer::open(&path).expect("open");
        let n = PAGE_RECORDS as u64 * 2 + 10;
        let all: Vec<Record> = (1..=n).map(batch).collect();
        w.append(&all).expect("append");
        // From the start: whole pages, each going on where the last stopped.
        let first = read_page(&path, Cursor::START, 0, u64::MAX).expect("page");
        assert_eq!((first.records.len(), first.more), (PAGE_RECORDS, true));
        assert_eq!(first.cursor.next_seq, PAGE_RECORDS as u64 + 1);
        let second = read_page(&path, first.cursor, 0, u64::MAX).expect("page");
        assert_eq!(second.records[0].0, PAGE_RECORDS as u64 + 1);
        let third = read_page(&path, second.cursor, 0, u64::MAX).expect("page");
        assert_eq!((third.records.len(), third.more), (10, false));
        assert_eq!(third.records.last().map(|(s, m)| (*s, m.clone())), Some((n, batch(n))));
        // Nothing new: an empty page with the same cursor; new records: only them.
        let none = read_page(&path, third.cursor, 0, u64::MAX).expect("page");
        assert!(none.records.is_empty() && none.cursor == third.cursor && !none.more);
        w.append(&[batch(n + 1)]).expect("append");
        let later = read_page(&path, third.cursor, 0, u64::MAX).expect("page");
        assert_eq!(later.records.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![n + 1]);
        // Nothing past what is known to be synced.
        let synced = read_page(&path, Cursor::START, 0, 5).expect("page");
        assert_eq!((synced.records.len(), synced.more, synced.cursor.next_seq), (5, false, 6));
        // A client that has up to record 8,000 gets the rest, the first 8,000 passed over.
        let tail = read_page(&path, Cursor::START, 8000, u64::MAX).expect("page");
        assert_eq!(tail.records.first().map(|(s, _)| *s), Some(8001));
        assert_eq!(tail.records.len() as u64, n + 1 - 8000);
        // An `after` past the end yields nothing; a frame still being written ends the page.
        assert!(read_page(&path, Cursor::START, 1 << 40, u64::MAX).expect("page").records.is_empty());
        let whole = std::fs::read(&path).expect("bytes");
        let torn = dir.path().join("torn.log");
        std::fs::write(&torn, &whole[..whole.len() - 5]).expect("write");
        let page = read_page(&torn, third.cursor, n, u64::MAX).expect("page");
        assert!(page.records.is_empty() && !page.more);
        assert!(
            read_page(&dir.path().join("absent.log"), Cursor::START, 0, u64::MAX).expect("absent").records.is_empty()
        );
    }

    #[test]
    fn a_log_written_by_version_16_is_read_and_appended_to() {
        // Two records as version 16 stored them (a batch of job 3 and its end, `Failed`
        // with `Cancelled`, in that version's one enum), then a record appended today.
        let hex = |s: &str| {
            (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect::<Vec<u8>>()
        };
        let old_batch = hex(
            "100003030201010000000000000440fbe803fbd00701fb001000fb611e00000000000029400000000000005440fca9f1d24d62503f",
        );
        let old_failed = hex("10000503080773746f70706564");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.log");
        let mut bytes = framed_body(1, &old_batch).expect("frame");
        bytes.extend(framed_body(2, &old_failed).expect("frame"));
        std::fs::write(&path, &bytes).expect("write");
        let (mut w, found) = Writer::open(&path).expect("open");
        assert_eq!((found.count, found.bad_tail_bytes), (2, 0));
        let cancelled = Record::Failed { error: JobError { code: ErrorCode::Cancelled, message: "stopped".into() } };
        assert_eq!(found.last, Some((2, cancelled.clone())));
        w.append(&[batch(9)]).expect("append");
        let all = read_all(&path).expect("read");
        assert!(matches!(&all[0], (1, Record::Batch(b)) if b.job == 3 && b.step == 2 && b.peak_bytes == 2000));
        assert_eq!(all[1], (2, cancelled));
        assert_eq!(all[2], (3, batch(9)));
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
