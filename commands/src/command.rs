//! The [`Command`] trait and the error a handler returns.

use std::future::Future;
use std::pin::Pin;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::context::Context;

/// A boxed, sendable future: what the context's methods return so that the context stays object-safe. Command
/// files never need it: they write `async fn handle`, and the registry boxes it once.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The parameters of a command that takes none.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// One command a tab may send: `{"type": NAME, "data": {...}}`.
///
/// The registry checks the keys of `data` against [`Command::REQUIRED`] and [`Command::OPTIONAL`] (every required
/// key present, no other key), then deserializes [`Command::Params`] and calls [`Command::handle`].
pub trait Command: Send + Sync + 'static {
    /// The wire name (`type` of the client message).
    const NAME: &'static str;
    /// One line for `tabhub commands` and the README.
    const DOC: &'static str;
    /// Keys `data` must carry.
    const REQUIRED: &'static [&'static str] = &[];
    /// Keys `data` may carry.
    const OPTIONAL: &'static [&'static str] = &[];
    /// Typed parameters; use `#[serde(deny_unknown_fields)]` so the struct and the key lists cannot drift apart
    /// silently.
    type Params: DeserializeOwned + Send + 'static;

    /// Keys of the `[commands]` configuration table this command reads (in [`Command::configure`]). A key no
    /// command claims fails the start, so a misspelt setting is never silently ignored.
    const SETTINGS: &'static [&'static str] = &[];

    /// Reads this command's settings from the `[commands]` table, once, at start. An `Err` names the key and fails
    /// the start; handlers and loop functions then use the parsed values, never the table.
    fn configure(&mut self, settings: &Map<String, Value>) -> Result<(), String> {
        let _ = settings;
        Ok(())
    }

    /// Handles one message (write it as `async fn handle`). Replies go through `ctx`; an `Err` becomes an `error`
    /// to the sending tab only.
    fn handle(
        &self,
        params: Self::Params,
        ctx: &dyn Context,
    ) -> impl Future<Output = Result<(), CommandError>> + Send;
}

/// Why a message was not carried out. The text is sent to the tab that sent it, so it must never contain a token
/// or a session id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// No command of that name (Renku's wording).
    Unknown(String),
    /// A required key is missing, or a key outside required + optional is present, or a value has the wrong type.
    BadParams(String),
    /// The handler refused or failed; the message explains why.
    Failed(String),
}

impl CommandError {
    pub fn failed(message: impl Into<String>) -> Self {
        CommandError::Failed(message.into())
    }

    /// The message sent to the tab.
    pub fn message(&self) -> &str {
        match self {
            CommandError::Unknown(m) | CommandError::BadParams(m) | CommandError::Failed(m) => m,
        }
    }

    /// A short label for metrics: `unknown`, `bad_params` or `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            CommandError::Unknown(_) => "unknown",
            CommandError::BadParams(_) => "bad_params",
            CommandError::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for CommandError {}
