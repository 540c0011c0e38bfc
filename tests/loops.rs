//! The Renku loop functions over real sockets, against the fixture gateway (`tabhub_fixtures::gateway`), which counts
//! calls per user (and notes their times) and can be told to change, slow down or fail.
//!
//! "One call per tick" is checked against the engine's own count of iterations
//! (`tabhub_loop_iterations_total{function}`): a function makes at most one call per iteration, so the gateway's
//! count may never exceed the iterations (plus the one in flight). That commands and joining tabs add no iteration
//! is checked against the number of ticks since the start, an upper bound that a busy machine can only make looser
//! (it delays ticks, never advances them). Waits are for a number of iterations, each bounded by `support::WAIT`;
//! the few bounds that involve time are loose on purpose.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::gateway::{Endpoint, Gateway};
use support::keycloak::sub_of;
use support::{Client, Keycloak, TokenSpec};
use tabhub::config::Config;
use tabhub::Running;

const V1: &str = "sessionStatus";
const V2: &str = "sessionStatusV2";
const KG: &str = "kgActivation";
const VERSION: &str = "uiVersion";

/// A tabhub whose `gateway` backend is the fixture at `gw`.
fn config(kc: &Keycloak, gw: SocketAddr) -> Config {
    let mut c = support::config(kc);
    c.backends.insert("gateway".into(), format!("http://{gw}"));
    c
}

struct Setup {
    kc: Keycloak,
    gw: Gateway,
    t: Running,
    /// When the server started, and its short interval: no function can have run more often than that.
    started: Instant,
    short: Duration,
}

impl Setup {
    async fn new() -> Setup {
        Setup::with(|_| {}).await
    }

    async fn with(tweak: impl FnOnce(&mut Config)) -> Setup {
        let kc = Keycloak::start().await;
        let (gw, addr) = support::gateway::start().await;
        let mut c = config(&kc, addr);
        tweak(&mut c);
        let short = Duration::from_millis(c.session.short_interval_ms);
        let started = Instant::now();
        let t = support::start(c, tabhub::commands::builtin()).await;
        Setup {
            kc,
            gw,
            t,
            started,
            short,
        }
    }

    async fn tab(&self, user: &str) -> Client {
        Client::connect(
            &support::ws_url(&self.t),
            &self.kc.mint(&TokenSpec::user(user)),
        )
        .await
    }

    /// Iterations the engine has run of `function`, for every user together.
    fn iterations(&self, function: &str) -> u64 {
        self.t.app().metrics.loop_iterations.get(&[function]) as u64
    }

    /// Waits until `n` more iterations of `function` have run. The engine counts an iteration just before it
    /// sends its messages, so waiting for one more than needed makes sure the messages of the `n`th are queued.
    async fn ticks(&self, function: &str, n: u64) {
        let target = self.iterations(function) + n + 1;
        support::eventually(&format!("{n} iterations of {function}"), || {
            self.iterations(function) >= target
        })
        .await;
    }

    /// A function makes at most one call per iteration: the calls never outnumber the iterations, plus the one
    /// that may be in flight.
    fn assert_one_call_per_iteration(&self, endpoint: Endpoint, function: &str) {
        let calls = self.gw.total_calls(endpoint);
        let iterations = self.iterations(function);
        assert!(
            calls <= iterations + 1,
            "{calls} calls to {endpoint:?} for {iterations} iterations of {function}"
        );
    }

    /// No more calls to `endpoint` than short-loop ticks since the start: the first iteration at once, the second
    /// after at least half an interval, then one per interval. Commands and joining tabs add none. (A busy machine
    /// only makes ticks later, never earlier, so this bound is safe.)
    fn assert_paced(&self, endpoint: Endpoint) {
        let elapsed = self.started.elapsed();
        let ticks = (elapsed.as_secs_f64() / self.short.as_secs_f64()) as u64 + 2;
        let calls = self.gw.total_calls(endpoint);
        assert!(
            calls <= ticks,
            "{calls} calls to {endpoint:?} in {elapsed:?}: at most {ticks} ticks of {:?}",
            self.short
        );
    }
}

/// Asserts that the next message is `kind` (whatever else the test expects of it is checked by the caller).
async fn expect(c: &mut Client, kind: &str) -> Value {
    let m = c.recv().await;
    assert_eq!(m["type"], kind, "expected {kind}, got {m}");
    m
}

/// Sends `visibility {hidden}` and waits for the command to be handled (commands of a tab run in order).
async fn set_hidden(c: &mut Client, hidden: bool) {
    c.send("visibility", json!({ "hidden": hidden }), None)
        .await;
    c.send("ping", json!({}), Some(json!("after-visibility")))
        .await;
    let ack = expect(c, "ack").await;
    assert_eq!(ack["id"], "after-visibility");
}

fn with_v2_state(mut body: Value, state: &str) -> Value {
    body[0]["status"]["state"] = json!(state);
    body
}

// ---- sessions ----

#[tokio::test]
async fn one_sessions_call_per_tick_whatever_the_number_of_tabs() {
    for n in [1usize, 2, 10] {
        let s = Setup::with(|c| c.session.short_interval_ms = 1_000).await;
        let mut tabs = Vec::new();
        for _ in 0..n {
            tabs.push(s.tab("alice").await);
        }
        tabs[0].send("pullSessionStatusV2", json!({}), None).await;
        for t in tabs.iter_mut() {
            let m = expect(t, V2).await;
            assert_eq!(m["data"], json!({"message": "true"}));
            assert!(m.get("id").is_none(), "a loop's message is not a reply");
        }
        // Every other tab asks too, as each Renku tab does: each gets the state at once, no tab causes a call.
        for (i, t) in tabs.iter_mut().enumerate().skip(1) {
            t.send("pullSessionStatusV2", json!({}), Some(json!(i)))
                .await;
            let m = expect(t, V2).await;
            assert_eq!(m["id"], i);
        }
        s.ticks(V2, 3).await;
        s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
        s.assert_paced(Endpoint::SessionsV2);
        let alice = sub_of("alice");
        let calls = s.gw.calls(Endpoint::SessionsV2, &alice);
        assert!(calls >= 3, "{n} tabs: the loop ran ({calls} calls)");
        assert_eq!(
            calls,
            s.gw.total_calls(Endpoint::SessionsV2),
            "only as alice"
        );
        assert_eq!(s.gw.max_in_flight(Endpoint::SessionsV2, &alice), 1);
        assert_eq!(
            s.gw.total_calls(Endpoint::Sessions),
            0,
            "v1 is not polled unless asked"
        );
        for t in tabs.iter_mut() {
            t.expect_silence(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn sends_once_per_change_and_nothing_while_unchanged() {
    let s = Setup::new().await;
    let alice = sub_of("alice");
    let mut a = s.tab("alice").await;
    let mut b = s.tab("alice").await;
    a.send("pullSessionStatusV2", json!({}), None).await;
    expect(&mut a, V2).await;
    expect(&mut b, V2).await;

    s.ticks(V2, 4).await;
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(100)).await;

    // Volatile fields, key order and the order of the list do not count as changes.
    let mut body = tabhub_fixtures::gateway::sessions_v2_fixture();
    body[0]["resources"]["usage"]["cpu"] = json!(0.93);
    body[0]["status"]["will_hibernate_at"] = json!("2026-02-01T00:00:00Z");
    body.as_array_mut().unwrap().reverse();
    s.gw.set_sessions_v2(&alice, body);
    s.ticks(V2, 4).await;
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(100)).await;

    // A real change: exactly one message to each tab, then silence again.
    s.gw.set_sessions_v2(
        &alice,
        with_v2_state(tabhub_fixtures::gateway::sessions_v2_fixture(), "stopping"),
    );
    for t in [&mut a, &mut b] {
        let m = expect(t, V2).await;
        assert_eq!(m["data"], json!({"message": "true"}));
    }
    s.ticks(V2, 4).await;
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(100)).await;

    // Another user's change is not alice's.
    s.gw.set_sessions_v2(
        &sub_of("bob"),
        with_v2_state(tabhub_fixtures::gateway::sessions_v2_fixture(), "failed"),
    );
    s.ticks(V2, 3).await;
    a.expect_silence(Duration::from_millis(200)).await;
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
}

#[tokio::test]
async fn pull_session_status_polls_the_notebooks_api() {
    let s = Setup::new().await;
    let alice = sub_of("alice");
    let mut a = s.tab("alice").await;
    a.send("pullSessionStatus", json!({}), None).await;
    assert_eq!(expect(&mut a, V1).await["data"]["message"], "true");
    s.ticks(V1, 3).await;
    a.expect_silence(Duration::from_millis(200)).await;

    let mut body = tabhub_fixtures::gateway::sessions_fixture();
    let first = body["servers"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    first["resources"]["usage"]["cpu"] = json!(0.5);
    first["annotations"]["renku.io/lastActivityDate"] = json!("2026-03-01T00:00:00Z");
    s.gw.set_sessions(&alice, body.clone());
    s.ticks(V1, 3).await;
    a.expect_silence(Duration::from_millis(200)).await;

    body["servers"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap()["status"]["state"] = json!("stopping");
    s.gw.set_sessions(&alice, body);
    expect(&mut a, V1).await;
    s.ticks(V1, 3).await;
    a.expect_silence(Duration::from_millis(200)).await;
    s.assert_one_call_per_iteration(Endpoint::Sessions, V1);
    assert_eq!(s.gw.total_calls(Endpoint::SessionsV2), 0);
}

#[tokio::test]
async fn pull_forces_one_send_to_the_asking_tab_without_a_backend_call() {
    let s = Setup::with(|c| {
        // Few ticks during the test, so that a call made by the command could not hide among them.
        c.session.short_interval_ms = 2_000;
        c.session.loop_timeout_ms = 1_000;
        c.backend.timeout_ms = 1_000;
    })
    .await;
    let mut a = s.tab("alice").await;
    let mut b = s.tab("alice").await;
    a.send("pullSessionStatusV2", json!({}), None).await;
    expect(&mut a, V2).await;
    expect(&mut b, V2).await;
    // Three requests in a row: three replies, and at most the one natural tick in the meantime (a 2 s interval).
    let calls = s.gw.total_calls(Endpoint::SessionsV2);
    for i in 0..3 {
        a.send(
            "pullSessionStatusV2",
            json!({}),
            Some(json!(format!("again-{i}"))),
        )
        .await;
        let m = expect(&mut a, V2).await;
        assert_eq!(m["id"], format!("again-{i}"));
        assert_eq!(m["data"], json!({"message": "true"}));
    }
    b.expect_silence(Duration::from_millis(300)).await;
    a.expect_silence(Duration::from_millis(100)).await;
    let extra = s.gw.total_calls(Endpoint::SessionsV2) - calls;
    assert!(
        extra <= 1,
        "{extra} calls while three tabs' requests were answered"
    );
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
    s.assert_paced(Endpoint::SessionsV2);
}

#[tokio::test]
async fn a_burst_of_joining_tabs_gets_the_snapshot_without_backend_calls() {
    let s = Setup::with(|c| c.session.short_interval_ms = 1_500).await;
    let mut a = s.tab("alice").await;
    a.send("pullSessionStatusV2", json!({}), None).await;
    expect(&mut a, V2).await;
    let url = support::ws_url(&s.t);
    let token = s.kc.token("alice");
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move {
                let mut c = Client::connect(&url, &token).await;
                // The snapshot comes right after init, before anything is asked.
                let m = c.recv().await;
                assert_eq!(m["type"], V2, "{m}");
                assert!(m.get("id").is_none());
                // Asking, as a reloaded Renku tab does, gets the state again, still without a call.
                c.send("pullSessionStatusV2", json!({}), Some(json!(i)))
                    .await;
                let m = c.recv().await;
                assert_eq!((m["type"].as_str(), m["id"].as_i64()), (Some(V2), Some(i)));
                c
            })
        })
        .collect();
    let mut tabs = Vec::new();
    for h in burst {
        tabs.push(h.await.unwrap());
    }
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
    s.assert_paced(Endpoint::SessionsV2);
    s.ticks(V2, 2).await;
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
    s.assert_paced(Endpoint::SessionsV2);
    assert_eq!(
        s.gw.max_in_flight(Endpoint::SessionsV2, &sub_of("alice")),
        1
    );
    for c in tabs.iter_mut() {
        c.expect_silence(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failing_backend_reports_one_error_and_one_recovery() {
    let s = Setup::new().await;
    let alice = sub_of("alice");
    let mut a = s.tab("alice").await;
    let mut b = s.tab("alice").await;
    a.send("pullSessionStatusV2", json!({}), None).await;
    expect(&mut a, V2).await;
    expect(&mut b, V2).await;

    s.gw.set_failure(Endpoint::SessionsV2, Some(503));
    for t in [&mut a, &mut b] {
        let e = expect(t, "error").await;
        assert_eq!(e["data"]["function"], V2);
        assert!(
            e["data"]["message"].as_str().unwrap().contains("503"),
            "{e}"
        );
    }
    let errors_before = s.t.app().metrics.loop_errors.get(&[V2]);
    s.ticks(V2, 6).await;
    assert!(
        s.t.app().metrics.loop_errors.get(&[V2]) >= errors_before + 5.0,
        "still failing at every tick"
    );
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(100)).await;

    // Recovery with the same sessions as before the failure: `recovered` once, and no sessionStatusV2.
    s.gw.set_failure(Endpoint::SessionsV2, None);
    for t in [&mut a, &mut b] {
        let r = expect(t, "recovered").await;
        assert_eq!(r["data"]["function"], V2);
    }
    s.ticks(V2, 4).await;
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(100)).await;

    s.gw.set_sessions_v2(
        &alice,
        with_v2_state(tabhub_fixtures::gateway::sessions_v2_fixture(), "starting"),
    );
    expect(&mut a, V2).await;
    expect(&mut b, V2).await;
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
}

#[tokio::test]
async fn a_backend_slower_than_the_interval_never_gets_overlapping_calls() {
    let s = Setup::new().await;
    let alice = sub_of("alice");
    // Three intervals (400 ms) per answer: every call times out (300 ms) and the next starts only after.
    s.gw.set_delay(Endpoint::SessionsV2, Duration::from_millis(1_200));
    let mut a = s.tab("alice").await;
    a.send("pullSessionStatusV2", json!({}), None).await;
    let e = expect(&mut a, "error").await;
    assert_eq!(e["data"]["function"], V2);
    s.ticks(V2, 6).await;
    assert_eq!(
        s.gw.max_in_flight(Endpoint::SessionsV2, &alice),
        1,
        "never two calls at once"
    );
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
    a.expect_silence(Duration::from_millis(100)).await;

    s.gw.set_delay(Endpoint::SessionsV2, Duration::ZERO);
    expect(&mut a, "recovered").await;
    // The first answer ever: sent.
    expect(&mut a, V2).await;
    assert_eq!(s.gw.max_in_flight(Endpoint::SessionsV2, &alice), 1);
}

#[tokio::test]
async fn a_refused_token_is_reported_once_and_a_fresh_one_recovers() {
    let s = Setup::new().await;
    let mut a = s.tab("alice").await;
    a.send("pullSessionStatusV2", json!({}), None).await;
    expect(&mut a, V2).await;
    // The gateway refuses the token: the engine retries only with a newer token, and there is none.
    s.gw.set_failure(Endpoint::SessionsV2, Some(401));
    let e = expect(&mut a, "error").await;
    assert_eq!(e["data"]["function"], V2);
    assert!(
        e["data"]["message"].as_str().unwrap().contains("401"),
        "{e}"
    );
    s.ticks(V2, 4).await;
    a.expect_silence(Duration::from_millis(200)).await;
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);

    let fresh = s.kc.mint(&TokenSpec::user("alice").exp_in(900));
    a.send(
        "authenticate",
        json!({ "token": fresh }),
        Some(json!("auth")),
    )
    .await;
    assert_eq!(expect(&mut a, "authenticated").await["id"], "auth");
    s.gw.set_failure(Endpoint::SessionsV2, None);
    expect(&mut a, "recovered").await;
    s.ticks(V2, 2).await;
    a.expect_silence(Duration::from_millis(200)).await;
}

// ---- tick phases ----

/// Sessions that start together do not call the backends together ever after (src/loops.rs): the first iteration
/// runs at once, the second after a random 0.5-1.5 intervals, then one every interval. Twelve users start the
/// sessions loop back to back; the gateway's arrival times of each user's first three calls tell the phases.
///
/// The bounds are loose for a busy machine: an offset is measured between two arrivals at the gateway, so it only
/// moves by the difference of two calls' latencies (a delayed wake-up delays the iteration's start, from which the
/// next tick is counted, too). The spread check is random: with 12 offsets uniform over one interval, all of them
/// fall within 0.2 interval with probability 12*0.2^11 - 11*0.2^12 (range of 12 uniforms), about 2e-7.
#[tokio::test]
async fn sessions_started_together_spread_their_ticks() {
    let s = Setup::with(|c| c.session.short_interval_ms = 1_000).await;
    let interval = s.short.as_secs_f64();
    let users: Vec<String> = (0..12).map(|i| format!("phase-{i}")).collect();
    let mut tabs = Vec::new();
    for u in &users {
        tabs.push(s.tab(u).await);
    }
    for t in tabs.iter_mut() {
        t.send("pullSessionStatus", json!({}), None).await;
    }
    let subs: Vec<String> = users.iter().map(|u| sub_of(u)).collect();
    support::eventually("three sessions calls of every user", || {
        subs.iter()
            .all(|u| s.gw.call_times(Endpoint::Sessions, u).len() >= 3)
    })
    .await;

    // Offsets in intervals: of the 2nd call from the 1st, and of the 3rd from the 2nd.
    let (mut second, mut third) = (Vec::new(), Vec::new());
    for u in &subs {
        let t = s.gw.call_times(Endpoint::Sessions, u);
        second.push((t[1] - t[0]).as_secs_f64() / interval);
        third.push((t[2] - t[1]).as_secs_f64() / interval);
    }
    for (u, off) in users.iter().zip(&second) {
        assert!(
            (0.4..=1.8).contains(off),
            "{u}: 2nd call {off:.2} intervals after the 1st, not within 0.5-1.5 (all: {second:.2?})"
        );
    }
    let min = second.iter().copied().fold(f64::INFINITY, f64::min);
    let max = second.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert!(
        max - min > 0.2,
        "the 2nd calls are not spread: {second:.2?} intervals after the 1st"
    );
    for (u, off) in users.iter().zip(&third) {
        assert!(
            (0.7..=1.6).contains(off),
            "{u}: 3rd call {off:.2} intervals after the 2nd, not about one (all: {third:.2?})"
        );
    }
}

// ---- hidden tabs ----

#[tokio::test]
async fn hidden_tabs_slow_the_loop_and_a_visible_one_restores_it() {
    let s = Setup::with(|c| c.session.hidden_interval_ms = 6_000).await;
    let mut a = s.tab("alice").await;
    let mut b = s.tab("alice").await;
    a.send("visibility", json!({}), Some(json!("bad"))).await;
    let e = expect(&mut a, "error").await;
    assert!(
        e["data"]["message"].as_str().unwrap().contains("hidden"),
        "{e}"
    );
    a.send("pullSessionStatusV2", json!({}), None).await;
    expect(&mut a, V2).await;
    expect(&mut b, V2).await;

    // One hidden tab of two: the loop keeps its pace.
    set_hidden(&mut a, true).await;
    s.ticks(V2, 3).await;

    // Every tab hidden: after the tick already planned, nothing for a while (the hidden interval is 6 s).
    set_hidden(&mut b, true).await;
    s.ticks(V2, 1).await;
    let hidden_from = s.iterations(V2);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let hidden_ran = s.iterations(V2) - hidden_from;
    assert!(
        hidden_ran <= 1,
        "{hidden_ran} iterations in 2.5 s while hidden"
    );

    // One tab visible again: an iteration at once (long before the 6 s hidden interval), then the short pace.
    let before = s.iterations(V2);
    set_hidden(&mut b, false).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2_500);
    while s.iterations(V2) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no iteration right after a tab became visible"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.ticks(V2, 4).await;
    s.assert_one_call_per_iteration(Endpoint::SessionsV2, V2);
    a.expect_silence(Duration::from_millis(100)).await;
    b.expect_silence(Duration::from_millis(100)).await;
}

// ---- UI version ----

#[tokio::test]
async fn the_ui_version_url_is_fetched_once_per_interval_for_all_users() {
    let kc = Keycloak::start().await;
    let (gw, addr) = support::gateway::start().await;
    let mut c = config(&kc, addr);
    c.session.long_interval_ms = 1_000;
    c.commands.insert(
        "ui_version_url".into(),
        toml::Value::String(format!("http://{addr}/ui-version")),
    );
    gw.set_version("3.40.0");
    let t = support::start(c, tabhub::commands::builtin()).await;
    let started = std::time::Instant::now();
    let url = support::ws_url(&t);
    let mut tabs = Vec::new();
    for user in ["ann", "ben", "cyd", "dee", "eve"] {
        for _ in 0..2 {
            tabs.push(Client::connect(&url, &kc.token(user)).await);
        }
    }
    for (i, tab) in tabs.iter_mut().enumerate() {
        tab.send(
            "init",
            json!({"requestServerVersion": true}),
            Some(json!(i)),
        )
        .await;
        let v = expect(tab, "version").await;
        assert_eq!(v["id"], i);
        assert_eq!(v["data"]["version"], "3.40.0");
    }
    let windows = |started: std::time::Instant| started.elapsed().as_millis() as u64 / 1_000 + 1;
    let calls = gw.total_calls(Endpoint::UiVersion);
    assert!(
        calls <= windows(started),
        "{calls} fetches for 5 users in {} interval(s)",
        windows(started)
    );
    assert_eq!(
        gw.calls(Endpoint::UiVersion, tabhub_fixtures::gateway::ANONYMOUS),
        calls,
        "fetched without the users' tokens"
    );

    gw.set_version("3.41.0");
    for tab in tabs.iter_mut() {
        let v = tab.recv_type("version").await;
        assert_eq!(v["data"], json!({"version": "3.41.0"}));
    }
    // Five users' loops ran several times; the document was fetched at most once per interval (plus one for
    // the interval in progress).
    let runs = t.app().metrics.loop_iterations.get(&[VERSION]) as u64;
    assert!(runs >= 10, "{runs} iterations");
    let calls = gw.total_calls(Endpoint::UiVersion);
    assert!(
        calls <= windows(started) + 1,
        "{calls} fetches in {} interval(s) for {runs} iterations",
        windows(started)
    );
}

// ---- KG activation ----

/// Reads `activation` messages until `done` holds for the latest progress of every project seen (later values
/// replace earlier ones); returns every message read.
async fn activations_until(
    c: &mut Client,
    latest: &mut BTreeMap<String, i64>,
    done: impl Fn(&BTreeMap<String, i64>) -> bool,
) -> Vec<Value> {
    let mut got = Vec::new();
    while !done(latest) {
        let m = expect(c, "activation").await;
        let projects = m["data"]["projects"].as_object().expect("projects map");
        // Renku's client parses `message`: the same map, as a string.
        let parsed: Value = serde_json::from_str(m["data"]["message"].as_str().unwrap()).unwrap();
        assert_eq!(&parsed, &m["data"]["projects"]);
        for (id, v) in projects {
            latest.insert(id.clone(), v.as_i64().expect("whole percentages"));
        }
        got.push(m);
    }
    got
}

#[tokio::test]
async fn kg_progress_is_sent_on_change_and_a_project_ends_at_100() {
    let s = Setup::new().await;
    let alice = sub_of("alice");
    s.gw.set_kg("1", 0.0);
    let mut a = s.tab("alice").await;
    // Project 2 is not known to the KG yet (404): it stays tracked without a value.
    a.send(
        "pullKgActivationStatus",
        json!({"projects": [1, "2"]}),
        None,
    )
    .await;
    let m = expect(&mut a, "activation").await;
    assert_eq!(m["data"]["projects"], json!({"1": 0}));
    assert_eq!(m["data"]["message"], r#"{"1":0}"#);
    s.ticks(KG, 3).await;
    a.expect_silence(Duration::from_millis(200)).await;

    s.gw.set_kg("1", 40.0);
    let m = expect(&mut a, "activation").await;
    assert_eq!(m["data"]["projects"], json!({"1": 40}));
    s.gw.set_kg("2", 10.0);
    let m = expect(&mut a, "activation").await;
    assert_eq!(m["data"]["projects"], json!({"1": 40, "2": 10}));
    s.ticks(KG, 3).await;
    a.expect_silence(Duration::from_millis(200)).await;

    // A new tab gets the last picture at once.
    let mut b = s.tab("alice").await;
    let m = expect(&mut b, "activation").await;
    assert_eq!(m["data"]["projects"], json!({"1": 40, "2": 10}));

    // 100 is told once, then the project is no longer polled.
    s.gw.set_kg("1", 100.0);
    for t in [&mut a, &mut b] {
        let m = expect(t, "activation").await;
        assert_eq!(m["data"]["projects"], json!({"1": 100, "2": 10}));
    }
    let polled = s.gw.kg_calls("1");
    s.gw.set_kg("2", 30.0);
    for t in [&mut a, &mut b] {
        let m = expect(t, "activation").await;
        assert_eq!(m["data"]["projects"], json!({"2": 30}));
    }
    s.ticks(KG, 3).await;
    assert_eq!(s.gw.kg_calls("1"), polled, "a finished project is dropped");
    assert!(s.gw.kg_calls("2") > polled, "the other one is still polled");
    assert!(s.gw.max_in_flight(Endpoint::KgStatus, &alice) <= 5);
    a.expect_silence(Duration::from_millis(100)).await;
    b.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn kg_requests_merge_and_poll_at_most_five_at_a_time() {
    let s = Setup::with(|c| {
        c.session.short_interval_ms = 1_500;
        c.session.loop_timeout_ms = 1_200;
        c.backend.timeout_ms = 1_000;
    })
    .await;
    let alice = sub_of("alice");
    for id in 1..=12 {
        s.gw.set_kg(&id.to_string(), 10.0);
    }
    s.gw.set_delay(Endpoint::KgStatus, Duration::from_millis(40));
    let mut a = s.tab("alice").await;
    let mut b = s.tab("alice").await;
    a.send(
        "pullKgActivationStatus",
        json!({"projects": [1, 2, 3, 4, 5, 6]}),
        None,
    )
    .await;
    let m = expect(&mut a, "activation").await;
    assert_eq!(m["data"]["projects"].as_object().unwrap().len(), 6);
    expect(&mut b, "activation").await;
    let calls_6 = s.gw.kg_calls("6");

    // Another tab adds projects, some already tracked: they join the same loop at once, without waiting for the
    // (long) tick, and the tracked ones are not started over.
    b.send(
        "pullKgActivationStatus",
        json!({"projects": [5, 6, 7, 8, 9, 10, 11, 12]}),
        None,
    )
    .await;
    let m = expect(&mut b, "activation").await;
    let all: BTreeMap<String, i64> = m["data"]["projects"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
        .collect();
    assert_eq!(all.len(), 12, "{all:?}");
    assert!(all.values().all(|v| *v == 10));
    expect(&mut a, "activation").await;
    assert_eq!(
        s.gw.kg_calls("6"),
        calls_6 + 1,
        "one poll per project per iteration"
    );
    let max = s.gw.max_in_flight(Endpoint::KgStatus, &alice);
    assert!((1..=5).contains(&max), "{max} polls at once");
    // Asking again for tracked projects changes nothing and costs nothing: at most the 12 polls of one natural
    // tick (the interval is 1.5 s) while the requests are handled.
    let calls = s.gw.total_calls(Endpoint::KgStatus);
    for _ in 0..3 {
        a.send("pullKgActivationStatus", json!({"projects": [1, 12]}), None)
            .await;
        a.send("ping", json!({}), None).await;
        expect(&mut a, "ack").await;
    }
    a.expect_silence(Duration::from_millis(200)).await;
    let extra = s.gw.total_calls(Endpoint::KgStatus) - calls;
    assert!(
        extra <= 12,
        "{extra} polls for requests of tracked projects"
    );
}

#[tokio::test]
async fn kg_stalled_and_failing_projects_get_renku_values_once() {
    let s = Setup::with(|c| {
        c.commands
            .insert("kg_stale_after_ms".into(), toml::Value::Integer(1_500));
        c.commands
            .insert("kg_max_projects".into(), toml::Value::String("5".into()));
    })
    .await;
    s.gw.set_kg_status("8", 403);
    s.gw.set_kg_status("9", 500);
    s.gw.set_kg("10", 30.0);
    let mut a = s.tab("alice").await;
    // 7: unknown to the KG (404) until it stalls; 8 and 9: errors; 10: no progress until it stalls.
    a.send(
        "pullKgActivationStatus",
        json!({"projects": [7, 8, 9, 10]}),
        None,
    )
    .await;
    let mut latest = BTreeMap::new();
    let msgs = activations_until(&mut a, &mut latest, |l| {
        ["7", "8", "9", "10"]
            .iter()
            .all(|id| l.get(*id).is_some_and(|v| *v < 0))
    })
    .await;
    let want: BTreeMap<String, i64> = [("7", -408), ("8", -2), ("9", -2), ("10", -408)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(latest, want);
    // Each final value in exactly one message.
    for (id, v) in &want {
        let n = msgs
            .iter()
            .filter(|m| m["data"]["projects"][id] == json!(v))
            .count();
        assert_eq!(n, 1, "{id} -> {v} told {n} times");
    }
    // A failing project is dropped at once; none of them is polled any more.
    assert_eq!(s.gw.kg_calls("8"), 1);
    assert_eq!(s.gw.kg_calls("9"), 1);
    let polled: Vec<u64> = ["7", "10"].iter().map(|id| s.gw.kg_calls(id)).collect();
    s.ticks(KG, 3).await;
    assert_eq!(
        ["7", "10"]
            .iter()
            .map(|id| s.gw.kg_calls(id))
            .collect::<Vec<_>>(),
        polled
    );
    a.expect_silence(Duration::from_millis(200)).await;

    // Bad ids are refused before anything is tracked.
    a.send(
        "pullKgActivationStatus",
        json!({"projects": ["../admin"]}),
        Some(json!("bad")),
    )
    .await;
    let e = expect(&mut a, "error").await;
    assert_eq!(e["id"], "bad");
    assert!(e["data"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid project id"));
    // A user cannot grow the tracked set without bound (kg_max_projects = 5).
    a.send(
        "pullKgActivationStatus",
        json!({"projects": [11, 12, 13, 14, 15, 16]}),
        Some(json!("many")),
    )
    .await;
    let e = expect(&mut a, "error").await;
    assert!(e["data"]["message"].as_str().unwrap().contains("at most 5"));
    s.ticks(KG, 2).await;
    assert_eq!(s.gw.kg_calls("11"), 0, "nothing was added");
}

#[tokio::test]
async fn a_visible_tab_joining_hidden_ones_restores_the_pace() {
    let s = Setup::with(|c| c.session.hidden_interval_ms = 6_000).await;
    let mut a = s.tab("alice").await;
    a.send("pullSessionStatusV2", json!({}), None).await;
    expect(&mut a, V2).await;
    set_hidden(&mut a, true).await;
    s.ticks(V2, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A new tab is visible: the user looks again, so the loop should run at once, as when a tab says so.
    let before = s.iterations(V2);
    let mut b = s.tab("alice").await;
    expect(&mut b, V2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2_500);
    while s.iterations(V2) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no iteration after a visible tab joined a user whose tabs were all hidden"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
