//! `pullSessionStatus {}` and `pullSessionStatusV2 {}`: tell the user's tabs when their interactive sessions change,
//! so that the UI refetches its session list only then.
//!
//! Each command registers a short-loop function on the user's session (`sessionStatus`, `sessionStatusV2`) that
//! calls the sessions endpoint as the user (Renku: `{gateway}/notebooks/servers` and `{gateway}/data/sessions`),
//! normalises the answer and compares its fingerprint with the previous one. The function sends
//! `sessionStatus` / `sessionStatusV2` `{message: "true"}` (Renku's payload) to every tab of the user:
//!
//! - on its first successful iteration (the tabs know nothing yet);
//! - afterwards, exactly once per change of the normalised answer, and never while it stays the same.
//!
//! Unlike Renku, the function exists only for users whose tabs asked for it, and once per user whatever the number
//! of tabs. A failing endpoint leaves the fingerprint alone: the engine tells the tabs `error` once and `recovered`
//! once, and a recovery with an unchanged answer sends nothing more.
//!
//! "Forces one send": when the loop already runs and has sent something, the command replies that last
//! notification (the loop's snapshot) at once to the asking tab only, with the request's `id` and without any
//! backend call. When the loop is new, its first iteration runs at once and always sends, to every tab. When the
//! loop runs but has not succeeded yet, there is nothing to send: its first success will be sent to every tab.
//! So a burst of tabs sending the command costs the backend nothing beyond the normal ticks.
//!
//! Normalisation, so that the fingerprint changes only when something the UI shows does:
//! - object keys are sorted (the backend's key order does not matter);
//! - keys named in `session_volatile_fields` are removed at any depth (resource usage, activity timestamps and
//!   the hibernation dates derived from them, which change while a session is merely used);
//! - a top-level array (V2's list of sessions) is a set: its items are sorted, so their order does not matter.
//!   Nested arrays keep their order.
//!
//! Settings (`[commands]`): `sessions_backend` (default `gateway`), `sessions_path` (default `/notebooks/servers`),
//! `sessions_v2_path` (default `/data/sessions`), `session_volatile_fields` (default [`DEFAULT_VOLATILE_FIELDS`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::command::{Command, NoParams};
use crate::context::Context;
use crate::error::CommandError;
use crate::loop_context::{LoopContext, Notification};
use crate::loops::{Cadence, LoopError, LoopFunction};
use crate::settings;

/// Keys ignored when comparing answers: they change while a session is merely running or used.
pub const DEFAULT_VOLATILE_FIELDS: &[&str] = &[
    "usage",
    "last_activity",
    "lastActivity",
    "renku.io/lastActivityDate",
    "will_hibernate_at",
    "will_delete_at",
    "hibernation_date",
    "renku.io/hibernationDate",
];

/// `pullSessionStatus {}`: the notebooks API (Renku v1), with its settings read once at start.
pub struct PullSessionStatus {
    settings: Arc<Settings>,
}

/// `pullSessionStatusV2 {}`: the data services' sessions (Renku v2), with its settings read once at start.
pub struct PullSessionStatusV2 {
    settings: Arc<Settings>,
}

impl Default for PullSessionStatus {
    fn default() -> Self {
        PullSessionStatus {
            settings: Arc::new(Settings::defaults(&V1)),
        }
    }
}

impl Default for PullSessionStatusV2 {
    fn default() -> Self {
        PullSessionStatusV2 {
            settings: Arc::new(Settings::defaults(&V2)),
        }
    }
}

/// The settings both commands read.
const SETTINGS: &[&str] = &[
    "sessions_backend",
    "sessions_path",
    "sessions_v2_path",
    "session_volatile_fields",
];

/// What tells the two commands apart.
#[derive(Debug)]
pub struct Flavor {
    /// The loop function's name, which is also the kind of the notification it sends.
    pub loop_name: &'static str,
    path_setting: &'static str,
    default_path: &'static str,
    /// What the endpoint answers: an object (`{"servers": {...}}`) or an array of sessions.
    expects_array: bool,
}

/// Renku v1: `GET {gateway}/notebooks/servers` answers `{"servers": {name: server}}`.
pub static V1: Flavor = Flavor {
    loop_name: "sessionStatus",
    path_setting: "sessions_path",
    default_path: "/notebooks/servers",
    expects_array: false,
};

/// Renku v2: `GET {gateway}/data/sessions` answers `[session, ...]`.
pub static V2: Flavor = Flavor {
    loop_name: "sessionStatusV2",
    path_setting: "sessions_v2_path",
    default_path: "/data/sessions",
    expects_array: true,
};

impl Command for PullSessionStatus {
    const NAME: &'static str = "pullSessionStatus";
    const DOC: &'static str =
        "Sends sessionStatus {message: \"true\"} to every tab when the user's sessions change; replies the current state at once.";
    const SETTINGS: &'static [&'static str] = SETTINGS;
    type Params = NoParams;

    fn configure(&mut self, settings: &Map<String, Value>) -> Result<(), String> {
        self.settings = Arc::new(Settings::read(settings, &V1)?);
        Ok(())
    }

    async fn handle(&self, _: NoParams, ctx: &dyn Context) -> Result<(), CommandError> {
        pull(&V1, &self.settings, ctx);
        Ok(())
    }
}

impl Command for PullSessionStatusV2 {
    const NAME: &'static str = "pullSessionStatusV2";
    const DOC: &'static str =
        "Sends sessionStatusV2 {message: \"true\"} to every tab when the user's sessions change; replies the current state at once.";
    const SETTINGS: &'static [&'static str] = SETTINGS;
    type Params = NoParams;

    fn configure(&mut self, settings: &Map<String, Value>) -> Result<(), String> {
        self.settings = Arc::new(Settings::read(settings, &V2)?);
        Ok(())
    }

    async fn handle(&self, _: NoParams, ctx: &dyn Context) -> Result<(), CommandError> {
        pull(&V2, &self.settings, ctx);
        Ok(())
    }
}

/// Both commands: register the loop, or reply its snapshot.
fn pull(flavor: &'static Flavor, settings: &Arc<Settings>, ctx: &dyn Context) {
    let settings = settings.clone();
    let registered = ctx.register_loop(LoopFunction::new(
        flavor.loop_name,
        Cadence::Short,
        move |ctx| poll(flavor, settings.clone(), ctx),
    ));
    if !registered {
        for n in ctx.snapshot(flavor.loop_name).unwrap_or_default() {
            ctx.reply(&n.kind, n.data);
        }
    }
}

struct Settings {
    backend: String,
    path: String,
    volatile: Vec<String>,
}

impl Settings {
    fn defaults(flavor: &Flavor) -> Settings {
        Settings::read(&Map::new(), flavor)
            .unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }

    fn read(s: &Map<String, Value>, flavor: &Flavor) -> Result<Settings, String> {
        let path = settings::string(s, flavor.path_setting, flavor.default_path)?;
        if !path.starts_with('/') {
            return Err(format!(
                "setting '{}' must start with /",
                flavor.path_setting
            ));
        }
        Ok(Settings {
            backend: settings::string(s, "sessions_backend", "gateway")?,
            path,
            volatile: settings::string_list(s, "session_volatile_fields", DEFAULT_VOLATILE_FIELDS)?,
        })
    }
}

/// The fingerprint of the last answer each function told the tabs about, by loop name.
#[derive(Default)]
struct Fingerprints(Mutex<HashMap<&'static str, u64>>);

impl Fingerprints {
    /// Records `fp`; true when it differs from the previous one or there was none.
    fn changed_to(&self, name: &'static str, fp: u64) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(name, fp) != Some(fp)
    }
}

/// One iteration. Everything after the backend call is synchronous, so an iteration cut by the engine's timeout
/// leaves the fingerprint untouched.
async fn poll(
    flavor: &'static Flavor,
    s: Arc<Settings>,
    ctx: Arc<dyn LoopContext>,
) -> Result<Vec<Notification>, LoopError> {
    let resp = ctx.backend_get(&s.backend, &s.path).await?;
    if !(200..300).contains(&resp.status) {
        return Err(LoopError(format!(
            "sessions endpoint answered {}",
            resp.status
        )));
    }
    let shape_ok = if flavor.expects_array {
        resp.body.is_array()
    } else {
        resp.body.is_object()
    };
    if !shape_ok {
        return Err(LoopError(format!(
            "sessions endpoint answered an unexpected document (expected a JSON {})",
            if flavor.expects_array {
                "array"
            } else {
                "object"
            }
        )));
    }
    let fp = fingerprint(&resp.body, &s.volatile);
    if ctx
        .session_data()
        .get::<Fingerprints>()
        .changed_to(flavor.loop_name, fp)
    {
        Ok(vec![Notification::new(
            flavor.loop_name,
            json!({"message": "true"}),
        )])
    } else {
        Ok(vec![])
    }
}

/// A hash of the normalised answer (see the module documentation).
pub fn fingerprint(body: &Value, volatile: &[String]) -> u64 {
    let mut h = DefaultHasher::new();
    normalised(body, volatile).hash(&mut h);
    h.finish()
}

/// The canonical text of the answer: sorted keys, volatile keys removed, a top-level array sorted.
pub fn normalised(body: &Value, volatile: &[String]) -> String {
    match body {
        Value::Array(items) => {
            let mut parts: Vec<String> = items
                .iter()
                .map(|v| {
                    let mut s = String::new();
                    canonical(v, volatile, &mut s);
                    s
                })
                .collect();
            parts.sort();
            format!("[{}]", parts.join(","))
        }
        other => {
            let mut s = String::new();
            canonical(other, volatile, &mut s);
            s
        }
    }
}

/// Writes `v` as JSON with sorted keys and without the volatile ones. Does not rely on `serde_json::Map`'s order,
/// which depends on a cargo feature any crate of the build may switch on.
fn canonical(v: &Value, volatile: &[String], out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m
                .keys()
                .filter(|k| !volatile.iter().any(|x| x == *k))
                .collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(k.as_str()).to_string());
                out.push(':');
                if let Some(item) = m.get(k) {
                    canonical(item, volatile, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, volatile, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volatile() -> Vec<String> {
        DEFAULT_VOLATILE_FIELDS
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn key_order_and_volatile_fields_do_not_matter() {
        let a: Value = serde_json::from_str(
            r#"{"servers": {"s1": {"name": "s1", "status": {"state": "running", "message": null},
                "resources": {"requests": {"cpu": 1}, "usage": {"cpu": 0.2}}}}}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"servers": {"s1": {"resources": {"usage": {"cpu": 0.9}, "requests": {"cpu": 1}},
                "status": {"message": null, "state": "running"}, "name": "s1"}}}"#,
        )
        .unwrap();
        assert_eq!(normalised(&a, &volatile()), normalised(&b, &volatile()));
        assert_eq!(fingerprint(&a, &volatile()), fingerprint(&b, &volatile()));
        let mut c = b.clone();
        c["servers"]["s1"]["status"]["state"] = json!("stopping");
        assert_ne!(fingerprint(&a, &volatile()), fingerprint(&c, &volatile()));
        // Without the default list, usage matters.
        assert_ne!(fingerprint(&a, &[]), fingerprint(&b, &[]));
    }

    #[test]
    fn the_list_of_sessions_is_a_set_but_nested_lists_keep_order() {
        let a = json!([{"name": "a", "x": [1, 2]}, {"name": "b"}]);
        let b = json!([{"name": "b"}, {"x": [1, 2], "name": "a"}]);
        let c = json!([{"name": "b"}, {"x": [2, 1], "name": "a"}]);
        assert_eq!(normalised(&a, &[]), normalised(&b, &[]));
        assert_ne!(normalised(&a, &[]), normalised(&c, &[]));
        assert_eq!(
            normalised(&json!({"b": 1, "a": {"d": "\"", "c": null}}), &[]),
            r#"{"a":{"c":null,"d":"\""},"b":1}"#
        );
    }

    #[test]
    fn first_answer_and_changes_count_once() {
        let f = Fingerprints::default();
        assert!(f.changed_to("x", 1));
        assert!(!f.changed_to("x", 1));
        assert!(f.changed_to("y", 1));
        assert!(f.changed_to("x", 2));
        assert!(!f.changed_to("x", 2));
    }
}
