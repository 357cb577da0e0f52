//! Plain HTTP on WebSocket routes (`http = "proxy"`): Socket.IO's long-polling,
//! SignalR's negotiation, SockJS and Phoenix fallbacks. Each request goes to the
//! route's pool over pooled keep-alive connections (hyper-util's client), bodies
//! streamed both ways with backpressure, with the same forwarded and identity
//! headers as upgrades. Requests are balanced over HTTP requests in flight (not
//! counted as WebSocket connections) and follow the pool's stickiness. A backend
//! failing before its response head is retried on the next candidate for requests
//! that can be sent again (GET, HEAD, OPTIONS without a body), never for others.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::balancer::ConnGuard;
use crate::handshake;
use crate::metrics as m;
use crate::state::Route;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What wsgate answers with: its own short texts, or a backend's streamed body.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
/// Pooled keep-alive connections to every backend.
pub type HttpClient = Client<HttpConnector, ProxyBody>;

/// How long an idle pooled connection to a backend is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(3)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .build(connector)
}

/// A short answer of wsgate's own as a proxy body.
pub fn full(response: Response<Full<Bytes>>) -> Response<ProxyBody> {
    response.map(|b| b.map_err(|never| match never {}).boxed())
}

/// Proxies one plain HTTP request to `route`'s pool.
pub async fn forward(
    req: Request<Incoming>,
    conn: &crate::handler::Conn,
    route: &Route,
    client: &HttpClient,
    user: Option<String>,
) -> Response<ProxyBody> {
    let proto = conn.proto;
    let pool = &route.pool;
    let placement = crate::sticky::place(pool, &req);
    if let Some(result) = placement.result {
        metrics::counter!(m::STICKY, "pool" => pool.name.clone(), "result" => result).increment(1);
    }
    let (mut parts, body) = req.into_parts();
    handshake::forwarded(&mut parts.headers, &conn.peer, proto, user.as_deref());
    let replayable = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
        && body.is_end_stream();
    let attempts = if replayable {
        pool.settings.retries + 1
    } else {
        1
    };
    let mut body = Some(body.map_err(BoxError::from).boxed());
    let mut rng = fastrand::Rng::new();
    let mut tried: Vec<usize> = Vec::new();
    let mut failure = (StatusCode::SERVICE_UNAVAILABLE, String::new());
    for attempt in 0..attempts {
        let picked = match placement.preferred.filter(|_| attempt == 0) {
            Some(i) => pool.take(i, crate::balancer::Traffic::Http).map(|g| (i, g)),
            None => None,
        }
        .or_else(|| pool.pick_http(&tried, &mut rng));
        let Some((index, guard)) = picked else { break };
        tried.push(index);
        let backend = guard.backend().clone();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = format!("http://{}{path}", backend.addr).parse::<http::Uri>() else {
            return full(handshake::plain(
                StatusCode::BAD_REQUEST,
                "an unusable request target",
            ));
        };
        let mut request = Request::new(
            body.take()
                .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed()),
        );
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = parts.headers.clone();
        let answer =
            tokio::time::timeout(pool.settings.request_timeout, client.request(request)).await;
        let label = match answer {
            Ok(Ok(response)) => {
                backend.record_attempt(&pool.name, true, &pool.settings);
                count(&pool.name, &backend.addr.to_string(), response.status());
                let cookie = placement.set_cookie(pool, index, proto == "https");
                return respond(response, guard, cookie);
            }
            Ok(Err(e)) if crate::descriptors::exhausted_in(&e) => {
                // wsgate's own condition: the backend is not blamed.
                crate::descriptors::note("connect", &crate::Chain(&e));
                count(
                    &pool.name,
                    &backend.addr.to_string(),
                    StatusCode::SERVICE_UNAVAILABLE,
                );
                return full(handshake::plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "wsgate is out of file descriptors; retry shortly",
                ));
            }
            Ok(Err(e)) => {
                tracing::warn!(backend = %backend.addr, error = %crate::Chain(&e), "backend failed an HTTP request");
                failure = (StatusCode::BAD_GATEWAY, backend.addr.to_string());
                "backend_bad_answer"
            }
            Err(_) => {
                failure = (StatusCode::GATEWAY_TIMEOUT, backend.addr.to_string());
                "backend_timeout"
            }
        };
        backend.record_attempt(&pool.name, false, &pool.settings);
        metrics::counter!(
            m::BACKEND_FAILURES,
            "pool" => pool.name.clone(),
            "backend" => backend.addr.to_string(),
            "reason" => label,
        )
        .increment(1);
        if failure.0 == StatusCode::GATEWAY_TIMEOUT {
            break;
        }
    }
    let (status, backend) = failure;
    count(&pool.name, &backend, status);
    let text = match status {
        StatusCode::BAD_GATEWAY => "the backend failed before answering",
        StatusCode::GATEWAY_TIMEOUT => "the backend did not answer within request_timeout",
        _ => "pool has no backend to send to",
    };
    full(handshake::plain(status, text))
}

/// `wsgate_http_requests_total`.
fn count(pool: &str, backend: &str, status: StatusCode) {
    let class = match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!(
        m::HTTP_REQUESTS,
        "pool" => pool.to_string(),
        "backend" => backend.to_string(),
        "code_class" => class,
    )
    .increment(1);
}

/// The backend's answer for the client: end-to-end headers, the sticky cookie,
/// the body streamed with the backend's in-flight count held until it ends.
fn respond(
    response: Response<Incoming>,
    guard: ConnGuard,
    cookie: Option<http::HeaderValue>,
) -> Response<ProxyBody> {
    let (mut head, body) = response.into_parts();
    handshake::keep_end_to_end(&mut head.headers);
    if let Some(cookie) = cookie {
        head.headers.append(http::header::SET_COOKIE, cookie);
    }
    let body = Held {
        body,
        _guard: guard,
    };
    Response::from_parts(head, body.map_err(BoxError::from).boxed())
}

/// A body that holds its backend's in-flight count until it is done.
struct Held {
    body: Incoming,
    _guard: ConnGuard,
}

impl Body for Held {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
