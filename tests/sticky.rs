//! Sticky sessions for real: nginx runs `deploy/nginx/tabhub.conf`, and HAProxy `deploy/haproxy/tabhub.cfg`
//! (Debian's packages, see .ci/packages), in front of two real tabhub processes sharing a fixture Keycloak and a
//! fixture GitLab. All the tabs of a user land on one instance, users spread over both, and when an instance
//! drains (or dies) its users reconnect through the load balancer to the other one and get their state back.
//!
//! The load balancer's own log (`X-Test-Tag`, status, the upstreams tried and what they answered) shows how each
//! request was routed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::process::{free_port, Haproxy, Nginx, Tabhub};
use support::{Client, Keycloak};
use tabhub_fixtures::gitlab::FixtureGitlab;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The configurations docs/deployment.md documents (tests/docs.rs checks that it quotes them verbatim).
const DEPLOY_NGINX: &str = include_str!("../deploy/nginx/tabhub.conf");
const DEPLOY_HAPROXY: &str = include_str!("../deploy/haproxy/tabhub.cfg");

/// Both instances' `ui_version`.
const UI_VERSION: &str = "3.40.0";

/// `text` with `from`, which must occur exactly once, replaced by `to`.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the deploy/ configuration must contain `{from}` exactly once"
    );
    text.replacen(from, to, 1)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Nginx,
    Haproxy,
}

enum Balancer {
    Nginx(Nginx),
    Haproxy(Haproxy),
}

impl Balancer {
    fn addr(&self) -> &str {
        match self {
            Balancer::Nginx(n) => &n.addr,
            Balancer::Haproxy(h) => &h.addr,
        }
    }

    /// The log line of the request tagged `tag`, once written (for a websocket: once closed). nginx:
    /// `tag status upstreams-tried their-statuses`; HAProxy: `tag status server retries`.
    async fn log_line(&self, tag: &str) -> String {
        match self {
            Balancer::Nginx(n) => n.access_line(tag).await,
            Balancer::Haproxy(h) => h.log_line(tag).await,
        }
    }
}

/// Two tabhub instances (`a`, `b`) behind a load balancer.
struct Cluster {
    kc: Keycloak,
    gitlab: Arc<FixtureGitlab>,
    instances: BTreeMap<String, Tabhub>,
    lb: Balancer,
}

impl Cluster {
    async fn start(kind: Kind) -> Cluster {
        // Fails at once, saying how to install it, when the load balancer is missing.
        support::process::binary(match kind {
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        });
        let kc = Keycloak::start().await;
        let (gitlab, base) = support::gitlab(200).await;
        let mut instances = BTreeMap::new();
        for id in ["a", "b"] {
            let config = format!(
                "instance_id = \"{id}\"\n\
                 [auth]\nissuer = \"{issuer}\"\nclient_ids = [\"renku-ui\"]\n\
                 [origins]\nallow_missing = true\n\
                 [limits]\ntrust_forwarded_for = true\n\
                 [drain]\ndelay_ms = 1500\nwindow_ms = 500\ngrace_ms = 1000\n\
                 [gitlab]\nurl = \"{base}\"\nreconnect_initial_ms = 50\nreconnect_max_ms = 200\n\
                 [commands]\nui_version = \"{UI_VERSION}\"\n",
                issuer = kc.issuer(),
            );
            instances.insert(
                id.to_owned(),
                Tabhub::spawn(&format!("tabhub-{id}"), &config),
            );
        }
        for t in instances.values_mut() {
            t.ready().await;
        }
        let port = free_port();
        let (deploy, listen, local) = match kind {
            Kind::Nginx => (
                DEPLOY_NGINX,
                "listen 80;",
                format!("listen 127.0.0.1:{port};"),
            ),
            Kind::Haproxy => (
                DEPLOY_HAPROXY,
                "bind :80\n",
                format!("bind 127.0.0.1:{port}\n"),
            ),
        };
        let mut conf = replace_once(deploy, "10.0.0.11:8080", &instances["a"].addr);
        conf = replace_once(&conf, "10.0.0.12:8080", &instances["b"].addr);
        conf = replace_once(&conf, listen, &local);
        let lb = match kind {
            Kind::Nginx => Balancer::Nginx(Nginx::start(port, &conf, "/readyz").await),
            Kind::Haproxy => Balancer::Haproxy(Haproxy::start(port, &conf, "/readyz").await),
        };
        Cluster {
            kc,
            gitlab,
            instances,
            lb,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.lb.addr())
    }

    /// The load balancer's standard error (HAProxy's warnings: servers going down and up).
    fn lb_stderr(&self) -> String {
        match &self.lb {
            Balancer::Nginx(n) => n.proc.read("stderr.log"),
            Balancer::Haproxy(h) => h.proc.read("stderr.log"),
        }
    }

    fn addr(&self, id: &str) -> &str {
        &self.instances[id].addr
    }

    /// The other instance's id.
    fn other(&self, id: &str) -> String {
        self.instances.keys().find(|k| *k != id).unwrap().clone()
    }

    /// A tab of `user` through the load balancer, sending `cookie` (when not empty) and `X-Test-Tag: tag`; returns it (its
    /// `init` read) and the instance `init` names.
    async fn tab(&self, user: &str, cookie: &str, tag: &str) -> (Client, String) {
        let mut req = self.url().into_client_request().unwrap();
        let h = req.headers_mut();
        h.insert(
            "authorization",
            format!("Bearer {}", self.kc.token(user)).parse().unwrap(),
        );
        if !cookie.is_empty() {
            h.insert("cookie", cookie.parse().unwrap());
        }
        h.insert("x-test-tag", tag.parse().unwrap());
        let mut c = match Client::connect_request(req).await {
            Ok(c) => c,
            // Say which instances the balancer tried and what it logged (a refused upgrade that was not retried
            // happened once in CI under load; the log line says where it went).
            Err(e) => panic!(
                "tab {tag} of {user}: {e}; balancer: {:?}; its stderr: {}",
                self.lb.log_line(tag).await,
                self.lb_stderr()
            ),
        };
        let init = c.recv().await;
        assert_eq!(init["type"], "init", "first message must be init: {init}");
        assert_eq!(init["data"]["user"], user);
        let instance = init["data"]["instance"].as_str().unwrap().to_owned();
        assert!(self.instances.contains_key(&instance), "{init}");
        (c, instance)
    }
}

/// The cookie header of a user's tabs: the per-user affinity cookie a UI sets, among others.
fn affinity(user: &str) -> String {
    format!("theme=dark; tabhub_affinity=u-{user}")
}

async fn subscribe(c: &mut Client, topic: &str, last: Option<&str>) {
    let mut data = json!({ "topic": topic });
    if let Some(l) = last {
        data["lastEventId"] = json!(l);
    }
    c.send("subscribe", data, None).await;
    let r = c.recv_type("subscribed").await;
    assert_eq!(r["data"]["topic"], topic, "{r}");
}

fn event_id(m: &Value) -> Option<u64> {
    (m["type"] == "event").then(|| m["data"]["id"].as_str().unwrap().parse().unwrap())
}

/// Reads events until `last` arrives, checking that they are exactly `from..=last`, in order.
async fn events_until(c: &mut Client, from: u64, last: u64) {
    let mut next = from;
    while next <= last {
        let m = c.recv().await;
        if let Some(id) = event_id(&m) {
            assert_eq!(id, next, "events arrive once each, in order: {m}");
            next += 1;
        }
    }
}

/// The log line of a tab tagged `tag` that reached instance `to`, after instance `failed` refused it (nginx's
/// upstream status for it: 503 from a draining instance, 502 for a refused connection) or directly.
fn routed(cl: &Cluster, tag: &str, to: &str, failed: Option<(&str, u16)>) -> String {
    let to = cl.addr(to);
    match (&cl.lb, failed) {
        (Balancer::Nginx(_), None) => format!("{tag} 101 {to} 101"),
        (Balancer::Nginx(_), Some((from, status))) => {
            format!("{tag} 101 {}, {to} {status}, 101", cl.addr(from))
        }
        (Balancer::Haproxy(_), None) => format!("{tag} 101 {to} 0"),
        // One retry, redispatched to another server.
        (Balancer::Haproxy(_), Some(_)) => format!("{tag} 101 {to} +1"),
    }
}

/// Asserts that the (closed) tab tagged `tag` was routed one of the `ways`.
async fn assert_routed(cl: &Cluster, tag: &str, ways: &[String], why: &str) {
    let line = cl.lb.log_line(tag).await;
    assert!(
        ways.contains(&line),
        "{why}: {line:?}, expected one of {ways:?}"
    );
}

/// Tabs of 16 users, of 16 browsers, and of one user in two browsers: where do they land?
async fn affinity_holds(kind: Kind) {
    let cl = Cluster::start(kind).await;
    let mut keep = Vec::new();

    // Sixteen users, two tabs each, with the per-user affinity cookie. (The hash ring depends on the upstreams'
    // addresses, random ports here: with 16 users, all on one instance would be a 1-in-10,000 event.)
    let mut by_instance: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 1..=16 {
        let user = format!("user{i:02}");
        let (t1, x1) = cl.tab(&user, &affinity(&user), &format!("{user}-1")).await;
        let (t2, x2) = cl.tab(&user, &affinity(&user), &format!("{user}-2")).await;
        assert_eq!(x1, x2, "both tabs of {user} on one instance");
        by_instance.entry(x1).or_default().push(user);
        keep.extend([t1, t2]);
    }
    assert_eq!(
        by_instance.len(),
        2,
        "users spread over both instances: {by_instance:?}"
    );

    // Without the affinity cookie, the login session cookie keeps one browser's tabs together.
    let mut by_session: BTreeMap<String, String> = BTreeMap::new();
    for i in 1..=16 {
        let cookie = format!("tabhub_session=browser-{i:02}");
        let (t1, x1) = cl.tab("alice", &cookie, &format!("s{i:02}-1")).await;
        let (t2, x2) = cl.tab("alice", &cookie, &format!("s{i:02}-2")).await;
        assert_eq!(x1, x2, "both tabs of browser {i} on one instance");
        by_session.insert(cookie, x1);
        keep.extend([t1, t2]);
    }
    let spread: BTreeSet<_> = by_session.values().collect();
    assert_eq!(spread.len(), 2, "browsers spread: {by_session:?}");

    // The affinity cookie wins over the session cookie: one user in two browsers that would hash apart.
    let s_a = by_session.iter().find(|(_, x)| *x == "a").unwrap().0;
    let s_b = by_session.iter().find(|(_, x)| *x == "b").unwrap().0;
    let (t1, x1) = cl
        .tab("erin", &format!("{s_a}; {}", affinity("erin")), "erin-1")
        .await;
    let (t2, x2) = cl
        .tab("erin", &format!("{}; {s_b}", affinity("erin")), "erin-2")
        .await;
    assert_eq!(x1, x2, "both browsers of erin on one instance");
    keep.extend([t1, t2]);

    // Each instance holds exactly the tabs and users sent to it (sessions are per instance).
    for (id, users) in &by_instance {
        let browsers = by_session.values().filter(|x| *x == id).count();
        let erin = usize::from(x1 == *id);
        let tabs = 2 * (users.len() + browsers + erin);
        let sessions = users.len() + usize::from(browsers > 0) + erin;
        let metrics = reqwest::get(format!("http://{}/metrics", cl.addr(id)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in [
            format!("tabhub_tabs {tabs}\n"),
            format!("tabhub_users {sessions}\n"),
        ] {
            assert!(
                metrics.contains(&line),
                "instance {id}: no {line} in\n{metrics}"
            );
        }
    }

    // Through the load balancer, /metrics is refused; health endpoints pass.
    let lb = format!("http://{}", cl.lb.addr());
    let status = |path: &'static str| {
        let url = format!("{lb}{path}");
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/metrics").await, 403);
    assert_eq!(status("/healthz").await, 200);

    // Every upgrade went straight to its instance.
    for c in keep {
        c.close().await;
    }
    let x = &by_instance
        .iter()
        .find(|(_, u)| u.contains(&"user01".into()))
        .unwrap()
        .0;
    let way = routed(&cl, "user01-2", x, None);
    assert_routed(&cl, "user01-2", &[way], "one attempt").await;
}

#[tokio::test]
async fn nginx_keeps_the_tabs_of_a_user_together_and_spreads_users() {
    affinity_holds(Kind::Nginx).await;
}

#[tokio::test]
async fn haproxy_keeps_the_tabs_of_a_user_together_and_spreads_users() {
    affinity_holds(Kind::Haproxy).await;
}

/// A user with two tabs following a topic; the user's instance drains; the tabs move with their state.
async fn drain_moves_users_with_their_state(kind: Kind) {
    let cl = Cluster::start(kind).await;
    let user = "mallory";
    let cookie = affinity(user);
    let topic = "/project/9/push";

    // Two tabs of the user, on one instance, following a topic.
    let (mut t1, x) = cl.tab(user, &cookie, "t1").await;
    let (mut t2, x2) = cl.tab(user, &cookie, "t2").await;
    assert_eq!(x, x2);
    let y = cl.other(&x);
    for t in [&mut t1, &mut t2] {
        subscribe(t, topic, None).await;
    }
    let g = cl.gitlab.clone();
    support::eventually("one upstream stream", move || g.open_streams("9") == 1).await;
    for i in 1..=3 {
        cl.gitlab.emit("9", "push", json!({ "n": i }));
    }
    for t in [&mut t1, &mut t2] {
        events_until(t, 1, 3).await;
    }

    // Drain the user's instance (SIGTERM, as an orchestrator does).
    cl.instances[&x].proc.signal("TERM");
    let victim = &cl.instances[&x];
    support::eventually_async("the drained instance's /readyz turns 503", || async {
        victim.readyz().await == Some(503)
    })
    .await;

    // A tab opened now (before any health check can notice): the draining instance refuses the upgrade with
    // 503, and the load balancer retries on the other one (nginx: proxy_next_upstream http_503; HAProxy:
    // retry-on 503 with redispatch).
    let (probe, at) = cl.tab(user, &cookie, "probe").await;
    assert_eq!(
        at, y,
        "a new tab during the drain lands on the other instance"
    );
    probe.close().await;
    let way = routed(&cl, "probe", &y, Some((&x, 503)));
    assert_routed(&cl, "probe", &[way], "a refused upgrade is retried").await;

    // Events go on while the tabs are told to move (1012), and after.
    for i in 4..=5 {
        cl.gitlab.emit("9", "push", json!({ "n": i }));
    }
    let mut last_seen = Vec::new();
    for t in [&mut t1, &mut t2] {
        let (code, msgs) = t.closed().await;
        assert_eq!(
            code,
            Some(1012),
            "the drain closes tabs with 1012: {msgs:?}"
        );
        let ids: Vec<u64> = msgs.iter().filter_map(event_id).collect();
        let expected: Vec<u64> = (4..4 + ids.len() as u64).collect();
        assert_eq!(ids, expected, "events before the close, in order");
        last_seen.push(ids.last().copied().unwrap_or(3));
    }
    for i in 6..=7 {
        cl.gitlab.emit("9", "push", json!({ "n": i }));
    }

    // The client reconnects with the same cookie: the load balancer sends it to the other instance, where the
    // tabs resume their topic from the last event they saw.
    let mut moved = Vec::new();
    for (i, last) in last_seen.iter().enumerate() {
        let (mut t, at) = cl.tab(user, &cookie, &format!("moved{i}")).await;
        assert_eq!(
            at, y,
            "after the drain the user is served by the other instance"
        );
        subscribe(&mut t, topic, Some(&last.to_string())).await;
        moved.push((t, *last));
    }
    for i in 8..=9 {
        cl.gitlab.emit("9", "push", json!({ "n": i }));
    }
    for (t, last) in &mut moved {
        events_until(t, *last + 1, 9).await;
        t.expect_silence(Duration::from_millis(300)).await;
    }

    // The new instance serves the user's commands too.
    let (t, _) = &mut moved[0];
    t.send(
        "init",
        json!({"requestServerVersion": true}),
        Some(json!(1)),
    )
    .await;
    let v = t.recv_type("version").await;
    assert_eq!(v["data"]["version"], UI_VERSION, "{v}");
    assert_eq!(v["id"], 1);

    // The drained process exits cleanly; the user stays on the other instance.
    let mut cl = cl;
    let status = cl
        .instances
        .get_mut(&x)
        .unwrap()
        .proc
        .exited(Duration::from_secs(10))
        .await;
    assert!(status.success(), "drained instance exit status {status:?}");
    if kind == Kind::Haproxy {
        // Its health check (inter 1s, fall 2) has taken the instance out of the rotation by now.
        support::eventually("HAProxy marks the drained instance down", || {
            cl.lb_stderr().contains("is DOWN")
        })
        .await;
    }
    let (after, at) = cl.tab(user, &cookie, "after").await;
    assert_eq!(at, y);
    after.close().await;
    for (t, _) in moved {
        t.close().await;
    }
    let direct = |tag: &str| routed(&cl, tag, &y, None);
    match kind {
        // Right after the refused upgrade (max_fails=1), nginx does not even try the drained instance; after
        // fail_timeout (10 s) it would, and get a refused connection.
        Kind::Nginx => {
            for tag in ["moved0", "moved1"] {
                assert_routed(&cl, tag, &[direct(tag)], "skipped without a try").await;
            }
            let refused = routed(&cl, "after", &y, Some((&x, 502)));
            assert_routed(&cl, "after", &[direct("after"), refused], "skipped").await;
        }
        // HAProxy's health check takes the instance out within inter x fall (1 to 2 s after /readyz turned 503);
        // until then, upgrades are retried.
        Kind::Haproxy => {
            for tag in ["moved0", "moved1"] {
                let retried = routed(&cl, tag, &y, Some((&x, 503)));
                assert_routed(&cl, tag, &[direct(tag), retried], "moved").await;
            }
            assert_routed(&cl, "after", &[direct("after")], "out of the rotation").await;
        }
    }
}

#[tokio::test]
async fn nginx_moves_the_users_of_a_draining_instance_with_their_state() {
    drain_moves_users_with_their_state(Kind::Nginx).await;
}

#[tokio::test]
async fn haproxy_moves_the_users_of_a_draining_instance_with_their_state() {
    drain_moves_users_with_their_state(Kind::Haproxy).await;
}

/// The user's instance dies without a drain: the user's next tab goes to the other instance and resumes.
async fn crash_is_skipped(kind: Kind) {
    let cl = Cluster::start(kind).await;
    let user = "bob";
    let cookie = affinity(user);
    let topic = "/project/5/pipeline";
    let (mut t, x) = cl.tab(user, &cookie, "before").await;
    let y = cl.other(&x);
    subscribe(&mut t, topic, None).await;
    let g = cl.gitlab.clone();
    support::eventually("one upstream stream", move || g.open_streams("5") == 1).await;
    for i in 1..=2 {
        cl.gitlab.emit("5", "pipeline", json!({ "n": i }));
    }
    events_until(&mut t, 1, 2).await;

    // The load balancer cuts the tab (no close frame); the port refuses connections.
    cl.instances[&x].proc.signal("KILL");
    let (code, _) = t.closed().await;
    assert_ne!(code, Some(1012), "a crash is not a drain");
    cl.gitlab.emit("5", "pipeline", json!({ "n": 3 }));

    let (mut t, at) = cl.tab(user, &cookie, "after").await;
    assert_eq!(at, y, "the user's next tab lands on the other instance");
    subscribe(&mut t, topic, Some("2")).await;
    cl.gitlab.emit("5", "pipeline", json!({ "n": 4 }));
    events_until(&mut t, 3, 4).await;
    t.close().await;
    let retried = routed(&cl, "after", &y, Some((&x, 502)));
    let ways = match kind {
        // proxy_next_upstream error: the refused connection is retried on the other instance.
        Kind::Nginx => vec![retried],
        // retry-on conn-failure, unless the health check noticed first.
        Kind::Haproxy => vec![retried, routed(&cl, "after", &y, None)],
    };
    assert_routed(&cl, "after", &ways, "a refused connection is retried").await;
}

#[tokio::test]
async fn nginx_skips_a_crashed_instance() {
    crash_is_skipped(Kind::Nginx).await;
}

#[tokio::test]
async fn haproxy_skips_a_crashed_instance() {
    crash_is_skipped(Kind::Haproxy).await;
}
