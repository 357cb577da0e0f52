//! TLS with rustls: the listeners' certificates, chosen by SNI from each
//! certificate's subjectAltName (exact and wildcard names; the first certificate
//! for an unknown or missing name), reloaded live; and the client side for
//! `wss` backends (`[pool.NAME.tls]`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{BackendTls, TlsConfig, TlsVersion};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no certificate in it (PEM `CERTIFICATE` blocks expected)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key in it (PEM PKCS#8, RSA or EC expected)")]
    NoKey { path: PathBuf },
    #[error("{path}: the key is not one rustls can use")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{key}: this key does not match the certificate {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the certificate cannot be parsed")]
    Parse { path: PathBuf },
    #[error("{path}: the certificate expired {ago} seconds ago")]
    Expired { path: PathBuf, ago: u64 },
    #[error("{path}: no usable certificate authority in it")]
    NoCa { path: PathBuf },
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
}

/// One loaded certificate: its key, the names it serves, when it expires.
#[derive(Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// subjectAltName DNS names, lower-case (`*.example.com` kept as is).
    pub names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    pub path: PathBuf,
}

/// Reads a PEM file.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads one certificate chain and its key, checking that they match and that
/// the certificate has not expired.
pub fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    };
    let der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| TlsError::NoKey {
        path: key.to_path_buf(),
    })?;
    let signing = any_supported_type(&der).map_err(|source| TlsError::BadKey {
        path: key.to_path_buf(),
        source,
    })?;
    let (names, not_after) = inspect(leaf).ok_or_else(|| TlsError::Parse {
        path: cert.to_path_buf(),
    })?;
    let certified = CertifiedKey::new(chain, signing);
    if certified.keys_match().is_err() {
        return Err(TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        });
    }
    let now = now_secs();
    if not_after < now {
        return Err(TlsError::Expired {
            path: cert.to_path_buf(),
            ago: (now - not_after) as u64,
        });
    }
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        not_after,
        path: cert.to_path_buf(),
    })
}

/// A certificate's DNS names and expiry.
fn inspect(der: &CertificateDer<'_>) -> Option<(Vec<String>, i64)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    Some((names, cert.validity().not_after.timestamp()))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The certificates served now; swapped whole when they are reloaded.
#[derive(Debug)]
pub struct Certificates {
    current: ArcSwap<Vec<Loaded>>,
}

impl Certificates {
    pub fn new(loaded: Vec<Loaded>) -> Arc<Certificates> {
        Arc::new(Certificates {
            current: ArcSwap::from_pointee(loaded),
        })
    }

    /// Loads every `[[tls.cert]]`; on any error the current set stays.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), TlsError> {
        let loaded = load_all(tls)?;
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    /// (first name, seconds until expiry) of each certificate, for the metric.
    pub fn expiries(&self) -> Vec<(String, f64)> {
        let now = now_secs();
        self.current
            .load()
            .iter()
            .map(|c| {
                let name = c
                    .names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| c.path.display().to_string());
                (name, (c.not_after - now) as f64)
            })
            .collect()
    }

    /// The paths to watch.
    pub fn files(tls: &TlsConfig) -> Vec<PathBuf> {
        tls.certs
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .collect()
    }
}

/// Loads every certificate of `tls`, in order (the first is the default).
pub fn load_all(tls: &TlsConfig) -> Result<Vec<Loaded>, TlsError> {
    tls.certs.iter().map(|c| load(&c.cert, &c.key)).collect()
}

/// Whether `pattern` (a subjectAltName) covers `name`.
fn covers(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.current.load();
        let wanted = hello.server_name().map(str::to_ascii_lowercase);
        let exact = wanted.as_deref().and_then(|name| {
            certs
                .iter()
                .find(|c| c.names.iter().any(|n| n == name))
                .or_else(|| {
                    certs
                        .iter()
                        .find(|c| c.names.iter().any(|n| covers(n, name)))
                })
        });
        exact.or_else(|| certs.first()).map(|c| c.key.clone())
    }
}

/// The rustls server config of the TLS listeners: ALPN `h2` (when `http2`) and
/// `http/1.1`, versions from `min_version`.
pub fn server_config(
    tls: &TlsConfig,
    certs: Arc<Certificates>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = if tls.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// The rustls client config for a pool's `wss` backends: `ca` (else the system's
/// roots) and an optional client certificate.
pub fn client_config(tls: &BackendTls) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            for cert in CertificateDer::pem_slice_iter(&read(ca)?).filter_map(Result::ok) {
                roots
                    .add(cert)
                    .map_err(|_| TlsError::NoCa { path: ca.clone() })?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCa { path: ca.clone() });
            }
        }
        None => {
            let found = rustls_native_roots();
            for cert in found {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let loaded = load(cert, key)?;
            let chain = loaded.key.cert.clone();
            let der = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|_| TlsError::NoKey { path: key.clone() })?;
            builder.with_client_auth_cert(chain, der)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The system's CA certificates (Debian's bundle), for backends without `ca`.
fn rustls_native_roots() -> Vec<CertificateDer<'static>> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
    .map(|pem| {
        CertificateDer::pem_slice_iter(&pem)
            .filter_map(Result::ok)
            .collect()
    })
    .unwrap_or_default()
}

/// The name a backend's certificate must carry.
pub fn server_name(tls: &BackendTls, host: &str) -> Option<ServerName<'static>> {
    let name = tls.server_name.as_deref().unwrap_or(host);
    ServerName::try_from(name.to_string()).ok()
}

/// How long a TLS handshake with a client may take at most.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// How much [`ReadAhead`] reads from the socket at once: two 16 KiB records and
/// then some.
const READ_AHEAD: usize = 40 * 1024;

thread_local! {
    /// One read-ahead buffer per worker thread, zeroed once (as the relay's own).
    static AHEAD: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; READ_AHEAD].into_boxed_slice());
}

/// The socket under a TLS session (a client's, a TLS backend's). rustls asks for at most
/// 4 KiB per read (its buffer grows by that much a time), so a 16 KiB record
/// would cost five `read(2)`s; this reads what the socket holds, up to 40 KiB,
/// in one, into the worker's buffer, and hands rustls what it asks for. The rest
/// is kept only until rustls takes it, in an allocation of its exact size: an
/// idle connection holds no buffer.
#[derive(Debug)]
pub struct ReadAhead {
    io: tokio::net::TcpStream,
    /// Read from the socket, not yet taken, from `taken` on.
    ahead: Vec<u8>,
    taken: usize,
}

impl ReadAhead {
    pub fn new(io: tokio::net::TcpStream) -> ReadAhead {
        ReadAhead {
            io,
            ahead: Vec::new(),
            taken: 0,
        }
    }

    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.io
    }
}

impl tokio::io::AsyncRead for ReadAhead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.taken < this.ahead.len() {
            let n = buf.remaining().min(this.ahead.len() - this.taken);
            buf.put_slice(&this.ahead[this.taken..this.taken + n]);
            this.taken += n;
            if this.taken == this.ahead.len() {
                this.ahead = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        // The relay's own read of a plain socket: readiness cleared after a
        // short read, so no read ends in `WouldBlock`.
        AHEAD.with_borrow_mut(|scratch| {
            let n = std::task::ready!(crate::relay::RelayIo::poll_read_into(
                &mut this.io,
                cx,
                scratch
            ))?;
            let give = n.min(buf.remaining());
            buf.put_slice(&scratch[..give]);
            if give < n {
                this.ahead = scratch[give..n].to_vec();
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl tokio::io::AsyncWrite for ReadAhead {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(covers("*.example.com", "chat.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(covers("chat.example.com", "chat.example.com"));
    }

    /// What rustls reads 4 KiB at a time comes off the socket in one read, in
    /// order, and nothing is held once it has all been taken.
    #[tokio::test]
    async fn read_ahead_takes_the_socket_whole_and_hands_it_out_in_pieces() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut writer = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).await.expect("write");
        // Wait (bounded) until all of it is in the socket's receive queue.
        let peek = socket2::SockRef::from(&accepted);
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 32 * 1024];
        for _ in 0..1000 {
            accepted.readable().await.expect("readable");
            if peek.peek(&mut probe).expect("peek") == sent.len() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let mut reader = ReadAhead::new(accepted);
        let mut first = [0u8; 4096];
        assert_eq!(reader.read(&mut first).await.expect("read"), 4096);
        // One read took everything: the socket has nothing left.
        let empty = socket2::SockRef::from(reader.get_ref()).peek(&mut probe);
        assert!(
            matches!(&empty, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{empty:?}"
        );
        let mut got = first.to_vec();
        while got.len() < sent.len() {
            let mut piece = [0u8; 4096];
            let n = reader.read(&mut piece).await.expect("read");
            assert!(n > 0, "EOF after {} bytes", got.len());
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(
            reader.ahead.capacity(),
            0,
            "a buffer held after all was taken"
        );
        drop(writer);
        let mut rest = [0u8; 16];
        assert_eq!(reader.read(&mut rest).await.expect("EOF"), 0);
    }
}
