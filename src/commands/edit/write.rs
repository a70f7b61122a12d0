//! Replacing the config file so that a reader (the gateway's watcher, an editor) sees
//! either the old file or the whole new one, never a half-written one, and never
//! overwriting a change someone else made since we read it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::EditError;
use crate::config::{sha256, KeyDigest};

/// Writes `bytes` to a temp file beside `path` (same permissions, and owner where
/// allowed), fsyncs it, checks that `path` still has SHA-256 `expected`, and renames
/// the temp file over it. A symlink is written through (its target is replaced).
/// Returns the new file's SHA-256. On any error the file is left as it was.
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    expected: &KeyDigest,
) -> Result<KeyDigest, EditError> {
    let write_err = |source| EditError::Write {
        path: path.to_path_buf(),
        source,
    };
    let target = fs::canonicalize(path).map_err(write_err)?;
    let meta = fs::metadata(&target).map_err(write_err)?;
    let dir = target.parent().unwrap_or(Path::new("/"));
    let (tmp_path, file) = create_temp(dir, &target).map_err(write_err)?;
    let result = fill(file, bytes, &meta)
        .map_err(write_err)
        .and_then(|()| ensure_unchanged(path, &target, expected))
        .and_then(|()| fs::rename(&tmp_path, &target).map_err(write_err));
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    result?;
    // The rename is durable once the folder is synced; the data already is.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(sha256(bytes))
}

fn create_temp(dir: &Path, target: &Path) -> io::Result<(PathBuf, File)> {
    let name = target
        .file_name()
        .map_or("config".into(), |n| n.to_string_lossy());
    let mut last_err = None;
    for _ in 0..8 {
        let tmp = dir.join(format!(
            ".{name}.specter-{:016x}.tmp",
            rand::random::<u64>()
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free temp file name")))
}

fn fill(mut file: File, bytes: &[u8], original: &fs::Metadata) -> io::Result<()> {
    // Owner first: chown may clear set-id bits, which set_permissions restores.
    let _ = std::os::unix::fs::fchown(&file, Some(original.uid()), Some(original.gid()));
    file.set_permissions(fs::Permissions::from_mode(original.permissions().mode()))?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn ensure_unchanged(path: &Path, target: &Path, expected: &KeyDigest) -> Result<(), EditError> {
    match fs::read(target) {
        Ok(now) if sha256(&now) == *expected => Ok(()),
        Ok(_) => Err(EditError::Changed {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(EditError::Changed {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(EditError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}
