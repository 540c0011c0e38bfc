//! The websocket upgrade: checks the request, the `Origin` and the credential before answering 101, then hands the
//! socket to [`crate::connection`].
//!
//! Authentication happens here, before the upgrade (tungstenite's `accept_hdr` callback is synchronous and cannot
//! verify a token). A disallowed origin gets 403 and no upgrade. A missing, invalid or expired credential is
//! upgraded anyway and reported in-band (`error`, then a close code), because a browser cannot read the body of a
//! refused upgrade.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::app::App;
use crate::auth::credential::{self, Source};
use crate::auth::{AuthError, Verified};
use crate::custody::CustodyError;
use crate::profile::Profile;
use crate::responses::json_error;

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// Verifies the credential: a token against the realm, or a custody session through its stored (and, when
/// near expiry, refreshed) token; then, if configured, introspects it.
async fn authenticate(app: &App, cred: Option<(String, Source)>) -> Result<Verified, AuthError> {
    let verified = match (cred, &app.custody) {
        (None, _) if app.config.auth.allow_anonymous => return Ok(Verified::anonymous()),
        (None, _) => return Err(AuthError::Missing),
        (Some((login_id, Source::Login)), Some(custody)) => {
            custody.fresh_token(&login_id).await.map_err(|e| match e {
                CustodyError::NoLogin => AuthError::NoLogin,
                CustodyError::Rejected => AuthError::Expired,
                _ => AuthError::Unavailable,
            })?
        }
        (Some((token, _)), _) => return app.verify_token(&token).await,
    };
    app.check_revocation(&verified).await?;
    Ok(verified)
}

/// The client's address: the peer, or behind a trusted proxy the last `X-Forwarded-For` entry.
pub(crate) fn client_address(app: &App, peer: SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
    if app.config.limits.trust_forwarded_for {
        let last = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .next_back();
        if let Some(a) = last {
            return a;
        }
    }
    peer.ip()
}

/// Whether `origin` may open a websocket.
pub fn origin_allowed(app: &App, origin: &str) -> bool {
    app.config.origins.allowed.iter().any(|o| o == origin)
}

pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    if !header_has(headers, header::UPGRADE, "websocket")
        || !header_has(headers, header::CONNECTION, "upgrade")
    {
        app.metrics.handshakes.inc(&["bad_request"]);
        return json_error(
            StatusCode::BAD_REQUEST,
            "expected a websocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        app.metrics.handshakes.inc(&["bad_request"]);
        let mut r = json_error(
            StatusCode::UPGRADE_REQUIRED,
            "websocket version 13 required",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        app.metrics.handshakes.inc(&["bad_request"]);
        return json_error(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let addr = client_address(&app, peer, headers);
    if !app.upgrades.take(addr) {
        app.metrics.handshakes.inc(&["rate_limited"]);
        let mut r = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connection attempts from this address; retry later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    if app.is_draining() {
        app.metrics.handshakes.inc(&["draining"]);
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server is draining; reconnect shortly",
        );
    }

    let session_cookie = app
        .custody
        .as_ref()
        .map(|c| c.config().cookie_name.as_str())
        .unwrap_or("");
    let cred = credential::extract(headers, &app.config.auth.token_cookie, session_cookie);
    // Cookies ride along with any cross-site request: with a cookie credential the Origin check is mandatory
    // (cross-site websocket hijacking), whatever `origins.allow_missing` says.
    let cookie_cred = matches!(cred, Some((_, Source::Cookie | Source::Login)));
    match headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or(""))
    {
        Some(origin) if !origin_allowed(&app, origin) => {
            app.metrics.handshakes.inc(&["bad_origin"]);
            return json_error(StatusCode::FORBIDDEN, "origin not allowed");
        }
        Some(_) => {}
        None if app.config.origins.allow_missing && !cookie_cred => {}
        None => {
            app.metrics.handshakes.inc(&["bad_origin"]);
            return json_error(StatusCode::FORBIDDEN, "missing Origin header");
        }
    }

    let auth = authenticate(&app, cred).await;
    app.metrics.handshakes.inc(&[match &auth {
        Ok(v) if v.anonymous => "anonymous",
        Ok(_) => "ok",
        Err(AuthError::Missing | AuthError::NoLogin) => "missing_credential",
        Err(AuthError::Expired) => "expired",
        Err(AuthError::Revoked) => "revoked",
        Err(AuthError::Invalid(_)) => "invalid_token",
        Err(AuthError::Unavailable) => "unavailable",
        Err(AuthError::Retry(_)) => "retry",
    }]);

    let offers_subprotocol =
        credential::subprotocols(req.headers()).any(|p| p == credential::SUBPROTOCOL);
    // A tab that offers no subprotocol is Renku's own client (see `crate::profile`).
    let profile = if offers_subprotocol {
        Profile::Tabhub
    } else {
        Profile::Renku {
            older: app.config.websocket.renku_older_client,
        }
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return json_error(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };
    let w = &app.config.websocket;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(w.read_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(w.outbound_queue_bytes.max(w.max_message_bytes) * 2)
        .max_message_size(Some(w.max_message_bytes))
        .max_frame_size(Some(w.max_message_bytes));
    // Tracked, so that a drain waits for the writers to send their close frames.
    app.tasks.clone().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                crate::connection::run(app, ws, auth, peer, profile).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });

    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if offers_subprotocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(credential::SUBPROTOCOL),
        );
    }
    resp
}
