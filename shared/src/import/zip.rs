//! The zip container of a `.pt2` file, read strictly and in two steps so that a page
//! reads only what it needs of a large file: the end of the file (the central
//! directory) first, then one entry's bytes.
//!
//! `torch.export.save` writes stored (uncompressed) entries; a file re-packed with
//! deflate reads too. Everything in the file is untrusted: every offset and size is
//! checked against the file's length and the limits before it is used, names must be
//! plain relative paths, and an entry is never inflated past its declared size.

use super::ImportError;

/// The end-of-central-directory record's size without its comment.
const EOCD_LEN: u64 = 22;
/// The most the end of a file can hold after the central directory: the largest zip
/// comment, the zip64 records and the end record.
pub const TAIL_OVERHEAD: u64 = EOCD_LEN + 0xFFFF + 20 + 56;
/// Entries one archive may list.
pub const MAX_ENTRIES: usize = 1 << 20;
/// The central directory's size.
pub const MAX_DIRECTORY_BYTES: u64 = 256 << 20;
/// A local header's size past its fixed part (name and extra field).
pub const LOCAL_HEADER_MAX: u64 = 30 + 2 * 0xFFFF;

const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_ZIP64_LOCATOR: u32 = 0x0706_4b50;
const SIG_ZIP64_EOCD: u32 = 0x0606_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_LOCAL: u32 = 0x0403_4b50;

/// One file of the archive as the central directory lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// 0: stored, 8: deflate.
    pub method: u16,
    pub crc32: u32,
    pub compressed: u64,
    pub size: u64,
    /// Where its local header starts.
    pub offset: u64,
}

impl Entry {
    /// The bytes of the file a reader must hand [`Entry::read`]: from the local header
    /// to the end of the data (with room for the largest local name and extra field),
    /// clipped to the file.
    pub fn span(&self, file_len: u64) -> (u64, u64) {
        let end = self.offset.saturating_add(LOCAL_HEADER_MAX).saturating_add(self.compressed).min(file_len);
        (self.offset, end.saturating_sub(self.offset))
    }

    /// The entry's contents from `bytes`, which start at its local header (see
    /// [`Entry::span`]); inflated if need be, never past `limit` bytes, CRC-checked.
    pub fn read(&self, bytes: &[u8], limit: u64) -> Result<Vec<u8>, ImportError> {
        let bad = |why: String| ImportError::Zip(format!("{}: {why}", self.name));
        if self.size > limit {
            return Err(ImportError::TooLarge { what: self.name.clone(), size: self.size, limit });
        }
        if bytes.len() < 30 || u32le(bytes, 0) != SIG_LOCAL {
            return Err(bad("no local header where the directory points".into()));
        }
        let name_len = u64::from(u16le(bytes, 26));
        let extra_len = u64::from(u16le(bytes, 28));
        let start = 30 + name_len + extra_len;
        let local_name = bytes.get(30..30 + name_len as usize).ok_or_else(|| bad("truncated local header".into()))?;
        if local_name != self.name.as_bytes() {
            return Err(bad("the local header names another file".into()));
        }
        let end = start.checked_add(self.compressed).ok_or_else(|| bad("size overflows".into()))?;
        let data =
            bytes.get(start as usize..end as usize).ok_or_else(|| bad("the file ends inside this entry".into()))?;
        let out = match self.method {
            0 => {
                if self.compressed != self.size {
                    return Err(bad("a stored entry whose sizes differ".into()));
                }
                data.to_vec()
            }
            8 => {
                let out = miniz_oxide::inflate::decompress_to_vec_with_limit(data, self.size as usize)
                    .map_err(|e| bad(format!("does not inflate within its declared {} bytes ({e:?})", self.size)))?;
                if out.len() as u64 != self.size {
                    return Err(bad(format!("inflates to {} bytes, not the declared {}", out.len(), self.size)));
                }
                out
            }
            m => return Err(bad(format!("compression method {m} (only stored and deflate are read)"))),
        };
        if crc32fast::hash(&out) != self.crc32 {
            return Err(bad("CRC-32 mismatch: the file is damaged".into()));
        }
        Ok(out)
    }
}

/// The central directory of an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directory {
    pub entries: Vec<Entry>,
    pub file_len: u64,
}

/// What [`Directory::read`] needs when the tail it was given is too short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedTail(pub u64);

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Directory {
    /// The directory from the last `tail.len()` bytes of a file of `file_len` bytes.
    /// `Ok(Err(NeedTail(n)))` asks for the last `n` bytes instead (the directory starts
    /// earlier than the tail given); a whole file is always enough.
    pub fn read(tail: &[u8], file_len: u64) -> Result<Result<Directory, NeedTail>, ImportError> {
        let bad = |why: &str| ImportError::Zip(why.to_owned());
        let tail_len = tail.len() as u64;
        if tail_len > file_len {
            return Err(bad("the tail is longer than the file"));
        }
        let base = file_len - tail_len;
        if tail.len() < EOCD_LEN as usize {
            return if file_len < EOCD_LEN {
                Err(bad("not a zip archive (too short); a .pt2 file is a zip archive"))
            } else {
                Ok(Err(NeedTail(file_len.min(TAIL_OVERHEAD))))
            };
        }
        // The end record: the last signature whose comment length reaches the end.
        let eocd = (0..=tail.len() - EOCD_LEN as usize).rev().take(0xFFFF + 1).find(|&i| {
            u32le(tail, i) == SIG_EOCD && i + EOCD_LEN as usize + u16le(tail, i + 20) as usize == tail.len()
        });
        let Some(eocd) = eocd else {
            if tail_len < file_len.min(TAIL_OVERHEAD) {
                return Ok(Err(NeedTail(file_len.min(TAIL_OVERHEAD))));
            }
            return Err(bad(
                "not a zip archive (no end of central directory): a .pt2 file is a zip archive; was it truncated?",
            ));
        };
        let mut count = u64::from(u16le(tail, eocd + 10));
        let mut dir_len = u64::from(u32le(tail, eocd + 12));
        let mut dir_start = u64::from(u32le(tail, eocd + 16));
        if count == 0xFFFF || dir_len == 0xFFFF_FFFF || dir_start == 0xFFFF_FFFF {
            // Zip64: the locator sits just before the end record.
            if eocd < 20 || u32le(tail, eocd - 20) != SIG_ZIP64_LOCATOR {
                return Err(bad("a zip64 archive without its locator"));
            }
            let rec = u64le(tail, eocd - 20 + 8);
            if rec.saturating_add(56) > file_len || file_len - rec > TAIL_OVERHEAD {
                return Err(bad("the zip64 end record lies outside the file's end"));
            }
            if rec < base {
                return Ok(Err(NeedTail(file_len - rec)));
            }
            let r = (rec - base) as usize;
            if u32le(tail, r) != SIG_ZIP64_EOCD {
                return Err(bad("no zip64 end record where the locator points"));
            }
            count = u64le(tail, r + 32);
            dir_len = u64le(tail, r + 40);
            dir_start = u64le(tail, r + 48);
        }
        if count > MAX_ENTRIES as u64 {
            return Err(ImportError::TooLarge { what: "zip entries".into(), size: count, limit: MAX_ENTRIES as u64 });
        }
        if dir_len > MAX_DIRECTORY_BYTES {
            return Err(ImportError::TooLarge {
                what: "the zip's central directory".into(),
                size: dir_len,
                limit: MAX_DIRECTORY_BYTES,
            });
        }
        let dir_end = dir_start
            .checked_add(dir_len)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| bad("the central directory lies outside the file: the file is truncated or damaged"))?;
        if dir_start < base {
            // The directory must end where the end records begin: a reader is never
            // asked for more than the directory's limit and the end records.
            let need = file_len - dir_start;
            if need > MAX_DIRECTORY_BYTES + TAIL_OVERHEAD {
                return Err(bad("the central directory does not end where the end records begin: the file is damaged"));
            }
            return Ok(Err(NeedTail(need)));
        }
        let dir = &tail[(dir_start - base) as usize..(dir_end - base) as usize];
        let mut entries = Vec::with_capacity((count as usize).min(dir.len() / 46));
        let mut at = 0usize;
        for _ in 0..count {
            if dir.len() < at + 46 || u32le(dir, at) != SIG_CENTRAL {
                return Err(bad("the central directory is damaged"));
            }
            let method = u16le(dir, at + 10);
            let crc32 = u32le(dir, at + 16);
            let mut compressed = u64::from(u32le(dir, at + 20));
            let mut size = u64::from(u32le(dir, at + 24));
            let name_len = usize::from(u16le(dir, at + 28));
            let extra_len = usize::from(u16le(dir, at + 30));
            let comment_len = usize::from(u16le(dir, at + 32));
            let mut offset = u64::from(u32le(dir, at + 42));
            let next = at + 46 + name_len + extra_len + comment_len;
            if dir.len() < next {
                return Err(bad("the central directory is damaged"));
            }
            let name = std::str::from_utf8(&dir[at + 46..at + 46 + name_len])
                .map_err(|_| bad("an entry's name is not UTF-8"))?
                .to_owned();
            // Zip64 extra field: the sizes and offset that did not fit 32 bits, in order.
            let mut extra = &dir[at + 46 + name_len..at + 46 + name_len + extra_len];
            while extra.len() >= 4 {
                let (id, len) = (u16le(extra, 0), usize::from(u16le(extra, 2)));
                let body = extra.get(4..4 + len).ok_or_else(|| bad("an entry's extra field is damaged"))?;
                if id == 1 {
                    let mut fields = body.chunks_exact(8).map(|c| u64le(c, 0));
                    for v in [&mut size, &mut compressed, &mut offset] {
                        if *v == 0xFFFF_FFFF {
                            *v = fields.next().ok_or_else(|| bad("an entry's zip64 field is short"))?;
                        }
                    }
                }
                extra = &extra[4 + len..];
            }
            check_name(&name)?;
            if offset.saturating_add(30).saturating_add(compressed) > dir_start {
                return Err(bad(&format!("{name}: its data would overlap the central directory")));
            }
            entries.push(Entry { name, method, crc32, compressed, size, offset });
            at = next;
        }
        Ok(Ok(Directory { entries, file_len }))
    }

    /// The directory of a whole file in memory.
    pub fn of(bytes: &[u8]) -> Result<Directory, ImportError> {
        match Directory::read(bytes, bytes.len() as u64)? {
            Ok(d) => Ok(d),
            Err(_) => Err(ImportError::Zip("not a zip archive".into())),
        }
    }

    /// The one entry whose name ends with `suffix` after the archive's top folder
    /// (`torch.export.save` puts everything under a folder named after the file).
    pub fn find(&self, suffix: &str) -> Result<Option<&Entry>, ImportError> {
        let mut found = self
            .entries
            .iter()
            .filter(|e| e.name == suffix || e.name.split_once('/').is_some_and(|(_, rest)| rest == suffix));
        let first = found.next();
        if first.is_some() && found.next().is_some() {
            return Err(ImportError::Zip(format!("more than one entry is {suffix}")));
        }
        Ok(first)
    }
}

/// An entry's name must be a plain relative path: no root, no `..`, no backslashes or
/// drive letters (the agent stores uploads by content hash, never by these names, but a
/// name that tries is a hostile file).
fn check_name(name: &str) -> Result<(), ImportError> {
    let hostile = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains(':')
        || name.contains('\0')
        || name.split('/').any(|part| part == "..");
    if hostile {
        return Err(ImportError::Zip(format!(
            "entry name {:?} leaves the archive (absolute, drive or '..' path): refused",
            crate::units::clip(name, crate::units::QUOTED_BYTES)
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A zip archive of `files` written by hand (stored, or deflated when `deflate`).
    pub(crate) fn zip(files: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in files {
            let offset = out.len() as u32;
            let body = if deflate { miniz_oxide::deflate::compress_to_vec(data, 6) } else { data.to_vec() };
            let method: u16 = if deflate { 8 } else { 0 };
            let crc = crc32fast::hash(data);
            let mut local = Vec::new();
            local.extend(SIG_LOCAL.to_le_bytes());
            local.extend([20, 0, 0, 0]);
            local.extend(method.to_le_bytes());
            local.extend([0; 4]);
            local.extend(crc.to_le_bytes());
            local.extend((body.len() as u32).to_le_bytes());
            local.extend((data.len() as u32).to_le_bytes());
            local.extend((name.len() as u16).to_le_bytes());
            local.extend(0u16.to_le_bytes());
            local.extend(name.as_bytes());
            out.extend(&local);
            out.extend(&body);
            central.extend(SIG_CENTRAL.to_le_bytes());
            central.extend([20, 0, 20, 0, 0, 0]);
            central.extend(method.to_le_bytes());
            central.extend([0; 4]);
            central.extend(crc.to_le_bytes());
            central.extend((body.len() as u32).to_le_bytes());
            central.extend((data.len() as u32).to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend([0; 12]);
            central.extend(offset.to_le_bytes());
            central.extend(name.as_bytes());
        }
        let start = out.len() as u32;
        out.extend(&central);
        out.extend(SIG_EOCD.to_le_bytes());
        out.extend([0; 4]);
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(start.to_le_bytes());
        out.extend([0, 0]);
        out
    }

    fn read_all(bytes: &[u8], name: &str) -> Result<Vec<u8>, ImportError> {
        let d = Directory::of(bytes)?;
        let e = d.find(name)?.expect("entry").clone();
        let (at, len) = e.span(bytes.len() as u64);
        e.read(&bytes[at as usize..(at + len) as usize], 1 << 20)
    }

    #[test]
    fn stored_and_deflated_entries_read_back() {
        for deflate in [false, true] {
            let z = zip(&[("m/models/model.json", b"{\"a\": 1}"), ("m/byteorder", b"little")], deflate);
            assert_eq!(read_all(&z, "models/model.json").expect("reads"), b"{\"a\": 1}");
            assert_eq!(read_all(&z, "byteorder").expect("reads"), b"little");
        }
    }

    #[test]
    fn a_short_tail_asks_for_more_and_the_answer_reads() {
        let big = vec![7u8; 200_000];
        let z = zip(&[("m/data/weights/weight_0", &big), ("m/models/model.json", b"{}")], false);
        let len = z.len() as u64;
        let need = match Directory::read(&z[z.len() - 10..], len).expect("fine") {
            Err(NeedTail(n)) => n,
            Ok(_) => panic!("10 bytes cannot hold the directory"),
        };
        let d = Directory::read(&z[z.len() - need as usize..], len).expect("reads").expect("enough");
        assert_eq!(d.entries.len(), 2);
        // The model entry's span is a small part of the file.
        let (at, n) = d.find("models/model.json").expect("one").expect("there").span(len);
        assert!(n < 300 && at > 200_000, "{at} {n}");
    }

    #[test]
    fn hostile_archives_are_refused_by_name() {
        let z = zip(&[("../evil", b"x")], false);
        assert!(Directory::of(&z).expect_err("refused").to_string().contains("leaves the archive"));
        let z = zip(&[("/abs", b"x")], false);
        assert!(Directory::of(&z).expect_err("refused").to_string().contains("leaves the archive"));
        // Truncated: the end record is gone.
        let z = zip(&[("m/models/model.json", b"{}")], false);
        assert!(Directory::of(&z[..z.len() - 5]).expect_err("refused").to_string().contains("truncated"));
        // Not a zip at all.
        assert!(Directory::of(b"hello world, this is not a zip file at all").is_err());
        // A bomb: a small deflated entry that claims to be small but inflates past it.
        let mut z = zip(&[("m/models/model.json", &vec![b' '; 1 << 20])], true);
        let d = Directory::of(&z).expect("directory");
        let e = d.entries[0].clone();
        // Rewrite the declared size to 1 KiB in the central directory.
        let pos = z.windows(4).rposition(|w| w == SIG_CENTRAL.to_le_bytes()).expect("central");
        z[pos + 24..pos + 28].copy_from_slice(&1024u32.to_le_bytes());
        let d = Directory::of(&z).expect("directory");
        let (at, len) = d.entries[0].span(z.len() as u64);
        let err = d.entries[0].read(&z[at as usize..(at + len) as usize], 1 << 30).expect_err("refused").to_string();
        assert!(err.contains("does not inflate within its declared 1024 bytes"), "{err}");
        // An entry over the limit is refused before anything is read.
        let err = e.read(&[], 1000).expect_err("refused").to_string();
        assert!(err.contains("over the limit"), "{err}");
        // A damaged byte fails the CRC.
        let mut z = zip(&[("m/models/model.json", b"{\"k\": 1}")], false);
        let p = z.windows(8).position(|w| w == b"{\"k\": 1}").expect("data");
        z[p + 6] = b'2';
        assert!(read_all(&z, "models/model.json").expect_err("refused").to_string().contains("CRC-32"));
    }
}
