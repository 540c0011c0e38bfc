//! `setSubscriptions {topics: [...]}`: replaces the tab's whole set of topics in one step (AWX's semantics, handy
//! when a single-page app navigates). Every topic is checked first: one malformed topic refuses the whole command
//! and changes nothing. Replies `subscriptions {added, removed, topics, failed}`; `failed` lists the topics that
//! could not be added (a limit, say) with the reason.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::json;

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;
use crate::topic::Topic;

pub struct SetSubscriptions;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    topics: Vec<String>,
}

impl Command for SetSubscriptions {
    const NAME: &'static str = "setSubscriptions";
    const DOC: &'static str = "Replaces the tab's topics; replies the topics added and removed.";
    const REQUIRED: &'static [&'static str] = &["topics"];
    type Params = Params;

    async fn handle(&self, p: Params, ctx: &dyn Context) -> Result<(), CommandError> {
        let mut wanted = BTreeSet::new();
        let mut bad = Vec::new();
        for t in &p.topics {
            match Topic::parse(t) {
                Ok(topic) => {
                    wanted.insert(topic);
                }
                Err(e) => bad.push(e),
            }
        }
        if !bad.is_empty() {
            return Err(CommandError::BadParams(bad.join("; ")));
        }
        let out = ctx.set_subscriptions(&wanted).await;
        let names = |ts: &[Topic]| ts.iter().map(Topic::to_string).collect::<Vec<_>>();
        let removed = names(&out.removed);
        let added = names(&out.added);
        let failed: Vec<_> = out
            .failed
            .iter()
            .map(|(t, e)| json!({"topic": t.to_string(), "message": e.message()}))
            .collect();
        let topics: Vec<String> = ctx.subscriptions().iter().map(Topic::to_string).collect();
        ctx.reply(
            "subscriptions",
            json!({"added": added, "removed": removed, "topics": topics, "failed": failed}),
        );
        Ok(())
    }
}
