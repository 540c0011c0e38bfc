//! The backend side of the publish figures: `POST /api/publish` on the tabhub instances in turn. A backend behind
//! a sticky load balancer does not know which instance holds a user's tabs, so with two instances half of the
//! messages land on the instance without the target's tabs and must cross the broker (Redis).
//!
//! Every message is `{"type": "benchPublish", "data": {"t": <unix ns taken just before its request>, "n": i}}`
//! to a user, a channel or everyone; the client processes time its arrival at each tab (see `clients`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::procs::unix_ns;
use crate::tokens;

/// The `type` of every published message.
pub const KIND: &str = "benchPublish";
/// tabhub's `publish.shared_secret` in the bench configuration.
pub const SECRET: &str = "tabhub-bench-publisher-secret";

/// The publish channel the tabs of `user` subscribe to, out of `groups`.
pub fn channel_of(user: usize, groups: usize) -> String {
    format!("/events/bench/g{}", user % groups.max(1))
}

/// Who message `i` goes to.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub users: usize,
    pub tabs_per_user: usize,
    /// Channels the users are spread over (see [`channel_of`]); 0: no channel messages.
    pub groups: usize,
    /// Every `topic_every`-th message goes to a channel (0: none).
    pub topic_every: u64,
    /// Every message goes to everyone.
    pub broadcast: bool,
}

impl Mix {
    /// The target of message `i` and the deliveries it makes when every tab is connected.
    fn target(&self, i: u64) -> (Value, u64) {
        let tabs = self.tabs_per_user as u64;
        if self.broadcast {
            return (json!({"broadcast": true}), self.users as u64 * tabs);
        }
        if self.groups > 0 && self.topic_every > 0 && i % self.topic_every == self.topic_every - 1 {
            let g = (i / self.topic_every) as usize % self.groups;
            let members = self.users / self.groups + usize::from(g < self.users % self.groups);
            return (
                json!({"topic": channel_of(g, self.groups)}),
                members as u64 * tabs,
            );
        }
        let u = (i % self.users.max(1) as u64) as usize;
        (json!({"user": tokens::sub_of(u)}), tabs)
    }

    fn message(&self, i: u64) -> (Value, u64) {
        let (target, n) = self.target(i);
        (
            json!({"target": target, "type": KIND, "data": {"t": unix_ns(), "n": i}}),
            n,
        )
    }
}

/// What one publishing run did.
#[derive(Default, Debug)]
pub struct Outcome {
    /// Messages sent and accepted (answered 200).
    pub sent: u64,
    pub accepted: u64,
    pub requests: u64,
    /// Answers other than 200, and transport errors, by kind.
    pub failures: BTreeMap<String, u64>,
    /// Deliveries the accepted messages should make.
    pub expected: u64,
    pub seconds: f64,
    /// Requests that had to wait for a free slot (the publisher fell behind its rate).
    pub behind: u64,
    /// Request round trips, in microseconds.
    pub request_us: Vec<u32>,
}

struct Answer {
    messages: u64,
    expected: u64,
    result: Result<(), String>,
    us: u32,
}

impl Outcome {
    fn add(&mut self, a: Answer) {
        self.requests += 1;
        self.sent += a.messages;
        self.request_us.push(a.us);
        match a.result {
            Ok(()) => {
                self.accepted += a.messages;
                self.expected += a.expected;
            }
            Err(e) => *self.failures.entry(e).or_default() += 1,
        }
    }
}

fn client(slots: usize) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(slots)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("http client: {e}"))
}

async fn post(
    http: reqwest::Client,
    url: String,
    body: Value,
    messages: u64,
    expected: u64,
) -> Answer {
    let t = std::time::Instant::now();
    let result = match http.post(&url).bearer_auth(SECRET).json(&body).send().await {
        Ok(r) if r.status() == 200 => {
            // Read the body so the connection goes back to the pool.
            let _ = r.bytes().await;
            Ok(())
        }
        Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
        Err(e) if e.is_timeout() => Err("timeout".into()),
        Err(e) if e.is_connect() => Err("connect".into()),
        Err(_) => Err("transport".into()),
    };
    Answer {
        messages,
        expected,
        result,
        us: t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
    }
}

/// `rate` single-message requests per second for `seconds`, over `urls` in turn, at most `slots` in flight.
pub async fn at_rate(
    urls: &[String],
    mix: Mix,
    rate: f64,
    seconds: f64,
    slots: usize,
) -> Result<Outcome, String> {
    let http = client(slots)?;
    let sem = Arc::new(Semaphore::new(slots.max(1)));
    let total = (rate * seconds).round().max(1.0) as u64;
    let mut out = Outcome::default();
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                out.behind += 1;
                sem.clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| e.to_string())?
            }
        };
        let (body, expected) = mix.message(i);
        let url = urls[i as usize % urls.len()].clone();
        let http = http.clone();
        set.spawn(async move {
            let a = post(http, url, body, 1, expected).await;
            drop(permit);
            a
        });
        while let Some(r) = set.try_join_next() {
            out.add(r.map_err(|e| e.to_string())?);
        }
    }
    while let Some(r) = set.join_next().await {
        out.add(r.map_err(|e| e.to_string())?);
    }
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

/// As fast as tabhub answers: `slots` publishers in a loop, each posting batches of `batch` messages, for
/// `seconds`.
pub async fn flat_out(
    urls: &[String],
    mix: Mix,
    slots: usize,
    batch: u64,
    seconds: f64,
) -> Result<Outcome, String> {
    let http = client(slots)?;
    let next = Arc::new(AtomicU64::new(0));
    let out = Arc::new(Mutex::new(Outcome::default()));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let mut set = JoinSet::new();
    for k in 0..slots.max(1) {
        let (http, next, out, url) = (
            http.clone(),
            next.clone(),
            out.clone(),
            urls[k % urls.len()].clone(),
        );
        set.spawn(async move {
            while Instant::now() < deadline {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                let mut expected = 0;
                let messages: Vec<Value> = (first..first + batch)
                    .map(|i| {
                        let (m, n) = mix.message(i);
                        expected += n;
                        m
                    })
                    .collect();
                let a = post(
                    http.clone(),
                    url.clone(),
                    json!({ "messages": messages }),
                    batch,
                    expected,
                )
                .await;
                out.lock().unwrap_or_else(|p| p.into_inner()).add(a);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())?;
    }
    let mut o = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    o.seconds = t0.elapsed().as_secs_f64();
    Ok(o)
}
