//! What a session does with its upstream streams' callbacks: events to the tabs holding the topic, state changes
//! (`subscriptionStatus`, `subscriptionError`) to the tabs holding a topic of the project.
//!
//! Plain functions over the session's subscriptions and tabs, called under the session's lock by its
//! [`StreamSink`](crate::upstream::StreamSink) implementation. Every callback names its stream's generation: one
//! from a stream that has since been replaced changes nothing.

use std::sync::Arc;

use serde_json::{json, Value};
use tabhub_commands::Topic;

use crate::protocol;
use crate::subscriptions::Subscriptions;
use crate::tab::Tab;

/// An event: appended to the project's replay buffer (at most `cap`) and sent to the tabs holding its topic.
pub(crate) fn event(
    subs: &mut Subscriptions,
    tabs: &[Arc<Tab>],
    project: &str,
    generation: u64,
    (id, event_type, data): (&str, &str, &str),
    cap: usize,
) {
    let delivery = subs.on_event(project, generation, id, event_type, cap, || {
        let payload =
            serde_json::from_str::<Value>(data).unwrap_or_else(|_| Value::String(data.to_owned()));
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

/// The stream (re)opened: `recovered` to the holders if it was degraded.
pub(crate) fn opened(subs: &mut Subscriptions, tabs: &[Arc<Tab>], project: &str, generation: u64) {
    if !subs.is_current(project, generation) {
        return;
    }
    let was_degraded = subs
        .stream_mut(project)
        .map(|s| std::mem::replace(&mut s.degraded, false))
        .unwrap_or(false);
    if was_degraded {
        let data = json!({"status": "recovered"});
        tell(tabs, &subs.holders(project), "subscriptionStatus", &data);
    }
}

/// The stream failed and retries: `degraded` to the holders once, not at every retry. True when newly degraded.
pub(crate) fn degraded(
    subs: &mut Subscriptions,
    tabs: &[Arc<Tab>],
    project: &str,
    generation: u64,
    why: &str,
) -> bool {
    if !subs.is_current(project, generation) {
        return false;
    }
    let newly = subs
        .stream_mut(project)
        .map(|s| !std::mem::replace(&mut s.degraded, true))
        .unwrap_or(false);
    if newly {
        let data = json!({"status": "degraded", "message": why});
        tell(tabs, &subs.holders(project), "subscriptionStatus", &data);
    }
    newly
}

/// GitLab refused the user's token: the holders are told; the stream waits for a new token.
pub(crate) fn unauthorized(
    subs: &Subscriptions,
    tabs: &[Arc<Tab>],
    project: &str,
    generation: u64,
) {
    if !subs.is_current(project, generation) {
        return;
    }
    let data =
        json!({"status": 401, "message": "GitLab refused the user's token; waiting for a new one"});
    tell(tabs, &subs.holders(project), "subscriptionError", &data);
}

/// GitLab refused the project (403, 404): its subscriptions are dropped and their holders told.
pub(crate) fn refused(
    subs: &mut Subscriptions,
    tabs: &[Arc<Tab>],
    project: &str,
    generation: u64,
    (status, message): (u16, &str),
) {
    if !subs.is_current(project, generation) {
        return;
    }
    let holders = subs.drop_project(project);
    let data = json!({"status": status, "message": format!("{message}; subscription dropped")});
    tell(tabs, &holders, "subscriptionError", &data);
}

/// Sends `kind {topic, ...data}` to every tab holding a topic of the project.
fn tell(tabs: &[Arc<Tab>], holders: &[(u64, Topic)], kind: &str, data: &Value) {
    for (tab_id, topic) in holders {
        let mut d = data.clone();
        d["topic"] = Value::String(topic.to_string());
        if let Some(t) = tabs.iter().find(|t| t.id == *tab_id) {
            t.send(protocol::encode_scoped("topic", kind, &d, None));
        }
    }
}
