//! A fixture Renku gateway. FOR DEVELOPMENT AND TESTS ONLY: it reads the user from the bearer token WITHOUT
//! verifying it.
//!
//! Renku-shaped endpoints, answered from `fixtures/gateway/*.json` (embedded, then copied into the fixture's state):
//!
//! - `GET /notebooks/servers`: the notebooks API's `{"servers": {...}}` (what `pullSessionStatus` polls);
//! - `GET /data/sessions`: the data services' list of sessions (what `pullSessionStatusV2` polls);
//! - `GET /projects/{id}/graph/status`: a project's knowledge-graph activation (`pullKgActivationStatus`); an
//!   unknown project answers 404, as the knowledge graph does before it knows a project;
//! - `GET /ui-version`: `{"version": "x.y.z"}` (the `ui_version_url` of `init`).
//!
//! Every call is counted per endpoint and per user (`sub` of the bearer token, `anonymous` without one), and the
//! calls in flight are tracked, so tests can check "one call per tick" and "no overlapping calls". The arrival times
//! of each user's first [`KEPT_CALL_TIMES`] calls per endpoint are kept too, so tests can check when ticks come
//! (their phases). Tests change the
//! answers through [`Gateway`]'s methods: a user's sessions, a project's progress or status code, a delay or a
//! failure per endpoint, the version. The sessions and KG endpoints answer 401 without a bearer token, as Renku's
//! gateway does.
//!
//! For `tabhub demo`, [`Gateway::start_demo_ticker`] makes the default sessions change state every few ticks and
//! the KG activations progress, so that `sessionStatusV2` and `activation` messages arrive on their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};

const NOTEBOOKS_SERVERS: &str = include_str!("../../fixtures/gateway/notebooks_servers.json");
const DATA_SESSIONS: &str = include_str!("../../fixtures/gateway/data_sessions.json");
const GRAPH_STATUS: &str = include_str!("../../fixtures/gateway/graph_status.json");
const UI_VERSION: &str = include_str!("../../fixtures/gateway/ui_version.json");

/// The user of a request without a bearer token.
pub const ANONYMOUS: &str = "anonymous";

/// How many call times are kept per endpoint and user: the first few ticks are what tests look at, and the demo's
/// gateway runs for days, so the record must not grow with every call.
pub const KEPT_CALL_TIMES: usize = 16;

/// The fixture's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /notebooks/servers`
    Sessions,
    /// `GET /data/sessions`
    SessionsV2,
    /// `GET /projects/{id}/graph/status`
    KgStatus,
    /// `GET /ui-version`
    UiVersion,
}

fn fixture(name: &str, text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("fixtures/gateway/{name} is not valid JSON: {e}"))
}

/// `fixtures/gateway/notebooks_servers.json`, by value.
pub fn sessions_fixture() -> Value {
    fixture("notebooks_servers.json", NOTEBOOKS_SERVERS)
}

/// `fixtures/gateway/data_sessions.json`, by value.
pub fn sessions_v2_fixture() -> Value {
    fixture("data_sessions.json", DATA_SESSIONS)
}

/// A project's activation as the fixture answers it.
#[derive(Debug, Clone, Copy)]
struct KgProject {
    /// The HTTP status to answer; 200 gives the progress document.
    status: u16,
    percentage: f64,
    /// Demo ticks spent at 100 %, before the demo starts the activation over.
    done_ticks: u32,
}

#[derive(Default)]
struct Flight {
    now: usize,
    max: usize,
}

struct Inner {
    default_sessions: Value,
    default_sessions_v2: Value,
    sessions: HashMap<String, Value>,
    sessions_v2: HashMap<String, Value>,
    graph_template: Value,
    kg: HashMap<String, KgProject>,
    version: Value,
    delays: HashMap<Endpoint, Duration>,
    failures: HashMap<Endpoint, u16>,
    calls: HashMap<(Endpoint, String), u64>,
    /// When the first [`KEPT_CALL_TIMES`] calls arrived.
    call_times: HashMap<(Endpoint, String), Vec<Instant>>,
    kg_calls: HashMap<String, u64>,
    flights: HashMap<(Endpoint, String), Flight>,
    demo_tick: u64,
}

/// The fixture gateway; clones share one state.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Mutex<Inner>>,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway::new()
    }
}

impl Gateway {
    /// A gateway answering the fixture documents to every user, with no KG project known.
    pub fn new() -> Gateway {
        Gateway {
            inner: Arc::new(Mutex::new(Inner {
                default_sessions: sessions_fixture(),
                default_sessions_v2: sessions_v2_fixture(),
                sessions: HashMap::new(),
                sessions_v2: HashMap::new(),
                graph_template: fixture("graph_status.json", GRAPH_STATUS),
                kg: HashMap::new(),
                version: fixture("ui_version.json", UI_VERSION),
                delays: HashMap::new(),
                failures: HashMap::new(),
                calls: HashMap::new(),
                call_times: HashMap::new(),
                kg_calls: HashMap::new(),
                flights: HashMap::new(),
                demo_tick: 0,
            })),
        }
    }

    /// The demo's gateway: a few KG projects at various stages (`1`-`3` progressing, `4` failing with 403) and the
    /// given UI version.
    pub fn demo(version: &str) -> Gateway {
        let g = Gateway::new();
        g.set_version(version);
        for (id, pct) in [("1", 0.0), ("2", 40.0), ("3", 80.0)] {
            g.set_kg(id, pct);
        }
        g.set_kg_status("4", 403);
        g
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The routes, at the root (nest them to serve under a prefix).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/notebooks/servers", get(sessions))
            .route("/data/sessions", get(sessions_v2))
            .route("/projects/{id}/graph/status", get(graph_status))
            .route("/ui-version", get(ui_version))
            .with_state(self.clone())
    }

    // ---- what tests read ----

    /// Calls to `endpoint` by `user` (a `sub`, or [`ANONYMOUS`]).
    pub fn calls(&self, endpoint: Endpoint, user: &str) -> u64 {
        self.lock()
            .calls
            .get(&(endpoint, user.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// When the first calls (at most [`KEPT_CALL_TIMES`]) of `user` to `endpoint` arrived, in order.
    pub fn call_times(&self, endpoint: Endpoint, user: &str) -> Vec<Instant> {
        self.lock()
            .call_times
            .get(&(endpoint, user.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Calls to `endpoint` by anyone.
    pub fn total_calls(&self, endpoint: Endpoint) -> u64 {
        self.lock()
            .calls
            .iter()
            .filter(|((e, _), _)| *e == endpoint)
            .map(|(_, n)| n)
            .sum()
    }

    /// Status calls for one KG project, by anyone.
    pub fn kg_calls(&self, project: &str) -> u64 {
        self.lock().kg_calls.get(project).copied().unwrap_or(0)
    }

    /// The most calls of `user` to `endpoint` that were in flight at once.
    pub fn max_in_flight(&self, endpoint: Endpoint, user: &str) -> usize {
        self.lock()
            .flights
            .get(&(endpoint, user.to_owned()))
            .map_or(0, |f| f.max)
    }

    // ---- what tests change ----

    /// What `GET /notebooks/servers` answers to `user` (a `sub`) from now on.
    pub fn set_sessions(&self, user: &str, body: Value) {
        self.lock().sessions.insert(user.to_owned(), body);
    }

    /// What `GET /data/sessions` answers to `user` (a `sub`) from now on.
    pub fn set_sessions_v2(&self, user: &str, body: Value) {
        self.lock().sessions_v2.insert(user.to_owned(), body);
    }

    /// Makes `project` known to the KG at `percentage`, answering 200.
    pub fn set_kg(&self, project: &str, percentage: f64) {
        let mut g = self.lock();
        let p = g.kg.entry(project.to_owned()).or_insert(KgProject {
            status: 200,
            percentage: 0.0,
            done_ticks: 0,
        });
        p.status = 200;
        p.percentage = percentage;
    }

    /// Makes `project`'s status endpoint answer `status` (with an error body unless 200).
    pub fn set_kg_status(&self, project: &str, status: u16) {
        let mut g = self.lock();
        g.kg.entry(project.to_owned())
            .or_insert(KgProject {
                status,
                percentage: 0.0,
                done_ticks: 0,
            })
            .status = status;
    }

    /// Delays every answer of `endpoint` (zero: none).
    pub fn set_delay(&self, endpoint: Endpoint, delay: Duration) {
        self.lock().delays.insert(endpoint, delay);
    }

    /// Makes `endpoint` answer `status` (a 5xx, say) to everyone; None: answer normally again.
    pub fn set_failure(&self, endpoint: Endpoint, status: Option<u16>) {
        let mut g = self.lock();
        match status {
            Some(s) => g.failures.insert(endpoint, s),
            None => g.failures.remove(&endpoint),
        };
    }

    /// What `GET /ui-version` answers from now on.
    pub fn set_version(&self, version: &str) {
        self.lock().version["version"] = json!(version);
    }

    // ---- demo ----

    /// One step of the demo: the first session of each default list moves through starting, running, running,
    /// hibernated (a change every tick or two), its resource usage and activity change every tick (volatile: no
    /// message), and each KG activation progresses by 10 %, restarting some ticks after it completed.
    pub fn demo_step(&self) {
        let mut g = self.lock();
        g.demo_tick += 1;
        let tick = g.demo_tick;
        let (state, ready) = match tick % 4 {
            0 => ("starting", 1),
            3 => ("hibernated", 0),
            _ => ("running", 3),
        };
        let usage = (tick % 97) as f64 / 100.0;
        let stamp = format!("2026-01-01T09:{:02}:{:02}Z", (tick / 60) % 60, tick % 60);
        if let Some(first) = g
            .default_sessions
            .get_mut("servers")
            .and_then(Value::as_object_mut)
            .and_then(|m| m.values_mut().next())
        {
            first["status"]["state"] = json!(state);
            first["status"]["readyNumContainers"] = json!(ready);
            first["resources"]["usage"]["cpu"] = json!(usage);
            first["annotations"]["renku.io/lastActivityDate"] = json!(stamp);
        }
        if let Some(first) = g
            .default_sessions_v2
            .as_array_mut()
            .and_then(|a| a.first_mut())
        {
            first["status"]["state"] = json!(state);
            first["status"]["ready_containers"] = json!(ready);
            first["status"]["will_hibernate_at"] = json!(stamp);
            first["resources"]["usage"]["cpu"] = json!(usage);
        }
        for p in g.kg.values_mut().filter(|p| p.status == 200) {
            if p.percentage >= 100.0 {
                p.done_ticks += 1;
                if p.done_ticks >= 10 {
                    p.percentage = 0.0;
                    p.done_ticks = 0;
                }
            } else {
                p.percentage = (p.percentage + 10.0).min(100.0);
            }
        }
    }

    /// Runs [`Gateway::demo_step`] every `period` until the returned task is aborted (or the runtime ends).
    pub fn start_demo_ticker(&self, period: Duration) -> tokio::task::AbortHandle {
        let g = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                every.tick().await;
                g.demo_step();
            }
        })
        .abort_handle()
    }

    // ---- serving ----

    /// Counts the call, notes its time and marks it in flight until the returned guard drops (also when the client gives up and
    /// the server drops the handler).
    fn enter(&self, endpoint: Endpoint, user: &str, project: Option<&str>) -> InFlight {
        let mut g = self.lock();
        *g.calls.entry((endpoint, user.to_owned())).or_default() += 1;
        let times = g.call_times.entry((endpoint, user.to_owned())).or_default();
        if times.len() < KEPT_CALL_TIMES {
            times.push(Instant::now());
        }
        if let Some(p) = project {
            *g.kg_calls.entry(p.to_owned()).or_default() += 1;
        }
        let f = g.flights.entry((endpoint, user.to_owned())).or_default();
        f.now += 1;
        f.max = f.max.max(f.now);
        InFlight {
            gateway: self.clone(),
            key: (endpoint, user.to_owned()),
        }
    }

    /// The configured delay, then the configured failure if any.
    async fn misbehave(&self, endpoint: Endpoint) -> Option<Response> {
        let delay = self.lock().delays.get(&endpoint).copied();
        if let Some(d) = delay.filter(|d| !d.is_zero()) {
            tokio::time::sleep(d).await;
        }
        let failure = self.lock().failures.get(&endpoint).copied();
        failure.map(|s| error(s, "fixture failure"))
    }
}

/// Marks a call in flight while it lives.
struct InFlight {
    gateway: Gateway,
    key: (Endpoint, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(f) = self.gateway.lock().flights.get_mut(&self.key) {
            f.now = f.now.saturating_sub(1);
        }
    }
}

/// The `sub` of the bearer token, read WITHOUT verification (a fixture); None without a bearer token.
fn user_of(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    let token = auth.strip_prefix("Bearer ")?;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_owned)
}

fn error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        Json(json!({"error": {"code": 1000 + status, "message": message}})),
    )
        .into_response()
}

async fn sessions(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    user_sessions(g, headers, Endpoint::Sessions).await
}

async fn sessions_v2(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    user_sessions(g, headers, Endpoint::SessionsV2).await
}

async fn user_sessions(g: Gateway, headers: HeaderMap, endpoint: Endpoint) -> Response {
    let user = user_of(&headers);
    let _flight = g.enter(endpoint, user.as_deref().unwrap_or(ANONYMOUS), None);
    let Some(user) = user else {
        return error(401, "authentication required");
    };
    if let Some(r) = g.misbehave(endpoint).await {
        return r;
    }
    let inner = g.lock();
    let body = if endpoint == Endpoint::Sessions {
        inner.sessions.get(&user).unwrap_or(&inner.default_sessions)
    } else {
        inner
            .sessions_v2
            .get(&user)
            .unwrap_or(&inner.default_sessions_v2)
    };
    Json(body.clone()).into_response()
}

async fn graph_status(
    State(g): State<Gateway>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let user = user_of(&headers);
    let _flight = g.enter(
        Endpoint::KgStatus,
        user.as_deref().unwrap_or(ANONYMOUS),
        Some(&id),
    );
    if user.is_none() {
        return error(401, "authentication required");
    }
    if let Some(r) = g.misbehave(Endpoint::KgStatus).await {
        return r;
    }
    let inner = g.lock();
    let Some(p) = inner.kg.get(&id).copied() else {
        return error(404, "project not found in the knowledge graph");
    };
    if p.status != 200 {
        return error(p.status, "knowledge graph status unavailable");
    }
    let mut body = inner.graph_template.clone();
    let done = (p.percentage / 10.0).floor();
    body["activated"] = json!(p.percentage >= 100.0);
    body["progress"] = json!({"done": done as u64, "total": 10, "percentage": p.percentage});
    body["details"]["status"] = json!(if p.percentage >= 100.0 {
        "success"
    } else {
        "in-progress"
    });
    Json(body).into_response()
}

async fn ui_version(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    let user = user_of(&headers);
    let _flight = g.enter(
        Endpoint::UiVersion,
        user.as_deref().unwrap_or(ANONYMOUS),
        None,
    );
    if let Some(r) = g.misbehave(Endpoint::UiVersion).await {
        return r;
    }
    let body = g.lock().version.clone();
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_are_renku_shaped() {
        let v1 = sessions_fixture();
        let servers = v1["servers"].as_object().expect("servers is a map");
        assert!(servers
            .values()
            .all(|s| s["status"]["state"].is_string() && s["name"].is_string()));
        let v2 = sessions_v2_fixture();
        assert!(v2
            .as_array()
            .expect("a list")
            .iter()
            .all(|s| s["status"]["state"].is_string() && s["project_id"].is_string()));
        assert!(fixture("graph_status.json", GRAPH_STATUS)["progress"]["percentage"].is_number());
        assert!(fixture("ui_version.json", UI_VERSION)["version"].is_string());
    }

    #[test]
    fn demo_step_changes_state_and_progress() {
        let g = Gateway::demo("1.0.0");
        let before = g.lock().default_sessions_v2.clone();
        g.demo_step();
        g.demo_step();
        g.demo_step();
        let inner = g.lock();
        assert_ne!(inner.default_sessions_v2, before);
        assert_eq!(
            inner.default_sessions_v2[0]["status"]["state"],
            "hibernated"
        );
        assert_eq!(inner.kg["1"].percentage, 30.0);
        assert_eq!(inner.kg["3"].percentage, 100.0);
        assert_eq!(inner.kg["4"].status, 403);
    }

    #[test]
    fn reads_sub_without_verifying() {
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!(
            "{}.{}.sig",
            b64(json!({"alg": "RS256"})),
            b64(json!({"sub": "u-1"}))
        );
        let mut h = HeaderMap::new();
        assert_eq!(user_of(&h), None);
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert_eq!(user_of(&h).as_deref(), Some("u-1"));
        h.insert("authorization", "Bearer garbage".parse().unwrap());
        assert_eq!(user_of(&h), None);
    }
}
