//! Topics whose project id would escape the upstream URL: refused at subscribe, nothing requested upstream.

use serde_json::json;

use std::sync::Arc;

use crate::support::{self, Client, Keycloak};
use tabhub_fixtures::gitlab::FixtureGitlab;

/// tabhub in front of a fixture GitLab, with `tune` applied to its configuration.
async fn start_with_gitlab(
    tune: impl FnOnce(&mut tabhub::Config),
) -> (Keycloak, Arc<FixtureGitlab>, tabhub::Running) {
    let kc = Keycloak::start().await;
    let (gitlab, base) = support::gitlab(100).await;
    let mut c = support::config_with_gitlab(&kc, &base);
    tune(&mut c);
    let t = support::start(c, tabhub::commands::builtin()).await;
    (kc, gitlab, t)
}

#[tokio::test]
async fn dot_segment_project_ids_are_refused() {
    let (kc, gitlab, t) = start_with_gitlab(|_| {}).await;
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

/// `setSubscriptions` adding 100 types of a project costs one upstream connection, not one per type (each restart
/// used to open a connection and abort the previous one).
#[tokio::test]
async fn one_command_adding_many_types_opens_one_connection() {
    let (kc, gitlab, t) = start_with_gitlab(|_| {}).await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    c.send("subscribe", json!({"topic": "/project/3/push"}), None)
        .await;
    c.recv_type("subscribed").await;
    support::eventually("the stream is open", || gitlab.open_streams("3") == 1).await;
    let before = gitlab.connections_total("3");
    let topics: Vec<String> = std::iter::once("/project/3/push".to_owned())
        .chain((0..99).map(|i| format!("/project/3/type{i}")))
        .collect();
    c.send("setSubscriptions", json!({ "topics": topics }), None)
        .await;
    let r = c.recv_type("subscriptions").await;
    assert_eq!(r["data"]["added"].as_array().map(Vec::len), Some(99), "{r}");
    // The restart waits for `gitlab.min_restart_interval_ms` after the first start, then opens once.
    support::eventually("the stream reopened", || {
        gitlab.connections_total("3") > before && gitlab.open_streams("3") == 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        gitlab.connections_total("3") - before,
        1,
        "one reconnection for the whole command"
    );
    // And it carries every type: an event of the last one added arrives.
    gitlab.emit("3", "type98", json!({}));
    let e = c.recv_type("event").await;
    assert_eq!(e["data"]["topic"], "/project/3/type98");
}

/// Two tabs churning `setSubscriptions` within the rate limit: the project's stream restarts at most once per
/// `gitlab.min_restart_interval_ms`, and events of the types held still arrive, none lost.
#[tokio::test]
async fn churning_commands_restart_a_stream_at_most_once_per_interval() {
    let (kc, gitlab, t) = start_with_gitlab(|c| c.gitlab.min_restart_interval_ms = 400).await;
    let url = support::ws_url(&t);
    let (mut a, mut b) = (
        Client::connect(&url, &kc.token("alice")).await,
        Client::connect(&url, &kc.token("alice")).await,
    );
    a.send("subscribe", json!({"topic": "/project/4/push"}), None)
        .await;
    a.recv_type("subscribed").await;
    support::eventually("the stream is open", || gitlab.open_streams("4") == 1).await;
    let before = gitlab.connections_total("4");
    let started = std::time::Instant::now();
    for round in 0..10 {
        for (k, tab) in [&mut a, &mut b].into_iter().enumerate() {
            let topics: Vec<String> = std::iter::once("/project/4/push".to_owned())
                .chain((0..20).map(|i| format!("/project/4/t{round}-{k}-{i}")))
                .collect();
            tab.send("setSubscriptions", json!({ "topics": topics }), None)
                .await;
            tab.recv_type("subscriptions").await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let restarts = gitlab.connections_total("4") - before;
    let bound = (elapsed.as_millis() / 400) as usize + 2;
    assert!(
        restarts <= bound,
        "{restarts} restarts in {elapsed:?} (at most {bound})"
    );
    // Nothing lost: a push event reaches the tab that holds push.
    support::eventually("the stream is open", || gitlab.open_streams("4") == 1).await;
    gitlab.emit("4", "push", json!({}));
    let e = a.recv_type("event").await;
    assert_eq!(e["data"]["topic"], "/project/4/push");
}
