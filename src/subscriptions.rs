//! A user's subscriptions: which tab holds which topic, and one upstream stream per project whatever the number of
//! tabs and topics on it. Pure bookkeeping, kept under the session's lock; it returns [`Action`]s (start or stop a
//! stream connection) for the session to carry out, so that every rule here is testable without a network.
//!
//! Rules:
//! - a stream's event-type filter is the union of what the tabs wanted at its last (re)start. A new type reopens the
//!   connection with the union, resuming after the last event received (`Last-Event-ID`), so nothing is lost or
//!   repeated; a type nobody wants any more is filtered locally until the next reconnection, which drops it (no
//!   reconnect churn when tabs navigate, and no filter growing with every name a user tries). The session opens a
//!   command's restarts once, when the command ends;
//! - each event reaches each tab holding its topic exactly once: ids already delivered (still in the replay buffer)
//!   are dropped if the upstream repeats them;
//! - a tab subscribing with a `lastEventId` still in the replay buffer gets what it missed from the buffer, atomically
//!   with its registration (no upstream reconnect). An older id (or a type the stream did not carry) reopens the
//!   stream from that id in *catch-up* mode: replayed events up to the last one already delivered go only to the
//!   tabs catching up, then delivery is normal again;
//! - a stream left unused by a *closing* tab is kept for a grace period (the session's linger) and still fills its
//!   replay buffer: a page reload resubscribes to the same stream, without an upstream reconnection and with what
//!   it missed meanwhile. An explicit `unsubscribe` stops an unused stream at once. Kept streams give way to a
//!   tab's new project when the per-user project limit is reached.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use tabhub_commands::Topic;
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Something the session must do on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// (Re)open the project's stream with its current filter ([`Subscriptions::filter`], read when the start is
    /// carried out: a command's hundred restarts copy no type list), sending `Last-Event-ID: from`. Any previous
    /// connection of the project must be stopped; events from older generations are ignored.
    Start {
        project: String,
        from: Option<String>,
        generation: u64,
    },
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

struct CatchUp {
    /// The last id delivered before catch-up began; catch-up ends when it comes by again.
    until: String,
    /// (tab, topic) pairs that receive the replayed events.
    pairs: Vec<(u64, Topic)>,
}

/// One project's upstream stream.
pub struct Stream {
    filter: BTreeSet<String>,
    /// Types of the filter that no tab holds any more: the next start with a holder drops them.
    stale: BTreeSet<String>,
    generation: u64,
    /// The last event id received on the stream: where a reconnection resumes.
    resume_id: Option<String>,
    /// The last event id delivered to every subscribed tab: what catch-up waits for.
    delivered_id: Option<String>,
    buffer: VecDeque<Buffered>,
    catch_up: Option<CatchUp>,
    /// The running connection task.
    pub task: Option<AbortHandle>,
    /// Whether the tabs were told the stream is degraded (told once, and once when it recovers).
    pub degraded: bool,
    /// Since when no tab holds a topic of the stream (it was kept after a tab closed).
    unused_since: Option<Instant>,
}

/// Limits applied to subscribe.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub topics_per_tab: usize,
    pub projects_per_user: usize,
    /// Distinct publish channels one user's tabs may hold: the instance's channel buffers are shared by everyone,
    /// so no one user may take them all.
    pub channels_per_user: usize,
    pub buffer: usize,
}

/// Every question asked per command (is a topic held, which types of a project are held, how many channels) is
/// answered from counts kept with `by_tab`, never by scanning every tab's topics: one user's `setSubscriptions` of
/// a hundred topics from many tabs would otherwise cost tabs x topics per topic, under the session's lock.
#[derive(Default)]
pub struct Subscriptions {
    by_tab: HashMap<u64, BTreeSet<Topic>>,
    /// Per project, per event type: how many tabs hold the topic.
    types: HashMap<String, HashMap<String, usize>>,
    /// Per publish channel: how many tabs hold it.
    channels: HashMap<String, usize>,
    streams: BTreeMap<String, Stream>,
    next_generation: u64,
}

/// What an upstream event turned into: the message, once, and the tabs it goes to.
pub struct Delivery {
    pub msg: Utf8Bytes,
    pub tabs: Vec<u64>,
}

fn numeric(id: &str) -> Option<u64> {
    id.parse().ok()
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

    /// Where a reconnection of `project` resumes.
    pub fn resume_id(&self, project: &str) -> Option<String> {
        self.streams.get(project).and_then(|s| s.resume_id.clone())
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

    /// The event types `project`'s stream asks GitLab for since its last start.
    pub fn filter(&self, project: &str) -> Option<&BTreeSet<String>> {
        self.streams.get(project).map(|s| &s.filter)
    }

    /// Records that `tab` holds `topic`. Returns false when it already did.
    fn hold(&mut self, tab: u64, topic: &Topic) -> bool {
        if !self.by_tab.entry(tab).or_default().insert(topic.clone()) {
            return false;
        }
        match topic {
            Topic::Project {
                project,
                event_type,
            } => {
                *self
                    .types
                    .entry(project.clone())
                    .or_default()
                    .entry(event_type.clone())
                    .or_default() += 1;
            }
            Topic::Channel(c) => *self.channels.entry(c.clone()).or_default() += 1,
        }
        true
    }

    /// Counts down a hold already removed from `by_tab`. A type nobody holds any more becomes stale in its
    /// stream's filter (dropped at the next start).
    fn let_go(&mut self, topic: &Topic) {
        fn down<K: std::hash::Hash + Eq + std::borrow::Borrow<str>>(
            counts: &mut HashMap<K, usize>,
            key: &str,
        ) -> bool {
            let Some(n) = counts.get_mut(key) else {
                return false;
            };
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(key);
                return true;
            }
            false
        }
        match topic {
            Topic::Project {
                project,
                event_type,
            } => {
                let Some(types) = self.types.get_mut(project) else {
                    return;
                };
                if down(types, event_type) {
                    if types.is_empty() {
                        self.types.remove(project);
                    }
                    if let Some(s) = self.streams.get_mut(project) {
                        if s.filter.contains(event_type) {
                            s.stale.insert(event_type.clone());
                        }
                    }
                }
            }
            Topic::Channel(c) => {
                down(&mut self.channels, c);
            }
        }
    }

    /// A new generation of `project`'s stream, with `added` (a type a tab just asked for) in its filter.
    fn start(&mut self, project: &str, from: Option<String>, added: Option<&str>) -> Action {
        self.next_generation += 1;
        let generation = self.next_generation;
        let held = self.types.get(project);
        let s = self
            .streams
            .get_mut(project)
            .expect("start is called for an existing stream");
        // The union of what the tabs hold now: every held type is in the filter (a new one comes with its start),
        // and types let go since the last start are dropped, so a user cycling through type names cannot grow it.
        // With nobody holding anything (a stream kept after its last tab), the filter stays: an empty one would
        // ask GitLab for every type.
        if let Some(held) = held {
            for t in std::mem::take(&mut s.stale) {
                if !held.contains_key(&t) {
                    s.filter.remove(&t);
                }
            }
        }
        if let Some(t) = added {
            if !s.filter.contains(t) {
                s.filter.insert(t.to_owned());
            }
        }
        s.generation = generation;
        s.resume_id = from.clone();
        if let Some(t) = s.task.take() {
            t.abort();
        }
        Action::Start {
            project: project.to_owned(),
            from,
            generation,
        }
    }

    /// Subscribes `tab` to `topic`. Returns whether it is new, the buffered messages to send to the tab now, and
    /// the action to take.
    pub fn subscribe(
        &mut self,
        tab: u64,
        topic: &Topic,
        last_event_id: Option<&str>,
        limits: Limits,
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
            if !self.holds(topic) && self.channels.len() >= limits.channels_per_user {
                return Err(SubscribeError::TooManyChannels(limits.channels_per_user));
            }
            self.hold(tab, topic);
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
        self.hold(tab, topic);
        let last = last_event_id.filter(|s| !s.is_empty()).map(str::to_owned);

        let Some(stream) = self.streams.get_mut(project) else {
            self.streams.insert(
                project.clone(),
                Stream {
                    filter: BTreeSet::new(),
                    stale: BTreeSet::new(),
                    generation: 0,
                    resume_id: None,
                    delivered_id: None,
                    buffer: VecDeque::with_capacity(limits.buffer.min(64)),
                    catch_up: None,
                    task: None,
                    degraded: false,
                    unused_since: None,
                },
            );
            return Ok((
                true,
                Vec::new(),
                Some(self.start(project, last, Some(event_type))),
            ));
        };

        stream.unused_since = None;
        let carries_type = stream.filter.contains(event_type);
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
            // A new type, from now on: reopen with the union from the last event received.
            (None, false, _) => {
                let from = stream.resume_id.clone();
                Ok((
                    true,
                    Vec::new(),
                    Some(self.start(project, from, Some(event_type))),
                ))
            }
            // An id older than the buffer, or a type the stream did not carry: reopen from that id and catch up.
            (Some(id), _, _) => {
                let from = match (&stream.catch_up, stream.delivered_id.clone()) {
                    (_, None) => {
                        // Nothing delivered yet on this stream: everything replayed is new to everyone.
                        Some(id)
                    }
                    (Some(c), Some(_)) => {
                        // Already catching up from an older point: keep the older of the two when comparable.
                        let mut pairs = c.pairs.clone();
                        pairs.push((tab, topic.clone()));
                        let older =
                            match (numeric(&id), stream.resume_id.as_deref().and_then(numeric)) {
                                (Some(a), Some(b)) if b < a => stream.resume_id.clone(),
                                _ => Some(id),
                            };
                        let until = c.until.clone();
                        stream.catch_up = Some(CatchUp { until, pairs });
                        older
                    }
                    (None, Some(delivered)) => {
                        stream.catch_up = Some(CatchUp {
                            until: delivered,
                            pairs: vec![(tab, topic.clone())],
                        });
                        Some(id)
                    }
                };
                Ok((
                    true,
                    Vec::new(),
                    Some(self.start(project, from, Some(event_type))),
                ))
            }
        }
    }

    /// Subscribes `tab` to a project topic of the webhook source: the same holds and limits as [`Self::subscribe`],
    /// but no stream (events come from the webhook receiver, replays from the shared history). Returns false when
    /// the tab already held it.
    pub fn subscribe_hooked(
        &mut self,
        tab: u64,
        topic: &Topic,
        limits: Limits,
    ) -> Result<bool, SubscribeError> {
        let held = self.by_tab.get(&tab);
        if held.is_some_and(|t| t.contains(topic)) {
            return Ok(false);
        }
        if held.is_some_and(|t| t.len() >= limits.topics_per_tab) {
            return Err(SubscribeError::TooManyTopics(limits.topics_per_tab));
        }
        if let Some(p) = topic.project_id() {
            if !self.types.contains_key(p) && self.types.len() >= limits.projects_per_user {
                return Err(SubscribeError::TooManyProjects(limits.projects_per_user));
            }
        }
        Ok(self.hold(tab, topic))
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
        self.let_go(topic);
        match topic.project_id() {
            Some(p) => (true, self.stop_if_unused(p)),
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
        for t in &topics {
            self.let_go(t);
        }
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

    /// Whether any tab holds a topic of `project`.
    pub fn is_used(&self, project: &str) -> bool {
        self.types.contains_key(project)
    }

    /// Whether any tab holds `topic`.
    pub fn holds(&self, topic: &Topic) -> bool {
        match topic {
            Topic::Project {
                project,
                event_type,
            } => self
                .types
                .get(project)
                .is_some_and(|t| t.contains_key(event_type)),
            Topic::Channel(c) => self.channels.contains_key(c),
        }
    }

    /// The tabs holding `topic`.
    pub fn tabs_holding(&self, topic: &Topic) -> Vec<u64> {
        self.by_tab
            .iter()
            .filter(|(_, ts)| ts.contains(topic))
            .map(|(tab, _)| *tab)
            .collect()
    }

    /// Drops every subscription on a project (GitLab said 403 or 404). Returns who held what.
    pub fn drop_project(&mut self, project: &str) -> Vec<(u64, Topic)> {
        let holders = self.holders(project);
        for (tab, topic) in &holders {
            if let Some(t) = self.by_tab.get_mut(tab) {
                t.remove(topic);
            }
        }
        self.types.remove(project);
        self.by_tab.retain(|_, t| !t.is_empty());
        if let Some(mut s) = self.streams.remove(project) {
            if let Some(t) = s.task.take() {
                t.abort();
            }
        }
        holders
    }

    /// Closes the project's stream when no tab holds a topic of it any more.
    fn stop_if_unused(&mut self, project: &str) -> bool {
        if self.is_used(project) {
            return false;
        }
        let Some(mut s) = self.streams.remove(project) else {
            return false;
        };
        if let Some(t) = s.task.take() {
            t.abort();
        }
        true
    }

    /// Stops every stream (the session stops).
    pub fn stop_all(&mut self) {
        for (_, mut s) in std::mem::take(&mut self.streams) {
            if let Some(t) = s.task.take() {
                t.abort();
            }
        }
        self.by_tab.clear();
        self.types.clear();
        self.channels.clear();
    }

    /// Reopens every stream from its resume point (after a token refresh: new bearer, nothing lost).
    pub fn restart_all(&mut self) -> Vec<Action> {
        let projects: Vec<String> = self.streams.keys().cloned().collect();
        projects
            .into_iter()
            .map(|p| {
                let from = self.resume_id(&p);
                self.start(&p, from, None)
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
        if let Some(c) = &stream.catch_up {
            let past_until = match (numeric(id), numeric(&c.until)) {
                (Some(a), Some(b)) => a > b,
                _ => false,
            };
            if !past_until {
                let tabs: Vec<u64> = c
                    .pairs
                    .iter()
                    .filter(|(_, t)| *t == topic)
                    .map(|(tab, _)| *tab)
                    .filter(|tab| self.by_tab.get(tab).is_some_and(|ts| ts.contains(&topic)))
                    .collect();
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
            stream.delivered_id = Some(id.to_owned());
            if stream.buffer.len() >= buffer_cap {
                stream.buffer.pop_front();
            }
            stream.buffer.push_back(Buffered {
                id: id.to_owned(),
                event_type: event_type.to_owned(),
                msg: msg.clone(),
            });
        }
        let tabs: Vec<u64> = self
            .by_tab
            .iter()
            .filter(|(_, ts)| ts.contains(&topic))
            .map(|(tab, _)| *tab)
            .collect();
        (!tabs.is_empty()).then_some(Delivery { msg, tabs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        topics_per_tab: 3,
        projects_per_user: 2,
        channels_per_user: 2,
        buffer: 4,
    };

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    fn filter_of(s: &Subscriptions) -> Vec<&str> {
        s.filter("1")
            .map(|f| f.iter().map(String::as_str).collect())
            .unwrap_or_default()
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
        let g1 = gen_of(
            &s.subscribe(1, &t("/project/1/push"), None, LIMITS)
                .unwrap()
                .2,
        );
        assert_eq!(event(&mut s, g1, "7", "push"), vec![1]);
        let a = s
            .subscribe(2, &t("/project/1/issue"), None, LIMITS)
            .unwrap()
            .2;
        match &a {
            Some(Action::Start { from, .. }) => assert_eq!(from.as_deref(), Some("7")),
            other => panic!("{other:?}"),
        }
        assert_eq!(filter_of(&s), ["issue", "push"]);
        let g2 = gen_of(&a);
        assert!(
            event(&mut s, g1, "8", "push").is_empty(),
            "old connection ignored"
        );
        assert_eq!(event(&mut s, g2, "8", "issue"), vec![2]);
        assert_eq!(event(&mut s, g2, "9", "push"), vec![1]);
        // Removing a type filters locally, without reopening.
        assert_eq!(s.unsubscribe(2, &t("/project/1/issue")), (true, false));
        assert!(event(&mut s, g2, "10", "issue").is_empty());
    }

    /// Item 4 of issue 14: a user cycling through type names grew the filter (and every restart's copy of it)
    /// without bound. It is the union of what is held at each start.
    #[test]
    fn the_filter_is_what_tabs_hold_at_each_start() {
        let mut s = Subscriptions::default();
        s.subscribe(1, &t("/project/1/push"), None, LIMITS).unwrap();
        s.subscribe(1, &t("/project/1/issue"), None, LIMITS)
            .unwrap();
        s.unsubscribe(1, &t("/project/1/issue"));
        let a = s
            .subscribe(1, &t("/project/1/pipeline"), None, LIMITS)
            .unwrap()
            .2;
        gen_of(&a);
        assert_eq!(filter_of(&s), ["pipeline", "push"]);
    }

    /// The filter is kept by counts, not rebuilt from every tab's topics: a type let go and taken again before
    /// the next start stays, one held by another tab stays, and a stream nobody holds keeps its filter until a
    /// tab asks again.
    #[test]
    fn the_filter_follows_the_counts() {
        let mut s = Subscriptions::default();
        let limits = Limits {
            topics_per_tab: 10,
            ..LIMITS
        };
        for ty in ["push", "issue", "note"] {
            s.subscribe(1, &t(&format!("/project/1/{ty}")), None, limits)
                .unwrap();
        }
        s.subscribe(2, &t("/project/1/issue"), None, limits)
            .unwrap();
        s.unsubscribe(1, &t("/project/1/issue")); // tab 2 still holds it
        s.unsubscribe(1, &t("/project/1/note"));
        s.subscribe(1, &t("/project/1/note"), None, limits).unwrap(); // taken again: carried, no start
        s.unsubscribe(1, &t("/project/1/push"));
        assert_eq!(
            filter_of(&s),
            ["issue", "note", "push"],
            "dropped only at a start"
        );
        assert!(s.holds(&t("/project/1/issue")) && !s.holds(&t("/project/1/push")));
        gen_of(
            &s.subscribe(2, &t("/project/1/wiki"), None, limits)
                .unwrap()
                .2,
        );
        assert_eq!(filter_of(&s), ["issue", "note", "wiki"]);
        // The last tab closes: the stream is kept with its filter; the next tab's type replaces it.
        s.release_tab(1, Instant::now());
        s.release_tab(2, Instant::now());
        assert!(!s.holds(&t("/project/1/wiki")));
        assert_eq!(filter_of(&s), ["issue", "note", "wiki"]);
        assert_eq!(s.restart_all().len(), 1);
        assert_eq!(
            filter_of(&s),
            ["issue", "note", "wiki"],
            "nobody holds: kept"
        );
        gen_of(
            &s.subscribe(3, &t("/project/1/job"), None, limits)
                .unwrap()
                .2,
        );
        assert_eq!(filter_of(&s), ["job"]);
    }

    /// Channels are counted once whatever the number of tabs holding them, and freed with the last holder.
    #[test]
    fn channels_are_counted_by_holders() {
        let mut s = Subscriptions::default();
        let a = t("/events/a");
        let b = t("/events/b");
        s.subscribe(1, &a, None, LIMITS).unwrap();
        s.subscribe(2, &a, None, LIMITS).unwrap();
        s.subscribe(2, &b, None, LIMITS).unwrap();
        assert_eq!(
            s.subscribe(3, &t("/events/c"), None, LIMITS),
            Err(SubscribeError::TooManyChannels(2))
        );
        s.unsubscribe(1, &a);
        assert!(s.holds(&a), "tab 2 still holds it");
        s.release_tab(2, Instant::now());
        assert!(!s.holds(&a) && !s.holds(&b));
        s.subscribe(3, &t("/events/c"), None, LIMITS).unwrap();
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
        let g = gen_of(
            &s.subscribe(1, &t("/project/1/push"), None, LIMITS)
                .unwrap()
                .2,
        );
        for id in 1..=10 {
            event(&mut s, g, &id.to_string(), "push");
        }
        // Tab 2 last saw event 3, which left the 4-event buffer.
        let a = s
            .subscribe(2, &t("/project/1/push"), Some("3"), LIMITS)
            .unwrap()
            .2;
        match &a {
            Some(Action::Start { from, .. }) => assert_eq!(from.as_deref(), Some("3")),
            other => panic!("{other:?}"),
        }
        let g2 = gen_of(&a);
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
    fn hooked_topics_count_like_others_and_open_no_stream() {
        let mut s = Subscriptions::default();
        assert_eq!(
            s.subscribe_hooked(1, &t("/project/1/push"), LIMITS),
            Ok(true)
        );
        assert_eq!(
            s.subscribe_hooked(1, &t("/project/1/push"), LIMITS),
            Ok(false)
        );
        assert_eq!(
            s.subscribe_hooked(2, &t("/project/2/push"), LIMITS),
            Ok(true)
        );
        assert_eq!(
            s.subscribe_hooked(2, &t("/project/3/push"), LIMITS),
            Err(SubscribeError::TooManyProjects(2))
        );
        assert_eq!(s.projects().count(), 0, "no stream");
        assert!(s.is_used("1") && s.holds(&t("/project/2/push")));
        assert_eq!(s.unsubscribe(1, &t("/project/1/push")), (true, false));
        assert!(!s.is_used("1"));
        assert_eq!(s.tabs_holding(&t("/project/2/push")), [2]);
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
}
