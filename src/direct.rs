//! Plain HTTP/1.1 WebSocket upgrades without hyper: the request head read into
//! one buffer and parsed with `httparse`, the answer written in one write, and
//! the tunnel run in the connection's own task. Anything else, and anything in
//! doubt, goes to hyper with the bytes already read put back in front of the
//! stream ([`Rewind`]), so hyper answers it exactly as if it had read them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::handler::{self, Conn, Shared};
use crate::handshake::{self, Span, range};

/// Headers an upgrade request may carry on this path; more go to hyper (which
/// takes up to 100).
const MAX_HEADERS: usize = 64;
/// The first read's room: a browser's upgrade request is 400 to 1,500 bytes.
const FIRST_READ: usize = 2048;

/// A tunnel ready to run on the client's connection, its 101 written.
pub struct Tunnel {
    stream: TcpStream,
    /// What the client sent behind its upgrade request.
    early: Bytes,
    pending: handler::Pending,
}

impl Tunnel {
    /// Relays until the tunnel ends.
    pub fn run(self) -> impl Future<Output = ()> + Send {
        self.pending.run(self.stream, self.early)
    }
}

/// Answers one plain-TCP client connection: a WebSocket upgrade here (the
/// tunnel to run once its 101 is written), anything else through hyper (`None`
/// once hyper is done with the connection).
pub async fn serve(mut stream: TcpStream, conn: Conn, shared: Shared) -> Option<Tunnel> {
    let (timeout, max_header_bytes) = {
        let server = &shared.state.load().config.server;
        (server.handshake_timeout, server.max_header_bytes)
    };
    let deadline = Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(FIRST_READ.min(max_header_bytes));
    let head = read_head(
        &mut stream,
        &mut buf,
        deadline,
        max_header_bytes,
        &shared.stopping,
    )
    .await;
    // The request's path and header values are slices of `read`.
    let (read, req, head_len) = match head {
        Err(NotOurs::Gone) => return None,
        Err(NotOurs::Other) => {
            hyper_serves(stream, buf.freeze(), conn, shared).await;
            return None;
        }
        Ok(Head {
            read,
            request: None,
            ..
        }) => {
            hyper_serves(stream, read, conn, shared).await;
            return None;
        }
        Ok(Head {
            read,
            request: Some(req),
            len,
        }) => (read, req, len),
    };
    // What the client sent behind its request, in an allocation of its own: the
    // head's buffer is not kept for the tunnel's life.
    let early = Bytes::copy_from_slice(&read[head_len..]);
    drop((read, buf));
    let peer = conn.peer.client;
    // A refusal ends the connection when either side says `Connection: close`.
    let client_closes = closes(req.headers());
    let (response, pending) = handler::upgrade_direct(req, &conn, &shared).await;
    let close = pending.is_none() && (client_closes || closes(response.headers()));
    let written = write_response(&mut stream, response, timeout).await;
    if let Err(e) = written {
        tracing::debug!(%peer, error = %e, "client left before its answer was written");
        return None;
    }
    match pending {
        Some(pending) => Some(Tunnel {
            stream,
            early,
            pending,
        }),
        None if close => {
            let _ = stream.shutdown().await;
            None
        }
        // Keep-alive after a refusal: hyper serves what follows.
        None => {
            hyper_serves(stream, early, conn, shared).await;
            None
        }
    }
}

/// Why the connection's first request is not a WebSocket upgrade this path
/// answers.
enum NotOurs {
    /// Anything else (or anything in doubt, a head too big included): hyper's.
    Other,
    /// Closed, timed out, or wsgate stopping before a byte came.
    Gone,
}

/// Reads until the request head is complete, within `deadline` and
/// `max_header_bytes`.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: Instant,
    max_header_bytes: usize,
    stopping: &CancellationToken,
) -> Result<Head, NotOurs> {
    use tokio::io::AsyncReadExt;
    // Bounded: every pass reads at least one byte of at most max_header_bytes,
    // and the deadline ends it.
    loop {
        if buf.len() >= max_header_bytes {
            return Err(NotOurs::Other);
        }
        if buf.capacity() == buf.len() {
            buf.reserve((buf.len() * 2).min(max_header_bytes) - buf.len());
        }
        // The read first: a request already here is taken without joining the
        // stop signal's waiters (and leaving them again).
        let read = tokio::select! {
            biased;
            read = crate::timing::by(deadline, stream.read_buf(buf)) => read,
            // Stopping: an idle connection closes; one mid-request finishes it.
            _ = stopping.cancelled(), if buf.is_empty() => return Err(NotOurs::Gone),
        };
        match read {
            Some(Ok(0)) | Some(Err(_)) | None => return Err(NotOurs::Gone),
            Some(Ok(_)) => {}
        }
        if let Some(head) = take(buf)? {
            return Ok(head);
        }
    }
}

/// A whole request head, read.
struct Head {
    /// Everything read so far, the head at its start.
    read: Bytes,
    /// The request, when it is a WebSocket upgrade this path takes (else hyper's).
    request: Option<Request<()>>,
    /// The head's length.
    len: usize,
}

/// Takes the whole request head at the start of `buf` (all of `buf`, frozen),
/// parsed once: `None` while partial (an error: one hyper must answer). Where
/// the path and each header lie is kept on this function's stack, and the
/// request is built from slices of the frozen bytes, not copies.
fn take(buf: &mut BytesMut) -> Result<Option<Head>, NotOurs> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(NotOurs::Other),
    };
    let get_11 = parsed.method == Some("GET") && parsed.version == Some(1);
    let path = parsed
        .path
        .map_or((0, 0), |p| handshake::span_of(buf, p.as_bytes()));
    let mut fields = [((0, 0), (0, 0)); MAX_HEADERS];
    let count = handshake::header_spans(buf, parsed.headers, &mut fields);
    let read = std::mem::take(buf).freeze();
    let request = get_11
        .then(|| request(&read, path, &fields[..count]))
        .flatten();
    Ok(Some(Head { read, request, len }))
}

/// The request whose path and headers lie at these places in `read`, if it is a
/// WebSocket upgrade this path takes: asking for `websocket`, without a body,
/// with every part valid as hyper would read it. Its path and header values are
/// slices of `read`, as hyper's are of its buffer.
fn request(read: &Bytes, path: Span, fields: &[(Span, Span)]) -> Option<Request<()>> {
    let uri = http::Uri::from_maybe_shared(read.slice(range(path))).ok()?;
    // Room for the X-Forwarded-* headers the backend's request adds.
    let mut map = HeaderMap::with_capacity(fields.len() + 4);
    for &(name, value) in fields {
        let name = HeaderName::from_bytes(&read[range(name)]).ok()?;
        let value = HeaderValue::from_maybe_shared(read.slice(range(value))).ok()?;
        // A body (or a claim of one) is hyper's to read and refuse.
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            return None;
        }
        map.append(name, value);
    }
    let mut req = Request::new(());
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    handshake::is_upgrade(&req).then_some(req)
}

/// Whether `buf` holds a whole request head (an error: one hyper must answer).
#[cfg(test)]
fn whole(buf: &[u8]) -> Result<bool, NotOurs> {
    Ok(take(&mut BytesMut::from(buf))?.is_some())
}

/// The whole request head at the start of `buf`, if it is a WebSocket upgrade
/// this path takes, and the head's length.
#[cfg(test)]
fn parse(buf: &Bytes) -> Result<(Request<()>, usize), NotOurs> {
    match take(&mut BytesMut::from(&buf[..]))? {
        Some(Head {
            request: Some(req),
            len,
            ..
        }) => Ok((req, len)),
        _ => Err(NotOurs::Other),
    }
}

/// Whether a message ends its connection (`Connection: close`).
fn closes(headers: &HeaderMap) -> bool {
    handshake::has_token(headers, http::header::CONNECTION, "close")
}

/// Writes `response` in one write, within `timeout` (a client that never reads
/// cannot hold the connection's task).
async fn write_response(
    stream: &mut TcpStream,
    response: Response<Full<Bytes>>,
    timeout: Duration,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let bytes = encode(&parts, &body);
    match crate::timing::within(timeout, stream.write_all(&bytes)).await {
        Some(written) => written,
        None => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// The response as HTTP/1.1 puts it on the wire: a 101 as it is, anything else
/// with its `Content-Length` and a `Date`, as hyper writes them.
fn encode(parts: &http::response::Parts, body: &[u8]) -> Vec<u8> {
    let status = parts.status;
    let mut out = Vec::with_capacity(256 + body.len());
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    // No length for the statuses that never have a body (a backend's 204 or 304
    // passed on), as hyper writes them.
    let bodiless = handshake::bodiless(status);
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !bodiless && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
            out.put_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        if !parts.headers.contains_key(http::header::DATE) {
            out.put_slice(b"date: ");
            out.put_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
            out.put_slice(b"\r\n");
        }
    }
    out.put_slice(b"\r\n");
    if !bodiless {
        out.put_slice(body);
    }
    out
}

/// hyper serves the connection from here, reading `prefix` first. Boxed: the
/// connection's task does not carry hyper's connection in its size while it
/// relays.
async fn hyper_serves(stream: TcpStream, prefix: Bytes, conn: Conn, shared: Shared) {
    Box::pin(crate::server::serve_connection(
        Rewind::new(prefix, stream),
        conn,
        shared,
    ))
    .await
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub fn new(prefix: Bytes, inner: I) -> Rewind<I> {
        Rewind { prefix, inner }
    }

    /// The stream and what of the prefix is still unread.
    pub fn into_parts(self) -> (I, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let taken = self.prefix.split_to(n);
            buf.put_slice(&taken);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(extra: &str) -> String {
        format!(
            "GET /ws?x=1 HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn a_whole_upgrade_is_taken_with_its_length() {
        let text = upgrade("");
        let mut bytes = text.clone().into_bytes();
        bytes.extend_from_slice(b"\x81\x80early");
        assert_eq!(whole(&bytes).ok(), Some(true));
        match parse(&Bytes::from(bytes)) {
            Ok((req, len)) => {
                assert_eq!(len, text.len());
                assert_eq!(req.uri().path(), "/ws");
                assert_eq!(req.uri().query(), Some("x=1"));
                assert_eq!(req.headers()["host"], "a.example");
                assert_eq!(req.version(), Version::HTTP_11);
            }
            _ => panic!("not taken"),
        }
    }

    #[test]
    fn a_head_cut_short_waits_for_more() {
        let text = upgrade("");
        for cut in [1, 10, text.len() - 2] {
            assert_eq!(whole(&text.as_bytes()[..cut]).ok(), Some(false), "{cut}");
        }
    }

    #[test]
    fn anything_else_goes_to_hyper() {
        let others = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
            upgrade("").replacen("GET", "POST", 1),
            upgrade("").replacen("HTTP/1.1", "HTTP/1.0", 1),
            upgrade("Content-Length: 0\r\n"),
            upgrade("Transfer-Encoding: chunked\r\n"),
            upgrade("").replacen("websocket", "h2c", 1),
            upgrade("Bad Header: x\r\n"),
            upgrade("X: \x01\r\n"),
            upgrade(&(0..70).map(|i| format!("X-{i}: y\r\n")).collect::<String>()),
        ];
        for other in others {
            assert!(
                matches!(parse(&Bytes::from(other.clone())), Err(NotOurs::Other)),
                "{other:?}"
            );
        }
    }

    #[test]
    fn refusals_carry_length_and_date_a_204_no_length_and_a_101_neither() {
        let refusal = handshake::plain(StatusCode::NOT_FOUND, "no route");
        let (parts, _) = refusal.into_parts();
        let text = String::from_utf8(encode(&parts, b"no route\n")).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("content-length: 9\r\n"), "{text}");
        assert!(text.contains("\r\ndate: "), "{text}");
        assert!(text.ends_with("\r\n\r\nno route\n"), "{text}");
        let (parts, _) = handshake::plain(StatusCode::NO_CONTENT, "").into_parts();
        let text = String::from_utf8(encode(&parts, b"\n")).expect("utf-8");
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        let mut switching = Response::new(());
        *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        switching
            .headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        let (parts, _) = switching.into_parts();
        let text = String::from_utf8(encode(&parts, b"")).expect("utf-8");
        assert_eq!(
            text,
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Any bytes, whole or cut anywhere: never a panic, and a head taken
        /// here is taken with the same length once more bytes follow it.
        #[test]
        fn any_bytes_cut_anywhere_are_taken_or_left_alike(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            cut in 0usize..2_000,
            behind in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let _ = whole(&junk);
            let _ = parse(&Bytes::from(junk));
            let text = upgrade("X-Extra: 1\r\n");
            let cut = cut.min(text.len());
            let head = &text.as_bytes()[..cut];
            proptest::prop_assert_eq!(whole(head).ok(), Some(cut == text.len()));
            let mut more = text.clone().into_bytes();
            more.extend_from_slice(&behind);
            let taken = parse(&Bytes::from(more)).ok().map(|(_, len)| len);
            proptest::prop_assert_eq!(taken, Some(text.len()));
        }
    }

    #[tokio::test]
    async fn rewind_reads_its_prefix_first() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.expect("write");
        drop(a);
        let mut rewind = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut all = String::new();
        rewind.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "hello world");
    }
}
