//! Token custody over real sockets: login through the fixture Keycloak's authorization endpoint, the login cookie
//! as the websocket credential, silent refresh, refusal, logout and back-channel logout.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use support::browser::{location, sets_cookie, Browser};
use support::client::Cred;
use support::keycloak::{sub_of, TABHUB_CLIENT, TABHUB_SECRET};
use support::{Client, Keycloak, TokenSpec};
use tabhub::commands::{Cadence, Command, CommandError, Context, LoopFunction, NoParams};

/// Tokens seen by a fixture backend, in order.
#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

/// `poll {}`: registers a short loop that calls the `gw` backend as the user.
struct Poll;

impl Command for Poll {
    const NAME: &'static str = "poll";
    const DOC: &'static str = "Test: a loop calling a backend as the user.";
    type Params = NoParams;
    async fn handle(&self, _: NoParams, ctx: &dyn Context) -> Result<(), CommandError> {
        ctx.register_loop(LoopFunction::new(
            "poll",
            Cadence::Short,
            |ctx| async move {
                ctx.backend_get("gw", "/whoami").await?;
                Ok(vec![])
            },
        ));
        ctx.reply("polling", json!({}));
        Ok(())
    }
}

struct Setup {
    kc: Keycloak,
    t: tabhub::Running,
    base: String,
    seen: Arc<Seen>,
    http: reqwest::Client,
}

async fn setup(access_lifetime: Duration) -> Setup {
    let kc = Keycloak::start_with(|o| {
        o.auto_approve = Some("alice".into());
        o.access_token_lifetime = access_lifetime;
    })
    .await;
    // A backend recording the bearer tokens it is called with.
    let seen = Arc::new(Seen::default());
    let gw = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/whoami",
            axum::routing::get(move |h: axum::http::HeaderMap| {
                let seen = seen.clone();
                async move {
                    let auth = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    seen.0
                        .lock()
                        .unwrap()
                        .push(auth.trim_start_matches("Bearer ").to_owned());
                    axum::Json(json!({"ok": true}))
                }
            }),
        )
    };
    let gl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_base = format!("http://{}", gl.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(gl, gw).await });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut c = support::config(&kc);
    c.auth.client_ids.push(TABHUB_CLIENT.into());
    c.origins.allowed = vec![base.clone()];
    c.custody.enabled = true;
    c.custody.client_id = TABHUB_CLIENT.into();
    c.custody.client_secret = TABHUB_SECRET.into();
    c.custody.redirect_uri = format!("{base}/auth/callback");
    c.custody.cookie_secure = false;
    c.backends.insert("gw".into(), gw_base);
    c.validate().unwrap();
    let mut registry = tabhub::commands::builtin();
    registry.register(Poll);
    let t = tabhub::start(listener, c, registry, axum::Router::new())
        .await
        .unwrap();
    support::eventually("ready", || t.app().realm.is_ready()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Setup {
        kc,
        t,
        base,
        seen,
        http,
    }
}

impl Setup {
    /// Logs in through the fixture realm (auto-approving alice) in a new browser (its own cookie jar: the login
    /// cookie set at `/auth/login` goes back to `/auth/callback`); returns the login cookie `name=value`.
    async fn login(&self, redirect: &str) -> String {
        let browser = Browser::default();
        let r = browser
            .get(&format!("{}/auth/login?redirect={redirect}", self.base))
            .await;
        assert_eq!(r.status(), 302);
        let pending = sets_cookie(&r, "tabhub_login").expect("a pending login cookie");
        for attr in [
            "HttpOnly",
            "SameSite=Lax",
            "Path=/auth/callback",
            "Max-Age=600",
        ] {
            assert!(pending.contains(attr), "{pending}");
        }
        let to_kc = location(&r);
        assert!(to_kc.starts_with(&self.kc.issuer()), "{to_kc}");
        for p in [
            "code_challenge=",
            "code_challenge_method=S256",
            "state=",
            "nonce=",
        ] {
            assert!(
                to_kc.contains(p),
                "authorization request lacks {p}: {to_kc}"
            );
        }
        let r = browser.get(&to_kc).await;
        assert_eq!(r.status(), 302, "{:?}", r.text().await);
        let back = location(&r);
        assert!(
            back.starts_with(&format!("{}/auth/callback?", self.base)),
            "{back}"
        );
        let r = browser.get(&back).await;
        assert_eq!(r.status(), 302);
        assert_eq!(location(&r), redirect);
        assert_eq!(
            browser.cookie("tabhub_login"),
            None,
            "the callback clears the pending login"
        );
        let cookie = sets_cookie(&r, "tabhub_session").expect("a login cookie");
        for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(cookie.contains(attr), "{cookie}");
        }
        cookie.split(';').next().unwrap().to_owned()
    }

    async fn tab(&self, cookie: &str) -> Client {
        let (name, value) = cookie.split_once('=').unwrap();
        let mut c = Client::connect_with(
            &support::ws_url(&self.t),
            Cred::Cookie(name, value),
            Some(&self.base),
        )
        .await
        .unwrap();
        let init = c.recv().await;
        assert_eq!(init["type"], "init", "{init}");
        c
    }
}

#[tokio::test]
async fn login_then_two_cookie_tabs_share_one_session() {
    let s = setup(Duration::from_secs(300)).await;
    let cookie = s.login("/projects").await;
    let me: Value = s
        .http
        .get(format!("{}/auth/me", s.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"]["name"], "alice");
    let (mut a, mut b) = (s.tab(&cookie).await, s.tab(&cookie).await);
    assert_eq!(s.t.app().hub.get(&sub_of("alice")).unwrap().tab_count(), 2);
    a.send("ping", json!({}), Some(json!(1))).await;
    assert_eq!(a.recv().await["id"], 1);
    b.send("poll", json!({}), None).await;
    b.recv_type("polling").await;
    support::eventually("the loop used the stored token", || {
        !s.seen.0.lock().unwrap().is_empty()
    })
    .await;
    let me: Value = s
        .http
        .get(format!("{}/auth/me", s.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["tabs"], 2);
    // Without the cookie: not logged in.
    let r = s
        .http
        .get(format!("{}/auth/me", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn short_tokens_are_refreshed_silently_and_loops_use_the_new_one() {
    // Access tokens live 12 s, refreshed 10 s before expiry: a refresh about every 2 s.
    let s = setup(Duration::from_secs(12)).await;
    let cookie = s.login("/").await;
    let mut a = s.tab(&cookie).await;
    a.send("poll", json!({}), None).await;
    a.recv_type("polling").await;
    support::eventually("two refreshes", || {
        s.kc.realm().token_requests("refresh_token") >= 2
    })
    .await;
    let distinct = || {
        let v = s.seen.0.lock().unwrap();
        v.iter().collect::<std::collections::HashSet<_>>().len()
    };
    support::eventually("the loop called the backend with a refreshed token", || {
        distinct() >= 2
    })
    .await;
    // Still connected, never told to re-authenticate.
    a.send("ping", json!({}), Some(json!("p"))).await;
    loop {
        let m = a.recv().await;
        assert_ne!(m["type"], "authExpiring", "custody refreshes silently");
        if m["id"] == "p" {
            break;
        }
    }
}

#[tokio::test]
async fn a_withdrawn_key_renews_the_session_token_through_custody_without_closing_tabs() {
    // Long-lived tokens: no refresh is due on its own during the test.
    let s = setup(Duration::from_secs(300)).await;
    let cookie = s.login("/").await;
    let mut a = s.tab(&cookie).await;
    a.send("poll", json!({}), None).await;
    a.recv_type("polling").await;
    let kid_of = |t: &str| jsonwebtoken::decode_header(t).ok().and_then(|h| h.kid);
    support::eventually("a first backend call", || {
        s.seen.0.lock().unwrap().last().and_then(|t| kid_of(t)) == Some("fixture-rs256-a".into())
    })
    .await;
    let refreshes = s.kc.realm().token_requests("refresh_token");
    s.kc.rotate_keys();
    s.kc.withdraw_key("fixture-rs256-a");
    // Past the refetch interval: a token of the new key makes tabhub refetch the keys and see the withdrawal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob =
        s.kc.mint(&TokenSpec::user("bob").key("rs256-b.pem", "fixture-rs256-b"));
    Client::connect(&support::ws_url(&s.t), &bob)
        .await
        .close()
        .await;
    support::eventually("a refresh through custody", || {
        s.kc.realm().token_requests("refresh_token") > refreshes
    })
    .await;
    support::eventually("the loop calls with the new key's token", || {
        s.seen.0.lock().unwrap().last().and_then(|t| kid_of(t)) == Some("fixture-rs256-b".into())
    })
    .await;
    // Still connected, never told to re-authenticate.
    a.send("ping", json!({}), Some(json!("p"))).await;
    loop {
        let m = a.recv().await;
        assert_ne!(m["data"]["authExpired"], true, "{m}");
        if m["id"] == "p" {
            break;
        }
    }
}

#[tokio::test]
async fn concurrent_refreshes_share_one_request() {
    let s = setup(Duration::from_secs(300)).await;
    let cookie = s.login("/").await;
    let login_id = cookie.split_once('=').unwrap().1.to_owned();
    let custody = s.t.app().custody.clone().unwrap();
    let before = s.kc.realm().token_requests("refresh_token");
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let (c, login_id) = (custody.clone(), login_id.clone());
            tokio::spawn(async move { c.refresh(&login_id).await.map(|t| t.access_token.clone()) })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for c in calls {
        tokens.insert(c.await.unwrap().unwrap());
    }
    assert_eq!(
        s.kc.realm().token_requests("refresh_token"),
        before + 1,
        "one request for ten callers"
    );
    assert_eq!(tokens.len(), 1);
    // The rotated refresh token was stored: the next refresh works (the old one would be refused).
    custody.refresh(&login_id).await.unwrap();
    assert_eq!(s.kc.realm().token_requests("refresh_token"), before + 2);
}

#[tokio::test]
async fn a_login_revoked_at_keycloak_closes_its_tabs_with_the_expired_code() {
    let s = setup(Duration::from_secs(12)).await;
    let cookie = s.login("/").await;
    let mut a = s.tab(&cookie).await;
    s.kc.realm().end_sessions_of("alice");
    let (code, msgs) = a.closed().await;
    assert_eq!(code, Some(4002));
    assert!(
        msgs.iter()
            .any(|m| m["type"] == "error" && m["data"]["authExpired"] == true),
        "{msgs:?}"
    );
    // The stored tokens are gone: the cookie no longer logs anyone in.
    let r = s
        .http
        .get(format!("{}/auth/me", s.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn logout_closes_that_logins_tabs_only() {
    let s = setup(Duration::from_secs(300)).await;
    let (c1, c2) = (s.login("/").await, s.login("/").await);
    assert_ne!(c1, c2, "two browsers, two logins");
    let (mut a1, mut a2, mut other) = (s.tab(&c1).await, s.tab(&c1).await, s.tab(&c2).await);
    let mut bob = Client::connect(&support::ws_url(&s.t), &s.kc.token("bob")).await;
    let r = s
        .http
        .post(format!("{}/auth/logout", s.base))
        .header("cookie", &c1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["loggedOut"], true);
    let url = body["logoutUrl"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{}/protocol/openid-connect/logout", s.kc.issuer()))
            && url.contains("id_token_hint="),
        "{url}"
    );
    for c in [&mut a1, &mut a2] {
        let (code, msgs) = c.closed().await;
        assert_eq!(code, Some(4003));
        assert!(msgs.iter().any(|m| m["data"]["loggedOut"] == true));
    }
    for c in [&mut other, &mut bob] {
        c.send("ping", json!({}), Some(json!("still"))).await;
        assert_eq!(c.recv_type("ack").await["id"], "still");
    }
}

#[tokio::test]
async fn backchannel_logout_closes_the_named_login_and_refuses_replays_and_forgeries() {
    let s = setup(Duration::from_secs(300)).await;
    let c1 = s.login("/").await;
    let kc_sid = s.kc.realm().kc_session_of("alice").unwrap();
    let c2 = s.login("/").await;
    let (mut a1, mut a2) = (s.tab(&c1).await, s.tab(&c2).await);
    let url = format!("{}/auth/backchannel-logout", s.base);

    // Forged (another client's audience, a foreign key) and malformed tokens change nothing.
    let wrong_aud = s.kc.realm().logout_token("renku-ui", Some(&kc_sid), None);
    assert_eq!(
        s.kc.realm().send_backchannel_logout(&url, &wrong_aud).await,
        400
    );
    let r = s
        .http
        .post(&url)
        .form(&[("logout_token", "x.y.z")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let access = s.kc.realm().mint_access("alice", TABHUB_CLIENT);
    assert_eq!(
        s.kc.realm().send_backchannel_logout(&url, &access).await,
        400,
        "an access token is not a logout token"
    );
    a1.send("ping", json!({}), Some(json!(1))).await;
    assert_eq!(a1.recv().await["id"], 1);

    let token =
        s.kc.realm()
            .logout_token(TABHUB_CLIENT, Some(&kc_sid), Some(&sub_of("alice")));
    assert_eq!(
        s.kc.realm().send_backchannel_logout(&url, &token).await,
        200
    );
    let (code, _) = a1.closed().await;
    assert_eq!(code, Some(4003));
    a2.send("ping", json!({}), Some(json!(2))).await;
    assert_eq!(a2.recv().await["id"], 2, "the other login stays");
    assert_eq!(
        s.kc.realm().send_backchannel_logout(&url, &token).await,
        400,
        "replayed"
    );
}

/// Captures what tabhub logs in this (current-thread) test, to check what it says and what it never says.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A provider whose access tokens carry no `sid` (RFC 9068's, Keycloak's lightweight ones) still ends the login it
/// names: the ID token's `sid`, kept at the callback, is what a logout token is matched on. A logout token that
/// matches nothing is answered 200 and logged (without the token or the session id).
#[tokio::test]
async fn backchannel_logout_matches_the_id_tokens_sid_when_access_tokens_have_none() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let s = setup(Duration::from_secs(300)).await;
    s.kc.realm().omit_sid_from_access_tokens(true);
    let c1 = s.login("/").await;
    let kc_sid = s.kc.realm().kc_session_of("alice").unwrap();
    let c2 = s.login("/").await;
    let (mut a1, mut a2) = (s.tab(&c1).await, s.tab(&c2).await);
    let url = format!("{}/auth/backchannel-logout", s.base);

    let unknown = s.kc.realm().logout_token(
        TABHUB_CLIENT,
        Some("no-such-session"),
        Some(&sub_of("alice")),
    );
    assert_eq!(
        s.kc.realm().send_backchannel_logout(&url, &unknown).await,
        200
    );
    support::eventually("the unmatched logout token is logged", || {
        logs.text().contains("back-channel logout matched no login")
    })
    .await;
    a1.send("ping", json!({}), Some(json!(1))).await;
    assert_eq!(a1.recv().await["id"], 1, "nothing was closed");

    let token =
        s.kc.realm()
            .logout_token(TABHUB_CLIENT, Some(&kc_sid), Some(&sub_of("alice")));
    assert_eq!(
        s.kc.realm().send_backchannel_logout(&url, &token).await,
        200
    );
    let (code, msgs) = a1.closed().await;
    assert_eq!(
        code,
        Some(4003),
        "logged out, not left to a failed refresh: {msgs:?}"
    );
    a2.send("ping", json!({}), Some(json!(2))).await;
    assert_eq!(a2.recv().await["id"], 2, "the other login stays");
    let text = logs.text();
    for secret in [&unknown, &token, &kc_sid] {
        assert!(
            !text.contains(secret.as_str()),
            "a token or session id in the logs"
        );
    }
}

#[tokio::test]
async fn cookie_handshakes_need_an_allowed_origin() {
    let s = setup(Duration::from_secs(300)).await;
    let cookie = s.login("/").await;
    let (name, value) = cookie.split_once('=').unwrap();
    let url = support::ws_url(&s.t);
    // allow_missing is on in the test config, yet a cookie credential without Origin is refused.
    for origin in [Some("https://evil.example"), None] {
        match Client::connect_with(&url, Cred::Cookie(name, value), origin).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 403, "{origin:?}")
            }
            other => panic!("{origin:?}: expected 403, got {:?}", other.map(|_| ())),
        }
    }
    // An unknown login cookie: in-band missingAuth and 4000.
    let mut c = Client::connect_with(&url, Cred::Cookie(name, "forged"), Some(&s.base))
        .await
        .unwrap();
    let (code, msgs) = c.closed().await;
    assert_eq!(code, Some(4000));
    assert_eq!(msgs[0]["data"]["missingAuth"], true);
}

#[tokio::test]
async fn login_refuses_foreign_redirects_and_bad_callbacks() {
    let s = setup(Duration::from_secs(300)).await;
    for bad in [
        "https://evil.example/",
        "//evil.example/x",
        "javascript:alert(1)",
    ] {
        let r = s
            .http
            .get(format!("{}/auth/login", s.base))
            .query(&[("redirect", bad)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let r = s
        .http
        .get(format!(
            "{}/auth/callback?code=abc&state=never-issued",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("set-cookie").is_none());
    let r = s
        .http
        .get(format!("{}/auth/callback?error=access_denied", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn introspection_sees_revocation_at_the_handshake_and_is_cached() {
    let kc = Keycloak::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut c = support::config(&kc);
    c.auth.client_ids.push(TABHUB_CLIENT.into());
    c.custody.enabled = true;
    c.custody.client_id = TABHUB_CLIENT.into();
    c.custody.client_secret = TABHUB_SECRET.into();
    c.custody.redirect_uri = format!("{base}/auth/callback");
    c.custody.introspection = true;
    c.custody.introspection_cache_ms = 60_000;
    let t = tabhub::start(
        listener,
        c,
        tabhub::commands::builtin(),
        axum::Router::new(),
    )
    .await
    .unwrap();
    support::eventually("ready", || t.app().realm.is_ready()).await;
    let url = support::ws_url(&t);
    let token = kc.token("alice");
    let n = Arc::new(AtomicUsize::new(0));
    for _ in 0..5 {
        Client::connect(&url, &token).await;
        n.fetch_add(1, Ordering::SeqCst);
    }
    assert_eq!(
        kc.realm().introspections(),
        1,
        "a reconnect storm costs one introspection"
    );
    let revoked = kc.token("bob");
    kc.realm().end_sessions_of("bob");
    let mut c = Client::connect_with(&url, Cred::Header(&revoked), None)
        .await
        .unwrap();
    let (code, msgs) = c.closed().await;
    assert_eq!(code, Some(4002));
    assert!(msgs[0]["data"]["message"]
        .as_str()
        .unwrap()
        .contains("revoked"));
}

/// An introspection endpoint that fails (here a 400, as providers answer for JWT access tokens they do not store)
/// must not let revoked tokens in: the token is refused for now (1013, `retry: true`), logged and counted, unless
/// `custody.introspection_fail_open`; a failure is not cached, so the token opens once the endpoint answers again.
#[tokio::test]
async fn introspection_fails_closed_unless_configured_to_fail_open() {
    let kc = Keycloak::start().await;
    for fail_open in [false, true] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut c = support::config(&kc);
        c.auth.client_ids.push(TABHUB_CLIENT.into());
        c.custody.enabled = true;
        c.custody.client_id = TABHUB_CLIENT.into();
        c.custody.client_secret = TABHUB_SECRET.into();
        c.custody.redirect_uri = format!("{base}/auth/callback");
        c.custody.introspection = true;
        c.custody.introspection_cache_ms = 60_000;
        c.custody.introspection_fail_open = fail_open;
        let t = tabhub::start(
            listener,
            c,
            tabhub::commands::builtin(),
            axum::Router::new(),
        )
        .await
        .unwrap();
        support::eventually("ready", || t.app().realm.is_ready()).await;
        let url = support::ws_url(&t);
        let metrics = &t.app().metrics.introspections;
        let token = kc.token("alice");
        for status in [400, 503] {
            kc.realm().fail_introspection_with(Some(status));
            let mut tab = Client::connect_with(&url, Cred::Header(&token), None)
                .await
                .unwrap();
            let first = tab.recv().await;
            if fail_open {
                assert_eq!(first["type"], "init", "fail open, status {status}: {first}");
            } else {
                assert_eq!(first["type"], "error", "status {status}: {first}");
                assert_eq!(first["data"]["retry"], true, "{first}");
                let (code, _) = tab.closed().await;
                assert_eq!(code, Some(1013), "status {status}");
            }
        }
        let (counted, other) = if fail_open {
            ("error_fail_open", "error")
        } else {
            ("error", "error_fail_open")
        };
        assert_eq!(metrics.get(&[counted]), 2.0);
        assert_eq!(metrics.get(&[other]), 0.0);
        // Failures were not cached: the endpoint answers again, the token is active.
        kc.realm().fail_introspection_with(None);
        Client::connect(&url, &token).await;
        assert_eq!(metrics.get(&["active"]), 1.0);
        // `active: false` is revoked, whatever fail_open says.
        let revoked = kc.token("bob");
        kc.realm().end_sessions_of("bob");
        let mut tab = Client::connect_with(&url, Cred::Header(&revoked), None)
            .await
            .unwrap();
        let (code, _) = tab.closed().await;
        assert_eq!(code, Some(4002));
        assert_eq!(metrics.get(&["inactive"]), 1.0);
    }
}

#[tokio::test]
async fn an_unreachable_keycloak_is_retried_until_the_token_really_expires() {
    let s = setup(Duration::from_secs(12)).await;
    let cookie = s.login("/").await;
    let mut a = s.tab(&cookie).await;
    s.kc.realm().set_unreachable(true);
    let started = std::time::Instant::now();
    let (code, msgs) = a.closed_within(Duration::from_secs(25)).await;
    assert_eq!(code, Some(4002));
    assert!(
        msgs.iter().any(|m| m["data"]["authExpired"] == true),
        "{msgs:?}"
    );
    // Refreshing starts 10 s before expiry; the tab lives until the token's real expiry (12 s after login).
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "closed too early: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn without_custody_the_auth_routes_are_not_mounted() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let base = format!("http://{}", t.local_addr());
    let http = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "/auth/login"),
        (reqwest::Method::GET, "/auth/callback"),
        (reqwest::Method::GET, "/auth/me"),
        (reqwest::Method::POST, "/auth/logout"),
        (reqwest::Method::POST, "/auth/backchannel-logout"),
    ] {
        let r = http
            .request(method, format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.text().await.unwrap(), "", "{path}: an unknown path's 404");
    }
}
