//! GitLab SSE subscriptions over real sockets: a fixture GitLab counting connections, real tabhub, real tabs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::keycloak::sub_of;
use support::{Client, Keycloak};
use tabhub_fixtures::gitlab::FixtureGitlab;

struct Setup {
    kc: Keycloak,
    gitlab: Arc<FixtureGitlab>,
    t: tabhub::Running,
}

async fn setup_with(f: impl FnOnce(&mut tabhub::Config)) -> Setup {
    let kc = Keycloak::start().await;
    let (gitlab, base) = support::gitlab(100).await;
    let mut c = support::config_with_gitlab(&kc, &base);
    f(&mut c);
    let t = support::start(c, tabhub::commands::builtin()).await;
    Setup { kc, gitlab, t }
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

impl Setup {
    async fn tab(&self, user: &str) -> Client {
        Client::connect(&support::ws_url(&self.t), &self.kc.token(user)).await
    }
    async fn open_streams_become(&self, project: &str, n: usize) {
        let g = self.gitlab.clone();
        let p = project.to_owned();
        support::eventually(&format!("{n} open stream(s) on {project}"), move || {
            g.open_streams(&p) == n
        })
        .await;
    }
}

async fn subscribe(c: &mut Client, topic: &str, last: Option<&str>) -> Value {
    let mut data = json!({ "topic": topic });
    if let Some(l) = last {
        data["lastEventId"] = json!(l);
    }
    c.send("subscribe", data, Some(json!(topic))).await;
    let r = c.recv().await;
    assert_eq!(r["type"], "subscribed", "{r}");
    assert_eq!(r["id"], topic);
    r
}

/// The ids of the next `n` events (skipping other messages), checking their topic.
async fn event_ids(c: &mut Client, topic: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let m = c.recv().await;
        if m["type"] == "event" {
            assert_eq!(m["data"]["topic"], topic, "{m}");
            assert_eq!(m["scope"], "topic");
            ids.push(m["data"]["id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

#[tokio::test]
async fn two_tabs_one_topic_one_upstream_each_event_once_per_tab() {
    let s = setup().await;
    let (mut a1, mut a2) = (s.tab("alice").await, s.tab("alice").await);
    subscribe(&mut a1, "/project/42/pipeline", None).await;
    subscribe(&mut a2, "/project/42/pipeline", None).await;
    s.open_streams_become("42", 1).await;
    for i in 0..3 {
        s.gitlab.emit("42", "pipeline", json!({"n": i}));
    }
    for c in [&mut a1, &mut a2] {
        let m = c.recv_type("event").await;
        assert_eq!(m["data"]["eventType"], "pipeline");
        assert_eq!(
            m["data"]["payload"],
            json!({"n": 0}),
            "payload parsed as JSON"
        );
        assert_eq!(event_ids(c, "/project/42/pipeline", 2).await, ids(2..=3));
        c.expect_silence(Duration::from_millis(200)).await;
    }
    assert_eq!(
        s.gitlab.connections_total("42"),
        1,
        "one upstream connection for the user"
    );
    let req = &s.gitlab.requests("42")[0];
    assert_eq!(req.sub.as_deref(), Some(sub_of("alice").as_str()));
    assert_eq!(req.event_types, vec!["pipeline"]);
}

#[tokio::test]
async fn the_stream_lives_while_a_tab_holds_a_topic() {
    let s = setup().await;
    let (mut a1, mut a2) = (s.tab("alice").await, s.tab("alice").await);
    subscribe(&mut a1, "/project/7/push", None).await;
    subscribe(&mut a2, "/project/7/push", None).await;
    s.open_streams_become("7", 1).await;
    a1.send("unsubscribe", json!({"topic": "/project/7/push"}), None)
        .await;
    assert_eq!(
        a1.recv().await["data"],
        json!({"topic": "/project/7/push", "removed": true})
    );
    s.gitlab.emit("7", "push", json!({}));
    a2.recv_type("event").await;
    a1.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(s.gitlab.open_streams("7"), 1);
    a2.send("unsubscribe", json!({"topic": "/project/7/push"}), None)
        .await;
    a2.recv_type("unsubscribed").await;
    s.open_streams_become("7", 0).await;
}

#[tokio::test]
async fn two_users_get_separate_streams_with_their_own_tokens() {
    let s = setup().await;
    let (mut a, mut b) = (s.tab("alice").await, s.tab("bob").await);
    subscribe(&mut a, "/project/5/issue", None).await;
    subscribe(&mut b, "/project/5/issue", None).await;
    s.open_streams_become("5", 2).await;
    let reqs = s.gitlab.requests("5");
    let mut subs: Vec<_> = reqs.iter().map(|r| r.sub.clone().unwrap()).collect();
    subs.sort();
    let mut want = vec![sub_of("alice"), sub_of("bob")];
    want.sort();
    assert_eq!(subs, want);
    assert_ne!(reqs[0].token, reqs[1].token);
    s.gitlab.emit("5", "issue", json!({"title": "x"}));
    assert_eq!(event_ids(&mut a, "/project/5/issue", 1).await, ids(1..=1));
    assert_eq!(event_ids(&mut b, "/project/5/issue", 1).await, ids(1..=1));
}

#[tokio::test]
async fn topics_of_one_project_share_a_stream_and_tabs_see_only_theirs() {
    let s = setup().await;
    let (mut a1, mut a2) = (s.tab("alice").await, s.tab("alice").await);
    subscribe(&mut a1, "/project/9/push", None).await;
    s.open_streams_become("9", 1).await;
    s.gitlab.emit("9", "push", json!({}));
    assert_eq!(event_ids(&mut a1, "/project/9/push", 1).await, ids(1..=1));
    // A new type reopens the stream with the union, resuming after event 1: nothing lost or repeated.
    subscribe(&mut a2, "/project/9/pipeline", None).await;
    support::eventually("reopened", || s.gitlab.connections_total("9") == 2).await;
    s.open_streams_become("9", 1).await;
    let last = s.gitlab.requests("9").last().cloned().unwrap();
    assert_eq!(last.last_event_id.as_deref(), Some("1"));
    assert_eq!(last.event_types, vec!["pipeline", "push"]);
    s.gitlab.emit("9", "pipeline", json!({}));
    s.gitlab.emit("9", "push", json!({}));
    assert_eq!(
        event_ids(&mut a2, "/project/9/pipeline", 1).await,
        ids(2..=2)
    );
    assert_eq!(event_ids(&mut a1, "/project/9/push", 1).await, ids(3..=3));
    a1.expect_silence(Duration::from_millis(200)).await;
    a2.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_dropped_stream_resumes_without_loss_or_repeat() {
    let s = setup().await;
    let mut a = s.tab("alice").await;
    subscribe(&mut a, "/project/3/push", None).await;
    s.open_streams_become("3", 1).await;
    for _ in 0..5 {
        s.gitlab.emit("3", "push", json!({}));
    }
    assert_eq!(event_ids(&mut a, "/project/3/push", 5).await, ids(1..=5));
    s.gitlab.drop_streams("3");
    for _ in 0..5 {
        s.gitlab.emit("3", "push", json!({}));
    }
    let mut got = event_ids(&mut a, "/project/3/push", 5).await;
    got.dedup();
    assert_eq!(got, ids(6..=10));
    let reconnect = s.gitlab.requests("3").last().cloned().unwrap();
    assert_eq!(
        reconnect.last_event_id.as_deref(),
        Some("5"),
        "Last-Event-ID sent"
    );
    s.gitlab.emit("3", "push", json!({}));
    assert_eq!(event_ids(&mut a, "/project/3/push", 1).await, ids(11..=11));
    a.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_stall_is_detected_and_healed() {
    let s = setup().await;
    let mut a = s.tab("alice").await;
    subscribe(&mut a, "/project/4/push", None).await;
    s.open_streams_become("4", 1).await;
    // Heartbeat comments every 100 ms keep an idle stream alive past the 1 s stall timeout.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(s.gitlab.connections_total("4"), 1, "comments count as life");
    s.gitlab.emit("4", "push", json!({}));
    assert_eq!(event_ids(&mut a, "/project/4/push", 1).await, ids(1..=1));
    // The stalled connection swallows event 2; the reconnection resumes after 1 and delivers it.
    s.gitlab.stall_streams("4");
    s.gitlab.emit("4", "push", json!({}));
    let d = a.recv().await;
    assert_eq!(
        (d["type"].as_str(), d["data"]["status"].as_str()),
        (Some("subscriptionStatus"), Some("degraded"))
    );
    assert!(
        d["data"]["message"].as_str().unwrap().contains("stalled"),
        "{d}"
    );
    let r = a.recv().await;
    assert_eq!(r["data"]["status"], "recovered", "{r}");
    assert_eq!(event_ids(&mut a, "/project/4/push", 1).await, ids(2..=2));
    assert!(s.gitlab.connections_total("4") >= 2);
}

#[tokio::test]
async fn upstream_errors_reach_the_tabs() {
    let s = setup().await;
    let mut a = s.tab("alice").await;

    // 403 and 404: told, and the subscription is dropped.
    for (project, status) in [("403", 403), ("404", 404)] {
        s.gitlab.fail_next(project, status, 1);
        let topic = format!("/project/{project}/push");
        subscribe(&mut a, &topic, None).await;
        let e = a.recv_type("subscriptionError").await;
        assert_eq!(e["data"]["topic"], topic);
        assert_eq!(e["data"]["status"], status);
        a.send("setSubscriptions", json!({"topics": []}), None)
            .await;
        let r = a.recv_type("subscriptions").await;
        assert_eq!(r["data"]["removed"], json!([]), "already dropped");
    }

    // 5xx: degraded once, recovered once, then events flow.
    s.gitlab.fail_next("500", 500, 3);
    subscribe(&mut a, "/project/500/push", None).await;
    let d = a.recv_type("subscriptionStatus").await;
    assert_eq!(d["data"]["status"], "degraded");
    let r = a.recv().await;
    assert_eq!(
        (r["type"].as_str(), r["data"]["status"].as_str()),
        (Some("subscriptionStatus"), Some("recovered"))
    );
    s.gitlab.emit("500", "push", json!({}));
    assert_eq!(event_ids(&mut a, "/project/500/push", 1).await, ids(1..=1));

    // 401: one retry only if a newer token exists; here none, so the tab is told.
    s.gitlab.revoke_token_of(&sub_of("alice"));
    subscribe(&mut a, "/project/401/push", None).await;
    let e = a.recv_type("subscriptionError").await;
    assert_eq!(
        (e["data"]["status"].as_u64(), e["data"]["topic"].as_str()),
        (Some(401), Some("/project/401/push"))
    );
    // A fresh token (authenticate) brings the stream back.
    s.gitlab.unrevoke(&sub_of("alice"));
    let fresh = s.kc.mint(&support::TokenSpec::user("alice").exp_in(600));
    a.send("authenticate", json!({"token": fresh}), None).await;
    a.recv_type("authenticated").await;
    s.open_streams_become("401", 1).await;
    s.gitlab.emit("401", "push", json!({}));
    assert_eq!(event_ids(&mut a, "/project/401/push", 1).await, ids(1..=1));
}

#[tokio::test]
async fn set_subscriptions_replaces_the_set() {
    let s = setup().await;
    let mut a = s.tab("alice").await;
    subscribe(&mut a, "/project/1/push", None).await;
    subscribe(&mut a, "/project/2/push", None).await;
    a.send(
        "setSubscriptions",
        json!({"topics": ["/project/2/push", "/project/3/issue"]}),
        Some(json!(9)),
    )
    .await;
    let r = a.recv_type("subscriptions").await;
    assert_eq!(r["id"], 9);
    assert_eq!(r["data"]["added"], json!(["/project/3/issue"]));
    assert_eq!(r["data"]["removed"], json!(["/project/1/push"]));
    assert_eq!(
        r["data"]["topics"],
        json!(["/project/2/push", "/project/3/issue"])
    );
    s.open_streams_become("1", 0).await;
    s.open_streams_become("3", 1).await;
    // A malformed topic refuses the whole command and changes nothing.
    a.send(
        "setSubscriptions",
        json!({"topics": ["/project/4/push", "nope"]}),
        None,
    )
    .await;
    let e = a.recv().await;
    assert_eq!(e["type"], "error");
    assert!(e["data"]["message"]
        .as_str()
        .unwrap()
        .contains("/project/<id>/<eventType>"));
    assert_eq!(s.gitlab.connections_total("4"), 0);
}

#[tokio::test]
async fn last_event_id_resumes_from_upstream_and_from_the_buffer() {
    let s = setup().await;
    for _ in 0..6 {
        s.gitlab.emit("8", "push", json!({}));
    }
    // No stream yet: the id goes upstream.
    let mut a1 = s.tab("alice").await;
    subscribe(&mut a1, "/project/8/push", Some("3")).await;
    assert_eq!(event_ids(&mut a1, "/project/8/push", 3).await, ids(4..=6));
    assert_eq!(
        s.gitlab.requests("8")[0].last_event_id.as_deref(),
        Some("3")
    );
    // The stream is open: a second tab resuming from 4 is served from the buffer, without reconnecting.
    let mut a2 = s.tab("alice").await;
    subscribe(&mut a2, "/project/8/push", Some("4")).await;
    assert_eq!(event_ids(&mut a2, "/project/8/push", 2).await, ids(5..=6));
    assert_eq!(s.gitlab.connections_total("8"), 1);
    s.gitlab.emit("8", "push", json!({}));
    assert_eq!(event_ids(&mut a1, "/project/8/push", 1).await, ids(7..=7));
    assert_eq!(event_ids(&mut a2, "/project/8/push", 1).await, ids(7..=7));
}

#[tokio::test]
async fn an_id_older_than_the_buffer_catches_up_without_repeats_for_others() {
    let s = setup_with(|c| c.gitlab.replay_buffer_events = 2).await;
    let mut a1 = s.tab("alice").await;
    subscribe(&mut a1, "/project/6/push", None).await;
    s.open_streams_become("6", 1).await;
    for _ in 0..6 {
        s.gitlab.emit("6", "push", json!({}));
    }
    assert_eq!(event_ids(&mut a1, "/project/6/push", 6).await, ids(1..=6));
    let mut a2 = s.tab("alice").await;
    subscribe(&mut a2, "/project/6/push", Some("2")).await;
    assert_eq!(event_ids(&mut a2, "/project/6/push", 4).await, ids(3..=6));
    a1.expect_silence(Duration::from_millis(300)).await;
    s.gitlab.emit("6", "push", json!({}));
    assert_eq!(event_ids(&mut a1, "/project/6/push", 1).await, ids(7..=7));
    assert_eq!(event_ids(&mut a2, "/project/6/push", 1).await, ids(7..=7));
}

#[tokio::test]
async fn a_closed_tab_releases_everything_it_held() {
    let s = setup().await;
    let mut a1 = s.tab("alice").await;
    let mut a2 = s.tab("alice").await;
    subscribe(&mut a1, "/project/11/push", None).await;
    subscribe(&mut a1, "/project/12/push", None).await;
    subscribe(&mut a2, "/project/12/push", None).await;
    s.open_streams_become("11", 1).await;
    s.open_streams_become("12", 1).await;
    a1.close().await;
    s.open_streams_become("11", 0).await;
    assert_eq!(
        s.gitlab.open_streams("12"),
        1,
        "still held by the other tab"
    );
    a2.close().await;
    s.open_streams_become("12", 0).await;
}

#[tokio::test]
async fn a_reload_takes_back_the_stream_without_reconnecting_and_misses_nothing() {
    let s = setup_with(|c| c.session.linger_ms = 3_000).await;
    let mut a = s.tab("alice").await;
    subscribe(&mut a, "/project/21/push", None).await;
    s.open_streams_become("21", 1).await;
    s.gitlab.emit("21", "push", json!({}));
    let seen = event_ids(&mut a, "/project/21/push", 1).await;
    a.close().await;
    // Emitted while no tab is there: the kept stream buffers them.
    s.gitlab.emit("21", "push", json!({}));
    s.gitlab.emit("21", "push", json!({}));
    let mut b = s.tab("alice").await;
    subscribe(&mut b, "/project/21/push", Some(&seen[0])).await;
    let next = event_ids(&mut b, "/project/21/push", 2).await;
    let first: u64 = seen[0].parse().unwrap();
    assert_eq!(
        next,
        ids(first + 1..=first + 2),
        "missed nothing, nothing twice"
    );
    assert_eq!(
        s.gitlab.connections_total("21"),
        1,
        "the reload reused the upstream connection"
    );
    // Nobody comes back: the stream goes with the session's linger.
    b.close().await;
    s.open_streams_become("21", 0).await;
}

#[tokio::test]
async fn bad_topics_and_limits_are_clear_errors() {
    let s = setup_with(|c| {
        c.gitlab.max_topics_per_tab = 2;
        c.gitlab.max_projects_per_user = 2;
    })
    .await;
    let mut a = s.tab("alice").await;
    a.send("subscribe", json!({"topic": "project/1"}), Some(json!(1)))
        .await;
    let e = a.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_i64()),
        (Some("error"), Some(1))
    );
    assert!(e["data"]["message"]
        .as_str()
        .unwrap()
        .contains("expected /project/<id>/<eventType>"));
    a.send("subscribe", json!({"topic": "/projects/1"}), None)
        .await;
    let e = a.recv().await;
    let msg = e["data"]["message"].as_str().unwrap();
    assert!(
        msg.contains("not a project topic nor in a publish namespace"),
        "{msg}"
    );
    subscribe(&mut a, "/project/1/a", None).await;
    subscribe(&mut a, "/project/2/a", None).await;
    a.send("subscribe", json!({"topic": "/project/1/b"}), None)
        .await;
    let e = a.recv_type("error").await;
    let msg = e["data"]["message"].as_str().unwrap();
    assert!(
        msg.contains("/project/1/b") && msg.contains("at most 2 topics per tab"),
        "{msg}"
    );
    let mut a2 = s.tab("alice").await;
    a2.send("subscribe", json!({"topic": "/project/3/a"}), None)
        .await;
    let msg = a2.recv_type("error").await["data"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("/project/3/a") && msg.contains("at most 2 projects"),
        "{msg}"
    );
}

/// All of a project's event ids a tab receives within `d`, sorted, with no repeat allowed.
async fn all_ids(c: &mut Client, d: Duration) -> Vec<u64> {
    let mut ids = Vec::new();
    while let Some(m) = c.next_within(d).await {
        if m["type"] == "event" {
            ids.push(m["data"]["id"].as_str().unwrap().parse::<u64>().unwrap());
        }
    }
    ids.sort_unstable();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "an event came twice: {ids:?}");
    ids
}

/// The browser client's "replay history": every type of a project subscribed at once with `lastEventId: "0"`,
/// while the history holds events of every type. The tab gets every id, once.
#[tokio::test]
async fn every_type_from_the_start_at_once_gets_every_event_once() {
    let s = setup().await;
    let types = ["push", "pipeline", "merge_request", "issue"];
    for i in 0..12 {
        s.gitlab.emit("9", types[i % 4], json!({"n": i}));
    }
    let mut a = s.tab("alice").await;
    // As the page does: the four subscriptions sent at once, events arriving between their replies.
    for t in types {
        let data = json!({"topic": format!("/project/9/{t}"), "lastEventId": "0"});
        a.send("subscribe", data, None).await;
    }
    for i in 12..16 {
        s.gitlab.emit("9", types[i % 4], json!({"n": i}));
    }
    let ids = all_ids(&mut a, Duration::from_millis(1_500)).await;
    assert_eq!(ids, (1..=16).collect::<Vec<u64>>());
}

/// A page reconnecting to a new instance resubscribes every type with its own last seen id, while newer events of
/// every type wait upstream: it gets each newer event once. (The stream resumes from the oldest id asked, so a type
/// seen further may get again an event it had; the browser client drops such repeats by id.)
#[tokio::test]
async fn resubscribing_every_type_from_its_own_last_id_misses_nothing() {
    let s = setup().await;
    let types = ["push", "pipeline", "merge_request", "issue"];
    // Ids 1..=12: push 1, 5, 9; pipeline 2, 6, 10; merge_request 3, 7, 11; issue 4, 8, 12.
    for i in 0..12 {
        s.gitlab.emit("6", types[i % 4], json!({"n": i}));
    }
    // The page had seen 1..=9: push up to 9, pipeline up to 6, merge_request up to 7, issue up to 8.
    let last = ["9", "6", "7", "8"];
    let mut a = s.tab("alice").await;
    for (t, l) in types.iter().zip(last) {
        let data = json!({"topic": format!("/project/6/{t}"), "lastEventId": l});
        a.send("subscribe", data, None).await;
    }
    for i in 12..16 {
        s.gitlab.emit("6", types[i % 4], json!({"n": i}));
    }
    let ids = all_ids(&mut a, Duration::from_millis(1_500)).await;
    let newer: Vec<u64> = ids.iter().copied().filter(|i| *i >= 10).collect();
    assert_eq!(newer, (10..=16).collect::<Vec<u64>>(), "{ids:?}");
    assert!(
        ids.iter().all(|i| *i > 6),
        "only events after the oldest id asked: {ids:?}"
    );
}
