//! `[http]`: bounds on HTTP connections before they become tabs (slowloris, idle keep-alive, connection floods).

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

/// Bounds on HTTP connections that are not (yet) websocket tabs. Upgraded tabs are bounded by
/// `limits.max_connections` and the websocket pings instead.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request's line and headers must arrive within this: counted from the connection's opening for its first
    /// request, and from the first byte of each later keep-alive request. A peer that sends a partial request, or
    /// nothing at all, is closed when it runs out (slowloris).
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection with no request in progress is closed after this long.
    pub keepalive_idle_ms: u64,
    /// HTTP connections not yet upgraded to a tab, beyond which new connections only get the reserve (0: no cap).
    /// Idle or slow connections hold a file descriptor each: without a cap, enough of them exhaust the process's
    /// file table and nobody else gets in.
    pub max_pending_connections: usize,
    /// Connections accepted beyond `max_pending_connections`, kept for what must still work under attack: their
    /// first request must arrive within `reserve_header_timeout_ms` and be `GET /healthz`, `GET /readyz` or a
    /// websocket upgrade; anything else gets 503. Beyond the reserve, new connections are closed at once.
    pub pending_reserve: usize,
    /// The header timeout of a connection taken from the reserve: a real client sends its request at once.
    pub reserve_header_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_ms: 10_000,
            keepalive_idle_ms: 60_000,
            max_pending_connections: 1_000,
            pending_reserve: 100,
            reserve_header_timeout_ms: 1_000,
        }
    }
}

impl HttpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("http.header_read_timeout_ms", self.header_read_timeout_ms),
            ("http.keepalive_idle_ms", self.keepalive_idle_ms),
            (
                "http.reserve_header_timeout_ms",
                self.reserve_header_timeout_ms,
            ),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}
