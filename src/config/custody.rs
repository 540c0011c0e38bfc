//! `[custody]`: token custody (tabhub logs browsers in and keeps their tokens server-side).

use serde::{Deserialize, Serialize};

use super::auth::AuthConfig;
use super::error::{key_error, ConfigError};

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
    /// How long a login may take between `/auth/login` and `/auth/callback`.
    pub login_timeout_ms: u64,
    /// Stored logins expire with the refresh token; this lifetime applies when it cannot be read.
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

impl CustodyConfig {
    /// Checked only when enabled. Custody's access tokens are verified like any other, hence `auth`.
    pub(super) fn validate(&self, auth: &AuthConfig) -> Result<(), ConfigError> {
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
        Ok(())
    }
}
