//! `specter keys`: mint keys and turn keys into the TOML blocks that store their hash;
//! add, revoke, rotate and list the keys of a config file.
//!
//! - `change`: `add`, `revoke`, `rotate`, edits through `commands::edit`
//! - `entries`: an environment's keys inside the `toml_edit` document
//! - `list`: the keys with their state and, from a running gateway, their usage
//! - `when`: the time arguments and the date-times written into the file

mod change;
mod entries;
mod list;
mod plan;
pub mod when;

use rand::Rng;

pub use change::{
    add, plan_add, plan_revoke, plan_rotate, revoke, rotate, AddRequest, EditOptions, RotateRequest,
};
pub use list::{list, ListRequest, State};
pub use plan::Plan;

use crate::config::{hex, sha256, valid_environment_name, valid_key_id};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 32 base62 characters: 190 bits of randomness (DESIGN asks for at least 160).
const RANDOM_CHARS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("environment name {0:?} is not valid; use lower-case letters, digits, '_' and '-'")]
    BadEnvironment(String),
    #[error(
        "key id {0:?} is not valid; use 1-128 letters, digits or -_.:@/, not starting with '_'"
    )]
    BadId(String),
    #[error(
        "the key does not name its environment (it is not an spk_<env>_... key); pass --env NAME"
    )]
    NoEnvironment,
    #[error("no key on standard input")]
    Empty,
    #[error("reading standard input: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Edit(Box<crate::commands::edit::EditError>),
    #[error("no key \"{id}\" in environment {env}; {known}")]
    UnknownKey {
        id: String,
        env: String,
        known: String,
    },
    #[error("key id \"{id}\" is already used in {env}; pass another --id, or leave it out to get a free one")]
    IdTaken { id: String, env: String },
    #[error("the key on standard input is an spk_{named}_... key, for environment {named}, not {env}; a key belongs to one environment: pass --env {named}, or mint a new key for {env}")]
    WrongEnvironment { named: String, env: String },
    #[error("not_before {not_before} is not earlier than not_after {not_after}; the key could never be used")]
    Window {
        not_before: String,
        not_after: String,
    },
    #[error("key \"{id}\" in {env} is staged (not_before {not_before}) and would end before it starts; it never worked, so remove it with `specter keys revoke --env {env} --id {id} --remove` and add a new one")]
    StagedRotation {
        id: String,
        env: String,
        not_before: String,
    },
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// A fresh key `spk_<env>_<random>` from the OS-seeded CSPRNG.
pub fn generate(env: &str) -> String {
    let mut rng = rand::rng();
    let random: String = (0..RANDOM_CHARS)
        .map(|_| BASE62[rng.random_range(0..62)] as char)
        .collect();
    format!("spk_{env}_{random}")
}

/// The `[[environments.ENV.keys]]` block that stores `key` as its SHA-256.
pub fn toml_block(env: &str, id: &str, key: &str) -> String {
    format!(
        "[[environments.{env}.keys]]\nid     = \"{id}\"\nsha256 = \"{}\"\n",
        hex(&sha256(key.as_bytes()))
    )
}

fn default_id(env: &str) -> String {
    let mut rng = rand::rng();
    let suffix: String = (0..6)
        .map(|_| BASE62[rng.random_range(0..36)] as char)
        .collect::<String>()
        .to_lowercase();
    format!("{env}-{suffix}")
}

/// `keys new`: the key (printed once, never stored) and its TOML block.
pub fn new(env: &str, id: Option<&str>) -> Result<String, KeysError> {
    if !valid_environment_name(env) {
        return Err(KeysError::BadEnvironment(env.to_owned()));
    }
    let id = id.map(str::to_owned).unwrap_or_else(|| default_id(env));
    if !valid_key_id(&id) {
        return Err(KeysError::BadId(id));
    }
    let key = generate(env);
    Ok(format!(
        "{key}\n\n# The key above is shown once: hand it to its owner now. Paste this into the config:\n{}",
        toml_block(env, &id, &key)
    ))
}

/// `keys hash`: the TOML block for an existing key read from `input`. Without `env`,
/// the environment is the one an `spk_<env>_<random>` key names.
pub fn hash(env: Option<&str>, id: Option<&str>, input: &str) -> Result<String, KeysError> {
    let key = input.trim();
    if key.is_empty() {
        return Err(KeysError::Empty);
    }
    let env = env
        .or_else(|| environment_of(key))
        .ok_or(KeysError::NoEnvironment)?;
    if !valid_environment_name(env) {
        return Err(KeysError::BadEnvironment(env.to_owned()));
    }
    let id = id.map(str::to_owned).unwrap_or_else(|| default_id(env));
    if !valid_key_id(&id) {
        return Err(KeysError::BadId(id));
    }
    Ok(toml_block(env, &id, key))
}

/// The environment an `spk_<env>_<random>` key names.
fn environment_of(key: &str) -> Option<&str> {
    let (env, _) = key.strip_prefix("spk_")?.rsplit_once('_')?;
    valid_environment_name(env).then_some(env)
}

/// `keys usage`: per-key request counts and last-seen times from a running gateway's
/// admin `/keys`, as a table.
pub async fn usage(admin: &str) -> Result<String, UsageError> {
    let rows = fetch_rows(admin).await?;
    let text = |v: &Option<String>| v.as_deref().unwrap_or("-").to_owned();
    let mut out = format!(
        "{:<14} {:<24} {:>10}  {:<22} {:<16} {}\n",
        "ENVIRONMENT", "KEY ID", "REQUESTS", "LAST SEEN", "LAST IP", "NOT AFTER"
    );
    for r in &rows {
        out.push_str(&format!(
            "{:<14} {:<24} {:>10}  {:<22} {:<16} {}\n",
            r.environment,
            r.key_id,
            r.requests,
            text(&r.last_seen),
            text(&r.last_ip),
            text(&r.not_after),
        ));
    }
    Ok(out)
}

/// The rows of a running gateway's admin `/keys`.
async fn fetch_rows(admin: &str) -> Result<Vec<crate::admin::KeyRow>, UsageError> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| UsageError::Connect(admin.to_owned(), e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::get("/keys")
        .header(http::header::HOST, admin)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("static request");
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        return Err(UsageError::Status(response.status()));
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cannot reach the admin listener at {0}: {1}; is the gateway running, and is that its listen.admin?")]
    Connect(String, #[source] std::io::Error),
    #[error("admin request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the admin listener answered {0}")]
    Status(http::StatusCode),
    #[error("the admin listener sent something other than the /keys JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads one line from stdin without echoing it when stdin is a terminal.
pub fn read_secret_line() -> Result<String, KeysError> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let _echo = if tty { EchoOff::new() } else { None };
    if tty {
        eprint!("API key (not echoed): ");
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    if tty {
        eprintln!();
    }
    Ok(line)
}

/// Terminal echo switched off for as long as it lives.
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Option<EchoOff> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed, then filled, termios.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            (libc::tcsetattr(0, libc::TCSANOW, &t) == 0).then_some(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let k = generate("qa");
        let random = k.strip_prefix("spk_qa_").unwrap();
        assert_eq!(random.len(), RANDOM_CHARS);
        assert!(random.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(generate("qa"), k);
        // 62^32 > 2^160
        assert!((RANDOM_CHARS as f64) * 62f64.log2() >= 160.0);
    }

    #[test]
    fn hash_takes_the_environment_from_the_key_or_asks_for_it() {
        let block = hash(None, Some("x"), "spk_qa_abcdef\n").unwrap();
        assert!(block.starts_with("[[environments.qa.keys]]"), "{block}");
        assert!(
            !block.contains("spk_qa_abcdef"),
            "the key itself is never printed"
        );
        assert!(hash(Some("production"), Some("x"), "spk_qa_abcdef")
            .unwrap()
            .contains("environments.production"));
        assert!(matches!(
            hash(None, Some("x"), "legacy-key-123"),
            Err(KeysError::NoEnvironment)
        ));
        assert!(matches!(hash(None, None, "  \n"), Err(KeysError::Empty)));
    }
}
