//! Topics whose project id would escape the upstream URL: refused at subscribe, nothing requested upstream.

use serde_json::json;

use crate::support::{self, Client, Keycloak};

#[tokio::test]
async fn dot_segment_project_ids_are_refused() {
    let kc = Keycloak::start().await;
    let (gitlab, base) = support::gitlab(100).await;
    let t = support::start(
        support::config_with_gitlab(&kc, &base),
        tabhub::commands::builtin(),
    )
    .await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    for topic in [
        "/project/../push",
        "/project/%2e%2e/push",
        "/project/%2E%2e/push",
        "/project/group%2F..%2Fadmin/push",
        "/project/./push",
    ] {
        c.send("subscribe", json!({ "topic": topic }), Some(json!(topic)))
            .await;
        let e = c.recv_type("error").await;
        assert_eq!(e["id"], topic, "{e}");
    }
    c.send("ping", json!({}), None).await;
    c.recv_type("ack").await;
    for p in ["..", ".", "%2e%2e", "group/../admin"] {
        assert_eq!(gitlab.connections_total(p), 0, "{p}");
    }
}
