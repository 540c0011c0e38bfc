//! The services sessions and the hub use: configuration, metrics, the realm, backends, publish channels, the
//! upstream client, the webhook source's access checks, history and watchers, and token custody.
//!
//! A cheap shared handle (like mini-redis's `Db`): sessions hold an `Arc<Services>`, never the [`App`], so the
//! engine's arrows point one way (the HTTP layer sees the app; the app holds the hub; the hub holds sessions;
//! sessions hold services). Built first, from the configuration alone.
//!
//! [`App`]: crate::app::App

use std::sync::Arc;

use crate::access::Access;
use crate::auth::{AuthError, Realm, Verified};
use crate::backends::Backends;
use crate::channels::Channels;
use crate::config::Config;
use crate::custody::Custody;
use crate::history::History;
use crate::metrics::Metrics;
use crate::upstream::Upstream;
use crate::watchers::Watchers;

/// Why the services could not be built. Fails the start: a client silently built without its timeouts or its
/// no-redirect policy would be worse than no server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot build the HTTP client for {what}: {source}")]
    HttpClient {
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("{0}")]
    Commands(String),
}

pub struct Services {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub realm: Arc<Realm>,
    pub backends: Backends,
    /// Publish-only channels: who holds them, their replay buffers.
    pub channels: Channels,
    /// Upstream (GitLab) stream connections.
    pub upstream: Arc<Upstream>,
    /// Webhook source: who may see a project's events, the per-project event history, and who follows each
    /// project on this instance.
    pub access: Access,
    pub history: Arc<History>,
    pub watchers: Watchers,
    /// Token custody (login, server-side tokens), when enabled.
    pub custody: Option<Arc<Custody>>,
    /// Shown in `init`; distinguishes instances behind a load balancer.
    pub instance: String,
}

impl Services {
    /// Verifies an access token as every entry point must: signature, claims, and, with
    /// `custody.introspection`, not revoked at the identity provider. The handshake and the `authenticate` command
    /// both come here, so a token refused at one cannot enter through the other.
    pub async fn verify_token(&self, token: &str) -> Result<Verified, AuthError> {
        let verified = self.realm.verify(token).await?;
        self.check_revocation(&verified).await?;
        Ok(verified)
    }

    /// With `custody.introspection`, asks the identity provider whether the token is still active (cached):
    /// `active: false` is revoked; no answer refuses the token for now (retry), unless
    /// `custody.introspection_fail_open`.
    pub async fn check_revocation(&self, verified: &Verified) -> Result<(), AuthError> {
        let Some(custody) = self.custody.as_ref().filter(|c| c.config().introspection) else {
            return Ok(());
        };
        match custody.introspect(&verified.token).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuthError::Revoked),
            Err(_) if custody.config().introspection_fail_open => Ok(()),
            Err(_) => Err(AuthError::Retry(
                "the identity provider cannot confirm the token now",
            )),
        }
    }

    pub fn new(config: Config) -> Result<Arc<Services>, StartError> {
        crate::auth::crypto::install();
        let metrics = Arc::new(Metrics::default());
        let instance = if config.instance_id.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "tabhub".into());
            format!("{host}-{}", std::process::id())
        } else {
            config.instance_id.clone()
        };
        let http = |what| move |source| StartError::HttpClient { what, source };
        let realm = Realm::new(config.auth.clone()).map_err(http("the identity provider"))?;
        let custody = match config.custody.enabled {
            true => Some(Arc::new(
                Custody::new(&config, realm.clone(), metrics.clone())
                    .map_err(http("token custody"))?,
            )),
            false => None,
        };
        let backends = Backends::new(&config, metrics.clone()).map_err(http("backends"))?;
        let upstream = Upstream::new(&config.gitlab, metrics.clone()).map_err(http("GitLab"))?;
        Ok(Arc::new(Services {
            realm,
            custody,
            backends,
            upstream: Arc::new(upstream),
            channels: Channels::new(config.publish.max_buffered_topics),
            access: Access::new(&config.access, metrics.clone()),
            history: Arc::new(History::new(&config)),
            watchers: Watchers::default(),
            instance,
            metrics,
            config,
        }))
    }
}
