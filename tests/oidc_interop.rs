//! Interop with an independent, standards-conformant OpenID provider: npm `oidc-provider` (a certified
//! implementation), run as `node fixtures/oidc/provider.mjs` on a free loopback port, configured like a Keycloak
//! realm as far as it allows but issuing the *standard* shapes: RFC 9068 JWT access tokens (`typ: at+jwt` header,
//! the client in `client_id`, no `typ` claim, no `azp`, no `sid`), opaque rotated refresh tokens, back-channel
//! logout tokens with `sid`. The fixture realm (tests/support/keycloak.rs) stays the Keycloak-shaped reference;
//! this checks that nothing works only because tokens look like Keycloak's.
//!
//! The browser is driven over HTTP: the provider's development login and consent forms are posted like a user
//! would (any login is accepted). `.ci/test` installs the provider (`npm ci` in fixtures/oidc); without it these
//! tests fail saying so, they never skip.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::browser::{location, sets_cookie, Browser};
use support::client::Cred;
use support::process::{free_port, temp_dir, Proc};
use support::Client;

const CUSTODY_CLIENT: &str = "tabhub";
const CUSTODY_SECRET: &str = "tabhub-interop-secret";
const UI_CLIENT: &str = "renku-ui";
const UI_REDIRECT: &str = "http://127.0.0.1/ui/callback";
const PUBLISHER: &str = "publisher";
const PUBLISHER_SECRET: &str = "publisher-interop-secret";

fn project() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Node project of the provider; fails, saying how to install it, when `npm ci` has not run.
fn provider_dir() -> PathBuf {
    let dir = project().join("fixtures/oidc");
    let installed = dir.join("node_modules/oidc-provider/package.json");
    assert!(
        installed.exists(),
        "npm oidc-provider is not installed in {}: run `bash .ci/test` (it runs `npm ci --no-audit --no-fund` \
         there), or that npm ci yourself",
        dir.display()
    );
    dir
}

/// The provider process and its issuer.
struct Provider {
    proc: Proc,
    issuer: String,
}

impl Provider {
    /// Starts the provider for a tabhub at `tabhub` (its callback and logout URLs are registered at the custody
    /// client), access tokens living `access_ttl` seconds; waits for its discovery document.
    async fn start(tabhub: &str, access_ttl: u64) -> Provider {
        let dir = provider_dir();
        let port = free_port();
        let mut cmd = Command::new(std::env::var("NODE").unwrap_or_else(|_| "node".into()));
        cmd.arg(dir.join("provider.mjs"))
            .current_dir(&dir)
            .env("PORT", port.to_string())
            .env("TABHUB", tabhub)
            .env("ACCESS_TTL", access_ttl.to_string());
        let mut proc = Proc::spawn("oidc-provider", cmd, temp_dir("oidc-provider"), "TERM");
        let issuer = format!("http://127.0.0.1:{port}");
        let discovery = format!("{issuer}/.well-known/openid-configuration");
        let deadline = tokio::time::Instant::now() + support::WAIT;
        loop {
            if let Ok(r) = reqwest::get(&discovery).await {
                if r.status() == 200 {
                    break;
                }
            }
            if let Some(s) = proc.try_wait() {
                panic!(
                    "the provider exited ({s}) before serving discovery:\n{}",
                    proc.logs()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the provider never served {discovery}:\n{}",
                proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Provider { proc, issuer }
    }

    async fn discovery(&self) -> Value {
        reqwest::get(format!("{}/.well-known/openid-configuration", self.issuer))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// tabhub in front of the provider: its access tokens accepted for the custody and browser clients, token custody
/// on, the publisher allowed to publish.
struct Interop {
    provider: Provider,
    t: tabhub::Running,
    base: String,
    http: reqwest::Client,
}

async fn setup(access_ttl: u64, refresh_tolerance_ms: u64) -> Interop {
    assert!(
        tabhub::auth::crypto::install(),
        "jsonwebtoken was used before ring could be installed"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let provider = Provider::start(&base, access_ttl).await;
    let mut c = tabhub::Config {
        instance_id: "interop".into(),
        ..tabhub::Config::default()
    };
    c.auth.issuer = provider.issuer.clone();
    c.auth.client_ids = vec![UI_CLIENT.into(), CUSTODY_CLIENT.into()];
    c.origins.allowed = vec![base.clone()];
    c.origins.allow_missing = true;
    c.session.linger_ms = 300;
    c.custody.enabled = true;
    c.custody.client_id = CUSTODY_CLIENT.into();
    c.custody.client_secret = CUSTODY_SECRET.into();
    c.custody.redirect_uri = format!("{base}/auth/callback");
    c.custody.post_logout_redirect_uri = format!("{base}/");
    c.custody.cookie_secure = false;
    c.custody.refresh_tolerance_ms = refresh_tolerance_ms;
    c.publish.clients = vec![PUBLISHER.into()];
    c.validate().unwrap();
    let t = tabhub::start(
        listener,
        c,
        tabhub::commands::builtin(),
        axum::Router::new(),
    )
    .await
    .unwrap();
    support::eventually("tabhub loaded the provider's discovery and keys", || {
        t.app().realm.is_ready()
    })
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Interop {
        provider,
        t,
        base,
        http,
    }
}

/// `reference` resolved against `base` (the provider's redirects and form actions may be relative).
fn absolute(base: &str, reference: &str) -> String {
    reqwest::Url::parse(base)
        .unwrap()
        .join(reference)
        .unwrap()
        .to_string()
}

/// The value of attribute `name` of the first tag of `html` that has it, HTML entities of a URL undone.
fn attribute(html: &str, name: &str) -> Option<String> {
    let start = html.find(&format!("{name}=\""))? + name.len() + 2;
    let end = html[start..].find('"')? + start;
    Some(
        html[start..end]
            .replace("&amp;", "&")
            .replace("&#x2F;", "/")
            .replace("&#47;", "/"),
    )
}

/// The value of the hidden input `name` of a form.
fn hidden(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\""))?;
    let tag_start = html[..at].rfind('<')?;
    let tag_end = at + html[at..].find('>')?;
    attribute(&html[tag_start..tag_end], "value")
}

impl Interop {
    /// Follows `start` through the provider's login and consent forms as `user` (any password is accepted), until
    /// a redirect leaves the provider: returns that URL (the client's redirect URI with `code` and `state`), after
    /// checking that both forms were posted.
    async fn authorize(&self, browser: &Browser, start: &str, user: &str) -> String {
        let issuer = &self.provider.issuer;
        let mut url = start.to_owned();
        let mut posted = Vec::new();
        for _ in 0..16 {
            if !url.starts_with(issuer.as_str()) {
                assert_eq!(
                    posted,
                    ["login", "consent"],
                    "the provider's forms, in order"
                );
                return url;
            }
            let r = browser.get(&url).await;
            if r.status().is_redirection() {
                url = absolute(&url, &location(&r));
                continue;
            }
            let status = r.status();
            let page = r.text().await.unwrap();
            assert_eq!(status, 200, "{url}: {page}");
            let action =
                attribute(&page, "action").unwrap_or_else(|| panic!("no form at {url}: {page}"));
            let prompt = hidden(&page, "prompt").unwrap_or_default();
            let form: Vec<(&str, &str)> = match prompt.as_str() {
                "login" => vec![("prompt", "login"), ("login", user), ("password", "any")],
                "consent" => vec![("prompt", "consent")],
                other => panic!("unexpected form {other:?} at {url}: {page}"),
            };
            posted.push(prompt.clone());
            let r = browser.post_form(&absolute(&url, &action), &form).await;
            assert!(r.status().is_redirection(), "{prompt} form: {}", r.status());
            url = absolute(&url, &location(&r));
        }
        panic!("the authorization never left the provider: {url}");
    }

    /// Logs `user` in through tabhub's token custody (authorization code + PKCE with the provider); returns the
    /// browser (it holds the provider's session cookie) and tabhub's login cookie `name=value`.
    async fn custody_login(&self, user: &str) -> (Browser, String) {
        let browser = Browser::default();
        let r = browser
            .get(&format!("{}/auth/login?redirect=/", self.base))
            .await;
        assert_eq!(r.status(), 302);
        let to_provider = location(&r);
        assert!(
            to_provider.starts_with(&self.provider.issuer),
            "{to_provider}"
        );
        assert!(
            to_provider.contains("code_challenge_method=S256"),
            "{to_provider}"
        );
        let back = self.authorize(&browser, &to_provider, user).await;
        assert!(
            back.starts_with(&format!("{}/auth/callback?", self.base)),
            "{back}"
        );
        let r = browser.get(&back).await;
        let status = r.status();
        let cookie = sets_cookie(&r, "tabhub_session");
        assert_eq!(status, 302, "callback: {:?}", r.text().await);
        let cookie = cookie.expect("a login cookie");
        (browser, cookie.split(';').next().unwrap().to_owned())
    }

    /// A browser tab on tabhub with the login cookie.
    async fn cookie_tab(&self, cookie: &str) -> Client {
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

    /// The browser application's own login (public client, PKCE), code exchanged at the provider: its token
    /// answer (access, ID and refresh tokens).
    async fn ui_tokens(&self, user: &str) -> Value {
        let (challenge, verifier) = openidconnect::PkceCodeChallenge::new_random_sha256();
        let mut start = reqwest::Url::parse(&format!("{}/auth", self.provider.issuer)).unwrap();
        start
            .query_pairs_mut()
            .append_pair("client_id", UI_CLIENT)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", UI_REDIRECT)
            .append_pair("scope", "openid profile email")
            .append_pair("state", "ui-state")
            .append_pair("nonce", "ui-nonce")
            .append_pair("code_challenge", challenge.as_str())
            .append_pair("code_challenge_method", "S256");
        let back = self
            .authorize(&Browser::default(), start.as_str(), user)
            .await;
        let back = reqwest::Url::parse(&back).unwrap();
        let code = back
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| panic!("no code in {back}"));
        let r = self
            .http
            .post(format!("{}/token", self.provider.issuer))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", UI_REDIRECT),
                ("client_id", UI_CLIENT),
                ("code_verifier", verifier.secret()),
            ])
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// The JOSE header `typ` of a JWT.
fn header_typ(jwt: &str) -> Option<String> {
    jsonwebtoken::decode_header(jwt).ok()?.typ
}

/// Expects the in-band refusal of a handshake: one `error`, then the close code; returns both.
async fn refused(url: &str, token: &str) -> (Option<u16>, Value) {
    let mut c = Client::connect_with(url, Cred::Header(token), None)
        .await
        .unwrap();
    let (code, msgs) = c.closed().await;
    assert_eq!(msgs.len(), 1, "one error before the close: {msgs:?}");
    assert!(
        !msgs[0].to_string().contains(token),
        "the token is never echoed"
    );
    (code, msgs[0]["data"].clone())
}

/// The provider's RFC 9068 access tokens open websockets (the user is `sub`, the client read from `client_id`);
/// its ID tokens (standard shape: no `typ` claim, the client in `aud`, a `nonce`) never do.
#[tokio::test]
async fn its_access_tokens_open_websockets_and_its_id_tokens_never_do() {
    let s = setup(300, 10_000).await;
    let tokens = s.ui_tokens("alice").await;
    let access = tokens["access_token"].as_str().unwrap();
    let id_token = tokens["id_token"].as_str().unwrap();
    assert_eq!(
        header_typ(access).as_deref(),
        Some("at+jwt"),
        "the standard shape is what is tested"
    );
    let url = support::ws_url(&s.t);
    let mut tab = Client::connect_with(&url, Cred::Header(access), None)
        .await
        .unwrap();
    let init = tab.recv().await;
    assert_eq!(init["type"], "init", "{init}");
    tab.send("ping", json!({}), Some(json!(1))).await;
    assert_eq!(tab.recv_type("ack").await["id"], 1);
    for cred in [Cred::Subprotocol(access)] {
        let mut c = Client::connect_with(&url, cred, None).await.unwrap();
        assert_eq!(c.recv().await["type"], "init");
    }
    let (code, data) = refused(&url, id_token).await;
    assert_eq!(code, Some(4001), "{data}");
    assert!(
        data["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not an access token"),
        "{data}"
    );
    // The refresh token is opaque here: refused as malformed, never a session.
    let refresh = tokens["refresh_token"].as_str().unwrap();
    assert_eq!(refused(&url, refresh).await.0, Some(4001));
}

/// Token custody against the provider: authorization code + PKCE through its login and consent forms, tabs on
/// the login cookie, silent refreshes with rotated refresh tokens (each refresh token works once at the provider:
/// two refreshes in a row prove the rotated one was kept), then RP-initiated logout: tabs closed 4003, the
/// provider's end-session URL accepted, and the ID token it carries refused at the handshake.
#[tokio::test]
async fn custody_login_silent_refresh_and_rp_initiated_logout() {
    // Access tokens live 12 s and are refreshed 10 s before they expire: a refresh every 2 s or so.
    let s = setup(12, 10_000).await;
    let (browser, cookie) = s.custody_login("alice").await;
    let mut tab = s.cookie_tab(&cookie).await;
    let refreshes = || s.t.app().metrics.token_refreshes.get(&["ok"]);
    support::eventually("two silent refreshes with rotated refresh tokens", || {
        refreshes() >= 2.0
    })
    .await;
    assert_eq!(s.t.app().metrics.token_refreshes.get(&["rejected"]), 0.0);
    tab.send("ping", json!({}), Some(json!("alive"))).await;
    assert_eq!(tab.recv_type("ack").await["id"], "alive");
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
    assert_eq!(me["user"]["id"], "alice", "{me}");

    let r = s
        .http
        .post(format!("{}/auth/logout", s.base))
        .header("cookie", &cookie)
        .header("origin", &s.base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["loggedOut"], true, "{out}");
    let (code, _) = tab.closed().await;
    assert_eq!(code, Some(4003));
    let logout_url = out["logoutUrl"]
        .as_str()
        .expect("an end-session URL")
        .to_owned();
    let end_session = s.provider.discovery().await["end_session_endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(logout_url.starts_with(&end_session), "{logout_url}");
    let id_token = reqwest::Url::parse(&logout_url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "id_token_hint")
        .map(|(_, v)| v.into_owned())
        .expect("id_token_hint");
    // The ID token handed to the browser never opens a websocket.
    let (code, data) = refused(&support::ws_url(&s.t), &id_token).await;
    assert_eq!(code, Some(4001), "{data}");

    // The browser follows the URL: the provider asks to confirm, then sends it back to tabhub.
    let r = browser.get(&logout_url).await;
    let page = r.text().await.unwrap();
    let action = attribute(&page, "action").unwrap_or_else(|| panic!("no logout form: {page}"));
    let xsrf = hidden(&page, "xsrf").unwrap_or_else(|| panic!("no xsrf: {page}"));
    let r = browser
        .post_form(
            &absolute(&logout_url, &action),
            &[("xsrf", &xsrf), ("logout", "yes")],
        )
        .await;
    assert!(r.status().is_redirection(), "{}", r.status());
    assert_eq!(location(&r), format!("{}/", s.base));
    let r = s
        .http
        .get(format!("{}/auth/me", s.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// The user logs out at the provider itself (its end-session page, no client involved): the provider sends
/// tabhub a back-channel logout token naming the session (`sid`) and the user, and tabhub closes that login's tabs
/// with 4003 at once, although the provider's access tokens carry no `sid` (it was kept from the ID token).
#[tokio::test]
async fn backchannel_logout_started_at_the_provider_closes_the_login() {
    let s = setup(300, 10_000).await;
    let (browser, cookie) = s.custody_login("alice").await;
    let (_, other) = s.custody_login("alice").await;
    let mut tab = s.cookie_tab(&cookie).await;
    let mut other_tab = s.cookie_tab(&other).await;

    let end = format!("{}/session/end", s.provider.issuer);
    let r = browser.get(&end).await;
    let page = r.text().await.unwrap();
    let action = attribute(&page, "action").unwrap_or_else(|| panic!("no logout form: {page}"));
    let xsrf = hidden(&page, "xsrf").unwrap_or_else(|| panic!("no xsrf: {page}"));
    let r = browser
        .post_form(
            &absolute(&end, &action),
            &[("xsrf", &xsrf), ("logout", "yes")],
        )
        .await;
    assert!(
        r.status().is_success() || r.status().is_redirection(),
        "{}",
        r.status()
    );

    let (code, msgs) = tab.closed().await;
    assert_eq!(code, Some(4003), "logged out by the provider: {msgs:?}");
    assert!(
        msgs.iter().any(|m| m["data"]["loggedOut"] == true),
        "{msgs:?}"
    );
    // The other login (another provider session of the same user) is untouched.
    other_tab.send("ping", json!({}), Some(json!(2))).await;
    assert_eq!(other_tab.recv_type("ack").await["id"], 2);
    let r = s
        .http
        .get(format!("{}/auth/me", s.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the login is gone");
    assert!(s
        .provider
        .proc
        .read("stderr.log")
        .contains("backchannel.success"));
}

/// A standard client-credentials token (RFC 9068: `client_id`, `sub` = the client, no `typ` claim, no `azp`)
/// publishes; a token of a client not in `publish.clients` gets 403.
#[tokio::test]
async fn a_client_credentials_token_publishes() {
    let s = setup(300, 10_000).await;
    let tokens = s.ui_tokens("bob").await;
    let mut tab = Client::connect(
        &support::ws_url(&s.t),
        tokens["access_token"].as_str().unwrap(),
    )
    .await;
    let r: Value = s
        .http
        .post(format!("{}/token", s.provider.issuer))
        .basic_auth(PUBLISHER, Some(PUBLISHER_SECRET))
        .form(&[("grant_type", "client_credentials"), ("scope", "publish")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = r["access_token"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(header_typ(token).as_deref(), Some("at+jwt"));
    let publish = |bearer: String| {
        let http = s.http.clone();
        let url = format!("{}/api/publish", s.base);
        async move {
            let r = http
                .post(url)
                .bearer_auth(bearer)
                .json(&json!({"target": {"user": "bob"}, "type": "hello", "data": {"n": 1}}))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    assert_eq!(publish(token.to_owned()).await, 200);
    let m = tab.recv_type("hello").await;
    assert_eq!(m["data"], json!({"n": 1}));
    // The browser application's access token is valid, but not a publisher's.
    assert_eq!(
        publish(tokens["access_token"].as_str().unwrap().to_owned()).await,
        403
    );
    assert_eq!(
        publish(tokens["id_token"].as_str().unwrap().to_owned()).await,
        401
    );
}
