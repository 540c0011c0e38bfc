//! A fake Keycloak realm, in memory. FOR DEVELOPMENT AND TESTS ONLY: its signing keys are public fixtures and the
//! demo's passwords are the user names.
//!
//! `tabhub demo` serves it at `/realms/demo`; the integration tests at `/realms/test`. It answers on Keycloak's
//! paths with Keycloak's documents, claims, status codes and error bodies, so that what works against it works
//! against a real realm:
//!
//! - `/.well-known/openid-configuration`, `/protocol/openid-connect/certs` (JWKS, switchable to a rotated set,
//!   keys can be withdrawn);
//! - `/protocol/openid-connect/auth`: authorization code flow with PKCE, a login form or automatic approval;
//! - `/protocol/openid-connect/token`: `password`, `authorization_code`, `refresh_token` (rotated: each refresh
//!   token works once) and `client_credentials`;
//! - `/protocol/openid-connect/token/introspect` (RFC 7662), `/userinfo`, `/logout` (RP-initiated, with
//!   back-channel logout to the session's clients).
//!
//! Tests steer it with knobs (lifetimes, key rotation and withdrawal, counters, ending sessions, an unreachable realm) and make
//! back-channel logout tokens with it. Module map: [`options`] (what the realm holds), `store` (sessions, codes,
//! issued tokens), `tokens` (keys and claims), `http` (parameters, client authentication, error shapes),
//! `authorize` (the browser login), `token_endpoint` (the grants), `endpoints` (the rest).

mod authorize;
mod endpoints;
mod http;
pub mod options;
mod store;
mod token_endpoint;
mod tokens;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

pub use options::{ClientSpec, RealmOptions, UserSpec};
use store::{AccessRecord, Store};
use tokens::Keys;

/// The demo realm's public client, used by `tabhub connect` with the password grant.
pub const CLIENT_ID: &str = "tabhub-demo";
/// The demo users: (user name = password, `sub`).
pub const USERS: &[(&str, &str)] = &[
    ("alice", "5f1d2e3a-0000-4000-8000-00000000a11c"),
    ("bob", "5f1d2e3a-0000-4000-8000-000000000b0b"),
];

/// How long an authorization code may wait for its exchange (Keycloak's "Client login timeout" default).
const CODE_LIFETIME_MS: u64 = 60_000;

/// Why a realm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("signing key: {0}")]
    Key(#[from] jsonwebtoken::errors::Error),
    #[error("fixture JWKS: {0}")]
    Keys(String),
    #[error("realm options: {0}")]
    Options(String),
}

/// A fake Keycloak realm.
pub struct DevIssuer {
    issuer: String,
    opts: RealmOptions,
    keys: Keys,
    store: Mutex<Store>,
    access_ms: AtomicU64,
    refresh_ms: AtomicU64,
    rotated: AtomicBool,
    /// `kid`s taken out of the published key set.
    withdrawn: Mutex<HashSet<String>>,
    unreachable: AtomicBool,
    jwks_fetches: AtomicUsize,
    introspections: AtomicUsize,
    token_requests: Mutex<HashMap<String, usize>>,
    /// For back-channel logout requests.
    http: reqwest::Client,
}

impl DevIssuer {
    /// A realm whose issuer is `{base_url}/realms/{opts.realm}`.
    pub fn new(base_url: &str, opts: RealmOptions) -> Result<Arc<DevIssuer>, IssuerError> {
        opts.check().map_err(IssuerError::Options)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Ok(Arc::new(DevIssuer {
            issuer: format!("{}/realms/{}", base_url.trim_end_matches('/'), opts.realm),
            keys: Keys::load()?,
            store: Mutex::new(Store::default()),
            access_ms: AtomicU64::new(millis(opts.access_token_lifetime)),
            refresh_ms: AtomicU64::new(millis(opts.refresh_token_lifetime)),
            rotated: AtomicBool::new(false),
            withdrawn: Mutex::new(HashSet::new()),
            unreachable: AtomicBool::new(false),
            jwks_fetches: AtomicUsize::new(0),
            introspections: AtomicUsize::new(0),
            token_requests: Mutex::new(HashMap::new()),
            http,
            opts,
        }))
    }

    /// The demo realm ([`RealmOptions::demo`]) at `{base_url}/realms/demo`.
    pub fn demo(base_url: &str) -> Result<Arc<DevIssuer>, IssuerError> {
        DevIssuer::new(base_url, RealmOptions::demo())
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The realm's routes, under `/realms/{realm}`.
    pub fn router(self: &Arc<Self>) -> Router {
        let p = format!("/realms/{}", self.opts.realm);
        let oidc = format!("{p}/protocol/openid-connect");
        Router::new()
            .route(
                &format!("{p}/.well-known/openid-configuration"),
                get(endpoints::discovery),
            )
            .route(&format!("{oidc}/certs"), get(endpoints::certs))
            .route(
                &format!("{oidc}/auth"),
                get(authorize::show).post(authorize::submit),
            )
            .route(&format!("{oidc}/token"), post(token_endpoint::token))
            .route(
                &format!("{oidc}/token/introspect"),
                post(endpoints::introspect),
            )
            .route(
                &format!("{oidc}/userinfo"),
                get(endpoints::userinfo).post(endpoints::userinfo),
            )
            .route(
                &format!("{oidc}/logout"),
                get(endpoints::logout_get).post(endpoints::logout_post),
            )
            .with_state(self.clone())
    }

    // ---- knobs ----

    /// Lifetime of the access (and ID) tokens issued from now on.
    pub fn set_access_lifetime(&self, d: Duration) {
        self.access_ms.store(millis(d), Ordering::SeqCst);
    }

    /// Lifetime of the refresh tokens issued from now on.
    pub fn set_refresh_lifetime(&self, d: Duration) {
        self.refresh_ms.store(millis(d), Ordering::SeqCst);
    }

    /// Publishes the rotated key set (`jwks-rotated.json`: adds `fixture-rs256-b`).
    pub fn rotate_keys(&self) {
        self.rotated.store(true, Ordering::SeqCst);
    }

    /// Takes the key `kid` out of the published key set: the JWKS no longer lists it and the realm no longer accepts
    /// tokens signed with it. Withdrawing the signing key `fixture-rs256-a` makes the realm sign new tokens with
    /// `fixture-rs256-b` (publish it first with [`DevIssuer::rotate_keys`]); the tokens it signed before are
    /// unverifiable from then on.
    pub fn withdraw_key(&self, kid: &str) {
        lock(&self.withdrawn).insert(kid.to_owned());
        if kid == tokens::SIGNING_KID {
            self.keys.sign_with_rotated_key();
        }
    }

    /// The JWKS as published now: the initial or the rotated set, without the withdrawn keys.
    fn published_jwks(&self) -> String {
        let set = if self.rotated.load(Ordering::SeqCst) {
            tokens::JWKS_ROTATED
        } else {
            tokens::JWKS
        };
        let withdrawn = lock(&self.withdrawn);
        if withdrawn.is_empty() {
            return set.to_owned();
        }
        let mut doc: Value = serde_json::from_str(set).unwrap_or_else(|_| json!({"keys": []}));
        if let Some(keys) = doc["keys"].as_array_mut() {
            keys.retain(|k| k["kid"].as_str().is_none_or(|kid| !withdrawn.contains(kid)));
        }
        doc.to_string()
    }

    /// The claims of a token signed by a key the realm publishes now (see `Keys::verify`).
    fn verify_published(&self, token: &str) -> Option<Value> {
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        if lock(&self.withdrawn).contains(&kid) {
            return None;
        }
        let rotated = self.rotated.load(Ordering::SeqCst);
        self.keys.verify(token, &self.issuer, rotated)
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    /// How many token requests with this `grant_type` reached the realm (whatever their outcome; none while
    /// [unreachable](Self::set_unreachable)).
    pub fn token_requests(&self, grant_type: &str) -> usize {
        lock(&self.token_requests)
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }

    /// How many introspection requests reached the realm (none while [unreachable](Self::set_unreachable)).
    pub fn introspections(&self) -> usize {
        self.introspections.load(Ordering::SeqCst)
    }

    /// Ends every Keycloak session of `username`, as an administrator's "Sign out": their refresh tokens get
    /// `invalid_grant` "Session not active", their access tokens introspect inactive. No back-channel logout is
    /// sent (tests send their own with [`Self::logout_token`] and [`Self::send_backchannel_logout`]).
    pub fn end_sessions_of(&self, username: &str) {
        lock(&self.store).end_sessions_of(username);
    }

    /// While true, the token and introspection endpoints answer 503, as a down Keycloak behind a proxy.
    pub fn set_unreachable(&self, down: bool) {
        self.unreachable.store(down, Ordering::SeqCst);
    }

    /// The id (`sid`) of `username`'s latest session, ended or not.
    pub fn kc_session_of(&self, username: &str) -> Option<String> {
        lock(&self.store).latest_session_of(username)
    }

    /// An OpenID Connect Back-Channel Logout 1.0 logout token for `client_id`, about session `sid` and/or user
    /// `sub`: `typ` header `logout+jwt`, a unique `jti`, the back-channel logout event, no `nonce`; signed with the
    /// realm key.
    pub fn logout_token(&self, client_id: &str, sid: Option<&str>, sub: Option<&str>) -> String {
        let claims = tokens::logout_claims(
            &self.issuer,
            client_id,
            sid,
            sub,
            &store::uuid(),
            now_ms() / 1000,
        );
        self.keys
            .sign(&claims, "logout+jwt")
            .expect("the fixture key signs")
    }

    /// POSTs `logout_token` to a client's back-channel logout URL, as Keycloak does; returns the HTTP status, 0
    /// when the request failed.
    pub async fn send_backchannel_logout(&self, url: &str, token: &str) -> u16 {
        match self
            .http
            .post(url)
            .form(&[("logout_token", token)])
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(e) => {
                tracing::debug!(error = %e, url, "back-channel logout request failed");
                0
            }
        }
    }

    /// A valid access token of `username` for `client_id`, as if the user had just logged in: a new session
    /// (see [`Self::kc_session_of`]), scope `openid profile email`.
    ///
    /// # Panics
    /// On an unknown user or client: a test's mistake.
    pub fn mint_access(&self, username: &str, client_id: &str) -> String {
        let user = self
            .user(username)
            .unwrap_or_else(|| panic!("mint_access: unknown user {username:?}"));
        assert!(
            self.client(client_id).is_some(),
            "mint_access: unknown client {client_id:?}"
        );
        let sid = lock(&self.store).open_session(username, now_ms());
        let body = self
            .session_tokens(user, client_id, &sid, "openid profile email", None, false)
            .unwrap_or_else(|_| panic!("mint_access: session ended while minting"));
        body["access_token"].as_str().unwrap_or_default().to_owned()
    }

    // ---- shared by the endpoints ----

    fn client(&self, id: &str) -> Option<&ClientSpec> {
        self.opts.clients.iter().find(|c| c.id == id)
    }

    fn user(&self, username: &str) -> Option<&UserSpec> {
        self.opts.users.iter().find(|u| u.username == username)
    }

    fn user_by_sub(&self, sub: &str) -> Option<&UserSpec> {
        self.opts.users.iter().find(|u| u.sub == sub)
    }

    fn is_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::SeqCst)
    }

    /// Issues the tokens of `user` for `client_id` in session `sid` and returns Keycloak's token response. The ID
    /// token comes with scope `openid`; the refresh token unless `!with_refresh`. Fails with `invalid_grant`
    /// "Session not active" when the session has ended.
    fn session_tokens(
        &self,
        user: &UserSpec,
        client_id: &str,
        sid: &str,
        scope: &str,
        nonce: Option<&str>,
        with_refresh: bool,
    ) -> Result<Value, http::OAuthError> {
        let now = now_ms();
        let (access_ms, refresh_ms) = (
            self.access_ms.load(Ordering::SeqCst),
            self.refresh_ms.load(Ordering::SeqCst),
        );
        let (access_jti, refresh_jti) = (store::uuid(), store::uuid());
        let auth_time = {
            let mut st = lock(&self.store);
            if !st.join(sid, client_id) {
                return Err(http::invalid_grant("Session not active"));
            }
            let auth_time = st.session(sid).map(|s| s.auth_time).unwrap_or(now / 1000);
            st.add_access(
                &access_jti,
                AccessRecord {
                    exp_ms: now + access_ms,
                },
                now,
            );
            if with_refresh {
                st.add_refresh(
                    &refresh_jti,
                    store::RefreshRecord {
                        sid: sid.into(),
                        scope: scope.into(),
                        nonce: nonce.map(str::to_owned),
                        exp_ms: now + refresh_ms,
                    },
                    now,
                );
            }
            auth_time
        };
        let grant = tokens::Grant {
            issuer: &self.issuer,
            user,
            client_id,
            sid,
            auth_time,
            scope,
            nonce,
        };
        let iat = now / 1000;
        let access_exp = (now + access_ms) / 1000;
        let access = self
            .keys
            .sign(&grant.access_claims(&access_jti, iat, access_exp), "JWT")
            .map_err(|_| http::server_error())?;
        let mut body = json!({
            "access_token": access,
            "expires_in": access_ms / 1000,
            "refresh_expires_in": 0,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "session_state": sid,
            "scope": scope,
        });
        if with_refresh {
            let claims = grant.refresh_claims(&refresh_jti, iat, (now + refresh_ms) / 1000);
            let refresh = self
                .keys
                .sign_refresh(&claims)
                .map_err(|_| http::server_error())?;
            body["refresh_token"] = json!(refresh);
            body["refresh_expires_in"] = json!(refresh_ms / 1000);
        }
        if scope.split(' ').any(|s| s == "openid") {
            let claims =
                grant.id_claims(&store::uuid(), iat, access_exp, self.keys.at_hash(&access));
            let id = self
                .keys
                .sign(&claims, "JWT")
                .map_err(|_| http::server_error())?;
            body["id_token"] = json!(id);
        }
        Ok(body)
    }

    /// Whether a token is active now: signed by the realm, not expired (to the millisecond for the tokens it
    /// issued), its session still active. Returns its claims when it is.
    fn active_claims(&self, token: &str) -> Option<Value> {
        let now = now_ms();
        if let Some(claims) = self.verify_published(token) {
            let jti = claims["jti"].as_str().unwrap_or_default();
            let st = lock(&self.store);
            let alive = match st.access(jti) {
                Some(r) => r.exp_ms > now,
                None => claims["exp"].as_u64().is_some_and(|e| e * 1000 > now),
            };
            let session_ok = claims["sid"].as_str().is_none_or(|s| st.is_active(s));
            return (alive && session_ok).then_some(claims);
        }
        let claims = self.keys.verify_refresh(token, &self.issuer)?;
        let st = lock(&self.store);
        let record = st.refresh(claims["jti"].as_str()?)?;
        (record.exp_ms > now && st.is_active(&record.sid)).then_some(claims)
    }

    /// Keycloak's scope for a request: `openid` when asked for, then the default client scopes.
    fn granted_scope(requested: Option<&str>) -> String {
        if requested.is_some_and(|s| s.split(' ').any(|s| s == "openid")) {
            "openid profile email".into()
        } else {
            "profile email".into()
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}
