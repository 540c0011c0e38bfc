//! One upstream SSE connection to GitLab per (user, project), driven by the session's [`Subscriptions`].
//!
//! Built on reqwest-eventsource with its own retry turned off (`retry::Never`): it would reconnect with the bearer
//! token of the request it was built with, so every (re)connection here is a new request carrying the session's
//! newest token and `Last-Event-ID` (the last event received). Reconnection uses exponential backoff with full
//! jitter. Stalls are detected by the client's read timeout (`gitlab.stall_timeout_ms`): it resets on every byte,
//! comments included, so a stream that sends nothing at all is dead, while one sending only heartbeats is not.
//!
//! Faults, as the tabs see them (each message names the topic):
//! - 401: retried once at once if the session has a newer token, else `subscriptionError {status: 401}`; the stream
//!   then waits for the session's token to change before trying again;
//! - 403 and 404: `subscriptionError`, and the project's subscriptions are dropped;
//! - 5xx, network errors, stalls, streams that end: `subscriptionStatus {status: "degraded"}` once, retries with
//!   backoff, `subscriptionStatus {status: "recovered"}` once when a connection opens again.
//!
//! [`Subscriptions`]: crate::subscriptions::Subscriptions

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest_eventsource::{retry, Error as EsError, Event, EventSource};
use tokio::sync::watch;

use crate::auth::Verified;
use crate::backoff::Backoff;
use crate::config::GitlabConfig;
use crate::metrics::Metrics;

/// Where a stream's events and state changes go: the user's session implements it. Every call names the stream's
/// generation, so that the sink can ignore a stream it has since replaced.
pub trait StreamSink: Send + Sync + 'static {
    /// The token to connect with (the newest valid one).
    fn bearer(&self) -> Option<Arc<str>>;
    /// Every change of the session's token: a stream refused with 401 waits for one.
    fn token_changes(&self) -> watch::Receiver<Option<Verified>>;
    /// The id of the last event received, sent as `Last-Event-ID` on reconnection.
    fn resume_id(&self, project: &str) -> Option<String>;
    fn opened(&self, project: &str, generation: u64);
    fn event(&self, project: &str, generation: u64, id: &str, event_type: &str, data: &str);
    fn degraded(&self, project: &str, generation: u64, why: &str);
    fn unauthorized(&self, project: &str, generation: u64);
    fn refused(&self, project: &str, generation: u64, status: u16, message: &str);
}

/// The upstream client: its HTTP client (no total timeout, since streams are long; a read timeout for stalls),
/// the `[gitlab]` settings and the metrics.
pub struct Upstream {
    http: reqwest::Client,
    config: GitlabConfig,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(config: &GitlabConfig, metrics: Arc<Metrics>) -> Result<Upstream, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .read_timeout(Duration::from_millis(config.stall_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Upstream {
            http,
            config: config.clone(),
            metrics,
        })
    }
}

/// The stream URL of a project for a set of event types.
pub fn stream_url(config: &GitlabConfig, project: &str, filter: &BTreeSet<String>) -> String {
    let types: Vec<&str> = filter.iter().map(String::as_str).collect();
    format!(
        "{}{}",
        config.url.trim_end_matches('/'),
        config
            .stream_path
            .replace("{project}", project)
            .replace("{eventTypes}", &types.join(","))
    )
}

/// How a connection ended.
enum Ended {
    /// Reconnect after a backoff.
    Retry(String),
    /// 401 with the token used.
    Unauthorized(Arc<str>),
    /// 403 or 404: give up on the project.
    Refused(u16, String),
    /// The session is gone.
    Gone,
}

/// Runs a project's stream until the session stops it (aborts the task) or GitLab refuses the project.
pub async fn run(
    upstream: Arc<Upstream>,
    session: Weak<dyn StreamSink>,
    project: String,
    filter: BTreeSet<String>,
    generation: u64,
) {
    let Some(s) = session.upgrade() else { return };
    let config = &upstream.config;
    let mut token_changes = s.token_changes();
    drop(s);
    let mut backoff = Backoff::new(
        Duration::from_millis(config.reconnect_initial_ms),
        Duration::from_millis(config.reconnect_max_ms),
    );
    let mut retried_401 = false;
    loop {
        let (ended, opened) =
            connect_once(&upstream, &session, &project, &filter, generation).await;
        if opened {
            backoff.reset();
        }
        match ended {
            Ended::Gone => return,
            Ended::Refused(status, message) => {
                if let Some(s) = session.upgrade() {
                    s.refused(&project, generation, status, &message);
                }
                return;
            }
            Ended::Unauthorized(used) => {
                let Some(s) = session.upgrade() else { return };
                let newer = s.bearer().is_some_and(|t| t != used);
                if newer && !retried_401 {
                    retried_401 = true;
                    continue;
                }
                s.unauthorized(&project, generation);
                drop(s);
                // Wait for a new token (authenticate, refresh) before trying again.
                token_changes.borrow_and_update();
                if token_changes.changed().await.is_err() {
                    return;
                }
                retried_401 = false;
            }
            Ended::Retry(why) => {
                if let Some(s) = session.upgrade() {
                    s.degraded(&project, generation, &why);
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Counts an open upstream connection in the metrics while it lives.
struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.upstream_streams.dec();
    }
}

async fn connect_once(
    upstream: &Upstream,
    session: &Weak<dyn StreamSink>,
    project: &str,
    filter: &BTreeSet<String>,
    generation: u64,
) -> (Ended, bool) {
    let mut open: Option<OpenGuard> = None;
    let ended = stream_events(upstream, session, project, filter, generation, &mut open).await;
    (ended, open.is_some())
}

async fn stream_events(
    upstream: &Upstream,
    session: &Weak<dyn StreamSink>,
    project: &str,
    filter: &BTreeSet<String>,
    generation: u64,
    open: &mut Option<OpenGuard>,
) -> Ended {
    let (mut es, token) = {
        let Some(s) = session.upgrade() else {
            return Ended::Gone;
        };
        let Some(token) = s.bearer() else {
            return Ended::Retry("no valid token".into());
        };
        let mut req = upstream
            .http
            .get(stream_url(&upstream.config, project, filter))
            .bearer_auth(&token)
            .header("accept", "text/event-stream");
        if let Some(id) = s.resume_id(project) {
            req = req.header("last-event-id", id);
        }
        let Ok(mut es) = EventSource::new(req) else {
            return Ended::Retry("request cannot be built".into());
        };
        es.set_retry_policy(Box::new(retry::Never));
        (es, token)
    };
    while let Some(item) = es.next().await {
        let Some(s) = session.upgrade() else {
            return Ended::Gone;
        };
        match item {
            Ok(Event::Open) => {
                if open.is_none() {
                    upstream.metrics.upstream_streams.inc();
                    *open = Some(OpenGuard(upstream.metrics.clone()));
                }
                s.opened(project, generation);
            }
            Ok(Event::Message(m)) => s.event(project, generation, &m.id, &m.event, &m.data),
            Err(EsError::InvalidStatusCode(status, _)) => {
                es.close();
                return match status {
                    StatusCode::UNAUTHORIZED => Ended::Unauthorized(token),
                    StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Ended::Refused(
                        status.as_u16(),
                        if status == StatusCode::FORBIDDEN {
                            "GitLab refused access to this project".into()
                        } else {
                            "GitLab does not know this project".into()
                        },
                    ),
                    other => Ended::Retry(format!("GitLab answered {}", other.as_u16())),
                };
            }
            Err(EsError::StreamEnded) => {
                es.close();
                return Ended::Retry("stream ended".into());
            }
            Err(EsError::Transport(e)) => {
                es.close();
                return Ended::Retry(if e.is_timeout() && open.is_some() {
                    "stream stalled (nothing received)".into()
                } else {
                    "connection to GitLab failed".into()
                });
            }
            Err(e) => {
                es.close();
                return Ended::Retry(format!("bad stream: {e}"));
            }
        }
    }
    Ended::Retry("stream ended".into())
}
