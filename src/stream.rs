//! A socket that is either plain TCP or TLS, so the rest of the proxy reads and writes one type.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A client-facing or server-facing connection.
pub enum Stream {
    /// Unencrypted TCP.
    Plain(TcpStream),
    /// TLS accepted from a client.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS opened by pgvigil to a node.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => s.get_ref().0,
        }
    }

    /// Registers the socket with the I/O driver of the runtime this is called on, leaving the one
    /// it was registered with (a connection moving to another data-plane thread). A plain socket
    /// is deregistered there and registered here (two `epoll_ctl` calls). A TLS stream cannot
    /// give its socket up and take it back, so its descriptor is duplicated, the duplicate
    /// registered here, and the old one deregistered and closed (four calls). Either way the
    /// socket and any TLS state above it stay as they were; on an error the socket is closed.
    pub fn reregister(self) -> io::Result<Stream> {
        match self {
            // `into_std` leaves the socket non-blocking, as `from_std` requires.
            Stream::Plain(s) => Ok(Stream::Plain(TcpStream::from_std(s.into_std()?)?)),
            Stream::ServerTls(mut s) => {
                register_duplicate(s.get_mut().0)?;
                Ok(Stream::ServerTls(s))
            }
            Stream::ClientTls(mut s) => {
                register_duplicate(s.get_mut().0)?;
                Ok(Stream::ClientTls(s))
            }
        }
    }

    /// Waits until a plain socket may hold bytes (tokio's readiness); a TLS stream is ready at
    /// once, since it may hold bytes it decrypted while its socket has none. For a read that
    /// follows one that drained the socket: tokio cleared the readiness, so the read would only
    /// register the wake-up, which this does through fewer layers.
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(tcp) => tcp.poll_read_ready(cx),
            Stream::ServerTls(_) | Stream::ClientTls(_) => Poll::Ready(Ok(())),
        }
    }

    /// Reads once into `buf`'s spare room (tokio-util's `poll_read_buf`), reading a plain
    /// socket directly rather than through this type's `AsyncRead` dispatch. Ready with 0 when
    /// the peer closed (or `buf` has no room).
    pub fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut impl BufMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(tcp) => tokio_util::io::poll_read_buf(Pin::new(tcp), cx, buf),
            tls => tokio_util::io::poll_read_buf(Pin::new(tls), cx, buf),
        }
    }

    /// Writes what the socket takes of `data` (at least one byte; 0 only for empty `data`).
    ///
    /// A plain socket is written with one `send` while tokio's readiness says it may take bytes,
    /// rather than through `AsyncWrite`, whose cooperative budget and readiness poll cost about
    /// 150 instructions per write; a socket that is not ready registers the wake-up. Unlike
    /// tokio's `poll_write`, a write the socket took only in part leaves the readiness as it
    /// is: the next write finds the socket full and clears it (one system call more each time
    /// a socket's buffer fills, which only a large result or COPY does).
    pub fn poll_write_some(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Stream::Plain(tcp) = self else {
            return Pin::new(self).poll_write(cx, data);
        };
        loop {
            match tcp.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
            ready!(tcp.poll_write_ready(cx))?;
        }
    }
}

/// Replaces `tcp` with a duplicate of its descriptor registered with the calling runtime's I/O
/// driver, deregistering and closing the old one. The duplicate shares the file description,
/// O_NONBLOCK included, as tokio requires.
fn register_duplicate(tcp: &mut TcpStream) -> io::Result<()> {
    let duplicate: std::net::TcpStream = socket2::SockRef::from(&*tcp).try_clone()?.into();
    drop(std::mem::replace(tcp, TcpStream::from_std(duplicate)?));
    Ok(())
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Sets the socket options every proxied connection gets: no Nagle delay, TCP keepalive.
pub fn tune_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10));
    sock.set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::runtime::Builder;

    use super::*;

    /// A runtime of one thread, driving its I/O only while it runs, as a data-plane thread's.
    fn runtime() -> tokio::runtime::Runtime {
        Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn a_reregistered_socket_is_driven_by_the_runtime_it_moved_to() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let addr = listener.local_addr().expect("its address");
        let first = runtime();
        let stream = first
            .block_on(TcpStream::connect(addr))
            .expect("a connection");
        let (mut peer, _) = listener.accept().expect("the peer's end");
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        // `first` stays alive but never runs again: a socket still registered with it would
        // never be found ready, and the moved side's reads would time out.
        let moved = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut stream = Stream::Plain(stream).reregister()?;
                let mut byte = [0u8; 1];
                for round in 0..3u8 {
                    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte));
                    assert_eq!(read.await??, 1, "a byte arrives");
                    assert_eq!(byte[0], round);
                    stream.write_all(&[round]).await?;
                }
                io::Result::Ok(())
            })
        });
        let mut echo = [0u8; 1];
        for round in 0..3u8 {
            peer.write_all(&[round]).expect("the peer writes");
            peer.read_exact(&mut echo).expect("the echo");
            assert_eq!(echo[0], round);
        }
        moved
            .join()
            .expect("the moved side did not panic")
            .expect("the moved side's reads and writes");
        drop(first);
    }

    #[test]
    fn a_full_socket_takes_the_rest_once_its_peer_reads() {
        const TOTAL: usize = 64 << 20;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let addr = listener.local_addr().expect("its address");
        // Far more than loopback's socket buffers hold: the writes find the socket full, wait
        // for it, and are woken when the peer has read.
        let reader = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().expect("the peer's end");
            peer.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("a read timeout");
            let (mut got, mut chunk) = (0usize, vec![0u8; 1 << 16]);
            while got < TOTAL {
                let n = peer.read(&mut chunk).expect("the peer reads");
                assert!(n > 0, "closed after {got} bytes");
                for (i, byte) in chunk[..n].iter().enumerate() {
                    assert_eq!(usize::from(*byte), (got + i) % 251, "byte {}", got + i);
                }
                got += n;
            }
        });
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        let waits = runtime().block_on(async move {
            let mut stream = Stream::Plain(TcpStream::connect(addr).await?);
            let (mut written, mut waits) = (0, 0);
            // One deadline for all the writes: a timeout per write would poll a write that was
            // never woken when it expires, and find the socket ready by then.
            let all = async {
                while written < TOTAL {
                    let n = std::future::poll_fn(|cx| {
                        let polled = stream.poll_write_some(cx, &data[written..]);
                        waits += usize::from(polled.is_pending());
                        polled
                    })
                    .await?;
                    assert!(n > 0, "a write moved nothing");
                    written += n;
                }
                io::Result::Ok(())
            };
            tokio::time::timeout(Duration::from_secs(20), all).await??;
            io::Result::Ok(waits)
        });
        let waits = waits.expect("every byte written");
        reader.join().expect("the peer read every byte as written");
        assert!(waits > 0, "the socket was never found full");
    }
}
