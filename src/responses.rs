//! Answers of the HTTP layer that several routes share.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A JSON error answer, `{"error": message}`. The message is read by the peer: it never carries a token.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}
