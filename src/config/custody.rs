//! `[custody]`: token custody (tabhub logs browsers in and keeps their tokens server-side).

use serde::{Deserialize, Serialize};

use super::auth::AuthConfig;
use super::error::{key_error, ConfigError};
use super::publish::{BrokerConfig, BrokerKind};

/// Token custody: tabhub logs users in (authorization code + PKCE) and keeps their tokens server-side, behind a
/// login cookie (custody's unit is a login, see `crate::custody`); browsers never hold Keycloak tokens.
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
    /// `Secure` on the login cookie; turn off only for plain-http local development.
    pub cookie_secure: bool,
    /// Origins `?redirect=` may point to, besides relative paths (empty: `origins.allowed`).
    pub allowed_redirect_origins: Vec<String>,
    /// Refresh this long before the access token expires (Renku: 10 s).
    pub refresh_tolerance_ms: u64,
    /// How long a login may take between `/auth/login` and `/auth/callback`: the pending login cookie's lifetime,
    /// checked against the time sealed inside it (not only the browser's `Max-Age`).
    pub login_timeout_ms: u64,
    /// The short-lived cookie that carries a pending login (state, nonce, PKCE verifier, redirect) from
    /// `/auth/login` to `/auth/callback`, sealed with `login_cookie_key`. Nothing is kept server-side between the
    /// two, so an unauthenticated flood of `/auth/login` costs no memory; and the callback's `state` must match the
    /// cookie of the browser that started the login (login CSRF).
    pub login_cookie_name: String,
    /// 32 bytes, base64: the AES-256-GCM key sealing the pending login cookie. Instances behind one load balancer
    /// share it, so a login started on one completes on another. Empty: a random key per process (a single
    /// instance; a login in flight during a restart is started again). A secret, like `client_secret`.
    pub login_cookie_key: String,
    /// `/auth/login` and `/auth/callback` per client address (one token bucket per route, of `logins_burst`);
    /// beyond: HTTP 429. Behind a proxy, see `limits.trust_forwarded_for`.
    pub logins_per_second_per_address: f64,
    pub logins_burst: f64,
    /// Stored logins expire with the refresh token; this lifetime applies when it cannot be read.
    pub default_refresh_lifetime_ms: u64,
    /// RFC 7662 introspection of every handshake's token (revocation seen at once), cached this long. `active:
    /// false` is a revoked token (4002).
    pub introspection: bool,
    pub introspection_cache_ms: u64,
    /// When the introspection endpoint fails (unreachable, a non-2xx status, an answer without `active`): `false`
    /// refuses the token for now (close 1013 with `retry: true`: a provider that cannot answer must not let revoked
    /// tokens in); `true` lets it in on its signature alone. Logged and counted either way.
    pub introspection_fail_open: bool,
    /// Back-channel logout tokens older than this (`iat`) are refused; their `jti`s are remembered as long.
    pub logout_token_max_age_ms: u64,
    /// With `broker.kind = "redis"`: the keys (32 bytes each, base64, newest first) sealing logins' tokens in Redis
    /// (AES-256-GCM), where every instance finds them (an instance lost, its users stay logged in). The first seals,
    /// every listed key opens: to rotate, put a new key first and drop the old one once the longest refresh token
    /// sealed with it has expired. Required when custody is enabled with a Redis broker; secrets, like
    /// `client_secret`.
    pub store_keys: Vec<String>,
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
            login_cookie_name: "tabhub_login".into(),
            login_cookie_key: String::new(),
            logins_per_second_per_address: 2.0,
            logins_burst: 10.0,
            default_refresh_lifetime_ms: 1_800_000,
            introspection: false,
            introspection_cache_ms: 5_000,
            introspection_fail_open: false,
            logout_token_max_age_ms: 120_000,
            store_keys: Vec::new(),
        }
    }
}

/// The length of `custody.login_cookie_key`, decoded: an AES-256 key.
pub const LOGIN_COOKIE_KEY_BYTES: usize = 32;

impl CustodyConfig {
    /// `login_cookie_key` decoded (standard or URL-safe base64, padded or not); `None` when empty (a random key
    /// per process). The error never shows the key.
    pub fn login_cookie_key_bytes(
        &self,
    ) -> Result<Option<[u8; LOGIN_COOKIE_KEY_BYTES]>, ConfigError> {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        use base64::Engine;
        let k = self.login_cookie_key.trim().trim_end_matches('=');
        if k.is_empty() {
            return Ok(None);
        }
        let bytes = STANDARD_NO_PAD
            .decode(k)
            .or_else(|_| URL_SAFE_NO_PAD.decode(k))
            .map_err(|_| key_error("custody.login_cookie_key", "not base64"))?;
        <[u8; LOGIN_COOKIE_KEY_BYTES]>::try_from(bytes.as_slice())
            .map(Some)
            .map_err(|_| {
                key_error(
                    "custody.login_cookie_key",
                    format!(
                        "must be {LOGIN_COOKIE_KEY_BYTES} bytes, base64 (e.g. `openssl rand -base64 32`)"
                    ),
                )
            })
    }

    /// `store_keys` decoded, newest first. The error names the key's position, never the key.
    pub fn store_key_bytes(&self) -> Result<Vec<[u8; LOGIN_COOKIE_KEY_BYTES]>, ConfigError> {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        use base64::Engine;
        self.store_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let k = k.trim().trim_end_matches('=');
                let name = format!("custody.store_keys[{i}]");
                let bytes = STANDARD_NO_PAD
                    .decode(k)
                    .or_else(|_| URL_SAFE_NO_PAD.decode(k))
                    .map_err(|_| key_error(&name, "not base64"))?;
                <[u8; LOGIN_COOKIE_KEY_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
                    key_error(
                        &name,
                        format!(
                            "must be {LOGIN_COOKIE_KEY_BYTES} bytes, base64 (e.g. `openssl rand -base64 32`)"
                        ),
                    )
                })
            })
            .collect()
    }

    /// Checked only when enabled. Custody's access tokens are verified like any other, hence `auth`; a Redis
    /// `broker` means logins are shared through Redis, hence sealed with `store_keys`.
    pub(super) fn validate(
        &self,
        auth: &AuthConfig,
        broker: &BrokerConfig,
    ) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        for (key, v) in [
            ("custody.client_id", &self.client_id),
            ("custody.client_secret", &self.client_secret),
            ("custody.redirect_uri", &self.redirect_uri),
        ] {
            if v.is_empty() {
                return Err(key_error(key, "required when custody.enabled"));
            }
        }
        url::Url::parse(&self.redirect_uri)
            .map_err(|e| key_error("custody.redirect_uri", format!("not a URL: {e}")))?;
        if !auth.client_ids.contains(&self.client_id) {
            return Err(key_error(
                "auth.client_ids",
                "must include custody.client_id (its access tokens are verified like any other)",
            ));
        }
        if self.cookie_name.is_empty()
            || !self
                .cookie_name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_-".contains(ch))
        {
            return Err(key_error("custody.cookie_name", "must be [A-Za-z0-9_-]+"));
        }
        if self.login_cookie_name.is_empty()
            || !self
                .login_cookie_name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_-".contains(ch))
        {
            return Err(key_error(
                "custody.login_cookie_name",
                "must be [A-Za-z0-9_-]+",
            ));
        }
        if self.login_cookie_name == self.cookie_name {
            return Err(key_error(
                "custody.login_cookie_name",
                "must differ from custody.cookie_name",
            ));
        }
        self.login_cookie_key_bytes()?;
        self.store_key_bytes()?;
        if broker.kind == BrokerKind::Redis && self.store_keys.is_empty() {
            return Err(key_error(
                "custody.store_keys",
                "required when custody.enabled and broker.kind = \"redis\": logins are kept in Redis, sealed with \
                 these keys (32 bytes base64 each, newest first, e.g. `openssl rand -base64 32`)",
            ));
        }
        for (key, v) in [
            (
                "custody.logins_per_second_per_address",
                self.logins_per_second_per_address,
            ),
            ("custody.logins_burst", self.logins_burst),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(key_error(key, "must be a positive number"));
            }
        }
        if self.login_timeout_ms == 0 {
            return Err(key_error("custody.login_timeout_ms", "must be above 0"));
        }
        Ok(())
    }
}
