//! Configuration: a TOML file, then `TABHUB_*` environment variables, over a documented default for every key.
//!
//! Every leaf key has an environment name: `TABHUB_` + its dotted path in upper case with `_` for `.`
//! (`session.linger_ms` -> `TABHUB_SESSION_LINGER_MS`). Free-form tables (`backends`, `commands`) take any key:
//! `TABHUB_BACKENDS_GATEWAY=http://...`. Lists are comma-separated or a TOML array. Durations are in milliseconds,
//! named `*_ms`. A bad value fails at start with a message naming the key and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole configuration. `Config::default()` is the documented default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the one listener (websocket, health, metrics, auth).
    pub listen: SocketAddr,
    /// This instance's id, shown in `init` so one can tell instances apart behind a load balancer. Empty: host name
    /// and process id.
    pub instance_id: String,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub origins: OriginConfig,
    pub websocket: WebSocketConfig,
    pub session: SessionConfig,
    pub backend: BackendConfig,
    pub limits: LimitsConfig,
    pub drain: DrainConfig,
    pub gitlab: GitlabConfig,
    pub custody: CustodyConfig,
    pub publish: PublishConfig,
    pub broker: BrokerConfig,
    /// Backends the loop functions call as the user: name -> base URL (for example `gateway`).
    pub backends: BTreeMap<String, String>,
    /// Settings for commands (the `[commands]` table is handed to them as JSON), e.g. `ui_version`.
    pub commands: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter such as `info` or `tabhub=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The realm's issuer URL, e.g. `https://kc.example/realms/renku`. Tokens' `iss` must equal it exactly, and so
    /// must the discovery document's `issuer`. Required.
    pub issuer: String,
    /// Client ids whose tokens are accepted: a token's `azp`, or one of its `aud`, must be one of them. Required.
    pub client_ids: Vec<String>,
    /// Require the `typ` claim to be `Bearer` (Keycloak access tokens), so that ID and refresh tokens are refused.
    pub require_typ_bearer: bool,
    /// Accepted signature algorithms. Only asymmetric ones are possible: `none` and HMAC are always refused.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Cookie that may hold an access token (empty: no such cookie is read).
    pub token_cookie: String,
    /// First and largest delay between discovery attempts at start.
    pub discovery_retry_initial_ms: u64,
    pub discovery_retry_max_ms: u64,
    /// Timeout of one discovery or JWKS request.
    pub http_timeout_ms: u64,
    /// A token with an unknown `kid` triggers a JWKS refetch at most this often.
    pub jwks_refetch_min_interval_ms: u64,
    /// The JWKS is also refetched this often (0: never), so that a key the realm withdraws stops being accepted
    /// even when no token names a new `kid` (Keycloak rotates in the new key long before removing the old one).
    pub jwks_refresh_interval_ms: u64,
    /// `authExpiring` is sent this long before the session's token expires.
    pub expiry_warning_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// Origins allowed to open a websocket, e.g. `https://renku.example` (scheme, host and port, exactly).
    pub allowed: Vec<String>,
    /// Accept upgrades without an `Origin` header (non-browser clients). Never for cookie credentials.
    pub allow_missing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest message a tab may send; a larger frame closes the tab with 1009.
    pub max_message_bytes: usize,
    /// Read buffer per tab (tungstenite's default, 128 KiB, would dominate memory).
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

/// The publish API (`POST /api/publish`): backends push messages to a user, a topic or everyone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// Service-account clients (`azp` of a client-credentials token) allowed to publish.
    pub clients: Vec<String>,
    /// A static bearer secret also allowed to publish (simple setups; empty: none).
    pub shared_secret: String,
    /// Topic prefixes that are publish-only channels: `subscribe` accepts topics under them, which open no upstream.
    pub namespaces: Vec<String>,
    /// Largest request body (413 beyond) and most messages in one batch.
    pub max_body_bytes: usize,
    pub max_batch: usize,
    /// Messages kept per channel for tabs resubscribing with a `lastEventId`, and channels with such a buffer.
    pub buffer_events: usize,
    pub max_buffered_topics: usize,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            clients: Vec::new(),
            shared_secret: String::new(),
            namespaces: vec!["/events/".into()],
            max_body_bytes: 1024 * 1024,
            max_batch: 100,
            buffer_events: 256,
            max_buffered_topics: 10_000,
        }
    }
}

impl PublishConfig {
    /// Whether `channel` is under a publish namespace: the one rule for both `subscribe` and the publish API.
    pub fn allows_channel(&self, channel: &str) -> bool {
        self.namespaces
            .iter()
            .any(|n| channel.starts_with(n.as_str()))
    }
}

/// How published messages reach every instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `memory` (this process only) or `redis`.
    pub kind: String,
    /// `redis://host:port/` when `kind = "redis"`.
    pub redis_url: String,
    /// The Redis pub/sub channel every instance publishes into and listens on.
    pub channel: String,
    /// Timeout of one publish to Redis; reconnection backoff of the listener.
    pub timeout_ms: u64,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: "memory".into(),
            redis_url: String::new(),
            channel: "tabhub:publish".into(),
            timeout_ms: 2_000,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 10_000,
        }
    }
}

/// Token custody: tabhub logs users in (authorization code + PKCE) and keeps their tokens server-side, behind a
/// session cookie; browsers never hold Keycloak tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CustodyConfig {
    pub enabled: bool,
    /// The confidential client tabhub logs in with (it must also be in `auth.client_ids`).
    pub client_id: String,
    pub client_secret: String,
    /// This server's public `/auth/callback` URL, registered at the client.
    pub redirect_uri: String,
    /// Where Keycloak sends the browser after an RP-initiated logout (empty: not sent).
    pub post_logout_redirect_uri: String,
    pub scopes: Vec<String>,
    pub cookie_name: String,
    pub cookie_path: String,
    /// `Secure` on the session cookie; turn off only for plain-http local development.
    pub cookie_secure: bool,
    /// Origins `?redirect=` may point to, besides relative paths (empty: `origins.allowed`).
    pub allowed_redirect_origins: Vec<String>,
    /// Refresh this long before the access token expires (Renku: 10 s).
    pub refresh_tolerance_ms: u64,
    /// How long a login may take between `/auth/login` and `/auth/callback`.
    pub login_timeout_ms: u64,
    /// Stored sessions expire with the refresh token; this lifetime applies when it cannot be read.
    pub default_refresh_lifetime_ms: u64,
    /// RFC 7662 introspection of every handshake's token (revocation seen at once), cached this long.
    pub introspection: bool,
    pub introspection_cache_ms: u64,
    /// Back-channel logout tokens older than this (`iat`) are refused; their `jti`s are remembered as long.
    pub logout_token_max_age_ms: u64,
}

impl Default for CustodyConfig {
    fn default() -> Self {
        CustodyConfig {
            enabled: false,
            client_id: String::new(),
            client_secret: String::new(),
            redirect_uri: String::new(),
            post_logout_redirect_uri: String::new(),
            scopes: ["openid", "profile", "email"].map(String::from).to_vec(),
            cookie_name: "tabhub_session".into(),
            cookie_path: "/".into(),
            cookie_secure: true,
            allowed_redirect_origins: Vec::new(),
            refresh_tolerance_ms: 10_000,
            login_timeout_ms: 600_000,
            default_refresh_lifetime_ms: 1_800_000,
            introspection: false,
            introspection_cache_ms: 5_000,
            logout_token_max_age_ms: 120_000,
        }
    }
}

/// Upstream GitLab SSE subscriptions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitlabConfig {
    /// GitLab's base URL, e.g. `https://gitlab.example`. Empty: `subscribe` is refused.
    pub url: String,
    /// Path of a project's event stream. `{project}` is the project id as the topic names it, `{eventTypes}` the
    /// comma-separated event types wanted (sorted).
    pub stream_path: String,
    /// A stream that sends nothing at all (not even a comment) for this long is dead and is reconnected.
    pub stall_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Reconnection backoff (full jitter) after a dropped stream, a network error or a 5xx.
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
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
            stream_path: "/api/v4/projects/{project}/events/stream?event_types={eventTypes}".into(),
            stall_timeout_ms: 45_000,
            connect_timeout_ms: 5_000,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            replay_buffer_events: 256,
            max_topics_per_tab: 100,
            max_projects_per_user: 20,
        }
    }
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Timeout of one backend request (loop functions' calls); must be shorter than the short interval.
    pub timeout_ms: u64,
    /// After a 5xx or a network error a backend is left alone for a backoff that starts here and doubles up to
    /// the maximum (with jitter); a success resets it.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Keep-alive connections kept per backend host.
    pub pool_max_idle_per_host: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            instance_id: String::new(),
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            origins: OriginConfig::default(),
            websocket: WebSocketConfig::default(),
            session: SessionConfig::default(),
            backend: BackendConfig::default(),
            limits: LimitsConfig::default(),
            drain: DrainConfig::default(),
            gitlab: GitlabConfig::default(),
            custody: CustodyConfig::default(),
            publish: PublishConfig::default(),
            broker: BrokerConfig::default(),
            backends: BTreeMap::new(),
            commands: toml::Table::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: String::new(),
            client_ids: Vec::new(),
            require_typ_bearer: true,
            algorithms: ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"]
                .map(String::from)
                .to_vec(),
            leeway_secs: 10,
            token_cookie: String::new(),
            discovery_retry_initial_ms: 250,
            discovery_retry_max_ms: 30_000,
            http_timeout_ms: 5_000,
            jwks_refetch_min_interval_ms: 10_000,
            jwks_refresh_interval_ms: 600_000,
            expiry_warning_ms: 60_000,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_message_bytes: 64 * 1024,
            read_buffer_bytes: 4 * 1024,
            outbound_queue_messages: 512,
            outbound_queue_bytes: 1024 * 1024,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
        }
    }
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

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            timeout_ms: 4_000,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
            pool_max_idle_per_host: 64,
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("environment variable {var} (config key `{key}`): {message}")]
    Env {
        var: String,
        key: String,
        message: String,
    },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Tables whose keys are free-form (any key may be set from the environment).
const FREE_TABLES: &[&str] = &["backends", "commands"];

impl Config {
    /// Reads `path` (if given), applies `TABHUB_*` variables from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value = toml::Value::Table(match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Syntax {
                    path: p.display().to_string(),
                    message: e.message().to_owned(),
                })?
            }
            None => toml::Table::new(),
        });
        apply_env(&mut value, env)?;
        Config::from_toml(value)
    }

    /// Builds a configuration from a TOML value over the defaults, and validates it.
    pub fn from_toml(value: toml::Value) -> Result<Config, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            key_error(&key, e.into_inner().message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.issuer.is_empty() {
            return Err(key_error(
                "auth.issuer",
                "required: the realm's issuer URL, e.g. https://kc.example/realms/renku",
            ));
        }
        let issuer = url::Url::parse(&a.issuer)
            .map_err(|e| key_error("auth.issuer", format!("not a URL: {e}")))?;
        if !matches!(issuer.scheme(), "http" | "https") {
            return Err(key_error("auth.issuer", "must be an http or https URL"));
        }
        if a.client_ids.is_empty() {
            return Err(key_error(
                "auth.client_ids",
                "required: at least one accepted client id (azp or aud)",
            ));
        }
        for alg in &a.algorithms {
            crate::auth::algorithm::parse_algorithm(alg)
                .map_err(|m| key_error("auth.algorithms", format!("{alg}: {m}")))?;
        }
        if a.algorithms.is_empty() {
            return Err(key_error(
                "auth.algorithms",
                "at least one algorithm is needed",
            ));
        }
        for (i, o) in self.origins.allowed.iter().enumerate() {
            let parsed = url::Url::parse(o)
                .map_err(|e| key_error(&format!("origins.allowed[{i}]"), format!("{o}: {e}")))?;
            if parsed.origin().ascii_serialization() != *o {
                return Err(key_error(
                    &format!("origins.allowed[{i}]"),
                    format!(
                        "{o} is not an origin; write it as {}",
                        parsed.origin().ascii_serialization()
                    ),
                ));
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(key_error("log.format", "must be text or json"));
        }
        let w = &self.websocket;
        for (key, v) in [
            ("websocket.max_message_bytes", w.max_message_bytes),
            ("websocket.read_buffer_bytes", w.read_buffer_bytes),
            (
                "websocket.outbound_queue_messages",
                w.outbound_queue_messages,
            ),
            ("websocket.outbound_queue_bytes", w.outbound_queue_bytes),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        if w.idle_timeout_ms <= w.ping_interval_ms {
            return Err(key_error(
                "websocket.idle_timeout_ms",
                "must be longer than websocket.ping_interval_ms",
            ));
        }
        let s = &self.session;
        for (key, v) in [
            ("session.short_interval_ms", s.short_interval_ms),
            ("session.long_interval_ms", s.long_interval_ms),
            ("session.hidden_interval_ms", s.hidden_interval_ms),
            ("session.loop_timeout_ms", s.loop_timeout_ms),
            ("backend.timeout_ms", self.backend.timeout_ms),
            ("websocket.ping_interval_ms", w.ping_interval_ms),
            ("websocket.write_timeout_ms", w.write_timeout_ms),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        if s.loop_timeout_ms >= s.short_interval_ms {
            return Err(key_error(
                "session.loop_timeout_ms",
                "must be shorter than session.short_interval_ms",
            ));
        }
        if self.backend.timeout_ms >= s.short_interval_ms {
            return Err(key_error(
                "backend.timeout_ms",
                "must be shorter than session.short_interval_ms",
            ));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.commands_per_second", l.commands_per_second),
            ("limits.commands_burst", l.commands_burst),
            (
                "limits.upgrades_per_second_per_address",
                l.upgrades_per_second_per_address,
            ),
            ("limits.upgrades_burst", l.upgrades_burst),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(key_error(key, "must be a positive number"));
            }
        }
        let g = &self.gitlab;
        if !g.url.is_empty() {
            url::Url::parse(&g.url)
                .map_err(|e| key_error("gitlab.url", format!("not a URL: {e}")))?;
        }
        if !g.stream_path.starts_with('/') || !g.stream_path.contains("{project}") {
            return Err(key_error(
                "gitlab.stream_path",
                "must start with / and contain {project}",
            ));
        }
        for (key, v) in [
            ("gitlab.stall_timeout_ms", g.stall_timeout_ms),
            ("gitlab.connect_timeout_ms", g.connect_timeout_ms),
            ("gitlab.reconnect_initial_ms", g.reconnect_initial_ms),
            ("gitlab.replay_buffer_events", g.replay_buffer_events as u64),
            ("gitlab.max_topics_per_tab", g.max_topics_per_tab as u64),
            (
                "gitlab.max_projects_per_user",
                g.max_projects_per_user as u64,
            ),
        ] {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        match self.broker.kind.as_str() {
            "memory" => {}
            "redis" => {
                let u = url::Url::parse(&self.broker.redis_url)
                    .map_err(|e| key_error("broker.redis_url", format!("not a URL: {e}")))?;
                if !matches!(u.scheme(), "redis" | "redis+unix") {
                    return Err(key_error("broker.redis_url", "must be a redis:// URL"));
                }
                redis::Client::open(self.broker.redis_url.as_str())
                    .map_err(|e| key_error("broker.redis_url", e.to_string()))?;
            }
            _ => return Err(key_error("broker.kind", "must be memory or redis")),
        }
        for (i, n) in self.publish.namespaces.iter().enumerate() {
            if !n.starts_with('/') || n.starts_with("/project/") || n == "/" {
                return Err(key_error(
                    &format!("publish.namespaces[{i}]"),
                    "must be a path prefix such as /events/ (not / nor /project/)",
                ));
            }
        }
        let c = &self.custody;
        if c.enabled {
            for (key, v) in [
                ("custody.client_id", &c.client_id),
                ("custody.client_secret", &c.client_secret),
                ("custody.redirect_uri", &c.redirect_uri),
            ] {
                if v.is_empty() {
                    return Err(key_error(key, "required when custody.enabled"));
                }
            }
            url::Url::parse(&c.redirect_uri)
                .map_err(|e| key_error("custody.redirect_uri", format!("not a URL: {e}")))?;
            if !self.auth.client_ids.contains(&c.client_id) {
                return Err(key_error(
                    "auth.client_ids",
                    "must include custody.client_id (its access tokens are verified like any other)",
                ));
            }
            if c.cookie_name.is_empty()
                || !c
                    .cookie_name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_-".contains(ch))
            {
                return Err(key_error("custody.cookie_name", "must be [A-Za-z0-9_-]+"));
            }
        }
        for (name, base) in &self.backends {
            url::Url::parse(base)
                .map_err(|e| key_error(&format!("backends.{name}"), format!("not a URL: {e}")))?;
        }
        Ok(())
    }
}

/// Overlays `TABHUB_*` variables on `value`, typed by the default configuration's leaves.
fn apply_env(
    value: &mut toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Value::try_from(Config::default()).map_err(|e| ConfigError::Key {
        key: "(defaults)".into(),
        message: e.to_string(),
    })?;
    let mut leaves = Vec::new();
    collect_leaves(&defaults, &mut Vec::new(), &mut leaves);
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix("TABHUB_") else {
            continue;
        };
        let target = leaves
            .iter()
            .find(|(path, _)| env_name(path) == rest)
            .map(|(path, default)| (path.clone(), Some(*default)))
            .or_else(|| {
                FREE_TABLES.iter().find_map(|t| {
                    let prefix = format!("{}_", t.to_uppercase());
                    rest.strip_prefix(&prefix)
                        .filter(|k| !k.is_empty())
                        .map(|k| (vec![t.to_string(), k.to_lowercase()], None))
                })
            });
        let Some((path, default)) = target else {
            return Err(ConfigError::Env {
                var: var.clone(),
                key: rest.to_lowercase(),
                message: "no such configuration key".into(),
            });
        };
        let parsed = parse_env_value(&raw, default).map_err(|message| ConfigError::Env {
            var: var.clone(),
            key: path.join("."),
            message,
        })?;
        set_path(value, &path, parsed);
    }
    Ok(())
}

fn env_name(path: &[String]) -> String {
    path.join("_").to_uppercase()
}

fn collect_leaves<'a>(
    v: &'a toml::Value,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, &'a toml::Value)>,
) {
    match v {
        toml::Value::Table(t) if !FREE_TABLES.contains(&path.join(".").as_str()) => {
            for (k, child) in t {
                path.push(k.clone());
                collect_leaves(child, path, out);
                path.pop();
            }
        }
        toml::Value::Table(_) => {}
        leaf => out.push((path.clone(), leaf)),
    }
}

fn parse_env_value(raw: &str, default: Option<&toml::Value>) -> Result<toml::Value, String> {
    use toml::Value as V;
    Ok(match default {
        Some(V::Integer(_)) => V::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("expected an integer, got {raw:?}"))?,
        ),
        Some(V::Boolean(_)) => V::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("expected true or false, got {raw:?}")),
        }),
        Some(V::Array(_)) if raw.trim_start().starts_with('[') => {
            let t: toml::Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|e| format!("not a TOML array: {}", e.message()))?;
            t.get("v").cloned().unwrap_or(V::Array(vec![]))
        }
        Some(V::Array(_)) => V::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| V::String(s.to_owned()))
                .collect(),
        ),
        _ => V::String(raw.to_owned()),
    })
}

fn set_path(root: &mut toml::Value, path: &[String], leaf: toml::Value) {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        let toml::Value::Table(t) = cur else { return };
        if i + 1 == path.len() {
            t.insert(key.clone(), leaf);
            return;
        }
        cur = t
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Vec<(String, String)> {
        vec![
            (
                "TABHUB_AUTH_ISSUER".into(),
                "https://kc.example/realms/renku".into(),
            ),
            (
                "TABHUB_AUTH_CLIENT_IDS".into(),
                "renku-ui, renku-cli".into(),
            ),
        ]
    }

    #[test]
    fn env_overrides_typed_leaves_and_free_tables() {
        let mut env = minimal();
        env.push(("TABHUB_SESSION_LINGER_MS".into(), "250".into()));
        env.push(("TABHUB_ORIGINS_ALLOW_MISSING".into(), "true".into()));
        env.push((
            "TABHUB_BACKENDS_GATEWAY".into(),
            "http://gw.local/api".into(),
        ));
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.session.linger_ms, 250);
        assert!(c.origins.allow_missing);
        assert_eq!(c.auth.client_ids, vec!["renku-ui", "renku-cli"]);
        assert_eq!(c.backends["gateway"], "http://gw.local/api");
    }

    #[test]
    fn errors_name_the_key() {
        let mut env = minimal();
        env.push(("TABHUB_SESSION_LINGER_MS".into(), "soon".into()));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(
            e.contains("session.linger_ms") && e.contains("integer"),
            "{e}"
        );

        let e = Config::load(None, vec![]).unwrap_err().to_string();
        assert!(e.contains("auth.issuer"), "{e}");

        let e = Config::from_toml(toml::from_str("[session]\nlingr_ms = 3").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lingr_ms"), "{e}");

        let mut env = minimal();
        env.push(("TABHUB_SESSION_LOOP_TIMEOUT_MS".into(), "9000".into()));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("session.loop_timeout_ms"), "{e}");

        let mut env = minimal();
        env.push((
            "TABHUB_ORIGINS_ALLOWED".into(),
            "https://a.example/path".into(),
        ));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("origins.allowed[0]"), "{e}");
    }
}
