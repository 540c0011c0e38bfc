//! `tabhub demo`: everything on one listener, nothing else to run. FOR DEVELOPMENT ONLY.
//!
//! Only with the default cargo feature `demo`: it composes the engine with the fixture servers of the
//! `tabhub-fixtures` crate (re-exported here), which a `--no-default-features` build leaves out altogether:
//!
//! - [`issuer`]: a development issuer shaped like a Keycloak realm at `/realms/demo`;
//! - [`gitlab`]: a fixture GitLab posting webhook deliveries to the demo's receiver (`gitlab.source = "webhook"`)
//!   and answering the access checks; it can also stream events over SSE (`tabhub demo --gitlab-url`, the browser
//!   tests' separate fixture process);
//! - [`gateway`]: a fixture Renku gateway (sessions, KG activation, UI version) at `/gateway`, whose sessions and
//!   activations move on their own;
//!
//! What needs the engine stays here: the demo [`config`], the gateway's routes carrying tabhub's version
//! ([`backends`]) and the demo page ([`page_router`]). The fixture crate itself knows nothing of the engine.

pub use tabhub_fixtures::{gateway, gitlab, issuer, webhooks};
pub use tabhub_fixtures::{
    gitlab_router, DevIssuer, CLIENT_ID, CUSTODY_CLIENT, CUSTODY_SECRET, DEMO_PROJECTS, USERS,
};

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::Config;

/// Where the demo serves its fixture gateway, under the listener's base URL.
pub const GATEWAY_PREFIX: &str = "/gateway";

/// The demo's webhook secret (`hooks.secrets`): public, like everything in the demo.
pub const HOOK_SECRET: &str = "demo-webhook-secret-not-secret";

/// The demo's embedded fixture GitLab, to merge into the listener's routes: it posts a webhook delivery on a demo
/// project every second or two to the demo's receiver at `base` + `hooks.path`, and answers the access checks (every
/// demo user is a Developer of every project). Call it inside the runtime.
pub fn gitlab_webhooks(config: &Config) -> axum::Router {
    let g = gitlab::FixtureGitlab::new(gitlab::GitlabOptions::default());
    let receiver = format!("{}{}", config.gitlab.url, config.hooks.path);
    g.start_webhook_ticker(&receiver, HOOK_SECRET, DEMO_PROJECTS);
    g.router()
}

/// How often the demo gateway's sessions and KG activations move.
pub const DEMO_TICK: Duration = Duration::from_secs(3);

/// The demo's fixture backends, to merge into the listener's routes: the gateway under [`GATEWAY_PREFIX`], with
/// its ticker running. Call it inside the runtime.
pub fn backends() -> axum::Router {
    let g = gateway::Gateway::demo(env!("CARGO_PKG_VERSION"));
    g.start_demo_ticker(DEMO_TICK);
    axum::Router::new().nest(GATEWAY_PREFIX, g.router())
}

/// The demo configuration for a listener at `addr`: the embedded issuer and gateway, its own origin allowed,
/// clients without an `Origin` header (command-line tools) allowed.
pub fn config(addr: SocketAddr) -> Config {
    let host = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let base = format!("http://{host}");
    let mut c = Config {
        listen: addr,
        ..Config::default()
    };
    c.auth.issuer = format!("{base}/realms/demo");
    c.auth.client_ids = vec![CLIENT_ID.into(), CUSTODY_CLIENT.into()];
    // Renku's own client connects to its UI server's path; serve both.
    c.websocket.paths = vec!["/ws".into(), "/ui-server/ws".into()];
    c.custody.enabled = true;
    c.custody.client_id = CUSTODY_CLIENT.into();
    c.custody.client_secret = CUSTODY_SECRET.into();
    c.custody.redirect_uri = format!("{base}/auth/callback");
    c.custody.post_logout_redirect_uri = format!("{base}/");
    c.custody.cookie_secure = false;
    c.gitlab.url = base.clone();
    // GitLab's way: webhooks to the receiver, access checked as each user at the fixture GitLab's project API.
    c.gitlab.source = crate::config::GitlabSource::Webhook;
    c.hooks.secrets = vec![HOOK_SECRET.into()];
    c.backends
        .insert("gateway".into(), format!("{base}{GATEWAY_PREFIX}"));
    c.commands.insert(
        "ui_version_url".into(),
        toml::Value::String(format!("{base}{GATEWAY_PREFIX}/ui-version")),
    );
    c.origins.allowed = vec![base, format!("http://localhost:{}", addr.port())];
    c.origins.allow_missing = true;
    c
}

const DEMO_PAGE: &str = include_str!("../client/demo/index.html");

/// The demo page at `/`: log in (token custody), watch the session, subscribe to the demo projects' topics.
pub fn page_router() -> axum::Router {
    axum::Router::new().route(
        "/",
        axum::routing::get(|| async { axum::response::Html(DEMO_PAGE) }),
    )
}

/// The base URL clients use for a listener at `addr`.
pub fn base_url(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}
