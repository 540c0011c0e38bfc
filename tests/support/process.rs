//! Real processes for the tests: the tabhub binary with a TOML configuration, and nginx with a generated
//! configuration. Each runs in its own temporary directory and logs to files there; the logs are printed when a
//! test fails. A process is killed when its handle is dropped. Every wait is bounded.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::WAIT;

/// A free port on 127.0.0.1 (free when this returns; the process that binds it comes right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A new directory under the system temporary directory.
pub fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tabhub-{kind}-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process with its directory and log files.
pub struct Proc {
    name: String,
    child: Child,
    dir: PathBuf,
    /// Signal sent first when the handle is dropped (SIGKILL follows if the process is still there after 2 s).
    stop_signal: &'static str,
}

impl Proc {
    /// Spawns `cmd` with its stdout and stderr going to `stdout.log` and `stderr.log` in `dir`.
    pub fn spawn(name: &str, mut cmd: Command, dir: PathBuf, stop_signal: &'static str) -> Proc {
        let out = File::create(dir.join("stdout.log")).unwrap();
        let err = File::create(dir.join("stderr.log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            dir,
            stop_signal,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends `signal` (`TERM`, `KILL`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot send SIG{signal} to {}", self.name);
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits (at most `within`) for the process to exit.
    pub async fn exited(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {within:?}\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A file of its directory, or an empty string.
    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// The line of `file` that starts with the word `tag`, if written yet.
    pub fn log_line_if_any(&self, file: &str, tag: &str) -> Option<String> {
        self.read(file)
            .lines()
            .find(|l| l.split(' ').next() == Some(tag))
            .map(str::to_owned)
    }

    /// Waits (bounded by [`WAIT`]) for the line of `file` that starts with the word `tag`: a load balancer's log
    /// line of a request tagged `X-Test-Tag: tag`, written when the request ends (for a websocket, when it closes).
    pub async fn log_line(&self, file: &str, tag: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(line) = self.log_line_if_any(file, tag) {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line tagged {tag} in {file}:\n{}",
                self.read(file)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every `*.log` file of its directory, each under a header.
    pub fn logs(&self) -> String {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "log"));
        files.sort();
        let mut out = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            out.push_str(&format!("---- {} {}\n{text}", self.name, f.display()));
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = Command::new("kill")
                .arg(format!("-{}", self.stop_signal))
                .arg(self.pid().to_string())
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while self.try_wait().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// GET `url`'s status, or None when it cannot be reached.
async fn status_of(url: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits (bounded by [`WAIT`]) until `GET url` answers `status`, failing early if `proc` exits.
async fn wait_status(proc: &mut Proc, url: &str, status: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if status_of(url).await == Some(status) {
            return;
        }
        if let Some(s) = proc.try_wait() {
            panic!("{} exited ({s}) before {url} answered {status}", proc.name);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real tabhub binary, `serve --config <dir>/tabhub.toml`.
pub struct Tabhub {
    pub proc: Proc,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

impl Tabhub {
    /// Starts tabhub on a free loopback port with `config` (TOML, without `listen`); does not wait for it.
    pub fn spawn(name: &str, config: &str) -> Tabhub {
        let dir = temp_dir("tabhub");
        let addr = format!("127.0.0.1:{}", free_port());
        let path = dir.join("tabhub.toml");
        std::fs::write(&path, format!("listen = \"{addr}\"\n{config}")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tabhub"));
        cmd.args(["serve", "--config"]).arg(&path);
        Tabhub {
            proc: Proc::spawn(name, cmd, dir, "KILL"),
            addr,
        }
    }

    pub fn readyz_url(&self) -> String {
        format!("http://{}/readyz", self.addr)
    }

    /// `GET /readyz`'s status, or None when the instance cannot be reached.
    pub async fn readyz(&self) -> Option<u16> {
        status_of(&self.readyz_url()).await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&mut self) {
        let url = self.readyz_url();
        wait_status(&mut self.proc, &url, 200).await;
    }
}

/// Where the `name` binary is (a Debian package of the same name, listed in .ci/packages): `$NAME` (upper case),
/// else on `PATH`, else in `/usr/sbin` (often not on a non-root `PATH`). Fails, saying how to install it, when there
/// is none: a test needing it must not pass without it.
pub fn binary(name: &str) -> PathBuf {
    let missing = format!(
        "{name} is not installed. Run `bash .ci/test` (it installs the Debian packages listed in .ci/packages, \
         {name} among them), or `apt-get install {name}`, or set {}=/path/to/{name}",
        name.to_uppercase()
    );
    if let Some(p) = std::env::var_os(name.to_uppercase()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{}: no such file. {missing}", p.display());
        return p;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{missing}"))
}

/// nginx in the foreground (`daemon off`, one worker) with everything (pid, logs, temporary files) in its own
/// directory, serving an `http`-context configuration.
pub struct Nginx {
    pub proc: Proc,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

/// The `log_format` of `access.log`: the `X-Test-Tag` request header, the status, and every upstream tried with
/// the status it gave, e.g. `probe 101 127.0.0.1:4001, 127.0.0.1:4002 503, 101`.
pub const NGINX_LOG_FORMAT: &str = "$http_x_test_tag $status $upstream_addr $upstream_status";

impl Nginx {
    /// Starts nginx with `http_conf` (the contents of an `http` block, which must listen on `port`) and waits
    /// until `GET ready_path` through it answers 200.
    pub async fn start(port: u16, http_conf: &str, ready_path: &str) -> Nginx {
        let bin = binary("nginx");
        let dir = temp_dir("nginx");
        let d = dir.display();
        // Run as root, the worker switches to an unprivileged user: it must be able to create its temporary files.
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("site.conf"), http_conf).unwrap();
        let main = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   log_format sticky '{NGINX_LOG_FORMAT}';\n\
             \x20   access_log {d}/access.log sticky;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/site.conf;\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"]);
        // TERM: fast shutdown, the master stops its worker (a killed master would leave it running).
        let mut proc = Proc::spawn("nginx", cmd, dir, "TERM");
        let addr = format!("127.0.0.1:{port}");
        wait_status(&mut proc, &format!("http://{addr}{ready_path}"), 200).await;
        Nginx { proc, addr }
    }

    pub fn access_log(&self) -> String {
        self.proc.read("access.log")
    }

    /// Waits for the access log line of the request tagged `tag` (see [`Proc::log_line`]).
    pub async fn access_line(&self, tag: &str) -> String {
        self.proc.log_line("access.log", tag).await
    }
}

/// HAProxy in the foreground (`-db`), logging to its standard output (`stdout.log`), one line per request:
/// [`HAPROXY_LOG_FORMAT`].
pub struct Haproxy {
    pub proc: Proc,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

/// The `log-format` of HAProxy's lines: the `X-Test-Tag` request header, the status, the server that answered,
/// and the retries (`+1`: one retry, redispatched to another server), e.g. `probe 101 127.0.0.1:4002 +1`.
pub const HAPROXY_LOG_FORMAT: &str = "%[capture.req.hdr(0)] %ST %si:%sp %rc";

impl Haproxy {
    /// Starts HAProxy with `config` (defaults, frontends and backends: no `global` section) after a `global`
    /// section that logs to standard output. `config` must have one `bind 127.0.0.1:<port>` line; the logging lines
    /// are added after it. Waits until `GET ready_path` through it answers 200.
    pub async fn start(port: u16, config: &str, ready_path: &str) -> Haproxy {
        let bin = binary("haproxy");
        let dir = temp_dir("haproxy");
        let bind = format!("bind 127.0.0.1:{port}\n");
        assert_eq!(
            config.matches(&bind).count(),
            1,
            "the config must have one line {bind}"
        );
        let site = config.replacen(
            &bind,
            &format!(
                "{bind}    log global\n    capture request header X-Test-Tag len 64\n    \
                 log-format \"{HAPROXY_LOG_FORMAT}\"\n"
            ),
            1,
        );
        std::fs::write(
            dir.join("global.cfg"),
            "global\n    log stdout format raw local0\n",
        )
        .unwrap();
        std::fs::write(dir.join("site.cfg"), site).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("-db")
            .arg("-f")
            .arg(dir.join("global.cfg"))
            .arg("-f")
            .arg(dir.join("site.cfg"));
        let mut proc = Proc::spawn("haproxy", cmd, dir, "TERM");
        let addr = format!("127.0.0.1:{port}");
        wait_status(&mut proc, &format!("http://{addr}{ready_path}"), 200).await;
        Haproxy { proc, addr }
    }

    /// Waits for the log line of the request tagged `tag` (see [`Proc::log_line`]).
    pub async fn log_line(&self, tag: &str) -> String {
        self.proc.log_line("stdout.log", tag).await
    }
}
