//! The per-request path: which route, is the request valid, whose is it, which
//! backend answered, then the tunnel. Each step returns the next value or a typed
//! [`Refusal`]; every upgrade's outcome is counted in one place ([`handle`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::Request;
use http_body_util::Full;
use hyper::Response;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clients::{IpSlot, OverLimit, Peer, PerIp};
use crate::cluster::Cluster;
use crate::direct::Rewind;
use crate::forward::{ProxyBody, full};
use crate::handshake::{self, Rejection};
use crate::metrics::{self as m, PoolMetrics};
use crate::presence::{self, PresenceEntry};
use crate::relay::{End, Guards, Limits, Meter, Outcome, Polled, Prepared, Side};
use crate::state::{Route, Snapshot, State};
use crate::upstream::{self, Answer, Upgraded, UpstreamError};

/// What every request needs, in one allocation: a connection's task takes a
/// clone (one reference count) and its futures hold a pointer, not the parts.
pub type Shared = Arc<Services>;

/// The parts of [`Shared`].
pub struct Services {
    pub state: Arc<State>,
    pub cluster: Arc<Cluster>,
    pub page: Option<&'static str>,
    /// Holds every connection task, tunnels included.
    pub tracker: TaskTracker,
    /// Cancelled when wsgate stops accepting (shutdown): HTTP connections finish
    /// their request and close, and an upgrade not yet answered gets a 503.
    pub stopping: CancellationToken,
    /// One permit per client connection, held from accept to the end of its tunnel.
    pub permits: Arc<Semaphore>,
    /// Pooled connections for plain HTTP requests (`http = "proxy"`).
    pub http: crate::forward::HttpClient,
    /// Connections and upgrade allowances per client address.
    pub per_ip: Arc<PerIp>,
}

/// One client connection's hold on wsgate's capacity: its `max_connections`
/// permit and its address's slot under `max_connections_per_ip`. Shared by the
/// connection's requests and its tunnel; released when the last of them ends.
pub struct ConnHold {
    /// Field order is release order: the address's slot, then the permit.
    pub ip: Option<IpSlot>,
    pub permit: OwnedSemaphorePermit,
}

/// An upgrade's answer: the response to write, and the tunnel to run behind it
/// when it is a 101.
pub type Reply = (Response<Full<Bytes>>, Option<Pending>);

/// What every request of one client connection shares.
#[derive(Clone)]
pub struct Conn {
    pub peer: Peer,
    /// The address the client connected to, read when a pool's PROXY protocol
    /// will name it.
    pub local: Option<SocketAddr>,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The address held more than `max_connections_per_ip` when this one came:
    /// every request on it gets 429.
    pub over_ip_limit: bool,
    pub hold: Arc<ConnHold>,
}

/// Connection ids for logs, unique within the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Why an upgrade request did not become a tunnel: the answer the client gets and
/// the labels it is counted under.
pub struct Refusal {
    /// The route the request matched (its path), for the access log.
    pub route: String,
    pub pool: String,
    /// The backend that answered or failed, if one was asked.
    pub backend: String,
    /// The `result` label of `wsgate_upgrades_total`.
    pub result: &'static str,
    /// Boxed: a refusal travels through every step's `Result`.
    pub response: Box<Response<Full<Bytes>>>,
}

impl Refusal {
    fn new(pool: &str, result: &'static str, response: Response<Full<Bytes>>) -> Refusal {
        Refusal {
            route: String::new(),
            pool: pool.to_string(),
            backend: String::new(),
            result,
            response: Box::new(response),
        }
    }
}

/// A backend said 101: what the tunnel is built from.
struct Accepted {
    route_pool: Arc<crate::balancer::Pool>,
    metrics: Arc<PoolMetrics>,
    upgraded: Upgraded,
    user: Option<String>,
    client: OnUpgrade,
    /// The sticky cookie the 101 sets, if any.
    cookie: Option<http::HeaderValue>,
    /// An HTTP/2 WebSocket (RFC 8441): answered 200, not 101.
    h2: bool,
    /// The route's path, for the access log (only while it is on).
    route_path: Option<String>,
}

/// What the access log says of a tunnel when it ends; made only while the access
/// log is on, and boxed: the tunnel's task holds it for the tunnel's life.
struct AccessEntry {
    conn: u64,
    client: SocketAddr,
    route: String,
    user: Option<String>,
    /// The backend's place in the pool (the pool is held by the tunnel's task).
    backend: usize,
    /// HTTP/2 (RFC 8441) rather than an HTTP/1.1 upgrade.
    h2: bool,
    /// Over TLS.
    tls: bool,
}

/// Answers one request: the demo page, a refusal, the backend's own refusal, or a
/// 101 with the tunnel started behind it.
pub async fn handle(mut req: Request<Incoming>, conn: Conn, shared: Shared) -> Response<ProxyBody> {
    if conn.over_ip_limit {
        return full(ip_limited(&conn, handshake::is_upgrade(&req)));
    }
    if let Some(page) = page(&shared, &req) {
        return full(page);
    }
    if shared.stopping.is_cancelled() {
        return full(shutting_down());
    }
    // Once, before routing: routing and the backend see the same path.
    handshake::normalize_path(&mut req);
    if !handshake::is_upgrade(&req) {
        let snapshot = shared.state.load();
        if let Some(route) = snapshot.route(handshake::request_host(&req), req.uri().path())
            && route.http_proxy
        {
            let user = match identity(route, &req) {
                Ok(user) => user,
                Err(refusal) => return full(*refusal.response),
            };
            return crate::forward::forward(req, &conn, route, &shared.http, user).await;
        }
    }
    let (response, pending) = upgrade_request(req, &conn, &shared).await;
    if let Some(pending) = pending {
        pending.spawn(&shared.tracker);
    }
    full(response)
}

/// Answers a plain HTTP/1.1 WebSocket upgrade read without hyper (see
/// `direct::serve`): the response to write, and the tunnel to run on the
/// connection once it is written. Everything [`handle`] does for an upgrade
/// (the path normalised first here: no refusal before routing depends on it).
/// Not an async fn of its own: the connection's task builds `upgrade_request`'s
/// future in place, without another few kilobytes copied.
pub fn upgrade_direct<'a>(
    mut req: Request<()>,
    conn: &'a Conn,
    shared: &'a Shared,
) -> impl Future<Output = Reply> + Send + 'a {
    handshake::normalize_path(&mut req);
    upgrade_request(req, conn, shared)
}

/// The answer on a connection its address opened over `max_connections_per_ip`;
/// counted and logged as a refused upgrade when the request is one.
fn ip_limited(conn: &Conn, upgrade: bool) -> Response<Full<Bytes>> {
    let refusal = Refusal::new("", "ip_limited", too_many(OverLimit::Connections));
    if upgrade {
        m::upgrade_counter("", "", refusal.result).increment(1);
        if crate::access::enabled() {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            log_refusal(id, conn, &refusal, Instant::now());
        }
    }
    *refusal.response
}

/// One access-log line for a refused upgrade.
fn log_refusal(id: u64, conn: &Conn, refusal: &Refusal, started: Instant) {
    tracing::info!(
        target: crate::access::TARGET,
        event = "refused",
        conn = id,
        client = %conn.peer.client,
        route = refusal.route.as_str(),
        pool = refusal.pool.as_str(),
        backend = refusal.backend.as_str(),
        status = refusal.response.status().as_u16(),
        reason = refusal.result,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "refused"
    );
}

/// One access-log line for a tunnel that ended.
fn log_tunnel(
    entry: &AccessEntry,
    pool: &crate::balancer::Pool,
    outcome: &Outcome,
    duration: std::time::Duration,
) {
    let (closed_by, code, reason) = close_summary(outcome);
    let backend = pool
        .backends
        .get(entry.backend)
        .map(|b| b.addr.to_string())
        .unwrap_or_default();
    tracing::info!(
        target: crate::access::TARGET,
        event = "tunnel",
        conn = entry.conn,
        client = %entry.client,
        route = entry.route.as_str(),
        pool = pool.name.as_str(),
        backend = backend.as_str(),
        user = entry.user.as_deref(),
        protocol = if entry.h2 { "h2" } else { "h1" },
        scheme = if entry.tls { "wss" } else { "ws" },
        duration_ms = duration.as_secs_f64() * 1000.0,
        messages_in = outcome.client_to_backend.messages,
        bytes_in = outcome.client_to_backend.bytes,
        messages_out = outcome.backend_to_client.messages,
        bytes_out = outcome.backend_to_client.bytes,
        close_code = code,
        closed_by,
        reason,
        "tunnel"
    );
}

/// 429 for a client address over one of its limits.
fn too_many(over: OverLimit) -> Response<Full<Bytes>> {
    let (text, retry_after) = match over {
        OverLimit::Connections => ("too many connections from your address", None),
        OverLimit::Upgrades { retry_after } => (
            "too many upgrades from your address: slow down",
            Some(retry_after),
        ),
        OverLimit::Table => ("too many clients at once: try again shortly", Some(1)),
    };
    let mut response = handshake::plain(http::StatusCode::TOO_MANY_REQUESTS, text);
    let headers = response.headers_mut();
    if let Some(after) = retry_after {
        headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(after));
    }
    if over == OverLimit::Connections {
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A WebSocket upgrade (or a request refused as one).
async fn upgrade_request<B>(mut req: Request<B>, conn: &Conn, shared: &Shared) -> Reply {
    // `handle` answers these before it gets here; `upgrade_direct` leaves them
    // to this function.
    if conn.over_ip_limit {
        return (ip_limited(conn, true), None);
    }
    if shared.stopping.is_cancelled() {
        return (shutting_down(), None);
    }
    let started = Instant::now();
    let snapshot = shared.state.load();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // Debug level: an enabled span is kept (fields formatted, in the registry) for
    // the tunnel's whole life, a few hundred bytes per idle connection; the access
    // log says what happened to each connection at info level.
    let span = tracing::debug_span!(
        "conn",
        id,
        peer = %conn.peer.client,
        route = tracing::field::Empty,
        pool = tracing::field::Empty,
        backend = tracing::field::Empty,
    );
    let instances = shared.cluster.instances();
    let in_flight = crate::balancer::InFlight::new(shared.state.peers());
    let accepted = if span.is_disabled() {
        // Debug logging off: the upgrade's future is awaited as it is, not moved
        // into a wrapper (kilobytes copied) that enters a disabled span per poll.
        upgrade(&mut req, conn, &snapshot, &shared.per_ip, &span, instances).await
    } else {
        upgrade(&mut req, conn, &snapshot, &shared.per_ip, &span, instances)
            .instrument(span.clone())
            .await
    };
    drop(in_flight);
    match accepted {
        // Caught mid-handshake by the shutdown: the backend's tunnel is dropped
        // unused, and the client told to come back, never given a 101 and a close.
        Ok(accepted) if shared.stopping.is_cancelled() => {
            m::upgrade_counter(&accepted.route_pool.name, "", "shutting_down").increment(1);
            (shutting_down(), None)
        }
        Ok(accepted) => {
            let Upgraded { index, .. } = accepted.upgraded;
            if let Some(ok) = accepted.metrics.upgrades_ok.get(index) {
                ok.increment(1);
            }
            accepted
                .metrics
                .upgrade
                .record(started.elapsed().as_secs_f64());
            accepted.metrics.websockets[usize::from(accepted.h2)].increment(1);
            start_tunnel(accepted, id, shared, conn, span)
        }
        Err(refusal) => {
            m::upgrade_counter(&refusal.pool, &refusal.backend, refusal.result).increment(1);
            if crate::access::enabled() {
                log_refusal(id, conn, &refusal, started);
            }
            (*refusal.response, None)
        }
    }
}

/// 503 with `Retry-After`: this instance is shutting down, another will answer.
fn shutting_down() -> Response<Full<Bytes>> {
    let mut response = handshake::plain(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "shutting down: connect again",
    );
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    response
}

/// The demo's page, for a plain `GET /` when the gateway has one.
fn page(shared: &Shared, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let html = shared.page?;
    if req.uri().path() != "/" || req.headers().contains_key(http::header::UPGRADE) {
        return None;
    }
    let mut page = Response::new(Full::new(Bytes::from_static(html.as_bytes())));
    page.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Some(page)
}

/// The client's allowance → route → the rest ([`upgrade_on`]); a refusal names
/// the route it matched.
async fn upgrade<B>(
    req: &mut Request<B>,
    conn: &Conn,
    snapshot: &Snapshot,
    per_ip: &PerIp,
    span: &tracing::Span,
    instances: usize,
) -> Result<Accepted, Refusal> {
    if let Some(rate) = snapshot.config.server.max_upgrades_per_ip
        && let Err(over) = per_ip.upgrade(conn.peer.client.ip(), rate)
    {
        let mut refusal = Refusal::new("", "ip_limited", too_many(over));
        if let Some(route) = snapshot.route(handshake::request_host(req), req.uri().path()) {
            refusal.route = route.path.clone();
        }
        return Err(refusal);
    }
    let route = find_route(snapshot, req)?;
    upgrade_on(route, req, conn, span, instances)
        .await
        .map_err(|mut refusal| {
            refusal.route = route.path.clone();
            refusal
        })
}

/// Validate → origin → identity → admission → backend.
async fn upgrade_on<B>(
    route: &Route,
    req: &mut Request<B>,
    conn: &Conn,
    span: &tracing::Span,
    instances: usize,
) -> Result<Accepted, Refusal> {
    span.record("route", route.path.as_str());
    span.record("pool", route.pool.name.as_str());
    validate(route, req)?;
    check_origin(route, req)?;
    let user = identity(route, req)?;
    admit(route, instances)?;
    let placement = crate::sticky::place(&route.pool, req);
    if let Some(result) = placement.result {
        metrics::counter!(m::STICKY, "pool" => route.pool.name.clone(), "result" => result)
            .increment(1);
    }
    let h2 = req.version() == http::Version::HTTP_2;
    let client = hyper::upgrade::on(&mut *req);
    let request = handshake::backend_request(req, &conn.peer, conn.proto, user.as_deref());
    // The backend's 101 was checked against this request's offer (the key wsgate
    // made for HTTP/2, or the client's own) in `upstream`.
    let addresses = conn.local.map(|local| (conn.peer.client, local));
    let upgraded = ask_backends(route, request, placement.preferred, addresses).await?;
    let cookie = placement.set_cookie(&route.pool, upgraded.index, conn.proto == "https");
    span.record(
        "backend",
        tracing::field::display(&upgraded.guard.backend().addr),
    );
    Ok(Accepted {
        route_pool: route.pool.clone(),
        metrics: route.metrics.clone(),
        upgraded,
        user,
        client,
        cookie,
        h2,
        route_path: crate::access::enabled().then(|| route.path.clone()),
    })
}

/// Which route: the first that matches host and path.
fn find_route<'s, B>(snapshot: &'s Snapshot, req: &Request<B>) -> Result<&'s Route, Refusal> {
    snapshot
        .route(handshake::request_host(req), req.uri().path())
        .ok_or_else(|| {
            tracing::debug!(path = req.uri().path(), "no route");
            Refusal::new("", "no_route", Rejection::NoRoute.response())
        })
}

/// Is it a valid WebSocket upgrade (RFC 6455 §4.2.1)?
fn validate<B>(route: &Route, req: &Request<B>) -> Result<(), Refusal> {
    handshake::validate(req).map_err(|rejection| {
        tracing::debug!(?rejection, "rejected upgrade");
        Refusal::new(&route.pool.name, "bad_request", rejection.response())
    })
}

/// May a page from where it comes open it: the route's `origins`, when it has
/// them. A request without `Origin` does not come from a browser page and passes.
fn check_origin<B>(route: &Route, req: &Request<B>) -> Result<(), Refusal> {
    let Some(allowed) = &route.origins else {
        return Ok(());
    };
    let Some(origin) = req.headers().get(http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
    if allowed.contains(&origin) {
        return Ok(());
    }
    tracing::debug!(origin, "origin not allowed");
    Err(Refusal::new(
        &route.pool.name,
        "forbidden_origin",
        handshake::plain(
            http::StatusCode::FORBIDDEN,
            "this origin may not open WebSockets here",
        ),
    ))
}

/// Whose is it: the presence identity, when the route reads one.
fn identity<B>(route: &Route, req: &Request<B>) -> Result<Option<String>, Refusal> {
    let Some(source) = &route.identity else {
        return Ok(None);
    };
    presence::identity(source, req).map_err(|reason| {
        Refusal::new(
            &route.pool.name,
            "bad_request",
            Rejection::Malformed(reason).response(),
        )
    })
}

/// Is there room: the pool's `max_upgrade_rate` (this instance's share of it).
/// Over it, 503 with a `Retry-After` of 1 to 5 s, jittered so the refused do not
/// come back together.
fn admit(route: &Route, instances: usize) -> Result<(), Refusal> {
    let Some(admission) = &route.pool.admission else {
        return Ok(());
    };
    if admission.admit(instances) {
        return Ok(());
    }
    let mut response = handshake::plain(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "too many upgrades at once: try again shortly",
    );
    let after = http::HeaderValue::from(fastrand::u16(1..=5));
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, after);
    Err(Refusal::new(&route.pool.name, "rate_limited", response))
}

/// Which backend answered: a 101, or the backend's own answer passed back.
async fn ask_backends(
    route: &Route,
    request: Request<http_body_util::Empty<Bytes>>,
    preferred: Option<usize>,
    addresses: Option<(SocketAddr, SocketAddr)>,
) -> Result<Upgraded, Refusal> {
    let pool = &route.pool;
    let mut rng = fastrand::Rng::new();
    match upstream::open(pool, request, &mut rng, preferred, addresses).await {
        Ok(Answer::Upgraded(upgraded)) => Ok(upgraded),
        Ok(Answer::Declined { response, backend }) => {
            tracing::info!(status = %response.status(), %backend, "backend declined the upgrade");
            Err(Refusal {
                route: String::new(),
                pool: pool.name.clone(),
                backend: backend.to_string(),
                result: "backend_rejected",
                response: Box::new(response),
            })
        }
        Err(e) => {
            let mut response = handshake::plain(e.status(), &e.to_string());
            if matches!(e, UpstreamError::OutOfDescriptors) {
                // Logged once per episode where it was noticed; a retry may succeed,
                // and this connection's descriptor is given back at once.
                let headers = response.headers_mut();
                headers.insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
                headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            } else {
                tracing::warn!(error = %crate::Chain(&e), "no backend took the upgrade");
            }
            Err(Refusal {
                route: String::new(),
                pool: pool.name.clone(),
                backend: e.backend().map(ToString::to_string).unwrap_or_default(),
                result: e.label(),
                response: Box::new(response),
            })
        }
    }
}

/// A tunnel whose backend said 101, waiting for the client's side: hyper hands
/// it over once the 101 is written ([`Pending::spawn`]), or the connection's own
/// task runs it in place ([`Pending::run`]).
pub struct Pending {
    tunnel: Box<Prepared<upstream::BackendStream>>,
    /// The client's upgrade as hyper completes it (unused when run in place).
    client: OnUpgrade,
    wave: Arc<crate::closing::Wave>,
    span: tracing::Span,
    end: Ending,
}

/// What recording a tunnel's end takes.
struct Ending {
    pool: Arc<crate::balancer::Pool>,
    metrics: Arc<PoolMetrics>,
    access: Option<Box<AccessEntry>>,
}

impl Pending {
    /// A task of its own that waits for hyper to hand over the client's stream.
    fn spawn(self, tracker: &TaskTracker) {
        let span = self.span.clone();
        let task = async move {
            let client = match self.client.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "client left during the upgrade");
                    return;
                }
            };
            tracing::debug!("tunnel open");
            let Pending {
                tunnel, wave, end, ..
            } = self;
            let outcome = match client_stream(client) {
                ClientStream::Tcp(tcp, early) => tunnel.run(tcp, early, wave).await,
                ClientStream::Tls(tls, early) => tunnel.run(tls, early, wave).await,
                ClientStream::Other(stream) => tunnel.run(stream, Bytes::new(), wave).await,
            };
            end.record(&outcome);
        };
        // A disabled span (debug logging off) is not carried for the tunnel's life.
        if span.is_disabled() {
            tracker.spawn(task);
        } else {
            tracker.spawn(task.instrument(span));
        }
    }

    /// Relays in the caller's task, the 101 written: `client` is the plain TCP
    /// stream the upgrade came on, `early` what the client sent behind it. Built
    /// here from combinators, not in an `async fn`: an idle tunnel's task holds
    /// the relay's state once, and no copy of the values it started from (the
    /// task is 640 bytes, in the allocator's 640-byte class).
    pub fn run(self, client: TcpStream, early: Bytes) -> impl Future<Output = ()> + Send {
        let Pending {
            tunnel,
            wave,
            span,
            end,
            ..
        } = self;
        span.in_scope(|| tracing::debug!("tunnel open"));
        let relaying = tunnel
            .run(client, early, wave)
            .map(move |outcome| end.record(&outcome));
        if span.is_disabled() {
            Either::Left(relaying)
        } else {
            Either::Right(relaying.instrument(span))
        }
    }
}

impl Ending {
    /// A tunnel ended: its close counted, its lifetime recorded, its access-log line.
    fn record(&self, outcome: &Outcome) {
        let (initiator, code, reason) = close_summary(outcome);
        self.metrics
            .closes
            .increment((initiator, m::close_code_label(code), reason));
        self.metrics
            .connection
            .record(outcome.duration.as_secs_f64());
        if let Some(entry) = &self.access {
            log_tunnel(entry, &self.pool, outcome, outcome.duration);
        }
        tracing::debug!(?outcome, "tunnel closed");
    }
}

/// Joins presence and builds the tunnel; returns the 101 and the tunnel, to be
/// run once the 101 is on its way.
fn start_tunnel(
    accepted: Accepted,
    id: u64,
    shared: &Shared,
    conn: &Conn,
    span: tracing::Span,
) -> Reply {
    let Accepted {
        route_pool: pool,
        metrics,
        upgraded,
        user,
        client,
        cookie,
        h2,
        route_path,
    } = accepted;
    let permit = conn.hold.clone();
    let access = crate::access::enabled().then(|| {
        Box::new(AccessEntry {
            conn: id,
            client: conn.peer.client,
            route: route_path.unwrap_or_default(),
            user: user.clone(),
            backend: upgraded.index,
            h2,
            tls: conn.proto == "https",
        })
    });
    let Upgraded {
        stream,
        early,
        head,
        guard,
        ..
    } = upgraded;
    let presence = user.map(|user| {
        shared.cluster.presence().join(PresenceEntry {
            user,
            instance: shared.cluster.instance_id().to_string(),
            pool: pool.name.clone(),
            backend: guard.backend().addr.to_string(),
            conn: id,
            since: presence::now_ms(),
        })
    });
    let limits = Limits {
        idle_timeout: pool.settings.idle_timeout,
        max_message_size: pool.settings.max_message_size,
        close_timeout: pool.settings.close_timeout,
        strict_frames: shared.state.load().config.server.strict_frames,
        extensions: head
            .headers
            .contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS),
    };
    let wave = guard.backend().wave();
    let guards = Guards {
        backend: Some(guard),
        presence,
        permit: Some(permit),
    };
    let message_metrics = shared.state.load().config.admin.message_metrics;
    let meter = message_metrics.then(|| Meter::new(metrics.traffic.clone()));
    let tunnel = Prepared::new(stream, early, limits, guards, meter);
    let mut response = if h2 {
        handshake::h2_accepted(head)
    } else {
        handshake::switching_protocols(head)
    };
    if let Some(cookie) = cookie {
        response
            .headers_mut()
            .append(http::header::SET_COOKIE, cookie);
    }
    let pending = Pending {
        tunnel,
        client,
        wave,
        span,
        end: Ending {
            pool,
            metrics,
            access,
        },
    };
    (response, Some(pending))
}

/// The client's side of a tunnel, by kind.
enum ClientStream {
    /// Plain TCP: the readiness fast path; with the bytes read behind the request.
    Tcp(TcpStream, Bytes),
    /// TLS: through `Polled`.
    Tls(
        Box<Polled<tokio_rustls::server::TlsStream<crate::tls::ReadAhead>>>,
        Bytes,
    ),
    /// An HTTP/2 stream (or any other upgraded stream).
    Other(Box<Polled<TokioIo<hyper::upgrade::Upgraded>>>),
}

/// Takes the client's stream out of hyper. A plain function, and boxed for TLS:
/// the tunnel's task lives as long as the tunnel, and a TLS session held in it
/// (even only by the layout of a match) would cost every tunnel its size.
fn client_stream(upgraded: hyper::upgrade::Upgraded) -> ClientStream {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(tcp) => return ClientStream::Tcp(tcp.io.into_inner(), tcp.read_buf),
        Err(upgraded) => upgraded,
    };
    // A connection hyper took over from the direct path: what hyper read from it
    // comes before what it left unread of the bytes put back.
    let upgraded = match upgraded.downcast::<TokioIo<Rewind<TcpStream>>>() {
        Ok(rewound) => {
            let (tcp, unread) = rewound.io.into_inner().into_parts();
            let early = if unread.is_empty() {
                rewound.read_buf
            } else {
                [rewound.read_buf, unread].concat().into()
            };
            return ClientStream::Tcp(tcp, early);
        }
        Err(upgraded) => upgraded,
    };
    match upgraded.downcast::<TokioIo<tokio_rustls::server::TlsStream<crate::tls::ReadAhead>>>() {
        Ok(tls) => ClientStream::Tls(Box::new(Polled::new(tls.io.into_inner())), tls.read_buf),
        Err(stream) => ClientStream::Other(Box::new(Polled::new(TokioIo::new(stream)))),
    }
}

/// Who started a tunnel's close (`client`, `backend`, `wsgate`), its first close
/// code, and why the tunnel ended.
fn close_summary(outcome: &Outcome) -> (&'static str, Option<u16>, &'static str) {
    use crate::frame::close_code;
    let side = |s: Side| match s {
        Side::Client => "client",
        Side::Backend => "backend",
    };
    let first_code = |s: Side| match s {
        Side::Client => outcome.client_to_backend.close_code,
        Side::Backend => outcome.backend_to_client.close_code,
    };
    let (initiator, code) = match (outcome.end, outcome.first_close) {
        (End::TooBig(_), _) => ("wsgate", Some(close_code::MESSAGE_TOO_BIG)),
        (End::Broken(_, code), _) => ("wsgate", Some(code)),
        (End::Idle | End::Shutdown, _) => ("wsgate", Some(close_code::GOING_AWAY)),
        (End::Drain | End::Rebalance, _) => ("wsgate", Some(close_code::SERVICE_RESTART)),
        (_, Some(s)) => (side(s), first_code(s)),
        (End::ClientGone, None) => ("client", None),
        (End::BackendGone, None) => ("backend", None),
        (End::Closed | End::CloseTimeout, None) => ("client", None),
    };
    let reason = match outcome.end {
        End::Closed => "closed",
        End::ClientGone => "client_gone",
        End::BackendGone => "backend_gone",
        End::TooBig(_) => "too_big",
        End::Broken(_, close_code::INVALID_PAYLOAD) => "invalid_payload",
        End::Broken(..) => "protocol_error",
        End::Idle => "idle",
        End::Shutdown => "shutdown",
        End::Drain => "drain",
        End::CloseTimeout => "close_timeout",
        End::Rebalance => "rebalance",
    };
    (initiator, code, reason)
}
