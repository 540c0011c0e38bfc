//! The [`Command`] trait and the error a handler returns.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::context::Context;
use crate::error::CommandError;

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
