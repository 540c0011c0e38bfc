//! `[drain]`: graceful drain on SIGTERM or SIGINT. Every value is valid (0 means at once).

use serde::{Deserialize, Serialize};

/// Graceful drain on SIGTERM or SIGINT.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Time between `/readyz` turning 503 (and upgrades being refused) and the first tab closing: for the load
    /// balancer to notice.
    pub delay_ms: u64,
    /// Tabs are closed with 1012 at random moments over this window, so that clients do not all reconnect in the
    /// same second.
    pub window_ms: u64,
    /// After the window, whatever is left is stopped and the process exits within this grace.
    pub grace_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            delay_ms: 5_000,
            window_ms: 10_000,
            grace_ms: 3_000,
        }
    }
}
