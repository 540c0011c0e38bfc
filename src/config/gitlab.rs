//! `[gitlab]`: where `/project/<id>/<eventType>` topics get their events: GitLab's webhooks, or an SSE upstream.

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

/// Where project topics get their events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitlabConfig {
    /// GitLab's base URL, e.g. `https://gitlab.example`. Empty: `subscribe` is refused.
    pub url: String,
    /// `webhook`: GitLab posts its events to the receiver (`[hooks]`) and tabhub decides who sees them (`[access]`);
    /// `sse`: one upstream SSE stream per user and project at `stream_path` (a relay or a service that speaks SSE:
    /// no GitLab has such an endpoint).
    pub source: GitlabSource,
    /// Path of a project's event stream. `{project}` is the project id as the topic names it, `{eventTypes}` the
    /// comma-separated event types wanted (sorted).
    pub stream_path: String,
    /// A stream that sends nothing at all (not even a comment) for this long is dead and is reconnected.
    pub stall_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Reconnection backoff (full jitter) after a dropped stream, a network error or a 5xx.
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    /// Least time between two (re)starts of one user's stream of a project asked by commands (new types, older
    /// resume ids): a later one waits, with no connection meanwhile, then resumes from the last event received, so
    /// nothing is lost, only delayed. Bounds the upstream requests a user's commands can cause.
    pub min_restart_interval_ms: u64,
    /// Events kept per stream, so that a tab joining an open stream with a recent `lastEventId` gets what it
    /// missed without reconnecting upstream.
    pub replay_buffer_events: usize,
    /// Topics one tab may hold, and projects (upstream streams) one user may have open.
    pub max_topics_per_tab: usize,
    pub max_projects_per_user: usize,
}

impl Default for GitlabConfig {
    fn default() -> Self {
        GitlabConfig {
            url: String::new(),
            source: GitlabSource::Sse,
            stream_path: "/api/v4/projects/{project}/events/stream?event_types={eventTypes}".into(),
            stall_timeout_ms: 45_000,
            connect_timeout_ms: 5_000,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            min_restart_interval_ms: 1_000,
            replay_buffer_events: 256,
            max_topics_per_tab: 100,
            max_projects_per_user: 20,
        }
    }
}

/// Where project topics get their events. An enum so that a bad value fails while the file is read, naming the key
/// and the allowed values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GitlabSource {
    /// GitLab's webhooks, received once for everybody at `hooks.path`.
    Webhook,
    /// One SSE stream per user and project, opened as the user.
    #[default]
    Sse,
}

impl GitlabConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.url.is_empty() {
            url::Url::parse(&self.url)
                .map_err(|e| key_error("gitlab.url", format!("not a URL: {e}")))?;
        }
        if !self.stream_path.starts_with('/') || !self.stream_path.contains("{project}") {
            return Err(key_error(
                "gitlab.stream_path",
                "must start with / and contain {project}",
            ));
        }
        for (key, v) in [
            ("gitlab.stall_timeout_ms", self.stall_timeout_ms),
            ("gitlab.connect_timeout_ms", self.connect_timeout_ms),
            ("gitlab.reconnect_initial_ms", self.reconnect_initial_ms),
            (
                "gitlab.replay_buffer_events",
                self.replay_buffer_events as u64,
            ),
            ("gitlab.max_topics_per_tab", self.max_topics_per_tab as u64),
            (
                "gitlab.max_projects_per_user",
                self.max_projects_per_user as u64,
            ),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}
