//! Loop functions: recurring work a handler registers on the user's session.
//!
//! As the Renku design asks, setup belongs in the handler and recurring work in the loop function. The engine runs
//! each function on its cadence, never two iterations of one function at once, each with a timeout, only while the
//! session holds a valid token. The notifications an iteration returns are sent to every tab of the user and kept as
//! the function's snapshot, which a tab joining the session receives at once.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use crate::future::BoxFuture;
use crate::loop_context::{LoopContext, Notification};

/// Which of the session's loops runs the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cadence {
    /// Every short interval (default 5 s; slower while all the user's tabs are hidden).
    Short,
    /// Every long interval (default 180 s).
    Long,
}

/// An iteration's failure. Sent to the user's tabs as `error {message, function}` once per change of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopError(pub String);

impl std::fmt::Display for LoopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for LoopError {
    fn from(e: E) -> Self {
        LoopError(e.to_string())
    }
}

/// What one iteration returns: the notifications to send now (empty when nothing changed).
pub type LoopResult = Result<Vec<Notification>, LoopError>;

type RunFn = dyn Fn(Arc<dyn LoopContext>) -> BoxFuture<'static, LoopResult> + Send + Sync;

/// A named loop function.
#[derive(Clone)]
pub struct LoopFunction {
    pub name: Cow<'static, str>,
    pub cadence: Cadence,
    run: Arc<RunFn>,
}

impl LoopFunction {
    pub fn new<F, Fut>(name: impl Into<Cow<'static, str>>, cadence: Cadence, f: F) -> Self
    where
        F: Fn(Arc<dyn LoopContext>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = LoopResult> + Send + 'static,
    {
        LoopFunction {
            name: name.into(),
            cadence,
            run: Arc::new(move |ctx| Box::pin(f(ctx))),
        }
    }

    /// Runs one iteration.
    pub fn run(&self, ctx: Arc<dyn LoopContext>) -> BoxFuture<'static, LoopResult> {
        (self.run)(ctx)
    }
}

impl std::fmt::Debug for LoopFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopFunction")
            .field("name", &self.name)
            .field("cadence", &self.cadence)
            .finish()
    }
}
