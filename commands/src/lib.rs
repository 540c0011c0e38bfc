//! tabhub's command interface: what a command may do, the registry that dispatches to it, and the built-in
//! commands, one file each.
//!
//! This crate knows nothing of the engine. A command is a struct implementing [`Command`]: its wire name, its
//! mandatory and optional parameters (checked by the registry before the handler runs, as in the Renku design),
//! a serde struct for the typed parameters and one handler. The handler acts through [`Context`], which the engine
//! implements: reply to the tab, notify every tab of the user, call a backend as the user, register a loop function
//! on the user's session, open or close subscriptions.
//!
//! Adding a command is one file here plus one line in [`Registry::builtin`], or, from outside,
//! `registry.register(MyCommand)` before the server starts.
//!
//! Layout:
//! - [`command`]: the [`Command`] trait and the error a handler returns;
//! - [`context`]: [`Context`] (a handler's view of the tab and session) and [`LoopContext`] (a loop function's);
//! - [`loops`]: loop functions and their cadence;
//! - [`registry`]: the [`Registry`] and parameter checking;
//! - [`session_data`]: typed per-session state shared by a command's handler and its loop function;
//! - [`settings`]: typed reads of the `[commands]` settings table;
//! - [`topic`]: subscription topics (`/project/<id>/<eventType>`);
//! - [`cmd`]: the built-in commands.

pub mod cmd;
pub mod command;
pub mod context;
pub mod loops;
pub mod registry;
pub mod session_data;
pub mod settings;
pub mod topic;

pub use command::{BoxFuture, Command, CommandError, NoParams};
pub use context::{BackendError, BackendResponse, Context, LoopContext, Notification, User};
pub use loops::{Cadence, LoopError, LoopFunction};
pub use registry::{CommandInfo, Registry};
pub use session_data::SessionData;
pub use topic::Topic;
