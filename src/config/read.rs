//! Reading the files an operator names (the config, certificates, keys, CAs): only
//! regular files, and only up to a cap.
//!
//! A path is the operator's, but what it points at may not be: a symlink to
//! `/dev/zero` would be read forever, and a FIFO would block the reload task until a
//! writer appears, so a revoked key would stay valid meanwhile. The file is opened
//! without blocking (`O_NONBLOCK` makes opening a FIFO return at once and has no effect
//! on regular files), then its type is checked on the open descriptor (no window
//! between the check and the read), then at most [`MAX_FILE_BYTES`] are read.

use std::fs::{File, FileType};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest file specter reads: a million keys take about 130 MiB of TOML.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("it is {0}, not a regular file; point the path at a regular file")]
    NotRegular(&'static str),
    #[error(
        "it is larger than the {} cap on files specter reads",
        bytesize::ByteSize(MAX_FILE_BYTES)
    )]
    TooLarge,
}

/// Reads the regular file at `path` (symlinks followed), at most [`MAX_FILE_BYTES`].
pub fn read_regular(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_capped(path, MAX_FILE_BYTES)
}

/// Opens the regular file at `path` for a streaming reader (which must stop at
/// [`MAX_FILE_BYTES`] itself, e.g. with `Read::take`).
pub fn open_regular(path: &Path) -> Result<File, ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(describe(meta.file_type())));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(file)
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let file = open_regular(path)?;
    let meta = file.metadata()?;
    if meta.len() > cap {
        return Err(ReadError::TooLarge);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between the size check and the read: the cap holds anyway.
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooLarge);
    }
    Ok(bytes)
}

fn describe(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer ever opens it: a blocking open would hang this test.
        assert!(matches!(
            read_regular(&fifo),
            Err(ReadError::NotRegular("a FIFO (named pipe)"))
        ));
        let link = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let err = read_regular(&link).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        assert!(matches!(
            read_regular(dir.path()),
            Err(ReadError::NotRegular(_))
        ));
    }

    #[test]
    fn a_file_over_the_cap_is_refused_and_names_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'#'; 2048]).unwrap();
        assert!(matches!(read_capped(&path, 1024), Err(ReadError::TooLarge)));
        assert_eq!(read_capped(&path, 4096).unwrap().len(), 2048);
        assert!(ReadError::TooLarge.to_string().contains("256.0 MiB"));
    }
}
