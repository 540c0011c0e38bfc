//! HTTP plumbing shared by the endpoints: parameters, client authentication, and Keycloak's error shapes (JSON
//! `{"error", "error_description"}` for the OAuth endpoints, a small HTML page for the browser ones).

use std::collections::HashMap;

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};

use super::options::ClientSpec;
use super::DevIssuer;

/// Request parameters (a query string or a form body). Keycloak refuses a repeated parameter: so does this.
pub(super) fn params(raw: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw) {
        if out.insert(k.to_string(), v.into_owned()).is_some() {
            return Err(format!("duplicated parameter: {k}"));
        }
    }
    Ok(out)
}

/// A refused OAuth request, answered as Keycloak does: `{"error", "error_description"}` with a status. Kept apart
/// from `Response` because it is small enough to travel in a `Result`.
#[derive(Debug)]
pub(super) struct OAuthError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(CACHE_CONTROL, "no-store")],
            Json(json!({"error": self.error, "error_description": self.description})),
        )
            .into_response()
    }
}

pub(super) fn oauth_error(
    status: StatusCode,
    error: &'static str,
    description: &str,
) -> OAuthError {
    OAuthError {
        status,
        error,
        description: description.into(),
    }
}

pub(super) fn bad_request(description: &str) -> OAuthError {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

pub(super) fn invalid_grant(description: &str) -> OAuthError {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

pub(super) fn invalid_client() -> OAuthError {
    oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "Invalid client or Invalid client credentials",
    )
}

pub(super) fn server_error() -> OAuthError {
    oauth_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "signing failed",
    )
}

/// A successful JSON answer, never cached (tokens).
pub(super) fn no_store(body: Value) -> Response {
    ([(CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// What a down Keycloak behind a reverse proxy answers.
pub(super) fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(CONTENT_TYPE, "text/html")],
        "<html><body><h1>503 Service Unavailable</h1>No server is available to handle this request.</body></html>",
    )
        .into_response()
}

/// A bearer-token failure at the userinfo endpoint: 401 with `WWW-Authenticate`, as Keycloak.
pub(super) fn invalid_token(realm: &str, description: &str) -> Response {
    let challenge = format!(
        "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{description}\""
    );
    (
        StatusCode::UNAUTHORIZED,
        [(WWW_AUTHENTICATE, challenge)],
        Json(json!({"error": "invalid_token", "error_description": description})),
    )
        .into_response()
}

pub(super) fn redirect(location: &str) -> Response {
    (StatusCode::FOUND, [(LOCATION, location)]).into_response()
}

/// A small HTML page: the login form, an error page, "logged out".
pub(super) fn page(status: StatusCode, title: &str, body_html: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;max-width:28em;margin:3em auto}}.error{{color:#b00}}\
         form{{margin:.5em 0}}</style></head><body><h1>{t}</h1>{body_html}</body></html>",
        t = escape(title)
    );
    (
        status,
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// An error page for the browser endpoints, where redirecting is not safe (unknown client or redirect URI).
pub(super) fn error_page(message: &str) -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "We are sorry...",
        &format!("<p class=\"error\">{}</p>", escape(message)),
    )
}

pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The `Authorization: Bearer` token, if any.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// HTTP Basic client credentials: `client_id:client_secret`, each form-urlencoded (RFC 6749 section 2.3.1).
fn basic(headers: &HeaderMap) -> Option<Result<(String, String), ()>> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let parsed = (|| {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (id, secret) = text.split_once(':')?;
        let dec = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        };
        Some((dec(id)?, dec(secret)?))
    })();
    Some(parsed.ok_or(()))
}

impl DevIssuer {
    /// The client a token or introspection request comes from: HTTP Basic first, else the `client_id` and
    /// `client_secret` form fields. A confidential client must present its secret; a public one only its id.
    pub(super) fn authenticate_client(
        &self,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
    ) -> Result<&ClientSpec, OAuthError> {
        let (id, secret) = match basic(headers) {
            Some(Ok((id, secret))) => {
                if form.get("client_id").is_some_and(|f| *f != id) {
                    return Err(invalid_client());
                }
                (id, Some(secret))
            }
            Some(Err(())) => return Err(invalid_client()),
            None => match form.get("client_id") {
                Some(id) => (id.clone(), form.get("client_secret").cloned()),
                None => {
                    return Err(oauth_error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        "Missing parameter: client_id",
                    ))
                }
            },
        };
        let client = self.client(&id).ok_or_else(invalid_client)?;
        match &client.secret {
            Some(expected) if secret.as_deref() != Some(expected.as_str()) => Err(invalid_client()),
            _ => Ok(client),
        }
    }
}
