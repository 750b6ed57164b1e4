//! `/metrics` (`OpenMetrics` text), `/healthz` and `/readyz`. Every pod on the node can
//! reach them, so what a client can make the agent hold is bounded: connections (past
//! `MAX_CONNECTIONS` the oldest goes), the bytes of a request's head, the time to send
//! one, and the time a response may wait on a reader that does not read.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    task::AbortHandle,
    time::Sleep,
};

use crate::{
    housekeeping::{Heartbeats, monotonic_ns},
    loader::Attachments,
    webconfig::Web,
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the endpoints serve.
pub struct State {
    pub registry: Registry,
    /// Set once the attach phase is over.
    pub started: AtomicBool,
    pub attachments: Attachments,
    /// Scrapes encoded at once, each on a thread of its own off the runtime (they read
    /// maps and the driver's statistics, which may wait on the kernel); the others wait
    /// their turn, and `/healthz` and `/readyz` answer meanwhile.
    encoding: tokio::sync::Semaphore,
    /// TLS and the users allowed, from `--web-config-file`.
    pub web: Web,
    /// Password checks (bcrypt) run one at a time: a client sending wrong passwords
    /// cannot take the blocking pool.
    checking: tokio::sync::Semaphore,
    /// Scrapes answered at once, from their turn to their last byte written: the
    /// others wait their turn holding a connection, not a response.
    responding: Arc<tokio::sync::Semaphore>,
    /// Each peer's share of those turns: a pod that reads its scrapes a byte at a
    /// time holds a few, never a well-behaved Prometheus's.
    peer_turns: Mutex<std::collections::HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>,
    /// The connections being served, oldest first.
    connections: Connections,
    /// The housekeeping threads' passes: `/healthz` fails when one stopped.
    pub health: Heartbeats,
}

/// Scrapes encoded at once.
const ENCODING: usize = 2;
/// Scrapes being answered at once (encoded and not all written): what responses may
/// hold of the agent's memory is this many expositions.
const RESPONDING: usize = 16;
/// Of those, the most one peer may have.
const RESPONDING_PER_PEER: usize = 4;

/// A response's body, and the turn it holds until its last byte is written (or its
/// connection is gone): the body is dropped then.
pub struct Reply {
    body: Full<Bytes>,
    turn: Option<Turn>,
}

/// A scrape's turn: its peer's and one of all.
struct Turn {
    _peer: tokio::sync::OwnedSemaphorePermit,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl Reply {
    fn new(body: Bytes) -> Self {
        Self {
            body: Full::new(body),
            turn: None,
        }
    }
}

impl State {
    /// Waits for a turn to answer a scrape of `peer`.
    async fn turn(&self, peer: IpAddr) -> Option<Turn> {
        let mine = {
            let mut turns = self
                .peer_turns
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Peers with no turn taken or awaited are forgotten.
            turns.retain(|_, s| Arc::strong_count(s) > 1);
            Arc::clone(
                turns
                    .entry(peer)
                    .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(RESPONDING_PER_PEER))),
            )
        };
        let peer_turn = mine.acquire_owned().await.ok()?;
        let all = Arc::clone(&self.responding).acquire_owned().await.ok()?;
        Some(Turn {
            _peer: peer_turn,
            _all: all,
        })
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl State {
    pub fn new(registry: Registry, attachments: Attachments, web: Web) -> Self {
        Self {
            registry,
            started: AtomicBool::default(),
            attachments,
            encoding: tokio::sync::Semaphore::new(ENCODING),
            web,
            checking: tokio::sync::Semaphore::new(1),
            responding: Arc::new(tokio::sync::Semaphore::new(RESPONDING)),
            peer_turns: Mutex::default(),
            connections: Connections::default(),
            health: Heartbeats::default(),
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Reply> {
    let mut r = Response::new(Reply::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The exposition of every collector.
fn metrics(state: &State) -> Response<Reply> {
    let mut body = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        warn!("encoding metrics: {e}");
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        );
    }
    let mut r = text(StatusCode::OK, body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    r
}

/// `/metrics` off the runtime, one of `ENCODING` at a time, and one of `RESPONDING`
/// being written.
async fn metrics_off_runtime(state: Arc<State>, peer: IpAddr) -> Response<Reply> {
    let Some(turn) = state.turn(peer).await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    };
    let Ok(_encoding) = state.encoding.acquire().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    };
    let encoding = Arc::clone(&state);
    let mut r = tokio::task::spawn_blocking(move || metrics(&encoding))
        .await
        .unwrap_or_else(|e| {
            warn!("encoding metrics: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
        });
    r.body_mut().turn = Some(turn);
    r
}

fn handle(state: &State, req: &Request<Incoming>) -> Response<Reply> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => metrics(state),
        "/healthz" => {
            let faults = state.health.faults(monotonic_ns());
            if faults.is_empty() {
                text(StatusCode::OK, "ok\n")
            } else {
                warn!("/healthz: {}", faults.join(", "));
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{}\n", faults.join(", ")),
                )
            }
        }
        "/readyz" => {
            if !state.started.load(Ordering::Acquire) {
                return text(StatusCode::SERVICE_UNAVAILABLE, "attaching programs\n");
            }
            let missing = state.attachments.missing();
            if missing.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not attached: {}\n", missing.join(", ")),
                )
            }
        }
        "/" => text(
            StatusCode::OK,
            "eni-monitor: see /metrics, /healthz, /readyz\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether `req` needs what a connection without a client certificate lacks: every
/// path but the kubelet's probes does, where certificates are required.
fn needs_certificate(state: &State, req: &Request<Incoming>) -> bool {
    !is_probe(req)
        && state
            .web
            .tls
            .as_ref()
            .is_some_and(crate::webconfig::Tls::requires_client_cert)
}

fn is_probe(req: &Request<Incoming>) -> bool {
    matches!(req.uri().path(), "/healthz" | "/readyz")
}

/// Whether `req` may be answered: `/healthz` and `/readyz` always (the kubelet's
/// probes), the rest with a configured user's password. bcrypt runs off the runtime,
/// one check at a time.
async fn allowed(state: &Arc<State>, req: &Request<Incoming>) -> bool {
    if state.web.users.is_none() || is_probe(req) {
        return true;
    }
    let Ok(_turn) = state.checking.acquire().await else {
        return false;
    };
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .map(|h| h.as_bytes().to_vec());
    let checking = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        checking
            .web
            .users
            .as_ref()
            .is_some_and(|u| u.allows(header.as_deref()))
    })
    .await
    .unwrap_or(false)
}

async fn respond(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: IpAddr,
    certified: bool,
) -> Response<Reply> {
    if !certified && needs_certificate(&state, &req) {
        return text(StatusCode::FORBIDDEN, "a client certificate is required\n");
    }
    if !allowed(&state, &req).await {
        let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"eni-monitor\""),
        );
        return r;
    }
    let scrape = req.uri().path() == "/metrics"
        && (req.method() == Method::GET || req.method() == Method::HEAD);
    if scrape {
        metrics_off_runtime(state, peer).await
    } else {
        handle(&state, &req)
    }
}

/// Serves HTTP/1 on one connection, plain or TLS (`certified`: it gave a verified
/// client certificate; `busy`: set while a request is answered).
async fn serve_connection<I>(
    io: I,
    state: Arc<State>,
    peer: std::net::SocketAddr,
    certified: bool,
    busy: Arc<AtomicBool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&state);
        let busy = Busy::new(&busy);
        async move {
            let r = respond(state, req, peer.ip(), certified).await;
            drop(busy);
            Ok::<_, Infallible>(r)
        }
    });
    // A client that never finishes its request does not hold a descriptor forever, nor
    // more than a small buffer while it trickles; one that stops reading its response is
    // cut off.
    if let Err(e) = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(Stalls::new(io)), service)
        .await
    {
        debug!("connection from {peer}: {e}");
    }
}

/// How long a client may take over its TLS handshake or its request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The read buffer of a connection, and so the most bytes a request's head may have
/// (hyper's least): Prometheus sends a few hundred.
const MAX_HEAD_BYTES: usize = 8192;
const MAX_HEADERS: usize = 32;
/// How long a response may wait on a client that reads none of it.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// Connections served at once. Past it the oldest idle one (else the oldest) is closed
/// for the newcomer: clients that hold connections open cannot shut the probes or a
/// scrape out, nor grow the agent (each costs at most its read buffer, its TLS state and
/// its place in the queue for a turn).
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections of one address at once (a pod has one): past it that address's oldest
/// idle one (else its oldest) is closed. A pod that floods the port churns its own
/// connections, never the kubelet's or Prometheus's.
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;

/// One connection being served: its peer, its task, and whether a request of its is
/// being answered (a connection that only holds its place, reading a request or idle
/// between two, is what is closed to make room).
struct Open {
    peer: IpAddr,
    task: AbortHandle,
    busy: Arc<AtomicBool>,
}

/// The connections being served, by the order they came in.
#[derive(Default)]
struct Connections {
    open: Mutex<(u64, BTreeMap<u64, Open>)>,
}

impl Connections {
    /// Makes room for one more from `peer`: while that peer holds
    /// `MAX_CONNECTIONS_PER_PEER`, closes its oldest idle connection (else its oldest);
    /// then, while `MAX_CONNECTIONS` are open, the oldest idle of all (else the oldest).
    fn make_room(&self, peer: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.1.retain(|_, c| !c.task.is_finished());
        while open.1.values().filter(|c| c.peer == peer).count() >= MAX_CONNECTIONS_PER_PEER {
            close_oldest(&mut open.1, |c| c.peer == peer);
        }
        while open.1.len() >= MAX_CONNECTIONS {
            close_oldest(&mut open.1, |_| true);
        }
    }

    fn add(&self, peer: IpAddr, task: AbortHandle, busy: Arc<AtomicBool>) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let id = open.0;
        open.0 += 1;
        open.1.insert(id, Open { peer, task, busy });
    }
}

/// Closes the oldest idle connection of those `of` picks, else the oldest of them.
fn close_oldest(open: &mut BTreeMap<u64, Open>, of: impl Fn(&Open) -> bool) {
    let idle = open
        .iter()
        .find(|(_, c)| of(c) && !c.busy.load(Ordering::Acquire))
        .map(|(id, _)| *id);
    let id = idle.or_else(|| open.iter().find(|(_, c)| of(c)).map(|(id, _)| *id));
    if let Some(c) = id.and_then(|id| open.remove(&id)) {
        c.task.abort();
    }
}

/// Marks a connection busy while a request of its is answered.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn new(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Self(Arc::clone(flag))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A connection whose writes fail once they have waited on the reader for `WRITE_STALL`
/// without it taking `MIN_PROGRESS` bytes: a reader that stops reading, or reads a
/// byte at a time, does not hold its response (and its turn) for ever.
struct Stalls<I> {
    io: I,
    stalled: Option<Pin<Box<Sleep>>>,
    /// Bytes written since the stall timer was set.
    progress: usize,
}

/// What a reader must take within `WRITE_STALL` once it has kept a write waiting.
const MIN_PROGRESS: usize = 16 * 1024;

impl<I> Stalls<I> {
    fn new(io: I) -> Self {
        Self {
            io,
            stalled: None,
            progress: 0,
        }
    }

    /// `n` bytes written: the stall timer is cleared once the reader took enough.
    fn wrote(&mut self, n: usize) {
        if self.stalled.is_some() {
            self.progress += n;
            if self.progress >= MIN_PROGRESS {
                self.stalled = None;
                self.progress = 0;
            }
        }
    }

    /// `Pending` from the connection: fails it once it has been pending too long.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Stalls<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Stalls<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            failed @ Poll::Ready(_) => failed,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            ready @ Poll::Ready(_) => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            failed @ Poll::Ready(_) => failed,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Bounds what the kernel holds of a connection's responses for a reader that does not
/// read (socket memory is charged to the pod too).
fn limit_send_buffer(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let bytes: libc::c_int = SEND_BUFFER;
    // SAFETY: setsockopt on the stream's own descriptor with an int option.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const bytes).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc != 0 {
        debug!("SO_SNDBUF: {}", std::io::Error::last_os_error());
    }
}

/// Bytes of a connection's send buffer (the kernel doubles it).
const SEND_BUFFER: libc::c_int = 32 * 1024;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                warn!("accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        state.connections.make_room(peer.ip());
        limit_send_buffer(&stream);
        let serving = Arc::clone(&state);
        let busy = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&busy);
        let task = tokio::spawn(async move {
            let state = serving;
            let Some(tls) = &state.web.tls else {
                return serve_connection(stream, state, peer, false, flag).await;
            };
            let acceptor = tls.acceptor();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    // A certificate given was verified in the handshake.
                    let certified = stream.get_ref().1.peer_certificates().is_some();
                    serve_connection(stream, state, peer, certified, flag).await;
                }
                Ok(Err(e)) => debug!("TLS handshake with {peer}: {e}"),
                Err(_) => debug!("TLS handshake with {peer}: timed out"),
            }
        });
        state.connections.add(peer.ip(), task.abort_handle(), busy);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        time::{Duration, Instant},
    };

    use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

    use super::*;

    /// A collector that takes its time, as one reading a driver behind a busy RTNL lock.
    #[derive(Debug)]
    struct Slow(Duration);

    impl Collector for Slow {
        fn encode(&self, _: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            std::thread::sleep(self.0);
            Ok(())
        }
    }

    /// One GET: the status code, and how long it took.
    fn get(at: SocketAddr, path: &str) -> (u16, Duration) {
        let started = Instant::now();
        let mut s = TcpStream::connect(at).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let code = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, started.elapsed())
    }

    #[test]
    fn health_and_readiness_answer_during_slow_scrapes() {
        let slow = Duration::from_millis(1500);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Slow(slow)));
        let state = Arc::new(State::new(registry, Attachments::default(), Web::default()));
        state.started.store(true, Ordering::Release);
        // The agent's runtime: one thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let at = listener.local_addr().unwrap();
        std::thread::spawn(move || runtime.block_on(serve(listener, state)));
        // More slow scrapes than are encoded at once.
        let scrapes: Vec<_> = (0..=ENCODING)
            .map(|_| std::thread::spawn(move || get(at, "/metrics")))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        for path in ["/healthz", "/readyz"] {
            let (code, took) = get(at, path);
            assert_eq!(code, 200, "{path}");
            assert!(took < Duration::from_millis(500), "{path} took {took:?}");
        }
        let mut took: Vec<Duration> = scrapes
            .into_iter()
            .map(|s| {
                let (code, took) = s.join().unwrap();
                assert_eq!(code, 200);
                took
            })
            .collect();
        took.sort();
        // Two at once, the third after them.
        assert!(took[ENCODING] > slow + slow / 2, "{took:?}");
    }
}
