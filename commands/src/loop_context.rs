//! What a loop function may do, and the values it deals in: the user, notifications, backend answers. The engine
//! implements [`LoopContext`]; a handler's [`Context`](crate::context::Context) extends it.

use serde_json::Value;

use crate::future::BoxFuture;
use crate::session_data::SessionData;

/// The authenticated user of a tab: `sub` and, for display, `preferred_username`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub name: String,
}

/// A message for the user's tabs: `{type: kind, data}` in the server envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub kind: String,
    pub data: Value,
    /// A repeat of what the tabs were already told: sent only to tabs whose client expects it again every tick
    /// (Renku's client gets `version` every long tick), never to the others, and never a new snapshot.
    pub repeat: bool,
}

impl Notification {
    pub fn new(kind: impl Into<String>, data: Value) -> Self {
        Notification {
            kind: kind.into(),
            data,
            repeat: false,
        }
    }

    /// A notification that repeats the last one of its kind (see [`Notification::repeat`]).
    pub fn repeated(kind: impl Into<String>, data: Value) -> Self {
        Notification {
            repeat: true,
            ..Notification::new(kind, data)
        }
    }
}

/// A backend's answer. `body` is the parsed JSON, or a JSON string when the body is not JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendResponse {
    pub status: u16,
    pub body: Value,
}

/// Why a backend call gave no answer. Never carries a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// No backend of that name in the configuration.
    Unconfigured(String),
    /// The backend failed recently and is in backoff; no request was sent.
    BackingOff { retry_in_ms: u64 },
    /// The request took longer than the configured timeout.
    Timeout,
    /// Connection refused, reset, DNS, TLS...
    Network(String),
    /// The user's token was refused (401) even after using the newest one.
    Unauthorized,
    /// The session has no valid token (expired and not renewed); no request was sent.
    NoToken,
    /// The path could leave the backend's base path (a `.` or `..` segment, percent-encoded or not): no request
    /// was sent. The path is not repeated: it may come from peer input.
    InvalidPath,
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Unconfigured(name) => write!(f, "backend '{name}' is not configured"),
            BackendError::BackingOff { retry_in_ms } => {
                write!(f, "backend unavailable, next attempt in {retry_in_ms} ms")
            }
            BackendError::Timeout => f.write_str("backend timed out"),
            BackendError::Network(m) => write!(f, "backend unreachable: {m}"),
            BackendError::Unauthorized => f.write_str("backend refused the user's token (401)"),
            BackendError::NoToken => f.write_str("no valid token for the user"),
            BackendError::InvalidPath => {
                f.write_str("backend path refused: it could leave the backend's base path")
            }
        }
    }
}

impl std::error::Error for BackendError {}

/// A loop function's view of the user's session, for one iteration.
pub trait LoopContext: Send + Sync {
    /// The session's user.
    fn user(&self) -> &User;
    /// Typed state kept by the user's session while it lives (shared by all tabs and by loop functions).
    fn session_data(&self) -> &SessionData;
    /// `GET {backends[backend]}{path}` as the user (`Authorization: Bearer` with the session's newest token), with
    /// the configured timeout and backoff (per user and path, and per backend during an outage). A path with a `.`
    /// or `..` segment (percent-encoded or not) is refused: [`BackendError::InvalidPath`].
    fn backend_get<'a>(
        &'a self,
        backend: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>>;
    /// `GET url` without credentials, cached for the long interval and shared by all users: concurrent misses
    /// share one request. For public documents such as the deployed UI version.
    fn shared_get<'a>(
        &'a self,
        url: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>>;
}
