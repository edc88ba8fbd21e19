//! A run's records on disk: an append-only file of length-prefixed, checksummed frames.
//!
//! Each frame is `len: u32 LE | crc: u32 LE | payload`, where `crc` is the CRC-32C
//! (Castagnoli) of the payload and the payload is the record's sequence number
//! (`u64 LE`) followed by the message in the wire codec (`shared::codec`). Frames are
//! written in batches, each batch followed by one `fdatasync`; a record is handed to
//! clients only after the batch holding it is on disk, so whatever any client has seen
//! survives a crash of the agent or the machine.
//!
//! Reading stops at the first frame that is short (a write torn by a crash), longer than
//! [`MAX_RECORD_BYTES`], fails its checksum, does not decode, or breaks the sequence
//! (each record's number is one more than the last's): such a tail is never misread.
//! [`repair`] cuts the file back to its last good frame before more is appended.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use shared::codec;
use shared::protocol::Message;

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

/// What reading a log found.
#[derive(Debug, Default)]
pub struct Contents {
    /// The good records, in order.
    pub records: Vec<(u64, Message)>,
    /// Bytes of the good frames: where the next frame goes.
    pub good_bytes: u64,
    /// Bytes after them that are not a good frame (a torn or damaged tail).
    pub bad_tail_bytes: u64,
}

/// Reads every good record of the log at `path` (none if it does not exist).
pub fn read(path: &Path) -> Result<Contents, LogError> {
    let io = |source| LogError::Io { path: path.to_owned(), source };
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Contents::default()),
        Err(e) => return Err(io(e)),
    }
    Ok(parse(&bytes))
}

/// The good records at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Contents {
    let mut out = Contents::default();
    let mut at = 0usize;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !(8..=MAX_RECORD_BYTES).contains(&len) {
            break;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else { break };
        if crc32c(payload) != crc {
            break;
        }
        let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
        let expected = out.records.last().map_or(1, |(s, _)| s + 1);
        if seq != expected {
            break;
        }
        let Ok(message) = codec::decode(&payload[8..]) else { break };
        out.records.push((seq, message));
        at += HEADER + len;
    }
    out.good_bytes = at as u64;
    out.bad_tail_bytes = (bytes.len() - at) as u64;
    out
}

/// Cuts a torn or damaged tail off the log, so that appends follow its last good frame.
/// Returns what was read.
pub fn repair(path: &Path) -> Result<Contents, LogError> {
    let found = read(path)?;
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
pub fn frame(seq: u64, message: &Message) -> Result<Vec<u8>, LogError> {
    let body = codec::encode(message).map_err(|e| LogError::Record { seq, reason: e.to_string() })?;
    let mut payload = Vec::with_capacity(8 + body.len());
    payload.extend_from_slice(&seq.to_le_bytes());
    payload.extend_from_slice(&body);
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
        let last_seq = found.records.last().map_or(0, |(s, _)| *s);
        Ok((Writer { path: path.to_owned(), file, last_seq }, found))
    }

    /// Appends `messages` as the next records and syncs them to disk (one `fdatasync`
    /// for the lot). Returns their sequence numbers' range.
    pub fn append(&mut self, messages: &[Message]) -> Result<std::ops::RangeInclusive<u64>, LogError> {
        let first = self.last_seq + 1;
        let mut bytes = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            bytes.extend(frame(first + i as u64, m)?);
        }
        let io = |source| LogError::Io { path: self.path.clone(), source };
        self.file.write_all(&bytes).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.last_seq += messages.len() as u64;
        Ok(first..=self.last_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::{BatchRecord, ErrorCode, JobError};

    fn batch(step: u64) -> Message {
        Message::Batch(BatchRecord {
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
        assert!(found.records.is_empty());
        assert_eq!(w.append(&[batch(1), batch(2)]).expect("append"), 1..=2);
        drop(w);
        let (mut w, found) = Writer::open(&path).expect("reopen");
        assert_eq!(found.records.len(), 2);
        assert_eq!(w.append(&[batch(3)]).expect("append"), 3..=3);
        let all = read(&path).expect("read");
        assert_eq!(all.records.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all.records[2].1, batch(3));
        assert_eq!(all.bad_tail_bytes, 0);
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
            let r = parse(&whole[..cut]);
            assert_eq!(r.records.len(), 2, "cut at {cut}");
            assert_eq!(r.good_bytes as usize, 2 * one);
        }
        // A flipped bit in the second frame's payload ends the log after the first.
        let mut damaged = whole.clone();
        damaged[one + HEADER + 12] ^= 0x40;
        assert_eq!(parse(&damaged).records.len(), 1);
        // A record out of sequence ends it too.
        let mut skipped = frame(1, &batch(1)).expect("frame");
        skipped.extend(frame(3, &batch(3)).expect("frame"));
        assert_eq!(parse(&skipped).records.len(), 1);
        // Garbage never panics and yields nothing.
        assert!(parse(&[0xff; 64]).records.is_empty());
        assert!(parse(&[]).records.is_empty());
        // A torn file is cut back, and appending continues after its last good record.
        std::fs::write(&path, &whole[..whole.len() - 3]).expect("tear");
        let (mut w, found) = Writer::open(&path).expect("repair");
        assert_eq!((found.records.len(), found.bad_tail_bytes as usize), (2, one - 3));
        let failed = Message::Failed { job: 1, error: JobError { code: ErrorCode::Cancelled, message: "x".into() } };
        assert_eq!(w.append(std::slice::from_ref(&failed)).expect("append"), 3..=3);
        let all = read(&path).expect("read");
        assert_eq!(all.records.len(), 3);
        assert_eq!(all.records[2].1, failed);
    }

    /// Prints what one synced batch costs per record, side by side for batch sizes 1,
    /// 16 and 256 (the pump writes whatever has arrived, up to 256, per `fdatasync`).
    #[test]
    fn fsync_cost_per_record_is_measured() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _) = Writer::open(&dir.path().join("records.log")).expect("open");
        let mut line = Vec::new();
        for batch_size in [1usize, 16, 256] {
            let batch: Vec<Message> = (0..batch_size as u64).map(|i| batch(i + 1)).collect();
            let rounds = 64;
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                w.append(&batch).expect("append");
            }
            let per = t.elapsed().as_secs_f64() * 1e6 / (rounds * batch_size) as f64;
            line.push(format!("batches of {batch_size}: {per:.1} us a record"));
        }
        println!("run log, append + fdatasync: {}", line.join("; "));
        assert_eq!(read(&dir.path().join("records.log")).expect("read").records.len(), 64 * (1 + 16 + 256));
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
