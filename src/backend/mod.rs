//! The reference relay backend (`wsgate backend`): clients join rooms, and every
//! message a client sends is published on its room's channel; every backend with
//! members in that room delivers it to them.
//!
//! Protocol, on `ws://HOST/rooms/NAME` or any path ending in the room's name (user
//! from the `X-Wsgate-User` header that wsgate forwards, else `?user=`, else
//! `anon-N`):
//! - server → client, JSON text: `{"type":"welcome","backend","room","user"}` once
//!   joined; `{"type":"message","room","from","origin","seq","text"}` for each text
//!   message of the room (the sender's own included, once, unless `echo` is off);
//!   `{"type":"members","room","users"}` when the room's members change;
//!   `{"type":"whoami","backend","room","user"}` in answer to `{"type":"whoami"}`.
//! - client → server: `{"type":"whoami"}`, or any other text (relayed as `text`), or
//!   binary (relayed as is, as binary).
//! - A client that does not read fast enough has a bounded queue; when it
//!   overflows the client is closed with 1008 (policy violation), and nobody else
//!   waits for it.
//! - `GET /health` answers 200 while messages can be relayed, 503 otherwise.

pub mod broker;
pub mod demo;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::IdentitySource;
use crate::handshake::{self, USER_HEADER};
use crate::presence;
use broker::{Broker, Delivery};

/// Close code for a client whose queue overflowed.
pub const SLOW_CLIENT_CLOSE: u16 = 1008;
/// How often each backend republishes its members of each room.
const MEMBERS_EVERY: Duration = Duration::from_secs(2);
/// A backend whose members were not heard of for this long has left the room.
const MEMBERS_EXPIRE: Duration = Duration::from_secs(6);
/// How long a join waits for its room's subscription before welcoming anyway.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);
/// How long a closing client gets to take its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Rooms whose subscription is still to be changed. At the bound, a join that
/// would open a new room is answered 503 until the subscriber catches up.
pub const MAX_PENDING_ROOMS: usize = 10_000;
/// Tries of one subscription before the room's members are welcomed anyway.
const SUBSCRIBE_TRIES: usize = 10;

#[derive(Debug, Clone)]
pub struct Options {
    /// Names this backend in envelopes, logs and `whoami`.
    pub id: String,
    /// Whether a sender receives its own messages (once).
    pub echo: bool,
    /// Messages queued per client before it is closed as too slow.
    pub queue: usize,
}

impl Options {
    pub fn new(id: &str) -> Options {
        Options {
            id: id.to_string(),
            echo: true,
            queue: 4096,
        }
    }
}

/// What a relay backend has done, for tests and logs.
#[derive(Debug, Default)]
pub struct Stats {
    pub clients: AtomicU64,
    pub slow_closed: AtomicU64,
}

/// One relay backend: its rooms, its broker, its counters. Cheap to clone.
#[derive(Clone)]
pub struct RelayBackend {
    inner: Arc<Inner>,
}

struct Inner {
    options: Options,
    broker: Box<dyn Broker>,
    rooms: Mutex<HashMap<String, Room>>,
    /// Rooms whose subscription may have to change: the subscriber compares each
    /// with `rooms` (the truth) when it gets to it. A set, so a room that comes and
    /// goes a thousand times is one entry; at most [`MAX_PENDING_ROOMS`] from joins.
    to_reconcile: Mutex<HashSet<String>>,
    /// Wakes the subscriber.
    wake: Arc<Notify>,
    stats: Stats,
    next_conn: AtomicU64,
    /// Cancelled when the last handle is dropped: the background tasks end.
    stop: CancellationToken,
    /// The background tasks (subscriber, dispatcher, members ticker).
    tasks: TaskTracker,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Room {
    members: HashMap<u64, Member>,
    /// Each backend's members, as it last published them, and when.
    heard: HashMap<String, (Vec<String>, Instant)>,
    /// The member list last sent to local clients.
    shown: Vec<String>,
    subscribed: watch::Sender<bool>,
}

struct Member {
    user: String,
    tx: mpsc::Sender<Message>,
    /// Cancelled when the client's queue overflowed.
    too_slow: CancellationToken,
}

/// What travels on a room's channel: this JSON header, a newline, the body.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    kind: EnvelopeKind,
    origin: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    conn: u64,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    binary: bool,
    #[serde(default)]
    users: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EnvelopeKind {
    Message,
    Members,
}

fn channel(room: &str) -> String {
    format!("relay:room:{room}")
}

fn encode(envelope: &Envelope, body: &[u8]) -> Bytes {
    let mut out = serde_json::to_vec(envelope).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn decode(payload: &Bytes) -> Option<(Envelope, Bytes)> {
    let split = payload.iter().position(|b| *b == b'\n')?;
    let envelope = serde_json::from_slice(&payload[..split]).ok()?;
    Some((envelope, payload.slice(split + 1..)))
}

fn json(value: serde_json::Value) -> Message {
    Message::text(value.to_string())
}

impl RelayBackend {
    /// A backend on `broker`, whose deliveries arrive on `deliveries`.
    pub fn new(
        options: Options,
        broker: Box<dyn Broker>,
        deliveries: mpsc::Receiver<Delivery>,
    ) -> RelayBackend {
        let inner = Arc::new(Inner {
            options,
            broker,
            rooms: Mutex::default(),
            to_reconcile: Mutex::default(),
            wake: Arc::default(),
            stats: Stats::default(),
            next_conn: AtomicU64::new(1),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        // The tasks hold the backend weakly: they end when its last handle goes.
        let (weak, stop, wake) = (
            Arc::downgrade(&inner),
            inner.stop.clone(),
            inner.wake.clone(),
        );
        inner
            .tasks
            .spawn(subscriber(weak.clone(), stop.clone(), wake));
        inner
            .tasks
            .spawn(dispatcher(weak.clone(), stop.clone(), deliveries));
        inner.tasks.spawn(members_ticker(weak, stop));
        inner.tasks.close();
        RelayBackend { inner }
    }

    /// The background tasks: they have all ended once the backend is dropped.
    pub fn tasks(&self) -> TaskTracker {
        self.inner.tasks.clone()
    }

    fn to_reconcile(&self) -> MutexGuard<'_, HashSet<String>> {
        self.inner
            .to_reconcile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.inner.options.id
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<String, Room>> {
        // Each change under this lock is complete before any call that could panic.
        self.inner.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves HTTP and WebSocket upgrades on `listener` until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        tracing::info!(id = %self.id(), "relay backend starting");
        let stop = shutdown.clone();
        crate::server::serve_http(listener, stop, "relay backend", move |req| {
            let response = self.handle(req, shutdown.clone());
            async move { response }
        })
        .await
    }

    fn handle(
        &self,
        mut req: Request<Incoming>,
        shutdown: CancellationToken,
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path == "/health" {
            return if self.inner.broker.is_healthy() {
                handshake::plain(StatusCode::OK, &format!("ok {}", self.id()))
            } else {
                handshake::plain(StatusCode::SERVICE_UNAVAILABLE, "pub/sub unavailable")
            };
        }
        // The room is the last path segment, whatever prefix the proxy routes:
        // /rooms/lobby, /ws/lobby and /chat/v1/lobby all join "lobby".
        let Some(room) = path
            .rsplit('/')
            .find(|segment| !segment.is_empty())
            .filter(|r| valid(r))
            .map(str::to_string)
        else {
            return handshake::plain(
                StatusCode::NOT_FOUND,
                "join a room at /rooms/NAME (any path ending in the room's name)",
            );
        };
        if let Err(rejection) = handshake::validate(&req) {
            return rejection.response();
        }
        if !self.rooms().contains_key(&room) && self.to_reconcile().len() >= MAX_PENDING_ROOMS {
            return handshake::plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many new rooms at once: try again shortly",
            );
        }
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let from_query = presence::identity(&IdentitySource::Query("user".into()), &req)
            .ok()
            .flatten();
        let user = req
            .headers()
            .get(USER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or(from_query)
            .filter(|u| !u.is_empty() && u.len() <= 64)
            .unwrap_or_else(|| format!("anon-{conn}"));
        let key = req
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let backend = self.clone();
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    backend.session(ws, room, user, conn, shutdown).await;
                }
                Err(e) => tracing::debug!(error = %e, "client left during the upgrade"),
            }
        });
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        response
    }

    /// One client, from join to leave.
    async fn session<S>(
        &self,
        ws: WebSocketStream<S>,
        room: String,
        user: String,
        conn: u64,
        shutdown: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let options = &self.inner.options;
        let (tx, rx) = mpsc::channel(options.queue);
        let too_slow = CancellationToken::new();
        let mut subscribed = self.join(&room, conn, &user, tx.clone(), too_slow.clone());
        let _ = tokio::time::timeout(SUBSCRIBE_WAIT, subscribed.wait_for(|s| *s)).await;
        self.inner.stats.clients.fetch_add(1, Ordering::Relaxed);
        let hello = serde_json::json!({"type": "welcome", "backend": options.id, "room": room, "user": user});
        let _ = tx.try_send(json(hello));
        self.publish_members(&room).await;

        let (sink, mut stream) = ws.split();
        let writer = tokio::spawn(write_loop(sink, rx, too_slow.clone(), shutdown.clone()));
        let mut seq = 0u64;
        loop {
            let message = tokio::select! {
                _ = too_slow.cancelled() => break,
                _ = shutdown.cancelled() => break,
                m = stream.next() => m,
            };
            let (body, binary) = match message {
                Some(Ok(Message::Text(text))) => {
                    if is_whoami(&text) {
                        let reply = serde_json::json!({"type": "whoami", "backend": options.id, "room": room, "user": user});
                        let _ = tx.try_send(json(reply));
                        continue;
                    }
                    (Bytes::from(text), false)
                }
                Some(Ok(Message::Binary(data))) => (data, true),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            };
            seq += 1;
            let envelope = Envelope {
                kind: EnvelopeKind::Message,
                origin: options.id.clone(),
                from: user.clone(),
                conn,
                seq,
                binary,
                users: Vec::new(),
            };
            // Awaited in turn: one client's messages are published in order.
            if let Err(e) = self
                .inner
                .broker
                .publish(&channel(&room), encode(&envelope, &body))
                .await
            {
                tracing::warn!(error = %e, "publish failed: message lost");
            }
        }
        drop(tx);
        self.leave(&room, conn);
        self.publish_members(&room).await;
        if let Err(e) = writer.await {
            tracing::debug!(error = %e, "writer ended abnormally");
        }
    }

    /// Adds a member; the first local member of a room subscribes to it.
    fn join(
        &self,
        room: &str,
        conn: u64,
        user: &str,
        tx: mpsc::Sender<Message>,
        too_slow: CancellationToken,
    ) -> watch::Receiver<bool> {
        let mut rooms = self.rooms();
        let entry = rooms.entry(room.to_string()).or_insert_with(|| {
            self.reconcile_later(room);
            Room {
                members: HashMap::new(),
                heard: HashMap::new(),
                shown: Vec::new(),
                subscribed: watch::Sender::new(false),
            }
        });
        entry.members.insert(
            conn,
            Member {
                user: user.to_string(),
                tx,
                too_slow,
            },
        );
        entry.subscribed.subscribe()
    }

    /// Removes a member; the last local member of a room unsubscribes from it.
    fn leave(&self, room: &str, conn: u64) {
        let mut rooms = self.rooms();
        let Some(entry) = rooms.get_mut(room) else {
            return;
        };
        entry.members.remove(&conn);
        if entry.members.is_empty() {
            rooms.remove(room);
            self.reconcile_later(room);
        } else {
            refresh_members(room, entry, &self.inner.stats);
        }
    }

    async fn publish_members(&self, room: &str) {
        let users: Vec<String> = {
            let rooms = self.rooms();
            let set: BTreeSet<&str> = rooms
                .get(room)
                .map(|r| r.members.values().map(|m| m.user.as_str()).collect())
                .unwrap_or_default();
            set.into_iter().map(str::to_string).collect()
        };
        let envelope = Envelope {
            kind: EnvelopeKind::Members,
            origin: self.inner.options.id.clone(),
            from: String::new(),
            conn: 0,
            seq: 0,
            binary: false,
            users,
        };
        if let Err(e) = self
            .inner
            .broker
            .publish(&channel(room), encode(&envelope, b""))
            .await
        {
            tracing::debug!(error = %e, "members publish failed");
        }
    }

    /// Asks the subscriber to bring `room`'s subscription in line with `rooms`.
    fn reconcile_later(&self, room: &str) {
        self.to_reconcile().insert(room.to_string());
        self.inner.wake.notify_one();
    }

    /// Subscribes to the rooms that have members and unsubscribes from those that
    /// have none, among the rooms that changed; `subscribed` is what Redis has.
    async fn reconcile(&self, subscribed: &mut HashSet<String>) {
        let changed = std::mem::take(&mut *self.to_reconcile());
        for room in changed {
            let wanted = self.rooms().contains_key(&room);
            let name = channel(&room);
            if wanted && !subscribed.contains(&room) {
                let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
                for _ in 0..SUBSCRIBE_TRIES {
                    match self.inner.broker.subscribe(&name).await {
                        Ok(()) => {
                            subscribed.insert(room.clone());
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(%room, error = %e, "subscribe failed, retrying");
                            if !backoff.pause(&self.inner.stop).await {
                                return;
                            }
                        }
                    }
                }
            } else if !wanted
                && subscribed.remove(&room)
                && let Err(e) = self.inner.broker.unsubscribe(&name).await
            {
                tracing::warn!(%room, error = %e, "unsubscribe failed");
            }
            if let Some(r) = self.rooms().get(&room) {
                r.subscribed.send_replace(true);
            }
        }
    }

    /// Delivers what arrived on a subscribed channel to local members.
    fn dispatch(&self, delivery: Delivery) {
        let echo = self.inner.options.echo;
        let me = &self.inner.options.id;
        let Some(room) = delivery.channel.strip_prefix("relay:room:") else {
            return;
        };
        let Some((envelope, body)) = decode(&delivery.payload) else {
            tracing::debug!(channel = %delivery.channel, "undecodable delivery");
            return;
        };
        let mut rooms = self.rooms();
        let Some(entry) = rooms.get_mut(room) else {
            return;
        };
        match envelope.kind {
            EnvelopeKind::Members => {
                let origin = envelope.origin.clone();
                let first = entry
                    .heard
                    .insert(envelope.origin, (envelope.users, Instant::now()))
                    .is_none();
                refresh_members(room, entry, &self.inner.stats);
                if first && origin != *me {
                    // A backend new to this room: tell it who is here now rather
                    // than at the next tick. It answers only once per newcomer.
                    let backend = self.clone();
                    let room = room.to_string();
                    tokio::spawn(async move { backend.publish_members(&room).await });
                }
            }
            EnvelopeKind::Message => {
                let message = if envelope.binary {
                    Message::binary(body)
                } else {
                    json(serde_json::json!({
                        "type": "message", "room": room, "from": envelope.from,
                        "origin": envelope.origin, "seq": envelope.seq,
                        "text": String::from_utf8_lossy(&body),
                    }))
                };
                let own = envelope.origin == *me;
                for (conn, member) in &entry.members {
                    if !echo && own && *conn == envelope.conn {
                        continue;
                    }
                    deliver(member, message.clone(), &self.inner.stats);
                }
            }
        }
    }

    /// Republishes members, forgets backends not heard of, updates clients.
    async fn members_tick(&self) {
        let names: Vec<String> = {
            let mut rooms = self.rooms();
            for (name, room) in rooms.iter_mut() {
                room.heard
                    .retain(|_, (_, at)| at.elapsed() < MEMBERS_EXPIRE);
                refresh_members(name, room, &self.inner.stats);
            }
            rooms.keys().cloned().collect()
        };
        for name in names {
            self.publish_members(&name).await;
        }
    }
}

/// The backend behind `weak`, while it lives.
fn upgrade(weak: &Weak<Inner>) -> Option<RelayBackend> {
    weak.upgrade().map(|inner| RelayBackend { inner })
}

/// Carries out subscription changes as rooms open and close.
async fn subscriber(weak: Weak<Inner>, stop: CancellationToken, wake: Arc<Notify>) {
    let mut subscribed = HashSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
        }
        let Some(backend) = upgrade(&weak) else {
            return;
        };
        backend.reconcile(&mut subscribed).await;
    }
}

/// Delivers what arrives on subscribed channels to local members.
async fn dispatcher(
    weak: Weak<Inner>,
    stop: CancellationToken,
    mut deliveries: mpsc::Receiver<Delivery>,
) {
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => return,
            delivery = deliveries.recv() => match delivery {
                Some(d) => d,
                None => return,
            },
        };
        let Some(backend) = upgrade(&weak) else {
            return;
        };
        backend.dispatch(delivery);
    }
}

/// Every [`MEMBERS_EVERY`], republishes each room's members.
async fn members_ticker(weak: Weak<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(MEMBERS_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(backend) = upgrade(&weak) else {
            return;
        };
        backend.members_tick().await;
    }
}

/// Queues a message for a member without waiting; a full queue marks it too slow.
fn deliver(member: &Member, message: Message, stats: &Stats) {
    match member.tx.try_send(message) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            if !member.too_slow.is_cancelled() {
                stats.slow_closed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(user = %member.user, "client too slow: closing it with 1008");
                member.too_slow.cancel();
            }
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Sends local clients the room's members when they changed.
fn refresh_members(room: &str, entry: &mut Room, stats: &Stats) {
    let mut all: BTreeSet<&str> = entry.members.values().map(|m| m.user.as_str()).collect();
    for (users, _) in entry.heard.values() {
        all.extend(users.iter().map(String::as_str));
    }
    let users: Vec<String> = all.into_iter().map(str::to_string).collect();
    if users == entry.shown {
        return;
    }
    let message = json(serde_json::json!({"type": "members", "room": room, "users": users}));
    for member in entry.members.values() {
        deliver(member, message.clone(), stats);
    }
    entry.shown = users;
}

/// Writes queued messages to the client; on overflow or shutdown, a close frame.
async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Message>,
    too_slow: CancellationToken,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let code = loop {
        let message = tokio::select! {
            biased;
            _ = too_slow.cancelled() => break Some(SLOW_CLIENT_CLOSE),
            _ = shutdown.cancelled() => break Some(1001),
            m = rx.recv() => match m {
                Some(m) => m,
                None => break None,
            },
        };
        tokio::select! {
            biased;
            _ = too_slow.cancelled() => break Some(SLOW_CLIENT_CLOSE),
            sent = sink.send(message) => if sent.is_err() { return },
        }
    };
    let reason = match code {
        Some(SLOW_CLIENT_CLOSE) => "too slow: message queue full",
        Some(_) => "backend shutting down",
        None => "",
    };
    let frame = code.map(|c| CloseFrame {
        code: CloseCode::from(c),
        reason: reason.into(),
    });
    let _ = tokio::time::timeout(CLOSE_WAIT, sink.send(Message::Close(frame))).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, sink.close()).await;
}

fn is_whoami(text: &str) -> bool {
    text.trim_start().starts_with('{')
        && serde_json::from_str::<serde_json::Value>(text)
            .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("whoami"))
}

fn valid(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= 64
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
