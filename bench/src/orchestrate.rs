//! The orchestrator: starts the fixtures, tabhub and the client processes, steers them, measures tabhub from
//! `/proc`, and stops everything (children die with it: see [`procs::child`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::procs;
use crate::shape::Shape;
use crate::tokens;

/// A child whose stdout carries JSON lines.
pub struct Talker {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::UnboundedReceiver<Value>,
}

impl Talker {
    fn spawn(name: &str, mut cmd: tokio::process::Command) -> Result<Talker, String> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| format!("start {name}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let label = name.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("[{label}] {line}"),
                }
            }
        });
        Ok(Talker {
            name: name.into(),
            stdin: child.stdin.take(),
            child,
            rx,
        })
    }

    pub async fn send(&mut self, v: &Value) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(format!("{v}\n").as_bytes())
            .await
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// The next message whose `ev` is `ev` (others are dropped), within `timeout`.
    pub async fn expect(&mut self, ev: &str, timeout: Duration) -> Result<Value, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("{}: no {ev:?} within {timeout:?}", self.name)),
                Ok(None) => return Err(format!("{}: exited before {ev:?}", self.name)),
                Ok(Some(v)) if v["ev"] == ev || ev.is_empty() => return Ok(v),
                Ok(Some(_)) => {}
            }
        }
    }

    /// Closes stdin (the child exits by itself) and waits a little, then kills.
    pub async fn stop(mut self) {
        self.stdin = None;
        if tokio::time::timeout(Duration::from_secs(3), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The fixtures process.
pub struct Fixtures {
    pub talker: Talker,
    pub base: String,
    pub issuer: String,
    pub epoch_ns: u64,
    pub period_ns: u64,
    http: reqwest::Client,
}

impl Fixtures {
    pub async fn start(change_period_ms: u64) -> Result<Fixtures, String> {
        let mut cmd = procs::child(&self_exe()?);
        cmd.args([
            "fixtures",
            "--change-period-ms",
            &change_period_ms.to_string(),
        ]);
        let mut talker = Talker::spawn("fixtures", cmd)?;
        let hello = talker.expect("", Duration::from_secs(20)).await?;
        let listening = hello["listening"].as_str().ok_or("fixtures: no address")?;
        Ok(Fixtures {
            base: format!("http://{listening}"),
            issuer: hello["issuer"].as_str().unwrap_or_default().to_owned(),
            epoch_ns: hello["epoch_ns"].as_u64().unwrap_or(0),
            period_ns: hello["period_ns"].as_u64().unwrap_or(1),
            talker,
            http: reqwest::Client::new(),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(|e| format!("fixtures {path}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("fixtures {path}: {e}"))
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<u16, String> {
        Ok(self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| format!("fixtures {path}: {e}"))?
            .status()
            .as_u16())
    }

    /// Gateway calls per user of `from..to`, and the total.
    pub async fn calls(&self, from: usize, to: usize) -> Result<(u64, Vec<u64>), String> {
        let v = self
            .get(&format!("/bench/gateway?from={from}&to={to}"))
            .await?;
        let per: Vec<u64> = v["per_user"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
            .unwrap_or_default();
        Ok((v["total"].as_u64().unwrap_or(0), per))
    }

    /// Upstream streams per project of users `from..to`: (open now, ever accepted).
    pub async fn streams(&self, from: usize, to: usize) -> Result<(Vec<u64>, Vec<u64>), String> {
        let v = self
            .get(&format!("/bench/streams?from={from}&to={to}"))
            .await?;
        let list = |k: &str| -> Vec<u64> {
            v[k].as_array()
                .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
                .unwrap_or_default()
        };
        Ok((list("open"), list("connections_total")))
    }
}

/// The tabhub process under test.
pub struct Tabhub {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
}

impl Tabhub {
    /// Starts instance `name` with the bench configuration plus `extra` (TOML sections: broker, publish).
    pub async fn start(
        binary: &Path,
        config_path: &Path,
        name: &str,
        fixtures: &Fixtures,
        shape: &Shape,
        extra: &str,
    ) -> Result<Tabhub, String> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let si = shape.short_interval_ms;
        let limits = &shape.limits;
        let inner_timeout = (si * 8 / 10).clamp(1, 4_000);
        let config = format!(
            r#"# Generated by tabhub-bench for one run.
listen = "{addr}"
instance_id = "{name}"

[log]
level = "warn"

[auth]
issuer = "{issuer}"
client_ids = ["{client}"]

[origins]
allow_missing = true

[session]
short_interval_ms = {si}
loop_timeout_ms = {inner_timeout}

[backend]
timeout_ms = {inner_timeout}

[limits]
max_connections = 0
max_tabs_per_user = {max_tabs}
upgrades_per_second_per_address = 1000000000.0
upgrades_burst = 1000000000.0
commands_per_second = {cps:?}
commands_burst = {burst:?}

[gitlab]
url = "{gitlab}"
source = "{source}"

[backends]
gateway = "{gitlab}/gateway"

{extra}
"#,
            issuer = fixtures.issuer,
            client = tokens::CLIENT_ID,
            gitlab = fixtures.base,
            source = shape.source,
            max_tabs = limits.max_tabs_per_user,
            cps = limits.commands_per_second,
            burst = limits.commands_burst,
        );
        if let Some(dir) = config_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(config_path, config)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let mut cmd = procs::child(binary);
        cmd.arg("serve")
            .arg("--config")
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", binary.display()))?;
        let pid = child.id().ok_or("tabhub exited at once")?;
        let t = Tabhub { child, pid, addr };
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await {
                if r.status() == 200 {
                    return Ok(t);
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err("tabhub never became ready".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn rss_kib(&self) -> u64 {
        procs::rss_kib(self.pid).unwrap_or(0)
    }

    pub fn cpu_secs(&self) -> f64 {
        procs::cpu_secs(self.pid).unwrap_or(0.0)
    }

    pub fn fds(&self) -> usize {
        procs::fd_count(self.pid).unwrap_or(0)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A `redis-server` of its own on a free loopback port, without persistence (the publish broker).
pub struct Redis {
    child: Child,
    pub pid: u32,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Result<Redis, String> {
        let port = free_port()?;
        let mut cmd = procs::child(Path::new("redis-server"));
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().map_err(|e| {
            format!("redis-server: {e} (the publish scenario needs Debian's redis-server: `bash .ci/test` installs it)")
        })?;
        let pid = child.id().ok_or("redis-server exited at once")?;
        let r = Redis { child, pid, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                return Err("redis-server never listened".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn cpu_secs(&self) -> f64 {
        procs::cpu_secs(self.pid).unwrap_or(0.0)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A loopback port free now (the child binds it a moment later).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

pub fn self_exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("current exe: {e}"))
}

/// The tabhub binary: `--tabhub`, else `tabhub` beside this binary, rebuilt first when run through cargo (so
/// `cargo run --release -p tabhub-bench` measures the tree it was built from). The bench is a package of its own
/// that does not depend on the engine: `-p tabhub` names the engine wherever in the workspace cargo runs, and its
/// binary lands in the same target directory as this one.
pub fn tabhub_binary(args: &RunArgs) -> Result<PathBuf, String> {
    if let Some(p) = &args.tabhub {
        return Ok(p.clone());
    }
    let exe = self_exe()?;
    let sibling = exe.with_file_name("tabhub");
    if let (Ok(cargo), Ok(dir)) = (std::env::var("CARGO"), std::env::var("CARGO_MANIFEST_DIR")) {
        let release = exe
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == "release");
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(dir)
            .args(["build", "-p", "tabhub", "--bin", "tabhub"]);
        // What `cargo run` sets for the program it runs must not reach this build: some build scripts track
        // these variables (ring: CARGO_MANIFEST_DIR), and a change rebuilds them and everything above them.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_")
                || k.starts_with("CARGO_MANIFEST_")
                || k == "CARGO_CRATE_NAME"
                || k == "CARGO_PRIMARY_PACKAGE"
            {
                cmd.env_remove(k.as_ref());
            }
        }
        if release {
            cmd.arg("--release");
        }
        eprintln!(
            "tabhub-bench: cargo build -p tabhub --bin tabhub{}",
            if release { " --release" } else { "" }
        );
        let status = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err("cargo build -p tabhub --bin tabhub failed".into());
        }
    }
    if !sibling.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --release -p tabhub) or pass --tabhub",
            sibling.display()
        ));
    }
    Ok(sibling)
}

/// Whether tabhub's registry has `command` (`tabhub commands`).
pub async fn has_command(binary: &Path, command: &str) -> Result<bool, String> {
    let out = tokio::process::Command::new(binary)
        .arg("commands")
        .output()
        .await
        .map_err(|e| format!("{} commands: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == command))
}

/// Starts client process `i` for `plan`.
pub fn start_worker(
    i: usize,
    plan: &str,
    tabhub: &Tabhub,
    fixtures: &Fixtures,
    shape: &Shape,
    loop_command: Option<&str>,
    concurrency: usize,
) -> Result<Talker, String> {
    let from = format!("127.0.0.{}", 10 + i);
    let mut cmd = procs::child(&self_exe()?);
    cmd.args([
        "client",
        "--url",
        &tabhub.url(),
        "--from",
        &from,
        "--plan",
        plan,
        "--topics",
        &shape.topics.to_string(),
        "--issuer",
        &fixtures.issuer,
        "--concurrency",
        &concurrency.to_string(),
        "--channels",
        &shape.channels.to_string(),
    ]);
    if let Some(c) = loop_command {
        let changes = format!("{}/{}", fixtures.epoch_ns, fixtures.period_ns);
        cmd.args(["--loop-command", c, "--changes", &changes]);
    }
    Talker::spawn(&format!("client-{i}@{from}"), cmd)
}

/// Sends `cmd` to every worker, then collects each one's `ev` answer.
pub async fn all(
    workers: &mut [Talker],
    cmd: &Value,
    ev: &str,
    timeout: Duration,
) -> Result<Vec<Value>, String> {
    for w in workers.iter_mut() {
        w.send(cmd).await?;
    }
    let mut out = Vec::with_capacity(workers.len());
    for w in workers.iter_mut() {
        out.push(w.expect(ev, timeout).await?);
    }
    Ok(out)
}

pub fn machine_line(m: &Value) -> String {
    format!(
        "{} cores ({}), {} GiB, Linux {}, open files limit {}",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["open_files_limit"]
    )
}

pub fn default_out(name: &str) -> PathBuf {
    PathBuf::from(format!("target/bench/{name}.json"))
}

pub fn now_json() -> Value {
    json!(procs::unix_ns() / 1_000_000_000)
}
