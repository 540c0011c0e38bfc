//! Production behaviour: limits with their codes, slow tabs, metrics, and a graceful drain of a real process
//! signalled for real.

mod support;

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::client::Cred;
use support::{Client, Keycloak};

#[tokio::test]
async fn connection_and_per_user_tab_limits_have_their_codes() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.limits.max_connections = 3;
    c.limits.max_tabs_per_user = 2;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let _a1 = Client::connect(&url, &kc.token("alice")).await;
    let _a2 = Client::connect(&url, &kc.token("alice")).await;
    let mut a3 = Client::connect_with(&url, Cred::Header(&kc.token("alice")), None)
        .await
        .unwrap();
    let (code, msgs) = a3.closed().await;
    assert_eq!(code, Some(4029));
    // A refused tab is told why, and nothing else: no `init` first.
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs.iter().any(|m| m["data"]["tooManyTabs"] == true),
        "{msgs:?}"
    );
    let _b1 = Client::connect(&url, &kc.token("bob")).await;
    let mut over = Client::connect_with(&url, Cred::Header(&kc.token("erin")), None)
        .await
        .unwrap();
    let (code, msgs) = over.closed().await;
    assert_eq!(code, Some(1013));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs.iter().any(|m| m["data"]["overloaded"] == true),
        "{msgs:?}"
    );
}

#[tokio::test]
async fn command_flood_gets_errors_then_4008() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.limits.commands_per_second = 2.0;
    c.limits.commands_burst = 5.0;
    c.limits.rate_limit_strikes = 10;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let mut a = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    for i in 0..5 {
        a.send("ping", json!({}), Some(json!(i))).await;
    }
    for i in 0..5 {
        assert_eq!(a.recv().await["id"], i, "the burst is served");
    }
    a.send("ping", json!({}), None).await;
    let e = a.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["data"]["rateLimited"].as_bool()),
        (Some("error"), Some(true))
    );
    for _ in 0..20 {
        a.send("ping", json!({}), None).await;
    }
    let (code, _) = a.closed().await;
    assert_eq!(code, Some(4008), "persistent abuse closes the tab");
}

#[tokio::test]
async fn upgrades_per_address_are_rate_limited_with_429() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.limits.upgrades_per_second_per_address = 0.5;
    c.limits.upgrades_burst = 3.0;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    for _ in 0..3 {
        Client::connect(&url, &kc.token("alice")).await;
    }
    match Client::connect_with(&url, Cred::Header(&kc.token("alice")), None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            assert!(r.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
}

/// A websocket client whose socket has a tiny receive buffer and is never read.
async fn stalled_client(
    url: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.headers_mut()
        .insert("sec-websocket-protocol", "tabhub".parse().unwrap());
    tokio_tungstenite::client_async(req, stream)
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn a_tab_that_stops_reading_is_closed_and_slows_nobody() {
    let kc = Keycloak::start().await;
    let (gitlab, base) = support::gitlab(1_000).await;
    let mut c = support::config_with_gitlab(&kc, &base);
    c.websocket.outbound_queue_messages = 128;
    c.websocket.outbound_queue_bytes = 128 * 1024;
    c.websocket.write_timeout_ms = 500;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    let token = kc.token("alice");
    let mut reader = Client::connect(&url, &token).await;
    let mut other_user = Client::connect(&url, &kc.token("bob")).await;
    let stalled = stalled_client(&url, &token).await;
    // The stalled tab subscribes (its reply is never read), then never reads again.
    let mut stalled = stalled;
    {
        use futures_util::SinkExt;
        stalled
            .send(tokio_tungstenite::tungstenite::Message::text(
                json!({"type": "subscribe", "data": {"topic": "/project/1/push"}}).to_string(),
            ))
            .await
            .unwrap();
    }
    reader
        .send("subscribe", json!({"topic": "/project/1/push"}), None)
        .await;
    reader.recv_type("subscribed").await;
    other_user
        .send("subscribe", json!({"topic": "/project/1/push"}), None)
        .await;
    other_user.recv_type("subscribed").await;
    support::eventually("both of alice's tabs hold the topic", || {
        t.app()
            .hub
            .get(&support::keycloak::sub_of("alice"))
            .is_some_and(|s| s.tab_count() == 2)
    })
    .await;
    support::eventually("streams open", || gitlab.open_streams("1") == 2).await;

    // The feeder stays at most WINDOW events ahead of the slower reader, so the reading tabs' queues (128 KiB)
    // can never fill whatever the machine's load, and it feeds until the stalled tab is closed, so the test does
    // not depend on how much the kernel's socket buffers absorb before the stalled socket blocks.
    const WINDOW: u64 = 16;
    const CAP: u64 = 200_000;
    let payload = json!({"blob": "x".repeat(2_000)});
    let progress: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let last = Arc::new(AtomicU64::new(0));
    let stalled_closed = {
        let app = t.app().clone();
        move || {
            app.hub
                .get(&support::keycloak::sub_of("alice"))
                .is_some_and(|s| s.tab_count() == 1)
        }
    };
    let feeder = {
        let (gitlab, progress, last, stalled_closed) = (
            gitlab.clone(),
            progress.clone(),
            last.clone(),
            stalled_closed.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut after_close = None;
            while i < CAP {
                let slowest = progress
                    .iter()
                    .map(|p| p.load(Ordering::Acquire))
                    .min()
                    .unwrap_or(0);
                if i >= slowest + WINDOW {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                i = gitlab.emit("1", "push", payload.clone());
                // A few more events after the close show that the other tabs go on undisturbed.
                if after_close.is_none() && stalled_closed() {
                    after_close = Some(i + 50);
                }
                if after_close.is_some_and(|end| i >= end) {
                    break;
                }
            }
            assert!(i < CAP, "the stalled tab was never closed");
            last.store(i, Ordering::Release);
        })
    };
    // The reading tab and the other user (read concurrently) get every event, in order.
    let readers: Vec<_> = [reader, other_user]
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            let (progress, last) = (progress.clone(), last.clone());
            tokio::spawn(async move {
                let mut next = 1u64;
                loop {
                    let end = last.load(Ordering::Acquire);
                    if end != 0 && next > end {
                        break;
                    }
                    let Some(m) = c.next_within(Duration::from_secs(10)).await else {
                        panic!("stuck at event {next}");
                    };
                    if m["type"] == "event" {
                        assert_eq!(m["data"]["id"], next.to_string());
                        progress[k].store(next, Ordering::Release);
                        next += 1;
                    }
                }
                c
            })
        })
        .collect();
    let mut kept = Vec::new();
    for r in readers {
        kept.push(r.await.unwrap());
    }
    feeder.await.unwrap();
    // The stalled tab was closed as a slow consumer (by a full queue or by a blocked write, whichever came first
    // on this machine); memory stayed bounded by the queue limits.
    assert!(stalled_closed());
    support::eventually("the close is counted", || {
        t.app()
            .metrics
            .render()
            .contains("tabhub_closes_total{code=\"4009\"} 1")
    })
    .await;
    let m = t.app().metrics.render();
    let slow = t.app().metrics.slow_consumers.get(&["queue_full"])
        + t.app().metrics.slow_consumers.get(&["write_timeout"]);
    assert_eq!(slow, 1.0, "{m}");
    assert!(t.app().metrics.outbound_queued.get() <= 128);
    drop(stalled);
}

#[tokio::test]
async fn metrics_expose_every_series() {
    let kc = Keycloak::start().await;
    let t = support::start_default(&kc).await;
    let mut a = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    a.send("ping", json!({}), None).await;
    a.recv().await;
    let text = reqwest::get(format!("http://{}/metrics", t.local_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tabhub_tabs 1",
        "tabhub_users 1",
        "tabhub_lingering_sessions",
        "tabhub_upstream_streams",
        "tabhub_handshakes_total{outcome=\"ok\"} 1",
        "tabhub_closes_total",
        "tabhub_commands_total{command=\"ping\",outcome=\"ok\"} 1",
        "tabhub_loop_iterations_total",
        "tabhub_loop_duration_seconds_total",
        "tabhub_loop_skipped_ticks_total",
        "tabhub_loop_errors_total",
        "tabhub_messages_delivered_total",
        "tabhub_messages_dropped_total",
        "tabhub_outbound_queue_depth",
        "tabhub_token_refreshes_total",
        "tabhub_slow_consumers_total{reason=\"queue_full\"} 0",
        "tabhub_slow_consumers_total{reason=\"write_timeout\"} 0",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // The memory broker is always up: no broker gauge that could only ever read 0 or 1 for nothing.
    assert!(!text.contains("tabhub_broker_up"), "{text}");
}

/// Spawns the real binary with `config`; returns the child and its address.
fn spawn_tabhub(config: &str) -> (std::process::Child, String) {
    let dir = std::env::temp_dir().join(format!("tabhub-test-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tabhub.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(&path, format!("listen = \"127.0.0.1:{port}\"\n{config}")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tabhub"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    (child, format!("127.0.0.1:{port}"))
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let kc = Keycloak::start().await;
    let (mut child, addr) = spawn_tabhub(&format!(
        "[log]\nlevel = \"debug\"\nformat = \"json\"\n[auth]\nissuer = \"{}\"\nclient_ids = [\"renku-ui\"]\n\
         [origins]\nallow_missing = true\n[drain]\ndelay_ms = 600\nwindow_ms = 1000\ngrace_ms = 1000\n",
        kc.issuer()
    ));
    let ready = format!("http://{addr}/readyz");
    support::eventually_async("ready", || {
        let ready = ready.clone();
        async move { reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let url = format!("ws://{addr}/ws");
    let token = kc.token("alice");
    let mut tabs = Vec::new();
    for user in ["alice", "alice", "bob"] {
        let tok = if user == "alice" {
            token.clone()
        } else {
            kc.token(user)
        };
        tabs.push(Client::connect(&url, &tok).await);
    }
    let started = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    support::eventually_async("readyz turns 503 at once", || {
        let ready = ready.clone();
        async move { reqwest::get(&ready).await.is_ok_and(|r| r.status() == 503) }
    })
    .await;
    match Client::connect_with(&url, Cred::Header(&token), None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!(
            "new upgrades are refused while draining: {:?}",
            other.map(|_| ())
        ),
    }
    for c in &mut tabs {
        let (code, _) = c.closed().await;
        assert_eq!(code, Some(1012));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "closes wait for the delay"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("draining"), "{logs}");
    assert!(!logs.contains(&token), "a token reached the logs");
    assert!(
        !logs.contains(token.split('.').nth(2).unwrap()),
        "a token signature reached the logs"
    );
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.websocket.ping_interval_ms = 100;
    c.websocket.idle_timeout_ms = 400;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let url = support::ws_url(&t);
    // A live client answers pings (tungstenite does it while reading) and stays.
    let mut live = Client::connect(&url, &kc.token("alice")).await;
    let silent = stalled_client(&url, &kc.token("bob")).await;
    // The live client reads (and so answers pings) for several idle timeouts.
    live.expect_silence(Duration::from_millis(1_500)).await;
    support::eventually("the silent tab is dropped", || {
        t.app().metrics.idle_drops.get() == 1
    })
    .await;
    live.send("ping", json!({}), Some(json!("still"))).await;
    assert_eq!(live.recv_type("ack").await["id"], "still");
    assert!(t
        .app()
        .hub
        .get(&support::keycloak::sub_of("alice"))
        .is_some());
    drop(silent);
}

#[test]
fn the_cli_describes_commands_and_names_bad_config_keys() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tabhub"))
        .arg("commands")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "init {requestServerVersion}",
        "subscribe {topic, lastEventId?}",
        "pullKgActivationStatus {projects}",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let dir = std::env::temp_dir().join(format!("tabhub-badcfg-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[auth]\nissuer = \"https://kc.example/realms/r\"\nclient_ids = [\"ui\"]\n[session]\nlinger_ms = \"soon\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tabhub"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("session.linger_ms"), "{err}");

    // Command settings are checked once, at start: a wrong value or a key no command reads fails naming it.
    let base = "listen = \"127.0.0.1:0\"\n[auth]\nissuer = \"https://kc.example/realms/r\"\nclient_ids = [\"ui\"]\n";
    for (commands, named) in [
        ("kg_stale_after_ms = \"soon\"", "kg_stale_after_ms"),
        ("kg_stale_afte_ms = 1", "commands.kg_stale_afte_ms"),
        ("sessions_path = \"notebooks\"", "sessions_path"),
    ] {
        std::fs::write(&path, format!("{base}[commands]\n{commands}\n")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tabhub"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{commands} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{commands}: {err}");
    }
}
