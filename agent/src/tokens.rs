//! Named access tokens kept in a file only the agent's user can read
//! (`headroom serve --token-file FILE`, managed with `headroom token add|revoke|list`).
//!
//! The file has one token per line, `NAME TOKEN`; `#` starts a comment. Tokens are 256
//! bits from the operating system's CSPRNG, written as 64 hex characters. The file must
//! not be readable or writable by the group or others (the agent refuses it otherwise),
//! and every change is written to a temporary file with mode 0600 and renamed over it,
//! so a reader never sees half a file.
//!
//! A serving agent re-reads the file when its size, modification time or inode changes,
//! so a revoked token stops working at the next connection, without a restart. A file
//! that cannot be read or parsed any more refuses every token (fail closed) until fixed.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use subtle::ConstantTimeEq;

/// At most this many tokens in one file.
pub const MAX_TOKENS: usize = 256;
/// A token file larger than this is refused unread.
pub const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Longest token name.
pub const MAX_NAME_CHARS: usize = 64;
/// Hex characters of a token this agent generates (256 bits).
pub const TOKEN_HEX_CHARS: usize = 64;
/// Shortest token accepted from a file written by hand.
pub const MIN_TOKEN_CHARS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: mode {mode:o} lets other users read or change it; run `chmod 600 {path}` (tokens must be readable by the agent's user only)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a plain file owned by the agent's user (a symlink, or another user's file)")]
    NotOurs { path: PathBuf },
    #[error("{path}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}, line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{path}: more than {MAX_TOKENS} tokens")]
    TooMany { path: PathBuf },
    #[error("token name {0:?}: use 1 to {MAX_NAME_CHARS} letters, digits, '.', '-' or '_'")]
    BadName(String),
    #[error("{path}: a token named {name:?} exists already (revoke it first)")]
    Duplicate { path: PathBuf, name: String },
    #[error("{path}: no token named {name:?}")]
    NotFound { path: PathBuf, name: String },
}

/// One named token.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub token: String,
}

impl std::fmt::Debug for Entry {
    // Never prints the secret, wherever an entry ends up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("name", &self.name).field("token", &"<hidden>").finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenFileError + '_ {
    move |source| TokenFileError::Io { path: path.to_owned(), source }
}

pub fn check_name(name: &str) -> Result<(), TokenFileError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok { Ok(()) } else { Err(TokenFileError::BadName(name.to_owned())) }
}

/// A fresh token: 32 bytes from the operating system's CSPRNG (`getrandom`), as hex.
pub fn generate() -> std::io::Result<String> {
    use rand::TryRngCore;
    let mut bytes = [0u8; TOKEN_HEX_CHARS / 2];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| std::io::Error::other(format!("the OS RNG: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads and checks a token file: owner-only mode, size, one `NAME TOKEN` per line.
pub fn read(path: &Path) -> Result<Vec<Entry>, TokenFileError> {
    // The link itself, not what it points to: a token file is a plain file of ours.
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenFileError::Permissions { path: path.to_owned(), mode });
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() || meta.uid() != me {
        return Err(TokenFileError::NotOurs { path: path.to_owned() });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(TokenFileError::TooLarge { path: path.to_owned() });
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, TokenFileError> {
    let mut out: Vec<Entry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| TokenFileError::Line { path: path.to_owned(), line: i + 1, reason };
        let mut parts = line.split_whitespace();
        let (Some(name), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected `NAME TOKEN`".into()));
        };
        check_name(name).map_err(|e| bad(e.to_string()))?;
        if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad(format!("the token of {name:?} must be at least {MIN_TOKEN_CHARS} letters or digits")));
        }
        if out.iter().any(|e| e.name == name) {
            return Err(bad(format!("{name:?} appears twice")));
        }
        if out.len() == MAX_TOKENS {
            return Err(TokenFileError::TooMany { path: path.to_owned() });
        }
        out.push(Entry { name: name.to_owned(), token: token.to_owned() });
    }
    Ok(out)
}

/// Writes `entries` to `path` through a temporary file with mode 0600, then a rename.
fn write(path: &Path, entries: &[Entry]) -> Result<(), TokenFileError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "tokens".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut text = String::from("# Headroom access tokens: NAME TOKEN. Keep this file private (mode 600).\n");
    for e in entries {
        text.push_str(&format!("{} {}\n", e.name, e.token));
    }
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// Existing entries, or none when the file does not exist yet.
fn read_or_empty(path: &Path) -> Result<Vec<Entry>, TokenFileError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        _ => read(path),
    }
}

/// Adds a token named `name` (creating the file if needed) and returns it: the only time
/// it is shown.
pub fn add(path: &Path, name: &str) -> Result<String, TokenFileError> {
    check_name(name)?;
    let mut entries = read_or_empty(path)?;
    if entries.iter().any(|e| e.name == name) {
        return Err(TokenFileError::Duplicate { path: path.to_owned(), name: name.to_owned() });
    }
    if entries.len() == MAX_TOKENS {
        return Err(TokenFileError::TooMany { path: path.to_owned() });
    }
    let token = generate().map_err(io(path))?;
    entries.push(Entry { name: name.to_owned(), token: token.clone() });
    write(path, &entries)?;
    Ok(token)
}

/// Removes the token named `name`; a serving agent refuses it from its next connection.
pub fn revoke(path: &Path, name: &str) -> Result<(), TokenFileError> {
    let mut entries = read(path)?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    if entries.len() == before {
        return Err(TokenFileError::NotFound { path: path.to_owned(), name: name.to_owned() });
    }
    write(path, &entries)
}

/// Whether `given` equals `expected`, in time that depends only on their lengths.
pub fn same(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// What the file looked like when it was last read: a change of any of these re-reads
/// it (the change time covers `chmod`, the inode a rename over it).
type Stamp = (u64, i64, i64, i64, i64, u64, u32);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec(), m.ino(), m.mode()))
}

/// The file's stamp when last read, and what it held (or why it was unusable).
type Cached = (Option<Stamp>, Result<Vec<Entry>, String>);

/// A token file as a serving agent holds it.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    cached: Mutex<Cached>,
}

impl TokenStore {
    /// Opens a token file: it must be readable, private and hold at least one token.
    pub fn open(path: &Path) -> Result<TokenStore, TokenFileError> {
        let entries = read(path)?;
        if entries.is_empty() {
            return Err(TokenFileError::Line {
                path: path.to_owned(),
                line: 0,
                reason: "no tokens; add one with `headroom token add NAME --token-file FILE`".into(),
            });
        }
        let st = stamp(path).ok();
        Ok(TokenStore { path: path.to_owned(), cached: Mutex::new((st, Ok(entries))) })
    }

    /// The name of the token `given` is, re-reading the file first if it changed. Every
    /// token is compared, in constant time each, whatever matches.
    pub fn check(&self, given: &str) -> Option<String> {
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamp(&self.path).ok();
        if now != cached.0 || now.is_none() {
            let fresh = read(&self.path).map_err(|e| e.to_string());
            if let Err(e) = &fresh {
                tracing::error!("token file unusable, refusing every token until it is fixed: {e}");
            }
            *cached = (now, fresh);
        }
        let entries = cached.1.as_ref().ok()?;
        let mut found = None;
        for e in entries {
            if same(given, &e.token) && found.is_none() {
                found = Some(e.name.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_check_revoke_without_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        let laptop = add(&path, "laptop").expect("add");
        let ci = add(&path, "ci").expect("add");
        assert_eq!(laptop.len(), TOKEN_HEX_CHARS);
        assert_ne!(laptop, ci);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let store = TokenStore::open(&path).expect("open");
        assert_eq!(store.check(&laptop).as_deref(), Some("laptop"));
        assert_eq!(store.check(&ci).as_deref(), Some("ci"));
        assert_eq!(store.check("0123456789abcdef0123456789abcdef"), None);
        assert_eq!(store.check(""), None);
        revoke(&path, "laptop").expect("revoke");
        assert_eq!(store.check(&laptop), None, "revoked takes effect at once");
        assert_eq!(store.check(&ci).as_deref(), Some("ci"));
        assert!(matches!(add(&path, "ci"), Err(TokenFileError::Duplicate { .. })));
        assert!(matches!(revoke(&path, "laptop"), Err(TokenFileError::NotFound { .. })));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_readable_file_is_refused_and_a_broken_one_fails_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        let t = add(&path, "a").expect("add");
        let store = TokenStore::open(&path).expect("open");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = TokenStore::open(&path).expect_err("world-readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert_eq!(store.check(&t), None, "a file others can read refuses every token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(store.check(&t).as_deref(), Some("a"));
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(store.check(&t), None, "a missing file refuses every token");
    }

    #[test]
    fn bad_lines_name_the_line_and_the_reason() {
        let p = Path::new("tokens");
        let long = "a".repeat(MAX_NAME_CHARS + 1);
        let cases: Vec<(String, &str)> = vec![
            ("laptop".into(), "expected `NAME TOKEN`"),
            ("laptop short".into(), "at least 32"),
            (format!("{long} {}", "b".repeat(40)), "letters, digits"),
            (format!("a/b {}", "b".repeat(40)), "letters, digits"),
            (format!("x {0}\nx {0}", "c".repeat(40)), "appears twice"),
            (format!("x {} extra", "c".repeat(40)), "expected `NAME TOKEN`"),
        ];
        for (text, want) in cases {
            let err = parse(p, &text).expect_err(&text);
            assert!(err.to_string().contains(want), "{text:?}: {err}");
            assert!(err.to_string().contains("line"), "{err}");
        }
        let ok = parse(p, &format!("# comment\n\n a {} # trailing\n", "d".repeat(40))).expect("ok");
        assert_eq!(ok.len(), 1);
        let many: String = (0..=MAX_TOKENS).map(|i| format!("t{i} {}\n", "e".repeat(40))).collect();
        assert!(matches!(parse(p, &many), Err(TokenFileError::TooMany { .. })));
        assert!(format!("{:?}", ok[0]).contains("<hidden>"));
        assert!(!format!("{:?}", ok[0]).contains("dddd"));
    }
}
