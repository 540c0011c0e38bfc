//! The login routes under attack (issue 14, items 2 and 8): `/auth/login` flooded with long redirects, over-long
//! redirects, login CSRF (a callback URL minted in the attacker's browser opened in the victim's), and tampered or
//! expired pending login cookies. Each test runs in a few seconds against in-process servers and the fixture realm.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support;
use crate::support::browser::{location, sets_cookie, Browser};
use crate::support::keycloak::{TABHUB_CLIENT, TABHUB_SECRET};
use crate::support::Keycloak;

const LOGIN_COOKIE: &str = "tabhub_login";
const SESSION_COOKIE: &str = "tabhub_session";
/// A shared `custody.login_cookie_key` (32 bytes, base64).
const SHARED_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

async fn realm() -> Keycloak {
    Keycloak::start_with(|o| o.auto_approve = Some("alice".into())).await
}

/// A tabhub with custody on `listener`, whose public callback is `callback_base` + `/auth/callback` (instances
/// behind one load balancer share it).
async fn server(
    kc: &Keycloak,
    listener: tokio::net::TcpListener,
    callback_base: &str,
    tweak: impl FnOnce(&mut tabhub::config::CustodyConfig),
) -> tabhub::Running {
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut c = support::config(kc);
    c.auth.client_ids.push(TABHUB_CLIENT.into());
    c.origins.allowed = vec![base];
    c.custody.enabled = true;
    c.custody.client_id = TABHUB_CLIENT.into();
    c.custody.client_secret = TABHUB_SECRET.into();
    c.custody.redirect_uri = format!("{callback_base}/auth/callback");
    c.custody.cookie_secure = false;
    tweak(&mut c.custody);
    c.validate().unwrap();
    let t = tabhub::start(
        listener,
        c,
        tabhub::commands::builtin(),
        axum::Router::new(),
    )
    .await
    .unwrap();
    support::eventually("ready", || t.app().realm.is_ready()).await;
    t
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    (l, base)
}

/// One server with its own settings; its callback is its own.
async fn one(
    kc: &Keycloak,
    tweak: impl FnOnce(&mut tabhub::config::CustodyConfig),
) -> (tabhub::Running, String) {
    let (l, base) = bind().await;
    let t = server(kc, l, &base, tweak).await;
    (t, base)
}

/// Starts a login in `browser` and lets the realm approve it; returns the callback URL (not visited).
async fn approved_callback(browser: &Browser, base: &str, kc: &Keycloak) -> String {
    let r = browser.get(&format!("{base}/auth/login?redirect=/x")).await;
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    let to_kc = location(&r);
    assert!(to_kc.starts_with(&kc.issuer()), "{to_kc}");
    let r = browser.get(&to_kc).await;
    assert_eq!(r.status(), 302);
    location(&r)
}

/// The callback URL with another server's address (the same query).
fn at(base: &str, callback: &str) -> String {
    let (_, query) = callback.split_once('?').unwrap();
    format!("{base}/auth/callback?{query}")
}

async fn me(browser: &Browser, base: &str) -> reqwest::StatusCode {
    browser.get(&format!("{base}/auth/me")).await.status()
}

/// Item 2: a flood of `/auth/login` with long redirects. Nothing is kept server-side (a login started on one
/// instance completes on another that shares only the key), and one address gets 429 after its burst while
/// other addresses keep theirs.
#[tokio::test]
async fn a_login_flood_is_rate_limited_and_stores_nothing() {
    let kc = realm().await;
    let (la, base_a) = bind().await;
    let (lb, base_b) = bind().await;
    let shared = |c: &mut tabhub::config::CustodyConfig| c.login_cookie_key = SHARED_KEY.into();
    let a = server(&kc, la, &base_a, shared).await;
    let b = server(&kc, lb, &base_a, shared).await;

    // A real user, from 127.0.0.2, starts a login on A.
    let user = Browser::new(Some(IpAddr::from([127, 0, 0, 2])));
    let callback = approved_callback(&user, &base_a, &kc).await;

    // The flood, from 127.0.0.1: 2,000 requests with a 2 KB redirect, 16 at a time.
    let long = format!("/{}", "a".repeat(2_000));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(IpAddr::from([127, 0, 0, 1]))
        .build()
        .unwrap();
    let url = Arc::new(format!("{base_a}/auth/login?redirect={long}"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited, mut cookies) = (0u32, 0u32, Vec::new());
            for _ in 0..125 {
                let r = http.get(url.as_str()).send().await.unwrap();
                match r.status().as_u16() {
                    302 => {
                        cookies.push(sets_cookie(&r, LOGIN_COOKIE).map(|c| c.len()));
                        ok += 1;
                    }
                    429 => {
                        assert!(r.headers().contains_key("retry-after"));
                        assert!(sets_cookie(&r, LOGIN_COOKIE).is_none());
                        limited += 1;
                    }
                    s => panic!("unexpected {s}"),
                }
            }
            (ok, limited, cookies)
        }));
    }
    let (mut ok, mut limited, mut cookies) = (0, 0, Vec::new());
    for t in tasks {
        let (o, l, c) = t.await.unwrap();
        ok += o;
        limited += l;
        cookies.extend(c);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Burst 10, then 2 per second.
    let allowed = 10.0 + 2.0 * elapsed + 1.0;
    assert!(
        f64::from(ok) <= allowed,
        "{ok} logins accepted from one address in {elapsed:.1} s"
    );
    assert_eq!(ok + limited, 2_000);
    for c in cookies {
        let len = c.expect("an accepted login sets the login cookie");
        assert!(len < 4096, "a cookie a browser keeps: {len} bytes");
    }
    assert!(elapsed < 10.0, "the flood took {elapsed:.1} s");

    // Other addresses keep their own burst.
    for last in 3..6u8 {
        let other = Browser::new(Some(IpAddr::from([127, 0, 0, last])));
        for i in 0..12 {
            let s = other
                .get(&format!("{base_a}/auth/login?redirect=/"))
                .await
                .status();
            match i {
                0..10 => assert_eq!(s, 302, "127.0.0.{last}, request {i}"),
                _ => assert_eq!(s, 429, "127.0.0.{last}, request {i}"),
            }
        }
    }

    // The user's login, started on A, completes on B: A kept nothing B would need.
    let r = user.get(&at(&base_b, &callback)).await;
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    assert_eq!(location(&r), "/x");
    assert!(sets_cookie(&r, SESSION_COOKIE).is_some());
    assert_eq!(me(&user, &base_b).await, 200);

    // The callback is limited per address too.
    let flood = Browser::new(Some(IpAddr::from([127, 0, 0, 1])));
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let u = format!("{base_b}/auth/callback?code=x&state=y");
        statuses.push(flood.get(&u).await.status().as_u16());
    }
    assert!(statuses[..10].iter().all(|s| *s == 400), "{statuses:?}");
    assert!(statuses[12..].iter().all(|s| *s == 429), "{statuses:?}");
    drop((a, b));
}

/// Item 2: the redirect's length is bounded (it travels in the login cookie); beyond, 400 naming the limit.
#[tokio::test]
async fn an_over_long_redirect_is_refused_naming_the_limit() {
    let kc = realm().await;
    let (_t, base) = one(&kc, |_| {}).await;
    let browser = Browser::default();
    for len in [2_049, 60_000] {
        let r = browser
            .get(&format!(
                "{base}/auth/login?redirect=/{}",
                "a".repeat(len - 1)
            ))
            .await;
        assert_eq!(r.status(), 400, "{len} bytes");
        assert!(sets_cookie(&r, LOGIN_COOKIE).is_none());
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("2048 bytes"),
            "{body}"
        );
    }
    // At the limit: accepted, and the cookie fits a browser.
    let r = browser
        .get(&format!(
            "{base}/auth/login?redirect=/{}",
            "a".repeat(2_047)
        ))
        .await;
    assert_eq!(r.status(), 302);
    assert!(sets_cookie(&r, LOGIN_COOKIE).unwrap().len() < 4096);
}

/// Item 8: login CSRF. The attacker starts a login in their browser, approves it at the realm and sends the victim
/// the callback URL. In the victim's browser it is refused (no login cookie, or one for another state) and logs
/// nobody in; the victim's own login still works, and so would the attacker's in the attacker's browser.
#[tokio::test]
async fn a_callback_minted_in_another_browser_is_refused() {
    let kc = realm().await;
    let (_t, base) = one(&kc, |_| {}).await;
    let attacker = Browser::default();
    let minted = approved_callback(&attacker, &base, &kc).await;

    // A victim with no login in progress.
    let victim = Browser::default();
    let r = victim.get(&minted).await;
    assert_eq!(r.status(), 400);
    assert!(sets_cookie(&r, SESSION_COOKIE).is_none());
    assert_eq!(me(&victim, &base).await, 401);

    // A victim in the middle of their own login: refused too, and their own login is left intact.
    let own = approved_callback(&victim, &base, &kc).await;
    let r = victim.get(&minted).await;
    assert_eq!(r.status(), 400);
    assert!(sets_cookie(&r, SESSION_COOKIE).is_none());
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("not started in this browser"));
    assert_eq!(me(&victim, &base).await, 401);
    let r = victim.get(&own).await;
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    assert!(sets_cookie(&r, SESSION_COOKIE).is_some());
    assert_eq!(me(&victim, &base).await, 200);

    // The minted code was never exchanged: the refusal came from the binding, not from a bad code.
    let r = attacker.get(&minted).await;
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    assert!(sets_cookie(&r, SESSION_COOKIE).is_some());
}

/// Item 8 (and 2): a login cookie changed by the client, sealed by another key, or older than
/// `custody.login_timeout_ms` (even if the browser still sends it) is refused.
#[tokio::test]
async fn a_tampered_foreign_or_expired_login_cookie_is_refused() {
    let kc = realm().await;
    let (_t, base) = one(&kc, |c| c.login_timeout_ms = 1_500).await;
    let (_other, other_base) = one(&kc, |_| {}).await;
    let browser = Browser::default();
    let callback = approved_callback(&browser, &base, &kc).await;
    let genuine = browser.cookie(LOGIN_COOKIE).expect("a login cookie");

    // Tampered: one character changed, anywhere.
    for i in [0, genuine.len() / 2, genuine.len() - 1] {
        let mut t = genuine.clone().into_bytes();
        t[i] = if t[i] == b'A' { b'B' } else { b'A' };
        browser.set_cookie(
            LOGIN_COOKIE,
            "/auth/callback",
            std::str::from_utf8(&t).unwrap(),
        );
        let r = browser.get(&callback).await;
        assert_eq!(r.status(), 400, "changed at {i}");
        assert!(sets_cookie(&r, SESSION_COOKIE).is_none());
    }
    // Sealed by another instance's key (the same state, copied from its authorization URL, would not help: the
    // cookie does not open).
    let stranger = Browser::default();
    approved_callback(&stranger, &other_base, &kc).await;
    let foreign = stranger.cookie(LOGIN_COOKIE).unwrap();
    browser.set_cookie(LOGIN_COOKIE, "/auth/callback", &foreign);
    let r = browser.get(&callback).await;
    assert_eq!(r.status(), 400);
    assert!(sets_cookie(&r, SESSION_COOKIE).is_none());

    // Expired: the genuine cookie, sent after the login timeout.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    browser.set_cookie(LOGIN_COOKIE, "/auth/callback", &genuine);
    let r = browser.get(&callback).await;
    assert_eq!(r.status(), 400);
    assert!(sets_cookie(&r, SESSION_COOKIE).is_none());
    assert!(r.text().await.unwrap().contains("start the login again"));
    assert_eq!(me(&browser, &base).await, 401);
}
