//! Calls to backends on behalf of users (loop functions), and shared anonymous fetches.
//!
//! One HTTP client with a keep-alive pool serves every user. Each backend has its own backoff: after a 502, 503,
//! 504, a timeout or a network error no request goes to it until the backoff ends (exponential, with jitter, reset by a success), so a
//! backend in trouble is not hammered by every user's loop. A 401 is retried once with the session's newest token.

use std::collections::{BTreeMap, HashMap};
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

/// Where a call as the user gets its bearer token: the session implements it. Asked again after a 401, so that a
/// token renewed meanwhile is used at once.
pub trait TokenSource: Send + Sync {
    /// The newest token that has not expired, if any.
    fn bearer(&self) -> Option<Arc<str>>;
}

struct BackendState {
    backoff: Backoff,
    until: Option<Instant>,
}

pub struct Backends {
    http: reqwest::Client,
    bases: BTreeMap<String, String>,
    state: Mutex<HashMap<String, BackendState>>,
    initial: Duration,
    max: Duration,
    shared: moka::future::Cache<String, BackendResponse>,
    metrics: Arc<Metrics>,
}

impl Backends {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Backends, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.backend.timeout_ms))
            .pool_max_idle_per_host(config.backend.pool_max_idle_per_host)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Backends {
            http,
            bases: config.backends.clone(),
            state: Mutex::new(HashMap::new()),
            initial: Duration::from_millis(config.backend.backoff_initial_ms),
            max: Duration::from_millis(config.backend.backoff_max_ms),
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
        self.check_backoff(backend)?;
        let url = format!("{}{}", base.trim_end_matches('/'), path);
        let mut token = tokens.bearer().ok_or(BackendError::NoToken)?;
        let mut retried = false;
        loop {
            let result = self.fetch(&url, Some(&token)).await;
            self.record(backend, &result);
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

    fn check_backoff(&self, backend: &str) -> Result<(), BackendError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = state.get(backend).and_then(|s| s.until) {
            let now = Instant::now();
            if until > now {
                self.metrics.backend_calls.inc(&[backend, "backoff"]);
                return Err(BackendError::BackingOff {
                    retry_in_ms: (until - now).as_millis() as u64,
                });
            }
        }
        Ok(())
    }

    fn record(&self, backend: &str, result: &Result<BackendResponse, BackendError>) {
        self.metrics.backend_calls.inc(&[backend, outcome(result)]);
        // Backoff is per backend, shared by every user: only signs that the backend itself is unavailable count
        // (a gateway error, an overload, a timeout, no connection). A 500 about one resource (one user's project,
        // say) must not silence the backend for everyone.
        let failed = match result {
            Ok(r) => matches!(r.status, 502..=504),
            Err(BackendError::Timeout | BackendError::Network(_)) => true,
            Err(_) => false,
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = state
            .entry(backend.to_owned())
            .or_insert_with(|| BackendState {
                backoff: Backoff::new(self.initial, self.max),
                until: None,
            });
        if failed {
            s.until = Some(Instant::now() + s.backoff.next_delay());
        } else {
            s.backoff.reset();
            s.until = None;
        }
    }

    async fn fetch(&self, url: &str, token: Option<&str>) -> Result<BackendResponse, BackendError> {
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
