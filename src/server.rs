//! The listeners and their routes: `/ws`, `/healthz`, `/readyz`, `/metrics`, plus any extra routes (the demo issuer).
//!
//! The accept loop and each connection are ours, on hyper's HTTP/1 connection, rather than `axum::serve`: that one
//! bounds nothing before a request arrives, so connections that send a partial request, nothing at all, or nothing
//! after one request (slowloris) held a file descriptor each for ever, until the process's file table was full and
//! nobody else got in. Here every HTTP connection that is not (yet) a tab is bounded in time
//! (`http.header_read_timeout_ms`, `http.keepalive_idle_ms`, see [`Activity`]) and in number
//! (`http.max_pending_connections` and its reserve, see [`Listener::admit`]). A connection upgraded to a websocket
//! leaves hyper, and all of this, for the tab's own bounds (`limits.max_connections`, pings).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rand::seq::SliceRandom;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tabhub_commands::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::close_codes;
use crate::config::{Cidr, Config};
use crate::metrics::Metrics;

/// A running server.
pub struct Running {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    app: Arc<App>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The separate `/metrics` listener's address, when `metrics.listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Refuses new upgrades, closes every tab with 1012, stops every session and the listener.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.app.set_draining();
        self.app
            .hub
            .stop_all(close_codes::SERVICE_RESTART, "server shutting down");
        self.app.stop.cancel();
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(Ok(()))
    }

    /// Graceful drain: `/readyz` turns 503 and upgrades are refused at once; after `drain.delay_ms` the tabs are
    /// closed with 1012 at random moments spread over `drain.window_ms`; then every session (loops, upstream
    /// streams) stops and the listener closes. Bounded by delay + window + `drain.grace_ms`.
    pub async fn drain(self) -> std::io::Result<()> {
        let d = &self.app.config.drain;
        let (delay, window, grace) = (
            Duration::from_millis(d.delay_ms),
            Duration::from_millis(d.window_ms),
            Duration::from_millis(d.grace_ms),
        );
        self.app.set_draining();
        tracing::info!(delay_ms = d.delay_ms, window_ms = d.window_ms, "draining");
        tokio::time::sleep(delay).await;
        let mut tabs: Vec<_> = self.app.hub.all().iter().flat_map(|s| s.tabs()).collect();
        tabs.shuffle(&mut rand::thread_rng());
        let start = tokio::time::Instant::now();
        let n = tabs.len().max(1) as u32;
        for (i, tab) in tabs.iter().enumerate() {
            tokio::time::sleep_until(start + window * i as u32 / n).await;
            tab.close(close_codes::SERVICE_RESTART, "server restarting");
        }
        tracing::info!(tabs = tabs.len(), "drain: every tab told to reconnect");
        self.app
            .hub
            .stop_all(close_codes::SERVICE_RESTART, "server restarting");
        self.app.stop.cancel();
        let _ = self.stop.send(true);
        // The listener, and every connection task (whose writer sends the tab's close frame), within the grace.
        self.app.tasks.close();
        let tasks = self.app.tasks.clone();
        let all = async move {
            let served = self.task.await.unwrap_or(Ok(()));
            tasks.wait().await;
            served
        };
        tokio::time::timeout(grace, all).await.unwrap_or(Ok(()))
    }

    /// Waits until the listener stops.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Starts serving on `listener` (and on `metrics.listen` if set): loads the realm in the background (readiness
/// waits for it).
pub async fn start(
    listener: TcpListener,
    config: Config,
    registry: Registry,
    extra: Router,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let invalid =
        |e: crate::config::ConfigError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let allow = Arc::new(config.metrics.allowlist().map_err(invalid)?);
    let metrics_listen = config.metrics.listen_addr().map_err(invalid)?;
    let metrics_listener = match metrics_listen {
        Some(a) => Some(TcpListener::bind(a).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {a} (metrics.listen): {e}"),
            )
        })?),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let app = App::new(config, registry).map_err(std::io::Error::other)?;
    let stop = app.stop.clone();
    let realm = app.realm.clone();
    let hub = Arc::downgrade(&app.hub);
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = async { tokio::join!(realm.load_with_retry(), crate::hub::recheck_on_withdrawal(hub)) } => {}
        }
    });
    app.broker.start(app.stop.clone());
    if let Some(c) = &app.custody {
        crate::routes::custody::start_store(c, &app);
    }
    // `/metrics` goes where `metrics.listen` says, to the peers `metrics.allow` says.
    let metrics_route = {
        let allow = allow.clone();
        get(move |state, peer| metrics(state, peer, allow))
    };
    let metrics_router = Router::new()
        .route("/metrics", metrics_route.clone())
        .with_state(app.clone());
    // Token custody's `/auth/*` routes exist only when it is enabled.
    let custody_routes = app.custody.clone().map(crate::routes::custody::router);
    // The webhook receiver exists only with a secret to check.
    let hook_routes = match app.config.hooks.secrets.is_empty() {
        true => Router::new(),
        false => crate::routes::hooks::router(&app.config.hooks.path),
    };
    let mut main = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    for path in &app.config.websocket.paths {
        main = main.route(path, get(crate::handshake::upgrade));
    }
    if metrics_listener.is_none() {
        main = main.route("/metrics", metrics_route);
    }
    let router = main
        .merge(custody_routes.unwrap_or_default())
        .merge(crate::routes::publish::router())
        .merge(hook_routes)
        .with_state(app.clone())
        .merge(crate::client_assets::router())
        .merge(extra);
    let (stop, stopped) = watch::channel(false);
    let main = Listener::new(&app, true).serve(listener, router, stopped.clone());
    let task = match metrics_listener {
        Some(l) => {
            // Prometheus' own connections: the same timeouts, no cap (the listener is not public).
            let scrape = Listener::new(&app, false).serve(l, metrics_router, stopped);
            tokio::spawn(async move { tokio::join!(main, scrape).0 })
        }
        None => tokio::spawn(main),
    };
    Ok(Running {
        addr,
        metrics_addr,
        app,
        stop,
        task,
    })
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let (status, reason) = if app.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !app.realm.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "identity provider discovery and keys not loaded yet",
        )
    } else if app.broker.state() == "down" {
        // Still serving tabs, loops and streams; only publishing fails: stay in the pool, say it.
        (StatusCode::OK, "degraded: message broker unavailable")
    } else {
        (StatusCode::OK, "ready")
    };
    (
        status,
        axum::Json(
            json!({"ready": status == StatusCode::OK, "status": reason, "instance": app.instance, "broker": app.broker.state()}),
        ),
    )
        .into_response()
}

/// The metrics, to peers in `metrics.allow` (anyone if it is empty). The peer address, never `X-Forwarded-For`:
/// Prometheus scrapes the instance directly, and a header is whatever the client says.
async fn metrics(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    allow: Arc<Vec<Cidr>>,
) -> Response {
    if !allow.is_empty() && !allow.iter().any(|n| n.contains(peer.ip())) {
        return (
            StatusCode::FORBIDDEN,
            "metrics are not served to this address\n",
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// One listener's connection bounds and its count of pending connections (open, not upgraded to a tab).
struct Listener {
    header_timeout: Duration,
    reserve_header_timeout: Duration,
    keepalive_idle: Duration,
    /// `http.max_pending_connections` (0: no cap) and `http.pending_reserve`.
    cap: usize,
    reserve: usize,
    pending: AtomicUsize,
    /// Whether this listener's pending connections show in `tabhub_http_pending_connections` (the main one's do:
    /// the gauge is read against the cap).
    gauge: bool,
    metrics: Arc<Metrics>,
}

impl Listener {
    fn new(app: &App, public: bool) -> Arc<Listener> {
        let h = &app.config.http;
        Arc::new(Listener {
            header_timeout: Duration::from_millis(h.header_read_timeout_ms),
            reserve_header_timeout: Duration::from_millis(h.reserve_header_timeout_ms),
            keepalive_idle: Duration::from_millis(h.keepalive_idle_ms),
            cap: if public { h.max_pending_connections } else { 0 },
            reserve: h.pending_reserve,
            pending: AtomicUsize::new(0),
            gauge: public,
            metrics: app.metrics.clone(),
        })
    }

    /// Takes a place for a new connection: under the cap a full one; beyond it, up to `pending_reserve` more
    /// places for health checks and upgrades only (see [`ConnService::call`]), so that probes and real users
    /// still get in while idle connections hold the cap. Beyond the reserve: `None`, and the connection is closed
    /// at once, before it costs anything more than the accept.
    fn admit(self: &Arc<Self>) -> Option<Pending> {
        let n = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        let reserve = self.cap > 0 && n > self.cap;
        if reserve && n > self.cap.saturating_add(self.reserve) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.http_closed.inc(&["over_capacity"]);
            return None;
        }
        if self.gauge {
            self.metrics.http_pending.inc();
        }
        Some(Pending {
            listener: self.clone(),
            reserve,
        })
    }

    /// Accepts until `stopped`, then waits for every connection still being served (idle ones close at once, a
    /// request in progress is answered first: hyper's graceful shutdown). Upgraded tabs are not waited for here:
    /// they live in `app.tasks`.
    async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        router: Router,
        mut stopped: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stopped.wait_for(|s| *s) => break,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: retrying at once would spin (hyper's advice).
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(place) = self.admit() else {
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            connections.spawn(serve_connection(
                tcp,
                peer,
                router.clone(),
                place,
                stopped.clone(),
            ));
        }
        drop(listener);
        connections.close();
        connections.wait().await;
        Ok(())
    }
}

/// Errors of one incoming connection, not of the listener: the next accept is fine.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// A connection's place among the pending ones, given back when its task ends: closed, or upgraded to a tab (the
/// websocket then runs in a task of its own and counts under `limits.max_connections`).
struct Pending {
    listener: Arc<Listener>,
    /// Taken from the reserve: a short header timeout, one request, health checks and upgrades only.
    reserve: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.listener.pending.fetch_sub(1, Ordering::AcqRel);
        if self.listener.gauge {
            self.listener.metrics.http_pending.dec();
        }
    }
}

/// Serves one HTTP/1 connection until it closes, is upgraded, times out (see [`Activity`]) or the server stops.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    place: Pending,
    mut stopped: watch::Receiver<bool>,
) {
    let listener = place.listener.clone();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: activity.clone(),
    });
    let service = ConnService {
        inner: TowerToHyperService::new(router),
        peer,
        activity: activity.clone(),
        reserve: place.reserve,
        metrics: listener.metrics.clone(),
    };
    // hyper's own header timeout is off: it runs from the moment hyper waits for a request, so it would also
    // cut idle keep-alive connections at the header timeout. `Activity` tells the two apart.
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let header_timeout = if place.reserve {
        listener.reserve_header_timeout
    } else {
        listener.header_timeout
    };
    let mut shutting_down = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, %peer, "http connection ended with an error");
                }
                break;
            }
            reason = activity.expired(header_timeout, listener.keepalive_idle) => {
                // Dropping the connection closes the socket: nothing is owed to a peer that sent no request.
                listener.metrics.http_closed.inc(&[reason]);
                tracing::debug!(%peer, reason, "http connection closed");
                break;
            }
            _ = stopped.wait_for(|s| *s), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    }
    drop(place);
}

/// Where a connection is between requests, for its timeouts. Everything happens in the connection's task (hyper
/// reads the socket, calls the service and drops the response body there), so the atomics only make the state
/// shareable with the socket wrapper and the response body; [`Activity::changed`] wakes the watchdog.
struct Activity {
    origin: Instant,
    phase: AtomicU8,
    /// When the phase began, in milliseconds since `origin`.
    since_ms: AtomicU64,
    changed: Notify,
}

/// Waiting for a request's line and headers: since the connection opened (its first request), or since the
/// first byte of a keep-alive request. Bounded by the header timeout, activity or not (a slow drip of header
/// lines is still cut).
const READING: u8 = 0;
/// A request is being handled or its response written: the handlers bound themselves.
const SERVING: u8 = 1;
/// A response was written and no byte of a next request has come: bounded by the keep-alive idle timeout.
const IDLE: u8 = 2;

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            phase: AtomicU8::new(READING),
            since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn enter(&self, phase: u8) {
        self.since_ms.store(self.now_ms(), Ordering::Release);
        self.phase.store(phase, Ordering::Release);
        self.changed.notify_one();
    }

    /// Bytes arrived: if the connection was idle, a request has begun and the header timeout runs from now.
    fn on_read(&self) {
        if self.phase.load(Ordering::Acquire) == IDLE {
            let now = self.now_ms();
            if self
                .phase
                .compare_exchange(IDLE, READING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.since_ms.store(now, Ordering::Release);
                self.changed.notify_one();
            }
        }
    }

    /// Resolves, with the reason, when the current phase outlives its bound; waits through request handling.
    async fn expired(&self, header_timeout: Duration, idle_timeout: Duration) -> &'static str {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let (limit, reason) = match self.phase.load(Ordering::Acquire) {
                READING => (header_timeout, "header_timeout"),
                IDLE => (idle_timeout, "idle_timeout"),
                _ => {
                    changed.await;
                    continue;
                }
            };
            let deadline =
                self.origin + Duration::from_millis(self.since_ms.load(Ordering::Acquire)) + limit;
            if Instant::now() >= deadline {
                return reason;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = changed => {}
            }
        }
    }
}

/// The socket, telling [`Activity`] when bytes arrive. After an upgrade it goes on carrying the websocket, where
/// that costs one atomic load per read.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router as one connection's hyper service: adds the peer address (`ConnectInfo`, read by the handshake and
/// `/metrics`), tracks the request in [`Activity`], and on a reserve connection serves only what must work
/// under attack.
struct ConnService {
    inner: TowerToHyperService<Router>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    reserve: bool,
    metrics: Arc<Metrics>,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, mut req: Request<Incoming>) -> ServiceFuture {
        self.activity.enter(SERVING);
        let served = Served(self.activity.clone());
        if self.reserve && !cheap_and_important(&req) {
            self.metrics.http_closed.inc(&["reserve_refused"]);
            let mut resp = (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections; retry later\n",
            )
                .into_response();
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Box::pin(std::future::ready(Ok(resp.map(|body| Tracked {
                body,
                _served: served,
            }))));
        }
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let reserve = self.reserve;
        let answer = hyper::service::Service::call(&self.inner, req);
        Box::pin(async move {
            let mut resp = match answer.await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            // A reserve place serves one request: give it back as soon as the answer is written.
            if reserve && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp.map(|body| Tracked {
                body,
                _served: served,
            }))
        })
    }
}

/// What a reserve connection may ask: the health checks, and a websocket upgrade (a real user's tab).
fn cheap_and_important(req: &Request<Incoming>) -> bool {
    if req.method() != Method::GET {
        return false;
    }
    match req.uri().path() {
        "/healthz" | "/readyz" => true,
        // On any path: the router answers the paths that are not websocket paths.
        _ => req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
    }
}

/// Held by a response until hyper has written it and dropped it: the connection is then idle.
struct Served(Arc<Activity>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.enter(IDLE);
    }
}

/// A response body that marks the connection idle when dropped (see [`Served`]).
struct Tracked {
    body: Body,
    _served: Served,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
