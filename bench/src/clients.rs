//! `tabhub-bench client`: one load process. It holds the tabs of a range of users (its `--plan`), all bound to
//! one source address (`--from`, 127.0.0.x) so that no address runs out of ports, and obeys JSON commands on
//! stdin, answering JSON lines on stdout:
//!
//! - `{"cmd":"connect","drop_first":bool}`: (drops its tabs, then) opens them, at most `--concurrency`
//!   handshakes in flight; a tab is ready once `init` came and its topics are `subscribed`. Answers
//!   `connected` with handshake times and failures.
//! - `{"cmd":"reload","from":a,"to":b,"slot":s,"times":n,"gap_ms":g}`: closes and reopens tab `s` of users
//!   `a..b`, `n` times.
//! - `{"cmd":"mode","mode":"idle"|"ping"|"attack",...}`: what every open tab does besides reading (see [`Mode`]):
//!   nothing, a timed `ping` round trip every `every_ms` (bystanders), or commands of the abuse classes paced just
//!   under the per-tab rate limit (the attacker). Answers `mode`.
//! - `{"cmd":"report","reset":bool,...}`: latencies of events (emit -> receipt), of session changes
//!   (gateway change -> receipt) and of pings, counts, what the attack sent and received, close codes.
//! - `{"cmd":"quit"}`, or stdin closed, or `--max-seconds`: exits.
//!
//! Tokens are forged here, one per user (see [`crate::tokens`]).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::procs::unix_ns;
use crate::tokens;

#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// tabhub's websocket URL, `ws://127.0.0.1:<port>/ws`.
    #[arg(long)]
    pub url: String,
    /// Source address of every socket.
    #[arg(long, default_value = "127.0.0.2")]
    pub from: IpAddr,
    /// Users and tabs: `a-b:T,...` (users a..b, T tabs each).
    #[arg(long)]
    pub plan: String,
    /// Topics per tab (event types on the user's project).
    #[arg(long, default_value_t = 0)]
    pub topics: usize,
    /// Publish channels: with G > 0 every tab also subscribes to [`crate::publisher::channel_of`] its user.
    #[arg(long, default_value_t = 0)]
    pub channels: usize,
    /// The realm's issuer (`iss` of the tokens).
    #[arg(long)]
    pub issuer: String,
    /// A command each tab sends once ready (the session-status loop).
    #[arg(long)]
    pub loop_command: Option<String>,
    /// The gateway's change schedule (see [`crate::fixtures::last_change`]): `<epoch_ns>/<period_ns>`. The
    /// session-status notification carries no data (`{message: "true"}`, Renku's payload), so a notification is
    /// attributed to the newest scheduled change of its user before its receipt.
    #[arg(long)]
    pub changes: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 1_800)]
    pub max_seconds: u64,
}

type Ws = WebSocketStream<TcpStream>;
type TabKey = (usize, usize);

/// What every tab of this process shares.
struct Shared {
    addr: SocketAddr,
    url: String,
    from: IpAddr,
    topics: Vec<String>,
    channels: usize,
    loop_command: Option<String>,
    /// The notification kind of the loop command (`pullSessionStatusV2` -> `sessionStatusV2`).
    notification: Option<String>,
    /// The gateway's change schedule: (epoch, period) in ns.
    schedule: Option<(u64, u64)>,
    tokens: HashMap<usize, String>,
    sem: Semaphore,
    stats: Mutex<Stats>,
    open: AtomicUsize,
    /// What the open tabs do besides reading; a tab picks up a change at once.
    mode: watch::Sender<Mode>,
}

/// What a tab does besides reading what tabhub sends. The load of the abuse scenario runs here, in the client
/// processes, rather than in the orchestrator: the bystanders and the attacker are separate processes (each its
/// own source address), so the attacker's work (64 KiB frames, 100-topic replies) never delays the clock of a
/// bystander's round trip, and both reuse the tabs' handshake, tokens and close accounting as they are.
#[derive(Clone, Debug, Default)]
enum Mode {
    #[default]
    Idle,
    /// `ping {id}` every `every`, timed to its `ack` (which echoes the id): the bystanders' latency.
    Ping { every: Duration },
    /// The abuse classes in turn, paced just under the rate limit.
    Attack(Attack),
}

/// The attacker's pacing and targets: whatever the generated configuration allows, not more.
#[derive(Clone, Debug)]
struct Attack {
    /// Commands per second per tab (just under `limits.commands_per_second`).
    per_second: f64,
    /// Commands sent at once when the attack starts (under `limits.commands_burst`).
    burst: u32,
    /// Size of the oversized frames (just under `websocket.max_message_bytes`).
    frame_bytes: usize,
    /// Project topics subscribed per `setSubscriptions` (up to `gitlab.max_topics_per_tab`).
    topics: usize,
    /// KG project ids per `pullKgActivationStatus`.
    kg_ids: usize,
    /// The classes sent, in turn (a subset of [`CLASSES`]; all when the command names none).
    classes: Vec<&'static str>,
}

/// The abuse classes of issue 14, sent in turn by every attacking tab (each starting at its own).
pub const CLASSES: [&str; 8] = [
    "setSubscriptions",
    "channels",
    "visibility",
    "kgActivation",
    "authenticate",
    "malformed",
    "unknown",
    "oversized",
];

/// One attacking tab's progress through [`CLASSES`].
#[derive(Default)]
struct AttackState {
    sent: u64,
    /// setSubscriptions sent: odd ones ask for `topics` new event types, even ones go back to three.
    sets: u64,
    /// Channel commands: `CHANNEL_RUN` new `/events/...` channels subscribed, then the same unsubscribed.
    channels: u64,
    hidden: bool,
    kg: u64,
}

const CHANNEL_RUN: u64 = 25;

impl AttackState {
    /// The next frame of tab `slot` of `user` (its class and text).
    fn next(
        &mut self,
        a: &Attack,
        user: usize,
        slot: usize,
        token: &str,
    ) -> (&'static str, String) {
        let class = a.classes[(self.sent as usize + slot) % a.classes.len()];
        self.sent += 1;
        let id = self.sent;
        let project = tokens::project_of(user);
        let text = match class {
            "setSubscriptions" => {
                self.sets += 1;
                // New types every time: each big set makes the stream carry types it did not carry yet.
                let topics: Vec<String> = if self.sets % 2 == 1 {
                    (0..a.topics)
                        .map(|k| format!("/project/{project}/a{slot}-{}-{k}", self.sets))
                        .collect()
                } else {
                    ["push", "pipeline", "issue"]
                        .iter()
                        .map(|t| format!("/project/{project}/{t}"))
                        .collect()
                };
                json!({"type": "setSubscriptions", "id": id, "data": {"topics": topics}})
                    .to_string()
            }
            "channels" => {
                let k = self.channels;
                self.channels += 1;
                let (round, i) = (k / (2 * CHANNEL_RUN), k % (2 * CHANNEL_RUN));
                let topic = format!("/events/abuse/t{slot}/r{round}/c{}", i % CHANNEL_RUN);
                let kind = if i < CHANNEL_RUN {
                    "subscribe"
                } else {
                    "unsubscribe"
                };
                json!({"type": kind, "id": id, "data": {"topic": topic}}).to_string()
            }
            "visibility" => {
                self.hidden = !self.hidden;
                json!({"type": "visibility", "id": id, "data": {"hidden": self.hidden}}).to_string()
            }
            "kgActivation" => {
                // Ids never asked before; the fixture gateway refuses a third (403), does not know a third
                // (404) and answers a progress for the rest (see `fixtures::kg_status`).
                let ids: Vec<u64> = (0..a.kg_ids as u64)
                    .map(|k| KG_BASE + (slot as u64) * 1_000_000 + self.kg * a.kg_ids as u64 + k)
                    .collect();
                self.kg += 1;
                json!({"type": "pullKgActivationStatus", "id": id, "data": {"projects": ids}})
                    .to_string()
            }
            "authenticate" => {
                json!({"type": "authenticate", "id": id, "data": {"token": token}}).to_string()
            }
            "malformed" => match id % 4 {
                0 => format!("{{\"type\":\"ping\",\"id\":{id}"),
                1 => "not json at all".to_owned(),
                2 => format!("[{id}, {{\"type\": \"ping\"}}]"),
                _ => json!({"data": {"id": id}}).to_string(),
            },
            "unknown" => {
                json!({"type": format!("noSuchCommand{id}"), "id": id, "data": {}}).to_string()
            }
            _ => {
                // Valid JSON of `frame_bytes` bytes: the envelope is parsed whole, then the parameters refused.
                let head = json!({"type": "ping", "id": id, "data": {"pad": ""}}).to_string();
                let pad = "x".repeat(a.frame_bytes.saturating_sub(head.len()));
                json!({"type": "ping", "id": id, "data": {"pad": pad}}).to_string()
            }
        };
        (class, text)
    }
}

/// KG ids of the attack start here (far from any real project).
pub const KG_BASE: u64 = 900_000_000;

#[derive(Default)]
struct Stats {
    events: u64,
    event_lat_us: Vec<u32>,
    changes: u64,
    change_lat_us: Vec<u32>,
    /// Published messages (`benchPublish`) received, per scope, and their publish -> receipt latencies.
    published: BTreeMap<String, u64>,
    publish_lat_us: Vec<u32>,
    /// Notifications attributed to a change the tab had already been told of (should stay 0).
    repeated: u64,
    messages: u64,
    closes: BTreeMap<String, u64>,
    /// Pings sent and the round trips of those answered (`ack` with the same id).
    pings: u64,
    ping_rtt_us: Vec<u32>,
    /// Pings not answered yet: (tab, id) -> when sent. A reset reports each one at its age then (a lower bound of
    /// its round trip) and forgets it: a server that stops answering must not look fast.
    ping_pending: HashMap<(usize, usize, u64), Instant>,
    /// Frames the attack sent, per class, and what its tabs received, per message type.
    attack_sent: BTreeMap<String, u64>,
    attack_bytes: u64,
    received: BTreeMap<String, u64>,
    /// `error {rateLimited: true}` received: the pacing went over the limit (should stay 0).
    rate_limited: u64,
    /// Per tab: when it became ready and the newest scheduled session change it was told of.
    tabs: HashMap<TabKey, (u64, u64)>,
}

/// One batch of tabs being opened.
struct Round {
    expected: usize,
    ok: AtomicUsize,
    failed: AtomicUsize,
    attempts_failed: AtomicUsize,
    last_init_ns: AtomicU64,
    last_ready_ns: AtomicU64,
    handshake_us: Mutex<Vec<u32>>,
    errors: Mutex<BTreeMap<String, u64>>,
    done: Notify,
}

impl Round {
    fn new(expected: usize) -> Arc<Round> {
        Arc::new(Round {
            expected,
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            attempts_failed: AtomicUsize::new(0),
            last_init_ns: AtomicU64::new(0),
            last_ready_ns: AtomicU64::new(0),
            handshake_us: Mutex::new(Vec::with_capacity(expected)),
            errors: Mutex::new(BTreeMap::new()),
            done: Notify::new(),
        })
    }

    fn finished(&self) -> bool {
        self.ok.load(Ordering::Acquire) + self.failed.load(Ordering::Acquire) >= self.expected
    }

    fn end_one(&self, ok: bool) {
        if ok {
            self.ok.fetch_add(1, Ordering::AcqRel);
            self.last_ready_ns.fetch_max(unix_ns(), Ordering::AcqRel);
        } else {
            self.failed.fetch_add(1, Ordering::AcqRel);
        }
        if self.finished() {
            self.done.notify_one();
        }
    }

    fn error(&self, e: String) {
        self.attempts_failed.fetch_add(1, Ordering::AcqRel);
        *lock(&self.errors).entry(e).or_default() += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn say(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// `a-b:T,...` -> every (user, slot).
fn parse_plan(plan: &str) -> Result<Vec<TabKey>, String> {
    let mut tabs = Vec::new();
    for part in plan.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad plan part {part:?}: expected a-b:T");
        let (range, t) = part.split_once(':').ok_or_else(bad)?;
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let (a, b, t): (usize, usize, usize) = (
            a.parse().map_err(|_| bad())?,
            b.parse().map_err(|_| bad())?,
            t.parse().map_err(|_| bad())?,
        );
        for u in a..b {
            for s in 0..t {
                tabs.push((u, s));
            }
        }
    }
    Ok(tabs)
}

pub fn main(a: ClientArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("client: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let max = Duration::from_secs(a.max_seconds);
    let result = rt.block_on(async move {
        tokio::select! {
            r = run(a) => r,
            _ = tokio::time::sleep(max) => Err("--max-seconds reached".into()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(a: ClientArgs) -> Result<(), String> {
    let all_tabs = parse_plan(&a.plan)?;
    let mut users: Vec<usize> = all_tabs.iter().map(|t| t.0).collect();
    users.dedup();
    let addr: SocketAddr = a
        .url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|e| format!("--url {}: {e}", a.url))?;
    let schedule = match &a.changes {
        None => None,
        Some(c) => {
            let (e, p) = c
                .split_once('/')
                .ok_or_else(|| format!("--changes {c}: want <epoch_ns>/<period_ns>"))?;
            let n = |x: &str| x.parse::<u64>().map_err(|e| format!("--changes {c}: {e}"));
            Some((n(e)?, n(p)?.max(1)))
        }
    };
    let started = Instant::now();
    let minted = tokens::mint_all(&a.issuer, &users, 2, 3_600);
    say(json!({
        "ev": "minted",
        "users": users.len(),
        "tabs": all_tabs.len(),
        "ms": started.elapsed().as_millis() as u64,
    }));
    let sh = Arc::new(Shared {
        addr,
        url: a.url.clone(),
        from: a.from,
        topics: tokens::event_types(a.topics),
        channels: a.channels,
        loop_command: a.loop_command.clone(),
        notification: a.loop_command.as_deref().map(notification_of),
        schedule,
        tokens: users.iter().copied().zip(minted).collect(),
        sem: Semaphore::new(a.concurrency.max(1)),
        stats: Mutex::new(Stats::default()),
        open: AtomicUsize::new(0),
        mode: watch::Sender::new(Mode::Idle),
    });
    let mut handles: HashMap<TabKey, AbortHandle> = HashMap::new();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let cmd: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("client: bad command {line:?}: {e}");
                continue;
            }
        };
        match cmd["cmd"].as_str().unwrap_or("") {
            "connect" => {
                let drop_first = cmd["drop_first"].as_bool().unwrap_or(false);
                let timeout = Duration::from_secs(cmd["timeout_s"].as_u64().unwrap_or(300));
                let r = open_round(&sh, &mut handles, &all_tabs, drop_first, timeout).await;
                say(r);
            }
            "reload" => {
                let (from, to) = (
                    cmd["from"].as_u64().unwrap_or(0) as usize,
                    cmd["to"].as_u64().unwrap_or(0) as usize,
                );
                let slot = cmd["slot"].as_u64().unwrap_or(0) as usize;
                let times = cmd["times"].as_u64().unwrap_or(1);
                let gap = Duration::from_millis(cmd["gap_ms"].as_u64().unwrap_or(200));
                let which: Vec<TabKey> = all_tabs
                    .iter()
                    .copied()
                    .filter(|&(u, s)| u >= from && u < to && s == slot)
                    .collect();
                let (mut ok, mut failed) = (0, 0);
                for _ in 0..times {
                    for k in &which {
                        if let Some(h) = handles.remove(k) {
                            h.abort();
                        }
                    }
                    tokio::time::sleep(gap / 2).await;
                    let r =
                        open_round(&sh, &mut handles, &which, false, Duration::from_secs(60)).await;
                    ok += r["ok"].as_u64().unwrap_or(0);
                    failed += r["failed"].as_u64().unwrap_or(0);
                    tokio::time::sleep(gap / 2).await;
                }
                say(json!({"ev": "reloaded", "ok": ok, "failed": failed, "tabs": which.len()}));
            }
            "report" => {
                say(report(&sh, &cmd));
            }
            "mode" => {
                let mode = match cmd["mode"].as_str().unwrap_or("idle") {
                    "ping" => Mode::Ping {
                        every: Duration::from_millis(
                            cmd["every_ms"].as_u64().unwrap_or(100).max(1),
                        ),
                    },
                    "attack" => Mode::Attack(Attack {
                        per_second: cmd["per_second"].as_f64().unwrap_or(1.0).max(0.1),
                        burst: cmd["burst"].as_u64().unwrap_or(0) as u32,
                        frame_bytes: cmd["frame_bytes"].as_u64().unwrap_or(1_024) as usize,
                        topics: cmd["topics"].as_u64().unwrap_or(100) as usize,
                        kg_ids: cmd["kg_ids"].as_u64().unwrap_or(10) as usize,
                        classes: attack_classes(&cmd["classes"]),
                    }),
                    _ => Mode::Idle,
                };
                sh.mode.send_replace(mode);
                say(json!({"ev": "mode", "open": sh.open.load(Ordering::Acquire)}));
            }
            "quit" => break,
            other => eprintln!("client: unknown command {other:?}"),
        }
    }
    for (_, h) in handles.drain() {
        h.abort();
    }
    Ok(())
}

/// Opens `which` (after dropping them when asked), waits until each is ready or failed, and reports.
async fn open_round(
    sh: &Arc<Shared>,
    handles: &mut HashMap<TabKey, AbortHandle>,
    which: &[TabKey],
    drop_first: bool,
    timeout: Duration,
) -> Value {
    let drop_ns = unix_ns();
    if drop_first {
        for k in which {
            if let Some(h) = handles.remove(k) {
                h.abort();
            }
        }
        // Let the aborted tasks go (their sockets close) before reconnecting.
        tokio::task::yield_now().await;
    }
    let fresh: Vec<TabKey> = which
        .iter()
        .copied()
        .filter(|k| !handles.contains_key(k))
        .collect();
    let round = Round::new(fresh.len());
    let start_ns = unix_ns();
    for &(user, slot) in &fresh {
        let h = tokio::spawn(run_tab(sh.clone(), round.clone(), user, slot)).abort_handle();
        handles.insert((user, slot), h);
    }
    let waited = tokio::time::timeout(timeout, async {
        while !round.finished() {
            round.done.notified().await;
        }
    })
    .await;
    let handshake_us = std::mem::take(&mut *lock(&round.handshake_us));
    json!({
        "ev": "connected",
        "tabs": fresh.len(),
        "ok": round.ok.load(Ordering::Acquire),
        "failed": round.failed.load(Ordering::Acquire),
        "attempts_failed": round.attempts_failed.load(Ordering::Acquire),
        "timed_out": waited.is_err(),
        "errors": *lock(&round.errors),
        "drop_ns": drop_ns,
        "start_ns": start_ns,
        "last_init_ns": round.last_init_ns.load(Ordering::Acquire),
        "last_ready_ns": round.last_ready_ns.load(Ordering::Acquire),
        "handshake_us": handshake_us,
        "open": sh.open.load(Ordering::Acquire),
    })
}

/// Decrements the open count when a tab's task ends, aborted or not.
struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The classes named in `v` (an array of names) that [`CLASSES`] knows; all of them when none is.
fn attack_classes(v: &Value) -> Vec<&'static str> {
    let named: Vec<&'static str> = CLASSES
        .iter()
        .copied()
        .filter(|c| v.as_array().is_some_and(|a| a.iter().any(|x| x == c)))
        .collect();
    if named.is_empty() {
        CLASSES.to_vec()
    } else {
        named
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// A tab's [`Mode`] in progress: when its next frame is due, and what it is waiting for.
struct Activity {
    mode: Mode,
    user: usize,
    slot: usize,
    due: Option<tokio::time::Instant>,
    /// The last ping's id.
    next_id: u64,
    attack: AttackState,
    /// Frames still to send at once (the attack's opening burst).
    burst_left: u32,
}

impl Activity {
    fn new(mode: Mode, user: usize, slot: usize) -> Activity {
        let now = tokio::time::Instant::now();
        let (due, burst_left) = match &mode {
            Mode::Idle => (None, 0),
            // Spread the tabs over the period, so the pings do not all leave at once.
            Mode::Ping { every } => {
                let phase = (user as u64 * 2_654_435_761 + slot as u64 * 40_503)
                    % every.as_micros().max(1) as u64;
                (Some(now + Duration::from_micros(phase)), 0)
            }
            Mode::Attack(a) => (Some(now), a.burst),
        };
        Activity {
            mode,
            user,
            slot,
            due,
            next_id: 0,
            attack: AttackState::default(),
            burst_left,
        }
    }

    /// The frame due now; schedules the next one.
    fn next_frame(&mut self, token: &str) -> (&'static str, String) {
        let now = tokio::time::Instant::now();
        match &self.mode {
            Mode::Idle => {
                self.due = None;
                ("idle", String::new())
            }
            Mode::Ping { every } => {
                self.next_id += 1;
                let id = self.next_id;
                // From the schedule, not from now: a late send does not shift the ones after it.
                self.due = self.due.map(|d| (d + *every).max(now));
                ("ping", json!({"type": "ping", "id": id}).to_string())
            }
            Mode::Attack(a) => {
                let a = a.clone();
                if self.burst_left > 0 {
                    self.burst_left -= 1;
                } else {
                    let gap = Duration::from_secs_f64(1.0 / a.per_second);
                    self.due = self.due.map(|d| (d + gap).max(now));
                }
                self.attack.next(&a, self.user, self.slot, token)
            }
        }
    }

    /// What this tab's mode wants from a received message: the ping's round trip, the attack's counts.
    fn on_text(&mut self, sh: &Shared, text: &str) {
        match &self.mode {
            Mode::Idle => {}
            Mode::Ping { .. } => {
                if !text.contains("\"ack\"") {
                    return;
                }
                let Ok(v) = serde_json::from_str::<Value>(text) else {
                    return;
                };
                if v["type"] != "ack" {
                    return;
                }
                let Some(id) = v["id"].as_u64() else {
                    return;
                };
                let mut st = lock(&sh.stats);
                if let Some(sent) = st.ping_pending.remove(&(self.user, self.slot, id)) {
                    st.ping_rtt_us
                        .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            Mode::Attack(_) => {
                let v = serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
                let kind = v["type"].as_str().unwrap_or("(not JSON)").to_owned();
                let mut st = lock(&sh.stats);
                if v["data"]["rateLimited"] == true {
                    st.rate_limited += 1;
                }
                *st.received.entry(kind).or_default() += 1;
            }
        }
    }
}

async fn run_tab(sh: Arc<Shared>, round: Arc<Round>, user: usize, slot: usize) {
    let mut failures = 0u32;
    let mut ws = loop {
        let permit = sh.sem.acquire().await;
        let t0 = Instant::now();
        match open(&sh, user, slot).await {
            Ok((ws, init_at)) => {
                drop(permit);
                lock(&round.handshake_us).push((init_at - t0).as_micros() as u32);
                let init_ns = unix_ns().saturating_sub(init_at.elapsed().as_nanos() as u64);
                round.last_init_ns.fetch_max(init_ns, Ordering::AcqRel);
                break ws;
            }
            Err(e) => {
                drop(permit);
                round.error(e);
                failures += 1;
                if failures >= 3 {
                    round.end_one(false);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
            }
        }
    };
    sh.open.fetch_add(1, Ordering::AcqRel);
    let _open = OpenGuard(&sh.open);
    let ready_ns = unix_ns();
    lock(&sh.stats).tabs.insert((user, slot), (ready_ns, 0));
    round.end_one(true);
    let mut last_change = 0u64;
    let mut mode_rx = sh.mode.subscribe();
    let mut act = Activity::new(mode_rx.borrow_and_update().clone(), user, slot);
    let token = sh.tokens.get(&user).cloned().unwrap_or_default();
    loop {
        let due = act.due;
        let frame = tokio::select! {
            f = ws.next() => f,
            r = mode_rx.changed() => {
                if r.is_ok() {
                    act = Activity::new(mode_rx.borrow_and_update().clone(), user, slot);
                }
                continue;
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(far_future)), if due.is_some() => {
                let (class, text) = act.next_frame(&token);
                let len = text.len() as u64;
                if let Err(e) = ws.send(Message::text(text)).await {
                    *lock(&sh.stats).closes.entry(format!("error: {e}")).or_default() += 1;
                    break;
                }
                let mut st = lock(&sh.stats);
                if class == "ping" {
                    st.pings += 1;
                    st.ping_pending.insert((user, slot, act.next_id), Instant::now());
                } else {
                    *st.attack_sent.entry(class.to_owned()).or_default() += 1;
                    st.attack_bytes += len;
                }
                continue;
            }
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                act.on_text(&sh, t.as_str());
                on_text(&sh, t.as_str(), (user, slot), ready_ns, &mut last_change)
            }
            Some(Ok(Message::Close(f))) => {
                let code = f.map_or(0, |f| u16::from(f.code));
                *lock(&sh.stats)
                    .closes
                    .entry(format!("closed {code}"))
                    .or_default() += 1;
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                *lock(&sh.stats)
                    .closes
                    .entry(format!("error: {e}"))
                    .or_default() += 1;
                break;
            }
            None => {
                *lock(&sh.stats).closes.entry("ended".into()).or_default() += 1;
                break;
            }
        }
    }
    lock(&sh.stats).tabs.remove(&(user, slot));
}

/// Connects, waits for `init`, subscribes and waits for the acknowledgements, sends the loop command.
/// Returns the socket and when `init` arrived (the end of the authenticated handshake).
async fn open(sh: &Shared, user: usize, slot: usize) -> Result<(Ws, Instant), String> {
    let step = Duration::from_secs(15);
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    // The port is chosen at connect time, for the whole 4-tuple: no collision with a connection of the same
    // ports still closing (which would cost a SYN retransmission, a second), and 28,000 ports per address.
    bind_address_no_port(&socket).map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
    socket
        .bind(SocketAddr::new(sh.from, 0))
        .map_err(|e| format!("bind {}: {e}", sh.from))?;
    let stream = tokio::time::timeout(step, socket.connect(sh.addr))
        .await
        .map_err(|_| "connect: timed out".to_string())?
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = stream.set_nodelay(true);
    let mut req = sh
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("request: {e}"))?;
    let token = sh.tokens.get(&user).ok_or("no token")?;
    // The tabhub profile (the whole protocol): events, published messages and every close code.
    req.headers_mut().insert(
        "sec-websocket-protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("tabhub"),
    );
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "token header")?,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio::time::timeout(
        step,
        tokio_tungstenite::client_async_with_config(req, stream, Some(config)),
    )
    .await
    .map_err(|_| "handshake: timed out".to_string())?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => format!("handshake: HTTP {}", r.status()),
        other => format!("handshake: {other}"),
    })?;
    let kind_of = |m: &Message| -> Option<Value> {
        match m {
            Message::Text(t) => serde_json::from_str::<Value>(t.as_str()).ok(),
            _ => None,
        }
    };
    let init_at = loop {
        let m = next_msg(&mut ws, step).await?;
        if let Some(v) = kind_of(&m) {
            match v["type"].as_str() {
                Some("init") => break Instant::now(),
                Some("error") => return Err(format!("error: {}", v["data"]["message"])),
                _ => {}
            }
        }
    };
    let mut topics: Vec<String> = sh
        .topics
        .iter()
        .map(|ty| format!("/project/{}/{ty}", tokens::project_of(user)))
        .collect();
    if sh.channels > 0 {
        topics.push(crate::publisher::channel_of(user, sh.channels));
    }
    for topic in &topics {
        let cmd = json!({"type": "subscribe", "data": {"topic": topic}});
        ws.send(Message::text(cmd.to_string()))
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    let mut acks = 0;
    let mut last_change = 0;
    while acks < topics.len() {
        let m = next_msg(&mut ws, step).await?;
        if let Message::Text(t) = &m {
            if t.as_str().contains("\"subscribed\"") {
                acks += 1;
            } else if t.as_str().contains("\"error\"") {
                return Err(format!("subscribe: {}", t.as_str()));
            } else {
                on_text(sh, t.as_str(), (user, slot), u64::MAX, &mut last_change);
            }
        }
    }
    if let Some(c) = &sh.loop_command {
        let cmd = json!({"type": c, "data": {}});
        ws.send(Message::text(cmd.to_string()))
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    Ok((ws, init_at))
}

fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The next message, within `step`; a close or an error is an error.
async fn next_msg(ws: &mut Ws, step: Duration) -> Result<Message, String> {
    match tokio::time::timeout(step, ws.next()).await {
        Err(_) => Err("no message in time".to_string()),
        Ok(None) => Err("closed".to_string()),
        Ok(Some(Err(e))) => Err(format!("read: {e}")),
        Ok(Some(Ok(Message::Close(f)))) => {
            Err(format!("closed {}", f.map_or(0, |f| u16::from(f.code))))
        }
        Ok(Some(Ok(m))) => Ok(m),
    }
}

fn on_text(sh: &Shared, text: &str, tab: TabKey, ready_ns: u64, last_change: &mut u64) {
    let now = unix_ns();
    let mut st = lock(&sh.stats);
    st.messages += 1;
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if v["type"] == "event" {
        if let Some(t) = v["data"]["payload"]["t"].as_u64() {
            st.events += 1;
            st.event_lat_us
                .push((now.saturating_sub(t) / 1_000).min(u64::from(u32::MAX)) as u32);
        }
        return;
    }
    if v["type"] == crate::publisher::KIND {
        if let Some(t) = v["data"]["t"].as_u64() {
            let scope = v["scope"].as_str().unwrap_or("?").to_owned();
            *st.published.entry(scope).or_default() += 1;
            st.publish_lat_us
                .push((now.saturating_sub(t) / 1_000).min(u64::from(u32::MAX)) as u32);
        }
        return;
    }
    // A session-status notification: it stands for the newest change the gateway made before it arrived.
    let (Some(kind), Some((epoch, period))) = (&sh.notification, sh.schedule) else {
        return;
    };
    if v["type"].as_str() != Some(kind.as_str()) {
        return;
    }
    let (changed, n) = crate::fixtures::last_change(epoch, period, tab.0, now);
    if n == 0 || changed <= ready_ns {
        // The loop's first send, or a change from before the tab was there: nothing to time.
        *last_change = (*last_change).max(changed);
        return;
    }
    if changed <= *last_change {
        st.repeated += 1;
        return;
    }
    *last_change = changed;
    if let Some(t) = st.tabs.get_mut(&tab) {
        t.1 = changed;
    }
    st.changes += 1;
    st.change_lat_us
        .push((now.saturating_sub(changed) / 1_000).min(u64::from(u32::MAX)) as u32);
}

/// The notification a loop command's function sends: `pullSessionStatusV2` -> `sessionStatusV2`.
fn notification_of(command: &str) -> String {
    let rest = command.strip_prefix("pull").unwrap_or(command);
    let mut cs = rest.chars();
    match cs.next() {
        Some(c) => c.to_lowercase().chain(cs).collect(),
        None => String::new(),
    }
}

/// Counts and samples since the last reset. With `epoch_ns`/`period_ns`/`tick_ns` (the gateway's schedule and the
/// loop's interval), also counts the tabs still missing a change older than one tick plus `slack_ns`.
fn report(sh: &Shared, cmd: &Value) -> Value {
    let mut st = lock(&sh.stats);
    let now = unix_ns();
    let late = match (
        cmd["epoch_ns"].as_u64(),
        cmd["period_ns"].as_u64(),
        cmd["tick_ns"].as_u64(),
    ) {
        (Some(epoch), Some(period), Some(tick)) if period > 0 => {
            let slack = cmd["slack_ns"].as_u64().unwrap_or(1_000_000_000);
            let cutoff = now.saturating_sub(tick + slack);
            st.tabs
                .iter()
                .filter(|(&(user, _), &(ready, seen))| {
                    let (changed, n) = crate::fixtures::last_change(epoch, period, user, cutoff);
                    n > 0 && changed > ready && seen < changed
                })
                .count()
        }
        _ => 0,
    };
    // Pings still unanswered: their age now. Counted (and forgotten) at a reset only.
    let mut unanswered_age_us: Vec<u32> = Vec::new();
    if cmd["reset"].as_bool().unwrap_or(false) {
        unanswered_age_us = st
            .ping_pending
            .drain()
            .map(|(_, sent)| sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
            .collect();
    }
    let mut out = json!({
        "ev": "report",
        "events": st.events,
        "event_lat_us": st.event_lat_us,
        "changes": st.changes,
        "change_lat_us": st.change_lat_us,
        "repeated": st.repeated,
        "published": st.published,
        "publish_lat_us": st.publish_lat_us,
        "messages": st.messages,
        "closes": st.closes,
        "open": sh.open.load(Ordering::Acquire),
        "late_tabs": late,
        "pings": st.pings,
        "ping_rtt_us": st.ping_rtt_us,
        "ping_unanswered_age_us": unanswered_age_us,
        "attack_sent": st.attack_sent,
        "attack_bytes": st.attack_bytes,
        "received": st.received,
        "rate_limited": st.rate_limited,
    });
    if cmd["counts_only"] == true {
        for k in [
            "event_lat_us",
            "change_lat_us",
            "publish_lat_us",
            "ping_rtt_us",
            "ping_unanswered_age_us",
        ] {
            out[k] = json!([]);
        }
    }
    if cmd["reset"].as_bool().unwrap_or(false) {
        st.events = 0;
        st.event_lat_us.clear();
        st.changes = 0;
        st.change_lat_us.clear();
        st.repeated = 0;
        st.published.clear();
        st.publish_lat_us.clear();
        st.messages = 0;
        st.closes.clear();
        st.pings = 0;
        st.ping_rtt_us.clear();
        st.attack_sent.clear();
        st.attack_bytes = 0;
        st.received.clear();
        st.rate_limited = 0;
    }
    out
}
