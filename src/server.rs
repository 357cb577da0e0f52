//! Listeners: the accept loop (one for the proxy, the admin listener and the
//! relay backend) and HTTP/1.1 serving of each client connection.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

use crate::backoff::Backoff;
use crate::clients::{self, Peer};
use crate::descriptors;
use crate::handler::{self, Conn, ConnHold, Shared};

/// First and longest pause after a failing `accept` (EMFILE and the like).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// How long a client of the admin listener or the relay backend has to send a
/// request head.
const PLAIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a listener (synchronously, so a reload can bind before it changes
/// anything): `SO_REUSEADDR`, non-blocking, the kernel queueing up to `backlog`
/// connections not yet accepted (`[server] backlog`; the kernel caps it at
/// `net.core.somaxconn`). On Linux without quick ACKs (inherited by the
/// connections it accepts): a client's first request is acknowledged by the answer
/// that follows it within the delayed-ACK time, not by an empty segment of its
/// own, as HAProxy's `tcp-smart-accept` does in HTTP mode. On Linux the
/// connections also inherit `TCP_NODELAY` from it: no system call per connection.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    // After listen(2), which resets the ACK state. Only a saving: a kernel that
    // refuses it acknowledges as before.
    #[cfg(target_os = "linux")]
    if let Err(e) = socket.set_tcp_quickack(false) {
        tracing::debug!(%addr, error = %e, "quick ACKs stay on");
    }
    TcpListener::from_std(socket.into())
}

/// Accepts on `listener` until `stop` and spawns `serve` for each connection on
/// `tracker`. With `permits`, one is taken before each accept, so at the limit new
/// clients wait in the kernel's backlog. Accept errors back off and retry, and never
/// end the loop.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    permits: Option<Arc<Semaphore>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    what: &'static str,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "{what} listening");
    }
    let mut backoff = Backoff::new(ACCEPT_BACKOFF.0, ACCEPT_BACKOFF.1);
    let mut spare = descriptors::Spare::new();
    // One wait on the stop signal for the loop's life, looked at only when the
    // step at hand has to wait: a client already queued is taken without joining
    // the signal's waiters and leaving them again. A flood that never lets the
    // accept wait still sees the stop at the top of each pass.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let permit = match &permits {
            None => None,
            Some(permits) => tokio::select! {
                biased;
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                _ = &mut stopped => return,
            },
        };
        let accepted = tokio::select! {
            biased;
            accepted = listener.accept() => accepted,
            _ = &mut stopped => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                tracker.spawn(serve(stream, peer, permit));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) if descriptors::exhausted(&e) => {
                descriptors::note("accept", &e);
                // The spare descriptor lets one waiting client in to read a 503.
                if spare.refuse_one(&listener).await {
                    backoff.reset();
                } else if !backoff.pause(&stop).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accept failed, pausing");
                if !backoff.pause(&stop).await {
                    return;
                }
            }
        }
    }
}

/// Small messages go out at once (no Nagle delay); a failure only costs latency.
/// On Linux the connection has it from its listener already (see [`bind`]).
fn nodelay(stream: &TcpStream, peer: SocketAddr) {
    #[cfg(not(target_os = "linux"))]
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "set_nodelay");
    }
    #[cfg(target_os = "linux")]
    let _ = (stream, peer);
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

/// Accepts proxy clients on `listener` until shutdown.
pub async fn serve(listener: TcpListener, shared: Shared) {
    serve_until(listener, shared.stopping.clone(), shared).await
}

/// Accepts proxy clients on `listener` until `stop` (this listener removed by a
/// reload, or wsgate stopping).
pub async fn serve_until(listener: TcpListener, stop: CancellationToken, shared: Shared) {
    let (permits, tracker) = (Some(shared.permits.clone()), shared.tracker.clone());
    accept_loop(
        listener,
        permits,
        tracker,
        stop,
        "proxy",
        move |stream, peer, permit| {
            // Everything before the tunnel, boxed and freed before the tunnel
            // runs: the connection's task carries only the tunnel for its life.
            // Written into a box allocated first: only the arguments it starts
            // with are written, where `Box::pin` would build it beside and copy
            // it whole (the size of its largest state, kilobytes).
            let answering = Box::into_pin(Box::write(
                Box::new_uninit(),
                answer_plain(stream, peer, permit, shared.clone()),
            ));
            async move {
                // Awaited as made (no local kept beside it across the await).
                let relaying = answering.await.map(crate::direct::Tunnel::run);
                futures_util::future::OptionFuture::from(relaying).await;
            }
        },
    )
    .await
}

/// A plain-TCP client connection up to its tunnel, if it gets one.
async fn answer_plain(
    mut stream: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    shared: Shared,
) -> Option<crate::direct::Tunnel> {
    nodelay(&stream, peer);
    let conn = admit(&mut stream, peer, &shared, permit?, "http").await?;
    crate::direct::serve(stream, conn, shared).await
}

/// Who a new client connection is and what it may hold: the PROXY protocol
/// header from a trusted proxy (when `[server] proxy_protocol` is on) names the
/// client; then its address's slot under `max_connections_per_ip`. `None` when
/// the connection is to be closed (a bad or missing PROXY header).
async fn admit(
    stream: &mut TcpStream,
    addr: SocketAddr,
    shared: &Shared,
    permit: OwnedSemaphorePermit,
    proto: &'static str,
) -> Option<Conn> {
    let snapshot = shared.state.load();
    let settings = &snapshot.config.server;
    // One system call a connection, made only when a pool will send it on.
    let local = snapshot
        .names_local_address
        .then(|| stream.local_addr().ok())
        .flatten();
    let mut peer = Peer::direct(addr, settings);
    if settings.proxy_protocol && peer.trusted {
        let deadline = tokio::time::Instant::now() + settings.handshake_timeout;
        // Boxed: its buffer would otherwise be part of every connection's task.
        match Box::pin(clients::read_proxy_header(stream, deadline)).await {
            Ok(Some(client)) => peer = Peer::direct(client, settings),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "refused a connection from a trusted proxy");
                ::metrics::counter!(crate::metrics::PROXY_HEADER_ERRORS).increment(1);
                return None;
            }
        }
    }
    let (ip, over_ip_limit) = match settings.max_connections_per_ip {
        None => (None, false),
        Some(max) => match shared.per_ip.connect(peer.client.ip(), max) {
            Ok(slot) => (Some(slot), false),
            Err(_) => (None, true),
        },
    };
    Some(Conn {
        peer,
        local,
        proto,
        over_ip_limit,
        hold: Arc::new(ConnHold { ip, permit }),
    })
}

/// Serves one client connection: HTTP/1.1 with upgrades, its head read within
/// `handshake_timeout` and bounded by `max_header_bytes`.
pub(crate) async fn serve_connection<I>(stream: I, conn: Conn, shared: Shared)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Two numbers, not a copy of the whole [server] table (lists included) per
    // connection.
    let (handshake_timeout, max_header_bytes) = {
        let server = &shared.state.load().config.server;
        (server.handshake_timeout, server.max_header_bytes)
    };
    let stopping = shared.stopping.clone();
    let peer = conn.peer.client;
    let service = service_fn(move |req| {
        let (shared, conn) = (shared.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handler::handle(req, conn, shared).await) }
    });
    let served = serve_h1(
        stream,
        service,
        handshake_timeout,
        Some(max_header_bytes),
        &stopping,
    )
    .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Accepts TLS clients on `listener` until `stop`: the TLS handshake (within
/// `handshake_timeout`), then HTTP/2 when the client chose `h2` by ALPN (WebSockets
/// as extended CONNECT streams, RFC 8441), else HTTP/1.1.
pub async fn serve_tls(
    listener: TcpListener,
    stop: CancellationToken,
    shared: Shared,
    config: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
) {
    let (permits, tracker) = (Some(shared.permits.clone()), shared.tracker.clone());
    accept_loop(
        listener,
        permits,
        tracker,
        stop,
        "tls",
        move |stream, peer, permit| {
            // The config of the moment: a reload's certificates serve new handshakes.
            let (shared, acceptor) = (
                shared.clone(),
                tokio_rustls::TlsAcceptor::from(config.load_full()),
            );
            async move {
                let Some(permit) = permit else { return };
                nodelay(&stream, peer);
                let mut stream = stream;
                let Some(conn) = admit(&mut stream, peer, &shared, permit, "https").await else {
                    return;
                };
                let peer = conn.peer.client;
                let limit = shared.state.load().config.server.handshake_timeout;
                let stream = crate::tls::ReadAhead::new(stream);
                let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                if h2 {
                    serve_h2(tls, conn, shared).await;
                } else {
                    serve_connection(tls, conn, shared).await;
                }
            }
        },
    )
    .await
}

/// WebSocket streams one HTTP/2 connection may hold at once.
const H2_MAX_STREAMS: u32 = 100;
/// Each stream's receive window: what a backed-up stream may leave unread.
const H2_STREAM_WINDOW: u32 = 128 * 1024;

/// Serves HTTP/2 on a TLS stream, with extended CONNECT for WebSockets.
async fn serve_h2<I>(stream: I, conn: Conn, shared: Shared)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stopping = shared.stopping.clone();
    let peer = conn.peer.client;
    let service = service_fn(move |req| {
        let (shared, conn) = (shared.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handler::handle(req, conn, shared).await) }
    });
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    // Flow control: the connection window covers every stream's window, so a stream
    // whose tunnel is backed up (its client or backend not reading) fills only its
    // own window and never stalls the connection's other WebSockets.
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_STREAM_WINDOW * H2_MAX_STREAMS);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = stopping.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
    }
}

/// Serves HTTP/1.1 with upgrades on `stream`; at `stop`, finishes the request in
/// progress and closes.
async fn serve_h1<I, S>(
    stream: I,
    service: S,
    header_timeout: Duration,
    max_header_bytes: Option<usize>,
    stop: &CancellationToken,
) -> hyper::Result<()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    if let Some(max) = max_header_bytes {
        builder.max_buf_size(max);
    }
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => served,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Serves plain HTTP/1.1 (upgrades allowed) on `listener` until `stop`, answering
/// each request with `handle`: for the admin listener and the relay backend, which
/// need none of the proxy's accept-time limits. Returns once every connection it
/// served has ended.
pub async fn serve_http<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    what: &'static str,
    handle: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let tracker = TaskTracker::new();
    let connections = tracker.clone();
    let conn_stop = stop.clone();
    accept_loop(
        listener,
        None,
        connections,
        stop,
        what,
        move |stream, _, _| {
            let handle = handle.clone();
            let stop = conn_stop.clone();
            async move {
                let service = service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let served = serve_h1(stream, service, PLAIN_HEADER_TIMEOUT, None, &stop).await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "{what}: connection ended with an error");
                }
            }
        },
    )
    .await;
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_in_use_cannot_be_bound() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let second = bind(addr, 16);
        assert!(second.is_err(), "{:?}", second.map(|l| l.local_addr()));
    }

    /// A connection accepted by a listener made by `bind`, with its client end
    /// and the peer address the accept gave.
    async fn accepted() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = bind("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, peer) = listener.accept().await.expect("accept");
        (client, accepted, peer)
    }

    /// The connections a listener accepts leave quick-ACK mode at once: the
    /// request is acknowledged by the answer, not by an empty segment first.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_do_not_ack_the_request_on_their_own() {
        let (_client, accepted, _) = accepted().await;
        let quick = socket2::SockRef::from(&accepted)
            .tcp_quickack()
            .expect("TCP_QUICKACK");
        assert!(!quick, "the accepted connection is in quick-ACK mode");
    }

    /// Accepted connections send small messages at once, as `TCP_NODELAY` set on
    /// each used to make them.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let (_client, accepted, peer) = accepted().await;
        nodelay(&accepted, peer);
        assert!(accepted.nodelay().expect("TCP_NODELAY"), "Nagle is on");
    }
}
