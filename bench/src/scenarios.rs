//! The scenarios: a shape (users, tabs, topics, rate, duration, tick), then phases measured against tabhub.
//!
//! Every scenario connects its tabs first (handshake rate and failures, tabhub's memory before and after), then:
//! - `fanout`: events at a rate R for D seconds: delivery latency at each tab, deliveries/s, CPU per delivery;
//! - `loops`: the session-status loop of every user: backend calls/s and per user per tick, CPU per call,
//!   change-to-tab latency (skipped when tabhub has no such command);
//! - `streams`: upstream SSE connections per user and project;
//! - `storm`: every tab dropped and reconnected at once: time to full reconnection, backend calls it caused;
//! - `publish`: `POST /api/publish` at a rate (users and channels), broadcasts, then flat out: messages/s,
//!   deliveries, publish -> tab latency, CPU (two instances behind a shared Redis in the publish scenario, one
//!   instance with the memory broker in the smoke);
//! - `abuse`: bystanders ping while one user attacks within the rate limits: the bystanders' round trips and
//!   tabhub's memory before, during and after the attack (see [`Bench::abuse`]).

mod abuse;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::cli::{RunArgs, Scenario};
use crate::orchestrate::{self, Fixtures, Redis, Tabhub, Talker};
use crate::procs;
use crate::publisher::{self, Mix, Outcome};
use crate::report::{pcts, round3, spread, summary_ms, Report};
use crate::shape::{Group, Limits, Shape};
use crate::tokens;

/// The webhook secret of the bench's instances.
const HOOK_SECRET: &str = "bench-webhook-secret-0123456789";

fn uniform(args: &RunArgs, users: usize, tabs: usize) -> Vec<Group> {
    let (u, t) = (args.users.unwrap_or(users), args.tabs.unwrap_or(tabs));
    vec![Group {
        name: format!("{u} users x {t} tabs"),
        from: 0,
        to: u,
        tabs: t,
        reload: false,
        attack: false,
    }]
}

pub fn shape_of(args: &RunArgs) -> Shape {
    // (users, tabs, topics, rate, duration, tick)
    let (u, t, s, r, d, tick) = match args.scenario {
        Scenario::Smoke => (100, 3, 1, 300.0, 3.0, 1_000),
        Scenario::Memory => (4_000, 4, 0, 0.0, 0.0, 5_000),
        Scenario::Handshakes => (2_000, 4, 0, 0.0, 0.0, 5_000),
        Scenario::Fanout => (2_000, 2, 1, 2_000.0, 20.0, 5_000),
        Scenario::Loops => (16_000, 1, 0, 0.0, 30.0, 5_000),
        Scenario::CallsPerTick => (0, 0, 1, 0.0, 10.0, 1_000),
        Scenario::Storm => (4_000, 4, 0, 0.0, 0.0, 5_000),
        Scenario::Publish => (4_000, 4, 0, 1_000.0, 20.0, 5_000),
        Scenario::Abuse => (200, 1, 1, 0.0, 10.0, 5_000),
        Scenario::Webhooks => (8_000, 2, 1, 500.0, 20.0, 5_000),
    };
    let (channels, instances) = match args.scenario {
        Scenario::Smoke => (10, 1),
        Scenario::Publish => (100, 2),
        Scenario::Webhooks => (0, 2),
        _ => (0, 1),
    };
    let groups = if args.scenario == Scenario::CallsPerTick {
        let mut gs = Vec::new();
        let mut from = 0;
        for (name, n, tabs, reload) in [
            ("1 tab per user", 20, 1, false),
            ("4 tabs per user", 20, 4, false),
            ("50 tabs per user", 4, 50, false),
            ("1 tab, 10 quick reloads", 10, 1, true),
        ] {
            gs.push(Group {
                name: name.into(),
                from,
                to: from + n,
                tabs,
                reload,
                attack: false,
            });
            from += n;
        }
        gs
    } else if args.scenario == Scenario::Abuse {
        let mut gs = uniform(args, u, t);
        let attacker = gs[0].to;
        gs[0].name = format!("bystanders: {}", gs[0].name);
        gs.push(Group {
            name: format!("attacker: 1 user x {} tabs", args.attack_tabs),
            from: attacker,
            to: attacker + 1,
            tabs: args.attack_tabs,
            reload: false,
            attack: true,
        });
        gs
    } else {
        uniform(args, u, t)
    };
    let limits = if args.scenario == Scenario::Abuse {
        Limits::tabhub_defaults()
    } else {
        Limits::wide_open()
    };
    Shape {
        groups,
        topics: args.topics.unwrap_or(s),
        channels,
        instances,
        rate: args.rate.unwrap_or(r),
        duration: args.duration.unwrap_or(d),
        short_interval_ms: args.short_interval_ms.unwrap_or(tick),
        limits,
        source: if args.scenario == Scenario::Webhooks {
            "webhook"
        } else {
            "sse"
        },
    }
}

/// Splits the users over `n` client processes with balanced tabs: one plan (`a-b:T,...`) per process; then one
/// process of its own per attacking group (the abuse scenario), last.
fn split(shape: &Shape, n: usize) -> Vec<String> {
    let mut plans = split_plain(shape, n);
    for g in shape.groups.iter().filter(|g| g.attack) {
        plans.push(format!("{}-{}:{}", g.from, g.to, g.tabs));
    }
    plans
}

/// The users of `shape` beyond any attacking group, for [`split`].
fn split_plain(shape: &Shape, n: usize) -> Vec<String> {
    let attacking = |u: usize| {
        shape
            .groups
            .iter()
            .any(|g| g.attack && u >= g.from && u < g.to)
    };
    let total: usize = (0..shape.users())
        .filter(|&u| !attacking(u))
        .map(|u| shape.tabs_of(u))
        .sum();
    let per = total.div_ceil(n.max(1)).max(1);
    let mut plans: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new()];
    let mut filled = 0;
    for u in 0..shape.users() {
        let t = shape.tabs_of(u);
        if t == 0 || attacking(u) {
            continue;
        }
        if filled >= per && plans.len() < n {
            plans.push(Vec::new());
            filled = 0;
        }
        let plan = plans.last_mut().expect("one plan at least");
        match plan.last_mut() {
            Some(last) if last.1 == u && last.2 == t => last.1 = u + 1,
            _ => plan.push((u, u + 1, t)),
        }
        filled += t;
    }
    plans
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.iter()
                .map(|(a, b, t)| format!("{a}-{b}:{t}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

struct Bench {
    fixtures: Fixtures,
    /// The instances; the client processes are spread over them (a user's tabs all on one, as behind a sticky
    /// load balancer).
    tabhubs: Vec<Tabhub>,
    redis: Option<Redis>,
    workers: Vec<Talker>,
    shape: Shape,
    looping: bool,
    targets: bool,
    rep: Report,
    connected_at: Instant,
    /// The first instance's generated configuration.
    config: PathBuf,
    /// The last `attackers` workers hold the attacking groups.
    attackers: usize,
    /// `--attack-classes`.
    attack_classes: Vec<String>,
}

pub async fn run(args: &RunArgs) -> Result<(), String> {
    let shape = shape_of(args);
    let name = args.scenario.name();
    let mut rep = Report::default();
    let machine = procs::machine();
    let binary = orchestrate::tabhub_binary(args)?;
    let has_loop = orchestrate::has_command(&binary, &args.loop_command).await?;
    let wants_loop = matches!(
        args.scenario,
        Scenario::Smoke
            | Scenario::Loops
            | Scenario::CallsPerTick
            | Scenario::Storm
            | Scenario::Abuse
    );
    let looping = has_loop && wants_loop;
    let attackers = shape.groups.iter().filter(|g| g.attack).count();
    let attacking_tabs: usize = shape
        .groups
        .iter()
        .filter(|g| g.attack)
        .map(|g| (g.to - g.from) * g.tabs)
        .sum();
    let workers_n = args.workers.unwrap_or_else(|| {
        let t = shape.tabs() - attacking_tabs;
        t.div_ceil(args.tabs_per_worker.max(1))
            .max(if t >= 1_000 { 2 } else { 1 })
    });
    rep.set("scenario", json!(name));
    rep.set("machine", machine.clone());
    rep.set("started_unix", orchestrate::now_json());
    rep.set("loadavg_at_start", json!(procs::loadavg()));
    rep.set(
        "shape",
        json!({
            "groups": shape.groups.iter().map(|g| json!({
                "name": g.name, "users": g.to - g.from, "tabs_per_user": g.tabs, "reload": g.reload,
            })).collect::<Vec<_>>(),
            "users": shape.users(),
            "tabs": shape.tabs(),
            "topics_per_tab": shape.topics,
            "rate_per_s": shape.rate,
            "duration_s": shape.duration,
            "short_interval_ms": shape.short_interval_ms,
            "client_processes": workers_n + attackers,
            "limits": {
                "max_tabs_per_user": shape.limits.max_tabs_per_user,
                "commands_per_second": shape.limits.commands_per_second,
                "commands_burst": shape.limits.commands_burst,
            },
            "loop_command": args.loop_command,
            "loop_command_present": has_loop,
        }),
    );
    println!(
        "tabhub-bench {name}: {} users, {} tabs, {} topics/tab, {} client processes; tabhub = {}",
        shape.users(),
        shape.tabs(),
        shape.topics,
        workers_n + attackers,
        binary.display()
    );
    if wants_loop && !has_loop {
        println!(
            "skipped: needs {} (tabhub has no such command; the loop figures are left out)",
            args.loop_command
        );
        rep.set(
            "loops",
            json!({"skipped": format!("needs {}", args.loop_command)}),
        );
    }

    let fixtures = Fixtures::start(shape.short_interval_ms * 2).await?;
    let redis = if shape.instances > 1 {
        Some(Redis::start().await?)
    } else {
        None
    };
    let mut extra = format!("[publish]\nshared_secret = \"{}\"\n", publisher::SECRET);
    extra.push_str(&format!("\n[hooks]\nsecrets = [\"{HOOK_SECRET}\"]\n"));
    if let Some(r) = &redis {
        extra.push_str(&format!(
            "\n[broker]\nkind = \"redis\"\nredis_url = \"{}\"\n",
            r.url()
        ));
    }
    let mut tabhubs = Vec::new();
    let mut configs = Vec::new();
    for k in 0..shape.instances.max(1) {
        let id = format!("bench-{}", (b'a' + k as u8) as char);
        let config = PathBuf::from(format!("target/bench/{name}-tabhub-{id}.toml"));
        tabhubs.push(Tabhub::start(&binary, &config, &id, &fixtures, &shape, &extra).await?);
        configs.push(config);
    }
    let mut workers = Vec::new();
    for (i, plan) in split(&shape, workers_n).iter().enumerate() {
        workers.push(orchestrate::start_worker(
            i,
            plan,
            &tabhubs[i % tabhubs.len()],
            &fixtures,
            &shape,
            looping.then_some(args.loop_command.as_str()),
            args.concurrency,
        )?);
    }
    let mut mint_ms = Vec::new();
    for w in &mut workers {
        let m = w.expect("minted", Duration::from_secs(600)).await?;
        mint_ms.push(m["ms"].as_f64().unwrap_or(0.0));
    }
    rep.set("token_minting_ms_per_process", json!(mint_ms));

    let mut b = Bench {
        fixtures,
        tabhubs,
        redis,
        workers,
        shape,
        looping,
        targets: args.scenario != Scenario::Smoke,
        rep,
        connected_at: Instant::now(),
        config: configs.swap_remove(0),
        attackers,
        attack_classes: args.attack_classes.clone(),
    };
    let result = b.scenario(args.scenario).await;
    if let Err(e) = &result {
        b.rep.set("error", json!(e));
    }
    b.rep.set("finished_unix", orchestrate::now_json());
    b.rep.set("loadavg_at_end", json!(procs::loadavg()));
    b.rep.fig(
        "machine load average at start / end (1 min)",
        format!(
            "{} / {}",
            b.rep.json["loadavg_at_start"]
                .as_str()
                .unwrap_or("?")
                .split(' ')
                .next()
                .unwrap_or("?"),
            procs::loadavg().split(' ').next().unwrap_or("?")
        ),
    );
    let title = format!(
        "tabhub-bench {name} on {}",
        orchestrate::machine_line(&machine)
    );
    b.rep.print(&title);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| orchestrate::default_out(name));
    b.rep.write(&out)?;
    println!("\nJSON: {}", out.display());
    for w in b.workers.drain(..) {
        w.stop().await;
    }
    for t in b.tabhubs.drain(..) {
        t.stop().await;
    }
    if let Some(r) = b.redis.take() {
        r.stop().await;
    }
    b.fixtures.talker.stop().await;
    result
}

impl Bench {
    async fn scenario(&mut self, s: Scenario) -> Result<(), String> {
        self.connect().await?;
        match s {
            Scenario::Smoke => {
                self.fanout().await?;
                self.publish().await?;
                self.streams().await?;
                if self.looping {
                    self.loops(2).await?;
                }
                self.storm().await?;
            }
            Scenario::Memory => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let rss = self.rss_kib();
                self.rep.fig(
                    "tabhub RSS after 5 s more",
                    format!("{:.1} MiB", rss as f64 / 1024.0),
                );
                self.rep.set("rss_kib_after_idle", json!(rss));
            }
            Scenario::Handshakes => self.storm().await?,
            Scenario::Webhooks => self.webhooks().await?,
            Scenario::Fanout => {
                self.fanout().await?;
                self.streams().await?;
            }
            Scenario::Loops => {
                if self.looping {
                    let ticks = (self.shape.duration * 1_000.0
                        / self.shape.short_interval_ms as f64)
                        .round()
                        .max(1.0) as u64;
                    self.loops(ticks).await?;
                }
            }
            Scenario::CallsPerTick => {
                if self.looping {
                    let ticks = (self.shape.duration * 1_000.0
                        / self.shape.short_interval_ms as f64)
                        .round()
                        .max(1.0) as u64;
                    self.loops(ticks).await?;
                } else {
                    self.reload_only().await?;
                }
                self.streams().await?;
            }
            Scenario::Storm => self.storm().await?,
            Scenario::Publish => self.publish().await?,
            Scenario::Abuse => self.abuse(&self.attack_classes.clone()).await?,
        }
        if !self.tabhubs.iter_mut().all(Tabhub::alive) {
            return Err("tabhub died during the run".into());
        }
        Ok(())
    }

    /// Resident memory of all instances, KiB.
    fn rss_kib(&self) -> u64 {
        self.tabhubs.iter().map(Tabhub::rss_kib).sum()
    }

    /// CPU seconds of all instances.
    fn cpu_secs(&self) -> f64 {
        self.tabhubs.iter().map(Tabhub::cpu_secs).sum()
    }

    fn fds(&self) -> usize {
        self.tabhubs.iter().map(Tabhub::fds).sum()
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(self.shape.short_interval_ms)
    }

    /// Opens every tab: handshake figures and memory.
    async fn connect(&mut self) -> Result<(), String> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss0 = self.rss_kib();
        let cpu0 = self.cpu_secs();
        let rs = orchestrate::all(
            &mut self.workers,
            &json!({"cmd": "connect"}),
            "connected",
            Duration::from_secs(600),
        )
        .await?;
        self.connected_at = Instant::now();
        let cpu1 = self.cpu_secs();
        let hs = handshakes(&rs);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss1 = self.rss_kib();
        let tabs = self.shape.tabs();
        let ok = hs["ok"].as_u64().unwrap_or(0);
        let per_tab = (rss1.saturating_sub(rss0)) as f64 / ok.max(1) as f64;
        let rate = hs["rate_per_s"].as_f64().unwrap_or(0.0);
        let failed = hs["failed"].as_u64().unwrap_or(0);
        let attempts_failed = hs["attempts_failed"].as_u64().unwrap_or(0);
        let t = self.targets;
        // Tabs that only connect: the handshake and memory targets are about them.
        let bare = self.shape.topics == 0 && self.shape.channels == 0 && !self.looping;
        let fds = self.fds();
        let r = &mut self.rep;
        r.fig(
            "users x tabs (topics per tab)",
            format!(
                "{} x {:.1} ({})",
                self.shape.users(),
                tabs as f64 / self.shape.users().max(1) as f64,
                self.shape.topics
            ),
        );
        if t {
            r.target(
                "tabs connected",
                format!("{ok} / {tabs}"),
                "all",
                ok as usize == tabs,
            );
            r.target(
                "handshake failures (attempts)",
                format!("{failed} ({attempts_failed})"),
                "0",
                attempts_failed == 0,
            );
            if bare {
                r.target(
                    "handshake rate",
                    format!("{rate:.0} tabs/s"),
                    ">= 5000 tabs/s",
                    rate >= 5_000.0,
                );
            } else {
                // Each tab also subscribes or starts its user's loop: more than a handshake.
                r.fig(
                    "handshake rate (with the tabs' first commands)",
                    format!("{rate:.0} tabs/s"),
                );
            }
        } else {
            r.fig("tabs connected", format!("{ok} / {tabs}"));
            r.fig(
                "handshake failures (attempts)",
                format!("{failed} ({attempts_failed})"),
            );
            r.fig("handshake rate", format!("{rate:.0} tabs/s"));
        }
        r.fig("handshake time p50 / p99 / max", pcts(&hs["time"]));
        r.fig(
            "tabhub CPU per handshake",
            format!("{:.0} us", (cpu1 - cpu0) / ok.max(1) as f64 * 1e6),
        );
        r.fig(
            "tabhub RSS before / after connecting",
            format!(
                "{:.1} / {:.1} MiB",
                rss0 as f64 / 1024.0,
                rss1 as f64 / 1024.0
            ),
        );
        if t && bare {
            r.target(
                "tabhub RSS per tab",
                format!("{per_tab:.1} KiB"),
                "<= 16 KiB",
                per_tab <= 16.0,
            );
        } else {
            r.fig(
                "tabhub RSS per tab (with its share of upstreams)",
                format!("{per_tab:.1} KiB"),
            );
        }
        r.fig("tabhub open files", fds.to_string());
        r.set(
            "connect",
            json!({
                "handshakes": hs,
                "rss_kib_before": rss0,
                "rss_kib_after": rss1,
                "rss_kib_per_tab": round3(per_tab),
                "tabhub_cpu_s": round3(cpu1 - cpu0),
                "tabhub_open_files": fds,
                "tabhub_threads": procs::threads(self.tabhubs[0].pid),
            }),
        );
        Ok(())
    }

    async fn reports(&mut self, extra: Value) -> Result<Vec<Value>, String> {
        let mut cmd = json!({"cmd": "report", "reset": true});
        if let (Value::Object(c), Value::Object(e)) = (&mut cmd, extra) {
            c.extend(e);
        }
        orchestrate::all(&mut self.workers, &cmd, "report", Duration::from_secs(60)).await
    }

    /// GitLab-shaped webhook deliveries at the shape's rate, posted to the instances in turn (Redis carries each to
    /// the other): webhooks/s in, deliveries/s out, latency from the post to each tab, CPU per delivery.
    async fn webhooks(&mut self) -> Result<(), String> {
        if self.shape.topics == 0 || self.shape.rate <= 0.0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.reports(json!({})).await?;
        let types = tokens::event_types(self.shape.topics);
        let targets: Vec<String> = self
            .tabhubs
            .iter()
            .map(|t| format!("http://{}/hooks/gitlab", t.addr))
            .collect();
        let cpu0 = self.cpu_secs();
        let t0 = Instant::now();
        let status = self
            .fixtures
            .post(
                "/bench/hooks",
                &json!({
                    "rate": self.shape.rate,
                    "seconds": self.shape.duration,
                    "users": self.shape.users(),
                    "types": types,
                    "targets": targets,
                    "secret": HOOK_SECRET,
                }),
            )
            .await?;
        if status != 202 {
            return Err(format!("posting refused: {status}"));
        }
        let deadline = t0 + Duration::from_secs_f64(self.shape.duration + 60.0);
        let done = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let s = self.fixtures.get("/bench/hooks").await?;
            if s["running"] == false {
                break s;
            }
            if Instant::now() > deadline {
                return Err("the webhook sender did not finish".into());
            }
        };
        let post_s = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu = self.cpu_secs() - cpu0;
        let rs = self.reports(json!({})).await?;
        let mut lat: Vec<u32> = Vec::new();
        let mut delivered = 0u64;
        for r in &rs {
            delivered += r["events"].as_u64().unwrap_or(0);
            lat.extend(samples(&r["event_lat_us"]));
        }
        let lat = summary_ms(&mut lat);
        let ok = done["ok"].as_u64().unwrap_or(0);
        let failed = done["failed"].as_u64().unwrap_or(0);
        // Each delivery reaches every tab of its project's user.
        let expected = ok as f64 * self.shape.tabs() as f64 / self.shape.users().max(1) as f64;
        let in_per_s = ok as f64 / post_s.max(0.001);
        let out_per_s = delivered as f64 / post_s.max(0.001);
        let cpu_per_m = cpu / delivered.max(1) as f64 * 1e6;
        let r = &mut self.rep;
        r.fig(
            "webhooks posted (2xx / failed)",
            format!("{ok} / {failed} in {post_s:.1} s"),
        );
        r.fig("webhooks per second in", format!("{in_per_s:.0}"));
        r.fig(
            "deliveries (received / expected)",
            format!("{delivered} / {expected:.0}"),
        );
        r.fig("deliveries per second out", format!("{out_per_s:.0}"));
        r.fig("webhook -> tab latency p50 / p99 / max", pcts(&lat));
        r.fig(
            "tabhub CPU per million deliveries (both instances)",
            format!("{cpu_per_m:.1} s"),
        );
        r.set(
            "webhooks",
            json!({
                "posted_ok": ok,
                "failed": failed,
                "post_seconds": round3(post_s),
                "webhooks_per_s": round3(in_per_s),
                "delivered": delivered,
                "expected": expected,
                "deliveries_per_s": round3(out_per_s),
                "latency": lat,
                "cpu_s": round3(cpu),
            }),
        );
        Ok(())
    }

    /// Upstream events at the shape's rate: latency from emit to each tab, deliveries, CPU per delivery.
    async fn fanout(&mut self) -> Result<(), String> {
        if self.shape.topics == 0 || self.shape.rate <= 0.0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.reports(json!({})).await?;
        let types = tokens::event_types(self.shape.topics);
        let cpu0 = self.cpu_secs();
        let t0 = Instant::now();
        let status = self
            .fixtures
            .post(
                "/bench/emit",
                &json!({
                    "rate": self.shape.rate,
                    "seconds": self.shape.duration,
                    "users": self.shape.users(),
                    "types": types,
                }),
            )
            .await?;
        if status != 202 {
            return Err(format!("emit refused: {status}"));
        }
        let deadline = t0 + Duration::from_secs_f64(self.shape.duration + 30.0);
        let emitted = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let s = self.fixtures.get("/bench/emit").await?;
            if s["running"] == false {
                break s["emitted"].as_u64().unwrap_or(0);
            }
            if Instant::now() > deadline {
                return Err("the emitter did not finish".into());
            }
        };
        let emit_s = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu = self.cpu_secs() - cpu0;
        let rs = self.reports(json!({})).await?;
        let mut lat: Vec<u32> = Vec::new();
        let mut delivered = 0u64;
        for r in &rs {
            delivered += r["events"].as_u64().unwrap_or(0);
            lat.extend(samples(&r["event_lat_us"]));
        }
        let lat = summary_ms(&mut lat);
        // Each event reaches every tab of its user (each tab holds all of its user's types).
        let expected = emitted as f64 * self.shape.tabs() as f64 / self.shape.users().max(1) as f64;
        let per_s = delivered as f64 / self.shape.duration.max(0.001);
        let cpu_per_m = cpu / delivered.max(1) as f64 * 1e6;
        let p99 = lat["p99_ms"].as_f64().unwrap_or(f64::MAX);
        let rss_now = self.rss_kib();
        let r = &mut self.rep;
        r.fig(
            "upstream events emitted",
            format!("{emitted} in {emit_s:.1} s ({:.0}/s)", self.shape.rate),
        );
        r.fig(
            "deliveries (received / expected)",
            format!("{delivered} / {expected:.0}"),
        );
        r.fig("deliveries per second", format!("{per_s:.0}"));
        if self.targets {
            r.target(
                "fan-out latency p50 / p99 / max",
                pcts(&lat),
                "p99 <= 10 ms",
                p99 <= 10.0,
            );
        } else {
            r.fig("fan-out latency p50 / p99 / max", pcts(&lat));
        }
        r.fig(
            "tabhub CPU per million deliveries",
            format!("{cpu_per_m:.1} s"),
        );
        r.set(
            "fanout",
            json!({
                "emitted": emitted,
                "emit_seconds": round3(emit_s),
                "delivered": delivered,
                "expected": expected,
                "deliveries_per_s": round3(per_s),
                "latency": lat,
                "tabhub_cpu_s": round3(cpu),
                "tabhub_cpu_s_per_million_deliveries": round3(cpu_per_m),
                "tabhub_rss_kib": rss_now,
            }),
        );
        Ok(())
    }

    /// Upstream SSE connections per user and project, per group: open now and ever opened.
    async fn streams(&mut self) -> Result<(), String> {
        if self.shape.topics == 0 {
            return Ok(());
        }
        let mut out = Vec::new();
        for g in self.shape.groups.clone() {
            let (open, total) = self.fixtures.streams(g.from, g.to).await?;
            let f = |v: &[u64]| spread(&v.iter().map(|&x| x as f64).collect::<Vec<_>>());
            let (o, t) = (f(&open), f(&total));
            let exactly_one = open.iter().all(|&x| x == 1);
            let label = format!("SSE connections per user and project, {}", g.name);
            let value = format!(
                "open {}..{}, ever {}..{}",
                o["min"], o["max"], t["min"], t["max"]
            );
            if self.targets {
                self.rep
                    .target(&label, value, "exactly 1 open", exactly_one);
            } else {
                self.rep.fig(&label, value);
            }
            out.push(json!({"group": g.name, "open": o, "ever_opened": t}));
        }
        self.rep.set("upstream_streams", json!(out));
        Ok(())
    }

    /// Without a loop command: the reload group still reloads (its streams are then measured).
    async fn reload_only(&mut self) -> Result<(), String> {
        let Some(g) = self.shape.groups.iter().find(|g| g.reload).cloned() else {
            return Ok(());
        };
        let rs = orchestrate::all(
            &mut self.workers,
            &json!({"cmd": "reload", "from": g.from, "to": g.to, "slot": 0, "times": 10, "gap_ms": 200}),
            "reloaded",
            Duration::from_secs(120),
        )
        .await?;
        let ok: u64 = rs.iter().map(|r| r["ok"].as_u64().unwrap_or(0)).sum();
        self.rep.fig("quick reloads done", ok.to_string());
        Ok(())
    }

    /// The session-status loop over `ticks` ticks: backend calls/s, per user per tick (per group), CPU per call,
    /// change latency; the reload group reloads meanwhile.
    async fn loops(&mut self, ticks: u64) -> Result<(), String> {
        let tick = self.tick();
        // Past every session's first two (randomly placed) iterations.
        tokio::time::sleep_until(self.connected_at + tick * 2 + Duration::from_millis(500)).await;
        self.reports(json!({})).await?;
        let users = self.shape.users();
        let cpu0 = self.cpu_secs();
        let t0 = Instant::now();
        let (tot0, per0) = self.fixtures.calls(0, users).await?;
        let reload = self.shape.groups.iter().find(|g| g.reload).cloned();
        if let Some(g) = &reload {
            let cmd = json!({"cmd": "reload", "from": g.from, "to": g.to, "slot": 0, "times": 10, "gap_ms": 200});
            for w in &mut self.workers {
                w.send(&cmd).await?;
            }
        }
        tokio::time::sleep_until(t0 + tick * ticks as u32).await;
        let (tot1, per1) = self.fixtures.calls(0, users).await?;
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = self.cpu_secs() - cpu0;
        if reload.is_some() {
            let mut ok = 0;
            for w in &mut self.workers {
                ok += w.expect("reloaded", Duration::from_secs(120)).await?["ok"]
                    .as_u64()
                    .unwrap_or(0);
            }
            self.rep.fig("quick reloads done", ok.to_string());
        }
        let calls = tot1 - tot0;
        let per_s = calls as f64 / elapsed;
        let cpu_per_call = cpu / calls.max(1) as f64;
        self.rep.fig(
            "backend calls per second (loops)",
            format!("{per_s:.0} ({calls} in {elapsed:.1} s)"),
        );
        self.rep.fig(
            "tabhub CPU per backend call",
            format!("{:.0} us", cpu_per_call * 1e6),
        );
        let mut groups = Vec::new();
        for g in self.shape.groups.clone() {
            let per_tick: Vec<f64> = (g.from..g.to)
                .map(|u| (per1[u] - per0[u]) as f64 / ticks as f64)
                .collect();
            let s = spread(&per_tick);
            let off = (g.from..g.to)
                .filter(|&u| per1[u] - per0[u] != ticks)
                .count();
            let mean = s["mean"].as_f64().unwrap_or(0.0);
            let label = format!("backend calls per user per tick, {}", g.name);
            let value = format!(
                "{:.3} (min {}, max {}; {off} users off {ticks})",
                mean, s["min"], s["max"]
            );
            // A tick landing on the window's edge counts once too many or too few: tolerated on 0.5% of users.
            let ok = (mean - 1.0).abs() <= 0.01 && off * 200 <= (g.to - g.from).max(1);
            if self.targets {
                self.rep.target(&label, value, "exactly 1", ok);
            } else {
                self.rep.fig(&label, value);
            }
            groups.push(json!({"group": g.name, "per_user_per_tick": s, "users_off": off}));
        }
        let epoch = self.fixtures.epoch_ns;
        let period = self.fixtures.period_ns;
        let rs = self
            .reports(json!({
                "epoch_ns": epoch, "period_ns": period,
                "tick_ns": tick.as_nanos() as u64, "slack_ns": 1_000_000_000u64,
            }))
            .await?;
        let mut lat = Vec::new();
        let (mut changes, mut late, mut repeated) = (0, 0, 0);
        for r in &rs {
            lat.extend(samples(&r["change_lat_us"]));
            changes += r["changes"].as_u64().unwrap_or(0);
            late += r["late_tabs"].as_u64().unwrap_or(0);
            repeated += r["repeated"].as_u64().unwrap_or(0);
        }
        let lat = summary_ms(&mut lat);
        let max = lat["max_ms"].as_f64().unwrap_or(f64::MAX);
        let within = max <= tick.as_millis() as f64 + 100.0 && late == 0 && changes > 0;
        let value = format!(
            "{} ({changes} changes, {late} tabs late, {repeated} repeated)",
            pcts(&lat)
        );
        if self.targets {
            self.rep.target(
                "change -> tab latency p50 / p99 / max",
                value,
                "every change within one tick",
                within,
            );
        } else {
            self.rep.fig("change -> tab latency p50 / p99 / max", value);
        }
        let label = "session-status notifications without a change";
        if self.targets {
            self.rep
                .target(label, repeated.to_string(), "0", repeated == 0);
        } else {
            self.rep.fig(label, repeated.to_string());
        }
        self.rep.set(
            "loops",
            json!({
                "ticks": ticks,
                "tick_ms": tick.as_millis() as u64,
                "backend_calls": calls,
                "seconds": round3(elapsed),
                "backend_calls_per_s": round3(per_s),
                "tabhub_cpu_s": round3(cpu),
                "tabhub_cpu_us_per_backend_call": round3(cpu_per_call * 1e6),
                "groups": groups,
                "change_latency": lat,
                "changes": changes,
                "late_tabs": late,
                "repeated_notifications": repeated,
            }),
        );
        Ok(())
    }

    /// Published messages through `POST /api/publish` on every instance in turn: at the shape's rate (users,
    /// and every 20th message to a channel), then broadcasts, then as fast as tabhub answers.
    async fn publish(&mut self) -> Result<(), String> {
        let urls: Vec<String> = self
            .tabhubs
            .iter()
            .map(|t| format!("http://{}/api/publish", t.addr))
            .collect();
        let users = self.shape.users();
        let mix = Mix {
            users,
            tabs_per_user: self.shape.tabs() / users.max(1),
            groups: self.shape.channels,
            topic_every: if self.shape.channels > 0 { 20 } else { 0 },
            broadcast: false,
        };
        let d = self.shape.duration.max(1.0);
        let short = d.min(10.0);
        let rate = if self.shape.rate > 0.0 {
            self.shape.rate
        } else {
            1_000.0
        };
        let broker = if self.redis.is_some() {
            "redis"
        } else {
            "memory"
        };
        self.rep.fig(
            "publish: instances, broker, channels",
            format!(
                "{}, {broker}, {} (every 20th message to a channel)",
                self.tabhubs.len(),
                self.shape.channels
            ),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.reports(json!({"counts_only": true})).await?;
        let mut phases = Vec::new();
        let at_rate = publisher::at_rate(&urls, mix, rate, d, 512);
        phases.push(self.publish_phase("at rate", at_rate).await?);
        let broadcast = Mix {
            broadcast: true,
            ..mix
        };
        let casts = publisher::at_rate(&urls, broadcast, 2.0, short, 8);
        phases.push(self.publish_phase("broadcast", casts).await?);
        let flat = publisher::flat_out(&urls, mix, 32, 20, short);
        phases.push(self.publish_phase("flat out", flat).await?);
        self.rep.set(
            "publish",
            json!({"broker": broker, "instances": self.tabhubs.len(), "channels": self.shape.channels, "phases": phases}),
        );
        Ok(())
    }

    /// Runs one publishing run, waits for its deliveries to settle, and reports them.
    async fn publish_phase(
        &mut self,
        name: &str,
        run: impl std::future::Future<Output = Result<Outcome, String>>,
    ) -> Result<Value, String> {
        let redis0 = self.redis.as_ref().map_or(0.0, Redis::cpu_secs);
        let cpu0 = self.cpu_secs();
        let o = run.await?;
        // Until every expected delivery arrived, or nothing more comes for a second (bounded).
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut last, mut still) = (u64::MAX, 0);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rs = orchestrate::all(
                &mut self.workers,
                &json!({"cmd": "report", "counts_only": true}),
                "report",
                Duration::from_secs(60),
            )
            .await?;
            let n = published(&rs).0;
            still = if n == last { still + 1 } else { 0 };
            last = n;
            if n >= o.expected || still >= 2 || Instant::now() > deadline {
                break;
            }
        }
        let cpu = self.cpu_secs() - cpu0;
        let redis = self.redis.as_ref().map_or(0.0, Redis::cpu_secs) - redis0;
        let rs = self.reports(json!({})).await?;
        let (delivered, scopes) = published(&rs);
        let mut lat: Vec<u32> = rs
            .iter()
            .flat_map(|r| samples(&r["publish_lat_us"]))
            .collect();
        let lat = summary_ms(&mut lat);
        let mut req = o.request_us.clone();
        let req = summary_ms(&mut req);
        let secs = o.seconds.max(0.001);
        let cpu_per_m = cpu / delivered.max(1) as f64 * 1e6;
        let failures: u64 = o.failures.values().sum();
        let r = &mut self.rep;
        r.fig(
            &format!("publish {name}: messages accepted / sent (requests)"),
            format!(
                "{} / {} ({} requests, {failures} failed{})",
                o.accepted,
                o.sent,
                o.requests,
                if o.behind > 0 {
                    format!(", {} behind", o.behind)
                } else {
                    String::new()
                }
            ),
        );
        r.fig(
            &format!("publish {name}: messages per second"),
            format!("{:.0}", o.accepted as f64 / secs),
        );
        let label = format!("publish {name}: deliveries (received / expected)");
        let value = format!(
            "{delivered} / {} ({:.0}/s)",
            o.expected,
            delivered as f64 / secs
        );
        if self.targets {
            r.target(
                &label,
                value,
                "every one, once",
                delivered == o.expected && failures == 0,
            );
        } else {
            r.fig(&label, value);
        }
        r.fig(
            &format!("publish {name}: publish -> tab latency p50 / p99 / max"),
            pcts(&lat),
        );
        r.fig(
            &format!("publish {name}: request time p50 / p99 / max"),
            pcts(&req),
        );
        r.fig(
            &format!("publish {name}: CPU per million deliveries (tabhub / redis)"),
            format!(
                "{cpu_per_m:.1} s / {:.1} s",
                redis / delivered.max(1) as f64 * 1e6
            ),
        );
        Ok(json!({
            "phase": name,
            "sent": o.sent,
            "accepted": o.accepted,
            "requests": o.requests,
            "failures": o.failures,
            "behind": o.behind,
            "seconds": round3(o.seconds),
            "messages_per_s": round3(o.accepted as f64 / secs),
            "expected_deliveries": o.expected,
            "delivered": delivered,
            "delivered_by_scope": scopes,
            "deliveries_per_s": round3(delivered as f64 / secs),
            "latency": lat,
            "request_time": req,
            "tabhub_cpu_s": round3(cpu),
            "tabhub_cpu_s_per_million_deliveries": round3(cpu_per_m),
            "redis_cpu_s": round3(redis),
        }))
    }

    /// Every tab dropped and reconnected at once.
    async fn storm(&mut self) -> Result<(), String> {
        let tick = self.tick();
        let users = self.shape.users();
        if self.looping {
            tokio::time::sleep_until(self.connected_at + tick * 2 + Duration::from_millis(500))
                .await;
        }
        let (_, ever0) = self.fixtures.streams(0, users).await?;
        let (tot0, per0) = self.fixtures.calls(0, users).await?;
        let cpu0 = self.cpu_secs();
        let t0 = Instant::now();
        let rs = orchestrate::all(
            &mut self.workers,
            &json!({"cmd": "connect", "drop_first": true}),
            "connected",
            Duration::from_secs(600),
        )
        .await?;
        let cpu = self.cpu_secs() - cpu0;
        let hs = handshakes(&rs);
        let drop_ns = earliest(&rs, "drop_ns");
        let ready_ns = latest(&rs, "last_ready_ns");
        let secs = ready_ns.saturating_sub(drop_ns) as f64 / 1e9;
        let ok = hs["ok"].as_u64().unwrap_or(0);
        let tabs = self.shape.tabs();
        let label = format!("reconnect storm: {tabs} tabs back after");
        let value = format!(
            "{secs:.2} s ({ok} ok, {} failed, {:.0} tabs/s)",
            hs["failed"],
            hs["rate_per_s"].as_f64().unwrap_or(0.0)
        );
        if self.targets {
            self.rep.target(
                &label,
                value,
                "<= 10 s, all",
                secs <= 10.0 && ok as usize == tabs,
            );
        } else {
            self.rep.fig(&label, value);
        }
        self.rep.fig(
            "reconnect handshake time p50 / p99 / max",
            pcts(&hs["time"]),
        );
        let mut storm = json!({
            "seconds_to_full_reconnection": round3(secs),
            "handshakes": hs,
            "tabhub_cpu_s": round3(cpu),
        });
        if self.shape.topics > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (open, ever1) = self.fixtures.streams(0, users).await?;
            let reopened: u64 = ever1.iter().sum::<u64>() - ever0.iter().sum::<u64>();
            let open_max = open.iter().copied().max().unwrap_or(0);
            self.rep.fig(
                "upstream SSE connections reopened by the storm",
                format!("{reopened} (open per project now: max {open_max})"),
            );
            storm["upstream_reopened"] = json!(reopened);
        }
        if self.looping {
            // Whole ticks covering the storm: every user should have made exactly that many calls.
            let k = ((t0.elapsed().as_secs_f64() + 1.0) / tick.as_secs_f64()).ceil() as u64 + 1;
            tokio::time::sleep_until(t0 + tick * k as u32).await;
            let (tot1, per1) = self.fixtures.calls(0, users).await?;
            let normal = users as u64 * k;
            let calls = tot1 - tot0;
            let beyond: u64 = (0..users)
                .map(|u| (per1[u] - per0[u]).saturating_sub(k))
                .sum();
            let value = format!(
                "{} ({calls} calls in {k} ticks, normal {normal}; {beyond} beyond per-user ticks)",
                calls as i64 - normal as i64
            );
            // Window-edge ticks: tolerated on 0.5% of users, as in the loops figures.
            let ok = calls <= normal + (users as u64).div_ceil(200);
            if self.targets {
                self.rep.target(
                    "backend calls caused by the storm",
                    value,
                    "0 beyond normal ticks",
                    ok,
                );
            } else {
                self.rep.fig("backend calls caused by the storm", value);
            }
            storm["backend_calls"] =
                json!({"ticks": k, "calls": calls, "normal": normal, "beyond_per_user": beyond});
        }
        self.rep.set("storm", storm);
        Ok(())
    }
}

/// Published messages received by all tabs, in all and per scope.
fn published(rs: &[Value]) -> (u64, serde_json::Map<String, Value>) {
    let mut scopes = serde_json::Map::new();
    let mut total = 0;
    for r in rs {
        for (k, v) in r["published"].as_object().into_iter().flatten() {
            let n = v.as_u64().unwrap_or(0);
            total += n;
            let sum = scopes.get(k).and_then(Value::as_u64).unwrap_or(0) + n;
            scopes.insert(k.clone(), json!(sum));
        }
    }
    (total, scopes)
}

/// The smallest and the largest `key` (a time in ns) over the workers' answers; 0 when none has it.
fn earliest(rs: &[Value], key: &str) -> u64 {
    rs.iter().filter_map(|r| r[key].as_u64()).min().unwrap_or(0)
}

fn latest(rs: &[Value], key: &str) -> u64 {
    rs.iter().filter_map(|r| r[key].as_u64()).max().unwrap_or(0)
}

fn samples(v: &Value) -> impl Iterator<Item = u32> + '_ {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_u64().map(|n| n as u32))
}

/// Merges the workers' `connected` answers: counts, errors, rate (tabs whose `init` arrived over the span from
/// the first start to the last `init`), handshake times.
fn handshakes(rs: &[Value]) -> Value {
    let sum = |k: &str| rs.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let start = earliest(rs, "start_ns");
    let end = latest(rs, "last_init_ns");
    let ok = sum("ok");
    let span = end.saturating_sub(start) as f64 / 1e9;
    let mut times: Vec<u32> = rs
        .iter()
        .flat_map(|r| samples(&r["handshake_us"]))
        .collect();
    let mut errors = serde_json::Map::new();
    for r in rs {
        if let Some(m) = r["errors"].as_object() {
            for (k, v) in m {
                let n =
                    errors.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
                errors.insert(k.clone(), json!(n));
            }
        }
    }
    json!({
        "tabs": sum("tabs"),
        "ok": ok,
        "failed": sum("failed"),
        "attempts_failed": sum("attempts_failed"),
        "errors": errors,
        "seconds": round3(span),
        "rate_per_s": round3(if span > 0.0 { ok as f64 / span } else { 0.0 }),
        "time": summary_ms(&mut times),
        "timed_out": rs.iter().any(|r| r["timed_out"] == true),
    })
}
