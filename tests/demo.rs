//! `tabhub demo`'s setup, composed as `tabhub demo` composes it (issuer, fixture GitLab, gateway on one listener):
//! the fixture GitLab posts GitLab-shaped webhooks to the demo's receiver, and the demo's topics flow. Built only
//! with the `demo` feature (CI also checks the product without it).
#![cfg(feature = "demo")]

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::Client;
use tabhub::demo;

#[tokio::test]
async fn the_demo_topics_flow_from_webhooks() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = demo::base_url(addr);
    let config = demo::config(addr);
    assert_eq!(config.gitlab.source, tabhub::config::GitlabSource::Webhook);
    let issuer = demo::DevIssuer::demo(&base).unwrap();
    let extra = issuer
        .router()
        .merge(demo::gitlab_webhooks(&config))
        .merge(demo::backends());
    let t = tabhub::start(listener, config, tabhub::commands::builtin(), extra)
        .await
        .unwrap();
    let token: Value = reqwest::Client::new()
        .post(format!("{base}/realms/demo/protocol/openid-connect/token"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", demo::CLIENT_ID),
            ("username", "alice"),
            ("password", "alice"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut tab = Client::connect(
        &support::ws_url(&t),
        token["access_token"].as_str().unwrap(),
    )
    .await;
    let mut topics = Vec::new();
    for p in demo::DEMO_PROJECTS {
        for kind in demo::webhooks::KINDS {
            topics.push(format!("/project/{p}/{kind}"));
        }
    }
    tab.send("setSubscriptions", json!({ "topics": topics }), None)
        .await;
    let r = tab.recv_type("subscriptions").await;
    assert_eq!(r["data"]["failed"], json!([]), "{r}");
    // The fixture GitLab posts every 1-2 s, kinds in turn: two events, two kinds, each with its project's id.
    let mut kinds = BTreeSet::new();
    while kinds.len() < 2 {
        let e = tab.recv_type("event").await;
        let d = &e["data"];
        assert!(d["id"].as_str().unwrap().parse::<u64>().is_ok(), "{e}");
        assert_eq!(d["payload"]["object_kind"], d["eventType"], "{e}");
        kinds.insert(d["eventType"].as_str().unwrap().to_owned());
    }
}
