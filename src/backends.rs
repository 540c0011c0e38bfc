//! Calls to backends on behalf of users (loop functions), and shared anonymous fetches.
//!
//! One HTTP client with a keep-alive pool serves every user. A call *fails* (for backoff) on a 502, 503, 504, a
//! timeout or a network error. Such a failure may mean the backend is down, or only that one resource is slow or
//! broken: one user's knowledge-graph project that never answers in time says nothing about the backend, and must
//! cost the other users nothing. Who fails tells the two apart:
//!
//! - **Per call** (backend, user, path): every failure backs off that user's calls to that path (exponential,
//!   `backend.backoff_*`, full jitter, reset by a success). Other users, and the user's other paths, are not
//!   affected. Only failing calls are kept, in a bounded map ([`MAX_CALL_BACKOFFS`] entries, each forgotten after
//!   twice `backend.backoff_max_ms` without a call): paths an attacker chooses cannot grow it.
//! - **Per backend** (an outage): the backend is left alone by everyone only when, among the last distinct users
//!   who called it within `backend.outage_window_ms` (at most [`RECENT_USERS`], or twice the minimum below), at
//!   least `backend.outage_min_users` saw their latest call fail and they outnumber those whose latest call
//!   succeeded. One user counts once, however many paths or failures: no single user (nor a few accounts among
//!   many healthy users) can open it. The backend's backoff grows the same way and any success resets it.
//!
//! A 401 is retried once with the session's newest token. A path must start with `/` and have no dot segment (`.`
//! or `..`, percent-encoded or not, `\` counting as `/`) nor empty segment: URL parsers resolve `%2e%2e` to `..`,
//! so an id such as `%2e%2e` in a path would otherwise make a call leave its backend's base path. The URL built is
//! checked to be under the base too, before any request.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tabhub_commands::{BackendError, BackendResponse};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::metrics::Metrics;

/// Largest backend body read (a larger one is an error, not an unbounded allocation).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Most (backend, user, path) backoffs kept at once. Beyond, the least used are forgotten (their next call goes
/// out at once): the bound holds whatever paths are asked for.
pub const MAX_CALL_BACKOFFS: u64 = 10_000;

/// How many distinct recent users of a backend decide whether it is down (at least twice
/// `backend.outage_min_users`).
pub const RECENT_USERS: usize = 16;

/// Where a call as the user gets its bearer token, and who the user is: the session implements it. Asked again
/// after a 401, so that a token renewed meanwhile is used at once.
pub trait TokenSource: Send + Sync {
    /// The newest token that has not expired, if any.
    fn bearer(&self) -> Option<Arc<str>>;
    /// The user's id (`sub`): whose calls back off, and who counts once towards a backend's outage.
    fn caller(&self) -> &str;
}

/// One backoff: its growing delay and when calls may resume.
struct Breaker {
    backoff: Backoff,
    until: Option<Instant>,
}

impl Breaker {
    fn new(initial: Duration, max: Duration) -> Breaker {
        Breaker {
            backoff: Backoff::new(initial, max),
            until: None,
        }
    }

    /// The time left, when backing off.
    fn left(&self, now: Instant) -> Option<Duration> {
        self.until.filter(|u| *u > now).map(|u| u - now)
    }

    fn fail(&mut self, now: Instant) {
        self.until = Some(now + self.backoff.next_delay());
    }

    fn reset(&mut self) {
        self.backoff.reset();
        self.until = None;
    }
}

/// One backend's outage detector.
struct BackendState {
    breaker: Breaker,
    /// The latest outcome of each of the last distinct users who called, oldest first: (user, failed, when).
    recent: VecDeque<(String, bool, Instant)>,
}

/// The rule that tells an outage from one user's trouble (see the module documentation).
struct OutageRule {
    min_users: usize,
    window: Duration,
    recent: usize,
}

impl OutageRule {
    /// Notes `user`'s latest outcome; true when the backend is down by the rule.
    fn note(&self, s: &mut BackendState, user: &str, failed: bool, now: Instant) -> bool {
        s.recent
            .retain(|(u, _, at)| u != user && now.duration_since(*at) < self.window);
        s.recent.push_back((user.to_owned(), failed, now));
        while s.recent.len() > self.recent {
            s.recent.pop_front();
        }
        let failing = s.recent.iter().filter(|(_, f, _)| *f).count();
        failing >= self.min_users && failing > s.recent.len() - failing
    }
}

type CallKey = (String, String, String);

pub struct Backends {
    http: reqwest::Client,
    bases: BTreeMap<String, String>,
    state: Mutex<HashMap<String, BackendState>>,
    calls: moka::sync::Cache<CallKey, Arc<Mutex<Breaker>>>,
    rule: OutageRule,
    initial: Duration,
    max: Duration,
    shared: moka::future::Cache<String, BackendResponse>,
    metrics: Arc<Metrics>,
}

/// The configured backends, plus `gitlab` = `gitlab.url` unless `[backends]` names it: where the webhook source's
/// access checks go by default.
fn bases(config: &Config) -> BTreeMap<String, String> {
    let mut bases = config.backends.clone();
    if !config.gitlab.url.is_empty() {
        bases
            .entry("gitlab".into())
            .or_insert_with(|| config.gitlab.url.clone());
    }
    bases
}

impl Backends {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Backends, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.backend.timeout_ms))
            .pool_max_idle_per_host(config.backend.pool_max_idle_per_host)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let b = &config.backend;
        let min_users = b.outage_min_users.max(1) as usize;
        Ok(Backends {
            http,
            bases: bases(config),
            state: Mutex::new(HashMap::new()),
            calls: moka::sync::Cache::builder()
                .max_capacity(MAX_CALL_BACKOFFS)
                .time_to_idle(Duration::from_millis(
                    b.backoff_max_ms.saturating_mul(2).max(1),
                ))
                .build(),
            rule: OutageRule {
                min_users,
                window: Duration::from_millis(b.outage_window_ms),
                recent: RECENT_USERS.max(2 * min_users),
            },
            initial: Duration::from_millis(b.backoff_initial_ms),
            max: Duration::from_millis(b.backoff_max_ms),
            shared: moka::future::Cache::builder()
                .max_capacity(64)
                .time_to_live(Duration::from_millis(config.session.long_interval_ms))
                .build(),
            metrics,
        })
    }

    /// The shared HTTP client (keep-alive pool).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET {base}{path}` with the session's newest token; one retry on 401 if a newer token arrived meanwhile.
    /// A path that could leave the base is refused ([`BackendError::InvalidPath`]) before anything else.
    pub async fn get_as_user(
        &self,
        backend: &str,
        path: &str,
        tokens: &dyn TokenSource,
    ) -> Result<BackendResponse, BackendError> {
        let base = self
            .bases
            .get(backend)
            .ok_or_else(|| BackendError::Unconfigured(backend.to_owned()))?;
        let url = under_base(base, path).ok_or(BackendError::InvalidPath)?;
        let key: CallKey = (
            backend.to_owned(),
            tokens.caller().to_owned(),
            path.to_owned(),
        );
        self.check_backoff(&key)?;
        let mut token = tokens.bearer().ok_or(BackendError::NoToken)?;
        let mut retried = false;
        loop {
            let result = self.fetch(url.clone(), Some(&token)).await;
            self.record(&key, &result);
            match result {
                Ok(r) if r.status == 401 => {
                    let newest = tokens.bearer().ok_or(BackendError::NoToken)?;
                    if retried || newest == token {
                        return Err(BackendError::Unauthorized);
                    }
                    retried = true;
                    token = newest;
                }
                other => return other,
            }
        }
    }

    /// `GET url` without credentials, cached for the long interval and shared by everyone; concurrent misses share
    /// one request. Failures are not cached.
    pub async fn shared_get(&self, url: &str) -> Result<BackendResponse, BackendError> {
        self.shared
            .try_get_with(url.to_owned(), async {
                let r = self.fetch(url, None).await?;
                self.metrics
                    .backend_calls
                    .inc(&["shared", outcome(&Ok(r.clone()))]);
                if r.status >= 500 {
                    return Err(BackendError::Network(format!("status {}", r.status)));
                }
                Ok(r)
            })
            .await
            .map_err(|e: Arc<BackendError>| (*e).clone())
    }

    /// Refuses the call while its backend is down or this user's calls to this path back off.
    fn check_backoff(&self, key: &CallKey) -> Result<(), BackendError> {
        let now = Instant::now();
        let backend_left = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.get(&key.0).and_then(|s| s.breaker.left(now))
        };
        let left = backend_left.or_else(|| {
            self.calls
                .get(key)
                .and_then(|b| b.lock().unwrap_or_else(|p| p.into_inner()).left(now))
        });
        match left {
            Some(left) => {
                self.metrics.backend_calls.inc(&[&key.0, "backoff"]);
                Err(BackendError::BackingOff {
                    retry_in_ms: left.as_millis().min(u64::MAX as u128) as u64,
                })
            }
            None => Ok(()),
        }
    }

    fn record(&self, key: &CallKey, result: &Result<BackendResponse, BackendError>) {
        let (backend, user, _) = key;
        self.metrics.backend_calls.inc(&[backend, outcome(result)]);
        // Only signs that the backend is unavailable count (a gateway error, an overload, a timeout, no
        // connection); a 500 about one resource is an answer.
        let failed = match result {
            Ok(r) => matches!(r.status, 502..=504),
            Err(BackendError::Timeout | BackendError::Network(_)) => true,
            Err(_) => false,
        };
        let now = Instant::now();
        if failed {
            let call = self.calls.get_with(key.clone(), || {
                Arc::new(Mutex::new(Breaker::new(self.initial, self.max)))
            });
            call.lock().unwrap_or_else(|p| p.into_inner()).fail(now);
        } else {
            self.calls.invalidate(key);
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = state
            .entry(backend.clone())
            .or_insert_with(|| BackendState {
                breaker: Breaker::new(self.initial, self.max),
                recent: VecDeque::new(),
            });
        let down = self.rule.note(s, user, failed, now);
        if !failed {
            s.breaker.reset();
        } else if down {
            s.breaker.fail(now);
        }
    }

    async fn fetch(
        &self,
        url: impl reqwest::IntoUrl,
        token: Option<&str>,
    ) -> Result<BackendResponse, BackendError> {
        let mut req = self.http.get(url).header("accept", "application/json");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(map_err)?;
        let status = resp.status().as_u16();
        if resp.content_length().is_some_and(|l| l as usize > MAX_BODY) {
            return Err(BackendError::Network("response too large".into()));
        }
        let bytes = resp.bytes().await.map_err(map_err)?;
        if bytes.len() > MAX_BODY {
            return Err(BackendError::Network("response too large".into()));
        }
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(BackendResponse { status, body })
    }
}

/// `{base}{path}` as a URL, when `path` is safe ([`safe_path`]) and the URL is still under `base` (same scheme,
/// host, port, no user info, path below the base's).
fn under_base(base: &str, path: &str) -> Option<url::Url> {
    if !safe_path(path) {
        return None;
    }
    let base_url = url::Url::parse(base).ok()?;
    let url = url::Url::parse(&format!("{}{}", base.trim_end_matches('/'), path)).ok()?;
    let prefix = base_url.path().trim_end_matches('/');
    let below = url
        .path()
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('/'));
    let same_origin = url.scheme() == base_url.scheme()
        && url.host_str() == base_url.host_str()
        && url.port_or_known_default() == base_url.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none();
    (below && same_origin).then_some(url)
}

/// Whether a backend path is safe to append to a base: it starts with `/`, and its path part (before any `?` or
/// `#`) has no `.` or `..` segment and no empty one (but a trailing `/`), checked again after each round of
/// percent-decoding (so `%2e%2e`, `%252e%252e` and `..%2F` are caught) with `\` counting as `/`, as URL parsers
/// and some servers read them. A path still changing after a few decodings is refused too.
pub fn safe_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut current = rest.split(['?', '#']).next().unwrap_or_default().to_owned();
    for _ in 0..4 {
        if !segments_ok(&current) {
            return false;
        }
        let decoded = percent_decode(&current);
        if decoded == current {
            return true;
        }
        current = decoded;
    }
    false
}

fn segments_ok(path: &str) -> bool {
    let segments: Vec<&str> = path.split(['/', '\\']).collect();
    let last = segments.len() - 1;
    segments
        .iter()
        .enumerate()
        .all(|(i, s)| *s != "." && *s != ".." && (!s.is_empty() || i == last))
}

/// One round of percent-decoding; invalid escapes stay as they are, invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
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

fn map_err(e: reqwest::Error) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout
    } else {
        // Without the URL: it may carry identifiers; the error kind is what matters.
        BackendError::Network(e.without_url().to_string())
    }
}

fn outcome(r: &Result<BackendResponse, BackendError>) -> &'static str {
    match r {
        Ok(r) if r.status < 400 => "ok",
        Ok(r) if r.status < 500 => "4xx",
        Ok(_) => "5xx",
        Err(BackendError::Timeout) => "timeout",
        Err(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's stand-in: a fixed token and user.
    struct Caller(&'static str);

    impl TokenSource for Caller {
        fn bearer(&self) -> Option<Arc<str>> {
            Some(Arc::from("token"))
        }
        fn caller(&self) -> &str {
            self.0
        }
    }

    /// Backends with `down`: nothing listens there, every call is a network error. Backoffs of a minute, so that
    /// one that opened is still open when the test looks.
    fn backends() -> Backends {
        let mut c = Config::default();
        c.backends
            .insert("down".into(), "http://127.0.0.1:1/api".into());
        c.backend.backoff_initial_ms = 60_000;
        c.backend.backoff_max_ms = 60_000;
        Backends::new(&c, Arc::new(Metrics::default())).unwrap()
    }

    #[test]
    fn dot_segments_in_any_encoding_are_refused() {
        for ok in [
            "/",
            "/data/sessions",
            "/projects/42/graph/status",
            "/projects/group%2Fname/graph/status",
            "/a.b/..c/c../...x",
            "/x/",
            "/x?path=../..",
        ] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in [
            "",
            "x",
            "@evil.example/x",
            "/..",
            "/.",
            "/a/../b",
            "/a/./b",
            "/a/%2e%2e/b",
            "/a/%2E%2e/b",
            "/a/.%2e/b",
            "/a/%2e/b",
            "/a/..%2F..%2Fb",
            "/a/%252e%252e/b",
            "/a/%25252e%25252e/b",
            "/a\\..\\b",
            "/a/..%5Cb",
            "//evil.example/x",
            "/a//b",
            "/a/%2F/b",
        ] {
            assert!(!safe_path(bad), "{bad}");
        }
    }

    #[test]
    fn urls_stay_under_the_base() {
        let base = "http://gw.example:8080/api";
        assert_eq!(
            under_base(base, "/data/sessions").map(|u| u.to_string()),
            Some("http://gw.example:8080/api/data/sessions".to_owned())
        );
        assert!(under_base(base, "/projects/%2e%2e/graph/status").is_none());
        assert!(under_base(base, "@evil.example/x").is_none());
        assert!(under_base("http://gw.example/", "/x").is_some());
    }

    #[tokio::test]
    async fn a_dot_path_is_refused_before_any_request() {
        let b = backends();
        let r = b
            .get_as_user("down", "/projects/%2e%2e/graph/status", &Caller("alice"))
            .await;
        assert_eq!(r, Err(BackendError::InvalidPath));
        assert_eq!(b.metrics.backend_calls.get(&["down", "error"]), 0.0);
    }

    #[tokio::test]
    async fn one_users_failures_back_off_only_that_users_path() {
        let b = backends();
        let alice = Caller("alice");
        let first = b.get_as_user("down", "/slow/1", &alice).await;
        assert!(matches!(first, Err(BackendError::Network(_))), "{first:?}");
        // Alice's call to that path backs off...
        let again = b.get_as_user("down", "/slow/1", &alice).await;
        assert!(
            matches!(again, Err(BackendError::BackingOff { .. })),
            "{again:?}"
        );
        // ...but not her other paths, nor anyone else's calls, even to the same path.
        for (who, path) in [(&alice, "/slow/2"), (&Caller("bob"), "/slow/1")] {
            let r = b.get_as_user("down", path, who).await;
            assert!(matches!(r, Err(BackendError::Network(_))), "{r:?}");
        }
        let bob = b
            .get_as_user("down", "/data/sessions", &Caller("bob"))
            .await;
        assert!(matches!(bob, Err(BackendError::Network(_))), "{bob:?}");
    }

    #[tokio::test]
    async fn most_distinct_users_failing_is_an_outage() {
        let b = backends();
        // Two users failing (the default minimum is 3): no outage yet.
        for user in ["u1", "u2"] {
            let r = b.get_as_user("down", "/x", &Caller(user)).await;
            assert!(matches!(r, Err(BackendError::Network(_))), "{r:?}");
        }
        let r = b.get_as_user("down", "/y", &Caller("u3")).await;
        assert!(matches!(r, Err(BackendError::Network(_))), "{r:?}");
        // The third distinct user: the backend is down for everyone, no request goes out.
        let r = b.get_as_user("down", "/z", &Caller("u4")).await;
        assert!(matches!(r, Err(BackendError::BackingOff { .. })), "{r:?}");
    }

    #[test]
    fn the_outage_rule_counts_users_once_and_needs_a_majority() {
        let rule = OutageRule {
            min_users: 3,
            window: Duration::from_secs(30),
            recent: RECENT_USERS,
        };
        let mut s = BackendState {
            breaker: Breaker::new(Duration::from_secs(1), Duration::from_secs(1)),
            recent: VecDeque::new(),
        };
        let now = Instant::now();
        // One user failing a hundred times is one user.
        for _ in 0..100 {
            assert!(!rule.note(&mut s, "mallory", true, now));
        }
        // Healthy users outnumber the failing ones: no outage.
        for u in ["a", "b", "c", "d"] {
            assert!(!rule.note(&mut s, u, false, now));
        }
        assert!(!rule.note(&mut s, "e", true, now));
        assert!(!rule.note(&mut s, "f", true, now));
        assert!(!rule.note(&mut s, "g", true, now), "4 failing, 4 fine");
        assert!(rule.note(&mut s, "h", true, now), "5 failing, 4 fine");
        // A user's latest outcome replaces the earlier one.
        assert!(!rule.note(&mut s, "e", false, now), "4 failing, 5 fine");
        // Old outcomes leave the window.
        let later = now + Duration::from_secs(31);
        assert!(!rule.note(&mut s, "x", true, later));
        assert_eq!(s.recent.len(), 1);
        // The record is bounded whatever the number of users.
        for i in 0..1000 {
            rule.note(&mut s, &format!("user{i}"), false, later);
        }
        assert_eq!(s.recent.len(), RECENT_USERS);
    }
}
