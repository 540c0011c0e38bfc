//! `POST /protocol/openid-connect/token`: the grants, with Keycloak's checks in Keycloak's order and its error
//! codes and descriptions.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::http::{
    bad_request, invalid_grant, no_store, oauth_error, params, server_error, OAuthError,
};
use super::options::ClientSpec;
use super::store::AccessRecord;
use super::{lock, now_ms, tokens, DevIssuer};

const GRANTS: &[&str] = &[
    "password",
    "authorization_code",
    "refresh_token",
    "client_credentials",
];

pub(super) async fn token(
    State(i): State<Arc<DevIssuer>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if i.is_unreachable() {
        return super::http::unavailable();
    }
    let form = match params(&body) {
        Ok(f) => f,
        Err(e) => return bad_request(&e).into_response(),
    };
    let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
    *lock(&i.token_requests).entry(grant.into()).or_default() += 1;
    if grant.is_empty() {
        return bad_request("Missing form parameter: grant_type").into_response();
    }
    if !GRANTS.contains(&grant) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Unsupported grant_type",
        )
        .into_response();
    }
    let client = match i.authenticate_client(&headers, &form) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = match grant {
        "password" => i.password(client, &form),
        "authorization_code" => i.authorization_code(client, &form),
        "refresh_token" => i.refresh(client, &form),
        _ => i.client_credentials(client),
    };
    match result {
        Ok(body) => no_store(body),
        Err(e) => e.into_response(),
    }
}

type Grant = Result<serde_json::Value, OAuthError>;

impl DevIssuer {
    /// Direct access grant: a new session for the user.
    fn password(&self, client: &ClientSpec, form: &HashMap<String, String>) -> Grant {
        let user = form
            .get("username")
            .and_then(|u| self.user(u))
            .filter(|u| form.get("password") == Some(&u.password))
            .ok_or_else(|| {
                oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_grant",
                    "Invalid user credentials",
                )
            })?;
        let sid = lock(&self.store).open_session(&user.username, now_ms());
        let scope = Self::granted_scope(form.get("scope").map(String::as_str));
        self.session_tokens(user, &client.id, &sid, &scope, None, true)
    }

    /// The code from `/auth`: single use, same client and `redirect_uri`, PKCE verifier against the challenge.
    fn authorization_code(&self, client: &ClientSpec, form: &HashMap<String, String>) -> Grant {
        let code_id = form
            .get("code")
            .ok_or_else(|| bad_request("Missing parameter: code"))?;
        let code = lock(&self.store)
            .take_code(code_id, now_ms())
            .ok_or_else(|| invalid_grant("Code not valid"))?;
        if code.client_id != client.id {
            return Err(invalid_grant("Auth error"));
        }
        if form.get("redirect_uri") != Some(&code.redirect_uri) {
            return Err(invalid_grant("Incorrect redirect_uri"));
        }
        match (&code.challenge, form.get("code_verifier")) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(invalid_grant(
                    "PKCE code verifier specified but challenge not present in authorization",
                ))
            }
            (Some(_), None) => return Err(invalid_grant("PKCE code verifier not specified")),
            (Some(c), Some(v)) => {
                if !tokens::pkce_syntax_ok(v) {
                    return Err(invalid_grant(
                        "PKCE verification failed: Invalid code verifier",
                    ));
                }
                if !tokens::pkce_matches(c, v) {
                    return Err(invalid_grant("PKCE verification failed: Code mismatch"));
                }
            }
        }
        let username = lock(&self.store)
            .session(&code.sid)
            .map(|s| s.username.clone())
            .ok_or_else(|| invalid_grant("Session not active"))?;
        let user = self
            .user(&username)
            .ok_or_else(|| invalid_grant("User not found"))?;
        self.session_tokens(
            user,
            &client.id,
            &code.sid,
            &code.scope,
            code.nonce.as_deref(),
            true,
        )
    }

    /// Refresh with rotation: the presented refresh token is spent, a new one comes back.
    fn refresh(&self, client: &ClientSpec, form: &HashMap<String, String>) -> Grant {
        let token = form
            .get("refresh_token")
            .ok_or_else(|| bad_request("Missing parameter: refresh_token"))?;
        let claims = self
            .keys
            .verify_refresh(token, &self.issuer)
            .filter(|c| c["typ"] == "Refresh")
            .ok_or_else(|| invalid_grant("Invalid refresh token"))?;
        if claims["azp"] != client.id.as_str() {
            return Err(invalid_grant(
                "Invalid refresh token. Token client and authorized client don't match",
            ));
        }
        let jti = claims["jti"].as_str().unwrap_or_default();
        let sid = claims["sid"].as_str().unwrap_or_default();
        let now = now_ms();
        let (record, username) = {
            let mut st = lock(&self.store);
            let Some(username) = st.session(sid).map(|s| s.username.clone()) else {
                return Err(invalid_grant("Session not active"));
            };
            let record = st
                .take_refresh(jti)
                .filter(|r| r.exp_ms > now)
                .ok_or_else(|| invalid_grant("Token is not active"))?;
            (record, username)
        };
        let user = self
            .user(&username)
            .ok_or_else(|| invalid_grant("User not found"))?;
        self.session_tokens(
            user,
            &client.id,
            &record.sid,
            &record.scope,
            record.nonce.as_deref(),
            true,
        )
    }

    /// A service account's token: `sub` = the service-account user, no session, no refresh token.
    fn client_credentials(&self, client: &ClientSpec) -> Grant {
        if !client.is_confidential() {
            return Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized_client",
                "Public client not allowed to retrieve service account",
            ));
        }
        if !client.service_account {
            return Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized_client",
                "Client not enabled to retrieve service account",
            ));
        }
        let now = now_ms();
        let life = self.access_ms.load(std::sync::atomic::Ordering::SeqCst);
        let jti = super::store::uuid();
        lock(&self.store).add_access(&jti, AccessRecord { exp_ms: now + life }, now);
        let claims = tokens::service_claims(
            &self.issuer,
            &client.id,
            &tokens::service_account_sub(&self.opts.realm, &client.id),
            &jti,
            now / 1000,
            (now + life) / 1000,
        );
        let token = self.keys.sign(&claims, "JWT").map_err(|_| server_error())?;
        Ok(serde_json::json!({
            "access_token": token,
            "expires_in": life / 1000,
            "refresh_expires_in": 0,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "scope": "profile email",
        }))
    }
}
