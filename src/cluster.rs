//! Cluster state: what this instance shares with the others (its per-backend
//! connection counts, its presence table, join/leave events) and what it learns
//! from them (their counts, summed per backend, for the balancer).
//!
//! The [`Store`] trait has two implementations: [`RedisStore`], shared by every
//! instance with the same cluster name, and [`MemoryStore`], a single instance
//! with nothing to share. One task ([`Cluster::run`]) talks to the store; nothing on
//! the upgrade path ever waits for it. Counts are gauges under per-instance keys with
//! a TTL of three heartbeats, never shared INCR/DECR counters: a dead instance's
//! share expires on its own.
//!
//! Redis keys, for a cluster named `NAME` and an instance `ID`:
//!
//! | key | type | TTL | holds |
//! |---|---|---|---|
//! | `NAME:instances` | sorted set | none | instance ids, scored by last heartbeat (ms); dead ones are removed by the others |
//! | `NAME:instance:ID:alive` | string | 3 heartbeats | while the instance lives, the version of its `conns` hash (see [`Known`]) |
//! | `NAME:instance:ID:conns` | hash | 3 heartbeats | `POOL/BACKEND` → connections this instance holds |
//! | `NAME:instance:ID:presence` | hash | 3 heartbeats | user → JSON array of [`PresenceEntry`] |
//! | `NAME:presence` | pub/sub channel | | [`crate::presence::PresenceEvent`] JSON, one per join or leave |

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::broadcast;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::ClusterConfig;
use crate::presence::{Presence, PresenceEntry, PresenceEvent, now_ms};
use crate::state::State;

/// Longest wait for one Redis call; Redis slower than this counts as down.
const MAX_CALL_TIME: Duration = Duration::from_secs(2);
/// First pause before trying Redis again after a failure; doubles up to half a
/// heartbeat.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("a presence record in redis is not valid JSON")]
    Json(#[from] serde_json::Error),
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ClusterError>> + Send + 'a>>;

/// What one publish writes: this instance's state (all of it when `full`, else
/// what changed) and the events since the last one.
#[derive(Debug, Default)]
pub struct Update {
    /// Replace everything this instance had published (after a reconnect, or
    /// when backends came or went).
    pub full: bool,
    /// How long the keys live: three heartbeats.
    pub ttl: Duration,
    /// `POOL/BACKEND` → connections: every backend, whenever any count changed.
    pub counts: Vec<(String, u64)>,
    /// The version of the counts the hash holds once this is written: those
    /// written now, or, when `counts` is empty, the same ones as before.
    pub version: u64,
    /// User → entries; an empty list removes the user.
    pub presence: Vec<(String, Vec<PresenceEntry>)>,
    pub events: Vec<PresenceEvent>,
}

/// What a heartbeat reads of the live instances.
#[derive(Debug, Default)]
pub struct Remote {
    /// Each other live instance's counts and their version, read together.
    pub counts: HashMap<String, Held>,
    /// Live instances, this one included.
    pub instances: usize,
    /// The other live instances' ids.
    pub others: Vec<String>,
    /// Every live instance (this one included) and its last heartbeat, in ms
    /// since the Unix epoch.
    pub members: Vec<(String, u64)>,
}

/// Called with each change another instance announces.
pub type OnChange<'a> = &'a (dyn Fn(Announce) + Send + Sync);

/// A change of counts as announced on `NAME:counts`:
/// `{"i":"edge-1","t":1764400000000,"v":12,"c":[["chat/10.0.0.1:9000",37]],"r":9}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Announce {
    /// The instance.
    pub i: String,
    /// When it was sent, in ms since the Unix epoch.
    #[serde(default)]
    pub t: u64,
    /// The version of the counts it was taken from (0: an instance that does
    /// not number them).
    #[serde(default)]
    pub v: u64,
    /// `POOL/BACKEND` → its connections now.
    pub c: Vec<(String, u64)>,
    /// Its picks in the `balancer::BURST_LEAD_MS` before `t`: how far into a
    /// burst it was (absent from a version that did not send it: then it is
    /// assumed to mirror every pick, as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<u64>,
}

/// Where cluster state lives.
pub trait Store: Send + Sync {
    /// Checks that the store answers; called after start-up and after any
    /// failure, before everything is published again.
    fn connect(&self) -> StoreFuture<'_, ()>;
    /// Writes this instance's state and refreshes its keys' TTL. `false` when
    /// its keys had expired before this write (it went three heartbeats without
    /// one and the others took it for dead): what this write did not rewrite is
    /// missing until everything is published again.
    fn publish<'a>(&'a self, update: &'a Update) -> StoreFuture<'a, bool>;
    /// Reads the other live instances' counts.
    fn remote(&self) -> StoreFuture<'_, Remote>;
    /// Every live instance's entries for `user`.
    fn lookup<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<PresenceEntry>>;
    /// Removes this instance's state (clean shutdown).
    fn leave(&self) -> StoreFuture<'_, ()>;
    /// Instance → user → connections, for every live instance.
    fn presence_totals(&self) -> StoreFuture<'_, PresenceTotals>;
    /// Announces this instance's counts that just changed, for the others to
    /// apply before the next heartbeat.
    fn announce<'a>(
        &'a self,
        counts: &'a [(String, u64)],
        version: u64,
        recent: u64,
    ) -> StoreFuture<'a, ()>;
    /// Follows the others' announcements until `stop`, reconnecting as needed.
    fn follow<'a>(&'a self, on: OnChange<'a>, stop: &'a CancellationToken) -> StoreFuture<'a, ()>;
}

/// Instance → user → connections.
pub type PresenceTotals = HashMap<String, HashMap<String, usize>>;

/// One instance alone: its own table is the whole picture.
pub struct MemoryStore {
    presence: Arc<Presence>,
    instance: String,
}

impl Store for MemoryStore {
    fn connect(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(&'a self, _update: &'a Update) -> StoreFuture<'a, bool> {
        Box::pin(async { Ok(true) })
    }

    fn remote(&self) -> StoreFuture<'_, Remote> {
        Box::pin(async {
            Ok(Remote {
                counts: HashMap::new(),
                instances: 1,
                others: Vec::new(),
                members: vec![(self.instance.clone(), now_ms())],
            })
        })
    }

    fn announce<'a>(
        &'a self,
        _counts: &'a [(String, u64)],
        _version: u64,
        _recent: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn follow<'a>(
        &'a self,
        _on: OnChange<'a>,
        _stop: &'a CancellationToken,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn lookup<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<PresenceEntry>> {
        Box::pin(async move { Ok(self.presence.local(user)) })
    }

    fn leave(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn presence_totals(&self) -> StoreFuture<'_, PresenceTotals> {
        Box::pin(async move {
            let users = self.presence.per_user();
            let mut totals = PresenceTotals::new();
            if !users.is_empty() {
                totals.insert(self.instance.clone(), users.into_iter().collect());
            }
            Ok(totals)
        })
    }
}

/// Key names of one instance in one cluster.
#[derive(Debug, Clone)]
struct Keys {
    instances: String,
    channel: String,
    /// Where instances announce count changes.
    counts: String,
    prefix: String,
}

impl Keys {
    fn new(cluster: &str) -> Keys {
        Keys {
            instances: format!("{cluster}:instances"),
            channel: format!("{cluster}:presence"),
            counts: format!("{cluster}:counts"),
            prefix: format!("{cluster}:instance:"),
        }
    }
    fn alive(&self, id: &str) -> String {
        format!("{}{id}:alive", self.prefix)
    }
    fn conns(&self, id: &str) -> String {
        format!("{}{id}:conns", self.prefix)
    }
    fn presence(&self, id: &str) -> String {
        format!("{}{id}:presence", self.prefix)
    }
}

/// Cluster state in Redis, through one multiplexed connection that the redis
/// crate's `ConnectionManager` re-establishes (with its own backoff) when it drops.
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
    instance: String,
    call_time: Duration,
}

impl RedisStore {
    /// A store for `url`; connects on first use, never blocks here.
    pub fn new(
        url: &str,
        config: &ClusterConfig,
        instance: &str,
    ) -> Result<RedisStore, ClusterError> {
        let call_time = config.heartbeat.min(MAX_CALL_TIME);
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(call_time))
            .set_response_timeout(Some(call_time))
            .set_max_delay(config.heartbeat / 2);
        let client = redis::Client::open(url)?;
        Ok(RedisStore {
            conn: ConnectionManager::new_lazy_with_config(client.clone(), manager)?,
            client,
            keys: Keys::new(&config.name),
            instance: instance.to_string(),
            call_time,
        })
    }

    /// Runs a pipeline within the call time limit.
    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, ClusterError> {
        let mut conn = self.conn.clone();
        match timeout(self.call_time, pipe.query_async(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClusterError::Timeout(self.call_time)),
        }
    }

    async fn live_instances(&self) -> Result<Vec<String>, ClusterError> {
        Ok(self
            .instances_seen()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Instance ids with their last heartbeat (ms since the epoch).
    async fn instances_seen(&self) -> Result<Vec<(String, u64)>, ClusterError> {
        let mut pipe = redis::pipe();
        pipe.zrange_withscores(&self.keys.instances, 0, -1);
        let (seen,): (Vec<(String, f64)>,) = self.query(&pipe).await?;
        Ok(seen.into_iter().map(|(id, at)| (id, at as u64)).collect())
    }
}

impl Store for RedisStore {
    fn connect(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("PING");
            self.query::<(String,)>(&pipe).await.map(|_| ())
        })
    }

    fn publish<'a>(&'a self, update: &'a Update) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let id = &self.instance;
            let (conns, presence) = (self.keys.conns(id), self.keys.presence(id));
            let ttl = update.ttl.as_millis() as i64;
            let mut pipe = redis::pipe();
            pipe.atomic();
            // The alive key shares the others' TTL: gone means they are gone too.
            pipe.exists(self.keys.alive(id));
            if update.full {
                pipe.del(&conns).ignore().del(&presence).ignore();
            }
            if !update.counts.is_empty() {
                pipe.hset_multiple(&conns, &update.counts).ignore();
            }
            for (user, entries) in &update.presence {
                if entries.is_empty() {
                    pipe.hdel(&presence, user).ignore();
                } else {
                    pipe.hset(&presence, user, serde_json::to_string(entries)?)
                        .ignore();
                }
            }
            pipe.pexpire(&conns, ttl).ignore();
            pipe.pexpire(&presence, ttl).ignore();
            pipe.set_options(
                self.keys.alive(id),
                update.version.max(1),
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl as u64)),
            )
            .ignore();
            pipe.zadd(&self.keys.instances, id, now_ms()).ignore();
            for event in &update.events {
                pipe.publish(&self.keys.channel, serde_json::to_string(event)?)
                    .ignore();
            }
            self.query::<(bool,)>(&pipe).await.map(|(kept,)| kept)
        })
    }

    fn remote(&self) -> StoreFuture<'_, Remote> {
        Box::pin(async move {
            let seen = self.instances_seen().await?;
            let ids: Vec<&String> = seen.iter().map(|(id, _)| id).collect();
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.get(self.keys.alive(id));
                pipe.hgetall(self.keys.conns(id));
            }
            let replies: Vec<redis::Value> = self.query(&pipe).await?;
            let mut remote = Remote::default();
            let mut dead = Vec::new();
            for ((id, at), pair) in seen.iter().zip(replies.chunks(2)) {
                let [alive, counts] = pair else { continue };
                // Its counts' version (`1` from an instance that does not
                // number them); none once it expired.
                let alive: Option<String> = redis::from_redis_value_ref(alive).unwrap_or(None);
                let Some(version) = alive else {
                    dead.push(id.clone());
                    continue;
                };
                remote.instances += 1;
                remote.members.push((id.clone(), *at));
                if *id == self.instance {
                    continue;
                }
                remote.others.push(id.clone());
                let counts: HashMap<String, u64> =
                    redis::from_redis_value_ref(counts).unwrap_or_default();
                let version = version.parse().unwrap_or(0);
                remote.counts.insert(id.clone(), Held { version, counts });
            }
            if !dead.is_empty() {
                let mut pipe = redis::pipe();
                pipe.zrem(&self.keys.instances, &dead).ignore();
                self.query::<()>(&pipe).await?;
            }
            Ok(remote)
        })
    }

    fn lookup<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<PresenceEntry>> {
        Box::pin(async move {
            let ids = self.live_instances().await?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hget(self.keys.presence(id), user);
            }
            let found: Vec<Option<String>> = self.query(&pipe).await?;
            let mut entries = Vec::new();
            for json in found.into_iter().flatten() {
                entries.extend(serde_json::from_str::<Vec<PresenceEntry>>(&json)?);
            }
            Ok(entries)
        })
    }

    fn presence_totals(&self) -> StoreFuture<'_, PresenceTotals> {
        Box::pin(async move {
            let ids = self.live_instances().await?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(self.keys.presence(id));
            }
            let hashes: Vec<HashMap<String, String>> = self.query(&pipe).await?;
            let mut totals = PresenceTotals::new();
            for (id, hash) in ids.into_iter().zip(hashes) {
                if hash.is_empty() {
                    continue;
                }
                let mut users = HashMap::new();
                for (user, json) in hash {
                    let entries: Vec<PresenceEntry> = serde_json::from_str(&json)?;
                    users.insert(user, entries.len());
                }
                totals.insert(id, users);
            }
            Ok(totals)
        })
    }

    fn announce<'a>(
        &'a self,
        counts: &'a [(String, u64)],
        version: u64,
        recent: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let announce = Announce {
                i: self.instance.clone(),
                t: now_ms(),
                v: version,
                c: counts.to_vec(),
                r: Some(recent),
            };
            let mut pipe = redis::pipe();
            pipe.publish(&self.keys.counts, serde_json::to_string(&announce)?)
                .ignore();
            self.query::<()>(&pipe).await
        })
    }

    fn follow<'a>(&'a self, on: OnChange<'a>, stop: &'a CancellationToken) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            use futures_util::StreamExt;
            let mut backoff = Backoff::new(FIRST_BACKOFF, Duration::from_secs(1));
            loop {
                let connecting = timeout(self.call_time, self.client.get_async_pubsub());
                if let Ok(Ok(mut pubsub)) = connecting.await
                    && pubsub.subscribe(&self.keys.counts).await.is_ok()
                {
                    backoff.reset();
                    let mut messages = pubsub.on_message();
                    loop {
                        let message = tokio::select! {
                            _ = stop.cancelled() => return Ok(()),
                            message = messages.next() => message,
                        };
                        // None: the connection dropped; connect again.
                        let Some(message) = message else { break };
                        let Ok(payload) = message.get_payload::<String>() else {
                            continue;
                        };
                        match serde_json::from_str::<Announce>(&payload) {
                            Ok(a) if a.i != self.instance => on(a),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "an unreadable count announcement")
                            }
                        }
                    }
                }
                if !backoff.pause(stop).await {
                    return Ok(());
                }
            }
        })
    }

    fn leave(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let id = &self.instance;
            let mut pipe = redis::pipe();
            pipe.del(&[
                self.keys.alive(id),
                self.keys.conns(id),
                self.keys.presence(id),
            ])
            .ignore()
            .zrem(&self.keys.instances, id)
            .ignore();
            self.query::<()>(&pipe).await
        })
    }
}

/// This instance's view of the cluster.
pub struct Cluster {
    /// As at start: `redis`, `name` and `instance_id` need a restart to change.
    config: ClusterConfig,
    instance: String,
    /// Applied live by a reload, in ms.
    heartbeat_ms: AtomicU64,
    presence: Arc<Presence>,
    store: Box<dyn Store>,
    events: broadcast::Sender<PresenceEvent>,
    /// Whether the store is reachable now (always, in memory).
    up: AtomicBool,
    /// Live instances at the last heartbeat, this one included.
    instances: AtomicUsize,
    /// The other instances' counts: read at each heartbeat, updated between
    /// heartbeats by their announcements.
    others: std::sync::Mutex<Known>,
    /// The version of this instance's last counts snapshot (see [`Known`]).
    version: std::sync::Mutex<u64>,
    /// Another instance announced a change: tell the others that nothing changed
    /// here (an empty announcement), so they stop assuming this one mirrored it.
    ack_due: AtomicBool,
    /// Live instances and their last heartbeats, as read at the last heartbeat.
    members: std::sync::Mutex<Vec<(String, u64)>>,
}

/// Acknowledgements (empty announcements) go out at most this often.
const ACK_EVERY: Duration = Duration::from_millis(5);

impl Cluster {
    pub fn new(config: &ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        let instance = config
            .instance_id
            .clone()
            .unwrap_or_else(ClusterConfig::generated_instance_id);
        let presence = Arc::new(Presence::default());
        let instance_for_members = instance.clone();
        let (events, _) = broadcast::channel(1024);
        let store: Box<dyn Store> = match &config.redis {
            Some(url) => {
                // rediss:// needs a process-wide rustls provider; a second install
                // (another Gateway in the same process) is refused and harmless.
                let _ = rustls::crypto::ring::default_provider().install_default();
                Box::new(RedisStore::new(url, config, &instance)?)
            }
            None => Box::new(MemoryStore {
                presence: presence.clone(),
                instance: instance.clone(),
            }),
        };
        Ok(Arc::new(Cluster {
            config: config.clone(),
            instance,
            heartbeat_ms: AtomicU64::new(config.heartbeat.as_millis() as u64),
            presence,
            store,
            events,
            up: AtomicBool::new(config.redis.is_none()),
            others: std::sync::Mutex::default(),
            // From the clock: an instance restarted under the same id (its keys
            // still there) starts above every version it published before, as
            // long as it never made a thousand snapshots a millisecond.
            version: std::sync::Mutex::new(now_ms().saturating_mul(1000)),
            ack_due: AtomicBool::new(false),
            instances: AtomicUsize::new(1),
            members: std::sync::Mutex::new(vec![(instance_for_members, now_ms())]),
        }))
    }

    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed))
    }

    /// Applies what can change live (`heartbeat`); returns the keys that changed
    /// but take effect only at the next start.
    pub fn apply(&self, config: &ClusterConfig) -> Vec<&'static str> {
        self.heartbeat_ms
            .store(config.heartbeat.as_millis() as u64, Ordering::Relaxed);
        let mut restart = Vec::new();
        if config.redis != self.config.redis {
            restart.push("cluster.redis");
        }
        if config.name != self.config.name {
            restart.push("cluster.name");
        }
        if config.instance_id.is_some()
            && config.instance_id.as_deref() != Some(self.instance.as_str())
        {
            restart.push("cluster.instance_id");
        }
        restart
    }

    pub fn presence(&self) -> &Arc<Presence> {
        &self.presence
    }

    /// Whether the shared store is reachable (always true in memory).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn instances(&self) -> usize {
        self.instances.load(Ordering::Relaxed)
    }

    /// Live instances (this one included) with their last heartbeat, in ms since
    /// the Unix epoch, as of the last heartbeat; only this one while the store is
    /// unreachable.
    pub fn members(&self) -> Vec<(String, u64)> {
        if !self.is_up() {
            return vec![(self.instance.clone(), now_ms())];
        }
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Join/leave events of this instance, for in-process listeners, as they are
    /// published (with Redis, every instance's are on the `NAME:presence` channel).
    pub fn subscribe(&self) -> broadcast::Receiver<PresenceEvent> {
        self.events.subscribe()
    }

    /// Every connection of `user` on any live instance: O(instances) Redis
    /// commands in one round trip after reading the instance list.
    pub async fn lookup(&self, user: &str) -> Result<Vec<PresenceEntry>, ClusterError> {
        self.store.lookup(user).await
    }

    /// Instance → user → connections across the cluster.
    pub async fn presence_totals(&self) -> Result<PresenceTotals, ClusterError> {
        self.store.presence_totals().await
    }

    /// Every quarter heartbeat, publishes what changed (counts, presence, events) in
    /// one pipeline: a batch, however many connections came and went. Keeps this
    /// instance's state published and the others' counts read until
    /// `stop`, then publishes what is left (the last leaves) and removes its keys.
    /// Redis failures never end it: it logs the outage once, balances on local
    /// counts, reconnects with backoff and republishes everything when back.
    pub async fn run(self: Arc<Self>, state: Arc<State>, stop: CancellationToken) {
        let live = async {
            if self.config.redis.is_some() {
                tokio::join!(self.announce(&state, &stop), self.follow(&state, &stop));
            }
        };
        tokio::join!(self.sync(&state, &stop), live);
    }

    /// Publishes this instance's changed counts on the counts channel as they
    /// change (the upgrade path only raises a flag; this task sends), so that the
    /// others see a burst while it happens, not a heartbeat later.
    async fn announce(&self, state: &State, stop: &CancellationToken) {
        let changed = state.counts_changed().clone();
        let mut announced: HashMap<String, u64> = HashMap::new();
        let mut acked = Instant::now();
        loop {
            // Created before the look, so a change during it wakes the next.
            let next = changed.notified();
            tokio::pin!(next);
            next.as_mut().enable();
            if changed.take() {
                let (version, counts) = self.snapshot(state);
                let moved: Vec<(String, u64)> = counts
                    .iter()
                    .filter(|(k, v)| announced.get(*k) != Some(v))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                let ack = self.ack_due.load(Ordering::Relaxed) && acked.elapsed() >= ACK_EVERY;
                if (!moved.is_empty() || ack)
                    && self
                        .store
                        .announce(&moved, version, state.peers().recent_picks())
                        .await
                        .is_ok()
                {
                    announced = counts;
                    self.ack_due.store(false, Ordering::Relaxed);
                    acked = Instant::now();
                } else if self.ack_due.load(Ordering::Relaxed) {
                    // Not yet time for the acknowledgement: look again shortly.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(ACK_EVERY) => changed.touch(),
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = next => {}
                // After an outage, announce everything again.
                _ = tokio::time::sleep(self.heartbeat() * 3) => announced.clear(),
            }
        }
    }

    /// Applies the other instances' announcements as they arrive.
    async fn follow(&self, state: &State, stop: &CancellationToken) {
        let on = |announce: Announce| {
            state.peers().heard(&announce.i, announce.t, announce.r);
            if !announce.c.is_empty() {
                // Acknowledge a change with one of ours (perhaps empty).
                self.ack_due.store(true, Ordering::Relaxed);
                state.counts_changed().touch();
            }
            let mut others = self.others.lock().unwrap_or_else(|e| e.into_inner());
            others.announced(announce.i, announce.v, announce.c);
            apply_remote(state, &others.sum());
        };
        if let Err(e) = self.store.follow(&on, stop).await {
            tracing::warn!(error = %crate::Chain(&e), "count announcements: not followed");
        }
    }

    async fn sync(&self, state: &State, stop: &CancellationToken) {
        let flush_every = |heartbeat: Duration| (heartbeat / 4).max(Duration::from_millis(10));
        let mut heartbeat = self.heartbeat();
        let mut flush = tokio::time::interval(flush_every(heartbeat));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sync = SyncState {
            connected: false,
            outage_logged: false,
            retry_at: Instant::now(),
            backoff: Backoff::new(FIRST_BACKOFF, heartbeat / 2),
            next_heartbeat: Instant::now(),
            published: HashMap::new(),
            full: true,
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = flush.tick() => {}
            }
            if self.heartbeat() != heartbeat {
                // A reload changed it: flush at the new pace from now on.
                heartbeat = self.heartbeat();
                flush = tokio::time::interval(flush_every(heartbeat));
                flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                sync.next_heartbeat = sync.next_heartbeat.min(Instant::now() + heartbeat);
            }
            self.step(state, &mut sync).await;
            if sync.connected && sync.full {
                // The step found this instance's keys expired: write them all now.
                self.step(state, &mut sync).await;
            }
        }
        if sync.connected {
            sync.next_heartbeat = Instant::now() + heartbeat;
            self.step(state, &mut sync).await;
            if let Err(e) = self.store.leave().await {
                tracing::warn!(error = %e, "could not remove this instance's keys; they expire on their own");
            }
        }
    }

    async fn step(&self, state: &State, sync: &mut SyncState) {
        let now = Instant::now();
        if !sync.connected {
            if now < sync.retry_at {
                return;
            }
            match self.store.connect().await {
                Ok(()) => {
                    sync.connected = true;
                    sync.full = true;
                    sync.backoff.reset();
                    sync.next_heartbeat = now;
                    if sync.outage_logged {
                        tracing::info!("redis reachable again: republishing this instance's state");
                        sync.outage_logged = false;
                    }
                }
                Err(e) => return self.failed(state, sync, e),
            }
        }
        let (version, counts) = self.snapshot(state);
        // Backends came or went: replace the whole hash, so none lingers.
        if !same_keys(&counts, &sync.published) {
            sync.full = true;
        }
        let heartbeat_due = now >= sync.next_heartbeat;
        let changes = self.presence.take_changes();
        if changes.resync {
            sync.full = true;
        }
        let update = if sync.full {
            // The table's changes are covered by the snapshot; events still go out.
            Update {
                full: true,
                ttl: self.heartbeat() * 3,
                counts: counts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                version,
                presence: self.presence.snapshot(),
                events: changes.events,
            }
        } else {
            let counts_changed = counts != sync.published;
            if !heartbeat_due && !counts_changed && changes.is_empty() {
                return;
            }
            Update {
                full: false,
                ttl: self.heartbeat() * 3,
                counts: if counts_changed {
                    counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
                } else {
                    Vec::new()
                },
                // Unchanged counts are this snapshot's too.
                version,
                presence: changes.users,
                events: changes.events,
            }
        };
        for event in &update.events {
            // Having no in-process subscriber is normal.
            let _ = self.events.send(event.clone());
        }
        let kept = match self.store.publish(&update).await {
            Ok(kept) => kept,
            Err(e) => return self.failed(state, sync, e),
        };
        sync.published = counts;
        // Keys that expired while this instance lived (a stall of three
        // heartbeats): the next step, straight after this one, writes everything.
        sync.full = !kept && !update.full;
        if sync.full {
            tracing::warn!(
                "this instance's keys in redis had expired (no write for three heartbeats): publishing everything again"
            );
        }
        self.up.store(true, Ordering::Relaxed);
        if heartbeat_due {
            sync.next_heartbeat = now + self.heartbeat();
            match self.store.remote().await {
                Ok(remote) => {
                    let mut others = self.others.lock().unwrap_or_else(|e| e.into_inner());
                    others.read(remote.counts);
                    apply_remote(state, &others.sum());
                    self.instances
                        .store(remote.instances.max(1), Ordering::Relaxed);
                    state.peers().set_live(&remote.others);
                    *self.members.lock().unwrap_or_else(|e| e.into_inner()) = remote.members;
                }
                Err(e) => self.failed(state, sync, e),
            }
        }
    }

    /// Redis went away: balance on local counts alone until it is back.
    fn failed(&self, state: &State, sync: &mut SyncState, error: ClusterError) {
        if !sync.outage_logged {
            tracing::warn!(%error, "redis unavailable: balancing on this instance's counts until it is back");
            sync.outage_logged = true;
        }
        sync.connected = false;
        self.up.store(false, Ordering::Relaxed);
        self.instances.store(1, Ordering::Relaxed);
        state.peers().set_live(&[]);
        *self.others.lock().unwrap_or_else(|e| e.into_inner()) = Known::default();
        apply_remote(state, &HashMap::new());
        sync.retry_at = Instant::now() + sync.backoff.next_pause();
    }
}

/// The sync loop's own state.
struct SyncState {
    connected: bool,
    outage_logged: bool,
    retry_at: Instant,
    backoff: Backoff,
    next_heartbeat: Instant,
    /// Counts as last written.
    published: HashMap<String, u64>,
    /// Write everything on the next step.
    full: bool,
}

/// Whether two maps have the same keys (their iteration orders may differ).
fn same_keys(a: &HashMap<String, u64>, b: &HashMap<String, u64>) -> bool {
    a.len() == b.len() && a.keys().all(|k| b.contains_key(k))
}

/// The field a backend's count is published under.
pub fn count_field(pool: &str, backend: &str) -> String {
    format!("{pool}/{backend}")
}

/// The other instances' counts as this one knows them, and each one's version.
///
/// An instance publishes its counts two ways: the `conns` hash, written every
/// quarter heartbeat when they changed, and an announcement the moment they
/// change. So the hash can be older than the announcements already applied here,
/// and a heartbeat's read of it would put back counts that moved since (a backend
/// seen at 3 for a moment after its last tunnel closed). Each snapshot of an
/// instance's counts is numbered (the hash's version is its `alive` key, written
/// in the same transaction); what is known here only ever moves forward.
#[derive(Debug, Default)]
pub struct Known {
    /// Instance → what is known of its counts.
    pub instances: HashMap<String, Held>,
}

/// One instance's counts as known here, and their version.
#[derive(Debug, Default)]
pub struct Held {
    pub version: u64,
    /// `POOL/BACKEND` → connections.
    pub counts: HashMap<String, u64>,
}

impl Known {
    /// A heartbeat's read: every live instance's hash. An instance's hash
    /// replaces what is known of it unless an announcement applied here is
    /// newer; instances not read (dead) are forgotten.
    pub fn read(&mut self, read: HashMap<String, Held>) {
        let mut before = std::mem::take(&mut self.instances);
        for (id, fresh) in read {
            let held = match before.remove(&id) {
                Some(held) if held.version > fresh.version => held,
                _ => fresh,
            };
            self.instances.insert(id, held);
        }
    }

    /// An instance's announcement of counts that changed, taken from its
    /// snapshot `version` (0: not numbered, always applied); one older than
    /// what is known of it is in what was read already.
    pub fn announced(&mut self, id: String, version: u64, changed: Vec<(String, u64)>) {
        let held = self.instances.entry(id).or_default();
        if version != 0 {
            if version <= held.version {
                return;
            }
            held.version = version;
        }
        held.counts.extend(changed);
    }

    /// The other instances' counts, summed per `POOL/BACKEND`.
    fn sum(&self) -> HashMap<String, u64> {
        let mut total: HashMap<String, u64> = HashMap::new();
        for held in self.instances.values() {
            for (field, n) in &held.counts {
                *total.entry(field.clone()).or_default() += n;
            }
        }
        total
    }
}

impl Cluster {
    /// This instance's counts and their version: numbered under one lock, so
    /// that a higher version never holds older counts (the announcing task and
    /// the sync task each take them).
    fn snapshot(&self, state: &State) -> (u64, HashMap<String, u64>) {
        let mut version = self.version.lock().unwrap_or_else(|e| e.into_inner());
        *version += 1;
        (*version, local_counts(state))
    }
}

fn local_counts(state: &State) -> HashMap<String, u64> {
    let snapshot = state.load();
    let mut counts = HashMap::new();
    for pool in snapshot.pools.values() {
        for backend in &pool.backends {
            counts.insert(
                count_field(&pool.name, &backend.addr.to_string()),
                backend.active(),
            );
        }
    }
    counts
}

fn apply_remote(state: &State, remote: &HashMap<String, u64>) {
    let snapshot = state.load();
    for pool in snapshot.pools.values() {
        for backend in &pool.backends {
            let field = count_field(&pool.name, &backend.addr.to_string());
            backend.set_remote(remote.get(&field).copied().unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn read(known: &mut Known, id: &str, version: u64, pairs: &[(&str, u64)]) {
        let held = Held {
            version,
            counts: counts(pairs),
        };
        known.read(HashMap::from([(id.to_string(), held)]));
    }

    /// A hash written before the announcements already applied does not put
    /// back the counts they moved: the backend seen at 3 after its last tunnel
    /// closed.
    #[test]
    fn a_hash_older_than_an_announcement_does_not_put_back_its_counts() {
        let mut known = Known::default();
        read(&mut known, "a", 10, &[("p/b0", 3), ("p/b1", 20)]);
        known.announced("a".into(), 12, vec![("p/b0".into(), 0)]);
        assert_eq!(
            known.instances["a"].counts,
            counts(&[("p/b0", 0), ("p/b1", 20)])
        );
        // The next heartbeat reads the hash before the instance rewrote it.
        read(&mut known, "a", 10, &[("p/b0", 3), ("p/b1", 20)]);
        assert_eq!(
            known.instances["a"].counts,
            counts(&[("p/b0", 0), ("p/b1", 20)])
        );
        // Rewritten since: it replaces what is known.
        read(&mut known, "a", 13, &[("p/b0", 1), ("p/b1", 20)]);
        assert_eq!(
            known.instances["a"].counts,
            counts(&[("p/b0", 1), ("p/b1", 20)])
        );
    }

    /// An announcement older than the hash read is in it already.
    #[test]
    fn an_announcement_older_than_the_hash_read_is_ignored() {
        let mut known = Known::default();
        read(&mut known, "a", 20, &[("p/b0", 5)]);
        known.announced("a".into(), 19, vec![("p/b0".into(), 7)]);
        assert_eq!(known.instances["a"].counts, counts(&[("p/b0", 5)]));
        known.announced("a".into(), 21, vec![("p/b0".into(), 6)]);
        assert_eq!(known.instances["a"].counts, counts(&[("p/b0", 6)]));
    }

    /// Instances that do not number their counts (version 0 in announcements,
    /// `1` in `alive`) are applied as they come, as before; instances not read
    /// at a heartbeat (dead) are forgotten.
    #[test]
    fn unnumbered_counts_apply_as_they_come_and_dead_instances_are_forgotten() {
        let mut known = Known::default();
        read(&mut known, "old", 1, &[("p/b0", 4)]);
        known.announced("old".into(), 0, vec![("p/b0".into(), 2)]);
        assert_eq!(known.instances["old"].counts, counts(&[("p/b0", 2)]));
        read(&mut known, "old", 1, &[("p/b0", 3)]);
        assert_eq!(known.instances["old"].counts, counts(&[("p/b0", 3)]));
        read(&mut known, "other", 5, &[("p/b0", 1)]);
        assert!(!known.instances.contains_key("old"));
    }
}
