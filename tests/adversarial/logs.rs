//! Secrets in logs: the real `tabhub` binary at the most verbose level never writes a token, neither the one of
//! the handshake nor one sent in `authenticate` (tungstenite logs every frame it reads at `trace`).

use std::time::Duration;

use serde_json::json;

use crate::support::client::Cred;
use crate::support::process::Tabhub;
use crate::support::{Client, Keycloak, TokenSpec};

/// The token must not show whole, nor its signature alone (the part that makes it usable), in any log.
fn assert_not_logged(logs: &str, what: &str, token: &str) {
    assert!(!logs.contains(token), "{what} appears in the logs");
    let signature = token.rsplit('.').next().unwrap_or(token);
    assert!(
        !logs.contains(signature),
        "the signature of {what} appears in the logs"
    );
}

#[tokio::test]
async fn no_token_in_the_logs_at_trace() {
    let kc = Keycloak::start().await;
    for format in ["text", "json"] {
        let mut t = Tabhub::spawn(
            "tabhub-trace",
            &format!(
                "[log]\nlevel = \"trace\"\nformat = \"{format}\"\n\
                 [auth]\nissuer = \"{}\"\nclient_ids = [\"renku-ui\"]\n\
                 [origins]\nallow_missing = true\n",
                kc.issuer()
            ),
        );
        t.ready().await;
        let url = format!("ws://{}/ws", t.addr);
        let handshake = kc.token("alice");
        let fresh = kc.mint(&TokenSpec::user("alice").exp_in(900));
        let subprotocol = kc.mint(&TokenSpec::user("alice").exp_in(600));

        let mut a = Client::connect(&url, &handshake).await;
        a.send(
            "authenticate",
            json!({ "token": fresh }),
            Some(json!("auth")),
        )
        .await;
        assert_eq!(a.recv_type("authenticated").await["id"], "auth");
        a.send("ping", json!({}), Some(json!(2))).await;
        a.recv_type("ack").await;
        let mut b = Client::connect_with(&url, Cred::Subprotocol(&subprotocol), None)
            .await
            .unwrap();
        assert_eq!(b.recv().await["type"], "init");
        // A refused token is written nowhere either.
        let refused = kc.mint(&TokenSpec::user("alice").key("rogue.pem", "fixture-rs256-a"));
        let mut c = Client::connect_with(&url, Cred::Header(&refused), None)
            .await
            .unwrap();
        let (code, _) = c.closed().await;
        assert_eq!(code, Some(4001));
        a.close().await;
        b.close().await;
        // Let the server log what it read.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let logs = t.proc.logs();
        assert!(
            logs.contains("listening"),
            "the logs were read ({format}): {logs}"
        );
        for (what, token) in [
            ("the handshake's bearer token", &handshake),
            ("the token of authenticate", &fresh),
            ("the subprotocol's token", &subprotocol),
            ("a refused token", &refused),
        ] {
            assert_not_logged(&logs, what, token);
        }
    }
}
