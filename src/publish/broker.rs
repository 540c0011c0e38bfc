//! Brokers: how a published batch reaches every instance.
//!
//! - memory: this process only (a single instance, development);
//! - redis: every instance publishes into one Redis pub/sub channel and listens on it; the instance that accepted
//!   the HTTP request does not deliver directly but, like every other, when the message comes back from Redis, so
//!   each target tab gets it exactly once whichever instance received the request. While Redis is unreachable
//!   publishing fails (503, never a silent drop) and the listener reconnects with backoff.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{deliver, Message};
use crate::app::App;
use crate::backoff::Backoff;
use crate::config::{BrokerConfig, BrokerKind};

/// Why a publish failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("the message broker (Redis) is unavailable: {0}")]
    Unavailable(String),
}

/// A batch on the wire between instances.
#[derive(Serialize, Deserialize)]
struct Wire {
    origin: String,
    messages: Vec<Message>,
}

pub enum Broker {
    Memory,
    Redis(Arc<RedisBroker>),
}

pub struct RedisBroker {
    /// None only if the URL, validated at start, still failed to open: publishing then always fails.
    client: Option<redis::Client>,
    config: BrokerConfig,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    listening: AtomicBool,
}

impl Broker {
    /// The broker the configuration names (validated: a redis URL parses).
    pub fn new(config: &BrokerConfig) -> Broker {
        if config.kind != BrokerKind::Redis {
            return Broker::Memory;
        }
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(
                |e| tracing::error!(error = %e, "broker.redis_url unusable; publishing will fail"),
            )
            .ok();
        Broker::Redis(Arc::new(RedisBroker {
            client,
            config: config.clone(),
            conn: tokio::sync::Mutex::new(None),
            listening: AtomicBool::new(false),
        }))
    }

    /// Starts the Redis listener (nothing for memory).
    pub fn start(&self, app: Weak<App>) {
        if let Broker::Redis(r) = self {
            tokio::spawn(r.clone().listen(app));
        }
    }

    /// `memory`, `up` or `down`.
    pub fn state(&self) -> &'static str {
        match self {
            Broker::Memory => "memory",
            Broker::Redis(r) if r.listening.load(Ordering::Acquire) => "up",
            Broker::Redis(_) => "down",
        }
    }

    /// Publishes a batch (delivered in order).
    pub async fn publish(&self, app: &Arc<App>, messages: Vec<Message>) -> Result<(), BrokerError> {
        match self {
            Broker::Memory => {
                deliver(app, &messages);
                Ok(())
            }
            Broker::Redis(r) => r.publish(&app.instance, messages).await,
        }
    }
}

impl RedisBroker {
    async fn publish(&self, origin: &str, messages: Vec<Message>) -> Result<(), BrokerError> {
        if !self.listening.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable(
                "not subscribed to the Redis channel (reconnecting)".into(),
            ));
        }
        let payload = serde_json::to_string(&Wire {
            origin: origin.to_owned(),
            messages,
        })
        .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| BrokerError::Unavailable("broker.redis_url unusable".into()))?;
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| BrokerError::Unavailable("connection timed out".into()))?
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
            *guard = Some(conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(BrokerError::Unavailable("no connection".into()));
        };
        let sent = tokio::time::timeout(
            timeout,
            redis::cmd("PUBLISH")
                .arg(&self.config.channel)
                .arg(payload)
                .query_async::<i64>(conn),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                *guard = None;
                Err(BrokerError::Unavailable(e.to_string()))
            }
            Err(_) => {
                *guard = None;
                Err(BrokerError::Unavailable("publish timed out".into()))
            }
        }
    }

    /// Listens on the channel and delivers what comes, reconnecting with backoff.
    async fn listen(self: Arc<Self>, app: Weak<App>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_initial_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        loop {
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(&self.config.channel).await {
                    Ok(()) => {
                        self.set_listening(&app, true);
                        backoff.reset();
                        tracing::info!(channel = %self.config.channel, "listening on Redis");
                        let mut stream = pubsub.into_on_message();
                        while let Some(msg) = stream.next().await {
                            let Some(app) = app.upgrade() else { return };
                            let Ok(payload) = msg.get_payload::<String>() else {
                                continue;
                            };
                            match serde_json::from_str::<Wire>(&payload) {
                                Ok(w) => deliver(&app, &w.messages),
                                Err(e) => {
                                    tracing::warn!(error = %e, "unreadable message on the broker channel")
                                }
                            }
                        }
                        self.set_listening(&app, false);
                        tracing::warn!("Redis subscription ended; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "Redis subscribe failed"),
                },
                Err(e) => tracing::warn!(error = %e, "Redis unreachable"),
            }
            if app.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(backoff.next_delay().max(Duration::from_millis(50))).await;
        }
    }

    fn set_listening(&self, app: &Weak<App>, up: bool) {
        self.listening.store(up, Ordering::Release);
        if let Some(app) = app.upgrade() {
            app.metrics.broker_up.set(i64::from(up));
        }
    }
}
