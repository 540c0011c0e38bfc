//! What verification gives: a verified token, or why it was refused. A leaf, so that the realm (which caches
//! verified tokens) and the verification code (which reads the realm's keys) both point down to it.

use std::sync::Arc;

use tabhub_commands::User;

/// A verified access token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub user: User,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Keycloak's session id (`sid`), for back-channel logout; never logged.
    pub sid: Option<String>,
    /// The accepted client the token names (`azp`, `client_id` or `aud`, see `crate::auth::kind`).
    pub azp: Option<String>,
    /// The token itself, for calls to backends on the user's behalf.
    pub token: Arc<str>,
    /// The token-custody login the token belongs to, when it came from one; the user's session refreshes through
    /// it. Never logged.
    pub login: Option<Arc<str>>,
    /// An anonymous visitor (`auth.allow_anonymous`): no token at all, a session of its own per connection, loops
    /// that need a login never run and no backend is ever called on its behalf.
    pub anonymous: bool,
}

impl Verified {
    /// A visitor without a credential, when `auth.allow_anonymous` lets them in: a user of their own (one per
    /// connection, so that nothing is shared between visitors) with no token.
    pub fn anonymous() -> Verified {
        Verified {
            user: User {
                id: format!("anonymous:{:032x}", rand::random::<u128>()),
                name: "anonymous".into(),
            },
            exp: 0,
            sid: None,
            azp: None,
            token: Arc::from(""),
            login: None,
            anonymous: true,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: send a bearer token (Authorization header, token cookie or websocket subprotocol)")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    #[error("token expired")]
    Expired,
    #[error("token revoked at the identity provider")]
    Revoked,
    #[error("unknown or expired login session: log in again")]
    NoLogin,
    #[error("the identity provider's keys are not loaded yet; try again shortly")]
    Unavailable,
    /// Valid perhaps, but not checkable now (a signing key published since the last key fetch while refetches are
    /// throttled, an introspection endpoint that fails): the same credential may work shortly.
    #[error("{0}; try again shortly")]
    Retry(&'static str),
}

impl From<super::kind::Refusal> for AuthError {
    fn from(r: super::kind::Refusal) -> Self {
        AuthError::Invalid(r.message())
    }
}
