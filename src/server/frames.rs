//! A connection's byte streams seen from the side: what the server must know
//! about a connection that hyper does not tell it, read from the bytes
//! without parsing what hyper parses.
//!
//! - [`Inbound`] follows what the client sends: HTTP/2 (the preface) or
//!   HTTP/1; when its handshake is complete (the HTTP/2 preface and its first
//!   frame, SETTINGS; or the first HTTP/1 request head), for the handshake
//!   deadline; the PING frames it sends, for [`PingPolicy`]; the highest
//!   stream it opened, for a GOAWAY of the server's own. It also drops one
//!   kind of frame: a WINDOW_UPDATE for a stream above the last stream id of
//!   the server's GOAWAY. The h2 crate ignores every other frame of such a
//!   stream, as RFC 9113 §6.8 says, but answers this one with a
//!   PROTOCOL_ERROR GOAWAY that resets every stream still being answered
//!   (a client whose HEADERS crossed the GOAWAY, then returned flow-control
//!   credit on that stream, cut the Waits and calls of a draining server).
//! - [`Outbound`] follows what the server writes: frame boundaries (a frame
//!   of opsd's own can only go between two of hyper's), the server's GOAWAY
//!   (its last stream id) and whether it sent HEADERS or DATA.
//! - [`PingPolicy`] polices the rate of client PINGs as grpc-go and
//!   grpc-java do; [`goaway`] builds the GOAWAY that refuses a client.
//!
//! Both scanners are incremental: bytes may arrive split anywhere.

use std::time::{Duration, Instant};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Every HTTP/2 frame starts with a 9-byte header.
const FRAME_HEADER: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
/// The ACK flag of PING and SETTINGS.
const ACK: u8 = 0x1;
/// The last stream id of a GOAWAY that refuses nothing yet.
const MAX_STREAM_ID: u32 = 0x7fff_ffff;

/// The error code of a GOAWAY that refuses a client which sends too much
/// (RFC 9113 §7).
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// What the client sent, as far as [`Inbound`] has read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum In {
    /// Comparing the first bytes with the HTTP/2 preface.
    Preface { matched: usize },
    /// HTTP/1, before the end of the first request head: the count of line
    /// ends in a row (a `\r` does not break a row).
    Head { line_ends: u8 },
    /// HTTP/1 after the first request head: nothing more to see.
    Passthrough,
    /// HTTP/2 at a frame boundary.
    FrameHeader,
    /// HTTP/2 inside a frame's payload.
    Payload { left: usize, keep: bool },
}

/// What one call of [`Inbound::scan`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// The bytes kept, moved to the front of the buffer.
    pub kept: usize,
    /// Where an incomplete frame header begins: `buf[held..]` must be
    /// handed back, before the next bytes, to the next scan.
    pub held: usize,
    /// PING frames (not acknowledgements) that began here.
    pub pings: u32,
    /// WINDOW_UPDATE frames dropped here.
    pub dropped: u32,
}

/// Follows the client's bytes (see the module documentation).
#[derive(Debug)]
pub struct Inbound {
    state: In,
    handshake: bool,
    /// Whether the first HTTP/2 frame has been read.
    first_frame_done: bool,
    /// The last stream id of the server's GOAWAY, once it has one below
    /// the maximum: frames for streams above it are ignored by the server.
    ignore_above: Option<u32>,
    /// The highest stream id the client sent HEADERS on.
    max_stream: u32,
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            state: In::Preface { matched: 0 },
            handshake: false,
            first_frame_done: false,
            ignore_above: None,
            max_stream: 0,
        }
    }
}

impl Inbound {
    /// Whether the client speaks HTTP/2 (its preface arrived whole).
    pub fn is_http2(&self) -> bool {
        matches!(self.state, In::FrameHeader | In::Payload { .. })
    }

    /// Whether the client speaks HTTP/1 and its first request head is
    /// whole: nothing more is watched.
    pub fn is_passthrough(&self) -> bool {
        self.state == In::Passthrough
    }

    /// Whether the handshake is complete: the HTTP/2 preface and the first
    /// frame, or the first HTTP/1 request head.
    pub fn handshake_done(&self) -> bool {
        self.handshake
    }

    /// The highest stream id the client opened.
    pub fn max_stream(&self) -> u32 {
        self.max_stream
    }

    /// The server sent a GOAWAY with this last stream id.
    pub fn server_goaway(&mut self, last_stream: u32) {
        if last_stream < MAX_STREAM_ID {
            self.ignore_above = Some(
                self.ignore_above
                    .map_or(last_stream, |l| l.min(last_stream)),
            );
        }
    }

    /// Scans the bytes that just arrived (after those held back by the
    /// previous scan) in place: see [`Scan`].
    pub fn scan(&mut self, buf: &mut [u8]) -> Scan {
        let mut scan = Scan::default();
        let (mut r, mut w) = (0, 0);
        while r < buf.len() {
            match self.state {
                In::Preface { matched } => {
                    if buf[r] != PREFACE[matched] {
                        // HTTP/1: the bytes matched so far begin its head.
                        let mut line_ends = 0;
                        for &b in &PREFACE[..matched] {
                            line_ends = head_step(line_ends, b);
                        }
                        self.state = In::Head { line_ends };
                        if line_ends >= 2 {
                            self.head_done();
                        }
                        continue;
                    }
                    buf[w] = buf[r];
                    (r, w) = (r + 1, w + 1);
                    self.state = if matched + 1 == PREFACE.len() {
                        In::FrameHeader
                    } else {
                        In::Preface {
                            matched: matched + 1,
                        }
                    };
                }
                In::Head { mut line_ends } => {
                    while r < buf.len() && line_ends < 2 {
                        line_ends = head_step(line_ends, buf[r]);
                        buf[w] = buf[r];
                        (r, w) = (r + 1, w + 1);
                    }
                    self.state = In::Head { line_ends };
                    if line_ends >= 2 {
                        self.head_done();
                    }
                }
                In::Passthrough => {
                    buf.copy_within(r.., w);
                    w += buf.len() - r;
                    r = buf.len();
                }
                In::FrameHeader => {
                    if buf.len() - r < FRAME_HEADER {
                        break;
                    }
                    let header = &buf[r..r + FRAME_HEADER];
                    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                    let (kind, flags) = (header[3], header[4]);
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                        & MAX_STREAM_ID;
                    let keep = !(kind == WINDOW_UPDATE
                        && stream != 0
                        && self.ignore_above.is_some_and(|last| stream > last));
                    match kind {
                        PING if flags & ACK == 0 => scan.pings += 1,
                        HEADERS => self.max_stream = self.max_stream.max(stream),
                        _ => {}
                    }
                    if keep {
                        buf.copy_within(r..r + FRAME_HEADER, w);
                        w += FRAME_HEADER;
                    } else {
                        scan.dropped += 1;
                    }
                    r += FRAME_HEADER;
                    self.state = In::Payload { left: len, keep };
                    if len == 0 {
                        self.frame_done();
                    }
                }
                In::Payload { left, keep } => {
                    let n = left.min(buf.len() - r);
                    if keep {
                        buf.copy_within(r..r + n, w);
                        w += n;
                    }
                    r += n;
                    self.state = In::Payload {
                        left: left - n,
                        keep,
                    };
                    if left == n {
                        self.frame_done();
                    }
                }
            }
        }
        scan.held = r;
        scan.kept = w;
        scan
    }

    fn head_done(&mut self) {
        self.state = In::Passthrough;
        self.handshake = true;
    }

    fn frame_done(&mut self) {
        self.state = In::FrameHeader;
        if !self.first_frame_done {
            self.first_frame_done = true;
            self.handshake = true;
        }
    }
}

/// One step of the search for the end of an HTTP/1 request head (an empty
/// line; `\n\n` and `\r\n\r\n` alike): the new count of line ends in a row.
fn head_step(line_ends: u8, byte: u8) -> u8 {
    match byte {
        b'\n' => line_ends + 1,
        b'\r' => line_ends,
        _ => 0,
    }
}

/// Follows the server's HTTP/2 bytes (see the module documentation).
#[derive(Debug, Default)]
pub struct Outbound {
    /// The header of the frame being written, while incomplete.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes left in the frame being written.
    left: usize,
    /// The frame being written is a GOAWAY: its first 8 payload bytes.
    goaway: Option<([u8; 8], usize)>,
    /// The server wrote HEADERS or DATA since this was last taken.
    sent_data: bool,
}

impl Outbound {
    /// Whether the server is between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Takes whether the server wrote HEADERS or DATA since the last take.
    pub fn take_sent_data(&mut self) -> bool {
        std::mem::take(&mut self.sent_data)
    }

    /// Follows `bytes`, just written. Returns the last stream id of a
    /// GOAWAY completed in them.
    pub fn scan(&mut self, mut bytes: &[u8]) -> Option<u32> {
        let mut goaway = None;
        while !bytes.is_empty() {
            if self.left == 0 {
                let n = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have < FRAME_HEADER {
                    break;
                }
                self.have = 0;
                let h = self.header;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                match h[3] {
                    HEADERS | DATA => self.sent_data = true,
                    GOAWAY if self.left >= 8 => self.goaway = Some(([0; 8], 0)),
                    _ => {}
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if let Some((payload, got)) = &mut self.goaway {
                let take = (8 - *got).min(n);
                payload[*got..*got + take].copy_from_slice(&bytes[..take]);
                *got += take;
                if *got == 8 {
                    let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & MAX_STREAM_ID;
                    goaway = Some(last);
                    self.goaway = None;
                }
            }
            self.left -= n;
            bytes = &bytes[n..];
        }
        goaway
    }
}

/// How many PINGs too soon a client may send before it is refused, as in
/// grpc-go and grpc-java.
pub const MAX_PING_STRIKES: u32 = 2;

/// The PING rate a client may keep: a PING that comes less than
/// `min_interval` after the previous one, while the server has sent no
/// HEADERS or DATA since, is a strike; a client with more than
/// [`MAX_PING_STRIKES`] is refused with GOAWAY `ENHANCE_YOUR_CALM`
/// (`too_many_pings`), which gRPC clients answer by pinging less often.
#[derive(Debug)]
pub struct PingPolicy {
    min_interval: Duration,
    last: Option<Instant>,
    strikes: u32,
}

impl PingPolicy {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            last: None,
            strikes: 0,
        }
    }

    /// A PING arrived at `now`; `server_sent` says whether the server sent
    /// HEADERS or DATA since the previous one. False: refuse the client.
    pub fn allow(&mut self, now: Instant, server_sent: bool) -> bool {
        if server_sent {
            self.strikes = 0;
        } else if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.min_interval)
        {
            self.strikes += 1;
        }
        self.last = Some(now);
        self.strikes <= MAX_PING_STRIKES
    }
}

/// A GOAWAY frame (RFC 9113 §6.8).
pub fn goaway(last_stream: u32, code: u32, debug: &[u8]) -> Vec<u8> {
    let len = (8 + debug.len()) as u32;
    let mut frame = Vec::with_capacity(FRAME_HEADER + len as usize);
    frame.extend_from_slice(&len.to_be_bytes()[1..]);
    frame.extend_from_slice(&[GOAWAY, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(&(last_stream & MAX_STREAM_ID).to_be_bytes());
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(debug);
    frame
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` in the given chunk sizes as the connection does
    /// (held bytes go in front of the next chunk); returns what was kept
    /// and the scans' totals.
    fn feed(inbound: &mut Inbound, bytes: &[u8], chunks: &[usize]) -> (Vec<u8>, u32, u32) {
        let (mut kept, mut pings, mut dropped) = (Vec::new(), 0, 0);
        let mut held = Vec::new();
        let mut rest = bytes;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).clamp(1, rest.len());
            let mut buf = std::mem::take(&mut held);
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let scan = inbound.scan(&mut buf);
            assert!(scan.kept <= scan.held && scan.held <= buf.len(), "{scan:?}");
            kept.extend_from_slice(&buf[..scan.kept]);
            held = buf[scan.held..].to_vec();
            pings += scan.pings;
            dropped += scan.dropped;
        }
        kept.extend_from_slice(&held);
        (kept, pings, dropped)
    }

    fn h2_client(after_goaway: bool) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        bytes.extend(frame(HEADERS, 0x4, 1, b"hdr"));
        bytes.extend(frame(PING, 0, 0, &[1; 8]));
        bytes.extend(frame(PING, ACK, 0, &[2; 8]));
        if after_goaway {
            bytes.extend(frame(HEADERS, 0x5, 3, b"late"));
        }
        bytes.extend(frame(WINDOW_UPDATE, 0, 3, &[0, 0, 1, 0]));
        bytes.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]));
        bytes.extend(frame(DATA, 0x1, 1, b"body"));
        bytes
    }

    #[test]
    fn http2_handshake_pings_and_streams() {
        let mut inbound = Inbound::default();
        let bytes = h2_client(false);
        let (kept, pings, dropped) = feed(&mut inbound, &bytes[..30], &[30]);
        assert_eq!(kept, &bytes[..30]);
        assert!(inbound.is_http2());
        assert!(!inbound.handshake_done(), "SETTINGS is not whole yet");
        let (kept, pings2, _) = feed(&mut inbound, &bytes[30..], &[7]);
        assert_eq!(kept, &bytes[30..]);
        assert!(inbound.handshake_done());
        assert_eq!((pings + pings2, dropped), (1, 0));
        assert_eq!(inbound.max_stream(), 1);
    }

    #[test]
    fn window_updates_above_the_servers_goaway_are_dropped() {
        let mut inbound = Inbound::default();
        let bytes = h2_client(true);
        // The last three frames: WINDOW_UPDATEs on stream 3 and 0, DATA.
        let split = bytes.len() - 39;
        feed(&mut inbound, &bytes[..split], &[5]);
        inbound.server_goaway(MAX_STREAM_ID); // the first, graceful one
        inbound.server_goaway(1);
        let (kept, _, dropped) = feed(&mut inbound, &bytes[split..], &[3]);
        assert_eq!(dropped, 1);
        let mut expected = frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]);
        expected.extend(frame(DATA, 0x1, 1, b"body"));
        assert_eq!(kept, expected);
    }

    #[test]
    fn http1_heads_end_at_an_empty_line() {
        for (text, done) in [
            (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], true),
            (b"GET / HTTP/1.1\nHost: x\n\n", true),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", false),
            (b"PRI * HTTP/1.1\r\n\r\n", true),
            (b"PRI * HT", false),
        ] {
            let mut inbound = Inbound::default();
            let (kept, _, _) = feed(&mut inbound, text, &[1]);
            assert_eq!(kept, text);
            assert_eq!(
                inbound.handshake_done(),
                done,
                "{:?}",
                String::from_utf8_lossy(text)
            );
            assert!(!inbound.is_http2());
        }
    }

    #[test]
    fn the_server_side_finds_goaways_and_boundaries() {
        let mut out = Outbound::default();
        let mut bytes = frame(0x4, 0, 0, &[]);
        bytes.extend(frame(HEADERS, 0x4, 1, b"h"));
        bytes.extend(goaway(7, 0, b"bye"));
        let found: Vec<u32> = bytes.chunks(4).filter_map(|c| out.scan(c)).collect();
        assert!(out.at_boundary());
        assert_eq!(found, [7]);
        assert!(out.take_sent_data());
        assert!(!out.take_sent_data());
        out.scan(&frame(DATA, 0, 1, b"abc")[..10]);
        assert!(!out.at_boundary());
    }

    #[test]
    fn pings_too_often_are_refused_unless_the_server_is_sending() {
        let start = Instant::now();
        let mut policy = PingPolicy::new(Duration::from_secs(10));
        assert!(policy.allow(start, false));
        for _ in 0..MAX_PING_STRIKES {
            assert!(policy.allow(start, false));
        }
        assert!(!policy.allow(start, false));

        let mut policy = PingPolicy::new(Duration::from_secs(10));
        for i in 0..10 {
            assert!(policy.allow(start + Duration::from_millis(i), true));
        }
        for i in 0..10 {
            assert!(policy.allow(start + Duration::from_secs(10 * i), false));
        }
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_bytes_and_events(
            chunks in proptest::collection::vec(1usize..40, 1..8),
            after_goaway in any::<bool>(),
        ) {
            let bytes = h2_client(after_goaway);
            let whole = {
                let mut inbound = Inbound::default();
                if after_goaway { inbound.server_goaway(1); }
                feed(&mut inbound, &bytes, &[bytes.len()])
            };
            let mut inbound = Inbound::default();
            if after_goaway { inbound.server_goaway(1); }
            let split = feed(&mut inbound, &bytes, &chunks);
            prop_assert_eq!(&split, &whole);
            prop_assert!(inbound.handshake_done());
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            chunks in proptest::collection::vec(1usize..50, 1..5),
        ) {
            let mut inbound = Inbound::default();
            let mut preface = PREFACE.to_vec();
            preface.extend_from_slice(&bytes);
            feed(&mut inbound, &preface, &chunks);
            let mut inbound = Inbound::default();
            feed(&mut inbound, &bytes, &chunks);
            Outbound::default().scan(&bytes);
        }
    }
}
