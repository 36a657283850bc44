//! `CountingProxy`: an HTTP/1.1 reverse proxy that records every request and can misbehave on
//! demand (latency, bandwidth limit, ignored or rejected ranges, injected failures, aborted
//! bodies).
//!
//! Bodies are streamed in both directions (never buffered whole). Each request opens a fresh
//! upstream connection, so a restarted upstream is picked up at once and a dead one answers 502.
//! When the upstream fails in the middle of a response body, the downstream connection is aborted
//! (not cleanly ended), so the client sees an error rather than a short body.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

use crate::server::{full, BackgroundServer, Body, BoxError};

/// Largest piece a response body is cut into when throttled or counted.
const PIECE: usize = 16 * 1024;

/// How a response body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyOutcome {
    /// Still being sent (or never started).
    InProgress,
    /// Sent to the end.
    Complete,
    /// Aborted by the proxy: upstream error or an injected abort. The message says which.
    Aborted(String),
    /// The client went away before the end of the body.
    ClientGone,
}

/// One request the proxy saw, as a snapshot.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path and query as the client sent them, e.g. `/v2/foo/blobs/sha256:...`.
    pub path: String,
    /// The `Range` header as the client sent it (even when the proxy strips it).
    pub range: Option<String>,
    /// Every request header as the client sent it.
    pub request_headers: HeaderMap,
    /// Status sent to the client; 0 while the upstream has not answered yet.
    pub status: u16,
    /// Response body bytes handed to the client connection so far.
    pub body_bytes: u64,
    /// How the response body ended.
    pub outcome: BodyOutcome,
}

struct RecordCell {
    method: String,
    path: String,
    range: Option<String>,
    request_headers: HeaderMap,
    status: AtomicU16,
    body_bytes: AtomicU64,
    outcome: Mutex<BodyOutcome>,
}

impl RecordCell {
    fn snapshot(&self) -> RecordedRequest {
        RecordedRequest {
            method: self.method.clone(),
            path: self.path.clone(),
            range: self.range.clone(),
            request_headers: self.request_headers.clone(),
            status: self.status.load(Ordering::SeqCst),
            body_bytes: self.body_bytes.load(Ordering::SeqCst),
            outcome: self.outcome.lock().clone(),
        }
    }

    fn finish(&self, outcome: BodyOutcome) {
        let mut o = self.outcome.lock();
        if *o == BodyOutcome::InProgress {
            *o = outcome;
        }
    }
}

struct ProxyState {
    upstream: String,
    listen: Mutex<String>,
    delay_us: AtomicU64,
    rate: AtomicU64,
    next_slot: Mutex<Instant>,
    ignore_range: AtomicBool,
    reject_multi_range: AtomicBool,
    abort_after: AtomicU64,
    fail_next: Mutex<(usize, u16)>,
    records: Mutex<Vec<Arc<RecordCell>>>,
}

/// A recording reverse proxy in front of one upstream `host:port`. Stops when dropped.
pub struct CountingProxy {
    state: Arc<ProxyState>,
    server: BackgroundServer,
}

impl std::fmt::Debug for CountingProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingProxy")
            .field("addr", &self.server.addr())
            .field("upstream", &self.state.upstream)
            .finish()
    }
}

impl CountingProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `upstream` (`host:port`, e.g.
    /// [`crate::TestRegistry::host`]).
    pub fn start(upstream: &str) -> CountingProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let state = Arc::new(ProxyState {
            upstream,
            listen: Mutex::new(String::new()),
            delay_us: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            next_slot: Mutex::new(Instant::now()),
            ignore_range: AtomicBool::new(false),
            reject_multi_range: AtomicBool::new(false),
            abort_after: AtomicU64::new(u64::MAX),
            fail_next: Mutex::new((0, 503)),
            records: Mutex::new(Vec::new()),
        });
        let handler_state = state.clone();
        let server = BackgroundServer::start("counting-proxy", move |req| {
            let state = handler_state.clone();
            async move { handle(state, req).await }
        });
        *state.listen.lock() = server.addr().to_string();
        CountingProxy { state, server }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.server.addr().to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The upstream `host:port`.
    pub fn upstream(&self) -> &str {
        &self.state.upstream
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .records
            .lock()
            .iter()
            .map(|r| r.snapshot())
            .collect()
    }

    /// How many recorded requests satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&RecordedRequest) -> bool) -> usize {
        self.requests().iter().filter(|r| pred(r)).count()
    }

    /// Sum of response body bytes sent to clients over all recorded requests.
    pub fn total_body_bytes(&self) -> u64 {
        self.requests().iter().map(|r| r.body_bytes).sum()
    }

    /// Forgets the recorded requests (settings stay).
    pub fn reset(&self) {
        self.state.records.lock().clear();
    }

    /// Latency added before each request is forwarded (and before injected failures).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_us.store(us, Ordering::SeqCst);
    }

    /// Limits response body bandwidth to `bytes_per_sec`, shared by all connections (like one
    /// link). `None` removes the limit. Takes effect for bytes sent from now on.
    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        self.state
            .rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::SeqCst);
        *self.state.next_slot.lock() = Instant::now();
    }

    /// When true, `Range` and `If-Range` are stripped before forwarding, so the upstream answers
    /// 200 with the whole blob (like some S3-backed registries). The record keeps the original
    /// `Range`.
    pub fn set_ignore_range(&self, ignore: bool) {
        self.state.ignore_range.store(ignore, Ordering::SeqCst);
    }

    /// When true, requests whose `Range` holds several ranges (a comma) get 501 without reaching
    /// the upstream.
    pub fn set_reject_multi_range(&self, reject: bool) {
        self.state
            .reject_multi_range
            .store(reject, Ordering::SeqCst);
    }

    /// Aborts each response body after `bytes` bytes (the connection is cut, the client sees an
    /// error). `None` turns it off.
    pub fn set_abort_after(&self, bytes: Option<u64>) {
        self.state
            .abort_after
            .store(bytes.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// The next `count` requests are answered with `status` (e.g. 503, 429) without reaching the
    /// upstream. Replaces any earlier pending failures.
    pub fn fail_next(&self, count: usize, status: u16) {
        *self.state.fail_next.lock() = (count, status);
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn simple(status: StatusCode, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(message.to_string()))
        .expect("build proxy response")
}

impl ProxyState {
    fn take_failure(&self) -> Option<u16> {
        let mut f = self.fail_next.lock();
        if f.0 > 0 {
            f.0 -= 1;
            Some(f.1)
        } else {
            None
        }
    }

    /// Waits until `n` more bytes may go out under the rate limit.
    async fn throttle(&self, n: usize) {
        let rate = self.rate.load(Ordering::SeqCst);
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(n as f64 / rate as f64);
        let until = {
            let mut next = self.next_slot.lock();
            let start = (*next).max(Instant::now());
            *next = start + cost;
            *next
        };
        tokio::time::sleep_until(until.into()).await;
    }
}

async fn handle(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let range = parts
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let record = Arc::new(RecordCell {
        method: parts.method.to_string(),
        path: path.clone(),
        range: range.clone(),
        request_headers: parts.headers.clone(),
        status: AtomicU16::new(0),
        body_bytes: AtomicU64::new(0),
        outcome: Mutex::new(BodyOutcome::InProgress),
    });
    state.records.lock().push(record.clone());

    let delay = state.delay_us.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_micros(delay)).await;
    }

    let reply_local = |status: StatusCode, message: &str| {
        record.status.store(status.as_u16(), Ordering::SeqCst);
        record.finish(BodyOutcome::Complete);
        simple(status, message)
    };
    if let Some(status) = state.take_failure() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return reply_local(status, "injected failure by CountingProxy");
    }
    if state.reject_multi_range.load(Ordering::SeqCst)
        && range.as_deref().is_some_and(|r| r.contains(','))
    {
        return reply_local(
            StatusCode::NOT_IMPLEMENTED,
            "multiple ranges not supported (CountingProxy)",
        );
    }

    let listen = state.listen.lock().clone();
    let original_host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| listen.clone());
    strip_hop_by_hop(&mut parts.headers);
    if state.ignore_range.load(Ordering::SeqCst) {
        parts.headers.remove(header::RANGE);
        parts.headers.remove(header::IF_RANGE);
    }
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&state.upstream).expect("upstream is a valid Host header"),
    );
    if let Ok(v) = HeaderValue::from_str(&original_host) {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-host"), v);
    }
    parts.headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    parts.uri = path.parse().expect("origin-form URI");
    parts.version = http::Version::HTTP_11;
    let is_head = parts.method == http::Method::HEAD;
    let upstream_req = Request::from_parts(parts, body);

    let upstream_resp = match forward(&state.upstream, upstream_req).await {
        Ok(resp) => resp,
        Err(e) => {
            let message = format!("CountingProxy: upstream {} failed: {e}", state.upstream);
            record
                .status
                .store(StatusCode::BAD_GATEWAY.as_u16(), Ordering::SeqCst);
            record.finish(BodyOutcome::Aborted(message.clone()));
            return simple(StatusCode::BAD_GATEWAY, &message);
        }
    };

    let (mut parts, body) = upstream_resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let upstream_prefix = format!("http://{}", state.upstream);
    if let Some(loc) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(rest) = loc.strip_prefix(&upstream_prefix) {
            let rewritten = format!("http://{original_host}{rest}");
            if let Ok(v) = HeaderValue::from_str(&rewritten) {
                parts.headers.insert(header::LOCATION, v);
            }
        }
    }
    record.status.store(parts.status.as_u16(), Ordering::SeqCst);
    let expected = if is_head
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
    {
        Some(0)
    } else {
        parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if expected == Some(0) {
        record.finish(BodyOutcome::Complete);
    }
    let body = relay_body(state, record, body, expected);
    Response::from_parts(parts, body)
}

/// Sends `req` over a new connection to `upstream`.
async fn forward(upstream: &str, req: Request<Incoming>) -> Result<Response<Incoming>, BoxError> {
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

struct Relay {
    state: Arc<ProxyState>,
    record: Arc<RecordCell>,
    body: Incoming,
    pending: Bytes,
    expected: Option<u64>,
    done: bool,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.record.finish(BodyOutcome::ClientGone);
    }
}

/// Streams the upstream body to the client in pieces, counting, throttling and aborting as set.
fn relay_body(
    state: Arc<ProxyState>,
    record: Arc<RecordCell>,
    body: Incoming,
    expected: Option<u64>,
) -> Body {
    let relay = Relay {
        state,
        record,
        body,
        pending: Bytes::new(),
        expected,
        done: false,
    };
    let stream = futures::stream::unfold(relay, |mut r| async move {
        if r.done {
            return None;
        }
        loop {
            if !r.pending.is_empty() {
                let sent = r.record.body_bytes.load(Ordering::SeqCst);
                let limit = r.state.abort_after.load(Ordering::SeqCst);
                if sent >= limit {
                    r.done = true;
                    let message = format!("CountingProxy: injected abort after {limit} bytes");
                    r.record.finish(BodyOutcome::Aborted(message.clone()));
                    return Some((Err::<Frame<Bytes>, BoxError>(message.into()), r));
                }
                let room = usize::try_from(limit - sent).unwrap_or(usize::MAX);
                let n = r.pending.len().min(PIECE).min(room);
                let piece = r.pending.split_to(n);
                r.state.throttle(n).await;
                let total = r.record.body_bytes.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if Some(total) == r.expected {
                    // hyper may never poll again once Content-Length bytes are out.
                    r.record.finish(BodyOutcome::Complete);
                }
                return Some((Ok(Frame::data(piece)), r));
            }
            match r.body.frame().await {
                None => {
                    r.done = true;
                    r.record.finish(BodyOutcome::Complete);
                    return None;
                }
                Some(Err(e)) => {
                    r.done = true;
                    let message = format!("CountingProxy: upstream body failed: {e}");
                    r.record.finish(BodyOutcome::Aborted(message.clone()));
                    return Some((Err(message.into()), r));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => r.pending = data,
                    Err(frame) => return Some((Ok(frame), r)),
                },
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}
