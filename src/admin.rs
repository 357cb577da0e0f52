//! The admin listener, separate from the public ones: `/metrics` (Prometheus),
//! `/healthz`, `/readyz`, `/backends`, `/presence`, and the drain API
//! (`POST /pools/{pool}/backends/{addr}/drain` and `.../ready`), optionally behind a
//! bearer token. The token is read from the current config on every request, so a
//! reload changes it.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::handshake::plain;
use crate::metrics as m;
use crate::state::State;

/// What the admin endpoints read.
pub struct Admin {
    pub state: Arc<State>,
    pub cluster: Arc<Cluster>,
    /// Cancelled when wsgate starts shutting down: `/readyz` answers 503.
    pub draining: CancellationToken,
    /// Whether the cluster uses Redis (else `wsgate_redis_up` is not reported).
    pub redis: bool,
    /// The TLS listeners' certificates, for their expiry.
    pub certificates: Option<Arc<crate::tls::Certificates>>,
}

/// Serves admin requests on `listener` until `stop`.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    crate::server::serve_http(listener, stop, "admin", move |req| {
        let admin = admin.clone();
        async move { admin.handle(req).await }
    })
    .await
}

fn backend_json(b: &crate::balancer::Backend) -> serde_json::Value {
    json!({
        "addr": b.addr.to_string(),
        "weight": b.weight(),
        "healthy": b.is_healthy(),
        "draining": b.is_draining(),
        "connections": b.active(),
        "cluster_connections": b.load(),
    })
}

/// Every pool with its backends, as `/backends` and `/stats` show them.
fn pools_json(snapshot: &crate::state::Snapshot) -> Vec<serde_json::Value> {
    snapshot
        .pools
        .values()
        .map(|pool| {
            let backends: Vec<serde_json::Value> =
                pool.backends.iter().map(|b| backend_json(b)).collect();
            json!({"name": pool.name, "backends": backends})
        })
        .collect()
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let snapshot = self.state.load();
        if let Some(token) = &snapshot.config.admin.token {
            let expected = format!("Bearer {token}");
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            // A browser opening the stats page cannot set a header: `?token=` on a
            // GET counts as the bearer token (the page passes it on as one).
            let in_query = (req.method() == Method::GET)
                .then(|| req.uri().query())
                .flatten()
                .and_then(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == "token")
                        .map(|(_, v)| format!("Bearer {v}"))
                });
            // Constant time: how much of a guess matched must not show in the timing.
            let matches = given.is_some_and(|g| bool::from(g.ct_eq(expected.as_bytes())))
                || in_query.is_some_and(|g| bool::from(g.as_bytes().ct_eq(expected.as_bytes())));
            if !matches {
                let mut response = plain(StatusCode::UNAUTHORIZED, "a bearer token is required");
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return response;
            }
        }
        let path = req.uri().path();
        if let Some(rest) = path.strip_prefix("/pools/") {
            if req.method() != Method::POST {
                return plain(StatusCode::METHOD_NOT_ALLOWED, "the drain API takes POST");
            }
            return self.drain_api(rest);
        }
        if req.method() != Method::GET {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET");
        }
        match path {
            "/" => stats_page(),
            "/stats" => self.stats(),
            "/metrics" => self.metrics(),
            "/healthz" => plain(StatusCode::OK, "ok"),
            "/readyz" => self.readyz(),
            "/backends" => self.backends(),
            "/presence" => self.presence_totals().await,
            _ => match path.strip_prefix("/presence/") {
                Some(user) if !user.is_empty() => self.presence(user).await,
                _ => plain(
                    StatusCode::NOT_FOUND,
                    "admin endpoints: GET / (stats page) /stats /metrics /healthz /readyz /backends /presence /presence/USER, POST /pools/POOL/backends/ADDR/drain|ready",
                ),
            },
        }
    }

    /// `POST /pools/{pool}/backends/{addr}/drain` or `.../ready`: drains a backend
    /// (no new connections; its tunnels closed with 1012 after the pool's
    /// `drain_timeout`) or makes it ready again. Holds across reloads until `ready`
    /// or the backend's removal.
    fn drain_api(&self, rest: &str) -> Response<Full<Bytes>> {
        let usage = "POST /pools/POOL/backends/ADDR/drain or /ready";
        let Some((pool, rest)) = rest.split_once("/backends/") else {
            return plain(StatusCode::NOT_FOUND, usage);
        };
        let Some((addr, action)) = rest.rsplit_once('/') else {
            return plain(StatusCode::NOT_FOUND, usage);
        };
        let drain = match action {
            "drain" => true,
            "ready" => false,
            _ => return plain(StatusCode::NOT_FOUND, usage),
        };
        let addr = percent_encoding::percent_decode_str(addr).decode_utf8_lossy();
        let snapshot = self.state.load();
        let Some(pool) = snapshot.pools.get(pool) else {
            return plain(StatusCode::NOT_FOUND, &format!("no pool named {pool}"));
        };
        let Some(backend) = crate::config::BackendAddr::parse(&addr)
            .and_then(|a| pool.backend(&a))
            .filter(|b| !b.is_removed())
        else {
            return plain(
                StatusCode::NOT_FOUND,
                &format!("pool {} has no backend {addr}", pool.name),
            );
        };
        backend.set_admin_drain(drain);
        tracing::info!(pool = %pool.name, backend = %backend.addr, "admin API: backend {}", if drain { "draining" } else { "ready" });
        json_response(StatusCode::OK, backend_json(backend))
    }

    /// Sets the gauges that are read from state, then renders everything. A
    /// backend that has finished draining is left out, and its series vanish (the
    /// recorder drops gauges no scrape has set).
    fn metrics(&self) -> Response<Full<Bytes>> {
        let snapshot = self.state.load();
        for pool in snapshot.pools.values() {
            for backend in &pool.backends {
                if backend.is_draining() && backend.load() == 0 {
                    continue;
                }
                let labels = [
                    ("pool", pool.name.clone()),
                    ("backend", backend.addr.to_string()),
                ];
                metrics::gauge!(m::CONNECTIONS_ACTIVE, &labels).set(backend.active() as f64);
                metrics::gauge!(m::CLUSTER_CONNECTIONS, &labels).set(backend.load() as f64);
                metrics::gauge!(m::BACKEND_UP, &labels).set(if backend.is_healthy() {
                    1.0
                } else {
                    0.0
                });
            }
        }
        if self.redis {
            metrics::gauge!(m::REDIS_UP).set(if self.cluster.is_up() { 1.0 } else { 0.0 });
        }
        metrics::gauge!(m::INSTANCES).set(self.cluster.instances() as f64);
        metrics::counter!(m::ACCESS_LOG_DROPPED).absolute(crate::access::dropped());
        for (name, left) in self.certificates.iter().flat_map(|c| c.expiries()) {
            metrics::gauge!(m::TLS_EXPIRY, "name" => name).set(left);
        }
        let mut response = Response::new(Full::new(Bytes::from(m::handle().render())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }

    /// Not ready while draining, or while a routed pool has no healthy backend.
    fn readyz(&self) -> Response<Full<Bytes>> {
        if self.draining.is_cancelled() {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "draining");
        }
        let snapshot = self.state.load();
        let mut empty: Vec<&str> = Vec::new();
        for route in &snapshot.routes {
            let pool = &route.pool;
            if !pool.backends.iter().any(|b| b.ready()) && !empty.contains(&pool.name.as_str()) {
                empty.push(&pool.name);
            }
        }
        if empty.is_empty() {
            plain(StatusCode::OK, "ready")
        } else {
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no healthy backend in pool {}", empty.join(", ")),
            )
        }
    }

    /// `GET /stats`: what the stats page shows, as JSON: `/backends`, the
    /// cluster's instances with their heartbeat age, Redis, and per pool the
    /// counters the page turns into rates (upgrades per backend, results, messages).
    fn stats(&self) -> Response<Full<Bytes>> {
        let snapshot = self.state.load();
        let text = m::handle().render();
        let mut counters: serde_json::Map<String, serde_json::Value> = snapshot
            .pools
            .keys()
            .map(|name| {
                (
                    name.clone(),
                    json!({"upgrades": {}, "results": {}, "messages": {}}),
                )
            })
            .collect();
        let label = |labels: &[(String, String)], key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let mut add = |pool: &str, group: &str, key: String, value: f64| {
            if let Some(map) = counters
                .get_mut(pool)
                .and_then(|c| c.get_mut(group))
                .and_then(|g| g.as_object_mut())
            {
                let sum = map.get(&key).and_then(|v| v.as_f64()).unwrap_or(0.0) + value;
                map.insert(key, json!(sum));
            }
        };
        for (labels, value) in m::samples(&text, m::UPGRADES) {
            let (pool, result) = (label(&labels, "pool"), label(&labels, "result"));
            if result == "ok" {
                add(&pool, "upgrades", label(&labels, "backend"), value);
            }
            add(&pool, "results", result, value);
        }
        for (labels, value) in m::samples(&text, m::MESSAGES) {
            add(
                &label(&labels, "pool"),
                "messages",
                label(&labels, "direction"),
                value,
            );
        }
        let now = crate::presence::now_ms();
        let instances: Vec<serde_json::Value> = self
            .cluster
            .members()
            .into_iter()
            .map(|(id, at)| json!({"id": id, "heartbeat_age_ms": now.saturating_sub(at)}))
            .collect();
        let pools = pools_json(&snapshot);
        json_response(
            StatusCode::OK,
            json!({
                "instance": self.cluster.instance_id(),
                "time_ms": now,
                "redis": {"configured": self.redis, "up": self.cluster.is_up()},
                "instances": instances,
                "pools": pools,
                "counters": counters,
            }),
        )
    }

    fn backends(&self) -> Response<Full<Bytes>> {
        let snapshot = self.state.load();
        let pools = pools_json(&snapshot);
        json_response(
            StatusCode::OK,
            json!({"instance": self.cluster.instance_id(), "pools": pools}),
        )
    }

    async fn presence(&self, user: &str) -> Response<Full<Bytes>> {
        match self.cluster.lookup(user).await {
            Ok(entries) => json_response(
                StatusCode::OK,
                json!({"user": user, "connections": entries}),
            ),
            Err(e) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("presence unavailable: {e}"),
            ),
        }
    }

    async fn presence_totals(&self) -> Response<Full<Bytes>> {
        match self.cluster.presence_totals().await {
            Ok(totals) => {
                let mut users: HashSet<&str> = HashSet::new();
                let mut connections = 0usize;
                let mut instances: Vec<serde_json::Value> = totals
                    .iter()
                    .map(|(instance, per_user)| {
                        users.extend(per_user.keys().map(String::as_str));
                        let n: usize = per_user.values().sum();
                        connections += n;
                        json!({"instance": instance, "users": per_user.len(), "connections": n})
                    })
                    .collect();
                instances.sort_by(|a, b| a["instance"].as_str().cmp(&b["instance"].as_str()));
                json_response(
                    StatusCode::OK,
                    json!({"users": users.len(), "connections": connections, "instances": instances}),
                )
            }
            Err(e) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("presence unavailable: {e}"),
            ),
        }
    }
}

/// The stats page: static HTML, CSS and JS, no build step; it polls `/stats`.
const STATS_PAGE: &str = include_str!("stats.html");

fn stats_page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(STATS_PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}
