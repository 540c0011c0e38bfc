//! `/protocol/openid-connect/auth`: the browser login of the authorization code flow.
//!
//! `GET` checks the client and its `redirect_uri` first and, when either is wrong, answers a 400 page: never a
//! redirect to a URI the client did not register. Other problems are redirected back as `error=...`, as Keycloak
//! does. Then either the realm's `auto_approve` user is logged in at once (tests), or a login form is served whose
//! `POST` (same path, the request's parameters in hidden fields, checked again) logs the user in. A login opens a
//! Keycloak session and redirects with `code`, `state`, `session_state` and `iss` (RFC 9207).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::http::{error_page, escape, page, params, redirect};
use super::store::{Challenge, Code};
use super::{lock, now_ms, tokens, DevIssuer, CODE_LIFETIME_MS};

/// The request's parameters that the login form carries over to its `POST`.
const CARRIED: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "nonce",
    "scope",
    "code_challenge",
    "code_challenge_method",
];

/// A checked authorization request.
struct AuthRequest {
    client_id: String,
    redirect_uri: String,
    state: Option<String>,
    nonce: Option<String>,
    scope: String,
    challenge: Option<Challenge>,
    /// The carried parameters, for the form's hidden fields.
    carried: Vec<(String, String)>,
}

pub(super) async fn show(State(i): State<Arc<DevIssuer>>, RawQuery(q): RawQuery) -> Response {
    let p = match params(q.unwrap_or_default().as_bytes()) {
        Ok(p) => p,
        Err(e) => return error_page(&e),
    };
    let req = match i.check_request(&p) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if let Some(user) = &i.opts.auto_approve {
        return i.approve(&req, user);
    }
    if p.get("prompt").map(String::as_str) == Some("none") {
        return i.error_redirect(&req, "login_required", "User not logged in");
    }
    i.login_page(&req, None)
}

pub(super) async fn submit(State(i): State<Arc<DevIssuer>>, body: Bytes) -> Response {
    let p = match params(&body) {
        Ok(p) => p,
        Err(e) => return error_page(&e),
    };
    let req = match i.check_request(&p) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let user = p
        .get("username")
        .and_then(|u| i.user(u))
        .filter(|u| p.get("password") == Some(&u.password));
    match user {
        Some(u) => i.approve(&req, &u.username),
        None => i.login_page(&req, Some("Invalid username or password.")),
    }
}

impl DevIssuer {
    /// The request, or the answer refusing it (boxed: a `Response` is large).
    fn check_request(&self, p: &HashMap<String, String>) -> Result<AuthRequest, Box<Response>> {
        let Some(client_id) = p.get("client_id") else {
            return Err(Box::new(error_page("Missing parameter: client_id")));
        };
        let Some(client) = self.client(client_id) else {
            return Err(Box::new(error_page("Client not found.")));
        };
        let redirect_uri = match p.get("redirect_uri") {
            Some(r) if client.accepts_redirect(r) => r.clone(),
            _ => return Err(Box::new(error_page("Invalid parameter: redirect_uri"))),
        };
        let mut req = AuthRequest {
            client_id: client_id.clone(),
            redirect_uri,
            state: p.get("state").cloned(),
            nonce: p.get("nonce").cloned(),
            scope: Self::granted_scope(p.get("scope").map(String::as_str)),
            challenge: None,
            carried: CARRIED
                .iter()
                .filter_map(|k| p.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect(),
        };
        match p.get("response_type").map(String::as_str) {
            None => {
                return Err(Box::new(self.error_redirect(
                    &req,
                    "invalid_request",
                    "Missing parameter: response_type",
                )))
            }
            Some("code") => {}
            Some(_) => {
                return Err(Box::new(self.error_redirect(
                    &req,
                    "unsupported_response_type",
                    "Client is not allowed to initiate browser login with given response_type.",
                )))
            }
        }
        let challenge = p.get("code_challenge");
        req.challenge = match (
            p.get("code_challenge_method").map(String::as_str),
            challenge,
        ) {
            (Some(m), _) if m != "plain" && m != "S256" => {
                return Err(Box::new(self.error_redirect(
                    &req,
                    "invalid_request",
                    "Invalid parameter: code_challenge_method",
                )))
            }
            (Some(_), None) => {
                return Err(Box::new(self.error_redirect(
                    &req,
                    "invalid_request",
                    "Missing parameter: code_challenge",
                )))
            }
            (_, Some(c)) if !tokens::pkce_syntax_ok(c) => {
                return Err(Box::new(self.error_redirect(
                    &req,
                    "invalid_request",
                    "Invalid parameter: code_challenge",
                )))
            }
            (Some("S256"), Some(c)) => Some(Challenge::S256(c.clone())),
            (_, Some(c)) => Some(Challenge::Plain(c.clone())),
            (None, None) => None,
        };
        Ok(req)
    }

    /// Logs `username` in: a new session, a code, the redirect.
    fn approve(&self, req: &AuthRequest, username: &str) -> Response {
        let now = now_ms();
        let (sid, code) = {
            let mut st = lock(&self.store);
            let sid = st.open_session(username, now);
            let code = st.add_code(
                Code {
                    client_id: req.client_id.clone(),
                    redirect_uri: req.redirect_uri.clone(),
                    sid: sid.clone(),
                    nonce: req.nonce.clone(),
                    scope: req.scope.clone(),
                    challenge: req.challenge.clone(),
                    exp_ms: now + CODE_LIFETIME_MS,
                },
                now,
            );
            (sid, code)
        };
        self.back_to_client(
            req,
            &[
                ("session_state", &sid),
                ("iss", &self.issuer),
                ("code", &code),
            ],
        )
    }

    fn error_redirect(&self, req: &AuthRequest, error: &str, description: &str) -> Response {
        self.back_to_client(
            req,
            &[
                ("error", error),
                ("error_description", description),
                ("iss", &self.issuer),
            ],
        )
    }

    /// Redirects to the request's (checked) `redirect_uri` with `state` and `extra` in the query.
    fn back_to_client(&self, req: &AuthRequest, extra: &[(&str, &str)]) -> Response {
        let Ok(mut url) = url::Url::parse(&req.redirect_uri) else {
            return error_page("Invalid parameter: redirect_uri");
        };
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &req.state {
                q.append_pair("state", s);
            }
            for (k, v) in extra {
                q.append_pair(k, v);
            }
        }
        redirect(url.as_str())
    }

    /// The login form, and one button per user (development only: their passwords are in the page).
    fn login_page(&self, req: &AuthRequest, error: Option<&str>) -> Response {
        let hidden: String = req
            .carried
            .iter()
            .map(|(k, v)| {
                format!(
                    "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                    escape(k),
                    escape(v)
                )
            })
            .collect();
        let mut body = String::new();
        if let Some(e) = error {
            body.push_str(&format!("<p class=\"error\">{}</p>", escape(e)));
        }
        body.push_str(&format!(
            "<form method=\"post\" action=\"auth\">{hidden}\
             <p><label>Username <input name=\"username\" autofocus></label></p>\
             <p><label>Password <input name=\"password\" type=\"password\"></label></p>\
             <p><button type=\"submit\">Sign In</button></p></form><h2>Development users</h2>"
        ));
        for u in &self.opts.users {
            body.push_str(&format!(
                "<form method=\"post\" action=\"auth\">{hidden}\
                 <input type=\"hidden\" name=\"username\" value=\"{n}\">\
                 <input type=\"hidden\" name=\"password\" value=\"{pw}\">\
                 <button type=\"submit\">Sign in as {n}</button></form>",
                n = escape(&u.username),
                pw = escape(&u.password),
            ));
        }
        page(
            StatusCode::OK,
            &format!("Sign in to {}", self.opts.realm),
            &body,
        )
    }
}
