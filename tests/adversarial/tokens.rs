//! Forged tokens whose claims have the wrong shape: signed with the realm's own key (as a token minted by a
//! compromised or misconfigured client of the realm would be), so only the claim checks stand between them and a
//! session.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::client::Cred;
use crate::support::{self, Client, Keycloak, TokenSpec};

/// Connects with `token` in the `Authorization` header and expects the in-band refusal: one `error` flagged
/// `invalidToken`, then close code 4001. Returns the error's message.
async fn refused_4001(url: &str, token: &str) -> String {
    let mut c = Client::connect_with(url, Cred::Header(token), None)
        .await
        .expect("the upgrade succeeds; the refusal is in-band");
    let (code, msgs) = c.closed_within(Duration::from_secs(5)).await;
    assert_eq!(code, Some(4001), "refused as invalid: {msgs:?}");
    assert_eq!(msgs.len(), 1, "one error before the close: {msgs:?}");
    assert_eq!(msgs[0]["type"], "error", "{msgs:?}");
    assert_eq!(msgs[0]["data"]["invalidToken"], true, "{msgs:?}");
    let text = msgs[0].to_string();
    assert!(!text.contains(token), "the token is never echoed");
    msgs[0]["data"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `iss` must be one JSON string equal to `auth.issuer`: jsonwebtoken accepts an array that contains the issuer,
/// so `[evil, issuer]` (and `[issuer]`) once opened a session.
#[tokio::test]
async fn an_issuer_array_is_refused_even_when_it_holds_the_issuer() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let url = support::ws_url(&t);
    let issuer = kc.issuer();
    for iss in [
        json!([issuer]),
        json!(["https://evil.example/realms/test", issuer]),
        json!([issuer, issuer]),
    ] {
        let token = kc.mint(&TokenSpec::user("mallory").claim("iss", iss.clone()));
        let message = refused_4001(&url, &token).await;
        assert!(message.contains("issuer"), "iss {iss}: {message}");
    }
    for iss in [json!({"iss": issuer}), json!(null), json!(7)] {
        let token = kc.mint(&TokenSpec::user("mallory").claim("iss", iss));
        refused_4001(&url, &token).await;
    }
    // The same token with `iss` as the one string is accepted: only the shape was wrong.
    Client::connect(&url, &kc.mint(&TokenSpec::user("mallory"))).await;
}

/// An `exp` absurdly far ahead (`u64::MAX` once overflowed the cache's `exp + leeway`: accepted at the first
/// handshake, then panicking or "expired") is refused at every handshake, the first included.
#[tokio::test]
async fn an_absurd_exp_is_refused_every_time() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let url = support::ws_url(&t);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exps: [Value; 5] = [
        json!(u64::MAX),
        json!(1u64 << 63),
        json!(1u64 << 53),
        // Eleven years ahead: no realm issues access tokens for that long.
        json!(now + 11 * 366 * 24 * 3600),
        // A float beyond any integer: refused as malformed, never rounded into range.
        json!(1e300),
    ];
    for exp in exps {
        let token = kc.mint(&TokenSpec::user("mallory").claim("exp", exp.clone()));
        for attempt in 0..2 {
            let message = refused_4001(&url, &token).await;
            assert!(!message.is_empty(), "exp {exp}, attempt {attempt}");
        }
    }
    // An ordinary lifetime still works, twice (the second from the cache).
    let ok = kc.mint(&TokenSpec::user("mallory").exp_in(3_600));
    Client::connect(&url, &ok).await;
    Client::connect(&url, &ok).await;
}
