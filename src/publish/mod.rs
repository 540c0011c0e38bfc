//! Backends push to browsers: `POST /api/publish` ([`api`]) with a target (a user, a topic, everyone), a `type`
//! and `data`. Messages travel through a [`broker`] so that they reach every instance (Redis pub/sub), or only this
//! one (memory), and each instance delivers to its own tabs ([`deliver`]). Topic messages go to publish-only
//! channels ([`channels`]) with a bounded replay buffer for `lastEventId`.
//!
//! Tabs receive `{timestamp, scope, type, data, eventId}` with `scope` `user`, `topic` (plus `topic`) or
//! `broadcast`; `type` and `data` pass through unchanged (orchestrator-core's `invalidateCache` events too).

pub mod api;
pub mod broker;
pub mod channels;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tabhub_commands::Topic;

use crate::app::App;
use crate::protocol;

/// Who receives a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Target {
    /// Every tab of the user (`sub`).
    User(String),
    /// Every tab subscribed to the channel.
    Topic(String),
    /// Every connected tab (`{"broadcast": true}`).
    Broadcast(bool),
}

/// A message as it travels between instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub target: Target,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
    /// Assigned by the instance that accepted the request; unique across instances.
    pub id: String,
    pub timestamp: String,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A message id: milliseconds, this process's random nonce, a sequence number.
pub fn new_id() -> String {
    static NONCE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let nonce = *NONCE.get_or_init(rand::random);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        "{ms:x}-{nonce:08x}-{:x}",
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Delivers messages to this instance's tabs, in order.
pub fn deliver(app: &Arc<App>, messages: &[Message]) {
    for m in messages {
        match &m.target {
            Target::User(user) => {
                let msg = protocol::encode_published("user", &m.kind, &m.data, &m.id, None);
                if let Some(s) = app.hub.get(user) {
                    s.send_all(&msg);
                }
                app.metrics.published.inc(&["user"]);
            }
            Target::Broadcast(_) => {
                let msg = protocol::encode_published("broadcast", &m.kind, &m.data, &m.id, None);
                for s in app.hub.all() {
                    s.send_all(&msg);
                }
                app.metrics.published.inc(&["broadcast"]);
            }
            Target::Topic(name) => {
                let msg = protocol::encode_published("topic", &m.kind, &m.data, &m.id, Some(name));
                let topic = Topic::Channel(name.clone());
                let buffer = app
                    .channels
                    .buffer(name, app.config.publish.max_buffered_topics);
                let mut b = buffer.lock().unwrap_or_else(|p| p.into_inner());
                if b.messages.len() >= app.config.publish.buffer_events {
                    b.messages.pop_front();
                }
                b.messages.push_back((m.id.clone(), msg.clone()));
                for user in app.channels.holders(name) {
                    if let Some(s) = app.hub.get(&user) {
                        s.deliver_to_holders(&topic, &msg);
                    }
                }
                drop(b);
                app.metrics.published.inc(&["topic"]);
            }
        }
    }
}
