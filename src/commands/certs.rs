//! `specter certs dev`: a self-signed certificate for local TLS.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("--out {0} names a file; --out is the directory that receives localhost.pem and localhost.key, e.g. --out certs")]
    OutIsFile(PathBuf),
    #[error("{0} already exists; pass --force to replace it (a running gateway reloads a replaced certificate)")]
    Exists(PathBuf),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A self-signed certificate and its key (PEM) for `localhost`, `127.0.0.1` and `::1`.
pub fn self_signed() -> Result<(String, String), CertsError> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    Ok((cert.pem(), signing_key.serialize_pem()))
}

/// Writes `localhost.pem` and `localhost.key` (mode 0600) into `out`; existing files
/// are replaced only with `force`.
pub fn dev(out: &Path, force: bool) -> Result<(PathBuf, PathBuf), CertsError> {
    let named_like_a_file = out.extension().is_some_and(|e| {
        ["pem", "key", "crt", "cer"]
            .iter()
            .any(|f| e.eq_ignore_ascii_case(f))
    });
    if (out.exists() && !out.is_dir()) || (!out.exists() && named_like_a_file) {
        return Err(CertsError::OutIsFile(out.to_owned()));
    }
    for name in ["localhost.pem", "localhost.key"] {
        let path = out.join(name);
        if !force && path.exists() {
            return Err(CertsError::Exists(path));
        }
    }
    let (cert, key) = self_signed()?;
    write_pair(out, "localhost", &cert, &key)
}

/// Writes `<name>.pem` (0644) and `<name>.key` (0600, created with that mode so the
/// key is never readable by others, not even briefly).
pub fn write_pair(
    out: &Path,
    name: &str,
    cert: &str,
    key: &str,
) -> Result<(PathBuf, PathBuf), CertsError> {
    let write = |path: PathBuf, mode: u32, text: &str| -> Result<PathBuf, CertsError> {
        let io = |source| CertsError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(out).map_err(io)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(io)?;
        // `mode` only applies to a file this call creates: narrow an existing one too.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        Ok(path)
    };
    let cert_path = write(out.join(format!("{name}.pem")), 0o644, cert)?;
    let key_path = write(out.join(format!("{name}.key")), 0o600, key)?;
    Ok((cert_path, key_path))
}
