//! Renku's own browser client, as `../shared/RENKU.md` ("The client, exactly") states it, against real tabhub
//! processes: it offers no subprotocol, connects to `/ui-server/ws`, applies its acceptance rule to every frame
//! (a JSON object with `data` object, `scope`, ISO `timestamp` and `type` strings; a `type` in its table for scope
//! `user`; `data` holding every required key and no other), and reconnects only after 1006 (no close frame) or
//! 4000. Every flow checks that no frame breaks the rule and that, after every close, the client can reconnect and
//! be served again.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::gateway::Gateway;
use support::{Keycloak, TokenSpec};
use tabhub::Config;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Renku's handler table for scope `user` (type, required, optional), current client.
const TABLE: &[(&str, &[&str], &[&str])] = &[
    ("init", &[], &["message"]),
    ("version", &["version"], &["start", "message"]),
    ("ack", &[], &["message"]),
    ("error", &[], &["message"]),
    ("sessionStatusV2", &[], &["message"]),
];

/// What the older client (with the knowledge-graph pages) adds.
const OLDER: &[(&str, &[&str], &[&str])] = &[
    ("activation", &[], &["message"]),
    ("sessionStatus", &[], &["message"]),
    ("test", &[], &["message"]),
];

/// The Renku client's acceptance rule: `Err` names what its dispatcher would store as an error.
fn accepts(frame: &Value, older: bool) -> Result<(), String> {
    let o = frame.as_object().ok_or("not an object")?;
    let data = o
        .get("data")
        .and_then(Value::as_object)
        .ok_or("no data object")?;
    let scope = o.get("scope").and_then(Value::as_str).ok_or("no scope")?;
    let ts = o
        .get("timestamp")
        .and_then(Value::as_str)
        .ok_or("no timestamp")?;
    let kind = o.get("type").and_then(Value::as_str).ok_or("no type")?;
    if ts.len() < 20 || !ts.ends_with('Z') || ts.as_bytes().get(10) != Some(&b'T') {
        return Err(format!("timestamp {ts} is not ISO-8601"));
    }
    let table = TABLE.iter().chain(if older { OLDER } else { &[] });
    let Some((_, required, optional)) = table
        .into_iter()
        .find(|(k, _, _)| scope == "user" && *k == kind)
    else {
        return Err(format!(
            "Type '{kind}' is not supported for the scope '{scope}'"
        ));
    };
    let ok = required.iter().all(|k| data.contains_key(*k))
        && data
            .keys()
            .all(|k| required.contains(&k.as_str()) || optional.contains(&k.as_str()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "Could not find a proper handler; data is wrong for a '{kind}' instruction: {frame}"
        ))
    }
}

/// How a connection of the Renku client ended, and whether it would reconnect.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// 1006: the connection dropped without a close frame. The client reconnects.
    Dropped,
    /// A close frame with this code: only 4000 makes the client reconnect.
    Closed(u16),
}

impl End {
    fn reconnects(&self) -> bool {
        matches!(self, End::Dropped | End::Closed(4000))
    }
}

/// Renku's client: one connection, with its rule applied to every frame received.
struct Renku {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    older: bool,
    /// The types received so far, in order.
    seen: Vec<String>,
}

/// How the browser reaches tabhub: through renku-gateway, which forwards `/ui-server/ws` unchanged with the
/// browser's cookies and, for a logged-in user, `Authorization: Bearer <access token>`.
async fn connect(addr: SocketAddr, path: &str, token: Option<&str>, older: bool) -> Renku {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    let h = req.headers_mut();
    h.insert("origin", "https://renku.example".parse().unwrap());
    h.insert(
        "cookie",
        "_renku_session=opaque-session-of-the-browser; other=1"
            .parse()
            .unwrap(),
    );
    if let Some(t) = token {
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(
        resp.headers().get("sec-websocket-protocol").is_none(),
        "no subprotocol was offered, none may be chosen"
    );
    Renku {
        ws,
        older,
        seen: Vec::new(),
    }
}

impl Renku {
    /// What the client sends: `{data, timestamp, type}`.
    async fn send(&mut self, kind: &str, data: Value) {
        let msg = json!({"timestamp": "2026-11-29T10:00:00.000Z", "type": kind, "data": data});
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
    }

    /// The next frame within `d`, checked against the rule; `Err` when the connection ended.
    async fn next(&mut self, d: Duration) -> Option<Result<Value, End>> {
        // One deadline for the whole wait: protocol pings arrive in between and must not extend it.
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let item = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match item {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("a JSON frame");
                    if let Err(why) = accepts(&v, self.older) {
                        panic!("the Renku client rejects a frame: {why}");
                    }
                    return Some(Ok(v));
                }
                Some(Ok(Message::Close(f))) => {
                    return Some(Err(End::Closed(f.map_or(1005, |f| u16::from(f.code)))))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Some(Err(End::Dropped)),
            }
        }
    }

    /// Reads until a frame of `kind` (every frame checked on the way, and kept in `seen`).
    async fn expect(&mut self, kind: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Ok(v)) => {
                    self.seen
                        .push(v["type"].as_str().unwrap_or_default().to_owned());
                    if v["type"] == kind {
                        return v;
                    }
                }
                Some(Err(end)) => panic!("connection ended ({end:?}) while waiting for {kind}"),
                None => panic!("no {kind} within 10 s (seen {:?})", self.seen),
            }
        }
    }

    /// Waits until a frame of `kind` has come, now or earlier.
    async fn has_seen(&mut self, kind: &str) {
        if !self.seen.iter().any(|k| k == kind) {
            self.expect(kind).await;
        }
    }

    /// Reads until the connection ends (every frame checked); returns how.
    async fn ended(&mut self, within: Duration) -> End {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Ok(_)) => continue,
                Some(Err(end)) => return end,
                None => panic!("the connection did not end within {within:?}"),
            }
        }
    }

    /// What the client does on open and on `init`: asks for the sessions' status, answers `init` with
    /// `init {requestServerVersion: true}`.
    async fn open_like_renku(&mut self) {
        self.expect("init").await;
        self.send("pullSessionStatusV2", json!({})).await;
        self.send("init", json!({"requestServerVersion": true}))
            .await;
    }
}

struct Setup {
    kc: Keycloak,
    gw: Gateway,
    t: tabhub::Running,
}

async fn setup(tweak: impl FnOnce(&mut Config)) -> Setup {
    let kc = Keycloak::start().await;
    let (gw, gw_addr) = support::gateway::start().await;
    let mut c = support::config(&kc);
    c.backends
        .insert("gateway".into(), format!("http://{gw_addr}"));
    c.websocket.paths = vec!["/ws".into(), "/ui-server/ws".into()];
    c.origins.allowed = vec!["https://renku.example".into()];
    c.commands.insert("ui_version".into(), "3.40.0".into());
    tweak(&mut c);
    let t = support::start(c, tabhub::commands::builtin()).await;
    Setup { kc, gw, t }
}

#[tokio::test]
async fn the_whole_flow_through_the_gateway_on_both_paths() {
    let s = setup(|_| {}).await;
    for path in ["/ui-server/ws", "/ws"] {
        let mut r = connect(s.t.local_addr(), path, Some(&s.kc.token("alice")), false).await;
        r.open_like_renku().await;
        let v = r.expect("version").await;
        assert_eq!(v["data"]["version"], "3.40.0");
        assert_eq!(v["data"]["start"], true);
        r.has_seen("sessionStatusV2").await;
        r.send("ping", json!({})).await;
        assert_eq!(r.expect("ack").await["data"], json!({"message": "ping"}));
        // A bad message is an error it can handle, and the socket stays open.
        r.send("nope", json!({})).await;
        r.expect("error").await;
        r.send("ping", json!({})).await;
        r.expect("ack").await;
    }
    assert!(s.gw.total_calls(support::gateway::Endpoint::SessionsV2) >= 1);
}

#[tokio::test]
async fn the_older_client_follows_knowledge_graph_activation() {
    let s = setup(|c| c.websocket.renku_older_client = true).await;
    s.gw.set_kg("7", 40.0);
    let mut r = connect(
        s.t.local_addr(),
        "/ui-server/ws",
        Some(&s.kc.token("alice")),
        true,
    )
    .await;
    r.expect("init").await;
    r.send("pullSessionStatus", json!({})).await;
    r.send("pullKgActivationStatus", json!({"projects": [7]}))
        .await;
    let a = r.expect("activation").await;
    let progress: Value = serde_json::from_str(a["data"]["message"].as_str().unwrap()).unwrap();
    assert_eq!(progress["7"], 40.0);
    s.gw.set_kg("7", 100.0);
    loop {
        let a = r.expect("activation").await;
        let p: Value = serde_json::from_str(a["data"]["message"].as_str().unwrap()).unwrap();
        if p["7"] == 100.0 {
            break;
        }
    }
    r.has_seen("sessionStatus").await;
}

#[tokio::test]
async fn the_current_client_never_sees_the_older_types() {
    let s = setup(|_| {}).await;
    s.gw.set_kg("7", 40.0);
    let mut r = connect(
        s.t.local_addr(),
        "/ui-server/ws",
        Some(&s.kc.token("alice")),
        false,
    )
    .await;
    r.expect("init").await;
    r.send("pullKgActivationStatus", json!({"projects": [7]}))
        .await;
    // The loop runs and would send `activation`: the current client's table has no such type.
    support::eventually("the KG loop ran", || s.gw.kg_calls("7") >= 1).await;
    r.send("ping", json!({})).await;
    r.expect("ack").await;
    assert!(r.next(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn anonymous_visitors_are_served_without_calling_any_backend() {
    let s = setup(|c| c.auth.allow_anonymous = true).await;
    let mut r = connect(s.t.local_addr(), "/ui-server/ws", None, false).await;
    r.open_like_renku().await;
    assert_eq!(r.expect("version").await["data"]["version"], "3.40.0");
    r.send("ping", json!({})).await;
    r.expect("ack").await;
    // Loops that need a login answer nothing and call nothing.
    assert!(r.next(Duration::from_millis(1_500)).await.is_none());
    assert_eq!(s.gw.total_calls(support::gateway::Endpoint::SessionsV2), 0);
    // Two visitors do not share a session.
    let mut other = connect(s.t.local_addr(), "/ui-server/ws", None, false).await;
    other.expect("init").await;
    assert_eq!(s.t.app().hub.len(), 2);
}

#[tokio::test]
async fn without_a_token_nor_anonymous_access_it_gets_4000_and_comes_back_with_one() {
    let s = setup(|_| {}).await;
    let mut r = connect(s.t.local_addr(), "/ui-server/ws", None, false).await;
    r.expect("error").await;
    let end = r.ended(Duration::from_secs(5)).await;
    assert_eq!(end, End::Closed(4000));
    assert!(end.reconnects());
    let mut r = connect(
        s.t.local_addr(),
        "/ui-server/ws",
        Some(&s.kc.token("alice")),
        false,
    )
    .await;
    r.open_like_renku().await;
    r.expect("version").await;
}

#[tokio::test]
async fn an_expiring_token_drops_the_tab_so_that_it_reconnects_with_a_fresh_one() {
    let s = setup(|c| c.auth.expiry_warning_ms = 1_000).await;
    let short = s.kc.mint(&TokenSpec::user("alice").exp_in(3));
    let mut r = connect(s.t.local_addr(), "/ui-server/ws", Some(&short), false).await;
    r.open_like_renku().await;
    // `authExpiring` is not in its table, so it never reaches it; at expiry the connection drops.
    let end = r.ended(Duration::from_secs(15)).await;
    assert_eq!(end, End::Dropped);
    assert!(end.reconnects());
    let mut r = connect(
        s.t.local_addr(),
        "/ui-server/ws",
        Some(&s.kc.token("alice")),
        false,
    )
    .await;
    r.open_like_renku().await;
    r.expect("version").await;
}

#[tokio::test]
async fn an_overloaded_server_drops_it_and_serves_it_once_there_is_room() {
    let s = setup(|c| c.limits.max_connections = 1).await;
    let addr = s.t.local_addr();
    let first = connect(addr, "/ui-server/ws", Some(&s.kc.token("alice")), false).await;
    let mut over = connect(addr, "/ui-server/ws", Some(&s.kc.token("bob")), false).await;
    let end = over.ended(Duration::from_secs(5)).await;
    assert_eq!(
        end,
        End::Dropped,
        "1013 is a code it would never recover from"
    );
    drop(first);
    support::eventually("room again", || {
        s.t.app()
            .metrics
            .render()
            .lines()
            .any(|l| l == "tabhub_tabs 0")
    })
    .await;
    let mut r = connect(addr, "/ui-server/ws", Some(&s.kc.token("bob")), false).await;
    r.open_like_renku().await;
    r.expect("version").await;
}

#[tokio::test]
async fn a_drain_drops_it_so_that_it_reconnects_to_another_instance() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    c.websocket.paths = vec!["/ui-server/ws".into()];
    c.drain.delay_ms = 0;
    c.drain.window_ms = 100;
    let drained = support::start(c.clone(), tabhub::commands::builtin()).await;
    let other = support::start(c, tabhub::commands::builtin()).await;
    let mut r = connect(
        drained.local_addr(),
        "/ui-server/ws",
        Some(&kc.token("alice")),
        false,
    )
    .await;
    r.expect("init").await;
    let drain = tokio::spawn(drained.drain());
    let end = r.ended(Duration::from_secs(10)).await;
    assert_eq!(
        end,
        End::Dropped,
        "1012 is a code it would never recover from"
    );
    let _ = drain.await;
    let mut r = connect(
        other.local_addr(),
        "/ui-server/ws",
        Some(&kc.token("alice")),
        false,
    )
    .await;
    r.expect("init").await;
    r.send("ping", json!({})).await;
    r.expect("ack").await;
}

#[tokio::test]
async fn the_version_comes_every_long_tick_to_renku_tabs_and_only_on_change_to_tabhub_tabs() {
    let s = setup(|c| c.session.long_interval_ms = 1_000).await;
    let token = s.kc.token("alice");
    let mut r = connect(s.t.local_addr(), "/ui-server/ws", Some(&token), false).await;
    r.open_like_renku().await;
    r.expect("version").await;
    let mut tab = support::Client::connect(&support::ws_url(&s.t), &token).await;
    // Renku's tab: the same version again at every tick, as Renku's server sends it.
    for _ in 0..2 {
        let v = r.expect("version").await;
        assert_eq!(v["data"], json!({"version": "3.40.0"}));
    }
    // The tabhub tab, in the same session: nothing while the version stays the same.
    let mut versions = 0;
    while let Some(m) = tab.next_within(Duration::from_millis(300)).await {
        if m["type"] == "version" {
            versions += 1;
        }
    }
    assert_eq!(versions, 0);
}
