//! tabhub: a backend-for-frontend websocket command server.
//!
//! A browser tab opens `/ws`; tabhub authenticates it against Keycloak during the upgrade (`handshake`,
//! `auth`), attaches it to its user's `session` through the `hub` (one session per user, shared by all the
//! user's tabs), and dispatches the JSON commands it sends (`protocol`, `connection`) through the registry of
//! the `tabhub-commands` crate, whose [`tabhub_commands::Context`] the engine implements in `context`. Handlers
//! register loop functions that the session runs on the user's behalf (`session::loops`, calling `backends`).
//!
//! Layout, top to bottom (arrows point down only; `tests/layers.rs` checks it):
//! - HTTP layer, the only one that sees the `app`: `server` (listener, routes, drain), `handshake`,
//!   `connection` (a tab's read loop), `publish::api`, `custody::routes`; `responses`;
//! - `app`: the container built last (hub, registry, broker, limits, `services`);
//! - `hub`: user -> session; `session`: membership and fan-out, `token`, `streams`, `loops`; `context`: what
//!   a command handler sees; `publish`: broker, delivery, channels;
//! - `services`: configuration, metrics, realm, `backends`, channels, `upstream` client, `custody`, and the
//!   webhook source's `access` checks, event `history` and `watchers`; `hooks`: webhook deliveries parsed;
//! - leaves: `tab` (bounded queue and writer), `protocol`, `close_codes`, `subscriptions` (bookkeeping),
//!   `config`, `metrics`, `rate`, `backoff`, `clock`, `client_assets`;
//! - `demo` (default feature `demo` only): `tabhub demo`'s setup on the fixtures crate.
//!
//! Only what the binary and the integration tests need is public.

pub(crate) mod access;
pub mod app;
pub mod auth;
pub(crate) mod backends;
pub(crate) mod backoff;
pub(crate) mod channels;
pub(crate) mod client_assets;
pub(crate) mod clock;
pub mod close_codes;
pub mod config;
pub(crate) mod connection;
pub(crate) mod context;
pub(crate) mod custody;
#[cfg(feature = "demo")]
pub mod demo;
pub(crate) mod handshake;
pub(crate) mod history;
pub(crate) mod hooks;
pub(crate) mod hub;
pub(crate) mod metrics;
pub(crate) mod profile;
pub(crate) mod protocol;
pub(crate) mod publish;
pub(crate) mod rate;
pub(crate) mod responses;
pub(crate) mod routes;
pub mod server;
pub(crate) mod services;
pub(crate) mod session;
pub(crate) mod subscriptions;
pub(crate) mod tab;
pub(crate) mod upstream;
pub(crate) mod watchers;

pub use config::Config;
pub use server::{start, Running};
pub use tabhub_commands as commands;
