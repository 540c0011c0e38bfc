//! Discovery, JWKS, introspection, userinfo and RP-initiated logout.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::http::{
    bad_request, bearer, error_page, invalid_token, no_store, oauth_error, page, params, redirect,
    OAuthError,
};
use super::{lock, DevIssuer};

/// Keycloak's discovery document, limited to what this realm really does where a client would choose by it
/// (grant types, response types and modes, client authentication methods).
pub(super) async fn discovery(State(i): State<Arc<DevIssuer>>) -> Json<Value> {
    let base = format!("{}/protocol/openid-connect", i.issuer);
    let auth_methods = ["client_secret_basic", "client_secret_post"];
    Json(json!({
        "issuer": i.issuer,
        "authorization_endpoint": format!("{base}/auth"),
        "token_endpoint": format!("{base}/token"),
        "introspection_endpoint": format!("{base}/token/introspect"),
        "userinfo_endpoint": format!("{base}/userinfo"),
        "end_session_endpoint": format!("{base}/logout"),
        "jwks_uri": format!("{base}/certs"),
        "grant_types_supported": ["authorization_code", "refresh_token", "password", "client_credentials"],
        "acr_values_supported": ["0", "1"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": ["PS384", "ES384", "RS384", "HS256", "HS512", "ES256", "RS256", "HS384", "ES512", "PS256", "PS512", "RS512"],
        "userinfo_signing_alg_values_supported": ["none"],
        "response_modes_supported": ["query"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": auth_methods,
        "claims_supported": ["aud", "sub", "iss", "auth_time", "name", "given_name", "family_name", "preferred_username", "email", "acr"],
        "claim_types_supported": ["normal"],
        "claims_parameter_supported": false,
        "scopes_supported": ["openid", "profile", "email"],
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "code_challenge_methods_supported": ["plain", "S256"],
        "backchannel_logout_supported": true,
        "backchannel_logout_session_supported": true,
        "frontchannel_logout_supported": false,
        "authorization_response_iss_parameter_supported": true,
    }))
}

pub(super) async fn certs(State(i): State<Arc<DevIssuer>>) -> Response {
    i.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let body = i.published_jwks();
    (
        [
            (CONTENT_TYPE, "application/json"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// RFC 7662: `{"active": false}` for anything expired, revoked, of an ended session or not the realm's.
pub(super) async fn introspect(
    State(i): State<Arc<DevIssuer>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if i.is_unreachable() {
        return super::http::unavailable();
    }
    i.introspections.fetch_add(1, Ordering::SeqCst);
    match i.introspection(&headers, &body) {
        Ok(v) => no_store(v),
        Err(e) => e.into_response(),
    }
}

impl DevIssuer {
    fn introspection(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, OAuthError> {
        let form = params(body).map_err(|e| bad_request(&e))?;
        let client = self.authenticate_client(headers, &form)?;
        if !client.is_confidential() {
            return Err(oauth_error(
                StatusCode::FORBIDDEN,
                "invalid_request",
                "Client not allowed.",
            ));
        }
        let token = form
            .get("token")
            .ok_or_else(|| bad_request("Token not provided."))?;
        Ok(match self.active_claims(token) {
            Some(mut claims) => {
                claims["client_id"] = claims["azp"].clone();
                claims["username"] = claims["preferred_username"].clone();
                claims["token_type"] = claims["typ"].clone();
                claims["active"] = json!(true);
                claims
            }
            None => json!({"active": false}),
        })
    }
}

pub(super) async fn userinfo(State(i): State<Arc<DevIssuer>>, headers: HeaderMap) -> Response {
    let Some(token) = bearer(&headers) else {
        return invalid_token(&i.opts.realm, "Token not provided");
    };
    let Some(claims) = i.active_claims(token).filter(|c| c["typ"] == "Bearer") else {
        return invalid_token(&i.opts.realm, "Token verification failed");
    };
    let has_openid = claims["scope"]
        .as_str()
        .is_some_and(|s| s.split(' ').any(|s| s == "openid"));
    if !has_openid {
        return oauth_error(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "Missing openid scope",
        )
        .into_response();
    }
    let sub = claims["sub"].as_str().unwrap_or_default();
    match i.user_by_sub(sub) {
        Some(u) => Json(json!({
            "sub": u.sub,
            "email_verified": true,
            "name": u.name,
            "preferred_username": u.username,
            "given_name": u.given_name(),
            "family_name": u.family_name(),
            "email": u.email,
        }))
        .into_response(),
        None => invalid_token(&i.opts.realm, "User not found"),
    }
}

pub(super) async fn logout_get(State(i): State<Arc<DevIssuer>>, RawQuery(q): RawQuery) -> Response {
    match params(q.unwrap_or_default().as_bytes()) {
        Ok(p) => i.logout(&p).await,
        Err(e) => error_page(&e),
    }
}

pub(super) async fn logout_post(State(i): State<Arc<DevIssuer>>, body: Bytes) -> Response {
    match params(&body) {
        Ok(p) => i.logout(&p).await,
        Err(e) => error_page(&e),
    }
}

impl DevIssuer {
    /// RP-initiated logout: ends the session the `id_token_hint` names (an expired hint is fine, as in Keycloak),
    /// sends back-channel logout tokens to the session's clients that registered a URL, then redirects to the
    /// checked `post_logout_redirect_uri` or shows a page. Without a hint there is no session to end: the realm
    /// has no browser cookies.
    async fn logout(&self, p: &HashMap<String, String>) -> Response {
        let hint = match p.get("id_token_hint") {
            Some(h) => match self.verify_published(h).filter(|c| c["typ"] == "ID") {
                Some(c) => Some(c),
                None => return error_page("Invalid parameter: id_token_hint"),
            },
            None => None,
        };
        let hinted_client = hint.as_ref().and_then(|c| c["azp"].as_str());
        let client_id = match (p.get("client_id").map(String::as_str), hinted_client) {
            (Some(a), Some(b)) if a != b => {
                return error_page(
                    "Parameter client_id different than the client for which the id_token_hint was issued",
                )
            }
            (Some(a), _) => Some(a),
            (None, b) => b,
        };
        let client = match client_id {
            Some(id) => match self.client(id) {
                Some(c) => Some(c),
                None => return error_page("Client not found."),
            },
            None => None,
        };
        let after = match (p.get("post_logout_redirect_uri"), client) {
            (None, _) => None,
            (Some(_), None) => {
                return error_page(
                    "Either the parameter client_id or the parameter id_token_hint is required when post_logout_redirect_uri is used.",
                )
            }
            (Some(uri), Some(c)) if c.accepts_redirect(uri) => Some(uri.clone()),
            (Some(_), Some(_)) => return error_page("Invalid redirect uri"),
        };
        if let Some(sid) = hint.as_ref().and_then(|c| c["sid"].as_str()) {
            let ended = lock(&self.store).end_session(sid);
            if let Some(session) = ended {
                let sub = hint.as_ref().and_then(|c| c["sub"].as_str());
                self.notify_clients(sid, sub, &session.clients).await;
            }
        }
        match after.and_then(|a| url::Url::parse(&a).ok()) {
            Some(mut url) => {
                if let Some(s) = p.get("state") {
                    url.query_pairs_mut().append_pair("state", s);
                }
                redirect(url.as_str())
            }
            None => page(StatusCode::OK, "You are logged out", ""),
        }
    }

    /// Back-channel logout to each of `clients` with a URL, concurrently, as Keycloak does before answering.
    async fn notify_clients(
        &self,
        sid: &str,
        sub: Option<&str>,
        clients: &std::collections::BTreeSet<String>,
    ) {
        let sends = clients.iter().filter_map(|id| {
            let url = self.client(id)?.backchannel_logout_url.as_deref()?;
            let token = self.logout_token(id, Some(sid), sub);
            Some(async move {
                let status = self.send_backchannel_logout(url, &token).await;
                tracing::debug!(client = %id, status, "back-channel logout sent");
            })
        });
        futures_util::future::join_all(sends).await;
    }
}
