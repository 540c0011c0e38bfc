//! Backend calls as the user under attack: one user's slow resources must not cost other users their polling, and
//! no id or path may leave its backend's base path.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::support::gateway::{Endpoint, Gateway};
use crate::support::keycloak::sub_of;
use crate::support::{self, Client, Keycloak};
use tabhub::commands::{Command, CommandError, Context, Registry};
use tabhub::config::Config;
use tabhub::Running;

/// `fetch {path}`: calls the `gateway` backend as the user at `path`, as any command may; replies
/// `fetched {status}`. What a careless or hostile command could do with a path built from peer input.
struct Fetch;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchParams {
    path: String,
}

impl Command for Fetch {
    const NAME: &'static str = "fetch";
    const DOC: &'static str = "Test: GET {gateway}{path} as the user.";
    const REQUIRED: &'static [&'static str] = &["path"];
    type Params = FetchParams;

    async fn handle(&self, p: FetchParams, ctx: &dyn Context) -> Result<(), CommandError> {
        let r = ctx
            .backend_get("gateway", &p.path)
            .await
            .map_err(|e| CommandError::failed(e.to_string()))?;
        ctx.reply("fetched", json!({ "status": r.status }));
        Ok(())
    }
}

struct Setup {
    kc: Keycloak,
    gw: Gateway,
    t: Running,
}

impl Setup {
    async fn new(tweak: impl FnOnce(&mut Config)) -> Setup {
        let kc = Keycloak::start().await;
        let (gw, addr) = support::gateway::start().await;
        let mut c = support::config(&kc);
        c.backends
            .insert("gateway".into(), format!("http://{addr}"));
        tweak(&mut c);
        let mut r: Registry = tabhub::commands::builtin();
        r.register(Fetch);
        let t = support::start(c, r).await;
        Setup { kc, gw, t }
    }

    async fn tab(&self, user: &str) -> Client {
        Client::connect(&support::ws_url(&self.t), &self.kc.token(user)).await
    }
}

/// Every message `c` receives within `d`, by type.
async fn collect(c: &mut Client, d: Duration) -> BTreeMap<String, Vec<Value>> {
    let deadline = Instant::now() + d;
    let mut got: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match c.next_within(left).await {
            Some(m) => got
                .entry(m["type"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(m),
            None => break,
        }
    }
    got
}

/// Alice tracks KG projects whose status endpoint never answers in time. Her time-outs once opened the gateway's
/// shared backoff, so bob's session loop got "backend unavailable" and lost ticks; now only alice's calls to those
/// paths back off, and bob polls at his normal pace without an error.
#[tokio::test]
async fn one_users_slow_resources_do_not_back_off_other_users() {
    let s = Setup::new(|c| {
        c.session.short_interval_ms = 400;
        c.session.loop_timeout_ms = 350;
        c.backend.timeout_ms = 150;
        // Long backoffs, so that a shared backoff opened by alice would cover most of bob's ticks.
        c.backend.backoff_initial_ms = 1_000;
        c.backend.backoff_max_ms = 1_000;
    })
    .await;
    s.gw.set_delay(Endpoint::KgStatus, Duration::from_secs(2));
    let projects: Vec<String> = (1..=5).map(|i| i.to_string()).collect();
    for p in &projects {
        s.gw.set_kg(p, 10.0);
    }

    let mut bob = s.tab("bob").await;
    bob.send("pullSessionStatusV2", json!({}), None).await;
    bob.recv_type("sessionStatusV2").await;

    let mut alice = s.tab("alice").await;
    alice
        .send(
            "pullKgActivationStatus",
            json!({ "projects": projects }),
            None,
        )
        .await;
    // Alice's polls reach the gateway and time out.
    support::eventually("alice's KG polls", || {
        s.gw.calls(Endpoint::KgStatus, &sub_of("alice")) >= 5
    })
    .await;

    let bob_before = s.gw.calls(Endpoint::SessionsV2, &sub_of("bob"));
    let window = Duration::from_millis(3_000);
    let got = collect(&mut bob, window).await;
    let bob_calls = s.gw.calls(Endpoint::SessionsV2, &sub_of("bob")) - bob_before;
    assert!(
        !got.contains_key("error"),
        "bob's loop never fails because of alice's resources: {:?}",
        got.get("error")
    );
    // 7.5 intervals in the window: at most one tick lost to scheduling, none to a backoff.
    assert!(
        bob_calls >= 6,
        "bob polls at his pace: {bob_calls} calls in {window:?}"
    );
    // Alice's own calls to her slow projects did back off (bob's never did: he got no error).
    assert!(
        s.t.app().metrics.backend_calls.get(&["gateway", "backoff"]) > 0.0,
        "alice's failing calls back off"
    );
    drop(alice);
}

/// `%2e%2e` is `..` to a URL parser: the KG id `%2e%2e` made tabhub fetch `{gateway}/graph/status`. Ids with dot
/// segments, whatever their encoding, are refused by the command, and nothing reaches the gateway outside the
/// status endpoint.
#[tokio::test]
async fn kg_ids_with_dot_segments_are_refused_and_never_fetched() {
    let s = Setup::new(|_| {}).await;
    let mut alice = s.tab("alice").await;
    for (i, id) in [
        "%2e%2e",
        "%2E%2e",
        "..",
        ".",
        ".%2e",
        "%2e",
        "a%2F..%2Fb",
        "a%2f%2e%2e",
        "%2F",
        "a%2F",
        "%252e%252e",
        "%2e%2e%2Fgraph",
    ]
    .into_iter()
    .enumerate()
    {
        alice
            .send(
                "pullKgActivationStatus",
                json!({ "projects": [id] }),
                Some(json!(i)),
            )
            .await;
        let reply = alice
            .next_within(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{id}: no reply: the id was accepted"));
        assert_eq!(reply["type"], "error", "{id}: {reply}");
        assert_eq!(reply["id"], json!(i), "{id}: {reply}");
    }
    // Legitimate ids still work: a number and a URL-encoded GitLab path.
    alice
        .send(
            "pullKgActivationStatus",
            json!({ "projects": [7, "group%2Fname"] }),
            None,
        )
        .await;
    support::eventually("both projects polled", || {
        s.gw.kg_calls("7") >= 1 && s.gw.kg_calls("group/name") + s.gw.kg_calls("group%2Fname") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.gw.strays(),
        Vec::<String>::new(),
        "no request left the endpoint"
    );
}

/// Whatever path a command passes, a call as the user stays under the backend's base path: dot segments, encoded
/// or not, are refused before any request.
#[tokio::test]
async fn a_command_cannot_call_outside_its_backend() {
    let s = Setup::new(|_| {}).await;
    let mut alice = s.tab("alice").await;
    for (i, path) in [
        "/projects/%2e%2e/graph/status",
        "/projects/../graph/status",
        "/projects/./x/../../graph/status",
        "/a/%2E%2E/%2e%2e/graph/status",
        "/projects/..%2F..%2Fgraph/status",
        "/projects/%252e%252e/graph/status",
        "/projects/..\\..\\graph/status",
        "/..",
        "/.",
        "//evil.example/graph/status",
        "@evil.example/graph/status",
        "graph/status",
    ]
    .into_iter()
    .enumerate()
    {
        alice
            .send("fetch", json!({ "path": path }), Some(json!(i)))
            .await;
        let reply = alice.recv().await;
        assert_eq!(reply["type"], "error", "{path}: {reply}");
        assert_eq!(reply["id"], json!(i), "{path}: {reply}");
    }
    assert_eq!(
        s.gw.strays(),
        Vec::<String>::new(),
        "no request left the base path"
    );
    // An ordinary path still works.
    alice
        .send(
            "fetch",
            json!({ "path": "/data/sessions" }),
            Some(json!("ok")),
        )
        .await;
    let reply = alice.recv().await;
    assert_eq!(reply["type"], "fetched", "{reply}");
    assert_eq!(reply["data"]["status"], 200, "{reply}");
}
