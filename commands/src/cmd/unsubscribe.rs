//! `unsubscribe {topic}`: the tab stops receiving the topic's events. When no tab of the user holds a topic of the
//! project any more, the upstream stream closes. Replies `unsubscribed {topic, removed}`.

use serde::Deserialize;
use serde_json::json;

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;
use crate::topic::Topic;

pub struct Unsubscribe;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    topic: String,
}

impl Command for Unsubscribe {
    const NAME: &'static str = "unsubscribe";
    const DOC: &'static str = "Stops the topic's events for this tab.";
    const REQUIRED: &'static [&'static str] = &["topic"];
    type Params = Params;

    async fn handle(&self, p: Params, ctx: &dyn Context) -> Result<(), CommandError> {
        let topic = Topic::parse(&p.topic).map_err(CommandError::BadParams)?;
        let removed = ctx.unsubscribe(&topic);
        ctx.reply(
            "unsubscribed",
            json!({"topic": topic.to_string(), "removed": removed}),
        );
        Ok(())
    }
}
