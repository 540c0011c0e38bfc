//! `[limits]`: bounds on what clients can grow, and rates.

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

/// Bounds on what clients can grow. 0 means unlimited where noted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open tabs on this instance; one more is upgraded, told `error {overloaded: true}` and closed with 1013
    /// (0: unlimited).
    pub max_connections: usize,
    /// Open tabs per user on this instance; one more is closed with 4029 (0: unlimited).
    pub max_tabs_per_user: usize,
    /// Longest a command's handler may run before the tab gets an error.
    pub command_timeout_ms: u64,
    /// Commands per second per tab (a token bucket of `commands_burst`). A command over the rate gets
    /// `error {rateLimited: true}`; `rate_limit_strikes` refused commands in a row close the tab with 4008.
    pub commands_per_second: f64,
    pub commands_burst: f64,
    pub rate_limit_strikes: u32,
    /// Websocket upgrades per second from one address (token bucket of `upgrades_burst`); beyond: HTTP 429.
    pub upgrades_per_second_per_address: f64,
    pub upgrades_burst: f64,
    /// Take the client address from the last `X-Forwarded-For` entry (the one the load balancer in front of
    /// tabhub appended). Only behind a trusted proxy: otherwise anyone could pick their address.
    pub trust_forwarded_for: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 20_000,
            max_tabs_per_user: 100,
            command_timeout_ms: 30_000,
            commands_per_second: 20.0,
            commands_burst: 40.0,
            rate_limit_strikes: 20,
            upgrades_per_second_per_address: 50.0,
            upgrades_burst: 100.0,
            trust_forwarded_for: false,
        }
    }
}

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("limits.commands_per_second", self.commands_per_second),
            ("limits.commands_burst", self.commands_burst),
            (
                "limits.upgrades_per_second_per_address",
                self.upgrades_per_second_per_address,
            ),
            ("limits.upgrades_burst", self.upgrades_burst),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(key_error(key, "must be a positive number"));
            }
        }
        Ok(())
    }
}
