//! One upstream SSE connection to GitLab per (user, project), driven by the session's [`Subscriptions`].
//!
//! Built on reqwest-eventsource with its own retry turned off (`retry::Never`): it would reconnect with the bearer
//! token of the request it was built with, so every (re)connection here is a new request carrying the session's
//! newest token, and the filter and `Last-Event-ID` the session's bookkeeping gives at that moment
//! ([`StreamSink::connect`]: the event types held now, where to resume). Reconnection uses exponential backoff with
//! full jitter, and never comes sooner than `gitlab.min_reconnect_interval_ms` after the previous request. Stalls are detected by the client's read timeout (`gitlab.stall_timeout_ms`): it resets on every byte,
//! comments included, so a stream that sends nothing at all is dead, while one sending only heartbeats is not.
//!
//! Faults, as the tabs see them (each message names the topic):
//! - 401: retried once (after the minimum interval) if the session has a newer token, else `subscriptionError {status: 401}`; the stream
//!   then waits for the session's token to change before trying again;
//! - 403 and 404: `subscriptionError`, and the project's subscriptions are dropped;
//! - 5xx, network errors, stalls, streams that end: `subscriptionStatus {status: "degraded"}` once, retries with
//!   backoff, `subscriptionStatus {status: "recovered"}` once when a connection opens again.
//!
//! [`Subscriptions`]: crate::subscriptions::Subscriptions

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest_eventsource::{retry, Error as EsError, Event, EventSource};
use tokio::sync::watch;

use crate::auth::Verified;
use crate::backoff::Backoff;
use crate::config::GitlabConfig;
use crate::metrics::Metrics;
use crate::subscriptions::Connect;

/// Where a stream's events and state changes go: the user's session implements it. Every call names the stream's
/// generation, so that the sink can ignore a stream it has since replaced.
pub trait StreamSink: Send + Sync + 'static {
    /// The token to connect with (the newest valid one).
    fn bearer(&self) -> Option<Arc<str>>;
    /// Every change of the session's token: a stream refused with 401 waits for one.
    fn token_changes(&self) -> watch::Receiver<Option<Verified>>;
    /// Before every request of generation `generation`: the event types to ask for and the `Last-Event-ID` to
    /// send, read now so that a change made meanwhile needs no restart. `None`: the generation was replaced, the
    /// task ends.
    fn connect(&self, project: &str, generation: u64) -> Option<Connect>;
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

/// The stream URL of a project for a set of event types. The project id (as a topic names it: `42`,
/// `group%2Fname`) is decoded, then encoded as exactly one path segment, so that neither a `/` nor a dot segment in
/// it can reach another path (`..` once turned `/api/v4/projects/../events/stream` into `/api/v4/events/stream`).
/// `None` for an id that is no GitLab id ([`decode_project_id`]); `Topic::parse` refuses those already.
///
/// [`decode_project_id`]: tabhub_commands::topic::decode_project_id
pub fn stream_url(
    config: &GitlabConfig,
    project: &str,
    filter: &BTreeSet<String>,
) -> Option<String> {
    let decoded = tabhub_commands::topic::decode_project_id(project)?;
    let types: Vec<String> = filter.iter().map(|t| encode_component(t)).collect();
    Some(format!(
        "{}{}",
        config.url.trim_end_matches('/'),
        config
            .stream_path
            .replace("{project}", &encode_component(&decoded))
            .replace("{eventTypes}", &types.join(","))
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters: the result is one path segment (or one query
/// value), whatever `s` holds.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// Runs generation `generation` of a project's stream until the session replaces or stops it (aborts the task, or
/// [`StreamSink::connect`] says it is no longer current) or GitLab refuses the project.
pub async fn run(
    upstream: Arc<Upstream>,
    session: Weak<dyn StreamSink>,
    project: String,
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
    // Whatever ended the last request (a drop, a 401, a stall), the next one waits out the minimum interval: the
    // session's restarts wait for it too, so one project's requests are always that far apart.
    let min_interval = Duration::from_millis(config.min_reconnect_interval_ms);
    let mut last_request: Option<Instant> = None;
    loop {
        if let Some(t) = last_request {
            tokio::time::sleep_until((t + min_interval).into()).await;
        }
        last_request = Some(Instant::now());
        let (ended, opened) = connect_once(&upstream, &session, &project, generation).await;
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
    generation: u64,
) -> (Ended, bool) {
    let mut open: Option<OpenGuard> = None;
    let ended = stream_events(upstream, session, project, generation, &mut open).await;
    (ended, open.is_some())
}

async fn stream_events(
    upstream: &Upstream,
    session: &Weak<dyn StreamSink>,
    project: &str,
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
        let Some(connect) = s.connect(project, generation) else {
            return Ended::Gone;
        };
        let Some(url) = stream_url(&upstream.config, project, &connect.filter) else {
            return Ended::Refused(400, "not a GitLab project id".into());
        };
        let mut req = upstream
            .http
            .get(url)
            .bearer_auth(&token)
            .header("accept", "text/event-stream");
        if let Some(id) = connect.last_event_id {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tabhub_commands::Topic;

    fn config() -> GitlabConfig {
        GitlabConfig {
            url: "https://gitlab.example/".into(),
            ..GitlabConfig::default()
        }
    }

    fn types(t: &[&str]) -> BTreeSet<String> {
        t.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_project_is_one_path_segment() {
        let c = config();
        assert_eq!(
            stream_url(&c, "42", &types(&["push", "issue"])).as_deref(),
            Some("https://gitlab.example/api/v4/projects/42/events/stream?event_types=issue,push")
        );
        assert_eq!(
            stream_url(&c, "group%2fsub%2Fname", &types(&["push"])).as_deref(),
            Some("https://gitlab.example/api/v4/projects/group%2Fsub%2Fname/events/stream?event_types=push")
        );
        for bad in ["..", ".", "%2e%2e", "a%2F..", "%2E", ""] {
            assert_eq!(stream_url(&c, bad, &types(&["push"])), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever project id a topic accepts, the URL has the template's path, with the id as its one project
        /// segment, which decodes to the id GitLab looks up.
        #[test]
        fn any_accepted_id_stays_in_its_segment(id in "[a-zA-Z0-9._%/-]{1,16}|[a-z.]{1,3}(%2[eEfF][a-z.]{0,3}){1,3}") {
            let Ok(Topic::Project { project, .. }) = Topic::parse(&format!("/project/{id}/push")) else {
                return Ok(());
            };
            let url = stream_url(&config(), &project, &types(&["push"])).expect("a URL");
            let parsed = url::Url::parse(&url).expect("a valid URL");
            let segs: Vec<&str> = parsed.path_segments().map(Iterator::collect).unwrap_or_default();
            proptest::prop_assert_eq!(segs.len(), 6, "{}", url);
            proptest::prop_assert_eq!(&segs[..3], &["api", "v4", "projects"]);
            proptest::prop_assert_eq!(&segs[4..], &["events", "stream"]);
            let decoded = url::form_urlencoded::parse(format!("x={}", segs[3].replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned());
            proptest::prop_assert_eq!(decoded, tabhub_commands::topic::decode_project_id(&project));
        }
    }
}
