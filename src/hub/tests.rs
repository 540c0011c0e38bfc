//! The hub, the session and the loop runner with fake tabs (their queues read directly, no socket) and paused
//! tokio time: timing is exact and the tests take milliseconds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tabhub_commands::{Cadence, LoopError, LoopFunction, Notification, User};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::Hub;
use crate::auth::Verified;
use crate::clock::now_unix;
use crate::config::Config;
use crate::protocol;
use crate::services::Services;
use crate::session::{AttachError, Session};
use crate::tab::{Outbox, Tab};

fn services(tune: impl FnOnce(&mut Config)) -> Arc<Services> {
    let mut c = Config::default();
    tune(&mut c);
    Services::new(c).expect("services")
}

fn token(user: &str) -> Verified {
    Verified {
        user: User {
            id: user.into(),
            name: user.into(),
        },
        exp: now_unix() + 3_600,
        sid: None,
        azp: None,
        token: Arc::from(format!("token-of-{user}")),
        login: None,
        anonymous: false,
    }
}

struct FakeTab {
    tab: Arc<Tab>,
    outbox: Outbox,
}

impl FakeTab {
    fn new(s: &Services, id: u64) -> FakeTab {
        let (tab, outbox) = Tab::new(
            id,
            None,
            crate::profile::Profile::Tabhub,
            256,
            1 << 20,
            s.metrics.clone(),
        );
        FakeTab { tab, outbox }
    }

    /// The `type` of every message queued since the last call.
    fn kinds(&mut self) -> Vec<String> {
        self.messages()
            .iter()
            .map(|m| m["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn messages(&mut self) -> Vec<Value> {
        self.outbox.drain()
    }
}

fn greeting() -> Utf8Bytes {
    protocol::encode("init", &json!({"message": "hello"}), None)
}

fn join(hub: &Hub, user: &str, t: &FakeTab) -> Arc<Session> {
    hub.join(&token(user), &t.tab, greeting()).expect("join")
}

/// Lets spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// A loop function that counts its runs and sends `tick {n}`; `fail` makes chosen runs fail.
fn ticker(runs: Arc<AtomicU32>, fail: fn(u32) -> bool) -> LoopFunction {
    LoopFunction::new("ticker", Cadence::Short, move |_ctx| {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            if fail(n) {
                return Err(LoopError(format!("run {n} failed")));
            }
            Ok(vec![Notification::new("tick", json!({ "n": n }))])
        }
    })
}

#[tokio::test(start_paused = true)]
async fn all_tabs_of_a_user_share_one_session_that_lingers_then_stops() {
    let s = services(|c| c.session.linger_ms = 15_000);
    let hub = Hub::new(s.clone());
    let (a1, a2, b1) = (
        FakeTab::new(&s, 1),
        FakeTab::new(&s, 2),
        FakeTab::new(&s, 3),
    );
    let alice = join(&hub, "alice", &a1);
    assert!(Arc::ptr_eq(&alice, &join(&hub, "alice", &a2)));
    join(&hub, "bob", &b1);
    assert_eq!((hub.len(), alice.tab_count()), (2, 2));

    hub.leave(&alice, 1);
    hub.leave(&alice, 2);
    assert_eq!(alice.tab_count(), 0);
    tokio::time::sleep(Duration::from_millis(14_000)).await;
    assert!(
        hub.get("alice").is_some(),
        "a reload within the linger finds the session"
    );
    // A tab coming back within the linger keeps the session alive past the first timer.
    let a3 = FakeTab::new(&s, 4);
    assert!(Arc::ptr_eq(&alice, &join(&hub, "alice", &a3)));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(!alice.is_stopped());
    hub.leave(&alice, 4);
    tokio::time::sleep(Duration::from_millis(15_001)).await;
    settle().await;
    assert!(alice.is_stopped());
    assert!(hub.get("alice").is_none());
    assert_eq!(hub.len(), 1, "bob's session is untouched");
    // The next tab of alice starts a new session.
    let a5 = FakeTab::new(&s, 5);
    assert!(!Arc::ptr_eq(&alice, &join(&hub, "alice", &a5)));
}

#[tokio::test(start_paused = true)]
async fn a_tab_over_the_limit_is_refused_and_told_nothing() {
    let s = services(|c| c.limits.max_tabs_per_user = 2);
    let hub = Hub::new(s.clone());
    let mut tabs: Vec<FakeTab> = (1..=3).map(|i| FakeTab::new(&s, i)).collect();
    join(&hub, "alice", &tabs[0]);
    join(&hub, "alice", &tabs[1]);
    let refused = hub.join(&token("alice"), &tabs[2].tab, greeting());
    assert_eq!(refused.err(), Some(AttachError::TooManyTabs));
    assert_eq!(tabs[0].kinds(), ["init"]);
    assert!(tabs[2].kinds().is_empty(), "no greeting for a refused tab");
}

#[tokio::test(start_paused = true)]
async fn a_loop_runs_once_per_user_whatever_the_tabs_and_a_joining_tab_gets_its_snapshot() {
    let s = services(|c| c.session.short_interval_ms = 5_000);
    let hub = Hub::new(s.clone());
    let (mut a1, mut a2) = (FakeTab::new(&s, 1), FakeTab::new(&s, 2));
    let session = join(&hub, "alice", &a1);
    join(&hub, "alice", &a2);
    let runs = Arc::new(AtomicU32::new(0));
    assert!(session.register_loop(ticker(runs.clone(), |_| false)));
    assert!(
        !session.register_loop(ticker(runs.clone(), |_| false)),
        "a second tab asking registers nothing"
    );
    settle().await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the first iteration runs at once"
    );
    assert_eq!(a1.kinds(), ["init", "tick"]);
    assert_eq!(a2.kinds(), ["init", "tick"]);

    // The second iteration comes within 0.5-1.5 intervals (spread), then one per interval.
    tokio::time::sleep(Duration::from_millis(7_501)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    // A new tab gets the last notification at once, without a run.
    let mut a3 = FakeTab::new(&s, 3);
    join(&hub, "alice", &a3);
    let got = a3.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0]["type"].as_str(), got[1]["data"]["n"].as_u64()),
        (Some("init"), Some(3))
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(session.snapshot("ticker").map(|s| s.len()), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_failing_function_is_told_once_and_its_recovery_once() {
    let s = services(|c| c.session.short_interval_ms = 1_000);
    let hub = Hub::new(s.clone());
    let mut t = FakeTab::new(&s, 1);
    let session = join(&hub, "alice", &t);
    let runs = Arc::new(AtomicU32::new(0));
    session.register_loop(ticker(runs.clone(), |n| (2..=4).contains(&n)));
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(1_600)).await;
    }
    assert!(runs.load(Ordering::SeqCst) >= 6);
    let kinds = t.kinds();
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    assert_eq!((count("error"), count("recovered")), (1, 1), "{kinds:?}");
    let error = kinds.iter().position(|k| k == "error");
    let recovered = kinds.iter().position(|k| k == "recovered");
    assert!(error < recovered, "{kinds:?}");
    assert_eq!(s.metrics.loop_errors.get(&["ticker"]), 3.0);
}

#[tokio::test(start_paused = true)]
async fn hidden_tabs_slow_the_short_loop_and_a_visible_one_wakes_it() {
    let s = services(|c| {
        c.session.short_interval_ms = 5_000;
        c.session.hidden_interval_ms = 60_000;
    });
    let hub = Hub::new(s.clone());
    let t = FakeTab::new(&s, 1);
    let session = join(&hub, "alice", &t);
    session.set_hidden(&t.tab, true);
    let runs = Arc::new(AtomicU32::new(0));
    session.register_loop(ticker(runs.clone(), |_| false));
    settle().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(25_000)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "hidden: the next run is at least 30 s away"
    );
    session.set_hidden(&t.tab, false);
    settle().await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "becoming visible runs the loop at once"
    );

    // A visible tab joining a hidden one wakes the loop too.
    session.set_hidden(&t.tab, true);
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    let before = runs.load(Ordering::SeqCst);
    let visible = FakeTab::new(&s, 2);
    join(&hub, "alice", &visible);
    settle().await;
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_session_runs_no_loop_and_a_session_without_a_valid_token_calls_nothing() {
    let s = services(|c| {
        c.session.short_interval_ms = 1_000;
        c.session.linger_ms = 1_000;
    });
    let hub = Hub::new(s.clone());
    let t = FakeTab::new(&s, 1);
    let session = join(&hub, "alice", &t);
    let runs = Arc::new(AtomicU32::new(0));
    session.register_loop(ticker(runs.clone(), |_| false));
    settle().await;
    hub.leave(&session, 1);
    tokio::time::sleep(Duration::from_millis(1_001)).await;
    settle().await;
    assert!(session.is_stopped());
    let after_stop = runs.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    assert_eq!(runs.load(Ordering::SeqCst), after_stop);

    let expired = Verified {
        exp: now_unix() - 1,
        ..token("bob")
    };
    let b = FakeTab::new(&s, 2);
    let bob = hub.join(&expired, &b.tab, greeting()).expect("join");
    let bob_runs = Arc::new(AtomicU32::new(0));
    bob.register_loop(ticker(bob_runs.clone(), |_| false));
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    assert_eq!(bob_runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn stop_all_closes_every_tab_with_the_code() {
    let s = services(|_| {});
    let hub = Hub::new(s.clone());
    let (a, b) = (FakeTab::new(&s, 1), FakeTab::new(&s, 2));
    let alice = join(&hub, "alice", &a);
    join(&hub, "bob", &b);
    hub.stop_all(crate::close_codes::SERVICE_RESTART, "restart");
    assert!(alice.is_stopped() && hub.is_empty());
    for t in [&a, &b] {
        assert_eq!(t.tab.close_request().map(|(c, _)| c.code), Some(1012));
    }
    assert_eq!(s.metrics.sessions.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn commands_wake_a_loop_at_most_once_per_interval() {
    let s = services(|c| {
        c.session.short_interval_ms = 5_000;
        c.session.hidden_interval_ms = 60_000;
    });
    let hub = Hub::new(s.clone());
    let t = FakeTab::new(&s, 1);
    let session = join(&hub, "alice", &t);
    let runs = Arc::new(AtomicU32::new(0));
    session.register_loop(ticker(runs.clone(), |_| false));
    settle().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Forty wakes within one interval: re-adding ids and toggling visibility, as fast as the rate limit allows.
    for _ in 0..20 {
        session.run_loop_now("ticker");
        session.set_hidden(&t.tab, true);
        session.set_hidden(&t.tab, false);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one early run, not forty");
    // After an interval a command may wake it again (half a second past the regular tick at 5 s, so that the two
    // never coincide).
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let before = runs.load(Ordering::SeqCst);
    session.run_loop_now("ticker");
    settle().await;
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
}
