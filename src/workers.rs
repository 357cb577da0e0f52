//! Accept workers: `[server] workers` threads, each running a single-threaded
//! runtime, that share every proxy and TLS listener. Each worker accepts on its
//! own descriptor of the listening socket and serves the connections it accepted
//! for their whole life, as HAProxy's threads and NGINX's workers do: no task
//! moves between threads, no wake-up crosses them on the upgrade path, and a
//! worker that is free takes the next client (one queue, not one per worker).
//! Everything else (the admin listener, the cluster, health checks, reloads)
//! runs on the main runtime.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The worker threads; dropping the last handle stops them (their runtimes end
/// with whatever tasks are left on them).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` worker threads (at least one), each with its own runtime.
    pub fn start(n: usize) -> io::Result<Arc<Workers>> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("wsgate-worker-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
        }
        Ok(Arc::new(Workers { handles, stop }))
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `serve` on every worker, each with its own descriptor of `listener`,
    /// and returns when every one has returned. A descriptor that cannot be made
    /// (the open-files limit) leaves that worker out of this listener.
    pub async fn serve<F, Fut>(&self, listener: TcpListener, serve: F)
    where
        F: Fn(TcpListener) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().ok();
        // Out of the main runtime's poller, into each worker's.
        let listener = match listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(?addr, error = %e, "cannot hand the listener to the workers");
                return;
            }
        };
        let serve = Arc::new(serve);
        let mut running = Vec::new();
        for handle in &self.handles {
            let mine = match listener.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(?addr, error = %e, "a worker left out of this listener");
                    continue;
                }
            };
            let serve = serve.clone();
            running.push(handle.spawn(async move {
                // Registered with the runtime of the thread that polls it.
                match TcpListener::from_std(mine) {
                    Ok(listener) => serve(listener).await,
                    Err(e) => {
                        tracing::warn!(?addr, error = %e, "a worker left out of this listener")
                    }
                }
            }));
        }
        // Each worker holds its own descriptor: this one is not needed.
        drop(listener);
        for worker in running {
            if let Err(e) = worker.await
                && e.is_panic()
            {
                tracing::error!(?addr, "an accept worker panicked");
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One worker per core the process may run on.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::net::TcpStream;

    /// Clients of one listener are accepted by every worker, each on its own
    /// thread; stopping the loops closes the socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_worker_accepts_on_the_shared_listener() {
        let workers = Workers::start(2).expect("workers");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
        let stop = CancellationToken::new();
        let serving = {
            let (seen, stop) = (seen.clone(), stop.clone());
            let workers = workers.clone();
            tokio::spawn(async move {
                workers
                    .serve(listener, move |listener| {
                        let (seen, stop) = (seen.clone(), stop.clone());
                        async move {
                            loop {
                                let accepted = tokio::select! {
                                    a = listener.accept() => a,
                                    _ = stop.cancelled() => return,
                                };
                                let Ok((stream, _)) = accepted else { continue };
                                let name = std::thread::current().name().map(String::from);
                                seen.lock().expect("seen").insert(name.unwrap_or_default());
                                // Held, so the next client finds this worker busy.
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    drop(stream);
                                });
                            }
                        }
                    })
                    .await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut clients = Vec::new();
        while seen.lock().expect("seen").len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline && clients.len() < 5_000,
                "only {:?} accepted, after {} clients",
                seen.lock().expect("seen"),
                clients.len()
            );
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            tokio::task::yield_now().await;
        }
        let names = seen.lock().expect("seen").clone();
        assert_eq!(
            names,
            HashSet::from(["wsgate-worker-0".to_string(), "wsgate-worker-1".to_string()])
        );
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("every loop returned")
            .expect("serve");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the socket is closed once every worker's loop has returned"
        );
    }
}
