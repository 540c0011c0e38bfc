//! Token custody (backend-for-frontend): tabhub logs the browser in with the authorization code flow (PKCE, `state`,
//! `nonce`) as a confidential client, keeps the token set server-side under a random login id, and hands the
//! browser only an `HttpOnly` cookie. Sessions' loops and streams use the stored access token, refreshed before it
//! expires ([`Custody::refresh`]); back-channel logout drops logins whose Keycloak session ended.
//!
//! What custody keeps per browser is a *login*: begun at `/auth/login`, pending until `/auth/callback` (in a sealed
//! browser cookie, [`pending`]: nothing server-side, so an unauthenticated flood costs no memory), then one
//! [`StoredLogin`] under one login id (the cookie's value) until logout or the refresh token's expiry. It is not called a session because "session" already
//! means the per-user session (`crate::session`, all tabs of one user), Keycloak's session (`sid`, see
//! [`StoredLogin::kc_sid`]) and Renku's notebook sessions. Configuration keys and the cookie keep their names
//! (`custody.cookie_name`, default `tabhub_session`): operators' files and browsers' cookies must keep working.
//!
//! - [`store`]: where token sets live ([`TokenStore`]; in memory for one process);
//! - [`redis_store`]: in Redis, shared by the instances (`broker.kind = "redis"`), sealed by [`record`];
//! - [`pending`]: the pending login sealed in the browser (state, nonce, PKCE verifier, redirect);
//! - [`routes`]: `/auth/login`, `/auth/callback`, `/auth/me`, `/auth/logout`, `/auth/backchannel-logout`.
//!
//! Nothing here logs a token, a code or a login id.

pub mod pending;
pub mod record;
pub mod redis_store;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreJsonWebKeySet, CoreProviderMetadata,
};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet,
    EndpointSet, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    RefreshToken, RequestTokenError, Scope, TokenResponse,
};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{AuthError, Realm, Verified};
use crate::clock::now_unix;
use crate::config::{BrokerKind, Config, CustodyConfig};
use crate::metrics::Metrics;
use pending::{PendingLogin, Sealer, MAX_REDIRECT_BYTES};
use redis_store::{RedisSettings, RedisStore};
pub use store::{MemoryStore, StoredLogin, TokenStore};
use store::{RefreshTurn, Shared};

type OidcClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Why a custody operation failed. The texts are shown to users: no secrets in them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustodyError {
    #[error("the identity provider is not ready (discovery not loaded)")]
    NotReady,
    #[error("redirect target not allowed: use a relative path or an allowed origin")]
    BadRedirect,
    #[error("the redirect is too long (at most {MAX_REDIRECT_BYTES} bytes)")]
    RedirectTooLong,
    #[error("no login in progress in this browser (missing, invalid or expired login cookie); start the login again")]
    NoPendingLogin,
    #[error("this login was not started in this browser; start the login again")]
    UnknownState,
    #[error("login failed: {0}")]
    LoginFailed(String),
    #[error("no such login")]
    NoLogin,
    #[error("the identity provider refused the refresh token; log in again")]
    Rejected,
    #[error("the identity provider is unreachable")]
    Unavailable,
    #[error("invalid logout token: {0}")]
    BadLogoutToken(&'static str),
}

/// Why an introspection gave no answer (logged; the status is in the text only as "an error status", never the
/// body, which could echo the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IntrospectionFailed(pub &'static str);

/// The token-custody service.
pub struct Custody {
    config: CustodyConfig,
    allowed_origins: Vec<String>,
    realm: Arc<Realm>,
    http: reqwest::Client,
    store: Arc<dyn TokenStore>,
    /// Seals pending logins into the login cookie (`custody.login_cookie_key`). `None` when the configured key is
    /// unusable (a configuration that skipped validation): logins are then refused, never sealed with a key the
    /// operator did not choose.
    sealer: Option<Sealer>,
    /// Refreshes in flight or just done, keyed by the refresh token they used: concurrent refreshes of one
    /// login share one request, and a late caller holding the rotated-out token gets the new set.
    refreshes: moka::future::Cache<Arc<str>, StoredLogin>,
    /// Introspection answers by token, for `introspection_cache_ms` (failures are not kept).
    introspected: moka::future::Cache<Arc<str>, bool>,
    /// Logout tokens' `jti`s already seen.
    seen_jti: moka::future::Cache<String, ()>,
    /// How long another instance's refresh of a login is waited for before trying again (its lock's lifetime).
    refresh_wait: Duration,
    metrics: Arc<Metrics>,
}

/// Most logins kept (in memory; locally with Redis).
const MAX_LOGINS: u64 = 1_000_000;

/// The store the configuration names: Redis with a Redis broker (sealed with `custody.store_keys`), else memory.
fn token_store(config: &Config, lock_ttl: Duration) -> Arc<dyn TokenStore> {
    if config.broker.kind != BrokerKind::Redis {
        return Arc::new(MemoryStore::new(MAX_LOGINS));
    }
    let keys = config
        .custody
        .store_key_bytes()
        .ok()
        .and_then(|k| record::Keys::new(&k));
    let client = redis::Client::open(config.broker.redis_url.as_str()).ok();
    match (keys, client) {
        (Some(keys), Some(client)) => {
            let b = &config.broker;
            Arc::new(Arc::new(RedisStore::new(
                RedisSettings {
                    client,
                    timeout: Duration::from_millis(b.timeout_ms),
                    lock_ttl,
                    default_refresh_lifetime: Duration::from_millis(
                        config.custody.default_refresh_lifetime_ms,
                    ),
                    reconnect_initial: Duration::from_millis(b.reconnect_initial_ms),
                    reconnect_max: Duration::from_millis(b.reconnect_max_ms),
                },
                keys,
                MAX_LOGINS,
            )))
        }
        // Only a configuration that skipped validation gets here.
        _ => {
            tracing::error!(
                "custody.store_keys or broker.redis_url unusable: logins are kept in this process only"
            );
            Arc::new(MemoryStore::new(MAX_LOGINS))
        }
    }
}

/// Whether `shared` is a later token set than `ours` (another instance refreshed it).
fn newer(shared: &StoredLogin, ours: &StoredLogin) -> bool {
    shared.refresh_token != ours.refresh_token || shared.access_token != ours.access_token
}

/// A random, URL-safe login id (256 bits).
fn new_login_id() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The claims of a JWT, read without verification: callers either verified it already (the ID token, by
/// openidconnect) or only need a hint (the refresh token's lifetime: Keycloak's are JWTs signed with a realm secret
/// we do not have; other providers' are opaque, and give `None`).
fn unverified_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()
}

fn unverified_exp(jwt: &str) -> Option<u64> {
    unverified_claims(jwt)?.get("exp")?.as_u64()
}

/// The `sid` of an ID token openidconnect verified (its claims type does not carry `sid`).
fn id_token_sid(id_token: &str) -> Option<String> {
    unverified_claims(id_token)?
        .get("sid")?
        .as_str()
        .map(str::to_owned)
}

impl Custody {
    pub fn new(
        config: &Config,
        realm: Arc<Realm>,
        metrics: Arc<Metrics>,
    ) -> Result<Custody, reqwest::Error> {
        let c = config.custody.clone();
        let allowed_origins = if c.allowed_redirect_origins.is_empty() {
            config.origins.allowed.clone()
        } else {
            c.allowed_redirect_origins.clone()
        };
        // A refresh is one token request and a verification, which may wait for the next allowed key fetch and
        // make it: the lock outlives all of them, so no other instance spends the refresh token meanwhile.
        let refresh_wait = Duration::from_millis(
            config
                .auth
                .http_timeout_ms
                .saturating_mul(3)
                .saturating_add(config.auth.jwks_refetch_min_interval_ms),
        );
        Ok(Custody {
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(config.auth.http_timeout_ms))
                // No redirects when talking to the identity provider (SSRF, as openidconnect recommends).
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            store: token_store(config, refresh_wait),
            refresh_wait,
            sealer: {
                let sealer = c
                    .login_cookie_key_bytes()
                    .ok()
                    .and_then(|key| Sealer::new(key).ok());
                if sealer.is_none() {
                    tracing::error!("custody.login_cookie_key is unusable: logins are refused");
                }
                sealer
            },
            refreshes: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            introspected: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_millis(c.introspection_cache_ms.max(1)))
                .build(),
            seen_jti: moka::future::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_millis(c.logout_token_max_age_ms * 2))
                .build(),
            allowed_origins,
            realm,
            metrics,
            config: c,
        })
    }

    pub fn config(&self) -> &CustodyConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    fn client(&self) -> Result<OidcClient, CustodyError> {
        let discovery = self.realm.discovery().ok_or(CustodyError::NotReady)?;
        let jwks = self.realm.jwks_document().ok_or(CustodyError::NotReady)?;
        let metadata: CoreProviderMetadata = serde_json::from_value(discovery.document)
            .map_err(|e| CustodyError::LoginFailed(format!("discovery document: {e}")))?;
        let jwks: CoreJsonWebKeySet = serde_json::from_value(jwks)
            .map_err(|e| CustodyError::LoginFailed(format!("JWKS: {e}")))?;
        let redirect = RedirectUrl::new(self.config.redirect_uri.clone())
            .map_err(|e| CustodyError::LoginFailed(format!("custody.redirect_uri: {e}")))?;
        Ok(CoreClient::from_provider_metadata(
            metadata.set_jwks(jwks),
            ClientId::new(self.config.client_id.clone()),
            Some(ClientSecret::new(self.config.client_secret.clone())),
        )
        .set_redirect_uri(redirect))
    }

    /// Checks a `?redirect=` target: a relative path, or a URL on an allowed origin. Returns where to go.
    pub fn check_redirect(&self, target: Option<&str>) -> Result<String, CustodyError> {
        let Some(t) = target.filter(|t| !t.is_empty()) else {
            return Ok("/".into());
        };
        if t.len() > MAX_REDIRECT_BYTES {
            return Err(CustodyError::RedirectTooLong);
        }
        let relative = t.starts_with('/')
            && !t.starts_with("//")
            && !t.contains('\\')
            && !t.chars().any(char::is_control);
        if relative {
            return Ok(t.to_owned());
        }
        let url = url::Url::parse(t).map_err(|_| CustodyError::BadRedirect)?;
        if self
            .allowed_origins
            .contains(&url.origin().ascii_serialization())
        {
            // Normalization may lengthen it (percent-encoding).
            let url = url.to_string();
            if url.len() > MAX_REDIRECT_BYTES {
                return Err(CustodyError::RedirectTooLong);
            }
            Ok(url)
        } else {
            Err(CustodyError::BadRedirect)
        }
    }

    /// Starts a login: the URL of the realm's authorization endpoint to send the browser to, and the value of the
    /// login cookie (`custody.login_cookie_name`) to set with it. Nothing is kept server-side.
    pub async fn login_url(
        &self,
        redirect: Option<&str>,
    ) -> Result<(String, String), CustodyError> {
        let redirect = self.check_redirect(redirect)?;
        let sealer = self.sealer.as_ref().ok_or(CustodyError::NotReady)?;
        let client = self.client()?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut req = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for s in self.config.scopes.iter().filter(|s| *s != "openid") {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = req.set_pkce_challenge(challenge).url();
        let cookie = sealer
            .seal(&PendingLogin {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                verifier: verifier.secret().clone(),
                redirect,
                issued_at_ms: pending::now_ms(),
            })
            .map_err(|_| CustodyError::LoginFailed("cannot seal the login cookie".into()))?;
        Ok((url.to_string(), cookie))
    }

    /// Finishes a login: opens the browser's login cookie (`cookie`, its value if any), checks that the callback's
    /// `state` is the one sealed in it (so the login was started by this very browser: login CSRF), exchanges the
    /// code, verifies the ID token, stores the token set. Returns the new login id, the stored login and where to
    /// send the browser.
    pub async fn callback(
        &self,
        code: &str,
        state: &str,
        cookie: Option<&str>,
    ) -> Result<(String, StoredLogin, String), CustodyError> {
        let sealer = self.sealer.as_ref().ok_or(CustodyError::NotReady)?;
        let started = cookie
            .and_then(|c| {
                sealer
                    .open(c, pending::now_ms(), self.config.login_timeout_ms)
                    .ok()
            })
            .ok_or(CustodyError::NoPendingLogin)?;
        if !pending::constant_time_eq(started.state.as_bytes(), state.as_bytes()) {
            return Err(CustodyError::UnknownState);
        }
        let client = self.client()?;
        let resp = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| CustodyError::LoginFailed(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(started.verifier))
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => CustodyError::LoginFailed(format!(
                    "the identity provider refused the code: {}",
                    r.error()
                )),
                _ => CustodyError::Unavailable,
            })?;
        let id_token = resp
            .id_token()
            .ok_or_else(|| CustodyError::LoginFailed("no ID token in the answer".into()))?;
        let claims = id_token
            .claims(&client.id_token_verifier(), &Nonce::new(started.nonce))
            .map_err(|e| CustodyError::LoginFailed(format!("ID token: {e}")))?;
        let sub = claims.subject().as_str().to_owned();
        let stored = self
            .to_stored(
                resp.access_token().secret(),
                resp.refresh_token().map(|r| r.secret().as_str()),
                Some(id_token.to_string()),
                None,
            )
            .await?;
        if stored.user.id != sub {
            return Err(CustodyError::LoginFailed(
                "the access token and the ID token name different users".into(),
            ));
        }
        let login_id = new_login_id();
        self.store.put(&login_id, stored.clone()).await;
        tracing::info!(user = %stored.user.id, "logged in");
        Ok((login_id, stored, started.redirect))
    }

    /// Builds a stored login from a token answer; the access token is verified like any other.
    async fn to_stored(
        &self,
        access: &str,
        refresh: Option<&str>,
        id_token: Option<String>,
        previous: Option<&StoredLogin>,
    ) -> Result<StoredLogin, CustodyError> {
        let verified = match self.realm.verify(access).await {
            // Signed with a key newer than the last key fetch: the token endpoint just answered, so the token is
            // the realm's; wait for the next allowed refetch rather than lose the set (a rotated refresh token
            // cannot be asked for again).
            Err(AuthError::Retry(_)) => {
                tokio::time::sleep(self.realm.next_refetch_in().await).await;
                self.realm.verify(access).await
            }
            other => other,
        }
        .map_err(|e| match e {
            AuthError::Unavailable | AuthError::Retry(_) => CustodyError::Unavailable,
            e => CustodyError::LoginFailed(format!("access token: {e}")),
        })?;
        let refresh: Arc<str> = match (refresh, previous) {
            (Some(r), _) => Arc::from(r),
            (None, Some(p)) => p.refresh_token.clone(),
            (None, None) => {
                return Err(CustodyError::LoginFailed(
                    "no refresh token in the answer (offline sessions need one)".into(),
                ))
            }
        };
        let now = now_unix();
        let lifetime = unverified_exp(&refresh)
            .map(|exp| Duration::from_secs(exp.saturating_sub(now)))
            .unwrap_or(Duration::from_millis(
                self.config.default_refresh_lifetime_ms,
            ));
        // The provider's session id, for back-channel logout: an access token need not carry it (RFC 9068's do
        // not), the ID token does when the provider supports back-channel logout with sessions.
        let kc_sid = id_token
            .as_deref()
            .and_then(id_token_sid)
            .or_else(|| verified.sid.clone())
            .or_else(|| previous.and_then(|p| p.kc_sid.clone()));
        Ok(StoredLogin {
            kc_sid,
            user: verified.user,
            access_exp: verified.exp,
            access_token: verified.token,
            refresh_token: refresh,
            refresh_expires: Instant::now() + lifetime,
            id_token: id_token
                .map(Arc::from)
                .or_else(|| previous.and_then(|p| p.id_token.clone())),
        })
    }

    /// The login's access token, refreshed first if it expires within the tolerance; as a verified token whose
    /// `source` is the login id.
    pub async fn fresh_token(&self, login_id: &str) -> Result<Verified, CustodyError> {
        let stored = self
            .store
            .get(login_id)
            .await
            .ok_or(CustodyError::NoLogin)?;
        let tolerance = self.config.refresh_tolerance_ms.div_ceil(1000);
        let stored = if stored.access_exp <= now_unix() + tolerance {
            self.refresh(login_id).await?
        } else {
            stored
        };
        self.verified(login_id, &stored).await
    }

    async fn verified(
        &self,
        login_id: &str,
        stored: &StoredLogin,
    ) -> Result<Verified, CustodyError> {
        let mut v = self
            .realm
            .verify(&stored.access_token)
            .await
            .map_err(|e| match e {
                AuthError::Unavailable | AuthError::Retry(_) => CustodyError::NotReady,
                _ => CustodyError::Rejected,
            })?;
        v.login = Some(Arc::from(login_id));
        Ok(v)
    }

    /// Refreshes a login's tokens. Concurrent calls for one login share one request; a rotated refresh token is
    /// stored. With instances sharing logins, one refreshes at a time and the others take its result
    /// ([`Custody::refresh_in_turn`]). `Rejected` (Keycloak said `invalid_grant`...) drops the stored login.
    pub async fn refresh(&self, login_id: &str) -> Result<StoredLogin, CustodyError> {
        let stored = self
            .store
            .get(login_id)
            .await
            .ok_or(CustodyError::NoLogin)?;
        let key = stored.refresh_token.clone();
        let result = self
            .refreshes
            .try_get_with(key, self.refresh_in_turn(login_id, stored))
            .await
            .map_err(|e: Arc<CustodyError>| (*e).clone());
        if let Err(CustodyError::Rejected) = result {
            self.store.remove(login_id).await;
        }
        result
    }

    /// Refreshes when this instance holds the login's refresh lock; while another instance holds it, waits for its
    /// result (a later token set in the store), taking the lock over if that instance died holding it.
    async fn refresh_in_turn(
        &self,
        login_id: &str,
        stored: StoredLogin,
    ) -> Result<StoredLogin, CustodyError> {
        let deadline = tokio::time::Instant::now() + self.refresh_wait * 2;
        loop {
            let turn = self.store.lock_refresh(login_id).await;
            if turn != RefreshTurn::Theirs {
                let result = self.refresh_holding(login_id, stored).await;
                self.store.unlock_refresh(login_id, turn).await;
                return result;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CustodyError::Unavailable);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            match self.store.reload(login_id).await {
                Shared::Found(s) if newer(&s, &stored) => return Ok(s),
                Shared::Gone => return Err(CustodyError::NoLogin),
                _ => {}
            }
        }
    }

    /// The refresh itself, in this instance's turn: from the store's newest token set (if another instance
    /// refreshed it meanwhile and its access token is fresh, that set is the answer, and no request is made).
    async fn refresh_holding(
        &self,
        login_id: &str,
        stored: StoredLogin,
    ) -> Result<StoredLogin, CustodyError> {
        let base = match self.store.reload(login_id).await {
            Shared::Found(s) => s,
            Shared::Gone => return Err(CustodyError::NoLogin),
            Shared::Unreachable => stored.clone(),
        };
        let tolerance = self.config.refresh_tolerance_ms.div_ceil(1000);
        if newer(&base, &stored) && base.access_exp > now_unix() + tolerance {
            return Ok(base);
        }
        let new = self.exchange_refresh(&base).await?;
        // Do not resurrect a login logged out meanwhile.
        if self.store.get(login_id).await.is_some() {
            self.store.put(login_id, new.clone()).await;
        }
        Ok(new)
    }

    async fn exchange_refresh(&self, stored: &StoredLogin) -> Result<StoredLogin, CustodyError> {
        let client = self.client()?;
        let token = RefreshToken::new(stored.refresh_token.to_string());
        let resp = client
            .exchange_refresh_token(&token)
            .map_err(|_| CustodyError::Unavailable)?
            .request_async(&self.http)
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(RequestTokenError::ServerResponse(r)) => {
                self.metrics.token_refreshes.inc(&["rejected"]);
                tracing::info!(user = %stored.user.id, error = %r.error(), "refresh refused");
                return Err(CustodyError::Rejected);
            }
            Err(_) => {
                self.metrics.token_refreshes.inc(&["unavailable"]);
                return Err(CustodyError::Unavailable);
            }
        };
        let id_token = resp.id_token().map(|t| t.to_string());
        let new = self
            .to_stored(
                resp.access_token().secret(),
                resp.refresh_token().map(|r| r.secret().as_str()),
                id_token,
                Some(stored),
            )
            .await
            .map_err(|e| match e {
                CustodyError::Unavailable => e,
                _ => CustodyError::Rejected,
            })?;
        if new.user.id != stored.user.id {
            return Err(CustodyError::Rejected);
        }
        self.metrics.token_refreshes.inc(&["ok"]);
        Ok(new)
    }

    /// RFC 7662: is the token still active at the realm? Answers (active or not) are cached for
    /// `introspection_cache_ms`, so a reconnect storm costs one request per token; failures are not cached.
    /// `Err` when the realm could not answer (no endpoint, unreachable, a non-2xx status, no boolean `active`):
    /// logged here, without the token; the caller decides (`introspection_fail_open`).
    pub async fn introspect(&self, token: &Arc<str>) -> Result<bool, IntrospectionFailed> {
        let answer = self
            .introspected
            .try_get_with(token.clone(), self.ask_introspection(token))
            .await
            .map_err(|e: Arc<IntrospectionFailed>| (*e).clone());
        let result = match &answer {
            Ok(true) => "active",
            Ok(false) => "inactive",
            Err(_) if self.config.introspection_fail_open => "error_fail_open",
            Err(_) => "error",
        };
        if let Err(e) = &answer {
            tracing::warn!(error = %e, fail_open = self.config.introspection_fail_open, "token introspection failed");
        }
        self.metrics.introspections.inc(&[result]);
        answer
    }

    async fn ask_introspection(&self, token: &str) -> Result<bool, IntrospectionFailed> {
        let url = self
            .realm
            .discovery()
            .and_then(|d| d.introspection_endpoint)
            .ok_or(IntrospectionFailed(
                "the discovery document has no introspection_endpoint",
            ))?;
        let resp = self
            .http
            .post(&url)
            .basic_auth(&self.config.client_id, Some(&self.config.client_secret))
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .map_err(|_| IntrospectionFailed("the introspection endpoint is unreachable"))?;
        if !resp.status().is_success() {
            return Err(IntrospectionFailed(
                "the introspection endpoint answered an error status",
            ));
        }
        resp.json::<Value>()
            .await
            .ok()
            .and_then(|v| v.get("active").and_then(Value::as_bool))
            .ok_or(IntrospectionFailed(
                "the introspection answer has no boolean active",
            ))
    }

    /// Drops a login and returns where to send the browser for the realm's logout (RP-initiated logout).
    pub async fn logout(&self, login_id: &str) -> (Option<StoredLogin>, Option<String>) {
        let stored = self.store.remove(login_id).await;
        let end = self
            .realm
            .discovery()
            .and_then(|d| d.end_session_endpoint)
            .and_then(|e| url::Url::parse(&e).ok())
            .map(|mut url| {
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("client_id", &self.config.client_id);
                    if let Some(id) = stored.as_ref().and_then(|s| s.id_token.as_deref()) {
                        q.append_pair("id_token_hint", id);
                    }
                    if !self.config.post_logout_redirect_uri.is_empty() {
                        q.append_pair(
                            "post_logout_redirect_uri",
                            &self.config.post_logout_redirect_uri,
                        );
                    }
                }
                url.to_string()
            });
        if let Some(s) = &stored {
            tracing::info!(user = %s.user.id, "logged out");
        }
        (stored, end)
    }

    /// OpenID Connect Back-Channel Logout 1.0: verifies the logout token and drops the logins it names (by Keycloak
    /// session or by user). Returns the dropped logins (tokens, and the login id when known here) so their tabs can
    /// be closed.
    pub async fn backchannel_logout(
        &self,
        logout_token: &str,
    ) -> Result<Vec<(Option<String>, StoredLogin)>, CustodyError> {
        #[derive(Deserialize)]
        struct LogoutClaims {
            iat: Option<u64>,
            jti: Option<String>,
            sid: Option<String>,
            sub: Option<String>,
            events: Option<serde_json::Map<String, Value>>,
            nonce: Option<Value>,
        }
        const EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
        let client_id = self.config.client_id.clone();
        let claims: LogoutClaims = self
            .realm
            .verify_jwt(logout_token, |v| {
                v.set_required_spec_claims(&["iss", "aud"]);
                v.validate_exp = false;
                v.validate_aud = true;
                v.set_audience(&[client_id.as_str()]);
            })
            .await
            .map_err(|e| {
                CustodyError::BadLogoutToken(match e {
                    AuthError::Invalid(why) => why,
                    _ => "cannot be verified now",
                })
            })?;
        let now = now_unix();
        let max_age = self.config.logout_token_max_age_ms.div_ceil(1000);
        let leeway = self.realm.config().leeway_secs;
        match claims.iat {
            None => return Err(CustodyError::BadLogoutToken("missing iat")),
            Some(iat) if iat > now + leeway || now.saturating_sub(iat) > max_age => {
                return Err(CustodyError::BadLogoutToken("iat out of range"))
            }
            Some(_) => {}
        }
        if claims.nonce.is_some() {
            return Err(CustodyError::BadLogoutToken(
                "a logout token must not carry a nonce",
            ));
        }
        if !claims
            .events
            .as_ref()
            .is_some_and(|e| e.contains_key(EVENT))
        {
            return Err(CustodyError::BadLogoutToken(
                "missing the back-channel logout event",
            ));
        }
        if claims.sid.is_none() && claims.sub.is_none() {
            return Err(CustodyError::BadLogoutToken("neither sid nor sub"));
        }
        let jti = claims
            .jti
            .ok_or(CustodyError::BadLogoutToken("missing jti"))?;
        let entry = self.seen_jti.entry(jti).or_insert(()).await;
        if !entry.is_fresh() {
            return Err(CustodyError::BadLogoutToken("replayed (jti already seen)"));
        }
        let dropped = self
            .store
            .remove_matching(claims.sid.as_deref(), claims.sub.as_deref())
            .await;
        if dropped.is_empty() {
            // Not an error for the provider (the login may have ended here first), but a logout token that matches
            // nothing may also be a login tabhub cannot match (no sid kept): worth seeing. Never the token, nor
            // the session id.
            tracing::warn!(
                by_sid = claims.sid.is_some(),
                user = claims.sub.as_deref().unwrap_or(""),
                "back-channel logout matched no login"
            );
        } else {
            tracing::info!(logins = dropped.len(), "back-channel logout");
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custody(origins: &[&str]) -> Custody {
        let mut c = Config::default();
        c.origins.allowed = origins.iter().map(|s| s.to_string()).collect();
        let realm = Realm::new(c.auth.clone()).unwrap();
        Custody::new(&c, realm, Arc::new(Metrics::default())).unwrap()
    }

    #[test]
    fn redirects_are_relative_or_allowed() {
        let c = custody(&["https://renku.example"]);
        assert_eq!(c.check_redirect(None).unwrap(), "/");
        assert_eq!(
            c.check_redirect(Some("/projects?x=1")).unwrap(),
            "/projects?x=1"
        );
        assert!(c.check_redirect(Some("https://renku.example/p")).is_ok());
        for bad in [
            "//evil.example/x",
            "https://evil.example/",
            "https://renku.example.evil.example/",
            "/\\evil.example",
            "javascript:alert(1)",
            "http://renku.example/",
        ] {
            assert_eq!(
                c.check_redirect(Some(bad)),
                Err(CustodyError::BadRedirect),
                "{bad}"
            );
        }
    }

    #[test]
    fn login_ids_are_long_and_distinct() {
        let (a, b) = (new_login_id(), new_login_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
    }
}
