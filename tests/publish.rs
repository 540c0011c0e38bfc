//! The publish API: targets, authentication, bad bodies, channel replay; with the memory broker on one instance,
//! and with a real Redis between two instances.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::keycloak::{sub_of, PUBLISHER_CLIENT, PUBLISHER_SECRET};
use support::redis::RedisServer;
use support::{Client, Keycloak, TokenSpec};

const SECRET: &str = "s3cret-for-tests";

fn config(kc: &Keycloak) -> tabhub::Config {
    let mut c = support::config(kc);
    c.publish.clients = vec![PUBLISHER_CLIENT.into()];
    c.publish.shared_secret = SECRET.into();
    c.publish.max_body_bytes = 64 * 1024;
    c
}

/// A client-credentials token of the fixture realm's service account.
async fn service_token(kc: &Keycloak) -> String {
    let r: Value = reqwest::Client::new()
        .post(format!("{}/protocol/openid-connect/token", kc.issuer()))
        .basic_auth(PUBLISHER_CLIENT, Some(PUBLISHER_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["access_token"]
        .as_str()
        .expect("service-account token")
        .to_owned()
}

async fn publish(t: &tabhub::Running, bearer: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/publish", t.local_addr()))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn user_topic_and_broadcast_targets_reach_exactly_their_tabs() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let (mut a1, mut a2, mut b) = (
        Client::connect(&url, &kc.token("alice")).await,
        Client::connect(&url, &kc.token("alice")).await,
        Client::connect(&url, &kc.token("bob")).await,
    );
    let token = service_token(&kc).await;

    // An orchestrator-core event to alice passes through unchanged.
    let event = json!({"type": "processes", "id": "LIST"});
    let (status, body) = publish(
        &t,
        &token,
        json!({"target": {"user": sub_of("alice")}, "type": "invalidateCache", "data": event}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for c in [&mut a1, &mut a2] {
        let m = c.recv().await;
        assert_eq!(
            (m["scope"].as_str(), m["type"].as_str()),
            (Some("user"), Some("invalidateCache"))
        );
        assert_eq!(m["data"], event);
        assert_eq!(m["eventId"], body["ids"][0]);
        assert!(m["timestamp"].is_string());
        c.expect_silence(Duration::from_millis(150)).await;
    }
    b.expect_silence(Duration::from_millis(100)).await;

    // A topic reaches exactly its subscribers.
    a1.send("subscribe", json!({"topic": "/events/orders"}), None)
        .await;
    a1.recv_type("subscribed").await;
    b.send("subscribe", json!({"topic": "/events/orders"}), None)
        .await;
    b.recv_type("subscribed").await;
    let (status, _) = publish(
        &t,
        SECRET,
        json!({"target": {"topic": "/events/orders"}, "type": "orderPlaced", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 200);
    for c in [&mut a1, &mut b] {
        let m = c.recv().await;
        assert_eq!(
            (m["scope"].as_str(), m["topic"].as_str()),
            (Some("topic"), Some("/events/orders"))
        );
        assert_eq!(m["data"], json!({"n": 1}));
    }
    a2.expect_silence(Duration::from_millis(150)).await;

    // Broadcast: everyone, once.
    let (status, _) = publish(
        &t,
        SECRET,
        json!({"target": {"broadcast": true}, "type": "maintenance", "data": "soon"}),
    )
    .await;
    assert_eq!(status, 200);
    for c in [&mut a1, &mut a2, &mut b] {
        let m = c.recv().await;
        assert_eq!(
            (m["scope"].as_str(), m["type"].as_str()),
            (Some("broadcast"), Some("maintenance"))
        );
        c.expect_silence(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_batch_is_delivered_in_order() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;
    let mut a = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    let messages: Vec<Value> = (0..10)
        .map(|i| json!({"target": {"user": sub_of("alice")}, "type": "step", "data": {"i": i}}))
        .collect();
    let (status, body) = publish(&t, SECRET, json!({ "messages": messages })).await;
    assert_eq!((status, body["published"].as_u64()), (200, Some(10)));
    for i in 0..10 {
        assert_eq!(a.recv().await["data"]["i"], i);
    }
}

#[tokio::test]
async fn publishers_are_authenticated_and_bodies_checked() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;
    let ok = json!({"target": {"broadcast": true}, "type": "x", "data": {}});
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/publish", t.local_addr());
    let r = http.post(&url).json(&ok).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(publish(&t, "wrong-secret", ok.clone()).await.0, 401);
    // A valid user token of the UI client: authenticated, not allowed.
    assert_eq!(publish(&t, &kc.token("alice"), ok.clone()).await.0, 403);
    assert_eq!(
        publish(&t, &service_token(&kc).await, ok.clone()).await.0,
        200
    );

    for (body, want) in [
        (json!({"target": {"user": "u"}}), "type"),
        (json!({"target": {"planet": "x"}, "type": "x"}), "target"),
        (
            json!({"target": {"topic": "/project/1/push"}, "type": "x"}),
            "publish namespace",
        ),
        (
            json!({"target": {"topic": "/elsewhere/x"}, "type": "x"}),
            "publish namespace",
        ),
        (
            json!({"messages": [ok.clone(), {"target": {"broadcast": true}}]}),
            "messages[1]",
        ),
        (json!({"messages": []}), "empty"),
        (json!([1]), "JSON object"),
    ] {
        let (status, r) = publish(&t, SECRET, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert!(r["error"].as_str().unwrap().contains(want), "{body}: {r}");
    }
    let r = http
        .post(&url)
        .bearer_auth(SECRET)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let big = json!({"target": {"broadcast": true}, "type": "x", "data": "y".repeat(100_000)});
    assert_eq!(publish(&t, SECRET, big).await.0, 413);
}

/// The publish API verifies tokens like every other entry point: a standard RFC 9068 client-credentials token
/// (`at+jwt` header, the client in `client_id`, no `typ` claim, no `azp`) publishes; the publisher's ID, refresh
/// or logout tokens never do (401), another client's access token gets 403; a token naming a signing key newer than
/// the last key fetch gets 503 with `Retry-After` (not 401: it will work), then publishes once a refetch is allowed.
#[tokio::test]
async fn publish_accepts_standard_access_tokens_and_only_them() {
    let kc = Keycloak::start().await;
    let mut c = config(&kc);
    c.auth.jwks_refetch_min_interval_ms = 5_000;
    c.auth.jwks_unknown_kid_wait_ms = 0;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let body = || json!({"target": {"broadcast": true}, "type": "hello"});
    let service = |spec: TokenSpec| spec.claim("sub", json!("service-account-publisher"));
    let standard = kc.mint(&service(TokenSpec::rfc9068("svc", PUBLISHER_CLIENT)));
    let (status, answer) = publish(&t, &standard, body()).await;
    assert_eq!(status, 200, "{answer}");
    // A Keycloak-shaped token whose client is in `client_id` only (no azp) is accepted too.
    let kc_client_id = service(TokenSpec::user("svc"))
        .without("azp")
        .claim("client_id", json!(PUBLISHER_CLIENT));
    assert_eq!(publish(&t, &kc.mint(&kc_client_id), body()).await.0, 200);

    let publisher = |spec: TokenSpec| TokenSpec {
        azp: PUBLISHER_CLIENT.into(),
        aud: json!(PUBLISHER_CLIENT),
        ..spec
    };
    for (what, spec) in [
        (
            "ID token",
            publisher(TokenSpec::user("svc")).claim("typ", json!("ID")),
        ),
        (
            "refresh token",
            publisher(TokenSpec::user("svc")).claim("typ", json!("Refresh")),
        ),
        (
            "standard ID token",
            publisher(TokenSpec::user("svc")).without("typ"),
        ),
        (
            "logout token",
            TokenSpec {
                header_typ: Some("logout+jwt".into()),
                ..publisher(TokenSpec::user("svc")).without("typ")
            },
        ),
    ] {
        let (status, answer) = publish(&t, &kc.mint(&spec), body()).await;
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not an access token"),
            "{what}: {answer}"
        );
    }
    let other = kc.mint(&TokenSpec::rfc9068("svc", "renku-ui"));
    assert_eq!(publish(&t, &other, body()).await.0, 403);

    kc.rotate_keys();
    let rotated = kc.mint(
        &service(TokenSpec::rfc9068("svc", PUBLISHER_CLIENT)).key("rs256-b.pem", "fixture-rs256-b"),
    );
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/publish", t.local_addr()))
        .bearer_auth(&rotated)
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "a new key inside the refetch interval: retry"
    );
    assert!(r.headers().contains_key("retry-after"));
    support::eventually_async(
        "the new key's token publishes once a refetch is allowed",
        || {
            let (t, rotated) = (&t, &rotated);
            async move { publish(t, rotated, body()).await.0 == 200 }
        },
    )
    .await;
}

#[tokio::test]
async fn resubscribing_with_last_event_id_gets_what_was_missed() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let mut a = Client::connect(&url, &kc.token("alice")).await;
    a.send("subscribe", json!({"topic": "/events/a"}), None)
        .await;
    a.recv_type("subscribed").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, r) = publish(
            &t,
            SECRET,
            json!({"target": {"topic": "/events/a"}, "type": "t", "data": {"i": i}}),
        )
        .await;
        ids.push(r["ids"][0].as_str().unwrap().to_owned());
        assert_eq!(a.recv().await["eventId"], ids[i]);
    }
    // A reconnecting tab that saw the first message gets the two others, after its acknowledgement.
    let mut again = Client::connect(&url, &kc.token("alice")).await;
    again
        .send(
            "subscribe",
            json!({"topic": "/events/a", "lastEventId": ids[0]}),
            None,
        )
        .await;
    assert_eq!(again.recv().await["type"], "subscribed");
    assert_eq!(again.recv().await["eventId"], ids[1]);
    assert_eq!(again.recv().await["eventId"], ids[2]);
    // Topics outside the namespaces are refused with a clear error.
    again
        .send("subscribe", json!({"topic": "/private/x"}), None)
        .await;
    let e = again.recv().await;
    assert!(
        e["data"]["message"]
            .as_str()
            .unwrap()
            .contains("publish namespace"),
        "{e}"
    );
}

// ---- Redis ----

async fn redis_instance(kc: &Keycloak, redis: &RedisServer, id: &str) -> tabhub::Running {
    let mut c = config(kc);
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
async fn through_redis_a_message_reaches_another_instance_exactly_once() {
    let kc = Keycloak::start().await;
    let redis = RedisServer::start();
    let a = redis_instance(&kc, &redis, "a").await;
    let b = redis_instance(&kc, &redis, "b").await;
    let (mut t1, mut t2) = (
        Client::connect(&support::ws_url(&b), &kc.token("alice")).await,
        Client::connect(&support::ws_url(&b), &kc.token("alice")).await,
    );
    let mut on_a = Client::connect(&support::ws_url(&a), &kc.token("bob")).await;
    t1.send("subscribe", json!({"topic": "/events/x"}), None)
        .await;
    t1.recv_type("subscribed").await;

    let token = service_token(&kc).await;
    for i in 0..20 {
        let (status, body) = publish(
            &a,
            &token,
            json!({"target": {"user": sub_of("alice")}, "type": "n", "data": {"i": i}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for c in [&mut t1, &mut t2] {
        for i in 0..20 {
            assert_eq!(
                c.recv().await["data"]["i"],
                i,
                "order kept for one publisher"
            );
        }
    }
    assert_eq!(
        publish(
            &a,
            SECRET,
            json!({"target": {"topic": "/events/x"}, "type": "t", "data": {}})
        )
        .await
        .0,
        200
    );
    assert_eq!(t1.recv().await["topic"], "/events/x");
    assert_eq!(
        publish(
            &b,
            SECRET,
            json!({"target": {"broadcast": true}, "type": "all", "data": {}})
        )
        .await
        .0,
        200
    );
    for c in [&mut t1, &mut t2, &mut on_a] {
        assert_eq!(c.recv().await["type"], "all");
        c.expect_silence(Duration::from_millis(300)).await;
    }
    // A publisher without the right client is refused on any instance.
    assert_eq!(
        publish(
            &b,
            &kc.token("alice"),
            json!({"target": {"broadcast": true}, "type": "x"})
        )
        .await
        .0,
        403
    );
}

#[tokio::test]
async fn redis_down_means_503_and_degraded_then_recovery() {
    let kc = Keycloak::start().await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let a = redis_instance(&kc, &redis, "a").await;
    let mut tab = Client::connect(&support::ws_url(&a), &kc.token("alice")).await;
    let body = json!({"target": {"user": sub_of("alice")}, "type": "n", "data": {}});
    redis.stop();
    support::eventually_async("publish fails with 503", || {
        let (a, body) = (&a, body.clone());
        async move { publish(a, SECRET, body).await.0 == 503 }
    })
    .await;
    let (status, err) = publish(&a, SECRET, body.clone()).await;
    assert_eq!(status, 503);
    assert!(
        err["error"].as_str().unwrap().contains("unavailable"),
        "{err}"
    );
    let ready: Value = reqwest::get(format!("http://{}/readyz", a.local_addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["broker"], "down");
    assert!(ready["status"].as_str().unwrap().contains("degraded"));
    assert!(a.app().metrics.render().contains("tabhub_broker_up 0"));

    let _redis = RedisServer::start_on(port);
    support::eventually("resubscribed", || a.app().broker.state() == "up").await;
    support::eventually_async("publish works again", || {
        let (a, body) = (&a, body.clone());
        async move { publish(a, SECRET, body).await.0 == 200 }
    })
    .await;
    assert_eq!(tab.recv().await["type"], "n");
}

// ---- Channel history in Redis ----

/// Publishes one message to `channel` through `t`; its id.
async fn publish_to(t: &tabhub::Running, channel: &str, i: u64) -> u64 {
    let (status, r) = publish(
        t,
        SECRET,
        json!({"target": {"topic": channel}, "type": "t", "data": {"i": i}}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    r["ids"][0].as_str().unwrap().parse().expect("a numeric id")
}

async fn subscribe_from(c: &mut Client, channel: &str, last: &str) -> Value {
    c.send(
        "subscribe",
        json!({"topic": channel, "lastEventId": last}),
        None,
    )
    .await;
    let r = c.recv().await;
    assert_eq!(r["type"], "subscribed", "{r}");
    r
}

fn id_of(m: &Value) -> u64 {
    m["eventId"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn through_redis_a_channel_resumes_on_any_instance_with_the_same_ids() {
    let kc = Keycloak::start().await;
    let redis = RedisServer::start();
    let a = redis_instance(&kc, &redis, "a").await;
    let b = redis_instance(&kc, &redis, "b").await;
    let mut on_a = Client::connect(&support::ws_url(&a), &kc.token("alice")).await;
    let mut on_b = Client::connect(&support::ws_url(&b), &kc.token("bob")).await;
    for c in [&mut on_a, &mut on_b] {
        c.send("subscribe", json!({"topic": "/events/x"}), None)
            .await;
        c.recv_type("subscribed").await;
    }
    // A batch mixing targets: the channel messages take the history's ids, consecutive, in order.
    let (status, r) = publish(
        &a,
        SECRET,
        json!({"messages": [
            {"target": {"topic": "/events/x"}, "type": "t", "data": {"i": 0}},
            {"target": {"user": sub_of("carol")}, "type": "u", "data": {}},
            {"target": {"topic": "/events/x"}, "type": "t", "data": {"i": 1}},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let first: u64 = r["ids"][0].as_str().unwrap().parse().unwrap();
    assert_eq!(r["ids"][2], (first + 1).to_string());
    let third = publish_to(&b, "/events/x", 2).await;
    assert_eq!(
        third,
        first + 2,
        "one sequence per channel, whichever instance"
    );
    for c in [&mut on_a, &mut on_b] {
        for (i, id) in [first, first + 1, first + 2].into_iter().enumerate() {
            let m = c.recv().await;
            assert_eq!((id_of(&m), &m["data"]["i"]), (id, &json!(i)), "{m}");
        }
    }
    // The tab on A goes away, misses two, and comes back on B with the last id it had.
    on_a.close().await;
    let missed = [
        publish_to(&a, "/events/x", 3).await,
        publish_to(&a, "/events/x", 4).await,
    ];
    let mut back = Client::connect(&support::ws_url(&b), &kc.token("alice")).await;
    let r = subscribe_from(&mut back, "/events/x", &(first + 2).to_string()).await;
    assert_eq!(r["data"].get("gap"), None, "{r}");
    for (id, i) in missed.into_iter().zip(3..) {
        let m = back.recv().await;
        assert_eq!((id_of(&m), &m["data"]["i"]), (id, &json!(i)), "{m}");
        assert_eq!(m["topic"], "/events/x");
        assert_eq!(
            id_of(&on_b.recv().await),
            id,
            "the same id on both instances"
        );
    }
    back.expect_silence(Duration::from_millis(300)).await;
    let live = publish_to(&a, "/events/x", 5).await;
    assert_eq!(id_of(&back.recv().await), live);
    back.expect_silence(Duration::from_millis(200)).await;

    // Up to date: nothing replayed; an id this history never gave, or no number: gap, and what it has.
    let mut c = Client::connect(&support::ws_url(&a), &kc.token("dave")).await;
    let r = subscribe_from(&mut c, "/events/x", &live.to_string()).await;
    assert_eq!(r["data"].get("gap"), None, "{r}");
    c.expect_silence(Duration::from_millis(200)).await;
    let mut c = Client::connect(&support::ws_url(&a), &kc.token("dave")).await;
    let r = subscribe_from(&mut c, "/events/x", &(live + 1000).to_string()).await;
    assert_eq!(r["data"]["gap"], true, "{r}");
    assert_eq!(id_of(&c.recv().await), first, "the whole history follows");
    let mut c = Client::connect(&support::ws_url(&a), &kc.token("dave")).await;
    let r = subscribe_from(&mut c, "/events/x", "not-a-number").await;
    assert_eq!(r["data"]["gap"], true, "{r}");
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn through_redis_a_resume_while_messages_flow_loses_and_repeats_nothing() {
    let kc = Keycloak::start().await;
    let redis = RedisServer::start();
    let a = redis_instance(&kc, &redis, "a").await;
    let b = redis_instance(&kc, &redis, "b").await;
    let start = publish_to(&a, "/events/busy", 0).await;
    let publisher = {
        let a_addr = a.local_addr();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut last = 0u64;
            for i in 1..=40u64 {
                let r: Value = client
                    .post(format!("http://{a_addr}/api/publish"))
                    .bearer_auth(SECRET)
                    .json(&json!({"target": {"topic": "/events/busy"}, "type": "t", "data": {"i": i}}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                last = r["ids"][0].as_str().unwrap().parse().unwrap();
            }
            last
        })
    };
    // Resumes from the first message while the others are being published through the other instance.
    let mut tab = Client::connect(&support::ws_url(&b), &kc.token("alice")).await;
    let r = subscribe_from(&mut tab, "/events/busy", &start.to_string()).await;
    assert_eq!(r["data"].get("gap"), None, "{r}");
    let last = publisher.await.unwrap();
    assert_eq!(last, start + 40);
    for id in start + 1..=last {
        assert_eq!(id_of(&tab.recv().await), id, "in order, once each");
    }
    tab.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn with_redis_down_channel_publishes_are_refused_and_resumes_say_gap() {
    let kc = Keycloak::start().await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let a = redis_instance(&kc, &redis, "a").await;
    let before = publish_to(&a, "/events/x", 0).await;
    redis.stop();
    let body = json!({"target": {"topic": "/events/x"}, "type": "t", "data": {}});
    support::eventually_async("publish fails with 503", || {
        let (a, body) = (&a, body.clone());
        async move { publish(a, SECRET, body).await.0 == 503 }
    })
    .await;
    // The history cannot be read: the tab is subscribed from now on and told that it may have missed some.
    let mut tab = Client::connect(&support::ws_url(&a), &kc.token("alice")).await;
    let r = subscribe_from(&mut tab, "/events/x", &before.to_string()).await;
    assert_eq!(r["data"]["gap"], true, "{r}");

    // A Redis that lost everything: ids start again above every id given before; a resume from an old id says gap.
    let _redis = RedisServer::start_on(port);
    support::eventually("resubscribed", || a.app().broker.state() == "up").await;
    let after = std::sync::atomic::AtomicU64::new(0);
    support::eventually_async("publish works again", || {
        let (a, after) = (&a, &after);
        async move {
            let body = json!({"target": {"topic": "/events/x"}, "type": "t", "data": {"i": 1}});
            let (status, r) = publish(a, SECRET, body).await;
            if status == 200 {
                let id = r["ids"][0].as_str().unwrap().parse().unwrap();
                after.store(id, std::sync::atomic::Ordering::Relaxed);
            }
            status == 200
        }
    })
    .await;
    let after = after.into_inner();
    assert!(after > before, "{after} > {before}");
    assert_eq!(id_of(&tab.recv().await), after, "live again");
    let mut again = Client::connect(&support::ws_url(&a), &kc.token("bob")).await;
    let r = subscribe_from(&mut again, "/events/x", &before.to_string()).await;
    assert_eq!(r["data"]["gap"], true, "{r}");
    assert_eq!(id_of(&again.recv().await), after);
}

#[tokio::test]
async fn through_redis_a_resume_from_beyond_the_history_gets_its_newest_with_gap() {
    let kc = Keycloak::start().await;
    let redis = RedisServer::start();
    let mut c = config(&kc);
    c.broker.kind = tabhub::config::BrokerKind::Redis;
    c.broker.redis_url = redis.url();
    // Redis trims `MAXLEN ~ 3` by whole nodes: the stream keeps more than 3, the replay only the newest 3.
    c.publish.buffer_events = 3;
    let a = support::start(c, tabhub::commands::builtin()).await;
    support::eventually("subscribed to Redis", || a.app().broker.state() == "up").await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(publish_to(&a, "/events/long", i).await);
    }
    let mut tab = Client::connect(&support::ws_url(&a), &kc.token("alice")).await;
    let r = subscribe_from(&mut tab, "/events/long", &ids[0].to_string()).await;
    assert_eq!(r["data"]["gap"], true, "{r}");
    for &id in &ids[7..] {
        assert_eq!(
            id_of(&tab.recv().await),
            id,
            "the newest, up to the live ones"
        );
    }
    let live = publish_to(&a, "/events/long", 10).await;
    assert_eq!(id_of(&tab.recv().await), live);
    tab.expect_silence(Duration::from_millis(200)).await;
}
