//! `[publish]` (the publish API) and `[broker]` (how published messages reach every instance).

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

/// The publish API (`POST /api/publish`): backends push messages to a user, a topic or everyone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// Service-account clients (`azp` of a client-credentials token) allowed to publish.
    pub clients: Vec<String>,
    /// A static bearer secret also allowed to publish (simple setups; empty: none).
    pub shared_secret: String,
    /// Topic prefixes that are publish-only channels: `subscribe` accepts topics under them, which open no upstream.
    pub namespaces: Vec<String>,
    /// Largest request body (413 beyond) and most messages in one batch.
    pub max_body_bytes: usize,
    pub max_batch: usize,
    /// Messages kept per channel for tabs resubscribing with a `lastEventId`, and channels with such a buffer.
    pub buffer_events: usize,
    pub max_buffered_topics: usize,
    /// Distinct channels one user's tabs may hold at once: the channel buffers above are shared by all users.
    pub max_channels_per_user: usize,
    /// `broker.kind = "redis"`: channels keep their history (`buffer_events` messages) in Redis streams, so that
    /// ids are the same on every instance and `lastEventId` resumes on any of them. Keys start with this prefix
    /// (`<prefix>stream:<channel>`, `<prefix>seq:<channel>`) and expire after `history_ttl_ms` without a message.
    pub redis_prefix: String,
    pub history_ttl_ms: u64,
}

impl PublishConfig {
    /// Whether `channel` is under a publish namespace: the one rule for both `subscribe` and the publish API.
    pub fn allows_channel(&self, channel: &str) -> bool {
        self.namespaces
            .iter()
            .any(|n| channel.starts_with(n.as_str()))
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            clients: Vec::new(),
            shared_secret: String::new(),
            namespaces: vec!["/events/".into()],
            max_body_bytes: 1024 * 1024,
            max_batch: 100,
            buffer_events: 256,
            max_buffered_topics: 10_000,
            max_channels_per_user: 100,
            redis_prefix: "tabhub:publish:".into(),
            history_ttl_ms: 86_400_000,
        }
    }
}

impl PublishConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_channels_per_user == 0 || self.max_channels_per_user > self.max_buffered_topics
        {
            return Err(key_error(
                "publish.max_channels_per_user",
                "must be between 1 and publish.max_buffered_topics",
            ));
        }
        if self.redis_prefix.is_empty() {
            return Err(key_error("publish.redis_prefix", "must not be empty"));
        }
        if self.history_ttl_ms == 0 {
            return Err(key_error("publish.history_ttl_ms", "must be positive"));
        }
        for (i, n) in self.namespaces.iter().enumerate() {
            if !n.starts_with('/') || n.starts_with("/project/") || n == "/" {
                return Err(key_error(
                    &format!("publish.namespaces[{i}]"),
                    "must be a path prefix such as /events/ (not / nor /project/)",
                ));
            }
        }
        Ok(())
    }
}

/// How published messages reach every instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `memory` (this process only) or `redis`.
    pub kind: BrokerKind,
    /// `redis://host:port/` when `kind = "redis"`.
    pub redis_url: String,
    /// The Redis pub/sub channel every instance publishes into and listens on.
    pub channel: String,
    /// Timeout of one publish to Redis; reconnection backoff of the listener.
    pub timeout_ms: u64,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Memory,
            redis_url: String::new(),
            channel: "tabhub:publish".into(),
            timeout_ms: 2_000,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 10_000,
        }
    }
}

/// Which broker carries published messages. An enum rather than a string so that a bad value fails while the
/// file is read, naming `broker.kind` and the allowed values, and no later code compares strings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// This process only (`memory`): one instance, or instances that need not share messages.
    #[default]
    Memory,
    /// Redis pub/sub (`redis`) at `broker.redis_url`: every instance gets every message.
    Redis,
}

impl BrokerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.kind {
            BrokerKind::Memory => {}
            BrokerKind::Redis => {
                let u = url::Url::parse(&self.redis_url)
                    .map_err(|e| key_error("broker.redis_url", format!("not a URL: {e}")))?;
                if !matches!(u.scheme(), "redis" | "redis+unix") {
                    return Err(key_error("broker.redis_url", "must be a redis:// URL"));
                }
                redis::Client::open(self.redis_url.as_str())
                    .map_err(|e| key_error("broker.redis_url", e.to_string()))?;
            }
        }
        Ok(())
    }
}
