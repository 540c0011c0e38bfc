//! A fixture Keycloak realm: Keycloak's paths and document shapes (discovery, JWKS, token endpoint), signing keys
//! from `fixtures/keys`, and knobs for the tests (rotate keys, count requests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/keys");

fn read_key(name: &str) -> String {
    std::fs::read_to_string(format!("{KEYS}/{name}")).unwrap()
}

pub struct Keycloak {
    pub addr: SocketAddr,
    state: Arc<KcState>,
}

struct KcState {
    issuer: String,
    jwks: Mutex<String>,
    pub jwks_fetches: AtomicUsize,
    pub discovery_fetches: AtomicUsize,
}

/// What a minted token says and how it is signed.
#[derive(Clone)]
pub struct TokenSpec {
    pub user: String,
    /// Signing key file (`rs256-a.pem`, `es256-a.pem`, `rs256-b.pem`, `rogue.pem`) or `hmac` / `none`.
    pub key: String,
    pub kid: Option<String>,
    pub iss: Option<String>,
    pub azp: String,
    pub aud: Value,
    pub typ: String,
    /// Seconds from now (negative: already expired).
    pub exp_in: i64,
    pub nbf_in: Option<i64>,
}

impl TokenSpec {
    pub fn user(user: &str) -> Self {
        TokenSpec {
            user: user.into(),
            key: "rs256-a.pem".into(),
            kid: Some("fixture-rs256-a".into()),
            iss: None,
            azp: "renku-ui".into(),
            aud: json!("account"),
            typ: "Bearer".into(),
            exp_in: 300,
            nbf_in: None,
        }
    }
    pub fn exp_in(mut self, s: i64) -> Self {
        self.exp_in = s;
        self
    }
    pub fn key(mut self, file: &str, kid: &str) -> Self {
        self.key = file.into();
        self.kid = Some(kid.into());
        self
    }
}

/// The `sub` of a test user: a stable UUID-like id derived from the name.
pub fn sub_of(user: &str) -> String {
    format!(
        "00000000-0000-4000-8000-{:012x}",
        fnv(user) & 0xffff_ffff_ffff
    )
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Keycloak {
    /// Starts the realm `test`, serving `jwks.json`.
    pub async fn start() -> Keycloak {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(KcState {
            issuer: format!("http://{addr}/realms/test"),
            jwks: Mutex::new(read_key("jwks.json")),
            jwks_fetches: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route(
                "/realms/test/.well-known/openid-configuration",
                get(discovery),
            )
            .route("/realms/test/protocol/openid-connect/certs", get(certs))
            .route("/realms/test/protocol/openid-connect/token", post(token))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Keycloak { addr, state }
    }

    pub fn issuer(&self) -> String {
        self.state.issuer.clone()
    }

    /// Publishes the rotated key set (adds `fixture-rs256-b`).
    pub fn rotate_keys(&self) {
        *self.state.jwks.lock().unwrap() = read_key("jwks-rotated.json");
    }

    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// An access token for `user` signed with the realm's main key.
    pub fn token(&self, user: &str) -> String {
        self.mint(&TokenSpec::user(user))
    }

    /// A token as `spec` describes.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        let t = now();
        let mut claims = json!({
            "exp": t + spec.exp_in,
            "iat": t,
            "jti": format!("{:x}", rand::random::<u64>()),
            "iss": spec.iss.clone().unwrap_or_else(|| self.issuer()),
            "aud": spec.aud,
            "sub": sub_of(&spec.user),
            "typ": spec.typ,
            "azp": spec.azp,
            "sid": format!("sid-{}", spec.user),
            "preferred_username": spec.user,
        });
        if let Some(n) = spec.nbf_in {
            claims["nbf"] = json!(t + n);
        }
        match spec.key.as_str() {
            "none" => {
                let b64 = |v: &Value| {
                    use base64::Engine;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
                };
                format!(
                    "{}.{}.",
                    b64(&json!({"alg": "none", "typ": "JWT"})),
                    b64(&claims)
                )
            }
            "hmac" => {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = spec.kid.clone();
                // An attacker's classic: sign with HMAC using the realm's public key as the secret.
                jsonwebtoken::encode(
                    &h,
                    &claims,
                    &EncodingKey::from_secret(read_key("jwks.json").as_bytes()),
                )
                .unwrap()
            }
            file => {
                let pem = read_key(file);
                let (alg, key) = if file.starts_with("es") {
                    (
                        Algorithm::ES256,
                        EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
                    )
                } else {
                    (
                        Algorithm::RS256,
                        EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                    )
                };
                let mut h = Header::new(alg);
                h.kid = spec.kid.clone();
                jsonwebtoken::encode(&h, &claims, &key).unwrap()
            }
        }
    }
}

async fn discovery(State(s): State<Arc<KcState>>) -> Json<Value> {
    s.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let base = format!("{}/protocol/openid-connect", s.issuer);
    Json(json!({
        "issuer": s.issuer,
        "authorization_endpoint": format!("{base}/auth"),
        "token_endpoint": format!("{base}/token"),
        "introspection_endpoint": format!("{base}/token/introspect"),
        "userinfo_endpoint": format!("{base}/userinfo"),
        "end_session_endpoint": format!("{base}/logout"),
        "jwks_uri": format!("{base}/certs"),
        "grant_types_supported": ["authorization_code", "implicit", "refresh_token", "password", "client_credentials"],
        "response_types_supported": ["code", "none", "id_token", "token", "id_token token", "code id_token", "code token", "code id_token token"],
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": ["PS384", "ES384", "RS384", "HS256", "HS512", "ES256", "RS256", "HS384", "ES512", "PS256", "PS512", "RS512"],
        "backchannel_logout_supported": true,
        "backchannel_logout_session_supported": true,
        "code_challenge_methods_supported": ["plain", "S256"],
    }))
}

async fn certs(State(s): State<Arc<KcState>>) -> Response {
    s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let body = s.jwks.lock().unwrap().clone();
    ([("content-type", "application/json")], body).into_response()
}

async fn token(
    State(s): State<Arc<KcState>>,
    Form(f): Form<std::collections::HashMap<String, String>>,
) -> Response {
    let _ = s;
    if f.get("grant_type").map(String::as_str) != Some("password") {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    (
        axum::http::StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_grant", "error_description": "Invalid user credentials"})),
    )
        .into_response()
}
