//! The backend side of the upgrade: pick, connect (retrying the next candidate when
//! a backend refuses or times out), send the handshake and read the answer.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::balancer::{ConnGuard, Pool};
use crate::config::BackendAddr;
use crate::handshake;
use crate::metrics as m;
use crate::relay::{Polled, RelayIo};

/// Largest non-101 response body passed back to a client.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What the backend said.
pub enum Answer {
    /// It switched protocols: the socket is ready for the tunnel.
    Upgraded(Upgraded),
    /// It answered something else; the client gets this response as is.
    Declined {
        response: Response<Full<Bytes>>,
        backend: BackendAddr,
    },
}

pub struct Upgraded {
    /// The backend's place in its pool.
    pub index: usize,
    pub stream: BackendStream,
    /// Bytes the backend sent right behind its 101.
    pub early: Bytes,
    pub head: http::response::Parts,
    pub guard: ConnGuard,
}

/// A backend connection: plain TCP (the relay's fast path), or TLS (`wss`).
pub enum BackendStream {
    Tcp(TcpStream),
    Tls(Box<Polled<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl RelayIo for BackendStream {
    fn poll_read_into(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self {
            BackendStream::Tcp(s) => s.poll_read_into(cx, buf),
            BackendStream::Tls(s) => s.poll_read_into(cx, buf),
        }
    }

    fn poll_write(
        &mut self,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self {
            BackendStream::Tcp(s) => RelayIo::poll_write(s, cx, data),
            BackendStream::Tls(s) => s.poll_write(cx, data),
        }
    }

    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            BackendStream::Tcp(s) => RelayIo::try_write(s, data),
            BackendStream::Tls(s) => s.try_write(data),
        }
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            BackendStream::Tcp(s) => s.shutdown_write(),
            BackendStream::Tls(s) => s.shutdown_write(),
        }
    }
}

/// Why no backend answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("pool has no backend to send to")]
    NoBackend,
    /// wsgate's own condition: no backend was at fault.
    #[error("wsgate is out of file descriptors")]
    OutOfDescriptors,
    #[error("connect to {addr} failed")]
    Connect {
        addr: BackendAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: BackendAddr },
    #[error("backend {addr} did not answer the handshake in time")]
    HandshakeTimeout { addr: BackendAddr },
    #[error("backend {addr} sent an unreadable answer")]
    Unreadable {
        addr: BackendAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("backend {addr} sent 101 but its connection could not be taken over")]
    Takeover { addr: BackendAddr },
    #[error("backend {addr} sent a 101 a client must refuse: {why}")]
    BadAnswer {
        addr: BackendAddr,
        why: &'static str,
    },
    #[error("TLS with backend {addr} failed")]
    Tls {
        addr: BackendAddr,
        #[source]
        source: io::Error,
    },
}

impl UpstreamError {
    /// 503 when there was nobody to ask, 502 when those asked failed.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::NoBackend | UpstreamError::OutOfDescriptors => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The backend it is about, if one was tried.
    pub fn backend(&self) -> Option<&BackendAddr> {
        match self {
            UpstreamError::NoBackend | UpstreamError::OutOfDescriptors => None,
            UpstreamError::Connect { addr, .. }
            | UpstreamError::ConnectTimeout { addr }
            | UpstreamError::HandshakeTimeout { addr }
            | UpstreamError::Unreadable { addr, .. }
            | UpstreamError::Takeover { addr }
            | UpstreamError::BadAnswer { addr, .. }
            | UpstreamError::Tls { addr, .. } => Some(addr),
        }
    }

    /// Whether the backend failed before a complete response head reached wsgate,
    /// so that another backend may be asked instead.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            UpstreamError::NoBackend
                | UpstreamError::OutOfDescriptors
                | UpstreamError::Takeover { .. }
        )
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::NoBackend => "no_backend",
            UpstreamError::OutOfDescriptors => "out_of_descriptors",
            UpstreamError::Connect { .. } => "backend_refused",
            UpstreamError::ConnectTimeout { .. } => "backend_timeout",
            UpstreamError::HandshakeTimeout { .. } => "backend_timeout",
            UpstreamError::Unreadable { .. }
            | UpstreamError::Takeover { .. }
            | UpstreamError::BadAnswer { .. } => "backend_bad_answer",
            UpstreamError::Tls { .. } => "backend_tls",
        }
    }
}

/// Sends `request` to the least loaded backend of `pool`. Any failure before a
/// backend has sent a complete response head (refused, timed out, closed, reset,
/// garbage, silence) is that backend's failure: it is counted, and the next
/// candidate is tried, at most `retries` times. Nothing has reached the client yet,
/// so those failures stay invisible to it. A complete non-101 answer goes back as
/// it was.
pub async fn open(
    pool: &Pool,
    request: Request<Empty<Bytes>>,
    rng: &mut fastrand::Rng,
    preferred: Option<usize>,
    addresses: (SocketAddr, SocketAddr),
) -> Result<Answer, UpstreamError> {
    let settings = &pool.settings;
    let attempts = settings.retries + 1;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = UpstreamError::NoBackend;
    let mut request = Some(request);
    for attempt in 1..=attempts {
        // The sticky backend first, while it can take it; then least-connections.
        let sticky = preferred.filter(|_| attempt == 1).and_then(|i| {
            pool.take(i, crate::balancer::Traffic::Tunnel)
                .map(|g| (i, g))
        });
        let Some((index, guard)) = sticky.or_else(|| pool.pick(&tried, rng)) else {
            break;
        };
        tried.push(index);
        let backend = guard.backend().clone();
        // While another attempt may follow, send a copy and keep the original.
        let this = match (attempt < attempts, request.as_ref()) {
            (true, Some(original)) => copy(original),
            _ => match request.take() {
                Some(last) => last,
                None => break,
            },
        };
        match attempt_one(pool, this, index, guard, addresses).await {
            Ok(answer) => {
                backend.record_attempt(&pool.name, true, settings);
                return Ok(answer);
            }
            // Not the backend's doing: its health and counts stay as they were.
            Err(e @ UpstreamError::OutOfDescriptors) => return Err(e),
            Err(e) => {
                backend.record_attempt(&pool.name, false, settings);
                metrics::counter!(
                    m::BACKEND_FAILURES,
                    "pool" => pool.name.clone(),
                    "backend" => backend.addr.to_string(),
                    "reason" => e.label(),
                )
                .increment(1);
                if !e.retryable() {
                    return Err(e);
                }
                tracing::warn!(backend = %backend.addr, error = %crate::Chain(&e), "backend failed before answering, trying the next");
                last_error = e;
            }
        }
    }
    Err(last_error)
}

/// One backend: connect, send the upgrade, read the answer, each within its time.
async fn attempt_one(
    pool: &Pool,
    request: Request<Empty<Bytes>>,
    index: usize,
    guard: ConnGuard,
    addresses: (SocketAddr, SocketAddr),
) -> Result<Answer, UpstreamError> {
    let settings = &pool.settings;
    let addr = || guard.backend().addr.clone();
    let stream = match timeout(settings.connect_timeout, connect(&guard.backend().addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) if crate::descriptors::exhausted(&source) => {
            crate::descriptors::note("connect", &source);
            return Err(UpstreamError::OutOfDescriptors);
        }
        Ok(Err(source)) => {
            return Err(UpstreamError::Connect {
                addr: addr(),
                source,
            });
        }
        Err(_) => return Err(UpstreamError::ConnectTimeout { addr: addr() }),
    };
    let addr = addr();
    let shaken =
        async {
            let mut stream = stream;
            if let Some(version) = settings.proxy_protocol {
                // First, before TLS: who the client is, as the backend asked.
                let header = crate::clients::proxy_header(version, Some(addresses));
                tokio::io::AsyncWriteExt::write_all(&mut stream, &header)
                    .await
                    .map_err(|source| UpstreamError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
            }
            match (&pool.tls, &settings.tls) {
                (Some(client), Some(tls)) => {
                    let host = match &addr {
                        BackendAddr::Ip(a) => a.ip().to_string(),
                        BackendAddr::Name { host, .. } => host.clone(),
                    };
                    let Some(name) = crate::tls::server_name(tls, &host) else {
                        return Err(UpstreamError::Tls {
                            addr: addr.clone(),
                            source: io::ErrorKind::InvalidInput.into(),
                        });
                    };
                    let connector = tokio_rustls::TlsConnector::from(client.clone());
                    let stream = connector.connect(name, stream).await.map_err(|source| {
                        UpstreamError::Tls {
                            addr: addr.clone(),
                            source,
                        }
                    })?;
                    handshake(stream, request, index, guard).await
                }
                _ => handshake(stream, request, index, guard).await,
            }
        };
    timeout(settings.handshake_timeout, shaken)
        .await
        .unwrap_or(Err(UpstreamError::HandshakeTimeout { addr }))
}

/// Makes the relay's stream of a backend connection.
trait IntoBackendStream {
    fn into_backend(self) -> BackendStream;
}

impl IntoBackendStream for TcpStream {
    fn into_backend(self) -> BackendStream {
        BackendStream::Tcp(self)
    }
}

impl IntoBackendStream for tokio_rustls::client::TlsStream<TcpStream> {
    fn into_backend(self) -> BackendStream {
        BackendStream::Tls(Box::new(Polled::new(self)))
    }
}

/// The same request again, for another backend.
fn copy(request: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut again = Request::new(Empty::new());
    *again.method_mut() = request.method().clone();
    *again.uri_mut() = request.uri().clone();
    *again.version_mut() = request.version();
    *again.headers_mut() = request.headers().clone();
    again
}

/// Opens a TCP connection to a backend (for upgrades and health checks alike).
pub async fn connect(addr: &BackendAddr) -> io::Result<TcpStream> {
    let stream = match addr {
        BackendAddr::Ip(addr) => TcpStream::connect(*addr).await?,
        BackendAddr::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends the upgrade request over `stream` and reads the answer. The connection
/// future is driven here, in the request's own task: it ends when the 101 hands
/// the socket over, or once a declining answer has been read whole.
async fn handshake<S>(
    stream: S,
    request: Request<Empty<Bytes>>,
    index: usize,
    guard: ConnGuard,
) -> Result<Answer, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static + IntoBackendStream,
{
    // The address is copied only when there is an error to report.
    let backend = guard.backend().clone();
    let addr = || backend.addr.clone();
    let unreadable = |source| UpstreamError::Unreadable {
        addr: addr(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(unreadable)?;
    let mut conn = conn.with_upgrades();
    let offer = crate::handshake::Offer::of(&request);
    // The connection future may finish (handing the socket over after a 101) in the
    // same poll that delivers the response, so its result is kept, not taken as an
    // error.
    let send = sender.send_request(request);
    tokio::pin!(send);
    let mut conn_ended = None;
    let response = loop {
        tokio::select! {
            response = &mut send => break response.map_err(unreadable)?,
            ended = &mut conn, if conn_ended.is_none() => conn_ended = Some(ended),
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A 101 the client would have to refuse never reaches it: this backend
        // failed, and the next may be asked.
        let (head, _) = response.into_parts();
        offer
            .check(&head)
            .map_err(|why| UpstreamError::BadAnswer { addr: addr(), why })?;
        let mut response = Response::from_parts(head, ());
        let on_upgrade = hyper::upgrade::on(&mut response);
        let ended = match conn_ended {
            Some(ended) => ended,
            None => conn.await,
        };
        ended.map_err(unreadable)?;
        let upgraded = on_upgrade.await.map_err(unreadable)?;
        let parts = upgraded
            .downcast::<TokioIo<S>>()
            .map_err(|_| UpstreamError::Takeover { addr: addr() })?;
        let (head, _) = response.into_parts();
        return Ok(Answer::Upgraded(Upgraded {
            index,
            stream: parts.io.into_inner().into_backend(),
            early: parts.read_buf,
            head,
            guard,
        }));
    }
    let (head, body) = response.into_parts();
    let collect = Limited::new(body, MAX_ERROR_BODY).collect();
    tokio::pin!(collect);
    let mut conn_done = conn_ended.is_some();
    let body = loop {
        tokio::select! {
            body = &mut collect => break body,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    };
    // A body too long or cut short still answers the client with the backend's
    // status; its text is dropped.
    let body = body.map(|b| b.to_bytes()).unwrap_or_default();
    drop(guard);
    Ok(Answer::Declined {
        response: handshake::passthrough(head, body),
        backend: addr(),
    })
}
