//! tabhub: a backend-for-frontend websocket command server.
//!
//! A browser tab opens `/ws`; tabhub authenticates it against Keycloak during the upgrade ([`handshake`],
//! [`auth`]), attaches it to its user's [`session`] through the [`hub`] (one session per user, shared by all the
//! user's tabs), and dispatches the JSON commands it sends ([`protocol`], [`connection`]) through the registry of
//! the `tabhub-commands` crate, whose [`tabhub_commands::Context`] the engine implements in [`context`]. Handlers
//! register loop functions that the session runs on the user's behalf ([`loops`], calling [`backends`]).
//!
//! Layout:
//! - [`server`]: the listener and routes; [`app`]: shared state; [`config`]: configuration;
//! - [`handshake`]: upgrade, origin and credential checks; [`auth`]: realm discovery, keys, token verification;
//! - [`connection`]: a tab's read loop; [`tab`]: its bounded outbound queue and writer;
//! - [`hub`]: user -> session; [`session`]: tabs, token, loops and snapshots of one user; [`loops`]: the runner;
//! - [`subscriptions`]: a user's topics and upstream streams (bookkeeping); [`upstream`]: GitLab SSE connections;
//! - [`backends`]: calls to backends as the user, with backoff; [`protocol`]: the envelope; [`close_codes`];
//! - [`metrics`]: Prometheus text; `demo` (default feature `demo` only): `tabhub demo`'s setup on the fixtures.

pub mod app;
pub mod auth;
pub mod backends;
pub mod backoff;
pub mod client_assets;
pub mod clock;
pub mod close_codes;
pub mod config;
pub mod connection;
pub mod context;
pub mod custody;
#[cfg(feature = "demo")]
pub mod demo;
pub mod handshake;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod publish;
pub mod rate;
pub mod responses;
pub mod server;
pub mod services;
pub mod session;
pub mod subscriptions;
pub mod tab;
pub mod upstream;

pub use config::Config;
pub use server::{start, Running};
pub use tabhub_commands as commands;
