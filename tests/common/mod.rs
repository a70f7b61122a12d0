//! Shared test harness: real upstreams on 127.0.0.1:0 that record what they received,
//! a real gateway started from TOML text, and real clients (hyper, raw TCP).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use specter::config::{hex, sha256};
use specter::Gateway;

/// One request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body_len: u64,
}

/// How a recording upstream answers.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// 200 with body "<name>".
    Ok,
    /// Waits this long before answering.
    Delay(Duration),
    /// Streams a response body of this many bytes.
    LargeBody(u64),
}

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub received: Arc<Mutex<Vec<Recorded>>>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Upstream {
        Upstream::start_with(name, Behaviour::Ok).await
    }

    pub async fn start_with(name: &'static str, behaviour: Behaviour) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let rec = rec.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(name, behaviour, rec.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            name,
            received,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

async fn answer(
    name: &'static str,
    behaviour: Behaviour,
    rec: Arc<Mutex<Vec<Recorded>>>,
    req: Request<Incoming>,
) -> Result<Response<specter::body::Body>, std::convert::Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        body_len += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    rec.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.to_string()),
        headers: parts.headers.clone(),
        body_len,
    });
    let body = match behaviour {
        Behaviour::Ok => specter::body::full(Bytes::from_static(name.as_bytes())),
        Behaviour::Delay(d) => {
            tokio::time::sleep(d).await;
            specter::body::full(Bytes::from_static(name.as_bytes()))
        }
        Behaviour::LargeBody(n) => stream_zeros(n),
    };
    Ok(Response::new(body))
}

/// A body of `n` zero bytes produced in 64 KiB chunks, never held whole.
pub fn stream_zeros(n: u64) -> specter::body::Body {
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(chunk.len() as u64);
            let frame = hyper::body::Frame::data(chunk.slice(..take as usize));
            Some((Ok::<_, specter::body::BoxError>(frame), left - take))
        }
    });
    http_body_util::StreamBody::new(stream).boxed()
}

pub fn key_block(env: &str, id: &str, key: &str) -> String {
    format!(
        "[[environments.{env}.keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n",
        hex(&sha256(key.as_bytes()))
    )
}

/// One environment in front of `up`, with extra settings (TOML lines ending in `\n`)
/// and one key.
pub fn single_environment(env: &str, up: &Upstream, extra: &str, id: &str, key: &str) -> String {
    format!(
        "[environments.{env}]\nupstream = \"{}\"\n{extra}{}",
        up.url(),
        key_block(env, id, key)
    )
}

pub struct TestGateway {
    pub gateway: Gateway,
    pub http: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl TestGateway {
    /// Starts a gateway from config text. `[listen]` is prepended unless the text has one.
    pub async fn start(toml: &str) -> TestGateway {
        let text = if toml.contains("[listen]") {
            toml.to_owned()
        } else {
            format!("[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{toml}")
        };
        let loaded = specter::config::parse(&text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
        let gateway = Gateway::start(loaded.config).await.expect("gateway starts");
        TestGateway {
            http: gateway.http_addr().unwrap(),
            admin: gateway.admin_addr(),
            gateway,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts a gateway error answer: status, JSON `error` code, request id present.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(self.headers["content-type"], "application/json");
        let json = self.json();
        assert_eq!(json["error"], code, "{json}");
        assert!(!json["message"].as_str().unwrap().is_empty());
        let id = json["request_id"].as_str().unwrap();
        assert_eq!(self.headers["x-request-id"], id);
    }
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Answer {
    let response = client.request(req).await.expect("gateway answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET `url` with the given headers.
pub async fn get(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(client, req.body(Full::new(Bytes::new())).unwrap()).await
}

/// Writes raw bytes on a fresh connection and reads until the server closes it or
/// `timeout` passes. Returns what was read.
pub async fn raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Path of the built `specter` binary (integration tests only).
pub fn specter_bin() -> &'static str {
    env!("CARGO_BIN_EXE_specter")
}

/// A spawned `specter` process, killed when dropped so a failing test never leaves it
/// holding the test harness's pipes.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one run of the `specter` binary produced.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `specter ARGS` from the package root to its end, feeding `stdin` if given.
pub fn run_specter(args: &[&str], stdin: Option<&str>) -> Run {
    run_specter_env(args, stdin, &[])
}

/// [`run_specter`] with extra environment variables.
pub fn run_specter_env(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(specter_bin())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .env_remove("SPECTER_CONFIG")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the specter binary starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes()).expect("stdin is written");
        // Dropping the pipe closes it: the binary sees end of input.
    }
    let out = child.wait_with_output().expect("specter runs to the end");
    Run {
        code: out
            .status
            .code()
            .unwrap_or_else(|| panic!("specter {args:?} was killed by a signal")),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `specter run --config CONFIG --log-format json`, stderr (the JSON log) into `log`,
/// `RUST_LOG` as given (unset for `None`), until `/readyz` on `admin` answers 200.
/// `Err` holds the exit status and the log when it exits or is not ready within `limit`.
pub async fn spawn_json_logged(
    config: &Path,
    log: &Path,
    rust_log: Option<&str>,
    admin: SocketAddr,
    limit: Duration,
) -> Result<Child, String> {
    use std::process::{Command, Stdio};
    let mut command = Command::new(specter_bin());
    command
        .args(["run", "--config"])
        .arg(config)
        .args(["--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = Child(command.spawn().expect("specter starts"));
    let (c, readyz) = (client(), format!("http://{admin}/readyz"));
    let ready = poll_until(limit, || {
        let request = c.get(readyz.parse().unwrap());
        async move { request.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    match child.0.try_wait().unwrap() {
        None if ready => Ok(child),
        exited => Err(format!(
            "(exit: {exited:?})\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )),
    }
}

/// A `specter run` process serving a config file, its stderr (the JSON log) captured
/// in a file beside it; killed when dropped.
pub struct SpecterProcess {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub log: std::path::PathBuf,
}

impl SpecterProcess {
    /// Writes `config(http, admin)` to `path` and runs `specter run` on it, on fresh
    /// loopback ports, until `/readyz` answers 200 and the file watcher is in place
    /// (the "specter running" line is logged once it is).
    pub async fn start<F>(path: &Path, config: F) -> SpecterProcess
    where
        F: Fn(SocketAddr, SocketAddr) -> String,
    {
        on_free_ports(|http, admin| {
            SpecterProcess::try_start(path, config(http, admin), http, admin)
        })
        .await
    }

    async fn try_start(
        path: &Path,
        text: String,
        http: SocketAddr,
        admin: SocketAddr,
    ) -> Result<SpecterProcess, String> {
        std::fs::write(path, text).unwrap();
        let log = path.with_extension("log");
        let child = spawn_json_logged(path, &log, None, admin, Duration::from_secs(10)).await?;
        let process = SpecterProcess {
            child,
            http,
            admin,
            log,
        };
        // The watcher is in place once "specter running" is logged.
        let running = poll_until(Duration::from_secs(10), || {
            std::future::ready(process.log_text().contains("specter running"))
        })
        .await;
        if running {
            Ok(process)
        } else {
            Err(format!(
                "no \"specter running\" line:\n{}",
                process.log_text()
            ))
        }
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// The `(line, col)` of the first `specter.toml:LINE:COL` in an error message.
pub fn config_location(error: &str) -> (usize, usize) {
    let rest = error
        .split_once("specter.toml:")
        .unwrap_or_else(|| panic!("no specter.toml:LINE:COL in {error:?}"))
        .1;
    let mut parts = rest.splitn(3, ':');
    let mut number = || -> usize {
        parts
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no LINE:COL after the file name in {error:?}"))
    };
    let (line, col) = (number(), number());
    assert!(line >= 1 && col >= 1, "{error}");
    (line, col)
}

/// A loopback address nothing listens on right now (bound, noted, released). Another
/// test may take it before it is used: helpers that start the binary on it retry when
/// the log says the address is in use.
pub fn free_addr() -> SocketAddr {
    let [addr] = free_addrs();
    addr
}

/// `N` distinct free loopback addresses: all are held bound until the last is picked, so
/// the kernel cannot hand the same port out twice (released one by one, it may).
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let held: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|listener| listener.local_addr().unwrap())
}

/// Polls `check` every 10 ms until it holds (true) or `limit` passes (false).
pub async fn poll_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `start` on two fresh loopback addresses (for `http` and `admin`). The addresses
/// are picked free just before, so another test (or a third address the start picks
/// itself) may take one in between: a start that fails with "address in use" or with
/// two listeners on one port ("clashes", the config check) in its error text, e.g. the
/// binary's log, is tried again on new ones; any other failure fails the test with that
/// text.
pub async fn on_free_ports<T, F, Fut>(mut start: F) -> T
where
    F: FnMut(SocketAddr, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    for _ in 0..3 {
        let [http, admin] = free_addrs();
        match start(http, admin).await {
            Ok(started) => return started,
            Err(why) if why.contains("in use") || why.contains("clashes") => continue,
            Err(why) => panic!("specter did not start:\n{why}"),
        }
    }
    panic!("three starts found their ports taken")
}
