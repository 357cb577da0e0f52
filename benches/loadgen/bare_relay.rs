//! The floor: a bare TCP relay. Accept, pick the least-loaded backend, relay bytes
//! both ways with a buffer taken only while data is there. No HTTP, no frames: no
//! user-space proxy can do much better than this.

use std::io::ErrorKind::WouldBlock;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};

pub async fn run(listener: TcpListener, backends: Vec<SocketAddr>) {
    let counts: Arc<Vec<AtomicUsize>> =
        Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let i = (0..backends.len())
            .min_by_key(|i| counts[*i].load(Ordering::Relaxed))
            .unwrap_or(0);
        counts[i].fetch_add(1, Ordering::Relaxed);
        let (counts, addr) = (counts.clone(), backends[i]);
        tokio::spawn(async move {
            if let Ok(backend) = TcpStream::connect(addr).await {
                let _ = (client.set_nodelay(true), backend.set_nodelay(true));
                relay(&client, &backend).await;
            }
            counts[i].fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Moves bytes until either side ends. Reads go into a stack buffer inside a
/// synchronous function; only what the receiver cannot take at once is kept.
async fn relay(a: &TcpStream, b: &TcpStream) {
    loop {
        let (from, to) = tokio::select! {
            r = a.readable() => { if r.is_err() { return } (a, b) }
            r = b.readable() => { if r.is_err() { return } (b, a) }
        };
        let Some(mut rest) = copy_now(from, to) else {
            return;
        };
        while !rest.is_empty() {
            if to.writable().await.is_err() {
                return;
            }
            match to.try_write(&rest) {
                Ok(n) => drop(rest.drain(..n)),
                Err(e) if e.kind() == WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// One read, written at once; returns what is left to write (`None`: closed).
fn copy_now(from: &TcpStream, to: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64 * 1024];
    let n = match from.try_read(&mut buf) {
        Ok(0) => return None,
        Ok(n) => n,
        Err(e) if e.kind() == WouldBlock => return Some(Vec::new()),
        Err(_) => return None,
    };
    let mut written = 0;
    while written < n {
        match to.try_write(&buf[written..n]) {
            Ok(k) => written += k,
            Err(e) if e.kind() == WouldBlock => break,
            Err(_) => return None,
        }
    }
    Some(buf[written..n].to_vec())
}
