//! Configuration: a TOML file, then `TABHUB_*` environment variables, over a documented default for every key.
//!
//! Every leaf key has an environment name: `TABHUB_` + its dotted path in upper case with `_` for `.`
//! (`session.linger_ms` -> `TABHUB_SESSION_LINGER_MS`). Free-form tables (`backends`, `commands`) take any key:
//! `TABHUB_BACKENDS_GATEWAY=http://...`. Lists are comma-separated or a TOML array. Durations are in milliseconds,
//! named `*_ms`. A bad value fails at start with a message naming the key and the problem.
//!
//! This module holds the root [`Config`], loading and errors; [`env`] the environment overlay; every other file
//! one section (or a few related ones): its struct, its `Default` and its checks, which [`Config::validate`] calls
//! in turn. The sections are re-exported here, so `crate::config::GitlabConfig` and the like keep their paths.

mod auth;
mod backend;
mod custody;
mod drain;
mod env;
mod error;
mod gitlab;
mod hooks;
mod http;
mod limits;
mod log;
mod metrics;
mod publish;
mod session;
mod websocket;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use auth::{parse_algorithm, AuthConfig, OriginConfig};
pub use backend::BackendConfig;
pub use custody::CustodyConfig;
pub use drain::DrainConfig;
pub use env::{CLIENT_ENV_PREFIX, CONNECT_TOKEN_ENV};
pub use error::ConfigError;
pub use gitlab::{GitlabConfig, GitlabSource};
pub use hooks::{AccessConfig, HooksConfig};
pub use http::HttpConfig;
pub use limits::LimitsConfig;
pub use log::{LogConfig, LogFormat};
pub use metrics::{Cidr, MetricsConfig};
pub use publish::{BrokerConfig, BrokerKind, PublishConfig};
pub use session::SessionConfig;
pub use websocket::WebSocketConfig;

/// The whole configuration. `Config::default()` is the documented default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the main listener (websocket, health, auth, publish; metrics unless `metrics.listen` is set).
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
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub drain: DrainConfig,
    pub gitlab: GitlabConfig,
    pub hooks: HooksConfig,
    pub access: AccessConfig,
    pub custody: CustodyConfig,
    pub publish: PublishConfig,
    pub broker: BrokerConfig,
    /// Backends the loop functions call as the user: name -> base URL (for example `gateway`).
    pub backends: BTreeMap<String, String>,
    /// Settings for commands (the `[commands]` table is handed to them as JSON), e.g. `ui_version`.
    pub commands: toml::Table,
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
            http: HttpConfig::default(),
            metrics: MetricsConfig::default(),
            drain: DrainConfig::default(),
            gitlab: GitlabConfig::default(),
            hooks: HooksConfig::default(),
            access: AccessConfig::default(),
            custody: CustodyConfig::default(),
            publish: PublishConfig::default(),
            broker: BrokerConfig::default(),
            backends: BTreeMap::new(),
            commands: toml::Table::new(),
        }
    }
}

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
        let defaults = toml::Value::try_from(Config::default()).map_err(|e| ConfigError::Key {
            key: "(defaults)".into(),
            message: e.to_string(),
        })?;
        env::apply_env(&mut value, &defaults, env)?;
        Config::from_toml(value)
    }

    /// Builds a configuration from a TOML value over the defaults, and validates it.
    pub fn from_toml(value: toml::Value) -> Result<Config, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            error::key_error(&key, e.into_inner().message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot: each section in turn, the first problem found is the error. Checks that
    /// relate two sections live with the key they name (`backend.timeout_ms` against the session's interval,
    /// `auth.client_ids` against custody's client).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.auth.validate()?;
        self.origins.validate()?;
        self.websocket.validate()?;
        self.session.validate()?;
        self.backend.validate(&self.session)?;
        self.limits.validate()?;
        self.http.validate()?;
        self.metrics.validate()?;
        self.gitlab.validate()?;
        self.hooks.validate(&self.websocket.paths)?;
        let receives = self.gitlab.source == GitlabSource::Webhook && !self.gitlab.url.is_empty();
        if receives && self.hooks.secrets.is_empty() {
            // Subscriptions would be accepted and never fed.
            return Err(error::key_error(
                "hooks.secrets",
                "required with gitlab.source = \"webhook\" (the X-Gitlab-Token of GitLab's webhook)",
            ));
        }
        self.access.validate()?;
        self.broker.validate()?;
        self.publish.validate()?;
        self.custody.validate(&self.auth, &self.broker)?;
        backend::validate_backends(&self.backends)
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

    #[test]
    fn the_webhook_source_needs_a_secret() {
        let mut env = minimal();
        env.push(("TABHUB_GITLAB_URL".into(), "https://gitlab.example".into()));
        env.push(("TABHUB_GITLAB_SOURCE".into(), "webhook".into()));
        let e = Config::load(None, env.clone()).unwrap_err().to_string();
        assert!(e.contains("hooks.secrets"), "{e}");
        env.push(("TABHUB_HOOKS_SECRETS".into(), "short".into()));
        let e = Config::load(None, env.clone()).unwrap_err().to_string();
        assert!(
            e.contains("hooks.secrets[0]") && !e.contains("short"),
            "{e}"
        );
        env.pop();
        env.push((
            "TABHUB_HOOKS_SECRETS".into(),
            "a-long-enough-secret,another-long-secret".into(),
        ));
        let c = Config::load(None, env.clone()).unwrap();
        assert_eq!(c.hooks.secrets.len(), 2);
        env.push(("TABHUB_HOOKS_PATH".into(), "/ws".into()));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("hooks.path"), "{e}");
    }

    #[test]
    fn custody_on_redis_needs_store_keys_and_names_a_bad_one_without_showing_it() {
        let mut env = minimal();
        for (k, v) in [
            ("TABHUB_AUTH_CLIENT_IDS", "renku-ui, tabhub"),
            ("TABHUB_CUSTODY_ENABLED", "true"),
            ("TABHUB_CUSTODY_CLIENT_ID", "tabhub"),
            ("TABHUB_CUSTODY_CLIENT_SECRET", "s"),
            (
                "TABHUB_CUSTODY_REDIRECT_URI",
                "https://t.example/auth/callback",
            ),
            ("TABHUB_BROKER_KIND", "redis"),
            ("TABHUB_BROKER_REDIS_URL", "redis://127.0.0.1:6379/"),
        ] {
            env.retain(|(name, _)| name != k);
            env.push((k.into(), v.into()));
        }
        let e = Config::load(None, env.clone()).unwrap_err().to_string();
        assert!(
            e.contains("custody.store_keys") && e.contains("redis"),
            "{e}"
        );

        let mut bad = env.clone();
        bad.push((
            "TABHUB_CUSTODY_STORE_KEYS".into(),
            "c2VjcmV0LXNlY3JldA==".into(),
        ));
        let e = Config::load(None, bad).unwrap_err().to_string();
        assert!(
            e.contains("custody.store_keys[0]") && e.contains("32 bytes"),
            "{e}"
        );
        assert!(!e.contains("c2VjcmV0"), "the key is not shown: {e}");

        env.push((
            "TABHUB_CUSTODY_STORE_KEYS".into(),
            "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=, AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
        ));
        let c = Config::load(None, env).unwrap();
        assert_eq!(
            c.custody.store_key_bytes().unwrap(),
            vec![[2u8; 32], [1u8; 32]]
        );
    }

    #[test]
    fn enum_keys_take_their_lowercase_names_and_refuse_others_naming_the_allowed_ones() {
        let mut env = minimal();
        env.push(("TABHUB_LOG_FORMAT".into(), "json".into()));
        env.push(("TABHUB_BROKER_KIND".into(), "memory".into()));
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.broker.kind, BrokerKind::Memory);
        assert_eq!(Config::default().log.format, LogFormat::Text);

        let mut env = minimal();
        env.push(("TABHUB_LOG_FORMAT".into(), "xml".into()));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(
            e.contains("log.format") && e.contains("text") && e.contains("json"),
            "{e}"
        );

        let mut env = minimal();
        env.push(("TABHUB_BROKER_KIND".into(), "kafka".into()));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(
            e.contains("broker.kind") && e.contains("memory") && e.contains("redis"),
            "{e}"
        );

        let e = Config::from_toml(toml::from_str("[broker]\nkind = \"Redis\"").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.kind"), "{e}");
    }
}
