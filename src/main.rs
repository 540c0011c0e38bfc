//! The `tabhub` command line: `serve`, `demo` (default feature `demo` only), `commands`, `connect`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tabhub::config::Config;
#[cfg(feature = "demo")]
use tabhub::demo;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(
    name = "tabhub",
    version,
    about = "Backend-for-frontend websocket command server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file (and TABHUB_* environment variables).
    Serve {
        /// TOML configuration file; without it, only defaults and environment variables apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Serve the development setup: embedded issuer (alice/alice, bob/bob). FOR DEVELOPMENT ONLY.
    #[cfg(feature = "demo")]
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Use this GitLab (e.g. a `tabhub-fixtures` process) instead of the embedded fixture GitLab, through its SSE
        /// streams (the browser tests restart tabhub under it: its event ids outlive tabhub).
        #[arg(long, hide = true)]
        gitlab_url: Option<String>,
    },
    /// Print every command with its parameters.
    Commands,
    /// A small interactive client: sends each stdin line (JSON) and prints every message received.
    Connect {
        /// Websocket URL.
        #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
        url: String,
        /// Access token; without it, one is fetched from the demo issuer for --user.
        #[arg(long, env = tabhub::config::CONNECT_TOKEN_ENV, hide_env_values = true)]
        token: Option<String>,
        /// Demo user (alice or bob) when no token is given.
        #[arg(long, default_value = "alice")]
        user: String,
    },
}

fn main() -> ExitCode {
    // Before anything uses jsonwebtoken (demo mode mints tokens): ring checks RSA signatures.
    tabhub::auth::crypto::install();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tabhub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => {
                let config =
                    Config::load(config.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
                serve(config, axum::Router::new()).await
            }
            #[cfg(feature = "demo")]
            Command::Demo { listen, gitlab_url } => run_demo(listen, gitlab_url).await,
            Command::Commands => {
                for c in tabhub::commands::builtin().describe() {
                    println!("{c}");
                }
                Ok(())
            }
            Command::Connect { url, token, user } => connect(url, token, user).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tabhub: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Libraries whose debug or trace output carries what crosses the wire: tungstenite logs every websocket frame and
/// message it reads or writes (an `authenticate` command carries a token) and a client handshake's request (its
/// `Authorization` header); the HTTP, TLS, SSE and Redis clients log connections, URLs and payloads. A target
/// matches every target it prefixes (`hyper` covers `hyper_util`, `reqwest` covers `reqwest_eventsource`).
const WIRE_TARGETS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "h2",
    "reqwest",
    "eventsource_stream",
    "rustls",
    "tokio_rustls",
    "redis",
];

/// Logging as `log.level` and `log.format` say, except that [`WIRE_TARGETS`] never go below `info`: a token must
/// never reach the logs, even at `trace`. The cap is a second filter on the output layer rather than directives
/// added to the `EnvFilter`, so that no directive of `log.level` (`tungstenite::protocol=trace`, more specific than
/// any cap there) can lift it.
fn init_logging(config: &Config) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let cap = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(WIRE_TARGETS.iter().map(|t| (*t, LevelFilter::INFO)));
    let output = tracing_subscriber::fmt::layer();
    let output = if config.log.format == tabhub::config::LogFormat::Json {
        output.json().boxed()
    } else {
        output.boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output.with_filter(cap))
        .init();
}

async fn serve(config: Config, extra: axum::Router) -> Result<(), String> {
    init_logging(&config);
    let listener =
        listen(config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let running = tabhub::start(listener, config, tabhub::commands::builtin(), extra)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(addr = %running.local_addr(), instance = %running.app().instance, "listening");
    wait_for_signal().await?;
    // A second signal during the drain cuts it short.
    tokio::select! {
        r = running.drain() => r.map_err(|e| e.to_string())?,
        _ = wait_for_signal() => tracing::warn!("second signal: exiting without finishing the drain"),
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// Binds with a deep accept backlog: tokio's default (128) overflows when thousands of tabs reconnect at once, and
/// every dropped SYN costs a client a one-second retransmit. The kernel caps it at `net.core.somaxconn`.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn wait_for_signal() -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

#[cfg(feature = "demo")]
async fn run_demo(listen: SocketAddr, gitlab_url: Option<String>) -> Result<(), String> {
    let base = demo::base_url(listen);
    let issuer = demo::DevIssuer::demo(&base).map_err(|e| format!("demo issuer: {e}"))?;
    let mut config = demo::config(listen);
    let gitlab = match gitlab_url {
        Some(url) => {
            config.gitlab.url = url;
            config.gitlab.source = tabhub::config::GitlabSource::Sse;
            axum::Router::new()
        }
        None => demo::gitlab_webhooks(&config),
    };
    eprintln!(
        "\n  tabhub demo: FOR DEVELOPMENT ONLY (public fixture keys, passwords = user names)\n\n  \
         token:     curl -s -d grant_type=password -d client_id={cid} -d username=alice -d password=alice \\\n               \
         {issuer}/protocol/openid-connect/token\n  \
         websocket: ws://{host}/ws  (Authorization: Bearer <access_token>, or subprotocols [\"tabhub\", \"tabhub.bearer.<access_token>\"])\n  \
         client:    cargo run --release -- connect --user alice     (in another terminal; type {{\"type\":\"ping\"}})\n  \
         events:    {{\"type\":\"subscribe\",\"data\":{{\"topic\":\"/project/1/push\"}}}}   (demo projects 1, 2, 3; GitLab webhooks push, tag_push, issue, note, merge_request, pipeline, build)\n  \
         loops:     {{\"type\":\"pullSessionStatusV2\"}}  {{\"type\":\"pullKgActivationStatus\",\"data\":{{\"projects\":[1,2,3,4]}}}}\n",
        cid = demo::CLIENT_ID,
        issuer = issuer.issuer(),
        host = base.trim_start_matches("http://"),
    );
    serve(
        config,
        issuer
            .router()
            .merge(gitlab)
            .merge(demo::backends())
            .merge(demo::page_router()),
    )
    .await
}

async fn connect(url: String, token: Option<String>, user: String) -> Result<(), String> {
    let token = match token {
        Some(t) => t,
        None => demo_token(&url, &user).await?,
    };
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "token is not a valid header value".to_string())?,
    );
    // The tabhub profile: the whole protocol.
    req.headers_mut().insert(
        "sec-websocket-protocol",
        axum::http::HeaderValue::from_static("tabhub"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(l) if !l.trim().is_empty() => sink.send(Message::text(l)).await.map_err(|e| e.to_string())?,
                Some(_) => {}
                None => return Ok(()),
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => println!("{t}"),
                Some(Ok(Message::Close(f))) => {
                    println!("closed: {f:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Ok(()),
            }
        }
    }
}

/// A token from the demo issuer for `user` (password = user name), for `connect` without `--token`.
#[cfg(feature = "demo")]
async fn demo_token(url: &str, user: &str) -> Result<String, String> {
    let http_base = url
        .replacen("ws://", "http://", 1)
        .replacen("wss://", "https://", 1);
    let base = http_base.trim_end_matches("/ws");
    let resp: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/realms/demo/protocol/openid-connect/token"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", demo::CLIENT_ID),
            ("username", user),
            ("password", user),
        ])
        .send()
        .await
        .map_err(|e| format!("token request: {e}"))?
        .json()
        .await
        .map_err(|e| format!("token response: {e}"))?;
    resp["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "the demo issuer gave no access_token".to_string())
}

/// Without the demo there is no demo issuer to ask: the token must be given.
#[cfg(not(feature = "demo"))]
async fn demo_token(_url: &str, _user: &str) -> Result<String, String> {
    Err("no token: pass --token or set TABHUB_TOKEN (this build has no demo issuer)".into())
}
