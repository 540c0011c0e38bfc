//! A published message and its target, as they travel through the broker between instances.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
