//! The backend side of the upgrade: pick, connect (retrying the next candidate when
//! a backend refuses or times out), send the handshake and read the answer.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{Empty, Full};
use hyper::Response;
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
    Tls(Box<Polled<tokio_rustls::client::TlsStream<crate::tls::ReadAhead>>>),
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

    fn fin_with_last_write(&self) -> bool {
        match self {
            BackendStream::Tcp(s) => s.fin_with_last_write(),
            BackendStream::Tls(s) => s.fin_with_last_write(),
        }
    }

    fn try_write_before_fin(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            BackendStream::Tcp(s) => s.try_write_before_fin(data),
            BackendStream::Tls(s) => s.try_write_before_fin(data),
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
    #[error("backend {addr}: {why}")]
    Unreadable { addr: BackendAddr, why: String },
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
            | UpstreamError::BadAnswer { addr, .. }
            | UpstreamError::Tls { addr, .. } => Some(addr),
        }
    }

    /// Whether the backend failed before a complete response head reached wsgate,
    /// so that another backend may be asked instead.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            UpstreamError::NoBackend | UpstreamError::OutOfDescriptors
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
            UpstreamError::Unreadable { .. } | UpstreamError::BadAnswer { .. } => {
                "backend_bad_answer"
            }
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
    addresses: Option<(SocketAddr, SocketAddr)>,
) -> Result<Answer, UpstreamError> {
    let settings = &pool.settings;
    let attempts = settings.retries + 1;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = UpstreamError::NoBackend;
    // Encoded once: every attempt sends the same bytes and checks the answer
    // against the same offer.
    let offer = crate::handshake::Offer::of(&request);
    let wire = encode_request(&request);
    drop(request);
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
        match attempt_one(pool, (&wire, &offer), index, guard, addresses).await {
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
    request: (&[u8], &crate::handshake::Offer),
    index: usize,
    guard: ConnGuard,
    addresses: Option<(SocketAddr, SocketAddr)>,
) -> Result<Answer, UpstreamError> {
    let settings = &pool.settings;
    let (wire, offer) = request;
    let tls = pool.tls.as_ref().zip(settings.tls.as_ref());
    // First, before TLS: who the client is, as the backend asked (UNKNOWN/LOCAL in
    // the rare connection accepted before a reload turned this on, whose local
    // address was not read).
    let header = settings
        .proxy_protocol
        .map(|version| crate::clients::proxy_header(version, addresses));
    // What goes first on the connection, sent with the connect when it can be.
    let first: &[u8] = match (&header, tls) {
        (Some(header), _) => header,
        (None, Some(_)) => &[],
        (None, None) => wire,
    };
    let addr = || guard.backend().addr.clone();
    let connecting = connect_sending(&guard.backend().addr, first);
    let (stream, sent) = match crate::timing::within(settings.connect_timeout, connecting).await {
        Some(Ok(connected)) => connected,
        Some(Err(source)) if crate::descriptors::exhausted(&source) => {
            crate::descriptors::note("connect", &source);
            return Err(UpstreamError::OutOfDescriptors);
        }
        Some(Err(source)) => {
            return Err(UpstreamError::Connect {
                addr: addr(),
                source,
            });
        }
        None => return Err(UpstreamError::ConnectTimeout { addr: addr() }),
    };
    let addr = addr();
    let shaken = async {
        let mut stream = stream;
        let wire = match &header {
            Some(header) => {
                tokio::io::AsyncWriteExt::write_all(&mut stream, &header[sent..])
                    .await
                    .map_err(|source| UpstreamError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
                wire
            }
            None => &wire[sent..],
        };
        match tls {
            // Boxed: a TLS handshake's state would make every upgrade's
            // future, the plain ones included, kilobytes larger.
            Some((client, tls)) => {
                Box::pin(async {
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
                    let stream = crate::tls::ReadAhead::new(stream);
                    let stream = connector.connect(name, stream).await.map_err(|source| {
                        UpstreamError::Tls {
                            addr: addr.clone(),
                            source,
                        }
                    })?;
                    handshake(stream, (wire, offer), index, guard).await
                })
                .await
            }
            None => handshake(stream, (wire, offer), index, guard).await,
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

impl IntoBackendStream for tokio_rustls::client::TlsStream<crate::tls::ReadAhead> {
    fn into_backend(self) -> BackendStream {
        BackendStream::Tls(Box::new(Polled::new(self)))
    }
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

/// Opens a TCP connection to a backend and sends what it can of `first` at once,
/// written on the socket before the event loop has reported it connected: a
/// connection that completes at once (a backend on this host or near it) costs
/// no wait for writability and no look at the socket's connect error (a failed
/// connect fails that write with the same error). Otherwise it waits for the
/// connect as [`TcpStream::connect`] does, and sends nothing. Returns the stream
/// and how many bytes of `first` went.
async fn connect_sending(addr: &BackendAddr, first: &[u8]) -> io::Result<(TcpStream, usize)> {
    let BackendAddr::Ip(addr) = addr else {
        return Ok((connect(addr).await?, 0));
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(*addr),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&(*addr).into()) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
        _ => {}
    }
    let socket = std::net::TcpStream::from(socket);
    let sent = match first {
        [] => 0,
        first => match std::io::Write::write(&mut &socket, first) {
            Ok(n) => n,
            // Still connecting.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        },
    };
    let stream = TcpStream::from_std(socket)?;
    if sent == 0 {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok((stream, sent))
}

/// Sends the upgrade request over `stream` and reads the answer, directly: one
/// write of the request, the response head parsed with httparse as it arrives,
/// and the bytes behind a 101 kept for the tunnel. A declining answer is read
/// whole (its body bounded) and passed back.
async fn handshake<S>(
    mut stream: S,
    (wire, offer): (&[u8], &crate::handshake::Offer),
    index: usize,
    guard: ConnGuard,
) -> Result<Answer, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static + IntoBackendStream,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The address is copied only when there is an error to report.
    let backend = guard.backend().clone();
    let addr = || backend.addr.clone();
    let unreadable = |why: String| UpstreamError::Unreadable { addr: addr(), why };
    stream
        .write_all(wire)
        .await
        .map_err(|e| unreadable(format!("sending the upgrade: {e}")))?;
    let mut buf = bytes::BytesMut::with_capacity(1024);
    let (head, rest) = loop {
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| unreadable(format!("reading the answer: {e}")))?;
        if n == 0 {
            return Err(unreadable(
                "the connection closed before a whole answer".into(),
            ));
        }
        match take_head(&mut buf) {
            Ok(Some(taken)) => break taken,
            Ok(None) if buf.len() < MAX_HEAD => {}
            Ok(None) => return Err(unreadable("an answer head over 64 KiB".into())),
            Err(why) => return Err(unreadable(why)),
        }
    };
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        // A 101 the client would have to refuse never reaches it: this backend
        // failed, and the next may be asked.
        offer
            .check(&head)
            .map_err(|why| UpstreamError::BadAnswer { addr: addr(), why })?;
        return Ok(Answer::Upgraded(Upgraded {
            index,
            stream: stream.into_backend(),
            early: rest,
            head,
            guard,
        }));
    }
    // A body too long or cut short still answers the client with the backend's
    // status; its text is dropped.
    let body = read_body(&mut stream, &head, bytes::BytesMut::from(rest))
        .await
        .unwrap_or_default();
    drop(guard);
    Ok(Answer::Declined {
        response: handshake::passthrough(head, body),
        backend: addr(),
    })
}

/// Largest answer head read from a backend.
const MAX_HEAD: usize = 64 * 1024;

/// The request line and headers, as one buffer.
fn encode_request(request: &Request<Empty<Bytes>>) -> Vec<u8> {
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let headers = request.headers();
    let size = 32
        + target.len()
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Headers a backend's answer may have.
const MAX_HEADERS: usize = 64;

/// Takes the whole response head at the start of `buf` (all of `buf`, frozen),
/// parsed once: its parts and the bytes behind it; `None` while partial. Where
/// each header lies is kept on this function's stack, and the values are slices
/// of the frozen bytes, not copies.
fn take_head(buf: &mut bytes::BytesMut) -> Result<Option<(http::response::Parts, Bytes)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("an unreadable answer: {e}")),
    };
    if parsed.version != Some(1) {
        return Err("an answer that is not HTTP/1.1".into());
    }
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("an answer without a valid status")?;
    let mut fields = [((0, 0), (0, 0)); MAX_HEADERS];
    let count = handshake::header_spans(buf, parsed.headers, &mut fields);
    let read = std::mem::take(buf).freeze();
    let range = handshake::range;
    let mut response = Response::new(());
    *response.status_mut() = status;
    let map = response.headers_mut();
    map.reserve(count);
    for &(name, value) in &fields[..count] {
        let name = &read[range(name)];
        let name = http::HeaderName::from_bytes(name)
            .map_err(|_| format!("a bad header name {:?}", String::from_utf8_lossy(name)))?;
        let value = http::HeaderValue::from_maybe_shared(read.slice(range(value)))
            .map_err(|_| format!("a bad value for {name}"))?;
        map.append(name, value);
    }
    Ok(Some((response.into_parts().0, read.slice(len..))))
}

/// A whole response head in `buf`: its parts and length; `None` while partial.
#[cfg(test)]
fn parse_head(buf: &[u8]) -> Result<Option<(http::response::Parts, usize)>, String> {
    let Some((head, rest)) = take_head(&mut bytes::BytesMut::from(buf))? else {
        return Ok(None);
    };
    Ok(Some((head, buf.len() - rest.len())))
}

/// A declining answer's body, at most [`MAX_ERROR_BODY`]: by Content-Length,
/// chunked, or until the backend closes. `None` when it could not be read.
async fn read_body<S>(
    stream: &mut S,
    head: &http::response::Parts,
    mut buf: bytes::BytesMut,
) -> Option<Bytes>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let headers = &head.headers;
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("chunked"))
        });
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<usize>().ok());
    if handshake::bodiless(head.status) || (!chunked && length == Some(0)) {
        return Some(Bytes::new());
    }
    if chunked {
        let mut body = Vec::new();
        loop {
            // One chunk: its size line, its data, its CRLF.
            let line_end = loop {
                if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                if buf.len() > 1024 || stream.read_buf(&mut buf).await.ok()? == 0 {
                    return None;
                }
            };
            let size_text = std::str::from_utf8(&buf[..line_end]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                return Some(Bytes::from(body));
            }
            if body.len() + size > MAX_ERROR_BODY {
                return None;
            }
            let need = line_end + 2 + size + 2;
            while buf.len() < need {
                if stream.read_buf(&mut buf).await.ok()? == 0 {
                    return None;
                }
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            let _ = buf.split_to(need);
        }
    }
    if length.is_some_and(|n| n > MAX_ERROR_BODY) {
        return None;
    }
    let want = length.unwrap_or(MAX_ERROR_BODY + 1);
    while buf.len() < want {
        match stream.read_buf(&mut buf).await {
            Ok(0) if length.is_none() => break,
            Ok(0) | Err(_) => return None,
            Ok(_) if buf.len() > MAX_ERROR_BODY => return None,
            Ok(_) => {}
        }
    }
    buf.truncate(want);
    Some(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_once_whole_and_its_end_found() {
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi";
        for cut in 1..answer.len() - 4 {
            assert!(
                parse_head(&answer[..cut]).expect("valid so far").is_none(),
                "complete at {cut}?"
            );
        }
        let (head, len) = parse_head(answer).expect("valid").expect("complete");
        assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(head.headers["upgrade"], "websocket");
        assert_eq!(&answer[len..], b"\x81\x02hi");
        assert!(parse_head(b"HTTP/1.0 101 OK\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn a_connect_sends_its_first_bytes_at_once_or_waits_and_sends_nothing() {
        use tokio::io::AsyncReadExt;
        use tokio::time::Duration;
        // Completes at once: the bytes went with it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = BackendAddr::Ip(listener.local_addr().expect("addr"));
        let (_stream, sent) = connect_sending(&addr, b"GET / HTTP/1.1\r\n")
            .await
            .expect("connected");
        assert_eq!(sent, 16);
        let (mut accepted, _) = listener.accept().await.expect("accept");
        let mut got = [0u8; 16];
        accepted.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        // Refused: the connect's own error.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let refused = connect_sending(&BackendAddr::Ip(closed), b"x").await;
        assert_eq!(
            refused.map(|_| ()).map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionRefused)
        );
        // Not completed at once (a full accept queue drops the SYN): waited for
        // until it is, with nothing sent.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        socket.bind(&any.into()).expect("bind");
        socket.listen(0).expect("listen");
        socket.set_nonblocking(true).expect("nonblocking");
        let full = tokio::net::TcpListener::from_std(socket.into()).expect("listener");
        let at = full.local_addr().expect("addr");
        let _queued = std::net::TcpStream::connect(at).expect("queued");
        let at = BackendAddr::Ip(at);
        let connecting = connect_sending(&at, b"GET");
        tokio::pin!(connecting);
        let early = tokio::time::timeout(Duration::from_millis(300), &mut connecting).await;
        assert!(early.is_err(), "connected through a full queue?");
        let _first = full.accept().await.expect("accept");
        let (_stream, sent) = tokio::time::timeout(Duration::from_secs(20), connecting)
            .await
            .expect("connected once the queue had room")
            .expect("connected");
        assert_eq!(sent, 0);
    }

    async fn body_of(answer: &'static [u8]) -> Option<Bytes> {
        let (head, len) = parse_head(answer).expect("valid").expect("complete");
        let (mut near, far) = tokio::io::duplex(64);
        drop(far);
        let rest = bytes::BytesMut::from(&answer[len..]);
        read_body(&mut near, &head, rest).await
    }

    #[tokio::test]
    async fn declining_bodies_by_length_chunks_or_close() {
        let sized = body_of(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnopeEXTRA").await;
        assert_eq!(sized.as_deref(), Some(&b"nope"[..]));
        let chunked = body_of(
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nno \r\n4;x=1\r\nway!\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(chunked.as_deref(), Some(&b"no way!"[..]));
        let to_close = body_of(b"HTTP/1.1 500 Oops\r\n\r\nbroken").await;
        assert_eq!(to_close.as_deref(), Some(&b"broken"[..]));
        let cut_short = body_of(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nnope").await;
        assert_eq!(cut_short, None);
        let empty = body_of(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(empty.as_deref(), Some(&b""[..]));
    }
}
