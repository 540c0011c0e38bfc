//! The engine over real sockets: handshake credentials and refusals, sessions shared by a user's tabs, loops,
//! linger, bad input, `id` echo, `authenticate`, and token expiry. The tests register commands of their own
//! through the public API, without touching the engine.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use support::client::Cred;
use support::keycloak::sub_of;
use support::{Client, Keycloak, TokenSpec};
use tabhub::commands::{
    Cadence, Command, CommandError, Context, LoopFunction, NoParams, Notification, Registry,
};
use tokio_tungstenite::tungstenite::Message;

/// Which loop instances ran (an instance is one registered closure), and how often.
#[derive(Default)]
struct LoopLog {
    next_instance: AtomicUsize,
    ran: Mutex<Vec<(usize, String)>>,
}

impl LoopLog {
    fn instances(&self) -> HashSet<usize> {
        self.ran.lock().unwrap().iter().map(|(i, _)| *i).collect()
    }
    fn iterations(&self) -> usize {
        self.ran.lock().unwrap().len()
    }
}

/// `watch {}`: registers a short-loop function that logs its runs and sends `tick {n}`.
struct Watch(Arc<LoopLog>);

impl Command for Watch {
    const NAME: &'static str = "watch";
    const DOC: &'static str = "Test: registers a loop function.";
    type Params = NoParams;

    async fn handle(&self, _: NoParams, ctx: &dyn Context) -> Result<(), CommandError> {
        let instance = self.0.next_instance.fetch_add(1, Ordering::SeqCst);
        let log = self.0.clone();
        let user = ctx.user().id.clone();
        let registered =
            ctx.register_loop(LoopFunction::new("watch", Cadence::Short, move |_ctx| {
                let log = log.clone();
                let user = user.clone();
                async move {
                    let n = {
                        let mut ran = log.ran.lock().unwrap();
                        ran.push((instance, user));
                        ran.len()
                    };
                    Ok(vec![Notification::new("tick", json!({ "n": n }))])
                }
            }));
        ctx.reply("watching", json!({ "registered": registered }));
        Ok(())
    }
}

/// `shout {text, loud?}`: notifies every tab of the user.
struct Shout;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShoutParams {
    text: String,
    #[serde(default)]
    loud: bool,
}

impl Command for Shout {
    const NAME: &'static str = "shout";
    const DOC: &'static str = "Test: sends text to all the user's tabs.";
    const REQUIRED: &'static [&'static str] = &["text"];
    const OPTIONAL: &'static [&'static str] = &["loud"];
    type Params = ShoutParams;

    async fn handle(&self, p: ShoutParams, ctx: &dyn Context) -> Result<(), CommandError> {
        let text = if p.loud {
            p.text.to_uppercase()
        } else {
            p.text
        };
        ctx.notify_user("shout", json!({ "text": text, "from": ctx.user().name }));
        Ok(())
    }
}

fn registry(log: &Arc<LoopLog>) -> Registry {
    let mut r = tabhub::commands::builtin();
    r.register(Watch(log.clone())).register(Shout);
    r
}

async fn setup() -> (Keycloak, tabhub::Running, Arc<LoopLog>) {
    let kc = Keycloak::start().await;
    let log = Arc::new(LoopLog::default());
    let t = support::start(support::config(&kc), registry(&log)).await;
    (kc, t, log)
}

#[tokio::test]
async fn each_credential_source_is_accepted() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.auth.token_cookie = "kc-access".into();
    let t = support::start(c, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let token = kc.token("alice");

    for cred in [
        Cred::Header(&token),
        Cred::Cookie("kc-access", &token),
        Cred::Subprotocol(&token),
    ] {
        let is_sub = matches!(cred, Cred::Subprotocol(_));
        let mut c = Client::connect_with(&url, cred, Some("https://renku.example"))
            .await
            .unwrap();
        let init = c.recv().await;
        assert_eq!(init["type"], "init");
        assert_eq!(init["scope"], "user");
        assert_eq!(init["data"]["message"], "Connection established.");
        assert_eq!(init["data"]["user"], "alice");
        assert_eq!(init["data"]["instance"], "test-instance");
        if is_sub {
            // The chosen subprotocol is echoed, never the token.
            assert_eq!(c.response_headers["sec-websocket-protocol"], "tabhub");
        }
    }
}

async fn refused(url: &str, token: &str) -> (Option<u16>, Value) {
    let mut c = Client::connect_with(url, Cred::Header(token), None)
        .await
        .unwrap();
    let (code, msgs) = c.closed().await;
    assert_eq!(msgs.len(), 1, "one error before the close: {msgs:?}");
    assert_eq!(msgs[0]["type"], "error");
    let text = msgs[0].to_string();
    assert!(!text.contains(token), "the token must not be echoed");
    (code, msgs[0]["data"].clone())
}

#[tokio::test]
async fn each_refused_token_gets_its_code() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let url = support::ws_url(&t);
    let base = TokenSpec::user("mallory");
    let cases: Vec<(&str, TokenSpec, u16, &str)> = vec![
        (
            "bad signature",
            base.clone().key("rogue.pem", "fixture-rs256-a"),
            4001,
            "bad signature",
        ),
        (
            "unknown kid",
            base.clone().key("rogue.pem", "fixture-rogue"),
            4001,
            "unknown signing key",
        ),
        (
            "wrong issuer",
            TokenSpec {
                iss: Some("https://evil.example/realms/test".into()),
                ..base.clone()
            },
            4001,
            "wrong issuer",
        ),
        ("expired", base.clone().exp_in(-120), 4002, "expired"),
        (
            "not yet valid",
            TokenSpec {
                nbf_in: Some(600),
                ..base.clone()
            },
            4001,
            "not valid yet",
        ),
        (
            "wrong client",
            TokenSpec {
                azp: "other-app".into(),
                aud: json!(["account", "other-app"]),
                ..base.clone()
            },
            4001,
            "another client",
        ),
        (
            "id token",
            TokenSpec {
                typ: "ID".into(),
                ..base.clone()
            },
            4001,
            "an ID token is not an access token",
        ),
        (
            "alg none",
            TokenSpec {
                key: "none".into(),
                ..base.clone()
            },
            4001,
            "invalid token",
        ),
        (
            "hmac",
            TokenSpec {
                key: "hmac".into(),
                ..base.clone()
            },
            4001,
            "algorithm not accepted",
        ),
        ("garbage", base.clone(), 4001, "malformed"),
    ];
    for (what, spec, want_code, want_text) in cases {
        let token = if what == "garbage" {
            "not-a-jwt".to_owned()
        } else {
            kc.mint(&spec)
        };
        let (code, data) = refused(&url, &token).await;
        assert_eq!(code, Some(want_code), "{what}: {data}");
        let msg = data["message"].as_str().unwrap();
        assert!(msg.contains(want_text), "{what}: {msg}");
        if want_code == 4002 {
            assert_eq!(data["authExpired"], true);
        } else {
            assert_eq!(data["invalidToken"], true, "{what}");
        }
    }
    // ES256 and a token whose aud (not azp) names the client are accepted.
    let es = kc.mint(&TokenSpec::user("erin").key("es256-a.pem", "fixture-es256-a"));
    Client::connect(&url, &es).await;
    let aud = kc.mint(&TokenSpec {
        azp: "cli".into(),
        aud: json!(["renku-ui"]),
        ..TokenSpec::user("erin")
    });
    Client::connect(&url, &aud).await;
}

#[tokio::test]
async fn key_rotation_is_picked_up_with_one_refetch() {
    let kc = Keycloak::start().await;
    let mut cfg = support::config(&kc);
    cfg.auth.jwks_refetch_min_interval_ms = 1_000;
    let t = support::start(cfg, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let rotated = TokenSpec::user("alice").key("rs256-b.pem", "fixture-rs256-b");
    tokio::time::sleep(Duration::from_millis(1_100)).await; // past the refetch interval since the start
    let before = kc.jwks_fetches();
    let (code, _) = refused(&url, &kc.mint(&rotated)).await;
    assert_eq!(code, Some(4001));
    assert_eq!(
        kc.jwks_fetches(),
        before + 1,
        "an unknown kid triggers one refetch"
    );

    // A concurrent burst of unknown kids costs at most one request per refetch interval.
    let started = std::time::Instant::now();
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (url, token) = (url.clone(), kc.mint(&rotated));
            tokio::spawn(async move { refused(&url, &token).await.0 })
        })
        .collect();
    for h in burst {
        assert_eq!(h.await.unwrap(), Some(4001));
    }
    let windows = started.elapsed().as_millis() as usize / 1_000 + 1;
    let extra = kc.jwks_fetches() - (before + 1);
    assert!(
        extra <= windows,
        "{extra} refetches in {windows} refetch interval(s)"
    );

    kc.rotate_keys();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let fetched = kc.jwks_fetches();
    let mut c = Client::connect(&url, &kc.mint(&rotated)).await;
    assert_eq!(kc.jwks_fetches(), fetched + 1, "accepted after one refetch");
    c.send("ping", json!({}), None).await;
    assert_eq!(c.recv().await["type"], "ack");
}

/// Both standard shapes of access token open a session, by what they are: Keycloak's (`typ` claim `Bearer`, client
/// in `azp`) and RFC 9068's (`typ` header `at+jwt`, client in `client_id`); ID, refresh and logout tokens of an
/// accepted client never do, even with `require_typ_bearer = false`, which lets in only unmarked tokens that cannot
/// be ID tokens.
#[tokio::test]
async fn access_tokens_of_either_shape_open_and_other_tokens_never_do() {
    let kc = Keycloak::start().await;
    for require_typ_bearer in [true, false] {
        let mut cfg = support::config(&kc);
        cfg.auth.require_typ_bearer = require_typ_bearer;
        cfg.auth.client_ids.push("tabhub".into());
        let t = support::start(cfg, tabhub::commands::builtin()).await;
        let url = support::ws_url(&t);
        Client::connect(&url, &kc.mint(&TokenSpec::user("alice"))).await;
        Client::connect(&url, &kc.mint(&TokenSpec::rfc9068("alice", "tabhub"))).await;
        let (code, data) = refused(&url, &kc.mint(&TokenSpec::rfc9068("alice", "cli"))).await;
        assert_eq!(code, Some(4001), "RFC 9068 token of another client: {data}");

        let id = |spec: TokenSpec| spec.without("typ").claim("aud", json!("tabhub"));
        let refusals = [
            (
                "Keycloak ID token",
                TokenSpec::user("alice").claim("typ", json!("ID")),
                "ID token",
            ),
            (
                "Keycloak refresh token",
                TokenSpec::user("alice").claim("typ", json!("Refresh")),
                "refresh token",
            ),
            (
                "Keycloak offline token",
                TokenSpec::user("alice").claim("typ", json!("Offline")),
                "refresh token",
            ),
            (
                "standard ID token",
                id(TokenSpec::user("alice")).claim("nonce", json!("n")),
                "ID token",
            ),
            (
                "standard ID token without nonce",
                id(TokenSpec::user("alice")).without("azp"),
                "",
            ),
            (
                "ID token with azp",
                id(TokenSpec::user("alice")).claim("azp", json!("tabhub")),
                "",
            ),
            (
                "logout token",
                TokenSpec {
                    header_typ: Some("logout+jwt".into()),
                    ..id(TokenSpec::user("alice"))
                },
                "logout token",
            ),
            (
                "at+jwt with a nonce",
                TokenSpec::rfc9068("alice", "tabhub").claim("nonce", json!("n")),
                "ID token",
            ),
        ];
        for (what, spec, text) in refusals {
            let (code, data) = refused(&url, &kc.mint(&spec)).await;
            assert_eq!(
                code,
                Some(4001),
                "{what} (require_typ_bearer {require_typ_bearer}): {data}"
            );
            let message = data["message"].as_str().unwrap_or_default();
            assert!(message.contains(text), "{what}: {message}");
        }
        // An unmarked access token (client in azp, aud a resource server) only when markers are not required.
        let unmarked = TokenSpec {
            aud: json!("https://api.example"),
            ..TokenSpec::user("alice")
        }
        .without("typ");
        if require_typ_bearer {
            let (code, _) = refused(&url, &kc.mint(&unmarked)).await;
            assert_eq!(code, Some(4001));
        } else {
            Client::connect(&url, &kc.mint(&unmarked)).await;
        }
    }
}

/// A realm makes a new signing key active at once (Keycloak does): a token naming a `kid` published after the last
/// key fetch, inside `jwks_refetch_min_interval_ms`, is told to retry (1013, `retry: true`), never 4001 ("the same
/// token will never work"), and costs no request; the same token opens as soon as a refetch is allowed.
#[tokio::test]
async fn a_new_kid_inside_the_refetch_interval_is_retry_later_never_invalid() {
    let kc = Keycloak::start().await;
    let mut cfg = support::config(&kc);
    cfg.auth.jwks_refetch_min_interval_ms = 5_000;
    cfg.auth.jwks_unknown_kid_wait_ms = 0;
    let t = support::start(cfg, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    kc.rotate_keys();
    let token = kc.mint(&TokenSpec::user("alice").key("rs256-b.pem", "fixture-rs256-b"));
    let fetched = kc.jwks_fetches();
    let (code, data) = refused(&url, &token).await;
    assert_eq!(code, Some(1013), "{data}");
    assert_eq!(data["retry"], true, "{data}");
    assert!(data.get("invalidToken").is_none(), "{data}");
    assert_eq!(kc.jwks_fetches(), fetched, "no refetch inside the interval");
    // As a client does on 1013: retry (with a short pause) until it opens; one refetch, once allowed.
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let mut c = Client::connect_with(&url, Cred::Header(&token), None)
            .await
            .unwrap();
        let first = c.recv().await;
        if first["type"] == "init" {
            break;
        }
        assert_eq!(
            first["data"]["retry"], true,
            "only retry-later before: {first}"
        );
        assert!(tokio::time::Instant::now() < deadline, "never accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(kc.jwks_fetches(), fetched + 1, "one refetch, once allowed");
}

/// With `jwks_unknown_kid_wait_ms` covering the rest of the interval, a new key's token waits for the next allowed
/// refetch and opens in the same handshake; a flood of made-up `kid`s arriving meanwhile shares that one refetch
/// (and is refused after it) instead of keeping the genuine key out; a made-up `kid` seen again costs nothing.
#[tokio::test]
async fn one_refetch_serves_every_waiting_token_and_made_up_kids_keep_no_key_out() {
    const INTERVAL: Duration = Duration::from_millis(4_000);
    let kc = Keycloak::start().await;
    let mut cfg = support::config(&kc);
    cfg.auth.jwks_refetch_min_interval_ms = INTERVAL.as_millis() as u64;
    cfg.auth.jwks_unknown_kid_wait_ms = 6_000;
    // Minted first: the burst below must fit in one refetch interval from tabhub's start.
    let made_up: Vec<String> = (0..30)
        .map(|i| kc.mint(&TokenSpec::user("mallory").key("rogue.pem", &format!("made-up-{i}"))))
        .collect();
    let again = kc.mint(&TokenSpec::user("mallory").key("rogue.pem", "made-up-0"));
    let genuine = kc.mint(&TokenSpec::user("alice").key("rs256-b.pem", "fixture-rs256-b"));
    // The refetch comes at least an interval after tabhub's first fetch, which comes after this.
    let before_start = std::time::Instant::now();
    let t = support::start(cfg, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    kc.rotate_keys();
    let fetched = kc.jwks_fetches();
    let started = std::time::Instant::now();
    let made_up: Vec<_> = made_up
        .into_iter()
        .map(|token| {
            let url = url.clone();
            tokio::spawn(async move { refused(&url, &token).await })
        })
        .collect();
    let mut c = Client::connect(&url, &genuine).await;
    for h in made_up {
        let (code, data) = h.await.unwrap();
        assert_eq!(code, Some(4001), "{data}");
        assert!(data["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown signing key"));
    }
    // One refetch serves every token waiting for it: one per interval the burst spanned (one, unless the machine
    // is so loaded that the 31 handshakes took longer than an interval to arrive).
    let windows = (started.elapsed().as_millis() / INTERVAL.as_millis()) as usize + 1;
    let refetches = kc.jwks_fetches() - fetched;
    assert!(
        (1..=windows).contains(&refetches),
        "{refetches} refetches for 31 tokens in {windows} interval(s)"
    );
    // A made-up kid again, within the interval after the refetch: refused at once, without a request (the per-kid
    // throttle). The refetch began at least an interval after `before_start`: until two intervals from then, its
    // answer still stands (checked unless the machine was too slow to get here in time).
    let before = kc.jwks_fetches();
    let (code, _) = refused(&url, &again).await;
    assert_eq!(code, Some(4001));
    if before_start.elapsed() < 2 * INTERVAL {
        assert_eq!(kc.jwks_fetches(), before, "the per-kid throttle");
    }
    c.send("ping", json!({}), None).await;
    assert_eq!(c.recv().await["type"], "ack");
}

/// A realm withdraws a key after rotating to a new one. tabhub learns it at its next key fetch (the new key's first
/// token names a `kid` it does not know); from then on the withdrawn key's tokens are refused, including one that
/// was verified before and sits in the cache of verified tokens.
#[tokio::test]
async fn a_withdrawn_key_is_refused_from_the_next_key_fetch_on() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let url = support::ws_url(&t);
    let old = kc.mint(&TokenSpec::user("alice"));
    Client::connect(&url, &old).await.close().await;

    kc.rotate_keys();
    kc.withdraw_key("fixture-rs256-a");
    // Past the refetch interval (200 ms) since the start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fetched = kc.jwks_fetches();
    let new = kc.mint(&TokenSpec::user("alice").key("rs256-b.pem", "fixture-rs256-b"));
    Client::connect(&url, &new).await.close().await;
    assert_eq!(kc.jwks_fetches(), fetched + 1, "the new key was fetched");

    let (code, data) = refused(&url, &old).await;
    assert_eq!(code, Some(4001), "the cached token of the withdrawn key");
    assert!(
        data["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown signing key")),
        "{data}"
    );
    let (code, _) = refused(&url, &kc.mint(&TokenSpec::user("bob"))).await;
    assert_eq!(code, Some(4001), "a fresh token of the withdrawn key");
    // The new key's token, cached as well, is not affected.
    Client::connect(&url, &new).await.close().await;
}

#[tokio::test]
async fn a_withdrawn_key_closes_the_tabs_of_the_sessions_whose_token_it_signed() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let url = support::ws_url(&t);
    let mut alice = Client::connect(&url, &kc.mint(&TokenSpec::user("alice"))).await;
    kc.rotate_keys();
    kc.withdraw_key("fixture-rs256-a");
    // Past the refetch interval (200 ms): bob's token names the new kid, and its refetch sees the withdrawal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob_token = kc.mint(&TokenSpec::user("bob").key("rs256-b.pem", "fixture-rs256-b"));
    let mut bob = Client::connect(&url, &bob_token).await;
    let (code, msgs) = alice.closed().await;
    assert_eq!(code, Some(4002), "get a new token: {msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m["type"] == "error" && m["data"]["authExpired"] == true),
        "{msgs:?}"
    );
    // A session whose token the new key signed is served on.
    bob.send("ping", json!({}), None).await;
    assert_eq!(bob.recv().await["type"], "ack");
}

#[tokio::test]
async fn a_withdrawn_key_is_refused_after_the_periodic_refresh_without_any_new_kid() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.auth.jwks_refresh_interval_ms = 300;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let old = kc.mint(&TokenSpec::user("alice"));
    Client::connect(&url, &old).await.close().await;
    let fetched = kc.jwks_fetches();
    // Keycloak's order: the new key comes in, later the old one goes; no token names an unknown kid meanwhile.
    kc.rotate_keys();
    kc.withdraw_key("fixture-rs256-a");
    // Two more fetches: a refetch that began before the withdrawal is followed by one after it.
    support::eventually("periodic JWKS refetches", || {
        kc.jwks_fetches() >= fetched + 2
    })
    .await;
    let (code, data) = refused(&url, &old).await;
    assert_eq!(code, Some(4001), "the cached token of the withdrawn key");
    assert!(
        data["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown signing key")),
        "{data}"
    );
}

#[tokio::test]
async fn missing_credential_gets_renku_error_and_4000() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let mut c = Client::connect_with(&support::ws_url(&t), Cred::None, None)
        .await
        .unwrap();
    let (code, msgs) = c.closed().await;
    assert_eq!(code, Some(4000));
    assert_eq!(msgs[0]["type"], "error");
    assert_eq!(msgs[0]["data"]["missingAuth"], true);
}

#[tokio::test]
async fn bad_origin_is_refused_before_upgrade() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.origins.allow_missing = false;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let token = kc.token("alice");
    for origin in [Some("https://evil.example"), None] {
        match Client::connect_with(&url, Cred::Header(&token), origin).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 403, "{origin:?}")
            }
            Err(e) => panic!("{origin:?}: unexpected error {e}"),
            Ok(_) => panic!("{origin:?}: upgrade must be refused"),
        }
    }
    Client::connect_with(&url, Cred::Header(&token), Some("https://renku.example"))
        .await
        .unwrap();
    // A plain GET is not an upgrade.
    let r = reqwest::get(format!("http://{}/ws", t.local_addr()))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("websocket"));
}

#[tokio::test]
async fn tabs_of_a_user_share_one_session_and_one_loop() {
    let (kc, t, log) = setup().await;
    let url = support::ws_url(&t);
    let mut a1 = Client::connect(&url, &kc.token("alice")).await;
    let mut a2 = Client::connect(&url, &kc.token("alice")).await;
    a1.send("watch", json!({}), None).await;
    assert_eq!(a1.recv_type("watching").await["data"]["registered"], true);
    a2.send("watch", json!({}), None).await;
    assert_eq!(a2.recv_type("watching").await["data"]["registered"], false);
    // Both tabs receive the loop's notifications.
    let n1 = a1.recv_type("tick").await["data"]["n"].as_u64().unwrap();
    let n2 = a2.recv_type("tick").await["data"]["n"].as_u64().unwrap();
    assert!(n1 >= 1 && n2 >= 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(log.instances().len(), 1, "one loop for the user");
    // 1.5 s at 0.4 s ticks (the second after 0.2-0.6 s): a single loop runs at most 6 times.
    let n = log.iterations();
    assert!((2..=7).contains(&n), "{n} iterations");
    assert_eq!(t.app().hub.len(), 1);
    assert_eq!(t.app().hub.get(&sub_of("alice")).unwrap().tab_count(), 2);
}

#[tokio::test]
async fn users_never_see_each_others_messages() {
    let (kc, t, _log) = setup().await;
    let url = support::ws_url(&t);
    let mut a1 = Client::connect(&url, &kc.token("alice")).await;
    let mut a2 = Client::connect(&url, &kc.token("alice")).await;
    let mut b = Client::connect(&url, &kc.token("bob")).await;
    a1.send(
        "shout",
        json!({"text": "hi", "loud": true}),
        Some(json!("s1")),
    )
    .await;
    for c in [&mut a1, &mut a2] {
        let m = c.recv().await;
        assert_eq!(m["type"], "shout");
        assert_eq!(m["data"], json!({"text": "HI", "from": "alice"}));
        assert!(m.get("id").is_none(), "a user-wide message is not a reply");
    }
    b.expect_silence(Duration::from_millis(300)).await;
    b.send("shout", json!({"text": "yo"}), None).await;
    assert_eq!(b.recv().await["data"]["from"], "bob");
    a1.expect_silence(Duration::from_millis(200)).await;
    a2.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn session_lingers_then_stops_its_loops() {
    let (kc, t, log) = setup().await;
    let url = support::ws_url(&t);
    let mut a = Client::connect(&url, &kc.token("alice")).await;
    a.send("watch", json!({}), None).await;
    a.recv_type("tick").await;
    a.close().await;
    // Lingering: the session still exists right after the last tab left.
    let session = t.app().hub.get(&sub_of("alice")).expect("session lingers");
    support::eventually("session stopped after the linger", || session.is_stopped()).await;
    assert!(t.app().hub.get(&sub_of("alice")).is_none());
    let after = log.iterations();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(log.iterations(), after, "no iteration after the stop");
    let m = reqwest::get(format!("http://{}/metrics", t.local_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("tabhub_users 0") && m.contains("tabhub_lingering_sessions 0"),
        "{m}"
    );
}

#[tokio::test]
async fn a_reopen_storm_leaves_exactly_one_loop() {
    let (kc, t, log) = setup().await;
    let url = support::ws_url(&t);
    let token = kc.token("alice");
    for _ in 0..100 {
        let mut c = Client::connect(&url, &token).await;
        c.send("watch", json!({}), None).await;
        c.recv_type("watching").await;
        c.close().await;
    }
    assert_eq!(
        log.instances().len(),
        1,
        "exactly one loop across 100 reopenings"
    );
    assert_eq!(t.app().hub.len(), 1);
    // A tab arriving in the last moment of the linger, over and over, also never gets a second session.
    let session = t.app().hub.get(&sub_of("alice")).unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(280)).await;
        let c = Client::connect(&url, &token).await;
        c.close().await;
    }
    let now = t.app().hub.get(&sub_of("alice"));
    if let Some(s) = now {
        assert!(Arc::ptr_eq(&s, &session) || session.is_stopped());
    }
    support::eventually("stopped", || t.app().hub.is_empty()).await;
}

#[tokio::test]
async fn bad_input_gets_an_error_and_keeps_the_socket() {
    let (kc, t, _log) = setup().await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    let cases: &[(&str, &str)] = &[
        ("{not json", "malformed JSON"),
        ("[1,2]", "JSON object"),
        (r#"{"data":{}}"#, "missing 'type'"),
        (
            r#"{"type":"launchMissiles","data":{}}"#,
            "Instruction of type 'launchMissiles' is not supported.",
        ),
        (
            r#"{"type":"shout","data":{}}"#,
            "missing parameter(s) 'text'",
        ),
        (
            r#"{"type":"shout","data":{"text":"x","volume":11}}"#,
            "unexpected parameter(s) 'volume'",
        ),
        (
            r#"{"type":"shout","data":{"text":5}}"#,
            "invalid parameters for 'shout'",
        ),
        (
            r#"{"type":"shout","data":"x"}"#,
            "'data' must be a JSON object",
        ),
        (
            r#"{"type":"init","data":{}}"#,
            "required: requestServerVersion",
        ),
    ];
    for (input, want) in cases {
        c.send_raw(input).await;
        let m = c.recv().await;
        assert_eq!(m["type"], "error", "{input}");
        let msg = m["data"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{input}: {msg}");
    }
    c.send_message(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert!(c.recv().await["data"]["message"]
        .as_str()
        .unwrap()
        .contains("binary"));
    c.send("ping", json!({}), None).await;
    assert_eq!(c.recv().await["data"], json!({"message": "ping"}));
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let kc = Keycloak::start().await;
    let mut cfg = support::config(&kc);
    cfg.websocket.max_message_bytes = 1024;
    let t = support::start(cfg, tabhub::commands::builtin()).await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    c.send_raw(&format!(
        r#"{{"type":"ping","data":{{"pad":"{}"}}}}"#,
        "x".repeat(4096)
    ))
    .await;
    let (code, _) = c.closed().await;
    assert_eq!(code, Some(1009));
}

#[tokio::test]
async fn ids_are_echoed_in_replies_and_errors() {
    let (kc, t, _log) = setup().await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    c.send("ping", json!({}), Some(json!("req-1"))).await;
    assert_eq!(c.recv().await["id"], "req-1");
    c.send("ping", json!({}), Some(json!(42))).await;
    assert_eq!(c.recv().await["id"], 42);
    c.send("nope", json!({}), Some(json!(43))).await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_i64()),
        (Some("error"), Some(43))
    );
    c.send_raw(r#"{"data":{},"id":"no-type"}"#).await;
    assert_eq!(c.recv().await["id"], "no-type");
}

#[tokio::test]
async fn init_replies_with_the_version() {
    let kc = Keycloak::start().await;
    let mut cfg = support::config(&kc);
    cfg.commands
        .insert("ui_version".into(), toml::Value::String("3.14.0".into()));
    let t = support::start(cfg, tabhub::commands::builtin()).await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    c.send(
        "init",
        json!({"requestServerVersion": true}),
        Some(json!(1)),
    )
    .await;
    let v = c.recv().await;
    assert_eq!(v["type"], "version");
    assert_eq!(v["id"], 1);
    assert_eq!(
        (v["data"]["start"].as_bool(), v["data"]["version"].as_str()),
        (Some(true), Some("3.14.0"))
    );
    c.send("init", json!({"requestServerVersion": false}), None)
        .await;
    let v = c.recv().await;
    assert_eq!(v["data"]["start"], false);
    assert!(
        v["data"].as_object().unwrap().contains_key("version"),
        "the field is always there"
    );
}

#[tokio::test]
async fn authenticate_accepts_the_same_user_only() {
    let (kc, t, _log) = setup().await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    c.send(
        "authenticate",
        json!({"token": kc.token("bob")}),
        Some(json!(1)),
    )
    .await;
    let e = c.recv().await;
    assert_eq!(e["type"], "error");
    assert!(e["data"]["message"]
        .as_str()
        .unwrap()
        .contains("another user"));
    c.send("authenticate", json!({"token": "garbage"}), Some(json!(2)))
        .await;
    assert_eq!(c.recv().await["type"], "error");
    let fresh = kc.mint(&TokenSpec::user("alice").exp_in(900));
    c.send("authenticate", json!({"token": fresh}), Some(json!(3)))
        .await;
    let ok = c.recv().await;
    assert_eq!(ok["type"], "authenticated");
    assert!(ok["data"]["expiresIn"].as_u64().unwrap() > 800);
    let session = t.app().hub.get(&sub_of("alice")).unwrap();
    assert!(session.valid_token().unwrap().exp > session.valid_token().unwrap().exp - 1);
}

#[tokio::test]
async fn expiry_without_renewal_closes_with_4002_and_stops_loops() {
    let kc = Keycloak::start().await;
    let log = Arc::new(LoopLog::default());
    let mut cfg = support::config(&kc);
    cfg.auth.expiry_warning_ms = 2_000;
    let t = support::start(cfg, registry(&log)).await;
    let url = support::ws_url(&t);
    let mut c = Client::connect(&url, &kc.mint(&TokenSpec::user("alice").exp_in(3))).await;
    c.send("watch", json!({}), None).await;
    let warn = c.recv_type("authExpiring").await;
    assert!(warn["data"]["expiresIn"].as_u64().unwrap() <= 2);
    let (code, msgs) = c.closed().await;
    assert_eq!(code, Some(4002));
    let err = msgs
        .iter()
        .find(|m| m["type"] == "error")
        .expect("an error before the close");
    assert_eq!(err["data"]["authExpired"], true);
    let after = log.iterations();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        log.iterations(),
        after,
        "no loop iteration with an expired token"
    );

    // With a fresh token handed over in time, the tab stays.
    let mut c = Client::connect(&url, &kc.mint(&TokenSpec::user("bob").exp_in(3))).await;
    c.send(
        "authenticate",
        json!({"token": kc.mint(&TokenSpec::user("bob").exp_in(600))}),
        None,
    )
    .await;
    c.recv_type("authenticated").await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    c.send("ping", json!({}), None).await;
    assert_eq!(c.recv_type("ack").await["type"], "ack");
}

#[tokio::test]
async fn healthz_and_readyz() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let base = format!("http://{}", t.local_addr());
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );

    // Not ready while the issuer cannot be reached.
    let mut cfg = support::config(&kc);
    cfg.auth.issuer = "http://127.0.0.1:1/realms/none".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t2 = tabhub::start(
        listener,
        cfg,
        tabhub::commands::builtin(),
        axum::Router::new(),
    )
    .await
    .unwrap();
    let r = reqwest::get(format!("http://{}/readyz", t2.local_addr()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}
