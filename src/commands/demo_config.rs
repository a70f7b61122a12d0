//! `specter demo --write-config DIR` and `specter demo --backends-only`: the demo as
//! files a user owns. The written config is the demo's, with fresh keys (their
//! plaintext in a separate 0600 file), fixed loopback ports and a header saying how to
//! start the echo backends or point it at real ones.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::demo::{echo_upstream, ENVIRONMENTS, TEMPLATE};
use super::keys;
use crate::config::{hex, sha256};

pub const CONFIG_FILE: &str = "specter.toml";
pub const KEYS_FILE: &str = "keys.txt";

#[derive(Debug, thiserror::Error)]
pub enum WriteConfigError {
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error(
        "--write-config {0} is a file; name the directory that receives specter.toml and keys.txt"
    )]
    NotADirectory(PathBuf),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the written config sends each environment: the backends `--backends-only`
/// starts on `backend_port`, `+1` and `+2`.
fn backend(first_port: u16, i: usize) -> String {
    format!("127.0.0.1:{}", first_port.saturating_add(i as u16))
}

/// Writes `DIR/specter.toml` (gateway on `127.0.0.1:port`, admin on 9901) and
/// `DIR/keys.txt` (mode 0600, one `environment id key` line per key). Returns the
/// note to print.
pub fn write(
    dir: &Path,
    port: u16,
    backend_port: u16,
    force: bool,
) -> Result<String, WriteConfigError> {
    if dir.exists() && !dir.is_dir() {
        return Err(WriteConfigError::NotADirectory(dir.to_owned()));
    }
    let (config_path, keys_path) = (dir.join(CONFIG_FILE), dir.join(KEYS_FILE));
    for path in [&config_path, &keys_path] {
        if !force && path.exists() {
            return Err(WriteConfigError::Exists(path.clone()));
        }
    }
    let body = TEMPLATE
        .split_once("\n\n")
        .map_or(TEMPLATE, |(_header, rest)| rest);
    let mut text = header(backend_port)
        + &body
            .replace("@LISTEN@", &format!("http = \"127.0.0.1:{port}\""))
            .replace("@ADMIN@", "127.0.0.1:9901");
    let mut plain = String::from("# environment  key id  key (secret: hand each to its owner)\n");
    for (i, env) in ENVIRONMENTS.iter().enumerate() {
        let key = keys::generate(env);
        let upper = env.to_ascii_uppercase();
        text = text
            .replace(&format!("@{upper}@"), &backend(backend_port, i))
            .replace(&format!("@{upper}_SHA256@"), &hex(&sha256(key.as_bytes())))
            .replace(&format!("\"demo-{}\"", short(env)), &format!("\"{env}-1\""));
        plain.push_str(&format!("{env} {env}-1 {key}\n"));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteConfigError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_file(&config_path, 0o644, &text).map_err(io(&config_path))?;
    write_file(&keys_path, 0o600, &plain).map_err(io(&keys_path))?;
    Ok(note(&config_path, &keys_path, port, backend_port))
}

fn short(env: &str) -> &str {
    match env {
        "development" => "dev",
        "production" => "prod",
        other => other,
    }
}

fn header(backend_port: u16) -> String {
    format!(
        "# Written by `specter demo --write-config`: the demo's three environments with keys\n\
         # of their own (their plaintext is in keys.txt, mode 0600; only hashes live here).\n\
         #\n\
         # The upstreams are echo backends that `specter demo --backends-only --backend-port\n\
         # {backend_port}` starts on 127.0.0.1:{backend_port}..{}. To front real backends instead,\n\
         # change each environment's `upstream`. Validate with `specter check`.\n\n",
        backend_port.saturating_add(2)
    )
}

fn note(config: &Path, keys: &Path, port: u16, backend_port: u16) -> String {
    format!(
        "wrote {config} and {keys} (mode 0600: the plaintext keys)\n\n\
         Next:\n\
         \x20 specter demo --backends-only --backend-port {backend_port}   # echo backends, or edit `upstream` to real ones\n\
         \x20 specter check --config {config}\n\
         \x20 specter run --config {config}\n\
         \x20 curl -s -H \"x-api-key: $(awk '/^development/ {{print $3}}' {keys})\" http://127.0.0.1:{port}/hello\n",
        config = config.display(),
        keys = keys.display(),
    )
}

/// Created with `mode` so a key file is never readable by others, not even briefly.
fn write_file(path: &Path, mode: u32, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(text.as_bytes())
}

/// Starts the three echo backends on `first_port`, `+1`, `+2` (0: free ports).
pub async fn start_backends(first_port: u16) -> std::io::Result<Vec<(&'static str, SocketAddr)>> {
    let mut started = Vec::new();
    for (i, env) in ENVIRONMENTS.into_iter().enumerate() {
        let port = if first_port == 0 {
            0
        } else {
            first_port.saturating_add(i as u16)
        };
        started.push((env, echo_upstream_on(env, port).await?));
    }
    Ok(started)
}

async fn echo_upstream_on(env: &'static str, port: u16) -> std::io::Result<SocketAddr> {
    if port == 0 {
        return echo_upstream(env).await;
    }
    super::demo::echo_upstream_at(env, SocketAddr::from(([127, 0, 0, 1], port))).await
}
