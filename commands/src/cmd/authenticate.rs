//! `authenticate {token}`: a tab hands over a fresh access token without reconnecting. The token must verify and
//! belong to the same user; the session then uses it for its loops and upstream streams.

use serde::Deserialize;

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;

pub struct Authenticate;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    token: String,
}

impl Command for Authenticate {
    const NAME: &'static str = "authenticate";
    const DOC: &'static str =
        "Replaces the session's access token with a fresher one of the same user; replies authenticated {expiresIn}.";
    const REQUIRED: &'static [&'static str] = &["token"];
    type Params = Params;

    async fn handle(&self, p: Params, ctx: &dyn Context) -> Result<(), CommandError> {
        let data = ctx.authenticate(&p.token).await?;
        ctx.reply("authenticated", data);
        Ok(())
    }
}
