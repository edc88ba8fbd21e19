//! An exported model's file on this machine, read as `shared::import::zip` reads one: the
//! zip directory from the file's end, then only the entries asked for — the graph for an
//! estimate, one weight at a time for the trainer — never the whole file at once.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use shared::import::ImportError;
use shared::import::zip::{Directory, Entry, NeedTail, TAIL_OVERHEAD};

/// Why a model file cannot be read: the file system's error, or the importer's.
#[derive(Debug, thiserror::Error)]
pub enum Pt2Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Import { path: PathBuf, source: ImportError },
}

/// An open `.pt2` file and its directory.
pub struct Archive {
    path: PathBuf,
    file: File,
    pub dir: Directory,
}

impl Archive {
    pub fn open(path: &Path) -> Result<Archive, Pt2Error> {
        let io = |source| Pt2Error::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut a = Archive { path: path.to_owned(), file, dir: Directory { entries: Vec::new(), file_len: len } };
        // The last 64 KiB and the end records, more if the directory starts earlier.
        let mut tail = (64 << 10) + TAIL_OVERHEAD;
        a.dir = loop {
            let n = tail.min(len);
            let bytes = a.read_at(len - n, n)?;
            match Directory::read(&bytes, len).map_err(|e| a.import(e))? {
                Ok(dir) => break dir,
                Err(NeedTail(more)) if more > n => tail = more,
                Err(_) => return Err(a.import(ImportError::Zip("the zip directory is damaged".into()))),
            }
        };
        Ok(a)
    }

    fn import(&self, source: ImportError) -> Pt2Error {
        Pt2Error::Import { path: self.path.clone(), source }
    }

    fn read_at(&mut self, at: u64, n: u64) -> Result<Vec<u8>, Pt2Error> {
        let io = |source| Pt2Error::Io { path: self.path.clone(), source };
        self.file.seek(SeekFrom::Start(at)).map_err(io)?;
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
        self.file.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// The entry whose name ends with `suffix` under the archive's folder, if any.
    pub fn find(&self, suffix: &str) -> Result<Option<Entry>, Pt2Error> {
        self.dir.find(suffix).map(|e| e.cloned()).map_err(|e| self.import(e))
    }

    /// One entry's contents, at most `limit` bytes.
    pub fn read(&mut self, entry: &Entry, limit: u64) -> Result<Vec<u8>, Pt2Error> {
        // Refused before anything is read: a declared size over the limit, or stored
        // bytes more than deflate could need for it.
        if entry.size > limit || entry.compressed > limit.saturating_add(limit / 1000).saturating_add(1024) {
            let size = entry.size.max(entry.compressed);
            return Err(self.import(ImportError::TooLarge { what: entry.name.clone(), size, limit }));
        }
        let (at, n) = entry.span(self.dir.file_len);
        let bytes = self.read_at(at, n)?;
        entry.read(&bytes, limit).map_err(|e| self.import(e))
    }

    /// The exported model's graph (`models/model.json`), imported.
    pub fn model(&mut self) -> Result<shared::import::Imported, Pt2Error> {
        use shared::import::weights;
        let entry = shared::import::graph_entry(&self.dir).map_err(|e| self.import(e))?.clone();
        let json = self.read(&entry, shared::import::MAX_GRAPH_JSON)?;
        // The weights' configuration (not the weights) says which parameters are tied.
        let config = match self.find(weights::WEIGHTS_CONFIG)? {
            Some(e) => Some(self.read(&e, weights::MAX_CONFIG_BYTES)?),
            None => None,
        };
        let name = self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        shared::import::from_parts(&json, config.as_deref(), &name).map_err(|e| self.import(e))
    }
}
