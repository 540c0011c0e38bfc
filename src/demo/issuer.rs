//! The development issuer. FOR DEVELOPMENT ONLY: its signing keys are public fixtures and its passwords are the
//! user names.
//!
//! The development issuer is shaped like a Keycloak realm at `/realms/demo`: discovery, JWKS, and a token endpoint
//! accepting `grant_type=password` for `alice`/`alice` and `bob`/`bob` with `client_id=tabhub-demo`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use jsonwebtoken::{EncodingKey, Header};
use serde::Deserialize;
use serde_json::{json, Value};


/// The demo realm's client id.
pub const CLIENT_ID: &str = "tabhub-demo";
/// The demo users: (user name = password, `sub`).
pub const USERS: &[(&str, &str)] = &[
    ("alice", "5f1d2e3a-0000-4000-8000-00000000a11c"),
    ("bob", "5f1d2e3a-0000-4000-8000-000000000b0b"),
];

const SIGNING_KEY: &str = include_str!("../../fixtures/keys/rs256-a.pem");
const SIGNING_KID: &str = "fixture-rs256-a";
const JWKS: &str = include_str!("../../fixtures/keys/jwks.json");

/// Access tokens' lifetime (Keycloak's default is 5 minutes).
const TOKEN_LIFETIME_SECS: u64 = 300;

/// The development issuer.
pub struct DevIssuer {
    issuer: String,
    key: EncodingKey,
}

impl DevIssuer {
    /// An issuer whose URL is `base` + `/realms/demo`.
    pub fn new(base: &str) -> Result<Arc<DevIssuer>, jsonwebtoken::errors::Error> {
        Ok(Arc::new(DevIssuer {
            issuer: format!("{}/realms/demo", base.trim_end_matches('/')),
            key: EncodingKey::from_rsa_pem(SIGNING_KEY.as_bytes())?,
        }))
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The realm's routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/realms/demo/.well-known/openid-configuration",
                get(discovery),
            )
            .route("/realms/demo/protocol/openid-connect/certs", get(certs))
            .route("/realms/demo/protocol/openid-connect/token", post(token))
            .with_state(self.clone())
    }

    /// Signs an access token for `user` (one of [`USERS`]).
    pub fn mint(&self, user: &str, sub: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(SIGNING_KID.into());
        let claims = json!({
            "exp": now + TOKEN_LIFETIME_SECS,
            "iat": now,
            "jti": format!("{:x}", rand::random::<u128>()),
            "iss": self.issuer,
            "aud": "account",
            "sub": sub,
            "typ": "Bearer",
            "azp": CLIENT_ID,
            "sid": format!("{:x}", rand::random::<u64>()),
            "scope": "openid profile email",
            "preferred_username": user,
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
    }
}

async fn discovery(State(i): State<Arc<DevIssuer>>) -> Json<Value> {
    let base = format!("{}/protocol/openid-connect", i.issuer);
    Json(json!({
        "issuer": i.issuer,
        "authorization_endpoint": format!("{base}/auth"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/certs"),
        "end_session_endpoint": format!("{base}/logout"),
        "grant_types_supported": ["authorization_code", "refresh_token", "password"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
}

async fn certs() -> Response {
    ([("content-type", "application/json")], JWKS).into_response()
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn token(State(i): State<Arc<DevIssuer>>, Form(f): Form<TokenForm>) -> Response {
    if f.grant_type != "password" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "the demo issuer supports grant_type=password",
        );
    }
    if f.client_id.as_deref() != Some(CLIENT_ID) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_id must be tabhub-demo",
        );
    }
    let user = f.username.unwrap_or_default();
    let Some((name, sub)) = USERS
        .iter()
        .find(|(u, _)| *u == user && f.password.as_deref() == Some(*u))
    else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "Invalid user credentials",
        );
    };
    match i.mint(name, sub) {
        Ok(t) => Json(json!({
            "access_token": t,
            "expires_in": TOKEN_LIFETIME_SECS,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "scope": "openid profile email",
        }))
        .into_response(),
        Err(_) => oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "signing failed",
        ),
    }
}

