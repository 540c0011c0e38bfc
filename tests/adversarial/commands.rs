//! Hostile commands: a handler or a loop function that panics, a peer's multi-byte strings where an id belongs,
//! frames that break the protocol. None of them may leak a tab, a session or a connection slot.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tabhub::commands::{
    Cadence, Command, CommandError, Context, LoopFunction, NoParams, Notification,
};

use crate::support::{self, Client, Keycloak};

/// `boom {}`: a handler with a bug.
struct Boom;

impl Command for Boom {
    const NAME: &'static str = "boom";
    const DOC: &'static str = "Test: panics.";
    type Params = NoParams;

    async fn handle(&self, _: NoParams, _ctx: &dyn Context) -> Result<(), CommandError> {
        panic!("a bug in a command");
    }
}

/// `boomLoop {}`: registers a loop function that panics on its second run.
struct BoomLoop(Arc<AtomicU32>);

impl Command for BoomLoop {
    const NAME: &'static str = "boomLoop";
    const DOC: &'static str = "Test: a loop function with a bug.";
    type Params = NoParams;

    async fn handle(&self, _: NoParams, ctx: &dyn Context) -> Result<(), CommandError> {
        let runs = self.0.clone();
        ctx.register_loop(LoopFunction::new("boomLoop", Cadence::Short, move |_| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n == 2 {
                    panic!("a bug in a loop function");
                }
                Ok(vec![Notification::new("tick", json!({ "n": n }))])
            }
        }));
        Ok(())
    }
}

async fn start(kc: &Keycloak, runs: &Arc<AtomicU32>) -> tabhub::Running {
    let mut c = support::config(kc);
    c.session.linger_ms = 200;
    let mut r = tabhub::commands::builtin();
    r.register(Boom).register(BoomLoop(runs.clone()));
    support::start(c, r).await
}

fn metric(t: &tabhub::Running, line: &str) -> bool {
    t.app().metrics.render().lines().any(|l| l == line)
}

#[tokio::test]
async fn a_panicking_handler_answers_an_error_keeps_the_tab_and_leaks_nothing() {
    let kc = Keycloak::start().await;
    let t = start(&kc, &Arc::default()).await;
    let url = support::ws_url(&t);
    let mut tabs = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(&url, &kc.token("alice")).await;
        c.send("boom", json!({}), Some(json!(7))).await;
        let e = c.recv_type("error").await;
        assert_eq!(e["id"], 7);
        assert!(!e["data"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("bug"));
        // The tab reads on.
        c.send("ping", json!({}), Some(json!(8))).await;
        assert_eq!(c.recv_type("ack").await["id"], 8);
        tabs.push(c);
    }
    assert!(metric(
        &t,
        "tabhub_commands_total{command=\"boom\",outcome=\"panic\"} 20"
    ));
    for c in tabs {
        c.close().await;
    }
    // Every tab, its slot and the session are released.
    support::eventually("tabs released", || metric(&t, "tabhub_tabs 0")).await;
    let alice = support::keycloak::sub_of("alice");
    support::eventually("session stopped", || t.app().hub.get(&alice).is_none()).await;
}

#[tokio::test]
async fn multi_byte_project_ids_are_refused_not_panicked_on() {
    let kc = Keycloak::start().await;
    let t = start(&kc, &Arc::default()).await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    for id in ["é".repeat(40), "😀".repeat(70), "a\u{301}".repeat(50)] {
        c.send(
            "pullKgActivationStatus",
            json!({"projects": [id]}),
            Some(json!(1)),
        )
        .await;
        let e = c.recv_type("error").await;
        assert!(
            e["data"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("invalid project id"),
            "{e}"
        );
    }
    c.send("ping", json!({}), None).await;
    c.recv_type("ack").await;
    assert!(!t.app().metrics.render().contains("outcome=\"panic\""));
}

#[tokio::test]
async fn a_panicking_loop_function_is_told_once_and_keeps_running() {
    let kc = Keycloak::start().await;
    let runs = Arc::new(AtomicU32::new(0));
    let t = start(&kc, &runs).await;
    let mut c = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    c.send("boomLoop", json!({}), None).await;
    assert_eq!(c.recv_type("tick").await["data"]["n"], 1);
    let e = c.recv_type("error").await;
    assert_eq!(e["data"]["function"], "boomLoop");
    c.recv_type("recovered").await;
    assert_eq!(c.recv_type("tick").await["data"]["n"], 3);
}

/// A masked client frame (RFC 6455 5.2) with the given first byte and payload.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut out = vec![first, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[tokio::test]
async fn protocol_violations_close_with_their_rfc_codes_and_are_counted() {
    let kc = Keycloak::start().await;
    let t = start(&kc, &Arc::default()).await;
    let url = support::ws_url(&t);

    // A text frame that is not UTF-8: 1007.
    let mut c = Client::connect(&url, &kc.token("alice")).await;
    c.send_raw_bytes(&frame(0x81, b"{\"type\":\"\xff\xfe\"}"))
        .await;
    assert_eq!(c.closed_within(Duration::from_secs(5)).await.0, Some(1007));

    // An unmasked client frame: 1002.
    let mut c = Client::connect(&url, &kc.token("alice")).await;
    c.send_raw_bytes(&[0x81, 0x02, b'{', b'}']).await;
    assert_eq!(c.closed_within(Duration::from_secs(5)).await.0, Some(1002));

    // Reserved bits set: 1002.
    let mut c = Client::connect(&url, &kc.token("alice")).await;
    c.send_raw_bytes(&frame(0xF1, b"{}")).await;
    assert_eq!(c.closed_within(Duration::from_secs(5)).await.0, Some(1002));

    support::eventually("counted", || {
        metric(&t, "tabhub_closes_total{code=\"1007\"} 1")
            && metric(&t, "tabhub_closes_total{code=\"1002\"} 2")
    })
    .await;
    support::eventually("tabs released", || metric(&t, "tabhub_tabs 0")).await;
}
