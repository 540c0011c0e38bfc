//! The listener and its routes: `/ws`, `/healthz`, `/readyz`, `/metrics`, plus any extra routes (the demo issuer).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use tabhub_commands::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::close_codes;
use crate::config::Config;

/// A running server.
pub struct Running {
    addr: SocketAddr,
    app: Arc<App>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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

/// Starts serving on `listener`: loads the realm in the background (readiness waits for it).
pub async fn start(
    listener: TcpListener,
    config: Config,
    registry: Registry,
    extra: Router,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
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
    // Token custody's `/auth/*` routes exist only when it is enabled.
    let custody_routes = app.custody.clone().map(crate::routes::custody::router);
    let router = Router::new()
        .route("/ws", get(crate::handshake::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(custody_routes.unwrap_or_default())
        .merge(crate::routes::publish::router())
        .with_state(app.clone())
        .merge(crate::client_assets::router())
        .merge(extra);
    let (stop, mut stopped) = watch::channel(false);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
    });
    Ok(Running {
        addr,
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

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}
