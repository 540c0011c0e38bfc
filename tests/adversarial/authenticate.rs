//! Every place a token enters goes through the same checks: `authenticate` on an open tab is no back door around
//! the handshake's introspection.

use serde_json::json;

use crate::support::keycloak::{TABHUB_CLIENT, TABHUB_SECRET};
use crate::support::{self, Client, Keycloak};

#[tokio::test]
async fn authenticate_refuses_a_token_the_handshake_refuses() {
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
    c.custody.introspection_cache_ms = 1;
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
    let mut tab = Client::connect(&url, &kc.token("alice")).await;
    // A fresher token whose login Keycloak has ended since: the handshake would refuse it (4002, revoked).
    let revoked = kc.token("alice");
    kc.realm().end_sessions_of("alice");
    tab.send("authenticate", json!({ "token": revoked }), Some(json!(1)))
        .await;
    let e = tab.recv_type("error").await;
    assert_eq!(e["id"], 1);
    assert!(
        e["data"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{e}"
    );
    assert!(
        !e.to_string().contains(&revoked),
        "the token is never echoed"
    );
}
