//! A user's subscriptions: which tab holds which topic, and one upstream stream per project whatever the number of
//! tabs and topics on it. Pure bookkeeping, kept under the session's lock; it returns [`Action`]s (start a stream
//! connection, or wake up later to decide on a restart) for the session to carry out, so that every rule here is
//! testable without a network or a clock (callers pass `now`).
//!
//! Rules:
//! - a connection's event-type filter is the exact union of what the tabs hold when it connects, built once per
//!   connection and shared ([`Filter`]). A type nobody wants any more is filtered locally until the next connection
//!   (no reconnect churn when tabs navigate), which then asks only for what is held;
//! - restarts are bounded per stream ([`Pace`]): what needs the stream reopened (a type the connection does not
//!   carry, a tab catching up from an id older than the replay buffer, a new token) is gathered over a short window
//!   into one restart, and two connections of one project are at least a minimum interval apart, whatever the
//!   cause. A connection reads its filter and resume point when it connects ([`Subscriptions::connect`]), so a
//!   change made before it connects needs no restart at all. A subscription waits at most the window plus the
//!   interval for its events;
//! - each event reaches each tab holding its topic exactly once: ids already delivered (still in the replay buffer)
//!   are dropped if the upstream repeats them;
//! - a tab subscribing with a `lastEventId` still in the replay buffer gets what it missed from the buffer, atomically
//!   with its registration (no upstream reconnect). An older id *waits* for the next connection (no live events
//!   meanwhile), which resumes from the oldest id any waiting tab needs, in *catch-up* mode: replayed events up to
//!   the last one already received go only to the tabs catching up, each from its own id, then delivery is normal
//!   again. Many tabs catching up share one request;
//! - a stream left unused by a *closing* tab is kept for a grace period (the session's linger) and still fills its
//!   replay buffer: a page reload resubscribes to the same stream, without an upstream reconnection and with what
//!   it missed meanwhile. An explicit `unsubscribe` stops an unused stream at once. Kept streams give way to a
//!   tab's new project when the per-user project limit is reached.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tabhub_commands::Topic;
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The event types a connection asks GitLab for, sorted. Built once per connection whose union changed and shared
/// by reference: a restart never copies the set (it once cloned the whole filter 99 times per command).
pub type Filter = Arc<BTreeSet<String>>;

/// Something the session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run generation `generation` of the project's connection, stopping any previous one (events from older
    /// generations are ignored). It calls [`Subscriptions::connect`] before every request.
    Start { project: String, generation: u64 },
    /// Call [`Subscriptions::due`] for the project at `at`: a restart was asked for and waits for the coalescing
    /// window and the minimum interval.
    Wake { project: String, at: Instant },
}

/// What a connection asks GitLab for: the event types, and `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub filter: Filter,
    pub last_event_id: Option<String>,
}

/// How often one project's stream may (re)connect (`gitlab.restart_coalesce_ms`,
/// `gitlab.min_reconnect_interval_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Changes within this window share one restart.
    pub window: Duration,
    /// Two connections of one project are at least this far apart.
    pub min_interval: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            window: Duration::from_millis(200),
            min_interval: Duration::from_secs(1),
        }
    }
}

/// Why a subscription was refused: a limit, named with its value.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("topic limit reached: at most {0} topics per tab")]
    TooManyTopics(usize),
    #[error("project limit reached: at most {0} projects per user")]
    TooManyProjects(usize),
    #[error("channel limit reached: at most {0} publish channels per user")]
    TooManyChannels(usize),
}

struct Buffered {
    id: String,
    event_type: String,
    msg: Utf8Bytes,
}

/// A tab catching up on a topic: it gets replayed events after `after`, the last id it has.
#[derive(Debug, Clone)]
struct Pair {
    tab: u64,
    topic: Topic,
    after: String,
}

impl Pair {
    /// Whether the tab has yet to see event `id` (ids that are not numbers cannot be compared: sent).
    fn wants(&self, id: &str) -> bool {
        match (numeric(id), numeric(&self.after)) {
            (Some(a), Some(b)) => a > b,
            _ => true,
        }
    }
}

/// Adds `p` to `pairs`, replacing the same (tab, topic): one entry per subscription, however often it is renewed.
fn add_pair(pairs: &mut Vec<Pair>, p: Pair) {
    pairs.retain(|q| (q.tab, &q.topic) != (p.tab, &p.topic));
    pairs.push(p);
}

struct CatchUp {
    /// The last id received before catch-up began; catch-up ends when it, or a later one, comes by.
    until: String,
    /// The tabs receiving the replayed events.
    pairs: Vec<Pair>,
}

/// One project's upstream stream.
pub struct Stream {
    /// The current connection; 0 before the first one started.
    generation: u64,
    /// What the last connection asked for. Kept across generations: reused when the union did not change, and by a
    /// stream nobody holds any more (kept after a tab closed), which would otherwise ask for every type.
    filter: Filter,
    /// Whether the current generation has made a request (with `filter`). Until it does, changes need no restart:
    /// it reads them when it connects.
    connected: bool,
    /// When a connection of the project was last requested, any generation: the minimum interval counts from it.
    last_connect: Option<Instant>,
    /// The last event id received on the stream: where a reconnection resumes.
    resume_id: Option<String>,
    buffer: VecDeque<Buffered>,
    catch_up: Option<CatchUp>,
    /// Tabs waiting to catch up from an id older than the buffer: they join the next connection's catch-up and get
    /// no live events of their topic meanwhile (the catch-up replays them, in order).
    waiting: Vec<Pair>,
    /// A restart decision is scheduled ([`Action::Wake`]) at this time.
    due: Option<Instant>,
    /// The next decision restarts whatever the filter (a new token); cleared by any connection.
    force: bool,
    /// The running connection task.
    pub task: Option<AbortHandle>,
    /// The timer of the scheduled decision.
    pub timer: Option<AbortHandle>,
    /// Whether the tabs were told the stream is degraded (told once, and once when it recovers).
    pub degraded: bool,
    /// Since when no tab holds a topic of the stream (it was kept after a tab closed).
    unused_since: Option<Instant>,
}

impl Stream {
    fn new(buffer: usize, last_connect: Option<Instant>, resume_id: Option<String>) -> Stream {
        Stream {
            generation: 0,
            filter: Filter::default(),
            connected: false,
            last_connect,
            resume_id,
            buffer: VecDeque::with_capacity(buffer.min(64)),
            catch_up: None,
            waiting: Vec::new(),
            due: None,
            force: false,
            task: None,
            timer: None,
            degraded: false,
            unused_since: None,
        }
    }

    /// Stops the connection and the timer (the stream goes away).
    fn abort(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(t) = self.timer.take() {
            t.abort();
        }
    }

    /// Forgets `tab`'s catch-up on `topic` (every topic when `None`): it left.
    fn forget(&mut self, tab: u64, topic: Option<&Topic>) {
        let keep = |p: &Pair| p.tab != tab || topic.is_some_and(|t| *t != p.topic);
        self.waiting.retain(keep);
        if let Some(c) = &mut self.catch_up {
            c.pairs.retain(keep);
        }
    }
}

/// Limits applied to subscribe, and the restart pace.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub topics_per_tab: usize,
    pub projects_per_user: usize,
    /// Distinct publish channels one user's tabs may hold: the instance's channel buffers are shared by everyone,
    /// so no one user may take them all.
    pub channels_per_user: usize,
    pub buffer: usize,
    pub pace: Pace,
}

#[derive(Default)]
pub struct Subscriptions {
    by_tab: HashMap<u64, BTreeSet<Topic>>,
    streams: BTreeMap<String, Stream>,
    next_generation: u64,
    /// When streams removed lately last connected: a project unsubscribed and subscribed again waits out the
    /// minimum interval like any restart. Entries older than the interval are dropped when a stream is created.
    recent: HashMap<String, Instant>,
}

/// What an upstream event turned into: the message, once, and the tabs it goes to.
pub struct Delivery {
    pub msg: Utf8Bytes,
    pub tabs: Vec<u64>,
}

/// The union of the event types `by_tab` holds on `project`.
fn wanted_types<'a>(by_tab: &'a HashMap<u64, BTreeSet<Topic>>, project: &str) -> BTreeSet<&'a str> {
    by_tab
        .values()
        .flat_map(|ts| ts.iter())
        .filter_map(|t| match t {
            Topic::Project {
                project: p,
                event_type,
            } if p == project => Some(event_type.as_str()),
            _ => None,
        })
        .collect()
}

fn numeric(id: &str) -> Option<u64> {
    id.parse().ok()
}

/// The older of two event ids; an id that is not a number wins (it cannot be placed, so it is trusted).
fn older(a: String, b: String) -> String {
    match (numeric(&a), numeric(&b)) {
        (Some(x), Some(y)) if y < x => b,
        (Some(_), None) => b,
        _ => a,
    }
}

/// The newer of two event ids; when they cannot be compared, `a`.
fn newer(a: String, b: String) -> String {
    match (numeric(&a), numeric(&b)) {
        (Some(x), Some(y)) if y > x => b,
        _ => a,
    }
}

impl Subscriptions {
    /// The topics a tab holds.
    pub fn topics_of(&self, tab: u64) -> Vec<Topic> {
        self.by_tab
            .get(&tab)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Open streams (projects), for tests.
    #[cfg(test)]
    fn projects(&self) -> impl Iterator<Item = &str> {
        self.streams.keys().map(String::as_str)
    }

    pub fn stream_mut(&mut self, project: &str) -> Option<&mut Stream> {
        self.streams.get_mut(project)
    }

    /// Whether `generation` is the current connection of `project`.
    pub fn is_current(&self, project: &str, generation: u64) -> bool {
        self.streams
            .get(project)
            .is_some_and(|s| s.generation == generation)
    }

    /// The (tab, topic) pairs on a project.
    pub fn holders(&self, project: &str) -> Vec<(u64, Topic)> {
        let mut out = Vec::new();
        for (tab, topics) in &self.by_tab {
            for t in topics.iter().filter(|t| t.project_id() == Some(project)) {
                out.push((*tab, t.clone()));
            }
        }
        out
    }

    /// The union of the event types the tabs hold on `project`.
    fn wanted_types(&self, project: &str) -> BTreeSet<&str> {
        wanted_types(&self.by_tab, project)
    }

    /// Starts a new generation of the project's connection now.
    fn start(&mut self, project: &str) -> Option<Action> {
        self.next_generation += 1;
        let generation = self.next_generation;
        let s = self.streams.get_mut(project)?;
        s.generation = generation;
        s.connected = false;
        if let Some(t) = s.task.take() {
            t.abort();
        }
        Some(Action::Start {
            project: project.to_owned(),
            generation,
        })
    }

    /// Asks for a restart decision after the window and the minimum interval; nothing when one is already
    /// scheduled (it will see this change too).
    fn schedule(&mut self, project: &str, pace: Pace, now: Instant) -> Option<Action> {
        let s = self.streams.get_mut(project)?;
        if s.due.is_some() {
            return None;
        }
        let mut at = now + pace.window;
        if let Some(t) = s.last_connect {
            at = at.max(t + pace.min_interval);
        }
        s.due = Some(at);
        Some(Action::Wake {
            project: project.to_owned(),
            at,
        })
    }

    /// The scheduled decision on `project`'s stream: restarts it when its connection misses something (a type, a
    /// tab catching up, a new token), else nothing; or waits longer if a connection was made meanwhile (a retry).
    pub fn due(&mut self, project: &str, pace: Pace, now: Instant) -> Option<Action> {
        let wanted_more = {
            let s = self.streams.get(project)?;
            s.connected
                && !self
                    .wanted_types(project)
                    .iter()
                    .all(|t| s.filter.contains(*t))
        };
        let s = self.streams.get_mut(project)?;
        let at = s.due?;
        if now < at {
            // A timer of a stream since replaced; the current one's timer comes later.
            return None;
        }
        if let Some(next) = s.last_connect.map(|t| t + pace.min_interval) {
            if now < next {
                s.due = Some(next);
                return Some(Action::Wake {
                    project: project.to_owned(),
                    at: next,
                });
            }
        }
        s.due = None;
        s.timer = None;
        let needed =
            s.generation == 0 || (s.connected && (s.force || !s.waiting.is_empty())) || wanted_more;
        if needed {
            self.start(project)
        } else {
            None
        }
    }

    /// A connection of `project` is about to make its request: what to ask for. `None` when `generation` is no
    /// longer current (the task ends). Takes in whatever waited for it: the union of the types held now, and the
    /// tabs waiting to catch up (it resumes from the oldest id they need).
    pub fn connect(&mut self, project: &str, generation: u64, now: Instant) -> Option<Connect> {
        if !self.is_current(project, generation) {
            return None;
        }
        let wanted = wanted_types(&self.by_tab, project);
        let s = self.streams.get_mut(project)?;
        if !wanted.is_empty()
            && !s
                .filter
                .iter()
                .map(String::as_str)
                .eq(wanted.iter().copied())
        {
            s.filter = Arc::new(wanted.into_iter().map(str::to_owned).collect());
        }
        s.connected = true;
        s.force = false;
        s.last_connect = Some(now);
        if !s.waiting.is_empty() {
            let waiting = std::mem::take(&mut s.waiting);
            let old = s.catch_up.take();
            // Replayed events up to the last one received (or the end of a catch-up already running) go only to
            // the catching-up tabs; the others have them.
            let until = match (old.as_ref().map(|c| c.until.clone()), s.resume_id.clone()) {
                (Some(u), Some(r)) => Some(newer(u, r)),
                (u, r) => u.or(r),
            };
            let mut pairs = old.map(|c| c.pairs).unwrap_or_default();
            for p in waiting {
                add_pair(&mut pairs, p);
            }
            // Always some: a tab waits only once the stream received something (else it just rewinds the stream).
            if let Some(until) = until {
                s.catch_up = Some(CatchUp { until, pairs });
            }
        }
        let mut from = s.resume_id.clone();
        if let Some(c) = &s.catch_up {
            for p in &c.pairs {
                from = Some(match from {
                    Some(f) => older(f, p.after.clone()),
                    None => p.after.clone(),
                });
            }
        }
        Some(Connect {
            filter: s.filter.clone(),
            last_event_id: from,
        })
    }

    /// Subscribes `tab` to `topic`, now. See [`Subscriptions::subscribe_at`].
    pub fn subscribe(
        &mut self,
        tab: u64,
        topic: &Topic,
        last_event_id: Option<&str>,
        limits: Limits,
    ) -> Result<(bool, Vec<Utf8Bytes>, Option<Action>), SubscribeError> {
        self.subscribe_at(tab, topic, last_event_id, limits, Instant::now())
    }

    /// Subscribes `tab` to `topic` at `now`. Returns whether it is new, the buffered messages to send to the tab
    /// now, and the action to take.
    pub fn subscribe_at(
        &mut self,
        tab: u64,
        topic: &Topic,
        last_event_id: Option<&str>,
        limits: Limits,
        now: Instant,
    ) -> Result<(bool, Vec<Utf8Bytes>, Option<Action>), SubscribeError> {
        let held = self.by_tab.get(&tab);
        if held.is_some_and(|t| t.contains(topic)) {
            return Ok((false, Vec::new(), None));
        }
        if held.is_some_and(|t| t.len() >= limits.topics_per_tab) {
            return Err(SubscribeError::TooManyTopics(limits.topics_per_tab));
        }
        let Topic::Project {
            project,
            event_type,
        } = topic
        else {
            // A channel: no upstream; its replay buffer lives with the publish API.
            if !self.holds(topic) && self.channels_held() >= limits.channels_per_user {
                return Err(SubscribeError::TooManyChannels(limits.channels_per_user));
            }
            self.by_tab.entry(tab).or_default().insert(topic.clone());
            return Ok((true, Vec::new(), None));
        };
        if !self.streams.contains_key(project) && self.streams.len() >= limits.projects_per_user {
            // Streams kept after a tab closed give way to a tab's real need.
            let kept: Vec<String> = self
                .streams
                .iter()
                .filter(|(_, s)| s.unused_since.is_some())
                .map(|(p, _)| p.clone())
                .collect();
            for p in kept {
                self.stop_if_unused(&p);
            }
            if self.streams.len() >= limits.projects_per_user {
                return Err(SubscribeError::TooManyProjects(limits.projects_per_user));
            }
        }
        self.by_tab.entry(tab).or_default().insert(topic.clone());
        let last = last_event_id.filter(|s| !s.is_empty()).map(str::to_owned);
        let pace = limits.pace;

        let Some(stream) = self.streams.get_mut(project) else {
            // A new stream starts at once, unless the project's stream connected less than the interval ago.
            self.recent.retain(|_, t| now < *t + pace.min_interval);
            let recent = self.recent.remove(project);
            self.streams
                .insert(project.clone(), Stream::new(limits.buffer, recent, last));
            let action = match recent {
                Some(_) => self.schedule(project, pace, now),
                None => self.start(project),
            };
            return Ok((true, Vec::new(), action));
        };

        stream.unused_since = None;
        // A connection that has not made its request yet will ask for the type.
        let carries_type = !stream.connected || stream.filter.contains(event_type);
        let buffered_from = last.as_ref().and_then(|id| {
            stream
                .buffer
                .iter()
                .position(|b| &b.id == id)
                .map(|i| i + 1)
        });
        match (last, carries_type, buffered_from) {
            // From now on, on a stream that carries the type: nothing to do.
            (None, true, _) => Ok((true, Vec::new(), None)),
            // Resume within the buffer: replay it to this tab only.
            (Some(_), true, Some(from)) => {
                let replay = stream
                    .buffer
                    .iter()
                    .skip(from)
                    .filter(|b| &b.event_type == event_type)
                    .map(|b| b.msg.clone())
                    .collect();
                Ok((true, replay, None))
            }
            // A new type, from now on: the next connection carries the union, from the last event received.
            (None, false, _) => Ok((true, Vec::new(), self.schedule(project, pace, now))),
            // An id older than the buffer, or a type the stream did not carry.
            (Some(id), _, _) => {
                if stream.resume_id.is_none() && stream.catch_up.is_none() {
                    // Nothing received yet on this stream: everything replayed is new to everyone.
                    stream.resume_id = Some(id);
                    stream.force = true;
                } else {
                    // Waits for the next connection, which replays from the oldest id waiting.
                    let pair = Pair {
                        tab,
                        topic: topic.clone(),
                        after: id,
                    };
                    add_pair(&mut stream.waiting, pair);
                }
                Ok((true, Vec::new(), self.schedule(project, pace, now)))
            }
        }
    }

    /// Releases `tab`'s hold on `topic`. Returns whether it held it, and whether that closed the project's stream.
    pub fn unsubscribe(&mut self, tab: u64, topic: &Topic) -> (bool, bool) {
        let removed = self.by_tab.get_mut(&tab).is_some_and(|t| t.remove(topic));
        if self.by_tab.get(&tab).is_some_and(BTreeSet::is_empty) {
            self.by_tab.remove(&tab);
        }
        if !removed {
            return (false, false);
        }
        match topic.project_id() {
            Some(p) => {
                if let Some(s) = self.streams.get_mut(p) {
                    s.forget(tab, Some(topic));
                }
                (true, self.stop_if_unused(p))
            }
            None => (true, false),
        }
    }

    /// Releases everything a closing tab held. Streams nobody holds any more are kept, marked unused since `now`,
    /// until [`Subscriptions::sweep`] (a reload comes back to them). Returns those projects and the channels the
    /// tab held.
    pub fn release_tab(&mut self, tab: u64, now: Instant) -> (Vec<String>, Vec<Topic>) {
        let Some(topics) = self.by_tab.remove(&tab) else {
            return (Vec::new(), Vec::new());
        };
        let projects: BTreeSet<String> = topics
            .iter()
            .filter_map(|t| t.project_id().map(str::to_owned))
            .collect();
        let channels = topics
            .into_iter()
            .filter(|t| matches!(t, Topic::Channel(_)))
            .collect();
        let mut kept = Vec::new();
        for p in projects {
            if let Some(s) = self.streams.get_mut(&p) {
                s.forget(tab, None);
            }
            if self.is_used(&p) {
                continue;
            }
            if let Some(s) = self.streams.get_mut(&p) {
                s.unused_since = Some(now);
                kept.push(p);
            }
        }
        (kept, channels)
    }

    /// Stops the streams unused for at least `grace` at `now`. Returns how many were stopped.
    pub fn sweep(&mut self, now: Instant, grace: Duration) -> usize {
        let due: Vec<String> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.unused_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= grace)
            })
            .map(|(p, _)| p.clone())
            .collect();
        due.iter().filter(|p| self.stop_if_unused(p)).count()
    }

    fn is_used(&self, project: &str) -> bool {
        self.by_tab
            .values()
            .any(|ts| ts.iter().any(|t| t.project_id() == Some(project)))
    }

    /// Whether any tab holds `topic`.
    /// Distinct channels the user's tabs hold.
    fn channels_held(&self) -> usize {
        let channels: BTreeSet<&Topic> = self
            .by_tab
            .values()
            .flatten()
            .filter(|t| matches!(t, Topic::Channel(_)))
            .collect();
        channels.len()
    }

    pub fn holds(&self, topic: &Topic) -> bool {
        self.by_tab.values().any(|ts| ts.contains(topic))
    }

    /// The tabs holding `topic`.
    pub fn tabs_holding(&self, topic: &Topic) -> Vec<u64> {
        self.by_tab
            .iter()
            .filter(|(_, ts)| ts.contains(topic))
            .map(|(tab, _)| *tab)
            .collect()
    }

    /// Removes a project's stream, remembering when it last connected (see `recent`).
    fn remove_stream(&mut self, project: &str) -> bool {
        let Some(mut s) = self.streams.remove(project) else {
            return false;
        };
        s.abort();
        if let Some(t) = s.last_connect {
            self.recent.insert(project.to_owned(), t);
        }
        true
    }

    /// Drops every subscription on a project (GitLab said 403 or 404). Returns who held what.
    pub fn drop_project(&mut self, project: &str) -> Vec<(u64, Topic)> {
        let holders = self.holders(project);
        for (tab, topic) in &holders {
            if let Some(t) = self.by_tab.get_mut(tab) {
                t.remove(topic);
            }
        }
        self.by_tab.retain(|_, t| !t.is_empty());
        self.remove_stream(project);
        holders
    }

    /// Closes the project's stream when no tab holds a topic of it any more.
    fn stop_if_unused(&mut self, project: &str) -> bool {
        !self.is_used(project) && self.remove_stream(project)
    }

    /// Stops every stream (the session stops).
    pub fn stop_all(&mut self) {
        for (_, mut s) in std::mem::take(&mut self.streams) {
            s.abort();
        }
        self.by_tab.clear();
        self.recent.clear();
    }

    /// Reopens every stream from its resume point (after a token refresh: new bearer, nothing lost), each as soon
    /// as its pace allows: a connection made meanwhile (a retry) carries the new token too and makes it needless.
    pub fn restart_all(&mut self, pace: Pace, now: Instant) -> Vec<Action> {
        let projects: Vec<String> = self.streams.keys().cloned().collect();
        projects
            .into_iter()
            .filter_map(|p| {
                let s = self.streams.get_mut(&p)?;
                s.force = true;
                self.schedule(&p, pace, now)
            })
            .collect()
    }

    /// An event from the current connection of `project`. `encode` builds the message (called at most once).
    pub fn on_event(
        &mut self,
        project: &str,
        generation: u64,
        id: &str,
        event_type: &str,
        buffer_cap: usize,
        encode: impl FnOnce() -> Utf8Bytes,
    ) -> Option<Delivery> {
        let stream = self.streams.get_mut(project)?;
        if stream.generation != generation {
            return None;
        }
        if !id.is_empty() {
            stream.resume_id = Some(id.to_owned());
        }
        let topic = Topic::project(project, event_type);
        if let Some(c) = &mut stream.catch_up {
            let past_until = match (numeric(id), numeric(&c.until)) {
                (Some(a), Some(b)) => a > b,
                _ => false,
            };
            if !past_until {
                let by_tab = &self.by_tab;
                let mut tabs = Vec::new();
                for p in c.pairs.iter_mut().filter(|p| p.topic == topic) {
                    let holds = by_tab.get(&p.tab).is_some_and(|ts| ts.contains(&topic));
                    if holds && p.wants(id) && !tabs.contains(&p.tab) {
                        tabs.push(p.tab);
                        id.clone_into(&mut p.after);
                    }
                }
                if id == c.until {
                    stream.catch_up = None;
                }
                return (!tabs.is_empty()).then(|| Delivery {
                    msg: encode(),
                    tabs,
                });
            }
            stream.catch_up = None;
        }
        if !id.is_empty() && stream.buffer.iter().any(|b| b.id == id) {
            return None; // a repeat from upstream
        }
        let msg = encode();
        if !id.is_empty() {
            if stream.buffer.len() >= buffer_cap {
                stream.buffer.pop_front();
            }
            stream.buffer.push_back(Buffered {
                id: id.to_owned(),
                event_type: event_type.to_owned(),
                msg: msg.clone(),
            });
        }
        // Tabs waiting to catch up get this event from the catch-up, in order, not now.
        let waiting = &stream.waiting;
        let tabs: Vec<u64> = self
            .by_tab
            .iter()
            .filter(|(_, ts)| ts.contains(&topic))
            .map(|(tab, _)| *tab)
            .filter(|tab| !waiting.iter().any(|p| p.tab == *tab && p.topic == topic))
            .collect();
        (!tabs.is_empty()).then_some(Delivery { msg, tabs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACE: Pace = Pace {
        window: Duration::from_millis(200),
        min_interval: Duration::from_secs(1),
    };

    const LIMITS: Limits = Limits {
        topics_per_tab: 3,
        projects_per_user: 2,
        channels_per_user: 2,
        buffer: 4,
        pace: PACE,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// What generation `g` of project 1 asks for when it connects at `now`.
    fn connect(s: &mut Subscriptions, g: u64, now: Instant) -> (Vec<String>, Option<String>) {
        let c = s.connect("1", g, now).expect("current generation");
        (c.filter.iter().cloned().collect(), c.last_event_id)
    }

    fn wake_at(a: &Option<Action>) -> Instant {
        match a {
            Some(Action::Wake { at, .. }) => *at,
            other => panic!("expected a wake, got {other:?}"),
        }
    }

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    fn gen_of(a: &Option<Action>) -> u64 {
        match a {
            Some(Action::Start { generation, .. }) => *generation,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    fn event(s: &mut Subscriptions, generation: u64, id: &str, ty: &str) -> Vec<u64> {
        let mut tabs = s
            .on_event("1", generation, id, ty, LIMITS.buffer, || {
                Utf8Bytes::from(format!("{ty}#{id}"))
            })
            .map(|d| d.tabs)
            .unwrap_or_default();
        tabs.sort();
        tabs
    }

    #[test]
    fn one_stream_per_project_with_refcounts() {
        let mut s = Subscriptions::default();
        let (new, _, a) = s.subscribe(1, &t("/project/1/push"), None, LIMITS).unwrap();
        assert!(new);
        let g = gen_of(&a);
        assert!(s
            .subscribe(2, &t("/project/1/push"), None, LIMITS)
            .unwrap()
            .2
            .is_none());
        assert!(
            !s.subscribe(2, &t("/project/1/push"), None, LIMITS)
                .unwrap()
                .0
        );
        assert_eq!(event(&mut s, g, "1", "push"), vec![1, 2]);
        assert_eq!(s.unsubscribe(1, &t("/project/1/push")), (true, false));
        assert_eq!(event(&mut s, g, "2", "push"), vec![2]);
        assert_eq!(s.unsubscribe(2, &t("/project/1/push")), (true, true));
    }

    #[test]
    fn new_type_reopens_from_the_last_event_and_stale_generations_are_ignored() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g1 = gen_of(
            &s.subscribe_at(1, &t("/project/1/push"), None, LIMITS, t0)
                .unwrap()
                .2,
        );
        assert_eq!(connect(&mut s, g1, t0), (vec!["push".into()], None));
        assert_eq!(event(&mut s, g1, "7", "push"), vec![1]);
        // A new type waits for the window, and for the interval since the last connection.
        let a = s
            .subscribe_at(2, &t("/project/1/issue"), None, LIMITS, t0 + ms(10))
            .unwrap()
            .2;
        assert_eq!(wake_at(&a), t0 + PACE.min_interval);
        assert_eq!(s.due("1", PACE, t0 + ms(500)), None, "not yet");
        let a = s.due("1", PACE, t0 + PACE.min_interval);
        let g2 = gen_of(&a);
        assert_eq!(
            connect(&mut s, g2, t0 + PACE.min_interval),
            (vec!["issue".into(), "push".into()], Some("7".into()))
        );
        assert!(
            event(&mut s, g1, "8", "push").is_empty(),
            "old connection ignored"
        );
        assert!(s.connect("1", g1, t0).is_none(), "an old task ends");
        assert_eq!(event(&mut s, g2, "8", "issue"), vec![2]);
        assert_eq!(event(&mut s, g2, "9", "push"), vec![1]);
        // Removing a type filters locally, without reopening.
        assert_eq!(s.unsubscribe(2, &t("/project/1/issue")), (true, false));
        assert!(event(&mut s, g2, "10", "issue").is_empty());
    }

    #[test]
    fn repeats_are_dropped() {
        let mut s = Subscriptions::default();
        let g = gen_of(
            &s.subscribe(1, &t("/project/1/push"), None, LIMITS)
                .unwrap()
                .2,
        );
        assert_eq!(event(&mut s, g, "1", "push"), vec![1]);
        assert!(event(&mut s, g, "1", "push").is_empty());
    }

    #[test]
    fn resume_from_the_buffer_without_reconnecting() {
        let mut s = Subscriptions::default();
        let g = gen_of(
            &s.subscribe(1, &t("/project/1/push"), None, LIMITS)
                .unwrap()
                .2,
        );
        for id in ["1", "2", "3"] {
            event(&mut s, g, id, "push");
        }
        let (_, replay, action) = s
            .subscribe(2, &t("/project/1/push"), Some("1"), LIMITS)
            .unwrap();
        assert!(action.is_none());
        assert_eq!(
            replay,
            vec![Utf8Bytes::from("push#2"), Utf8Bytes::from("push#3")]
        );
    }

    #[test]
    fn an_old_id_catches_up_without_repeating_for_others() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(1, &t("/project/1/push"), None, LIMITS, t0)
                .unwrap()
                .2,
        );
        connect(&mut s, g, t0);
        for id in 1..=10 {
            event(&mut s, g, &id.to_string(), "push");
        }
        // Tab 2 last saw event 3, which left the 4-event buffer.
        let at = t0 + ms(2_000);
        let a = s
            .subscribe_at(2, &t("/project/1/push"), Some("3"), LIMITS, at)
            .unwrap()
            .2;
        assert_eq!(wake_at(&a), at + PACE.window);
        let g2 = gen_of(&s.due("1", PACE, at + PACE.window));
        assert_eq!(
            connect(&mut s, g2, at + PACE.window).1.as_deref(),
            Some("3")
        );
        for id in 4..=10 {
            assert_eq!(
                event(&mut s, g2, &id.to_string(), "push"),
                vec![2],
                "replayed {id}"
            );
        }
        assert_eq!(event(&mut s, g2, "11", "push"), vec![1, 2], "live again");
    }

    #[test]
    fn limits_are_errors() {
        let mut s = Subscriptions::default();
        for ty in ["a", "b", "c"] {
            s.subscribe(1, &t(&format!("/project/1/{ty}")), None, LIMITS)
                .unwrap();
        }
        assert_eq!(
            s.subscribe(1, &t("/project/1/d"), None, LIMITS)
                .unwrap_err(),
            SubscribeError::TooManyTopics(3)
        );
        s.subscribe(2, &t("/project/2/a"), None, LIMITS).unwrap();
        assert_eq!(
            s.subscribe(2, &t("/project/3/a"), None, LIMITS)
                .unwrap_err(),
            SubscribeError::TooManyProjects(2)
        );
    }

    #[test]
    fn a_closing_tab_releases_everything() {
        let mut s = Subscriptions::default();
        s.subscribe(1, &t("/project/1/a"), None, LIMITS).unwrap();
        s.subscribe(1, &t("/project/2/a"), None, LIMITS).unwrap();
        s.subscribe(2, &t("/project/2/b"), None, LIMITS).unwrap();
        s.subscribe(1, &t("/events/x"), None, LIMITS).unwrap();
        let t0 = Instant::now();
        let (kept, channels) = s.release_tab(1, t0);
        assert_eq!(
            kept,
            ["1"],
            "project 1 is unused now; 2 is still held by tab 2"
        );
        assert_eq!(channels, vec![t("/events/x")]);
        assert_eq!(s.projects().collect::<Vec<_>>(), ["1", "2"], "kept");
        let grace = Duration::from_millis(300);
        assert_eq!(s.sweep(t0 + Duration::from_millis(299), grace), 0);
        assert_eq!(s.sweep(t0 + grace, grace), 1);
        assert_eq!(s.projects().collect::<Vec<_>>(), ["2"]);
    }

    #[test]
    fn a_reload_takes_back_the_kept_stream_with_what_it_missed() {
        let mut s = Subscriptions::default();
        let g = gen_of(
            &s.subscribe(1, &t("/project/1/push"), None, LIMITS)
                .unwrap()
                .2,
        );
        assert_eq!(event(&mut s, g, "1", "push"), vec![1]);
        let t0 = Instant::now();
        s.release_tab(1, t0);
        assert!(
            event(&mut s, g, "2", "push").is_empty(),
            "nobody to deliver to"
        );
        // The reloaded tab resumes from the last id it saw: replayed from the buffer, no reconnection.
        let (new, replay, action) = s
            .subscribe(2, &t("/project/1/push"), Some("1"), LIMITS)
            .unwrap();
        assert!(new && action.is_none(), "{action:?}");
        assert_eq!(replay, [Utf8Bytes::from("push#2")]);
        assert_eq!(
            s.sweep(t0 + Duration::from_secs(60), Duration::ZERO),
            0,
            "held again"
        );
        assert_eq!(event(&mut s, g, "3", "push"), vec![2]);
    }

    #[test]
    fn kept_streams_give_way_to_a_new_project_at_the_limit() {
        let mut s = Subscriptions::default();
        s.subscribe(1, &t("/project/1/a"), None, LIMITS).unwrap();
        s.subscribe(1, &t("/project/2/a"), None, LIMITS).unwrap();
        s.release_tab(1, Instant::now());
        s.subscribe(2, &t("/project/1/a"), None, LIMITS).unwrap();
        assert!(s.subscribe(2, &t("/project/3/a"), None, LIMITS).is_ok());
        assert_eq!(s.projects().collect::<Vec<_>>(), ["1", "3"]);
    }

    const MANY: Limits = Limits {
        topics_per_tab: 100,
        projects_per_user: 2,
        channels_per_user: 2,
        buffer: 4,
        pace: PACE,
    };

    /// Item 4 of issue 14: a `setSubscriptions` adding 99 types cost 99 restarts, each cloning the whole filter.
    #[test]
    fn ninety_nine_new_types_cost_one_restart() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(1, &t("/project/1/t0"), None, MANY, t0)
                .unwrap()
                .2,
        );
        connect(&mut s, g, t0);
        let later = t0 + ms(5_000);
        let actions: Vec<Action> = (1..100)
            .filter_map(|i| {
                s.subscribe_at(1, &t(&format!("/project/1/t{i}")), None, MANY, later)
                    .unwrap()
                    .2
            })
            .collect();
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(wake_at(&actions.first().cloned()), later + PACE.window);
        let g2 = gen_of(&s.due("1", PACE, later + PACE.window));
        let (filter, from) = connect(&mut s, g2, later + PACE.window);
        assert_eq!(filter.len(), 100);
        assert_eq!(from, None);
        // Nothing left to do: the next decision (none scheduled) and a late timer change nothing.
        assert_eq!(s.due("1", PACE, later + ms(10_000)), None);
    }

    /// Changes made before a connection makes its request are read by it: no restart.
    #[test]
    fn changes_before_the_connection_connects_need_no_restart() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(1, &t("/project/1/push"), None, LIMITS, t0)
                .unwrap()
                .2,
        );
        assert_eq!(
            s.subscribe_at(2, &t("/project/1/issue"), None, LIMITS, t0)
                .unwrap()
                .2,
            None,
            "the connection has not asked yet"
        );
        assert_eq!(
            connect(&mut s, g, t0 + ms(5)).0,
            ["issue", "push"],
            "it asks for both"
        );
    }

    /// The filter is the exact union of what the tabs hold: it shrinks at the next connection, and is shared, not
    /// rebuilt, while the union stays the same.
    #[test]
    fn the_filter_is_the_exact_union_and_shrinks() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(1, &t("/project/1/a"), None, LIMITS, t0)
                .unwrap()
                .2,
        );
        s.subscribe_at(1, &t("/project/1/b"), None, LIMITS, t0)
            .unwrap();
        s.subscribe_at(2, &t("/project/1/c"), None, LIMITS, t0)
            .unwrap();
        let first = s.connect("1", g, t0).unwrap().filter;
        assert_eq!(first.iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        let again = s.connect("1", g, t0 + ms(1)).unwrap().filter;
        assert!(Arc::ptr_eq(&first, &again), "shared while unchanged");
        s.unsubscribe(1, &t("/project/1/b"));
        s.release_tab(2, t0);
        // A retry (the same generation reconnecting) asks for what is held now.
        assert_eq!(connect(&mut s, g, t0 + ms(2)).0, ["a"]);
        // Nobody holds the stream (kept after the tab closed): it keeps its last filter, not "every type".
        s.release_tab(1, t0);
        assert_eq!(connect(&mut s, g, t0 + ms(3)).0, ["a"]);
    }

    /// Two connections of a project are at least the interval apart, whatever asked for them; a retry made
    /// meanwhile carries the change and makes the restart needless.
    #[test]
    fn connections_are_at_least_the_interval_apart() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(1, &t("/project/1/a"), None, LIMITS, t0)
                .unwrap()
                .2,
        );
        connect(&mut s, g, t0);
        let a = s
            .subscribe_at(1, &t("/project/1/b"), None, LIMITS, t0 + ms(10))
            .unwrap()
            .2;
        assert_eq!(wake_at(&a), t0 + PACE.min_interval);
        // The connection drops and its task reconnects at 900 ms: it asks for a and b.
        assert_eq!(connect(&mut s, g, t0 + ms(900)).0, ["a", "b"]);
        // At 1 s the decision waits for 900 ms + the interval, then finds nothing to do.
        let a = s.due("1", PACE, t0 + PACE.min_interval);
        assert_eq!(wake_at(&a), t0 + ms(900) + PACE.min_interval);
        assert_eq!(s.due("1", PACE, t0 + ms(1_900)), None);
        // A new token: restarted once the interval allows.
        let a = s.restart_all(PACE, t0 + ms(2_000));
        assert_eq!(a.len(), 1);
        let g2 = gen_of(&s.due("1", PACE, t0 + ms(2_200)));
        assert!(g2 > g);
    }

    /// A project unsubscribed and subscribed again waits out the interval like any restart.
    #[test]
    fn a_project_subscribed_again_within_the_interval_waits() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(1, &t("/project/1/a"), None, LIMITS, t0)
                .unwrap()
                .2,
        );
        connect(&mut s, g, t0);
        assert_eq!(s.unsubscribe(1, &t("/project/1/a")), (true, true));
        let a = s
            .subscribe_at(1, &t("/project/1/a"), None, LIMITS, t0 + ms(100))
            .unwrap()
            .2;
        assert_eq!(wake_at(&a), t0 + PACE.min_interval);
        let g2 = gen_of(&s.due("1", PACE, t0 + PACE.min_interval));
        connect(&mut s, g2, t0 + PACE.min_interval);
        // Long after, a new stream starts at once again.
        s.unsubscribe(1, &t("/project/1/a"));
        let a = s
            .subscribe_at(1, &t("/project/1/a"), None, LIMITS, t0 + ms(5_000))
            .unwrap()
            .2;
        gen_of(&a);
    }

    /// Four tabs resubscribing from ids older than the buffer share one request, from the oldest id; each gets
    /// what it missed from its own id, once, in order; live events wait for the catch-up.
    #[test]
    fn tabs_catching_up_share_one_request() {
        let mut s = Subscriptions::default();
        let limits = Limits {
            topics_per_tab: 3,
            projects_per_user: 2,
            channels_per_user: 2,
            buffer: 4,
            pace: PACE,
        };
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(10, &t("/project/1/push"), None, limits, t0)
                .unwrap()
                .2,
        );
        connect(&mut s, g, t0);
        for id in 1..=10 {
            event(&mut s, g, &id.to_string(), "push");
        }
        let at = t0 + ms(5_000);
        let mut actions = Vec::new();
        for (tab, last) in [(1, "2"), (2, "3"), (3, "2"), (4, "5")] {
            let (new, replay, a) = s
                .subscribe_at(
                    tab,
                    &t("/project/1/push"),
                    Some(last),
                    limits,
                    at + ms(tab * 10),
                )
                .unwrap();
            assert!(new && replay.is_empty());
            actions.extend(a);
        }
        assert_eq!(actions.len(), 1, "one decision: {actions:?}");
        // The old connection goes on meanwhile: event 11 reaches tab 10 only.
        assert_eq!(event(&mut s, g, "11", "push"), vec![10]);
        let g2 = gen_of(&s.due("1", PACE, wake_at(&actions.first().cloned())));
        assert_eq!(connect(&mut s, g2, at + ms(300)).1.as_deref(), Some("2"));
        assert_eq!(event(&mut s, g2, "3", "push"), vec![1, 3]);
        assert_eq!(event(&mut s, g2, "4", "push"), vec![1, 2, 3]);
        assert_eq!(event(&mut s, g2, "5", "push"), vec![1, 2, 3]);
        for id in 6..=11 {
            assert_eq!(event(&mut s, g2, &id.to_string(), "push"), vec![1, 2, 3, 4]);
        }
        assert_eq!(
            event(&mut s, g2, "12", "push"),
            vec![1, 2, 3, 4, 10],
            "live"
        );
    }

    /// Per-tab catch-up state stays bounded however often a tab resubscribes, and goes with the tab.
    #[test]
    fn catch_up_state_is_bounded() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let g = gen_of(
            &s.subscribe_at(10, &t("/project/1/push"), None, LIMITS, t0)
                .unwrap()
                .2,
        );
        connect(&mut s, g, t0);
        for id in 1..=10 {
            event(&mut s, g, &id.to_string(), "push");
        }
        for i in 0..1_000 {
            let now = t0 + ms(i);
            s.subscribe_at(1, &t("/project/1/push"), Some("2"), LIMITS, now)
                .unwrap();
            s.unsubscribe(1, &t("/project/1/push"));
            s.subscribe_at(1, &t("/project/1/push"), Some("2"), LIMITS, now)
                .unwrap();
        }
        let stream = s.stream_mut("1").unwrap();
        assert_eq!(stream.waiting.len(), 1);
        s.release_tab(1, t0);
        assert!(s.stream_mut("1").unwrap().waiting.is_empty());
        assert!(s.stream_mut("1").unwrap().buffer.len() <= LIMITS.buffer);
    }
}
