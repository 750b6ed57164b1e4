//! `/metrics` (`OpenMetrics` text), `/healthz` and `/readyz`.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
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
use tokio::net::TcpListener;

use crate::{loader::Attachments, webconfig::Web};

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
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The exposition of every collector.
fn metrics(state: &State) -> Response<Full<Bytes>> {
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

/// `/metrics` off the runtime, one of `ENCODING` at a time.
async fn metrics_off_runtime(state: Arc<State>) -> Response<Full<Bytes>> {
    let Ok(_turn) = state.encoding.acquire().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    };
    let encoding = Arc::clone(&state);
    tokio::task::spawn_blocking(move || metrics(&encoding))
        .await
        .unwrap_or_else(|e| {
            warn!("encoding metrics: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
        })
}

fn handle(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => metrics(state),
        "/healthz" => text(StatusCode::OK, "ok\n"),
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

/// Whether `req` may be answered: `/healthz` and `/readyz` always (the kubelet's
/// probes), the rest with a configured user's password. bcrypt runs off the runtime.
async fn allowed(state: &Arc<State>, req: &Request<Incoming>) -> bool {
    if state.web.users.is_none() || matches!(req.uri().path(), "/healthz" | "/readyz") {
        return true;
    }
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

async fn respond(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        metrics_off_runtime(state).await
    } else {
        handle(&state, &req)
    }
}

/// Serves HTTP/1 on one connection, plain or TLS.
async fn serve_connection<I>(io: I, state: Arc<State>, peer: std::net::SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(respond(state, req).await) }
    });
    // A client that never finishes its request does not hold a descriptor forever.
    if let Err(e) = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        debug!("connection from {peer}: {e}");
    }
}

/// How long a client may take over its TLS handshake or its request's headers.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let Some(tls) = &state.web.tls else {
                return serve_connection(stream, state, peer).await;
            };
            let acceptor = tls.acceptor();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, state, peer).await,
                Ok(Err(e)) => debug!("TLS handshake with {peer}: {e}"),
                Err(_) => debug!("TLS handshake with {peer}: timed out"),
            }
        });
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
