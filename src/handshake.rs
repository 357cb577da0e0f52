//! The client's side of the upgrade: RFC 6455 §4.2.1 validation, the request
//! forwarded to the backend and the response returned to the client.
//!
//! Every rejection here is decided before any backend is contacted.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Empty, Full};

/// Why a request is answered by wsgate itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No route matches host + path: 404.
    NoRoute,
    /// A plain HTTP request on a WebSocket route: 426 with `Upgrade: websocket`.
    NotWebSocket,
    /// A WebSocket version other than 13: 426 with `Sec-WebSocket-Version: 13`
    /// (RFC 6455 §4.2.2).
    UnsupportedVersion,
    /// A broken upgrade request: 400 with the reason.
    Malformed(&'static str),
}

impl Rejection {
    pub fn status(self) -> StatusCode {
        match self {
            Rejection::NoRoute => StatusCode::NOT_FOUND,
            Rejection::NotWebSocket | Rejection::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            Rejection::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn response(self) -> Response<Full<Bytes>> {
        let reason = match self {
            Rejection::NoRoute => "no route for this host and path",
            Rejection::NotWebSocket => "this path only accepts WebSocket upgrades",
            Rejection::UnsupportedVersion => "only WebSocket version 13 is supported",
            Rejection::Malformed(reason) => reason,
        };
        let mut response = plain(self.status(), reason);
        let headers = response.headers_mut();
        match self {
            Rejection::NotWebSocket => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            }
            Rejection::UnsupportedVersion => {
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            _ => {}
        }
        response
    }
}

/// A short text response from wsgate itself.
pub fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A status whose response never has a body (1xx, 204, 304): written without
/// `Content-Length`, read without a body.
pub fn bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// True when a comma-separated header holds `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether a request asks for a WebSocket at all: an HTTP/1.1 upgrade, or an
/// HTTP/2 extended CONNECT with `:protocol = websocket` (RFC 8441).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    has_token(req.headers(), header::UPGRADE, "websocket") || is_extended_connect(req)
}

/// An RFC 8441 extended CONNECT for a WebSocket.
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Checks an HTTP/1.1 upgrade request against RFC 6455 §4.2.1.
pub fn validate<B>(req: &Request<B>) -> Result<(), Rejection> {
    if req.version() == Version::HTTP_2 {
        return validate_h2(req);
    }
    let headers = req.headers();
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(Rejection::NotWebSocket);
    }
    if req.method() != Method::GET {
        return Err(Rejection::Malformed("a WebSocket upgrade must be a GET"));
    }
    if req.version() != Version::HTTP_11 {
        return Err(Rejection::Malformed("a WebSocket upgrade needs HTTP/1.1"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(Rejection::Malformed("Connection must contain `upgrade`"));
    }
    hygiene(req)?;
    let key_ok = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .is_some_and(|k| is_websocket_key(k.as_bytes()));
    if !key_ok {
        return Err(Rejection::Malformed(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        None => Err(Rejection::Malformed("Sec-WebSocket-Version is missing")),
        Some(v) if v.as_bytes().trim_ascii() == b"13" => Ok(()),
        Some(_) => Err(Rejection::UnsupportedVersion),
    }
}

/// What a proxy must not guess about: headers that could be read two ways, a body
/// on a request whose connection is about to become a tunnel, and a target whose
/// authority says one host while `Host` says another (routing and the backend
/// would see different hosts).
fn hygiene<B>(req: &Request<B>) -> Result<(), Rejection> {
    let headers = req.headers();
    let once = [
        (header::HOST, "send one Host header"),
        (
            header::SEC_WEBSOCKET_KEY,
            "send one Sec-WebSocket-Key header",
        ),
        (
            header::SEC_WEBSOCKET_VERSION,
            "send one Sec-WebSocket-Version header",
        ),
    ];
    for (name, reason) in once {
        if headers.get_all(&name).iter().nth(1).is_some() {
            return Err(Rejection::Malformed(reason));
        }
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .map(|v| v.as_bytes().trim_ascii());
    if headers.contains_key(header::TRANSFER_ENCODING) || length.is_some_and(|l| l != b"0") {
        return Err(Rejection::Malformed("a WebSocket upgrade has no body"));
    }
    if let Some(authority) = req.uri().authority() {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let agrees = host.is_some_and(|host| {
            let (a, h) = (authority.as_str(), host.trim());
            strip_port(a).eq_ignore_ascii_case(strip_port(h))
                && (port_of(a).is_none() || port_of(h).is_none() || port_of(a) == port_of(h))
        });
        if !agrees {
            return Err(Rejection::Malformed(
                "the request target's authority and Host disagree",
            ));
        }
    }
    Ok(())
}

/// Normalises the request's path once, before routing, so that routing and the
/// backend see the same path: `%2e`/`%2E` decoded to `.`, empty segments (`//`)
/// and `.` dropped, `..` removing the segment before it (never above the root).
/// The query is kept as it was. A path already normal is left untouched.
pub fn normalize_path<B>(req: &mut Request<B>) {
    let path = req.uri().path();
    let Some(normal) = normal_path(path) else {
        return;
    };
    let mut parts = req.uri().clone().into_parts();
    let target = match req.uri().query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    if let Ok(pq) = http::uri::PathAndQuery::try_from(target) {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// The normal form of `path`, or None when it is already normal.
fn normal_path(path: &str) -> Option<String> {
    let suspicious = path.contains("//")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
        || path.contains('%') && path.to_ascii_lowercase().contains("%2e");
    if !suspicious {
        return None;
    }
    let decoded = path.replace("%2e", ".").replace("%2E", ".");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') && !segments.is_empty();
    let mut normal = format!("/{}", segments.join("/"));
    if trailing {
        normal.push('/');
    }
    Some(normal)
}

/// The `:port` part of an authority, if it has one.
fn port_of(authority: &str) -> Option<&str> {
    authority
        .strip_prefix(strip_port(authority))
        .filter(|p| !p.is_empty())
}

/// Checks an HTTP/2 WebSocket request against RFC 8441 §4-5: an extended CONNECT
/// with `:protocol = websocket`, a path and authority (hyper checks the scheme),
/// and version 13.
fn validate_h2<B>(req: &Request<B>) -> Result<(), Rejection> {
    if !is_extended_connect(req) {
        return Err(Rejection::NotWebSocket);
    }
    if req.uri().authority().is_none() || req.uri().path().is_empty() {
        return Err(Rejection::Malformed(
            "an extended CONNECT needs :authority and :path",
        ));
    }
    match req.headers().get(header::SEC_WEBSOCKET_VERSION) {
        None => Err(Rejection::Malformed("Sec-WebSocket-Version is missing")),
        Some(v) if v.as_bytes().trim_ascii() == b"13" => Ok(()),
        Some(_) => Err(Rejection::UnsupportedVersion),
    }
}

/// A base64 encoding of 16 bytes: 22 characters of the alphabet, then `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let key = key.trim_ascii();
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        // The last character before the padding carries 2 bits: its low 4 must be 0.
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
}

/// Where a part of a message head lies in the bytes it was read into: from, to.
/// A head is parsed once into spans, and its values taken afterwards as slices
/// of the frozen bytes (`direct::take`, `upstream::take_head`).
pub type Span = (u32, u32);

/// Each header's name and value as spans of `buf` (which `headers` were parsed
/// from), written into `out`; how many. `buf` holds at most a head's limit (1
/// MiB) and one read more, so a `u32` holds every offset.
pub fn header_spans(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
    out: &mut [(Span, Span)],
) -> usize {
    for (slot, h) in out.iter_mut().zip(headers) {
        *slot = (span_of(buf, h.name.as_bytes()), span_of(buf, h.value));
    }
    headers.len().min(out.len())
}

/// Where `part`, a slice of `buf`, lies in it.
pub fn span_of(buf: &[u8], part: &[u8]) -> Span {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start as u32, (start + part.len()) as u32)
}

/// A span as an index range.
pub fn range((from, to): Span) -> std::ops::Range<usize> {
    from as usize..to as usize
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and never pass through.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Keeps only end-to-end headers, in place: drops hop-by-hop ones, those the
/// `Connection` header names, and `Upgrade` (set again by the caller where it
/// belongs). The usual `Connection: Upgrade` names nothing else and costs no
/// allocation.
pub fn keep_end_to_end(headers: &mut HeaderMap) {
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            // Host and the WebSocket headers are never one hop's: a `Connection`
            // naming them does not remove them.
            let standard = [
                "upgrade",
                "keep-alive",
                "close",
                "",
                "host",
                "sec-websocket-key",
                "sec-websocket-version",
                "sec-websocket-protocol",
                "sec-websocket-extensions",
                "sec-websocket-accept",
            ]
            .iter()
            .any(|t| token.eq_ignore_ascii_case(t));
            if !standard && let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in HOP_BY_HOP
        .iter()
        .chain(named.iter())
        .chain([&header::UPGRADE])
    {
        headers.remove(name);
    }
}

fn set_upgrade(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// The host a request is for, lower-cased and without its port.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let authority = req
        .uri()
        .host()
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())?;
    Some(strip_port(authority))
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// Carries the presence identity wsgate read from the request (route `identity`)
/// to the backend. A client's own value is always removed: backends can trust it.
pub const USER_HEADER: &str = "x-wsgate-user";

/// The upgrade request sent to the backend: same path, query and end-to-end
/// headers (subprotocols, extensions, cookies...), plus X-Forwarded-* and, when the
/// route has an identity, X-Wsgate-User.
pub fn backend_request<B>(
    req: &mut Request<B>,
    peer: &crate::clients::Peer,
    proto: &'static str,
    user: Option<&str>,
) -> Request<Empty<Bytes>> {
    // The client's request is done with: its headers move, they are not copied.
    let mut headers = std::mem::take(req.headers_mut());
    forwarded(&mut headers, peer, proto, user);
    set_upgrade(&mut headers);
    if req.version() == Version::HTTP_2 {
        // An HTTP/2 WebSocket becomes an HTTP/1.1 upgrade: wsgate makes the key
        // (and checks the backend's Accept against it), the authority is Host.
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        if let Ok(v) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, v);
        }
        if let Some(authority) = req.uri().authority()
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(HeaderName::from_static("x-forwarded-host"), v.clone());
            headers.insert(header::HOST, v);
        }
    }
    let mut target = http::uri::Parts::default();
    target.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let mut out = Request::new(Empty::new());
    *out.uri_mut() = http::Uri::from_parts(target).unwrap_or_default();
    *out.headers_mut() = headers;
    out
}

/// The headers a request takes to a backend, in place: end-to-end ones only
/// (hop-by-hop and `Upgrade` removed), the identity wsgate read as
/// X-Wsgate-User (never the client's own), X-Forwarded-For (appended to for a
/// trusted peer, replaced for anyone else), -Proto and -Host.
pub fn forwarded(
    headers: &mut HeaderMap,
    peer: &crate::clients::Peer,
    proto: &'static str,
    user: Option<&str>,
) {
    keep_end_to_end(headers);
    headers.remove(USER_HEADER);
    if let Some(v) = user.and_then(|u| HeaderValue::from_str(u).ok()) {
        headers.insert(HeaderName::from_static(USER_HEADER), v);
    }
    let xff = header::HeaderName::from_static("x-forwarded-for");
    // Several X-Forwarded-For lines are one list (RFC 9110 §5.3).
    let earlier: Vec<&str> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let earlier = (!earlier.is_empty()).then(|| earlier.join(", "));
    let forwarded_for = crate::clients::forwarded_for(earlier.as_deref(), peer);
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
}

/// The 101 returned to the client: the backend's headers (Sec-WebSocket-Accept,
/// -Protocol, -Extensions, cookies...) less hop-by-hop ones.
pub fn switching_protocols(backend: http::response::Parts) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = backend.headers;
    keep_end_to_end(&mut headers);
    set_upgrade(&mut headers);
    *response.headers_mut() = headers;
    response
}

/// The answer to an HTTP/2 WebSocket once the backend said 101 (RFC 8441 §5):
/// 200, the backend's end-to-end headers (subprotocol, extensions, cookies), none
/// of the HTTP/1.1 upgrade's own.
pub fn h2_accepted(backend: http::response::Parts) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    let mut headers = backend.headers;
    keep_end_to_end(&mut headers);
    headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    *response.headers_mut() = headers;
    response
}

/// What an upgrade request offered a backend: the 101 must answer exactly that.
pub struct Offer {
    accept: String,
    protocols: Vec<String>,
    extensions: Vec<String>,
}

/// Comma-separated items of every `name` header, trimmed, empty ones skipped.
fn items(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// An extension's name: its text before any parameters.
fn extension_name(item: &str) -> &str {
    item.split(';').next().unwrap_or(item).trim()
}

impl Offer {
    /// The offer in the request about to go to a backend.
    pub fn of<B>(request: &Request<B>) -> Offer {
        let headers = request.headers();
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|k| k.as_bytes())
            .unwrap_or_default();
        Offer {
            accept: tokio_tungstenite::tungstenite::handshake::derive_accept_key(key),
            protocols: items(headers, header::SEC_WEBSOCKET_PROTOCOL)
                .map(str::to_owned)
                .collect(),
            extensions: items(headers, header::SEC_WEBSOCKET_EXTENSIONS)
                .map(|e| extension_name(e).to_ascii_lowercase())
                .collect(),
        }
    }

    /// Checks a backend's 101 against the offer (RFC 6455 §4.1, the client's
    /// checks): `Upgrade: websocket`, `Connection: upgrade`, the Accept for this
    /// key, at most one subprotocol and only one offered, only offered extensions.
    /// The reason when it fails.
    pub fn check(&self, head: &http::response::Parts) -> Result<(), &'static str> {
        let headers = &head.headers;
        let mut upgrade = items(headers, header::UPGRADE);
        match (upgrade.next(), upgrade.next()) {
            (Some(only), None) if only.eq_ignore_ascii_case("websocket") => {}
            _ => return Err("the 101 does not upgrade to websocket"),
        }
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return Err("the 101 has no Connection: upgrade");
        }
        let mut accepts = headers.get_all(header::SEC_WEBSOCKET_ACCEPT).iter();
        match (accepts.next(), accepts.next()) {
            (Some(a), None) if a.as_bytes() == self.accept.as_bytes() => {}
            _ => return Err("the 101's Sec-WebSocket-Accept is wrong"),
        }
        let protocols: Vec<&str> = items(headers, header::SEC_WEBSOCKET_PROTOCOL).collect();
        match protocols[..] {
            [] => {}
            [chosen] if self.protocols.iter().any(|p| p == chosen) => {}
            _ => return Err("the 101 chose a subprotocol the client did not offer"),
        }
        let offered = |e: &str| {
            let name = extension_name(e).to_ascii_lowercase();
            self.extensions.contains(&name)
        };
        if !items(headers, header::SEC_WEBSOCKET_EXTENSIONS).all(offered) {
            return Err("the 101 chose an extension the client did not offer");
        }
        Ok(())
    }
}

/// A backend's non-101 answer, passed back as it was (less hop-by-hop headers).
pub fn passthrough(backend: http::response::Parts, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = backend.status;
    let mut headers = backend.headers;
    keep_end_to_end(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade() -> http::request::Builder {
        Request::get("/chat?room=1")
            .header("host", "chat.example.com:8080")
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
    }

    #[test]
    fn accepts_a_good_upgrade() {
        let req = upgrade().body(()).unwrap();
        assert_eq!(validate(&req), Ok(()));
        assert_eq!(request_host(&req), Some("chat.example.com"));
    }

    #[test]
    fn normalises_paths_once() {
        for (path, normal) in [
            ("/ws", None),
            ("/ws/a?x=1", None),
            ("/a/../ws", Some("/ws")),
            ("//ws//room", Some("/ws/room")),
            ("/ws/./room/", Some("/ws/room/")),
            ("/%2e%2e/%2E%2E/admin", Some("/admin")),
            ("/ws/..", Some("/")),
            ("/../../..", Some("/")),
        ] {
            assert_eq!(normal_path(path).as_deref(), normal, "{path}");
        }
        let mut req = Request::get("/x/%2e%2e//ws/?room=a/../b").body(()).unwrap();
        normalize_path(&mut req);
        assert_eq!(req.uri().path(), "/ws/");
        assert_eq!(req.uri().query(), Some("room=a/../b"));
    }

    #[test]
    fn rejects_each_broken_part() {
        let plain = Request::get("/").body(()).unwrap();
        assert_eq!(validate(&plain), Err(Rejection::NotWebSocket));
        let post = upgrade().method("POST").body(()).unwrap();
        assert_eq!(
            validate(&post).map_err(Rejection::status),
            Err(StatusCode::BAD_REQUEST)
        );
        let key = upgrade()
            .header("sec-websocket-key", "short")
            .body(())
            .unwrap();
        // Two keys: which one a backend would read is anyone's guess.
        assert_eq!(
            validate(&key),
            Err(Rejection::Malformed("send one Sec-WebSocket-Key header"))
        );
        let mut bad_key = upgrade().body(()).unwrap();
        bad_key.headers_mut().insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZR=="),
        );
        assert!(matches!(validate(&bad_key), Err(Rejection::Malformed(_))));
        let mut version = upgrade().body(()).unwrap();
        version
            .headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(validate(&version), Err(Rejection::UnsupportedVersion));
        let mut no_conn = upgrade().body(()).unwrap();
        no_conn.headers_mut().remove("connection");
        assert!(matches!(validate(&no_conn), Err(Rejection::Malformed(_))));
    }

    #[test]
    fn forwards_end_to_end_headers_only() {
        let build = || {
            upgrade()
                .header("sec-websocket-protocol", "chat, superchat")
                .header("sec-websocket-extensions", "permessage-deflate")
                .header("cookie", "a=1")
                .header("keep-alive", "timeout=5")
                .header("x-forwarded-for", "10.1.1.1")
                .header("x-wsgate-user", "spoofed")
                .header("connection", "x-secret")
                .header("x-secret", "hop")
                .body(())
                .unwrap()
        };
        // A trusted peer: its X-Forwarded-For is appended to.
        let trusted = crate::clients::Peer {
            client: "127.0.0.9:5000".parse().unwrap(),
            trusted: true,
        };
        let out = backend_request(&mut build(), &trusted, "http", Some("ada"));
        let h = out.headers();
        assert_eq!(out.uri(), "/chat?room=1");
        assert_eq!(h["sec-websocket-protocol"], "chat, superchat");
        assert_eq!(h["sec-websocket-extensions"], "permessage-deflate");
        assert_eq!(h["cookie"], "a=1");
        assert_eq!(h["host"], "chat.example.com:8080");
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "chat.example.com:8080");
        assert_eq!(h["connection"], "Upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h["x-wsgate-user"], "ada");
        assert!(h.get("x-secret").is_none());
        // Anyone else's is replaced.
        let untrusted = crate::clients::Peer {
            trusted: false,
            ..trusted
        };
        let anonymous = backend_request(&mut build(), &untrusted, "http", None);
        assert!(anonymous.headers().get("x-wsgate-user").is_none());
        assert_eq!(anonymous.headers()["x-forwarded-for"], "127.0.0.9");
    }
}
