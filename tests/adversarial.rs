//! The standing adversarial suite: what one attacker can do, within the rate limits, against real tabhub processes
//! on 127.0.0.1, each class bounded to a few seconds. Each file under `tests/adversarial/` holds one class; every
//! test there reproduces an attack that once worked and checks the bound that now holds.

// Each class uses a part of the shared support; the rest is not dead code.
#![allow(unused_imports, dead_code)]

mod support;

#[path = "adversarial/authenticate.rs"]
mod authenticate;
#[path = "adversarial/backends.rs"]
mod backends;
#[path = "adversarial/commands.rs"]
mod commands;
#[path = "adversarial/login.rs"]
mod login;
#[path = "adversarial/logs.rs"]
mod logs;
#[path = "adversarial/publish.rs"]
mod publish;
#[path = "adversarial/slowloris.rs"]
mod slowloris;
#[path = "adversarial/subscriptions.rs"]
mod subscriptions;
#[path = "adversarial/tokens.rs"]
mod tokens;
