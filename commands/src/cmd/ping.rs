//! `ping {}`: answered with `ack {message: "ping"}` (Renku's keep-alive from the client side).

use serde_json::json;

use crate::command::{Command, NoParams};
use crate::context::Context;
use crate::error::CommandError;

pub struct Ping;

impl Command for Ping {
    const NAME: &'static str = "ping";
    const DOC: &'static str = "Answers ack {message: \"ping\"}.";
    type Params = NoParams;

    async fn handle(&self, _: NoParams, ctx: &dyn Context) -> Result<(), CommandError> {
        ctx.reply("ack", json!({"message": "ping"}));
        Ok(())
    }
}
