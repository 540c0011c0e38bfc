//! A session's loop functions: their slots (wake signal, task, snapshot, failing state) and the runner.
//!
//! Each function has its own task: iterations run one after another in it, so one function can never run two
//! iterations at once; an iteration that outlasts its interval makes the next ticks be skipped (and counted), not
//! pile up. Every iteration has a timeout and first checks that the session holds a valid token.
//!
//! The first iteration runs at once. The second comes after a random 0.5-1.5 intervals, so that sessions created
//! in the same second (a restart, a reconnect storm) spread their ticks over a whole interval instead of calling
//! the backends together forever after.
//!
//! The runner knows its session only through [`LoopHost`], which the session implements.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use rand::Rng;
use serde_json::{json, Value};
use tabhub_commands::{Cadence, LoopContext, LoopFunction, Notification};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::metrics::Metrics;

/// What the runner needs of the session that owns the loop.
pub(crate) trait LoopHost: Send + Sync + 'static {
    /// The interval of a cadence now (the short loop slows down while every tab is hidden).
    fn interval(&self, cadence: Cadence) -> Duration;
    /// Whether the session holds a token that has not expired: without one an iteration is skipped.
    fn has_token(&self) -> bool;
    /// The context an iteration runs with.
    fn loop_context(self: Arc<Self>) -> Arc<dyn LoopContext>;
    /// Applies an iteration's outcome (see [`Loops::finish`]).
    fn finished(&self, name: &str, outcome: Result<Vec<Notification>, String>);
    fn loop_timeout(&self) -> Duration;
    fn metrics(&self) -> &Metrics;
}

/// One registered loop function.
struct LoopSlot {
    cadence: Cadence,
    wake: Arc<Notify>,
    task: AbortHandle,
    /// The last notification of each kind the function sent: what a joining tab receives at once.
    snapshot: Vec<Notification>,
    /// Whether the last iteration failed: errors are told once per change of state.
    failing: bool,
    /// When a command or a visibility change last ran the function early: at most once per interval, so that a
    /// user toggling visibility or re-adding ids cannot multiply the function's backend calls.
    woken_at: Option<Instant>,
}

/// The loop functions of one session, by name.
#[derive(Default)]
pub(crate) struct Loops {
    slots: BTreeMap<String, LoopSlot>,
}

impl Loops {
    /// Registers a function whose task `spawn` starts with the slot's wake signal; false (and nothing spawned)
    /// when one of that name exists.
    pub(crate) fn register(
        &mut self,
        function: &LoopFunction,
        spawn: impl FnOnce(Arc<Notify>) -> AbortHandle,
    ) -> bool {
        if self.slots.contains_key(function.name.as_ref()) {
            return false;
        }
        let wake = Arc::new(Notify::new());
        let task = spawn(wake.clone());
        self.slots.insert(
            function.name.to_string(),
            LoopSlot {
                cadence: function.cadence,
                wake,
                task,
                snapshot: Vec::new(),
                failing: false,
                woken_at: None,
            },
        );
        true
    }

    /// The function's last notifications, if it has sent any.
    pub(crate) fn snapshot(&self, name: &str) -> Option<Vec<Notification>> {
        self.slots
            .get(name)
            .filter(|s| !s.snapshot.is_empty())
            .map(|s| s.snapshot.clone())
    }

    /// Every function's snapshot, for a tab that joins.
    pub(crate) fn snapshots(&self) -> impl Iterator<Item = &Notification> {
        self.slots.values().flat_map(|s| s.snapshot.iter())
    }

    /// Runs the named function at once, unless it was already run early within `gap(its cadence)` (its nominal
    /// interval): then the next regular tick picks the change up. True when woken.
    pub(crate) fn wake(&mut self, name: &str, gap: impl Fn(Cadence) -> Duration) -> bool {
        self.slots
            .get_mut(name)
            .is_some_and(|slot| Self::wake_slot(slot, &gap))
    }

    /// Runs every short-loop function at once (a tab became visible), with the same bound as [`Loops::wake`].
    pub(crate) fn wake_short(&mut self, gap: impl Fn(Cadence) -> Duration) {
        for slot in self.slots.values_mut() {
            if slot.cadence == Cadence::Short {
                Self::wake_slot(slot, &gap);
            }
        }
    }

    fn wake_slot(slot: &mut LoopSlot, gap: &impl Fn(Cadence) -> Duration) -> bool {
        let now = Instant::now();
        if slot
            .woken_at
            .is_some_and(|at| now.duration_since(at) < gap(slot.cadence))
        {
            return false;
        }
        slot.woken_at = Some(now);
        slot.wake.notify_one();
        true
    }

    /// Stops every function.
    pub(crate) fn abort_all(&mut self) {
        for (_, slot) in std::mem::take(&mut self.slots) {
            slot.task.abort();
        }
    }

    /// Applies an iteration's outcome to the function's state and returns what to send to every tab: its
    /// notifications (which also become its snapshot), `recovered` once when it works again after failing, and
    /// `error` once when it starts failing, never once per failing tick. Nothing for an unknown function.
    pub(crate) fn finish(
        &mut self,
        name: &str,
        outcome: Result<Vec<Notification>, String>,
    ) -> Vec<Notification> {
        let Some(slot) = self.slots.get_mut(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match outcome {
            Ok(notes) => {
                if std::mem::replace(&mut slot.failing, false) {
                    out.push(Notification::new("recovered", json!({"function": name})));
                }
                for n in notes {
                    if !n.repeat {
                        match slot.snapshot.iter_mut().find(|s| s.kind == n.kind) {
                            Some(s) => *s = n.clone(),
                            None => slot.snapshot.push(n.clone()),
                        }
                    }
                    out.push(n);
                }
            }
            Err(message) => {
                if !std::mem::replace(&mut slot.failing, true) {
                    let data: Value =
                        json!({"message": format!("{name}: {message}"), "function": name});
                    out.push(Notification::new("error", data));
                }
            }
        }
        out
    }
}

/// Starts a function's task. It holds the host weakly, so it never keeps a stopped session alive.
pub(crate) fn spawn<H: LoopHost>(
    host: &Arc<H>,
    function: LoopFunction,
    wake: Arc<Notify>,
    span: tracing::Span,
) -> AbortHandle {
    tokio::spawn(run(Arc::downgrade(host), function, wake).instrument(span)).abort_handle()
}

async fn run<H: LoopHost>(host: Weak<H>, function: LoopFunction, wake: Arc<Notify>) {
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
        let Some(h) = host.upgrade() else { return };
        let started = Instant::now();
        iterate(&h, &function, &name).await;
        let interval = h.interval(function.cadence);
        let skipped = (started.elapsed().as_nanos() / interval.as_nanos().max(1)) as u64;
        if skipped > 0 {
            h.metrics().loop_skipped_ticks.add(&[&name], skipped as f64);
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

async fn iterate<H: LoopHost>(h: &Arc<H>, function: &LoopFunction, name: &str) {
    if !h.has_token() {
        return;
    }
    let timeout = h.loop_timeout();
    let started = Instant::now();
    // A function that panics fails this iteration like any error (told once to the tabs) and runs again at the
    // next tick: a bug in one command's loop must not silently stop it, nor take the session down.
    let run = AssertUnwindSafe(function.run(h.clone().loop_context())).catch_unwind();
    let outcome = match tokio::time::timeout(timeout, run).await {
        Ok(Ok(Ok(notes))) => Ok(notes),
        Ok(Ok(Err(e))) => Err(e.0),
        Ok(Err(_panic)) => Err("internal error (the function panicked)".to_owned()),
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    };
    let metrics = h.metrics();
    metrics.loop_iterations.inc(&[name]);
    metrics
        .loop_seconds
        .add(&[name], started.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        metrics.loop_errors.inc(&[name]);
        tracing::debug!(function = name, error = %e, "loop iteration failed");
    }
    h.finished(name, outcome);
}
