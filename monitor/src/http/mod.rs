//! `/metrics` (`OpenMetrics` text), `/healthz` and `/readyz`. Every pod on the node can
//! reach them, so what a client can make the agent hold is bounded (`bounds`).

mod bounds;

use std::{
    convert::Infallible,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use self::bounds::{
    Busy, Connections, HANDSHAKE_TIMEOUT, MAX_HEAD_BYTES, MAX_HEADERS, Stalls, Turns,
    limit_send_buffer,
};
pub use self::bounds::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, Reply, listen};
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
    turns: Turns,
    /// The connections being served, oldest first.
    connections: Connections,
    /// The housekeeping threads' passes: `/healthz` fails when one stopped.
    pub health: Heartbeats,
}

/// Scrapes encoded at once.
const ENCODING: usize = 2;
impl State {
    pub fn new(registry: Registry, attachments: Attachments, web: Web) -> Self {
        Self {
            registry,
            started: AtomicBool::default(),
            attachments,
            encoding: tokio::sync::Semaphore::new(ENCODING),
            web,
            checking: tokio::sync::Semaphore::new(1),
            turns: Turns::default(),
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
    let Some(turn) = state.turns.take(peer).await else {
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
