//! Where the service's bytes enter and leave: a TCP socket, or an in-memory
//! pipe for a simulated run.
//!
//! The server accepts from a `Listener` and the lab's traffic generator
//! connects to a `Target`; the composition root picks which kind. Over TCP
//! they are what they always were. In memory, a connection is a pair of
//! `tokio::io::duplex` halves: bytes still pass through hyper on both ends
//! (request line, headers, bodies, keep-alive), but nothing leaves the
//! process, and a task waiting for them is woken through its waker, never by
//! the operating system. That is what lets a whole service run on a paused
//! tokio clock without the clock jumping past an answer still on its way
//! (a real socket's readiness comes from outside the runtime, so the paused
//! clock would auto-advance while it waited).
//!
//! This module must not know what travels over it: no HTTP here.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Bytes buffered each way in an in-memory connection, as a socket's buffers
/// would hold them: a writer that gets this far ahead of its reader waits.
const PIPE_BUFFER: usize = 64 * 1024;

/// Connections accepted by an in-memory listener and not yet taken.
const BACKLOG: usize = 1024;

/// One connection, either kind.
#[derive(Debug)]
pub enum Connection {
    Tcp(TcpStream),
    Memory(DuplexStream),
}

impl Connection {
    /// The socket's descriptor, for `reset_now` (a pipe has none).
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Connection::Tcp(stream) => Some(stream.as_raw_fd()),
            Connection::Memory(_) => None,
        }
    }

    /// Sends small writes at once over TCP (no Nagle delay); nothing to do
    /// in memory.
    fn no_delay(self) -> Self {
        if let Connection::Tcp(stream) = &self {
            stream.set_nodelay(true).ok();
        }
        self
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Connection::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Tcp(s) => s.is_write_vectored(),
            Connection::Memory(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_flush(cx),
            Connection::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where connections arrive.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Memory(MemoryListener),
}

impl Listener {
    /// The next connection. In memory, once every `Target` that could
    /// connect is gone, this waits for ever (as a quiet socket does).
    pub async fn accept(&mut self) -> io::Result<Connection> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _peer) = listener.accept().await?;
                Ok(Connection::Tcp(stream).no_delay())
            }
            Listener::Memory(listener) => match listener.incoming.recv().await {
                Some(stream) => Ok(Connection::Memory(stream)),
                None => std::future::pending().await,
            },
        }
    }

    /// The socket's address; none in memory.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(listener) => listener.local_addr().ok(),
            Listener::Memory(_) => None,
        }
    }
}

/// The receiving end of in-memory connections.
#[derive(Debug)]
pub struct MemoryListener {
    incoming: mpsc::Receiver<DuplexStream>,
}

/// Where a client connects: a socket address, or an in-memory listener.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(SocketAddr),
    Memory(MemoryConnector),
}

impl Target {
    /// A new connection; refused once the listener is gone.
    pub async fn connect(&self) -> io::Result<Connection> {
        match self {
            Target::Tcp(addr) => Ok(Connection::Tcp(TcpStream::connect(addr).await?).no_delay()),
            Target::Memory(connector) => connector.connect().await.map(Connection::Memory),
        }
    }

    /// What a request's `Host` header says.
    pub fn host(&self) -> String {
        match self {
            Target::Tcp(addr) => addr.to_string(),
            Target::Memory(_) => "reliability-lab.memory".to_owned(),
        }
    }
}

/// The sending end: each `connect` hands the listener one half of a new pipe.
#[derive(Debug, Clone)]
pub struct MemoryConnector {
    listener: mpsc::Sender<DuplexStream>,
}

impl MemoryConnector {
    async fn connect(&self) -> io::Result<DuplexStream> {
        let (client, server) = tokio::io::duplex(PIPE_BUFFER);
        self.listener.send(server).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the in-memory listener is closed",
            )
        })?;
        Ok(client)
    }
}

/// A listener and the connector that reaches it, for one in-memory service.
pub fn memory() -> (MemoryConnector, MemoryListener) {
    let (listener, incoming) = mpsc::channel(BACKLOG);
    (MemoryConnector { listener }, MemoryListener { incoming })
}

/// Makes the socket behind `fd` end with a reset (RST) when it is closed,
/// instead of an orderly close: SO_LINGER on with a zero timeout. Set at
/// the moment a fault resets a connection, never before: with it set, an
/// ordinary close would throw away an answer still in the send buffer.
/// The caller owns `fd` and closes it right after.
pub fn reset_on_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid pointer to a linger of the right size; a bad fd
    // is an error return, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not set SO_LINGER for a reset");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn bytes_cross_an_in_memory_connection_both_ways_on_a_paused_clock() {
        let (connector, listener) = memory();
        let mut listener = Listener::Memory(listener);
        let target = Target::Memory(connector);
        let server = tokio::spawn(async move {
            let mut conn = listener.accept().await.unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).await.unwrap();
            // An answer that takes a simulated second.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            conn.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
            listener
        });
        let started = tokio::time::Instant::now();
        let mut conn = target.connect().await.unwrap();
        conn.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        conn.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"PING");
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(1));
        assert!(target.host().contains("memory"));
        drop(server.await.unwrap());
        let refused = target.connect().await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }
}
