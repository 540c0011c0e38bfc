//! Brokers: how a published batch reaches every instance.
//!
//! - memory: this process only (a single instance, development);
//! - redis: every instance publishes into one Redis pub/sub channel and listens on it; the instance that accepted
//!   the HTTP request does not deliver directly but, like every other, when the message comes back from Redis, so
//!   each target tab gets it exactly once whichever instance received the request. While Redis is unreachable
//!   publishing fails (503, never a silent drop) and the listener reconnects with backoff.
//!
//! Webhook events go the same way ([`Broker::publish_hook`]) with one id per project assigned once by the history
//! ([`crate::history`]): in process with the memory broker; in Redis, by one script that also publishes the event
//! on the broker channel (as `H<id> <event>`), so every instance receives each project's events in id order.
//!
//! Channel messages (`target.topic`) go the same way with Redis: a batch with any is published by one script
//! ([`crate::history::APPEND_CHANNELS`]) that gives each its channel's next id (the same on every instance) and keeps
//! it in the channel's stream, so that `lastEventId` resumes on any instance; the batch travels as
//! `P<ids> <batch>`. With the memory broker, a channel message keeps the id the accepting instance gave it, and
//! the channel's in-process buffer ([`crate::channels`]) is its history.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{BrokerConfig, BrokerKind};
use crate::history::{parse_published, DeliveryKey, History, HookEvent, Stored};
use crate::metrics::Metrics;
use crate::publish::message::{Message, Target};

/// What an instance does with a batch that reaches it (centrifuge's `BrokerEventHandler` shape): the app registers
/// one, so the broker knows nothing of hubs and sessions.
pub trait BatchHandler: Send + Sync + 'static {
    fn deliver(&self, messages: &[Message]);
    /// A webhook event, with its id, to this instance's tabs.
    fn deliver_hook(&self, event: &Stored);
}

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
    /// This process only: a publish is delivered at once.
    Memory {
        handler: Arc<dyn BatchHandler>,
        history: Arc<History>,
    },
    Redis(Arc<RedisBroker>),
}

pub struct RedisBroker {
    /// None only if the URL, validated at start, still failed to open: publishing then always fails.
    client: Option<redis::Client>,
    config: BrokerConfig,
    /// The publishing connection. Multiplexed: each publish clones it out of the mutex and sends without holding
    /// the lock, so publishes pipeline instead of waiting for each other's round trips.
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Serialises (re)connecting only, so that an outage does not open one connection per waiting publish.
    connecting: tokio::sync::Mutex<()>,
    listening: AtomicBool,
    handler: Arc<dyn BatchHandler>,
    history: Arc<History>,
    metrics: Arc<Metrics>,
}

impl Broker {
    /// The broker the configuration names (validated: a redis URL parses); `handler` delivers on this instance.
    pub fn new(
        config: &BrokerConfig,
        handler: Arc<dyn BatchHandler>,
        history: Arc<History>,
        metrics: Arc<Metrics>,
    ) -> Broker {
        if config.kind != BrokerKind::Redis {
            return Broker::Memory { handler, history };
        }
        metrics.broker_is_redis.store(true, Ordering::Relaxed);
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(
                |e| tracing::error!(error = %e, "broker.redis_url unusable; publishing will fail"),
            )
            .ok();
        Broker::Redis(Arc::new(RedisBroker {
            client,
            config: config.clone(),
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            listening: AtomicBool::new(false),
            handler,
            history,
            metrics,
        }))
    }

    /// Starts the Redis listener (nothing for memory) until `stop` is cancelled.
    pub fn start(&self, stop: CancellationToken) {
        if let Broker::Redis(r) = self {
            let r = r.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = r.listen() => {}
                }
            });
        }
    }

    /// `memory`, `up` or `down`.
    pub fn state(&self) -> &'static str {
        match self {
            Broker::Memory { .. } => "memory",
            Broker::Redis(r) if r.listening.load(Ordering::Acquire) => "up",
            Broker::Redis(_) => "down",
        }
    }

    /// Publishes a batch (delivered in order); `origin` names this instance. Returns the messages' ids, as tabs
    /// receive them.
    pub async fn publish(
        &self,
        origin: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<String>, BrokerError> {
        match self {
            Broker::Memory { handler, .. } => {
                handler.deliver(&messages);
                Ok(messages.into_iter().map(|m| m.id).collect())
            }
            Broker::Redis(r) => r.publish(origin, messages).await,
        }
    }

    /// Whether [`Broker::publish_hook`] delivers in this process, as it runs (memory), rather than through Redis.
    pub fn in_process(&self) -> bool {
        matches!(self, Broker::Memory { .. })
    }

    /// Gives a webhook event its project's next id and delivers it on every instance, once per delivery `key`.
    /// Returns the id, or None for a duplicate.
    pub async fn publish_hook(
        &self,
        event: HookEvent,
        key: DeliveryKey,
    ) -> Result<Option<u64>, BrokerError> {
        match self {
            Broker::Memory { handler, history } => {
                Ok(history.append_local(event, key, |s| handler.deliver_hook(s)))
            }
            Broker::Redis(r) => {
                if !r.listening.load(Ordering::Acquire) {
                    return Err(BrokerError::Unavailable(
                        "not subscribed to the Redis channel (reconnecting)".into(),
                    ));
                }
                r.history
                    .append_shared(&event, key)
                    .await
                    .map_err(|e| BrokerError::Unavailable(e.to_string()))
            }
        }
    }
}

impl RedisBroker {
    async fn publish(
        &self,
        origin: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<String>, BrokerError> {
        if !self.listening.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable(
                "not subscribed to the Redis channel (reconnecting)".into(),
            ));
        }
        let unavailable = |e: serde_json::Error| BrokerError::Unavailable(e.to_string());
        let mut channel_messages = Vec::new();
        for m in &messages {
            if let Target::Topic(channel) = &m.target {
                channel_messages.push((
                    channel.clone(),
                    serde_json::to_string(m).map_err(unavailable)?,
                ));
            }
        }
        let mut ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
        let topics: Vec<bool> = messages
            .iter()
            .map(|m| matches!(m.target, Target::Topic(_)))
            .collect();
        let payload = serde_json::to_string(&Wire {
            origin: origin.to_owned(),
            messages,
        })
        .map_err(unavailable)?;
        if !channel_messages.is_empty() {
            let assigned = self
                .history
                .append_channels(&channel_messages, &payload, &self.config.channel)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
            let slots = ids.iter_mut().zip(topics).filter(|(_, t)| *t);
            for ((slot, _), id) in slots.zip(assigned) {
                *slot = id.to_string();
            }
            return Ok(ids);
        }
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| BrokerError::Unavailable("broker.redis_url unusable".into()))?;
        let mut conn = self.connection(client, timeout).await?;
        let sent = tokio::time::timeout(
            timeout,
            redis::cmd("PUBLISH")
                .arg(&self.config.channel)
                .arg(payload)
                .query_async::<i64>(&mut conn),
        )
        .await;
        let failed = match sent {
            Ok(Ok(_)) => return Ok(ids),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "publish timed out".into(),
        };
        // The next publish reconnects.
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Err(BrokerError::Unavailable(failed))
    }

    /// A clone of the publishing connection, connecting first when there is none.
    async fn connection(
        &self,
        client: &redis::Client,
        timeout: Duration,
    ) -> Result<redis::aio::MultiplexedConnection, BrokerError> {
        let current = || self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = current() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = current() {
            return Ok(c);
        }
        let conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| BrokerError::Unavailable("connection timed out".into()))?
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    async fn listen(self: Arc<Self>) {
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
                        self.set_listening(true);
                        backoff.reset();
                        tracing::info!(channel = %self.config.channel, "listening on Redis");
                        let mut stream = pubsub.into_on_message();
                        while let Some(msg) = stream.next().await {
                            let Ok(payload) = msg.get_payload::<String>() else {
                                continue;
                            };
                            if let Some(hook) = parse_published(&payload) {
                                match hook {
                                    Ok(s) => self.handler.deliver_hook(&s),
                                    Err(e) => {
                                        tracing::warn!(error = %e, "unreadable webhook event on the broker channel")
                                    }
                                }
                                continue;
                            }
                            match parse_batch(&payload) {
                                Ok(messages) => self.handler.deliver(&messages),
                                Err(e) => {
                                    tracing::warn!(error = %e, "unreadable message on the broker channel")
                                }
                            }
                        }
                        self.set_listening(false);
                        tracing::warn!("Redis subscription ended; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "Redis subscribe failed"),
                },
                Err(e) => tracing::warn!(error = %e, "Redis unreachable"),
            }
            tokio::time::sleep(backoff.next_delay().max(Duration::from_millis(50))).await;
        }
    }

    fn set_listening(&self, up: bool) {
        self.listening.store(up, Ordering::Release);
        self.metrics.broker_up.set(i64::from(up));
    }
}

/// A batch on the broker channel: `<batch JSON>`, or `P<ids> <batch JSON>` when [`crate::history::APPEND_CHANNELS`]
/// gave its channel messages their ids (in order, comma-separated), which replace the ids they travelled with.
fn parse_batch(payload: &str) -> Result<Vec<Message>, String> {
    let Some(rest) = payload.strip_prefix('P') else {
        return serde_json::from_str::<Wire>(payload)
            .map(|w| w.messages)
            .map_err(|e| e.to_string());
    };
    let (ids, json) = rest.split_once(' ').ok_or("no batch after the ids")?;
    let mut messages = serde_json::from_str::<Wire>(json)
        .map_err(|e| e.to_string())?
        .messages;
    let mut ids = ids.split(',');
    for m in messages
        .iter_mut()
        .filter(|m| matches!(m.target, Target::Topic(_)))
    {
        let id = ids.next().ok_or("fewer ids than channel messages")?;
        id.parse::<u64>().map_err(|_| format!("bad id {id:?}"))?;
        m.id = id.to_owned();
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(target: Target, id: &str) -> Message {
        Message {
            target,
            kind: "t".into(),
            data: json!({}),
            id: id.into(),
            timestamp: "now".into(),
        }
    }

    #[test]
    fn channel_messages_take_the_ids_of_the_history() {
        let batch = serde_json::to_string(&Wire {
            origin: "a".into(),
            messages: vec![
                message(Target::Topic("/events/x".into()), "local-1"),
                message(Target::User("u".into()), "local-2"),
                message(Target::Topic("/events/y".into()), "local-3"),
            ],
        })
        .unwrap();
        let ids: Vec<String> = parse_batch(&format!("P17,4 {batch}"))
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, ["17", "local-2", "4"]);
        assert_eq!(
            parse_batch(&batch).unwrap().len(),
            3,
            "a batch without channel messages"
        );
        assert!(
            parse_batch(&format!("P17 {batch}")).is_err(),
            "an id missing"
        );
        assert!(parse_batch("P1 {").is_err());
    }
}
