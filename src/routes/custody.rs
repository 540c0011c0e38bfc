//! The login routes. Every failure is a JSON error (or, for the browser-facing login and callback, a short page),
//! never a panic, never a token.
//!
//! `/auth/login` and `/auth/callback` are open to anyone: each is rate-limited per client address (429), and
//! neither keeps anything server-side before a login succeeds (the pending login travels in a sealed cookie,
//! `crate::custody::pending`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::auth::credential;
use crate::close_codes;
use crate::custody::{Custody, CustodyError};
use crate::rate::PerAddress;
use crate::responses::json_error;

/// Per-address token buckets of the two unauthenticated login routes (`custody.logins_per_second_per_address`,
/// `custody.logins_burst`), one each: a browser's login takes one token of each.
struct LoginLimits {
    login: PerAddress,
    callback: PerAddress,
}

/// `/auth/*` routes, for the server to mount only when custody is enabled (without it these paths are the
/// framework's 404, like any unknown path). Each handler is handed the enabled [`Custody`] itself instead of
/// checking `App::custody` at every request.
pub fn router(custody: Arc<Custody>) -> Router<Arc<App>> {
    let c = custody;
    let limits = {
        let cfg = c.config();
        let bucket = || PerAddress::new(cfg.logins_per_second_per_address, cfg.logins_burst);
        Arc::new(LoginLimits {
            login: bucket(),
            callback: bucket(),
        })
    };
    Router::new()
        .route("/auth/login", {
            let (c, limits) = (c.clone(), limits.clone());
            get(move |app, peer, headers, q| login(c, limits, app, peer, headers, q))
        })
        .route("/auth/callback", {
            let c = c.clone();
            get(move |app, peer, headers, q| callback(c, limits, app, peer, headers, q))
        })
        .route("/auth/me", {
            let c = c.clone();
            get(move |app, headers| me(c, app, headers))
        })
        .route("/auth/logout", {
            let c = c.clone();
            post(move |app, headers| logout(c, app, headers))
        })
        .route(
            "/auth/backchannel-logout",
            post(move |app, form| backchannel_logout(c, app, form)),
        )
}

fn page(status: StatusCode, title: &str, message: &str) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    (
        status,
        Html(format!(
            "<!doctype html><meta charset=utf-8><title>{t}</title><h1>{t}</h1><p>{m}</p><p><a href=\"/auth/login\">Log in again</a></p>",
            t = esc(title),
            m = esc(message)
        )),
    )
        .into_response()
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// 429 when `addr` has used up its bucket.
fn limited(
    app: &App,
    bucket: &PerAddress,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Option<Response> {
    let addr = crate::handshake::client_address(app, peer, headers);
    if bucket.take(addr) {
        return None;
    }
    let mut r = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many login attempts from this address; retry later",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Some(r)
}

/// The pending login cookie (`custody.login_cookie_name`), set or cleared. Its `Path` is the callback's (the path
/// of `custody.redirect_uri`): the browser sends it there and nowhere else. `SameSite=Lax` still sends it on the
/// top-level redirect back from the identity provider.
fn login_cookie(c: &Custody, value: &str, max_age_secs: u64) -> HeaderValue {
    let cfg = c.config();
    let secure = if cfg.cookie_secure { "; Secure" } else { "" };
    let path = url::Url::parse(&cfg.redirect_uri)
        .ok()
        .map(|u| u.path().to_owned())
        .filter(|p| p.starts_with('/') && !p.contains(';'))
        .unwrap_or_else(|| "/".into());
    HeaderValue::from_str(&format!(
        "{}={value}; Path={path}; Max-Age={max_age_secs}; HttpOnly; SameSite=Lax{secure}",
        cfg.login_cookie_name
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The login cookie (named by `custody.cookie_name`), set or cleared.
fn cookie(c: &Custody, value: &str, max_age_secs: u64) -> HeaderValue {
    let cfg = c.config();
    let secure = if cfg.cookie_secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={value}; Path={}; Max-Age={max_age_secs}; HttpOnly; SameSite=Lax{secure}",
        cfg.cookie_name, cfg.cookie_path
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[derive(Deserialize)]
struct LoginQuery {
    redirect: Option<String>,
}

async fn login(
    c: Arc<Custody>,
    limits: Arc<LoginLimits>,
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(r) = limited(&app, &limits.login, peer, &headers) {
        return r;
    }
    let Ok(Query(q)) = q else {
        return json_error(StatusCode::BAD_REQUEST, "malformed query string");
    };
    match c.login_url(q.redirect.as_deref()).await {
        Ok((url, sealed)) => {
            let max_age = c.config().login_timeout_ms.div_ceil(1000);
            let mut r = redirect(&url);
            r.headers_mut()
                .insert(header::SET_COOKIE, login_cookie(&c, &sealed, max_age));
            r
        }
        Err(e @ (CustodyError::BadRedirect | CustodyError::RedirectTooLong)) => {
            json_error(StatusCode::BAD_REQUEST, &e.to_string())
        }
        Err(e) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Login unavailable",
            &e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(
    c: Arc<Custody>,
    limits: Arc<LoginLimits>,
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(r) = limited(&app, &limits.callback, peer, &headers) {
        return r;
    }
    let Ok(Query(q)) = q else {
        return page(
            StatusCode::BAD_REQUEST,
            "Login failed",
            "malformed callback query",
        );
    };
    if let Some(e) = q.error {
        let why = q.error_description.unwrap_or(e);
        return page(StatusCode::BAD_REQUEST, "Login refused", &why);
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Login failed",
            "the callback needs code and state",
        );
    };
    let sealed = credential::cookie(&headers, &c.config().login_cookie_name);
    let mut r = match c.callback(&code, &state, sealed.as_deref()).await {
        Ok((login_id, stored, to)) => {
            let max_age = stored
                .refresh_expires
                .saturating_duration_since(std::time::Instant::now())
                .as_secs();
            let mut r = redirect(&to);
            r.headers_mut()
                .insert(header::SET_COOKIE, cookie(&c, &login_id, max_age));
            r
        }
        // Not this browser's login (login CSRF, or an older login of this browser): its own pending login, if
        // any, stays usable.
        Err(e @ CustodyError::UnknownState) => {
            return page(StatusCode::BAD_REQUEST, "Login refused", &e.to_string())
        }
        Err(e @ CustodyError::NoPendingLogin) => {
            page(StatusCode::BAD_REQUEST, "Login expired", &e.to_string())
        }
        Err(e) => page(StatusCode::BAD_GATEWAY, "Login failed", &e.to_string()),
    };
    // The pending login is used up (or unusable): clear it, if the browser sent one.
    if sealed.is_some() {
        r.headers_mut()
            .append(header::SET_COOKIE, login_cookie(&c, "", 0));
    }
    r
}

/// The login id the request's cookie carries.
fn login_id_of(c: &Custody, headers: &HeaderMap) -> Option<String> {
    credential::cookie(headers, &c.config().cookie_name)
}

async fn me(c: Arc<Custody>, State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(login_id) = login_id_of(&c, &headers) else {
        return json_error(StatusCode::UNAUTHORIZED, "not logged in");
    };
    match c.store().get(&login_id).await {
        Some(s) => {
            let tabs = app
                .hub
                .get(&s.user.id)
                .map(|session| session.tab_count())
                .unwrap_or(0);
            Json(json!({
                "user": {"id": s.user.id, "name": s.user.name},
                "tabs": tabs,
                "instance": app.instance,
            }))
            .into_response()
        }
        None => json_error(StatusCode::UNAUTHORIZED, "not logged in"),
    }
}

/// Drops the login (its server-side tokens), closes its tabs with "logged out", and returns the realm's end-session
/// URL.
async fn logout(c: Arc<Custody>, State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    // SameSite=Lax already keeps cross-site POSTs from carrying the cookie; an explicit foreign Origin is refused too.
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        if !crate::handshake::origin_allowed(&app, origin) {
            return json_error(StatusCode::FORBIDDEN, "origin not allowed");
        }
    }
    let Some(login_id) = login_id_of(&c, &headers) else {
        return json_error(StatusCode::UNAUTHORIZED, "not logged in");
    };
    let (stored, end) = c.logout(&login_id).await;
    if let Some(s) = &stored {
        close_tabs_of(&app, &s.user.id, &login_id);
    }
    let mut r = Json(json!({"loggedOut": stored.is_some(), "logoutUrl": end})).into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, cookie(&c, "", 0));
    r
}

/// Starts the login store's background work: a login removed on another instance (logout, back-channel logout)
/// closes its tabs here. Holds the app weakly: the store lives in the app.
pub fn start_store(c: &Custody, app: &Arc<App>) {
    let stop = app.stop.clone();
    let app = Arc::downgrade(app);
    c.store().start(
        stop,
        Arc::new(move |user, login_id| {
            if let Some(app) = app.upgrade() {
                close_tabs_of(&app, user, login_id);
            }
        }),
    );
}

fn close_tabs_of(app: &App, user: &str, login_id: &str) {
    if let Some(session) = app.hub.get(user) {
        session.close_login(
            login_id,
            "error",
            serde_json::json!({"message": "You have been logged out.", "loggedOut": true}),
            close_codes::LOGGED_OUT,
        );
    }
}

#[derive(Deserialize)]
struct LogoutForm {
    logout_token: Option<String>,
}

async fn backchannel_logout(
    c: Arc<Custody>,
    State(app): State<Arc<App>>,
    form: Result<Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Some(token) = form.ok().and_then(|f| f.0.logout_token) else {
        return json_error(StatusCode::BAD_REQUEST, "missing logout_token");
    };
    match c.backchannel_logout(&token).await {
        Ok(dropped) => {
            // Logins known only elsewhere: their instances close their tabs (the store announces the removal).
            for (login_id, s) in &dropped {
                if let Some(login_id) = login_id {
                    close_tabs_of(&app, &s.user.id, login_id);
                }
            }
            let mut r = StatusCode::OK.into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            let mut r = json_error(StatusCode::BAD_REQUEST, &e.to_string());
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
    }
}
