//! The overload workload: GetOperation over many connections with several
//! streams each, to measure what a shedding server promises: goodput (OK
//! answers per second), the latency of the OK calls, the status codes seen
//! (from the server's own `opsd_rpc_total`), and the server's CPU and RSS.
//!
//! Three ways to load:
//! - closed loop: every stream of every connection busy, the next call sent
//!   as soon as the last one is answered (the saturation rate);
//! - closed loop honouring refusals: a stream whose call was refused waits
//!   `--retry-after` (opsd's `RetryInfo` says 1 s) before its next call, as
//!   a gRPC client that honours `RetryInfo` or REST's `Retry-After` does;
//! - open loop at `--rate` calls per second (1× and 2× the saturation rate),
//!   latency counted from each call's intended send time; a call waits on
//!   the client while its connection has `--streams` calls in flight, and
//!   that wait counts too. Refused calls are not retried.
//!
//! The generator must cost far less per call than the server, or it would
//! measure itself: it speaks HTTP/2 on raw sockets with pre-encoded frames
//! (one request template whose stream id is patched, literal HPACK fields)
//! and reads back only frame headers. A call answered with a message (DATA,
//! then trailers) is OK; one answered with trailers only is a refusal,
//! whose code the server's metrics tell.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinSet,
};

use crate::load::{server_usage, BenchError};

/// How hard to push.
#[derive(Clone, Debug)]
pub struct OverloadOptions {
    /// `host:port` of the server.
    pub address: String,
    pub connections: usize,
    /// Calls in flight per connection at most.
    pub streams: usize,
    /// Calls per second on a fixed schedule; `None`: closed loop.
    pub rate: Option<f64>,
    /// Closed loop: how long a refused stream waits before its next call.
    pub retry_after: Option<Duration>,
    pub duration: Duration,
    /// The operation every call reads.
    pub name: String,
    /// A local server's pid: its CPU time and RSS.
    pub server_pid: Option<u32>,
}

/// What a run measured.
#[derive(Debug)]
pub struct OverloadReport {
    pub elapsed: Duration,
    pub ok: u64,
    /// Calls answered with trailers only (refused: the server's codes say
    /// which), and calls reset.
    pub refused: u64,
    pub reset: u64,
    /// Latency of the OK calls, µs.
    pub ok_latency: Histogram<u64>,
    /// GetOperation calls by code, counted by the server (its metrics).
    pub server_codes: BTreeMap<String, u64>,
    /// Connections that failed, by error (their calls are not counted).
    pub failed: BTreeMap<String, u64>,
    /// Server CPU seconds over the run, and RSS at its end.
    pub server: Option<(Duration, u64)>,
    /// The generator's own CPU seconds over the run: near 1 s/s, it and
    /// not the server is the limit.
    pub generator_cpu: Option<Duration>,
}

impl OverloadReport {
    /// OK answers per second.
    pub fn goodput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn summary(&self) -> String {
        let q = |p: f64| self.ok_latency.value_at_quantile(p);
        let secs = self.elapsed.as_secs_f64();
        let mut line = format!(
            "goodput {:.0}/s; refused {:.0}/s; reset {}; OK latency µs p50 {} p99 {} max {}; server codes {:?}",
            self.goodput(),
            self.refused as f64 / secs,
            self.reset,
            q(0.5),
            q(0.99),
            self.ok_latency.max(),
            self.server_codes,
        );
        if !self.failed.is_empty() {
            line.push_str(&format!("; failed connections {:?}", self.failed));
        }
        if let Some((cpu, rss)) = self.server {
            line.push_str(&format!(
                "; server CPU {:.2} s/s, RSS {:.1} MiB",
                cpu.as_secs_f64() / secs,
                rss as f64 / (1024.0 * 1024.0)
            ));
        }
        if let Some(cpu) = self.generator_cpu {
            line.push_str(&format!(
                "; generator CPU {:.2} s/s",
                cpu.as_secs_f64() / secs
            ));
        }
        line
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// One call's HEADERS and DATA frames; the stream id goes at
/// [`STREAM_AT`] of both.
struct Template {
    bytes: Vec<u8>,
    data_at: usize,
}

const STREAM_AT: usize = 5;

impl Template {
    fn new(authority: &str, name: &str) -> Self {
        // HPACK: `:method POST` and `:scheme http` from the static table,
        // the rest literal without indexing (RFC 7541 §6.2.2).
        let mut block = vec![0x83, 0x86];
        let literal = |block: &mut Vec<u8>, name_index: u8, value: &str| {
            assert!(value.len() < 127);
            if name_index < 15 {
                block.push(name_index);
            } else {
                block.extend_from_slice(&[0x0f, name_index - 15]);
            }
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        };
        literal(&mut block, 4, "/google.longrunning.Operations/GetOperation");
        literal(&mut block, 1, authority);
        literal(&mut block, 31, "application/grpc");
        block.extend_from_slice(&[0x00, 2, b't', b'e', 8]);
        block.extend_from_slice(b"trailers");
        let message = opsd::pb::google::longrunning::GetOperationRequest { name: name.into() }
            .encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let mut bytes = frame(HEADERS, END_HEADERS, 0, &block);
        let data_at = bytes.len();
        bytes.extend(frame(DATA, END_STREAM, 0, &body));
        Self { bytes, data_at }
    }

    fn write(&self, stream: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let id = stream.to_be_bytes();
        out[start + STREAM_AT..start + STREAM_AT + 4].copy_from_slice(&id);
        let data = start + self.data_at + STREAM_AT;
        out[data..data + 4].copy_from_slice(&id);
    }
}

/// What one connection measured.
struct Tally {
    ok: u64,
    refused: u64,
    reset: u64,
    latency: Histogram<u64>,
}

/// How a connection gets its calls.
enum Feed {
    /// Closed loop; refused streams wait this long (if set).
    Closed {
        until: Instant,
        retry_after: Option<Duration>,
    },
    /// Open loop: intended send times.
    Open(mpsc::UnboundedReceiver<Instant>),
}

/// Drives one connection until its feed ends and its calls are answered.
async fn connection(
    address: String,
    streams: usize,
    template: std::sync::Arc<Template>,
    mut feed: Feed,
) -> Result<Tally, BenchError> {
    let mut socket = TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    socket.set_nodelay(true)?;
    let mut out = PREFACE.to_vec();
    // A large connection window, so answers never wait for credit.
    out.extend(frame(SETTINGS, 0, 0, &[0, 4, 0x00, 0x10, 0x00, 0x00]));
    out.extend(frame(0x8, 0, 0, &(1u32 << 30).to_be_bytes()));
    socket.write_all(&out).await?;
    let (mut reader, mut writer) = socket.into_split();

    let mut tally = Tally {
        ok: 0,
        refused: 0,
        reset: 0,
        latency: Histogram::new(3)?,
    };
    // Stream → (when its latency counts from, DATA seen).
    let mut open: HashMap<u32, (Instant, bool)> = HashMap::new();
    let mut next_id: u32 = 1;
    // Calls waiting for a stream (open loop), or streams waiting after a
    // refusal (closed loop: the time they may go again).
    let mut waiting: VecDeque<Instant> = VecDeque::new();
    let mut received_data = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    let mut feeding = true;
    if let Feed::Closed { .. } = feed {
        let now = Instant::now();
        waiting.extend(std::iter::repeat_n(now, streams));
    }
    loop {
        // Start what may start.
        out.clear();
        let now = Instant::now();
        let closed_until = match &feed {
            Feed::Closed { until, .. } => Some(*until),
            Feed::Open(_) => None,
        };
        while open.len() < streams {
            let Some(&at) = waiting.front() else { break };
            if closed_until.is_some() && (at > now || now >= closed_until.unwrap_or(now)) {
                break;
            }
            waiting.pop_front();
            let from = if closed_until.is_some() { now } else { at };
            template.write(next_id, &mut out);
            open.insert(next_id, (from, false));
            next_id += 2;
        }
        if !out.is_empty() {
            writer
                .write_all(&out)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        if let Some(until) = closed_until {
            if now >= until && open.is_empty() {
                break;
            }
        } else if !feeding && waiting.is_empty() && open.is_empty() {
            break;
        }
        // Wait for answers, new calls, or a refused stream's turn.
        let wake = match (&feed, waiting.front()) {
            (Feed::Closed { .. }, Some(&at)) if open.len() < streams => Some(at),
            _ => None,
        }
        .or(closed_until);
        tokio::select! {
            read = reader.read(&mut buf[have..]) => {
                let n = read.map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    break;
                }
                have += n;
            }
            intended = async {
                match &mut feed {
                    Feed::Open(rx) if feeding => rx.recv().await,
                    _ => std::future::pending().await,
                }
            } => {
                match intended {
                    Some(at) => waiting.push_back(at),
                    None => feeding = false,
                }
                continue;
            }
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => continue,
        }
        // Frames.
        let mut at = 0;
        out.clear();
        while have - at >= 9 {
            let h = &buf[at..at + 9];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if have - at < 9 + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let payload = &buf[at + 9..at + 9 + len];
            match kind {
                DATA => {
                    received_data += len;
                    if let Some(call) = open.get_mut(&stream) {
                        call.1 = true;
                    }
                }
                HEADERS if flags & END_STREAM != 0 => {
                    if let Some((from, data)) = open.remove(&stream) {
                        if data {
                            tally.ok += 1;
                            let _ = tally.latency.record(from.elapsed().as_micros() as u64);
                            if let Feed::Closed { .. } = feed {
                                waiting.push_back(Instant::now());
                            }
                        } else {
                            tally.refused += 1;
                            if let Feed::Closed { retry_after, .. } = feed {
                                waiting.push_back(Instant::now() + retry_after.unwrap_or_default());
                            }
                        }
                    }
                }
                RST_STREAM if open.remove(&stream).is_some() => {
                    tally.reset += 1;
                    if let Feed::Closed { .. } = feed {
                        waiting.push_back(Instant::now());
                    }
                }
                SETTINGS if flags & ACK == 0 => out.extend(frame(SETTINGS, ACK, 0, &[])),
                PING if flags & ACK == 0 => out.extend(frame(PING, ACK, 0, payload)),
                GOAWAY => return Err("the server sent GOAWAY".into()),
                _ => {}
            }
            at += 9 + len;
        }
        buf.copy_within(at..have, 0);
        have -= at;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        if received_data > 1 << 20 {
            out.extend(frame(0x8, 0, 0, &(received_data as u32).to_be_bytes()));
            received_data = 0;
        }
        if !out.is_empty() {
            writer
                .write_all(&out)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
    }
    Ok(tally)
}

/// GetOperation calls by code from the server's `/metrics`.
async fn server_codes(address: &str) -> BTreeMap<String, u64> {
    let mut codes = BTreeMap::new();
    let Ok(mut socket) = TcpStream::connect(address).await else {
        return codes;
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if socket.write_all(request.as_bytes()).await.is_err() {
        return codes;
    }
    let mut text = String::new();
    let _ = socket.read_to_string(&mut text).await;
    let prefix = "opsd_rpc_total{method=\"GetOperation\",transport=\"grpc\",code=\"";
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(prefix) {
            if let Some((code, count)) = rest.split_once("\"} ") {
                codes.insert(code.to_owned(), count.trim().parse().unwrap_or(0));
            }
        }
    }
    codes
}

/// Runs the workload (see the module docs).
pub async fn overload(options: &OverloadOptions) -> Result<OverloadReport, BenchError> {
    let template = std::sync::Arc::new(Template::new(&options.address, &options.name));
    let codes_before = server_codes(&options.address).await;
    let before = options.server_pid.and_then(server_usage);
    let generator_before = server_usage(std::process::id());
    let started = Instant::now();
    let until = started + options.duration;
    let mut connections = JoinSet::new();
    let mut feeds = Vec::new();
    for _ in 0..options.connections.max(1) {
        let feed = match options.rate {
            None => Feed::Closed {
                until,
                retry_after: options.retry_after,
            },
            Some(_) => {
                let (tx, rx) = mpsc::unbounded_channel();
                feeds.push(tx);
                Feed::Open(rx)
            }
        };
        connections.spawn(connection(
            options.address.clone(),
            options.streams.max(1),
            template.clone(),
            feed,
        ));
    }
    if let Some(rate) = options.rate {
        // The schedule: every call due by now goes out, round robin over
        // the connections (a late generator sends in bursts; latency still
        // counts from the schedule).
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut i: u64 = 0;
        loop {
            let now = Instant::now();
            while started + interval.mul_f64(i as f64) <= now {
                let intended = started + interval.mul_f64(i as f64);
                let _ = feeds[i as usize % feeds.len()].send(intended);
                i += 1;
            }
            if now >= until {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        feeds.clear();
    }
    let mut ok_latency = Histogram::<u64>::new(3)?;
    let (mut ok, mut refused, mut reset) = (0, 0, 0);
    let mut failed = BTreeMap::new();
    while let Some(done) = connections.join_next().await {
        match done? {
            Ok(tally) => {
                ok += tally.ok;
                refused += tally.refused;
                reset += tally.reset;
                ok_latency.add(&tally.latency)?;
            }
            Err(err) => *failed.entry(err.to_string()).or_default() += 1,
        }
    }
    let elapsed = started.elapsed();
    let generator_cpu = match (generator_before, server_usage(std::process::id())) {
        (Some((a, _)), Some((b, _))) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let server = match (before, options.server_pid.and_then(server_usage)) {
        (Some((cpu0, _)), Some((cpu1, rss))) => Some((cpu1.saturating_sub(cpu0), rss)),
        _ => None,
    };
    let server_codes = server_codes(&options.address)
        .await
        .into_iter()
        .map(|(code, n)| {
            let delta = n - codes_before.get(&code).copied().unwrap_or(0);
            (code, delta)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    Ok(OverloadReport {
        elapsed,
        ok,
        refused,
        reset,
        ok_latency,
        server_codes,
        failed,
        server,
        generator_cpu,
    })
}
