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
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::loader::Attachments;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the endpoints serve.
pub struct State {
    pub registry: Registry,
    /// Set once the attach phase is over.
    pub started: AtomicBool,
    pub attachments: Attachments,
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

fn handle(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
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
            let service = service_fn(move |req| {
                let resp = handle(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            // A client that never finishes its request does not hold a descriptor forever.
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!("connection from {peer}: {e}");
            }
        });
    }
}
