//! Listeners: the accept loop, HTTP/1.1 serving of each client connection, and the
//! per-request path from route to tunnel.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::Response;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::handshake::{self, Rejection};
use crate::metrics as m;
use crate::presence::{self, PresenceEntry};
use crate::relay::{End, Limits, Meter, Outcome, Side, Tunnel};
use crate::state::State;
use crate::upstream::{self, Answer, Upgraded};

/// What every connection task needs; cheap to clone.
#[derive(Clone)]
pub struct Shared {
    pub state: Arc<State>,
    pub cluster: Arc<Cluster>,
    pub page: Option<&'static str>,
    /// Count messages and bytes per direction.
    pub message_metrics: bool,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// One permit per client connection, held from accept to the end of its tunnel.
    pub permits: Arc<Semaphore>,
}

/// Connection ids for logs, unique within the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Longest pause after a failing `accept` (EMFILE and the like).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts until shutdown. A permit is taken before each accept, so at the
/// connection limit new clients wait in the kernel's backlog; accept errors back
/// off and retry, and never end the loop.
pub async fn serve(listener: TcpListener, shared: Shared) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            permit = shared.permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let shared2 = shared.clone();
                shared
                    .tracker
                    .spawn(serve_connection(stream, peer, shared2, Arc::new(permit)));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                tracing::warn!(error = %e, pause = ?backoff, "accept failed, pausing");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Errors about one connection that died in the queue, not about the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Shared,
    permit: Arc<OwnedSemaphorePermit>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "set_nodelay");
    }
    let settings = shared.state.load().server.clone();
    let shutdown = shared.shutdown.clone();
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let permit = permit.clone();
        async move { Ok::<_, Infallible>(proxy(req, peer, shared, permit).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        .max_buf_size(settings.max_header_bytes);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Answers one request: a rejection, the backend's refusal, or a 101 with the
/// tunnel started behind it.
async fn proxy(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: Shared,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Full<Bytes>> {
    if let Some(html) = shared.page
        && req.uri().path() == "/"
        && !req.headers().contains_key(http::header::UPGRADE)
    {
        let mut page = Response::new(Full::new(Bytes::from_static(html.as_bytes())));
        page.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/html; charset=utf-8"),
        );
        return page;
    }
    let started = Instant::now();
    let snapshot = shared.state.load();
    let Some(route) = snapshot.route(handshake::request_host(&req), req.uri().path()) else {
        tracing::debug!(%peer, path = req.uri().path(), "no route");
        count_upgrade("", "", "no_route");
        return Rejection::NoRoute.response();
    };
    if let Err(rejection) = handshake::validate(&req) {
        tracing::debug!(%peer, ?rejection, "rejected upgrade");
        count_upgrade(&route.pool.name, "", "bad_request");
        return rejection.response();
    }
    let user = match &route.identity {
        None => None,
        Some(source) => match presence::identity(source, &req) {
            Ok(user) => user,
            Err(reason) => {
                count_upgrade(&route.pool.name, "", "bad_request");
                return Rejection::Malformed(reason).response();
            }
        },
    };
    let pool = route.pool.clone();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "conn",
        id,
        %peer,
        route = %route.path,
        pool = %pool.name,
        backend = tracing::field::Empty,
    );
    let client_upgrade = hyper::upgrade::on(&mut req);
    let request = handshake::backend_request(&mut req, peer, "http", user.as_deref());
    let mut rng = fastrand::Rng::new();
    let answer = upstream::open(&pool, request, &mut rng)
        .instrument(span.clone())
        .await;
    let upgraded = match answer {
        Ok(Answer::Upgraded(upgraded)) => upgraded,
        Ok(Answer::Declined { response, backend }) => {
            span.in_scope(
                || tracing::info!(status = %response.status(), "backend declined the upgrade"),
            );
            count_upgrade(&pool.name, &backend.to_string(), "backend_rejected");
            return response;
        }
        Err(e) => {
            span.in_scope(|| tracing::warn!(error = %e, "no backend took the upgrade"));
            let backend = e.backend().map(ToString::to_string).unwrap_or_default();
            count_upgrade(&pool.name, &backend, e.label());
            return handshake::plain(e.status(), &e.to_string());
        }
    };
    // Only what the tunnel needs goes into its task: the 101's headers are done
    // with once the response is built.
    let Upgraded {
        stream: backend_stream,
        early: backend_early,
        head,
        guard,
    } = upgraded;
    // The address is formatted only where a string is kept: the metric label
    // (once per backend) and a presence record.
    let addr = &guard.backend().addr;
    span.record("backend", tracing::field::display(addr));
    guard
        .backend()
        .upgrades_ok
        .get_or_init(|| upgrade_counter(&pool.name, &addr.to_string(), "ok"))
        .increment(1);
    m::PoolHistograms::of(&pool)
        .upgrade
        .record(started.elapsed().as_secs_f64());
    let presence = user.map(|user| {
        shared.cluster.presence().join(PresenceEntry {
            user,
            instance: shared.cluster.instance_id().to_string(),
            pool: pool.name.clone(),
            backend: addr.to_string(),
            conn: id,
            since: presence::now_ms(),
        })
    });
    let response = handshake::switching_protocols(head);
    let limits = Limits {
        idle_timeout: pool.settings.idle_timeout,
        max_message_size: pool.settings.max_message_size,
    };
    let shutdown = shared.shutdown.clone();
    let meter = shared.message_metrics.then(|| Meter::new(&pool.name));
    let tunnel = Tunnel::new(
        backend_stream,
        backend_early,
        limits,
        (guard, presence),
        meter,
    );
    let task = async move {
        let client = match client_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "client left during the upgrade");
                return;
            }
        };
        let Ok(client) = client.downcast::<TokioIo<TcpStream>>() else {
            tracing::error!("client connection of an unexpected type");
            return;
        };
        tracing::debug!("tunnel open");
        let opened = Instant::now();
        let outcome = tunnel
            .run(client.io.into_inner(), client.read_buf, shutdown)
            .await;
        drop(permit);
        count_close(&pool.name, &outcome);
        m::PoolHistograms::of(&pool)
            .connection
            .record(opened.elapsed().as_secs_f64());
        tracing::debug!(?outcome, "tunnel closed");
    }
    .instrument(span);
    shared.tracker.spawn(task);
    response
}

fn upgrade_counter(pool: &str, backend: &str, result: &'static str) -> ::metrics::Counter {
    ::metrics::counter!(
        m::UPGRADES,
        "pool" => pool.to_string(),
        "backend" => backend.to_string(),
        "result" => result,
    )
}

fn count_upgrade(pool: &str, backend: &str, result: &'static str) {
    upgrade_counter(pool, backend, result).increment(1);
}

/// One count per ended tunnel: who started the close and with which code.
fn count_close(pool: &str, outcome: &Outcome) {
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
        (End::Idle | End::Shutdown, _) => ("wsgate", Some(close_code::GOING_AWAY)),
        (_, Some(s)) => (side(s), first_code(s)),
        (End::ClientGone, None) => ("client", None),
        (End::BackendGone, None) => ("backend", None),
        (End::Closed, None) => ("client", None),
    };
    ::metrics::counter!(
        m::CLOSES,
        "pool" => pool.to_string(),
        "code" => m::close_code_label(code),
        "initiator" => initiator,
    )
    .increment(1);
}

/// Serves plain HTTP/1.1 (upgrades allowed) on `listener` until `stop`, answering
/// each request with `handle`: for the admin listener and the relay backend, which
/// need none of the proxy's accept-time limits.
pub async fn serve_http<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    what: &'static str,
    handle: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "{what} listening");
    }
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "{what}: connection ended with an error");
            }
        });
    }
}
