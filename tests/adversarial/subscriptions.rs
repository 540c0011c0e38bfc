//! Hostile subscriptions (issue 14, items 4 and 11): `setSubscriptions` churn, resubscription storms with an old
//! `lastEventId`, and project ids that try to leave their URL path segment. Real tabhub, a real fixture GitLab
//! counting every request; each test runs in a few seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{self, Client, Keycloak};
use tabhub_fixtures::gitlab::FixtureGitlab;

struct Setup {
    kc: Keycloak,
    gitlab: Arc<FixtureGitlab>,
    t: tabhub::Running,
}

/// The restart pacing these tests run with: type changes coalesced over `WINDOW`, reconnects of one project's
/// stream at least `INTERVAL` apart.
const WINDOW: Duration = Duration::from_millis(150);
const INTERVAL: Duration = Duration::from_millis(400);

async fn setup_with(f: impl FnOnce(&mut tabhub::Config)) -> Setup {
    let kc = Keycloak::start().await;
    let (gitlab, base) = support::gitlab(100).await;
    let mut c = support::config_with_gitlab(&kc, &base);
    c.gitlab.restart_coalesce_ms = WINDOW.as_millis() as u64;
    c.gitlab.min_reconnect_interval_ms = INTERVAL.as_millis() as u64;
    f(&mut c);
    let t = support::start(c, tabhub::commands::builtin()).await;
    Setup { kc, gitlab, t }
}

impl Setup {
    async fn tab(&self, user: &str) -> Client {
        Client::connect(&support::ws_url(&self.t), &self.kc.token(user)).await
    }
}

/// Waits for the reply of type `kind` whose `id` is `id`, skipping events and status messages.
async fn reply(c: &mut Client, kind: &str, id: &Value) -> Value {
    loop {
        let m = c.recv().await;
        if m["type"] == kind && m["id"] == *id {
            return m;
        }
        assert_ne!(m["type"], "error", "{m}");
    }
}

/// The ids of the next `n` events of `topic`, skipping other messages.
async fn event_ids(c: &mut Client, topic: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let m = c.recv().await;
        if m["type"] == "event" {
            assert_eq!(m["data"]["topic"], topic, "{m}");
            ids.push(m["data"]["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    ids
}

/// Replaces `c`'s topics and waits for the reply.
async fn set_subs(c: &mut Client, topics: &[&str], id: &str) {
    let id = json!(id);
    c.send(
        "setSubscriptions",
        json!({ "topics": topics }),
        Some(id.clone()),
    )
    .await;
    reply(c, "subscriptions", &id).await;
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

/// `round`'s 100 distinct event types of project 77 for tab `tab`: every command changes every type.
fn churn_topics(tab: usize, round: usize) -> Vec<String> {
    (0..100)
        .map(|k| format!("/project/77/r{round}t{tab}k{k}"))
        .collect()
}

/// Item 4: two tabs replacing ~100 event types of one project every 150 ms (within the rate limit) for 2 s. Before:
/// one upstream restart per new type (hundreds of requests), a filter that only grew, and another user's `ping`
/// slowed to hundreds of ms. Now: at most one connection per `INTERVAL` (plus the first and one in flight), and the
/// ping answers quickly.
#[tokio::test]
async fn set_subscriptions_churn_costs_a_bounded_number_of_upstream_connections() {
    let s = setup_with(|_| {}).await;
    let tabs = [s.tab("alice").await, s.tab("alice").await];
    let mut bob = s.tab("bob").await;
    let duration = Duration::from_secs(2);
    let started = Instant::now();

    let churners = tabs.into_iter().enumerate().map(|(i, mut c)| {
        tokio::spawn(async move {
            let mut round = 0;
            while started.elapsed() < duration {
                let id = json!(format!("set-{i}-{round}"));
                c.send(
                    "setSubscriptions",
                    json!({ "topics": churn_topics(i, round) }),
                    Some(id.clone()),
                )
                .await;
                let r = reply(&mut c, "subscriptions", &id).await;
                assert_eq!(r["data"]["failed"], json!([]), "{r}");
                round += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            (c, round)
        })
    });
    let churners: Vec<_> = churners.collect();

    // Another user pings meanwhile.
    let mut worst = Duration::ZERO;
    let mut n = 0;
    while started.elapsed() < duration {
        let sent = Instant::now();
        bob.send("ping", json!({}), Some(json!(n))).await;
        reply(&mut bob, "ack", &json!(n)).await;
        worst = worst.max(sent.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = Vec::new();
    for c in churners {
        last.push(c.await.expect("churning tab"));
    }
    let elapsed = started.elapsed();

    // Wait out one pending restart, then count: the first connection, one per interval, one pending at the end.
    tokio::time::sleep(WINDOW + INTERVAL + Duration::from_millis(200)).await;
    let requests = s.gitlab.requests("77");
    let bound = (elapsed.as_millis() / INTERVAL.as_millis()) as usize + 2;
    assert!(
        requests.len() <= bound,
        "{} upstream requests for project 77 in {elapsed:?} (bound {bound})",
        requests.len()
    );
    assert!(
        worst < Duration::from_millis(500),
        "another user's ping took {worst:?}"
    );
    // The last connection asks for exactly what the tabs hold now.
    let mut held: Vec<String> = last
        .iter()
        .enumerate()
        .flat_map(|(i, (_, round))| churn_topics(i, round - 1))
        .map(|t| t.rsplit('/').next().unwrap_or_default().to_owned())
        .collect();
    held.sort();
    let newest = requests.last().expect("a request");
    assert_eq!(newest.event_types, held, "the exact union, sorted");

    // The subscriptions work: an event of a held type arrives, within the window and the interval.
    let (mut c0, round0) = last.swap_remove(0);
    let topic = churn_topics(0, round0 - 1)[7].clone();
    let ty = topic.rsplit('/').next().unwrap_or_default().to_owned();
    s.gitlab.emit("77", &ty, json!({}));
    let got = tokio::time::timeout(WINDOW + INTERVAL, event_ids(&mut c0, &topic, 1))
        .await
        .expect("the event within the window and the interval");
    assert_eq!(got.len(), 1);

    // Everything goes with the tabs.
    c0.close().await;
    for (c, _) in last {
        c.close().await;
    }
    let g = s.gitlab.clone();
    support::eventually("the stream closed", move || g.open_streams("77") == 0).await;
}

/// Item 4: the filter is the exact union of what the tabs hold. Before, it only grew: a type let go stayed in every
/// later request.
#[tokio::test]
async fn the_filter_shrinks_when_tabs_let_types_go() {
    let s = setup_with(|_| {}).await;
    let (mut a1, mut a2) = (s.tab("alice").await, s.tab("alice").await);
    let g = s.gitlab.clone();
    let last_types = move || {
        g.requests("78")
            .last()
            .map(|r| r.event_types.clone())
            .unwrap_or_default()
    };

    set_subs(
        &mut a1,
        &["/project/78/a", "/project/78/b", "/project/78/c"],
        "1",
    )
    .await;
    set_subs(&mut a2, &["/project/78/d"], "2").await;
    let lt = last_types.clone();
    support::eventually("a request for a, b, c and d", move || {
        lt() == ["a", "b", "c", "d"]
    })
    .await;

    // The tabs let b, c and d go: filtered locally, no reconnection for that alone...
    set_subs(&mut a1, &["/project/78/a"], "3").await;
    set_subs(&mut a2, &[], "4").await;
    // ... but the next request (here after a dropped stream) asks only for a.
    let before = s.gitlab.requests("78").len();
    tokio::time::sleep(INTERVAL).await;
    s.gitlab.drop_streams("78");
    let g = s.gitlab.clone();
    support::eventually("a reconnection", move || g.requests("78").len() > before).await;
    assert_eq!(last_types(), ["a"]);

    // A new type: the union of what is held now, not of everything ever held.
    set_subs(&mut a2, &["/project/78/e"], "5").await;
    let lt = last_types.clone();
    support::eventually("a request for a and e", move || lt() == ["a", "e"]).await;
}

/// Item 4: four tabs resubscribing with a `lastEventId` older than the replay buffer. Before: one upstream
/// request per tab (and per resubscription: 18 per second for one project). Now: one catch-up request, from the
/// oldest id, and each tab gets exactly what it missed.
#[tokio::test]
async fn resubscribing_with_an_old_id_from_four_tabs_is_one_catch_up_request() {
    let s = setup_with(|c| c.gitlab.replay_buffer_events = 2).await;
    let topic = "/project/79/push";
    let mut a0 = s.tab("alice").await;
    a0.send("subscribe", json!({ "topic": topic }), Some(json!("s")))
        .await;
    reply(&mut a0, "subscribed", &json!("s")).await;
    let g = s.gitlab.clone();
    support::eventually("the stream", move || g.open_streams("79") == 1).await;
    for _ in 0..10 {
        s.gitlab.emit("79", "push", json!({}));
    }
    assert_eq!(event_ids(&mut a0, topic, 10).await, ids(1..=10));
    let mut tabs = Vec::new();
    for _ in 0..4 {
        tabs.push(s.tab("alice").await);
    }
    tokio::time::sleep(INTERVAL).await;

    // Event 2 left the 2-event buffer long ago. The four resubscriptions arrive within the window.
    for (i, c) in tabs.iter_mut().enumerate() {
        let id = json!(format!("r{i}"));
        c.send(
            "subscribe",
            json!({ "topic": topic, "lastEventId": "2" }),
            Some(id.clone()),
        )
        .await;
        reply(c, "subscribed", &id).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for c in &mut tabs {
        assert_eq!(event_ids(c, topic, 8).await, ids(3..=10), "what it missed");
    }
    let requests = s.gitlab.requests("79");
    let resumes: Vec<_> = requests.iter().map(|r| r.last_event_id.clone()).collect();
    assert_eq!(
        resumes.len(),
        2,
        "the first connection and one catch-up request (Last-Event-ID of each: {resumes:?})"
    );
    assert_eq!(requests[1].last_event_id.as_deref(), Some("2"));
    a0.expect_silence(Duration::from_millis(200)).await;
    for c in &mut tabs {
        c.expect_silence(Duration::from_millis(50)).await;
    }
    s.gitlab.emit("79", "push", json!({}));
    for c in std::iter::once(&mut a0).chain(tabs.iter_mut()) {
        assert_eq!(event_ids(c, topic, 1).await, ids(11..=11), "live again");
    }

    // A storm: every tab resubscribes with the old id every 100 ms for 1.5 s. Bounded by the interval.
    let before = s.gitlab.requests("79").len();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_millis(1_500) {
        for (i, c) in tabs.iter_mut().enumerate() {
            c.send("unsubscribe", json!({ "topic": topic }), None).await;
            let id = json!(format!("storm-{i}-{round}"));
            c.send(
                "subscribe",
                json!({ "topic": topic, "lastEventId": "2" }),
                Some(id.clone()),
            )
            .await;
            reply(c, "subscribed", &id).await;
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(WINDOW + INTERVAL + Duration::from_millis(200)).await;
    let storm = s.gitlab.requests("79").len() - before;
    let bound = (elapsed.as_millis() / INTERVAL.as_millis()) as usize + 2;
    assert!(
        storm <= bound,
        "{storm} upstream requests in {elapsed:?} (bound {bound})"
    );
}

/// Item 11: a project id that is, or decodes to, a dot segment is refused with an `error`, and nothing reaches
/// GitLab. Before, `/project/../push` requested `/api/v4/events/stream`.
#[tokio::test]
async fn dot_segment_project_ids_are_refused_and_nothing_goes_upstream() {
    let s = setup_with(|_| {}).await;
    let mut a = s.tab("alice").await;
    for (i, topic) in [
        "/project/../push",
        "/project/%2e%2e/push",
        "/project/%2E/push",
        "/project/.%2E/push",
        "/project/group%2F..%2Fadmin/push",
        "/project/group%2f%2e%2e/push",
    ]
    .into_iter()
    .enumerate()
    {
        let id = json!(i);
        a.send("subscribe", json!({ "topic": topic }), Some(id.clone()))
            .await;
        let e = a.recv().await;
        assert_eq!(
            (e["type"].as_str(), &e["id"]),
            (Some("error"), &id),
            "{topic}: {e}"
        );
        let id = json!(format!("set-{i}"));
        a.send(
            "setSubscriptions",
            json!({ "topics": [topic] }),
            Some(id.clone()),
        )
        .await;
        let e = a.recv().await;
        assert_eq!(
            (e["type"].as_str(), &e["id"]),
            (Some("error"), &id),
            "{topic}: {e}"
        );
    }
    // A URL-encoded path is one path segment upstream (the fixture sees it decoded, as GitLab does).
    a.send(
        "subscribe",
        json!({ "topic": "/project/group%2Fname/push" }),
        Some(json!("ok")),
    )
    .await;
    reply(&mut a, "subscribed", &json!("ok")).await;
    let g = s.gitlab.clone();
    support::eventually("the encoded project's stream", move || {
        g.open_streams("group/name") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        s.gitlab.other_requests(),
        Vec::<String>::new(),
        "nothing outside the stream route"
    );
}
