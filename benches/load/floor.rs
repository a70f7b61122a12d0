//! The floor of the load benchmark: what a hyper proxy costs with no gateway logic.
//!
//! `floor proxy LISTEN UPSTREAM` is a hyper HTTP/1 server whose handler forwards each
//! request over one hyper `client::conn::http1` connection opened per client connection
//! (current-thread runtime: no pool, no checks, no headers added, no timers).
//! `floor serve LISTEN` is hyper's own hello server (200 "ok"), whose idle connections
//! are the per-connection memory floor.
//!
//! Built from the project's own hyper, so the ladder in `bench.py` starts where specter
//! would be with nothing of its own: `cargo build --release --example floor`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Reply = Response<BoxBody<Bytes, hyper::Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: floor proxy LISTEN UPSTREAM | floor serve LISTEN";
    let (mode, listen) = match (args.get(1), args.get(2)) {
        (Some(mode), Some(listen)) => (mode.as_str(), listen.as_str()),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let upstream = match (mode, args.get(3)) {
        ("proxy", Some(up)) => Some(up.clone()),
        ("serve", None) => None,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let result = match upstream {
                Some(upstream) => proxy(stream, &upstream).await,
                None => serve(stream).await,
            };
            if let Err(e) = result {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn serve(stream: TcpStream) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let hello = service_fn(|_: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), hello)
        .await?;
    Ok(())
}

/// One upstream connection per client connection, shared by its requests in turn.
async fn proxy(
    stream: TcpStream,
    upstream: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::spawn(connection);
    let sender = Arc::new(Mutex::new(sender));
    let forward = service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            // Origin form towards the upstream, as a proxy must send it.
            if let Some(path) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = path.into();
            }
            let reply: Result<Reply, hyper::Error> = sender
                .send_request(req)
                .await
                .map(|response| response.map(BodyExt::boxed));
            reply
        }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), forward)
        .await?;
    Ok(())
}
