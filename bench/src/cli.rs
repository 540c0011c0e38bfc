//! Command line: the scenarios (what the user runs) and two hidden subcommands (the processes the orchestrator
//! starts).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tabhub-bench",
    about = "Load scenarios against a real tabhub process on loopback; prints a table and writes JSON",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(subcommand)]
    pub command: Option<Hidden>,
}

#[derive(Subcommand)]
pub enum Hidden {
    /// The fixture realm, GitLab and gateway (started by the orchestrator).
    #[command(hide = true)]
    Fixtures(crate::fixtures::FixturesArgs),
    /// A load process (started by the orchestrator).
    #[command(hide = true)]
    Client(crate::clients::ClientArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// A few hundred tabs for a few seconds: every figure once, nothing asserted (CI).
    Smoke,
    /// 4,000 users x 4 tabs: tabhub's resident memory per tab.
    Memory,
    /// 2,000 users x 4 tabs: authenticated handshakes per second, cold then after a drop.
    Handshakes,
    /// 2,000 users x 2 tabs x 1 topic, 2,000 upstream events/s: fan-out latency, CPU per delivery.
    Fanout,
    /// 16,000 users x 1 tab with the session-status loop: backend calls/s, CPU per call, change latency.
    Loops,
    /// 1, 4 and 50 tabs per user and 10 quick reloads: backend calls per user per tick, SSE connections per
    /// user and project.
    CallsPerTick,
    /// 4,000 users x 4 tabs all dropped and reconnected: time to full reconnection, extra backend calls.
    Storm,
    /// 4,000 users x 4 tabs on two instances sharing a Redis broker: `POST /api/publish` to users, channels and
    /// everyone, spread over both instances: messages/s, publish -> tab latency, deliveries.
    Publish,
    /// 200 users x 1 tab pinging every 100 ms while one user with 20 tabs attacks within the rate limits: bystander
    /// ping latency quiet vs attack (p99 within 2x), RSS quiet / peak / after, backend calls and upstream streams.
    Abuse,
    /// 8,000 users x 2 tabs (16,000 tabs) on two instances sharing a Redis broker, `gitlab.source = "webhook"`:
    /// GitLab-shaped webhook deliveries posted to both instances in turn: webhooks/s in, deliveries/s out,
    /// webhook -> tab latency.
    Webhooks,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Smoke => "smoke",
            Scenario::Memory => "memory",
            Scenario::Handshakes => "handshakes",
            Scenario::Fanout => "fanout",
            Scenario::Loops => "loops",
            Scenario::CallsPerTick => "calls-per-tick",
            Scenario::Storm => "storm",
            Scenario::Publish => "publish",
            Scenario::Abuse => "abuse",
            Scenario::Webhooks => "webhooks",
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    #[arg(long, value_enum, default_value = "smoke")]
    pub scenario: Scenario,
    /// Users (U); default: the scenario's.
    #[arg(long)]
    pub users: Option<usize>,
    /// Tabs per user (T).
    #[arg(long)]
    pub tabs: Option<usize>,
    /// Topics per tab (S): event types of the user's own project, so one upstream stream per user.
    #[arg(long)]
    pub topics: Option<usize>,
    /// Upstream events per second (R), round-robin over the users' projects and types; in the publish scenario,
    /// published messages per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of measurement (D); in the abuse scenario, of the attack.
    #[arg(long)]
    pub duration: Option<f64>,
    /// The short loop's interval given to tabhub (the tick).
    #[arg(long)]
    pub short_interval_ms: Option<u64>,
    /// The session-status loop command the tabs send (the loop scenarios are skipped when tabhub lacks it).
    #[arg(long, default_value = "pullSessionStatusV2")]
    pub loop_command: String,
    /// The abuse scenario's attacking tabs (one user; at most `limits.max_tabs_per_user`, 100).
    #[arg(long, default_value_t = 20)]
    pub attack_tabs: usize,
    /// The abuse classes the attacker sends, comma-separated (default: all): setSubscriptions, channels,
    /// visibility, kgActivation, authenticate, malformed, unknown, oversized. One at a time tells which one hurts.
    #[arg(long, value_delimiter = ',')]
    pub attack_classes: Vec<String>,
    /// Client processes; default: enough for `--tabs-per-worker`, at least 2 beyond 1,000 tabs.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Most tabs per client process (each process has a hard limit of 20,000 open files).
    #[arg(long, default_value_t = 8_000)]
    pub tabs_per_worker: usize,
    /// Handshakes in flight per client process. Beyond 128 in all, tabhub's accept queue (tokio's default
    /// backlog, 128) overflows and SYNs wait for their retransmission (1 s).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// The tabhub binary; default: `tabhub` beside this one (rebuilt first when run through cargo).
    #[arg(long)]
    pub tabhub: Option<PathBuf>,
    /// Where the JSON goes; default `target/bench/<scenario>.json`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}
