//! `subscribe {topic, lastEventId?}`: the tab receives the events of `topic` (`/project/<id>/<eventType>`) as
//! `event {topic, eventType, id, payload}`. With `lastEventId`, it first receives what it missed after that event
//! (from the session's replay buffer, or from GitLab), so a tab that reconnects, even to another instance, misses
//! nothing. Replies `subscribed {topic, added}` (`added` is false when the tab already held the topic), always before
//! the topic's first event.

use serde::Deserialize;
use serde_json::json;

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;
use crate::loop_context::Notification;
use crate::topic::Topic;

pub struct Subscribe;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Params {
    topic: String,
    #[serde(default)]
    last_event_id: Option<String>,
}

impl Command for Subscribe {
    const NAME: &'static str = "subscribe";
    const DOC: &'static str =
        "Receives the topic's events (event {topic, eventType, id, payload}); lastEventId resumes after that event.";
    const REQUIRED: &'static [&'static str] = &["topic"];
    const OPTIONAL: &'static [&'static str] = &["lastEventId"];
    type Params = Params;

    async fn handle(&self, p: Params, ctx: &dyn Context) -> Result<(), CommandError> {
        let topic = Topic::parse(&p.topic).map_err(CommandError::BadParams)?;
        let name = topic.to_string();
        // The engine adds `added` and queues the reply before any event of the topic.
        let reply = Notification::new("subscribed", json!({"topic": name}));
        ctx.subscribe(&topic, p.last_event_id.as_deref(), Some(reply))
            .await?;
        Ok(())
    }
}
