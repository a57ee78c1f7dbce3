//! The IO of one accepted connection as hyper sees it: the TCP stream (or
//! the TLS stream over it, [`Socket`]), with the scanners of
//! [`super::frames`] on both sides, over the decrypted bytes.
//!
//! Reading, [`ConnIo`] reports the handshake to the connection's state (for
//! its deadline), polices the client's PINGs (a client over the rate gets
//! a read error here, which ends the connection, and its task sends the
//! GOAWAY `too_many_pings`), and drops the WINDOW_UPDATE frames that the h2
//! crate would answer with a PROTOCOL_ERROR GOAWAY once the server has sent
//! its own GOAWAY. Bytes of an incomplete frame header are held back until
//! the rest arrives, so such a frame can be dropped whole. Writing, it
//! follows the server's frames: its GOAWAY, and where a frame of opsd's
//! own may go.
//!
//! When hyper drops the IO, the stream goes back to the connection's task
//! ([`Handback`]), which closes it gracefully: a lingering close needs the
//! socket after hyper is done with it.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::oneshot,
};
use tokio_rustls::server::TlsStream;

use super::{
    connections::ConnState,
    frames::{Inbound, Outbound, PingPolicy},
};

/// A read into a buffer with less room than this goes through a scratch
/// buffer of this size, so held bytes and a frame header always fit.
const SCRATCH: usize = 256;

/// An accepted connection's byte stream: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Socket {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Plain(s) => s.is_write_vectored(),
            Socket::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What the connection's task gets back when hyper drops the IO.
#[derive(Debug)]
pub struct Handback {
    pub stream: Socket,
    /// The client spoke HTTP/2.
    pub http2: bool,
    /// The server's last frame was written whole: a frame may follow.
    pub at_boundary: bool,
    /// The highest stream the client opened.
    pub max_stream: u32,
    /// The client sent PINGs over the rate and was refused.
    pub too_many_pings: bool,
}

/// The TCP stream of one connection, watched (see the module docs).
#[derive(Debug)]
pub struct ConnIo {
    /// Taken when the IO is dropped, to go back to the task.
    stream: Option<Socket>,
    state: Arc<ConnState>,
    inbound: Inbound,
    outbound: Outbound,
    /// Scanned bytes of an incomplete frame header, not given to hyper yet.
    held: Vec<u8>,
    /// Kept bytes that did not fit in hyper's buffer.
    pending: Vec<u8>,
    pings: PingPolicy,
    too_many_pings: bool,
    back: Option<oneshot::Sender<Handback>>,
}

impl ConnIo {
    /// Watches `stream`; when hyper drops the IO, the stream goes to `back`.
    pub fn new(
        stream: Socket,
        state: Arc<ConnState>,
        min_ping_interval: Duration,
        back: oneshot::Sender<Handback>,
    ) -> Self {
        Self {
            stream: Some(stream),
            state,
            inbound: Inbound::default(),
            outbound: Outbound::default(),
            held: Vec::new(),
            pending: Vec::new(),
            pings: PingPolicy::new(min_ping_interval),
            too_many_pings: false,
            back: Some(back),
        }
    }

    /// Reads into `dst` (after the held bytes) and scans what arrived.
    /// `Ok(None)`: everything read was held back or dropped.
    fn read_scanned(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<Option<()>>> {
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(Ok(Some(())));
        };
        if self.inbound.is_passthrough() {
            // HTTP/1 after its first request head: nothing more to watch.
            return Pin::new(stream).poll_read(cx, dst).map_ok(Some);
        }
        let start = dst.filled().len();
        let held = std::mem::take(&mut self.held);
        dst.put_slice(&held);
        let polled = Pin::new(stream).poll_read(cx, dst);
        if !matches!(polled, Poll::Ready(Ok(()))) {
            dst.set_filled(start);
            self.held = held;
            return polled.map_ok(Some);
        }
        let end = dst.filled().len();
        if end == start + held.len() {
            // End of stream: whatever was held goes to hyper as it is.
            return Poll::Ready(Ok(Some(())));
        }
        let scan = self.inbound.scan(&mut dst.filled_mut()[start..end]);
        self.held = dst.filled()[start + scan.held..end].to_vec();
        dst.set_filled(start + scan.kept);
        if self.inbound.handshake_done() && !self.state.handshake() {
            self.state.set_handshake();
        }
        if scan.dropped > 0 {
            tracing::debug!(
                frames = scan.dropped,
                "dropped WINDOW_UPDATE frames for streams past the server's GOAWAY"
            );
        }
        if scan.pings > 0 {
            let now = Instant::now();
            for _ in 0..scan.pings {
                let sent = self.outbound.take_sent_data();
                if !self.pings.allow(now, sent) {
                    self.too_many_pings = true;
                }
            }
            if self.too_many_pings {
                return Poll::Ready(Err(too_many_pings()));
            }
        }
        Poll::Ready(Ok((scan.kept > 0).then_some(())))
    }
}

fn too_many_pings() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "too many pings")
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let n = this.pending.len().min(out.remaining());
            out.put_slice(&this.pending[..n]);
            this.pending.drain(..n);
            return Poll::Ready(Ok(()));
        }
        if this.too_many_pings {
            return Poll::Ready(Err(too_many_pings()));
        }
        loop {
            if out.remaining() >= SCRATCH {
                if ready!(this.read_scanned(cx, out))?.is_some() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let mut scratch = [0u8; SCRATCH];
            let mut buf = ReadBuf::new(&mut scratch);
            if ready!(this.read_scanned(cx, &mut buf))?.is_some() {
                let kept = buf.filled();
                let n = kept.len().min(out.remaining());
                out.put_slice(&kept[..n]);
                this.pending.extend_from_slice(&kept[n..]);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl ConnIo {
    /// Follows `n` bytes the server just wrote, from `bufs`.
    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        if !self.inbound.is_http2() {
            return;
        }
        for buf in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(buf.len());
            if let Some(last) = self.outbound.scan(&buf[..take]) {
                self.inbound.server_goaway(last);
            }
            n -= take;
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let n = ready!(Pin::new(stream).poll_write(cx, data))?;
        this.wrote(&[io::IoSlice::new(data)], n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let n = ready!(Pin::new(stream).poll_write_vectored(cx, bufs))?;
        this.wrote(bufs, n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            // The task may be gone (a runtime shutting down): then the
            // stream simply closes.
            let _ = back.send(Handback {
                stream,
                http2: self.inbound.is_http2(),
                at_boundary: self.outbound.at_boundary(),
                max_stream: self.inbound.max_stream(),
                too_many_pings: self.too_many_pings,
            });
        }
    }
}
