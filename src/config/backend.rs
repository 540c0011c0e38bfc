//! `[backend]` (how loop functions call backends) and the `[backends]` table (which backends, by name).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};
use super::session::SessionConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Timeout of one backend request (loop functions' calls); must be shorter than the short interval.
    pub timeout_ms: u64,
    /// After a 502, 503, 504, a timeout or a network error, that user's calls to that path are left alone for a
    /// backoff that starts here and doubles up to the maximum (with jitter); a success resets it. The same backoff
    /// applies to the whole backend during an outage (below).
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// An outage, when the whole backend backs off for everyone: at least this many distinct users saw their latest
    /// call fail, and they outnumber those whose latest call succeeded. Not 1 (unless one user is all there is):
    /// one user's slow or broken resources would then stop every user's calls.
    pub outage_min_users: u64,
    /// Only calls within this window count towards an outage.
    pub outage_window_ms: u64,
    /// Keep-alive connections kept per backend host.
    pub pool_max_idle_per_host: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            timeout_ms: 4_000,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
            outage_min_users: 3,
            outage_window_ms: 30_000,
            pool_max_idle_per_host: 64,
        }
    }
}

impl BackendConfig {
    /// A backend call runs inside one loop iteration, hence the bound by the session's short interval.
    pub(super) fn validate(&self, session: &SessionConfig) -> Result<(), ConfigError> {
        if self.timeout_ms == 0 {
            return Err(key_error("backend.timeout_ms", "must be greater than 0"));
        }
        if self.outage_min_users == 0 || self.outage_min_users > 1_000 {
            return Err(key_error(
                "backend.outage_min_users",
                "must be between 1 and 1000",
            ));
        }
        if self.outage_window_ms == 0 {
            return Err(key_error(
                "backend.outage_window_ms",
                "must be greater than 0",
            ));
        }
        if self.timeout_ms >= session.short_interval_ms {
            return Err(key_error(
                "backend.timeout_ms",
                "must be shorter than session.short_interval_ms",
            ));
        }
        Ok(())
    }
}

/// The `[backends]` table: every base URL must parse.
pub(super) fn validate_backends(backends: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (name, base) in backends {
        url::Url::parse(base)
            .map_err(|e| key_error(&format!("backends.{name}"), format!("not a URL: {e}")))?;
    }
    Ok(())
}
