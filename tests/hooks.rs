//! The webhook source (`gitlab.source = "webhook"`) over real sockets: GitLab-shaped deliveries with GitLab's
//! headers (`tabhub_fixtures::webhooks`) posted to a real tabhub, the fixture GitLab answering the access checks,
//! real tabs; two instances with a real `redis-server`.
//!
//! No test waits for something not to happen: "nothing arrives" is shown by a later event arriving first.

mod support;

use std::sync::Arc;

use serde_json::{json, Value};
use support::keycloak::sub_of;
use support::redis::RedisServer;
use support::{Client, Keycloak};
use tabhub_fixtures::gitlab::FixtureGitlab;
use tabhub_fixtures::webhooks::{self, Sender, KINDS};

const SECRET: &str = "webhook-secret-for-tests";
const ROTATED: &str = "the-next-webhook-secret";

struct Setup {
    kc: Keycloak,
    gitlab: Arc<FixtureGitlab>,
    t: tabhub::Running,
}

fn hook_config(kc: &Keycloak, gitlab: &str) -> tabhub::Config {
    let mut c = support::config_with_gitlab(kc, gitlab);
    c.gitlab.source = tabhub::config::GitlabSource::Webhook;
    c.hooks.secrets = vec![SECRET.into(), ROTATED.into()];
    c.hooks.max_body_bytes = 64 * 1024;
    c
}

async fn setup_with(f: impl FnOnce(&mut tabhub::Config)) -> Setup {
    let kc = Keycloak::start().await;
    let (gitlab, base) = support::gitlab(100).await;
    let mut c = hook_config(&kc, &base);
    f(&mut c);
    let t = support::start(c, tabhub::commands::builtin()).await;
    Setup { kc, gitlab, t }
}

fn hook_url(t: &tabhub::Running) -> String {
    format!("http://{}/hooks/gitlab", t.local_addr())
}

impl Setup {
    async fn tab(&self, user: &str) -> Client {
        Client::connect(&support::ws_url(&self.t), &self.kc.token(user)).await
    }

    fn sender(&self) -> Sender {
        Sender::new(&hook_url(&self.t), SECRET)
    }
}

async fn subscribe(c: &mut Client, topic: &str, last: Option<&str>) -> Value {
    let mut data = json!({ "topic": topic });
    if let Some(l) = last {
        data["lastEventId"] = json!(l);
    }
    c.send("subscribe", data, Some(json!(topic))).await;
    let r = c.recv().await;
    assert_eq!(r["id"], topic, "{r}");
    r
}

async fn subscribed(c: &mut Client, topic: &str, last: Option<&str>) {
    let r = subscribe(c, topic, last).await;
    assert_eq!(r["type"], "subscribed", "{r}");
}

/// The next event (skipping other messages): (topic, id, payload).
async fn next_event(c: &mut Client) -> (String, String, Value) {
    let m = c.recv_type("event").await;
    assert_eq!(m["scope"], "topic", "{m}");
    let d = &m["data"];
    (
        d["topic"].as_str().unwrap().to_owned(),
        d["id"].as_str().unwrap().to_owned(),
        d["payload"].clone(),
    )
}

/// An event id as a number.
fn num(id: &str) -> u64 {
    id.parse()
        .unwrap_or_else(|_| panic!("a numeric event id: {id}"))
}

async fn post_ok(s: &Sender, d: &webhooks::Delivery) {
    assert_eq!(s.post(d, Some(&Sender::new_key())).await, Ok(200));
}

async fn metrics(t: &tabhub::Running) -> String {
    reqwest::get(format!("http://{}/metrics", t.local_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_subscribed_tab_gets_each_kind_with_one_id_sequence_per_project() {
    let s = setup_with(|_| {}).await;
    let mut a = s.tab("alice").await;
    for kind in KINDS {
        subscribed(&mut a, &format!("/project/42/{kind}"), None).await;
    }
    let sender = s.sender();
    for (n, kind) in KINDS.iter().enumerate() {
        post_ok(&sender, &webhooks::payload(kind, 42, n as u64).unwrap()).await;
    }
    let mut first = None;
    for (n, kind) in KINDS.iter().enumerate() {
        let (topic, id, payload) = next_event(&mut a).await;
        assert_eq!(topic, format!("/project/42/{kind}"));
        let first = *first.get_or_insert(num(&id));
        assert_eq!(num(&id), first + n as u64, "consecutive ids per project");
        assert_eq!(payload, webhooks::payload(kind, 42, n as u64).unwrap().body);
    }
    let m = metrics(&s.t).await;
    assert_eq!(
        metric(
            &m,
            "tabhub_hook_deliveries_total{kind=\"push\",outcome=\"accepted\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            "tabhub_access_checks_total{outcome=\"allowed\",source=\"backend\"}"
        ) >= 1.0
    );
    assert_eq!(
        s.gitlab.project_requests("42"),
        1,
        "one access check for seven topics of one project (cached)"
    );
}

#[tokio::test]
async fn only_subscribed_and_allowed_users_get_events() {
    let s = setup_with(|_| {}).await;
    s.gitlab.grant(&sub_of("mallory"), "42", None);
    let (mut alice, mut bob, mut mallory) = (
        s.tab("alice").await,
        s.tab("bob").await,
        s.tab("mallory").await,
    );
    subscribed(&mut alice, "/project/42/push", None).await;
    subscribed(&mut bob, "/project/43/push", None).await;
    let refused = subscribe(&mut mallory, "/project/42/push", None).await;
    assert_eq!(refused["type"], "subscriptionError", "{refused}");
    assert_eq!(refused["data"]["status"], 404);
    assert_eq!(refused["data"]["topic"], "/project/42/push");
    subscribed(&mut mallory, "/project/43/push", None).await;
    // setSubscriptions reports the refused project, subscribes the rest.
    mallory
        .send(
            "setSubscriptions",
            json!({"topics": ["/project/42/issue", "/project/43/push", "/project/43/issue"]}),
            None,
        )
        .await;
    let r = mallory.recv_type("subscriptions").await;
    assert_eq!(r["data"]["added"], json!(["/project/43/issue"]), "{r}");
    assert_eq!(r["data"]["failed"][0]["topic"], "/project/42/issue", "{r}");

    let sender = s.sender();
    post_ok(&sender, &webhooks::payload("push", 42, 1).unwrap()).await;
    post_ok(&sender, &webhooks::payload("push", 43, 2).unwrap()).await;
    assert_eq!(next_event(&mut alice).await.0, "/project/42/push");
    // Bob and mallory get 43's event first: 42's never came to them.
    assert_eq!(next_event(&mut bob).await.0, "/project/43/push");
    assert_eq!(next_event(&mut mallory).await.0, "/project/43/push");
}

#[tokio::test]
async fn confidential_issues_and_notes_only_reach_reporters_and_up() {
    let s = setup_with(|_| {}).await;
    s.gitlab.grant(&sub_of("guest"), "42", Some(10));
    let (mut alice, mut guest) = (s.tab("alice").await, s.tab("guest").await);
    for c in [&mut alice, &mut guest] {
        subscribed(c, "/project/42/issue", None).await;
        subscribed(c, "/project/42/note", None).await;
    }
    let sender = s.sender();
    post_ok(&sender, &webhooks::issue(42, 1, true)).await;
    post_ok(&sender, &webhooks::note(42, 2, true)).await;
    post_ok(&sender, &webhooks::issue(42, 3, false)).await;
    let seen: Vec<u64> = [
        next_event(&mut alice).await,
        next_event(&mut alice).await,
        next_event(&mut alice).await,
    ]
    .into_iter()
    .map(|(_, id, _)| num(&id))
    .collect();
    assert_eq!(seen, [seen[0], seen[0] + 1, seen[0] + 2]);
    let (topic, id, _) = next_event(&mut guest).await;
    assert_eq!((topic.as_str(), num(&id)), ("/project/42/issue", seen[2]));
}

#[tokio::test]
async fn a_retried_delivery_arrives_once() {
    let s = setup_with(|_| {}).await;
    let mut a = s.tab("alice").await;
    subscribed(&mut a, "/project/42/push", None).await;
    let sender = s.sender();
    let d1 = webhooks::payload("push", 42, 1).unwrap();
    // GitLab's retries repeat the Idempotency-Key (the body is the same, the Event-UUID differs).
    assert_eq!(sender.post(&d1, Some("key-1")).await, Ok(200));
    assert_eq!(sender.post(&d1, Some("key-1")).await, Ok(200));
    // An older GitLab sends no key: the body's hash tells the retry.
    let d2 = webhooks::payload("push", 42, 2).unwrap();
    assert_eq!(sender.post(&d2, None).await, Ok(200));
    assert_eq!(sender.post(&d2, None).await, Ok(200));
    let d3 = webhooks::payload("push", 42, 3).unwrap();
    post_ok(&sender, &d3).await;
    let got: Vec<(u64, Value)> = [
        next_event(&mut a).await,
        next_event(&mut a).await,
        next_event(&mut a).await,
    ]
    .into_iter()
    .map(|(_, id, p)| (num(&id), p))
    .collect();
    let first = got[0].0;
    assert_eq!(
        got,
        [(first, d1.body), (first + 1, d2.body), (first + 2, d3.body)]
    );
    let t = &s.t;
    support::eventually_async("duplicates counted", || async {
        metric(
            &metrics(t).await,
            "tabhub_hook_deliveries_total{kind=\"push\",outcome=\"duplicate\"}",
        ) == 2.0
    })
    .await;
}

#[tokio::test]
async fn a_wrong_secret_is_401_and_delivers_nothing() {
    let s = setup_with(|_| {}).await;
    let mut a = s.tab("alice").await;
    subscribed(&mut a, "/project/42/push", None).await;
    let d = webhooks::payload("push", 42, 1).unwrap();
    let body = || d.body.to_string().into_bytes();
    let wrong = Sender::new(&hook_url(&s.t), "not-the-secret-at-all");
    assert_eq!(wrong.post(&d, Some("k")).await, Ok(401));
    assert_eq!(
        s.sender()
            .post_raw("Push Hook", body(), Some("k2"), None)
            .await,
        Ok(401)
    );
    assert_eq!(
        s.sender()
            .post_raw(
                "Push Hook",
                body(),
                Some("k3"),
                Some(&SECRET[..SECRET.len() - 1])
            )
            .await,
        Ok(401)
    );
    // The rotated secret works too; the refused deliveries took no id and no key.
    let rotated = Sender::new(&hook_url(&s.t), ROTATED);
    assert_eq!(rotated.post(&d, Some("k")).await, Ok(200));
    let (_, _, payload) = next_event(&mut a).await;
    assert_eq!(payload, d.body.clone(), "the first event delivered");
    let m = metrics(&s.t).await;
    assert_eq!(
        metric(
            &m,
            "tabhub_hook_deliveries_total{kind=\"unknown\",outcome=\"unauthorized\"}"
        ),
        3.0
    );
}

#[tokio::test]
async fn oversized_malformed_and_unroutable_deliveries_lose_nothing_for_the_next() {
    let s = setup_with(|_| {}).await;
    let mut a = s.tab("alice").await;
    subscribed(&mut a, "/project/42/push", None).await;
    let sender = s.sender();
    let mut big = webhooks::payload("push", 42, 1).unwrap();
    big.body["padding"] = json!("x".repeat(70 * 1024));
    assert_eq!(sender.post(&big, Some("big")).await, Ok(413));
    for (body, says) in [
        (&b"{\"object_kind\": \"push\", "[..], "malformed JSON"),
        (b"[]", "JSON object"),
        (
            b"{\"object_kind\": \"push\", \"project_id\": \"../1\"}",
            "project_id",
        ),
    ] {
        let r = reqwest::Client::new()
            .post(hook_url(&s.t))
            .header("X-Gitlab-Token", SECRET)
            .header("X-Gitlab-Event", "Push Hook")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert!(
            e["error"].as_str().unwrap_or_default().contains(says) || e.to_string().contains(says),
            "{e}"
        );
    }
    // Well-formed but for nobody (project 999), or naming no project (a system hook's user event): 2xx.
    post_ok(&sender, &webhooks::payload("push", 999, 1).unwrap()).await;
    let system = webhooks::Delivery {
        event_header: "System Hook",
        body: json!({"event_name": "user_create", "object_kind": "user_create", "user_id": 41}),
    };
    post_ok(&sender, &system).await;
    let d = webhooks::payload("push", 42, 2).unwrap();
    post_ok(&sender, &d).await;
    let (_, _, payload) = next_event(&mut a).await;
    assert_eq!(payload, d.body, "the first event delivered");
}

#[tokio::test]
async fn withdrawn_access_drops_the_topic() {
    let s = setup_with(|c| {
        c.access.allowed_ttl_ms = 100;
        c.access.refused_ttl_ms = 100;
        c.access.recheck_interval_ms = 100;
    })
    .await;
    let mut a = s.tab("alice").await;
    subscribed(&mut a, "/project/42/push", None).await;
    subscribed(&mut a, "/project/43/push", None).await;
    let sender = s.sender();
    post_ok(&sender, &webhooks::payload("push", 42, 1).unwrap()).await;
    assert_eq!(next_event(&mut a).await.0, "/project/42/push");
    s.gitlab.grant(&sub_of("alice"), "42", None);
    let e = a.recv_type("subscriptionError").await;
    assert_eq!(e["data"]["topic"], "/project/42/push", "{e}");
    assert_eq!(e["data"]["status"], 404);
    a.send("subscribe", json!({"topic": "/project/42/push"}), None)
        .await;
    assert_eq!(a.recv().await["type"], "subscriptionError");
    post_ok(&sender, &webhooks::payload("push", 42, 2).unwrap()).await;
    post_ok(&sender, &webhooks::payload("push", 43, 3).unwrap()).await;
    assert_eq!(
        next_event(&mut a).await.0,
        "/project/43/push",
        "42's event never came"
    );
}

#[tokio::test]
async fn a_reconnecting_tab_resumes_from_its_last_event_id() {
    let s = setup_with(|_| {}).await;
    let sender = s.sender();
    let mut a = s.tab("alice").await;
    subscribed(&mut a, "/project/42/push", None).await;
    for n in 1..=3 {
        post_ok(&sender, &webhooks::payload("push", 42, n).unwrap()).await;
    }
    let base = num(&next_event(&mut a).await.1) - 1;
    for n in 2..=3 {
        assert_eq!(num(&next_event(&mut a).await.1), base + n);
    }
    a.close().await;
    for n in 4..=5 {
        post_ok(&sender, &webhooks::payload("push", 42, n).unwrap()).await;
        post_ok(&sender, &webhooks::payload("issue", 42, n).unwrap()).await;
    }
    let mut again = s.tab("alice").await;
    let r = subscribe(
        &mut again,
        "/project/42/push",
        Some(&(base + 3).to_string()),
    )
    .await;
    assert_eq!(r["type"], "subscribed");
    assert!(r["data"].get("gap").is_none(), "{r}");
    post_ok(&sender, &webhooks::payload("push", 42, 6).unwrap()).await;
    let ids: Vec<u64> = [
        next_event(&mut again).await,
        next_event(&mut again).await,
        next_event(&mut again).await,
    ]
    .into_iter()
    .map(|(_, id, _)| num(&id) - base)
    .collect();
    assert_eq!(ids, [4, 6, 8], "push events only: 4 and 6 missed, 8 live");
}

// ---- two instances, one Redis ----

async fn redis_instance(
    kc: &Keycloak,
    gitlab: &str,
    redis: &RedisServer,
    id: &str,
) -> tabhub::Running {
    let mut c = hook_config(kc, gitlab);
    c.instance_id = id.into();
    c.broker.kind = tabhub::config::BrokerKind::Redis;
    c.broker.redis_url = redis.url();
    c.broker.reconnect_initial_ms = 50;
    c.broker.reconnect_max_ms = 200;
    let t = support::start(c, tabhub::commands::builtin()).await;
    support::eventually(&format!("{id} subscribed to Redis"), || {
        t.app().broker.state() == "up"
    })
    .await;
    t
}

#[tokio::test]
async fn through_redis_a_webhook_to_one_instance_reaches_tabs_on_the_other_and_a_moved_tab_resumes()
{
    let kc = Keycloak::start().await;
    let (_gitlab, base) = support::gitlab(100).await;
    let redis = RedisServer::start();
    let a = redis_instance(&kc, &base, &redis, "a").await;
    let b = redis_instance(&kc, &base, &redis, "b").await;
    let to_a = Sender::new(&hook_url(&a), SECRET);
    let to_b = Sender::new(&hook_url(&b), SECRET);
    let tab = |t: &tabhub::Running, user: &str| {
        let url = support::ws_url(t);
        let token = kc.token(user);
        async move { Client::connect(&url, &token).await }
    };

    let mut on_b = tab(&b, "bob").await;
    subscribed(&mut on_b, "/project/42/push", None).await;
    let mut on_a = tab(&a, "alice").await;
    subscribed(&mut on_a, "/project/42/push", None).await;

    // A webhook to A reaches B's tab; GitLab's retry of it, sent to B, is dropped.
    let d1 = webhooks::payload("push", 42, 1).unwrap();
    assert_eq!(to_a.post(&d1, Some("d1")).await, Ok(200));
    assert_eq!(to_b.post(&d1, Some("d1")).await, Ok(200));
    let d2 = webhooks::payload("push", 42, 2).unwrap();
    assert_eq!(to_b.post(&d2, Some("d2")).await, Ok(200));
    let mut first = None;
    for c in [&mut on_b, &mut on_a] {
        let got: Vec<(u64, Value)> = [next_event(c).await, next_event(c).await]
            .into_iter()
            .map(|(_, id, p)| (num(&id), p))
            .collect();
        let base = *first.get_or_insert(got[0].0 - 1);
        assert_eq!(
            got,
            [(base + 1, d1.body.clone()), (base + 2, d2.body.clone())],
            "the same ids on both instances"
        );
    }
    let base = first.unwrap_or_default();

    // Alice's tab leaves A (last id 2); events go on through both instances; she comes back on B.
    on_a.close().await;
    for n in 3..=5 {
        let to = if n % 2 == 0 { &to_a } else { &to_b };
        assert_eq!(
            to.post(
                &webhooks::payload("push", 42, n).unwrap(),
                Some(&format!("d{n}"))
            )
            .await,
            Ok(200)
        );
    }
    // Bob has them all, in order, once: the history's ids are the instances' ids.
    for n in 3..=5 {
        assert_eq!(num(&next_event(&mut on_b).await.1), base + n);
    }
    let mut moved = tab(&b, "alice").await;
    let r = subscribe(
        &mut moved,
        "/project/42/push",
        Some(&(base + 2).to_string()),
    )
    .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    assert!(r["data"].get("gap").is_none(), "{r}");
    assert_eq!(
        to_a.post(&webhooks::payload("push", 42, 6).unwrap(), Some("d6"))
            .await,
        Ok(200)
    );
    let ids: Vec<u64> = [
        next_event(&mut moved).await,
        next_event(&mut moved).await,
        next_event(&mut moved).await,
        next_event(&mut moved).await,
    ]
    .into_iter()
    .map(|(_, id, _)| num(&id) - base)
    .collect();
    assert_eq!(ids, [3, 4, 5, 6], "no gap, no repeat");
}

#[tokio::test]
async fn a_backend_that_cannot_answer_refuses() {
    let s = setup_with(|c| {
        // Nothing listens there: the access check gets no answer.
        c.backends
            .insert("gitlab".into(), "http://127.0.0.1:9".into());
    })
    .await;
    let mut a = s.tab("alice").await;
    let r = subscribe(&mut a, "/project/42/push", None).await;
    assert_eq!(r["type"], "subscriptionError", "{r}");
    assert_eq!(r["data"]["status"], 503);
    let m = metrics(&s.t).await;
    assert!(
        metric(
            &m,
            "tabhub_access_checks_total{outcome=\"unavailable\",source=\"backend\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn with_redis_down_deliveries_are_refused_503_then_flow_again() {
    let kc = Keycloak::start().await;
    let (_gitlab, base) = support::gitlab(100).await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let a = redis_instance(&kc, &base, &redis, "a").await;
    let mut tab = Client::connect(&support::ws_url(&a), &kc.token("alice")).await;
    subscribed(&mut tab, "/project/42/push", None).await;
    let sender = Sender::new(&hook_url(&a), SECRET);
    redis.stop();
    let d1 = webhooks::payload("push", 42, 1).unwrap();
    // GitLab retries a 5xx: nothing is answered 2xx and then lost.
    support::eventually_async("503 while Redis is down", || async {
        sender.post(&d1, Some("d1")).await == Ok(503)
    })
    .await;
    let _redis = RedisServer::start_on(port);
    support::eventually("the broker back", || a.app().broker.state() == "up").await;
    assert_eq!(sender.post(&d1, Some("d1")).await, Ok(200));
    let (_, _, payload) = next_event(&mut tab).await;
    assert_eq!(payload, d1.body);
}

/// One `setSubscriptions` naming many projects costs the backend at most `gitlab.max_projects_per_user` access
/// checks: the projects beyond the limit are refused by it without a call.
#[tokio::test]
async fn one_command_checks_access_for_at_most_the_project_limit() {
    let s = setup_with(|c| {
        c.gitlab.max_projects_per_user = 3;
        c.gitlab.max_topics_per_tab = 50;
    })
    .await;
    let mut a = s.tab("alice").await;
    let topics: Vec<String> = (1..=20).map(|p| format!("/project/{p}/push")).collect();
    a.send(
        "setSubscriptions",
        json!({ "topics": topics }),
        Some(json!(1)),
    )
    .await;
    let r = a.recv_type("subscriptions").await;
    assert_eq!(r["data"]["added"].as_array().unwrap().len(), 3, "{r}");
    let failed = r["data"]["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 17, "{r}");
    assert!(
        failed
            .iter()
            .all(|f| f["message"].as_str().unwrap().contains("project limit")),
        "{r}"
    );
    let m = metrics(&s.t).await;
    let checks = metric(
        &m,
        "tabhub_access_checks_total{outcome=\"allowed\",source=\"backend\"}",
    );
    assert_eq!(
        checks, 3.0,
        "one backend check per project within the limit"
    );
}
