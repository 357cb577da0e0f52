//! wss:// at the edge: TLS listeners with certificates chosen by SNI (made here
//! with rcgen), reloaded when their files change, wss to TLS backends, and
//! WebSockets over HTTP/2 (RFC 8441).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A CA of the test's own, writing certificates it signs into a folder.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        Pki { dir, ca }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names` in `FILE.pem` and its key in `FILE.key`.
    fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &self.ca)
            .expect("sign");
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        (c, k)
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        roots
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).expect("name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// wss through the proxy with `name` as SNI, verified against `roots`; echoes.
async fn wss_echo(addr: SocketAddr, name: &str, roots: rustls::RootCertStore) {
    let tls = tls_connect(addr, name, client_config(roots, &[b"http/1.1"]))
        .await
        .expect("TLS handshake");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{name}/ws"), tls)
        .await
        .expect("WebSocket over TLS");
    ws.send(Message::text("secure")).await.expect("send");
    assert_eq!(next_any(&mut ws).await, Message::text("secure"));
}

async fn next_any<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message in time")
        .expect("open")
        .expect("a message")
}

/// Accepts any certificate and keeps the one presented.
#[derive(Debug)]
struct Keep(Mutex<Option<CertificateDer<'static>>>);

impl rustls::client::danger::ServerCertVerifier for Keep {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate the proxy presents for `name`.
async fn presented(addr: SocketAddr, name: &str) -> CertificateDer<'static> {
    let keep = Arc::new(Keep(Mutex::new(None)));
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(keep.clone())
        .with_no_client_auth();
    let _tls = tls_connect(addr, name, Arc::new(config))
        .await
        .expect("handshake");
    let cert = keep.0.lock().unwrap().clone();
    cert.expect("a certificate")
}

fn der_of(pem: &Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(pem).expect("pem")
}

fn tls_section(certs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let mut out = format!("[tls]\nlisten = [\"127.0.0.1:0\"]\n{extra}\n");
    for (c, k) in certs {
        out.push_str(&format!(
            "[[tls.cert]]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.display(),
            k.display()
        ));
    }
    out
}

#[tokio::test]
async fn wss_with_certificates_chosen_by_sni() {
    let pki = Pki::new();
    let chat = pki.issue("chat", &["chat.test"]);
    let api = pki.issue("api", &["*.api.test"]);
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "{}{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], ""),
        tls_section(&[chat.clone(), api.clone()], "")
    ))
    .await;
    let addr = proxy.tls.expect("tls listener");
    wss_echo(addr, "chat.test", pki.roots()).await;
    wss_echo(addr, "v1.api.test", pki.roots()).await;
    // An unknown name gets the first (default) certificate.
    assert_eq!(presented(addr, "other.test").await, der_of(&chat.0));
    assert_eq!(presented(addr, "v2.api.test").await, der_of(&api.0));
    // Plain text on the TLS port is refused, and the port keeps serving.
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let read = timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1 200"));
    // A TLS 1.1 ClientHello (no supported_versions) is refused with an alert.
    let mut old = TcpStream::connect(addr).await.expect("connect");
    old.write_all(&tls11_client_hello()).await.expect("write");
    let mut answer = Vec::new();
    let _ = timeout(Duration::from_secs(5), old.read_to_end(&mut answer)).await;
    assert_eq!(answer.first(), Some(&0x15), "an alert record: {answer:?}");
    wss_echo(addr, "chat.test", pki.roots()).await;
}

/// A ClientHello offering TLS 1.1 only.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]);
    let mut handshake = vec![0x01, 0, 0, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn min_version_1_3_refuses_tls_1_2() {
    let pki = Pki::new();
    let chat = pki.issue("chat", &["chat.test"]);
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "{}{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], ""),
        tls_section(&[chat], "min_version = \"1.3\"")
    ))
    .await;
    let addr = proxy.tls.expect("tls listener");
    let only_12 = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    assert!(
        tls_connect(addr, "chat.test", Arc::new(only_12))
            .await
            .is_err()
    );
    wss_echo(addr, "chat.test", pki.roots()).await;
}

#[tokio::test]
async fn check_reports_a_key_that_does_not_match_with_its_path() {
    let pki = Pki::new();
    let (cert, _) = pki.issue("a", &["a.test"]);
    let (_, other_key) = pki.issue("b", &["b.test"]);
    let path = pki.dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}",
            tls_section(&[(cert, other_key.clone())], "")
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("wsgate check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match") && err.contains(&other_key.display().to_string()),
        "{err}"
    );
    assert!(err.contains("proxy.toml:"), "file:line:col: {err}");
}

#[tokio::test]
async fn certificates_replaced_on_disk_serve_new_handshakes() {
    let pki = Pki::new();
    let chat = pki.issue("chat", &["chat.test"]);
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "{}{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], ""),
        tls_section(std::slice::from_ref(&chat), "")
    ))
    .await;
    let addr = proxy.tls.expect("tls listener");
    let tls = tls_connect(
        addr,
        "chat.test",
        client_config(pki.roots(), &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    let (mut open, _) = tokio_tungstenite::client_async("wss://chat.test/ws", tls)
        .await
        .expect("ws");
    let before = presented(addr, "chat.test").await;
    // A new certificate for the same name, written over the old files.
    let renewed = pki.issue("renewed", &["chat.test"]);
    std::fs::copy(&renewed.1, &chat.1).expect("key");
    std::fs::copy(&renewed.0, &chat.0).expect("cert");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if presented(addr, "chat.test").await == der_of(&renewed.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(before, der_of(&renewed.0));
    // The connection made before goes on.
    open.send(Message::text("still")).await.expect("send");
    assert_eq!(next_any(&mut open).await, Message::text("still"));
}

/// A wss echo backend with a certificate for `name`.
async fn tls_backend(cert: &(PathBuf, PathBuf)) -> SocketAddr {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.0)
        .expect("pem")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cert.1).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn wss_to_backends_verifies_their_certificates() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let backend_cert = pki.issue("backend", &["backend.test"]);
    let trusted = tls_backend(&backend_cert).await;
    let untrusted = tls_backend(&stranger.issue("backend", &["backend.test"])).await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{}{}\
         [pool.good.tls]\nca = \"{ca}\"\nserver_name = \"backend.test\"\n\
         [pool.bad.tls]\nca = \"{ca}\"\nserver_name = \"backend.test\"\n",
        route("/good", "good"),
        route("/bad", "bad"),
        pool("good", &[(trusted, 1)], ""),
        pool("bad", &[(untrusted, 1)], "retries = 0"),
        ca = pki.ca().display()
    ))
    .await;
    let mut ws = connect(&proxy.url("/good")).await;
    ws.send(Message::text("over wss")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("over wss"));
    let refused = raw_request(proxy.addr, upgrade_request("/bad", "").as_bytes()).await;
    assert!(refused.starts_with("HTTP/1.1 502"), "{refused}");
    let (_, metrics) = http_get(proxy.admin.unwrap(), "/metrics", "").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("wsgate_backend_failures_total")
                && l.contains("reason=\"backend_tls\"")
                && l.contains(&untrusted.to_string())),
        "{metrics}"
    );
}

/// One WebSocket over an HTTP/2 stream: CONNECT with `:protocol = websocket`.
async fn h2_websocket(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>> {
    let mut request = hyper::Request::connect("https://chat.test/ws")
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())
        .expect("request");
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(
        response.status(),
        200,
        "RFC 8441: 200 for an extended CONNECT"
    );
    let upgraded = hyper::upgrade::on(response).await.expect("the stream");
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_over_one_http2_connection() {
    let pki = Pki::new();
    let chat = pki.issue("chat", &["chat.test"]);
    let b = [
        EchoBackend::start().await,
        EchoBackend::start().await,
        EchoBackend::start().await,
    ];
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{}",
        route("/ws", "p"),
        pool("p", &[(b[0].addr, 1), (b[1].addr, 1), (b[2].addr, 1)], ""),
        tls_section(&[chat], "")
    ))
    .await;
    let tls = tls_connect(
        proxy.tls.expect("tls"),
        "chat.test",
        client_config(pki.roots(), &[b"h2"]),
    )
    .await
    .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(h2_websocket(&mut sender).await);
    }
    // Balanced independently: one stream per backend.
    assert_eq!(proxy.counts("p"), vec![1, 1, 1]);
    for (i, ws) in streams.iter_mut().enumerate() {
        ws.send(Message::text(format!("s{i}"))).await.expect("send");
        assert_eq!(next_any(ws).await, Message::text(format!("s{i}")));
    }
    // One stream's end leaves the others working.
    let gone = streams.remove(0);
    drop(gone);
    wait_for(
        "the dropped stream's tunnel to end",
        Duration::from_secs(5),
        || proxy.counts("p").iter().sum::<u64>() == 2,
    )
    .await;
    for ws in streams.iter_mut() {
        ws.send(Message::text("after")).await.expect("send");
        assert_eq!(next_any(ws).await, Message::text("after"));
    }
    // The recorder is shared by this binary's tests: at least these three counted.
    let (_, metrics) = http_get(proxy.admin.unwrap(), "/metrics", "").await;
    let h2: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("wsgate_websockets_total") && l.contains("protocol=\"h2\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(h2 >= 3, "{metrics}");
}

/// A stream whose client stops reading is held back by its own flow-control window
/// and does not stall the connection's other streams: wsgate's connection window
/// covers every stream's window, so one full stream cannot use it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reading_http2_stream_does_not_stall_the_others() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pki = Pki::new();
    let chat = pki.issue("chat", &["chat.test"]);
    let b = [EchoBackend::start().await, EchoBackend::start().await];
    let proxy = Proxy::start(&format!(
        "{}{}{}",
        route("/ws", "p"),
        pool("p", &[(b[0].addr, 1), (b[1].addr, 1)], ""),
        tls_section(&[chat], "")
    ))
    .await;
    let tls = tls_connect(
        proxy.tls.expect("tls"),
        "chat.test",
        client_config(pki.roots(), &[b"h2"]),
    )
    .await
    .expect("handshake");
    // The client reads nothing on the slow stream: its 64 KiB stream window fills,
    // while its connection window is large enough not to block the others.
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(64 * 1024)
            .initial_connection_window_size(64 * 1024 * 1024)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h2");
    tokio::spawn(conn);
    let mut slow = h2_websocket(&mut sender).await;
    let mut other = h2_websocket(&mut sender).await;

    // The slow stream's client sends 16 KiB messages and never reads the echoes: the
    // echo backend, then wsgate's writes to it, then the client's sends back up.
    const MESSAGES: usize = 4096; // 64 MiB, more than every buffer on the way
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        let payload = vec![7u8; 16 * 1024];
        for _ in 0..MESSAGES {
            if slow.send(Message::binary(payload.clone())).await.is_err() {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
        slow
    });
    // Backed up: no progress for 2 s (bounded to 120 s in all).
    let mut last = usize::MAX;
    let mut still = 0;
    for _ in 0..1200 {
        let now = sent.load(Ordering::Relaxed);
        assert!(
            now < MESSAGES,
            "the slow stream was never held back: {now} messages went through"
        );
        if now == last && now > 0 {
            still += 1;
            if still == 20 {
                break;
            }
        } else {
            still = 0;
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(still, 20, "the slow stream neither finished nor backed up");

    // The other stream on the same connection still echoes, both ways.
    for i in 0..20 {
        other
            .send(Message::text(format!("m{i}")))
            .await
            .expect("send");
        let echoed = timeout(Duration::from_secs(5), next_any(&mut other))
            .await
            .expect("the other stream is not stalled");
        assert_eq!(echoed, Message::text(format!("m{i}")));
    }
    // A new stream opens and works too.
    let mut third = h2_websocket(&mut sender).await;
    third.send(Message::text("new")).await.expect("send");
    assert_eq!(next_any(&mut third).await, Message::text("new"));
    writer.abort();
}
