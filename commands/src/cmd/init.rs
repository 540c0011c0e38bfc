//! `init {requestServerVersion}`: Renku's first command. Replies `version {start, message, version}` and, when the
//! version was requested, registers the long-loop function that tells every tab of the user when the deployed UI
//! version changes.
//!
//! The version comes from the `ui_version` setting, or from the `ui_version_url` setting (a JSON document with a
//! `version` field, or a plain-text body). A URL is fetched through the shared cache: one request per long interval
//! for all users together, not one per user.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::command::{BoxFuture, Command, CommandError};
use crate::context::{Context, LoopContext, Notification};
use crate::loops::{Cadence, LoopError, LoopFunction};

pub struct Init;

/// Name of the long-loop function.
pub const LOOP: &str = "uiVersion";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Params {
    request_server_version: bool,
}

/// The version last told to the user's tabs.
#[derive(Default)]
struct Known(Mutex<Option<String>>);

impl Known {
    /// Records `v`; true when it differs from a version told before.
    fn changed_to(&self, v: &str) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.as_deref().is_some_and(|old| old != v);
        *last = Some(v.to_owned());
        changed
    }
}

impl Command for Init {
    const NAME: &'static str = "init";
    const DOC: &'static str =
        "Replies version {start, message, version}; with requestServerVersion the long loop pushes version {version} on change.";
    const REQUIRED: &'static [&'static str] = &["requestServerVersion"];
    type Params = Params;

    fn handle<'a>(
        &'a self,
        p: Params,
        ctx: &'a dyn Context,
    ) -> BoxFuture<'a, Result<(), CommandError>> {
        Box::pin(async move {
            if !p.request_server_version {
                ctx.reply(
                    "version",
                    json!({"start": false, "message": "UI version not requested.", "version": null}),
                );
                return Ok(());
            }
            match current_version(ctx).await {
                Ok(Some(version)) => {
                    ctx.session_data().get::<Known>().changed_to(&version);
                    ctx.reply(
                        "version",
                        json!({
                            "start": true,
                            "message": "The server will send the UI version when it changes.",
                            "version": version,
                        }),
                    );
                    ctx.register_loop(LoopFunction::new(LOOP, Cadence::Long, version_loop));
                    Ok(())
                }
                Ok(None) => {
                    ctx.reply(
                        "version",
                        json!({"start": false, "message": "No UI version is configured.", "version": null}),
                    );
                    Ok(())
                }
                Err(e) => Err(CommandError::failed(format!("UI version unavailable: {e}"))),
            }
        })
    }
}

async fn version_loop(ctx: Arc<dyn LoopContext>) -> Result<Vec<Notification>, LoopError> {
    let Some(version) = current_version(ctx.as_ref()).await? else {
        return Ok(vec![]);
    };
    if ctx.session_data().get::<Known>().changed_to(&version) {
        Ok(vec![Notification::new(
            "version",
            json!({ "version": version }),
        )])
    } else {
        Ok(vec![])
    }
}

/// The deployed version: `ui_version`, else `ui_version_url`, else none.
async fn current_version(ctx: &(impl LoopContext + ?Sized)) -> Result<Option<String>, LoopError> {
    let settings: &Map<String, Value> = ctx.settings();
    if let Some(v) = settings.get("ui_version").and_then(Value::as_str) {
        return Ok(Some(v.to_owned()));
    }
    let Some(url) = settings.get("ui_version_url").and_then(Value::as_str) else {
        return Ok(None);
    };
    let resp = ctx.shared_get(url).await?;
    if resp.status != 200 {
        return Err(LoopError(format!(
            "version endpoint answered {}",
            resp.status
        )));
    }
    match &resp.body {
        Value::Object(o) => match o.get("version") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Ok(Some(v.to_string())),
            None => Err(LoopError("version document has no 'version' field".into())),
        },
        Value::String(s) => Ok(Some(s.trim().to_owned())),
        other => Ok(Some(other.to_string())),
    }
}
