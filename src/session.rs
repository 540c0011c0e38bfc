//! A user's session: shared by all the user's tabs, it holds the newest token, the loop functions and their
//! snapshots, and the command state ([`SessionData`]).
//!
//! State lives behind one short-held mutex, never held across an `.await`. Lock order is always hub, then
//! session, then tab; this makes "attach a tab" and "stop after the linger" atomic with respect to each other, so a
//! user can never have two sessions or two copies of a loop (see [`crate::hub`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tabhub_commands::{Cadence, LoopFunction, Notification, SessionData, User};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::app::App;
use crate::auth::Verified;
use crate::close_codes::{self, CloseCode};
use crate::protocol;
use crate::subscriptions::{Action, Limits, SubscribeError, Subscriptions};
use crate::tab::Tab;
use tabhub_commands::Topic;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One registered loop function.
struct LoopSlot {
    cadence: Cadence,
    wake: Arc<Notify>,
    task: AbortHandle,
    /// The last notification of each kind the function sent: what a joining tab receives at once.
    snapshot: Vec<Notification>,
    /// Whether the last iteration failed: errors are told once per change of state.
    failing: bool,
}

struct Inner {
    tabs: Vec<Arc<Tab>>,
    /// Bumped on every attach and on every detach that empties the session, so that a linger timer can tell
    /// whether the session stayed empty since it started.
    generation: u64,
    stopped: bool,
    loops: BTreeMap<String, LoopSlot>,
    /// Tasks that die with the session (token expiry watcher...).
    tasks: Vec<AbortHandle>,
    subs: Subscriptions,
}

/// Why a tab could not join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachError {
    /// The session stopped meanwhile; the hub creates a new one.
    Stopped,
    /// The user already has the maximum number of tabs.
    TooManyTabs,
}

pub struct Session {
    pub user: User,
    /// The session's tracing span: tabs, loops and upstream streams log under it (user id only, never tokens or
    /// session ids).
    pub span: tracing::Span,
    app: Arc<App>,
    data: SessionData,
    inner: Mutex<Inner>,
    /// The newest token; a watch channel so the expiry watcher can wait for changes without holding the session.
    token: watch::Sender<Option<Verified>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Session {
    pub(crate) fn new(app: Arc<App>, user: User) -> Arc<Session> {
        let session = Arc::new(Session {
            span: tracing::info_span!("session", user = %user.id),
            user,
            app,
            data: SessionData::default(),
            inner: Mutex::new(Inner {
                tabs: Vec::new(),
                generation: 0,
                stopped: false,
                loops: BTreeMap::new(),
                tasks: Vec::new(),
                subs: Subscriptions::default(),
            }),
            token: watch::Sender::new(None),
        });
        let watcher = tokio::spawn(watch_expiry(
            Arc::downgrade(&session),
            session.token.subscribe(),
        ))
        .abort_handle();
        session.lock().tasks.push(watcher);
        session.app.metrics.sessions.inc();
        tracing::debug!(user = %session.user.id, "session started");
        session
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    pub fn data(&self) -> &SessionData {
        &self.data
    }

    /// Adds a tab, offers its token, and queues the loop snapshots to it.
    pub(crate) fn attach(&self, tab: &Arc<Tab>, token: &Verified) -> Result<(), AttachError> {
        let mut inner = self.lock();
        if inner.stopped {
            return Err(AttachError::Stopped);
        }
        let max = self.app.config.limits.max_tabs_per_user;
        if max > 0 && inner.tabs.len() >= max {
            return Err(AttachError::TooManyTabs);
        }
        if inner.tabs.is_empty() && inner.generation > 0 {
            self.app.metrics.lingering_sessions.dec();
        }
        // A visible tab joining tabs that are all hidden restores the short pace at once, as un-hiding does.
        let all_hidden = !inner.tabs.is_empty() && inner.tabs.iter().all(|t| t.is_hidden());
        inner.tabs.push(tab.clone());
        inner.generation += 1;
        for slot in inner.loops.values() {
            for n in &slot.snapshot {
                tab.send(protocol::encode(&n.kind, &n.data, None));
            }
            if all_hidden && !tab.is_hidden() && slot.cadence == Cadence::Short {
                slot.wake.notify_one();
            }
        }
        drop(inner);
        self.offer_token(token);
        Ok(())
    }

    /// Removes a tab and releases its topics. Returns the generation to linger on when it was the last.
    ///
    /// Upstream streams the tab alone held are kept for `session.linger_ms` (a reload takes them back without
    /// reconnecting), then swept; a session that stops meanwhile stops them all.
    pub(crate) fn detach(self: &Arc<Self>, tab_id: u64) -> Option<u64> {
        let mut inner = self.lock();
        let now = std::time::Instant::now();
        let (kept, channels) = inner.subs.release_tab(tab_id, now);
        if !kept.is_empty() {
            let grace = Duration::from_millis(self.app.config.session.linger_ms);
            let session = Arc::downgrade(self);
            tokio::spawn(async move {
                // Never earlier than `now + grace` (tokio's timers do not fire early), so the sweep finds it due.
                tokio::time::sleep_until((now + grace).into()).await;
                if let Some(s) = session.upgrade() {
                    s.lock().subs.sweep(std::time::Instant::now(), grace);
                }
            });
        }
        for c in channels {
            if !inner.subs.holds(&c) {
                self.app
                    .channels
                    .remove_holder(&c.to_string(), &self.user.id);
            }
        }
        let before = inner.tabs.len();
        inner.tabs.retain(|t| t.id != tab_id);
        if before != inner.tabs.len() && inner.tabs.is_empty() && !inner.stopped {
            inner.generation += 1;
            self.app.metrics.lingering_sessions.inc();
            Some(inner.generation)
        } else {
            None
        }
    }

    /// Stops the session if it is still empty since `generation`: aborts its loops and tasks. Called by the hub
    /// under the hub's lock.
    pub(crate) fn try_stop(&self, generation: u64) -> bool {
        let mut inner = self.lock();
        if inner.stopped || !inner.tabs.is_empty() || inner.generation != generation {
            return false;
        }
        self.stop_locked(&mut inner);
        self.app.metrics.lingering_sessions.dec();
        true
    }

    /// Stops at once, closing every tab with `code` (drain, logout).
    pub(crate) fn stop_now(&self, code: CloseCode, reason: &str) -> bool {
        let mut inner = self.lock();
        if inner.stopped {
            return false;
        }
        if inner.tabs.is_empty() && inner.generation > 0 {
            self.app.metrics.lingering_sessions.dec();
        }
        for t in inner.tabs.drain(..) {
            t.close(code, reason);
        }
        self.stop_locked(&mut inner);
        true
    }

    fn stop_locked(&self, inner: &mut Inner) {
        inner.stopped = true;
        for (_, slot) in std::mem::take(&mut inner.loops) {
            slot.task.abort();
        }
        for t in inner.tasks.drain(..) {
            t.abort();
        }
        for tab in inner.tabs.iter().map(|t| t.id).collect::<Vec<_>>() {
            for c in inner.subs.release_tab(tab, std::time::Instant::now()).1 {
                self.app
                    .channels
                    .remove_holder(&c.to_string(), &self.user.id);
            }
        }
        inner.subs.stop_all();
        self.app.metrics.sessions.dec();
        tracing::debug!(user = %self.user.id, "session stopped");
    }

    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// The session's tabs now.
    pub fn tabs(&self) -> Vec<Arc<Tab>> {
        self.lock().tabs.clone()
    }

    pub fn tab_count(&self) -> usize {
        self.lock().tabs.len()
    }

    /// Sends a message to every tab of the user; serialized once.
    pub fn broadcast(&self, kind: &str, data: &Value) {
        self.send_all(&protocol::encode(kind, data, None));
    }

    /// Sends encoded bytes to every tab of the user.
    pub fn send_all(&self, msg: &Utf8Bytes) {
        for t in &self.lock().tabs {
            t.send(msg.clone());
        }
    }

    /// Sends encoded bytes to the tabs holding `topic`.
    pub fn deliver_to_holders(&self, topic: &Topic, msg: &Utf8Bytes) {
        let inner = self.lock();
        let holders = inner.subs.tabs_holding(topic);
        for t in inner.tabs.iter().filter(|t| holders.contains(&t.id)) {
            t.send(msg.clone());
        }
    }

    /// Sends `kind data` to the tabs of one browser session, then closes them with `code`.
    pub fn close_source(&self, source: &str, kind: &str, data: Value, code: CloseCode) {
        let msg = protocol::encode(kind, &data, None);
        for t in self
            .lock()
            .tabs
            .iter()
            .filter(|t| t.source.as_deref() == Some(source))
        {
            t.send(msg.clone());
            t.close(code, code.name);
        }
    }

    /// The browser sessions of the tabs, current token's first: where a refresh may come from.
    fn sources(&self, first: Option<&Arc<str>>) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = first.into_iter().cloned().collect();
        for t in &self.lock().tabs {
            if let Some(s) = &t.source {
                if !out.contains(s) {
                    out.push(s.clone());
                }
            }
        }
        out
    }

    /// Closes every tab with `code` (they detach themselves as their connections end).
    pub fn close_all(&self, code: CloseCode, reason: &str) {
        for t in &self.lock().tabs {
            t.close(code, reason);
        }
    }

    // ---- token ----

    /// Makes `token` the session's token if it expires later than the current one.
    pub fn offer_token(&self, token: &Verified) {
        self.token.send_if_modified(|cur| {
            let newer = cur.as_ref().is_none_or(|c| token.exp > c.exp);
            if newer {
                *cur = Some(token.clone());
            }
            newer
        });
    }

    /// Makes a token just refreshed through token custody the session's token unless the current one expires
    /// later: a refresh within the second of the previous token has the same `exp`, and must still replace it (the
    /// previous one may be signed by a withdrawn key).
    fn renew_token(&self, token: &Verified) {
        self.token.send_if_modified(|cur| {
            let renew = cur.as_ref().is_none_or(|c| token.exp >= c.exp);
            if renew {
                *cur = Some(token.clone());
            }
            renew
        });
    }

    /// A receiver that sees every change of the session's token.
    pub fn token_changes(&self) -> watch::Receiver<Option<Verified>> {
        self.token.subscribe()
    }

    /// The newest token, if it has not expired.
    pub fn valid_token(&self) -> Option<Verified> {
        self.token
            .borrow()
            .as_ref()
            .filter(|t| t.exp > now_unix())
            .cloned()
    }

    // ---- loops ----

    /// Registers a loop function; false when one of that name exists or the session stopped.
    pub fn register_loop(self: &Arc<Self>, function: LoopFunction) -> bool {
        let mut inner = self.lock();
        if inner.stopped || inner.loops.contains_key(function.name.as_ref()) {
            return false;
        }
        let wake = Arc::new(Notify::new());
        let name = function.name.to_string();
        let cadence = function.cadence;
        let task = crate::loops::spawn(self, function, wake.clone());
        inner.loops.insert(
            name,
            LoopSlot {
                cadence,
                wake,
                task,
                snapshot: Vec::new(),
                failing: false,
            },
        );
        true
    }

    pub fn snapshot(&self, name: &str) -> Option<Vec<Notification>> {
        self.lock()
            .loops
            .get(name)
            .filter(|s| !s.snapshot.is_empty())
            .map(|s| s.snapshot.clone())
    }

    pub fn run_loop_now(&self, name: &str) {
        if let Some(slot) = self.lock().loops.get(name) {
            slot.wake.notify_one();
        }
    }

    /// The interval of a cadence now: the short loop slows down while every tab is hidden.
    pub fn interval(&self, cadence: Cadence) -> Duration {
        let s = &self.app.config.session;
        match cadence {
            Cadence::Long => Duration::from_millis(s.long_interval_ms),
            Cadence::Short if self.all_hidden() => Duration::from_millis(s.hidden_interval_ms),
            Cadence::Short => Duration::from_millis(s.short_interval_ms),
        }
    }

    fn all_hidden(&self) -> bool {
        let inner = self.lock();
        !inner.tabs.is_empty() && inner.tabs.iter().all(|t| t.is_hidden())
    }

    /// Marks a tab hidden or visible; when the first tab becomes visible again, the short loops run at once.
    pub fn set_hidden(&self, tab: &Tab, hidden: bool) {
        let was_all_hidden = self.all_hidden();
        if tab.set_hidden(hidden) && was_all_hidden && !hidden {
            for slot in self.lock().loops.values() {
                if slot.cadence == Cadence::Short {
                    slot.wake.notify_one();
                }
            }
        }
    }

    /// Applies an iteration's outcome: sends and snapshots its notifications; tells the tabs when the function
    /// starts failing and when it recovers, not at every failing tick.
    pub(crate) fn loop_finished(&self, name: &str, outcome: Result<Vec<Notification>, String>) {
        let mut inner = self.lock();
        let Inner { tabs, loops, .. } = &mut *inner;
        let Some(slot) = loops.get_mut(name) else {
            return;
        };
        let send = |kind: &str, data: &Value| {
            let msg = protocol::encode(kind, data, None);
            for t in tabs.iter() {
                t.send(msg.clone());
            }
        };
        match outcome {
            Ok(notes) => {
                if slot.failing {
                    slot.failing = false;
                    send("recovered", &json!({"function": name}));
                }
                for n in notes {
                    send(&n.kind, &n.data);
                    match slot.snapshot.iter_mut().find(|s| s.kind == n.kind) {
                        Some(s) => *s = n,
                        None => slot.snapshot.push(n),
                    }
                }
            }
            Err(message) => {
                self.app.metrics.loop_errors.inc(&[name]);
                if !slot.failing {
                    slot.failing = true;
                    send(
                        "error",
                        &json!({"message": format!("{name}: {message}"), "function": name}),
                    );
                }
            }
        }
    }
}

impl Session {
    // ---- subscriptions ----

    fn sub_limits(&self) -> Limits {
        let g = &self.app.config.gitlab;
        Limits {
            topics_per_tab: g.max_topics_per_tab,
            projects_per_user: g.max_projects_per_user,
            buffer: g.replay_buffer_events,
        }
    }

    /// Subscribes `tab` to `topic`, resuming after `last_event_id` when given. Under the session's lock, so that no
    /// live event can come between: the acknowledgement `ack(added)` is queued first, then the events the tab
    /// missed that are still in the replay buffer.
    pub fn subscribe(
        self: &Arc<Self>,
        tab: &Tab,
        topic: &Topic,
        last_event_id: Option<&str>,
        ack: impl FnOnce(bool) -> Option<Utf8Bytes>,
    ) -> Result<bool, SubscribeError> {
        let limits = self.sub_limits();
        let mut inner = self.lock();
        if inner.stopped {
            return Ok(false);
        }
        let (added, replay, action) = inner.subs.subscribe(tab.id, topic, last_event_id, limits)?;
        if let Some(msg) = ack(added) {
            tab.send(msg);
        }
        for msg in replay {
            tab.send(msg);
        }
        if let Some(a) = action {
            self.apply(&mut inner, a);
        }
        Ok(added)
    }

    /// Subscribes `tab` to a publish-only channel. The caller holds the channel's buffer (`buffer`), so that no
    /// published message can come between the replay and the registration.
    pub fn subscribe_channel(
        &self,
        tab: &Tab,
        topic: &Topic,
        last_event_id: Option<&str>,
        ack: impl FnOnce(bool) -> Option<Utf8Bytes>,
        buffer: &crate::publish::channels::Buffer,
    ) -> Result<bool, SubscribeError> {
        let limits = self.sub_limits();
        let mut inner = self.lock();
        if inner.stopped {
            return Ok(false);
        }
        let (added, _, _) = inner.subs.subscribe(tab.id, topic, last_event_id, limits)?;
        self.app
            .channels
            .add_holder(&topic.to_string(), &self.user.id);
        if let Some(msg) = ack(added) {
            tab.send(msg);
        }
        if let Some(missed) = last_event_id.and_then(|id| buffer.after(id)) {
            for msg in missed {
                tab.send(msg);
            }
        }
        Ok(added)
    }

    /// Releases `tab`'s hold on `topic`; the last release closes the project's stream.
    pub fn unsubscribe(&self, tab: &Tab, topic: &Topic) -> bool {
        let mut inner = self.lock();
        let removed = inner.subs.unsubscribe(tab.id, topic).0;
        if removed && matches!(topic, Topic::Channel(_)) && !inner.subs.holds(topic) {
            self.app
                .channels
                .remove_holder(&topic.to_string(), &self.user.id);
        }
        removed
    }

    /// The topics a tab holds.
    pub fn topics_of(&self, tab: &Tab) -> Vec<Topic> {
        self.lock().subs.topics_of(tab.id)
    }

    /// Reopens every upstream stream with the newest token, resuming after the last event (after a refresh).
    pub fn rebuild_streams(self: &Arc<Self>) {
        let mut inner = self.lock();
        for a in inner.subs.restart_all() {
            self.apply(&mut inner, a);
        }
    }

    fn apply(self: &Arc<Self>, inner: &mut Inner, action: Action) {
        if let Action::Start {
            project,
            filter,
            generation,
            ..
        } = action
        {
            let span = tracing::info_span!(parent: &self.span, "upstream", project = %project);
            let task = tokio::spawn(
                crate::upstream::run(Arc::downgrade(self), project.clone(), filter, generation)
                    .instrument(span),
            )
            .abort_handle();
            if let Some(s) = inner.subs.stream_mut(&project) {
                s.task = Some(task);
            }
        }
    }

    pub(crate) fn stream_resume_id(&self, project: &str) -> Option<String> {
        self.lock().subs.resume_id(project)
    }

    pub(crate) fn upstream_event(
        &self,
        project: &str,
        generation: u64,
        id: &str,
        event_type: &str,
        data: &str,
    ) {
        let cap = self.app.config.gitlab.replay_buffer_events;
        let mut inner = self.lock();
        let Inner { tabs, subs, .. } = &mut *inner;
        let delivery = subs.on_event(project, generation, id, event_type, cap, || {
            let payload = serde_json::from_str::<Value>(data)
                .unwrap_or_else(|_| Value::String(data.to_owned()));
            protocol::encode_scoped(
                "topic",
                "event",
                &json!({
                    "topic": format!("/project/{project}/{event_type}"),
                    "eventType": event_type,
                    "id": id,
                    "payload": payload,
                }),
                None,
            )
        });
        if let Some(d) = delivery {
            for t in tabs.iter().filter(|t| d.tabs.contains(&t.id)) {
                t.send(d.msg.clone());
            }
        }
    }

    /// Sends `kind {topic, ...data}` to every tab holding a topic of `project`.
    fn tell_holders(inner: &Inner, holders: &[(u64, Topic)], kind: &str, data: &Value) {
        for (tab_id, topic) in holders {
            let mut d = data.clone();
            d["topic"] = Value::String(topic.to_string());
            if let Some(t) = inner.tabs.iter().find(|t| t.id == *tab_id) {
                t.send(protocol::encode_scoped("topic", kind, &d, None));
            }
        }
    }

    pub(crate) fn upstream_open(&self, project: &str, generation: u64) {
        let mut inner = self.lock();
        if !inner.subs.is_current(project, generation) {
            return;
        }
        let was_degraded = inner
            .subs
            .stream_mut(project)
            .map(|s| std::mem::replace(&mut s.degraded, false))
            .unwrap_or(false);
        if was_degraded {
            let holders = inner.subs.holders(project);
            Self::tell_holders(
                &inner,
                &holders,
                "subscriptionStatus",
                &json!({"status": "recovered"}),
            );
        }
    }

    pub(crate) fn upstream_degraded(&self, project: &str, generation: u64, why: &str) {
        let mut inner = self.lock();
        if !inner.subs.is_current(project, generation) {
            return;
        }
        let newly = inner
            .subs
            .stream_mut(project)
            .map(|s| !std::mem::replace(&mut s.degraded, true))
            .unwrap_or(false);
        if newly {
            tracing::info!(user = %self.user.id, project, reason = why, "upstream stream degraded");
            let holders = inner.subs.holders(project);
            Self::tell_holders(
                &inner,
                &holders,
                "subscriptionStatus",
                &json!({"status": "degraded", "message": why}),
            );
        }
    }

    pub(crate) fn upstream_unauthorized(&self, project: &str, generation: u64) {
        let inner = self.lock();
        if !inner.subs.is_current(project, generation) {
            return;
        }
        let holders = inner.subs.holders(project);
        Self::tell_holders(
            &inner,
            &holders,
            "subscriptionError",
            &json!({"status": 401, "message": "GitLab refused the user's token; waiting for a new one"}),
        );
    }

    pub(crate) fn upstream_refused(
        &self,
        project: &str,
        generation: u64,
        status: u16,
        message: &str,
    ) {
        let mut inner = self.lock();
        if !inner.subs.is_current(project, generation) {
            return;
        }
        let holders = inner.subs.drop_project(project);
        Self::tell_holders(
            &inner,
            &holders,
            "subscriptionError",
            &json!({"status": status, "message": format!("{message}; subscription dropped")}),
        );
    }
}

/// Tells the tabs before the session's token expires (`authExpiring`), and closes them with
/// [`close_codes::TOKEN_EXPIRED`] when it does expire without a fresher one. Holds only a weak reference while
/// sleeping so it never keeps a session alive.
async fn watch_expiry(session: Weak<Session>, mut token: watch::Receiver<Option<Verified>>) {
    let mut warned_for = None;
    let mut refresh_failures = 0u32;
    loop {
        let current = token.borrow_and_update().clone();
        let Some(current) = current else {
            if token.changed().await.is_err() {
                return;
            }
            continue;
        };
        let exp = current.exp;
        let now = now_unix();
        // Token custody: refresh silently before the expiry instead of warning the tabs.
        if now < exp {
            let Some(s) = session.upgrade() else { return };
            if let Some(custody) = s.app.custody.clone() {
                let tolerance = custody.config().refresh_tolerance_ms.div_ceil(1000);
                let sources = s.sources(current.source.as_ref());
                if !sources.is_empty() {
                    let refresh_at = exp.saturating_sub(tolerance);
                    if now < refresh_at {
                        drop(s);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(refresh_at - now)) => {}
                            r = token.changed() => if r.is_err() { return },
                        }
                        continue;
                    }
                    if s.refresh_from(&custody, &sources).await {
                        refresh_failures = 0;
                        continue;
                    }
                    // Unreachable identity provider: keep trying (with backoff) until the token really expires.
                    refresh_failures += 1;
                    let wait = crate::backoff::full_jitter(Duration::from_millis(
                        (250u64 << refresh_failures.min(6)).min(5_000),
                    ))
                    .max(Duration::from_millis(100));
                    let left = Duration::from_secs(exp.saturating_sub(now_unix()));
                    drop(s);
                    tokio::select! {
                        _ = tokio::time::sleep(wait.min(left)) => {}
                        r = token.changed() => if r.is_err() { return },
                    }
                    continue;
                }
            }
        }
        if now >= exp {
            if let Some(s) = session.upgrade() {
                tracing::info!(user = %s.user.id, "session token expired without renewal");
                s.end_for_token("Your session's access token expired.", "token expired");
                if let (Some(custody), Some(src)) = (&s.app.custody, &current.source) {
                    custody.store().remove(src).await;
                }
            }
            if token.changed().await.is_err() {
                return;
            }
            continue;
        }
        let margin = match session.upgrade() {
            Some(s) => s.app.config.auth.expiry_warning_ms / 1000,
            None => return,
        };
        let warn_at = exp.saturating_sub(margin);
        if now >= warn_at && warned_for != Some(exp) {
            warned_for = Some(exp);
            if let Some(s) = session.upgrade() {
                s.broadcast("authExpiring", &json!({"expiresIn": exp - now}));
            }
        }
        let until = if now < warn_at { warn_at } else { exp };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(until - now)) => {}
            r = token.changed() => if r.is_err() { return },
        }
    }
}

impl Session {
    /// After the realm withdrew a signing key: when the session's token no longer verifies, renews it through token
    /// custody if the tabs came that way, else tells the tabs and closes them with 4002 (get a new token, then
    /// reconnect). A realm that cannot be reached changes nothing.
    pub(crate) async fn recheck_token(self: &Arc<Self>) {
        let Some(current) = self.valid_token() else {
            return;
        };
        let why = match self.app.realm.verify_uncached(&current.token).await {
            Err(crate::auth::AuthError::Invalid(why)) => why,
            _ => return,
        };
        if let Some(custody) = self.app.custody.clone() {
            let sources = self.sources(current.source.as_ref());
            if !sources.is_empty() && self.refresh_from(&custody, &sources).await {
                return;
            }
        }
        tracing::info!(user = %self.user.id, why, "session token no longer verifies");
        self.end_for_token(
            &format!("Your access token is no longer valid ({why})."),
            "token no longer valid",
        );
    }

    /// The session's token is unusable and could not be renewed: every tab is told (`error {authExpired}`) and
    /// closed with 4002, so that clients get a new token and reconnect.
    fn end_for_token(&self, message: &str, reason: &str) {
        self.broadcast("error", &json!({"message": message, "authExpired": true}));
        self.close_all(close_codes::TOKEN_EXPIRED, reason);
    }

    /// Refreshes the session's token through one of its browser sessions. A browser session whose refresh token
    /// is refused has its tabs told and closed (4002) and the next one is tried. True when a fresh token was
    /// installed; false when the identity provider could not be reached (or no source is left).
    async fn refresh_from(
        self: &Arc<Self>,
        custody: &crate::custody::Custody,
        sources: &[Arc<str>],
    ) -> bool {
        use crate::custody::CustodyError;
        for src in sources {
            match custody.refresh(src).await {
                Ok(_) => match custody.fresh_token(src).await {
                    Ok(v) => {
                        self.renew_token(&v);
                        self.rebuild_streams();
                        return true;
                    }
                    Err(_) => continue,
                },
                Err(CustodyError::Rejected | CustodyError::NoLogin) => {
                    self.close_source(
                        src,
                        "error",
                        json!({"message": "Your login expired; log in again.", "authExpired": true}),
                        close_codes::TOKEN_EXPIRED,
                    );
                }
                Err(_) => return false,
            }
        }
        false
    }
}
