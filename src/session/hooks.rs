//! A session's side of the webhook source (`gitlab.source = "webhook"`): subscriptions checked as the user,
//! replays from the shared history, live events from the receiver, and periodic re-checks of access.
//!
//! - **subscribe**: the user's access to the project is checked first (cached, see [`crate::access`]); a refusal is
//!   a `subscriptionError` and nothing is registered. With a `lastEventId`, the tab is registered as *catching up*:
//!   live events for it queue while the history is read, then the reply, the replay and the queued events newer
//!   than the replay go out in that order, so nothing is lost or repeated, whichever instance the tab came from.
//! - **delivery** ([`Session::deliver_hook`]): to the tabs holding the topic, only while the project's last check
//!   allowed the user, and confidential events only to users whose access level allows them.
//! - **re-check**: every `access.recheck_interval_ms` the session checks the projects it follows again. Refused:
//!   the project's subscriptions are dropped (`subscriptionError`). No answer: delivery pauses
//!   (`subscriptionStatus degraded`) until an answer allows again (`recovered`): a backend that cannot answer never
//!   allows.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::{json, Value};
use tabhub_commands::Topic;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{begin_resume, Inner, Session, SubscribeReply};
use crate::access::Verdict;
use crate::protocol;
use crate::subscriptions::SubscribeError;
use crate::tab::Tab;

/// Why a webhook-source subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookRefusal {
    /// A limit of the user's subscriptions.
    Limit(SubscribeError),
    /// The user may not see the project (or the check could not answer): status and message.
    Access(u16, &'static str),
}

impl Session {
    /// Whether the user may see `project` (cached).
    pub async fn check_access(&self, project: &str) -> Verdict {
        let s = &self.services;
        s.access.check(&s.backends, self, project).await
    }

    /// Subscribes `tab` to a project topic of the webhook source, after checking access (see the module
    /// documentation).
    pub async fn subscribe_hooked(
        self: &Arc<Self>,
        tab: &Tab,
        topic: &Topic,
        last_event_id: Option<&str>,
        mut reply: Option<SubscribeReply<'_>>,
    ) -> Result<bool, HookRefusal> {
        let Some(project) = topic.project_id() else {
            return Ok(false);
        };
        let verdict = self.check_access(project).await;
        let Verdict::Allowed { level } = verdict else {
            let (status, message) = verdict.refusal().unwrap_or((403, "refused"));
            return Err(HookRefusal::Access(status, message));
        };
        // An id that is no number cannot be placed in the history: from now on, with `gap`.
        let resume = last_event_id
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u64>().ok());
        let limits = self.sub_limits();
        {
            let mut inner = self.lock();
            if inner.stopped {
                return Ok(false);
            }
            let added = inner
                .subs
                .subscribe_hooked(tab.id, topic, limits)
                .map_err(HookRefusal::Limit)?;
            self.follow(&mut inner, project, level);
            if !begin_resume(&mut inner, tab, topic, added, resume, &mut reply) {
                return Ok(added);
            }
        }
        let Some(Some(after)) = resume else {
            return Ok(true);
        };
        let replay = match self.services.history.after(project, after).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(user = %self.user.id, project, error = %e, "history unavailable for a resume");
                crate::history::Replay {
                    events: Vec::new(),
                    gap: true,
                }
            }
        };
        let mut inner = self.lock();
        let Some(queued) = inner.catching.remove(&(tab.id, topic.clone())) else {
            // The tab left, or the project was dropped, meanwhile.
            return Ok(true);
        };
        let level = match inner.hooked.get(project) {
            Some(Some(level)) => *level,
            _ => return Ok(true),
        };
        let Topic::Project { event_type, .. } = topic else {
            return Ok(true);
        };
        let confidential_ok = self.services.access.sees_confidential(level);
        let newest = replay.events.last().map_or(after, |s| s.id.max(after));
        let missed: Vec<Utf8Bytes> = replay
            .events
            .iter()
            .filter(|s| &s.event.event_type == event_type)
            .filter(|s| confidential_ok || !s.event.confidential)
            .map(|s| s.encode())
            .collect();
        self.finish_resume(tab, reply, missed, queued, newest, replay.gap);
        Ok(true)
    }

    /// Records that the user follows `project` with `level`, and starts the re-checks with the first project.
    pub(super) fn follow(self: &Arc<Self>, inner: &mut Inner, project: &str, level: u64) {
        if inner
            .hooked
            .insert(project.to_owned(), Some(level))
            .is_none()
        {
            self.services.watchers.add(project, &self.user.id);
        }
        if !inner.rechecking {
            inner.rechecking = true;
            let every = Duration::from_millis(self.services.config.access.recheck_interval_ms);
            let task = tokio::spawn(recheck(Arc::downgrade(self), every)).abort_handle();
            inner.tasks.push(task);
        }
    }

    /// Forgets the projects no tab holds any more (after an unsubscribe, a closing tab, a dropped project).
    pub(super) fn unfollow_unused(&self, inner: &mut Inner) {
        let Inner { hooked, subs, .. } = inner;
        hooked.retain(|p, _| {
            let used = subs.is_used(p);
            if !used {
                self.services.watchers.remove(p, &self.user.id);
            }
            used
        });
    }

    /// Forgets every project (the session stops).
    pub(super) fn unfollow_all(&self, inner: &mut Inner) {
        for (p, _) in inner.hooked.drain() {
            self.services.watchers.remove(&p, &self.user.id);
        }
        inner.catching.clear();
    }

    /// A webhook event for `topic`: to the tabs holding it, if the user may see it. Returns how many tabs got it.
    pub fn deliver_hook(
        &self,
        topic: &Topic,
        id: u64,
        confidential: bool,
        msg: &Utf8Bytes,
    ) -> usize {
        let Some(project) = topic.project_id() else {
            return 0;
        };
        let mut inner = self.lock();
        let Some(Some(level)) = inner.hooked.get(project).copied() else {
            return 0;
        };
        if confidential && !self.services.access.sees_confidential(level) {
            return 0;
        }
        let holders = inner.subs.tabs_holding(topic);
        if holders.is_empty() {
            return 0;
        }
        let Inner { tabs, catching, .. } = &mut *inner;
        let mut sent = 0;
        for t in tabs.iter().filter(|t| holders.contains(&t.id)) {
            if !catching.is_empty() {
                if let Some(q) = catching.get_mut(&(t.id, topic.clone())) {
                    q.push((id, msg.clone()));
                    continue;
                }
            }
            t.send(msg.clone());
            sent += 1;
        }
        sent
    }

    /// Applies a re-check's verdict on `project`.
    fn apply_verdict(&self, project: &str, verdict: Verdict) {
        let mut inner = self.lock();
        let Some(previous) = inner.hooked.get(project).copied() else {
            return;
        };
        match (verdict, previous) {
            (Verdict::Allowed { level }, previous) => {
                inner.hooked.insert(project.to_owned(), Some(level));
                if previous.is_none() {
                    tell(
                        &inner,
                        project,
                        "subscriptionStatus",
                        json!({"status": "recovered"}),
                    );
                }
            }
            (Verdict::Unavailable, Some(_)) => {
                inner.hooked.insert(project.to_owned(), None);
                let data = json!({"status": "degraded", "message": "cannot check access to the project now; events paused"});
                tell(&inner, project, "subscriptionStatus", data);
            }
            (Verdict::Unavailable, None) => {}
            (Verdict::Refused { .. }, _) => {
                let (status, message) = verdict.refusal().unwrap_or((403, "refused"));
                let holders = inner.subs.drop_project(project);
                inner
                    .catching
                    .retain(|(_, t), _| t.project_id() != Some(project));
                self.unfollow_unused(&mut inner);
                let data = json!({"status": status, "message": format!("{message}; subscription dropped")});
                for (tab_id, topic) in holders {
                    send_topic(&inner, tab_id, &topic, "subscriptionError", &data);
                }
                tracing::info!(user = %self.user.id, project, status, "access withdrawn; subscriptions dropped");
            }
        }
    }
}

/// Sends `kind {topic, ...data}` to every tab holding a topic of `project`.
fn tell(inner: &Inner, project: &str, kind: &str, data: Value) {
    for (tab_id, topic) in inner.subs.holders(project) {
        send_topic(inner, tab_id, &topic, kind, &data);
    }
}

fn send_topic(inner: &Inner, tab_id: u64, topic: &Topic, kind: &str, data: &Value) {
    let mut d = data.clone();
    d["topic"] = Value::String(topic.to_string());
    if let Some(t) = inner.tabs.iter().find(|t| t.id == tab_id) {
        t.send(protocol::encode_scoped("topic", kind, &d, None));
    }
}

/// Re-checks the session's projects every `every` while it lives.
async fn recheck(session: Weak<Session>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = session.upgrade() else {
            return;
        };
        let projects: Vec<String> = {
            let mut inner = s.lock();
            s.unfollow_unused(&mut inner);
            inner.hooked.keys().cloned().collect()
        };
        for p in projects {
            let verdict = s.check_access(&p).await;
            s.apply_verdict(&p, verdict);
        }
    }
}
