//! TCP sockets for the request path, read and written with rustix's system calls
//! instead of libc's.
//!
//! glibc makes `recv`, `send`, `writev` and `accept4` cancellation points: once a process
//! has a second thread (specter always has one: notify's watcher, and the log writers),
//! every such call switches the thread's cancellation type on and off around the system
//! call, two atomic read-modify-writes. A proxied HTTP/1 request makes four. Measured on
//! the load benchmark's floor, a single-threaded hyper proxy: one parked extra thread cost
//! it +1.9% CPU per request (10 alternating pairs, every one positive); specter's profile
//! had the two glibc functions at ~120 ns a request, which the floor does not pay.
//!
//! Readiness is tokio's, kept as for its own `TcpStream`: a read that did not fill its
//! buffer, or a write that did not take all it was given, clears it, so that the next
//! one waits for epoll instead of making a system call that would only say "again".

use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, SocketFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listening socket whose accepted connections are [`Socket`]s.
pub struct Listener(AsyncFd<std::net::TcpListener>);

impl Listener {
    /// Registers `listener` with the runtime, which it needs to be running.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        Ok(Listener(register(listener)?))
    }

    /// Spends a unit of the task's tokio budget per attempt, as tokio's own listener
    /// does (`AsyncFd::readable` does not): without it, a burst of connections was all
    /// accepted in one go before any of them was served, and the requests they then
    /// sent together held twice as many upstream connections open (3,000 at once:
    /// ~300 against ~150).
    pub async fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        loop {
            tokio::task::coop::consume_budget().await;
            let mut ready = self.0.readable().await?;
            let accepted = ready.try_io(|listener| {
                let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
                let (fd, peer) = again_if_interrupted(|| {
                    rustix::net::acceptfrom_with(listener.get_ref(), flags)
                })?;
                let peer = peer
                    .and_then(|peer| SocketAddr::try_from(peer).ok())
                    .ok_or_else(|| io::Error::other("accepted a connection with no IP peer"))?;
                Ok((Socket::new(std::net::TcpStream::from(fd))?, peer))
            });
            if let Ok(accepted) = accepted {
                return accepted;
            }
        }
    }
}

/// A connected TCP socket, as tokio's `TcpStream` is for the request path.
pub struct Socket(AsyncFd<std::net::TcpStream>);

impl Socket {
    fn new(stream: std::net::TcpStream) -> io::Result<Socket> {
        Ok(Socket(register(stream)?))
    }

    /// Takes over a connection tokio opened (moved from its registration to this one).
    pub fn from_tokio(stream: tokio::net::TcpStream) -> io::Result<Socket> {
        Socket::new(stream.into_std()?)
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.0.get_ref().set_nodelay(nodelay)
    }

    /// Whether tokio holds read readiness (bytes, or the peer's close) that no read has
    /// consumed yet. No system call.
    pub fn read_ready(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.0.poll_read_ready(&mut cx).is_ready()
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }

    /// One read or write: waits for readiness, makes the call, and clears readiness
    /// when the call says the socket is drained (or full): it moved fewer than `len`
    /// bytes, or would have blocked.
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        direction: Direction,
        len: usize,
        mut call: impl FnMut() -> rustix::io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(match direction {
                Direction::Read => self.0.poll_read_ready(cx),
                Direction::Write => self.0.poll_write_ready(cx),
            })?;
            match again_if_interrupted(&mut call) {
                Ok(n) => {
                    if n > 0 && n < len {
                        ready.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

enum Direction {
    Read,
    Write,
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: `recv` only writes initialised bytes into the slice, and only the
        // number of them it returns is marked initialised below.
        let unfilled = unsafe { buf.unfilled_mut() };
        let len = unfilled.len();
        let n = ready!(self.poll_io(cx, Direction::Read, len, || {
            rustix::net::recv(self.fd(), &mut *unfilled, RecvFlags::empty())
                .map(|((read, _), _)| read.len())
        }))?;
        // SAFETY: the kernel wrote the first `n` bytes of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // No SIGPIPE for a peer that left: the error comes back as `EPIPE`.
        self.poll_io(cx, Direction::Write, buf.len(), || {
            rustix::net::send(self.fd(), buf, SendFlags::NOSIGNAL)
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // `writev` has no flags: Rust's runtime ignores SIGPIPE, as for std's `writev`.
        let len = bufs.iter().map(|b| b.len()).sum();
        self.poll_io(cx, Direction::Write, len, || {
            rustix::io::writev(self.fd(), bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.get_ref().shutdown(Shutdown::Write))
    }
}

/// Registers `io` with the runtime's reactor, which must be running.
fn register<T: AsRawFd>(io: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: only std's `TcpListener` and `TcpStream` come here: each owns its
    // descriptor for its whole life and always returns that one.
    unsafe { AsyncFd::register(io) }.map_err(|e| e.into_parts().1)
}

/// A system call retried while a signal interrupts it (libc's callers see `EINTR` too).
fn again_if_interrupted<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(Errno::INTR) => continue,
            done => return done.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (Socket, tokio::net::TcpStream) {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std.local_addr().unwrap();
        let listener = Listener::new(std).unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        let (socket, peer) = accepted.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        (socket, client)
    }

    /// Bytes both ways, a vectored write, a read after a partial one (its readiness
    /// cleared, it must still wake for the next bytes), and the peer's close as 0.
    #[tokio::test]
    async fn an_accepted_socket_carries_bytes_both_ways_and_sees_the_close() {
        let (mut socket, mut client) = pair().await;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 64];
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert!(!socket.read_ready(), "a partial read clears the readiness");
        let bufs = [IoSlice::new(b"po"), IoSlice::new(b"ng")];
        let written = socket.write_vectored(&bufs).await.unwrap();
        assert_eq!(written, 4);
        socket.write_all(b"!").await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong!");
        client.write_all(b"again").await.unwrap();
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"again");
        socket.shutdown().await.unwrap();
        assert_eq!(
            client.read(&mut got).await.unwrap(),
            0,
            "the shutdown reached the peer"
        );
        drop(client);
        assert_eq!(socket.read(&mut buf).await.unwrap(), 0);
    }

    /// Accepting a burst yields to the runtime a budget at a time, as tokio's listener
    /// does: the connections already accepted get served in between.
    #[tokio::test]
    async fn a_burst_of_connections_is_accepted_a_budget_at_a_time() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let std = socket.listen(1024).unwrap().into_std().unwrap();
        let addr = std.local_addr().unwrap();
        let listener = Listener::new(std).unwrap();
        let burst = 300;
        let clients: Vec<_> = (0..burst)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // The first accept waits for the reactor to report the backlog readable; the
        // rest of the burst then needs no waiting, only the budget yields.
        listener.accept().await.unwrap();
        let served = Arc::new(AtomicBool::new(false));
        let other = tokio::spawn({
            let served = served.clone();
            async move { served.store(true, Ordering::SeqCst) }
        });
        let mut other_ran_after = None;
        for i in 1..burst {
            listener.accept().await.unwrap();
            if other_ran_after.is_none() && served.load(Ordering::SeqCst) {
                other_ran_after = Some(i);
            }
        }
        other.await.unwrap();
        assert!(
            other_ran_after.is_some(),
            "all {burst} connections were accepted before any other task ran"
        );
        drop(clients);
    }

    /// A write that fills the socket's buffers waits for the peer to read, then goes on.
    #[tokio::test]
    async fn a_write_past_the_socket_buffers_waits_for_the_reader() {
        let (mut socket, mut client) = pair().await;
        let big = vec![7u8; 8 * 1024 * 1024];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        socket.write_all(&big).await.unwrap();
        socket.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), big);
    }
}
