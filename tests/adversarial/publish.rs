//! Publishing and channels under abuse: a message no tab can hold, a replay larger than a tab's queue, one user
//! taking every channel buffer.

use serde_json::{json, Value};

use crate::support::{self, Client, Keycloak};

const SECRET: &str = "s3cret-for-adversarial-tests";

fn config(kc: &Keycloak) -> tabhub::Config {
    let mut c = support::config(kc);
    c.publish.shared_secret = SECRET.into();
    c.publish.max_body_bytes = 1024 * 1024;
    c.websocket.outbound_queue_bytes = 64 * 1024;
    c.publish.max_buffered_topics = 20;
    c.publish.max_channels_per_user = 5;
    c
}

async fn publish(t: &tabhub::Running, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/publish", t.local_addr()))
        .bearer_auth(SECRET)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_message_no_tab_can_hold_is_refused_at_publish_not_turned_into_closes() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;
    let mut tab = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    let big = "x".repeat(100 * 1024);
    let user = support::keycloak::sub_of("alice");
    let (status, body) = publish(
        &t,
        json!({"target": {"user": user}, "type": "big", "data": {"blob": big}}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap_or_default()
        .contains("websocket.outbound_queue_bytes"));
    // The tab is untouched and still reads.
    tab.send("ping", json!({}), None).await;
    tab.recv_type("ack").await;
    assert!(!t.app().metrics.render().contains("code=\"4009\""));
}

#[tokio::test]
async fn a_replay_larger_than_a_tab_queue_is_cut_to_the_newest_and_says_so() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let mut ids = Vec::new();
    for i in 0..20 {
        let (status, body) = publish(
            &t,
            json!({"target": {"topic": "/events/big"}, "type": "chunk", "data": {"i": i, "blob": "y".repeat(8 * 1024)}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["ids"][0].as_str().unwrap().to_owned());
    }
    // 19 messages of 8 KiB missed: more than half of a 64 KiB queue. The newest that fit come back, flagged.
    let mut tab = Client::connect(&url, &kc.token("alice")).await;
    tab.send(
        "subscribe",
        json!({"topic": "/events/big", "lastEventId": ids[0]}),
        None,
    )
    .await;
    let ack = tab.recv_type("subscribed").await;
    assert_eq!(ack["data"]["gap"], true, "{ack}");
    let mut got = Vec::new();
    while let Some(m) = tab.next_within(std::time::Duration::from_millis(300)).await {
        got.push(m["data"]["i"].as_u64().unwrap());
    }
    assert!(!got.is_empty() && got.len() < 19, "{got:?}");
    assert_eq!(got.last(), Some(&19), "the newest come back");
    tab.send("ping", json!({}), None).await;
    tab.recv_type("ack").await;
}

#[tokio::test]
async fn one_user_cannot_take_every_channel_buffer() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    // Alice spreads channels over several tabs: the per-user limit holds across them.
    let mut refused = 0;
    let mut tabs = Vec::new();
    for k in 0..4 {
        let mut tab = Client::connect(&url, &kc.token("alice")).await;
        let topics: Vec<String> = (0..5).map(|i| format!("/events/a{k}-{i}")).collect();
        tab.send("setSubscriptions", json!({ "topics": topics }), None)
            .await;
        let r = tab.recv_type("subscriptions").await;
        refused += r["data"]["failed"].as_array().map_or(0, Vec::len);
        tabs.push(tab);
    }
    assert_eq!(refused, 15, "5 channels per user, 20 asked");
    // Bob's channel still gets a buffer, and replays.
    let (status, body) = publish(
        &t,
        json!({"target": {"topic": "/events/bob"}, "type": "m", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let first = body["ids"][0].as_str().unwrap().to_owned();
    publish(
        &t,
        json!({"target": {"topic": "/events/bob"}, "type": "m", "data": {"n": 2}}),
    )
    .await;
    let mut bob = Client::connect(&url, &kc.token("bob")).await;
    bob.send(
        "subscribe",
        json!({"topic": "/events/bob", "lastEventId": first}),
        None,
    )
    .await;
    bob.recv_type("subscribed").await;
    assert_eq!(bob.recv_type("m").await["data"]["n"], 2);
}
