//! A user's session: shared by all the user's tabs, it holds the membership (tabs), the newest token
//! ([`token`]), the loop functions and their snapshots ([`loops`]), the topics and upstream streams
//! ([`streams`]), and the command state ([`SessionData`]). This file holds the membership and the fan-out, and
//! implements what the lower modules ask of a session: [`LoopHost`], [`TokenHolder`], [`StreamSink`],
//! [`TokenSource`], and the commands' [`LoopContext`].
//!
//! State lives behind one short-held mutex, never held across an `.await`. The global lock order is in
//! `docs/architecture.md`: hub, then a channel's buffer, then session, then tab. This makes "attach a tab" and
//! "stop after the linger" atomic with respect to each other, so a user can never have two sessions or two copies
//! of a loop (see [`crate::hub`]).

mod channel_history;
pub(crate) mod hooks;
pub(crate) mod loops;
pub(crate) mod streams;
pub(crate) mod token;
pub(crate) mod turns;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tabhub_commands::{
    BackendError, BackendResponse, BoxFuture, Cadence, LoopContext, LoopFunction, Notification,
    SessionData, Topic, User,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::Instrument;

use crate::auth::{AuthError, Verified};
use crate::backends::TokenSource;
use crate::channels::Buffer;
use crate::close_codes::{self, CloseCode};
use crate::custody::{Custody, CustodyError};
use crate::metrics::Metrics;
use crate::profile::Profile;
use crate::protocol;
use crate::services::Services;
use crate::subscriptions::{Action, Limits, SubscribeError, Subscriptions};
use crate::tab::Tab;
use crate::upstream::StreamSink;
use loops::{LoopHost, Loops};
use token::{TokenCell, TokenHolder};

struct Inner {
    tabs: Vec<Arc<Tab>>,
    /// Bumped on every attach and on every detach that empties the session, so that a linger timer can tell
    /// whether the session stayed empty since it started.
    generation: u64,
    stopped: bool,
    loops: Loops,
    /// Tasks that die with the session (token expiry watcher...).
    tasks: Vec<AbortHandle>,
    subs: Subscriptions,
    /// Stream (re)starts asked by the command being handled, by project: applied once when it ends
    /// ([`Session::flush_streams`]), so that a `setSubscriptions` adding 99 types of a project opens one upstream
    /// connection, not 99.
    pending_starts: BTreeMap<String, Action>,
    /// When each project's stream was last started, and the start waiting for `gitlab.min_restart_interval_ms`
    /// (one per project: a later one supersedes it, and one timer serves it).
    started_at: BTreeMap<String, Instant>,
    delayed: BTreeMap<String, Action>,
    /// Webhook source: the projects the user follows, with the access level of the last check (None: paused, the
    /// last re-check could not answer).
    hooked: HashMap<String, Option<u64>>,
    /// Webhook source, and publish channels with the Redis broker: (tab, topic) resuming from a `lastEventId`: live
    /// events wait here (id, message) until the replay is sent.
    catching: HashMap<(u64, Topic), Vec<(u64, Utf8Bytes)>>,
    /// Whether the access re-check task runs (started with the first followed project).
    rechecking: bool,
}

/// Why a tab could not join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachError {
    /// The session stopped meanwhile; the hub creates a new one.
    Stopped,
    /// The user already has the maximum number of tabs.
    TooManyTabs,
}

/// What [`Session::set_topics`] changed, and what is left to the caller.
#[derive(Debug, Default)]
pub struct TopicChanges {
    pub removed: Vec<Topic>,
    pub added: Vec<Topic>,
    /// Project topics refused by a limit.
    pub refused: Vec<(Topic, SubscribeError)>,
    /// Project topics asked on a server without GitLab.
    pub unavailable: Vec<Topic>,
    /// New publish channels, to subscribe one by one (each with its buffer).
    pub channels: Vec<Topic>,
}

/// A reply to queue to the subscribing tab atomically with the subscription: `data` gets `added`.
pub struct SubscribeReply<'a> {
    pub note: Notification,
    /// The request's `id`, echoed.
    pub id: Option<&'a Value>,
}

impl SubscribeReply<'_> {
    /// The reply with `added`, and `gap: true` when the tab missed more than could be replayed.
    fn encode(self, added: bool, gap: bool) -> Utf8Bytes {
        let mut data = self.note.data;
        if let Value::Object(m) = &mut data {
            m.insert("added".into(), Value::Bool(added));
            if gap {
                m.insert("gap".into(), Value::Bool(true));
            }
        }
        protocol::encode(&self.note.kind, &data, self.id)
    }
}

/// The first half of a resume from a shared history (webhook topics, channels kept in Redis), under the session's
/// lock. `resume` is None without a `lastEventId`, `Some(None)` for one that is no number. A new subscription with
/// a numeric id is registered as catching up (its live messages are held back until the replay is sent): true.
/// Otherwise the reply goes now (with `gap` for an id that cannot be placed): false.
fn begin_resume(
    inner: &mut Inner,
    tab: &Tab,
    topic: &Topic,
    added: bool,
    resume: Option<Option<u64>>,
    reply: &mut Option<SubscribeReply<'_>>,
) -> bool {
    if added && matches!(resume, Some(Some(_))) {
        inner.catching.insert((tab.id, topic.clone()), Vec::new());
        return true;
    }
    if let Some(r) = reply.take() {
        tab.send(r.encode(added, matches!(resume, Some(None)) && added));
    }
    false
}

/// The newest of `missed` that fit in half a tab's outbound queue (messages and bytes), so that a replay can never
/// close the tab it resumes as a slow consumer; true when older ones were left out.
fn fit_replay(
    mut missed: Vec<Utf8Bytes>,
    max_messages: usize,
    max_bytes: usize,
) -> (Vec<Utf8Bytes>, bool) {
    let (mut n, mut bytes) = (0, 0);
    for m in missed.iter().rev() {
        if n + 1 > max_messages / 2 || bytes + m.len() > max_bytes / 2 {
            break;
        }
        n += 1;
        bytes += m.len();
    }
    let skipped = missed.len() - n;
    (missed.split_off(skipped), skipped > 0)
}

pub struct Session {
    pub user: User,
    /// The session's tracing span: tabs, loops and upstream streams log under it (user id only, never tokens or
    /// session ids).
    pub span: tracing::Span,
    services: Arc<Services>,
    data: SessionData,
    inner: Mutex<Inner>,
    token: TokenCell,
    /// An anonymous visitor's session: never holds a token (see [`Verified::anonymous`]).
    anonymous: bool,
    /// The user's commands run one at a time (see [`turns`]).
    turns: turns::Turns,
}

impl Session {
    pub(crate) fn new(services: Arc<Services>, user: User, anonymous: bool) -> Arc<Session> {
        let session = Arc::new(Session {
            span: tracing::info_span!("session", user = %user.id),
            user,
            services,
            data: SessionData::default(),
            turns: turns::Turns::default(),
            inner: Mutex::new(Inner {
                tabs: Vec::new(),
                generation: 0,
                stopped: false,
                loops: Loops::default(),
                tasks: Vec::new(),
                subs: Subscriptions::default(),
                pending_starts: BTreeMap::new(),
                started_at: BTreeMap::new(),
                delayed: BTreeMap::new(),
                hooked: HashMap::new(),
                catching: HashMap::new(),
                rechecking: false,
            }),
            token: TokenCell::default(),
            anonymous,
        });
        if !anonymous {
            let watcher = tokio::spawn(token::watch_expiry(
                Arc::downgrade(&session),
                session.token.changes(),
            ))
            .abort_handle();
            session.lock().tasks.push(watcher);
        }
        session.services.metrics.sessions.inc();
        tracing::debug!(user = %session.user.id, "session started");
        session
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user's turn: every command of every tab runs in it.
    pub fn turns(&self) -> &turns::Turns {
        &self.turns
    }

    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    pub fn data(&self) -> &SessionData {
        &self.data
    }

    // ---- membership ----

    /// Adds a tab, offers its token, and queues `greeting` then the loop snapshots to it.
    pub(crate) fn attach(
        &self,
        tab: &Arc<Tab>,
        token: &Verified,
        greeting: &Utf8Bytes,
    ) -> Result<(), AttachError> {
        let mut inner = self.lock();
        if inner.stopped {
            return Err(AttachError::Stopped);
        }
        let max = self.services.config.limits.max_tabs_per_user;
        if max > 0 && inner.tabs.len() >= max {
            return Err(AttachError::TooManyTabs);
        }
        if inner.tabs.is_empty() && inner.generation > 0 {
            self.services.metrics.lingering_sessions.dec();
        }
        // A visible tab joining tabs that are all hidden restores the short pace at once, as un-hiding does.
        let all_hidden = all_hidden(&inner.tabs);
        inner.tabs.push(tab.clone());
        inner.generation += 1;
        tab.send(greeting.clone());
        for n in inner.loops.snapshots() {
            tab.send(protocol::encode(&n.kind, &n.data, None));
        }
        if all_hidden && !tab.is_hidden() {
            inner.loops.wake_short(self.wake_gap());
        }
        drop(inner);
        if !self.anonymous {
            self.token.offer(token);
        }
        Ok(())
    }

    /// Removes a tab and releases its topics. Returns the generation to linger on when it was the last.
    ///
    /// Upstream streams the tab alone held are kept for `session.linger_ms` (a reload takes them back without
    /// reconnecting), then swept; a session that stops meanwhile stops them all.
    pub(crate) fn detach(self: &Arc<Self>, tab_id: u64) -> Option<u64> {
        let mut inner = self.lock();
        let now = Instant::now();
        let (kept, channels) = inner.subs.release_tab(tab_id, now);
        if !kept.is_empty() {
            let grace = Duration::from_millis(self.services.config.session.linger_ms);
            let session = Arc::downgrade(self);
            tokio::spawn(async move {
                // Never earlier than `now + grace` (tokio's timers do not fire early), so the sweep finds it due.
                tokio::time::sleep_until((now + grace).into()).await;
                if let Some(s) = session.upgrade() {
                    s.lock().subs.sweep(Instant::now(), grace);
                }
            });
        }
        for c in channels {
            if !inner.subs.holds(&c) {
                self.services
                    .channels
                    .remove_holder(&c.to_string(), &self.user.id);
            }
        }
        if !inner.hooked.is_empty() {
            inner.catching.retain(|(tab, _), _| *tab != tab_id);
            self.unfollow_unused(&mut inner);
        }
        let before = inner.tabs.len();
        inner.tabs.retain(|t| t.id != tab_id);
        if before != inner.tabs.len() && inner.tabs.is_empty() && !inner.stopped {
            inner.generation += 1;
            self.services.metrics.lingering_sessions.inc();
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
        self.services.metrics.lingering_sessions.dec();
        true
    }

    /// Stops at once, closing every tab with `code` (drain, logout).
    pub(crate) fn stop_now(&self, code: CloseCode, reason: &str) -> bool {
        let mut inner = self.lock();
        if inner.stopped {
            return false;
        }
        if inner.tabs.is_empty() && inner.generation > 0 {
            self.services.metrics.lingering_sessions.dec();
        }
        for t in inner.tabs.drain(..) {
            t.close(code, reason);
        }
        self.stop_locked(&mut inner);
        true
    }

    fn stop_locked(&self, inner: &mut Inner) {
        inner.stopped = true;
        inner.pending_starts.clear();
        inner.delayed.clear();
        inner.loops.abort_all();
        for t in inner.tasks.drain(..) {
            t.abort();
        }
        for tab in inner.tabs.iter().map(|t| t.id).collect::<Vec<_>>() {
            for c in inner.subs.release_tab(tab, Instant::now()).1 {
                self.services
                    .channels
                    .remove_holder(&c.to_string(), &self.user.id);
            }
        }
        inner.subs.stop_all();
        self.unfollow_all(inner);
        self.services.metrics.sessions.dec();
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

    // ---- fan-out ----

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

    /// Sends encoded bytes to the tabs holding `topic`. A message with an `id` (a channel whose history is in
    /// Redis) waits for the replay of a tab catching up on the channel (see [`Session::subscribe_channel_shared`]).
    pub fn deliver_to_holders(&self, topic: &Topic, id: Option<u64>, msg: &Utf8Bytes) {
        let mut inner = self.lock();
        let holders = inner.subs.tabs_holding(topic);
        let Inner { tabs, catching, .. } = &mut *inner;
        for t in tabs.iter().filter(|t| holders.contains(&t.id)) {
            if let (Some(id), false) = (id, catching.is_empty()) {
                if let Some(q) = catching.get_mut(&(t.id, topic.clone())) {
                    q.push((id, msg.clone()));
                    continue;
                }
            }
            t.send(msg.clone());
        }
    }

    /// Sends `kind data` to the tabs of one login (token custody), then closes them with `code`.
    pub fn close_login(&self, login: &str, kind: &str, data: Value, code: CloseCode) {
        let msg = protocol::encode(kind, &data, None);
        for t in self
            .lock()
            .tabs
            .iter()
            .filter(|t| t.login.as_deref() == Some(login))
        {
            t.send(msg.clone());
            t.close(code, code.name);
        }
    }

    /// The logins of the tabs, current token's first: where a refresh may come from.
    fn logins(&self, first: Option<&Arc<str>>) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = first.into_iter().cloned().collect();
        for t in &self.lock().tabs {
            if let Some(s) = &t.login {
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
        self.token.offer(token);
    }

    /// The newest token, if it has not expired.
    pub fn valid_token(&self) -> Option<Verified> {
        self.token.valid()
    }

    // ---- loops ----

    /// Registers a loop function; false when one of that name exists or the session stopped.
    pub fn register_loop(self: &Arc<Self>, function: LoopFunction) -> bool {
        let mut inner = self.lock();
        if inner.stopped {
            return false;
        }
        let span = tracing::info_span!(parent: &self.span, "loop", function = %function.name);
        inner.loops.register(&function.clone(), |wake| {
            loops::spawn(self, function, wake, span)
        })
    }

    pub fn snapshot(&self, name: &str) -> Option<Vec<Notification>> {
        self.lock().loops.snapshot(name)
    }

    pub fn run_loop_now(&self, name: &str) {
        let gap = self.wake_gap();
        self.lock().loops.wake(name, gap);
    }

    /// How soon a loop may be run early again: its nominal interval.
    fn wake_gap(&self) -> impl Fn(Cadence) -> Duration {
        let s = &self.services.config.session;
        let (short, long) = (s.short_interval_ms, s.long_interval_ms);
        move |cadence| {
            Duration::from_millis(match cadence {
                Cadence::Short => short,
                Cadence::Long => long,
            })
        }
    }

    /// Marks a tab hidden or visible; when the first tab becomes visible again, the short loops run at once.
    pub fn set_hidden(&self, tab: &Tab, hidden: bool) {
        let gap = self.wake_gap();
        let mut inner = self.lock();
        let was_all_hidden = all_hidden(&inner.tabs);
        if tab.set_hidden(hidden) && was_all_hidden && !hidden {
            inner.loops.wake_short(gap);
        }
    }

    // ---- subscriptions ----

    /// The second half of a resume (see [`begin_resume`]), called with the session's lock held: the replay
    /// `missed` (events up to `newest`), then the held-back live messages newer than it, cut to fit the tab's
    /// queue; the reply says `gap` when the history had lost some or the cut left some out.
    fn finish_resume(
        &self,
        tab: &Tab,
        reply: Option<SubscribeReply<'_>>,
        mut missed: Vec<Utf8Bytes>,
        queued: Vec<(u64, Utf8Bytes)>,
        newest: u64,
        gap: bool,
    ) {
        missed.extend(
            queued
                .into_iter()
                .filter(|(id, _)| *id > newest)
                .map(|(_, m)| m),
        );
        let w = &self.services.config.websocket;
        let (missed, cut) = fit_replay(missed, w.outbound_queue_messages, w.outbound_queue_bytes);
        if let Some(r) = reply {
            tab.send(r.encode(true, gap || cut));
        }
        for m in missed {
            tab.send(m);
        }
    }

    fn sub_limits(&self) -> Limits {
        let g = &self.services.config.gitlab;
        Limits {
            topics_per_tab: g.max_topics_per_tab,
            projects_per_user: g.max_projects_per_user,
            channels_per_user: self.services.config.publish.max_channels_per_user,
            buffer: g.replay_buffer_events,
        }
    }

    /// Subscribes `tab` to a project topic, resuming after `last_event_id` when given. Under the session's lock,
    /// so that no live event can come between: the reply is queued first, then the events the tab missed that
    /// are still in the replay buffer.
    pub fn subscribe(
        self: &Arc<Self>,
        tab: &Tab,
        topic: &Topic,
        last_event_id: Option<&str>,
        reply: Option<SubscribeReply<'_>>,
    ) -> Result<bool, SubscribeError> {
        let limits = self.sub_limits();
        let mut inner = self.lock();
        if inner.stopped {
            return Ok(false);
        }
        Self::subscribe_locked(&mut inner, tab, topic, last_event_id, reply, limits)
    }

    fn subscribe_locked(
        inner: &mut Inner,
        tab: &Tab,
        topic: &Topic,
        last_event_id: Option<&str>,
        reply: Option<SubscribeReply<'_>>,
        limits: Limits,
    ) -> Result<bool, SubscribeError> {
        let (added, replay, action) = inner.subs.subscribe(tab.id, topic, last_event_id, limits)?;
        if let Some(r) = reply {
            tab.send(r.encode(added, false));
        }
        for msg in replay {
            tab.send(msg);
        }
        if let Some(a @ Action::Start { .. }) = action {
            let Action::Start { project, .. } = &a;
            // The latest start of a project supersedes the earlier ones (each aborted its predecessor).
            inner.pending_starts.insert(project.clone(), a);
        }
        Ok(added)
    }

    /// Replaces `tab`'s topics with `wanted` under one lock (per topic, a user's hundred-topic commands from many
    /// tabs kept the runtime's threads waiting on this lock, and every other user's tabs behind them). Releases the
    /// topics not wanted, subscribes the new project topics (when `projects` is true: the server has a GitLab),
    /// and returns the new channels for [`Session::subscribe_channel`], which takes each channel's buffer first.
    ///
    /// With the webhook source, `hooked` has the access level of each new project the user may see (checked
    /// before, as the user): project topics subscribe without a stream; those of other projects are left out (the
    /// caller reports them).
    pub fn set_topics(
        self: &Arc<Self>,
        tab: &Tab,
        wanted: &BTreeSet<Topic>,
        projects: bool,
        hooked: Option<&HashMap<String, u64>>,
    ) -> TopicChanges {
        let limits = self.sub_limits();
        let mut inner = self.lock();
        let mut out = TopicChanges::default();
        if inner.stopped {
            return out;
        }
        let current: BTreeSet<Topic> = inner.subs.topics_of(tab.id).into_iter().collect();
        for t in current.difference(wanted) {
            if self.unsubscribe_locked(&mut inner, tab, t) {
                out.removed.push(t.clone());
            }
        }
        for t in wanted.difference(&current) {
            if matches!(t, Topic::Channel(_)) {
                out.channels.push(t.clone());
            } else if !projects {
                out.unavailable.push(t.clone());
            } else if let Some(levels) = hooked {
                let Some((project, level)) =
                    t.project_id().and_then(|p| levels.get(p).map(|l| (p, *l)))
                else {
                    continue;
                };
                match inner.subs.subscribe_hooked(tab.id, t, limits) {
                    Ok(true) => {
                        self.follow(&mut inner, project, level);
                        out.added.push(t.clone());
                    }
                    Ok(false) => {}
                    Err(e) => out.refused.push((t.clone(), e)),
                }
            } else {
                match Self::subscribe_locked(&mut inner, tab, t, None, None, limits) {
                    Ok(true) => out.added.push(t.clone()),
                    Ok(false) => {}
                    Err(e) => out.refused.push((t.clone(), e)),
                }
            }
        }
        out
    }

    /// Opens the upstream connections the last command asked for, once per project. A start that a later
    /// unsubscribe or restart made stale is dropped.
    ///
    /// A project's stream is started at most once per `gitlab.min_restart_interval_ms`: a later start waits (the
    /// previous connection is already stopped, so the waiting one resumes from the last event received and nothing
    /// is lost), one timer per project.
    pub fn flush_streams(self: &Arc<Self>) {
        let mut inner = self.lock();
        if inner.stopped {
            inner.pending_starts.clear();
            return;
        }
        let gap = Duration::from_millis(self.services.config.gitlab.min_restart_interval_ms);
        let now = tokio::time::Instant::now().into_std();
        // Only starts within the interval matter: the map stays as small as the projects restarted lately.
        inner
            .started_at
            .retain(|_, at| now.saturating_duration_since(*at) < gap);
        for (project, a) in std::mem::take(&mut inner.pending_starts) {
            let Action::Start { generation, .. } = &a;
            if !inner.subs.is_current(&project, *generation) {
                continue;
            }
            let due = inner.started_at.get(&project).map(|at| *at + gap);
            match due {
                Some(due) if due > now => {
                    if inner.delayed.insert(project.clone(), a).is_none() {
                        let session = Arc::downgrade(self);
                        tokio::spawn(async move {
                            tokio::time::sleep_until(due.into()).await;
                            if let Some(s) = session.upgrade() {
                                s.start_delayed(&project);
                            }
                        });
                    }
                }
                _ => {
                    inner.delayed.remove(&project);
                    inner.started_at.insert(project, now);
                    self.apply(&mut inner, a);
                }
            }
        }
    }

    /// The start that waited for its project's interval, if it is still the current one.
    fn start_delayed(self: &Arc<Self>, project: &str) {
        let mut inner = self.lock();
        let Some(a) = inner.delayed.remove(project) else {
            return;
        };
        let Action::Start { generation, .. } = &a;
        if inner.stopped || !inner.subs.is_current(project, *generation) {
            return;
        }
        inner
            .started_at
            .insert(project.to_owned(), tokio::time::Instant::now().into_std());
        self.apply(&mut inner, a);
    }

    /// Subscribes `tab` to a publish-only channel. Holds the channel's buffer (before the session, as the lock
    /// order says) so that no published message can come between the replay and the registration.
    pub fn subscribe_channel(
        &self,
        tab: &Tab,
        topic: &Topic,
        last_event_id: Option<&str>,
        reply: Option<SubscribeReply<'_>>,
        buffer: &Mutex<Buffer>,
    ) -> Result<bool, SubscribeError> {
        let buffer = buffer.lock().unwrap_or_else(|p| p.into_inner());
        let limits = self.sub_limits();
        let mut inner = self.lock();
        if inner.stopped {
            return Ok(false);
        }
        let (added, _, _) = inner.subs.subscribe(tab.id, topic, last_event_id, limits)?;
        self.services
            .channels
            .add_holder(&topic.to_string(), &self.user.id);
        let w = &self.services.config.websocket;
        let missed = last_event_id
            .and_then(|id| buffer.after(id))
            .unwrap_or_default();
        let (replay, gap) = fit_replay(missed, w.outbound_queue_messages, w.outbound_queue_bytes);
        if let Some(r) = reply {
            tab.send(r.encode(added, gap));
        }
        for msg in replay {
            tab.send(msg);
        }
        Ok(added)
    }

    /// Releases `tab`'s hold on `topic`; the last release closes the project's stream.
    pub fn unsubscribe(&self, tab: &Tab, topic: &Topic) -> bool {
        let mut inner = self.lock();
        self.unsubscribe_locked(&mut inner, tab, topic)
    }

    fn unsubscribe_locked(&self, inner: &mut Inner, tab: &Tab, topic: &Topic) -> bool {
        let removed = inner.subs.unsubscribe(tab.id, topic).0;
        if removed && matches!(topic, Topic::Channel(_)) {
            inner.catching.remove(&(tab.id, topic.clone()));
            if !inner.subs.holds(topic) {
                self.services
                    .channels
                    .remove_holder(&topic.to_string(), &self.user.id);
            }
        }
        if removed
            && topic
                .project_id()
                .is_some_and(|p| inner.hooked.contains_key(p))
        {
            inner.catching.remove(&(tab.id, topic.clone()));
            self.unfollow_unused(inner);
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
        let Action::Start {
            project,
            generation,
            ..
        } = action;
        // The filter of the project's latest start: only a start changes it, and only the current one gets here.
        let filter = inner.subs.filter(&project).cloned().unwrap_or_default();
        let span = tracing::info_span!(parent: &self.span, "upstream", project = %project);
        let sink: Arc<dyn StreamSink> = self.clone();
        let task = tokio::spawn(
            crate::upstream::run(
                self.services.upstream.clone(),
                Arc::downgrade(&sink),
                project.clone(),
                filter,
                generation,
            )
            .instrument(span),
        )
        .abort_handle();
        if let Some(s) = inner.subs.stream_mut(&project) {
            s.task = Some(task);
        }
    }

    // ---- token renewal ----

    /// After the realm withdrew a signing key: when the session's token no longer verifies, renews it through token
    /// custody if the tabs came that way, else tells the tabs and closes them with 4002 (get a new token, then
    /// reconnect). A realm that cannot be reached changes nothing.
    pub(crate) async fn recheck_token(self: &Arc<Self>) {
        let Some(current) = self.valid_token() else {
            return;
        };
        let why = match self.services.realm.verify_uncached(&current.token).await {
            Err(AuthError::Invalid(why)) => why,
            _ => return,
        };
        if let Some(custody) = self.services.custody.clone() {
            let logins = self.logins(current.login.as_ref());
            if !logins.is_empty() && self.refresh_from(&custody, &logins).await {
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

    /// Refreshes the session's token through one of its logins. A login whose refresh token is refused has its
    /// tabs told and closed (4002) and the next one is tried. True when a fresh token was installed; false when
    /// the identity provider could not be reached (or no login is left).
    async fn refresh_from(self: &Arc<Self>, custody: &Custody, logins: &[Arc<str>]) -> bool {
        for login in logins {
            match custody.refresh(login).await {
                Ok(_) => match custody.fresh_token(login).await {
                    Ok(v) => {
                        self.token.renew(&v);
                        self.rebuild_streams();
                        return true;
                    }
                    Err(_) => continue,
                },
                Err(CustodyError::Rejected | CustodyError::NoLogin) => {
                    self.close_login(
                        login,
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

fn all_hidden(tabs: &[Arc<Tab>]) -> bool {
    !tabs.is_empty() && tabs.iter().all(|t| t.is_hidden())
}

impl TokenHolder for Session {
    fn refresh_tolerance(&self, current: &Verified) -> Option<u64> {
        let custody = self.services.custody.as_ref()?;
        let can_refresh = !self.logins(current.login.as_ref()).is_empty();
        can_refresh.then(|| custody.config().refresh_tolerance_ms.div_ceil(1000))
    }

    fn warn_margin(&self) -> u64 {
        self.services.config.auth.expiry_warning_ms / 1000
    }

    fn warn(&self, expires_in: u64) {
        self.broadcast("authExpiring", &json!({"expiresIn": expires_in}));
    }

    async fn refresh(self: Arc<Self>, current: Verified) -> bool {
        let Some(custody) = self.services.custody.clone() else {
            return false;
        };
        let logins = self.logins(current.login.as_ref());
        self.refresh_from(&custody, &logins).await
    }

    async fn expire(self: Arc<Self>, current: Verified) {
        tracing::info!(user = %self.user.id, "session token expired without renewal");
        self.end_for_token("Your session's access token expired.", "token expired");
        if let (Some(custody), Some(login)) = (&self.services.custody, &current.login) {
            custody.store().remove(login).await;
        }
    }
}

impl LoopHost for Session {
    fn interval(&self, cadence: Cadence) -> Duration {
        let s = &self.services.config.session;
        match cadence {
            Cadence::Long => Duration::from_millis(s.long_interval_ms),
            Cadence::Short if all_hidden(&self.lock().tabs) => {
                Duration::from_millis(s.hidden_interval_ms)
            }
            Cadence::Short => Duration::from_millis(s.short_interval_ms),
        }
    }

    fn has_token(&self) -> bool {
        self.token.valid().is_some()
    }

    fn loop_context(self: Arc<Self>) -> Arc<dyn LoopContext> {
        self
    }

    fn finished(&self, name: &str, outcome: Result<Vec<Notification>, String>) {
        let mut inner = self.lock();
        let Inner { tabs, loops, .. } = &mut *inner;
        for n in loops.finish(name, outcome) {
            let msg = protocol::encode(&n.kind, &n.data, None);
            // A repeat reaches only the tabs whose client expects it every tick (Renku's).
            for t in tabs
                .iter()
                .filter(|t| !n.repeat || t.profile != Profile::Tabhub)
            {
                t.send(msg.clone());
            }
        }
    }

    fn loop_timeout(&self) -> Duration {
        Duration::from_millis(self.services.config.session.loop_timeout_ms)
    }

    fn metrics(&self) -> &Metrics {
        &self.services.metrics
    }
}

impl TokenSource for Session {
    fn bearer(&self) -> Option<Arc<str>> {
        self.token.valid().map(|t| t.token)
    }
    fn caller(&self) -> &str {
        &self.user.id
    }
}

impl StreamSink for Session {
    fn bearer(&self) -> Option<Arc<str>> {
        self.token.valid().map(|t| t.token)
    }

    fn token_changes(&self) -> watch::Receiver<Option<Verified>> {
        self.token.changes()
    }

    fn resume_id(&self, project: &str) -> Option<String> {
        self.lock().subs.resume_id(project)
    }

    fn opened(&self, project: &str, generation: u64) {
        let mut inner = self.lock();
        let Inner { tabs, subs, .. } = &mut *inner;
        streams::opened(subs, tabs, project, generation);
    }

    fn event(&self, project: &str, generation: u64, id: &str, event_type: &str, data: &str) {
        let cap = self.services.config.gitlab.replay_buffer_events;
        let mut inner = self.lock();
        let Inner { tabs, subs, .. } = &mut *inner;
        streams::event(subs, tabs, project, generation, (id, event_type, data), cap);
    }

    fn degraded(&self, project: &str, generation: u64, why: &str) {
        let mut inner = self.lock();
        let Inner { tabs, subs, .. } = &mut *inner;
        if streams::degraded(subs, tabs, project, generation, why) {
            tracing::info!(user = %self.user.id, project, reason = why, "upstream stream degraded");
        }
    }

    fn unauthorized(&self, project: &str, generation: u64) {
        let inner = self.lock();
        streams::unauthorized(&inner.subs, &inner.tabs, project, generation);
    }

    fn refused(&self, project: &str, generation: u64, status: u16, message: &str) {
        let mut inner = self.lock();
        let Inner { tabs, subs, .. } = &mut *inner;
        streams::refused(subs, tabs, project, generation, (status, message));
    }
}

/// A loop function's context is its session: the user, the command state, backend calls with the session's token.
impl LoopContext for Session {
    fn user(&self) -> &User {
        &self.user
    }

    fn session_data(&self) -> &SessionData {
        &self.data
    }

    fn backend_get<'a>(
        &'a self,
        backend: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        Box::pin(self.services.backends.get_as_user(backend, path, self))
    }

    fn shared_get<'a>(
        &'a self,
        url: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        Box::pin(self.services.backends.shared_get(url))
    }
}
