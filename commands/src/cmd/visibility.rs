//! `visibility {hidden}`: a tab says whether the user can see it (the browser's `document.hidden`).
//!
//! While every tab of the user is hidden nobody looks at the results, so the session's short-loop functions slow
//! down to `session.hidden_interval_ms` (default 30 s) and spare the backends. When one tab becomes visible again
//! they run at once and resume the short interval (5 s). A tab counts as visible until it says otherwise, and a
//! tab that closes no longer counts. The command replies nothing: the change is silent, only the cadence moves.

use serde::Deserialize;

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;

pub struct Visibility;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    hidden: bool,
}

impl Command for Visibility {
    const NAME: &'static str = "visibility";
    const DOC: &'static str =
        "Marks this tab hidden or visible; while all the user's tabs are hidden the short loop slows down.";
    const REQUIRED: &'static [&'static str] = &["hidden"];
    type Params = Params;

    async fn handle(&self, p: Params, ctx: &dyn Context) -> Result<(), CommandError> {
        ctx.set_hidden(p.hidden);
        Ok(())
    }
}
