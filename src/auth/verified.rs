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
    /// The client the token was issued to.
    pub azp: Option<String>,
    /// The token itself, for calls to backends on the user's behalf.
    pub token: Arc<str>,
    /// The token-custody login the token belongs to, when it came from one; the user's session refreshes through
    /// it. Never logged.
    pub login: Option<Arc<str>>,
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
}
