//! The realm over a real socket, driven by a cookie-less client that does not follow redirects (a browser's first
//! hop, a backend's calls), and by `openidconnect` exactly as tabhub uses it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use base64::Engine;
use reqwest::header::LOCATION;
use reqwest::StatusCode;
use serde_json::Value;

use super::*;

const S256_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gXk2gIbIa9Y7sTw";

async fn serve(opts: RealmOptions) -> (Arc<DevIssuer>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let realm = DevIssuer::new(&base, opts).unwrap();
    let app = realm.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (realm, base)
}

/// The demo realm with `alice` approved at once.
async fn auto_alice() -> (Arc<DevIssuer>, String) {
    serve(RealmOptions {
        auto_approve: Some("alice".into()),
        ..RealmOptions::demo()
    })
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn oidc(realm: &DevIssuer, path: &str) -> String {
    format!("{}/protocol/openid-connect/{path}", realm.issuer())
}

/// A JWT's payload, unverified (the tests that care verify separately).
fn payload(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn header(jwt: &str) -> Value {
    let part = jwt.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn post_form(url: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = http().post(url).form(form).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn password_grant(realm: &DevIssuer, user: &str) -> Value {
    let (status, body) = post_form(
        &oidc(realm, "token"),
        &[
            ("grant_type", "password"),
            ("client_id", CLIENT_ID),
            ("username", user),
            ("password", user),
            ("scope", "openid"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn refresh(realm: &DevIssuer, client_id: &str, token: &str) -> (StatusCode, Value) {
    post_form(
        &oidc(realm, "token"),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", client_id),
            ("refresh_token", token),
        ],
    )
    .await
}

async fn introspect(realm: &DevIssuer, token: &str) -> Value {
    let r = http()
        .post(oidc(realm, "token/introspect"))
        .basic_auth("tabhub", Some("demo-secret"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// GETs `/auth` and returns the redirect's query parameters.
async fn authorize(realm: &DevIssuer, params: &[(&str, &str)]) -> Vec<(String, String)> {
    let r = http()
        .get(oidc(realm, "auth"))
        .query(params)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let location = r.headers()[LOCATION].to_str().unwrap();
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// A code for `tabhub` (confidential) with an S256 challenge of [`S256_VERIFIER`].
async fn code_for_tabhub(realm: &DevIssuer, redirect: &str) -> String {
    let challenge = openidconnect::PkceCodeChallenge::from_code_verifier_sha256(
        &openidconnect::PkceCodeVerifier::new(S256_VERIFIER.into()),
    );
    let q = authorize(
        realm,
        &[
            ("response_type", "code"),
            ("client_id", "tabhub"),
            ("redirect_uri", redirect),
            ("state", "st"),
            ("nonce", "n0"),
            ("scope", "openid"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    param(&q, "code").unwrap().to_owned()
}

async fn exchange(
    realm: &DevIssuer,
    code: &str,
    redirect: &str,
    verifier: &str,
) -> (StatusCode, Value) {
    let r = http()
        .post(oidc(realm, "token"))
        .basic_auth("tabhub", Some("demo-secret"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ])
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn discovery_has_keycloak_shape_and_parses_as_openid_metadata() {
    let (realm, base) = serve(RealmOptions::demo()).await;
    assert_eq!(realm.issuer(), format!("{base}/realms/demo"));
    let doc: Value = http()
        .get(format!(
            "{}/.well-known/openid-configuration",
            realm.issuer()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let oidc_base = format!("{}/protocol/openid-connect", realm.issuer());
    assert_eq!(doc["issuer"], realm.issuer());
    for (field, path) in [
        ("authorization_endpoint", "auth"),
        ("token_endpoint", "token"),
        ("introspection_endpoint", "token/introspect"),
        ("userinfo_endpoint", "userinfo"),
        ("end_session_endpoint", "logout"),
        ("jwks_uri", "certs"),
    ] {
        assert_eq!(doc[field], format!("{oidc_base}/{path}"), "{field}");
    }
    assert_eq!(
        doc["code_challenge_methods_supported"],
        serde_json::json!(["plain", "S256"])
    );
    assert_eq!(doc["backchannel_logout_supported"], true);
    assert_eq!(doc["backchannel_logout_session_supported"], true);
    let methods = doc["token_endpoint_auth_methods_supported"]
        .as_array()
        .unwrap();
    assert!(methods.contains(&"client_secret_basic".into()));
    assert!(methods.contains(&"client_secret_post".into()));
    for g in [
        "authorization_code",
        "refresh_token",
        "password",
        "client_credentials",
    ] {
        assert!(doc["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&g.into()));
    }
    serde_json::from_value::<openidconnect::core::CoreProviderMetadata>(doc)
        .expect("openidconnect reads the discovery document");

    // JWKS: counted, and switchable to the rotated set.
    let kids = |v: Value| -> Vec<String> {
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    let get_jwks = || async {
        http()
            .get(oidc(&realm, "certs"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert!(!kids(get_jwks().await).contains(&"fixture-rs256-b".to_string()));
    realm.rotate_keys();
    assert!(kids(get_jwks().await).contains(&"fixture-rs256-b".to_string()));
    assert_eq!(realm.jwks_fetches(), 2);
    realm.withdraw_key("fixture-rs256-a");
    assert_eq!(
        kids(get_jwks().await),
        ["fixture-rs256-b", "fixture-es256-a"]
    );
}

#[tokio::test]
async fn auth_code_with_pkce_single_use_codes() {
    let (realm, _) = auto_alice().await;
    let redirect = "http://app.example/cb?keep=1";
    let challenge = openidconnect::PkceCodeChallenge::from_code_verifier_sha256(
        &openidconnect::PkceCodeVerifier::new(S256_VERIFIER.into()),
    );
    let q = authorize(
        &realm,
        &[
            ("response_type", "code"),
            ("client_id", "tabhub"),
            ("redirect_uri", redirect),
            ("state", "the-state"),
            ("nonce", "the-nonce"),
            ("scope", "openid"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    assert_eq!(
        param(&q, "keep"),
        Some("1"),
        "the redirect URI's own query stays"
    );
    assert_eq!(param(&q, "state"), Some("the-state"));
    assert_eq!(param(&q, "iss"), Some(realm.issuer()));
    let sid = realm.kc_session_of("alice").unwrap();
    assert_eq!(param(&q, "session_state"), Some(sid.as_str()));
    let code = param(&q, "code").unwrap();

    let (status, body) = exchange(&realm, code, redirect, S256_VERIFIER).await;
    assert_eq!(status, 200, "{body}");
    for field in [
        "access_token",
        "expires_in",
        "refresh_expires_in",
        "refresh_token",
        "token_type",
        "id_token",
        "not-before-policy",
        "session_state",
        "scope",
    ] {
        assert!(!body[field].is_null(), "missing {field}");
    }
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["refresh_expires_in"], 1800);
    assert_eq!(body["session_state"], sid.as_str());

    let at = payload(body["access_token"].as_str().unwrap());
    assert_eq!(at["typ"], "Bearer");
    assert_eq!(at["azp"], "tabhub");
    assert_eq!(at["aud"], "account");
    assert_eq!(at["sid"], sid.as_str());
    assert_eq!(at["session_state"], sid.as_str());
    assert_eq!(at["sub"], USERS[0].1);
    assert_eq!(at["preferred_username"], "alice");
    assert_eq!(at["iss"], realm.issuer());
    assert_eq!(
        at["exp"].as_u64().unwrap() - at["iat"].as_u64().unwrap(),
        300
    );
    for field in ["jti", "auth_time", "scope", "email", "name"] {
        assert!(!at[field].is_null(), "access token lacks {field}");
    }
    let id = payload(body["id_token"].as_str().unwrap());
    assert_eq!(id["typ"], "ID");
    assert_eq!(id["aud"], "tabhub");
    assert_eq!(id["nonce"], "the-nonce");
    assert_eq!(id["sid"], sid.as_str());
    let rt = body["refresh_token"].as_str().unwrap();
    assert_eq!(header(rt)["alg"], "HS256");
    assert_eq!(payload(rt)["typ"], "Refresh");
    assert_eq!(payload(rt)["sid"], sid.as_str());

    // Reuse of the code.
    let (status, body) = exchange(&realm, code, redirect, S256_VERIFIER).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    // A wrong verifier, then the right one: the code is spent by the failed attempt, as in Keycloak.
    let code = code_for_tabhub(&realm, redirect).await;
    let wrong = "x".repeat(50);
    let (status, body) = exchange(&realm, &code, redirect, &wrong).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(
        body["error_description"],
        "PKCE verification failed: Code mismatch"
    );
    let (status, _) = exchange(&realm, &code, redirect, S256_VERIFIER).await;
    assert_eq!(status, 400);

    // Another redirect_uri than the authorization request's.
    let code = code_for_tabhub(&realm, redirect).await;
    let (status, body) = exchange(&realm, &code, "http://app.example/other", S256_VERIFIER).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn browser_errors_never_redirect_to_unregistered_uris() {
    let opts = RealmOptions {
        clients: vec![ClientSpec::public("spa", &["https://spa.example/cb*"])],
        ..RealmOptions::demo()
    };
    let (realm, _) = serve(opts).await;
    let get = |params: Vec<(&'static str, &'static str)>| {
        let url = oidc(&realm, "auth");
        async move { http().get(url).query(&params).send().await.unwrap() }
    };
    let r = get(vec![
        ("response_type", "code"),
        ("client_id", "nope"),
        ("redirect_uri", "https://spa.example/cb"),
    ])
    .await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get(LOCATION).is_none());
    let r = get(vec![
        ("response_type", "code"),
        ("client_id", "spa"),
        ("redirect_uri", "https://evil.example/cb"),
    ])
    .await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get(LOCATION).is_none());
    // Registered (prefix) URI: other errors go back to the client.
    let r = get(vec![
        ("response_type", "token"),
        ("client_id", "spa"),
        ("redirect_uri", "https://spa.example/cb/x"),
        ("state", "s"),
    ])
    .await;
    assert_eq!(r.status(), 302);
    let loc = r.headers()[LOCATION].to_str().unwrap();
    assert!(loc.starts_with("https://spa.example/cb/x?"), "{loc}");
    assert!(
        loc.contains("error=unsupported_response_type") && loc.contains("state=s"),
        "{loc}"
    );
}

#[tokio::test]
async fn login_form_then_code() {
    let (realm, _) = serve(RealmOptions::demo()).await;
    let auth = [
        ("response_type", "code"),
        ("client_id", CLIENT_ID),
        ("redirect_uri", "http://127.0.0.1:9/cb"),
        ("state", "s<1>"),
    ];
    let r = http()
        .get(oidc(&realm, "auth"))
        .query(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("<form") && html.contains("Sign in as bob"));
    assert!(
        html.contains("s&lt;1&gt;") && !html.contains("s<1>"),
        "parameters are escaped"
    );

    let mut form: Vec<(&str, &str)> = auth.to_vec();
    form.extend([("username", "alice"), ("password", "wrong")]);
    let r = http()
        .post(oidc(&realm, "auth"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Invalid username or password."));

    form.pop();
    form.push(("password", "alice"));
    let r = http()
        .post(oidc(&realm, "auth"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let loc = url::Url::parse(r.headers()[LOCATION].to_str().unwrap()).unwrap();
    let q: Vec<(String, String)> = loc.query_pairs().into_owned().collect();
    assert_eq!(param(&q, "state"), Some("s<1>"));
    let (status, body) = post_form(
        &oidc(&realm, "token"),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", CLIENT_ID),
            ("code", param(&q, "code").unwrap()),
            ("redirect_uri", "http://127.0.0.1:9/cb"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id_token"].is_null(), "no openid scope, no ID token");
    assert_eq!(
        payload(body["access_token"].as_str().unwrap())["preferred_username"],
        "alice"
    );
}

#[tokio::test]
async fn refresh_tokens_rotate() {
    let (realm, _) = serve(RealmOptions::demo()).await;
    let first = password_grant(&realm, "alice").await;
    let rt1 = first["refresh_token"].as_str().unwrap();
    let (status, second) = refresh(&realm, CLIENT_ID, rt1).await;
    assert_eq!(status, 200, "{second}");
    let rt2 = second["refresh_token"].as_str().unwrap();
    assert_ne!(rt1, rt2);
    assert!(!second["id_token"].is_null(), "openid scope kept");
    assert_eq!(second["session_state"], first["session_state"]);

    let (status, body) = refresh(&realm, CLIENT_ID, rt1).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_description"], "Token is not active");
    let (status, _) = refresh(&realm, CLIENT_ID, rt2).await;
    assert_eq!(status, 200);
    assert_eq!(realm.token_requests("refresh_token"), 3);
    assert_eq!(realm.token_requests("password"), 1);

    // Expiry.
    realm.set_refresh_lifetime(Duration::from_millis(200));
    let short = password_grant(&realm, "bob").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = refresh(&realm, CLIENT_ID, short["refresh_token"].as_str().unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    // Another client's refresh token.
    let (status, body) = post_form(
        &oidc(&realm, "token"),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "tabhub"),
            ("client_secret", "demo-secret"),
            ("refresh_token", second["refresh_token"].as_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn ended_sessions_refuse_refresh_and_introspect_inactive() {
    let (realm, _) = serve(RealmOptions::demo()).await;
    let alice = password_grant(&realm, "alice").await;
    let bob = password_grant(&realm, "bob").await;
    let at = alice["access_token"].as_str().unwrap();
    let active = introspect(&realm, at).await;
    assert_eq!(active["active"], true);
    assert_eq!(active["username"], "alice");
    assert_eq!(active["client_id"], CLIENT_ID);
    assert_eq!(active["sub"], USERS[0].1);
    assert_eq!(
        introspect(&realm, alice["refresh_token"].as_str().unwrap()).await["active"],
        true
    );

    realm.end_sessions_of("alice");
    let (status, body) = refresh(&realm, CLIENT_ID, alice["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_description"], "Session not active");
    assert_eq!(
        introspect(&realm, at).await,
        serde_json::json!({"active": false})
    );
    assert_eq!(
        introspect(&realm, bob["access_token"].as_str().unwrap()).await["active"],
        true
    );
    assert_eq!(introspect(&realm, "not-a-token").await["active"], false);
    assert_eq!(realm.introspections(), 5);

    // A public client may not introspect.
    let (status, body) = post_form(
        &oidc(&realm, "token/introspect"),
        &[("client_id", CLIENT_ID), ("token", at)],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("invalid_request"))
    );

    // Expired access token.
    realm.set_access_lifetime(Duration::from_millis(100));
    let short = realm.mint_access("bob", CLIENT_ID);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(introspect(&realm, &short).await["active"], false);
}

#[tokio::test]
async fn client_credentials_for_service_accounts() {
    let (realm, _) = serve(RealmOptions::demo()).await;
    let grant = |id: &'static str, secret: &'static str| {
        let url = oidc(&realm, "token");
        async move {
            let r = http()
                .post(url)
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = grant("demo-publisher", "publisher-secret").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["refresh_token"].is_null());
    let at = payload(body["access_token"].as_str().unwrap());
    assert_eq!(at["azp"], "demo-publisher");
    assert_eq!(at["typ"], "Bearer");
    assert_eq!(at["preferred_username"], "service-account-demo-publisher");
    assert!(at["sid"].is_null());
    let (_, again) = grant("demo-publisher", "publisher-secret").await;
    assert_eq!(
        payload(again["access_token"].as_str().unwrap())["sub"],
        at["sub"],
        "stable sub"
    );
    assert_eq!(
        introspect(&realm, body["access_token"].as_str().unwrap()).await["active"],
        true
    );

    let (status, body) = grant("tabhub", "demo-secret").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized_client"))
    );
}

#[tokio::test]
async fn confidential_clients_must_authenticate() {
    let (realm, _) = auto_alice().await;
    let code = code_for_tabhub(&realm, "http://app.example/cb").await;
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("client_id", "tabhub"), ("client_secret", "wrong")],
        vec![("client_id", "tabhub")],
        vec![("client_id", "unknown"), ("client_secret", "demo-secret")],
    ];
    for auth in cases {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", "http://app.example/cb"),
            ("code_verifier", S256_VERIFIER),
        ];
        form.extend(auth.iter().copied());
        let (status, body) = post_form(&oidc(&realm, "token"), &form).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(body["error"], "invalid_client");
        assert_eq!(
            body["error_description"],
            "Invalid client or Invalid client credentials"
        );
    }
    // Client authentication comes before the code is looked at: the code is still good, with client_secret_post.
    let (status, body) = post_form(
        &oidc(&realm, "token"),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "tabhub"),
            ("client_secret", "demo-secret"),
            ("code", &code),
            ("redirect_uri", "http://app.example/cb"),
            ("code_verifier", S256_VERIFIER),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn logout_tokens_follow_the_back_channel_spec() {
    let (realm, _) = serve(RealmOptions::demo()).await;
    let a = realm.logout_token("tabhub", Some("sid-1"), Some("sub-1"));
    let b = realm.logout_token("tabhub", Some("sid-1"), None);
    let h = header(&a);
    assert_eq!(h["typ"], "logout+jwt");
    assert_eq!(h["alg"], "RS256");
    assert_eq!(h["kid"], "fixture-rs256-a");
    // Verifies with the published keys.
    let claims = realm.keys.verify(&a, realm.issuer(), false).unwrap();
    assert_eq!(claims["iss"], realm.issuer());
    assert_eq!(claims["aud"], "tabhub");
    assert_eq!(claims["sid"], "sid-1");
    assert_eq!(claims["sub"], "sub-1");
    assert!(claims["iat"].is_u64());
    assert!(
        claims["nonce"].is_null(),
        "a logout token never has a nonce"
    );
    assert_eq!(
        claims["events"],
        serde_json::json!({tokens::BACKCHANNEL_EVENT: {}})
    );
    assert_ne!(claims["jti"], payload(&b)["jti"]);
    assert!(payload(&b)["sub"].is_null());

    let (url, received) = logout_receiver().await;
    assert_eq!(realm.send_backchannel_logout(&url, &a).await, 200);
    assert_eq!(received.lock().unwrap().as_slice(), [a]);
    assert_eq!(
        realm
            .send_backchannel_logout("http://127.0.0.1:9/nothing", &b)
            .await,
        0
    );
}

/// A client's back-channel logout endpoint that records the tokens it receives.
async fn logout_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    async fn receive(
        State(got): State<Arc<Mutex<Vec<String>>>>,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let form = http::params(&body).unwrap();
        got.lock().unwrap().push(form["logout_token"].clone());
        StatusCode::OK
    }
    let got = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/backchannel", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/backchannel", post(receive))
        .with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

#[tokio::test]
async fn rp_initiated_logout_ends_the_session_and_redirects() {
    let (bc_url, received) = logout_receiver().await;
    let mut opts = RealmOptions::demo();
    opts.clients[1].backchannel_logout_url = Some(bc_url);
    opts.auto_approve = Some("bob".into());
    let (realm, _) = serve(opts).await;
    let redirect = "http://app.example/cb";
    let code = code_for_tabhub(&realm, redirect).await;
    let (_, tokens) = exchange(&realm, &code, redirect, S256_VERIFIER).await;
    let sid = realm.kc_session_of("bob").unwrap();

    let r = http()
        .get(oidc(&realm, "logout"))
        .query(&[
            ("id_token_hint", tokens["id_token"].as_str().unwrap()),
            ("post_logout_redirect_uri", "http://app.example/bye"),
            ("state", "s1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()[LOCATION], "http://app.example/bye?state=s1");

    let (status, body) = post_form(
        &oidc(&realm, "token"),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "tabhub"),
            ("client_secret", "demo-secret"),
            ("refresh_token", tokens["refresh_token"].as_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Session not active"))
    );
    assert_eq!(
        introspect(&realm, tokens["access_token"].as_str().unwrap()).await["active"],
        false
    );

    let got = received.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        1,
        "one back-channel logout, to the client that had a URL"
    );
    let lt = payload(&got[0]);
    assert_eq!(lt["sid"], sid.as_str());
    assert_eq!(lt["aud"], "tabhub");
    assert_eq!(lt["sub"], USERS[1].1);

    // Unregistered post-logout URI: a page, no redirect.
    let opts = RealmOptions {
        clients: vec![ClientSpec::public("spa", &["https://spa.example/*"])],
        ..RealmOptions::demo()
    };
    let (realm, _) = serve(opts).await;
    let r = http()
        .get(oidc(&realm, "logout"))
        .query(&[
            ("client_id", "spa"),
            ("post_logout_redirect_uri", "https://evil.example/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get(LOCATION).is_none());
    let r = http().get(oidc(&realm, "logout")).send().await.unwrap();
    assert_eq!(r.status(), 200, "no parameters: the logged-out page");
}

#[tokio::test]
async fn unreachable_realm_answers_503() {
    let (realm, _) = serve(RealmOptions::demo()).await;
    let t = password_grant(&realm, "alice").await;
    realm.set_unreachable(true);
    let (status, _) = refresh(&realm, CLIENT_ID, t["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, 503);
    let r = http()
        .post(oidc(&realm, "token/introspect"))
        .basic_auth("tabhub", Some("demo-secret"))
        .form(&[("token", t["access_token"].as_str().unwrap())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(realm.token_requests("refresh_token"), 0);
    assert_eq!(realm.introspections(), 0);
    realm.set_unreachable(false);
    let (status, _) = refresh(&realm, CLIENT_ID, t["refresh_token"].as_str().unwrap()).await;
    assert_eq!(
        status, 200,
        "the refresh token was not spent while the realm was down"
    );
}

#[tokio::test]
async fn mint_access_opens_a_session() {
    let (realm, _) = serve(RealmOptions::demo()).await;
    let t = realm.mint_access("alice", "tabhub");
    let claims = payload(&t);
    assert_eq!(
        claims["sid"],
        realm.kc_session_of("alice").unwrap().as_str()
    );
    assert_eq!(claims["azp"], "tabhub");
    assert_eq!(introspect(&realm, &t).await["active"], true);
    let r = http()
        .get(oidc(&realm, "userinfo"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["preferred_username"], "alice");
    assert_eq!(info["sub"], USERS[0].1);
    assert_eq!(info["email"], "alice@demo.example");
    let r = http()
        .get(oidc(&realm, "userinfo"))
        .bearer_auth("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
}

/// The authorization code flow as tabhub runs it, with `openidconnect`: discovery and keys, the authorization URL
/// with PKCE and a nonce, the code exchange with client_secret_basic, the ID token's verification (signature,
/// issuer, audience, nonce, at_hash), userinfo and a refresh.
#[tokio::test]
async fn openidconnect_client_interoperates() {
    use openidconnect::core::{
        CoreAuthenticationFlow, CoreClient, CoreJsonWebKeySet, CoreProviderMetadata,
        CoreUserInfoClaims,
    };
    use openidconnect::{
        AccessTokenHash, AuthorizationCode, ClientId, ClientSecret, CsrfToken, Nonce,
        OAuth2TokenResponse, PkceCodeChallenge, RedirectUrl, TokenResponse,
    };

    let (realm, _) = auto_alice().await;
    let http = http();
    let doc: Value = http
        .get(format!(
            "{}/.well-known/openid-configuration",
            realm.issuer()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwks: CoreJsonWebKeySet = http
        .get(doc["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let metadata = serde_json::from_value::<CoreProviderMetadata>(doc)
        .unwrap()
        .set_jwks(jwks);
    let client = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new("tabhub".into()),
        Some(ClientSecret::new("demo-secret".into())),
    )
    .set_redirect_uri(RedirectUrl::new("http://127.0.0.1:1/callback".into()).unwrap());

    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .set_pkce_challenge(challenge)
        .url();
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let back = url::Url::parse(r.headers()[LOCATION].to_str().unwrap()).unwrap();
    let q: Vec<(String, String)> = back.query_pairs().into_owned().collect();
    assert_eq!(param(&q, "state"), Some(csrf.secret().as_str()));
    let code = AuthorizationCode::new(param(&q, "code").unwrap().into());

    let tokens = client
        .exchange_code(code)
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    let id_token = tokens.id_token().expect("an ID token");
    let verifier = client.id_token_verifier();
    let claims = id_token
        .claims(&verifier, &nonce)
        .expect("the ID token verifies");
    assert_eq!(claims.subject().as_str(), USERS[0].1);
    assert_eq!(claims.preferred_username().unwrap().as_str(), "alice");
    let expected_hash = AccessTokenHash::from_token(
        tokens.access_token(),
        id_token.signing_alg().unwrap(),
        id_token.signing_key(&verifier).unwrap(),
    )
    .unwrap();
    assert_eq!(claims.access_token_hash(), Some(&expected_hash));
    assert!(
        id_token
            .claims(&verifier, &Nonce::new("other".into()))
            .is_err(),
        "the nonce is checked"
    );

    let info: CoreUserInfoClaims = client
        .user_info(tokens.access_token().clone(), None)
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(info.email().unwrap().as_str(), "alice@demo.example");

    let refreshed = client
        .exchange_refresh_token(tokens.refresh_token().unwrap())
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert_ne!(
        refreshed.refresh_token().unwrap().secret(),
        tokens.refresh_token().unwrap().secret()
    );
    assert!(
        client
            .exchange_refresh_token(tokens.refresh_token().unwrap())
            .unwrap()
            .request_async(&http)
            .await
            .is_err(),
        "the spent refresh token is refused"
    );
}
