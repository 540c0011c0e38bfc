//! `[auth]` and `[origins]`: which tokens are accepted, and which pages may open a websocket with them.

use serde::{Deserialize, Serialize};

use jsonwebtoken::Algorithm;

use super::error::{key_error, ConfigError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The realm's issuer URL, e.g. `https://kc.example/realms/renku`. Tokens' `iss` must equal it exactly, and so
    /// must the discovery document's `issuer`. Required.
    pub issuer: String,
    /// Client ids whose access tokens are accepted: a token's `azp`, `client_id`, or one of its `aud`, must be one
    /// of them (see `crate::auth::kind`). Required.
    pub client_ids: Vec<String>,
    /// Accept only tokens marked as access tokens: Keycloak's `typ` claim `Bearer`, or RFC 9068's `typ` header
    /// `at+jwt`. `false` also accepts unmarked JWTs (providers that mark neither) when nothing in them says ID
    /// token: no `nonce`, no `aud` naming an accepted client, the client named by `azp` or `client_id`. ID, refresh
    /// and logout tokens are refused either way.
    pub require_typ_bearer: bool,
    /// Accepted signature algorithms. Only asymmetric ones are possible: `none` and HMAC are always refused.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds; at most an hour (jsonwebtoken subtracts it from the
    /// current time, and a skew of hours is no skew).
    pub leeway_secs: u64,
    /// Cookie that may hold an access token (empty: no such cookie is read).
    pub token_cookie: String,
    /// First and largest delay between discovery attempts at start.
    pub discovery_retry_initial_ms: u64,
    pub discovery_retry_max_ms: u64,
    /// Timeout of one discovery or JWKS request.
    pub http_timeout_ms: u64,
    /// A token with an unknown `kid` triggers a JWKS refetch at most this often (and a `kid` still unknown after a
    /// refetch is refused without another one for as long).
    pub jwks_refetch_min_interval_ms: u64,
    /// A token with an unknown `kid` waits at most this long for the next allowed refetch; when that is further
    /// away, the client is told to retry (close 1013 with `retry: true`, publish 503), never that the token is
    /// invalid: a realm signs with a new key as soon as it is active.
    pub jwks_unknown_kid_wait_ms: u64,
    /// The JWKS is also refetched this often (0: never), so that a key the realm withdraws stops being accepted
    /// even when no token names a new `kid` (Keycloak rotates in the new key long before removing the old one).
    pub jwks_refresh_interval_ms: u64,
    /// `authExpiring` is sent this long before the session's token expires.
    pub expiry_warning_ms: u64,
    /// Let tabs without any credential in, as Renku's UI server does for anonymous visitors: each gets a session of
    /// its own with no token, which runs the commands that need none (`ping`, `init`) and never calls a backend.
    pub allow_anonymous: bool,
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
            jwks_unknown_kid_wait_ms: 2_000,
            jwks_refresh_interval_ms: 600_000,
            expiry_warning_ms: 60_000,
            allow_anonymous: false,
        }
    }
}

impl AuthConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.issuer.is_empty() {
            return Err(key_error(
                "auth.issuer",
                "required: the realm's issuer URL, e.g. https://kc.example/realms/renku",
            ));
        }
        let issuer = url::Url::parse(&self.issuer)
            .map_err(|e| key_error("auth.issuer", format!("not a URL: {e}")))?;
        if !matches!(issuer.scheme(), "http" | "https") {
            return Err(key_error("auth.issuer", "must be an http or https URL"));
        }
        if self.client_ids.is_empty() {
            return Err(key_error(
                "auth.client_ids",
                "required: at least one accepted client id (azp or aud)",
            ));
        }
        for alg in &self.algorithms {
            parse_algorithm(alg)
                .map_err(|m| key_error("auth.algorithms", format!("{alg}: {m}")))?;
        }
        if self.algorithms.is_empty() {
            return Err(key_error(
                "auth.algorithms",
                "at least one algorithm is needed",
            ));
        }
        if self.leeway_secs > 3_600 {
            return Err(key_error("auth.leeway_secs", "at most 3600 (one hour)"));
        }
        if self.jwks_unknown_kid_wait_ms > 30_000 {
            return Err(key_error(
                "auth.jwks_unknown_kid_wait_ms",
                "at most 30000: a handshake waits this long",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// Origins allowed to open a websocket, e.g. `https://renku.example` (scheme, host and port, exactly).
    pub allowed: Vec<String>,
    /// Accept upgrades without an `Origin` header (non-browser clients). Never for cookie credentials.
    pub allow_missing: bool,
}

impl OriginConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, o) in self.allowed.iter().enumerate() {
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
        Ok(())
    }
}

/// Parses an accepted algorithm name. Symmetric algorithms (HS*) are refused: a realm's public key must never be
/// usable as an HMAC secret. `none` is not even an algorithm to jsonwebtoken.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, &'static str> {
    let alg: Algorithm = name.parse().map_err(|_| {
        "unknown algorithm (use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"
    })?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Err("HMAC algorithms are refused: only asymmetric signatures are accepted")
        }
        _ => Ok(alg),
    }
}
