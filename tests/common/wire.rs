//! HTTP/2 below the client libraries, for the tests of hostile and careful
//! clients: hand-made frames over a raw socket ([`Raw`]), and the `h2`
//! crate's client with control of its windows and a record of the GOAWAY
//! frames it received ([`H2`]).

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpSocket, TcpStream},
};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const NO_ERROR: u32 = 0;
pub const PROTOCOL_ERROR: u32 = 1;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One HTTP/2 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Self {
        Self {
            kind,
            flags,
            stream,
            payload: payload.to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = (self.payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend_from_slice(&[self.kind, self.flags]);
        bytes.extend_from_slice(&self.stream.to_be_bytes());
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    /// A GOAWAY's (last stream id, error code, debug data).
    pub fn goaway(&self) -> Option<(u32, u32, Vec<u8>)> {
        if self.kind != GOAWAY || self.payload.len() < 8 {
            return None;
        }
        let p = &self.payload;
        Some((
            u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
            u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            p[8..].to_vec(),
        ))
    }
}

/// A request's header block in HPACK, every field a literal without
/// indexing (no table, no Huffman), as any decoder must accept.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    let string = |block: &mut Vec<u8>, s: &str| {
        assert!(s.len() < 127, "short strings only");
        block.push(s.len() as u8);
        block.extend_from_slice(s.as_bytes());
    };
    for (name, value) in fields {
        block.push(0x00);
        string(&mut block, name);
        string(&mut block, value);
    }
    block
}

/// The header block of a gRPC call to `path`.
pub fn grpc_headers(path: &str) -> Vec<u8> {
    header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "opsd.test"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// A gRPC message: its 5-byte prefix and `bytes`.
pub fn grpc_message(bytes: &[u8]) -> Vec<u8> {
    let mut message = vec![0];
    message.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    message.extend_from_slice(bytes);
    message
}

/// A raw socket speaking hand-made frames.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(address: &str) -> Self {
        Self {
            stream: TcpStream::connect(address).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Connects and sends the preface and an empty SETTINGS.
    pub async fn handshake(address: &str) -> Self {
        let mut raw = Self::connect(address).await;
        let mut hello = PREFACE.to_vec();
        hello.extend(Frame::new(SETTINGS, 0, 0, &[]).encode());
        raw.send(&hello).await;
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn send_frame(&mut self, frame: Frame) {
        self.send(&frame.encode()).await;
    }

    /// The next frame; `None` once the server closed (or reset) the
    /// connection.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let frame = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until `until` holds for one (returned last), answering the
    /// server's PINGs and SETTINGS; `None` if the connection closed first.
    pub async fn frames_until(&mut self, until: impl Fn(&Frame) -> bool) -> Option<Vec<Frame>> {
        let mut seen = Vec::new();
        loop {
            let frame = self.frame().await?;
            if frame.kind == PING && frame.flags & ACK == 0 {
                self.send_frame(Frame::new(PING, ACK, 0, &frame.payload))
                    .await;
            }
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                self.send_frame(Frame::new(SETTINGS, ACK, 0, &[])).await;
            }
            let done = until(&frame);
            seen.push(frame);
            if done {
                return Some(seen);
            }
        }
    }

    /// Reads until the server closes the connection; the frames it sent.
    pub async fn until_closed(&mut self) -> Vec<Frame> {
        let mut seen = Vec::new();
        while let Some(frame) = self.frame().await {
            seen.push(frame);
        }
        seen
    }
}

/// Reads until the server closes `stream` (end of file or a reset), at most
/// `within`; the bytes it sent. Panics if it stays open.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server kept the connection open for {within:?}"));
    got
}

/// The GOAWAY frames a connection received: (last stream id, error code).
pub type GoAways = Arc<Mutex<Vec<(u32, u32)>>>;

/// A TCP stream that records the GOAWAY frames it reads, under the `h2`
/// crate's client (which keeps their last stream id to itself).
pub struct Watched {
    stream: TcpStream,
    goaways: GoAways,
    buf: Vec<u8>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = out.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, out);
        if let Poll::Ready(Ok(())) = polled {
            this.buf.extend_from_slice(&out.filled()[start..]);
            while this.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, this.buf[0], this.buf[1], this.buf[2]]) as usize;
                if this.buf.len() < 9 + len {
                    break;
                }
                let frame = Frame::new(this.buf[3], this.buf[4], 0, &this.buf[9..9 + len]);
                if let Some((last, code, _)) = frame.goaway() {
                    this.goaways.lock().unwrap().push((last, code));
                }
                this.buf.drain(..9 + len);
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// How an `h2` client connects.
#[derive(Clone, Copy, Debug)]
pub struct H2Options {
    /// The socket's receive buffer (SO_RCVBUF), if set.
    pub recv_buffer: Option<u32>,
    /// The stream and connection flow-control windows.
    pub window: u32,
}

impl Default for H2Options {
    fn default() -> Self {
        Self {
            recv_buffer: None,
            window: 65_535,
        }
    }
}

/// An `h2` client connection and the GOAWAYs it received.
pub struct H2 {
    pub send: h2::client::SendRequest<Bytes>,
    pub goaways: GoAways,
    pub task: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl H2 {
    pub async fn connect(address: &str, options: H2Options) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = options.recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = socket.connect(address.parse().unwrap()).await.unwrap();
        let goaways = GoAways::default();
        let io = Watched {
            stream,
            goaways: goaways.clone(),
            buf: Vec::new(),
        };
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(options.window)
            .initial_connection_window_size(options.window)
            .handshake(io)
            .await
            .unwrap();
        let task = tokio::spawn(connection);
        Self {
            send,
            goaways,
            task,
        }
    }

    /// Starts a gRPC call of `path` with `message` (already encoded).
    pub async fn start(
        &mut self,
        path: &str,
        message: &[u8],
    ) -> Result<h2::client::ResponseFuture, h2::Error> {
        self.start_raw(path, &grpc_message(message)).await
    }

    /// A gRPC call of `path` with `message`, read to its end.
    pub async fn call(&mut self, path: &str, message: &[u8]) -> Answer {
        let response = self.start(path, message).await.unwrap();
        read_answer(response, Duration::ZERO).await.unwrap()
    }

    /// Starts a gRPC call of `path` whose whole request body is `body`.
    pub async fn start_raw(
        &mut self,
        path: &str,
        body: &[u8],
    ) -> Result<h2::client::ResponseFuture, h2::Error> {
        let (response, mut stream) = self.open(path).await?;
        stream.send_data(Bytes::copy_from_slice(body), true)?;
        Ok(response)
    }

    /// Opens a gRPC call of `path` whose body the caller sends.
    pub async fn open(
        &mut self,
        path: &str,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        let request = Request::post(format!("http://opsd.test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        self.send = self.send.clone().ready().await?;
        self.send.send_request(request, false)
    }

    /// The last stream id of the first GOAWAY below the maximum, if any.
    pub fn last_stream(&self) -> Option<u32> {
        self.goaways
            .lock()
            .unwrap()
            .iter()
            .map(|(last, _)| *last)
            .find(|last| *last < 0x7fff_ffff)
    }
}

/// A gRPC answer read to its end.
#[derive(Debug)]
pub struct Answer {
    pub headers: HeaderMap,
    pub data: Vec<u8>,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    /// The `grpc-status` (trailers, or the headers of a trailers-only
    /// answer).
    pub fn code(&self) -> Option<tonic::Code> {
        let status =
            tonic::Status::from_header_map(self.trailers.as_ref().unwrap_or(&self.headers))?;
        Some(status.code())
    }

    pub fn status(&self) -> Option<tonic::Status> {
        tonic::Status::from_header_map(self.trailers.as_ref().unwrap_or(&self.headers))
    }
}

/// Reads a response to its end, releasing flow-control credit as it reads
/// (the `h2` crate then sends WINDOW_UPDATEs), after `pause` per chunk.
pub async fn read_answer(
    response: h2::client::ResponseFuture,
    pause: Duration,
) -> Result<Answer, h2::Error> {
    let response = response.await?;
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        data.extend_from_slice(&chunk);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?;
    Ok(Answer {
        headers: parts.headers,
        data,
        trailers,
    })
}
