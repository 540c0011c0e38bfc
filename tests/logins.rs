//! Logins in Redis (`broker.kind = "redis"`): instances share their users' logins, sealed with `custody.store_keys`.
//! An instance killed, its users' tabs are served by another without logging in again; one refresh per login at a
//! time across instances; a logout closes the login's tabs everywhere; keys rotate; a Redis outage degrades to
//! per-instance logins and reconciles. Real Redis (`redis-server`, .ci/packages), real sockets, the fixture realm.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::browser::{location, sets_cookie, Browser};
use support::client::Cred;
use support::keycloak::{TABHUB_CLIENT, TABHUB_SECRET};
use support::process::{free_port, temp_dir, Proc, Tabhub};
use support::{Client, Keycloak};

/// Two store keys (32 bytes, base64): `OLD_KEY` first, then rotated to `NEW_KEY`.
const OLD_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const NEW_KEY: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

struct RedisServer {
    child: Child,
    port: u16,
}

/// Whether a Redis server answers `PING` on `port` (another process may hold a port picked as free).
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts redis-server on `port` and waits until it answers; `None` if it exits first (the port was taken).
    fn try_start_on(port: u16) -> Option<RedisServer> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server is needed for this test ({e}); run `bash .ci/test`, which installs it"));
        let mut server = RedisServer { child, port };
        let deadline = std::time::Instant::now() + support::WAIT;
        while std::time::Instant::now() < deadline {
            if server.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            if answers_ping(port) {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        server.stop();
        None
    }

    /// Starts redis-server again on `port` (after [`RedisServer::stop`]).
    fn start_on(port: u16) -> RedisServer {
        RedisServer::try_start_on(port).expect("redis-server restarts on its port")
    }

    /// Starts redis-server on a free port.
    fn start() -> RedisServer {
        (0..5)
            .find_map(|_| RedisServer::try_start_on(free_port()))
            .expect("redis-server starts")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A connection, once the server answers.
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = tokio::time::Instant::now() + support::WAIT;
        loop {
            if let Ok(c) = client.get_multiplexed_async_connection().await {
                return c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Redis never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The fixture realm, auto-approving alice's logins.
async fn realm(access_lifetime: Duration) -> Keycloak {
    Keycloak::start_with(|o| {
        o.auto_approve = Some("alice".into());
        o.access_token_lifetime = access_lifetime;
    })
    .await
}

/// An instance in this process, on Redis, with `keys`.
struct Instance {
    t: tabhub::Running,
    base: String,
}

async fn instance(kc: &Keycloak, redis: &RedisServer, id: &str, keys: &[&str]) -> Instance {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut c = support::config(kc);
    c.instance_id = id.into();
    c.auth.client_ids.push(TABHUB_CLIENT.into());
    c.origins.allowed = vec![base.clone()];
    c.custody.enabled = true;
    c.custody.client_id = TABHUB_CLIENT.into();
    c.custody.client_secret = TABHUB_SECRET.into();
    c.custody.redirect_uri = format!("{base}/auth/callback");
    c.custody.cookie_secure = false;
    c.custody.store_keys = keys.iter().map(|k| k.to_string()).collect();
    c.broker.kind = tabhub::config::BrokerKind::Redis;
    c.broker.redis_url = redis.url();
    c.broker.timeout_ms = 500;
    c.broker.reconnect_initial_ms = 50;
    c.broker.reconnect_max_ms = 200;
    c.validate().unwrap();
    let t = tabhub::start(
        listener,
        c,
        tabhub::commands::builtin(),
        axum::Router::new(),
    )
    .await
    .unwrap();
    support::eventually("ready", || t.app().realm.is_ready()).await;
    support::eventually("subscribed to Redis", || t.app().broker.state() == "up").await;
    Instance { t, base }
}

/// Logs alice in through `base` in a new browser; returns the login cookie `name=value`.
async fn login(base: &str) -> String {
    let browser = Browser::default();
    let r = browser.get(&format!("{base}/auth/login?redirect=/")).await;
    assert_eq!(r.status(), 302);
    let r = browser.get(&location(&r)).await;
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    let r = browser.get(&location(&r)).await;
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    let cookie = sets_cookie(&r, "tabhub_session").expect("a login cookie");
    cookie.split(';').next().unwrap().to_owned()
}

fn login_id(cookie: &str) -> String {
    cookie.split_once('=').unwrap().1.to_owned()
}

/// A tab on the instance at `addr` (`127.0.0.1:port`) with the login cookie, its origin `base`; `init` read.
async fn tab(addr: &str, base: &str, cookie: &str) -> Client {
    let (name, value) = cookie.split_once('=').unwrap();
    let mut c = Client::connect_with(
        &format!("ws://{addr}/ws"),
        Cred::Cookie(name, value),
        Some(base),
    )
    .await
    .unwrap_or_else(|e| panic!("tab on {addr}: {e}"));
    let init = c.recv().await;
    assert_eq!(init["type"], "init", "{init}");
    assert_eq!(init["data"]["user"], "alice");
    c
}

async fn ping(c: &mut Client, id: &str) {
    c.send("ping", json!({}), Some(json!(id))).await;
    assert_eq!(c.recv_type("ack").await["id"], id);
}

/// `GET /auth/me` with the cookie: its status and body.
async fn me(base: &str, cookie: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}/auth/me"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The tabhub binary at `addr` (chosen first: its redirect URI names it), with custody and the Redis broker.
fn spawn_instance(
    kc: &Keycloak,
    redis: &RedisServer,
    id: &str,
    addr: &str,
    origins: &[&str],
) -> Tabhub {
    let dir = temp_dir("tabhub");
    let origins = origins
        .iter()
        .map(|o| format!("\"{o}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "listen = \"{addr}\"\ninstance_id = \"{id}\"\n\
         [auth]\nissuer = \"{issuer}\"\nclient_ids = [\"renku-ui\", \"{TABHUB_CLIENT}\"]\n\
         [origins]\nallowed = [{origins}]\n\
         [custody]\nenabled = true\nclient_id = \"{TABHUB_CLIENT}\"\nclient_secret = \"{TABHUB_SECRET}\"\n\
         redirect_uri = \"http://{addr}/auth/callback\"\ncookie_secure = false\nstore_keys = [\"{OLD_KEY}\"]\n\
         [broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nreconnect_initial_ms = 50\nreconnect_max_ms = 200\n",
        issuer = kc.issuer(),
        url = redis.url(),
    );
    let path = dir.join("tabhub.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tabhub"));
    cmd.args(["serve", "--config"]).arg(&path);
    Tabhub {
        proc: Proc::spawn(&format!("tabhub-{id}"), cmd, dir, "KILL"),
        addr: addr.to_owned(),
    }
}

#[tokio::test]
async fn the_tabs_of_a_killed_instance_are_served_by_another_without_logging_in_again() {
    let kc = realm(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let (a_base, b_base) = (format!("http://{a_addr}"), format!("http://{b_addr}"));
    let origins = [a_base.as_str(), b_base.as_str()];
    let mut a = spawn_instance(&kc, &redis, "a", &a_addr, &origins);
    a.ready().await;
    let cookie = login(&a_base).await;
    let mut t = tab(&a.addr, &a_base, &cookie).await;
    ping(&mut t, "on a").await;

    a.proc.signal("KILL");
    a.proc.exited(support::WAIT).await;
    let (code, _) = t.closed().await;
    assert_ne!(code, Some(4003), "not a logout");

    // A fresh instance: it never saw the login, it reads it from Redis.
    let mut b = spawn_instance(&kc, &redis, "b", &b_addr, &origins);
    b.ready().await;
    let (status, body) = me(&b_base, &cookie).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["name"], "alice");
    assert_eq!(body["instance"], "b");
    // The tab reconnects (its page's origin is a's) and is served.
    let mut t = tab(&b.addr, &a_base, &cookie).await;
    ping(&mut t, "on b").await;
}

/// On two threads, so that the two refreshes really run at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_refreshing_one_login_at_once_send_one_refresh_request() {
    let kc = realm(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let a = instance(&kc, &redis, "a", &[OLD_KEY]).await;
    let b = instance(&kc, &redis, "b", &[OLD_KEY]).await;
    let id = login_id(&login(&a.base).await);
    let (ca, cb) = (
        a.t.app().custody.clone().unwrap(),
        b.t.app().custody.clone().unwrap(),
    );
    for round in 0..3 {
        let before = kc.realm().token_requests("refresh_token");
        let (ra, rb) = {
            let (ca, cb, ia, ib) = (ca.clone(), cb.clone(), id.clone(), id.clone());
            let a = tokio::spawn(async move { ca.refresh(&ia).await });
            let b = tokio::spawn(async move { cb.refresh(&ib).await });
            (a.await.unwrap().unwrap(), b.await.unwrap().unwrap())
        };
        assert_eq!(
            kc.realm().token_requests("refresh_token"),
            before + 1,
            "round {round}: one refresh request reaches the realm"
        );
        assert_eq!(
            ra.access_token, rb.access_token,
            "the loser took the winner's result"
        );
        assert_eq!(ra.refresh_token, rb.refresh_token);
    }
}

#[tokio::test]
async fn logout_on_one_instance_closes_the_logins_tabs_on_another() {
    let kc = realm(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let a = instance(&kc, &redis, "a", &[OLD_KEY]).await;
    let b = instance(&kc, &redis, "b", &[OLD_KEY]).await;
    let (c1, c2) = (login(&a.base).await, login(&a.base).await);
    let b_addr = b.t.local_addr().to_string();
    let (mut on_b, mut other) = (
        tab(&b_addr, &b.base, &c1).await,
        tab(&b_addr, &b.base, &c2).await,
    );
    let r = reqwest::Client::new()
        .post(format!("{}/auth/logout", a.base))
        .header("cookie", &c1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["loggedOut"], true);
    let (code, msgs) = on_b.closed().await;
    assert_eq!(code, Some(4003));
    assert!(
        msgs.iter().any(|m| m["data"]["loggedOut"] == true),
        "{msgs:?}"
    );
    assert_eq!(me(&b.base, &c1).await.0, 401, "gone on b too");
    ping(&mut other, "the other login stays").await;
    assert_eq!(me(&b.base, &c2).await.0, 200);
}

#[tokio::test]
async fn a_login_sealed_with_an_old_key_opens_after_rotation_and_nothing_is_kept_in_the_clear() {
    let kc = realm(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let a = instance(&kc, &redis, "a", &[OLD_KEY]).await;
    let cookie = login(&a.base).await;
    let id = login_id(&cookie);
    let stored =
        a.t.app()
            .custody
            .clone()
            .unwrap()
            .store()
            .get(&id)
            .await
            .unwrap();

    // Redis holds neither the cookie's value nor any token, in keys or values.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        keys.iter().any(|k| k.starts_with("tabhub:login:")),
        "{keys:?}"
    );
    for k in &keys {
        assert!(!k.contains(&id), "a key names the login id");
        let kind: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap()],
            "set" => redis::cmd("SMEMBERS")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap(),
            other => panic!("unexpected {other} at {k}"),
        };
        for v in values {
            let v = String::from_utf8_lossy(&v);
            for secret in [&id, &*stored.access_token, &*stored.refresh_token] {
                assert!(!v.contains(secret), "{k} holds a secret in the clear");
            }
        }
    }

    // Rotated: a new key first, the old one still listed.
    let b = instance(&kc, &redis, "b", &[NEW_KEY, OLD_KEY]).await;
    assert_eq!(
        me(&b.base, &cookie).await.0,
        200,
        "the old key still opens it"
    );
    let mut t = tab(&b.t.local_addr().to_string(), &b.base, &cookie).await;
    ping(&mut t, "rotated").await;
    // A refresh on b seals with the newest key: an instance knowing only it opens the login.
    b.t.app()
        .custody
        .clone()
        .unwrap()
        .refresh(&id)
        .await
        .unwrap();
    let c = instance(&kc, &redis, "c", &[NEW_KEY]).await;
    assert_eq!(me(&c.base, &cookie).await.0, 200, "sealed with the new key");
    // An instance knowing only an unrelated key cannot read it.
    let d = instance(
        &kc,
        &redis,
        "d",
        &["AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="],
    )
    .await;
    assert_eq!(me(&d.base, &cookie).await.0, 401);
}

#[tokio::test]
async fn with_redis_stopped_logins_keep_working_locally_and_reach_redis_when_it_returns() {
    let kc = realm(Duration::from_secs(300)).await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let a = instance(&kc, &redis, "a", &[OLD_KEY]).await;
    let a_addr = a.t.local_addr().to_string();
    let before = login(&a.base).await;
    let mut t = tab(&a_addr, &a.base, &before).await;

    redis.stop();
    support::eventually("a sees Redis down", || a.t.app().broker.state() == "down").await;
    // The login made before keeps working on its instance, tabs and all; a new login works too.
    ping(&mut t, "during").await;
    assert_eq!(me(&a.base, &before).await.0, 200);
    let during = login(&a.base).await;
    assert_eq!(me(&a.base, &during).await.0, 200);
    let mut t2 = tab(&a_addr, &a.base, &during).await;
    ping(&mut t2, "new login").await;

    // Redis returns, empty (no persistence): both logins are written back and another instance serves them.
    let redis = RedisServer::start_on(port);
    support::eventually("a back on Redis", || a.t.app().broker.state() == "up").await;
    let b = instance(&kc, &redis, "b", &[OLD_KEY]).await;
    for cookie in [&during, &before] {
        support::eventually_async("the login reached Redis", || async {
            me(&b.base, cookie).await.0 == 200
        })
        .await;
    }
    ping(&mut t, "after").await;
}

#[tokio::test]
async fn a_backchannel_logout_received_by_any_instance_closes_the_logins_tabs_on_every_instance() {
    let kc = realm(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let a = instance(&kc, &redis, "a", &[OLD_KEY]).await;
    let b = instance(&kc, &redis, "b", &[OLD_KEY]).await;
    // c never saw the logins: it finds them through Redis.
    let c = instance(&kc, &redis, "c", &[OLD_KEY]).await;
    let c1 = login(&a.base).await;
    let kc_sid = kc.realm().kc_session_of("alice").unwrap();
    let c2 = login(&a.base).await;
    let b_addr = b.t.local_addr().to_string();
    let (mut t1, mut t2) = (
        tab(&b_addr, &b.base, &c1).await,
        tab(&b_addr, &b.base, &c2).await,
    );
    let url = format!("{}/auth/backchannel-logout", c.base);

    // By provider session: that login only.
    let token = kc.realm().logout_token(TABHUB_CLIENT, Some(&kc_sid), None);
    assert_eq!(kc.realm().send_backchannel_logout(&url, &token).await, 200);
    assert_eq!(t1.closed().await.0, Some(4003));
    support::eventually_async("a dropped its copy too", || async {
        me(&a.base, &c1).await.0 == 401
    })
    .await;
    ping(&mut t2, "the other login stays").await;

    // By user: every login of the user.
    let token = kc.realm().logout_token(
        TABHUB_CLIENT,
        None,
        Some(&support::keycloak::sub_of("alice")),
    );
    assert_eq!(kc.realm().send_backchannel_logout(&url, &token).await, 200);
    assert_eq!(t2.closed().await.0, Some(4003));
    support::eventually_async("a dropped its copy too", || async {
        me(&a.base, &c2).await.0 == 401
    })
    .await;
}

#[tokio::test]
async fn a_logout_made_while_redis_is_down_closes_the_logins_tabs_elsewhere_when_it_returns() {
    let kc = realm(Duration::from_secs(300)).await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let a = instance(&kc, &redis, "a", &[OLD_KEY]).await;
    let b = instance(&kc, &redis, "b", &[OLD_KEY]).await;
    let cookie = login(&a.base).await;
    let mut on_a = tab(&a.t.local_addr().to_string(), &a.base, &cookie).await;
    let mut on_b = tab(&b.t.local_addr().to_string(), &b.base, &cookie).await;

    redis.stop();
    support::eventually("b sees Redis down", || b.t.app().broker.state() == "down").await;
    let r = reqwest::Client::new()
        .post(format!("{}/auth/logout", b.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["loggedOut"], true);
    assert_eq!(
        on_b.closed().await.0,
        Some(4003),
        "at once on its own instance"
    );
    // a cannot hear of it yet (degraded): its tab stays.
    ping(&mut on_a, "not yet").await;

    let _redis = RedisServer::start_on(port);
    let (code, _) = on_a.closed().await;
    assert_eq!(code, Some(4003), "reconciled: the logout reaches a");
    support::eventually_async("gone on a", || async {
        me(&a.base, &cookie).await.0 == 401
    })
    .await;
}
