//! The abuse scenario (issue 14, "hold under attack"): does one user attacking within the limits hurt everyone
//! else, and does tabhub's memory stay bounded and come back?
//!
//! Bystanders (`--users` x `--tabs`, default 200 x 1) hold their own project topic and the session-status loop,
//! as a Renku tab does, and send `ping {id}` every [`PING_EVERY`], timing each `ack`. One attacking user
//! (`--attack-tabs`, default 20) sends, from each tab, the abuse classes of issue 14 in turn (see
//! `clients::CLASSES`) paced just under the per-tab rate limit read back from the generated configuration, so
//! that no tab should be closed 4008. Three phases:
//!
//! 1. **quiet** ([`QUIET`]): the bystanders alone: ping p50/p99/max, RSS, backend calls/s;
//! 2. **attack** (`--duration`, default 10 s): the same while the attacker runs; RSS sampled every 250 ms for its
//!    peak; what the attacker sent and received, its tabs' closes, upstream SSE connections of its project;
//! 3. **after** ([`AFTER`]): the attacker's process gone (its sockets close): pings and RSS again, then RSS once
//!    more when the attacker's session has outlived its linger (`session.linger_ms`) and should be gone.
//!
//! The load runs in the client processes (the attacker in a process of its own): see `clients::Mode`.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{samples, Bench};
use crate::orchestrate::{self, Tabhub, Talker};
use crate::report::{pcts, round3, summary_ms};

/// How often each bystander pings (well within `limits.commands_per_second`).
const PING_EVERY: Duration = Duration::from_millis(100);
/// The quiet phase, before the attack, and the one after it.
const QUIET: Duration = Duration::from_secs(5);
const AFTER: Duration = Duration::from_secs(5);
/// Attack p99 / quiet p99 of the bystanders' pings (issue 14).
const P99_RATIO_TARGET: f64 = 2.0;
/// Peak RSS during the attack above the quiet RSS: the bound `docs/performance.md` documents (measured with the
/// default shape on the 2-core machines, with headroom; see the abuse section there).
const RSS_GROWTH_BOUND_MIB: f64 = 64.0;
/// Fraction of the rate limit the attacker uses: under it, but only just.
const PACE: f64 = 0.95;

/// What tabhub allows, read back from the configuration the bench generated (defaults as documented in
/// `docs/configuration.md` where the file leaves a key out).
#[derive(Debug)]
struct Allowed {
    commands_per_second: f64,
    commands_burst: f64,
    max_tabs_per_user: u64,
    max_message_bytes: u64,
    max_topics_per_tab: u64,
    linger_ms: u64,
}

impl Allowed {
    fn read(path: &std::path::Path) -> Result<Allowed, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: toml::Value =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let get = |table: &str, key: &str| v.get(table).and_then(|t| t.get(key));
        let float = |table: &str, key: &str, default: f64| {
            get(table, key)
                .and_then(|x| x.as_float().or_else(|| x.as_integer().map(|i| i as f64)))
                .unwrap_or(default)
        };
        let int = |table: &str, key: &str, default: u64| {
            get(table, key)
                .and_then(toml::Value::as_integer)
                .map_or(default, |i| i.max(0) as u64)
        };
        Ok(Allowed {
            commands_per_second: float("limits", "commands_per_second", 20.0),
            commands_burst: float("limits", "commands_burst", 40.0),
            max_tabs_per_user: int("limits", "max_tabs_per_user", 100),
            max_message_bytes: int("websocket", "max_message_bytes", 65_536),
            max_topics_per_tab: int("gitlab", "max_topics_per_tab", 100),
            linger_ms: int("session", "linger_ms", 15_000),
        })
    }
}

/// Counters of the fixture gateway at one moment.
struct Gateway {
    at: Instant,
    total: u64,
    kg: u64,
    attacker: u64,
}

/// One phase's figures.
struct Phase {
    pings: Value,
    /// Pings without an answer after 1 s at the end of the phase.
    lost: u64,
    rss_kib: u64,
    rss_peak_kib: u64,
    calls_per_s: f64,
    attacker_calls_per_s: f64,
    kg_calls_per_s: f64,
    cpu_s: f64,
    seconds: f64,
    bystander_closes: serde_json::Map<String, Value>,
}

impl Phase {
    fn json(&self) -> Value {
        json!({
            "seconds": round3(self.seconds),
            "bystander_pings": self.pings,
            "bystander_pings_unanswered_after_1s": self.lost,
            "bystander_closes": self.bystander_closes,
            "rss_kib_end": self.rss_kib,
            "rss_kib_peak": self.rss_peak_kib,
            "backend_calls_per_s": round3(self.calls_per_s),
            "attacker_backend_calls_per_s": round3(self.attacker_calls_per_s),
            "kg_calls_per_s": round3(self.kg_calls_per_s),
            "tabhub_cpu_s": round3(self.cpu_s),
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Sums the counts of `key` (a JSON object of counts) over the workers' reports.
fn merged(rs: &[Value], key: &str) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for r in rs {
        for (k, v) in r[key].as_object().into_iter().flatten() {
            let n = out.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
            out.insert(k.clone(), json!(n));
        }
    }
    out
}

fn sum(rs: &[Value], key: &str) -> u64 {
    rs.iter().map(|r| r[key].as_u64().unwrap_or(0)).sum()
}

fn counts(m: &serde_json::Map<String, Value>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Bench {
    /// The bystanders' workers (all but the last `attackers`).
    fn bystanders(&mut self) -> &mut [Talker] {
        let n = self.workers.len() - self.attackers;
        &mut self.workers[..n]
    }

    fn attacker_user(&self) -> usize {
        self.shape
            .groups
            .iter()
            .find(|g| g.attack)
            .map_or(0, |g| g.from)
    }

    async fn gateway(&self) -> Result<Gateway, String> {
        let u = self.attacker_user();
        let v = self
            .fixtures
            .get(&format!("/bench/gateway?from={u}&to={}", u + 1))
            .await?;
        Ok(Gateway {
            at: Instant::now(),
            total: v["total"].as_u64().unwrap_or(0),
            kg: v["kg"].as_u64().unwrap_or(0),
            attacker: v["per_user"][0].as_u64().unwrap_or(0),
        })
    }

    /// Upstream SSE connections of the attacker's project: (open now, ever accepted).
    async fn attacked_streams(&self) -> Result<(u64, u64), String> {
        let u = self.attacker_user();
        let (open, ever) = self.fixtures.streams(u, u + 1).await?;
        Ok((
            open.first().copied().unwrap_or(0),
            ever.first().copied().unwrap_or(0),
        ))
    }

    /// Waits `d`, sampling tabhub's RSS every 250 ms; then the bystanders' pings since the last report.
    async fn abuse_phase(&mut self, d: Duration) -> Result<Phase, String> {
        let g0 = self.gateway().await?;
        let cpu0 = self.cpu_secs();
        let end = Instant::now() + d;
        let mut peak = self.rss_kib();
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
            peak = peak.max(self.rss_kib());
        }
        let rss = self.rss_kib();
        let cpu = self.cpu_secs() - cpu0;
        let g1 = self.gateway().await?;
        let rs = orchestrate::all(
            self.bystanders(),
            &json!({"cmd": "report", "reset": true}),
            "report",
            Duration::from_secs(60),
        )
        .await?;
        // Unanswered pings count at their age at the end of the phase (a lower bound of their round trip).
        let mut rtt: Vec<u32> = rs
            .iter()
            .flat_map(|r| samples(&r["ping_rtt_us"]).chain(samples(&r["ping_unanswered_age_us"])))
            .collect();
        let lost = rs
            .iter()
            .flat_map(|r| samples(&r["ping_unanswered_age_us"]))
            .filter(|&age| age > 1_000_000)
            .count() as u64;
        let secs = (g1.at - g0.at).as_secs_f64().max(0.001);
        Ok(Phase {
            pings: summary_ms(&mut rtt),
            lost,
            rss_kib: rss,
            rss_peak_kib: peak.max(rss),
            calls_per_s: (g1.total - g0.total) as f64 / secs,
            attacker_calls_per_s: (g1.attacker - g0.attacker) as f64 / secs,
            kg_calls_per_s: (g1.kg - g0.kg) as f64 / secs,
            cpu_s: cpu,
            seconds: secs,
            bystander_closes: merged(&rs, "closes"),
        })
    }

    async fn attacker_report(&mut self) -> Result<Vec<Value>, String> {
        let n = self.workers.len() - self.attackers;
        orchestrate::all(
            &mut self.workers[n..],
            &json!({"cmd": "report", "reset": true, "counts_only": true}),
            "report",
            Duration::from_secs(60),
        )
        .await
    }

    /// Quiet, attack, after: see the module's documentation.
    pub(super) async fn abuse(&mut self, classes: &[String]) -> Result<(), String> {
        if let Some(c) = classes
            .iter()
            .find(|c| !crate::clients::CLASSES.contains(&c.as_str()))
        {
            return Err(format!(
                "--attack-classes: no class {c:?} (known: {})",
                crate::clients::CLASSES.join(", ")
            ));
        }
        if self.attackers == 0 {
            return Err("the abuse scenario needs an attacking group".into());
        }
        let allowed = Allowed::read(&self.config)?;
        let attack_tabs = self
            .shape
            .groups
            .iter()
            .filter(|g| g.attack)
            .map(|g| g.tabs)
            .sum::<usize>();
        if allowed.max_tabs_per_user > 0 && attack_tabs as u64 > allowed.max_tabs_per_user {
            return Err(format!(
                "--attack-tabs {attack_tabs} is over limits.max_tabs_per_user ({}): the attack stays within the limits",
                allowed.max_tabs_per_user
            ));
        }
        // Bystanders' loops past their first iteration; then their pings, a second of warm-up not counted.
        tokio::time::sleep_until(self.connected_at + Duration::from_secs(1)).await;
        let every = PING_EVERY.as_millis() as u64;
        orchestrate::all(
            self.bystanders(),
            &json!({"cmd": "mode", "mode": "ping", "every_ms": every}),
            "mode",
            Duration::from_secs(10),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        orchestrate::all(
            self.bystanders(),
            &json!({"cmd": "report", "reset": true, "counts_only": true}),
            "report",
            Duration::from_secs(60),
        )
        .await?;
        self.attacker_report().await?;

        let quiet = self.abuse_phase(QUIET).await?;

        let per_second = allowed.commands_per_second * PACE;
        // The opening burst leaves two tokens in the bucket; after it the bucket only fills.
        let burst = (allowed.commands_burst - 2.0).max(0.0) as u64;
        let frame_bytes = allowed.max_message_bytes.saturating_sub(64);
        let attack = json!({
            "cmd": "mode", "mode": "attack",
            "per_second": per_second,
            "burst": burst,
            "frame_bytes": frame_bytes,
            "topics": allowed.max_topics_per_tab,
            "kg_ids": 10,
            "classes": classes,
        });
        let (_, ever0) = self.attacked_streams().await?;
        let n = self.workers.len() - self.attackers;
        orchestrate::all(
            &mut self.workers[n..],
            &attack,
            "mode",
            Duration::from_secs(10),
        )
        .await?;
        let d = Duration::from_secs_f64(self.shape.duration.max(1.0));
        let under = self.abuse_phase(d).await?;
        let rs = self.attacker_report().await?;
        let (open_now, ever1) = self.attacked_streams().await?;

        // The attacker leaves: its process ends and its sockets close.
        let mut gone = Vec::new();
        for _ in 0..self.attackers {
            if let Some(w) = self.workers.pop() {
                gone.push(w);
            }
        }
        for w in gone {
            w.stop().await;
        }
        let left_at = Instant::now();
        self.attackers = 0;
        let after = self.abuse_phase(AFTER).await?;
        tokio::time::sleep_until(left_at + Duration::from_millis(allowed.linger_ms + 2_000)).await;
        let rss_after_linger = self.rss_kib();
        let (open_after, _) = self.attacked_streams().await?;
        orchestrate::all(
            &mut self.workers,
            &json!({"cmd": "mode", "mode": "idle"}),
            "mode",
            Duration::from_secs(10),
        )
        .await?;

        // What the attacker did and got.
        let sent = merged(&rs, "attack_sent");
        let sent_n: u64 = sent.values().filter_map(Value::as_u64).sum();
        let attack_s = under.seconds;
        let received = merged(&rs, "received");
        let closes = merged(&rs, "closes");
        let rate_limited = sum(&rs, "rate_limited");
        let still_open = sum(&rs, "open");
        let bytes = sum(&rs, "attack_bytes");

        let q99 = quiet.pings["p99_ms"].as_f64().unwrap_or(0.0);
        let a99 = under.pings["p99_ms"].as_f64().unwrap_or(f64::MAX);
        let ratio = if q99 > 0.0 { a99 / q99 } else { f64::INFINITY };
        let growth = mib(under.rss_peak_kib.saturating_sub(quiet.rss_kib));
        let fig_pings = |p: &Phase| {
            format!(
                "{} ({} of {} unanswered after 1 s)",
                pcts(&p.pings),
                p.lost,
                p.pings["n"]
            )
        };

        let r = &mut self.rep;
        r.fig(
            "limits (commands/s per tab, burst, max frame)",
            format!(
                "{} /s, {}, {} bytes",
                allowed.commands_per_second, allowed.commands_burst, allowed.max_message_bytes
            ),
        );
        r.fig("bystander ping p50 / p99 / max, quiet", fig_pings(&quiet));
        r.fig("bystander ping p50 / p99 / max, attack", fig_pings(&under));
        r.fig("bystander ping p50 / p99 / max, after", fig_pings(&after));
        r.target(
            "bystander ping p99, attack / quiet",
            format!("{ratio:.2} ({a99:.2} / {q99:.2} ms)"),
            "<= 2.0",
            ratio <= P99_RATIO_TARGET,
        );
        r.target(
            "tabhub RSS quiet / peak in attack / after 5 s (MiB)",
            format!(
                "{:.1} / {:.1} / {:.1} (+{growth:.1} at peak)",
                mib(quiet.rss_kib),
                mib(under.rss_peak_kib),
                mib(after.rss_kib)
            ),
            &format!("peak <= quiet + {RSS_GROWTH_BOUND_MIB} MiB"),
            growth <= RSS_GROWTH_BOUND_MIB,
        );
        r.fig(
            "tabhub RSS after the attacker's session linger",
            format!(
                "{:.1} MiB ({:+.1} vs quiet)",
                mib(rss_after_linger),
                mib(rss_after_linger) - mib(quiet.rss_kib)
            ),
        );
        r.fig(
            "attacker: commands sent per second (all tabs)",
            format!(
                "{:.0} ({sent_n} in {attack_s:.1} s from {attack_tabs} tabs, {:.1} MiB)",
                sent_n as f64 / attack_s,
                bytes as f64 / 1_048_576.0
            ),
        );
        r.fig("attacker: sent per class", counts(&sent));
        r.fig("attacker: received per type", counts(&received));
        r.target(
            "attacker: rate-limited commands / tabs closed",
            format!(
                "{rate_limited} / {} ({} of {attack_tabs} still open)",
                counts(&closes),
                still_open
            ),
            "0 / none",
            rate_limited == 0 && closes.is_empty(),
        );
        r.fig(
            "backend calls/s quiet / attack / after (attacker's, KG)",
            format!(
                "{:.1} / {:.1} / {:.1} (attack: attacker {:.1}, KG {:.1})",
                quiet.calls_per_s,
                under.calls_per_s,
                after.calls_per_s,
                under.attacker_calls_per_s,
                under.kg_calls_per_s
            ),
        );
        r.fig(
            "upstream SSE connections opened for the attacked project",
            format!(
                "{} during the attack (open at its end {open_now}, after the linger {open_after})",
                ever1.saturating_sub(ever0)
            ),
        );
        r.fig(
            "tabhub CPU quiet / attack / after",
            format!(
                "{:.0} / {:.0} / {:.0} % of a core",
                quiet.cpu_s / quiet.seconds * 100.0,
                under.cpu_s / under.seconds * 100.0,
                after.cpu_s / after.seconds * 100.0
            ),
        );
        let closes_by = [&quiet, &under, &after]
            .iter()
            .map(|p| p.bystander_closes.len())
            .sum::<usize>();
        r.target(
            "bystander tabs closed",
            counts(&merged(
                &[&quiet, &under, &after]
                    .iter()
                    .map(|p| json!({"closes": p.bystander_closes}))
                    .collect::<Vec<_>>(),
                "closes",
            )),
            "none",
            closes_by == 0,
        );
        r.set(
            "abuse",
            json!({
                "allowed": {
                    "commands_per_second": allowed.commands_per_second,
                    "commands_burst": allowed.commands_burst,
                    "max_tabs_per_user": allowed.max_tabs_per_user,
                    "max_message_bytes": allowed.max_message_bytes,
                    "max_topics_per_tab": allowed.max_topics_per_tab,
                    "linger_ms": allowed.linger_ms,
                },
                "ping_every_ms": every,
                "attack_tabs": attack_tabs,
                "attack_classes": if classes.is_empty() { json!("all") } else { json!(classes) },
                "attack_pace": {"per_second_per_tab": per_second, "opening_burst": burst, "frame_bytes": frame_bytes},
                "quiet": quiet.json(),
                "attack": under.json(),
                "after": after.json(),
                "p99_ratio": round3(ratio),
                "p99_ratio_target": P99_RATIO_TARGET,
                "rss_growth_mib_at_peak": round3(growth),
                "rss_growth_bound_mib": RSS_GROWTH_BOUND_MIB,
                "rss_kib_after_linger": rss_after_linger,
                "attacker": {
                    "sent": sent,
                    "sent_total": sent_n,
                    "sent_per_s": round3(sent_n as f64 / attack_s),
                    "bytes": bytes,
                    "received": received,
                    "rate_limited": rate_limited,
                    "closes": closes,
                    "tabs_open_at_end": still_open,
                },
                "attacked_project_streams": {
                    "opened_during_attack": ever1.saturating_sub(ever0),
                    "open_at_attack_end": open_now,
                    "open_after_linger": open_after,
                },
            }),
        );
        if !self.tabhubs.iter_mut().all(Tabhub::alive) {
            return Err("tabhub died during the attack".into());
        }
        Ok(())
    }
}
