//! `tabhub-bench fixtures`: everything tabhub talks to, in one process on loopback.
//!
//! - the fixture realm ([`DevIssuer`], realm `bench`): discovery and the JWKS that verifies the clients' tokens;
//! - the fixture GitLab ([`FixtureGitlab`]): one SSE stream per (user, project), and an emitter that emits
//!   `{"t": <unix ns>}` payloads at a given rate round-robin over the users' projects and types;
//! - a counting gateway (`/gateway/...`, any path, keep-alive): counts calls per user (the token's `sub`, read
//!   without verification) and answers a session list whose state changes on a schedule ([`last_change`]), which
//!   the client processes know too: the notification tabhub sends carries no data, so a tab times a change from
//!   the schedule; `/gateway/projects/{id}/graph/status` answers the KG activation (see [`kg_status`]) and is
//!   counted the same way, and apart;
//! - `/bench/...`: the orchestrator's view (counts, streams) and controls (emit; `hooks`: GitLab-shaped webhook
//!   deliveries posted at a given rate to the tabhub instances in turn, each payload carrying `"t": <unix ns>`).
//!
//! It prints `{"listening": "<addr>"}` on stdout once serving, and exits when its stdin closes (the orchestrator
//! is gone) or after `--max-seconds`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tabhub_fixtures::gitlab::{FixtureGitlab, GitlabOptions};
use tabhub_fixtures::issuer::{ClientSpec, DevIssuer, RealmOptions};
use tabhub_fixtures::webhooks::{self, Sender};

use crate::procs::unix_ns;
use crate::tokens;

#[derive(clap::Args, Debug)]
pub struct FixturesArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Each user's session state at the gateway changes once per period (users spread over it).
    #[arg(long, default_value_t = 10_000)]
    pub change_period_ms: u64,
    #[arg(long, default_value_t = 1_800)]
    pub max_seconds: u64,
}

struct Fx {
    gitlab: Arc<FixtureGitlab>,
    calls: Mutex<HashMap<usize, u64>>,
    calls_total: AtomicU64,
    calls_unknown: AtomicU64,
    kg_calls: AtomicU64,
    epoch_ns: u64,
    period_ns: u64,
    emitted: AtomicU64,
    emitting: AtomicBool,
    /// Webhook deliveries posted, answered 2xx, and failed (non-2xx or no answer).
    hooks_posted: AtomicU64,
    hooks_ok: AtomicU64,
    hooks_failed: AtomicU64,
}

/// When user `u`'s state last changed at or before `now_ns`, and how many changes that makes.
pub fn last_change(epoch_ns: u64, period_ns: u64, user: usize, now_ns: u64) -> (u64, u64) {
    let offset = (user as u64).wrapping_mul(2_654_435_761) % period_ns;
    let start = epoch_ns + offset;
    if now_ns < start {
        return (epoch_ns, 0);
    }
    let k = (now_ns - start) / period_ns;
    (start + k * period_ns, k + 1)
}

pub fn main(a: FixturesArgs) -> ExitCode {
    // The orchestrator gone (stdin closed): exit.
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fixtures: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fixtures: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(a: FixturesArgs) -> Result<(), String> {
    // A deep accept queue: tabhub opens thousands of upstream streams at once (tokio's default backlog is 128).
    let listener = tokio::net::TcpSocket::new_v4()
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(a.listen)?;
            s.listen(4096)
        })
        .map_err(|e| format!("listen {}: {e}", a.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let base = format!("http://{addr}");
    let realm = RealmOptions {
        realm: tokens::REALM.into(),
        clients: vec![ClientSpec::public(tokens::CLIENT_ID, &["*"])],
        users: Vec::new(),
        access_token_lifetime: Duration::from_secs(3600),
        refresh_token_lifetime: Duration::from_secs(3600),
        auto_approve: None,
    };
    let issuer = DevIssuer::new(&base, realm).map_err(|e| e.to_string())?;
    let gitlab = FixtureGitlab::new(GitlabOptions {
        heartbeat_ms: 15_000,
        log_capacity: 16,
    });
    let (epoch_ns, period_ns) = (unix_ns(), a.change_period_ms.max(1) * 1_000_000);
    let fx = Arc::new(Fx {
        gitlab: gitlab.clone(),
        calls: Mutex::new(HashMap::new()),
        calls_total: AtomicU64::new(0),
        calls_unknown: AtomicU64::new(0),
        kg_calls: AtomicU64::new(0),
        epoch_ns,
        period_ns,
        emitted: AtomicU64::new(0),
        emitting: AtomicBool::new(false),
        hooks_posted: AtomicU64::new(0),
        hooks_ok: AtomicU64::new(0),
        hooks_failed: AtomicU64::new(0),
    });
    let bench = Router::new()
        .route("/gateway/projects/{id}/graph/status", get(kg_status))
        .route("/gateway/{*rest}", get(gateway))
        .route("/bench/gateway", get(gateway_counts))
        .route("/bench/streams", get(streams))
        .route("/bench/emit", get(emit_status).post(emit))
        .route("/bench/hooks", get(hooks_status).post(hooks))
        .with_state(fx);
    let router = issuer.router().merge(gitlab.router()).merge(bench);
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{}",
            json!({
                "listening": addr.to_string(),
                "issuer": issuer.issuer(),
                "epoch_ns": epoch_ns,
                "period_ns": period_ns,
            })
        );
        let _ = out.flush();
    }
    let max = Duration::from_secs(a.max_seconds);
    tokio::select! {
        r = axum::serve(listener, router) => r.map_err(|e| e.to_string()),
        _ = tokio::time::sleep(max) => Err("--max-seconds reached".into()),
    }
}

/// Counts a gateway call for the token's user; None (answer 401) when the token names no bench user.
fn count_call(fx: &Fx, headers: &HeaderMap) -> Option<usize> {
    fx.calls_total.fetch_add(1, Ordering::Relaxed);
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    let Some(user) = tokens::bearer_sub(auth).and_then(|s| tokens::user_of_sub(&s)) else {
        fx.calls_unknown.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    *fx.calls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(user)
        .or_default() += 1;
    Some(user)
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"message": "401 Unauthorized"})),
    )
        .into_response()
}

/// A project's KG activation, by its id: a third is refused (403: tabhub reports -2 and drops it), a third is not
/// known yet (404: tabhub keeps polling it), the rest answer a progress that does not move (polled until
/// `kg_stale_after_ms`). An id that is not a number is a 400. The abuse scenario's attacker asks for many of each.
async fn kg_status(
    State(fx): State<Arc<Fx>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    fx.kg_calls.fetch_add(1, Ordering::Relaxed);
    if count_call(&fx, &headers).is_none() {
        return unauthorized();
    }
    let Ok(n) = id.parse::<u64>() else {
        return (StatusCode::BAD_REQUEST, Json(json!({"message": "bad id"}))).into_response();
    };
    match n % 3 {
        0 => (
            StatusCode::FORBIDDEN,
            Json(json!({"message": "403 Forbidden"})),
        )
            .into_response(),
        1 => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "404 Not Found"})),
        )
            .into_response(),
        _ => {
            let pct = (n % 90) as f64;
            Json(json!({"activated": false, "progress": {"done": n % 90, "total": 100, "percentage": pct}}))
                .into_response()
        }
    }
}

async fn gateway(State(fx): State<Arc<Fx>>, headers: HeaderMap) -> Response {
    let Some(user) = count_call(&fx, &headers) else {
        return unauthorized();
    };
    let (changed, generation) = last_change(fx.epoch_ns, fx.period_ns, user, unix_ns());
    Json(json!([{
        "name": format!("bench-session-{user}"),
        "status": {"state": "running", "generation": generation},
        "benchT": changed,
    }]))
    .into_response()
}

#[derive(Deserialize)]
struct Range {
    #[serde(default)]
    from: usize,
    #[serde(default)]
    to: usize,
}

/// Calls so far: the total, and per user of `from..to`.
async fn gateway_counts(State(fx): State<Arc<Fx>>, Query(r): Query<Range>) -> Json<Value> {
    let calls = fx.calls.lock().unwrap_or_else(|p| p.into_inner());
    let per_user: Vec<u64> = (r.from..r.to)
        .map(|u| calls.get(&u).copied().unwrap_or(0))
        .collect();
    Json(json!({
        "total": fx.calls_total.load(Ordering::Relaxed),
        "unattributed": fx.calls_unknown.load(Ordering::Relaxed),
        "kg": fx.kg_calls.load(Ordering::Relaxed),
        "per_user": per_user,
    }))
}

/// Upstream SSE streams of the projects of users `from..to`: open now and ever accepted, per project.
async fn streams(State(fx): State<Arc<Fx>>, Query(r): Query<Range>) -> Json<Value> {
    let (mut open, mut total) = (Vec::new(), Vec::new());
    for u in r.from..r.to {
        let p = tokens::project_of(u);
        open.push(fx.gitlab.open_streams(&p));
        total.push(fx.gitlab.connections_total(&p));
    }
    Json(json!({"open": open, "connections_total": total}))
}

#[derive(Deserialize)]
struct EmitRequest {
    rate: f64,
    seconds: f64,
    users: usize,
    types: Vec<String>,
}

#[derive(Deserialize)]
struct HooksRequest {
    rate: f64,
    seconds: f64,
    users: usize,
    types: Vec<String>,
    /// The receivers (`http://<instance>/hooks/gitlab`), posted to in turn.
    targets: Vec<String>,
    secret: String,
}

async fn hooks_status(State(fx): State<Arc<Fx>>) -> Json<Value> {
    Json(json!({
        "posted": fx.hooks_posted.load(Ordering::Relaxed),
        "ok": fx.hooks_ok.load(Ordering::Relaxed),
        "failed": fx.hooks_failed.load(Ordering::Relaxed),
        "running": fx.emitting.load(Ordering::Relaxed),
    }))
}

/// Starts posting `rate` webhook deliveries per second for `seconds` (GitLab-shaped, with GitLab's headers, see
/// `tabhub_fixtures::webhooks`), round-robin over the users' projects then types, to the targets in turn; each
/// payload gets `"t": <unix ns at post>`. At most 512 requests in flight.
async fn hooks(State(fx): State<Arc<Fx>>, Json(req): Json<HooksRequest>) -> Response {
    if req.users == 0 || req.types.is_empty() || req.rate <= 0.0 || req.targets.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "users, types, targets and rate needed",
        )
            .into_response();
    }
    if fx.emitting.swap(true, Ordering::AcqRel) {
        return (StatusCode::CONFLICT, "already emitting").into_response();
    }
    for c in [&fx.hooks_posted, &fx.hooks_ok, &fx.hooks_failed] {
        c.store(0, Ordering::Relaxed);
    }
    let senders: Vec<Sender> = req
        .targets
        .iter()
        .map(|t| Sender::new(t, &req.secret))
        .collect();
    let projects: Vec<u64> = (0..req.users)
        .map(|u| tokens::project_of(u).parse().unwrap_or(0))
        .collect();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
    tokio::spawn(async move {
        let total = (req.rate * req.seconds).round() as u64;
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut i = 0u64;
        while i < total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * req.rate) as u64).min(total);
            while i < due {
                let u = (i % projects.len() as u64) as usize;
                let ty =
                    &req.types[((i / projects.len() as u64) % req.types.len() as u64) as usize];
                let Some(mut d) = webhooks::payload(ty, projects[u], i) else {
                    fx.hooks_failed.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    continue;
                };
                let sender = senders[(i % senders.len() as u64) as usize].clone();
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let fx = fx.clone();
                tokio::spawn(async move {
                    d.body["t"] = json!(unix_ns());
                    fx.hooks_posted.fetch_add(1, Ordering::Relaxed);
                    match sender.post(&d, Some(&Sender::new_key())).await {
                        Ok(s) if (200..300).contains(&s) => {
                            fx.hooks_ok.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => fx.hooks_failed.fetch_add(1, Ordering::Relaxed),
                    };
                    drop(permit);
                });
                i += 1;
            }
        }
        // Every request answered before the run counts as finished.
        let _ = in_flight.acquire_many(512).await;
        fx.emitting.store(false, Ordering::Release);
    });
    (StatusCode::ACCEPTED, "posting").into_response()
}

async fn emit_status(State(fx): State<Arc<Fx>>) -> Json<Value> {
    Json(json!({
        "emitted": fx.emitted.load(Ordering::Relaxed),
        "running": fx.emitting.load(Ordering::Relaxed),
    }))
}

/// Starts emitting `rate` events per second for `seconds`, round-robin over users then types, each payload
/// `{"t": <unix ns at emit>}`.
async fn emit(State(fx): State<Arc<Fx>>, Json(req): Json<EmitRequest>) -> Response {
    if req.users == 0 || req.types.is_empty() || req.rate <= 0.0 {
        return (StatusCode::BAD_REQUEST, "users, types and rate needed").into_response();
    }
    if fx.emitting.swap(true, Ordering::AcqRel) {
        return (StatusCode::CONFLICT, "already emitting").into_response();
    }
    fx.emitted.store(0, Ordering::Relaxed);
    let projects: Vec<String> = (0..req.users).map(tokens::project_of).collect();
    tokio::spawn(async move {
        let total = (req.rate * req.seconds).round() as u64;
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut i = 0u64;
        while i < total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * req.rate) as u64).min(total);
            while i < due {
                let u = (i % projects.len() as u64) as usize;
                let ty =
                    &req.types[((i / projects.len() as u64) % req.types.len() as u64) as usize];
                fx.gitlab.emit(&projects[u], ty, json!({ "t": unix_ns() }));
                i += 1;
            }
            fx.emitted.store(i, Ordering::Relaxed);
        }
        fx.emitting.store(false, Ordering::Release);
    });
    (StatusCode::ACCEPTED, "emitting").into_response()
}
