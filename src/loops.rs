//! Runs a session's loop functions.
//!
//! Each function has its own task: iterations run one after another in it, so one function can never run two
//! iterations at once; an iteration that outlasts its interval makes the next ticks be skipped (and counted), not
//! pile up. Every iteration has a timeout and first checks that the session holds a valid token.
//!
//! The first iteration runs at once. The second comes after a random 0.5-1.5 intervals, so that sessions created
//! in the same second (a restart, a reconnect storm) spread their ticks over a whole interval instead of calling
//! the backends together forever after.

use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;
use tabhub_commands::{LoopContext, LoopFunction};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::context::LoopCtx;
use crate::session::Session;

pub(crate) fn spawn(
    session: &Arc<Session>,
    function: LoopFunction,
    wake: Arc<Notify>,
) -> AbortHandle {
    let span = tracing::info_span!(parent: &session.span, "loop", function = %function.name);
    tokio::spawn(run(Arc::downgrade(session), function, wake).instrument(span)).abort_handle()
}

async fn run(session: Weak<Session>, function: LoopFunction, wake: Arc<Notify>) {
    let name = function.name.to_string();
    let mut next: Option<Instant> = None;
    let mut first = true;
    loop {
        if let Some(at) = next {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = wake.notified() => {}
            }
        }
        let Some(s) = session.upgrade() else { return };
        let started = Instant::now();
        iterate(&s, &function, &name).await;
        let interval = s.interval(function.cadence);
        let elapsed = started.elapsed();
        let skipped = (elapsed.as_nanos() / interval.as_nanos().max(1)) as u64;
        if skipped > 0 {
            s.app()
                .metrics
                .loop_skipped_ticks
                .add(&[&name], skipped as f64);
        }
        let wait = if first {
            interval.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
        } else {
            interval * (skipped as u32 + 1)
        };
        next = Some(started + wait);
        first = false;
    }
}

async fn iterate(s: &Arc<Session>, function: &LoopFunction, name: &str) {
    let app = s.app().clone();
    if s.valid_token().is_none() {
        return;
    }
    let ctx: Arc<dyn LoopContext> = Arc::new(LoopCtx::new(s.clone()));
    let timeout = Duration::from_millis(app.config.session.loop_timeout_ms);
    let started = Instant::now();
    let outcome = match tokio::time::timeout(timeout, function.run(ctx)).await {
        Ok(Ok(notes)) => Ok(notes),
        Ok(Err(e)) => Err(e.0),
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    };
    app.metrics.loop_iterations.inc(&[name]);
    app.metrics
        .loop_seconds
        .add(&[name], started.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        tracing::debug!(user = %s.user.id, function = name, error = %e, "loop iteration failed");
    }
    s.loop_finished(name, outcome);
}
