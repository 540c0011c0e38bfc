//! `ping {}`: answered with `ack {message: "ping"}` (Renku's keep-alive from the client side).

use serde::Deserialize;
use serde_json::json;

use crate::command::{BoxFuture, Command, CommandError};
use crate::context::Context;

pub struct Ping;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {}

impl Command for Ping {
    const NAME: &'static str = "ping";
    const DOC: &'static str = "Answers ack {message: \"ping\"}.";
    const REQUIRED: &'static [&'static str] = &[];
    type Params = Params;

    fn handle<'a>(
        &'a self,
        _: Params,
        ctx: &'a dyn Context,
    ) -> BoxFuture<'a, Result<(), CommandError>> {
        Box::pin(async move {
            ctx.reply("ack", json!({"message": "ping"}));
            Ok(())
        })
    }
}
