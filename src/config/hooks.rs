//! `[hooks]` (the webhook receiver and the per-project event history) and `[access]` (who may receive a project's
//! events): the `gitlab.source = "webhook"` side of subscriptions.

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

/// The webhook receiver (`POST {path}`) and the per-project history its events go to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// Where GitLab posts (project, group and system hooks alike).
    pub path: String,
    /// `X-Gitlab-Token` values accepted (several while a secret is rotated). Empty: no receiver (404).
    pub secrets: Vec<String>,
    /// Larger bodies are refused (413).
    pub max_body_bytes: usize,
    /// How long a delivery's key (its `Idempotency-Key`, else its body's hash) is remembered, so that GitLab's
    /// retries are delivered once; and how many keys an instance keeps (memory broker).
    pub dedupe_ttl_ms: u64,
    pub dedupe_max_keys: u64,
    /// Events kept per project for `lastEventId` (Redis: `XADD ... MAXLEN ~`), and how long the history of a
    /// project without events lives (Redis).
    pub history_events: usize,
    pub history_ttl_ms: u64,
    /// Projects with a history in memory (memory broker): the least recently used go first.
    pub max_projects: u64,
    /// Prefix of the Redis keys (per-project streams and counters, delivery keys).
    pub redis_prefix: String,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            path: "/hooks/gitlab".into(),
            secrets: Vec::new(),
            max_body_bytes: 1024 * 1024,
            dedupe_ttl_ms: 86_400_000,
            dedupe_max_keys: 100_000,
            history_events: 1_000,
            history_ttl_ms: 86_400_000,
            max_projects: 10_000,
            redis_prefix: "tabhub:hooks:".into(),
        }
    }
}

/// The routes the receiver's path must not take.
const TAKEN: &[&str] = &["/healthz", "/readyz", "/metrics", "/api/publish", "/"];

impl HooksConfig {
    /// Checks the section; `websocket_paths` are taken too.
    pub(super) fn validate(&self, websocket_paths: &[String]) -> Result<(), ConfigError> {
        let plain = self.path.starts_with('/')
            && self.path.len() > 1
            && !self.path.contains(['?', '#', '{', '}', '*', ' '])
            && !self.path.ends_with('/');
        if !plain {
            return Err(key_error(
                "hooks.path",
                "must be a plain path such as /hooks/gitlab",
            ));
        }
        let taken = TAKEN.contains(&self.path.as_str())
            || websocket_paths.contains(&self.path)
            || self.path.starts_with("/auth/")
            || self.path.starts_with("/client/");
        if taken {
            return Err(key_error("hooks.path", "is another route"));
        }
        for (i, s) in self.secrets.iter().enumerate() {
            if s.len() < 16 {
                // Never echo the secret itself.
                return Err(key_error(
                    &format!("hooks.secrets[{i}]"),
                    "must be at least 16 characters",
                ));
            }
        }
        for (key, v) in [
            ("hooks.max_body_bytes", self.max_body_bytes as u64),
            ("hooks.dedupe_ttl_ms", self.dedupe_ttl_ms),
            ("hooks.dedupe_max_keys", self.dedupe_max_keys),
            ("hooks.history_events", self.history_events as u64),
            ("hooks.history_ttl_ms", self.history_ttl_ms),
            ("hooks.max_projects", self.max_projects),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        if self.redis_prefix.is_empty() {
            return Err(key_error("hooks.redis_prefix", "must not be empty"));
        }
        Ok(())
    }
}

/// Who may receive a project's events: a webhook reaches tabhub once for everybody, so tabhub asks, as each user,
/// whether they may read the project.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// The `[backends]` entry the check calls as the user; `gitlab` defaults to `gitlab.url`.
    pub backend: String,
    /// The path under it; `{project}` is the topic's project id. 2xx allows; 403 and 404 refuse; anything else
    /// (no answer, 5xx) refuses too, without being cached.
    pub path: String,
    /// How long an answer is trusted: allowed for minutes, refused for less (access granted later shows soon).
    pub allowed_ttl_ms: u64,
    pub refused_ttl_ms: u64,
    /// How often a session re-checks the projects it follows; withdrawn access drops the subscriptions.
    pub recheck_interval_ms: u64,
    /// Confidential issues and notes go only to users with at least this access level (20: Reporter).
    pub confidential_min_level: u64,
    /// Answers cached per instance (user x project).
    pub max_entries: u64,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            backend: "gitlab".into(),
            path: "/api/v4/projects/{project}".into(),
            allowed_ttl_ms: 300_000,
            refused_ttl_ms: 30_000,
            recheck_interval_ms: 60_000,
            confidential_min_level: 20,
            max_entries: 100_000,
        }
    }
}

impl AccessConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.backend.is_empty() {
            return Err(key_error("access.backend", "must name a backend"));
        }
        if !self.path.starts_with('/') || !self.path.contains("{project}") {
            return Err(key_error(
                "access.path",
                "must start with / and contain {project}",
            ));
        }
        for (key, v) in [
            ("access.allowed_ttl_ms", self.allowed_ttl_ms),
            ("access.refused_ttl_ms", self.refused_ttl_ms),
            ("access.recheck_interval_ms", self.recheck_interval_ms),
            ("access.max_entries", self.max_entries),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}
