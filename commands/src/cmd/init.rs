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

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;
use crate::loop_context::{LoopContext, Notification};
use crate::loops::{Cadence, LoopError, LoopFunction};
use crate::settings;

/// `init`, with where the deployed UI version comes from read once at start.
#[derive(Default)]
pub struct Init {
    source: Arc<VersionSource>,
}

/// Where the deployed UI version comes from: `ui_version` (fixed), else `ui_version_url`, else none.
#[derive(Default)]
enum VersionSource {
    Fixed(String),
    Url(String),
    #[default]
    None,
}

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
    const SETTINGS: &'static [&'static str] = &["ui_version", "ui_version_url"];
    type Params = Params;

    fn configure(&mut self, s: &Map<String, Value>) -> Result<(), String> {
        let fixed = settings::string(s, "ui_version", "")?;
        let url = settings::string(s, "ui_version_url", "")?;
        let source = match (fixed.is_empty(), url.is_empty()) {
            (false, _) => VersionSource::Fixed(fixed),
            (true, false) if url.starts_with("http://") || url.starts_with("https://") => {
                VersionSource::Url(url)
            }
            (true, false) => {
                return Err(format!(
                    "setting 'ui_version_url' must be an http(s) URL, got {url:?}"
                ))
            }
            (true, true) => VersionSource::None,
        };
        self.source = Arc::new(source);
        Ok(())
    }

    async fn handle(&self, p: Params, ctx: &dyn Context) -> Result<(), CommandError> {
        if !p.request_server_version {
            ctx.reply(
                "version",
                json!({"start": false, "message": "UI version not requested.", "version": null}),
            );
            return Ok(());
        }
        match current_version(&self.source, ctx).await {
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
                let source = self.source.clone();
                ctx.register_loop(LoopFunction::new(LOOP, Cadence::Long, move |ctx| {
                    version_loop(source.clone(), ctx)
                }));
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
    }
}

async fn version_loop(
    source: Arc<VersionSource>,
    ctx: Arc<dyn LoopContext>,
) -> Result<Vec<Notification>, LoopError> {
    let Some(version) = current_version(&source, ctx.as_ref()).await? else {
        return Ok(vec![]);
    };
    // Sent at every long tick, as Renku's server does: to the tabs that expect it each time (Renku's client) as a
    // repeat, to every tab when it changed.
    let data = json!({ "version": version });
    if ctx.session_data().get::<Known>().changed_to(&version) {
        Ok(vec![Notification::new("version", data)])
    } else {
        Ok(vec![Notification::repeated("version", data)])
    }
}

/// The deployed version, if one is configured.
async fn current_version(
    source: &VersionSource,
    ctx: &(impl LoopContext + ?Sized),
) -> Result<Option<String>, LoopError> {
    let url = match source {
        VersionSource::Fixed(v) => return Ok(Some(v.clone())),
        VersionSource::None => return Ok(None),
        VersionSource::Url(url) => url,
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
