//! Hostile commands: a handler that panics, frames that break the protocol.
