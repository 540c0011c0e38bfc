//! Slowloris and connection floods: peers that open HTTP connections and send a partial request, nothing at all,
//! or nothing more after one request, to hold file descriptors until nobody else gets in; and `/metrics` read by
//! anyone. Raw TCP sockets, small timeouts: each test takes a second or two.

use std::net::SocketAddr;
use std::time::Duration;

use tabhub::Running;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{self, Client, Keycloak, WAIT};

/// Reads (and drops) whatever comes until the server closes the connection (end of stream or reset); how long
/// that took, or `None` if it is still open after `bound`.
async fn closed_within(s: &mut (impl AsyncRead + Unpin), bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let eof = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(bound, eof)
        .await
        .ok()
        .map(|_| start.elapsed())
}

/// Reads one response (status line, headers, `Content-Length` body) from a keep-alive connection.
async fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return (status, body);
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "connection closed before a full response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `GET path` on a new connection, sent at once.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: tabhub\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(&mut s).await
}

/// A test configuration with short HTTP timeouts.
fn config(kc: &Keycloak) -> tabhub::config::Config {
    let mut c = support::config(kc);
    c.http.header_read_timeout_ms = 500;
    c.http.keepalive_idle_ms = 1_500;
    c
}

fn closed(t: &Running, reason: &str) -> f64 {
    t.app().metrics.http_closed.get(&[reason])
}

#[tokio::test]
async fn a_partial_request_dripping_headers_is_closed_after_the_header_timeout() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;

    // Half a request line, then nothing.
    let mut s = TcpStream::connect(t.local_addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tab")
        .await
        .unwrap();
    let took = closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("a half-sent request is closed");
    assert!(
        took >= Duration::from_millis(400),
        "closed too early: {took:?}"
    );

    // The classic slowloris: one more header line every 100 ms, never the blank line. Activity does not extend
    // the header timeout.
    let (mut r, mut w) = TcpStream::connect(t.local_addr())
        .await
        .unwrap()
        .into_split();
    let drip = tokio::spawn(async move {
        w.write_all(b"GET /healthz HTTP/1.1\r\n").await.ok();
        while w.write_all(b"X-Drip: 1\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let took = closed_within(&mut r, Duration::from_secs(3))
        .await
        .expect("a dripping request is closed");
    assert!(took < Duration::from_millis(1_400), "{took:?}");
    drip.abort();

    support::eventually("header timeouts counted", || {
        closed(&t, "header_timeout") >= 2.0
    })
    .await;
    assert_eq!(get(t.local_addr(), "/healthz").await.0, 200);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;

    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(t.local_addr()).await.unwrap());
    }
    for s in &mut silent {
        let took = closed_within(s, Duration::from_secs(3))
            .await
            .expect("a silent connection is closed");
        assert!(took < Duration::from_millis(1_400), "{took:?}");
    }
    support::eventually("the pending gauge back to 0", || {
        t.app().metrics.http_pending.get() == 0
    })
    .await;
    assert!(closed(&t, "header_timeout") >= 20.0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let kc = Keycloak::start().await;
    let t = support::start(config(&kc), tabhub::commands::builtin()).await;

    let mut s = TcpStream::connect(t.local_addr()).await.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: tabhub\r\n\r\n";
    s.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut s).await, (200, "ok".into()));

    // Idle longer than the header timeout (500 ms) but within the keep-alive idle timeout (1.5 s): still open, and
    // a second request is served.
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut s).await, (200, "ok".into()));

    let took = closed_within(&mut s, Duration::from_secs(4))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(
        took >= Duration::from_millis(1_300) && took < Duration::from_millis(2_500),
        "closed after {took:?}, keepalive_idle_ms is 1500"
    );
    support::eventually("the idle close counted", || {
        closed(&t, "idle_timeout") >= 1.0
    })
    .await;
}

#[tokio::test]
async fn with_the_pending_cap_full_health_checks_and_real_tabs_still_get_in() {
    let kc = Keycloak::start().await;
    let mut c = support::config(&kc);
    // The attackers' connections would stay for 20 s: only the cap stops them.
    c.http.header_read_timeout_ms = 20_000;
    c.http.keepalive_idle_ms = 20_000;
    c.http.max_pending_connections = 50;
    c.http.pending_reserve = 10;
    c.http.reserve_header_timeout_ms = 500;
    let t = support::start(c, tabhub::commands::builtin()).await;
    let addr = t.local_addr();
    let pending = || t.app().metrics.http_pending.get();

    let mut attackers: Vec<TcpStream> = Vec::new();
    for _ in 0..50 {
        attackers.push(TcpStream::connect(addr).await.unwrap());
    }
    support::eventually("50 pending connections", || pending() == 50).await;

    // The reserve takes 10 more idle ones, for 500 ms each; beyond it, connections are closed at once.
    let mut reserve: Vec<TcpStream> = Vec::new();
    for _ in 0..10 {
        reserve.push(TcpStream::connect(addr).await.unwrap());
    }
    support::eventually("the reserve full", || pending() == 60).await;
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let took = closed_within(&mut s, Duration::from_secs(1)).await;
        assert!(
            took.is_some(),
            "a connection beyond the reserve is closed at once"
        );
    }
    for s in &mut reserve {
        let took = closed_within(s, Duration::from_secs(3))
            .await
            .expect("an idle reserve connection is closed after the reserve timeout");
        assert!(took < Duration::from_millis(1_500), "{took:?}");
    }
    support::eventually("the reserve free again", || pending() == 50).await;

    // Cheap and important requests get in through the reserve; others get 503.
    assert_eq!(get(addr, "/healthz").await, (200, "ok".into()));
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/metrics").await.0, 503);

    // A real user's tab opens, and once upgraded it no longer counts as pending.
    let tab = Client::connect(&support::ws_url(&t), &kc.token("alice")).await;
    support::eventually("the tab is not pending", || {
        pending() == 50 && t.app().metrics.tabs.get() == 1
    })
    .await;

    // The attackers are still held (the cap does not close them), and every refusal was counted.
    assert!(closed_within(&mut attackers[0], Duration::from_millis(100))
        .await
        .is_none());
    assert!(closed(&t, "over_capacity") >= 5.0);
    assert!(closed(&t, "header_timeout") >= 10.0);
    assert!(closed(&t, "reserve_refused") >= 1.0);
    let text = t.app().metrics.render();
    assert!(
        text.contains("tabhub_http_pending_connections 50"),
        "{text}"
    );
    assert!(text.contains("tabhub_http_connections_closed_total{reason=\"idle_timeout\"} 0"));
    tab.close().await;
}

#[tokio::test]
async fn metrics_can_be_restricted_to_an_allowlist_or_a_separate_listener() {
    let kc = Keycloak::start().await;

    // An allowlist that leaves our address (127.0.0.1) out: 403; the rest of the listener is unchanged.
    let mut c = config(&kc);
    c.metrics.allow = vec!["10.0.0.0/8".into(), "fd00::/8".into()];
    let t = support::start(c, tabhub::commands::builtin()).await;
    assert_eq!(get(t.local_addr(), "/metrics").await.0, 403);
    assert_eq!(get(t.local_addr(), "/healthz").await.0, 200);
    t.shutdown().await.unwrap();

    // An allowlist that holds it: served.
    let mut c = config(&kc);
    c.metrics.allow = vec!["10.0.0.0/8".into(), "127.0.0.0/8".into()];
    let t = support::start(c, tabhub::commands::builtin()).await;
    let (status, body) = get(t.local_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("tabhub_tabs"), "{body}");
    t.shutdown().await.unwrap();

    // A separate listener: /metrics there only, 404 on the main one.
    let mut c = config(&kc);
    c.metrics.listen = "127.0.0.1:0".into();
    let t = support::start(c, tabhub::commands::builtin()).await;
    let metrics_addr = t.metrics_addr().expect("a metrics listener");
    assert_eq!(get(t.local_addr(), "/metrics").await.0, 404);
    let (status, body) = get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("tabhub_http_pending_connections"), "{body}");
    assert_eq!(get(metrics_addr, "/ws").await.0, 404);
    t.shutdown().await.unwrap();
}
