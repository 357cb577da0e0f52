//! The relay backends' pub/sub: Redis for backends in many processes, or an
//! in-memory hub for backends in one process, behind one trait.
//!
//! Messages on a channel arrive in the order they were published by one
//! publisher; a channel's messages reach only those subscribed when they are
//! published (Redis pub/sub keeps nothing: what is published while Redis is down or
//! before a subscription is lost).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

/// A message that arrived on a subscribed channel.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub channel: String,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
}

pub type BrokerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + 'a>>;

/// Pub/sub as the relay backend uses it. Deliveries go to the receiver returned
/// when the broker was made.
pub trait Broker: Send + Sync {
    fn publish<'a>(&'a self, channel: &'a str, payload: Bytes) -> BrokerFuture<'a>;
    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a>;
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a>;
    /// Whether messages can be relayed now.
    fn is_healthy(&self) -> bool;
}

/// A broker for one relay backend: Redis at `redis`, else one more on `hub` (in
/// memory, shared by the backends of this process).
pub async fn open(
    redis: Option<&str>,
    hub: &MemoryHub,
) -> Result<(Box<dyn Broker>, mpsc::Receiver<Delivery>), BrokerError> {
    Ok(match redis {
        Some(url) => {
            let (broker, deliveries) = RedisBroker::connect(url).await?;
            (Box::new(broker), deliveries)
        }
        None => {
            let (broker, deliveries) = hub.broker();
            (Box::new(broker), deliveries)
        }
    })
}

/// Deliveries queued for one backend before it drops them (it is not keeping up).
const DELIVERY_QUEUE: usize = 65_536;

/// Channel → the brokers subscribed to it (by id) and where their deliveries go.
type Subscribers = HashMap<String, Vec<(u64, mpsc::Sender<Delivery>)>>;

/// In-process pub/sub shared by the backends of one process (the demo, tests).
#[derive(Clone, Default)]
pub struct MemoryHub {
    subscribers: Arc<Mutex<Subscribers>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl MemoryHub {
    /// A broker for one more backend, and where its deliveries arrive.
    pub fn broker(&self) -> (MemoryBroker, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (
            MemoryBroker {
                hub: self.clone(),
                id,
                tx,
            },
            rx,
        )
    }
}

pub struct MemoryBroker {
    hub: MemoryHub,
    id: u64,
    tx: mpsc::Sender<Delivery>,
}

impl MemoryBroker {
    fn subscribers(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        // Every change under this lock is one insert or remove: a panic elsewhere
        // cannot leave it half done.
        self.hub
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(&'a self, channel: &'a str, payload: Bytes) -> BrokerFuture<'a> {
        let delivery = Delivery {
            channel: channel.to_string(),
            payload,
        };
        if let Some(subs) = self.subscribers().get(channel) {
            for (_, tx) in subs {
                if tx.try_send(delivery.clone()).is_err() {
                    tracing::warn!(channel, "a backend is not keeping up: delivery dropped");
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a> {
        let mut subs = self.subscribers();
        let list = subs.entry(channel.to_string()).or_default();
        if !list.iter().any(|(id, _)| *id == self.id) {
            list.push((self.id, self.tx.clone()));
        }
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a> {
        let mut subs = self.subscribers();
        if let Some(list) = subs.get_mut(channel) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                subs.remove(channel);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn is_healthy(&self) -> bool {
        true
    }
}

/// Redis pub/sub over one RESP3 connection managed by the redis crate, which
/// reconnects with backoff and subscribes again to every channel after a reconnect.
pub struct RedisBroker {
    conn: ConnectionManager,
    healthy: Arc<AtomicBool>,
    /// Channels subscribed, to subscribe again after a reconnect the manager did
    /// not notice (Redis restarted while idle).
    channels: Arc<Mutex<HashSet<String>>>,
}

/// Longest wait for one Redis command.
const CALL_TIME: Duration = Duration::from_secs(2);
/// How often an idle broker checks that Redis is there.
const PING_EVERY: Duration = Duration::from_millis(500);

impl RedisBroker {
    pub async fn connect(
        url: &str,
    ) -> Result<(RedisBroker, mpsc::Receiver<Delivery>), BrokerError> {
        let info = url.into_connection_info()?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let (push_tx, mut push_rx) = mpsc::unbounded_channel::<redis::PushInfo>();
        let config = ConnectionManagerConfig::new()
            .set_push_sender(push_tx)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(CALL_TIME))
            .set_response_timeout(Some(CALL_TIME))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
        tokio::spawn(async move {
            while let Some(push) = push_rx.recv().await {
                if push.kind != redis::PushKind::Message {
                    continue;
                }
                let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1)) else {
                    continue;
                };
                let (Ok(channel), Ok(payload)) = (
                    redis::from_redis_value_ref::<String>(channel),
                    redis::from_redis_value_ref::<Vec<u8>>(payload),
                ) else {
                    continue;
                };
                let delivery = Delivery {
                    channel,
                    payload: Bytes::from(payload),
                };
                if tx.send(delivery).await.is_err() {
                    return;
                }
            }
        });
        let broker = RedisBroker {
            conn,
            healthy: Arc::new(AtomicBool::new(false)),
            channels: Arc::default(),
        };
        broker.spawn_watchdog();
        Ok((broker, rx))
    }

    /// Pings Redis; marks the broker healthy or not, logging each change once.
    fn spawn_watchdog(&self) {
        let mut conn = self.conn.clone();
        let healthy = self.healthy.clone();
        let channels = self.channels.clone();
        tokio::spawn(async move {
            let mut was_down = false;
            loop {
                let ping = tokio::time::timeout(
                    CALL_TIME,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await;
                match ping {
                    Ok(Ok(_)) => {
                        if was_down {
                            // Subscriptions may have been lost with the old connection.
                            let list: Vec<String> = channels
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .iter()
                                .cloned()
                                .collect();
                            if !list.is_empty()
                                && let Err(e) = conn.subscribe(&list).await
                            {
                                tracing::warn!(error = %e, "resubscribing after the outage failed");
                                continue;
                            }
                            tracing::info!("redis reachable again: subscriptions restored");
                        }
                        was_down = false;
                        healthy.store(true, Ordering::Relaxed);
                    }
                    Ok(Err(_)) | Err(_) => {
                        if !was_down {
                            tracing::warn!(
                                "redis unavailable: messages are not relayed until it is back"
                            );
                        }
                        was_down = true;
                        healthy.store(false, Ordering::Relaxed);
                    }
                }
                if Arc::strong_count(&healthy) == 1 {
                    return;
                }
                tokio::time::sleep(PING_EVERY).await;
            }
        });
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn within<T>(f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, BrokerError> {
    match tokio::time::timeout(CALL_TIME, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(BrokerError::Timeout),
    }
}

impl Broker for RedisBroker {
    fn publish<'a>(&'a self, channel: &'a str, payload: Bytes) -> BrokerFuture<'a> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            within(
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload.as_ref())
                    .query_async::<i64>(&mut conn),
            )
            .await?;
            Ok(())
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a> {
        self.channels().insert(channel.to_string());
        let mut conn = self.conn.clone();
        Box::pin(async move { within(conn.subscribe(channel)).await })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a> {
        self.channels().remove(channel);
        let mut conn = self.conn.clone();
        Box::pin(async move { within(conn.unsubscribe(channel)).await })
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}
