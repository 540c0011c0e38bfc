//! `POST {hooks.path}` (default `/hooks/gitlab`): GitLab's webhooks (project, group and system hooks), the
//! webhook source of `/project/<id>/<eventType>` topics.
//!
//! GitLab waits at most 10 s, counts a 4xx, 5xx or timeout as a failure and disables a hook after 4 failures in a
//! row, so the receiver answers at once and delivers after, and never answers 4xx to a well-formed delivery it
//! merely cannot route. Answers: 200 `{"accepted": true}` (delivered to every instance, or a duplicate dropped);
//! 200 `{"ignored": ...}` for a well-formed event that names no project; 401 without a configured
//! `X-Gitlab-Token`; 413 beyond `hooks.max_body_bytes`; 400 naming what is malformed; 503 when the broker cannot
//! take it (GitLab retries). With no `hooks.secrets` the route does not exist (404).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;
use crate::history::{DeliveryKey, HookEvent};
use crate::hooks::{delivery, secret};
use crate::responses::json_error;

pub fn router(path: &str) -> Router<Arc<App>> {
    Router::new().route(path, post(receive))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn receive(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let count = |kind: Option<&str>, outcome: &str| {
        app.metrics
            .hook_deliveries
            .inc(&[delivery::kind_label(kind), outcome]);
    };
    let token = headers.get("x-gitlab-token").map(|v| v.as_bytes());
    if !secret::accepted(token, &app.config.hooks.secrets) {
        count(None, "unauthorized");
        return json_error(StatusCode::UNAUTHORIZED, "missing or wrong X-Gitlab-Token");
    }
    let max = app.config.hooks.max_body_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, max).await else {
        count(None, "too_large");
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {max} bytes (hooks.max_body_bytes)"),
        );
    };
    let parsed = match delivery::parse(&bytes, header(&headers, "x-gitlab-event")) {
        Ok(p) => p,
        Err(why) => {
            count(None, "malformed");
            return json_error(StatusCode::BAD_REQUEST, &why);
        }
    };
    let kind = parsed.kind;
    let Some(event) = parsed.event else {
        count(Some(&kind), "ignored");
        return Json(json!({"ignored": "the event names no project"})).into_response();
    };
    let key = delivery::key(headers.get("idempotency-key").map(|v| v.as_bytes()), &bytes);
    if app.broker.in_process() {
        // Delivery takes as long as the fan-out: after the answer.
        let app = app.clone();
        tokio::spawn(async move { publish(&app, &kind, event, key).await });
        return accepted();
    }
    match publish(&app, &kind, event, key).await {
        Ok(()) => accepted(),
        Err(why) => json_error(StatusCode::SERVICE_UNAVAILABLE, &why),
    }
}

fn accepted() -> Response {
    Json(json!({"accepted": true})).into_response()
}

/// Gives the event its id and hands it to every instance; counts the outcome.
async fn publish(app: &App, kind: &str, event: HookEvent, key: DeliveryKey) -> Result<(), String> {
    let project = event.project.clone();
    let outcome = match app.broker.publish_hook(event, key).await {
        Ok(Some(_)) => "accepted",
        Ok(None) => "duplicate",
        Err(e) => {
            tracing::warn!(error = %e, project, kind, "webhook event not published");
            app.metrics
                .hook_deliveries
                .inc(&[delivery::kind_label(Some(kind)), "unavailable"]);
            return Err(e.to_string());
        }
    };
    app.metrics
        .hook_deliveries
        .inc(&[delivery::kind_label(Some(kind)), outcome]);
    Ok(())
}
