//! tabhub's command interface: what a command may do, the registry that dispatches to it, and the built-in
//! commands, one file each.
//!
//! This crate knows nothing of the engine. A command is a struct implementing [`Command`]: its wire name, its
//! mandatory and optional parameters (checked by the registry before the handler runs, as in the Renku design),
//! a serde struct for the typed parameters and one handler. The handler acts through [`Context`], which the engine
//! implements: reply to the tab, notify every tab of the user, call a backend as the user, register a loop function
//! on the user's session, open or close subscriptions.
//!
//! Adding a command is one file under `cmd/` plus one line in [`cmd::register_builtin`], or, from outside,
//! `registry.register(MyCommand)` before the server starts.
//!
//! Layout, top to bottom (no module imports one above it):
//! - [`cmd`]: the built-in commands; [`registry`]: the [`Registry`] and parameter checking;
//! - [`command`]: the [`Command`] trait; [`context`]: [`Context`], a handler's view of the tab and session;
//! - [`loops`]: loop functions and their cadence; [`loop_context`]: [`LoopContext`] (a loop function's view) and
//!   the values both deal in;
//! - [`error`]: the error a handler returns; [`future`]: the boxed future of the object-safe traits;
//! - [`registry`]: the [`Registry`] and parameter checking;
//! - [`session_data`]: typed per-session state shared by a command's handler and its loop function;
//! - [`settings`]: typed reads of the `[commands]` settings table;
//! - [`topic`]: subscription topics (`/project/<id>/<eventType>`);
//! - [`cmd`]: the built-in commands.

pub mod cmd;
pub mod command;
pub mod context;
pub mod error;
pub mod future;
pub mod loop_context;
pub mod loops;
pub mod registry;
pub mod session_data;
pub mod settings;
pub mod topic;

pub use command::{Command, NoParams};
pub use context::{Context, SetOutcome};
pub use error::CommandError;
pub use future::BoxFuture;
pub use loop_context::{BackendError, BackendResponse, LoopContext, Notification, User};
pub use loops::{Cadence, LoopError, LoopFunction};
pub use registry::{CommandInfo, Registry};
pub use session_data::SessionData;
pub use topic::Topic;

/// A registry with every built-in command (one line each in [`cmd::register_builtin`]).
pub fn builtin() -> Registry {
    let mut r = Registry::empty();
    cmd::register_builtin(&mut r);
    r
}
