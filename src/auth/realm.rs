//! The realm: its discovery document and signing keys, loaded at start with retry and refreshed on key rotation.
//!
//! Readiness (`/readyz`) waits for the first successful load. A token signed with a `kid` the cached key set does
//! not know triggers a refetch ([`Realm::key_set_with`]), so a realm can rotate keys without a restart: Keycloak
//! signs with a new key as soon as it is active, so the first token naming it may arrive right after a fetch.
//! Refetches are throttled overall (one per `auth.jwks_refetch_min_interval_ms`) and per `kid` (a `kid` absent from
//! a fetch that began after the token arrived is refused for an interval without any request), and one refetch
//! serves every token waiting for it: a flood of forged `kid`s cannot turn into a flood of requests to the realm,
//! nor keep a genuine new key out. Inside the throttle, a token waits for the next allowed refetch for at most
//! `auth.jwks_unknown_kid_wait_ms`, else is told to retry ([`AuthError::Retry`], never "invalid": the same token
//! will work). Keys are also refetched every `auth.jwks_refresh_interval_ms`: a key the realm withdraws is noticed
//! at the next refetch of either kind, and from then on refused (cached verified tokens included).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::verified::AuthError;
use crate::config::AuthConfig;

/// The fields of the discovery document tabhub uses, plus the whole document (token custody needs more of it).
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    #[serde(skip)]
    pub document: Value,
}

/// A verification key and the algorithm family it may be used with.
pub(crate) struct Key {
    pub decoding: DecodingKey,
    pub kind: KeyKind,
    /// The JWK's `alg`, when it states one: the token's header must then use exactly it.
    pub alg: Option<Algorithm>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    Ec,
    Ed,
}

pub(crate) struct Loaded {
    pub discovery: Discovery,
    pub keys: HashMap<String, Key>,
    /// The JWKS document as served (openidconnect verifies ID tokens with it).
    pub jwks: Value,
}

/// When key fetches began, for the throttle and for the tokens waiting on them.
#[derive(Default)]
struct Fetches {
    /// The last fetch of any kind: the next one for an unknown `kid` comes `jwks_refetch_min_interval_ms` later.
    started: Option<Instant>,
    /// The last successful one: a `kid` unknown since before it began is not published by the realm.
    ok_started: Option<Instant>,
    /// The last failed one: a `kid` unknown since before it began cannot be looked up now.
    failed_started: Option<Instant>,
}

impl Fetches {
    fn begin(&mut self) -> Instant {
        let now = Instant::now();
        self.started = Some(now);
        now
    }

    fn end(&mut self, started: Instant, ok: bool) {
        if ok {
            self.ok_started = Some(started);
        } else {
            self.failed_started = Some(started);
        }
    }
}

/// Why loading failed; logged, never shown to clients.
#[derive(Debug, thiserror::Error)]
pub enum RealmError {
    #[error("request to {url} failed: {message}")]
    Http { url: String, message: String },
    #[error("discovery document: {0}")]
    Discovery(String),
    #[error("JWKS: {0}")]
    Jwks(String),
}

/// The realm's keys and endpoints, shared by every handshake.
pub struct Realm {
    config: AuthConfig,
    http: reqwest::Client,
    loaded: RwLock<Option<Arc<Loaded>>>,
    /// The key fetches so far; held during a fetch, so that the tokens waiting for one share it.
    fetches: tokio::sync::Mutex<Fetches>,
    /// `kid`s a recent successful fetch did not have (the per-`kid` throttle), for `jwks_refetch_min_interval_ms`.
    absent: moka::sync::Cache<String, ()>,
    /// Tokens already verified, by token: a user's tabs, reloads and reconnect storms present the same token
    /// again, and an RSA verification is about half of a handshake's CPU. Entries live at most a minute, a hit
    /// re-checks `exp`, and a fetched key set that lost a key empties the cache (see `install`).
    pub(crate) verified: moka::sync::Cache<Arc<str>, super::verified::Verified>,
    /// How many fetched key sets lost a key: a verification that straddles one must not cache its result, and
    /// the sessions re-check their tokens after each (see [`crate::hub::recheck_on_withdrawal`]).
    withdrawals: tokio::sync::watch::Sender<u64>,
}

impl Realm {
    pub fn new(config: AuthConfig) -> Result<Arc<Realm>, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.http_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let refetch_interval = Duration::from_millis(config.jwks_refetch_min_interval_ms.max(1));
        Ok(Arc::new(Realm {
            config,
            http,
            loaded: RwLock::new(None),
            fetches: tokio::sync::Mutex::new(Fetches::default()),
            absent: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(refetch_interval)
                .build(),
            verified: moka::sync::Cache::builder()
                .max_capacity(50_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            withdrawals: tokio::sync::watch::Sender::new(0),
        }))
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// True once discovery and keys are loaded.
    pub fn is_ready(&self) -> bool {
        self.loaded().is_some()
    }

    pub(crate) fn loaded(&self) -> Option<Arc<Loaded>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The discovery document, once loaded.
    pub fn discovery(&self) -> Option<Discovery> {
        self.loaded().map(|l| l.discovery.clone())
    }

    /// Loads discovery and keys, retrying with exponential backoff and jitter until it succeeds; then refreshes the
    /// keys every `auth.jwks_refresh_interval_ms` while the realm is in use.
    pub async fn load_with_retry(self: Arc<Self>) {
        let mut backoff = crate::backoff::Backoff::new(
            Duration::from_millis(self.config.discovery_retry_initial_ms.max(1)),
            Duration::from_millis(self.config.discovery_retry_max_ms.max(1)),
        );
        loop {
            match self.load().await {
                Ok(()) => {
                    tracing::info!(issuer = %self.config.issuer, "realm discovery and keys loaded");
                    break;
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "realm discovery failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let every = Duration::from_millis(self.config.jwks_refresh_interval_ms);
        if every.is_zero() {
            return;
        }
        // Weak: the refresh ends with the server that owns the realm.
        let realm = Arc::downgrade(&self);
        drop(self);
        loop {
            tokio::time::sleep(every).await;
            let Some(realm) = realm.upgrade() else { return };
            let mut fetches = realm.fetches.lock().await;
            let started = fetches.begin();
            let ok = realm.fetch_and_install("periodic refresh").await;
            fetches.end(started, ok);
        }
    }

    /// One attempt: discovery document, then its JWKS.
    pub async fn load(&self) -> Result<(), RealmError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let document: Value = self.get_json(&url).await?;
        let mut discovery: Discovery = serde_json::from_value(document.clone())
            .map_err(|e| RealmError::Discovery(e.to_string()))?;
        if discovery.issuer != self.config.issuer {
            return Err(RealmError::Discovery(format!(
                "issuer {:?} differs from the configured auth.issuer {:?}",
                discovery.issuer, self.config.issuer
            )));
        }
        discovery.document = document;
        let mut fetches = self.fetches.lock().await;
        let started = fetches.begin();
        let (keys, jwks) = self.fetch_keys(&discovery.jwks_uri).await?;
        fetches.end(started, true);
        self.install(Arc::new(Loaded {
            discovery,
            keys,
            jwks,
        }));
        Ok(())
    }

    /// Makes `new` the realm's state. When a key of the previous set is gone (or changed under its `kid`), the
    /// cache of verified tokens is emptied: tokens verified with that key must be refused from now on, not for up
    /// to another minute. Emptying it all is simpler than finding them, also covers tokens without a `kid`, and is
    /// cheap: a withdrawal is rare, and each cached token then costs one more signature check.
    fn install(&self, new: Arc<Loaded>) {
        let withdrawn = {
            let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
            let withdrawn = loaded
                .as_ref()
                .is_some_and(|old| lost_a_key(&old.jwks, &new.jwks));
            *loaded = Some(new);
            withdrawn
        };
        if withdrawn {
            tracing::info!("a signing key was withdrawn from the realm: verified tokens forgotten");
            // Counted before emptying: a verification that read the count earlier and inserts after the emptying
            // sees the change and drops its entry (see `verify`).
            self.withdrawals.send_modify(|n| *n += 1);
            self.verified.invalidate_all();
        }
    }

    /// How many fetched key sets lost a key so far.
    pub(crate) fn withdrawals(&self) -> u64 {
        *self.withdrawals.borrow()
    }

    /// A receiver that sees every withdrawal.
    pub(crate) fn withdrawal_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.withdrawals.subscribe()
    }

    /// The key set in which a token's key can be looked up (`has` says whether a set holds it), refetched if the
    /// current one does not hold it. `kid` names the key for the per-`kid` throttle (empty without one).
    ///
    /// Ok: the current set (perhaps still without the key: a successful fetch begun after this call did not have
    /// it, so the realm does not publish it). Err([`AuthError::Retry`]) when the next allowed refetch is further
    /// than `auth.jwks_unknown_kid_wait_ms` away or the refetch failed: the token may well be valid.
    pub(crate) async fn key_set_with(
        &self,
        kid: &str,
        has: impl Fn(&Loaded) -> bool,
    ) -> Result<Arc<Loaded>, AuthError> {
        let asked = Instant::now();
        let current = self.loaded().ok_or(AuthError::Unavailable)?;
        if has(&current) || self.absent.contains_key(kid) {
            return Ok(current);
        }
        let min = Duration::from_millis(self.config.jwks_refetch_min_interval_ms);
        let deadline = asked + Duration::from_millis(self.config.jwks_unknown_kid_wait_ms);
        loop {
            let mut fetches = self.fetches.lock().await;
            // A fetch that began after the token arrived answers for it, whoever started it.
            if fetches.ok_started.is_some_and(|t| t >= asked) {
                let current = self.loaded().ok_or(AuthError::Unavailable)?;
                if !has(&current) {
                    self.absent.insert(kid.to_owned(), ());
                }
                return Ok(current);
            }
            if fetches.failed_started.is_some_and(|t| t >= asked) {
                return Err(AuthError::Retry(
                    "the identity provider's keys cannot be fetched now",
                ));
            }
            let next = fetches.started.map_or(asked, |t| t + min);
            if next <= Instant::now() {
                let started = fetches.begin();
                let ok = self.fetch_and_install("an unknown kid").await;
                fetches.end(started, ok);
                continue;
            }
            if next > deadline {
                return Err(AuthError::Retry(
                    "a signing key newer than the last key fetch",
                ));
            }
            drop(fetches);
            tokio::time::sleep_until(next).await;
        }
    }

    /// How long until a refetch for an unknown `kid` is allowed again: what a caller that cannot give up (token
    /// custody holding a just-rotated refresh token) waits before verifying again.
    pub(crate) async fn next_refetch_in(&self) -> Duration {
        let min = Duration::from_millis(self.config.jwks_refetch_min_interval_ms);
        let fetches = self.fetches.lock().await;
        fetches.started.map_or(Duration::ZERO, |t| {
            (t + min).saturating_duration_since(Instant::now())
        })
    }

    /// Fetches the key set and installs it; on failure keeps the current one. Called with `fetches` held. Returns
    /// whether it succeeded.
    async fn fetch_and_install(&self, why: &'static str) -> bool {
        let Some(current) = self.loaded() else {
            return false;
        };
        match self.fetch_keys(&current.discovery.jwks_uri).await {
            Ok((keys, jwks)) => {
                tracing::info!(keys = keys.len(), why, "realm keys refetched");
                self.install(Arc::new(Loaded {
                    discovery: current.discovery.clone(),
                    keys,
                    jwks,
                }));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, why, "realm keys refetch failed");
                false
            }
        }
    }

    /// The JWKS document, once loaded.
    pub fn jwks_document(&self) -> Option<Value> {
        self.loaded().map(|l| l.jwks.clone())
    }

    async fn fetch_keys(&self, url: &str) -> Result<(HashMap<String, Key>, Value), RealmError> {
        let doc: Value = self.get_json(url).await?;
        let set: JwkSet =
            serde_json::from_value(doc.clone()).map_err(|e| RealmError::Jwks(e.to_string()))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kind = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => KeyKind::Rsa,
                AlgorithmParameters::EllipticCurve(_) => KeyKind::Ec,
                AlgorithmParameters::OctetKeyPair(_) => KeyKind::Ed,
                // Symmetric ("oct") and unknown keys are never used for verification.
                _ => continue,
            };
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
            {
                continue;
            }
            let Ok(decoding) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            keys.insert(
                kid,
                Key {
                    decoding,
                    kind,
                    alg,
                },
            );
        }
        if keys.is_empty() {
            return Err(RealmError::Jwks("no usable signing key".into()));
        }
        Ok((keys, doc))
    }

    async fn get_json(&self, url: &str) -> Result<Value, RealmError> {
        let err = |message: String| RealmError::Http {
            url: url.to_owned(),
            message,
        };
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| err(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("status {}", resp.status())));
        }
        resp.json()
            .await
            .map_err(|e| err(e.without_url().to_string()))
    }
}

/// Whether a key of the JWKS `old` is not in `new`, compared as whole JWKs: a `kid` reused for another key counts as
/// a withdrawal too.
fn lost_a_key(old: &Value, new: &Value) -> bool {
    let kept = new["keys"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    old["keys"]
        .as_array()
        .is_some_and(|keys| keys.iter().any(|k| !kept.contains(k)))
}

#[cfg(test)]
mod tests {
    use super::lost_a_key;
    use serde_json::json;

    #[test]
    fn only_a_removed_or_changed_key_is_a_withdrawal() {
        let a = json!({"kid": "a", "kty": "RSA", "n": "1", "e": "AQAB"});
        let b = json!({"kid": "b", "kty": "RSA", "n": "2", "e": "AQAB"});
        let a2 = json!({"kid": "a", "kty": "RSA", "n": "3", "e": "AQAB"});
        let set = |keys: &[&serde_json::Value]| json!({ "keys": keys });
        assert!(!lost_a_key(&set(&[&a]), &set(&[&a])), "unchanged");
        assert!(!lost_a_key(&set(&[&a]), &set(&[&b, &a])), "added");
        assert!(lost_a_key(&set(&[&a, &b]), &set(&[&b])), "removed");
        assert!(
            lost_a_key(&set(&[&a]), &set(&[&a2])),
            "another key under the kid"
        );
    }
}
