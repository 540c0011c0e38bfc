//! What a handler and a loop function may do: the traits the engine implements.

use serde_json::Value;

use crate::command::{BoxFuture, CommandError};
use crate::loops::LoopFunction;
use crate::session_data::SessionData;
use crate::topic::Topic;

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
}

impl Notification {
    pub fn new(kind: impl Into<String>, data: Value) -> Self {
        Notification {
            kind: kind.into(),
            data,
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
        }
    }
}

impl std::error::Error for BackendError {}

/// A handler's view of the tab that sent the message and of the user's session. Everything a loop function may do
/// (backend calls as the user, shared fetches, session data) a handler may do too.
pub trait Context: LoopContext {
    /// This server instance's id (shown in `init`, useful behind a load balancer).
    fn instance(&self) -> &str;

    /// Sends `{type: kind, data}` to the tab that sent the message, echoing its `id`.
    fn reply(&self, kind: &str, data: Value);
    /// Sends `{type: kind, data}` to every tab of the user.
    fn notify_user(&self, kind: &str, data: Value);

    /// Registers a loop function on the user's session. Returns false, and changes nothing, when a function of that
    /// name is already registered: registering is idempotent, so every tab may ask.
    fn register_loop(&self, function: LoopFunction) -> bool;
    /// The last notifications of the named loop function (its snapshot), if it has run.
    fn snapshot(&self, function: &str) -> Option<Vec<Notification>>;
    /// Runs the named loop function at once (if registered), without waiting for its next tick.
    fn run_loop_now(&self, function: &str);
    /// Marks this tab hidden or visible; when all the user's tabs are hidden the short loop slows down.
    fn set_hidden(&self, hidden: bool);

    /// Verifies `token` and, when valid and of the same user, makes it the session's token. Returns the reply data.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Value, CommandError>>;

    /// Subscribes this tab to `topic`; `last_event_id` resumes after that event. Returns false when the tab already
    /// held the topic. `reply`, if any, is queued to the tab atomically with the registration and before any
    /// replayed or live event of the topic, with `added` (the return value) set in its data and the request's
    /// `id` echoed. A reply, not a callback: nothing of the command runs while the engine holds its locks.
    fn subscribe(
        &self,
        topic: &Topic,
        last_event_id: Option<&str>,
        reply: Option<Notification>,
    ) -> Result<bool, CommandError>;
    /// Releases this tab's hold on `topic`. Returns false when the tab did not hold it.
    fn unsubscribe(&self, topic: &Topic) -> bool;
    /// The topics this tab holds.
    fn subscriptions(&self) -> Vec<Topic>;
}

/// A loop function's view of the user's session, for one iteration.
pub trait LoopContext: Send + Sync {
    /// The session's user.
    fn user(&self) -> &User;
    /// Typed state kept by the user's session while it lives (shared by all tabs and by loop functions).
    fn session_data(&self) -> &SessionData;
    /// `GET {backends[backend]}{path}` as the user (`Authorization: Bearer` with the session's newest token), with
    /// the configured timeout and per-backend backoff.
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
