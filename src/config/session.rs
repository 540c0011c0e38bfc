//! `[session]`: how long a user's session lingers, and its loops' intervals.

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// How long a session outlives its last tab (a page reload must not restart everything).
    pub linger_ms: u64,
    /// The short loop's interval (Renku: 5 s) and the long loop's (Renku: 3 min).
    pub short_interval_ms: u64,
    pub long_interval_ms: u64,
    /// The short loop's interval while every tab of the user is hidden.
    pub hidden_interval_ms: u64,
    /// Longest iteration of a loop function; must be shorter than the short interval.
    pub loop_timeout_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            linger_ms: 15_000,
            short_interval_ms: 5_000,
            long_interval_ms: 180_000,
            hidden_interval_ms: 30_000,
            loop_timeout_ms: 4_000,
        }
    }
}

impl SessionConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("session.short_interval_ms", self.short_interval_ms),
            ("session.long_interval_ms", self.long_interval_ms),
            ("session.hidden_interval_ms", self.hidden_interval_ms),
            ("session.loop_timeout_ms", self.loop_timeout_ms),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        if self.loop_timeout_ms >= self.short_interval_ms {
            return Err(key_error(
                "session.loop_timeout_ms",
                "must be shorter than session.short_interval_ms",
            ));
        }
        Ok(())
    }
}
