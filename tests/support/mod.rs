//! Test support: a fixture Keycloak, a counting backend, a tabhub launcher and a websocket client, all on
//! 127.0.0.1 with real sockets. Every wait is bounded.
#![allow(dead_code)]

pub mod browser;
pub mod client;
pub mod gateway;
pub mod keycloak;
pub mod process;
pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use tabhub::commands::Registry;
use tabhub::config::Config;
use tabhub::Running;

pub use client::Client;
#[allow(unused_imports)]
pub use keycloak::{Keycloak, TokenSpec};

/// Bound on every single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A configuration for `kc`'s realm with fast timers suited to tests.
pub fn config(kc: &Keycloak) -> Config {
    let mut c = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        instance_id: "test-instance".into(),
        ..Config::default()
    };
    c.auth.issuer = kc.issuer();
    c.auth.client_ids = vec!["renku-ui".into()];
    c.auth.jwks_refetch_min_interval_ms = 200;
    c.origins.allowed = vec!["https://renku.example".into()];
    c.origins.allow_missing = true;
    c.session.linger_ms = 300;
    c.session.short_interval_ms = 400;
    c.session.long_interval_ms = 2_000;
    c.session.hidden_interval_ms = 2_000;
    c.session.loop_timeout_ms = 300;
    c.backend.timeout_ms = 300;
    c.backend.backoff_initial_ms = 50;
    c.backend.backoff_max_ms = 200;
    c
}

/// Starts tabhub with `config` and `registry` and waits until it is ready.
pub async fn start(config: Config, registry: Registry) -> Running {
    config.validate().expect("test config is valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = tabhub::start(listener, config, registry, axum::Router::new())
        .await
        .unwrap();
    let url = format!("http://{}/readyz", running.local_addr());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            if r.status() == 200 {
                return running;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tabhub never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts tabhub with the built-in commands.
pub async fn start_default(kc: &Keycloak) -> Running {
    start(config(kc), tabhub::commands::builtin()).await
}

/// Polls `cond` until it holds (bounded by [`WAIT`]).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The websocket URL of a running tabhub.
pub fn ws_url(t: &Running) -> String {
    format!("ws://{}/ws", t.local_addr())
}

/// Serves a fixture GitLab on 127.0.0.1; returns it and its base URL.
pub async fn gitlab(
    heartbeat_ms: u64,
) -> (
    std::sync::Arc<tabhub_fixtures::gitlab::FixtureGitlab>,
    String,
) {
    let g = tabhub_fixtures::gitlab::FixtureGitlab::new(tabhub_fixtures::gitlab::GitlabOptions {
        heartbeat_ms,
        log_capacity: 10_000,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = g.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (g, base)
}

/// A test configuration with subscriptions to the fixture GitLab at `base`.
pub fn config_with_gitlab(kc: &Keycloak, base: &str) -> Config {
    let mut c = config(kc);
    c.gitlab.url = base.to_owned();
    c.gitlab.stall_timeout_ms = 1_000;
    c.gitlab.reconnect_initial_ms = 50;
    c.gitlab.reconnect_max_ms = 200;
    c
}

/// Polls an async condition until it holds (bounded by [`WAIT`]).
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
