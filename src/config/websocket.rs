//! `[websocket]`: per-tab frame, buffer and queue sizes, pings and timeouts.

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Paths the websocket is served on. Renku's client connects to `/ui-server/ws` (its UI server's path behind
    /// renku-gateway); add it to serve that client unchanged.
    pub paths: Vec<String>,
    /// Admit, for tabs of Renku's client (no subprotocol), the types of its older version too (`activation`,
    /// `sessionStatus`, `test`), which tracked knowledge-graph activation.
    pub renku_older_client: bool,
    /// Largest message a tab may send; a larger frame closes the tab with 1009.
    pub max_message_bytes: usize,
    /// Read buffer per tab, allocated for the tab's life (tungstenite's default, 128 KiB, would dominate memory).
    /// 1 KiB fits the commands tabs send; a larger frame is read in more calls (issue 19: 4 KiB was a third of an
    /// idle one-tab user's memory).
    pub read_buffer_bytes: usize,
    /// Bound of a tab's outbound queue in messages and in bytes; a tab that stops reading is closed with 4009
    /// when either is reached.
    pub outbound_queue_messages: usize,
    pub outbound_queue_bytes: usize,
    /// Protocol pings to each tab; a tab that sends nothing (no pong, no message) for `idle_timeout_ms` is dropped.
    pub ping_interval_ms: u64,
    pub idle_timeout_ms: u64,
    /// Longest a write to a tab may block (a peer whose receive window stays closed) before the tab is dropped.
    pub write_timeout_ms: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            paths: vec!["/ws".into()],
            renku_older_client: false,
            max_message_bytes: 64 * 1024,
            read_buffer_bytes: 1024,
            outbound_queue_messages: 512,
            outbound_queue_bytes: 1024 * 1024,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
        }
    }
}

impl WebSocketConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.paths.is_empty() {
            return Err(key_error("websocket.paths", "at least one path"));
        }
        for (i, p) in self.paths.iter().enumerate() {
            let reserved = ["/healthz", "/readyz", "/metrics", "/api/publish"]
                .contains(&p.as_str())
                || p.starts_with("/auth/")
                || p.starts_with("/client/");
            if !p.starts_with('/') || p.contains(['?', '#', '*', '{', '}', ':']) || reserved {
                return Err(key_error(
                    &format!("websocket.paths[{i}]"),
                    "must be a plain path such as /ws, not one of the server's other routes",
                ));
            }
        }
        for (key, v) in [
            ("websocket.max_message_bytes", self.max_message_bytes),
            ("websocket.read_buffer_bytes", self.read_buffer_bytes),
            (
                "websocket.outbound_queue_messages",
                self.outbound_queue_messages,
            ),
            ("websocket.outbound_queue_bytes", self.outbound_queue_bytes),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        if self.idle_timeout_ms <= self.ping_interval_ms {
            return Err(key_error(
                "websocket.idle_timeout_ms",
                "must be longer than websocket.ping_interval_ms",
            ));
        }
        for (key, v) in [
            ("websocket.ping_interval_ms", self.ping_interval_ms),
            ("websocket.write_timeout_ms", self.write_timeout_ms),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}
