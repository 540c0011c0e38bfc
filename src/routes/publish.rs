//! `POST /api/publish`.
//!
//! Body: one message `{"target": {"user": "<sub>"} | {"topic": "/events/..."} | {"broadcast": true}, "type": "...",
//! "data": {...}}`, or a batch `{"messages": [ ... ]}` delivered in order. Authentication: `Authorization: Bearer`
//! with a client-credentials access token of a client in `publish.clients` (verified like any token), or the static
//! `publish.shared_secret`. Answers: 200 `{"published": n, "ids": [...]}`; 400 naming the problem; 401 without
//! valid credentials; 403 for a client not allowed to publish; 413 beyond `publish.max_body_bytes`; 503 (with
//! `Retry-After`) when the broker is unavailable, or the token cannot be checked now (keys not loaded, a signing key
//! newer than the last key fetch).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tabhub_commands::Topic;

use crate::app::App;
use crate::auth::kind::Refusal;
use crate::auth::verify::VerifyError;
use crate::auth::AuthError;
use crate::protocol;
use crate::publish::message::{new_id, Message, Target};
use crate::responses::json_error;

pub fn router() -> Router<Arc<App>> {
    Router::new().route("/api/publish", post(publish))
}

fn error(status: StatusCode, message: &str) -> Response {
    let mut r = json_error(status, message);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// Equal-time comparison, so the shared secret cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A publisher's credentials: the shared secret, or an access token of a client in `publish.clients`, verified as
/// every token is (signature, claims, and the rule of `crate::auth::kind`: a Keycloak service account's token and
/// a standard RFC 9068 client-credentials token alike; never an ID token).
async fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    let token = crate::auth::credential::bearer(headers)
        .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "missing bearer credentials"))?;
    let secret = &app.config.publish.shared_secret;
    if !secret.is_empty() && same(token.as_bytes(), secret.as_bytes()) {
        return Ok(());
    }
    match app
        .realm
        .verify_access(token, &app.config.publish.clients)
        .await
    {
        Ok(_) => Ok(()),
        Err(VerifyError::Refused(Refusal::OtherClient)) => Err(error(
            StatusCode::FORBIDDEN,
            "this client is not allowed to publish",
        )),
        Err(VerifyError::Refused(r)) => Err(error(StatusCode::UNAUTHORIZED, r.message())),
        Err(VerifyError::Auth(e @ (AuthError::Unavailable | AuthError::Retry(_)))) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Err(r)
        }
        Err(VerifyError::Auth(e)) => Err(error(StatusCode::UNAUTHORIZED, &e.to_string())),
    }
}

/// A message as a publisher writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming {
    target: Target,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

/// Parses and checks the body; the error names the problem and where.
fn parse(app: &App, bytes: &[u8]) -> Result<Vec<Message>, String> {
    let body: Value = serde_json::from_slice(bytes).map_err(|e| format!("malformed JSON: {e}"))?;
    let (items, batch) = match body {
        Value::Object(mut o) if o.contains_key("messages") => {
            if o.len() != 1 {
                return Err("a batch is {\"messages\": [...]} and nothing else".into());
            }
            match o.remove("messages") {
                Some(Value::Array(a)) => (a, true),
                _ => return Err("'messages' must be an array".into()),
            }
        }
        other @ Value::Object(_) => (vec![other], false),
        _ => return Err("the body must be a JSON object".into()),
    };
    if items.is_empty() {
        return Err("'messages' is empty".into());
    }
    let max = app.config.publish.max_batch;
    if items.len() > max {
        return Err(format!("at most {max} messages per batch"));
    }
    let timestamp = protocol::timestamp(std::time::SystemTime::now());
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = if batch {
            format!("messages[{i}]: ")
        } else {
            String::new()
        };
        let m: Incoming = serde_path_to_error::deserialize(item).map_err(|e| {
            let path = e.path().to_string();
            format!(
                "{at}{}{}",
                if path == "." {
                    String::new()
                } else {
                    format!("{path}: ")
                },
                e.into_inner()
            )
        })?;
        if m.kind.is_empty() || m.kind.len() > 100 {
            return Err(format!("{at}'type' must be 1-100 characters"));
        }
        match &m.target {
            Target::User(u) if u.is_empty() => return Err(format!("{at}target.user is empty")),
            Target::Broadcast(false) => return Err(format!("{at}target.broadcast must be true")),
            Target::Topic(t) => {
                let ok = matches!(Topic::parse(t), Ok(Topic::Channel(_)))
                    && app.config.publish.allows_channel(t);
                if !ok {
                    return Err(format!(
                        "{at}target.topic {t:?} is not in a publish namespace ({})",
                        app.config.publish.namespaces.join(", ")
                    ));
                }
            }
            _ => {}
        }
        out.push(Message {
            target: m.target,
            kind: m.kind,
            data: if m.data.is_null() { json!({}) } else { m.data },
            id: new_id(),
            timestamp: timestamp.clone(),
        });
    }
    Ok(out)
}

/// A message larger than a tab's whole outbound queue could only close every tab it reaches (4009), and again at
/// every replay: it is refused at publish (413), naming the limit.
fn check_sizes(app: &App, messages: &[Message]) -> Result<(), String> {
    let room = app.config.websocket.outbound_queue_bytes;
    for (i, m) in messages.iter().enumerate() {
        let topic = match &m.target {
            Target::Topic(t) => Some(t.as_str()),
            _ => None,
        };
        let size = protocol::encode_published("broadcast", &m.kind, &m.data, &m.id, topic).len();
        if size > room {
            return Err(format!(
                "messages[{i}] takes {size} bytes as delivered, more than a tab can queue \
                 (websocket.outbound_queue_bytes = {room})"
            ));
        }
    }
    Ok(())
}

async fn publish(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = authorize(&app, &headers).await {
        app.metrics.publish_requests.inc(&[r.status().as_str()]);
        return r;
    }
    let max = app.config.publish.max_body_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, max).await else {
        app.metrics.publish_requests.inc(&["413"]);
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {max} bytes (publish.max_body_bytes)"),
        );
    };
    let messages = match parse(&app, &bytes) {
        Ok(m) => m,
        Err(why) => {
            app.metrics.publish_requests.inc(&["400"]);
            return error(StatusCode::BAD_REQUEST, &why);
        }
    };
    if let Err(why) = check_sizes(&app, &messages) {
        app.metrics.publish_requests.inc(&["413"]);
        return error(StatusCode::PAYLOAD_TOO_LARGE, &why);
    }
    match app.broker.publish(&app.instance, messages).await {
        Ok(ids) => {
            app.metrics.publish_requests.inc(&["200"]);
            Json(json!({"published": ids.len(), "ids": ids})).into_response()
        }
        Err(e) => {
            app.metrics.publish_requests.inc(&["503"]);
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
    }
}
