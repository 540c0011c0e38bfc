//! Process metrics, rendered in Prometheus' text format at `GET /metrics`.
//!
//! Plain atomics for the hot paths (one relaxed add per message); labelled series (by command, by close code, by
//! loop function) in small maps behind a mutex, touched once per command or iteration, never per delivery.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn sub(&self, n: i64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters by label values.
#[derive(Default)]
pub struct Family(Mutex<BTreeMap<Vec<String>, f64>>);

impl Family {
    pub fn add(&self, labels: &[&str], v: f64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(labels.iter().map(|s| (*s).to_owned()).collect())
            .or_insert(0.0) += v;
    }
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }
    pub fn get(&self, labels: &[&str]) -> f64 {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        m.get(&key).copied().unwrap_or(0.0)
    }
    fn render(&self, out: &mut String, name: &str, help: &str, kind: &str, label_names: &[&str]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (values, v) in m.iter() {
            let labels: Vec<String> = label_names
                .iter()
                .zip(values)
                .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {v}", labels.join(","));
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A histogram over fixed bucket bounds (cumulative on render), for counts such as a webhook event's fan-out.
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: u64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {count}", self.sum());
    }
}

/// Bounds of [`Metrics::hook_fanout`]: tabs one webhook event reached on this instance.
pub const FANOUT_BOUNDS: &[u64] = &[0, 1, 10, 100, 1_000, 10_000];

/// Every metric of the process.
pub struct Metrics {
    pub tabs: Gauge,
    pub sessions: Gauge,
    pub lingering_sessions: Gauge,
    pub upstream_streams: Gauge,
    pub handshakes: Family,
    pub closes: Family,
    pub commands: Family,
    pub loop_iterations: Family,
    pub loop_seconds: Family,
    pub loop_skipped_ticks: Family,
    pub loop_errors: Family,
    pub backend_calls: Family,
    pub messages_queued: Counter,
    /// Messages sitting in tabs' outbound queues now.
    pub outbound_queued: Gauge,
    pub messages_delivered: Counter,
    pub messages_dropped: Counter,
    pub idle_drops: Counter,
    /// Tabs closed as slow consumers (4009), by reason: `queue_full` (the outbound queue overflowed) or
    /// `write_timeout` (one write blocked past `websocket.write_timeout_ms`). Which comes first depends on the
    /// kernel's socket buffers; both are a peer that does not read.
    pub slow_consumers: Family,
    pub token_refreshes: Family,
    /// Introspections (`custody.introspection`) by result: `active`, `inactive` (revoked), `error` (refused:
    /// fail closed) or `error_fail_open` (let in by `custody.introspection_fail_open`). Answers from the cache are
    /// not counted.
    pub introspections: Family,
    /// 1 while the Redis broker listens, 0 while it reconnects. Shown only with the Redis broker: the memory
    /// broker is always up, and a constant 0 there would page someone.
    pub broker_up: Gauge,
    /// Set when the broker is Redis.
    pub broker_is_redis: std::sync::atomic::AtomicBool,
    pub published: Family,
    pub publish_requests: Family,
    /// HTTP connections open and not (yet) upgraded to a tab: bounded by `http.max_pending_connections` plus
    /// the reserve.
    pub http_pending: Gauge,
    /// HTTP connections the server closed or refused, by reason (see [`HTTP_CLOSE_REASONS`]).
    pub http_closed: Family,
    /// Webhook deliveries received, by `kind` (`object_kind`; `other` for a kind GitLab does not document, `unknown`
    /// before the body is read) and outcome: `accepted` (given an id and delivered), `duplicate` (a retry,
    /// delivered before), `unauthorized` (no or a wrong `X-Gitlab-Token`: 401), `malformed` (400), `too_large`
    /// (413), `ignored` (well-formed but naming no project: 2xx, nothing to deliver), `unavailable` (the broker
    /// could not take it).
    pub hook_deliveries: Family,
    /// Tabs each webhook event reached on this instance.
    pub hook_fanout: Histogram,
    /// Access checks (webhook source) by outcome (`allowed`, `refused`, `unavailable`) and source (`backend`,
    /// `cached`).
    pub access_checks: Family,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            tabs: Gauge::default(),
            sessions: Gauge::default(),
            lingering_sessions: Gauge::default(),
            upstream_streams: Gauge::default(),
            handshakes: Family::default(),
            closes: Family::default(),
            commands: Family::default(),
            loop_iterations: Family::default(),
            loop_seconds: Family::default(),
            loop_skipped_ticks: Family::default(),
            loop_errors: Family::default(),
            backend_calls: Family::default(),
            messages_queued: Counter::default(),
            outbound_queued: Gauge::default(),
            messages_delivered: Counter::default(),
            messages_dropped: Counter::default(),
            idle_drops: Counter::default(),
            slow_consumers: Family::default(),
            token_refreshes: Family::default(),
            introspections: Family::default(),
            broker_up: Gauge::default(),
            broker_is_redis: std::sync::atomic::AtomicBool::default(),
            published: Family::default(),
            publish_requests: Family::default(),
            http_pending: Gauge::default(),
            http_closed: Family::default(),
            hook_deliveries: Family::default(),
            hook_fanout: Histogram::new(FANOUT_BOUNDS),
            access_checks: Family::default(),
        }
    }
}

/// Why the server closed an HTTP connection that was not a tab: `header_timeout` (a request's headers did not
/// arrive within `http.header_read_timeout_ms`, or the reserve's timeout), `idle_timeout` (a keep-alive
/// connection idle for `http.keepalive_idle_ms`), `over_capacity` (the pending cap and its reserve were full: closed
/// at accept), `reserve_refused` (a reserve connection whose request was not a health check or an upgrade: 503).
pub const HTTP_CLOSE_REASONS: [&str; 4] = [
    "header_timeout",
    "idle_timeout",
    "over_capacity",
    "reserve_refused",
];

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "tabhub_tabs",
            "Open websocket tabs.",
            self.tabs.get(),
        );
        gauge(
            &mut out,
            "tabhub_users",
            "User sessions (one per user, lingering included).",
            self.sessions.get(),
        );
        gauge(
            &mut out,
            "tabhub_lingering_sessions",
            "Sessions with no tab, waiting for a reload before stopping.",
            self.lingering_sessions.get(),
        );
        gauge(
            &mut out,
            "tabhub_upstream_streams",
            "Open upstream SSE streams.",
            self.upstream_streams.get(),
        );
        self.handshakes.render(
            &mut out,
            "tabhub_handshakes_total",
            "Websocket handshakes by outcome.",
            "counter",
            &["outcome"],
        );
        self.closes.render(
            &mut out,
            "tabhub_closes_total",
            "Tabs closed, by close code.",
            "counter",
            &["code"],
        );
        self.commands.render(
            &mut out,
            "tabhub_commands_total",
            "Commands by name and outcome.",
            "counter",
            &["command", "outcome"],
        );
        self.loop_iterations.render(
            &mut out,
            "tabhub_loop_iterations_total",
            "Loop function iterations.",
            "counter",
            &["function"],
        );
        self.loop_seconds.render(
            &mut out,
            "tabhub_loop_duration_seconds_total",
            "Time spent in loop function iterations.",
            "counter",
            &["function"],
        );
        self.loop_skipped_ticks.render(
            &mut out,
            "tabhub_loop_skipped_ticks_total",
            "Ticks skipped because the previous iteration was still running.",
            "counter",
            &["function"],
        );
        self.loop_errors.render(
            &mut out,
            "tabhub_loop_errors_total",
            "Loop function iterations that failed or timed out.",
            "counter",
            &["function"],
        );
        self.backend_calls.render(
            &mut out,
            "tabhub_backend_calls_total",
            "Backend requests by backend and outcome.",
            "counter",
            &["backend", "outcome"],
        );
        counter(
            &mut out,
            "tabhub_messages_queued_total",
            "Messages queued to tabs.",
            self.messages_queued.get(),
        );
        counter(
            &mut out,
            "tabhub_messages_delivered_total",
            "Messages written to tabs' sockets.",
            self.messages_delivered.get(),
        );
        counter(
            &mut out,
            "tabhub_messages_dropped_total",
            "Messages dropped because a tab's queue was full.",
            self.messages_dropped.get(),
        );
        counter(
            &mut out,
            "tabhub_idle_drops_total",
            "Tabs dropped for not answering pings.",
            self.idle_drops.get(),
        );
        for reason in ["queue_full", "write_timeout"] {
            // Both reasons show from the start, at 0, so alerts see the series before the first close.
            self.slow_consumers.add(&[reason], 0.0);
        }
        self.slow_consumers.render(
            &mut out,
            "tabhub_slow_consumers_total",
            "Tabs closed with 4009 because they did not read: queue_full or write_timeout.",
            "counter",
            &["reason"],
        );
        let depth = self.messages_queued.get() as i64 - self.messages_delivered.get() as i64;
        gauge(
            &mut out,
            "tabhub_outbound_queue_depth",
            "Messages queued to tabs and not yet written (all tabs).",
            depth.max(0),
        );
        self.token_refreshes.render(
            &mut out,
            "tabhub_token_refreshes_total",
            "Access-token refreshes by outcome.",
            "counter",
            &["outcome"],
        );
        self.introspections.render(
            &mut out,
            "tabhub_introspections_total",
            "Token introspections at the identity provider by result (active, inactive, error, error_fail_open).",
            "counter",
            &["result"],
        );
        if self.broker_is_redis.load(Ordering::Relaxed) {
            gauge(
                &mut out,
                "tabhub_broker_up",
                "1 while the Redis broker is subscribed, 0 while it reconnects.",
                self.broker_up.get(),
            );
        }
        self.published.render(
            &mut out,
            "tabhub_published_messages_total",
            "Published messages delivered on this instance, by scope.",
            "counter",
            &["scope"],
        );
        self.publish_requests.render(
            &mut out,
            "tabhub_publish_requests_total",
            "Publish API requests by status.",
            "counter",
            &["status"],
        );
        gauge(
            &mut out,
            "tabhub_http_pending_connections",
            "HTTP connections open and not upgraded to a tab.",
            self.http_pending.get(),
        );
        for reason in HTTP_CLOSE_REASONS {
            // Every reason shows from the start, at 0, so alerts see the series before the first close.
            self.http_closed.add(&[reason], 0.0);
        }
        self.http_closed.render(
            &mut out,
            "tabhub_http_connections_closed_total",
            "HTTP connections (not tabs) closed or refused by the server, by reason.",
            "counter",
            &["reason"],
        );
        self.hook_deliveries.render(
            &mut out,
            "tabhub_hook_deliveries_total",
            "Webhook deliveries received, by kind and outcome.",
            "counter",
            &["kind", "outcome"],
        );
        self.hook_fanout.render(
            &mut out,
            "tabhub_hook_fanout_tabs",
            "Tabs each webhook event reached on this instance.",
        );
        self.access_checks.render(
            &mut out,
            "tabhub_access_checks_total",
            "Project access checks (webhook source), by outcome and source.",
            "counter",
            &["outcome", "source"],
        );
        out
    }
}
