//! One client connection served: HTTP/2 when its first bytes are HTTP/2's preface,
//! HTTP/1.1 (with upgrades) otherwise, until it ends or the gateway drains it.
//!
//! This is what hyper-util's automatic builder does, with the first bytes kept by
//! [`ClientIo`] instead of a buffer of its own: see [`ClientIo::poll_sniff`] for why.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::io::{ClientIo, Protocol};
use crate::conn::{Closing, ConnSignals};

type BoxError = Box<dyn StdError + Send + Sync>;

/// hyper's connection settings for both protocols.
pub struct Builders<E> {
    pub http1: http1::Builder,
    pub http2: http2::Builder<E>,
}

pin_project_lite::pin_project! {
    /// The connection's future: it also hears the sweeper's
    /// [`Close`](crate::conn::Close): a drain asks hyper to finish gracefully, a
    /// passed deadline ends the connection at once.
    pub struct Served<I, S, E>
    where
        S: HttpService<Incoming>,
    {
        #[pin]
        stage: Stage<I, S, E>,
        signals: Arc<ConnSignals>,
        draining: bool,
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<I, S, E>
    where
        S: HttpService<Incoming>,
    {
        Sniffing {
            io: Option<ClientIo<I>>,
            service: Option<S>,
            builders: Arc<Builders<E>>,
        },
        Http1 { #[pin] conn: http1::UpgradeableConnection<TokioIo<ClientIo<I>>, S> },
        // Boxed: hyper's HTTP/2 connection is twice the size of its HTTP/1 one (1,584
        // against 728 bytes here), and the larger variant would size every
        // connection's task.
        Http2 { conn: Pin<Box<http2::Connection<TokioIo<ClientIo<I>>, S, E>>> },
        // Drained before its first bytes arrived.
        Closed,
    }
}

impl<I, S: HttpService<Incoming>, E> Served<I, S, E> {
    pub fn new(
        io: ClientIo<I>,
        service: S,
        builders: Arc<Builders<E>>,
        signals: Arc<ConnSignals>,
    ) -> Self {
        Served {
            stage: Stage::Sniffing {
                io: Some(io),
                service: Some(service),
                builders,
            },
            signals,
            draining: false,
        }
    }
}

impl<I, S, E, B> Future for Served<I, S, E>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Http2ServerConnExec<S::Future, B>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let closing = this.signals.close.poll(cx);
        if closing == Closing::Now {
            return Poll::Ready(Ok(()));
        }
        if !*this.draining && closing == Closing::Drain {
            *this.draining = true;
            match this.stage.as_mut().project() {
                StageProj::Sniffing { .. } => this.stage.set(Stage::Closed),
                StageProj::Http1 { conn } => conn.graceful_shutdown(),
                StageProj::Http2 { conn } => conn.as_mut().graceful_shutdown(),
                StageProj::Closed => {}
            }
        }
        loop {
            let next = match this.stage.as_mut().project() {
                StageProj::Sniffing {
                    io,
                    service,
                    builders,
                } => {
                    let io_ref = io.as_mut().expect("present until sniffed");
                    let protocol = ready!(Pin::new(io_ref).poll_sniff(cx))?;
                    let io = TokioIo::new(io.take().expect("present until sniffed"));
                    let service = service.take().expect("present until sniffed");
                    match protocol {
                        Protocol::Http1 => Stage::Http1 {
                            conn: builders.http1.serve_connection(io, service).with_upgrades(),
                        },
                        Protocol::Http2 => Stage::Http2 {
                            conn: Box::pin(builders.http2.serve_connection(io, service)),
                        },
                    }
                }
                StageProj::Http1 { conn } => return conn.poll(cx).map_err(Into::into),
                StageProj::Http2 { conn } => return conn.as_mut().poll(cx).map_err(Into::into),
                StageProj::Closed => return Poll::Ready(Ok(())),
            };
            this.stage.set(next);
        }
    }
}
