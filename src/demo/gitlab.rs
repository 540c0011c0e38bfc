//! A fixture GitLab streaming project events over server-sent events. FOR DEVELOPMENT AND TESTS ONLY: it reads
//! tokens without verifying them.
//!
//! `GET /api/v4/projects/{project}/events/stream?event_types=a,b` answers like a real SSE server: `200` with
//! `Content-Type: text/event-stream`, then frames `id: <n>\nevent: <type>\ndata: <json on one line>\n\n` and a
//! `: heartbeat\n\n` comment every [`GitlabOptions::heartbeat_ms`]. Refusals carry GitLab's error body
//! `{"message": "401 Unauthorized"}`.
//!
//! - `{project}` is the key as axum decodes it: `42` stays `42`, `group%2Fname` becomes `group/name`, so
//!   [`FixtureGitlab::emit`] and the inspection methods take the decoded form.
//! - `event_types` filters by type (absent or empty: every type).
//! - `Authorization: Bearer <jwt>` is required. The payload is decoded, not verified, only to learn `sub` and
//!   attribute connections to users; no header, not a JWT, no `sub`, or a revoked `sub`: `401`.
//! - Ids are per project, start at 1 and are shared by every type, so `Last-Event-ID: n` replays every logged event
//!   after `n` that passes the filter, whatever filter the previous connection had, then goes live. A non-numeric
//!   `Last-Event-ID` replays nothing; only the last [`GitlabOptions::log_capacity`] events are kept.
//!
//! The same server serves `tabhub demo` ([`FixtureGitlab::start_demo_ticker`]) and the integration tests, which
//! make it misbehave: [`FixtureGitlab::fail_next`], [`FixtureGitlab::revoke_token_of`],
//! [`FixtureGitlab::drop_streams`], [`FixtureGitlab::stall_streams`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// The demo payloads, one `{"event_type": ..., "payload": ...}` per line.
const DEMO_EVENTS: &str = include_str!("../../fixtures/gitlab/events.jsonl");

/// Frames queued for one stream. A client that lets this many pile up is too slow: its stream is dropped rather
/// than letting [`FixtureGitlab::emit`] wait or the fixture's memory grow (it can resume with `Last-Event-ID`).
const STREAM_QUEUE: usize = 256;

const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// The fixture's knobs.
#[derive(Clone, Debug)]
pub struct GitlabOptions {
    /// Period of the `: heartbeat` comment on every open stream; 0: no heartbeats.
    pub heartbeat_ms: u64,
    /// Events kept per project for `Last-Event-ID` replays.
    pub log_capacity: usize,
}

impl Default for GitlabOptions {
    fn default() -> Self {
        GitlabOptions {
            heartbeat_ms: 15_000,
            log_capacity: 1000,
        }
    }
}

/// One request for a project's stream, as received, with the status it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamRequest {
    /// The token's `sub`, when the token decodes as a JWT carrying one.
    pub sub: Option<String>,
    /// The bearer token, when an `Authorization: Bearer` header was sent.
    pub token: Option<String>,
    /// The `Last-Event-ID` header, verbatim.
    pub last_event_id: Option<String>,
    /// The `event_types` filter; empty: every type.
    pub event_types: Vec<String>,
    pub status: u16,
}

/// The fixture GitLab. Every method is synchronous and cheap, safe to call from tests and handlers alike.
pub struct FixtureGitlab {
    opts: GitlabOptions,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    projects: HashMap<String, Project>,
    revoked: HashSet<String>,
    last_stream: u64,
}

#[derive(Default)]
struct Project {
    /// The last id given; the next event gets the one after.
    last_id: u64,
    log: VecDeque<Logged>,
    /// Open streams by stream number. An entry leaves when its body is dropped (client gone) or when the fixture
    /// ends the stream ([`FixtureGitlab::drop_streams`], overflow).
    streams: HashMap<u64, OpenStream>,
    connections_total: usize,
    requests: Vec<StreamRequest>,
    /// [`FixtureGitlab::fail_next`]: (status, requests left to fail).
    failing: Option<(u16, usize)>,
}

struct Logged {
    id: u64,
    event_type: String,
    frame: Bytes,
}

struct OpenStream {
    event_types: Vec<String>,
    frames: mpsc::Sender<Bytes>,
    mode: watch::Sender<Mode>,
}

/// What a stream's body does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Live,
    /// Sends nothing at all, discarding its frames, but stays open.
    Stalled,
    /// Ends abruptly: the body fails, so the connection is cut without the final chunk.
    Dropped,
}

impl FixtureGitlab {
    pub fn new(opts: GitlabOptions) -> Arc<Self> {
        Arc::new(FixtureGitlab {
            opts,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The stream route, `GET /api/v4/projects/{project}/events/stream`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/api/v4/projects/{project}/events/stream", get(stream))
            .with_state(self.clone())
    }

    /// Logs an event on `project` and sends it to the project's open streams whose filter takes `event_type`.
    /// Returns its id. Never waits: a stream whose queue is full is dropped.
    pub fn emit(&self, project: &str, event_type: &str, payload: Value) -> u64 {
        // A line break in the type would split the frame; `payload`'s JSON text never has one.
        let event_type: String = event_type
            .chars()
            .filter(|c| *c != '\n' && *c != '\r')
            .collect();
        let mut inner = self.lock();
        let p = inner.projects.entry(project.to_owned()).or_default();
        p.last_id += 1;
        let id = p.last_id;
        let frame = Bytes::from(format!(
            "id: {id}\nevent: {event_type}\ndata: {payload}\n\n"
        ));
        p.streams.retain(|_, s| {
            if !wants(&s.event_types, &event_type) {
                return true;
            }
            match s.frames.try_send(frame.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.mode.send_replace(Mode::Dropped);
                    false
                }
                // The body is gone; its guard is about to remove it.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        p.log.push_back(Logged {
            id,
            event_type,
            frame,
        });
        while p.log.len() > self.opts.log_capacity {
            p.log.pop_front();
        }
        id
    }

    /// Streams of `project` open now (not yet closed by the client nor ended by the fixture).
    pub fn open_streams(&self, project: &str) -> usize {
        self.lock()
            .projects
            .get(project)
            .map_or(0, |p| p.streams.len())
    }

    /// Streams of `project` ever accepted (answered 200).
    pub fn connections_total(&self, project: &str) -> usize {
        self.lock()
            .projects
            .get(project)
            .map_or(0, |p| p.connections_total)
    }

    /// Every request for `project`'s stream, refused ones included, in arrival order.
    pub fn requests(&self, project: &str) -> Vec<StreamRequest> {
        self.lock()
            .projects
            .get(project)
            .map(|p| p.requests.clone())
            .unwrap_or_default()
    }

    /// The next `times` requests for `project` get `status` with a GitLab-shaped error body, before any other
    /// check (like a proxy in front of a failing GitLab). Replaces a previous call; `times` 0 cancels. A `429` also
    /// gets `Retry-After: 1`.
    pub fn fail_next(&self, project: &str, status: u16, times: usize) {
        let mut inner = self.lock();
        let p = inner.projects.entry(project.to_owned()).or_default();
        p.failing = (times > 0).then_some((status, times));
    }

    /// New requests with a token whose `sub` is `sub` get 401. Open streams are left alone, as a real server
    /// checks the token only when the stream opens.
    pub fn revoke_token_of(&self, sub: &str) {
        self.lock().revoked.insert(sub.to_owned());
    }

    /// Undoes [`FixtureGitlab::revoke_token_of`].
    pub fn unrevoke(&self, sub: &str) {
        self.lock().revoked.remove(sub);
    }

    /// Cuts every open stream of `project` mid-stream: the body fails, so the client sees the connection end
    /// without the final chunk. They no longer count in [`FixtureGitlab::open_streams`] once this returns.
    pub fn drop_streams(&self, project: &str) {
        if let Some(p) = self.lock().projects.get_mut(project) {
            for (_, s) in p.streams.drain() {
                s.mode.send_replace(Mode::Dropped);
            }
        }
    }

    /// The open streams of `project` stop sending anything (no heartbeats, no events) but stay open until the
    /// client leaves or [`FixtureGitlab::drop_streams`]. Streams opened afterwards are normal.
    pub fn stall_streams(&self, project: &str) {
        if let Some(p) = self.lock().projects.get(project) {
            for s in p.streams.values() {
                s.mode.send_if_modified(|m| {
                    let live = *m == Mode::Live;
                    if live {
                        *m = Mode::Stalled;
                    }
                    live
                });
            }
        }
    }

    /// Spawns a task (call within a tokio runtime) that, every 1 to 2 s, emits the next payload of
    /// `fixtures/gitlab/events.jsonl` (cycling) on a random project of `projects`. It ends with the fixture.
    pub fn start_demo_ticker(self: &Arc<Self>, projects: &[&str]) {
        let projects: Vec<String> = projects.iter().map(|p| (*p).to_owned()).collect();
        let events = demo_events();
        if projects.is_empty() || events.is_empty() {
            return;
        }
        let gitlab = Arc::downgrade(self);
        tokio::spawn(async move {
            for (event_type, payload) in events.iter().cycle() {
                let (delay_ms, pick) = {
                    let mut rng = rand::thread_rng();
                    (rng.gen_range(1000..=2000), rng.gen_range(0..projects.len()))
                };
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let Some(gitlab) = gitlab.upgrade() else {
                    return;
                };
                gitlab.emit(&projects[pick], event_type, payload.clone());
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent across a panic elsewhere (no section leaves it half-updated).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides on a request, and for an accepted one registers its stream and builds its body.
    fn open(
        self: &Arc<Self>,
        project: String,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Response {
        let token = bearer(headers);
        let mut request = StreamRequest {
            sub: token.as_deref().and_then(jwt_sub),
            token,
            last_event_id: headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            event_types: event_types(query),
            status: 200,
        };
        let mut guard = self.lock();
        let Inner {
            projects,
            revoked,
            last_stream,
        } = &mut *guard;
        let p = projects.entry(project.clone()).or_default();
        let refusal = if let Some((status, left)) = p.failing {
            p.failing = (left > 1).then_some((status, left - 1));
            Some(status)
        } else if request.sub.as_ref().is_none_or(|s| revoked.contains(s)) {
            Some(401)
        } else {
            None
        };
        if let Some(status) = refusal {
            request.status = status;
            p.requests.push(request);
            drop(guard);
            return gitlab_error(status);
        }
        // Under the lock, so no event falls between the replay and the live frames.
        let after = request
            .last_event_id
            .as_deref()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let replay: VecDeque<Bytes> = after.map_or_else(VecDeque::new, |after| {
            p.log
                .iter()
                .filter(|e| e.id > after && wants(&request.event_types, &e.event_type))
                .map(|e| e.frame.clone())
                .collect()
        });
        let (frames, rx) = mpsc::channel(STREAM_QUEUE);
        let (mode, mode_rx) = watch::channel(Mode::Live);
        *last_stream += 1;
        let id = *last_stream;
        p.streams.insert(
            id,
            OpenStream {
                event_types: request.event_types.clone(),
                frames,
                mode,
            },
        );
        p.connections_total += 1;
        p.requests.push(request);
        drop(guard);

        let heartbeat = (self.opts.heartbeat_ms > 0).then(|| {
            let period = Duration::from_millis(self.opts.heartbeat_ms);
            let mut i = tokio::time::interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        let feed = Feed {
            replay,
            frames: rx,
            mode: mode_rx,
            heartbeat,
            _open: OpenGuard {
                gitlab: Arc::downgrade(self),
                project,
                id,
            },
        };
        let chunks = futures_util::stream::unfold(Some(feed), |feed| async move {
            let mut feed = feed?;
            match feed.next().await {
                Ok(chunk) => Some((Ok(chunk), Some(feed))),
                // The state, and so the guard, goes now; the stream then ends.
                Err(e) => Some((Err(e), None)),
            }
        });
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            axum::body::Body::from_stream(chunks),
        )
            .into_response()
    }
}

async fn stream(
    State(gitlab): State<Arc<FixtureGitlab>>,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    gitlab.open(project, query.as_deref(), &headers)
}

/// The state of one open stream's body.
struct Feed {
    /// Logged events after `Last-Event-ID`, sent before any live frame.
    replay: VecDeque<Bytes>,
    frames: mpsc::Receiver<Bytes>,
    mode: watch::Receiver<Mode>,
    heartbeat: Option<Interval>,
    _open: OpenGuard,
}

impl Feed {
    /// The next chunk to write; an error cuts the connection.
    async fn next(&mut self) -> io::Result<Bytes> {
        loop {
            let mode = *self.mode.borrow_and_update();
            match mode {
                Mode::Dropped => return Err(cut("stream dropped by the fixture")),
                Mode::Stalled => {
                    tokio::select! {
                        changed = self.mode.changed() => {
                            if changed.is_err() {
                                return Err(cut("fixture gone"));
                            }
                        }
                        // Discarded, so that the queue never fills and drops the stream.
                        frame = self.frames.recv() => {
                            if frame.is_none() {
                                return Err(cut("fixture gone"));
                            }
                        }
                    }
                }
                Mode::Live => {
                    if let Some(frame) = self.replay.pop_front() {
                        return Ok(frame);
                    }
                    tokio::select! {
                        biased;
                        changed = self.mode.changed() => {
                            if changed.is_err() {
                                return Err(cut("fixture gone"));
                            }
                        }
                        frame = self.frames.recv() => {
                            return frame.ok_or_else(|| cut("fixture gone"));
                        }
                        () = tick(&mut self.heartbeat) => return Ok(Bytes::from_static(HEARTBEAT)),
                    }
                }
            }
        }
    }
}

async fn tick(heartbeat: &mut Option<Interval>) {
    match heartbeat {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn cut(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, why)
}

/// Removes its stream from the open ones when the body is dropped: the client left, or the stream ended.
struct OpenGuard {
    gitlab: Weak<FixtureGitlab>,
    project: String,
    id: u64,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some(gitlab) = self.gitlab.upgrade() {
            if let Some(p) = gitlab.lock().projects.get_mut(&self.project) {
                p.streams.remove(&self.id);
            }
        }
    }
}

fn wants(event_types: &[String], event_type: &str) -> bool {
    event_types.is_empty() || event_types.iter().any(|t| t == event_type)
}

/// `event_types=a,b` from the query string; absent or empty: no filter.
fn event_types(query: Option<&str>) -> Vec<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == "event_types")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The `sub` claim of a JWT, read WITHOUT verifying the signature.
fn jwt_sub(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    Some(claims.get("sub")?.as_str()?.to_owned())
}

/// GitLab's error body: `{"message": "<code> <reason>"}`.
fn gitlab_error(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let mut response = (status, Json(json!({ "message": message }))).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The demo payloads as (event type, payload); lines that do not parse are skipped.
fn demo_events() -> Vec<(String, Value)> {
    DEMO_EVENTS
        .lines()
        .filter_map(|line| {
            let mut v: Value = serde_json::from_str(line).ok()?;
            let event_type = v.get("event_type")?.as_str()?.to_owned();
            Some((event_type, v.get_mut("payload")?.take()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures_util::{Stream, StreamExt};

    use super::*;

    const P: &str = "42";
    const WAIT: Duration = Duration::from_secs(5);

    async fn serve(gitlab: &Arc<FixtureGitlab>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let app = gitlab.router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }

    fn fixture(heartbeat_ms: u64) -> Arc<FixtureGitlab> {
        FixtureGitlab::new(GitlabOptions {
            heartbeat_ms,
            ..GitlabOptions::default()
        })
    }

    /// An unsigned token: the fixture reads it without verifying.
    fn token(sub: &str) -> String {
        let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            part(json!({"alg": "RS256", "typ": "JWT"})),
            part(json!({"sub": sub, "typ": "Bearer"}))
        )
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    }

    async fn get(
        base: &str,
        project: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = client().get(format!(
            "{base}/api/v4/projects/{project}/events/stream{query}"
        ));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        tokio::time::timeout(WAIT, req.send())
            .await
            .expect("response in time")
            .expect("response")
    }

    async fn open(base: &str, query: &str, last_event_id: Option<&str>) -> Sse {
        let auth = format!("Bearer {}", token("alice"));
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(id) = last_event_id {
            headers.push(("last-event-id", id));
        }
        let r = get(base, P, query, &headers).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Sse {
            body: Box::pin(r.bytes_stream()),
            buf: Vec::new(),
        }
    }

    /// A raw SSE body, read block by block.
    struct Sse {
        body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
        buf: Vec<u8>,
    }

    impl Sse {
        /// The next blank-line-terminated block, terminator included.
        async fn block(&mut self) -> String {
            loop {
                if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                    return String::from_utf8(block).expect("utf-8");
                }
                let chunk = tokio::time::timeout(WAIT, self.body.next())
                    .await
                    .expect("a block in time")
                    .expect("body still open")
                    .expect("body readable");
                self.buf.extend_from_slice(&chunk);
            }
        }

        /// The next event block, skipping heartbeats.
        async fn event(&mut self) -> String {
            loop {
                let b = self.block().await;
                if b != ": heartbeat\n\n" {
                    return b;
                }
            }
        }

        /// Whatever arrives within `d`: `None` if nothing, `Some(None)` if the body ended (or failed).
        async fn within(&mut self, d: Duration) -> Option<Option<Bytes>> {
            match tokio::time::timeout(d, self.body.next()).await {
                Err(_) => None,
                Ok(Some(Ok(b))) => Some(Some(b)),
                Ok(_) => Some(None),
            }
        }
    }

    impl Sse {
        /// The body fails (the connection is cut without the final chunk), after at most a few chunks already
        /// on the wire.
        async fn assert_cut(&mut self) {
            for _ in 0..100 {
                match tokio::time::timeout(WAIT, self.body.next()).await {
                    Err(_) => panic!("body still open"),
                    Ok(None) => panic!("body ended cleanly, not cut"),
                    Ok(Some(Err(_))) => return,
                    Ok(Some(Ok(_))) => {}
                }
            }
            panic!("body never cut");
        }
    }

    fn id_of(block: &str) -> u64 {
        block
            .strip_prefix("id: ")
            .and_then(|r| r.split('\n').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no id in {block:?}"))
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn frames_are_exact() {
        let g = fixture(0);
        let base = serve(&g).await;
        let mut s = open(&base, "", None).await;
        assert_eq!(g.open_streams(P), 1);
        let payload = json!({"object_kind": "push", "message": "two\nlines"});
        assert_eq!(g.emit(P, "push", payload), 1);
        assert_eq!(g.emit(P, "issue", json!({"iid": 7})), 2);
        assert_eq!(
            s.block().await,
            "id: 1\nevent: push\ndata: {\"message\":\"two\\nlines\",\"object_kind\":\"push\"}\n\n"
        );
        assert_eq!(
            s.block().await,
            "id: 2\nevent: issue\ndata: {\"iid\":7}\n\n"
        );
        assert_eq!(g.emit("other", "push", json!({})), 1, "ids are per project");
        assert_eq!(g.connections_total(P), 1);
        let reqs = g.requests(P);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].sub.as_deref(), Some("alice"));
        assert_eq!(reqs[0].status, 200);
    }

    #[tokio::test]
    async fn an_encoded_project_path_is_keyed_decoded() {
        let g = fixture(0);
        let base = serve(&g).await;
        let auth = format!("Bearer {}", token("alice"));
        let r = get(&base, "group%2Fname", "", &[("authorization", &auth)]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(g.open_streams("group/name"), 1);
        let mut s = Sse {
            body: Box::pin(r.bytes_stream()),
            buf: Vec::new(),
        };
        g.emit("group/name", "push", json!({}));
        assert_eq!(id_of(&s.block().await), 1);
    }

    #[tokio::test]
    async fn filter_keeps_the_asked_types() {
        let g = fixture(0);
        let base = serve(&g).await;
        let mut s = open(&base, "?event_types=push,issue", None).await;
        assert_eq!(g.requests(P)[0].event_types, ["push", "issue"]);
        for t in [
            "pipeline",
            "push",
            "merge_request",
            "issue",
            "pipeline",
            "push",
        ] {
            g.emit(P, t, json!({}));
        }
        assert_eq!(s.block().await, "id: 2\nevent: push\ndata: {}\n\n");
        assert_eq!(s.block().await, "id: 4\nevent: issue\ndata: {}\n\n");
        assert_eq!(s.block().await, "id: 6\nevent: push\ndata: {}\n\n");

        let mut all = open(&base, "?event_types=", None).await;
        g.emit(P, "pipeline", json!({}));
        assert_eq!(id_of(&all.block().await), 7, "empty filter: every type");
    }

    #[tokio::test]
    async fn last_event_id_replays_exactly_the_missed_events() {
        let g = fixture(0);
        let base = serve(&g).await;
        for t in ["push", "pipeline", "push", "issue", "push"] {
            g.emit(P, t, json!({}));
        }
        let mut s = open(&base, "", Some("2")).await;
        assert_eq!(id_of(&s.block().await), 3);
        assert_eq!(id_of(&s.block().await), 4);
        assert_eq!(id_of(&s.block().await), 5);
        g.emit(P, "pipeline", json!({}));
        assert_eq!(id_of(&s.block().await), 6, "then live");

        // Across a filter change: only the asked type, after the id.
        let mut pushes = open(&base, "?event_types=push", Some("1")).await;
        assert_eq!(id_of(&pushes.block().await), 3);
        assert_eq!(id_of(&pushes.block().await), 5);
        g.emit(P, "push", json!({}));
        assert_eq!(id_of(&pushes.block().await), 7);

        // Only the last `log_capacity` events are kept.
        let small = FixtureGitlab::new(GitlabOptions {
            heartbeat_ms: 0,
            log_capacity: 2,
        });
        let base = serve(&small).await;
        for _ in 0..4 {
            small.emit(P, "push", json!({}));
        }
        let mut s = open(&base, "", Some("0")).await;
        assert_eq!(id_of(&s.block().await), 3);
        assert_eq!(id_of(&s.block().await), 4);
    }

    #[tokio::test]
    async fn heartbeats_arrive() {
        let g = fixture(50);
        let base = serve(&g).await;
        let mut s = open(&base, "", None).await;
        assert_eq!(s.block().await, ": heartbeat\n\n");
        assert_eq!(s.block().await, ": heartbeat\n\n");
        g.emit(P, "push", json!({}));
        assert_eq!(id_of(&s.event().await), 1);
    }

    #[tokio::test]
    async fn fail_next_fails_then_recovers() {
        let g = fixture(0);
        let base = serve(&g).await;
        g.fail_next(P, 503, 2);
        let auth = format!("Bearer {}", token("alice"));
        for _ in 0..2 {
            let r = get(&base, P, "", &[("authorization", &auth)]).await;
            assert_eq!(r.status(), 503);
            assert_eq!(
                r.json::<Value>().await.expect("json"),
                json!({"message": "503 Service Unavailable"})
            );
        }
        let r = get(&base, P, "", &[("authorization", &auth)]).await;
        assert_eq!(r.status(), 200);
        let statuses: Vec<u16> = g.requests(P).iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 503, 200]);
        assert_eq!(g.connections_total(P), 1);

        g.fail_next(P, 429, 1);
        let r = get(&base, P, "", &[("authorization", &auth)]).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
    }

    #[tokio::test]
    async fn unauthorized_without_token_bad_token_or_revoked_sub() {
        let g = fixture(0);
        let base = serve(&g).await;
        let r = get(&base, P, "", &[]).await;
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.json::<Value>().await.expect("json"),
            json!({"message": "401 Unauthorized"})
        );
        let r = get(&base, P, "", &[("authorization", "Bearer not-a-jwt")]).await;
        assert_eq!(r.status(), 401);
        let r = get(&base, P, "", &[("authorization", "Bearer a.%%%.c")]).await;
        assert_eq!(r.status(), 401);

        let bob = format!("Bearer {}", token("bob"));
        g.revoke_token_of("bob");
        let r = get(&base, P, "", &[("authorization", &bob)]).await;
        assert_eq!(r.status(), 401);
        let alice = format!("Bearer {}", token("alice"));
        let r = get(&base, P, "", &[("authorization", &alice)]).await;
        assert_eq!(r.status(), 200);
        g.unrevoke("bob");
        let r2 = get(&base, P, "", &[("authorization", &bob)]).await;
        assert_eq!(r2.status(), 200);

        let reqs = g.requests(P);
        let seen: Vec<(Option<&str>, u16)> =
            reqs.iter().map(|r| (r.sub.as_deref(), r.status)).collect();
        assert_eq!(
            seen,
            [
                (None, 401),
                (None, 401),
                (None, 401),
                (Some("bob"), 401),
                (Some("alice"), 200),
                (Some("bob"), 200)
            ]
        );
        assert_eq!(reqs[1].token.as_deref(), Some("not-a-jwt"));
        assert_eq!(g.connections_total(P), 2);
        drop((r, r2));
    }

    #[tokio::test]
    async fn drop_streams_cuts_the_body() {
        let g = fixture(50);
        let base = serve(&g).await;
        let mut s = open(&base, "", None).await;
        g.emit(P, "push", json!({}));
        assert_eq!(id_of(&s.event().await), 1);
        g.drop_streams(P);
        assert_eq!(g.open_streams(P), 0);
        s.assert_cut().await;
        // New connections are normal.
        let mut s = open(&base, "", Some("1")).await;
        g.emit(P, "push", json!({}));
        assert_eq!(id_of(&s.event().await), 2);
        assert_eq!(g.connections_total(P), 2);
    }

    #[tokio::test]
    async fn stall_streams_silences_but_keeps_open() {
        let g = fixture(50);
        let base = serve(&g).await;
        let mut s = open(&base, "", None).await;
        assert_eq!(s.block().await, ": heartbeat\n\n");
        g.stall_streams(P);
        // At most what was already on the wire, then silence.
        let mut late = 0;
        while let Some(chunk) = s.within(Duration::from_millis(300)).await {
            assert!(chunk.is_some(), "a stalled stream stays open");
            late += 1;
            assert!(late < 3, "still sending after stall");
        }
        g.emit(P, "push", json!({}));
        assert_eq!(s.within(Duration::from_millis(500)).await, None);
        assert_eq!(g.open_streams(P), 1);

        // New connections are normal.
        let mut fresh = open(&base, "", None).await;
        assert_eq!(fresh.block().await, ": heartbeat\n\n");
        g.emit(P, "issue", json!({}));
        assert_eq!(id_of(&fresh.event().await), 2);
        assert_eq!(g.open_streams(P), 2);
        assert_eq!(s.within(Duration::from_millis(200)).await, None);
    }

    #[tokio::test]
    async fn open_streams_drops_to_zero_when_the_client_leaves() {
        // No heartbeats: the server must notice the disconnect without writing.
        let g = fixture(0);
        let base = serve(&g).await;
        let a = open(&base, "", None).await;
        let b = open(&base, "", None).await;
        assert_eq!(g.open_streams(P), 2);
        drop(a);
        eventually("one stream closed", || g.open_streams(P) == 1).await;
        drop(b);
        eventually("no stream open", || g.open_streams(P) == 0).await;
        assert_eq!(g.connections_total(P), 2);
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_stream_without_blocking_emit() {
        let g = fixture(0);
        let base = serve(&g).await;
        let mut s = open(&base, "", None).await;
        // The test's runtime has one thread: the body cannot drain while this loop runs.
        for _ in 0..=STREAM_QUEUE {
            g.emit(P, "push", json!({}));
        }
        assert_eq!(g.open_streams(P), 0);
        s.assert_cut().await;
        // The log still has everything for a resume.
        let mut s = open(&base, "", Some("256")).await;
        assert_eq!(id_of(&s.block().await), 257);
    }

    #[test]
    fn demo_events_all_parse() {
        let events = demo_events();
        assert_eq!(events.len(), DEMO_EVENTS.lines().count());
        for t in ["pipeline", "push", "merge_request", "issue"] {
            assert!(events.iter().any(|(e, _)| e == t), "no {t} event");
        }
        assert!(events.iter().all(|(_, p)| p.is_object()));
    }

    #[tokio::test]
    async fn demo_ticker_emits_on_the_given_projects() {
        let g = fixture(0);
        g.start_demo_ticker(&["demo/notebooks", "7"]);
        let n = |p: &str| g.lock().projects.get(p).map_or(0, |p| p.last_id);
        eventually("a demo event", || n("demo/notebooks") + n("7") >= 1).await;
        assert!(g.lock().projects.len() <= 2, "only the given projects");
    }

    #[test]
    fn tokens_and_queries_parse() {
        assert_eq!(jwt_sub(&token("alice")).as_deref(), Some("alice"));
        assert_eq!(jwt_sub("a.b"), None);
        assert_eq!(jwt_sub("a.b.c.d"), None);
        let no_sub = format!("x.{}.y", URL_SAFE_NO_PAD.encode(r#"{"iss":"x"}"#));
        assert_eq!(jwt_sub(&no_sub), None);
        assert_eq!(event_types(None), Vec::<String>::new());
        assert_eq!(
            event_types(Some("event_types=a%2Cb,,c&x=1")),
            ["a", "b", "c"]
        );
    }
}
