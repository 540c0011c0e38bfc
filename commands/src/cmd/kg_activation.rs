//! `pullKgActivationStatus {projects: [ids]}`: follow the knowledge graph's activation of projects and tell the
//! user's tabs how far each one got, with Renku's values.
//!
//! The command adds the projects (GitLab ids: numbers, or strings such as `42` or `group%2Fname`) to the set the
//! user's session tracks (an id becomes a URL path segment: see [`project_id`] for what is refused); a project already tracked is left as it is. It registers the short-loop function
//! `kgActivation` once per user; when the function already runs and new projects were added, it runs at once so
//! the asking tab does not wait for the next tick. Asking again for tracked projects (every reconnecting tab does)
//! costs the backend nothing. The command itself replies nothing: results go to every tab of the user.
//!
//! Each iteration polls `GET {kg_backend}/projects/{id}/graph/status` as the user, at most [`MAX_CONCURRENT`]
//! projects at a time, and reads `progress.percentage`:
//!
//! - a percentage different from the last one known (the first one included) is a change;
//! - 100 (or more) is a change and the end: the project is dropped after this iteration;
//! - 404 means the knowledge graph does not know the project yet: it stays tracked, nothing changes;
//! - any other answer (a non-404 error, or a document without a percentage) gives **-2** and drops the project;
//! - no change for `kg_stale_after_ms` (default 120 s, counted from the request or from the last change, 404s
//!   included) gives **-408** and drops the project, without polling it again;
//! - a call that got no answer at all (timeout, network, backoff, refused token) changes nothing: the project is
//!   polled again at the next tick and its staleness clock keeps running. When no project got an answer and
//!   nothing changed, the iteration fails, so the tabs get the engine's `error` once and `recovered` once.
//!
//! When something changed, the function sends `activation` to every tab of the user with the progress of every
//! tracked project whose progress is known, plus the final value (100, -2, -408) of the projects that ended in
//! this iteration, each final value appearing in exactly one message. The map travels twice: as Renku's
//! `{message: "<the map as a JSON string>"}`, which the Renku client parses, and as `projects: {id: progress}`.
//! Since the engine keeps the last message as the function's snapshot, a tab that joins later gets the whole
//! current picture at once.
//!
//! All changes to the tracked set are applied after the polls, without any `.await` in between, so an iteration
//! cut by the engine's timeout changes nothing.
//!
//! Settings (`[commands]`): `kg_backend` (default `gateway`), `kg_stale_after_ms` (default 120000),
//! `kg_max_projects` (default 100: how many projects one user may have tracked at once).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Number, Value};

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;
use crate::loop_context::{BackendError, BackendResponse, LoopContext, Notification};
use crate::loops::{Cadence, LoopError, LoopFunction};
use crate::settings;

/// `pullKgActivationStatus`, with its settings read once at start.
#[derive(Default)]
pub struct PullKgActivationStatus {
    settings: Arc<Settings>,
}

/// Name of the short-loop function.
pub const LOOP: &str = "kgActivation";
/// Kind of the notification (Renku's).
pub const KIND: &str = "activation";
/// Most projects polled at once for one user (Renku's value).
pub const MAX_CONCURRENT: usize = 5;
/// Renku's value for "no progress for too long".
pub const TIMEOUT: f64 = -408.0;
/// Renku's value for "the status could not be read".
pub const UNKNOWN: f64 = -2.0;

/// Longest project id accepted (it becomes part of a URL path).
const MAX_ID_LEN: usize = 200;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    projects: Vec<Value>,
}

/// One tracked project.
struct Project {
    /// The last percentage told to the tabs; None before the first answer.
    progress: Option<f64>,
    /// When the project was added or its progress last changed.
    since: Instant,
}

/// The projects the user's session tracks, by id.
#[derive(Default)]
struct Tracked(Mutex<BTreeMap<String, Project>>);

impl Tracked {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Project>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Settings {
    backend: String,
    stale_after: Duration,
    max_projects: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::read(&Map::new()).unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

impl Settings {
    fn read(s: &Map<String, Value>) -> Result<Settings, String> {
        Ok(Settings {
            backend: settings::string(s, "kg_backend", "gateway")?,
            stale_after: Duration::from_millis(settings::u64(s, "kg_stale_after_ms", 120_000)?),
            max_projects: settings::u64(s, "kg_max_projects", 100)? as usize,
        })
    }
}

impl Command for PullKgActivationStatus {
    const NAME: &'static str = "pullKgActivationStatus";
    const DOC: &'static str =
        "Tracks the knowledge-graph activation of projects; sends activation {message, projects: {id: progress}} to every tab when a progress changes (100 done, -2 error, -408 stalled).";
    const REQUIRED: &'static [&'static str] = &["projects"];
    const SETTINGS: &'static [&'static str] =
        &["kg_backend", "kg_stale_after_ms", "kg_max_projects"];
    type Params = Params;

    fn configure(&mut self, settings: &Map<String, Value>) -> Result<(), String> {
        self.settings = Arc::new(Settings::read(settings)?);
        Ok(())
    }

    async fn handle(&self, p: Params, ctx: &dyn Context) -> Result<(), CommandError> {
        let s = &self.settings;
        let ids = p
            .projects
            .iter()
            .map(project_id)
            .collect::<Result<Vec<_>, _>>()
            .map_err(CommandError::BadParams)?;
        let added = {
            let tracked = ctx.session_data().get::<Tracked>();
            let mut map = tracked.lock();
            let new: Vec<&String> = ids.iter().filter(|id| !map.contains_key(*id)).collect();
            if map.len() + new.len() > s.max_projects {
                return Err(CommandError::failed(format!(
                    "too many projects tracked: at most {} at once",
                    s.max_projects
                )));
            }
            let now = Instant::now();
            for id in &new {
                map.insert(
                    (*id).clone(),
                    Project {
                        progress: None,
                        since: now,
                    },
                );
            }
            new.len()
        };
        let settings = self.settings.clone();
        let registered = ctx.register_loop(LoopFunction::new(LOOP, Cadence::Short, move |ctx| {
            poll(settings.clone(), ctx)
        }));
        if !registered && added > 0 {
            ctx.run_loop_now(LOOP);
        }
        Ok(())
    }
}

/// A project id from the request: a non-negative integer, or a GitLab project path, URL-encoded
/// (`group%2Fsub%2Fname`), as GitLab's API takes them. The id goes into a URL path, and URL parsers resolve
/// `%2e%2e` as `..`: the id `%2e%2e` once made tabhub fetch `{gateway}/graph/status`. So the id, percent-decoded
/// once, must be 1-200 characters of `[A-Za-z0-9_.-/]` (no `%` left: nothing double-encoded), and each of its
/// `/`-separated parts must have a character other than `.` (so none is empty, `.` or `..`). The id is kept as given (the tabs see their own ids back); the URL
/// gets it re-encoded by [`segment`].
fn project_id(v: &Value) -> Result<String, String> {
    let bad = || {
        // At most 64 characters, cut on a character boundary (a byte index could fall inside one).
        let shown: String = v.to_string().chars().take(64).collect();
        format!(
            "'pullKgActivationStatus': invalid project id {shown}: expected a number or a GitLab project path, URL-encoded, of 1-{MAX_ID_LEN} characters of [A-Za-z0-9_.-] and %2F, without . or .. parts"
        )
    };
    let id = match v {
        Value::Number(n) => n.as_u64().map(|n| n.to_string()).ok_or_else(bad)?,
        Value::String(s) => s.clone(),
        _ => return Err(bad()),
    };
    let raw_ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.%-".contains(c));
    let decoded = percent_decode(&id);
    let decoded_ok = decoded
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
        && decoded
            .split('/')
            .all(|part| part.chars().any(|c| c != '.'));
    if raw_ok && decoded_ok {
        Ok(id)
    } else {
        Err(bad())
    }
}

/// The id as one URL path segment: decoded, then with `/` encoded (the only character [`project_id`] lets through
/// that is not safe in a segment), so `group%2fname` and `group%2Fname` both give `group%2Fname`.
fn segment(id: &str) -> String {
    percent_decode(id).replace('/', "%2F")
}

/// One round of percent-decoding; an invalid escape stays as it is, invalid UTF-8 becomes U+FFFD.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What one poll tells about a project.
enum Outcome {
    Progress(f64),
    NotYetKnown,
    Failed,
    NoAnswer(BackendError),
}

fn outcome(r: Result<BackendResponse, BackendError>) -> Outcome {
    match r {
        Ok(resp) if resp.status == 404 => Outcome::NotYetKnown,
        Ok(resp) if (200..300).contains(&resp.status) => {
            match resp
                .body
                .pointer("/progress/percentage")
                .and_then(Value::as_f64)
            {
                Some(p) => Outcome::Progress(p),
                None => Outcome::Failed,
            }
        }
        Ok(_) => Outcome::Failed,
        Err(e) => Outcome::NoAnswer(e),
    }
}

/// One iteration (see the module documentation).
async fn poll(s: Arc<Settings>, ctx: Arc<dyn LoopContext>) -> Result<Vec<Notification>, LoopError> {
    let tracked = ctx.session_data().get::<Tracked>();
    let started = Instant::now();
    let due: Vec<String> = tracked
        .lock()
        .iter()
        .filter(|(_, p)| started.duration_since(p.since) < s.stale_after)
        .map(|(id, _)| id.clone())
        .collect();
    let ctx_ref = ctx.as_ref();
    let backend = s.backend.as_str();
    let results: Vec<(String, Outcome)> = stream::iter(due)
        .map(|id| async move {
            let path = format!("/projects/{}/graph/status", segment(&id));
            let r = ctx_ref.backend_get(backend, &path).await;
            (id, outcome(r))
        })
        .buffer_unordered(MAX_CONCURRENT)
        .collect()
        .await;

    // From here on, no await: the whole update is applied or none of it.
    let now = Instant::now();
    let mut map = tracked.lock();
    let mut changed = false;
    let mut ended: BTreeMap<String, f64> = BTreeMap::new();
    let mut answered = 0usize;
    let mut unanswered: Option<BackendError> = None;
    for (id, o) in results {
        let Some(p) = map.get_mut(&id) else { continue };
        match o {
            Outcome::Progress(pct) => {
                answered += 1;
                if p.progress != Some(pct) {
                    p.progress = Some(pct);
                    p.since = now;
                    changed = true;
                }
                if pct >= 100.0 {
                    ended.insert(id, pct);
                    changed = true;
                }
            }
            Outcome::NotYetKnown => answered += 1,
            Outcome::Failed => {
                answered += 1;
                ended.insert(id, UNKNOWN);
                changed = true;
            }
            Outcome::NoAnswer(e) => unanswered = Some(e),
        }
    }
    for (id, p) in map.iter() {
        if !ended.contains_key(id) && now.duration_since(p.since) >= s.stale_after {
            ended.insert(id.clone(), TIMEOUT);
            changed = true;
        }
    }
    if !changed {
        return match unanswered {
            Some(e) if answered == 0 => Err(LoopError(format!(
                "knowledge graph status unavailable: {e}"
            ))),
            _ => Ok(vec![]),
        };
    }
    let mut progress: Map<String, Value> = map
        .iter()
        .filter_map(|(id, p)| p.progress.map(|v| (id.clone(), number(v))))
        .collect();
    for (id, v) in &ended {
        map.remove(id);
        progress.insert(id.clone(), number(*v));
    }
    drop(map);
    let projects = Value::Object(progress);
    Ok(vec![Notification::new(
        KIND,
        json!({"message": projects.to_string(), "projects": projects}),
    )])
}

/// A percentage as JSON: an integer when it is one (`50`, not `50.0`).
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Value::from(v as i64)
    } else {
        Number::from_f64(v).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_numbers_or_path_safe_strings() {
        assert_eq!(project_id(&json!(42)).unwrap(), "42");
        assert_eq!(project_id(&json!("42")).unwrap(), "42");
        assert_eq!(
            project_id(&json!("group%2Fname.x")).unwrap(),
            "group%2Fname.x"
        );
        assert_eq!(
            project_id(&json!("group%2fsub%2Fname")).unwrap(),
            "group%2fsub%2Fname"
        );
        assert_eq!(segment("group%2fsub%2Fname"), "group%2Fsub%2Fname");
        assert_eq!(segment("42"), "42");
        assert_eq!(project_id(&json!("a.b")).unwrap(), "a.b");
        for bad in [
            json!(-1),
            json!(1.5),
            json!(""),
            json!("."),
            json!(".."),
            json!("..."),
            json!("%2e%2e"),
            json!("%2E%2e"),
            json!(".%2e"),
            json!("%2e"),
            json!("a%2F..%2Fb"),
            json!("a%2f%2e%2e"),
            json!("%2e%2e%2Fgraph"),
            json!("%2F"),
            json!("a%2F"),
            json!("%2Fa"),
            json!("a%2F%2Fb"),
            json!("%252e%252e"),
            json!("%25"),
            json!("a%5Cb"),
            json!("a%3Fb"),
            json!("%ff"),
            json!("a/b"),
            json!("a?b"),
            json!(null),
            json!([1]),
            json!("x".repeat(201)),
        ] {
            assert!(project_id(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn outcomes_follow_renku() {
        let ok = |body: Value| outcome(Ok(BackendResponse { status: 200, body }));
        assert!(matches!(
            ok(json!({"activated": false, "progress": {"done": 1, "total": 4, "percentage": 25.0}})),
            Outcome::Progress(p) if p == 25.0
        ));
        assert!(matches!(ok(json!({"activated": false})), Outcome::Failed));
        let status = |s| {
            outcome(Ok(BackendResponse {
                status: s,
                body: json!({}),
            }))
        };
        assert!(matches!(status(404), Outcome::NotYetKnown));
        assert!(matches!(status(403), Outcome::Failed));
        assert!(matches!(status(500), Outcome::Failed));
        assert!(matches!(
            outcome(Err(BackendError::Timeout)),
            Outcome::NoAnswer(_)
        ));
    }

    #[test]
    fn percentages_print_as_integers_when_whole() {
        assert_eq!(number(50.0).to_string(), "50");
        assert_eq!(number(-408.0).to_string(), "-408");
        assert_eq!(number(33.5).to_string(), "33.5");
    }
}
